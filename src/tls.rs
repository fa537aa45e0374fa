//! TLS configuration: mutual TLS only, TLS 1.2 and 1.3, ring as the crypto
//! provider.
//!
//! The server owns a [`rustls::ServerConfig`] (instead of tonic's
//! `ServerTlsConfig`) so that the accept loop in [`crate::serving::server`] controls
//! handshake timeouts and logs refused handshakes; client certificates must
//! chain to the configured client CA, and there is no way to switch that
//! off. The client side builds tonic's `ClientTlsConfig` from PEM files.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use thiserror::Error;
use x509_parser::prelude::FromDer;

use crate::config::TlsSettings;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}: {reason}")]
    Pem { what: &'static str, path: PathBuf, expected: &'static str, reason: String },
    #[error("client CA {path} is not usable as a trust anchor")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier from {path}")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error(
        "CRL {path} (issuer {issuer}) expired at {next_update} (its nextUpdate): loaded, it would make the server refuse every client of that CA; sign a fresh one (gen-certs --renew-crl, or your CA's)"
    )]
    CrlExpired { path: PathBuf, issuer: String, next_update: String },
    #[error("server certificate {cert} and key {key} do not form a usable identity")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The process-wide crypto provider. Installed once so that every rustls
/// user in the process (ours and tonic's) agrees on it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A loaded server TLS configuration, plus facts for the startup log.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// Subject of the client CA, for the startup summary.
    pub client_ca_subject: String,
    /// When each loaded certificate expires (server chain and client CAs),
    /// and when each CRL must be replaced (its nextUpdate).
    pub validity: Vec<CertificateValidity>,
    /// Identifies the certificates and CRLs loaded (not the key: a new key
    /// comes with a new certificate), so that a reload can tell whether
    /// anything changed.
    pub fingerprint: u64,
}

/// When one certificate the server loaded stops being valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateValidity {
    /// `server` (the leaf), `server_chain:<subject>` (an intermediate sent
    /// with it), `client_ca:<subject>` or `crl:<issuer>` (a CRL's
    /// nextUpdate): the label of the expiry gauge.
    pub certificate: String,
    /// Seconds since the Unix epoch (notAfter; a CRL's nextUpdate).
    pub not_after: i64,
}

impl std::fmt::Debug for ServerTls {
    // ServerConfig holds the private key: print none of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("client_ca_subject", &self.client_ca_subject).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the server identity and the client CA.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsError> {
        let chain = read_certs("server certificate", &settings.cert)?;
        let key = read_key("server key", &settings.key)?;
        let ca_certs = read_certs("client CA", &settings.client_ca)?;

        let mut roots = RootCertStore::empty();
        for ca in &ca_certs {
            roots.add(ca.clone()).map_err(|source| TlsError::ClientCa { path: settings.client_ca.clone(), source })?;
        }
        let provider = crypto_provider();
        let mut crls = Vec::new();
        let mut crl_validity = Vec::new();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for path in &settings.crl_files {
            let pem = read_file("CRL", path)?;
            let parsed = CertificateRevocationListDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem {
                what: "CRL",
                path: path.clone(),
                expected: "X509 CRL",
                reason: e.to_string(),
            })?;
            if parsed.is_empty() {
                return Err(TlsError::Pem {
                    what: "CRL",
                    path: path.clone(),
                    expected: "X509 CRL",
                    reason: "no X509 CRL block found".into(),
                });
            }
            for crl in &parsed {
                let (issuer, next_update) =
                    crl_facts(crl).map_err(|reason| TlsError::Pem { what: "CRL", path: path.clone(), expected: "X509 CRL", reason })?;
                if let Some(next_update) = next_update {
                    if next_update <= now {
                        return Err(TlsError::CrlExpired { path: path.clone(), issuer, next_update: utc_text(next_update) });
                    }
                    crl_validity.push(CertificateValidity { certificate: format!("crl:{issuer}"), not_after: next_update });
                }
            }
            crls.extend(parsed);
        }
        let (chain_copy, crl_copy) = (chain.clone(), crls.clone());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(crls)
            // A CRL past its nextUpdate no longer says what is revoked: every
            // certificate of its CA is refused (the expiry gauge and warnings
            // say so 14 days ahead; a load refuses an expired one outright).
            .enforce_revocation_expiration()
            .build()
            .map_err(|source| TlsError::Verifier { path: settings.client_ca.clone(), source })?;
        let identity_err = |source| TlsError::Identity { cert: settings.cert.clone(), key: settings.key.clone(), source };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(identity_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(identity_err)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption, TLS 1.2 or 1.3: rustls restores a resumed
        // session's client certificate without verifying it again, so a
        // certificate that expired or was revoked since would be let in.
        // Every handshake is a full one, checked against the roots, CRLs and
        // the clock of now (docs/security.md#session-resumption has the
        // measured cost: gRPC connections are long-lived).
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        // Kernel TLS takes the traffic secrets over after the handshake
        // (crate::serving::kernel_tls); rustls hands them out only if asked.
        config.enable_secret_extraction = settings.kernel_tls != crate::config::KernelTlsMode::Off;
        let mut validity = Vec::with_capacity(chain_copy.len() + ca_certs.len());
        for (i, cert) in chain_copy.iter().enumerate() {
            let label = if i == 0 { "server".to_string() } else { format!("server_chain:{}", subject_of(cert)) };
            validity.extend(not_after(cert).map(|not_after| CertificateValidity { certificate: label, not_after }));
        }
        for ca in &ca_certs {
            let label = format!("client_ca:{}", subject_of(ca));
            validity.extend(not_after(ca).map(|not_after| CertificateValidity { certificate: label, not_after }));
        }
        validity.extend(crl_validity);
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (&chain_copy, &ca_certs, &crl_copy).hash(&mut hasher);
            hasher.finish()
        };
        Ok(Self { config: Arc::new(config), client_ca_subject: subject_of(&ca_certs[0]), validity, fingerprint })
    }
}

/// A CRL's issuer (text) and nextUpdate (seconds since the Unix epoch).
fn crl_facts(der: &CertificateRevocationListDer<'_>) -> Result<(String, Option<i64>), String> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).map_err(|e| e.to_string())?;
    Ok((crl.issuer().to_string(), crl.next_update().map(|t| t.timestamp())))
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_text(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!("{} {:02}:{:02}:{:02} UTC", t.date(), t.hour(), t.minute(), t.second()),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

/// The notAfter of a DER certificate, in seconds since the Unix epoch.
fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::certificate::X509Certificate::from_der(der).ok().map(|(_, c)| c.validity().not_after.timestamp())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source })
}

/// All certificates in a PEM file; at least one.
pub fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let pem_err = |reason: String| TlsError::Pem { what, path: path.into(), expected: "CERTIFICATE", reason };
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(what, path)?;
    // The parser's error never includes key bytes.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what,
        path: path.into(),
        expected: "PRIVATE KEY",
        reason: e.to_string(),
    })
}

/// The subject of a DER certificate as text, or a placeholder.
pub fn subject_of(der: &CertificateDer<'_>) -> String {
    x509_parser::certificate::X509Certificate::from_der(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|_| "<unparsable subject>".into())
}

/// PEM material for a client: CA to trust, and the client's identity.
#[derive(Clone)]
pub struct ClientCredentials {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials").finish_non_exhaustive()
    }
}

impl ClientCredentials {
    /// Reads the three PEM files once each and checks that they parse.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let creds = Self {
            ca_pem: read_file("CA certificate", ca)?,
            cert_pem: read_file("client certificate", cert)?,
            key_pem: read_file("client key", key)?,
        };
        let pem_err = |what, path: &Path, expected, reason: String| TlsError::Pem { what, path: path.into(), expected, reason };
        for (what, path, pem) in [("CA certificate", ca, &creds.ca_pem), ("client certificate", cert, &creds.cert_pem)] {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(what, path, "CERTIFICATE", e.to_string()))?;
            if certs.is_empty() {
                return Err(pem_err(what, path, "CERTIFICATE", "no CERTIFICATE block found".into()));
            }
        }
        PrivateKeyDer::from_pem_slice(&creds.key_pem).map_err(|e| pem_err("client key", key, "PRIVATE KEY", e.to_string()))?;
        Ok(creds)
    }

    /// A rustls client config: trusts only the given CA, presents the
    /// client certificate, speaks HTTP/2.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let pem_err =
            |what, expected, reason: String| TlsError::Pem { what, path: PathBuf::from("(client credentials)"), expected, reason };
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let ca = ca.map_err(|e| pem_err("CA certificate", "CERTIFICATE", e.to_string()))?;
            roots.add(ca).map_err(|source| TlsError::ClientCa { path: PathBuf::from("(client --ca)"), source })?;
        }
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("client certificate", "CERTIFICATE", e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| pem_err("client key", "PRIVATE KEY", e.to_string()))?;
        let identity_err = |source| TlsError::Identity { cert: "(client --cert)".into(), key: "(client --key)".into(), source };
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(identity_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(identity_err)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}
