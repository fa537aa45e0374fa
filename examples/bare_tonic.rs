//! A baseline for `benches/transport.sh --bare`: NLImageService on plain
//! tonic over mutual TLS (tonic's own rustls acceptor), the same kernels,
//! run inline on the tokio thread, glibc's allocator tuned the same way, and nothing else — no tenancy, no
//! admission or memory accounting, no worker pool, no metrics, no logs.
//! What imgsvc spends per call above it is what its own layers cost; what
//! this spends is the framework's share (tonic, hyper, h2, rustls, prost).
//! Not a server to run: it validates nothing beyond what the kernels need.
//!
//!   cargo build --release --locked --example bare_tonic
//!   target/release/examples/bare_tonic PORT CERT KEY CLIENT_CA

use bytes::Bytes;
use imgsvc::proto::nlimage::{
    NlImage, NlImageRotateRequest,
    nl_image_rotate_request::Rotation,
    nl_image_service_server::{NlImageService, NlImageServiceServer},
};
use imgsvc_kernels::{Layout, QuarterTurns};
use tonic::{
    Request, Response, Status,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

struct Bare;

fn layout(image: &NlImage) -> Result<Layout, Status> {
    let channels = if image.color { 3 } else { 1 };
    Layout::new(image.width.max(0) as usize, image.height.max(0) as usize, channels).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn answer(image: &NlImage, layout: Layout, data: Vec<u8>) -> Response<NlImage> {
    let (width, height) = (layout.width() as i32, layout.height() as i32);
    Response::new(NlImage { color: image.color, width, height, data: Bytes::from(data) })
}

#[tonic::async_trait]
impl NlImageService for Bare {
    async fn rotate_image(&self, request: Request<NlImageRotateRequest>) -> Result<Response<NlImage>, Status> {
        let request = request.into_inner();
        let image = request.image.ok_or_else(|| Status::invalid_argument("no image"))?;
        let turns = match Rotation::try_from(request.rotation) {
            Ok(Rotation::None) => return Ok(Response::new(image)),
            Ok(Rotation::NinetyDeg) => QuarterTurns::One,
            Ok(Rotation::OneEightyDeg) => QuarterTurns::Two,
            Ok(Rotation::TwoSeventyDeg) => QuarterTurns::Three,
            Err(_) => return Err(Status::invalid_argument("unknown rotation")),
        };
        let layout = layout(&image)?;
        let out = imgsvc_kernels::rotate(&image.data[..], layout, turns).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(answer(&image, layout.rotated(turns), out))
    }

    async fn mean_filter(&self, request: Request<NlImage>) -> Result<Response<NlImage>, Status> {
        let image = request.into_inner();
        let layout = layout(&image)?;
        let out = imgsvc_kernels::mean_filter(&image.data[..], layout).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(answer(&image, layout, out))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, cert, key, ca] = args.as_slice() else {
        return Err("usage: bare_tonic PORT CERT KEY CLIENT_CA".into());
    };
    // glibc tuned as imgsvc-server tunes it (src/serving/allocator.rs), so
    // that per-request image buffers cost both the same page faults.
    let _ = imgsvc::serving::allocator::tune_for_image_buffers();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?))
        .client_ca_root(Certificate::from_pem(std::fs::read(ca)?));
    // imgsvc's transport defaults, so that only its own layers differ.
    let service = NlImageServiceServer::new(Bare).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20);
    Server::builder()
        .tls_config(tls)?
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(5 << 20))
        .max_frame_size(Some(1 << 20))
        .tcp_nodelay(true)
        .add_service(service)
        .serve(format!("127.0.0.1:{port}").parse()?)
        .await?;
    Ok(())
}
