//! Tenant isolation benchmark (not a test): a light tenant's latency for
//! 256×256 RGB mean-filter requests alone, then while a heavy tenant floods
//! 3840×2160 RGB mean-filter requests. Goal: the light tenant's p99 under
//! flood ≤ 3× its p99 alone.
//!
//!     cargo bench --bench tenant_fairness [-- --seconds 10 --flood-concurrency 16 --heavy-nice 0]
//!
//! Server, load generators and kernels share this machine's cores; the
//! server runs in-process on 127.0.0.1 with mutual TLS, as in production.

use std::time::Duration;

use imgsvc::{
    client::{Target, connect},
    config::{RawConfig, Settings},
    identity::{TenantId, TrustDomain},
    loadgen::{self, BenchApi, BenchConfig, BenchFormat, BenchOp, StopAfter},
    pki::{self, IssueRequest, PkiPaths},
    serving::server::{Server, bind},
    tls::ClientCredentials,
};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    use rustix::{process, thread};
    let tid = Some(thread::gettid());
    if nice > 0 {
        let current = process::getpriority_process(tid).unwrap();
        process::setpriority_process(tid, (current + nice).min(19)).unwrap();
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

fn main() {
    // As the daemon does (src/bin/imgsvc-server.rs).
    imgsvc::serving::allocator::tune_for_image_buffers();
    let seconds = arg("--seconds", 10);
    let flood_concurrency = arg("--flood-concurrency", 16) as usize;
    let dir = tempfile::tempdir().unwrap();
    let trust_domain = TrustDomain::parse("bench.imgsvc").unwrap();
    let mut req = IssueRequest::new(dir.path(), trust_domain.clone());
    req.tenants = vec![TenantId::parse("light").unwrap(), TenantId::parse("heavy").unwrap()];
    pki::issue(&req).unwrap();
    let paths = PkiPaths::new(dir.path());

    let mut raw = RawConfig::default();
    raw.server.port = 0;
    raw.tls.cert = paths.server_cert();
    raw.tls.key = paths.server_key();
    raw.tls.client_ca = paths.ca_cert();
    raw.tls.trust_domain = trust_domain.to_string();
    raw.log.level = "warn".into();
    for t in ["light", "heavy"] {
        raw.tenants.insert(t.into(), Default::default());
    }
    let settings = Settings::validate(raw, "fairness bench".into()).unwrap();
    let threads = settings.worker_threads;
    let _ = imgsvc::telemetry::init(&settings.log, None);

    // Server, light client and heavy client each get their own runtime, as
    // separate processes would: the flood's client-side encoding and TLS
    // must not delay the light client's tasks in a shared run queue.
    let server_rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let light_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // `--heavy-nice N`: the flood's load generator runs N nice steps lower,
    // taking the CPU left over rather than competing with the server and
    // the light client for it, as clients on other machines would.
    let heavy_nice = arg("--heavy-nice", 0) as i32;
    let heavy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || lower_priority(heavy_nice))
        .enable_all()
        .build()
        .unwrap();

    let (port, stop, serving) = server_rt.block_on(async {
        let server = Server::new(settings).unwrap();
        let listeners = bind("127.0.0.1", 0).await.unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve(listeners, async move {
            let _ = stopped.await;
        }));
        (port, stop, serving)
    });
    let target = Target {
        host: "127.0.0.1".into(),
        port,
        server_name: Some("localhost".into()),
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(120),
    };
    let creds = |t: &str| {
        let id = TenantId::parse(t).unwrap();
        ClientCredentials::from_files(&paths.ca_cert(), &paths.client_cert(&id), &paths.client_key(&id)).unwrap()
    };
    let light = BenchConfig {
        op: BenchOp::Mean,
        width: 256,
        height: 256,
        format: BenchFormat::Rgb8,
        concurrency: 2,
        stop: StopAfter::Duration(Duration::from_secs(seconds)),
        api: BenchApi::V1,
    };
    let heavy = BenchConfig {
        width: 3840,
        height: 2160,
        concurrency: flood_concurrency,
        stop: StopAfter::Duration(Duration::from_secs(seconds)),
        ..light.clone()
    };
    let light_channel = light_rt.block_on(connect(&target, &creds("light"))).unwrap();
    // Warm up the connection and kernels.
    light_rt.block_on(loadgen::run(light_channel.clone(), &BenchConfig { stop: StopAfter::Requests(50), ..light.clone() }));
    let alone = light_rt.block_on(loadgen::run(light_channel.clone(), &light));

    let flood_task = heavy_rt.spawn({
        let (target, creds, cfg) = (target.clone(), creds("heavy"), heavy.clone());
        async move {
            let channel = connect(&target, &creds).await.unwrap();
            loadgen::run(channel, &cfg).await
        }
    });
    let under_flood = light_rt.block_on(loadgen::run(light_channel, &light));
    let flood = heavy_rt.block_on(flood_task).unwrap();

    println!("tenant fairness, {threads} worker threads, {seconds} s per phase, mutual TLS on 127.0.0.1");
    println!("| phase | tenant | requests | req/s | p50 ms | p99 ms | errors |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (phase, tenant, r) in [
        ("alone", "light 256x256", &alone),
        ("flood", "light 256x256", &under_flood),
        ("flood", &*format!("heavy 3840x2160 x{flood_concurrency}"), &flood),
    ] {
        println!("| {phase} | {tenant} | {} | {:.1} | {:.2} | {:.2} | {} |", r.ok, r.requests_per_s, r.p50_ms, r.p99_ms, r.error_count());
    }
    let ratio = under_flood.p99_ms / alone.p99_ms.max(1e-9);
    println!("light p99 under flood / alone = {ratio:.2} (goal <= 3)");
    let _ = stop.send(());
    let _ = server_rt.block_on(serving);
}
