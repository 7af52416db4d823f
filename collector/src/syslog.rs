//! Syslog over TLS (RFC 5425) for senders that are not our agent:
//! rsyslog, syslog-ng, network devices.
//!
//! The listener shares the ingest TLS setup: a client certificate from the
//! configured CA is mandatory, and the sender's name (so every record's
//! `host`) comes from that certificate; the HOSTNAME inside a message is
//! kept only as the field `hostname`, a claim.
//!
//! Framing: octet counting (`LEN SP MSG`, RFC 5425 and RFC 6587), or one
//! message per line (the non-transparent framing rsyslog and syslog-ng use
//! by default), told apart per message by its first byte. Bodies are
//! parsed as RFC 5424 or RFC 3164; the record's message is the text as
//! received, its level comes from the PRI severity and its time from the
//! header. A message over `max_message_bytes` is cut and flagged; bytes
//! that are not UTF-8 are replaced and flagged.
//!
//! Each connection is one stream (source `syslog`, a fresh epoch), batched
//! while more bytes are waiting and appended to the WAL like an agent's
//! batch. Syslog has no acknowledgements, so the collector stops reading
//! while a batch waits for its fsync: a slow disk slows the sender's TCP
//! window rather than filling memory. The collector signs these batches
//! with its own Ed25519 key (`DATA/keys/syslog-batch.key`), so the WAL
//! and the archive hold only signed batches.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use logvault_parse::{Parser, ParserKind};
use logvault_storage::batch::{BatchBuilder, Deflater, encoded_batch_hash, peek_header};
use logvault_storage::record::{FLAG_INVALID_UTF8, FLAG_TRUNCATED, Level};
use ring::signature::Ed25519KeyPair;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ingest, handshake};
use crate::wal::AppendRequest;

/// The source name of every syslog stream.
pub const SYSLOG_SOURCE: &str = "syslog";
/// Records in one batch, at most.
const BATCH_RECORDS: u32 = 2000;
/// Message bytes in one batch, at most.
const BATCH_BYTES: usize = 1024 * 1024;
/// Digits of an octet count, at most (RFC 5425 lengths fit in 10).
const MAX_COUNT_DIGITS: usize = 10;

/// Reads the collector's syslog batch key, creating it (mode 0600) on
/// first start.
pub fn load_or_create_key(path: &Path) -> std::io::Result<Ed25519KeyPair> {
    let invalid = |what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
    };
    if !path.exists() {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| invalid("cannot generate a key"))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        logvault_certs::write_private_file(path, pkcs8.as_ref())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let bytes = std::fs::read(path)?;
    Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| invalid("not an Ed25519 PKCS#8 key"))
}

/// One message as framed on the wire.
pub(crate) struct Message {
    pub(crate) bytes: Vec<u8>,
    pub(crate) truncated: bool,
}

/// Why a connection's byte stream cannot be read as syslog.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FramingError {
    #[error("octet count is not digits followed by a space")]
    BadCount,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads the next message, keeping at most `max` bytes of it (the rest is
/// read and dropped). `None` at a clean end of stream.
pub(crate) async fn read_message<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Message>, FramingError> {
    // Blank lines between messages carry nothing.
    let first = loop {
        let buffer = reader.fill_buf().await?;
        let Some(&first) = buffer.first() else { return Ok(None) };
        if first == b'\n' || first == b'\r' {
            reader.consume(1);
            continue;
        }
        break first;
    };
    if first.is_ascii_digit() {
        let mut count: u64 = 0;
        let mut digits = 0;
        loop {
            let buffer = reader.fill_buf().await?;
            let Some(&byte) = buffer.first() else { return Err(FramingError::BadCount) };
            reader.consume(1);
            match byte {
                b'0'..=b'9' if digits < MAX_COUNT_DIGITS => {
                    count = count * 10 + u64::from(byte - b'0');
                    digits += 1;
                }
                b' ' if digits > 0 => break,
                _ => return Err(FramingError::BadCount),
            }
        }
        let keep = count.min(max as u64) as usize;
        let mut bytes = Vec::with_capacity(keep);
        let mut left = count;
        while left > 0 {
            let buffer = reader.fill_buf().await?;
            if buffer.is_empty() {
                return Err(FramingError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let take = buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let room = keep - bytes.len();
            bytes.extend_from_slice(&buffer[..take.min(room)]);
            reader.consume(take);
            left -= take as u64;
        }
        return Ok(Some(Message { truncated: count > keep as u64, bytes }));
    }
    let mut bytes = Vec::new();
    let mut truncated = false;
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            break; // the last line may lack its newline
        }
        let (chunk, found) = match buffer.iter().position(|&b| b == b'\n') {
            Some(at) => (&buffer[..at], true),
            None => (buffer, false),
        };
        let room = max - bytes.len();
        if chunk.len() > room {
            truncated = true;
        }
        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len() + usize::from(found);
        reader.consume(used);
        if found {
            break;
        }
    }
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    Ok(Some(Message { bytes, truncated }))
}

/// One syslog connection, from handshake to close.
pub(crate) async fn connection(tcp: TcpStream, peer: SocketAddr, ingest: &Ingest, cancel: CancellationToken) {
    let Some((tls, _live)) = handshake(tcp, peer, ingest, &cancel).await else { return };
    let name = match tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()) {
        Some(cert) => logvault_certs::peer_name(cert),
        None => Err(logvault_certs::IdentityError::NoName),
    };
    let name = match name {
        Ok(name) => name,
        Err(err) => {
            tracing::warn!(%peer, error = %err, "refused syslog sender certificate");
            ingest.stats.refused(crate::metrics::Refusal::Certificate);
            return;
        }
    };
    let (Some(settings), Some(key)) = (ingest.config.syslog.as_ref(), ingest.syslog_key.as_ref()) else {
        return;
    };
    let tenant = ingest.tenants.resolve(&name, crate::ingest::authority_key(&tls).as_deref()).to_owned();
    let Some(_slot) = ingest.per_sender.enter(&name) else {
        tracing::warn!(%peer, sender = %name, "too many connections from one sender; closing the new one");
        ingest.stats.refused(crate::metrics::Refusal::ConnectionLimit);
        return;
    };
    tracing::info!(%peer, sender = %name, %tenant, "syslog sender connected");
    let parser =
        Parser::new(ParserKind::Syslog, None, None, None).expect("the syslog parser needs no settings");
    let mut stream = Stream {
        ingest,
        key,
        tenant,
        name,
        // A fresh stream per connection: syslog has no resends to recognise.
        epoch: crate::time::now_ns().max(0) as u64,
        next_seq: 0,
        prev_hash: [0; 32],
        batch: None,
        deflater: match Deflater::zstd(1) {
            Ok(deflater) => deflater,
            Err(err) => {
                tracing::error!(%peer, error = %err, "zstd does not start; closing the syslog connection");
                return;
            }
        },
    };
    let idle = Duration::from_millis(settings.idle_timeout_ms);
    let max = settings.max_message_bytes as usize;
    let mut reader = BufReader::with_capacity(64 * 1024, tls);
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            next = tokio::time::timeout(idle, read_message(&mut reader, max)) => next,
        };
        let message = match next {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => break,
            Ok(Err(err)) => {
                tracing::warn!(%peer, sender = %stream.name, error = %err, "syslog stream unreadable; closing");
                ingest.stats.refused(crate::metrics::Refusal::SyslogFraming);
                break;
            }
            Err(_) => {
                tracing::info!(%peer, sender = %stream.name, "closing idle syslog connection");
                break;
            }
        };
        stream.push(&parser, message);
        let full =
            stream.batch.as_ref().is_some_and(|b| b.len() >= BATCH_RECORDS || b.body_bytes() >= BATCH_BYTES);
        // Batch while more is already waiting; store as soon as it is not.
        if (full || reader.buffer().is_empty()) && !stream.flush(&cancel).await {
            break;
        }
    }
    stream.flush(&cancel).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), reader.get_mut().shutdown()).await;
}

/// Parses a message and adds it to `batch` as one record.
pub(crate) fn add_message(batch: &mut BatchBuilder, parser: &Parser, message: &Message) {
    let text = String::from_utf8_lossy(&message.bytes);
    let mut flags = if message.truncated { FLAG_TRUNCATED } else { 0 };
    if matches!(text, std::borrow::Cow::Owned(_)) {
        flags |= FLAG_INVALID_UTF8;
    }
    let parsed = parser.parse(&text);
    let timestamp_ns = parsed.timestamp_ns.unwrap_or_else(crate::time::now_ns);
    let level = parsed.level.unwrap_or(Level::Unknown);
    batch.push_parts(timestamp_ns, level, flags, &text, &parsed.fields);
}

struct Stream<'a> {
    ingest: &'a Ingest,
    key: &'a Ed25519KeyPair,
    tenant: String,
    name: String,
    epoch: u64,
    next_seq: u64,
    prev_hash: [u8; 32],
    batch: Option<BatchBuilder>,
    /// Batches are compressed as an agent's are, so the archive stores
    /// them as they are.
    deflater: Deflater,
}

impl Stream<'_> {
    fn push(&mut self, parser: &Parser, message: Message) {
        let (name, epoch, seq, prev) = (&self.name, self.epoch, self.next_seq, self.prev_hash);
        let batch =
            self.batch.get_or_insert_with(|| BatchBuilder::new(name, SYSLOG_SOURCE, epoch, seq, prev));
        add_message(batch, parser, &message);
        self.next_seq += 1;
        self.ingest.stats.syslog_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// Stores the batch in hand; false when the WAL refused it (the
    /// connection is then closed, and the sender reconnects and resends
    /// what its own queue still holds).
    async fn flush(&mut self, cancel: &CancellationToken) -> bool {
        let Some(batch) = self.batch.take() else { return true };
        let bytes = batch.sign_with(self.key, Some(&mut self.deflater));
        self.ingest.pace(&self.name, bytes.len(), cancel).await;
        let (Ok(header), Ok(hash)) = (peek_header(&bytes), encoded_batch_hash(&bytes)) else {
            return false;
        };
        self.prev_hash = hash;
        let (size, count) = (bytes.len(), header.count);
        let request = AppendRequest {
            tenant: self.tenant.clone(),
            host: self.name.clone(),
            received_ns: crate::time::now_ns(),
            header,
            batch: bytes,
            signer: ring::signature::KeyPair::public_key(self.key).as_ref().to_vec(),
        };
        // Busy: wait, not reading, so the sender's TCP window fills and
        // it queues on its side.
        let mut waited = false;
        while self.ingest.wal.is_busy() {
            if !waited {
                tracing::warn!(sender = %self.name, "wal busy; syslog connection paused");
                self.ingest.stats.refused(crate::metrics::Refusal::Busy);
                waited = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match self.ingest.wal.append(request).await {
            Ok(_) => {
                self.ingest.stats.stored(&self.tenant, size, u64::from(count));
                true
            }
            Err(err) => {
                tracing::error!(sender = %self.name, records = count, error = %err, "wal append of syslog batch failed; closing the connection");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(input: &[u8], max: usize) -> Result<Vec<(Vec<u8>, bool)>, String> {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut reader = BufReader::with_capacity(7, input);
            let mut out = Vec::new();
            while let Some(message) = read_message(&mut reader, max).await.map_err(|e| e.to_string())? {
                out.push((message.bytes, message.truncated));
            }
            Ok(out)
        })
    }

    #[test]
    fn both_framings_are_read_even_when_mixed() {
        let input = b"11 <13>1 - a b12 <13>hello\nthere\r\n\n<14>last line";
        assert_eq!(
            read_all(input, 1024).unwrap(),
            vec![
                (b"<13>1 - a b".to_vec(), false),
                (b"<13>hello\nth".to_vec(), false),
                (b"ere".to_vec(), false),
                (b"<14>last line".to_vec(), false),
            ]
        );
    }

    #[test]
    fn long_messages_are_cut_and_the_stream_stays_in_step() {
        let mut input = b"20 <13>0123456789abcdef".to_vec();
        input.extend_from_slice(b"<13>0123456789abcdef\n5 <14>x");
        assert_eq!(
            read_all(&input, 8).unwrap(),
            vec![(b"<13>0123".to_vec(), true), (b"<13>0123".to_vec(), true), (b"<14>x".to_vec(), false)]
        );
    }

    #[test]
    fn a_bad_octet_count_ends_the_stream() {
        assert!(read_all(b"12345678901 <13>x", 64).is_err());
        assert!(read_all(b"12x <13>x", 64).is_err());
        // A count promising more than arrives.
        assert!(read_all(b"50 <13>short", 64).is_err());
    }

    proptest! {
        /// No input panics the framer or makes it keep more than the cap.
        #[test]
        fn framing_never_panics_and_respects_the_cap(input in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(messages) = read_all(&input, 16) {
                for (bytes, _) in messages {
                    prop_assert!(bytes.len() <= 16);
                }
            }
        }
    }
}
