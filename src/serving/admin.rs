//! The admin listener: plain HTTP/1.1 on its own port (`admin.listen`,
//! default 127.0.0.1:9090), never on the mutual-TLS port.
//!
//! - `GET /metrics`: Prometheus text format (see [`crate::telemetry::metrics`]).
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 while serving, 503 before the gRPC port serves and
//!   from the start of the drain on (readiness: take me out of the pool).
//!
//! It carries no tenant data beyond metric labels and accepts no input, so
//! it has no authentication: bind it to loopback or a private interface.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, sync::watch};

use crate::serving::Phase;

/// 1 while `/readyz` answers 200, else 0 (as of the last scrape).
pub const READY: &str = "imgsvc_ready";

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub phase: watch::Receiver<Phase>,
    pub metrics: PrometheusHandle,
}

/// Answers one admin request. Pure apart from reading the state.
pub fn respond(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match path {
        "/metrics" => {
            // Readiness as a gauge too, for alerting (deploy/monitoring).
            metrics::gauge!(READY).set(if *state.phase.borrow() == Phase::Serving { 1.0 } else { 0.0 });
            state.metrics.run_upkeep();
            let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match *state.phase.borrow() {
            Phase::Serving => text(StatusCode::OK, "serving\n"),
            Phase::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Phase::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Serves admin requests on `listener` until the task is dropped or aborted
/// (the server does so once it has drained).
pub async fn serve(listener: TcpListener, state: AdminState) {
    metrics::describe_gauge!(READY, "1 while /readyz answers 200 (serving), 0 while starting or draining; set at each scrape");
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Finished connections are reaped so the set stays small.
        while connections.try_join_next().is_some() {}
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}
