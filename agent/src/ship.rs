//! Shipping signed batches over mutual TLS and turning acks into
//! checkpoints.
//!
//! Batches are sent in order and kept in a bounded in-flight window until
//! the collector acks them (it acks only after its WAL fsync). A lost
//! connection is retried forever with capped exponential backoff and
//! jitter. On reconnect the agent first asks where the window's streams
//! stand (`Resume`); the batches at the front of the window that the
//! collector already holds durably are acked without being sent again,
//! and the rest are resent byte for byte (the collector still recognises
//! any record it stored by (stream, epoch, seq)).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use logvault_storage::batch::peek_header;
use logvault_storage::frame::{
    AckStatus, DEFAULT_MAX_FRAME, Frame, FrameDecoder, MAX_RESUME_STREAMS, PROTOCOL_VERSION, RefuseCode,
    write_batch_frame, write_frame,
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
    let server_name = config.tls_name();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            connected = connect(&connector, &config.address, &server_name) => connected,
        };
        let stream = match connected {
            Ok(stream) => stream,
            Err(err) => {
                let delay = backoff.delay();
                tracing::warn!(collector = %config.address, error = %err, retry_in_ms = delay.as_millis() as u64, "cannot reach collector");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        tracing::info!(collector = %config.address, resending = window.len(), "connected to collector");
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
        });
    }
    batches.acked(batch);
    stats.batches_acked.fetch_add(1, Ordering::Relaxed);
    stats.records_acked.fetch_add(u64::from(batch.records), Ordering::Relaxed);
    if status == AckStatus::Duplicate {
        stats.batches_duplicate.fetch_add(1, Ordering::Relaxed);
    }
}

/// The distinct (source, epoch) streams of the window, in window order, at
/// most [`MAX_RESUME_STREAMS`].
fn resume_streams(window: &VecDeque<SignedBatch>) -> Vec<(String, u64)> {
    let mut streams: Vec<(String, u64)> = Vec::new();
    for batch in window {
        let Ok(header) = peek_header(&batch.bytes) else { continue };
        if !streams.iter().any(|(source, epoch)| *epoch == header.epoch && *source == header.source) {
            if streams.len() == MAX_RESUME_STREAMS {
                break;
            }
            streams.push((header.source, header.epoch));
        }
    }
    streams
}

/// How many batches at the front of the window the collector holds: each
/// ends at or below its stream's stored mark. Only a prefix counts, so
/// acks (and the spool's head) still move in order.
fn stored_prefix(window: &VecDeque<SignedBatch>, streams: &[(String, u64)], next_seqs: &[u64]) -> usize {
    window
        .iter()
        .take_while(|batch| {
            let Ok(header) = peek_header(&batch.bytes) else { return false };
            let Some(at) = streams.iter().position(|(s, e)| *e == header.epoch && *s == header.source) else {
                return false;
            };
            header.count > 0 && header.end_seq() <= next_seqs[at]
        })
        .count()
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
            let streams = resume_streams(window);
            if write_frame(&mut write_half, &Frame::Resume { streams: streams.clone() }).await.is_err()
                || write_half.flush().await.is_err()
            {
                return SessionEnd::Retry;
            }
            let next_seqs = match tokio::time::timeout(RESUME_TIMEOUT, frames.recv()).await {
                Ok(Some(Ok(Frame::Resumed { next_seqs }))) if next_seqs.len() == streams.len() => next_seqs,
                Ok(Some(Ok(Frame::Refused { code, message }))) => {
                    tracing::warn!(code = ?code, reason = %message, "collector refused the resume");
                    return SessionEnd::Retry;
                }
                other => {
                    tracing::warn!(answer = ?other.map(|f| f.map(|f| format!("{f:?}"))), "no answer to resume; reconnecting");
                    return SessionEnd::Retry;
                }
            };
            let stored = stored_prefix(window, &streams, &next_seqs);
            for front in window.drain(..stored) {
                complete(&front, AckStatus::Duplicate, checkpoints, batches, stats);
                stats.batches_resumed.fetch_add(1, Ordering::Relaxed);
            }
            stats.unacked_batches.store(window.len() as u64, Ordering::Relaxed);
            if stored > 0 {
                tracing::info!(skipped = stored, resending = window.len(), "resumed after the collector's stored sequence numbers");
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
    fn only_the_stored_front_of_the_window_is_skipped() {
        let window: VecDeque<SignedBatch> = [
            batch("/a", 1, 0, 10),
            batch("/b", 1, 0, 10),
            batch("/a", 1, 10, 10),
            batch("/a", 2, 0, 5),
            batch("/b", 1, 10, 10),
        ]
        .into();
        let streams = resume_streams(&window);
        assert_eq!(streams, vec![("/a".to_owned(), 1), ("/b".to_owned(), 1), ("/a".to_owned(), 2)]);
        // /a epoch 1 stored to 20, /b to 10, /a epoch 2 nothing: the first
        // three batches are durable, the fourth is not, so the fifth is
        // resent even though /b would allow it.
        assert_eq!(stored_prefix(&window, &streams, &[20, 10, 0]), 3);
        assert_eq!(stored_prefix(&window, &streams, &[20, 20, 5]), 5);
        // A batch only partly stored is resent (the collector stores its rest).
        assert_eq!(stored_prefix(&window, &streams, &[15, 10, 0]), 2);
        assert_eq!(stored_prefix(&window, &streams, &[0, 10, 0]), 0);
    }

    #[test]
    fn at_most_the_cap_of_streams_is_asked_about() {
        let window: VecDeque<SignedBatch> =
            (0..MAX_RESUME_STREAMS as u64 + 5).map(|epoch| batch("/a", epoch, 0, 1)).collect();
        let streams = resume_streams(&window);
        assert_eq!(streams.len(), MAX_RESUME_STREAMS);
        let all_stored = vec![1; streams.len()];
        // Batches of streams not asked about are resent.
        assert_eq!(stored_prefix(&window, &streams, &all_stored), MAX_RESUME_STREAMS);
    }
}
