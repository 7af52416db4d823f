//! The archive end to end on the file system: the eight loghub samples are
//! sealed, checkpointed and audited clean; a golden catalogue of tampering
//! is each caught with its exact finding and exit code 1; a key rotation
//! keeps the audit clean; and a restore makes every line searchable again
//! with the same counts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;
use logvault_storage::checkpoint::Checkpoint;
use logvault_storage::keyring::Keyring;
use logvault_storage::segment::{self, SegmentView};

struct Audit {
    code: i32,
    findings: Vec<(String, String)>,
    report: serde_json::Value,
}

/// Where the archive lives: its URI and the directory its objects are
/// files in (for tampering), by prefix, and what its clients need.
struct Backend {
    uri: Box<dyn Fn(&str) -> String>,
    dir: Box<dyn Fn(&str) -> PathBuf>,
    env: Vec<(String, String)>,
}

fn audit(backend: &Backend, prefix: &str, checkpoint_pub: &Path, keys: &[&Path]) -> Audit {
    let mut command = Command::new(bin("logvault"));
    command
        .args(["audit", "--json", "--archive", &(backend.uri)(prefix)])
        .arg("--checkpoint-key")
        .arg(checkpoint_pub)
        .envs(backend.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for key in keys {
        command.arg("--key-file").arg(key);
    }
    let output = command.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("audit printed no JSON: {}", String::from_utf8_lossy(&output.stderr)));
    let findings = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["kind"].as_str().unwrap().to_owned(), f["object"].as_str().unwrap().to_owned()))
        .collect();
    Audit { code: output.status.code().unwrap(), findings, report }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `dir`, as keys relative to it, sorted.
fn objects(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn keygen(setup: &Setup, id: &str) -> PathBuf {
    let path = setup.path().join(format!("{id}.kek"));
    let status = Command::new(bin("logvault"))
        .args(["archive", "keygen", "--id", id, "--out"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

fn level_counts(collector: &Collector, token: &str) -> serde_json::Value {
    let (status, body) = collector.aggregate(
        token,
        serde_json::json!({ "terms": [{ "field": "level" }, { "field": "source", "size": 20 }] }),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::json!({ "total": body["total"], "terms": body["terms"] })
}

#[test]
fn on_the_file_system_the_archive_audits_clean_catches_every_tampering_and_restores_every_line() {
    let setup = Setup::new("archive");
    let base = setup.path().to_owned();
    let backend = Backend {
        uri: Box::new({
            let base = base.clone();
            move |prefix| base.join(prefix).display().to_string()
        }),
        dir: Box::new(move |prefix| base.join(prefix)),
        env: Vec::new(),
    };
    suite(&setup, &backend, &SAMPLES);
}

/// The same suite against a real S3 server (s3s-fs) on loopback.
#[test]
fn on_s3_the_archive_audits_clean_catches_every_tampering_and_restores_every_line() {
    let setup = Setup::new("archive-s3");
    let s3 = S3Server::start(setup.path(), "logs");
    let root = s3.root.join("logs");
    let backend = Backend {
        uri: Box::new({
            let endpoint = s3.endpoint.clone();
            move |prefix| format!("s3://logs/{prefix}?endpoint={endpoint}&region=us-east-1")
        }),
        dir: Box::new(move |prefix| root.join(prefix)),
        env: s3.env.clone(),
    };
    suite(&setup, &backend, &["HDFS_2k.log", "OpenSSH_2k.log", "Apache_2k.log"]);
    drop(s3);
}

fn suite(setup: &Setup, backend: &Backend, samples: &[&str]) {
    let archive = (backend.dir)("archive");
    let kek = keygen(setup, "k1");
    let checkpoint_key = setup.path().join("checkpoint.key");
    let checkpoint_pub = checkpoint_key.with_extension("pub");
    let archive_toml = format!(
        "\n[archive]\nuri = {:?}\nkek_file = {:?}\ncheckpoint_key = {:?}\ncollector_id = \"c1\"\nseal_interval_ms = 300\ncheckpoint_interval_ms = 700\nsegment_bytes = 1048576\n",
        (backend.uri)("archive"),
        kek.display().to_string(),
        checkpoint_key.display().to_string()
    );
    let collector = Collector::start(
        setup,
        &CollectorOptions {
            extra_toml: archive_toml.clone(),
            env: backend.env.clone(),
            ..Default::default()
        },
    );
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, samples);
    let lines = 2000 * samples.len() as u64;
    let config = loghub_agent_config(setup, "hub-1", collector.ingest, &files);
    let agent = start_agent(setup, "hub-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", lines, Duration::from_secs(90));
    let before = level_counts(&collector, &token);
    agent.stop();
    // A graceful stop seals what waits and writes a last checkpoint.
    let status = collector.process.stop();
    assert!(status.success(), "{status}");

    // Clean, without and with the key: every batch's signature, chain and
    // sequence checked.
    let clean = audit(backend, "archive", &checkpoint_pub, &[]);
    assert_eq!((clean.code, &clean.findings), (0, &vec![]), "{}", clean.report);
    assert!(clean.report["checkpoints"].as_u64().unwrap() >= 2, "{}", clean.report);
    let deep = audit(backend, "archive", &checkpoint_pub, &[&kek]);
    assert_eq!((deep.code, &deep.findings), (0, &vec![]), "{}", deep.report);
    assert_eq!(deep.report["records"], lines, "{}", deep.report);
    assert_eq!(deep.report["pending"], 0);

    let all = objects(&archive);
    let segments: Vec<&String> = all.iter().filter(|k| !k.starts_with("_checkpoints/")).collect();
    let checkpoints: Vec<&String> = all.iter().filter(|k| k.starts_with("_checkpoints/")).collect();
    assert!(segments.len() >= 2, "{all:?}");
    assert!(segments.iter().all(|k| k.starts_with("default/") && k.contains("/hub-1/c1-")), "{segments:?}");

    // The golden tamper catalogue: each case on a fresh copy.
    let keyring = Keyring::load(std::slice::from_ref(&kek)).unwrap();
    let other_key = {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::Ed25519KeyPair::from_pkcs8(
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref(),
        )
        .unwrap()
    };
    // The tampering closures outlive this frame's borrows.
    let first: &'static str = Box::leak(segments[0].clone().into_boxed_str());
    let second: &'static str = Box::leak(segments[1].clone().into_boxed_str());
    let middle_checkpoint: &'static str =
        Box::leak(checkpoints[checkpoints.len() / 2].clone().into_boxed_str());
    type Tamper = Box<dyn Fn(&Path)>;
    /// Findings that must be there (an empty object: that kind may be).
    type Expected = Vec<(&'static str, String)>;
    let cases: Vec<(&str, Tamper, Expected)> = vec![
        (
            "a flipped byte in a segment",
            Box::new(move |dir: &Path| {
                let path = dir.join(first);
                let mut bytes = std::fs::read(&path).unwrap();
                let at = bytes.len() - 100;
                bytes[at] ^= 0x40;
                std::fs::write(path, bytes).unwrap();
            }),
            vec![("MODIFIED", first.to_owned())],
        ),
        (
            "a deleted segment",
            Box::new(move |dir: &Path| std::fs::remove_file(dir.join(first)).unwrap()),
            vec![("MISSING", first.to_owned())],
        ),
        (
            "an extra object",
            Box::new(|dir: &Path| {
                std::fs::create_dir_all(dir.join("default/2020/01/01/intruder")).unwrap();
                std::fs::write(dir.join("default/2020/01/01/intruder/x"), b"not from us").unwrap();
            }),
            vec![("EXTRA", "default/2020/01/01/intruder/x".to_owned())],
        ),
        (
            "a deleted checkpoint",
            Box::new(move |dir: &Path| std::fs::remove_file(dir.join(middle_checkpoint)).unwrap()),
            // The segments it listed are named by no checkpoint now.
            vec![("MISSING", middle_checkpoint.to_owned()), ("EXTRA", String::new())],
        ),
        (
            "two segments' names swapped",
            Box::new(move |dir: &Path| {
                let (a, b) = (dir.join(first), dir.join(second));
                let tmp = dir.join("swap.tmp");
                std::fs::rename(&a, &tmp).unwrap();
                std::fs::rename(&b, &a).unwrap();
                std::fs::rename(&tmp, &b).unwrap();
            }),
            vec![("REORDERED", first.to_owned()), ("REORDERED", second.to_owned())],
        ),
        (
            "a checkpoint re-signed with another key",
            Box::new(move |dir: &Path| {
                let path = dir.join(middle_checkpoint);
                let checkpoint = Checkpoint::parse(&std::fs::read(&path).unwrap()).unwrap();
                std::fs::write(path, checkpoint.body.sign(&other_key)).unwrap();
            }),
            // The segments it listed are named by no trusted checkpoint now.
            vec![("MODIFIED", middle_checkpoint.to_owned()), ("EXTRA", String::new())],
        ),
        (
            "a segment re-encrypted with a forged batch by a holder of the KEK",
            Box::new({
                let keyring = keyring.clone();
                move |dir: &Path| {
                    let path = dir.join(first);
                    let bytes = std::fs::read(&path).unwrap();
                    let view = SegmentView::parse(&bytes).unwrap();
                    let mut entries = view.entries(&keyring, 1 << 30).unwrap();
                    // Change a byte inside the batch's signed body.
                    let batch = &mut entries[0].batch;
                    let at = batch.len() - 10;
                    batch[at] ^= 1;
                    let mut raw = Vec::new();
                    for entry in &entries {
                        segment::encode_entry(&mut raw, entry);
                    }
                    let kek = keyring.get(&view.kek_id).unwrap();
                    std::fs::write(path, segment::seal(view.header.clone(), &raw, 3, kek).bytes).unwrap();
                }
            }),
            vec![("MODIFIED", first.to_owned()), ("UNSIGNED", first.to_owned())],
        ),
        (
            "a truncated segment",
            Box::new(move |dir: &Path| {
                let path = dir.join(first);
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
            }),
            vec![("MODIFIED", first.to_owned())],
        ),
    ];
    for (n, (name, tamper, want)) in cases.iter().enumerate() {
        let prefix = format!("tampered-{n}");
        let copy = (backend.dir)(&prefix);
        copy_dir(&archive, &copy);
        tamper(&copy);
        let found = audit(backend, &prefix, &checkpoint_pub, &[&kek]);
        assert_eq!(found.code, 1, "{name}: {}", found.report);
        for (kind, object) in want.iter().filter(|(_, object)| !object.is_empty()) {
            assert!(
                found.findings.iter().any(|(k, o)| k == kind && o == object),
                "{name}: no {kind} {object} in {}",
                found.report
            );
        }
        let kinds: Vec<&str> = want.iter().map(|(k, _)| *k).collect();
        assert!(
            found.findings.iter().all(|(k, _)| kinds.contains(&k.as_str())),
            "{name}: unexpected findings in {}",
            found.report
        );
    }

    // Rotate to a new key: the same hashes, so the audit stays clean, and
    // the old key is no longer needed.
    let new_kek = keygen(setup, "k2");
    let rotated = Command::new(bin("logvault"))
        .args(["archive", "rotate-key", "--archive", &(backend.uri)("archive")])
        .envs(backend.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("--key-file")
        .arg(&kek)
        .arg("--new-key")
        .arg(&new_kek)
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let after = audit(backend, "archive", &checkpoint_pub, &[&new_kek]);
    assert_eq!((after.code, &after.findings), (0, &vec![]), "{}", after.report);
    assert_eq!(after.report["records"], lines);
    for key in &segments {
        let bytes = std::fs::read(archive.join(key)).unwrap();
        assert_eq!(SegmentView::parse(&bytes).unwrap().kek_id, "k2");
    }
    let old_only = audit(backend, "archive", &checkpoint_pub, &[&kek]);
    assert_eq!(old_only.code, 1, "the old key no longer opens the segments");

    // Restore into a fresh data directory and serve it: every line is
    // searchable again, with the same counts.
    let restored_dir = setup.path().join("restored");
    let output = Command::new(bin("logvault"))
        .args(["archive", "restore", "--archive", &(backend.uri)("archive")])
        .envs(backend.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("--key-file")
        .arg(&new_kek)
        .arg("--into")
        .arg(&restored_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains(&format!("{lines} records")), "{said}");
    let restored_setup_toml = std::fs::read_to_string(setup.path().join("collector.toml"))
        .unwrap()
        .replace(
            &setup.path().join("collector-data").display().to_string(),
            &restored_dir.display().to_string(),
        )
        .replace(&archive_toml, "");
    let restored_config = setup.path().join("restored.toml");
    std::fs::write(&restored_config, restored_setup_toml).unwrap();
    let mut served = Process::spawn_named(
        "restored collector",
        &bin("logvault"),
        &["serve", "--config", restored_config.to_str().unwrap()],
        setup.path().join("restored.log"),
    );
    let line = served.first_stdout_line();
    let api = line.split_whitespace().nth(3).unwrap().trim_start_matches("https://").parse().unwrap();
    let restored =
        Collector { process: served, ingest: collector.ingest, api, syslog: None, ca: collector.ca.clone() };
    restored.wait_total(&token, "*", lines, Duration::from_secs(30));
    assert_eq!(level_counts(&restored, &token), before);
    restored.process.stop();
}

/// Retention deletes segments after their time and says so in the next
/// checkpoint: the audit stays clean, because it tells policy from
/// tampering.
#[test]
fn retention_deletions_are_listed_in_checkpoints_and_audit_clean() {
    let setup = Setup::new("archive-retention");
    let archive = setup.path().join("archive");
    let kek = keygen(&setup, "k1");
    let checkpoint_key = setup.path().join("checkpoint.key");
    let archive_toml = format!(
        "\n[archive]\nuri = {:?}\nkek_file = {:?}\ncheckpoint_key = {:?}\nseal_interval_ms = 200\ncheckpoint_interval_ms = 500\nretention_ms = 1500\n",
        archive.display().to_string(),
        kek.display().to_string(),
        checkpoint_key.display().to_string()
    );
    let collector =
        Collector::start(&setup, &CollectorOptions { extra_toml: archive_toml, ..Default::default() });
    let files = copy_samples(&setup.path().join("logs"), &["HDFS_2k.log", "Linux_2k.log"]);
    let config = loghub_agent_config(&setup, "ret-1", collector.ingest, &files);
    let agent = start_agent(&setup, "ret-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 4000, Duration::from_secs(60));
    let segments = |dir: &Path| objects(dir).into_iter().filter(|k| !k.starts_with("_checkpoints/")).count();
    wait_for(Duration::from_secs(30), "segments to be sealed", || (segments(&archive) > 0).then_some(()));
    wait_for(Duration::from_secs(30), "retention to delete them", || (segments(&archive) == 0).then_some(()));
    agent.stop();
    collector.process.stop();

    let deletions: Vec<String> = objects(&archive)
        .iter()
        .filter(|k| k.starts_with("_checkpoints/"))
        .flat_map(|k| Checkpoint::parse(&std::fs::read(archive.join(k)).unwrap()).unwrap().body.deleted)
        .map(|d| {
            assert_eq!(d.reason, "retention");
            d.key
        })
        .collect();
    assert!(!deletions.is_empty());
    let backend = Backend {
        uri: Box::new({
            let base = setup.path().to_owned();
            move |prefix| base.join(prefix).display().to_string()
        }),
        dir: Box::new({
            let base = setup.path().to_owned();
            move |prefix| base.join(prefix)
        }),
        env: Vec::new(),
    };
    let clean = audit(&backend, "archive", &checkpoint_key.with_extension("pub"), &[&kek]);
    assert_eq!((clean.code, &clean.findings), (0, &vec![]), "{}", clean.report);
    // The search index keeps its own copy: retention is the archive's.
    assert_eq!(collector_total_after_restart(&setup), 4000);
}

/// The total a restarted collector (without the archive) serves.
fn collector_total_after_restart(setup: &Setup) -> u64 {
    let collector = Collector::start(setup, &CollectorOptions::default());
    let token = setup.token(&["default"], Role::Reader);
    let total = collector.total(&token, "*");
    collector.process.stop();
    total
}

/// While the object store is down the WAL keeps everything; past
/// `max_pending_bytes` the collector answers busy, so the agent keeps its
/// data; once the store is back, everything is archived once and audits
/// clean.
#[test]
fn an_object_store_outage_pushes_back_on_agents_and_loses_nothing() {
    let setup = Setup::new("archive-outage");
    let mut s3 = S3Server::start(setup.path(), "logs");
    let kek = keygen(&setup, "k1");
    let checkpoint_key = setup.path().join("checkpoint.key");
    let uri = format!("s3://logs/archive?endpoint={}&region=us-east-1", s3.endpoint);
    let archive_toml = format!(
        "\n[archive]\nuri = {uri:?}\nkek_file = {:?}\ncheckpoint_key = {:?}\nseal_interval_ms = 200\ncheckpoint_interval_ms = 500\nsegment_bytes = 262144\nmax_pending_bytes = 400000\n\n[wal]\nsegment_bytes = 1048576\nprune_check_ms = 200\n",
        kek.display().to_string(),
        checkpoint_key.display().to_string()
    );
    let collector = Collector::start(
        &setup,
        &CollectorOptions { extra_toml: archive_toml, env: s3.env.clone(), ..Default::default() },
    );
    let admin = setup.token(&["default"], Role::Admin);
    let metric_now = |name: &str| metric(&collector.metrics_raw(&admin).1, name).unwrap_or(0);
    s3.pause();

    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let input = logs.join("noise.log");
    let lines = incompressible_lines(20_000);
    append_lines(&input, &lines);
    let config = agent_config(
        &setup,
        "out-1",
        collector.ingest,
        &[input.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "out-1", &config);
    wait_for(Duration::from_secs(60), "the archive to fall behind", || {
        (metric_now("logvault_wal_busy") == 1).then_some(())
    });
    // More lines now are refused as busy: the agent keeps them.
    append_lines(&input, &incompressible_lines(25_000)[20_000..]);
    wait_for(Duration::from_secs(60), "the collector to answer busy", || {
        (metric_now("logvault_refusals_total{reason=\"busy\"}") > 0).then_some(())
    });
    let token = setup.token(&["default"], Role::Reader);
    std::thread::sleep(Duration::from_secs(1));
    assert!(collector.total(&token, "*") < 25_000, "the agent was held back");

    // The store is back: the backlog is archived, the agent is let in again.
    s3.resume();
    collector.wait_total(&token, "*", 25_000, Duration::from_secs(120));
    wait_for(Duration::from_secs(30), "busy to clear", || {
        (metric_now("logvault_wal_busy") == 0).then_some(())
    });
    // Once archived and indexed, the WAL's closed segments go: local disk
    // stays bounded by what is not yet archived.
    let pruned = wait_for(Duration::from_secs(30), "the wal to be pruned", || {
        let pruned = metric_now("logvault_wal_pruned_bytes_total");
        (pruned > 0).then_some(pruned)
    });
    let left = metric_now("logvault_wal_bytes");
    assert!(left < 1_100_000, "pruned {pruned}, left {left}: at most the open segment stays");
    agent.stop();
    collector.process.stop();

    let backend = Backend {
        uri: Box::new({
            let endpoint = s3.endpoint.clone();
            move |prefix| format!("s3://logs/{prefix}?endpoint={endpoint}&region=us-east-1")
        }),
        dir: Box::new({
            let root = s3.root.join("logs");
            move |prefix| root.join(prefix)
        }),
        env: s3.env.clone(),
    };
    let clean = audit(&backend, "archive", &checkpoint_key.with_extension("pub"), &[&kek]);
    assert_eq!((clean.code, &clean.findings), (0, &vec![]), "{}", clean.report);
    assert_eq!(clean.report["records"], 25_000, "each line archived once: {}", clean.report);
    // The index outlives the pruned WAL.
    assert_eq!(collector_total_after_restart(&setup), 25_000);
}
