//! imgsvc-client as a user meets it: usage errors, help, where credentials
//! come from, and that a failure never leaves a (partial) output file.

use std::path::Path;

use crate::common::*;

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn no_operation_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_client(&["--input", "a.png", "--output", dir.path().join("b.png").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("nothing to do: give --rotate ROTATION and/or --mean"), "{}", stderr(&out));
}

#[test]
fn unknown_rotation_value_is_a_usage_error_listing_the_values() {
    let out = run_client(&["--input", "a.png", "--output", "b.png", "--rotate", "NINETY"]);
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(err.contains("NINETY_DEG") && err.contains("TWO_SEVENTY_DEG"), "{err}");
}

#[test]
fn help_documents_every_flag_with_an_example() {
    let out = run_client(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--host",
        "--port",
        "--input",
        "--output",
        "--rotate",
        "--mean",
        "--ca",
        "--cert",
        "--key",
        "--server-name",
        "--config",
        "--api",
        "--timeout",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
    assert!(help.contains("Examples:") && help.contains("--rotate NINETY_DEG --mean"), "{help}");
}

#[test]
fn missing_credentials_say_which_and_where_the_client_looked() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_client(&["--input", "a.png", "--output", dir.path().join("b.png").to_str().unwrap(), "--mean", "--ca", "ca.pem"]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(err.contains("no client certificate given: looked for --cert, cert in "), "{err}");
    assert!(err.contains("imgsvc/client.toml") && err.contains("IMGSVC_CERT environment variable"), "{err}");
}

#[test]
fn credentials_from_a_client_config_file_and_from_the_environment() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki.client_files("alpha");
    let cfg = dir.path().join("client.toml");
    std::fs::write(
        &cfg,
        format!(
            "host = \"127.0.0.1\"\nport = {}\nserver_name = \"localhost\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            server.port(),
            ca.display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let out_png = dir.path().join("from-config.png");
    let out = run_client(&[
        "--config",
        cfg.to_str().unwrap(),
        "--input",
        fixture("camera.png").to_str().unwrap(),
        "--output",
        out_png.to_str().unwrap(),
        "--mean",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out_png.exists());

    let out_png = dir.path().join("from-env.png");
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imgsvc-client"))
        .args(["--host", "127.0.0.1", "--port", &server.port().to_string(), "--server-name", "localhost"])
        .args(["--input", fixture("camera.png").to_str().unwrap(), "--output", out_png.to_str().unwrap(), "--rotate", "NINETY_DEG"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("IMGSVC_CA", &ca)
        .env("IMGSVC_CERT", &cert)
        .env("IMGSVC_KEY", &key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out_png.exists());
}

#[test]
fn unreadable_input_exits_65_and_writes_nothing() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-an-image.png");
    std::fs::write(&bogus, b"this is not a PNG").unwrap();
    let mut args = client_args(&server, &pki, "alpha");
    args.extend(["--input", bogus.to_str().unwrap(), "--output", dir.path().join("out.png").to_str().unwrap(), "--mean"].map(String::from));
    let out = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains(&format!("cannot read image {}", bogus.display())), "{}", stderr(&out));
    assert_eq!(files_in(dir.path()), ["not-an-image.png"]);
}

#[test]
fn unsupported_output_extension_is_refused_before_any_request() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    // Port 9 (discard) has no server: the error must come before connecting.
    let out = run_client_as(
        &pki,
        "alpha",
        &[
            "--port",
            "9",
            "--input",
            fixture("camera.png").to_str().unwrap(),
            "--output",
            dir.path().join("out.gif").to_str().unwrap(),
            "--mean",
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("unsupported output extension \"gif\""), "{}", stderr(&out));
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn server_refusal_leaves_no_output_file() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_image_pixels = 1000);
    let dir = tempfile::tempdir().unwrap();
    let out_png = dir.path().join("out.png");
    std::fs::write(&out_png, b"previous result").unwrap();
    let mut args = client_args(&server, &pki, "alpha");
    args.extend(["--input", fixture("camera.png").to_str().unwrap(), "--output", out_png.to_str().unwrap(), "--mean"].map(String::from));
    let out = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("ResourceExhausted: image has 262144 pixels (512x512), over the limit of 1000"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&out_png).unwrap(), b"previous result", "an existing file is untouched");
    assert_eq!(files_in(dir.path()), ["out.png"], "no temporary files left");
}

#[test]
fn unreachable_server_exits_69_with_an_explanation() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let (_reserved, refusing) = refusing_port();
    let free_port = refusing.port();
    let out = run_client_as(
        &pki,
        "alpha",
        &[
            "--port",
            &free_port.to_string(),
            "--input",
            fixture("camera.png").to_str().unwrap(),
            "--output",
            dir.path().join("out.png").to_str().unwrap(),
            "--mean",
        ],
    );
    assert_eq!(out.status.code(), Some(69));
    assert!(stderr(&out).contains("nothing accepts connections at that address"), "{}", stderr(&out));
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn refused_client_certificate_is_explained_by_the_cli() {
    let pki = Pki::new(&["alpha"]);
    let other = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = other.client_files("alpha");
    let out = run_client(&[
        "--port",
        &server.port().to_string(),
        "--server-name",
        "localhost",
        "--ca",
        pki.paths().ca_cert().to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--input",
        fixture("camera.png").to_str().unwrap(),
        "--output",
        dir.path().join("out.png").to_str().unwrap(),
        "--mean",
    ]);
    assert_eq!(out.status.code(), Some(69));
    assert!(stderr(&out).contains("the server refused the client certificate"), "{}", stderr(&out));
}

#[test]
fn version_prints_the_package_version() {
    let out = run_client(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("imgsvc-client {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn completions_subcommand_prints_a_script_for_each_shell() {
    for (shell, marker) in
        [("bash", "complete -F _imgsvc__client"), ("zsh", "#compdef imgsvc-client"), ("fish", "complete -c imgsvc-client")]
    {
        let out = run_client(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker) && script.contains("continue-on-error"), "{shell}: {script}");
    }
    let out = run_client(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn help_documents_the_format_and_batch_flags() {
    let out = run_client(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--format", "--quality", "--page", "--jobs", "--overwrite", "--continue-on-error", "completions"] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
}
