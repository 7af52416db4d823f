//! Acked positions, per file, persisted atomically.
//!
//! A file's entry moves forward only when the collector acks a batch: the
//! offset saved is always one whose every earlier byte is durable on the
//! collector. The file is JSON with a version, written to a temp file,
//! fsynced and renamed, so a crash leaves either the old or the new state.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Version of the checkpoint file this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;

/// A file's identity on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileKey {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// What is durable on the collector for one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheckpoint {
    /// The stream's source (the path the file was first found at).
    pub source: String,
    /// The path it was last seen at.
    pub path: String,
    /// The file's epoch within its source.
    pub epoch: u64,
    /// Every byte before this offset is acked.
    pub acked_offset: u64,
    /// Sequence number of the next record after `acked_offset`.
    pub acked_seq: u64,
    /// The acked offset lies inside a line whose head was already shipped.
    #[serde(default)]
    pub in_long_line: bool,
    /// Hash of the last acked batch (hex), the next batch's `prev_hash`.
    pub prev_hash: String,
    /// Offsets past `acked_offset` where an unterminated last line was
    /// shipped: re-reading after a restart cuts there again, so sequence
    /// numbers stay what they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cuts: Vec<u64>,
    /// Bytes at the file's start the fingerprint covers.
    #[serde(default)]
    pub fingerprint_len: u64,
    /// SHA-256 (16 bytes, hex) of those bytes: a file whose start differs
    /// is another file, whatever its inode.
    #[serde(default)]
    pub fingerprint: String,
    /// Hash of the line-splitting settings the epoch was numbered with.
    #[serde(default)]
    pub splitting: String,
}

/// What is durable on the collector of the systemd journal source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalCheckpoint {
    /// The stream's epoch.
    pub epoch: u64,
    /// Sequence number of the next record after `cursor`.
    pub acked_seq: u64,
    /// The journal cursor of the last acked record.
    pub cursor: Option<String>,
    /// Hash of the last acked batch (hex): the next batch's `prev_hash`,
    /// so the stream's chain continues across restarts.
    #[serde(default)]
    pub prev_hash: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    /// The last change log generation this snapshot includes.
    #[serde(default)]
    generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    journal: Option<JournalCheckpoint>,
    /// Highest epoch handed out per source, so a new file of a source never
    /// reuses an epoch.
    epochs: BTreeMap<String, u64>,
    files: Vec<(FileKey, FileCheckpoint)>,
}

/// Why checkpoints could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not parse, or is of another version.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Default)]
struct State {
    /// No checkpoint file existed at load: this agent has never run here.
    fresh: bool,
    epochs: BTreeMap<String, u64>,
    files: BTreeMap<FileKey, FileCheckpoint>,
    /// Files the tailer has let go; their entries go once fully acked.
    released: BTreeMap<FileKey, u64>,
    journal: Option<JournalCheckpoint>,
    /// Changes made, and how many of them are on disk.
    changes: u64,
    saved: u64,
}

/// One line of `checkpoints.log`: what changed in one save.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Delta {
    /// Generation; lines at or below the snapshot's are already in it.
    g: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    set: Vec<(FileKey, FileCheckpoint)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    del: Vec<FileKey>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    epochs: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    journal: Option<JournalCheckpoint>,
}

/// What is on disk, to diff the next save against.
#[derive(Debug, Default)]
struct OnDisk {
    files: BTreeMap<FileKey, FileCheckpoint>,
    epochs: BTreeMap<String, u64>,
    journal: Option<JournalCheckpoint>,
    generation: u64,
    log_bytes: u64,
    snapshot_bytes: u64,
}

/// The change log is folded into a new snapshot once it is larger than
/// the snapshot, and at least this large.
const MIN_LOG_BYTES: u64 = 256 * 1024;

/// The shared checkpoint state: the tailer registers files, the shipper
/// records acks, a writer persists it.
///
/// On disk: `checkpoints.json`, a snapshot, and `checkpoints.log`, one line
/// per save holding only what changed since the one before, so a save with
/// 100,000 files tracked writes a few hundred bytes, not megabytes.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    /// Held for a whole save, so saves never interleave and a caller's
    /// `persist` returns only once its own change is on disk. Holds what
    /// is on disk.
    saving: Arc<Mutex<OnDisk>>,
}

impl Checkpoints {
    /// Loads `state_dir/checkpoints.json`, or starts empty when missing.
    pub fn load(state_dir: &Path) -> Result<Checkpoints, CheckpointError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|source| CheckpointError::Io { path: state_dir.to_owned(), source })?;
        let path = state_dir.join("checkpoints.json");
        let mut state = State::default();
        let mut on_disk = OnDisk::default();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let corrupt = |message: String| CheckpointError::Corrupt { path: path.clone(), message };
                let file: CheckpointFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if file.version != CHECKPOINT_VERSION {
                    return Err(corrupt(format!(
                        "version {} is not the version {CHECKPOINT_VERSION} this agent reads",
                        file.version
                    )));
                }
                state.epochs = file.epochs;
                state.journal = file.journal;
                state.files = file.files.into_iter().collect();
                on_disk.generation = file.generation;
                on_disk.snapshot_bytes = bytes.len() as u64;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => state.fresh = true,
            Err(source) => return Err(CheckpointError::Io { path, source }),
        }
        let log = state_dir.join("checkpoints.log");
        match std::fs::read(&log) {
            Ok(bytes) => {
                on_disk.log_bytes = bytes.len() as u64;
                let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
                for (i, line) in lines.iter().enumerate() {
                    let delta: Delta = match serde_json::from_slice(line) {
                        Ok(delta) => delta,
                        // Only the last line can be torn (a crash mid-save,
                        // never confirmed to anyone).
                        Err(_) if i + 1 == lines.len() => break,
                        Err(err) => {
                            return Err(CheckpointError::Corrupt {
                                path: log,
                                message: format!("line {}: {err}", i + 1),
                            });
                        }
                    };
                    if delta.g <= on_disk.generation {
                        continue; // already in the snapshot
                    }
                    for (key, entry) in delta.set {
                        state.files.insert(key, entry);
                    }
                    for key in delta.del {
                        state.files.remove(&key);
                    }
                    state.epochs.extend(delta.epochs);
                    if delta.journal.is_some() {
                        state.journal = delta.journal;
                    }
                    on_disk.generation = delta.g;
                    state.fresh = false;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CheckpointError::Io { path: log, source }),
        }
        on_disk.files = state.files.clone();
        on_disk.epochs = state.epochs.clone();
        on_disk.journal = state.journal.clone();
        Ok(Checkpoints { path, state: Arc::new(Mutex::new(state)), saving: Arc::new(Mutex::new(on_disk)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// True when no checkpoint file existed at load: the agent's first run.
    pub fn is_fresh(&self) -> bool {
        self.lock().fresh
    }

    /// Forgets a file that no longer exists.
    pub fn forget(&self, key: FileKey) {
        let mut state = self.lock();
        if state.files.remove(&key).is_some() {
            state.changes += 1;
        }
        state.released.remove(&key);
    }

    /// Records the fingerprint of a file's first `len` bytes.
    pub fn set_fingerprint(&self, key: FileKey, len: u64, fingerprint: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.files.get_mut(&key) {
            entry.fingerprint_len = len;
            entry.fingerprint = fingerprint.to_owned();
            state.changes += 1;
        }
    }

    /// Records that an unterminated line ending at `offset` is about to be
    /// shipped. Persist before shipping it.
    pub fn add_cut(&self, key: FileKey, offset: u64) -> bool {
        let mut state = self.lock();
        let Some(entry) = state.files.get_mut(&key) else { return false };
        entry.cuts.push(offset);
        state.changes += 1;
        true
    }

    /// The acked state of a file, if known.
    pub fn get(&self, key: FileKey) -> Option<FileCheckpoint> {
        self.lock().files.get(&key).cloned()
    }

    /// Every known file.
    pub fn all(&self) -> Vec<(FileKey, FileCheckpoint)> {
        self.lock().files.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// A new epoch for `source`, never handed out before: the current time
    /// in microseconds, or one more than the last epoch if the clock is
    /// behind it. Being time-based, epochs stay unique even if the state
    /// directory is lost, so a fresh agent never reuses a stream key the
    /// collector already holds.
    pub fn next_epoch(&self, source: &str) -> u64 {
        let mut state = self.lock();
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let epoch = state.epochs.get(source).map_or(now_us, |e| (e + 1).max(now_us));
        state.epochs.insert(source.to_owned(), epoch);
        state.changes += 1;
        epoch
    }

    /// Starts tracking a file (or restarts it after a truncation).
    pub fn register(&self, key: FileKey, checkpoint: FileCheckpoint) {
        let mut state = self.lock();
        state.released.remove(&key);
        state.files.insert(key, checkpoint);
        state.changes += 1;
    }

    /// Updates the path a file was last seen at.
    pub fn set_path(&self, key: FileKey, path: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.files.get_mut(&key)
            && entry.path != path
        {
            entry.path = path.to_owned();
            state.changes += 1;
        }
    }

    /// Records an ack: everything of `key` up to `offset` (epoch `epoch`)
    /// is durable. An ack for an older epoch than the entry's is ignored.
    pub fn ack(&self, key: FileKey, ack: Acked) {
        let mut state = self.lock();
        let Some(entry) = state.files.get_mut(&key) else {
            return;
        };
        if entry.epoch != ack.epoch || ack.offset < entry.acked_offset {
            return;
        }
        entry.acked_offset = ack.offset;
        entry.acked_seq = ack.seq;
        entry.in_long_line = ack.in_long_line;
        entry.prev_hash = hex(&ack.batch_hash);
        entry.cuts.retain(|cut| *cut > ack.offset);
        state.changes += 1;
        if state.released.get(&key).is_some_and(|end| ack.offset >= *end) {
            state.released.remove(&key);
            state.files.remove(&key);
        }
    }

    /// The tailer let go of a file whose data ends at `end_offset`; its
    /// entry is removed once that much is acked.
    pub fn release(&self, key: FileKey, end_offset: u64) {
        let mut state = self.lock();
        let fully_acked = state.files.get(&key).is_none_or(|entry| entry.acked_offset >= end_offset);
        if fully_acked {
            state.files.remove(&key);
        } else {
            state.released.insert(key, end_offset);
        }
        state.changes += 1;
    }

    /// Writes the state if it changed since the last write. When it
    /// returns `Ok`, every change made before the call is on disk.
    pub fn persist(&self) -> Result<(), CheckpointError> {
        let mut on_disk = self.saving.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (files, epochs, journal, version) = {
            let state = self.lock();
            if state.changes == state.saved {
                return Ok(());
            }
            (state.files.clone(), state.epochs.clone(), state.journal.clone(), state.changes)
        };
        let generation = on_disk.generation + 1;
        let delta = Delta {
            g: generation,
            set: files
                .iter()
                .filter(|(k, v)| on_disk.files.get(k) != Some(v))
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            del: on_disk.files.keys().filter(|k| !files.contains_key(k)).copied().collect(),
            epochs: epochs
                .iter()
                .filter(|(k, v)| on_disk.epochs.get(*k) != Some(v))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            journal: if journal != on_disk.journal { journal.clone() } else { None },
        };
        let mut line = serde_json::to_vec(&delta).expect("checkpoints serialize");
        line.push(b'\n');
        let log = self.path.with_file_name("checkpoints.log");
        if on_disk.log_bytes + line.len() as u64 > on_disk.snapshot_bytes.max(MIN_LOG_BYTES) {
            // Fold the log into a new snapshot; the old log's lines are all
            // at or below its generation, so a crash before the log is
            // removed loses nothing.
            let file = CheckpointFile {
                version: CHECKPOINT_VERSION,
                generation,
                journal: journal.clone(),
                epochs: epochs.clone(),
                files: files.iter().map(|(k, v)| (*k, v.clone())).collect(),
            };
            let bytes = serde_json::to_vec(&file).expect("checkpoints serialize");
            write_atomically(&self.path, &bytes)?;
            match std::fs::remove_file(&log) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CheckpointError::Io { path: log, source }),
            }
            on_disk.snapshot_bytes = bytes.len() as u64;
            on_disk.log_bytes = 0;
        } else {
            let io_err = |source| CheckpointError::Io { path: log.clone(), source };
            let mut file =
                std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(io_err)?;
            file.write_all(&line).map_err(io_err)?;
            file.sync_data().map_err(io_err)?;
            if on_disk.log_bytes == 0 {
                let dir = self.path.parent().unwrap_or(Path::new("."));
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
            }
            on_disk.log_bytes += line.len() as u64;
        }
        on_disk.generation = generation;
        on_disk.files = files;
        on_disk.epochs = epochs;
        on_disk.journal = journal;
        let mut state = self.lock();
        state.saved = state.saved.max(version);
        Ok(())
    }

    /// The journal source's acked state.
    pub fn journal(&self) -> Option<JournalCheckpoint> {
        self.lock().journal.clone()
    }

    /// Sets the journal source's state (a new epoch, or an ack).
    pub fn set_journal(&self, journal: JournalCheckpoint) {
        let mut state = self.lock();
        let newer = state
            .journal
            .as_ref()
            .is_none_or(|old| old.epoch != journal.epoch || journal.acked_seq >= old.acked_seq);
        if newer {
            state.journal = Some(journal);
            state.changes += 1;
        }
    }

    /// Takes back a cut whose save failed, so it is not saved later while
    /// the line it would end ships whole.
    pub fn remove_cut(&self, key: FileKey, offset: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.files.get_mut(&key) {
            entry.cuts.retain(|cut| *cut != offset);
            state.changes += 1;
        }
    }

    /// A file comes back under a matched name after being let go: its
    /// entry must stay.
    pub fn unrelease(&self, key: FileKey) {
        self.lock().released.remove(&key);
    }
}

/// What an ack moves a file's checkpoint to.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// The epoch the acked batch belongs to.
    pub epoch: u64,
    /// Offset after the batch's last record.
    pub offset: u64,
    /// Sequence number after the batch's last record.
    pub seq: u64,
    /// Whether `offset` lies inside a line whose head was shipped.
    pub in_long_line: bool,
    /// The acked batch's hash.
    pub batch_hash: [u8; 32],
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io_err = |source| CheckpointError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io_err)?;
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
    }
    Ok(())
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses [`hex`] output back; `None` if it is not 32 bytes of hex.
pub fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With 100,000 files tracked, a save after a few acks writes only
    /// those entries; the log folds into the snapshot when it grows; and a
    /// reload sees the latest state either way.
    #[test]
    fn saves_stay_small_with_a_hundred_thousand_files() {
        let dir = std::env::temp_dir().join(format!("logvault-ckpt-100k-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Checkpoints::load(&dir).unwrap();
        let entry = |i: u64| FileCheckpoint {
            source: format!("/var/log/app/{i}.log"),
            path: format!("/var/log/app/{i}.log"),
            epoch: 1,
            acked_offset: 0,
            acked_seq: 0,
            in_long_line: false,
            prev_hash: hex(&[0; 32]),
            cuts: Vec::new(),
            fingerprint_len: 0,
            fingerprint: String::new(),
            splitting: String::new(),
        };
        for i in 0..100_000 {
            store.register(FileKey { dev: 1, ino: i }, entry(i));
        }
        store.persist().unwrap();
        let snapshot = std::fs::metadata(dir.join("checkpoints.json")).map_or(0, |m| m.len());
        let log = || std::fs::metadata(dir.join("checkpoints.log")).map_or(0, |m| m.len());
        assert!(snapshot > 10_000_000, "the first save is a snapshot ({snapshot} bytes)");
        for round in 1..=5u64 {
            for i in 0..10 {
                store.ack(
                    FileKey { dev: 1, ino: i },
                    Acked {
                        epoch: 1,
                        offset: round * 100,
                        seq: round,
                        in_long_line: false,
                        batch_hash: [round as u8; 32],
                    },
                );
            }
            let before = log();
            store.persist().unwrap();
            assert!(log() - before < 5_000, "a save of 10 acks wrote {} bytes", log() - before);
        }
        assert_eq!(
            std::fs::metadata(dir.join("checkpoints.json")).unwrap().len(),
            snapshot,
            "no snapshot rewritten"
        );
        store.forget(FileKey { dev: 1, ino: 99_999 });
        store.persist().unwrap();
        let reloaded = Checkpoints::load(&dir).unwrap();
        assert_eq!(reloaded.get(FileKey { dev: 1, ino: 3 }).unwrap().acked_offset, 500);
        assert!(reloaded.get(FileKey { dev: 1, ino: 99_999 }).is_none());
        assert_eq!(reloaded.all().len(), 99_999);
        // A torn last line (a crash mid-save) is ignored.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("checkpoints.log"))
            .unwrap()
            .write_all(b"{\"g\":99,\"se")
            .unwrap();
        assert_eq!(
            Checkpoints::load(&dir).unwrap().get(FileKey { dev: 1, ino: 3 }).unwrap().acked_offset,
            500
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_log_folds_into_a_new_snapshot() {
        let dir = std::env::temp_dir().join(format!("logvault-ckpt-fold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Checkpoints::load(&dir).unwrap();
        let key = FileKey { dev: 1, ino: 1 };
        let epoch = store.next_epoch("/a");
        store.register(
            key,
            FileCheckpoint {
                source: "/a".into(),
                path: "/a".into(),
                epoch,
                acked_offset: 0,
                acked_seq: 0,
                in_long_line: false,
                prev_hash: hex(&[0; 32]),
                cuts: Vec::new(),
                fingerprint_len: 0,
                fingerprint: String::new(),
                splitting: String::new(),
            },
        );
        for n in 1..=2_000u64 {
            store.ack(key, Acked { epoch, offset: n, seq: n, in_long_line: false, batch_hash: [1; 32] });
            store.persist().unwrap();
        }
        let log = std::fs::metadata(dir.join("checkpoints.log")).map_or(0, |m| m.len());
        assert!(log <= MIN_LOG_BYTES, "the log was never folded ({log} bytes)");
        assert_eq!(Checkpoints::load(&dir).unwrap().get(key).unwrap().acked_offset, 2_000);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn acks_persist_and_reload() {
        let dir = std::env::temp_dir().join(format!("logvault-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Checkpoints::load(&dir).unwrap();
        let key = FileKey { dev: 1, ino: 2 };
        let epoch = store.next_epoch("/var/log/a.log");
        store.register(
            key,
            FileCheckpoint {
                source: "/var/log/a.log".into(),
                path: "/var/log/a.log".into(),
                epoch,
                acked_offset: 0,
                acked_seq: 0,
                in_long_line: false,
                prev_hash: hex(&[0; 32]),
                cuts: vec![150],
                fingerprint_len: 0,
                fingerprint: String::new(),
                splitting: String::new(),
            },
        );
        store.ack(key, Acked { epoch, offset: 120, seq: 3, in_long_line: false, batch_hash: [5; 32] });
        // An ack of an older epoch never moves the checkpoint.
        store.ack(
            key,
            Acked { epoch: epoch + 9, offset: 999, seq: 9, in_long_line: false, batch_hash: [0; 32] },
        );
        store.persist().unwrap();
        let reloaded = Checkpoints::load(&dir).unwrap();
        let entry = reloaded.get(key).unwrap();
        assert_eq!((entry.acked_offset, entry.acked_seq), (120, 3));
        assert_eq!(unhex32(&entry.prev_hash), Some([5; 32]));
        assert_eq!(entry.cuts, vec![150], "cuts past the acked offset are kept");
        assert!(reloaded.next_epoch("/var/log/a.log") > epoch);
        assert!(!reloaded.is_fresh());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
