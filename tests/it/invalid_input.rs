//! Requests that are valid protobuf but not valid images, pipelines or
//! streams: one table per API (NLImageService, imgsvc.v1 Process,
//! imgsvc.v1 ProcessStream). Each row gets its exact status code and a
//! message that says what is wrong, and a valid request on the same
//! connection still succeeds after it.

use crate::common::*;
use bytes::Bytes;
use imgsvc::proto::{
    nlimage::{NlImage, NlImageRotateRequest, nl_image_service_client::NlImageServiceClient},
    v1::{
        self, EncodedImage, Image, Operation, PixelFormat, ProcessRequest, ProcessResponse, ProcessStreamRequest, StreamHeader,
        image_service_client::ImageServiceClient, operation::Kind, process_stream_request::Part, process_stream_response, rotate::Amount,
    },
};
use tonic::{Code, codegen::http::uri::PathAndQuery};

fn nl(color: bool, w: i32, h: i32, len: usize) -> NlImage {
    NlImage { color, width: w, height: h, data: Bytes::from(vec![1u8; len]) }
}

fn v1img(format: PixelFormat, w: u32, h: u32, len: usize) -> Option<Image> {
    Some(Image { format: format as i32, width: w, height: h, data: Bytes::from(vec![1u8; len]), encoded: None })
}

fn rotate_op(amount: Option<Amount>) -> Operation {
    Operation { kind: Some(Kind::Rotate(v1::Rotate { amount })) }
}

fn mean_op() -> Operation {
    Operation { kind: Some(Kind::MeanFilter(v1::MeanFilter {})) }
}

fn assert_status(name: &str, status: &tonic::Status, code: Code, message: &str) {
    assert_eq!(status.code(), code, "{name}: {}", status.message());
    assert!(status.message().contains(message), "{name}: {:?} does not say {message:?}", status.message());
}

/// One NLImageService call.
enum Legacy {
    Rotate(i32, Option<NlImage>),
    Mean(NlImage),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_api_refuses_bad_input_with_the_right_code_and_message_and_keeps_serving() {
    use Legacy::{Mean, Rotate};
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let invalid = Code::InvalidArgument;
    let rows: Vec<(&str, Legacy, Code, &str)> = vec![
        // Missing and empty fields.
        ("no image", Rotate(1, None), invalid, "the request has no image"),
        ("empty NLImage", Mean(NlImage::default()), invalid, "image width must be at least 1, got 0"),
        (
            "empty data",
            Rotate(1, Some(nl(false, 4, 3, 0))),
            invalid,
            "image data is 0 bytes, expected 12 (= 4 x 3 x 1 bytes per pixel for GRAY8)",
        ),
        // Zero and negative dimensions (int32 in this protocol).
        ("zero height", Mean(nl(false, 4, 0, 0)), invalid, "image height must be at least 1, got 0"),
        ("negative width", Rotate(1, Some(nl(false, -3, 4, 12))), invalid, "image width must be at least 1, got -3"),
        ("negative height", Mean(nl(true, 4, -2, 0)), invalid, "image height must be at least 1, got -2"),
        (
            "most negative width",
            Rotate(2, Some(nl(false, i32::MIN, i32::MIN, 0))),
            invalid,
            "image width must be at least 1, got -2147483648",
        ),
        // Length and dimension mismatches.
        (
            "short data",
            Rotate(1, Some(nl(true, 4, 3, 35))),
            invalid,
            "image data is 35 bytes, expected 36 (= 4 x 3 x 3 bytes per pixel for RGB8)",
        ),
        ("long data", Mean(nl(false, 4, 3, 13)), invalid, "image data is 13 bytes, expected 12 (= 4 x 3 x 1 bytes per pixel for GRAY8)"),
        (
            "color with gray data",
            Mean(nl(true, 4, 4, 16)),
            invalid,
            "image data is 16 bytes, expected 48 (= 4 x 4 x 3 bytes per pixel for RGB8)",
        ),
        (
            "gray with color data",
            Rotate(3, Some(nl(false, 2, 2, 12))),
            invalid,
            "image data is 12 bytes, expected 4 (= 2 x 2 x 1 bytes per pixel for GRAY8)",
        ),
        // Huge dimensions: past int32 sizes, or within them but over the pixel limit.
        (
            "RGB product overflows 32 bits",
            Rotate(1, Some(nl(true, 65536, 65536, 3))),
            invalid,
            "image dimensions 65536x65536 with 3 bytes per pixel overflow 32-bit sizes",
        ),
        (
            "gray product overflows 32 bits",
            Mean(nl(false, 46341, 46341, 1)),
            invalid,
            "image dimensions 46341x46341 with 1 bytes per pixel overflow 32-bit sizes",
        ),
        ("largest int32 dimensions", Rotate(1, Some(nl(false, i32::MAX, i32::MAX, 1))), invalid, "overflow 32-bit sizes"),
        (
            "over the pixel limit",
            Mean(nl(false, 20000, 20000, 1)),
            Code::ResourceExhausted,
            "image has 400000000 pixels (20000x20000), over the limit of 100000000",
        ),
        // Unknown enum values.
        (
            "rotation past the enum",
            Rotate(4, Some(nl(false, 1, 1, 1))),
            invalid,
            "rotation 4 is not a known value (expected 0=NONE, 1=NINETY_DEG, 2=ONE_EIGHTY_DEG or 3=TWO_SEVENTY_DEG)",
        ),
        ("negative rotation", Rotate(-1, Some(nl(false, 1, 1, 1))), invalid, "rotation -1 is not a known value"),
    ];
    for (name, call, code, message) in rows {
        let status = match call {
            Rotate(rotation, image) => client.rotate_image(NlImageRotateRequest { rotation, image }).await.unwrap_err(),
            Mean(image) => client.mean_filter(image).await.unwrap_err(),
        };
        assert_status(name, &status, code, message);
        let ok = client.rotate_image(NlImageRotateRequest { rotation: 1, image: Some(nl(false, 2, 1, 2)) }).await;
        assert_eq!(ok.map(|r| r.into_inner()).map(|r| (r.width, r.height)).ok(), Some((1, 2)), "a valid request after {name}");
    }
    assert_eq!(client.mean_filter(nl(true, 2, 2, 12)).await.unwrap().into_inner().data.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_process_refuses_bad_input_with_the_right_code_and_message_and_keeps_serving() {
    use PixelFormat::{Gray8, Gray16, Rgb8, Rgba8, Rgba16};
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let req = |image: Option<Image>, operations: Vec<Operation>| ProcessRequest { image, operations, output: None };
    let encoded = |data: &'static [u8], encoding: i32| {
        Some(Image { encoded: Some(EncodedImage { data: Bytes::from_static(data), encoding, page: 0 }), ..Default::default() })
    };
    let gray = || v1img(Gray8, 1, 1, 1);
    let invalid = Code::InvalidArgument;
    let angle_message =
        |value: i32| format!("operation 0 (rotate) has angle {value}, expected ANGLE_0, ANGLE_90, ANGLE_180 or ANGLE_270 (1..=4)");
    let rows: Vec<(&str, ProcessRequest, Code, String)> = vec![
        // Missing and empty fields.
        ("no image, no operations", req(None, vec![]), invalid, "the request has no image".into()),
        ("no image", req(None, vec![mean_op()]), invalid, "the request has no image".into()),
        (
            "empty image",
            req(Some(Image::default()), vec![mean_op()]),
            invalid,
            "pixel format is unspecified: set format to one of GRAY8, RGB8, GRAYA8, RGBA8, GRAY16, RGB16, RGBA16".into(),
        ),
        (
            "empty data",
            req(v1img(Rgb8, 2, 2, 0), vec![mean_op()]),
            invalid,
            "image data is 0 bytes, expected 12 (= 2 x 2 x 3 bytes per pixel for RGB8)".into(),
        ),
        (
            "empty operation",
            req(gray(), vec![mean_op(), Operation { kind: None }]),
            invalid,
            "operation 1 is empty or of a kind this server does not know: set rotate or mean_filter".into(),
        ),
        (
            "rotate without amount",
            req(gray(), vec![rotate_op(None)]),
            invalid,
            "operation 0 (rotate) has no amount: set quarter_turns or angle".into(),
        ),
        (
            "empty encoded data",
            req(encoded(b"", 0), vec![mean_op()]),
            invalid,
            "image.encoded.data is empty: send the bytes of an image file (PNG, JPEG, TIFF, WebP, BMP or GIF)".into(),
        ),
        // Zero dimensions (uint32 in this API: no negative values).
        ("zero width", req(v1img(Gray8, 0, 3, 0), vec![mean_op()]), invalid, "image width must be at least 1, got 0".into()),
        ("zero height", req(v1img(Gray8, 3, 0, 0), vec![mean_op()]), invalid, "image height must be at least 1, got 0".into()),
        // Length and dimension mismatches.
        (
            "short data",
            req(v1img(Rgba8, 2, 2, 15), vec![mean_op()]),
            invalid,
            "image data is 15 bytes, expected 16 (= 2 x 2 x 4 bytes per pixel for RGBA8)".into(),
        ),
        (
            "long data",
            req(v1img(Gray8, 2, 2, 5), vec![]),
            invalid,
            "image data is 5 bytes, expected 4 (= 2 x 2 x 1 bytes per pixel for GRAY8)".into(),
        ),
        (
            "16-bit data of 8-bit size",
            req(v1img(Gray16, 3, 1, 3), vec![mean_op()]),
            invalid,
            "image data is 3 bytes, expected 6 (= 3 x 1 x 2 bytes per pixel for GRAY16)".into(),
        ),
        // Huge dimensions: 64-bit sizes, so past 32 bits is only over the pixel limit.
        (
            "product past 32 bits",
            req(v1img(Gray8, 65536, 65536, 0), vec![mean_op()]),
            Code::ResourceExhausted,
            "image has 4294967296 pixels (65536x65536), over the limit of 100000000".into(),
        ),
        (
            "largest dimensions, 1 byte per pixel",
            req(v1img(Gray8, u32::MAX, u32::MAX, 0), vec![mean_op()]),
            Code::ResourceExhausted,
            "image has 18446744065119617025 pixels (4294967295x4294967295), over the limit of 100000000".into(),
        ),
        (
            "product overflows 64 bits",
            req(v1img(Gray16, u32::MAX, u32::MAX, 0), vec![mean_op()]),
            invalid,
            "image dimensions 4294967295x4294967295 with 2 bytes per pixel overflow 64-bit sizes".into(),
        ),
        (
            "product overflows 64 bits at 8 bytes per pixel",
            req(v1img(Rgba16, u32::MAX, u32::MAX, 0), vec![mean_op()]),
            invalid,
            "image dimensions 4294967295x4294967295 with 8 bytes per pixel overflow 64-bit sizes".into(),
        ),
        (
            "too many operations",
            req(gray(), vec![mean_op(); 17]),
            Code::ResourceExhausted,
            "request has 17 operations, over the limit of 16".into(),
        ),
        // Unknown enum values.
        (
            "unknown pixel format",
            req(Some(Image { format: 42, ..gray().unwrap() }), vec![mean_op()]),
            invalid,
            "pixel format 42 is not a known PixelFormat value (1..=7)".into(),
        ),
        (
            "negative pixel format",
            req(Some(Image { format: -1, ..gray().unwrap() }), vec![]),
            invalid,
            "pixel format -1 is not a known PixelFormat value (1..=7)".into(),
        ),
        ("unspecified angle", req(gray(), vec![rotate_op(Some(Amount::Angle(0)))]), invalid, angle_message(0)),
        ("angle past the enum", req(gray(), vec![rotate_op(Some(Amount::Angle(5)))]), invalid, angle_message(5)),
        ("negative angle", req(gray(), vec![rotate_op(Some(Amount::Angle(-7)))]), invalid, angle_message(-7)),
        (
            "unknown encoding of an encoded image",
            req(encoded(b"\x89PNG", 99), vec![]),
            invalid,
            "image.encoded.encoding 99 is not a known ImageEncoding value (0..=6)".into(),
        ),
    ];
    let valid = || req(v1img(Gray8, 2, 1, 2), vec![rotate_op(Some(Amount::QuarterTurns(1)))]);
    for (name, request, code, message) in rows {
        let status = client.process(request).await.unwrap_err();
        assert_status(name, &status, code, &message);
        let ok = client.process(valid()).await;
        assert_eq!(ok.map(|r| r.into_inner().image.unwrap().height).ok(), Some(2), "a valid request after {name}");
    }
    // At the operation limit is allowed.
    assert!(client.process(req(gray(), vec![mean_op(); 16])).await.is_ok());
}

/// A ProcessRequest from a newer client: its operation is of a kind this
/// server does not know (field 3 of Operation).
#[derive(Clone, PartialEq, prost::Message)]
struct NewerProcessRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<Image>,
    #[prost(message, repeated, tag = "2")]
    operations: Vec<NewerOperation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NewerOperation {
    #[prost(message, optional, tag = "3")]
    sharpen: Option<v1::MeanFilter>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_process_refuses_an_operation_kind_it_does_not_know() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut grpc = tonic::client::Grpc::new(channel(&server, &pki, "alpha").await);
    grpc.ready().await.unwrap();
    let request = NewerProcessRequest {
        image: v1img(PixelFormat::Gray8, 1, 1, 1),
        operations: vec![NewerOperation { sharpen: Some(v1::MeanFilter {}) }],
    };
    let codec = tonic_prost::ProstCodec::<NewerProcessRequest, ProcessResponse>::default();
    let path = PathAndQuery::from_static("/imgsvc.v1.ImageService/Process");
    let status = grpc.unary(tonic::Request::new(request), path, codec).await.unwrap_err();
    assert_status(
        "unknown operation kind",
        &status,
        Code::InvalidArgument,
        "operation 0 is empty or of a kind this server does not know: set rotate or mean_filter",
    );
}

fn header(format: PixelFormat, w: u32, h: u32, operations: Vec<Operation>) -> ProcessStreamRequest {
    ProcessStreamRequest { part: Some(Part::Header(StreamHeader { format: format as i32, width: w, height: h, operations })) }
}

fn chunk(len: usize) -> ProcessStreamRequest {
    ProcessStreamRequest { part: Some(Part::Chunk(Bytes::from(vec![1u8; len]))) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_process_stream_refuses_protocol_violations_and_bad_headers_and_keeps_serving() {
    use PixelFormat::{Gray8, Rgba16};
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.stream.max_chunk_bytes = Some(64));
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let gray = |w, h| header(Gray8, w, h, vec![]);
    let empty = ProcessStreamRequest { part: None };
    let invalid = Code::InvalidArgument;
    let rows: Vec<(&str, Vec<ProcessStreamRequest>, Code, &str)> = vec![
        // Missing and empty messages.
        ("no messages", vec![], invalid, "the stream ended before its header"),
        ("empty first message", vec![empty.clone()], invalid, "message 0 has neither header nor chunk"),
        ("empty message after the header", vec![gray(2, 2), empty], invalid, "message 1 has neither header nor chunk"),
        ("empty chunk", vec![gray(2, 2), chunk(0)], invalid, "message 1 is an empty chunk"),
        // Out of order.
        ("data before the header", vec![chunk(4), gray(2, 2)], invalid, "message 0 is a chunk, but the first message must be the header"),
        ("repeated header", vec![gray(2, 2), gray(2, 2)], invalid, "message 1 is a second header; a stream has exactly one"),
        (
            "second header after data",
            vec![gray(2, 2), chunk(2), gray(2, 2)],
            invalid,
            "message 2 is a second header; a stream has exactly one",
        ),
        // Sizes: past the declared size, ending early, chunks over the limit.
        (
            "chunks past the declared size",
            vec![gray(2, 2), chunk(3), chunk(2)],
            invalid,
            "message 2 brings the data to 5 bytes, past the 4 bytes the header declared",
        ),
        (
            "first chunk past the declared size",
            vec![gray(2, 2), chunk(5)],
            invalid,
            "message 1 brings the data to 5 bytes, past the 4 bytes the header declared",
        ),
        ("stream ending after the header", vec![gray(2, 2)], invalid, "the stream ended after 0 of the 4 bytes the header declared"),
        ("truncated stream", vec![gray(4, 4), chunk(10)], invalid, "the stream ended after 10 of the 16 bytes the header declared"),
        (
            "oversized chunk",
            vec![gray(10, 10), chunk(65)],
            invalid,
            "message 1 is a chunk of 65 bytes, over the limit of 64 bytes per chunk",
        ),
        // Bad headers, refused before any data.
        ("zero width", vec![gray(0, 2)], invalid, "image width must be at least 1, got 0"),
        ("unspecified format", vec![header(PixelFormat::Unspecified, 2, 2, vec![])], invalid, "pixel format is unspecified"),
        (
            "unknown operation",
            vec![header(Gray8, 2, 2, vec![Operation { kind: None }]), chunk(4)],
            invalid,
            "operation 0 is empty or of a kind this server does not know",
        ),
        (
            "over the pixel limit",
            vec![gray(65536, 65536)],
            Code::ResourceExhausted,
            "image has 4294967296 pixels (65536x65536), over the limit of 100000000",
        ),
        (
            "product overflows 64 bits",
            vec![header(Rgba16, u32::MAX, u32::MAX, vec![])],
            invalid,
            "image dimensions 4294967295x4294967295 with 8 bytes per pixel overflow 64-bit sizes",
        ),
    ];
    let valid = || vec![header(Gray8, 3, 2, vec![mean_op()]), chunk(4), chunk(2)];
    for (name, messages, code, message) in rows {
        let status = refused_stream(&mut client, messages).await;
        assert_status(name, &status, code, message);
        let ok = client.process_stream(tokio_stream::iter(valid())).await;
        let mut responses = ok.unwrap_or_else(|e| panic!("a valid stream after {name}: {e}")).into_inner();
        let first = responses.message().await.unwrap().expect("a response header").part;
        let header = matches!(first, Some(process_stream_response::Part::Header(StreamHeader { width: 3, height: 2, .. })));
        assert!(header, "a valid stream after {name}: {first:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_a_configured_pixel_limit_get_resource_exhausted_in_both_apis() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_image_pixels = 1000);
    let ch = channel(&server, &pki, "alpha").await;
    let mut legacy = NlImageServiceClient::new(ch.clone());
    let status = legacy.mean_filter(nl(false, 40, 26, 1040)).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "image has 1040 pixels (40x26), over the limit of 1000"));
    assert!(legacy.mean_filter(nl(false, 40, 25, 1000)).await.is_ok(), "exactly at the limit is allowed");

    let mut v1c = ImageServiceClient::new(ch);
    let status =
        v1c.process(ProcessRequest { image: v1img(PixelFormat::Rgb8, 1001, 1, 3003), operations: vec![], output: None }).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "image has 1001 pixels (1001x1), over the limit of 1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_get_resource_exhausted_and_the_connection_survives() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_message_bytes = 64 * 1024);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let status = client.mean_filter(nl(false, 300, 300, 90_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("request message of 90010 bytes, over the server's message limit of 65536 bytes"),
        "{}",
        status.message()
    );
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
