//! The server's config as operators meet it: the binary, real files,
//! environment overrides, --check-config, and the dev quickstart.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::common::*;

fn server_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgsvc-server"));
    cmd.current_dir(dir).env_remove("RUST_LOG").env("NO_COLOR", "1").env("IMGSVC_ADMIN__LISTEN", "127.0.0.1:0");
    cmd
}

fn write_config(dir: &Path, pki: &Pki, extra: &str) -> std::path::PathBuf {
    let p = pki.paths();
    let text = format!(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\n{extra}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\ntrust_domain = \"{}\"\n",
        p.server_cert().display(),
        p.server_key().display(),
        p.ca_cert().display(),
        TRUST_DOMAIN
    );
    let path = dir.join("imgsvc.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits (bounded) for the "listening on" line and returns the port.
fn wait_listening(child: &mut Child) -> (u16, mpsc::Receiver<String>) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
        if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
            let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            return (port.parse().unwrap(), rx);
        }
    }
    panic!("server did not report listening within 60 s");
}

fn stop(mut child: KillOnDrop) -> std::process::ExitStatus {
    send_signal(child.id(), "TERM");
    child.wait().unwrap()
}

#[test]
fn environment_variable_overrides_the_file() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    // The file names a port that is taken; the override must win.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = write_config(dir.path(), &pki, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("port = 0", &format!("port = {}", taken.local_addr().unwrap().port()));
    std::fs::write(&cfg, text).unwrap();
    let mut child = KillOnDrop::spawn(
        server_cmd(dir.path()).args(["--config", cfg.to_str().unwrap()]).env("IMGSVC_SERVER__PORT", "0").stderr(Stdio::piped()),
    );
    let (port, _lines) = wait_listening(&mut child);
    assert_ne!(port, taken.local_addr().unwrap().port());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(imgsvc::client::connect(&target(port), &pki.credentials("alpha"))).unwrap();
    assert!(stop(child).success());
}

#[test]
fn unknown_key_is_an_error_naming_file_and_key() {
    let pki = Pki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &pki, "worker_thread = 4");
    let out = server_cmd(dir.path()).args(["--check-config", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(cfg.to_str().unwrap()) && err.contains("worker_thread"), "{err}");
    // File, key and problem, each said once.
    let said =
        format!("imgsvc-server: error: config {}: key `server`: unknown field `worker_thread`, expected one of `host`", cfg.display());
    assert!(err.starts_with(&said), "{err}");
    assert_eq!((err.matches(cfg.to_str().unwrap()).count(), err.matches("unknown field").count()), (1, 1), "said once: {err}");
}

#[test]
fn invalid_value_names_the_key_and_exits_78_before_binding() {
    let pki = Pki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &pki, "drain_timeout_secs = 99999");
    let out = server_cmd(dir.path()).args(["--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `server.drain_timeout_secs`: 99999 is out of range 0..=3600"), "{err}");
}

#[test]
fn check_config_catches_a_missing_certificate_file() {
    let pki = Pki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::remove_file(pki.paths().server_cert()).unwrap();
    let cfg = write_config(dir.path(), &pki, "");
    let out = server_cmd(dir.path()).args(["--check-config", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot read server certificate {}", pki.paths().server_cert().display())), "{err}");
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn check_config_catches_a_missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = server_cmd(dir.path()).args(["--check-config", "--config", "/nonexistent/imgsvc.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/imgsvc.toml"));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "imgsvc-server: error: cannot read config /nonexistent/imgsvc.toml: No such file or directory (os error 2)\n"
    );
}

#[test]
fn check_config_accepts_a_valid_config_without_binding() {
    let pki = Pki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = write_config(dir.path(), &pki, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("port = 0", &format!("port = {}", taken.local_addr().unwrap().port()));
    std::fs::write(&cfg, text).unwrap();
    let out = server_cmd(dir.path()).args(["--check-config", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("config OK"));
}

#[test]
fn dev_quickstart_generates_certificates_and_serves_the_printed_client_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop::spawn(server_cmd(dir.path()).env("IMGSVC_SERVER__PORT", "0").stderr(Stdio::piped()));
    let (port, _lines) = wait_listening(&mut child);
    let certs = dir.path().join("certs/dev");
    for key in ["ca-key.pem", "server-key.pem", "client-dev-key.pem"] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(certs.join(key)).unwrap().permissions().mode() & 0o777, 0o600, "{key}");
    }
    let out_png = dir.path().join("out.png");
    let result = run_client(&[
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--ca",
        certs.join("ca.pem").to_str().unwrap(),
        "--cert",
        certs.join("client-dev.pem").to_str().unwrap(),
        "--key",
        certs.join("client-dev-key.pem").to_str().unwrap(),
        "--input",
        fixture("camera.png").to_str().unwrap(),
        "--output",
        out_png.to_str().unwrap(),
        "--rotate",
        "NINETY_DEG",
        "--mean",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(out_png.exists());
    let status = stop(child);
    assert!(status.success(), "{status:?}: {:?}", _lines.try_iter().collect::<Vec<_>>());

    // A second start reuses the PKI it made.
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let mut child = KillOnDrop::spawn(server_cmd(dir.path()).env("IMGSVC_SERVER__PORT", "0").stderr(Stdio::piped()));
    let (_, lines) = wait_listening(&mut child);
    let status = stop(child);
    assert!(status.success(), "{status:?}: {:?}", lines.try_iter().collect::<Vec<_>>());
    assert_eq!(std::fs::read(certs.join("ca.pem")).unwrap(), ca);
}

#[test]
fn check_config_catches_a_key_that_does_not_match_the_certificate() {
    let pki = Pki::new(&[]);
    let other = Pki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &pki, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&pki.paths().server_key().display().to_string(), &other.paths().server_key().display().to_string());
    std::fs::write(&cfg, text).unwrap();
    let out = server_cmd(dir.path()).args(["--check-config", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not form a usable identity") && err.contains("KeyMismatch"), "{err}");
}

/// Default builds have no OTLP exporter: a config asking for one must say
/// so at once rather than start without the traces it asked for.
#[cfg(not(feature = "otlp"))]
#[test]
fn otlp_endpoint_without_the_otlp_feature_names_file_key_and_fix() {
    let pki = Pki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &pki, "");
    let text = std::fs::read_to_string(&cfg).unwrap() + "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n";
    std::fs::write(&cfg, text).unwrap();
    let expected = format!(
        "imgsvc-server: error: config {}: key `telemetry.otlp_endpoint`: is set, but this imgsvc-server was built without OTLP export: \
         rebuild with --features otlp (cargo build --release --locked --features otlp), or remove the key\n",
        cfg.display()
    );
    for check in [true, false] {
        let mut cmd = server_cmd(dir.path());
        if check {
            cmd.arg("--check-config");
        }
        let out = cmd.args(["--config", cfg.to_str().unwrap()]).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "--check-config {check}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected, "--check-config {check}");
    }
}
