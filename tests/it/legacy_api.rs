//! NLImageService on its own: the exact wire paths, every rotation, the mean
//! filter, and degenerate sizes, with a plain tonic client.

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    imaging::{Layout, QuarterTurns, reference},
    proto::nlimage::{NlImage, NlImageRotateRequest, nl_image_rotate_request::Rotation, nl_image_service_client::NlImageServiceClient},
};
use tonic::codegen::http::uri::PathAndQuery;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8).collect()
}

fn image(color: bool, w: i32, h: i32) -> NlImage {
    let channels = if color { 3 } else { 1 };
    NlImage { color, width: w, height: h, data: Bytes::from(pattern((w * h * channels) as usize, w as u32 * 31 + h as u32)) }
}

fn layout(img: &NlImage) -> Layout {
    Layout::new(img.width as usize, img.height as usize, if img.color { 3 } else { 1 }).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_unpackaged_wire_paths() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut grpc = tonic::client::Grpc::new(channel(&server, &pki, "alpha").await);
    grpc.ready().await.unwrap();
    let img = image(false, 5, 3);
    // Exactly the paths every existing NLImageService client uses.
    let rotated: tonic::Response<NlImage> = grpc
        .unary(
            tonic::Request::new(NlImageRotateRequest { rotation: Rotation::NinetyDeg as i32, image: Some(img.clone()) }),
            PathAndQuery::from_static("/NLImageService/RotateImage"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap();
    assert_eq!(rotated.get_ref().data, reference::rotate(&img.data, layout(&img), QuarterTurns::One));
    grpc.ready().await.unwrap();
    let filtered: tonic::Response<NlImage> = grpc
        .unary(
            tonic::Request::new(img.clone()),
            PathAndQuery::from_static("/NLImageService/MeanFilter"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap();
    assert_eq!(filtered.get_ref().data, reference::mean_filter(&img.data, layout(&img)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_counter_clockwise_and_swaps_dimensions() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await);
    // 2x3 gray image:   1 2        90° CCW:  2 4 6
    //                   3 4                  1 3 5
    //                   5 6
    let img = NlImage { color: false, width: 2, height: 3, data: Bytes::from_static(&[1, 2, 3, 4, 5, 6]) };
    let out =
        client.rotate_image(NlImageRotateRequest { rotation: Rotation::NinetyDeg as i32, image: Some(img) }).await.unwrap().into_inner();
    assert_eq!((out.width, out.height, out.color), (3, 2, false));
    assert_eq!(&out.data[..], &[2, 4, 6, 1, 3, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rotation_and_the_mean_filter_match_the_reference_for_degenerate_and_odd_sizes() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let rotations = [
        (Rotation::None, QuarterTurns::Zero),
        (Rotation::NinetyDeg, QuarterTurns::One),
        (Rotation::OneEightyDeg, QuarterTurns::Two),
        (Rotation::TwoSeventyDeg, QuarterTurns::Three),
    ];
    for color in [false, true] {
        for (w, h) in [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (64, 33)] {
            let img = image(color, w, h);
            for (rotation, turns) in rotations {
                let out = client
                    .rotate_image(NlImageRotateRequest { rotation: rotation as i32, image: Some(img.clone()) })
                    .await
                    .unwrap()
                    .into_inner();
                let want_layout = layout(&img).rotated(turns);
                assert_eq!((out.width as usize, out.height as usize, out.color), (want_layout.width(), want_layout.height(), color));
                assert_eq!(out.data, reference::rotate(&img.data, layout(&img), turns), "{w}x{h} color={color} {rotation:?}");
            }
            let out = client.mean_filter(img.clone()).await.unwrap().into_inner();
            assert_eq!((out.width, out.height, out.color), (w, h, color));
            assert_eq!(out.data, reference::mean_filter(&img.data, layout(&img)), "{w}x{h} color={color} mean");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carries_a_3840x2160_rgb_image_within_the_default_message_limit() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = NlImageServiceClient::new(channel(&server, &pki, "alpha").await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let img = image(true, 3840, 2160);
    let out = client
        .rotate_image(NlImageRotateRequest { rotation: Rotation::OneEightyDeg as i32, image: Some(img.clone()) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.data, reference::rotate(&img.data, layout(&img), QuarterTurns::Two));
}
