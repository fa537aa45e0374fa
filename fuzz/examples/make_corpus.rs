//! Writes the seed corpora, `fuzz/corpus/<target>/<seed>`: small valid
//! inputs of every kind each target takes, and near-valid ones (one field
//! wrong) that start the fuzzer next to each refusal. Run from anywhere:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example make_corpus
//! ```
//!
//! It rewrites the seeds it names and leaves other files alone. Input
//! layouts are those of `fuzz/src/lib.rs`.

use std::path::Path;

use bytes::Bytes;
use imgsvc::{
    client::{Op, stream::request_messages},
    imagefile::{self, EncodeOptions, Encoding, RawImage},
    imaging::QuarterTurns,
    proto::{
        nlimage::{NlImage, NlImageRotateRequest},
        v1::{
            EncodedImage, Image, ImageEncoding, MeanFilter, Operation, OutputEncoding, PixelFormat, ProcessRequest, ProcessStreamRequest,
            Rotate, StreamHeader, operation::Kind, process_stream_request::Part, rotate::Amount,
        },
    },
};
use prost::Message;

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Seeds); 4] = [
        ("legacy_request", legacy_request()),
        ("v1_request", v1_request()),
        ("stream_reassembly", stream_reassembly()),
        ("decode_image", decode_image()),
    ];
    for (target, seeds) in targets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}

/// Deterministic, varied sample bytes.
fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i * 37 % 251) as u8).collect::<Vec<u8>>().into()
}

fn raw(format: PixelFormat, width: u32, height: u32) -> RawImage {
    RawImage { format, width, height, data: pattern(width as usize * height as usize * imagefile::bytes_per_pixel(format)) }
}

fn encoded(image: &RawImage, encoding: Encoding) -> Vec<u8> {
    imagefile::encode(image, &EncodeOptions::new(encoding)).expect("seed images encode").data
}

fn prefixed(first: u8, message: impl Message) -> Vec<u8> {
    let mut bytes = vec![first];
    message.encode(&mut bytes).expect("a Vec grows");
    bytes
}

fn nl(color: bool, width: i32, height: i32, len: usize) -> NlImage {
    NlImage { color, width, height, data: pattern(len) }
}

fn legacy_request() -> Seeds {
    const ROTATE: u8 = 0;
    const MEAN: u8 = 1;
    let rotate = |rotation, image| prefixed(ROTATE, NlImageRotateRequest { rotation, image: Some(image) });
    vec![
        ("rotate_90_gray_3x2", rotate(1, nl(false, 3, 2, 6))),
        ("rotate_180_gray_1x5", rotate(2, nl(false, 1, 5, 5))),
        ("rotate_270_rgb_4x3", rotate(3, nl(true, 4, 3, 36))),
        ("rotate_none_rgb_1x1", rotate(0, nl(true, 1, 1, 3))),
        ("rotate_90_gray_33x17", rotate(1, nl(false, 33, 17, 561))),
        ("mean_gray_5x4", prefixed(MEAN, nl(false, 5, 4, 20))),
        ("mean_rgb_7x3", prefixed(MEAN, nl(true, 7, 3, 63))),
        ("mean_gray_1x1", prefixed(MEAN, nl(false, 1, 1, 1))),
        ("mean_rgb_19x11", prefixed(MEAN, nl(true, 19, 11, 627))),
        // Near-valid: one thing wrong each.
        ("rotate_unknown_rotation", rotate(7, nl(false, 2, 2, 4))),
        ("rotate_short_data", rotate(1, nl(true, 4, 3, 35))),
        ("rotate_no_image", prefixed(ROTATE, NlImageRotateRequest { rotation: 1, image: None })),
        ("mean_zero_width", prefixed(MEAN, nl(false, 0, 4, 0))),
        ("mean_negative_height", prefixed(MEAN, nl(false, 4, -2, 0))),
        ("mean_color_with_gray_data", prefixed(MEAN, nl(true, 4, 4, 16))),
        ("mean_overflows_int32", prefixed(MEAN, nl(true, 65536, 65536, 3))),
        ("mean_over_pixel_limit", prefixed(MEAN, nl(false, 200, 100, 0))),
    ]
}

fn mean() -> Operation {
    Operation { kind: Some(Kind::MeanFilter(MeanFilter {})) }
}

fn rotate(amount: Amount) -> Operation {
    Operation { kind: Some(Kind::Rotate(Rotate { amount: Some(amount) })) }
}

fn process(image: Image, operations: Vec<Operation>, output: Option<OutputEncoding>) -> Vec<u8> {
    ProcessRequest { image: Some(image), operations, output }.encode_to_vec()
}

fn encoded_image(data: Vec<u8>, encoding: ImageEncoding) -> Image {
    Image { encoded: Some(EncodedImage { data: data.into(), encoding: encoding as i32, page: 0 }), ..Default::default() }
}

fn v1_request() -> Seeds {
    use PixelFormat as F;
    let ops = || vec![mean(), rotate(Amount::QuarterTurns(1))];
    let png = encoded(&raw(F::Gray8, 6, 4), Encoding::Png);
    let output = |encoding: ImageEncoding, jpeg_quality| Some(OutputEncoding { encoding: encoding as i32, jpeg_quality });
    let mut seeds: Seeds = [
        ("gray8_3x2", F::Gray8),
        ("rgb8_3x2", F::Rgb8),
        ("graya8_3x2", F::Graya8),
        ("rgba8_3x2", F::Rgba8),
        ("gray16_3x2", F::Gray16),
        ("rgb16_3x2", F::Rgb16),
        ("rgba16_3x2", F::Rgba16),
    ]
    .into_iter()
    .map(|(name, format)| (name, process(raw(format, 3, 2).into_v1(), ops(), None)))
    .collect();
    let angles = vec![rotate(Amount::Angle(4)), mean(), rotate(Amount::QuarterTurns(5)), rotate(Amount::Angle(3))];
    let long_image = || raw(F::Gray8, 4, 1).into_v1();
    seeds.extend([
        ("rgba8_17x9_angles", process(raw(F::Rgba8, 17, 9).into_v1(), angles, None)),
        ("rgb8_no_operations", process(raw(F::Rgb8, 2, 2).into_v1(), vec![], None)),
        ("png_in_raw_out", process(encoded_image(png.clone(), ImageEncoding::Unspecified), ops(), None)),
        ("png_in_jpeg_out", process(encoded_image(png.clone(), ImageEncoding::Png), ops(), output(ImageEncoding::Jpeg, 90))),
        ("raw_in_webp_out", process(raw(F::Rgba16, 3, 3).into_v1(), ops(), output(ImageEncoding::Webp, 0))),
        // Near-valid: one thing wrong each.
        ("format_unspecified", process(Image { format: 0, ..raw(F::Gray8, 2, 2).into_v1() }, ops(), None)),
        ("format_unknown", process(Image { format: 42, ..raw(F::Gray8, 2, 2).into_v1() }, ops(), None)),
        ("angle_unspecified", process(long_image(), vec![rotate(Amount::Angle(0))], None)),
        ("operation_empty", process(long_image(), vec![mean(), Operation { kind: None }], None)),
        ("rotate_without_amount", process(long_image(), vec![Operation { kind: Some(Kind::Rotate(Rotate { amount: None })) }], None)),
        ("too_many_operations", process(long_image(), vec![mean(); 17], None)),
        ("data_one_byte_short", process(Image { data: pattern(5), ..raw(F::Rgb8, 2, 1).into_v1() }, ops(), None)),
        ("zero_height", process(Image { height: 0, ..raw(F::Gray8, 3, 1).into_v1() }, ops(), None)),
        ("overflows_64_bits", process(Image { width: u32::MAX, height: u32::MAX, ..raw(F::Rgba16, 1, 1).into_v1() }, ops(), None)),
        ("encoded_with_raw_fields", process(Image { width: 6, ..encoded_image(png.clone(), ImageEncoding::Png) }, ops(), None)),
        (
            "output_encoding_unknown",
            process(long_image(), ops(), output(ImageEncoding::Unspecified, 0).map(|o| OutputEncoding { encoding: 77, ..o })),
        ),
        ("output_gif", process(long_image(), ops(), output(ImageEncoding::Gif, 0))),
        ("jpeg_quality_101", process(long_image(), ops(), output(ImageEncoding::Jpeg, 101))),
        ("encoded_empty", process(encoded_image(vec![], ImageEncoding::Png), ops(), None)),
    ]);
    seeds
}

/// `max_chunk - 1`, then the messages length-delimited.
fn stream_bytes(max_chunk: usize, messages: &[ProcessStreamRequest]) -> Vec<u8> {
    let mut bytes = vec![u8::try_from(max_chunk - 1).expect("max_chunk is 1..=256")];
    for message in messages {
        message.encode_length_delimited(&mut bytes).expect("a Vec grows");
    }
    bytes
}

fn stream_reassembly() -> Seeds {
    use PixelFormat as F;
    let valid = |image: RawImage, chunk: usize| request_messages(image, &[Op::MeanFilter, Op::Rotate(QuarterTurns::One)], chunk);
    let header = || ProcessStreamRequest {
        part: Some(Part::Header(StreamHeader { format: F::Gray8 as i32, width: 2, height: 2, operations: vec![] })),
    };
    let chunk = |len| ProcessStreamRequest { part: Some(Part::Chunk(pattern(len))) };
    let empty = ProcessStreamRequest { part: None };
    vec![
        ("gray8_4x3_chunks_of_5", stream_bytes(8, &valid(raw(F::Gray8, 4, 3), 5))),
        ("rgb16_3x2_one_chunk", stream_bytes(64, &valid(raw(F::Rgb16, 3, 2), 36))),
        ("rgba8_5x5_bytes", stream_bytes(1, &valid(raw(F::Rgba8, 5, 5), 1))),
        ("graya8_9x7_rows_split", stream_bytes(256, &valid(raw(F::Graya8, 9, 7), 13))),
        // Near-valid: one thing wrong each.
        ("no_messages", stream_bytes(8, &[])),
        ("chunk_before_header", stream_bytes(8, &[chunk(4), header()])),
        ("second_header", stream_bytes(8, &[header(), chunk(2), header(), chunk(2)])),
        ("empty_message", stream_bytes(8, &[header(), empty.clone(), chunk(4)])),
        ("empty_first_message", stream_bytes(8, &[empty])),
        ("past_declared_size", stream_bytes(8, &[header(), chunk(3), chunk(2)])),
        ("truncated", stream_bytes(8, &[header(), chunk(3)])),
        ("header_only", stream_bytes(8, &[header()])),
        ("empty_chunk", stream_bytes(8, &[header(), chunk(0), chunk(4)])),
        ("chunk_over_limit", stream_bytes(3, &[header(), chunk(4)])),
    ]
}

/// The smallest GIF: one transparent pixel (imgsvc writes no GIF).
const GIF_1X1: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

fn decode_image() -> Seeds {
    use PixelFormat as F;
    // data[0]: 0 = detect the encoding, page 0; 7 and 14: detect, pages 1 and 2.
    let detect = |file: Vec<u8>| [vec![0], file].concat();
    let fixture = |name: &str| std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)).unwrap();
    let multipage = fixture("multipage.tif");
    let png = encoded(&raw(F::Rgb8, 6, 4), Encoding::Png);
    // A flat 200x100 image: a small file over the targets' pixel limit.
    let flat = RawImage { format: F::Gray8, width: 200, height: 100, data: vec![90; 20_000].into() };
    vec![
        ("png_rgb8", detect(png.clone())),
        ("png_gray16", detect(encoded(&raw(F::Gray16, 5, 3), Encoding::Png))),
        ("png_graya8", detect(encoded(&raw(F::Graya8, 5, 3), Encoding::Png))),
        ("png_rgba16_chessboard", detect(fixture("chessboard_RGB.png"))),
        ("jpeg_rgb8", detect(encoded(&raw(F::Rgb8, 9, 9), Encoding::Jpeg))),
        ("jpeg_gray8", detect(encoded(&raw(F::Gray8, 8, 3), Encoding::Jpeg))),
        ("tiff_rgb8", detect(encoded(&raw(F::Rgb8, 4, 4), Encoding::Tiff))),
        ("tiff_gray16", detect(encoded(&raw(F::Gray16, 3, 5), Encoding::Tiff))),
        ("tiff_multipage_page0", detect(multipage.clone())),
        ("tiff_multipage_page1", [vec![7], multipage.clone()].concat()),
        ("tiff_multipage_page2", [vec![14], multipage].concat()),
        ("webp_rgba8", detect(encoded(&raw(F::Rgba8, 5, 5), Encoding::WebP))),
        ("bmp_rgb8", detect(encoded(&raw(F::Rgb8, 7, 2), Encoding::Bmp))),
        ("gif_1x1", detect(GIF_1X1.to_vec())),
        // Near-valid: one thing wrong each.
        ("png_declared_as_jpeg", [vec![2], png.clone()].concat()),
        ("png_truncated", detect(png[..png.len() / 2].to_vec())),
        ("png_over_pixel_limit", detect(encoded(&flat, Encoding::Png))),
        ("png_page_1", [vec![7], png].concat()),
    ]
}
