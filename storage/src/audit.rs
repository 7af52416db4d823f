//! Proving an archive whole: checkpoint signatures and chains, segment
//! hashes and inclusion, objects no checkpoint names, and (with the KEK)
//! every batch's agent signature, hash chain and sequence continuity.
//!
//! Every problem is a [`Finding`] naming the object it concerns; an audit
//! with no findings proves that every segment the checkpoints list is
//! present and unchanged, that no checkpoint was removed, reordered or
//! re-signed, and (with the KEK) that every record is the one its agent
//! signed, in order, with nothing missing between.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::archive::{Archive, ArchiveError, CHECKPOINT_PREFIX};
use crate::batch::{BatchView, Limits};
use crate::checkpoint::{Checkpoint, SegmentRecord, hex, parse_hash};
use crate::keyring::Keyring;
use crate::segment::{SegmentError, SegmentView, entry_refs};

/// What kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Present but not what was signed.
    Modified,
    /// Signed for, but absent.
    Missing,
    /// Present, but no checkpoint names it.
    Extra,
    /// Present and intact, but in another place or order than signed.
    Reordered,
    /// A batch whose agent signature does not verify.
    Unsigned,
}

impl Kind {
    /// How it prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Modified => "MODIFIED",
            Kind::Missing => "MISSING",
            Kind::Extra => "EXTRA",
            Kind::Reordered => "REORDERED",
            Kind::Unsigned => "UNSIGNED",
        }
    }
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// What kind.
    pub kind: Kind,
    /// The object (segment or checkpoint key) it concerns.
    pub object: String,
    /// What exactly.
    pub detail: String,
}

/// What the audit covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// Segments checked.
    pub segments: u64,
    /// Segment bytes hashed.
    pub bytes: u64,
    /// Batches whose signature was checked (with the KEK).
    pub batches: u64,
    /// Records in them.
    pub records: u64,
    /// Segments sealed after the newest checkpoint (not yet signed for).
    pub pending: u64,
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    /// With keys: decrypt and check every batch.
    pub keyring: Option<Keyring>,
    /// Only segments with records at or after this time, ns.
    pub from_ns: Option<i64>,
    /// Only segments with records before this time, ns.
    pub to_ns: Option<i64>,
}

/// The outcome.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every problem found, sorted.
    pub findings: Vec<Finding>,
    /// What was covered.
    pub summary: Summary,
}

impl Report {
    fn add(&mut self, kind: Kind, object: &str, detail: impl Into<String>) {
        self.findings.push(Finding { kind, object: object.to_owned(), detail: detail.into() });
    }
}

/// Where a stream's chain stands, between batches.
struct StreamEnd {
    next_seq: u64,
    hash: [u8; 32],
}

/// Audits `archive` against the collectors' archive public key.
/// `progress` is called after each segment with (done, total).
pub async fn audit(
    archive: &Archive,
    public_key: &[u8],
    options: &AuditOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<Report, ArchiveError> {
    let mut report = Report::default();
    let objects = archive.list("").await?;
    let sizes: HashMap<&str, u64> = objects.iter().map(|(key, size)| (key.as_str(), *size)).collect();

    // Checkpoints, per collector, in sequence order.
    let mut chains: BTreeMap<String, Vec<(u64, String, Checkpoint)>> = BTreeMap::new();
    for (key, _) in objects.iter().filter(|(key, _)| key.starts_with(CHECKPOINT_PREFIX)) {
        let bytes = archive.get(key).await?;
        let checkpoint = match Checkpoint::parse(&bytes) {
            Ok(checkpoint) => checkpoint,
            Err(err) => {
                report.add(Kind::Modified, key, err.to_string());
                continue;
            }
        };
        if let Err(err) = checkpoint.verify(public_key) {
            report.add(Kind::Modified, key, err.to_string());
            continue;
        }
        report.summary.checkpoints += 1;
        let collector = checkpoint.body.collector.clone();
        let seq = checkpoint.body.seq;
        match crate::archive::checkpoint_key(&collector, seq) {
            Ok(expected) if expected == *key => {}
            _ => report.add(Kind::Reordered, key, format!("holds checkpoint {seq} of {collector}")),
        }
        if hex(&checkpoint.body.compute_root()) != checkpoint.body.root {
            report.add(Kind::Modified, key, "its segment list does not match its Merkle root");
        }
        chains.entry(collector).or_default().push((seq, key.clone(), checkpoint));
    }

    // The chain of each collector: 1, 2, 3..., each naming the previous.
    let mut listed: Vec<(String, SegmentRecord)> = Vec::new();
    let mut deleted: HashSet<String> = HashSet::new();
    let mut newest_signed_ns = i64::MIN;
    for (collector, checkpoints) in &mut chains {
        checkpoints.sort_by_key(|(seq, _, _)| *seq);
        let mut expected_seq = 1;
        let mut prev: Option<[u8; 32]> = None;
        for (seq, key, checkpoint) in checkpoints.iter() {
            if *seq > expected_seq {
                for missing in expected_seq..*seq {
                    let name = crate::archive::checkpoint_key(collector, missing).unwrap_or_default();
                    // One that is there but failed its signature is already reported.
                    if !report.findings.iter().any(|f| f.object == name) {
                        report.add(
                            Kind::Missing,
                            &name,
                            format!("checkpoint {missing} of {collector} is gone"),
                        );
                    }
                }
            }
            let named_prev = parse_hash(&checkpoint.body.prev);
            let chained = match prev {
                Some(hash) if *seq == expected_seq => named_prev == Some(hash),
                _ => true,
            };
            if !chained {
                report.add(Kind::Reordered, key, "does not name the checkpoint before it");
            }
            if *seq == 1 && named_prev != Some([0; 32]) {
                report.add(Kind::Modified, key, "the first checkpoint names a predecessor");
            }
            prev = Some(checkpoint.file_hash);
            expected_seq = seq + 1;
            newest_signed_ns = newest_signed_ns.max(checkpoint.body.to_ns);
            for segment in &checkpoint.body.segments {
                listed.push((key.clone(), segment.clone()));
            }
            for deletion in &checkpoint.body.deleted {
                deleted.insert(deletion.key.clone());
            }
        }
    }

    // Every listed segment: present, and its hash as signed.
    let listed_keys: HashSet<&str> = listed.iter().map(|(_, s)| s.key.as_str()).collect();
    let hash_to_key: HashMap<&str, &str> =
        listed.iter().map(|(_, s)| (s.hash.as_str(), s.key.as_str())).collect();
    let in_range = |first: i64, last: i64| {
        options.from_ns.is_none_or(|from| last >= from) && options.to_ns.is_none_or(|to| first < to)
    };
    let mut streams: HashMap<(String, String, String, u64), StreamEnd> = HashMap::new();
    let total = listed.len() as u64;
    // One buffer for every segment: no fresh memory to fault in each time.
    let mut buffer = Vec::new();
    for (done, (checkpoint_key, record)) in listed.iter().enumerate() {
        progress(done as u64, total);
        if deleted.contains(&record.key) || !in_range(record.first_ns, record.last_ns) {
            continue;
        }
        report.summary.segments += 1;
        let listed_size = sizes.get(record.key.as_str()).copied();
        if !archive.get_into(&record.key, listed_size, &mut buffer).await? {
            report.add(Kind::Missing, &record.key, format!("listed in {checkpoint_key}"));
            continue;
        }
        let bytes = &buffer;
        report.summary.bytes += bytes.len() as u64;
        let view = match SegmentView::parse(bytes) {
            Ok(view) => view,
            Err(err) => {
                report.add(Kind::Modified, &record.key, err.to_string());
                continue;
            }
        };
        // With the key, the segment's hash runs on its own thread while the
        // other cores decrypt it and check its batches; the batches' chain
        // is taken up once the hash says the segment is the one signed.
        let settle = |report: &mut Report, hash: [u8; 32]| settle_hash(report, record, &hash_to_key, &hash);
        match &options.keyring {
            None => {
                settle(&mut report, view.hash());
            }
            Some(keyring) => std::thread::scope(|scope| {
                let hashing = scope.spawn(|| view.hash());
                let plaintext = view.plaintext(keyring, crate::archive::MAX_OBJECT * 64);
                check_batches(&mut report, &record.key, &view, plaintext, &mut streams, |report| {
                    settle(report, hashing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                });
            }),
        }
    }
    progress(total, total);

    // Objects no checkpoint names.
    for (key, size) in &objects {
        if key.starts_with(CHECKPOINT_PREFIX) || listed_keys.contains(key.as_str()) {
            continue;
        }
        // Sealed after the newest checkpoint: signed for at the next one.
        let pending = match archive.get_opt(key).await? {
            Some(bytes) => SegmentView::parse(&bytes).is_ok_and(|v| v.header.created_ns > newest_signed_ns),
            None => false,
        };
        if pending {
            report.summary.pending += 1;
        } else {
            report.add(
                Kind::Extra,
                key,
                format!("{} bytes no checkpoint names", sizes.get(key.as_str()).unwrap_or(size)),
            );
        }
    }
    report.findings.sort();
    Ok(report)
}

/// Compares a segment's hash with the one its checkpoint signed. False
/// when the bytes are another listed segment's: its batches are checked
/// under that name, not this one.
fn settle_hash(
    report: &mut Report,
    record: &SegmentRecord,
    hash_to_key: &HashMap<&str, &str>,
    hash: &[u8; 32],
) -> bool {
    let hash = hex(hash);
    if hash == record.hash {
        return true;
    }
    match hash_to_key.get(hash.as_str()) {
        Some(other) => {
            report.add(Kind::Reordered, &record.key, format!("holds the segment signed as {other}"));
            false
        }
        None => {
            report.add(Kind::Modified, &record.key, "its hash is not the one signed");
            true
        }
    }
}

/// Checks each batch of a decrypted segment: the agent's signature, the
/// hash chain and the sequence numbers of its stream. `settle` gives the
/// segment's hash verdict (false: skip the chain), asked for once the
/// signatures are checked, so both run at once.
fn check_batches(
    report: &mut Report,
    key: &str,
    view: &SegmentView<'_>,
    plaintext: Result<Vec<u8>, SegmentError>,
    streams: &mut HashMap<(String, String, String, u64), StreamEnd>,
    settle: impl FnOnce(&mut Report) -> bool,
) {
    let raw = match plaintext {
        Ok(raw) => raw,
        Err(err) => {
            if settle(report) {
                report.add(Kind::Modified, key, err.to_string());
            }
            return;
        }
    };
    let entries = match entry_refs(&raw) {
        Ok(entries) => entries,
        Err(err) => {
            if settle(report) {
                report.add(Kind::Modified, key, err.to_string());
            }
            return;
        }
    };
    let limits = Limits::TRUSTED;
    // Parsing and signature checks are independent per batch: on every
    // core, in order. The chain below needs them one after another.
    let checked = parallel_map(&entries, |entry| {
        let batch = BatchView::parse(entry.batch, &limits)?;
        let signed = view
            .header
            .signers
            .get(usize::from(entry.signer))
            .is_some_and(|signer| batch.verify(signer).is_ok());
        Ok::<_, crate::batch::BatchError>((batch, signed))
    });
    if !settle(report) {
        return;
    }
    for (index, (entry, checked)) in entries.iter().zip(checked).enumerate() {
        // The segment decrypted, so these bytes are what its sealer wrote;
        // a batch that does not even parse is not one its agent signed.
        let (batch, signed) = match checked {
            Ok(checked) => checked,
            Err(err) => {
                report.add(
                    Kind::Unsigned,
                    key,
                    format!("batch {index} is not a batch its agent signed: {err}"),
                );
                continue;
            }
        };
        report.summary.batches += 1;
        report.summary.records += u64::from(batch.header.count.saturating_sub(entry.skip));
        let stream = (
            view.header.tenant.clone(),
            view.header.host.clone(),
            batch.header.source.clone(),
            batch.header.epoch,
        );
        if !signed {
            report.add(
                Kind::Unsigned,
                key,
                format!(
                    "batch {index} ({} seq {}) is not signed by its agent",
                    batch.header.source, batch.header.first_seq
                ),
            );
            // Its hash cannot be trusted: the stream's chain starts again
            // after it rather than blaming the batches that follow.
            streams.remove(&stream);
            continue;
        }
        let end = batch.header.first_seq + u64::from(batch.header.count);
        if let Some(previous) = streams.get(&stream) {
            if batch.header.prev_hash != previous.hash {
                report.add(
                    Kind::Reordered,
                    key,
                    format!(
                        "batch {index} ({} seq {}) does not follow its stream's previous batch",
                        batch.header.source, batch.header.first_seq
                    ),
                );
            } else if batch.header.first_seq + u64::from(entry.skip) > previous.next_seq {
                report.add(
                    Kind::Missing,
                    key,
                    format!(
                        "records {}..{} of {} are missing",
                        previous.next_seq, batch.header.first_seq, batch.header.source
                    ),
                );
            }
        }
        streams.insert(stream, StreamEnd { next_seq: end, hash: batch.hash });
    }
}

/// `f` over `items` on every core, the results in the items' order. Items
/// are handed out a few at a time, so a core busy with something else (the
/// segment's hash) takes fewer.
fn parallel_map<'a, T: Sync, R: Send>(items: &'a [T], f: impl Fn(&'a T) -> R + Sync) -> Vec<R> {
    const BLOCK: usize = 4;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below a few items per worker, threads cost more than they save.
    if workers < 2 || items.len() < 4 * workers {
        return items.iter().map(&f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, Vec<R>)> = std::thread::scope(|scope| {
        let (f, next) = (&f, &next);
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(move || {
                    let mut taken = Vec::new();
                    loop {
                        let start = next.fetch_add(BLOCK, std::sync::atomic::Ordering::Relaxed);
                        if start >= items.len() {
                            return taken;
                        }
                        let block = &items[start..(start + BLOCK).min(items.len())];
                        taken.push((start, block.iter().map(f).collect::<Vec<R>>()));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    done.sort_unstable_by_key(|(start, _)| *start);
    done.into_iter().flat_map(|(_, results)| results).collect()
}
