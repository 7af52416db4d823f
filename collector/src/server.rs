//! Wiring: WAL, indexer, ingest listener and API, started and stopped
//! together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::reload::ReloadingAcceptor;
use logvault_certs::TlsFiles;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};

/// Request bodies from HTTP senders read at once (each up to
/// `api.max_body_bytes`); the next waits for a slot.
const HTTP_BODIES: usize = 4;
use crate::auth::Verifier;
use crate::config::CollectorConfig;
use crate::index::{IndexProgress, LogIndex};
use crate::ingest::{self, Ingest, IngestStats};
use crate::wal::Wal;

/// Why the collector could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] logvault_certs::TlsError),
    /// The token key is unusable.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The WAL could not be opened.
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
    /// The index could not be opened or written.
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    /// The archive could not be set up.
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    /// The shared bucket of a cluster is unusable.
    #[error("cluster: {0}")]
    Cluster(String),
    /// A key file could not be read or created.
    #[error("key {path}: {source}")]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A started collector.
pub struct Running {
    /// Where agents connect.
    pub ingest_addr: SocketAddr,
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// Where syslog senders connect, when that listener is on.
    pub syslog_addr: Option<SocketAddr>,
    done: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// Waits until the collector has shut down (after its cancel token fired).
    pub async fn wait(self) -> Result<(), ServerError> {
        self.done.await.unwrap_or_else(|err| panic!("collector task panicked: {err}"))
    }
}

async fn bind(address: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ServerError::Bind { address: address.to_owned(), source })
}

/// Removes the WAL segments that are indexed and (when `archived` is
/// given) archived, every `every`, until `cancel` fires.
async fn prune_wal(
    wal: Wal,
    indexed: Arc<IndexProgress>,
    archived: Option<Arc<crate::seal::SealProgress>>,
    every: Duration,
    cancel: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let mut below = indexed.committed.load(Ordering::Acquire);
        if let Some(archived) = &archived {
            below = below.min(archived.sealed_position.load(Ordering::Acquire));
        }
        if let Err(err) = wal.prune(below).await {
            tracing::error!(error = %err, "wal pruning failed; retrying");
        }
    }
}

/// Starts the collector; it runs until `cancel` fires.
pub async fn start(config: CollectorConfig, cancel: CancellationToken) -> Result<Running, ServerError> {
    config.validate()?;
    let config = Arc::new(config);
    let ingest_files = TlsFiles {
        ca: config.ingest.ca.clone(),
        cert: config.ingest.cert.clone(),
        key: config.ingest.key.clone(),
    };
    let mut watched = vec![ingest_files.ca.clone(), ingest_files.cert.clone(), ingest_files.key.clone()];
    watched.extend(config.ingest.crl.clone());
    let (crl, allow_tls12) = (config.ingest.crl.clone(), config.ingest.allow_tls12);
    let ingest_tls = ReloadingAcceptor::new("ingest", watched, move || {
        logvault_certs::ingest_tls(&ingest_files, crl.as_deref(), allow_tls12)
    })?;
    let (api_cert, api_key) = (
        config.api.cert.clone().unwrap_or_else(|| config.ingest.cert.clone()),
        config.api.key.clone().unwrap_or_else(|| config.ingest.key.clone()),
    );
    let api_tls = if config.api.client_certificates {
        // Senders may present a certificate from the ingest CA.
        let files = TlsFiles { ca: config.ingest.ca.clone(), cert: api_cert.clone(), key: api_key.clone() };
        let mut watched = vec![files.ca.clone(), api_cert, api_key];
        watched.extend(config.ingest.crl.clone());
        let crl = config.ingest.crl.clone();
        ReloadingAcceptor::new("api", watched, move || {
            logvault_certs::api_tls_with_clients(&files, crl.as_deref())
        })?
    } else {
        ReloadingAcceptor::new("api", vec![api_cert.clone(), api_key.clone()], move || {
            Ok(logvault_certs::ServerTls {
                config: logvault_certs::api_server_config(&api_cert, &api_key)?,
                client_verifier: None,
            })
        })?
    };
    let key_sources = crate::auth::KeySources {
        files: config.api.jwt_public_key.iter().cloned().collect(),
        dir: config.api.jwt_keys_dir.clone(),
    };
    let verifier = Arc::new(Verifier::new(key_sources, &config.api.issuer, &config.api.audience)?);

    let wal_dir = config.data_dir.join("wal");
    let wal_options = crate::wal::WalOptions {
        segment_bytes: config.wal.segment_bytes,
        queue: config.wal.queue,
        max_bytes: config.wal.max_bytes,
        accept_gaps: config.ingest.accept_gaps,
    };
    let (wal, wal_thread) = match (&config.cluster, &config.archive) {
        (Some(cluster), Some(archive)) => {
            let store = logvault_storage::archive::Archive::open(&cluster.uri)
                .map_err(|e| ServerError::Cluster(e.to_string()))?;
            let shared = crate::cluster::SharedStreams::open(store, &archive.collector_id)
                .await
                .map_err(ServerError::Cluster)?;
            tracing::info!(uri = %cluster.uri, collector = %archive.collector_id, "streams' dedup state shared with the other collectors");
            Wal::open_shared(&wal_dir, &wal_options, shared).await?
        }
        _ => Wal::open(&wal_dir, &wal_options)?,
    };
    let index = Arc::new(LogIndex::open(&config.data_dir.join("index"))?);
    if let (Some(cluster), Some(archive)) = (&config.cluster, &config.archive) {
        let store = logvault_storage::archive::Archive::open(&cluster.uri)
            .map_err(|e| ServerError::Cluster(e.to_string()))?;
        let key_err = |e: logvault_storage::keyring::KeyError| ServerError::Cluster(e.to_string());
        let kek = logvault_storage::keyring::Kek::load(&archive.kek_file).map_err(key_err)?;
        let keyring = logvault_storage::keyring::Keyring::load(std::slice::from_ref(&archive.kek_file))
            .map_err(key_err)?;
        let splits_config = crate::splits::SplitsConfig {
            collector: archive.collector_id.clone(),
            publish_interval: Duration::from_millis(cluster.publish_interval_ms),
            poll_interval: Duration::from_millis(cluster.poll_interval_ms),
            cache_bytes: cluster.cache_bytes,
            cache_dir: config.data_dir.join("splits"),
            retention: config.index.retention_ms.map(Duration::from_millis),
            compact_splits: cluster.compact_splits,
            compact_grace: Duration::from_millis(cluster.compact_grace_ms),
        };
        let splits = crate::splits::Splits::open(store, splits_config, kek, keyring, index.index.schema())
            .await
            .map_err(ServerError::Cluster)?;
        splits.resync(index.committed_position(), wal.durable_end());
        index.share(splits.clone());
        tokio::spawn(splits.follow(cancel.clone()));
    }
    index.set_retention(
        config.index.retention_ms.map(Duration::from_millis),
        config.index.max_bytes,
        Duration::from_millis(config.index.retention_check_ms),
    );
    let progress = Arc::new(IndexProgress::default());
    let indexer = {
        let (index, durable, progress, cancel) =
            (index.clone(), wal.durable_counter(), progress.clone(), cancel.clone());
        let interval = Duration::from_millis(config.index.commit_interval_ms);
        let wal_dir = wal_dir.clone();
        std::thread::Builder::new()
            .name("logvault-index".into())
            .spawn(move || crate::index::run_indexer(index, wal_dir, durable, progress, interval, cancel))
            .expect("spawning a thread works")
    };

    let ingest_listener = bind(&config.ingest.listen).await?;
    let api_listener = bind(&config.api.listen).await?;
    let ingest_addr = ingest_listener
        .local_addr()
        .map_err(|source| ServerError::Bind { address: config.ingest.listen.clone(), source })?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|source| ServerError::Bind { address: config.api.listen.clone(), source })?;
    let (syslog_listener, syslog_addr, syslog_key) = match &config.syslog {
        Some(syslog) => {
            let listener = bind(&syslog.listen).await?;
            let addr = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { address: syslog.listen.clone(), source })?;
            let key_path = config.data_dir.join("keys").join("syslog-batch.key");
            let key = crate::syslog::load_or_create_key(&key_path)
                .map_err(|source| ServerError::Key { path: key_path, source })?;
            (Some(listener), Some(addr), Some(key))
        }
        None => (None, None, None),
    };
    let http_key_path = config.data_dir.join("keys").join("http-batch.key");
    let http_key = crate::syslog::load_or_create_key(&http_key_path)
        .map_err(|source| ServerError::Key { path: http_key_path, source })?;
    tracing::info!(%ingest_addr, %api_addr, syslog_addr = ?syslog_addr, data_dir = %config.data_dir.display(), "collector listening");

    let ingest = Arc::new(Ingest {
        config: config.clone(),
        acceptor: ingest_tls.clone(),
        wal,
        stats: Arc::new(IngestStats::default()),
        syslog_key,
        tenants: crate::config::TenantResolver::new(&config.tenants)?,
        rates: crate::limits::RateLimiter::new(config.ingest.agent_rate_bytes),
        per_sender: crate::limits::ConnectionCounts::new(config.ingest.max_connections_per_agent),
    });
    let metrics = crate::metrics::MetricsSource {
        ingest: ingest.stats.clone(),
        wal_dir: wal_dir.clone(),
        durable: ingest.wal.durable_counter(),
        index: progress.clone(),
        wal_busy: ingest.wal.busy_state(),
        gaps: ingest.wal.gaps_counter(),
        unverified: ingest.wal.unverified_counter(),
        wal_pruned: ingest.wal.pruned_counter(),
        splits: index.splits.get().cloned(),
    };
    tokio::spawn(verifier.clone().watch(cancel.clone()));
    // The sealer stops after the WAL has taken its last batch, so its last
    // run archives everything acked.
    let seal_cancel = CancellationToken::new();
    let seal_progress = Arc::new(crate::seal::SealProgress::default());
    let sealer = match &config.archive {
        Some(archive) => {
            let sealer = crate::seal::Sealer::new(
                archive,
                &config.data_dir,
                ingest.wal.durable_counter(),
                ingest.wal.busy_state(),
                seal_progress.clone(),
            )?;
            Some(tokio::spawn(sealer.run(seal_cancel.clone())))
        }
        None => None,
    };
    let pruner = {
        use crate::config::WalPrune;
        let archived = config.archive.as_ref().map(|_| seal_progress.clone());
        let on = match config.wal.prune {
            WalPrune::Never => false,
            WalPrune::Auto => archived.is_some(),
            WalPrune::Always => true,
        };
        on.then(|| {
            tokio::spawn(prune_wal(
                ingest.wal.clone(),
                progress.clone(),
                archived,
                Duration::from_millis(config.wal.prune_check_ms.max(1)),
                cancel.clone(),
            ))
        })
    };
    let state = Arc::new(ApiState {
        index,
        verifier,
        max_limit: config.api.max_limit,
        metrics,
        query_timeout: Duration::from_millis(config.api.query_timeout_ms),
        rates: crate::limits::RateLimiter::new(config.api.requests_per_second),
        queries: Arc::new(tokio::sync::Semaphore::new(config.api.max_concurrent_queries)),
        tails: std::sync::atomic::AtomicUsize::new(0),
        max_tails: config.api.max_tails,
        cancel: cancel.clone(),
        senders: Some(Arc::new(crate::senders::HttpSenders::new(
            ingest.wal.clone(),
            ingest.stats.clone(),
            http_key,
        ))),
        bulk_limits: crate::bulk::BulkLimits::default(),
        max_body_bytes: config.api.max_body_bytes,
        bodies: Arc::new(tokio::sync::Semaphore::new(HTTP_BODIES)),
    });
    tokio::spawn(ingest_tls.clone().watch(cancel.clone()));
    tokio::spawn(api_tls.clone().watch(cancel.clone()));
    tokio::spawn(Wal::watch_disk(
        ingest.wal.busy_state(),
        wal_dir.clone(),
        config.wal.high_watermark_percent,
        cancel.clone(),
    ));
    let ingest_task = tokio::spawn(ingest::serve(
        ingest_listener,
        ingest.clone(),
        ingest::Protocol::Native,
        cancel.clone(),
    ));
    let syslog_task = syslog_listener.map(|listener| {
        tokio::spawn(ingest::serve(listener, ingest.clone(), ingest::Protocol::Syslog, cancel.clone()))
    });
    let certificates = config.api.client_certificates.then(|| Arc::new(ingest.tenants.clone()));
    let api_task = tokio::spawn(api::serve(
        api_listener,
        api_tls.clone(),
        api::router(state),
        certificates,
        cancel.clone(),
    ));
    let done = tokio::spawn(async move {
        let _ = ingest_task.await;
        if let Some(task) = syslog_task {
            let _ = task.await;
        }
        let _ = api_task.await;
        if let Some(task) = pruner {
            let _ = task.await;
        }
        // The last Wal handle goes with `ingest`: the writer thread drains
        // what it was handed, fsyncs and exits.
        drop(ingest);
        let _ = tokio::task::spawn_blocking(move || wal_thread.join()).await;
        seal_cancel.cancel();
        if let Some(sealer) = sealer {
            let _ = sealer.await;
        }
        let indexed = tokio::task::spawn_blocking(move || indexer.join()).await;
        match indexed {
            Ok(Ok(result)) => result?,
            _ => tracing::error!("indexer thread panicked"),
        }
        tracing::info!("collector stopped");
        Ok(())
    });
    Ok(Running { ingest_addr, api_addr, syslog_addr, done })
}
