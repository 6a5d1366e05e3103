//! Response encoding from pre-encoded resources, and the request decoder.
//!
//! Every resource is encoded once per version, together with the response fields that carry it
//! (`Resource::sotw_field`, `Resource::delta_field`). A response is a [`GrpcFrame`]: the gRPC
//! prefix, header fields and the small resource fields copied into a few runs of up to 64 KiB,
//! and large resource fields (16 KiB and up) by reference. Nothing is re-encoded per connection;
//! the copy of the small fields is one memcpy and keeps HTTP/2's per-connection frame queue short
//! (see `SHARE_AT`).
use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder};

use super::resource::Resource;

fn put_string(buf: &mut BytesMut, tag: u32, s: &str) {
    if s.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
}

fn put_bytes(buf: &mut BytesMut, tag: u32, b: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(b.len() as u64, buf);
    buf.put_slice(b);
}

fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        prost::encoding::key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }
}

fn bytes_len(tag: u32, n: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(n as u64) + n
}

/// `resources` (field 2) of a SotW response holding `any`; also where `any` starts in it.
pub fn sotw_resource_field(any: &[u8]) -> (Bytes, usize) {
    let mut buf = BytesMut::with_capacity(bytes_len(2, any.len()));
    put_bytes(&mut buf, 2, any);
    let at = buf.len() - any.len();
    (buf.freeze(), at)
}

/// `resources` (field 2) of a Delta response: `Resource { version=1, resource=2, name=3 }`.
pub fn delta_resource_field(version: &str, any: &[u8], name: &str) -> Bytes {
    let inner = string_len(1, version) + bytes_len(2, any.len()) + string_len(3, name);
    let mut buf = BytesMut::with_capacity(bytes_len(2, inner));
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(inner as u64, &mut buf);
    put_string(&mut buf, 1, version);
    put_bytes(&mut buf, 2, any);
    put_string(&mut buf, 3, name);
    buf.freeze()
}

/// One length-prefixed gRPC message as a list of buffers, sent in order without copying.
#[derive(Debug, Clone, Default)]
pub struct GrpcFrame {
    pub chunks: Vec<Bytes>,
}

impl GrpcFrame {
    /// Bytes on the wire, prefix included.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The protobuf message alone (without the 5-byte prefix), copied into one buffer: for tests
    /// and tools.
    pub fn message_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len());
        for c in &self.chunks {
            out.put_slice(c);
        }
        out.split_off(5.min(out.len())).freeze()
    }
}

/// Fields at least this long are sent by reference; shorter ones are copied into runs.
///
/// Every buffer a response body yields becomes one queued DATA frame in h2, whose per-connection
/// frame slab keeps its high-water mark for the life of the connection (a few hundred bytes per
/// slot). Handing h2 thousands of 200-byte resource fields per response (a sidecar's EDS or CDS)
/// cost about 1 MiB of slab per stream; runs of up to [`RUN_BYTES`] keep it to a few dozen slots,
/// for one memcpy of the small fields (BENCHMARKS.md, "xDS").
const SHARE_AT: usize = 16 * 1024;
/// Size of one run of copied fields.
const RUN_BYTES: usize = 64 * 1024;

/// Collects a frame's buffers: large ones by reference, small ones copied into runs.
struct Runs {
    chunks: Vec<Bytes>,
    run: BytesMut,
    /// Bytes still to come, so a run is never allocated larger than the frame needs.
    remaining: usize,
}

impl Runs {
    fn new(total: usize) -> Self {
        Self {
            chunks: Vec::new(),
            run: BytesMut::new(),
            remaining: total,
        }
    }

    fn flush(&mut self) {
        if !self.run.is_empty() {
            self.chunks.push(self.run.split().freeze());
        }
    }

    fn put_slice(&mut self, b: &[u8]) {
        if self.run.capacity() - self.run.len() < b.len() {
            self.flush();
            self.run = BytesMut::with_capacity(self.remaining.clamp(b.len(), RUN_BYTES.max(b.len())));
        }
        self.run.put_slice(b);
        self.remaining = self.remaining.saturating_sub(b.len());
    }

    fn put(&mut self, b: Bytes) {
        if b.len() >= SHARE_AT {
            self.flush();
            self.remaining = self.remaining.saturating_sub(b.len());
            self.chunks.push(b);
        } else if !b.is_empty() {
            self.put_slice(&b);
        }
    }

    fn finish(mut self) -> GrpcFrame {
        self.flush();
        GrpcFrame { chunks: self.chunks }
    }
}

/// Builds a frame: `head` fields, the shared `fields`, then `tail` fields.
fn frame(head: BytesMut, fields: impl Iterator<Item = Bytes> + Clone, tail: BytesMut) -> GrpcFrame {
    let len = head.len() + fields.clone().map(|f| f.len()).sum::<usize>() + tail.len();
    let mut runs = Runs::new(5 + len);
    let mut prefix = [0u8; 5];
    prefix[1..].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    runs.put_slice(&prefix);
    runs.put_slice(&head);
    for f in fields {
        runs.put(f);
    }
    runs.put_slice(&tail);
    runs.finish()
}

/// `DiscoveryResponse { version_info=1, resources=2, type_url=4, nonce=5 }`.
pub fn sotw_frame(version: &str, type_url: &str, nonce: &str, resources: &[&Resource]) -> GrpcFrame {
    let mut head = BytesMut::with_capacity(string_len(1, version));
    put_string(&mut head, 1, version);
    let mut tail = BytesMut::with_capacity(string_len(4, type_url) + string_len(5, nonce));
    put_string(&mut tail, 4, type_url);
    put_string(&mut tail, 5, nonce);
    frame(head, resources.iter().map(|r| r.sotw_field.clone()), tail)
}

/// `DeltaDiscoveryResponse { system_version_info=1, resources=2, type_url=4, nonce=5,
/// removed_resources=6 }`.
pub fn delta_frame(
    system_version: &str,
    type_url: &str,
    nonce: &str,
    resources: &[&Resource],
    removed: &[impl AsRef<str>],
) -> GrpcFrame {
    let mut head = BytesMut::with_capacity(string_len(1, system_version));
    put_string(&mut head, 1, system_version);
    let mut tail = BytesMut::with_capacity(
        string_len(4, type_url)
            + string_len(5, nonce)
            + removed.iter().map(|r| string_len(6, r.as_ref())).sum::<usize>(),
    );
    put_string(&mut tail, 4, type_url);
    put_string(&mut tail, 5, nonce);
    for name in removed {
        put_string(&mut tail, 6, name.as_ref());
    }
    frame(head, resources.iter().map(|r| r.delta_field.clone()), tail)
}

/// The SotW response message in one buffer (tests and tools).
pub fn sotw_response(version: &str, type_url: &str, nonce: &str, resources: &[&Resource]) -> Bytes {
    sotw_frame(version, type_url, nonce, resources).message_bytes()
}

/// The Delta response message in one buffer (tests and tools).
pub fn delta_response(
    system_version: &str,
    type_url: &str,
    nonce: &str,
    resources: &[&Resource],
    removed: &[String],
) -> Bytes {
    delta_frame(system_version, type_url, nonce, resources, removed).message_bytes()
}

/// Decodes xDS requests with prost; a request that does not decode is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct ProstDecoder<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Default for ProstDecoder<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T: prost::Message + Default> Decoder for ProstDecoder<T> {
    type Item = T;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<T>, Status> {
        T::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
    use prost::Message;

    fn res(name: &str) -> Resource {
        let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment {
            cluster_name: name.into(),
            ..Default::default()
        };
        Resource::new(name, super::super::types::ENDPOINT, &cla)
    }

    #[test]
    fn sotw_bytes_decode_as_discovery_response() {
        let (a, b) = (res("a"), res("b"));
        let bytes = sotw_response("v1", super::super::types::ENDPOINT, "n1", &[&a, &b]);
        let d = DiscoveryResponse::decode(bytes).unwrap();
        assert_eq!(d.version_info, "v1");
        assert_eq!(d.nonce, "n1");
        assert_eq!(d.type_url, super::super::types::ENDPOINT);
        assert_eq!(d.resources.len(), 2);
        assert_eq!(d.resources[1].type_url, super::super::types::ENDPOINT);
        let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
            d.resources[1].value.as_slice(),
        )
        .unwrap();
        assert_eq!(cla.cluster_name, "b");
    }

    #[test]
    fn delta_bytes_decode_as_delta_response() {
        let a = res("a");
        let bytes = delta_response("v2", super::super::types::ENDPOINT, "n2", &[&a], &["gone".to_string()]);
        let d = DeltaDiscoveryResponse::decode(bytes).unwrap();
        assert_eq!(d.system_version_info, "v2");
        assert_eq!(d.resources[0].name, "a");
        assert_eq!(d.resources[0].version, a.version);
        assert_eq!(
            d.resources[0].resource.as_ref().unwrap().type_url,
            super::super::types::ENDPOINT
        );
        assert_eq!(d.removed_resources, vec!["gone".to_string()]);
    }

    #[test]
    fn small_fields_are_copied_into_few_runs_and_large_ones_shared() {
        let small: Vec<Resource> = (0..2_000)
            .map(|i| res(&format!("outbound|80||svc-{i}.ns.svc.cluster.local")))
            .collect();
        let big_cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment {
            cluster_name: "x".repeat(SHARE_AT),
            ..Default::default()
        };
        let big = Resource::new("big", super::super::types::ENDPOINT, &big_cla);
        let mut all: Vec<&Resource> = small.iter().collect();
        all.insert(1_000, &big);
        let frame = sotw_frame("v1", super::super::types::ENDPOINT, "n1", &all);
        // A handful of HTTP/2 DATA frames, not one per resource.
        assert!(frame.chunks.len() < 10, "{} chunks", frame.chunks.len());
        assert!(frame.chunks.iter().all(|c| c.len() <= RUN_BYTES || c.len() >= SHARE_AT));
        // The large field is the resource's own buffer, not a copy.
        assert!(frame.chunks.iter().any(|c| c.as_ptr() == big.sotw_field.as_ptr()));
        let wire: Vec<u8> = frame.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(wire[0], 0);
        assert_eq!(
            u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize,
            wire.len() - 5
        );
        let d = DiscoveryResponse::decode(&wire[5..]).unwrap();
        assert_eq!(d.resources.len(), 2_001);
        assert_eq!(d.nonce, "n1");
        assert!(
            d.resources[1_000].encode_to_vec() == big.any.to_vec(),
            "the large resource arrives intact"
        );
    }
}
