//! Instruction-set paths and run-time dispatch. All `unsafe` code of the
//! kernels crate is in this file.
//!
//! * [`KernelPath::Portable`]: the plain-Rust kernels compiled for the
//!   target's baseline (SSE2 on x86_64).
//! * [`KernelPath::Avx2`] / [`KernelPath::Avx512`] (x86_64 only): the same
//!   kernels compiled with AVX2 (resp. AVX-512F+BW+VL) enabled through
//!   `#[target_feature]`, plus hand-written kernels (module `x86`):
//!   256-bit transposes for 90°/270° rotation of 1-, 2-, 3-, 4- and 8-byte
//!   pixels with line-aligned source loads (four blocks, a whole source
//!   line, per step for GRAY8 on `Avx512`; streaming stores for outputs of
//!   16 MiB or more; RGB joins 4 blocks into 48-byte rows for that), `pshufb`
//!   row reversal for 180° (512-bit for 1/2/4/8-byte pixels on `Avx512`),
//!   and the u8 mean filter (AVX2: per-row interior; AVX-512:
//!   register-resident column strips over whole bands, streaming stores
//!   for outputs of 16 MiB or more).
//!
//! A path is only run after `is_x86_feature_detected!` confirmed its
//! features ([`KernelPath::check`]).
//!
//! # Destinations
//! Every kernel takes its destination as `&mut [MaybeUninit<_>]`: it may be
//! a new, uninitialised allocation ([`filled_vec`]) or a caller's
//! initialised buffer ([`as_uninit`]). The rules every kernel keeps, on
//! which those two helpers' soundness rests:
//! * it never reads its destination;
//! * it stores only values computed from the source (`MaybeUninit::new`,
//!   `write`, [`write_copy`], SIMD stores of vector registers through
//!   `as_mut_ptr().cast::<u8>()`), never an uninitialised one;
//! * it stores every sample of the band it is given (SIMD parts plus
//!   portable fringes, interior kernels plus edge pixels).
//!
//! `tests/it/kernels.rs` checks the last one on every path, with
//! destinations pre-filled with a sentinel.

use std::mem::MaybeUninit;

use super::{ImagingError, Layout, QuarterTurns, Sample, mean, rotate};

/// An instruction-set variant of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Plain Rust, target baseline features only. Always available.
    Portable,
    /// x86_64 with AVX2.
    Avx2,
    /// x86_64 with AVX-512F, AVX-512BW and AVX-512VL.
    Avx512,
}

impl KernelPath {
    /// Every path, available or not.
    pub const ALL: [KernelPath; 3] = [KernelPath::Portable, KernelPath::Avx2, KernelPath::Avx512];

    /// Short name ("portable", "avx2", "avx512").
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path (detected at run time).
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available path; what the public kernels use.
    pub fn best() -> KernelPath {
        // `is_x86_feature_detected!` caches its answer; this is a few loads.
        if KernelPath::Avx512.is_available() {
            KernelPath::Avx512
        } else if KernelPath::Avx2.is_available() {
            KernelPath::Avx2
        } else {
            KernelPath::Portable
        }
    }

    /// `Ok` if the path can run here, else [`ImagingError::PathUnavailable`].
    pub fn check(self) -> Result<(), ImagingError> {
        if self.is_available() {
            Ok(())
        } else {
            Err(ImagingError::PathUnavailable {
                path: self.name(),
                available: available_paths().iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
            })
        }
    }
}

/// The paths this CPU can run, slowest first (always starts with `Portable`).
pub fn available_paths() -> Vec<KernelPath> {
    KernelPath::ALL.into_iter().filter(|p| p.is_available()).collect()
}

/// Views samples as bytes (native endianness).
pub(super) fn as_bytes<T: Sample>(s: &[T]) -> &[u8] {
    // SAFETY: `Sample` is sealed and implemented only for u8 and u16, which
    // have no padding and no invalid bit patterns; u8 has alignment 1 and the
    // byte length is exactly `size_of_val(s)`, and the borrow is carried over.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), size_of_val(s)) }
}

/// Views destination samples as destination bytes (native endianness).
pub(super) fn as_bytes_uninit<T: Sample>(s: &mut [MaybeUninit<T>]) -> &mut [MaybeUninit<u8>] {
    let len = size_of_val(s);
    // SAFETY: as in `as_bytes` (u8 and u16 have no padding, so a sample is
    // initialised once its bytes are, and any bytes make a valid sample);
    // `MaybeUninit<u8>` has alignment 1 and admits any byte, initialised or
    // not; the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<MaybeUninit<u8>>(), len) }
}

/// Views destination bytes as whole `B`-byte pixels (a trailing partial
/// pixel is left out, as by `as_chunks_mut`).
pub(super) fn pixels_uninit<const B: usize>(s: &mut [MaybeUninit<u8>]) -> &mut [MaybeUninit<[u8; B]>] {
    let (pixels, _) = s.as_chunks_mut::<B>();
    let len = pixels.len();
    // SAFETY: `[MaybeUninit<u8>; B]` and `MaybeUninit<[u8; B]>` both have
    // size B and alignment 1 and admit any contents, initialised or not; the
    // exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(pixels.as_mut_ptr().cast::<MaybeUninit<[u8; B]>>(), len) }
}

/// A caller's initialised destination as a kernel destination (see
/// [Destinations](self#destinations)).
pub(super) fn as_uninit<T: Sample>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    let len = s.len();
    // SAFETY: `MaybeUninit<T>` is `repr(transparent)` over T (same size,
    // alignment), and the exclusive borrow is carried over. The one way to
    // misuse the view, storing an uninitialised value into it, is one no
    // kernel takes: they store only values computed from the source, so `s`
    // holds valid samples again when the borrow ends.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<MaybeUninit<T>>(), len) }
}

/// A new vector of `len` samples that `write_all` writes straight into the
/// uninitialised allocation (no zeroing first). `write_all` must write every
/// one of the `len` samples it is given: it runs a kernel over the whole
/// destination (`rotate_uninit`, `mean_filter_uninit` in lib.rs).
pub(super) fn filled_vec<T: Sample>(len: usize, write_all: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    write_all(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len`, and `write_all` has returned,
    // so the kernel wrote all of the first `len` samples: the bands of
    // `for_each_band` partition the destination and every kernel writes
    // every sample of its band with a valid value (see Destinations);
    // threads that wrote bands were joined (and streaming stores fenced)
    // before it returned. A panic in `write_all` leaves `v` empty.
    unsafe { v.set_len(len) };
    v
}

/// [`filled_vec`] whose `write_some` may stop early: `None` when it returns
/// false (some samples may be unwritten; the allocation is dropped as it is,
/// never read).
pub(super) fn filled_vec_until<T: Sample>(len: usize, write_some: impl FnOnce(&mut [MaybeUninit<T>]) -> bool) -> Option<Vec<T>> {
    let mut v = Vec::with_capacity(len);
    if !write_some(&mut v.spare_capacity_mut()[..len]) {
        return None;
    }
    // SAFETY: as in `filled_vec`: `write_some` returned true, so it ran the
    // kernel over every band of the destination.
    unsafe { v.set_len(len) };
    Some(v)
}

/// `dst.copy_from_slice(src)` for a destination that may be uninitialised
/// (`<[MaybeUninit<P>]>::write_copy_of_slice` is newer than the crate's
/// minimum Rust version).
pub(super) fn write_copy<P: Copy>(dst: &mut [MaybeUninit<P>], src: &[P]) {
    assert_eq!(dst.len(), src.len(), "write_copy: destination and source lengths differ");
    // SAFETY: both slices hold `src.len()` elements of P's layout
    // (`MaybeUninit<P>` is `repr(transparent)`), the destination is borrowed
    // exclusively so they cannot overlap, and `P: Copy` may be copied
    // bitwise.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<P>(), src.len()) }
}

// ---------------------------------------------------------------------------
// Rotation dispatch.

/// Rotation of the output band starting at row `row0`, on `path`, for
/// pixels of `px` bytes (1, 2, 3, 4, 6 or 8). `path` must be available.
#[allow(clippy::too_many_arguments)]
pub(super) fn rotate_band(
    path: KernelPath,
    px: usize,
    src: &[u8],
    w: usize,
    h: usize,
    turns: QuarterTurns,
    dst: &mut [MaybeUninit<u8>],
    row0: usize,
) {
    macro_rules! by_px {
        ($f:ident) => {
            match px {
                1 => $f::<1>(src, w, h, turns, dst, row0),
                2 => $f::<2>(src, w, h, turns, dst, row0),
                3 => $f::<3>(src, w, h, turns, dst, row0),
                4 => $f::<4>(src, w, h, turns, dst, row0),
                6 => $f::<6>(src, w, h, turns, dst, row0),
                8 => $f::<8>(src, w, h, turns, dst, row0),
                _ => unreachable!("pixel size {px}"),
            }
        };
    }
    match path {
        KernelPath::Portable => by_px!(rotate_portable),
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => by_px!(rotate_avx2),
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => by_px!(rotate_avx512),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("path {path:?} checked as available"),
    }
}

/// The output row at which [`rotate_band`]'s 90°/270° SIMD groups start
/// line-aligned when a band starts at row 0 (0 when nothing aligns): bands
/// that start this many rows (plus a multiple of 64) in need no extra
/// overlapping group at their start.
pub(super) fn rotate_band_anchor(path: KernelPath, px: usize, src: &[u8], w: usize, h: usize, turns: QuarterTurns) -> usize {
    match (path, turns) {
        #[cfg(target_arch = "x86_64")]
        (KernelPath::Avx2 | KernelPath::Avx512, QuarterTurns::One | QuarterTurns::Three) => {
            x86::transpose_anchor(path == KernelPath::Avx512, px, src, w, h, turns == QuarterTurns::One)
        }
        _ => 0,
    }
}

fn rotate_portable<const B: usize>(src: &[u8], w: usize, h: usize, turns: QuarterTurns, dst: &mut [MaybeUninit<u8>], row0: usize) {
    let (src, _) = src.as_chunks::<B>();
    rotate::rotate_band::<[u8; B]>(src, w, h, turns, pixels_uninit::<B>(dst), row0)
}

#[cfg(target_arch = "x86_64")]
fn rotate_avx2<const B: usize>(src: &[u8], w: usize, h: usize, turns: QuarterTurns, dst: &mut [MaybeUninit<u8>], row0: usize) {
    #[target_feature(enable = "avx2")]
    fn inner<const B: usize>(src: &[u8], w: usize, h: usize, turns: QuarterTurns, dst: &mut [MaybeUninit<u8>], row0: usize) {
        x86::rotate_band::<B>(src, w, h, turns, dst, row0)
    }
    // SAFETY: only reached through `rotate_band` with `KernelPath::Avx2`,
    // whose availability (AVX2 detected at run time) was checked by the caller.
    unsafe { inner::<B>(src, w, h, turns, dst, row0) }
}

#[cfg(target_arch = "x86_64")]
fn rotate_avx512<const B: usize>(src: &[u8], w: usize, h: usize, turns: QuarterTurns, dst: &mut [MaybeUninit<u8>], row0: usize) {
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    fn inner<const B: usize>(src: &[u8], w: usize, h: usize, turns: QuarterTurns, dst: &mut [MaybeUninit<u8>], row0: usize) {
        x86::rotate_band512::<B>(src, w, h, turns, dst, row0)
    }
    // SAFETY: only reached through `rotate_band` with `KernelPath::Avx512`,
    // whose availability (AVX-512F/BW/VL detected) the caller checked.
    unsafe { inner::<B>(src, w, h, turns, dst, row0) }
}

// ---------------------------------------------------------------------------
// Mean filter dispatch.

/// Mean filter of the output band starting at row `row0` on `path`.
/// `path` must be available.
pub(super) fn mean_band<T: Sample>(path: KernelPath, src: &[T], layout: Layout, dst: &mut [MaybeUninit<T>], row0: usize) {
    match path {
        KernelPath::Portable => mean::mean_band(src, layout, dst, row0, mean::no_fast),
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => {
            #[target_feature(enable = "avx2")]
            fn inner<T: Sample>(src: &[T], layout: Layout, dst: &mut [MaybeUninit<T>], row0: usize) {
                mean::mean_band(src, layout, dst, row0, x86::mean_interior_avx2::<T>)
            }
            // SAFETY: `path` is Avx2, whose availability (AVX2 detected at run
            // time) the caller checked.
            unsafe { inner(src, layout, dst, row0) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => {
            #[target_feature(enable = "avx2,avx512f,avx512bw")]
            fn inner<T: Sample>(src: &[T], layout: Layout, dst: &mut [MaybeUninit<T>], row0: usize) {
                if x86::mean_band_avx512(src, layout, dst, row0) {
                    mean::mean_band(src, layout, dst, row0, mean::interior_done)
                } else {
                    mean::mean_band(src, layout, dst, row0, x86::mean_interior_avx512::<T>)
                }
            }
            // SAFETY: `path` is Avx512, whose availability (AVX-512F and
            // AVX-512BW detected at run time) the caller checked.
            unsafe { inner(src, layout, dst, row0) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("path {path:?} checked as available"),
    }
}

// ---------------------------------------------------------------------------
// Hand-written x86 kernels: compiled with AVX2 (some with AVX-512BW) enabled
// and only reachable from the AVX2 / AVX-512 paths, which run only after the
// features were detected.

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::{Layout, QuarterTurns, Sample, rotate};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Rotation band on an AVX2-capable CPU: SIMD transposes for 1/2/3/4/8-byte
    /// pixels (portable tiles for 6-byte RGB16), SIMD row reversal for every
    /// pixel size.
    #[target_feature(enable = "avx2")]
    pub(super) fn rotate_band<const B: usize>(
        src: &[u8],
        w: usize,
        h: usize,
        turns: QuarterTurns,
        dst: &mut [MaybeUninit<u8>],
        row0: usize,
    ) {
        match turns {
            QuarterTurns::Zero => super::write_copy(dst, &src[row0 * w * B..row0 * w * B + dst.len()]),
            QuarterTurns::Two => {
                let rb = w * B;
                for (i, drow) in dst.chunks_exact_mut(rb).enumerate() {
                    let y = h - 1 - (row0 + i);
                    reverse_row::<B>(&src[y * rb..y * rb + rb], drow);
                }
            }
            QuarterTurns::One | QuarterTurns::Three => {
                let ccw90 = turns == QuarterTurns::One;
                if matches!(B, 1 | 2 | 3 | 4 | 8) {
                    transpose_band::<B>(src, w, h, ccw90, dst, row0)
                } else {
                    let (s, _) = src.as_chunks::<B>();
                    rotate::transpose_band::<[u8; B]>(s, w, h, ccw90, super::pixels_uninit::<B>(dst), row0)
                }
            }
        }
    }

    /// Output bytes at or above which the 90°/270° kernels use non-temporal
    /// (streaming) stores: an output this large does not stay in cache
    /// anyway, and streaming full lines saves the read-for-ownership.
    pub(super) const STREAM_MIN_BYTES: usize = 16 << 20;

    /// Transposes two side-by-side K x K blocks of B-byte pixels (K = 16 / B)
    /// with 256-bit vectors: block row `i` (2K pixels, lane 0 = left block,
    /// lane 1 = right block) is read at `s + i * ss`; transposed row `j` of the
    /// left block is written at `d0 + j * ds`, of the right block at
    /// `d1 + j * ds`. For B = 3 each lane holds 4 pixels (12 of its 16
    /// bytes: the right block is read at `s + 12`), and each store writes 12
    /// pixel bytes followed by 4 garbage bytes that the caller must
    /// overwrite later.
    ///
    /// # Safety
    /// For every `i < K`: `s + i*ss .. +32` readable (B = 3: `.. +24`), and
    /// `d0 + j*ds .. +16`, `d1 + j*ds .. +16` writable, not overlapping the
    /// source; with `NT`, every destination address 16-byte aligned.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block2<const B: usize, const NT: bool>(s: *const u8, ss: isize, d: [*mut u8; 2], ds: isize) {
        let [d0, d1] = d;
        // SAFETY: the reads are the caller's contract.
        let r = unsafe { transpose2::<B>(s, ss) };
        let k = if B == 3 { 4 } else { 16 / B };
        for (j, v) in r.iter().enumerate().take(k) {
            let (lo, hi) = (_mm256_castsi256_si128(*v), _mm256_extracti128_si256::<1>(*v));
            let (p0, p1) = (d0.wrapping_offset(j as isize * ds), d1.wrapping_offset(j as isize * ds));
            // SAFETY: p0..p0+16 and p1..p1+16 are writable (and 16-aligned
            // with NT) by the caller contract.
            unsafe {
                if NT {
                    _mm_stream_si128(p0.cast(), lo);
                    _mm_stream_si128(p1.cast(), hi);
                } else {
                    _mm_storeu_si128(p0.cast(), lo);
                    _mm_storeu_si128(p1.cast(), hi);
                }
            }
        }
    }

    /// The transpose of [`block2`] in registers: element `j < K` holds
    /// transposed row `j` of the left block in lane 0 and of the right block
    /// in lane 1 (B = 3: 12 pixel bytes then 4 zero bytes per lane).
    ///
    /// Each stage interleaves row `i` with row `i + K/2` (`unpacklo/hi` at
    /// pixel granularity, per 128-bit lane), which rotates the bits of the
    /// (row, column) index by one; log2(K) stages swap row and column bits.
    /// RGB pixels are widened to 4 bytes by a byte shuffle first and
    /// narrowed again after.
    ///
    /// # Safety
    /// For every `i < K`: `s + i*ss .. +32` readable (B = 3: `.. +24`).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn transpose2<const B: usize>(s: *const u8, ss: isize) -> [__m256i; 16] {
        const EXPAND3: [i8; 16] = [0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1];
        const EXPAND3_HI: [i8; 16] = [4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1];
        const SHRINK3: [i8; 16] = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1];
        let k = if B == 3 { 4 } else { 16 / B };
        let mut r = [_mm256_setzero_si256(); 16];
        for (i, v) in r.iter_mut().enumerate().take(k) {
            let p = s.wrapping_offset(i as isize * ss);
            if B == 3 {
                // Lane 0 widens pixels 0..4 of the 8 (bytes 0..12 of the low
                // load), lane 1 pixels 4..8 (bytes 4..16 of the high load at
                // +8): the 24 bytes of the 8 pixels, nothing past them.
                // SAFETY: bytes p..p+16 and p+8..p+24 are readable (caller contract).
                let (lo, hi) = unsafe { (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(8).cast())) };
                // SAFETY: the masks are 16-byte arrays read in full.
                let m = unsafe { _mm256_set_m128i(_mm_loadu_si128(EXPAND3_HI.as_ptr().cast()), _mm_loadu_si128(EXPAND3.as_ptr().cast())) };
                *v = _mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), m);
            } else {
                // SAFETY: bytes p..p+32 are readable (caller contract).
                *v = unsafe { _mm256_loadu_si256(p.cast()) };
            }
        }
        let mut n = k;
        while n > 1 {
            let mut t = [_mm256_setzero_si256(); 16];
            for i in 0..k / 2 {
                let (a, b) = (r[i], r[i + k / 2]);
                (t[2 * i], t[2 * i + 1]) = match B {
                    1 => (_mm256_unpacklo_epi8(a, b), _mm256_unpackhi_epi8(a, b)),
                    2 => (_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b)),
                    3 | 4 => (_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b)),
                    _ => (_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b)),
                };
            }
            r = t;
            n /= 2;
        }
        if B == 3 {
            let m = _mm256_broadcastsi128_si256(_mm_setr_epi8(
                SHRINK3[0],
                SHRINK3[1],
                SHRINK3[2],
                SHRINK3[3],
                SHRINK3[4],
                SHRINK3[5],
                SHRINK3[6],
                SHRINK3[7],
                SHRINK3[8],
                SHRINK3[9],
                SHRINK3[10],
                SHRINK3[11],
                SHRINK3[12],
                SHRINK3[13],
                SHRINK3[14],
                SHRINK3[15],
            ));
            for v in r.iter_mut().take(k) {
                *v = _mm256_shuffle_epi8(*v, m);
            }
        }
        r
    }

    /// Output columns per strip of [`transpose_rgb_stream`] (~1 KiB of
    /// output row, as in `transpose_simd`).
    const RGB_STREAM_STRIP: usize = 336;

    /// 90° / 270° band of a 3-byte-pixel image with streaming stores: four
    /// [`transpose2`] results (16 source rows) are joined into 48 bytes =
    /// three aligned 16-byte vectors per output row, so no store overlaps
    /// another (the plain kernel's 12-byte pieces cannot stream). Needs
    /// 16-byte aligned rows (`stream`); SIMD over output columns `0..ce`
    /// (a multiple of 16) and rows `0..full_rows`, portable code for the
    /// fringes.
    #[target_feature(enable = "avx2")]
    fn transpose_rgb_stream(src: &[u8], w: usize, h: usize, ccw90: bool, dst: &mut [MaybeUninit<u8>], row0: usize) {
        const B: usize = 3;
        let rows = dst.len() / (h * B);
        // Invariants every block address below relies on.
        assert!(src.len() == w * h * B && dst.len() == rows * h * B && row0 + rows <= w);
        let full_rows = rows / 8 * 8;
        let (cs, ce) = (0, h / 16 * 16);
        let ss = (w * B) as isize;
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<u8>());
        let mut ct = cs;
        while ct < ce {
            let ct_end = (ct + RGB_STREAM_STRIP).min(ce);
            for g in (0..full_rows).step_by(8) {
                let yo = row0 + g;
                for c in (ct..ct_end).step_by(16) {
                    // As in `transpose_simd` (B = 3, k = 4, two lanes), for
                    // output columns c..c+16: source rows c..c+16 (90°) or
                    // h-1-c down to h-c-16 (270°), c + 16 <= h.
                    let (x0, s0, sstep) = if ccw90 { (w - yo - 8, c, ss) } else { (yo, h - 1 - c, -ss) };
                    // Lane 0 is source column x0 + j, lane 1 x0 + 4 + j:
                    // 90°: output rows g+7-j and g+3-j; 270°: g+j, g+4+j.
                    let out_rows = |j: usize| if ccw90 { [g + 7 - j, g + 3 - j] } else { [g + j, g + 4 + j] };
                    // Sub-block b (source rows 4b.. of the 16) gives 12 bytes
                    // per output row (4 zero bytes above): bytes 12b..12b+12
                    // of the 48. Written out, not looped, so that everything
                    // stays in registers.
                    let piece = |b: usize| {
                        let row = s0 as isize + (4 * b) as isize * sstep.signum();
                        // SAFETY: reads 4 source rows (of the 16 above),
                        // bytes x0*B .. (x0+8)*B <= w*B.
                        let q = unsafe { transpose2::<B>(sp.offset(row * ss + (x0 * B) as isize), sstep) };
                        [q[0], q[1], q[2], q[3]]
                    };
                    let store = |t: usize, v: [__m256i; 4]| {
                        for (j, v) in v.into_iter().enumerate() {
                            let [r0, r1] = out_rows(j);
                            let at = |r: usize| dp.wrapping_add(r * h * B + c * B + 16 * t);
                            // SAFETY: output rows r0, r1 < full_rows of the
                            // band, bytes c*3 + 16t .. +16 <= (c+16)*3 <=
                            // h*3; 16-aligned as dst, the row length and c*3
                            // (c multiple of 16) are (`stream`).
                            unsafe {
                                _mm_stream_si128(at(r0).cast(), _mm256_castsi256_si128(v));
                                _mm_stream_si128(at(r1).cast(), _mm256_extracti128_si256::<1>(v));
                            }
                        }
                    };
                    let join = |lo: [__m256i; 4], hi: [__m256i; 4], f: fn(__m256i) -> __m256i| {
                        std::array::from_fn(|j| _mm256_or_si256(lo[j], f(hi[j])))
                    };
                    let (p0, p1) = (piece(0), piece(1));
                    store(0, join(p0, p1, |v| _mm256_bslli_epi128::<12>(v)));
                    let p2 = piece(2);
                    store(1, join(p1.map(|v| _mm256_bsrli_epi128::<4>(v)), p2, |v| _mm256_bslli_epi128::<8>(v)));
                    let p3 = piece(3);
                    store(2, join(p2.map(|v| _mm256_bsrli_epi128::<8>(v)), p3, |v| _mm256_bslli_epi128::<4>(v)));
                }
            }
            ct = ct_end;
        }
        transpose_fringes::<B>(src, w, h, ccw90, dst, row0, 0..full_rows, cs..ce);
    }

    /// The portable part of a SIMD 90°/270° band: everything outside output
    /// rows `simd_rows` x output columns `simd_cols`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn transpose_fringes<const B: usize>(
        src: &[u8],
        w: usize,
        h: usize,
        ccw90: bool,
        dst: &mut [MaybeUninit<u8>],
        row0: usize,
        simd_rows: std::ops::Range<usize>,
        simd_cols: std::ops::Range<usize>,
    ) {
        let rows = dst.len() / (h * B);
        let (s, _) = src.as_chunks::<B>();
        let d = super::pixels_uninit::<B>(dst);
        rotate::transpose_region::<[u8; B]>(s, w, h, ccw90, d, row0, 0..simd_rows.start, 0..h);
        rotate::transpose_region::<[u8; B]>(s, w, h, ccw90, d, row0, simd_rows.clone(), 0..simd_cols.start);
        rotate::transpose_region::<[u8; B]>(s, w, h, ccw90, d, row0, simd_rows.clone(), simd_cols.end..h);
        rotate::transpose_region::<[u8; B]>(s, w, h, ccw90, d, row0, simd_rows.end..rows, 0..h);
    }

    /// Rotation band on an AVX-512BW/VL CPU: as [`rotate_band`], with 512-bit
    /// row reversal (180°) for 1/2/4/8-byte pixels, and for 1-byte pixels a
    /// 90°/270° kernel that transposes four 16 x 16 blocks (a whole 64-byte
    /// source line per row) per step with the 256-bit kernel, which needs
    /// AVX-512VL's 32 vector registers to run without spills. (512-bit
    /// transposes were tried and were slower here: 16 zmm rows spill, and
    /// the 128-bit lane extract-stores are costly.)
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    pub(super) fn rotate_band512<const B: usize>(
        src: &[u8],
        w: usize,
        h: usize,
        turns: QuarterTurns,
        dst: &mut [MaybeUninit<u8>],
        row0: usize,
    ) {
        if turns == QuarterTurns::Two && matches!(B, 1 | 2 | 4 | 8) {
            let rb = w * B;
            for (i, drow) in dst.chunks_exact_mut(rb).enumerate() {
                let y = h - 1 - (row0 + i);
                reverse_row512::<B>(&src[y * rb..y * rb + rb], drow);
            }
        } else if B == 1 && matches!(turns, QuarterTurns::One | QuarterTurns::Three) && four_block_gray(h) {
            let (rows, ccw90) = (dst.len() / (h * B), turns == QuarterTurns::One);
            if stream(dst, h * B, src.len()) {
                transpose_simd4::<B, true>(src, w, h, ccw90, dst, row0, rows);
                _mm_sfence();
            } else {
                transpose_simd4::<B, false>(src, w, h, ccw90, dst, row0, rows);
            }
        } else {
            rotate_band::<B>(src, w, h, turns, dst, row0)
        }
    }

    /// See `super::rotate_band_anchor`: the first row of the SIMD groups
    /// of a band starting at row 0, for the kernel `rotate_band` (AVX2) or
    /// `rotate_band512` (`wide`) picks for `px`-byte pixels.
    pub(super) fn transpose_anchor(wide: bool, px: usize, src: &[u8], w: usize, h: usize, ccw90: bool) -> usize {
        let sp = src.as_ptr();
        match px {
            1 if wide && four_block_gray(h) => aligned_first_row::<1>(sp, w, ccw90, 0, w, 64),
            1 => aligned_first_row::<1>(sp, w, ccw90, 0, w, 32),
            2 => aligned_first_row::<2>(sp, w, ccw90, 0, w, 16),
            4 => aligned_first_row::<4>(sp, w, ccw90, 0, w, 8),
            8 => aligned_first_row::<8>(sp, w, ccw90, 0, w, 4),
            _ => 0,
        }
    }

    /// Whether `rotate_band512` rotates GRAY8 into rows of `h` bytes with
    /// the four-block kernel (`transpose_simd4`); `transpose_anchor` must
    /// agree with it.
    fn four_block_gray(h: usize) -> bool {
        !aliasing_rows(h)
    }

    /// Whether output rows of `row_bytes` alias in a 4 KiB-way L1 cache so
    /// much that the 64 rows the four-block kernel writes at once do not
    /// fit (e.g. 1024 bytes: every 16th set, 64 rows in 4 sets): then the
    /// two-block kernel's 32 rows are the better choice (1024x1024 GRAY8:
    /// 147 µs instead of 58 µs).
    fn aliasing_rows(row_bytes: usize) -> bool {
        // Rows fall into 4096 / gcd(row_bytes, 4096) / 64 * 64 distinct sets'
        // worth of lines: a gcd above 256 leaves fewer than 16 sets.
        (row_bytes & 4095 & row_bytes.wrapping_neg()) > 256 || row_bytes.is_multiple_of(4096)
    }

    /// Byte-shuffle mask reversing the B-byte units of each 16-byte lane.
    const fn lane_reverse_mask(b: usize) -> [i8; 64] {
        let mut m = [0i8; 64];
        if 16 % b != 0 {
            // Not used for these pixel sizes, but still evaluated for them in
            // unoptimised builds: return a harmless mask.
            return m;
        }
        let mut j = 0;
        while j < 64 {
            let o = j % 16;
            m[j] = ((16 / b - 1 - o / b) * b + o % b) as i8;
            j += 1;
        }
        m
    }

    struct Rev512<const B: usize>;
    impl<const B: usize> Rev512<B> {
        const MASK: [i8; 64] = lane_reverse_mask(B);
    }

    /// `dst` = `src` with its B-byte pixels (B in {1, 2, 4, 8}) in reverse
    /// order, 64 bytes per step: reverse the units inside each 128-bit lane,
    /// then the order of the lanes.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    #[inline]
    fn reverse_row512<const B: usize>(src: &[u8], dst: &mut [MaybeUninit<u8>]) {
        let n = src.len();
        // SAFETY: the mask is a 64-byte array read in full.
        let m = unsafe { _mm512_loadu_si512(Rev512::<B>::MASK.as_ptr().cast()) };
        let chunks = n / 64;
        for i in 0..chunks {
            let s: &[u8; 64] = src[n - 64 * (i + 1)..n - 64 * i].try_into().unwrap();
            let d: &mut [MaybeUninit<u8>; 64] = (&mut dst[64 * i..64 * i + 64]).try_into().unwrap();
            // SAFETY: s and d are 64-byte arrays, read and written in full.
            unsafe {
                let v = _mm512_shuffle_epi8(_mm512_loadu_si512(s.as_ptr().cast()), m);
                let v = _mm512_shuffle_i64x2::<0b00_01_10_11>(v, v);
                _mm512_storeu_si512(d.as_mut_ptr().cast(), v);
            }
        }
        let rem = n - 64 * chunks;
        reverse_row::<B>(&src[..rem], &mut dst[64 * chunks..]);
    }

    /// Whether to write the output band `dst` (rows of `row_bytes`) with
    /// streaming stores: the whole image (`image_bytes`, not just this band)
    /// is large, and every row start is 16-byte aligned.
    fn stream(dst: &[MaybeUninit<u8>], row_bytes: usize, image_bytes: usize) -> bool {
        (dst.as_ptr() as usize).is_multiple_of(16) && row_bytes.is_multiple_of(16) && image_bytes >= STREAM_MIN_BYTES
    }

    /// 90° / 270° band (see `rotate::transpose_band`) for B in {1, 2, 3, 4, 8}:
    /// SIMD blocks of 2K output rows x K output columns over the largest
    /// such region, portable code for the fringes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn transpose_band<const B: usize>(src: &[u8], w: usize, h: usize, ccw90: bool, dst: &mut [MaybeUninit<u8>], row0: usize) {
        let rows = dst.len() / (h * B);
        if B == 3 && stream(dst, h * B, src.len()) {
            transpose_rgb_stream(src, w, h, ccw90, dst, row0);
            _mm_sfence();
        } else if stream(dst, h * B, src.len()) {
            transpose_simd::<B, true>(src, w, h, ccw90, dst, row0, rows);
            // Order the streaming stores before whatever synchronisation
            // hands the buffer to another thread.
            _mm_sfence();
        } else if B == 1 && tall_blocks(w, h) {
            transpose_gray_tall(src, w, h, ccw90, dst, row0);
        } else {
            transpose_simd::<B, false>(src, w, h, ccw90, dst, row0, rows);
        }
    }

    /// 16 x 32 GRAY8 block: `r[j]` = source column j of rows 0..16 (lane 0)
    /// and rows 16..32 (lane 1), i.e. 32 consecutive output bytes.
    ///
    /// # Safety
    /// `s + i*ss .. +16` readable for every `i < 32`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn transpose_tall(s: *const u8, ss: isize) -> [__m256i; 16] {
        let mut r = [_mm256_setzero_si256(); 16];
        for (i, v) in r.iter_mut().enumerate() {
            let (p, q) = (s.wrapping_offset(i as isize * ss), s.wrapping_offset((i + 16) as isize * ss));
            // SAFETY: caller contract.
            *v = unsafe { _mm256_loadu2_m128i(q.cast(), p.cast()) };
        }
        for _ in 0..4 {
            let mut t = [_mm256_setzero_si256(); 16];
            for i in 0..8 {
                let (a, b) = (r[i], r[i + 8]);
                (t[2 * i], t[2 * i + 1]) = (_mm256_unpacklo_epi8(a, b), _mm256_unpackhi_epi8(a, b));
            }
            r = t;
        }
        r
    }

    /// Whether a GRAY8 rotation to output rows of `h` bytes from source
    /// rows of `w` bytes takes [`transpose_gray_tall`]: when the output
    /// rows are a multiple of 2048 bytes, every one of them falls into the
    /// same two L1 sets, so the 32 or 64 rows the other kernels fill at once
    /// evict each other's lines between their 16-byte pieces (3000x2048:
    /// 8x memcpy instead of 2.9x, 1000x4096: 20x instead of 6.8x). Not when
    /// the source rows are such a multiple too: the tall blocks re-read
    /// each source line four times, and those lines then collide in L2
    /// (4096x2048 twice as slow; 2048x2048 the same either way).
    fn tall_blocks(w: usize, h: usize) -> bool {
        let low_bit = |x: usize| x & x.wrapping_neg();
        low_bit(h) >= 2048 && low_bit(w) < 2048
    }

    /// 90° / 270° GRAY8 band for output rows that share two L1 sets
    /// ([`tall_blocks`]): 16 output rows at a time (they fit in those sets),
    /// 32 bytes each per step.
    #[target_feature(enable = "avx2")]
    fn transpose_gray_tall(src: &[u8], w: usize, h: usize, ccw90: bool, dst: &mut [MaybeUninit<u8>], row0: usize) {
        let rows = dst.len() / h;
        // Invariants every address below relies on.
        assert!(src.len() == w * h && dst.len() == rows * h && row0 + rows <= w);
        let (full_rows, full_cols) = (rows / 16 * 16, h / 32 * 32);
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<u8>());
        let ss = w as isize;
        for g in (0..full_rows).step_by(16) {
            let yo = row0 + g;
            for c in (0..full_cols).step_by(32) {
                // SAFETY: source rows c..c+32 <= h (90°) or h-1-c down to
                // h-c-32 >= 0 (270°), columns x..x+16 <= w; output rows
                // g..g+16 <= rows, bytes c..c+32 <= h.
                unsafe {
                    let r = if ccw90 {
                        transpose_tall(sp.add(c * w + (w - yo - 16)), ss)
                    } else {
                        transpose_tall(sp.add((h - 1 - c) * w + yo), -ss)
                    };
                    for (j, v) in r.iter().enumerate() {
                        let row = if ccw90 { g + 15 - j } else { g + j };
                        _mm256_storeu_si256(dp.add(row * h + c).cast(), *v);
                    }
                }
            }
        }
        transpose_fringes::<1>(src, w, h, ccw90, dst, row0, 0..full_rows, 0..full_cols);
    }

    /// Defines a 90°/270° band kernel with `$lanes` K x K blocks per SIMD
    /// step (`$block`, compiled with `$features`): SIMD over output rows
    /// `0..rows` (in groups of `$lanes * K`, see there) and output columns `cs..ce`,
    /// portable code for the fringes.
    macro_rules! transpose_simd {
        ($name:ident, $features:literal, $lanes:literal, $block:ident) => {
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            #[inline]
            fn $name<const B: usize, const NT: bool>(
                src: &[u8],
                w: usize,
                h: usize,
                ccw90: bool,
                dst: &mut [MaybeUninit<u8>],
                row0: usize,
                rows: usize,
            ) {
                const L: usize = $lanes;
                let k = if B == 3 { 4 } else { 16 / B };
                // Invariants every block address below relies on.
                assert!(src.len() == w * h * B && dst.len() == rows * h * B && row0 + rows <= w);
                // SIMD groups of L*k output rows from first_row on, plus
                // one group at each end overlapping them to cover the rest
                // (its outputs are written twice, with the same values).
                // Output rows are source columns: starting a few rows in
                // makes every 32-byte source load (or 64-byte group of
                // loads) line-aligned when the source rows are (a load split
                // across two lines costs ~15% at 4K GRAY8).
                let step = L * k;
                let first_row = aligned_first_row::<B>(src.as_ptr(), w, ccw90, row0, rows, step);
                let full_rows = first_row + (rows - first_row) / step * step;
                let lead = (first_row > 0).then_some(0);
                let tail = (full_rows < rows && rows >= step).then(|| rows - step);
                let simd_rows = if rows >= step { 0..rows } else { 0..0 };
                // SIMD output columns cs..ce. For B = 3 the 16-byte stores
                // write 4 bytes past each block (overwritten by the next block
                // of the row, or by the portable fringe: ce + 2 <= h keeps them
                // inside the row).
                let (cs, ce) = if B == 3 { (0, h.saturating_sub(2) / k * k) } else { (0, h / k * k) };
                let (ss, ds) = ((w * B) as isize, (h * B) as isize);
                let sp = src.as_ptr();
                let dp = dst.as_mut_ptr().cast::<u8>();
                // Strips of ~1 KiB of output row (`tc` source rows), swept over
                // all output rows of the band (source columns): `tc` sequential
                // source streams, and 16 whole cache lines written per output
                // row per strip. (Measured against 64 B and 256 B strips and
                // square tiles: 1 KiB was best for 3- and 4-byte pixels.)
                // The strips keep the source lines a group half-reads in
                // cache for the next group; a group that reads whole lines
                // (L*k*B = 64) needs none, and whole output rows were best
                // (4K GRAY8 90°: 1.66x memcpy instead of 1.72x, 270°: 1.47x
                // instead of 1.60x).
                let tc = if L * k * B >= 64 { ce } else { (1024 / B / k * k).max(k) };
                let mut ct = cs;
                while ct < ce {
                    let ct_end = (ct + tc).min(ce);
                    for g in lead.into_iter().chain((first_row..full_rows).step_by(step)).chain(tail) {
                        let yo = row0 + g;
                        let mut c = ct;
                        while c < ct_end {
                            if ccw90 {
                                // Output rows g..g+L*k are source columns
                                // x0+L*k-1 down to x0, x0 = w-yo-L*k >= 0
                                // (yo+L*k <= row0+rows <= w); output columns
                                // c..c+k are source rows c..c+k <= h. Block l
                                // holds source columns x0+l*k.., i.e. output
                                // rows from g+L*k-1-l*k downwards.
                                let x0 = w - yo - L * k;
                                let d: [*mut u8; L] = std::array::from_fn(|l| dp.wrapping_add(((g + L * k - 1 - l * k) * h + c) * B));
                                // SAFETY: reads source rows c..c+k <= h, bytes
                                // x0*B..(x0+L*k)*B; writes
                                // output rows g..g+L*k <= rows,
                                // bytes c*B..c*B+16 <= h*B (B = 3: ce+2 <= h).
                                // src and dst are distinct slices. NT: row
                                // starts and c*B are multiples of 16 on an
                                // aligned dst (checked by `stream`).
                                unsafe { $block::<B, NT>(sp.add((c * w + x0) * B), ss, d, -ds) }
                            } else {
                                // Output rows g..g+L*k are source columns
                                // yo..yo+L*k <= w; output columns c..c+k are
                                // source rows h-1-c down to h-c-k >= 0.
                                let d: [*mut u8; L] = std::array::from_fn(|l| dp.wrapping_add(((g + l * k) * h + c) * B));
                                // SAFETY: as above, with source rows read bottom-up.
                                unsafe { $block::<B, NT>(sp.add(((h - 1 - c) * w + yo) * B), -ss, d, ds) }
                            }
                            c += k;
                        }
                    }
                    ct = ct_end;
                }
                // Fringes, after the SIMD part (B = 3 relies on this order).
                transpose_fringes::<B>(src, w, h, ccw90, dst, row0, simd_rows, cs..ce);
            }
        };
    }

    /// The first band-relative output row (< `step`, and 0 when no such row
    /// exists or the band is shorter) from which the `step`-pixel groups of
    /// source columns that [`transpose_simd`] loads start on a boundary of
    /// `step * B` bytes (at most a 64-byte line) in every source row. Output
    /// row `g` of the band is source column `w - 1 - (row0 + g)` (90°) or
    /// `row0 + g` (270°).
    fn aligned_first_row<const B: usize>(sp: *const u8, w: usize, ccw90: bool, row0: usize, rows: usize, step: usize) -> usize {
        // Loads are 32 bytes wide, and a step of 64 bytes is one whole line.
        let align = (step * B).min(64);
        if B == 3 || !(w * B).is_multiple_of(align) || rows < 2 * step {
            return 0;
        }
        // Byte address (mod align) of the first group's first source column
        // when starting at output row 0.
        let start = if ccw90 { sp as usize + (w - row0 - step) * B } else { sp as usize + row0 * B };
        // Starting g rows later moves it by -g*B (90°) or +g*B (270°).
        let shift = if ccw90 { start % align } else { (align - start % align) % align };
        if shift.is_multiple_of(B) && shift / B < step { shift / B } else { 0 }
    }

    transpose_simd!(transpose_simd, "avx2", 2, block2);
    transpose_simd!(transpose_simd4, "avx2,avx512f,avx512bw,avx512vl", 4, block4);

    /// Four K x K blocks side by side: two [`block2`] on one source line.
    ///
    /// # Safety
    /// As [`block2`] for both halves: source rows `s + i*ss .. +64`,
    /// destinations `d[l] + j*ds .. +16`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block4<const B: usize, const NT: bool>(s: *const u8, ss: isize, d: [*mut u8; 4], ds: isize) {
        // SAFETY: the caller's contract covers both halves.
        unsafe {
            block2::<B, NT>(s, ss, [d[0], d[1]], ds);
            block2::<B, NT>(s.wrapping_add(32), ss, [d[2], d[3]], ds);
        }
    }

    /// Mean-filter interior for u8 samples with AVX2 (see `mean::Interior`);
    /// other sample types are left to the portable loop. Only handed to
    /// `mean::mean_band` from the AVX2 / AVX-512 paths, which run only after
    /// AVX2 was detected.
    pub(super) fn mean_interior_avx2<T: Sample>(rows: &[&[T]], o: &mut [MaybeUninit<T>], c: usize) -> usize {
        if size_of::<T>() != 1 {
            return 0;
        }
        // T is u8 (Sample is sealed to u8 and u16): the byte views are the samples.
        let rows: [&[u8]; 3] = std::array::from_fn(|r| rows.get(r).map_or(&[][..], |s| super::as_bytes(s)));
        let o = super::as_bytes_uninit(o);
        // SAFETY: this function is only used on paths whose AVX2 support
        // was checked at run time (KernelPath::Avx2 / Avx512).
        unsafe {
            match rows.iter().filter(|r| !r.is_empty()).count() {
                3 => mean_u8_avx2::<3, 9>(&rows, o, c),
                2 => mean_u8_avx2::<2, 6>(&rows, o, c),
                _ => mean_u8_avx2::<1, 3>(&rows, o, c),
            }
        }
    }

    /// As [`mean_interior_avx2`] with AVX-512BW (32 samples per step).
    pub(super) fn mean_interior_avx512<T: Sample>(rows: &[&[T]], o: &mut [MaybeUninit<T>], c: usize) -> usize {
        if size_of::<T>() != 1 {
            return 0;
        }
        let rows: [&[u8]; 3] = std::array::from_fn(|r| rows.get(r).map_or(&[][..], |s| super::as_bytes(s)));
        let o = super::as_bytes_uninit(o);
        // SAFETY: only used on KernelPath::Avx512, whose AVX-512F/BW support
        // was checked at run time.
        unsafe {
            match rows.iter().filter(|r| !r.is_empty()).count() {
                3 => mean_u8_avx512::<3, 9>(&rows, o, c),
                2 => mean_u8_avx512::<2, 6>(&rows, o, c),
                _ => mean_u8_avx512::<1, 3>(&rows, o, c),
            }
        }
    }

    /// Fills the interior samples (all but the first and last pixel) of
    /// every row of a u8 mean-filter band with AVX-512BW and returns true;
    /// returns false (nothing written) for u16 samples or rows whose
    /// interior is shorter than one vector. Only called from the AVX-512
    /// path, which runs only after AVX-512F/BW were detected.
    pub(super) fn mean_band_avx512<T: Sample>(src: &[T], layout: Layout, dst: &mut [MaybeUninit<T>], row0: usize) -> bool {
        let (h, c, rs) = (layout.height(), layout.channels(), layout.row_samples());
        if size_of::<T>() != 1 || rs < 64 + 2 * c {
            return false;
        }
        // T is u8 (Sample is sealed to u8 and u16): the byte views are the samples.
        let (src, dst) = (super::as_bytes(src), super::as_bytes_uninit(dst));
        // SAFETY: only used on KernelPath::Avx512, whose AVX-512F/BW support
        // was checked at run time.
        unsafe { mean_u8_strips_avx512(src, h, rs, c, dst, row0) };
        true
    }

    /// Output rows per block of the strip kernel: each 256-sample strip is
    /// swept down this many rows before moving right.
    const MEAN_ROW_BLOCK: usize = 64;

    /// How many rows ahead of its loads the strip kernel prefetches the
    /// cache line its last load reaches into.
    const MEAN_PREFETCH_ROWS: usize = 4;

    /// Interior of the band's rows (`rs` samples each, `c` channels,
    /// `rs - 2c >= 64`) in vertical strips of 256 (then 64) output samples:
    /// a strip slides down the rows keeping the horizontal 3-tap sums of the
    /// previous rows in registers, so each source row is loaded once per
    /// strip instead of three times, and nothing goes through memory.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn mean_u8_strips_avx512(src: &[u8], h: usize, rs: usize, c: usize, dst: &mut [MaybeUninit<u8>], row0: usize) {
        match c {
            1 => mean_u8_strips::<1>(src, h, rs, dst, row0),
            2 => mean_u8_strips::<2>(src, h, rs, dst, row0),
            3 => mean_u8_strips::<3>(src, h, rs, dst, row0),
            _ => mean_u8_strips::<4>(src, h, rs, dst, row0),
        }
    }

    /// [`mean_u8_strips_avx512`] for `C` channels.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn mean_u8_strips<const C: usize>(src: &[u8], h: usize, rs: usize, dst: &mut [MaybeUninit<u8>], row0: usize) {
        let n = rs - 2 * C;
        let rows = dst.len() / rs;
        // Invariants every address in `mean_strip_u8` relies on.
        assert!(src.len() == h * rs && dst.len() == rows * rs && row0 + rows <= h && n >= 64);
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<u8>());
        // Streaming stores need every store to fill one whole aligned cache
        // line (a partly written line costs a read-modify-write in memory),
        // so the strips start where the first output row's interior reaches
        // a line boundary; with rows a multiple of 64 bytes long that point
        // is line-aligned in every row.
        let head = (64 - (dp as usize + C) % 64) % 64;
        let stream = h * rs >= STREAM_MIN_BYTES && rs.is_multiple_of(64) && n >= head + 64;
        let mut y0 = row0;
        while y0 < row0 + rows {
            let y1 = (y0 + MEAN_ROW_BLOCK).min(row0 + rows);
            if stream {
                let mut x = head;
                while x + 256 <= n {
                    // SAFETY: x + 256 <= n, y0 < y1 <= row0 + rows <= h
                    // (asserted above); dp + C + x is 64-aligned in every row.
                    unsafe { mean_strip_u8::<4, C, true>(sp, dp, h, rs, row0, y0..y1, x) };
                    x += 256;
                }
                while x + 64 <= n {
                    // SAFETY: as above.
                    unsafe { mean_strip_u8::<1, C, true>(sp, dp, h, rs, row0, y0..y1, x) };
                    x += 64;
                }
                // The unaligned ends with ordinary stores, overlapping the
                // streamed part (same values); two lines per row.
                for xs in [0, n - 64] {
                    if xs < head || xs + 64 > x {
                        // SAFETY: xs + 64 <= n, rows as above.
                        unsafe { mean_strip_u8::<1, C, false>(sp, dp, h, rs, row0, y0..y1, xs) };
                    }
                }
            } else {
                // (Starting at 64-byte aligned outputs measured slower at 4K.)
                let mut x = 0;
                while x + 256 <= n {
                    // SAFETY: x + 256 <= n, y0 < y1 <= row0 + rows <= h (asserted above).
                    unsafe { mean_strip_u8::<4, C, false>(sp, dp, h, rs, row0, y0..y1, x) };
                    x += 256;
                }
                while x < n {
                    // The last step moves back to overlap the previous one.
                    let xs = x.min(n - 64);
                    // SAFETY: xs + 64 <= n, rows as above.
                    unsafe { mean_strip_u8::<1, C, false>(sp, dp, h, rs, row0, y0..y1, xs) };
                    x = xs + 64;
                }
            }
            y0 = y1;
        }
        if stream {
            // Order the streaming stores before whatever hands the buffer on.
            _mm_sfence();
        }
    }

    /// Even and odd bytes (as u16 lanes) of the horizontal 3-tap sums
    /// `r[i] + r[i+C] + r[i+2C]` for `i` in `x .. x + 64V` of source row `y`.
    ///
    /// # Safety
    /// Source row `y` (at `sp + y*rs`) has at least `x + 64V + 2C` bytes.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    #[inline]
    unsafe fn hsum_u8<const V: usize, const C: usize>(sp: *const u8, rs: usize, y: usize, x: usize) -> [[__m512i; V]; 2] {
        let lo = _mm512_set1_epi16(0x00ff);
        let ones = _mm512_set1_epi8(1);
        let mut e = [_mm512_setzero_si512(); V];
        let mut o = [_mm512_setzero_si512(); V];
        for v in 0..V {
            // SAFETY: bytes x + 64v .. x + 64v + 64 + 2C of row y are inside
            // the row (caller contract).
            let q = unsafe { sp.add(y * rs + x + 64 * v) };
            if C == 1 {
                // Gray: with p(a) = a[2j] + a[2j+1] (`pmaddubsw` by ones),
                // even i = 2j: p(r at 0) + r[2j+2]; odd: r[2j+1] + p(r at 2).
                // SAFETY: as above (2C = 2).
                let (a, b) = unsafe { (_mm512_loadu_si512(q.cast()), _mm512_loadu_si512(q.add(2).cast())) };
                e[v] = _mm512_add_epi16(_mm512_maddubs_epi16(a, ones), _mm512_and_si512(b, lo));
                o[v] = _mm512_add_epi16(_mm512_srli_epi16::<8>(a), _mm512_maddubs_epi16(b, ones));
            } else {
                // SAFETY: as above.
                let (a, b, d) =
                    unsafe { (_mm512_loadu_si512(q.cast()), _mm512_loadu_si512(q.add(C).cast()), _mm512_loadu_si512(q.add(2 * C).cast())) };
                let ev = _mm512_add_epi16(_mm512_and_si512(a, lo), _mm512_and_si512(b, lo));
                e[v] = _mm512_add_epi16(ev, _mm512_and_si512(d, lo));
                let od = _mm512_add_epi16(_mm512_srli_epi16::<8>(a), _mm512_srli_epi16::<8>(b));
                o[v] = _mm512_add_epi16(od, _mm512_srli_epi16::<8>(d));
            }
        }
        [e, o]
    }

    /// One strip: output samples `C + x .. C + x + 64V` of output rows `ys`
    /// (image rows; the band starts at image row `row0` at `dp`). The sums
    /// stay in u16 lanes split into even and odd bytes (max 9 * 255), are
    /// divided with rounding by one `pmulhrsw` with `recip15(n)` (exact, see
    /// there), and the even/odd results are merged back into bytes with a
    /// shift and an or: no packing or lane permutes. (Not `pmulhuw`: LLVM
    /// rewrote that into 32-bit multiplies in this loop.)
    ///
    /// # Safety
    /// `sp` is an `h` x `rs` u8 image, `dp` the band of output rows
    /// `row0..` with every row of `ys` in it, `ys.end <= h`,
    /// `x + 64V + 2C <= rs`; with `NT`, `dp + (y - row0) * rs + C + x` 64-byte
    /// aligned for every `y` in `ys`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    #[inline]
    unsafe fn mean_strip_u8<const V: usize, const C: usize, const NT: bool>(
        sp: *const u8,
        dp: *mut u8,
        h: usize,
        rs: usize,
        row0: usize,
        ys: std::ops::Range<usize>,
        x: usize,
    ) {
        let zero = [[_mm512_setzero_si512(); V]; 2];
        // SAFETY: row ys.start < ys.end <= h, and x + 64V + 2C <= rs
        // (caller contract).
        let mut hc = unsafe { hsum_u8::<V, C>(sp, rs, ys.start, x) };
        // Pair sums: rows y-1 and y (row -1 counts as zero).
        let mut pair = if ys.start > 0 {
            // SAFETY: as above, for row ys.start - 1.
            let hp = unsafe { hsum_u8::<V, C>(sp, rs, ys.start - 1, x) };
            std::array::from_fn(|p| std::array::from_fn(|v| _mm512_add_epi16(hp[p][v], hc[p][v])))
        } else {
            hc
        };
        // Multipliers for windows of 9 (interior rows) and 6 (top or bottom
        // row; 3 when the image is one row high).
        let div = |n: u32| _mm512_set1_epi16(super::super::sample::recip15(n) as i16);
        let (inner, edge) = (div(9), if h == 1 { div(3) } else { div(6) });
        for y in ys {
            let below = y + 1 < h;
            // SAFETY: as above, for row y + 1 < h.
            let hn = if below { unsafe { hsum_u8::<V, C>(sp, rs, y + 1, x) } } else { zero };
            if y + 1 + MEAN_PREFETCH_ROWS < h {
                // The last load of a row reaches 2C bytes past the strip; when
                // those few bytes start a new cache line, the split load
                // waits for memory (no prefetcher has seen that line yet):
                // 3.4 ms instead of 1.6 ms on 4K RGB for some alignments.
                let last = (y + 1 + MEAN_PREFETCH_ROWS) * rs + x + 64 * V + 2 * C - 1;
                // SAFETY: prefetching is a hint and cannot fault; the
                // address is inside the source image anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(sp.add(last).cast()) };
            }
            let m = if y > 0 && below { inner } else { edge };
            for v in 0..V {
                let se = _mm512_add_epi16(pair[0][v], hn[0][v]);
                let so = _mm512_add_epi16(pair[1][v], hn[1][v]);
                // (sum + n/2) / n, exactly (see `recip15`).
                let (qe, qo) = (_mm512_mulhrs_epi16(se, m), _mm512_mulhrs_epi16(so, m));
                // Odd results (< 256) to the high byte of their word.
                let out = _mm512_or_si512(qe, _mm512_slli_epi16::<8>(qo));
                // SAFETY: output row y is in the band, and samples
                // C + x + 64v .. +64 <= C + x + 64V <= rs - C are in the row.
                // With NT, the address is 64-byte aligned (caller contract).
                unsafe {
                    let p = dp.add((y - row0) * rs + C + x + 64 * v).cast();
                    if NT { _mm512_stream_si512(p, out) } else { _mm512_storeu_si512(p, out) }
                };
                pair[0][v] = _mm512_add_epi16(hc[0][v], hn[0][v]);
                pair[1][v] = _mm512_add_epi16(hc[1][v], hn[1][v]);
            }
            hc = hn;
        }
    }

    /// Output samples per chunk of the u8 mean interior kernels.
    const MEAN_CHUNK: usize = 512;

    /// `o[i] = (sum over the R rows of row[i] + row[i+c] + row[i+2c] + N/2) / N`
    /// for all of `o` if it has at least 64 samples (returns `o.len()`),
    /// else nothing (returns 0).
    ///
    /// Separable, in chunks of up to [`MEAN_CHUNK`] outputs: first the
    /// vertical sums of the chunk plus its `2c` halo are written as u16 into
    /// a small stack buffer (zero-extending loads, 16 lanes per step), then
    /// each output adds three u16 vertical sums at offsets 0, c and 2c. The
    /// sums (<= 9 * 255 + 4) stay in u16 lanes and are divided by the high
    /// half of a 16x16-bit multiply with `recip16(N)`, exact for these sums
    /// (same constant and formula as `Sample::div_round`, checked
    /// exhaustively by `sample::tests::u8_division_exact`). Steps that
    /// would run past the end are moved back to overlap the previous one
    /// (recomputing outputs is harmless: each depends only on the source).
    #[target_feature(enable = "avx2")]
    fn mean_u8_avx2<const R: usize, const N: u32>(rows: &[&[u8]; 3], o: &mut [MaybeUninit<u8>], c: usize) -> usize {
        let n = o.len();
        if n < 64 {
            return 0;
        }
        let m = _mm256_set1_epi16(super::super::sample::recip16(N) as i16);
        let half = _mm256_set1_epi16((N / 2) as i16);
        let mut vbuf = [0u16; MEAN_CHUNK + 8];
        let mut i0 = 0;
        while i0 < n {
            let mut len = (n - i0).min(MEAN_CHUNK);
            if len < 64 {
                i0 = n - 64;
                len = 64;
            }
            // Vertical sums for positions i0 .. i0 + len + 2c.
            let vl = len + 2 * c;
            let mut j = 0;
            loop {
                if j + 16 > vl {
                    if j == vl {
                        break;
                    }
                    j = vl - 16;
                }
                let mut v = _mm256_setzero_si256();
                for row in rows.iter().take(R) {
                    let s: &[u8; 16] = row[i0 + j..i0 + j + 16].try_into().unwrap();
                    // SAFETY: s is a 16-byte array.
                    let x = unsafe { _mm_loadu_si128(s.as_ptr().cast()) };
                    v = _mm256_add_epi16(v, _mm256_cvtepu8_epi16(x));
                }
                let d: &mut [u16; 16] = (&mut vbuf[j..j + 16]).try_into().unwrap();
                // SAFETY: d is a 16-element u16 array (32 bytes).
                unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), v) };
                j += 16;
            }
            // Horizontal 3-tap on the vertical sums, 32 outputs per step.
            let mut t = 0;
            loop {
                if t + 32 > len {
                    if t == len {
                        break;
                    }
                    t = len - 32;
                }
                let mut q = [_mm256_setzero_si256(); 2];
                for (h, qh) in q.iter_mut().enumerate() {
                    let mut s = half;
                    for k in 0..3 {
                        let b = t + 16 * h + k * c;
                        let x: &[u16; 16] = vbuf[b..b + 16].try_into().unwrap();
                        // SAFETY: x is a 16-element u16 array (32 bytes).
                        s = _mm256_add_epi16(s, unsafe { _mm256_loadu_si256(x.as_ptr().cast()) });
                    }
                    *qh = _mm256_mulhi_epu16(s, m);
                }
                // packus interleaves 64-bit halves per 128-bit lane; permute back.
                let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(q[0], q[1]));
                let d: &mut [MaybeUninit<u8>; 32] = (&mut o[i0 + t..i0 + t + 32]).try_into().unwrap();
                // SAFETY: d is a 32-byte array.
                unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), p) };
                t += 32;
            }
            i0 += len;
        }
        n
    }

    /// [`mean_u8_avx2`] with 512-bit vectors (32 vertical sums, 64 outputs
    /// per step), and pointer arithmetic instead of per-load bounds checks
    /// (bounds asserted once per call).
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn mean_u8_avx512<const R: usize, const N: u32>(rows: &[&[u8]; 3], o: &mut [MaybeUninit<u8>], c: usize) -> usize {
        let n = o.len();
        if n < 64 {
            return 0;
        }
        // Every row has the n outputs' windows: n + 2c samples.
        let rp: [*const u8; 3] = std::array::from_fn(|r| {
            if r < R {
                assert!(rows[r].len() >= n + 2 * c);
            }
            rows[r].as_ptr()
        });
        let m = _mm512_set1_epi16(super::super::sample::recip16(N) as i16);
        let half = _mm512_set1_epi16((N / 2) as i16);
        let fix = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
        let mut vbuf = [0u16; MEAN_CHUNK + 8];
        assert!(c <= 4);
        let vp = vbuf.as_mut_ptr();
        let op = o.as_mut_ptr().cast::<u8>();
        let mut i0 = 0;
        while i0 < n {
            let mut len = (n - i0).min(MEAN_CHUNK);
            if len < 64 {
                i0 = n - 64;
                len = 64;
            }
            // Invariants: 64 <= len <= MEAN_CHUNK, i0 + len <= n.
            let vl = len + 2 * c;
            let mut j = 0;
            loop {
                if j + 32 > vl {
                    if j == vl {
                        break;
                    }
                    j = vl - 32;
                }
                let mut v = _mm512_setzero_si512();
                for p in rp.iter().take(R) {
                    // SAFETY: i0 + j + 32 <= i0 + vl = i0 + len + 2c <= n + 2c,
                    // which every row's length was asserted to reach.
                    let x = unsafe { _mm256_loadu_si256(p.add(i0 + j).cast()) };
                    v = _mm512_add_epi16(v, _mm512_cvtepu8_epi16(x));
                }
                // SAFETY: j + 32 <= vl <= MEAN_CHUNK + 8 = vbuf.len().
                unsafe { _mm512_storeu_si512(vp.add(j).cast(), v) };
                j += 32;
            }
            let mut t = 0;
            loop {
                if t + 64 > len {
                    if t == len {
                        break;
                    }
                    t = len - 64;
                }
                let mut q = [_mm512_setzero_si512(); 2];
                for (h, qh) in q.iter_mut().enumerate() {
                    let mut s = half;
                    for k in 0..3 {
                        // SAFETY: t + 32h + kc + 32 <= len + 2c = vl <= vbuf.len().
                        let x = unsafe { _mm512_loadu_si512(vp.add(t + 32 * h + k * c).cast()) };
                        s = _mm512_add_epi16(s, x);
                    }
                    *qh = _mm512_mulhi_epu16(s, m);
                }
                let p = _mm512_permutexvar_epi64(fix, _mm512_packus_epi16(q[0], q[1]));
                // SAFETY: i0 + t + 64 <= i0 + len <= n = o.len().
                unsafe { _mm512_storeu_si512(op.add(i0 + t).cast(), p) };
                t += 64;
            }
            i0 += len;
        }
        n
    }

    /// pshufb masks reversing the order of the B-byte pixels in 48 bytes
    /// (48 is a multiple of every pixel size): `MASKS[q][r]` picks, for output
    /// vector q, the bytes that come from input vector r (-128 = zero).
    const fn reverse_masks(b: usize) -> ([[[i8; 16]; 3]; 3], [[bool; 3]; 3]) {
        let mut m = [[[-128i8; 16]; 3]; 3];
        let mut used = [[false; 3]; 3];
        let mut ob = 0;
        while ob < 48 {
            let ib = 48 - b * (ob / b + 1) + ob % b;
            m[ob / 16][ib / 16][ob % 16] = (ib % 16) as i8;
            used[ob / 16][ib / 16] = true;
            ob += 1;
        }
        (m, used)
    }

    struct Rev<const B: usize>;
    impl<const B: usize> Rev<B> {
        const TABLES: ([[[i8; 16]; 3]; 3], [[bool; 3]; 3]) = reverse_masks(B);
    }

    /// `dst` = `src` with its B-byte pixels in reverse order (same length).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn reverse_row<const B: usize>(src: &[u8], dst: &mut [MaybeUninit<u8>]) {
        let n = src.len();
        let (masks, used) = Rev::<B>::TABLES;
        let chunks = n / 48;
        for i in 0..chunks {
            let s: &[u8; 48] = src[n - 48 * (i + 1)..n - 48 * i].try_into().unwrap();
            let d: &mut [MaybeUninit<u8>; 48] = (&mut dst[48 * i..48 * i + 48]).try_into().unwrap();
            // SAFETY: s and d are 48-byte arrays: the loads read bytes
            // 0..16, 16..32, 32..48 of s and the stores write the same of d.
            let v = unsafe {
                [_mm_loadu_si128(s.as_ptr().cast()), _mm_loadu_si128(s.as_ptr().add(16).cast()), _mm_loadu_si128(s.as_ptr().add(32).cast())]
            };
            for q in 0..3 {
                let mut o = _mm_setzero_si128();
                for r in 0..3 {
                    if used[q][r] {
                        // SAFETY: the mask is a 16-byte array read in full.
                        let m = unsafe { _mm_loadu_si128(masks[q][r].as_ptr().cast()) };
                        o = _mm_or_si128(o, _mm_shuffle_epi8(v[r], m));
                    }
                }
                // SAFETY: bytes 16q..16q+16 of the 48-byte d.
                unsafe { _mm_storeu_si128(d.as_mut_ptr().add(16 * q).cast(), o) };
            }
        }
        let rem = n - 48 * chunks;
        let (s, _) = src[..rem].as_chunks::<B>();
        rotate::reverse_copy(s, super::pixels_uninit::<B>(&mut dst[48 * chunks..]));
    }
}
