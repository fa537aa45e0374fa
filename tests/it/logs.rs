//! Logs as operators and tracing systems meet them: the caller's W3C
//! `traceparent` shows up on the request's log lines, and a log pipe whose
//! reader went away does not break serving.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::nlimage::{NlImage, nl_image_service_client::NlImageServiceClient};

fn spawn_server(pki: &Pki, dir: &std::path::Path, log_format: &str) -> (KillOnDrop, u16, std::sync::mpsc::Receiver<String>) {
    let cfg = write_server_config(dir, pki, "");
    let mut child = KillOnDrop::spawn(
        Command::new(env!("CARGO_BIN_EXE_imgsvc-server"))
            .args(["--config", cfg.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("IMGSVC_LOG__FORMAT", log_format)
            .stderr(Stdio::piped()),
    );
    let rx = forward_lines(child.stderr.take().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).expect("server starts");
        if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
            let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            return (child, port.parse().unwrap(), rx);
        }
    }
}

async fn call(pki: &Pki, port: u16, traceparent: Option<&str>) -> Result<(), tonic::Status> {
    let channel = imgsvc::client::connect(&target(port), &pki.credentials("alpha")).await.unwrap();
    let mut request = tonic::Request::new(NlImage { color: false, width: 2, height: 2, data: Bytes::from_static(&[1, 2, 3, 4]) });
    if let Some(tp) = traceparent {
        request.metadata_mut().insert("traceparent", tp.parse().unwrap());
    }
    NlImageServiceClient::new(channel).mean_filter(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_puts_the_callers_trace_id_on_the_request_log_line() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let (child, port, lines) = spawn_server(&pki, dir.path(), "json");
    call(&pki, port, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).await.unwrap();
    call(&pki, port, Some("00-not-a-valid-traceparent")).await.unwrap();
    drop(child); // killed: the log ends
    let finished: Vec<String> = lines.iter().take(200).filter(|l| l.contains("request finished")).collect();
    assert_eq!(finished.len(), 2, "{finished:?}");
    assert!(finished[0].contains(r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736""#), "{}", finished[0]);
    assert!(finished[0].contains(r#""parent_span_id":"00f067aa0ba902b7""#), "{}", finished[0]);
    assert!(finished[0].contains(r#""tenant":"alpha""#), "{}", finished[0]);
    assert!(!finished[1].contains("trace_id"), "an invalid traceparent is ignored: {}", finished[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_pipe_does_not_break_requests() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port, lines) = spawn_server(&pki, dir.path(), "pretty");
    drop(lines); // the reader thread exits on the next line and closes the pipe
    for _ in 0..3 {
        call(&pki, port, None).await.unwrap();
    }
    assert_eq!(child.try_wait().unwrap(), None, "the server is still running");
}
