//! Deliberately plain, obviously-correct implementations used as the test
//! oracle. They index pixel by pixel straight from the definitions and are
//! slow; never use them on a hot path.
//!
//! Both panic if `src.len() != layout.samples()`.

use super::{Layout, QuarterTurns, Sample};

/// Rotation counter-clockwise by `turns`, straight from the definition of
/// each output pixel (`W`, `H` are the *input* width and height):
///
/// * 0:   out(x', y') = in(x', y')
/// * 90:  out(x', y') = in(W-1-y', x')        (output is H wide, W high)
/// * 180: out(x', y') = in(W-1-x', H-1-y')
/// * 270: out(x', y') = in(y', H-1-x')        (output is H wide, W high)
pub fn rotate<T: Sample>(src: &[T], layout: Layout, turns: QuarterTurns) -> Vec<T> {
    assert_eq!(src.len(), layout.samples(), "reference::rotate: source length");
    let (w, h, c) = (layout.width(), layout.height(), layout.channels());
    let out_layout = layout.rotated(turns);
    let (ow, oh) = (out_layout.width(), out_layout.height());
    let mut out = vec![T::default(); layout.samples()];
    for yo in 0..oh {
        for xo in 0..ow {
            let (x, y) = match turns {
                QuarterTurns::Zero => (xo, yo),
                QuarterTurns::One => (w - 1 - yo, xo),
                QuarterTurns::Two => (w - 1 - xo, h - 1 - yo),
                QuarterTurns::Three => (yo, h - 1 - xo),
            };
            for k in 0..c {
                out[(yo * ow + xo) * c + k] = src[(y * w + x) * c + k];
            }
        }
    }
    out
}

/// 3x3 mean filter: every output sample is the mean of the same channel over
/// the in-bounds pixels of the 3x3 window centred on it (n = 9 inside, 6 on
/// an edge, 4 at a corner; 3 / 2 / 1 for one-pixel-wide images), rounded to
/// nearest with halves up: `(sum + n/2) / n`.
pub fn mean_filter<T: Sample>(src: &[T], layout: Layout) -> Vec<T> {
    assert_eq!(src.len(), layout.samples(), "reference::mean_filter: source length");
    let (w, h, c) = (layout.width() as i64, layout.height() as i64, layout.channels());
    let mut out = vec![T::default(); layout.samples()];
    for y in 0..h {
        for x in 0..w {
            for k in 0..c {
                let mut sum = 0u32;
                let mut n = 0u32;
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (xx, yy) = (x + dx, y + dy);
                        if xx >= 0 && xx < w && yy >= 0 && yy < h {
                            sum += src[((yy * w + xx) as usize) * c + k].to_u32();
                            n += 1;
                        }
                    }
                }
                out[((y * w + x) as usize) * c + k] = T::from_u32((sum + n / 2) / n);
            }
        }
    }
    out
}
