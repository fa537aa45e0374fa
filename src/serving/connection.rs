//! Per-connection bookkeeping on the gRPC port: which connections are
//! open ([`OpenConnections`]), which calls each has open, and closing a
//! connection gracefully ([`ConnectionHandle::close_gracefully`]: HTTP/2
//! GOAWAY, the calls in flight finish within a grace, then the connection
//! closes) — when it stays idle, and for whatever else ends a connection's
//! life early (revocation, maximum age, shutdown).
//!
//! hyper and tonic have no idle timeout: a client that finishes the TLS
//! handshake and then sends nothing (or opens HTTP/2 and stays silent,
//! answering PINGs) would hold its connection and memory forever. So every
//! accepted connection gets an [`Activity`], shared between
//! - [`TrackCalls`], a tower layer that counts a call as open from its
//!   request until its response body is dropped (sent, or reset), and
//! - [`IdleTimer`], polled from the connection's reads, which reports the
//!   connection expired once it has had no open call for the timeout.
//!
//! The two meet through the connection's [`ConnectionInfo`], which tonic
//! puts into every request's extensions.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use hyper::body::{Body, Frame, SizeHint};
use tonic::codegen::http;

use crate::{identity::PeerIdentity, tenancy::OverConnectionLimit};

/// Why a connection is being closed: the `reason` label of
/// `imgsvc_connections_closed_total` and of the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The server is shutting down (its drain).
    Shutdown,
    /// No open call for `server.idle_timeout_secs`.
    Idle,
    /// The connection reached its maximum age.
    MaxAge,
    /// Its client certificate is no longer trusted (revoked, or its CA
    /// removed).
    Revoked,
    /// Its client certificate has expired.
    Expired,
    /// Its record layer's key is near its usage limit.
    KeyLimit,
    /// Its certificate names a tenant this server does not serve.
    Unconfigured,
    /// Its tenant had `max_connections` open at its handshake.
    TenantConnections,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Idle => "idle",
            Self::MaxAge => "max_age",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::KeyLimit => "key_limit",
            Self::Unconfigured => "unconfigured",
            Self::TenantConnections => "tenant_connections",
        }
    }

    /// Routine closes are logged at debug level, the others at info. A
    /// connection over its tenant's limit is routine here: its refusal is
    /// logged, rate-limited, by [`crate::tenancy::Tenancy::admit_connection`].
    fn routine(self) -> bool {
        matches!(self, Self::Shutdown | Self::Idle | Self::MaxAge | Self::TenantConnections)
    }
}

/// A close in progress: why, and when the calls still open are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closing {
    pub reason: CloseReason,
    pub deadline: tokio::time::Instant,
}

/// One served connection, as the rest of the server sees it: who it is and
/// a way to close it gracefully. Made once its handshake is done; kept in
/// [`OpenConnections`] while it is served.
#[derive(Debug)]
pub struct ConnectionHandle {
    pub id: u64,
    pub peer: SocketAddr,
    /// The tenant as decided at the handshake.
    pub identity: PeerIdentity,
    /// The client's certificate chain, leaf first (empty if it sent none).
    pub certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub opened: Instant,
    /// Set when its tenant had `max_connections` open at its handshake:
    /// every call on it is refused.
    pub refused: Option<OverConnectionLimit>,
    pub(crate) activity: Arc<Activity>,
    closing: tokio::sync::watch::Sender<Option<Closing>>,
    /// Whether the error that ended it has been counted.
    error_counted: std::sync::atomic::AtomicBool,
}

impl ConnectionHandle {
    pub fn new(peer: SocketAddr, identity: PeerIdentity, certificates: Vec<rustls::pki_types::CertificateDer<'static>>) -> Arc<Self> {
        Self::refusing(peer, identity, certificates, None)
    }

    /// [`ConnectionHandle::new`], whose calls are all refused when `refused`
    /// is set.
    pub fn refusing(
        peer: SocketAddr,
        identity: PeerIdentity,
        certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
        refused: Option<OverConnectionLimit>,
    ) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            peer,
            identity,
            certificates,
            opened: Instant::now(),
            refused,
            activity: Activity::new(),
            closing: tokio::sync::watch::channel(None).0,
            error_counted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Counts the error that ends the connection, once, in
    /// `imgsvc_connection_errors_total{tenant,kind}`, whether its stream
    /// saw it first (an end the HTTP/2 layer would take for a clean one:
    /// h2 closes an idle server connection without error on an unexpected
    /// end of stream, truncation included) or the HTTP/2 layer did.
    pub fn count_error(&self, kind: &'static str) {
        if !self.error_counted.swap(true, Ordering::AcqRel) {
            let tenant = self.identity.tenant_label();
            metrics::counter!("imgsvc_connection_errors_total", "tenant" => tenant, "kind" => kind).increment(1);
        }
    }

    /// Sends HTTP/2 GOAWAY now (clients start new calls elsewhere, on a new
    /// connection); the calls in flight may finish within `grace`, then the
    /// connection is closed. Idempotent: the first reason is kept, a later
    /// call can only shorten the grace. Counted in
    /// `imgsvc_connections_closed_total{reason}` and logged once.
    pub fn close_gracefully(&self, reason: CloseReason, grace: Duration) {
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(grace).unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        let mut first = false;
        self.closing.send_if_modified(|closing| match closing {
            None => {
                *closing = Some(Closing { reason, deadline });
                first = true;
                true
            }
            Some(c) if deadline < c.deadline => {
                c.deadline = deadline;
                true
            }
            Some(_) => false,
        });
        if first {
            metrics::counter!("imgsvc_connections_closed_total", "reason" => reason.label()).increment(1);
            let tenant = self.identity.tenant_label();
            let (peer, open_calls, grace_ms) = (self.peer, self.open_calls(), grace.as_millis() as u64);
            if reason.routine() {
                tracing::debug!(%peer, %tenant, reason = reason.label(), open_calls, grace_ms, "closing connection (GOAWAY)");
            } else {
                tracing::info!(%peer, %tenant, reason = reason.label(), open_calls, grace_ms, "closing connection (GOAWAY)");
            }
        }
    }

    /// The close in progress, if any.
    pub fn closing(&self) -> Option<Closing> {
        *self.closing.borrow()
    }

    /// Follows [`ConnectionHandle::closing`] (the connection's task).
    pub(crate) fn watch_closing(&self) -> tokio::sync::watch::Receiver<Option<Closing>> {
        self.closing.subscribe()
    }

    /// Calls open right now.
    pub fn open_calls(&self) -> usize {
        self.activity.open_calls()
    }
}

/// Every served gRPC connection; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct OpenConnections {
    inner: Arc<Mutex<HashMap<u64, Arc<ConnectionHandle>>>>,
}

impl OpenConnections {
    /// The connections open now.
    pub fn list(&self) -> Vec<Arc<ConnectionHandle>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lists `handle` until the returned guard is dropped (the connection's
    /// task ends).
    pub(crate) fn register(&self, handle: Arc<ConnectionHandle>) -> Registered {
        self.lock().insert(handle.id, handle.clone());
        metrics::gauge!("imgsvc_connections_open").increment(1.0);
        Registered { connections: self.clone(), id: handle.id }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnectionHandle>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's place in [`OpenConnections`]; removed on drop.
pub(crate) struct Registered {
    connections: OpenConnections,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.connections.lock().remove(&self.id).is_some() {
            metrics::gauge!("imgsvc_connections_open").decrement(1.0);
        }
    }
}

/// What tonic attaches to each request of a connection.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub identity: PeerIdentity,
    pub activity: Arc<Activity>,
    /// The connection is over its tenant's `max_connections`: the admission
    /// layer refuses each of its calls with this.
    pub refused: Option<OverConnectionLimit>,
}

/// The calls a connection has open, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug)]
struct ActivityState {
    open: usize,
    idle_since: Instant,
    /// The connection's reader, parked while calls are open: the end of the
    /// last call wakes it to start the idle timer.
    reader: Option<Waker>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(ActivityState { open: 0, idle_since: Instant::now(), reader: None }) })
    }

    /// Calls open right now.
    pub fn open_calls(&self) -> usize {
        self.lock().open
    }

    fn begin(self: &Arc<Self>) -> OpenCall {
        self.lock().open += 1;
        OpenCall(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        // Two integers and a waker: consistent even after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open call; closed on drop.
struct OpenCall(Arc<Activity>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        let reader = {
            let mut state = self.0.lock();
            state.open -= 1;
            if state.open > 0 {
                return;
            }
            state.idle_since = Instant::now();
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// Tells when a connection has had no open call for `timeout`.
pub struct IdleTimer {
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    expired: bool,
}

impl IdleTimer {
    pub fn new(activity: Arc<Activity>, timeout: Duration) -> Self {
        let sleep = Box::pin(tokio::time::sleep(timeout));
        Self { activity, timeout, sleep, armed: false, expired: false }
    }

    /// Ready (and from then on always ready) once the connection has been
    /// idle for the timeout; otherwise registers `cx` to be woken when that
    /// may have happened.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.expired {
            return Poll::Ready(());
        }
        loop {
            if self.armed {
                if self.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.armed = false;
            }
            let mut state = self.activity.lock();
            if state.open > 0 {
                if !state.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    state.reader = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            let deadline = state.idle_since + self.timeout;
            drop(state);
            if Instant::now() >= deadline {
                self.expired = true;
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline.into());
            self.armed = true;
        }
    }
}

/// Counts each call as open on its connection's [`Activity`] until its
/// response body is dropped. Requests without a [`ConnectionInfo`] pass
/// through uncounted. Also puts the connection's [`PeerIdentity`] into the
/// request, where [`crate::identity::TenantInterceptor`] looks for it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackCallsLayer;

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TrackCalls { inner }
    }
}

#[derive(Clone, Debug)]
pub struct TrackCalls<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackCalls<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let open = request.extensions().get::<ConnectionInfo>().cloned().map(|info| {
            let open = info.activity.begin();
            request.extensions_mut().insert(info.identity);
            open
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| CallBody { inner, _open: open }))
        })
    }
}

/// A response body that keeps its call open until it is dropped.
pub struct CallBody<B> {
    inner: B,
    _open: Option<OpenCall>,
}

impl<B: Body + Unpin> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(200);

    /// Waits (at most 10 s) for the timer to expire; returns how long it took.
    async fn until_expired(timer: &mut IdleTimer) -> Duration {
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), std::future::poll_fn(|cx| timer.poll_expired(cx)))
            .await
            .expect("the idle timer expires");
        started.elapsed()
    }

    fn poll_now(timer: &mut IdleTimer) -> Poll<()> {
        timer.poll_expired(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn expires_once_the_timeout_passes_with_no_call_open_and_stays_expired() {
        let mut timer = IdleTimer::new(Activity::new(), TIMEOUT);
        assert!(poll_now(&mut timer).is_pending());
        assert!(until_expired(&mut timer).await >= TIMEOUT - Duration::from_millis(5));
        assert!(poll_now(&mut timer).is_ready());
    }

    #[tokio::test]
    async fn an_open_call_holds_the_connection_and_its_end_restarts_the_timeout() {
        let activity = Activity::new();
        let mut timer = IdleTimer::new(activity.clone(), TIMEOUT);
        let call = activity.begin();
        assert!(poll_now(&mut timer).is_pending());
        // Time passing with a call open is what is under test here.
        tokio::time::sleep(TIMEOUT * 2).await;
        assert!(poll_now(&mut timer).is_pending(), "a call is open");
        assert_eq!(activity.open_calls(), 1);
        drop(call);
        assert_eq!(activity.open_calls(), 0);
        assert!(until_expired(&mut timer).await >= TIMEOUT - Duration::from_millis(5), "the timeout counts from the end of the call");
    }
}
