//! A PNG whose header declares 100000x100000 pixels is refused from its
//! header, before any pixel buffer exists: on the client's read path and
//! on the server through a v1 encoded image.
//!
//! The test binary's allocator counts the largest single allocation its
//! process makes (the test server runs in-process), so "without allocating"
//! is measured, not assumed. Each test runs in a process of its own, where
//! no other test allocates.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::common::*;
use imgsvc::{
    client::image_io::read_image,
    proto::v1::{EncodedImage, Image, ImageEncoding, ProcessRequest, image_service_client::ImageServiceClient},
};
use rusty_fork::rusty_fork_test;

struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// Raises [`LARGEST`] to `size`. Every test of the binary allocates
/// through here: it writes the shared counter only for a new maximum.
fn note(size: usize) {
    if size > LARGEST.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Nothing in these tests legitimately allocates this much at once; the
/// declared image would need 30 GB.
const MAX_SINGLE_ALLOCATION: usize = 64 << 20;

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[&kind[..], data].concat()).to_be_bytes());
    out
}

/// A well-formed PNG header declaring `width`x`height` 8-bit RGB, with one
/// tiny IDAT (an empty zlib stream) and IEND: the file is ~70 bytes.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, filter 0, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    png
}

rusty_fork_test! {
    /// In a process of its own: asserts the largest allocation of the process.
    #[test]
    fn client_refuses_a_png_declaring_100000x100000_from_its_header() {
        client_refuses_the_declared_bomb()
    }
}

fn client_refuses_the_declared_bomb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.png");
    std::fs::write(&path, png_declaring(100_000, 100_000)).unwrap();
    let err = read_image(&path).unwrap_err();
    assert_eq!(
        imgsvc::client::error_chain(&err),
        format!(
            "cannot read image {}: the image is 100000x100000 (10000000000 pixels), over the limit of 100000000 pixels",
            path.display()
        )
    );
    assert!(LARGEST.load(Ordering::Relaxed) < MAX_SINGLE_ALLOCATION, "largest allocation {}", LARGEST.load(Ordering::Relaxed));

    // The client binary says the same and exits 65 (bad input image)
    // before contacting any server (port 9 has none).
    let pki = Pki::new(&["alpha"]);
    let out = run_client_as(
        &pki,
        "alpha",
        &["--port", "9", "--input", path.to_str().unwrap(), "--output", dir.path().join("o.png").to_str().unwrap(), "--mean"],
    );
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("over the limit of 100000000 pixels"), "{}", stderr(&out));
    assert!(!dir.path().join("o.png").exists());
}

rusty_fork_test! {
    /// In a process of its own: asserts the largest allocation of the process.
    #[test]
    fn server_refuses_an_encoded_png_declaring_100000x100000_with_resource_exhausted() {
        block_on(server_refuses_the_declared_bomb())
    }
}

async fn server_refuses_the_declared_bomb() {
    let pki = Pki::new(&["alpha"]);
    let server = TestServer::start(&pki);
    let mut client = ImageServiceClient::new(channel(&server, &pki, "alpha").await);
    let image = Image {
        encoded: Some(EncodedImage { data: png_declaring(100_000, 100_000).into(), encoding: ImageEncoding::Png as i32, page: 0 }),
        ..Default::default()
    };
    let status = client.process(ProcessRequest { image: Some(image), operations: vec![], output: None }).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::ResourceExhausted, "the image is 100000x100000 (10000000000 pixels), over the limit of 100000000 pixels")
    );
    assert!(LARGEST.load(Ordering::Relaxed) < MAX_SINGLE_ALLOCATION, "largest allocation {}", LARGEST.load(Ordering::Relaxed));
}
