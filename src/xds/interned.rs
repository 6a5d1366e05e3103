//! Interned resource names and the compact per-stream name sets built from them.
//!
//! Every stream remembers which resources it watches (SotW) or subscribed to (Delta): for a
//! sidecar ~1,250 EDS cluster names of ~45 bytes. Kept as `String`s in a B-tree that was about
//! 100 bytes per name per stream; here a name is a pointer to one shared copy (16 bytes) in a
//! sorted `Vec`, so 10,000 streams hold their watches in ~200 MB less (BENCHMARKS.md, "xDS").
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

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
}
