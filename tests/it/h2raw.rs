//! A raw HTTP/2 gRPC client for attack tests: the `h2` crate over a
//! mutual-TLS stream, able to send what a normal gRPC client never would —
//! a message prefix and no body, part of a message and then silence, many
//! streams on one connection, compressed messages of any content, no reads.
//! And the measuring side of such tests: the server's held-bytes gauges
//! sampled for their peak while an attack runs, and their return to zero.
//!
//! The basic steps ([`h2_connect`], [`start_call`], [`grpc_message`],
//! [`send_flow_controlled`]) live in [`crate::common`] and are re-exported
//! here, so an attack test needs only `use crate::h2raw::*`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};

use crate::common::{MIB, Pki, ServerProcess, metric, scrape, tls_connect};
pub use crate::common::{grpc_message, h2_connect, send_flow_controlled, start_call};

/// The stages of `imgsvc_memory_held_bytes{stage}`.
pub const STAGES: [&str; 4] = ["receiving", "queued", "processing", "sending"];

/// An HTTP/2 connection to `addr` as `tenant` with the client's settings
/// set by `settings` (e.g. a small initial window, so that the server's
/// answers are not read), driven on its own task.
pub async fn h2_connect_with(
    addr: SocketAddr,
    pki: &Pki,
    tenant: &str,
    settings: impl FnOnce(&mut h2::client::Builder),
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tls = tls_connect(addr, pki, tenant).await;
    let mut builder = h2::client::Builder::new();
    settings(&mut builder);
    let (send, connection) = builder.handshake(tls).await.unwrap();
    (
        send,
        tokio::spawn(async move {
            let _ = connection.await;
        }),
    )
}

/// Starts a gRPC call to `path` with extra request headers (e.g.
/// `("grpc-encoding", "gzip")`): its headers are sent, the body is open.
pub async fn start_call_with(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    headers: &[(&str, &str)],
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send.clone().ready().await.unwrap().send_request(request.body(()).unwrap(), false).unwrap()
}

/// A gRPC message prefix: `compressed` flag and declared length, no bytes.
pub fn grpc_prefix(compressed: bool, length: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(5);
    out.put_u8(compressed.into());
    out.put_u32(length);
    out.freeze()
}

/// A gRPC length-prefixed message of `payload` as it is (already encoded,
/// or compressed: then `compressed` sets the flag).
pub fn grpc_frame(compressed: bool, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(compressed.into());
    out.put_u32(u32::try_from(payload.len()).unwrap());
    out.put_slice(payload);
    out.freeze()
}

/// Sends as much of `data` as flow control allows within `within`, and
/// returns how many bytes went (the stream stays open). A reset stream (a
/// refusal) ends it early.
pub async fn send_what_fits(stream: &mut h2::SendStream<Bytes>, mut data: Bytes, within: Duration) -> usize {
    let total = data.len();
    let deadline = tokio::time::Instant::now() + within;
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| stream.poll_capacity(cx))).await {
            Ok(Some(Ok(granted))) => granted,
            _ => break,
        };
        if stream.send_data(data.split_to(granted.min(data.len())), false).is_err() {
            break;
        }
    }
    total - data.len()
}

/// The whole answer of a call: its status (from the trailers, or the
/// headers of a trailers-only answer) and its body bytes.
pub async fn grpc_answer(response: h2::client::ResponseFuture) -> (tonic::Status, Vec<u8>) {
    grpc_answer_of(response.await.unwrap()).await
}

/// [`grpc_answer`] of a response whose headers have arrived.
pub async fn grpc_answer_of(response: tonic::codegen::http::Response<h2::RecvStream>) -> (tonic::Status, Vec<u8>) {
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return (status, Vec::new());
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (tonic::Status::from_header_map(&trailers).expect("a grpc-status"), data)
}

/// The sum of `imgsvc_memory_held_bytes` over its stages in a scrape.
pub fn held_bytes(text: &str) -> f64 {
    STAGES.iter().filter_map(|stage| metric(text, "imgsvc_memory_held_bytes", &[("stage", stage)])).sum()
}

/// Samples the server's held bytes (all stages) every 20 ms on its own
/// thread until [`HeldSampler::stop`]: the accounting's peak during an
/// attack, to hold RSS growth against.
pub struct HeldSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl HeldSampler {
    pub fn start(admin: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0.0f64;
                loop {
                    peak = peak.max(held_bytes(&scrape(admin)));
                    if stop.load(Ordering::Relaxed) {
                        return peak;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self { stop, thread }
    }

    /// The peak of the held bytes seen, in bytes (one last sample included).
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap() as u64
    }
}

/// Waits (at most `within`) until every `imgsvc_memory_held_bytes` stage
/// reads 0; returns the last sum read.
pub async fn held_back_to_zero(admin: SocketAddr, within: Duration) -> f64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let held = held_bytes(&scrape(admin));
        if held == 0.0 || tokio::time::Instant::now() >= deadline {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resets the server's peak resident memory (VmHWM) to its RSS now
/// (`/proc/PID/clear_refs`, Linux 4.0+), so that a later peak is the
/// attack's, not the start-up's.
pub fn reset_peak_rss(server: &ServerProcess) {
    std::fs::write(format!("/proc/{}/clear_refs", server.pid()), "5").expect("resetting VmHWM through /proc/PID/clear_refs");
}

/// Asserts RSS growth over `idle` within what the accounting held at its
/// peak plus `overhead`, naming the figures (`what` says which attack).
pub fn assert_rss_within(what: &str, server: &ServerProcess, idle_rss: u64, held_peak: u64, overhead: u64) {
    let peak = server.usage().peak_rss;
    let growth = peak.saturating_sub(idle_rss);
    eprintln!(
        "{what}: idle RSS {} MiB, peak {} MiB (+{} MiB); accounting peak {} MiB; allowed overhead {} MiB",
        idle_rss / MIB,
        peak / MIB,
        growth / MIB,
        held_peak / MIB,
        overhead / MIB
    );
    assert!(
        growth <= held_peak + overhead,
        "{what}: RSS grew {} MiB over idle, over the accounting's peak {} MiB + {} MiB overhead",
        growth / MIB,
        held_peak / MIB,
        overhead / MIB
    );
}
