//! Archive segments: the signed batches of one tenant's host, as received,
//! compressed with zstd and encrypted in chunks with AES-256-GCM. When
//! every batch is already compressed by its sender (agents compress theirs,
//! and so does the collector for the batches it builds), zstd would find
//! nothing left, and the entries are encrypted as they are (algorithm 2).
//!
//! ```text
//! magic "LVSG" | version u8 = 1 | header_len u32 | header | wrap_len u16 | wrap | chunks
//!
//! header (bound: the associated data of every chunk and of the key wrap)
//!   algorithm u8 (1 = zstd, then AES-256-GCM; 2 = AES-256-GCM of the
//!   entries as they are) | chunk_size u32
//!   | segment_id u16+UTF-8 | collector u16+UTF-8 | tenant u16+UTF-8 | host u16+UTF-8
//!   | first_ns i64 | last_ns i64 | created_ns i64
//!   | batches u32 | records u64 | raw_len u64 (bytes before compression)
//!   | signers u8 | signers × 32-byte Ed25519 public keys
//! wrap (the data key, sealed under a key-encryption key)
//!   kek_id u8+UTF-8 | nonce 12 | AES-256-GCM(KEK, DEK) 48, associated data: SHA-256(prefix)
//! chunk i: AES-256-GCM(DEK, nonce = 0 0 0 last | i u64, aad = SHA-256(prefix),
//!          the i-th chunk_size bytes of the zstd stream, or of the
//!          entries for algorithm 2); every chunk but
//!          the last is full, the last has the `last` flag (it may be empty)
//! ```
//!
//! `prefix` is everything from the magic to the end of the header. The
//! segment's hash, which checkpoints sign, is SHA-256 over the prefix and
//! the chunks: the wrap is left out, so `logvault archive rotate-key` can
//! wrap the data key under a new key without changing a byte of data or
//! the hash. The wrap cannot move to another segment either: its
//! associated data is this segment's prefix. A truncated segment lacks its
//! `last` chunk; reordered chunks fail their counter; a changed header
//! fails every chunk.
//!
//! The plaintext inside the zstd stream is a run of entries:
//! `len u32 | received_ns i64 | skip u32 | signer u8 | batch` (`len` counts
//! what follows it), the WAL's entries as the collector stored them.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use ring::digest::{Context, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

use crate::keyring::{Kek, Keyring};
use crate::merkle::Hash;

/// The first bytes of every segment.
pub const MAGIC: [u8; 4] = *b"LVSG";
/// The format version written.
pub const VERSION: u8 = 1;
/// zstd, then AES-256-GCM in chunks.
pub const ALGORITHM_ZSTD_AES256GCM: u8 = 1;
/// The entries as they are (every batch compressed by its sender), then
/// AES-256-GCM in chunks.
pub const ALGORITHM_AES256GCM: u8 = 2;
/// The default plaintext bytes per chunk.
pub const DEFAULT_CHUNK: u32 = 1 << 20;
/// Chunk sizes a reader accepts.
pub const CHUNK_RANGE: std::ops::RangeInclusive<u32> = 4096..=(16 << 20);
/// Largest header a reader accepts.
pub const MAX_HEADER: u32 = 64 * 1024;
/// Most signer keys in one segment.
pub const MAX_SIGNERS: usize = 255;
/// Largest entry (a batch and its 17 bytes of metadata).
pub const MAX_ENTRY: u32 = 32 * 1024 * 1024 + 17;
pub(crate) const TAG: usize = 16;
const DEK_LEN: usize = 32;

/// Why a segment cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SegmentError {
    /// Not a segment, or a version this build does not read.
    #[error("not a logvault segment (magic or version)")]
    NotASegment,
    /// The bytes end early or a length is out of range.
    #[error("malformed segment: {0}")]
    Malformed(&'static str),
    /// A size is over its cap.
    #[error("{what} is {got}, over the cap of {cap}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        got: u64,
        /// The cap.
        cap: u64,
    },
    /// The segment's key-encryption key is not in the keyring.
    #[error("no key-encryption key {0:?} in the keyring")]
    UnknownKek(String),
    /// The data key does not unwrap: another KEK, or the wrap was moved or changed.
    #[error("the data key does not unwrap (wrong key, or the wrap was altered or moved)")]
    Unwrap,
    /// A chunk fails to decrypt: altered, reordered, truncated, or the header changed.
    #[error("chunk {0} does not decrypt (altered, reordered, truncated, or the header was changed)")]
    Chunk(u64),
    /// The segment ends without its last chunk.
    #[error("the segment is truncated: its last chunk is missing")]
    Truncated,
    /// The compressed stream or the entries inside it are damaged.
    #[error("the contents are damaged: {0}")]
    Contents(String),
}

/// What a segment says about itself, in clear and bound to its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The algorithm: [`ALGORITHM_ZSTD_AES256GCM`] or
    /// [`ALGORITHM_AES256GCM`]; [`seal`] picks it.
    pub algorithm: u8,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// The segment's id (unique per collector).
    pub segment_id: String,
    /// The collector that sealed it.
    pub collector: String,
    /// The tenant of every batch in it.
    pub tenant: String,
    /// The host (certificate name) of every batch in it.
    pub host: String,
    /// Oldest record time, ns.
    pub first_ns: i64,
    /// Newest record time, ns.
    pub last_ns: i64,
    /// When it was sealed, ns.
    pub created_ns: i64,
    /// Batches in it.
    pub batches: u32,
    /// Records in it (stored ones: skipped records not counted).
    pub records: u64,
    /// Bytes of the entries before compression.
    pub raw_len: u64,
    /// The Ed25519 keys that signed its batches, as the collector saw them
    /// on the connection (the agent's certificate key).
    pub signers: Vec<[u8; 32]>,
}

/// One stored batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentEntry {
    /// When the collector received it.
    pub received_ns: i64,
    /// Leading records an earlier batch already stored.
    pub skip: u32,
    /// Index into [`SegmentHeader::signers`].
    pub signer: u8,
    /// The agent's signed batch, byte for byte.
    pub batch: Vec<u8>,
}

/// One stored batch, borrowed from a segment's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// When the collector received it.
    pub received_ns: i64,
    /// Leading records an earlier batch already stored.
    pub skip: u32,
    /// Index into [`SegmentHeader::signers`].
    pub signer: u8,
    /// The agent's signed batch, byte for byte.
    pub batch: &'a [u8],
}

impl EntryRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> SegmentEntry {
        SegmentEntry {
            received_ns: self.received_ns,
            skip: self.skip,
            signer: self.signer,
            batch: self.batch.to_vec(),
        }
    }
}

/// A sealed segment.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The object's bytes.
    pub bytes: Vec<u8>,
    /// The hash checkpoints sign (see the module page).
    pub hash: Hash,
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    let len = text.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&text.as_bytes()[..len]);
}

fn encode_header(header: &SegmentHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + 32 * header.signers.len());
    out.push(header.algorithm);
    out.extend_from_slice(&header.chunk_size.to_be_bytes());
    for text in [&header.segment_id, &header.collector, &header.tenant, &header.host] {
        put_text(&mut out, text);
    }
    for number in [header.first_ns, header.last_ns, header.created_ns] {
        out.extend_from_slice(&number.to_be_bytes());
    }
    out.extend_from_slice(&header.batches.to_be_bytes());
    out.extend_from_slice(&header.records.to_be_bytes());
    out.extend_from_slice(&header.raw_len.to_be_bytes());
    out.push(header.signers.len().min(MAX_SIGNERS) as u8);
    for signer in header.signers.iter().take(MAX_SIGNERS) {
        out.extend_from_slice(signer);
    }
    out
}

/// A cursor over bytes that fails, never panics, when they run out.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SegmentError> {
        if self.bytes.len() < n {
            return Err(SegmentError::Malformed(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SegmentError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn text(&mut self, what: &'static str) -> Result<String, SegmentError> {
        let len = u16::from_be_bytes(self.array(what)?) as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| SegmentError::Malformed(what))
    }
}

fn decode_header(bytes: &[u8]) -> Result<SegmentHeader, SegmentError> {
    let mut r = Reader { bytes };
    let algorithm = r.array::<1>("algorithm")?[0];
    if algorithm != ALGORITHM_ZSTD_AES256GCM && algorithm != ALGORITHM_AES256GCM {
        return Err(SegmentError::Malformed("unknown algorithm"));
    }
    let chunk_size = u32::from_be_bytes(r.array("chunk size")?);
    if !CHUNK_RANGE.contains(&chunk_size) {
        return Err(SegmentError::Malformed("chunk size out of range"));
    }
    let segment_id = r.text("segment id")?;
    let collector = r.text("collector")?;
    let tenant = r.text("tenant")?;
    let host = r.text("host")?;
    let first_ns = i64::from_be_bytes(r.array("first_ns")?);
    let last_ns = i64::from_be_bytes(r.array("last_ns")?);
    let created_ns = i64::from_be_bytes(r.array("created_ns")?);
    let batches = u32::from_be_bytes(r.array("batches")?);
    let records = u64::from_be_bytes(r.array("records")?);
    let raw_len = u64::from_be_bytes(r.array("raw_len")?);
    let count = r.array::<1>("signers")?[0] as usize;
    let mut signers = Vec::with_capacity(count);
    for _ in 0..count {
        signers.push(r.array::<32>("signer")?);
    }
    if !r.bytes.is_empty() {
        return Err(SegmentError::Malformed("trailing header bytes"));
    }
    Ok(SegmentHeader {
        algorithm,
        chunk_size,
        segment_id,
        collector,
        tenant,
        host,
        first_ns,
        last_ns,
        created_ns,
        batches,
        records,
        raw_len,
        signers,
    })
}

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut context = Context::new(&SHA256);
    for part in parts {
        context.update(part);
    }
    context.finish().as_ref().try_into().expect("32 bytes")
}

fn chunk_nonce(index: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[3] = u8::from(last);
    nonce[4..].copy_from_slice(&index.to_be_bytes());
    Nonce::assume_unique_for_key(nonce)
}

fn aes_key(bytes: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte AES-256 key"))
}

/// Appends one entry to a segment's plaintext.
pub fn encode_entry(out: &mut Vec<u8>, entry: &SegmentEntry) {
    encode_entry_parts(out, entry.received_ns, entry.skip, entry.signer, &entry.batch);
}

/// As [`encode_entry`], from borrowed parts (no copy of the batch first).
pub fn encode_entry_parts(out: &mut Vec<u8>, received_ns: i64, skip: u32, signer: u8, batch: &[u8]) {
    out.extend_from_slice(&((batch.len() + 13) as u32).to_be_bytes());
    out.extend_from_slice(&received_ns.to_be_bytes());
    out.extend_from_slice(&skip.to_be_bytes());
    out.push(signer);
    out.extend_from_slice(batch);
}

/// Seals `entries` (the plaintext [`encode_entry`] wrote) under a fresh
/// random data key wrapped by `kek`: compresses at `level` unless every
/// batch in them is already compressed, then encrypts in chunks.
/// `header.raw_len` and `header.algorithm` are set here.
pub fn seal(mut header: SegmentHeader, entries: &[u8], level: i32, kek: &Kek) -> Sealed {
    header.raw_len = entries.len() as u64;
    if all_compressed(entries) {
        header.algorithm = ALGORITHM_AES256GCM;
        return seal_compressed(header, entries, kek);
    }
    header.algorithm = ALGORITHM_ZSTD_AES256GCM;
    let compressed = zstd::bulk::compress(entries, level).expect("zstd compresses any input in memory");
    seal_compressed(header, &compressed, kek)
}

/// Whether every entry holds a batch whose records its sender compressed
/// (and there is at least one).
fn all_compressed(entries: &[u8]) -> bool {
    entry_refs(entries).is_ok_and(|entries| {
        !entries.is_empty()
            && entries.iter().all(|entry| {
                crate::batch::peek_header(entry.batch).is_ok_and(|h| h.codec == crate::batch::Codec::Zstd)
            })
    })
}

/// As [`seal`], for the stream `header.algorithm` names (zstd of the
/// entries, or the entries) as the caller made it.
pub fn seal_compressed(header: SegmentHeader, compressed: &[u8], kek: &Kek) -> Sealed {
    let rng = SystemRandom::new();
    let mut dek = [0u8; DEK_LEN];
    rng.fill(&mut dek).expect("the system random source works");
    let header_bytes = encode_header(&header);
    let mut bytes = Vec::with_capacity(compressed.len() + compressed.len() / 1024 + 512);
    bytes.extend_from_slice(&MAGIC);
    bytes.push(VERSION);
    bytes.extend_from_slice(&(header_bytes.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&header_bytes);
    let prefix_len = bytes.len();
    let aad = sha256(&[&bytes]);
    let wrap = wrap_key(&dek, &aad, kek, &rng);
    bytes.extend_from_slice(&(wrap.len() as u16).to_be_bytes());
    bytes.extend_from_slice(&wrap);
    let chunks_start = bytes.len();
    let key = aes_key(&dek);
    let chunk = header.chunk_size as usize;
    let count = compressed.len().div_ceil(chunk).max(1);
    for (index, piece) in compressed.chunks(chunk).chain(compressed.is_empty().then_some(&[][..])).enumerate()
    {
        let last = index + 1 == count;
        let start = bytes.len();
        bytes.extend_from_slice(piece);
        let tag = key
            .seal_in_place_separate_tag(chunk_nonce(index as u64, last), Aad::from(aad), &mut bytes[start..])
            .expect("AES-GCM seals any chunk under 64 GiB");
        bytes.extend_from_slice(tag.as_ref());
    }
    let hash = sha256(&[&bytes[..prefix_len], &bytes[chunks_start..]]);
    Sealed { bytes, hash }
}

fn wrap_key(dek: &[u8; DEK_LEN], aad: &Hash, kek: &Kek, rng: &SystemRandom) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).expect("the system random source works");
    let mut sealed = dek.to_vec();
    let tag = aes_key(kek.secret())
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut sealed)
        .expect("AES-GCM seals 32 bytes");
    let mut wrap = Vec::with_capacity(1 + kek.id().len() + NONCE_LEN + DEK_LEN + TAG);
    wrap.push(kek.id().len() as u8);
    wrap.extend_from_slice(kek.id().as_bytes());
    wrap.extend_from_slice(&nonce);
    wrap.extend_from_slice(&sealed);
    wrap.extend_from_slice(tag.as_ref());
    wrap
}

/// A segment's parts, found without any key.
#[derive(Debug, Clone)]
pub struct SegmentView<'a> {
    /// The decoded header.
    pub header: SegmentHeader,
    /// The id of the key-encryption key that wraps its data key.
    pub kek_id: String,
    prefix: &'a [u8],
    wrap: &'a [u8],
    chunks: &'a [u8],
}

impl<'a> SegmentView<'a> {
    /// Parses the clear parts of a segment (caps checked before use).
    pub fn parse(bytes: &'a [u8]) -> Result<SegmentView<'a>, SegmentError> {
        let mut r = Reader { bytes };
        if r.array::<4>("magic").ok() != Some(MAGIC) || r.array::<1>("version").ok() != Some([VERSION]) {
            return Err(SegmentError::NotASegment);
        }
        let header_len = u32::from_be_bytes(r.array("header length")?);
        if header_len > MAX_HEADER {
            return Err(SegmentError::TooLarge {
                what: "header",
                got: header_len.into(),
                cap: MAX_HEADER.into(),
            });
        }
        let header = decode_header(r.take(header_len as usize, "header")?)?;
        let prefix = &bytes[..9 + header_len as usize];
        let wrap_len = u16::from_be_bytes(r.array("wrap length")?) as usize;
        let wrap = r.take(wrap_len, "wrap")?;
        let mut w = Reader { bytes: wrap };
        let id_len = w.array::<1>("kek id")?[0] as usize;
        let kek_id = String::from_utf8(w.take(id_len, "kek id")?.to_vec())
            .map_err(|_| SegmentError::Malformed("kek id"))?;
        if w.bytes.len() != NONCE_LEN + DEK_LEN + TAG {
            return Err(SegmentError::Malformed("wrapped key length"));
        }
        Ok(SegmentView { header, kek_id, prefix, wrap, chunks: r.bytes })
    }

    /// The hash checkpoints sign: SHA-256 over the prefix and the chunks.
    pub fn hash(&self) -> Hash {
        sha256(&[self.prefix, self.chunks])
    }

    fn data_key(&self, keyring: &Keyring) -> Result<LessSafeKey, SegmentError> {
        let kek = keyring.get(&self.kek_id).ok_or_else(|| SegmentError::UnknownKek(self.kek_id.clone()))?;
        let rest = &self.wrap[1 + self.kek_id.len()..];
        let nonce: [u8; NONCE_LEN] = rest[..NONCE_LEN].try_into().expect("checked in parse");
        let mut sealed = rest[NONCE_LEN..].to_vec();
        let aad = sha256(&[self.prefix]);
        let dek = aes_key(kek.secret())
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut sealed)
            .map_err(|_| SegmentError::Unwrap)?;
        Ok(aes_key(dek))
    }

    /// What opening this segment's chunks in place needs, once the bytes
    /// are no longer borrowed by the view: the data key (unwrapped with
    /// `keyring`), where the chunks start in the segment's `len` bytes.
    ///
    /// `bytes` may be the segment's first bytes only (through the wrap):
    /// `len` is then the length of those, and the chunks are found where
    /// [`Opener::chunks_at`] says in the whole segment.
    pub fn opener(&self, keyring: &Keyring, len: usize) -> Result<Opener, SegmentError> {
        Ok(Opener {
            key: self.data_key(keyring)?,
            aad: sha256(&[self.prefix]),
            chunk_size: self.header.chunk_size as usize,
            prefix_len: self.prefix.len(),
            chunks_at: len - self.chunks.len(),
        })
    }

    /// Decrypts the chunks: the zstd stream, whole, or the first error.
    ///
    /// Every chunk but the last holds `chunk_size` bytes and a tag; each is
    /// opened into its own place in the output, so chunks are opened on
    /// every core at once. The error is the first chunk's, in order.
    pub fn decrypt(&self, keyring: &Keyring) -> Result<Vec<u8>, SegmentError> {
        let key = self.data_key(keyring)?;
        let aad = sha256(&[self.prefix]);
        let chunk = self.header.chunk_size as usize;
        let sealed_chunk = chunk + TAG;
        let total = self.chunks.len();
        if total < TAG {
            return Err(SegmentError::Truncated);
        }
        // Chunks before the last, and the last's sealed length.
        let full = (total - 1) / sealed_chunk;
        let last_len = total - full * sealed_chunk;
        if last_len < TAG {
            return Err(SegmentError::Truncated);
        }
        let mut out = vec![0u8; full * chunk + last_len - TAG];
        let mut places: Vec<&mut [u8]> = out.chunks_mut(chunk.max(1)).collect();
        if places.len() == full {
            places.push(&mut []); // a last chunk with no bytes, only its tag
        }
        let open = |index: usize, plain: &mut [u8]| -> Result<(), SegmentError> {
            let last = index == full;
            let start = index * sealed_chunk;
            let sealed = &self.chunks[start..start + if last { last_len } else { sealed_chunk }];
            let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG);
            plain.copy_from_slice(ciphertext);
            let tag = Tag::from(<[u8; TAG]>::try_from(tag).expect("split at TAG"));
            key.open_in_place_separate_tag(chunk_nonce(index as u64, last), Aad::from(aad), tag, plain, 0..)
                .map(|_| ())
                .map_err(|_| if last { SegmentError::Truncated } else { SegmentError::Chunk(index as u64) })
        };
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(places.len());
        let per_worker = places.len().div_ceil(workers.max(1));
        let opened: Vec<Result<(), SegmentError>> = if workers < 2 {
            places.into_iter().enumerate().map(|(index, plain)| open(index, plain)).collect()
        } else {
            std::thread::scope(|scope| {
                let open = &open;
                let handles: Vec<_> = places
                    .chunks_mut(per_worker)
                    .enumerate()
                    .map(|(group, plains)| {
                        scope.spawn(move || {
                            let first = group * per_worker;
                            // Stop at the first failure: the ones after it are never reported.
                            plains
                                .iter_mut()
                                .enumerate()
                                .map(|(offset, plain)| open(first + offset, plain))
                                .find(Result::is_err)
                                .unwrap_or(Ok(()))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                    .collect()
            })
        };
        opened.into_iter().collect::<Result<(), _>>()?;
        Ok(out)
    }

    /// Decrypts and decompresses the entries, with every size capped
    /// before allocation: the stream inflates to at most `max_raw` bytes.
    pub fn entries(&self, keyring: &Keyring, max_raw: u64) -> Result<Vec<SegmentEntry>, SegmentError> {
        let raw = self.plaintext(keyring, max_raw)?;
        Ok(entry_refs(&raw)?.iter().map(EntryRef::to_owned).collect())
    }

    /// The decrypted, inflated entries as one buffer, for [`entry_refs`]
    /// (no copy per entry); `max_raw` caps it as in [`SegmentView::entries`].
    pub fn plaintext(&self, keyring: &Keyring, max_raw: u64) -> Result<Vec<u8>, SegmentError> {
        if self.header.raw_len > max_raw {
            return Err(SegmentError::TooLarge {
                what: "raw length",
                got: self.header.raw_len,
                cap: max_raw,
            });
        }
        let decrypted = self.decrypt(keyring)?;
        if self.header.algorithm == ALGORITHM_AES256GCM {
            if decrypted.len() as u64 != self.header.raw_len {
                return Err(SegmentError::Contents(format!(
                    "{} bytes decrypted, the header says {}",
                    decrypted.len(),
                    self.header.raw_len
                )));
            }
            return Ok(decrypted);
        }
        decompress_capped(&decrypted, self.header.raw_len as usize)
    }

    /// Wraps this segment's data key under `new`: the same segment, the
    /// same hash, another KEK.
    pub fn rewrap(&self, keyring: &Keyring, new: &Kek) -> Result<Vec<u8>, SegmentError> {
        let kek = keyring.get(&self.kek_id).ok_or_else(|| SegmentError::UnknownKek(self.kek_id.clone()))?;
        let rest = &self.wrap[1 + self.kek_id.len()..];
        let nonce: [u8; NONCE_LEN] = rest[..NONCE_LEN].try_into().expect("checked in parse");
        let mut sealed = rest[NONCE_LEN..].to_vec();
        let aad = sha256(&[self.prefix]);
        let dek: [u8; DEK_LEN] = aes_key(kek.secret())
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut sealed)
            .map_err(|_| SegmentError::Unwrap)?
            .try_into()
            .map_err(|_| SegmentError::Unwrap)?;
        let wrap = wrap_key(&dek, &aad, new, &SystemRandom::new());
        let mut bytes = Vec::with_capacity(self.prefix.len() + wrap.len() + 2 + self.chunks.len());
        bytes.extend_from_slice(self.prefix);
        bytes.extend_from_slice(&(wrap.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&wrap);
        bytes.extend_from_slice(self.chunks);
        Ok(bytes)
    }
}

fn decompress_capped(compressed: &[u8], raw_len: usize) -> Result<Vec<u8>, SegmentError> {
    // The buffer is exactly the declared size, so zstd cannot write past it.
    let mut raw = Vec::with_capacity(raw_len);
    let mut decompressor =
        zstd::bulk::Decompressor::new().map_err(|e| SegmentError::Contents(e.to_string()))?;
    let written = decompressor
        .decompress_to_buffer(compressed, &mut raw)
        .map_err(|e| SegmentError::Contents(e.to_string()))?;
    if written != raw_len {
        return Err(SegmentError::Contents(format!("{written} bytes inflated, the header says {raw_len}")));
    }
    Ok(raw)
}

/// Splits a segment's plaintext into its entries.
pub fn decode_entries(raw: &[u8]) -> Result<Vec<SegmentEntry>, SegmentError> {
    Ok(entry_refs(raw)?.iter().map(EntryRef::to_owned).collect())
}

/// Splits a segment's plaintext into its entries, borrowed.
pub fn entry_refs(mut raw: &[u8]) -> Result<Vec<EntryRef<'_>>, SegmentError> {
    let mut entries = Vec::new();
    while !raw.is_empty() {
        let mut r = Reader { bytes: raw };
        let len = entry_len(r.array("entry length")?)?;
        entries.push(entry_ref(r.take(len, "entry")?)?);
        raw = r.bytes;
    }
    Ok(entries)
}

/// The length an entry's four-byte prefix gives, checked against its range.
pub(crate) fn entry_len(prefix: [u8; 4]) -> Result<usize, SegmentError> {
    let len = u32::from_be_bytes(prefix);
    if !(13..=MAX_ENTRY).contains(&len) {
        return Err(SegmentError::Contents(format!("entry length {len} out of range")));
    }
    Ok(len as usize)
}

/// An entry's fields, from the bytes after its length.
pub(crate) fn entry_ref(body: &[u8]) -> Result<EntryRef<'_>, SegmentError> {
    let mut b = Reader { bytes: body };
    let received_ns = i64::from_be_bytes(b.array("received")?);
    let skip = u32::from_be_bytes(b.array("skip")?);
    let signer = b.array::<1>("signer")?[0];
    Ok(EntryRef { received_ns, skip, signer, batch: b.bytes })
}

/// Opens a segment's chunks where they lie, one at a time: for a reader
/// that hashes each chunk before it is opened (the audit), or one that
/// reads a segment in ranges (index splits).
pub struct Opener {
    key: LessSafeKey,
    aad: Hash,
    /// Plaintext bytes of every chunk but the last.
    pub(crate) chunk_size: usize,
    /// Bytes of the hashed prefix (magic to header).
    pub(crate) prefix_len: usize,
    /// Where the chunks start.
    pub(crate) chunks_at: usize,
}

impl Opener {
    /// Opens chunk `index` (sealed bytes and tag) in place: its plaintext
    /// is the front of `sealed`, the tag's bytes are left behind.
    pub fn open<'a>(
        &self,
        index: u64,
        last: bool,
        sealed: &'a mut [u8],
    ) -> Result<&'a mut [u8], SegmentError> {
        let fail = || if last { SegmentError::Truncated } else { SegmentError::Chunk(index) };
        if sealed.len() < TAG || (!last && sealed.len() != self.chunk_size + TAG) {
            return Err(fail());
        }
        self.key.open_in_place(chunk_nonce(index, last), Aad::from(self.aad), sealed).map_err(|_| fail())
    }

    /// Plaintext bytes of every chunk but the last.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Where the chunks start in the segment.
    pub fn chunks_at(&self) -> usize {
        self.chunks_at
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("chunk_size", &self.chunk_size).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keyring() -> (Keyring, Kek) {
        let kek = Kek::generate("k1").unwrap();
        let mut keyring = Keyring::default();
        keyring.insert(kek.clone());
        (keyring, kek)
    }

    fn header(chunk_size: u32) -> SegmentHeader {
        SegmentHeader {
            algorithm: ALGORITHM_ZSTD_AES256GCM,
            chunk_size,
            segment_id: "00000000000000000001".into(),
            collector: "c1".into(),
            tenant: "acme".into(),
            host: "web-1".into(),
            first_ns: 1,
            last_ns: 2,
            created_ns: 3,
            batches: 3,
            records: 30,
            raw_len: 0,
            signers: vec![[7; 32]],
        }
    }

    fn entries(n: usize, size: usize) -> (Vec<SegmentEntry>, Vec<u8>) {
        let list: Vec<SegmentEntry> = (0..n)
            .map(|i| SegmentEntry {
                received_ns: i as i64,
                skip: i as u32 % 2,
                signer: 0,
                batch: (0..size).map(|j| (i * 31 + j * 7 % 251) as u8).collect(),
            })
            .collect();
        let mut raw = Vec::new();
        for entry in &list {
            encode_entry(&mut raw, entry);
        }
        (list, raw)
    }

    #[test]
    fn seal_then_open_is_identity_at_every_chunk_boundary() {
        let (keyring, kek) = keyring();
        for (n, size, chunk) in
            [(0, 0, 4096), (1, 10, 4096), (3, 5000, 4096), (50, 3000, 4096), (2, 1 << 20, 1 << 20)]
        {
            let (list, raw) = entries(n, size);
            let sealed = seal(header(chunk), &raw, 3, &kek);
            let view = SegmentView::parse(&sealed.bytes).unwrap();
            assert_eq!(view.hash(), sealed.hash);
            assert_eq!(view.header.raw_len, raw.len() as u64);
            assert_eq!(view.kek_id, "k1");
            assert_eq!(view.entries(&keyring, 1 << 30).unwrap(), list);
        }
    }

    #[test]
    fn any_tampering_is_caught() {
        let (keyring, kek) = keyring();
        let (_, raw) = entries(40, 4000);
        // Random-ish bytes so that the zstd stream spans several chunks.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..20_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let raw = [raw, noise].concat();
        let sealed = seal(header(4096), &raw, 3, &kek);
        let view = SegmentView::parse(&sealed.bytes).unwrap();
        let chunks_at = sealed.bytes.len() - view.chunks.len();
        let sealed_chunk = 4096 + TAG;
        assert!(view.chunks.len() > 4 * sealed_chunk, "several chunks");

        // A flipped byte in a chunk.
        let mut flipped = sealed.bytes.clone();
        flipped[chunks_at + 10] ^= 1;
        assert_eq!(SegmentView::parse(&flipped).unwrap().decrypt(&keyring), Err(SegmentError::Chunk(0)));
        assert_ne!(SegmentView::parse(&flipped).unwrap().hash(), sealed.hash);
        // Chunks are opened on every core; the error is still the first
        // damaged chunk's, in order.
        let mut two = sealed.bytes.clone();
        two[chunks_at + 3 * sealed_chunk + 1] ^= 1;
        two[chunks_at + sealed_chunk + 1] ^= 1;
        assert_eq!(SegmentView::parse(&two).unwrap().decrypt(&keyring), Err(SegmentError::Chunk(1)));

        // Cut at a chunk boundary: the new last chunk was not sealed as last.
        let truncated = &sealed.bytes[..chunks_at + sealed_chunk];
        assert_eq!(SegmentView::parse(truncated).unwrap().decrypt(&keyring), Err(SegmentError::Truncated));
        let cut = &sealed.bytes[..sealed.bytes.len() - 5];
        assert_eq!(SegmentView::parse(cut).unwrap().decrypt(&keyring), Err(SegmentError::Truncated));

        // Two chunks swapped.
        let mut swapped = sealed.bytes.clone();
        let (a, b) = (chunks_at, chunks_at + sealed_chunk);
        let first = swapped[a..a + sealed_chunk].to_vec();
        let second = swapped[b..b + sealed_chunk].to_vec();
        swapped[a..a + sealed_chunk].copy_from_slice(&second);
        swapped[b..b + sealed_chunk].copy_from_slice(&first);
        assert_eq!(SegmentView::parse(&swapped).unwrap().decrypt(&keyring), Err(SegmentError::Chunk(0)));

        // A changed header (another tenant): the wrap and the chunks fail.
        let mut other = header(4096);
        other.tenant = "evil".into();
        let mut forged = Vec::new();
        let other_header = encode_header(&SegmentHeader { raw_len: raw.len() as u64, ..other });
        forged.extend_from_slice(&MAGIC);
        forged.push(VERSION);
        forged.extend_from_slice(&(other_header.len() as u32).to_be_bytes());
        forged.extend_from_slice(&other_header);
        let wrap_at = 9 + encode_header(&SegmentHeader { raw_len: raw.len() as u64, ..header(4096) }).len();
        forged.extend_from_slice(&sealed.bytes[wrap_at..]);
        assert_eq!(SegmentView::parse(&forged).unwrap().decrypt(&keyring), Err(SegmentError::Unwrap));

        // Another segment's wrap does not open this one.
        let sealed_again = seal(header(4096), &raw, 3, &kek);
        let view_again = SegmentView::parse(&sealed_again.bytes).unwrap();
        let mut moved = sealed.bytes[..wrap_at].to_vec();
        moved.extend_from_slice(&(view_again.wrap.len() as u16).to_be_bytes());
        moved.extend_from_slice(view_again.wrap);
        moved.extend_from_slice(view.chunks);
        assert!(SegmentView::parse(&moved).unwrap().decrypt(&keyring).is_err());

        // Without the KEK, nothing opens.
        assert_eq!(
            SegmentView::parse(&sealed.bytes).unwrap().decrypt(&Keyring::default()),
            Err(SegmentError::UnknownKek("k1".into()))
        );
    }

    #[test]
    fn rewrapping_keeps_the_data_and_the_hash() {
        let (mut keyring, _) = keyring();
        let (list, raw) = entries(5, 100);
        let old = keyring.get("k1").unwrap().clone();
        let sealed = seal(header(4096), &raw, 3, &old);
        let new = Kek::generate("k2").unwrap();
        keyring.insert(new.clone());
        let rewrapped = SegmentView::parse(&sealed.bytes).unwrap().rewrap(&keyring, &new).unwrap();
        let view = SegmentView::parse(&rewrapped).unwrap();
        assert_eq!(view.kek_id, "k2");
        assert_eq!(view.hash(), sealed.hash);
        let mut only_new = Keyring::default();
        only_new.insert(new);
        assert_eq!(view.entries(&only_new, 1 << 20).unwrap(), list);
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_it_inflates() {
        let (keyring, kek) = keyring();
        let (_, raw) = entries(1, 10);
        let sealed = seal(header(4096), &raw, 3, &kek);
        let view = SegmentView::parse(&sealed.bytes).unwrap();
        assert!(matches!(view.entries(&keyring, 5), Err(SegmentError::TooLarge { .. })));
        // A header that understates the raw length stops zstd at the buffer.
        let zeros = vec![0u8; 1 << 20];
        let mut lying = header(4096);
        lying.raw_len = 100;
        let compressed = zstd::bulk::compress(&zeros, 3).unwrap();
        let sealed = seal_compressed(lying, &compressed, &kek);
        let view = SegmentView::parse(&sealed.bytes).unwrap();
        assert!(matches!(view.entries(&keyring, 1 << 30), Err(SegmentError::Contents(_))));
    }

    proptest! {
        #[test]
        fn parsing_and_opening_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (keyring, _) = keyring();
            if let Ok(view) = SegmentView::parse(&bytes) {
                let _ = view.hash();
                let _ = view.entries(&keyring, 1 << 20);
            }
            let _ = decode_entries(&bytes);
        }

        #[test]
        fn a_damaged_real_segment_never_panics(flip in 0usize..4096, bit in 0u8..8) {
            let (keyring, kek) = keyring();
            let (_, raw) = entries(3, 300);
            let sealed = seal(header(4096), &raw, 3, &kek);
            let mut bytes = sealed.bytes.clone();
            let at = flip % bytes.len();
            bytes[at] ^= 1 << bit;
            if let Ok(view) = SegmentView::parse(&bytes) {
                prop_assert!(view.entries(&keyring, 1 << 20).is_err() || view.hash() == sealed.hash);
            }
        }
    }

    /// Entries whose batches their senders compressed are sealed without
    /// a second zstd pass and open to the same bytes; one uncompressed
    /// batch among them makes the segment zstd again.
    #[test]
    fn compressed_batches_are_sealed_as_they_are() {
        use crate::batch::{BatchBuilder, Deflater};
        use crate::record::{Level, WireRecord};
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap();
        let batch = |compress: bool| {
            let mut builder = BatchBuilder::new("web-1", "/var/log/a.log", 1, 0, [0; 32]);
            for i in 0..200 {
                builder.push(WireRecord::new(
                    i,
                    Level::Info,
                    format!("line {i} of a log that repeats itself"),
                ));
            }
            builder.sign_with(&key, compress.then(|| Deflater::zstd(1).unwrap()).as_mut())
        };
        let (keyring, kek) = keyring();
        let mut entries = Vec::new();
        encode_entry_parts(&mut entries, 5, 0, 0, &batch(true));
        encode_entry_parts(&mut entries, 6, 0, 0, &batch(true));
        let sealed = seal(header(4096), &entries, 3, &kek);
        let view = SegmentView::parse(&sealed.bytes).unwrap();
        assert_eq!(view.header.algorithm, ALGORITHM_AES256GCM);
        assert_eq!(view.plaintext(&keyring, u64::MAX).unwrap(), entries);
        assert_eq!(view.hash(), sealed.hash);
        encode_entry_parts(&mut entries, 7, 0, 0, &batch(false));
        let sealed = seal(header(4096), &entries, 3, &kek);
        let view = SegmentView::parse(&sealed.bytes).unwrap();
        assert_eq!(view.header.algorithm, ALGORITHM_ZSTD_AES256GCM);
        assert_eq!(view.plaintext(&keyring, u64::MAX).unwrap(), entries);
        assert!(sealed.bytes.len() < entries.len(), "the plain batch was compressed");
    }
}
