//! Reading image files into raw pixels and writing results, for the client.
//! Decoding and encoding are [`crate::imagefile`]'s; this module adds paths,
//! output formats from extensions, and atomic writes.

use std::path::Path;

use thiserror::Error;

pub use crate::imagefile::RawImage;
use crate::{
    config::RawLimits,
    imagefile::{self, CodecError, DecodeLimits, DecodeOptions, Decoded, EncodeOptions, Encoding},
    proto::{nlimage::NlImage, v1},
};

#[derive(Debug, Error)]
pub enum ImageFileError {
    #[error("cannot read image {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read image {path}")]
    Decode {
        path: String,
        #[source]
        source: CodecError,
    },
    #[error("cannot write {path}: unsupported output extension {ext:?} (use .png, .jpg, .jpeg, .tif, .tiff, .webp or .bmp, or --format)")]
    UnsupportedOutput { path: String, ext: String },
    #[error("cannot write {path}")]
    Encode {
        path: String,
        #[source]
        source: CodecError,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the client decodes at most: the server's default limits, so a file
/// the server would refuse is refused before it is decoded or sent.
pub fn client_decode_limits() -> DecodeLimits {
    let defaults = RawLimits::default();
    DecodeLimits { max_pixels: defaults.max_image_pixels, max_alloc_bytes: defaults.max_message_bytes as u64 }
}

impl RawImage {
    /// As a legacy NLImage. Call [`RawImage::for_legacy`] first.
    pub fn into_legacy(self) -> NlImage {
        NlImage { color: self.format == v1::PixelFormat::Rgb8, width: self.width as i32, height: self.height as i32, data: self.data }
    }

    /// Converts to a format the legacy API carries (GRAY8 or RGB8). Returns
    /// a note saying what was converted, if anything was.
    pub fn for_legacy(self) -> (Self, Option<String>) {
        use v1::PixelFormat as F;
        let from = self.format;
        let to = match from {
            F::Gray8 | F::Rgb8 => return (self, None),
            F::Graya8 | F::Gray16 => F::Gray8,
            _ => F::Rgb8,
        };
        let converted = self.convert(to).expect("a RawImage built by this module has a valid shape");
        let note = format!(
            "the legacy API carries GRAY8 and RGB8 only: converted {} to {}{}",
            imagefile::format_name(from),
            imagefile::format_name(to),
            if matches!(from, F::Graya8 | F::Rgba8 | F::Rgba16) { " (alpha dropped)" } else { "" }
        );
        (converted, Some(note))
    }
}

/// Decodes an image file (format from its content, first page, EXIF
/// orientation applied) within [`client_decode_limits`].
pub fn read_image(path: &Path) -> Result<RawImage, ImageFileError> {
    read_image_with(path, &DecodeOptions { encoding: None, page: 0, limits: client_decode_limits() }).map(|d| d.image)
}

/// Decodes an image file with explicit options (TIFF page, limits).
pub fn read_image_with(path: &Path, options: &DecodeOptions) -> Result<Decoded, ImageFileError> {
    let data = std::fs::read(path).map_err(|source| ImageFileError::Read { path: path.display().to_string(), source })?;
    imagefile::decode(&data, options).map_err(|source| ImageFileError::Decode { path: path.display().to_string(), source })
}

/// The output encoding named by `path`'s extension. Checked before any
/// work, so a bad output name costs no round trip.
pub fn output_format(path: &Path) -> Result<Encoding, ImageFileError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    Encoding::from_extension(&ext)
        .filter(|e| e.can_encode())
        .ok_or_else(|| ImageFileError::UnsupportedOutput { path: path.display().to_string(), ext })
}

/// Encodes `image` and writes it atomically to `path`. Returns a note if
/// the encoding forced a conversion (e.g. JPEG has no alpha and no 16 bits).
pub fn write_image(path: &Path, image: &RawImage, options: &EncodeOptions) -> Result<Option<String>, ImageFileError> {
    let encoded =
        imagefile::encode(image, options).map_err(|source| ImageFileError::Encode { path: path.display().to_string(), source })?;
    crate::fsutil::write_atomic(path, &encoded.data, 0o644)
        .map_err(|source| ImageFileError::Write { path: path.display().to_string(), source })?;
    Ok(encoded.note.map(|n| format!("{}: {n}", path.display())))
}
