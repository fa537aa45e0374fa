//! `imgsvc-client bench`: a bounded load against a test server, reported
//! as throughput, latency percentiles and errors by status code.

use crate::common::*;

fn bench(server: &TestServer, pki: &Pki, tenant: &str, extra: &[&str]) -> (std::process::Output, serde_json::Value) {
    let mut args = vec!["bench".to_string()];
    args.extend(client_args(server, pki, tenant));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--json".into());
    let out = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    (out, json)
}

#[test]
fn bench_runs_a_bounded_number_of_requests_with_zero_errors_in_both_apis() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    for (api, op) in [("v1", "mean"), ("legacy", "rotate"), ("legacy", "none")] {
        let (out, report) = bench(
            &server,
            &pki,
            "alpha",
            &["--api", api, "--op", op, "--width", "64", "--height", "48", "--format", "rgb8", "--concurrency", "4", "--requests", "40"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(report["ok"], 40, "{report}");
        assert_eq!(report["errors"], serde_json::json!({}), "{report}");
        assert_eq!((report["api"].as_str(), report["op"].as_str()), (Some(api), Some(op)));
        let (p50, p99, max) = (report["p50_ms"].as_f64().unwrap(), report["p99_ms"].as_f64().unwrap(), report["max_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{report}");
        assert!(report["requests_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_with_a_duration_stops_by_itself() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let started = std::time::Instant::now();
    let (out, report) = bench(
        &server,
        &pki,
        "alpha",
        &["--op", "rotate", "--width", "32", "--height", "32", "--format", "gray8", "--concurrency", "2", "--duration", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(report["ok"].as_u64().unwrap() > 0);
    let elapsed = report["elapsed_s"].as_f64().unwrap();
    assert!((1.0..5.0).contains(&elapsed), "{elapsed}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn bench_counts_refusals_by_status_code_and_exits_non_zero() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.tenants.get_mut("alpha").unwrap().allowed_operations = Some(vec!["rotate".into()]));
    let (out, report) =
        bench(&server, &pki, "alpha", &["--op", "mean", "--width", "8", "--height", "8", "--requests", "10", "--concurrency", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report["ok"], 0);
    assert_eq!(report["errors"], serde_json::json!({"PermissionDenied": 10}));
}

#[test]
fn bench_into_a_closed_pipe_exits_cleanly() {
    use std::process::{Command, Stdio};
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut args = vec!["bench".to_string()];
    args.extend(client_args(&server, &pki, "alpha"));
    args.extend(["--op", "none", "--width", "8", "--height", "8", "--requests", "4"].map(String::from));
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_imgsvc-client")).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take()); // as `| head -0` would: nobody reads the report
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}
