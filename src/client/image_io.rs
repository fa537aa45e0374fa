//! Reading image files into raw pixels and writing results, for the client.

use std::path::Path;

use bytes::Bytes;
use image::{DynamicImage, ImageFormat};
use thiserror::Error;

use crate::proto::{nlimage::NlImage, v1};

#[derive(Debug, Error)]
pub enum ImageFileError {
    #[error("cannot read image {path}")]
    Read { path: String, #[source] source: image::ImageError },
    #[error("cannot write {path}: unsupported output extension {ext:?} (use .png, .jpg or .jpeg)")]
    UnsupportedOutput { path: String, ext: String },
    #[error("cannot encode the result as {format:?}")]
    Encode { format: ImageFormat, #[source] source: image::ImageError },
    #[error("cannot write {path}")]
    Write { path: String, #[source] source: std::io::Error },
    #[error("the result is not a valid {format} image of {width}x{height}")]
    Shape { format: &'static str, width: u32, height: u32 },
}

/// Uncompressed pixels as carried by imgsvc.v1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawImage {
    pub format: v1::PixelFormat,
    pub width: u32,
    pub height: u32,
    pub data: Bytes,
}

impl RawImage {
    pub fn from_v1(img: v1::Image) -> Self {
        Self {
            format: v1::PixelFormat::try_from(img.format).unwrap_or(v1::PixelFormat::Unspecified),
            width: img.width,
            height: img.height,
            data: img.data,
        }
    }

    pub fn into_v1(self) -> v1::Image {
        v1::Image { format: self.format as i32, width: self.width, height: self.height, data: self.data }
    }

    /// As a legacy NLImage. Call [`RawImage::for_legacy`] first.
    pub fn into_legacy(self) -> NlImage {
        NlImage {
            color: self.format == v1::PixelFormat::Rgb8,
            width: self.width as i32,
            height: self.height as i32,
            data: self.data,
        }
    }

    /// Converts to a format the legacy API carries (GRAY8 or RGB8). Returns
    /// a note saying what was converted, if anything was.
    pub fn for_legacy(self) -> (Self, Option<String>) {
        use v1::PixelFormat as F;
        match self.format {
            F::Gray8 | F::Rgb8 => (self, None),
            from => {
                let img = self.to_dynamic().expect("a RawImage built by this module has a valid shape");
                let gray = matches!(from, F::Graya8 | F::Gray16);
                let converted = if gray { DynamicImage::ImageLuma8(img.to_luma8()) } else { DynamicImage::ImageRgb8(img.to_rgb8()) };
                let to = if gray { "GRAY8" } else { "RGB8" };
                let note = format!(
                    "the legacy API carries GRAY8 and RGB8 only: converted {} to {to}{}",
                    from.as_str_name().trim_start_matches("PIXEL_FORMAT_"),
                    if matches!(from, F::Graya8 | F::Rgba8 | F::Rgba16) { " (alpha dropped)" } else { "" }
                );
                (Self::from_dynamic(converted), Some(note))
            }
        }
    }

    /// Pixels of a decoded image, keeping its mode where v1 has one.
    pub fn from_dynamic(img: DynamicImage) -> Self {
        use v1::PixelFormat as F;
        let (width, height) = (img.width(), img.height());
        let le16 = |samples: &[u16]| Bytes::from(samples.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>());
        let (format, data) = match img {
            DynamicImage::ImageLuma8(b) => (F::Gray8, Bytes::from(b.into_raw())),
            DynamicImage::ImageLumaA8(b) => (F::Graya8, Bytes::from(b.into_raw())),
            DynamicImage::ImageRgb8(b) => (F::Rgb8, Bytes::from(b.into_raw())),
            DynamicImage::ImageRgba8(b) => (F::Rgba8, Bytes::from(b.into_raw())),
            DynamicImage::ImageLuma16(b) => (F::Gray16, le16(b.as_raw())),
            DynamicImage::ImageRgb16(b) => (F::Rgb16, le16(b.as_raw())),
            other => (F::Rgba16, le16(other.to_rgba16().as_raw())),
        };
        Self { format, width, height, data }
    }

    pub fn to_dynamic(&self) -> Result<DynamicImage, ImageFileError> {
        use v1::PixelFormat as F;
        let (w, h) = (self.width, self.height);
        let shape = |format| ImageFileError::Shape { format, width: w, height: h };
        let bytes = self.data.to_vec();
        let u16s = || self.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<u16>>();
        Ok(match self.format {
            F::Gray8 => DynamicImage::ImageLuma8(image::ImageBuffer::from_raw(w, h, bytes).ok_or(shape("GRAY8"))?),
            F::Graya8 => DynamicImage::ImageLumaA8(image::ImageBuffer::from_raw(w, h, bytes).ok_or(shape("GRAYA8"))?),
            F::Rgb8 => DynamicImage::ImageRgb8(image::ImageBuffer::from_raw(w, h, bytes).ok_or(shape("RGB8"))?),
            F::Rgba8 => DynamicImage::ImageRgba8(image::ImageBuffer::from_raw(w, h, bytes).ok_or(shape("RGBA8"))?),
            F::Gray16 => DynamicImage::ImageLuma16(image::ImageBuffer::from_raw(w, h, u16s()).ok_or(shape("GRAY16"))?),
            F::Rgb16 => DynamicImage::ImageRgb16(image::ImageBuffer::from_raw(w, h, u16s()).ok_or(shape("RGB16"))?),
            F::Rgba16 => DynamicImage::ImageRgba16(image::ImageBuffer::from_raw(w, h, u16s()).ok_or(shape("RGBA16"))?),
            F::Unspecified => return Err(shape("UNSPECIFIED")),
        })
    }
}

/// Decodes an image file (format from its content).
pub fn read_image(path: &Path) -> Result<RawImage, ImageFileError> {
    let read_err = |source| ImageFileError::Read { path: path.display().to_string(), source };
    let img = image::ImageReader::open(path)
        .map_err(|e| read_err(image::ImageError::IoError(e)))?
        .with_guessed_format()
        .map_err(|e| read_err(image::ImageError::IoError(e)))?
        .decode()
        .map_err(read_err)?;
    Ok(RawImage::from_dynamic(img))
}

/// The output format named by `path`'s extension. Checked before any work,
/// so a bad output name costs no round trip.
pub fn output_format(path: &Path) -> Result<ImageFormat, ImageFileError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => Ok(ImageFormat::Png),
        "jpg" | "jpeg" => Ok(ImageFormat::Jpeg),
        _ => Err(ImageFileError::UnsupportedOutput { path: path.display().to_string(), ext }),
    }
}

/// Encodes `image` in `format` and writes it atomically to `path`. Returns a
/// note if the format forced a conversion (JPEG has no alpha and no 16 bits).
pub fn write_image(path: &Path, image: &RawImage, format: ImageFormat) -> Result<Option<String>, ImageFileError> {
    let mut img = image.to_dynamic()?;
    let mut note = None;
    if format == ImageFormat::Jpeg && !matches!(img, DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_)) {
        let gray = matches!(img, DynamicImage::ImageLumaA8(_) | DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA16(_));
        img = if gray { DynamicImage::ImageLuma8(img.to_luma8()) } else { DynamicImage::ImageRgb8(img.to_rgb8()) };
        note = Some(format!("JPEG holds 8-bit gray or RGB only: converted the result for {}", path.display()));
    }
    let mut encoded = std::io::Cursor::new(Vec::new());
    img.write_to(&mut encoded, format).map_err(|source| ImageFileError::Encode { format, source })?;
    crate::fsutil::write_atomic(path, encoded.get_ref(), 0o644)
        .map_err(|source| ImageFileError::Write { path: path.display().to_string(), source })?;
    Ok(note)
}
