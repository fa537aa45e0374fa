//! The monitoring kit under deploy/monitoring: `promtool check rules` and
//! `promtool test rules` (a unit test for every alert), then a real
//! Prometheus scraping a real server under a short load, with every
//! recording rule, alert expression and dashboard query evaluated through
//! its HTTP API: each must name only metrics that exist and return data
//! (no typo, no dead panel).
//!
//! Prometheus and promtool come from Debian's `prometheus` package,
//! installed with apt-get when missing (CI runs as root); the tests fail,
//! saying why, when that is impossible.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;
use imgsvc::loadgen::{self, BenchApi, BenchConfig, BenchFormat, BenchOp, StopAfter};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const KIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring");
const RULE_FILES: [&str; 2] = ["recording-rules.yml", "alerts.yml"];

/// promtool and prometheus, installed from Debian's package when missing
/// (once per test process: parallel tests would race for dpkg's lock).
fn ensure_prometheus() -> (PathBuf, PathBuf) {
    static TOOLS: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let runs = || command_succeeds("promtool", &["--version"]) && command_succeeds("prometheus", &["--version"]);
            if !runs() {
                assert!(
                    apt_get_available(),
                    "promtool/prometheus are not installed and apt-get is not available: install Debian's `prometheus` package"
                );
                apt_get_install("prometheus");
                assert!(runs(), "promtool and prometheus do not run after apt-get install prometheus");
            }
            (PathBuf::from("promtool"), PathBuf::from("prometheus"))
        })
        .clone()
}

fn yaml(file: &str) -> Yaml {
    let text = std::fs::read_to_string(Path::new(KIT).join(file)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// (name, expression) of every rule in `file`: `record` or `alert` name.
fn rules(file: &str) -> Vec<(String, String)> {
    let doc = yaml(file);
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["record"].as_str().or(rule["alert"].as_str()).unwrap_or_else(|| panic!("{file}: a rule without a name"));
            out.push((name.to_string(), rule["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// Every `expr` of the Grafana dashboard (panel title, expression), and the
/// selectors its template variables query.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(KIT).join("dashboard.json")).unwrap();
    let dashboard: Json = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((title.to_string(), target["expr"].as_str().unwrap().to_string()));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(SELECTOR, label): the selector must return data.
            let selector = q.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(s, _)| s).unwrap();
            out.push((format!("variable {}", var["name"]), selector.to_string()));
        }
    }
    out
}

/// The dashboard's variables as Grafana would fill them for this test.
fn fill_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$job", "imgsvc").replace("$tenant", ".*")
}

/// An alert expression that returns its signal whether or not it fires:
/// `x > 5` becomes `x > bool 5` (0 or 1 for every series of x).
fn as_signal(expr: &str) -> String {
    let mut out = expr.to_string();
    for op in [" > ", " < ", " >= ", " <= ", " == ", " != "] {
        out = out.replace(op, &format!("{} bool ", op.trim_end()));
    }
    out
}

/// The metric names an expression reads (imgsvc series and recorded series).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("imgsvc") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b'"');
        let end = start + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(expr.len() - start);
        if boundary && (expr[start..end].starts_with("imgsvc_") || expr[start..end].starts_with("imgsvc:")) {
            names.insert(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

#[test]
fn rules_pass_promtool_check_and_every_alert_has_a_unit_test() {
    let (promtool, _) = ensure_prometheus();
    let out = Command::new(&promtool).current_dir(KIT).args(["check", "rules"]).args(RULE_FILES).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.matches("SUCCESS").count() == 2, "{said}");
    let out = Command::new(&promtool).current_dir(KIT).args(["test", "rules", "alerts.test.yml"]).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("SUCCESS"), "{said}");

    // Every alert the issue asks for exists, and each has a test that
    // expects it to fire.
    let alerts: BTreeSet<String> = rules("alerts.yml").into_iter().map(|(n, _)| n).collect();
    for wanted in [
        "ImgsvcCertificateExpiresSoon",
        "ImgsvcErrorBudgetBurnFast",
        "ImgsvcErrorBudgetBurnSlow",
        "ImgsvcMemoryRefusals",
        "ImgsvcQueueWaitHigh",
        "ImgsvcNotReady",
        "ImgsvcTenantNearLimit",
    ] {
        assert!(alerts.contains(wanted), "alerts.yml has no {wanted}");
    }
    let tests = yaml("alerts.test.yml");
    let fired: BTreeSet<String> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap().iter())
        .filter(|a| a["exp_alerts"].as_sequence().is_some_and(|e| !e.is_empty()))
        .map(|a| a["alertname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fired, alerts, "each alert has a test in which it fires");
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// The body of a response sent with `Transfer-Encoding: chunked` (larger
/// answers), as one string; other bodies as they are.
fn unchunk(body: &str) -> String {
    if body.starts_with('{') {
        return body.to_string();
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

/// `/api/v1/query` at `prometheus`: the result vector (panics on an error
/// such as a syntax error, quoting it).
fn query(prometheus: SocketAddr, expr: &str) -> Vec<Json> {
    let (status, body) = http_get(prometheus, &format!("/api/v1/query?query={}", encode(expr)));
    let answer: Json = serde_json::from_str(&unchunk(&body)).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!((status, answer["status"].as_str()), (200, Some("success")), "{expr}: {body}");
    answer["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Starts Prometheus on a free loopback port (retried, bounded, should
/// another process take the port in between), scraping `admin` every
/// second as job `imgsvc` with the kit's rules loaded.
fn start_prometheus(prometheus: &Path, dir: &Path, admin: SocketAddr) -> (KillOnDrop, SocketAddr) {
    let rule_files: Vec<String> = RULE_FILES.iter().map(|f| format!("  - {KIT}/{f}")).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: imgsvc\n    static_configs:\n      - targets: ['{admin}']\n",
        rule_files.join("\n")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    for _ in 0..5 {
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut child = KillOnDrop::spawn(
            Command::new(prometheus)
                .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address={listen}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break; // exited: the port was taken, try another
            }
            if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() && http_get(listen, "/-/ready").0 == 200 {
                return (child, listen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("prometheus did not start on a free loopback port in 5 tries");
}

fn bench(op: BenchOp, side: u32, concurrency: usize, stop: StopAfter) -> BenchConfig {
    BenchConfig { op, width: side, height: side, format: BenchFormat::Rgb8, concurrency, stop, api: BenchApi::V1 }
}

#[test]
fn a_real_prometheus_evaluates_every_rule_alert_and_panel_against_a_loaded_server() {
    let (_, prometheus) = ensure_prometheus();
    let mut pki = Pki::new(&["mon-a", "mon-b", "mon-c", "mon-d"]);
    // mon-d is configured below with a rate of 1 call a second: its calls
    // are refused whatever the machine's speed (mon-a's refusals for its
    // call slots depend on how many of its calls overlap, which a loaded
    // machine changed: a CI run on 2026-12-07 had none).
    pki.tenants.retain(|t| t != "mon-d");
    // One worker and small per-tenant limits, so a short load queues jobs,
    // waits for memory and is refused (every saturation series gets data).
    let server = ServerProcess::spawn_with(
        &pki,
        "[tenancy]\nmemory_budget_bytes = 67108864\nmemory_wait_ms = 100\n\
         [tenant_defaults]\nrequests_per_second = 1000\nburst = 1000\nmax_concurrent_requests = 2\nmax_queued_requests = 6\nmax_memory_bytes = 1048576\n\
         [tenants.mon-d]\nrequests_per_second = 1\nburst = 1\n",
        &[
            ("IMGSVC_SERVER__WORKER_THREADS", "1"),
            ("IMGSVC_SERVER__HTTP2_STREAM_WINDOW_BYTES", "65535"),
            ("IMGSVC_SERVER__HTTP2_CONNECTION_WINDOW_BYTES", "131072"),
            ("IMGSVC_SERVER__HTTP2_MAX_FRAME_SIZE", "16384"),
            // Connections age out during the load: the close panel has data.
            ("IMGSVC_SERVER__MAX_CONNECTION_AGE_SECS", "1"),
            ("IMGSVC_SERVER__MAX_CONNECTION_AGE_GRACE_SECS", "1"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (_prometheus, api) = start_prometheus(&prometheus, dir.path(), server.admin_addr);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let connect = |tenant: &'static str| {
            let pki = &pki;
            async move { imgsvc::client::connect(&target_of(server.addr), &pki.credentials(tenant)).await.unwrap() }
        };
        let (a, b, c, d) = (connect("mon-a").await, connect("mon-b").await, connect("mon-c").await, connect("mon-d").await);
        let load = Duration::from_secs(3);
        // mon-a: 300x300 mean filters (above inline_max_pixels: they queue
        // for the one worker), more at once than its calls limit. mon-b: images whose bytes do not all fit its
        // 1 MiB share at once (memory waits and refusals), and one that
        // never fits. mon-c: invalid requests.
        // 10 callers against 2 running + 6 queued: tenant_busy refusals too.
        let queued = bench(BenchOp::Mean, 300, 10, StopAfter::Duration(load));
        let squeezed = bench(BenchOp::Rotate, 200, 6, StopAfter::Duration(load));
        let too_big = bench(BenchOp::Rotate, 700, 1, StopAfter::Requests(1));
        let invalid = BenchConfig { width: 0, ..bench(BenchOp::Rotate, 8, 1, StopAfter::Requests(2)) };
        let limited = bench(BenchOp::Rotate, 8, 1, StopAfter::Requests(5));
        let (ra, rb, never, invalid, limited) = tokio::join!(
            loadgen::run(a.clone(), &queued),
            loadgen::run(b.clone(), &squeezed),
            loadgen::run(b.clone(), &too_big),
            loadgen::run(c, &invalid),
            loadgen::run(d, &limited),
        );
        // Refused for its rate (the client retries after the delay the
        // refusal names, so each retry is one refusal).
        assert!(limited.retries >= 1, "mon-d over its rate: {limited:?}");
        assert!(ra.ok > 0 && rb.ok > 0, "{ra:?}\n{rb:?}");
        assert_eq!(never.errors.get("ResourceExhausted"), Some(&1), "{never:?}");
        assert_eq!(invalid.errors.get("InvalidArgument"), Some(&2), "{invalid:?}");
        // One refused handshake, for the handshake-failure panel.
        read_error_without_client_certificate(server.addr, &pki).await;
    });
    let text = scrape(server.admin_addr);
    for name in [
        "imgsvc_memory_waits_total",
        "imgsvc_memory_refusals_total",
        "imgsvc_refusals_total",
        "imgsvc_queue_wait_seconds_count",
        "imgsvc_queue_depth",
        "imgsvc_memory_budget_bytes",
        "imgsvc_tenant_limit",
        "imgsvc_connections_closed_total",
    ] {
        assert!(text.contains(name), "the load produced no {name}:\n{text}");
    }

    // Everything to evaluate: recording rules by their recorded name and by
    // their expression, alerts by their signal, dashboard queries filled in.
    let mut checks: Vec<(String, String)> = Vec::new();
    for (name, expr) in rules("recording-rules.yml") {
        checks.push((format!("recorded {name}"), name.clone()));
        checks.push((format!("recording rule {name}"), expr));
    }
    for (name, expr) in rules("alerts.yml") {
        checks.push((format!("alert {name}"), as_signal(&expr)));
    }
    for (title, expr) in dashboard_queries() {
        checks.push((format!("panel {title}"), fill_variables(&expr)));
    }
    checks.extend(extra_queries());

    // Prometheus needs two scrapes of a counter for a rate, and a rule
    // evaluation after that for a recorded series: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dead: Vec<&(String, String)>;
    loop {
        dead = checks.iter().filter(|(_, expr)| query(api, expr).is_empty()).collect();
        if dead.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Say which metric is missing, if that is the cause.
    let known: BTreeSet<String> = {
        let (_, body) = http_get(api, "/api/v1/label/__name__/values");
        let answer: Json = serde_json::from_str(&unchunk(&body)).unwrap();
        answer["data"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect()
    };
    let mut problems: Vec<String> = Vec::new();
    for (what, expr) in &checks {
        for name in metric_names(expr) {
            if !known.contains(&name) {
                problems.push(format!("{what}: Prometheus has no series named {name}"));
            }
        }
    }
    problems.extend(dead.iter().map(|(what, expr)| format!("{what}: no data within 20 s: {expr}")));
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The rule manager evaluated every rule without an error.
    let (_, body) = http_get(api, "/api/v1/rules");
    let answer: Json = serde_json::from_str(&unchunk(&body)).unwrap_or_else(|e| panic!("{e}: {body}"));
    let loaded: Vec<&Json> = answer["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(loaded.len(), rules("recording-rules.yml").len() + rules("alerts.yml").len(), "{body}");
    for rule in loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    let wait = query(api, "max(imgsvc:queue_wait_seconds:mean_rate1m)");
    eprintln!("mean queue wait under this load (1 worker, 10 callers of 300x300 mean filters): {wait:?}");
    // The tenant-limit ratio names the tenant and the limit.
    let usage = query(api, "imgsvc:tenant_limit_usage:ratio{tenant=\"mon-a\"}");
    let limits: BTreeSet<&str> = usage.iter().map(|s| s["metric"]["limit"].as_str().unwrap()).collect();
    assert_eq!(limits, BTreeSet::from(["calls", "connections", "memory_bytes", "queued_requests", "requests_per_second"]), "{usage:?}");
}

/// The autoscalers' queries (deploy/kubernetes/autoscaling), with their
/// placeholders filled as the adapter and a namespace would.
fn extra_queries() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/autoscaling");
    let adapter: Yaml = serde_yaml::from_str(&std::fs::read_to_string(dir.join("prometheus-adapter.yaml")).unwrap()).unwrap();
    let config: Yaml = serde_yaml::from_str(adapter["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let mut out = Vec::new();
    for rule in config["rules"].as_sequence().unwrap() {
        let query =
            rule["metricsQuery"].as_str().unwrap().replace("<<.LabelMatchers>>", "job=\"imgsvc\"").replace("<<.GroupBy>>", "instance");
        out.push((format!("prometheus-adapter {}", rule["name"]["as"].as_str().unwrap()), query));
    }
    let keda: Yaml = serde_yaml::from_str(&std::fs::read_to_string(dir.join("keda-scaledobject.yaml")).unwrap()).unwrap();
    for trigger in keda["spec"]["triggers"].as_sequence().unwrap() {
        let query = trigger["metadata"]["query"].as_str().unwrap().replace("namespace=\"imgsvc\"", "job=\"imgsvc\"");
        out.push(("KEDA trigger".to_string(), query));
    }
    out
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum by (job) (rate(imgsvc_requests_total{code=\"OK\"}[5m])) / imgsvc:request_errors:ratio_rate5m"),
        BTreeSet::from(["imgsvc_requests_total".to_string(), "imgsvc:request_errors:ratio_rate5m".to_string()])
    );
    assert_eq!(as_signal("a > 0.9 and b < 2"), "a > bool 0.9 and b < bool 2");
}
