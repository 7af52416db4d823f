//! Following files: discovery by glob, rotation, line splitting, batching
//! and signing.
//!
//! Each file is known by its device and inode. The stream of a file is its
//! source (the path it was found at) and an epoch: a file that replaces
//! another at the same path (rename-and-create rotation), or a file that
//! shrank (copytruncate), starts a new epoch whose sequence numbers start
//! at 0. Sequence numbers are a pure function of the file's bytes from the
//! epoch's start offset, so after a restart a resent record carries the
//! same (source, epoch, seq) as before and the collector stores it once.
//!
//! A file renamed away keeps being read through its open handle until it
//! has been gone for [`DRAIN_GRACE`] and holds nothing unread: lines a
//! writer adds after the rename are not lost.
//!
//! Complete lines (ending in `\n`) are shipped as soon as they are read,
//! and so are the pieces of a line longer than `max_line_bytes`. A last
//! line without its newline waits [`PARTIAL_LINE_TIMEOUT`] for the file to
//! grow, then is shipped as it is.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
#[cfg(test)]
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use logvault_storage::BatchBuilder;
use logvault_storage::batch::encoded_batch_hash;
use logvault_storage::record::{FLAG_CONTINUED, FLAG_INVALID_UTF8, FLAG_TRUNCATED, Level};
use ring::signature::Ed25519KeyPair;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Stats;
use crate::checkpoint::{Acked, Checkpoints, FileCheckpoint, FileKey, hex, unhex32};
use crate::config::MultilineConfig;
use crate::config::{AgentConfig, Encoding, LongLine, ReadFrom, SourceConfig};
use crate::parse::{Parser, Redactor};
use crate::sign::Signer;

/// Compiled multiline settings.
#[derive(Clone)]
struct Multiline {
    start: Option<regex_lite::Regex>,
    continuation: Option<regex_lite::Regex>,
    timeout: Duration,
    max_lines: u32,
}

impl Multiline {
    fn new(config: &MultilineConfig) -> Result<Multiline, regex_lite::Error> {
        Ok(Multiline {
            start: config.start.as_deref().map(regex_lite::Regex::new).transpose()?,
            continuation: config.continuation.as_deref().map(regex_lite::Regex::new).transpose()?,
            timeout: Duration::from_millis(config.timeout_ms),
            max_lines: config.max_lines,
        })
    }

    /// Whether `line` belongs to the record before it: it does not match
    /// `start` (when given) and does match `continuation` (when given).
    fn continues(&self, line: &str) -> bool {
        self.start.as_ref().is_none_or(|start| !start.is_match(line))
            && self.continuation.as_ref().is_none_or(|continuation| continuation.is_match(line))
    }
}

/// How long a file renamed away or deleted is still read before release.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// A file is known by its device and inode, and by a fingerprint of its
/// first bytes, up to this many. While a file is shorter, the fingerprint
/// covers what there is and grows with the file; if the bytes it covers
/// ever change, the file was truncated or replaced and is read anew.
pub const FINGERPRINT_WINDOW: u64 = 256;
/// How long an unterminated last line waits for its newline before it is
/// shipped as it is.
pub const PARTIAL_LINE_TIMEOUT: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 1024 * 1024;

/// A signed batch on its way to the collector, with the checkpoint its ack
/// moves to.
#[derive(Debug)]
pub struct SignedBatch {
    /// The encoded batch.
    pub bytes: Vec<u8>,
    /// Its hash, as the collector's ack names it.
    pub hash: [u8; 32],
    /// The file it came from.
    pub file: FileKey,
    /// Where the file's checkpoint moves once acked.
    pub ack: Acked,
    /// Records in the batch.
    pub records: u32,
    /// Where it ends in the spool, once it went through one.
    pub spool_position: Option<(u64, u64)>,
    /// For the journal: the cursor of its last record.
    pub cursor: Option<String>,
}

struct Tracked {
    source: String,
    path: PathBuf,
    file: File,
    settings: SourceConfig,
    parser: Parser,
    redactor: Redactor,
    epoch: u64,
    read_offset: u64,
    next_seq: u64,
    in_long_line: bool,
    prev_hash: [u8; 32],
    missing_since: Option<Instant>,
    /// Length of the file when an unterminated last line was first seen.
    partial_since: Option<(u64, Instant)>,
    /// The file's length at the last read, and when it last changed.
    size_seen: u64,
    grew_at: Instant,
    /// Where earlier unterminated lines were cut (see [`FileCheckpoint::cuts`]).
    cuts: Vec<u64>,
    /// Bytes covered and hash of the file's first bytes (see [`FINGERPRINT_WINDOW`]).
    fingerprint: (u64, String),
    /// The fingerprint was checked against the file since it was opened.
    verified: bool,
    /// Offset after the last record put in a batch, and whether it lies
    /// inside a long line: what an ack of that batch moves the checkpoint to.
    record_end: u64,
    record_end_in_long_line: bool,
    /// A new epoch was assigned and is not on disk yet.
    epoch_unsaved: bool,
    /// Resumed with other line-splitting settings than the checkpoint's.
    splitting_changed: bool,
    /// Multiline merging, when configured, and the record being merged.
    multiline: Option<Multiline>,
    pending: Option<PendingRecord>,
}

/// A multi-line record still collecting lines.
struct PendingRecord {
    text: String,
    flags: u8,
    lines: u32,
    /// Offset after its last line, and the long-line state there.
    end: u64,
    end_in_long_line: bool,
    /// When its last line arrived.
    updated: Instant,
}

impl Tracked {
    fn new(
        source: String,
        path: PathBuf,
        file: File,
        settings: SourceConfig,
        epoch: u64,
        offset: u64,
    ) -> Self {
        let parser = settings.parser().unwrap_or_else(|_| Parser::none());
        let redactor = settings.redactor().unwrap_or_default();
        let multiline = settings.multiline.as_ref().and_then(|m| Multiline::new(m).ok());
        Tracked {
            source,
            path,
            file,
            settings,
            parser,
            redactor,
            epoch,
            read_offset: offset,
            next_seq: 0,
            in_long_line: false,
            prev_hash: [0; 32],
            missing_since: None,
            partial_since: None,
            size_seen: offset,
            grew_at: Instant::now(),
            cuts: Vec::new(),
            fingerprint: (0, String::new()),
            verified: false,
            record_end: offset,
            record_end_in_long_line: false,
            epoch_unsaved: false,
            splitting_changed: false,
            multiline,
            pending: None,
        }
    }

    fn resume(path: PathBuf, file: File, settings: SourceConfig, checkpoint: FileCheckpoint) -> Self {
        let splitting_changed =
            !checkpoint.splitting.is_empty() && checkpoint.splitting != splitting_key(&settings);
        let mut tracked =
            Tracked::new(checkpoint.source, path, file, settings, checkpoint.epoch, checkpoint.acked_offset);
        tracked.next_seq = checkpoint.acked_seq;
        tracked.in_long_line = checkpoint.in_long_line;
        tracked.record_end_in_long_line = checkpoint.in_long_line;
        tracked.prev_hash = unhex32(&checkpoint.prev_hash).unwrap_or([0; 32]);
        tracked.cuts = checkpoint.cuts;
        tracked.fingerprint = (checkpoint.fingerprint_len, checkpoint.fingerprint);
        tracked.splitting_changed = splitting_changed;
        tracked
    }
}

/// The tailer: runs on its own thread, blocking on file reads and on the
/// bounded batch queue (which is how the collector's pace slows reading).
pub struct Tailer {
    config: Arc<AgentConfig>,
    agent_id: String,
    signer: Signer,
    checkpoints: Checkpoints,
    tx: mpsc::Sender<SignedBatch>,
    stats: Arc<Stats>,
    tracked: BTreeMap<FileKey, Tracked>,
    /// Which file each matched path held at the last scan.
    by_path: HashMap<PathBuf, FileKey>,
    /// `read_from = "end"` applies only on the first scan of a fresh agent.
    fresh_start: bool,
}

impl Tailer {
    /// A tailer that sends signed batches into `tx`.
    pub fn new(
        config: Arc<AgentConfig>,
        agent_id: String,
        key: Arc<Ed25519KeyPair>,
        checkpoints: Checkpoints,
        tx: mpsc::Sender<SignedBatch>,
        stats: Arc<Stats>,
    ) -> Tailer {
        let fresh_start = checkpoints.is_fresh();
        let signer = Signer::new(key, &config.batch);
        Tailer {
            config,
            agent_id,
            signer,
            checkpoints,
            tx,
            stats,
            tracked: BTreeMap::new(),
            by_path: HashMap::new(),
            fresh_start,
        }
    }

    /// Polls until `cancel` fires or the shipper is gone.
    pub fn run(mut self, cancel: CancellationToken) {
        let interval = self.config.poll_interval();
        self.scan();
        self.recover_unmatched();
        while !cancel.is_cancelled() {
            self.scan();
            if self.read_all().is_err() {
                return; // the shipper stopped: shutting down
            }
            std::thread::sleep(interval);
        }
    }

    fn scan(&mut self) {
        let mut matched: BTreeMap<PathBuf, usize> = BTreeMap::new();
        for (index, source) in self.config.sources.iter().enumerate() {
            let excludes: Vec<glob::Pattern> =
                source.exclude.iter().filter_map(|p| glob::Pattern::new(p).ok()).collect();
            for pattern in &source.include {
                let Ok(paths) = glob::glob(pattern) else {
                    continue;
                };
                for path in paths.flatten() {
                    if excludes.iter().any(|ex| ex.matches_path(&path)) {
                        continue;
                    }
                    matched.entry(path).or_insert(index);
                }
            }
        }
        let mut now_by_path = HashMap::new();
        for (path, index) in matched {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let key = FileKey { dev: meta.dev(), ino: meta.ino() };
            now_by_path.insert(path.clone(), key);
            if let Some(tracked) = self.tracked.get_mut(&key) {
                tracked.missing_since = None;
                if tracked.path != path {
                    tracked.path = path.clone();
                    self.checkpoints.set_path(key, &path.to_string_lossy());
                }
                continue;
            }
            let replaced = self.by_path.get(&path).is_some_and(|old| *old != key);
            match self.start_tracking(key, &path, meta.len(), index, replaced) {
                Ok(tracked) => {
                    tracing::info!(path = %path.display(), epoch = tracked.epoch, offset = tracked.read_offset, "tailing file");
                    self.tracked.insert(key, tracked);
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot open file")
                }
            }
        }
        let now = Instant::now();
        for (key, tracked) in &mut self.tracked {
            if now_by_path.get(&tracked.path) != Some(key) && tracked.missing_since.is_none() {
                tracing::info!(path = %tracked.path.display(), "file renamed away or deleted; draining");
                tracked.missing_since = Some(now);
            }
        }
        self.by_path = now_by_path;
        self.fresh_start = false;
        self.stats.files_tracked.store(self.tracked.len() as u64, Ordering::Relaxed);
    }

    fn start_tracking(
        &mut self,
        key: FileKey,
        path: &std::path::Path,
        len: u64,
        source_index: usize,
        replaced: bool,
    ) -> std::io::Result<Tracked> {
        let file = File::open(path)?;
        let settings = self.config.sources[source_index].clone();
        let path_text = path.to_string_lossy().into_owned();
        if let Some(checkpoint) = self.checkpoints.get(key) {
            if len >= checkpoint.acked_offset {
                self.checkpoints.unrelease(key);
                return Ok(Tracked::resume(path.to_owned(), file, settings, checkpoint));
            }
            tracing::warn!(path = %path_text, "file shrank while the agent was stopped; starting a new epoch");
        }
        let start =
            if self.fresh_start && !replaced && settings.read_from == ReadFrom::End { len } else { 0 };
        let epoch = self.checkpoints.next_epoch(&path_text);
        self.checkpoints.register(key, new_checkpoint(&path_text, &path_text, epoch, start, &settings));
        // The epoch must be durable before any record of it leaves: after a
        // crash the same file must get the same stream key, or its resent
        // lines would not be recognised.
        if let Err(err) = self.checkpoints.persist() {
            // Unsaved, the epoch must not be used: the next scan starts over.
            self.checkpoints.forget(key);
            return Err(std::io::Error::other(err));
        }
        Ok(Tracked::new(path_text, path.to_owned(), file, settings, epoch, start))
    }

    /// After the first scan: files with checkpoints that no pattern matches
    /// any more were rotated away (or deleted) while the agent was stopped.
    /// One still in its directory under another name (`app.log.1`) is
    /// drained from its acked offset; one that is gone is forgotten.
    fn recover_unmatched(&mut self) {
        for (key, checkpoint) in self.checkpoints.all() {
            if self.tracked.contains_key(&key) {
                continue;
            }
            let saved = PathBuf::from(&checkpoint.path);
            let found = saved.parent().and_then(|dir| find_inode(dir, key));
            let Some((path, len)) = found else {
                tracing::info!(path = %checkpoint.path, "file gone while the agent was stopped; forgetting it");
                self.checkpoints.forget(key);
                continue;
            };
            let opened = File::open(&path);
            let (Ok(file), true) = (opened, len >= checkpoint.acked_offset) else {
                self.checkpoints.forget(key);
                continue;
            };
            let source = &checkpoint.source;
            let settings = self
                .config
                .sources
                .iter()
                .find(|s| s.include.iter().any(|p| glob::Pattern::new(p).is_ok_and(|p| p.matches(source))))
                .unwrap_or(&self.config.sources[0])
                .clone();
            tracing::info!(path = %path.display(), source = %checkpoint.source, offset = checkpoint.acked_offset, "draining a file rotated while the agent was stopped");
            self.checkpoints.set_path(key, &path.to_string_lossy());
            let mut tracked = Tracked::resume(path, file, settings, checkpoint);
            tracked.missing_since = Some(Instant::now());
            self.tracked.insert(key, tracked);
        }
    }

    /// Reads every tracked file; `Err` when the shipper is gone.
    fn read_all(&mut self) -> Result<(), Stopped> {
        let keys: Vec<FileKey> = self.tracked.keys().copied().collect();
        for key in keys {
            let mut tracked = self.tracked.remove(&key).expect("key listed above");
            let outcome = self.read_file(key, &mut tracked);
            // Released once gone, read to its end and quiet for the grace
            // period: a writer still holding the old file keeps it alive.
            let release = outcome.is_ok()
                && tracked.pending.is_none()
                && tracked.read_offset >= tracked.size_seen
                && tracked.grew_at.elapsed() >= DRAIN_GRACE
                && tracked.missing_since.is_some_and(|since| since.elapsed() >= DRAIN_GRACE);
            if release {
                tracing::info!(path = %tracked.path.display(), "released drained file");
                self.checkpoints.release(key, tracked.record_end);
            } else {
                self.tracked.insert(key, tracked);
            }
            match outcome {
                Err(ReadError::Stopped) => return Err(Stopped),
                Err(ReadError::Io(err)) => {
                    tracing::warn!(path = %self.tracked.get(&key).map(|t| t.path.display().to_string()).unwrap_or_default(), error = %err, "read failed")
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Reads everything complete that is new in one file.
    fn read_file(&mut self, key: FileKey, tracked: &mut Tracked) -> Result<(), ReadError> {
        let len = tracked.file.metadata()?.len();
        // A file that shrank, or whose first bytes changed, was truncated
        // (copytruncate) or replaced in place: it is a new file to us, even
        // when it has already grown past the old offset again.
        let changed = len != tracked.size_seen || !tracked.verified;
        let (fingerprint_len, fingerprint) = tracked.fingerprint.clone();
        let rewritten = len < tracked.read_offset
            || (changed
                && fingerprint_len > 0
                && (len < fingerprint_len || fingerprint_of(&tracked.file, fingerprint_len)? != fingerprint));
        tracked.verified = true;
        if rewritten {
            tracing::warn!(path = %tracked.path.display(), "file was truncated or rewritten; starting a new epoch");
            tracked.epoch = self.checkpoints.next_epoch(&tracked.source);
            tracked.read_offset = 0;
            tracked.next_seq = 0;
            tracked.in_long_line = false;
            tracked.prev_hash = [0; 32];
            tracked.cuts.clear();
            tracked.partial_since = None;
            tracked.fingerprint = (0, String::new());
            tracked.record_end = 0;
            tracked.record_end_in_long_line = false;
            tracked.pending = None;
            self.checkpoints.register(
                key,
                new_checkpoint(
                    &tracked.source,
                    &tracked.path.to_string_lossy(),
                    tracked.epoch,
                    0,
                    &tracked.settings,
                ),
            );
            tracked.epoch_unsaved = true;
        } else if tracked.splitting_changed {
            // Lines after the acked offset would be split differently than
            // the unacked batches already sent: number them in a new epoch,
            // so nothing can be mistaken for a resend (at worst a line the
            // collector already has is stored twice; none is lost).
            tracing::info!(path = %tracked.path.display(), "line-splitting settings changed; the unacked rest starts a new epoch");
            tracked.epoch = self.checkpoints.next_epoch(&tracked.source);
            tracked.next_seq = 0;
            tracked.prev_hash = [0; 32];
            tracked.cuts.clear();
            tracked.pending = None;
            let mut checkpoint = new_checkpoint(
                &tracked.source,
                &tracked.path.to_string_lossy(),
                tracked.epoch,
                tracked.read_offset,
                &tracked.settings,
            );
            checkpoint.in_long_line = tracked.in_long_line;
            (checkpoint.fingerprint_len, checkpoint.fingerprint) = tracked.fingerprint.clone();
            self.checkpoints.register(key, checkpoint);
            tracked.epoch_unsaved = true;
        }
        tracked.splitting_changed = false;
        if tracked.epoch_unsaved {
            // Nothing of a new epoch is read before the epoch is on disk.
            self.checkpoints.persist().map_err(std::io::Error::other)?;
            tracked.epoch_unsaved = false;
        }
        tracked.cuts.retain(|&cut| cut > tracked.read_offset);
        if tracked.fingerprint.0 < FINGERPRINT_WINDOW && len > tracked.fingerprint.0 {
            let covered = len.min(FINGERPRINT_WINDOW);
            tracked.fingerprint = (covered, fingerprint_of(&tracked.file, covered)?);
            self.checkpoints.set_fingerprint(key, covered, &tracked.fingerprint.1);
        }
        if len != tracked.size_seen {
            tracked.size_seen = len;
            tracked.grew_at = Instant::now();
        }
        let max_line = tracked.settings.max_line_bytes;
        let mut buf = vec![0u8; READ_CHUNK.max(max_line + 1)];
        let mut builder: Option<BatchBuilder> = None;
        loop {
            // Never read across a cut: the line before it ends there.
            let next_cut = tracked.cuts.iter().copied().filter(|&cut| cut > tracked.read_offset).min();
            let limit = next_cut.map_or(len, |cut| cut.min(len));
            let want = buf.len().min((limit - tracked.read_offset) as usize);
            if want == 0 {
                break;
            }
            let got = tracked.file.read_at(&mut buf[..want], tracked.read_offset)?;
            if got == 0 {
                break;
            }
            let now_ns = now_ns();
            let mut consumed = 0;
            while consumed < got {
                let rest = &buf[consumed..got];
                let Some(piece) = split_next(rest, &tracked.settings, tracked.in_long_line) else {
                    break;
                };
                consumed += piece.consumed;
                tracked.read_offset += piece.consumed as u64;
                if piece.discarded > 0 {
                    self.stats.bytes_discarded.fetch_add(piece.discarded as u64, Ordering::Relaxed);
                }
                let was_in_long_line = tracked.in_long_line;
                tracked.in_long_line = piece.cut;
                let Some(line) = piece.line else { continue };
                self.take_line(
                    key,
                    tracked,
                    &mut builder,
                    &rest[..line],
                    piece.cut,
                    was_in_long_line,
                    now_ns,
                )?;
            }
            let rest = got - consumed;
            if got == want && next_cut == Some(tracked.read_offset + rest as u64) {
                // An unterminated line was shipped up to here before a
                // restart: cut it at the same place again.
                tracked.read_offset += rest as u64;
                let was_in_long_line = std::mem::replace(&mut tracked.in_long_line, false);
                let discarding = was_in_long_line && tracked.settings.on_long_line == LongLine::Truncate;
                if rest > 0 && !discarding {
                    let line = strip_cr(&buf[consumed..got], tracked.settings.encoding);
                    self.take_line(key, tracked, &mut builder, line, false, was_in_long_line, now_ns)?;
                }
                // A record ended here before a restart: it ends here again.
                self.flush_pending(key, tracked, &mut builder, now_ns)?;
                continue;
            }
            if consumed == 0 {
                break; // an incomplete last line: wait for its newline
            }
        }
        self.flush_stale_tail(key, tracked, len, &mut buf, &mut builder)?;
        self.flush_quiet_record(key, tracked, &mut builder)?;
        if let Some(batch) = builder.take() {
            self.send(key, tracked, batch)?;
        }
        Ok(())
    }

    /// Ships an unterminated last line once the file has not grown for
    /// [`PARTIAL_LINE_TIMEOUT`]: a writer that ends its file without a
    /// newline loses no line. Bytes appended to that line later become a
    /// record of their own.
    fn flush_stale_tail(
        &mut self,
        key: FileKey,
        tracked: &mut Tracked,
        len: u64,
        buf: &mut [u8],
        builder: &mut Option<BatchBuilder>,
    ) -> Result<(), ReadError> {
        if tracked.read_offset >= len {
            tracked.partial_since = None;
            return Ok(());
        }
        match tracked.partial_since {
            Some((seen_len, since)) if seen_len == len && since.elapsed() >= PARTIAL_LINE_TIMEOUT => {}
            Some((seen_len, _)) if seen_len == len => return Ok(()),
            _ => {
                tracked.partial_since = Some((len, Instant::now()));
                return Ok(());
            }
        }
        tracked.partial_since = None;
        let tail = ((len - tracked.read_offset) as usize).min(buf.len());
        let got = tracked.file.read_at(&mut buf[..tail], tracked.read_offset)?;
        // Make the cut durable before the record leaves, so a restart
        // numbers the lines after it exactly as now.
        let cut = tracked.read_offset + got as u64;
        if !self.save_cut(key, tracked, cut) {
            return Ok(());
        }
        tracked.read_offset = cut;
        let was_in_long_line = std::mem::replace(&mut tracked.in_long_line, false);
        if was_in_long_line && tracked.settings.on_long_line == LongLine::Truncate {
            self.stats.bytes_discarded.fetch_add(got as u64, Ordering::Relaxed);
            return Ok(());
        }
        let line = strip_cr(&buf[..got], tracked.settings.encoding);
        self.take_line(key, tracked, builder, line, false, was_in_long_line, now_ns())?;
        self.flush_pending(key, tracked, builder, now_ns())
    }

    /// Ends a multi-line record that got no line for the multiline
    /// timeout, making the boundary durable first (like a line cut) so a
    /// restart groups the lines the same way.
    fn flush_quiet_record(
        &mut self,
        key: FileKey,
        tracked: &mut Tracked,
        builder: &mut Option<BatchBuilder>,
    ) -> Result<(), ReadError> {
        let (Some(multiline), Some(pending)) = (&tracked.multiline, &tracked.pending) else {
            return Ok(());
        };
        // Inside a long line the record cannot end yet: the rest of the
        // line comes, or the unterminated-line timeout ends it.
        if pending.updated.elapsed() < multiline.timeout || pending.end_in_long_line {
            return Ok(());
        }
        let boundary = pending.end;
        if !tracked.cuts.contains(&boundary) && !self.save_cut(key, tracked, boundary) {
            return Ok(());
        }
        self.flush_pending(key, tracked, builder, now_ns())
    }

    /// Makes a record boundary at `offset` durable before the record
    /// leaves, so a restart ends the record at the same place. `false` when
    /// it could not be saved: the record waits and nothing is sent.
    fn save_cut(&self, key: FileKey, tracked: &mut Tracked, offset: u64) -> bool {
        if !self.checkpoints.add_cut(key, offset) {
            return false;
        }
        if let Err(err) = self.checkpoints.persist() {
            self.checkpoints.remove_cut(key, offset);
            tracing::warn!(path = %tracked.path.display(), error = %err, "cannot save a record boundary; the record waits");
            return false;
        }
        tracked.cuts.push(offset);
        true
    }

    /// Ships the multi-line record being merged, if any.
    fn flush_pending(
        &mut self,
        key: FileKey,
        tracked: &mut Tracked,
        builder: &mut Option<BatchBuilder>,
        now_ns: i64,
    ) -> Result<(), ReadError> {
        let Some(pending) = tracked.pending.take() else { return Ok(()) };
        self.push_record(
            key,
            tracked,
            builder,
            &pending.text,
            pending.flags,
            (pending.end, pending.end_in_long_line),
            now_ns,
        )
    }

    /// Takes one line (or long-line piece): merged into a multi-line record
    /// when configured, else a record of its own.
    #[allow(clippy::too_many_arguments)]
    fn take_line(
        &mut self,
        key: FileKey,
        tracked: &mut Tracked,
        builder: &mut Option<BatchBuilder>,
        line: &[u8],
        cut: bool,
        was_in_long_line: bool,
        now_ns: i64,
    ) -> Result<(), ReadError> {
        let (text, valid) = decode(line, tracked.settings.encoding);
        let mut flags = 0;
        if !valid {
            self.stats.invalid_utf8_lines.fetch_add(1, Ordering::Relaxed);
            flags |= FLAG_INVALID_UTF8;
        }
        if cut {
            flags |= FLAG_TRUNCATED;
            let counter = match tracked.settings.on_long_line {
                LongLine::Split => &self.stats.lines_split,
                LongLine::Truncate => &self.stats.lines_truncated,
            };
            if !was_in_long_line {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        if was_in_long_line {
            flags |= FLAG_CONTINUED;
        }
        self.stats.bytes_read.fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
        let end = (tracked.read_offset, tracked.in_long_line);
        let Some(multiline) = &tracked.multiline else {
            return self.push_record(key, tracked, builder, &text, flags, end, now_ns);
        };
        let max_bytes = tracked.settings.max_line_bytes;
        let joins = tracked.pending.as_ref().is_some_and(|pending| {
            multiline.continues(&text)
                && pending.lines < multiline.max_lines
                && pending.text.len() + 1 + text.len() <= max_bytes
        });
        if joins {
            let pending = tracked.pending.as_mut().expect("checked above");
            pending.text.push('\n');
            pending.text.push_str(&text);
            pending.flags |= flags;
            pending.lines += 1;
            (pending.end, pending.end_in_long_line) = end;
            pending.updated = Instant::now();
            return Ok(());
        }
        self.flush_pending(key, tracked, builder, now_ns)?;
        tracked.pending = Some(PendingRecord {
            text: text.into_owned(),
            flags,
            lines: 1,
            end: end.0,
            end_in_long_line: end.1,
            updated: Instant::now(),
        });
        Ok(())
    }

    /// Adds one record, ending at `end` (offset, long-line state), to the
    /// open batch, sending the batch first when the record would overfill it.
    #[allow(clippy::too_many_arguments)]
    fn push_record(
        &mut self,
        key: FileKey,
        tracked: &mut Tracked,
        builder: &mut Option<BatchBuilder>,
        message: &str,
        flags: u8,
        end: (u64, bool),
        now_ns: i64,
    ) -> Result<(), ReadError> {
        // The fields a parser adds can be as long again as the line.
        let full = builder.as_ref().is_some_and(|batch| {
            !batch.is_empty() && batch.body_bytes() + 2 * message.len() + 64 > self.config.batch.max_bytes
        });
        if full {
            let batch = builder.take().expect("checked above");
            self.send(key, tracked, batch)?;
        }
        let (message, redacted) = tracked.redactor.apply(message);
        if redacted {
            self.stats.lines_redacted.fetch_add(1, Ordering::Relaxed);
        }
        let mut parsed = tracked.parser.parse(&message);
        let (message, capped) = cap_record(message, &mut parsed.fields);
        let flags = if capped { flags | FLAG_TRUNCATED } else { flags };
        let timestamp_ns = parsed.timestamp_ns.unwrap_or(now_ns);
        let level = parsed.level.unwrap_or(Level::Unknown);
        let batch = builder.get_or_insert_with(|| {
            BatchBuilder::new(
                &self.agent_id,
                &tracked.source,
                tracked.epoch,
                tracked.next_seq,
                tracked.prev_hash,
            )
        });
        batch.push_parts(timestamp_ns, level, flags, &message, &parsed.fields);
        tracked.next_seq += 1;
        (tracked.record_end, tracked.record_end_in_long_line) = end;
        self.stats.lines_read.fetch_add(1, Ordering::Relaxed);
        if batch.len() >= self.config.batch.max_records || batch.body_bytes() >= self.config.batch.max_bytes {
            let full = builder.take().expect("just pushed");
            self.send(key, tracked, full)?;
        }
        Ok(())
    }

    fn send(&mut self, key: FileKey, tracked: &mut Tracked, batch: BatchBuilder) -> Result<(), ReadError> {
        let records = batch.len();
        let bytes = self.signer.sign(batch);
        let hash = encoded_batch_hash(&bytes).expect("a batch we built decodes");
        tracked.prev_hash = hash;
        let signed = SignedBatch {
            bytes,
            hash,
            file: key,
            ack: Acked {
                epoch: tracked.epoch,
                offset: tracked.record_end,
                seq: tracked.next_seq,
                in_long_line: tracked.record_end_in_long_line,
                batch_hash: hash,
            },
            records,
            spool_position: None,
            cursor: None,
        };
        self.tx.blocking_send(signed).map_err(|_| ReadError::Stopped)
    }
}

/// What decides where records begin and end: `max_line_bytes`,
/// `on_long_line`, `encoding` and the multiline patterns and cap. Sequence
/// numbers are only stable while these stay the same.
fn splitting_key(settings: &SourceConfig) -> String {
    let multiline = settings.multiline.as_ref().map(|m| (&m.start, &m.continuation, m.max_lines));
    let text = format!(
        "{}|{:?}|{:?}|{:?}",
        settings.max_line_bytes, settings.on_long_line, settings.encoding, multiline
    );
    hex(&ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref()[..8])
}

fn new_checkpoint(
    source: &str,
    path: &str,
    epoch: u64,
    offset: u64,
    settings: &SourceConfig,
) -> FileCheckpoint {
    FileCheckpoint {
        splitting: splitting_key(settings),
        source: source.to_owned(),
        path: path.to_owned(),
        epoch,
        acked_offset: offset,
        acked_seq: 0,
        in_long_line: false,
        prev_hash: hex(&[0; 32]),
        cuts: Vec::new(),
        fingerprint_len: 0,
        fingerprint: String::new(),
    }
}

/// SHA-256 (first 16 bytes, hex) of a file's first `len` bytes.
fn fingerprint_of(file: &File, len: u64) -> std::io::Result<String> {
    let mut head = vec![0u8; len as usize];
    file.read_exact_at(&mut head, 0)?;
    Ok(hex(&ring::digest::digest(&ring::digest::SHA256, &head).as_ref()[..16]))
}

/// The file in `dir` with this device and inode, and its length.
fn find_inode(dir: &std::path::Path, key: FileKey) -> Option<(PathBuf, u64)> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let meta = entry.metadata().ok()?;
        (meta.is_file() && meta.dev() == key.dev && meta.ino() == key.ino).then(|| (entry.path(), meta.len()))
    })
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

struct Stopped;

enum ReadError {
    Stopped,
    Io(std::io::Error),
}

impl From<std::io::Error> for ReadError {
    fn from(err: std::io::Error) -> Self {
        ReadError::Io(err)
    }
}

/// Keeps a record within what the collector accepts (see
/// [`logvault_storage::Limits`]): invalid UTF-8 replaced by three-byte
/// characters or a redaction can make a line longer than `max_line_bytes`,
/// and a batch the collector refuses would stop shipping. Returns whether
/// anything was cut.
pub(crate) fn cap_record<'a>(
    message: std::borrow::Cow<'a, str>,
    fields: &mut Vec<(String, String)>,
) -> (std::borrow::Cow<'a, str>, bool) {
    let limits = logvault_storage::Limits::default();
    let mut capped = false;
    let max_fields = usize::from(limits.max_fields);
    if fields.len() > max_fields {
        fields.truncate(max_fields);
        capped = true;
    }
    for (_, value) in fields.iter_mut() {
        if value.len() > limits.max_field_value_bytes as usize {
            value.truncate(floor_char_boundary(value, limits.max_field_value_bytes as usize));
            capped = true;
        }
    }
    let max_message = limits.max_message_bytes as usize;
    if message.len() > max_message {
        let end = floor_char_boundary(&message, max_message);
        return (std::borrow::Cow::Owned(message[..end].to_owned()), true);
    }
    (message, capped)
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// Text of a line in `encoding`, with a leading byte-order mark dropped,
/// and whether it was valid.
fn decode(line: &[u8], encoding: Encoding) -> (std::borrow::Cow<'_, str>, bool) {
    let (text, valid) = match encoding {
        Encoding::Utf8 => match std::str::from_utf8(line) {
            Ok(text) => (std::borrow::Cow::Borrowed(text), true),
            Err(_) => (String::from_utf8_lossy(line), false),
        },
        Encoding::Utf16Le | Encoding::Utf16Be => {
            let unit = |pair: &[u8]| match encoding {
                Encoding::Utf16Le => u16::from_le_bytes([pair[0], pair[1]]),
                _ => u16::from_be_bytes([pair[0], pair[1]]),
            };
            let mut valid = line.len().is_multiple_of(2);
            let text: String = char::decode_utf16(line.chunks_exact(2).map(unit))
                .map(|c| {
                    c.unwrap_or_else(|_| {
                        valid = false;
                        char::REPLACEMENT_CHARACTER
                    })
                })
                .collect();
            (std::borrow::Cow::Owned(text), valid)
        }
    };
    match text {
        std::borrow::Cow::Borrowed(t) => {
            (std::borrow::Cow::Borrowed(t.strip_prefix('\u{feff}').unwrap_or(t)), valid)
        }
        std::borrow::Cow::Owned(t) if t.starts_with('\u{feff}') => {
            (std::borrow::Cow::Owned(t.trim_start_matches('\u{feff}').to_owned()), valid)
        }
        owned => (owned, valid),
    }
}

/// A line without its trailing carriage return.
fn strip_cr(line: &[u8], encoding: Encoding) -> &[u8] {
    let cr: &[u8] = match encoding {
        Encoding::Utf8 => b"\r",
        Encoding::Utf16Le => b"\r\0",
        Encoding::Utf16Be => b"\0\r",
    };
    line.strip_suffix(cr).unwrap_or(line)
}

/// The next piece of `input` for a source's encoding and long-line rule.
fn split_next(input: &[u8], settings: &SourceConfig, in_long_line: bool) -> Option<Piece> {
    match settings.encoding {
        Encoding::Utf8 => next_piece(input, settings.max_line_bytes, in_long_line, settings.on_long_line),
        Encoding::Utf16Le | Encoding::Utf16Be => next_piece_utf16(
            input,
            settings.max_line_bytes,
            in_long_line,
            settings.on_long_line,
            settings.encoding == Encoding::Utf16Be,
        ),
    }
}

/// [`next_piece`] for UTF-16: newlines are the code unit U+000A at an even
/// offset, and cuts never split a code unit or a surrogate pair.
fn next_piece_utf16(
    input: &[u8],
    max_line: usize,
    in_long_line: bool,
    mode: LongLine,
    big_endian: bool,
) -> Option<Piece> {
    let unit_at = |i: usize| {
        let pair = [input[i], input[i + 1]];
        if big_endian { u16::from_be_bytes(pair) } else { u16::from_le_bytes(pair) }
    };
    let newline_in =
        |limit: usize| (0..limit.min(input.len()) / 2).map(|u| u * 2).find(|&i| unit_at(i) == 0x0A);
    if in_long_line && mode == LongLine::Truncate {
        return Some(match newline_in(input.len()) {
            Some(at) => Piece { consumed: at + 2, line: None, cut: false, discarded: at },
            None => {
                let whole = input.len() & !1;
                if whole == 0 {
                    return None;
                }
                Piece { consumed: whole, line: None, cut: true, discarded: whole }
            }
        });
    }
    let max_line = (max_line & !1).max(2);
    if let Some(at) = newline_in(max_line + 2) {
        let mut line = at;
        if line >= 2 && unit_at(line - 2) == 0x0D {
            line -= 2;
        }
        return Some(Piece { consumed: at + 2, line: Some(line), cut: false, discarded: 0 });
    }
    if input.len() <= max_line + 1 {
        return None;
    }
    let mut cut = max_line;
    if (0xD800..=0xDBFF).contains(&unit_at(cut - 2)) && cut > 2 {
        cut -= 2; // keep a surrogate pair together
    }
    Some(Piece { consumed: cut, line: Some(cut), cut: true, discarded: 0 })
}

/// One step of line splitting.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Bytes of the input this step uses up.
    pub(crate) consumed: usize,
    /// Length of the record's text at the start of the input, if a record
    /// is produced (without `\n` or `\r\n`).
    pub(crate) line: Option<usize>,
    /// The record is a piece of a longer line, cut at the cap.
    pub(crate) cut: bool,
    /// Bytes thrown away (truncate mode).
    pub(crate) discarded: usize,
}

/// Takes the next record off `input`: a complete line, a piece of a long
/// line, or (truncating) the skipped rest of a long line. `None` when the
/// input holds only an incomplete line shorter than the cap.
pub(crate) fn next_piece(input: &[u8], max_line: usize, in_long_line: bool, mode: LongLine) -> Option<Piece> {
    if in_long_line && mode == LongLine::Truncate {
        return Some(match input.iter().position(|&b| b == b'\n') {
            Some(newline) => Piece { consumed: newline + 1, line: None, cut: false, discarded: newline },
            None => Piece { consumed: input.len(), line: None, cut: true, discarded: input.len() },
        });
    }
    let window = &input[..input.len().min(max_line + 1)];
    if let Some(newline) = window.iter().position(|&b| b == b'\n') {
        let mut line = newline;
        if line > 0 && input[line - 1] == b'\r' {
            line -= 1;
        }
        return Some(Piece { consumed: newline + 1, line: Some(line), cut: false, discarded: 0 });
    }
    if input.len() <= max_line {
        return None;
    }
    // Cut at the cap, stepping back to a UTF-8 character boundary so a
    // character is not torn across two records.
    let mut cut = max_line;
    let mut back = 0;
    while back < 3 && cut > 1 && (input[cut] & 0b1100_0000) == 0b1000_0000 {
        cut -= 1;
        back += 1;
    }
    if (input[cut] & 0b1100_0000) == 0b1000_0000 {
        cut = max_line; // not UTF-8 anyway
    }
    Some(Piece { consumed: cut, line: Some(cut), cut: true, discarded: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(input: &[u8], max: usize, mode: LongLine) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut in_long = false;
        while let Some(piece) = next_piece(&input[pos..], max, in_long, mode) {
            if let Some(line) = piece.line {
                out.push((String::from_utf8_lossy(&input[pos..pos + line]).into_owned(), piece.cut));
            }
            in_long = piece.cut;
            pos += piece.consumed;
            if pos == input.len() {
                break;
            }
        }
        out
    }

    fn utf16(text: &str, big_endian: bool) -> Vec<u8> {
        text.encode_utf16().flat_map(|u| if big_endian { u.to_be_bytes() } else { u.to_le_bytes() }).collect()
    }

    #[test]
    fn utf16_lines_split_and_decode_in_both_byte_orders() {
        for big_endian in [false, true] {
            let encoding = if big_endian { Encoding::Utf16Be } else { Encoding::Utf16Le };
            let input = utf16("\u{feff}first é\r\nsecond 😀 line\nthird", big_endian);
            let split = |input: &[u8], max: usize| {
                let mut pos = 0;
                let mut lines = Vec::new();
                while let Some(piece) =
                    next_piece_utf16(&input[pos..], max, false, LongLine::Split, big_endian)
                {
                    let line = &input[pos..pos + piece.line.unwrap()];
                    lines.push((decode(strip_cr(line, encoding), encoding).0.into_owned(), piece.cut));
                    pos += piece.consumed;
                }
                (lines, pos)
            };
            let (lines, pos) = split(&input, 20);
            assert_eq!(
                lines,
                vec![
                    ("first é".to_owned(), false),
                    ("second 😀 ".to_owned(), true),
                    ("line".to_owned(), false)
                ],
                "big endian: {big_endian}"
            );
            // A cut never separates the halves of a surrogate pair.
            let (pieces, _) = split(&utf16("second 😀 line\n", big_endian), 16);
            assert_eq!(pieces[0], ("second ".to_owned(), true));
            assert_eq!(pieces[1].0, "😀 line");
            // The unterminated "third" waits for its newline.
            assert_eq!(&input[pos..], &utf16("third", big_endian)[..]);
        }
    }

    proptest::proptest! {
        /// Split mode loses nothing: the pieces of any text decode back to
        /// its lines, whatever the cap and byte order.
        #[test]
        fn utf16_split_is_lossless(lines in proptest::collection::vec("[^\n\r]{0,30}", 1..6), max in 4usize..40, big_endian: bool) {
            let encoding = if big_endian { Encoding::Utf16Be } else { Encoding::Utf16Le };
            let input = utf16(&lines.iter().map(|l| format!("{l}\n")).collect::<String>(), big_endian);
            let mut pos = 0;
            let mut rebuilt = String::new();
            while let Some(piece) = next_piece_utf16(&input[pos..], max, false, LongLine::Split, big_endian) {
                rebuilt.push_str(&decode(&input[pos..pos + piece.line.unwrap()], encoding).0);
                if !piece.cut {
                    rebuilt.push('\n');
                }
                pos += piece.consumed;
            }
            let expected: String = lines.iter().map(|l| format!("{}\n", l.trim_start_matches('\u{feff}'))).collect();
            proptest::prop_assert_eq!(pos, input.len());
            proptest::prop_assert_eq!(rebuilt.replace('\u{feff}', ""), expected.replace('\u{feff}', ""));
        }

        #[test]
        fn utf16_split_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), max in 0usize..20, long: bool) {
            for mode in [LongLine::Split, LongLine::Truncate] {
                let _ = next_piece_utf16(&bytes, max, long, mode, false);
                let _ = next_piece_utf16(&bytes, max, long, mode, true);
            }
        }
    }

    #[test]
    fn complete_lines_only_and_crlf_is_stripped() {
        assert_eq!(
            pieces(b"one\r\ntwo\nthree", 100, LongLine::Split),
            vec![("one".to_owned(), false), ("two".to_owned(), false)]
        );
    }

    #[test]
    fn a_long_line_is_split_losslessly() {
        let got = pieces(b"abcdefghij\nxy\n", 4, LongLine::Split);
        let texts: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, ["abcd", "efgh", "ij", "xy"]);
        assert_eq!(got.iter().filter(|(_, cut)| *cut).count(), 2);
    }

    #[test]
    fn a_line_of_exactly_the_cap_is_whole() {
        assert_eq!(pieces(b"abcd\n", 4, LongLine::Split), vec![("abcd".to_owned(), false)]);
    }

    #[test]
    fn a_long_line_is_truncated_and_the_rest_skipped() {
        let got = pieces(b"abcdefghij\nxy\n", 4, LongLine::Truncate);
        assert_eq!(got, vec![("abcd".to_owned(), true), ("xy".to_owned(), false)]);
    }

    #[test]
    fn splitting_never_tears_a_character() {
        let line = "aé€😀b".repeat(5) + "\n";
        for max in 4..12 {
            let got = pieces(line.as_bytes(), max, LongLine::Split);
            let joined: String = got.iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(joined, line.trim_end(), "max {max}");
        }
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;
    use crate::config::{BatchConfig, CollectorConfig};
    use logvault_storage::{Batch, Limits};

    fn config(dir: &std::path::Path) -> Arc<AgentConfig> {
        Arc::new(AgentConfig {
            state_dir: dir.join("state"),
            collector: CollectorConfig {
                address: "127.0.0.1:1".into(),
                failover: Vec::new(),
                server_name: None,
                ca: "ca".into(),
                cert: "cert".into(),
                key: "key".into(),
                max_in_flight: 4,
                max_backoff_ms: 100,
            },
            sources: vec![SourceConfig {
                max_line_bytes: 1024,
                ..SourceConfig::files(vec![dir.join("*.log").to_string_lossy().into_owned()])
            }],
            batch: BatchConfig::default(),
            poll_interval_ms: 10,
            metrics_listen: None,
            spool: None,
        })
    }

    fn start(dir: &std::path::Path) -> (Tailer, mpsc::Receiver<SignedBatch>) {
        start_with(dir, |_| {})
    }

    fn start_with(
        dir: &std::path::Path,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> (Tailer, mpsc::Receiver<SignedBatch>) {
        let (tx, rx) = mpsc::channel(64);
        let key = Arc::new(Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap());
        let checkpoints = Checkpoints::load(&dir.join("state")).unwrap();
        let mut config = (*config(dir)).clone();
        adjust(&mut config);
        let tailer =
            Tailer::new(Arc::new(config), "t".into(), key, checkpoints, tx, Arc::new(Stats::default()));
        (tailer, rx)
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("logvault-tail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Regression: a batch sent because the next record would overfill it
    /// must be acked up to its own last record, not past the record that
    /// did not fit (that record would be skipped after a restart).
    #[test]
    fn a_full_batch_is_acked_up_to_its_last_record_only() {
        let dir = temp("full");
        let line = "x".repeat(299);
        std::fs::write(dir.join("a.log"), format!("{line}\n").repeat(10)).unwrap();
        let (mut tailer, mut rx) = start_with(&dir, |c| c.batch.max_bytes = 1024);
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        let mut records = 0u64;
        let mut batches = 0;
        while let Ok(batch) = rx.try_recv() {
            records += u64::from(batch.records);
            batches += 1;
            assert_eq!(batch.ack.offset, records * 300, "batch {batches}");
            assert_eq!(batch.ack.seq, records);
        }
        assert_eq!(records, 10);
        assert!(batches >= 3, "{batches} batches: the size limit was not exercised");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn epochs(rx: &mut mpsc::Receiver<SignedBatch>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            let header = logvault_storage::batch::peek_header(&batch.bytes).unwrap();
            out.push((header.epoch, header.first_seq));
        }
        out
    }

    /// Regression: a restart with another `max_line_bytes` would split the
    /// unacked lines differently under the same sequence numbers; it starts
    /// a new epoch instead, and the same settings keep the epoch.
    #[test]
    fn changed_splitting_settings_start_a_new_epoch_at_the_acked_offset() {
        let dir = temp("splitting");
        std::fs::write(dir.join("a.log"), format!("{}\n", "x".repeat(40)).repeat(3)).unwrap();
        let (mut tailer, mut rx) = start(&dir);
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        let first = epochs(&mut rx);
        drop(tailer);

        let (mut tailer, mut rx) = start(&dir);
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        assert_eq!(epochs(&mut rx), first, "same settings, same stream");
        drop(tailer);

        let (mut tailer, mut rx) = start_with(&dir, |c| c.sources[0].max_line_bytes = 16);
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        let after = epochs(&mut rx);
        assert_ne!(after[0].0, first[0].0, "a new epoch");
        assert_eq!(after[0].1, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn multiline(start: &str) -> impl FnOnce(&mut AgentConfig) + use<'_> {
        move |c: &mut AgentConfig| {
            c.sources[0].multiline = Some(crate::config::MultilineConfig {
                start: Some(start.to_owned()),
                continuation: None,
                timeout_ms: 200,
                max_lines: 3,
            });
        }
    }

    #[test]
    fn stack_traces_become_one_record_and_regroup_the_same_after_a_restart() {
        let dir = temp("multiline");
        let log = dir.join("app.log");
        std::fs::write(&log, "2024 ERROR boom\n\tat a\n\tat b\n2024 INFO next\n2024 ERROR again\n\tat c\n")
            .unwrap();
        let (mut tailer, mut rx) = start_with(&dir, multiline(r"^\d{4} "));
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        // The last record waits: more of it may come.
        assert_eq!(
            records(&mut rx),
            vec![(0, "2024 ERROR boom\n\tat a\n\tat b".into()), (1, "2024 INFO next".into())]
        );
        std::thread::sleep(Duration::from_millis(250));
        assert!(tailer.read_all().is_ok());
        assert_eq!(records(&mut rx), vec![(2, "2024 ERROR again\n\tat c".into())]);
        drop(tailer); // a crash: nothing acked

        // Late continuation lines after the timeout are a record of their
        // own, before and after a restart alike; max_lines caps a record.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"\tat late\n2024 WARN long\n\t1\n\t2\n\t3\n2024 INFO end\n")
            .unwrap();
        let (mut tailer, mut rx) = start_with(&dir, multiline(r"^\d{4} "));
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        let got = records(&mut rx);
        assert_eq!(
            got,
            vec![
                (0, "2024 ERROR boom\n\tat a\n\tat b".into()),
                (1, "2024 INFO next".into()),
                (2, "2024 ERROR again\n\tat c".into()),
                (3, "\tat late".into()),
                (4, "2024 WARN long\n\t1\n\t2".into()),
                (5, "\t3".into()),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn records(rx: &mut mpsc::Receiver<SignedBatch>) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            let decoded = Batch::decode(&batch.bytes, &Limits::default()).unwrap();
            for (i, record) in decoded.records.into_iter().enumerate() {
                out.push((decoded.header.first_seq + i as u64, record.message));
            }
        }
        out
    }

    /// Regression: an unterminated last line shipped on the timeout, then
    /// completed by the writer while the agent restarts, must not renumber
    /// the lines after it (the collector would drop the rest of the line as
    /// a duplicate of the head).
    #[test]
    fn a_shipped_partial_line_is_cut_at_the_same_place_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("logvault-tail-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("a.log");
        std::fs::write(&log, "first\nhalf").unwrap();

        let (mut tailer, mut rx) = start(&dir);
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        assert_eq!(records(&mut rx), vec![(0, "first".to_owned())]);
        std::thread::sleep(PARTIAL_LINE_TIMEOUT + Duration::from_millis(100));
        assert!(tailer.read_all().is_ok());
        assert_eq!(records(&mut rx), vec![(1, "half".to_owned())]);
        drop(tailer); // a crash: nothing was acked

        std::fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(b" more\nnext\n").unwrap();
        let (mut tailer, mut rx) = start(&dir);
        tailer.scan();
        assert!(tailer.read_all().is_ok());
        let got = records(&mut rx);
        assert_eq!(
            got,
            vec![(0, "first".into()), (1, "half".into()), (2, " more".into()), (3, "next".into())]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
mod cap_tests {
    use super::*;

    /// Regression: a line of invalid bytes grows threefold when replaced,
    /// past what the collector accepts; it must be cut, not refused forever.
    #[test]
    fn records_are_capped_to_what_the_collector_accepts() {
        let limits = logvault_storage::Limits::default();
        let bytes = vec![0xFFu8; limits.max_message_bytes as usize / 2];
        let message = String::from_utf8_lossy(&bytes);
        assert!(message.len() > limits.max_message_bytes as usize);
        let mut fields = vec![("v".to_owned(), "é".repeat(40_000)); 300];
        let (message, capped) = cap_record(message, &mut fields);
        assert!(capped);
        assert!(message.len() <= limits.max_message_bytes as usize);
        assert_eq!(fields.len(), limits.max_fields as usize);
        assert!(fields.iter().all(|(_, v)| v.len() <= limits.max_field_value_bytes as usize));
        let (short, capped) = cap_record(std::borrow::Cow::Borrowed("fine"), &mut Vec::new());
        assert_eq!((short.as_ref(), capped), ("fine", false));
    }
}
