//! Encoded images in imgsvc.v1: wire messages ↔ [`crate::imagefile`], held to
//! the request's limits.
//!
//! The cheap checks (which fields are set, known enum values, quality range)
//! run on the reactor before any work; [`decode`] and [`encode`] are
//! CPU-bound and run on the worker pool. Decoding is bounded by
//! [`DecodeLimits`]: today the server-wide `limits.max_image_pixels` and
//! `limits.max_message_bytes` (a decoded image may take no more memory than
//! a raw one could in a message); a per-tenant limit is passed the same way.

use bytes::Bytes;

use super::{InvalidRequest, PixelBuffer, ServiceError};
use crate::{
    config::Limits,
    imagefile::{self, DEFAULT_JPEG_QUALITY, DecodeCost, DecodeLimits, DecodeOptions, EncodeOptions, Encoding, RawImage},
    proto::v1::{self, ImageEncoding},
};

/// Decoding limits from the server-wide limits.
pub fn decode_limits(limits: &Limits) -> DecodeLimits {
    DecodeLimits { max_pixels: limits.max_image_pixels, max_alloc_bytes: limits.max_message_bytes as u64 }
}

/// An encoded image of a request, checked but not yet decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedInput {
    pub data: Bytes,
    pub options: DecodeOptions,
}

/// The encoded content of `image`, if it has some: `Ok(None)` for a raw
/// image. Refuses raw fields beside encoded content, and unknown encodings.
pub fn encoded_input(image: &mut Option<v1::Image>, limits: DecodeLimits) -> Result<Option<EncodedInput>, ServiceError> {
    let Some(img) = image.as_mut() else { return Ok(None) };
    let Some(encoded) = img.encoded.take() else { return Ok(None) };
    if img.format != 0 || img.width != 0 || img.height != 0 || !img.data.is_empty() {
        return Err(InvalidRequest::EncodedWithRawFields.into());
    }
    if encoded.data.is_empty() {
        return Err(InvalidRequest::EmptyEncodedData.into());
    }
    let encoding = from_wire("image.encoded.encoding", encoded.encoding)?;
    Ok(Some(EncodedInput { data: encoded.data, options: DecodeOptions { encoding, page: encoded.page, limits } }))
}

/// What decoding `input` holds in memory besides the file, from its header
/// (cheap: no pixel is decoded), within its limits: what to charge before
/// [`decode`], which stays within it.
pub fn decode_cost(input: &EncodedInput) -> Result<DecodeCost, ServiceError> {
    Ok(imagefile::decode_cost(&input.data, &input.options)?)
}

/// Decodes an encoded input into a validated buffer. CPU-bound.
pub fn decode(input: &EncodedInput) -> Result<PixelBuffer, ServiceError> {
    let decoded = imagefile::decode(&input.data, &input.options)?;
    Ok(PixelBuffer::from_v1(Some(decoded.image.into_v1()), input.options.limits.max_pixels)?)
}

/// The requested output encoding; `None` for raw pixels.
pub fn output_options(output: Option<&v1::OutputEncoding>) -> Result<Option<EncodeOptions>, ServiceError> {
    let Some(output) = output else { return Ok(None) };
    let Some(encoding) = from_wire("output.encoding", output.encoding)? else { return Ok(None) };
    if !encoding.can_encode() {
        return Err(imagefile::CodecError::CannotEncode { encoding: encoding.name() }.into());
    }
    let jpeg_quality = match output.jpeg_quality {
        0 => DEFAULT_JPEG_QUALITY,
        q @ 1..=100 => q as u8,
        q => return Err(imagefile::CodecError::Quality(q).into()),
    };
    Ok(Some(EncodeOptions { encoding, jpeg_quality }))
}

/// Encodes a result as the response image: `encoded` holds the file;
/// format, width and height describe the pixels encoded. CPU-bound.
pub fn encode(buffer: PixelBuffer, options: &EncodeOptions) -> Result<v1::Image, ServiceError> {
    let raw = RawImage::from_v1(buffer.into_v1());
    let encoded = imagefile::encode(&raw, options)?;
    Ok(v1::Image {
        format: encoded.format as i32,
        width: raw.width,
        height: raw.height,
        data: Bytes::new(),
        encoded: Some(v1::EncodedImage { data: encoded.data.into(), encoding: to_wire(options.encoding) as i32, page: 0 }),
    })
}

pub fn to_wire(encoding: Encoding) -> ImageEncoding {
    match encoding {
        Encoding::Png => ImageEncoding::Png,
        Encoding::Jpeg => ImageEncoding::Jpeg,
        Encoding::Tiff => ImageEncoding::Tiff,
        Encoding::WebP => ImageEncoding::Webp,
        Encoding::Bmp => ImageEncoding::Bmp,
        Encoding::Gif => ImageEncoding::Gif,
    }
}

/// `None` for UNSPECIFIED.
pub fn from_wire(field: &'static str, value: i32) -> Result<Option<Encoding>, InvalidRequest> {
    Ok(match ImageEncoding::try_from(value) {
        Ok(ImageEncoding::Unspecified) => None,
        Ok(ImageEncoding::Png) => Some(Encoding::Png),
        Ok(ImageEncoding::Jpeg) => Some(Encoding::Jpeg),
        Ok(ImageEncoding::Tiff) => Some(Encoding::Tiff),
        Ok(ImageEncoding::Webp) => Some(Encoding::WebP),
        Ok(ImageEncoding::Bmp) => Some(Encoding::Bmp),
        Ok(ImageEncoding::Gif) => Some(Encoding::Gif),
        Err(_) => return Err(InvalidRequest::UnknownEncoding { field, value }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 100, max_alloc_bytes: 1 << 20 };

    #[test]
    fn every_encoding_survives_the_wire_mapping() {
        for encoding in Encoding::ALL {
            assert_eq!(from_wire("f", to_wire(encoding) as i32), Ok(Some(encoding)));
        }
        assert_eq!(from_wire("f", 0), Ok(None));
        assert_eq!(from_wire("output.encoding", 42), Err(InvalidRequest::UnknownEncoding { field: "output.encoding", value: 42 }));
    }

    #[test]
    fn raw_fields_beside_encoded_content_are_refused() {
        let encoded = Some(v1::EncodedImage { data: Bytes::from_static(b"x"), encoding: 0, page: 0 });
        let mut image = Some(v1::Image { width: 3, encoded, ..Default::default() });
        let err = encoded_input(&mut image, LIMITS).unwrap_err();
        assert!(matches!(err, ServiceError::Invalid(InvalidRequest::EncodedWithRawFields)), "{err}");
    }

    #[test]
    fn output_options_default_quality_and_refuse_gif_and_bad_quality() {
        let out = |encoding: ImageEncoding, jpeg_quality| v1::OutputEncoding { encoding: encoding as i32, jpeg_quality };
        assert_eq!(output_options(None).unwrap(), None);
        assert_eq!(output_options(Some(&out(ImageEncoding::Unspecified, 0))).unwrap(), None);
        assert_eq!(output_options(Some(&out(ImageEncoding::Jpeg, 0))).unwrap(), Some(EncodeOptions::new(Encoding::Jpeg)));
        let gif = output_options(Some(&out(ImageEncoding::Gif, 0))).unwrap_err();
        assert_eq!(tonic::Status::from(gif).code(), tonic::Code::InvalidArgument);
        let q = output_options(Some(&out(ImageEncoding::Jpeg, 101))).unwrap_err();
        assert_eq!(q.to_string(), "JPEG quality must be 1..=100, got 101");
    }
}
