//! Faults the server must ride out, against the real binary: clients that
//! vanish half-way through a unary request or a stream, clients that read
//! a large result slowly or not at all, and config reloads under load.
//! After each, the server has released the connection and still serves.
//! (SIGTERM under load is in tests/it/shutdown.rs.)
//!
//! The misbehaving clients speak HTTP/2 through the `h2` crate, so that
//! they can stop exactly where a real client would break.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    client::{self, Api, Op},
    imaging::QuarterTurns,
    proto::{
        nlimage::NlImage,
        v1::{self, Image, PixelFormat, ProcessRequest, ProcessStreamRequest, StreamHeader, process_stream_request::Part},
    },
};

const UHD: (u32, u32) = (3840, 2160);
const UHD_RGB_BYTES: usize = 3840 * 2160 * 3;

fn uhd_rgb(fill: u8) -> NlImage {
    NlImage { color: true, width: UHD.0 as i32, height: UHD.1 as i32, data: Bytes::from(vec![fill; UHD_RGB_BYTES]) }
}

/// Polls (at most 10 s) until the server holds `fds` file descriptors:
/// the connections of a fault are closed (after their lingering close).
async fn until_fds(server: &ServerProcess, fds: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.usage().fds != fds {
        assert!(Instant::now() < deadline, "the server holds {} file descriptors, expected {fds}", server.usage().fds);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server's file descriptors with no connection open once `tenants`
/// have their I/O lanes (a tenant's first connection starts its lane, which
/// lives as long as the server): a served request per tenant, then the
/// count once it has not moved for 300 ms (at most 10 s).
async fn settled_fds(server: &ServerProcess, pki: &Pki, tenants: &[&str]) -> usize {
    for tenant in tenants {
        assert_serves(server, pki, tenant).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut fds, mut since) = (server.usage().fds, Instant::now());
    while since.elapsed() < Duration::from_millis(300) {
        assert!(Instant::now() < deadline, "the server's file descriptors keep changing");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = server.usage().fds;
        if now != fds {
            (fds, since) = (now, Instant::now());
        }
    }
    fds
}

/// A small request through each API, with the library client, on a new
/// connection.
async fn assert_serves(server: &ServerProcess, pki: &Pki, tenant: &str) {
    assert_serves_on(client::connect(&target_of(server.addr), &pki.credentials(tenant)).await.unwrap()).await;
}

async fn assert_serves_on(channel: tonic::transport::Channel) {
    let image = client::RawImage { format: PixelFormat::Rgb8, width: 3, height: 2, data: Bytes::from((0..18).collect::<Vec<u8>>()) };
    let ops = [Op::MeanFilter, Op::Rotate(QuarterTurns::One)];
    for api in [Api::V1, Api::Legacy] {
        let out = client::process(channel.clone(), api, image.clone(), &ops, "localhost").await.unwrap();
        assert_eq!(out, expected(&image, &ops), "{api:?}");
    }
}

/// A call on its own HTTP/2 connection, to be cut off half-way.
struct CutCall {
    send: h2::client::SendRequest<Bytes>,
    connection: tokio::task::JoinHandle<()>,
    body: h2::SendStream<Bytes>,
}

impl CutCall {
    async fn start(server: &ServerProcess, pki: &Pki, tenant: &str, path: &str) -> Self {
        let (mut send, connection) = h2_connect(server, pki, tenant).await;
        let (_response, body) = start_call(&mut send, path).await;
        Self { send, connection, body }
    }

    /// Drops the connection as a crashed client would: the connection task
    /// is gone (its socket closed) before the stream handles are dropped, so
    /// no RST_STREAM can reach the server — hyper reads a stream reset with
    /// CANCEL as a clean end of body, which is another case than this one.
    async fn cut(self) {
        self.connection.abort();
        let _ = self.connection.await;
        drop((self.send, self.body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_half_way_through_a_unary_request_is_forgotten() {
    let pki = Pki::new(&["faults-unary"]);
    let server = ServerProcess::spawn(&pki);
    let fds = settled_fds(&server, &pki, &["faults-unary"]).await;
    let labels = [("tenant", "faults-unary"), ("method", "NLImageService/MeanFilter")];
    let served = metric(&scrape(server.admin_addr), "imgsvc_requests_total", &labels);
    assert_eq!(served, Some(1.0), "the warm-up's MeanFilter call");
    let mut call = CutCall::start(&server, &pki, "faults-unary", "/NLImageService/MeanFilter").await;
    let mut message = grpc_message(&uhd_rgb(7));
    send_flow_controlled(&mut call.body, message.split_to(message.len() / 2)).await;
    call.cut().await;

    until_fds(&server, fds).await;
    let text = scrape(server.admin_addr);
    assert_eq!(metric(&text, "imgsvc_requests_total", &labels), served, "half a message is not a request");
    assert_serves(&server, &pki, "faults-unary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_half_way_through_a_stream_is_counted_as_cancelled() {
    let pki = Pki::new(&["faults-stream"]);
    let server = ServerProcess::spawn(&pki);
    let fds = settled_fds(&server, &pki, &["faults-stream"]).await;
    let mut call = CutCall::start(&server, &pki, "faults-stream", "/imgsvc.v1.ImageService/ProcessStream").await;
    let header = StreamHeader { format: PixelFormat::Rgb8 as i32, width: UHD.0, height: UHD.1, operations: vec![] };
    send_flow_controlled(&mut call.body, grpc_message(&ProcessStreamRequest { part: Some(Part::Header(header)) })).await;
    for _ in 0..3 {
        let chunk = ProcessStreamRequest { part: Some(Part::Chunk(Bytes::from(vec![1u8; 1 << 20]))) };
        send_flow_controlled(&mut call.body, grpc_message(&chunk)).await;
    }
    let labels = [("tenant", "faults-stream"), ("method", "imgsvc.v1.ImageService/ProcessStream")];
    let admin = server.admin_addr;
    assert_eq!(until_metric(admin, "imgsvc_in_flight_requests", &labels, 1.0, Duration::from_secs(10)).await, Some(1.0));
    call.cut().await;

    until_fds(&server, fds).await;
    assert_eq!(until_metric(admin, "imgsvc_in_flight_requests", &labels, 0.0, Duration::from_secs(10)).await, Some(0.0));
    let text = scrape(admin);
    assert_eq!(metric(&text, "imgsvc_requests_total", &[labels[0], labels[1], ("code", "CANCELLED")]), Some(1.0), "{text}");
    assert_serves(&server, &pki, "faults-stream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_their_own_results_only_and_do_not_block_other_clients() {
    const SLOW_CALLS: usize = 4;
    let pki = Pki::new(&["faults-slow", "faults-other"]);
    let server = ServerProcess::spawn(&pki);
    let idle_fds = settled_fds(&server, &pki, &["faults-slow", "faults-other"]).await;
    // Warm up (worker threads, allocator arenas) with one large call.
    let other = client::connect(&target_of(server.addr), &pki.credentials("faults-other")).await.unwrap();
    let large = client::RawImage { format: PixelFormat::Rgb8, width: UHD.0, height: UHD.1, data: Bytes::from(vec![3u8; UHD_RGB_BYTES]) };
    client::process(other.clone(), Api::V1, large, &[Op::Rotate(QuarterTurns::One)], "localhost").await.unwrap();
    let warm = server.usage();

    // Calls whose 25 MB results are read at most one HTTP/2 window (64 KiB) each.
    let (mut send, connection) = h2_connect(&server, &pki, "faults-slow").await;
    let mut stalled = Vec::new();
    for fill in 0..SLOW_CALLS as u8 {
        let request = ProcessRequest {
            image: Some(Image {
                format: PixelFormat::Rgb8 as i32,
                width: UHD.0,
                height: UHD.1,
                data: Bytes::from(vec![fill; UHD_RGB_BYTES]),
                encoded: None,
            }),
            operations: vec![v1::Operation {
                kind: Some(v1::operation::Kind::Rotate(v1::Rotate { amount: Some(v1::rotate::Amount::QuarterTurns(1)) })),
            }],
            output: None,
        };
        let (response, mut body) = start_call(&mut send, "/imgsvc.v1.ImageService/Process").await;
        send_flow_controlled(&mut body, grpc_message(&request)).await;
        body.send_data(Bytes::new(), true).unwrap();
        stalled.push(response);
    }
    // Kept, unread: each holds its stream open with its window exhausted.
    let mut unread = Vec::new();
    for response in stalled {
        let response = response.await.expect("the response starts");
        assert_eq!(response.status(), 200);
        unread.push(response.into_body());
    }
    let stalled_usage = server.usage();

    // Meanwhile other clients are served, and the server does not grow.
    let started = Instant::now();
    for _ in 0..20 {
        assert_serves_on(other.clone()).await;
    }
    assert!(started.elapsed() < Duration::from_secs(30), "other clients waited {:?}", started.elapsed());
    let later = server.usage();
    let result_bytes = (SLOW_CALLS * UHD_RGB_BYTES) as u64;
    eprintln!("slow readers: warm {warm:?}, stalled {stalled_usage:?}, later {later:?}, results {} MiB", result_bytes / MIB);
    // The high-water mark (not RSS, which the allocator trims and regrows).
    assert!(later.peak_rss <= stalled_usage.peak_rss + 16 * MIB, "grew while the readers stalled: {stalled_usage:?} -> {later:?}");
    // The bound of the 4K peak test (tests/it/soak.rs): 2.5 times the image bytes of the calls
    // (an input, a result and part of an encoding copy each, at worst).
    assert!(
        later.peak_rss * 2 <= (warm.rss * 2 + 5 * result_bytes).max(warm.peak_rss * 2),
        "more than 2.5 times the results over the warm size: {warm:?} -> {later:?} ({result_bytes} bytes)"
    );

    // The slow reader goes away: its calls end, the server serves on.
    connection.abort();
    drop((send, unread));
    let labels = [("tenant", "faults-slow"), ("method", "imgsvc.v1.ImageService/Process")];
    assert_eq!(until_metric(server.admin_addr, "imgsvc_in_flight_requests", &labels, 0.0, Duration::from_secs(10)).await, Some(0.0));
    drop(other);
    until_fds(&server, idle_fds).await;
    assert_serves(&server, &pki, "faults-other").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    const CLIENTS: usize = 8;
    const RELOADS: usize = 5;
    let pki = Pki::new(&["faults-reload"]);
    let server = ServerProcess::spawn(&pki);
    let stop = tokio_util::sync::CancellationToken::new();
    // Also stops the clients when an assertion below fails.
    let _stop_on_exit = stop.clone().drop_guard();
    let served = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        let (stop, served, credentials, addr) = (stop.clone(), served.clone(), pki.credentials("faults-reload"), server.addr);
        clients.push(tokio::spawn(async move {
            let channel = client::connect(&target_of(addr), &credentials).await.unwrap();
            let api = if n % 2 == 0 { Api::V1 } else { Api::Legacy };
            let image = client::RawImage { format: PixelFormat::Gray8, width: 64, height: 48, data: Bytes::from(vec![n as u8; 64 * 48]) };
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                match client::process(channel.clone(), api, image.clone(), &[Op::MeanFilter], "localhost").await {
                    Ok(out) if out == image => {
                        ok += 1;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    let config = std::fs::read_to_string(&server.config).unwrap();
    for reload in 1..=RELOADS {
        // A real change each time: the default weight of tenants.
        let edited = config.replace("[tenants.", &format!("[tenant_defaults]\nweight = {}\n[tenants.", reload + 1));
        std::fs::write(&server.config, edited).unwrap();
        send_signal(server.pid(), "HUP");
        let line =
            tokio::task::block_in_place(|| server.wait_for_log(&["configuration reloaded", "reload failed"], Duration::from_secs(30)));
        assert!(line.contains("configuration reloaded"), "reload {reload}: {line}");
        // Calls go on under the new configuration before the next reload.
        let (before, deadline) = (served.load(Ordering::Relaxed), Instant::now() + Duration::from_secs(30));
        while served.load(Ordering::Relaxed) < before + CLIENTS as u64 {
            assert!(Instant::now() < deadline, "no calls served after reload {reload}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.cancel();
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        assert!(failed.is_empty(), "failed requests during reloads: {failed:?}");
        assert!(ok > 0, "every client was served");
        total += ok;
    }
    eprintln!("{total} requests across {RELOADS} reloads, none failed");
    assert_serves(&server, &pki, "faults-reload").await;
}
