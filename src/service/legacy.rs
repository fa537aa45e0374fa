//! NLImageService, wire-compatible with every existing client.

use bytes::{BufMut, Bytes, BytesMut};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint},
};
use tonic::{Request, Response, Status};

use super::{InvalidRequest, Pipeline, PixelBuffer, Processor, ServiceError, Step, answer_bytes, message_bytes, tenant_of, traced};
use crate::{
    imaging::QuarterTurns,
    proto::{
        nlimage::{NlImage, NlImageRotateRequest, nl_image_rotate_request::Rotation, nl_image_service_server::NlImageService},
        v1::ProcessResponse,
    },
    tenancy::policy::Operation,
};

#[derive(Clone, Debug)]
pub struct LegacyService {
    processor: Processor,
    /// Answers go out as [`SplicedAnswer`]s (not when responses may be
    /// compressed: `server.compress_responses`).
    splice: bool,
}

impl LegacyService {
    /// `splice`: send answers as [`SplicedAnswer`]s; only for a server that
    /// never compresses responses.
    pub fn new(processor: Processor, splice: bool) -> Self {
        Self { processor, splice }
    }

    /// What the answer `out` holds until it is sent ([`answer_bytes`]).
    fn answer_charge(&self, out: &NlImage) -> u64 {
        answer_bytes(message_bytes(out), self.splice && !out.data.is_empty(), !self.splice)
    }

    fn answer(&self, mut image: NlImage) -> Response<NlImage> {
        let spliced = if self.splice { SplicedAnswer::split(&mut image) } else { None };
        let mut response = Response::new(image);
        if let Some(spliced) = spliced {
            response.extensions_mut().insert(spliced);
        }
        response
    }
}

/// An NLImage answer whose pixels are sent without being copied: tonic
/// would encode the whole message into its buffer (a copy of the image,
/// 6 % of the server's CPU on 4K rotations). The handler keeps the pixels
/// out of the message it returns (tonic then encodes only a few bytes) and
/// puts this into the response's extensions; `serving::admission` sends,
/// in place of tonic's message, the gRPC prefix and the fields before
/// `data`, then `data` itself (the same `Bytes`), then the fields after it:
/// byte for byte what prost would have written (field order 1, 2, 3, 4,
/// defaults omitted), uncompressed (flag 0).
#[derive(Clone, Debug)]
pub struct SplicedAnswer {
    /// The 5-byte gRPC prefix, `color` and `data`'s key and length.
    pub head: Bytes,
    pub data: Bytes,
    /// `width` and `height`.
    pub tail: Bytes,
}

impl SplicedAnswer {
    /// Takes the pixels out of `image`; `None` (and `image` untouched) when
    /// there are none or the message would not fit a gRPC length prefix.
    pub fn split(image: &mut NlImage) -> Option<Self> {
        let len = u32::try_from(image.encoded_len()).ok()?;
        if image.data.is_empty() {
            return None;
        }
        let mut head = BytesMut::with_capacity(5 + 2 + 1 + 10);
        head.put_u8(0);
        head.put_u32(len);
        if image.color {
            prost::encoding::bool::encode(1, &image.color, &mut head);
        }
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(image.data.len() as u64, &mut head);
        let mut tail = BytesMut::with_capacity(2 * 11);
        if image.width != 0 {
            prost::encoding::int32::encode(3, &image.width, &mut tail);
        }
        if image.height != 0 {
            prost::encoding::int32::encode(4, &image.height, &mut tail);
        }
        Some(Self { head: head.freeze(), data: std::mem::take(&mut image.data), tail: tail.freeze() })
    }

    /// Takes the raw pixels out of a v1 Process answer, as [`Self::split`]
    /// does for NLImage: `None` (and `response` untouched) for an encoded
    /// answer, no pixels, or a message too large for a gRPC prefix. The
    /// head is the prefix, `image`'s key and length, the fields before
    /// `data` (format, width, height: prost writes fields in number order)
    /// and `data`'s key and length; nothing comes after `data` (`encoded`,
    /// field 5, is unset in a raw answer).
    pub fn split_process(response: &mut ProcessResponse) -> Option<Self> {
        let len = u32::try_from(response.encoded_len()).ok()?;
        let image = response.image.as_mut()?;
        if image.data.is_empty() || image.encoded.is_some() {
            return None;
        }
        let data = std::mem::take(&mut image.data);
        let before = image.encode_to_vec();
        let data_key_len = prost::encoding::key_len(4) + prost::encoding::encoded_len_varint(data.len() as u64);
        let image_len = before.len() + data_key_len + data.len();
        let mut head = BytesMut::with_capacity(5 + 1 + 10 + before.len() + data_key_len);
        head.put_u8(0);
        head.put_u32(len);
        encode_key(1, WireType::LengthDelimited, &mut head);
        encode_varint(image_len as u64, &mut head);
        head.put_slice(&before);
        encode_key(4, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
        Some(Self { head: head.freeze(), data, tail: Bytes::new() })
    }
}

fn quarter_turns(rotation: i32) -> Result<QuarterTurns, InvalidRequest> {
    match Rotation::try_from(rotation) {
        Ok(Rotation::None) => Ok(QuarterTurns::Zero),
        Ok(Rotation::NinetyDeg) => Ok(QuarterTurns::One),
        Ok(Rotation::OneEightyDeg) => Ok(QuarterTurns::Two),
        Ok(Rotation::TwoSeventyDeg) => Ok(QuarterTurns::Three),
        Err(_) => Err(InvalidRequest::UnknownRotation { value: rotation }),
    }
}

/// A RotateImage request checked within `max_pixels`: its image and the one
/// step to run. Pure and synchronous, so the fuzz targets run exactly what
/// the handler runs.
pub fn rotate_request(request: NlImageRotateRequest, max_pixels: u64) -> Result<(PixelBuffer, Step), ServiceError> {
    let turns = quarter_turns(request.rotation)?;
    Ok((PixelBuffer::from_legacy(request.image, max_pixels)?, Step::Rotate(turns)))
}

/// A MeanFilter request checked within `max_pixels` (see [`rotate_request`]).
pub fn mean_filter_request(image: NlImage, max_pixels: u64) -> Result<(PixelBuffer, Step), ServiceError> {
    Ok((PixelBuffer::from_legacy(Some(image), max_pixels)?, Step::MeanFilter))
}

#[tonic::async_trait]
impl NlImageService for LegacyService {
    async fn rotate_image(&self, request: Request<NlImageRotateRequest>) -> Result<Response<NlImage>, Status> {
        let tenant = tenant_of(&request);
        let (processor, this) = (self.processor.clone(), self.clone());
        traced("NLImageService/RotateImage", tenant, move |tenant| {
            Box::pin(async move {
                let call = processor.call(&request, &tenant, &[Operation::Rotate], || request.get_ref().encoded_len())?;
                let (input, step) = rotate_request(request.into_inner(), call.admission.max_image_pixels)?;
                let out = processor.process(&call, input, Pipeline::new([step])).await?.into_legacy();
                processor.hold(&call.account, this.answer_charge(&out)).await?;
                Ok::<_, ServiceError>(this.answer(out))
            })
        })
        .await
    }

    async fn mean_filter(&self, request: Request<NlImage>) -> Result<Response<NlImage>, Status> {
        let tenant = tenant_of(&request);
        let (processor, this) = (self.processor.clone(), self.clone());
        traced("NLImageService/MeanFilter", tenant, move |tenant| {
            Box::pin(async move {
                let call = processor.call(&request, &tenant, &[Operation::MeanFilter], || request.get_ref().encoded_len())?;
                let (input, step) = mean_filter_request(request.into_inner(), call.admission.max_image_pixels)?;
                let out = processor.process(&call, input, Pipeline::new([step])).await?.into_legacy();
                processor.hold(&call.account, this.answer_charge(&out)).await?;
                Ok::<_, ServiceError>(this.answer(out))
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spliced answer is byte for byte the gRPC message tonic would
    /// have sent: prefix, then prost's encoding.
    #[test]
    fn a_spliced_answer_is_the_message_prost_encodes() {
        let cases = [
            (true, 3, 2, vec![7u8; 18]),
            (false, 1, 1, vec![9u8]),
            (true, 4096, 2160, vec![1u8; 300]),
            (false, 0, 0, vec![2u8; 5]),
            (true, -1, i32::MAX, vec![3u8; 130]),
        ];
        for (color, width, height, data) in cases {
            let image = NlImage { color, width, height, data: Bytes::from(data) };
            let mut expected = vec![0u8];
            expected.extend_from_slice(&(image.encoded_len() as u32).to_be_bytes());
            expected.extend_from_slice(&image.encode_to_vec());
            let mut kept = image.clone();
            let spliced = SplicedAnswer::split(&mut kept).expect("pixels to splice");
            assert_eq!([&spliced.head[..], &spliced.data[..], &spliced.tail[..]].concat(), expected, "{image:?}");
            assert!(kept.data.is_empty(), "the message keeps no pixels");
            assert_eq!((kept.color, kept.width, kept.height), (color, width, height));
        }
    }

    /// The same for a v1 Process answer of raw pixels, whatever the sizes
    /// (one- and two-byte varints) and with default fields left out.
    #[test]
    fn a_spliced_process_answer_is_the_message_prost_encodes() {
        use crate::proto::v1::{EncodedImage, Image};
        for (format, width, height, len) in [(1, 3, 2, 6), (7, 4096, 2160, 300), (0, 0, 0, 5), (3, 1, 1, 70_000)] {
            let response =
                ProcessResponse { image: Some(Image { format, width, height, data: Bytes::from(vec![5u8; len]), encoded: None }) };
            let mut expected = vec![0u8];
            expected.extend_from_slice(&(response.encoded_len() as u32).to_be_bytes());
            expected.extend_from_slice(&response.encode_to_vec());
            let mut kept = response.clone();
            let spliced = SplicedAnswer::split_process(&mut kept).expect("pixels to splice");
            assert_eq!([&spliced.head[..], &spliced.data[..], &spliced.tail[..]].concat(), expected, "{format} {width}x{height} {len}");
            assert!(kept.image.as_ref().unwrap().data.is_empty(), "the message keeps no pixels");
        }
        let encoded = Some(EncodedImage { data: Bytes::from_static(b"png"), encoding: 1, page: 0 });
        let mut response = ProcessResponse { image: Some(Image { encoded, ..Default::default() }) };
        assert!(SplicedAnswer::split_process(&mut response).is_none(), "an encoded answer is left to tonic");
    }

    #[test]
    fn an_answer_without_pixels_is_left_to_tonic() {
        let mut image = NlImage { color: true, width: 0, height: 0, data: Bytes::new() };
        assert!(SplicedAnswer::split(&mut image).is_none());
    }
}
