//! Standard input as a source: `[[sources]] stdin = true`.
//!
//! Lines are split, redacted, parsed and batched as file lines are. The
//! stream is `stdin` with a new epoch per run. Standard input cannot be
//! read again, so lines in flight when the agent is killed are lost; at
//! end of input the agent ships what is left, waits for the acks and, when
//! stdin is its only source, exits.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use logvault_storage::batch::encoded_batch_hash;
use logvault_storage::record::{FLAG_CONTINUED, FLAG_INVALID_UTF8, FLAG_TRUNCATED};
use logvault_storage::{BatchBuilder, Level};
use ring::signature::Ed25519KeyPair;
use tokio::sync::mpsc;

use crate::Stats;
use crate::checkpoint::{Acked, FileKey};
use crate::config::{BatchConfig, SourceConfig};
use crate::parse::{Parser, Redactor};
use crate::sign::Signer;
use crate::tail::{SignedBatch, next_piece};

/// The stream name of standard input.
pub const STDIN_SOURCE: &str = "stdin";
const READ_CHUNK: usize = 256 * 1024;

/// Reads standard input to its end. Blocking: run it on its own thread.
#[allow(clippy::too_many_arguments)]
pub fn run(
    settings: SourceConfig,
    batch: BatchConfig,
    agent_id: String,
    key: Arc<Ed25519KeyPair>,
    epoch: u64,
    tx: mpsc::Sender<SignedBatch>,
    stats: Arc<Stats>,
) {
    let parser = settings.parser().unwrap_or_else(|_| Parser::none());
    let redactor = settings.redactor().unwrap_or_default();
    let signer = Signer::new(key, &batch);
    let mut reader = StdinBatcher {
        settings,
        batch,
        agent_id,
        signer,
        epoch,
        tx,
        stats,
        parser,
        redactor,
        seq: 0,
        prev_hash: [0; 32],
    };
    let mut input = std::io::stdin().lock();
    let mut buffer: Vec<u8> = Vec::new();
    let mut in_long_line = false;
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let read = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::error!(error = %err, "reading stdin failed");
                break;
            }
        };
        buffer.extend_from_slice(&chunk[..read]);
        let mut builder = None;
        let mut consumed = 0;
        let max_line = reader.settings.max_line_bytes;
        let mode = reader.settings.on_long_line;
        while let Some(piece) = next_piece(&buffer[consumed..], max_line, in_long_line, mode) {
            let start = consumed;
            consumed += piece.consumed;
            let was_in_long_line = in_long_line;
            in_long_line = piece.cut;
            if piece.discarded > 0 {
                reader.stats.bytes_discarded.fetch_add(piece.discarded as u64, Ordering::Relaxed);
            }
            if let Some(line) = piece.line {
                let line = buffer[start..start + line].to_vec();
                if reader.push(&mut builder, &line, piece.cut, was_in_long_line).is_err() {
                    return;
                }
            }
            if consumed == buffer.len() {
                break;
            }
        }
        buffer.drain(..consumed);
        if reader.flush(&mut builder).is_err() {
            return;
        }
    }
    // End of input: an unterminated last line is a record too.
    let mut builder = None;
    if !buffer.is_empty() && reader.push(&mut builder, &buffer, false, in_long_line).is_err() {
        return;
    }
    let _ = reader.flush(&mut builder);
    tracing::info!(records = reader.seq, "end of stdin");
}

struct StdinBatcher {
    settings: SourceConfig,
    batch: BatchConfig,
    agent_id: String,
    signer: Signer,
    epoch: u64,
    tx: mpsc::Sender<SignedBatch>,
    stats: Arc<Stats>,
    parser: Parser,
    redactor: Redactor,
    seq: u64,
    prev_hash: [u8; 32],
}

struct Stopped;

impl StdinBatcher {
    fn push(
        &mut self,
        builder: &mut Option<BatchBuilder>,
        line: &[u8],
        cut: bool,
        continued: bool,
    ) -> Result<(), Stopped> {
        let text = String::from_utf8_lossy(line);
        let mut flags = 0;
        if let std::borrow::Cow::Owned(_) = text {
            self.stats.invalid_utf8_lines.fetch_add(1, Ordering::Relaxed);
            flags |= FLAG_INVALID_UTF8;
        }
        if cut {
            flags |= FLAG_TRUNCATED;
        }
        if continued {
            flags |= FLAG_CONTINUED;
        }
        let (text, redacted) = self.redactor.apply(&text);
        if redacted {
            self.stats.lines_redacted.fetch_add(1, Ordering::Relaxed);
        }
        let full = builder.as_ref().is_some_and(|b: &BatchBuilder| {
            !b.is_empty()
                && (b.len() >= self.batch.max_records
                    || b.body_bytes() + 2 * text.len() + 64 > self.batch.max_bytes)
        });
        if full {
            self.flush(builder)?;
        }
        let mut parsed = self.parser.parse(&text);
        let (text, capped) = crate::tail::cap_record(text, &mut parsed.fields);
        if capped {
            flags |= FLAG_TRUNCATED;
        }
        let now_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        let batch = builder.get_or_insert_with(|| {
            BatchBuilder::new(&self.agent_id, STDIN_SOURCE, self.epoch, self.seq, self.prev_hash)
        });
        batch.push_parts(
            parsed.timestamp_ns.unwrap_or(now_ns),
            parsed.level.unwrap_or(Level::Unknown),
            flags,
            &text,
            &parsed.fields,
        );
        self.seq += 1;
        self.stats.lines_read.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_read.fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&mut self, builder: &mut Option<BatchBuilder>) -> Result<(), Stopped> {
        let Some(batch) = builder.take() else { return Ok(()) };
        let records = batch.len();
        let bytes = self.signer.sign(batch);
        let hash = encoded_batch_hash(&bytes).expect("a batch we built decodes");
        self.prev_hash = hash;
        let signed = SignedBatch {
            bytes,
            hash,
            // Standard input has no checkpoint: acks move nothing.
            file: FileKey { dev: 0, ino: 0 },
            ack: Acked { epoch: self.epoch, offset: 0, seq: self.seq, in_long_line: false, batch_hash: hash },
            records,
            spool_position: None,
            cursor: None,
        };
        self.tx.blocking_send(signed).map_err(|_| Stopped)
    }
}
