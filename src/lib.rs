//! imgsvc: a multi-tenant gRPC image service over mutual TLS.
//!
//! Three kinds of module (the rule: tools and serving depend on the
//! domain; the domain depends on no serving module but the worker pool its
//! scheduler hands jobs to; the kernels depend on nothing of ours):
//!
//! The domain
//! - [`imaging`]: pure kernels over pixel slices (no I/O, no gRPC): the
//!   `imgsvc-kernels` crate (crates/imgsvc-kernels).
//! - [`service`]: protobuf → validated image → kernel → protobuf, and the
//!   single mapping of domain errors to gRPC statuses; `service::encoded`
//!   for v1's encoded-image messages.
//! - [`tenancy`]: per-tenant admission, limits, fair scheduling and the
//!   memory budget (`tenancy::memory`).
//! - [`identity`]: client certificate → tenant, applied once per request.
//! - [`imagefile`]: encoded image files (PNG, JPEG, …) ↔ raw pixels, bounded
//!   decoding (client files and v1 encoded images).
//! - [`proto`]: generated protobuf/gRPC types for both APIs, and their
//!   protobuf codec (`proto::codec`).
//!
//! The daemon's machinery
//! - [`serving`]: accept loop, TLS handshakes, connections, I/O lanes, the
//!   admission layer, the worker pool, the admin listener, systemd, TLS file
//!   watching, the allocator (see its docs).
//! - [`config`]: layered TOML/env configuration, validated in two stages.
//! - [`tls`]: rustls configuration for the server and the client.
//! - [`telemetry`]: tracing subscriber set-up, Prometheus metrics, W3C
//!   trace context.
//!
//! The tools
//! - [`client`]: what `imgsvc-client` uses to talk to a server.
//! - [`loadgen`]: the bounded load generator behind `imgsvc-client bench`.
//! - [`pki`]: certificate authority and certificate issuing (`gen-certs`).
//! - [`fsutil`]: files written whole or not at all.

pub mod client;
pub mod config;
pub mod fsutil;
pub mod identity;
pub mod imagefile;
/// The pure kernels: the `imgsvc-kernels` workspace crate, under the name
/// the rest of the code base uses.
pub use imgsvc_kernels as imaging;
pub mod loadgen;
pub mod pki;
pub mod proto;
pub mod service;
pub mod serving;
pub mod telemetry;
pub mod tenancy;
pub mod tls;

/// Exit code for configuration errors (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: i32 = 78;
/// Exit code for command-line usage errors (`EX_USAGE` from sysexits.h).
pub const EXIT_USAGE: i32 = 64;
