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
Then list crl.pem in tls.crl_files (servers reload it when it changes).

CA rotation without downtime (docs/certificate-rotation.md):
  gen-certs --out certs/prod --new-ca            # 1. new CA beside the old; trust ca-bundle.pem (both)
  gen-certs --out certs/prod --tenant team-a --server-name imgsvc.example.org
                                                 # 2. reissue: now from the new CA
  gen-certs --out certs/prod --retire-old-ca     # 3. the new CA becomes ca.pem; the bundle holds it alone

Leaf certificates are valid 365 days by default (--days), CAs 3650 days.";

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
    /// Start a CA rotation: a new CA beside the existing one (kept), and
    /// ca-bundle.pem trusting both. Certificates issued from now on
    /// (--tenant, --server-name, here or later) come from the new CA.
    #[arg(long, conflicts_with_all = ["force", "revoke"])]
    new_ca: bool,
    /// Finish a CA rotation: the new CA becomes ca.pem, ca-bundle.pem holds
    /// it alone, crl.pem keeps its CRL only.
    #[arg(long, conflicts_with_all = ["tenants", "server_names", "force", "revoke", "new_ca"])]
    retire_old_ca: bool,
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
    if args.retire_old_ca {
        let report = pki::retire_old_ca(&args.out).map_err(|e| (1, e.into()))?;
        for path in &report.written {
            println!("wrote {}", path.display());
        }
        for path in &report.removed {
            println!("removed {}", path.display());
        }
        println!(
            "retired the CA \"{}\": {} now holds \"{}\" alone; servers that load it refuse certificates of the retired CA",
            report.retired_subject,
            pki::PkiPaths::new(&args.out).ca_bundle().display(),
            report.ca_subject
        );
        return Ok(());
    }
    if args.new_ca {
        let report = pki::start_ca_rotation(&args.out, &trust_domain).map_err(|e| (1, e.into()))?;
        for path in &report.written {
            println!("wrote {}", path.display());
        }
        println!(
            "started a CA rotation: trust both CAs, i.e. install {} as the servers' tls.client_ca and the clients' --ca:\n  \"{}\" (current)\n  \"{}\" (new: issues every certificate from now on)",
            report.bundle.display(),
            report.old_subject,
            report.new_subject
        );
    }
    let mut req = pki::IssueRequest::new(&args.out, trust_domain);
    req.server_names = (!args.server_names.is_empty()).then_some(args.server_names);
    req.tenants = tenants;
    req.leaf_days = args.days;
    req.force_new_ca = args.force;
    if args.new_ca && req.tenants.is_empty() && req.server_names.is_none() {
        return Ok(());
    }
    let report = pki::issue(&req).map_err(|e| (1, e.into()))?;
    if report.from_new_ca {
        println!("issued from the new CA in {} (a CA rotation is in progress)", args.out.display());
    } else if report.reused_ca {
        println!("reused the CA in {}", args.out.display());
    }
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    Ok(())
}
