//! `/metrics` on the admin listener: requests counted under their tenant,
//! method and status code, with latency, bytes and pixels; refused TLS
//! handshakes by reason; the build version.
//!
//! The recorder is process-wide and tests run in parallel, so every test
//! uses tenants of its own, and the tests of series without a tenant label
//! (refused handshakes, requests without a tenant) run in a process of
//! their own.

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::nlimage::{NlImage, nl_image_service_client::NlImageServiceClient};
use rusty_fork::rusty_fork_test;

const MEAN: &str = "NLImageService/MeanFilter";

fn scrape_of(server: &TestServer) -> String {
    scrape(server.admin_addr.expect("admin listener"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_counted_under_its_tenant_method_and_status() {
    let pki = Pki::new(&["metrics-alpha"]);
    let server = TestServer::start(&pki);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "metrics-alpha").await);
    let image = NlImage { color: true, width: 4, height: 3, data: Bytes::from(vec![7u8; 36]) };
    client.mean_filter(image).await.unwrap();
    let bad = NlImage { color: true, width: 4, height: 3, data: Bytes::from(vec![7u8; 35]) };
    assert_eq!(client.mean_filter(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    let text = scrape_of(&server);
    let t = ("tenant", "metrics-alpha");
    let m = ("method", MEAN);
    assert_eq!(metric(&text, "imgsvc_requests_total", &[t, m, ("code", "OK")]), Some(1.0), "{text}");
    assert_eq!(metric(&text, "imgsvc_requests_total", &[t, m, ("code", "INVALID_ARGUMENT")]), Some(1.0));
    assert_eq!(metric(&text, "imgsvc_request_duration_seconds_count", &[t, m, ("code", "OK")]), Some(1.0));
    assert_eq!(metric(&text, "imgsvc_request_duration_seconds_bucket", &[t, m, ("code", "OK"), ("le", "+Inf")]), Some(1.0));
    assert_eq!(metric(&text, "imgsvc_pixels_processed_total", &[t, m]), Some(12.0));
    assert_eq!(metric(&text, "imgsvc_request_bytes_total", &[t, m]), Some(36.0));
    assert_eq!(metric(&text, "imgsvc_response_bytes_total", &[t, m]), Some(36.0));
    assert_eq!(metric(&text, "imgsvc_in_flight_requests", &[t, m]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_counted_apart() {
    let pki = Pki::new(&["metrics-one", "metrics-two"]);
    let server = TestServer::start(&pki);
    for (tenant, calls) in [("metrics-one", 3), ("metrics-two", 2)] {
        let mut client = NlImageServiceClient::new(channel(&server, &pki, tenant).await);
        for _ in 0..calls {
            let image = NlImage { color: false, width: 2, height: 2, data: Bytes::from(vec![1u8; 4]) };
            client.rotate_image(imgsvc::proto::nlimage::NlImageRotateRequest { rotation: 1, image: Some(image) }).await.unwrap();
        }
    }
    let text = scrape_of(&server);
    for (tenant, calls) in [("metrics-one", 3.0), ("metrics-two", 2.0)] {
        let labels = [("tenant", tenant), ("method", "NLImageService/RotateImage"), ("code", "OK")];
        assert_eq!(metric(&text, "imgsvc_requests_total", &labels), Some(calls), "{tenant}");
    }
}

#[test]
fn the_build_version_is_published() {
    let pki = Pki::new(&["metrics-build"]);
    let server = TestServer::start(&pki);
    let text = scrape_of(&server);
    assert_eq!(metric(&text, "imgsvc_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert!(text.contains("# TYPE imgsvc_build_info gauge"), "{text}");
}

rusty_fork_test! {
    /// In a process of its own: the handshake failure counters have no tenant label.
    #[test]
    fn refused_tls_handshakes_are_counted_by_reason() {
        block_on(counts_refused_handshakes())
    }
}

async fn counts_refused_handshakes() {
    let pki = Pki::new(&["metrics-tls"]);
    let other = Pki::new(&["metrics-tls"]);
    let server = TestServer::start(&pki);
    let before = |reason: &str| metric(&scrape_of(&server), "imgsvc_tls_handshake_failures_total", &[("reason", reason)]).unwrap_or(0.0);
    let (unknown_ca, no_cert) = (before("unknown_ca"), before("no_client_certificate"));

    // A client certificate from another CA, from a client that trusts the
    // server (mtls.rs asserts what the client sees; here only the
    // server's count matters).
    let (_, cert, key) = other.client_files("metrics-tls");
    let foreign = imgsvc::tls::ClientCredentials::from_files(&pki.paths().ca_cert(), &cert, &key).unwrap();
    if let Ok(channel) = imgsvc::client::connect(&target(server.port()), &foreign).await {
        let call = NlImageServiceClient::new(channel)
            .mean_filter(NlImage { color: false, width: 1, height: 1, data: Bytes::from_static(&[1]) })
            .await;
        assert_eq!(call.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::Unknown));
    }

    // No client certificate at all.
    let err = read_error_without_client_certificate(server.addr, &pki).await;
    assert!(err.to_string().contains("CertificateRequired"), "{err}");

    // The server counts a refused handshake on its own task, after the client saw it.
    let admin = server.admin_addr.unwrap();
    let (name, within) = ("imgsvc_tls_handshake_failures_total", Duration::from_secs(10));
    assert_eq!(until_metric(admin, name, &[("reason", "unknown_ca")], unknown_ca + 1.0, within).await, Some(unknown_ca + 1.0));
    assert_eq!(until_metric(admin, name, &[("reason", "no_client_certificate")], no_cert + 1.0, within).await, Some(no_cert + 1.0));
}

rusty_fork_test! {
    /// In a process of its own: the unauthenticated requests counter has no tenant label.
    #[test]
    fn a_request_without_tenant_is_counted_as_unauthenticated() {
        block_on(counts_an_unauthenticated_request())
    }
}

async fn counts_an_unauthenticated_request() {
    let pki = Pki::new(&["metrics-none"]);
    let server = TestServer::start(&pki);
    let before = metric(&scrape_of(&server), "imgsvc_unauthenticated_requests_total", &[]).unwrap_or(0.0);
    let (cert, key) = pki.sign_custom(
        "no-tenant",
        vec![rcgen::SanType::DnsName("client.example".try_into().unwrap())],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let creds = imgsvc::tls::ClientCredentials::from_files(&pki.paths().ca_cert(), &cert, &key).unwrap();
    let channel = imgsvc::client::connect(&target(server.port()), &creds).await.unwrap();
    let status = NlImageServiceClient::new(channel)
        .mean_filter(NlImage { color: false, width: 1, height: 1, data: Bytes::from_static(&[1]) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // No other test runs in this process.
    assert_eq!(metric(&scrape_of(&server), "imgsvc_unauthenticated_requests_total", &[]), Some(before + 1.0));
}
