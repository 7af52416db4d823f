//! The logvault collector: takes signed batches from agents over mutual
//! TLS, makes them durable in a WAL, indexes them with tantivy and answers
//! queries over an authenticated HTTPS API.
//!
//! - [`ingest`]: the mTLS listener; host identity from the certificate.
//! - [`wal`]: group-committed, fsynced write-ahead log with dedup.
//! - [`index`]: the tantivy schema, the indexer that follows the WAL, search.
//! - [`api`] and [`auth`]: the HTTPS API and its EdDSA bearer tokens.
//! - [`server`]: starts and stops all of them together.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = logvault_collector::config::CollectorConfig::load("collector.toml".as_ref())?;
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let running = logvault_collector::server::start(config, cancel.clone()).await?;
//! println!("api on {}", running.api_addr);
//! cancel.cancel();
//! running.wait().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod aggregate;
pub mod api;
pub mod auth;
pub mod bulk;
pub mod client;
pub mod cluster;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod otlp;
pub mod reload;
pub mod restore;
pub mod seal;
pub mod search;
pub mod senders;
pub mod server;
pub mod splits;
pub mod syslog;
pub mod time;
pub mod wal;
pub mod web;
