//! Requests that are valid protobuf but not valid images: each gets the
//! right status and a message that says what is wrong, and the next valid
//! request still succeeds. Both APIs.

mod common;

use bytes::Bytes;
use common::*;
use imgsvc::proto::{
    nlimage::{NlImage, NlImageRotateRequest, nl_image_service_client::NlImageServiceClient},
    v1::{self, Image, Operation, PixelFormat, ProcessRequest, image_service_client::ImageServiceClient, operation::Kind, rotate::Amount},
};
use tonic::Code;

fn nl(color: bool, w: i32, h: i32, len: usize) -> NlImage {
    NlImage { color, width: w, height: h, data: Bytes::from(vec![1u8; len]) }
}

fn v1img(format: i32, w: u32, h: u32, len: usize) -> Option<Image> {
    Some(Image { format, width: w, height: h, data: Bytes::from(vec![1u8; len]), encoded: None })
}

fn rotate_op(amount: Option<Amount>) -> Operation {
    Operation { kind: Some(Kind::Rotate(v1::Rotate { amount })) }
}

fn mean_op() -> Operation {
    Operation { kind: Some(Kind::MeanFilter(v1::MeanFilter {})) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_api_refuses_invalid_images_with_invalid_argument_and_keeps_serving() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let rotate = |rotation: i32, image: Option<NlImage>| NlImageRotateRequest { rotation, image };
    let cases: Vec<(&str, NlImageRotateRequest, &str)> = vec![
        ("missing image", rotate(1, None), "the request has no image"),
        ("zero width", rotate(1, Some(nl(false, 0, 4, 0))), "image width must be at least 1, got 0"),
        ("negative height", rotate(1, Some(nl(false, 4, -2, 0))), "image height must be at least 1, got -2"),
        ("short data", rotate(1, Some(nl(true, 4, 3, 35))), "image data is 35 bytes, expected 36 (= 4 x 3 x 3 bytes per pixel for RGB8)"),
        ("long data", rotate(1, Some(nl(false, 4, 3, 13))), "image data is 13 bytes, expected 12 (= 4 x 3 x 1 bytes per pixel for GRAY8)"),
        ("empty data", rotate(1, Some(nl(false, 4, 3, 0))), "image data is 0 bytes, expected 12 (= 4 x 3 x 1 bytes per pixel for GRAY8)"),
        (
            "32-bit overflow",
            rotate(1, Some(nl(true, 65536, 65536, 3))),
            "image dimensions 65536x65536 with 3 bytes per pixel overflow 32-bit sizes",
        ),
        (
            "unknown rotation",
            rotate(7, Some(nl(false, 1, 1, 1))),
            "rotation 7 is not a known value (expected 0=NONE, 1=NINETY_DEG, 2=ONE_EIGHTY_DEG or 3=TWO_SEVENTY_DEG)",
        ),
    ];
    for (name, request, message) in cases {
        let status = client.rotate_image(request).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, message), "{name}");
        let ok = client.rotate_image(rotate(1, Some(nl(false, 2, 1, 2)))).await;
        assert!(ok.is_ok(), "valid request after {name}: {:?}", ok.err());
    }
    let status = client.mean_filter(nl(true, 2, 2, 5)).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "image data is 5 bytes, expected 12 (= 2 x 2 x 3 bytes per pixel for RGB8)")
    );
    assert_eq!(client.mean_filter(nl(true, 2, 2, 12)).await.unwrap().into_inner().data.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_api_refuses_invalid_images_and_pipelines_with_invalid_argument_and_keeps_serving() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let gray = PixelFormat::Gray8 as i32;
    let req = |image: Option<Image>, operations: Vec<Operation>| ProcessRequest { image, operations, output: None };
    let cases: Vec<(&str, ProcessRequest, &str)> = vec![
        ("missing image", req(None, vec![mean_op()]), "the request has no image"),
        (
            "unspecified format",
            req(v1img(0, 1, 1, 1), vec![mean_op()]),
            "pixel format is unspecified: set format to one of GRAY8, RGB8, GRAYA8, RGBA8, GRAY16, RGB16, RGBA16",
        ),
        ("unknown format", req(v1img(42, 1, 1, 1), vec![mean_op()]), "pixel format 42 is not a known PixelFormat value (1..=7)"),
        ("zero height", req(v1img(gray, 3, 0, 0), vec![mean_op()]), "image height must be at least 1, got 0"),
        (
            "length mismatch",
            req(v1img(PixelFormat::Rgba8 as i32, 2, 2, 15), vec![mean_op()]),
            "image data is 15 bytes, expected 16 (= 2 x 2 x 4 bytes per pixel for RGBA8)",
        ),
        (
            "16-bit length mismatch",
            req(v1img(PixelFormat::Gray16 as i32, 3, 1, 3), vec![mean_op()]),
            "image data is 3 bytes, expected 6 (= 3 x 1 x 2 bytes per pixel for GRAY16)",
        ),
        (
            "64-bit overflow",
            req(v1img(PixelFormat::Rgba16 as i32, u32::MAX, u32::MAX, 0), vec![mean_op()]),
            "image dimensions 4294967295x4294967295 with 8 bytes per pixel overflow 64-bit sizes",
        ),
        (
            "empty operation",
            req(v1img(gray, 1, 1, 1), vec![mean_op(), Operation { kind: None }]),
            "operation 1 is empty: set rotate or mean_filter",
        ),
        (
            "rotate without amount",
            req(v1img(gray, 1, 1, 1), vec![rotate_op(None)]),
            "operation 0 (rotate) has no amount: set quarter_turns or angle",
        ),
        (
            "unspecified angle",
            req(v1img(gray, 1, 1, 1), vec![rotate_op(Some(Amount::Angle(0)))]),
            "operation 0 (rotate) has angle 0, expected ANGLE_0, ANGLE_90, ANGLE_180 or ANGLE_270 (1..=4)",
        ),
        (
            "unknown angle",
            req(v1img(gray, 1, 1, 1), vec![rotate_op(Some(Amount::Angle(9)))]),
            "operation 0 (rotate) has angle 9, expected ANGLE_0, ANGLE_90, ANGLE_180 or ANGLE_270 (1..=4)",
        ),
    ];
    for (name, request, message) in cases {
        let status = client.process(request).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, message), "{name}");
        let ok = client.process(req(v1img(gray, 2, 1, 2), vec![rotate_op(Some(Amount::QuarterTurns(1)))])).await;
        assert_eq!(ok.map(|r| r.into_inner().image.unwrap().height).ok(), Some(2), "valid request after {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_the_pixel_limit_get_resource_exhausted_in_both_apis() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_image_pixels = 1000);
    let ch = channel(&server, &pki, "alpha").await;
    let mut legacy = NlImageServiceClient::new(ch.clone());
    let status = legacy.mean_filter(nl(false, 40, 26, 1040)).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "image has 1040 pixels (40x26), over the limit of 1000"));
    assert!(legacy.mean_filter(nl(false, 40, 25, 1000)).await.is_ok(), "exactly at the limit is allowed");

    let mut v1c = ImageServiceClient::new(ch);
    let status = v1c
        .process(ProcessRequest { image: v1img(PixelFormat::Rgb8 as i32, 1001, 1, 3003), operations: vec![], output: None })
        .await
        .unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "image has 1001 pixels (1001x1), over the limit of 1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_operations_get_resource_exhausted() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_operations = 3);
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let image = v1img(PixelFormat::Gray8 as i32, 1, 1, 1);
    let status = client.process(ProcessRequest { image: image.clone(), operations: vec![mean_op(); 4], output: None }).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "request has 4 operations, over the limit of 3"));
    assert!(client.process(ProcessRequest { image, operations: vec![mean_op(); 3], output: None }).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_get_resource_exhausted_and_the_connection_survives() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_message_bytes = 64 * 1024);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let status = client.mean_filter(nl(false, 300, 300, 90_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("the limit is: 65536 bytes"), "{}", status.message());
    assert!(client.mean_filter(nl(false, 100, 100, 10_000)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pipeline_returns_the_image_unchanged() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let image =
        Image { format: PixelFormat::Rgb8 as i32, width: 2, height: 1, data: Bytes::from_static(&[1, 2, 3, 4, 5, 6]), encoded: None };
    let out = client.process(ProcessRequest { image: Some(image.clone()), operations: vec![], output: None }).await.unwrap().into_inner();
    assert_eq!(out.image, Some(image));
}
