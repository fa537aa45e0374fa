//! Health, readiness and discovery: `grpc.health.v1.Health` on the gRPC port
//! (NOT_SERVING from the start of the drain), `/healthz` and `/readyz` on
//! the admin listener, and server reflection listing every service.

use crate::common::*;
use imgsvc::serving::Phase;
use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

#[test]
fn admin_endpoints_report_live_and_ready_while_serving() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let admin = server.admin_addr.unwrap();
    assert_eq!(*server.phase.borrow(), Phase::Serving);
    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(admin, "/readyz"), (200, "serving\n".to_string()));
    assert_eq!(http_get(admin, "/nope").0, 404);
}

#[test]
fn admin_listener_is_off_when_disabled() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.admin.enabled = false);
    assert_eq!(server.admin_addr, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_and_readyz_503_while_draining() {
    let pki = Pki::new(&["alpha"]);
    let mut server = TestServer::start(&pki);
    let admin = server.admin_addr.unwrap();
    let mut health = HealthClient::new(channel(&server, &pki, "alpha").await);
    let mut watches = Vec::new();
    for service in ["", "NLImageService", "imgsvc.v1.ImageService"] {
        let mut stream = health.watch(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watches.push((service, stream));
    }

    // The open watch streams are in-flight calls: they hold the drain open
    // until this test drops them.
    server.take_stop().send(()).unwrap();
    for (service, stream) in &mut watches {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next()).await;
        assert_eq!(next.unwrap().unwrap().unwrap().status(), ServingStatus::NotServing, "{service:?}");
    }
    let (readyz, healthz) = tokio::task::spawn_blocking(move || (http_get(admin, "/readyz"), http_get(admin, "/healthz"))).await.unwrap();
    assert_eq!(readyz, (503, "draining\n".to_string()));
    assert_eq!(healthz, (200, "ok\n".to_string()));
    assert_eq!(*server.phase.borrow(), Phase::Draining);

    drop(watches);
    drop(health);
    let joined = tokio::task::spawn_blocking(move || server.join()).await.unwrap();
    assert!(joined.is_ok(), "{joined:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_both_image_services_and_health() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut reflection = ServerReflectionClient::new(channel(&server, &pki, "alpha").await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {:?}", response.message_response);
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, ["NLImageService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "imgsvc.v1.ImageService"]);
}
