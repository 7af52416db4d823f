//! The benchmark harness itself works on this machine: `logvault-bench all`
//! at its tiny scale runs every benchmark (the agent beside Debian's
//! rsyslog, the collector beside bare tantivy and a bare WAL, search over
//! generated records, sealing beside bare zstd and AES-GCM, the audit
//! beside SHA-256) and writes the merged report, its summary and plots.
//! The real run is `logvault-bench all` (README, BENCHMARKS.md).

use logvault_e2e::{TempDir, bin};

const FIGURES: [&str; 13] = [
    "agent_mb_s_per_core",
    "agent_rss_mib",
    "agent_vs_rsyslog",
    "collector_mb_s_per_core",
    "collector_vs_tantivy",
    "search_term_p50_ms",
    "search_term_p99_ms",
    "histogram_day_ms",
    "compression_ratio",
    "seal_mb_s_per_core",
    "seal_vs_zstd",
    "audit_without_key_mb_s",
    "audit_mb_s",
];

#[test]
fn every_benchmark_runs_beside_its_peer_and_the_report_has_every_figure() {
    let dir = TempDir::new("bench-all");
    let status = std::process::Command::new(bin("logvault-bench"))
        .args(["all", "--scale", "tiny", "--dir"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "logvault-bench all failed: {status}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();

    for key in FIGURES {
        let value = report[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(value.is_finite() && value > 0.0, "{key} = {value}");
    }
    assert!(report["machine"].as_str().unwrap().contains("cores"), "{report}");
    for bench in ["agent", "collector", "search", "archive"] {
        assert!(!report["input"][bench].as_str().unwrap_or_default().is_empty(), "{bench}: {report}");
    }
    // Each verdict follows from its figure and bound.
    let targets = report["targets"].as_object().unwrap();
    assert!(targets.len() >= 10, "{report}");
    for (key, verdict) in targets {
        let (value, bound) = (report[key].as_f64().unwrap(), verdict["target"].as_f64().unwrap());
        let met = if verdict["at_most"].as_bool().unwrap() { value <= bound } else { value >= bound };
        assert_eq!(verdict["met"].as_bool(), Some(met), "{key}: {verdict}");
    }

    // The runs behind the figures did their whole job.
    let details = &report["details"];
    assert!(details["agent"]["input_lines"].as_u64().unwrap() >= 8 * 2000, "{report}");
    for shipper in ["logvault-agent", "rsyslog"] {
        assert!(details["agent"][shipper]["cpu_s"].as_f64().unwrap() > 0.0, "{report}");
    }
    assert!(details["collector"]["bare_tantivy_mb_s_per_core"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(details["search"]["records"], 20_000);
    assert_eq!(details["search"]["histogram_total"], 20_000, "{report}");
    let totals = details["search"]["term_totals"].as_object().unwrap();
    assert!(totals.values().all(|total| total.as_u64().unwrap() > 0), "{report}");
    for kind in ["term", "phrase", "histogram", "terms"] {
        let points = details["search"]["latency_percentiles_ms"][kind].as_array().unwrap();
        let points: Vec<f64> = points.iter().map(|p| p.as_f64().unwrap()).collect();
        assert_eq!(points.len(), 12, "{kind}");
        assert!(points.windows(2).all(|w| w[0] <= w[1]), "{kind} percentiles not in order: {points:?}");
    }
    // The audit checked every batch the archive holds, one stream per
    // sample at least.
    let batches = details["archive"]["archive_batches"].as_u64().unwrap();
    assert!(batches >= 8, "{report}");
    assert_eq!(details["archive"]["audit_batches"].as_u64(), Some(batches), "{report}");
    assert!(details["archive"]["bare_sha256_mb_s"].as_f64().unwrap() > 0.0, "{report}");
    // One, two and three collectors each found every record.
    let runs = details["cluster"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{report}");
    for run in runs {
        assert_eq!(run["hits"].as_u64(), runs[0]["hits"].as_u64(), "{report}");
        assert!(run["ingest_mb_s_per_core"].as_f64().unwrap() > 0.0, "{report}");
    }
    assert!(runs[2]["splits_fetched_mb"].as_f64().unwrap() > 0.0, "{report}");

    // The summary names every figure, and the plots are SVG documents.
    let summary = std::fs::read_to_string(dir.path().join("BENCHMARKS.md")).unwrap();
    for phrase in ["term search p50", "collector ÷ bare tantivy", "rsyslog", "plots/throughput.svg"] {
        assert!(summary.contains(phrase), "BENCHMARKS.md lacks {phrase:?}:\n{summary}");
    }
    for plot in ["throughput.svg", "latency.svg", "targets.svg"] {
        let svg = std::fs::read_to_string(dir.path().join("plots").join(plot)).unwrap();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{plot}");
        assert!(svg.trim_end().ends_with("</svg>"), "{plot}");
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count(), "{plot}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{plot} draws a missing figure:\n{svg}");
    }
}
