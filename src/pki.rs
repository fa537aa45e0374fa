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
    /// The revocation list `revoke` maintains (add it to `tls.crl_files`).
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
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
    let ca = match (cert_exists, key_exists, req.force_new_ca) {
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
/// to `dir/crl.pem` (keeping earlier entries) and signs the list with the
/// CA. The server refuses the certificate at the handshake once it loads
/// the CRL (`tls.crl_files`, then SIGHUP).
pub fn revoke(dir: &Path, tenant: &TenantId) -> Result<RevokeReport, PkiError> {
    use x509_parser::prelude::FromDer;
    let paths = PkiPaths::new(dir);
    let ca = CertificateAuthority::load(&paths.ca_cert(), &paths.ca_key())?;
    let cert_path = paths.client_cert(tenant);
    let parse_err = |what, path: &Path, reason: String| PkiError::Parse { what, path: path.into(), reason };
    let cert_der = crate::tls::read_certs("client certificate", &cert_path)
        .map_err(|e| parse_err("client certificate", &cert_path, e.to_string()))?
        .remove(0);
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
        .map_err(|e| parse_err("client certificate", &cert_path, e.to_string()))?;
    let serial = cert.raw_serial().to_vec();

    let now = OffsetDateTime::now_utc();
    let mut revoked: Vec<RevokedCertParams> = Vec::new();
    let crl_path = paths.crl();
    if crl_path.exists() {
        let pem = std::fs::read(&crl_path).map_err(|source| PkiError::Io { action: "read", path: crl_path.clone(), source })?;
        use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
        let der = CertificateRevocationListDer::from_pem_slice(&pem).map_err(|e| parse_err("CRL", &crl_path, e.to_string()))?;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
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
    let params = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(CRL_DAYS),
        // Seconds since the epoch: increases with every run, as CRL numbers must.
        crl_number: SerialNumber::from(now.unix_timestamp().max(0) as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let revoked_total = params.revoked_certs.len();
    let crl = params.signed_by(&ca.issuer).map_err(|source| PkiError::Issue { what: "CRL".into(), source })?;
    let pem = crl.pem().map_err(|source| PkiError::Issue { what: "CRL".into(), source })?;
    write_file(&crl_path, pem.as_bytes(), 0o644)?;
    let serial = serial.iter().map(|b| format!("{b:02x}")).collect();
    Ok(RevokeReport { crl: crl_path, serial, revoked_total })
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
