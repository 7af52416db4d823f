//! TLS settings that follow their files: a renewed server certificate, a
//! new CA bundle or a new CRL (`logvault certs revoke`) takes effect for
//! the next handshake, without a restart and without touching live
//! connections.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use logvault_certs::TlsError;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(1);

type Build = Box<dyn Fn() -> Result<Arc<ServerConfig>, TlsError> + Send + Sync>;
/// Modification time and length of each watched file, when it exists.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// A TLS acceptor rebuilt whenever one of its files changes.
pub struct ReloadingAcceptor {
    name: &'static str,
    files: Vec<PathBuf>,
    build: Build,
    current: RwLock<(TlsAcceptor, Stamps)>,
}

impl ReloadingAcceptor {
    /// Builds the first configuration now (an error here stops the start).
    pub fn new(
        name: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<Arc<ServerConfig>, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<ReloadingAcceptor>, TlsError> {
        let stamps = stamps(&files);
        let acceptor = TlsAcceptor::from(build()?);
        Ok(Arc::new(ReloadingAcceptor {
            name,
            files,
            build: Box::new(build),
            current: RwLock::new((acceptor, stamps)),
        }))
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// Rebuilds when a file changed; keeps the old settings (and says so)
    /// when the new files do not load, say while they are half written.
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.files);
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == now {
            return;
        }
        match (self.build)() {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = (TlsAcceptor::from(config), now);
                tracing::info!(listener = self.name, "tls files changed; new handshakes use them");
            }
            Err(err) => {
                // Remember the stamps so the error is logged once per change.
                self.current.write().unwrap_or_else(|p| p.into_inner()).1 = now;
                tracing::error!(listener = self.name, error = %err, "tls files changed but do not load; keeping the previous ones");
            }
        }
    }

    /// Polls the files until `cancel` fires.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
        }
    }
}

fn stamps(files: &[PathBuf]) -> Stamps {
    files
        .iter()
        .map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}
