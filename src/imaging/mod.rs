//! Pure image kernels over pixel slices. Interim plain version.
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImagingError {
    #[error("image dimensions must be at least 1x1, got {width}x{height}")]
    ZeroDimension { width: usize, height: usize },
    #[error("images have 1 to 4 channels, got {channels}")]
    TooManyChannels { channels: usize },
    #[error("{width}x{height}x{channels} samples overflow the address space")]
    SizeOverflow { width: usize, height: usize, channels: usize },
    #[error("expected {expected} samples, got {actual}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("destination holds {actual} samples, expected {expected}")]
    DestinationLength { expected: usize, actual: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout { width: usize, height: usize, channels: usize }

impl Layout {
    pub fn new(width: usize, height: usize, channels: usize) -> Result<Self, ImagingError> {
        if width == 0 || height == 0 { return Err(ImagingError::ZeroDimension { width, height }); }
        if !(1..=4).contains(&channels) { return Err(ImagingError::TooManyChannels { channels }); }
        width.checked_mul(height).and_then(|p| p.checked_mul(channels))
            .ok_or(ImagingError::SizeOverflow { width, height, channels })?;
        Ok(Self { width, height, channels })
    }
    pub fn width(&self) -> usize { self.width }
    pub fn height(&self) -> usize { self.height }
    pub fn channels(&self) -> usize { self.channels }
    pub fn samples(&self) -> usize { self.width * self.height * self.channels }
    pub fn rotated(&self, turns: QuarterTurns) -> Layout {
        match turns { QuarterTurns::One | QuarterTurns::Three => Layout { width: self.height, height: self.width, ..*self }, _ => *self }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuarterTurns { Zero, One, Two, Three }
impl QuarterTurns {
    pub fn from_count(n: u32) -> Self { match n % 4 { 0 => Self::Zero, 1 => Self::One, 2 => Self::Two, _ => Self::Three } }
    pub fn count(self) -> u32 { self as u32 }
    pub fn then(self, other: Self) -> Self { Self::from_count(self.count() + other.count()) }
}

pub trait Sample: Copy + Send + Sync + 'static + Into<u32> + TryFrom<u32> {}
impl Sample for u8 {}
impl Sample for u16 {}

pub enum Parallelism { Single, Auto }

fn check<T>(src: &[T], layout: Layout, dst: &[T]) -> Result<(), ImagingError> {
    if src.len() != layout.samples() { return Err(ImagingError::LengthMismatch { expected: layout.samples(), actual: src.len() }); }
    if dst.len() != layout.samples() { return Err(ImagingError::DestinationLength { expected: layout.samples(), actual: dst.len() }); }
    Ok(())
}

pub fn rotate_into<T: Sample>(src: &[T], layout: Layout, turns: QuarterTurns, dst: &mut [T]) -> Result<(), ImagingError> {
    check(src, layout, dst)?;
    let (w, h, c) = (layout.width, layout.height, layout.channels);
    let out = layout.rotated(turns);
    for y in 0..h { for x in 0..w {
        let (ox, oy) = match turns { QuarterTurns::Zero => (x, y), QuarterTurns::One => (y, w - 1 - x), QuarterTurns::Two => (w - 1 - x, h - 1 - y), QuarterTurns::Three => (h - 1 - y, x) };
        let s = (y * w + x) * c; let d = (oy * out.width + ox) * c;
        dst[d..d + c].copy_from_slice(&src[s..s + c]);
    }}
    Ok(())
}
pub fn rotate<T: Sample + Default>(src: &[T], layout: Layout, turns: QuarterTurns) -> Result<Vec<T>, ImagingError> {
    let mut dst = vec![T::default(); layout.samples()]; rotate_into(src, layout, turns, &mut dst)?; Ok(dst)
}
pub fn mean_filter_into<T: Sample>(src: &[T], layout: Layout, dst: &mut [T]) -> Result<(), ImagingError> {
    check(src, layout, dst)?;
    let (w, h, c) = (layout.width as isize, layout.height as isize, layout.channels);
    for y in 0..h { for x in 0..w { for ch in 0..c {
        let (mut sum, mut n) = (0u32, 0u32);
        for dy in -1..=1 { for dx in -1..=1 { let (xx, yy) = (x + dx, y + dy);
            if xx >= 0 && yy >= 0 && xx < w && yy < h { sum += src[((yy * w + xx) as usize) * c + ch].into(); n += 1; } } }
        dst[((y * w + x) as usize) * c + ch] = T::try_from((sum + n / 2) / n).ok().expect("mean of samples fits a sample");
    }}}
    Ok(())
}
pub fn mean_filter<T: Sample + Default>(src: &[T], layout: Layout) -> Result<Vec<T>, ImagingError> {
    let mut dst = vec![T::default(); layout.samples()]; mean_filter_into(src, layout, &mut dst)?; Ok(dst)
}

/// Plain oracle kernels.
pub mod reference {
    use super::*;
    pub fn rotate<T: Sample + Default>(src: &[T], layout: Layout, turns: QuarterTurns) -> Vec<T> {
        super::rotate(src, layout, turns).expect("valid layout")
    }
    pub fn mean_filter<T: Sample + Default>(src: &[T], layout: Layout) -> Vec<T> {
        super::mean_filter(src, layout).expect("valid layout")
    }
}
