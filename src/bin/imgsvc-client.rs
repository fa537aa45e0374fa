//! imgsvc-client: rotate and filter image files through an imgsvc (or any
//! NLImageService) server over mutual TLS. See `imgsvc-client --help`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use imgsvc::{
    EXIT_CONFIG, EXIT_USAGE,
    client::{
        self, Api, Balancer, CallOptions, Endpoint, Op, StreamMode, Target,
        batch::{self, Job, JobSettings, RunOptions},
        credentials, image_io,
    },
    imagefile::{DEFAULT_JPEG_QUALITY, DecodeOptions, Encoding},
    imaging::QuarterTurns,
    loadgen::{self, BenchApi, BenchConfig, BenchFormat, BenchOp, StopAfter},
    tls::ClientCredentials,
};

const EXAMPLES: &str = "\
Examples:
  imgsvc-client --host 127.0.0.1 --port 50051 \\
      --ca certs/dev/ca.pem --cert certs/dev/client-dev.pem --key certs/dev/client-dev-key.pem \\
      --input photo.jpg --output rotated.png --rotate NINETY_DEG --mean
  imgsvc-client --config ~/.config/imgsvc/client.toml --input a.png --output b.png --mean
  imgsvc-client --input photos/ --output out/ --format webp -j 8 --rotate NINETY_DEG
  imgsvc-client --input scan.tif --page 2 --output page2.png --mean
  imgsvc-client --api legacy ... # speak NLImageService to any server of that protocol
  imgsvc-client completions bash > ~/.local/share/bash-completion/completions/imgsvc-client
  imgsvc-client --endpoint imgsvc-1:50051 --endpoint imgsvc-2:50051 ... # balance, retry on another server

Input: PNG, JPEG, TIFF (--page), WebP, BMP, GIF (first frame); EXIF orientation
is applied. Output: PNG, JPEG (--quality), TIFF, WebP (lossless), BMP, by
extension or --format. Several inputs or a directory (recursive) go to an
output directory, relative paths kept; existing outputs are skipped unless
--overwrite. Credentials come from --ca/--cert/--key, else the client config
file, else IMGSVC_CA/IMGSVC_CERT/IMGSVC_KEY. Rotations are counter-clockwise.
Exit codes: 0 ok, 1 failure (in a batch: any image failed), 64 usage error,
65 bad input image, 69 server unreachable or refused the connection, 78 client
config error.";

/// Rotate (counter-clockwise, by quarter turns) and 3x3-mean-filter images through imgsvc.
#[derive(Parser, Debug)]
#[command(
    name = "imgsvc-client",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a shell completion script to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Load-test a server: N concurrent callers send one generated image
    /// until a request count or a duration; prints throughput, latency
    /// percentiles and errors by status code. Bounded: it always stops.
    #[command(after_help = BENCH_EXAMPLES)]
    // Boxed: the bench flags are most of the enum's size (clippy::large_enum_variant).
    Bench(Box<BenchArgs>),
}

const BENCH_EXAMPLES: &str = "\
Examples:
  imgsvc-client bench --ca ca.pem --cert client.pem --key client-key.pem \\
      --op mean --width 1024 --height 1024 --format rgb8 --concurrency 4 --duration 20
  imgsvc-client bench ... --op rotate --width 64 --height 64 --format gray8 --concurrency 16 --requests 10000 --json
  imgsvc-client bench ... --op mean --width 512 --height 512 --duration 30 --report bench.html";

/// Where the server is and who we are.
#[derive(clap::Args, Debug)]
struct ConnArgs {
    /// A server as HOST:PORT; repeat for several. A name that resolves to
    /// several addresses counts as several servers. Calls go round-robin and
    /// are retried on another server when one is unreachable or going away.
    /// Replaces --host/--port.
    #[arg(long, value_name = "HOST:PORT", value_parser = Endpoint::parse, conflicts_with_all = ["host", "port"])]
    endpoint: Vec<Endpoint>,
    /// Server host name or address (default 127.0.0.1, or `host` in the client config).
    #[arg(long)]
    host: Option<String>,
    /// Server port (default 50051, or `port` in the client config).
    #[arg(long)]
    port: Option<u16>,
    /// CA certificate that signed the server's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate naming the tenant (PEM).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Private key of the client certificate (PEM).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Name to expect in the server certificate (default: --host).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Client config file (default: $XDG_CONFIG_HOME/imgsvc/client.toml or ~/.config/imgsvc/client.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Protocol: v1 (one round trip for all operations) or legacy (NLImageService: mean, then rotate).
    #[arg(long, value_enum, default_value = "v1")]
    api: ApiArg,
    /// Deadline for each call, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    timeout: u64,
    /// Compress requests with gzip or zstd (and accept compressed answers).
    #[arg(long, value_enum, value_name = "ALGORITHM")]
    compress: Option<CompressArg>,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// What each request asks for: rotate (90°), mean, or none (rotate by 0°: transport only).
    #[arg(long, value_enum, default_value = "rotate")]
    op: BenchOpArg,
    /// Width of the generated image.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65535))]
    width: u32,
    /// Height of the generated image.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65535))]
    height: u32,
    /// Pixel format of the generated image.
    #[arg(long, value_enum, default_value = "rgb8")]
    format: BenchFormatArg,
    /// Callers sending at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=4096))]
    concurrency: u16,
    /// Stop after this many requests.
    #[arg(long, conflicts_with = "duration")]
    requests: Option<u64>,
    /// Stop after this many seconds (default 10 when --requests is not given).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also write an HTML report (latency histogram, percentiles,
    /// throughput over time; one self-contained file) to FILE.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchOpArg {
    Rotate,
    Mean,
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchFormatArg {
    Gray8,
    Rgb8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompressArg {
    Gzip,
    Zstd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StreamArg {
    Auto,
    Always,
    Never,
}

#[derive(clap::Args, Debug)]
struct Args {
    #[command(flatten)]
    conn: ConnArgs,
    /// Input image(s) or directories (searched recursively for .png .jpg .jpeg .tif .tiff .webp .bmp .gif).
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Output image, or directory for several inputs or a directory input.
    /// Written atomically: never left half-written.
    #[arg(long, value_name = "PATH", required = true)]
    output: Option<PathBuf>,
    /// Output format (default: from the output's extension, or the input's in a batch).
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<FormatArg>,
    /// JPEG quality, 1-100 (JPEG outputs only; the others are lossless).
    #[arg(long, value_name = "1-100", default_value_t = DEFAULT_JPEG_QUALITY, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    /// Page of a multi-page TIFF input, from 0 (the first page).
    #[arg(long, value_name = "N", default_value_t = 0)]
    page: u32,
    /// Requests in flight at once (one connection).
    #[arg(short = 'j', long = "jobs", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
    /// Replace existing outputs in a batch (default: skip them).
    #[arg(long)]
    overwrite: bool,
    /// Keep going after an image fails (default: stop starting new ones).
    #[arg(long)]
    continue_on_error: bool,
    /// Counter-clockwise rotation.
    #[arg(long, value_enum, value_name = "ROTATION")]
    rotate: Option<Rotation>,
    /// Apply the 3x3 mean filter (before the rotation).
    #[arg(long)]
    mean: bool,
    /// Use ProcessStream (v1): auto streams images over 64 MiB.
    #[arg(long, value_enum, default_value = "auto")]
    stream: StreamArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Png,
    #[value(alias = "jpg")]
    Jpeg,
    #[value(alias = "tif")]
    Tiff,
    Webp,
    Bmp,
}

impl From<FormatArg> for Encoding {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Png => Encoding::Png,
            FormatArg::Jpeg => Encoding::Jpeg,
            FormatArg::Tiff => Encoding::Tiff,
            FormatArg::Webp => Encoding::WebP,
            FormatArg::Bmp => Encoding::Bmp,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
enum Rotation {
    None,
    NinetyDeg,
    OneEightyDeg,
    TwoSeventyDeg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ApiArg {
    V1,
    Legacy,
}

/// An error with the exit code it deserves.
struct Failure(u8, anyhow::Error);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    let bench = match cli.command {
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "imgsvc-client", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Bench(b)) => Some(*b),
        None => None,
    };
    let args = cli.args;
    if bench.is_none() && args.rotate.is_none() && !args.mean {
        eprintln!("imgsvc-client: error: nothing to do: give --rotate ROTATION and/or --mean (see --help)");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = match (runtime, bench) {
        (Ok(rt), Some(bench)) => rt.block_on(run_bench(bench)),
        (Ok(rt), None) => rt.block_on(run(args)),
        (Err(e), _) => Err(Failure(1, anyhow::Error::new(e))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, err)) => {
            eprintln!("imgsvc-client: error: {err:#}");
            ExitCode::from(code)
        }
    }
}

/// Resolves where to connect and the credentials: flags, then the client
/// config file, then the environment.
fn connection(conn: ConnArgs) -> Result<(Connection, ClientCredentials, CallOptions), Failure> {
    let env = |k: &str| std::env::var(k).ok();
    let (file, looked_in) =
        credentials::ClientConfigFile::discover(conn.config.as_deref(), &env).map_err(|e| Failure(EXIT_CONFIG as u8, e.into()))?;
    let paths =
        credentials::resolve((conn.ca, conn.cert, conn.key), &file, &looked_in, &env).map_err(|e| Failure(EXIT_CONFIG as u8, e.into()))?;
    let creds = ClientCredentials::from_files(&paths.ca, &paths.cert, &paths.key).map_err(|e| Failure(EXIT_CONFIG as u8, e.into()))?;
    let endpoints = if conn.endpoint.is_empty() {
        let host = conn.host.or(file.host).unwrap_or_else(|| "127.0.0.1".into());
        vec![Endpoint { host: host.trim_matches(['[', ']']).to_string(), port: conn.port.or(file.port).unwrap_or(50051) }]
    } else {
        conn.endpoint
    };
    let target = Connection {
        endpoints,
        server_name: conn.server_name.or(file.server_name),
        template: Target {
            host: String::new(),
            port: 0,
            server_name: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(conn.timeout),
        },
    };
    let call = CallOptions {
        compression: conn.compress.map(|c| match c {
            CompressArg::Gzip => tonic::codec::CompressionEncoding::Gzip,
            CompressArg::Zstd => tonic::codec::CompressionEncoding::Zstd,
        }),
        ..CallOptions::default()
    };
    Ok((target, creds, call))
}

/// The servers to talk to.
struct Connection {
    endpoints: Vec<Endpoint>,
    server_name: Option<String>,
    template: Target,
}

impl Connection {
    fn named(&self) -> String {
        self.endpoints.iter().map(Endpoint::to_string).collect::<Vec<_>>().join(", ")
    }

    async fn balancer(&self, creds: ClientCredentials) -> Result<Balancer, Failure> {
        Balancer::resolve(&self.endpoints, self.server_name.as_deref(), &self.template, creds).await.map_err(|e| Failure(69, e.into()))
    }
}

async fn run_bench(args: BenchArgs) -> Result<(), Failure> {
    let api = match args.conn.api {
        ApiArg::V1 => BenchApi::V1,
        ApiArg::Legacy => BenchApi::Legacy,
    };
    let (target, creds, _) = connection(args.conn)?;
    let config = BenchConfig {
        op: match args.op {
            BenchOpArg::Rotate => BenchOp::Rotate,
            BenchOpArg::Mean => BenchOp::Mean,
            BenchOpArg::None => BenchOp::None,
        },
        width: args.width,
        height: args.height,
        format: match args.format {
            BenchFormatArg::Gray8 => BenchFormat::Gray8,
            BenchFormatArg::Rgb8 => BenchFormat::Rgb8,
        },
        concurrency: args.concurrency.into(),
        stop: match (args.requests, args.duration) {
            (Some(n), _) => StopAfter::Requests(n),
            (None, d) => StopAfter::Duration(Duration::from_secs(d.unwrap_or(10))),
        },
        api,
    };
    // The load goes to one server: the first address of the first endpoint.
    let servers = target.balancer(creds.clone()).await?;
    let channel = client::connect(&servers.targets()[0], &creds).await.map_err(|e| Failure(69, e.into()))?;
    let (report, samples) = loadgen::run_recorded(channel, &config).await;
    if let Some(path) = &args.report {
        std::fs::write(path, loadgen::html::render(&report, &samples))
            .map_err(|e| Failure(1, anyhow::Error::new(e).context(format!("cannot write the report {}", path.display()))))?;
    }
    let text = if args.json { serde_json::to_string(&report).map_err(|e| Failure(1, e.into()))? } else { report.to_text() };
    print_report(&text)?;
    if report.error_count() > 0 {
        return Err(Failure(1, anyhow::anyhow!("{} requests failed", report.error_count())));
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), Failure> {
    let api = args.conn.api;
    let (target, creds, mut call) = connection(args.conn)?;
    call.stream = match args.stream {
        StreamArg::Auto => StreamMode::Auto,
        StreamArg::Always => StreamMode::Always,
        StreamArg::Never => StreamMode::Never,
    };
    if matches!(api, ApiArg::Legacy) && call.stream == StreamMode::Always {
        return Err(Failure(EXIT_USAGE as u8, anyhow::anyhow!("--stream always needs --api v1: NLImageService has no streaming")));
    }

    // Every output is decided before contacting the server.
    let output = args.output.unwrap_or_default();
    let plan = batch::plan(&args.input, &output, args.format.map(Encoding::from)).map_err(|e| {
        let code = if matches!(e, batch::PlanError::Input { .. }) { 65 } else { EXIT_USAGE as u8 };
        Failure(code, e.into())
    })?;
    let mut ops = Vec::new();
    if args.mean {
        ops.push(Op::MeanFilter);
    }
    if let Some(r) = args.rotate {
        ops.push(Op::Rotate(match r {
            Rotation::None => QuarterTurns::Zero,
            Rotation::NinetyDeg => QuarterTurns::One,
            Rotation::OneEightyDeg => QuarterTurns::Two,
            Rotation::TwoSeventyDeg => QuarterTurns::Three,
        }));
    }
    let settings = JobSettings {
        api: match api {
            ApiArg::V1 => Api::V1,
            ApiArg::Legacy => Api::Legacy,
        },
        ops,
        server_name: target.server_name.clone().unwrap_or_else(|| target.endpoints[0].host.clone()),
        decode: DecodeOptions { encoding: None, page: args.page, limits: image_io::client_decode_limits() },
        jpeg_quality: args.quality,
        call,
    };

    if plan.single {
        let job = &plan.jobs[0];
        return single(&target, creds, job, &settings).await;
    }
    let servers = target.balancer(creds).await?;
    let options = RunOptions { concurrency: args.jobs.into(), overwrite: args.overwrite, continue_on_error: args.continue_on_error };
    let summary = batch::run(std::sync::Arc::new(servers), plan.jobs, settings, options).await;
    eprintln!("imgsvc-client: {summary}");
    if summary.failed > 0 {
        return Err(Failure(1, anyhow::anyhow!("{} of the images failed", summary.failed)));
    }
    Ok(())
}

/// The original form: the input is read before connecting (exit 65 without
/// a server), an existing output is replaced.
async fn single(target: &Connection, creds: ClientCredentials, job: &Job, settings: &JobSettings) -> Result<(), Failure> {
    let job_failure = |e: batch::JobError| {
        let code = e.exit_code();
        let err = match e {
            batch::JobError::Request(e) => anyhow::Error::new(e).context(format!("request to {}", target.named())),
            batch::JobError::Output(e) => anyhow::Error::new(e).context(format!("writing {}", job.output.display())),
            other => other.into(),
        };
        Failure(code, err)
    };
    let (image, note) = batch::read_input(job, settings).map_err(job_failure)?;
    if let Some(note) = note {
        eprintln!("imgsvc-client: note: {note}");
    }
    let servers = target.balancer(creds).await?;
    if let Some(note) = batch::finish(&servers, job, image, settings).await.map_err(job_failure)? {
        eprintln!("imgsvc-client: note: {note}");
    }
    Ok(())
}

/// Prints the bench report. A closed pipe (`| head`) is not an error worth
/// a panic: the reader has what it wanted.
fn print_report(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure(1, anyhow::Error::new(e).context("cannot write the report"))),
        _ => Ok(()),
    }
}
