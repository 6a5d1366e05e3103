//! Generators: the xDS resources a proxy gets for one type, computed from an immutable
//! [`PushContext`](super::push::PushContext) and cached there for every proxy of the same class.

pub mod cds;
pub mod eds;
pub mod names;

use std::sync::Arc;

use super::node::ProxyInfo;
use super::push::PushContext;
use super::resource::ResourceSet;
use super::types;

/// Resources of `type_url` for `proxy`: for wildcard types everything the proxy should have, for
/// the others every resource the proxy could ask for (the connection filters by name).
pub fn generate(push: &PushContext, proxy: &ProxyInfo, type_url: &str) -> Arc<ResourceSet> {
    match type_url {
        types::CLUSTER => push.cached(type_url, cds::class_key(proxy), || cds::generate(push, proxy)),
        types::ENDPOINT => push.endpoints(),
        _ => Arc::new(ResourceSet::new()),
    }
}
