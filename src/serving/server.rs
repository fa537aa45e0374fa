//! Binding, serving and graceful shutdown.
//!
//! [`Server::new`] does everything that can fail because of config (dev
//! certificates, TLS files, the worker pool) without binding a port, so a
//! bad config exits before anything listens. [`bind`] resolves the host and
//! binds every address it names. [`Server::serve`] accepts connections and
//! runs their TLS handshakes, then hands each one to its tenant's I/O lane
//! ([`crate::serving::lanes`]), until `shutdown`
//! completes, then: health NOT_SERVING → stop accepting → drain in-flight
//! requests within `drain_timeout` → return (warning if the drain was cut
//! short). [`Server::phase`] follows that life cycle for readiness
//! (`/readyz`, systemd's `READY=1`/`STOPPING=1`); [`Server::with_admin`]
//! adds the plain-HTTP admin listener ([`crate::serving::admin`]).

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use thiserror::Error;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::task::TaskTracker;
use tonic::codec::CompressionEncoding;

use crate::{
    config::{AdminSettings, Settings, TlsSettings},
    identity::{PeerIdentity, TenantId, TenantInterceptor, TrustDomain},
    pki,
    proto::{nlimage::nl_image_service_server::NlImageServiceServer, v1::image_service_server::ImageServiceServer},
    service::{Processor, legacy::LegacyService, v1::V1Service},
    serving::{
        Phase, admin,
        admission::AdmissionLayer,
        certwatch,
        connection::{CloseReason, ConnectionHandle, OpenConnections, TrackCallsLayer},
        http2::{ConnectionServing, RouterService, ServedConnection},
        kernel_tls,
        lanes::{IoLanes, LaneTcp, ServeLane},
        unary::UnaryHandlers,
        worker::{WorkerError, WorkerPool},
    },
    telemetry::{self, metrics::HandshakeFailure},
    tenancy::{ConnectionSlot, OverConnectionLimit, RuntimePolicy, Tenancy},
    tls::{ServerTls, TlsError},
};

/// Names under which health is reported, besides the overall "" entry.
pub const SERVICE_NAMES: [&str; 2] = ["NLImageService", "imgsvc.v1.ImageService"];

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot generate development certificates in {dir}")]
    DevCerts {
        dir: String,
        #[source]
        source: pki::PkiError,
    },
    #[error(
        "tls.dev_auto_certs writes ca.pem, server.pem and server-key.pem into {dir}, but tls.{key} is {path}: point it there or create the file"
    )]
    DevCertsLayout { dir: String, key: &'static str, path: String },
    #[error("tls.kernel_tls is \"on\" but kernel TLS is unavailable: {0} (\"auto\" falls back to rustls)")]
    KernelTls(String),
    #[error("cannot resolve listen host {host:?}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (admin.listen)")]
    BindAdmin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listen host {host:?} resolves to no address")]
    NoAddress { host: String },
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
}

/// Generates a development PKI where `tls.dev_auto_certs` asks for it and
/// files are missing. Returns true if it wrote anything.
pub fn ensure_dev_certs(tls: &TlsSettings) -> Result<bool, ServerError> {
    if !tls.dev_auto_certs || [&tls.cert, &tls.key, &tls.client_ca].iter().all(|p| p.exists()) {
        return Ok(false);
    }
    let dir = tls.client_ca.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let paths = pki::PkiPaths::new(dir);
    for (key, configured, expected) in
        [("client_ca", &tls.client_ca, paths.ca_cert()), ("cert", &tls.cert, paths.server_cert()), ("key", &tls.key, paths.server_key())]
    {
        if *configured != expected {
            return Err(ServerError::DevCertsLayout { dir: dir.display().to_string(), key, path: configured.display().to_string() });
        }
    }
    let dev = dev_tenant();
    let mut req = pki::IssueRequest::new(dir, tls.trust_domain.clone());
    if !paths.client_cert(&dev).exists() {
        req.tenants.push(dev);
    }
    pki::issue(&req).map_err(|source| ServerError::DevCerts { dir: dir.display().to_string(), source })?;
    Ok(true)
}

/// The tenant that development certificates are issued for.
pub fn dev_tenant() -> TenantId {
    TenantId::parse("dev").expect("\"dev\" is a valid tenant name")
}

/// Resolves `host` and binds every address it names on `port`.
pub async fn bind(host: &str, port: u16) -> Result<Vec<TcpListener>, ServerError> {
    let mut addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|source| ServerError::Resolve { host: host.into(), source })?.collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(ServerError::NoAddress { host: host.into() });
    }
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Binds the admin listener if `admin.listen` enables it.
pub async fn bind_admin(admin: &AdminSettings) -> Result<Option<TcpListener>, ServerError> {
    let Some(addr) = admin.listen else { return Ok(None) };
    let listener = TcpListener::bind(addr).await.map_err(|source| ServerError::BindAdmin { addr, source })?;
    Ok(Some(listener))
}

/// A server whose configuration has been loaded and checked.
pub struct Server {
    settings: Settings,
    tls: ServerTls,
    tenancy: Tenancy,
    tls_config: Arc<watch::Sender<Arc<rustls::ServerConfig>>>,
    current: Arc<Mutex<Settings>>,
    certificates: certwatch::LoadedCertificates,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    phase: watch::Sender<Phase>,
    admin: Option<TcpListener>,
    /// The ciphers the kernel takes over after handshakes; `None`: rustls
    /// encrypts every connection.
    kernel_tls: Option<kernel_tls::KernelTls>,
    kernel_tls_summary: String,
    connections: OpenConnections,
}

impl Server {
    /// Loads TLS material (generating dev certificates if configured) and
    /// starts the worker pool. Binds nothing.
    pub fn new(settings: Settings) -> Result<Self, ServerError> {
        ensure_dev_certs(&settings.tls)?;
        let tls = ServerTls::load(&settings.tls)?;
        let (kernel_tls, kernel_tls_summary) = kernel_tls::resolve(settings.tls.kernel_tls).map_err(ServerError::KernelTls)?;
        let pool = WorkerPool::with_nice(settings.worker_threads, settings.limits.max_queued_jobs, settings.worker_nice)?;
        // Before the tenancy: it publishes gauges (budget, tenant limits)
        // once, and a gauge set before the recorder exists is lost.
        let metrics = telemetry::metrics::install();
        let tenancy = Tenancy::new(RuntimePolicy { limits: settings.limits, tenancy: settings.tenancy.clone() }, pool);
        let (tls_config, _) = watch::channel(tls.config.clone());
        let certificates = certwatch::LoadedCertificates::default();
        certificates.publish(&tls, settings.tls.expiry_warning_days);
        let (phase, _) = watch::channel(Phase::Starting);
        Ok(Self {
            current: Arc::new(Mutex::new(settings.clone())),
            certificates,
            settings,
            tls,
            tenancy,
            tls_config: Arc::new(tls_config),
            metrics,
            phase,
            admin: None,
            kernel_tls,
            kernel_tls_summary,
            connections: OpenConnections::default(),
        })
    }

    /// The gRPC connections served now (each can be closed gracefully).
    pub fn connections(&self) -> OpenConnections {
        self.connections.clone()
    }

    pub fn tls(&self) -> &ServerTls {
        &self.tls
    }

    /// The tenancy runtime (tests observe queues through it).
    pub fn tenancy(&self) -> &Tenancy {
        &self.tenancy
    }

    /// A handle that applies a new configuration to the running server.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            tenancy: self.tenancy.clone(),
            tls_config: self.tls_config.clone(),
            current: self.current.clone(),
            certificates: self.certificates.clone(),
            connections: self.connections.clone(),
        }
    }

    /// Follows the life cycle: `Serving` once the gRPC port serves,
    /// `Draining` from the start of the shutdown.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener` (see
    /// [`bind_admin`]) for as long as [`Server::serve`] runs, drain included.
    pub fn with_admin(mut self, listener: Option<TcpListener>) -> Self {
        self.admin = listener;
        self
    }

    /// Serves on `listeners` until `shutdown` completes, then drains.
    pub async fn serve(self, listeners: Vec<TcpListener>, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
        // TLS files that change are reloaded (tls.watch_files) until serve returns.
        let _watch = certwatch::spawn(self.reload_handle());
        let Self {
            settings,
            tls,
            tenancy,
            tls_config,
            current: _,
            certificates: _,
            metrics,
            phase,
            admin,
            kernel_tls,
            kernel_tls_summary,
            connections,
        } = self;
        let limits = settings.limits;
        let addrs: Vec<String> = listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect();

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in std::iter::once("").chain(SERVICE_NAMES) {
            health.set_service_status(name, tonic_health::ServingStatus::Serving).await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(ServerError::Reflection)?;

        let worker_threads = settings.worker_threads;
        let tenant_count = settings.tenancy.tenants.len();
        let processor = Processor::new(tenancy.clone());
        crate::serving::allocator::spawn_trimmer(tenancy.budget());
        // Compressed requests are always accepted. Responses are compressed
        // only when configured: many clients (grpcio among them) advertise
        // gzip by default, and gzipping megabytes of pixels costs far more
        // CPU than the kernels (pixels rarely compress well anyway).
        let legacy_service = LegacyService::new(processor.clone(), !settings.compress_responses);
        let v1_service = V1Service::new(processor, !settings.compress_responses);
        // The unary image methods from an owned, charged message buffer
        // (serving::unary); tonic's encoder when responses are compressed.
        let unary = (settings.owned_message_buffer && !settings.compress_responses)
            .then(|| UnaryHandlers { legacy: legacy_service.clone(), v1: v1_service.clone() });
        let mut legacy = NlImageServiceServer::new(legacy_service)
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd);
        let mut v1 = ImageServiceServer::new(v1_service)
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd);
        if settings.compress_responses {
            legacy = legacy.send_compressed(CompressionEncoding::Zstd).send_compressed(CompressionEncoding::Gzip);
            v1 = v1.send_compressed(CompressionEncoding::Zstd).send_compressed(CompressionEncoding::Gzip);
        }

        // One summary line, and nothing else until something happens.
        let admin_url = admin.as_ref().and_then(|l| l.local_addr().ok()).map_or("off".to_string(), |a| format!("http://{a}"));
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            listen = ?addrs,
            admin = %admin_url,
            client_ca = %tls.client_ca_subject,
            trust_domain = %settings.tls.trust_domain,
            kernel_tls = %kernel_tls_summary,
            worker_threads,
            tenants = tenant_count,
            unknown_tenants = ?settings.tenancy.unknown_tenants,
            max_image_pixels = limits.max_image_pixels,
            config = %settings.origin,
            "imgsvc-server {} listening on {} (mutual TLS); admin on {admin_url} (/metrics, /healthz, /readyz)",
            env!("CARGO_PKG_VERSION"),
            addrs.join(", "),
        );

        let lingering = TaskTracker::new();
        let lanes = Arc::new(IoLanes::new(
            settings.io_threads,
            settings.max_io_lanes,
            lane_server(&settings, &tenancy, connections, health_service, reflection, (legacy, v1, unary)),
        ));
        let mut admin_task = JoinSet::new();
        if let Some(listener) = admin {
            admin_task.spawn(admin::serve(listener, admin::AdminState { phase: phase.subscribe(), metrics }));
        }
        let mut grpc_accept = JoinSet::new();
        for listener in listeners {
            let accepting = Accepting {
                tls_config: tls_config.subscribe(),
                handshake_timeout: settings.tls.handshake_timeout,
                trust_domain: settings.tls.trust_domain.clone(),
                lanes: lanes.clone(),
                lingering: lingering.clone(),
                tenancy: tenancy.clone(),
                connection_window: settings.http2_connection_window_charge(),
                kernel_tls,
                kernel_tls_close_after_records: settings.tls.kernel_tls_close_after_records,
            };
            grpc_accept.spawn(accept_loop(listener, accepting));
        }
        // The listeners are bound and their accept loops run: a client that
        // connects now is served.
        phase.send_replace(Phase::Serving);

        // The shutdown signal first closes the gRPC listeners (new clients
        // get "connection refused" rather than a connection closed after
        // the handshake), then flips readiness and health, then closes the
        // lanes, whose routers drain their connections; `draining` starts
        // the drain deadline.
        let (draining_tx, mut draining_rx) = tokio::sync::watch::channel(false);
        let health_for_shutdown = health.clone();
        let lanes_for_shutdown = lanes.clone();
        let serve = async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new connections, draining in-flight requests");
            grpc_accept.shutdown().await;
            phase.send_replace(Phase::Draining);
            // Here, not from the task that follows the phase: a drain with
            // nothing in flight can end the process before that task runs.
            super::systemd::notify_stopping();
            for name in std::iter::once("").chain(SERVICE_NAMES) {
                health_for_shutdown.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
            }
            let _ = draining_tx.send(true);
            for served in lanes_for_shutdown.close() {
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "an I/O lane failed");
                }
            }
            Ok::<(), ServerError>(())
        };
        let drain_timeout = settings.drain_timeout;
        let deadline = async move {
            while !*draining_rx.borrow_and_update() {
                if draining_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(drain_timeout).await;
        };
        tokio::pin!(serve);
        let result = tokio::select! {
            result = &mut serve => result,
            () = deadline => {
                tracing::warn!(drain_timeout_secs = drain_timeout.as_secs(), "drain deadline passed: cutting remaining requests short");
                Ok(())
            }
        };
        admin_task.shutdown().await;
        // Let connections closed during the drain finish their lingering
        // close, so the last responses reach the clients intact.
        lingering.close();
        let _ = tokio::time::timeout(LINGER + Duration::from_millis(500), lingering.wait()).await;
        drop(lanes);
        if result.is_ok() {
            tracing::info!("shutdown complete");
        }
        result
    }
}

/// The gRPC router every I/O lane serves, as a [`ServeLane`]: tonic's
/// routes under imgsvc's layers, each connection served by
/// [`ConnectionServing`].
fn lane_server(
    settings: &Settings,
    tenancy: &Tenancy,
    connections: OpenConnections,
    health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    reflection: tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    (legacy, v1, unary): (NlImageServiceServer<LegacyService>, ImageServiceServer<V1Service>, Option<UnaryHandlers>),
) -> ServeLane<LingeringStream> {
    let routes = tonic::service::Routes::new(health_service).add_service(reflection).add_service(legacy).add_service(v1).prepare();
    let router = tower::ServiceBuilder::new()
        .layer(TrackCallsLayer)
        .layer(super::deadline::DeadlineLayer::new(settings.max_deadline))
        .layer(tower::util::MapResponseLayer::new(message_limit_status::<tonic::service::interceptor::ResponseBody<tonic::body::Body>>))
        .layer(tonic::service::InterceptorLayer::new(TenantInterceptor))
        .layer({
            let admission = AdmissionLayer::new(tenancy.clone())
                .stream_window(settings.http2_stream_window_max())
                .connection_charge(settings.http2_connection_window_charge())
                .hold_back(!settings.http2_adaptive_window);
            match unary {
                Some(handlers) => admission.owned_unary(handlers),
                None => admission,
            }
        })
        .service(routes);
    let router = RouterService::new(tower::ServiceExt::map_response(router, |response| response.map(tonic::body::Body::new)));
    let serving = ConnectionServing::new(settings, router, connections);
    Arc::new(move |incoming| Box::pin(serving.clone().serve_lane(incoming)))
}

/// Applies a new configuration to a running server: all or nothing.
#[derive(Clone)]
pub struct ReloadHandle {
    tenancy: Tenancy,
    tls_config: Arc<watch::Sender<Arc<rustls::ServerConfig>>>,
    current: Arc<Mutex<Settings>>,
    certificates: certwatch::LoadedCertificates,
    connections: OpenConnections,
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadReport {
    pub tenants: usize,
    pub client_ca_subject: String,
    /// Changed keys that only take effect after a restart.
    pub restart_needed: Vec<&'static str>,
}

impl ReloadHandle {
    /// Loads and checks everything `settings` names first (TLS files, CRLs);
    /// only then swaps the tenancy policy, limits and TLS configuration.
    /// On error nothing changes. Established connections and in-flight
    /// requests are untouched; new connections use the new certificates.
    pub fn reload(&self, settings: Settings) -> Result<ReloadReport, ServerError> {
        // Held while loading, so that a reload by the file watcher cannot
        // interleave with this one.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let tls = ServerTls::load(&settings.tls)?;
        let restart_needed = restart_only_changes(&current, &settings);
        // tonic's message limits were fixed at the start; the admission
        // layer charges messages up to the same limit, so the one in force
        // stays in force everywhere until a restart (a lower one half
        // applied let messages between the two through uncharged).
        let mut settings = settings;
        settings.limits.max_message_bytes = current.limits.max_message_bytes;
        self.tenancy.reconfigure(RuntimePolicy { limits: settings.limits, tenancy: settings.tenancy.clone() });
        self.tls_config.send_replace(tls.config.clone());
        self.certificates.publish(&tls, settings.tls.expiry_warning_days);
        let report =
            ReloadReport { tenants: settings.tenancy.tenants.len(), client_ca_subject: tls.client_ca_subject.clone(), restart_needed };
        *current = settings;
        Ok(report)
    }

    /// Re-reads the TLS files of the configuration in force (not the config
    /// file) and swaps them in if they differ from those loaded; returns
    /// whether it did. All or nothing, like [`ReloadHandle::reload`]. Used
    /// by the file watcher ([`crate::serving::certwatch`]).
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let tls = ServerTls::load(&current.tls)?;
        if !self.certificates.differs(&tls) {
            return Ok(false);
        }
        self.tls_config.send_replace(tls.config.clone());
        self.certificates.publish(&tls, current.tls.expiry_warning_days);
        Ok(true)
    }

    /// The `[tls]` settings in force.
    pub fn tls_settings(&self) -> TlsSettings {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).tls.clone()
    }

    /// Changes with every reload that swaps the TLS material.
    pub fn tls_changes(&self) -> watch::Receiver<Arc<rustls::ServerConfig>> {
        self.tls_config.subscribe()
    }

    /// The loaded certificates (expiry gauge and warnings).
    pub fn certificates(&self) -> &certwatch::LoadedCertificates {
        &self.certificates
    }

    /// The gRPC connections served now (each can be closed gracefully).
    pub fn connections(&self) -> OpenConnections {
        self.connections.clone()
    }
}

/// Keys whose new values a reload cannot apply to a running server.
fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("server.host", old.host != new.host);
    check("server.port", old.port != new.port);
    check("server.worker_threads", old.worker_threads != new.worker_threads);
    check("server.drain_timeout_secs", old.drain_timeout != new.drain_timeout);
    check("server.max_deadline_secs", old.max_deadline != new.max_deadline);
    check("server.compress_responses", old.compress_responses != new.compress_responses);
    check("server.owned_message_buffer", old.owned_message_buffer != new.owned_message_buffer);
    check("server.http2_keepalive_interval_secs", old.http2_keepalive_interval != new.http2_keepalive_interval);
    check("server.http2_keepalive_timeout_secs", old.http2_keepalive_timeout != new.http2_keepalive_timeout);
    check("server.max_concurrent_streams", old.max_concurrent_streams != new.max_concurrent_streams);
    check("server.http2_stream_window_bytes", old.http2_stream_window_bytes != new.http2_stream_window_bytes);
    check("server.http2_connection_window_bytes", old.http2_connection_window_bytes != new.http2_connection_window_bytes);
    check("server.http2_adaptive_window", old.http2_adaptive_window != new.http2_adaptive_window);
    check("server.http2_max_frame_size", old.http2_max_frame_size != new.http2_max_frame_size);
    check("server.worker_nice", old.worker_nice != new.worker_nice);
    check("server.idle_timeout_secs", old.idle_timeout != new.idle_timeout);
    check("server.max_connection_age_secs", old.max_connection_age != new.max_connection_age);
    check("server.max_connection_age_grace_secs", old.max_connection_age_grace != new.max_connection_age_grace);
    check("server.io_threads", old.io_threads != new.io_threads);
    check("server.max_io_lanes", old.max_io_lanes != new.max_io_lanes);
    check("tls.trust_domain", old.tls.trust_domain != new.tls.trust_domain);
    check("tls.handshake_timeout_secs", old.tls.handshake_timeout != new.tls.handshake_timeout);
    check("tls.kernel_tls", old.tls.kernel_tls != new.tls.kernel_tls);
    check("limits.max_message_bytes", old.limits.max_message_bytes != new.limits.max_message_bytes);
    check("log.level", old.log.level != new.log.level);
    check("log.format", old.log.format != new.log.format);
    check("telemetry.*", old.trace_export != new.trace_export);
    changed
}

/// An established connection: records sealed by rustls, or by the kernel
/// ([`kernel_tls`]).
// One per connection, kept where it is made: boxing the rustls variant to
// save a kilobyte would add a pointer chase to every read and write.
#[allow(clippy::large_enum_variant)]
pub enum ServerStream {
    Rustls(TlsStream<LaneTcp>),
    Kernel(kernel_tls::KernelTlsStream),
}

impl ServerStream {
    fn tcp_mut(&mut self) -> &mut LaneTcp {
        match self {
            ServerStream::Rustls(s) => s.get_mut().0,
            ServerStream::Kernel(s) => s.get_mut(),
        }
    }

    fn into_tcp(self) -> LaneTcp {
        match self {
            ServerStream::Rustls(s) => s.into_inner().0,
            ServerStream::Kernel(s) => s.into_inner(),
        }
    }

    /// The `record_layer` label of `imgsvc_tls_connections_total`.
    fn record_layer(&self) -> &'static str {
        match self {
            ServerStream::Rustls(_) => "rustls",
            ServerStream::Kernel(_) => "kernel",
        }
    }
}

/// Forwards to the variant (both are `Unpin`).
macro_rules! each_stream {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerStream::Rustls($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            ServerStream::Kernel($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for ServerStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_stream!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for ServerStream {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        each_stream!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        each_stream!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        each_stream!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        each_stream!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Rustls(s) => s.is_write_vectored(),
            ServerStream::Kernel(s) => s.is_write_vectored(),
        }
    }
}

/// How long a closed connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// A client connection that closes gracefully. When the server is done
/// with it (after the last response of a drained connection, say), closing
/// the socket at once while the client is still sending — flow-control
/// updates for that last response, typically — makes the kernel answer with
/// a reset, and the client's kernel then discards the response bytes it has
/// not read yet. So on drop the connection half-closes (FIN after all data)
/// and keeps reading, for at most [`LINGER`], until the client closes too.
///
/// It carries the connection's [`ConnectionHandle`] to the lane that serves
/// it ([`crate::serving::http2`]).
pub struct LingeringStream {
    inner: Option<ServerStream>,
    handle: Arc<ConnectionHandle>,
    lingering: TaskTracker,
    /// The connection's HTTP/2 window, charged while it lives.
    _window: Option<Arc<crate::tenancy::memory::Account>>,
    /// One of its tenant's `max_connections`, while it lives.
    _slot: Option<ConnectionSlot>,
}

impl LingeringStream {
    fn new(
        inner: ServerStream,
        handle: Arc<ConnectionHandle>,
        lingering: TaskTracker,
        window: Option<Arc<crate::tenancy::memory::Account>>,
        slot: Option<ConnectionSlot>,
    ) -> Self {
        Self { inner: Some(inner), handle, lingering, _window: window, _slot: slot }
    }

    fn stream(self: std::pin::Pin<&mut Self>) -> std::pin::Pin<&mut ServerStream> {
        std::pin::Pin::new(self.get_mut().inner.as_mut().expect("present until drop"))
    }
}

impl ServedConnection for LingeringStream {
    fn handle(&self) -> &Arc<ConnectionHandle> {
        &self.handle
    }
}

impl Drop for LingeringStream {
    fn drop(&mut self) {
        let (Some(stream), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current()) else { return };
        self.lingering.spawn_on(
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut tcp = stream.into_tcp().into_inner();
                if tcp.shutdown().await.is_err() {
                    return;
                }
                let mut sink = [0u8; 8192];
                let _ = tokio::time::timeout(LINGER, async {
                    while let Ok(n) = tcp.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            },
            &runtime,
        );
    }
}

impl tokio::io::AsyncRead for LingeringStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let read = std::pin::Pin::new(this.inner.as_mut().expect("present until drop")).poll_read(cx, buf);
        if let std::task::Poll::Ready(Err(e)) = &read {
            this.handle.count_error(super::http2::error_kind(e));
        }
        read
    }
}

impl tokio::io::AsyncWrite for LingeringStream {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

/// tonic answers a request over the decode limit with OUT_OF_RANGE; a
/// message over a configured limit is RESOURCE_EXHAUSTED in gRPC's own
/// implementations and in our error contract. Such refusals are
/// trailers-only responses, so the status is in the headers.
fn message_limit_status<B>(mut response: tonic::codegen::http::Response<B>) -> tonic::codegen::http::Response<B> {
    let headers = response.headers();
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large") || m.contains("message length too large"));
    if too_large {
        response.headers_mut().insert("grpc-status", tonic::codegen::http::HeaderValue::from_static("8"));
    }
    response
}

/// A finished handshake: by tokio-rustls, or for the kernel by rustls's
/// unbuffered API ([`kernel_tls::handshake`]).
enum Handshaken {
    Rustls(TlsStream<LaneTcp>),
    Kernel(kernel_tls::Handshake, kernel_tls::KernelTls),
}

impl Handshaken {
    fn peer_certificates(&self) -> &[rustls::pki_types::CertificateDer<'static>] {
        match self {
            Handshaken::Rustls(s) => s.get_ref().1.peer_certificates().unwrap_or_default(),
            Handshaken::Kernel(h, _) => h.peer_certificates(),
        }
    }
}

/// What an accept loop needs besides its listener.
struct Accepting {
    tls_config: watch::Receiver<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    trust_domain: TrustDomain,
    lanes: Arc<IoLanes<LingeringStream>>,
    lingering: TaskTracker,
    tenancy: Tenancy,
    /// Charged to the tenant's memory share for each connection's life.
    connection_window: u64,
    kernel_tls: Option<kernel_tls::KernelTls>,
    /// Testing only: see `tls.kernel_tls_close_after_records`.
    kernel_tls_close_after_records: Option<u64>,
}

/// Accepts TCP connections, runs each TLS handshake under a deadline on its
/// own task, and hands finished handshakes to the server. Refused handshakes
/// (no client certificate, wrong CA, expired…) are logged with the peer.
async fn accept_loop(listener: TcpListener, accepting: Accepting) {
    let Accepting {
        tls_config,
        handshake_timeout,
        trust_domain,
        lanes,
        lingering,
        tenancy,
        connection_window,
        kernel_tls,
        kernel_tls_close_after_records,
    } = accepting;
    let handshakes = Arc::new(tokio::sync::Semaphore::new(1024));
    let unserved = super::lanes::UnservedConnections::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            telemetry::metrics::handshake_failed(HandshakeFailure::Overload);
            tracing::warn!(%peer, "too many TLS handshakes in progress: dropping connection");
            continue;
        };
        // The newest TLS configuration (reloads take effect here);
        // established connections keep theirs.
        let config = tls_config.borrow().clone();
        let (lanes, lingering, trust_domain, tenancy, unserved) =
            (lanes.clone(), lingering.clone(), trust_domain.clone(), tenancy.clone(), unserved.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // For kernel TLS, rustls's unbuffered API runs the handshake on
            // whole records (see kernel_tls).
            let handshake = async {
                Ok(match kernel_tls {
                    Some(kernel) => {
                        Handshaken::Kernel(kernel_tls::handshake(LaneTcp::new(tcp).bound_reads_to_records(), config).await?, kernel)
                    }
                    None => Handshaken::Rustls(TlsAcceptor::from(config).accept(LaneTcp::new(tcp)).await?),
                })
            };
            match tokio::time::timeout(handshake_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    let certificates = stream.peer_certificates();
                    let identity = PeerIdentity::of(Some(peer), Some(certificates), &trust_domain);
                    let certificates: Vec<_> = certificates.iter().map(|c| c.clone().into_owned()).collect();
                    // A served tenant's connection takes one of its
                    // `max_connections`. Beyond them it is handled like a
                    // peer that is not served (below), but its calls are
                    // refused RESOURCE_EXHAUSTED naming the limit: a gRPC
                    // client reports that status and message as they are
                    // and does not retry it, where a GOAWAY at once would
                    // reach it as UNAVAILABLE, retried on a new connection.
                    let served = identity.tenant.as_ref().ok().filter(|t| tenancy.serves(t));
                    let (tenant_slot, refused) = match served.map(|t| tenancy.admit_connection(t)) {
                        Some(Ok(slot)) => (Some(slot), None),
                        Some(Err(e)) => {
                            metrics::counter!("imgsvc_connections_refused_total", "reason" => "tenant_connections").increment(1);
                            (None, OverConnectionLimit::of(&e))
                        }
                        None => (None, None),
                    };
                    let served = served.filter(|_| refused.is_none());
                    // The request bytes HTTP/2 may buffer for this connection
                    // unread: charged to the tenant (no tenant served: to the
                    // unserved pool), or the connection is closed (its share
                    // is taken by its other connections and calls).
                    let window = match tenancy.connection_account(served, connection_window) {
                        Ok(window) => Some(window),
                        Err(e) => {
                            metrics::counter!("imgsvc_connections_refused_total", "reason" => "memory").increment(1);
                            tracing::warn!(%peer, error = %e, "no memory for the connection's HTTP/2 window: closing it");
                            return;
                        }
                    };
                    // A peer whose calls are all refused (no tenant, one
                    // not configured, or over its tenant's connections) gets
                    // a place in a small allowance, the shared lane and a
                    // short life (see `lanes::UNSERVED_ALLOWANCE`).
                    let unserved = match served {
                        Some(_) => None,
                        None => match unserved.admit() {
                            Some(slot) => Some(slot),
                            None if refused.is_some() => return, // counted, and logged by `admit_connection`
                            None => {
                                metrics::counter!("imgsvc_connections_refused_total", "reason" => "unserved").increment(1);
                                tracing::warn!(%peer, "too many connections of peers that are not served: closing it");
                                return;
                            }
                        },
                    };
                    // Served on the tenant's I/O lane (see `crate::serving::lanes`);
                    // none once shutting down: the connection is dropped.
                    let lane = match lanes.lane(served) {
                        Ok(Some(lane)) => lane,
                        Ok(None) => return,
                        Err(e) => {
                            tracing::error!(%peer, error = %e, "cannot start an I/O lane: dropping connection");
                            return;
                        }
                    };
                    let tenant_label = identity.tenant_label();
                    let mut stream = match stream {
                        Handshaken::Kernel(handshake, kernel) => {
                            match kernel_tls::offload(handshake, kernel, kernel_tls_close_after_records, tenant_label.clone()) {
                                Ok(stream) => ServerStream::Kernel(stream),
                                Err(e) => {
                                    metrics::counter!("imgsvc_connections_refused_total", "reason" => "kernel_tls").increment(1);
                                    tracing::warn!(%peer, error = %e, "cannot move the connection to kernel TLS: closing it");
                                    return;
                                }
                            }
                        }
                        Handshaken::Rustls(stream) => ServerStream::Rustls(stream),
                    };
                    metrics::counter!("imgsvc_tls_connections_total", "tenant" => tenant_label, "record_layer" => stream.record_layer())
                        .increment(1);
                    if let Err(e) = stream.tcp_mut().rehome(&lane.runtime) {
                        tracing::warn!(%peer, error = %e, "cannot move the connection to its I/O lane: dropping it");
                        return;
                    }
                    let close_reason = if refused.is_some() { CloseReason::TenantConnections } else { CloseReason::Unconfigured };
                    let handle = ConnectionHandle::refusing(peer, identity, certificates, refused);
                    if let ServerStream::Kernel(kernel) = &stream {
                        // Where the keys cannot change (TLS 1.2, a kernel
                        // before 6.14): near the sending key's limit, or
                        // after a client's KeyUpdate, GOAWAY; calls in
                        // flight finish.
                        let (key_limit, handle) = (kernel.key_limit(), Arc::downgrade(&handle));
                        tokio::spawn(async move {
                            if key_limit.reached().await
                                && let Some(handle) = handle.upgrade()
                            {
                                handle.close_gracefully(CloseReason::KeyLimit, kernel_tls::KEY_LIMIT_GRACE);
                            }
                        });
                    }
                    if let Some(slot) = unserved {
                        let handle = handle.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(super::lanes::UNSERVED_LIFETIME).await;
                            handle.close_gracefully(close_reason, super::lanes::UNSERVED_GRACE);
                            tokio::time::sleep(super::lanes::UNSERVED_GRACE).await;
                            drop(slot);
                        });
                    }
                    let _ = lane.connections.send(LingeringStream::new(stream, handle, lingering, window, tenant_slot)).await;
                }
                Ok(Err(e)) => {
                    let reason = HandshakeFailure::classify(&e);
                    telemetry::metrics::handshake_failed(reason);
                    tracing::warn!(%peer, error = %e, reason = reason.label(), "TLS handshake refused");
                }
                Err(_) => {
                    telemetry::metrics::handshake_failed(HandshakeFailure::Timeout);
                    tracing::warn!(%peer, timeout_secs = handshake_timeout.as_secs(), "TLS handshake timed out");
                }
            }
        });
    }
}
