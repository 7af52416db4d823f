//! Frames of the native protocol (version 1).
//!
//! ```text
//! len   u32 big-endian   bytes that follow (kind + payload), at most the cap
//! kind  u8               what the payload is
//! payload
//! ```
//!
//! | kind | direction | payload |
//! |---|---|---|
//! | 0x01 `Hello` | agent to collector | protocol version u16 |
//! | 0x02 `Batch` | agent to collector | an encoded [`crate::Batch`] |
//! | 0x03 `Ack` | collector to agent | batch hash [32], status u8 (0 stored, 1 duplicate) |
//! | 0x04 `Refused` | collector to agent | code u16, message (u16 len + UTF-8) |
//!
//! The collector answers every batch, in order, with one `Ack` or one
//! `Refused`. It sends `Ack` only once the batch is in the fsynced WAL.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Reader, Truncated, put_str16};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Default cap on one frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

const KIND_HELLO: u8 = 0x01;
const KIND_BATCH: u8 = 0x02;
const KIND_ACK: u8 = 0x03;
const KIND_REFUSED: u8 = 0x04;
const KIND_RESUME: u8 = 0x05;
const KIND_RESUMED: u8 = 0x06;
/// Most batches one `Resume` frame may ask about.
pub const MAX_RESUME_BATCHES: usize = 1024;

/// A batch named by its stream and hash, as `Resume` asks about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRef {
    /// The stream's source.
    pub source: String,
    /// The stream's epoch.
    pub epoch: u64,
    /// The batch's hash.
    pub hash: [u8; 32],
}

/// Why a batch or connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseCode {
    /// The frame or batch could not be decoded.
    Malformed,
    /// A frame over the cap.
    TooLarge,
    /// The agent speaks a protocol version the collector does not.
    UnsupportedVersion,
    /// The batch names another agent than the certificate, or its signature
    /// does not verify under the certificate key.
    Identity,
    /// The collector cannot take more now; retry later.
    Busy,
    /// The collector failed to store the batch; retry later.
    Internal,
    /// The batch breaks its stream's chain: a replay of stored records, or
    /// a previous-batch hash that does not match.
    Sequence,
    /// The batch starts past its stream's end: records before it are missing.
    Gap,
    /// A code this build does not know.
    Other(u16),
}

impl RefuseCode {
    fn to_u16(self) -> u16 {
        match self {
            RefuseCode::Malformed => 1,
            RefuseCode::TooLarge => 2,
            RefuseCode::UnsupportedVersion => 3,
            RefuseCode::Identity => 4,
            RefuseCode::Busy => 5,
            RefuseCode::Internal => 6,
            RefuseCode::Sequence => 7,
            RefuseCode::Gap => 8,
            RefuseCode::Other(code) => code,
        }
    }

    fn from_u16(code: u16) -> Self {
        match code {
            1 => RefuseCode::Malformed,
            2 => RefuseCode::TooLarge,
            3 => RefuseCode::UnsupportedVersion,
            4 => RefuseCode::Identity,
            5 => RefuseCode::Busy,
            6 => RefuseCode::Internal,
            7 => RefuseCode::Sequence,
            8 => RefuseCode::Gap,
            other => RefuseCode::Other(other),
        }
    }

    /// True when the agent should resend later rather than give up on the batch.
    pub fn is_retryable(self) -> bool {
        matches!(self, RefuseCode::Busy | RefuseCode::Internal)
    }
}

/// Whether an acked batch was stored now or had been stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// Written to the WAL and fsynced.
    Stored,
    /// Every record was already stored (a resend); nothing new was written.
    Duplicate,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame on a connection, from the agent.
    Hello {
        /// The agent's protocol version.
        version: u16,
    },
    /// An encoded batch.
    Batch(Vec<u8>),
    /// The batch with this hash is durable.
    Ack {
        /// [`crate::Batch::hash`] of the acked batch.
        batch_hash: [u8; 32],
        /// Stored now or before.
        status: AckStatus,
    },
    /// The batch or connection was refused.
    Refused {
        /// Why, as a code the agent acts on.
        code: RefuseCode,
        /// Why, for the operator.
        message: String,
    },
    /// From the agent after `Hello`, before it resends: which of these
    /// unacked batches do you hold durably? At most [`MAX_RESUME_BATCHES`].
    Resume {
        /// The batches, in the order the agent would resend them.
        batches: Vec<BatchRef>,
    },
    /// The answer to `Resume`: for each batch asked about, in order,
    /// whether that very batch (by hash) is in the fsynced WAL.
    Resumed {
        /// One per batch asked about.
        stored: Vec<bool>,
    },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is over the cap; nothing was allocated.
    #[error("frame of {len} bytes is over the cap of {max} bytes")]
    TooLarge {
        /// Length the prefix claimed.
        len: u32,
        /// The cap in force.
        max: u32,
    },
    /// A zero length frame (no kind byte).
    #[error("empty frame")]
    Empty,
    /// A kind byte no version defines.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The payload ended early or had bytes left over.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// The connection failed or closed mid-frame.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<Truncated> for FrameError {
    fn from(t: Truncated) -> Self {
        FrameError::Malformed(t.0)
    }
}

impl Frame {
    /// Encodes the frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; 4];
        match self {
            Frame::Hello { version } => {
                out.push(KIND_HELLO);
                out.extend_from_slice(&version.to_be_bytes());
            }
            Frame::Batch(batch) => {
                out.reserve(batch.len() + 1);
                out.push(KIND_BATCH);
                out.extend_from_slice(batch);
            }
            Frame::Ack { batch_hash, status } => {
                out.push(KIND_ACK);
                out.extend_from_slice(batch_hash);
                out.push(match status {
                    AckStatus::Stored => 0,
                    AckStatus::Duplicate => 1,
                });
            }
            Frame::Refused { code, message } => {
                out.push(KIND_REFUSED);
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                let mut end = message.len().min(4096);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                put_str16(&mut out, &message[..end]);
            }
            Frame::Resume { batches } => {
                out.push(KIND_RESUME);
                let batches = &batches[..batches.len().min(MAX_RESUME_BATCHES)];
                out.extend_from_slice(&(batches.len() as u16).to_be_bytes());
                for batch in batches {
                    let mut end = batch.source.len().min(u16::MAX as usize);
                    while !batch.source.is_char_boundary(end) {
                        end -= 1;
                    }
                    put_str16(&mut out, &batch.source[..end]);
                    out.extend_from_slice(&batch.epoch.to_be_bytes());
                    out.extend_from_slice(&batch.hash);
                }
            }
            Frame::Resumed { stored } => {
                out.push(KIND_RESUMED);
                let stored = &stored[..stored.len().min(MAX_RESUME_BATCHES)];
                out.extend_from_slice(&(stored.len() as u16).to_be_bytes());
                out.extend(stored.iter().map(|s| u8::from(*s)));
            }
        }
        let len = u32::try_from(out.len() - 4).expect("frames stay under 4 GiB");
        out[..4].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Decodes a frame body (kind byte and payload, without the prefix).
    pub fn decode_body(body: Vec<u8>) -> Result<Frame, FrameError> {
        let Some(&kind) = body.first() else {
            return Err(FrameError::Empty);
        };
        if kind == KIND_BATCH {
            let mut body = body;
            body.remove(0);
            return Ok(Frame::Batch(body));
        }
        let mut reader = Reader::new(&body[1..]);
        let frame = match kind {
            KIND_HELLO => Frame::Hello { version: reader.u16("hello")? },
            KIND_ACK => {
                let batch_hash = reader.array("ack")?;
                let status = match reader.u8("ack")? {
                    0 => AckStatus::Stored,
                    1 => AckStatus::Duplicate,
                    _ => return Err(FrameError::Malformed("ack")),
                };
                Frame::Ack { batch_hash, status }
            }
            KIND_REFUSED => {
                let code = RefuseCode::from_u16(reader.u16("refused")?);
                let len = reader.u16("refused")? as usize;
                let message = String::from_utf8_lossy(reader.take(len, "refused")?).into_owned();
                Frame::Refused { code, message }
            }
            KIND_RESUME => {
                let count = resume_count(&mut reader, "resume")?;
                let mut batches = Vec::with_capacity(count);
                for _ in 0..count {
                    let len = reader.u16("resume")? as usize;
                    let source = std::str::from_utf8(reader.take(len, "resume")?)
                        .map_err(|_| FrameError::Malformed("resume"))?
                        .to_owned();
                    let epoch = reader.u64("resume")?;
                    batches.push(BatchRef { source, epoch, hash: reader.array("resume")? });
                }
                Frame::Resume { batches }
            }
            KIND_RESUMED => {
                let count = resume_count(&mut reader, "resumed")?;
                let mut stored = Vec::with_capacity(count);
                for _ in 0..count {
                    stored.push(match reader.u8("resumed")? {
                        0 => false,
                        1 => true,
                        _ => return Err(FrameError::Malformed("resumed")),
                    });
                }
                Frame::Resumed { stored }
            }
            other => return Err(FrameError::UnknownKind(other)),
        };
        if reader.remaining() != 0 {
            return Err(FrameError::Malformed("trailing bytes"));
        }
        Ok(frame)
    }
}

fn resume_count(reader: &mut Reader<'_>, what: &'static str) -> Result<usize, FrameError> {
    let count = reader.u16(what)? as usize;
    if count > MAX_RESUME_BATCHES {
        return Err(FrameError::Malformed(what));
    }
    Ok(count)
}

/// Reads frames with a size cap that is checked before any allocation.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: u32,
}

impl FrameDecoder {
    /// A decoder refusing frames over `max_frame` bytes.
    pub fn new(max_frame: u32) -> Self {
        Self { max_frame }
    }

    /// Checks a length prefix against the cap.
    pub fn check_len(&self, prefix: [u8; 4]) -> Result<usize, FrameError> {
        let len = u32::from_be_bytes(prefix);
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        Ok(len as usize)
    }

    /// Reads one frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read<R: AsyncRead + Unpin>(&self, reader: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut prefix = [0u8; 4];
        match reader.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err.into()),
        }
        let len = self.check_len(prefix)?;
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).await?;
        Frame::decode_body(body).map(Some)
    }

    /// Decodes one frame from a complete buffer (prefix included).
    pub fn decode(&self, bytes: &[u8]) -> Result<Frame, FrameError> {
        let mut reader = Reader::new(bytes);
        let len = self.check_len(reader.array("length")?)?;
        let body = reader.take(len, "frame")?;
        if reader.remaining() != 0 {
            return Err(FrameError::Malformed("trailing bytes"));
        }
        Frame::decode_body(body.to_vec())
    }
}

/// Writes a `Batch` frame around an encoded batch without copying it.
pub async fn write_batch_frame<W: AsyncWrite + Unpin>(writer: &mut W, batch: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(batch.len() + 1)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "batch over 4 GiB"))?;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4] = KIND_BATCH;
    writer.write_all(&head).await?;
    writer.write_all(batch).await
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> std::io::Result<()> {
    writer.write_all(&frame.encode()).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        prop_oneof![
            any::<u16>().prop_map(|version| Frame::Hello { version }),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Frame::Batch),
            (any::<[u8; 32]>(), any::<bool>()).prop_map(|(batch_hash, dup)| Frame::Ack {
                batch_hash,
                status: if dup { AckStatus::Duplicate } else { AckStatus::Stored },
            }),
            (1u16..9, ".{0,40}")
                .prop_map(|(code, message)| Frame::Refused { code: RefuseCode::from_u16(code), message }),
            proptest::collection::vec((".{0,20}", any::<u64>()), 0..8).prop_map(|batches| Frame::Resume {
                batches: batches
                    .into_iter()
                    .map(|(source, epoch)| BatchRef { source, epoch, hash: [epoch as u8; 32] })
                    .collect()
            }),
            proptest::collection::vec(any::<bool>(), 0..8).prop_map(|stored| Frame::Resumed { stored }),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(frame in frame_strategy()) {
            let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
            prop_assert_eq!(decoder.decode(&frame.encode()).unwrap(), frame);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = FrameDecoder::new(64).decode(&bytes);
        }
    }

    #[test]
    fn a_resume_over_the_stream_cap_is_refused() {
        let mut body = vec![KIND_RESUMED];
        body.extend_from_slice(&(MAX_RESUME_BATCHES as u16 + 1).to_be_bytes());
        body.extend(std::iter::repeat_n(0u8, MAX_RESUME_BATCHES + 1));
        assert!(matches!(Frame::decode_body(body), Err(FrameError::Malformed("resumed"))));
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_reading_the_body() {
        let decoder = FrameDecoder::new(1024);
        let err = decoder.check_len(u32::MAX.to_be_bytes()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: u32::MAX, max: 1024 }));
    }

    #[tokio::test]
    async fn read_stops_cleanly_between_frames() {
        let mut bytes = Frame::Hello { version: 1 }.encode();
        bytes.extend(Frame::Batch(vec![1, 2, 3]).encode());
        let mut reader = &bytes[..];
        let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        assert_eq!(decoder.read(&mut reader).await.unwrap(), Some(Frame::Hello { version: 1 }));
        assert_eq!(decoder.read(&mut reader).await.unwrap(), Some(Frame::Batch(vec![1, 2, 3])));
        assert_eq!(decoder.read(&mut reader).await.unwrap(), None);
    }
}
