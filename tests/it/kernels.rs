//! Kernel tests: hand-worked examples, fast paths vs the reference (property
//! tests and exhaustive small-size sweeps on every available SIMD path),
//! invariants, parallel == single, and error reporting.
//!
//! Destinations start filled with [`sentinel`], not zeros: the kernels must
//! write every output sample (the allocating forms give them uninitialised
//! memory), and a sample a path leaves unwritten then differs from the
//! reference.

use imgsvc::imaging::{
    ImagingError, KernelPath, Layout, PARALLEL_MIN_PIXELS, Parallelism, QuarterTurns, Sample, available_paths, mean_filter,
    mean_filter_into, mean_filter_into_using, reference, rotate, rotate_into, rotate_into_using,
};
use proptest::prelude::*;

const TURNS: [QuarterTurns; 4] = [QuarterTurns::Zero, QuarterTurns::One, QuarterTurns::Two, QuarterTurns::Three];

fn layout(w: usize, h: usize, c: usize) -> Layout {
    Layout::new(w, h, c).unwrap()
}

/// Deterministic pseudo-random samples covering the whole range of `T`.
fn noise<T: Sample>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_u32(((s >> 24) as u32) % (T::MAX.to_u32() + 1))
        })
        .collect()
}

/// What destinations hold before a kernel writes them: 0xA5 in every byte.
fn sentinel<T: Sample>() -> T {
    T::from_u32(0xA5A5 & T::MAX.to_u32())
}

fn rotate_on<T: Sample>(path: KernelPath, src: &[T], l: Layout, t: QuarterTurns) -> Vec<T> {
    let mut dst = vec![sentinel(); l.samples()];
    rotate_into_using(path, src, l, t, &mut dst, Parallelism::Single).unwrap();
    dst
}

fn mean_on<T: Sample>(path: KernelPath, src: &[T], l: Layout) -> Vec<T> {
    let mut dst = vec![sentinel(); l.samples()];
    mean_filter_into_using(path, src, l, &mut dst, Parallelism::Single).unwrap();
    dst
}

/// Every available path, both ops, all turns, against the reference.
fn check_all_paths<T: Sample>(src: &[T], l: Layout) {
    let paths = available_paths();
    for t in TURNS {
        let want = reference::rotate(src, l, t);
        for &path in &paths {
            assert!(rotate_on(path, src, l, t) == want, "rotate {t:?} {l:?} path {path:?}");
        }
    }
    let want = reference::mean_filter(src, l);
    for &path in &paths {
        assert!(mean_on(path, src, l) == want, "mean {l:?} path {path:?}");
    }
}

// ---------------------------------------------------------------------------
// Hand-worked examples.

#[test]
fn rotate_2x3_hand_worked() {
    // 2 wide, 3 high:      90° CCW (3 wide, 2 high):   270° CCW:     180°:
    //   1 2                  2 4 6                       5 3 1          6 5
    //   3 4                  1 3 5                       6 4 2          4 3
    //   5 6                                                             2 1
    let src: Vec<u8> = vec![1, 2, 3, 4, 5, 6];
    let l = layout(2, 3, 1);
    for path in available_paths() {
        assert_eq!(rotate_on(path, &src, l, QuarterTurns::One), vec![2, 4, 6, 1, 3, 5]);
        assert_eq!(rotate_on(path, &src, l, QuarterTurns::Three), vec![5, 3, 1, 6, 4, 2]);
        assert_eq!(rotate_on(path, &src, l, QuarterTurns::Two), vec![6, 5, 4, 3, 2, 1]);
        assert_eq!(rotate_on(path, &src, l, QuarterTurns::Zero), src);
    }
    assert_eq!(reference::rotate(&src, l, QuarterTurns::One), vec![2, 4, 6, 1, 3, 5]);
    assert_eq!(reference::rotate(&src, l, QuarterTurns::Three), vec![5, 3, 1, 6, 4, 2]);
    assert_eq!(l.rotated(QuarterTurns::One), layout(3, 2, 1));
}

#[test]
fn rotate_2x3_two_channels_hand_worked() {
    // Pixels keep their channel order: pixel p = [10p, 10p+1].
    let src: Vec<u16> = (1..=6).flat_map(|p| [10 * p, 10 * p + 1]).collect();
    let l = layout(2, 3, 2);
    let px = |p: u16| [10 * p, 10 * p + 1];
    let expect: Vec<u16> = [2, 4, 6, 1, 3, 5].into_iter().flat_map(px).collect();
    assert_eq!(rotate(&src, l, QuarterTurns::One).unwrap(), expect);
}

#[test]
fn mean_hand_worked() {
    // 3x3 image 1..9 (one channel):
    // corner (0,0): 1+2+4+5 = 12 / 4 = 3
    // edge (1,0):   1+2+3+4+5+6 = 21 / 6 = 3.5 -> 4 (half up)
    // corner (2,0): 2+3+5+6 = 16 / 4 = 4
    // edge (0,1):   1+2+4+5+7+8 = 27 / 6 = 4.5 -> 5
    // centre:       45 / 9 = 5
    // edge (2,1):   2+3+5+6+8+9 = 33 / 6 = 5.5 -> 6
    // corner (0,2): 4+5+7+8 = 24 / 4 = 6
    // edge (1,2):   4+5+6+7+8+9 = 39 / 6 = 6.5 -> 7
    // corner (2,2): 5+6+8+9 = 28 / 4 = 7
    let src: Vec<u8> = (1..=9).collect();
    let want: Vec<u8> = vec![3, 4, 4, 5, 5, 6, 6, 7, 7];
    for path in available_paths() {
        assert_eq!(mean_on(path, &src, layout(3, 3, 1)), want, "{path:?}");
    }
    assert_eq!(reference::mean_filter(&src, layout(3, 3, 1)), want);
    // 1x4 and 4x1: ends average 2 values, middles 3: [1,2,4,7] ->
    // (1+2+1)/2=2, (1+2+4+1)/3=2, (2+4+7+1)/3=4, (4+7+1)/2=6
    let line: Vec<u8> = vec![1, 2, 4, 7];
    assert_eq!(mean_filter(&line, layout(4, 1, 1)).unwrap(), vec![2, 2, 4, 6]);
    assert_eq!(mean_filter(&line, layout(1, 4, 1)).unwrap(), vec![2, 2, 4, 6]);
    // 1x1 is itself.
    assert_eq!(mean_filter(&[200u8], layout(1, 1, 1)).unwrap(), vec![200]);
    // Channels are independent: 2x1 RGB.
    let rgb: Vec<u8> = vec![0, 255, 10, 1, 254, 13];
    assert_eq!(mean_filter(&rgb, layout(2, 1, 3)).unwrap(), vec![1, 255, 12, 1, 255, 12]);
    // u16 half-up rounding with large values: 2x2 all corners, sum/4.
    let big: Vec<u16> = vec![65535, 65534, 65535, 65535];
    assert_eq!(mean_filter(&big, layout(2, 2, 1)).unwrap(), vec![65535; 4]); // 262139/4 = 65534.75
}

// ---------------------------------------------------------------------------
// Exhaustive boundary sweep: every width and height 1..=67, channels 1..=4.

#[test]
fn sweep_u8_all_sizes_all_paths() {
    for c in 1..=4 {
        for h in 1..=67 {
            for w in 1..=67 {
                let l = layout(w, h, c);
                let src: Vec<u8> = noise(l.samples(), (w * 1000 + h * 10 + c) as u64);
                check_all_paths(&src, l);
            }
        }
    }
}

#[test]
fn sweep_u16_all_sizes_all_paths() {
    // u16 pixels are 2-8 bytes: this also covers the 6- and 8-byte rotation paths.
    for c in 1..=4 {
        for h in (1..=67).filter(|h| *h <= 20 || h % 3 == 0 || *h >= 60) {
            for w in 1..=67 {
                let l = layout(w, h, c);
                let src: Vec<u16> = noise(l.samples(), (w * 1000 + h * 10 + c) as u64 + 7);
                check_all_paths(&src, l);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Property tests.

fn dims() -> impl Strategy<Value = (usize, usize, usize)> {
    let small = 1usize..=9;
    let any = 1usize..=300;
    prop_oneof![
        (small.clone(), small.clone(), 1usize..=4),
        (Just(1usize), any.clone(), 1usize..=4),
        (any.clone(), Just(1usize), 1usize..=4),
        (any.clone(), any.clone(), 1usize..=4),
        (300usize..=700, 300usize..=700, 1usize..=4),
    ]
}

/// Every kernel form and CPU path equals the reference for `src`.
fn matches_reference<T: Sample>(src: Vec<T>, l: Layout, t: QuarterTurns) -> Result<(), TestCaseError> {
    let (want_r, want_m) = (reference::rotate(&src, l, t), reference::mean_filter(&src, l));
    prop_assert!(rotate(&src, l, t).unwrap() == want_r);
    prop_assert!(mean_filter(&src, l).unwrap() == want_m);
    for path in available_paths() {
        prop_assert!(rotate_on(path, &src, l, t) == want_r, "{:?}", path);
        prop_assert!(mean_on(path, &src, l) == want_m, "{:?}", path);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn prop_u8_matches_reference((w, h, c) in dims(), seed in any::<u64>(), t in 0i64..4) {
        matches_reference(noise::<u8>(layout(w, h, c).samples(), seed), layout(w, h, c), QuarterTurns::from_count(t))?;
    }

    #[test]
    fn prop_u16_matches_reference((w, h, c) in dims(), seed in any::<u64>(), t in 0i64..4) {
        matches_reference(noise::<u16>(layout(w, h, c).samples(), seed), layout(w, h, c), QuarterTurns::from_count(t))?;
    }

    #[test]
    fn prop_rotation_invariants((w, h, c) in dims(), seed in any::<u64>(), a in -8i64..8, b in -8i64..8) {
        let l = layout(w, h, c);
        let src: Vec<u8> = noise(l.samples(), seed);
        let (ta, tb) = (QuarterTurns::from_count(a), QuarterTurns::from_count(b));
        // Rotating by a then b equals rotating by the composition.
        let ab = rotate(&rotate(&src, l, ta).unwrap(), l.rotated(ta), tb).unwrap();
        prop_assert!(ab == rotate(&src, l, ta.then(tb)).unwrap());
        prop_assert_eq!(l.rotated(ta).rotated(tb), l.rotated(ta.then(tb)));
        // A rotation followed by its inverse is the identity.
        let back = rotate(&rotate(&src, l, ta).unwrap(), l.rotated(ta), ta.inverse()).unwrap();
        prop_assert!(back == src);
    }
}

// ---------------------------------------------------------------------------
// Invariants.

#[test]
fn quarter_turns_algebra() {
    for n in -9i64..9 {
        let t = QuarterTurns::from_count(n);
        assert_eq!(i64::from(t.count()), n.rem_euclid(4));
        assert_eq!(t.then(t.inverse()), QuarterTurns::Zero);
        for m in -5i64..5 {
            assert_eq!(t.then(QuarterTurns::from_count(m)), QuarterTurns::from_count(n + m));
        }
    }
    assert_eq!(QuarterTurns::One.degrees(), 90);
}

#[test]
fn rotation_identities() {
    for (w, h, c) in [(1, 1, 1), (1, 7, 2), (7, 1, 3), (2, 2, 4), (33, 17, 3), (130, 67, 1), (64, 64, 4)] {
        let l = layout(w, h, c);
        let src: Vec<u8> = noise(l.samples(), 5);
        let mut img = src.clone();
        let mut cur = l;
        for _ in 0..4 {
            img = rotate(&img, cur, QuarterTurns::One).unwrap();
            let next = cur.rotated(QuarterTurns::One);
            assert_eq!((next.width(), next.height()), (cur.height(), cur.width()));
            cur = next;
        }
        assert_eq!(cur, l);
        assert!(img == src, "four quarter turns {l:?}");
        let r90 = rotate(&src, l, QuarterTurns::One).unwrap();
        let back = rotate(&r90, l.rotated(QuarterTurns::One), QuarterTurns::Three).unwrap();
        assert!(back == src, "90 then 270 {l:?}");
        let r180 = rotate(&src, l, QuarterTurns::Two).unwrap();
        assert!(rotate(&r180, l, QuarterTurns::Two).unwrap() == src, "180 twice {l:?}");
        if (w, h) != (1, 1) && w * h > 1 && src.len() > c {
            // A non-trivial image really changes under 180 (noise is not symmetric).
            assert!(r180 != src || w * h == 1);
        }
    }
}

fn checkerboard<T: Sample>(l: Layout, hi: T) -> Vec<T> {
    let mut v = Vec::with_capacity(l.samples());
    for y in 0..l.height() {
        for x in 0..l.width() {
            for _ in 0..l.channels() {
                v.push(if (x + y) % 2 == 0 { T::default() } else { hi });
            }
        }
    }
    v
}

#[test]
fn mean_constant_and_extreme_images() {
    for (w, h, c) in [(1, 1, 1), (1, 9, 3), (9, 1, 2), (2, 2, 4), (37, 29, 3), (64, 3, 1)] {
        let l = layout(w, h, c);
        for v in [0u8, 1, 77, 254, 255] {
            let src = vec![v; l.samples()];
            for path in available_paths() {
                assert_eq!(mean_on(path, &src, l), src, "const {v} {l:?} {path:?}");
            }
        }
        for v in [0u16, 1, 4097, 65534, 65535] {
            let src = vec![v; l.samples()];
            for path in available_paths() {
                assert_eq!(mean_on(path, &src, l), src, "const {v} {l:?} {path:?}");
            }
        }
        let cb8 = checkerboard(l, 255u8);
        let cb16 = checkerboard(l, 65535u16);
        for path in available_paths() {
            assert_eq!(mean_on(path, &cb8, l), reference::mean_filter(&cb8, l), "{l:?} {path:?}");
            assert_eq!(mean_on(path, &cb16, l), reference::mean_filter(&cb16, l), "{l:?} {path:?}");
        }
    }
    // Checkerboard interior values worked by hand: a 0-centre has 4 of 9 at
    // 255 -> 1020/9 = 113.33 -> 113; a 255-centre has 5 -> 1275/9 = 141.67 -> 142.
    let l = layout(5, 5, 1);
    let out = mean_filter(&checkerboard(l, 255u8), l).unwrap();
    assert_eq!(out[2 * 5 + 2], 113);
    assert_eq!(out[5 + 2], 142);
    // Top edge, 0-centre at (2,0): 3 of 6 are 255 -> 765/6 = 127.5 -> 128.
    assert_eq!(out[2], 128);
}

// ---------------------------------------------------------------------------
// Parallelism.

/// Every path, single and parallel, into a sentinel-filled destination, and
/// the allocating forms (uninitialised buffers), equal the reference for
/// every rotation and the mean filter: so single == parallel, and no path
/// leaves an output sample unwritten.
fn all_forms_match_reference<T: Sample>(l: Layout, seed: u64) {
    let src: Vec<T> = noise(l.samples(), seed);
    let mut dst = vec![sentinel(); l.samples()];
    for t in TURNS {
        let want = reference::rotate(&src, l, t);
        for path in available_paths() {
            for par in [Parallelism::Single, Parallelism::Auto] {
                dst.fill(sentinel());
                rotate_into_using(path, &src, l, t, &mut dst, par).unwrap();
                assert!(dst == want, "rotate {t:?} {l:?} {path:?} {par:?}");
            }
        }
        assert!(rotate(&src, l, t).unwrap() == want, "rotate {t:?} {l:?} allocating");
    }
    let want = reference::mean_filter(&src, l);
    for path in available_paths() {
        for par in [Parallelism::Single, Parallelism::Auto] {
            dst.fill(sentinel());
            mean_filter_into_using(path, &src, l, &mut dst, par).unwrap();
            assert!(dst == want, "mean {l:?} {path:?} {par:?}");
        }
    }
    assert!(mean_filter(&src, l).unwrap() == want, "mean {l:?} allocating");
}

#[test]
fn parallel_equals_single_equals_reference() {
    // Run on a 4-thread pool so bands really split even on a 1-core runner.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    pool.install(|| {
        all_forms_match_reference::<u8>(layout(3840, 2160, 3), 1);
        // Just around the threshold (1 Mi pixels).
        all_forms_match_reference::<u8>(layout(1024, 1023, 1), 2);
        all_forms_match_reference::<u8>(layout(1024, 1024, 1), 3);
        all_forms_match_reference::<u16>(layout(1025, 1024, 2), 4);
        all_forms_match_reference::<u8>(layout(PARALLEL_MIN_PIXELS, 1, 4), 5);
        all_forms_match_reference::<u8>(layout(1, PARALLEL_MIN_PIXELS + 3, 3), 6);
        all_forms_match_reference::<u16>(layout(1031, 1029, 4), 7);
    });
    // And on the global pool.
    all_forms_match_reference::<u8>(layout(1100, 1000, 4), 8);
}

/// Every path writes every output sample, whatever the destination held
/// ([`all_forms_match_reference`] on a 4-thread pool, so images of at least
/// `PARALLEL_MIN_PIXELS` really split into bands), for thin, tiny and odd
/// shapes, sizes whose parallel bands (multiples of 64 output rows for
/// rotation) end short, every channel count, u8 and u16.
#[test]
fn every_output_sample_is_written() {
    let sizes = [
        // Below PARALLEL_MIN_PIXELS: one band.
        (1usize, 1usize),
        (1, 67),
        (67, 1),
        (2, 2),
        (17, 33),
        (65, 130),
        (130, 65),
        // At least PARALLEL_MIN_PIXELS, so split into bands: rotation bands
        // of exactly 64 output rows (1024 x 1024), bands with a short last
        // one (the odd sizes), one-pixel-high and -wide images.
        (1024, 1024),
        (1025, 1031),
        (1100, 1000),
        (4100, 257),
        (257, 4100),
        (PARALLEL_MIN_PIXELS + 5, 1),
        (1, PARALLEL_MIN_PIXELS + 3),
    ];
    assert!(sizes[7..].iter().all(|&(w, h)| w * h >= PARALLEL_MIN_PIXELS));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    pool.install(|| {
        for (w, h) in sizes {
            for c in 1..=4 {
                all_forms_match_reference::<u8>(layout(w, h, c), (w * 31 + h * 7 + c) as u64);
                all_forms_match_reference::<u16>(layout(w, h, c), (w * 31 + h * 7 + c) as u64 + 1);
            }
        }
    });
}

/// Parallel 90°/270° bands start where the SIMD groups are line-aligned for
/// the source at hand: check the split at many source alignments.
#[test]
fn parallel_bands_match_reference_at_every_source_alignment() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    let l = layout(2112, 1000, 1);
    assert!(l.pixels() >= PARALLEL_MIN_PIXELS);
    let noise: Vec<u8> = noise(l.samples() + 64, 11);
    pool.install(|| {
        for offset in (0..64).step_by(5) {
            let src = &noise[offset..offset + l.samples()];
            for t in [QuarterTurns::One, QuarterTurns::Three] {
                let want = reference::rotate(src, l, t);
                for path in available_paths() {
                    let mut dst = vec![sentinel(); l.samples()];
                    rotate_into_using(path, src, l, t, &mut dst, Parallelism::Auto).unwrap();
                    assert!(dst == want, "source offset {offset} {t:?} {path:?}");
                }
            }
        }
    });
}

/// Outputs of 16 MiB or more with 16-byte aligned output rows take the
/// streaming-store transpose: check it on every path, single and parallel.
#[test]
fn large_streaming_rotations_match_reference() {
    // RGB8 2053x2736: rows of 8208 bytes (a multiple of 16), so it streams too.
    // GRAY8 4160x4096: source rows a multiple of 64 bytes, so the gray kernel
    // also starts at the line-aligned output row.
    for (w, h, c) in [(4099usize, 4096usize, 1usize), (4160, 4096, 1), (2053, 2048, 4), (2053, 2736, 3)] {
        let l = layout(w, h, c);
        assert!(l.samples() >= 16 << 20);
        let src: Vec<u8> = noise(l.samples(), (w + c) as u64);
        for t in [QuarterTurns::One, QuarterTurns::Three] {
            let want = reference::rotate(&src, l, t);
            for path in available_paths() {
                for par in [Parallelism::Single, Parallelism::Auto] {
                    let mut dst = vec![sentinel(); l.samples()];
                    rotate_into_using(path, &src, l, t, &mut dst, par).unwrap();
                    assert!(dst == want, "{l:?} {t:?} {path:?} {par:?}");
                }
            }
        }
    }
}

/// The 90°/270° SIMD kernels start at the output row that makes their
/// source loads 32-byte aligned and cover the rows before it (and after the
/// last whole group) with overlapping groups: check every source alignment,
/// on sizes whose source rows are a multiple of 32 bytes, and odd ones
/// (GRAY8 with 2048- and 4096-byte output rows takes the tall-block kernel).
#[test]
fn quarter_turns_match_reference_at_every_source_alignment() {
    let sizes = [
        (96usize, 70usize, 1usize),
        (64, 33, 1),
        (160, 17, 2),
        (48, 40, 4),
        (40, 9, 4),
        (24, 70, 2),
        (99, 35, 1),
        (64, 64, 3),
        (1024, 67, 1),
        (192, 20, 1),
        (48, 2048, 1),
        (37, 4096, 1),
    ];
    for (w, h, c) in sizes {
        let l = layout(w, h, c);
        let noise: Vec<u8> = noise(l.samples() + 64, (w * h * c) as u64);
        for offset in 0..32 {
            let src = &noise[offset..offset + l.samples()];
            for t in [QuarterTurns::One, QuarterTurns::Three] {
                let want = reference::rotate(src, l, t);
                for path in available_paths() {
                    for par in [Parallelism::Single, Parallelism::Auto] {
                        let mut dst = vec![sentinel(); l.samples()];
                        rotate_into_using(path, src, l, t, &mut dst, par).unwrap();
                        assert!(dst == want, "{l:?} source offset {offset} {t:?} {path:?} {par:?}");
                    }
                }
            }
        }
    }
}

/// Mean-filter outputs of 16 MiB or more with rows a multiple of 64 bytes
/// take the streaming-store strips, which start at the first cache-line
/// boundary of the output: check them wherever the output buffer starts
/// relative to a line (and to the source), on every path, single and
/// parallel.
#[test]
fn large_streaming_mean_filter_matches_reference_at_every_alignment() {
    for (w, h, c) in [(4096usize, 4097usize, 1usize), (2048, 4097, 2), (2048, 2731, 3), (1024, 4097, 4)] {
        let l = layout(w, h, c);
        assert!(l.samples() >= 16 << 20 && (w * c) % 64 == 0);
        let src: Vec<u8> = noise(l.samples(), (w * c) as u64);
        let want = reference::mean_filter(&src, l);
        let mut buf = vec![sentinel(); l.samples() + 64];
        for offset in [0, 1, 2, 3, 4, 5, 17, 63] {
            for path in available_paths() {
                for par in [Parallelism::Single, Parallelism::Auto] {
                    let dst = &mut buf[offset..offset + l.samples()];
                    dst.fill(sentinel());
                    mean_filter_into_using(path, &src, l, dst, par).unwrap();
                    assert!(*dst == want[..], "{l:?} offset {offset} {path:?} {par:?}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Errors.

fn msg(e: &ImagingError) -> String {
    e.to_string()
}

#[test]
fn layout_errors() {
    let e = Layout::new(0, 5, 3).unwrap_err();
    assert_eq!(e, ImagingError::ZeroDimension { width: 0, height: 5, channels: 3 });
    assert!(msg(&e).contains("width 0") && msg(&e).contains("height 5"), "{e}");
    let e = Layout::new(7, 0, 1).unwrap_err();
    assert!(matches!(e, ImagingError::ZeroDimension { width: 7, height: 0, .. }));
    let e = Layout::new(4, 4, 0).unwrap_err();
    assert!(matches!(e, ImagingError::ZeroDimension { channels: 0, .. }));
    assert!(msg(&e).contains("channels 0") && msg(&e).contains("1..=4"), "{e}");
    let e = Layout::new(4, 4, 5).unwrap_err();
    assert_eq!(e, ImagingError::TooManyChannels { channels: 5 });
    assert!(msg(&e).contains('5') && msg(&e).contains("1..=4"), "{e}");
    let big = usize::MAX / 2 + 1;
    let e = Layout::new(big, 2, 1).unwrap_err();
    assert_eq!(e, ImagingError::SizeOverflow { width: big, height: 2, channels: 1 });
    assert!(msg(&e).contains(&big.to_string()) && msg(&e).contains(&usize::MAX.to_string()), "{e}");
    let e = Layout::new(1 << 40, 1 << 22, 4).unwrap_err();
    assert!(matches!(e, ImagingError::SizeOverflow { channels: 4, .. }));
    // Exactly at the limit is fine.
    assert!(Layout::new(usize::MAX, 1, 1).is_ok());
}

#[test]
fn buffer_length_errors() {
    let l = layout(4, 3, 2); // 24 samples
    let short = vec![0u8; 23];
    let ok = vec![0u8; 24];
    let e = rotate(&short, l, QuarterTurns::One).unwrap_err();
    assert_eq!(e, ImagingError::LengthMismatch { expected: 24, actual: 23 });
    assert!(msg(&e).contains("23") && msg(&e).contains("24"), "{e}");
    let e = mean_filter(&short, l).unwrap_err();
    assert_eq!(e, ImagingError::LengthMismatch { expected: 24, actual: 23 });

    let mut dst = vec![0u8; 25];
    let e = rotate_into(&ok, l, QuarterTurns::Two, &mut dst).unwrap_err();
    assert_eq!(e, ImagingError::DestinationLength { expected: 24, actual: 25 });
    assert!(msg(&e).contains("25") && msg(&e).contains("24"), "{e}");
    let e = mean_filter_into(&ok, l, &mut dst).unwrap_err();
    assert_eq!(e, ImagingError::DestinationLength { expected: 24, actual: 25 });
    // Source is checked first.
    let e = mean_filter_into(&short, l, &mut dst).unwrap_err();
    assert!(matches!(e, ImagingError::LengthMismatch { .. }));
    // Errors leave the destination untouched.
    let mut dst = vec![9u16; 3];
    let _ = rotate_into(&[1u16, 2], layout(3, 1, 1), QuarterTurns::One, &mut dst).unwrap_err();
    assert_eq!(dst, vec![9, 9, 9]);
}

#[test]
fn paths_listing() {
    let paths = available_paths();
    assert_eq!(paths[0], KernelPath::Portable);
    assert!(paths.contains(&KernelPath::best()));
    for p in KernelPath::ALL {
        let r = p.check();
        assert_eq!(r.is_ok(), paths.contains(&p));
        if let Err(e) = r {
            assert!(matches!(e, ImagingError::PathUnavailable { .. }));
            assert!(msg(&e).contains(p.name()));
        }
    }
}
