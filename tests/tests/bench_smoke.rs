//! The benchmark harness itself works on this machine: a small run of
//! `logvault-bench agent` against Debian's rsyslog produces every figure.
//! The real run, on gigabytes, is `logvault-bench agent` (README).

use logvault_e2e::{TempDir, bin};

#[test]
fn the_agent_benchmark_runs_beside_rsyslog_and_reports_every_figure() {
    let dir = TempDir::new("bench");
    let out = dir.path().join("report.json");
    let status = std::process::Command::new(bin("logvault-bench"))
        .args(["agent", "--bytes", "4M", "--dir"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "logvault-bench failed: {status}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let lines = report["input_lines"].as_u64().unwrap();
    assert!(lines >= 8 * 2000, "{report}");
    for key in ["agent_mb_s_per_core", "agent_rss_mib", "agent_vs_rsyslog"] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(value.is_finite() && value > 0.0, "{key} = {value}");
    }
    for shipper in ["logvault-agent", "rsyslog"] {
        assert!(report[shipper]["cpu_s"].as_f64().unwrap() > 0.0, "{report}");
    }
    assert!(report["machine"].as_str().unwrap().contains("cores"), "{report}");
}

/// `logvault-bench search` builds an index of generated records and times
/// every query kind; on 20,000 records in CI, on 10 million in the README.
#[test]
fn the_search_benchmark_builds_its_index_and_reports_every_figure() {
    let dir = TempDir::new("bench-search");
    let out = dir.path().join("search.json");
    let status = std::process::Command::new(bin("logvault-bench"))
        .args(["search", "--records", "20000", "--dir"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "logvault-bench failed: {status}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(report["records"], 20_000);
    assert_eq!(report["histogram_total"], 20_000, "{report}");
    for key in [
        "search_term_p50_ms",
        "search_term_p99_ms",
        "histogram_day_ms",
        "phrase_p50_ms",
        "terms_top10_p50_ms",
    ] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(value.is_finite() && value > 0.0, "{key} = {value}");
    }
    let totals = report["term_totals"].as_object().unwrap();
    assert!(totals.values().all(|total| total.as_u64().unwrap() > 0), "{report}");
}

/// `logvault-bench archive` seals, measures its limits beside it and audits
/// clean; on 20,000 lines in CI, on a million in the README.
#[test]
fn the_archive_benchmark_seals_audits_and_reports_every_figure() {
    let dir = TempDir::new("bench-archive");
    let out = dir.path().join("archive.json");
    let status = std::process::Command::new(bin("logvault-bench"))
        .args(["archive", "--lines", "20000", "--dir"])
        .arg(dir.path().join("archive"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "logvault-bench failed: {status}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    for key in [
        "compression_ratio",
        "seal_mb_s_per_core",
        "bare_zstd_mb_s_per_core",
        "bare_aes_gcm_mb_s_per_core",
        "seal_vs_zstd",
        "audit_mb_s",
    ] {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(value.is_finite() && value > 0.0, "{key} = {value}");
    }
    assert!(report["audit_batches"].as_u64().unwrap() >= 10, "{report}");
}
