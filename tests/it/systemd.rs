//! systemd's notification protocol against a real unix datagram socket:
//! `READY=1` only once the gRPC port accepts, `WATCHDOG=1` pings when
//! `WATCHDOG_USEC` is set, `STOPPING=1` on SIGTERM.

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;

/// Receives datagrams (bounded in count and time) until one satisfies
/// `wanted`; returns it and every message seen before it.
fn receive_until(socket: &UnixDatagram, wanted: impl Fn(&str) -> bool) -> (String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching notification within 60 s; got {seen:?}");
        socket.set_read_timeout(Some(left)).unwrap();
        let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no notification ({e}); got {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if wanted(&msg) {
            return (msg, seen);
        }
        seen.push(msg);
    }
    panic!("no matching notification in 1000 messages: {seen:?}");
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// Starts the daemon on `cfg` with `NOTIFY_SOCKET` set to a fresh socket in
/// `dir`, and `WATCHDOG_USEC` if given. Returns the child and the socket.
fn spawn_notifying(cfg: &std::path::Path, dir: &std::path::Path, watchdog_usec: Option<&str>) -> (KillOnDrop, UnixDatagram) {
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgsvc-server"));
    cmd.args(["--config", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env_remove("WATCHDOG_PID")
        .env_remove("WATCHDOG_USEC")
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null());
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec);
    }
    (KillOnDrop::spawn(&mut cmd), socket)
}

#[test]
fn notifies_ready_after_the_port_accepts_watchdog_pings_and_stopping_on_sigterm() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_server_config(dir.path(), &pki, "");
    let (mut child, socket) = spawn_notifying(&cfg, dir.path(), Some("400000"));

    let (ready, before) = receive_until(&socket, |m| has_line(m, "READY=1"));
    assert!(before.iter().all(|m| !has_line(m, "STOPPING=1")), "{before:?}");
    // STATUS=serving gRPC (mTLS) on 127.0.0.1:PORT; admin on 127.0.0.1:PORT
    let status = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).expect("a STATUS line");
    let grpc: std::net::SocketAddr = status
        .strip_prefix("serving gRPC (mTLS) on ")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("{status}"))
        .parse()
        .unwrap();
    let admin: std::net::SocketAddr = status.rsplit("admin on ").next().unwrap().parse().unwrap();
    // READY=1 means the port accepts now, and readiness agrees.
    std::net::TcpStream::connect_timeout(&grpc, Duration::from_secs(5)).expect("gRPC port accepts once READY=1 is sent");
    assert_eq!(http_get(admin, "/readyz"), (200, "serving\n".to_string()));

    // Half of WATCHDOG_USEC: 200 ms.
    let (watchdog, _) = receive_until(&socket, |m| has_line(m, "WATCHDOG=1"));
    assert_eq!(watchdog, "WATCHDOG=1\n");

    send_signal(child.id(), "TERM");
    let (stopping, _) = receive_until(&socket, |m| has_line(m, "STOPPING=1"));
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn check_config_sends_no_notification() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_server_config(dir.path(), &pki, "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imgsvc-server"))
        .args(["--check-config", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    assert_eq!(socket.recv(&mut buf).map_err(|e| e.kind()), Err(std::io::ErrorKind::WouldBlock));
}

#[test]
fn sighup_reload_is_bracketed_by_reloading_then_ready_even_when_it_fails() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_server_config(dir.path(), &pki, "");
    let (mut child, socket) = spawn_notifying(&cfg, dir.path(), None);
    receive_until(&socket, |m| has_line(m, "READY=1"));
    let hup = || send_signal(child.id(), "HUP");

    // A good reload.
    hup();
    let (reloading, _) = receive_until(&socket, |m| has_line(m, "RELOADING=1"));
    // systemd needs the monotonic time of the reload with RELOADING=1.
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading}");
    let (ready, before) = receive_until(&socket, |m| has_line(m, "READY=1"));
    assert!(ready.lines().any(|l| l.starts_with("STATUS=serving gRPC")), "{ready}");
    assert!(before.iter().all(|m| !has_line(m, "STOPPING=1")), "{before:?}");

    // A failing reload still ends in READY=1: the old config keeps serving.
    std::fs::write(&cfg, "[server]\nno_such_key = 1\n").unwrap();
    hup();
    receive_until(&socket, |m| has_line(m, "RELOADING=1"));
    receive_until(&socket, |m| has_line(m, "READY=1"));

    send_signal(child.id(), "TERM");
    receive_until(&socket, |m| has_line(m, "STOPPING=1"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
