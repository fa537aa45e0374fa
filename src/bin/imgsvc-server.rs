//! imgsvc-server: the daemon. See `imgsvc-server --help` and the README.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use imgsvc::{
    EXIT_CONFIG, EXIT_USAGE,
    config::{ConfigSource, KernelTlsMode, Settings},
    pki::PkiPaths,
    serving::{
        certwatch::{self, Trigger},
        kernel_tls,
        server::{self, Server, ServerError},
        systemd,
    },
    telemetry, tls,
};

// Another allocator instead of tuned glibc (features `jemalloc`, `mimalloc`;
// src/serving/allocator.rs skips glibc's tuning and trimmer in such builds). Compared
// in docs/performance.md#allocators.
#[cfg(all(feature = "jemalloc", feature = "mimalloc"))]
compile_error!("features `jemalloc` and `mimalloc` each choose imgsvc-server's allocator: enable at most one");

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read by jemalloc itself before `main` (the symbol is
/// `_rjem_`-prefixed, as tikv-jemalloc-sys builds jemalloc; the operator's
/// `_RJEM_MALLOC_CONF` still overrides it). Background threads purge freed
/// pages without waiting for the next allocation, and dirty pages are
/// returned within about a second instead of jemalloc's default ten, so
/// memory comes back after a burst while the server sits idle.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLES: &str = "\
Examples:
  imgsvc-server                                   # embedded dev config, dev certificates in certs/dev/
  imgsvc-server --config /etc/imgsvc/imgsvc.toml
  imgsvc-server --config config/dev.toml --host :: --port 6000
  imgsvc-server --check-config --config /etc/imgsvc/imgsvc.toml

Environment variables IMGSVC_<SECTION>__<KEY> override the file (IMGSVC_SERVER__PORT=6000).
Exit codes: 0 ok, 1 runtime failure, 64 usage error, 78 configuration error.";

/// Multi-tenant gRPC image service (NLImageService + imgsvc.v1) over mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "imgsvc-server", version, after_help = EXAMPLES)]
struct Args {
    /// TOML config file. Without it, the embedded development config
    /// (config/dev.toml) is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address or name to listen on; overrides server.host. A name binds
    /// every address it resolves to; 0.0.0.0 or :: for all interfaces.
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; overrides server.port (0 picks a free port).
    #[arg(long)]
    port: Option<u16>,
    /// Validate the config (values, files readable, certificates parse)
    /// without binding anything, then exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let allocator = imgsvc::serving::allocator::tune_for_image_buffers();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    let source = match &args.config {
        Some(path) => ConfigSource::File(path.clone()),
        None => ConfigSource::embedded_dev(),
    };
    let overrides = Overrides { host: args.host.clone(), port: args.port };
    let settings = match load_settings(&source, &overrides) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, anyhow::Error::new(e)),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("imgsvc-accept").build() {
        Ok(rt) => rt,
        Err(e) => return fail(1, anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    // Span export runs on the runtime (the exporter's connection lives
    // there); checking a config exports nothing.
    let export = if args.check_config { None } else { settings.trace_export.as_ref() };
    let initialized = {
        let _in_runtime = runtime.enter();
        telemetry::init(&settings.log, export)
    };
    let telemetry = match initialized {
        Ok(t) => t,
        Err(e) => return fail(EXIT_CONFIG, anyhow::Error::new(e).context(format!("config {}", settings.origin))),
    };
    tracing::debug!(?allocator, name = imgsvc::serving::allocator::SERVER_ALLOCATOR, "allocator (see src/serving/allocator.rs)");
    if args.config.is_none() {
        tracing::warn!("no --config given: running the embedded development config (never use it in production)");
    }
    if args.check_config {
        return check_config(&settings);
    }
    let code = runtime.block_on(run(settings, source, overrides));
    // The last requests' spans are still buffered: export them before exit.
    telemetry.shutdown();
    code
}

/// Command-line values that override the config file, at start and on
/// every reload.
#[derive(Clone, Debug)]
struct Overrides {
    host: Option<String>,
    port: Option<u16>,
}

fn load_settings(source: &ConfigSource, overrides: &Overrides) -> Result<Settings, imgsvc::config::ConfigError> {
    let mut settings = Settings::load(source)?;
    if let Some(host) = &overrides.host {
        settings.host = host.clone();
    }
    if let Some(port) = overrides.port {
        settings.port = port;
    }
    Ok(settings)
}

fn check_config(settings: &Settings) -> ExitCode {
    let tls = &settings.tls;
    let missing = [&tls.cert, &tls.key, &tls.client_ca].into_iter().any(|p| !p.exists());
    if tls.dev_auto_certs && missing {
        println!("config OK: {} (development certificates will be generated at start)", settings.origin);
        return ExitCode::SUCCESS;
    }
    // Kernel TLS is a property of the kernel, not of the file: probed here
    // as at start, so that "on" fails the check where it would fail the start.
    let kernel_tls = match kernel_tls::resolve(tls.kernel_tls) {
        Ok((_, summary)) => (tls.kernel_tls != KernelTlsMode::Off).then(|| format!("kernel TLS: {summary}")),
        Err(why) => {
            return fail(EXIT_CONFIG, anyhow::Error::new(ServerError::KernelTls(why)).context(format!("config {}", settings.origin)));
        }
    };
    match tls::ServerTls::load(tls) {
        Ok(loaded) => {
            println!("config OK: {} (client CA: {})", settings.origin, loaded.client_ca_subject);
            if let Some(line) = kernel_tls {
                println!("{line}");
            }
            for warning in certwatch::expiring(&loaded.validity, certwatch::unix_now(), tls.expiry_warning_days) {
                println!("warning: {warning} (tls.expiry_warning_days = {})", tls.expiry_warning_days);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_CONFIG, anyhow::Error::new(e).context(format!("config {}", settings.origin))),
    }
}

async fn run(settings: Settings, source: ConfigSource, overrides: Overrides) -> ExitCode {
    // Handlers go in before anything listens, so a SIGTERM that arrives the
    // moment the port opens is a graceful stop, not the default kill.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => return fail(1, anyhow::Error::new(e).context("cannot install signal handlers")),
    };
    let dev_hint = settings.tls.dev_auto_certs.then(|| dev_client_command(&settings));
    let (host, port, origin, admin) = (settings.host.clone(), settings.port, settings.origin.clone(), settings.admin);
    let server = match Server::new(settings) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, anyhow::Error::new(e).context(format!("config {origin}"))),
    };
    let listeners = match server::bind(&host, port).await {
        Ok(l) => l,
        Err(e) => return fail(1, anyhow::Error::new(e)),
    };
    let admin = match server::bind_admin(&admin).await {
        Ok(l) => l,
        Err(e) => return fail(1, anyhow::Error::new(e)),
    };
    let status = serving_status(&listeners, admin.as_ref());
    tokio::spawn(systemd::follow(server.phase(), status.clone()));
    let reload = server.reload_handle();
    // systemd's reload protocol: RELOADING=1 (with the monotonic time) then
    // READY=1 whether the reload took or not (the old config still serves).
    let on_reload = move || {
        systemd::notify_reloading();
        let reloaded =
            load_settings(&source, &overrides).map_err(anyhow::Error::new).and_then(|s| reload.reload(s).map_err(anyhow::Error::new));
        certwatch::count_reload(Trigger::Signal, reloaded.is_ok());
        match reloaded {
            Err(e) => tracing::error!(error = %format!("{e:#}"), "reload failed: keeping the previous configuration"),
            Ok(report) => {
                tracing::info!(tenants = report.tenants, client_ca = %report.client_ca_subject, "configuration reloaded");
                if !report.restart_needed.is_empty() {
                    tracing::warn!(keys = ?report.restart_needed, "changed keys take effect only after a restart");
                }
            }
        }
        systemd::notify_ready(&status);
    };
    let server = server.with_admin(admin);
    if let Some(hint) = dev_hint {
        let port = listeners.first().and_then(|l| l.local_addr().ok()).map_or(port, |a| a.port());
        tracing::info!("development mode: try\n  {}", hint.replace("{port}", &port.to_string()));
    }
    match server.serve(listeners, shutdown_signal(signals, on_reload)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, anyhow::Error::new(e)),
    }
}

/// The status line systemd shows once we are ready, e.g.
/// `serving gRPC (mTLS) on 127.0.0.1:50051; admin on 127.0.0.1:9090`.
fn serving_status(listeners: &[tokio::net::TcpListener], admin: Option<&tokio::net::TcpListener>) -> String {
    let addrs: Vec<String> = listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect();
    let admin = admin.and_then(|l| l.local_addr().ok()).map_or("off".to_string(), |a| a.to_string());
    format!("serving gRPC (mTLS) on {}; admin on {admin}", addrs.join(", "))
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())?, hup: signal(SignalKind::hangup())? })
    }
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
/// SIGHUP reloads the configuration.
async fn shutdown_signal(mut signals: Signals, on_reload: impl Fn()) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => { tracing::info!(signal = "SIGTERM", "shutdown requested"); break }
            _ = signals.int.recv() => { tracing::info!(signal = "SIGINT", "shutdown requested"); break }
            _ = signals.hup.recv() => {
                tracing::info!(signal = "SIGHUP", "reloading configuration");
                on_reload();
            }
        }
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = signals.term.recv() => {}
            _ = signals.int.recv() => {}
        }
        eprintln!("imgsvc-server: second signal during drain: exiting now");
        std::process::exit(1);
    });
}

fn dev_client_command(settings: &Settings) -> String {
    let dir = settings.tls.client_ca.parent().unwrap_or(std::path::Path::new("."));
    let paths = PkiPaths::new(dir);
    let tenant = server::dev_tenant();
    let host = match settings.host.as_str() {
        "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        h => h,
    };
    format!(
        "cargo run --release --bin imgsvc-client -- --host {host} --port {{port}} --ca {} --cert {} --key {} \
         --input tests/fixtures/astronaut.png --output /tmp/astronaut-out.png --rotate NINETY_DEG --mean",
        paths.ca_cert().display(),
        paths.client_cert(&tenant).display(),
        paths.client_key(&tenant).display(),
    )
}

fn fail(code: i32, err: anyhow::Error) -> ExitCode {
    // Tracing may not be installed yet: report on stderr directly, causes included.
    eprintln!("imgsvc-server: error: {err:#}");
    ExitCode::from(code as u8)
}
