//! Every path into the server is admitted against the memory budget, and a
//! call waiting for memory never stalls another: many large calls on one
//! connection, where the tenant's share fits one at a time, are all served
//! one after another, none refused.

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    client,
    proto::nlimage::{NlImage, NlImageRotateRequest, nl_image_rotate_request::Rotation, nl_image_service_client::NlImageServiceClient},
};

/// `n` concurrent half turns of 3000×2000 RGB images (18 MB each) on one
/// channel; each task says whether its answer kept the pixels (constant
/// images: a half turn keeps them).
fn half_turns(
    client: &NlImageServiceClient<tonic::transport::Channel>,
    n: u8,
) -> impl Iterator<Item = tokio::task::JoinHandle<Result<bool, tonic::Status>>> + use<> {
    let client = client.clone();
    (0..n).map(move |i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let image = rgb(3000, 2000, i + 1);
            let request = NlImageRotateRequest { rotation: Rotation::OneEightyDeg as i32, image: Some(image.clone()) };
            client.rotate_image(request).await.map(|answer| answer.into_inner().data == image.data)
        })
    })
}

fn rgb(width: u32, height: u32, fill: u8) -> NlImage {
    NlImage { color: true, width: width as i32, height: height as i32, data: Bytes::from(vec![fill; width as usize * height as usize * 3]) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_calls_on_one_channel_beyond_the_share_are_all_served_one_after_another() {
    let pki = Pki::new(&["alpha"]);
    // A 128 MiB budget: alpha's share is 64 MiB. Its connection takes 6 MiB
    // (5 MiB window, 1 MiB frame); an 18 MB rotation is charged 36 MB (input
    // and output), so one call fits at a time, and the three held back are
    // each charged the stream window they may hold unread (4 MiB and up to
    // one 1 MiB frame): 6 + 34.3 + 15 = 55.3 MiB <= 64 < 6 + 2 x 34.3.
    let extra = "[tenancy]\nmemory_budget_bytes = 134217728\nmemory_wait_ms = 30000\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let channel = client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
    let client = NlImageServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);

    let calls = half_turns(&client, 4);
    let mut served = 0;
    for call in calls.collect::<Vec<_>>() {
        let result = tokio::time::timeout(Duration::from_secs(60), call).await.expect("served, not stalled").unwrap();
        match result {
            Ok(same) => {
                assert!(same, "the exact answer");
                served += 1;
            }
            Err(status) => panic!("expected every call served, got {:?}: {}", status.code(), status.message()),
        }
    }
    assert_eq!(served, 4);
    let text = scrape(server.admin_addr);
    let labels = [("tenant", "alpha")];
    assert!(metric(&text, "imgsvc_memory_waits_total", &labels).is_some_and(|w| w >= 1.0), "calls waited for memory:\n{text}");
    for reason in ["exhausted", "never_fits", "unread_window"] {
        assert_eq!(metric(&text, "imgsvc_memory_refusals_total", &[("tenant", "alpha"), ("reason", reason)]), None, "{reason}");
    }
    assert_eq!(metric(&text, "imgsvc_requests_total", &[("tenant", "alpha"), ("code", "OK")]).unwrap_or(0.0), 4.0, "{text}");
}

/// The status a raw HTTP/2 call is answered with (its body read and dropped).
async fn status_of(answer: h2::client::ResponseFuture) -> tonic::Status {
    let response = tokio::time::timeout(Duration::from_secs(10), answer).await.expect("answered").unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    tonic::Status::from_header_map(&body.trailers().await.unwrap().expect("trailers")).expect("a grpc-status")
}

/// The 5-byte gRPC prefix of a message of `len` bytes.
fn prefix(len: u32) -> Bytes {
    let mut out = vec![0];
    out.extend_from_slice(&len.to_be_bytes());
    out.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_bytes_stop_arriving_is_refused_after_the_body_timeout_and_its_memory_released() {
    let pki = Pki::new(&["alpha", "beta", "gamma"]);
    // A 96 MiB budget, shares of 48 MiB; each connection is charged 6 MiB.
    // alpha and gamma each declare a message charged 39 MiB (twice its
    // length) and send none of it: with beta's connection the budget is
    // full. Their bytes stop for a second; then their memory comes back.
    let extra = "[tenancy]\nmemory_budget_bytes = 100663296\nmemory_wait_ms = 20000\nbody_timeout_ms = 1000\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let beta = client::connect(&target_of(server.addr), &pki.credentials("beta")).await.unwrap();
    let mut beta = NlImageServiceClient::new(beta);
    let small = rgb(100, 100, 7);
    assert_eq!(beta.mean_filter(small.clone()).await.unwrap().into_inner().data, small.data, "beta's connection is open");

    const CONNECTION: u64 = 6 * MIB;
    let len: u32 = 39 * (MIB as u32) / 2;
    let mut stalled = Vec::new();
    for tenant in ["alpha", "gamma"] {
        let (mut send, connection) = h2_connect(&server, &pki, tenant).await;
        let (answer, mut body) = start_call(&mut send, "/NLImageService/MeanFilter").await;
        body.send_data(prefix(len), false).unwrap();
        let held = until_metric(
            server.admin_addr,
            "imgsvc_tenant_memory_held_bytes",
            &[("tenant", tenant), ("stage", "receiving")],
            (CONNECTION + 2 * u64::from(len)) as f64,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(held, Some((CONNECTION + 2 * u64::from(len)) as f64), "{tenant}'s message is charged at its prefix");
        stalled.push((tenant, answer, body, send, connection));
    }
    // The budget is full: beta's call waits until the stalled messages'
    // memory comes back, and is then served.
    let started = std::time::Instant::now();
    assert_eq!(beta.mean_filter(small.clone()).await.unwrap().into_inner().data, small.data);
    eprintln!("beta served after {:?}", started.elapsed());
    let text = scrape(server.admin_addr);
    assert!(metric(&text, "imgsvc_memory_waits_total", &[("tenant", "beta")]).is_some_and(|w| w >= 1.0), "beta waited:\n{text}");

    for (tenant, answer, _body, _send, _connection) in stalled {
        let status = status_of(answer).await;
        assert_eq!(
            (status.code(), status.message()),
            (
                tonic::Code::ResourceExhausted,
                format!(
                    "no bytes of the request message arrived for 1000 ms (tenancy.body_timeout_ms): the {} bytes of memory charged to tenant \"{tenant}\" for it are released",
                    2 * u64::from(len)
                )
                .as_str()
            )
        );
        let labels = [("tenant", tenant), ("stage", "receiving")];
        let held =
            until_metric(server.admin_addr, "imgsvc_tenant_memory_held_bytes", &labels, CONNECTION as f64, Duration::from_secs(10)).await;
        assert_eq!(held, Some(CONNECTION as f64), "only {tenant}'s connection is still charged");
        assert_eq!(metric(&scrape(server.admin_addr), "imgsvc_body_timeouts_total", &[("tenant", tenant)]), Some(1.0));
    }
    let lines: Vec<String> = (0..2).map(|_| server.wait_for_log(&["request bytes stopped arriving"], Duration::from_secs(10))).collect();
    for tenant in ["alpha", "gamma"] {
        let line =
            lines.iter().find(|l| l.contains(&format!("tenant={tenant} "))).unwrap_or_else(|| panic!("{tenant}'s line in {lines:?}"));
        assert!(line.contains("held=40894464"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_calls_take_call_slots_and_their_messages_are_charged_and_bounded() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let pki = Pki::new(&["alpha"]);
    // Eight call slots; the connection is charged 6 MiB.
    let extra = "[tenancy]\nbody_timeout_ms = 60000\n[tenant_defaults]\nmax_concurrent_requests = 4\nmax_queued_requests = 4\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let channel = client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
    let check = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(check.into_inner().status(), ServingStatus::Serving, "an admitted health check is answered");
    const CONNECTION: u64 = 6 * MIB;
    let receiving = [("tenant", "alpha"), ("stage", "receiving")];
    let held =
        until_metric(server.admin_addr, "imgsvc_tenant_memory_held_bytes", &receiving, CONNECTION as f64, Duration::from_secs(10)).await;
    assert_eq!(held, Some(CONNECTION as f64), "the check's message is given back; its connection stays charged");

    let (mut send, connection) = h2_connect(&server, &pki, "alpha").await;
    // A message over the small limit of these calls: refused at its prefix.
    let (answer, mut body) = start_call(&mut send, "/grpc.health.v1.Health/Check").await;
    body.send_data(prefix(4 << 20), false).unwrap();
    let status = status_of(answer).await;
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::ResourceExhausted,
            "message of 4194304 bytes to grpc.health.v1.Health/Check, over the limit of 65536 bytes for calls other than the image methods"
        )
    );
    // Eight unfinished messages (60000 bytes declared, half sent) hold the
    // eight slots, and their bytes are charged.
    let mut unfinished = Vec::new();
    for _ in 0..8 {
        let (answer, mut body) = start_call(&mut send, "/grpc.health.v1.Health/Check").await;
        body.send_data(prefix(60_000), false).unwrap();
        body.send_data(Bytes::from(vec![0; 30_000]), false).unwrap();
        unfinished.push((answer, body));
    }
    let want = (2 * CONNECTION + 8 * 60_000) as f64;
    let held = until_metric(server.admin_addr, "imgsvc_tenant_memory_held_bytes", &receiving, want, Duration::from_secs(10)).await;
    let text = scrape(server.admin_addr);
    let alpha: Vec<&str> = text.lines().filter(|l| l.contains("alpha")).collect();
    assert_eq!(held, Some(want), "both connections and the eight messages are charged: {alpha:#?}");
    // A ninth call finds no slot (reflection is admitted the same way).
    let (answer, _body) = start_call(&mut send, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").await;
    let status = status_of(answer).await;
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::ResourceExhausted,
            "tenant \"alpha\" already has 8 requests running or queued, its limit (max_concurrent_requests 4 + max_queued_requests 4)"
        )
    );
    // The raw client goes: all it held comes back.
    drop((unfinished, send));
    connection.abort();
    let held =
        until_metric(server.admin_addr, "imgsvc_tenant_memory_held_bytes", &receiving, CONNECTION as f64, Duration::from_secs(10)).await;
    assert_eq!(held, Some(CONNECTION as f64), "only the tonic channel's connection is still charged");
    let open = until_metric(server.admin_addr, "imgsvc_tenant_calls_open", &[("tenant", "alpha")], 0.0, Duration::from_secs(10)).await;
    assert_eq!(open, Some(0.0), "all slots given back");
    drop(channel);
}

/// With adaptive HTTP/2 windows (`server.http2_adaptive_window`) the
/// connection window is not widened, so a body held back for memory could
/// hold back the calls beside it until `memory_wait_ms`: such a call is
/// refused at once (RESOURCE_EXHAUSTED, after waiting 0 ms, with the retry
/// delay) instead of waiting, and the call that has memory is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_adaptive_windows_a_call_without_memory_is_refused_at_once_and_stalls_nobody() {
    let pki = Pki::new(&["alpha"]);
    // As above (one 18 MB rotation fits alpha's 64 MiB share at a time),
    // with a 30 s wait that a held-back call would sit through.
    let extra = "[tenancy]\nmemory_budget_bytes = 134217728\nmemory_wait_ms = 30000\n";
    let env = [("IMGSVC_LOG__LEVEL", QUIET_LOG), ("IMGSVC_SERVER__HTTP2_ADAPTIVE_WINDOW", "true")];
    let server = ServerProcess::spawn_with(&pki, extra, &env);
    let channel = client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
    let client = NlImageServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let calls = half_turns(&client, 3);
    let (mut served, mut refused) = (0, 0);
    for call in calls.collect::<Vec<_>>() {
        // Well under the 30 s a held-back call would wait.
        match tokio::time::timeout(Duration::from_secs(20), call).await.expect("answered, not held back").unwrap() {
            Ok(same) => {
                assert!(same, "the exact answer");
                served += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{}", status.message());
                assert!(status.message().contains("after waiting 0 ms") && status.message().contains("retry in"), "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(served >= 1, "the call that had memory is served ({refused} refused)");
    assert_eq!(served + refused, 3);
    let text = scrape(server.admin_addr);
    let waits = metric(&text, "imgsvc_memory_waits_total", &[("tenant", "alpha")]);
    assert_eq!(waits, None, "no call waited for memory");
    let counted = metric(&text, "imgsvc_memory_refusals_total", &[("tenant", "alpha"), ("reason", "exhausted")]).unwrap_or(0.0);
    assert_eq!(counted, refused as f64, "each refusal counted");
    eprintln!("adaptive windows: {served} served, {refused} refused at once");
}
