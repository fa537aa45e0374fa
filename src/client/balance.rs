//! Client-side balancing across several servers.
//!
//! [`Endpoint`]s are `host:port` pairs; [`Balancer::resolve`] turns each
//! into one target per address its host resolves to (a DNS name with three
//! A records is three servers), verifying every server's certificate
//! against the name that was given. Calls go round-robin; a call that fails
//! because a server is unreachable or going away (connect failure,
//! `UNAVAILABLE`, or a connection that broke mid-call: `UNKNOWN`,
//! `CANCELLED`) is retried on the next server, at most
//! [`Balancer::max_attempts`] times. That is safe because both operations
//! are idempotent. A server that failed that way is skipped for
//! [`COOL_DOWN`] unless every server is cooling down.
//!
//! A RESOURCE_EXHAUSTED refusal that says when to retry
//! (`google.rpc.RetryInfo` or `grpc-retry-pushback-ms`) is retried after
//! that delay (at most [`MAX_RETRY_DELAY`]), within the same attempt bound.
//! Other refusals that another server would repeat (invalid image, over a
//! limit, no tenant, deadline) are returned as they are.

use std::{
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::transport::Channel;

use super::{Api, CallOptions, ClientError, Op, RawImage, Target, connect, process_with};
use crate::tls::ClientCredentials;

/// How long a server that failed a call is passed over.
pub const COOL_DOWN: Duration = Duration::from_secs(5);

/// Most attempts per call, whatever the number of servers.
pub const MAX_ATTEMPTS: usize = 8;

/// The longest server-requested delay the client waits before a retry; a
/// longer one is returned as the error.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// A `host:port` the user named (`--endpoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Parses `host:port`, `1.2.3.4:port` or `[::1]:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not HOST:PORT (e.g. imgsvc.example.com:50051, 10.0.0.5:50051, [::1]:50051)");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        if host.is_empty() {
            return Err(bad());
        }
        let port = port.parse().map_err(|_| bad())?;
        Ok(Self { host: host.to_string(), port })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') { write!(f, "[{}]:{}", self.host, self.port) } else { write!(f, "{}:{}", self.host, self.port) }
    }
}

/// Round-robin over resolved servers, with retries on another server.
pub struct Balancer {
    targets: Vec<Target>,
    credentials: ClientCredentials,
    channels: Vec<tokio::sync::Mutex<Option<Channel>>>,
    cooling: Mutex<Vec<Option<Instant>>>,
    next: AtomicUsize,
    retries: AtomicUsize,
    max_attempts: usize,
}

impl Balancer {
    /// Resolves every endpoint (each address becomes a server; duplicates
    /// are dropped). `server_name` overrides the name checked in server
    /// certificates; by default it is each endpoint's host as given.
    pub async fn resolve(
        endpoints: &[Endpoint],
        server_name: Option<&str>,
        template: &Target,
        credentials: ClientCredentials,
    ) -> Result<Self, ClientError> {
        let mut targets: Vec<Target> = Vec::new();
        for endpoint in endpoints {
            let addrs = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
                .await
                .map_err(|e| ClientError::Connect { address: endpoint.to_string(), explanation: format!("cannot resolve: {e}") })?;
            for addr in addrs {
                if targets.iter().any(|t| t.host == addr.ip().to_string() && t.port == addr.port()) {
                    continue;
                }
                targets.push(Target {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    server_name: Some(server_name.unwrap_or(&endpoint.host).to_string()),
                    ..template.clone()
                });
            }
        }
        if targets.is_empty() {
            return Err(ClientError::Connect { address: format!("{endpoints:?}"), explanation: "no address to connect to".into() });
        }
        Ok(Self::new(targets, credentials))
    }

    /// Balances over `targets` as they are (no resolution).
    pub fn new(targets: Vec<Target>, credentials: ClientCredentials) -> Self {
        let n = targets.len();
        Self {
            channels: (0..n).map(|_| tokio::sync::Mutex::new(None)).collect(),
            cooling: Mutex::new(vec![None; n]),
            // Start somewhere else each run, so one-shot clients spread too.
            next: AtomicUsize::new(std::process::id() as usize % n.max(1)),
            retries: AtomicUsize::new(0),
            max_attempts: n.clamp(2, MAX_ATTEMPTS),
            targets,
            credentials,
        }
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Calls retried on another server so far.
    pub fn retries(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }

    /// Attempts per call: one per server, at least 2, at most [`MAX_ATTEMPTS`].
    pub fn max_attempts(&self) -> usize {
        self.max_attempts
    }

    /// Applies `ops` to `image` on one server, retrying on the next
    /// server when the failure says the server is unreachable or going away.
    /// Returns the result and the index of the server that produced it.
    pub async fn process(&self, api: Api, image: &RawImage, ops: &[Op]) -> Result<(RawImage, usize), ClientError> {
        self.process_with(api, image, ops, &CallOptions::default()).await
    }

    /// [`Balancer::process`] with compression and streaming options.
    pub async fn process_with(
        &self,
        api: Api,
        image: &RawImage,
        ops: &[Op],
        options: &CallOptions,
    ) -> Result<(RawImage, usize), ClientError> {
        let mut last_error = None;
        for _ in 0..self.max_attempts {
            let i = self.pick();
            let target = &self.targets[i];
            let server_name = target.server_name.clone().unwrap_or_else(|| target.host.clone());
            let result = match self.channel(i).await {
                Ok(channel) => process_with(channel, api, image.clone(), ops, &server_name, options).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(out) => return Ok((out, i)),
                Err(e) if pushed_back(&e).is_some() => {
                    let delay = pushed_back(&e).unwrap_or_default();
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    last_error = Some(e);
                    tokio::time::sleep(delay).await;
                }
                Err(e) if retryable(&e) => {
                    self.fail(i).await;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("max_attempts is at least 1"))
    }

    /// The next server round-robin, passing over those cooling down
    /// (unless all are).
    fn pick(&self) -> usize {
        let n = self.targets.len();
        let now = Instant::now();
        let cooling = self.cooling.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if cooling[i].is_none_or(|until| until <= now) {
                return i;
            }
        }
        self.next.fetch_add(1, Ordering::Relaxed) % n
    }

    async fn channel(&self, i: usize) -> Result<Channel, ClientError> {
        let mut slot = self.channels[i].lock().await;
        if let Some(channel) = slot.as_ref() {
            return Ok(channel.clone());
        }
        let channel = connect(&self.targets[i], &self.credentials).await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn fail(&self, i: usize) {
        // A fresh connection next time: the old one may be half-dead.
        *self.channels[i].lock().await = None;
        self.cooling.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(Instant::now() + COOL_DOWN);
    }
}

/// The delay a RESOURCE_EXHAUSTED refusal asks for before a retry, if it
/// asks for one no longer than [`MAX_RETRY_DELAY`].
pub fn pushed_back(error: &ClientError) -> Option<Duration> {
    match error {
        ClientError::Status { code: tonic::Code::ResourceExhausted, retry_after: Some(delay), .. } if *delay <= MAX_RETRY_DELAY => {
            Some(*delay)
        }
        _ => None,
    }
}

/// Failures another server may not have: the server is unreachable, going
/// away, or the connection broke mid-call. An `INTERNAL` that h2 made on
/// the client's side ("h2 protocol error: …": the connection failed under
/// the call, as when a server closes it right after its GOAWAY) is such a
/// failure too; an `INTERNAL` a server answered is not.
pub fn retryable(error: &ClientError) -> bool {
    match error {
        ClientError::Connect { .. } => true,
        ClientError::Status { code: tonic::Code::Internal, message, .. } => message.starts_with("h2 protocol error"),
        ClientError::Status { code, .. } => {
            matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
        }
        ClientError::Address { .. } | ClientError::BadResponse(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_names_ipv4_and_bracketed_ipv6() {
        assert_eq!(Endpoint::parse("imgsvc.example.com:50051"), Ok(Endpoint { host: "imgsvc.example.com".into(), port: 50051 }));
        assert_eq!(Endpoint::parse("10.0.0.5:1"), Ok(Endpoint { host: "10.0.0.5".into(), port: 1 }));
        assert_eq!(Endpoint::parse("[::1]:50051"), Ok(Endpoint { host: "::1".into(), port: 50051 }));
        assert_eq!(Endpoint::parse("[::1]:50051").unwrap().to_string(), "[::1]:50051");
    }

    #[test]
    fn malformed_endpoints_are_refused_quoting_the_input() {
        for bad in ["imgsvc", "::1:50051", ":50051", "host:port", "host:70000", "[::1:50051"] {
            let err = Endpoint::parse(bad).unwrap_err();
            assert!(err.starts_with(&format!("{bad:?} is not HOST:PORT")), "{err}");
        }
    }

    #[test]
    fn only_transport_failures_are_retried() {
        let status = |code| ClientError::Status { code, message: String::new(), hint: String::new(), retry_after: None };
        assert!(retryable(&ClientError::Connect { address: "a".into(), explanation: "refused".into() }));
        assert!(retryable(&status(tonic::Code::Unavailable)));
        assert!(retryable(&status(tonic::Code::Unknown)));
        let internal = |message: &str| ClientError::Status {
            code: tonic::Code::Internal,
            message: message.into(),
            hint: String::new(),
            retry_after: None,
        };
        assert!(retryable(&internal("h2 protocol error: http2 error")), "the connection broke under the call");
        assert!(!retryable(&internal("the worker pool failed")), "a server's own INTERNAL answer");
        for code in
            [tonic::Code::InvalidArgument, tonic::Code::ResourceExhausted, tonic::Code::Unauthenticated, tonic::Code::DeadlineExceeded]
        {
            assert!(!retryable(&status(code)), "{code:?}");
        }
    }

    fn target(port: u16) -> Target {
        Target {
            host: "127.0.0.1".into(),
            port,
            server_name: None,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }

    fn creds() -> ClientCredentials {
        ClientCredentials { ca_pem: Vec::new(), cert_pem: Vec::new(), key_pem: Vec::new() }
    }

    #[tokio::test]
    async fn picks_round_robin_and_passes_over_cooling_servers() {
        let b = Balancer::new(vec![target(1), target(2), target(3)], creds());
        let first = b.pick();
        let order: Vec<usize> = (0..5).map(|_| b.pick()).collect();
        assert_eq!(order, [1, 2, 0, 1, 2].map(|k| (first + k) % 3));
        b.fail(1).await;
        let picks: Vec<usize> = (0..4).map(|_| b.pick()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
    }

    #[tokio::test]
    async fn a_name_resolving_to_two_addresses_gives_two_servers_checked_against_the_name() {
        let template = target(0);
        let endpoints = [Endpoint::parse("localhost:50051").unwrap(), Endpoint::parse("127.0.0.1:50051").unwrap()];
        let b = Balancer::resolve(&endpoints, None, &template, creds()).await.unwrap();
        let resolved: Vec<(String, Option<String>)> = b.targets().iter().map(|t| (t.address(), t.server_name.clone())).collect();
        // localhost is 127.0.0.1 (and ::1 where configured); the duplicate
        // 127.0.0.1 given explicitly is dropped.
        assert!(resolved.contains(&("127.0.0.1:50051".into(), Some("localhost".into()))), "{resolved:?}");
        assert_eq!(resolved.iter().filter(|(a, _)| a == "127.0.0.1:50051").count(), 1, "{resolved:?}");
        assert_eq!(b.max_attempts(), resolved.len().clamp(2, MAX_ATTEMPTS));
    }
}
