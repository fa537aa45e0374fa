//! gen-certs: the files it writes, their permissions and usages, reuse of an
//! existing CA (earlier certificates stay valid), and refusal to replace it.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use crate::common::*;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

fn gen_certs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gen-certs")).args(args).output().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn der(path: &Path) -> Vec<u8> {
    imgsvc::tls::read_certs("test", path).unwrap()[0].to_vec()
}

#[test]
fn writes_ca_server_and_tenant_files_with_private_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let result = gen_certs(&["--out", out.to_str().unwrap(), "--tenant", "team-a", "--tenant", "team-b"]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ca-key.pem",
            "ca.pem",
            "client-team-a-key.pem",
            "client-team-a.pem",
            "client-team-b-key.pem",
            "client-team-b.pem",
            "server-key.pem",
            "server.pem"
        ]
    );
    for name in &names {
        let want = if name.ends_with("-key.pem") { 0o600 } else { 0o644 };
        assert_eq!(mode(&out.join(name)), want, "{name}");
    }
}

#[test]
fn certificates_carry_the_right_usages_names_and_tenant_uri() {
    use x509_parser::extensions::ParsedExtension;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let result = gen_certs(&[
        "--out",
        out.to_str().unwrap(),
        "--trust-domain",
        "corp.example",
        "--tenant",
        "team-a",
        "--server-name",
        "imgsvc.corp.example",
        "--server-name",
        "10.1.2.3",
    ]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));

    let ca_der = der(&out.join("ca.pem"));
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca.is_ca());

    let server_der = der(&out.join("server.pem"));
    let (_, server) = X509Certificate::from_der(&server_der).unwrap();
    let eku = server.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let sans: Vec<String> = server.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|n| n.to_string()).collect();
    assert_eq!(sans, ["DNSName(imgsvc.corp.example)", "IPAddress(0a:01:02:03)"]);

    let client_der = der(&out.join("client-team-a.pem"));
    let (_, client) = X509Certificate::from_der(&client_der).unwrap();
    let eku = client.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let uris: Vec<&str> = client
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
        .collect();
    assert_eq!(uris, ["spiffe://corp.example/tenant/team-a"]);
    assert!(client.extensions().iter().any(|e| matches!(e.parsed_extension(), ParsedExtension::AuthorityKeyIdentifier(_))));
    // The one identity function agrees.
    let td = imgsvc::identity::TrustDomain::parse("corp.example").unwrap();
    assert_eq!(imgsvc::identity::tenant_from_cert(&client_der, &td).unwrap().as_str(), "team-a");
}

#[test]
fn adding_a_tenant_later_reuses_the_ca_and_keeps_earlier_certificates_valid() {
    let pki = Pki::new(&["first"]);
    let out = pki.dir.path().to_str().unwrap();
    let (ca_before, server_before, first_before) = (
        std::fs::read(pki.paths().ca_cert()).unwrap(),
        std::fs::read(pki.paths().server_cert()).unwrap(),
        std::fs::read(pki.client_files("first").1).unwrap(),
    );
    let result = gen_certs(&["--out", out, "--trust-domain", TRUST_DOMAIN, "--tenant", "second"]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert!(String::from_utf8_lossy(&result.stdout).contains("reused the CA"));
    assert_eq!(std::fs::read(pki.paths().ca_cert()).unwrap(), ca_before);
    assert_eq!(std::fs::read(pki.paths().server_cert()).unwrap(), server_before, "server certificate kept");
    assert_eq!(std::fs::read(pki.client_files("first").1).unwrap(), first_before);

    // Both tenants' certificates work against a server using that CA.
    let server = TestServer::start(&pki);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for tenant in ["first", "second"] {
        rt.block_on(imgsvc::client::connect(&target(server.port()), &pki.credentials(tenant))).unwrap();
    }
}

#[test]
fn never_replaces_an_existing_ca_without_force() {
    let pki = Pki::new(&[]);
    let out = pki.dir.path().to_str().unwrap();
    let ca_before = std::fs::read(pki.paths().ca_cert()).unwrap();
    assert!(gen_certs(&["--out", out]).status.success());
    assert_eq!(std::fs::read(pki.paths().ca_cert()).unwrap(), ca_before, "plain re-run keeps the CA");

    let forced = gen_certs(&["--out", out, "--force"]);
    assert!(forced.status.success());
    assert_ne!(std::fs::read(pki.paths().ca_cert()).unwrap(), ca_before, "--force makes a new CA");
    assert_eq!(mode(&pki.paths().ca_key()), 0o600);
}

#[test]
fn refuses_a_ca_certificate_without_its_key() {
    let pki = Pki::new(&[]);
    std::fs::remove_file(pki.paths().ca_key()).unwrap();
    let result = gen_certs(&["--out", pki.dir.path().to_str().unwrap(), "--tenant", "a"]);
    assert_eq!(result.status.code(), Some(1));
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("ca.pem exists but") && err.contains("ca-key.pem does not"), "{err}");
    assert!(!pki.dir.path().join("client-a.pem").exists());
}

#[test]
fn refuses_invalid_tenant_names_as_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let result = gen_certs(&["--out", dir.path().to_str().unwrap(), "--tenant", "Team A"]);
    assert_eq!(result.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&result.stderr).contains("invalid tenant name \"Team A\""));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
}

#[test]
fn revoke_adds_each_tenant_certificate_to_the_crl_and_keeps_earlier_entries() {
    use x509_parser::revocation_list::CertificateRevocationList;
    let pki = Pki::new(&["a", "b", "c"]);
    let out = pki.dir.path().to_str().unwrap();
    for tenant in ["a", "b"] {
        let result = gen_certs(&["--out", out, "--revoke", tenant]);
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    }
    let pem = std::fs::read(pki.paths().crl()).unwrap();
    use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
    let crl_der = CertificateRevocationListDer::from_pem_slice(&pem).unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
    let revoked: Vec<Vec<u8>> = crl.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()).collect();
    let serial = |t: &str| {
        let d = der(&pki.client_files(t).1);
        X509Certificate::from_der(&d).unwrap().1.raw_serial().to_vec()
    };
    assert_eq!(revoked, vec![serial("a"), serial("b")]);
    assert!(!revoked.contains(&serial("c")));
    // Signed by the CA.
    let ca_der = der(&pki.paths().ca_cert());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(crl.verify_signature(ca.public_key()).is_ok());
}

#[test]
fn revoke_of_a_tenant_without_certificate_fails_naming_the_file() {
    let pki = Pki::new(&["a"]);
    let result = gen_certs(&["--out", pki.dir.path().to_str().unwrap(), "--revoke", "ghost"]);
    assert_eq!(result.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&result.stderr).contains("client-ghost.pem"));
    assert!(!pki.paths().crl().exists());
}
