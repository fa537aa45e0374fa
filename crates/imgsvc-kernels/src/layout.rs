//! Image geometry ([`Layout`]), rotation amounts ([`QuarterTurns`]) and the
//! error type shared by every kernel ([`ImagingError`]).

/// Everything that can go wrong when describing an image or handing buffers
/// to a kernel. Every message quotes the offending values and, where there is
/// one, the value that was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImagingError {
    /// Width, height or channel count is zero.
    #[error(
        "image dimensions must be non-zero: got width {width}, height {height}, channels {channels} \
         (expected width >= 1, height >= 1, channels 1..=4)"
    )]
    ZeroDimension { width: usize, height: usize, channels: usize },
    /// More than four interleaved channels.
    #[error("unsupported channel count {channels}: expected 1..=4")]
    TooManyChannels { channels: usize },
    /// `width * height * channels` does not fit in `usize`.
    #[error(
        "image size {width}x{height} with {channels} channels overflows usize \
         (width * height * channels must be <= {max})",
        max = usize::MAX
    )]
    SizeOverflow { width: usize, height: usize, channels: usize },
    /// The source buffer does not hold exactly `width * height * channels` samples.
    #[error("source buffer has {actual} samples, expected {expected} (width * height * channels)")]
    LengthMismatch { expected: usize, actual: usize },
    /// The destination buffer does not hold exactly the number of output samples.
    #[error("destination buffer has {actual} samples, expected {expected} (width * height * channels)")]
    DestinationLength { expected: usize, actual: usize },
    /// The caller's cancellation check said stop, between two bands of rows
    /// (the `_cancellable` forms); the output was dropped unfinished.
    #[error("the kernel was stopped between two bands of rows: its result is no longer wanted")]
    Cancelled,
    /// The requested instruction-set path cannot run on this CPU.
    #[error("kernel path {path} is not available on this CPU (available: {available})")]
    PathUnavailable { path: &'static str, available: String },
}

/// Geometry of an image buffer: `height` rows of `width` pixels, each pixel
/// `channels` interleaved samples, rows stored top to bottom with no padding.
///
/// Invariants (checked by [`Layout::new`]): `width >= 1`, `height >= 1`,
/// `1 <= channels <= 4`, and `width * height * channels` fits in `usize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    width: usize,
    height: usize,
    channels: usize,
}

impl Layout {
    /// Largest supported channel count.
    pub const MAX_CHANNELS: usize = 4;

    /// Validates and builds a layout.
    pub fn new(width: usize, height: usize, channels: usize) -> Result<Layout, ImagingError> {
        if width == 0 || height == 0 || channels == 0 {
            return Err(ImagingError::ZeroDimension { width, height, channels });
        }
        if channels > Self::MAX_CHANNELS {
            return Err(ImagingError::TooManyChannels { channels });
        }
        width.checked_mul(height).and_then(|p| p.checked_mul(channels)).ok_or(ImagingError::SizeOverflow { width, height, channels })?;
        Ok(Layout { width, height, channels })
    }

    /// Pixels per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Number of rows.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Interleaved samples per pixel (1..=4).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Number of pixels, `width * height`.
    pub fn pixels(&self) -> usize {
        self.width * self.height
    }

    /// Number of samples, `width * height * channels` (cannot overflow: checked in [`Layout::new`]).
    pub fn samples(&self) -> usize {
        self.width * self.height * self.channels
    }

    /// Samples per row, `width * channels`.
    pub fn row_samples(&self) -> usize {
        self.width * self.channels
    }

    /// Layout of the image after rotating by `turns`: width and height swap for odd turns.
    pub fn rotated(&self, turns: QuarterTurns) -> Layout {
        if turns.count() % 2 == 1 { Layout { width: self.height, height: self.width, channels: self.channels } } else { *self }
    }
}

/// A rotation by a multiple of 90 degrees, counter-clockwise:
/// [`QuarterTurns::One`] is 90° CCW, [`QuarterTurns::Three`] is 270° CCW (= 90° clockwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum QuarterTurns {
    #[default]
    Zero,
    One,
    Two,
    Three,
}

impl QuarterTurns {
    /// `n` quarter turns counter-clockwise, reduced mod 4 (negative `n` turns clockwise).
    pub fn from_count(n: i64) -> QuarterTurns {
        match n.rem_euclid(4) {
            0 => QuarterTurns::Zero,
            1 => QuarterTurns::One,
            2 => QuarterTurns::Two,
            _ => QuarterTurns::Three,
        }
    }

    /// Number of counter-clockwise quarter turns, 0..=3.
    pub fn count(self) -> u32 {
        match self {
            QuarterTurns::Zero => 0,
            QuarterTurns::One => 1,
            QuarterTurns::Two => 2,
            QuarterTurns::Three => 3,
        }
    }

    /// Rotation in degrees counter-clockwise: 0, 90, 180 or 270.
    pub fn degrees(self) -> u32 {
        self.count() * 90
    }

    /// Composition: rotating by `self` and then by `other`.
    pub fn then(self, other: QuarterTurns) -> QuarterTurns {
        QuarterTurns::from_count(i64::from(self.count() + other.count()))
    }

    /// The rotation that undoes `self`.
    pub fn inverse(self) -> QuarterTurns {
        QuarterTurns::from_count(-i64::from(self.count()))
    }
}
