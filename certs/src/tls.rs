//! rustls configurations: one builder per end, each used everywhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built (for example, no usable CA).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The three files one end of a mutual-TLS connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signs the peer's certificate.
    pub ca: PathBuf,
    /// Our certificate chain, PEM.
    pub cert: PathBuf,
    /// Our private key, PEM.
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem { path: path.to_owned(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::Pem { path: path.to_owned(), message: e.to_string() })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| TlsError::Pem { path: ca.to_owned(), message: e.to_string() })?;
    }
    Ok(Arc::new(roots))
}

/// The collector's ingest configuration: TLS 1.3 only, the ring provider,
/// and a client certificate signed by `files.ca` required of every peer.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    ingest_server_config(files, None, false)
}

/// [`server_config`], also refusing client certificates the CRL at `crl`
/// (PEM, signed by the CA) lists, and taking TLS 1.2 as well when
/// `allow_tls12` (for syslog senders without 1.3). The CRL's own expiry
/// is enforced: an expired CRL refuses every client rather than trusting
/// stale news.
pub fn ingest_server_config(
    files: &TlsFiles,
    crl: Option<&Path>,
    allow_tls12: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(ingest_tls(files, crl, allow_tls12)?.config)
}

/// A server configuration with the client-certificate verifier it uses,
/// so connections made earlier can be checked again when it changes.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The configuration.
    pub config: Arc<ServerConfig>,
    /// Its client-certificate verifier; None when clients present none.
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// [`ingest_server_config`] with its verifier.
pub fn ingest_tls(files: &TlsFiles, crl: Option<&Path>, allow_tls12: bool) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider.clone());
    if let Some(path) = crl {
        builder = builder.with_crls(load_crls(path)?).enforce_revocation_expiration();
    }
    let verifier = builder.build()?;
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    Ok(ServerTls { config: Arc::new(config), client_verifier: Some(verifier) })
}

/// The agent's configuration: TLS 1.3 only, trusting `files.ca` for the
/// collector and presenting the agent's certificate.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    Ok(Arc::new(config))
}

/// The query API's configuration: TLS 1.3 only with the collector's server
/// certificate; callers authenticate with a bearer token instead.
pub fn api_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`api_server_config`] that also asks for a client certificate from the
/// CA in `files` (checked against `crl` when given) without requiring one:
/// browsers and token holders connect without, senders may prove who they
/// are with one. A certificate that does not verify fails the handshake.
pub fn api_tls_with_clients(files: &TlsFiles, crl: Option<&Path>) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider.clone());
    if let Some(path) = crl {
        builder = builder.with_crls(load_crls(path)?).enforce_revocation_expiration();
    }
    let verifier = builder.allow_unauthenticated().build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls { config: Arc::new(config), client_verifier: Some(verifier) })
}

/// The CRLs in a PEM file; none is an error.
fn load_crls(path: &Path) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem { path: path.to_owned(), message };
    let crls = rustls::pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if crls.is_empty() {
        return Err(pem_err("no CRL found".into()));
    }
    Ok(crls)
}

/// An HTTPS client trusting `ca`, for the CLI and tests.
pub fn https_client_config(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
