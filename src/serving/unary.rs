//! The unary image methods (`NLImageService/RotateImage`, `/MeanFilter`,
//! `imgsvc.v1.ImageService/Process`) served from an owned message buffer,
//! without tonic's codec.
//!
//! tonic reads every request body into a buffer of its own
//! (`Streaming`'s `BytesMut`, grown and copied into from each HTTP/2 DATA
//! frame) that no layer can size, charge or hand over. Here the admission
//! layer reads the body it has charged ([`super::admission::ChargedRequest`])
//! and assembles the one request message itself:
//! - when the message's 5-byte prefix has come (and only then: the layer
//!   hands a prefix on once the message's memory is charged), one buffer of
//!   exactly the message's length is allocated, and each frame's bytes are
//!   copied into it: the one copy any HTTP/2 server makes (DATA frames are
//!   slices of the connection's read buffer);
//! - a message that arrives whole in one piece (one frame, or a message the
//!   layer inflated) is not copied at all: its bytes are used in place;
//! - prost decodes the message from that buffer with every `bytes` field
//!   (the pixels, an encoded file) a slice of it, not a copy;
//! - the handler (the same `LegacyService` and `V1Service` tonic serves) is
//!   called with the request; its answer is sent as the gRPC message prost
//!   would write, its pixels spliced in unencoded
//!   ([`crate::service::legacy::SplicedAnswer`]), then `grpc-status: 0`.
//!
//! What tonic checked is checked here, each as a client's error with the
//! expected and actual values: the message limit (RESOURCE_EXHAUSTED), a
//! `grpc-encoding` the server does not accept (UNIMPLEMENTED, with
//! `grpc-accept-encoding`, as tonic answers), the compressed flag, exactly
//! one message, a body that ends inside its message, and protobuf that does
//! not decode (INVALID_ARGUMENT: tonic said INTERNAL for the last three).
//!
//! Used when `server.owned_message_buffer` is on (the default) and
//! responses are not compressed (`server.compress_responses`, which tonic's
//! encoder does); otherwise tonic serves these methods as it serves the
//! others.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use prost::Message;
use tonic::{Status, codegen::http};

use super::admission::ImageMethod;
use crate::{
    proto::{
        nlimage::{NlImage, NlImageRotateRequest, nl_image_service_server::NlImageService},
        v1::{ProcessRequest, image_service_server::ImageService},
    },
    service::{
        InvalidRequest, LimitExceeded, ServiceError,
        legacy::{LegacyService, SplicedAnswer},
        v1::V1Service,
    },
};

/// The handlers the owned path calls: the services tonic also serves.
#[derive(Clone, Debug)]
pub struct UnaryHandlers {
    pub legacy: LegacyService,
    pub v1: V1Service,
}

impl UnaryHandlers {
    /// Whether the owned path serves `method`.
    pub fn serves(method: ImageMethod) -> bool {
        matches!(method, ImageMethod::LegacyRotate | ImageMethod::LegacyMeanFilter | ImageMethod::Process)
    }

    /// Serves one unary image call whose body is `body` (already charged
    /// by the admission layer).
    pub async fn serve<B>(
        &self,
        method: ImageMethod,
        request: http::Request<B>,
        max_message_bytes: u64,
    ) -> http::Response<tonic::body::Body>
    where
        B: Body<Data = Bytes, Error = Status> + Unpin,
    {
        match self.try_serve(method, request, max_message_bytes).await {
            Ok(response) => response,
            Err(status) => status.into_http(),
        }
    }

    async fn try_serve<B>(
        &self,
        method: ImageMethod,
        request: http::Request<B>,
        max_message_bytes: u64,
    ) -> Result<http::Response<tonic::body::Body>, Status>
    where
        B: Body<Data = Bytes, Error = Status> + Unpin,
    {
        check_encoding(request.headers())?;
        let (mut parts, mut body) = request.into_parts();
        let (message, trailers) = read_message(&mut body, max_message_bytes).await?;
        // The body is read to its end: what it charged stays with the call.
        drop(body);
        if let Some(trailers) = trailers {
            parts.headers.extend(trailers);
        }
        match method {
            ImageMethod::LegacyRotate => {
                let message = decode::<NlImageRotateRequest>(message, "NLImageRotateRequest")?;
                let response = self.legacy.rotate_image(tonic::Request::from_http(http::Request::from_parts(parts, message))).await?;
                answer(response, max_message_bytes)
            }
            ImageMethod::LegacyMeanFilter => {
                let message = decode::<NlImage>(message, "NLImage")?;
                let response = self.legacy.mean_filter(tonic::Request::from_http(http::Request::from_parts(parts, message))).await?;
                answer(response, max_message_bytes)
            }
            ImageMethod::Process => {
                let message = decode::<ProcessRequest>(message, "imgsvc.v1.ProcessRequest")?;
                let response = self.v1.process(tonic::Request::from_http(http::Request::from_parts(parts, message))).await?;
                answer(response, max_message_bytes)
            }
            ImageMethod::ProcessStream | ImageMethod::Other(_) => unreachable!("only unary image methods are served here"),
        }
    }
}

/// A client's framing or protobuf mistake, as the status the handler's
/// errors get.
fn invalid(error: InvalidRequest) -> Status {
    Status::from(ServiceError::from(error))
}

/// tonic's check of `grpc-encoding`, with its answer: the layer inflates
/// gzip and zstd; anything else but `identity` is not accepted.
fn check_encoding(headers: &http::HeaderMap) -> Result<(), Status> {
    let Some(value) = headers.get("grpc-encoding") else { return Ok(()) };
    if matches!(value.as_bytes(), b"identity" | b"gzip" | b"zstd") {
        return Ok(());
    }
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{}` which isn't supported (this server accepts gzip, zstd or identity)",
        String::from_utf8_lossy(value.as_bytes())
    ));
    status.metadata_mut().insert("grpc-accept-encoding", tonic::metadata::MetadataValue::from_static("gzip,zstd"));
    Err(status)
}

/// Where the reading of the one message is.
enum Assembly {
    /// Reading its 5-byte prefix: the bytes seen so far.
    Prefix { seen: usize, prefix: [u8; 5] },
    /// Inside it: the owned buffer, allocated at the prefix, and the bytes
    /// still to come.
    Message { buffer: BytesMut, len: usize },
    /// All of it has come.
    Done(Bytes),
}

/// Reads the body's one gRPC message, and its trailers if any.
async fn read_message<B>(body: &mut B, max_message_bytes: u64) -> Result<(Bytes, Option<http::HeaderMap>), Status>
where
    B: Body<Data = Bytes, Error = Status> + Unpin,
{
    let mut assembly = Assembly::Prefix { seen: 0, prefix: [0; 5] };
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => assembly = feed(assembly, data, max_message_bytes)?,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    match assembly {
        Assembly::Done(message) => Ok((message, trailers)),
        Assembly::Prefix { seen: 0, .. } => Err(invalid(InvalidRequest::MessageCount { expected: 1, actual: "none" })),
        Assembly::Prefix { seen, .. } => {
            Err(invalid(InvalidRequest::Truncated { received: seen as u64, declared: 5, what: "message prefix" }))
        }
        Assembly::Message { buffer, len } => {
            Err(invalid(InvalidRequest::Truncated { received: buffer.len() as u64, declared: len as u64, what: "request message" }))
        }
    }
}

/// Takes one piece of the body.
fn feed(mut assembly: Assembly, mut data: Bytes, max_message_bytes: u64) -> Result<Assembly, Status> {
    while !data.is_empty() {
        assembly = match assembly {
            Assembly::Done(_) => return Err(invalid(InvalidRequest::MessageCount { expected: 1, actual: "more than one" })),
            Assembly::Prefix { mut seen, mut prefix } => {
                let take = (5 - seen).min(data.len());
                prefix[seen..seen + take].copy_from_slice(&data.split_to(take));
                seen += take;
                if seen < 5 {
                    Assembly::Prefix { seen, prefix }
                } else {
                    if prefix[0] != 0 {
                        // The layer hands on inflated messages uncompressed:
                        // a flag left is one no grpc-encoding explains.
                        return Err(invalid(InvalidRequest::CompressedFlag { flag: prefix[0] }));
                    }
                    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
                    if u64::from(len) > max_message_bytes {
                        return Err(Status::from(ServiceError::from(LimitExceeded::Message {
                            len: u64::from(len),
                            limit: max_message_bytes,
                        })));
                    }
                    let len = len as usize;
                    if data.len() >= len {
                        // Whole in this piece: used in place.
                        Assembly::Done(data.split_to(len))
                    } else {
                        // Charged by the layer before it handed the prefix on.
                        Assembly::Message { buffer: BytesMut::with_capacity(len), len }
                    }
                }
            }
            Assembly::Message { mut buffer, len } => {
                let take = (len - buffer.len()).min(data.len());
                buffer.put_slice(&data.split_to(take));
                if buffer.len() == len { Assembly::Done(buffer.freeze()) } else { Assembly::Message { buffer, len } }
            }
        };
    }
    // A zero-length message needs no bytes after its prefix.
    if let Assembly::Prefix { seen: 5, .. } = assembly {
        unreachable!("a complete prefix always moves on");
    }
    Ok(assembly)
}

/// Decodes a request message in place: `bytes` fields are slices of it.
fn decode<M: Message + Default>(message: Bytes, name: &'static str) -> Result<M, Status> {
    M::decode(message).map_err(|error| invalid(InvalidRequest::NotProtobuf { message: name, error: error.to_string() }))
}

/// The handler's answer as a gRPC response: headers, the message (its
/// pixels spliced in when the handler set them aside), `grpc-status: 0`.
fn answer<M: Message>(response: tonic::Response<M>, max_message_bytes: u64) -> Result<http::Response<tonic::body::Body>, Status> {
    let (metadata, message, mut extensions) = response.into_parts();
    let pieces: VecDeque<Bytes> = match extensions.remove::<SplicedAnswer>() {
        Some(spliced) => {
            let len = (spliced.head.len() - 5 + spliced.data.len() + spliced.tail.len()) as u64;
            check_answer_size(len, max_message_bytes)?;
            [spliced.head, spliced.data, spliced.tail].into_iter().filter(|b| !b.is_empty()).collect()
        }
        None => {
            let len = message.encoded_len();
            check_answer_size(len as u64, max_message_bytes)?;
            let mut buffer = BytesMut::with_capacity(5 + len);
            buffer.put_u8(0);
            buffer.put_u32(len as u32);
            message.encode(&mut buffer).map_err(|e| Status::internal(format!("cannot encode the response: {e}")))?;
            VecDeque::from([buffer.freeze()])
        }
    };
    let mut http = http::Response::new(tonic::body::Body::new(Answer { pieces, trailers: Some(ok_trailers()) }));
    *http.headers_mut() = metadata.into_headers();
    http.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    Ok(http)
}

/// tonic's encoder limit (`max_encoding_message_size`): an answer larger
/// than the message limit is not sent.
fn check_answer_size(len: u64, max_message_bytes: u64) -> Result<(), Status> {
    if len > max_message_bytes {
        return Err(Status::resource_exhausted(format!(
            "the answer is {len} bytes, over the server's message limit of {max_message_bytes} bytes (limits.max_message_bytes)"
        )));
    }
    Ok(())
}

fn ok_trailers() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers
}

/// An answer's body: its pieces, then its trailers.
struct Answer {
    pieces: VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(piece) = self.pieces.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.pieces.iter().map(|p| p.len() as u64).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 1 << 20;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    /// A body of the given pieces.
    fn body(pieces: Vec<Vec<u8>>) -> http_body_util::StreamBody<impl tokio_stream::Stream<Item = Result<Frame<Bytes>, Status>> + Unpin> {
        http_body_util::StreamBody::new(tokio_stream::iter(pieces.into_iter().map(|p| Ok(Frame::data(Bytes::from(p))))))
    }

    fn read(pieces: Vec<Vec<u8>>) -> Result<Bytes, Status> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async { read_message(&mut body(pieces), LIMIT).await.map(|(m, _)| m) })
    }

    /// Any cut of the body into pieces gives the same message, prefix cut
    /// included; a message in one piece is that piece's bytes, not a copy.
    #[test]
    fn a_message_is_assembled_from_any_pieces_and_used_in_place_when_whole() {
        let message: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let wire = framed(&message);
        for cut in [1, 2, 4, 5, 6, 100, 1004, 1005] {
            let (a, b) = wire.split_at(cut);
            assert_eq!(read(vec![a.to_vec(), b.to_vec()]).unwrap(), message, "cut at {cut}");
        }
        let pieces: Vec<Vec<u8>> = wire.chunks(3).map(<[u8]>::to_vec).collect();
        assert_eq!(read(pieces).unwrap(), message);

        let piece = Bytes::from(wire.clone());
        let (whole, _) = feed_all(piece.clone());
        assert_eq!(whole.as_ptr(), piece[5..].as_ptr(), "a whole message is a slice of its piece");
        assert_eq!(read(vec![framed(&[])]).unwrap(), Bytes::new(), "an empty message");
    }

    fn feed_all(piece: Bytes) -> (Bytes, ()) {
        match feed(Assembly::Prefix { seen: 0, prefix: [0; 5] }, piece, LIMIT).unwrap() {
            Assembly::Done(message) => (message, ()),
            _ => panic!("the message is whole"),
        }
    }

    /// Every framing mistake is the client's, named with what was expected
    /// and what came.
    #[test]
    fn framing_mistakes_are_invalid_argument_naming_expected_and_actual() {
        let cases: [(Vec<Vec<u8>>, tonic::Code, &str); 6] = [
            (vec![], tonic::Code::InvalidArgument, "expected 1 request message, got none"),
            (vec![framed(b"ab"), framed(b"c")], tonic::Code::InvalidArgument, "expected 1 request message, got more than one"),
            (vec![framed(b"abcdef")[..7].to_vec()], tonic::Code::InvalidArgument, "after 2 of the 6 bytes"),
            (vec![vec![0, 0, 0]], tonic::Code::InvalidArgument, "after 3 of the 5 bytes"),
            (vec![vec![1, 0, 0, 0, 1, 9]], tonic::Code::InvalidArgument, "compressed flag 1"),
            (vec![vec![0, 0, 0x20, 0, 0]], tonic::Code::ResourceExhausted, "2097152 bytes, over the server's message limit of 1048576"),
        ];
        for (pieces, code, words) in cases {
            let status = read(pieces.clone()).expect_err("refused");
            assert_eq!(status.code(), code, "{pieces:?}: {status:?}");
            assert!(status.message().contains(words), "{pieces:?}: {:?} should say {words:?}", status.message());
        }
    }

    #[test]
    fn protobuf_that_does_not_decode_is_invalid_argument_naming_the_message() {
        let status = decode::<NlImage>(Bytes::from_static(&[0x12, 0xff, 0xff, 0x01]), "NLImage").expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("not a valid NLImage"), "{}", status.message());
    }

    /// Decoding is in place: the pixels are a slice of the message buffer.
    #[test]
    fn the_pixels_are_a_slice_of_the_message_buffer() {
        let image = NlImage { color: true, width: 2, height: 2, data: Bytes::from(vec![7u8; 12]) };
        let message = Bytes::from(image.encode_to_vec());
        let decoded = decode::<NlImage>(message.clone(), "NLImage").unwrap();
        assert_eq!(decoded, image);
        let inside = message.as_ptr_range();
        assert!(inside.contains(&decoded.data.as_ptr()), "the pixels were copied");
    }

    /// An unaccepted `grpc-encoding` is refused as tonic refuses it.
    #[test]
    fn an_encoding_the_server_does_not_accept_is_unimplemented_with_the_accepted_ones() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-encoding", http::HeaderValue::from_static("snappy"));
        let status = check_encoding(&headers).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().contains("`snappy`"));
        assert_eq!(status.metadata().get("grpc-accept-encoding").unwrap(), "gzip,zstd");
        for ok in ["identity", "gzip", "zstd"] {
            headers.insert("grpc-encoding", http::HeaderValue::from_static(ok));
            check_encoding(&headers).expect(ok);
        }
    }

    /// A spliced answer goes out as its pieces, an unspliced one as prost's
    /// encoding; both with `application/grpc` and `grpc-status: 0`.
    #[test]
    fn an_answer_is_the_grpc_message_then_status_ok() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let image = NlImage { color: false, width: 3, height: 1, data: Bytes::from(vec![1u8, 2, 3]) };
        let expected = framed(&image.encode_to_vec());
        for splice in [false, true] {
            let mut kept = image.clone();
            let mut response = tonic::Response::new(kept.clone());
            if splice {
                let spliced = SplicedAnswer::split(&mut kept).unwrap();
                response = tonic::Response::new(kept.clone());
                response.extensions_mut().insert(spliced);
            }
            let http = answer(response, LIMIT).unwrap();
            assert_eq!(http.headers()["content-type"], "application/grpc");
            let collected = rt.block_on(http.into_body().collect()).unwrap();
            assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
            assert_eq!(collected.to_bytes().to_vec(), expected, "splice {splice}");
        }
        let status = answer(tonic::Response::new(image.clone()), 4).expect_err("over the limit");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }
}
