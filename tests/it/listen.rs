//! `--host` really binds: IPv4, IPv6, and every address a name resolves to.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use crate::common::*;

fn ipv6_loopback_available() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

fn start_binary(pki: &Pki, host: &str) -> (KillOnDrop, Vec<String>) {
    let p = pki.paths();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("imgsvc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n",
            p.server_cert().display(),
            p.server_key().display(),
            p.ca_cert().display()
        ),
    )
    .unwrap();
    let mut child = KillOnDrop::spawn(
        Command::new(env!("CARGO_BIN_EXE_imgsvc-server"))
            .args(["--config", cfg.to_str().unwrap(), "--host", host, "--port", "0"])
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("IMGSVC_ADMIN__LISTEN", "127.0.0.1:0")
            .stderr(Stdio::piped()),
    );
    let stderr = child.stderr.take().unwrap();
    let line = BufReader::new(stderr).lines().map_while(Result::ok).take(50).find(|l| l.contains("listening on")).expect("server started");
    // listen=["127.0.0.1:1234", "[::1]:5678"]
    let list = line.split("listen=[").nth(1).unwrap().split(']').next().unwrap().to_string();
    let list = if list.contains("[::") { line.split("listen=[").nth(1).unwrap().rsplit_once("] ").unwrap().0.to_string() } else { list };
    let addrs = list.split(", ").map(|a| a.trim_matches('"').to_string()).collect();
    (child, addrs)
}

fn connect_ok(pki: &Pki, host: &str, port: u16) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut t = target(port);
    t.host = host.into();
    rt.block_on(imgsvc::client::connect(&t, &pki.credentials("alpha"))).unwrap();
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn binds_ipv6_loopback_when_asked() {
    if !ipv6_loopback_available() {
        eprintln!("skipping: no IPv6 loopback on this machine");
        return;
    }
    let pki = Pki::new(&["alpha"]);
    let (_child, addrs) = start_binary(&pki, "::1");
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert!(addrs[0].starts_with("[::1]:"), "{addrs:?}");
    connect_ok(&pki, "::1", port_of(&addrs[0]));
}

#[test]
fn binds_ipv4_loopback_when_asked() {
    let pki = Pki::new(&["alpha"]);
    let (_child, addrs) = start_binary(&pki, "127.0.0.1");
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    connect_ok(&pki, "127.0.0.1", port_of(&addrs[0]));
}

#[tokio::test]
async fn a_name_binds_every_address_it_resolves_to() {
    let resolved: std::collections::BTreeSet<_> = tokio::net::lookup_host(("localhost", 0)).await.unwrap().map(|a| a.ip()).collect();
    let listeners = imgsvc::serving::server::bind("localhost", 0).await.unwrap();
    let bound: std::collections::BTreeSet<_> = listeners.iter().map(|l| l.local_addr().unwrap().ip()).collect();
    assert_eq!(bound, resolved);
}

#[tokio::test]
async fn an_unresolvable_host_is_an_error_naming_it() {
    let err = imgsvc::serving::server::bind("no-such-host.invalid", 0).await.unwrap_err().to_string();
    assert!(err.contains("no-such-host.invalid"), "{err}");
}
