//! Connection ageing moves long-lived clients onto a replica started after
//! they connected: one client channel through haproxy (TCP pass-through,
//! `balance leastconn`, as deploy/haproxy ships it) is opened while only
//! the first server runs; the second starts; each connection is closed
//! gracefully at its (jittered) maximum age and the client reconnects.
//! Within max age + grace calls reach the second server, and across the
//! ageing cycles under load no call of imgsvc-client's (`client::Balancer`)
//! fails. (A call the client dispatches to a connection at the moment it
//! closes is cancelled by hyper before it is sent; the client retries such
//! a call, and the test prints how many it retried.)
//!
//! The same holds for grpcio (gRPC C-core) with its default channel (no
//! retry policy): one channel through haproxy to two servers, four threads
//! calling for 6 s across several ageing cycles, and no call fails.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    client::{Api, Balancer, Op, RawImage},
    imaging::QuarterTurns,
    proto::v1::PixelFormat,
};
use serde_json::json;

const TENANT: &str = "ageing";
/// `server.max_connection_age_secs` and `_grace_secs` in this test.
const AGE: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(1);

/// haproxy in front of two backends, checking `/readyz` every 100 ms so a
/// backend that starts is in the pool at once.
fn start_haproxy(haproxy: &Path, dir: &Path, backends: &[(SocketAddr, SocketAddr)]) -> (KillOnDrop, SocketAddr) {
    crate::haproxy::spawn_haproxy(haproxy, dir, |listen| {
        let mut config = format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  timeout check 1s\n  retries 2\n  option redispatch\n\
             frontend grpc\n  bind {listen}\n  default_backend imgsvc\n\
             backend imgsvc\n  balance leastconn\n  option httpchk\n  http-check send meth GET uri /readyz\n  http-check expect status 200\n\
             \x20 default-server inter 100ms fall 1 rise 1\n"
        );
        for (i, (grpc, admin)) in backends.iter().enumerate() {
            config.push_str(&format!("  server imgsvc{} {grpc} check port {}\n", i + 1, admin.port()));
        }
        config
    })
}

/// Environment pairs as `ServerProcess::spawn_with` takes them.
fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A loopback port free now (for a server started later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The ageing settings of this test as environment, with `extra`.
fn ageing_env(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    [
        ("IMGSVC_SERVER__MAX_CONNECTION_AGE_SECS", AGE.as_secs().to_string()),
        ("IMGSVC_SERVER__MAX_CONNECTION_AGE_GRACE_SECS", GRACE.as_secs().to_string()),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    .collect()
}

fn ensure_haproxy() -> std::path::PathBuf {
    crate::haproxy::ensure_haproxy().expect("haproxy (Debian's package) is needed: apt-get install haproxy")
}

/// Connections closed at their maximum age, over all `admins`.
fn aged_out(admins: &[SocketAddr]) -> f64 {
    admins.iter().map(|a| metric(&scrape(*a), "imgsvc_connections_closed_total", &[("reason", "max_age")]).unwrap_or(0.0)).sum()
}

fn ok_calls(admin: SocketAddr) -> f64 {
    let labels = [("tenant", TENANT), ("method", "imgsvc.v1.ImageService/Process"), ("code", "OK")];
    metric(&scrape(admin), "imgsvc_requests_total", &labels).unwrap_or(0.0)
}

#[test]
fn aged_connections_move_a_pinned_client_to_a_new_server_without_a_failed_call() {
    let haproxy = ensure_haproxy();
    let pki = std::sync::Arc::new(Pki::new(&[TENANT]));
    let first = ServerProcess::spawn_with(&pki, "", &as_refs(&ageing_env(&[])));
    // The second server's addresses are fixed now so haproxy knows them; it
    // starts later.
    let (port2, admin2) = (free_port(), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let second_env = ageing_env(&[("IMGSVC_SERVER__PORT", port2.to_string()), ("IMGSVC_ADMIN__LISTEN", admin2.to_string())]);
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, front) =
        start_haproxy(&haproxy, dir.path(), &[(first.addr, first.admin_addr), (SocketAddr::from(([127, 0, 0, 1], port2)), admin2)]);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let load = Duration::from_secs(7);
    let ((ok, failed, retries), samples, started_second, second) = runtime.block_on(async {
        // imgsvc-client's call path (client::Balancer) through one
        // connection to haproxy, opened while only the first server runs.
        let client = std::sync::Arc::new(Balancer::new(vec![target_of(front)], pki.credentials(TENANT)));
        let image = RawImage { format: PixelFormat::Gray8, width: 64, height: 64, data: Bytes::from(vec![7u8; 64 * 64]) };
        let ops = [Op::Rotate(QuarterTurns::One)];
        client.process(Api::V1, &image, &ops).await.unwrap();
        let t0 = Instant::now();
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (client, image) = (client.clone(), image.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    while t0.elapsed() < load {
                        match client.process(Api::V1, &image, &ops).await {
                            Ok(_) => ok += 1,
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        let run = {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                for caller in callers {
                    let (o, f) = caller.await.unwrap();
                    ok += o;
                    failed.extend(f);
                }
                (ok, failed, client.retries())
            })
        };
        // Calls per server every 250 ms, while the second server starts.
        let first_admin = first.admin_addr;
        let second_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = second_up.clone();
        let sampler = tokio::task::spawn_blocking(move || {
            let mut samples = Vec::new();
            while t0.elapsed() < load {
                let second = if up.load(std::sync::atomic::Ordering::SeqCst) { ok_calls(admin2) } else { 0.0 };
                samples.push((t0.elapsed(), ok_calls(first_admin), second));
                std::thread::sleep(Duration::from_millis(250));
            }
            samples.push((t0.elapsed(), ok_calls(first_admin), ok_calls(admin2)));
            samples
        });
        tokio::time::sleep(Duration::from_millis(750)).await;
        let pki2 = pki.clone();
        let second = tokio::task::spawn_blocking(move || ServerProcess::spawn_with(&pki2, "", &as_refs(&second_env))).await.unwrap();
        let started_second = t0.elapsed();
        second_up.store(true, std::sync::atomic::Ordering::SeqCst);
        (run.await.unwrap(), sampler.await.unwrap(), started_second, second)
    });

    // The share of calls the new server took, per 250 ms.
    let mut table = String::from("  t (s)  calls  share on the new server\n");
    let mut first_on_second = None;
    for w in samples.windows(2) {
        let ((_, a0, b0), (t, a1, b1)) = (w[0], w[1]);
        let (a, b) = (a1 - a0, b1 - b0);
        if b > 0.0 && first_on_second.is_none() {
            first_on_second = Some(t);
        }
        table.push_str(&format!("  {:5.2}  {:5}  {:5.1} %\n", t.as_secs_f64(), a + b, if a + b > 0.0 { 100.0 * b / (a + b) } else { 0.0 }));
    }
    eprintln!("second server started at {:.2} s; calls per 250 ms:\n{table}", started_second.as_secs_f64());

    eprintln!("{ok} calls OK, {} failed, {retries} retried by the client", failed.len());
    assert!(failed.is_empty(), "no call fails across the ageing cycles: {failed:?}\n{table}");
    assert!(ok > 100, "{ok}");
    let reached = first_on_second.unwrap_or_else(|| panic!("no call reached the second server:\n{table}"));
    // Max age (+10 % jitter) + grace, plus haproxy's check and a scrape.
    let bound = AGE.mul_f64(1.1) + GRACE + Duration::from_millis(1000);
    assert!(
        reached <= started_second + bound,
        "calls reached the new server {:?} after it started, over {bound:?}\n{table}",
        reached - started_second
    );
    // In the last two seconds both servers serve (the client alternates
    // between them as its connections age: leastconn picks the other one).
    let last = samples.last().unwrap();
    let before = samples.iter().rev().find(|s| last.0 - s.0 >= Duration::from_secs(2)).unwrap();
    let (a, b) = (last.1 - before.1, last.2 - before.2);
    assert!(a > 0.0 && b > 0.0, "both servers serve at the end: {a} and {b}\n{table}");
    // Several ageing cycles happened, each a graceful close.
    let closed = aged_out(&[first.admin_addr, second.admin_addr]);
    assert!(closed >= 3.0, "{closed} connections aged out\n{table}");
}

#[test]
fn grpcio_loses_no_call_across_ageing_cycles_through_haproxy() {
    use crate::interop_grpcio::{pattern, run_driver, v1_image, v1_operations};
    let haproxy = ensure_haproxy();
    let pki = Pki::new(&[TENANT]);
    let env = ageing_env(&[]);
    let servers: Vec<ServerProcess> = std::thread::scope(|s| {
        let starting: Vec<_> = (0..2).map(|_| s.spawn(|| ServerProcess::spawn_with(&pki, "", &as_refs(&env)))).collect();
        starting.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let admins: Vec<SocketAddr> = servers.iter().map(|s| s.admin_addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, front) = start_haproxy(&haproxy, dir.path(), &servers.iter().map(|s| (s.addr, s.admin_addr)).collect::<Vec<_>>());

    // Non-square, every sample different from its neighbours: a wrong or
    // truncated answer cannot pass for the right one.
    let image = pattern(PixelFormat::Gray8, 48, 32);
    let ops = [Op::Rotate(QuarterTurns::One)];
    let load = json!({
        "seconds": 6, "threads": 4, "rpc": "Process",
        "request": { "image": v1_image(&image), "operations": v1_operations(&ops) },
        "expect": { "image": v1_image(&expected(&image, &ops)) },
    });
    let report = run_driver(front, &pki, TENANT, json!({ "load": load }));
    let (ok, failed) = (report["ok"].as_u64().unwrap(), report["failed"].as_u64().unwrap());
    let served: Vec<f64> = admins.iter().map(|a| ok_calls(*a)).collect();
    let closed = aged_out(&admins);
    eprintln!("grpcio {}: {ok} calls OK, {failed} failed; OK per server {served:?}; {closed} connections aged out", report["grpcio"]);
    assert_eq!(failed, 0, "no call fails across the ageing cycles: {}", report["failures"]);
    assert!(ok > 100, "{ok}");
    assert!(served.iter().all(|n| *n > 0.0), "both servers serve: {served:?}");
    assert_eq!(served.iter().sum::<f64>(), ok as f64, "each call the servers answered reached grpcio once: {served:?}");
    assert!(closed >= 3.0, "{closed} connections aged out");
}
