//! Encoded image files ↔ raw pixels, for the client (files on disk) and the
//! service (encoded images in imgsvc.v1).
//!
//! What it does: detects the encoding from the content, decodes bounded
//! before allocation ([`DecodeLimits`]: the header's dimensions are checked
//! first, then the decoder runs under [`image::Limits`]), applies EXIF
//! orientation, selects a TIFF page, and encodes with the conversions each
//! format needs (saying what it converted). What it does not do: files,
//! gRPC, or choosing the limits — callers pass them in.
//!
//! Pixel modes are those imgsvc.v1 carries ([`v1::PixelFormat`]): 8-bit gray,
//! gray+alpha, RGB, RGBA and 16-bit gray, RGB, RGBA. A file in another mode
//! (16-bit gray+alpha, floating point, CMYK) decodes to RGBA16, RGB16 or RGB8.

use std::{borrow::Cow, io::Cursor};

use bytes::Bytes;
use image::{
    ColorType, DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader,
    codecs::{jpeg::JpegEncoder, webp::WebPEncoder},
    metadata::Orientation,
};
use thiserror::Error;

use crate::proto::v1::{self, PixelFormat};

/// Image file encodings imgsvc reads (all) and writes (all but GIF).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    Png,
    Jpeg,
    Tiff,
    WebP,
    Bmp,
    Gif,
}

impl Encoding {
    pub const ALL: [Encoding; 6] = [Self::Png, Self::Jpeg, Self::Tiff, Self::WebP, Self::Bmp, Self::Gif];

    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::Tiff => "TIFF",
            Self::WebP => "WebP",
            Self::Bmp => "BMP",
            Self::Gif => "GIF",
        }
    }

    /// The usual file extension (lower case, no dot).
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Tiff => "tif",
            Self::WebP => "webp",
            Self::Bmp => "bmp",
            Self::Gif => "gif",
        }
    }

    /// The encoding a file extension names (case-insensitive, no dot).
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "png" => Some(Self::Png),
            "jpg" | "jpeg" => Some(Self::Jpeg),
            "tif" | "tiff" => Some(Self::Tiff),
            "webp" => Some(Self::WebP),
            "bmp" => Some(Self::Bmp),
            "gif" => Some(Self::Gif),
            _ => None,
        }
    }

    /// GIF is read (first frame) but not written.
    pub fn can_encode(self) -> bool {
        self != Self::Gif
    }

    /// The widest and highest image the format can hold, if it has such a
    /// limit: WebP 16384 (14-bit dimensions minus one), JPEG 65535 (16-bit).
    pub fn max_side(self) -> Option<u32> {
        match self {
            Self::WebP => Some(16_384),
            Self::Jpeg => Some(65_535),
            _ => None,
        }
    }

    /// A `width`×`height` image can be written in this format?
    pub fn check_size(self, width: u32, height: u32) -> Result<(), CodecError> {
        match self.max_side() {
            Some(limit) if width > limit || height > limit => {
                Err(CodecError::TooLargeToEncode { encoding: self.name(), width, height, limit })
            }
            _ => Ok(()),
        }
    }

    fn image_format(self) -> ImageFormat {
        match self {
            Self::Png => ImageFormat::Png,
            Self::Jpeg => ImageFormat::Jpeg,
            Self::Tiff => ImageFormat::Tiff,
            Self::WebP => ImageFormat::WebP,
            Self::Bmp => ImageFormat::Bmp,
            Self::Gif => ImageFormat::Gif,
        }
    }

    /// The encoding of `data`, from its signature.
    pub fn detect(data: &[u8]) -> Result<Self, CodecError> {
        let format = image::guess_format(data).map_err(|_| CodecError::UnknownEncoding)?;
        Self::ALL.into_iter().find(|e| e.image_format() == format).ok_or(CodecError::UnknownEncoding)
    }
}

/// How much a decode may cost. Both are checked against the file's header
/// before the pixel buffer is allocated; `max_alloc_bytes` also bounds the
/// decoder's own allocations ([`image::Limits::max_alloc`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width × height.
    pub max_pixels: u64,
    /// Largest decoded size in bytes (the decoder's working memory included).
    pub max_alloc_bytes: u64,
}

/// What to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// `None`: detected from the content.
    pub encoding: Option<Encoding>,
    /// TIFF page, from 0. Must be 0 for other encodings.
    pub page: u32,
    pub limits: DecodeLimits,
}

/// JPEG quality used when none is asked for (the image crate's default).
pub const DEFAULT_JPEG_QUALITY: u8 = 75;

/// What to encode to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    pub encoding: Encoding,
    /// 1..=100, used by JPEG only.
    pub jpeg_quality: u8,
}

impl EncodeOptions {
    pub fn new(encoding: Encoding) -> Self {
        Self { encoding, jpeg_quality: DEFAULT_JPEG_QUALITY }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("the data is not an image in a known encoding (PNG, JPEG, TIFF, WebP, BMP or GIF)")]
    UnknownEncoding,
    /// `reason` is the decoder's own message: the only place it can reach a
    /// remote client is this error's text.
    #[error("the data is not a valid {encoding} image: {reason}")]
    Undecodable { encoding: &'static str, reason: String },
    #[error("the image is {width}x{height} ({pixels} pixels), over the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("decoding the {width}x{height} image needs {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge { width: u32, height: u32, bytes: u64, limit: u64 },
    #[error("decoding the {encoding} image needs more memory than the limit of {limit} bytes")]
    DecoderLimit { encoding: &'static str, limit: u64 },
    #[error("there is no page {page}: the TIFF has {pages} page(s), numbered from 0")]
    NoSuchPage { page: u32, pages: u32 },
    #[error("page {page} asked for, but only TIFF has pages (this is {encoding})")]
    NotPaged { encoding: &'static str, page: u32 },
    #[error("{encoding} is read, not written: choose PNG, JPEG, TIFF, WebP or BMP")]
    CannotEncode { encoding: &'static str },
    #[error("{encoding} cannot hold a {width}x{height} image: at most {limit} pixels wide and high")]
    TooLargeToEncode { encoding: &'static str, width: u32, height: u32, limit: u32 },
    #[error("JPEG quality must be 1..=100, got {0}")]
    Quality(u32),
    #[error("cannot encode the image as {encoding}: {reason}")]
    Encode { encoding: &'static str, reason: String },
    #[error("{width}x{height} {format} pixels do not match their data length")]
    Shape { format: &'static str, width: u32, height: u32 },
}

/// Uncompressed pixels as carried by imgsvc.v1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawImage {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub data: Bytes,
}

/// `GRAY8`, `RGBA16`, ...: a pixel format's name without its prefix.
pub fn format_name(format: PixelFormat) -> &'static str {
    format.as_str_name().trim_start_matches("PIXEL_FORMAT_")
}

/// Bytes per pixel of a v1 pixel format (0 for UNSPECIFIED).
pub fn bytes_per_pixel(format: PixelFormat) -> usize {
    use PixelFormat as F;
    match format {
        F::Unspecified => 0,
        F::Gray8 => 1,
        F::Graya8 | F::Gray16 => 2,
        F::Rgb8 => 3,
        F::Rgba8 => 4,
        F::Rgb16 => 6,
        F::Rgba16 => 8,
    }
}

impl RawImage {
    pub fn from_v1(img: v1::Image) -> Self {
        Self {
            format: PixelFormat::try_from(img.format).unwrap_or(PixelFormat::Unspecified),
            width: img.width,
            height: img.height,
            data: img.data,
        }
    }

    pub fn into_v1(self) -> v1::Image {
        v1::Image { format: self.format as i32, width: self.width, height: self.height, data: self.data, encoded: None }
    }

    /// Pixels of a decoded image, keeping its mode where v1 has one. The
    /// decoded buffer is handed over as it is (16-bit samples too: they are
    /// made little-endian in place), so only a mode v1 lacks is copied: the
    /// extra buffer [`conversion_bytes`] counts.
    pub fn from_dynamic(img: DynamicImage) -> Self {
        use PixelFormat as F;
        let (width, height) = (img.width(), img.height());
        let (format, data) = match img {
            DynamicImage::ImageLuma8(b) => (F::Gray8, Bytes::from(b.into_raw())),
            DynamicImage::ImageLumaA8(b) => (F::Graya8, Bytes::from(b.into_raw())),
            DynamicImage::ImageRgb8(b) => (F::Rgb8, Bytes::from(b.into_raw())),
            DynamicImage::ImageRgba8(b) => (F::Rgba8, Bytes::from(b.into_raw())),
            DynamicImage::ImageLuma16(b) => (F::Gray16, le16(b.into_raw())),
            DynamicImage::ImageRgb16(b) => (F::Rgb16, le16(b.into_raw())),
            DynamicImage::ImageRgba16(b) => (F::Rgba16, le16(b.into_raw())),
            DynamicImage::ImageRgb32F(_) => (F::Rgb16, le16(img.to_rgb16().into_raw())),
            other => (F::Rgba16, le16(other.to_rgba16().into_raw())),
        };
        Self { format, width, height, data }
    }

    pub fn to_dynamic(&self) -> Result<DynamicImage, CodecError> {
        use PixelFormat as F;
        let (w, h) = (self.width, self.height);
        let shape = || CodecError::Shape { format: format_name(self.format), width: w, height: h };
        let bytes = || self.data.to_vec();
        let u16s = || self.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<u16>>();
        Ok(match self.format {
            F::Gray8 => DynamicImage::ImageLuma8(image::ImageBuffer::from_raw(w, h, bytes()).ok_or_else(shape)?),
            F::Graya8 => DynamicImage::ImageLumaA8(image::ImageBuffer::from_raw(w, h, bytes()).ok_or_else(shape)?),
            F::Rgb8 => DynamicImage::ImageRgb8(image::ImageBuffer::from_raw(w, h, bytes()).ok_or_else(shape)?),
            F::Rgba8 => DynamicImage::ImageRgba8(image::ImageBuffer::from_raw(w, h, bytes()).ok_or_else(shape)?),
            F::Gray16 => DynamicImage::ImageLuma16(image::ImageBuffer::from_raw(w, h, u16s()).ok_or_else(shape)?),
            F::Rgb16 => DynamicImage::ImageRgb16(image::ImageBuffer::from_raw(w, h, u16s()).ok_or_else(shape)?),
            F::Rgba16 => DynamicImage::ImageRgba16(image::ImageBuffer::from_raw(w, h, u16s()).ok_or_else(shape)?),
            F::Unspecified => return Err(shape()),
        })
    }

    /// The same pixels in `to`, converted by the image crate (sRGB luma for
    /// RGB → gray, alpha dropped or made opaque, 16 ↔ 8 bit by scaling).
    pub fn convert(&self, to: PixelFormat) -> Result<Self, CodecError> {
        if to == self.format {
            return Ok(self.clone());
        }
        use PixelFormat as F;
        let img = self.to_dynamic()?;
        let converted = match to {
            F::Gray8 => DynamicImage::ImageLuma8(img.to_luma8()),
            F::Graya8 => DynamicImage::ImageLumaA8(img.to_luma_alpha8()),
            F::Rgb8 => DynamicImage::ImageRgb8(img.to_rgb8()),
            F::Rgba8 => DynamicImage::ImageRgba8(img.to_rgba8()),
            F::Gray16 => DynamicImage::ImageLuma16(img.to_luma16()),
            F::Rgb16 => DynamicImage::ImageRgb16(img.to_rgb16()),
            F::Rgba16 | F::Unspecified => DynamicImage::ImageRgba16(img.to_rgba16()),
        };
        Ok(Self::from_dynamic(converted))
    }
}

/// 16-bit samples as little-endian bytes without a copy: swapped in place
/// on a big-endian machine, then owned by the `Bytes` as they are.
fn le16(mut samples: Vec<u16>) -> Bytes {
    if cfg!(target_endian = "big") {
        samples.iter_mut().for_each(|s| *s = s.to_le());
    }
    Bytes::from_owner(Le16(samples))
}

struct Le16(Vec<u16>);

impl AsRef<[u8]> for Le16 {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The v1 mode a decoded image of `color` becomes ([`RawImage::from_dynamic`]).
fn v1_format(color: ColorType) -> PixelFormat {
    use PixelFormat as F;
    match color {
        ColorType::L8 => F::Gray8,
        ColorType::La8 => F::Graya8,
        ColorType::Rgb8 => F::Rgb8,
        ColorType::Rgba8 => F::Rgba8,
        ColorType::L16 => F::Gray16,
        ColorType::Rgb16 | ColorType::Rgb32F => F::Rgb16,
        _ => F::Rgba16,
    }
}

/// The buffer [`RawImage::from_dynamic`] allocates beside the decoded one
/// for `pixels` of `color`: none where v1 has the mode, else the converted
/// image (16-bit gray+alpha and floating point are converted).
fn conversion_bytes(color: ColorType, pixels: u64) -> u64 {
    match color {
        ColorType::L8 | ColorType::La8 | ColorType::Rgb8 | ColorType::Rgba8 | ColorType::L16 | ColorType::Rgb16 | ColorType::Rgba16 => 0,
        other => pixels * bytes_per_pixel(v1_format(other)) as u64,
    }
}

/// The least working memory a decoder is allowed besides its output buffer
/// (row buffers, the inflate window, tables): 1 MiB, or the decoded size
/// when that is larger.
pub const MIN_DECODER_WORKING_BYTES: u64 = 1 << 20;

/// What decoding a file holds in memory besides the file, from its header
/// alone ([`decode_cost`]): the decoded buffer, and after it each later
/// step (orientation, conversion) one buffer at a time, exactly; the
/// decoder's own working memory as an allowance (see `decoder_working`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeCost {
    /// The decoder's output buffer, in the file's own mode.
    pub decoded: u64,
    /// The raw image it becomes (in its v1 mode).
    pub image: u64,
    /// The most held at once: a copy of the file for a TIFF page after the
    /// first, the decoded buffer, and the largest of the decoder's working
    /// allowance, the copy an EXIF rotation by a quarter turn makes and the
    /// conversion to a v1 mode (they come one after the other).
    pub peak: u64,
}

impl DecodeCost {
    fn of(decoded: u64, color: ColorType, pixels: u64, orientation: Orientation, file_copy: u64) -> Self {
        let rotated = match orientation {
            Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH => decoded,
            _ => 0,
        };
        let converted = conversion_bytes(color, pixels);
        let image = if converted == 0 { decoded } else { converted };
        Self { decoded, image, peak: file_copy + decoded + decoder_working(decoded).max(rotated).max(converted) }
    }
}

/// The working memory a decoder of a `decoded`-byte image may allocate.
fn decoder_working(decoded: u64) -> u64 {
    decoded.max(MIN_DECODER_WORKING_BYTES)
}

/// The allocation limit a decoder of a `decoded`-byte image runs under
/// (before its output buffer is reserved from it): the output and the
/// working allowance charged for it, never above the server's limit.
///
/// image 0.25's TIFF decoder subtracts its output buffer from the limit a
/// second time (`TiffDecoder::set_limits` takes `total_bytes_buffer` off a
/// `max_alloc` that `Limits::reserve` has already reduced by it), which
/// left a 1 MB TIFF no room for its strip tables: for TIFF the output is
/// added once more, so that its strips get the same allowance.
fn decoder_alloc_limit(encoding: Encoding, decoded: u64, max_alloc_bytes: u64) -> u64 {
    let twice_reserved = if encoding == Encoding::Tiff { decoded } else { 0 };
    decoded.saturating_add(decoder_working(decoded)).saturating_add(twice_reserved).min(max_alloc_bytes.saturating_add(twice_reserved))
}

/// A decoded file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub image: RawImage,
    pub encoding: Encoding,
}

/// What a decoder that panicked on a file says (see [`decode`]).
pub const DECODER_PANICKED: &str = "the decoder failed on malformed data";

/// Decodes `data`: header first, limits checked, then the pixels, then the
/// EXIF orientation applied.
///
/// The decoders are third-party code that can panic on malformed files
/// (fuzzing found zune-jpeg 0.5.15 doing so in its AVX2 IDCT); such a file is
/// refused as undecodable like any other, so a caller sees INVALID_ARGUMENT
/// or a clear client error, never a crash or INTERNAL.
pub fn decode(data: &[u8], options: &DecodeOptions) -> Result<Decoded, CodecError> {
    std::panic::catch_unwind(|| decode_unguarded(data, options)).unwrap_or_else(|_| {
        let encoding = options.encoding.map_or_else(|| Encoding::detect(data), Ok)?;
        Err(CodecError::Undecodable { encoding: encoding.name(), reason: DECODER_PANICKED.into() })
    })
}

/// What decoding `data` costs in memory ([`DecodeCost`]), from its header
/// alone (checked against the limits as [`decode`] checks them): what to
/// charge to the memory budget before decoding. Cheap: no pixel is decoded.
pub fn decode_cost(data: &[u8], options: &DecodeOptions) -> Result<DecodeCost, CodecError> {
    std::panic::catch_unwind(|| {
        let (encoding, page) = page_data(data, options)?;
        let (reader, failed, _) = header_reader(&page, encoding, options.limits);
        let mut decoder = reader.into_decoder().map_err(failed)?;
        let decoded = checked_size(&decoder, options.limits)?;
        let (width, height) = decoder.dimensions();
        let color = decoder.color_type();
        let orientation = decoder.orientation().map_err(failed)?;
        let file_copy = if matches!(page, Cow::Owned(_)) { page.len() as u64 } else { 0 };
        Ok(DecodeCost::of(decoded, color, u64::from(width) * u64::from(height), orientation, file_copy))
    })
    .unwrap_or_else(|_| {
        let encoding = options.encoding.map_or_else(|| Encoding::detect(data), Ok)?;
        Err(CodecError::Undecodable { encoding: encoding.name(), reason: DECODER_PANICKED.into() })
    })
}

/// The encoding of `data`, and the bytes to decode (a TIFF page moved first).
fn page_data<'a>(data: &'a [u8], options: &DecodeOptions) -> Result<(Encoding, Cow<'a, [u8]>), CodecError> {
    let encoding = match options.encoding {
        Some(e) => e,
        None => Encoding::detect(data)?,
    };
    let data: Cow<'_, [u8]> = match (encoding, options.page) {
        (_, 0) => Cow::Borrowed(data),
        (Encoding::Tiff, page) => Cow::Owned(tiff_page(data, page)?),
        (other, page) => return Err(CodecError::NotPaged { encoding: other.name(), page }),
    };
    Ok((encoding, data))
}

/// A reader of `data` that reads the header under the allocation limit,
/// the mapping of its errors, and the limits it was given.
fn header_reader(
    data: &[u8],
    encoding: Encoding,
    limits: DecodeLimits,
) -> (ImageReader<Cursor<&[u8]>>, impl Fn(ImageError) -> CodecError + Copy + use<>, image::Limits) {
    let failed = move |e: ImageError| match e {
        ImageError::Limits(_) => CodecError::DecoderLimit { encoding: encoding.name(), limit: limits.max_alloc_bytes },
        other => CodecError::Undecodable { encoding: encoding.name(), reason: other.to_string() },
    };
    let mut reader = ImageReader::with_format(Cursor::new(data), encoding.image_format());
    let mut header_limits = image::Limits::default();
    header_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(header_limits.clone());
    (reader, failed, header_limits)
}

/// The header's dimensions and buffer size, checked against `limits`.
fn checked_size(decoder: &impl ImageDecoder, limits: DecodeLimits) -> Result<u64, CodecError> {
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(CodecError::TooManyPixels { width, height, pixels, limit: limits.max_pixels });
    }
    let bytes = decoder.total_bytes();
    if bytes > limits.max_alloc_bytes {
        return Err(CodecError::TooLarge { width, height, bytes, limit: limits.max_alloc_bytes });
    }
    Ok(bytes)
}

fn decode_unguarded(data: &[u8], options: &DecodeOptions) -> Result<Decoded, CodecError> {
    let limits = options.limits;
    let (encoding, data) = page_data(data, options)?;
    // Header only: the decoder is built (it reads the header) under the
    // allocation limit, and the dimensions are checked before any pixel
    // buffer exists.
    let (reader, failed, header_limits) = header_reader(&data, encoding, limits);
    let mut decoder = reader.into_decoder().map_err(failed)?;
    let bytes = checked_size(&decoder, limits)?;
    let alloc_limit = decoder_alloc_limit(encoding, bytes, limits.max_alloc_bytes);
    let (failed, header_limits) = if encoding == Encoding::Png {
        // image's PNG decoder takes its allocation limit when it is built
        // (its `set_limits` does not reach the png crate): built again,
        // under the bound, for the pixels.
        let (reader, failed, header_limits) = header_reader(&data, encoding, DecodeLimits { max_alloc_bytes: alloc_limit, ..limits });
        decoder = reader.into_decoder().map_err(failed)?;
        (failed, header_limits)
    } else {
        (failed, header_limits)
    };
    // The decoder runs under image::Limits set from what was charged for
    // it (`DecodeCost`): its output buffer plus its working allowance.
    // As `ImageReader::decode` does, the output buffer is reserved from the
    // allocation limit and the decoder gets what is left: the allowance.
    // The side limits make the decoder itself refuse anything larger than
    // we checked.
    let side = u32::try_from(limits.max_pixels).unwrap_or(u32::MAX);
    let mut decode_limits = header_limits;
    decode_limits.max_image_width = Some(side);
    decode_limits.max_image_height = Some(side);
    decode_limits.max_alloc = Some(alloc_limit);
    decode_limits.reserve(bytes).map_err(failed)?;
    decoder.set_limits(decode_limits).map_err(failed)?;
    let orientation = decoder.orientation().map_err(failed)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(failed)?;
    img.apply_orientation(orientation);
    Ok(Decoded { image: RawImage::from_dynamic(img), encoding })
}

/// The TIFF `data` with page `page` as its first page: the tiff decoder
/// walks the chain of image directories (bounded by the file, cycles
/// refused) to find the page's offset, and the header's first-directory
/// offset is pointed at it, so the image crate's decoder (all its colour
/// types, orientation and limits) decodes that page.
fn tiff_page(data: &[u8], page: u32) -> Result<Vec<u8>, CodecError> {
    let bad = |e: tiff::TiffError| CodecError::Undecodable { encoding: "TIFF", reason: e.to_string() };
    let mut decoder = tiff::decoder::Decoder::new(Cursor::new(data)).map_err(bad)?;
    for seen in 1..=page {
        if !decoder.more_images() {
            return Err(CodecError::NoSuchPage { page, pages: seen });
        }
        decoder.next_image().map_err(bad)?;
    }
    let offset = decoder.ifd_pointer().map(|p| p.0).ok_or(CodecError::NoSuchPage { page, pages: page })?;
    let little = data.starts_with(b"II");
    let mut out = data.to_vec();
    // Classic TIFF: magic 42 and a 32-bit offset at byte 4; BigTIFF: magic
    // 43 and a 64-bit offset at byte 8. The decoder has checked the header.
    let big = data.get(2..4) == Some(if little { &[43, 0] } else { &[0, 43] });
    if big {
        out[8..16].copy_from_slice(&if little { offset.to_le_bytes() } else { offset.to_be_bytes() });
    } else {
        let offset = u32::try_from(offset).map_err(|_| bad(tiff::TiffError::LimitsExceeded))?;
        out[4..8].copy_from_slice(&if little { offset.to_le_bytes() } else { offset.to_be_bytes() });
    }
    Ok(out)
}

/// The pixel format `encoding` stores `from` as: the same where it can, else
/// the nearest it holds.
pub fn stored_format(encoding: Encoding, from: PixelFormat) -> PixelFormat {
    use PixelFormat as F;
    match (encoding, from) {
        (Encoding::Jpeg, F::Gray8 | F::Graya8 | F::Gray16) => F::Gray8,
        (Encoding::Jpeg, _) => F::Rgb8,
        (Encoding::Tiff | Encoding::Bmp, F::Graya8) => F::Rgba8,
        (Encoding::WebP | Encoding::Bmp | Encoding::Gif, F::Gray16) => F::Gray8,
        (Encoding::WebP | Encoding::Bmp | Encoding::Gif, F::Rgb16) => F::Rgb8,
        (Encoding::WebP | Encoding::Bmp | Encoding::Gif, F::Rgba16) => F::Rgba8,
        (_, same) => same,
    }
}

/// An encoded image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub data: Vec<u8>,
    /// The pixel format that was encoded.
    pub format: PixelFormat,
    /// Says what was converted, if anything was.
    pub note: Option<String>,
}

/// Encodes `image` (WebP lossless, JPEG at the given quality), converting
/// first where the encoding cannot hold its pixel format.
pub fn encode(image: &RawImage, options: &EncodeOptions) -> Result<Encoded, CodecError> {
    let encoding = options.encoding;
    if !encoding.can_encode() {
        return Err(CodecError::CannotEncode { encoding: encoding.name() });
    }
    if !(1..=100).contains(&options.jpeg_quality) {
        return Err(CodecError::Quality(options.jpeg_quality.into()));
    }
    let to = stored_format(encoding, image.format);
    let note = (to != image.format).then(|| {
        let lost = if matches!(image.format, PixelFormat::Graya8 | PixelFormat::Rgba8 | PixelFormat::Rgba16)
            && matches!(to, PixelFormat::Gray8 | PixelFormat::Rgb8)
        {
            " (alpha dropped)"
        } else {
            ""
        };
        format!("{} cannot hold {}: converted it to {}{lost}", encoding.name(), format_name(image.format), format_name(to))
    });
    let img = image.convert(to)?.to_dynamic()?;
    let mut out = Cursor::new(Vec::new());
    let encoded = match encoding {
        Encoding::Jpeg => img.write_with_encoder(JpegEncoder::new_with_quality(&mut out, options.jpeg_quality)),
        Encoding::WebP => img.write_with_encoder(WebPEncoder::new_lossless(&mut out)),
        other => img.write_to(&mut out, other.image_format()),
    };
    encoded.map_err(|e| CodecError::Encode { encoding: encoding.name(), reason: e.to_string() })?;
    Ok(Encoded { data: out.into_inner(), format: to, note })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: DecodeLimits = DecodeLimits { max_pixels: 1 << 20, max_alloc_bytes: 64 << 20 };

    fn opts(page: u32) -> DecodeOptions {
        DecodeOptions { encoding: None, page, limits: ROOMY }
    }

    fn gradient(format: PixelFormat, width: u32, height: u32) -> RawImage {
        let len = (width * height) as usize * bytes_per_pixel(format);
        RawImage { format, width, height, data: (0..len).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>().into() }
    }

    /// The decoders run bounded by what is charged for them (output plus
    /// working allowance), and every lossless encoding of a 1 MB image
    /// (the TIFF the bound once refused among them) decodes within it.
    #[test]
    fn decoders_run_within_their_charged_allowance() {
        let (decoded, working) = (1_080_000u64, decoder_working(1_080_000));
        assert_eq!(decoder_alloc_limit(Encoding::Png, decoded, 64 << 20), decoded + working);
        assert_eq!(decoder_alloc_limit(Encoding::Tiff, decoded, 64 << 20), 2 * decoded + working, "TIFF's second subtraction made up");
        assert_eq!(decoder_alloc_limit(Encoding::Png, decoded, 1 << 20), 1 << 20, "never above the server's limit");
        for encoding in [Encoding::Png, Encoding::Tiff, Encoding::WebP, Encoding::Bmp] {
            for format in [PixelFormat::Rgb8, PixelFormat::Rgba16] {
                let img = gradient(format, 600, 600);
                let encoded = encode(&img, &EncodeOptions::new(encoding)).unwrap();
                let decoded = decode(&encoded.data, &opts(0)).unwrap_or_else(|e| panic!("{encoding:?} {format:?}: {e}"));
                assert_eq!((decoded.image.width, decoded.image.height), (600, 600), "{encoding:?} {format:?}");
            }
        }
    }

    /// What each lossless encoding gives back for each mode: the stored
    /// mode, or its RGB(A) form where the format has no gray (WebP, BMP).
    #[test]
    fn every_mode_round_trips_exactly_through_every_lossless_encoding() {
        use PixelFormat as F;
        let modes = [F::Gray8, F::Graya8, F::Rgb8, F::Rgba8, F::Gray16, F::Rgb16, F::Rgba16];
        let table: [(Encoding, [F; 7]); 4] = [
            (Encoding::Png, modes),
            (Encoding::Tiff, [F::Gray8, F::Rgba8, F::Rgb8, F::Rgba8, F::Gray16, F::Rgb16, F::Rgba16]),
            (Encoding::WebP, [F::Rgb8, F::Rgba8, F::Rgb8, F::Rgba8, F::Rgb8, F::Rgb8, F::Rgba8]),
            (Encoding::Bmp, [F::Rgb8, F::Rgba8, F::Rgb8, F::Rgba8, F::Rgb8, F::Rgb8, F::Rgba8]),
        ];
        for (encoding, decoded_modes) in table {
            for (mode, decoded_mode) in modes.into_iter().zip(decoded_modes) {
                let img = gradient(mode, 5, 3);
                let encoded = encode(&img, &EncodeOptions::new(encoding)).unwrap();
                let decoded = decode(&encoded.data, &opts(0)).unwrap();
                assert_eq!((decoded.encoding, decoded.image.format), (encoding, decoded_mode), "{encoding:?} {mode:?}");
                let want = img.convert(encoded.format).unwrap().convert(decoded_mode).unwrap();
                assert_eq!(decoded.image, want, "{encoding:?} {mode:?}");
            }
        }
    }

    #[test]
    fn jpeg_keeps_gray_or_rgb_within_a_small_error() {
        use PixelFormat as F;
        let flat = |format| {
            let per_pixel = if format == F::Gray8 { 1 } else { 3 };
            RawImage { format, width: 16, height: 16, data: vec![120u8; 256 * per_pixel].into() }
        };
        for mode in [F::Gray8, F::Rgb8] {
            let encoded = encode(&flat(mode), &EncodeOptions { encoding: Encoding::Jpeg, jpeg_quality: 90 }).unwrap();
            let decoded = decode(&encoded.data, &opts(0)).unwrap().image;
            assert_eq!(decoded.format, mode);
            assert!(decoded.data.iter().all(|&v| v.abs_diff(120) <= 2), "{mode:?}: {:?}", &decoded.data[..8]);
        }
    }

    #[test]
    fn detects_every_encoding_it_writes_and_refuses_unknown_data() {
        let img = gradient(PixelFormat::Rgb8, 3, 2);
        for encoding in Encoding::ALL.into_iter().filter(|e| e.can_encode()) {
            let data = encode(&img, &EncodeOptions::new(encoding)).unwrap().data;
            assert_eq!(Encoding::detect(&data), Ok(encoding));
        }
        assert_eq!(decode(b"hello, not an image", &opts(0)), Err(CodecError::UnknownEncoding));
    }

    #[test]
    fn stored_formats_say_what_each_encoding_converts() {
        use PixelFormat as F;
        assert_eq!(stored_format(Encoding::Png, F::Rgba16), F::Rgba16);
        assert_eq!(stored_format(Encoding::Jpeg, F::Graya8), F::Gray8);
        assert_eq!(stored_format(Encoding::Jpeg, F::Rgba16), F::Rgb8);
        assert_eq!(stored_format(Encoding::Tiff, F::Graya8), F::Rgba8);
        assert_eq!(stored_format(Encoding::Tiff, F::Rgb16), F::Rgb16);
        assert_eq!(stored_format(Encoding::WebP, F::Rgba16), F::Rgba8);
        assert_eq!(stored_format(Encoding::Bmp, F::Gray16), F::Gray8);
        assert_eq!(stored_format(Encoding::Bmp, F::Graya8), F::Rgba8);
    }

    #[test]
    fn conversion_note_names_both_formats_and_lost_alpha() {
        let note = encode(&gradient(PixelFormat::Rgba8, 2, 2), &EncodeOptions::new(Encoding::Jpeg)).unwrap().note;
        assert_eq!(note.as_deref(), Some("JPEG cannot hold RGBA8: converted it to RGB8 (alpha dropped)"));
        let note = encode(&gradient(PixelFormat::Rgb16, 2, 2), &EncodeOptions::new(Encoding::WebP)).unwrap().note;
        assert_eq!(note.as_deref(), Some("WebP cannot hold RGB16: converted it to RGB8"));
        assert_eq!(encode(&gradient(PixelFormat::Rgb16, 2, 2), &EncodeOptions::new(Encoding::Png)).unwrap().note, None);
    }

    #[test]
    fn refuses_gif_output_and_quality_out_of_range() {
        let img = gradient(PixelFormat::Gray8, 2, 2);
        assert_eq!(encode(&img, &EncodeOptions::new(Encoding::Gif)), Err(CodecError::CannotEncode { encoding: "GIF" }));
        let zero = EncodeOptions { encoding: Encoding::Jpeg, jpeg_quality: 0 };
        assert_eq!(encode(&img, &zero), Err(CodecError::Quality(0)));
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let data = encode(&gradient(PixelFormat::Gray8, 40, 30), &EncodeOptions::new(Encoding::Png)).unwrap().data;
        let tight = DecodeOptions { limits: DecodeLimits { max_pixels: 1000, max_alloc_bytes: 1 << 20 }, ..opts(0) };
        assert_eq!(decode(&data, &tight), Err(CodecError::TooManyPixels { width: 40, height: 30, pixels: 1200, limit: 1000 }));
        let small_alloc = DecodeOptions { limits: DecodeLimits { max_pixels: 1 << 20, max_alloc_bytes: 1000 }, ..opts(0) };
        assert_eq!(decode(&data, &small_alloc), Err(CodecError::TooLarge { width: 40, height: 30, bytes: 1200, limit: 1000 }));
    }

    #[test]
    fn a_file_the_decoder_panics_on_is_refused_as_undecodable() {
        let data = include_bytes!("../tests/fixtures/malformed-jpeg-decoder-panic.jpg");
        let err = decode(data, &opts(0)).unwrap_err();
        assert_eq!(err, CodecError::Undecodable { encoding: "JPEG", reason: DECODER_PANICKED.into() });
    }

    #[test]
    fn page_of_a_non_tiff_is_refused() {
        let data = encode(&gradient(PixelFormat::Gray8, 2, 2), &EncodeOptions::new(Encoding::Png)).unwrap().data;
        assert_eq!(decode(&data, &opts(1)), Err(CodecError::NotPaged { encoding: "PNG", page: 1 }));
    }

    #[test]
    fn wrong_declared_encoding_is_undecodable_naming_it() {
        let data = encode(&gradient(PixelFormat::Gray8, 2, 2), &EncodeOptions::new(Encoding::Png)).unwrap().data;
        let err = decode(&data, &DecodeOptions { encoding: Some(Encoding::Jpeg), ..opts(0) }).unwrap_err();
        assert!(matches!(&err, CodecError::Undecodable { encoding: "JPEG", .. }), "{err}");
        assert!(err.to_string().starts_with("the data is not a valid JPEG image: "), "{err}");
    }
}
