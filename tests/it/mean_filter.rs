//! The 3x3 mean filter end to end, alone and combined with rotation, through
//! the real client binary and both APIs, compared with the reference kernel.

use crate::common::*;
use imgsvc::client::{Op, image_io::read_image};

fn run(server: &TestServer, pki: &Pki, photo: &str, extra: &[&str], out: &std::path::Path) {
    let mut args = client_args(server, pki, "alpha");
    args.extend(["--input", &fixture(photo).display().to_string(), "--output", &out.display().to_string()].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let result = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{photo} {extra:?}: {}", stderr(&result));
}

#[test]
fn filters_gray_rgb_png_and_jpeg_photos_through_both_apis() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    for photo in ["camera.png", "astronaut.png", "rocket.jpg"] {
        let input = read_image(&fixture(photo)).unwrap();
        for api in ["v1", "legacy"] {
            let out = dir.path().join(format!("{photo}-{api}.png"));
            run(&server, &pki, photo, &["--mean", "--api", api], &out);
            assert_eq!(read_image(&out).unwrap(), expected(&input, &[Op::MeanFilter]), "{photo} {api}");
        }
    }
}

#[test]
fn mean_and_rotate_together_filter_then_rotate_in_both_apis() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    for photo in ["camera.png", "rocket.jpg"] {
        let input = read_image(&fixture(photo)).unwrap();
        for (turns, name) in all_turns() {
            for api in ["v1", "legacy"] {
                let out = dir.path().join(format!("{photo}-{name}-{api}.png"));
                run(&server, &pki, photo, &["--mean", "--rotate", name, "--api", api], &out);
                assert_eq!(read_image(&out).unwrap(), expected(&input, &[Op::MeanFilter, Op::Rotate(turns)]), "{photo} {name} {api}");
            }
        }
    }
}

#[test]
fn v1_filters_rgba_keeping_the_alpha_channel_as_a_channel() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logo.png");
    run(&server, &pki, "logo.png", &["--mean"], &out);
    let input = read_image(&fixture("logo.png")).unwrap();
    assert_eq!(input.format, imgsvc::proto::v1::PixelFormat::Rgba8);
    assert_eq!(read_image(&out).unwrap(), expected(&input, &[Op::MeanFilter]));
}

#[test]
fn legacy_api_converts_rgba_to_rgb_and_says_so() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logo.png");
    let mut args = client_args(&server, &pki, "alpha");
    args.extend(
        ["--input", &fixture("logo.png").display().to_string(), "--output", &out.display().to_string(), "--mean", "--api", "legacy"]
            .map(String::from),
    );
    let result = run_client(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("converted RGBA8 to RGB8 (alpha dropped)"), "{}", stderr(&result));
    let got = read_image(&out).unwrap();
    assert_eq!(got.format, imgsvc::proto::v1::PixelFormat::Rgb8);
    let (rgb, _) = read_image(&fixture("logo.png")).unwrap().for_legacy();
    assert_eq!(got, expected(&rgb, &[Op::MeanFilter]));
}
