//! Memory per request: the real binary's peak resident memory (VmHWM)
//! while it serves eight concurrent 3840x2160 RGB8 unary requests stays
//! within 2.5 times the image bytes in flight over its idle size.
//! Figures go to stderr (`--nocapture`).

mod common;

use bytes::Bytes;
use common::*;
use imgsvc::{
    client::{self, Api, Op, RawImage},
    imaging::QuarterTurns,
    proto::v1::PixelFormat,
};

const REQUESTS: usize = 8;
const WIDTH: u32 = 3840;
const HEIGHT: u32 = 2160;
const IMAGE_BYTES: u64 = WIDTH as u64 * HEIGHT as u64 * 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_4k_requests_peak_within_two_and_a_half_times_the_bytes_in_flight() {
    let pki = Pki::new(&["memory"]);
    let server = ServerProcess::spawn_with(&pki, "", &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let idle = server.usage();

    // Connected first, so that all eight requests are sent at once.
    let mut channels = Vec::new();
    for _ in 0..REQUESTS {
        channels.push(client::connect(&target_of(server.addr), &pki.credentials("memory")).await.unwrap());
    }
    let calls: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(i, channel)| {
            // Constant images: every result is known without a reference run.
            let image = RawImage {
                format: PixelFormat::Rgb8,
                width: WIDTH,
                height: HEIGHT,
                data: Bytes::from(vec![i as u8; IMAGE_BYTES as usize]),
            };
            let (api, op) = if i % 2 == 0 { (Api::V1, Op::Rotate(QuarterTurns::One)) } else { (Api::Legacy, Op::MeanFilter) };
            tokio::spawn(async move { (op, client::process(channel, api, image, &[op], "localhost").await) })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let (op, result) = call.await.unwrap();
        let out = result.unwrap_or_else(|e| panic!("request {i}: {e}"));
        let dims = if op == Op::MeanFilter { (WIDTH, HEIGHT) } else { (HEIGHT, WIDTH) };
        assert_eq!((out.width, out.height), dims, "request {i}");
        assert!(out.data.len() as u64 == IMAGE_BYTES && out.data.iter().all(|&b| b == i as u8), "request {i}");
    }

    let peak = server.usage().peak_rss;
    let in_flight = REQUESTS as u64 * IMAGE_BYTES;
    let over_idle = peak.saturating_sub(idle.rss);
    eprintln!(
        "memory: idle RSS {} MiB, peak RSS {} MiB: {} MiB over idle for {} MiB of images in flight = {:.2}x",
        idle.rss / MIB,
        peak / MIB,
        over_idle / MIB,
        in_flight / MIB,
        over_idle as f64 / in_flight as f64
    );
    assert!(over_idle * 2 <= in_flight * 5, "peak {} MiB over idle, more than 2.5 x {} MiB", over_idle / MIB, in_flight / MIB);
}
