//! Call deadlines: the tower layer that ends a call whose deadline has
//! passed with `DEADLINE_EXCEEDED`.
//!
//! A call's deadline is the client's `grpc-timeout`; for the image methods
//! it is capped at `server.max_deadline_secs`, which is also the deadline of
//! an image call that sends none (so a stalled `ProcessStream` holds its
//! slot and memory for that long at most). Health and reflection calls get
//! only the client's deadline (a health `Watch` may stay open).
//!
//! When the deadline passes before the handler has answered, the handler's
//! future is dropped: a queued job leaves the queue unrun, a running one
//! sees its caller gone and stops at its next band boundary (see
//! [`crate::tenancy::JobState`]), and the client gets a trailers-only
//! `DEADLINE_EXCEEDED` (counted as such in `imgsvc_requests_total`). When
//! it passes while the answer is still being sent (a slow reader), the
//! answer ends with `DEADLINE_EXCEEDED` trailers.
//!
//! What this layer does not do: refuse anything before the deadline, or
//! look at the body.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::{Body, Frame, SizeHint};
use tonic::{Status, codegen::http};

use super::admission::ImageMethod;

tokio::task_local! {
    /// Set, within a call, once its deadline has passed.
    static PASSED: Arc<AtomicBool>;
}

/// Whether the current call's deadline has passed (for the metrics of a
/// call whose handler is dropped: `DEADLINE_EXCEEDED`, not `CANCELLED`).
pub fn passed() -> bool {
    PASSED.try_with(|p| p.load(Ordering::Acquire)).unwrap_or(false)
}

/// The layer; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    max: Duration,
}

impl DeadlineLayer {
    /// Image calls last at most `max` (`server.max_deadline_secs`).
    pub fn new(max: Duration) -> Self {
        Self { max }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner, max: self.max }
    }
}

#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

/// Which deadline a call runs under, for its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Client(Duration),
    Server(Duration),
}

impl Source {
    fn duration(self) -> Duration {
        match self {
            Self::Client(d) | Self::Server(d) => d,
        }
    }

    fn status(self) -> Status {
        match self {
            Self::Client(d) => Status::deadline_exceeded(format!("the call's deadline ({} ms, grpc-timeout) has passed", d.as_millis())),
            Self::Server(d) => Status::deadline_exceeded(format!(
                "the call took longer than the server's maximum of {} s (server.max_deadline_secs)",
                d.as_secs()
            )),
        }
    }
}

/// The deadline of a call to `path` with these headers: the client's
/// `grpc-timeout`, capped for image methods at `max`, which also applies
/// to image calls without one. `None`: no deadline.
fn deadline_of(headers: &http::HeaderMap, path: &str, max: Duration) -> Option<Source> {
    let client = headers.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
    let image = ImageMethod::from_path(path).is_some();
    match (client, image) {
        (Some(c), true) if c > max => Some(Source::Server(max)),
        (Some(c), _) => Some(Source::Client(c)),
        (None, true) => Some(Source::Server(max)),
        (None, false) => None,
    }
}

/// `grpc-timeout`: at most 8 ASCII digits and a unit (H, M, S, m, u, n),
/// as the gRPC over HTTP/2 specification defines it. `None` if malformed.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(source) = deadline_of(request.headers(), request.uri().path(), self.max) else {
            let call = self.inner.call(request);
            return Box::pin(async move { Ok(call.await?.map(tonic::body::Body::new)) });
        };
        let at = tokio::time::Instant::now() + source.duration();
        // The clone that was made ready is the one that serves the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let passed = Arc::new(AtomicBool::new(false));
        let call = PASSED.scope(passed.clone(), inner.call(request));
        Box::pin(async move {
            let mut call = std::pin::pin!(call);
            tokio::select! {
                biased;
                response = &mut call => {
                    let response = response?;
                    Ok(response.map(|body| tonic::body::Body::new(DeadlineBody { inner: tonic::body::Body::new(body), sleep: Box::pin(tokio::time::sleep_until(at)), source, ended: false })))
                }
                () = tokio::time::sleep_until(at) => {
                    // The call is dropped when this block returns, inside its
                    // task-local scope: its metrics see `passed`.
                    passed.store(true, Ordering::Release);
                    Ok(source.status().into_http())
                }
            }
        })
    }
}

/// An answer that ends with `DEADLINE_EXCEEDED` trailers if the deadline
/// passes before it has been sent.
struct DeadlineBody {
    inner: tonic::body::Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    source: Source,
    ended: bool,
}

impl Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if frame.is_none() {
                self.ended = true;
            }
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.ended = true;
            return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(self.source.status())))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `status` as trailers: its `grpc-status` and `grpc-message`.
fn status_trailers(status: Status) -> http::HeaderMap {
    let (parts, _) = status.into_http::<tonic::body::Body>().into_parts();
    parts
        .headers
        .into_iter()
        .filter_map(|(name, value)| Some((name?, value)))
        .filter(|(name, _)| name.as_str().starts_with("grpc-"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_grpc_timeout_unit_and_refuses_malformed_values() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "10s", "-1S", "1.5S", "10"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_answer_names_the_deadline_that_passed() {
        let client = Source::Client(Duration::from_millis(300)).status();
        assert_eq!(
            (client.code(), client.message()),
            (tonic::Code::DeadlineExceeded, "the call's deadline (300 ms, grpc-timeout) has passed")
        );
        let server = Source::Server(Duration::from_secs(300)).status();
        assert_eq!(
            (server.code(), server.message()),
            (tonic::Code::DeadlineExceeded, "the call took longer than the server's maximum of 300 s (server.max_deadline_secs)")
        );
    }

    #[test]
    fn image_calls_get_the_server_maximum_when_none_or_a_longer_one_is_sent() {
        let max = Duration::from_secs(60);
        let headers = |t: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(t) = t {
                h.insert("grpc-timeout", t.parse().unwrap());
            }
            h
        };
        let process = "/imgsvc.v1.ImageService/ProcessStream";
        let health = "/grpc.health.v1.Health/Watch";
        assert_eq!(deadline_of(&headers(None), process, max), Some(Source::Server(max)));
        assert_eq!(deadline_of(&headers(Some("2M")), process, max), Some(Source::Server(max)));
        assert_eq!(deadline_of(&headers(Some("5S")), process, max), Some(Source::Client(Duration::from_secs(5))));
        assert_eq!(deadline_of(&headers(None), health, max), None);
        assert_eq!(deadline_of(&headers(Some("2M")), health, max), Some(Source::Client(Duration::from_secs(120))));
    }
}
