//! A bounded load generator for imgsvc (the engine of `imgsvc-client
//! bench`): N concurrent callers send one pre-built request repeatedly until
//! a request count or a duration is reached, and the report gives
//! throughput, latency percentiles and errors by status code.
//!
//! The request is built once and shared (`Bytes` clones are reference
//! counts), so the generator itself costs little per call.
//!
//! A RESOURCE_EXHAUSTED refusal that says when to retry
//! (`google.rpc.RetryInfo` or `grpc-retry-pushback-ms`) is retried after
//! that delay, at most [`MAX_RETRIES`] times per call and never after more
//! than [`crate::client::balance::MAX_RETRY_DELAY`]; the report counts the
//! retries, and a call's latency runs from its first attempt to its answer.
//! [`run_recorded`] also keeps every call's finish time and latency, for
//! the HTML report ([`html`]).

pub mod html;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::Serialize;
use tonic::transport::Channel;

use crate::{
    imaging::QuarterTurns,
    proto::{
        nlimage::{NlImage, NlImageRotateRequest, nl_image_service_client::NlImageServiceClient},
        v1::{self, image_service_client::ImageServiceClient},
    },
};

/// What each request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchOp {
    /// Rotate 90° counter-clockwise.
    Rotate,
    /// 3×3 mean filter.
    Mean,
    /// Rotate by 0°: transport and validation only.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchFormat {
    Gray8,
    Rgb8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchApi {
    V1,
    Legacy,
}

/// When to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopAfter {
    Requests(u64),
    Duration(Duration),
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub op: BenchOp,
    pub width: u32,
    pub height: u32,
    pub format: BenchFormat,
    pub concurrency: usize,
    pub stop: StopAfter,
    pub api: BenchApi,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BenchReport {
    pub op: BenchOp,
    pub api: BenchApi,
    pub width: u32,
    pub height: u32,
    pub format: BenchFormat,
    pub concurrency: usize,
    pub ok: u64,
    /// Failed calls by gRPC status code name.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Attempts repeated after a refusal that asked for a retry later.
    pub retries: u64,
}

/// Retries per call after refusals that ask for one.
pub const MAX_RETRIES: u32 = 3;

/// One finished call: when it finished (since the run started) and how
/// long it took; `code` is `None` for a success.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub finished: Duration,
    pub latency: Duration,
    pub code: Option<tonic::Code>,
}

impl BenchReport {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// A few human-readable lines.
    pub fn to_text(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        };
        format!(
            "{:?} {}x{} {:?} via {:?}, concurrency {}\n\
             requests: {} ok in {:.2} s = {:.1} req/s\n\
             latency:  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n\
             errors:   {errors}{}",
            self.op,
            self.width,
            self.height,
            self.format,
            self.api,
            self.concurrency,
            self.ok,
            self.elapsed_s,
            self.requests_per_s,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.max_ms,
            if self.retries > 0 {
                format!("\nretries:  {} (after refusals that asked for a retry later)", self.retries)
            } else {
                String::new()
            },
        )
    }
}

/// Runs the load against `channel`. Every caller stops at the bound, so the
/// run ends by itself.
pub async fn run(channel: Channel, config: &BenchConfig) -> BenchReport {
    run_recorded(channel, config).await.0
}

/// [`run`], also returning every call's [`Sample`], in finishing order.
pub async fn run_recorded(channel: Channel, config: &BenchConfig) -> (BenchReport, Vec<Sample>) {
    let request = Arc::new(Request::build(config));
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(config.concurrency);
    for _ in 0..config.concurrency.max(1) {
        let (request, issued, channel, stop) = (request.clone(), issued.clone(), channel.clone(), config.stop);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut retries = 0;
            loop {
                let go = match stop {
                    StopAfter::Requests(n) => issued.fetch_add(1, Ordering::Relaxed) < n,
                    StopAfter::Duration(d) => started.elapsed() < d,
                };
                if !go {
                    break;
                }
                let t0 = Instant::now();
                let mut attempt = 0;
                let code = loop {
                    match request.send(channel.clone()).await {
                        Ok(()) => break None,
                        Err(status) => {
                            let error = crate::client::status_error(status, "");
                            match crate::client::balance::pushed_back(&error) {
                                Some(delay) if attempt < MAX_RETRIES => {
                                    attempt += 1;
                                    retries += 1;
                                    tokio::time::sleep(delay).await;
                                }
                                _ => break Some(error.code().unwrap_or(tonic::Code::Unknown)),
                            }
                        }
                    }
                };
                samples.push(Sample { finished: started.elapsed(), latency: t0.elapsed(), code });
            }
            (samples, retries)
        }));
    }
    let mut samples = Vec::new();
    let mut retries = 0;
    let mut failed_tasks = 0;
    for task in tasks {
        match task.await {
            Ok((s, r)) => {
                samples.extend(s);
                retries += r;
            }
            Err(_) => failed_tasks += 1,
        }
    }
    let elapsed = started.elapsed();
    samples.sort_by_key(|s| s.finished);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for code in samples.iter().filter_map(|s| s.code) {
        *errors.entry(format!("{code:?}")).or_default() += 1;
    }
    if failed_tasks > 0 {
        errors.insert("ClientTaskFailed".into(), failed_tasks);
    }
    let mut latencies: Vec<Duration> = samples.iter().filter(|s| s.code.is_none()).map(|s| s.latency).collect();
    latencies.sort_unstable();
    let report = BenchReport {
        op: config.op,
        api: config.api,
        width: config.width,
        height: config.height,
        format: config.format,
        concurrency: config.concurrency,
        ok: latencies.len() as u64,
        errors,
        elapsed_s: elapsed.as_secs_f64(),
        requests_per_s: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: percentile_ms(&latencies, 50.0),
        p90_ms: percentile_ms(&latencies, 90.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        max_ms: percentile_ms(&latencies, 100.0),
        retries,
    };
    (report, samples)
}

/// The nearest-rank percentile of sorted latencies, in milliseconds (0 for none).
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

/// One pre-built request.
enum Request {
    Legacy { op: BenchOp, image: NlImage },
    V1(v1::ProcessRequest),
}

impl Request {
    fn build(config: &BenchConfig) -> Self {
        let channels = match config.format {
            BenchFormat::Gray8 => 1,
            BenchFormat::Rgb8 => 3,
        };
        let len = config.width as usize * config.height as usize * channels;
        // A deterministic non-constant pattern, so kernels do real work.
        let data = Bytes::from((0..len).map(|i| (i as u32).wrapping_mul(2654435761).rotate_right(13) as u8).collect::<Vec<u8>>());
        match config.api {
            BenchApi::Legacy => Request::Legacy {
                op: config.op,
                image: NlImage {
                    color: config.format == BenchFormat::Rgb8,
                    width: config.width as i32,
                    height: config.height as i32,
                    data,
                },
            },
            BenchApi::V1 => {
                use v1::{operation::Kind, rotate::Amount};
                let turns = match config.op {
                    BenchOp::Rotate => QuarterTurns::One,
                    _ => QuarterTurns::Zero,
                };
                let kind = match config.op {
                    BenchOp::Mean => Kind::MeanFilter(v1::MeanFilter {}),
                    _ => Kind::Rotate(v1::Rotate { amount: Some(Amount::QuarterTurns(turns.count())) }),
                };
                Request::V1(v1::ProcessRequest {
                    image: Some(v1::Image {
                        format: match config.format {
                            BenchFormat::Gray8 => v1::PixelFormat::Gray8,
                            BenchFormat::Rgb8 => v1::PixelFormat::Rgb8,
                        } as i32,
                        width: config.width,
                        height: config.height,
                        data,
                        encoded: None,
                    }),
                    operations: vec![v1::Operation { kind: Some(kind) }],
                    output: None,
                })
            }
        }
    }

    async fn send(&self, channel: Channel) -> Result<(), tonic::Status> {
        const LIMIT: usize = 1 << 30;
        match self {
            Request::Legacy { op, image } => {
                let mut client = NlImageServiceClient::new(channel).max_decoding_message_size(LIMIT).max_encoding_message_size(LIMIT);
                let result = match op {
                    BenchOp::Mean => client.mean_filter(image.clone()).await,
                    BenchOp::Rotate | BenchOp::None => {
                        let rotation = if *op == BenchOp::Rotate { 1 } else { 0 };
                        client.rotate_image(NlImageRotateRequest { rotation, image: Some(image.clone()) }).await
                    }
                };
                result.map(|_| ())
            }
            Request::V1(request) => {
                let mut client = ImageServiceClient::new(channel).max_decoding_message_size(LIMIT).max_encoding_message_size(LIMIT);
                client.process(request.clone()).await.map(|_| ())
            }
        }
    }
}
