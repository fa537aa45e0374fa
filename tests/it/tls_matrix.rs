//! Client certificates made by outside tooling — the `openssl` CLI, not
//! gen-certs or rcgen — presented to the real server binary: each bad one is
//! refused, with the reason in the server's log and, where TLS carries it,
//! the right alert at the client; a good one (an openssl CSR signed by
//! `openssl ca` with our CA's key) is served as its tenant. The revocation
//! list comes from `openssl ca -gencrl`.
//!
//! tests/it/mtls.rs covers the same refusals with rcgen-made certificates
//! (plus the server side and protocol versions); here the point is that
//! certificates encoded by another implementation meet the same checks.
//!
//! openssl is installed with apt-get when missing (Debian ships it).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, OnceLock, mpsc::Receiver},
    time::{Duration, Instant},
};

use crate::common::*;
use imgsvc::{
    client::{self, ClientError},
    proto::v1::{Image, PixelFormat, ProcessRequest, image_service_client::ImageServiceClient},
    tls::ClientCredentials,
};
use time::OffsetDateTime;
use tonic::Code;

const TENANT: &str = "alpha";

/// Extension lines of a good tenant certificate, as gen-certs makes them.
fn tenant_extensions(uri: &str) -> String {
    format!(
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\nsubjectAltName = URI:{uri}\n"
    )
}

fn alpha_uri() -> String {
    format!("spiffe://{TRUST_DOMAIN}/tenant/{TENANT}")
}

/// Runs the openssl CLI in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    static AVAILABLE: OnceLock<()> = OnceLock::new();
    AVAILABLE.get_or_init(|| {
        if !command_succeeds("openssl", &["version"]) {
            assert!(apt_get_available(), "the openssl CLI is not installed, and apt-get is not available to install it");
            apt_get_install("openssl");
        }
    });
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `YYYYMMDDHHMMSSZ`, as `openssl ca -startdate/-enddate` take it.
fn openssl_time(t: OffsetDateTime) -> String {
    format!("{:04}{:02}{:02}{:02}{:02}{:02}Z", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second())
}

fn days_from_now(days: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::days(days)
}

/// An `openssl ca` over a CA certificate and key, with its own database,
/// serial and CRL number in a temp dir; issues P-256 leaves from openssl CSRs.
struct OpensslCa {
    dir: tempfile::TempDir,
}

impl OpensslCa {
    /// `openssl ca` with the test PKI's CA (made by gen-certs: the CA the server trusts).
    fn of(pki: &Pki) -> Self {
        let p = pki.paths();
        Self::with(&p.ca_cert(), &p.ca_key())
    }

    /// A CA of its own, made by `openssl req -x509`, named `subject`.
    fn new_root(subject: &str) -> Self {
        let ca = Self::with(Path::new("root.pem"), Path::new("root-key.pem"));
        new_key(ca.dir.path(), "root-key.pem");
        self_signed(ca.dir.path(), "ca.cnf", "root", "root-key.pem", subject, "root.pem");
        ca
    }

    /// An impostor of `pki`'s CA: its certificate re-signed by openssl with
    /// a new key, so same name, same extensions (key identifiers included),
    /// another key.
    fn impostor_of(pki: &Pki) -> Self {
        let ca = Self::with(Path::new("root.pem"), Path::new("root-key.pem"));
        new_key(ca.dir.path(), "root-key.pem");
        let real = pki.paths().ca_cert();
        openssl(ca.dir.path(), &["x509", "-in", real.to_str().unwrap(), "-signkey", "root-key.pem", "-days", "30", "-out", "root.pem"]);
        ca
    }

    /// `openssl ca` over these CA files (relative paths: in the CA's directory).
    fn with(ca_cert: &Path, ca_key: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("issued")).unwrap();
        std::fs::write(dir.path().join("index.txt"), "").unwrap();
        std::fs::write(dir.path().join("serial"), "1000\n").unwrap();
        std::fs::write(dir.path().join("crlnumber"), "01\n").unwrap();
        std::fs::write(dir.path().join("ca.cnf"), ca_config(dir.path(), ca_cert, ca_key)).unwrap();
        Self { dir }
    }

    /// A new key `<name>-key.pem`, a CSR for it, and `<name>.pem` signed by
    /// this CA with `extensions` (openssl config lines), valid over
    /// `validity` (from, until), else for 30 days from now.
    fn issue(&self, name: &str, extensions: &str, validity: Option<(OffsetDateTime, OffsetDateTime)>) -> (PathBuf, PathBuf) {
        let dir = self.dir.path();
        let (cert, key, csr, ext) = (format!("{name}.pem"), format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}.ext"));
        new_key(dir, &key);
        openssl(dir, &["req", "-new", "-config", "ca.cnf", "-key", &key, "-subj", &format!("/CN={name}"), "-out", &csr]);
        std::fs::write(dir.join(&ext), format!("[leaf]\n{extensions}")).unwrap();
        let mut args: Vec<String> =
            ["ca", "-batch", "-notext", "-config", "ca.cnf", "-extfile", &ext, "-extensions", "leaf", "-in", &csr, "-out", &cert]
                .map(String::from)
                .into();
        match validity {
            Some((from, to)) => args.extend(["-startdate".into(), openssl_time(from), "-enddate".into(), openssl_time(to)]),
            None => args.extend(["-days".into(), "30".into()]),
        }
        openssl(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
        (dir.join(cert), dir.join(key))
    }

    /// Revokes `cert` in this CA's database and writes the CRL; returns its path.
    fn revoke(&self, cert: &Path) -> PathBuf {
        openssl(self.dir.path(), &["ca", "-config", "ca.cnf", "-revoke", cert.to_str().unwrap(), "-crl_reason", "keyCompromise"]);
        openssl(self.dir.path(), &["ca", "-config", "ca.cnf", "-gencrl", "-crldays", "30", "-out", "crl.pem"]);
        self.dir.path().join("crl.pem")
    }
}

/// What `openssl req` needs from a config when `-subj` gives the name.
const REQ_CONFIG: &str = "[req]\ndistinguished_name = req_dn\nprompt = no\n[req_dn]\nCN = unused\n";

fn ca_config(dir: &Path, ca_cert: &Path, ca_key: &Path) -> String {
    let d = dir.display();
    format!(
        "{REQ_CONFIG}[ca]\ndefault_ca = test_ca\n[test_ca]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}/issued\nserial = {d}/serial\ncrlnumber = {d}/crlnumber\ncertificate = {}\nprivate_key = {}\ndefault_md = sha256\npolicy = any_name\nunique_subject = no\ncopy_extensions = none\n[any_name]\ncommonName = supplied\n[root]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n",
        ca_cert.display(),
        ca_key.display()
    )
}

/// `openssl req -x509` in `dir`: a self-signed certificate `out` for `key`
/// named `subject`, with the extensions of `section` in `config`.
fn self_signed(dir: &Path, config: &str, section: &str, key: &str, subject: &str, out: &str) {
    openssl(dir, &["req", "-x509", "-config", config, "-extensions", section, "-key", key, "-subj", subject, "-days", "30", "-out", out]);
}

/// A new ECDSA P-256 key (PKCS#8 PEM) in `dir`.
fn new_key(dir: &Path, name: &str) {
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name]);
}

fn tiny_request() -> ProcessRequest {
    ProcessRequest {
        image: Some(Image { format: PixelFormat::Gray8 as i32, width: 1, height: 1, data: vec![9u8].into(), encoded: None }),
        operations: vec![],
        output: None,
    }
}

fn credentials(pki: &Pki, cert: &Path, key: &Path) -> ClientCredentials {
    ClientCredentials::from_files(&pki.paths().ca_cert(), cert, key).unwrap()
}

/// How a refused handshake shows on both sides.
struct HandshakeRefusal {
    /// How our client library explains it (the start of it).
    explanation: &'static str,
    /// The TLS alert the client received.
    alert: &'static str,
    /// rustls' verdict in the server log (the start of it).
    problem: &'static str,
    /// The reason label in the log and the handshake-failure metric.
    reason: &'static str,
}

const NOT_TRUSTED: &str = "the server refused the client certificate: it is not signed by a CA the server trusts";
const EXPIRED_OR_NOT_YET_VALID: &str = "the server refused the client certificate: it has expired or is not yet valid";

/// Presents `cert` and `key` with our client library to a server of `pki`
/// (`tls_extra`: lines for its [tls] config): refused at the handshake as
/// `want` says, and the server goes on serving. Returns the server.
async fn assert_refused_at_handshake(pki: &Pki, tls_extra: &str, cert: &Path, key: &Path, want: HandshakeRefusal) -> ServerProcess {
    let (server, logs) = ServerProcess::spawn_logged(pki, tls_extra, "");
    let explanation = match client::connect(&target_of(server.addr), &credentials(pki, cert, key)).await {
        Err(ClientError::Connect { explanation, .. }) => explanation,
        Err(other) => panic!("expected a refused connection, got {other}"),
        Ok(_) => panic!("the server accepted the certificate"),
    };
    assert!(explanation.starts_with(want.explanation), "{explanation}");
    assert!(explanation.contains(&format!("received fatal alert: {}", want.alert)), "{explanation}");
    assert_handshake_refusal_logged(&logs, want.problem, want.reason);
    assert_still_serving(&server, pki).await;
    server
}

/// Presents `cert` and `key` to a server of `pki`: the handshake succeeds,
/// the call is UNAUTHENTICATED with `message`, the server logs the refusal
/// (returned) and goes on serving.
async fn assert_unauthenticated(pki: &Pki, cert: &Path, key: &Path, message: &str) -> String {
    let (server, logs) = ServerProcess::spawn_logged(pki, "", "");
    let channel = client::connect(&target_of(server.addr), &credentials(pki, cert, key)).await.expect("the TLS handshake succeeds");
    let status = ImageServiceClient::new(channel).process(tiny_request()).await.expect_err("the call is refused");
    assert_eq!((status.code(), status.message()), (Code::Unauthenticated, message));
    let line = log_line(&logs, "refused request: no tenant");
    assert_still_serving(&server, pki).await;
    line
}

/// The first server log line containing `needle`, waited for (bounded).
fn log_line(logs: &Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while let Ok(line) = logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains(needle) {
            return line;
        }
        seen.push(line);
    }
    panic!("no server log line with {needle:?} within 10 s; saw {seen:#?}");
}

/// The server logged a refused handshake: rustls' verdict on the
/// certificate (`invalid peer certificate: <problem>…`) and the reason
/// label its metric counts.
fn assert_handshake_refusal_logged(logs: &Receiver<String>, problem: &str, reason: &str) {
    let line = log_line(logs, "TLS handshake refused");
    let error = line.split_once(" error=").map_or("", |(_, rest)| rest);
    assert!(error.starts_with(&format!("invalid peer certificate: {problem}")), "{problem:?}: {line}");
    assert!(line.ends_with(&format!(" reason=\"{reason}\"")), "{reason:?}: {line}");
}

async fn assert_still_serving(server: &ServerProcess, pki: &Pki) {
    let channel = client::connect(&target_of(server.addr), &pki.credentials(TENANT)).await.unwrap();
    ImageServiceClient::new(channel).process(tiny_request()).await.expect("a valid client is still served");
}

#[tokio::test(flavor = "multi_thread")]
async fn good_openssl_certificate_signed_with_our_ca_key_is_served_as_its_tenant() {
    let mut pki = Pki::new(&[TENANT]);
    // A tenant that only has the openssl-made certificate.
    pki.tenants.push("made-by-openssl".into());
    let ca = OpensslCa::of(&pki);
    let (cert, key) = ca.issue("made-by-openssl", &tenant_extensions(&format!("spiffe://{TRUST_DOMAIN}/tenant/made-by-openssl")), None);
    let server = ServerProcess::spawn(&pki);
    let channel = client::connect(&target_of(server.addr), &credentials(&pki, &cert, &key)).await.unwrap();
    let image = ImageServiceClient::new(channel).process(tiny_request()).await.unwrap().into_inner().image.unwrap();
    assert_eq!((image.width, image.height, &image.data[..]), (1, 1, &[9u8][..]));

    let admin = server.admin_addr;
    let (status, metrics) = tokio::task::spawn_blocking(move || http_get(admin, "/metrics")).await.unwrap();
    assert_eq!(status, 200);
    let labels = [("tenant", "made-by-openssl"), ("method", "imgsvc.v1.ImageService/Process"), ("code", "OK")];
    assert_eq!(metric(&metrics, "imgsvc_requests_total", &labels), Some(1.0), "served as tenant made-by-openssl");
    assert_eq!(metric(&metrics, "imgsvc_requests_total", &[("tenant", TENANT)]), None, "and not as any other tenant");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_certificate_is_refused_with_certificate_expired() {
    let pki = Pki::new(&[TENANT]);
    let ca = OpensslCa::of(&pki);
    let (cert, key) = ca.issue("expired", &tenant_extensions(&alpha_uri()), Some((days_from_now(-60), days_from_now(-30))));
    let want = HandshakeRefusal {
        explanation: EXPIRED_OR_NOT_YET_VALID,
        alert: "CertificateExpired",
        problem: "certificate expired",
        reason: "certificate_expired",
    };
    assert_refused_at_handshake(&pki, "", &cert, &key, want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn not_yet_valid_certificate_is_refused_with_certificate_expired() {
    let pki = Pki::new(&[TENANT]);
    let ca = OpensslCa::of(&pki);
    let (cert, key) = ca.issue("future", &tenant_extensions(&alpha_uri()), Some((days_from_now(30), days_from_now(60))));
    let want = HandshakeRefusal {
        explanation: EXPIRED_OR_NOT_YET_VALID,
        alert: "CertificateExpired",
        problem: "certificate not valid yet",
        reason: "certificate_expired",
    };
    assert_refused_at_handshake(&pki, "", &cert, &key, want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_signed_by_another_ca_is_refused_with_unknown_ca() {
    let pki = Pki::new(&[TENANT]);
    let ca = OpensslCa::new_root("/CN=some other CA");
    let (cert, key) = ca.issue("other-ca", &tenant_extensions(&alpha_uri()), None);
    let want = HandshakeRefusal { explanation: NOT_TRUSTED, alert: "UnknownCA", problem: "UnknownIssuer", reason: "unknown_ca" };
    assert_refused_at_handshake(&pki, "", &cert, &key, want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_signed_by_an_impostor_ca_with_our_ca_name_is_refused_on_the_signature() {
    let pki = Pki::new(&[TENANT]);
    // Found by name, fails on the signature.
    let ca = OpensslCa::impostor_of(&pki);
    let (cert, key) = ca.issue("impostor", &tenant_extensions(&alpha_uri()), None);
    let want = HandshakeRefusal { explanation: NOT_TRUSTED, alert: "DecryptError", problem: "BadSignature", reason: "unknown_ca" };
    assert_refused_at_handshake(&pki, "", &cert, &key, want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn self_signed_certificate_naming_a_tenant_is_refused_with_unknown_ca() {
    let pki = Pki::new(&[TENANT]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("self.cnf"), format!("{REQ_CONFIG}[leaf]\n{}", tenant_extensions(&alpha_uri()))).unwrap();
    new_key(dir.path(), "self-key.pem");
    self_signed(dir.path(), "self.cnf", "leaf", "self-key.pem", "/CN=alpha", "self.pem");
    let want = HandshakeRefusal { explanation: NOT_TRUSTED, alert: "UnknownCA", problem: "UnknownIssuer", reason: "unknown_ca" };
    assert_refused_at_handshake(&pki, "", &dir.path().join("self.pem"), &dir.path().join("self-key.pem"), want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_auth_only_certificate_is_refused_as_not_for_client_authentication() {
    let pki = Pki::new(&[TENANT]);
    let extensions = tenant_extensions(&alpha_uri()).replace("extendedKeyUsage = clientAuth", "extendedKeyUsage = serverAuth");
    let ca = OpensslCa::of(&pki);
    let (cert, key) = ca.issue("server-only", &extensions, None);
    let want = HandshakeRefusal {
        explanation: "the server refused the client certificate: it is not issued for client authentication",
        alert: "UnsupportedCertificate",
        problem: "certificate does not allow extended key usage for client authentication",
        reason: "bad_certificate",
    };
    assert_refused_at_handshake(&pki, "", &cert, &key, want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_certificate_is_refused_through_an_openssl_made_crl() {
    let pki = Pki::new(&[TENANT]);
    let ca = OpensslCa::of(&pki);
    let (revoked, revoked_key) = ca.issue("revoked", &tenant_extensions(&alpha_uri()), None);
    let (kept, kept_key) = ca.issue("kept", &tenant_extensions(&alpha_uri()), None);
    let crl = format!("crl_files = [\"{}\"]", ca.revoke(&revoked).display());
    let want = HandshakeRefusal {
        explanation: "the server refused the client certificate: it has been revoked",
        alert: "CertificateRevoked",
        problem: "Revoked",
        reason: "bad_certificate",
    };
    let server = assert_refused_at_handshake(&pki, &crl, &revoked, &revoked_key, want).await;
    // The CRL revokes that certificate only: another of the same CA and
    // tenant is still served (and gen-certs' own, checked above).
    let channel = client::connect(&target_of(server.addr), &credentials(&pki, &kept, &kept_key)).await.unwrap();
    ImageServiceClient::new(channel).process(tiny_request()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_without_subject_alternative_names_is_unauthenticated() {
    let pki = Pki::new(&[TENANT]);
    let extensions = tenant_extensions(&alpha_uri()).lines().filter(|l| !l.starts_with("subjectAltName")).collect::<Vec<_>>().join("\n");
    let ca = OpensslCa::of(&pki);
    let (cert, key) = ca.issue("no-san", &extensions, None);
    let message = format!("the client certificate has no URI SAN of the form spiffe://{TRUST_DOMAIN}/tenant/<name>");
    let logged = assert_unauthenticated(&pki, &cert, &key, &message).await;
    assert!(logged.contains(&message), "{logged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_uri_in_another_trust_domain_is_unauthenticated() {
    let pki = Pki::new(&[TENANT]);
    let ca = OpensslCa::of(&pki);
    let (cert, key) = ca.issue("foreign", &tenant_extensions("spiffe://elsewhere.example/tenant/alpha"), None);
    let message = format!(
        "the client certificate names tenant URI \"spiffe://elsewhere.example/tenant/alpha\", which is not in trust domain \"{TRUST_DOMAIN}\""
    );
    let logged = assert_unauthenticated(&pki, &cert, &key, &message).await;
    assert!(logged.contains("spiffe://elsewhere.example/tenant/alpha"), "{logged}");
}

/// Presents whatever certificate and key it is given, matching or not
/// (rustls' own config builders refuse a key that is not the certificate's).
#[derive(Debug)]
struct PresentAsIs(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for PresentAsIs {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_presented_with_another_private_key_is_refused_on_its_handshake_signature() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new(&[TENANT]);
    let ca = OpensslCa::of(&pki);
    let (cert, _) = ca.issue("good", &tenant_extensions(&alpha_uri()), None);
    let (_, other_key) = ca.issue("other", &tenant_extensions(&alpha_uri()), None);
    let (server, logs) = ServerProcess::spawn_logged(&pki, "", "");

    let provider = imgsvc::tls::crypto_provider();
    let signing_key = provider.key_provider.load_private_key(imgsvc::tls::read_key("key", &other_key).unwrap()).unwrap();
    let certified = rustls::sign::CertifiedKey::new(imgsvc::tls::read_certs("cert", &cert).unwrap(), signing_key);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(imgsvc::tls::read_certs("ca", &pki.paths().ca_cert()).unwrap().remove(0)).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(PresentAsIs(Arc::new(certified))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // TLS 1.3: the client's side of the handshake completes; the server's
    // verdict on its CertificateVerify arrives as an alert on the first read.
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let err = tls.read(&mut [0u8; 64]).await.expect_err("the server refuses the handshake");
    assert_eq!(err.to_string(), "received fatal alert: DecryptError");
    // rustls reports a CertificateVerify that the certificate's key does not
    // verify as BadSignature, which the server's classification shares with
    // a chain signed by an impostor CA (see above).
    assert_handshake_refusal_logged(&logs, "BadSignature", "unknown_ca");
    assert_still_serving(&server, &pki).await;
}
