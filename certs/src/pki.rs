//! Creating a CA and issuing certificates with rcgen.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{AGENT_URI_PREFIX, validate_name};

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent: a client certificate (EKU clientAuth) with an Ed25519 key,
    /// which also signs the agent's batches.
    Agent,
    /// A collector: a server certificate (EKU serverAuth) with an ECDSA
    /// P-256 key, which every browser and TLS client accepts.
    Collector,
    /// A syslog sender (rsyslog, syslog-ng): a client certificate with the
    /// same names as an agent's but an ECDSA P-256 key, which GnuTLS and
    /// OpenSSL load everywhere. It signs no batches.
    Sender,
}

impl Role {
    fn dir(self) -> &'static str {
        match self {
            Role::Agent => "agents",
            Role::Collector => "collectors",
            Role::Sender => "senders",
        }
    }
}

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `init` found a CA already there and will not overwrite it.
    #[error("a CA already exists at {0}; remove it first to start a new PKI")]
    CaExists(PathBuf),
    /// The directory holds no CA.
    #[error("no CA at {0}: run `logvault certs init --dir` first")]
    NoCa(PathBuf),
    /// A certificate of that name was issued already.
    #[error("{0} already exists; revoke it or pick another name")]
    AlreadyIssued(PathBuf),
    /// The name is not a valid agent or collector name.
    #[error(transparent)]
    Name(#[from] crate::identity::IdentityError),
    /// No agent, sender or collector of that name was issued.
    #[error("no certificate named {0} in this directory")]
    NotIssued(String),
    /// An issued certificate does not parse.
    #[error("{path}: {message}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rcgen refused the parameters or key.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Paths of an issued certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PEM, mode 0600.
    pub key: PathBuf,
}

/// A certificate directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

const CA_COMMON_NAME: &str = "logvault CA";

impl Pki {
    /// Creates a new CA in `dir`; refuses to overwrite an existing one.
    pub fn init(dir: impl Into<PathBuf>) -> Result<Pki, PkiError> {
        let pki = Pki { dir: dir.into() };
        if pki.ca_cert().exists() {
            return Err(PkiError::CaExists(pki.ca_cert()));
        }
        create_dir(&pki.dir)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, CA_COMMON_NAME);
        name.push(DnType::OrganizationName, "logvault");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        write_private_file(&pki.ca_key(), key.serialize_pem().as_bytes())?;
        write_public_file(&pki.ca_cert(), cert.pem().as_bytes())?;
        Ok(pki)
    }

    /// Opens an existing certificate directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Pki, PkiError> {
        let pki = Pki { dir: dir.into() };
        if !pki.ca_cert().exists() || !pki.ca_key().exists() {
            return Err(PkiError::NoCa(pki.dir));
        }
        Ok(pki)
    }

    /// Opens `dir` when it holds a CA, else creates one there.
    pub fn open_or_init(dir: impl Into<PathBuf>) -> Result<Pki, PkiError> {
        let dir = dir.into();
        match Pki::open(&dir) {
            Ok(pki) => Ok(pki),
            Err(PkiError::NoCa(_)) => Pki::init(dir),
            Err(err) => Err(err),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificate revocation list the collector checks (PEM), written
    /// by [`Pki::revoke`] and [`Pki::write_crl`].
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    fn revoked_list(&self) -> PathBuf {
        self.dir.join("revoked.txt")
    }

    /// Revokes the certificate of `name` (agent, sender or collector): its
    /// serial number joins the revocation list, the CRL is signed again,
    /// and the certificate files are renamed aside so the name can be
    /// issued anew. A collector with `ingest.crl` set picks the new CRL up
    /// within seconds. Returns the CRL path.
    pub fn revoke(&self, name: &str) -> Result<PathBuf, PkiError> {
        validate_name(name)?;
        let issued = [Role::Agent, Role::Sender, Role::Collector]
            .into_iter()
            .map(|role| self.paths(role, name))
            .find(|paths| paths.cert.exists())
            .ok_or_else(|| PkiError::NotIssued(name.to_owned()))?;
        let bad = |message: String| PkiError::BadCertificate { path: issued.cert.clone(), message };
        let chain = crate::tls::load_certs(&issued.cert).map_err(|e| bad(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| bad(e.to_string()))?;
        let serial = cert.raw_serial_as_string().replace(':', "");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let list = self.revoked_list();
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&list)
            .map_err(|source| PkiError::Io { path: list.clone(), source })?;
        writeln!(file, "{serial} {now} {name}")
            .and_then(|_| file.sync_all())
            .map_err(|source| PkiError::Io { path: list.clone(), source })?;
        for path in [&issued.cert, &issued.key] {
            let aside = path.with_extension(format!(
                "{}.revoked-{serial}",
                path.extension().and_then(|e| e.to_str()).unwrap_or("")
            ));
            fs::rename(path, &aside).map_err(|source| PkiError::Io { path: path.clone(), source })?;
        }
        self.write_crl()
    }

    /// Signs and writes the CRL from the revocation list (empty when
    /// nothing was revoked). It is valid for 397 days: run `logvault certs
    /// crl` (or revoke something) before then, since an expired CRL
    /// refuses every client.
    pub fn write_crl(&self) -> Result<PathBuf, PkiError> {
        let list = self.revoked_list();
        let text = match fs::read_to_string(&list) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(PkiError::Io { path: list, source }),
        };
        let mut revoked_certs = Vec::new();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(serial), Some(when)) = (parts.next(), parts.next()) else { continue };
            let Some(serial) = hex_bytes(serial) else { continue };
            let when = when.parse().ok().and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: when.unwrap_or_else(OffsetDateTime::now_utc),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(397),
            // Increases with every signing, as RFC 5280 asks.
            crl_number: SerialNumber::from_slice(&(now.unix_timestamp_nanos() as u128).to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        write_public_file(&self.crl(), crl.pem()?.as_bytes())?;
        Ok(self.crl())
    }

    /// The CA certificate every peer trusts.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// Where the certificate of `name` in `role` lives (issued or not).
    pub fn paths(&self, role: Role, name: &str) -> Issued {
        let base = self.dir.join(role.dir());
        Issued { cert: base.join(format!("{name}.crt")), key: base.join(format!("{name}.key")) }
    }

    /// Issues a certificate for `name`. Agents and senders get `name` as
    /// DNS SAN and `logvault://agent/NAME` as URI SAN; collectors get `name` plus each
    /// of `extra_sans` (DNS names or IP addresses).
    pub fn issue(&self, role: Role, name: &str, extra_sans: &[String]) -> Result<Issued, PkiError> {
        validate_name(name)?;
        let paths = self.paths(role, name);
        if paths.cert.exists() {
            return Err(PkiError::AlreadyIssued(paths.cert));
        }
        create_dir(paths.cert.parent().expect("paths have a parent"))?;
        let issuer = self.issuer()?;
        let (key, mut params) = match role {
            Role::Agent | Role::Sender => {
                let algorithm =
                    if role == Role::Agent { &rcgen::PKCS_ED25519 } else { &rcgen::PKCS_ECDSA_P256_SHA256 };
                let key = KeyPair::generate_for(algorithm)?;
                let mut params = CertificateParams::new(vec![name.to_owned()])?;
                params.subject_alt_names.push(SanType::URI(format!("{AGENT_URI_PREFIX}{name}").try_into()?));
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                (key, params)
            }
            Role::Collector => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let mut sans = vec![name.to_owned()];
                sans.extend(extra_sans.iter().filter(|s| s.as_str() != name).cloned());
                let mut params = CertificateParams::new(sans)?;
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                (key, params)
            }
        };
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(397);
        let cert = params.signed_by(&key, &issuer)?;
        write_private_file(&paths.key, key.serialize_pem().as_bytes())?;
        write_public_file(&paths.cert, cert.pem().as_bytes())?;
        Ok(paths)
    }

    /// Returns the existing certificate of `name`, issuing it when missing.
    pub fn ensure(&self, role: Role, name: &str, extra_sans: &[String]) -> Result<Issued, PkiError> {
        let paths = self.paths(role, name);
        if paths.cert.exists() && paths.key.exists() {
            return Ok(paths);
        }
        self.issue(role, name, extra_sans)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key_pem = read(&self.ca_key())?;
        let cert_pem = read(&self.ca_cert())?;
        let key = KeyPair::from_pem(&key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&cert_pem, key)?)
    }
}

fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source works");
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io { path: dir.to_owned(), source })
}

/// Writes a secret atomically with mode 0600 from its creation on: a temp
/// file, fsync, rename.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file(path, contents, 0o600)
}

fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file(path, contents, 0o644)
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io_err = |source| PkiError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|dir| dir.sync_all()).map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::MetadataExt;
    use x509_parser::prelude::FromDer;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("logvault-pki-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn keys_are_written_0600_and_init_refuses_to_overwrite() {
        let dir = temp_dir("perm");
        let pki = Pki::init(&dir).unwrap();
        let agent = pki.issue(Role::Agent, "web-1", &[]).unwrap();
        let collector = pki.issue(Role::Collector, "collector", &["127.0.0.1".into()]).unwrap();
        for key in [dir.join("ca.key"), agent.key, collector.key] {
            assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600, "{}", key.display());
        }
        assert!(matches!(Pki::init(&dir), Err(PkiError::CaExists(_))));
        assert!(matches!(pki.issue(Role::Agent, "web-1", &[]), Err(PkiError::AlreadyIssued(_))));
        assert!(matches!(pki.issue(Role::Agent, "../evil", &[]), Err(PkiError::Name(_))));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn revoking_lists_the_serial_in_a_signed_crl_and_frees_the_name() {
        let dir = temp_dir("revoke");
        let pki = Pki::init(&dir).unwrap();
        let agent = pki.issue(Role::Agent, "web-1", &[]).unwrap();
        let chain = crate::tls::load_certs(&agent.cert).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let serial = cert.raw_serial().to_vec();
        let crl = pki.revoke("web-1").unwrap();
        assert!(!agent.cert.exists() && !agent.key.exists(), "the revoked files are set aside");
        let pem = fs::read(&crl).unwrap();
        let der =
            rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&pem).next().unwrap().unwrap();
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let listed: Vec<Vec<u8>> =
            parsed.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()).collect();
        assert_eq!(listed, vec![serial]);
        // Issued certificates name their CA by key identifier.
        let ca = crate::tls::load_certs(&pki.ca_cert()).unwrap();
        let again = pki.issue(Role::Sender, "web-2", &[]).unwrap();
        let issued = crate::tls::load_certs(&again.cert).unwrap();
        let (_, ca_subject) = crate::identity::key_ids(&ca[0]);
        let (authority, _) = crate::identity::key_ids(&issued[0]);
        assert!(ca_subject.is_some());
        assert_eq!(authority, ca_subject);
        // The name can be issued again; a name never issued cannot be revoked.
        pki.issue(Role::Agent, "web-1", &[]).unwrap();
        assert!(matches!(pki.revoke("nobody"), Err(PkiError::NotIssued(_))));
        fs::remove_dir_all(dir).unwrap();
    }
}
