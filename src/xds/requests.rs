//! The request side of an ADS stream: gRPC-framed protobuf messages read from the HTTP/2 body.
//!
//! tonic's `Streaming` keeps its read buffer at the size of the largest message it has seen for
//! the life of the stream. An Envoy EDS ACK repeats every cluster name (~60 KB for a sidecar), so
//! every ADS stream held that much for as long as it was open. Requests arrive once per response,
//! seldom, so this reader frees its buffer whenever a message has been taken out whole and
//! nothing follows it.
use std::marker::PhantomData;
use std::pin::Pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use tonic::Status;

/// Length of the gRPC message prefix: compressed flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// Decoded requests of one stream.
/// Message of the `CANCELLED` status a stream ends with when its proxy went away.
pub const PEER_GONE: &str = "the proxy closed the connection";

/// Whether a body read failed because the peer went away (connection closed, reset or a
/// GOAWAY, stream cancelled): a proxy shutting down or reconnecting, not an error to report.
/// Walks the error's sources for the hyper, h2 and I/O errors that say so.
pub fn peer_gone(status: &Status) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = next {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed())
        {
            return true;
        }
        if let Some(h) = e.downcast_ref::<h2::Error>() {
            if h.is_io() || h.is_go_away() {
                return true;
            }
            if h.is_reset() && matches!(h.reason(), Some(h2::Reason::CANCEL | h2::Reason::NO_ERROR)) {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        next = e.source();
    }
    false
}

pub struct RequestStream<Req> {
    body: Pin<Box<tonic::body::Body>>,
    buf: BytesMut,
    max_message_bytes: usize,
    ended: bool,
    _req: PhantomData<fn() -> Req>,
}

impl<Req: DecodeRequest> RequestStream<Req> {
    pub fn new<B>(body: B, max_message_bytes: usize) -> Self
    where
        B: http_body::Body + Send + 'static,
        B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    {
        let body = body.map_frame(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())));
        Self {
            body: Box::pin(tonic::body::Body::new(body)),
            buf: BytesMut::new(),
            max_message_bytes,
            ended: false,
            _req: PhantomData,
        }
    }

    /// The next request; `None` when the client half-closed the stream.
    pub async fn message(&mut self) -> Result<Option<Req>, Status> {
        loop {
            if let Some(req) = self.take()? {
                return Ok(Some(req));
            }
            if self.ended {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Status::internal("the request stream ended inside a message"))
                };
            }
            match std::future::poll_fn(|cx| self.body.as_mut().poll_frame(cx)).await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.put(data);
                    }
                }
                Some(Err(status)) if peer_gone(&status) => return Err(Status::cancelled(PEER_GONE)),
                Some(Err(status)) => return Err(status),
                None => self.ended = true,
            }
        }
    }

    /// One whole message out of the buffer, if there is one.
    fn take(&mut self) -> Result<Option<Req>, Status> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        match self.buf[0] {
            0 => {}
            1 => {
                // grpc compression doc: a set flag without a grpc-encoding is INTERNAL.
                return Err(Status::internal(
                    "protocol error: received a compressed message, but this server accepts no grpc-encoding",
                ));
            }
            f => {
                return Err(Status::internal(format!(
                    "protocol error: invalid compressed flag {f} (valid flags are 0 and 1)"
                )));
            }
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "request message too large: {len} bytes, the limit is {} bytes (--max-recv-message-size)",
                self.max_message_bytes
            )));
        }
        if self.buf.len() < PREFIX + len {
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        let mut msg = self.buf.split_to(PREFIX + len);
        msg.advance(PREFIX);
        if self.buf.is_empty() {
            // Nothing follows: let the allocation go rather than keep it for the next request.
            self.buf = BytesMut::new();
        }
        Req::decode_request(msg.freeze()).map(Some)
    }
}

/// How a request message is read out of its bytes.
pub trait DecodeRequest: Sized {
    fn decode_request(msg: Bytes) -> Result<Self, Status>;
}

impl DecodeRequest for envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
    fn decode_request(msg: Bytes) -> Result<Self, Status> {
        <Self as prost::Message>::decode(msg)
            .map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))
    }
}

fn malformed(what: &str) -> Status {
    Status::invalid_argument(format!("malformed xDS request: {what}"))
}

/// A SotW `DiscoveryRequest` as meshd reads it: the same wire format, with `resource_names`
/// (field 3) left in the message and only hashed while reading.
///
/// Envoy's SotW EDS ACK repeats every cluster name (~1,250 for a sidecar of the benchmark mesh),
/// and at 10,000 proxies an endpoint change brings 5,000 of them at once: decoding 6 million
/// strings (then hashing them) was most of meshd's work per change. An ACK that repeats the
/// previous list is recognised by the hash alone; only a changed list is read as names.
#[derive(Debug, Clone, Default)]
pub struct SotwRequest {
    pub version_info: String,
    pub node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
    pub type_url: String,
    pub response_nonce: String,
    pub error_detail: Option<envoy_types::pb::google::rpc::Status>,
    /// Order-sensitive hash of the resource names (per-process random key).
    pub names_fingerprint: u64,
    /// The message, for [`Self::names`].
    message: Bytes,
}

/// One top-level field of a message: its number and, for length-delimited fields, the bytes.
struct Field<'a> {
    number: u32,
    bytes: Option<&'a [u8]>,
}

/// Walks the top-level fields of a protobuf message; every length is checked.
fn fields(mut msg: &[u8]) -> impl Iterator<Item = Result<Field<'_>, Status>> {
    std::iter::from_fn(move || {
        if msg.is_empty() {
            return None;
        }
        let step = (|| {
            let key = prost::encoding::decode_varint(&mut msg).map_err(|_| malformed("bad field key"))?;
            let number = u32::try_from(key >> 3).map_err(|_| malformed("bad field number"))?;
            let bytes = match key & 7 {
                0 => {
                    prost::encoding::decode_varint(&mut msg).map_err(|_| malformed("bad varint"))?;
                    None
                }
                1 | 5 => {
                    let n = if key & 7 == 1 { 8 } else { 4 };
                    if msg.len() < n {
                        return Err(malformed("truncated fixed-width field"));
                    }
                    msg = &msg[n..];
                    None
                }
                2 => {
                    let len = prost::encoding::decode_varint(&mut msg).map_err(|_| malformed("bad length"))?;
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|l| *l <= msg.len())
                        .ok_or_else(|| malformed("truncated field"))?;
                    let (field, rest) = msg.split_at(len);
                    msg = rest;
                    Some(field)
                }
                _ => return Err(malformed("unsupported wire type")),
            };
            Ok(Field { number, bytes })
        })();
        if step.is_err() {
            msg = &[];
        }
        Some(step)
    })
}

fn names_hasher() -> impl std::hash::Hasher {
    use std::hash::BuildHasher as _;
    static KEY: std::sync::OnceLock<foldhash::quality::RandomState> = std::sync::OnceLock::new();
    KEY.get_or_init(Default::default).build_hasher()
}

fn text(field: &Field<'_>) -> Result<String, Status> {
    let b = field
        .bytes
        .ok_or_else(|| malformed("a string field has the wrong wire type"))?;
    std::str::from_utf8(b)
        .map(str::to_string)
        .map_err(|_| malformed("a string field is not valid UTF-8"))
}

fn message<M: prost::Message + Default>(field: &Field<'_>) -> Result<M, Status> {
    let b = field
        .bytes
        .ok_or_else(|| malformed("a message field has the wrong wire type"))?;
    M::decode(b).map_err(|e| malformed(&e.to_string()))
}

impl DecodeRequest for SotwRequest {
    fn decode_request(msg: Bytes) -> Result<Self, Status> {
        use std::hash::Hasher as _;
        let mut req = SotwRequest::default();
        let mut hasher = names_hasher();
        for f in fields(&msg) {
            let f = f?;
            match f.number {
                1 => req.version_info = text(&f)?,
                2 => req.node = Some(message(&f)?),
                3 => {
                    let name = f
                        .bytes
                        .ok_or_else(|| malformed("resource_names has the wrong wire type"))?;
                    hasher.write_usize(name.len());
                    hasher.write(name);
                }
                4 => req.type_url = text(&f)?,
                5 => req.response_nonce = text(&f)?,
                6 => req.error_detail = Some(message(&f)?),
                _ => {} // resource_locators and unknown fields
            }
        }
        req.names_fingerprint = hasher.finish();
        req.message = msg;
        Ok(req)
    }
}

impl SotwRequest {
    /// The resource names, in the order sent; a name that is not UTF-8 is INVALID_ARGUMENT.
    pub fn names(&self) -> Result<Vec<&str>, Status> {
        fields(&self.message)
            .filter_map(|f| match f {
                Ok(Field { number: 3, bytes }) => Some(
                    bytes
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .ok_or_else(|| malformed("a resource name is not valid UTF-8")),
                ),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect()
    }
}

/// A body of the given chunks, for tests.
#[cfg(test)]
fn body_of(
    chunks: Vec<bytes::Bytes>,
) -> impl http_body::Body<Data = bytes::Bytes, Error = std::convert::Infallible> + Send + 'static {
    let frames = chunks.into_iter().map(|c| Ok(http_body::Frame::data(c)));
    http_body_util::StreamBody::new(futures::stream::iter(frames))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use prost::Message;

    fn framed(req: &DiscoveryRequest) -> Vec<u8> {
        let body = req.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn req(names: usize) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: "t".into(),
            resource_names: (0..names)
                .map(|i| format!("outbound|80||svc-{i}.ns.svc.cluster.local"))
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn messages_split_across_frames_decode_and_the_buffer_is_freed() {
        let (a, b) = (req(2_000), req(1));
        let mut wire = framed(&a);
        wire.extend(framed(&b));
        // 16 KiB DATA frames, as h2 delivers a large request.
        let chunks: Vec<bytes::Bytes> = wire.chunks(16 * 1024).map(bytes::Bytes::copy_from_slice).collect();
        let mut s = RequestStream::<SotwRequest>::new(body_of(chunks), 4 << 20);
        assert_eq!(s.message().await.unwrap().unwrap().names().unwrap(), a.resource_names);
        assert_eq!(s.message().await.unwrap().unwrap().names().unwrap(), b.resource_names);
        assert_eq!(s.buf.capacity(), 0, "the read buffer is released between requests");
        assert!(s.message().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bad_frames_get_their_codes() {
        let big = framed(&req(100));
        let mut s = RequestStream::<SotwRequest>::new(body_of(vec![bytes::Bytes::from(big)]), 100);
        let e = s.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");

        let mut compressed = framed(&req(1));
        compressed[0] = 1;
        let mut s = RequestStream::<SotwRequest>::new(body_of(vec![bytes::Bytes::from(compressed)]), 1 << 20);
        assert_eq!(s.message().await.unwrap_err().code(), tonic::Code::Internal);

        let garbage = vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        let mut s = RequestStream::<SotwRequest>::new(body_of(vec![bytes::Bytes::from(garbage)]), 1 << 20);
        assert_eq!(s.message().await.unwrap_err().code(), tonic::Code::InvalidArgument);

        let cut = framed(&req(3));
        let mut s =
            RequestStream::<SotwRequest>::new(body_of(vec![bytes::Bytes::copy_from_slice(&cut[..10])]), 1 << 20);
        assert_eq!(s.message().await.unwrap_err().code(), tonic::Code::Internal);
    }

    #[test]
    fn sotw_requests_read_like_discovery_requests() {
        let mut r = req(3);
        r.response_nonce = "n".into();
        r.version_info = "v".into();
        r.node = Some(Default::default());
        r.error_detail = Some(envoy_types::pb::google::rpc::Status {
            message: "nack".into(),
            ..Default::default()
        });
        let ours = SotwRequest::decode_request(bytes::Bytes::from(r.encode_to_vec())).unwrap();
        assert_eq!(ours.type_url, r.type_url);
        assert_eq!((ours.response_nonce.as_str(), ours.version_info.as_str()), ("n", "v"));
        assert!(ours.node.is_some());
        assert_eq!(ours.error_detail.as_ref().unwrap().message, "nack");
        assert_eq!(ours.names().unwrap(), r.resource_names);
        // The same names give the same fingerprint whatever the nonce; other names another one.
        let mut ack = r.clone();
        ack.response_nonce = "n2".into();
        let again = SotwRequest::decode_request(bytes::Bytes::from(ack.encode_to_vec())).unwrap();
        assert_eq!(again.names_fingerprint, ours.names_fingerprint);
        ack.resource_names.swap(0, 1);
        let swapped = SotwRequest::decode_request(bytes::Bytes::from(ack.encode_to_vec())).unwrap();
        assert_ne!(swapped.names_fingerprint, ours.names_fingerprint);
    }

    #[test]
    fn malformed_sotw_requests_are_invalid_argument() {
        let not_utf8 = DiscoveryRequest::default()
            .encode_to_vec()
            .into_iter()
            .chain([0x1a, 2, 0xff, 0xfe])
            .collect::<Vec<u8>>();
        let r = SotwRequest::decode_request(bytes::Bytes::from(not_utf8)).unwrap();
        assert_eq!(r.names().unwrap_err().code(), tonic::Code::InvalidArgument);
        for bad in [
            &[0x0a, 0x05, b'a'][..],                                                 // length past the end
            &[0x22, 0x01, 0xff][..],                                                 // type_url not UTF-8
            &[0x0b][..],                                                             // group wire type
            &[0x12, 0x02, 0xff, 0xff][..],                                           // node that does not decode
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..], // bad key
            &[0x29, 1, 2][..],                                                       // truncated fixed64
        ] {
            let e = SotwRequest::decode_request(bytes::Bytes::copy_from_slice(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
        }
    }
}
