//! Batch jobs through the client binary: directories and several files,
//! failures, skipping, the summary, and never a partial output.

use std::path::Path;

use crate::common::*;
use imgsvc::{
    client::{Op, image_io::read_image},
    imaging::QuarterTurns,
};

/// `good/a.png`, `good/sub/b.jpg` and a corrupt `c.png` between them.
fn photos_with_one_corrupt(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(fixture("camera.png"), dir.join("a.png")).unwrap();
    std::fs::copy(fixture("rocket.jpg"), dir.join("sub/b.jpg")).unwrap();
    // A PNG signature and then garbage: detected as PNG, fails to decode.
    std::fs::write(dir.join("c.png"), b"\x89PNG\r\n\x1a\nthis is not the rest of a PNG").unwrap();
}

#[test]
fn batch_over_a_directory_with_one_corrupt_file_processes_the_others_and_reports_the_failure() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    photos_with_one_corrupt(src.path());
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &[
            "--input",
            src.path().to_str().unwrap(),
            "--output",
            out.path().to_str().unwrap(),
            "--rotate",
            "NINETY_DEG",
            "--continue-on-error",
            "-j",
            "2",
        ],
    );
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{err}");
    assert!(err.contains("imgsvc-client: 2 done, 1 failed, 0 skipped"), "{err}");
    assert!(err.contains(&format!("failed {}: cannot read image", src.path().join("c.png").display())), "{err}");
    assert!(err.contains("the data is not a valid PNG image"), "{err}");
    assert!(err.contains("imgsvc-client: error: 1 of the images failed"), "{err}");
    // Only the two results: nothing for the corrupt file, no temporary files.
    assert_eq!(files_under(out.path()), ["a.png", "sub/b.jpg"]);
    let want = expected(&read_image(&fixture("camera.png")).unwrap(), &[Op::Rotate(QuarterTurns::One)]);
    assert_eq!(read_image(&out.path().join("a.png")).unwrap(), want);
}

#[test]
fn without_continue_on_error_the_batch_stops_starting_jobs_after_a_failure() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    photos_with_one_corrupt(src.path());
    // One at a time, in path order: a.png, c.png (fails), sub/b.jpg.
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &["--input", src.path().to_str().unwrap(), "--output", out.path().to_str().unwrap(), "--mean", "-j", "1"],
    );
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{err}");
    assert!(err.contains("1 done, 1 failed, 0 skipped, 1 not started after the failure (see --continue-on-error)"), "{err}");
    assert_eq!(files_under(out.path()), ["a.png"]);
}

#[test]
fn existing_outputs_are_skipped_unless_overwrite() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::copy(fixture("camera.png"), src.path().join("a.png")).unwrap();
    std::fs::copy(fixture("astronaut.png"), src.path().join("b.png")).unwrap();
    std::fs::write(out.path().join("a.png"), b"earlier result").unwrap();
    let args = ["--input", src.path().to_str().unwrap(), "--output", out.path().to_str().unwrap(), "--mean"];

    let result = run_client_with(&server, &pki, "alpha", &args);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("imgsvc-client: 1 done, 0 failed, 1 skipped"), "{}", stderr(&result));
    assert_eq!(std::fs::read(out.path().join("a.png")).unwrap(), b"earlier result");

    let result = run_client_with(&server, &pki, "alpha", &[&args[..], &["--overwrite"]].concat());
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("imgsvc-client: 2 done, 0 failed, 0 skipped"), "{}", stderr(&result));
    let want = expected(&read_image(&fixture("camera.png")).unwrap(), &[Op::MeanFilter]);
    assert_eq!(read_image(&out.path().join("a.png")).unwrap(), want);
}

#[test]
fn several_input_files_go_into_the_output_directory_under_their_names() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("new/dir");
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &[
            "--input",
            fixture("camera.png").to_str().unwrap(),
            fixture("rocket.jpg").to_str().unwrap(),
            "--output",
            target.to_str().unwrap(),
            "--format",
            "webp",
            "--rotate",
            "TWO_SEVENTY_DEG",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        stderr(&result).contains(&format!("done {} -> {}", fixture("camera.png").display(), target.join("camera.webp").display())),
        "{}",
        stderr(&result)
    );
    assert_eq!(files_under(out.path()), ["new/dir/camera.webp", "new/dir/rocket.webp"]);
}

#[test]
fn several_inputs_into_an_existing_file_is_a_usage_error() {
    let pki = Pki::new(&["alpha"]);
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("out.png");
    std::fs::write(&existing, b"x").unwrap();
    let result = run_client_as(
        &pki,
        "alpha",
        &[
            "--port",
            "9",
            "--input",
            fixture("camera.png").to_str().unwrap(),
            fixture("logo.png").to_str().unwrap(),
            "--output",
            existing.to_str().unwrap(),
            "--mean",
        ],
    );
    assert_eq!(result.status.code(), Some(64));
    assert!(stderr(&result).contains("is a file, but several inputs or a directory need an output directory"), "{}", stderr(&result));
}

#[test]
fn single_file_form_replaces_an_existing_output_as_before() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    std::fs::write(&out, b"old").unwrap();
    let result = run_client_with(
        &server,
        &pki,
        "alpha",
        &["--input", fixture("camera.png").to_str().unwrap(), "--output", out.to_str().unwrap(), "--mean"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(stderr(&result), "", "the single-file form prints nothing on success");
    let want = expected(&read_image(&fixture("camera.png")).unwrap(), &[Op::MeanFilter]);
    assert_eq!(read_image(&out).unwrap(), want);
}
