//! Isolation on every path, tried as an attacker would (issue 24), against
//! the real binary: what the server really holds (its resident memory)
//! against what its accounting held at its peak, and the accounting back
//! at 0 afterwards. One test per class:
//! - 16-bit images with alpha and an EXIF rotation, which decode through
//!   conversion buffers: charged for what decoding really holds;
//! - connections whose certificates name a tenant not configured here:
//!   charged (to the unserved pool) like every other connection, so their
//!   number is bounded;
//! - many calls on one connection, each waiting for memory with the first
//!   frame of its body sent: what the server holds of those frames is in
//!   its accounting;
//! - gzip and zstd bombs: inflated no further than the tenant's request
//!   limit, within what they were charged;
//! - a flood of health checks declaring large messages: refused at their
//!   prefixes.
//!
//! The raw HTTP/2 client is [`crate::h2raw`].

use std::{io::Cursor, time::Duration};

use crate::{common::*, h2raw::*};
use image::{ImageBuffer, ImageEncoder, Luma, LumaA, Rgba, codecs::png::PngEncoder};
use imgsvc::proto::v1::{EncodedImage, Image, ImageEncoding, PixelFormat, ProcessRequest, image_service_client::ImageServiceClient};
use tonic::Code;

/// What the server may hold beyond its accounting's peak while one call
/// decodes: the decoders' own small buffers (rows, the inflate window),
/// allocator slack and the page granularity of RSS. Measured at 1–6 MiB
/// (printed by the tests); a decode that held one more copy of the images
/// below than it was charged for would be 12–24 MiB over.
const DECODE_OVERHEAD: u64 = 8 * MIB;

/// An EXIF block (a little-endian TIFF header and one IFD) holding only
/// `orientation`: what a PNG's eXIf chunk carries.
fn exif_orientation(orientation: u16) -> Vec<u8> {
    let mut exif = b"II*\0".to_vec();
    exif.extend_from_slice(&8u32.to_le_bytes()); // IFD0 right after the header
    exif.extend_from_slice(&1u16.to_le_bytes()); // one entry
    exif.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    exif.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    exif.extend_from_slice(&1u32.to_le_bytes()); // count
    exif.extend_from_slice(&orientation.to_le_bytes());
    exif.extend_from_slice(&[0, 0]);
    exif.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    exif
}

/// A 16-bit PNG of `samples` (`channels` per pixel) with an EXIF orientation.
fn png16(width: u32, height: u32, channels: u8, samples: &[u16], orientation: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder =
        PngEncoder::new_with_quality(Cursor::new(&mut out), image::codecs::png::CompressionType::Fast, image::codecs::png::FilterType::Sub);
    encoder.set_exif_metadata(exif_orientation(orientation)).unwrap();
    let color = if channels == 4 { image::ExtendedColorType::Rgba16 } else { image::ExtendedColorType::La16 };
    encoder.write_image(bytemuck::cast_slice(samples), width, height, color).unwrap();
    out
}

fn le_bytes(samples: &[u16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// A Process call of the encoded `file` with no operations: the decoded
/// image comes back as raw pixels.
async fn decode_call(client: &mut ImageServiceClient<tonic::transport::Channel>, file: Vec<u8>) -> Image {
    let image =
        Image { encoded: Some(EncodedImage { data: file.into(), encoding: ImageEncoding::Png as i32, page: 0 }), ..Default::default() };
    let request = ProcessRequest { image: Some(image), operations: vec![], output: None };
    client.process(request).await.unwrap().into_inner().image.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_bit_images_with_alpha_and_exif_rotations_decode_within_what_they_are_charged() {
    // 1600×1200: 15.4 MB of RGBA16, 7.7 MB of gray+alpha 16 (which v1
    // carries as RGBA16: 15.4 MB).
    const W: u32 = 1600;
    const H: u32 = 1200;
    let pki = Pki::new(&["alpha"]);
    let extra = "[tenancy]\nmemory_budget_bytes = 536870912\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let channel = imgsvc::client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
    let mut client = ImageServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);

    // RGBA16 with orientation 6 (shown rotated 90° clockwise), and 16-bit
    // gray+alpha with orientation 8 (270°): the rotations that copy.
    let rgba = ImageBuffer::<Rgba<u16>, _>::from_fn(W, H, |x, y| Rgba([x as u16 * 40, y as u16 * 50, (x + y) as u16, 65535 - x as u16]));
    let gray = ImageBuffer::<LumaA<u16>, _>::from_fn(W, H, |x, y| LumaA([(x * 37 + y) as u16, 60000 - y as u16]));
    let rgba_png = png16(W, H, 4, rgba.as_raw(), 6);
    let gray_png = png16(W, H, 2, gray.as_raw(), 8);
    let rgba_want = le_bytes(image::imageops::rotate90(&rgba).as_raw());
    let gray_rotated = image::imageops::rotate270(&gray);
    let gray_want: ImageBuffer<Rgba<u16>, Vec<u16>> = ImageBuffer::from_fn(H, W, |x, y| {
        let LumaA([l, a]) = *gray_rotated.get_pixel(x, y);
        Rgba([l, l, l, a])
    });
    let gray_want = le_bytes(gray_want.as_raw());

    // Warm-up: a small call of each kind (threads, decoders' first allocations).
    let small = ImageBuffer::<Luma<u16>, _>::from_fn(8, 8, |x, _| Luma([x as u16]));
    let mut small_png = Vec::new();
    PngEncoder::new(Cursor::new(&mut small_png))
        .write_image(bytemuck::cast_slice(small.as_raw()), 8, 8, image::ExtendedColorType::L16)
        .unwrap();
    decode_call(&mut client, small_png).await;
    let idle = server.usage().rss;
    reset_peak_rss(&server);

    let sampler = HeldSampler::start(server.admin_addr);
    let got = decode_call(&mut client, rgba_png).await;
    assert_eq!((got.format, got.width, got.height), (PixelFormat::Rgba16 as i32, H, W), "RGBA16, rotated by its EXIF orientation");
    assert!(got.data[..] == rgba_want[..], "RGBA16 pixels rotated 90° clockwise");
    drop(got);
    let got = decode_call(&mut client, gray_png).await;
    assert_eq!((got.format, got.width, got.height), (PixelFormat::Rgba16 as i32, H, W), "gray+alpha 16 carried as RGBA16, rotated");
    assert!(got.data[..] == gray_want[..], "gray+alpha pixels as RGBA16, rotated 270°");
    drop(got);
    let held_peak = sampler.stop();
    drop(client);

    // The two decodes held at least one RGBA16 image each: the check below is not trivially met.
    assert!(held_peak >= 2 * u64::from(W * H) * 8, "the accounting's peak {held_peak} is below what decoding must hold");
    assert_rss_within("16-bit decode", &server, idle, held_peak, DECODE_OVERHEAD);
    assert_eq!(held_back_to_zero(server.admin_addr, Duration::from_secs(10)).await, 0.0, "every charge released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_naming_an_unconfigured_tenant_are_charged_and_bounded() {
    let mut pki = Pki::new(&["alpha", "stranger"]);
    // The stranger's certificate is valid; its tenant is not configured.
    pki.tenants = vec!["alpha".into()];
    // A 64 MiB budget: the unserved pool's share is the default half, 32
    // MiB; each connection is charged its 5 MiB window and 1 MiB frame.
    // (Such connections also live 2 s only, 16 at most: lanes::UNSERVED_*.)
    let extra = "[tenancy]\nmemory_budget_bytes = 67108864\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let per_connection = 6 * MIB;
    let unserved = [("tenant", "(unserved)"), ("stage", "receiving")];
    let idle = server.usage().rss;
    reset_peak_rss(&server);
    let sampler = HeldSampler::start(server.admin_addr);

    // Five fit the share, the sixth does not: closed at the handshake, counted.
    let mut strangers = Vec::new();
    for _ in 0..6 {
        strangers.push(h2_connect(&server, &pki, "stranger").await);
    }
    let closed =
        until_metric(server.admin_addr, "imgsvc_connections_refused_total", &[("reason", "memory")], 1.0, Duration::from_secs(10)).await;
    assert_eq!(closed, Some(1.0), "the sixth connection closed for memory");
    let held_peak = sampler.stop();
    assert_eq!(held_peak, 5 * per_connection, "five connections charged to the unserved pool at once");
    // A configured tenant is untouched: its own share.
    let (mut send, _c) = h2_connect(&server, &pki, "alpha").await;
    let (response, mut body) = start_call(&mut send, "/grpc.health.v1.Health/Check").await;
    body.send_data(grpc_frame(false, &[]), true).unwrap();
    let (status, _) = grpc_answer(response).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");

    assert_rss_within("unconfigured-tenant connections", &server, idle, held_peak, 16 * MIB);
    // Their short life ends, or they are dropped: the charge comes back.
    drop(strangers);
    let held = until_metric(server.admin_addr, "imgsvc_tenant_memory_held_bytes", &unserved, 0.0, Duration::from_secs(10)).await;
    assert_eq!(held, Some(0.0), "closed connections give their charge back");
}

/// Calls that wait for memory each hold the first frame of their body
/// (read to find the message's length) while they wait: 40 of them on one
/// connection, each a 1 MiB frame, were 40 MiB the accounting never saw
/// (issue 24; measured: RSS +40 MiB with 14 MiB held). Whatever the server
/// reads of them must be charged (to the call or its connection), or not
/// read, so RSS stays within the accounting's peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_memory_hold_their_frames_within_the_accounting() {
    const WAITING: usize = 40;
    let pki = Pki::new(&["alpha"]);
    // A 32 MiB budget: alpha's share is 16 MiB, of which its connection
    // takes 6. A wait may last 30 s; 48 slots.
    let extra = "[tenancy]\nmemory_budget_bytes = 33554432\nmemory_wait_ms = 30000\n\
                 [tenant_defaults]\nmax_concurrent_requests = 48\nmax_queued_requests = 0\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let (mut send, connection) = h2_connect(&server, &pki, "alpha").await;
    // Warm-up: one small call answered.
    let (response, mut body) = start_call(&mut send, "/grpc.health.v1.Health/Check").await;
    body.send_data(grpc_frame(false, &[]), true).unwrap();
    assert_eq!(grpc_answer(response).await.0.code(), Code::Ok);
    let idle = server.usage().rss;
    reset_peak_rss(&server);
    let sampler = HeldSampler::start(server.admin_addr);

    // The first call declares a 4 MiB legacy message (8 MiB charged: all
    // but 2 MiB of the share) and sends nothing more; every later one
    // declares 2 MiB (4 MiB charged), which cannot fit until the first is
    // gone, and sends one frame (1 MiB, the server's frame size) of it.
    let path = "/NLImageService/MeanFilter";
    let (_first, mut first_body) = start_call(&mut send, path).await;
    first_body.send_data(grpc_prefix(false, 4 << 20), false).unwrap();
    let charged =
        until_metric(server.admin_addr, "imgsvc_memory_held_bytes", &[("stage", "receiving")], (14 << 20) as f64, Duration::from_secs(10))
            .await;
    assert_eq!(charged, Some((14 << 20) as f64), "the first call and the connection charged");
    let frame = {
        let mut frame = grpc_prefix(false, 2 << 20).to_vec();
        frame.resize(1 << 20, 7);
        bytes::Bytes::from(frame)
    };
    // Queued in the client as flow control allows: how far the server
    // lets them in is its design (read and wait, or hold at the headers).
    let mut waiting = Vec::new();
    for _ in 0..WAITING {
        let (response, mut body) = start_call(&mut send, path).await;
        body.send_data(frame.clone(), false).unwrap();
        waiting.push((response, body));
    }
    let waits =
        until_metric(server.admin_addr, "imgsvc_memory_waits_total", &[("tenant", "alpha")], WAITING as f64, Duration::from_secs(10)).await;
    eprintln!("frames of waiting calls: {waits:?} calls waiting for memory");
    // Let the server read what it will.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held_peak = sampler.stop();
    assert_rss_within("frames of waiting calls", &server, idle, held_peak, 16 * MIB);

    drop((waiting, first_body, send));
    connection.abort();
    assert_eq!(held_back_to_zero(server.admin_addr, Duration::from_secs(10)).await, 0.0, "every charge released");
}

/// A `Process` answer its client does not read stays on the server,
/// charged as `sending`, for every copy that exists: spliced (the
/// default), the message once; with `server.compress_responses` tonic's
/// encode buffer and the compressed copy too (3×, until the body has been
/// handed over: then the compressed message alone). Peak RSS stays within
/// what the accounting held. (Until 2026-12-07 a raw answer was charged
/// once and copied again by the encoder, twice with compression.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_process_answer_is_charged_for_every_copy_of_it() {
    use imgsvc::proto::v1::{Operation, Rotate, operation::Kind, rotate::Amount};
    use prost::Message;
    // 1600×1200 RGBA8, 7.7 MB, of pseudo-random bytes (they do not compress).
    let (w, h) = (1600u32, 1200u32);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..w * h * 4)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let request = ProcessRequest {
        image: Some(Image { format: PixelFormat::Rgba8 as i32, width: w, height: h, data: data.into(), encoded: None }),
        operations: vec![Operation { kind: Some(Kind::Rotate(Rotate { amount: Some(Amount::QuarterTurns(2)) })) }],
        output: None,
    };
    let answer_bytes = request.encoded_len() as u64 + 5; // same size: a half turn
    let pki = Pki::new(&["alpha"]);
    for compress in [false, true] {
        let extra = "[tenancy]\nmemory_budget_bytes = 268435456\n";
        let env = [("IMGSVC_LOG__LEVEL", QUIET_LOG), ("IMGSVC_SERVER__COMPRESS_RESPONSES", if compress { "true" } else { "false" })];
        let server = ServerProcess::spawn_with(&pki, extra, &env);
        // The client's windows stay at 64 KiB and it never reads: the answer
        // stays on the server.
        let (mut send, connection) = h2_connect(&server, &pki, "alpha").await;
        let (response, mut body) = start_call_with(&mut send, "/imgsvc.v1.ImageService/Process", &[("grpc-accept-encoding", "gzip")]).await;
        let idle = server.usage().rss;
        reset_peak_rss(&server);
        let sampler = HeldSampler::start(server.admin_addr);
        send_flow_controlled(&mut body, grpc_message(&request)).await;
        body.send_data(bytes::Bytes::new(), true).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), response).await.expect("the answer's headers").unwrap();
        assert_eq!(response.status(), 200);
        // Once the body has been handed to HTTP/2, what is left of the answer
        // stays charged until it is written: spliced, the pixels (the few
        // bytes before them went out); compressed, the compressed message
        // (tonic's encode buffers, charged 3x while they existed, went with
        // the body). Pseudo-random pixels do not compress: about the size
        // of the answer either way.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (low, high) = ((answer_bytes - 64) as f64, (answer_bytes + 64 * 1024) as f64);
        let mut sending = 0.0;
        while std::time::Instant::now() < deadline {
            sending = metric(&scrape(server.admin_addr), "imgsvc_memory_held_bytes", &[("stage", "sending")]).unwrap_or(0.0);
            if (low..=high).contains(&sending) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            (low..=high).contains(&sending),
            "compress_responses = {compress}: {sending} bytes held as sending for the {answer_bytes}-byte answer"
        );
        let held_peak = sampler.stop();
        assert_rss_within(&format!("unread answer, compress_responses = {compress}"), &server, idle, held_peak, 8 * MIB);
        drop((response, body, send));
        connection.abort();
        assert_eq!(held_back_to_zero(server.admin_addr, Duration::from_secs(10)).await, 0.0, "every charge released");
    }
}

/// Compressed requests inflate no further than what they were charged
/// (the tenant's `max_request_bytes`), whatever the server's message
/// limit: before, tonic inflated each message up to
/// `limits.max_message_bytes` (256 MiB here) outside the accounting
/// (issue 24; measured: 20 gzip streams of 190 KB on one connection, each
/// inflating to 187 MiB, `max_request_bytes` 1 MiB, a 128 MiB budget: RSS
/// +215 MiB). Here 20 bombs of each encoding, each 64 MiB of zeros
/// compressed to a few KiB, are refused with RESOURCE_EXHAUSTED naming the
/// limit; RSS stays within the accounting; corrupt data is
/// INVALID_ARGUMENT; a valid compressed call is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_bombs_inflate_no_further_than_the_tenants_request_limit() {
    use imgsvc::proto::nlimage::NlImage;
    use prost::Message;
    use std::io::Write;
    const BOMBS: usize = 20;
    let gzip = |data: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    };
    let zstd = |data: &[u8]| zstd::bulk::compress(data, 3).unwrap();
    let zeros = vec![0u8; 64 << 20];
    let bombs = [("gzip", gzip(&zeros)), ("zstd", zstd(&zeros))];
    drop(zeros);
    let image = NlImage { color: false, width: 64, height: 64, data: (0..64 * 64).map(|i| (i % 251) as u8).collect::<Vec<_>>().into() };
    let valid = [("gzip", gzip(&image.encode_to_vec())), ("zstd", zstd(&image.encode_to_vec()))];

    let pki = Pki::new(&["alpha"]);
    let extra = "[tenancy]\nmemory_budget_bytes = 134217728\n\
                 [tenant_defaults]\nmax_request_bytes = 1048576\nmax_concurrent_requests = 48\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let path = "/NLImageService/MeanFilter";
    for ((encoding, bomb), (_, valid)) in bombs.iter().zip(&valid) {
        let headers = [("grpc-encoding", *encoding)];
        let (mut send, connection) = h2_connect(&server, &pki, "alpha").await;
        assert!(bomb.len() < 100_000, "{encoding}: {} bytes", bomb.len());
        // Warm-up: a valid compressed call is answered.
        let (response, mut body) = start_call_with(&mut send, path, &headers).await;
        body.send_data(grpc_frame(true, valid), true).unwrap();
        let (status, answer) = grpc_answer(response).await;
        assert_eq!(status.code(), Code::Ok, "{encoding}: {status:?}");
        assert_eq!(NlImage::decode(&answer[5..]).unwrap().data.len(), 64 * 64, "{encoding}");
        let idle = server.usage().rss;
        reset_peak_rss(&server);
        let sampler = HeldSampler::start(server.admin_addr);

        let mut calls = Vec::new();
        for _ in 0..BOMBS {
            let (response, mut body) = start_call_with(&mut send, path, &headers).await;
            send_what_fits(&mut body, grpc_frame(true, bomb), Duration::from_secs(10)).await;
            let _ = body.send_data(bytes::Bytes::new(), true);
            calls.push((response, body));
        }
        for (response, _body) in calls {
            let (status, _) = grpc_answer(response).await;
            assert_eq!(status.code(), Code::ResourceExhausted, "{encoding}: {status:?}");
            let want = format!("({encoding}) inflates to more than 1048576 bytes, the tenant's max_request_bytes");
            assert!(status.message().contains(&want), "{encoding}: {}", status.message());
        }
        let held_peak = sampler.stop();
        // Each bomb may hold its compressed bytes and 1 MiB inflated; the
        // overhead is the decoders' state and allocator slack.
        assert_rss_within(&format!("{encoding} bombs"), &server, idle, held_peak, 16 * MIB);

        // Corrupt data: the client's mistake, named.
        let (response, mut body) = start_call_with(&mut send, path, &headers).await;
        body.send_data(grpc_frame(true, b"these bytes are not compressed"), true).unwrap();
        let (status, _) = grpc_answer(response).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{encoding}: {status:?}");
        assert!(status.message().contains(&format!("not valid {encoding} data")), "{}", status.message());

        // And the server still serves, on the same connection.
        let (response, mut body) = start_call_with(&mut send, path, &headers).await;
        body.send_data(grpc_frame(true, valid), true).unwrap();
        assert_eq!(grpc_answer(response).await.0.code(), Code::Ok, "{encoding}: served after the bombs");
        drop(send);
        connection.abort();
    }
    assert_eq!(held_back_to_zero(server.admin_addr, Duration::from_secs(10)).await, 0.0, "every charge released");
}

/// The health flood of issue 24: one connection opening 60 streams to
/// `grpc.health.v1.Health/Check`, each declaring a 4 MiB message and
/// sending all but its last KiB, raised RSS by 249 MiB on a 128 MiB budget
/// while every gauge read 0 (health passed admission uncharged). Now each
/// is admitted like an image call (slots, rate) and refused at its prefix
/// (over the 64 KiB limit of calls other than the image methods): RSS stays
/// within the accounting and a health check is then answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_flood_is_refused_at_its_prefixes_within_the_accounting() {
    const STREAMS: usize = 60;
    let pki = Pki::new(&["alpha"]);
    let extra = "[tenancy]\nmemory_budget_bytes = 134217728\n[tenant_defaults]\nmax_concurrent_requests = 64\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let (mut send, connection) = h2_connect(&server, &pki, "alpha").await;
    let path = "/grpc.health.v1.Health/Check";
    let (response, mut body) = start_call(&mut send, path).await;
    body.send_data(grpc_frame(false, &[]), true).unwrap();
    assert_eq!(grpc_answer(response).await.0.code(), Code::Ok);
    let idle = server.usage().rss;
    reset_peak_rss(&server);
    let sampler = HeldSampler::start(server.admin_addr);

    let message = {
        let mut message = grpc_prefix(false, 4 << 20).to_vec();
        message.resize(5 + (4 << 20) - 1024, 1);
        bytes::Bytes::from(message)
    };
    let mut calls = Vec::new();
    for _ in 0..STREAMS {
        let (response, mut body) = start_call(&mut send, path).await;
        send_what_fits(&mut body, message.clone(), Duration::from_millis(200)).await;
        calls.push((response, body));
    }
    for (response, _body) in calls {
        let (status, _) = grpc_answer(response).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("message of 4194304 bytes to grpc.health.v1.Health/Check, over the limit of 65536 bytes"),
            "{}",
            status.message()
        );
    }
    let held_peak = sampler.stop();
    assert_rss_within("health flood", &server, idle, held_peak, 16 * MIB);

    let (response, mut body) = start_call(&mut send, path).await;
    body.send_data(grpc_frame(false, &[]), true).unwrap();
    assert_eq!(grpc_answer(response).await.0.code(), Code::Ok, "a health check answered after the flood");
    drop(send);
    connection.abort();
}

/// What the server may hold beyond its accounting's peak while large
/// legacy calls run: HTTP/2's frames in flight beyond the connection
/// charges, allocator slack and RSS's page granularity. Measured at 2–9
/// MiB (printed); one uncharged copy of a request would be 24 MiB over.
const LEGACY_OVERHEAD: u64 = 16 * MIB;

/// The legacy methods' charge (twice the request message at its prefix:
/// the owned message buffer and the answer) proven against the server's
/// RSS: four concurrent 3840×2160 RGB rotations and mean filters on four
/// connections, every answer checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_legacy_calls_hold_no_more_than_they_are_charged() {
    use imgsvc::proto::nlimage::{
        NlImage, NlImageRotateRequest, nl_image_rotate_request::Rotation, nl_image_service_client::NlImageServiceClient,
    };
    const W: usize = 3840;
    const H: usize = 2160;
    let pki = Pki::new(&["alpha"]);
    let extra = "[tenancy]\nmemory_budget_bytes = 1073741824\n";
    let server = ServerProcess::spawn_with(&pki, extra, &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let pixels: bytes::Bytes = (0..W * H * 3).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    let image = NlImage { color: true, width: W as i32, height: H as i32, data: pixels.clone() };
    let mut clients = Vec::new();
    for _ in 0..4 {
        let channel = imgsvc::client::connect(&target_of(server.addr), &pki.credentials("alpha")).await.unwrap();
        clients.push(NlImageServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20));
    }
    // Warm-up: one call per connection (threads, first allocations).
    for client in &mut clients {
        let tiny = NlImage { color: false, width: 2, height: 2, data: vec![1, 2, 3, 4].into() };
        client.mean_filter(tiny).await.unwrap();
    }
    let idle = server.usage().rss;
    reset_peak_rss(&server);
    let sampler = HeldSampler::start(server.admin_addr);
    let calls = clients.into_iter().enumerate().map(|(i, mut client)| {
        let image = image.clone();
        tokio::spawn(async move {
            if i % 2 == 0 {
                let request = NlImageRotateRequest { rotation: Rotation::NinetyDeg as i32, image: Some(image) };
                client.rotate_image(request).await.map(tonic::Response::into_inner)
            } else {
                client.mean_filter(image).await.map(tonic::Response::into_inner)
            }
        })
    });
    let answers = futures_util::future::join_all(calls).await;
    let held_peak = sampler.stop();
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap().unwrap_or_else(|status| panic!("call {i}: {status:?}"));
        if i % 2 == 0 {
            assert_eq!((answer.width, answer.height), (H as i32, W as i32), "rotated");
            // Counter-clockwise: the source's top-right pixel is the answer's top-left.
            assert_eq!(&answer.data[..3], &pixels[(W - 1) * 3..W * 3], "rotation {i}");
        } else {
            assert_eq!((answer.width, answer.height), (W as i32, H as i32));
            assert_eq!(answer.data.len(), pixels.len(), "mean filter {i}");
        }
    }
    // Each call held its request and its answer at once: the check below
    // is not trivially met.
    assert!(held_peak >= 2 * (W * H * 3) as u64, "the accounting's peak {held_peak} is below what the calls must hold");
    assert_rss_within("large legacy calls", &server, idle, held_peak, LEGACY_OVERHEAD);
    assert_eq!(held_back_to_zero(server.admin_addr, Duration::from_secs(10)).await, 0.0, "every charge released");
}

/// The unary image methods are read by the admission layer's own message
/// buffer, not tonic's codec: a client's framing and protobuf mistakes
/// are INVALID_ARGUMENT naming what was expected (tonic answered INTERNAL),
/// and the connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_and_protobuf_mistakes_on_the_image_methods_are_invalid_argument() {
    let pki = Pki::new(&["alpha"]);
    let server = ServerProcess::spawn_with(&pki, "", &[("IMGSVC_LOG__LEVEL", QUIET_LOG)]);
    let (mut send, connection) = h2_connect(&server, &pki, "alpha").await;
    let cases: [(&str, bytes::Bytes, &str); 4] = [
        ("/NLImageService/MeanFilter", grpc_frame(false, &[0x22, 0xff, 0xff, 0x01]), "not a valid NLImage"),
        ("/NLImageService/RotateImage", bytes::Bytes::new(), "expected 1 request message, got none"),
        ("/imgsvc.v1.ImageService/Process", grpc_prefix(false, 10), "ended after 0 of the 10 bytes of its request message"),
        (
            "/NLImageService/MeanFilter",
            [grpc_frame(false, &[]), grpc_frame(false, &[])].concat().into(),
            "expected 1 request message, got more than one",
        ),
    ];
    for (path, body_bytes, words) in cases {
        let (response, mut body) = start_call(&mut send, path).await;
        body.send_data(body_bytes, true).unwrap();
        let (status, _) = grpc_answer(response).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(status.message().contains(words), "{path}: {:?} should say {words:?}", status.message());
    }
    let (response, mut body) = start_call(&mut send, "/NLImageService/MeanFilter").await;
    let image = imgsvc::proto::nlimage::NlImage { color: false, width: 1, height: 1, data: vec![9].into() };
    body.send_data(grpc_frame(false, &prost::Message::encode_to_vec(&image)), true).unwrap();
    let (status, answer) = grpc_answer(response).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    let answer = <imgsvc::proto::nlimage::NlImage as prost::Message>::decode(&answer[5..]).expect("an NLImage");
    assert_eq!((answer.width, answer.height, answer.data.len()), (1, 1, 1), "the connection serves on");
    drop(send);
    connection.abort();
}
