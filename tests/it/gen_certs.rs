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
            "index.tsv",
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
fn never_replaces_an_existing_ca_without_replace_ca() {
    let pki = Pki::new(&[]);
    let out = pki.dir.path().to_str().unwrap();
    let ca_before = std::fs::read(pki.paths().ca_cert()).unwrap();
    assert!(gen_certs(&["--out", out]).status.success());
    assert_eq!(std::fs::read(pki.paths().ca_cert()).unwrap(), ca_before, "plain re-run keeps the CA");
    // --force (overwrite a tenant's certificate) alone is a usage error, not a new CA.
    let forced = gen_certs(&["--out", out, "--force"]);
    assert_eq!(forced.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&forced.stderr),
        "gen-certs: error: --force lets --tenant overwrite an existing certificate, and none was given; to replace the CA, use --replace-ca\n"
    );
    assert_eq!(std::fs::read(pki.paths().ca_cert()).unwrap(), ca_before);

    let replaced = gen_certs(&["--out", out, "--replace-ca"]);
    assert!(replaced.status.success());
    assert_ne!(std::fs::read(pki.paths().ca_cert()).unwrap(), ca_before, "--replace-ca makes a new CA");
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
    let dir = pki.dir.path().display();
    assert_eq!(
        String::from_utf8_lossy(&result.stderr),
        format!(
            "gen-certs: error: nothing to revoke for every certificate of tenant ghost: not found in {dir}/index.tsv and {dir}/client-ghost.pem\n"
        )
    );
    assert!(!pki.paths().crl().exists());
}

fn gen_certs_ok(args: &[&str]) -> String {
    let out = gen_certs(args);
    assert!(out.status.success(), "gen-certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `openssl verify -crl_check` of `cert` against the directory's CA and
/// CRL: "OK", or openssl's reason.
fn openssl_verify(dir: &Path, cert: &Path) -> String {
    if !command_succeeds("openssl", &["version"]) {
        assert!(apt_get_available(), "the openssl CLI is not installed, and apt-get is not available to install it");
        apt_get_install("openssl");
    }
    let out = Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg("-CRLfile")
        .arg(dir.join("crl.pem"))
        .arg(cert)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        assert!(text.trim_end().ends_with(": OK"), "{text}");
        "OK".into()
    } else if text.contains("certificate revoked") {
        "revoked".into()
    } else {
        text
    }
}

/// The CRL numbers in `crl.pem`, in order.
fn crl_numbers(dir: &Path) -> Vec<u64> {
    use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
    use x509_parser::revocation_list::CertificateRevocationList;
    CertificateRevocationListDer::pem_file_iter(dir.join("crl.pem"))
        .unwrap()
        .map(|der| {
            let der = der.unwrap();
            let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
            u64::try_from(crl.crl_number().unwrap()).unwrap()
        })
        .collect()
}

fn serial_hex(path: &Path) -> String {
    let d = der(path);
    X509Certificate::from_der(&d).unwrap().1.raw_serial().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn reissuing_a_tenant_takes_force_and_keeps_the_old_serial_in_the_index() {
    let pki = Pki::new(&["c"]);
    let out = pki.dir.path().to_str().unwrap();
    let cert = pki.client_files("c").1;
    let (first, first_serial) = (std::fs::read(&cert).unwrap(), serial_hex(&cert));
    let refused = gen_certs(&["--out", out, "--tenant", "c"]);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.starts_with(&format!(
            "gen-certs: error: {} already holds tenant c's certificate (serial {first_serial}, valid until ",
            cert.display()
        )) && said.ends_with(&format!(
            "); pass --force to issue a new one (the old one stays valid until revoked: gen-certs --revoke-serial {first_serial})\n"
        )),
        "{said}"
    );
    assert_eq!(std::fs::read(&cert).unwrap(), first, "nothing overwritten");

    gen_certs_ok(&["--out", out, "--tenant", "c", "--force"]);
    let second_serial = serial_hex(&cert);
    assert_ne!(second_serial, first_serial);
    let listed = gen_certs_ok(&["--out", out, "--list"]);
    let rows: Vec<Vec<&str>> = listed.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let tenant_c: Vec<(&str, &str)> = rows.iter().filter(|r| r[1] == "c").map(|r| (r[0], r[5])).collect();
    assert_eq!(tenant_c, [(first_serial.as_str(), "valid"), (second_serial.as_str(), "valid")], "{listed}");
    assert!(rows.iter().any(|r| r[1] == "(server)"), "{listed}");
}

/// Revocation by serial, by file and by tenant, each checked by openssl
/// against the old and the new certificate; CRL numbers grow by one per
/// CRL written, however fast.
#[test]
fn revokes_by_serial_file_and_tenant_as_openssl_verify_sees_it() {
    let pki = Pki::new(&["s", "f", "t"]);
    let dir = pki.dir.path();
    let out = dir.to_str().unwrap();
    // Each tenant reissued; the first certificates kept aside, as a leak would be.
    let mut old = std::collections::BTreeMap::new();
    for tenant in ["s", "f", "t"] {
        let cert = pki.client_files(tenant).1;
        let kept = dir.join(format!("old-{tenant}.pem"));
        std::fs::copy(&cert, &kept).unwrap();
        gen_certs_ok(&["--out", out, "--tenant", tenant, "--force"]);
        old.insert(tenant, kept);
    }
    let new = |tenant: &str| pki.client_files(tenant).1;

    // By serial (colons and upper case, as openssl prints serials): the old one only.
    let serial = serial_hex(&old["s"]);
    let colons = serial.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap().to_uppercase()).collect::<Vec<_>>().join(":");
    let said = gen_certs_ok(&["--out", out, "--revoke-serial", &colons]);
    assert!(said.contains(&format!("revoked serial {serial} (tenant s, client-s.pem, issued by ")), "{said}");
    assert_eq!((openssl_verify(dir, &old["s"]), openssl_verify(dir, &new("s"))), ("revoked".into(), "OK".into()));

    // By file: that certificate only.
    gen_certs_ok(&["--out", out, "--revoke-cert", old["f"].to_str().unwrap()]);
    assert_eq!((openssl_verify(dir, &old["f"]), openssl_verify(dir, &new("f"))), ("revoked".into(), "OK".into()));

    // By tenant: every certificate it was issued, the overwritten one too.
    gen_certs_ok(&["--out", out, "--revoke", "t"]);
    assert_eq!((openssl_verify(dir, &old["t"]), openssl_verify(dir, &new("t"))), ("revoked".into(), "revoked".into()));
    // The others' current certificates are untouched.
    assert_eq!((openssl_verify(dir, &new("s")), openssl_verify(dir, &new("f"))), ("OK".into(), "OK".into()));

    // Three CRLs in well under three seconds: numbered 1, 2, 3; then 4.
    assert_eq!(crl_numbers(dir), [3]);
    gen_certs_ok(&["--out", out, "--renew-crl"]);
    assert_eq!(crl_numbers(dir), [4]);
    assert_eq!(std::fs::read_to_string(dir.join("crl-number")).unwrap(), "4\n");

    let listed = gen_certs_ok(&["--out", out, "--list"]);
    let revoked: Vec<&str> = listed.lines().filter(|l| l.contains(" revoked ")).map(|l| l.split_whitespace().next().unwrap()).collect();
    let mut want = vec![serial.clone(), serial_hex(&old["f"]), serial_hex(&old["t"]), serial_hex(&new("t"))];
    want.sort();
    let mut revoked: Vec<String> = revoked.into_iter().map(String::from).collect();
    revoked.sort();
    assert_eq!(revoked, want, "{listed}");

    // A serial the index does not know is refused, saying how else to revoke.
    let unknown = gen_certs(&["--out", out, "--revoke-serial", "abcdef"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        format!(
            "gen-certs: error: nothing to revoke for serial abcdef: not found in {out}/index.tsv (revoke a certificate it does not list by its file: --revoke-cert FILE)\n"
        )
    );
}

#[test]
fn refuses_a_ca_key_that_group_or_others_may_read() {
    let pki = Pki::new(&[]);
    let key = pki.paths().ca_key();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let result = gen_certs(&["--out", pki.dir.path().to_str().unwrap(), "--tenant", "a"]);
    assert_eq!(result.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&result.stderr),
        format!(
            "gen-certs: error: refusing to use the CA key {}: its mode is 0640: group or others may read or write it (it signs every certificate; chmod 600 it, owned by the user running gen-certs)\n",
            key.display()
        )
    );
    assert!(!pki.dir.path().join("client-a.pem").exists());
}

/// During a CA rotation, the first revocation writes a CRL for each CA: a
/// server that checks CRLs and trusts both keeps serving both CAs' clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_a_ca_rotation_keeps_both_cas_clients_working() {
    let pki = Pki::new(&["old-a", "old-b"]);
    let out = pki.dir.path().to_str().unwrap();
    gen_certs_ok(&["--out", out, "--trust-domain", TRUST_DOMAIN, "--new-ca", "--tenant", "new-a"]);
    assert!(!pki.paths().crl().exists());
    gen_certs_ok(&["--out", out, "--revoke", "old-b"]);
    assert_eq!(crl_numbers(pki.dir.path()), [1, 1], "one CRL per CA, one number");

    let p = pki.paths();
    let (bundle, crl) = (p.ca_bundle(), p.crl());
    let server = TestServer::start_with(&pki, |raw| {
        raw.tls.client_ca = bundle;
        raw.tls.crl_files = vec![crl];
        raw.tenants.insert("new-a".into(), Default::default());
    });
    let creds = |tenant: &str| {
        let (_, cert, key) = pki.client_files(tenant);
        imgsvc::tls::ClientCredentials::from_files(&p.ca_cert(), &cert, &key).unwrap()
    };
    for tenant in ["old-a", "new-a"] {
        imgsvc::client::connect(&target(server.port()), &creds(tenant)).await.unwrap_or_else(|e| panic!("{tenant}: {e}"));
    }
    let err = imgsvc::client::connect(&target(server.port()), &creds("old-b")).await.unwrap_err();
    let imgsvc::client::ClientError::Connect { explanation, .. } = &err else { panic!("expected a connect error, got {err}") };
    assert!(explanation.contains("revoked"), "{explanation}");
}
