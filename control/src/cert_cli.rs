//! `homerelay cert …`: the certificates of the TLS listeners (phones' registration on 4063,
//! the gRPC API): a CA, server certificates signed by it as PKCS#12, importing one into the
//! PEM files the listeners read, and fingerprints to compare with what a device shows.
//!
//! Invariant: serial numbers are never reused — every certificate's serial is reserved in
//! `<dir>/serials.txt` before it is signed — and private keys are written with mode 0600,
//! never over an existing file.
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use relay_cert::{
    Ca, CaRequest, FileSerialRegistry, KeyPolicy, San, ServerRequest, SignatureAlgorithm, Subject,
    Validity,
};

/// `homerelay cert ...`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum CertCommand {
    /// Create a root CA: DIR/NAME.pem (certificate) and DIR/NAME.key (private key, 0600).
    Ca(CaArgs),
    /// Create a server certificate signed by a CA of DIR, written as PKCS#12 protected by a
    /// passphrase (the chain includes the CA).
    Server(ServerArgs),
    /// Import a PKCS#12 file into the PEM certificate chain and key a listener reads (e.g.
    /// registration.tls_cert / tls_key); prints the fingerprint first.
    Import(ImportArgs),
    /// Print the SHA-256 fingerprint of a certificate (PEM, DER, or the leaf of a PKCS#12 file
    /// with --passphrase-file), as `openssl x509 -noout -fingerprint -sha256` does.
    Fingerprint(FingerprintArgs),
}

/// The subject and the key of a new certificate.
#[derive(Clone, Debug, clap::Args)]
pub struct SubjectArgs {
    /// Country (C), two letters.
    #[arg(long, default_value = "DE")]
    pub country: String,
    /// Organisation (O).
    #[arg(long)]
    pub org: String,
    /// Organisational unit (OU).
    #[arg(long, default_value = "Voice")]
    pub unit: String,
    /// Common name (CN).
    #[arg(long)]
    pub cn: String,
    /// Subject alternative names: IP addresses or DNS names (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub san: Vec<String>,
    /// Signature and key: rsa-sha256, rsa-sha512 or ecdsa-p256.
    #[arg(long, default_value = "rsa-sha256", value_parser = parse_signature)]
    pub signature: SignatureAlgorithm,
    /// RSA key length (2048, 3072 or 4096).
    #[arg(long, default_value_t = 2048)]
    pub rsa_bits: u32,
    /// The shortest RSA key accepted (the configured minimum key length).
    #[arg(long, default_value_t = 2048)]
    pub min_key_bits: u32,
    /// Valid from now (UTC) for this many days.
    #[arg(long, default_value_t = 825)]
    pub days: i64,
}

/// `cert ca`.
#[derive(Clone, Debug, clap::Args)]
pub struct CaArgs {
    /// Directory of the CA (created if missing; holds serials.txt).
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's name: no blanks.
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub subject: SubjectArgs,
}

/// `cert server`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// Directory of the CA.
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's name.
    #[arg(long)]
    pub ca: String,
    /// The PKCS#12 file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// File holding the PKCS#12 passphrase.
    #[arg(long)]
    pub passphrase_file: PathBuf,
    #[command(flatten)]
    pub subject: SubjectArgs,
}

/// `cert import`.
#[derive(Clone, Debug, clap::Args)]
pub struct ImportArgs {
    /// The PKCS#12 file.
    pub p12: PathBuf,
    /// File holding its passphrase.
    #[arg(long)]
    pub passphrase_file: PathBuf,
    /// Where to write the certificate chain (PEM): registration.tls_cert of a running relay
    /// to put it in force there without a restart. An existing file is replaced atomically.
    #[arg(long)]
    pub cert_out: PathBuf,
    /// Where to write the private key (PEM, mode 0600): registration.tls_key. An existing
    /// file is replaced atomically.
    #[arg(long)]
    pub key_out: PathBuf,
    /// The shortest RSA key accepted.
    #[arg(long, default_value_t = 2048)]
    pub min_key_bits: u32,
}

/// `cert fingerprint`.
#[derive(Clone, Debug, clap::Args)]
pub struct FingerprintArgs {
    /// A certificate (PEM or DER) or a PKCS#12 file.
    pub file: PathBuf,
    /// The passphrase file, for a PKCS#12 file.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

fn parse_signature(s: &str) -> Result<SignatureAlgorithm, String> {
    match s {
        "rsa-sha256" => Ok(SignatureAlgorithm::RsaSha256),
        "rsa-sha512" => Ok(SignatureAlgorithm::RsaSha512),
        "ecdsa-p256" => Ok(SignatureAlgorithm::EcdsaP256Sha256),
        _ => Err(format!("{s:?}: use rsa-sha256, rsa-sha512 or ecdsa-p256")),
    }
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(s.trim_end_matches(['\r', '\n']).to_owned())
}

impl SubjectArgs {
    fn parts(&self) -> anyhow::Result<(Subject, Vec<San>, Validity, KeyPolicy)> {
        let subject = Subject {
            country: self.country.clone(),
            organisation: self.org.clone(),
            unit: self.unit.clone(),
            common_name: self.cn.clone(),
        };
        let san = self
            .san
            .iter()
            .map(|s| match s.parse() {
                Ok(ip) => San::Ip(ip),
                Err(_) => San::Dns(s.clone()),
            })
            .collect();
        if !(1..=3650).contains(&self.days) {
            bail!("--days must be 1 to 3650");
        }
        let now = time::UtcDateTime::now();
        let validity = Validity {
            not_before: now,
            not_after: now + time::Duration::days(self.days),
        };
        let policy = KeyPolicy::new(self.min_key_bits)?;
        Ok((subject, san, validity, policy))
    }
}

/// Runs `homerelay cert ...`.
pub fn run(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Ca(a) => {
            std::fs::create_dir_all(&a.dir)
                .with_context(|| format!("creating {}", a.dir.display()))?;
            let mut serials = FileSerialRegistry::open(&a.dir)?;
            let (subject, san, validity, policy) = a.subject.parts()?;
            let request = CaRequest {
                name: a.name.clone(),
                serial: relay_cert::random_serial()?,
                signature: a.subject.signature,
                rsa_bits: a.subject.rsa_bits,
                validity,
                subject,
                san,
            };
            let ca = relay_cert::create_ca(&request, &policy, &mut serials)?;
            let cert = a.dir.join(format!("{}.pem", a.name));
            let key = a.dir.join(format!("{}.key", a.name));
            relay_cert::files::write_private(&key, ca.key_pem().as_bytes())?;
            relay_cert::files::write_public(&cert, ca.cert_pem().as_bytes())?;
            println!("CA {}: {}", a.name, cert.display());
            println!(
                "SHA-256 fingerprint {}",
                relay_cert::fingerprint_sha256(ca.cert_der())
            );
        }
        CertCommand::Server(a) => {
            let mut serials = FileSerialRegistry::open(&a.dir)?;
            let (subject, san, validity, policy) = a.subject.parts()?;
            let read = |ext: &str| {
                let p = a.dir.join(format!("{}.{ext}", a.ca));
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
            };
            let ca = Ca::from_pem(&a.ca, &read("pem")?, &read("key")?, &policy)?;
            // A server certificate cannot outlive its CA: a window reaching past the CA's end
            // (the same --days a second later, say) ends with the CA, and the operator is told.
            let mut validity = validity;
            let ca_validity = ca.validity();
            if validity.not_after > ca_validity.not_after {
                // Seconds short of the asked-for days (the CA made just before with the same
                // --days) are not worth a note; days are.
                if validity.not_after - ca_validity.not_after > time::Duration::DAY {
                    eprintln!(
                        "note: the certificate ends with its CA, on {} (UTC)",
                        ca_validity.not_after
                    );
                }
                validity.not_after = ca_validity.not_after;
            }
            if validity.not_before < ca_validity.not_before {
                validity.not_before = ca_validity.not_before;
            }
            let request = ServerRequest {
                serial: relay_cert::random_serial()?,
                signature: a.subject.signature,
                rsa_bits: a.subject.rsa_bits,
                validity,
                subject,
                san,
            };
            let server = relay_cert::create_server_cert(&ca, &request, &policy, &mut serials)?;
            let passphrase = read_secret(&a.passphrase_file)?;
            let p12 = relay_cert::to_pkcs12(&server, &ca, &passphrase)?;
            relay_cert::files::write_private(&a.out, &p12)?;
            println!("server certificate: {}", a.out.display());
            println!(
                "SHA-256 fingerprint {}",
                relay_cert::fingerprint_sha256(server.cert_der())
            );
        }
        CertCommand::Import(a) => {
            let passphrase = read_secret(&a.passphrase_file)?;
            let bytes = relay_cert::files::read(&a.p12)?;
            let contents = relay_cert::from_pkcs12(&bytes, &passphrase)?;
            let Some(leaf) = contents.chain.first() else {
                bail!("{}: no certificate", a.p12.display());
            };
            let info = relay_cert::inspect(leaf)?;
            relay_cert::check_key_length(&info, a.min_key_bits)?;
            println!("SHA-256 fingerprint {}", info.fingerprint);
            let pem: String = contents
                .chain
                .iter()
                .map(|der| pem_block("CERTIFICATE", der))
                .collect();
            // Replaced atomically: a running relay serving these files (its certificate store)
            // sees the old pair or the new one, and picks the new one up within seconds.
            relay_cert::files::replace_private(
                &a.key_out,
                pem_block("PRIVATE KEY", &contents.key_der).as_bytes(),
            )?;
            relay_cert::files::replace_public(&a.cert_out, pem.as_bytes())?;
            println!(
                "imported: {} and {}",
                a.cert_out.display(),
                a.key_out.display()
            );
        }
        CertCommand::Fingerprint(a) => {
            let bytes = relay_cert::files::read(&a.file)?;
            let der = match &a.passphrase_file {
                Some(p) => {
                    let contents = relay_cert::from_pkcs12(&bytes, &read_secret(p)?)?;
                    contents
                        .chain
                        .into_iter()
                        .next()
                        .context("the PKCS#12 file holds no certificate")?
                }
                None if bytes.starts_with(b"-----BEGIN") => {
                    let text = String::from_utf8_lossy(&bytes);
                    pem_decode(&text).context("no PEM certificate")?
                }
                None => bytes,
            };
            println!("{}", relay_cert::fingerprint_sha256(&der));
        }
    }
    Ok(())
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let start = text.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = text[start..].find("-----END CERTIFICATE-----")? + start;
    let b64: String = text[start..end].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}
