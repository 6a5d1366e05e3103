//! The fake Kubernetes API server driven by the unmodified kube client over real HTTPS on
//! loopback: CRUD, selectors, pagination, watchers/reflectors through dropped watches and 410s,
//! authentication and RBAC, service-account tokens and reviews, and injected faults.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig, MintOptions, ResourceType, Rule};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);
const READER: &str = "system:serviceaccount:istio-system:istio-reader-service-account";

async fn start(octet: u8, cluster: &str) -> FakeApiServer {
    start_with(octet, cluster, |_| {}).await
}

async fn start_with(octet: u8, cluster: &str, tweak: impl FnOnce(&mut FakeConfig)) -> FakeApiServer {
    let mut cfg = FakeConfig::new(format!("127.0.0.{octet}:0").parse().unwrap(), cluster);
    tweak(&mut cfg);
    FakeApiServer::start(cfg).await.expect("fake apiserver starts")
}

/// Stops a server at the end of a test and checks it no longer accepts connections.
async fn finish(mut server: FakeApiServer) {
    let addr = server.addr();
    server.stop().await;
    assert!(server.is_down());
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped server still accepts"
    );
}

/// Polls `check` until it holds, failing the test at the deadline.
async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let end = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

fn cm(ns: &str, name: &str, labels: &[(&str, &str)], value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..meta(ns, name)
        },
        data: Some(BTreeMap::from([("v".to_string(), value.to_string())])),
        ..Default::default()
    }
}

fn api_status(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn typed_crud_round_trips_with_kube_semantics() {
    let server = start(2, "crud").await;
    let client = server.client(server.admin_token()).await.unwrap();
    let pp = PostParams::default();

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = namespaces
        .create(
            &pp,
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("apps".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ns.status.and_then(|s| s.phase).as_deref(), Some("Active"));
    assert!(namespaces.get("kube-system").await.unwrap().metadata.uid.is_some());

    // Secret: stringData folds into data; uid/rv/creationTimestamp are server-set.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "apps");
    let created = secrets
        .create(
            &pp,
            &Secret {
                metadata: meta("apps", "s1"),
                string_data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rv1: u64 = created.metadata.resource_version.clone().unwrap().parse().unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(created.data.as_ref().unwrap()["k"].0, b"v");
    assert_eq!(created.type_.as_deref(), Some("Opaque"));

    let dup = api_status(secrets.create(&pp, &created).await.unwrap_err());
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(dup.message, "secrets \"s1\" already exists");

    let missing = api_status(secrets.get("nope").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "secrets \"nope\" not found");
    assert!(secrets.get_opt("nope").await.unwrap().is_none());

    // Update with the current resourceVersion works; with a stale one it conflicts.
    let mut updated = created.clone();
    updated.metadata.labels = Some(BTreeMap::from([("a".to_string(), "b".to_string())]));
    let updated = secrets.replace("s1", &pp, &updated).await.unwrap();
    let rv2: u64 = updated.metadata.resource_version.clone().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    let stale = api_status(secrets.replace("s1", &pp, &created).await.unwrap_err());
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    assert!(
        stale.message.contains("the object has been modified"),
        "{}",
        stale.message
    );

    // ConfigMap: merge patch, JSON patch, server-side apply.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    cms.create(&pp, &cm("apps", "c1", &[], "1")).await.unwrap();
    let merged = cms
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"w": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.data.as_ref().unwrap().len(), 2);
    let jp: kube::core::params::Patch<()> =
        Patch::Json(serde_json::from_value(json!([{"op": "remove", "path": "/data/v"}])).unwrap());
    let jsoned = cms.patch("c1", &PatchParams::default(), &jp).await.unwrap();
    assert_eq!(jsoned.data.unwrap().keys().collect::<Vec<_>>(), vec!["w"]);
    let applied = cms
        .patch(
            "c2",
            &PatchParams::apply("test"),
            &Patch::Apply(cm("apps", "c2", &[("x", "y")], "3")),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["v"], "3");
    let strategic = cms
        .patch(
            "c2",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"x": "z"}}})),
        )
        .await
        .unwrap();
    assert_eq!(strategic.metadata.labels.unwrap()["x"], "z");
    let precondition = json!({"metadata": {"resourceVersion": "1"}, "data": {"q": "1"}});
    let conflict = api_status(
        cms.patch("c2", &PatchParams::default(), &Patch::Merge(precondition))
            .await
            .unwrap_err(),
    );
    assert_eq!(conflict.code, 409);

    // Service gets a cluster IP; EndpointSlice and Lease round-trip.
    let svcs: Api<Service> = Api::namespaced(client.clone(), "apps");
    let svc = svcs
        .create(
            &pp,
            &Service {
                metadata: meta("apps", "web"),
                spec: Some(ServiceSpec {
                    ports: Some(vec![ServicePort {
                        port: 80,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let spec = svc.spec.unwrap();
    assert!(spec.cluster_ip.unwrap().starts_with("10.96."));
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "apps");
    slices
        .create(
            &pp,
            &EndpointSlice {
                metadata: meta("apps", "web-abc"),
                address_type: "IPv4".into(),
                endpoints: vec![Endpoint {
                    addresses: vec!["10.0.0.1".into()],
                    ..Default::default()
                }],
                ports: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        slices.get("web-abc").await.unwrap().endpoints[0].addresses,
        vec!["10.0.0.1"]
    );

    let leases: Api<Lease> = Api::namespaced(client.clone(), "apps");
    let lease = leases
        .create(
            &pp,
            &Lease {
                metadata: meta("apps", "leader"),
                spec: Some(LeaseSpec {
                    holder_identity: Some("a".into()),
                    ..Default::default()
                }),
            },
        )
        .await
        .unwrap();
    let mut lease2 = lease.clone();
    lease2.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let lease2 = leases.replace("leader", &pp, &lease2).await.unwrap();
    assert_eq!(lease2.metadata.generation, Some(2), "spec change bumps generation");
    assert_eq!(
        server
            .get_typed::<Lease>("apps", "leader")
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );

    // Creating in a missing namespace fails like kube-apiserver.
    let ghost: Api<ConfigMap> = Api::namespaced(client.clone(), "ghost");
    let e = api_status(ghost.create(&pp, &cm("ghost", "x", &[], "1")).await.unwrap_err());
    assert_eq!((e.code, e.message.as_str()), (404, "namespaces \"ghost\" not found"));

    // Names are validated as kube-apiserver does (422 Invalid).
    let e = api_status(cms.create(&pp, &cm("apps", "Bad_Name", &[], "1")).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message
            .starts_with("ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value"),
        "{}",
        e.message
    );
    let generated = cms
        .create(
            &pp,
            &ConfigMap {
                metadata: ObjectMeta {
                    generate_name: Some("gen-".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(generated.metadata.name.unwrap().starts_with("gen-"));

    // Delete answers a Success Status; deleting the namespace takes its contents.
    let deleted = secrets.delete("s1", &DeleteParams::default()).await.unwrap();
    assert!(deleted.right().is_some_and(|s| s.is_success()));
    assert!(secrets.get_opt("s1").await.unwrap().is_none());
    namespaces.delete("apps", &DeleteParams::default()).await.unwrap();
    assert!(cms.list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(server.get(&ResourceType::core("services"), "apps", "web").is_none());
    finish(server).await;
}

#[tokio::test]
async fn generic_resources_and_discovery() {
    let server = start(3, "generic").await;
    let client = server.client(server.admin_token()).await.unwrap();
    server.ensure_namespace("istio-system").unwrap();

    let gvk = GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "virtualservices");
    let vs: Api<DynamicObject> = Api::namespaced_with(client.clone(), "istio-system", &ar);
    let mut obj = DynamicObject::new("reviews", &ar).within("istio-system");
    obj.data = json!({"spec": {"hosts": ["reviews"]}});
    vs.create(&PostParams::default(), &obj).await.unwrap();
    let got = vs.get("reviews").await.unwrap();
    assert_eq!(got.data["spec"]["hosts"][0], "reviews");
    // The same objects are served under another version of the group.
    let ar_beta = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1beta1", "VirtualService"),
        "virtualservices",
    );
    let beta: Api<DynamicObject> = Api::namespaced_with(client.clone(), "istio-system", &ar_beta);
    assert_eq!(
        beta.get("reviews").await.unwrap().types.unwrap().api_version,
        "networking.istio.io/v1beta1"
    );

    // An unknown group works generically; discovery lists it once it has objects.
    let widget = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("example.com", "v1", "Widget"), "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &widget);
    let mut w = DynamicObject::new("w1", &widget).within("default");
    w.data = json!({"spec": {"size": 3}});
    widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(widgets.list(&ListParams::default()).await.unwrap().items.len(), 1);

    let version = client.apiserver_version().await.unwrap();
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let groups: Vec<String> = discovery.groups().map(|g| g.name().to_string()).collect();
    for g in [
        "",
        "networking.istio.io",
        "discovery.k8s.io",
        "coordination.k8s.io",
        "example.com",
    ] {
        assert!(groups.iter().any(|x| x == g), "discovery lacks group {g:?}: {groups:?}");
    }
    let (res, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Secret"))
        .unwrap();
    assert_eq!(res.plural, "secrets");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let aggregated = kube::Discovery::new(client.clone()).run_aggregated().await.unwrap();
    assert!(aggregated.groups().any(|g| g.name() == "networking.istio.io"));
    finish(server).await;
}

#[tokio::test]
async fn label_selectors_and_field_selectors_filter_lists() {
    let server = start(4, "labels").await;
    let client = server.client(server.admin_token()).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for (name, labels) in [
        ("a", vec![("app", "web"), ("tier", "front")]),
        ("b", vec![("app", "db")]),
        ("c", vec![("app", "cache"), ("tier", "back")]),
        ("d", vec![]),
    ] {
        cms.create(&PostParams::default(), &cm("default", name, &labels, "x"))
            .await
            .unwrap();
    }
    let names = |sel: &'static str| {
        let cms = cms.clone();
        async move {
            let mut n: Vec<String> = cms
                .list(&ListParams::default().labels(sel))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|c| c.metadata.name.unwrap())
                .collect();
            n.sort();
            n
        }
    };
    assert_eq!(names("app=web").await, vec!["a"]);
    assert_eq!(names("app==db").await, vec!["b"]);
    assert_eq!(names("app!=web").await, vec!["b", "c", "d"]);
    assert_eq!(names("tier").await, vec!["a", "c"]);
    assert_eq!(names("!tier").await, vec!["b", "d"]);
    assert_eq!(names("app in (web,db)").await, vec!["a", "b"]);
    assert_eq!(names("app notin (web,db)").await, vec!["c", "d"]);
    assert_eq!(names("app,tier=back").await, vec!["c"]);

    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let not_b = cms
        .list(&ListParams::default().fields("metadata.name!=b,metadata.namespace=default"))
        .await
        .unwrap();
    assert_eq!(not_b.items.len(), 3);
    let bad = api_status(
        cms.list(&ListParams::default().fields("spec.nope=1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (bad.code, bad.message.as_str()),
        (400, "field label not supported: spec.nope")
    );
    let bad = api_status(cms.list(&ListParams::default().labels("app in ()")).await.unwrap_err());
    assert_eq!(bad.code, 400);
    finish(server).await;
}

#[tokio::test]
async fn pagination_is_consistent_and_expires_on_compaction() {
    let server = start(5, "pages").await;
    let client = server.client(server.admin_token()).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..7 {
        cms.create(&PostParams::default(), &cm("default", &format!("cm-{i}"), &[], "x"))
            .await
            .unwrap();
    }
    let first = cms.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    let token = first.metadata.continue_.clone().expect("continue token");
    let list_rv = first.metadata.resource_version.clone().unwrap();

    // Writes between pages do not leak into the snapshot the token refers to.
    cms.create(&PostParams::default(), &cm("default", "cm-9", &[], "x"))
        .await
        .unwrap();
    cms.delete("cm-5", &DeleteParams::default()).await.unwrap();

    let second = cms
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(second.metadata.resource_version.as_deref(), Some(list_rv.as_str()));
    let third = cms
        .list(
            &ListParams::default()
                .limit(3)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert!(
        third.metadata.continue_.as_deref().unwrap_or_default().is_empty(),
        "last page has no token"
    );
    let all: Vec<String> = first
        .items
        .iter()
        .chain(&second.items)
        .chain(&third.items)
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(all, (0..7).map(|i| format!("cm-{i}")).collect::<Vec<_>>());

    // A fresh list sees the writes; after compaction old tokens are 410 Expired.
    let fresh = cms.list(&ListParams::default().limit(3)).await.unwrap();
    let token = fresh.metadata.continue_.unwrap();
    server.compact();
    let gone = api_status(
        cms.list(&ListParams::default().limit(3).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired"));

    // kube's paginating watcher lists everything through pages of 2.
    let (store, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(writer, watcher(cms.clone(), watcher::Config::default().page_size(2)));
    let task = tokio::spawn(stream.for_each(|_| async {}));
    eventually("paged reflector sees all 7", || store.state().len() == 7).await;
    assert!(server.request_count("list", "configmaps") >= 4 + 4, "the watcher paged");
    task.abort();
    finish(server).await;
}

#[tokio::test]
async fn reflector_tracks_changes_through_dropped_watches_outages_and_410() {
    let server = start_with(6, "watch", |c| c.bookmark_interval = Duration::from_millis(200)).await;
    let client = server.client(server.admin_token()).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("default", "pre", &[], "0"))
        .await
        .unwrap();

    let (store, writer) = reflector::store::<ConfigMap>();
    let errors = Arc::new(AtomicUsize::new(0));
    let gone = Arc::new(AtomicUsize::new(0));
    let (e2, g2) = (errors.clone(), gone.clone());
    let stream = reflector(
        writer,
        watcher(cms.clone(), watcher::Config::default()).default_backoff(),
    );
    let task = tokio::spawn(stream.for_each(move |ev| {
        if let Err(e) = &ev {
            e2.fetch_add(1, Ordering::SeqCst);
            if let watcher::Error::WatchError(s) = e
                && s.code == 410
            {
                g2.fetch_add(1, Ordering::SeqCst);
            }
        }
        async {}
    }));
    let value = |name: &str| {
        store
            .state()
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .and_then(|c| c.data.as_ref().map(|d| d["v"].clone()))
    };
    eventually("initial list", || value("pre").as_deref() == Some("0")).await;

    // Adds, updates and deletes arrive through the watch.
    cms.create(&PostParams::default(), &cm("default", "a", &[], "1"))
        .await
        .unwrap();
    cms.patch(
        "pre",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    cms.delete("pre", &DeleteParams::default()).await.unwrap();
    eventually("add/update/delete", || {
        value("a").as_deref() == Some("1") && value("pre").is_none()
    })
    .await;

    // Every watch ends: the watcher re-watches from its resourceVersion without relisting.
    let lists = server.request_count("list", "configmaps");
    let watches = server.request_count("watch", "configmaps");
    server.drop_watches();
    eventually("re-watch after drop", || {
        server.request_count("watch", "configmaps") > watches
    })
    .await;
    cms.create(&PostParams::default(), &cm("default", "b", &[], "1"))
        .await
        .unwrap();
    eventually("event after re-watch", || value("b").is_some()).await;
    assert_eq!(
        server.request_count("list", "configmaps"),
        lists,
        "resumed without a relist"
    );

    // Down: connections refused and the watch dropped. Changes made meanwhile, then a
    // compaction, make the watcher's resourceVersion too old: 410, relist, correct store.
    server.set_down(true).await.unwrap();
    assert!(server.is_down());
    server
        .apply(serde_json::to_value(cm("default", "c", &[], "during-outage")).unwrap())
        .unwrap();
    server
        .delete(&ResourceType::core("configmaps"), "default", "a")
        .unwrap();
    server.compact();
    server.set_down(false).await.unwrap();
    eventually("410 seen", || gone.load(Ordering::SeqCst) >= 1).await;
    eventually("relisted state", || {
        value("c").as_deref() == Some("during-outage") && value("a").is_none() && value("b").is_some()
    })
    .await;
    assert!(
        server.request_count("list", "configmaps") > lists,
        "the 410 forced a relist"
    );
    assert!(errors.load(Ordering::SeqCst) >= 1);

    // And it keeps following changes afterwards.
    cms.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "after"}})),
    )
    .await
    .unwrap();
    eventually("update after relist", || value("b").as_deref() == Some("after")).await;
    task.abort();
    finish(server).await;
}

#[tokio::test]
async fn watch_streams_follow_selectors_and_streaming_lists() {
    let server = start_with(7, "stream", |c| c.bookmark_interval = Duration::from_millis(100)).await;
    let client = server.client(server.admin_token()).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("default", "x", &[("app", "web")], "1"))
        .await
        .unwrap();

    // A streaming-list watcher (sendInitialEvents) with a label selector.
    let (store, writer) = reflector::store::<ConfigMap>();
    let cfg = watcher::Config::default().streaming_lists().labels("app=web");
    let task = tokio::spawn(reflector(writer, watcher(cms.clone(), cfg).default_backoff()).for_each(|_| async {}));
    eventually("initial events", || store.state().len() == 1).await;
    assert_eq!(
        server.request_count("list", "configmaps"),
        0,
        "no list with streaming lists"
    );

    // Relabelling out of the selector is a DELETED for this watcher, back in an ADDED.
    cms.create(&PostParams::default(), &cm("default", "y", &[("app", "db")], "1"))
        .await
        .unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    eventually("left selector", || store.state().is_empty()).await;
    cms.patch(
        "y",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    eventually("entered selector", || {
        store.state().len() == 1 && store.state()[0].metadata.name.as_deref() == Some("y")
    })
    .await;
    task.abort();

    // Raw watch events: a watch from an old resourceVersion after compaction is a 410 ERROR event.
    let rv = server.resource_version().to_string();
    server.compact();
    cms.create(&PostParams::default(), &cm("default", "z", &[], "1"))
        .await
        .unwrap();
    let mut old = cms
        .watch(
            &kube::api::WatchParams::default(),
            &(rv.parse::<u64>().unwrap() - 1).to_string(),
        )
        .await
        .unwrap()
        .boxed();
    match old.next().await {
        Some(Ok(kube::core::WatchEvent::Error(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(s.message.starts_with("too old resource version"), "{}", s.message);
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // From the current one: the change arrives, bookmarks come while idle.
    let mut live = cms
        .watch(
            &kube::api::WatchParams::default().timeout(5),
            &server.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    cms.create(&PostParams::default(), &cm("default", "w", &[], "1"))
        .await
        .unwrap();
    let mut saw_added = false;
    let mut saw_bookmark = false;
    while let Some(ev) = live.next().await {
        match ev.unwrap() {
            kube::core::WatchEvent::Added(c) => saw_added |= c.metadata.name.as_deref() == Some("w"),
            kube::core::WatchEvent::Bookmark(_) => saw_bookmark = true,
            _ => {}
        }
        if saw_added && saw_bookmark {
            break;
        }
    }
    assert!(saw_added && saw_bookmark);
    finish(server).await;
}

#[tokio::test]
async fn authentication_and_rbac_answer_401_and_403() {
    let server = start(8, "authz").await;
    let admin = server.client(server.admin_token()).await.unwrap();
    Api::<ConfigMap>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &cm("default", "c", &[], "1"))
        .await
        .unwrap();

    let stranger = server.client("not-a-token").await.unwrap();
    let e = api_status(
        Api::<ConfigMap>::namespaced(stranger, "default")
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));

    let reader_token = server.reader_token("istio-reader-service-account").unwrap();
    let reader = server.client(&reader_token).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(reader.clone(), "x");
    assert!(secrets.list(&ListParams::default()).await.unwrap().items.is_empty());
    let e = api_status(
        secrets
            .create(
                &PostParams::default(),
                &Secret {
                    metadata: meta("x", "s"),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        format!(
            "secrets is forbidden: User \"{READER}\" cannot create resource \"secrets\" in API group \"\" in the namespace \"x\""
        )
    );
    let e = api_status(
        Api::<Namespace>::all(reader.clone())
            .delete("default", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e.message,
        format!(
            "namespaces \"default\" is forbidden: User \"{READER}\" cannot delete resource \"namespaces\" in API group \"\" in the namespace \"default\""
        )
    );
    // ConfigMap writes are in the preset; a narrower grant to another SA is namespace-bound.
    Api::<ConfigMap>::namespaced(reader.clone(), "default")
        .patch("c", &PatchParams::default(), &Patch::Merge(json!({"data": {"v": "2"}})))
        .await
        .unwrap();
    let narrow = server
        .mint_token("default", "narrow", &[], Duration::from_secs(600), None)
        .unwrap();
    server.grant(
        "system:serviceaccount:default:narrow",
        vec![Rule::new(&["list"], &[""], &["configmaps"]).in_namespaces(&["default"])],
    );
    let narrow = server.client(&narrow).await.unwrap();
    assert_eq!(
        Api::<ConfigMap>::namespaced(narrow.clone(), "default")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let e = api_status(
        Api::<ConfigMap>::all(narrow.clone())
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 403);
    assert!(e.message.ends_with("at the cluster scope"), "{}", e.message);

    // Tokens for another audience are not API credentials; static tokens map to users.
    let ca_token = server
        .mint_token("default", "narrow", &["istio-ca"], Duration::from_secs(600), None)
        .unwrap();
    let e = api_status(
        Api::<ConfigMap>::namespaced(server.client(&ca_token).await.unwrap(), "default")
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 401);
    server.add_static_token("bob-token", "bob", &["devs"]);
    server.grant("devs", vec![Rule::new(&["get"], &[""], &["configmaps"])]);
    let bob = server.client("bob-token").await.unwrap();
    assert!(
        Api::<ConfigMap>::namespaced(bob.clone(), "default")
            .get("c")
            .await
            .is_ok()
    );
    assert_eq!(
        api_status(
            Api::<ConfigMap>::namespaced(bob, "default")
                .list(&ListParams::default())
                .await
                .unwrap_err()
        )
        .code,
        403
    );
    finish(server).await;
}

async fn review(
    api: &Api<TokenReview>,
    token: &str,
    audiences: &[&str],
) -> k8s_openapi::api::authentication::v1::TokenReviewStatus {
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &tr).await.unwrap().status.unwrap()
}

#[tokio::test]
async fn token_review_accepts_minted_tokens_and_rejects_bad_ones() {
    let server = start(9, "reviews").await;
    let other = start(10, "elsewhere").await;
    let reviewer = server
        .client(&server.reader_token("istio-reader-service-account").unwrap())
        .await
        .unwrap();
    let api: Api<TokenReview> = Api::all(reviewer);
    let hour = Duration::from_secs(3600);

    server.ensure_namespace("app").unwrap();
    let sa = server.ensure_service_account("app", "web").unwrap();
    let sa_uid = sa["metadata"]["uid"].as_str().unwrap().to_string();
    let good = server
        .mint_token("app", "web", &["istio-ca"], hour, Some(("web-0", "pod-uid-1")))
        .unwrap();
    let ok = review(&api, &good, &["istio-ca"]).await;
    assert_eq!(ok.authenticated, Some(true), "{ok:?}");
    let user = ok.user.unwrap();
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:app:web"));
    assert_eq!(user.uid.as_deref(), Some(sa_uid.as_str()));
    assert_eq!(
        user.groups.unwrap(),
        vec![
            "system:serviceaccounts",
            "system:serviceaccounts:app",
            "system:authenticated"
        ]
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], vec!["web-0"]);
    assert_eq!(extra["authentication.kubernetes.io/pod-uid"], vec!["pod-uid-1"]);
    assert_eq!(ok.audiences.unwrap(), vec!["istio-ca"]);
    assert_eq!(server.token_review_count(), 1);

    let err = |s: k8s_openapi::api::authentication::v1::TokenReviewStatus| {
        assert_ne!(s.authenticated, Some(true));
        s.error.unwrap_or_default()
    };
    assert_eq!(
        err(review(&api, &good, &["other"]).await),
        r#"[invalid bearer token, token audiences ["istio-ca"] is invalid for the target audiences ["other"]]"#
    );
    // No spec.audiences: the API server's own audience.
    assert!(
        err(review(&api, &good, &[]).await)
            .contains("is invalid for the target audiences [\"https://kubernetes.default.svc.cluster.local\"]")
    );

    let mut expired = MintOptions::new("app", "web", &["istio-ca"], hour);
    expired.issued_at = SystemTime::now() - 2 * hour;
    let expired = server.mint_token_with(expired).unwrap();
    assert_eq!(
        err(review(&api, &expired, &["istio-ca"]).await),
        "[invalid bearer token, service account token has expired]"
    );

    let mut tampered = good.clone().into_bytes();
    let i = tampered.len() - 10;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_eq!(
        err(review(&api, &tampered, &["istio-ca"]).await),
        "[invalid bearer token, go-jose/go-jose: error in cryptographic primitive]"
    );

    let foreign = other.mint_token("app", "web", &["istio-ca"], hour, None).unwrap();
    assert_eq!(
        err(review(&api, &foreign, &["istio-ca"]).await),
        "[invalid bearer token, go-jose/go-jose: error in cryptographic primitive]"
    );
    assert_eq!(
        err(review(&api, "garbage", &["istio-ca"]).await),
        "invalid bearer token"
    );

    server
        .delete(&ResourceType::core("serviceaccounts"), "app", "web")
        .unwrap();
    assert_eq!(
        err(review(&api, &good, &["istio-ca"]).await),
        "[invalid bearer token, serviceaccounts \"web\" not found]"
    );
    // A new ServiceAccount of the same name has a new uid: old tokens stay invalid.
    server.ensure_service_account("app", "web").unwrap();
    assert!(err(review(&api, &good, &["istio-ca"]).await).contains("does not match claim"));

    assert_eq!(server.token_review_count(), 9);
    assert_eq!(server.token_review_count_for_token(&good), 5);
    assert_eq!(server.token_review_count_for_audience("istio-ca"), 7);
    assert_eq!(server.request_count("create", "tokenreviews"), 9);

    // Reviewing needs `create tokenreviews`.
    let nobody = server.mint_token("app", "nobody", &[], hour, None).unwrap();
    let api2: Api<TokenReview> = Api::all(server.client(&nobody).await.unwrap());
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(good.clone()),
            audiences: None,
        },
        ..Default::default()
    };
    let e = api_status(api2.create(&PostParams::default(), &tr).await.unwrap_err());
    assert_eq!(e.code, 403);
    assert!(
        e.message.starts_with("tokenreviews.authentication.k8s.io is forbidden"),
        "{}",
        e.message
    );
    assert_eq!(server.token_review_count(), 9, "a refused review is not counted");

    // TokenRequest through the ServiceAccount subresource yields a reviewable token.
    let sas: Api<ServiceAccount> = Api::namespaced(server.client(server.admin_token()).await.unwrap(), "app");
    let tr = sas
        .create_token_request(
            "web",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec!["istio-ca".into()],
                    expiration_seconds: Some(600),
                    bound_object_ref: None,
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let requested = tr.status.unwrap().token;
    assert_eq!(review(&api, &requested, &["istio-ca"]).await.authenticated, Some(true));
    finish(server).await;
    finish(other).await;
}

#[tokio::test]
async fn subject_access_review_evaluates_grants() {
    let server = start(11, "sar").await;
    let client = server
        .client(&server.reader_token("istio-reader-service-account").unwrap())
        .await
        .unwrap();
    let api: Api<SubjectAccessReview> = Api::all(client);
    let ask = |user: &str, verb: &str, resource: &str, ns: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                namespace: Some(ns.into()),
                group: Some(String::new()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let allowed = |s: SubjectAccessReview| s.status.unwrap().allowed;
    assert!(allowed(
        api.create(&PostParams::default(), &ask(READER, "list", "secrets", "x"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        api.create(&PostParams::default(), &ask(READER, "delete", "secrets", "x"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        api.create(&PostParams::default(), &ask("carol", "get", "pods", "x"))
            .await
            .unwrap()
    ));
    server.grant(
        "carol",
        vec![Rule::new(&["get"], &[""], &["pods"]).in_namespaces(&["x"])],
    );
    assert!(allowed(
        api.create(&PostParams::default(), &ask("carol", "get", "pods", "x"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        api.create(&PostParams::default(), &ask("carol", "get", "pods", "y"))
            .await
            .unwrap()
    ));
    finish(server).await;
}

#[tokio::test]
async fn service_account_token_secret_is_populated_and_usable() {
    let server = start(12, "legacy").await;
    let admin = server.client(server.admin_token()).await.unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("istio-system".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), "istio-system")
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta("istio-system", "istio-reader-service-account"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "istio-system");
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    annotations: Some(BTreeMap::from([(
                        "kubernetes.io/service-account.name".to_string(),
                        "istio-reader-service-account".to_string(),
                    )])),
                    ..meta("istio-system", "istio-reader-service-account-istio-remote-secret-token")
                },
                type_: Some("kubernetes.io/service-account-token".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut data = BTreeMap::new();
    let end = Instant::now() + DEADLINE;
    while data.is_empty() {
        assert!(Instant::now() < end, "token controller never filled the secret");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = secrets
            .get("istio-reader-service-account-istio-remote-secret-token")
            .await
            .unwrap();
        data = s.data.unwrap_or_default();
    }
    assert_eq!(data["ca.crt"].0, server.ca_pem().as_bytes());
    assert_eq!(data["namespace"].0, b"istio-system");
    let token = String::from_utf8(data["token"].0.clone()).unwrap();

    // The legacy token is an API credential for the ServiceAccount.
    server.grant(READER, meshd::testing::fake_apiserver::istio_reader_rules());
    let reader = server.client(&token).await.unwrap();
    assert!(
        Api::<Pod>::all(reader.clone())
            .list(&ListParams::default())
            .await
            .is_ok()
    );
    // Deleting the Secret invalidates it.
    secrets
        .delete(
            "istio-reader-service-account-istio-remote-secret-token",
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let e = api_status(Api::<Pod>::all(reader).list(&ListParams::default()).await.unwrap_err());
    assert_eq!(e.code, 401);
    finish(server).await;
}

#[tokio::test]
async fn down_latency_and_injected_failures() {
    let server = start(13, "faults").await;
    let client = server.client(server.admin_token()).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("default", "c", &[], "1"))
        .await
        .unwrap();

    // Down: calls fail at the connection level; up again: the same client works.
    server.set_down(true).await.unwrap();
    let e = cms.get("c").await.unwrap_err();
    assert!(
        !matches!(e, kube::Error::Api(_)),
        "a refused connection is not an API answer: {e:?}"
    );
    server.set_down(false).await.unwrap();
    assert_eq!(cms.get("c").await.unwrap().data.unwrap()["v"], "1");

    // Latency is added to every response.
    server.set_latency(Duration::from_millis(1500));
    let t = Instant::now();
    cms.get("c").await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(1500), "took {:?}", t.elapsed());
    server.set_latency(Duration::ZERO);
    let t = Instant::now();
    cms.get("c").await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(1500), "took {:?}", t.elapsed());

    // 500 surfaces as an API error; 429 with Retry-After is retried by kube's client.
    server.fail_next(1, 500);
    let e = api_status(cms.get("c").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (500, "InternalError"));
    let gets = server.request_count("get", "configmaps");
    server.fail_next(2, 429);
    let t = Instant::now();
    cms.get("c").await.unwrap();
    assert_eq!(
        server.request_count("get", "configmaps"),
        gets + 3,
        "two 429s then success"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "Retry-After was honoured: {:?}",
        t.elapsed()
    );

    server.set_failure_rate(1.0, 500);
    assert_eq!(
        api_status(cms.list(&ListParams::default()).await.unwrap_err()).code,
        500
    );
    server.set_failure_rate(0.0, 500);
    assert!(cms.list(&ListParams::default()).await.is_ok());
    finish(server).await;
}

#[tokio::test]
async fn restart_keeps_address_ca_keys_and_objects() {
    let mut server = start(14, "restart").await;
    let url = server.url();
    let token = server.reader_token("istio-reader-service-account").unwrap();
    let client = server.client(&token).await.unwrap();
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keep", "namespace": "default"}, "data": {"v": "1"}})).unwrap();

    server.stop().await;
    assert!(server.is_down());
    assert!(
        Api::<ConfigMap>::namespaced(client.clone(), "default")
            .get("keep")
            .await
            .is_err()
    );
    server.restart().await.unwrap();
    assert_eq!(server.url(), url);
    // The old client (same CA in its kubeconfig) and old token (same signing key) still work.
    let kept = Api::<ConfigMap>::namespaced(client.clone(), "default")
        .get("keep")
        .await
        .unwrap();
    assert_eq!(kept.data.unwrap()["v"], "1");

    // Starting from saved state elsewhere serves the same objects.
    let state = server.state();
    drop(server);
    let again = FakeApiServer::start_with_state(state, "127.0.0.15:0".parse().unwrap())
        .await
        .unwrap();
    let c2 = again.client(&token).await.unwrap();
    assert!(Api::<ConfigMap>::namespaced(c2, "default").get("keep").await.is_ok());
    finish(again).await;
}

#[tokio::test]
async fn control_api_applies_objects_and_flips_faults() {
    let server = start(16, "control").await;
    let client = server.client(server.admin_token()).await.unwrap();
    let post = |path: &str, body: &str| {
        http::Request::post(path)
            .header("content-type", "application/json")
            .body(body.as_bytes().to_vec())
            .unwrap()
    };
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: remote\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: remote\ndata:\n  v: \"1\"\n";
    let applied: serde_json::Value =
        serde_json::from_str(&client.request_text(post("/fake/apply", yaml)).await.unwrap()).unwrap();
    assert_eq!(applied["applied"].as_array().unwrap().len(), 2);
    assert!(server.get(&ResourceType::core("configmaps"), "remote", "c").is_some());

    let minted: serde_json::Value = serde_json::from_str(
        &client
            .request_text(post(
                "/fake/token",
                r#"{"namespace":"remote","serviceAccount":"w","audiences":["istio-ca"]}"#,
            ))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(minted["token"].as_str().unwrap().split('.').count(), 3);

    client
        .request_text(post("/fake/faults", r#"{"failNext":{"count":1,"code":500}}"#))
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "remote");
    assert_eq!(api_status(cms.get("c").await.unwrap_err()).code, 500);
    let counters: serde_json::Value = serde_json::from_str(
        &client
            .request_text(http::Request::get("/fake/counters").body(vec![]).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        counters["requests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resource"] == "configmaps" && r["verb"] == "get")
    );

    // The control API needs the admin token.
    let reader = server
        .client(&server.reader_token("istio-reader-service-account").unwrap())
        .await
        .unwrap();
    let e = api_status(
        reader
            .request_text(post("/fake/faults", r#"{"clear":true}"#))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 401);
    finish(server).await;
}

#[tokio::test]
async fn serves_http2_with_multiplexed_streaming_watches() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};

    let server = start(17, "h2").await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(meshd::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(server.addr().ip().into()), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = |path: &str| {
        http::Request::get(format!("{}{path}", server.url()))
            .header("authorization", format!("Bearer {}", server.admin_token()))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };

    let res = send.send_request(req("/api/v1/namespaces")).await.unwrap();
    assert_eq!((res.version(), res.status().as_u16()), (http::Version::HTTP_2, 200));
    let list: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(list["kind"], "NamespaceList");

    // A watch and a write share the one connection.
    let rv = server.resource_version();
    let watch = send
        .send_request(req(&format!(
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}"
        )))
        .await
        .unwrap();
    let mut body = watch.into_body();
    server
        .apply(serde_json::to_value(cm("default", "h2", &[], "1")).unwrap())
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains('\n') {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.extend_from_slice(frame.data_ref().map(|d| d.as_ref()).unwrap_or_default());
    }
    let event: serde_json::Value =
        serde_json::from_slice(&seen[..seen.iter().position(|b| *b == b'\n').unwrap()]).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("h2"))
    );

    // Down ends the connection and with it the open watch stream.
    server.set_down(true).await.unwrap();
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                other => return other.is_none() || other.is_some_and(|r| r.is_err()),
            }
        }
    })
    .await
    .unwrap();
    assert!(end);
    assert!(
        tokio::net::TcpStream::connect(server.addr()).await.is_err(),
        "refuses new connections while down"
    );
    finish(server).await;
}
