//! Entry points for the fuzz targets in `fuzz/` and their regression
//! tests: each takes arbitrary bytes and must neither panic nor allocate
//! past its caps. Not an API.

use std::sync::OnceLock;

use logvault_parse::{Parser, ParserKind};
use logvault_storage::BatchBuilder;
use logvault_storage::batch::{Batch, Limits};

use crate::index::LogIndex;
use crate::search::{Cursor, Filter};

/// Syslog framing (RFC 5425 octet counts and newline framing, mixed) and
/// the RFC 5424/3164 parsing behind it, into a signed batch that must
/// decode back to the same messages.
pub fn syslog(data: &[u8]) {
    let max = 512;
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime starts");
    let messages = runtime.block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(64, data);
        let mut messages = Vec::new();
        while let Ok(Some(message)) = crate::syslog::read_message(&mut reader, max).await {
            assert!(message.bytes.len() <= max, "a message kept past the cap");
            messages.push(message);
        }
        messages
    });
    let parser =
        Parser::new(ParserKind::Syslog, None, None, None).expect("the syslog parser needs no settings");
    let mut batch = BatchBuilder::new("fuzz", crate::syslog::SYSLOG_SOURCE, 1, 0, [0; 32]);
    for message in &messages {
        crate::syslog::add_message(&mut batch, &parser, message);
    }
    let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a seed makes a key");
    let bytes = batch.sign(&key);
    let decoded = Batch::decode(&bytes, &Limits::TRUSTED).expect("a batch built here decodes");
    assert_eq!(decoded.records.len(), messages.len());
    for (record, message) in decoded.records.iter().zip(&messages) {
        assert_eq!(record.message, String::from_utf8_lossy(&message.bytes));
    }
}

/// An empty index to parse queries against, made once per process.
fn index() -> &'static LogIndex {
    static INDEX: OnceLock<LogIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("logvault-fuzz-index-{}", std::process::id()));
        LogIndex::open(&dir).expect("an empty index opens")
    })
}

/// Query text as the API takes it (parsed, checked against the allowed
/// fields and the caller's tenants, turned into a tantivy query), run on
/// an empty index; and a page cursor as the API decodes it.
pub fn query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let filter = Filter { tenants: vec!["acme".into()], query: text.to_string(), from_ns: None, to_ns: None };
    if let Ok(clauses) = index().filter_query(&filter) {
        let query = tantivy::query::BooleanQuery::new(
            clauses.into_iter().map(|clause| (tantivy::query::Occur::Must, clause)).collect(),
        );
        let searcher = index().reader.searcher();
        let _ = searcher.search(&query, &tantivy::collector::Count);
    }
    if let Ok(cursor) = Cursor::decode(&text) {
        assert_eq!(Cursor::decode(&cursor.encode()).ok(), Some(cursor), "a cursor round-trips");
    }
}

/// The collector's and the agent's TOML configuration loaders.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::config::CollectorConfig::parse(&text, "fuzz.toml".as_ref());
}

/// A WAL entry's payload and the WAL's stream snapshot.
pub fn wal(data: &[u8]) {
    crate::wal::fuzz_decoders(data);
}

/// Seeds for the WAL target: an entry's payload holding `batch`, and a
/// stream snapshot.
pub fn wal_seeds(batch: &[u8]) -> Vec<Vec<u8>> {
    crate::wal::fuzz_seeds(batch)
}
