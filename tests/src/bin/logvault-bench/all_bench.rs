//! `logvault-bench all`: every benchmark in one run, one report.
//!
//! Runs `agent`, `collector`, `search` and `archive` one after another,
//! each as its own process (so one's threads and memory do not weigh on the
//! next), then merges their reports into `DIR/report.json` with the figures
//! PRODUCT.md sets targets for, writes `DIR/BENCHMARKS.md` and draws
//! `DIR/plots/*.svg`. `--publish` also writes them where the repository
//! keeps the latest run: `BENCHMARKS.md` at the top, `tests/bench/report.json`
//! and `tests/bench/plots/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

pub(crate) struct AllOptions {
    pub(crate) scale: Scale,
    pub(crate) dir: PathBuf,
    pub(crate) publish: bool,
}

/// How much input each benchmark gets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scale {
    /// The sizes PRODUCT.md's targets speak of.
    Full,
    /// A few seconds each: checks the harness, not the speed.
    Tiny,
}

impl Scale {
    pub(crate) fn parse(text: &str) -> Option<Scale> {
        match text {
            "full" => Some(Scale::Full),
            "tiny" => Some(Scale::Tiny),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scale::Full => "full",
            Scale::Tiny => "tiny",
        }
    }

    /// The arguments each benchmark runs with at this scale.
    fn args(self, bench: &str) -> &'static [&'static str] {
        match (self, bench) {
            (Scale::Full, "agent") => &["--bytes", "1G", "--runs", "3"],
            (Scale::Full, "collector") => &["--bytes", "200M", "--runs", "3"],
            (Scale::Full, "search") => &["--records", "10000000"],
            (Scale::Full, "archive") => &["--lines", "1000000"],
            (Scale::Full, "cluster") => &["--bytes", "200M"],
            (Scale::Tiny, "agent" | "collector" | "cluster") => &["--bytes", "4M"],
            (Scale::Tiny, "search") => &["--records", "20000"],
            (Scale::Tiny, _) => &["--lines", "20000"],
            (Scale::Full, _) => &[],
        }
    }
}

const BENCHES: [&str; 5] = ["agent", "collector", "search", "archive", "cluster"];

/// A figure PRODUCT.md sets a target for.
struct Target {
    key: &'static str,
    what: &'static str,
    unit: &'static str,
    /// The bound, and whether the figure must stay at or below it.
    bound: f64,
    at_most: bool,
}

const TARGETS: [Target; 14] = [
    Target {
        key: "agent_mb_s_per_core",
        what: "agent ship, per core",
        unit: "MB/s",
        bound: 200.0,
        at_most: false,
    },
    Target {
        key: "agent_vs_rsyslog",
        what: "agent ÷ rsyslog, per core",
        unit: "x",
        bound: 2.0,
        at_most: false,
    },
    Target { key: "agent_rss_mib", what: "agent steady RSS", unit: "MiB", bound: 16.0, at_most: true },
    Target {
        key: "collector_mb_s_per_core",
        what: "collector end to end, per core",
        unit: "MB/s",
        bound: 15.0,
        at_most: false,
    },
    Target {
        key: "collector_vs_tantivy",
        what: "collector ÷ bare tantivy, per core",
        unit: "x",
        bound: 0.9,
        at_most: false,
    },
    Target { key: "search_term_p50_ms", what: "term search p50", unit: "ms", bound: 20.0, at_most: true },
    Target { key: "search_term_p99_ms", what: "term search p99", unit: "ms", bound: f64::NAN, at_most: true },
    Target {
        key: "histogram_day_ms",
        what: "1-minute histogram of a day",
        unit: "ms",
        bound: 200.0,
        at_most: true,
    },
    Target {
        key: "compression_ratio",
        what: "compression of the samples",
        unit: "x",
        bound: 10.0,
        at_most: false,
    },
    Target {
        key: "seal_mb_s_per_core",
        what: "seal (AES-256-GCM, zstd unless batches are compressed), per core",
        unit: "MB/s",
        bound: 200.0,
        at_most: false,
    },
    Target { key: "seal_vs_zstd", what: "seal ÷ bare zstd", unit: "x", bound: 0.8, at_most: false },
    // PRODUCT.md's "audit >= 800 MB/s (half of SHA-256)": `logvault audit` as
    // it runs by default, reading and hashing every byte once. With the KEK it
    // also hashes every batch's records again (the SHA-256 each agent signs)
    // and checks a signature per batch: reported beside it, against SHA-256.
    Target {
        key: "audit_without_key_mb_s",
        what: "audit (checkpoints, segment hashes, inclusion)",
        unit: "MB/s",
        bound: 800.0,
        at_most: false,
    },
    Target {
        key: "audit_mb_s",
        what: "audit with the key (also every batch's SHA-256 and signature)",
        unit: "MB/s",
        bound: f64::NAN,
        at_most: false,
    },
    Target {
        key: "collector_rss_mib",
        what: "collector peak RSS while ingesting",
        unit: "MiB",
        bound: f64::NAN,
        at_most: true,
    },
];

pub(crate) fn run(options: &AllOptions) -> Result<(), String> {
    std::fs::create_dir_all(&options.dir).map_err(|e| format!("{}: {e}", options.dir.display()))?;
    let dir = std::fs::canonicalize(&options.dir).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut details = serde_json::Map::new();
    for bench in BENCHES {
        let out = dir.join(format!("{bench}.json"));
        let _ = std::fs::remove_file(&out);
        println!("== logvault-bench {bench} {}", options.scale.args(bench).join(" "));
        let status = Command::new(&exe)
            .arg(bench)
            .args(options.scale.args(bench))
            .arg("--dir")
            .arg(dir.join(bench))
            .arg("--out")
            .arg(&out)
            .status()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if !status.success() {
            return Err(format!("logvault-bench {bench} failed: {status}"));
        }
        let text = std::fs::read(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let report: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", out.display()))?;
        details.insert(bench.into(), report);
    }
    let report = merge(details, options.scale, started.elapsed().as_secs_f64())?;
    write_all(&report, &dir, &dir.join("BENCHMARKS.md"), "plots")?;
    if options.publish {
        let root = std::env::current_dir().map_err(|e| e.to_string())?;
        write_all(&report, &root.join("tests/bench"), &root.join("BENCHMARKS.md"), "tests/bench/plots")?;
    }
    Ok(())
}

/// `report.json` and the plots under `dir`, and the summary at `summary`,
/// which links to the plots as `plots_link`.
fn write_all(report: &Value, dir: &Path, summary: &Path, plots_link: &str) -> Result<(), String> {
    let plots_dir = dir.join("plots");
    std::fs::create_dir_all(&plots_dir).map_err(|e| format!("{}: {e}", plots_dir.display()))?;
    write(&dir.join("report.json"), &(serde_json::to_string_pretty(report).expect("json") + "\n"))?;
    for (name, svg) in plots(report) {
        write(&plots_dir.join(name), &svg)?;
    }
    write(summary, &markdown(report, plots_link))?;
    println!("report: {}, summary: {}", dir.join("report.json").display(), summary.display());
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The figures with targets, taken from each benchmark's own report.
fn merge(details: serde_json::Map<String, Value>, scale: Scale, wall_s: f64) -> Result<Value, String> {
    let figure = |bench: &str, key: &str| -> Result<f64, String> {
        details[bench][key].as_f64().ok_or_else(|| format!("the {bench} report has no number {key:?}"))
    };
    let mut report = json!({
        "machine": details["agent"]["machine"],
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "scale": scale.name(),
        "wall_s": crate::round(wall_s),
        "date": logvault_collector::time::format_ns(logvault_collector::time::now_ns()),
        "input": {
            "agent": details["agent"]["input"],
            "collector": details["collector"]["input"],
            "search": details["search"]["input"],
            "archive": details["archive"]["input"],
            "cluster": details["cluster"]["input"],
        },
    });
    for (bench, key) in [
        ("agent", "agent_mb_s_per_core"),
        ("agent", "agent_rss_mib"),
        ("agent", "agent_vs_rsyslog"),
        ("collector", "collector_mb_s_per_core"),
        ("collector", "collector_vs_tantivy"),
        ("search", "search_term_p50_ms"),
        ("search", "search_term_p99_ms"),
        ("search", "histogram_day_ms"),
        ("archive", "compression_ratio"),
        ("archive", "seal_mb_s_per_core"),
        ("archive", "seal_vs_zstd"),
        ("archive", "audit_without_key_mb_s"),
        ("archive", "audit_mb_s"),
    ] {
        report[key] = figure(bench, key)?.into();
    }
    report["collector_rss_mib"] = figure("collector", "collector_peak_rss_mib")?.into();
    let mut targets = serde_json::Map::new();
    for target in TARGETS.iter().filter(|t| !t.bound.is_nan()) {
        let value = report[target.key].as_f64().unwrap_or(f64::NAN);
        let of_target = if target.at_most { target.bound / value } else { value / target.bound };
        targets.insert(
            target.key.into(),
            json!({
                "target": target.bound,
                "at_most": target.at_most,
                "met": of_target >= 1.0,
                "of_target": crate::round(of_target),
            }),
        );
    }
    report["targets"] = targets.into();
    report["details"] = details.into();
    Ok(report)
}

/// A number as the report prints it.
fn number(value: f64) -> String {
    if !value.is_finite() {
        "n/a".into()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn markdown(report: &Value, plots: &str) -> String {
    let d = &report["details"];
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "The latest run of `logvault-bench all` ({} scale, {}): {}, {:.0} s in all. \
Every figure is measured in the same run as its peer or limit. Per core means \
input MB per CPU second of the process doing the work. Regenerate with \
`cargo build --release --workspace --bins && target/release/logvault-bench all --publish`.\n",
        report["scale"].as_str().unwrap_or("?"),
        report["date"].as_str().unwrap_or("?"),
        report["machine"].as_str().unwrap_or("?"),
        report["wall_s"].as_f64().unwrap_or(0.0),
    );
    let _ = writeln!(md, "## Against PRODUCT.md's targets\n");
    let _ = writeln!(md, "| figure | measured | target | of target | met |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for target in &TARGETS {
        let value = report[target.key].as_f64().unwrap_or(f64::NAN);
        let unit = if target.unit == "x" { "x".to_owned() } else { format!(" {}", target.unit) };
        if target.bound.is_nan() {
            let _ = writeln!(md, "| {} | {}{unit} | none | | |", target.what, number(value));
            continue;
        }
        let verdict = &report["targets"][target.key];
        let _ = writeln!(
            md,
            "| {} | {}{unit} | {} {}{unit} | {:.2} | {} |",
            target.what,
            number(value),
            if target.at_most { "≤" } else { "≥" },
            number(target.bound),
            verdict["of_target"].as_f64().unwrap_or(0.0),
            if verdict["met"].as_bool() == Some(true) { "yes" } else { "**no**" },
        );
    }
    let _ = writeln!(md, "\n![each figure as a share of its target]({plots}/targets.svg)\n");
    let missed: Vec<&Target> =
        TARGETS.iter().filter(|t| report["targets"][t.key]["met"].as_bool() == Some(false)).collect();
    if !missed.is_empty() {
        let _ = writeln!(
            md,
            "### What stands between each miss and its target
"
        );
        let mut said = Vec::new();
        for target in missed {
            let Some(why) = why_missed(target.key) else { continue };
            if said.contains(&why) {
                let _ = writeln!(md, "- {}: the same cause as above.", target.what);
            } else {
                let _ = writeln!(md, "- {}: {why}{}", target.what, measured_cause(report, target.key));
                said.push(why);
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Throughput per stage, beside its peer or limit\n");
    let _ = writeln!(md, "| stage | ours | peer or limit | ratio |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (stage, ours, peer, peer_name) in side_by_side(report) {
        let _ = writeln!(
            md,
            "| {stage} | {} MB/s | {peer_name}: {} MB/s | {} |",
            number(ours),
            number(peer),
            number(ours / peer)
        );
    }
    let _ = writeln!(md, "\n![throughput per stage]({plots}/throughput.svg)\n");
    if let Some(why) = why_missed("audit_mb_s") {
        let _ = writeln!(
            md,
            "The audit with the key, beside SHA-256: {why}{}\n",
            measured_cause(report, "audit_mb_s")
        );
    }
    let _ = writeln!(md, "## Search latency over {} records\n", d["search"]["records"]);
    let _ = writeln!(md, "| query | p50 | p99 | hits |");
    let _ = writeln!(md, "|---|---|---|---|");
    let hits = d["search"]["term_totals"]
        .as_object()
        .map(|totals| {
            let counts: Vec<u64> = totals.values().filter_map(Value::as_u64).collect();
            format!("{} to {}", counts.iter().min().unwrap_or(&0), counts.iter().max().unwrap_or(&0))
        })
        .unwrap_or_default();
    for (name, p50, p99, total) in [
        ("term, newest 100 (five terms)", "search_term_p50_ms", "search_term_p99_ms", hits),
        ("phrase, newest 100", "phrase_p50_ms", "phrase_p99_ms", d["search"]["phrase_total"].to_string()),
        (
            "1-minute histogram of the day",
            "histogram_day_ms",
            "histogram_day_p99_ms",
            d["search"]["histogram_total"].to_string(),
        ),
        ("top 10 levels and sources", "terms_top10_p50_ms", "", d["search"]["terms_total"].to_string()),
    ] {
        let p99 = d["search"][p99].as_f64().map(|v| format!("{} ms", number(v))).unwrap_or_default();
        let _ = writeln!(
            md,
            "| {name} | {} ms | {p99} | {total} |",
            number(d["search"][p50].as_f64().unwrap_or(f64::NAN))
        );
    }
    let _ = writeln!(md, "\n![search latency distributions]({plots}/latency.svg)\n");
    let _ = writeln!(md, "## Memory\n");
    let agent = &d["agent"]["logvault-agent"];
    let _ = writeln!(
        md,
        "- logvault-agent: steady RSS {} MiB, peak {} MiB (rsyslog on the same job: steady {} MiB, peak {} MiB).",
        number(agent["steady_rss_mib"].as_f64().unwrap_or(f64::NAN)),
        number(agent["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)),
        number(d["agent"]["rsyslog"]["steady_rss_mib"].as_f64().unwrap_or(f64::NAN)),
        number(d["agent"]["rsyslog"]["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)),
    );
    let _ = writeln!(
        md,
        "- logvault serve while ingesting at full speed: peak RSS {} MiB.\n",
        number(report["collector_rss_mib"].as_f64().unwrap_or(f64::NAN))
    );
    let _ = writeln!(md, "## Collectors sharing a bucket\n");
    let _ = writeln!(
        md,
        "One, two and three collectors on this machine's loopback, sharing a bucket on s3s-fs, the \
same input spread over them from three connections. Ingest runs until every collector finds every \
record (its own and the others' published splits, published every second here); per core is input \
MB per CPU second of all the collectors together, which share the machine's cores. The search is a \
term query (newest 100) on the first collector restarted with an empty split cache: cold opens the \
others' splits (two ranged reads each, then every file's footer at once) and fetches, decrypts and \
authenticates the chunks the query reads; warm is the median of the next twenty. Splits fetched is \
what the cold query read of the others' splits, beside their whole size.\n"
    );
    let _ = writeln!(
        md,
        "| collectors | ingest per core | ingest wall | search cold | search warm p50 | splits fetched / whole | ranged reads |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for run in d["cluster"]["runs"].as_array().into_iter().flatten() {
        let n = |key: &str| number(run[key].as_f64().unwrap_or(f64::NAN));
        let _ = writeln!(
            md,
            "| {} | {} MB/s | {} MB/s | {} ms | {} ms | {} / {} MB | {} |",
            run["collectors"],
            n("ingest_mb_s_per_core"),
            n("ingest_mb_s_wall"),
            n("search_cold_ms"),
            n("search_warm_p50_ms"),
            n("splits_fetched_mb"),
            n("splits_others_mb"),
            run["splits_range_reads"],
        );
    }
    let ratio = |key: &str| number(d["cluster"][key].as_f64().unwrap_or(f64::NAN));
    let _ = writeln!(
        md,
        "\nAgainst one collector: ingest per core {} with two, {} with three; a warm search over \
remote splits {} and {} of the local one; cold {} and {}.\n",
        ratio("ingest_per_core_2_vs_1"),
        ratio("ingest_per_core_3_vs_1"),
        ratio("search_warm_2_vs_1"),
        ratio("search_warm_3_vs_1"),
        ratio("search_cold_2_vs_1"),
        ratio("search_cold_3_vs_1"),
    );
    let _ = writeln!(md, "## Inputs\n");
    for bench in BENCHES {
        let _ = writeln!(md, "- {bench}: {}", report["input"][bench].as_str().unwrap_or("?"));
    }
    let _ = writeln!(
        md,
        "\nEvery benchmark's own report, with more figures than these, is under `details` in the \
report.json beside this page."
    );
    md
}

/// What this run measured of a miss's cause, when it did.
fn measured_cause(report: &Value, key: &str) -> String {
    let archive = &report["details"]["archive"];
    match key {
        "audit_mb_s" => {
            let Some(stages) = archive["audit_stages_one_thread_ms"].as_object() else {
                return String::new();
            };
            let sum: f64 = stages.values().filter_map(Value::as_f64).sum();
            let parts: Vec<String> = stages
                .iter()
                .map(|(name, ms)| {
                    format!("{} {} ms", name.replace('_', " "), number(ms.as_f64().unwrap_or(f64::NAN)))
                })
                .collect();
            let archive_mb = archive["archive_mb"].as_f64().unwrap_or(f64::NAN);
            format!(
                " In this run the stages on one thread took: {}; {} ms in all for {} MB, so one core \
tops out near {} MB/s and two, even perfectly shared, near {} MB/s. The audit itself took {} ms.",
                parts.join(", "),
                number(sum),
                number(archive_mb),
                number(archive_mb / sum * 1000.0),
                number(2.0 * archive_mb / sum * 1000.0),
                number(archive["audit_ms"].as_f64().unwrap_or(f64::NAN)),
            )
        }
        "collector_vs_tantivy" | "collector_mb_s_per_core" => {
            let collector = &report["details"]["collector"];
            format!(
                " In this run the collector's indexer alone made {} MB/s per core against bare tantivy's {} ({} fed in groups).",
                number(collector["indexer_alone_mb_s_per_core"].as_f64().unwrap_or(f64::NAN)),
                number(collector["bare_tantivy_mb_s_per_core"].as_f64().unwrap_or(f64::NAN)),
                number(collector["bare_tantivy_grouped_mb_s_per_core"].as_f64().unwrap_or(f64::NAN)),
            )
        }
        "compression_ratio" | "seal_vs_zstd" => format!(
            " In this run each sample's text alone gave {}x at zstd -1 (the batches' level), and bare zstd of the batches {}x.",
            number(archive["compression_ratio_text_alone"].as_f64().unwrap_or(f64::NAN)),
            number(archive["bare_zstd_ratio_of_batches"].as_f64().unwrap_or(f64::NAN))
        ),
        _ => String::new(),
    }
}

/// What profiles of earlier runs on this kind of machine showed to stand
/// between a figure and its target, and what would move it.
fn why_missed(key: &str) -> Option<&'static str> {
    Some(match key {
        "collector_mb_s_per_core" | "collector_vs_tantivy" => {
            "the schema, and noise: single runs of both sides vary by about 10% on this machine (the \
figure is the run with the median ratio of three, all three under `collector_runs_vs_tantivy` in \
the details). \
The collector's own document building without TLS or WAL (`indexer_alone` in the details) is close \
to the end-to-end figure, so TLS, validation and the WAL cost little. Bare tantivy indexes a \
message and a timestamp; the collector also indexes tenant, host, source, level and flags (fast \
columns for host, source and level), `fields.*` with positions, an id and the timestamp as fast \
columns, and stores each record for the page of hits, in a compact binary form. It hands \
documents to tantivy's indexing thread 64 at a time, where bare tantivy's `add_document` hands \
over one and wakes the thread for each; bare tantivy fed in the same groups is in the details \
(`bare_tantivy_grouped_mb_s_per_core`). What would move it: tenant and host as fast columns \
only, filtered by column."
        }
        "compression_ratio" | "seal_vs_zstd" => {
            "the text itself. Agents compress each 2,000-record batch with zstd -1 and sign the \
compressed bytes; segments keep batches as signed and encrypt them without a second zstd pass. \
Batches lay their records out by column (version 3: the lines one after another, then times, \
levels, flags and fields), so a batch compresses to within about 2% of its lines alone and the \
archive's ratio follows the text's (`compression_ratio_text_alone` in the details). What would \
move it: a higher agent level (zstd -6 gives about 11x on the samples, at under a third of -1's \
speed, which the agent's 200 MB/s per core cannot pay)."
        }
        "audit_without_key_mb_s" => {
            "the read and one SHA-256 pass over every byte of every segment, one segment after \
another; the checkpoints' signatures and the listing are a small fixed cost. What would move it: \
reading the next segment while the current one is hashed."
        }
        "audit_mb_s" => {
            "every byte is hashed twice with SHA-256 (the segment, then each batch's record section, \
which its signature covers through `body_sha`), the segment is decrypted (and inflated when it \
was compressed), and each batch costs one Ed25519 verification. One thread hashes the segment \
chunk by chunk; the other opens each chunk in place once it is hashed and checks every batch it \
completes; what is left when the hash is done is checked on both cores. With both cores busy each \
runs slower than alone (the single-thread stages below are measured one at a time), so the sum \
of the stages over two is a bound, not a forecast. What would move it: larger batches (fewer \
signatures per MB), and more cores."
        }
        "agent_mb_s_per_core" | "agent_vs_rsyslog" | "agent_rss_mib" => {
            "the figure is the median of three runs (all three under `agent_runs_mb_s_per_core` in \
the details); at the tiny scale, start-up and the first file scan weigh more than shipping."
        }
        _ => return None,
    })
}

/// (stage, ours MB/s, peer MB/s, peer name) for every stage with a peer.
fn side_by_side(report: &Value) -> Vec<(&'static str, f64, f64, &'static str)> {
    let d = &report["details"];
    let get = |bench: &str, key: &str| d[bench][key].as_f64().unwrap_or(f64::NAN);
    let mut rows = vec![(
        "agent ship, per core",
        get("agent", "agent_mb_s_per_core"),
        d["agent"]["rsyslog"]["mb_per_cpu_s"].as_f64().unwrap_or(f64::NAN),
        "rsyslog",
    )];
    rows.push((
        "collector end to end, per core",
        get("collector", "collector_mb_s_per_core"),
        get("collector", "bare_tantivy_mb_s_per_core"),
        "bare tantivy",
    ));
    rows.push((
        "collector end to end, per core",
        get("collector", "collector_mb_s_per_core"),
        get("collector", "bare_tantivy_grouped_mb_s_per_core"),
        "bare tantivy fed 64 documents per call",
    ));
    rows.push((
        "collector end to end, per core",
        get("collector", "collector_mb_s_per_core"),
        get("collector", "bare_wal_mb_s_per_core"),
        "WAL only",
    ));
    rows.push((
        "seal, per core",
        get("archive", "seal_mb_s_per_core"),
        get("archive", "bare_zstd_mb_s_per_core"),
        "bare zstd",
    ));
    rows.push((
        "seal, per core",
        get("archive", "seal_mb_s_per_core"),
        get("archive", "bare_aes_gcm_mb_s_per_core"),
        "bare AES-256-GCM",
    ));
    rows.push((
        "audit with the key",
        get("archive", "audit_mb_s"),
        get("archive", "bare_sha256_mb_s"),
        "bare SHA-256",
    ));
    rows.push((
        "audit without the key",
        get("archive", "audit_without_key_mb_s"),
        get("archive", "bare_sha256_mb_s"),
        "bare SHA-256",
    ));
    rows
}

/// The plots, by file name.
fn plots(report: &Value) -> Vec<(&'static str, String)> {
    vec![
        ("throughput.svg", throughput_svg(report)),
        ("latency.svg", latency_svg(report)),
        ("targets.svg", targets_svg(report)),
    ]
}

const WIDTH: f64 = 760.0;
const LEFT: f64 = 250.0;
const RIGHT: f64 = 40.0;
const ROW: f64 = 26.0;
const TOP: f64 = 40.0;
const OURS: &str = "#1f4e8c";
const PEER: &str = "#9aa5b1";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn svg_open(height: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    )
}

/// A log10 axis over `[lo, hi]` (powers of ten) along the plot's width.
struct LogAxis {
    lo: f64,
    hi: f64,
}

impl LogAxis {
    fn around(values: impl Iterator<Item = f64>) -> LogAxis {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            return LogAxis { lo: 0.0, hi: 1.0 };
        }
        let lo = lo.log10().floor();
        let hi = hi.log10().ceil().max(lo + 1.0);
        LogAxis { lo, hi }
    }

    fn x(&self, value: f64) -> f64 {
        let v = value.max(10f64.powf(self.lo)).log10();
        LEFT + (v - self.lo) / (self.hi - self.lo) * (WIDTH - LEFT - RIGHT)
    }

    /// Grid lines and labels at each power of ten, from `top` to `bottom`.
    fn grid(&self, top: f64, bottom: f64, unit: &str) -> String {
        let mut svg = String::new();
        let mut power = self.lo;
        while power <= self.hi {
            let value = 10f64.powf(power);
            let x = self.x(value);
            let label = if value >= 1.0 { format!("{value:.0}") } else { format!("{value}") };
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/>\
<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{label} {unit}</text>",
                bottom + 14.0
            );
            power += 1.0;
        }
        svg
    }
}

fn throughput_svg(report: &Value) -> String {
    let d = &report["details"];
    let get = |bench: &str, key: &str| d[bench][key].as_f64().unwrap_or(f64::NAN);
    let rows: Vec<(&str, f64, bool)> = vec![
        ("logvault-agent ship, per core", get("agent", "agent_mb_s_per_core"), true),
        ("rsyslog ship, per core", d["agent"]["rsyslog"]["mb_per_cpu_s"].as_f64().unwrap_or(f64::NAN), false),
        ("collector end to end, per core", get("collector", "collector_mb_s_per_core"), true),
        ("collector indexer alone, per core", get("collector", "indexer_alone_mb_s_per_core"), true),
        ("bare tantivy, per core", get("collector", "bare_tantivy_mb_s_per_core"), false),
        (
            "bare tantivy fed in groups, per core",
            get("collector", "bare_tantivy_grouped_mb_s_per_core"),
            false,
        ),
        ("WAL only, per core", get("collector", "bare_wal_mb_s_per_core"), false),
        ("seal, per core", get("archive", "seal_mb_s_per_core"), true),
        ("bare zstd, per core", get("archive", "bare_zstd_mb_s_per_core"), false),
        ("bare AES-256-GCM, per core", get("archive", "bare_aes_gcm_mb_s_per_core"), false),
        ("audit with the key", get("archive", "audit_mb_s"), true),
        ("audit without the key", get("archive", "audit_without_key_mb_s"), true),
        ("bare SHA-256 of the archive", get("archive", "bare_sha256_mb_s"), false),
    ];
    let axis = LogAxis::around(rows.iter().map(|r| r.1));
    let bottom = TOP + ROW * rows.len() as f64;
    let mut svg = svg_open(
        bottom + 50.0,
        "Throughput per stage (MB/s, log scale; blue: logvault, grey: peer or limit)",
    );
    svg.push_str(&axis.grid(TOP - 6.0, bottom, "MB/s"));
    for (i, (label, value, ours)) in rows.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        if !value.is_finite() {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><text x=\"{LEFT}\" y=\"{:.1}\">not measured</text>",
                LEFT - 8.0,
                y + ROW * 0.6,
                escape(label),
                y + ROW * 0.6,
            );
            continue;
        }
        let x = axis.x(*value);
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
<rect x=\"{LEFT}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\
<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LEFT - 8.0,
            y + ROW * 0.6,
            escape(label),
            y + 4.0,
            (x - LEFT).max(1.0),
            ROW - 8.0,
            if *ours { OURS } else { PEER },
            x + 4.0,
            y + ROW * 0.6,
            number(*value),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn latency_svg(report: &Value) -> String {
    let search = &report["details"]["search"];
    let kinds = [
        ("term, newest 100", "term", Some(20.0)),
        ("phrase, newest 100", "phrase", None),
        ("1-minute histogram, a day", "histogram", Some(200.0)),
        ("top 10 values", "terms", None),
    ];
    let points: Vec<Vec<f64>> = kinds
        .iter()
        .map(|(_, key, _)| {
            search["latency_percentiles_ms"][key]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        })
        .collect();
    let axis = LogAxis::around(points.iter().flatten().copied().chain([20.0, 200.0]));
    let row = ROW * 1.6;
    let bottom = TOP + row * kinds.len() as f64;
    let mut svg = svg_open(
        bottom + 60.0,
        "Search latency (ms, log scale): line p0 to p100, box p10 to p90, bar p50, dot p99",
    );
    svg.push_str(&axis.grid(TOP - 6.0, bottom, "ms"));
    for (i, ((label, _, target), p)) in kinds.iter().zip(&points).enumerate() {
        let y = TOP + row * i as f64 + row / 2.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 8.0,
            y + 4.0,
            escape(label)
        );
        // p0, p10 .. p90, p99, p100.
        if p.len() == 12 && p.iter().all(|v| v.is_finite()) {
            let (p0, p10, p50, p90, p99, p100) = (p[0], p[1], p[5], p[9], p[10], p[11]);
            let _ = writeln!(
                svg,
                "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{OURS}\"/>\
<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"14\" fill=\"#c9d7ea\" stroke=\"{OURS}\"/>\
<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{OURS}\" stroke-width=\"3\"/>\
<circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"3.5\" fill=\"#b03a2e\"/>\
<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#333\">p50 {} ms, p99 {} ms</text>",
                axis.x(p0),
                axis.x(p100),
                axis.x(p10),
                y - 7.0,
                (axis.x(p90) - axis.x(p10)).max(1.0),
                axis.x(p50),
                y - 9.0,
                axis.x(p50),
                y + 9.0,
                axis.x(p99),
                axis.x(p100) + 6.0,
                y + 4.0,
                number(p50),
                number(p99),
            );
        }
        if let Some(target) = target {
            let x = axis.x(*target);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#2e7d32\" stroke-dasharray=\"4 3\"/>\
<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#2e7d32\" font-size=\"10\">target {target} ms</text>",
                y - row / 2.0 + 4.0,
                y + row / 2.0 - 4.0,
                y - row / 2.0 + 4.0,
            );
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"{:.1}\" fill=\"#555\">{} records; each query run 30 times after one warm-up run</text>",
        bottom + 40.0,
        search["records"]
    );
    svg.push_str("</svg>\n");
    svg
}

fn targets_svg(report: &Value) -> String {
    let rows: Vec<(&Target, f64, bool)> = TARGETS
        .iter()
        .filter(|t| !t.bound.is_nan())
        .map(|t| {
            let verdict = &report["targets"][t.key];
            (t, verdict["of_target"].as_f64().unwrap_or(0.0), verdict["met"].as_bool() == Some(true))
        })
        .collect();
    let max = 3.0;
    let scale = |v: f64| LEFT + v.clamp(0.0, max) / max * (WIDTH - LEFT - RIGHT - 50.0);
    let bottom = TOP + ROW * rows.len() as f64;
    let mut svg =
        svg_open(bottom + 50.0, "Each figure as a share of its target (1 = met; at-most targets inverted)");
    for tick in [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0] {
        let x = scale(tick);
        let colour = if tick == 1.0 { "#2e7d32" } else { "#ddd" };
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"{colour}\"/>\
<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{tick}</text>",
            TOP - 6.0,
            bottom + 14.0
        );
    }
    for (i, (target, share, met)) in rows.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let clipped = if *share > max { " ▸" } else { "" };
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
<rect x=\"{LEFT}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\
<text x=\"{:.1}\" y=\"{:.1}\">{share:.2}{clipped}</text>",
            LEFT - 8.0,
            y + ROW * 0.6,
            escape(target.what),
            y + 4.0,
            (scale(*share) - LEFT).max(1.0),
            ROW - 8.0,
            if *met { "#2e7d32" } else { "#b03a2e" },
            scale(*share) + 4.0,
            y + ROW * 0.6,
        );
    }
    svg.push_str("</svg>\n");
    svg
}
