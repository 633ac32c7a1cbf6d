//! Interoperability with the real `openssl` binary: what this crate writes, OpenSSL reads and
//! verifies, and what OpenSSL writes, this crate reads. Without `openssl` on PATH these tests
//! fail (the Debian package `openssl`, installed by scripts/bootstrap.sh); they never skip.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{ca_request, server_request};
use relay_cert::{
    Ca, KeyPolicy, MemorySerialRegistry, SignatureAlgorithm, create_ca, create_server_cert, files,
    fingerprint_sha256, from_pkcs12, inspect, to_pkcs12, verify_issued_by,
};

const PASS: &str = "s3cret-Passphrase";

fn openssl(args: &[&str], dir: &Path) -> Output {
    match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run the openssl binary ({e}): these interop tests need it on PATH \
             (Debian package `openssl`, installed by scripts/bootstrap.sh)"
        ),
    }
}

fn openssl_ok(args: &[&str], dir: &Path) -> String {
    let out = openssl(args, dir);
    assert!(
        out.status.success(),
        "openssl {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("relay-cert-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn openssl_is_installed() {
    let v = openssl_ok(&["version"], &std::env::temp_dir());
    assert!(v.starts_with("OpenSSL 3"), "OpenSSL 3 expected, got {v}");
}

/// For each pairing of CA and server algorithms: OpenSSL reads the PKCS#12 file without
/// `-legacy`, sees PBES2/AES-256-CBC and a SHA-256 MAC, refuses a wrong passphrase, verifies
/// the chain, and prints the same fingerprint and serial as this crate.
#[test]
fn openssl_reads_our_pkcs12_and_verifies_the_chain() {
    let policy = KeyPolicy::default();
    for (i, (ca_sig, ca_bits, srv_sig, srv_bits)) in [
        (
            SignatureAlgorithm::RsaSha256,
            2048,
            SignatureAlgorithm::RsaSha256,
            2048,
        ),
        (
            SignatureAlgorithm::RsaSha512,
            3072,
            SignatureAlgorithm::EcdsaP256Sha256,
            0,
        ),
        (
            SignatureAlgorithm::EcdsaP256Sha256,
            0,
            SignatureAlgorithm::EcdsaP256Sha256,
            0,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let tmp = TempDir::new(&format!("p12-{i}"));
        let dir = tmp.0.as_path();
        let mut serials = MemorySerialRegistry::new();
        let ca = create_ca(
            &ca_request(&mut serials, ca_sig, ca_bits),
            &policy,
            &mut serials,
        )
        .expect("ca");
        let sreq = server_request(&mut serials, srv_sig, srv_bits);
        let server = create_server_cert(&ca, &sreq, &policy, &mut serials).expect("server");

        files::write_public(dir.join("ca.pem"), ca.cert_pem().as_bytes()).expect("ca.pem");
        files::write_public(dir.join("server.pem"), server.cert_pem().as_bytes())
            .expect("server.pem");
        files::write_private(
            dir.join("server.p12"),
            &to_pkcs12(&server, &ca, PASS).expect("p12"),
        )
        .expect("server.p12");
        let passin = format!("pass:{PASS}");

        // The PKCS#12 file: both certificates come out, no -legacy needed.
        let certs = openssl_ok(
            &["pkcs12", "-in", "server.p12", "-passin", &passin, "-nokeys"],
            dir,
        );
        assert_eq!(
            certs.matches("-----BEGIN CERTIFICATE-----").count(),
            2,
            "{certs}"
        );
        let info = openssl(
            &[
                "pkcs12",
                "-in",
                "server.p12",
                "-passin",
                &passin,
                "-info",
                "-noout",
            ],
            dir,
        );
        assert!(info.status.success());
        let info = String::from_utf8_lossy(&info.stderr);
        assert!(info.contains("MAC: sha256"), "{info}");
        assert!(info.contains("PBES2, PBKDF2, AES-256-CBC"), "{info}");
        assert!(!info.contains("RC2") && !info.contains("3DES"), "{info}");
        // The key comes out and is the server's.
        let key = openssl_ok(
            &[
                "pkcs12",
                "-in",
                "server.p12",
                "-passin",
                &passin,
                "-nocerts",
                "-nodes",
            ],
            dir,
        );
        let key_pem = &key[key
            .find("-----BEGIN PRIVATE KEY-----")
            .expect("a pkcs#8 key")..];
        assert_eq!(key_pem.trim(), server.key_pem().trim());
        // A wrong passphrase fails in OpenSSL too.
        let wrong = openssl(
            &[
                "pkcs12",
                "-in",
                "server.p12",
                "-passin",
                "pass:wrong",
                "-nokeys",
            ],
            dir,
        );
        assert!(
            !wrong.status.success(),
            "openssl accepted a wrong passphrase"
        );

        // The chain verifies, for TLS server use.
        let ok = openssl_ok(
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslserver",
                "server.pem",
            ],
            dir,
        );
        assert_eq!(ok.trim(), "server.pem: OK");

        // Fingerprint and serial as OpenSSL prints them.
        for (file, der) in [("server.pem", server.cert_der()), ("ca.pem", ca.cert_der())] {
            let fp = openssl_ok(
                &["x509", "-in", file, "-noout", "-fingerprint", "-sha256"],
                dir,
            );
            let (_, fp) = fp.trim().split_once('=').expect("Fingerprint=…");
            assert_eq!(fp, fingerprint_sha256(der));
            let serial = openssl_ok(&["x509", "-in", file, "-noout", "-serial"], dir);
            assert_eq!(
                serial.trim(),
                format!("serial={}", inspect(der).expect("info").serial_hex)
            );
        }

        // Extensions as the brief asks.
        let ext = openssl_ok(
            &[
                "x509",
                "-in",
                "server.pem",
                "-noout",
                "-ext",
                "basicConstraints,keyUsage,extendedKeyUsage,subjectAltName",
            ],
            dir,
        );
        assert!(ext.contains("CA:FALSE"), "{ext}");
        assert!(ext.contains("TLS Web Server Authentication"), "{ext}");
        assert!(ext.contains("DNS:relay.homerelay.test"), "{ext}");
        assert!(ext.contains("IP Address:192.0.2.10"), "{ext}");
        assert!(ext.contains("IP Address:2001:DB8:0:0:0:0:0:1"), "{ext}");
        if srv_sig.is_rsa() {
            assert!(ext.contains("Digital Signature, Key Encipherment"), "{ext}");
        } else {
            assert!(
                ext.contains("Digital Signature") && !ext.contains("Key Encipherment"),
                "{ext}"
            );
        }
        let ca_ext = openssl_ok(
            &[
                "x509",
                "-in",
                "ca.pem",
                "-noout",
                "-ext",
                "basicConstraints,keyUsage",
            ],
            dir,
        );
        assert!(ca_ext.contains("CA:TRUE, pathlen:0"), "{ca_ext}");
        assert!(ca_ext.contains("Certificate Sign, CRL Sign"), "{ca_ext}");
        let text = openssl_ok(&["x509", "-in", "server.pem", "-noout", "-text"], dir);
        assert!(text.contains(ca_sig.openssl_name()), "{text}");
    }
}

/// What OpenSSL writes this crate reads: a PKCS#12 file made by `openssl pkcs12 -export`
/// (OpenSSL 3 defaults: PBES2, AES-256-CBC, SHA-256 MAC), and a CA made by `openssl req`,
/// which then signs a server certificate that OpenSSL verifies.
#[test]
fn we_read_what_openssl_writes() {
    let tmp = TempDir::new("from-openssl");
    let dir = tmp.0.as_path();
    let policy = KeyPolicy::default();
    let mut serials = MemorySerialRegistry::new();

    openssl_ok(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-sha512",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/C=DE/O=Imported/OU=Voice/CN=Imported CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
    let ca = Ca::from_pem(
        "imported-ca",
        &fs::read_to_string(dir.join("ca.pem")).expect("ca.pem"),
        &fs::read_to_string(dir.join("ca.key")).expect("ca.key"),
        &policy,
    )
    .expect("import the openssl ca");
    assert_eq!(ca.signature(), SignatureAlgorithm::RsaSha512);

    let mut sreq = server_request(&mut serials, SignatureAlgorithm::EcdsaP256Sha256, 0);
    sreq.validity = common::validity(0, 10);
    let server = create_server_cert(&ca, &sreq, &policy, &mut serials).expect("server");
    verify_issued_by(server.cert_der(), ca.cert_der()).expect("x509-parser agrees");
    files::write_public(dir.join("server.pem"), server.cert_pem().as_bytes()).expect("pem");
    files::write_private(dir.join("server.key"), server.key_pem().as_bytes()).expect("key");
    let ok = openssl_ok(
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslserver",
            "server.pem",
        ],
        dir,
    );
    assert_eq!(ok.trim(), "server.pem: OK");

    let passout = format!("pass:{PASS}");
    openssl_ok(
        &[
            "pkcs12",
            "-export",
            "-in",
            "server.pem",
            "-inkey",
            "server.key",
            "-certfile",
            "ca.pem",
            "-passout",
            &passout,
            "-out",
            "openssl.p12",
        ],
        dir,
    );
    let p12 = files::read(dir.join("openssl.p12")).expect("read p12");
    let back = from_pkcs12(&p12, PASS).expect("read openssl's pkcs#12");
    assert_eq!(
        back.chain.first().map(Vec::as_slice),
        Some(server.cert_der())
    );
    assert!(back.chain.iter().any(|c| c == ca.cert_der()));
    assert_eq!(back.key_der.as_slice(), server.key_der());
    assert!(matches!(
        from_pkcs12(&p12, "nope"),
        Err(relay_cert::CertError::WrongPassphrase)
    ));
}
