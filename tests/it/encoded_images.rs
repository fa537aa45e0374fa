//! Encoded images through imgsvc.v1: an encoded file in instead of raw
//! pixels, an encoded result out, and the statuses for bad or oversized
//! encoded input.

use crate::common::*;
use bytes::Bytes;
use imgsvc::{
    client::{Op, RawImage, image_io::read_image},
    imagefile::{self, DecodeLimits, DecodeOptions, EncodeOptions, Encoding},
    imaging::QuarterTurns,
    proto::v1::{
        EncodedImage, Image, ImageEncoding, MeanFilter, Operation, OutputEncoding, PixelFormat, ProcessRequest, ProcessResponse, Rotate,
        image_service_client::ImageServiceClient, operation::Kind, rotate::Amount,
    },
};
use tonic::Code;

fn encoded(data: Vec<u8>, encoding: ImageEncoding) -> Option<Image> {
    Some(Image { encoded: Some(EncodedImage { data: data.into(), encoding: encoding as i32, page: 0 }), ..Default::default() })
}

fn ops() -> Vec<Operation> {
    vec![
        Operation { kind: Some(Kind::MeanFilter(MeanFilter {})) },
        Operation { kind: Some(Kind::Rotate(Rotate { amount: Some(Amount::QuarterTurns(1)) })) },
    ]
}

fn output(encoding: ImageEncoding, jpeg_quality: u32) -> Option<OutputEncoding> {
    Some(OutputEncoding { encoding: encoding as i32, jpeg_quality })
}

async fn call(server: &TestServer, pki: &Pki, request: ProcessRequest) -> Result<ProcessResponse, tonic::Status> {
    let mut client = ImageServiceClient::new(channel(server, pki, "alpha").await).max_decoding_message_size(64 << 20);
    client.process(request).await.map(|r| r.into_inner())
}

fn decode(data: &Bytes) -> RawImage {
    let limits = DecodeLimits { max_pixels: 1 << 24, max_alloc_bytes: 1 << 28 };
    imagefile::decode(data, &DecodeOptions { encoding: None, page: 0, limits }).unwrap().image
}

const MEAN_THEN_90: [Op; 2] = [Op::MeanFilter, Op::Rotate(QuarterTurns::One)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn png_in_png_out_gives_exactly_what_raw_processing_gives() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let file = std::fs::read(fixture("logo.png")).unwrap();
    // Encoding left UNSPECIFIED: detected from the content.
    let request =
        ProcessRequest { image: encoded(file, ImageEncoding::Unspecified), operations: ops(), output: output(ImageEncoding::Png, 0) };
    let image = call(&server, &pki, request).await.unwrap().image.unwrap();
    let want = expected(&read_image(&fixture("logo.png")).unwrap(), &MEAN_THEN_90);
    assert_eq!((image.format, image.width, image.height, image.data.len()), (PixelFormat::Rgba8 as i32, want.width, want.height, 0));
    let result = image.encoded.unwrap();
    assert_eq!(result.encoding, ImageEncoding::Png as i32);
    assert_eq!(decode(&result.data), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_in_jpeg_out_at_the_requested_quality() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let file = std::fs::read(fixture("rocket.jpg")).unwrap();
    let want = expected(&read_image(&fixture("rocket.jpg")).unwrap(), &MEAN_THEN_90);
    let mut sizes = Vec::new();
    for quality in [30, 95] {
        let request = ProcessRequest {
            image: encoded(file.clone(), ImageEncoding::Jpeg),
            operations: ops(),
            output: output(ImageEncoding::Jpeg, quality),
        };
        let image = call(&server, &pki, request).await.unwrap().image.unwrap();
        assert_eq!((image.format, image.width, image.height), (PixelFormat::Rgb8 as i32, 427, 640));
        let result = image.encoded.unwrap();
        assert_eq!(Encoding::detect(&result.data), Ok(Encoding::Jpeg));
        let got = decode(&result.data);
        let diff = got.data.iter().zip(want.data.iter()).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / got.data.len() as f64;
        assert!(diff < if quality == 95 { 2.0 } else { 6.0 }, "quality {quality}: mean absolute difference {diff}");
        sizes.push(result.data.len());
    }
    assert!(sizes[0] < sizes[1], "quality 30 gives a smaller file than 95: {sizes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_in_raw_out_and_raw_in_encoded_out() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let camera = read_image(&fixture("camera.png")).unwrap();
    let want = expected(&camera, &MEAN_THEN_90);

    let request = ProcessRequest {
        image: encoded(std::fs::read(fixture("camera.png")).unwrap(), ImageEncoding::Png),
        operations: ops(),
        output: None,
    };
    let image = call(&server, &pki, request).await.unwrap().image.unwrap();
    assert_eq!(image.encoded, None);
    assert_eq!(RawImage::from_v1(image), want);

    let request = ProcessRequest { image: Some(camera.into_v1()), operations: ops(), output: output(ImageEncoding::Tiff, 0) };
    let image = call(&server, &pki, request).await.unwrap().image.unwrap();
    assert_eq!(decode(&image.encoded.unwrap().data), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_data_is_invalid_argument_naming_the_problem() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let unknown = ProcessRequest { image: encoded(b"hello".to_vec(), ImageEncoding::Unspecified), operations: ops(), output: None };
    let status = call(&server, &pki, unknown).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "the data is not an image in a known encoding (PNG, JPEG, TIFF, WebP, BMP or GIF)")
    );

    let truncated = std::fs::read(fixture("camera.png")).unwrap()[..2000].to_vec();
    let status = call(&server, &pki, ProcessRequest { image: encoded(truncated, ImageEncoding::Png), operations: ops(), output: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("the data is not a valid PNG image: "), "{}", status.message());

    let png_as_jpeg = std::fs::read(fixture("camera.png")).unwrap();
    let status = call(&server, &pki, ProcessRequest { image: encoded(png_as_jpeg, ImageEncoding::Jpeg), operations: ops(), output: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("the data is not a valid JPEG image: "), "{}", status.message());
}

/// Found by fuzzing (fuzz/ decode_image): zune-jpeg 0.5.15 panics on this
/// file, which the server used to answer with INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_decoder_panics_on_is_invalid_argument_and_the_server_keeps_serving() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let malformed = std::fs::read(fixture("malformed-jpeg-decoder-panic.jpg")).unwrap();
    let request = ProcessRequest { image: encoded(malformed, ImageEncoding::Unspecified), operations: ops(), output: None };
    let status = client.process(request).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "the data is not a valid JPEG image: the decoder failed on malformed data")
    );
    let png = std::fs::read(fixture("chessboard_RGB.png")).unwrap();
    let request = ProcessRequest { image: encoded(png, ImageEncoding::Png), operations: ops(), output: None };
    assert_eq!(client.process(request).await.unwrap().into_inner().image.unwrap().width, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_encoded_requests_are_invalid_argument() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let png = std::fs::read(fixture("camera.png")).unwrap();
    let cases = [
        (
            ProcessRequest {
                image: Some(Image { width: 512, ..encoded(png.clone(), ImageEncoding::Png).unwrap() }),
                operations: ops(),
                output: None,
            },
            "the image has both encoded content and raw pixel fields (format, width, height or data): send one or the other",
        ),
        (
            ProcessRequest { image: encoded(png.clone(), ImageEncoding::Png), operations: ops(), output: output(ImageEncoding::Gif, 0) },
            "GIF is read, not written: choose PNG, JPEG, TIFF, WebP or BMP",
        ),
        (
            ProcessRequest {
                image: encoded(png.clone(), ImageEncoding::Png),
                operations: ops(),
                output: Some(OutputEncoding { encoding: 77, jpeg_quality: 0 }),
            },
            "output.encoding 77 is not a known ImageEncoding value (0..=6)",
        ),
        (
            ProcessRequest { image: encoded(png.clone(), ImageEncoding::Png), operations: ops(), output: output(ImageEncoding::Jpeg, 101) },
            "JPEG quality must be 1..=100, got 101",
        ),
        (
            ProcessRequest {
                image: Some(Image {
                    encoded: Some(EncodedImage { data: png.into(), encoding: ImageEncoding::Png as i32, page: 1 }),
                    ..Default::default()
                }),
                operations: ops(),
                output: None,
            },
            "page 1 asked for, but only TIFF has pages (this is PNG)",
        ),
    ];
    for (request, message) in cases {
        let status = call(&server, &pki, request).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, message));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_image_over_the_pixel_limit_is_resource_exhausted() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_image_pixels = 1000);
    let request = ProcessRequest {
        image: encoded(std::fs::read(fixture("camera.png")).unwrap(), ImageEncoding::Png),
        operations: ops(),
        output: None,
    };
    let status = call(&server, &pki, request).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::ResourceExhausted, "the image is 512x512 (262144 pixels), over the limit of 1000 pixels")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_file_that_decodes_beyond_the_message_limit_is_resource_exhausted() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start_with(&pki, |raw| raw.limits.max_message_bytes = 65536);
    // A flat 200x200 RGB image: a few hundred bytes as PNG, 120000 decoded.
    let flat = RawImage { format: PixelFormat::Rgb8, width: 200, height: 200, data: vec![90u8; 120_000].into() };
    let png = imagefile::encode(&flat, &EncodeOptions::new(Encoding::Png)).unwrap().data;
    assert!(png.len() < 2000, "{} bytes", png.len());
    let status =
        call(&server, &pki, ProcessRequest { image: encoded(png, ImageEncoding::Png), operations: ops(), output: None }).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::ResourceExhausted, "decoding the 200x200 image needs 120000 bytes, over the limit of 65536 bytes")
    );
}
