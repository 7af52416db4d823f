//! The bodies of logvault's fuzz targets, one function per decoder that
//! takes bytes from outside: each must neither panic nor allocate past its
//! caps on any input, and where a decoder has an encoder, what decodes must
//! encode and decode again to the same value.
//!
//! The coverage-guided binaries in `fuzz_targets/` (cargo fuzz, feature
//! `libfuzzer`) call these; `tests/corpus.rs` replays the seeds in
//! `corpus/` and every input a fuzzer ever crashed on, kept in
//! `regressions/`, through them in the normal test run.

use std::sync::OnceLock;

use logvault_parse::{Parser, ParserKind, RedactRule, Redactor};
use logvault_storage::batch::{Batch, BatchView, Inflater, Limits, encoded_batch_hash, peek_header};
use logvault_storage::checkpoint::Checkpoint;
use logvault_storage::frame::FrameDecoder;
use logvault_storage::keyring::{Kek, Keyring};
use logvault_storage::segment::{self, SegmentHeader, SegmentView};
use logvault_storage::{BatchBuilder, testing::forge_batch};
use ring::signature::Ed25519KeyPair;

/// A target's body.
pub type Target = fn(&[u8]);

/// The names of the targets, as `fuzz_targets/` and `corpus/` know them.
pub const TARGETS: [(&str, Target); 12] = [
    ("frame", frame),
    ("batch", batch),
    ("syslog", syslog),
    ("line_parsers", line_parsers),
    ("query", query),
    ("segment", segment),
    ("checkpoint", checkpoint),
    ("config", config),
    ("wal", wal),
    ("bulk", bulk),
    ("otlp", otlp),
    ("cluster", cluster),
];

fn key() -> &'static Ed25519KeyPair {
    static KEY: OnceLock<Ed25519KeyPair> = OnceLock::new();
    KEY.get_or_init(|| Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a seed makes a key"))
}

/// Caps as the collector applies them, with a small decoded size so a
/// run stays fast.
const LIMITS: Limits = Limits {
    max_records: 10_000,
    max_message_bytes: 64 * 1024,
    max_fields: 256,
    max_field_value_bytes: 64 * 1024,
    max_raw_bytes: 1 << 20,
};

/// The native protocol's frames: what decodes re-encodes to itself.
pub fn frame(data: &[u8]) {
    let decoder = FrameDecoder::new(64 * 1024);
    if let Ok(frame) = decoder.decode(data) {
        assert_eq!(decoder.decode(&frame.encode()).ok(), Some(frame), "a frame round-trips");
    }
}

/// Signed batches: as received (header, hash, signature, record section,
/// inflation under the caps); and the bytes as a record section behind a
/// valid header, stored and zstd-compressed, so they reach the record
/// decoder and zstd. What decodes is built again and decodes the same.
pub fn batch(data: &[u8]) {
    let mut inflater = Inflater::new();
    let _ = peek_header(data);
    let _ = encoded_batch_hash(data);
    if let Ok(view) = BatchView::parse(data, &LIMITS) {
        let _ = view.verify(ring::signature::KeyPair::public_key(key()).as_ref());
        let _ = view.records(&LIMITS, &mut inflater);
    }
    let raw_len = data.first().map_or(0, |&b| u32::from(b) << 8) + data.len() as u32;
    for (version, codec) in [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)] {
        let forged = forge_batch(key(), "fuzz", "/fuzz", version, codec, raw_len, data);
        if let Ok(view) = BatchView::parse(&forged, &LIMITS) {
            let _ = view.records(&LIMITS, &mut inflater);
        }
        let Ok(decoded) = Batch::decode(&forged, &LIMITS) else { continue };
        let mut builder = BatchBuilder::new("fuzz", "/fuzz", 0, 0, [0; 32]);
        for record in &decoded.records {
            builder.push(record.clone());
        }
        let again = Batch::decode(&builder.sign(key()), &Limits::TRUSTED).expect("a built batch decodes");
        assert_eq!(again.records, decoded.records, "records round-trip");
    }
}

/// Syslog framing and parsing, as the collector's listener runs them.
pub fn syslog(data: &[u8]) {
    logvault_collector::fuzzing::syslog(data);
}

/// An Elasticsearch bulk body: read within its caps or refused.
pub fn bulk(data: &[u8]) {
    logvault_collector::fuzzing::bulk(data);
}

/// An OTLP logs request, as protobuf and as JSON: read within its caps or
/// refused.
pub fn otlp(data: &[u8]) {
    logvault_collector::fuzzing::otlp(data);
}

/// Every line parser the agent offers, and redaction, on one line.
pub fn line_parsers(data: &[u8]) {
    static PARSERS: OnceLock<Vec<Parser>> = OnceLock::new();
    let parsers = PARSERS.get_or_init(|| {
        let mut parsers: Vec<Parser> = [
            ParserKind::None,
            ParserKind::Auto,
            ParserKind::Json,
            ParserKind::Logfmt,
            ParserKind::Syslog,
            ParserKind::Apache,
        ]
        .into_iter()
        .map(|kind| Parser::new(kind, None, None, None).expect("built-in parsers need no settings"))
        .collect();
        parsers.push(
            Parser::new(
                ParserKind::Regex,
                Some(r"^(?P<date>\S+) (?P<time>\S+) (?P<level>[A-Z]+) (?P<message>.*)$"),
                Some("[year]-[month]-[day] [hour]:[minute]:[second]"),
                Some("+02:00"),
            )
            .expect("the pattern compiles"),
        );
        parsers
    });
    static REDACTOR: OnceLock<Redactor> = OnceLock::new();
    let redactor = REDACTOR.get_or_init(|| {
        Redactor::new(&[RedactRule {
            pattern: r"(?i)password=\S+".into(),
            replacement: "password=<redacted>".into(),
        }])
        .expect("the rule compiles")
    });
    let line = String::from_utf8_lossy(data);
    let (line, _) = redactor.apply(&line);
    for parser in parsers {
        let parsed = parser.parse(&line);
        assert!(parsed.fields.len() <= 64, "fields are capped");
    }
}

/// Query text and page cursors, as the API takes them.
pub fn query(data: &[u8]) {
    logvault_collector::fuzzing::query(data);
}

fn keyring() -> &'static (Keyring, Kek) {
    static KEYS: OnceLock<(Keyring, Kek)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let kek = Kek::generate("fuzz").expect("the system random source works");
        let mut keyring = Keyring::default();
        keyring.insert(kek.clone());
        (keyring, kek)
    })
}

fn header(chunk_size: u32, raw_len: u64) -> SegmentHeader {
    SegmentHeader {
        algorithm: segment::ALGORITHM_ZSTD_AES256GCM,
        chunk_size,
        segment_id: "00000000000000000001".into(),
        collector: "fuzz".into(),
        tenant: "acme".into(),
        host: "web-1".into(),
        first_ns: 1,
        last_ns: 2,
        created_ns: 3,
        batches: 0,
        records: 0,
        raw_len,
        signers: vec![[7; 32]],
    }
}

/// Archive segments: parsed, hashed, opened and rewrapped as found in a
/// bucket; the bytes as a segment's plaintext, sealed and opened again
/// (the same entries come back); and the bytes as the encrypted zstd
/// stream, which must be refused without writing past the declared size.
pub fn segment(data: &[u8]) {
    let (keyring, kek) = keyring();
    if let Ok(view) = SegmentView::parse(data) {
        let _ = view.hash();
        let _ = view.entries(keyring, 1 << 20);
        let _ = view.rewrap(keyring, kek);
    }
    let decoded = segment::decode_entries(data);
    let chunk = 4096 + (data.len() as u32 % 4096);
    let sealed = segment::seal(header(chunk, 0), data, 1, kek);
    let view = SegmentView::parse(&sealed.bytes).expect("a sealed segment parses");
    assert_eq!(view.hash(), sealed.hash);
    let opened = view.entries(keyring, 1 << 22).map_err(|e| e.to_string());
    assert_eq!(opened, decoded.map_err(|e| e.to_string()), "sealing keeps the entries");
    let raw_len = u64::from(data.first().copied().unwrap_or(0)) * 64;
    let lying = segment::seal_compressed(header(chunk, raw_len), data, kek);
    let view = SegmentView::parse(&lying.bytes).expect("a sealed segment parses");
    let _ = view.entries(keyring, 1 << 20);
}

/// Checkpoint files: what parses signs and parses again to the same body.
pub fn checkpoint(data: &[u8]) {
    let Ok(parsed) = Checkpoint::parse(data) else { return };
    let public = ring::signature::KeyPair::public_key(key()).as_ref().to_vec();
    let _ = parsed.verify(&public);
    let first = Checkpoint::parse(&parsed.body.sign(key())).expect("a signed body parses");
    first.verify(&public).expect("a checkpoint signed here verifies");
    let second = Checkpoint::parse(&first.body.clone().sign(key())).expect("a signed body parses");
    assert_eq!(first.body, second.body, "a checkpoint body round-trips");
}

/// The collector's and the agent's configuration loaders.
pub fn config(data: &[u8]) {
    logvault_collector::fuzzing::config(data);
    let text = String::from_utf8_lossy(data);
    let _ = logvault_agent::config::AgentConfig::parse(&text, "fuzz.toml".as_ref());
}

/// The collector's WAL entries and stream snapshot.
pub fn wal(data: &[u8]) {
    logvault_collector::fuzzing::wal(data);
}

/// What collectors sharing a bucket read from it: stream objects, split
/// manifests, split packages.
pub fn cluster(data: &[u8]) {
    logvault_collector::fuzzing::cluster(data);
}

/// Where the loghub samples are.
fn loghub() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/loghub")
}

/// The first `count` lines of each loghub sample.
fn sample_lines(count: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(loghub())
        .map(|dir| dir.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.retain(|p: &std::path::PathBuf| p.extension().is_some_and(|x| x == "log"));
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        lines.extend(text.lines().take(count).map(str::to_owned));
    }
    lines
}

/// Valid inputs for each target, made by the real encoders from the
/// loghub samples: the fuzzers start from these.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use logvault_storage::frame::{AckStatus, BatchRef, Frame, RefuseCode};
    use logvault_storage::{Level, WireRecord};
    let lines = sample_lines(20);
    let mut seeds: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let builder = || {
        let mut builder = BatchBuilder::new("web-1", "/var/log/app.log", 3, 40, [1; 32]);
        for (i, line) in lines.iter().enumerate() {
            let mut record = WireRecord::new(1_700_000_000_000_000_000 + i as i64, Level::Info, line.clone());
            if i % 3 == 0 {
                record.fields.push(("pid".into(), i.to_string()));
            }
            builder.push(record);
        }
        builder
    };
    let plain = builder().sign(key());
    let mut deflater = logvault_storage::batch::Deflater::zstd(1).expect("zstd starts");
    let compressed = builder().sign_with(key(), Some(&mut deflater));
    seeds.push(("batch", plain.clone()));
    seeds.push(("batch", compressed.clone()));
    for frame in [
        Frame::Hello { version: 1 },
        Frame::Batch(compressed.clone()),
        Frame::Ack { batch_hash: [9; 32], status: AckStatus::Duplicate },
        Frame::Refused { code: RefuseCode::Gap, message: "records 4..9 are missing".into() },
        Frame::Resume {
            batches: vec![BatchRef { source: "/var/log/app.log".into(), epoch: 3, hash: [5; 32] }],
        },
        Frame::Resumed { stored: vec![true, false] },
    ] {
        seeds.push(("frame", frame.encode()));
    }
    let mut entries = Vec::new();
    for batch in [&plain, &compressed] {
        segment::encode_entry_parts(&mut entries, 1_700_000_000_000_000_000, 0, 0, batch);
    }
    seeds.push(("segment", entries.clone()));
    let (_, kek) = keyring();
    seeds.push(("segment", segment::seal(header(4096, 0), &entries, 3, kek).bytes));
    // Every batch compressed by its sender: the entries sealed as they are.
    let mut compressed_entries = Vec::new();
    segment::encode_entry_parts(&mut compressed_entries, 1_700_000_000_000_000_000, 0, 0, &compressed);
    let stored = segment::seal(header(4096, 0), &compressed_entries, 3, kek);
    assert_eq!(
        segment::SegmentView::parse(&stored.bytes).map(|v| v.header.algorithm).ok(),
        Some(segment::ALGORITHM_AES256GCM)
    );
    seeds.push(("segment", stored.bytes));
    let mut octets = Vec::new();
    let mut newlines = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let message = if i % 2 == 0 {
            format!("<{}>1 2024-05-01T10:00:{:02}.123Z web-1 app {} - - {line}", 8 + i % 100, i % 60, 100 + i)
        } else {
            format!("<13>May  1 10:00:{:02} web-1 app[{}]: {line}", i % 60, 100 + i)
        };
        octets.extend_from_slice(format!("{} {message}", message.len()).as_bytes());
        newlines.extend_from_slice(message.as_bytes());
        newlines.push(b'\n');
    }
    seeds.push(("syslog", octets));
    seeds.push(("syslog", newlines));
    for line in lines.iter().step_by(7) {
        seeds.push(("line_parsers", line.clone().into_bytes()));
    }
    for line in [
        r#"{"time":"2024-05-01T10:00:00Z","level":"warn","msg":"disk 91% full","disk":{"dev":"sda"}}"#,
        r#"ts=2024-05-01T10:00:00Z level=error msg="connection reset" peer=10.0.0.7 password=hunter2"#,
        r#"10.0.0.7 - alice [01/May/2024:10:00:00 +0000] "GET /index.html HTTP/1.1" 200 512 "-" "curl/8""#,
        "2024-05-01 10:00:00 ERROR something failed",
    ] {
        seeds.push(("line_parsers", line.as_bytes().to_vec()));
    }
    for query in [
        "PacketResponder",
        "level:error AND host:web-1",
        "\"Receiving block\" OR fields.pid:42",
        "message:fail* -level:debug",
        "(source:\"/var/log/app.log\" AND flags:truncated) OR tenant:acme",
        "1700000000000000000.42.7",
    ] {
        seeds.push(("query", query.as_bytes().to_vec()));
    }
    let body = logvault_storage::checkpoint::CheckpointBody {
        collector: "collector1".into(),
        seq: 2,
        prev: "ab".repeat(32),
        from_ns: 1,
        to_ns: 2,
        segments: vec![logvault_storage::checkpoint::SegmentRecord {
            key: "acme/2024/05/01/web-1/00000000000000000001".into(),
            hash: "cd".repeat(32),
            size: 4096,
            tenant: "acme".into(),
            host: "web-1".into(),
            first_ns: 1,
            last_ns: 2,
            records: 20,
        }],
        root: String::new(),
        deleted: vec![logvault_storage::checkpoint::Deletion {
            key: "acme/2023/05/01/web-1/00000000000000000000".into(),
            hash: "ef".repeat(32),
            reason: "retention".into(),
        }],
    };
    seeds.push(("checkpoint", body.sign(key())));
    for seed in logvault_collector::fuzzing::http_seeds() {
        seeds.push(seed);
    }
    seeds.push(("config", COLLECTOR_CONFIG.as_bytes().to_vec()));
    seeds.push(("config", AGENT_CONFIG.as_bytes().to_vec()));
    for seed in logvault_collector::fuzzing::wal_seeds(&compressed) {
        seeds.push(("wal", seed));
    }
    for seed in logvault_collector::fuzzing::cluster_seeds() {
        seeds.push(("cluster", seed));
    }
    seeds
}

const COLLECTOR_CONFIG: &str = r#"data_dir = "/var/lib/logvault"

[ingest]
listen = "0.0.0.0:6000"
ca = "/etc/logvault/pki/ca.crt"
cert = "/etc/logvault/pki/collectors/c1.crt"
key = "/etc/logvault/pki/collectors/c1.key"

[api]
listen = "127.0.0.1:8443"
jwt_public_key = "/etc/logvault/jwt.pub"

[index]
retention_ms = 2592000000
max_bytes = 107374182400

[wal]
prune = "auto"

[[tenants.map]]
tenant = "payments"
agents = ["pay-*"]

[archive]
uri = "s3://logs/archive?endpoint=http://127.0.0.1:9000&region=us-east-1"
kek_file = "/etc/logvault/archive.kek"
checkpoint_key = "/etc/logvault/checkpoint.key"
"#;

const AGENT_CONFIG: &str = r#"state_dir = "/var/lib/logvault-agent"
metrics_listen = "127.0.0.1:9601"

[collector]
address = "collector.example.org:6000"
ca = "/etc/logvault/ca.crt"
cert = "/etc/logvault/agent.crt"
key = "/etc/logvault/agent.key"

[[sources]]
include = ["/var/log/*.log"]
read_from = "beginning"
parser = "regex"
pattern = '^(?P<timestamp>\S+ \S+) (?P<level>\w+) (?P<component>[^:]+): '
timestamp_format = "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond]"
redact = [{ pattern = 'password=\S+', replacement = "password=<redacted>" }]
multiline = { start = '^\d{4}-\d{2}-\d{2} ', timeout_ms = 1000 }
"#;
