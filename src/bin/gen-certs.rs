//! gen-certs: a CA, a server certificate and per-tenant client certificates
//! for imgsvc. Thin wrapper over `imgsvc::pki`.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use imgsvc::{
    EXIT_USAGE,
    identity::{TenantId, TrustDomain},
    pki,
};

const EXAMPLES: &str = "\
Examples:
  gen-certs --out certs/prod --trust-domain example.org --server-name imgsvc.example.org --tenant team-a
  gen-certs --out certs/prod --trust-domain example.org --tenant team-b   # reuses the CA: team-a stays valid

Writes ca.pem, ca-key.pem, server.pem, server-key.pem and per tenant
client-<tenant>.pem, client-<tenant>-key.pem. Keys are mode 0600.
An existing CA in --out is reused; replacing it takes --force.

Revocation:
  gen-certs --out certs/prod --revoke team-a   # adds team-a's certificate to certs/prod/crl.pem
Then list crl.pem in tls.crl_files and reload the server (SIGHUP).";

/// Create a CA, server and per-tenant client certificates for imgsvc.
#[derive(Parser, Debug)]
#[command(name = "gen-certs", version, after_help = EXAMPLES)]
struct Args {
    /// Directory for the PEM files (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// SPIFFE trust domain that client certificates name tenants in.
    #[arg(long, default_value = "imgsvc.local")]
    trust_domain: String,
    /// DNS name or IP address for the server certificate (repeatable).
    /// Default when the directory has no server certificate yet: localhost, 127.0.0.1, ::1.
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Issue a client certificate for this tenant (repeatable).
    #[arg(long = "tenant", value_name = "NAME")]
    tenants: Vec<String>,
    /// Validity of server and client certificates, in days.
    #[arg(long, default_value_t = pki::DEFAULT_LEAF_DAYS)]
    days: u32,
    /// Replace an existing CA (every certificate it issued stops working).
    #[arg(long)]
    force: bool,
    /// Revoke this tenant's current client certificate: add it to
    /// DIR/crl.pem, signed by the CA in DIR (repeatable).
    #[arg(long = "revoke", value_name = "TENANT", conflicts_with_all = ["tenants", "server_names", "force"])]
    revoke: Vec<String>,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, err)) => {
            eprintln!("gen-certs: error: {err:#}");
            ExitCode::from(code)
        }
    }
}

fn run(args: Args) -> Result<(), (u8, anyhow::Error)> {
    let usage = |e: anyhow::Error| (EXIT_USAGE as u8, e);
    let trust_domain = TrustDomain::parse(&args.trust_domain).map_err(|e| usage(e.into()))?;
    let tenants = args.tenants.iter().map(|t| TenantId::parse(t)).collect::<Result<Vec<_>, _>>().map_err(|e| usage(e.into()))?;
    if !args.revoke.is_empty() {
        for name in &args.revoke {
            let tenant = TenantId::parse(name).map_err(|e| usage(e.into()))?;
            let report = pki::revoke(&args.out, &tenant).map_err(|e| (1, e.into()))?;
            println!(
                "revoked tenant {tenant} (serial {}); {} now lists {} certificate(s)",
                report.serial,
                report.crl.display(),
                report.revoked_total
            );
        }
        return Ok(());
    }
    let mut req = pki::IssueRequest::new(&args.out, trust_domain);
    req.server_names = (!args.server_names.is_empty()).then_some(args.server_names);
    req.tenants = tenants;
    req.leaf_days = args.days;
    req.force_new_ca = args.force;
    let report = pki::issue(&req).map_err(|e| (1, e.into()))?;
    if report.reused_ca {
        println!("reused the CA in {}", args.out.display());
    }
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    Ok(())
}
