//! The agents' listener: mutual TLS, frames, validation, WAL, ack.
//!
//! Every connection must present a certificate from the configured CA
//! (TLS 1.3 only). The agent's name, and so every record's `host`, comes
//! from that certificate; a batch naming another agent, or signed by
//! another key than the certificate's, is refused and the connection
//! closed. A batch is acked only once the WAL has fsynced it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use logvault_certs::PeerIdentity;
use logvault_storage::batch::{BatchError, BatchView, Inflater, Limits};
use logvault_storage::frame::{AckStatus, Frame, FrameDecoder, FrameError, PROTOCOL_VERSION, write_frame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CollectorConfig;
pub use crate::metrics::IngestStats;
use crate::metrics::Refusal;
use crate::wal::{AppendRequest, Appended, SequenceFault, Wal};

/// How long an ack or a close may take before the peer is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the ingest loop needs.
pub struct Ingest {
    /// The configuration (tenants, limits).
    pub config: Arc<CollectorConfig>,
    /// TLS.
    pub acceptor: Arc<crate::reload::ReloadingAcceptor>,
    /// Where batches go.
    pub wal: Wal,
    /// Counters.
    pub stats: Arc<IngestStats>,
    /// The key syslog batches are signed with, when the syslog listener is on.
    pub syslog_key: Option<ring::signature::Ed25519KeyPair>,
    /// Which tenant each sender belongs to.
    pub tenants: crate::config::TenantResolver,
    /// Bytes per second per sender.
    pub rates: crate::limits::RateLimiter,
    /// Connections per sender.
    pub per_sender: crate::limits::ConnectionCounts,
}

impl Ingest {
    /// Waits while `sender` is over its byte rate (or until `cancel`).
    pub(crate) async fn pace(&self, sender: &str, bytes: usize, cancel: &CancellationToken) {
        let wait = self.rates.delay(sender, bytes);
        if !wait.is_zero() {
            self.stats.rate_limited_ms.fetch_add(wait.as_millis() as u64, Ordering::Relaxed);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// What a listener speaks after the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The native protocol of signed batches.
    Native,
    /// Syslog over TLS (RFC 5425).
    Syslog,
}

/// Accepts connections until `cancel` fires; then waits for the open ones
/// to finish their batch in hand. Both protocols share the connection cap.
pub async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    protocol: Protocol,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(ingest.config.ingest.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = ingest.config.ingest.max_connections, "connection limit reached; closing new connection");
            ingest.stats.refused(Refusal::ConnectionLimit);
            continue;
        };
        let ingest = ingest.clone();
        // Its own token: a reload closes one connection without the rest.
        let cancel = cancel.child_token();
        tracker.spawn(async move {
            ingest.stats.connections.fetch_add(1, Ordering::Relaxed);
            match protocol {
                Protocol::Native => connection(tcp, peer, &ingest, cancel).await,
                Protocol::Syslog => crate::syslog::connection(tcp, peer, &ingest, cancel).await,
            }
            ingest.stats.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// The authority key identifier of the peer's certificate: which CA issued it.
pub(crate) fn authority_key(tls: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<Vec<u8>> {
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    logvault_certs::key_ids(cert).0
}

/// The TLS handshake, within the handshake timeout; `None` (logged and
/// counted) when it fails. The connection is then on the acceptor's
/// recheck list, while the guard lives: `cancel` fires if new TLS files
/// no longer accept its certificate.
pub(crate) async fn handshake<'a>(
    tcp: TcpStream,
    peer: SocketAddr,
    ingest: &'a Ingest,
    cancel: &CancellationToken,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, crate::reload::LiveConnection<'a>)> {
    let _ = tcp.set_nodelay(true);
    let limit = Duration::from_millis(ingest.config.ingest.handshake_timeout_ms);
    match tokio::time::timeout(limit, ingest.acceptor.acceptor().accept(tcp)).await {
        Ok(Ok(tls)) => {
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
            let live = ingest.acceptor.register(peer, chain, cancel.clone());
            Some((tls, live))
        }
        Ok(Err(err)) => {
            ingest.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, error = %err, "tls handshake failed");
            None
        }
        Err(_) => {
            ingest.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, timeout_ms = limit.as_millis() as u64, "tls handshake timed out");
            None
        }
    }
}

async fn connection(tcp: TcpStream, peer: SocketAddr, ingest: &Ingest, cancel: CancellationToken) {
    let limit = Duration::from_millis(ingest.config.ingest.handshake_timeout_ms);
    let Some((mut tls, _live)) = handshake(tcp, peer, ingest, &cancel).await else { return };
    let identity = {
        let (_, session) = tls.get_ref();
        match session.peer_certificates().and_then(|chain| chain.first()) {
            Some(cert) => PeerIdentity::from_cert_der(cert),
            None => Err(logvault_certs::IdentityError::NoName),
        }
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err(err) => {
            refuse(&mut tls, ingest, Refusal::Certificate, &format!("client certificate unusable: {err}"))
                .await;
            tracing::warn!(%peer, error = %err, "refused agent certificate");
            return;
        }
    };
    let tenant = ingest.tenants.resolve(&identity.name, authority_key(&tls).as_deref()).to_owned();
    let Some(_slot) = ingest.per_sender.enter(&identity.name) else {
        tracing::warn!(%peer, agent = %identity.name, "too many connections from one agent; closing the new one");
        refuse(&mut tls, ingest, Refusal::ConnectionLimit, "too many connections from this agent").await;
        return;
    };
    let decoder = FrameDecoder::new(ingest.config.ingest.max_frame_bytes);
    match tokio::time::timeout(limit, decoder.read(&mut tls)).await {
        Ok(Ok(Some(Frame::Hello { version }))) if version == PROTOCOL_VERSION => {}
        Ok(Ok(Some(Frame::Hello { version }))) => {
            let message = format!(
                "protocol version {version} is not supported; this collector speaks {PROTOCOL_VERSION}"
            );
            refuse(&mut tls, ingest, Refusal::Version, &message).await;
            return;
        }
        other => {
            let what = match other {
                Err(_) => "no hello within the handshake timeout".to_owned(),
                Ok(Err(err)) => err.to_string(),
                Ok(Ok(frame)) => format!("expected hello, got {frame:?}"),
            };
            tracing::warn!(%peer, agent = %identity.name, reason = %what, "bad opening");
            refuse(&mut tls, ingest, Refusal::Malformed, &what).await;
            return;
        }
    }
    tracing::info!(%peer, agent = %identity.name, %tenant, "agent connected");
    let limits = Limits::default();
    let mut inflater = Inflater::new();
    let idle = Duration::from_millis(ingest.config.ingest.idle_timeout_ms);
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => break,
            frame = tokio::time::timeout(idle, decoder.read(&mut tls)) => match frame {
                Ok(frame) => frame,
                Err(_) => {
                    tracing::info!(%peer, agent = %identity.name, idle_ms = idle.as_millis() as u64, "closing idle connection");
                    break;
                }
            },
        };
        let bytes = match frame {
            Ok(Some(Frame::Batch(bytes))) => bytes,
            Ok(Some(Frame::Resume { batches })) => {
                let asked = batches.len();
                let answer = match ingest.wal.known(&tenant, &identity.name, batches).await {
                    Ok(stored) => Frame::Resumed { stored },
                    Err(err) => {
                        refuse(&mut tls, ingest, Refusal::Internal, &err.to_string()).await;
                        break;
                    }
                };
                tracing::debug!(%peer, agent = %identity.name, batches = asked, "resume");
                let sent = tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut tls, &answer)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
                continue;
            }
            Ok(None) => break,
            Ok(Some(other)) => {
                refuse(&mut tls, ingest, Refusal::Malformed, &format!("unexpected frame {other:?}")).await;
                break;
            }
            Err(FrameError::TooLarge { len, max }) => {
                let message = format!("frame of {len} bytes is over the cap of {max} bytes");
                tracing::warn!(%peer, agent = %identity.name, len, max, "frame over the cap");
                refuse(&mut tls, ingest, Refusal::TooLarge, &message).await;
                break;
            }
            Err(FrameError::Io(err)) => {
                tracing::info!(%peer, agent = %identity.name, error = %err, "connection lost");
                break;
            }
            Err(err) => {
                tracing::warn!(%peer, agent = %identity.name, error = %err, "bad frame");
                refuse(&mut tls, ingest, Refusal::Malformed, &err.to_string()).await;
                break;
            }
        };
        let batch = match BatchView::parse(&bytes, &limits) {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(%peer, agent = %identity.name, error = %err, "malformed batch");
                refuse(&mut tls, ingest, batch_refusal(&err), &err.to_string()).await;
                break;
            }
        };
        if batch.header.agent_id != identity.name {
            let message = format!(
                "batch claims agent {:?} but the certificate names {:?}",
                batch.header.agent_id, identity.name
            );
            tracing::warn!(%peer, agent = %identity.name, claimed = %batch.header.agent_id, "forged agent id");
            refuse(&mut tls, ingest, Refusal::ForgedAgent, &message).await;
            break;
        }
        if let Err(err) = batch.verify(&identity.signing_key) {
            tracing::warn!(%peer, agent = %identity.name, error = %err, "bad batch signature");
            refuse(&mut tls, ingest, Refusal::Signature, &err.to_string()).await;
            break;
        }
        // Only a signed batch is inflated, into a buffer no larger than
        // the capped size its header declares.
        if let Err(err) = batch.records(&limits, &mut inflater) {
            tracing::warn!(%peer, agent = %identity.name, error = %err, "malformed records");
            refuse(&mut tls, ingest, batch_refusal(&err), &err.to_string()).await;
            break;
        }
        if ingest.wal.is_busy() {
            // The agent keeps the batch, spools if it must, and retries.
            refuse(
                &mut tls,
                ingest,
                Refusal::Busy,
                "collector busy: its WAL is full or its disk past the high watermark",
            )
            .await;
            break;
        }
        let (header, hash) = (batch.header, batch.hash);
        let (size, count) = (bytes.len(), header.count);
        ingest.pace(&identity.name, size, &cancel).await;
        let request = AppendRequest {
            tenant: tenant.clone(),
            host: identity.name.clone(),
            received_ns: crate::time::now_ns(),
            header,
            batch: bytes,
            signer: identity.signing_key.to_vec(),
        };
        match ingest.wal.append(request).await {
            Ok(appended) => {
                let status = match appended {
                    Appended::Stored { skipped } => {
                        ingest.stats.stored(&tenant, size, u64::from(count - skipped));
                        AckStatus::Stored
                    }
                    Appended::Duplicate => {
                        ingest.stats.batches_duplicate.fetch_add(1, Ordering::Relaxed);
                        AckStatus::Duplicate
                    }
                };
                ingest.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                let ack = Frame::Ack { batch_hash: hash, status };
                let sent = tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut tls, &ack)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    tracing::info!(%peer, agent = %identity.name, "ack not delivered; the agent resends");
                    break;
                }
            }
            Err(crate::wal::WalError::Sequence { fault, message }) => {
                let why = match fault {
                    SequenceFault::Gap => Refusal::Gap,
                    SequenceFault::Replay => Refusal::Replay,
                    SequenceFault::Chain => Refusal::Chain,
                };
                refuse(&mut tls, ingest, why, &message).await;
                break;
            }
            Err(err @ crate::wal::WalError::Full { .. }) => {
                refuse(&mut tls, ingest, Refusal::Busy, &format!("collector busy: {err}")).await;
                break;
            }
            Err(crate::wal::WalError::Shared { message }) => {
                refuse(&mut tls, ingest, Refusal::Busy, &message).await;
                break;
            }
            Err(err) => {
                tracing::error!(agent = %identity.name, error = %err, "wal append failed");
                refuse(&mut tls, ingest, Refusal::Internal, &err.to_string()).await;
                break;
            }
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, tokio::io::AsyncWriteExt::shutdown(&mut tls)).await;
}

async fn refuse(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    ingest: &Ingest,
    why: Refusal,
    message: &str,
) {
    ingest.stats.refused(why);
    let frame = Frame::Refused { code: why.code(), message: message.to_owned() };
    let _ = tokio::time::timeout(Duration::from_secs(1), write_frame(tls, &frame)).await;
}

/// A batch over one of its size caps is too large; anything else is malformed.
fn batch_refusal(err: &BatchError) -> Refusal {
    match err {
        BatchError::OverLimit { .. } => Refusal::TooLarge,
        _ => Refusal::Malformed,
    }
}
