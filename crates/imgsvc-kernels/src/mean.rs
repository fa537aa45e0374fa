//! Portable 3x3 mean filter kernels, written for auto-vectorisation.
//!
//! Each output row is computed directly from the (up to) three source rows
//! around it: no scratch buffers. The interior samples of a row are one
//! straight loop over offset slices (`i - c`, `i`, `i + c` in each row) whose
//! 9 (or 6, or 3) loads, adds and the multiply-and-shift division the
//! compiler turns into SIMD; the first and last pixel of each row (the left
//! and right edges) are done apart, as are the top and bottom rows (2 source
//! rows) and one-row images (1 source row). Every output sample of a band
//! is written (the destination may be uninitialised).

use std::mem::MaybeUninit;

use super::{Layout, Sample};

/// A kernel for the start of a row's interior: given the source rows
/// (each `o.len() + 2c` samples; output sample `i` averages `row[i]`,
/// `row[i + c]`, `row[i + 2c]` of every row) it writes a prefix of `o`
/// (possibly uninitialised) and returns its length; the portable loop writes
/// the rest. Nothing else writes the prefix it claims, so every sample of it
/// must be written when it returns. [`no_fast`] writes nothing.
pub(super) type Interior<T> = fn(rows: &[&[T]], o: &mut [MaybeUninit<T>], c: usize) -> usize;

pub(super) fn no_fast<T>(_: &[&[T]], _: &mut [MaybeUninit<T>], _: usize) -> usize {
    0
}

/// For bands whose row interiors a band-level kernel already wrote (all of
/// them, in every row: `mean_band_avx512`): claims the whole interior, so
/// only the edge pixels are computed here.
pub(super) fn interior_done<T>(_: &[&[T]], o: &mut [MaybeUninit<T>], _: usize) -> usize {
    o.len()
}

/// Output rows `row0..row0 + dst.len() / row_len` of the mean filter, every
/// sample written.
#[inline(always)]
pub(super) fn mean_band<T: Sample>(src: &[T], layout: Layout, dst: &mut [MaybeUninit<T>], row0: usize, fast: Interior<T>) {
    let (h, c) = (layout.height(), layout.channels());
    let rs = layout.row_samples();
    let row = |y: usize| &src[y * rs..y * rs + rs];
    for (i, drow) in dst.chunks_exact_mut(rs).enumerate() {
        let y = row0 + i;
        match (y > 0, y + 1 < h) {
            (true, true) => mean_row::<T, 3, 9, 6, 3>([row(y - 1), row(y), row(y + 1)], drow, c, fast),
            (false, true) => mean_row::<T, 2, 6, 4, 2>([row(y), row(y + 1)], drow, c, fast),
            (true, false) => mean_row::<T, 2, 6, 4, 2>([row(y - 1), row(y)], drow, c, fast),
            (false, false) => mean_row::<T, 1, 3, 2, 1>([row(y)], drow, c, fast),
        }
    }
}

/// One output row from `R` source rows. `NI`, `NE`, `N1` are the window
/// sizes for interior pixels (3R), the two end pixels (2R) and a one-pixel
/// wide image (R).
#[inline(always)]
fn mean_row<T: Sample, const R: usize, const NI: u32, const NE: u32, const N1: u32>(
    rows: [&[T]; R],
    out: &mut [MaybeUninit<T>],
    c: usize,
    fast: Interior<T>,
) {
    let len = out.len();
    let w = len / c;
    let vsum = |i: usize| {
        let mut s = rows[0][i].acc();
        for r in rows.iter().skip(1) {
            s = s + r[i].acc();
        }
        s
    };
    if w == 1 {
        for (k, o) in out.iter_mut().enumerate() {
            o.write(T::div_round::<N1>(vsum(k)));
        }
        return;
    }
    // Left and right edge pixels: 2 columns each.
    for k in 0..c {
        out[k] = MaybeUninit::new(T::div_round::<NE>(vsum(k) + vsum(k + c)));
        let j = len - c + k;
        out[j] = MaybeUninit::new(T::div_round::<NE>(vsum(j - c) + vsum(j)));
    }
    if w == 2 {
        return;
    }
    let rows: &[&[T]] = &rows;
    let done = fast(rows, &mut out[c..len - c], c);
    // The rest of the interior, from sample `done` on.
    let rows: [&[T]; R] = std::array::from_fn(|r| &rows[r][done..]);
    let rows: &[&[T]] = &rows;
    let n = len - 2 * c - done;
    let o = &mut out[c + done..c + done + n];
    // Interior: o[i] = sum over rows of row[i] + row[i + c] + row[i + 2c].
    match R {
        3 => {
            let (a0, a1, a2) = (&rows[0][..n], &rows[0][c..c + n], &rows[0][2 * c..2 * c + n]);
            let (b0, b1, b2) = (&rows[1][..n], &rows[1][c..c + n], &rows[1][2 * c..2 * c + n]);
            let (c0, c1, c2) = (&rows[2][..n], &rows[2][c..c + n], &rows[2][2 * c..2 * c + n]);
            for i in 0..n {
                let s = (a0[i].acc() + a1[i].acc() + a2[i].acc())
                    + (b0[i].acc() + b1[i].acc() + b2[i].acc())
                    + (c0[i].acc() + c1[i].acc() + c2[i].acc());
                o[i] = MaybeUninit::new(T::div_round::<NI>(s));
            }
        }
        2 => {
            let (a0, a1, a2) = (&rows[0][..n], &rows[0][c..c + n], &rows[0][2 * c..2 * c + n]);
            let (b0, b1, b2) = (&rows[1][..n], &rows[1][c..c + n], &rows[1][2 * c..2 * c + n]);
            for i in 0..n {
                let s = (a0[i].acc() + a1[i].acc() + a2[i].acc()) + (b0[i].acc() + b1[i].acc() + b2[i].acc());
                o[i] = MaybeUninit::new(T::div_round::<NI>(s));
            }
        }
        _ => {
            let (a0, a1, a2) = (&rows[0][..n], &rows[0][c..c + n], &rows[0][2 * c..2 * c + n]);
            for i in 0..n {
                let s = a0[i].acc() + a1[i].acc() + a2[i].acc();
                o[i] = MaybeUninit::new(T::div_round::<NI>(s));
            }
        }
    }
}
