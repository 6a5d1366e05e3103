//! Generators: the xDS resources a proxy gets for one type, computed from an immutable
//! [`PushContext`](super::push::PushContext) and cached there for every proxy of the same class.

pub mod cds;
pub mod eds;
pub mod grpc;
pub mod names;
pub mod router;
pub mod sidecar;
pub mod split_horizon;
pub mod upstream_tls;

use std::sync::Arc;

use super::interned::NameSet;
use super::node::ProxyInfo;
use super::push::PushContext;
use super::resource::ResourceSet;
use super::types;

/// Resources of `type_url` for `proxy`: for wildcard types everything the proxy should have, for
/// the others every resource the proxy could ask for (the connection filters by name).
pub fn generate(push: &PushContext, proxy: &ProxyInfo, type_url: &str) -> Arc<ResourceSet> {
    match type_url {
        // Gateways: listeners, routes and credentials from Gateway/VirtualService config.
        types::LISTENER | types::ROUTE | types::SECRET if proxy.kind == super::node::ProxyKind::Router => {
            router::generate(push, proxy, type_url)
        }
        types::CLUSTER if proxy.kind == super::node::ProxyKind::Router => router::clusters(push, proxy),
        types::CLUSTER => push.cached(type_url, cds::class_key(proxy), || cds::generate(push, proxy)),
        types::ENDPOINT => push.endpoints_for(&split_horizon::EdsView::of(proxy, &push.snapshot.networks)),
        _ => Arc::new(ResourceSet::new()),
    }
}

/// [`generate`] for a connection that subscribed to `names`: proxyless gRPC gets its listeners and
/// routes per requested name (grpc.rs), sidecars Istio's sidecar layout (sidecar.rs); everything
/// else (gateways, EDS, gRPC's CDS) is [`generate`].
pub fn generate_named(push: &PushContext, proxy: &ProxyInfo, type_url: &str, names: &NameSet) -> Arc<ResourceSet> {
    let own = if proxy.is_grpc() {
        grpc::generate(push, proxy, type_url, names)
    } else if proxy.kind == super::node::ProxyKind::Sidecar {
        sidecar::generate(push, proxy, type_url)
    } else {
        None
    };
    own.unwrap_or_else(|| generate(push, proxy, type_url))
}
