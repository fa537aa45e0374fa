//! gzip and zstd: requests compressed by the client are accepted by the
//! server and answered (compressed) correctly, in both APIs and streaming.

use crate::common::*;
use imgsvc::{
    client::{Api, CallOptions, Op, StreamMode, image_io::read_image, process_with},
    imaging::QuarterTurns,
};
use tonic::codec::CompressionEncoding;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_zstd_round_trip_through_both_apis_and_streaming() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.server.compress_responses = true);
    let image = read_image(&fixture("astronaut.png")).unwrap();
    let ops = [Op::MeanFilter, Op::Rotate(QuarterTurns::One)];
    let want = expected(&image, &ops);
    for compression in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        for (api, stream) in [(Api::V1, StreamMode::Never), (Api::V1, StreamMode::Always), (Api::Legacy, StreamMode::Never)] {
            let options = CallOptions { compression: Some(compression), stream, chunk_bytes: 100_000 };
            let got = process_with(channel(&server, &pki, "alpha").await, api, image.clone(), &ops, "localhost", &options)
                .await
                .unwrap_or_else(|e| panic!("{compression:?} {api:?} {stream:?}: {e}"));
            assert_eq!(got, want, "{compression:?} {api:?} {stream:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_only_when_configured() {
    use imgsvc::proto::nlimage::{NlImage, nl_image_service_client::NlImageServiceClient};
    for (configured, want) in [(false, None), (true, Some("gzip"))] {
        let pki = Pki::new(&["alpha"]);
        let server = TestServer::start_with(&pki, |raw| raw.server.compress_responses = configured);
        let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await).accept_compressed(CompressionEncoding::Gzip);
        let image = NlImage { color: false, width: 64, height: 64, data: vec![5u8; 64 * 64].into() };
        let response = client.mean_filter(image).await.unwrap();
        let encoding = response.metadata().get("grpc-encoding").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(encoding.as_deref(), want, "compress_responses = {configured}");
        assert_eq!(response.into_inner().data.len(), 64 * 64);
    }
}

#[test]
fn the_cli_compresses_and_streams_on_request() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let want = expected(&read_image(&fixture("camera.png")).unwrap(), &[Op::Rotate(QuarterTurns::Two)]);
    for extra in [["--compress", "gzip"], ["--compress", "zstd"], ["--stream", "always"]] {
        let out_png = dir.path().join(format!("{}.png", extra[1]));
        let mut args = client_args(&server, &pki, "alpha");
        args.extend(
            ["--input", fixture("camera.png").to_str().unwrap(), "--output", out_png.to_str().unwrap(), "--rotate", "ONE_EIGHTY_DEG"]
                .map(String::from),
        );
        args.extend(extra.map(String::from));
        let result = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(result.status.success(), "{extra:?}: {}", stderr(&result));
        assert_eq!(read_image(&out_png).unwrap(), want, "{extra:?}");
    }
    let mut args = client_args(&server, &pki, "alpha");
    args.extend(
        [
            "--input",
            fixture("camera.png").to_str().unwrap(),
            "--output",
            dir.path().join("x.png").to_str().unwrap(),
            "--mean",
            "--stream",
            "always",
            "--api",
            "legacy",
        ]
        .map(String::from),
    );
    let result = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(result.status.code(), Some(64));
    assert!(stderr(&result).contains("--stream always needs --api v1"), "{}", stderr(&result));
}
