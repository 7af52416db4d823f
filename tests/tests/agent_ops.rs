//! Operating the agent: reloading its configuration without losing or
//! repeating a line.

use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;

#[test]
fn sighup_reloads_the_configuration_and_a_bad_one_is_refused() {
    let setup = Setup::new("reload");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &["Spark_2k.log", "Apache_2k.log"]);
    let spark = files["Spark_2k.log"].to_string_lossy().into_owned();
    let apache = files["Apache_2k.log"].to_string_lossy().into_owned();
    let config = agent_config(
        &setup,
        "hup-1",
        collector.ingest,
        std::slice::from_ref(&spark),
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "hup-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(30));

    // A broken configuration is refused; the agent keeps running.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("[[sources]]", "[[sauces]]")).unwrap();
    agent.signal("HUP");
    wait_for(Duration::from_secs(10), "the refusal in the log", || {
        agent.log_text().contains("reload refused").then_some(())
    });
    append_lines(
        &files["Spark_2k.log"],
        &["17/06/09 20:11:11 INFO after.Refusal: still shipping".to_owned()],
    );
    collector.wait_total(&token, "*", 2001, Duration::from_secs(30));

    // A good one takes effect: the second file is shipped, the first is
    // not shipped again.
    agent_config(&setup, "hup-1", collector.ingest, &[spark.clone(), apache], &AgentOptions::default());
    agent.signal("HUP");
    collector.wait_total(&token, "*", 4001, Duration::from_secs(30));
    assert_eq!(collector.total(&token, &source_query(&files["Spark_2k.log"])), 2001);
    assert!(agent.log_text().contains("reloading configuration"));
    agent.stop();
    collector.process.stop();
}

#[test]
fn multiline_stack_traces_are_one_searchable_record() {
    let setup = Setup::new("multiline");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("app.log");
    let mut lines = Vec::new();
    for i in 0..100 {
        lines.push(format!("2024-05-01 10:00:{:02} INFO request {i} served", i % 60));
        lines.push(format!(
            "2024-05-01 10:00:{:02} ERROR request {i} failed: java.lang.NullPointerException",
            i % 60
        ));
        lines.push(format!("\tat com.example.Handler.handle(Handler.java:{i})"));
        lines.push("\tat com.example.Server.run(Server.java:7)".to_owned());
    }
    append_lines(&log, &lines);
    let config = agent_config(
        &setup,
        "ml-1",
        collector.ingest,
        &[log.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "read_from = \"beginning\"\n",
        "read_from = \"beginning\"\nmultiline = { start = '^\\d{4}-\\d{2}-\\d{2} ', timeout_ms = 300 }\n",
    );
    std::fs::write(&config, text).unwrap();
    let agent = start_agent(&setup, "ml-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 200, Duration::from_secs(30));
    assert_eq!(collector.total(&token, "NullPointerException"), 100);
    assert_eq!(collector.total(&token, "NullPointerException AND Handler AND Server"), 100);
    let (_, body) = collector.search_raw(Some(&token), &[("q", "\"Handler java 42\""), ("limit", "5")]);
    assert_eq!(body["total"], 1, "{body}");
    let message = body["hits"][0]["message"].as_str().unwrap();
    assert_eq!(message.lines().count(), 3, "{message}");
    assert!(message.starts_with("2024-05-01 10:00:42 ERROR request 42 failed"));
    assert_eq!(body["hits"][0]["level"], "error");
    agent.stop();
    collector.process.stop();
}

/// `logvault-agent` as the end of a pipe: every line of stdin arrives once,
/// and at end of input the agent waits for the acks and exits by itself.
#[test]
fn stdin_is_shipped_and_the_agent_exits_at_its_end() {
    let setup = Setup::new("stdin");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let config = agent_config(&setup, "pipe-1", collector.ingest, &[], &AgentOptions::default());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("include = []", "stdin = true\nparser = \"syslog\"");
    std::fs::write(&config, text).unwrap();
    let agent = start_agent_reading(&setup, "pipe-1", &config, &loghub_dir().join("OpenSSH_2k.log"));
    agent.wait_for_exit(Duration::from_secs(60));
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(30));
    assert_eq!(collector.total(&token, "source:stdin"), 2000);
    let want = lines_with_term(&sample_lines("OpenSSH_2k.log"), "sshd");
    assert_eq!(collector.total(&token, "fields.appname:sshd"), want);
    collector.process.stop();
}

/// A UTF-16 file (with a byte-order mark and CRLF, as Windows writes it)
/// arrives as UTF-8 text, every line once.
#[test]
fn utf16_files_are_shipped_as_text() {
    let setup = Setup::new("utf16");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let lines = sample_lines("Apache_2k.log");
    let text: String =
        std::iter::once("\u{feff}".to_owned()).chain(lines.iter().map(|l| format!("{l}\r\n"))).collect();
    let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let log = logs.join("windows.log");
    std::fs::write(&log, bytes).unwrap();
    let config = agent_config(
        &setup,
        "win-1",
        collector.ingest,
        &[log.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("read_from = \"beginning\"\n", "read_from = \"beginning\"\nencoding = \"utf-16le\"\n");
    std::fs::write(&config, text).unwrap();
    let agent = start_agent(&setup, "win-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(30));
    for word in ["workerEnv", "mod_jk", "notice", "error"] {
        let word = terms(word).next().unwrap();
        assert_eq!(collector.total(&token, &word), lines_with_term(&lines, &word), "{word}");
    }
    let (_, body) = collector.search_raw(Some(&token), &[("q", "workers2"), ("limit", "1000")]);
    let first = body["hits"].as_array().unwrap().iter().find(|h| h["seq"] == 0).unwrap();
    assert_eq!(first["message"].as_str().unwrap(), lines[0], "no BOM, no CR");
    agent.stop();
    collector.process.stop();
}

/// The systemd journal through `journalctl`: every entry once, with its
/// time, level and fields, and a restart resumes after the acked cursor.
#[test]
fn journal_entries_are_shipped_once_across_a_restart() {
    let setup = Setup::new("journal");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    // A real journal file, written by systemd's own tool from the export
    // format: the OpenSSH sample, one entry a line.
    let lines = sample_lines("OpenSSH_2k.log");
    let mut export = String::new();
    for (i, line) in lines.iter().enumerate() {
        let priority = if line.contains("Failed password") { 4 } else { 6 };
        export.push_str(&format!(
            "__REALTIME_TIMESTAMP={}\n_HOSTNAME=LabSZ\nSYSLOG_IDENTIFIER=sshd\n_PID={}\nPRIORITY={priority}\nMESSAGE={line}\n\n",
            1_700_000_000_000_000u64 + i as u64 * 1000,
            24_000 + i
        ));
    }
    let journal = setup.path().join("ssh.journal");
    let mut remote = std::process::Command::new("/lib/systemd/systemd-journal-remote")
        .arg(format!("--output={}", journal.display()))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-journal-remote is installed by tests/run");
    std::io::Write::write_all(remote.stdin.as_mut().unwrap(), export.as_bytes()).unwrap();
    drop(remote.stdin.take());
    assert!(remote.wait().unwrap().success());

    let options = AgentOptions { metrics: true, ..AgentOptions::default() };
    let config = agent_config(&setup, "journal-1", collector.ingest, &[], &options);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "include = []",
        &format!("journald = true\njournalctl_args = [\"--file={}\"]", journal.display()),
    );
    std::fs::write(&config, text).unwrap();
    let token = setup.token(&["default"], Role::Reader);
    let agent = start_agent(&setup, "journal-1", &config);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(60));
    agent.stop();

    let failed = lines.iter().filter(|l| l.contains("Failed password")).count() as u64;
    assert_eq!(collector.total(&token, "source:journald AND fields.appname:sshd"), 2000);
    assert_eq!(collector.total(&token, "level:warn"), failed);
    let (_, body) = collector.search_raw(Some(&token), &[("q", "*"), ("order", "asc"), ("limit", "1")]);
    assert_eq!(body["hits"][0]["timestamp"], "2023-11-14T22:13:20Z");
    assert_eq!(body["hits"][0]["message"], lines[0].as_str());

    // Restarted, the agent resumes after the acked cursor: nothing twice.
    let agent = start_agent(&setup, "journal-1", &config);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(collector.total(&token, "*"), 2000);
    let read_again = metric(&http_get(metrics_addr(&agent), "/metrics").1, "logvault_agent_lines_read_total");
    assert_eq!(read_again, Some(0), "the second run read entries before the acked cursor again");
    agent.stop();
    collector.process.stop();
}
