//! Fair shares of what the tenants share (issue 25): a tenant that sends
//! a little is served in full while two others flood the server's queue
//! (small unary calls, and streams of larger images);
//! a call's deadline, and the server's maximum, end it with
//! DEADLINE_EXCEEDED and release what it held.
//!
//! CPU shares per format are tested where they are decided, without the
//! noise of TLS on a shared machine: `tenancy::tests::tenants_get_cpu_time_in_proportion_to_their_weights_whatever_their_formats`.

use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::v1::{
    self, Image, PixelFormat, ProcessRequest, ProcessStreamRequest, StreamHeader, image_service_client::ImageServiceClient,
    operation::Kind, process_stream_request::Part,
};
use tonic::{Code, transport::Channel};

const FLOOD_A: &str = "fair-flood-a";
const FLOOD_B: &str = "fair-flood-b";
const STEADY: &str = "fair-steady";
const STALLED: &str = "fair-stalled";

/// Above `limits.inline_max_pixels` (64Ki), so every call is queued.
const SIDE: u32 = 300;

fn mean_filters(side: u32, n: usize) -> ProcessRequest {
    ProcessRequest {
        image: Some(Image {
            format: PixelFormat::Rgb8 as i32,
            width: side,
            height: side,
            data: Bytes::from(vec![7u8; (side * side * 3) as usize]),
            encoded: None,
        }),
        operations: vec![v1::Operation { kind: Some(Kind::MeanFilter(v1::MeanFilter {})) }; n],
        output: None,
    }
}

fn client(channel: Channel) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(channel).max_decoding_message_size(16 << 20).max_encoding_message_size(16 << 20)
}

#[test]
fn a_third_tenant_is_served_in_full_while_two_others_flood_the_queue() {
    block_on(async {
        let pki = Pki::new(&[FLOOD_A, FLOOD_B, STEADY]);
        // One worker and a queue of 16 jobs: each of the three tenants may
        // have (16 + 1) / 3 = 5 calls open. Before the per-tenant parts, the
        // two flooders filled the one queue and the steady tenant's calls
        // were refused (server_busy) after their bodies had been received.
        let server = TestServer::start_with(&pki, |raw| {
            raw.server.worker_threads = 1;
            raw.limits.max_queued_jobs = 16;
        });
        let admin = server.admin_addr.unwrap();
        let until = Instant::now() + Duration::from_millis(2500);
        let mut floods = Vec::new();
        // FLOOD_A sends small unary calls; FLOOD_B as many, and as many
        // ProcessStream calls of an image four times larger (chunked).
        for (tenant, streams) in [(FLOOD_A, false), (FLOOD_B, false), (FLOOD_B, true)] {
            let channel = channel(&server, &pki, tenant).await;
            for _ in 0..40 {
                let mut c = client(channel.clone());
                let channel = channel.clone();
                floods.push(tokio::spawn(async move {
                    let (mut served, mut refused) = (0u32, Vec::new());
                    for _ in 0..100_000 {
                        if Instant::now() > until {
                            break;
                        }
                        let result = if streams {
                            use imgsvc::client::{Api, CallOptions, ClientError, Op, RawImage, StreamMode, process_with};
                            let side = 2 * SIDE;
                            let image = RawImage {
                                format: PixelFormat::Rgb8,
                                width: side,
                                height: side,
                                data: Bytes::from(vec![7u8; (side * side * 3) as usize]),
                            };
                            let options = CallOptions { compression: None, stream: StreamMode::Always, chunk_bytes: 100_000 };
                            let ops = [Op::MeanFilter, Op::MeanFilter];
                            match process_with(channel.clone(), Api::V1, image, &ops, "localhost", &options).await {
                                Ok(_) => Ok(()),
                                Err(ClientError::Status { code, message, .. }) => Err((code, message)),
                                Err(other) => Err((Code::Unknown, other.to_string())),
                            }
                        } else {
                            c.process(mean_filters(SIDE, 2)).await.map(|_| ()).map_err(|s| (s.code(), s.message().to_owned()))
                        };
                        match result {
                            Ok(()) => served += 1,
                            Err(refusal) => {
                                refused.push(refusal);
                                // A client that retries soon, not at once.
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                    }
                    (tenant, streams, served, refused)
                }));
            }
        }
        let steady = channel(&server, &pki, STEADY).await;
        let mut steady_calls = Vec::new();
        for _ in 0..2 {
            let mut c = client(steady.clone());
            steady_calls.push(tokio::spawn(async move {
                let mut results = Vec::new();
                for _ in 0..10_000 {
                    if Instant::now() > until {
                        break;
                    }
                    let started = Instant::now();
                    let result = c.process(mean_filters(SIDE, 2)).await.map(|r| r.into_inner().image.map(|i| (i.width, i.height)));
                    results.push((result.map_err(|s| (s.code(), s.message().to_owned())), started.elapsed()));
                }
                results
            }));
        }
        let mut steady_results = Vec::new();
        for c in steady_calls {
            steady_results.extend(c.await.unwrap());
        }
        let (mut flood_refusals, mut flood_served) = (0, std::collections::HashMap::new());
        for f in floods {
            let (tenant, streams, served, refused) = f.await.unwrap();
            *flood_served.entry((tenant, streams)).or_insert(0) += served;
            let part = format!(
                "tenant \"{tenant}\" already has 5 calls open, its weighted part of the server's queue and workers: (limits.max_queued_jobs 16 + 1 workers) x weight 1 / total weight 3 = 5"
            );
            for (code, message) in &refused {
                assert_eq!((*code, message.as_str()), (Code::ResourceExhausted, part.as_str()));
            }
            flood_refusals += refused.len();
        }
        assert!(flood_refusals > 0, "the flooders went past their parts (else the test floods too little)");
        for (tenant, streams) in [(FLOOD_A, false), (FLOOD_B, false), (FLOOD_B, true)] {
            assert!(flood_served[&(tenant, streams)] > 0, "{tenant} is served within its part (streams: {streams})");
        }
        eprintln!("flooders served: {flood_served:?}, {flood_refusals} refused");
        let failed: Vec<_> = steady_results.iter().filter(|(r, _)| r != &Ok(Some((SIDE, SIDE)))).collect();
        assert!(failed.is_empty(), "every call of the steady tenant is served: {failed:?}");
        assert!(steady_results.len() >= 10, "the steady tenant made {} calls", steady_results.len());
        let mut latencies: Vec<_> = steady_results.iter().map(|(_, d)| *d).collect();
        latencies.sort();
        eprintln!("steady tenant: {} calls served, p50 {:?}, max {:?}", latencies.len(), latencies[latencies.len() / 2], latencies.last());

        let text = scrape(admin);
        assert_eq!(metric(&text, "imgsvc_refusals_total", &[("tenant", STEADY)]), None, "{text}");
        for tenant in [FLOOD_A, FLOOD_B, STEADY] {
            assert_eq!(metric(&text, "imgsvc_refusals_total", &[("tenant", tenant), ("reason", "server_busy")]), None);
            let cpu = metric(&text, "imgsvc_tenant_cpu_seconds_total", &[("tenant", tenant)]);
            assert!(cpu.is_some_and(|s| s > 0.0), "{tenant}'s jobs' CPU time is exported: {cpu:?}");
        }
        assert!(metric(&text, "imgsvc_refusals_total", &[("tenant", FLOOD_A), ("reason", "queue_share")]).is_some_and(|n| n > 0.0));
    })
}

#[test]
fn a_stalled_stream_without_a_deadline_is_ended_at_the_server_maximum_and_releases_its_slot() {
    block_on(async {
        let pki = Pki::new(&[STALLED]);
        let server = TestServer::start_with(&pki, |raw| raw.server.max_deadline_secs = 1);
        let admin = server.admin_addr.unwrap();
        let mut c = client(channel(&server, &pki, STALLED).await);
        // The header of a 100x100 image, then nothing: the stream stays open.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(ProcessStreamRequest { part: Some(Part::Header(header_of(100))) }).await.unwrap();
        let started = Instant::now();
        let status = c.process_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(
            (status.code(), status.message()),
            (Code::DeadlineExceeded, "the call took longer than the server's maximum of 1 s (server.max_deadline_secs)")
        );
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(10), "ended after {took:?}");
        drop(tx);
        let open = until_metric(admin, "imgsvc_tenant_calls_open", &[("tenant", STALLED)], 0.0, Duration::from_secs(10)).await;
        assert_eq!(open, Some(0.0), "the stalled call's slot is released");
        let counted = metric(&scrape(admin), "imgsvc_requests_total", &[("tenant", STALLED), ("code", "DEADLINE_EXCEEDED")]);
        assert_eq!(counted, Some(1.0));
        // A longer deadline from the client is capped at the server's.
        // (A shorter one is the client's; tonic's client enforces it itself
        // too, so which side answers first is a race: the message is
        // checked in the layer's unit tests.)
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(ProcessStreamRequest { part: Some(Part::Header(header_of(100))) }).await.unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.set_timeout(Duration::from_secs(30));
        let status = c.process_stream(request).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::DeadlineExceeded, "the call took longer than the server's maximum of 1 s (server.max_deadline_secs)")
        );
    })
}

fn header_of(side: u32) -> StreamHeader {
    StreamHeader { format: PixelFormat::Gray8 as i32, width: side, height: side, operations: vec![] }
}

const ENCODES: &str = "fair-encodes";

#[test]
fn an_output_the_encoder_cannot_hold_is_refused_before_any_work() {
    block_on(async {
        let pki = Pki::new(&[ENCODES]);
        let server = TestServer::start(&pki);
        let admin = server.admin_addr.unwrap();
        let mut c = client(channel(&server, &pki, ENCODES).await);
        let request = |width: u32, height: u32, quarter_turns: u32, encoding: v1::ImageEncoding| ProcessRequest {
            image: Some(Image {
                format: PixelFormat::Gray8 as i32,
                width,
                height,
                data: Bytes::from(vec![1u8; (width * height) as usize]),
                encoded: None,
            }),
            operations: vec![v1::Operation {
                kind: Some(Kind::Rotate(v1::Rotate { amount: Some(v1::rotate::Amount::QuarterTurns(quarter_turns)) })),
            }],
            output: Some(v1::OutputEncoding { encoding: encoding as i32, jpeg_quality: 0 }),
        };
        let cases = [
            (16_385, 1, 0, v1::ImageEncoding::Webp, "WebP cannot hold a 16385x1 image: at most 16384 pixels wide and high"),
            // Rotated a quarter turn, a 1x16385 image is 16385 wide.
            (1, 16_385, 1, v1::ImageEncoding::Webp, "WebP cannot hold a 16385x1 image: at most 16384 pixels wide and high"),
            (65_536, 1, 2, v1::ImageEncoding::Jpeg, "JPEG cannot hold a 65536x1 image: at most 65535 pixels wide and high"),
        ];
        for (width, height, turns, encoding, message) in cases {
            let status = c.process(request(width, height, turns, encoding)).await.unwrap_err();
            assert_eq!((status.code(), status.message()), (Code::InvalidArgument, message));
        }
        assert_eq!(metric(&scrape(admin), "imgsvc_jobs_started_total", &[("tenant", ENCODES)]), None, "no job ran");
        // At the limit it is written.
        let image = c.process(request(16_384, 1, 0, v1::ImageEncoding::Webp)).await.unwrap().into_inner().image.unwrap();
        assert_eq!((image.width, image.height), (16_384, 1));
    })
}

const ABANDONED: &str = "fair-abandoned";

/// The tenant's CPU time in `/metrics` once it differs from `from` (its jobs
/// are charged when they end), within 20 s.
async fn cpu_after(admin: std::net::SocketAddr, tenant: &str, from: f64) -> f64 {
    for _ in 0..1000 {
        let seen = metric(&scrape(admin), "imgsvc_tenant_cpu_seconds_total", &[("tenant", tenant)]).unwrap_or(0.0);
        if seen != from {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{tenant}'s CPU time did not change from {from} within 20 s");
}

#[test]
fn a_running_job_whose_caller_goes_away_stops_early_and_frees_its_worker() {
    block_on(async {
        let pki = Pki::new(&[ABANDONED]);
        let server = TestServer::start_with(&pki, |raw| raw.limits.max_operations = 1024);
        let admin = server.admin_addr.unwrap();
        let channel = channel(&server, &pki, ABANDONED).await;
        let mut c = client(channel.clone());
        // What 16 mean filters of a 1000x1000 RGB image cost here (one thread).
        c.process(mean_filters(1000, 16)).await.unwrap();
        let sixteen = cpu_after(admin, ABANDONED, 0.0).await;
        // 1024 of them would cost 64 times that; the caller goes away as
        // soon as the job runs.
        let call = tokio::spawn({
            let mut c = client(channel.clone());
            async move { c.process(mean_filters(1000, 1024)).await }
        });
        // Started on its worker (not only given one: a job whose caller
        // goes before it starts never runs, and costs no CPU).
        let started = until_metric(admin, "imgsvc_jobs_started_total", &[("tenant", ABANDONED)], 2.0, Duration::from_secs(20)).await;
        assert_eq!(started, Some(2.0), "the long job started");
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        let abandoned = cpu_after(admin, ABANDONED, sixteen).await - sixteen;
        let whole = sixteen * 64.0;
        assert!(abandoned < whole / 3.0, "the abandoned job took {abandoned:.3} s of CPU; all of it would be {whole:.3} s");
        let stopped = metric(&scrape(admin), "imgsvc_jobs_abandoned_total", &[]);
        assert!(stopped.is_some_and(|n| n >= 1.0), "counted as abandoned: {stopped:?}");
        // Its worker serves the next call.
        let image = c.process(mean_filters(100, 1)).await.unwrap().into_inner().image.unwrap();
        assert_eq!((image.width, image.height), (100, 100));
    })
}

const MEMBER: &str = "fair-member";
const STRANGER: &str = "fair-stranger";

#[test]
fn unserved_peers_get_a_small_allowance_and_a_short_life_while_a_configured_tenant_is_served() {
    use tokio::io::AsyncReadExt;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    block_on(async {
        let pki = Pki::new(&[MEMBER, STRANGER]);
        // STRANGER's certificate is valid, but it has no table (refused).
        let server = TestServer::start_with(&pki, |raw| {
            raw.tenants.remove(STRANGER);
        });
        let admin = server.admin_addr.unwrap();
        // The configured tenant's connection, open before the strangers come.
        let member = channel(&server, &pki, MEMBER).await;
        served(&member).await;
        // A health Watch on a stranger's connection.
        let mut health = HealthClient::new(channel(&server, &pki, STRANGER).await);
        let watch = tokio::spawn(async move {
            let started = Instant::now();
            let watched = async {
                let mut updates = health.watch(HealthCheckRequest { service: String::new() }).await?.into_inner();
                while updates.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            };
            let ended = tokio::time::timeout(Duration::from_secs(10), watched).await;
            (started.elapsed(), ended)
        });
        // 24 connections that never send a request, opened at once.
        let opened: Vec<_> = (0..24)
            .map(|_| {
                let (addr, pki) = (server.addr, &pki);
                let connect = tls_connect(addr, pki, STRANGER);
                async move {
                    let mut tls = connect.await;
                    let started = Instant::now();
                    let mut buf = [0u8; 4096];
                    // Until the server closes it (its HTTP/2 preface comes first).
                    for _ in 0..10_000 {
                        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
                            Ok(Ok(0) | Err(_)) => return started.elapsed(),
                            Ok(Ok(_)) => continue,
                            Err(_) => panic!("a stranger's connection is still open after 10 s"),
                        }
                    }
                    panic!("a stranger's connection kept sending");
                }
            })
            .collect();
        let lifetimes = futures_util::future::join_all(opened).await;
        let lived = lifetimes.iter().filter(|d| **d >= Duration::from_millis(1500)).count();
        assert!(lived <= 16, "at most the allowance of 16 were served a while: {lifetimes:?}");
        let refused = metric(&scrape(admin), "imgsvc_connections_refused_total", &[("reason", "unserved")]).unwrap_or(0.0);
        assert!(refused >= 1.0, "connections beyond the allowance are refused: {refused}");
        // Its calls, a health Watch included, are refused, and told why.
        let (lasted, ended) = watch.await.unwrap();
        let status = ended.unwrap_or_else(|_| panic!("the Watch was still open after {lasted:?}")).unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::PermissionDenied, "tenant \"fair-stranger\" is not configured on this server")
        );
        // A configured tenant is served all along, on its connection and on a new one.
        served(&member).await;
        served(&channel(&server, &pki, MEMBER).await).await;
        // It has an I/O lane of its own; the stranger's tenant got none
        // (its connections went to the shared lane).
        let text = scrape(admin);
        assert_eq!(metric(&text, "imgsvc_io_lane", &[("tenant", MEMBER)]), Some(1.0), "{text}");
        assert_eq!(metric(&text, "imgsvc_io_lane", &[("tenant", STRANGER)]), None, "no lane for a tenant not served");
    })
}

const CAPPED: &str = "fair-capped";
const NEIGHBOUR: &str = "fair-neighbour";

/// One call on `channel`, served.
async fn served(channel: &Channel) {
    let image = client(channel.clone()).process(mean_filters(50, 1)).await.unwrap().into_inner().image.unwrap();
    assert_eq!((image.width, image.height), (50, 50));
}

#[test]
fn a_tenant_past_its_max_connections_has_its_new_connection_refused_and_another_tenant_is_not() {
    block_on(async {
        let pki = Pki::new(&[CAPPED, NEIGHBOUR]);
        // The same limit for both: it is counted per tenant.
        let server = TestServer::start_with(&pki, |raw| {
            for tenant in [CAPPED, NEIGHBOUR] {
                raw.tenants.get_mut(tenant).unwrap().max_connections = Some(3);
            }
        });
        let admin = server.admin_addr.unwrap();
        let refused_before = metric(&scrape(admin), "imgsvc_connections_refused_total", &[("reason", "tenant_connections")]).unwrap_or(0.0);
        let closed_before = metric(&scrape(admin), "imgsvc_connections_closed_total", &[("reason", "tenant_connections")]).unwrap_or(0.0);
        let mut open = Vec::new();
        for _ in 0..3 {
            let channel = channel(&server, &pki, CAPPED).await;
            served(&channel).await;
            open.push(channel);
        }
        let text = scrape(admin);
        assert_eq!(metric(&text, "imgsvc_tenant_connections", &[("tenant", CAPPED)]), Some(3.0));
        assert_eq!(metric(&text, "imgsvc_tenant_limit", &[("tenant", CAPPED), ("limit", "connections")]), Some(3.0));

        // The fourth: its handshake succeeds, its calls are refused naming the limit.
        let fourth = channel(&server, &pki, CAPPED).await;
        let status = client(fourth.clone()).process(mean_filters(50, 1)).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (
                Code::ResourceExhausted,
                "tenant \"fair-capped\" already had 3 connections open, its limit (max_connections 3): calls on this connection are refused and it is closed; use the connections open"
            )
        );
        let text = scrape(admin);
        let refused = metric(&text, "imgsvc_connections_refused_total", &[("reason", "tenant_connections")]).unwrap_or(0.0);
        assert_eq!(refused - refused_before, 1.0);
        assert_eq!(metric(&text, "imgsvc_tenant_connections", &[("tenant", CAPPED)]), Some(3.0), "the refused one takes no place");
        assert_eq!(metric(&text, "imgsvc_refusals_total", &[("tenant", CAPPED), ("reason", "tenant_connections")]), Some(1.0));

        // Another tenant, with the same limit, has its own three.
        let mut neighbours = Vec::new();
        for _ in 0..3 {
            let channel = channel(&server, &pki, NEIGHBOUR).await;
            served(&channel).await;
            neighbours.push(channel);
        }
        assert_eq!(metric(&scrape(admin), "imgsvc_tenant_connections", &[("tenant", NEIGHBOUR)]), Some(3.0));

        // One closed, a new one is served.
        drop(open.pop());
        let left = until_metric(admin, "imgsvc_tenant_connections", &[("tenant", CAPPED)], 2.0, Duration::from_secs(10)).await;
        assert_eq!(left, Some(2.0), "the closed connection gives its place back");
        let again = channel(&server, &pki, CAPPED).await;
        served(&again).await;
        assert_eq!(metric(&scrape(admin), "imgsvc_tenant_connections", &[("tenant", CAPPED)]), Some(3.0));

        // The refused connection is closed within its short life (2 s, then 1 s of grace).
        let closed = until_metric(
            admin,
            "imgsvc_connections_closed_total",
            &[("reason", "tenant_connections")],
            closed_before + 1.0,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(closed, Some(closed_before + 1.0), "the refused connection is closed (GOAWAY)");
        drop(fourth);
    })
}
