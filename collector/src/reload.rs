//! TLS settings that follow their files: a renewed server certificate, a
//! new CA bundle or a new CRL (`logvault certs revoke`) takes effect for
//! the next handshake, without a restart. Live connections stay up, except
//! those whose client certificate the new settings no longer accept (a
//! revoked agent, a CA taken out of the bundle): they are closed at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use logvault_certs::{ServerTls, TlsError};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(1);

type Build = Box<dyn Fn() -> Result<ServerTls, TlsError> + Send + Sync>;
/// Modification time and length of each watched file, when it exists.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// A TLS acceptor rebuilt whenever one of its files changes.
pub struct ReloadingAcceptor {
    name: &'static str,
    files: Vec<PathBuf>,
    build: Build,
    current: RwLock<(TlsAcceptor, Stamps)>,
    /// The connections made through it, by number, rechecked on a change.
    live: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
}

/// A live connection, as a reload rechecks it.
struct Live {
    peer: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    cancel: CancellationToken,
}

/// Keeps a connection on the recheck list; off it when dropped.
pub struct LiveConnection<'a> {
    acceptor: &'a ReloadingAcceptor,
    id: u64,
}

impl Drop for LiveConnection<'_> {
    fn drop(&mut self) {
        self.acceptor.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl ReloadingAcceptor {
    /// Builds the first configuration now (an error here stops the start).
    pub fn new(
        name: &'static str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<ServerTls, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<ReloadingAcceptor>, TlsError> {
        let stamps = stamps(&files);
        let acceptor = TlsAcceptor::from(build()?.config);
        Ok(Arc::new(ReloadingAcceptor {
            name,
            files,
            build: Box::new(build),
            current: RwLock::new((acceptor, stamps)),
            live: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }))
    }

    /// Puts a connection whose peer presented `chain` on the recheck list:
    /// if the settings change and no longer accept the chain, `cancel`
    /// fires. It stays on the list while the returned guard lives.
    pub fn register(
        &self,
        peer: SocketAddr,
        chain: &[CertificateDer<'_>],
        cancel: CancellationToken,
    ) -> LiveConnection<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let chain = chain.iter().map(|cert| cert.clone().into_owned()).collect();
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Live { peer, chain, cancel });
        LiveConnection { acceptor: self, id }
    }

    /// Closes the live connections `verifier` no longer accepts; returns
    /// how many.
    fn recheck(&self, verifier: &dyn ClientCertVerifier) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let now = UnixTime::now();
        let mut closed = 0;
        for connection in live.values() {
            let Some((end_entity, intermediates)) = connection.chain.split_first() else { continue };
            if let Err(err) = verifier.verify_client_cert(end_entity, intermediates, now) {
                tracing::warn!(listener = self.name, peer = %connection.peer, error = %err, "client certificate no longer accepted after the tls files changed; closing the connection");
                connection.cancel.cancel();
                closed += 1;
            }
        }
        closed
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
            Ok(tls) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                    (TlsAcceptor::from(tls.config), now);
                tracing::info!(listener = self.name, "tls files changed; new handshakes use them");
                if let Some(verifier) = &tls.client_verifier {
                    self.recheck(verifier.as_ref());
                }
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
