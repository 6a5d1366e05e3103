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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    /// Hash of the encoded content: equal versions mean equal bytes, across processes too, which
    /// is what lets a Delta client that reconnects keep what it has.
    pub version: String,
    /// The encoded `google.protobuf.Any { type_url, value }`.
    pub any: Bytes,
}

impl Resource {
    pub fn new<M: Message>(name: &str, type_url: &str, msg: &M) -> Self {
        let value = msg.encode_to_vec();
        let any = envoy_types::pb::google::protobuf::Any {
            type_url: type_url.to_string(),
            value,
        }
        .encode_to_vec();
        encoded_bytes().add(any.len() as u64);
        let digest = crate::pki::sha256(&any);
        Self {
            name: name.to_string(),
            version: hex::encode(&digest[..8]),
            any: Bytes::from(any),
        }
    }
}

/// Resources of one type, by name.
pub type ResourceSet = BTreeMap<String, Arc<Resource>>;
