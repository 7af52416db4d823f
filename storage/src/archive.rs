//! The archive: segments and checkpoints in object storage, through
//! OpenDAL.
//!
//! Object keys are built here only, from validated parts:
//! `TENANT/YYYY/MM/DD/HOST/SEGMENT-ID` for segments and
//! `_checkpoints/COLLECTOR/SEQ` for checkpoints (`_` cannot start a tenant
//! name, so the two never meet). Archive URIs are `file:///dir` (or a
//! plain path) and `s3://bucket/prefix`, with `endpoint`, `region` and
//! `path_style` as query parameters and credentials from the usual
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment.

use std::time::Duration;

use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator};

/// Where checkpoints live.
pub const CHECKPOINT_PREFIX: &str = "_checkpoints/";
/// The largest object a reader fetches.
pub const MAX_OBJECT: u64 = 1 << 30;
/// Longest a request that moves no data (stat, list, delete) may take.
const STORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one read or write of data may take: a whole 64 MiB segment
/// uploaded in one request needs about 0.5 MB/s.
const STORE_IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the archive failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// The URI is not one this build understands.
    #[error("bad archive uri {uri:?}: {message}")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong.
        message: String,
    },
    /// A part of an object key is not allowed.
    #[error("bad {what} {value:?} for an object key")]
    BadKeyPart {
        /// Which part.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// The object store failed (after retries).
    #[error("{key}: {source}")]
    Store {
        /// The object.
        key: String,
        /// The error.
        source: opendal::Error,
    },
    /// An object is over [`MAX_OBJECT`].
    #[error("{key} is {size} bytes, over the cap of {MAX_OBJECT}")]
    TooLarge {
        /// The object.
        key: String,
        /// Its size.
        size: u64,
    },
    /// A small object read with [`Archive::get_tagged`] is over its cap.
    #[error("{key} is {size} bytes, over the cap of {cap}")]
    OverCap {
        /// The object.
        key: String,
        /// Its size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// The store gives no entity tag, so it cannot do conditional writes.
    #[error("{key}: the store gives no entity tag (ETag); conditional writes need one")]
    NoEtag {
        /// The object.
        key: String,
    },
    /// What was read back after an upload is not what was written.
    #[error("{key}: the uploaded object does not read back the same")]
    NotVerified {
        /// The object.
        key: String,
    },
}

/// Whether `key` is one [`segment_key`] can build: six parts, each a
/// [`valid_part`] (so never `..`, `.`, empty or absolute).
pub fn valid_segment_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    parts.len() == 6 && parts.iter().all(|part| valid_part(part))
}

/// Whether `part` may be one component of an object key: 1 to 128 of
/// `[A-Za-z0-9.-]`, not starting with a dot.
pub fn valid_part(part: &str) -> bool {
    (1..=128).contains(&part.len())
        && !part.starts_with('.')
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

fn part<'a>(what: &'static str, value: &'a str) -> Result<&'a str, ArchiveError> {
    if valid_part(value) {
        Ok(value)
    } else {
        Err(ArchiveError::BadKeyPart { what, value: value.to_owned() })
    }
}

/// The object key of a segment: `TENANT/YYYY/MM/DD/HOST/SEGMENT-ID`, the
/// date being the segment's first record's (UTC).
pub fn segment_key(
    tenant: &str,
    host: &str,
    first_ns: i64,
    segment_id: &str,
) -> Result<String, ArchiveError> {
    let days = first_ns.div_euclid(86_400_000_000_000);
    let (year, month, day) = civil_from_days(days);
    Ok(format!(
        "{}/{year:04}/{month:02}/{day:02}/{}/{}",
        part("tenant", tenant)?,
        part("host", host)?,
        part("segment id", segment_id)?
    ))
}

/// The object key of checkpoint `seq` of `collector`.
pub fn checkpoint_key(collector: &str, seq: u64) -> Result<String, ArchiveError> {
    Ok(format!("{CHECKPOINT_PREFIX}{}/{seq:020}", part("collector", collector)?))
}

/// Reads the file at `path` into `buffer` (cleared); false when it does not
/// exist. The size is checked against [`MAX_OBJECT`] before anything is
/// allocated, and a file that grows or shrinks while it is read is an error.
fn read_local(path: &std::path::Path, key: &str, buffer: &mut Vec<u8>) -> Result<bool, ArchiveError> {
    use std::io::Read;
    let failed = |err: std::io::Error| ArchiveError::Store {
        key: key.to_owned(),
        source: opendal::Error::new(ErrorKind::Unexpected, err.to_string()),
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(failed(err)),
    };
    let size = file.metadata().map_err(failed)?.len();
    if size > MAX_OBJECT {
        return Err(ArchiveError::TooLarge { key: key.to_owned(), size });
    }
    buffer.clear();
    buffer.reserve_exact(size as usize);
    // One byte past the size tells a file that grew while it was read.
    file.take(size + 1).read_to_end(buffer).map_err(failed)?;
    if buffer.len() as u64 != size {
        let changed = std::io::Error::other(format!("{size} bytes at open, {} read", buffer.len()));
        return Err(failed(changed));
    }
    Ok(true)
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm), so keys need no calendar crate.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// What a conditional write ([`Archive::put_if`]) expects to replace.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// No object: the write creates it.
    Absent,
    /// The object as it was when read, by its entity tag.
    Etag(&'a str),
}

/// How a conditional write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// Written; the new entity tag when the store said it.
    Written(Option<String>),
    /// The object was not as expected (someone else wrote it): nothing written.
    Conflict,
}

/// An archive: an OpenDAL operator with retries.
#[derive(Debug, Clone)]
pub struct Archive {
    operator: Operator,
    uri: String,
    /// The directory of an archive on the local file system: whole objects
    /// are read from it straight into the caller's buffer.
    local_root: Option<std::path::PathBuf>,
}

fn store_err(key: &str) -> impl FnOnce(opendal::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Store { key: key.to_owned(), source }
}

impl Archive {
    /// Opens the archive at `uri` (see the module page).
    pub fn open(uri: &str) -> Result<Archive, ArchiveError> {
        let bad = |message: &str| ArchiveError::BadUri { uri: uri.to_owned(), message: message.to_owned() };
        let mut local_root = None;
        let operator = if let Some(rest) = uri.strip_prefix("s3://") {
            let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            let mut builder = opendal::services::S3::default().bucket(bucket).root(&format!("/{prefix}"));
            let mut region = "us-east-1".to_owned();
            let mut virtual_host = false;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                match name {
                    "endpoint" => builder = builder.endpoint(value),
                    "region" => region = value.to_owned(),
                    "path_style" => virtual_host = value == "false",
                    _ => return Err(bad(&format!("unknown parameter {name:?}"))),
                }
            }
            builder = builder.region(&region).disable_ec2_metadata();
            if virtual_host {
                builder = builder.enable_virtual_host_style();
            }
            Operator::new(builder).map_err(|e| bad(&e.to_string()))?.finish()
        } else {
            let path = uri.strip_prefix("file://").unwrap_or(uri);
            if path.is_empty() || path.contains("://") {
                return Err(bad("expected file:///DIR, a path, or s3://BUCKET/PREFIX"));
            }
            std::fs::create_dir_all(path).map_err(|e| bad(&e.to_string()))?;
            let root = std::fs::canonicalize(path).map_err(|e| bad(&e.to_string()))?;
            let builder = opendal::services::Fs::default().root(&root.to_string_lossy());
            local_root = Some(root);
            Operator::new(builder).map_err(|e| bad(&e.to_string()))?.finish()
        };
        // Every request is bounded in time, so a connection that hangs
        // (a store that stops answering mid-request) is an error, retried,
        // and never a collector stalled for good. The timeout is inside the
        // retry, so each attempt has its own.
        let operator = operator
            .layer(TimeoutLayer::new().with_timeout(STORE_TIMEOUT).with_io_timeout(STORE_IO_TIMEOUT))
            .layer(
                RetryLayer::new().with_max_times(5).with_min_delay(Duration::from_millis(100)).with_jitter(),
            );
        Ok(Archive { operator, uri: uri.to_owned(), local_root })
    }

    /// The URI it was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Writes `bytes` to `key`, then reads the object back and compares
    /// its SHA-256: only a verified upload returns Ok.
    pub async fn put_verified(&self, key: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
        self.operator.write(key, bytes.to_vec()).await.map_err(store_err(key))?;
        let back = self.get(key).await?;
        let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
        if back.len() != bytes.len() || digest(&back).as_ref() != digest(bytes).as_ref() {
            return Err(ArchiveError::NotVerified { key: key.to_owned() });
        }
        Ok(())
    }

    /// Reads `key` whole; None when it does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
        let size = match self.operator.stat(key).await {
            Ok(meta) => meta.content_length(),
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(store_err(key)(err)),
        };
        if size > MAX_OBJECT {
            return Err(ArchiveError::TooLarge { key: key.to_owned(), size });
        }
        match self.operator.read(key).await {
            Ok(buffer) => Ok(Some(buffer.to_vec())),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(store_err(key)(err)),
        }
    }

    /// Reads `key` whole into `buffer` (cleared first, its memory reused);
    /// false when it does not exist. `listed_size`, from [`Archive::list`],
    /// spares asking for the size before it is checked against the cap.
    pub async fn get_into(
        &self,
        key: &str,
        listed_size: Option<u64>,
        buffer: &mut Vec<u8>,
    ) -> Result<bool, ArchiveError> {
        buffer.clear();
        if let Some(path) = self.local_path(key)? {
            // One copy from the page cache into memory already in use, on a
            // blocking thread: OpenDAL's reader copies each 2 MiB twice into
            // fresh buffers.
            let mut taken = std::mem::take(buffer);
            let key_owned = key.to_owned();
            let (back, read) = tokio::task::spawn_blocking(move || {
                let read = read_local(&path, &key_owned, &mut taken);
                (taken, read)
            })
            .await
            .map_err(|err| ArchiveError::Store {
                key: key.to_owned(),
                source: opendal::Error::new(ErrorKind::Unexpected, err.to_string()),
            })?;
            *buffer = back;
            return read;
        }
        let size = match listed_size.filter(|&size| size > 0) {
            Some(size) => size,
            None => match self.operator.stat(key).await {
                Ok(meta) => meta.content_length(),
                Err(err) if err.kind() == ErrorKind::NotFound => return Ok(false),
                Err(err) => return Err(store_err(key)(err)),
            },
        };
        if size > MAX_OBJECT {
            return Err(ArchiveError::TooLarge { key: key.to_owned(), size });
        }
        buffer.reserve(size as usize);
        let reader = match self.operator.reader(key).await {
            Ok(reader) => reader,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(store_err(key)(err)),
        };
        match reader.read_into(buffer, ..size).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(false),
            Err(err) => Err(store_err(key)(err)),
        }
    }

    /// The file of `key` in a local archive: None for another store.
    /// A key that no segment can have is refused, whichever the store, so
    /// nothing outside the archive is ever read through it.
    fn local_path(&self, key: &str) -> Result<Option<std::path::PathBuf>, ArchiveError> {
        if !valid_segment_key(key) {
            return Err(ArchiveError::BadKeyPart { what: "segment key", value: key.to_owned() });
        }
        Ok(self.local_root.as_ref().map(|root| root.join(key)))
    }

    /// Reads `key` whole.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, ArchiveError> {
        self.get_opt(key).await?.ok_or_else(|| ArchiveError::Store {
            key: key.to_owned(),
            source: opendal::Error::new(ErrorKind::NotFound, "no such object"),
        })
    }

    /// Every object under `prefix` (recursively), with its size, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ArchiveError> {
        let entries = match self.operator.list_with(prefix).recursive(true).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(store_err(prefix)(err)),
        };
        let mut objects = Vec::with_capacity(entries.len());
        for entry in entries {
            if entry.metadata().is_dir() {
                continue;
            }
            let mut size = entry.metadata().content_length();
            if size == 0 {
                // Some listings leave the size out.
                size =
                    self.operator.stat(entry.path()).await.map_err(store_err(entry.path()))?.content_length();
            }
            objects.push((entry.path().to_owned(), size));
        }
        objects.sort();
        Ok(objects)
    }

    /// True when the store can write only if an object is absent or
    /// unchanged (`If-None-Match: *`, `If-Match`): what collectors sharing
    /// a bucket need.
    pub fn supports_conditional_writes(&self) -> bool {
        let capability = self.operator.info().full_capability();
        capability.write_with_if_match && capability.write_with_if_not_exists
    }

    /// Reads a small object whole with its entity tag, the size checked
    /// against `cap` before anything is allocated; None when it does not
    /// exist. The read names the tag it stat'ed, so bytes and tag belong
    /// together even while another writer replaces the object.
    pub async fn get_tagged(&self, key: &str, cap: u64) -> Result<Option<(Vec<u8>, String)>, ArchiveError> {
        let mut attempts = 0;
        loop {
            let meta = match self.operator.stat(key).await {
                Ok(meta) => meta,
                Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(store_err(key)(err)),
            };
            let size = meta.content_length();
            if size > cap {
                return Err(ArchiveError::OverCap { key: key.to_owned(), size, cap });
            }
            let Some(etag) = meta.etag() else { return Err(ArchiveError::NoEtag { key: key.to_owned() }) };
            // The tag pins the object whose size was checked; no byte past it is read.
            let read = self.operator.read_with(key).if_match(etag);
            let read = if size > 0 { read.range(0..size).await } else { read.await };
            match read {
                Ok(buffer) if buffer.len() as u64 <= cap => {
                    return Ok(Some((buffer.to_vec(), etag.to_owned())));
                }
                Ok(buffer) => {
                    let size = buffer.len() as u64;
                    return Err(ArchiveError::OverCap { key: key.to_owned(), size, cap });
                }
                Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
                // Replaced between the stat and the read: again, a few times.
                Err(err) if err.kind() == ErrorKind::ConditionNotMatch && attempts < 8 => attempts += 1,
                Err(err) => return Err(store_err(key)(err)),
            }
        }
    }

    /// Writes `bytes` to `key` only when the object is as `expect` says:
    /// absent, or unchanged since it was read with that entity tag.
    pub async fn put_if(
        &self,
        key: &str,
        bytes: Vec<u8>,
        expect: Expect<'_>,
    ) -> Result<Conditional, ArchiveError> {
        let write = self.operator.write_with(key, bytes);
        let written = match expect {
            Expect::Absent => write.if_not_exists(true).await,
            Expect::Etag(etag) => write.if_match(etag).await,
        };
        match written {
            Ok(meta) => Ok(Conditional::Written(meta.etag().map(str::to_owned))),
            Err(err) if err.kind() == ErrorKind::ConditionNotMatch => Ok(Conditional::Conflict),
            Err(err) => Err(store_err(key)(err)),
        }
    }

    /// Reads bytes `range` of `key`, which must all exist: a read that
    /// comes back short (the object is smaller) is an error. At most
    /// [`MAX_OBJECT`] bytes.
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>, ArchiveError> {
        let want = range.end.saturating_sub(range.start);
        if want > MAX_OBJECT {
            return Err(ArchiveError::TooLarge { key: key.to_owned(), size: want });
        }
        if want == 0 {
            return Ok(Vec::new());
        }
        let bytes = self.operator.read_with(key).range(range).await.map_err(store_err(key))?.to_vec();
        if bytes.len() as u64 != want {
            let message = format!("{} bytes read, {want} asked", bytes.len());
            return Err(ArchiveError::Store {
                key: key.to_owned(),
                source: opendal::Error::new(ErrorKind::Unexpected, message),
            });
        }
        Ok(bytes)
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        self.operator.delete(key).await.map_err(store_err(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_built_from_checked_parts_only() {
        let ns = 1_795_478_400_000_000_000; // 2026-11-24T00:00:00Z
        assert_eq!(segment_key("acme", "web-1", ns, "0001").unwrap(), "acme/2026/11/24/web-1/0001");
        assert_eq!(segment_key("acme", "web-1", 0, "x").unwrap(), "acme/1970/01/01/web-1/x");
        assert_eq!(segment_key("a", "h", -1, "x").unwrap(), "a/1969/12/31/h/x");
        for (tenant, host) in
            [("..", "h"), ("a/b", "h"), ("a", "../h"), ("", "h"), ("a", "h h"), ("_checkpoints", "h")]
        {
            assert!(segment_key(tenant, host, 0, "x").is_err(), "{tenant} {host}");
        }
        assert_eq!(checkpoint_key("c1", 7).unwrap(), "_checkpoints/c1/00000000000000000007");
        assert!(checkpoint_key("c/1", 7).is_err());
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(-719_468), (0, 3, 1));
    }

    /// A local archive reads whole objects straight from its directory, the
    /// same bytes OpenDAL gives, never a file outside the root.
    #[tokio::test]
    async fn a_local_archive_reads_objects_whole_and_never_outside_its_root() {
        let dir = std::env::temp_dir().join(format!("logvault-archive-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let archive = Archive::open(&dir.join("root").display().to_string()).unwrap();
        std::fs::write(dir.join("outside"), b"secret").unwrap();
        let bytes: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        archive.put_verified("t/2026/11/24/h/seg", &bytes).await.unwrap();
        let mut buffer = vec![1, 2, 3];
        assert!(archive.get_into("t/2026/11/24/h/seg", None, &mut buffer).await.unwrap());
        assert_eq!(buffer, bytes);
        assert_eq!(archive.get("t/2026/11/24/h/seg").await.unwrap(), bytes);
        assert!(!archive.get_into("t/2026/11/24/h/none", None, &mut buffer).await.unwrap());
        let outside = [
            "../outside",
            "t/../../outside",
            "/outside",
            "t//seg",
            "./t",
            "",
            "t/2026/11/24/h/..",
            "t\\..\\x",
        ];
        for key in outside {
            assert!(archive.local_path(key).is_err(), "{key}");
            let mut buffer = Vec::new();
            let read = archive.get_into(key, None, &mut buffer).await;
            assert!(matches!(read, Err(ArchiveError::BadKeyPart { .. })), "{key}: {read:?}");
            assert!(buffer.is_empty());
        }
        let root = std::fs::canonicalize(dir.join("root")).unwrap();
        assert_eq!(
            archive.local_path("t/2026/11/24/h/seg").unwrap().unwrap(),
            root.join("t/2026/11/24/h/seg")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
