//! The signed batch: the unit an agent ships and the collector stores.
//!
//! Layout (version 3, big-endian; `storage/FORMAT.md` is the reference):
//!
//! ```text
//! magic "LVB" | version 0x03
//! agent_id  u16 len + UTF-8        the agent's identity (its certificate's SAN)
//! source    u16 len + UTF-8        the stream's source (the path it tails)
//! epoch     u64                    the generation of the source's file
//! first_seq u64                    seq of the first record in this epoch
//! count     u32                    number of records
//! codec     u8                     0 none, 1 zstd: how the record section is stored
//! raw_len   u32                    bytes of the record section once decoded
//! prev_hash [32]                   hash of the previous batch of this stream+epoch
//! body_len  u32                    bytes of the record section as stored
//! body_sha  [32]                   SHA-256 of the record section as stored
//! signature [64]                   Ed25519 over every byte above
//! records   the record section, compressed when codec says so
//! ```
//!
//! Version 3's record section is laid out by column: every message, each
//! ended by the byte 0xFF (which UTF-8 never holds), then the timestamps as
//! deltas, the levels, the flags and the fields, then the lengths of the
//! first two columns. Kept apart, the lines compress as the text they came
//! from, and the metadata beside them to almost nothing. Version 2 is the
//! same header with one record after another; version 1 is version 2
//! without `codec` and `raw_len` (never compressed). Both are still read. The signature covers the stored bytes, so a receiver
//! checks it before it inflates anything, and `raw_len` is checked against a
//! cap before the output buffer is allocated.
//!
//! A batch's hash is SHA-256 over the header and the signature; the next
//! batch of the same stream and epoch names it as `prev_hash`.

use ring::digest;
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};

use crate::record::{Level, WireRecord};
use crate::wire::{Reader, Truncated, put_str16, put_str32};

/// The four bytes every version-1 batch starts with.
pub const MAGIC_V1: [u8; 4] = *b"LVB\x01";
/// The four bytes every version-2 batch starts with.
pub const MAGIC_V2: [u8; 4] = *b"LVB\x02";
/// The four bytes every version-3 batch starts with: what this release writes.
pub const MAGIC_V3: [u8; 4] = *b"LVB\x03";
/// The byte that ends each message in a version-3 record section: never
/// part of UTF-8.
const MESSAGE_END: u8 = 0xFF;
/// Bytes of the lengths that close a version-3 record section.
const COLUMNS_TRAILER: usize = 8;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Caps applied while decoding, each checked before the bytes it guards are
/// allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most records one batch may carry.
    pub max_records: u32,
    /// Most bytes of one record's message.
    pub max_message_bytes: u32,
    /// Most fields one record may carry.
    pub max_fields: u16,
    /// Most bytes of one field value.
    pub max_field_value_bytes: u32,
    /// Most bytes of a record section once decompressed: the output buffer
    /// is never larger, whatever the compressed bytes say.
    pub max_raw_bytes: u32,
}

impl Limits {
    /// No caps beyond the format's own: for re-reading batches that were
    /// checked against real limits when they arrived.
    pub const TRUSTED: Limits = Limits {
        max_records: u32::MAX,
        max_message_bytes: u32::MAX,
        max_fields: u16::MAX,
        max_field_value_bytes: u32::MAX,
        max_raw_bytes: u32::MAX,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_records: 100_000,
            max_message_bytes: 1024 * 1024,
            max_fields: 256,
            max_field_value_bytes: 64 * 1024,
            max_raw_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The bytes do not start with a batch magic this version reads.
    #[error("not a logvault batch (magic {found:02x?}, expected {MAGIC_V3:02x?})")]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// The input ended inside the named item.
    #[error("batch truncated inside {0}")]
    Truncated(&'static str),
    /// A count or length is over its limit.
    #[error("{what} is {found}, over the limit of {limit}")]
    OverLimit {
        /// Which count or length.
        what: &'static str,
        /// What the batch claimed.
        found: u64,
        /// The cap in force.
        limit: u64,
    },
    /// A string is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A level byte no version defines.
    #[error("unknown level byte {0}")]
    UnknownLevel(u8),
    /// The record section does not hash to `body_sha`.
    #[error("record section does not match its SHA-256 in the header")]
    BodyHashMismatch,
    /// The record section holds more or fewer bytes than `body_len` says.
    #[error("record section has {found} bytes, header says {declared}")]
    BodyLength {
        /// Bytes left after the header.
        found: u64,
        /// `body_len` from the header.
        declared: u64,
    },
    /// The signature does not verify under the agent's key.
    #[error("signature does not verify under the agent's certificate key")]
    BadSignature,
    /// A codec byte no version defines.
    #[error("unknown codec byte {0}")]
    UnknownCodec(u8),
    /// The compressed record section does not inflate to exactly `raw_len` bytes.
    #[error("record section does not decompress to its declared {declared} bytes: {reason}")]
    Decompress {
        /// `raw_len` from the header.
        declared: u32,
        /// What zstd said, or the size it produced.
        reason: String,
    },
    /// `first_seq + count` does not fit in 64 bits.
    #[error("sequence range {first_seq} + {count} overflows")]
    SeqOverflow {
        /// The batch's first sequence number.
        first_seq: u64,
        /// Its record count.
        count: u32,
    },
}

impl From<Truncated> for BatchError {
    fn from(t: Truncated) -> Self {
        BatchError::Truncated(t.0)
    }
}

/// How a batch's record section is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// As is.
    None,
    /// One zstd frame.
    Zstd,
}

impl Codec {
    fn to_byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
        }
    }

    fn from_byte(byte: u8) -> Result<Codec, BatchError> {
        match byte {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Zstd),
            other => Err(BatchError::UnknownCodec(other)),
        }
    }
}

/// The signed part of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    /// Format version: 1, 2 or 3. Kept so the signed bytes can be rebuilt
    /// and the record section read in its layout.
    pub version: u8,
    /// The agent's identity as it claims it; the collector checks it against
    /// the client certificate.
    pub agent_id: String,
    /// The source of the stream (the path tailed).
    pub source: String,
    /// The generation of the source's file: a rotation or truncation starts
    /// a new epoch whose sequence numbers start at 0.
    pub epoch: u64,
    /// Sequence number of the first record, counted within the epoch.
    pub first_seq: u64,
    /// Number of records.
    pub count: u32,
    /// How the record section is stored.
    pub codec: Codec,
    /// Length of the record section once decoded.
    pub raw_len: u32,
    /// Hash of the previous batch of this stream and epoch, zeros for the first.
    pub prev_hash: [u8; 32],
    /// Length of the record section as stored.
    pub body_len: u32,
    /// SHA-256 of the record section as stored.
    pub body_sha: [u8; 32],
}

impl BatchHeader {
    /// Sequence number one past the last record.
    pub fn end_seq(&self) -> u64 {
        self.first_seq.saturating_add(u64::from(self.count))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(match self.version {
            1 => &MAGIC_V1,
            2 => &MAGIC_V2,
            _ => &MAGIC_V3,
        });
        put_str16(out, &self.agent_id);
        put_str16(out, &self.source);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.first_seq.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        if self.version != 1 {
            out.push(self.codec.to_byte());
            out.extend_from_slice(&self.raw_len.to_be_bytes());
        }
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.body_len.to_be_bytes());
        out.extend_from_slice(&self.body_sha);
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, BatchError> {
        let magic = reader.array::<4>("magic")?;
        let version = match magic {
            MAGIC_V1 => 1,
            MAGIC_V2 => 2,
            MAGIC_V3 => 3,
            _ => return Err(BatchError::BadMagic { found: magic.to_vec() }),
        };
        let agent_id = read_str16(reader, "agent_id")?;
        let source = read_str16(reader, "source")?;
        let epoch = reader.u64("epoch")?;
        let first_seq = reader.u64("first_seq")?;
        let count = reader.u32("count")?;
        let (codec, raw_len) = if version == 1 {
            (Codec::None, None)
        } else {
            (Codec::from_byte(reader.u8("codec")?)?, Some(reader.u32("raw_len")?))
        };
        let prev_hash = reader.array("prev_hash")?;
        let body_len = reader.u32("body_len")?;
        let header = BatchHeader {
            version,
            agent_id,
            source,
            epoch,
            first_seq,
            count,
            codec,
            raw_len: raw_len.unwrap_or(body_len),
            prev_hash,
            body_len,
            body_sha: reader.array("body_sha")?,
        };
        if header.codec == Codec::None && header.raw_len != header.body_len {
            return Err(BatchError::BodyLength {
                found: header.body_len.into(),
                declared: header.raw_len.into(),
            });
        }
        if header.first_seq.checked_add(u64::from(header.count)).is_none() {
            return Err(BatchError::SeqOverflow { first_seq: header.first_seq, count: header.count });
        }
        Ok(header)
    }
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The signed header.
    pub header: BatchHeader,
    /// Ed25519 signature over the encoded header.
    pub signature: [u8; SIGNATURE_LEN],
    /// The records, `header.count` of them.
    pub records: Vec<WireRecord>,
    /// SHA-256 of header and signature: what the next batch names as `prev_hash`.
    pub hash: [u8; 32],
    /// Length of the encoded header (the signed bytes).
    signed_len: usize,
}

impl Batch {
    /// Decodes and checks the structure of a batch: magic, lengths against
    /// `limits`, the record section's hash. The signature is checked by
    /// [`Batch::verify`], which needs the agent's key.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Batch, BatchError> {
        let view = BatchView::parse(bytes, limits)?;
        let mut inflater = Inflater::new();
        let body = view.records(limits, &mut inflater)?;
        let mut records = Vec::with_capacity((view.header.count as usize).min(body.body.len() / 6));
        body.for_each(limits, |record| records.push(record.to_owned()))?;
        let BatchView { header, signature, hash, signed_len, .. } = view;
        Ok(Batch { header, signature, records, hash, signed_len })
    }

    /// Checks the signature against the raw 32-byte Ed25519 public key bound
    /// to the agent's certificate. `encoded` must be the bytes this batch
    /// was decoded from.
    pub fn verify_encoded(&self, encoded: &[u8], public_key: &[u8]) -> Result<(), BatchError> {
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&encoded[..self.signed_len], &self.signature)
            .map_err(|_| BatchError::BadSignature)
    }

    /// Checks the signature by re-encoding the header.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), BatchError> {
        let mut signed = Vec::with_capacity(self.signed_len);
        self.header.encode(&mut signed);
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&signed, &self.signature)
            .map_err(|_| BatchError::BadSignature)
    }
}

/// Reads just the header of an encoded batch, without touching records.
pub fn peek_header(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    BatchHeader::decode(&mut Reader::new(bytes))
}

fn batch_hash(header_and_signature: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, header_and_signature).as_ref());
    out
}

fn read_str16(reader: &mut Reader<'_>, what: &'static str) -> Result<String, BatchError> {
    let len = reader.u16(what)? as usize;
    let bytes = reader.take(len, what)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| BatchError::NotUtf8(what))
}

/// A batch checked in place, without copying its records: what the
/// collector's ingest path uses, so validating a batch allocates nothing per
/// record.
///
/// [`BatchView::parse`] checks the framing and the stored section's hash;
/// [`BatchView::verify`] the signature; only then does
/// [`BatchView::records`] inflate and walk the records.
#[derive(Debug)]
pub struct BatchView<'a> {
    /// The signed header.
    pub header: BatchHeader,
    /// Ed25519 signature over the encoded header.
    pub signature: [u8; SIGNATURE_LEN],
    /// SHA-256 of header and signature.
    pub hash: [u8; 32],
    signed: &'a [u8],
    signed_len: usize,
    body: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Checks magic, lengths against `limits` (record count, decoded size)
    /// and the stored record section's hash. Records are checked by
    /// [`BatchView::records`].
    pub fn parse(bytes: &'a [u8], limits: &Limits) -> Result<BatchView<'a>, BatchError> {
        let mut reader = Reader::new(bytes);
        let header = BatchHeader::decode(&mut reader)?;
        let signed_len = reader.position();
        let signature = reader.array::<SIGNATURE_LEN>("signature")?;
        let hash = batch_hash(&bytes[..reader.position()]);
        if header.count > limits.max_records {
            return Err(BatchError::OverLimit {
                what: "record count",
                found: header.count.into(),
                limit: limits.max_records.into(),
            });
        }
        if header.raw_len > limits.max_raw_bytes {
            return Err(BatchError::OverLimit {
                what: "decoded record section",
                found: header.raw_len.into(),
                limit: limits.max_raw_bytes.into(),
            });
        }
        if reader.remaining() != header.body_len as usize {
            return Err(BatchError::BodyLength {
                found: reader.remaining() as u64,
                declared: header.body_len.into(),
            });
        }
        let body = reader.take(header.body_len as usize, "records")?;
        if digest::digest(&digest::SHA256, body).as_ref() != header.body_sha {
            return Err(BatchError::BodyHashMismatch);
        }
        Ok(BatchView { header, signature, hash, signed: &bytes[..signed_len], signed_len, body })
    }

    /// Checks the signature against the raw 32-byte Ed25519 public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), BatchError> {
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(self.signed, &self.signature)
            .map_err(|_| BatchError::BadSignature)
    }

    /// The record section, inflated into `inflater`'s buffer when it is
    /// compressed (never past `raw_len`, itself capped by `limits`), with
    /// every record checked: UTF-8, caps, exact length.
    pub fn records<'s>(&self, limits: &Limits, inflater: &'s mut Inflater) -> Result<Records<'s>, BatchError>
    where
        'a: 's,
    {
        let body: &'s [u8] = match self.header.codec {
            Codec::None => self.body,
            Codec::Zstd => inflater.inflate(self.body, self.header.raw_len)?,
        };
        let records = Records { body, count: self.header.count, columns: self.header.version >= 3 };
        records.for_each(limits, |_| {})?;
        Ok(records)
    }
}

/// Reusable state for inflating compressed record sections: one per
/// connection or reader, so steady-state decoding allocates nothing.
#[derive(Default)]
pub struct Inflater {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").field("buffer_capacity", &self.buffer.capacity()).finish()
    }
}

impl Inflater {
    /// An inflater with no buffer yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn inflate(&mut self, compressed: &[u8], raw_len: u32) -> Result<&[u8], BatchError> {
        let fail = |reason: String| BatchError::Decompress { declared: raw_len, reason };
        if self.zstd.is_none() {
            self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| fail(e.to_string()))?);
        }
        let zstd = self.zstd.as_mut().expect("set above");
        // A buffer kept from a huge batch is not kept for ever.
        if self.buffer.capacity() > 4 * (raw_len as usize).max(1024 * 1024) {
            self.buffer = Vec::new();
        }
        self.buffer.clear();
        // The capacity is the hard cap: zstd never writes past it.
        self.buffer.reserve_exact(raw_len as usize);
        let capacity = self.buffer.capacity();
        let written =
            zstd.decompress_to_buffer(compressed, &mut self.buffer).map_err(|e| fail(e.to_string()))?;
        if written != raw_len as usize || capacity < written {
            return Err(fail(format!("it gave {written} bytes")));
        }
        Ok(&self.buffer)
    }
}

/// Reusable state for compressing record sections on the agent.
pub struct Deflater {
    zstd: zstd::bulk::Compressor<'static>,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater").finish_non_exhaustive()
    }
}

impl Deflater {
    /// A zstd compressor at `level` (1 is fast; 3 is zstd's default).
    pub fn zstd(level: i32) -> std::io::Result<Self> {
        Ok(Self { zstd: zstd::bulk::Compressor::new(level)?, buffer: Vec::new() })
    }

    /// Compresses `raw`; `None` when that would not make it smaller.
    fn deflate(&mut self, raw: &[u8]) -> Option<&[u8]> {
        self.buffer.clear();
        self.buffer.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        match self.zstd.compress_to_buffer(raw, &mut self.buffer) {
            Ok(n) if n < raw.len() => Some(&self.buffer[..n]),
            _ => None,
        }
    }
}

/// A batch's checked record section, borrowed from the batch or from an
/// [`Inflater`].
#[derive(Debug, Clone, Copy)]
pub struct Records<'s> {
    body: &'s [u8],
    count: u32,
    /// Version 3's layout by column, else one record after another.
    columns: bool,
}

impl<'s> Records<'s> {
    /// Calls `each` with every record, in order, borrowing from the section.
    pub fn for_each(&self, limits: &Limits, each: impl FnMut(RecordRef<'s>)) -> Result<(), BatchError> {
        if self.columns { self.for_each_by_column(limits, each) } else { self.for_each_by_row(limits, each) }
    }

    fn for_each_by_row(
        &self,
        limits: &Limits,
        mut each: impl FnMut(RecordRef<'s>),
    ) -> Result<(), BatchError> {
        let mut reader = Reader::new(self.body);
        for _ in 0..self.count {
            let timestamp_ns = reader.i64("timestamp")?;
            let level = read_level(reader.u8("level")?)?;
            let flags = reader.u8("flags")?;
            let message = read_str32_ref(&mut reader, "message", limits.max_message_bytes)?;
            let (fields, field_count) = read_fields(&mut reader, self.body, limits)?;
            each(RecordRef { timestamp_ns, level, flags, message, fields, field_count });
        }
        if reader.remaining() != 0 {
            return Err(BatchError::BodyLength {
                found: self.body.len() as u64,
                declared: reader.position() as u64,
            });
        }
        Ok(())
    }

    fn for_each_by_column(
        &self,
        limits: &Limits,
        mut each: impl FnMut(RecordRef<'s>),
    ) -> Result<(), BatchError> {
        let body = self.body;
        let count = self.count as usize;
        let trailer_at =
            body.len().checked_sub(COLUMNS_TRAILER).ok_or(BatchError::Truncated("column lengths"))?;
        let mut trailer = Reader::new(&body[trailer_at..]);
        let messages_len = trailer.u32("column lengths")? as usize;
        let times_len = trailer.u32("column lengths")? as usize;
        let column_end = |start: usize, len: usize, what: &'static str| {
            start.checked_add(len).filter(|end| *end <= trailer_at).ok_or(BatchError::Truncated(what))
        };
        let times_at = column_end(0, messages_len, "messages")?;
        let levels_at = column_end(times_at, times_len, "timestamps")?;
        let flags_at = column_end(levels_at, count, "levels")?;
        let fields_at = column_end(flags_at, count, "flags")?;
        let (messages, times) = (&body[..times_at], &body[times_at..levels_at]);
        let (levels, flags) = (&body[levels_at..flags_at], &body[flags_at..fields_at]);
        let fields_section = &body[..trailer_at];
        let mut fields = Reader::new(fields_section);
        fields.take(fields_at, "fields")?;
        let (mut message_at, mut time_at, mut timestamp_ns) = (0usize, 0usize, 0i64);
        for index in 0..count {
            // 0xFF is never UTF-8, so one pass both finds the message's end
            // and checks everything before it.
            let rest = &messages[message_at..];
            let Some(chunk) = rest.utf8_chunks().next().filter(|chunk| !chunk.invalid().is_empty()) else {
                return Err(BatchError::Truncated("message"));
            };
            if chunk.invalid()[0] != MESSAGE_END {
                return Err(BatchError::NotUtf8("message"));
            }
            let message = chunk.valid();
            let len = message.len();
            if len > limits.max_message_bytes as usize {
                return Err(BatchError::OverLimit {
                    what: "message",
                    found: len as u64,
                    limit: limits.max_message_bytes.into(),
                });
            }
            message_at += len + 1;
            let delta = read_varint(times, &mut time_at)?;
            timestamp_ns = timestamp_ns.wrapping_add(unzigzag(delta));
            let level = read_level(levels[index])?;
            let (record_fields, field_count) = read_fields(&mut fields, fields_section, limits)?;
            each(RecordRef {
                timestamp_ns,
                level,
                flags: flags[index],
                message,
                fields: record_fields,
                field_count,
            });
        }
        if message_at != messages.len() || time_at != times.len() || fields.remaining() != 0 {
            return Err(BatchError::BodyLength {
                found: body.len() as u64,
                declared: fields.position() as u64,
            });
        }
        Ok(())
    }
}

fn read_level(byte: u8) -> Result<Level, BatchError> {
    Level::from_byte(byte).ok_or(BatchError::UnknownLevel(byte))
}

/// One record's fields: the checked bytes of its pairs (without the count)
/// and how many there are.
fn read_fields<'s>(
    reader: &mut Reader<'s>,
    section: &'s [u8],
    limits: &Limits,
) -> Result<(&'s [u8], u16), BatchError> {
    let field_count = reader.u16("field count")?;
    if field_count > limits.max_fields {
        return Err(BatchError::OverLimit {
            what: "field count",
            found: field_count.into(),
            limit: limits.max_fields.into(),
        });
    }
    let start = reader.position();
    for _ in 0..field_count {
        let len = reader.u16("field name")? as usize;
        let name = reader.take(len, "field name")?;
        std::str::from_utf8(name).map_err(|_| BatchError::NotUtf8("field name"))?;
        read_str32_ref(reader, "field value", limits.max_field_value_bytes)?;
    }
    Ok((&section[start..reader.position()], field_count))
}

/// A LEB128 varint of at most ten bytes, the tenth holding one bit, in its
/// shortest form (no last byte of zero after the first), so that a section
/// reads back from its records byte for byte.
fn read_varint(bytes: &[u8], at: &mut usize) -> Result<u64, BatchError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(BatchError::Truncated("timestamps"))?;
        *at += 1;
        if (shift == 63 && byte > 1) || (shift > 0 && byte == 0) {
            return Err(BatchError::Truncated("timestamps"));
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(BatchError::Truncated("timestamps"))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(delta: i64) -> u64 {
    ((delta << 1) ^ (delta >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// One record borrowed from a [`BatchView`].
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Event time, ns since the epoch.
    pub timestamp_ns: i64,
    /// Normalised severity.
    pub level: Level,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// The line.
    pub message: &'a str,
    fields: &'a [u8],
    field_count: u16,
}

impl<'a> RecordRef<'a> {
    /// The record's fields, already checked by [`BatchView::parse`].
    pub fn fields(&self) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
        let mut reader = Reader::new(self.fields);
        (0..self.field_count).map_while(move |_| {
            let len = reader.u16("field name").ok()? as usize;
            let name = std::str::from_utf8(reader.take(len, "field name").ok()?).ok()?;
            let len = reader.u32("field value").ok()? as usize;
            let value = std::str::from_utf8(reader.take(len, "field value").ok()?).ok()?;
            Some((name, value))
        })
    }

    /// An owned copy.
    pub fn to_owned(&self) -> WireRecord {
        WireRecord {
            timestamp_ns: self.timestamp_ns,
            level: self.level,
            flags: self.flags,
            message: self.message.to_owned(),
            fields: self.fields().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
        }
    }
}

fn read_str32_ref<'a>(
    reader: &mut Reader<'a>,
    what: &'static str,
    limit: u32,
) -> Result<&'a str, BatchError> {
    let len = reader.u32(what)?;
    if len > limit {
        return Err(BatchError::OverLimit { what, found: len.into(), limit: limit.into() });
    }
    let bytes = reader.take(len as usize, what)?;
    std::str::from_utf8(bytes).map_err(|_| BatchError::NotUtf8(what))
}

/// Builds and signs a batch on the agent, column by column (version 3).
#[derive(Debug)]
pub struct BatchBuilder {
    header: BatchHeader,
    /// The messages column, which the other columns join when the batch is
    /// signed.
    body: Vec<u8>,
    times: Vec<u8>,
    levels: Vec<u8>,
    flags: Vec<u8>,
    fields: Vec<u8>,
    last_timestamp_ns: i64,
}

impl BatchBuilder {
    /// Starts a batch of `source` (epoch `epoch`) whose first record has
    /// sequence number `first_seq`, chained to `prev_hash`.
    ///
    /// Names longer than 65,535 bytes are cut at a character boundary.
    pub fn new(agent_id: &str, source: &str, epoch: u64, first_seq: u64, prev_hash: [u8; 32]) -> Self {
        Self {
            header: BatchHeader {
                version: 3,
                agent_id: cap_u16(agent_id).to_owned(),
                source: cap_u16(source).to_owned(),
                epoch,
                first_seq,
                count: 0,
                codec: Codec::None,
                raw_len: 0,
                prev_hash,
                body_len: 0,
                body_sha: [0; 32],
            },
            body: Vec::new(),
            times: Vec::new(),
            levels: Vec::new(),
            flags: Vec::new(),
            fields: Vec::new(),
            last_timestamp_ns: 0,
        }
    }

    /// Appends a record. Field names over 65,535 bytes are cut.
    pub fn push(&mut self, record: WireRecord) {
        self.push_parts(record.timestamp_ns, record.level, record.flags, &record.message, &record.fields);
    }

    /// Appends a record from borrowed parts, without building a [`WireRecord`].
    pub fn push_parts(
        &mut self,
        timestamp_ns: i64,
        level: Level,
        flags: u8,
        message: &str,
        fields: &[(String, String)],
    ) {
        self.body.extend_from_slice(message.as_bytes());
        self.body.push(MESSAGE_END);
        put_varint(&mut self.times, zigzag(timestamp_ns.wrapping_sub(self.last_timestamp_ns)));
        self.last_timestamp_ns = timestamp_ns;
        self.levels.push(level.to_byte());
        self.flags.push(flags);
        let field_count = fields.len().min(u16::MAX as usize);
        self.fields.extend_from_slice(&(field_count as u16).to_be_bytes());
        for (key, value) in &fields[..field_count] {
            put_str16(&mut self.fields, cap_u16(key));
            put_str32(&mut self.fields, value);
        }
        self.header.count += 1;
    }

    /// Records pushed so far.
    pub fn len(&self) -> u32 {
        self.header.count
    }

    /// True before the first push.
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    /// Bytes of the record section so far.
    pub fn body_bytes(&self) -> usize {
        self.body.len()
            + self.times.len()
            + self.levels.len()
            + self.flags.len()
            + self.fields.len()
            + COLUMNS_TRAILER
    }

    /// The record section: the messages column joined by the others and
    /// closed by the first two columns' lengths.
    fn take_section(&mut self) -> Vec<u8> {
        let lengths = [self.body.len(), self.times.len()]
            .map(|len| u32::try_from(len).expect("batches stay under 4 GiB"));
        let mut section = std::mem::take(&mut self.body);
        section.reserve_exact(self.body_bytes());
        for column in [&self.times, &self.levels, &self.flags, &self.fields] {
            section.extend_from_slice(column);
        }
        for length in lengths {
            section.extend_from_slice(&length.to_be_bytes());
        }
        section
    }

    /// Seals the header, signs it and returns the encoded batch.
    pub fn sign(self, key: &Ed25519KeyPair) -> Vec<u8> {
        self.sign_with(key, None)
    }

    /// Like [`BatchBuilder::sign`], compressing the record section with
    /// `deflater` when that makes it smaller.
    pub fn sign_with(mut self, key: &Ed25519KeyPair, deflater: Option<&mut Deflater>) -> Vec<u8> {
        self.body = self.take_section();
        self.header.raw_len = u32::try_from(self.body.len()).expect("batches stay under 4 GiB");
        let stored: &[u8] = match deflater.and_then(|d| d.deflate(&self.body)) {
            Some(compressed) => {
                self.header.codec = Codec::Zstd;
                compressed
            }
            None => &self.body,
        };
        self.header.body_len = stored.len() as u32;
        self.header.body_sha.copy_from_slice(digest::digest(&digest::SHA256, stored).as_ref());
        let mut out = Vec::with_capacity(256 + SIGNATURE_LEN + stored.len());
        self.header.encode(&mut out);
        let signature = key.sign(&out);
        out.extend_from_slice(signature.as_ref());
        out.extend_from_slice(stored);
        out
    }
}

/// Hash of an encoded batch (header and signature), as [`Batch::hash`] gives.
pub fn encoded_batch_hash(encoded: &[u8]) -> Result<[u8; 32], BatchError> {
    let mut reader = Reader::new(encoded);
    BatchHeader::decode(&mut reader)?;
    reader.take(SIGNATURE_LEN, "signature")?;
    Ok(batch_hash(&encoded[..reader.position()]))
}

fn cap_u16(s: &str) -> &str {
    if s.len() <= u16::MAX as usize {
        return s;
    }
    let mut end = u16::MAX as usize;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::signature::KeyPair;

    fn key() -> Ed25519KeyPair {
        // A fixed seed keeps the test deterministic.
        Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap()
    }

    fn record_strategy() -> impl Strategy<Value = WireRecord> {
        (
            any::<i64>(),
            0u8..=6,
            any::<u8>(),
            ".{0,64}",
            proptest::collection::vec(("[a-z_.]{1,12}", ".{0,20}"), 0..4),
        )
            .prop_map(|(ts, level, flags, message, fields)| WireRecord {
                timestamp_ns: ts,
                level: Level::from_byte(level).unwrap(),
                flags,
                message,
                fields,
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(
            agent in "[a-z0-9.-]{1,20}",
            source in ".{0,40}",
            epoch in any::<u64>(),
            first_seq in 0u64..u64::MAX / 2,
            prev in any::<[u8; 32]>(),
            records in proptest::collection::vec(record_strategy(), 0..20),
            compress in any::<bool>(),
        ) {
            let mut builder = BatchBuilder::new(&agent, &source, epoch, first_seq, prev);
            for r in &records {
                builder.push(r.clone());
            }
            let mut deflater = Deflater::zstd(1).unwrap();
            let bytes = builder.sign_with(&key(), compress.then_some(&mut deflater));
            let batch = Batch::decode(&bytes, &Limits::default()).unwrap();
            prop_assert_eq!(&batch.records, &records);
            prop_assert_eq!(&batch.header.agent_id, &agent);
            prop_assert_eq!(&batch.header.source, &source);
            prop_assert_eq!(batch.header.epoch, epoch);
            prop_assert_eq!(batch.header.first_seq, first_seq);
            prop_assert_eq!(batch.header.prev_hash, prev);
            prop_assert_eq!(encoded_batch_hash(&bytes).unwrap(), batch.hash);
            let public = key().public_key().as_ref().to_vec();
            batch.verify(&public).unwrap();
            batch.verify_encoded(&bytes, &public).unwrap();
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Batch::decode(&bytes, &Limits::default());
            let _ = peek_header(&bytes);
        }

        /// Garbage behind a valid compressed header: the hash is fixed up so
        /// the bytes reach zstd, which must refuse them without panicking or
        /// writing past `raw_len`.
        #[test]
        fn inflating_garbage_never_panics(
            garbage in proptest::collection::vec(any::<u8>(), 0..256),
            raw_len in 0u32..4096,
        ) {
            let bytes = forge_compressed(&garbage, raw_len, 1);
            let _ = Batch::decode(&bytes, &Limits::default());
        }

        #[test]
        fn any_flipped_byte_is_refused(flip in 0usize..400, bit in 0u8..8, compress in any::<bool>()) {
            let mut builder = BatchBuilder::new("web-1", "/var/log/a.log", 3, 10, [1; 32]);
            builder.push(WireRecord::new(1, Level::Info, "hello world hello world hello world"));
            builder.push(WireRecord::new(2, Level::Error, "second line second line second line"));
            let mut deflater = Deflater::zstd(1).unwrap();
            let mut bytes = builder.sign_with(&key(), compress.then_some(&mut deflater));
            let at = flip % bytes.len();
            bytes[at] ^= 1 << bit;
            let public = key().public_key().as_ref().to_vec();
            let outcome = Batch::decode(&bytes, &Limits::default())
                .and_then(|b| b.verify_encoded(&bytes, &public));
            prop_assert!(outcome.is_err(), "flipping bit {} of byte {} went unnoticed", bit, at);
        }
    }

    proptest! {
        /// Any bytes as a version-3 record section behind a valid header are
        /// read or refused, never misread: what reads builds again into the
        /// same records.
        #[test]
        fn any_column_section_reads_back_or_is_refused(
            section in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let forged = forge_compressed(&section, section.len() as u32, 0);
            if let Ok(batch) = Batch::decode(&forged, &Limits::default()) {
                let mut builder = BatchBuilder::new("a", "s", 0, 0, [0; 32]);
                for record in &batch.records {
                    builder.push(record.clone());
                }
                prop_assert_eq!(builder.take_section(), section);
            }
        }
    }

    /// Each way a column section can lie is refused by name.
    #[test]
    fn a_damaged_column_section_is_refused() {
        let refused = |section: &[u8]| {
            Batch::decode(&forge_compressed(section, section.len() as u32, 0), &Limits::default())
                .unwrap_err()
        };
        let good = one_record_body("hello");
        assert_eq!(
            Batch::decode(&forge_compressed(&good, good.len() as u32, 0), &Limits::default())
                .unwrap()
                .records[0]
                .message,
            "hello"
        );
        // The lengths that close the section are missing.
        assert_eq!(refused(&good[..5]), BatchError::Truncated("column lengths"));
        // The messages column claims more than the section holds.
        let mut long = good.clone();
        let at = long.len() - 8;
        long[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(refused(&long), BatchError::Truncated("messages"));
        // A message without its end byte.
        let mut unended = good.clone();
        unended[5] = b'!';
        assert_eq!(refused(&unended), BatchError::Truncated("message"));
        // A message that is not UTF-8, and one cut inside a character.
        let mut latin1 = good.clone();
        latin1[1] = 0xE9;
        assert_eq!(refused(&latin1), BatchError::NotUtf8("message"));
        let mut cut = good.clone();
        cut[4] = 0xE2;
        assert_eq!(refused(&cut), BatchError::NotUtf8("message"));
        // A timestamp varint longer than it needs to be.
        let mut padded = b"hi\xff".to_vec();
        padded.extend_from_slice(&[0x82, 0x00, 3, 0, 0, 0]);
        padded.extend_from_slice(&3u32.to_be_bytes());
        padded.extend_from_slice(&2u32.to_be_bytes());
        assert_eq!(refused(&padded), BatchError::Truncated("timestamps"));
        // A timestamp varint that runs past 64 bits.
        let mut section = b"hi\xff".to_vec();
        section.extend_from_slice(&[0xff; 10]);
        section.extend_from_slice(&[3, 0, 0, 0]);
        section.extend_from_slice(&3u32.to_be_bytes());
        section.extend_from_slice(&10u32.to_be_bytes());
        assert_eq!(refused(&section), BatchError::Truncated("timestamps"));
        // Bytes left over after the last record's fields.
        let mut extra = good.clone();
        extra.splice(good.len() - 8..good.len() - 8, [0u8]);
        assert!(matches!(refused(&extra), BatchError::BodyLength { .. }));
        // An unknown level byte.
        let mut level = good.clone();
        level[7] = 9;
        assert_eq!(refused(&level), BatchError::UnknownLevel(9));
        // A message over the cap.
        let big = one_record_body(&"x".repeat(2048));
        let limits = Limits { max_message_bytes: 1024, ..Limits::default() };
        assert!(matches!(
            Batch::decode(&forge_compressed(&big, big.len() as u32, 0), &limits),
            Err(BatchError::OverLimit { what: "message", .. })
        ));
    }

    /// The columns are what make a batch compress: the generated lines of a
    /// DataNode, each a record, inflate to less than a twelfth of their text
    /// plus the per-record metadata once compressed.
    #[test]
    fn columns_compress_to_about_the_text_alone() {
        let line = "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block";
        let mut builder = BatchBuilder::new("a", "s", 0, 0, [0; 32]);
        let mut text = Vec::new();
        for i in 0..2000i64 {
            let message = format!("{line} blk_{}", i * 7919 % 10007);
            text.extend_from_slice(message.as_bytes());
            text.push(b'\n');
            builder.push(WireRecord::new(1_700_000_000_000_000_000 + i * 1_000_000, Level::Info, message));
        }
        let bytes = builder.sign_with(&key(), Some(&mut Deflater::zstd(1).unwrap()));
        let text_alone = zstd::bulk::compress(&text, 1).unwrap().len();
        let view = BatchView::parse(&bytes, &Limits::default()).unwrap();
        assert!(
            (view.header.body_len as usize) < text_alone + text_alone / 20,
            "{} compressed bytes of columns, {text_alone} of the text alone",
            view.header.body_len
        );
    }

    fn forge_compressed(body: &[u8], raw_len: u32, codec: u8) -> Vec<u8> {
        crate::testing::forge_batch(&key(), "a", "s", 3, codec, raw_len, body)
    }

    fn one_record_body(message: &str) -> Vec<u8> {
        let mut builder = BatchBuilder::new("a", "s", 0, 0, [0; 32]);
        builder.push(WireRecord::new(1, Level::Info, message));
        builder.take_section()
    }

    #[test]
    fn a_compressed_batch_is_smaller_and_reads_back() {
        let mut builder = BatchBuilder::new("a", "s", 0, 0, [0; 32]);
        let line = "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block";
        for i in 0..500 {
            builder.push(WireRecord::new(i, Level::Info, format!("{line} blk_{i}")));
        }
        let raw = builder.body_bytes();
        let bytes = builder.sign_with(&key(), Some(&mut Deflater::zstd(1).unwrap()));
        let batch = Batch::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(batch.header.codec, Codec::Zstd);
        assert_eq!(batch.header.raw_len as usize, raw);
        assert!(bytes.len() * 5 < raw, "{} compressed bytes for {raw} raw", bytes.len());
        assert_eq!(batch.records[499].message, format!("{line} blk_499"));
        batch.verify_encoded(&bytes, key().public_key().as_ref()).unwrap();
    }

    /// A bomb: a few hundred bytes that inflate to 64 MiB. The declared
    /// size is over the cap, so nothing is allocated or inflated.
    #[test]
    fn a_decompression_bomb_is_refused_before_it_inflates() {
        let zeros = vec![0u8; 64 << 20];
        let bomb = zstd::bulk::compress(&zeros, 19).unwrap();
        assert!(bomb.len() < 4096);
        drop(zeros);
        let honest = forge_compressed(&bomb, 64 << 20, 1);
        assert!(matches!(
            BatchView::parse(&honest, &Limits::default()),
            Err(BatchError::OverLimit { what: "decoded record section", .. })
        ));
        // Lying about the size does not help: zstd stops at the declared
        // length, which is the buffer's capacity.
        let lying = forge_compressed(&bomb, 1024, 1);
        let view = BatchView::parse(&lying, &Limits::default()).unwrap();
        let mut inflater = Inflater::new();
        assert!(matches!(
            view.records(&Limits::default(), &mut inflater),
            Err(BatchError::Decompress { declared: 1024, .. })
        ));
        assert!(inflater.buffer.capacity() < 64 * 1024, "{}", inflater.buffer.capacity());
    }

    #[test]
    fn a_raw_length_that_does_not_match_is_refused() {
        let body = one_record_body("hello hello hello hello");
        let compressed = zstd::bulk::compress(&body, 1).unwrap();
        let long = forge_compressed(&compressed, body.len() as u32 + 1, 1);
        assert!(matches!(Batch::decode(&long, &Limits::default()), Err(BatchError::Decompress { .. })));
        let short = forge_compressed(&compressed, body.len() as u32 - 1, 1);
        assert!(matches!(Batch::decode(&short, &Limits::default()), Err(BatchError::Decompress { .. })));
        let exact = forge_compressed(&compressed, body.len() as u32, 1);
        assert_eq!(
            Batch::decode(&exact, &Limits::default()).unwrap().records[0].message,
            "hello hello hello hello"
        );
        let plain_lie = forge_compressed(&body, body.len() as u32 + 7, 0);
        assert!(matches!(peek_header(&plain_lie), Err(BatchError::BodyLength { .. })));
        let unknown = forge_compressed(&body, body.len() as u32, 9);
        assert_eq!(peek_header(&unknown), Err(BatchError::UnknownCodec(9)));
    }

    #[test]
    fn a_huge_record_count_is_refused_before_allocation() {
        let mut builder = BatchBuilder::new("a", "s", 0, 0, [0; 32]);
        builder.push(WireRecord::new(1, Level::Info, "x"));
        let bytes = builder.sign(&key());
        let limits = Limits { max_records: 0, ..Limits::default() };
        assert!(matches!(
            Batch::decode(&bytes, &limits),
            Err(BatchError::OverLimit { what: "record count", .. })
        ));
    }

    #[test]
    fn a_message_over_the_cap_is_refused() {
        let mut builder = BatchBuilder::new("a", "s", 0, 0, [0; 32]);
        builder.push(WireRecord::new(1, Level::Info, "x".repeat(100)));
        let bytes = builder.sign(&key());
        let limits = Limits { max_message_bytes: 99, ..Limits::default() };
        assert_eq!(
            Batch::decode(&bytes, &limits),
            Err(BatchError::OverLimit { what: "message", found: 100, limit: 99 })
        );
    }

    /// A hostile agent must not be able to overflow the collector's
    /// high-water marks.
    #[test]
    fn a_sequence_range_past_u64_max_is_refused() {
        let mut builder = BatchBuilder::new("a", "s", 0, u64::MAX, [0; 32]);
        builder.push(WireRecord::new(1, Level::Info, "x"));
        let bytes = builder.sign(&key());
        assert!(matches!(peek_header(&bytes), Err(BatchError::SeqOverflow { .. })));
        assert!(matches!(Batch::decode(&bytes, &Limits::default()), Err(BatchError::SeqOverflow { .. })));
    }

    #[test]
    fn another_key_does_not_verify() {
        let mut builder = BatchBuilder::new("a", "s", 0, 0, [0; 32]);
        builder.push(WireRecord::new(1, Level::Info, "x"));
        let bytes = builder.sign(&key());
        let other = Ed25519KeyPair::from_seed_unchecked(&[8u8; 32]).unwrap();
        let batch = Batch::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(batch.verify_encoded(&bytes, other.public_key().as_ref()), Err(BatchError::BadSignature));
    }

    fn golden_batch(compress: bool) -> Vec<u8> {
        let mut builder = BatchBuilder::new("golden-agent", "/var/log/golden.log", 2, 40, [9; 32]);
        builder.push(WireRecord::new(
            1_700_000_000_000_000_000,
            Level::Info,
            "first line first line first line",
        ));
        let mut second = WireRecord::new(1_700_000_001_000_000_000, Level::Error, "second \u{1b}[31m line");
        second.fields.push(("pid".into(), "4242".into()));
        builder.push(second);
        let mut deflater = Deflater::zstd(3).unwrap();
        builder.sign_with(&key(), compress.then_some(&mut deflater))
    }

    fn check_golden(batch: &Batch) {
        assert_eq!(batch.header.agent_id, "golden-agent");
        assert_eq!(batch.header.source, "/var/log/golden.log");
        assert_eq!(batch.header.epoch, 2);
        assert_eq!(batch.header.first_seq, 40);
        assert_eq!(batch.records.len(), 2);
        assert_eq!(batch.records[1].fields, vec![("pid".to_owned(), "4242".to_owned())]);
        batch.verify(key().public_key().as_ref()).unwrap();
    }

    /// Version 1, written by the first release, must still be read and
    /// verified.
    #[test]
    fn golden_v1_batch_still_decodes() {
        let golden = include_bytes!("../tests/golden/batch-v1.bin");
        let batch = Batch::decode(golden, &Limits::default()).unwrap();
        assert_eq!(batch.header.version, 1);
        check_golden(&batch);
        assert_eq!(batch.records[0].message, "first line");
    }

    /// Version 2 (one record after another), written by earlier releases,
    /// must still be read and verified, plain and compressed.
    #[test]
    fn golden_v2_batches_still_decode() {
        for (name, compress) in [("batch-v2.bin", false), ("batch-v2-zstd.bin", true)] {
            let golden =
                std::fs::read(format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            let batch = Batch::decode(&golden, &Limits::default()).unwrap();
            assert_eq!(batch.header.version, 2);
            assert_eq!(batch.header.codec, if compress { Codec::Zstd } else { Codec::None });
            check_golden(&batch);
            assert_eq!(batch.records[0].message, "first line first line first line");
            assert_eq!(batch.records[1].timestamp_ns, 1_700_000_001_000_000_000);
        }
    }

    /// The golden files pin version 3, plain and compressed: a later release
    /// must still read them, and this release must still write them byte for
    /// byte. Set `LOGVAULT_WRITE_GOLDEN=1` to write them when the format
    /// version changes.
    #[test]
    fn golden_v3_batches_still_decode_and_encode() {
        for (name, compress) in [("batch-v3.bin", false), ("batch-v3-zstd.bin", true)] {
            let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
            if std::env::var_os("LOGVAULT_WRITE_GOLDEN").is_some() {
                std::fs::write(&path, golden_batch(compress)).unwrap();
            }
            let golden = std::fs::read(&path).unwrap();
            let batch = Batch::decode(&golden, &Limits::default()).unwrap();
            assert_eq!(batch.header.version, 3);
            assert_eq!(batch.header.codec, if compress { Codec::Zstd } else { Codec::None });
            check_golden(&batch);
            assert_eq!(batch.records[1].timestamp_ns, 1_700_000_001_000_000_000);
            assert_eq!(batch.records[1].message, "second \u{1b}[31m line");
            assert_eq!(golden, golden_batch(compress), "version 3 encoding of {name} changed");
        }
    }
}
