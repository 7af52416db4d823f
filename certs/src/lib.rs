//! The logvault PKI and the TLS configuration of both ends.
//!
//! - [`Pki`]: a certificate directory: create a dev CA, issue agent and
//!   collector certificates (rcgen), with private keys written 0600.
//! - [`server_config`]: the one function that builds the collector's ingest
//!   `ServerConfig` (TLS 1.3 only, ring provider, client certificate
//!   mandatory); [`client_config`]: the one that builds the agent's.
//!   [`api_server_config`] and [`https_client_config`] are the HTTPS
//!   equivalents for the query API, where a bearer token replaces the client
//!   certificate.
//! - [`PeerIdentity`]: who an agent is, read from its verified certificate's
//!   SAN, and the Ed25519 key its batches must be signed with.
//!
//! Layout of a certificate directory:
//!
//! ```text
//! ca.crt  ca.key                      the CA (key 0600)
//! agents/NAME.crt  agents/NAME.key    one pair per agent
//! collectors/NAME.crt  collectors/NAME.key
//! ```
//!
//! ```no_run
//! use logvault_certs::{Pki, Role};
//! let pki = Pki::init("/etc/logvault/pki").unwrap();
//! let issued = pki.issue(Role::Agent, "web-1", &[]).unwrap();
//! println!("{}", issued.cert.display());
//! ```
#![warn(missing_docs)]

mod identity;
mod pki;
mod tls;

pub use identity::{IdentityError, PeerIdentity, key_ids, peer_name, validate_name};
pub use pki::{Issued, Pki, PkiError, Role, write_private_file};
pub use tls::{
    ServerTls, TlsError, TlsFiles, api_server_config, api_tls_with_clients, client_config,
    https_client_config, ingest_server_config, ingest_tls, load_certs, load_key, server_config,
};
