//! imgsvc-client: rotate and filter image files through an imgsvc (or any
//! NLImageService) server over mutual TLS. See `imgsvc-client --help`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use imgsvc::{
    client::{
        self,
        batch::{self, Job, JobSettings, RunOptions},
        credentials, image_io, Api, Op, Target,
    },
    codec::{DecodeOptions, Encoding, DEFAULT_JPEG_QUALITY},
    imaging::QuarterTurns,
    tls::ClientCredentials,
    EXIT_CONFIG, EXIT_USAGE,
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
}

#[derive(clap::Args, Debug)]
struct Args {
    /// Server host name or address (default 127.0.0.1, or `host` in the client config).
    #[arg(long)]
    host: Option<String>,
    /// Server port (default 50051, or `port` in the client config).
    #[arg(long)]
    port: Option<u16>,
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
    if let Some(Command::Completions { shell }) = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "imgsvc-client", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let args = cli.args;
    if args.rotate.is_none() && !args.mean {
        eprintln!("imgsvc-client: error: nothing to do: give --rotate ROTATION and/or --mean (see --help)");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(Failure(1, anyhow::Error::new(e))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, err)) => {
            eprintln!("imgsvc-client: error: {err:#}");
            ExitCode::from(code)
        }
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let env = |k: &str| std::env::var(k).ok();
    let (file, looked_in) = credentials::ClientConfigFile::discover(args.config.as_deref(), &env)
        .map_err(|e| Failure(EXIT_CONFIG as u8, e.into()))?;
    let paths = credentials::resolve((args.ca, args.cert, args.key), &file, &looked_in, &env)
        .map_err(|e| Failure(EXIT_CONFIG as u8, e.into()))?;
    let creds = ClientCredentials::from_files(&paths.ca, &paths.cert, &paths.key)
        .map_err(|e| Failure(EXIT_CONFIG as u8, e.into()))?;

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
    let host = args.host.or(file.host).unwrap_or_else(|| "127.0.0.1".into());
    let target = Target {
        server_name: args.server_name.or(file.server_name),
        port: args.port.or(file.port).unwrap_or(50051),
        host,
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(args.timeout),
    };
    let settings = JobSettings {
        api: match args.api {
            ApiArg::V1 => Api::V1,
            ApiArg::Legacy => Api::Legacy,
        },
        ops,
        server_name: target.server_name.clone().unwrap_or_else(|| target.host.clone()),
        decode: DecodeOptions { encoding: None, page: args.page, limits: image_io::client_decode_limits() },
        jpeg_quality: args.quality,
    };

    if plan.single {
        let job = &plan.jobs[0];
        return single(&target, &creds, job, &settings).await;
    }
    let channel = client::connect(&target, &creds).await.map_err(|e| Failure(69, e.into()))?;
    let options = RunOptions { concurrency: args.jobs.into(), overwrite: args.overwrite, continue_on_error: args.continue_on_error };
    let summary = batch::run(channel, plan.jobs, settings, options).await;
    eprintln!("imgsvc-client: {summary}");
    if summary.failed > 0 {
        return Err(Failure(1, anyhow::anyhow!("{} of the images failed", summary.failed)));
    }
    Ok(())
}

/// The original form: the input is read before connecting (exit 65 without
/// a server), an existing output is replaced.
async fn single(target: &Target, creds: &ClientCredentials, job: &Job, settings: &JobSettings) -> Result<(), Failure> {
    let job_failure = |e: batch::JobError| {
        let code = e.exit_code();
        let err = match e {
            batch::JobError::Request(e) => anyhow::Error::new(e).context(format!("request to {}", target.address())),
            batch::JobError::Output(e) => anyhow::Error::new(e).context(format!("writing {}", job.output.display())),
            other => other.into(),
        };
        Failure(code, err)
    };
    let (image, note) = batch::read_input(job, settings).map_err(job_failure)?;
    if let Some(note) = note {
        eprintln!("imgsvc-client: note: {note}");
    }
    let channel = client::connect(target, creds).await.map_err(|e| Failure(69, e.into()))?;
    if let Some(note) = batch::finish(channel, job, image, settings).await.map_err(job_failure)? {
        eprintln!("imgsvc-client: note: {note}");
    }
    Ok(())
}
