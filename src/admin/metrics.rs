//! A small Prometheus text-format registry.
//!
//! Istio exports its metric names verbatim (`citadel_server_csr_count`, `pilot_xds`, …) with no
//! `_total` suffix on counters; dashboards and alerts match those names, so meshd keeps them
//! exactly. Counters and gauges are single atomics; labelled families look up their child once
//! and callers keep the handle on hot paths.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    pub fn inc(&self) {
        self.add(1.0)
    }
    pub fn dec(&self) {
        self.add(-1.0)
    }
    pub fn add(&self, d: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some((f64::from_bits(b) + d).to_bits())
        });
    }
}

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    sum_micros: AtomicI64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicI64::new(0),
            count: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add((v * 1e6) as i64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    fn encode(&self, name: &str, labels: &str, out: &mut String) {
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{}le=\"{b}\"}} {cumulative}", with_comma(labels));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{}le=\"+Inf\"}} {count}", with_comma(labels));
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

fn with_comma(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{labels},")
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// Default latency buckets in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

enum Kind {
    Counter,
    Gauge,
    Histogram(Vec<f64>),
}

enum Child {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

struct Family {
    name: String,
    help: String,
    label_names: Vec<String>,
    kind: Kind,
    children: RwLock<BTreeMap<Vec<String>, Child>>,
}

impl Family {
    fn child(&self, values: &[&str]) -> Child {
        assert_eq!(values.len(), self.label_names.len(), "metric {} label count", self.name);
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        if let Some(c) = self.children.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return c.share();
        }
        let mut w = self.children.write().unwrap_or_else(|e| e.into_inner());
        w.entry(key)
            .or_insert_with(|| match &self.kind {
                Kind::Counter => Child::Counter(Arc::default()),
                Kind::Gauge => Child::Gauge(Arc::default()),
                Kind::Histogram(b) => Child::Histogram(Arc::new(Histogram::new(b))),
            })
            .share()
    }

    fn encode(&self, out: &mut String) {
        let ty = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {ty}", self.name);
        for (values, child) in self.children.read().unwrap_or_else(|e| e.into_inner()).iter() {
            let labels = self
                .label_names
                .iter()
                .zip(values)
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect::<Vec<_>>()
                .join(",");
            match child {
                Child::Counter(c) => {
                    let _ = writeln!(out, "{}{} {}", self.name, braces(&labels), c.get());
                }
                Child::Gauge(g) => {
                    let _ = writeln!(out, "{}{} {}", self.name, braces(&labels), g.get());
                }
                Child::Histogram(h) => h.encode(&self.name, &labels, out),
            }
        }
    }
}

impl Child {
    fn share(&self) -> Child {
        match self {
            Child::Counter(c) => Child::Counter(Arc::clone(c)),
            Child::Gauge(g) => Child::Gauge(Arc::clone(g)),
            Child::Histogram(h) => Child::Histogram(Arc::clone(h)),
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A labelled family handle.
pub struct Vec_<T> {
    family: Arc<Family>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Vec_<T> {
    fn clone(&self) -> Self {
        Self {
            family: Arc::clone(&self.family),
            _t: Default::default(),
        }
    }
}

pub type CounterVec = Vec_<Counter>;
pub type GaugeVec = Vec_<Gauge>;
pub type HistogramVec = Vec_<Histogram>;

impl Vec_<Counter> {
    pub fn with(&self, labels: &[&str]) -> Arc<Counter> {
        match self.family.child(labels) {
            Child::Counter(c) => c,
            _ => unreachable!("family kind is fixed at registration"),
        }
    }
}

impl Vec_<Gauge> {
    pub fn with(&self, labels: &[&str]) -> Arc<Gauge> {
        match self.family.child(labels) {
            Child::Gauge(g) => g,
            _ => unreachable!("family kind is fixed at registration"),
        }
    }
    /// Drops a child (e.g. a removed cluster's series).
    pub fn remove(&self, labels: &[&str]) {
        let key: Vec<String> = labels.iter().map(|v| v.to_string()).collect();
        self.family
            .children
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }
}

impl Vec_<Histogram> {
    pub fn with(&self, labels: &[&str]) -> Arc<Histogram> {
        match self.family.child(labels) {
            Child::Histogram(h) => h,
            _ => unreachable!("family kind is fixed at registration"),
        }
    }
}

/// All metric families of one meshd instance.
#[derive(Default)]
pub struct Registry {
    families: RwLock<Vec<Arc<Family>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn family(&self, name: &str, help: &str, labels: &[&str], kind: Kind) -> Arc<Family> {
        let mut fams = self.families.write().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fams.iter().find(|f| f.name == name) {
            return Arc::clone(f);
        }
        let f = Arc::new(Family {
            name: name.into(),
            help: help.into(),
            label_names: labels.iter().map(|l| l.to_string()).collect(),
            kind,
            children: RwLock::default(),
        });
        fams.push(Arc::clone(&f));
        f
    }

    pub fn counter(&self, name: &str, help: &str) -> Arc<Counter> {
        match self.family(name, help, &[], Kind::Counter).child(&[]) {
            Child::Counter(c) => c,
            _ => panic!("metric {name} registered with another type"),
        }
    }

    /// Exports an existing counter (e.g. a process-wide one) as `name`; a counter already
    /// registered under that name wins.
    pub fn counter_from(&self, name: &str, help: &str, counter: Arc<Counter>) -> Arc<Counter> {
        let family = self.family(name, help, &[], Kind::Counter);
        let mut children = family.children.write().unwrap_or_else(|e| e.into_inner());
        match children.entry(Vec::new()).or_insert(Child::Counter(counter)) {
            Child::Counter(c) => Arc::clone(c),
            _ => panic!("metric {name} registered with another type"),
        }
    }

    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        Vec_ {
            family: self.family(name, help, labels, Kind::Counter),
            _t: Default::default(),
        }
    }

    pub fn gauge(&self, name: &str, help: &str) -> Arc<Gauge> {
        match self.family(name, help, &[], Kind::Gauge).child(&[]) {
            Child::Gauge(g) => g,
            _ => panic!("metric {name} registered with another type"),
        }
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        Vec_ {
            family: self.family(name, help, labels, Kind::Gauge),
            _t: Default::default(),
        }
    }

    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Arc<Histogram> {
        match self
            .family(name, help, &[], Kind::Histogram(buckets.to_vec()))
            .child(&[])
        {
            Child::Histogram(h) => h,
            _ => panic!("metric {name} registered with another type"),
        }
    }

    pub fn histogram_vec(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        Vec_ {
            family: self.family(name, help, labels, Kind::Histogram(buckets.to_vec())),
            _t: Default::default(),
        }
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        for f in self.families.read().unwrap_or_else(|e| e.into_inner()).iter() {
            f.encode(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_istio_names_verbatim() {
        let r = Registry::new();
        let c = r.counter("citadel_server_csr_count", "CSRs received");
        c.inc();
        c.inc();
        let v = r.counter_vec("citadel_server_csr_sign_err_count", "sign errors", &["error"]);
        v.with(&["TTL_ERROR"]).inc();
        let h = r.histogram("meshd_test_seconds", "t", &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        let text = r.encode();
        assert!(
            text.contains("# TYPE citadel_server_csr_count counter\ncitadel_server_csr_count 2\n"),
            "{text}"
        );
        assert!(text.contains("citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"} 1"));
        assert!(text.contains("meshd_test_seconds_bucket{le=\"0.1\"} 1"));
        assert!(text.contains("meshd_test_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("meshd_test_seconds_count 2"));
        assert!(!text.contains("_total"));
    }

    #[test]
    fn same_name_returns_same_family() {
        let r = Registry::new();
        r.counter("x", "h").inc();
        r.counter("x", "h").inc();
        assert_eq!(r.counter("x", "h").get(), 2);
    }
}
