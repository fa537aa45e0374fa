//! Image formats and pixel modes end to end: real and generated files in
//! every input format and mode through the real client binary and server,
//! every output format, TIFF pages, EXIF orientation.

use std::path::Path;

use crate::common::*;
use image::{Delay, Frame, RgbaImage, codecs::gif::GifEncoder};
use imgsvc::{
    client::{
        Op, RawImage,
        image_io::{read_image, read_image_with},
    },
    imagefile::{self, DecodeOptions, EncodeOptions, Encoding, stored_format},
    imaging::QuarterTurns,
    proto::v1::PixelFormat,
};

/// A deterministic pattern in `format`.
fn pattern(format: PixelFormat, width: u32, height: u32, seed: u32) -> RawImage {
    let len = (width * height) as usize * imagefile::bytes_per_pixel(format);
    let data: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8).collect();
    RawImage { format, width, height, data: data.into() }
}

fn write(path: &Path, image: &RawImage, encoding: Encoding) {
    std::fs::write(path, imagefile::encode(image, &EncodeOptions::new(encoding)).unwrap().data).unwrap();
}

/// A two-frame GIF whose frames differ; returns the first frame's pixels.
fn write_gif(path: &Path) -> RawImage {
    // 6 colours: the GIF encoder keeps them exactly (no quantisation).
    let colours = [[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [10, 20, 30, 255], [200, 100, 50, 255], [0, 0, 0, 255]];
    let first = RgbaImage::from_fn(13, 7, |x, y| image::Rgba(colours[((x + 2 * y) % 6) as usize]));
    let second = RgbaImage::from_fn(13, 7, |_, _| image::Rgba(colours[5]));
    let mut file = std::fs::File::create(path).unwrap();
    let mut encoder = GifEncoder::new(&mut file);
    encoder.encode_frame(Frame::from_parts(first.clone(), 0, 0, Delay::from_numer_denom_ms(100, 1))).unwrap();
    encoder.encode_frame(Frame::from_parts(second, 0, 0, Delay::from_numer_denom_ms(100, 1))).unwrap();
    RawImage { format: PixelFormat::Rgba8, width: 13, height: 7, data: first.into_raw().into() }
}

/// The inputs every format test uses: real files for gray, RGB, RGBA, RGB16
/// and TIFF; generated ones for the other modes and formats.
fn input_dir(dir: &Path) -> Vec<(&'static str, PixelFormat)> {
    for name in ["camera.png", "logo.png", "chessboard_RGB.png", "multipage.tif", "rocket.jpg"] {
        std::fs::copy(fixture(name), dir.join(name)).unwrap();
    }
    write(&dir.join("gray-alpha.png"), &pattern(PixelFormat::Graya8, 31, 17, 1), Encoding::Png);
    write(&dir.join("gray16.png"), &pattern(PixelFormat::Gray16, 31, 17, 2), Encoding::Png);
    write(&dir.join("rgba16.png"), &pattern(PixelFormat::Rgba16, 31, 17, 3), Encoding::Png);
    write(&dir.join("rgba.webp"), &pattern(PixelFormat::Rgba8, 29, 19, 4), Encoding::WebP);
    write(&dir.join("rgb.bmp"), &pattern(PixelFormat::Rgb8, 29, 19, 5), Encoding::Bmp);
    write_gif(&dir.join("frames.gif"));
    vec![
        ("camera.png", PixelFormat::Gray8),
        ("chessboard_RGB.png", PixelFormat::Rgb16),
        ("frames.gif", PixelFormat::Rgba8),
        ("gray-alpha.png", PixelFormat::Graya8),
        ("gray16.png", PixelFormat::Gray16),
        ("logo.png", PixelFormat::Rgba8),
        ("multipage.tif", PixelFormat::Gray8),
        ("rgb.bmp", PixelFormat::Rgb8),
        ("rgba.webp", PixelFormat::Rgba8),
        ("rgba16.png", PixelFormat::Rgba16),
        ("rocket.jpg", PixelFormat::Rgb8),
    ]
}

#[test]
fn every_input_format_and_mode_is_read_and_processed_exactly() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let inputs = input_dir(src.path());
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &[
            "--input",
            src.path().to_str().unwrap(),
            "--output",
            out.path().to_str().unwrap(),
            "--format",
            "png",
            "--rotate",
            "NINETY_DEG",
            "--mean",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("imgsvc-client: 11 done, 0 failed, 0 skipped"), "{}", stderr(&result));
    let ops = [Op::MeanFilter, Op::Rotate(QuarterTurns::One)];
    for (name, mode) in inputs {
        let input = read_image(&src.path().join(name)).unwrap();
        assert_eq!(input.format, mode, "{name} is read in its own mode");
        let got = read_image(&out.path().join(Path::new(name).with_extension("png"))).unwrap();
        assert_eq!(got, expected(&input, &ops), "{name}");
    }
}

#[test]
fn gif_input_gives_its_first_frame() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_gif(&dir.path().join("a.gif"));
    assert_eq!(read_image(&dir.path().join("a.gif")).unwrap(), first);
}

#[test]
fn every_output_format_round_trips_every_mode_with_the_documented_conversions() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let src = tempfile::tempdir().unwrap();
    let inputs = input_dir(src.path());
    for (flag, encoding) in
        [("png", Encoding::Png), ("jpeg", Encoding::Jpeg), ("tiff", Encoding::Tiff), ("webp", Encoding::WebP), ("bmp", Encoding::Bmp)]
    {
        let out = tempfile::tempdir().unwrap();
        let result = run_client_with(
            &server,
            &pki,
            "alpha",
            &[
                "--input",
                src.path().to_str().unwrap(),
                "--output",
                out.path().to_str().unwrap(),
                "--format",
                flag,
                "--rotate",
                "ONE_EIGHTY_DEG",
                "-j",
                "3",
            ],
        );
        assert!(result.status.success(), "{flag}: {}", stderr(&result));
        for (name, _) in &inputs {
            let path = out.path().join(Path::new(name).with_extension(encoding.extension()));
            let data = std::fs::read(&path).unwrap();
            assert_eq!(Encoding::detect(&data), Ok(encoding), "{}", path.display());
            let want = expected(&read_image(&src.path().join(name)).unwrap(), &[Op::Rotate(QuarterTurns::Two)]);
            let stored = want.convert(stored_format(encoding, want.format)).unwrap();
            let got = read_image(&path).unwrap();
            assert_eq!((got.width, got.height), (want.width, want.height), "{}", path.display());
            if encoding == Encoding::Jpeg {
                assert_eq!(got.format, stored.format, "{}", path.display());
                // Lossy: photos stay close; generated noise patterns do not.
                if !["camera.png", "logo.png", "rocket.jpg"].contains(name) {
                    continue;
                }
                let diff = got.data.iter().zip(stored.data.iter()).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / got.data.len() as f64;
                assert!(diff < 6.0, "{}: mean absolute difference {diff}", path.display());
            } else {
                // WebP and BMP have no gray: gray comes back as RGB.
                assert_eq!(got, stored.convert(got.format).unwrap(), "{}", path.display());
            }
        }
    }
}

#[test]
fn output_format_comes_from_the_extension_or_the_format_flag() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("logo.png").display().to_string();
    for (output, extra, encoding) in [
        ("by-extension.tiff", None, Encoding::Tiff),
        ("by-extension.webp", None, Encoding::WebP),
        ("by-flag.out", Some("bmp"), Encoding::Bmp),
        ("flag-beats-extension.png", Some("jpg"), Encoding::Jpeg),
    ] {
        let path = dir.path().join(output);
        let mut args = vec!["--input", &input, "--output", path.to_str().unwrap(), "--mean"];
        if let Some(format) = extra {
            args.extend(["--format", format]);
        }
        let result = run_client_with(&server, &pki, "alpha", &args);
        assert!(result.status.success(), "{output}: {}", stderr(&result));
        assert_eq!(Encoding::detect(&std::fs::read(&path).unwrap()), Ok(encoding), "{output}");
    }
    let note = stderr(&run_client_with(
        &server,
        &pki,
        "alpha",
        &["--input", &input, "--output", dir.path().join("q.jpg").to_str().unwrap(), "--mean", "--quality", "95"],
    ));
    assert!(note.contains("q.jpg: JPEG cannot hold RGBA8: converted it to RGB8 (alpha dropped)"), "{note}");
}

#[test]
fn tiff_page_flag_selects_the_page_and_a_missing_page_is_refused() {
    // The tiff crate itself is the oracle for each page's pixels.
    let bytes = std::fs::read(fixture("multipage.tif")).unwrap();
    let mut oracle = tiff::decoder::Decoder::new(std::io::Cursor::new(&bytes)).unwrap();
    let mut pages = Vec::new();
    loop {
        let (w, h) = oracle.dimensions().unwrap();
        let tiff::decoder::DecodingResult::U8(data) = oracle.read_image().unwrap() else { panic!("8-bit pages") };
        pages.push(RawImage { format: PixelFormat::Gray8, width: w, height: h, data: data.into() });
        if !oracle.more_images() {
            break;
        }
        oracle.next_image().unwrap();
    }
    assert!(pages.len() >= 2 && pages[0] != pages[1], "the fixture has distinct pages");

    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("multipage.tif").display().to_string();
    for (page, want) in pages.iter().enumerate() {
        let out = dir.path().join(format!("page{page}.png"));
        let result = run_client_with(
            &server,
            &pki,
            "alpha",
            &["--input", &input, "--page", &page.to_string(), "--output", out.to_str().unwrap(), "--rotate", "NINETY_DEG"],
        );
        assert!(result.status.success(), "page {page}: {}", stderr(&result));
        assert_eq!(read_image(&out).unwrap(), expected(want, &[Op::Rotate(QuarterTurns::One)]), "page {page}");
    }
    let missing = pages.len() as u32 + 5;
    let out = dir.path().join("missing.png");
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &["--input", &input, "--page", &missing.to_string(), "--output", out.to_str().unwrap(), "--mean"],
    );
    assert_eq!(result.status.code(), Some(65));
    let want = format!("there is no page {missing}: the TIFF has {} page(s), numbered from 0", pages.len());
    assert!(stderr(&result).contains(&want), "{}", stderr(&result));
    assert!(!out.exists());
}

/// A JPEG of a 32x16 image whose left half is black and right half white,
/// carrying an EXIF APP1 segment with the given orientation.
fn jpeg_with_orientation(orientation: u16) -> Vec<u8> {
    let img = RawImage {
        format: PixelFormat::Gray8,
        width: 32,
        height: 16,
        data: (0..32 * 16).map(|i| if i % 32 < 16 { 0u8 } else { 255 }).collect::<Vec<u8>>().into(),
    };
    let jpeg = imagefile::encode(&img, &EncodeOptions { encoding: Encoding::Jpeg, jpeg_quality: 95 }).unwrap().data;
    // Exif header, then a little-endian TIFF header and one IFD with one
    // entry: tag 0x0112 (Orientation), type 3 (SHORT), count 1, value.
    let mut exif = b"Exif\0\0".to_vec();
    exif.extend_from_slice(b"II*\0");
    exif.extend_from_slice(&8u32.to_le_bytes()); // offset of IFD0
    exif.extend_from_slice(&1u16.to_le_bytes()); // one entry
    exif.extend_from_slice(&0x0112u16.to_le_bytes());
    exif.extend_from_slice(&3u16.to_le_bytes());
    exif.extend_from_slice(&1u32.to_le_bytes());
    exif.extend_from_slice(&orientation.to_le_bytes());
    exif.extend_from_slice(&[0, 0]); // value padding to 4 bytes
    exif.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&exif);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_6_is_applied_on_read_so_the_photo_comes_out_as_it_looks() {
    let dir = tempfile::tempdir().unwrap();
    let photo = dir.path().join("phone.jpg");
    std::fs::write(&photo, jpeg_with_orientation(6)).unwrap();
    // Orientation 6: displayed rotated 90° clockwise, so the black left half
    // becomes the top half of a 16x32 image.
    let got = read_image(&photo).unwrap();
    assert_eq!((got.format, got.width, got.height), (PixelFormat::Gray8, 16, 32));
    let at = |x: u32, y: u32| got.data[(y * got.width + x) as usize];
    assert!(at(8, 4) < 30 && at(8, 28) > 225, "top {} bottom {}", at(8, 4), at(8, 28));

    // Orientation 1 leaves it as stored: a control for the generated EXIF.
    std::fs::write(&photo, jpeg_with_orientation(1)).unwrap();
    let upright = read_image(&photo).unwrap();
    assert_eq!((upright.width, upright.height), (32, 16));

    // Through the client binary the result is the rotated photo too.
    std::fs::write(&photo, jpeg_with_orientation(6)).unwrap();
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let out = dir.path().join("out.png");
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &["--input", photo.to_str().unwrap(), "--output", out.to_str().unwrap(), "--rotate", "NONE"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(read_image(&out).unwrap(), got);
}

#[test]
fn legacy_api_converts_other_modes_and_says_so() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &[
            "--api",
            "legacy",
            "--input",
            fixture("chessboard_RGB.png").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--rotate",
            "NINETY_DEG",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("note: the legacy API carries GRAY8 and RGB8 only: converted RGB16 to RGB8"), "{}", stderr(&result));
    let input = read_image_with(
        &fixture("chessboard_RGB.png"),
        &DecodeOptions { encoding: None, page: 0, limits: imgsvc::client::image_io::client_decode_limits() },
    )
    .unwrap()
    .image
    .convert(PixelFormat::Rgb8)
    .unwrap();
    assert_eq!(read_image(&out).unwrap(), expected(&input, &[Op::Rotate(QuarterTurns::One)]));
}
