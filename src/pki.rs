//! Certificate authority and certificate issuing: the library behind
//! `gen-certs`, the dev auto-certificates and the tests' per-test PKI.
//!
//! Layout of a PKI directory (all PEM):
//! `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`,
//! `client-<tenant>.pem`, `client-<tenant>-key.pem`.
//! Keys are ECDSA P-256 and written with mode 0600; certificates 0644.
//! Server certificates carry only the serverAuth usage, client certificates
//! only clientAuth, and a client certificate names its tenant in a URI SAN
//! `spiffe://<trust-domain>/tenant/<name>` (see [`crate::identity`]).
//!
//! An existing CA is reused to issue further certificates, so adding a
//! tenant later keeps every certificate issued before valid; replacing a CA
//! takes `force`.
//!
//! A CA is rotated without downtime in three steps (docs/certificate-rotation.md):
//! [`start_ca_rotation`] puts a new CA beside the old one (`ca-new.pem`,
//! `ca-new-key.pem`) and writes `ca-bundle.pem` holding both, to be trusted
//! by servers and clients; while it is there, [`issue`] issues every new
//! certificate from the new CA; [`retire_old_ca`] makes the new CA the CA
//! (`ca.pem`) and the bundle hold it alone.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::identity::{TenantId, TenantIdError, TrustDomain};

/// Default names a server certificate is valid for.
pub const DEFAULT_SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Default lifetime of server and client certificates, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// Lifetime of a new CA, in days.
pub const CA_DAYS: u32 = 3650;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already holds a CA; pass --force to replace it (every certificate it issued stops working)")]
    CaExists { path: PathBuf },
    #[error("{present} exists but {missing} does not: a CA needs both its certificate and its key")]
    IncompleteCa { present: PathBuf, missing: PathBuf },
    #[error("cannot load the CA from {path}")]
    LoadCa {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid server name {name:?}: use a DNS name or an IP address")]
    InvalidServerName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("--days must be between 1 and 36500, got {0}")]
    InvalidDays(u32),
    #[error(transparent)]
    Tenant(#[from] TenantIdError),
    #[error("cannot issue the {what} certificate")]
    Issue {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} is not a readable {what}: {reason}")]
    Parse { what: &'static str, path: PathBuf, reason: String },
    #[error("{dir} has no CA (ca.pem and ca-key.pem) to rotate: create one first (gen-certs without --new-ca)")]
    NoCa { dir: PathBuf },
    #[error("a CA rotation is already in progress in {dir} ({path} exists): finish it with --retire-old-ca first")]
    RotationInProgress { dir: PathBuf, path: PathBuf },
    #[error("no CA rotation is in progress in {dir} ({path} does not exist): start one with --new-ca")]
    NoRotation { dir: PathBuf, path: PathBuf },
    #[error("{path} was not issued by a CA in {dir} (its issuer is {issuer})")]
    ForeignCertificate { path: PathBuf, dir: PathBuf, issuer: String },
}

/// What to issue into a PKI directory.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    pub out_dir: PathBuf,
    pub trust_domain: TrustDomain,
    /// Names for the server certificate. `None`: issue a server certificate
    /// for [`DEFAULT_SERVER_NAMES`] only if the directory has none yet.
    pub server_names: Option<Vec<String>>,
    pub tenants: Vec<TenantId>,
    pub leaf_days: u32,
    /// Replace an existing CA (and so invalidate what it issued).
    pub force_new_ca: bool,
}

impl IssueRequest {
    pub fn new(out_dir: impl Into<PathBuf>, trust_domain: TrustDomain) -> Self {
        Self {
            out_dir: out_dir.into(),
            trust_domain,
            server_names: None,
            tenants: Vec::new(),
            leaf_days: DEFAULT_LEAF_DAYS,
            force_new_ca: false,
        }
    }
}

/// What [`issue`] wrote.
#[derive(Clone, Debug, Default)]
pub struct IssueReport {
    pub reused_ca: bool,
    /// A CA rotation is in progress: the certificates come from the new CA.
    pub from_new_ca: bool,
    pub written: Vec<PathBuf>,
}

/// Paths of the files in a PKI directory.
#[derive(Clone, Debug)]
pub struct PkiPaths {
    pub dir: PathBuf,
}

impl PkiPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    pub fn client_cert(&self, tenant: &TenantId) -> PathBuf {
        self.dir.join(format!("client-{tenant}.pem"))
    }
    pub fn client_key(&self, tenant: &TenantId) -> PathBuf {
        self.dir.join(format!("client-{tenant}-key.pem"))
    }
    /// The revocation list `revoke` maintains (add it to `tls.crl_files`):
    /// one CRL per CA (two during a CA rotation).
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    /// The next CA's certificate, during a CA rotation.
    pub fn new_ca_cert(&self) -> PathBuf {
        self.dir.join("ca-new.pem")
    }
    /// The next CA's key, during a CA rotation.
    pub fn new_ca_key(&self) -> PathBuf {
        self.dir.join("ca-new-key.pem")
    }
    /// The CAs to trust: the old and the new one during a CA rotation, the
    /// CA alone after it.
    pub fn ca_bundle(&self) -> PathBuf {
        self.dir.join("ca-bundle.pem")
    }
    /// Whether a CA rotation is in progress (both new CA files exist; one
    /// alone is an error).
    fn rotating(&self) -> Result<bool, PkiError> {
        match (self.new_ca_cert().exists(), self.new_ca_key().exists()) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            (true, false) => Err(PkiError::IncompleteCa { present: self.new_ca_cert(), missing: self.new_ca_key() }),
            (false, true) => Err(PkiError::IncompleteCa { present: self.new_ca_key(), missing: self.new_ca_cert() }),
        }
    }
}

/// A CA that can sign certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA for `trust_domain`.
    pub fn generate(trust_domain: &TrustDomain, common_name: &str) -> Result<Self, PkiError> {
        let issue_err = |source| PkiError::Issue { what: "CA".into(), source };
        let key = KeyPair::generate().map_err(issue_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("{common_name} ({trust_domain})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, CA_DAYS);
        let cert = params.self_signed(&key).map_err(issue_err)?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = read_to_string(cert_path)?;
        let key_pem = read_to_string(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::LoadCa { path: key_path.into(), source })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::LoadCa { path: cert_path.into(), source })?;
        Ok(Self { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// The CA's subject, as text.
    pub fn subject(&self) -> String {
        X509Certificate::from_der(&self.cert_der()).map(|(_, c)| c.subject().to_string()).unwrap_or_default()
    }
    /// The CA's subject, raw DER (what its certificates and CRLs name as issuer).
    fn subject_der(&self) -> Vec<u8> {
        X509Certificate::from_der(&self.cert_der()).map(|(_, c)| c.subject().as_raw().to_vec()).unwrap_or_default()
    }
    fn cert_der(&self) -> Vec<u8> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map(|d| d.to_vec()).unwrap_or_default()
    }
    /// A CRL signed by this CA listing `revoked`, PEM; valid [`CRL_DAYS`].
    fn crl_pem(&self, revoked: Vec<RevokedCertParams>) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(CRL_DAYS),
            // Seconds since the epoch: increases with every run, as CRL numbers must.
            crl_number: SerialNumber::from(now.unix_timestamp().max(0) as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(|source| PkiError::Issue { what: "CRL".into(), source })?;
        crl.pem().map_err(|source| PkiError::Issue { what: "CRL".into(), source })
    }
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A server certificate (serverAuth only) for DNS names and IP addresses.
    pub fn issue_server(&self, names: &[String], days: u32) -> Result<IssuedCert, PkiError> {
        let mut sans = Vec::with_capacity(names.len());
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(n.as_str().try_into().map_err(|source| PkiError::InvalidServerName { name: n.clone(), source })?)
                }
            };
            sans.push(san);
        }
        let cn = names.first().map(String::as_str).unwrap_or("imgsvc server");
        self.issue_leaf("server", cn, sans, ExtendedKeyUsagePurpose::ServerAuth, days)
    }

    /// A client certificate (clientAuth only) naming `tenant` in `trust_domain`.
    pub fn issue_client(&self, trust_domain: &TrustDomain, tenant: &TenantId, days: u32) -> Result<IssuedCert, PkiError> {
        let uri = trust_domain.tenant_uri(tenant);
        let what = format!("client ({tenant})");
        let san = SanType::URI(uri.as_str().try_into().map_err(|source| PkiError::Issue { what: what.clone(), source })?);
        self.issue_leaf(&what, tenant.as_str(), vec![san], ExtendedKeyUsagePurpose::ClientAuth, days)
    }

    fn issue_leaf(
        &self,
        what: &str,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        days: u32,
    ) -> Result<IssuedCert, PkiError> {
        if !(1..=36500).contains(&days) {
            return Err(PkiError::InvalidDays(days));
        }
        let issue_err = |source| PkiError::Issue { what: what.into(), source };
        let key = KeyPair::generate().map_err(issue_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, days);
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A freshly issued certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes the certificate (0644) and the key (0600), each atomically.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(key_path, self.key_pem.as_bytes(), 0o600)?;
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)
    }
}

/// Issues what `req` asks for into `req.out_dir`, reusing an existing CA.
pub fn issue(req: &IssueRequest) -> Result<IssueReport, PkiError> {
    let paths = PkiPaths::new(&req.out_dir);
    std::fs::create_dir_all(&req.out_dir).map_err(|source| PkiError::Io {
        action: "create directory",
        path: req.out_dir.clone(),
        source,
    })?;
    let mut report = IssueReport::default();

    let (cert_exists, key_exists) = (paths.ca_cert().exists(), paths.ca_key().exists());
    let rotating = paths.rotating()?;
    if rotating && req.force_new_ca {
        return Err(PkiError::RotationInProgress { dir: req.out_dir.clone(), path: paths.new_ca_cert() });
    }
    let ca = match (cert_exists, key_exists, req.force_new_ca) {
        // During a CA rotation, every new certificate comes from the new CA.
        _ if rotating => {
            report.reused_ca = true;
            report.from_new_ca = true;
            CertificateAuthority::load(&paths.new_ca_cert(), &paths.new_ca_key())?
        }
        (true, true, false) => {
            report.reused_ca = true;
            CertificateAuthority::load(&paths.ca_cert(), &paths.ca_key())?
        }
        (true, false, false) => return Err(PkiError::IncompleteCa { present: paths.ca_cert(), missing: paths.ca_key() }),
        (false, true, false) => return Err(PkiError::IncompleteCa { present: paths.ca_key(), missing: paths.ca_cert() }),
        _ => {
            let ca = CertificateAuthority::generate(&req.trust_domain, "imgsvc CA")?;
            write_file(&paths.ca_key(), ca.key_pem().as_bytes(), 0o600)?;
            write_file(&paths.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
            report.written.extend([paths.ca_cert(), paths.ca_key()]);
            ca
        }
    };

    // A new CA invalidates the old server certificate, so reissue it too.
    let server_names = match &req.server_names {
        Some(names) => Some(names.clone()),
        None if !report.reused_ca || !paths.server_cert().exists() => Some(DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect()),
        None => None,
    };
    if let Some(names) = server_names {
        ca.issue_server(&names, req.leaf_days)?.write(&paths.server_cert(), &paths.server_key())?;
        report.written.extend([paths.server_cert(), paths.server_key()]);
    }
    for tenant in &req.tenants {
        let (cert, key) = (paths.client_cert(tenant), paths.client_key(tenant));
        ca.issue_client(&req.trust_domain, tenant, req.leaf_days)?.write(&cert, &key)?;
        report.written.extend([cert, key]);
    }
    Ok(report)
}

/// Validity of each CRL `revoke` writes, in days: the server refuses every
/// client once its CRL has expired, so re-run `revoke` (or re-issue) before.
pub const CRL_DAYS: i64 = 30;

/// What [`revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokeReport {
    pub crl: PathBuf,
    /// Serial of the certificate revoked now, hex.
    pub serial: String,
    /// Certificates revoked in the CRL, this one included.
    pub revoked_total: usize,
}

/// Revokes `tenant`'s current client certificate in `dir`: adds its serial
/// to the CRL of the CA that issued it in `dir/crl.pem` (keeping earlier
/// entries, and the other CA's CRL during a rotation) and signs the list
/// with that CA. The server refuses the certificate at the handshake once
/// it loads the CRL (`tls.crl_files`; reloaded when the file changes).
pub fn revoke(dir: &Path, tenant: &TenantId) -> Result<RevokeReport, PkiError> {
    let paths = PkiPaths::new(dir);
    let cert_path = paths.client_cert(tenant);
    let parse_err = |what, path: &Path, reason: String| PkiError::Parse { what, path: path.into(), reason };
    let cert_der = crate::tls::read_certs("client certificate", &cert_path)
        .map_err(|e| parse_err("client certificate", &cert_path, e.to_string()))?
        .remove(0);
    let (_, cert) = X509Certificate::from_der(&cert_der).map_err(|e| parse_err("client certificate", &cert_path, e.to_string()))?;
    let serial = cert.raw_serial().to_vec();
    // The CA that issued it: the current one, or the new one of a rotation.
    let mut candidates = vec![(paths.ca_cert(), paths.ca_key())];
    if paths.rotating()? {
        candidates.push((paths.new_ca_cert(), paths.new_ca_key()));
    }
    let mut issuer = None;
    for (ca_cert, ca_key) in candidates {
        if ca_subject(&ca_cert)? == cert.issuer().as_raw() {
            issuer = Some(CertificateAuthority::load(&ca_cert, &ca_key)?);
        }
    }
    let ca = issuer.ok_or_else(|| PkiError::ForeignCertificate {
        path: cert_path.clone(),
        dir: dir.into(),
        issuer: cert.issuer().to_string(),
    })?;

    let now = OffsetDateTime::now_utc();
    let crl_path = paths.crl();
    let (mut kept, mut revoked) = (Vec::new(), Vec::new());
    for block in read_crls(&crl_path)? {
        if block.issuer != ca.subject_der() {
            kept.push(block.pem);
            continue;
        }
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&block.der)
            .map_err(|e| parse_err("CRL", &crl_path, e.to_string()))?;
        for entry in crl.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(entry.raw_serial()),
                revocation_time: entry.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    if !revoked.iter().any(|r| r.serial_number.as_ref() == serial.as_slice()) {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now,
            reason_code: Some(RevocationReason::CessationOfOperation),
            invalidity_date: None,
        });
    }
    let revoked_total = revoked.len();
    kept.push(ca.crl_pem(revoked)?);
    write_file(&crl_path, kept.concat().as_bytes(), 0o644)?;
    let serial = serial.iter().map(|b| format!("{b:02x}")).collect();
    Ok(RevokeReport { crl: crl_path, serial, revoked_total })
}

/// What [`start_ca_rotation`] did.
#[derive(Clone, Debug)]
pub struct RotationReport {
    /// The bundle of both CAs, to trust on servers and clients.
    pub bundle: PathBuf,
    pub old_subject: String,
    pub new_subject: String,
    pub written: Vec<PathBuf>,
}

/// Starts a CA rotation in `dir`: a new CA beside the current one (whose
/// files stay untouched) in `ca-new.pem`/`ca-new-key.pem`, and
/// `ca-bundle.pem` holding both. From now on [`issue`] issues from the new
/// CA. If `dir` has a `crl.pem`, an empty CRL of the new CA is added to it:
/// a server that checks CRLs refuses certificates of a CA it has no CRL for.
pub fn start_ca_rotation(dir: &Path, trust_domain: &TrustDomain) -> Result<RotationReport, PkiError> {
    let paths = PkiPaths::new(dir);
    if paths.rotating()? {
        return Err(PkiError::RotationInProgress { dir: dir.into(), path: paths.new_ca_cert() });
    }
    if !paths.ca_cert().exists() || !paths.ca_key().exists() {
        return Err(PkiError::NoCa { dir: dir.into() });
    }
    let old_pem = read_to_string(&paths.ca_cert())?;
    let old = CertificateAuthority::load(&paths.ca_cert(), &paths.ca_key())?;
    // A name of its own (the creation time), so that logs, the expiry gauge
    // and CRLs tell the two CAs apart.
    let now = OffsetDateTime::now_utc();
    let stamp = format!("{} {:02}:{:02}:{:02}Z", now.date(), now.hour(), now.minute(), now.second());
    let new = CertificateAuthority::generate(trust_domain, &format!("imgsvc CA {stamp}"))?;
    let mut written = Vec::new();
    write_file(&paths.new_ca_key(), new.key_pem().as_bytes(), 0o600)?;
    write_file(&paths.new_ca_cert(), new.cert_pem().as_bytes(), 0o644)?;
    written.extend([paths.new_ca_cert(), paths.new_ca_key()]);
    write_file(&paths.ca_bundle(), format!("{}{}", ensure_newline(&old_pem), new.cert_pem()).as_bytes(), 0o644)?;
    written.push(paths.ca_bundle());
    if paths.crl().exists() {
        let mut crls: Vec<String> = read_crls(&paths.crl())?.into_iter().map(|b| b.pem).collect();
        crls.push(new.crl_pem(Vec::new())?);
        write_file(&paths.crl(), crls.concat().as_bytes(), 0o644)?;
        written.push(paths.crl());
    }
    Ok(RotationReport { bundle: paths.ca_bundle(), old_subject: old.subject(), new_subject: new.subject(), written })
}

/// What [`retire_old_ca`] did.
#[derive(Clone, Debug)]
pub struct RetireReport {
    pub retired_subject: String,
    pub ca_subject: String,
    pub written: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

/// Ends a CA rotation in `dir`: the new CA becomes `ca.pem`/`ca-key.pem`
/// (the old CA's key is overwritten), `ca-bundle.pem` holds it alone, and
/// `crl.pem` keeps only its CRL. Servers that load the bundle then refuse
/// certificates of the old CA. Safe to run again if interrupted.
pub fn retire_old_ca(dir: &Path) -> Result<RetireReport, PkiError> {
    let paths = PkiPaths::new(dir);
    if !paths.rotating()? {
        return Err(PkiError::NoRotation { dir: dir.into(), path: paths.new_ca_cert() });
    }
    let new = CertificateAuthority::load(&paths.new_ca_cert(), &paths.new_ca_key())?;
    let retired_subject = CertificateAuthority::load(&paths.ca_cert(), &paths.ca_key()).map(|ca| ca.subject()).unwrap_or_default();
    let mut written = Vec::new();
    if paths.crl().exists() {
        let mine: Vec<String> = read_crls(&paths.crl())?.into_iter().filter(|b| b.issuer == new.subject_der()).map(|b| b.pem).collect();
        write_file(&paths.crl(), mine.concat().as_bytes(), 0o644)?;
        written.push(paths.crl());
    }
    write_file(&paths.ca_key(), new.key_pem().as_bytes(), 0o600)?;
    write_file(&paths.ca_cert(), new.cert_pem().as_bytes(), 0o644)?;
    write_file(&paths.ca_bundle(), new.cert_pem().as_bytes(), 0o644)?;
    written.extend([paths.ca_cert(), paths.ca_key(), paths.ca_bundle()]);
    let mut removed = Vec::new();
    for path in [paths.new_ca_key(), paths.new_ca_cert()] {
        std::fs::remove_file(&path).map_err(|source| PkiError::Io { action: "remove", path: path.clone(), source })?;
        removed.push(path);
    }
    Ok(RetireReport { retired_subject, ca_subject: new.subject(), written, removed })
}

/// One CRL of a PEM file: its text, DER, and issuer (raw DER name).
struct CrlBlock {
    pem: String,
    der: Vec<u8>,
    issuer: Vec<u8>,
}

/// The CRLs in `path`, in order; none if the file does not exist.
fn read_crls(path: &Path) -> Result<Vec<CrlBlock>, PkiError> {
    use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = read_to_string(path)?;
    let parse_err = |reason: String| PkiError::Parse { what: "CRL", path: path.into(), reason };
    const END: &str = "-----END X509 CRL-----";
    let mut blocks = Vec::new();
    for piece in text.split_inclusive(END).filter(|p| p.contains(END)) {
        let pem = piece.trim_start().to_string() + "\n";
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).map_err(|e| parse_err(e.to_string()))?;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).map_err(|e| parse_err(e.to_string()))?;
        let issuer = crl.issuer().as_raw().to_vec();
        blocks.push(CrlBlock { pem, der: der.to_vec(), issuer });
    }
    Ok(blocks)
}

/// The subject of the certificate in `path`, raw DER.
fn ca_subject(path: &Path) -> Result<Vec<u8>, PkiError> {
    let der = crate::tls::read_certs("CA certificate", path)
        .map_err(|e| PkiError::Parse { what: "CA certificate", path: path.into(), reason: e.to_string() })?
        .remove(0);
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| PkiError::Parse {
        what: "CA certificate",
        path: path.into(),
        reason: e.to_string(),
    })?;
    Ok(cert.subject().as_raw().to_vec())
}

fn ensure_newline(pem: &str) -> String {
    if pem.ends_with('\n') { pem.to_string() } else { format!("{pem}\n") }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "imgsvc");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    // Backdate a little so that small clock skew between hosts does not
    // make a fresh certificate "not yet valid".
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days.into());
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { action: "read", path: path.into(), source })
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    crate::fsutil::write_atomic(path, contents, mode).map_err(|source| PkiError::Io { action: "write", path: path.into(), source })
}
