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
An existing CA in --out is reused (its key must be yours and mode 0600);
replacing it takes --replace-ca. index.tsv lists every certificate issued.
A tenant that has a certificate gets a new one only with --force; the old
one stays in the index, valid until revoked.

Revocation (writes certs/prod/crl.pem, one CRL per CA, numbered from crl-number):
  gen-certs --out certs/prod --revoke team-a            # every certificate team-a was ever issued here
  gen-certs --out certs/prod --revoke-serial 3f:a2:...  # one certificate, by serial (see --list)
  gen-certs --out certs/prod --revoke-cert leaked.pem   # the certificate in a file
  gen-certs --out certs/prod --list                     # the index, with what is revoked
  gen-certs --out certs/prod --renew-crl                # re-sign the CRLs (they last 30 days)
List crl.pem in tls.crl_files: servers reload it when it changes, refuse
the certificates at the handshake and close connections open with them.

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
    /// Issue --tenant certificates even where the directory holds one; the
    /// old certificate stays in the index, valid until revoked.
    #[arg(long)]
    force: bool,
    /// Replace an existing CA (every certificate it issued stops working).
    #[arg(long)]
    replace_ca: bool,
    /// Start a CA rotation: a new CA beside the existing one (kept), and
    /// ca-bundle.pem trusting both. Certificates issued from now on
    /// (--tenant, --server-name, here or later) come from the new CA.
    #[arg(long, conflicts_with_all = ["replace_ca", "revoke", "revoke_serials", "revoke_certs", "list", "renew_crl"])]
    new_ca: bool,
    /// Finish a CA rotation: the new CA becomes ca.pem, ca-bundle.pem holds
    /// it alone, crl.pem keeps its CRL only.
    #[arg(long, conflicts_with_all = ["tenants", "server_names", "force", "replace_ca", "revoke", "revoke_serials", "revoke_certs", "new_ca", "list", "renew_crl"])]
    retire_old_ca: bool,
    /// Revoke every certificate this tenant was issued in DIR (the index's,
    /// reissued ones included, and client-TENANT.pem): add them to
    /// DIR/crl.pem (repeatable).
    #[arg(long = "revoke", value_name = "TENANT", conflicts_with_all = ["tenants", "server_names", "force", "replace_ca", "list"])]
    revoke: Vec<String>,
    /// Revoke the certificate with this serial number (hex, as --list
    /// shows it; colons allowed) (repeatable).
    #[arg(long = "revoke-serial", value_name = "SERIAL", conflicts_with_all = ["tenants", "server_names", "force", "replace_ca", "list"])]
    revoke_serials: Vec<String>,
    /// Revoke the certificate in this file, issued by a CA in DIR (repeatable).
    #[arg(long = "revoke-cert", value_name = "FILE", conflicts_with_all = ["tenants", "server_names", "force", "replace_ca", "list"])]
    revoke_certs: Vec<PathBuf>,
    /// Re-sign every CA's CRL in DIR with a fresh nextUpdate (30 days) and
    /// the next CRL number; the entries stay.
    #[arg(long, conflicts_with_all = ["tenants", "server_names", "force", "replace_ca", "list"])]
    renew_crl: bool,
    /// List every certificate issued in DIR: serial, tenant, notAfter,
    /// file, and whether it is valid, expired or revoked (in crl.pem).
    #[arg(long, conflicts_with_all = ["tenants", "server_names", "force", "replace_ca"])]
    list: bool,
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
    if args.list {
        return list(&args.out).map_err(|e| (1, e.into()));
    }
    let mut targets = Vec::new();
    for name in &args.revoke {
        targets.push(pki::RevokeTarget::Tenant(TenantId::parse(name).map_err(|e| usage(e.into()))?));
    }
    targets.extend(args.revoke_serials.iter().map(|s| pki::RevokeTarget::Serial(s.clone())));
    targets.extend(args.revoke_certs.iter().map(|p| pki::RevokeTarget::File(p.clone())));
    if !targets.is_empty() {
        for target in &targets {
            let report = pki::revoke_target(&args.out, target).map_err(|e| (1, e.into()))?;
            for entry in &report.revoked {
                let tenant = entry.tenant.as_ref().map_or_else(|| "(server)".to_string(), |t| format!("tenant {t}"));
                println!("revoked serial {} ({tenant}, {}, issued by {})", entry.serial, entry.file, entry.issuer);
            }
            println!(
                "{} (CRL number {}) now lists {} revoked certificate(s)",
                report.crl.display(),
                report.crl_number,
                report.revoked_total
            );
        }
        return Ok(());
    }
    if args.renew_crl {
        let number = pki::renew_crl(&args.out).map_err(|e| (1, e.into()))?;
        println!(
            "re-signed the CRLs in {} (CRL number {number}), valid {} days",
            pki::PkiPaths::new(&args.out).crl().display(),
            pki::CRL_DAYS
        );
        return Ok(());
    }
    if args.force && args.tenants.is_empty() && args.server_names.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "--force lets --tenant overwrite an existing certificate, and none was given; to replace the CA, use --replace-ca"
        )));
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
    req.force_new_ca = args.replace_ca;
    req.overwrite = args.force;
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

/// Prints the index of `dir` with each certificate's state.
fn list(dir: &std::path::Path) -> Result<(), pki::PkiError> {
    let rows = pki::list(dir)?;
    println!("{:<40} {:<20} {:<23} {:<32} FILE", "SERIAL", "TENANT", "NOT AFTER", "STATE");
    for (entry, state) in rows {
        let tenant = entry.tenant.as_ref().map_or("(server)", |t| t.as_str());
        let state = match state {
            pki::CertState::Valid => "valid".to_string(),
            pki::CertState::Expired => "expired".to_string(),
            pki::CertState::Revoked(at) => format!("revoked {}", imgsvc::tls::utc_text(at)),
        };
        println!("{:<40} {:<20} {:<23} {:<32} {}", entry.serial, tenant, imgsvc::tls::utc_text(entry.not_after), state, entry.file);
    }
    Ok(())
}
