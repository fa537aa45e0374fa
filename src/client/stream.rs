//! ProcessStream from the client side: images beyond the unary message
//! limit, sent as a header and chunks, answered the same way.

use bytes::Bytes;
use tonic::transport::Channel;

use super::{ClientError, Op, RawImage, status_error};
use crate::{
    proto::v1::{
        MeanFilter, Operation, ProcessStreamRequest, Rotate, StreamHeader, image_service_client::ImageServiceClient, operation::Kind,
        process_stream_request, process_stream_response, rotate::Amount,
    },
    service::stream::chunks,
};

/// Default size of the chunks the client sends.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// The request messages for `image`: a header, then `chunk_bytes` chunks.
pub fn request_messages(image: RawImage, ops: &[Op], chunk_bytes: usize) -> Vec<ProcessStreamRequest> {
    let operations = ops
        .iter()
        .map(|op| Operation {
            kind: Some(match *op {
                Op::Rotate(t) => Kind::Rotate(Rotate { amount: Some(Amount::QuarterTurns(t.count())) }),
                Op::MeanFilter => Kind::MeanFilter(MeanFilter {}),
            }),
        })
        .collect();
    let header = StreamHeader { format: image.format as i32, width: image.width, height: image.height, operations };
    std::iter::once(ProcessStreamRequest { part: Some(process_stream_request::Part::Header(header)) })
        .chain(chunks(image.data, chunk_bytes).map(|c| ProcessStreamRequest { part: Some(process_stream_request::Part::Chunk(c)) }))
        .collect()
}

/// Applies `ops` to `image` through ProcessStream.
pub async fn process_stream(
    channel: Channel,
    image: RawImage,
    ops: &[Op],
    chunk_bytes: usize,
    server_name: &str,
    compression: Option<tonic::codec::CompressionEncoding>,
) -> Result<RawImage, ClientError> {
    let messages = request_messages(image, ops, chunk_bytes);
    let mut client = ImageServiceClient::new(channel).max_decoding_message_size(super::DEFAULT_MAX_MESSAGE_BYTES);
    if let Some(enc) = compression {
        client = client.send_compressed(enc).accept_compressed(enc);
    }
    let mut responses = client.process_stream(tokio_stream::iter(messages)).await.map_err(|s| status_error(s, server_name))?.into_inner();
    let bad = |m: &str| ClientError::BadResponse(m.to_string());
    let header = match responses.message().await.map_err(|s| status_error(s, server_name))? {
        Some(ProcessStreamResponse { part: Some(process_stream_response::Part::Header(h)) }) => h,
        _ => return Err(bad("the response stream does not start with a header")),
    };
    let mut data = bytes::BytesMut::new();
    while let Some(message) = responses.message().await.map_err(|s| status_error(s, server_name))? {
        match message.part {
            Some(process_stream_response::Part::Chunk(c)) => data.extend_from_slice(&c),
            _ => return Err(bad("the response stream has a second header or an empty message")),
        }
    }
    let format = crate::proto::v1::PixelFormat::try_from(header.format).map_err(|_| bad("unknown pixel format"))?;
    let image = RawImage { format, width: header.width, height: header.height, data: Bytes::from(data) };
    // The same validation as any image: dimensions and length agree.
    crate::service::PixelBuffer::from_v1(Some(image.clone().into_v1()), u64::MAX).map_err(|e| bad(&e.to_string()))?;
    Ok(image)
}

use crate::proto::v1::ProcessStreamResponse;
