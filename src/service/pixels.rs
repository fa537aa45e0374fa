//! Validated pixel buffers and their conversion from and to both wire formats.
//!
//! Validation happens before any allocation or pixel work: dimensions,
//! overflow, the pixel limit, then the data length. The pixel data of a
//! request is kept as the `Bytes` prost decoded (no copy) and handed to the
//! kernels as a slice.

use bytes::Bytes;

use super::error::{InvalidRequest, LimitExceeded};
use crate::{
    imaging::Layout,
    proto::{nlimage::NlImage, v1},
};

/// Bits per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    Eight,
    /// Little-endian 16-bit samples.
    Sixteen,
}

/// An image whose data length matches its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PixelBuffer {
    layout: Layout,
    depth: Depth,
    format: v1::PixelFormat,
    data: Bytes,
}

impl PixelBuffer {
    pub fn layout(&self) -> Layout {
        self.layout
    }
    pub fn depth(&self) -> Depth {
        self.depth
    }
    pub fn format(&self) -> v1::PixelFormat {
        self.format
    }
    pub fn data(&self) -> &Bytes {
        &self.data
    }
    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// A buffer of the same format with a new layout and data. The caller
    /// (the pipeline) guarantees that they match.
    pub(crate) fn with_data(&self, layout: Layout, data: Bytes) -> Self {
        debug_assert_eq!(data.len(), layout.samples() * self.bytes_per_sample());
        Self { layout, depth: self.depth, format: self.format, data }
    }

    pub fn bytes_per_sample(&self) -> usize {
        match self.depth {
            Depth::Eight => 1,
            Depth::Sixteen => 2,
        }
    }

    /// Validates a legacy `NLImage` (GRAY8 or RGB8).
    pub fn from_legacy(image: Option<NlImage>, max_pixels: u64) -> Result<Self, RequestError> {
        let image = image.ok_or(InvalidRequest::MissingImage)?;
        let format = if image.color { v1::PixelFormat::Rgb8 } else { v1::PixelFormat::Gray8 };
        // The legacy protocol sizes everything in int32, so a product that
        // does not fit in i32 cannot be a real NLImage.
        Self::validate(image.width.into(), image.height.into(), format, image.data, max_pixels, i32::MAX as u64, 32)
    }

    /// Validates a v1 `Image`.
    pub fn from_v1(image: Option<v1::Image>, max_pixels: u64) -> Result<Self, RequestError> {
        let image = image.ok_or(InvalidRequest::MissingImage)?;
        ImageShape::from_v1(image.format, image.width, image.height, max_pixels)?.with_data(image.data)
    }

    fn validate(
        width: i64,
        height: i64,
        format: v1::PixelFormat,
        data: Bytes,
        max_pixels: u64,
        max_bytes: u64,
        bits: u32,
    ) -> Result<Self, RequestError> {
        ImageShape::validate(width, height, format, max_pixels, max_bytes, bits)?.with_data(data)
    }

    /// As a legacy `NLImage`. Only GRAY8 and RGB8 come out of the legacy API.
    pub fn into_legacy(self) -> NlImage {
        NlImage {
            color: self.format == v1::PixelFormat::Rgb8,
            width: self.layout.width() as i32,
            height: self.layout.height() as i32,
            data: self.data,
        }
    }

    pub fn into_v1(self) -> v1::Image {
        v1::Image {
            format: self.format as i32,
            width: self.layout.width() as u32,
            height: self.layout.height() as u32,
            data: self.data,
            encoded: None,
        }
    }
}

/// A validated image description without its data: a stream header, or an
/// image whose data is about to be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    layout: Layout,
    depth: Depth,
    format: v1::PixelFormat,
    width: i64,
    height: i64,
    bytes: u64,
}

impl ImageShape {
    /// Validates a v1 format and dimensions against `max_pixels`.
    pub fn from_v1(format: i32, width: u32, height: u32, max_pixels: u64) -> Result<Self, RequestError> {
        let format = match v1::PixelFormat::try_from(format) {
            Ok(v1::PixelFormat::Unspecified) => return Err(InvalidRequest::UnspecifiedFormat.into()),
            Ok(f) => f,
            Err(_) => return Err(InvalidRequest::UnknownFormat { value: format }.into()),
        };
        Self::validate(width.into(), height.into(), format, max_pixels, u64::MAX, 64)
    }

    fn validate(
        width: i64,
        height: i64,
        format: v1::PixelFormat,
        max_pixels: u64,
        max_bytes: u64,
        bits: u32,
    ) -> Result<Self, RequestError> {
        for (field, value) in [("width", width), ("height", height)] {
            if value < 1 {
                return Err(InvalidRequest::NonPositiveDimension { field, value }.into());
            }
        }
        let (channels, depth) = format_shape(format);
        let bytes_per_pixel = (channels * depth_bytes(depth)) as u64;
        let (w, h) = (width as u64, height as u64);
        let overflow = || InvalidRequest::SizeOverflow { width, height, bytes_per_pixel, bits };
        let bytes = w.checked_mul(h).and_then(|p| p.checked_mul(bytes_per_pixel)).filter(|&b| b <= max_bytes).ok_or_else(overflow)?;
        let pixels = w * h; // cannot overflow: bytes did not
        if pixels > max_pixels {
            return Err(LimitExceeded::TooManyPixels { pixels, width, height, limit: max_pixels }.into());
        }
        let layout = usize::try_from(bytes).ok().and_then(|_| Layout::new(w as usize, h as usize, channels).ok()).ok_or_else(overflow)?;
        Ok(Self { layout, depth, format, width, height, bytes })
    }

    /// Bytes of pixel data this image has.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Attaches data, which must be exactly [`ImageShape::bytes`] long.
    pub fn with_data(self, data: Bytes) -> Result<PixelBuffer, RequestError> {
        if data.len() as u64 != self.bytes {
            return Err(InvalidRequest::LengthMismatch {
                actual: data.len(),
                expected: self.bytes,
                width: self.width,
                height: self.height,
                bytes_per_pixel: self.bytes / (self.width as u64 * self.height as u64),
                format: self.format.as_str_name().trim_start_matches("PIXEL_FORMAT_"),
            }
            .into());
        }
        Ok(PixelBuffer { layout: self.layout, depth: self.depth, format: self.format, data })
    }
}

/// Channels and sample depth of a (specified) pixel format.
fn format_shape(format: v1::PixelFormat) -> (usize, Depth) {
    use v1::PixelFormat as F;
    match format {
        F::Gray8 | F::Unspecified => (1, Depth::Eight),
        F::Graya8 => (2, Depth::Eight),
        F::Rgb8 => (3, Depth::Eight),
        F::Rgba8 => (4, Depth::Eight),
        F::Gray16 => (1, Depth::Sixteen),
        F::Rgb16 => (3, Depth::Sixteen),
        F::Rgba16 => (4, Depth::Sixteen),
    }
}

fn depth_bytes(depth: Depth) -> usize {
    match depth {
        Depth::Eight => 1,
        Depth::Sixteen => 2,
    }
}

/// Why a request was refused before any work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
}

impl From<RequestError> for super::ServiceError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Invalid(e) => Self::Invalid(e),
            RequestError::Limit(e) => Self::Limit(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(color: bool, w: i32, h: i32, len: usize) -> Option<NlImage> {
        Some(NlImage { color, width: w, height: h, data: Bytes::from(vec![7u8; len]) })
    }

    #[test]
    fn accepts_valid_legacy_images() {
        let b = PixelBuffer::from_legacy(legacy(true, 3, 2, 18), 100).unwrap();
        assert_eq!((b.layout().width(), b.layout().height(), b.layout().channels()), (3, 2, 3));
        assert!(PixelBuffer::from_legacy(legacy(false, 1, 1, 1), 100).is_ok());
    }

    #[test]
    fn refuses_missing_image() {
        assert_eq!(PixelBuffer::from_legacy(None, 100), Err(InvalidRequest::MissingImage.into()));
    }

    #[test]
    fn refuses_non_positive_dimensions_naming_the_field() {
        assert_eq!(
            PixelBuffer::from_legacy(legacy(false, 0, 2, 0), 100),
            Err(InvalidRequest::NonPositiveDimension { field: "width", value: 0 }.into())
        );
        assert_eq!(
            PixelBuffer::from_legacy(legacy(false, 2, -5, 0), 100),
            Err(InvalidRequest::NonPositiveDimension { field: "height", value: -5 }.into())
        );
    }

    #[test]
    fn refuses_length_mismatch_with_expected_and_actual() {
        let err = PixelBuffer::from_legacy(legacy(true, 4, 2, 23), 100).unwrap_err();
        assert_eq!(err.to_string(), "image data is 23 bytes, expected 24 (= 4 x 2 x 3 bytes per pixel for RGB8)");
    }

    #[test]
    fn refuses_legacy_sizes_beyond_int32() {
        let err = PixelBuffer::from_legacy(legacy(true, i32::MAX, i32::MAX, 0), u64::MAX).unwrap_err();
        assert!(matches!(err, RequestError::Invalid(InvalidRequest::SizeOverflow { bits: 32, .. })), "{err}");
    }

    #[test]
    fn refuses_v1_sizes_beyond_64_bits() {
        let image =
            v1::Image { format: v1::PixelFormat::Rgba16 as i32, width: u32::MAX, height: u32::MAX, data: Bytes::new(), encoded: None };
        let err = PixelBuffer::from_v1(Some(image), u64::MAX).unwrap_err();
        assert!(matches!(err, RequestError::Invalid(InvalidRequest::SizeOverflow { bits: 64, .. })), "{err}");
    }

    #[test]
    fn pixel_limit_is_checked_before_the_data_length() {
        let err = PixelBuffer::from_legacy(legacy(false, 11, 10, 0), 100).unwrap_err();
        assert_eq!(err, LimitExceeded::TooManyPixels { pixels: 110, width: 11, height: 10, limit: 100 }.into());
    }

    #[test]
    fn refuses_unspecified_and_unknown_formats() {
        let img = |format| Some(v1::Image { format, width: 1, height: 1, data: Bytes::from_static(&[0]), encoded: None });
        assert_eq!(PixelBuffer::from_v1(img(0), 10), Err(InvalidRequest::UnspecifiedFormat.into()));
        assert_eq!(PixelBuffer::from_v1(img(99), 10), Err(InvalidRequest::UnknownFormat { value: 99 }.into()));
    }

    #[test]
    fn sixteen_bit_formats_count_two_bytes_per_sample() {
        let image = v1::Image { format: v1::PixelFormat::Rgb16 as i32, width: 2, height: 1, data: Bytes::from(vec![0; 12]), encoded: None };
        let b = PixelBuffer::from_v1(Some(image), 10).unwrap();
        assert_eq!((b.depth(), b.layout().samples()), (Depth::Sixteen, 6));
    }
}
