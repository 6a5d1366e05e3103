//! The request side of an ADS stream: gRPC-framed protobuf messages read from the HTTP/2 body.
//!
//! tonic's `Streaming` keeps its read buffer at the size of the largest message it has seen for
//! the life of the stream. An Envoy EDS ACK repeats every cluster name (~60 KB for a sidecar), so
//! every ADS stream held that much for as long as it was open. Requests arrive once per response,
//! seldom, so this reader frees its buffer whenever a message has been taken out whole and
//! nothing follows it.
use std::marker::PhantomData;
use std::pin::Pin;

use bytes::{Buf, BufMut, BytesMut};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use tonic::Status;

/// Length of the gRPC message prefix: compressed flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// Decoded requests of one stream.
pub struct RequestStream<Req> {
    body: Pin<Box<tonic::body::Body>>,
    buf: BytesMut,
    max_message_bytes: usize,
    ended: bool,
    _req: PhantomData<fn() -> Req>,
}

impl<Req: prost::Message + Default> RequestStream<Req> {
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
        Req::decode(msg.freeze())
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))
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
        let mut s = RequestStream::<DiscoveryRequest>::new(body_of(chunks), 4 << 20);
        assert_eq!(s.message().await.unwrap().unwrap(), a);
        assert_eq!(s.message().await.unwrap().unwrap(), b);
        assert_eq!(s.buf.capacity(), 0, "the read buffer is released between requests");
        assert!(s.message().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bad_frames_get_their_codes() {
        let big = framed(&req(100));
        let mut s = RequestStream::<DiscoveryRequest>::new(body_of(vec![bytes::Bytes::from(big)]), 100);
        let e = s.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");

        let mut compressed = framed(&req(1));
        compressed[0] = 1;
        let mut s = RequestStream::<DiscoveryRequest>::new(body_of(vec![bytes::Bytes::from(compressed)]), 1 << 20);
        assert_eq!(s.message().await.unwrap_err().code(), tonic::Code::Internal);

        let garbage = vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        let mut s = RequestStream::<DiscoveryRequest>::new(body_of(vec![bytes::Bytes::from(garbage)]), 1 << 20);
        assert_eq!(s.message().await.unwrap_err().code(), tonic::Code::InvalidArgument);

        let cut = framed(&req(3));
        let mut s =
            RequestStream::<DiscoveryRequest>::new(body_of(vec![bytes::Bytes::copy_from_slice(&cut[..10])]), 1 << 20);
        assert_eq!(s.message().await.unwrap_err().code(), tonic::Code::Internal);
    }
}
