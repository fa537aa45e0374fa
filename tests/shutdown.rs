//! Graceful shutdown: in-flight requests finish, new connections are
//! refused, the process exits 0; a drain that overruns its deadline is cut.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use common::*;
use imgsvc::proto::nlimage::{NlImage, nl_image_service_client::NlImageServiceClient};

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

#[test]
fn sigterm_stops_the_daemon_with_exit_code_zero() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let p = pki.paths();
    let cfg = dir.path().join("imgsvc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nport = 0\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n",
            p.server_cert().display(),
            p.server_key().display(),
            p.ca_cert().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgsvc-server"))
        .args(["--config", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env("IMGSVC_ADMIN__LISTEN", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok);
    assert!(lines.by_ref().take(50).any(|l| l.contains("listening on")), "server did not start");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let rest: Vec<String> = lines.take(50).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("shutdown requested") && l.contains("SIGTERM")), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("shutdown complete")), "{rest:?}");
}
