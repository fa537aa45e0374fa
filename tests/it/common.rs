//! Shared test harness: a per-test PKI made by the gen-certs library, an
//! in-process server on 127.0.0.1:0 stopped through a channel, and helpers
//! to drive it with the real client binary or a tonic client.

use bytes::Bytes;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use imgsvc::{
    client::{self, RawImage, Target},
    config::{RawConfig, Settings},
    identity::{TenantId, TrustDomain},
    imaging::QuarterTurns,
    pki::{self, IssueRequest, PkiPaths},
    service::{self, PixelBuffer, Step},
    serving::{
        Phase,
        server::{Server, ServerError, bind, bind_admin},
    },
    tls::ClientCredentials,
};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use tonic::transport::Channel;

pub const TRUST_DOMAIN: &str = "test.imgsvc";

/// A CA with a server certificate and client certificates, in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub trust_domain: TrustDomain,
    /// Tenants issued certificates; [`raw_config`] configures each one.
    pub tenants: Vec<String>,
}

impl Pki {
    pub fn new(tenants: &[&str]) -> Self {
        Self::with_trust_domain(TRUST_DOMAIN, tenants)
    }

    pub fn with_trust_domain(trust_domain: &str, tenants: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let trust_domain = TrustDomain::parse(trust_domain).unwrap();
        let mut req = IssueRequest::new(dir.path(), trust_domain.clone());
        req.tenants = tenants.iter().map(|t| TenantId::parse(t).unwrap()).collect();
        pki::issue(&req).unwrap();
        Self { dir, trust_domain, tenants: tenants.iter().map(|t| t.to_string()).collect() }
    }

    pub fn paths(&self) -> PkiPaths {
        PkiPaths::new(self.dir.path())
    }

    pub fn client_files(&self, tenant: &str) -> (PathBuf, PathBuf, PathBuf) {
        let t = TenantId::parse(tenant).unwrap();
        let p = self.paths();
        (p.ca_cert(), p.client_cert(&t), p.client_key(&t))
    }

    pub fn credentials(&self, tenant: &str) -> ClientCredentials {
        let (ca, cert, key) = self.client_files(tenant);
        ClientCredentials::from_files(&ca, &cert, &key).unwrap()
    }

    /// Signs a client certificate with arbitrary SANs and usage with this
    /// CA, writes it into the PKI dir as `<name>.pem`/`<name>-key.pem`.
    pub fn sign_custom(&self, name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let p = self.paths();
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(p.ca_key()).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(p.ca_cert()).unwrap(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (cert_path, key_path) = (self.dir.path().join(format!("{name}.pem")), self.dir.path().join(format!("{name}-key.pem")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

pub fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

/// A raw config pointing at `pki`'s server files, loopback, port 0.
pub fn raw_config(pki: &Pki) -> RawConfig {
    let p = pki.paths();
    let mut raw = RawConfig::default();
    raw.server.host = "127.0.0.1".into();
    raw.server.port = 0;
    raw.server.worker_threads = 2;
    raw.server.drain_timeout_secs = 10;
    raw.tls.cert = p.server_cert();
    raw.tls.key = p.server_key();
    raw.tls.client_ca = p.ca_cert();
    raw.tls.trust_domain = pki.trust_domain.to_string();
    raw.log.level = "warn".into();
    for tenant in &pki.tenants {
        raw.tenants.insert(tenant.clone(), Default::default());
    }
    raw.admin.listen = "127.0.0.1:0".into();
    // The whole suite can run with kernel TLS (tests/vm/run.sh, on a kernel
    // that has it): the variable the daemon's own config layer reads, set
    // by whoever runs the tests, never by a test.
    if let Ok(mode) = std::env::var("IMGSVC_TLS__KERNEL_TLS") {
        raw.tls.kernel_tls = mode;
    }
    raw
}

/// An in-process server on its own runtime, on its own thread, so tests
/// may drive it from sync code or from their own tokio runtime alike.
pub struct TestServer {
    pub addr: SocketAddr,
    reload_handle: imgsvc::serving::server::ReloadHandle,
    tenancy: imgsvc::tenancy::Tenancy,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), unless the config disabled it.
    pub admin_addr: Option<SocketAddr>,
    pub phase: tokio::sync::watch::Receiver<Phase>,
    /// The connections the server serves now (each can be closed gracefully).
    pub connections: imgsvc::serving::connection::OpenConnections,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub fn start(pki: &Pki) -> Self {
        Self::start_with(pki, |_| {})
    }

    pub fn start_with(pki: &Pki, edit: impl FnOnce(&mut RawConfig)) -> Self {
        let mut raw = raw_config(pki);
        edit(&mut raw);
        let settings = Settings::validate(raw, "test config".into()).unwrap();
        // Logs only: span export is tested through the binary (tests/it/otlp_export.rs).
        let _ = imgsvc::telemetry::init(&settings.log, None);
        let admin = settings.admin;
        let server = Server::new(settings).unwrap();
        let (reload_handle, tenancy, connections) = (server.reload_handle(), server.tenancy().clone(), server.connections());
        let phase = server.phase();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async move {
                let listeners = bind("127.0.0.1", 0).await.unwrap();
                let admin = bind_admin(&admin).await.unwrap();
                let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
                let addrs = (listeners[0].local_addr().unwrap(), admin_addr);
                // Hand the addresses over once the server serves, so /readyz
                // and the phase already say so when start() returns.
                let mut serving = server.phase();
                tokio::spawn(async move {
                    if serving.wait_for(|p| *p == Phase::Serving).await.is_ok() {
                        let _ = addr_tx.send(addrs);
                    }
                });
                server
                    .with_admin(admin)
                    .serve(listeners, async move {
                        let _ = stopped.await;
                    })
                    .await
            })
        });
        let (addr, admin_addr) = addr_rx.recv_timeout(Duration::from_secs(30)).expect("test server did not start");
        Self { addr, admin_addr, phase, reload_handle, tenancy, connections, stop: Some(stop), thread: Some(thread) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Applies an edited config to the running server, as SIGHUP does.
    pub fn reload(&self, pki: &Pki, edit: impl FnOnce(&mut RawConfig)) -> Result<imgsvc::serving::server::ReloadReport, ServerError> {
        let mut raw = raw_config(pki);
        edit(&mut raw);
        self.reload_handle.reload(Settings::validate(raw, "test config (reloaded)".into()).unwrap())
    }

    pub fn tenancy(&self) -> &imgsvc::tenancy::Tenancy {
        &self.tenancy
    }

    /// The shutdown sender, for tests that stop the server mid-flight.
    pub fn take_stop(&mut self) -> tokio::sync::oneshot::Sender<()> {
        self.stop.take().unwrap()
    }

    /// Waits for `serve` to return (after the shutdown signal was sent).
    pub fn join(mut self) -> Result<(), ServerError> {
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `test` to completion on a new multi-threaded runtime with two
/// workers, as `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`
/// does: for async tests inside `rusty_fork_test!`, which takes plain
/// `#[test]` functions.
pub fn block_on<F: std::future::Future>(test: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(test)
}

/// Polls (every ms, at most 30 s) until `tenant`'s running and queued
/// requests satisfy `wanted`; panics naming `what` otherwise.
pub async fn until_load(server: &TestServer, tenant: &str, what: &str, wanted: impl Fn(imgsvc::tenancy::TenantLoad) -> bool) {
    let tenant = TenantId::parse(tenant).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !wanted(server.tenancy().load(&tenant)) {
        assert!(std::time::Instant::now() < deadline, "{tenant} never had {what}: {:?}", server.tenancy().load(&tenant));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A plain HTTP/1.1 GET over loopback (the admin listener): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, body.to_string())
}

/// `/metrics` of the admin listener at `admin`.
pub fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls `/metrics` at `admin` (every 20 ms, at most `within`) until
/// `name{labels}` is `want`; returns the last value seen (`None`: absent).
/// For counts the server records on its own tasks, after the client saw
/// the outcome.
pub async fn until_metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64, within: Duration) -> Option<f64> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let seen = metric(&scrape(admin), name, labels);
        if seen == Some(want) || std::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one Prometheus sample, e.g.
/// `metric(&text, "imgsvc_requests_total", &[("tenant", "a"), ("code", "OK")])`:
/// the sample of that name whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, "}"));
        let matches = series_name == name
            && labels.iter().all(|(k, v)| series_labels.split(',').any(|kv| kv.trim_end_matches('}') == format!("{k}=\"{v}\"")));
        if matches { value.parse().ok() } else { None }
    })
}

pub fn target(port: u16) -> Target {
    Target {
        host: "127.0.0.1".into(),
        port,
        server_name: Some("localhost".into()),
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(60),
    }
}

/// A connected mutual-TLS channel for `tenant`.
pub async fn channel(server: &TestServer, pki: &Pki, tenant: &str) -> Channel {
    client::connect(&target(server.port()), &pki.credentials(tenant)).await.unwrap()
}

/// A loopback port that refuses connections for as long as the returned
/// socket lives: bound, never listening, so no other test can take it
/// (a port found free and released at once can be taken by another test's
/// server before the client connects).
pub fn refusing_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Runs the real client binary, isolated from the user's config and env.
pub fn run_client(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_imgsvc-client"))
        .args(args)
        .env_remove("IMGSVC_CA")
        .env_remove("IMGSVC_CERT")
        .env_remove("IMGSVC_KEY")
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .unwrap()
}

/// `--ca --cert --key` of `tenant` for the client binary.
pub fn credential_args(pki: &Pki, tenant: &str) -> Vec<String> {
    let (ca, cert, key) = pki.client_files(tenant);
    ["--ca", ca.to_str().unwrap(), "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()].map(String::from).to_vec()
}

/// Runs the client binary with `tenant`'s credentials and `args`.
pub fn run_client_as(pki: &Pki, tenant: &str, args: &[&str]) -> Output {
    let mut all = credential_args(pki, tenant);
    all.extend(args.iter().map(|a| a.to_string()));
    run_client(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `--host --port --ca --cert --key --server-name` for the client binary.
pub fn client_args(server: &TestServer, pki: &Pki, tenant: &str) -> Vec<String> {
    let mut args = vec!["--host".into(), "127.0.0.1".into(), "--port".into(), server.port().to_string()];
    args.extend(credential_args(pki, tenant));
    args.extend(["--server-name".into(), "localhost".into()]);
    args
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What the service must return for `ops` applied to `image`, computed
/// with the plain reference kernels (every v1 pixel format).
pub fn expected(image: &RawImage, ops: &[client::Op]) -> RawImage {
    let input = PixelBuffer::from_v1(Some(image.clone().into_v1()), u64::MAX).expect("a valid test image");
    let steps: Vec<Step> = ops
        .iter()
        .map(|op| match *op {
            client::Op::MeanFilter => Step::MeanFilter,
            client::Op::Rotate(turns) => Step::Rotate(turns),
        })
        .collect();
    RawImage::from_v1(service::run_reference(&steps, input).into_v1())
}

/// Runs the client binary against `server` as `tenant` with `extra` args.
pub fn run_client_with(server: &TestServer, pki: &Pki, tenant: &str, extra: &[&str]) -> Output {
    let mut args = client_args(server, pki, tenant);
    args.extend(extra.iter().map(|s| s.to_string()));
    run_client(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Every file under `dir`, relative, sorted (temporary files included).
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

pub fn all_turns() -> [(QuarterTurns, &'static str); 4] {
    [
        (QuarterTurns::Zero, "NONE"),
        (QuarterTurns::One, "NINETY_DEG"),
        (QuarterTurns::Two, "ONE_EIGHTY_DEG"),
        (QuarterTurns::Three, "TWO_SEVENTY_DEG"),
    ]
}

/// A server config file for `pki`: loopback, gRPC and admin on port 0,
/// plus `extra` TOML lines appended (other sections).
pub fn write_server_config(dir: &Path, pki: &Pki, extra: &str) -> PathBuf {
    write_server_config_with_tls(dir, pki, "", extra)
}

/// [`write_server_config`] with `tls_extra` TOML lines in its `[tls]`
/// section (e.g. `crl_files`), which `extra` cannot reopen.
pub fn write_server_config_with_tls(dir: &Path, pki: &Pki, tls_extra: &str, extra: &str) -> PathBuf {
    let p = pki.paths();
    let path = dir.join("imgsvc.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\nworker_threads = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n{tls_extra}\n[log]\nlevel = \"info\"\n{extra}\n{}",
            p.server_cert().display(),
            p.server_key().display(),
            p.ca_cert().display(),
            // Every tenant of the test PKI is configured, as raw_config does.
            pki.tenants.iter().map(|t| format!("[tenants.{t}]\n")).collect::<String>()
        ),
    )
    .unwrap();
    path
}

/// Reads `stderr` line by line on a thread, for the life of the process
/// (so it never blocks on a full pipe), until the receiver is dropped.
pub fn forward_lines(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Sends a whole ProcessStream request that the server must refuse, and
/// returns the refusal (whether it comes before or after the response
/// headers).
pub async fn refused_stream(
    client: &mut imgsvc::proto::v1::image_service_client::ImageServiceClient<Channel>,
    messages: Vec<imgsvc::proto::v1::ProcessStreamRequest>,
) -> tonic::Status {
    match client.process_stream(tokio_stream::iter(messages)).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.expect_err("the server must refuse"),
    }
}

/// Connects with TLS but without a client certificate; returns the error
/// of the first read (TLS 1.3: the server's refusal arrives as an alert then).
pub async fn read_error_without_client_certificate(server: SocketAddr, pki: &Pki) -> std::io::Error {
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(imgsvc::tls::read_certs("ca", &pki.paths().ca_cert()).unwrap().remove(0)).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(imgsvc::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.read(&mut [0u8; 64]).await.unwrap_err()
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so
/// that a test failing half-way (a panic unwinds through it) never leaves a
/// daemon running. Derefs to the [`std::process::Child`].
pub struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    pub fn spawn(command: &mut Command) -> Self {
        Self(command.spawn().unwrap_or_else(|e| panic!("cannot start {command:?}: {e}")))
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Fails harmlessly when the process has already been reaped.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` ("TERM", "HUP", "INT"…) to the process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// Completes a mutual-TLS handshake with the server at `addr` as `tenant`
/// (ALPN h2) and nothing more: for clients that speak HTTP/2 themselves.
pub async fn tls_connect(addr: SocketAddr, pki: &Pki, tenant: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = pki.credentials(tenant).rustls_config().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap()
}

/// The real server binary in its own process, for tests that signal or
/// kill it, measure its memory, or put something (haproxy) in front of it.
/// Killed on drop.
pub struct ServerProcess {
    pub child: KillOnDrop,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The server's log (stderr), line by line, from after the start line.
    pub logs: std::sync::mpsc::Receiver<String>,
    /// The config file the server runs on (a SIGHUP re-reads it).
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    pub fn spawn(pki: &Pki) -> Self {
        Self::spawn_full(pki, "", "", &[])
    }

    /// With `extra` TOML appended to the config (other sections than
    /// `[server]`, see [`write_server_config`]) and `env` set, e.g.
    /// `("IMGSVC_SERVER__WORKER_THREADS", "1")`.
    pub fn spawn_with(pki: &Pki, extra: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_full(pki, "", extra, env)
    }

    /// [`ServerProcess::spawn`] with config lines added (see
    /// [`write_server_config_with_tls`]), handing back the server's log
    /// lines from after its startup lines.
    pub fn spawn_logged(pki: &Pki, tls_extra: &str, extra: &str) -> (Self, std::sync::mpsc::Receiver<String>) {
        let mut server = Self::spawn_full(pki, tls_extra, extra, &[]);
        let logs = std::mem::replace(&mut server.logs, std::sync::mpsc::channel().1);
        (server, logs)
    }

    fn spawn_full(pki: &Pki, tls_extra: &str, extra: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = write_server_config_with_tls(dir.path(), pki, tls_extra, extra);
        let mut child = KillOnDrop::spawn(
            Command::new(env!("CARGO_BIN_EXE_imgsvc-server"))
                .args(["--config", config.to_str().unwrap()])
                .env_remove("RUST_LOG")
                .env_remove("NOTIFY_SOCKET")
                .env("NO_COLOR", "1")
                .envs(env.iter().copied())
                .stderr(std::process::Stdio::piped()),
        );
        let rx = forward_lines(child.stderr.take().unwrap());
        let after = |line: &str, marker: &str| -> Option<SocketAddr> {
            let rest = line.split(marker).nth(1)?;
            rest.split([' ', ')', '"']).next()?.parse().ok()
        };
        let (mut addr, mut admin_addr) = (None, None);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while addr.is_none() || admin_addr.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("server process reports its addresses within 60 s");
            addr = addr.or_else(|| after(&line, "listening on "));
            admin_addr = admin_addr.or_else(|| after(&line, "admin on http://"));
        }
        Self { child, addr: addr.unwrap(), admin_addr: admin_addr.unwrap(), logs: rx, config, _dir: dir }
    }

    /// SIGTERM, then waits (at most 60 s) for the graceful exit.
    #[allow(dead_code, reason = "only otlp_export (with the otlp feature) stops a server process this way")]
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        send_signal(self.pid(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "server did not exit within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, connections cut mid-request.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `within`) for a log line containing one of `needles`;
    /// returns it.
    pub fn wait_for_log(&self, needles: &[&str], within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) if needles.iter().any(|n| line.contains(n)) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with any of {needles:?} within {within:?} ({e})"),
            }
        }
    }

    /// The server's memory and resource use now.
    pub fn usage(&self) -> ProcessUsage {
        ProcessUsage::of(self.pid())
    }
}

/// A process's memory, file descriptors and threads, from /proc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessUsage {
    /// Resident memory now (VmRSS), bytes.
    pub rss: u64,
    /// Peak resident memory so far (VmHWM), bytes.
    pub peak_rss: u64,
    pub fds: usize,
    pub threads: usize,
}

impl ProcessUsage {
    pub fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib = |key: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
            line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
        };
        let count = |dir: &str| std::fs::read_dir(format!("/proc/{pid}/{dir}")).unwrap().count();
        Self { rss: kib("VmRSS:"), peak_rss: kib("VmHWM:"), fds: count("fd"), threads: count("task") }
    }
}

pub const MIB: u64 = 1 << 20;

/// A `log.level` for a [`ServerProcess`] under load: no line per request,
/// but the start line it waits for.
pub const QUIET_LOG: &str = "warn,imgsvc::serving::server=info";

/// A tonic-free target for a server process (certificates name localhost).
pub fn target_of(addr: SocketAddr) -> Target {
    Target { host: addr.ip().to_string(), port: addr.port(), ..target(0) }
}

/// Whether `cmd args` runs and exits 0 (output discarded).
pub fn command_succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Whether `apt-get` is there to install what a test needs.
pub fn apt_get_available() -> bool {
    command_succeeds("apt-get", &["--version"])
}

/// Installs Debian `package` with apt-get (CI runs as root), running
/// `apt-get update` first when a fresh machine has no package lists yet.
/// Panics, saying so, when that fails.
pub fn apt_get_install(package: &str) {
    let install = || {
        Command::new("apt-get")
            // Another apt run on the machine: wait for its lock instead of failing.
            .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        assert!(command_succeeds("apt-get", &["-o", "DPkg::Lock::Timeout=300", "update", "-q"]), "apt-get update failed");
        assert!(install(), "apt-get install {package} failed");
    }
}

/// An HTTP/2 connection to `server` as `tenant`, driven on its own task.
pub async fn h2_connect(server: &ServerProcess, pki: &Pki, tenant: &str) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tls = tls_connect(server.addr, pki, tenant).await;
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    (
        send,
        tokio::spawn(async move {
            let _ = connection.await;
        }),
    )
}

/// Starts a gRPC call to `path`: its request headers are sent.
pub async fn start_call(send: &mut h2::client::SendRequest<Bytes>, path: &str) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    send.clone().ready().await.unwrap().send_request(request, false).unwrap()
}

/// A gRPC length-prefixed message.
pub fn grpc_message(message: &impl prost::Message) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.encoded_len());
    out.push(0);
    out.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
    message.encode(&mut out).unwrap();
    out.into()
}

/// Sends `data` as the server's flow control allows: when this returns,
/// the server has taken in all but at most one window of it.
pub async fn send_flow_controlled(stream: &mut h2::SendStream<Bytes>, mut data: Bytes) {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await.expect("capacity").expect("stream open");
        stream.send_data(data.split_to(granted.min(data.len())), false).unwrap();
    }
}

/// A v1 Process request that keeps one worker busy for a while:
/// `operations` mean filters over a 1000x1000 RGB image of `fill` (constant,
/// so the result is too). The server needs `limits.max_operations` at least
/// `operations`.
pub fn slow_v1_request(fill: u8, operations: usize) -> imgsvc::proto::v1::ProcessRequest {
    use imgsvc::proto::v1;
    v1::ProcessRequest {
        image: Some(v1::Image {
            format: v1::PixelFormat::Rgb8 as i32,
            width: 1000,
            height: 1000,
            data: bytes::Bytes::from(vec![fill; 3_000_000]),
            encoded: None,
        }),
        operations: vec![v1::Operation { kind: Some(v1::operation::Kind::MeanFilter(v1::MeanFilter {})) }; operations],
        output: None,
    }
}
