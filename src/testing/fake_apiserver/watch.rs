//! Watches: chunked newline-delimited JSON events (ADDED/MODIFIED/DELETED/BOOKMARK/ERROR)
//! replayed from the event log after the requested resourceVersion, then live. Like the watch
//! cache: a too-old resourceVersion gets an ERROR event with a 410 Status, an object leaving
//! the selector is DELETED, `sendInitialEvents` ends its initial state with an annotated
//! BOOKMARK, and a watch ends at `timeoutSeconds` (or when a test calls `drop_watches`).
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::http::Body;
use super::path::Target;
use super::rest::Filter;
use super::state::{Core, present};
use super::store::{Change, ChangeKind, ObjKey, WatchFrom};

/// kube-apiserver's `--min-request-timeout`, the default watch length.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Params {
    from: WatchFrom,
    initial_events: bool,
    bookmarks: bool,
    timeout: Duration,
}

fn params(q: &HashMap<String, String>, t: &Target) -> Result<Params, ApiError> {
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let initial_events = flag("sendInitialEvents");
    let bookmarks = flag("allowWatchBookmarks");
    let rv_match = q.get("resourceVersionMatch").map(String::as_str).unwrap_or_default();
    let invalid = |detail: &str| ApiError::invalid("ListOptions.meta.k8s.io", "", &t.rt, detail);
    if initial_events {
        if rv_match != "NotOlderThan" {
            return Err(invalid(
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !bookmarks {
            return Err(invalid(
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
    } else if !rv_match.is_empty() {
        return Err(invalid(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let rv = q.get("resourceVersion").map(String::as_str).unwrap_or_default();
    let from = match rv {
        "" | "0" => WatchFrom::Now,
        // With sendInitialEvents the state is sent first, so "not older than N" is now.
        _ if initial_events => WatchFrom::Now,
        n => WatchFrom::After(
            n.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {n}")))?,
        ),
    };
    // Zero or absent: the server's default, as kube-apiserver does.
    let timeout = match q.get("timeoutSeconds").filter(|s| !s.is_empty()) {
        Some(s) => match s
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?
        {
            0 => DEFAULT_TIMEOUT,
            n => Duration::from_secs(n),
        },
        None => DEFAULT_TIMEOUT,
    };
    Ok(Params {
        from,
        initial_events,
        bookmarks,
        timeout,
    })
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Starts a watch; errors before the stream starts are ordinary error responses.
pub fn watch(core: Arc<Core>, t: &Target, q: &HashMap<String, String>) -> Result<Response<Body>, ApiError> {
    let p = params(q, t)?;
    let filter = Filter::from_query(t, q)?;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let start = core.store.watch(&t.rt.group_resource(), p.from);
    let session = Session {
        core: core.clone(),
        target: t.clone(),
        filter,
        tx,
        bookmarks: p.bookmarks,
    };
    match start {
        Ok(start) => {
            tokio::spawn(session.run(start, p.initial_events, p.timeout));
        }
        // Like the watch cache: the stream starts, then says 410 and ends.
        Err(e) => {
            tokio::spawn(async move {
                let _ = session.tx.send(event_line("ERROR", &e.to_status())).await;
            });
        }
    }
    let body = StreamBody::new(ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(super::http::full(Bytes::new()))))
}

struct Session {
    core: Arc<Core>,
    target: Target,
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    bookmarks: bool,
}

impl Session {
    async fn send(&self, kind: &str, obj: &Value) -> bool {
        self.tx
            .send(event_line(kind, &present(&self.target.rt, obj)))
            .await
            .is_ok()
    }

    fn key_of(obj: &Value) -> ObjKey {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        ObjKey::new(&s("/metadata/namespace"), &s("/metadata/name"))
    }

    fn passes(&self, obj: &Value) -> bool {
        self.filter.matches(&Self::key_of(obj), obj)
    }

    /// Sends one change as this watcher's selectors see it.
    async fn emit(&self, c: &Change) -> bool {
        let now = c.kind != ChangeKind::Deleted && self.passes(&c.object);
        let before = c.previous.as_deref().is_some_and(|p| self.passes(p));
        match (c.kind, before, now) {
            (ChangeKind::Deleted, true, _) => self.send("DELETED", &c.object).await,
            (ChangeKind::Added, _, true) => self.send("ADDED", &c.object).await,
            (ChangeKind::Modified, true, true) => self.send("MODIFIED", &c.object).await,
            (ChangeKind::Modified, false, true) => self.send("ADDED", &c.object).await,
            (ChangeKind::Modified, true, false) => {
                // Left the selector: DELETED with its previous content at this resourceVersion.
                let mut prev = c.previous.as_deref().cloned().unwrap_or_default();
                if let Some(m) = prev.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.insert("resourceVersion".into(), json!(c.rv.to_string()));
                }
                self.send("DELETED", &prev).await
            }
            _ => true,
        }
    }

    async fn bookmark(&self, rv: u64, initial_end: bool) -> bool {
        let mut meta = json!({ "resourceVersion": rv.to_string() });
        if initial_end {
            meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let kind = self.target.rt.info().kind;
        let obj = json!({ "kind": kind, "apiVersion": self.target.rt.api_version(), "metadata": meta });
        self.tx.send(event_line("BOOKMARK", &obj)).await.is_ok()
    }

    async fn run(self, start: super::store::WatchStart, initial_events: bool, timeout: Duration) {
        let mut epoch = self.core.watch_epoch.subscribe();
        let mut feed = start.feed;
        let mut last_rv = start.rv;
        for obj in &start.initial {
            if self.passes(obj) && !self.send("ADDED", obj).await {
                return;
            }
        }
        for c in &start.backlog {
            if !self.emit(c).await {
                return;
            }
        }
        if initial_events && !self.bookmark(last_rv, true).await {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let every = self.core.config.bookmark_interval.max(Duration::from_millis(10));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let gr = self.target.rt.group_resource();
        loop {
            tokio::select! {
                biased;
                _ = epoch.changed() => {
                    tracing::debug!(resource = %self.target.rt.plural, "fake apiserver: watch dropped by test");
                    return;
                }
                _ = self.tx.closed() => return,
                r = feed.recv() => match r {
                    Ok(c) => {
                        last_rv = last_rv.max(c.rv);
                        if c.resource == gr && !self.emit(&c).await {
                            return;
                        }
                    }
                    // Fell behind the feed: end the stream; the client resumes from its last
                    // resourceVersion and the log replays what it missed.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if self.bookmarks {
                        self.bookmark(last_rv, false).await;
                    }
                    return;
                }
                _ = ticker.tick(), if self.bookmarks => {
                    if !self.bookmark(last_rv, false).await {
                        return;
                    }
                }
            }
        }
    }
}
