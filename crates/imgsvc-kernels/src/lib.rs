//! Pure image kernels: rotation by quarter turns (counter-clockwise) and the
//! 3x3 edge-normalised mean filter, for 8-bit (`u8`) and 16-bit (`u16`)
//! images with 1 to 4 interleaved channels.
//!
//! This crate depends on nothing but `std`, `thiserror` and `rayon`: no I/O,
//! no async runtime, no logging. The workspace enforces that (docs/crates.md);
//! the service reaches it as `imgsvc::imaging`.
//!
//! # Buffers
//! An image is a slice of samples described by a [`Layout`]: `height` rows of
//! `width` pixels, each pixel `channels` interleaved samples, rows stored top
//! to bottom with no padding, so `len == width * height * channels`.
//!
//! Every operation has an allocating form ([`rotate`], [`mean_filter`]) and
//! an `_into` form writing into a caller-provided destination of exactly the
//! output length ([`rotate_into`], [`mean_filter_into`]). Both run one
//! implementation, which writes every output sample without reading the
//! destination: the allocating form hands it the new buffer uninitialised
//! (no zeroing pass, 25 MB of `memset` saved on a 4K RGB image). The hot
//! paths allocate nothing besides that output buffer (no heap scratch; the
//! AVX2 u8 mean kernel uses a 1 KiB stack buffer).
//!
//! # Semantics
//! * Rotation is counter-clockwise: for 90° (`QuarterTurns::One`) the output
//!   is `H` wide and `W` high and `out(x', y') = in(W-1-y', x')`.
//! * The mean filter averages each channel over the in-bounds pixels of the
//!   3x3 window (n = 9 inside, 6 on an edge, 4 at a corner; 3, 2 or 1 for
//!   images one pixel wide or high), rounding to nearest with halves up:
//!   `(sum + n/2) / n`. Sums are exact (`u16` accumulators for `u8`
//!   samples, `u32` for `u16` samples); divisions use multiply-and-shift
//!   constants that are verified exhaustively over every possible sum.
//!
//! [`reference`](mod@reference) has plain, obviously-correct loops implementing the same
//! definitions; the tests compare every fast path against it bit for bit.
//!
//! # Parallelism
//! The `_into_with` forms take a [`Parallelism`]. [`Parallelism::Auto`]
//! splits the output into row bands processed on the **current** rayon pool
//! (`rayon::current_num_threads`, `par_chunks_mut`), and only for images of
//! at least [`PARALLEL_MIN_PIXELS`] pixels (1 Mi pixel = 1024 x 1024);
//! smaller images, and [`Parallelism::Single`], always run on the calling
//! thread. The plain `_into` and allocating forms use `Auto`.
//!
//! Using the *current* pool is deliberate: the server runs kernels inside its
//! own rayon worker pool sized to the cores (`pool.install(..)`), so the
//! per-request parallelism of a large image and concurrent requests share the
//! same threads, with no oversubscription and no second pool. Called outside
//! any pool, `Auto` uses rayon's global pool. Output is identical whatever
//! the thread count: bands only partition the output rows.
//!
//! # Instruction-set paths
//! The portable kernels are plain Rust written for auto-vectorisation. On
//! x86_64 two more paths are selected at run time with
//! `is_x86_feature_detected!` ([`KernelPath::best`]):
//! * `Avx2`: 90°/270° rotation as 256-bit SIMD transposes of two K x K
//!   pixel blocks at a time (1-, 2-, 4- and 8-byte pixels, and 3-byte RGB
//!   pixels widened to 4 bytes with a byte shuffle), 180° as 48-byte
//!   `pshufb` reversals, and the u8 mean-filter interior in 16-bit lanes with
//!   a `mulhi` division. Outputs of at least 16 MiB with 16-byte aligned
//!   rows use streaming (non-temporal) stores for the transpose.
//! * `Avx512` (F, BW and VL): the same, with the 180° reversal of
//!   1/2/4/8-byte pixels on 512-bit vectors, GRAY8 90°/270° as four 16x16
//!   blocks (a whole 64-byte source line) per step in AVX-512VL's 32
//!   registers, the u8 mean filter as 512-bit column strips that slide down
//!   the rows keeping the horizontal sums in registers (each source row
//!   loaded once per strip, a `pmulhrsw` division; streaming stores for
//!   outputs of at least 16 MiB), and the portable code compiled with
//!   AVX-512BW enabled.
//!
//! u16 images use the portable mean filter (compiled per path) and the same
//! byte-level rotation kernels (a u16 pixel is 2 to 8 bytes).
//! [`available_paths`] lists what this CPU can run and the `_into_using`
//! forms run a chosen path, so tests check every path against
//! [`reference`](mod@reference). All `unsafe` code lives in the private `simd` submodule,
//! each block with a `// SAFETY:` comment.

mod layout;
mod mean;
pub mod reference;
mod rotate;
mod sample;
mod simd;

pub use layout::{ImagingError, Layout, QuarterTurns};
pub use sample::Sample;
pub use simd::{KernelPath, available_paths};

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Images with at least this many pixels (`width * height`) are split across
/// the current rayon pool under [`Parallelism::Auto`]; smaller ones run on
/// the calling thread (splitting them costs more than it saves and would only
/// add latency under concurrent load).
pub const PARALLEL_MIN_PIXELS: usize = 1 << 20;

/// Whether a kernel may split its work across the current rayon pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Parallelism {
    /// Always run on the calling thread.
    Single,
    /// Split into row bands on the current rayon pool when the image has at
    /// least [`PARALLEL_MIN_PIXELS`] pixels and the pool has more than one
    /// thread; otherwise run on the calling thread.
    #[default]
    Auto,
}

fn check_lengths<T>(src: &[T], layout: Layout, dst: &[T]) -> Result<(), ImagingError> {
    let expected = layout.samples();
    if src.len() != expected {
        return Err(ImagingError::LengthMismatch { expected, actual: src.len() });
    }
    if dst.len() != expected {
        return Err(ImagingError::DestinationLength { expected, actual: dst.len() });
    }
    Ok(())
}

fn check_src<T>(src: &[T], layout: Layout) -> Result<(), ImagingError> {
    if src.len() != layout.samples() {
        return Err(ImagingError::LengthMismatch { expected: layout.samples(), actual: src.len() });
    }
    Ok(())
}

/// Splits `dst` (`rows` rows of `row_len` samples, possibly uninitialised)
/// into bands of whole rows and calls `f(first_row, band)` for each, in
/// parallel on the current rayon pool when `parallel`, else once for the
/// whole buffer on this thread. The bands partition `dst`: every sample is
/// in exactly one band, and all calls have returned when this does.
/// Band heights are multiples of `row_align` (except the last), and every
/// band but the first starts `anchor` rows past such a multiple (the first
/// is longer by `anchor`).
fn for_each_band<T: Send>(
    dst: &mut [MaybeUninit<T>],
    row_len: usize,
    rows: usize,
    (row_align, anchor): (usize, usize),
    parallel: bool,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    if threads <= 1 || rows < 2 {
        f(0, dst);
        return;
    }
    // A few bands per thread so work stealing can even out a noisy core.
    let bands = threads * 4;
    let band_rows = rows.div_ceil(bands).next_multiple_of(row_align.max(1));
    let first = (anchor + band_rows).min(rows);
    let (head, rest) = dst.split_at_mut(first * row_len);
    rayon::join(
        || f(0, head),
        || rest.par_chunks_mut(band_rows * row_len).enumerate().for_each(|(i, band)| f(first + i * band_rows, band)),
    );
}

fn wants_parallel(layout: Layout, par: Parallelism) -> bool {
    par == Parallelism::Auto && layout.pixels() >= PARALLEL_MIN_PIXELS
}

/// Rotates counter-clockwise by `turns` into a new buffer
/// (layout of the result: `layout.rotated(turns)`). Uses [`Parallelism::Auto`].
pub fn rotate<T: Sample>(src: &[T], layout: Layout, turns: QuarterTurns) -> Result<Vec<T>, ImagingError> {
    check_src(src, layout)?;
    let path = KernelPath::best();
    Ok(simd::filled_vec(layout.samples(), |dst| rotate_uninit(path, src, layout, turns, dst, Parallelism::Auto)))
}

/// Rotates counter-clockwise by `turns` into `dst`, which must have exactly
/// `layout.samples()` samples; its layout is `layout.rotated(turns)`.
/// Uses [`Parallelism::Auto`].
pub fn rotate_into<T: Sample>(src: &[T], layout: Layout, turns: QuarterTurns, dst: &mut [T]) -> Result<(), ImagingError> {
    rotate_into_with(src, layout, turns, dst, Parallelism::Auto)
}

/// [`rotate_into`] with explicit [`Parallelism`].
pub fn rotate_into_with<T: Sample>(
    src: &[T],
    layout: Layout,
    turns: QuarterTurns,
    dst: &mut [T],
    par: Parallelism,
) -> Result<(), ImagingError> {
    rotate_into_using(KernelPath::best(), src, layout, turns, dst, par)
}

/// [`rotate_into_with`] on a chosen instruction-set path (for tests and
/// benchmarks). Fails with [`ImagingError::PathUnavailable`] if this CPU
/// cannot run `path`.
pub fn rotate_into_using<T: Sample>(
    path: KernelPath,
    src: &[T],
    layout: Layout,
    turns: QuarterTurns,
    dst: &mut [T],
    par: Parallelism,
) -> Result<(), ImagingError> {
    check_lengths(src, layout, dst)?;
    path.check()?;
    rotate_uninit(path, src, layout, turns, simd::as_uninit(dst), par);
    Ok(())
}

/// Every rotation form's implementation: writes every sample of `dst`
/// (`layout.samples()` long, possibly uninitialised) on `path` (available).
fn rotate_uninit<T: Sample>(
    path: KernelPath,
    src: &[T],
    layout: Layout,
    turns: QuarterTurns,
    dst: &mut [MaybeUninit<T>],
    par: Parallelism,
) {
    let out = layout.rotated(turns);
    // Rotation only moves whole pixels, so it works on raw bytes: a pixel is
    // `channels * size_of::<T>()` bytes (1, 2, 3, 4, 6 or 8).
    let src_b = simd::as_bytes(src);
    let dst_b = simd::as_bytes_uninit(dst);
    let px = layout.channels() * size_of::<T>();
    let (w, h) = (layout.width(), layout.height());
    // Bands start where the SIMD groups are line-aligned, so each band has
    // no extra overlapping group at its start.
    let anchor = simd::rotate_band_anchor(path, px, src_b, w, h, turns) % rotate::BAND_ROW_ALIGN;
    for_each_band(dst_b, out.width() * px, out.height(), (rotate::BAND_ROW_ALIGN, anchor), wants_parallel(layout, par), |row0, band| {
        simd::rotate_band(path, px, src_b, w, h, turns, band, row0)
    });
}

/// 3x3 mean filter into a new buffer (same layout). Uses [`Parallelism::Auto`].
pub fn mean_filter<T: Sample>(src: &[T], layout: Layout) -> Result<Vec<T>, ImagingError> {
    check_src(src, layout)?;
    let path = KernelPath::best();
    Ok(simd::filled_vec(layout.samples(), |dst| mean_filter_uninit(path, src, layout, dst, Parallelism::Auto)))
}

/// 3x3 mean filter into `dst` (exactly `layout.samples()` samples, same
/// layout). Uses [`Parallelism::Auto`].
pub fn mean_filter_into<T: Sample>(src: &[T], layout: Layout, dst: &mut [T]) -> Result<(), ImagingError> {
    mean_filter_into_with(src, layout, dst, Parallelism::Auto)
}

/// [`mean_filter_into`] with explicit [`Parallelism`].
pub fn mean_filter_into_with<T: Sample>(src: &[T], layout: Layout, dst: &mut [T], par: Parallelism) -> Result<(), ImagingError> {
    mean_filter_into_using(KernelPath::best(), src, layout, dst, par)
}

/// [`mean_filter_into_with`] on a chosen instruction-set path (for tests and
/// benchmarks). Fails with [`ImagingError::PathUnavailable`] if this CPU
/// cannot run `path`.
pub fn mean_filter_into_using<T: Sample>(
    path: KernelPath,
    src: &[T],
    layout: Layout,
    dst: &mut [T],
    par: Parallelism,
) -> Result<(), ImagingError> {
    check_lengths(src, layout, dst)?;
    path.check()?;
    mean_filter_uninit(path, src, layout, simd::as_uninit(dst), par);
    Ok(())
}

/// Every mean-filter form's implementation: writes every sample of `dst`
/// (`layout.samples()` long, possibly uninitialised) on `path` (available).
fn mean_filter_uninit<T: Sample>(path: KernelPath, src: &[T], layout: Layout, dst: &mut [MaybeUninit<T>], par: Parallelism) {
    for_each_band(dst, layout.row_samples(), layout.height(), (1, 0), wants_parallel(layout, par), |row0, band| {
        simd::mean_band(path, src, layout, band, row0)
    });
}
