//! OTLP trace export (cargo feature `otlp`): the server binary sends its
//! request spans to an OTLP/gRPC collector, under the caller's W3C trace,
//! and flushes them when it shuts down.
//!
//! `cargo test --locked --profile ci --features otlp --test it otlp_export::`
//! (a module of the one test binary, compiled with the `otlp` feature only:
//! see `main.rs`).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::nlimage::{NlImage, nl_image_service_client::NlImageServiceClient};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
/// A caller that decided not to sample its trace (flags 00).
const UNSAMPLED_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// A span as the collector received it, with its resource's service name.
#[derive(Clone, Debug)]
struct Exported {
    service_name: Option<String>,
    span: Span,
}

/// An in-process OTLP/gRPC collector on 127.0.0.1 that keeps what it gets.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans.resource.as_ref().and_then(|r| string_attribute(&r.attributes, "service.name"));
            for scope_spans in resource_spans.scope_spans {
                spans.extend(scope_spans.spans.into_iter().map(|span| Exported { service_name: service_name.clone(), span }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn received(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn mean_filter(pki: &Pki, server: &ServerProcess, traceparent: Option<&str>) {
    let channel = imgsvc::client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
    let mut request = tonic::Request::new(NlImage { color: false, width: 3, height: 2, data: Bytes::from_static(&[1, 2, 3, 4, 5, 6]) });
    if let Some(tp) = traceparent {
        request.metadata_mut().insert("traceparent", tp.parse().unwrap());
    }
    let reply = NlImageServiceClient::new(channel).mean_filter(request).await.unwrap().into_inner();
    assert_eq!((reply.width, reply.height), (3, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_the_collector_under_the_callers_trace_and_are_flushed_at_shutdown() {
    let collector = Collector::default();
    let collector_addr = collector.start().await;
    let pki = Pki::new(&["alpha"]);
    let config = format!("[telemetry]\notlp_endpoint = \"http://{collector_addr}\"\nservice_name = \"imgsvc-under-test\"\n");
    // A batch delay far beyond the test: spans can only arrive through the
    // flush at shutdown.
    let mut server = ServerProcess::spawn_with(&pki, &config, &[("OTEL_BSP_SCHEDULE_DELAY", "600000")]);

    mean_filter(&pki, &server, Some(&format!("00-{TRACE_ID}-{PARENT_ID}-01"))).await;
    mean_filter(&pki, &server, Some(&format!("00-{UNSAMPLED_TRACE_ID}-{PARENT_ID}-00"))).await;
    mean_filter(&pki, &server, None).await;
    assert_eq!(collector.received().len(), 0, "nothing is exported before the batch delay or shutdown");

    let status = server.terminate();
    let log: Vec<String> = server.logs.try_iter().collect();
    assert!(status.success(), "{status:?}: {log:#?}");
    assert!(log.iter().any(|l| l.contains("flushed spans to the OTLP collector")), "{log:#?}");

    // The flush finished before the process exited: everything is here.
    let received = collector.received();
    assert!(received.iter().all(|e| e.service_name.as_deref() == Some("imgsvc-under-test")), "{received:#?}");
    let spans: Vec<&Span> = received.iter().map(|e| &e.span).collect();
    assert!(!spans.iter().any(|s| hex(&s.trace_id) == UNSAMPLED_TRACE_ID), "a caller's unsampled trace is not exported: {spans:#?}");

    // The caller's span is the parent of our server span…
    let in_trace: Vec<&Span> = spans.iter().copied().filter(|s| hex(&s.trace_id) == TRACE_ID).collect();
    assert_eq!(in_trace.len(), 2, "a request span and its RPC span: {spans:#?}");
    let request = in_trace.iter().find(|s| hex(&s.parent_span_id) == PARENT_ID).expect("a span whose parent is the caller's span");
    assert_eq!(request.name, "NLImageService/MeanFilter");
    assert_eq!(request.kind, SpanKind::Server as i32);
    // …and the RPC span, with the method, tenant and image, is its child.
    let rpc = in_trace.iter().find(|s| s.parent_span_id == request.span_id).expect("the RPC span under the request span");
    assert_eq!(rpc.name, "rpc");
    assert_eq!(string_attribute(&rpc.attributes, "method").as_deref(), Some("NLImageService/MeanFilter"));
    assert_eq!(string_attribute(&rpc.attributes, "tenant").as_deref(), Some("alpha"));
    assert_eq!(string_attribute(&rpc.attributes, "status").as_deref(), Some("Ok"));
    assert_eq!((int_attribute(&rpc.attributes, "width"), int_attribute(&rpc.attributes, "height")), (Some(3), Some(2)));

    // A request without traceparent starts its own trace (sample_ratio 1).
    let roots: Vec<&&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{spans:#?}");
    assert_ne!(hex(&roots[0].trace_id), TRACE_ID);
    assert_eq!(roots[0].name, "NLImageService/MeanFilter");
    assert_eq!(spans.len(), 4, "two spans per sampled request: {spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_does_not_affect_serving_or_shutdown() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pki = Pki::new(&["alpha"]);
    let config = format!("[telemetry]\notlp_endpoint = \"http://{closed}\"\n");
    let mut server = ServerProcess::spawn_with(&pki, &config, &[("OTEL_BSP_SCHEDULE_DELAY", "600000")]);
    mean_filter(&pki, &server, Some(&format!("00-{TRACE_ID}-{PARENT_ID}-01"))).await;
    let started = std::time::Instant::now();
    let status = server.terminate();
    let log: Vec<String> = server.logs.try_iter().collect();
    assert!(status.success(), "{status:?}: {log:#?}");
    assert!(started.elapsed() < Duration::from_secs(15), "the flush gives up within its deadline: {:?}", started.elapsed());
    assert!(log.iter().any(|l| l.contains("flushing spans to the OTLP collector failed")), "{log:#?}");
}
