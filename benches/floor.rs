//! The transport floor of issue 17, measured on the machine at hand: what no
//! server can avoid spending per request, whatever its stack.
//!
//! - AES-256-GCM over every byte in and out, with TLS-sized records (16 KiB
//!   of plaintext, sealed in place with ring, the provider rustls uses here);
//! - one copy per direction through the socket (memcpy of a 4 MiB buffer,
//!   in the last-level cache: the kernel copies records just sealed);
//! - the kernel, counted as two image-sized copies for a rotation or a mean
//!   filter and nothing for a rotation by 0° (the definition), and
//!   also measured as what our kernels really take, single-threaded.
//!
//! Prints one JSON object per scenario on stdout (read by
//! `benches/transport.sh`) and a table on stderr:
//!
//!   cargo bench --locked --bench floor
//!
//! Single-threaded throughout: the floor is CPU time per request, compared
//! with the server's CPU time per request from /proc.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use imgsvc::imaging::{Layout, Parallelism, QuarterTurns, mean_filter_into_with, rotate_into_with};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// TLS's largest record: 16 KiB of plaintext.
const RECORD: usize = 16 << 10;
/// How long each rate is measured (best of several rounds).
const MEASURE: Duration = Duration::from_millis(600);
const ROUNDS: usize = 5;

struct Scenario {
    tag: &'static str,
    desc: &'static str,
    width: usize,
    height: usize,
    channels: usize,
    /// None: rotation by 0° (no kernel); Some(true): mean; Some(false): rotate 90°.
    mean: Option<bool>,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario { tag: "A", desc: "64x64 gray rotate 90", width: 64, height: 64, channels: 1, mean: Some(false) },
    Scenario { tag: "B", desc: "1024x1024 RGB mean", width: 1024, height: 1024, channels: 3, mean: Some(true) },
    Scenario { tag: "C", desc: "3840x2160 RGB rotate 90", width: 3840, height: 2160, channels: 3, mean: Some(false) },
    Scenario { tag: "N", desc: "1024x1024 RGB rotate 0", width: 1024, height: 1024, channels: 3, mean: None },
];

/// Best throughput (bytes per second) of `run`, which processes `bytes`
/// bytes per call, over [`ROUNDS`] rounds of [`MEASURE`].
fn rate(bytes: usize, mut run: impl FnMut()) -> f64 {
    run();
    let mut best = 0f64;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let mut calls = 0u64;
        while started.elapsed() < MEASURE {
            run();
            calls += 1;
        }
        best = best.max(calls as f64 * bytes as f64 / started.elapsed().as_secs_f64());
    }
    best
}

/// Best time of one call of `run` over a few rounds.
fn best_time(mut run: impl FnMut()) -> Duration {
    run();
    let mut best = Duration::MAX;
    for _ in 0..ROUNDS * 4 {
        let started = Instant::now();
        run();
        best = best.min(started.elapsed());
    }
    best
}

fn aes_gcm_rate() -> f64 {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("a 32-byte key"));
    // 64 MiB of records, so the data comes from memory as a socket's does.
    let mut data = vec![1u8; 64 << 20];
    let mut sequence = 0u64;
    rate(data.len(), || {
        for record in data.chunks_mut(RECORD) {
            sequence += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&sequence.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from([23u8, 3, 3, 0x40, 0x11]), record)
                .expect("sealing a record");
            let _ = black_box(tag);
        }
    })
}

/// memcpy throughput (bytes copied per second) of a `len`-byte buffer.
fn memcpy_rate(len: usize) -> f64 {
    let src = vec![3u8; len];
    let mut dst = vec![0u8; len];
    rate(src.len(), || {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    })
}

fn main() {
    let aes = aes_gcm_rate();
    // The floor's copies at the rate of a 4 MiB buffer (in the last-level
    // cache, not in L2: what the "about 21 GB/s" is); the L2 and
    // main-memory rates are printed beside it.
    let memcpy = memcpy_rate(4 << 20);
    let (memcpy_l2, memcpy_dram) = (memcpy_rate(512 << 10), memcpy_rate(64 << 20));
    eprintln!(
        "AES-256-GCM (ring, 16 KiB records): {:.2} GB/s; memcpy: {:.2} GB/s (4 MiB; 512 KiB: {:.2}, 64 MiB: {:.2})",
        aes / 1e9,
        memcpy / 1e9,
        memcpy_l2 / 1e9,
        memcpy_dram / 1e9
    );
    eprintln!(
        "| scenario | bytes in + out | TLS ms | socket copies ms | kernel as 2 copies ms | floor ms | floor, copies from memory ms | our kernel, 1 thread ms |"
    );
    eprintln!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &SCENARIOS {
        let image = s.width * s.height * s.channels;
        // The legacy message: the image plus a few bytes of header, each way.
        let wire = 2 * image;
        let tls = wire as f64 / aes;
        let copies = wire as f64 / memcpy;
        let kernel_copies = if s.mean.is_some() { 2.0 * image as f64 / memcpy } else { 0.0 };
        let floor = tls + copies + kernel_copies;
        // The same with every copy at the main-memory rate: a looser floor.
        let floor_dram = tls + (wire as f64 + if s.mean.is_some() { 2.0 * image as f64 } else { 0.0 }) / memcpy_dram;
        let layout = Layout::new(s.width, s.height, s.channels).expect("a valid layout");
        let src = vec![5u8; image];
        let mut dst = vec![0u8; image];
        let kernel = match s.mean {
            None => Duration::ZERO,
            Some(true) => best_time(|| mean_filter_into_with(&src, layout, &mut dst, Parallelism::Single).expect("mean")),
            Some(false) => best_time(|| rotate_into_with(&src, layout, QuarterTurns::One, &mut dst, Parallelism::Single).expect("rotate")),
        };
        // Milliseconds, in the order of the table's columns and the JSON keys.
        let figures = [tls, copies, kernel_copies, floor, floor_dram, kernel.as_secs_f64()].map(|seconds| seconds * 1e3);
        let cells: Vec<String> = figures.iter().map(|ms| format!("{ms:.3}")).collect();
        eprintln!("| {} {} | {:.1} MB | {} |", s.tag, s.desc, wire as f64 / 1e6, cells.join(" | "));
        let keys = ["tls_ms", "copies_ms", "kernel_copies_ms", "floor_ms", "floor_dram_ms", "kernel_ms"];
        let fields: Vec<String> = keys.iter().zip(figures).map(|(key, ms)| format!("\"{key}\":{ms:.4}")).collect();
        println!(
            "{{\"scenario\":\"{}\",\"desc\":\"{}\",\"wire_bytes\":{wire},\"aes_gcm_bytes_per_s\":{aes:.0},\"memcpy_bytes_per_s\":{memcpy:.0},{}}}",
            s.tag,
            s.desc,
            fields.join(",")
        );
    }
}
