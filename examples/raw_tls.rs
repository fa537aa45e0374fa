//! A practical floor for `benches/transport.sh --raw`: the same work as an
//! NLImageService call with everything but TLS and TCP taken away. Each
//! request is a 16-byte header (operation, width, height, channels, as
//! little-endian u32) and the pixels; each answer is the output's width and
//! height (8 bytes) and its pixels; one request at a time per connection,
//! over mutual TLS (rustls, the same ring provider and certificates as
//! imgsvc). No HTTP/2, no gRPC framing, no protobuf, no tenancy.
//!
//! Its buffers live as long as their connection (no allocation, page fault
//! or zeroing per request) and each kernel runs on the connection's own
//! thread. Its copies are the fewest that rustls's buffered API allows: the kernel
//! copies each byte across the socket once per direction, rustls decrypts
//! in place and copies the plaintext once into the request buffer, the
//! kernel runs, and rustls copies the answer once into its records before
//! sealing them. What imgsvc or bare tonic spend above this is HTTP/2,
//! gRPC and their own copies; what this spends above benches/floor.rs is
//! TCP, syscalls and those two copies. Not a server to run: it validates
//! nothing beyond what the kernels need.
//!
//!   cargo build --release --locked --example raw_tls
//!   target/release/examples/raw_tls serve PORT CERT KEY CLIENT_CA
//!   target/release/examples/raw_tls load PORT CA CERT KEY OP WIDTH HEIGHT CHANNELS CONCURRENCY SECONDS
//!
//! `load` prints one JSON object with the fields of `imgsvc-client bench
//! --json` that the benchmark reads (ok, errors, requests_per_s, p50_ms,
//! p99_ms). OP is rotate (90° counter-clockwise), mean or none.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use imgsvc::tls::{ClientCredentials, crypto_provider, read_certs, read_key};
use imgsvc_kernels::{Layout, Parallelism, QuarterTurns};
use rustls::{RootCertStore, ServerConfig, pki_types::ServerName, server::WebPkiClientVerifier};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const OP_NONE: u32 = 0;
const OP_ROTATE: u32 = 1;
const OP_MEAN: u32 = 2;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]).await,
        Some("load") => load(&args[1..]).await,
        _ => {
            Err("usage: raw_tls serve PORT CERT KEY CLIENT_CA | raw_tls load PORT CA CERT KEY OP WIDTH HEIGHT CHANNELS CONCURRENCY SECONDS"
                .into())
        }
    }
}

async fn serve(args: &[String]) -> Result<(), BoxError> {
    let [port, cert, key, ca] = args else { return Err("usage: raw_tls serve PORT CERT KEY CLIENT_CA".into()) };
    let mut roots = RootCertStore::empty();
    for ca in read_certs("client CA", ca.as_ref())? {
        roots.add(ca)?;
    }
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs("server certificate", cert.as_ref())?, read_key("server key", key.as_ref())?)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(stream) = acceptor.accept(tcp).await {
                let _ = answer_all(stream).await;
            }
        });
    }
}

/// Answers requests on one connection until the client closes it. The
/// request and answer buffers live as long as the connection: after the
/// first request no allocation, no page fault, no zeroing.
async fn answer_all(mut stream: tokio_rustls::server::TlsStream<TcpStream>) -> Result<(), BoxError> {
    let mut header = [0u8; 16];
    let (mut pixels, mut out) = (Vec::new(), Vec::new());
    loop {
        if stream.read_exact(&mut header).await.is_err() {
            return Ok(()); // closed
        }
        let field = |i: usize| u32::from_le_bytes(header[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let (op, layout) = (field(0), Layout::new(field(1) as usize, field(2) as usize, field(3) as usize)?);
        // Read into spare capacity: no zeroing pass, one copy out of rustls.
        pixels.clear();
        pixels.reserve(layout.samples());
        while pixels.len() < layout.samples() {
            let want = layout.samples() - pixels.len();
            if (&mut stream).take(want as u64).read_buf(&mut pixels).await? == 0 {
                return Err("connection closed inside a request".into());
            }
        }
        out.resize(layout.samples(), 0); // zeroes only when it grows
        let out_layout = match op {
            OP_NONE => layout,
            OP_ROTATE => {
                imgsvc_kernels::rotate_into_with(&pixels[..], layout, QuarterTurns::One, &mut out, Parallelism::Single)?;
                layout.rotated(QuarterTurns::One)
            }
            OP_MEAN => {
                imgsvc_kernels::mean_filter_into_with(&pixels[..], layout, &mut out, Parallelism::Single)?;
                layout
            }
            other => return Err(format!("unknown operation {other}").into()),
        };
        let answer = if op == OP_NONE { &pixels } else { &out };
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(out_layout.width() as u32).to_le_bytes());
        head[4..].copy_from_slice(&(out_layout.height() as u32).to_le_bytes());
        stream.write_all(&head).await?;
        stream.write_all(answer).await?;
        stream.flush().await?;
    }
}

async fn load(args: &[String]) -> Result<(), BoxError> {
    let [port, ca, cert, key, op, width, height, channels, concurrency, seconds] = args else {
        return Err("usage: raw_tls load PORT CA CERT KEY OP WIDTH HEIGHT CHANNELS CONCURRENCY SECONDS".into());
    };
    let op = match op.as_str() {
        "none" => OP_NONE,
        "rotate" => OP_ROTATE,
        "mean" => OP_MEAN,
        other => return Err(format!("OP: expected rotate, mean or none, got {other}").into()),
    };
    let (width, height, channels): (u32, u32, u32) = (width.parse()?, height.parse()?, channels.parse()?);
    let (concurrency, seconds): (usize, f64) = (concurrency.parse()?, seconds.parse()?);
    let mut config = ClientCredentials::from_files(ca.as_ref(), cert.as_ref(), key.as_ref())?.rustls_config()?;
    config.alpn_protocols.clear();
    let connector = TlsConnector::from(Arc::new(config));
    let samples = (width * height * channels) as usize;
    let mut request = Vec::with_capacity(16 + samples);
    for field in [op, width, height, channels] {
        request.extend_from_slice(&field.to_le_bytes());
    }
    request.extend((0..samples).map(|i| (i * 31 % 251) as u8));
    let request = Arc::new(request);
    let (out_w, out_h) = if op == OP_ROTATE { (height, width) } else { (width, height) };
    let mut expected_head = [0u8; 8];
    expected_head[..4].copy_from_slice(&out_w.to_le_bytes());
    expected_head[4..].copy_from_slice(&out_h.to_le_bytes());

    let deadline = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (connector, request, port) = (connector.clone(), request.clone(), port.clone());
        callers.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(format!("127.0.0.1:{port}")).await?;
            tcp.set_nodelay(true)?;
            let mut stream = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
            let mut answer = vec![0u8; 8 + samples];
            let mut latencies = Vec::new();
            while started.elapsed() < deadline {
                let t0 = Instant::now();
                stream.write_all(&request).await?;
                stream.flush().await?;
                stream.read_exact(&mut answer).await?;
                if answer[..8] != expected_head {
                    return Err("the answer's size is not the expected output's".into());
                }
                latencies.push(t0.elapsed());
            }
            Ok::<_, BoxError>(latencies)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0u64);
    for caller in callers {
        match caller.await? {
            Ok(l) => latencies.extend(l),
            Err(e) => {
                eprintln!("raw_tls load: a caller failed: {e}");
                errors += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies.get(rank.clamp(1, latencies.len().max(1)) - 1).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let report = serde_json::json!({
        "ok": latencies.len(), "errors": {"caller_failed": errors},
        "requests_per_s": latencies.len() as f64 / elapsed, "p50_ms": pct(50.0), "p99_ms": pct(99.0),
    });
    println!("{report}");
    Ok(())
}
