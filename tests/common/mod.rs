//! Shared test harness: a per-test PKI made by the gen-certs library, an
//! in-process server on 127.0.0.1:0 stopped through a channel, and helpers
//! to drive it with the real client binary or a tonic client.
#![allow(dead_code)]

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
    server::{bind, bind_admin, Phase, Server, ServerError},
    service::{self, PixelBuffer, Step},
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
    raw
}

/// An in-process server on its own runtime, on its own thread, so tests
/// may drive it from sync code or from their own tokio runtime alike.
pub struct TestServer {
    pub addr: SocketAddr,
    reload_handle: imgsvc::server::ReloadHandle,
    tenancy: imgsvc::tenancy::Tenancy,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), unless the config disabled it.
    pub admin_addr: Option<SocketAddr>,
    pub phase: tokio::sync::watch::Receiver<Phase>,
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
        imgsvc::telemetry::init(&settings.log);
        let admin = settings.admin;
        let server = Server::new(settings).unwrap();
        let (reload_handle, tenancy) = (server.reload_handle(), server.tenancy().clone());
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
        Self { addr, admin_addr, phase, reload_handle, tenancy, stop: Some(stop), thread: Some(thread) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Applies an edited config to the running server, as SIGHUP does.
    pub fn reload(&self, pki: &Pki, edit: impl FnOnce(&mut RawConfig)) -> Result<imgsvc::server::ReloadReport, ServerError> {
        let mut raw = raw_config(pki);
        edit(&mut raw);
        self.reload_handle.reload(Settings::validate(raw, "test config (reloaded)".into()).unwrap())
    }

    pub fn tenancy(&self) -> &imgsvc::tenancy::Tenancy {
        &self.tenancy
    }

    /// Sends the shutdown signal and waits for `serve` to return.
    pub fn stop(mut self) -> Result<(), ServerError> {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
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

/// `--host --port --ca --cert --key --server-name` for the client binary.
pub fn client_args(server: &TestServer, pki: &Pki, tenant: &str) -> Vec<String> {
    let (ca, cert, key) = pki.client_files(tenant);
    vec![
        "--host".into(), "127.0.0.1".into(),
        "--port".into(), server.port().to_string(),
        "--ca".into(), ca.display().to_string(),
        "--cert".into(), cert.display().to_string(),
        "--key".into(), key.display().to_string(),
        "--server-name".into(), "localhost".into(),
    ]
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
    let p = pki.paths();
    let path = dir.join("imgsvc.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\nworker_threads = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n[log]\nlevel = \"info\"\n{extra}\n{}",
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

/// The real server binary in its own process, for tests that kill it or
/// put something (haproxy) in front of it. Killed on drop.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    pub fn spawn(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_server_config(dir.path(), pki, "");
        let mut child = Command::new(env!("CARGO_BIN_EXE_imgsvc-server"))
            .args(["--config", cfg.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
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
        Self { child, addr: addr.unwrap(), admin_addr: admin_addr.unwrap(), _dir: dir }
    }

    /// SIGKILL: no drain, connections cut mid-request.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tonic-free target for a server process (certificates name localhost).
pub fn target_of(addr: SocketAddr) -> Target {
    Target { host: addr.ip().to_string(), port: addr.port(), ..target(0) }
}
