//! Shipping signed batches over mutual TLS and turning acks into
//! checkpoints.
//!
//! Batches are sent in order and kept in a bounded in-flight window until
//! the collector acks them (it acks only after its WAL fsync). A lost
//! connection is retried forever with capped exponential backoff and
//! jitter. On reconnect the agent first asks which of the window's
//! batches the collector holds (`Resume`, by batch hash); those at the
//! front of the window that it holds durably are acked without being sent
//! again, and the rest are resent byte for byte (the collector still
//! recognises any record it stored by (stream, epoch, seq)).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use logvault_storage::batch::peek_header;
use logvault_storage::frame::{
    AckStatus, BatchRef, DEFAULT_MAX_FRAME, Frame, FrameDecoder, MAX_RESUME_BATCHES, PROTOCOL_VERSION,
    RefuseCode, write_batch_frame, write_frame,
};
use ring::rand::SecureRandom;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::Stats;
use crate::checkpoint::Checkpoints;
use crate::config::CollectorConfig;
use crate::spool::Spool;
use crate::tail::SignedBatch;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the answer to `Resume` may take.
const RESUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the acks of batches already sent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Where the shipper takes batches from: the tailer's queue, or the disk
/// spool it fills.
pub enum BatchSource {
    /// The bounded in-memory queue.
    Queue(mpsc::Receiver<SignedBatch>),
    /// The disk spool.
    Spool(Arc<Spool>),
}

impl BatchSource {
    /// The next batch; `None` once every producer is gone and all is read.
    async fn next(&mut self) -> Option<SignedBatch> {
        match self {
            BatchSource::Queue(queue) => queue.recv().await,
            BatchSource::Spool(spool) => spool.next_async().await,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            BatchSource::Queue(queue) => queue.is_empty(),
            BatchSource::Spool(_) => true,
        }
    }

    fn acked(&self, batch: &SignedBatch) {
        if let (BatchSource::Spool(spool), Some(position)) = (self, batch.spool_position) {
            spool.ack(position);
        }
    }
}

/// Capped exponential backoff with full jitter.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self { next: Duration::from_millis(100), max }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    fn delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut byte = [0u8; 1];
        let _ = ring::rand::SystemRandom::new().fill(&mut byte);
        // Between half and all of the ceiling.
        ceiling / 2 + ceiling.mul_f64(f64::from(byte[0]) / 510.0)
    }
}

enum SessionEnd {
    /// Shutdown finished (window empty or grace over).
    Done,
    /// The connection is gone or the collector asked us to come back later.
    Retry,
}

/// Ships until `cancel` fires (then waits briefly for outstanding acks).
pub async fn run(
    config: CollectorConfig,
    tls: Arc<ClientConfig>,
    mut batches: BatchSource,
    checkpoints: Checkpoints,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    let mut window: VecDeque<SignedBatch> = VecDeque::new();
    let mut backoff = Backoff::new(Duration::from_millis(config.max_backoff_ms.max(100)));
    let connector = TlsConnector::from(tls);
    let addresses = config.addresses();
    // The collector in use; the next one is tried when it cannot be reached.
    let mut current = 0;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let address = addresses[current];
        let server_name = config.tls_name(address);
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            connected = connect(&connector, address, &server_name) => connected,
        };
        let stream = match connected {
            Ok(stream) => stream,
            Err(err) => {
                let delay = backoff.delay();
                current = (current + 1) % addresses.len();
                if addresses.len() > 1 {
                    tracing::warn!(collector = %address, error = %err, next = %addresses[current], retry_in_ms = delay.as_millis() as u64, "cannot reach collector; failing over");
                } else {
                    tracing::warn!(collector = %address, error = %err, retry_in_ms = delay.as_millis() as u64, "cannot reach collector");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        tracing::info!(collector = %address, resending = window.len(), "connected to collector");
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.connected.store(1, Ordering::Relaxed);
        let end =
            session(stream, &config, &mut window, &mut batches, &checkpoints, &stats, &cancel, &mut backoff)
                .await;
        stats.connected.store(0, Ordering::Relaxed);
        match end {
            SessionEnd::Done => return,
            SessionEnd::Retry => {
                let delay = backoff.delay();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// A batch is durable at the collector: its checkpoint may move.
fn complete(
    batch: &SignedBatch,
    status: AckStatus,
    checkpoints: &Checkpoints,
    batches: &BatchSource,
    stats: &Stats,
) {
    checkpoints.ack(batch.file, batch.ack);
    if let Some(cursor) = &batch.cursor {
        checkpoints.set_journal(crate::checkpoint::JournalCheckpoint {
            epoch: batch.ack.epoch,
            acked_seq: batch.ack.seq,
            cursor: Some(cursor.clone()),
            prev_hash: Some(crate::checkpoint::hex(&batch.hash)),
        });
    }
    batches.acked(batch);
    stats.batches_acked.fetch_add(1, Ordering::Relaxed);
    stats.records_acked.fetch_add(u64::from(batch.records), Ordering::Relaxed);
    if status == AckStatus::Duplicate {
        stats.batches_duplicate.fetch_add(1, Ordering::Relaxed);
    }
}

/// The window's batches as `Resume` names them, front first, at most
/// [`MAX_RESUME_BATCHES`] (the rest are resent).
fn resume_batches(window: &VecDeque<SignedBatch>) -> Vec<BatchRef> {
    window
        .iter()
        .take(MAX_RESUME_BATCHES)
        .map_while(|batch| {
            let header = peek_header(&batch.bytes).ok()?;
            Some(BatchRef { source: header.source, epoch: header.epoch, hash: batch.hash })
        })
        .collect()
}

async fn connect(
    connector: &TlsConnector,
    address: &str,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attempt = async {
        let tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        connector.connect(name, tcp).await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

#[allow(clippy::too_many_arguments)]
async fn session(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    config: &CollectorConfig,
    window: &mut VecDeque<SignedBatch>,
    batches: &mut BatchSource,
    checkpoints: &Checkpoints,
    stats: &Stats,
    cancel: &CancellationToken,
    backoff: &mut Backoff,
) -> SessionEnd {
    let (mut read_half, mut write_half) = tokio::io::split(stream);
    let (frames_tx, mut frames) = mpsc::channel::<Result<Frame, String>>(64);
    let reader = tokio::spawn(async move {
        let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        loop {
            let next = match decoder.read(&mut read_half).await {
                Ok(Some(frame)) => Ok(frame),
                Ok(None) => Err("collector closed the connection".to_owned()),
                Err(err) => Err(err.to_string()),
            };
            let failed = next.is_err();
            if frames_tx.send(next).await.is_err() || failed {
                return;
            }
        }
    });
    let end = async {
        if let Err(err) = write_frame(&mut write_half, &Frame::Hello { version: PROTOCOL_VERSION }).await {
            tracing::warn!(error = %err, "sending hello failed");
            return SessionEnd::Retry;
        }
        if !window.is_empty() {
            let asked = resume_batches(window);
            let count = asked.len();
            if write_frame(&mut write_half, &Frame::Resume { batches: asked }).await.is_err()
                || write_half.flush().await.is_err()
            {
                return SessionEnd::Retry;
            }
            let stored = match tokio::time::timeout(RESUME_TIMEOUT, frames.recv()).await {
                Ok(Some(Ok(Frame::Resumed { stored }))) if stored.len() == count => stored,
                Ok(Some(Ok(Frame::Refused { code, message }))) => {
                    tracing::warn!(code = ?code, reason = %message, "collector refused the resume");
                    return SessionEnd::Retry;
                }
                other => {
                    tracing::warn!(answer = ?other.map(|f| f.map(|f| format!("{f:?}"))), "no answer to resume; reconnecting");
                    return SessionEnd::Retry;
                }
            };
            // Only the stored front: acks (and the spool's head) move in order.
            let skip = stored.iter().take_while(|s| **s).count();
            for front in window.drain(..skip) {
                complete(&front, AckStatus::Duplicate, checkpoints, batches, stats);
                stats.batches_resumed.fetch_add(1, Ordering::Relaxed);
            }
            stats.unacked_batches.store(window.len() as u64, Ordering::Relaxed);
            if skip > 0 {
                tracing::info!(skipped = skip, resending = window.len(), "resumed after the batches the collector holds");
            }
        }
        for batch in window.iter() {
            if let Err(err) = write_batch_frame(&mut write_half, &batch.bytes).await {
                tracing::warn!(error = %err, "resending failed");
                return SessionEnd::Retry;
            }
        }
        if write_half.flush().await.is_err() {
            return SessionEnd::Retry;
        }
        let mut draining = cancel.is_cancelled();
        let grace = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(grace);
        loop {
            if draining && window.is_empty() {
                return SessionEnd::Done;
            }
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(Ok(Frame::Ack { batch_hash, status })) => {
                        let Some(front) = window.pop_front() else {
                            tracing::warn!("ack for a batch never sent; reconnecting");
                            return SessionEnd::Retry;
                        };
                        if front.hash != batch_hash {
                            tracing::warn!("ack out of order; reconnecting");
                            window.push_front(front);
                            return SessionEnd::Retry;
                        }
                        complete(&front, status, checkpoints, batches, stats);
                        stats.unacked_batches.store(window.len() as u64, Ordering::Relaxed);
                        backoff.reset();
                    }
                    Some(Ok(Frame::Refused { code, message })) => {
                        if code == RefuseCode::Busy {
                            tracing::info!(reason = %message, "collector busy; backing off");
                        } else if (code == RefuseCode::Sequence
                            || (code == RefuseCode::Gap && stats.spool_corrupt_entries.load(Ordering::Relaxed) > 0))
                            && window.front().is_some_and(|front| front.spool_position.is_some())
                        {
                            // A spooled batch whose predecessor was lost to a
                            // damaged spool entry (a broken chain, or a gap
                            // where the lost batch was never delivered): its
                            // file checkpoint stays where it is, so its lines
                            // are read again from the file in a fresh chain.
                            let front = window.pop_front().expect("checked");
                            batches.acked(&front);
                            stats.batches_refused.fetch_add(1, Ordering::Relaxed);
                            stats.spool_orphans_dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(reason = %message, records = front.records, "collector refused a spooled batch out of sequence; dropped from the spool, its lines are read again from the file's checkpoint");
                        } else if code == RefuseCode::Gap {
                            stats.batches_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(reason = %message, "collector refused a batch after a sequence gap; if this agent's spool dropped batches (when_full = \"drop_oldest\"), the collector needs ingest.accept_gaps; the batch stays queued and is retried");
                        } else if code == RefuseCode::Sequence {
                            stats.batches_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(reason = %message, "collector refused a batch out of sequence; it stays queued and is retried");
                        } else if code == RefuseCode::TooLarge {
                            stats.batches_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(reason = %message, "collector refused a batch as too large; lower batch.max_bytes below the collector's ingest.max_frame_bytes");
                        } else {
                            stats.batches_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(code = ?code, reason = %message, "collector refused a batch; it stays queued and is retried");
                        }
                        return SessionEnd::Retry;
                    }
                    Some(Ok(other)) => {
                        tracing::warn!(frame = ?other, "unexpected frame from collector; reconnecting");
                        return SessionEnd::Retry;
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, unacked = window.len(), "connection lost");
                        return SessionEnd::Retry;
                    }
                    None => return SessionEnd::Retry,
                },
                _ = cancel.cancelled(), if !draining => {
                    draining = true;
                    grace.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                }
                _ = &mut grace, if draining => {
                    tracing::warn!(unacked = window.len(), "shutting down with unacked batches; they are read again at next start");
                    return SessionEnd::Done;
                }
                batch = batches.next(), if !draining && window.len() < config.max_in_flight => {
                    let Some(batch) = batch else {
                        draining = true;
                        continue;
                    };
                    if let Err(err) = write_batch_frame(&mut write_half, &batch.bytes).await {
                        tracing::warn!(error = %err, "send failed");
                        window.push_back(batch);
                        return SessionEnd::Retry;
                    }
                    window.push_back(batch);
                    stats.unacked_batches.store(window.len() as u64, Ordering::Relaxed);
                    stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                    if batches.is_empty() && write_half.flush().await.is_err() {
                        return SessionEnd::Retry;
                    }
                }
            }
        }
    }
    .await;
    reader.abort();
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Acked, FileKey};
    use logvault_storage::{BatchBuilder, Level, WireRecord};

    fn batch(source: &str, epoch: u64, first_seq: u64, count: u32) -> SignedBatch {
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap();
        let mut builder = BatchBuilder::new("a", source, epoch, first_seq, [0; 32]);
        for i in 0..count {
            builder.push(WireRecord::new(0, Level::Info, format!("line {i}")));
        }
        let bytes = builder.sign(&key);
        let hash = logvault_storage::batch::encoded_batch_hash(&bytes).unwrap();
        SignedBatch {
            bytes,
            hash,
            file: FileKey { dev: 1, ino: 1 },
            ack: Acked {
                epoch,
                offset: 0,
                seq: first_seq + u64::from(count),
                in_long_line: false,
                batch_hash: hash,
            },
            records: count,
            spool_position: None,
            cursor: None,
        }
    }

    #[test]
    fn resume_names_the_window_front_first_by_stream_and_hash() {
        let window: VecDeque<SignedBatch> =
            [batch("/a", 1, 0, 10), batch("/b", 2, 0, 10), batch("/a", 1, 10, 10)].into();
        let asked = resume_batches(&window);
        let names: Vec<(&str, u64)> = asked.iter().map(|b| (b.source.as_str(), b.epoch)).collect();
        assert_eq!(names, vec![("/a", 1), ("/b", 2), ("/a", 1)]);
        assert!(asked.iter().zip(&window).all(|(asked, batch)| asked.hash == batch.hash));
        let long: VecDeque<SignedBatch> =
            (0..MAX_RESUME_BATCHES as u64 + 5).map(|e| batch("/a", e, 0, 1)).collect();
        assert_eq!(resume_batches(&long).len(), MAX_RESUME_BATCHES);
    }
}
