//! The serving machinery of the daemon: everything between a TCP socket
//! and a call of the image services, and the process around it.
//!
//! - [`server`]: binds, accepts, runs TLS handshakes, serves, reloads, drains.
//! - [`connection`]: the open connections, calls open per connection,
//!   closing a connection gracefully (GOAWAY) and the idle timeout.
//! - [`http2`]: serves each connection (hyper's HTTP/2 over the router) and
//!   carries out its graceful close.
//! - [`lanes`]: each tenant's connections on an I/O runtime of their own.
//! - [`kernel_tls`]: the kernel encrypts a connection's records after the
//!   rustls handshake (`tls.kernel_tls`).
//! - [`deadline`]: call deadlines (`grpc-timeout`, `server.max_deadline_secs`).
//! - [`admission`]: admission at the request's headers and the byte
//!   accounting of request and response bodies (a tower layer).
//! - [`worker`]: the bounded pool that runs pixel work off the reactor.
//! - [`admin`]: the plain-HTTP admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`systemd`]: `sd_notify` readiness, reload, stop and watchdog messages.
//! - [`certwatch`]: reloads the TLS files when they change on disk.
//! - [`allocator`]: glibc malloc tuned for image buffers, and the trimmer.
//!
//! What does not live here: domain rules (who may do what, how much, in
//! which order: [`crate::tenancy`]; certificate → tenant: [`crate::identity`];
//! protobuf → image → kernel: [`crate::service`]) and the kernels
//! (`imgsvc-kernels`). The serving modules depend on the domain, never the
//! other way round; their shared state ([`Phase`]) lives here so that no two
//! of them import each other.

pub mod admin;
pub mod admission;
pub mod ageing;
pub mod allocator;
pub mod certwatch;
pub mod connection;
pub mod deadline;
pub mod http2;
pub mod inflate;
pub mod kernel_tls;
pub mod lanes;
pub mod server;
pub mod systemd;
pub mod unary;
pub mod worker;

/// Where a server is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not serving yet.
    Starting,
    /// The gRPC port accepts connections and health says SERVING.
    Serving,
    /// Shutdown started: health says NOT_SERVING, in-flight requests drain.
    Draining,
}
