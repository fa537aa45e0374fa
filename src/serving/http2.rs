//! imgsvc's own HTTP/2 serving of a lane's connections: hyper's HTTP/2
//! server over the gRPC router, one task per connection.
//!
//! tonic's `Server::serve_*` serves connections the same way, but keeps each
//! connection to itself: it can only end all of them (its shutdown signal)
//! or each at a fixed age. imgsvc ends single connections for reasons found
//! while they are open — a client certificate revoked or expired, a
//! maximum age with jitter, an idle timeout, a kernel-TLS key near its
//! limit — so each connection's task here watches its
//! [`ConnectionHandle`]: when it starts closing, hyper sends GOAWAY (the
//! client starts new calls on a new connection), the calls in flight go on,
//! and the connection ends when they are done or at the close's deadline,
//! whichever comes first.
//!
//! What tonic's serving added per request is done here too: the
//! connection's [`ConnectionInfo`] in the request's extensions, the request
//! span (`telemetry::request_span`), and errors turned into gRPC statuses
//! (`RecoverError`). Deadlines (`grpc-timeout`) are the router's own layer.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::codegen::http;
use tracing::Instrument;

use crate::{
    config::Settings,
    serving::connection::{CloseReason, ConnectionHandle, ConnectionInfo, IdleTimer, OpenConnections},
};

/// The routed gRPC service every connection of every lane calls: tonic's
/// router under imgsvc's layers.
pub type RouterService = tower::util::BoxCloneSyncService<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>, Infallible>;

/// A connection ready to be served: its byte stream and its handle.
pub trait ServedConnection: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    fn handle(&self) -> &Arc<ConnectionHandle>;
}

/// How every connection of the server is served.
#[derive(Clone)]
pub struct ConnectionServing {
    router: RouterService,
    http2: http2::Builder<TokioExecutor>,
    idle_timeout: Option<Duration>,
    /// `server.max_connection_age_secs` and `_grace_secs` (see [`super::ageing`]).
    max_age: (Option<Duration>, Duration),
    open: OpenConnections,
}

impl ConnectionServing {
    pub fn new(settings: &Settings, router: RouterService, open: OpenConnections) -> Self {
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(settings.http2_keepalive_interval)
            .keep_alive_timeout(settings.http2_keepalive_timeout)
            .max_concurrent_streams(settings.max_concurrent_streams)
            .initial_stream_window_size(settings.http2_stream_window_bytes)
            .initial_connection_window_size(settings.http2_connection_window_advertised())
            // Overrides the two sizes above when set (hyper starts at 64 KiB).
            .adaptive_window(settings.http2_adaptive_window)
            .max_frame_size(settings.http2_max_frame_size)
            // As tonic's serving had it: no cap on the streams the server
            // resets on one connection. Refusals at the headers reset the
            // rest of each refused body, and hyper's default cap (1024,
            // against reset floods, RUSTSEC-2024-0003) would then end a
            // busy tenant's connection with ENHANCE_YOUR_CALM, failing its
            // admitted calls; admission already bounds what each stream
            // can cost (slots, rate, memory).
            .max_local_error_reset_streams(None);
        let max_age = (settings.max_connection_age, settings.max_connection_age_grace);
        Self { router, http2, idle_timeout: settings.idle_timeout, max_age, open }
    }

    /// Serves the connections received on `incoming` until its sender is
    /// dropped (the lane closes), then closes each gracefully with reason
    /// `Shutdown` and returns once all have ended. The server's drain
    /// deadline bounds that wait.
    pub async fn serve_lane<C: ServedConnection>(self, mut incoming: mpsc::Receiver<C>) {
        let connections = TaskTracker::new();
        let shutdown = CancellationToken::new();
        while let Some(connection) = incoming.recv().await {
            connections.spawn(self.clone().serve(connection, shutdown.clone()));
        }
        shutdown.cancel();
        connections.close();
        connections.wait().await;
    }

    /// Serves one connection to its end (see the module's doc).
    async fn serve<C: ServedConnection>(self, connection: C, shutdown: CancellationToken) {
        let handle = connection.handle().clone();
        let _listed = self.open.register(handle.clone());
        let _age_timer = super::ageing::watch(&handle, self.max_age.0, self.max_age.1);
        let info = ConnectionInfo { identity: handle.identity.clone(), activity: handle.activity.clone(), refused: handle.refused.clone() };
        let service = PerConnection { router: self.router, info };
        let conn = self.http2.serve_connection(TokioIo::new(connection), TowerToHyperService::new(service));
        tokio::pin!(conn);
        let mut idle = self.idle_timeout.map(|timeout| IdleTimer::new(handle.activity.clone(), timeout));
        let mut closing = handle.watch_closing();
        let mut going_away = false;
        let cut = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(cut);
        loop {
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        let kind = error_kind(&e);
                        handle.count_error(kind);
                        tracing::debug!(peer = %handle.peer, error = %e, kind, "connection ended with an error");
                    }
                    break;
                }
                () = std::future::poll_fn(|cx| idle.as_mut().map_or(Poll::Pending, |idle| idle.poll_expired(cx))), if !going_away => {
                    handle.close_gracefully(CloseReason::Idle, IDLE_GRACE);
                }
                () = shutdown.cancelled(), if !going_away => {
                    // The server's drain deadline cuts what is left.
                    handle.close_gracefully(CloseReason::Shutdown, UNBOUNDED);
                }
                changed = closing.changed() => {
                    if changed.is_err() {
                        continue; // cannot happen: the handle (the sender) outlives this task
                    }
                    let Some(close) = *closing.borrow_and_update() else { continue };
                    if !going_away {
                        going_away = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    cut.as_mut().reset(close.deadline);
                }
                () = cut.as_mut(), if going_away => {
                    let open_calls = handle.open_calls();
                    if open_calls > 0 {
                        tracing::warn!(peer = %handle.peer, open_calls, "grace of a closing connection passed: cutting its calls short");
                    }
                    break;
                }
            }
        }
    }
}

/// A grace the server's drain deadline, not the connection, bounds.
const UNBOUNDED: Duration = Duration::from_secs(100 * 365 * 86_400);

/// How long an idle connection's GOAWAY has to reach the client before the
/// connection closes (no call is open; a call started meanwhile finishes).
const IDLE_GRACE: Duration = Duration::from_secs(2);

/// The router as one connection calls it: hyper's request body as tonic's,
/// the connection's [`ConnectionInfo`] in the extensions, the request span.
#[derive(Clone)]
struct PerConnection {
    router: RouterService,
    info: ConnectionInfo,
}

impl tower::Service<http::Request<Incoming>> for PerConnection {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.router.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let headers_only = http::Request::from_parts(parts, ());
        let span = crate::telemetry::request_span(&headers_only);
        let (parts, ()) = headers_only.into_parts();
        let mut request = http::Request::from_parts(parts, tonic::body::Body::new(body));
        request.extensions_mut().insert(self.info.clone());
        Box::pin(self.router.call(request).instrument(span))
    }
}

/// rustls's words for a TCP end without close_notify; kernel TLS reports
/// the same (`kernel_tls`).
const TRUNCATED_PREFIX: &str = "peer closed connection without sending TLS close_notify";

/// What ended a connection with an error, for
/// `imgsvc_connection_errors_total{kind}`: `truncated` (the client's TCP
/// stream ended without TLS close_notify: rustls and kernel TLS alike),
/// `tls` (a TLS alert, or a record that does not authenticate or parse),
/// `reset` (the peer reset or aborted the TCP connection), `timeout`, or
/// `http2` (anything else: an HTTP/2 protocol error, a keepalive PING
/// unanswered).
pub fn error_kind(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return match io.kind() {
                K::UnexpectedEof if io.to_string().starts_with(TRUNCATED_PREFIX) => "truncated",
                K::InvalidData => "tls",
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
                K::TimedOut => "timeout",
                _ => "http2",
            };
        }
        next = e.source();
    }
    "http2"
}

#[cfg(test)]
mod error_kind_tests {
    use std::io;

    use super::error_kind;

    #[derive(Debug)]
    struct Wrapped(io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn connection_errors_are_told_apart_through_their_sources() {
        let truncated = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof",
        );
        let cases = [
            (truncated, "truncated"),
            (io::Error::new(io::ErrorKind::UnexpectedEof, "early eof"), "http2"),
            (io::Error::new(io::ErrorKind::InvalidData, "received fatal alert: DecryptError"), "tls"),
            (io::Error::from(io::ErrorKind::ConnectionReset), "reset"),
            (io::Error::from(io::ErrorKind::TimedOut), "timeout"),
        ];
        for (error, kind) in cases {
            let words = error.to_string();
            assert_eq!(error_kind(&Wrapped(error)), kind, "{words}");
        }
        assert_eq!(error_kind(&std::fmt::Error), "http2");
    }
}
