//! Client identity: which tenant a client certificate speaks for.
//!
//! A tenant is named by the certificate's URI SAN
//! `spiffe://<trust-domain>/tenant/<name>`. [`tenant_from_cert`] is the one
//! pure function that turns a verified leaf certificate into a [`TenantId`].
//! The server applies it once per connection, right after the handshake
//! ([`PeerIdentity`]), and [`TenantInterceptor`] puts the tenant in each
//! request's extensions (or refuses the request). Handlers read the tenant from there and never
//! look at certificates. Anything that does not name exactly one tenant of
//! our trust domain is refused (deny by default).
//!
//! This module does not verify certificate chains: rustls has done that
//! during the handshake, before any request reaches the interceptor.

use std::{fmt, net::SocketAddr, sync::Arc};

use thiserror::Error;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// Longest accepted tenant name, in bytes.
pub const MAX_TENANT_LEN: usize = 63;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TenantIdError {
    #[error("invalid tenant name {0:?}: use 1 to 63 characters from a-z, 0-9, '-' and '_', starting with a letter or digit")]
    InvalidTenant(String),
    #[error("invalid trust domain {0:?}: use a lowercase DNS-style name (a-z, 0-9, '-', '.')")]
    InvalidTrustDomain(String),
}

/// A tenant's name, as it appears in its certificate and in config.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    pub fn parse(name: &str) -> Result<Self, TenantIdError> {
        let ok = (1..=MAX_TENANT_LEN).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && name.as_bytes()[0].is_ascii_alphanumeric();
        if ok { Ok(Self(name.into())) } else { Err(TenantIdError::InvalidTenant(name.into())) }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `(unserved)`: the memory account of connections whose certificate
    /// names no tenant served here. [`TenantId::parse`] never makes it
    /// (parentheses), so no tenant's name collides with it.
    pub fn unserved() -> Self {
        Self("(unserved)".into())
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE trust domain, e.g. `imgsvc.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    pub fn parse(name: &str) -> Result<Self, TenantIdError> {
        let ok = (1..=255).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !name.starts_with(['.', '-'])
            && !name.ends_with(['.', '-']);
        if ok { Ok(Self(name.into())) } else { Err(TenantIdError::InvalidTrustDomain(name.into())) }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The URI SAN that names `tenant` in this trust domain.
    pub fn tenant_uri(&self, tenant: &TenantId) -> String {
        format!("spiffe://{}/tenant/{}", self.0, tenant)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a certificate names no tenant. Every variant becomes UNAUTHENTICATED.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the client certificate has no URI SAN of the form spiffe://{trust_domain}/tenant/<name>")]
    NoTenantUri { trust_domain: String },
    #[error("the client certificate names tenant URI {uri:?}, which is not in trust domain {trust_domain:?}")]
    ForeignTrustDomain { uri: String, trust_domain: String },
    #[error("the client certificate has several URI SANs ({uris}); a tenant certificate has exactly one")]
    SeveralUris { uris: String },
    #[error("the client certificate is not issued for client authentication (no extended key usage clientAuth)")]
    NoClientAuthUsage,
    #[error("the client certificate names an invalid tenant: {0}")]
    InvalidTenant(#[from] TenantIdError),
}

/// Maps a (chain-verified) leaf certificate, DER-encoded, to its tenant.
///
/// A tenant certificate carries the clientAuth extended key usage (rustls,
/// like RFC 5280, accepts a certificate with no extended key usage at all
/// for any purpose; we do not) and exactly one URI SAN, as a SPIFFE
/// X.509-SVID does: `spiffe://<trust-domain>/tenant/<name>`. DNS names and
/// other SAN types beside it are ignored.
pub fn tenant_from_cert(der: &[u8], trust_domain: &TrustDomain) -> Result<TenantId, IdentityError> {
    let malformed = |e: x509_parser::error::X509Error| IdentityError::Malformed(e.to_string());
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    if !cert.extended_key_usage().map_err(malformed)?.is_some_and(|eku| eku.value.client_auth) {
        return Err(IdentityError::NoClientAuthUsage);
    }
    let san = cert.subject_alternative_name().map_err(malformed)?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| if let GeneralName::URI(uri) = name { Some(*uri) } else { None })
        .collect();
    let uri = match uris[..] {
        [] => return Err(IdentityError::NoTenantUri { trust_domain: trust_domain.to_string() }),
        [uri] => uri,
        _ => return Err(IdentityError::SeveralUris { uris: uris.join(", ") }),
    };
    match uri.strip_prefix(&format!("spiffe://{trust_domain}/tenant/")) {
        Some(tenant) => Ok(TenantId::parse(tenant)?),
        None if uri.starts_with("spiffe://") => {
            Err(IdentityError::ForeignTrustDomain { uri: uri.to_string(), trust_domain: trust_domain.to_string() })
        }
        None => Err(IdentityError::NoTenantUri { trust_domain: trust_domain.to_string() }),
    }
}

/// The authenticated tenant of a request, put in its extensions by
/// [`TenantInterceptor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant(pub TenantId);

/// What the server knows of a connection's peer once the TLS handshake is
/// done: its address and the tenant its certificate names, or why it names
/// none. Decided once per connection (parsing the certificate per request
/// cost ~4% of the CPU of small requests); the trust domain only changes on
/// restart, so the answer cannot go stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub remote_addr: Option<SocketAddr>,
    pub tenant: Result<TenantId, IdentityError>,
}

impl PeerIdentity {
    /// The tenant as logs and metric labels name it: `-` for a peer
    /// without one.
    pub fn tenant_label(&self) -> String {
        self.tenant.as_ref().map_or_else(|_| "-".to_string(), |t| t.to_string())
    }

    /// The identity of a peer that presented `certs` (leaf first).
    pub fn of(
        remote_addr: Option<SocketAddr>,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
        trust_domain: &TrustDomain,
    ) -> Self {
        let leaf = certs.and_then(|c| c.first()).ok_or(IdentityError::NoCertificate);
        Self { remote_addr, tenant: leaf.and_then(|der| tenant_from_cert(der, trust_domain)) }
    }
}

/// Puts the connection's tenant ([`PeerIdentity`], attached by the server's
/// connection info) into every request's extensions, and refuses requests
/// without a tenant with UNAUTHENTICATED.
#[derive(Clone, Copy, Debug, Default)]
pub struct TenantInterceptor;

impl tonic::service::Interceptor for TenantInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let identity = request.extensions().get::<PeerIdentity>();
        let remote = identity.and_then(|i| i.remote_addr);
        let tenant = identity.map_or(Err(IdentityError::NoCertificate), |i| i.tenant.clone()).map_err(|e| {
            tracing::warn!(remote = ?remote, error = %e, "refused request: no tenant");
            crate::telemetry::metrics::unauthenticated();
            tonic::Status::unauthenticated(e.to_string())
        })?;
        request.extensions_mut().insert(Tenant(tenant));
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn cert_with_sans(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn the_interceptor_passes_the_connections_tenant_and_refuses_connections_without_one() {
        use tonic::service::Interceptor;
        let der = cert_with_sans(vec![uri("spiffe://example.org/tenant/team-a")]);
        let certs = [rustls::pki_types::CertificateDer::from(der)];
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let with = |identity: Option<PeerIdentity>| {
            let mut request = tonic::Request::new(());
            if let Some(identity) = identity {
                request.extensions_mut().insert(identity);
            }
            TenantInterceptor.call(request)
        };
        let ok = with(Some(PeerIdentity::of(Some(addr), Some(&certs), &td()))).unwrap();
        assert_eq!(ok.extensions().get::<Tenant>().map(|t| t.0.as_str()), Some("team-a"));
        let foreign = PeerIdentity::of(Some(addr), Some(&certs), &TrustDomain::parse("other.org").unwrap());
        let refused = with(Some(foreign)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(refused.message().contains("not in trust domain \"other.org\""), "{}", refused.message());
        assert_eq!(PeerIdentity::of(Some(addr), None, &td()).tenant, Err(IdentityError::NoCertificate));
        let missing = with(None).unwrap_err();
        assert_eq!((missing.code(), missing.message()), (tonic::Code::Unauthenticated, "no client certificate was presented"));
    }

    #[test]
    fn maps_tenant_uri_to_tenant() {
        let der = cert_with_sans(vec![uri("spiffe://example.org/tenant/team-a")]);
        assert_eq!(tenant_from_cert(&der, &td()).unwrap().as_str(), "team-a");
    }

    #[test]
    fn ignores_other_san_types_beside_the_tenant_uri() {
        let der = cert_with_sans(vec![
            SanType::DnsName("client.example.org".try_into().unwrap()),
            uri("spiffe://example.org/tenant/b"),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
        ]);
        assert_eq!(tenant_from_cert(&der, &td()).unwrap().as_str(), "b");
    }

    #[test]
    fn refuses_a_second_uri_san_even_a_foreign_one() {
        // SPIFFE X.509-SVIDs have exactly one URI SAN.
        for second in ["spiffe://evil.org/tenant/b", "https://example.org/whatever", "spiffe://example.org/tenant/b"] {
            let der = cert_with_sans(vec![uri("spiffe://example.org/tenant/a"), uri(second)]);
            assert_eq!(
                tenant_from_cert(&der, &td()),
                Err(IdentityError::SeveralUris { uris: format!("spiffe://example.org/tenant/a, {second}") }),
                "{second}"
            );
        }
    }

    #[test]
    fn refuses_a_certificate_without_the_client_auth_usage() {
        let key = KeyPair::generate().unwrap();
        for usages in [vec![], vec![ExtendedKeyUsagePurpose::ServerAuth]] {
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![uri("spiffe://example.org/tenant/a")];
            params.extended_key_usages = usages.clone();
            let der = params.self_signed(&key).unwrap().der().to_vec();
            assert_eq!(tenant_from_cert(&der, &td()), Err(IdentityError::NoClientAuthUsage), "{usages:?}");
        }
    }

    #[test]
    fn refuses_certificate_without_uri_san() {
        let der = cert_with_sans(vec![SanType::DnsName("localhost".try_into().unwrap())]);
        assert_eq!(tenant_from_cert(&der, &td()), Err(IdentityError::NoTenantUri { trust_domain: "example.org".into() }));
    }

    #[test]
    fn refuses_tenant_of_another_trust_domain() {
        let der = cert_with_sans(vec![uri("spiffe://evil.org/tenant/a")]);
        assert_eq!(
            tenant_from_cert(&der, &td()),
            Err(IdentityError::ForeignTrustDomain { uri: "spiffe://evil.org/tenant/a".into(), trust_domain: "example.org".into() })
        );
    }

    #[test]
    fn refuses_trust_domain_that_only_shares_a_prefix() {
        let der = cert_with_sans(vec![uri("spiffe://example.org.evil/tenant/a")]);
        assert!(matches!(tenant_from_cert(&der, &td()), Err(IdentityError::ForeignTrustDomain { .. })));
    }

    #[test]
    fn refuses_invalid_tenant_names() {
        for bad in ["", "A", "a/b", "-a", "a b", &"x".repeat(64)] {
            let der = cert_with_sans(vec![uri(&format!("spiffe://example.org/tenant/{bad}"))]);
            assert_eq!(
                tenant_from_cert(&der, &td()),
                Err(IdentityError::InvalidTenant(TenantIdError::InvalidTenant(bad.into()))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_garbage_der() {
        assert!(matches!(tenant_from_cert(b"not a certificate", &td()), Err(IdentityError::Malformed(_))));
    }

    #[test]
    fn trust_domain_validation() {
        assert!(TrustDomain::parse("imgsvc.local").is_ok());
        for bad in ["", "Upper.case", "a/b", ".lead", "trail-"] {
            assert_eq!(TrustDomain::parse(bad), Err(TenantIdError::InvalidTrustDomain(bad.into())));
        }
    }
}
