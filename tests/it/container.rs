//! The container image `deploy/container/build.sh` makes, run the way the
//! Kubernetes Deployment runs it: the image named in deployment.yaml is
//! built (with podman: FROM scratch, no registry), run with the ConfigMap's
//! config and a certificate Secret mounted read-only, a read-only root
//! filesystem, no capabilities, as uid/gid 10001; the host's imgsvc-client
//! is served over mTLS; SIGTERM drains the requests in flight and exits 0.
//!
//! podman and runc are installed with apt-get when missing (CI runs as
//! root); without them and without apt-get the test fails, saying so. On
//! these machines podman needs vfs storage, runc, cgroupfs and no default
//! ulimits (see /work/shared/CRATES.md, trap 7): set below, in a private
//! storage directory that the test removes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;
use imgsvc::proto::v1::image_service_client::ImageServiceClient;
use serde::Deserialize;

fn manifest(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// podman and runc, from Debian's packages when missing.
fn ensure_podman() {
    let runs = || command_succeeds("podman", &["--version"]) && command_succeeds("runc", &["--version"]);
    if runs() {
        return;
    }
    assert!(
        apt_get_available(),
        "this test needs podman and runc (Debian packages podman, runc), which are not installed, and apt-get is not available to install them"
    );
    apt_get_install("podman");
    apt_get_install("runc");
    assert!(runs(), "podman and runc do not run after apt-get install");
}

/// podman's state for this test: vfs storage under `dir`, runc, cgroupfs,
/// no default ulimits (trap 7 of CRATES.md).
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                dir.path().join("graph").display(),
                dir.path().join("run").display()
            ),
        )
        .unwrap();
        Self { dir }
    }

    /// Environment that points podman (and build.sh's podman) at this state.
    fn env(&self) -> [(&'static str, PathBuf); 2] {
        [("CONTAINERS_CONF", self.dir.path().join("containers.conf")), ("CONTAINERS_STORAGE_CONF", self.dir.path().join("storage.conf"))]
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.envs(self.env())
            .args(["--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .arg("--root")
            .arg(self.dir.path().join("graph"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"));
        cmd
    }

    fn output(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers left by a failed test, then their storage.
        let _ = self.command().args(["rm", "--all", "--force"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

fn yaml_docs(path: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(manifest(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect()
}

/// The directory as the Deployment mounts it: root-owned files readable by
/// group 10001 (the pod's fsGroup), mode 0440, in a directory others may
/// enter.
fn mount_dir(dir: &Path, files: &[(&str, Vec<u8>)]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, contents) in files {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::os::unix::fs::chown(&path, Some(0), Some(10001)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_from_build_script_serves_mtls_as_uid_10001_read_only_and_drains_on_sigterm() {
    ensure_podman();
    let podman = Podman::new();

    // Build: the image the Deployment names, from the binary the tests run.
    let deployment = yaml_docs("deploy/kubernetes/deployment.yaml").remove(0);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let image = container["image"].as_str().unwrap();
    let binary = env!("CARGO_BIN_EXE_imgsvc-server");
    let started = Instant::now();
    let built = Command::new(manifest("deploy/container/build.sh"))
        .args(["--binary", binary])
        .envs(podman.env())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(built.status.success(), "build.sh failed");
    let build_time = started.elapsed();
    let said = String::from_utf8(built.stdout).unwrap();
    assert_eq!(said.lines().last(), Some(image), "build.sh names the image it built");
    // "packaged imgsvc-server N bytes, everything M bytes"
    let packaged: u64 = said
        .lines()
        .find_map(|l| l.strip_prefix("packaged imgsvc-server ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("build.sh reports the binary it packaged: {said}"));

    let image_bytes: u64 = podman.output(&["image", "inspect", "--format", "{{.Size}}", image]).parse().unwrap();
    let cargo_bytes = std::fs::metadata(binary).unwrap().len();
    eprintln!(
        "image {image}: {:.1} MiB; the binary in it {:.1} MiB ({:.2}x); cargo's binary (with line tables) {:.1} MiB; built in {:.1} s",
        image_bytes as f64 / MIB as f64,
        packaged as f64 / MIB as f64,
        image_bytes as f64 / packaged as f64,
        cargo_bytes as f64 / MIB as f64,
        build_time.as_secs_f64()
    );
    assert!(image_bytes < 2 * packaged, "image {image_bytes} B is not under twice its binary's {packaged} B");
    let user = podman.output(&["image", "inspect", "--format", "{{.Config.User}}", image]);
    assert_eq!(user, "10001:10001");

    // Mounts as in the manifests: the ConfigMap's imgsvc.toml, the Secret's
    // tls.crt, tls.key and ca.crt.
    let config_map = yaml_docs("deploy/kubernetes/configmap.yaml").remove(0);
    let toml = config_map["data"]["imgsvc.toml"].as_str().unwrap().to_string();
    let source = imgsvc::config::ConfigSource::Inline { name: "configmap.yaml".into(), toml: toml.clone() };
    let settings = imgsvc::config::Settings::load_with_env(&source, []).unwrap();
    let pki = Pki::with_trust_domain(settings.tls.trust_domain.as_str(), &["dev"]);
    let p = pki.paths();
    let mounts = tempfile::tempdir().unwrap();
    std::fs::set_permissions(mounts.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (config_dir, tls_dir) = (mounts.path().join("config"), mounts.path().join("tls"));
    mount_dir(&config_dir, &[("imgsvc.toml", toml.into_bytes())]);
    let read = |path: PathBuf| std::fs::read(path).unwrap();
    mount_dir(&tls_dir, &[("tls.crt", read(p.server_cert())), ("tls.key", read(p.server_key())), ("ca.crt", read(p.ca_cert()))]);
    let mount_path = |name: &str| -> String {
        let mounts = container["volumeMounts"].as_sequence().unwrap();
        mounts.iter().find(|m| m["name"] == name).unwrap()["mountPath"].as_str().unwrap().to_string()
    };
    let args: Vec<String> = container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();

    let name = format!("imgsvc-test-{}", std::process::id());
    let mut run = podman.command();
    run.args(["run", "--rm", "--name", &name, "--network", "host"])
        // readOnlyRootFilesystem, capabilities dropped, no privilege escalation.
        .args(["--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .arg("-v")
        .arg(format!("{}:{}:ro", config_dir.display(), mount_path("config")))
        .arg("-v")
        .arg(format!("{}:{}:ro", tls_dir.display(), mount_path("tls")))
        // Loopback, free ports, a tenant table-less dev tenant, one worker.
        .args(["-e", "IMGSVC_ADMIN__LISTEN=127.0.0.1:0", "-e", "IMGSVC_TENANCY__UNKNOWN_TENANTS=defaults"])
        .args(["-e", "IMGSVC_SERVER__WORKER_THREADS=1", "-e", "IMGSVC_LIMITS__MAX_OPERATIONS=300"])
        .arg(image)
        .args(&args)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop::spawn(&mut run);
    let logs = forward_lines(child.stderr.take().unwrap());
    let after = |line: &str, marker: &str| -> Option<SocketAddr> { line.split(marker).nth(1)?.split([' ', ')', '"']).next()?.parse().ok() };
    let (mut addr, mut admin) = (None, None);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while addr.is_none() || admin.is_none() {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| panic!("the container reports its addresses within 60 s ({e}); it said {seen:#?}"));
        addr = addr.or_else(|| after(&line, "listening on "));
        admin = admin.or_else(|| after(&line, "admin on http://"));
        seen.push(line);
    }
    let (addr, admin) = (addr.unwrap(), admin.unwrap());

    // The kernel's view of the server process: uid and gid 10001.
    let pid = podman.output(&["inspect", "--format", "{{.State.Pid}}", &name]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status.lines().find(|l| l.starts_with(key)).unwrap().split_whitespace().skip(1).collect();
        assert_eq!(ids, ["10001"; 4], "{key}");
    }

    // A real request from the host's client binary, over mutual TLS.
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("rotated.png");
    let client = run_client_as(
        &pki,
        "dev",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &addr.port().to_string(),
            "--input",
            fixture("camera.png").to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--rotate",
            "NINETY_DEG",
        ],
    );
    assert!(client.status.success(), "{}", stderr(&client));
    let (input, rotated) =
        (imgsvc::client::image_io::read_image(&fixture("camera.png")).unwrap(), imgsvc::client::image_io::read_image(&output).unwrap());
    assert_eq!((rotated.width, rotated.height), (input.height, input.width));

    // SIGTERM with two slow requests in flight: both complete, exit 0.
    let mut calls = Vec::new();
    for fill in [3u8, 7] {
        let channel = imgsvc::client::connect(&target_of(addr), &pki.credentials("dev")).await.unwrap();
        calls.push(tokio::spawn(async move { ImageServiceClient::new(channel).process(slow_v1_request(fill, 300)).await }));
    }
    let in_flight = [("tenant", "dev"), ("method", "imgsvc.v1.ImageService/Process")];
    let all_in = until_metric(admin, "imgsvc_in_flight_requests", &in_flight, 2.0, Duration::from_secs(30)).await;
    assert_eq!(all_in, Some(2.0));
    podman.output(&["kill", "--signal", "TERM", &name]);
    for (call, fill) in calls.into_iter().zip([3u8, 7]) {
        let image = call.await.unwrap().expect("a request in flight at SIGTERM completes").into_inner().image.unwrap();
        assert!(image.data.iter().all(|&b| b == fill), "request {fill}");
    }
    let exited = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        (status, logs.iter().collect::<Vec<String>>())
    });
    let (status, rest) = tokio::time::timeout(Duration::from_secs(60), exited).await.expect("the container exits").unwrap();
    assert_eq!(status.code(), Some(0), "{rest:#?}");
    assert!(rest.iter().any(|l| l.contains("shutdown complete")), "{rest:#?}");
    assert!(!rest.iter().any(|l| l.contains("drain deadline passed")), "{rest:#?}");
}
