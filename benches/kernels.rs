//! Kernel benchmarks: one criterion group per (operation, image), each with a
//! `memcpy` baseline (copy of the same buffer into a preallocated
//! destination), `1t` (Parallelism::Single) and `mt` (Parallelism::Auto on
//! rayon's global pool). All variants write into a preallocated destination.
//!
//! Run: `cargo bench --bench kernels` (about 2 minutes). Ratios within a
//! group are what matter on a shared machine. `cargo bench --bench kernels
//! -- --min-of 200` prints single-thread min-of-200 ratios to memcpy instead
//! (~20 s), steadier than medians on a busy machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use imgsvc::imaging::{Layout, Parallelism, QuarterTurns, mean_filter_into_with, rotate_into_with};

struct Image {
    name: &'static str,
    layout: Layout,
    data: Vec<u8>,
}

fn image(name: &'static str, w: usize, h: usize, c: usize) -> Image {
    let layout = Layout::new(w, h, c).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (w * 31 + h * 7 + c) as u64;
    let data = (0..layout.samples())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    Image { name, layout, data }
}

#[derive(Clone, Copy)]
enum Op {
    Rotate(QuarterTurns),
    Mean,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Rotate(QuarterTurns::One) => "rotate90",
            Op::Rotate(QuarterTurns::Two) => "rotate180",
            Op::Rotate(QuarterTurns::Three) => "rotate270",
            Op::Rotate(QuarterTurns::Zero) => "rotate0",
            Op::Mean => "mean",
        }
    }

    fn run(self, src: &[u8], layout: Layout, dst: &mut [u8], par: Parallelism) {
        match self {
            Op::Rotate(t) => rotate_into_with(src, layout, t, dst, par).unwrap(),
            Op::Mean => mean_filter_into_with(src, layout, dst, par).unwrap(),
        }
    }
}

fn images() -> [Image; 5] {
    [
        image("1024x1024_gray8", 1024, 1024, 1),
        image("1024x1024_rgb8", 1024, 1024, 3),
        image("3840x2160_gray8", 3840, 2160, 1),
        image("3840x2160_rgb8", 3840, 2160, 3),
        image("3840x2160_rgba8", 3840, 2160, 4),
    ]
}

const OPS: [Op; 4] = [Op::Rotate(QuarterTurns::One), Op::Rotate(QuarterTurns::Two), Op::Rotate(QuarterTurns::Three), Op::Mean];

fn kernels(c: &mut Criterion) {
    let images = images();
    for op in OPS {
        for img in &images {
            let mut group = c.benchmark_group(format!("{}/{}", op.name(), img.name));
            group
                .sample_size(20)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_millis(1200))
                .throughput(Throughput::Bytes(img.data.len() as u64));
            let mut dst = vec![0u8; img.data.len()];
            group.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(black_box(&img.data))));
            group.bench_function("1t", |b| b.iter(|| op.run(black_box(&img.data), img.layout, &mut dst, Parallelism::Single)));
            group.bench_function("mt", |b| b.iter(|| op.run(black_box(&img.data), img.layout, &mut dst, Parallelism::Auto)));
            black_box(&dst);
            group.finish();
        }
    }
}

/// Single-thread ratios to memcpy as minimums over `runs` alternating runs
/// (memcpy, kernel, memcpy, ...): on a shared machine the minimum catches
/// the runs that had a core to themselves, and alternating exposes both to
/// the same load. Prints a markdown table.
fn min_of_table(runs: usize) {
    fn secs(f: &mut impl FnMut()) -> f64 {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    }
    println!("| operation | image | memcpy µs | 1 thread µs | 1t ÷ memcpy |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let images = images();
    for op in OPS {
        for img in &images {
            let (mut copy_dst, mut dst) = (vec![0u8; img.data.len()], vec![0u8; img.data.len()]);
            let (mut copy, mut kernel) = (f64::MAX, f64::MAX);
            for _ in 0..runs {
                copy = copy.min(secs(&mut || copy_dst.copy_from_slice(black_box(&img.data))));
                kernel = kernel.min(secs(&mut || op.run(black_box(&img.data), img.layout, &mut dst, Parallelism::Single)));
            }
            let (name, image) = (op.name(), img.name);
            println!("| {name} | {image} | {:.1} | {:.1} | {:.2}× |", copy * 1e6, kernel * 1e6, kernel / copy);
        }
    }
}

criterion_group!(benches, kernels);

/// `cargo bench --bench kernels` runs criterion; `-- --min-of N` prints the
/// min-of-N single-thread table instead.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--min-of") {
        min_of_table(args.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(40));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
