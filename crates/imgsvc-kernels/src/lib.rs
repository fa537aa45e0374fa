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
//! # Cancellation
//! [`rotate_cancellable`] and [`mean_filter_cancellable`] ask a [`Cancel`]
//! check before each band of rows and stop with [`ImagingError::Cancelled`]
//! once it says so; the unfinished output is dropped. Run on one thread,
//! the image is cut into bands of about [`CANCEL_BAND_SAMPLES`] samples for
//! that (whole rows; output identical, as with any bands); split across a
//! pool, each of its bands asks. The check runs once per band, not per
//! row or pixel, so it costs nothing measurable.
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

/// What a cancellable kernel tells its caller about each band of rows, on
/// the thread that runs the band (one of the pool's threads when the
/// kernel is split across them): before it, whether the result is still
/// wanted; after it, that it ran (for a caller that accounts the CPU time
/// of bands run on other threads). A `Fn() -> bool` closure is a
/// [`Bands`] that only answers the first question.
pub trait Bands: Sync {
    /// Asked before a band: `true` stops the kernel ([`ImagingError::Cancelled`]).
    fn cancelled(&self) -> bool;
    /// Called after a band ran, on the thread that ran it.
    fn band_done(&self) {}
}

impl<F: Fn() -> bool + Sync> Bands for F {
    fn cancelled(&self) -> bool {
        self()
    }
}

/// The [`Bands`] a cancellable kernel is given.
pub type Cancel<'a> = &'a dyn Bands;

/// Run on one thread, a cancellable kernel asks its [`Cancel`] check about
/// every this many output samples (whole rows: at least
/// [`CANCEL_BAND_MIN_ROWS`], and a multiple of the kernel's band alignment).
/// Each cut costs the mean filter two source rows read again (its window):
/// under 1 % of its reads for rows up to 4096 samples, at most 3 % for
/// wider ones; rotation reads nothing twice.
pub const CANCEL_BAND_SAMPLES: usize = 1 << 20;

/// The fewest rows of a band cut for cancellation (see [`CANCEL_BAND_SAMPLES`]).
pub const CANCEL_BAND_MIN_ROWS: usize = 64;

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

/// [`for_each_band`] that asks `cancel` before each band and skips the
/// bands not yet begun once it says stop; false then (some bands are
/// unwritten). On one thread the rows are cut into bands of about
/// [`CANCEL_BAND_SAMPLES`] samples, keeping `row_align` and `anchor`.
fn for_each_band_until<T: Send>(
    dst: &mut [MaybeUninit<T>],
    row_len: usize,
    rows: usize,
    (row_align, anchor): (usize, usize),
    parallel: bool,
    cancel: Cancel<'_>,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> bool {
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let guarded = |row0: usize, band: &mut [MaybeUninit<T>]| {
        if stopped.load(std::sync::atomic::Ordering::Relaxed) || cancel.cancelled() {
            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        f(row0, band);
        cancel.band_done();
    };
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    if threads > 1 && rows >= 2 {
        for_each_band(dst, row_len, rows, (row_align, anchor), true, guarded);
        return !stopped.into_inner();
    }
    let align = row_align.max(1);
    let band_rows = (CANCEL_BAND_SAMPLES / row_len.max(1)).max(CANCEL_BAND_MIN_ROWS).next_multiple_of(align);
    let mut row0 = 0;
    let mut rest = dst;
    while row0 < rows {
        let end = if row0 == 0 { (anchor + band_rows).min(rows) } else { (row0 + band_rows).min(rows) };
        let (band, tail) = rest.split_at_mut((end - row0) * row_len);
        guarded(row0, band);
        if stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        (row0, rest) = (end, tail);
    }
    true
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

/// [`rotate`] that asks `cancel` before each band of rows and stops with
/// [`ImagingError::Cancelled`] once it returns true (see the crate's
/// Cancellation section).
pub fn rotate_cancellable<T: Sample>(src: &[T], layout: Layout, turns: QuarterTurns, cancel: Cancel<'_>) -> Result<Vec<T>, ImagingError> {
    check_src(src, layout)?;
    let path = KernelPath::best();
    let out = layout.rotated(turns);
    let (src_b, px, w, h) = (simd::as_bytes(src), layout.channels() * size_of::<T>(), layout.width(), layout.height());
    let anchor = simd::rotate_band_anchor(path, px, src_b, w, h, turns) % rotate::BAND_ROW_ALIGN;
    let parallel = wants_parallel(layout, Parallelism::Auto);
    simd::filled_vec_until(layout.samples(), |dst: &mut [MaybeUninit<T>]| {
        let dst_b = simd::as_bytes_uninit(dst);
        for_each_band_until(dst_b, out.width() * px, out.height(), (rotate::BAND_ROW_ALIGN, anchor), parallel, cancel, |row0, band| {
            simd::rotate_band(path, px, src_b, w, h, turns, band, row0)
        })
    })
    .ok_or(ImagingError::Cancelled)
}

/// 3x3 mean filter into a new buffer (same layout). Uses [`Parallelism::Auto`].
pub fn mean_filter<T: Sample>(src: &[T], layout: Layout) -> Result<Vec<T>, ImagingError> {
    check_src(src, layout)?;
    let path = KernelPath::best();
    Ok(simd::filled_vec(layout.samples(), |dst| mean_filter_uninit(path, src, layout, dst, Parallelism::Auto)))
}

/// [`mean_filter`] that asks `cancel` before each band of rows and stops
/// with [`ImagingError::Cancelled`] once it returns true (see the crate's
/// Cancellation section).
pub fn mean_filter_cancellable<T: Sample>(src: &[T], layout: Layout, cancel: Cancel<'_>) -> Result<Vec<T>, ImagingError> {
    check_src(src, layout)?;
    let path = KernelPath::best();
    let parallel = wants_parallel(layout, Parallelism::Auto);
    simd::filled_vec_until(layout.samples(), |dst| {
        for_each_band_until(dst, layout.row_samples(), layout.height(), (1, 0), parallel, cancel, |row0, band| {
            simd::mean_band(path, src, layout, band, row0)
        })
    })
    .ok_or(ImagingError::Cancelled)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A check that says stop from its `n + 1`th question on, counting them.
    fn stop_after(n: usize, asked: &AtomicUsize) -> impl Fn() -> bool + Sync + '_ {
        move || asked.fetch_add(1, Ordering::Relaxed) >= n
    }

    fn image(width: usize, height: usize, channels: usize) -> (Vec<u8>, Layout) {
        let layout = Layout::new(width, height, channels).unwrap();
        ((0..layout.samples()).map(|i| (i * 31 % 251) as u8).collect(), layout)
    }

    #[test]
    fn a_cancel_after_the_first_band_stops_the_mean_filter_there() {
        // 3 million samples on one thread (below PARALLEL_MIN_PIXELS pixels,
        // so not split across a pool): three bands of 349 rows.
        let (src, layout) = image(1000, 1000, 3);
        assert!(layout.pixels() < PARALLEL_MIN_PIXELS);
        let asked = AtomicUsize::new(0);
        assert_eq!(mean_filter_cancellable(&src, layout, &stop_after(1, &asked)), Err(ImagingError::Cancelled));
        assert_eq!(asked.load(Ordering::Relaxed), 2, "asked before the first band (go on) and the second (stop), then never again");
        let asked = AtomicUsize::new(0);
        assert_eq!(rotate_cancellable(&src, layout, QuarterTurns::One, &stop_after(1, &asked)), Err(ImagingError::Cancelled));
        assert_eq!(asked.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_check_that_never_says_stop_gives_the_plain_kernels_output_for_every_band_cut() {
        // Widths that leave a short last band, rows longer than a band
        // (bands of 64 rows), an image of one band.
        // On one thread (a pool of one), whatever the image's size.
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        for (w, h, c) in [(1024, 1024, 3), (517, 2999, 1), (1 << 16, 130, 1), (1 << 20, 3, 1), (1500, 1400, 4)] {
            let (src, layout) = image(w, h, c);
            let asked = AtomicUsize::new(0);
            let cancellable = one.install(|| mean_filter_cancellable(&src, layout, &stop_after(usize::MAX, &asked))).unwrap();
            assert_eq!(cancellable, mean_filter(&src, layout).unwrap(), "{w}x{h}x{c}");
            let bands = asked.load(Ordering::Relaxed);
            let expected = h.div_ceil((CANCEL_BAND_SAMPLES / (w * c)).max(CANCEL_BAND_MIN_ROWS));
            assert_eq!(bands, expected, "{w}x{h}x{c}: asked once per band");
            for turns in [QuarterTurns::One, QuarterTurns::Two, QuarterTurns::Three] {
                let cancellable = one.install(|| rotate_cancellable(&src, layout, turns, &|| false)).unwrap();
                assert_eq!(cancellable, rotate(&src, layout, turns).unwrap(), "{w}x{h}x{c} {turns:?}");
            }
        }
    }

    #[test]
    fn a_kernel_split_across_a_pool_stops_at_its_bands_too() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (src, layout) = image(1500, 1400, 1);
        assert!(wants_parallel(layout, Parallelism::Auto));
        pool.install(|| {
            let asked = AtomicUsize::new(0);
            assert_eq!(mean_filter_cancellable(&src, layout, &stop_after(0, &asked)), Err(ImagingError::Cancelled));
            let samples: Vec<u16> = src.iter().map(|&s| u16::from(s) * 257).collect();
            assert_eq!(mean_filter_cancellable(&samples, layout, &|| false).unwrap(), mean_filter(&samples, layout).unwrap());
        });
    }
}
