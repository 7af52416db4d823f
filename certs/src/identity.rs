//! Who a peer is: read from its certificate, never from what it sends.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The URI SAN prefix that names an agent: `logvault://agent/NAME`.
pub(crate) const AGENT_URI_PREFIX: &str = "logvault://agent/";
const ED25519_OID: &str = "1.3.101.112";

/// Why a peer's identity could not be established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate does not parse.
    #[error("certificate does not parse: {0}")]
    Unparsable(String),
    /// Neither a `logvault://agent/` URI SAN nor a DNS SAN.
    #[error("certificate names no agent (no logvault://agent/ URI SAN and no DNS SAN)")]
    NoName,
    /// The agent's key is not Ed25519, so it cannot sign batches.
    #[error("certificate key is not Ed25519 (algorithm {0}); agent keys sign batches with Ed25519")]
    NotEd25519(String),
    /// A name with characters outside `[A-Za-z0-9.-]`, or of a bad length.
    #[error("invalid name {name:?}: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// An agent as its verified certificate names it.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The agent's name: the `logvault://agent/NAME` URI SAN when present,
    /// else the first DNS SAN.
    pub name: String,
    /// The certificate's raw 32-byte Ed25519 public key, which must have
    /// signed every batch the agent sends.
    pub signing_key: Vec<u8>,
}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIdentity").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate that TLS already verified.
    pub fn from_cert_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let name = cert_name(&cert)?;
        let spki = cert.public_key();
        let algorithm = spki.algorithm.algorithm.to_id_string();
        if algorithm != ED25519_OID {
            return Err(IdentityError::NotEd25519(algorithm));
        }
        Ok(PeerIdentity { name, signing_key: spki.subject_public_key.data.to_vec() })
    }
}

/// The name a verified client certificate gives its holder, whatever its
/// key type: for syslog senders, which sign nothing themselves.
pub fn peer_name(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    cert_name(&cert)
}

/// Key identifiers of a DER certificate: (authority, subject). A client
/// certificate's authority key identifier names the CA that issued it, as
/// that CA's subject key identifier.
pub fn key_ids(der: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    use x509_parser::extensions::ParsedExtension;
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return (None, None) };
    let (mut authority, mut subject) = (None, None);
    for extension in cert.extensions() {
        match extension.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority = aki.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            ParsedExtension::SubjectKeyIdentifier(ski) => subject = Some(ski.0.to_vec()),
            _ => {}
        }
    }
    (authority, subject)
}

fn cert_name(cert: &X509Certificate<'_>) -> Result<String, IdentityError> {
    {
        let sans = cert.subject_alternative_name().map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let names = sans.map(|ext| ext.value.general_names.clone()).unwrap_or_default();
        let from_uri = names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(AGENT_URI_PREFIX),
            _ => None,
        });
        let from_dns = names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        });
        let name = from_uri.or(from_dns).ok_or(IdentityError::NoName)?;
        validate_name(name)?;
        Ok(name.to_owned())
    }
}

/// Checks an agent or collector name: 1 to 253 characters of
/// `[A-Za-z0-9.-]`, starting with a letter or digit. Names become file names
/// and object-key parts, so nothing else is allowed.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let bad = |reason| Err(IdentityError::BadName { name: name.to_owned(), reason });
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        return bad("only letters, digits, '-' and '.' are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-1.example.org").is_ok());
        for bad in ["", "../x", "-x", "a b", "a/b", "ä", &"a".repeat(254)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn identity_comes_from_the_uri_san_and_the_key_is_ed25519() {
        let dir = std::env::temp_dir().join(format!("logvault-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = crate::Pki::init(&dir).unwrap();
        let agent = pki.issue(crate::Role::Agent, "db-7", &[]).unwrap();
        let der = crate::load_certs(&agent.cert).unwrap().remove(0);
        let id = PeerIdentity::from_cert_der(&der).unwrap();
        assert_eq!(id.name, "db-7");
        assert_eq!(id.signing_key.len(), 32);
        assert!(!format!("{id:?}").contains("signing_key"));

        let collector = pki.issue(crate::Role::Collector, "c1", &[]).unwrap();
        let der = crate::load_certs(&collector.cert).unwrap().remove(0);
        assert!(matches!(PeerIdentity::from_cert_der(&der), Err(IdentityError::NotEd25519(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
