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
    #[error("nothing to revoke for {what}: not found in {looked}")]
    NothingToRevoke { what: String, looked: String },
    #[error(
        "{path} already holds tenant {tenant}'s certificate (serial {serial}, valid until {not_after}); pass --force to issue a new one (the old one stays valid until revoked: gen-certs --revoke-serial {serial})"
    )]
    TenantExists { path: PathBuf, tenant: TenantId, serial: String, not_after: String },
    #[error("refusing to use the CA key {path}: {problem} (it signs every certificate; chmod 600 it, owned by the user running gen-certs)")]
    UnsafeCaKey { path: PathBuf, problem: String },
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
    /// Issue a tenant's certificate even if the directory holds one (the
    /// old one stays in the index, valid until revoked).
    pub overwrite: bool,
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
            overwrite: false,
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
    /// The index of every certificate issued here (see [`Index`]).
    pub fn index(&self) -> PathBuf {
        self.dir.join("index.tsv")
    }
    /// The last CRL number used (a decimal integer): CRL numbers grow by
    /// one with every CRL gen-certs signs here.
    pub fn crl_number(&self) -> PathBuf {
        self.dir.join("crl-number")
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

    /// Loads a CA from its PEM certificate and key. The key must be the
    /// running user's and readable by no one else ([`check_ca_key`]).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        check_ca_key(key_path)?;
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
    /// A CRL signed by this CA listing `revoked`, PEM, numbered `number`;
    /// valid [`CRL_DAYS`].
    fn crl_pem(&self, revoked: Vec<RevokedCertParams>, number: u64) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(number),
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

    /// A client certificate like [`Self::issue_client`]'s, valid until
    /// `not_after` exactly (from an hour before now): for certificates that
    /// live seconds or minutes (tests of expiry, short-lived credentials).
    pub fn issue_client_until(
        &self,
        trust_domain: &TrustDomain,
        tenant: &TenantId,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let uri = trust_domain.tenant_uri(tenant);
        let what = format!("client ({tenant})");
        let san = SanType::URI(uri.as_str().try_into().map_err(|source| PkiError::Issue { what: what.clone(), source })?);
        let validity = (OffsetDateTime::now_utc() - Duration::hours(1), not_after);
        self.issue_leaf_valid(&what, tenant.as_str(), vec![san], ExtendedKeyUsagePurpose::ClientAuth, validity)
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
        // Backdated a little so that small clock skew between hosts does not
        // make a fresh certificate "not yet valid".
        let now = OffsetDateTime::now_utc();
        self.issue_leaf_valid(what, common_name, sans, usage, (now - Duration::hours(1), now + Duration::days(days.into())))
    }

    fn issue_leaf_valid(
        &self,
        what: &str,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        (not_before, not_after): (OffsetDateTime, OffsetDateTime),
    ) -> Result<IssuedCert, PkiError> {
        let issue_err = |source| PkiError::Issue { what: what.into(), source };
        let key = KeyPair::generate().map_err(issue_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
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
    /// The certificate, DER.
    pub fn der(&self) -> Result<Vec<u8>, PkiError> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map(|d| d.to_vec()).map_err(|e| PkiError::Parse {
            what: "certificate",
            path: "(just issued)".into(),
            reason: e.to_string(),
        })
    }
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
    let mut index = Index::load(&paths)?;
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

    // Never overwrite a tenant's certificate unasked: the old one would
    // stay valid, and a later revocation could miss it. During a CA
    // rotation, a certificate of the old CA is reissued from the new one
    // without asking: that is the rotation's step 2, and retiring the old
    // CA ends the old certificate.
    if report.reused_ca && !req.overwrite {
        for tenant in &req.tenants {
            let path = paths.client_cert(tenant);
            if let Ok(der) = crate::tls::read_certs("client certificate", &path) {
                let existing = IndexEntry::of(&der[0], Some(tenant.clone()), "", &path)?;
                if report.from_new_ca && existing.issuer != ca.subject() {
                    continue;
                }
                return Err(PkiError::TenantExists {
                    path,
                    tenant: tenant.clone(),
                    serial: existing.serial,
                    not_after: crate::tls::utc_text(existing.not_after),
                });
            }
        }
    }

    // A new CA invalidates the old server certificate, so reissue it too.
    let server_names = match &req.server_names {
        Some(names) => Some(names.clone()),
        None if !report.reused_ca || !paths.server_cert().exists() => Some(DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect()),
        None => None,
    };
    let mut issued = Vec::new();
    if let Some(names) = server_names {
        let cert = ca.issue_server(&names, req.leaf_days)?;
        cert.write(&paths.server_cert(), &paths.server_key())?;
        issued.push((cert, None, paths.server_cert()));
        report.written.extend([paths.server_cert(), paths.server_key()]);
    }
    for tenant in &req.tenants {
        let (cert_path, key_path) = (paths.client_cert(tenant), paths.client_key(tenant));
        let cert = ca.issue_client(&req.trust_domain, tenant, req.leaf_days)?;
        cert.write(&cert_path, &key_path)?;
        issued.push((cert, Some(tenant.clone()), cert_path.clone()));
        report.written.extend([cert_path, key_path]);
    }
    for (cert, tenant, path) in issued {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        index.record(IndexEntry::of(&cert.der()?, tenant, &name, &path)?);
    }
    index.save(&paths)?;
    report.written.push(paths.index());
    Ok(report)
}

/// Validity of each CRL gen-certs writes, in days: the server refuses every
/// client of a CA once its CRL has expired (and refuses to load an expired
/// one), so renew it before (`gen-certs --renew-crl`; every `--revoke` does).
pub const CRL_DAYS: i64 = 30;

/// One certificate issued into a PKI directory, as its index
/// (`index.tsv`) records it. Entries are never removed: a certificate
/// overwritten by a reissue stays listed, so it can still be revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The serial number, lowercase hex of its DER bytes.
    pub serial: String,
    /// The issuing CA's subject, as text.
    pub issuer: String,
    /// The tenant a client certificate names; `None` for a server certificate.
    pub tenant: Option<TenantId>,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The file it was written to, relative to the directory.
    pub file: String,
}

impl IndexEntry {
    fn of(der: &[u8], tenant: Option<TenantId>, file: &str, path: &Path) -> Result<Self, PkiError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse {
            what: "certificate",
            path: path.into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            serial: hex(cert.raw_serial()),
            issuer: cert.issuer().to_string(),
            tenant,
            not_after: cert.validity().not_after.timestamp(),
            file: file.into(),
        })
    }
}

/// The index of the certificates issued into a directory, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub entries: Vec<IndexEntry>,
}

const INDEX_HEADER: &str = "# imgsvc gen-certs index: every certificate issued here, oldest first (serial, issuer, tenant or '-' for a server certificate, notAfter in Unix seconds, file)\n";

impl Index {
    /// The index of `paths.dir`. A directory without one (made before
    /// gen-certs kept it) is indexed from the certificates on disk.
    pub fn load(paths: &PkiPaths) -> Result<Self, PkiError> {
        let path = paths.index();
        if !path.exists() {
            return Self::from_files(paths);
        }
        let text = read_to_string(&path)?;
        let bad =
            |line: usize, reason: &str| PkiError::Parse { what: "index", path: path.clone(), reason: format!("line {line}: {reason}") };
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split('\t').collect();
            let [serial, issuer, tenant, not_after, file] = fields[..] else { return Err(bad(n + 1, "expected 5 tab-separated fields")) };
            let tenant = match tenant {
                "-" => None,
                t => Some(TenantId::parse(t).map_err(|e| bad(n + 1, &e.to_string()))?),
            };
            let not_after = not_after.parse().map_err(|_| bad(n + 1, "notAfter is not a number"))?;
            entries.push(IndexEntry { serial: serial.into(), issuer: issuer.into(), tenant, not_after, file: file.into() });
        }
        Ok(Self { entries })
    }

    fn from_files(paths: &PkiPaths) -> Result<Self, PkiError> {
        let mut entries = Vec::new();
        let Ok(dir) = std::fs::read_dir(&paths.dir) else { return Ok(Self::default()) };
        let mut names: Vec<String> = dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        names.sort();
        for name in names {
            let tenant = match name.strip_prefix("client-").and_then(|n| n.strip_suffix(".pem")) {
                Some(t) if !t.ends_with("-key") => TenantId::parse(t).ok(),
                _ => None,
            };
            if tenant.is_none() && name != "server.pem" {
                continue;
            }
            let path = paths.dir.join(&name);
            let der = crate::tls::read_certs("certificate", &path).map_err(|e| PkiError::Parse {
                what: "certificate",
                path: path.clone(),
                reason: e.to_string(),
            })?;
            entries.push(IndexEntry::of(&der[0], tenant, &name, &path)?);
        }
        Ok(Self { entries })
    }

    fn save(&self, paths: &PkiPaths) -> Result<(), PkiError> {
        let mut text = String::from(INDEX_HEADER);
        for e in &self.entries {
            let tenant = e.tenant.as_ref().map_or("-", TenantId::as_str);
            text += &format!("{}\t{}\t{}\t{}\t{}\n", e.serial, e.issuer.replace(['\t', '\n'], " "), tenant, e.not_after, e.file);
        }
        write_file(&paths.index(), text.as_bytes(), 0o644)
    }

    fn record(&mut self, entry: IndexEntry) {
        if !self.entries.iter().any(|e| e.serial == entry.serial && e.issuer == entry.issuer) {
            self.entries.push(entry);
        }
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial as typed (hex, with or without colons or `0x`, any case),
/// normalised for comparison: lowercase, no leading zeros.
fn normalise_serial(serial: &str) -> String {
    let s = serial.trim().trim_start_matches("0x").replace(':', "").to_ascii_lowercase();
    let s = s.trim_start_matches('0');
    if s.is_empty() { "0".into() } else { s.into() }
}

/// What to revoke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    /// Every certificate the index lists for the tenant (reissued ones
    /// included), and its current `client-<tenant>.pem`.
    Tenant(TenantId),
    /// The certificate with this serial number (hex), as the index lists it.
    Serial(String),
    /// The certificate in this file (wherever it is).
    File(PathBuf),
}

impl std::fmt::Display for RevokeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tenant(t) => write!(f, "every certificate of tenant {t}"),
            Self::Serial(s) => write!(f, "serial {s}"),
            Self::File(p) => write!(f, "the certificate in {}", p.display()),
        }
    }
}

/// What [`revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokeReport {
    pub crl: PathBuf,
    /// The certificates this call asked for (already revoked ones included).
    pub revoked: Vec<IndexEntry>,
    /// The number of the CRLs written (every CA's CRL gets it).
    pub crl_number: u64,
    /// Certificates revoked in the CRLs, these included.
    pub revoked_total: usize,
}

/// Revokes every certificate of `tenant` issued in `dir` (see
/// [`revoke_target`]).
pub fn revoke(dir: &Path, tenant: &TenantId) -> Result<RevokeReport, PkiError> {
    revoke_target(dir, &RevokeTarget::Tenant(tenant.clone()))
}

/// Revokes `target`: adds its serial(s) to the CRL of the CA in `dir` that
/// issued it, in `dir/crl.pem`, and re-signs every CA's CRL there (both
/// during a CA rotation: a server that checks CRLs refuses every client of
/// a CA it has no CRL for) with the next CRL number. Earlier entries are
/// kept. The server refuses the certificates at the handshake once it loads
/// the CRL, and closes connections open with them (docs/security.md).
pub fn revoke_target(dir: &Path, target: &RevokeTarget) -> Result<RevokeReport, PkiError> {
    let paths = PkiPaths::new(dir);
    let cas = dir_cas(&paths)?;
    let mut index = Index::load(&paths)?;
    let not_issued_here = |path: &Path, issuer: String| PkiError::ForeignCertificate { path: path.into(), dir: dir.into(), issuer };
    let chosen: Vec<IndexEntry> = match target {
        RevokeTarget::Tenant(tenant) => {
            // The current file too, should the index have missed it.
            let path = paths.client_cert(tenant);
            if path.exists() {
                let der = crate::tls::read_certs("client certificate", &path).map_err(|e| PkiError::Parse {
                    what: "client certificate",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                index.record(IndexEntry::of(&der[0], Some(tenant.clone()), &format!("client-{tenant}.pem"), &path)?);
            }
            let mine: Vec<IndexEntry> = index.entries.iter().filter(|e| e.tenant.as_ref() == Some(tenant)).cloned().collect();
            if mine.is_empty() {
                return Err(PkiError::NothingToRevoke {
                    what: target.to_string(),
                    looked: format!("{} and {}", paths.index().display(), path.display()),
                });
            }
            mine
        }
        RevokeTarget::Serial(serial) => {
            let want = normalise_serial(serial);
            let found: Vec<IndexEntry> = index.entries.iter().filter(|e| normalise_serial(&e.serial) == want).cloned().collect();
            if found.is_empty() {
                return Err(PkiError::NothingToRevoke {
                    what: target.to_string(),
                    looked: format!("{} (revoke a certificate it does not list by its file: --revoke-cert FILE)", paths.index().display()),
                });
            }
            found
        }
        RevokeTarget::File(path) => {
            let der = crate::tls::read_certs("certificate", path).map_err(|e| PkiError::Parse {
                what: "certificate",
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let entry = IndexEntry::of(&der[0], None, &name, path)?;
            if !cas.iter().any(|ca| ca.subject() == entry.issuer) {
                return Err(not_issued_here(path, entry.issuer));
            }
            // Keep the index's record (it knows the tenant) if it has one.
            let known = index.entries.iter().find(|e| e.serial == entry.serial && e.issuer == entry.issuer).cloned();
            let entry = known.unwrap_or(entry);
            index.record(entry.clone());
            vec![entry]
        }
    };
    // Each must come from a CA here (a retired CA's certificates are
    // refused anyway: no server trusts it any more).
    for entry in &chosen {
        if !cas.iter().any(|ca| ca.subject() == entry.issuer) {
            return Err(not_issued_here(&paths.dir.join(&entry.file), entry.issuer.clone()));
        }
    }
    index.save(&paths)?;
    let (crl_number, revoked_total) = write_crls(&paths, &cas, &chosen)?;
    Ok(RevokeReport { crl: paths.crl(), revoked: chosen, crl_number, revoked_total })
}

/// Re-signs every CA's CRL in `dir` with the same entries, a fresh
/// nextUpdate ([`CRL_DAYS`]) and the next CRL number; returns that number.
pub fn renew_crl(dir: &Path) -> Result<u64, PkiError> {
    let paths = PkiPaths::new(dir);
    let cas = dir_cas(&paths)?;
    Ok(write_crls(&paths, &cas, &[])?.0)
}

/// The CAs of a PKI directory that can sign: the CA, and the new one during
/// a rotation.
fn dir_cas(paths: &PkiPaths) -> Result<Vec<CertificateAuthority>, PkiError> {
    if !paths.ca_cert().exists() || !paths.ca_key().exists() {
        return Err(PkiError::NoCa { dir: paths.dir.clone() });
    }
    let mut cas = vec![CertificateAuthority::load(&paths.ca_cert(), &paths.ca_key())?];
    if paths.rotating()? {
        cas.push(CertificateAuthority::load(&paths.new_ca_cert(), &paths.new_ca_key())?);
    }
    Ok(cas)
}

/// Writes `crl.pem`: for each of `cas`, a CRL listing what its earlier CRL
/// listed plus the `add`ed certificates it issued, all with one new CRL
/// number; CRLs of other issuers in the file are kept as they are. Returns
/// the number and the count of revoked certificates.
fn write_crls(paths: &PkiPaths, cas: &[CertificateAuthority], add: &[IndexEntry]) -> Result<(u64, usize), PkiError> {
    let crl_path = paths.crl();
    let blocks = read_crls(&crl_path)?;
    let number = next_crl_number(paths, &blocks)?;
    let now = OffsetDateTime::now_utc();
    let mut out: Vec<String> = Vec::new();
    let mut total = 0;
    for block in blocks.iter().filter(|b| !cas.iter().any(|ca| ca.subject_der() == b.issuer)) {
        out.push(block.pem.clone());
    }
    for ca in cas {
        let mut revoked: Vec<RevokedCertParams> = Vec::new();
        for block in blocks.iter().filter(|b| b.issuer == ca.subject_der()) {
            for (serial, at) in &block.revoked {
                if !revoked.iter().any(|r| r.serial_number.as_ref() == serial.as_slice()) {
                    revoked.push(RevokedCertParams {
                        serial_number: SerialNumber::from_slice(serial),
                        revocation_time: *at,
                        reason_code: None,
                        invalidity_date: None,
                    });
                }
            }
        }
        let subject = ca.subject();
        for entry in add.iter().filter(|e| e.issuer == subject) {
            let serial = unhex(&entry.serial).ok_or_else(|| PkiError::Parse {
                what: "index",
                path: paths.index(),
                reason: format!("serial {:?} is not hex", entry.serial),
            })?;
            if !revoked.iter().any(|r| r.serial_number.as_ref() == serial.as_slice()) {
                revoked.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: now,
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                });
            }
        }
        total += revoked.len();
        out.push(ca.crl_pem(revoked, number)?);
    }
    // The counter first: a crash after it leaves a gap, never a repeat.
    write_file(&paths.crl_number(), format!("{number}\n").as_bytes(), 0o644)?;
    write_file(&crl_path, out.concat().as_bytes(), 0o644)?;
    Ok((number, total))
}

/// The next CRL number of a directory: one more than the counter kept
/// beside the CA (`crl-number`) and than any number in its CRLs (those of
/// gen-certs before the counter were Unix seconds), so numbers only grow.
fn next_crl_number(paths: &PkiPaths, blocks: &[CrlBlock]) -> Result<u64, PkiError> {
    let path = paths.crl_number();
    let counter = if path.exists() {
        let text = read_to_string(&path)?;
        text.trim().parse::<u64>().map_err(|_| PkiError::Parse {
            what: "CRL number counter",
            path: path.clone(),
            reason: format!("{:?} is not a number", text.trim()),
        })?
    } else {
        0
    };
    let in_crls = blocks.iter().filter_map(|b| b.number).max().unwrap_or(0);
    Ok(counter.max(in_crls) + 1)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// How a certificate of the index stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertState {
    Valid,
    Expired,
    /// Listed in the issuer's CRL in `crl.pem` since this time (Unix seconds).
    Revoked(i64),
}

/// The index of `dir` with each certificate's state: revoked if its
/// issuer's CRL in `crl.pem` lists it (what servers loading it see),
/// otherwise expired or valid.
pub fn list(dir: &Path) -> Result<Vec<(IndexEntry, CertState)>, PkiError> {
    let paths = PkiPaths::new(dir);
    let index = Index::load(&paths)?;
    let blocks = read_crls(&paths.crl())?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let issuers: Vec<(String, &CrlBlock)> = blocks.iter().map(|b| (b.issuer_text.clone(), b)).collect();
    Ok(index
        .entries
        .into_iter()
        .map(|e| {
            let revoked = issuers
                .iter()
                .filter(|(issuer, _)| *issuer == e.issuer)
                .flat_map(|(_, b)| &b.revoked)
                .find(|(serial, _)| normalise_serial(&hex(serial)) == normalise_serial(&e.serial));
            let state = match revoked {
                Some((_, at)) => CertState::Revoked(at.unix_timestamp()),
                None if e.not_after <= now => CertState::Expired,
                None => CertState::Valid,
            };
            (e, state)
        })
        .collect())
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
        let blocks = read_crls(&paths.crl())?;
        let number = next_crl_number(&paths, &blocks)?;
        let mut crls: Vec<String> = blocks.into_iter().map(|b| b.pem).collect();
        crls.push(new.crl_pem(Vec::new(), number)?);
        write_file(&paths.crl_number(), format!("{number}\n").as_bytes(), 0o644)?;
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

/// One CRL of a PEM file: its text, issuer (raw DER name and text), CRL
/// number and revoked serials (DER bytes) with their revocation times.
struct CrlBlock {
    pem: String,
    issuer: Vec<u8>,
    issuer_text: String,
    number: Option<u64>,
    revoked: Vec<(Vec<u8>, OffsetDateTime)>,
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
        let number = crl.crl_number().and_then(|n| u64::try_from(n).ok());
        let revoked = crl.iter_revoked_certificates().map(|r| (r.raw_serial().to_vec(), r.revocation_date.to_datetime())).collect();
        blocks.push(CrlBlock { pem, issuer: crl.issuer().as_raw().to_vec(), issuer_text: crl.issuer().to_string(), number, revoked });
    }
    Ok(blocks)
}

/// Refuses a CA key that another user owns, or that its group or others
/// may read or write: whoever can read it can issue certificates for any
/// tenant, and a key someone else owns may not be the one meant.
pub fn check_ca_key(path: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| PkiError::Io { action: "read", path: path.into(), source })?;
    let mode = meta.mode() & 0o777;
    let me = rustix::process::geteuid().as_raw();
    let problem = if meta.uid() != me {
        format!("it is owned by uid {}, not by the user running gen-certs (uid {me})", meta.uid())
    } else if mode & 0o077 != 0 {
        format!("its mode is {mode:04o}: group or others may read or write it")
    } else {
        return Ok(());
    };
    Err(PkiError::UnsafeCaKey { path: path.into(), problem })
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
