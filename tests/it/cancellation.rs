//! Deadlines and disconnects cancel queued work before it runs: the job
//! leaves its tenant's queue without taking any of the memory budget, its
//! kernel never runs, `/metrics` counts it, and the server keeps serving.
//!
//! Its test runs in a process of its own: it asserts exact values of
//! process-wide gauges (memory in flight).

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::v1::{self, Image, PixelFormat, ProcessRequest, image_service_client::ImageServiceClient, operation::Kind};
use rusty_fork::rusty_fork_test;
use tonic::{Code, transport::Channel};

const HOLDER: &str = "cancel-holder";
const CANCELLED: &str = "cancel-queued";
const PROCESS: &str = "imgsvc.v1.ImageService/Process";

/// The request that holds the only worker: the most mean filters a request
/// may have (`limits.max_operations` at most) over a 2500x2500 RGB image,
/// seconds of work, several times what the steps below take while it runs.
const HOLD_OPERATIONS: usize = 1024;
const HOLD_SIDE: u32 = 2500;
/// Queued requests: above `limits.inline_max_pixels` (64Ki), so that they
/// wait for the worker instead of running on the connection's thread.
const QUEUED_SIDE: u32 = 300;

fn request(side: u32, mean_filters: usize) -> ProcessRequest {
    let bytes = (side * side * 3) as usize;
    ProcessRequest {
        image: Some(Image {
            format: PixelFormat::Rgb8 as i32,
            width: side,
            height: side,
            data: Bytes::from(vec![9u8; bytes]),
            encoded: None,
        }),
        operations: vec![v1::Operation { kind: Some(Kind::MeanFilter(v1::MeanFilter {})) }; mean_filters],
        output: None,
    }
}

fn client(channel: Channel) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

rusty_fork_test! {
    /// In a process of its own: asserts exact values of the process-wide memory gauge.
    #[test]
    fn a_deadline_or_a_disconnect_cancels_queued_work_before_it_runs() {
        block_on(cancels_queued_work())
    }
}

async fn cancels_queued_work() {
    let pki = Pki::new(&[HOLDER, CANCELLED]);
    let server = TestServer::start_with(&pki, |raw| {
        raw.server.worker_threads = 1;
        raw.limits.max_operations = HOLD_OPERATIONS;
    });
    let admin = server.admin_addr.unwrap();
    let sample = |name: &str, labels: &[(&str, &str)]| metric(&scrape(admin), name, labels);
    let tenant = ("tenant", CANCELLED);

    // The only worker runs the holder's request; the memory budget holds
    // its input and two intermediate images.
    let mut holder = client(channel(&server, &pki, HOLDER).await);
    let held = tokio::spawn(async move { holder.process(request(HOLD_SIDE, HOLD_OPERATIONS)).await });
    until_load(&server, HOLDER, "1 running", |l| l.running == 1).await;
    let held_bytes = f64::from(HOLD_SIDE * HOLD_SIDE * 3 * 3);
    assert_eq!(sample("imgsvc_memory_in_flight_bytes", &[]), Some(held_bytes));

    let channel = channel(&server, &pki, CANCELLED).await;
    // A caller that goes away while its request waits.
    let dropped = tokio::spawn({
        let mut c = client(channel.clone());
        async move { c.process(request(QUEUED_SIDE, 1)).await }
    });
    until_load(&server, CANCELLED, "1 queued", |l| l.queued == 1).await;
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    let cancelled = until_metric(admin, "imgsvc_cancelled_while_queued_total", &[tenant], 1.0, Duration::from_secs(10)).await;
    assert_eq!(cancelled, Some(1.0), "the dropped request is counted as cancelled");
    until_load(&server, CANCELLED, "an empty queue", |l| l.queued == 0).await;

    // A deadline that passes while the request waits.
    let mut with_deadline = tonic::Request::new(request(QUEUED_SIDE, 1));
    with_deadline.set_timeout(Duration::from_millis(300));
    let status = client(channel.clone()).process(with_deadline).await.unwrap_err();
    // The server answers DEADLINE_EXCEEDED when the deadline passes; tonic's
    // client enforces the same deadline itself, and when the server's answer
    // is later than its own timer (a busy machine) it reports CANCELLED.
    let seen = (status.code(), status.message());
    assert!(
        seen == (Code::DeadlineExceeded, "the call's deadline (300 ms, grpc-timeout) has passed")
            || seen == (Code::Cancelled, "Timeout expired"),
        "{seen:?}"
    );
    let cancelled = until_metric(admin, "imgsvc_cancelled_while_queued_total", &[tenant], 2.0, Duration::from_secs(10)).await;
    assert_eq!(cancelled, Some(2.0), "the request past its deadline is counted as cancelled");

    // Neither ran nor took memory, and the queue is empty.
    assert_eq!(
        server.tenancy().load(&imgsvc::identity::TenantId::parse(HOLDER).unwrap()).running,
        1,
        "the holder still runs (else make it longer)"
    );
    assert_eq!(server.tenancy().load(&imgsvc::identity::TenantId::parse(CANCELLED).unwrap()), Default::default());
    assert_eq!(sample("imgsvc_jobs_started_total", &[tenant]), None, "no job of the cancelled requests started");
    assert_eq!(sample("imgsvc_queue_depth", &[tenant]), Some(0.0));
    assert_eq!(sample("imgsvc_memory_in_flight_bytes", &[]), Some(held_bytes), "the budget holds the holder's images only");
    // The dropped call is CANCELLED; the one past its deadline is
    // DEADLINE_EXCEEDED, or CANCELLED if the client's own timer reset the
    // stream before the server's fired.
    let ended = |code| sample("imgsvc_requests_total", &[tenant, ("method", PROCESS), ("code", code)]).unwrap_or(0.0);
    for _ in 0..500 {
        if ended("CANCELLED") + ended("DEADLINE_EXCEEDED") >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ended("CANCELLED") + ended("DEADLINE_EXCEEDED"), 2.0);
    assert!(ended("CANCELLED") >= 1.0);

    // The holder finishes, its memory is released, and the tenant whose
    // requests were cancelled is served: its first job to run.
    let done = held.await.unwrap().expect("the held request completes").into_inner().image.unwrap();
    assert_eq!((done.width, done.height), (HOLD_SIDE, HOLD_SIDE));
    assert_eq!(sample("imgsvc_jobs_started_total", &[("tenant", HOLDER)]), Some(1.0));
    let released = until_metric(admin, "imgsvc_memory_in_flight_bytes", &[], 0.0, Duration::from_secs(10)).await;
    assert_eq!(released, Some(0.0));
    let image = client(channel).process(request(QUEUED_SIDE, 1)).await.expect("served after the cancellations").into_inner().image.unwrap();
    assert_eq!(image.data, Bytes::from(vec![9u8; (QUEUED_SIDE * QUEUED_SIDE * 3) as usize]));
    assert_eq!(sample("imgsvc_jobs_started_total", &[tenant]), Some(1.0));
    assert_eq!(sample("imgsvc_cancelled_while_queued_total", &[tenant]), Some(2.0));
}
