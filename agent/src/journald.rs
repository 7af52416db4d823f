//! The systemd journal as a source: `[[sources]] journald = true`.
//!
//! Read through `journalctl -o json --follow` (a library binding would be
//! heavy), resumed after the last acked cursor, so a restart ships nothing
//! twice and misses nothing the journal still holds. Each entry becomes a
//! record: `MESSAGE` is the message, `__REALTIME_TIMESTAMP` the time,
//! `PRIORITY` the level, and `_HOSTNAME`, `SYSLOG_IDENTIFIER`, `_PID` and
//! `_SYSTEMD_UNIT` the fields `hostname`, `appname`, `procid` and `unit`.
//! `journalctl_args` adds arguments (`--unit=ssh.service`, `--file=...`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use logvault_storage::batch::encoded_batch_hash;
use logvault_storage::record::FLAG_TRUNCATED;
use logvault_storage::{BatchBuilder, Level};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Stats;
use crate::checkpoint::{Acked, Checkpoints, FileKey, JournalCheckpoint};
use crate::config::{BatchConfig, ReadFrom, SourceConfig};
use crate::parse::Redactor;
use crate::sign::Signer;
use crate::tail::{SignedBatch, cap_record};

/// The stream name of the journal.
pub const JOURNAL_SOURCE: &str = "journald";
/// A batch is sent when no entry came for this long.
const IDLE_FLUSH: Duration = Duration::from_millis(200);
/// Wait before starting journalctl again after it exited.
const RESTART_DELAY: Duration = Duration::from_secs(2);

/// Everything the journal reader needs.
pub struct JournalReader {
    /// The source's settings.
    pub settings: SourceConfig,
    /// Batch limits.
    pub batch: BatchConfig,
    /// The agent's name.
    pub agent_id: String,
    /// Signs and compresses batches.
    pub signer: Signer,
    /// Where the acked cursor is kept.
    pub checkpoints: Checkpoints,
    /// Where batches go.
    pub tx: mpsc::Sender<SignedBatch>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl JournalReader {
    /// Reads the journal until `cancel` fires. Blocking: run it on its own thread.
    pub fn run(self, cancel: CancellationToken) {
        let redactor = self.settings.redactor().unwrap_or_default();
        while !cancel.is_cancelled() {
            // Resume after the acked cursor with the acked sequence number:
            // the same entries get the same numbers as before.
            let state = match self.checkpoints.journal() {
                Some(state) => state,
                None => {
                    let epoch = self.checkpoints.next_epoch(JOURNAL_SOURCE);
                    let state = JournalCheckpoint { epoch, acked_seq: 0, cursor: None, prev_hash: None };
                    self.checkpoints.set_journal(state.clone());
                    if let Err(err) = self.checkpoints.persist() {
                        tracing::error!(error = %err, "cannot save the journal epoch");
                        std::thread::sleep(RESTART_DELAY);
                        continue;
                    }
                    state
                }
            };
            match self.follow(&state, &redactor, &cancel) {
                Ok(()) => return,
                Err(message) => {
                    tracing::warn!(reason = %message, "journalctl stopped; starting it again");
                    std::thread::sleep(RESTART_DELAY);
                }
            }
        }
    }

    fn command(&self, state: &JournalCheckpoint) -> Command {
        let mut command = Command::new("journalctl");
        // --merge: every journal, not only this boot's (follow mode would
        // otherwise limit itself to the current boot).
        command.args(["--output=json", "--follow", "--merge", "--no-pager", "--quiet"]);
        match &state.cursor {
            Some(cursor) => {
                command.arg("--no-tail").arg(format!("--after-cursor={cursor}"));
            }
            None if self.settings.read_from == ReadFrom::End => {
                command.arg("--lines=0");
            }
            None => {
                command.arg("--no-tail");
            }
        }
        command.args(&self.settings.journalctl_args);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// Ships entries until `cancel` fires (`Ok`) or journalctl ends (`Err`).
    fn follow(
        &self,
        state: &JournalCheckpoint,
        redactor: &Redactor,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let mut child: Child =
            self.command(state).spawn().map_err(|e| format!("cannot start journalctl: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (lines_tx, lines) = std::sync::mpsc::sync_channel::<String>(1024);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seq = state.acked_seq;
        let mut prev_hash =
            state.prev_hash.as_deref().and_then(crate::checkpoint::unhex32).unwrap_or([0u8; 32]);
        let mut builder: Option<(BatchBuilder, String)> = None;
        let mut last_entry = Instant::now();
        let outcome = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            match lines.recv_timeout(IDLE_FLUSH) {
                Ok(line) => {
                    last_entry = Instant::now();
                    let Some((cursor, timestamp_ns, level, message, mut fields)) = parse_entry(&line) else {
                        continue;
                    };
                    let (message, redacted) = redactor.apply(&message);
                    if redacted {
                        self.stats.lines_redacted.fetch_add(1, Ordering::Relaxed);
                    }
                    let (message, capped) = cap_record(message, &mut fields);
                    let (batch, last_cursor) = builder.get_or_insert_with(|| {
                        (
                            BatchBuilder::new(&self.agent_id, JOURNAL_SOURCE, state.epoch, seq, prev_hash),
                            String::new(),
                        )
                    });
                    let flags = if capped { FLAG_TRUNCATED } else { 0 };
                    batch.push_parts(timestamp_ns, level, flags, &message, &fields);
                    *last_cursor = cursor;
                    seq += 1;
                    self.stats.lines_read.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes_read.fetch_add(line.len() as u64, Ordering::Relaxed);
                    let full =
                        batch.len() >= self.batch.max_records || batch.body_bytes() >= self.batch.max_bytes;
                    if full && self.send(&mut builder, state.epoch, seq, &mut prev_hash).is_err() {
                        break Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if last_entry.elapsed() >= IDLE_FLUSH
                        && self.send(&mut builder, state.epoch, seq, &mut prev_hash).is_err()
                    {
                        break Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.send(&mut builder, state.epoch, seq, &mut prev_hash);
                    let mut message = String::new();
                    let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut message);
                    break Err(format!("journalctl exited: {}", message.trim()));
                }
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        outcome
    }

    fn send(
        &self,
        builder: &mut Option<(BatchBuilder, String)>,
        epoch: u64,
        seq: u64,
        prev_hash: &mut [u8; 32],
    ) -> Result<(), ()> {
        let Some((batch, cursor)) = builder.take() else { return Ok(()) };
        let records = batch.len();
        let bytes = self.signer.sign(batch);
        let hash = encoded_batch_hash(&bytes).expect("a batch we built decodes");
        *prev_hash = hash;
        let signed = SignedBatch {
            bytes,
            hash,
            file: FileKey { dev: 0, ino: 0 },
            ack: Acked { epoch, offset: 0, seq, in_long_line: false, batch_hash: hash },
            records,
            spool_position: None,
            cursor: Some(cursor),
        };
        self.tx.blocking_send(signed).map_err(|_| ())
    }
}

type Entry = (String, i64, Level, String, Vec<(String, String)>);

/// One `journalctl -o json` line: cursor, time, level, message, fields.
fn parse_entry(line: &str) -> Option<Entry> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let cursor = value["__CURSOR"].as_str()?.to_owned();
    let text = |key: &str| -> Option<String> {
        match &value[key] {
            serde_json::Value::String(text) => Some(text.clone()),
            // Binary or non-UTF-8 values come as arrays of bytes.
            serde_json::Value::Array(bytes) => {
                let bytes: Vec<u8> = bytes.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect();
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            _ => None,
        }
    };
    let message = text("MESSAGE").unwrap_or_default();
    let timestamp_ns = text("__REALTIME_TIMESTAMP")
        .and_then(|us| us.parse::<i64>().ok())
        .and_then(|us| us.checked_mul(1000))
        .unwrap_or_default();
    let level = match text("PRIORITY").and_then(|p| p.parse::<u8>().ok()) {
        Some(0..=2) => Level::Fatal,
        Some(3) => Level::Error,
        Some(4) => Level::Warn,
        Some(5 | 6) => Level::Info,
        Some(7) => Level::Debug,
        _ => Level::Unknown,
    };
    let fields = [
        ("_HOSTNAME", "hostname"),
        ("SYSLOG_IDENTIFIER", "appname"),
        ("_PID", "procid"),
        ("_SYSTEMD_UNIT", "unit"),
    ]
    .into_iter()
    .filter_map(|(key, name)| Some((name.to_owned(), text(key)?)))
    .collect();
    Some((cursor, timestamp_ns, level, message, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_map_to_records() {
        let line = r#"{"__CURSOR":"s=1;i=2","__REALTIME_TIMESTAMP":"1700000000000001","PRIORITY":"3","MESSAGE":[104,105,255],"_HOSTNAME":"h1","SYSLOG_IDENTIFIER":"sshd","_PID":"42"}"#;
        let (cursor, ts, level, message, fields) = parse_entry(line).unwrap();
        assert_eq!(cursor, "s=1;i=2");
        assert_eq!(ts, 1_700_000_000_000_001_000);
        assert_eq!(level, Level::Error);
        assert_eq!(message, "hi\u{fffd}");
        assert_eq!(
            fields,
            vec![
                ("hostname".into(), "h1".into()),
                ("appname".into(), "sshd".into()),
                ("procid".into(), "42".into())
            ]
        );
        assert!(parse_entry("not json").is_none());
        assert!(parse_entry("{}").is_none());
    }
}
