//! What a Delta client holds of one type, and the differences a response must carry.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::interned::{self, Name, NameSet};
use super::resource::{Resource, ResourceSet};

/// What a Delta client holds of one type, name → version.
///
/// Kept as the resource set last sent in full (`base`, shared by every stream that got the same
/// set) plus the exact differences since, instead of a name → version map per stream: after each
/// full response the client holds exactly the wanted part of that set. That map was ~2,700
/// `String` pairs per sidecar stream, about 0.5 MiB, the largest per-stream cost (BENCHMARKS.md).
#[derive(Debug, Default)]
pub struct Held {
    base: Option<Arc<ResourceSet>>,
    /// Whether the client wanted all of `base` (wildcard) or only its subscribed names.
    base_wildcard: bool,
    /// Names whose held version differs from `base`'s; `None`: not held.
    since: BTreeMap<Name, Option<String>>,
    count: usize,
}

impl Held {
    /// What a reconnecting client says it has (`initial_resource_versions`).
    pub fn initial(versions: std::collections::HashMap<String, String>) -> Self {
        Self {
            count: versions.len(),
            since: versions
                .into_iter()
                .map(|(n, v)| (interned::lookup(&n), Some(v)))
                .collect(),
            ..Default::default()
        }
    }

    /// The version the client holds of `name`.
    pub fn version<'a>(&'a self, name: &str, subscribed: &NameSet) -> Option<&'a str> {
        if let Some(v) = self.since.get(name) {
            return v.as_deref();
        }
        let r = self.base.as_ref()?.get(name)?;
        (self.base_wildcard || subscribed.contains(name)).then_some(r.version.as_str())
    }

    /// How many resources the client holds.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The client dropped `name` (unsubscribed).
    pub fn forget(&mut self, name: &Name, subscribed: &NameSet) {
        if self.version(name, subscribed).is_some() {
            self.set(name, None, subscribed);
        }
    }

    /// After a response of `changed` and `removed` (an endpoint-only push).
    pub fn apply(&mut self, changed: &[&Resource], removed: &[Name], subscribed: &NameSet) {
        for r in changed {
            self.set(&r.name, Some(&r.version), subscribed);
        }
        for n in removed {
            self.set(n, None, subscribed);
        }
    }

    fn set(&mut self, name: &Name, version: Option<&str>, subscribed: &NameSet) {
        let had = self.version(name, subscribed).is_some();
        self.count = (self.count + usize::from(version.is_some())).saturating_sub(usize::from(had));
        self.since.insert(Arc::clone(name), version.map(str::to_string));
    }

    /// A name subscribed anew is not held, even if `base` has it (the client did not want it).
    pub fn subscribed(&mut self, name: &Name) {
        if !self.base_wildcard
            && !self.since.contains_key(&**name)
            && self.base.as_ref().is_some_and(|b| b.contains_key(&**name))
        {
            self.since.insert(Arc::clone(name), None);
        }
    }

    /// After a full response the client holds exactly `wanted` of `set`.
    pub fn rebase(&mut self, set: &Arc<ResourceSet>, wildcard: bool, count: usize) {
        *self = Self {
            base: Some(Arc::clone(set)),
            base_wildcard: wildcard,
            since: BTreeMap::new(),
            count,
        };
    }
}

/// What a full response must carry for the client to hold exactly the wanted part of a set.
#[derive(Debug)]
pub struct Diff<'a> {
    pub changed: Vec<&'a Resource>,
    pub removed: Vec<Name>,
    /// How many resources the client holds afterwards.
    pub count: usize,
}

/// Compares what the client holds with the wanted part of `set` (everything when `wildcard`,
/// else the subscribed names). Both sides are walked together in name order.
pub fn full_diff<'a>(held: &Held, subscribed: &NameSet, wildcard: bool, set: &'a ResourceSet) -> Diff<'a> {
    let wanted: Vec<&Arc<Resource>> = if wildcard {
        set.values().collect()
    } else {
        interned::select(subscribed, set)
    };
    let held_base: Vec<&Arc<Resource>> = match &held.base {
        None => Vec::new(),
        Some(b) if held.base_wildcard => b.values().collect(),
        Some(b) => interned::select(subscribed, b),
    };
    let since = &held.since;
    let since_version = |n: &Name| -> Option<Option<&str>> {
        if since.is_empty() {
            None
        } else {
            since.get(&**n).map(|v| v.as_deref())
        }
    };
    let mut changed: Vec<&Resource> = Vec::new();
    let mut removed: Vec<Name> = Vec::new();
    interned::merge(wanted.iter().copied(), held_base.iter().copied(), |new, old| {
        match (new, old) {
            (Some(r), old) => {
                let had = since_version(&r.name).unwrap_or(old.map(|o| o.version.as_str()));
                if had != Some(r.version.as_str()) {
                    changed.push(r.as_ref());
                }
            }
            (None, Some(o)) => {
                if since_version(&o.name).unwrap_or(Some("")).is_some() {
                    removed.push(Arc::clone(&o.name));
                }
            }
            (None, None) => {}
        }
    });
    // Held only through the differences (e.g. a reconnect's initial versions).
    for (n, v) in since {
        if v.is_some() && !interned::sorted_contains(&wanted, n) && !interned::sorted_contains(&held_base, n) {
            removed.push(Arc::clone(n));
        }
    }
    Diff {
        changed,
        removed,
        count: wanted.len(),
    }
}

/// The same comparison over `names` only: for an endpoint-only push, whose changes are confined
/// to those names' resources. O(names), not O(held).
pub fn changed_diff<'a>(
    held: &Held,
    subscribed: &NameSet,
    wildcard: bool,
    set: &'a ResourceSet,
    names: &[Name],
) -> (Vec<&'a Resource>, Vec<Name>) {
    let mut changed: Vec<&Resource> = Vec::new();
    let mut removed: Vec<Name> = Vec::new();
    for n in names.iter().filter(|n| wildcard || subscribed.contains(n)) {
        let had = held.version(n, subscribed);
        match set.get(&**n) {
            Some(r) if had != Some(r.version.as_str()) => changed.push(r),
            Some(_) => {}
            None if had.is_some() => removed.push(Arc::clone(n)),
            None => {}
        }
    }
    (changed, removed)
}

#[cfg(test)]
mod tests {
    //! `Held` and the two diffs against a plain name → version map with the protocol's rules
    //! (what the server kept per stream before), over random sequences of pushes, reconnects,
    //! subscriptions and unsubscriptions.
    use std::collections::{BTreeMap, BTreeSet, HashMap};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::xds::types::ENDPOINT;

    const UNIVERSE: usize = 8;

    fn name(i: usize) -> String {
        format!("held-test|{i}")
    }

    fn resource(i: usize, v: u8) -> Arc<Resource> {
        let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment {
            cluster_name: format!("{}#{v}", name(i)),
            ..Default::default()
        };
        Arc::new(Resource::new(&name(i), ENDPOINT, &cla))
    }

    fn random_set(rng: &mut StdRng) -> ResourceSet {
        let mut set = ResourceSet::new();
        for i in 0..UNIVERSE {
            if rng.random_bool(0.7) {
                set.insert(name(i), resource(i, rng.random_range(0..3)));
            }
        }
        set
    }

    /// The reference: what the client holds, name → version.
    #[derive(Default)]
    struct Model {
        sent: BTreeMap<String, String>,
    }

    type Changes = (Vec<(String, String)>, Vec<String>);

    impl Model {
        fn respond(&mut self, set: &ResourceSet, subscribed: &BTreeSet<String>, wildcard: bool) -> Changes {
            let wanted = |n: &String| wildcard || subscribed.contains(n);
            let changed: Vec<(String, String)> = set
                .iter()
                .filter(|(n, r)| wanted(n) && self.sent.get(*n) != Some(&r.version))
                .map(|(n, r)| (n.clone(), r.version.clone()))
                .collect();
            let removed: Vec<String> = self
                .sent
                .keys()
                .filter(|n| !set.contains_key(*n) || !wanted(n))
                .cloned()
                .collect();
            for (n, v) in &changed {
                self.sent.insert(n.clone(), v.clone());
            }
            for n in &removed {
                self.sent.remove(n);
            }
            (changed, removed)
        }
    }

    fn sorted(changed: &[&Resource], removed: &[Name]) -> Changes {
        let mut c: Vec<(String, String)> = changed
            .iter()
            .map(|r| (r.name.to_string(), r.version.clone()))
            .collect();
        let mut r: Vec<String> = removed.iter().map(|n| n.to_string()).collect();
        c.sort();
        r.sort();
        (c, r)
    }

    /// A full response from both sides; they must agree on what it carries.
    fn full_response(
        held: &mut Held,
        model: &mut Model,
        set: &ResourceSet,
        subscribed: &BTreeSet<String>,
        wildcard: bool,
    ) {
        let names = NameSet::from_requested(subscribed);
        let arc = Arc::new(set.clone());
        let diff = full_diff(held, &names, wildcard, &arc);
        assert_eq!(
            sorted(&diff.changed, &diff.removed),
            model.respond(set, subscribed, wildcard)
        );
        held.rebase(&arc, wildcard, diff.count);
    }

    #[test]
    fn held_state_and_diffs_match_a_per_stream_version_map() {
        let mut rng = StdRng::seed_from_u64(0x6d65_7368);
        for _ in 0..300 {
            let wildcard = rng.random_bool(0.3);
            let mut subscribed: BTreeSet<String> = if wildcard {
                BTreeSet::new()
            } else {
                (0..UNIVERSE).filter(|_| rng.random_bool(0.6)).map(name).collect()
            };
            let mut set = random_set(&mut rng);
            // A reconnect: the client says what it holds, some of it current, some stale or gone.
            let mut initial: HashMap<String, String> = HashMap::new();
            for i in 0..=UNIVERSE {
                if rng.random_bool(0.4) {
                    let v = match set.get(&name(i)) {
                        Some(r) if rng.random_bool(0.5) => r.version.clone(),
                        _ => "stale".to_string(),
                    };
                    initial.insert(name(i), v);
                }
            }
            let mut model = Model {
                sent: initial.clone().into_iter().collect(),
            };
            let mut held = Held::initial(initial);

            for step in 0..40 {
                let names = NameSet::from_requested(&subscribed);
                // The first response, and every few steps a full push.
                let op = if step == 0 { 0 } else { rng.random_range(0..4) };
                match op {
                    0 => {
                        if step > 0 {
                            set = random_set(&mut rng);
                        }
                        full_response(&mut held, &mut model, &set, &subscribed, wildcard);
                    }
                    1 => {
                        // An endpoint-only push: only the resources of `touched` change.
                        let touched: Vec<usize> = (0..UNIVERSE).filter(|_| rng.random_bool(0.3)).collect();
                        for &i in &touched {
                            if rng.random_bool(0.2) {
                                set.remove(&name(i));
                            } else {
                                set.insert(name(i), resource(i, rng.random_range(0..3)));
                            }
                        }
                        let touched_names: Vec<Name> = touched.iter().map(|&i| interned::lookup(&name(i))).collect();
                        let (changed, removed) = changed_diff(&held, &names, wildcard, &set, &touched_names);
                        assert_eq!(sorted(&changed, &removed), model.respond(&set, &subscribed, wildcard));
                        held.apply(&changed, &removed, &names);
                    }
                    2 if !wildcard => {
                        // New subscriptions are answered with a full response.
                        let new: Vec<String> = (0..UNIVERSE)
                            .map(name)
                            .filter(|n| !subscribed.contains(n) && rng.random_bool(0.3))
                            .collect();
                        for n in &new {
                            subscribed.insert(n.clone());
                            held.subscribed(&interned::lookup(n));
                        }
                        full_response(&mut held, &mut model, &set, &subscribed, wildcard);
                    }
                    _ if !wildcard => {
                        // Unsubscribing is not answered; the client drops what it had.
                        if let Some(n) = subscribed.iter().find(|_| rng.random_bool(0.4)).cloned() {
                            held.forget(&interned::lookup(&n), &names);
                            subscribed.remove(&n);
                            model.sent.remove(&n);
                        }
                    }
                    _ => {}
                }
                let names = NameSet::from_requested(&subscribed);
                for i in 0..=UNIVERSE {
                    assert_eq!(
                        held.version(&name(i), &names),
                        model.sent.get(&name(i)).map(String::as_str),
                        "step {step}, {}",
                        name(i)
                    );
                }
                assert_eq!(held.count(), model.sent.len(), "step {step}");
            }
        }
    }
}
