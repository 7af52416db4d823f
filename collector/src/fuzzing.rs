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

/// Caps small enough that a fuzz run reaches them.
const HTTP_LIMITS: crate::bulk::BulkLimits = crate::bulk::BulkLimits {
    max_items: 64,
    max_message_bytes: 256,
    max_fields: 16,
    max_field_value_bytes: 64,
};

fn check_records<'r>(records: impl Iterator<Item = &'r logvault_storage::WireRecord>, count: usize) {
    assert!(count <= HTTP_LIMITS.max_items, "{count} items past the cap");
    for record in records {
        assert!(record.message.len() <= HTTP_LIMITS.max_message_bytes, "a message past the cap");
        assert!(record.fields.len() <= HTTP_LIMITS.max_fields, "fields past the cap");
        assert!(record.fields.iter().all(|(_, v)| v.len() <= HTTP_LIMITS.max_field_value_bytes));
    }
}

/// An Elasticsearch bulk body, read within the caps or refused whole.
pub fn bulk(data: &[u8]) {
    if let Ok(items) = crate::bulk::parse_bulk(data, Some("fuzz"), &HTTP_LIMITS, 1) {
        check_records(items.iter().filter_map(|item| item.outcome.as_ref().ok()), items.len());
    }
}

/// An OTLP logs request as protobuf and as JSON, read within the caps or
/// refused.
pub fn otlp(data: &[u8]) {
    let decoded = [
        crate::otlp::decode_protobuf(data, &HTTP_LIMITS, 1),
        crate::otlp::decode_json(data, &HTTP_LIMITS, 1),
    ];
    for records in decoded.into_iter().flatten() {
        check_records(records.iter(), records.len());
    }
}

/// Seeds for the HTTP senders' targets: bulk bodies and OTLP requests in
/// both encodings.
pub fn http_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let bulk = concat!(
        "{\"index\":{\"_index\":\"app\",\"_id\":\"1\"}}\n",
        "{\"@timestamp\":\"2024-05-01T10:00:00Z\",\"message\":\"disk full\",\"log\":{\"level\":\"warn\"},\"host\":{\"name\":\"web-1\"}}\n",
        "{\"create\":{}}\n{\"level\":\"error\",\"tags\":[1,2],\"n\":null}\n",
        "{\"delete\":{\"_id\":\"1\"}}\n{\"update\":{\"_id\":\"1\"}}\n{\"doc\":{}}\n",
    );
    let json = r#"{"resourceLogs":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"app"}}]},"scopeLogs":[{"scope":{"name":"s"},"logRecords":[{"timeUnixNano":"1700000000000000000","severityNumber":9,"body":{"stringValue":"hello"},"attributes":[{"key":"m","value":{"kvlistValue":{"values":[{"key":"k","value":{"intValue":"3"}}]}}}],"traceId":"ab"}]}]}]}"#;
    // The same request in protobuf, written field by field.
    fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
        out.push(number << 3 | 2);
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    let mut value = Vec::new();
    field(&mut value, 1, b"app");
    let mut attribute = Vec::new();
    field(&mut attribute, 1, b"service.name");
    field(&mut attribute, 2, &value);
    let mut resource = Vec::new();
    field(&mut resource, 1, &attribute);
    let mut body = Vec::new();
    field(&mut body, 1, b"hello");
    let mut record = vec![0x09];
    record.extend_from_slice(&1_700_000_000_000_000_000u64.to_le_bytes());
    record.extend_from_slice(&[0x10, 9]);
    field(&mut record, 5, &body);
    let mut scope_logs = Vec::new();
    field(&mut scope_logs, 2, &record);
    let mut resource_logs = Vec::new();
    field(&mut resource_logs, 1, &resource);
    field(&mut resource_logs, 2, &scope_logs);
    let mut request = Vec::new();
    field(&mut request, 1, &resource_logs);
    vec![("bulk", bulk.as_bytes().to_vec()), ("otlp", json.as_bytes().to_vec()), ("otlp", request)]
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

/// What collectors sharing a bucket read from it: stream objects, split
/// manifests and split packages.
pub fn cluster(data: &[u8]) {
    crate::cluster::fuzz_decoders(data);
    crate::splits::fuzz_decoders(data);
}

/// Seeds for the cluster target.
pub fn cluster_seeds() -> Vec<Vec<u8>> {
    let mut seeds = crate::cluster::fuzz_seeds();
    seeds.extend(crate::splits::fuzz_seeds());
    seeds
}

/// Seeds for the WAL target: an entry's payload holding `batch`, and a
/// stream snapshot.
pub fn wal_seeds(batch: &[u8]) -> Vec<Vec<u8>> {
    crate::wal::fuzz_seeds(batch)
}
