//! imgsvc: a multi-tenant gRPC image service over mutual TLS.
//!
//! Layers, each in its own module:
//! - [`imaging`]: pure kernels over pixel slices (no I/O, no gRPC): the
//!   `imgsvc-kernels` crate (crates/imgsvc-kernels).
//! - [`proto`]: generated protobuf/gRPC types for both APIs.
//! - [`codec`]: encoded image files ↔ raw pixels, bounded decoding (client
//!   files and v1 encoded images).
//! - [`service`]: protobuf → validated image → kernel → protobuf, and the
//!   single mapping of domain errors to gRPC statuses.
//! - [`identity`]: client certificate → tenant, applied once per request.
//! - [`tls`]: rustls configuration for the server and the client.
//! - [`certwatch`]: TLS files reloaded when they change; certificate expiry.
//! - [`config`]: layered TOML/env configuration, validated in two stages.
//! - [`pki`]: certificate authority and certificate issuing (`gen-certs`).
//! - [`tenancy`]: per-tenant admission, limits and fair scheduling.
//! - [`worker`]: the bounded pool that runs pixel work off the reactor.
//! - [`server`]: binds, serves, and shuts down gracefully.
//! - [`connection`]: calls open per connection, and the idle timeout.
//! - [`client`]: what `imgsvc-client` uses to talk to a server.
//! - [`loadgen`]: the bounded load generator behind `imgsvc-client bench`.
//! - [`admission`]: admission at the request's headers and the byte
//!   accounting of request and response bodies (a tower layer).
//! - [`telemetry`]: tracing subscriber set-up, Prometheus metrics, W3C
//!   trace context.
//! - [`admin`]: the plain-HTTP admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`systemd`]: `sd_notify` readiness, reload, stop and watchdog messages.

pub mod admin;
pub mod admission;
pub mod allocator;
pub mod certwatch;
pub mod client;
pub mod codec;
pub mod config;
pub mod connection;
pub mod fsutil;
pub mod identity;
/// The pure kernels: the `imgsvc-kernels` workspace crate, under the name
/// the rest of the code base uses.
pub use imgsvc_kernels as imaging;
pub mod lanes;
pub mod loadgen;
pub mod pki;
pub mod proto;
pub mod server;
pub mod service;
pub mod systemd;
pub mod telemetry;
pub mod tenancy;
pub mod tls;
pub mod worker;

/// Exit code for configuration errors (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: i32 = 78;
/// Exit code for command-line usage errors (`EX_USAGE` from sysexits.h).
pub const EXIT_USAGE: i32 = 64;
