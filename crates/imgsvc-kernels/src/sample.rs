//! The [`Sample`] trait: the per-channel sample types the kernels accept.

use std::fmt::Debug;
use std::ops::Add;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
}

/// A channel sample: implemented for `u8` (8-bit images) and `u16` (16-bit
/// images). Sealed; the hidden items are implementation details of the
/// kernels.
pub trait Sample: Copy + Default + Debug + PartialEq + Eq + Send + Sync + 'static + sealed::Sealed {
    /// Largest sample value (255 or 65535).
    const MAX: Self;

    /// Accumulator wide enough for an exact sum of 9 samples
    /// (`u16` for `u8`: 9 * 255 = 2295; `u32` for `u16`: 9 * 65535 = 589815).
    #[doc(hidden)]
    type Acc: Copy + Add<Output = Self::Acc> + Debug;

    #[doc(hidden)]
    fn acc(self) -> Self::Acc;

    /// `(sum + N/2) / N` (round to nearest, halves up) for `N` in 1..=9,
    /// for every `sum <= 9 * MAX` that a window of `N` samples can produce.
    #[doc(hidden)]
    fn div_round<const N: u32>(sum: Self::Acc) -> Self;

    /// Lossless widening, used by the reference implementation.
    fn to_u32(self) -> u32;

    /// Narrowing from a value known to be `<= MAX`; used by the reference
    /// implementation. Panics (debug) / truncates (release) otherwise.
    fn from_u32(v: u32) -> Self;
}

/// Multiplier `m` such that `((x * m) >> 16) == x / n` for every
/// `x <= 2 * 255 * n` (more than the largest rounded sum a window of `n`
/// u8 samples produces). Verified exhaustively by `tests::u8_division_exact`.
pub(super) const fn recip16(n: u32) -> u32 {
    65536u32.div_ceil(n)
}

/// Multiplier for dividing a u8 window sum by `n` with rounding in one
/// signed "multiply high with round" (`pmulhrsw`): `(sum * m + 2^14) >> 15`
/// equals `(sum + n/2) / n` for every `sum <= 255 * n` (checked exhaustively
/// by `tests::u8_mulhrs_division_exact`), so the SIMD kernels need no
/// separate `+ n/2`.
pub(super) const fn recip15(n: u32) -> u32 {
    32768u32.div_ceil(n)
}

/// The scalar model of that instruction on non-negative 16-bit inputs.
#[cfg(test)]
const fn mulhrs(x: u32, m: u32) -> u32 {
    (x * m + (1 << 14)) >> 15
}

impl Sample for u8 {
    const MAX: u8 = u8::MAX;
    type Acc = u16;

    #[inline(always)]
    fn acc(self) -> u16 {
        u16::from(self)
    }

    #[inline(always)]
    fn div_round<const N: u32>(sum: u16) -> u8 {
        // sum <= 255 * N, so sum + N/2 < 65536 and the product below fits u32.
        // Written as a 16x16 -> high-16 multiply, which vectorises to
        // pmulhuw / vpmulhuw.
        let x = sum + (N / 2) as u16;
        match N {
            1 => x as u8,
            2 => (x >> 1) as u8,
            4 => (x >> 2) as u8,
            8 => (x >> 3) as u8,
            _ => ((u32::from(x) * recip16(N)) >> 16) as u8,
        }
    }

    #[inline(always)]
    fn to_u32(self) -> u32 {
        u32::from(self)
    }

    #[inline(always)]
    fn from_u32(v: u32) -> u8 {
        debug_assert!(v <= 255);
        v as u8
    }
}

impl Sample for u16 {
    const MAX: u16 = u16::MAX;
    type Acc = u32;

    #[inline(always)]
    fn acc(self) -> u32 {
        u32::from(self)
    }

    #[inline(always)]
    fn div_round<const N: u32>(sum: u32) -> u16 {
        // Plain division by a constant: the compiler emits an exact
        // multiply-and-shift; sum <= 9 * 65535 so sum + N/2 cannot overflow.
        ((sum + N / 2) / N) as u16
    }

    #[inline(always)]
    fn to_u32(self) -> u32 {
        u32::from(self)
    }

    #[inline(always)]
    fn from_u32(v: u32) -> u16 {
        debug_assert!(v <= 65535);
        v as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_u8<const N: u32>() {
        for sum in 0..=(255 * N) {
            let expect = (sum + N / 2) / N;
            assert_eq!(u32::from(u8::div_round::<N>(sum as u16)), expect, "u8 N={N} sum={sum}");
        }
    }

    fn check_u16<const N: u32>() {
        for sum in 0..=(65535 * N) {
            let expect = (sum + N / 2) / N;
            assert_eq!(u32::from(u16::div_round::<N>(sum)), expect, "u16 N={N} sum={sum}");
        }
    }

    #[test]
    fn u8_division_exact() {
        check_u8::<1>();
        check_u8::<2>();
        check_u8::<3>();
        check_u8::<4>();
        check_u8::<6>();
        check_u8::<9>();
    }

    #[test]
    fn u8_mulhrs_division_exact() {
        for n in [1, 2, 3, 4, 6, 9] {
            for sum in 0..=(255 * n) {
                assert_eq!(mulhrs(sum, recip15(n)), (sum + n / 2) / n, "n={n} sum={sum}");
            }
        }
    }

    #[test]
    fn u16_division_exact() {
        check_u16::<1>();
        check_u16::<2>();
        check_u16::<3>();
        check_u16::<4>();
        check_u16::<6>();
        check_u16::<9>();
    }
}
