//! Response encoding from pre-encoded resources, and the gRPC codec that sends those bytes.
//!
//! Every resource is encoded once per version (`Resource::any`); a response is its header fields
//! plus the resources' bytes copied into one buffer, so N connections receiving the same
//! resources cost N memcpy's, not N protobuf encodings.
use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

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

/// `DiscoveryResponse { version_info=1, resources=2, type_url=4, nonce=5 }`.
pub fn sotw_response(version: &str, type_url: &str, nonce: &str, resources: &[&Resource]) -> Bytes {
    let body: usize = resources.iter().map(|r| bytes_len(2, r.any.len())).sum();
    let mut buf =
        BytesMut::with_capacity(body + string_len(1, version) + string_len(4, type_url) + string_len(5, nonce));
    put_string(&mut buf, 1, version);
    for r in resources {
        put_bytes(&mut buf, 2, &r.any);
    }
    put_string(&mut buf, 4, type_url);
    put_string(&mut buf, 5, nonce);
    buf.freeze()
}

/// `DeltaDiscoveryResponse { system_version_info=1, resources=2 (Resource{version=1,
/// resource=2, name=3}), type_url=4, nonce=5, removed_resources=6 }`.
pub fn delta_response(
    system_version: &str,
    type_url: &str,
    nonce: &str,
    resources: &[&Resource],
    removed: &[String],
) -> Bytes {
    let mut buf = BytesMut::with_capacity(
        resources
            .iter()
            .map(|r| r.any.len() + r.name.len() + r.version.len() + 16)
            .sum::<usize>()
            + removed.iter().map(|r| r.len() + 4).sum::<usize>()
            + 128,
    );
    put_string(&mut buf, 1, system_version);
    for r in resources {
        let inner = string_len(1, &r.version) + bytes_len(2, r.any.len()) + string_len(3, &r.name);
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(inner as u64, &mut buf);
        put_string(&mut buf, 1, &r.version);
        put_bytes(&mut buf, 2, &r.any);
        put_string(&mut buf, 3, &r.name);
    }
    put_string(&mut buf, 4, type_url);
    put_string(&mut buf, 5, nonce);
    for name in removed {
        put_string(&mut buf, 6, name);
    }
    buf.freeze()
}

/// Decodes requests with prost and sends responses as the bytes they already are.
#[derive(Debug)]
pub struct RawCodec<Req>(std::marker::PhantomData<fn() -> Req>);

impl<Req> Default for RawCodec<Req> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<Req: prost::Message + Default + Send + 'static> Codec for RawCodec<Req> {
    type Encode = Bytes;
    type Decode = Req;
    type Encoder = BytesEncoder;
    type Decoder = ProstDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(std::marker::PhantomData)
    }
}

#[derive(Debug)]
pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

#[derive(Debug)]
pub struct ProstDecoder<T>(std::marker::PhantomData<fn() -> T>);

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
}
