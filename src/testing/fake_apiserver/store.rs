//! The object store: JSON objects by resource, namespace and name, one global resourceVersion
//! that every write bumps, an event log that watches replay from, and snapshots that keep
//! paginated lists consistent. Maps are copy-on-write so a list snapshot costs one `Arc` clone.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::error::ApiError;
use super::resources::{GroupResource, ResourceType};

/// Where an object lives inside its resource; cluster-scoped objects have an empty namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

pub type Objects = Arc<BTreeMap<ObjKey, Arc<Value>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed write, as watches see it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub resource: GroupResource,
    pub kind: ChangeKind,
    /// The new object, or for a deletion the last state stamped with the deletion's resourceVersion.
    pub object: Arc<Value>,
    /// The state before this write (selectors turn MODIFIED into ADDED/DELETED with it).
    pub previous: Option<Arc<Value>>,
}

/// What a write callback decides to do with the current object.
pub enum Write {
    Put(Value),
    Delete,
    /// Leave the object alone (the answer is the current object).
    Keep,
}

/// The result of a write.
#[derive(Debug, Clone)]
pub struct Written {
    /// The stored object, or the deleted one; `None` only for `Keep` on a missing object.
    pub object: Option<Arc<Value>>,
    /// `None` when nothing changed (no resourceVersion was spent).
    pub change: Option<ChangeKind>,
}

/// How a watch begins: the objects or events to send first, and the live feed after them.
pub struct WatchStart {
    pub backlog: Vec<Arc<Change>>,
    pub initial: Vec<Arc<Value>>,
    pub rv: u64,
    pub feed: broadcast::Receiver<Arc<Change>>,
}

/// Where a watch starts.
pub enum WatchFrom {
    /// Synthetic ADDED events for every object, then changes.
    Now,
    /// Replay of every change after this resourceVersion, then changes.
    After(u64),
}

struct Inner {
    rv: u64,
    objects: BTreeMap<GroupResource, Objects>,
    log: VecDeque<Arc<Change>>,
    log_capacity: usize,
    /// Changes at or below this resourceVersion are no longer in the log.
    compacted: u64,
    snapshots: HashMap<(GroupResource, u64), Objects>,
    snapshot_order: VecDeque<(GroupResource, u64)>,
}

const MAX_SNAPSHOTS: usize = 256;
const FEED_CAPACITY: usize = 16384;

pub struct Store {
    inner: Mutex<Inner>,
    feed: broadcast::Sender<Arc<Change>>,
}

impl Store {
    pub fn new(log_capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                log_capacity: log_capacity.max(1),
                compacted: 1,
                snapshots: HashMap::new(),
                snapshot_order: VecDeque::new(),
            }),
            feed: broadcast::channel(FEED_CAPACITY).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (writes are applied at the end).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Every change from now on (controllers use this).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.feed.subscribe()
    }

    pub fn get(&self, gr: &GroupResource, key: &ObjKey) -> Option<Arc<Value>> {
        self.lock().objects.get(gr).and_then(|m| m.get(key).cloned())
    }

    /// A consistent view of one resource and the resourceVersion it reflects.
    pub fn snapshot(&self, gr: &GroupResource) -> (u64, Objects) {
        let inner = self.lock();
        (inner.rv, inner.objects.get(gr).cloned().unwrap_or_default())
    }

    /// Keeps a snapshot for `continue` tokens that name `(gr, rv)`.
    pub fn keep_snapshot(&self, gr: &GroupResource, rv: u64, objects: Objects) {
        let mut inner = self.lock();
        let key = (gr.clone(), rv);
        if inner.snapshots.insert(key.clone(), objects).is_none() {
            inner.snapshot_order.push_back(key);
        }
        while inner.snapshot_order.len() > MAX_SNAPSHOTS {
            if let Some(old) = inner.snapshot_order.pop_front() {
                inner.snapshots.remove(&old);
            }
        }
    }

    /// The snapshot a `continue` token refers to; gone after compaction, like etcd's revisions.
    pub fn kept_snapshot(&self, gr: &GroupResource, rv: u64) -> Option<Objects> {
        self.lock().snapshots.get(&(gr.clone(), rv)).cloned()
    }

    /// Resources that hold at least one object (discovery of unknown groups).
    pub fn resources(&self) -> Vec<GroupResource> {
        self.lock()
            .objects
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(gr, _)| gr.clone())
            .collect()
    }

    /// Drops the event log and list snapshots: watches from older resourceVersions get 410.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.log.clear();
        inner.compacted = inner.rv;
        inner.snapshots.clear();
        inner.snapshot_order.clear();
        tracing::debug!(rv = inner.rv, "fake apiserver store compacted");
    }

    /// Starts a watch on `gr` without missing or repeating a change.
    pub fn watch(&self, gr: &GroupResource, from: WatchFrom) -> Result<WatchStart, ApiError> {
        let inner = self.lock();
        // Subscribing under the lock: every change after `rv` reaches the feed.
        let feed = self.feed.subscribe();
        match from {
            WatchFrom::Now => Ok(WatchStart {
                backlog: Vec::new(),
                initial: inner
                    .objects
                    .get(gr)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default(),
                rv: inner.rv,
                feed,
            }),
            WatchFrom::After(n) => {
                if n < inner.compacted {
                    return Err(ApiError::too_old(n, inner.compacted + 1));
                }
                Ok(WatchStart {
                    backlog: inner
                        .log
                        .iter()
                        .filter(|c| c.rv > n && &c.resource == gr)
                        .cloned()
                        .collect(),
                    initial: Vec::new(),
                    rv: inner.rv.max(n),
                    feed,
                })
            }
        }
    }

    /// Reads the current object, lets `decide` choose, and commits the result atomically.
    /// The store owns uid, creationTimestamp, generation and resourceVersion.
    pub fn write<F>(&self, rt: &ResourceType, key: &ObjKey, decide: F) -> Result<Written, ApiError>
    where
        F: FnOnce(Option<&Value>) -> Result<Write, ApiError>,
    {
        let gr = rt.group_resource();
        let mut inner = self.lock();
        let old = inner.objects.get(&gr).and_then(|m| m.get(key).cloned());
        match decide(old.as_deref())? {
            Write::Keep => Ok(Written {
                object: old,
                change: None,
            }),
            Write::Put(mut new) => {
                stamp(&mut new, key, old.as_deref());
                if let Some(o) = &old
                    && same_content(o, &new)
                {
                    return Ok(Written {
                        object: Some(o.clone()),
                        change: None,
                    });
                }
                let kind = if old.is_some() {
                    ChangeKind::Modified
                } else {
                    ChangeKind::Added
                };
                let obj = inner.commit(&self.feed, &gr, key, kind, new, old);
                Ok(Written {
                    object: Some(obj),
                    change: Some(kind),
                })
            }
            Write::Delete => {
                let Some(o) = old else {
                    return Err(ApiError::not_found(rt, &key.name));
                };
                let obj = inner.commit(&self.feed, &gr, key, ChangeKind::Deleted, (*o).clone(), Some(o));
                let cascade = gr.group.is_empty() && gr.plural == "namespaces";
                if cascade {
                    inner.delete_namespace_contents(&self.feed, &key.name);
                }
                Ok(Written {
                    object: Some(obj),
                    change: Some(ChangeKind::Deleted),
                })
            }
        }
    }
}

impl Inner {
    fn commit(
        &mut self,
        feed: &broadcast::Sender<Arc<Change>>,
        gr: &GroupResource,
        key: &ObjKey,
        kind: ChangeKind,
        mut obj: Value,
        previous: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        let obj = Arc::new(obj);
        let map = Arc::make_mut(self.objects.entry(gr.clone()).or_default());
        if kind == ChangeKind::Deleted {
            map.remove(key);
        } else {
            map.insert(key.clone(), obj.clone());
        }
        let change = Arc::new(Change {
            rv,
            resource: gr.clone(),
            kind,
            object: obj.clone(),
            previous,
        });
        self.log.push_back(change.clone());
        while self.log.len() > self.log_capacity {
            if let Some(c) = self.log.pop_front() {
                self.compacted = c.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = feed.send(change);
        obj
    }

    /// What the namespace controller does once a namespace goes: everything in it goes too.
    fn delete_namespace_contents(&mut self, feed: &broadcast::Sender<Arc<Change>>, ns: &str) {
        let doomed: Vec<(GroupResource, ObjKey, Arc<Value>)> = self
            .objects
            .iter()
            .flat_map(|(gr, m)| {
                m.iter()
                    .filter(|(k, _)| k.namespace == ns)
                    .map(|(k, v)| (gr.clone(), k.clone(), v.clone()))
            })
            .collect();
        for (gr, key, obj) in doomed {
            self.commit(feed, &gr, &key, ChangeKind::Deleted, (*obj).clone(), Some(obj));
        }
    }
}

/// Sets the server-owned metadata on an object about to be stored.
fn stamp(new: &mut Value, key: &ObjKey, old: Option<&Value>) {
    if !new.is_object() {
        *new = json!({});
    }
    let generation = match old {
        None => 1,
        Some(o) => {
            let g = o.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
            if spec_changed(o, new) { g + 1 } else { g }
        }
    };
    let meta = new
        .as_object_mut()
        .map(|m| m.entry("metadata").or_insert_with(|| json!({})))
        .filter(|m| m.is_object());
    let Some(Value::Object(meta)) = meta else { return };
    meta.insert("name".into(), json!(key.name));
    if key.namespace.is_empty() {
        meta.remove("namespace");
    } else {
        meta.insert("namespace".into(), json!(key.namespace));
    }
    let keep = |field: &str, fresh: Value| {
        old.and_then(|o| o.pointer(&format!("/metadata/{field}")).cloned())
            .unwrap_or(fresh)
    };
    meta.insert("uid".into(), keep("uid", json!(new_uid())));
    meta.insert(
        "creationTimestamp".into(),
        keep("creationTimestamp", json!(now_rfc3339())),
    );
    meta.insert("generation".into(), json!(generation));
    if let Some(rv) = old.and_then(|o| o.pointer("/metadata/resourceVersion")) {
        meta.insert("resourceVersion".into(), rv.clone());
    }
    meta.remove("managedFields");
}

/// Whether anything outside metadata and status changed (what bumps `generation`).
fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
            m.remove("apiVersion");
            m.remove("kind");
        }
        v
    };
    strip(old) != strip(new)
}

/// A write that changes nothing is not a write: no resourceVersion, no event (as etcd3 storage).
fn same_content(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("apiVersion");
        }
        v
    };
    strip(old) == strip(new)
}

/// A random RFC 4122 version-4 UUID.
pub fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Now, to the second, as `metav1.Time` serializes.
pub fn now_rfc3339() -> String {
    use k8s_openapi::jiff::Timestamp;
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, name: &str, data: &str) -> Written {
        store
            .write(&ResourceType::core("configmaps"), &ObjKey::new("ns", name), |_| {
                Ok(Write::Put(
                    json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": name}, "data": {"k": data}}),
                ))
            })
            .unwrap()
    }

    #[test]
    fn writes_bump_rv_and_keep_identity() {
        let s = Store::new(100);
        let a = put(&s, "a", "1").object.unwrap();
        let uid = a["metadata"]["uid"].clone();
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        assert_eq!(a["metadata"]["generation"], 1);
        let b = put(&s, "a", "2").object.unwrap();
        assert_eq!(b["metadata"]["uid"], uid);
        assert_eq!(b["metadata"]["resourceVersion"], "3");
        assert_eq!(b["metadata"]["generation"], 2);
        let same = put(&s, "a", "2");
        assert!(same.change.is_none(), "identical write is a no-op");
        assert_eq!(s.current_rv(), 3);
    }

    #[test]
    fn watch_replays_and_expires() {
        let s = Store::new(2);
        let gr = ResourceType::core("configmaps").group_resource();
        put(&s, "a", "1");
        put(&s, "b", "1");
        put(&s, "c", "1");
        let w = s.watch(&gr, WatchFrom::After(3)).unwrap();
        assert_eq!(w.backlog.len(), 1);
        assert_eq!(s.watch(&gr, WatchFrom::After(1)).err().unwrap().code, 410);
        s.compact();
        assert_eq!(s.watch(&gr, WatchFrom::After(3)).err().unwrap().code, 410);
        assert!(s.watch(&gr, WatchFrom::After(4)).is_ok());
    }
}
