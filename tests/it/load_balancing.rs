//! Client-side balancing across several servers: round-robin, and no
//! failed request when a server is killed mid-run (retries on another).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    client::{Api, Balancer, Op, RawImage},
    imaging::QuarterTurns,
    proto::v1::PixelFormat,
};

fn test_image(seed: u8) -> RawImage {
    let (w, h) = (96u32, 64u32);
    let data: Vec<u8> = (0..w * h * 3).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    RawImage { format: PixelFormat::Rgb8, width: w, height: h, data: Bytes::from(data) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_round_robin_across_servers() {
    let pki = Pki::new(&["lb"]);
    let servers: Vec<ServerProcess> = (0..3).map(|_| ServerProcess::spawn(&pki)).collect();
    let balancer = Balancer::new(servers.iter().map(|s| target_of(s.addr)).collect(), pki.credentials("lb"));
    let mut served = [0usize; 3];
    let ops = [Op::Rotate(QuarterTurns::One)];
    for seed in 0..9u8 {
        let image = test_image(seed);
        let (out, i) = balancer.process(Api::V1, &image, &ops).await.unwrap();
        assert_eq!(out, expected(&image, &ops));
        served[i] += 1;
    }
    assert_eq!(served, [3, 3, 3]);
    assert_eq!(balancer.retries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_run_fails_no_request() {
    // Each worker sends at least BEFORE_KILL requests, then keeps going
    // until it has sent AFTER_KILL requests that started after the kill
    // was seen (a fixed count could all finish before the kill: CI saw
    // it). MAX_PER_WORKER bounds the loop.
    const KILL_AFTER: usize = 15;
    const AFTER_KILL: usize = 6;
    const MAX_PER_WORKER: usize = 400;
    let pki = Pki::new(&["lb"]);
    let mut servers: Vec<ServerProcess> = (0..3).map(|_| ServerProcess::spawn(&pki)).collect();
    let balancer = Arc::new(Balancer::new(servers.iter().map(|s| target_of(s.addr)).collect(), pki.credentials("lb")));
    let done = Arc::new(AtomicUsize::new(0));
    let (killed_tx, killed_rx) = tokio::sync::watch::channel(false);
    let (reached_tx, mut reached_rx) = tokio::sync::mpsc::channel::<()>(1);

    // Three concurrent workers, so requests are in flight on the victim
    // when it dies.
    let mut workers = Vec::new();
    for w in 0..3usize {
        let (balancer, done, killed, reached) = (balancer.clone(), done.clone(), killed_rx.clone(), reached_tx.clone());
        workers.push(tokio::spawn(async move {
            let mut after_kill = Vec::new();
            for k in 0..MAX_PER_WORKER {
                if after_kill.len() >= AFTER_KILL {
                    return Ok::<_, String>(after_kill);
                }
                let image = test_image((w * 100 + k) as u8);
                let ops = [Op::MeanFilter, Op::Rotate(QuarterTurns::Three)];
                let was_killed = *killed.borrow();
                let result = balancer.process(Api::V1, &image, &ops).await;
                let (out, i) = result.map_err(|e| format!("request {w}/{k} failed: {e}"))?;
                if out != expected(&image, &ops) {
                    return Err(format!("request {w}/{k}: wrong image"));
                }
                if was_killed {
                    after_kill.push(i);
                }
                if done.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER {
                    let _ = reached.send(()).await;
                }
            }
            Err(format!("worker {w}: {MAX_PER_WORKER} requests and only {} after the kill", after_kill.len()))
        }));
    }
    drop(reached_tx);
    reached_rx.recv().await.expect("the first requests complete");
    servers[1].kill();
    killed_tx.send(true).unwrap();

    let mut after_kill = Vec::new();
    for worker in workers {
        after_kill.extend(worker.await.unwrap().unwrap());
    }
    assert!(done.load(Ordering::SeqCst) >= KILL_AFTER + 3 * AFTER_KILL);
    assert_eq!(after_kill.len(), 3 * AFTER_KILL);
    assert!(!after_kill.contains(&1), "a request started after the kill was answered by the dead server: {after_kill:?}");
    // Round-robin sent calls to the dead server; each was retried elsewhere.
    assert!(balancer.retries() >= 1, "no call met the dead server");
}

#[test]
fn cli_endpoints_skip_a_dead_server() {
    let pki = Pki::new(&["lb"]);
    let alive = ServerProcess::spawn(&pki);
    let (_reserved, dead) = refusing_port();
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("out.png");
    // Whichever the run starts with (it depends on the process id), the
    // dead endpoint is retried on the live one.
    let out = run_client_as(
        &pki,
        "lb",
        &[
            "--endpoint",
            &dead.to_string(),
            "--endpoint",
            &alive.addr.to_string(),
            "--server-name",
            "localhost",
            "--input",
            fixture("camera.png").to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--rotate",
            "NINETY_DEG",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(output.exists());
}

#[test]
fn cli_refuses_endpoint_together_with_host() {
    let out = run_client(&["--endpoint", "127.0.0.1:1", "--host", "127.0.0.1", "--input", "a.png", "--output", "b.png", "--mean"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("'--endpoint <HOST:PORT>' cannot be used with '--host <HOST>'"), "{}", stderr(&out));
}

#[test]
fn cli_reports_a_malformed_endpoint_quoting_it() {
    let out = run_client(&["--endpoint", "imgsvc", "--input", "a.png", "--output", "b.png", "--mean"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("\"imgsvc\" is not HOST:PORT"), "{}", stderr(&out));
}
