//! Graceful shutdown: in-flight requests finish, new connections are
//! refused, the process exits 0 (in-process and the daemon on SIGTERM under
//! load); a drain that overruns its deadline is cut.

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::{
    nlimage::{NlImage, nl_image_service_client::NlImageServiceClient},
    v1::image_service_client::ImageServiceClient,
};

fn big_gray(seed: u8) -> NlImage {
    let (w, h) = (3000, 2000);
    NlImage { color: false, width: w, height: h, data: Bytes::from(vec![seed; (w * h) as usize]) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_complete_after_the_shutdown_signal() {
    let pki = Pki::new(&["alpha"]);
    // One worker: the requests run one after another, so when the first
    // answer arrives the others are still in flight.
    let mut server = TestServer::start_with(&pki, |raw| raw.server.worker_threads = 1);
    let client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await).max_decoding_message_size(64 << 20);
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(8);
    let mut calls = Vec::new();
    for seed in 0..4u8 {
        let (mut c, tx) = (client.clone(), first_tx.clone());
        calls.push(tokio::spawn(async move {
            let result = c.mean_filter(big_gray(seed)).await;
            let _ = tx.send(()).await;
            result.map(|r| r.into_inner().data[0])
        }));
    }
    first_rx.recv().await.unwrap();
    let stop = server.take_stop();
    stop.send(()).unwrap();
    for (seed, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().expect("in-flight request completes"), seed as u8);
    }
    let port = server.port();
    let joined = tokio::task::spawn_blocking(move || server.join()).await.unwrap();
    assert!(joined.is_ok(), "{joined:?}");
    let refused = imgsvc::client::connect(&target(port), &pki.credentials("alpha")).await;
    assert!(refused.is_err(), "no new connections after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_a_stuck_drain_short() {
    let pki = Pki::new(&["alpha"]);
    let mut server = TestServer::start_with(&pki, |raw| {
        raw.server.worker_threads = 1;
        raw.server.drain_timeout_secs = 0;
    });
    let client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await).max_decoding_message_size(64 << 20);
    // Keep the worker busy well past a zero-second drain.
    let mut calls = Vec::new();
    for seed in 0..6u8 {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move { c.mean_filter(big_gray(seed)).await }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.take_stop().send(()).unwrap();
    let started = std::time::Instant::now();
    let joined = tokio::task::spawn_blocking(move || server.join()).await.unwrap();
    assert!(joined.is_ok());
    assert!(started.elapsed() < Duration::from_secs(5), "serve returned at the deadline, not after all work");
    for call in calls {
        let _ = call.await.unwrap(); // completed or cut: either way, no hang
    }
}

/// Mean filters per request: enough to keep the daemon's only worker busy.
const SLOW_OPERATIONS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_the_requests_in_flight_refuses_new_clients_and_exits_zero() {
    const CLIENTS: usize = 6;
    let pki = Pki::new(&["alpha"]);
    // One worker: the requests queue, so the drain still has work when new
    // clients try to connect.
    let extra = format!("[limits]\nmax_operations = {SLOW_OPERATIONS}\n");
    let mut server = ServerProcess::spawn_with(&pki, &extra, &[("IMGSVC_SERVER__WORKER_THREADS", "1")]);
    let mut calls = Vec::new();
    for fill in 0..CLIENTS as u8 {
        let channel = imgsvc::client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
        calls.push(tokio::spawn(async move { ImageServiceClient::new(channel).process(slow_v1_request(fill, SLOW_OPERATIONS)).await }));
    }
    let in_flight = [("tenant", "alpha"), ("method", "imgsvc.v1.ImageService/Process")];
    let all_in = until_metric(server.admin_addr, "imgsvc_in_flight_requests", &in_flight, CLIENTS as f64, Duration::from_secs(30)).await;
    assert_eq!(all_in, Some(CLIENTS as f64));

    send_signal(server.pid(), "TERM");
    // Readiness turns once the gRPC listeners are closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(server.admin_addr, "/readyz") != (503, "draining\n".to_string()) {
        assert!(std::time::Instant::now() < deadline, "/readyz never said draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = std::net::TcpStream::connect(server.addr).map(|_| ()).map_err(|e| e.kind());
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "a new connection during the drain");
    let err = imgsvc::client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap_err();
    assert!(err.to_string().contains("nothing accepts connections at that address"), "{err}");
    let in_flight_now = metric(&scrape(server.admin_addr), "imgsvc_in_flight_requests", &in_flight).unwrap();
    assert!(in_flight_now >= 1.0, "the checks above ran during the drain");

    for (fill, call) in calls.into_iter().enumerate() {
        let image = call.await.unwrap().expect("an in-flight request completes").into_inner().image.unwrap();
        assert_eq!((image.width, image.height), (1000, 1000));
        assert!(image.data.iter().all(|&b| b == fill as u8), "request {fill}");
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        // Ends once the exited daemon's stderr is read to its end.
        let logs: Vec<String> = server.logs.iter().collect();
        (status, logs)
    });
    let (status, logs) = tokio::time::timeout(Duration::from_secs(30), status).await.expect("the daemon exits").unwrap();
    assert_eq!(status.code(), Some(0), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("shutdown requested") && l.contains("SIGTERM")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("shutdown complete")), "{logs:?}");
}
