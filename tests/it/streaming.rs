//! ProcessStream: images beyond the unary limit, chunk edge cases, tenant
//! rules on the header. Protocol violations: tests/it/invalid_input.rs.

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    client::{
        Op,
        image_io::RawImage,
        stream::{process_stream, request_messages},
    },
    imaging::QuarterTurns,
    proto::v1::{Image, PixelFormat, ProcessRequest, image_service_client::ImageServiceClient, process_stream_request::Part},
};
use tonic::Code;

fn pattern_image(format: PixelFormat, w: u32, h: u32, channels: usize) -> RawImage {
    let len = w as usize * h as usize * channels;
    RawImage { format, width: w, height: h, data: Bytes::from((0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>()) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_an_image_larger_than_the_unary_message_limit() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| {
        raw.limits.max_message_bytes = 1 << 20;
        raw.stream.max_chunk_bytes = Some(256 << 10);
        raw.stream.response_chunk_bytes = Some(100_000);
    });
    let image = pattern_image(PixelFormat::Rgb8, 1200, 900, 3); // 3.2 MB
    let ops = [Op::MeanFilter, Op::Rotate(QuarterTurns::One)];
    // Unary: refused, the message is over the limit.
    let unary = ImageServiceClient::new(channel(&server, &pki, "alpha").await)
        .process(ProcessRequest { image: Some(image.clone().into_v1()), operations: vec![], output: None })
        .await
        .unwrap_err();
    assert_eq!(unary.code(), Code::ResourceExhausted);
    let out = process_stream(channel(&server, &pki, "alpha").await, image.clone(), &ops, 256 << 10, "localhost", None).await.unwrap();
    assert_eq!(out, expected(&image, &ops));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_chunks_and_chunks_that_do_not_divide_a_row_reassemble_exactly() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    for (image, chunk_bytes) in [
        (pattern_image(PixelFormat::Rgb8, 7, 5, 3), 1),
        (pattern_image(PixelFormat::Rgb8, 10, 9, 3), 7),
        (pattern_image(PixelFormat::Gray8, 1, 1, 1), 1),
        (pattern_image(PixelFormat::Rgba8, 33, 17, 4), 1000),
    ] {
        let ops = [Op::Rotate(QuarterTurns::Three), Op::MeanFilter];
        let out = process_stream(channel(&server, &pki, "alpha").await, image.clone(), &ops, chunk_bytes, "localhost", None).await.unwrap();
        assert_eq!(out, expected(&image, &ops), "{}x{} in {chunk_bytes}-byte chunks", image.width, image.height);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_headers_are_subject_to_tenant_rules_before_any_data() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| {
        let t = raw.tenants.get_mut("alpha").unwrap();
        t.allowed_operations = Some(vec!["rotate".into()]);
        t.max_image_pixels = Some(100);
    });
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let mut messages = request_messages(pattern_image(PixelFormat::Gray8, 5, 5, 1), &[Op::MeanFilter], 5);
    let status = refused_stream(&mut client, messages.clone()).await;
    assert_eq!(
        (status.code(), status.message()),
        (Code::PermissionDenied, "operation mean_filter is not allowed for tenant \"alpha\" (allowed: rotate)")
    );
    // Too many pixels: refused from the header alone (no data sent).
    messages = request_messages(pattern_image(PixelFormat::Gray8, 11, 10, 1), &[Op::Rotate(QuarterTurns::One)], 5);
    messages.truncate(1);
    let status = refused_stream(&mut client, messages).await;
    assert_eq!((status.code(), status.message()), (Code::ResourceExhausted, "image has 110 pixels (11x10), over the limit of 100"));
}

#[test]
fn request_messages_are_a_header_then_chunks_covering_the_data() {
    let image = pattern_image(PixelFormat::Rgb8, 4, 3, 3);
    let messages = request_messages(image.clone(), &[Op::MeanFilter], 5);
    assert_eq!(messages.len(), 1 + 36usize.div_ceil(5));
    let data: Vec<u8> = messages[1..]
        .iter()
        .flat_map(|m| match &m.part {
            Some(Part::Chunk(c)) => c.to_vec(),
            _ => panic!("only chunks after the header"),
        })
        .collect();
    assert_eq!(data, image.data.to_vec());
    let _ = Image::default();
}
