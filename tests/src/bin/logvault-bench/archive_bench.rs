//! `logvault-bench archive`: the archive's compression, sealing and audit
//! speed, beside bare zstd and bare AES-256-GCM on the same bytes.
//!
//! The input is the eight loghub samples repeated, made into the signed
//! zstd batches an agent ships (its default limits and level)
//! and the WAL entries a collector stores. Sealing (zstd unless every
//! batch is already compressed, AES-256-GCM in chunks, hashing) runs on
//! one thread; so do bare zstd at the same level and bare AES-256-GCM over
//! the same entry bytes. The ratio is the raw
//! text's size over the archive's (segments and checkpoint, metadata
//! included). The audit checks the written archive with the key: every
//! checkpoint, segment hash, batch signature and chain.

use std::path::PathBuf;

use logvault_storage::archive::{Archive, checkpoint_key, segment_key};
use logvault_storage::audit::{AuditOptions, audit};
use logvault_storage::batch::Deflater;
use logvault_storage::checkpoint::{CheckpointBody, SegmentRecord, hex};
use logvault_storage::keyring::{Kek, Keyring};
use logvault_storage::segment::{self, SegmentEntry, SegmentHeader};
use logvault_storage::{BatchBuilder, Level, WireRecord};

pub(crate) struct ArchiveOptions {
    pub(crate) lines: usize,
    pub(crate) level: i32,
    pub(crate) dir: PathBuf,
    pub(crate) out: Option<PathBuf>,
}

const SEGMENT_RAW: usize = 64 << 20;

/// The agent's default batch limits (`batch.max_records`,
/// `batch.max_bytes`): a batch is signed when it reaches either.
const BATCH_RECORDS: u32 = 10_000;
const BATCH_BYTES: usize = 1024 * 1024;

/// The entries (as a segment's plaintext) of the samples' lines made into
/// signed zstd batches as the agent makes them, one chain per sample; and
/// the text's size.
fn entries(
    samples: &[(&str, Vec<String>)],
    key: &ring::signature::Ed25519KeyPair,
    deflater: &mut Deflater,
) -> Result<(u64, Vec<u8>), String> {
    let (mut raw_bytes, mut plaintext) = (0u64, Vec::new());
    for (sample, lines) in samples {
        let source = format!("/var/log/{sample}");
        let (mut prev, mut seq) = ([0u8; 32], 0u64);
        let mut builder: Option<BatchBuilder> = None;
        for (i, line) in lines.iter().enumerate() {
            raw_bytes += line.len() as u64 + 1;
            let batch = builder.get_or_insert_with(|| BatchBuilder::new("bench-1", &source, 1, seq, prev));
            batch.push(WireRecord::new(1_700_000_000_000_000_000 + i as i64, Level::Info, line.clone()));
            seq += 1;
            let full = batch.len() >= BATCH_RECORDS || batch.body_bytes() >= BATCH_BYTES;
            if full || i + 1 == lines.len() {
                let batch = builder.take().expect("just pushed").sign_with(key, Some(deflater));
                prev = logvault_storage::batch::encoded_batch_hash(&batch).map_err(|e| e.to_string())?;
                segment::encode_entry(
                    &mut plaintext,
                    &SegmentEntry { received_ns: 0, skip: 0, signer: 0, batch },
                );
            }
        }
    }
    Ok((raw_bytes, plaintext))
}

/// Splits a run of entries into pieces of about `size` bytes, at entry
/// boundaries.
fn split_entries(plaintext: &[u8], size: usize) -> Vec<Vec<u8>> {
    let (mut pieces, mut start, mut at) = (Vec::new(), 0, 0);
    while at + 4 <= plaintext.len() {
        let len = u32::from_be_bytes(plaintext[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 4 + len;
        if at - start >= size {
            pieces.push(plaintext[start..at].to_vec());
            start = at;
        }
    }
    if start < plaintext.len() {
        pieces.push(plaintext[start..].to_vec());
    }
    pieces
}

/// Wall time of `work` on this thread (the machine otherwise idle).
fn timed<T>(work: impl FnOnce() -> T) -> (T, f64) {
    let started = std::time::Instant::now();
    let out = work();
    (out, started.elapsed().as_secs_f64())
}

pub(crate) fn run(options: &ArchiveOptions) -> Result<(), String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
    let agent_key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
    let archive_key =
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
    let signer: [u8; 32] =
        ring::signature::KeyPair::public_key(&agent_key).as_ref().try_into().expect("32 bytes");

    // The agent's batches and the collector's entries: first the eight
    // samples as they are (for the ratio), then generated lines (for speed).
    let mut deflater = Deflater::zstd(1).map_err(|e| e.to_string())?;
    let samples: Vec<(&str, Vec<String>)> =
        logvault_e2e::SAMPLES.iter().map(|name| (*name, logvault_e2e::sample_lines(name))).collect();
    let (sample_raw, sample_plaintext) = entries(&samples, &agent_key, &mut deflater)?;
    // The peer: each sample's text alone, as zstd -1 packs it.
    let sample_text_zstd: usize = samples
        .iter()
        .map(|(_, lines)| {
            let text: String = lines.iter().flat_map(|line| [line.as_str(), "\n"]).collect();
            zstd::bulk::compress(text.as_bytes(), 1).map_or(0, |c| c.len())
        })
        .sum();
    let mut generator = logvault_e2e::generator::Generator::new(1);
    let mut by_sample: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
    for _ in 0..options.lines {
        let line = generator.line();
        by_sample.entry(line.sample).or_default().push(line.text);
    }
    let generated: Vec<(&str, Vec<String>)> = by_sample.into_iter().collect();
    let lines_total = options.lines as u64;
    let (raw_bytes, plaintext) = entries(&generated, &agent_key, &mut deflater)?;
    let mut plaintexts = split_entries(&plaintext, SEGMENT_RAW);
    plaintexts.retain(|p| !p.is_empty());
    let entry_bytes: u64 = plaintexts.iter().map(|p| p.len() as u64).sum();

    // Sealing, then the two limits on the same bytes.
    let kek = Kek::generate("bench").map_err(|e| e.to_string())?;
    let (sealed, seal_s) = timed(|| {
        let mut sealed = Vec::new();
        for (n, plaintext) in plaintexts.iter().enumerate() {
            let header = SegmentHeader {
                algorithm: segment::ALGORITHM_ZSTD_AES256GCM,
                chunk_size: segment::DEFAULT_CHUNK,
                segment_id: format!("bench-{n:020}"),
                collector: "bench".into(),
                tenant: "default".into(),
                host: "bench-1".into(),
                first_ns: 1_700_000_000_000_000_000,
                last_ns: 1_700_000_000_000_000_000,
                created_ns: 1_700_000_000_000_000_000,
                batches: 0,
                records: 0,
                raw_len: 0,
                signers: vec![signer],
            };
            sealed.push(segment::seal(header, plaintext, options.level, &kek));
        }
        sealed
    });
    let (zstd_out, zstd_s) = timed(|| {
        plaintexts
            .iter()
            .map(|p| zstd::bulk::compress(p, options.level).map_or(0, |c| c.len()))
            .sum::<usize>()
    });
    let aes = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7u8; 32]).map_err(|e| e.to_string())?,
    );
    let mut buffers = plaintexts.clone();
    let ((), aes_s) = timed(|| {
        let mut counter = 0u64;
        for buffer in &mut buffers {
            for chunk in buffer.chunks_mut(1 << 20) {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&counter.to_be_bytes());
                counter += 1;
                let _ = aes.seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::empty(),
                    chunk,
                );
            }
        }
    });

    // SHA-256 of the sealed bytes, the audit's own limit (in memory).
    let mut sha_runs: Vec<f64> = (0..5)
        .map(|_| {
            timed(|| {
                sealed.iter().fold(0u8, |acc, s| {
                    acc ^ ring::digest::digest(&ring::digest::SHA256, &s.bytes).as_ref()[0]
                })
            })
            .1
        })
        .collect();
    sha_runs.sort_by(f64::total_cmp);
    let sha_s = sha_runs[sha_runs.len() / 2];

    // The archive on disk, with a checkpoint, then the audit.
    let _ = std::fs::remove_dir_all(&options.dir);
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let archive = Archive::open(&options.dir.display().to_string()).map_err(|e| e.to_string())?;
    let mut records = Vec::new();
    for (n, segment) in sealed.iter().enumerate() {
        let key = segment_key("default", "bench-1", 1_700_000_000_000_000_000, &format!("bench-{n:020}"))
            .map_err(|e| e.to_string())?;
        runtime.block_on(archive.put_verified(&key, &segment.bytes)).map_err(|e| e.to_string())?;
        records.push(SegmentRecord {
            key,
            hash: hex(&segment.hash),
            size: segment.bytes.len() as u64,
            tenant: "default".into(),
            host: "bench-1".into(),
            first_ns: 1_700_000_000_000_000_000,
            last_ns: 1_700_000_000_000_000_000,
            records: 0,
        });
    }
    let checkpoint = CheckpointBody {
        collector: "bench".into(),
        seq: 1,
        prev: "0".repeat(64),
        from_ns: 0,
        to_ns: 1,
        segments: records,
        root: String::new(),
        deleted: Vec::new(),
    }
    .sign(&archive_key);
    let checkpoint_bytes = checkpoint.len() as u64;
    runtime
        .block_on(archive.put_verified(&checkpoint_key("bench", 1).map_err(|e| e.to_string())?, &checkpoint))
        .map_err(|e| e.to_string())?;
    let archive_bytes: u64 = sealed.iter().map(|s| s.bytes.len() as u64).sum::<u64>() + checkpoint_bytes;
    let mut keyring = Keyring::default();
    keyring.insert(kek);
    let audit_options = AuditOptions { keyring: Some(keyring), from_ns: None, to_ns: None };
    let public = ring::signature::KeyPair::public_key(&archive_key).as_ref().to_vec();
    // Each audit five times, the median reported: reads of a just-written
    // archive vary with what the page cache still holds.
    let median = |mut runs: Vec<f64>| {
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    };
    let mut audit_runs = Vec::new();
    let mut hash_only_runs = Vec::new();
    for _ in 0..4 {
        audit_runs.push(timed(|| runtime.block_on(audit(&archive, &public, &audit_options, |_, _| {}))).1);
        hash_only_runs.push(
            timed(|| runtime.block_on(audit(&archive, &public, &AuditOptions::default(), |_, _| {}))).1,
        );
    }
    let (report, audit_s) = timed(|| runtime.block_on(audit(&archive, &public, &audit_options, |_, _| {})));
    audit_runs.push(audit_s);
    let audit_s = median(audit_runs);
    let report = report.map_err(|e| e.to_string())?;
    // Without the key: checkpoints, hashes and inclusion only.
    let (hash_only, hash_only_s) =
        timed(|| runtime.block_on(audit(&archive, &public, &AuditOptions::default(), |_, _| {})));
    hash_only_runs.push(hash_only_s);
    let hash_only_s = median(hash_only_runs);
    if !hash_only.map_err(|e| e.to_string())?.findings.is_empty() {
        return Err("the audit without the key found something".into());
    }
    if !report.findings.is_empty() {
        return Err(format!("the audit found {:?}", report.findings.first()));
    }

    // Where the audit with the key spends its time, stage by stage, on the
    // same segments in memory, one thread (the audit runs the signature
    // checks on every core).
    let keyring = audit_options.keyring.as_ref().expect("set above");
    let limits = logvault_storage::batch::Limits::TRUSTED;
    let mut stages = [0f64; 6];
    for segment in &sealed {
        let view = segment::SegmentView::parse(&segment.bytes).map_err(|e| e.to_string())?;
        stages[0] += timed(|| view.hash()).1;
        let (compressed, s) = timed(|| view.decrypt(keyring));
        stages[1] += s;
        let compressed = compressed.map_err(|e| e.to_string())?;
        let raw = if view.header.algorithm == segment::ALGORITHM_AES256GCM {
            compressed // the entries as they are: nothing to inflate
        } else {
            let (raw, s) = timed(|| zstd::bulk::decompress(&compressed, view.header.raw_len as usize));
            stages[2] += s;
            raw.map_err(|e| e.to_string())?
        };
        let (entries, s) = timed(|| segment::entry_refs(&raw));
        stages[3] += s;
        let entries = entries.map_err(|e| e.to_string())?;
        let (views, s) = timed(|| {
            entries
                .iter()
                .map(|e| logvault_storage::batch::BatchView::parse(e.batch, &limits))
                .collect::<Result<Vec<_>, _>>()
        });
        stages[4] += s;
        let views = views.map_err(|e| e.to_string())?;
        let (verified, s) = timed(|| views.iter().all(|v| v.verify(&signer).is_ok()));
        stages[5] += s;
        if !verified {
            return Err("a batch did not verify".into());
        }
    }
    let stage_ms: serde_json::Map<String, serde_json::Value> = [
        "segment_sha256",
        "decrypt",
        "decompress",
        "split_entries",
        "parse_batches_and_body_sha256",
        "ed25519_verify",
    ]
    .iter()
    .zip(stages)
    .map(|(name, s)| ((*name).to_owned(), crate::round(s * 1000.0).into()))
    .collect();
    let audit_ms = audit_s * 1000.0;

    let sample_header = SegmentHeader {
        algorithm: segment::ALGORITHM_ZSTD_AES256GCM,
        chunk_size: segment::DEFAULT_CHUNK,
        segment_id: "samples".into(),
        collector: "bench".into(),
        tenant: "default".into(),
        host: "bench-1".into(),
        first_ns: 0,
        last_ns: 0,
        created_ns: 0,
        batches: 0,
        records: 0,
        raw_len: 0,
        signers: vec![signer],
    };
    let sample_sealed = segment::seal(
        sample_header,
        &sample_plaintext,
        options.level,
        &Kek::generate("r").map_err(|e| e.to_string())?,
    );
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let sealed_bytes: u64 = sealed.iter().map(|s| s.bytes.len() as u64).sum();
    let seal_mb_s = mb(entry_bytes) / seal_s;
    let zstd_mb_s = mb(entry_bytes) / zstd_s;
    let aes_mb_s = mb(entry_bytes) / aes_s;
    let report = serde_json::json!({
        "machine": crate::machine(std::thread::available_parallelism().map_or(1, |n| n.get())),
        "input": format!("{lines_total} lines generated from the loghub templates (seed 1): {:.1} MB of text as {:.1} MB of signed zstd-1 batches (at most 10,000 records or 1 MiB each, the agent's defaults); the ratio on the eight samples themselves ({:.2} MB)", mb(raw_bytes), mb(entry_bytes), mb(sample_raw)),
        "zstd_level": options.level,
        "compression_ratio": crate::round(sample_raw as f64 / (sample_sealed.bytes.len() + checkpoint_bytes as usize) as f64),
        "compression_ratio_text_alone": crate::round(sample_raw as f64 / sample_text_zstd as f64),
        "compression_ratio_generated": crate::round(raw_bytes as f64 / archive_bytes as f64),
        "compression_ratio_of_batches": crate::round(entry_bytes as f64 / archive_bytes as f64),
        "bare_zstd_ratio_of_batches": crate::round(entry_bytes as f64 / zstd_out as f64),
        "archive_mb": crate::round(mb(archive_bytes)),
        "seal_mb_s_per_core": crate::round(seal_mb_s),
        "bare_zstd_mb_s_per_core": crate::round(zstd_mb_s),
        "bare_aes_gcm_mb_s_per_core": crate::round(aes_mb_s),
        "seal_vs_zstd": crate::round(seal_mb_s / zstd_mb_s),
        "audit_mb_s": crate::round(mb(archive_bytes) / audit_s),
        "audit_raw_mb_s": crate::round(mb(raw_bytes) / audit_s),
        "bare_sha256_mb_s": crate::round(mb(sealed_bytes) / sha_s),
        "audit_vs_sha256": crate::round((mb(archive_bytes) / audit_s) / (mb(sealed_bytes) / sha_s)),
        "audit_without_key_mb_s": crate::round(mb(archive_bytes) / hash_only_s),
        "audit_batches": report.summary.batches,
        "archive_batches": segment::entry_refs(&plaintext).map_or(0, |entries| entries.len()),
        "audit_ms": crate::round(audit_ms),
        "audit_stages_one_thread_ms": stage_ms,
    });
    let text = serde_json::to_string_pretty(&report).expect("json");
    println!("{text}");
    if let Some(out) = &options.out {
        std::fs::write(out, format!("{text}\n")).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}
