//! The integration tests, one binary: a module per capability, all sharing
//! the harness in [`common`]. One binary links the dependency tree once
//! (33 test files were 33 links of the whole tree).
//!
//! Run one capability with a filter: `cargo test --profile ci --test it mtls::`.
//!
//! # One process, shared by every test
//! The tests run in parallel threads of one process, so nothing a test
//! asserts may depend on process-wide state that other tests change:
//! - Metrics: the Prometheus recorder is process-wide (installed once,
//!   `imgsvc::telemetry::metrics::install`). Tests count requests under
//!   tenants of their own; a test that asserts an exact value of a series
//!   with no tenant label (refused handshakes, the memory budget gauge)
//!   runs in a process of its own (below).
//! - The tracing subscriber: the first test server installs it, the rest
//!   reuse it; no test reads the in-process logs (log tests read the
//!   server binary's stderr).
//! - No test sets environment variables or the working directory of this
//!   process: child processes get theirs through `Command`.
//!
//! A test that must measure the whole process (the largest allocation, in
//! [`decode_limits`]) or read a process-wide series exactly runs in a child
//! process of this binary that runs that test alone (`rusty_fork_test!`:
//! the binary re-runs itself with `--exact <test>`). Same name, same
//! assertions; the parent passes when the child does.
//!
//! # The `otlp` feature
//! `otlp_export` (the server's span export to an OTLP collector) is a
//! module here compiled only with the `otlp` cargo feature. CI builds the
//! whole suite with it (`cargo test --locked --profile ci --features
//! imgsvc/otlp --tests`, one build); a plain `cargo test --profile ci` leaves
//! that module out and runs instead the config test for a build without
//! the feature. Until 2026-12-07 it was a second test binary: a second
//! compile of the harness and a second link of every dependency, about
//! 40 s of CI's test build.

mod common;

#[cfg(feature = "otlp")]
mod otlp_export;

mod batch;
mod bench;
mod cancellation;
mod cert_rotation;
mod cli;
mod compression;
mod config;
mod connection_ageing;
mod connection_hygiene;
mod container;
mod decode_limits;
mod deploy_files;
mod encoded_images;
mod fairness;
mod faults;
mod formats;
mod gen_certs;
mod h2raw;
mod haproxy;
mod health;
mod interop_grpcio;
mod invalid_input;
mod isolation;
mod kernel_tls;
mod kernels;
mod legacy_api;
mod listen;
mod load_balancing;
mod logs;
mod mean_filter;
mod memory_admission;
mod memory_bound;
mod metrics;
mod monitoring;
mod mtls;
mod rotate;
mod shutdown;
mod soak;
mod steady_load;
mod streaming;
mod systemd;
mod tenancy;
mod tls_matrix;
