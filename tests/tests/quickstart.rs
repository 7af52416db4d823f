//! `logvault quickstart`, as a new user runs it: one command, then search
//! with curl and with `logvault search`; run again, nothing shipped twice.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use logvault_e2e::*;

/// `logvault quickstart` on `data`, every listener on a free port.
fn quickstart_args(data: &Path) -> [&str; 9] {
    [
        "quickstart",
        "--data",
        data.to_str().unwrap(),
        "--api-listen",
        "127.0.0.1:0",
        "--ingest-listen",
        "127.0.0.1:0",
        "--syslog-listen",
        "127.0.0.1:0",
    ]
}

fn start(data: &Path) -> Process {
    let _ = std::fs::remove_file(data.join("quickstart.json"));
    let log =
        data.with_extension(format!("log{}", std::fs::read_dir(data.parent().unwrap()).unwrap().count()));
    Process::spawn_named("quickstart", &bin("logvault"), &quickstart_args(data), log)
}

fn details(data: &Path) -> serde_json::Value {
    let path = data.join("quickstart.json");
    wait_for(Duration::from_secs(30), "quickstart.json", || {
        serde_json::from_slice(&std::fs::read(&path).ok()?).ok()
    })
}

fn curl_total(details: &serde_json::Value, query: &str) -> u64 {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--fail-with-body", "--cacert"])
        .arg(details["ca_file"].as_str().unwrap())
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", details["token"].as_str().unwrap()))
        .arg(format!("{}/api/v1/search?q={query}&limit=5", details["api_url"].as_str().unwrap()))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    body["total"].as_u64().unwrap()
}

#[test]
fn quickstart_serves_the_samples_and_a_second_run_ships_nothing_twice() {
    let dir = TempDir::new("quickstart");
    let data = dir.path().join("data");
    let want = lines_with_term(&sample_lines("HDFS_2k.log"), "PacketResponder");
    let all = 3 * 2000;

    let first = start(&data);
    let info = details(&data);
    for key in [
        "api_url",
        "token",
        "writer_token",
        "ca_file",
        "ingest_addr",
        "syslog_addr",
        "certs_dir",
        "jwt_key",
        "archive_uri",
        "checkpoint_key",
        "kek_file",
    ] {
        assert!(info[key].is_string(), "quickstart.json lacks {key}: {info}");
    }
    for key in ["ca_file", "certs_dir", "jwt_key", "checkpoint_key", "kek_file"] {
        assert!(Path::new(info[key].as_str().unwrap()).is_absolute(), "{key} is not absolute");
    }
    wait_for(Duration::from_secs(30), "the samples to be searchable", || {
        (curl_total(&info, "*") == all).then_some(())
    });
    assert_eq!(curl_total(&info, "PacketResponder"), want);

    // The CLI, as the printed line runs it.
    let out = Command::new(bin("logvault"))
        .args([
            "search",
            "--url",
            info["api_url"].as_str().unwrap(),
            "--ca",
            info["ca_file"].as_str().unwrap(),
        ])
        .args(["--token", info["token"].as_str().unwrap(), "--limit", "3", "PacketResponder"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(stdout.lines().all(|l| l.contains("PacketResponder")), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("3 of {want} records")));

    // Keys are private to their owner.
    let certs = Path::new(info["certs_dir"].as_str().unwrap());
    for key in [
        certs.join("ca.key"),
        certs.join("collectors/collector.key"),
        data.join("jwt.key"),
        data.join("collector/keys/syslog-batch.key"),
        data.join("collector/keys/http-batch.key"),
        PathBuf::from(info["kek_file"].as_str().unwrap()),
        data.join("keys/checkpoint.key"),
    ] {
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600, "{}", key.display());
    }
    let ca_before = std::fs::read(info["ca_file"].as_str().unwrap()).unwrap();
    first.stop();

    // Stopping sealed everything and signed a last checkpoint: the archive
    // audits clean, every record's signature included.
    let audit = |info: &serde_json::Value| {
        Command::new(bin("logvault"))
            .args(["audit", "--json", "--archive", info["archive_uri"].as_str().unwrap()])
            .args(["--checkpoint-key", info["checkpoint_key"].as_str().unwrap()])
            .args(["--key-file", info["kek_file"].as_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = audit(&info);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["records"], all, "{report}");

    // Second run on the same directory: same CA, same data, no line twice,
    // and it keeps tailing.
    let second = start(&data);
    let info = details(&data);
    assert_eq!(std::fs::read(info["ca_file"].as_str().unwrap()).unwrap(), ca_before, "the CA was reused");
    wait_for(Duration::from_secs(30), "the index to reopen", || {
        (curl_total(&info, "*") == all).then_some(())
    });
    append_lines(
        &data.join("samples/HDFS_2k.log"),
        &["081111 000001 1 INFO dfs.DataNode$PacketResponder: PacketResponder 9 for block blk_1 terminating"
            .to_owned()],
    );
    wait_for(Duration::from_secs(10), "the appended line", || {
        (curl_total(&info, "PacketResponder") == want + 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(curl_total(&info, "*"), all + 1, "nothing was shipped twice");
    // The bulk API with the writer token, as the printed line sends it.
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--fail-with-body", "--cacert"])
        .arg(info["ca_file"].as_str().unwrap())
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", info["writer_token"].as_str().unwrap()))
        .args(["--data-binary", "{\"index\":{\"_index\":\"app\"}}\n{\"message\":\"hello from curl\"}\n"])
        .arg(format!("{}/_bulk", info["api_url"].as_str().unwrap()))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["errors"], false, "{answer}");
    wait_for(Duration::from_secs(10), "the bulk record", || {
        (curl_total(&info, "source:app") == 1).then_some(())
    });
    second.stop();
    let out = audit(&info);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["records"], all + 2, "the archive holds each line once: {report}");
}

/// What must never appear in a log: every private key under `data` (each
/// line of a PEM body, the whole key as hex and as base64), the KEKs'
/// secrets, and the token with its signature on its own.
fn secrets(data: &Path, token: &str) -> Vec<(String, String)> {
    let base64 = |bytes: &[u8]| -> String {
        pem::encode(&pem::Pem::new("X", bytes)).lines().filter(|l| !l.starts_with("-----")).collect()
    };
    let mut needles = vec![
        ("the token".to_owned(), token.to_owned()),
        ("the token's signature".to_owned(), token.rsplit('.').next().unwrap().to_owned()),
    ];
    let mut stack = vec![data.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.display().to_string();
            let bytes = std::fs::read(&path).unwrap();
            if name.ends_with(".kek") {
                let text = String::from_utf8(bytes).unwrap();
                let secret = text.split_whitespace().last().unwrap().to_owned();
                assert_eq!(secret.len(), 64, "{name}");
                needles.push((name, secret));
            } else if name.ends_with(".key") {
                let der = match pem::parse(&bytes) {
                    Ok(block) => {
                        let text = String::from_utf8_lossy(&bytes).into_owned();
                        for line in text.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16) {
                            needles.push((format!("{name} (a PEM line)"), line.to_owned()));
                        }
                        block.contents().to_vec()
                    }
                    Err(_) => bytes,
                };
                needles.push((format!("{name} (hex)"), der.iter().map(|b| format!("{b:02x}")).collect()));
                needles.push((format!("{name} (base64)"), base64(&der)));
            }
        }
    }
    needles
}

/// The whole pipeline at debug level (quickstart: collector, agent,
/// syslog, archive; then searches, a refused token, the CLI, an audit
/// and a key rotation), and no log or output holds key or token material.
#[test]
fn no_log_or_output_holds_key_or_token_material() {
    let dir = TempDir::new("quickstart-secrets");
    let data = dir.path().join("data");
    let log = dir.path().join("quickstart.log");
    let debug = [("RUST_LOG".to_owned(), "debug".to_owned())];
    let quickstart = Process::spawn_with_env(
        "quickstart",
        &bin("logvault"),
        &quickstart_args(&data),
        log.clone(),
        std::process::Stdio::null(),
        &debug,
    );
    let info = details(&data);
    let token = info["token"].as_str().unwrap().to_owned();
    wait_for(Duration::from_secs(60), "the samples to be searchable", || {
        (curl_total(&info, "*") == 6000).then_some(())
    });
    let mut outputs = vec![("quickstart log".to_owned(), String::new())];
    let mut run = |what: &str, command: &mut Command| {
        let out = command.env("RUST_LOG", "debug").output().unwrap();
        outputs.push((
            what.to_owned(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        ));
        out.status
    };
    // A token with a forged signature: refused, and the refusal logged.
    let forged = format!("{}AAAA", &token[..token.len() - 4]);
    let refused = run(
        "curl with a forged token",
        Command::new("curl")
            .args(["--silent", "--cacert", info["ca_file"].as_str().unwrap(), "-H"])
            .arg(format!("Authorization: Bearer {forged}"))
            .arg(format!("{}/api/v1/search?q=x", info["api_url"].as_str().unwrap())),
    );
    assert!(refused.success());
    let searched = run(
        "logvault search",
        Command::new(bin("logvault"))
            .args([
                "search",
                "--url",
                info["api_url"].as_str().unwrap(),
                "--ca",
                info["ca_file"].as_str().unwrap(),
            ])
            .args(["--token", &token, "--limit", "3", "--json", "PacketResponder"]),
    );
    assert!(searched.success());
    quickstart.stop();
    let kek = PathBuf::from(info["kek_file"].as_str().unwrap());
    let audited = run(
        "logvault audit",
        Command::new(bin("logvault"))
            .args(["audit", "--archive", info["archive_uri"].as_str().unwrap()])
            .args(["--checkpoint-key", info["checkpoint_key"].as_str().unwrap()])
            .arg("--key-file")
            .arg(&kek),
    );
    assert!(audited.success(), "{}", outputs.last().unwrap().1);
    let new_kek = data.join("keys/next.kek");
    assert!(
        run(
            "logvault archive keygen",
            Command::new(bin("logvault")).args(["archive", "keygen", "--id", "next", "--out"]).arg(&new_kek)
        )
        .success()
    );
    assert!(
        run(
            "logvault archive rotate-key",
            Command::new(bin("logvault"))
                .args(["archive", "rotate-key", "--archive", info["archive_uri"].as_str().unwrap()])
                .arg("--key-file")
                .arg(&kek)
                .arg("--new-key")
                .arg(&new_kek)
        )
        .success(),
        "{}",
        outputs.last().unwrap().1
    );
    outputs[0].1 = std::fs::read_to_string(&log).unwrap();
    assert!(outputs[0].1.contains("DEBUG"), "the run logged at debug level");

    let needles = secrets(&data, &token);
    assert!(needles.len() > 20, "{} secrets found", needles.len());
    for (what, text) in &outputs {
        for (secret, needle) in &needles {
            assert!(!text.contains(needle.as_str()), "{what} holds {secret}");
        }
    }
}
