//! Interoperability with the reference gRPC implementation: Python grpcio
//! (gRPC C-core) calls the real server binary over mutual TLS — both
//! NLImageService RPCs, imgsvc.v1 Process and ProcessStream, and the
//! standard grpc.health.v1 Health — through stubs that grpcio-tools
//! generates at test time from our own `proto/` files. Results are checked
//! here against the reference kernels, refusals by code and message.
//!
//! The Python side is `tests/support/grpcio_driver.py` (JSON job on stdin,
//! JSON results on stdout), run in a venv that `tests/support/python-venv.sh`
//! makes once under the target dir with the versions pinned in
//! `tests/support/requirements-grpcio.txt`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use crate::common::*;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bytes::Bytes;
use imgsvc::{
    client::{Op, RawImage, image_io::read_image},
    imaging::QuarterTurns,
    proto::v1::PixelFormat,
};
use serde_json::{Value, json};

const SUPPORT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support");

/// The venv's interpreter, set up once per test process (the script also
/// serialises concurrent processes with a lock).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("bash")
            .arg(format!("{SUPPORT}/python-venv.sh"))
            .arg(concat!(env!("CARGO_TARGET_TMPDIR"), "/python-venv"))
            .arg(format!("{SUPPORT}/requirements-grpcio.txt"))
            .stderr(Stdio::inherit())
            .output()
            .expect("bash runs tests/support/python-venv.sh");
        assert!(out.status.success(), "tests/support/python-venv.sh failed ({}); its messages are above", out.status);
        PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().expect("the script prints the interpreter's path"))
    })
}

/// Runs `tests/support/grpcio_driver.py` with `job` (its `"calls"` or
/// `"load"`) against `target` as `tenant` and returns the driver's report,
/// whose grpcio version it checks.
pub(crate) fn run_driver(target: SocketAddr, pki: &Pki, tenant: &str, mut job: Value) -> Value {
    use std::io::Write;
    let (ca, cert, key) = pki.client_files(tenant);
    job["target"] = json!(target.to_string());
    job["server_name"] = json!("localhost");
    (job["ca"], job["cert"], job["key"]) = (json!(ca), json!(cert), json!(key));
    job["proto_dir"] = json!(concat!(env!("CARGO_MANIFEST_DIR"), "/proto"));
    let mut child = Command::new(python())
        .arg(format!("{SUPPORT}/grpcio_driver.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(job.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "grpcio_driver.py failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("the driver prints one JSON object");
    assert!(report["grpcio"].as_str().is_some_and(|v| v.starts_with("1.")), "grpcio version: {}", report["grpcio"]);
    report
}

/// Runs `calls` through grpcio against `server` as `tenant`: one result per
/// call (`{"response": …}`, `{"responses": […]}` or `{"error": {"code", "details"}}`).
fn grpcio(server: &ServerProcess, pki: &Pki, tenant: &str, calls: Vec<Value>) -> Vec<Value> {
    let count = calls.len();
    let mut report = run_driver(server.addr, pki, tenant, json!({ "calls": calls }));
    let Value::Array(results) = report["results"].take() else { panic!("no results in {report}") };
    assert_eq!(results.len(), count, "one result per call");
    results
}

/// The response message of a successful unary call.
fn response(result: &Value) -> &Value {
    assert!(result.get("response").is_some(), "expected a response, got {result}");
    &result["response"]
}

/// `(code, details)` of a refused call.
fn refusal(result: &Value) -> (&str, &str) {
    let error = result.get("error").unwrap_or_else(|| panic!("expected a refusal, got {result}"));
    (error["code"].as_str().unwrap(), error["details"].as_str().unwrap())
}

fn base64_of(data: &[u8]) -> String {
    BASE64.encode(data)
}

fn bytes_of(field: &Value) -> Bytes {
    // proto3 JSON leaves empty bytes out.
    BASE64.decode(field.as_str().unwrap_or("")).expect("bytes fields are base64").into()
}

fn dimension(field: &Value) -> u32 {
    field.as_u64().unwrap_or(0) as u32
}

/// An `NLImage` in the proto3 JSON mapping (GRAY8 or RGB8 only).
fn nl_image(image: &RawImage) -> Value {
    let color = match image.format {
        PixelFormat::Gray8 => false,
        PixelFormat::Rgb8 => true,
        other => panic!("NLImage has no {other:?}"),
    };
    json!({ "color": color, "width": image.width, "height": image.height, "data": base64_of(&image.data) })
}

/// An `NLImage` answer, as the image it describes.
fn from_nl_image(message: &Value) -> RawImage {
    let format = if message["color"].as_bool().unwrap_or(false) { PixelFormat::Rgb8 } else { PixelFormat::Gray8 };
    RawImage { format, width: dimension(&message["width"]), height: dimension(&message["height"]), data: bytes_of(&message["data"]) }
}

/// A v1 `Image` (raw pixels) in the proto3 JSON mapping.
pub(crate) fn v1_image(image: &RawImage) -> Value {
    json!({ "format": image.format.as_str_name(), "width": image.width, "height": image.height, "data": base64_of(&image.data) })
}

/// A v1 `Image` or `StreamHeader` answer's format and dimensions, with `data`.
fn from_v1_image(message: &Value, data: Bytes) -> RawImage {
    let format =
        PixelFormat::from_str_name(message["format"].as_str().unwrap_or("")).unwrap_or_else(|| panic!("pixel format in {message}"));
    RawImage { format, width: dimension(&message["width"]), height: dimension(&message["height"]), data }
}

/// v1 `Operation`s in the proto3 JSON mapping; rotations alternate between
/// the two ways of saying them (`quarter_turns`, `angle`).
pub(crate) fn v1_operations(ops: &[Op]) -> Value {
    let angle = |t: QuarterTurns| ["ANGLE_0", "ANGLE_90", "ANGLE_180", "ANGLE_270"][t.count() as usize];
    ops.iter()
        .enumerate()
        .map(|(i, op)| match *op {
            Op::MeanFilter => json!({ "mean_filter": {} }),
            Op::Rotate(t) if i % 2 == 0 => json!({ "rotate": { "quarter_turns": t.count() } }),
            Op::Rotate(t) => json!({ "rotate": { "angle": angle(t) } }),
        })
        .collect()
}

fn photo(name: &str) -> RawImage {
    read_image(&fixture(name)).unwrap()
}

/// A deterministic image whose samples are all different from their
/// neighbours, so a wrong rotation or filter cannot pass.
pub(crate) fn pattern(format: PixelFormat, width: u32, height: u32) -> RawImage {
    let len = width as usize * height as usize * imgsvc::imagefile::bytes_per_pixel(format);
    let data: Vec<u8> = (0..len).map(|i| (i * 151 % 251) as u8).collect();
    RawImage { format, width, height, data: data.into() }
}

#[test]
fn legacy_rotate_image_and_mean_filter_from_grpcio_match_the_reference_kernels() {
    let pki = Pki::new(&["alpha"]);
    let server = ServerProcess::spawn(&pki);
    // Non-square RGB (90° and 270° swap the sides) and square gray.
    let (rgb, gray) = (photo("rocket.jpg"), photo("camera.png"));
    let mut calls = Vec::new();
    let mut wanted = Vec::new();
    for image in [&rgb, &gray] {
        for (turns, name) in all_turns() {
            calls.push(json!({ "rpc": "RotateImage", "request": { "rotation": name, "image": nl_image(image) } }));
            wanted.push((format!("RotateImage {name} {:?}", image.format), expected(image, &[Op::Rotate(turns)])));
        }
        calls.push(json!({ "rpc": "MeanFilter", "request": nl_image(image) }));
        wanted.push((format!("MeanFilter {:?}", image.format), expected(image, &[Op::MeanFilter])));
    }
    let results = grpcio(&server, &pki, "alpha", calls);
    for (result, (what, want)) in results.iter().zip(&wanted) {
        assert!(from_nl_image(response(result)) == *want, "{what}: grpcio got a different image");
    }
}

#[test]
fn legacy_refusals_reach_grpcio_as_invalid_argument_with_our_message() {
    let pki = Pki::new(&["alpha"]);
    let server = ServerProcess::spawn(&pki);
    let short = json!({ "color": true, "width": 4, "height": 3, "data": base64_of(&[7; 35]) });
    let valid = pattern(PixelFormat::Gray8, 3, 2);
    let results = grpcio(
        &server,
        &pki,
        "alpha",
        vec![
            json!({ "rpc": "RotateImage", "request": { "rotation": "NINETY_DEG", "image": short } }),
            json!({ "rpc": "MeanFilter", "request": short }),
            // An open proto3 enum carries values the stub does not name.
            json!({ "rpc": "RotateImage", "request": { "rotation": 7, "image": nl_image(&valid) } }),
            json!({ "rpc": "RotateImage", "request": { "rotation": "NINETY_DEG", "image": nl_image(&valid) } }),
        ],
    );
    let length = "image data is 35 bytes, expected 36 (= 4 x 3 x 3 bytes per pixel for RGB8)";
    assert_eq!(refusal(&results[0]), ("INVALID_ARGUMENT", length));
    assert_eq!(refusal(&results[1]), ("INVALID_ARGUMENT", length));
    assert_eq!(
        refusal(&results[2]),
        ("INVALID_ARGUMENT", "rotation 7 is not a known value (expected 0=NONE, 1=NINETY_DEG, 2=ONE_EIGHTY_DEG or 3=TWO_SEVENTY_DEG)")
    );
    // The same channel still serves.
    assert!(from_nl_image(response(&results[3])) == expected(&valid, &[Op::Rotate(QuarterTurns::One)]));
}

#[test]
fn v1_process_pipelines_from_grpcio_match_the_reference_kernels_and_refusals_carry_our_message() {
    let pki = Pki::new(&["alpha"]);
    let server = ServerProcess::spawn(&pki);
    let cases = [
        (photo("rocket.jpg"), vec![Op::MeanFilter, Op::Rotate(QuarterTurns::Three)]),
        // 16-bit samples travel little-endian.
        (photo("chessboard_RGB.png"), vec![Op::Rotate(QuarterTurns::One), Op::MeanFilter, Op::Rotate(QuarterTurns::Two)]),
        (pattern(PixelFormat::Graya8, 7, 4), vec![Op::Rotate(QuarterTurns::One), Op::Rotate(QuarterTurns::One), Op::MeanFilter]),
    ];
    assert_eq!(cases[1].0.format, PixelFormat::Rgb16, "the fixture is 16-bit");
    let mut calls: Vec<Value> = cases
        .iter()
        .map(|(image, ops)| json!({ "rpc": "Process", "request": { "image": v1_image(image), "operations": v1_operations(ops) } }))
        .collect();
    let short = json!({ "format": "PIXEL_FORMAT_RGBA8", "width": 2, "height": 2, "data": base64_of(&[1; 15]) });
    calls.push(json!({ "rpc": "Process", "request": { "image": short, "operations": [{ "mean_filter": {} }] } }));
    calls.push(json!({ "rpc": "Process", "request": { "image": v1_image(&cases[2].0), "operations": [{ "rotate": {} }] } }));

    let results = grpcio(&server, &pki, "alpha", calls);
    for ((image, ops), result) in cases.iter().zip(&results) {
        let got = &response(result)["image"];
        assert!(
            from_v1_image(got, bytes_of(&got["data"])) == expected(image, ops),
            "{:?} {ops:?}: grpcio got a different image",
            image.format
        );
    }
    assert_eq!(refusal(&results[3]), ("INVALID_ARGUMENT", "image data is 15 bytes, expected 16 (= 2 x 2 x 4 bytes per pixel for RGBA8)"));
    assert_eq!(refusal(&results[4]), ("INVALID_ARGUMENT", "operation 0 (rotate) has no amount: set quarter_turns or angle"));
}

/// The answer's chunk size (`stream.response_chunk_bytes`), small so that
/// results come back in several chunks too.
const RESPONSE_CHUNK_BYTES: usize = 64 * 1024;

#[test]
fn v1_process_stream_from_grpcio_reassembles_chunked_images_both_ways() {
    let pki = Pki::new(&["alpha"]);
    let server = ServerProcess::spawn_logged(&pki, "", &format!("[stream]\nresponse_chunk_bytes = {RESPONSE_CHUNK_BYTES}")).0;
    // Chunk sizes that split rows anywhere (a rocket.jpg row is 1920 bytes).
    let cases = [
        (photo("rocket.jpg"), vec![Op::Rotate(QuarterTurns::One), Op::MeanFilter], 100_000),
        (pattern(PixelFormat::Rgba8, 33, 17), vec![Op::MeanFilter, Op::Rotate(QuarterTurns::Two)], 1000),
    ];
    let mut calls: Vec<Value> = cases
        .iter()
        .map(|(image, ops, chunk_bytes)| {
            let header = json!({ "header": { "format": image.format.as_str_name(), "width": image.width, "height": image.height, "operations": v1_operations(ops) } });
            let chunks = image.data.chunks(*chunk_bytes).map(|c| json!({ "chunk": base64_of(c) }));
            json!({ "rpc": "ProcessStream", "requests": std::iter::once(header).chain(chunks).collect::<Vec<_>>() })
        })
        .collect();
    calls.push(json!({ "rpc": "ProcessStream", "requests": [{ "chunk": base64_of(&[1; 4]) }, { "header": { "format": "PIXEL_FORMAT_GRAY8", "width": 2, "height": 2 } }] }));
    calls.push(json!({
        "rpc": "ProcessStream",
        "requests": [{ "header": { "format": "PIXEL_FORMAT_GRAY8", "width": 2, "height": 2 } }, { "chunk": base64_of(&[1; 3]) }, { "chunk": base64_of(&[1; 2]) }],
    }));

    let results = grpcio(&server, &pki, "alpha", calls);
    for ((image, ops, chunk_bytes), result) in cases.iter().zip(&results) {
        let what = format!("{}x{} {:?} in {chunk_bytes}-byte chunks", image.width, image.height, image.format);
        let responses =
            result.get("responses").and_then(Value::as_array).unwrap_or_else(|| panic!("{what}: expected responses, got {result}"));
        let (header, chunks) = responses.split_first().unwrap_or_else(|| panic!("{what}: no response"));
        let chunks: Vec<Bytes> = chunks.iter().map(|c| bytes_of(&c["chunk"])).collect();
        let want = expected(image, ops);
        assert_eq!(chunks.len(), want.data.len().div_ceil(RESPONSE_CHUNK_BYTES), "{what}: response chunks");
        assert!(chunks.iter().all(|c| (1..=RESPONSE_CHUNK_BYTES).contains(&c.len())), "{what}: response chunk sizes");
        let got = from_v1_image(&header["header"], chunks.concat().into());
        assert!(got == want, "{what}: grpcio reassembled a different image");
    }
    assert_eq!(refusal(&results[2]), ("INVALID_ARGUMENT", "message 0 is a chunk, but the first message must be the header"));
    assert_eq!(refusal(&results[3]), ("INVALID_ARGUMENT", "message 2 brings the data to 5 bytes, past the 4 bytes the header declared"));
}

#[test]
fn standard_health_check_from_grpcio_reports_serving_overall_and_per_service() {
    let pki = Pki::new(&["alpha"]);
    let server = ServerProcess::spawn(&pki);
    let services = ["", "NLImageService", "imgsvc.v1.ImageService", "no.such.Service"];
    let calls = services.iter().map(|s| json!({ "rpc": "HealthCheck", "request": { "service": s } })).collect();
    let results = grpcio(&server, &pki, "alpha", calls);
    for (service, result) in services[..3].iter().zip(&results) {
        assert_eq!(response(result), &json!({ "status": "SERVING" }), "{service:?}");
    }
    assert_eq!(refusal(&results[3]), ("NOT_FOUND", "service not registered"));
}

#[test]
fn a_rate_limit_refusal_gives_grpcio_retry_info_equal_to_the_pushback_header_and_the_quota_hit() {
    let pki = Pki::new(&["alpha"]);
    // One call per second, no burst beyond it: the second call is refused.
    let server = ServerProcess::spawn_with(&pki, "[tenant_defaults]\nrequests_per_second = 1\nburst = 1\n", &[]);
    let valid = pattern(PixelFormat::Gray8, 3, 2);
    let call = json!({ "rpc": "RotateImage", "request": { "rotation": "NINETY_DEG", "image": nl_image(&valid) }, "status_details": true });
    let results = grpcio(&server, &pki, "alpha", vec![call.clone(), call]);
    response(&results[0]);
    let error = &results[1]["error"];
    assert_eq!(error["code"], "RESOURCE_EXHAUSTED", "{error}");
    let details = &error["status_details"];
    let delay = details["retry_delay_ms"].as_u64().unwrap_or_else(|| panic!("no RetryInfo: {details}"));
    assert!((1..=1000).contains(&delay), "{details}");
    assert_eq!(details["pushback_ms"], delay.to_string(), "RetryInfo and grpc-retry-pushback-ms agree: {details}");
    assert!(error["details"].as_str().unwrap().ends_with(&format!("retry in {delay} ms")), "{error}");
    let violation = &details["quota_violations"][0];
    assert_eq!(
        (violation["subject"].as_str(), violation["quota_id"].as_str()),
        (Some("tenant:alpha"), Some("requests_per_second")),
        "{details}"
    );
    assert_eq!(violation["quota_metric"], "imgsvc_tenant_limit", "{details}");
}
