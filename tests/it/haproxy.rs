//! haproxy (Debian's package) in TCP pass-through mode in front of three
//! servers on loopback: a bounded load completes with zero errors, the
//! connections spread over the servers, and the tenant still reaches them
//! (per-tenant metrics on the backends; a tenant-less certificate is still
//! UNAUTHENTICATED).
//!
//! haproxy is installed with apt-get when missing (CI runs as root); the
//! test is skipped, saying so, only where apt-get itself does not exist.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    client::{Api, Balancer, Op, RawImage},
    imaging::QuarterTurns,
    proto::v1::PixelFormat,
};

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy/haproxy.cfg");

/// The haproxy binary, installed from Debian's package when missing (once
/// per test process: the tests here would otherwise race for dpkg's lock).
pub(crate) fn ensure_haproxy() -> Option<PathBuf> {
    static HAPROXY: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    HAPROXY.get_or_init(install_haproxy).clone()
}

fn install_haproxy() -> Option<PathBuf> {
    let found = || ["haproxy", "/usr/sbin/haproxy"].into_iter().find(|c| command_succeeds(c, &["-v"])).map(PathBuf::from);
    if let Some(path) = found() {
        return Some(path);
    }
    if !apt_get_available() {
        eprintln!("SKIPPED: haproxy is not installed and apt-get is not available to install it");
        return None;
    }
    apt_get_install("haproxy");
    Some(found().expect("haproxy runs after apt-get install"))
}

/// The shipped config with loopback addresses: the frontend on `listen`,
/// one server line per backend (gRPC address, admin port for the check).
fn test_config(listen: SocketAddr, backends: &[(SocketAddr, SocketAddr)]) -> String {
    let shipped = std::fs::read_to_string(SHIPPED).unwrap();
    let mut config: Vec<String> = shipped
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter(|l| !l.trim_start().starts_with("stats socket") && !l.trim_start().starts_with("server "))
        .map(|l| if l.trim() == "bind :50051" { format!("    bind {listen}") } else { l.to_string() })
        .collect();
    assert_eq!(config.last().map(|l| l.trim()), Some("default-server inter 2s fall 2 rise 2"), "the backend section ends the file");
    for (i, (grpc, admin)) in backends.iter().enumerate() {
        config.push(format!("    server imgsvc{} {grpc} check port {}", i + 1, admin.port()));
    }
    config.join("\n") + "\n"
}

fn start_haproxy(haproxy: &Path, dir: &Path, backends: &[(SocketAddr, SocketAddr)]) -> (KillOnDrop, SocketAddr) {
    spawn_haproxy(haproxy, dir, |listen| test_config(listen, backends))
}

/// Starts haproxy with the configuration `config(listen)` makes for a free
/// loopback port (haproxy binds its own port: retried, bounded, should
/// another process grab it in between), and returns once it accepts there.
pub(crate) fn spawn_haproxy(haproxy: &Path, dir: &Path, config: impl Fn(SocketAddr) -> String) -> (KillOnDrop, SocketAddr) {
    for _ in 0..5 {
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(listen)).unwrap();
        let mut child = KillOnDrop::spawn(Command::new(haproxy).args(["-db", "-f"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break; // exited: the port was taken, try another
            }
            if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
                return (child, listen);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("haproxy did not start");
}

#[test]
fn shipped_config_is_valid_for_haproxy() {
    let Some(haproxy) = ensure_haproxy() else { return };
    let out = Command::new(haproxy).args(["-c", "-f", SHIPPED]).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carries_a_bounded_load_with_zero_errors_and_tenant_identity_end_to_end() {
    const CLIENTS: usize = 6;
    const PER_CLIENT: usize = 10;
    let Some(haproxy) = tokio::task::spawn_blocking(ensure_haproxy).await.unwrap() else { return };
    let pki = Pki::new(&["via-haproxy"]);
    let servers: Vec<ServerProcess> = (0..3).map(|_| ServerProcess::spawn(&pki)).collect();
    let backends: Vec<(SocketAddr, SocketAddr)> = servers.iter().map(|s| (s.addr, s.admin_addr)).collect();
    let dir = tempfile::tempdir().unwrap();
    let (_haproxy, front) = start_haproxy(&haproxy, dir.path(), &backends);

    // Six clients, six connections held open together: leastconn spreads them.
    let clients: Vec<Balancer> = (0..CLIENTS).map(|_| Balancer::new(vec![target_of(front)], pki.credentials("via-haproxy"))).collect();
    let ops = [Op::Rotate(QuarterTurns::Two)];
    let mut calls = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        calls.push(tokio::spawn(async move {
            for k in 0..PER_CLIENT {
                let data: Vec<u8> = (0..32 * 16).map(|i| (i + c * 7 + k) as u8).collect();
                let image = RawImage { format: PixelFormat::Gray8, width: 32, height: 16, data: Bytes::from(data) };
                let (out, _) = client.process(Api::V1, &image, &ops).await.map_err(|e| format!("client {c} call {k}: {e}"))?;
                if out != expected(&image, &ops) {
                    return Err(format!("client {c} call {k}: wrong image"));
                }
            }
            Ok::<_, String>(client)
        }));
    }
    let mut clients = Vec::new();
    for call in calls {
        clients.push(call.await.unwrap().unwrap());
    }

    // The servers saw the tenant from the client certificate, through haproxy.
    let per_server: Vec<f64> = tokio::task::spawn_blocking(move || {
        backends
            .iter()
            .map(|(_, admin)| {
                let (status, text) = http_get(*admin, "/metrics");
                assert_eq!(status, 200);
                let labels = [("tenant", "via-haproxy"), ("method", "imgsvc.v1.ImageService/Process"), ("code", "OK")];
                metric(&text, "imgsvc_requests_total", &labels).unwrap_or(0.0)
            })
            .collect()
    })
    .await
    .unwrap();
    assert_eq!(per_server.iter().sum::<f64>(), (CLIENTS * PER_CLIENT) as f64, "{per_server:?}");
    assert!(per_server.iter().all(|&n| n > 0.0), "every server took connections: {per_server:?}");
    drop(clients);

    // A certificate without tenant is refused by the server behind haproxy.
    let (cert, key) = pki.sign_custom(
        "no-tenant",
        vec![rcgen::SanType::DnsName("client.example".try_into().unwrap())],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let creds = imgsvc::tls::ClientCredentials::from_files(&pki.paths().ca_cert(), &cert, &key).unwrap();
    let channel = imgsvc::client::connect(&target_of(front), &creds).await.unwrap();
    let image = RawImage { format: PixelFormat::Gray8, width: 1, height: 1, data: Bytes::from_static(&[1]) };
    let err = imgsvc::client::process(channel, Api::V1, image, &ops, "localhost").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");
    drop(servers);
}
