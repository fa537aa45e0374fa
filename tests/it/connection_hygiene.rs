//! Connections that do nothing do not stay forever: a client that never
//! finishes the TLS handshake is closed after `tls.handshake_timeout_secs`;
//! one that finishes it but sends nothing, or opens HTTP/2 and makes no
//! call (answering PINGs), after `server.idle_timeout_secs`; a peer that
//! stops answering HTTP/2 PINGs after the keepalive timeout. A call that
//! stays open longer than the idle timeout keeps its connection, and a
//! client whose idle connection was closed reconnects for its next call.
//!
//! A connection closed gracefully (for revocation, age, …: the server's
//! `ConnectionHandle::close_gracefully`) sends GOAWAY, lets its calls in
//! flight finish within the grace, and its client carries on over a new
//! connection; calls still open when the grace passes are cut.
//!
//! The HTTP/2 clients here write frames by hand, so that the test decides
//! exactly which frames are answered.

use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::v1::{ProcessStreamRequest, StreamHeader, image_service_client::ImageServiceClient, process_stream_request::Part};
use rusty_fork::rusty_fork_test;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

/// Upper bound for any close the tests wait for.
const CLOSE_WITHIN: Duration = Duration::from_secs(15);
/// Timers fire at or after their deadline; the clocks of this test and of
/// the server start a little apart.
const SLACK: Duration = Duration::from_millis(100);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// One HTTP/2 frame: type, flags, payload (stream 0: connection frames only).
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// The next frame's type, flags and payload; `None` once the server has
/// closed the connection (with or without a TLS close_notify).
async fn read_frame(tls: &mut TlsStream<TcpStream>) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    match tls.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => return None,
        Err(e) => panic!("reading a frame: {e}"),
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tls.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

/// What a raw HTTP/2 client saw until the server closed the connection.
#[derive(Debug, Default)]
struct Seen {
    pings_answered: usize,
    pings_ignored: usize,
    goaway: bool,
}

/// Speaks HTTP/2 up to its SETTINGS, then reads (answering the server's
/// SETTINGS, and PINGs if `answer_pings`) until the server closes the
/// connection. Panics if that takes longer than [`CLOSE_WITHIN`].
async fn h2_until_closed(tls: &mut TlsStream<TcpStream>, answer_pings: bool) -> Seen {
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&frame(SETTINGS, 0, &[])).await.unwrap();
    let mut seen = Seen::default();
    let read_all = async {
        while let Some((kind, flags, payload)) = read_frame(tls).await {
            match (kind, flags & ACK) {
                (SETTINGS, 0) => tls.write_all(&frame(SETTINGS, ACK, &[])).await.unwrap(),
                (PING, 0) if answer_pings => {
                    tls.write_all(&frame(PING, ACK, &payload)).await.unwrap();
                    seen.pings_answered += 1;
                }
                (PING, 0) => seen.pings_ignored += 1,
                (GOAWAY, _) => seen.goaway = true,
                _ => {}
            }
        }
    };
    tokio::time::timeout(CLOSE_WITHIN, read_all).await.expect("the server closes the connection");
    seen
}

rusty_fork_test! {
    /// In a process of its own: the handshake failure counters have no tenant label.
    #[test]
    fn a_client_that_never_starts_tls_is_closed_after_the_handshake_timeout() {
        block_on(closes_a_silent_client_after_the_handshake_timeout())
    }
}

async fn closes_a_silent_client_after_the_handshake_timeout() {
    let pki = Pki::new(&["hygiene"]);
    let server = TestServer::start_with(&pki, |raw| raw.tls.handshake_timeout_secs = 1);
    let admin = server.admin_addr.unwrap();
    let timeouts = || metric(&scrape(admin), "imgsvc_tls_handshake_failures_total", &[("reason", "timeout")]).unwrap_or(0.0);
    let before = timeouts();
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let read = tokio::time::timeout(CLOSE_WITHIN, tcp.read(&mut [0u8; 64])).await.expect("the server closes the connection");
    assert_eq!(read.unwrap(), 0, "closed without a byte");
    assert!(started.elapsed() >= Duration::from_secs(1) - SLACK, "closed after {:?}", started.elapsed());
    let counted =
        until_metric(admin, "imgsvc_tls_handshake_failures_total", &[("reason", "timeout")], before + 1.0, Duration::from_secs(10)).await;
    assert_eq!(counted, Some(before + 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_after_the_tls_handshake_is_closed_after_the_idle_timeout() {
    let pki = Pki::new(&["hygiene"]);
    let server = TestServer::start_with(&pki, |raw| raw.server.idle_timeout_secs = 1);
    let mut tls = tls_connect(server.addr, &pki, "hygiene").await;
    let started = Instant::now();
    // The server speaks first (its HTTP/2 SETTINGS); this client never does.
    let mut frames = 0;
    let closed = tokio::time::timeout(CLOSE_WITHIN, async {
        while read_frame(&mut tls).await.is_some() {
            frames += 1;
        }
    });
    closed.await.expect("the server closes the connection");
    assert!(frames >= 1, "the server sent its SETTINGS first");
    assert!(started.elapsed() >= Duration::from_secs(1) - SLACK, "closed after {:?}", started.elapsed());
}

/// Runs [`h2_until_closed`] against a server with these idle and keepalive
/// settings (seconds); returns what the client saw and how long it lasted.
async fn h2_lifetime(idle: u64, ping_interval: u64, ping_timeout: u64, answer_pings: bool) -> (Duration, Seen) {
    let pki = Pki::new(&["hygiene"]);
    let server = TestServer::start_with(&pki, |raw| {
        raw.server.idle_timeout_secs = idle;
        raw.server.http2_keepalive_interval_secs = ping_interval;
        raw.server.http2_keepalive_timeout_secs = ping_timeout;
    });
    let mut tls = tls_connect(server.addr, &pki, "hygiene").await;
    let started = Instant::now();
    let seen = h2_until_closed(&mut tls, answer_pings).await;
    (started.elapsed(), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_makes_no_call_is_closed_after_the_idle_timeout_even_answering_pings() {
    let (lasted, seen) = h2_lifetime(3, 1, 10, true).await;
    assert!(lasted >= Duration::from_secs(3) - SLACK, "closed after {lasted:?}: {seen:?}");
    assert!(seen.pings_answered >= 1, "the server pinged meanwhile, and was answered: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed_after_the_keepalive_timeout() {
    let (lasted, seen) = h2_lifetime(600, 1, 1, false).await;
    assert!(seen.pings_ignored >= 1, "{seen:?}");
    // Interval + timeout, well before the idle timeout.
    assert!(lasted >= Duration::from_secs(2) - SLACK, "closed after {lasted:?}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_open_longer_than_the_idle_timeout_keeps_its_connection() {
    let pki = Pki::new(&["hygiene"]);
    let server = TestServer::start_with(&pki, |raw| raw.server.idle_timeout_secs = 1);
    let (tx, call) = open_stream_call(ImageServiceClient::new(channel(&server, &pki, "hygiene").await)).await;
    // The call is open, its data not sent yet: three idle timeouts pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    finish_stream_call(tx, call).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_idle_connection_was_closed_is_served_on_its_next_call() {
    let pki = Pki::new(&["hygiene"]);
    let server = TestServer::start_with(&pki, |raw| raw.server.idle_timeout_secs = 1);
    let channel = channel(&server, &pki, "hygiene").await;
    let image = imgsvc::client::RawImage {
        format: imgsvc::proto::v1::PixelFormat::Gray8,
        width: 2,
        height: 2,
        data: Bytes::from_static(&[1, 2, 3, 4]),
    };
    let ops = [imgsvc::client::Op::MeanFilter];
    for api in [imgsvc::client::Api::V1, imgsvc::client::Api::Legacy] {
        imgsvc::client::process(channel.clone(), api, image.clone(), &ops, "localhost").await.unwrap();
        // The server closes the idle connection after 1 s; the channel
        // reconnects for the next call.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let out = imgsvc::client::process(channel, imgsvc::client::Api::V1, image.clone(), &ops, "localhost").await;
    assert_eq!(out.unwrap(), expected(&image, &ops));
}

/// A `ProcessStream` call in flight.
type StreamCall =
    tokio::task::JoinHandle<Result<tonic::Response<tonic::Streaming<imgsvc::proto::v1::ProcessStreamResponse>>, tonic::Status>>;

/// Opens a `ProcessStream` call on `client` and sends its header only: the
/// call stays open until `tx` sends the 2×2 image's pixels and is dropped.
async fn open_stream_call(
    mut client: ImageServiceClient<tonic::transport::Channel>,
) -> (tokio::sync::mpsc::Sender<ProcessStreamRequest>, StreamCall) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = StreamHeader { format: imgsvc::proto::v1::PixelFormat::Gray8 as i32, width: 2, height: 2, operations: vec![] };
    tx.send(ProcessStreamRequest { part: Some(Part::Header(header)) }).await.unwrap();
    let call = tokio::spawn(async move { client.process_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    (tx, call)
}

/// Sends the pixels of a call [`open_stream_call`] opened, ends it, and
/// checks that the answer came back in full.
async fn finish_stream_call(tx: tokio::sync::mpsc::Sender<ProcessStreamRequest>, call: StreamCall) {
    tx.send(ProcessStreamRequest { part: Some(Part::Chunk(Bytes::from_static(&[1, 2, 3, 4]))) }).await.unwrap();
    drop(tx);
    let mut responses = call.await.unwrap().expect("the call was kept open").into_inner();
    let mut parts = Vec::new();
    while let Some(message) = responses.message().await.unwrap() {
        parts.push(message.part.unwrap());
    }
    use imgsvc::proto::v1::process_stream_response::Part as Out;
    assert!(matches!(&parts[..], [Out::Header(h), Out::Chunk(c)] if (h.width, h.height) == (2, 2) && c[..] == [1, 2, 3, 4]), "{parts:?}");
}

/// Waits (at most [`CLOSE_WITHIN`]) until the server lists exactly the
/// connections `wanted` accepts; returns their ids.
async fn until_connections(server: &TestServer, wanted: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let started = Instant::now();
    loop {
        let mut ids: Vec<u64> = server.connections.list().iter().map(|c| c.id).collect();
        ids.sort_unstable();
        if wanted(&ids) {
            return ids;
        }
        assert!(started.elapsed() < CLOSE_WITHIN, "connections now: {ids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most [`CLOSE_WITHIN`]) until the connection has `n` calls open.
async fn until_open_calls(handle: &imgsvc::serving::connection::ConnectionHandle, n: usize) {
    let started = Instant::now();
    while handle.open_calls() != n {
        assert!(started.elapsed() < CLOSE_WITHIN, "{} calls open, not {n}", handle.open_calls());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_gracefully_finishes_its_calls_and_its_client_moves_to_a_new_one() {
    use imgsvc::serving::connection::CloseReason;
    let pki = Pki::new(&["hygiene"]);
    let server = TestServer::start(&pki);
    let admin = server.admin_addr.unwrap();
    let closed = || metric(&scrape(admin), "imgsvc_connections_closed_total", &[("reason", "max_age")]).unwrap_or(0.0);
    let before = closed();
    let channel = channel(&server, &pki, "hygiene").await;
    let (tx, call) = open_stream_call(ImageServiceClient::new(channel.clone())).await;
    let first = until_connections(&server, |ids| ids.len() == 1).await[0];
    let handle = server.connections.list().pop().unwrap();
    assert_eq!(handle.identity.tenant.as_ref().unwrap().to_string(), "hygiene");
    assert!(!handle.certificates.is_empty(), "the client's chain is kept");
    until_open_calls(&handle, 1).await;

    handle.close_gracefully(CloseReason::MaxAge, Duration::from_secs(30));
    // A second request cannot lengthen the grace or change the reason.
    handle.close_gracefully(CloseReason::Revoked, Duration::from_secs(60));
    assert_eq!(handle.closing().map(|c| c.reason), Some(CloseReason::MaxAge));

    // The call open when the close began finishes, answered in full.
    finish_stream_call(tx, call).await;

    // Then the old connection ends, and the same channel's next call is
    // served over a new one.
    until_connections(&server, |ids| !ids.contains(&first)).await;
    let image = imgsvc::client::RawImage {
        format: imgsvc::proto::v1::PixelFormat::Gray8,
        width: 2,
        height: 2,
        data: Bytes::from_static(&[1, 2, 3, 4]),
    };
    let ops = [imgsvc::client::Op::MeanFilter];
    // A tonic channel may still hand the call to the closed connection,
    // which fails it unsent (CANCELLED, "operation was canceled"): such a
    // call is retried, as imgsvc's client retries it (bounded).
    let mut out = None;
    for _ in 0..3 {
        match imgsvc::client::process(channel.clone(), imgsvc::client::Api::V1, image.clone(), &ops, "localhost").await {
            Err(e) if imgsvc::client::balance::retryable(&e) => tokio::time::sleep(Duration::from_millis(50)).await,
            result => {
                out = Some(result);
                break;
            }
        }
    }
    assert_eq!(out.expect("served within 3 tries").unwrap(), expected(&image, &ops));
    let now = until_connections(&server, |ids| ids.len() == 1).await;
    assert_ne!(now[0], first);
    let counted = until_metric(admin, "imgsvc_connections_closed_total", &[("reason", "max_age")], before + 1.0, CLOSE_WITHIN).await;
    assert_eq!(counted, Some(before + 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_open_when_the_grace_passes_is_cut_and_the_connection_closed() {
    use imgsvc::serving::connection::CloseReason;
    let pki = Pki::new(&["hygiene"]);
    let server = TestServer::start(&pki);
    let channel = channel(&server, &pki, "hygiene").await;
    let (tx, call) = open_stream_call(ImageServiceClient::new(channel)).await;
    until_connections(&server, |ids| ids.len() == 1).await;
    let handle = server.connections.list().pop().unwrap();
    until_open_calls(&handle, 1).await;
    let started = Instant::now();
    handle.close_gracefully(CloseReason::Revoked, Duration::from_millis(300));
    until_connections(&server, |ids| ids.is_empty()).await;
    assert!(started.elapsed() >= Duration::from_millis(300) - SLACK, "cut after {:?}", started.elapsed());
    // The client's call did not get an answer: the connection went away under it.
    let outcome = match call.await.unwrap() {
        Err(status) => Err(status.code()),
        Ok(response) => response.into_inner().message().await.map(|_| ()).map_err(|s| s.code()),
    };
    drop(tx);
    assert!(
        matches!(outcome, Err(tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal)),
        "{outcome:?}"
    );
}
