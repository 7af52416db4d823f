//! A split read from the bucket in ranges, as a tantivy directory.
//!
//! A split is a sealed segment (AES-256-GCM chunks under a wrapped data
//! key, the header bound to every chunk) whose plaintext is a package of
//! the index segment's files with a table of them at its end. Opening one
//! takes two ranged reads: the segment's head (magic, header, wrapped
//! key), and its last chunk, which holds the package's table. After that,
//! every byte range tantivy asks for is served from the chunks that cover
//! it: the missing ones are fetched (one ranged read per run of missing
//! chunks), opened, and written into a sparse cache file where they stay,
//! so each chunk crosses the network once. Every chunk is authenticated
//! when it is opened: a changed, moved, truncated or foreign chunk is an
//! error, never data.
//!
//! The cached chunks are written into one sparse file per index file,
//! which tantivy's own memory-mapped directory reads: a warm split is read
//! as a local index is.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use logvault_storage::archive::Archive;
use logvault_storage::keyring::Keyring;
use logvault_storage::segment::{self, Opener, SegmentView};
use tantivy::HasLen;
use tantivy::directory::error::{DeleteError, LockError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    Directory, DirectoryLock, FileHandle, Lock, MmapDirectory, OwnedBytes, WatchCallback, WatchHandle,
    WritePtr,
};

use super::{Manifest, SplitStats};

/// Bytes read first: enough for the head of any split this collector
/// writes (a header without signers and a wrapped key).
const HEAD: u64 = 4096;
/// Largest head a segment may have.
const MAX_HEAD: u64 = 9 + segment::MAX_HEADER as u64 + 2 + u16::MAX as u64;
/// An AES-GCM tag.
const TAG: u64 = 16;
/// The longest a ranged read may take, its retries included.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads bytes `range` of `key`, within [`READ_TIMEOUT`]. Blocking.
fn read_range(
    store: &Archive,
    runtime: &tokio::runtime::Handle,
    key: &str,
    range: Range<u64>,
) -> Result<Vec<u8>, String> {
    let read =
        runtime.block_on(async { tokio::time::timeout(READ_TIMEOUT, store.get_range(key, range)).await });
    match read {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer from the store in {} s", READ_TIMEOUT.as_secs())),
    }
}

/// A split object in the bucket: its head read, its data key unwrapped,
/// its chunks fetched on demand.
pub(crate) struct SplitObject {
    store: Archive,
    runtime: tokio::runtime::Handle,
    key: String,
    /// The object's size, from its manifest.
    size: u64,
    opener: Opener,
    chunks_at: u64,
    /// Plaintext bytes per chunk, and the sealed bytes of a full chunk.
    chunk: u64,
    sealed: u64,
    /// The index of the last chunk.
    last: u64,
    /// Plaintext bytes: the package's length.
    len: u64,
    stats: Arc<SplitStats>,
}

impl std::fmt::Debug for SplitObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitObject").field("key", &self.key).field("len", &self.len).finish_non_exhaustive()
    }
}

impl SplitObject {
    /// Reads the head of `manifest`'s split, unwraps its data key and
    /// checks the head against the manifest. Blocking.
    pub(crate) fn open(
        store: Archive,
        runtime: tokio::runtime::Handle,
        keyring: &Keyring,
        manifest: &Manifest,
        stats: Arc<SplitStats>,
    ) -> Result<SplitObject, String> {
        let key = manifest.split.clone();
        let size = manifest.bytes;
        let fail = |what: String| format!("split {key}: {what}");
        let read = |range: Range<u64>| {
            let bytes = read_range(&store, &runtime, &key, range).map_err(fail)?;
            stats.range_reads.fetch_add(1, Ordering::Relaxed);
            stats.fetched_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Ok::<_, String>(bytes)
        };
        let mut head = read(0..size.min(HEAD))?;
        if SegmentView::parse(&head).is_err() && size > HEAD {
            head = read(0..size.min(MAX_HEAD))?;
        }
        let view = SegmentView::parse(&head).map_err(|e| fail(e.to_string()))?;
        if view.header.segment_id != manifest.segment || view.header.collector != manifest.collector {
            return Err(fail("it names another segment".into()));
        }
        if view.header.algorithm != segment::ALGORITHM_AES256GCM {
            return Err(fail("not sealed as a split is".into()));
        }
        let opener = view.opener(keyring, head.len()).map_err(|e| fail(e.to_string()))?;
        let chunks_at = opener.chunks_at() as u64;
        let chunk = opener.chunk_size() as u64;
        let sealed = chunk + TAG;
        let region =
            size.checked_sub(chunks_at).filter(|r| *r >= TAG).ok_or_else(|| fail("truncated".into()))?;
        let last = (region - 1) / sealed;
        let last_len = region - last * sealed;
        if last_len < TAG {
            return Err(fail("truncated".into()));
        }
        let len = last * chunk + last_len - TAG;
        if len != view.header.raw_len {
            return Err(fail(format!("{len} bytes of package, the header says {}", view.header.raw_len)));
        }
        Ok(SplitObject { store, runtime, key, size, opener, chunks_at, chunk, sealed, last, len, stats })
    }

    /// The whole package, with one ranged read. Blocking.
    pub(crate) fn read_all(&self) -> std::io::Result<Vec<u8>> {
        self.fetch(0..self.last + 1)
    }

    /// The chunks that hold package bytes `range` (not empty).
    fn chunks(&self, range: &Range<u64>) -> Range<u64> {
        range.start / self.chunk..(range.end - 1) / self.chunk + 1
    }

    /// Chunks `chunks`, fetched with one ranged read and each opened:
    /// their plaintext, which starts at package byte `chunks.start * chunk`.
    /// Blocking.
    fn fetch(&self, chunks: Range<u64>) -> std::io::Result<Vec<u8>> {
        let bytes = read_range(&self.store, &self.runtime, &self.key, self.sealed_range(&chunks)?)
            .map_err(|e| self.error(e))?;
        self.open_chunks(chunks.start, bytes)
    }

    /// Where chunks `chunks` lie in the object.
    fn sealed_range(&self, chunks: &Range<u64>) -> std::io::Result<Range<u64>> {
        if chunks.start >= chunks.end || chunks.end > self.last + 1 {
            return Err(self.error(format!("no chunks {chunks:?}")));
        }
        let from = self.chunks_at + chunks.start * self.sealed;
        Ok(from..(self.chunks_at + chunks.end * self.sealed).min(self.size))
    }

    /// Opens the sealed chunks in `bytes`, the first being chunk `first`,
    /// in place: their plaintext. Counted as one ranged read.
    fn open_chunks(&self, first: u64, mut bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
        self.stats.range_reads.fetch_add(1, Ordering::Relaxed);
        self.stats.fetched_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let (sealed, mut written) = (self.sealed as usize, 0);
        for (offset, start) in (0..bytes.len()).step_by(sealed).enumerate() {
            let index = first + offset as u64;
            let end = (start + sealed).min(bytes.len());
            let len = self
                .opener
                .open(index, index == self.last, &mut bytes[start..end])
                .map_err(|e| self.error(e.to_string()))?
                .len();
            bytes.copy_within(start..start + len, written);
            written += len;
        }
        bytes.truncate(written);
        Ok(bytes)
    }

    fn error(&self, message: String) -> std::io::Error {
        std::io::Error::other(format!("split {}: {message}", self.key))
    }
}

/// One index file of a split: where it lies in the package, and its
/// sparse file in the cache (opened to write a chunk, so an open split
/// holds no descriptor).
#[derive(Debug)]
struct CachedFile {
    range: Range<u64>,
    path: PathBuf,
}

/// Removes a directory when dropped: a split's cache, when the last
/// reader of it is gone.
#[derive(Debug)]
pub(crate) struct Cleanup(pub(crate) PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the clones of a [`SplitDirectory`] share.
#[derive(Debug)]
struct Shared {
    object: SplitObject,
    files: HashMap<PathBuf, CachedFile>,
    /// Which chunks are in the cache files; held while chunks are fetched,
    /// so each is fetched once.
    present: Mutex<Vec<bool>>,
    /// Plaintext bytes in the cache files.
    cached: AtomicU64,
    mapped: MmapDirectory,
    _cleanup: Cleanup,
}

/// The files of a split, as a read-only tantivy directory whose bytes are
/// fetched the first time they are read.
#[derive(Debug, Clone)]
pub(crate) struct SplitDirectory(Arc<Shared>);

impl SplitDirectory {
    /// The directory of `object`'s package, cached in `dir` (created here,
    /// removed when the last clone is dropped): its table is read from the
    /// package's end; a version 1 package, which has none, is read whole.
    /// Blocking.
    pub(crate) fn open(object: SplitObject, dir: PathBuf) -> Result<SplitDirectory, String> {
        let fail = |e: String| format!("split {}: {e}", object.key);
        let len = object.len;
        if len < super::TRAILER as u64 {
            return Err(fail("too short for a package".into()));
        }
        // The last chunks, then as many before them as the table needs.
        let mut loaded = object.chunks(&(len - super::TRAILER as u64..len));
        let mut plain = object.fetch(loaded.clone()).map_err(|e| e.to_string())?;
        let at = |plain: &[u8], loaded: &Range<u64>, range: Range<u64>| {
            let base = loaded.start * object.chunk;
            plain[(range.start - base) as usize..(range.end - base) as usize].to_vec()
        };
        let tail = at(&plain, &loaded, len - super::TRAILER as u64..len);
        let files = match super::table_len(&tail) {
            Some(table_len)
                if table_len <= super::MAX_TABLE && u64::from(table_len) <= len - super::TRAILER as u64 =>
            {
                let end = len - super::TRAILER as u64;
                let start = end - u64::from(table_len);
                let needed = object.chunks(&(start..end.max(start + 1)));
                if needed.start < loaded.start {
                    let mut before = object.fetch(needed.start..loaded.start).map_err(|e| e.to_string())?;
                    before.extend_from_slice(&plain);
                    plain = before;
                    loaded.start = needed.start;
                }
                super::decode_table(&at(&plain, &loaded, start..end), start)?
            }
            Some(_) => return Err(fail("the table runs past the start".into())),
            None => {
                if loaded.start > 0 {
                    let mut before = object.fetch(0..loaded.start).map_err(|e| e.to_string())?;
                    before.extend_from_slice(&plain);
                    plain = before;
                    loaded.start = 0;
                }
                let base = plain.as_ptr() as usize;
                super::decode_package(&plain)?
                    .into_iter()
                    .map(|(name, data)| {
                        let at = (data.as_ptr() as usize - base) as u64;
                        (name, at..at + data.len() as u64)
                    })
                    .collect()
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cleanup = Cleanup(dir.clone());
        let mut cached = HashMap::with_capacity(files.len());
        for (name, range) in files {
            let path = dir.join(&name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|file| file.set_len(range.end - range.start))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            cached.insert(PathBuf::from(name), CachedFile { range, path });
        }
        let mapped = MmapDirectory::open(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let chunks = usize::try_from(object.last + 1).map_err(|_| fail("too many chunks".into()))?;
        let shared = Shared {
            object,
            files: cached,
            present: Mutex::new(vec![false; chunks]),
            cached: AtomicU64::new(0),
            mapped,
            _cleanup: cleanup,
        };
        // What was read for the table is kept.
        let mut present = shared.present.lock().unwrap_or_else(|e| e.into_inner());
        shared.keep(&mut present, loaded, &plain).map_err(|e| e.to_string())?;
        drop(present);
        shared.prefetch_footers().map_err(|e| e.to_string())?;
        Ok(SplitDirectory(Arc::new(shared)))
    }

    /// Plaintext bytes in the cache.
    pub(crate) fn cached_bytes(&self) -> u64 {
        self.0.cached.load(Ordering::Relaxed)
    }

    fn file(&self, path: &Path) -> Result<&CachedFile, OpenReadError> {
        self.0.files.get(path).ok_or_else(|| OpenReadError::FileDoesNotExist(path.to_owned()))
    }
}

impl Shared {
    /// Fetches the last chunk of every file at once, one ranged read per
    /// run of such chunks, all in flight together: tantivy opens each file
    /// at its footer, and reading those one after another would cost a
    /// round trip to the store each.
    fn prefetch_footers(&self) -> std::io::Result<()> {
        let mut wanted = std::collections::BTreeSet::new();
        {
            let present = self.present.lock().unwrap_or_else(|e| e.into_inner());
            for cached in self.files.values().filter(|f| f.range.end > f.range.start) {
                let last = self.object.chunks(&(cached.range.end - 1..cached.range.end)).start;
                if !present[last as usize] {
                    wanted.insert(last);
                }
            }
        }
        let mut runs: Vec<Range<u64>> = Vec::new();
        for index in wanted {
            match runs.last_mut() {
                Some(run) if run.end == index => run.end += 1,
                _ => runs.push(index..index + 1),
            }
        }
        let object = &self.object;
        let ranges = runs.iter().map(|run| object.sealed_range(run)).collect::<std::io::Result<Vec<_>>>()?;
        let fetched: Vec<(usize, Result<Vec<u8>, String>)> = object.runtime.block_on(async {
            let mut reads = tokio::task::JoinSet::new();
            for (n, range) in ranges.into_iter().enumerate() {
                let (store, key) = (object.store.clone(), object.key.clone());
                reads.spawn(async move {
                    let read = tokio::time::timeout(READ_TIMEOUT, store.get_range(&key, range)).await;
                    (
                        n,
                        read.map_err(|_| "no answer from the store in time".to_owned())
                            .and_then(|r| r.map_err(|e| e.to_string())),
                    )
                });
            }
            let mut fetched = Vec::new();
            while let Some(done) = reads.join_next().await {
                fetched.push(done.map_err(|e| std::io::Error::other(e.to_string()))?);
            }
            Ok::<_, std::io::Error>(fetched)
        })?;
        let mut present = self.present.lock().unwrap_or_else(|e| e.into_inner());
        for (n, bytes) in fetched {
            let plain = object.open_chunks(runs[n].start, bytes.map_err(|e| object.error(e))?)?;
            self.keep(&mut present, runs[n].clone(), &plain)?;
        }
        Ok(())
    }

    /// Makes package bytes `range` present in the cache files: each run of
    /// missing chunks is fetched with one ranged read.
    fn fill(&self, range: Range<u64>) -> std::io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let wanted = self.object.chunks(&range);
        let mut present = self.present.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = wanted.start;
        while first < wanted.end {
            if present[first as usize] {
                first += 1;
                continue;
            }
            let mut end = first + 1;
            while end < wanted.end && !present[end as usize] {
                end += 1;
            }
            let plain = self.object.fetch(first..end)?;
            self.keep(&mut present, first..end, &plain)?;
            first = end;
        }
        Ok(())
    }

    /// Writes the plaintext of `chunks` into the files it overlaps, and
    /// marks them present.
    fn keep(&self, present: &mut [bool], chunks: Range<u64>, plain: &[u8]) -> std::io::Result<()> {
        let base = chunks.start * self.object.chunk;
        let end = base + plain.len() as u64;
        for cached in self.files.values() {
            let from = cached.range.start.max(base);
            let to = cached.range.end.min(end);
            if from < to {
                let file = std::fs::OpenOptions::new().write(true).open(&cached.path)?;
                file.write_all_at(
                    &plain[(from - base) as usize..(to - base) as usize],
                    from - cached.range.start,
                )?;
            }
        }
        for index in chunks {
            if !std::mem::replace(&mut present[index as usize], true) {
                let chunk_end = ((index + 1) * self.object.chunk).min(self.object.len);
                self.cached.fetch_add(chunk_end - index * self.object.chunk, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

fn read_only(path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("{}: a split is read-only", path.display()),
    )
}

impl Directory for SplitDirectory {
    fn get_file_handle(&self, path: &Path) -> Result<Arc<dyn FileHandle>, OpenReadError> {
        let range = self.file(path)?.range.clone();
        let mapped = self.0.mapped.get_file_handle(path)?;
        Ok(Arc::new(SplitFile { split: self.0.clone(), range, mapped }))
    }

    fn delete(&self, path: &Path) -> Result<(), DeleteError> {
        Err(DeleteError::IoError { io_error: Arc::new(read_only(path)), filepath: path.to_owned() })
    }

    fn exists(&self, path: &Path) -> Result<bool, OpenReadError> {
        Ok(self.0.files.contains_key(path))
    }

    fn open_write(&self, path: &Path) -> Result<WritePtr, OpenWriteError> {
        Err(OpenWriteError::IoError { io_error: Arc::new(read_only(path)), filepath: path.to_owned() })
    }

    fn atomic_read(&self, path: &Path) -> Result<Vec<u8>, OpenReadError> {
        let range = self.file(path)?.range.clone();
        self.0.fill(range).map_err(|e| OpenReadError::wrap_io_error(e, path.to_owned()))?;
        self.0.mapped.atomic_read(path)
    }

    fn atomic_write(&self, path: &Path, _data: &[u8]) -> std::io::Result<()> {
        Err(read_only(path))
    }

    fn sync_directory(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Nothing ever changes in a split: no lock is needed to read it.
    fn acquire_lock(&self, _lock: &Lock) -> Result<DirectoryLock, LockError> {
        Ok(DirectoryLock::from(Box::new(())))
    }

    fn watch(&self, _callback: WatchCallback) -> tantivy::Result<WatchHandle> {
        Ok(WatchHandle::empty())
    }
}

/// One file of a split: its bytes are fetched before they are read from
/// the mapped cache file.
#[derive(Debug)]
struct SplitFile {
    split: Arc<Shared>,
    range: Range<u64>,
    mapped: Arc<dyn FileHandle>,
}

impl HasLen for SplitFile {
    fn len(&self) -> usize {
        self.mapped.len()
    }
}

impl FileHandle for SplitFile {
    fn read_bytes(&self, range: Range<usize>) -> std::io::Result<OwnedBytes> {
        if range.start > range.end || range.end > self.mapped.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a read past the file's end"));
        }
        let start = self.range.start + range.start as u64;
        self.split.fill(start..start + (range.end - range.start) as u64)?;
        self.mapped.read_bytes(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logvault_storage::keyring::Kek;
    use logvault_storage::segment::SegmentHeader;
    use tantivy::collector::Count;
    use tantivy::query::TermQuery;
    use tantivy::schema::{IndexRecordOption, STORED, Schema, TEXT};
    use tantivy::{Index, Term};

    struct Fixture {
        root: PathBuf,
        store: Archive,
        runtime: tokio::runtime::Runtime,
        keyring: Keyring,
        kek: Kek,
        package: Vec<u8>,
        segment: String,
    }

    /// A one-segment index of 4,000 log lines, packaged as a split.
    fn fixture(name: &str) -> Fixture {
        let root = std::env::temp_dir().join(format!("logvault-split-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("index")).unwrap();
        let mut schema = Schema::builder();
        let body = schema.add_text_field("body", TEXT | STORED);
        let index = Index::create_in_dir(root.join("index"), schema.build()).unwrap();
        let mut writer: tantivy::IndexWriter = index.writer_with_num_threads(1, 15_000_000).unwrap();
        for n in 0..4000u32 {
            let level = if n % 10 == 0 { "error" } else { "info" };
            let line = format!(
                "{level} host-{} request {n} took {}ms from 10.0.{}.{}",
                n % 7,
                n * 37 % 1000,
                n % 256,
                n / 256
            );
            writer.add_document(tantivy::doc!(body => line)).unwrap();
        }
        writer.commit().unwrap();
        let meta = index.searchable_segment_metas().unwrap().remove(0);
        let package =
            super::super::package_segment(&root.join("index"), &meta, &meta.id().uuid_string()).unwrap();
        let kek = Kek::generate("k1").unwrap();
        let mut keyring = Keyring::default();
        keyring.insert(kek.clone());
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let store = Archive::open(root.join("bucket").to_str().unwrap()).unwrap();
        Fixture { root, store, runtime, keyring, kek, package, segment: meta.id().uuid_string() }
    }

    impl Fixture {
        /// Seals `package` in 4 KiB chunks, stores it and returns its manifest.
        fn publish(&self, package: &[u8]) -> Manifest {
            let header = SegmentHeader {
                algorithm: segment::ALGORITHM_AES256GCM,
                chunk_size: 4096,
                segment_id: self.segment.clone(),
                collector: "c2".into(),
                tenant: "_splits".into(),
                host: "c2".into(),
                first_ns: 0,
                last_ns: 0,
                created_ns: 0,
                batches: 0,
                records: 4000,
                raw_len: package.len() as u64,
                signers: Vec::new(),
            };
            let sealed = segment::seal_compressed(header, package, &self.kek);
            let split = super::super::split_key("c2", &self.segment);
            self.runtime.block_on(self.store.put_verified(&split, &sealed.bytes)).unwrap();
            Manifest {
                version: super::super::MANIFEST_VERSION,
                collector: "c2".into(),
                segment: self.segment.clone(),
                split,
                tenants: Vec::new(),
                first_ns: 0,
                last_ns: 0,
                records: 4000,
                wal_to: 0,
                retention_ms: None,
                bytes: sealed.bytes.len() as u64,
                sha256: String::new(),
                kek_id: "k1".into(),
                replaces: Vec::new(),
                covers: Vec::new(),
                published_ns: None,
            }
        }

        fn open(
            &self,
            manifest: &Manifest,
            stats: &Arc<SplitStats>,
            cache: &str,
        ) -> Result<SplitDirectory, String> {
            let object = SplitObject::open(
                self.store.clone(),
                self.runtime.handle().clone(),
                &self.keyring,
                manifest,
                stats.clone(),
            )?;
            SplitDirectory::open(object, self.root.join(cache))
        }
    }

    fn count(directory: &SplitDirectory, word: &str) -> tantivy::Result<usize> {
        let index = Index::open(directory.clone())?;
        let body = index.schema().get_field("body").unwrap();
        let searcher = index.reader()?.searcher();
        let query = TermQuery::new(Term::from_field_text(body, word), IndexRecordOption::Basic);
        searcher.search(&query, &Count)
    }

    #[test]
    fn a_split_opens_from_its_ends_and_fetches_only_what_a_search_reads() {
        let fixture = fixture("lazy");
        let manifest = fixture.publish(&fixture.package);
        let stats = Arc::new(SplitStats::default());
        let object = SplitObject::open(
            fixture.store.clone(),
            fixture.runtime.handle().clone(),
            &fixture.keyring,
            &manifest,
            stats.clone(),
        )
        .unwrap();
        // The head.
        assert_eq!(stats.range_reads.load(Ordering::Relaxed), 1);
        let directory = SplitDirectory::open(object, fixture.root.join("cache")).unwrap();
        // The last chunk, with the table; then every file's last chunk,
        // side by side, at most one read each.
        let files = directory.0.files.len() as u64;
        let reads = stats.range_reads.load(Ordering::Relaxed);
        assert!(reads <= 1 + 2 + files, "{reads} reads to open {files} files");
        let index = Index::open(directory.clone()).unwrap();
        let reader = index.reader().unwrap();
        let opened = stats.range_reads.load(Ordering::Relaxed);
        assert!(opened - reads <= 2, "{} more reads to open the index", opened - reads);
        assert_eq!(count(&directory, "error").unwrap(), 400);
        let after_search = stats.fetched_bytes.load(Ordering::Relaxed);
        assert!(after_search < manifest.bytes / 2, "{after_search} of {} bytes fetched", manifest.bytes);
        // Warm: the same search fetches nothing more, and finds the same.
        let reads = stats.range_reads.load(Ordering::Relaxed);
        assert_eq!(count(&directory, "error").unwrap(), 400);
        assert_eq!(stats.range_reads.load(Ordering::Relaxed), reads);
        assert_eq!(count(&directory, "host").unwrap(), 4000);
        assert!(directory.cached_bytes() >= stats.fetched_bytes.load(Ordering::Relaxed) / 2);
        // The cache files go with the last reader.
        let cache = fixture.root.join("cache");
        assert!(cache.exists());
        drop((directory, index, reader));
        assert!(!cache.exists());
        let _ = std::fs::remove_dir_all(&fixture.root);
    }

    #[test]
    fn a_changed_chunk_is_an_error_when_read_and_a_foreign_head_never_opens() {
        let fixture = fixture("tamper");
        let manifest = fixture.publish(&fixture.package);
        let path = fixture.root.join("bucket").join(&manifest.split);
        let good = std::fs::read(&path).unwrap();
        let stats = Arc::new(SplitStats::default());
        // A byte in the middle: the split opens; reading every file hits it.
        let mut bytes = good.clone();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let directory = fixture.open(&manifest, &stats, "cache-middle").unwrap();
        let failed = directory.0.files.keys().filter_map(|name| directory.atomic_read(name).err()).count();
        assert_eq!(failed, 1, "one file holds the changed chunk");
        let whole = directory.0.fill(0..directory.0.object.len);
        assert!(whole.unwrap_err().to_string().contains("does not decrypt"));
        // The header changed: nothing opens.
        let mut bytes = good.clone();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(fixture.open(&manifest, &stats, "cache-head").is_err());
        // Cut short, or longer than the manifest says: refused.
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(fixture.open(&manifest, &stats, "cache-cut").is_err());
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 4112]);
        std::fs::write(&path, &longer).unwrap();
        let mut bigger = manifest.clone();
        bigger.bytes = longer.len() as u64;
        assert!(fixture.open(&bigger, &stats, "cache-long").is_err());
        // Another segment's manifest: refused.
        std::fs::write(&path, &good).unwrap();
        let mut other = manifest.clone();
        other.segment = "0".repeat(32);
        assert!(fixture.open(&other, &stats, "cache-other").is_err());
        let _ = std::fs::remove_dir_all(&fixture.root);
    }

    #[test]
    fn a_version_1_package_is_read_whole_and_searched() {
        let fixture = fixture("v1");
        let files = super::super::decode_package(&fixture.package).unwrap();
        let mut v1 = b"LVSP\x01".to_vec();
        v1.extend_from_slice(&(files.len() as u16).to_be_bytes());
        for (name, data) in &files {
            v1.extend_from_slice(&(name.len() as u16).to_be_bytes());
            v1.extend_from_slice(name.as_bytes());
            v1.extend_from_slice(&(data.len() as u64).to_be_bytes());
            v1.extend_from_slice(data);
        }
        let manifest = fixture.publish(&v1);
        let stats = Arc::new(SplitStats::default());
        let directory = fixture.open(&manifest, &stats, "cache").unwrap();
        // The head, then every chunk.
        let fetched = stats.fetched_bytes.load(Ordering::Relaxed);
        assert!(fetched > manifest.bytes && fetched < manifest.bytes + HEAD, "{fetched}");
        assert_eq!(count(&directory, "error").unwrap(), 400);
        let _ = std::fs::remove_dir_all(&fixture.root);
    }
}
