//! Kernel TLS (`tls.kernel_tls`): what the server does on the kernel at
//! hand. Where the kernel has kernel TLS, `on` and `auto` move every
//! connection's records into it, whatever the suite (TLS 1.2 AES-GCM with
//! explicit nonces disjoint from rustls's), and large images come back
//! exact; key updates are followed where the kernel takes new keys (6.14
//! and later) and close the connection gracefully where it does not;
//! where it has no kernel TLS, `on` refuses to start saying
//! why and `auto` serves through rustls. Which branch runs follows
//! [`kernel`]: where the kernel lists the `tls` upper-layer protocol, the
//! probe must take every cipher, or the test fails (a layout the kernel
//! rejects must not pass as "no kernel TLS here"), and it must find new
//! keys taken exactly from Linux 6.14 on. `tests/vm/run.sh` runs this
//! module (and the whole suite with `IMGSVC_TLS__KERNEL_TLS=on`) in a VM
//! whose kernel has the `tls` module (docs/performance.md#kernel-tls).

use std::sync::Arc;

use crate::common::*;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use imgsvc::{
    config::Settings,
    imaging::{Layout, QuarterTurns, reference},
    proto::nlimage::{NlImage, NlImageRotateRequest, nl_image_rotate_request::Rotation, nl_image_service_client::NlImageServiceClient},
    serving::{
        kernel_tls::{Ciphers, KernelTls, Support, probe},
        server::{Server, ServerError},
    },
};
use rustls::{SupportedCipherSuite, crypto::ring::cipher_suite as suites};

/// What the kernel takes, `None` where it has no kernel TLS. Where
/// `/proc/sys/net/ipv4/tcp_available_ulp` lists `tls`, the probe must find
/// all three ciphers (a refusal there is a failure, not a fallback), and
/// new keys taken exactly where the kernel is 6.14 or later.
fn kernel() -> Option<KernelTls> {
    let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    let listed = listed.split_whitespace().any(|u| u == "tls");
    match probe() {
        Support::Available(kernel) => {
            assert!(!listed || kernel.ciphers == Ciphers::ALL, "the kernel lists tls but took only {kernel:?}");
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
            let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
            let new_keys = (numbers.next().unwrap(), numbers.next().unwrap()) >= (6, 14);
            assert_eq!(kernel.rekey, new_keys, "kernel {release}: the probe says {kernel:?}");
            Some(kernel)
        }
        Support::Unavailable(why) => {
            assert!(!listed, "the kernel lists the tls upper-layer protocol but the probe says: {why}");
            None
        }
    }
}

fn image(w: i32, h: i32, seed: u32) -> NlImage {
    let data: Vec<u8> = (0..(w * h * 3) as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8).collect();
    NlImage { color: true, width: w, height: h, data: Bytes::from(data) }
}

/// A channel whose TLS client offers exactly one protocol version and one
/// cipher suite.
async fn channel_with(server: &TestServer, pki: &Pki, tenant: &str, suite: SupportedCipherSuite) -> tonic::transport::Channel {
    let (config, addr) = (Arc::new(client_config(pki, tenant, suite)), server.addr);
    let connector = tower::service_fn(move |_uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .unwrap_or_else(|e| panic!("{suite:?}: {e}"))
}

/// A TLS client configuration that offers exactly one protocol version
/// and one cipher suite, and h2.
fn client_config(pki: &Pki, tenant: &str, suite: SupportedCipherSuite) -> rustls::ClientConfig {
    let (ca, cert, key) = pki.client_files(tenant);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(imgsvc::tls::read_certs("ca", &ca).unwrap().remove(0)).unwrap();
    let provider = rustls::crypto::CryptoProvider { cipher_suites: vec![suite], ..rustls::crypto::ring::default_provider() };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(imgsvc::tls::read_certs("cert", &cert).unwrap(), imgsvc::tls::read_key("key", &key).unwrap())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Rotations of a 1000×700 RGB image (2.1 MB each way: many TLS records,
/// several HTTP/2 frames) and mean filters of a small one, four calls at
/// once on one connection, each checked against the reference kernels.
async fn exact_answers(channel: tonic::transport::Channel) {
    let mut calls = Vec::new();
    for i in 0..4u32 {
        let mut client = NlImageServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        calls.push(tokio::spawn(async move {
            let big = image(1000, 700, i);
            let rotated = client
                .rotate_image(NlImageRotateRequest { rotation: Rotation::NinetyDeg as i32, image: Some(big.clone()) })
                .await
                .unwrap()
                .into_inner();
            let layout = Layout::new(1000, 700, 3).unwrap();
            assert!(rotated.data == reference::rotate(&big.data, layout, QuarterTurns::One), "rotation {i} differs");
            let small = image(33, 17, i);
            let filtered = client.mean_filter(small.clone()).await.unwrap().into_inner();
            assert_eq!(filtered.data, reference::mean_filter(&small.data, Layout::new(33, 17, 3).unwrap()));
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
}

fn connections(server: &TestServer, tenant: &str, record_layer: &str) -> f64 {
    metric(&scrape(server.admin_addr.unwrap()), "imgsvc_tls_connections_total", &[("tenant", tenant), ("record_layer", record_layer)])
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_moves_every_version_and_cipher_into_the_kernel_or_refuses_to_start() {
    let pki = Pki::new(&["ktls-on"]);
    match kernel() {
        Some(_) => {
            let server = TestServer::start_with(&pki, |raw| raw.tls.kernel_tls = "on".into());
            let offered = [
                suites::TLS13_AES_128_GCM_SHA256,
                suites::TLS13_AES_256_GCM_SHA384,
                suites::TLS13_CHACHA20_POLY1305_SHA256,
                suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ];
            for (n, suite) in offered.into_iter().enumerate() {
                exact_answers(channel_with(&server, &pki, "ktls-on", suite).await).await;
                assert_eq!(connections(&server, "ktls-on", "kernel"), (n + 1) as f64, "{suite:?}");
                assert_eq!(connections(&server, "ktls-on", "rustls"), 0.0, "{suite:?}");
            }
        }
        None => {
            let Support::Unavailable(why) = probe() else { panic!("the probe changed its mind") };
            let mut raw = raw_config(&pki);
            raw.tls.kernel_tls = "on".into();
            let err = Server::new(Settings::validate(raw, "test config".into()).unwrap()).err().expect("on must refuse to start");
            assert!(matches!(err, ServerError::KernelTls(_)), "{err:?}");
            let message = err.to_string();
            assert!(message.starts_with("tls.kernel_tls is \"on\" but kernel TLS is unavailable: "), "{message}");
            assert!(message.contains(&why) && message.contains("modprobe tls"), "{message}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_serves_exact_answers_through_whichever_record_layer_the_kernel_allows() {
    let pki = Pki::new(&["ktls-auto"]);
    let server = TestServer::start_with(&pki, |raw| raw.tls.kernel_tls = "auto".into());
    exact_answers(channel(&server, &pki, "ktls-auto").await).await;
    let (expected, other) = match kernel() {
        Some(_) => ("kernel", "rustls"),
        None => ("rustls", "kernel"),
    };
    assert_eq!(connections(&server, "ktls-auto", expected), 1.0);
    // The first connection is gone (its channel dropped); the next one is
    // served the same way.
    exact_answers(channel(&server, &pki, "ktls-auto").await).await;
    assert_eq!(connections(&server, "ktls-auto", expected), 2.0);
    assert_eq!(connections(&server, "ktls-auto", other), 0.0);
}

/// How a raw HTTP/2 exchange ended.
#[derive(Debug, PartialEq)]
enum Seen {
    PingAck,
    /// GOAWAY (its error code), then the end of the connection.
    GoAway(u32),
    End,
}

/// Reads HTTP/2 frames until a PING acknowledgement, a GOAWAY or the end of
/// the connection.
async fn until_ping_ack(tls: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Seen> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut header = [0u8; 9];
        match tls.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Seen::End),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload).await?;
        match header[3] {
            6 if header[4] & 1 == 1 => return Ok(Seen::PingAck),
            7 => return Ok(Seen::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()))),
            _ => {}
        }
    }
}

/// An HTTP/2 PING frame carrying `payload` eight times.
fn ping(payload: u8) -> Vec<u8> {
    [&[0, 0, 8, 6, 0, 0, 0, 0, 0][..], &[payload; 8]].concat()
}

/// Starts HTTP/2 on `tls` (preface, empty SETTINGS) and sends `ping`,
/// which must be acknowledged: the connection is being served.
async fn preface_and_ping(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ping: &[u8], why: &str) {
    use tokio::io::AsyncWriteExt;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    tls.write_all(ping).await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(until_ping_ack(tls).await.unwrap(), Seen::PingAck, "{why}");
}

fn key_limit_closes(server: &TestServer) -> f64 {
    metric(&scrape(server.admin_addr.unwrap()), "imgsvc_connections_closed_total", &[("reason", "key_limit")]).unwrap_or(0.0)
}

fn key_updates(server: &TestServer, tenant: &str, direction: &str) -> f64 {
    metric(&scrape(server.admin_addr.unwrap()), "imgsvc_tls_key_updates_total", &[("tenant", tenant), ("direction", direction)])
        .unwrap_or(0.0)
}

/// A TLS 1.3 client may rekey at any time (KeyUpdate; rustls's client
/// here). rustls follows it, and so does the kernel path where the kernel
/// takes new keys: the same connection answers. A kernel that cannot take
/// them cannot read the client's next records, so the server closes that
/// connection gracefully (GOAWAY with NO_ERROR, `reason="key_limit"`) —
/// and keeps serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_update_is_followed_where_the_keys_can_change_and_closes_gracefully_where_not() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new(&["ktls-rekey"]);
    let server = TestServer::start_with(&pki, |raw| raw.tls.kernel_tls = "auto".into());
    let mut tls = tls_connect(server.addr, &pki, "ktls-rekey").await;
    // HTTP/2 preface and empty SETTINGS, then a PING: answered with an ACK.
    preface_and_ping(&mut tls, &ping(1), "the first PING is answered").await;

    tls.get_mut().1.refresh_traffic_keys().unwrap(); // sends KeyUpdate
    tls.write_all(&ping(2)).await.unwrap();
    tls.flush().await.unwrap();
    let answered = tokio::time::timeout(std::time::Duration::from_secs(60), until_ping_ack(&mut tls)).await.expect("an answer or the end");
    match kernel() {
        None => {
            assert_eq!(answered.unwrap(), Seen::PingAck, "rustls follows the KeyUpdate and answers");
            assert_eq!(key_limit_closes(&server), 0.0);
        }
        Some(kernel) if kernel.rekey => {
            assert_eq!(answered.unwrap(), Seen::PingAck, "the kernel takes the client's next key and answers");
            assert_eq!(key_updates(&server, "ktls-rekey", "received"), 1.0);
            // And again, on the same connection.
            tls.get_mut().1.refresh_traffic_keys().unwrap();
            tls.write_all(&ping(3)).await.unwrap();
            tls.flush().await.unwrap();
            assert_eq!(until_ping_ack(&mut tls).await.unwrap(), Seen::PingAck, "the second key update is followed too");
            assert_eq!(key_updates(&server, "ktls-rekey", "received"), 2.0);
        }
        Some(_) => {
            assert_eq!(answered.unwrap(), Seen::GoAway(0), "kernel TLS closes the connection gracefully");
            // (The counter is the process's: other tests may add to it.)
            assert!(key_limit_closes(&server) >= 1.0);
        }
    }
    // Everyone else is still served.
    exact_answers(channel(&server, &pki, "ktls-rekey").await).await;
}

/// The client's traffic secrets as rustls logs them (SSLKEYLOGFILE's
/// labels), for the test to derive the next ones itself.
#[derive(Debug, Default)]
struct SecretLog(std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>);

impl rustls::KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        self.0.lock().unwrap().insert(label.to_string(), secret.to_vec());
    }
}

/// HKDF-Expand-Label with SHA-256 and an empty context (RFC 8446 §7.1).
fn expand_label(secret: &[u8], label: &str, len: usize) -> Vec<u8> {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let label = format!("tls13 {label}");
    let info = [&(len as u16).to_be_bytes()[..], &[label.len() as u8], label.as_bytes(), &[0]].concat();
    let prk = ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, secret);
    let mut out = vec![0; len];
    prk.expand(&[&info], Len(len)).unwrap().fill(&mut out).unwrap();
    out
}

/// The types of the whole HTTP/2 frames in `h2`.
fn frame_types(mut h2: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while h2.len() >= 9 {
        let len = u32::from_be_bytes([0, h2[0], h2[1], h2[2]]) as usize;
        types.push(h2[3]);
        h2 = &h2[(9 + len).min(h2.len())..];
    }
    types
}

/// The TLS 1.3 key update a client asks the server to answer, sealed by
/// the test (rustls's client never asks): the client's KeyUpdate with
/// `update_requested`, then a PING under its next key. Where the keys can
/// change (rustls; the kernel from 6.14), the server opens the PING with
/// the client's next key and sends its own KeyUpdate under its old key
/// before the PING's acknowledgement under its next one; the test derives
/// each next key from the logged secrets (RFC 8446 §7.2) independently of
/// both. Where the kernel cannot take new keys: a graceful close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_key_update_is_answered_with_the_server_s_own_before_its_next_record() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new(&["ktls-request"]);
    let server = TestServer::start_with(&pki, |raw| raw.tls.kernel_tls = "auto".into());
    let log = Arc::new(SecretLog::default());
    let mut config = client_config(&pki, "ktls-request", suites::TLS13_AES_128_GCM_SHA256);
    config.enable_secret_extraction = true;
    config.key_log = log.clone();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    preface_and_ping(&mut tls, &ping(1), "served before the key update").await;
    let (mut tcp, connection) = tls.into_inner();
    let (mut tx, mut rx) = RecordLayer::both(connection);
    let secret = |label: &str| log.0.lock().unwrap().get(label).cloned().unwrap_or_else(|| panic!("{label} was not logged"));
    let (client_secret, server_secret) = (secret("CLIENT_TRAFFIC_SECRET_0"), secret("SERVER_TRAFFIC_SECRET_0"));
    // The derivation agrees with rustls's keys before it is trusted for the next ones.
    assert_eq!(RecordLayer::from_secret(&client_secret).iv, tx.iv, "the logged secret derives rustls's IV");
    let next = |secret: &[u8]| expand_label(secret, "traffic upd", 32);

    tcp.write_all(&tx.seal(22, &[24, 0, 0, 1, 1])).await.unwrap(); // KeyUpdate, update_requested
    tx = RecordLayer::from_secret(&next(&client_secret));
    tcp.write_all(&tx.seal(23, &ping(2))).await.unwrap();
    let rekeys = !matches!(kernel(), Some(kernel) if !kernel.rekey);
    let seen = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        // Under the server's old key: anything, then its KeyUpdate (or,
        // where the kernel cannot take keys, GOAWAY and the end).
        let mut h2 = Vec::new();
        loop {
            match rx.open(&mut tcp).await {
                Some((22, message)) => {
                    assert_eq!(message, [24, 0, 0, 1, 0], "the server's KeyUpdate, update_not_requested");
                    break;
                }
                Some((23, data)) => h2.extend_from_slice(&data),
                Some(other) => panic!("unexpected record {other:?}"),
                None => return if frame_types(&h2).contains(&7) { "goaway, end" } else { "end" },
            }
        }
        rx = RecordLayer::from_secret(&next(&server_secret));
        after_the_alert(&mut tcp, &mut rx).await
    })
    .await
    .expect("an answer or the end");
    if rekeys {
        assert_eq!(seen, "ping ack", "the PING under the client's next key, answered under the server's next key");
        if kernel().is_some() {
            assert_eq!((key_updates(&server, "ktls-request", "received"), key_updates(&server, "ktls-request", "sent")), (1.0, 1.0));
        }
    } else {
        assert_eq!(seen, "goaway, end", "a kernel that cannot take new keys closes gracefully");
        assert!(key_limit_closes(&server) >= 1.0);
    }
    exact_answers(channel(&server, &pki, "ktls-request").await).await;
}

/// The server's sending key never reaches its limit: a TLS 1.3
/// kernel-TLS connection changes keys before it (KeyUpdate) where the
/// kernel takes new keys, and asks for its graceful close where it does not
/// or in TLS 1.2 (which has no key update). Here the test hook
/// (`tls.kernel_tls_close_after_records`) brings the limit to 20 records,
/// so calls cross it again and again — and every call is answered, exactly
/// (on GOAWAY the client moves to a new connection). Through imgsvc's own
/// client (`client::Balancer`) for TLS 1.3: a bare tonic channel fails a
/// call it hands to a connection at the moment that connection closes
/// (`CANCELLED`, seen in the VM run), which the client retries; TLS 1.2
/// through a channel offering only it, with the same retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sending_key_near_its_limit_is_changed_or_closed_gracefully_and_every_call_is_answered() {
    use imgsvc::client::{Api, Balancer, Op, RawImage};
    use imgsvc::proto::v1::PixelFormat;
    let pki = Pki::new(&["ktls-limit", "ktls-limit12"]);
    let server = TestServer::start_with(&pki, |raw| {
        raw.tls.kernel_tls = "auto".into();
        raw.tls.kernel_tls_close_after_records = 20;
    });
    let client = Balancer::new(vec![target_of(server.addr)], pki.credentials("ktls-limit"));
    let ops = [Op::Rotate(QuarterTurns::One)];
    // 15 calls: at least 60 records of answers, so the limit is crossed at
    // least three times.
    for i in 0..15u32 {
        let img = image(200, 100, i); // 60 kB: four records or more each way
        let raw = RawImage { format: PixelFormat::Rgb8, width: 200, height: 100, data: img.data.clone() };
        let (rotated, _) = client.process(Api::Legacy, &raw, &ops).await.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert!(rotated.data == reference::rotate(&img.data, Layout::new(200, 100, 3).unwrap(), QuarterTurns::One), "call {i}");
    }
    eprintln!("{} TLS 1.3 calls retried by the client", client.retries());
    let (opened, closed) = (connections(&server, "ktls-limit", "kernel"), key_limit_closes(&server));
    match kernel() {
        None => {
            assert_eq!(connections(&server, "ktls-limit", "rustls"), 1.0);
            assert_eq!(key_limit_closes(&server), 0.0);
        }
        Some(kernel) if kernel.rekey => {
            // One connection throughout; its key changed three times or more.
            assert_eq!(opened, 1.0);
            let sent = key_updates(&server, "ktls-limit", "sent");
            assert!(sent >= 3.0, "{sent} key updates sent");
        }
        Some(_) => {
            // 15 answers of 4+ records each, 20 records per connection:
            // three connections reach the limit, so at least three opened.
            assert!(opened >= 3.0 && closed >= opened - 1.0, "{opened} connections, {closed} closed for the key limit");
        }
    }

    // TLS 1.2 has no key update: on the kernel path it closes at the limit.
    let channel = channel_with(&server, &pki, "ktls-limit12", suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256).await;
    let mut legacy = NlImageServiceClient::new(channel);
    for i in 0..15u32 {
        let img = image(200, 100, i);
        let request = NlImageRotateRequest { rotation: Rotation::NinetyDeg as i32, image: Some(img.clone()) };
        let mut attempts = 0;
        let rotated = loop {
            attempts += 1;
            match legacy.rotate_image(request.clone()).await {
                Ok(answer) => break answer.into_inner(),
                // What imgsvc's client retries (`client::balance::retryable`):
                // the call never reached a server.
                Err(status) if attempts < 5 && matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unavailable) => {}
                Err(status)
                    if attempts < 5 && status.code() == tonic::Code::Internal && status.message().starts_with("h2 protocol error") => {}
                Err(status) => panic!("TLS 1.2 call {i}, attempt {attempts}: {status:?}"),
            }
        };
        assert!(rotated.data == reference::rotate(&img.data, Layout::new(200, 100, 3).unwrap(), QuarterTurns::One), "TLS 1.2 call {i}");
    }
    let (opened, closed_now) = (connections(&server, "ktls-limit12", "kernel"), key_limit_closes(&server));
    match kernel() {
        None => assert_eq!((connections(&server, "ktls-limit12", "rustls"), closed_now), (1.0, 0.0)),
        Some(_) => assert!(opened >= 3.0 && closed_now - closed >= opened - 1.0, "TLS 1.2: {opened} connections, {closed_now} closed"),
    }
}

/// The handshake the kernel path runs in rustls's unbuffered API
/// (`kernel_tls::handshake`), on any host: a client with a certificate
/// gets through, its certificate is the one rustls verified, and the
/// connection ends at a record boundary ready for the kernel (`offload`
/// extracts the secrets, then sets the kernel's `tls` ULP: done where the
/// kernel has it, refused with that step named where not); a client
/// without one is refused with rustls's error, classified as tokio-rustls's
/// is, and receives rustls's alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_path_s_own_handshake_verifies_the_client_and_ends_ready_for_the_kernel() {
    use imgsvc::serving::{kernel_tls, lanes::LaneTcp};
    use imgsvc::telemetry::metrics::HandshakeFailure;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new(&["ktls-hs"]);
    let mut raw = raw_config(&pki);
    raw.tls.kernel_tls = "auto".into();
    let settings = Settings::validate(raw, "test config".into()).unwrap();
    let config = imgsvc::tls::ServerTls::load(&settings.tls).unwrap().config;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = || rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let kernel_tls = kernel().unwrap_or(KernelTls { ciphers: Ciphers::ALL, rekey: false });
    for suite in [suites::TLS13_AES_256_GCM_SHA384, suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256] {
        let client_config = Arc::new(client_config(&pki, "ktls-hs", suite));
        let client = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client_config).connect(name(), tcp).await.unwrap();
            tls.write_all(b"hello").await.unwrap();
            tls.flush().await.unwrap();
            tls
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let handshake = kernel_tls::handshake(LaneTcp::new(tcp).bound_reads_to_records(), config.clone()).await.unwrap();
        let chain = handshake.peer_certificates();
        assert!(imgsvc::tls::subject_of(&chain[0]).contains("ktls-hs"), "{suite:?}: {}", imgsvc::tls::subject_of(&chain[0]));
        let mut tls = client.await.unwrap();
        match (kernel_tls::offload(handshake, kernel_tls, None, "ktls-hs".into()), kernel()) {
            (Ok(mut stream), Some(_)) => {
                // The kernel opens the client's first record and seals the answer.
                let mut hello = [0u8; 5];
                stream.read_exact(&mut hello).await.unwrap();
                assert_eq!(&hello, b"hello", "{suite:?}");
                stream.write_all(b"world").await.unwrap();
                let mut world = [0u8; 5];
                tls.read_exact(&mut world).await.unwrap();
                assert_eq!(&world, b"world", "{suite:?}");
            }
            (Err(kernel_tls::OffloadError::Kernel { what, .. }), None) => assert_eq!(what, "TCP_ULP tls", "{suite:?}"),
            (Err(e), _) => panic!("{suite:?}: {e}"),
            (Ok(_), None) => panic!("{suite:?}: offloaded on a kernel without kernel TLS"),
        }
    }

    // No client certificate: refused, and told so by rustls's alert.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(imgsvc::tls::read_certs("ca", &pki.client_files("ktls-hs").0).unwrap().remove(0)).unwrap();
    let mut anonymous = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let client = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(anonymous)).connect(name(), tcp).await?;
        // TLS 1.3: the client learns of the refusal on its first read.
        let mut byte = [0u8; 1];
        tls.read(&mut byte).await.map(|_| ())
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let error = kernel_tls::handshake(LaneTcp::new(tcp).bound_reads_to_records(), config.clone()).await.err().expect("refused");
    assert_eq!(HandshakeFailure::classify(&error), HandshakeFailure::NoClientCertificate, "{error}");
    let seen = client.await.unwrap().expect_err("the client is refused");
    assert!(seen.to_string().contains("CertificateRequired"), "the client got rustls's alert: {seen}");
}

/// `--check-config` probes the kernel as the start does: "on" fails the
/// check (exit 78, the reason) where the kernel cannot, and says which
/// ciphers it will take where it can.
#[test]
fn check_config_probes_the_kernel_like_the_start() {
    let pki = Pki::new(&["ktls-check"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_server_config(dir.path(), &pki, "");
    for mode in ["on", "auto"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imgsvc-server"))
            .args(["--check-config", "--config", config.to_str().unwrap()])
            .env("IMGSVC_TLS__KERNEL_TLS", mode)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        match (
            kernel().ok_or_else(|| match probe() {
                Support::Unavailable(why) => why,
                Support::Available(_) => unreachable!("kernel() is None only when the probe is unavailable"),
            }),
            mode,
        ) {
            (Ok(kernel), _) => {
                assert!(out.status.success(), "{mode}: {stderr}");
                assert!(stdout.contains(&format!("kernel TLS: on ({kernel})")), "{mode}: {stdout}");
                assert!(stdout.contains("AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305"), "{mode}: {stdout}");
            }
            (Err(why), "on") => {
                assert_eq!(out.status.code(), Some(78), "{stdout}{stderr}");
                assert!(stderr.contains("tls.kernel_tls is \"on\" but kernel TLS is unavailable") && stderr.contains(&why), "{stderr}");
                assert_eq!(stderr.matches("kernel TLS is unavailable").count(), 1, "said once: {stderr}");
            }
            (Err(why), _) => {
                assert!(out.status.success(), "{stderr}");
                assert!(stdout.contains(&format!("kernel TLS: off: {why}")), "{stdout}");
            }
        }
    }
}

fn connection_errors(server: &TestServer, tenant: &str, kind: &str) -> f64 {
    metric(&scrape(server.admin_addr.unwrap()), "imgsvc_connection_errors_total", &[("tenant", tenant), ("kind", kind)]).unwrap_or(0.0)
}

/// A client's TCP stream that ends without TLS close_notify is a
/// truncation (an attacker cutting the stream short looks the same): the
/// connection ends with an error, counted as `truncated`, whichever record
/// layer serves it; one that sends close_notify first ends cleanly. The
/// same assertions in both branches: on a kernel with kernel TLS (the VM),
/// the kernel path must tell the two apart as rustls does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_without_close_notify_is_a_truncation_and_one_closed_with_it_is_not() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new(&["ktls-cut"]);
    let server = TestServer::start_with(&pki, |raw| raw.tls.kernel_tls = "auto".into());
    let expected = if kernel().is_some() { "kernel" } else { "rustls" };
    let ping = ping(7);
    for (round, close_notify) in [(1.0, false), (2.0, true)] {
        let mut tls = tls_connect(server.addr, &pki, "ktls-cut").await;
        preface_and_ping(&mut tls, &ping, "served before the end").await;
        if close_notify {
            tls.shutdown().await.unwrap(); // close_notify, then the TCP end
        } else {
            tls.get_mut().0.shutdown().await.unwrap(); // the TCP end alone
        }
        // The server ends the connection either way.
        let ended = tokio::time::timeout(std::time::Duration::from_secs(30), until_ping_ack(&mut tls)).await.expect("the server ends it");
        assert!(!matches!(ended, Ok(Seen::PingAck)), "nothing more is answered: {ended:?}");
        assert_eq!(connections(&server, "ktls-cut", expected), round, "served by {expected}");
    }
    // Counted once the server has seen the end; the clean close never.
    let admin = server.admin_addr.unwrap();
    let truncated = until_metric(
        admin,
        "imgsvc_connection_errors_total",
        &[("tenant", "ktls-cut"), ("kind", "truncated")],
        1.0,
        std::time::Duration::from_secs(10),
    )
    .await;
    let seen: Vec<String> = scrape(admin).lines().filter(|l| l.contains("connection_errors")).map(String::from).collect();
    assert_eq!(truncated, Some(1.0), "the cut stream is counted as a truncation: {seen:?}");
    for kind in ["tls", "reset", "timeout", "http2"] {
        assert_eq!(connection_errors(&server, "ktls-cut", kind), 0.0, "{kind}: the close_notify ended cleanly");
    }
    exact_answers(channel(&server, &pki, "ktls-cut").await).await;
}

/// One direction of a TLS 1.3 AES-128-GCM connection whose secrets the
/// test took from rustls after the handshake: it seals and opens records
/// itself, so it can send what no TLS library sends at will (alerts).
struct RecordLayer {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl RecordLayer {
    /// The direction's key and IV from a TLS 1.3 traffic secret (RFC 8446
    /// §7.3), sequence number 0.
    fn from_secret(secret: &[u8]) -> Self {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &expand_label(secret, "key", 16)).unwrap();
        Self { key: ring::aead::LessSafeKey::new(key), iv: expand_label(secret, "iv", 12).try_into().unwrap(), seq: 0 }
    }

    /// The client's sending and receiving sides, from a connection after
    /// its handshake.
    fn both(connection: rustls::ClientConnection) -> (Self, Self) {
        #[allow(deprecated, reason = "the client side has no kernel-connection API to take the secrets from")]
        let secrets = connection.dangerous_extract_secrets().unwrap();
        (Self::new(secrets.tx), Self::new(secrets.rx))
    }

    fn new((seq, secrets): (u64, rustls::ConnectionTrafficSecrets)) -> Self {
        let rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } = secrets else { panic!("AES-128-GCM secrets expected") };
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, key.as_ref()).unwrap();
        Self { key: ring::aead::LessSafeKey::new(key), iv: iv.as_ref().try_into().unwrap(), seq }
    }

    fn nonce(&mut self) -> ring::aead::Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        ring::aead::Nonce::assume_unique_for_key(nonce)
    }

    /// A record of `content_type` carrying `payload` (RFC 8446 §5.2).
    fn seal(&mut self, content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut inner = [payload, &[content_type]].concat();
        let len = inner.len() + 16;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.nonce();
        self.key.seal_in_place_append_tag(nonce, ring::aead::Aad::from(header), &mut inner).unwrap();
        [&header[..], &inner].concat()
    }

    /// The next record from `tcp`, opened: its content type and payload;
    /// `None` at the end of the stream.
    async fn open(&mut self, tcp: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut header = [0u8; 5];
        tcp.read_exact(&mut header).await.ok()?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
        tcp.read_exact(&mut body).await.ok()?;
        let nonce = self.nonce();
        let plain = self.key.open_in_place(nonce, ring::aead::Aad::from(header), &mut body).expect("a record the server sealed");
        let end = plain.iter().rposition(|&b| b != 0).expect("a content type");
        Some((plain[end], plain[..end].to_vec()))
    }
}

/// Reads the server's records until an HTTP/2 PING acknowledgement, a
/// fatal alert or the end of the stream.
async fn after_the_alert(tcp: &mut tokio::net::TcpStream, rx: &mut RecordLayer) -> &'static str {
    let mut h2 = Vec::new();
    while let Some((content_type, payload)) = rx.open(tcp).await {
        match content_type {
            21 => return "alert",
            23 => h2.extend_from_slice(&payload),
            _ => {}
        }
        while h2.len() >= 9 {
            let len = u32::from_be_bytes([0, h2[0], h2[1], h2[2]]) as usize;
            if h2.len() < 9 + len {
                break;
            }
            if h2[3] == 6 && h2[4] & 1 == 1 {
                return "ping ack";
            }
            h2.drain(..9 + len);
        }
    }
    "end"
}

/// TLS 1.3 alerts from the client are taken as rustls takes them, on
/// either record layer: a user_canceled warning is ignored and the
/// connection serves on; any other warning fails the connection (TLS 1.3
/// has no warnings), as does a fatal alert; each failure is counted as
/// `imgsvc_connection_errors_total{kind="tls"}`. The alerts are sealed by
/// the test under the client's traffic key, taken from rustls after the
/// handshake. Same assertions in both branches: in the VM, the kernel
/// path's (`kernel_tls::decide`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_alerts_from_the_client_are_taken_as_rustls_takes_them() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new(&["ktls-alert"]);
    let server = TestServer::start_with(&pki, |raw| raw.tls.kernel_tls = "auto".into());
    let mut config = client_config(&pki, "ktls-alert", suites::TLS13_AES_128_GCM_SHA256);
    config.enable_secret_extraction = true;
    let config = Arc::new(config);
    // (alert level, description), and what follows it.
    let cases = [((1u8, 90u8), "ping ack"), ((1, 40), "alert"), ((2, 40), "end")];
    for ((level, description), expected) in cases {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.unwrap();
        preface_and_ping(&mut tls, &ping(1), "served before the alert").await;
        let (mut tcp, connection) = tls.into_inner();
        let (mut tx, mut rx) = RecordLayer::both(connection);
        tcp.write_all(&[tx.seal(21, &[level, description]), tx.seal(23, &ping(2))].concat()).await.unwrap();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(30), after_the_alert(&mut tcp, &mut rx)).await.expect("an answer");
        // A warning fails the connection with the server's decode_error
        // alert; after a fatal alert from the client the server sends none.
        assert_eq!(seen, expected, "after alert ({level}, {description})");
    }
    let admin = server.admin_addr.unwrap();
    let labels = [("tenant", "ktls-alert"), ("kind", "tls")];
    let failed = until_metric(admin, "imgsvc_connection_errors_total", &labels, 2.0, std::time::Duration::from_secs(10)).await;
    assert_eq!(failed, Some(2.0), "the warning and the fatal alert each fail their connection, counted as tls");
    let expected = if kernel().is_some() { "kernel" } else { "rustls" };
    assert_eq!(connections(&server, "ktls-alert", expected), 3.0, "served by {expected}");
}
