//! The memory budget holds end to end, against the real binary: a tenant
//! flooding the server with large unary requests, large streams and slow
//! readers keeps the server's resident memory within the budget plus a
//! fixed overhead; every flood request either succeeds or is refused with
//! RESOURCE_EXHAUSTED; the other tenants' small requests all succeed,
//! their latency bounded against their own solo latency measured in the
//! same run; the memory comes back afterwards (after the flood, and after
//! a burst of large calls that all fit). And refusals at the
//! request's headers are answered before a byte of the body is sent.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    common::*,
    h2raw::{grpc_answer, grpc_answer_of},
};
use bytes::Bytes;
use imgsvc::{
    client::{self, Api, CallOptions, ClientError, Op, RawImage, StreamMode},
    imaging::QuarterTurns,
    proto::{
        nlimage::{NlImage, NlImageRotateRequest, nl_image_service_client::NlImageServiceClient},
        v1::PixelFormat,
    },
};
use tonic::{Code, transport::Channel};

/// `tenancy.memory_budget_bytes` of the flooded server.
const BUDGET: u64 = 192 * MIB;
/// What the server holds besides the budget: its threads' stacks and
/// arenas, the TLS and HTTP/2 buffers of its connections (each can buffer
/// up to one connection window of request data that the server has not
/// read yet: that is the back-pressure), the binary itself, and the
/// allocator's slack. Measured at 40–70 MiB on this flood; asserted with
/// room to spare.
const FIXED_OVERHEAD: u64 = 96 * MIB;
/// The flood's images: 9 MB each, 18 MB charged per legacy call (input
/// and output). The flooding tenant's share is half the budget, 96 MiB, of
/// which its nine connections take 54 MiB (each its 5 MiB window and one
/// 1 MiB frame): two flood calls fit at a time, the rest wait or are refused.
const FLOOD: (u32, u32) = (2000, 1500);
const FLOOD_SECS: u64 = 8;
/// Resident memory 15 s after a flood or burst, over idle: issue 14's goal,
/// asserted as it is (measured: idle + 1–28 MiB; see the tests).
const RSS_AFTER_GOAL: u64 = 64 * MIB;
const LIGHT_CALLS: usize = 150;

fn image(width: u32, height: u32, fill: u8) -> RawImage {
    RawImage { format: PixelFormat::Rgb8, width, height, data: Bytes::from(vec![fill; width as usize * height as usize * 3]) }
}

fn legacy(image: &RawImage) -> NlImage {
    NlImage { color: true, width: image.width as i32, height: image.height as i32, data: image.data.clone() }
}

/// Latencies of `LIGHT_CALLS` sequential small calls by `tenant`; every
/// call must succeed with the exact result.
async fn light_latencies(channel: Channel) -> Vec<Duration> {
    let small = image(256, 256, 7);
    let mut times = Vec::with_capacity(LIGHT_CALLS);
    for i in 0..LIGHT_CALLS {
        let started = Instant::now();
        let out = client::process(channel.clone(), Api::Legacy, small.clone(), &[Op::Rotate(QuarterTurns::One)], "localhost")
            .await
            .unwrap_or_else(|e| panic!("light call {i}: {e}"));
        times.push(started.elapsed());
        assert_eq!((out.width, out.height, out.data.len()), (256, 256, small.data.len()), "light call {i}");
        assert!(out.data.iter().all(|&b| b == 7), "light call {i}");
    }
    times
}

/// The server's RSS once it is within [`RSS_AFTER_GOAL`] of `idle`, or
/// after 15 s, whichever comes first (sampled every 250 ms).
async fn rss_back_near(server: &ServerProcess, idle: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut rss = server.usage().rss;
    while rss > idle + RSS_AFTER_GOAL && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss = server.usage().rss;
    }
    rss
}

fn p99(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[(times.len() * 99).div_ceil(100) - 1]
}

#[derive(Default)]
struct FloodTally {
    ok: AtomicU64,
    exhausted: AtomicU64,
}

impl FloodTally {
    /// Counts a flood result: success, or RESOURCE_EXHAUSTED; anything else fails the test.
    fn count(&self, what: &str, result: Result<(), tonic::Status>) {
        match result {
            Ok(()) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(status) if status.code() == Code::ResourceExhausted => self.exhausted.fetch_add(1, Ordering::Relaxed),
            Err(status) => panic!("{what}: expected success or RESOURCE_EXHAUSTED, got {:?}: {}", status.code(), status.message()),
        };
    }
}

fn status_of(error: ClientError) -> tonic::Status {
    match error {
        ClientError::Status { code, message, .. } => tonic::Status::new(code, message),
        other => panic!("expected a gRPC status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_stays_within_its_share_and_the_others_are_served() {
    let pki = Pki::new(&["flood", "light-a", "light-b"]);
    let extra = format!(
        "[tenancy]\nmemory_budget_bytes = {BUDGET}\nmemory_wait_ms = 1000\n[tenant_defaults]\nmax_concurrent_requests = 64\nmax_queued_requests = 64\n"
    );
    let server = ServerProcess::spawn_with(&pki, &extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let admin = server.admin_addr;
    let connect = |tenant: &'static str| {
        let credentials = pki.credentials(tenant);
        let target = target_of(server.addr);
        async move { client::connect(&target, &credentials).await.unwrap() }
    };
    let (light_a, light_b) = (connect("light-a").await, connect("light-b").await);
    // Warm-up, then the light tenants' solo latency.
    light_latencies(light_a.clone()).await;
    let solo = p99(light_latencies(light_a.clone()).await);
    let idle = server.usage();

    // The flooding tenant's connections, opened before its calls take its
    // share: each is charged its HTTP/2 window and one frame (6 MiB) for its life, and a
    // connection that does not fit the share is closed at once.
    let mut unary_channels = Vec::new();
    for _ in 0..4 {
        unary_channels.push(connect("flood").await);
    }
    let stream_channel = connect("flood").await;
    let mut slow_connections = Vec::new();
    for _ in 0..4 {
        slow_connections.push(h2_connect(&server, &pki, "flood").await);
    }

    let tally = Arc::new(FloodTally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(FLOOD_SECS);
    let mut flood = tokio::task::JoinSet::new();
    let big = image(FLOOD.0, FLOOD.1, 3);
    // Many concurrent large unary calls over four connections.
    for (c, channel) in unary_channels.into_iter().enumerate() {
        for _ in 0..10 {
            let (channel, big, tally) = (channel.clone(), big.clone(), tally.clone());
            flood.spawn(async move {
                let mut client = NlImageServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
                while Instant::now() < until {
                    let result = if c % 2 == 0 {
                        client.mean_filter(legacy(&big)).await.map(|r| assert_eq!(r.into_inner().data.len(), big.data.len()))
                    } else {
                        let request = NlImageRotateRequest { rotation: 1, image: Some(legacy(&big)) };
                        client.rotate_image(request).await.map(|r| assert_eq!(r.into_inner().width, FLOOD.1 as i32))
                    };
                    tally.count("unary", result);
                }
            });
        }
    }
    // Large streams.
    for _ in 0..4 {
        let (channel, big, tally) = (stream_channel.clone(), big.clone(), tally.clone());
        flood.spawn(async move {
            let options = CallOptions { compression: None, stream: StreamMode::Always, chunk_bytes: 1 << 20 };
            while Instant::now() < until {
                let result = client::process_with(channel.clone(), Api::V1, big.clone(), &[Op::MeanFilter], "localhost", &options).await;
                tally.count("stream", result.map(|out| assert_eq!(out.data.len(), big.data.len())).map_err(status_of));
            }
        });
    }
    // Slow readers: each sends a large request and never reads the answer,
    // which the server holds (charged as sending) while its connection lives.
    let mut slow = Vec::new();
    for (mut send, connection) in slow_connections {
        let (response, mut body) = start_call(&mut send, "/NLImageService/MeanFilter").await;
        // Sent as flow control allows; a refusal (memory) resets the stream.
        let mut data = grpc_message(&legacy(&big));
        while !data.is_empty() {
            body.reserve_capacity(data.len());
            match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                Some(Ok(granted)) => body.send_data(data.split_to(granted.min(data.len())), false).unwrap(),
                _ => break,
            }
        }
        let _ = body.send_data(Bytes::new(), true);
        slow.push((send, connection, response));
    }
    // Meanwhile: the light tenants, and the server's accounting.
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max_held = 0.0f64;
            while !stop.load(Ordering::Relaxed) {
                let text = scrape(admin);
                let held: f64 = ["receiving", "queued", "processing", "sending"]
                    .iter()
                    .filter_map(|stage| metric(&text, "imgsvc_memory_held_bytes", &[("stage", stage)]))
                    .sum();
                max_held = max_held.max(held);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max_held
        })
    };
    let (under_a, under_b) = tokio::join!(light_latencies(light_a.clone()), light_latencies(light_b.clone()));
    while let Some(task) = flood.join_next().await {
        task.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let max_held = sampler.await.unwrap();
    let peak = server.usage().peak_rss;
    drop((slow, stream_channel));

    let under = p99(under_a.into_iter().chain(under_b).collect());
    let (ok, exhausted) = (tally.ok.load(Ordering::Relaxed), tally.exhausted.load(Ordering::Relaxed));
    // Memory comes back: everything released, resident memory near idle.
    let held_after = until_metric(admin, "imgsvc_memory_held_bytes", &[("stage", "sending")], 0.0, Duration::from_secs(10)).await;
    let after = rss_back_near(&server, idle.rss).await;
    eprintln!(
        "memory_bound: budget {} MiB; idle RSS {} MiB; peak RSS {} MiB = idle + {} MiB ({:.2}x budget); max held by the accounting {} MiB; \
         RSS after {} MiB; flood {ok} ok, {exhausted} RESOURCE_EXHAUSTED; light p99 solo {solo:?}, under flood {under:?} ({:.1}x)",
        BUDGET / MIB,
        idle.rss / MIB,
        peak / MIB,
        peak.saturating_sub(idle.rss) / MIB,
        peak.saturating_sub(idle.rss) as f64 / BUDGET as f64,
        max_held as u64 / MIB,
        after / MIB,
        under.as_secs_f64() / solo.as_secs_f64(),
    );
    assert!(max_held <= BUDGET as f64, "the accounting held {max_held} bytes, over the budget");
    assert!(ok > 0 && exhausted > 0, "the flood was served within its share and refused beyond it: {ok} ok, {exhausted} refused");
    assert!(
        peak <= idle.rss + BUDGET + FIXED_OVERHEAD,
        "peak RSS {} MiB over idle {} MiB + budget {} MiB + overhead {} MiB",
        peak / MIB,
        idle.rss / MIB,
        BUDGET / MIB,
        FIXED_OVERHEAD / MIB
    );
    // Isolation, not speed (the ratio is a figure, printed above; speed is
    // measured in benches/): a light call that waited behind the flood's
    // memory (memory_wait_ms = 1000 here) or its queue would take a second
    // or more. The light tenants share two cores with the flood's TLS and
    // kernels and with this test's own flood clients, and with the other
    // tests in CI: 24 ms seen there against a 0.6 ms solo p99.
    assert!(under <= solo * 3 + Duration::from_millis(250), "light p99 {under:?} under the flood, solo {solo:?}");
    assert_eq!(held_after, Some(0.0), "every answer's bytes are released");
    // The goal is idle + 64 MiB; measured idle + 1–18 MiB (with glibc's
    // default arena count: 28–73; without the trimmer RSS stayed at the
    // peak).
    assert!(after <= idle.rss + RSS_AFTER_GOAL, "RSS {} MiB 15 s after the flood, idle {} MiB", after / MIB, idle.rss / MIB);
}

/// Resident memory comes back after a burst that the budget admits in
/// full: 12 3840×2160 RGB rotations, six at once (about 300 MB held), then
/// idle. The goal is issue 14's: within 64 MiB of idle within 15 s.
/// Measured: idle + 0–1 MiB within 1–2 s (one malloc arena and the
/// trimmer, src/serving/allocator.rs); with more arenas, idle + 50–73 MiB
/// for good in some runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_returns_near_idle_after_a_burst_of_large_calls() {
    const BURST: usize = 12;
    const AT_ONCE: usize = 6;
    let pki = Pki::new(&["burst"]);
    let extra =
        "[tenancy]\nmemory_budget_bytes = 1073741824\n[tenant_defaults]\nmax_memory_bytes = 1073741824\nmax_concurrent_requests = 8\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let channel = client::connect(&target_of(server.addr), &pki.credentials("burst")).await.unwrap();
    // Warm-up (threads, TLS, first allocations), then idle.
    let small = image(64, 64, 1);
    client::process(channel.clone(), Api::Legacy, small.clone(), &[Op::Rotate(QuarterTurns::One)], "localhost").await.unwrap();
    let idle = server.usage();

    let large = image(3840, 2160, 9);
    let mut calls = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..AT_ONCE {
        let (channel, large, next) = (channel.clone(), large.clone(), next.clone());
        calls.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < BURST as u64 {
                let out = client::process(channel.clone(), Api::Legacy, large.clone(), &[Op::Rotate(QuarterTurns::One)], "localhost")
                    .await
                    .expect("a burst call within the budget succeeds");
                assert_eq!((out.width, out.height, out.data.len()), (2160, 3840, large.data.len()));
            }
        });
    }
    while let Some(call) = calls.join_next().await {
        call.unwrap();
    }
    let peak = server.usage().peak_rss;
    let ended = Instant::now();
    let after = rss_back_near(&server, idle.rss).await;
    eprintln!(
        "memory_bound: burst of {BURST} 4K rotations, {AT_ONCE} at once: idle RSS {} MiB, peak {} MiB, {} MiB after {:?}",
        idle.rss / MIB,
        peak / MIB,
        after / MIB,
        ended.elapsed()
    );
    // The burst did take memory (about 75 MB per call in flight), so the
    // return below is not trivially met.
    assert!(peak >= idle.rss + 150 * MIB, "peak RSS {} MiB, idle {} MiB: the burst should have held more", peak / MIB, idle.rss / MIB);
    assert!(
        after <= idle.rss + RSS_AFTER_GOAL,
        "RSS {} MiB 15 s after the burst, idle {} MiB: over the goal of idle + {} MiB",
        after / MIB,
        idle.rss / MIB,
        RSS_AFTER_GOAL / MIB
    );
    // The connection stays open: the memory came back without it closing.
    client::process(channel, Api::Legacy, small, &[Op::Rotate(QuarterTurns::One)], "localhost").await.unwrap();
}

/// A call refused at its headers: the answer (trailers-only, so its status
/// is in the headers) arrives although no byte of the body has been sent.
async fn refused_before_the_body(server: &ServerProcess, pki: &Pki, tenant: &str, path: &str) -> tonic::Status {
    let (mut send, _connection) = h2_connect(server, pki, tenant).await;
    let (response, _body) = start_call(&mut send, path).await;
    let response = tokio::time::timeout(Duration::from_secs(10), response).await.expect("answered without the body").unwrap();
    tonic::Status::from_header_map(response.headers()).expect("a trailers-only answer")
}

/// Waits until the server has admitted `n` calls of `tenant` at their
/// headers: a call started on another connection has no order with it.
async fn calls_open(server: &ServerProcess, tenant: &str, n: f64) {
    let open = until_metric(server.admin_addr, "imgsvc_tenant_calls_open", &[("tenant", tenant)], n, Duration::from_secs(10)).await;
    assert_eq!(open, Some(n), "{tenant}'s calls admitted at the headers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_at_the_headers_are_answered_before_the_body_is_sent() {
    let mut pki = Pki::new(&["alpha", "limited", "single", "stranger"]);
    // Configured below (limited, single) or not at all (stranger).
    pki.tenants = vec!["alpha".into()];
    let extra = "[tenants.limited]\nrequests_per_second = 0.01\nburst = 1\n[tenants.single]\nmax_concurrent_requests = 1\nmax_queued_requests = 0\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let path = "/NLImageService/MeanFilter";

    // Not configured: the stranger's certificate is valid, its tenant unknown.
    let status = refused_before_the_body(&server, &pki, "stranger", path).await;
    assert_eq!((status.code(), status.message()), (Code::PermissionDenied, "tenant \"stranger\" is not configured on this server"));

    // Rate: the burst of one is taken by a call whose body is never sent.
    let (mut send, _c) = h2_connect(&server, &pki, "limited").await;
    let (_first, _first_body) = start_call(&mut send, path).await;
    calls_open(&server, "limited", 1.0).await;
    let status = refused_before_the_body(&server, &pki, "limited", path).await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().starts_with("tenant \"limited\" is over its rate limit of 0.01 requests per second (burst 1)"), "{status:?}");
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some(), "a retry hint");

    // Concurrency: one call open (headers only) holds the only slot.
    let (mut send, _c) = h2_connect(&server, &pki, "single").await;
    let (_open, _open_body) = start_call(&mut send, path).await;
    calls_open(&server, "single", 1.0).await;
    let status = refused_before_the_body(&server, &pki, "single", path).await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::ResourceExhausted,
            "tenant \"single\" already has 1 requests running or queued, its limit (max_concurrent_requests 1 + max_queued_requests 0)"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_can_never_fit_is_refused_at_its_prefix_and_the_server_keeps_serving() {
    let pki = Pki::new(&["alpha"]);
    // A 64 MiB budget: alpha's share is 32 MiB; a 20 MB legacy call needs 40.
    let server = ServerProcess::spawn_with(&pki, "[tenancy]\nmemory_budget_bytes = 67108864\n", &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let channel = client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
    let mut client = NlImageServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let too_big = image(2582, 2582, 1);
    let status = client.mean_filter(legacy(&too_big)).await.unwrap_err();
    let needed = prost::Message::encoded_len(&legacy(&too_big)) as u64 * 2;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        format!("request needs {needed} bytes of memory, over tenant \"alpha\"'s share of 33554432 bytes (max_memory_bytes)")
    );
    // Within the share: served on the same connection.
    let fits = image(1000, 1000, 2);
    assert_eq!(client.mean_filter(legacy(&fits)).await.unwrap().into_inner().data, fits.data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_memory_stalls_no_other_call_on_its_connection_and_is_served_once_memory_frees() {
    let pki = Pki::new(&["alpha"]);
    // A 64 MiB budget: alpha's share is 32 MiB, of which its two connections
    // take 12 (their 5 MiB windows and 1 MiB frames). A wait may last 30 s.
    // The waiting call may hold one 4 MiB stream window of unread body; the
    // connection's window is 5 MiB, so the small call still has room.
    let extra = "[tenancy]\nmemory_budget_bytes = 67108864\nmemory_wait_ms = 30000\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let labels = [("tenant", "alpha")];

    // Connection 1: a 4.5 MB mean filter whose answer is not read yet holds
    // its output (charged as sending).
    let (mut first, c1) = h2_connect(&server, &pki, "alpha").await;
    let (held, mut body) = start_call(&mut first, "/NLImageService/MeanFilter").await;
    let held_image = image(1500, 1000, 1);
    send_flow_controlled(&mut body, grpc_message(&legacy(&held_image))).await;
    body.send_data(Bytes::new(), true).unwrap();
    let held = held.await.unwrap();

    // Connection 2: a 10.8 MB call (21.6 MB charged) fits the share, but not
    // now: it waits, its body unread beyond one stream window...
    let (mut second, _c2) = h2_connect(&server, &pki, "alpha").await;
    let (waiting, mut body) = start_call(&mut second, "/NLImageService/MeanFilter").await;
    let large = image(2400, 1500, 2);
    let message = grpc_message(&legacy(&large));
    let sender = tokio::spawn(async move {
        // As flow control allows; a reset stream (a refusal) ends it.
        let mut message = message;
        while !message.is_empty() {
            body.reserve_capacity(message.len());
            let Some(Ok(granted)) = std::future::poll_fn(|cx| body.poll_capacity(cx)).await else { return };
            if body.send_data(message.split_to(granted.min(message.len())), false).is_err() {
                return;
            }
        }
        let _ = body.send_data(Bytes::new(), true);
    });
    let waits = until_metric(server.admin_addr, "imgsvc_memory_waits_total", &labels, 1.0, Duration::from_secs(10)).await;
    assert_eq!(waits, Some(1.0), "the large call waits for memory");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sender.is_finished(), "the waiting call's body is held back by flow control");

    // ...and a call on the same connection is answered meanwhile: the
    // waiting call's unread bytes do not take the connection's window. (A
    // 60 KB health check: an image call of the same tenant would wait its
    // turn behind the large one, docs/tenancy.md#memory, "Fair waiting".)
    let (answer, mut body) = start_call(&mut second, "/grpc.health.v1.Health/Check").await;
    let check = tonic_health::pb::HealthCheckRequest { service: "x".repeat(60_000) };
    send_flow_controlled(&mut body, grpc_message(&check)).await;
    body.send_data(Bytes::new(), true).unwrap();
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), grpc_answer(answer)).await.expect("answered, not stalled");
    assert_eq!((status.code(), status.message()), (Code::NotFound, "service not registered"), "{status:?}");
    eprintln!("a call on the waiting call's connection answered in {:?}", started.elapsed());

    // Reading the first answer and closing its connection frees its memory
    // (the answer, and the connection's window): the waiting call goes on
    // and is served, nothing refused. (Closed, because h2 may keep the last
    // frames it wrote until its connection is next polled, and this one
    // then idles: that memory is held, and counted, until then.)
    let (status, data) = tokio::time::timeout(Duration::from_secs(10), grpc_answer_of(held)).await.expect("the held answer");
    assert_eq!((status.code(), data), (Code::Ok, grpc_message(&legacy(&held_image)).to_vec()));
    drop(first);
    c1.abort();
    let (status, data) = tokio::time::timeout(Duration::from_secs(20), grpc_answer(waiting)).await.expect("the waiting call is served");
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(data.len(), grpc_message(&legacy(&large)).len());
    let text = scrape(server.admin_addr);
    assert_eq!(metric(&text, "imgsvc_memory_refusals_total", &[("tenant", "alpha"), ("reason", "exhausted")]), None, "{text}");
}
