//! A generated xDS resource, encoded once and shared.
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use prost::Message;

use crate::admin::metrics::Counter;

/// Bytes of every resource encoded in this process (`meshd_xds_encoded_bytes`).
pub fn encoded_bytes() -> &'static Arc<Counter> {
    static C: OnceLock<Arc<Counter>> = OnceLock::new();
    C.get_or_init(Arc::default)
}

/// One named resource with its `Any` encoding and a content version.
///
/// Besides the `Any` itself it keeps the two forms responses carry it in, encoded once: the
/// `resources` field of a SotW `DiscoveryResponse` and of a `DeltaDiscoveryResponse`. A response is
/// then a few bytes of header fields plus these shared buffers by reference (see `wire.rs`), so a
/// push to N connections copies no resource bytes at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Interned: the streams that watch it share this copy.
    pub name: super::interned::Name,
    /// Hash of the encoded content: equal versions mean equal bytes, across processes too, which
    /// is what lets a Delta client that reconnects keep what it has.
    pub version: String,
    /// The encoded `google.protobuf.Any { type_url, value }` (a slice of `sotw_field`).
    pub any: Bytes,
    /// `DiscoveryResponse.resources` (field 2) holding `any`.
    pub sotw_field: Bytes,
    /// `DeltaDiscoveryResponse.resources` (field 2): `Resource { version=1, resource=2, name=3 }`.
    pub delta_field: Bytes,
}

impl Resource {
    pub fn new<M: Message>(name: &str, type_url: &str, msg: &M) -> Self {
        let value = msg.encode_to_vec();
        let any = envoy_types::pb::google::protobuf::Any {
            type_url: type_url.to_string(),
            value,
        }
        .encode_to_vec();
        let digest = crate::pki::sha256(&any);
        let version = hex::encode(&digest[..8]);
        let (sotw_field, any_at) = super::wire::sotw_resource_field(&any);
        let delta_field = super::wire::delta_resource_field(&version, &any, name);
        encoded_bytes().add((sotw_field.len() + delta_field.len()) as u64);
        Self {
            name: super::interned::intern(name),
            version,
            any: sotw_field.slice(any_at..),
            sotw_field,
            delta_field,
        }
    }
}

/// Resources of one type, by name.
pub type ResourceSet = BTreeMap<String, Arc<Resource>>;
