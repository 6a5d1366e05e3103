//! Interned resource names and the compact per-stream name sets built from them.
//!
//! Every stream remembers which resources it watches (SotW) or subscribed to (Delta): for a
//! sidecar ~1,250 EDS cluster names of ~45 bytes. Kept as `String`s in a B-tree that was about
//! 100 bytes per name per stream; here a name is a pointer to one shared copy (16 bytes) in a
//! sorted `Vec`, so 10,000 streams hold their watches in ~200 MB less (BENCHMARKS.md, "xDS").
use std::cmp::Ordering;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use super::resource::{Resource, ResourceSet};

/// A resource name, shared by the resource and every stream that names it.
pub type Name = Arc<str>;

fn table() -> &'static Mutex<HashSet<Name>> {
    static T: OnceLock<Mutex<HashSet<Name>>> = OnceLock::new();
    T.get_or_init(Mutex::default)
}

/// The shared copy of a generated resource's name, added to the table if new.
pub fn intern(name: &str) -> Name {
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = t.get(name) {
        return Arc::clone(n);
    }
    let n: Name = Arc::from(name);
    t.insert(Arc::clone(&n));
    n
}

/// A client-supplied name: the shared copy when a resource has that name, else a private one.
/// Clients never add to the table, so made-up names cannot grow it.
pub fn lookup(name: &str) -> Name {
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    t.get(name).map_or_else(|| Arc::from(name), Arc::clone)
}

/// Drops the names that nothing but the table holds any more (removed services); called after
/// each full push.
pub fn prune() {
    table()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|n| Arc::strong_count(n) > 1);
}

/// Something with a resource name, for walking name-sorted sequences together.
pub trait Named {
    fn name(&self) -> &Name;
}

impl Named for Name {
    fn name(&self) -> &Name {
        self
    }
}

impl Named for Arc<Resource> {
    fn name(&self) -> &Name {
        &self.name
    }
}

impl<T: Named + ?Sized> Named for &T {
    fn name(&self) -> &Name {
        (**self).name()
    }
}

/// Orders two names. Equal names are usually one interned allocation, so the pointer is checked
/// before the bytes: the names of one mesh share long prefixes (`outbound|80||svc-`), which made
/// byte comparisons the top item of full-push profiles.
pub fn cmp_names(a: &Name, b: &Name) -> Ordering {
    if Arc::ptr_eq(a, b) {
        Ordering::Equal
    } else {
        (**a).cmp(&**b)
    }
}

/// Walks two name-sorted sequences together: `f` once per name in either, with the item of each
/// side that has it. O(a + b) instead of a lookup per name.
pub fn merge<A: Named, B: Named>(
    a: impl IntoIterator<Item = A>,
    b: impl IntoIterator<Item = B>,
    mut f: impl FnMut(Option<A>, Option<B>),
) {
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let ord = match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(x), Some(y)) => cmp_names(x.name(), y.name()),
        };
        match ord {
            Ordering::Less => f(a.next(), None),
            Ordering::Greater => f(None, b.next()),
            Ordering::Equal => f(a.next(), b.next()),
        }
    }
}

/// The resources of `set` named in `names`, in name order.
pub fn select<'s>(names: &NameSet, set: &'s ResourceSet) -> Vec<&'s Arc<Resource>> {
    if names.len().saturating_mul(8) < set.len() {
        // A few names out of many (a gateway's routes): lookups beat a walk of the whole set.
        return names.iter().filter_map(|n| set.get(&**n)).collect();
    }
    let mut out = Vec::with_capacity(names.len().min(set.len()));
    merge(names.iter(), set.values(), |n, r| {
        if let (Some(_), Some(r)) = (n, r) {
            out.push(r);
        }
    });
    out
}

/// Whether a name-sorted slice has `name`.
pub fn sorted_contains<T: Named>(sorted: &[T], name: &Name) -> bool {
    sorted.binary_search_by(|x| cmp_names(x.name(), name)).is_ok()
}

/// A set of names, sorted, each a shared [`Name`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NameSet(Vec<Name>);

impl NameSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The names a client sent (duplicates dropped).
    pub fn from_requested<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Self {
        let mut v: Vec<Name> = names.into_iter().map(|n| lookup(n.as_ref())).collect();
        v.sort_unstable();
        v.dedup();
        v.shrink_to_fit();
        Self(v)
    }

    /// A set of names already shared (from resources).
    pub fn from_names(names: impl IntoIterator<Item = Name>) -> Self {
        let mut v: Vec<Name> = names.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Self(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[Name] {
        &self.0
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.binary_search_by(|n| (**n).cmp(name)).is_ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Name> {
        self.0.iter()
    }

    /// Adds client-supplied names; true when any was new. One sort for the batch (Envoy
    /// subscribes to every EDS cluster in one request).
    pub fn insert_requested<S: AsRef<str>>(&mut self, names: impl IntoIterator<Item = S>) -> bool {
        let new: Vec<Name> = names
            .into_iter()
            .filter(|n| !self.contains(n.as_ref()))
            .map(|n| lookup(n.as_ref()))
            .collect();
        if new.is_empty() {
            return false;
        }
        self.0.extend(new);
        self.0.sort_unstable();
        self.0.dedup();
        self.0.shrink_to_fit();
        true
    }

    pub fn remove(&mut self, name: &str) -> bool {
        match self.0.binary_search_by(|n| (**n).cmp(name)) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Whether a client's name list is this set. A list with a duplicate that otherwise matches
    /// reads as equal; Envoy never repeats a name. Compares in place: most SotW requests are
    /// ACKs repeating the whole watch (an EDS ACK names every cluster).
    pub fn same_as<S: AsRef<str>>(&self, requested: &[S]) -> bool {
        self.0.len() == requested.len() && requested.iter().all(|n| self.contains(n.as_ref()))
    }

    /// Names in `self` that `other` lacks.
    pub fn difference(&self, other: &NameSet) -> NameSet {
        NameSet(self.0.iter().filter(|n| !other.contains(n)).cloned().collect())
    }
}

impl<S: AsRef<str>> FromIterator<S> for NameSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        Self::from_requested(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_shared_and_client_names_never_grow_the_table() {
        let a = intern("interned-test|a");
        let b = lookup("interned-test|a");
        assert!(Arc::ptr_eq(&a, &b));
        let made_up = lookup("interned-test|made-up");
        assert!(!table().lock().unwrap().contains("interned-test|made-up"));
        drop(made_up);
        drop((a, b));
        prune();
        assert!(!table().lock().unwrap().contains("interned-test|a"));
    }

    #[test]
    fn name_set_is_a_sorted_set() {
        let mut s = NameSet::from_requested(["b", "a", "b"]);
        assert_eq!(s.len(), 2);
        assert!(s.contains("a") && s.contains("b") && !s.contains("c"));
        assert!(s.same_as(&["b", "a"]));
        assert!(!s.same_as(&["a"]));
        assert!(!s.same_as(&["a", "c"]));
        assert!(s.insert_requested(["c", "a"]));
        assert!(!s.insert_requested(["c"]));
        assert_eq!(s.iter().map(|n| &**n).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(s.remove("b") && !s.remove("b"));
        let other = NameSet::from_requested(["a"]);
        assert_eq!(s.difference(&other), NameSet::from_requested(["c"]));
    }

    #[test]
    fn merge_pairs_equal_names_whether_shared_or_not() {
        let a: Vec<Name> = ["a", "c", "d"]
            .iter()
            .map(|n| intern(&format!("merge-test|{n}")))
            .collect();
        // Private copies (not interned) of equal names still pair up.
        let b: Vec<Name> = ["b", "c", "d", "e"]
            .iter()
            .map(|n| Arc::from(format!("merge-test|{n}").as_str()))
            .collect();
        let mut seen = Vec::new();
        merge(a.iter(), b.iter(), |x, y| {
            seen.push((x.map(|n| n.to_string()), y.map(|n| n.to_string())));
        });
        let s = |n: &str| Some(format!("merge-test|{n}"));
        assert_eq!(
            seen,
            [
                (s("a"), None),
                (None, s("b")),
                (s("c"), s("c")),
                (s("d"), s("d")),
                (None, s("e")),
            ]
        );
    }

    #[test]
    fn select_finds_the_named_resources_by_walk_and_by_lookup() {
        let cla = |n: &str| envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment {
            cluster_name: n.into(),
            ..Default::default()
        };
        let set: ResourceSet = (0..100)
            .map(|i| format!("select-test|{i:03}"))
            .map(|n| {
                (
                    n.clone(),
                    Arc::new(Resource::new(&n, super::super::types::ENDPOINT, &cla(&n))),
                )
            })
            .collect();
        let names_of = |v: Vec<&Arc<Resource>>| v.iter().map(|r| r.name.to_string()).collect::<Vec<_>>();
        // Few names: lookups.
        let few = NameSet::from_requested(["select-test|007", "select-test|050", "select-test|nope"]);
        assert_eq!(names_of(select(&few, &set)), ["select-test|007", "select-test|050"]);
        // Most names: a walk of both.
        let most = NameSet::from_requested(
            (0..100)
                .step_by(2)
                .map(|i| format!("select-test|{i:03}"))
                .chain(["select-test|zzz".to_string()]),
        );
        let got = names_of(select(&most, &set));
        assert_eq!(got.len(), 50);
        assert!(got.iter().all(|n| n[12..].parse::<u32>().unwrap() % 2 == 0));
    }
}
