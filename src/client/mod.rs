//! What `imgsvc-client` uses: credentials, a connection, one call per API,
//! and the translation of transport failures into messages that say which
//! side refused what.

pub mod balance;
pub mod batch;
pub mod connector;
pub mod credentials;
pub mod image_io;
pub mod stream;

use std::{sync::Arc, time::Duration};

use thiserror::Error;
use tonic::transport::Channel;

use crate::{
    imaging::QuarterTurns,
    proto::{
        nlimage::{NlImageRotateRequest, nl_image_rotate_request::Rotation, nl_image_service_client::NlImageServiceClient},
        v1::{self, image_service_client::ImageServiceClient, operation::Kind, rotate::Amount},
    },
    service::PixelBuffer,
    tls::ClientCredentials,
};

pub use balance::{Balancer, Endpoint};
pub use image_io::RawImage;

/// Default limit for messages the client sends and receives (as the server).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid server address {address:?}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {address}: {explanation}")]
    Connect { address: String, explanation: String },
    #[error("the server answered {code:?}: {message}{hint}")]
    Status {
        code: tonic::Code,
        message: String,
        hint: String,
        /// When the server says a retry may succeed after a delay
        /// (`google.rpc.RetryInfo`, else `grpc-retry-pushback-ms`).
        retry_after: Option<std::time::Duration>,
    },
    #[error("the server returned an invalid image: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// The gRPC status code, if the server answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// An operation the client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Rotate(QuarterTurns),
    MeanFilter,
}

/// Which protocol to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Api {
    /// imgsvc.v1.ImageService/Process: all operations in one round trip.
    #[default]
    V1,
    /// NLImageService: one call per operation (mean, then rotate); works
    /// against any server of that protocol.
    Legacy,
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Name to verify in the server certificate; defaults to `host`.
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    /// Deadline of each call.
    pub timeout: Duration,
}

impl Target {
    pub fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Opens a mutual-TLS connection to `target`.
pub async fn connect(target: &Target, credentials: &ClientCredentials) -> Result<Channel, ClientError> {
    let address = target.address();
    let server_name = target.server_name.clone().unwrap_or_else(|| target.host.trim_matches(['[', ']']).to_string());
    let tls = credentials.rustls_config().map_err(|e| ClientError::Connect { address: address.clone(), explanation: error_chain(&e) })?;
    let name = rustls::pki_types::ServerName::try_from(server_name.clone()).map_err(|e| ClientError::Connect {
        address: address.clone(),
        explanation: format!("{server_name:?} is not a valid server name: {e}"),
    })?;
    let connector = connector::TlsConnector { config: Arc::new(tls), server_name: name, address: address.clone() };
    // TLS is done by the connector, so tonic sees a plain "http" URI.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|source| ClientError::Address { address: address.clone(), source })?
        .connect_timeout(target.connect_timeout)
        .timeout(target.timeout)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
        // Answers may come in frames of up to 1 MiB instead of 16 KiB: less
        // server CPU per large answer (docs/performance.md#frame-size; the
        // server's `server.http2_max_frame_size` does the same for requests).
        .max_frame_size(Some(CLIENT_MAX_FRAME_SIZE));
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Connect { explanation: explain(&e, &server_name).unwrap_or_else(|| error_chain(&e)), address })
}

/// The largest HTTP/2 frame the client accepts (docs/performance.md#frame-size).
pub const CLIENT_MAX_FRAME_SIZE: u32 = 1 << 20;

/// When to use ProcessStream instead of unary Process (v1 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StreamMode {
    /// Stream images larger than [`STREAM_AUTO_BYTES`].
    #[default]
    Auto,
    Always,
    Never,
}

/// Images larger than this are streamed in [`StreamMode::Auto`]: well under
/// the default unary message limit (256 MiB), so that large images never
/// need one huge message on either side.
pub const STREAM_AUTO_BYTES: usize = 64 << 20;

/// How calls are made.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Compress requests (and accept compressed responses) with this.
    pub compression: Option<tonic::codec::CompressionEncoding>,
    pub stream: StreamMode,
    /// Chunk size when streaming; 0 = [`stream::DEFAULT_CHUNK_BYTES`].
    pub chunk_bytes: usize,
}

/// Applies `ops` to `image` through `api`, with default call options.
pub async fn process(channel: Channel, api: Api, image: RawImage, ops: &[Op], server_name: &str) -> Result<RawImage, ClientError> {
    process_with(channel, api, image, ops, server_name, &CallOptions::default()).await
}

/// Applies `ops` to `image` through `api`, as `options` say.
pub async fn process_with(
    channel: Channel,
    api: Api,
    image: RawImage,
    ops: &[Op],
    server_name: &str,
    options: &CallOptions,
) -> Result<RawImage, ClientError> {
    let streamed = match options.stream {
        StreamMode::Always => true,
        StreamMode::Never => false,
        StreamMode::Auto => image.data.len() > STREAM_AUTO_BYTES,
    };
    if api == Api::V1 && streamed {
        let chunk = if options.chunk_bytes == 0 { stream::DEFAULT_CHUNK_BYTES } else { options.chunk_bytes };
        return stream::process_stream(channel, image, ops, chunk, server_name, options.compression).await;
    }
    let status_err = |s: tonic::Status| status_error(s, server_name);
    match api {
        Api::V1 => {
            let mut client = ImageServiceClient::new(channel)
                .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
            if let Some(enc) = options.compression {
                client = client.send_compressed(enc).accept_compressed(enc);
            }
            let operations = ops
                .iter()
                .map(|op| v1::Operation {
                    kind: Some(match *op {
                        Op::Rotate(t) => Kind::Rotate(v1::Rotate { amount: Some(Amount::QuarterTurns(t.count())) }),
                        Op::MeanFilter => Kind::MeanFilter(v1::MeanFilter {}),
                    }),
                })
                .collect();
            let request = v1::ProcessRequest { image: Some(image.into_v1()), operations, output: None };
            let response = client.process(request).await.map_err(status_err)?.into_inner();
            let image = PixelBuffer::from_v1(response.image, u64::MAX).map_err(|e| ClientError::BadResponse(e.to_string()))?;
            Ok(RawImage::from_v1(image.into_v1()))
        }
        Api::Legacy => {
            let mut client = NlImageServiceClient::new(channel)
                .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
            if let Some(enc) = options.compression {
                client = client.send_compressed(enc).accept_compressed(enc);
            }
            let mut current = image.into_legacy();
            for op in ops {
                current = match *op {
                    Op::MeanFilter => client.mean_filter(current).await,
                    Op::Rotate(t) => {
                        let rotation = match t {
                            QuarterTurns::Zero => Rotation::None,
                            QuarterTurns::One => Rotation::NinetyDeg,
                            QuarterTurns::Two => Rotation::OneEightyDeg,
                            QuarterTurns::Three => Rotation::TwoSeventyDeg,
                        };
                        client.rotate_image(NlImageRotateRequest { rotation: rotation as i32, image: Some(current) }).await
                    }
                }
                .map_err(status_err)?
                .into_inner();
            }
            let image = PixelBuffer::from_legacy(Some(current), u64::MAX).map_err(|e| ClientError::BadResponse(e.to_string()))?;
            Ok(RawImage::from_v1(image.into_v1()))
        }
    }
}

/// The delay after which the server says a refused call may be retried:
/// `google.rpc.RetryInfo` in the status details, else the
/// `grpc-retry-pushback-ms` header (imgsvc sends both, equal).
pub fn retry_delay(status: &tonic::Status) -> Option<std::time::Duration> {
    use tonic_types::StatusExt;
    if let Some(delay) = status.get_details_retry_info().and_then(|info| info.retry_delay) {
        return Some(delay);
    }
    let ms = status.metadata().get("grpc-retry-pushback-ms")?.to_str().ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

pub(crate) fn status_error(status: tonic::Status, server_name: &str) -> ClientError {
    let explanation = explain(&status, server_name);
    let retry_after = retry_delay(&status);
    let hint = match status.code() {
        tonic::Code::Unauthenticated => " (the client certificate was accepted by TLS but names no tenant of this server)".into(),
        _ => String::new(),
    };
    match explanation {
        // Transport failures surface as UNKNOWN/UNAVAILABLE statuses whose
        // message is opaque; the cause chain says what happened.
        Some(text) if matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Internal) => {
            ClientError::Status { code: status.code(), message: text, hint, retry_after }
        }
        _ => ClientError::Status { code: status.code(), message: status.message().to_string(), hint, retry_after },
    }
}

/// All messages in an error's source chain, joined.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// Says in words which side refused what, from an error's cause chain.
pub fn explain(err: &(dyn std::error::Error + 'static), server_name: &str) -> Option<String> {
    let chain = error_chain(err);
    let lower = chain.to_ascii_lowercase();
    // "invalid peer certificate" is this client refusing the server's
    // certificate; "received fatal alert" is the server refusing ours.
    let text = if lower.contains("invalid peer certificate") {
        if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            format!(
                "this client refused the server's certificate: it is not valid for the name {server_name:?} (pass the name it was issued for with --server-name)"
            )
        } else if lower.contains("expired") {
            "this client refused the server's certificate: it has expired".to_string()
        } else if lower.contains("unknownissuer") || lower.contains("badsignature") {
            "this client refused the server's certificate: it is not signed by the CA given with --ca".to_string()
        } else {
            "this client refused the server's certificate".to_string()
        }
    } else if lower.contains("certificaterequired") {
        "the server requires a client certificate and refused the connection without one".to_string()
    } else if lower.contains("alert") && (lower.contains("unknownca") || lower.contains("badcertificate") || lower.contains("decrypterror"))
    {
        "the server refused the client certificate: it is not signed by a CA the server trusts, or not for client authentication"
            .to_string()
    } else if lower.contains("alert") && lower.contains("unsupportedcertificate") {
        "the server refused the client certificate: it is not issued for client authentication (extended key usage)".to_string()
    } else if lower.contains("alert") && lower.contains("certificaterevoked") {
        "the server refused the client certificate: it has been revoked".to_string()
    } else if lower.contains("alert") && lower.contains("certificateexpired") {
        "the server refused the client certificate: it has expired or is not yet valid".to_string()
    } else if lower.contains("closed the connection right after the tls handshake") {
        "the server closed the connection right after the TLS handshake (it most likely refused the client certificate; its log says why)"
            .to_string()
    } else if lower.contains("connection refused") {
        "nothing accepts connections at that address (is the server running?)".to_string()
    } else if lower.contains("timed out") || lower.contains("deadline") {
        "timed out".to_string()
    } else {
        return None;
    };
    Some(format!("{text} [{chain}]"))
}
