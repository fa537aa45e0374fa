//! Rotation end to end: real photos through the real client binary over
//! mutual TLS, both APIs, every rotation, compared with the reference kernel.

use crate::common::*;
use imgsvc::client::{Op, image_io::read_image};

#[test]
fn rotates_gray_rgb_png_and_jpeg_photos_in_every_direction_through_both_apis() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let out_dir = tempfile::tempdir().unwrap();
    for photo in ["camera.png", "astronaut.png", "rocket.jpg"] {
        let input = read_image(&fixture(photo)).unwrap();
        for api in ["v1", "legacy"] {
            for (turns, name) in all_turns() {
                let out = out_dir.path().join(format!("{photo}-{api}-{name}.png"));
                let mut args = client_args(&server, &pki, "alpha");
                let (inp, outp) = (fixture(photo).display().to_string(), out.display().to_string());
                args.extend(["--input", &inp, "--output", &outp, "--rotate", name, "--api", api].map(String::from));
                let result = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
                assert!(result.status.success(), "{photo} {api} {name}: {}", stderr(&result));
                let got = read_image(&out).unwrap();
                assert_eq!(got, expected(&input, &[Op::Rotate(turns)]), "{photo} {api} {name}");
            }
        }
    }
}

#[test]
fn rotated_dimensions_swap_for_quarter_turns_on_a_non_square_photo() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let mut args = client_args(&server, &pki, "alpha");
    args.extend(
        ["--input", &fixture("rocket.jpg").display().to_string(), "--output", &out.display().to_string(), "--rotate", "TWO_SEVENTY_DEG"]
            .map(String::from),
    );
    let result = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{}", stderr(&result));
    let got = read_image(&out).unwrap();
    assert_eq!((got.width, got.height), (427, 640));
}

#[test]
fn writes_jpeg_output_when_the_extension_says_so() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.jpg");
    let mut args = client_args(&server, &pki, "alpha");
    args.extend(
        ["--input", &fixture("astronaut.png").display().to_string(), "--output", &out.display().to_string(), "--rotate", "NINETY_DEG"]
            .map(String::from),
    );
    let result = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(image::ImageReader::open(&out).unwrap().with_guessed_format().unwrap().format(), Some(image::ImageFormat::Jpeg));
    // JPEG is lossy: compare with the exact result on average.
    let got = read_image(&out).unwrap();
    let want = expected(&read_image(&fixture("astronaut.png")).unwrap(), &[Op::Rotate(imgsvc::imaging::QuarterTurns::One)]);
    assert_eq!((got.width, got.height), (want.width, want.height));
    let mean_abs_diff: f64 =
        got.data.iter().zip(want.data.iter()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / got.data.len() as f64;
    assert!(mean_abs_diff < 4.0, "mean absolute difference {mean_abs_diff}");
}
