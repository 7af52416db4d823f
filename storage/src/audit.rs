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
use crate::batch::{BatchError, BatchHeader, BatchView, Limits};
use crate::checkpoint::{Checkpoint, SegmentRecord, hex, parse_hash};
use crate::keyring::Keyring;
use crate::segment::{
    ALGORITHM_AES256GCM, EntryRef, Opener, SegmentError, SegmentView, TAG, entry_len, entry_ref, entry_refs,
};

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

/// A stream as one collector sealed it: (collector, tenant, host, source,
/// epoch). Collectors sharing a bucket may each hold part of a stream.
type StreamAt = (String, String, String, String, u64);

/// What the walk of the segments knows of the streams' chains.
#[derive(Default)]
struct Chains {
    /// Each stream's end, per collector, in the order its segments were sealed.
    ends: HashMap<StreamAt, StreamEnd>,
    /// The end seq of every signed batch and the collector that sealed it
    /// (by its place in `collectors`), by hash: where a batch that follows
    /// one sealed by another collector finds its predecessor.
    by_hash: HashMap<[u8; 32], Vec<(u64, usize)>>,
    collectors: Vec<String>,
    /// Batches whose predecessor is not the collector's previous batch of
    /// the stream, settled once every segment is walked.
    open: Vec<OpenLink>,
}

/// A batch whose predecessor is looked up at the end of the walk.
struct OpenLink {
    object: String,
    /// The collector that sealed it (its place in `collectors`).
    collector: usize,
    index: usize,
    source: String,
    first_seq: u64,
    /// Its first new record.
    from: u64,
    prev_hash: [u8; 32],
    /// The collector's previous batch of the stream was another one; else
    /// it is the first batch of the stream its collector sealed.
    broken: bool,
}

impl Chains {
    /// The place of `collector` in `collectors`.
    fn collector(&mut self, collector: &str) -> usize {
        match self.collectors.iter().position(|c| c == collector) {
            Some(place) => place,
            None => {
                self.collectors.push(collector.to_owned());
                self.collectors.len() - 1
            }
        }
    }

    /// Reports what the open links still miss: a predecessor no other
    /// collector sealed (reordered, when the batch's own collector sealed
    /// another batch of the stream before it), or records between it and
    /// the predecessor found.
    fn settle(self, report: &mut Report) {
        for link in self.open {
            let found = self.by_hash.get(&link.prev_hash).and_then(|sealed| {
                sealed.iter().filter(|(_, by)| *by != link.collector).map(|(end, _)| *end).max()
            });
            match found {
                Some(end) if link.from > end => report.add(
                    Kind::Missing,
                    &link.object,
                    format!("records {end}..{} of {} are missing", link.first_seq, link.source),
                ),
                Some(_) => {}
                None if link.broken => report.add(
                    Kind::Reordered,
                    &link.object,
                    format!(
                        "batch {} ({} seq {}) does not follow its stream's previous batch",
                        link.index, link.source, link.first_seq
                    ),
                ),
                None => {}
            }
        }
    }
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
    let mut chains = Chains::default();
    let total = listed.len() as u64;
    // One buffer for every segment: no fresh memory to fault in each time.
    let mut buffer = Vec::new();
    for (done, (checkpoint_key, record)) in listed.iter().enumerate() {
        progress(done as u64, total);
        if deleted.contains(&record.key) || !in_range(record.first_ns, record.last_ns) {
            continue;
        }
        report.summary.segments += 1;
        // A signed checkpoint naming a key no segment can have (a path
        // outside the archive, say) is read nowhere.
        if !crate::archive::valid_segment_key(&record.key) {
            report.add(
                Kind::Modified,
                checkpoint_key,
                format!("names {:?}, which no segment key can be", record.key),
            );
            continue;
        }
        let listed_size = sizes.get(record.key.as_str()).copied();
        if !archive.get_into(&record.key, listed_size, &mut buffer).await? {
            report.add(Kind::Missing, &record.key, format!("listed in {checkpoint_key}"));
            continue;
        }
        report.summary.bytes += buffer.len() as u64;
        let view = match SegmentView::parse(&buffer) {
            Ok(view) => view,
            Err(err) => {
                report.add(Kind::Modified, &record.key, err.to_string());
                continue;
            }
        };
        let settle = |report: &mut Report, hash: [u8; 32]| settle_hash(report, record, &hash_to_key, &hash);
        let Some(keyring) = &options.keyring else {
            settle(&mut report, view.hash());
            continue;
        };
        let at = (view.header.collector.clone(), view.header.tenant.clone(), view.header.host.clone());
        let (hash, checked) = if view.header.algorithm == ALGORITHM_AES256GCM {
            // Entries as they were: opened in place behind the hash.
            let signers = view.header.signers.clone();
            let raw_len = view.header.raw_len;
            let cap = crate::archive::MAX_OBJECT * 64;
            match view.opener(keyring, buffer.len()) {
                _ if raw_len > cap => {
                    (view.hash(), Err(SegmentError::TooLarge { what: "raw length", got: raw_len, cap }))
                }
                Ok(opener) => check_in_place(&mut buffer, &opener, &signers, raw_len),
                Err(err) => (view.hash(), Err(err)),
            }
        } else {
            // A compressed segment inflates whole: its hash runs on its own
            // thread while every core decrypts it and checks its batches.
            std::thread::scope(|scope| {
                let hashing = scope.spawn(|| view.hash());
                let checked = view.plaintext(keyring, crate::archive::MAX_OBJECT * 64).and_then(|raw| {
                    let entries = entry_refs(&raw)?;
                    Ok(parallel_map(&entries, |entry| check_entry(entry, &view.header.signers)))
                });
                (hashing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), checked)
            })
        };
        if !settle(&mut report, hash) {
            continue;
        }
        match checked {
            Ok(checked) => chain_batches(&mut report, &record.key, &at, checked, &mut chains),
            Err(err) => report.add(Kind::Modified, &record.key, err.to_string()),
        }
    }
    progress(total, total);
    chains.settle(&mut report);

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

/// Each batch's check in a segment, in order, or what made its plaintext
/// unreadable.
type SegmentChecks = Result<Vec<Result<Checked, BatchError>>, SegmentError>;

/// What the chain check needs of one batch, once its signature is checked.
struct Checked {
    header: BatchHeader,
    hash: [u8; 32],
    signed: bool,
    skip: u32,
}

/// Parses one entry's batch (its record section's hash included) and checks
/// its signature under the key the segment names for it.
fn check_entry(entry: &EntryRef<'_>, signers: &[[u8; 32]]) -> Result<Checked, BatchError> {
    let batch = BatchView::parse(entry.batch, &Limits::TRUSTED)?;
    let signed = signers.get(usize::from(entry.signer)).is_some_and(|signer| batch.verify(signer).is_ok());
    Ok(Checked { header: batch.header, hash: batch.hash, signed, skip: entry.skip })
}

/// Checks a segment of entries as they were (algorithm 2) in `bytes`, in
/// place: one thread hashes the chunks in order and hands each one on; this
/// one opens it where it lies and checks every batch it completes while the
/// hash runs; what is left when the hash is done is checked on every core.
/// No copy of the segment is made, so no fresh memory is faulted in, and
/// both cores work from the first chunk on.
///
/// Returns the segment's hash and each batch's check, in order, or what
/// makes the plaintext unreadable.
fn check_in_place(
    bytes: &mut [u8],
    opener: &Opener,
    signers: &[[u8; 32]],
    raw_len: u64,
) -> ([u8; 32], SegmentChecks) {
    let (head, chunks) = bytes.split_at_mut(opener.chunks_at);
    let prefix = &head[..opener.prefix_len];
    let sealed_chunk = opener.chunk_size + TAG;
    // The number of chunks, the last one's sealed length being 16 to
    // `sealed_chunk` bytes (checked again as each one opens).
    let count = chunks.len().saturating_sub(1) / sealed_chunk.max(1) + 1;
    let (sender, receiver) = std::sync::mpsc::channel::<&mut [u8]>();
    std::thread::scope(|scope| {
        let hashing = scope.spawn(move || {
            let mut context = ring::digest::Context::new(&ring::digest::SHA256);
            context.update(prefix);
            for chunk in chunks.chunks_mut(sealed_chunk.max(1)) {
                context.update(chunk);
                // Once this side stops listening the rest is hashed only.
                let _ = sender.send(chunk);
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(context.finish().as_ref());
            hash
        });
        let checked = open_and_check(&receiver, count, opener, signers, raw_len);
        drop(receiver);
        (hashing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), checked)
    })
}

/// The receiving side of [`check_in_place`]. Its verdicts come in the
/// order whole-segment decryption gives them: a chunk that does not open
/// (the first one), then a plaintext of the wrong length, then the first
/// entry that cannot be cut, as [`entry_refs`] words it.
fn open_and_check<'a>(
    chunks: &std::sync::mpsc::Receiver<&'a mut [u8]>,
    count: usize,
    opener: &Opener,
    signers: &[[u8; 32]],
    raw_len: u64,
) -> SegmentChecks {
    let mut cut =
        Cut { checked: Vec::new(), waiting: std::collections::VecDeque::new(), carried: Vec::new() };
    let mut cut_failed: Option<SegmentError> = None;
    let (mut opened, mut plain_len) = (0usize, 0u64);
    loop {
        // Check one waiting batch between chunks, so this thread works
        // while the hash runs; wait only when nothing is left to check.
        let chunk = if cut.waiting.is_empty() {
            chunks.recv().ok()
        } else {
            match chunks.try_recv() {
                Ok(chunk) => Some(chunk),
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    let (index, entry) = cut.waiting.pop_front().expect("not empty");
                    cut.checked[index] = Some(check_entry(&entry, signers));
                    continue;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            }
        };
        let Some(chunk) = chunk else { break };
        let last = opened + 1 == count;
        let plain: &'a [u8] = opener.open(opened as u64, last, chunk)?;
        opened += 1;
        plain_len += plain.len() as u64;
        // Past an entry that cannot be cut, chunks are only opened: one
        // that does not open is still the finding.
        if cut_failed.is_none()
            && let Err(err) = cut.chunk(plain, signers)
        {
            cut_failed = Some(err);
            cut.waiting.clear();
        }
    }
    if opened != count {
        return Err(SegmentError::Truncated);
    }
    if plain_len != raw_len {
        return Err(SegmentError::Contents(format!(
            "{plain_len} bytes decrypted, the header says {raw_len}"
        )));
    }
    if let Some(err) = cut_failed {
        return Err(err);
    }
    match cut.carried.len() {
        0 => {}
        1..4 => return Err(SegmentError::Malformed("entry length")),
        _ => return Err(SegmentError::Malformed("entry")),
    }
    // The hash is done: what is left, on every core.
    let left: Vec<(usize, EntryRef<'a>)> = cut.waiting.into_iter().collect();
    let mut checked = cut.checked;
    for (index, result) in parallel_map(&left, |(index, entry)| (*index, check_entry(entry, signers))) {
        checked[index] = Some(result);
    }
    Ok(checked.into_iter().map(|c| c.expect("every entry checked")).collect())
}

/// Entries cut from opened chunks, in order.
struct Cut<'a> {
    /// Each entry's check, once made.
    checked: Vec<Option<Result<Checked, BatchError>>>,
    /// Entries cut but not yet checked, by their place in `checked`.
    waiting: std::collections::VecDeque<(usize, EntryRef<'a>)>,
    /// An entry that runs over a chunk's end, gathered here.
    carried: Vec<u8>,
}

impl<'a> Cut<'a> {
    /// Cuts one opened chunk: first the end of the entry carried over (then
    /// checked at once), then every entry whole in it (left waiting), and
    /// the start of one it cuts (carried).
    fn chunk(&mut self, plain: &'a [u8], signers: &[[u8; 32]]) -> Result<(), SegmentError> {
        let mut rest = plain;
        if !self.carried.is_empty() {
            let want = 4usize.saturating_sub(self.carried.len()).min(rest.len());
            self.carried.extend_from_slice(&rest[..want]);
            rest = &rest[want..];
            if self.carried.len() < 4 {
                return Ok(());
            }
            let len = entry_len(self.carried[..4].try_into().expect("4 bytes"))?;
            let want = (4 + len - self.carried.len()).min(rest.len());
            self.carried.extend_from_slice(&rest[..want]);
            rest = &rest[want..];
            if self.carried.len() < 4 + len {
                return Ok(());
            }
            let entry = entry_ref(&self.carried[4..])?;
            self.checked.push(Some(check_entry(&entry, signers)));
            self.carried.clear();
        }
        while !rest.is_empty() {
            if rest.len() < 4 {
                self.carried.extend_from_slice(rest);
                break;
            }
            let len = entry_len(rest[..4].try_into().expect("4 bytes"))?;
            if rest.len() < 4 + len {
                self.carried.extend_from_slice(rest);
                break;
            }
            self.waiting.push_back((self.checked.len(), entry_ref(&rest[4..4 + len])?));
            self.checked.push(None);
            rest = &rest[4 + len..];
        }
        Ok(())
    }
}

/// Walks a segment's checked batches in order: each stream's hash chain and
/// sequence numbers. `at` is the segment's (collector, tenant, host).
fn chain_batches(
    report: &mut Report,
    key: &str,
    (collector, tenant, host): &(String, String, String),
    checked: Vec<Result<Checked, BatchError>>,
    chains: &mut Chains,
) {
    for (index, checked) in checked.into_iter().enumerate() {
        // The segment decrypted, so these bytes are what its sealer wrote;
        // a batch that does not even parse is not one its agent signed.
        let batch = match checked {
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
        report.summary.records += u64::from(batch.header.count.saturating_sub(batch.skip));
        let stream = (
            collector.clone(),
            tenant.clone(),
            host.clone(),
            batch.header.source.clone(),
            batch.header.epoch,
        );
        if !batch.signed {
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
            chains.ends.remove(&stream);
            continue;
        }
        let end = batch.header.first_seq + u64::from(batch.header.count);
        let from = batch.header.first_seq + u64::from(batch.skip);
        let place = chains.collector(collector);
        let open = |broken| OpenLink {
            object: key.to_owned(),
            collector: place,
            index,
            source: batch.header.source.clone(),
            first_seq: batch.header.first_seq,
            from,
            prev_hash: batch.header.prev_hash,
            broken,
        };
        match chains.ends.get(&stream) {
            // It may follow a batch another collector sealed.
            Some(previous) if batch.header.prev_hash != previous.hash => chains.open.push(open(true)),
            Some(previous) if from > previous.next_seq => report.add(
                Kind::Missing,
                key,
                format!(
                    "records {}..{} of {} are missing",
                    previous.next_seq, batch.header.first_seq, batch.header.source
                ),
            ),
            Some(_) => {}
            None if batch.header.first_seq > 0 => chains.open.push(open(false)),
            None => {}
        }
        let sealed = chains.by_hash.entry(batch.hash).or_default();
        if !sealed.contains(&(end, place)) {
            sealed.push((end, place));
        }
        chains.ends.insert(stream, StreamEnd { next_seq: end, hash: batch.hash });
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

#[cfg(test)]
mod tests {
    use ring::signature::{Ed25519KeyPair, KeyPair};

    use super::*;
    use crate::batch::Deflater;
    use crate::keyring::Kek;
    use crate::segment::{self, SegmentEntry, SegmentHeader};
    use crate::{BatchBuilder, Level, WireRecord};

    /// A stream whose batches several collectors sealed: each collector's
    /// part follows the part another one sealed, and only what no other
    /// collector holds is reported, never a batch reordered within one.
    #[test]
    fn a_stream_sealed_by_several_collectors_chains_across_them() {
        let header = |first_seq: u64, count: u32, prev: u8| BatchHeader {
            version: 3,
            agent_id: "node-1".into(),
            source: "app".into(),
            epoch: 0,
            first_seq,
            count,
            codec: crate::batch::Codec::None,
            raw_len: 0,
            prev_hash: [prev; 32],
            body_len: 0,
            body_sha: [0; 32],
        };
        // Batch n has hash [n; 32] and holds records 10(n-1)..10n.
        let batch = |n: u8| {
            Ok(Checked {
                header: header(10 * u64::from(n - 1), 10, n - 1),
                hash: [n; 32],
                signed: true,
                skip: 0,
            })
        };
        let walk = |segments: Vec<(&str, Vec<u8>)>| {
            let mut report = Report::default();
            let mut chains = Chains::default();
            for (collector, batches) in segments {
                let at = (collector.to_owned(), "t".to_owned(), "node-1".to_owned());
                let checked = batches.into_iter().map(batch).collect();
                chain_batches(&mut report, &format!("{collector}-segment"), &at, checked, &mut chains);
            }
            chains.settle(&mut report);
            report.findings.sort();
            report.findings.into_iter().map(|f| (f.kind, f.object)).collect::<Vec<_>>()
        };
        // c1 sealed 1, 2 and 5; c3 sealed 3 and 4 in between.
        assert_eq!(walk(vec![("c1", vec![1, 2, 5]), ("c3", vec![3, 4])]), vec![]);
        assert_eq!(walk(vec![("c3", vec![3, 4]), ("c1", vec![1, 2, 5])]), vec![]);
        // c3's part gone: 5 follows a batch nobody holds.
        assert_eq!(walk(vec![("c1", vec![1, 2, 5])]), vec![(Kind::Reordered, "c1-segment".to_owned())]);
        // 4 gone: the same for 5.
        assert_eq!(
            walk(vec![("c1", vec![1, 2, 5]), ("c3", vec![3])]),
            vec![(Kind::Reordered, "c1-segment".to_owned())]
        );
        // Within one collector, a batch out of order is reordered even
        // though its predecessor is in the archive.
        assert_eq!(
            walk(vec![("c1", vec![1, 3, 2, 4, 5])]),
            vec![
                (Kind::Reordered, "c1-segment".to_owned()),
                (Kind::Reordered, "c1-segment".to_owned()),
                (Kind::Reordered, "c1-segment".to_owned())
            ]
        );
        // A collector's first batch of the stream whose predecessor another
        // collector sealed, with records between them lost.
        let mut report = Report::default();
        let mut chains = Chains::default();
        let at = |c: &str| (c.to_owned(), "t".to_owned(), "node-1".to_owned());
        chain_batches(&mut report, "c1-segment", &at("c1"), vec![batch(1)], &mut chains);
        let mut late = header(15, 5, 1);
        late.count = 5;
        let checked = vec![Ok(Checked { header: late, hash: [9; 32], signed: true, skip: 0 })];
        chain_batches(&mut report, "c2-segment", &at("c2"), checked, &mut chains);
        chains.settle(&mut report);
        let findings: Vec<_> =
            report.findings.iter().map(|f| (f.kind, f.object.as_str(), f.detail.as_str())).collect();
        assert_eq!(findings, vec![(Kind::Missing, "c2-segment", "records 10..15 of app are missing")]);
    }

    /// A segment header of tenant `t`, host `h`.
    fn header(algorithm: u8, chunk_size: u32, raw_len: u64, signers: Vec<[u8; 32]>) -> SegmentHeader {
        SegmentHeader {
            algorithm,
            chunk_size,
            segment_id: "s".into(),
            collector: "c".into(),
            tenant: "t".into(),
            host: "h".into(),
            first_ns: 0,
            last_ns: 0,
            created_ns: 0,
            batches: 0,
            records: 0,
            raw_len,
            signers,
        }
    }

    /// A segment of `sizes.len()` compressed batches, one stream, whose
    /// record counts are `sizes` (lines that compress poorly, so batches
    /// run over chunk boundaries), sealed with `chunk_size`.
    fn sealed(sizes: &[usize], chunk_size: u32, kek: &Kek) -> (segment::Sealed, [u8; 32]) {
        let key = Ed25519KeyPair::from_seed_unchecked(&[5; 32]).unwrap();
        let signer: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
        let mut deflater = Deflater::zstd(1).unwrap();
        let (mut entries, mut prev, mut seq, mut state) = (Vec::new(), [0u8; 32], 0u64, 7u64);
        for &size in sizes {
            let mut builder = BatchBuilder::new("a", "/var/log/a.log", 1, seq, prev);
            for _ in 0..size {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                builder.push(WireRecord::new(
                    seq as i64,
                    Level::Info,
                    format!("line {seq} {state:x} {:x}", state >> 7),
                ));
                seq += 1;
            }
            let batch = builder.sign_with(&key, Some(&mut deflater));
            prev = crate::batch::encoded_batch_hash(&batch).unwrap();
            segment::encode_entry(&mut entries, &SegmentEntry { received_ns: 1, skip: 0, signer: 0, batch });
        }
        (
            segment::seal(
                header(segment::ALGORITHM_ZSTD_AES256GCM, chunk_size, 0, vec![signer]),
                &entries,
                3,
                kek,
            ),
            signer,
        )
    }

    /// What a path says of a segment: its hash, and each batch's hash and
    /// signature verdict, or the error.
    type Verdict = ([u8; 32], Result<Vec<Result<([u8; 32], bool), BatchError>>, SegmentError>);

    fn in_place(bytes: &[u8], keyring: &Keyring) -> Verdict {
        let mut bytes = bytes.to_vec();
        let view = SegmentView::parse(&bytes).unwrap();
        let (signers, raw_len) = (view.header.signers.clone(), view.header.raw_len);
        let opener = view.opener(keyring, bytes.len()).unwrap();
        let (hash, checked) = check_in_place(&mut bytes, &opener, &signers, raw_len);
        (hash, checked.map(|all| all.into_iter().map(|c| c.map(|c| (c.hash, c.signed))).collect()))
    }

    fn whole(bytes: &[u8], keyring: &Keyring) -> Verdict {
        let view = SegmentView::parse(bytes).unwrap();
        let checked = view.plaintext(keyring, 1 << 30).and_then(|raw| {
            Ok(entry_refs(&raw)?
                .iter()
                .map(|entry| check_entry(entry, &view.header.signers).map(|c| (c.hash, c.signed)))
                .collect())
        });
        (view.hash(), checked)
    }

    /// Opening chunks in place behind the hash finds what decrypting the
    /// whole segment finds: the same hash, the same batches in the same
    /// order, whether batches end inside a chunk, on its boundary or span
    /// several; and the same refusal when a chunk is damaged or missing.
    #[test]
    fn checking_in_place_agrees_with_checking_the_whole_plaintext() {
        let kek = Kek::generate("k").unwrap();
        let mut keyring = Keyring::default();
        keyring.insert(kek.clone());
        for (sizes, chunk) in [
            (&[30usize][..], 4096u32),
            (&[12, 40, 10, 200, 17, 90, 12, 12, 300][..], 4096),
            (&[500, 20, 500][..], 4096),
            (&[60, 60, 60, 60, 60, 60, 60, 60][..], 1 << 20),
        ] {
            let (sealed, _) = sealed(sizes, chunk, &kek);
            let view = SegmentView::parse(&sealed.bytes).unwrap();
            assert_eq!(view.header.algorithm, ALGORITHM_AES256GCM);
            let chunks_at = sealed.bytes.len() - view.opener(&keyring, sealed.bytes.len()).unwrap().chunks_at;
            let expected = whole(&sealed.bytes, &keyring);
            assert_eq!(expected.0, sealed.hash);
            let batches = expected.1.as_ref().unwrap();
            assert_eq!(batches.len(), sizes.len());
            assert!(batches.iter().all(|batch| batch.as_ref().is_ok_and(|(_, signed)| *signed)));
            assert_eq!(in_place(&sealed.bytes, &keyring), expected, "{sizes:?} in chunks of {chunk}");

            let at = sealed.bytes.len() - chunks_at;
            let sealed_chunk = chunk as usize + TAG;
            let mut damaged = Vec::new();
            // A flipped byte in each chunk but the last, and in the last.
            for offset in (0..chunks_at).step_by(sealed_chunk).chain([chunks_at - 1]) {
                let mut bytes = sealed.bytes.clone();
                bytes[at + offset] ^= 0x40;
                damaged.push(bytes);
            }
            // Cut at a chunk boundary, and inside the last chunk's tag.
            if chunks_at > sealed_chunk {
                damaged.push(sealed.bytes[..at + sealed_chunk].to_vec());
            }
            damaged.push(sealed.bytes[..sealed.bytes.len() - 3].to_vec());
            for bytes in damaged {
                let expected = whole(&bytes, &keyring);
                assert!(expected.1.is_err());
                assert_eq!(in_place(&bytes, &keyring), expected, "{sizes:?} in chunks of {chunk}");
            }
        }
    }

    /// Plaintext that cannot be cut into entries, sealed as entries as they
    /// were: the in-place path says what whole-segment decryption says, in
    /// the same order (a chunk that does not open, then the length, then
    /// the entries), and never loops on a length prefix cut by a chunk's end.
    #[test]
    fn a_plaintext_that_cannot_be_cut_is_refused_as_the_whole_path_refuses_it() {
        let kek = Kek::generate("k").unwrap();
        let mut keyring = Keyring::default();
        keyring.insert(kek.clone());
        let seal = |plain: &[u8]| {
            let head = header(ALGORITHM_AES256GCM, 4096, plain.len() as u64, vec![[0; 32]]);
            segment::seal_compressed(head, plain, &kek).bytes
        };
        // An entry of `len` bytes after its length (garbage for a batch).
        let entry = |len: u32| [len.to_be_bytes().to_vec(), vec![0x5a; len as usize]].concat();
        // The first entry ends 2 bytes before the chunk's end: the next
        // length prefix is cut in two, and says 5 (out of range).
        let straddled = [entry(4090), vec![0, 0, 0, 5], vec![0x11; 300]].concat();
        // The same, with a chunk further on that does not open.
        let long = [entry(4090), vec![0, 0, 0, 5], vec![0x11; 4 * 4096]].concat();
        let mut broken = seal(&long);
        let chunks_at = {
            let view = SegmentView::parse(&broken).unwrap();
            view.opener(&keyring, broken.len()).unwrap().chunks_at
        };
        broken[chunks_at + 3 * (4096 + TAG) + 7] ^= 1;
        let cases: [(&str, Vec<u8>, SegmentError); 5] = [
            (
                "a cut length prefix out of range",
                seal(&straddled),
                SegmentError::Contents("entry length 5 out of range".into()),
            ),
            ("a chunk that does not open after it", broken, SegmentError::Chunk(3)),
            (
                "a last entry cut short",
                seal(&[entry(4200), entry(100)[..60].to_vec()].concat()),
                SegmentError::Malformed("entry"),
            ),
            (
                "a last length prefix cut short",
                seal(&[entry(4200), vec![0, 0]].concat()),
                SegmentError::Malformed("entry length"),
            ),
            (
                "an entry spanning three chunks, then a bad length",
                seal(&[entry(9000), vec![0, 0, 0, 1], vec![0; 40]].concat()),
                SegmentError::Contents("entry length 1 out of range".into()),
            ),
        ];
        for (case, bytes, error) in cases {
            let whole = whole(&bytes, &keyring);
            assert_eq!(whole.1, Err(error), "{case}");
            assert_eq!(in_place(&bytes, &keyring), whole, "{case}");
        }
    }

    /// A checkpoint, validly signed, that names an object outside the
    /// archive: reported MODIFIED, and that file is never read (an object
    /// there with the named hash would otherwise pass).
    #[tokio::test]
    async fn a_checkpoint_naming_a_key_outside_the_archive_is_modified_and_never_read() {
        use crate::archive::{Archive, checkpoint_key};
        use crate::checkpoint::{CheckpointBody, SegmentRecord};
        let dir = std::env::temp_dir().join(format!("logvault-audit-outside-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let archive = Archive::open(&dir.join("archive").display().to_string()).unwrap();
        let planted = b"not in the archive";
        std::fs::create_dir_all(dir.join("x/2026/11/24/h")).unwrap();
        std::fs::write(dir.join("x/2026/11/24/h/s"), planted).unwrap();
        let key = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
        let outside = "../x/2026/11/24/h/s".to_owned();
        let checkpoint = CheckpointBody {
            collector: "c1".into(),
            seq: 1,
            prev: "0".repeat(64),
            from_ns: 0,
            to_ns: 1,
            segments: vec![SegmentRecord {
                key: outside.clone(),
                hash: hex(ring::digest::digest(&ring::digest::SHA256, planted).as_ref()),
                size: planted.len() as u64,
                tenant: "t".into(),
                host: "h".into(),
                first_ns: 0,
                last_ns: 0,
                records: 0,
            }],
            root: String::new(),
            deleted: Vec::new(),
        }
        .sign(&key);
        let name = checkpoint_key("c1", 1).unwrap();
        archive.put_verified(&name, &checkpoint).await.unwrap();
        let report =
            audit(&archive, key.public_key().as_ref(), &AuditOptions::default(), |_, _| {}).await.unwrap();
        assert_eq!(report.findings.len(), 1, "{:?}", report.findings);
        let finding = &report.findings[0];
        assert_eq!((finding.kind, finding.object.as_str()), (Kind::Modified, name.as_str()));
        assert!(finding.detail.contains(&outside), "{}", finding.detail);
        assert_eq!(report.summary.bytes, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        /// Any run of entries (some lengths out of range, a tail cut short),
        /// sealed as entries as they were in 4 KiB chunks: the in-place
        /// path and whole-segment decryption say the same.
        #[test]
        fn any_entries_are_cut_in_place_as_from_the_whole(
            lengths in proptest::collection::vec(0u32..6000, 0..12),
            fill in proptest::prelude::any::<u8>(),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6),
        ) {
            let kek = Kek::generate("k").unwrap();
            let mut keyring = Keyring::default();
            keyring.insert(kek.clone());
            let mut plain = Vec::new();
            for len in &lengths {
                plain.extend_from_slice(&len.to_be_bytes());
                // Lengths under 13 or over what follows are the test's lies.
                plain.extend(std::iter::repeat_n(fill, (*len as usize).max(13) - 13 + 13));
            }
            plain.extend_from_slice(&tail);
            let head = header(ALGORITHM_AES256GCM, 4096, plain.len() as u64, vec![[0; 32]]);
            let bytes = segment::seal_compressed(head, &plain, &kek).bytes;
            proptest::prop_assert_eq!(in_place(&bytes, &keyring), whole(&bytes, &keyring));
        }
    }
}
