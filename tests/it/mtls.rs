//! Mutual TLS and tenant identity: who gets in, who is refused, how, and
//! that the server keeps serving afterwards.

use crate::common::*;
use imgsvc::{
    client::{self, ClientError},
    proto::v1::{Image, PixelFormat, ProcessRequest, image_service_client::ImageServiceClient},
};
use rcgen::{ExtendedKeyUsagePurpose, SanType};
use tonic::Code;

fn tiny_request() -> ProcessRequest {
    ProcessRequest {
        image: Some(Image { format: PixelFormat::Gray8 as i32, width: 1, height: 1, data: vec![9u8].into(), encoded: None }),
        operations: vec![],
        output: None,
    }
}

async fn call_with(server: &TestServer, creds: &imgsvc::tls::ClientCredentials) -> Result<(), ClientError> {
    let ch = client::connect(&target(server.port()), creds).await?;
    ImageServiceClient::new(ch).process(tiny_request()).await.map_err(|s| ClientError::Status {
        code: s.code(),
        message: s.message().to_string(),
        hint: String::new(),
        retry_after: None,
    })?;
    Ok(())
}

async fn assert_still_serving(server: &TestServer, pki: &Pki) {
    call_with(server, &pki.credentials("alpha")).await.expect("a valid client is still served");
}

fn creds(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> imgsvc::tls::ClientCredentials {
    imgsvc::tls::ClientCredentials::from_files(ca, cert, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_client_certificate_signed_by_the_configured_ca() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    call_with(&server, &pki.credentials("alpha")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_connection_without_client_certificate() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    // TLS 1.3: the client's side of the handshake completes; the server's
    // refusal arrives as an alert on the first read.
    let err = read_error_without_client_certificate(server.addr, &pki).await;
    assert!(err.to_string().contains("CertificateRequired"), "{err}");
    assert_still_serving(&server, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_client_signed_by_another_ca_at_the_handshake() {
    let pki = Pki::new(&["alpha"]);
    let other = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (_, cert, key) = other.client_files("alpha");
    let err = call_with(&server, &creds(&pki.paths().ca_cert(), &cert, &key)).await.unwrap_err();
    let ClientError::Connect { explanation, .. } = &err else { panic!("expected a connect error, got {err}") };
    assert!(
        explanation.starts_with("the server refused the client certificate: it is not signed by a CA the server trusts"),
        "{explanation}"
    );
    assert_still_serving(&server, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_server_only_certificate_used_as_client_certificate() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let p = pki.paths();
    let err = call_with(&server, &creds(&p.ca_cert(), &p.server_cert(), &p.server_key())).await.unwrap_err();
    let ClientError::Connect { explanation, .. } = &err else { panic!("expected a connect error, got {err}") };
    assert!(explanation.contains("not issued for client authentication"), "{explanation}");
    assert_still_serving(&server, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_certificate_without_tenant_uri_with_unauthenticated() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (cert, key) =
        pki.sign_custom("no-uri", vec![SanType::DnsName("client.example".try_into().unwrap())], ExtendedKeyUsagePurpose::ClientAuth);
    let err = call_with(&server, &creds(&pki.paths().ca_cert(), &cert, &key)).await.unwrap_err();
    let ClientError::Status { code, message, .. } = err else { panic!("expected a status, got {err}") };
    assert_eq!(code, Code::Unauthenticated);
    assert_eq!(message, "the client certificate has no URI SAN of the form spiffe://test.imgsvc/tenant/<name>");
    assert_still_serving(&server, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_tenant_of_another_trust_domain_with_unauthenticated() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (cert, key) =
        pki.sign_custom("foreign", vec![uri_san("spiffe://elsewhere.example/tenant/alpha")], ExtendedKeyUsagePurpose::ClientAuth);
    let err = call_with(&server, &creds(&pki.paths().ca_cert(), &cert, &key)).await.unwrap_err();
    let ClientError::Status { code, message, .. } = err else { panic!("expected a status, got {err}") };
    assert_eq!(code, Code::Unauthenticated);
    assert_eq!(
        message,
        "the client certificate names tenant URI \"spiffe://elsewhere.example/tenant/alpha\", which is not in trust domain \"test.imgsvc\""
    );
    assert_still_serving(&server, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_whose_certificate_another_ca_signed() {
    let pki = Pki::new(&["alpha"]);
    let other = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (_, cert, key) = pki.client_files("alpha");
    let err = call_with(&server, &creds(&other.paths().ca_cert(), &cert, &key)).await.unwrap_err();
    let ClientError::Connect { explanation, .. } = &err else { panic!("expected a connect error, got {err}") };
    assert!(
        explanation.starts_with("this client refused the server's certificate: it is not signed by the CA given with --ca"),
        "{explanation}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_name_the_certificate_does_not_cover() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut t = target(server.port());
    t.server_name = Some("imgsvc.example.com".into());
    let err = client::connect(&t, &pki.credentials("alpha")).await.unwrap_err();
    let ClientError::Connect { explanation, .. } = &err else { panic!("expected a connect error, got {err}") };
    assert!(explanation.contains("not valid for the name \"imgsvc.example.com\""), "{explanation}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_needs_a_tenant_certificate_and_reports_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut health = HealthClient::new(channel(&server, &pki, "alpha").await);
    for service in ["", "NLImageService", "imgsvc.v1.ImageService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_tls12_clients_as_well_as_tls13() {
    use std::sync::Arc;
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let creds = pki.credentials("alpha");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let base = creds.rustls_config().unwrap();
        // Same trust and identity, one protocol version only.
        let (ca, cert, key) = pki.client_files("alpha");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(imgsvc::tls::read_certs("ca", &ca).unwrap().remove(0)).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(imgsvc::tls::crypto_provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(imgsvc::tls::read_certs("cert", &cert).unwrap(), imgsvc::tls::read_key("key", &key).unwrap())
            .unwrap();
        config.alpn_protocols = base.alpn_protocols.clone();
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    }
}

/// A rustls client config for `tenant`'s files, one protocol version only,
/// with rustls's default client session cache (it offers resumption).
fn single_version_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(imgsvc::tls::read_certs("ca", ca).unwrap().remove(0)).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(imgsvc::tls::crypto_provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(imgsvc::tls::read_certs("cert", cert).unwrap(), imgsvc::tls::read_key("key", key).unwrap())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

/// One connection with `config`: the handshake, then the HTTP/2 preface
/// and a read of the server's first bytes, so that session tickets (sent
/// before them, if any) are in the client's cache. Returns the handshake
/// kind, or the error of the handshake or the read.
async fn handshake_and_read(
    server: std::net::SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<rustls::HandshakeKind, std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(server).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await?;
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await?;
    let mut first = [0u8; 9];
    tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_exact(&mut first)).await.expect("the server answers within 10 s")?;
    Ok(kind)
}

/// Runs `openssl s_client` against `server` with a client certificate,
/// saving the session (`-sess_out`) if asked; returns its output.
fn s_client(
    server: std::net::SocketAddr,
    version: &str,
    (ca, cert, key): (&std::path::Path, &std::path::Path, &std::path::Path),
    session: Option<(&str, &std::path::Path)>,
) -> String {
    if !command_succeeds("openssl", &["version"]) {
        assert!(apt_get_available(), "the openssl CLI is not installed, and apt-get is not available to install it");
        apt_get_install("openssl");
    }
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &server.to_string(), "-servername", "localhost", version, "-alpn", "h2", "-ign_eof"])
        .args(["-CAfile".as_ref(), ca.as_os_str(), "-cert".as_ref(), cert.as_os_str(), "-key".as_ref(), key.as_os_str()])
        .args(session.map(|(flag, path)| [flag.as_ref(), path.as_os_str()]).into_iter().flatten())
        // With -ign_eof s_client reads until the server closes: it does, on
        // a refused certificate; a served one is closed by the idle timeout.
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// rustls restores a resumed session's client certificate without checking
/// it again, so the server resumes no session: every handshake is a full
/// one. Shown from the client's side, with rustls's own session cache (it
/// resumes when the server lets it) and openssl's `-sess_out` (it saves
/// nothing to resume), for a certificate that expires between the first
/// handshake and the attempted resumption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expired_since_the_first_handshake_is_refused_on_resumption() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.server.idle_timeout_secs = 1);
    // Valid for 8 more seconds: the handshakes below, two openssl runs of
    // about a second each (the idle timeout closes them) among them, must
    // all happen before it expires, also on a loaded machine (3 s was
    // once too short in a full run).
    let ca = imgsvc::pki::CertificateAuthority::load(&pki.paths().ca_cert(), &pki.paths().ca_key()).unwrap();
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(8);
    let tenant = imgsvc::identity::TenantId::parse("alpha").unwrap();
    let (cert, key) = (pki.dir.path().join("short.pem"), pki.dir.path().join("short-key.pem"));
    ca.issue_client_until(&pki.trust_domain, &tenant, not_after).unwrap().write(&cert, &key).unwrap();
    let ca_path = pki.paths().ca_cert();
    let (_, good_cert, good_key) = pki.client_files("alpha");

    let versions = [(&rustls::version::TLS12, "-tls1_2"), (&rustls::version::TLS13, "-tls1_3")];
    let mut configs = Vec::new();
    for (version, flag) in versions {
        // A valid certificate: the second handshake is a full one too.
        let good = single_version_config(&ca_path, &good_cert, &good_key, version);
        for _ in 0..2 {
            assert_eq!(handshake_and_read(server.addr, &good).await.unwrap(), rustls::HandshakeKind::Full, "{flag}");
        }
        // The short-lived certificate, while valid: served, session saved.
        let short = single_version_config(&ca_path, &cert, &key, version);
        assert_eq!(handshake_and_read(server.addr, &short).await.unwrap(), rustls::HandshakeKind::Full, "{flag}");
        let session = pki.dir.path().join(format!("session{flag}"));
        let first = s_client(server.addr, flag, (&ca_path, &cert, &key), Some(("-sess_out", &session)));
        assert!(first.contains("New, TLSv1.") && !first.contains("alert"), "{flag}: {first}");
        // Nothing to resume: no session ID (TLS 1.2), no ticket (TLS 1.3),
        // so openssl saves no session.
        assert!(!session.exists(), "{flag}: the server handed out a session to resume: {first}");
        configs.push((short, flag));
    }
    // Until the certificate has expired (bounded: 8 s and a second of rounding).
    let expired = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(not_after.unix_timestamp() as u64 + 1);
    if let Ok(wait) = expired.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    for (short, flag) in configs {
        let err = handshake_and_read(server.addr, &short).await.unwrap_err();
        assert!(err.to_string().contains("CertificateExpired"), "{flag}: {err}");
        let again = s_client(server.addr, flag, (&ca_path, &cert, &key), None);
        assert!(again.contains("alert certificate expired"), "{flag}: {again}");
    }
    assert_still_serving(&server, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_a_second_uri_san_and_a_certificate_without_client_auth_usage_with_unauthenticated() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    // A valid tenant URI beside a foreign one: SPIFFE SVIDs have exactly one.
    let sans = vec![uri_san("spiffe://test.imgsvc/tenant/alpha"), uri_san("spiffe://elsewhere.example/tenant/root")];
    let (cert, key) = pki.sign_custom("two-uris", sans, ExtendedKeyUsagePurpose::ClientAuth);
    let err = call_with(&server, &creds(&pki.paths().ca_cert(), &cert, &key)).await.unwrap_err();
    let ClientError::Status { code, message, .. } = err else { panic!("expected a status, got {err}") };
    assert_eq!(
        (code, message.as_str()),
        (
            Code::Unauthenticated,
            "the client certificate has several URI SANs (spiffe://test.imgsvc/tenant/alpha, spiffe://elsewhere.example/tenant/root); a tenant certificate has exactly one"
        )
    );

    // No extended key usage at all: rustls lets it through the handshake.
    let p = pki.paths();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(p.ca_key()).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(p.ca_cert()).unwrap(), ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![uri_san("spiffe://test.imgsvc/tenant/alpha")];
    let (cert, key) = (pki.dir.path().join("no-eku.pem"), pki.dir.path().join("no-eku-key.pem"));
    std::fs::write(&cert, params.signed_by(&leaf_key, &issuer).unwrap().pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    let err = call_with(&server, &creds(&p.ca_cert(), &cert, &key)).await.unwrap_err();
    let ClientError::Status { code, message, .. } = err else { panic!("expected a status, got {err}") };
    assert_eq!(
        (code, message.as_str()),
        (Code::Unauthenticated, "the client certificate is not issued for client authentication (no extended key usage clientAuth)")
    );
    assert_still_serving(&server, &pki).await;
}

#[test]
fn a_server_key_others_may_read_is_warned_about_or_refused() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new(&[]);
    let key = pki.paths().server_key();
    let load = |permissions: &str| {
        let mut raw = raw_config(&pki);
        raw.tls.key_permissions = permissions.into();
        imgsvc::tls::ServerTls::load(&imgsvc::config::Settings::validate(raw, "test config".into()).unwrap().tls)
    };
    assert_eq!(load("refuse").unwrap().warnings, Vec::<String>::new(), "gen-certs writes keys 0600");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        load("warn").unwrap().warnings,
        [format!(
            "server key {}: mode 0644 lets every user of the machine read or write it; chmod 600 it, or 640 with the server's own group",
            key.display()
        )]
    );
    let err = load("refuse").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "server key {}: mode 0644 lets every user of the machine read or write it (tls.key_permissions = \"refuse\"); chmod 600 it, or 640 with the server's own group",
            key.display()
        )
    );
}
