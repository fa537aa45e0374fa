//! Admission at the headers and byte accounting of request and response
//! bodies: the tower layer between tonic's router and the image services.
//!
//! For every image call ([`ImageMethod`]), when its headers arrive and
//! before a byte of its body is read:
//! 1. [`Tenancy::admit_call`] decides tenant, method and the tenant's slots
//!    (known and enabled, operations the method names, rate, calls in
//!    flight). A refusal is answered at once; the body is never read, and
//!    HTTP/2 resets the stream so the client stops sending it.
//! 2. The call gets a memory [`Account`]. The request body is wrapped
//!    ([`ChargedRequest`]): when a gRPC message's 5-byte length prefix
//!    arrives, the message's bytes (times the method's
//!    [`ImageMethod::reserve_factor`], which covers the images the call
//!    will hold while it is processed and answered) are charged before any
//!    of them is handed on. If the memory is not there, the body is not
//!    polled: HTTP/2 flow control holds the sender, other streams keep
//!    flowing. After `tenancy.memory_wait_ms` the call is refused with
//!    RESOURCE_EXHAUSTED and `grpc-retry-pushback-ms`; a message that can
//!    never fit is refused at once. A compressed message (gzip, zstd) is
//!    charged its bytes and the tenant's request limit, kept aside until
//!    it has all come, inflated here within that limit ([`super::inflate`])
//!    and handed on uncompressed, charged as an uncompressed message of its
//!    size; tonic never inflates.
//! 3. The handler finds the [`Admission`] and the account in the request's
//!    extensions ([`CallMemory`]); it sizes the account to what each stage
//!    holds (see `crate::service`).
//! 4. The response body is wrapped ([`ChargedResponse`]): each data frame
//!    takes over its size from the call's account, and releases it when
//!    the transport drops the frame, i.e. once it has been written to the
//!    socket (a slow reader holds its answer's memory, and that is
//!    counted). No byte is copied: frames are re-wrapped with
//!    [`Bytes::from_owner`].
//!
//! Every other call of a tenant (health, reflection, any other path:
//! [`ImageMethod::Other`]) goes through the same admission: the tenant's
//! rate and call slots at the headers, each message charged at its prefix
//! (once, released when the next is read) and at most
//! [`OTHER_MAX_MESSAGE_BYTES`]. Calls without a tenant pass on to the
//! interceptor, which refuses them.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tonic::{Status, codegen::http};

use super::{
    inflate::{self, InflateError, RequestEncoding},
    unary::UnaryHandlers,
};
use crate::{
    identity::Tenant,
    service::{LimitExceeded, ServiceError, legacy::SplicedAnswer},
    tenancy::{
        Admission, CallSlot, Tenancy, TenancyError,
        memory::{self, Account, Stage},
        policy::Operation,
    },
};

/// The largest message of a call other than the image methods (health,
/// reflection): their requests are a service or symbol name.
pub const OTHER_MAX_MESSAGE_BYTES: u64 = 64 * 1024;

/// The methods as the layer sees them: the image methods of both APIs,
/// and every other path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageMethod {
    LegacyRotate,
    LegacyMeanFilter,
    Process,
    ProcessStream,
    /// Health, reflection, or a path nothing serves; its name.
    Other(&'static str),
}

impl ImageMethod {
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/NLImageService/RotateImage" => Self::LegacyRotate,
            "/NLImageService/MeanFilter" => Self::LegacyMeanFilter,
            "/imgsvc.v1.ImageService/Process" => Self::Process,
            "/imgsvc.v1.ImageService/ProcessStream" => Self::ProcessStream,
            _ => return None,
        })
    }

    /// Any path: an image method, or [`ImageMethod::Other`].
    pub fn of_path(path: &str) -> Self {
        Self::from_path(path).unwrap_or(Self::Other(match path {
            "/grpc.health.v1.Health/Check" => "grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch" => "grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" => "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => {
                "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            }
            _ => "other",
        }))
    }

    /// The name used in spans, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::LegacyRotate => "NLImageService/RotateImage",
            Self::LegacyMeanFilter => "NLImageService/MeanFilter",
            Self::Process => "imgsvc.v1.ImageService/Process",
            Self::ProcessStream => "imgsvc.v1.ImageService/ProcessStream",
            Self::Other(name) => name,
        }
    }

    /// The operations the method itself names (v1 names them in the body,
    /// checked once it is decoded).
    pub fn operations(self) -> &'static [Operation] {
        match self {
            Self::LegacyRotate => &[Operation::Rotate],
            Self::LegacyMeanFilter => &[Operation::MeanFilter],
            Self::Process | Self::ProcessStream | Self::Other(_) => &[],
        }
    }

    /// Whether each message's charge is given back once the next poll
    /// shows it consumed (a stream's chunks, health and reflection
    /// requests), rather than kept for the handler.
    fn releases_each_message(self) -> bool {
        matches!(self, Self::ProcessStream | Self::Other(_))
    }

    /// Bytes charged per byte of a request message when its prefix
    /// arrives: the input, plus the output of a legacy call (one step), or
    /// up to two images of a v1 pipeline (the handler gives back what its
    /// pipeline does not need). A stream's messages are chunks, charged
    /// once; its image is charged by the handler when the header declares
    /// it.
    pub fn reserve_factor(self) -> u64 {
        match self {
            Self::LegacyRotate | Self::LegacyMeanFilter => 2,
            Self::Process => 3,
            Self::ProcessStream | Self::Other(_) => 1,
        }
    }
}

/// What the layer hands the handler of an admitted image call.
#[derive(Clone, Debug)]
pub struct CallMemory {
    pub admission: Admission,
    pub account: Arc<Account>,
}

/// The layer; see the module docs.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    tenancy: Tenancy,
    stream_window: u64,
    credits: Arc<ConnectionCredits>,
    hold_back: bool,
    unary: Option<Arc<UnaryHandlers>>,
}

/// What each connection's own charge (its configured window and one
/// frame, charged for its life at accept) covers of the bytes its calls
/// held back for memory leave unread, by connection (peer address); an
/// entry lives while some call of the connection is held back.
#[derive(Debug, Default)]
struct ConnectionCredits {
    size: u64,
    used: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, u64>>,
}

impl ConnectionCredits {
    fn take(&self, peer: std::net::SocketAddr, n: u64) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let held = used.entry(peer).or_default();
        if *held + n <= self.size {
            *held += n;
            return true;
        }
        if *held == 0 {
            used.remove(&peer);
        }
        false
    }

    fn give_back(&self, peer: std::net::SocketAddr, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = used.get_mut(&peer) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                used.remove(&peer);
            }
        }
    }
}

impl AdmissionLayer {
    pub fn new(tenancy: Tenancy) -> Self {
        Self { tenancy, stream_window: u64::from(crate::config::HYPER_BDP_LIMIT), credits: Arc::default(), hold_back: true, unary: None }
    }

    /// Serves the unary image methods from an owned message buffer with
    /// these handlers ([`super::unary`]) instead of passing them to tonic.
    pub fn owned_unary(mut self, handlers: UnaryHandlers) -> Self {
        self.unary = Some(Arc::new(handlers));
        self
    }

    /// Whether a call whose memory is not there now may wait for it
    /// (`tenancy.memory_wait_ms`) with its body held back. Not with
    /// adaptive HTTP/2 windows (`server.http2_adaptive_window`): the
    /// connection window is not widened then, so a held-back body could
    /// hold back the other calls on its connection; such a call is refused
    /// at once, with the retry delay, instead.
    pub fn hold_back(mut self, allowed: bool) -> Self {
        self.hold_back = allowed;
        self
    }

    /// What each connection is charged for its life at accept: it covers
    /// the unread bytes of its calls held back for memory up to that much.
    pub fn connection_charge(mut self, bytes: u64) -> Self {
        self.credits = Arc::new(ConnectionCredits { size: bytes, ..Default::default() });
        self
    }

    /// The most request bytes HTTP/2 may buffer unread for one stream (its
    /// largest stream window): what a call held back for memory is
    /// charged. Defaults to hyper's largest adaptive window.
    pub fn stream_window(mut self, bytes: u64) -> Self {
        self.stream_window = bytes;
        self
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Admit {
            inner,
            tenancy: self.tenancy.clone(),
            stream_window: self.stream_window,
            credits: self.credits.clone(),
            hold_back: self.hold_back,
            unary: self.unary.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Admit<S> {
    inner: S,
    tenancy: Tenancy,
    stream_window: u64,
    credits: Arc<ConnectionCredits>,
    hold_back: bool,
    unary: Option<Arc<UnaryHandlers>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for Admit<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let method = ImageMethod::of_path(request.uri().path());
        let Some(tenant) = request.extensions().get::<Tenant>().map(|t| t.0.clone()) else {
            // No tenant: the interceptor refuses it.
            return Box::pin(self.inner.call(request));
        };
        // The clone that was made ready is the one that serves the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let tenancy = self.tenancy.clone();
        let stream_window = self.stream_window;
        let hold_back = self.hold_back;
        let unary = self.unary.clone().filter(|_| UnaryHandlers::serves(method));
        let credits = request
            .extensions()
            .get::<crate::identity::PeerIdentity>()
            .and_then(|p| p.remote_addr)
            .map(|peer| (self.credits.clone(), peer));
        let over_connection_limit = request.extensions().get::<super::connection::ConnectionInfo>().and_then(|c| c.refused.clone());
        Box::pin(async move {
            if let Some(refused) = over_connection_limit {
                let error = refused.error();
                metrics::counter!("imgsvc_refusals_total", "tenant" => tenant.to_string(), "reason" => error.reason()).increment(1);
                return Ok(refusal(method, &tenant, error).await);
            }
            let (admission, slot) = match tenancy.admit_call(&tenant, method.operations()) {
                Ok(admitted) => admitted,
                Err(error) => return Ok(refusal(method, &tenant, error).await),
            };
            let account = tenancy.account(&admission, Stage::Receiving);
            let policy = tenancy.policy();
            let max_message_bytes = match method {
                ImageMethod::Other(_) => OTHER_MAX_MESSAGE_BYTES,
                _ => policy.limits.max_message_bytes as u64,
            };
            let memory_wait = policy.tenancy.memory_wait;
            let body_timeout = policy.tenancy.body_timeout;
            let (mut parts, body) = request.into_parts();
            let mut body = ChargedRequest::new(body, method, admission.clone(), account.clone(), memory_wait, max_message_bytes);
            body.encoding = RequestEncoding::of(&parts.headers);
            body.stream_window = stream_window;
            body.hold_back = hold_back;
            body.body_timeout = body_timeout;
            body.credits = credits;
            parts.extensions.insert(CallMemory { admission, account: account.clone() });
            let response = if let Some(unary) = unary {
                unary.serve(method, http::Request::from_parts(parts, body), max_message_bytes).await
            } else {
                let mut response = inner.call(http::Request::from_parts(parts, tonic::body::Body::new(body))).await?;
                if let Some(spliced) = response.extensions_mut().remove::<SplicedAnswer>() {
                    response = response.map(|body| tonic::body::Body::new(SplicedBody::new(body, spliced)));
                }
                response
            };
            Ok(response.map(|body| tonic::body::Body::new(ChargedResponse::new(body, account, slot, method))))
        })
    }
}

/// A refusal at the headers, answered as the handler would have answered
/// it (same span, log line and metrics), as a trailers-only response.
async fn refusal(method: ImageMethod, tenant: &crate::identity::TenantId, error: TenancyError) -> http::Response<tonic::body::Body> {
    let result = crate::service::traced::<(), _>(method.name(), Ok(tenant.clone()), move |_| {
        Box::pin(async move { Err(ServiceError::from(error)) })
    })
    .await;
    match result {
        Err(status) => status.into_http(),
        Ok(()) => unreachable!("a refusal is an error"),
    }
}

/// Where the request body is in its current gRPC message.
#[derive(Debug)]
enum Framing {
    /// Reading a 5-byte prefix: the bytes seen so far.
    Prefix { seen: usize, prefix: [u8; 5] },
    /// Inside a message: bytes still to come.
    Message { remaining: u64 },
    /// Inside a compressed message the layer inflates itself: bytes still
    /// to come, and those received (charged at its prefix).
    Compressed { remaining: u64, received: BytesMut },
}

/// A request body whose messages are charged to the call's account before
/// they are handed on (see the module docs).
pub struct ChargedRequest {
    inner: tonic::body::Body,
    method: ImageMethod,
    admission: Admission,
    account: Arc<Account>,
    memory_wait: Duration,
    framing: Framing,
    /// A frame held back until the memory for the message it starts is
    /// charged.
    held: Option<Bytes>,
    /// Where in `held` scanning resumes.
    scanned: usize,
    waiting: Option<BoxFuture<Result<(), memory::MemoryError>>>,
    /// Stream messages: charges of complete messages, given back at the
    /// next poll (tonic has handed them to the handler by then).
    complete: u64,
    /// Stream messages: the charge of the message being received.
    current: u64,
    /// The request's `grpc-encoding`, when the layer inflates its
    /// compressed messages (see [`super::inflate`]).
    encoding: Option<RequestEncoding>,
    /// What a compressed message being received is charged: its bytes
    /// and its inflated size's limit.
    compressed_charge: u64,
    /// Pieces of the body ready to be handed on, in order: their memory is
    /// charged.
    ready: std::collections::VecDeque<Bytes>,
    /// Where in `held` the bytes not yet handed on (nor kept aside as a
    /// prefix or a compressed message) start.
    pass_from: usize,
    /// A message's prefix, handed on once its memory is charged.
    pending_prefix: Option<[u8; 5]>,
    /// An inflated message (prefix and bytes), handed on once its memory
    /// is charged.
    pending_message: Option<(Bytes, Bytes)>,
    /// `limits.max_message_bytes`: tonic refuses larger messages itself.
    max_message_bytes: u64,
    /// The most bytes HTTP/2 buffers unread for this stream.
    stream_window: u64,
    /// `tenancy.body_timeout_ms`: how long a message's bytes may stop
    /// arriving while it is read.
    body_timeout: Duration,
    /// Runs out `body_timeout` after the last frame, while inside a message.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether a message whose memory is not there now may wait for it
    /// ([`AdmissionLayer::hold_back`]); if not, the call is refused.
    hold_back: bool,
    /// The connection's credit for unread bytes, and its peer.
    credits: Option<(Arc<ConnectionCredits>, std::net::SocketAddr)>,
    /// Credit taken while held back, given back when the wait ends.
    credit_taken: u64,
    /// No message charged yet: the call waits its turn behind the tenant's
    /// other calls; its later messages go ahead of calls not yet started.
    first: bool,
    failed: bool,
}

impl ChargedRequest {
    fn new(
        inner: tonic::body::Body,
        method: ImageMethod,
        admission: Admission,
        account: Arc<Account>,
        memory_wait: Duration,
        max_message_bytes: u64,
    ) -> Self {
        Self {
            inner,
            method,
            admission,
            account,
            memory_wait,
            framing: Framing::Prefix { seen: 0, prefix: [0; 5] },
            held: None,
            scanned: 0,
            waiting: None,
            complete: 0,
            current: 0,
            encoding: None,
            compressed_charge: 0,
            ready: std::collections::VecDeque::new(),
            pass_from: 0,
            pending_prefix: None,
            pending_message: None,
            max_message_bytes,
            stream_window: u64::from(crate::config::HYPER_BDP_LIMIT),
            body_timeout: Duration::from_millis(crate::config::DEFAULT_BODY_TIMEOUT_MS),
            idle: None,
            hold_back: true,
            credits: None,
            credit_taken: 0,
            first: true,
            failed: false,
        }
    }

    /// The most a compressed message of this call may inflate to, and
    /// the limit's name.
    fn inflate_limit(&self) -> (u64, &'static str) {
        match self.method {
            ImageMethod::Other(_) => (self.max_message_bytes, "the limit for calls other than the image methods"),
            _ => (self.admission.policy.max_request_bytes.min(self.max_message_bytes), "the tenant's max_request_bytes"),
        }
    }

    /// What an uncompressed message of `len` bytes is charged when its
    /// prefix arrives.
    fn charge_for(&self, len: u64) -> u64 {
        len.saturating_mul(self.method.reserve_factor())
    }

    /// Scans `held` from `scanned`, moving what may be handed on to
    /// `ready`: returns the charge a message needs before scanning goes on
    /// (its prefix, or its inflated bytes, are handed on once it is
    /// charged), or `None` when the whole frame is scanned.
    ///
    /// A message's prefix is never handed on before its charge, nor split:
    /// its bytes are kept aside until all five have come. A compressed
    /// message (with a `grpc-encoding` the layer inflates) is kept aside
    /// whole, inflated, and handed on uncompressed.
    fn scan(&mut self) -> Result<Option<u64>, Status> {
        if let Some(prefix) = self.pending_prefix.take() {
            self.ready.push_back(Bytes::copy_from_slice(&prefix));
        }
        if let Some((prefix, message)) = self.pending_message.take() {
            self.ready.extend([prefix, message].into_iter().filter(|b| !b.is_empty()));
        }
        // A cheap clone (a reference count), so `self` can be updated.
        let frame = self.held.clone().expect("scanning a held frame");
        let mut at = self.scanned;
        while at < frame.len() {
            match &mut self.framing {
                Framing::Message { remaining } => {
                    let take = (*remaining).min((frame.len() - at) as u64);
                    *remaining -= take;
                    at += take as usize;
                    if *remaining == 0 {
                        self.framing = Framing::Prefix { seen: 0, prefix: [0; 5] };
                        self.message_done();
                    }
                }
                Framing::Compressed { remaining, received } => {
                    let take = (*remaining).min((frame.len() - at) as u64) as usize;
                    received.extend_from_slice(&frame[at..at + take]);
                    *remaining -= take as u64;
                    at += take;
                    self.pass_from = at;
                    if *remaining == 0 {
                        let received = std::mem::take(received).freeze();
                        self.framing = Framing::Prefix { seen: 0, prefix: [0; 5] };
                        self.scanned = at;
                        return self.inflated(received).map(Some);
                    }
                }
                Framing::Prefix { seen, prefix } => {
                    if *seen == 0 && at > self.pass_from {
                        // The previous message's last bytes go on.
                        self.ready.push_back(frame.slice(self.pass_from..at));
                    }
                    let take = (5 - *seen).min(frame.len() - at);
                    prefix[*seen..*seen + take].copy_from_slice(&frame[at..at + take]);
                    *seen += take;
                    at += take;
                    self.pass_from = at;
                    if *seen == 5 {
                        let prefix = *prefix;
                        self.scanned = at;
                        return self.prefix_done(prefix).map(Some);
                    }
                }
            }
        }
        if at > self.pass_from {
            self.ready.push_back(frame.slice(self.pass_from..at));
        }
        self.held = None;
        self.scanned = 0;
        self.pass_from = 0;
        Ok(None)
    }

    /// A message's prefix has come: checks its length and says what the
    /// message is charged.
    fn prefix_done(&mut self, prefix: [u8; 5]) -> Result<u64, Status> {
        let compressed = prefix[0] == 1;
        let len = u64::from(u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]));
        if let ImageMethod::Other(method) = self.method
            && len > self.max_message_bytes
        {
            let limit = self.max_message_bytes;
            return Err(Status::from(ServiceError::from(LimitExceeded::OtherMessage { method, len, limit })));
        }
        if compressed && self.encoding.is_some() {
            self.admission.check_request_bytes(len).map_err(|e| Status::from(ServiceError::from(e)))?;
            // Its bytes, and its inflated size at most: given back to what
            // it needs once inflated.
            let charge = len.saturating_add(self.inflate_limit().0);
            self.compressed_charge = charge;
            if self.method.releases_each_message() {
                self.current = charge;
            }
            self.framing = Framing::Compressed { remaining: len, received: BytesMut::with_capacity(len as usize) };
            if len == 0 {
                // Nothing to wait for: inflated (or refused) now.
                self.framing = Framing::Prefix { seen: 0, prefix: [0; 5] };
                let extra = self.inflated(Bytes::new())?;
                return Ok(charge + extra);
            }
            return Ok(charge);
        }
        self.pending_prefix = Some(prefix);
        self.framing = if len == 0 { Framing::Prefix { seen: 0, prefix: [0; 5] } } else { Framing::Message { remaining: len } };
        if len > self.max_message_bytes {
            // tonic refuses it from this prefix, before reading it.
            return Ok(0);
        }
        self.admission.check_request_bytes(len).map_err(|e| Status::from(ServiceError::from(e)))?;
        let charge = self.charge_for(len);
        if self.method.releases_each_message() {
            self.current = charge;
        }
        Ok(charge)
    }

    /// A compressed message has all come: inflates it within its limit and
    /// makes it the uncompressed message it is handed on as. Returns what
    /// more it must be charged (its charge is adjusted to what the
    /// uncompressed message is charged, plus one copy: tonic copies the
    /// one buffer into its own before this one is dropped).
    fn inflated(&mut self, received: Bytes) -> Result<u64, Status> {
        let encoding = self.encoding.expect("only a call with an encoding inflates");
        let (limit, what) = self.inflate_limit();
        let data = match inflate::inflate(encoding, &received, limit) {
            Ok(data) => Bytes::from(data),
            Err(InflateError::TooLarge) => {
                let tenant = self.account.tenant().clone();
                let compressed = received.len() as u64;
                return Err(Status::from(ServiceError::from(TenancyError::InflatesTooLarge {
                    tenant,
                    encoding: encoding.name(),
                    compressed,
                    limit,
                    what,
                })));
            }
            Err(InflateError::Corrupt(error)) => {
                return Err(Status::from(ServiceError::from(crate::service::InvalidRequest::Compressed {
                    encoding: encoding.name(),
                    error,
                })));
            }
        };
        drop(received);
        let len = data.len() as u64;
        let charged = std::mem::take(&mut self.compressed_charge);
        let target = len.saturating_mul(self.method.reserve_factor().max(2));
        let extra = target.saturating_sub(charged);
        self.account.release(charged.saturating_sub(target));
        if self.method.releases_each_message() {
            self.current = target;
        }
        let mut prefix = [0u8; 5];
        prefix[1..].copy_from_slice(&(len as u32).to_be_bytes());
        self.pending_message = Some((Bytes::copy_from_slice(&prefix), data));
        self.message_done();
        Ok(extra)
    }

    fn give_back_credit(&mut self) {
        if let Some((credits, peer)) = &self.credits
            && self.credit_taken > 0
        {
            credits.give_back(*peer, std::mem::take(&mut self.credit_taken));
        }
    }

    /// Whether a message has begun and not all of it has arrived.
    fn inside_message(&self) -> bool {
        match self.framing {
            Framing::Prefix { seen, .. } => seen > 0,
            Framing::Message { remaining } | Framing::Compressed { remaining, .. } => remaining > 0,
        }
    }

    /// The body timeout ran out: the call is refused and what it holds
    /// for its request is released now.
    fn timed_out(&mut self) -> Status {
        self.failed = true;
        let tenant = self.account.tenant().clone();
        let held = self.account.held();
        self.account.release(held);
        metrics::counter!("imgsvc_body_timeouts_total", "tenant" => tenant.to_string()).increment(1);
        tracing::warn!(%tenant, method = self.method.name(), held, timeout_ms = self.body_timeout.as_millis() as u64, "request bytes stopped arriving: call refused, its memory released");
        Status::from(ServiceError::from(TenancyError::from(memory::MemoryError::BodyTimeout { tenant, timeout: self.body_timeout, held })))
    }

    /// The body ended inside a message: hands on the bytes of it kept
    /// aside (a partial prefix, or a compressed message with its prefix),
    /// unchanged.
    fn hand_on_partial_message(&mut self) {
        match std::mem::replace(&mut self.framing, Framing::Prefix { seen: 0, prefix: [0; 5] }) {
            Framing::Prefix { seen, prefix } => self.ready.push_back(Bytes::copy_from_slice(&prefix[..seen])),
            Framing::Compressed { remaining, received } => {
                let declared = received.len() as u64 + remaining;
                let mut prefix = [1u8; 5];
                prefix[1..].copy_from_slice(&(declared as u32).to_be_bytes());
                self.ready.push_back(Bytes::copy_from_slice(&prefix));
                self.ready.push_back(received.freeze());
            }
            Framing::Message { .. } => {}
        }
    }

    fn message_done(&mut self) {
        if self.method.releases_each_message() {
            self.complete += std::mem::take(&mut self.current);
        }
    }
}

impl Body for ChargedRequest {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        if this.complete > 0 && this.waiting.is_none() && this.held.is_none() && this.ready.is_empty() {
            // Every complete stream message has been decoded and consumed.
            this.account.release(std::mem::take(&mut this.complete));
        }
        loop {
            if let Some(piece) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if let Some(waiting) = this.waiting.as_mut() {
                let result = ready!(waiting.as_mut().poll(cx));
                this.waiting = None;
                this.give_back_credit();
                if let Err(error) = result {
                    this.failed = true;
                    return Poll::Ready(Some(Err(Status::from(ServiceError::from(TenancyError::from(error))))));
                }
                // Held back until now: the sender's time starts again.
                if let Some(idle) = this.idle.as_mut() {
                    idle.as_mut().reset(tokio::time::Instant::now() + this.body_timeout);
                }
            }
            if this.held.is_some() {
                match this.scan() {
                    Err(status) => {
                        this.failed = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                    Ok(Some(charge)) => {
                        // Health and reflection messages (small, bounded) do not
                        // queue behind image calls.
                        let first = std::mem::replace(&mut this.first, false) && !matches!(this.method, ImageMethod::Other(_));
                        let fits = if first { this.account.try_reserve_fair(charge) } else { this.account.try_reserve(charge) };
                        if charge > 0
                            && let Err(refusal) = fits
                        {
                            if let Err(error) = this.account.check_fits(charge) {
                                this.failed = true;
                                return Poll::Ready(Some(Err(Status::from(ServiceError::from(TenancyError::from(error))))));
                            }
                            if !this.hold_back {
                                // Refused now, with its retry delay, rather
                                // than held back (adaptive windows).
                                this.failed = true;
                                memory::count_refusal(this.account.tenant(), "exhausted");
                                return Poll::Ready(Some(Err(Status::from(ServiceError::from(TenancyError::from(refusal))))));
                            }
                            // Held back: its body stays unread in HTTP/2, at most
                            // one stream window, plus the rest of the frame in
                            // hand. Those bytes are covered, while it waits, by
                            // its connection's own charge if that has room, or
                            // else charged now (and the rest waits); when not
                            // even they fit, the call is refused now (the budget
                            // stays exact). The connection's window has room for
                            // every stream's window, so the other calls on it
                            // keep flowing.
                            let in_hand = (this.held.as_ref().map_or(0, Bytes::len) - this.scanned) as u64;
                            let mut unread = in_hand.saturating_add(this.stream_window).min(charge);
                            if let Some((credits, peer)) = &this.credits
                                && credits.take(*peer, unread)
                            {
                                this.credit_taken = unread;
                                unread = 0;
                            } else if let Err(error) = this.account.try_reserve_unread(unread) {
                                this.failed = true;
                                memory::count_refusal(this.account.tenant(), "unread_window");
                                return Poll::Ready(Some(Err(Status::from(ServiceError::from(TenancyError::from(error))))));
                            }
                            if unread == charge {
                                continue;
                            }
                            let account = this.account.clone();
                            let wait = this.memory_wait;
                            this.waiting = Some(Box::pin(async move {
                                let tenant = account.tenant().clone();
                                let on_wait = || memory::count_wait(&tenant);
                                if first {
                                    account.reserve_in_turn(charge - unread, wait, on_wait).await
                                } else {
                                    account.reserve(charge - unread, wait, on_wait).await
                                }
                            }));
                        }
                        continue;
                    }
                    Ok(None) => continue,
                }
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if polled.is_pending() {
                // The message's memory is charged and its bytes have stopped.
                if this.inside_message() {
                    let deadline = tokio::time::Instant::now() + this.body_timeout;
                    let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if idle.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(this.timed_out())));
                    }
                }
                return Poll::Pending;
            }
            if let Some(idle) = this.idle.as_mut() {
                idle.as_mut().reset(tokio::time::Instant::now() + this.body_timeout);
            }
            match ready!(polled) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.held = Some(data),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                None if this.inside_message() => {
                    // The body ended inside a message: what was kept aside
                    // goes on as it came, and tonic reports the truncation
                    // as it would have.
                    this.hand_on_partial_message();
                    continue;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.ready.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Inflated messages are longer than what arrives.
        if self.encoding.is_some() { SizeHint::default() } else { self.inner.size_hint() }
    }
}

impl Drop for ChargedRequest {
    fn drop(&mut self) {
        self.give_back_credit();
    }
}

/// A legacy answer's body with tonic's encoding of the message replaced by
/// the [`SplicedAnswer`]'s three pieces (the pixels not copied); headers
/// and trailers are tonic's.
struct SplicedBody {
    inner: tonic::body::Body,
    answer: Option<SplicedAnswer>,
    pending: std::collections::VecDeque<Bytes>,
}

impl SplicedBody {
    fn new(inner: tonic::body::Body, answer: SplicedAnswer) -> Self {
        Self { inner, answer: Some(answer), pending: std::collections::VecDeque::new() }
    }
}

impl Body for SplicedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(piece) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                // tonic's message (the answer without its pixels): sent as
                // the spliced pieces instead.
                Some(Ok(frame)) if frame.is_data() => {
                    if let Some(answer) = this.answer.take() {
                        this.pending.extend([answer.head, answer.data, answer.tail].into_iter().filter(|b| !b.is_empty()));
                    }
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }
}

/// A response body whose data frames carry their share of the call's
/// account until the transport drops them; holds the call's slot until
/// the answer is sent.
pub struct ChargedResponse {
    inner: tonic::body::Body,
    account: Arc<Account>,
    _slot: CallSlot,
}

impl ChargedResponse {
    fn new(inner: tonic::body::Body, account: Arc<Account>, slot: CallSlot, _method: ImageMethod) -> Self {
        account.set_stage(Stage::Sending);
        Self { inner, account, _slot: slot }
    }
}

/// A frame's bytes and the memory they are charged as: released when the
/// last piece of the frame is dropped.
struct ChargedFrame {
    bytes: Bytes,
    _charge: Arc<Account>,
}

impl AsRef<[u8]> for ChargedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Body for ChargedResponse {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let charge = this.account.split(data.len() as u64, Stage::Sending);
                    if charge.held() == 0 {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(ChargedFrame { bytes: data, _charge: charge })))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
