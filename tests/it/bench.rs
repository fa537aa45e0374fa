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

#[test]
fn bench_retries_a_rate_limit_refusal_after_the_delay_the_server_gives() {
    let pki = Pki::new(&["alpha"]);
    // 5 calls per second, burst 1: back-to-back calls are refused with a
    // RetryInfo of about 200 ms, and each retry after it succeeds.
    let server = TestServer::start_with(&pki, |raw| {
        let alpha = raw.tenants.get_mut("alpha").unwrap();
        alpha.requests_per_second = Some(5.0);
        alpha.burst = Some(1);
    });
    let started = std::time::Instant::now();
    let (out, report) =
        bench(&server, &pki, "alpha", &["--op", "none", "--width", "8", "--height", "8", "--requests", "4", "--concurrency", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!((report["ok"].as_u64(), &report["errors"]), (Some(4), &serde_json::json!({})), "{report}");
    let retries = report["retries"].as_u64().unwrap();
    assert!((3..=9).contains(&retries), "the 2nd to 4th calls waited for their token: {report}");
    // Four calls at 5 per second from one token: at least 0.6 s of waiting.
    assert!(started.elapsed() >= std::time::Duration::from_millis(550), "{:?}", started.elapsed());
}

/// Chromium (Debian's package), installed with apt-get when missing (once
/// per test process).
fn ensure_chromium() -> &'static str {
    static CHROMIUM: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    CHROMIUM.get_or_init(|| {
        if !command_succeeds("chromium", &["--version"]) {
            assert!(apt_get_available(), "chromium is not installed and apt-get is not available: install Debian's `chromium` package");
            apt_get_install("chromium");
            assert!(command_succeeds("chromium", &["--version"]), "chromium does not run after apt-get install chromium");
        }
    });
    "chromium"
}

#[test]
fn bench_html_report_renders_its_charts_in_headless_chromium() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("bench.html");
    let (out, report) = bench(
        &server,
        &pki,
        "alpha",
        &["--op", "mean", "--width", "64", "--height", "64", "--duration", "1", "--concurrency", "4", "--report", html.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(report["ok"].as_u64().unwrap() > 50, "{report}");
    let page = std::fs::read_to_string(&html).unwrap();
    for id in ["summary", "histogram", "percentile-chart", "throughput"] {
        assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
    }

    let chromium = ensure_chromium();
    let shot = dir.path().join("shot.png");
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=800,1300",
        ])
        .arg(format!("--user-data-dir={}", dir.path().join("profile").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(out.status.success() && shot.exists(), "chromium failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    // Not blank: the charts put many non-background pixels of several
    // colours on the page.
    let image = image::open(&shot).unwrap().to_rgb8();
    let pixels = image.pixels().count() as f64;
    let luma: Vec<f64> = image.pixels().map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2])).collect();
    let mean = luma.iter().sum::<f64>() / pixels;
    let variance = luma.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / pixels;
    let coloured =
        |r: u8, g: u8, b: u8| image.pixels().filter(|p| p[0].abs_diff(r) < 24 && p[1].abs_diff(g) < 24 && p[2].abs_diff(b) < 24).count();
    assert!(variance > 100.0, "the screenshot is nearly uniform (luma variance {variance:.1})");
    assert!(coloured(0x3b, 0x7d, 0xd8) > 500, "the histogram's blue bars are not on the screenshot");
    assert!(coloured(0xe0, 0x7b, 0x39) > 500, "the percentiles' orange bars are not on the screenshot");
    assert!(coloured(0x2e, 0x9e, 0x4f) > 100, "the throughput line is not on the screenshot");
}
