//! Index splits in the shared bucket: what lets any collector of a cluster
//! search what every other one indexed.
//!
//! **Publishing.** Every `cluster.publish_interval_ms` the indexer merges
//! every committed index segment it has not published yet into one (so a
//! split holds exactly the records indexed from the WAL since the last
//! one, up to the commit's WAL position), and a thread packages that
//! segment's files into one object, seals it as the archive seals segments
//! (AES-256-GCM in 1 MiB chunks under a data key wrapped by the KEK, the
//! header bound to every chunk) and uploads it to
//! `splits/COLLECTOR/SEGMENT.split`; then it writes the split's manifest to
//! `manifests/COLLECTOR/SEGMENT.json`: its time range, tenants, record
//! count, WAL position, size, SHA-256 and key id. The merged segment is
//! frozen as soon as it exists: never merged again, so no record is in two
//! splits; a failed upload is retried for that same segment. While a split
//! is being merged no other merge starts. At start the collector reads its
//! own manifests back: their segments stay frozen, and when its index is
//! behind the newest published WAL position (rebuilt, or restored), it is
//! rebuilt up to that position with merges stopped, and what it holds then
//! is frozen as published rather than published again.
//!
//! **Compaction.** When `cluster.compact_splits` of a collector's own
//! splits (none replaced, each under [`COMPACT_MAX_INPUT`]) fall in one
//! size class ([`tier`]), it reads them from the bucket, merges them in a
//! scratch index (its own index is not touched) and publishes the result
//! with a manifest naming the splits it `replaces` and the index segments
//! it `covers`. Readers never search a replaced split ([`live`]), so each
//! record is read from one split at every moment; the replaced ones are
//! deleted `cluster.compact_grace_ms` later. At start the segments a
//! compacted split covers stay frozen, and split objects without a
//! manifest (an upload cut short) are deleted.
//!
//! Record ids carry a tag of the collector's name in their top 16 bits, so
//! hits from several collectors never tie in the (timestamp, id) order
//! that pages and cursors follow.
//!
//! **Searching.** Every `cluster.poll_interval_ms` a collector lists the
//! other collectors' manifests. A search or aggregation reads its own
//! index (all of its records, published or not) and the other
//! collectors' splits whose time range and tenants can match, chosen from
//! the manifests before any split is read, each limited to the records its
//! publisher's index retention still keeps. A split is opened with two
//! ranged reads (its head, and the table at its end, see [`remote`]), its
//! schema compared with ours; then only the chunks a search touches are
//! fetched, each authenticated as it is decrypted, and kept in a sparse
//! file under `DATA_DIR/splits/`. The cache is kept under
//! `cluster.cache_bytes` (checked before every search) by dropping the
//! least recently used splits. A split that cannot be read is left out of
//! searches (logged and counted) and tried again a minute later.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use logvault_storage::archive::Archive;
use logvault_storage::keyring::{Kek, Keyring};
use logvault_storage::segment::{self, SegmentHeader};
use serde::{Deserialize, Serialize};
use tantivy::index::{SegmentId, SegmentMeta};
use tantivy::indexer::{LogMergePolicy, MergeCandidate, MergePolicy};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Searcher};

use crate::index::{LogIndex, Queued};

mod remote;

const PACKAGE_MAGIC: &[u8; 4] = b"LVSP";
/// Record ids carry their collector's tag above this bit, so ids never tie
/// across collectors.
pub(crate) const ID_TAG_SHIFT: u32 = 48;
/// The package version written; version 1 (no table) is still read.
const PACKAGE_VERSION: u8 = 2;
/// A package's last bytes: `table_len u32 | version u8 | magic`.
const TRAILER: usize = 9;
/// Largest package table.
const MAX_TABLE: u32 = 64 * 1024;
const MANIFEST_VERSION: u8 = 1;
/// Largest manifest read back.
const MAX_MANIFEST: u64 = 64 * 1024;
/// Most files in a split package (a segment has about eight).
const MAX_FILES: usize = 32;
/// Most tenants a manifest lists; a split with more lists none and is
/// read for every tenant.
const MAX_TENANTS: usize = 256;
/// Most segments a manifest may list as replaced or covered (36 bytes
/// each, within [`MAX_MANIFEST`]).
const MAX_COVERS: usize = 1024;
/// Splits smaller than this are compaction's first size class.
const COMPACT_BASE: u64 = 16 << 20;
/// Splits this large or larger are never compacted.
const COMPACT_MAX_INPUT: u64 = 128 << 20;
/// The most bytes of splits merged into one.
const COMPACT_MAX_OUTPUT: u64 = 512 << 20;
/// Splits opened at once by a search.
const OPENING_THREADS: usize = 8;
/// Largest split fetched.
const MAX_SPLIT: u64 = logvault_storage::archive::MAX_OBJECT;

/// What a split holds, as its manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version (1).
    pub version: u8,
    /// The collector that published it.
    pub collector: String,
    /// Its index segment's id (32 hex digits).
    pub segment: String,
    /// The split object's key.
    pub split: String,
    /// Tenants of its records; empty when there were too many to list.
    pub tenants: Vec<String>,
    /// Oldest record time, ns.
    pub first_ns: i64,
    /// Newest record time, ns.
    pub last_ns: i64,
    /// Records in it.
    pub records: u64,
    /// The publisher's WAL position its records were indexed up to.
    pub wal_to: u64,
    /// The publisher's index retention, ms: its records older than that
    /// are no longer searched anywhere.
    pub retention_ms: Option<u64>,
    /// The object's size.
    pub bytes: u64,
    /// The object's SHA-256 (hex).
    pub sha256: String,
    /// The key-encryption key its data key is wrapped under.
    pub kek_id: String,
    /// A compacted split: the publisher's splits whose records it holds.
    /// Once it is listed they are never searched, and its publisher
    /// deletes them a grace period later.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<String>,
    /// A compacted split: the publisher's index segments whose records it
    /// holds (a split that is not compacted holds its own segment's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covers: Vec<String>,
    /// A compacted split: when it was published, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_ns: Option<i64>,
}

impl Manifest {
    /// Whether a search over `tenants` from `from_ns` to `to_ns` may match
    /// any of its records.
    fn may_match(&self, tenants: &[String], from_ns: Option<i64>, to_ns: Option<i64>) -> bool {
        let in_time =
            from_ns.is_none_or(|from| self.last_ns >= from) && to_ns.is_none_or(|to| self.first_ns < to);
        let in_tenants = self.tenants.is_empty() || self.tenants.iter().any(|t| tenants.contains(t));
        in_time && in_tenants
    }

    /// Records older than this are past the publisher's retention.
    fn not_before(&self) -> Option<i64> {
        let ms = i64::try_from(self.retention_ms?).ok()?;
        Some(crate::time::now_ns().saturating_sub(ms.saturating_mul(1_000_000)))
    }

    /// Decodes a manifest read from `key` and checks it names itself there.
    fn decode(bytes: &[u8], key: &str) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if manifest.version != MANIFEST_VERSION {
            return Err(format!("version {} is not {MANIFEST_VERSION}", manifest.version));
        }
        if !logvault_storage::archive::valid_part(&manifest.collector) || !valid_segment(&manifest.segment) {
            return Err("bad collector or segment".into());
        }
        if key != manifest_key(&manifest.collector, &manifest.segment)
            || manifest.split != split_key(&manifest.collector, &manifest.segment)
        {
            return Err("it names another split".into());
        }
        if manifest.tenants.len() > MAX_TENANTS
            || manifest.bytes > MAX_SPLIT
            || manifest.covers.len() > MAX_COVERS
            || manifest.replaces.len() > MAX_COVERS
        {
            return Err("over the caps".into());
        }
        if !manifest.replaces.iter().chain(&manifest.covers).all(|id| valid_segment(id))
            || manifest.replaces.contains(&manifest.segment)
        {
            return Err("it replaces or covers a bad segment".into());
        }
        Ok(manifest)
    }

    /// The publisher's index segments whose records it holds.
    fn covered(&self) -> impl Iterator<Item = &String> {
        self.covers.iter().chain(self.covers.is_empty().then_some(&self.segment))
    }
}

/// The manifests among `manifests` that no other one of the same
/// collector replaces: what a search reads.
fn live<'a>(manifests: impl Iterator<Item = &'a Manifest> + Clone) -> Vec<&'a Manifest> {
    let replaced: HashSet<(&str, &str)> = manifests
        .clone()
        .flat_map(|m| m.replaces.iter().map(move |r| (m.collector.as_str(), r.as_str())))
        .collect();
    manifests.filter(|m| !replaced.contains(&(m.collector.as_str(), m.segment.as_str()))).collect()
}

/// The segment id of the split compacted from `olds`: 32 hex digits of
/// SHA-256 over their ids, so the same inputs always make the same keys.
fn compacted_id(olds: &[Manifest]) -> String {
    let mut ids: Vec<&str> = olds.iter().map(|m| m.segment.as_str()).collect();
    ids.sort_unstable();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"logvault compacted split\n");
    for id in ids {
        context.update(id.as_bytes());
        context.update(b"\n");
    }
    crate::cluster::hex(&context.finish().as_ref()[..16])
}

/// A split's size class for compaction: splits of one class are merged
/// together, so each record is rewritten about log8(size) times.
fn tier(bytes: u64) -> u32 {
    let mut tier = 0;
    let mut limit = COMPACT_BASE;
    while bytes >= limit {
        tier += 1;
        limit = limit.saturating_mul(8);
    }
    tier
}

fn valid_segment(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn split_key(collector: &str, segment: &str) -> String {
    format!("splits/{collector}/{segment}.split")
}

fn manifest_key(collector: &str, segment: &str) -> String {
    format!("manifests/{collector}/{segment}.json")
}

/// The merge policy of a collector that publishes: the usual one, on the
/// segments not yet published, and no merge at all while a split is made.
#[derive(Debug)]
pub(crate) struct PublishingPolicy {
    inner: LogMergePolicy,
    frozen: Arc<Mutex<HashSet<SegmentId>>>,
    publishing: Arc<AtomicBool>,
}

impl MergePolicy for PublishingPolicy {
    fn compute_merge_candidates(&self, segments: &[SegmentMeta]) -> Vec<MergeCandidate> {
        if self.publishing.load(Ordering::Acquire) {
            return Vec::new();
        }
        let frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        let open: Vec<SegmentMeta> = segments.iter().filter(|s| !frozen.contains(&s.id())).cloned().collect();
        drop(frozen);
        self.inner.compute_merge_candidates(&open)
    }
}

/// A split open on its object in the bucket.
struct Cached {
    reader: IndexReader,
    directory: remote::SplitDirectory,
    used: Instant,
}

/// Settings of [`Splits`].
#[derive(Debug, Clone)]
pub struct SplitsConfig {
    /// This collector's name.
    pub collector: String,
    /// Publish at most this often.
    pub publish_interval: Duration,
    /// List the others' manifests this often.
    pub poll_interval: Duration,
    /// The cache's size cap, bytes.
    pub cache_bytes: u64,
    /// Where the cache lives.
    pub cache_dir: PathBuf,
    /// This collector's splits whose newest record is older than this are
    /// deleted from the bucket (`index.retention_ms`); None keeps them.
    pub retention: Option<Duration>,
    /// Merge this many of this collector's splits of one size class into
    /// one; below 2, never.
    pub compact_splits: usize,
    /// Splits replaced by a compacted one are deleted this long after it
    /// is published (searches that opened them before finish first).
    pub compact_grace: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct SplitStats {
    /// Splits this collector published.
    pub published: AtomicU64,
    /// Publishing attempts that failed.
    pub publish_failures: AtomicU64,
    /// Other collectors' splits known.
    pub known: AtomicU64,
    /// Splits opened.
    pub opened: AtomicU64,
    /// Ranged reads of split objects.
    pub range_reads: AtomicU64,
    /// Bytes fetched by them.
    pub fetched_bytes: AtomicU64,
    /// Splits found open already.
    pub cache_hits: AtomicU64,
    /// Splits left out of searches because they could not be read.
    pub unreadable: AtomicU64,
    /// This collector's splits replaced by compacted ones.
    pub compacted: AtomicU64,
}

/// One other collector's split, ready to search: its searcher, and the time
/// before which its publisher no longer keeps records.
pub(crate) struct RemoteSplit {
    pub(crate) searcher: Searcher,
    pub(crate) not_before: Option<i64>,
    /// Its name in the cache.
    name: String,
    /// Its object's key.
    pub(crate) key: String,
}

/// Clears the publishing flags when the publishing thread ends, even by a panic.
struct Publishing(Arc<Splits>);

impl Drop for Publishing {
    fn drop(&mut self) {
        self.0.publishing.store(false, Ordering::Release);
        self.0.busy.store(false, Ordering::Release);
    }
}

/// A collector's view of the splits in the shared bucket.
pub struct Splits {
    store: Archive,
    config: SplitsConfig,
    kek: Kek,
    keyring: Keyring,
    runtime: tokio::runtime::Handle,
    frozen: Arc<Mutex<HashSet<SegmentId>>>,
    /// No merge starts while set (a split being merged, or the index being
    /// rebuilt up to what was published).
    publishing: Arc<AtomicBool>,
    /// A publishing thread runs.
    busy: AtomicBool,
    last_publish: Mutex<Instant>,
    /// A merged, frozen segment not published yet (an upload failed), with
    /// its WAL position; and when to try again.
    pending: Mutex<Option<(SegmentMeta, u64)>>,
    retry_at: Mutex<Instant>,
    /// When to try compacting again after a failure.
    compact_retry_at: Mutex<Instant>,
    /// While the index is behind it: the newest WAL position published.
    resync_to: AtomicU64,
    /// Splits that could not be read, and when.
    failed: Mutex<HashMap<String, Instant>>,
    /// Our schema: a split must have the same.
    schema: tantivy::schema::Schema,
    /// Other collectors' manifests, by manifest key.
    catalog: RwLock<BTreeMap<String, Manifest>>,
    /// This collector's manifests, by manifest key.
    own: Mutex<BTreeMap<String, Manifest>>,
    cache: Mutex<HashMap<String, Cached>>,
    /// Names the cache files, so a split opened again never shares one
    /// with an earlier opening still in use.
    openings: AtomicU64,
    /// Counters.
    pub stats: Arc<SplitStats>,
}

impl std::fmt::Debug for Splits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splits").field("collector", &self.config.collector).finish_non_exhaustive()
    }
}

impl Splits {
    /// Splits in `store`; reads this collector's own manifests back first.
    pub async fn open(
        store: Archive,
        config: SplitsConfig,
        kek: Kek,
        keyring: Keyring,
        schema: tantivy::schema::Schema,
    ) -> Result<Arc<Splits>, String> {
        // What earlier runs cached is fetched again as needed: the cache's
        // size is then all this run's.
        let _ = std::fs::remove_dir_all(&config.cache_dir);
        std::fs::create_dir_all(&config.cache_dir)
            .map_err(|e| format!("{}: {e}", config.cache_dir.display()))?;
        let prefix = format!("manifests/{}/", config.collector);
        let mut frozen = HashSet::new();
        let mut own = BTreeMap::new();
        let mut listed = HashSet::new();
        for (key, _) in store.list(&prefix).await.map_err(|e| e.to_string())? {
            listed.insert(key.clone());
            let segment = key.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".json"));
            if let Some(id) = segment.and_then(|s| SegmentId::from_uuid_string(s).ok()) {
                frozen.insert(id);
            }
            let read = match store.get_tagged(&key, MAX_MANIFEST).await {
                Ok(read) => read,
                // Unreadable as a manifest; its own segment stays frozen.
                Err(err @ logvault_storage::archive::ArchiveError::OverCap { .. }) => {
                    tracing::warn!(key, error = %err, "own split manifest over the cap; its segment stays frozen");
                    continue;
                }
                // Any other failure: what is frozen must be known whole.
                Err(err) => return Err(err.to_string()),
            };
            match read.map(|(bytes, _)| Manifest::decode(&bytes, &key)) {
                Some(Ok(manifest)) => {
                    // A compacted split's segments stay frozen: their
                    // records are published.
                    frozen.extend(manifest.covered().filter_map(|id| SegmentId::from_uuid_string(id).ok()));
                    own.insert(key, manifest);
                }
                Some(Err(err)) => {
                    tracing::warn!(key, error = %err, "own split manifest unreadable; its segment stays frozen")
                }
                None => {}
            }
        }
        tracing::info!(published = frozen.len(), "own splits read back from the shared bucket");
        // Split objects with no manifest (an upload cut short before its
        // manifest was written) are never read: deleted.
        let splits_prefix = format!("splits/{}/", config.collector);
        for (key, _) in store.list(&splits_prefix).await.map_err(|e| e.to_string())? {
            let segment = key.strip_prefix(&splits_prefix).and_then(|rest| rest.strip_suffix(".split"));
            if segment.is_some_and(|segment| !listed.contains(&manifest_key(&config.collector, segment))) {
                tracing::info!(key, "split without a manifest deleted");
                store.delete(&key).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(Arc::new(Splits {
            store,
            config,
            kek,
            keyring,
            runtime: tokio::runtime::Handle::current(),
            frozen: Arc::new(Mutex::new(frozen)),
            publishing: Arc::new(AtomicBool::new(false)),
            busy: AtomicBool::new(false),
            last_publish: Mutex::new(Instant::now()),
            pending: Mutex::new(None),
            retry_at: Mutex::new(Instant::now()),
            compact_retry_at: Mutex::new(Instant::now()),
            resync_to: AtomicU64::new(0),
            failed: Mutex::new(HashMap::new()),
            schema,
            catalog: RwLock::new(BTreeMap::new()),
            own: Mutex::new(own),
            cache: Mutex::new(HashMap::new()),
            openings: AtomicU64::new(0),
            stats: Arc::default(),
        }))
    }

    /// The merge policy the index writer must use.
    pub(crate) fn merge_policy(&self) -> PublishingPolicy {
        let mut inner = LogMergePolicy::default();
        inner.set_del_docs_ratio_before_merge(0.3);
        PublishingPolicy { inner, frozen: self.frozen.clone(), publishing: self.publishing.clone() }
    }

    /// The tag in the top 16 bits of this collector's record ids.
    pub(crate) fn id_base(&self) -> u64 {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.config.collector.as_bytes());
        u64::from(u16::from_be_bytes([digest.as_ref()[0], digest.as_ref()[1]])) << ID_TAG_SHIFT
    }

    /// Called with the index's committed WAL position before the indexer
    /// starts: when the index is behind what this collector published, it
    /// must be rebuilt up to there (with no merge) and frozen, not
    /// published again. Returns the position to index up to first, if any.
    pub(crate) fn resync(&self, committed: u64, durable: u64) -> Option<u64> {
        let published =
            self.own.lock().unwrap_or_else(|e| e.into_inner()).values().map(|m| m.wal_to).max()?;
        if committed >= published {
            return None;
        }
        let to = if published > durable {
            tracing::error!(
                published,
                wal_end = durable,
                "the wal ends before what this collector published (a restored data directory?); the records in between are searchable from its splits only on the other collectors"
            );
            durable
        } else {
            published
        };
        tracing::warn!(
            from = committed,
            to,
            "index behind what this collector published: rebuilding it up to there without publishing it again"
        );
        self.publishing.store(true, Ordering::Release);
        self.resync_to.store(to.max(1), Ordering::Release);
        Some(to)
    }

    /// While the index is being rebuilt: the WAL position to stop at.
    pub(crate) fn resync_to(&self) -> Option<u64> {
        Some(self.resync_to.load(Ordering::Acquire)).filter(|&to| to > 0)
    }

    /// After a commit (or a quiet moment), on the indexer thread: when it
    /// is time, merges the committed segments not yet published into one
    /// and publishes it on a thread of its own.
    pub(crate) fn after_commit(self: &Arc<Self>, index: &LogIndex, writer: &mut IndexWriter<Queued>) {
        if let Some(to) = self.resync_to() {
            if index.committed_position() >= to {
                // Everything indexed now was published before: frozen as such.
                match index.index.searchable_segment_metas() {
                    Ok(metas) => {
                        self.frozen
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(metas.iter().map(|m| m.id()));
                        self.resync_to.store(0, Ordering::Release);
                        self.publishing.store(false, Ordering::Release);
                        tracing::info!(to, "index rebuilt up to what was published");
                    }
                    Err(err) => tracing::warn!(error = %err, "index segments unreadable; freezing later"),
                }
            }
            return;
        }
        if self.busy.load(Ordering::Acquire)
            || Instant::now() < *self.retry_at.lock().unwrap_or_else(|e| e.into_inner())
        {
            return;
        }
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((meta, wal_to)) = pending {
            // An upload that failed: the same segment again.
            self.busy.store(true, Ordering::Release);
            let (splits, dir) = (Arc::clone(self), index.path.clone());
            let spawned = std::thread::Builder::new().name("logvault-publish".into()).spawn(move || {
                let guard = Publishing(splits);
                guard.0.upload(&dir, meta, wal_to);
            });
            if spawned.is_err() {
                self.busy.store(false, Ordering::Release);
            }
            return;
        }
        if self.last_publish.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
            < self.config.publish_interval
        {
            self.start_compaction();
            return;
        }
        // The committed segments and the WAL position they cover, as one.
        let metas = match index.index.load_metas() {
            Ok(metas) => metas,
            Err(err) => {
                tracing::warn!(error = %err, "index segments unreadable; publishing later");
                return;
            }
        };
        let wal_to =
            metas.payload.as_deref().and_then(crate::index::IndexedUpTo::parse).map_or(0, |up| up.position);
        let ids: Vec<SegmentId> = {
            let frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
            metas
                .segments
                .iter()
                .filter(|m| !frozen.contains(&m.id()) && m.num_docs() > 0)
                .map(|m| m.id())
                .collect()
        };
        if ids.is_empty() {
            *self.last_publish.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            return;
        }
        // No merge starts from here until the merged segment is frozen; one
        // already running on any of these makes this merge fail, and the
        // next commit tries again.
        self.publishing.store(true, Ordering::Release);
        self.busy.store(true, Ordering::Release);
        let merging = writer.merge(&ids);
        let (splits, dir) = (Arc::clone(self), index.path.clone());
        let spawned = std::thread::Builder::new().name("logvault-publish".into()).spawn(move || {
            let guard = Publishing(splits);
            let splits = &guard.0;
            match merging.wait() {
                Ok(Some(meta)) => {
                    splits.frozen.lock().unwrap_or_else(|e| e.into_inner()).insert(meta.id());
                    splits.publishing.store(false, Ordering::Release);
                    splits.upload(&dir, meta, wal_to);
                }
                Ok(None) => {}
                Err(err) => tracing::debug!(error = %err, "segments busy in a merge; publishing after the next commit"),
            }
        });
        if spawned.is_err() {
            self.publishing.store(false, Ordering::Release);
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Compacts this collector's splits on a thread of its own, when some
    /// are due and nothing else is being published.
    fn start_compaction(self: &Arc<Self>) {
        if Instant::now() < *self.compact_retry_at.lock().unwrap_or_else(|e| e.into_inner()) {
            return;
        }
        let Some(olds) = self.compaction() else { return };
        self.busy.store(true, Ordering::Release);
        let splits = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("logvault-compact".into()).spawn(move || {
            let guard = Publishing(splits);
            let splits = &guard.0;
            let records: u64 = olds.iter().map(|m| m.records).sum();
            match splits.compact(&olds) {
                Ok(manifest) => {
                    splits.stats.compacted.fetch_add(olds.len() as u64, Ordering::Relaxed);
                    tracing::info!(split = %manifest.split, replaced = olds.len(), records, bytes = manifest.bytes, "splits compacted");
                }
                Err(err) => {
                    *splits.compact_retry_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Instant::now() + Duration::from_secs(60);
                    tracing::warn!(error = %err, "compacting splits failed; trying again in a minute");
                }
            }
        });
        if spawned.is_err() {
            self.busy.store(false, Ordering::Release);
        }
    }

    /// Publishes a frozen segment; on failure keeps it pending, to be tried
    /// again (the same segment, the same keys) a little later.
    fn upload(&self, dir: &Path, meta: SegmentMeta, wal_to: u64) {
        match self.publish(dir, &meta, wal_to) {
            Ok(()) => {
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                *self.last_publish.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            }
            Err(err) => {
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((meta, wal_to));
                *self.retry_at.lock().unwrap_or_else(|e| e.into_inner()) =
                    Instant::now() + Duration::from_secs(5);
                self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "publishing a split failed; trying the same one again in 5 s");
            }
        }
    }

    /// Packages, seals and uploads one segment of the index in `dir`, then
    /// its manifest; the segment is frozen once the manifest is written.
    fn publish(&self, dir: &Path, meta: &SegmentMeta, wal_to: u64) -> Result<(), String> {
        self.publish_as(dir, meta, &meta.id().uuid_string(), wal_to, None).map(|_| ())
    }

    /// As [`Splits::publish`], as segment `segment`; a compacted split
    /// names the splits it replaces and the index segments it covers.
    fn publish_as(
        &self,
        dir: &Path,
        meta: &SegmentMeta,
        segment: &str,
        wal_to: u64,
        compacted: Option<(Vec<String>, Vec<String>)>,
    ) -> Result<Manifest, String> {
        let segment = segment.to_owned();
        let package = package_segment(dir, meta, &segment)?;
        if package.len() as u64 > MAX_SPLIT / 2 {
            return Err(format!("a split of {} bytes is over the cap", package.len()));
        }
        // What it holds, read from the split itself.
        let scratch = self.config.cache_dir.join(format!("own-{segment}.tmp"));
        unpack(&package, &scratch)?;
        let facts = split_facts(&scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        let (tenants, first_ns, last_ns, records) = facts?;
        let header = SegmentHeader {
            algorithm: segment::ALGORITHM_AES256GCM,
            chunk_size: segment::DEFAULT_CHUNK,
            segment_id: segment.clone(),
            collector: self.config.collector.clone(),
            tenant: "_splits".into(),
            host: self.config.collector.clone(),
            first_ns,
            last_ns,
            created_ns: crate::time::now_ns(),
            batches: 0,
            records,
            raw_len: package.len() as u64,
            signers: Vec::new(),
        };
        let sealed = segment::seal_compressed(header, &package, &self.kek);
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            collector: self.config.collector.clone(),
            segment: segment.clone(),
            split: split_key(&self.config.collector, &segment),
            tenants,
            first_ns,
            last_ns,
            records,
            wal_to,
            retention_ms: self.config.retention.map(|r| r.as_millis().min(u128::from(u64::MAX)) as u64),
            bytes: sealed.bytes.len() as u64,
            sha256: crate::cluster::hex(ring::digest::digest(&ring::digest::SHA256, &sealed.bytes).as_ref()),
            kek_id: self.kek.id().to_owned(),
            published_ns: compacted.is_some().then(crate::time::now_ns),
            replaces: Vec::new(),
            covers: Vec::new(),
        };
        let manifest = match compacted {
            Some((replaces, covers)) => Manifest { replaces, covers, ..manifest },
            None => manifest,
        };
        let mut manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        if manifest_bytes.len() as u64 > MAX_MANIFEST {
            // Too many tenants to list within the cap: listed as none (read
            // for every tenant).
            let manifest = Manifest { tenants: Vec::new(), ..manifest.clone() };
            manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
            if manifest_bytes.len() as u64 > MAX_MANIFEST {
                return Err(format!("a manifest of {} bytes is over the cap", manifest_bytes.len()));
            }
        }
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|e| e.to_string())?;
        self.runtime.block_on(async {
            self.store.put_verified(&manifest.split, &sealed.bytes).await.map_err(|e| e.to_string())?;
            self.store
                .put_verified(&manifest_key(&manifest.collector, &segment), &manifest_bytes)
                .await
                .map_err(|e| e.to_string())
        })?;
        tracing::info!(split = %manifest.split, records, bytes = manifest.bytes, "split published");
        let key = manifest_key(&manifest.collector, &segment);
        self.own.lock().unwrap_or_else(|e| e.into_inner()).insert(key, manifest.clone());
        Ok(manifest)
    }

    /// This collector's splits to compact now, if any: of its splits that
    /// no other replaces and that are under [`COMPACT_MAX_INPUT`], the
    /// oldest `compact_splits` of the smallest size class that has that
    /// many, within [`MAX_COVERS`] segments together.
    fn compaction(&self) -> Option<Vec<Manifest>> {
        let fan_in = self.config.compact_splits;
        if fan_in < 2 {
            return None;
        }
        let own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        let mut classes: BTreeMap<u32, Vec<&Manifest>> = BTreeMap::new();
        for manifest in live(own.values()) {
            if manifest.bytes < COMPACT_MAX_INPUT && manifest.covered().count() < MAX_COVERS {
                classes.entry(tier(manifest.bytes)).or_default().push(manifest);
            }
        }
        for mut class in classes.into_values() {
            class.sort_by_key(|m| (m.first_ns, m.last_ns));
            let mut chosen = Vec::new();
            let (mut covers, mut bytes) = (0, 0);
            for manifest in class {
                let more = manifest.covered().count();
                if covers + more > MAX_COVERS || bytes + manifest.bytes > COMPACT_MAX_OUTPUT {
                    continue;
                }
                covers += more;
                bytes += manifest.bytes;
                chosen.push(manifest.clone());
                if chosen.len() == fan_in {
                    return Some(chosen);
                }
            }
        }
        None
    }

    /// Merges `olds`, this collector's splits, into one split that replaces
    /// them: each is read from the bucket whole, unpacked into a scratch
    /// index, and the segments merged there; the local index is not
    /// touched. The replaced splits are deleted a grace period later, by
    /// [`Splits::expire`]. Blocking.
    fn compact(&self, olds: &[Manifest]) -> Result<Manifest, String> {
        let n = self.openings.fetch_add(1, Ordering::Relaxed);
        let scratch = self.config.cache_dir.join(format!("compact-{n}.tmp"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        let cleanup = remote::Cleanup(scratch.clone());
        let mut index_meta: Option<serde_json::Value> = None;
        let mut segments = Vec::new();
        for old in olds {
            let object = remote::SplitObject::open(
                self.store.clone(),
                self.runtime.clone(),
                &self.keyring,
                old,
                self.stats.clone(),
            )?;
            let package = object.read_all().map_err(|e| e.to_string())?;
            for (name, data) in decode_package(&package)? {
                if name == "meta.json" {
                    let meta: serde_json::Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
                    segments.extend(meta["segments"].as_array().cloned().unwrap_or_default());
                    index_meta.get_or_insert(meta);
                } else {
                    std::fs::write(scratch.join(&name), data).map_err(|e| format!("{name}: {e}"))?;
                }
            }
        }
        let mut index_meta = index_meta.ok_or("no split to compact")?;
        index_meta["segments"] = serde_json::Value::Array(segments);
        std::fs::write(
            scratch.join("meta.json"),
            serde_json::to_vec(&index_meta).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let index = Index::open_in_dir(&scratch).map_err(|e| e.to_string())?;
        crate::index::register_tokenizers(&index);
        if index.schema() != self.schema {
            return Err("a split to compact has another schema".into());
        }
        let ids: Vec<SegmentId> = index.searchable_segment_ids().map_err(|e| e.to_string())?;
        if ids.len() != olds.len() {
            return Err(format!("{} segments in {} splits", ids.len(), olds.len()));
        }
        let mut writer: IndexWriter =
            index.writer_with_num_threads(1, 50_000_000).map_err(|e| e.to_string())?;
        let merged = writer.merge(&ids).wait().map_err(|e| e.to_string())?.ok_or("the merge made nothing")?;
        writer.wait_merging_threads().map_err(|e| e.to_string())?;
        let wal_to = olds.iter().map(|m| m.wal_to).max().unwrap_or(0);
        // It replaces its inputs, and what they replace that is not
        // deleted yet: whatever is deleted first, nothing it holds is ever
        // searched twice.
        let mut replaces: Vec<String> = {
            let own = self.own.lock().unwrap_or_else(|e| e.into_inner());
            let existing: HashSet<&String> = own.values().map(|m| &m.segment).collect();
            olds.iter()
                .flat_map(|m| {
                    std::iter::once(&m.segment).chain(m.replaces.iter().filter(|r| existing.contains(r)))
                })
                .cloned()
                .collect()
        };
        replaces.sort();
        replaces.dedup();
        let mut covers: Vec<String> = olds.iter().flat_map(|m| m.covered().cloned()).collect();
        covers.sort();
        covers.dedup();
        if replaces.len() > MAX_COVERS {
            return Err(format!("{} splits to replace, over the cap", replaces.len()));
        }
        // Its id follows from its inputs: a retry writes the same keys.
        let segment = compacted_id(olds);
        let published = self.publish_as(&scratch, &merged, &segment, wal_to, Some((replaces, covers)));
        drop(cleanup);
        match published {
            Ok(manifest) => Ok(manifest),
            // The manifest may have landed though the call failed: then it
            // stands (known, so its inputs are not merged again elsewhere).
            Err(err) => {
                let key = manifest_key(&self.config.collector, &segment);
                let landed = self.runtime.block_on(self.store.get_tagged(&key, MAX_MANIFEST));
                match landed.ok().flatten().map(|(bytes, _)| Manifest::decode(&bytes, &key)) {
                    Some(Ok(manifest)) => {
                        self.own.lock().unwrap_or_else(|e| e.into_inner()).insert(key, manifest.clone());
                        Ok(manifest)
                    }
                    _ => Err(err),
                }
            }
        }
    }

    /// Lists the other collectors' manifests, and deletes this
    /// collector's splits past retention, until `cancel` fires.
    pub async fn follow(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            if let Err(err) = self.poll().await {
                tracing::warn!(error = %err, "listing the other collectors' splits failed; retrying");
            }
            if let Err(err) = self.expire().await {
                tracing::warn!(error = %err, "deleting splits past retention failed; retrying");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// Deletes this collector's splits whose records are all past
    /// retention: the manifest first, so no search looks for the object.
    pub async fn expire(&self) -> Result<(), String> {
        let cutoff = match self.config.retention {
            Some(retention) => {
                crate::time::now_ns().saturating_sub(retention.as_nanos().min(i64::MAX as u128) as i64)
            }
            None => i64::MIN,
        };
        let grace = self.config.compact_grace.as_nanos().min(i64::MAX as u128) as i64;
        let replaced_before = crate::time::now_ns().saturating_sub(grace);
        let expired: Vec<(String, Manifest)> = {
            let own = self.own.lock().unwrap_or_else(|e| e.into_inner());
            // Splits replaced by a compacted one published long enough ago.
            let replaced: HashSet<&String> = own
                .values()
                .filter(|m| m.published_ns.is_some_and(|at| at < replaced_before))
                .flat_map(|m| &m.replaces)
                .collect();
            own.iter()
                .filter(|(_, m)| m.last_ns < cutoff || replaced.contains(&m.segment))
                .map(|(k, m)| (k.clone(), m.clone()))
                .collect()
        };
        for (key, manifest) in expired {
            self.store.delete(&key).await.map_err(|e| e.to_string())?;
            self.store.delete(&manifest.split).await.map_err(|e| e.to_string())?;
            self.own.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            let why =
                if manifest.last_ns < cutoff { "past retention" } else { "replaced by a compacted split" };
            tracing::info!(split = %manifest.split, why, "split deleted");
        }
        Ok(())
    }

    /// Reads the manifests not known yet; forgets the ones gone.
    pub async fn poll(self: &Arc<Self>) -> Result<(), String> {
        let listed = self.store.list("manifests/").await.map_err(|e| e.to_string())?;
        let own = format!("manifests/{}/", self.config.collector);
        let listed: HashSet<String> =
            listed.into_iter().map(|(key, _)| key).filter(|key| !key.starts_with(&own)).collect();
        let new: Vec<String> = {
            let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            listed.iter().filter(|key| !catalog.contains_key(*key)).cloned().collect()
        };
        let mut read = Vec::new();
        for key in new {
            // One unreadable manifest does not hold the others back.
            match self.store.get_tagged(&key, MAX_MANIFEST).await {
                Ok(Some((bytes, _))) => match Manifest::decode(&bytes, &key) {
                    Ok(manifest) => read.push((key, manifest)),
                    Err(err) => tracing::warn!(key, error = %err, "split manifest refused"),
                },
                Ok(None) => {}
                Err(err) => tracing::warn!(key, error = %err, "split manifest unreadable; trying again"),
            }
        }
        let mut gone = Vec::new();
        {
            let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
            catalog.retain(|key, manifest| {
                let keep = listed.contains(key);
                if !keep {
                    gone.push(cache_name(manifest));
                }
                keep
            });
            catalog.extend(read);
            self.stats.known.store(catalog.len() as u64, Ordering::Relaxed);
        }
        // Splits deleted by their collector (retention) leave the cache too;
        // their cache files go when the last search using them ends.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        for name in gone {
            cache.remove(&name);
        }
        Ok(())
    }

    /// The other collectors' splits that may match, opened as needed;
    /// one that cannot be opened is left out (logged, counted) and tried
    /// again a minute later. Blocking.
    pub(crate) fn searchers(
        &self,
        tenants: &[String],
        from_ns: Option<i64>,
        to_ns: Option<i64>,
    ) -> Vec<RemoteSplit> {
        self.trim_cache(None);
        // A split that failed lately is left out, and the splits it
        // replaces, if still there, are searched in its place.
        let wanted: Vec<(Manifest, String)> = {
            let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
            let readable = catalog.values().filter(|m| {
                failed.get(&cache_name(m)).is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
            });
            live(readable)
                .into_iter()
                .filter(|m| m.may_match(tenants, from_ns, to_ns))
                .map(|manifest| (manifest.clone(), cache_name(manifest)))
                .collect()
        };
        // Splits not open yet are opened several at once: each waits on
        // the store for a few small reads.
        let closed = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            wanted.iter().filter(|(_, name)| !cache.contains_key(name)).count()
        };
        let threads = closed.clamp(1, OPENING_THREADS);
        let per_thread = wanted.len().div_ceil(threads).max(1);
        let opened: Vec<Result<Searcher, String>> = if threads == 1 {
            wanted.iter().map(|(manifest, name)| self.searcher(manifest, name)).collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = wanted
                    .chunks(per_thread)
                    .map(|part| {
                        scope.spawn(move || {
                            part.iter()
                                .map(|(manifest, name)| self.searcher(manifest, name))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                    .collect()
            })
        };
        let mut out = Vec::with_capacity(wanted.len());
        for ((manifest, name), opened) in wanted.into_iter().zip(opened) {
            match opened {
                Ok(searcher) => out.push(RemoteSplit {
                    searcher,
                    not_before: manifest.not_before(),
                    name,
                    key: manifest.split,
                }),
                Err(err) => self.unreadable(&name, &manifest.split, &err),
            }
        }
        out
    }

    /// Leaves a split out of searches for a minute, and out of the cache.
    /// Its manifest leaves the catalog too, to be read again at the next
    /// listing (a split published again after a failed attempt); while it
    /// is out, the splits it replaces, if still there, are searched.
    fn unreadable(&self, name: &str, key: &str, err: &str) {
        self.stats.unreadable.fetch_add(1, Ordering::Relaxed);
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), Instant::now());
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.catalog.write().unwrap_or_else(|e| e.into_inner()).retain(|_, m| m.split != key);
        tracing::error!(split = %key, error = %err, "split unreadable: left out of searches, tried again in a minute");
    }

    /// A read of `split` failed during a search: it is left out of
    /// searches for a minute.
    pub(crate) fn failed_during_search(&self, split: &RemoteSplit, err: &str) {
        self.unreadable(&split.name, &split.key, err);
    }

    /// Bytes of other collectors' splits in the cache.
    pub fn cache_bytes(&self) -> u64 {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|c| c.directory.cached_bytes())
            .sum()
    }

    /// Drops the least recently used splits (but `keep`) until what the
    /// cache holds is under its cap. A search still using one keeps its
    /// file until it ends.
    fn trim_cache(&self, keep: Option<&str>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        while cache.values().map(|c| c.directory.cached_bytes()).sum::<u64>() > self.config.cache_bytes {
            let Some(oldest) = cache
                .iter()
                .filter(|(other, _)| Some(other.as_str()) != keep)
                .min_by_key(|(_, c)| c.used)
                .map(|(other, _)| other.clone())
            else {
                break;
            };
            cache.remove(&oldest);
        }
    }

    fn searcher(&self, manifest: &Manifest, name: &str) -> Result<Searcher, String> {
        if let Some(cached) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get_mut(name) {
            cached.used = Instant::now();
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(cached.reader.searcher());
        }
        let opening = self.openings.fetch_add(1, Ordering::Relaxed);
        let object = remote::SplitObject::open(
            self.store.clone(),
            self.runtime.clone(),
            &self.keyring,
            manifest,
            self.stats.clone(),
        )?;
        let directory =
            remote::SplitDirectory::open(object, self.config.cache_dir.join(format!("{name}.{opening}")))?;
        let reader = Index::open(directory.clone())
            .and_then(|index| {
                crate::index::register_tokenizers(&index);
                index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()
            })
            .map_err(|e| format!("split {}: {e}", manifest.split))?;
        if reader.searcher().schema() != &self.schema {
            return Err(format!("split {} has another schema", manifest.split));
        }
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        let searcher = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            // Opened by another search meanwhile: that one is used.
            let cached =
                cache.entry(name.to_owned()).or_insert(Cached { reader, directory, used: Instant::now() });
            cached.used = Instant::now();
            cached.reader.searcher()
        };
        self.trim_cache(Some(name));
        Ok(searcher)
    }
}

/// The package of one segment of the index in `dir`: its files, and an
/// index meta naming it alone, under the id `as_id`.
fn package_segment(dir: &Path, meta: &SegmentMeta, as_id: &str) -> Result<Vec<u8>, String> {
    let segment = meta.id().uuid_string();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(extension) = name.strip_prefix(&format!("{segment}.")).filter(|_| !name.ends_with(".del"))
        {
            files.push((
                format!("{as_id}.{extension}"),
                std::fs::read(entry.path()).map_err(|e| e.to_string())?,
            ));
        }
    }
    let index_meta = std::fs::read(dir.join("meta.json")).map_err(|e| e.to_string())?;
    let mut index_meta: serde_json::Value = serde_json::from_slice(&index_meta).map_err(|e| e.to_string())?;
    let mut segment_meta = serde_json::to_value(meta).map_err(|e| e.to_string())?;
    segment_meta["deletes"] = serde_json::Value::Null;
    segment_meta["segment_id"] = serde_json::Value::String(as_id.to_owned());
    index_meta["segments"] = serde_json::json!([segment_meta]);
    if let Some(object) = index_meta.as_object_mut() {
        object.remove("payload");
    }
    files.push(("meta.json".into(), serde_json::to_vec(&index_meta).map_err(|e| e.to_string())?));
    files.sort();
    Ok(encode_package(&files))
}

/// A split's directory name in the cache.
fn cache_name(manifest: &Manifest) -> String {
    format!("{}-{}", manifest.collector, manifest.segment)
}

/// A package: `LVSP | version u8 = 2 | the files' bytes, one after
/// another | table | table_len u32 | version u8 = 2 | LVSP`, the table
/// being `files u16 | (name u16+UTF-8 | offset u64 | len u64)*`. Its end
/// says where every file is, so a reader that starts there needs no other
/// byte before the files it reads.
fn encode_package(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let data: usize = files.iter().map(|(_, b)| b.len()).sum();
    let mut out =
        Vec::with_capacity(5 + data + files.iter().map(|(n, _)| n.len() + 18).sum::<usize>() + 2 + 9);
    out.extend_from_slice(PACKAGE_MAGIC);
    out.push(PACKAGE_VERSION);
    let mut table = Vec::new();
    table.extend_from_slice(&(files.len() as u16).to_be_bytes());
    for (name, bytes) in files {
        table.extend_from_slice(&(name.len() as u16).to_be_bytes());
        table.extend_from_slice(name.as_bytes());
        table.extend_from_slice(&(out.len() as u64).to_be_bytes());
        table.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(&table);
    out.extend_from_slice(&(table.len() as u32).to_be_bytes());
    out.push(PACKAGE_VERSION);
    out.extend_from_slice(PACKAGE_MAGIC);
    out
}

/// The table's length, from a package's last [`TRAILER`] bytes; None when
/// they are not a version 2 trailer (a version 1 package has none).
fn table_len(tail: &[u8]) -> Option<u32> {
    let [a, b, c, d, version, magic @ ..] = tail else { return None };
    (*version == PACKAGE_VERSION && magic == PACKAGE_MAGIC).then(|| u32::from_be_bytes([*a, *b, *c, *d]))
}

/// Whether `name` is a file a split holds: `meta.json`, or a segment file
/// (32 hex digits, a dot and a lower-case extension).
fn split_file_name(name: &str) -> bool {
    let segment_file = name.split_once('.').is_some_and(|(id, ext)| {
        valid_segment(id)
            && !ext.is_empty()
            && ext.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.')
    });
    name == "meta.json" || segment_file
}

/// The files a version 2 table lists, each name checked, the files lying
/// one after another from the package's fifth byte to `table_at`, where
/// the table starts.
fn decode_table(mut table: &[u8], table_at: u64) -> Result<Vec<(String, std::ops::Range<u64>)>, String> {
    let bad = |what: &str| Err(format!("split package table: {what}"));
    if table.len() as u64 > u64::from(MAX_TABLE) {
        return bad("too long");
    }
    let Some((count, rest)) = table.split_first_chunk::<2>() else { return bad("cut") };
    let count = u16::from_be_bytes(*count) as usize;
    if count > MAX_FILES {
        return bad("too many files");
    }
    table = rest;
    let mut files: Vec<(String, std::ops::Range<u64>)> = Vec::with_capacity(count);
    let mut next = PACKAGE_MAGIC.len() as u64 + 1;
    for _ in 0..count {
        let Some((len, rest)) = table.split_first_chunk::<2>() else { return bad("cut") };
        let Some((name, rest)) = rest.split_at_checked(u16::from_be_bytes(*len) as usize) else {
            return bad("cut");
        };
        let Ok(name) = std::str::from_utf8(name) else { return bad("a name is not UTF-8") };
        if !split_file_name(name) {
            return bad("a file name is not one a split has");
        }
        let Some((offset, rest)) = rest.split_first_chunk::<8>() else { return bad("cut") };
        let Some((len, rest)) = rest.split_first_chunk::<8>() else { return bad("cut") };
        let (offset, len) = (u64::from_be_bytes(*offset), u64::from_be_bytes(*len));
        let Some(end) = offset.checked_add(len).filter(|end| offset == next && *end <= table_at) else {
            return bad("a file is not where the one before it ends");
        };
        if files.iter().any(|(seen, _)| seen == name) {
            return bad("a file twice");
        }
        files.push((name.to_owned(), offset..end));
        next = end;
        table = rest;
    }
    if !table.is_empty() {
        return bad("bytes after the last file");
    }
    if next != table_at {
        return bad("bytes between the files and the table");
    }
    if !files.iter().any(|(name, _)| name == "meta.json") {
        return bad("no meta.json");
    }
    Ok(files)
}

/// The files of a whole package, version 1
/// (`LVSP | 1 | files u16 | (name u16+UTF-8 | len u64 | bytes)*`) or 2,
/// each name checked and each length checked against what is there before
/// anything is allocated.
fn decode_package(bytes: &[u8]) -> Result<Vec<(String, &[u8])>, String> {
    let bad = |what: &str| Err(format!("split package: {what}"));
    let Some(rest) = bytes.strip_prefix(PACKAGE_MAGIC.as_slice()) else { return bad("no magic") };
    match rest.first() {
        Some(1) => decode_package_v1(&rest[1..]),
        Some(&PACKAGE_VERSION) => {
            let Some(table_len) = bytes.len().checked_sub(TRAILER).and_then(|at| table_len(&bytes[at..]))
            else {
                return bad("no table at its end");
            };
            let Some(table_at) = (bytes.len() - TRAILER).checked_sub(table_len as usize) else {
                return bad("the table runs past the start");
            };
            let table = decode_table(&bytes[table_at..bytes.len() - TRAILER], table_at as u64)?;
            Ok(table
                .into_iter()
                .map(|(name, range)| (name, &bytes[range.start as usize..range.end as usize]))
                .collect())
        }
        _ => bad("unknown version"),
    }
}

fn decode_package_v1(bytes: &[u8]) -> Result<Vec<(String, &[u8])>, String> {
    let bad = |what: &str| Err(format!("split package: {what}"));
    let [a, b, rest @ ..] = bytes else { return bad("cut") };
    let count = u16::from_be_bytes([*a, *b]) as usize;
    if count > MAX_FILES {
        return bad("too many files");
    }
    let mut bytes = rest;
    let mut files = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((len, rest)) = bytes.split_first_chunk::<2>() else { return bad("cut") };
        let Some((name, rest)) = rest.split_at_checked(u16::from_be_bytes(*len) as usize) else {
            return bad("cut");
        };
        let Ok(name) = std::str::from_utf8(name) else { return bad("a name is not UTF-8") };
        if !split_file_name(name) {
            return bad("a file name is not one a split has");
        }
        let Some((len, rest)) = rest.split_first_chunk::<8>() else { return bad("cut") };
        let len = u64::from_be_bytes(*len);
        let Some((data, rest)) = usize::try_from(len).ok().and_then(|len| rest.split_at_checked(len)) else {
            return bad("a file runs past the end");
        };
        if files.iter().any(|(seen, _)| seen == name) {
            return bad("a file twice");
        }
        files.push((name.to_owned(), data));
        bytes = rest;
    }
    if !bytes.is_empty() {
        return bad("bytes after the last file");
    }
    if !files.iter().any(|(name, _)| name == "meta.json") {
        return bad("no meta.json");
    }
    Ok(files)
}

/// Writes a package's files into a fresh `dir`.
fn unpack(package: &[u8], dir: &Path) -> Result<(), String> {
    let files = decode_package(package)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, data) in files {
        let written = std::fs::File::create(dir.join(name)).and_then(|mut file| {
            std::io::Write::write_all(&mut file, data)?;
            file.sync_all()
        });
        written.map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Opens an unpacked split as an index of its own.
fn open_split(dir: &Path) -> tantivy::Result<IndexReader> {
    let index = Index::open_in_dir(dir)?;
    crate::index::register_tokenizers(&index);
    index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()
}

/// Tenants (when few enough), time range and records of an unpacked split.
fn split_facts(dir: &Path) -> Result<(Vec<String>, i64, i64, u64), String> {
    let reader = open_split(dir).map_err(|e| e.to_string())?;
    let searcher = reader.searcher();
    let schema = searcher.schema();
    let tenant = schema.get_field("tenant").map_err(|e| e.to_string())?;
    let (mut tenants, mut first, mut last, mut records) =
        (std::collections::BTreeSet::new(), i64::MAX, i64::MIN, 0u64);
    let mut too_many = false;
    for segment in searcher.segment_readers() {
        records += u64::from(segment.num_docs());
        let column = segment.fast_fields().date("timestamp").map_err(|e| e.to_string())?;
        if segment.num_docs() > 0 {
            first = first.min(column.min_value().into_timestamp_nanos());
            last = last.max(column.max_value().into_timestamp_nanos());
        }
        let inverted = segment.inverted_index(tenant).map_err(|e| e.to_string())?;
        let mut terms = inverted.terms().stream().map_err(|e| e.to_string())?;
        while terms.advance() {
            if tenants.len() == MAX_TENANTS {
                too_many = true;
                break;
            }
            tenants.insert(String::from_utf8_lossy(terms.key()).into_owned());
        }
    }
    if first > last {
        (first, last) = (0, 0);
    }
    let tenants = if too_many { Vec::new() } else { tenants.into_iter().collect() };
    Ok((tenants, first, last, records))
}

/// The manifest and package decoders on arbitrary bytes, for the fuzz
/// target: a manifest decodes only under its own key, and a package that
/// decodes re-encodes to the same bytes.
pub(crate) fn fuzz_decoders(data: &[u8]) {
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        let key = manifest_key(&manifest.collector, &manifest.segment);
        if let Ok(decoded) = Manifest::decode(data, &key) {
            assert_eq!(decoded, manifest);
        }
    }
    if let Ok(files) = decode_package(data) {
        let owned: Vec<(String, Vec<u8>)> = files.iter().map(|(n, d)| (n.clone(), d.to_vec())).collect();
        let encoded = encode_package(&owned);
        if data[4] == PACKAGE_VERSION {
            assert_eq!(encoded, data, "a package re-encodes");
        }
        let again = decode_package(&encoded).expect("what is written reads back");
        assert!(again.iter().map(|(n, d)| (n, *d)).eq(files.iter().map(|(n, d)| (n, *d))), "the same files");
        // Read from its end, as a search does, the table finds the same files.
        let end = encoded.len() - TRAILER;
        let table_at = end - table_len(&encoded[end..]).expect("a trailer") as usize;
        let table = decode_table(&encoded[table_at..end], table_at as u64).expect("the table reads");
        assert!(table.iter().zip(&files).all(|((n, r), (name, data))| {
            n == name && &encoded[r.start as usize..r.end as usize] == *data
        }));
    }
}

/// Seeds: a manifest and a small package.
pub(crate) fn fuzz_seeds() -> Vec<Vec<u8>> {
    let segment = "0123456789abcdef0123456789abcdef".to_owned();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        collector: "c2".into(),
        split: split_key("c2", &segment),
        segment: segment.clone(),
        tenants: vec!["acme".into()],
        first_ns: 1_700_000_000_000_000_000,
        last_ns: 1_700_000_060_000_000_000,
        records: 2000,
        wal_to: 1 << 20,
        retention_ms: Some(86_400_000),
        bytes: 123_456,
        sha256: "ab".repeat(32),
        kek_id: "k1".into(),
        replaces: Vec::new(),
        covers: Vec::new(),
        published_ns: None,
    };
    let package = encode_package(&[
        (format!("{segment}.idx"), vec![1, 2, 3]),
        (format!("{segment}.store"), vec![7; 64]),
        ("meta.json".into(), br#"{"segments":[]}"#.to_vec()),
    ]);
    vec![serde_json::to_vec(&manifest).expect("a manifest serializes"), package]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_reads_back_and_a_damaged_one_is_refused() {
        let segment = "0123456789abcdef0123456789abcdef";
        let files = vec![
            (format!("{segment}.idx"), vec![1, 2, 3]),
            (format!("{segment}.store"), vec![4; 1000]),
            ("meta.json".to_owned(), b"{}".to_vec()),
        ];
        let package = encode_package(&files);
        let back = decode_package(&package).unwrap();
        assert_eq!(back.len(), 3);
        for ((name, data), (want_name, want_data)) in back.iter().zip(&files) {
            assert_eq!((name.as_str(), *data), (want_name.as_str(), want_data.as_slice()));
        }
        for cut in 0..package.len() {
            assert!(decode_package(&package[..cut]).is_err(), "cut at {cut}");
        }
        for name in ["../etc/passwd", "meta.json/x", "0123.idx", "0123456789ABCDEF0123456789abcdef.idx", ""] {
            let bad = encode_package(&[(name.to_owned(), vec![1]), ("meta.json".into(), vec![])]);
            assert!(decode_package(&bad).is_err(), "{name}");
        }
        let twice = encode_package(&[("meta.json".into(), vec![]), ("meta.json".into(), vec![])]);
        assert!(decode_package(&twice).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_package_bytes_decode_or_are_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut input = PACKAGE_MAGIC.to_vec();
            input.push(PACKAGE_VERSION);
            input.extend_from_slice(&bytes);
            if let Ok(files) = decode_package(&input) {
                let owned: Vec<(String, Vec<u8>)> = files.iter().map(|(n, d)| (n.to_string(), d.to_vec())).collect();
                proptest::prop_assert_eq!(encode_package(&owned), input);
            }
        }
    }

    #[test]
    fn manifests_name_themselves_and_prune_by_time_and_tenant() {
        let segment = "0123456789abcdef0123456789abcdef".to_owned();
        let manifest = Manifest {
            version: 1,
            collector: "c2".into(),
            segment: segment.clone(),
            split: split_key("c2", &segment),
            tenants: vec!["acme".into()],
            first_ns: 100,
            last_ns: 200,
            records: 5,
            wal_to: 77,
            retention_ms: None,
            bytes: 10,
            sha256: "00".into(),
            kek_id: "k1".into(),
            replaces: Vec::new(),
            covers: Vec::new(),
            published_ns: None,
        };
        let bytes = serde_json::to_vec(&manifest).unwrap();
        assert_eq!(Manifest::decode(&bytes, &manifest_key("c2", &segment)).unwrap(), manifest);
        assert!(Manifest::decode(&bytes, &manifest_key("c3", &segment)).is_err());
        let acme = ["acme".to_owned()];
        assert!(manifest.may_match(&acme, None, None));
        assert!(manifest.may_match(&acme, Some(200), Some(201)));
        assert!(!manifest.may_match(&acme, Some(201), None));
        assert!(!manifest.may_match(&acme, None, Some(100)));
        assert!(!manifest.may_match(&["other".to_owned()], None, None));
    }

    #[test]
    fn a_compacted_split_hides_the_ones_it_replaces_from_its_own_collector_only() {
        let make = |collector: &str, segment: char, replaces: &[char]| {
            let id = |c: char| c.to_string().repeat(32);
            Manifest {
                version: 1,
                collector: collector.into(),
                segment: id(segment),
                split: split_key(collector, &id(segment)),
                tenants: Vec::new(),
                first_ns: 0,
                last_ns: 1,
                records: 1,
                wal_to: 1,
                retention_ms: None,
                bytes: 1,
                sha256: "00".into(),
                kek_id: "k1".into(),
                covers: replaces.iter().map(|c| id(*c)).collect(),
                replaces: replaces.iter().map(|c| id(*c)).collect(),
                published_ns: (!replaces.is_empty()).then_some(5),
            }
        };
        let plain = make("c2", 'a', &[]);
        // A split that is not compacted reads as before: no new field.
        let json = String::from_utf8(serde_json::to_vec(&plain).unwrap()).unwrap();
        assert!(!json.contains("replaces") && !json.contains("covers") && !json.contains("published_ns"));
        assert_eq!(plain.covered().collect::<Vec<_>>(), [&plain.segment]);
        let all = [plain.clone(), make("c2", 'b', &[]), make("c2", 'c', &['a', 'b']), make("c3", 'a', &[])];
        let searched: Vec<(&str, &str)> =
            live(all.iter()).iter().map(|m| (m.collector.as_str(), &m.segment[..1])).collect();
        assert_eq!(searched, [("c2", "c"), ("c3", "a")]);
        // A compacted manifest reads back; one replacing itself, or naming a
        // bad segment, is refused.
        let compacted = make("c2", 'c', &['a', 'b']);
        let key = manifest_key("c2", &compacted.segment);
        assert_eq!(Manifest::decode(&serde_json::to_vec(&compacted).unwrap(), &key).unwrap(), compacted);
        let mut itself = compacted.clone();
        itself.replaces.push(itself.segment.clone());
        assert!(Manifest::decode(&serde_json::to_vec(&itself).unwrap(), &key).is_err());
        let mut bad = compacted.clone();
        bad.covers.push("../x".into());
        assert!(Manifest::decode(&serde_json::to_vec(&bad).unwrap(), &key).is_err());
        // A compaction's id follows from its inputs, in any order.
        let (a, b) = (make("c2", 'a', &[]), make("c2", 'b', &[]));
        let id = compacted_id(&[a.clone(), b.clone()]);
        assert!(valid_segment(&id));
        assert_eq!(id, compacted_id(&[b.clone(), a.clone()]));
        assert_ne!(id, compacted_id(&[a]));
        // Size classes: each eight times the one before.
        assert_eq!((tier(0), tier(COMPACT_BASE - 1), tier(COMPACT_BASE)), (0, 0, 1));
        assert_eq!((tier(8 * COMPACT_BASE - 1), tier(8 * COMPACT_BASE)), (1, 2));
    }
}
