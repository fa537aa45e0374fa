//! imgsvc-client: rotate and filter image files through an imgsvc (or any
//! NLImageService) server over mutual TLS. See `imgsvc-client --help`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use imgsvc::{
    client::{credentials, image_io, Api, Balancer, ClientError, Endpoint, Op, Target},
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
  imgsvc-client --api legacy ... # speak NLImageService to any server of that protocol
  imgsvc-client --endpoint imgsvc-1:50051 --endpoint imgsvc-2:50051 ... # balance, retry on another server

Credentials come from --ca/--cert/--key, else the client config file, else
IMGSVC_CA/IMGSVC_CERT/IMGSVC_KEY. Rotations are counter-clockwise.
Exit codes: 0 ok, 1 failure, 64 usage error, 65 bad input image, 69 server
unreachable or refused the connection, 78 client config error.";

/// Rotate (counter-clockwise, by quarter turns) and 3x3-mean-filter images through imgsvc.
#[derive(Parser, Debug)]
#[command(name = "imgsvc-client", version, after_help = EXAMPLES)]
struct Args {
    /// Server host name or address (default 127.0.0.1, or `host` in the client config).
    #[arg(long)]
    host: Option<String>,
    /// Server port (default 50051, or `port` in the client config).
    #[arg(long)]
    port: Option<u16>,
    /// A server as HOST:PORT; repeat for several. A name that resolves to
    /// several addresses counts as several servers. Calls go round-robin and
    /// are retried on another server when one is unreachable or going away.
    /// Replaces --host/--port.
    #[arg(long, value_name = "HOST:PORT", value_parser = Endpoint::parse, conflicts_with_all = ["host", "port"])]
    endpoint: Vec<Endpoint>,
    /// Input image (PNG or JPEG; gray, RGB, with alpha, 8 or 16 bit).
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Output image; the extension picks the format (.png, .jpg, .jpeg).
    /// Written atomically: never left half-written.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
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
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    if args.rotate.is_none() && !args.mean {
        eprintln!("imgsvc-client: error: nothing to do: give --rotate ROTATION and/or --mean (see --help)");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
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

    // Everything about the files is checked before contacting the server.
    let out_format = image_io::output_format(&args.output).map_err(|e| Failure(EXIT_USAGE as u8, e.into()))?;
    let mut image = image_io::read_image(&args.input).map_err(|e| Failure(65, e.into()))?;
    let api = match args.api {
        ApiArg::V1 => Api::V1,
        ApiArg::Legacy => Api::Legacy,
    };
    if api == Api::Legacy {
        let (converted, note) = image.for_legacy();
        image = converted;
        if let Some(note) = note {
            eprintln!("imgsvc-client: note: {note}");
        }
    }
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

    let endpoints = if args.endpoint.is_empty() {
        let host = args.host.or(file.host).unwrap_or_else(|| "127.0.0.1".into());
        vec![Endpoint { host: host.trim_matches(['[', ']']).to_string(), port: args.port.or(file.port).unwrap_or(50051) }]
    } else {
        args.endpoint
    };
    let named: Vec<String> = endpoints.iter().map(Endpoint::to_string).collect();
    let template = Target {
        host: String::new(),
        port: 0,
        server_name: None,
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(args.timeout),
    };
    let server_name = args.server_name.or(file.server_name);
    let balancer = Balancer::resolve(&endpoints, server_name.as_deref(), &template, creds).await.map_err(|e| Failure(69, e.into()))?;
    let (result, _) = balancer.process(api, &image, &ops).await.map_err(|e| match e {
        ClientError::Connect { .. } => Failure(69, e.into()),
        ClientError::Status { code: tonic::Code::Unavailable | tonic::Code::Unknown, .. } => {
            Failure(69, anyhow::Error::new(e).context(format!("request to {}", named.join(", "))))
        }
        _ => Failure(1, anyhow::Error::new(e).context(format!("request to {}", named.join(", ")))),
    })?;
    if let Some(note) = image_io::write_image(&args.output, &result, out_format)
        .with_context(|| format!("writing {}", args.output.display()))
        .map_err(|e| Failure(1, e))?
    {
        eprintln!("imgsvc-client: note: {note}");
    }
    Ok(())
}
