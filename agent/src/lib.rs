//! The logvault agent: follows log files and ships them, signed, to a
//! collector over mutual TLS, without losing or repeating a line.
//!
//! The pipeline, one stage per module:
//!
//! - [`tail`]: finds files by glob, follows rotation and truncation, splits
//!   lines (capped at `max_line_bytes`), batches and signs them with the
//!   agent certificate's Ed25519 key. Runs on its own thread and blocks on a
//!   bounded queue when the collector is slow.
//! - [`ship`]: sends batches over TLS 1.3 with a bounded in-flight window,
//!   resends after reconnects, and records each ack.
//! - [`checkpoint`]: per-file acked offsets, persisted atomically; they
//!   move only when the collector has acked, never when a line is read.
//!
//! ```no_run
//! # async fn demo() -> Result<(), logvault_agent::AgentError> {
//! let config = logvault_agent::config::AgentConfig::load("agent.toml".as_ref())?;
//! let cancel = tokio_util::sync::CancellationToken::new();
//! logvault_agent::run(config, cancel).await
//! # }
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod journald;
pub mod metrics;
pub use logvault_parse as parse;
pub mod ship;
pub mod sign;
pub mod spool;
pub mod stdin;
pub mod tail;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use logvault_certs::{PeerIdentity, TlsFiles, load_certs, load_key};
use ring::signature::Ed25519KeyPair;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::Checkpoints;
use crate::config::AgentConfig;

/// How often acked checkpoints are written while running.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] logvault_certs::TlsError),
    /// The certificate does not name an agent or has no Ed25519 key.
    #[error("{path}: {source}")]
    Identity {
        /// The certificate.
        path: std::path::PathBuf,
        /// What is wrong.
        source: logvault_certs::IdentityError,
    },
    /// The key file does not hold the certificate's Ed25519 key.
    #[error("{0}: not an Ed25519 PKCS#8 key matching the certificate")]
    SigningKey(std::path::PathBuf),
    /// Checkpoints could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// The spool could not be opened or written.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    /// A pipeline thread panicked; acked checkpoints were written.
    #[error("the {0} thread panicked; restart the agent")]
    Panicked(&'static str),
    /// The metrics listener could not be bound.
    #[error("metrics_listen {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Counters an operator reads to see what the agent did to lines.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records produced from files.
    pub lines_read: AtomicU64,
    /// Lines longer than the cap that were split into several records.
    pub lines_split: AtomicU64,
    /// Lines longer than the cap whose rest was discarded.
    pub lines_truncated: AtomicU64,
    /// Bytes discarded by truncation.
    pub bytes_discarded: AtomicU64,
    /// Lines with invalid UTF-8, replaced by U+FFFD.
    pub invalid_utf8_lines: AtomicU64,
    /// Lines a redaction rule changed.
    pub lines_redacted: AtomicU64,
    /// Batches written to a connection (resends not counted).
    pub batches_sent: AtomicU64,
    /// Batches acked by the collector.
    pub batches_acked: AtomicU64,
    /// Records in acked batches.
    pub records_acked: AtomicU64,
    /// Acked batches the collector already had (resends).
    pub batches_duplicate: AtomicU64,
    /// Batches the collector refused.
    pub batches_refused: AtomicU64,
    /// Unacked batches not resent after a reconnect because the collector
    /// said it had stored them (resume by sequence number).
    pub batches_resumed: AtomicU64,
    /// Successful connections.
    pub connects: AtomicU64,
    /// Bytes of lines read from files.
    pub bytes_read: AtomicU64,
    /// 1 while connected to the collector.
    pub connected: AtomicU64,
    /// Batches sent and not yet acked.
    pub unacked_batches: AtomicU64,
    /// Files being tailed.
    pub files_tracked: AtomicU64,
    /// Bytes in the disk spool.
    pub spool_bytes: AtomicU64,
    /// Records dropped from a full spool (`when_full = "drop_oldest"`).
    pub spool_dropped_records: AtomicU64,
    /// Damaged spool entries skipped.
    pub spool_corrupt_entries: AtomicU64,
    /// Spooled batches the collector refused out of sequence (their
    /// predecessor was lost to spool damage) and that were dropped, their
    /// lines left to be read again from the file.
    pub spool_orphans_dropped: AtomicU64,
}

/// The agent's name and batch signing key, read from its certificate.
pub struct AgentIdentity {
    /// The name the certificate's SAN gives.
    pub name: String,
    /// The certificate's Ed25519 key.
    pub key: Ed25519KeyPair,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity").field("name", &self.name).field("key", &"<redacted>").finish()
    }
}

impl AgentIdentity {
    /// Reads the name and the signing key, checking that the key belongs
    /// to the certificate.
    pub fn load(files: &TlsFiles) -> Result<AgentIdentity, AgentError> {
        let cert = load_certs(&files.cert)?.remove(0);
        let peer = PeerIdentity::from_cert_der(&cert)
            .map_err(|source| AgentError::Identity { path: files.cert.clone(), source })?;
        let key = load_key(&files.key)?;
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.secret_der())
            .map_err(|_| AgentError::SigningKey(files.key.clone()))?;
        if ring::signature::KeyPair::public_key(&key).as_ref() != peer.signing_key.as_slice() {
            return Err(AgentError::SigningKey(files.key.clone()));
        }
        Ok(AgentIdentity { name: peer.name, key })
    }
}

/// Runs the agent until `cancel` fires; the last act is writing the acked
/// checkpoints.
pub async fn run(config: AgentConfig, cancel: CancellationToken) -> Result<(), AgentError> {
    config.validate()?;
    let files = TlsFiles {
        ca: config.collector.ca.clone(),
        cert: config.collector.cert.clone(),
        key: config.collector.key.clone(),
    };
    let identity = AgentIdentity::load(&files)?;
    let tls = logvault_certs::client_config(&files)?;
    let checkpoints = Checkpoints::load(&config.state_dir)?;
    let stats = Arc::new(Stats::default());
    let config = Arc::new(config);
    tracing::info!(agent = %identity.name, collector = %config.collector.address, "agent starting");

    let (tx, rx) = tokio::sync::mpsc::channel(config.batch.queue);
    let key = Arc::new(identity.key);
    if let Some(source) = config.sources.iter().find(|s| s.stdin) {
        let epoch = checkpoints.next_epoch(stdin::STDIN_SOURCE);
        checkpoints.persist()?;
        let (source, batch, name, key, tx, stats) = (
            source.clone(),
            config.batch.clone(),
            identity.name.clone(),
            key.clone(),
            tx.clone(),
            stats.clone(),
        );
        // Not joined: a read of stdin cannot be interrupted; the thread
        // ends with the process.
        std::thread::Builder::new()
            .name("logvault-stdin".into())
            .spawn(move || stdin::run(source, batch, name, key, epoch, tx, stats))
            .expect("spawning a thread works");
    }
    if let Some(source) = config.sources.iter().find(|s| s.journald) {
        let reader = journald::JournalReader {
            settings: source.clone(),
            batch: config.batch.clone(),
            agent_id: identity.name.clone(),
            signer: sign::Signer::new(key.clone(), &config.batch),
            checkpoints: checkpoints.clone(),
            tx: tx.clone(),
            stats: stats.clone(),
        };
        let journal_cancel = cancel.clone();
        std::thread::Builder::new()
            .name("logvault-journal".into())
            .spawn(move || reader.run(journal_cancel))
            .expect("spawning a thread works");
    }
    // With stdin as the only source the tailer is not started, so the
    // batch queue closes at end of input and the shipper drains and stops.
    let mut spool = None;
    let source = match &config.spool {
        None => ship::BatchSource::Queue(rx),
        Some(spool_config) => {
            let opened = Arc::new(spool::Spool::open(
                &config.state_dir.join("spool"),
                spool_config.clone(),
                stats.clone(),
            )?);
            spool = Some(opened.clone());
            let pump_cancel = cancel.clone();
            let pump = opened.clone();
            let mut rx = rx;
            // The pump moves batches from the queue into the spool; when the
            // spool is full (block) it waits, the queue fills, the tailer waits.
            std::thread::Builder::new()
                .name("logvault-spool".into())
                .spawn(move || {
                    'batches: while let Some(batch) = rx.blocking_recv() {
                        loop {
                            match pump.append(&batch, &|| pump_cancel.is_cancelled()) {
                                Ok(true) => continue 'batches,
                                Ok(false) => break 'batches,
                                Err(err) => {
                                    tracing::error!(error = %err, "spool write failed; retrying");
                                    if pump_cancel.is_cancelled() {
                                        break 'batches;
                                    }
                                    std::thread::sleep(Duration::from_secs(1));
                                }
                            }
                        }
                    }
                    pump.close();
                })
                .expect("spawning a thread works");
            ship::BatchSource::Spool(opened)
        }
    };
    let tail_thread = if config.sources.iter().any(|s| !s.include.is_empty()) {
        let tailer = tail::Tailer::new(
            config.clone(),
            identity.name.clone(),
            key,
            checkpoints.clone(),
            tx,
            stats.clone(),
        );
        let tail_cancel = cancel.clone();
        Some(
            std::thread::Builder::new()
                .name("logvault-tail".into())
                .spawn(move || tailer.run(tail_cancel))
                .expect("spawning a thread works"),
        )
    } else {
        drop(tx);
        None
    };

    let writer = {
        let checkpoints = checkpoints.clone();
        let cancel = cancel.clone();
        let spool = spool.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let store = checkpoints.clone();
                if let Some(spool) = spool.clone() {
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(err) = spool.persist_head() {
                            tracing::error!(error = %err, "writing the spool head failed");
                        }
                    })
                    .await;
                }
                match tokio::task::spawn_blocking(move || store.persist()).await {
                    Ok(Err(err)) => tracing::error!(error = %err, "writing checkpoints failed"),
                    Err(err) => tracing::error!(error = %err, "checkpoint writer panicked"),
                    Ok(Ok(())) => {}
                }
            }
        })
    };

    if let Some(listen) = &config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| AgentError::Bind { address: listen.clone(), source })?;
        tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
        tokio::spawn(metrics::serve(listener, stats.clone(), cancel.clone()));
    }
    ship::run(config.collector.clone(), tls, source, checkpoints.clone(), stats.clone(), cancel.clone())
        .await;
    if let Some(spool) = &spool {
        spool.persist_head()?;
    }
    cancel.cancel();
    let _ = writer.await;
    let mut tailer_panicked = false;
    if let Some(tail_thread) = tail_thread {
        tailer_panicked =
            !matches!(tokio::task::spawn_blocking(move || tail_thread.join()).await, Ok(Ok(())));
    }
    let store = checkpoints.clone();
    tokio::task::spawn_blocking(move || store.persist())
        .await
        .unwrap_or_else(|err| panic!("checkpoint persist panicked: {err}"))?;
    if tailer_panicked {
        // Exit non-zero so a supervisor restarts the agent from its
        // checkpoints.
        return Err(AgentError::Panicked("tailer"));
    }
    tracing::info!(
        records_acked = stats.records_acked.load(Ordering::Relaxed),
        batches_acked = stats.batches_acked.load(Ordering::Relaxed),
        lines_split = stats.lines_split.load(Ordering::Relaxed),
        lines_truncated = stats.lines_truncated.load(Ordering::Relaxed),
        invalid_utf8_lines = stats.invalid_utf8_lines.load(Ordering::Relaxed),
        "agent stopped; acked checkpoints written"
    );
    Ok(())
}
