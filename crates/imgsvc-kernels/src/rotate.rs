//! Portable rotation kernels over whole pixels `P` (`[u8; B]`, `B` = bytes
//! per pixel). Each kernel fills a band of output rows `row0..row0 + rows`,
//! writing every pixel of it into a destination that may be uninitialised.
//!
//! 90° and 270° are transposes (plus a flip), done in cache-sized tiles so
//! that both the strided source reads and the destination writes stay in L1.
//! 180° is a row reversal, 0° a copy.

use std::mem::MaybeUninit;

use super::{QuarterTurns, simd};

/// Parallel bands start on a multiple of this many output rows, so band
/// edges fall on tile edges.
pub(super) const BAND_ROW_ALIGN: usize = 64;

/// Tile edge (pixels) for the portable transpose, chosen per pixel size so a
/// tile's source and destination lines fit in L1.
pub(super) const fn tile_for(bytes_per_pixel: usize) -> usize {
    match bytes_per_pixel {
        1 => 64,
        2 => 64,
        3 | 4 => 32,
        _ => 16,
    }
}

/// Rotates the band of output rows starting at `row0` (`dst` holds whole
/// output rows, every pixel written). `src` is `w` x `h` pixels.
#[inline(always)]
pub(super) fn rotate_band<P: Copy>(src: &[P], w: usize, h: usize, turns: QuarterTurns, dst: &mut [MaybeUninit<P>], row0: usize) {
    match turns {
        QuarterTurns::Zero => simd::write_copy(dst, &src[row0 * w..row0 * w + dst.len()]),
        QuarterTurns::Two => {
            for (i, drow) in dst.chunks_exact_mut(w).enumerate() {
                let y = h - 1 - (row0 + i);
                let srow = &src[y * w..y * w + w];
                reverse_copy(srow, drow);
            }
        }
        QuarterTurns::One | QuarterTurns::Three => transpose_band::<P>(src, w, h, turns == QuarterTurns::One, dst, row0),
    }
}

/// `dst[i] = src[len - 1 - i]`.
#[inline(always)]
pub(super) fn reverse_copy<P: Copy>(src: &[P], dst: &mut [MaybeUninit<P>]) {
    for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
        d.write(*s);
    }
}

/// Output rows `row0..` of a 90° (`ccw90 == true`) or 270° rotation.
/// Output is `h` wide. 90°: output row `y'` is source column `w-1-y'`, read
/// top to bottom. 270°: output row `y'` is source column `y'`, read bottom
/// to top.
#[inline(always)]
pub(super) fn transpose_band<P: Copy>(src: &[P], w: usize, h: usize, ccw90: bool, dst: &mut [MaybeUninit<P>], row0: usize) {
    let rows = dst.len() / h;
    transpose_region(src, w, h, ccw90, dst, row0, 0..rows, 0..h);
}

/// Like [`transpose_band`] but only for band-relative output rows `rows`
/// and output columns `cols`, in tiles.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn transpose_region<P: Copy>(
    src: &[P],
    w: usize,
    h: usize,
    ccw90: bool,
    dst: &mut [MaybeUninit<P>],
    row0: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    let tile = tile_for(size_of::<P>());
    let mut r = rows.start;
    while r < rows.end {
        let r_end = (r + tile).min(rows.end);
        let mut c = cols.start;
        while c < cols.end {
            let c_end = (c + tile).min(cols.end);
            for yo in r..r_end {
                let x = if ccw90 { w - 1 - (row0 + yo) } else { row0 + yo };
                let drow = &mut dst[yo * h + c..yo * h + c_end];
                let col = &src[x..];
                if ccw90 {
                    // out(x', y') = in(w-1-y', x'): source row = x'.
                    for (k, d) in drow.iter_mut().enumerate() {
                        d.write(col[(c + k) * w]);
                    }
                } else {
                    // out(x', y') = in(y', h-1-x'): source row = h-1-x'.
                    for (k, d) in drow.iter_mut().enumerate() {
                        d.write(col[(h - 1 - (c + k)) * w]);
                    }
                }
            }
            c = c_end;
        }
        r = r_end;
    }
}
