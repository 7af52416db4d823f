//! `logvault-bench`: measured runs of the real binaries beside their peers.
//!
//! `logvault-bench all` runs the five below one after another and merges
//! their figures into one report beside PRODUCT.md's targets, with a
//! readable summary and plots (`all_bench`).
//!
//! `logvault-bench collector` sends the same input, as signed zstd batches
//! over mutual TLS from three connections, to a real `logvault serve` and
//! waits until every record is searchable; beside it, in the same run, it
//! indexes the same lines with bare tantivy (default tokenizer, positions,
//! stored) and appends the same batches to a bare WAL. Each figure is input
//! MB per CPU second of the process doing the work.
//!
//! `logvault-bench cluster` runs one, two and three collectors sharing a
//! bucket on s3s-fs: ingest until every collector finds every record, and
//! a search over the others' splits, cold and warm (`cluster_bench`).
//!
//! `logvault-bench agent` ships the eight loghub samples, repeated to
//! `--bytes`, twice over mutual TLS to a receiver in this process that only
//! terminates TLS and acknowledges: once with `logvault-agent` (tail, parse,
//! batch, compress, sign, ship) and once with Debian's rsyslog (imfile to
//! omfwd over TLS) on the same files. For each it reports input MB per CPU
//! second of the shipper's process (MB/s per core), wall-clock MB/s, and
//! resident memory, then the ratio between the two.
#![allow(missing_docs, unreachable_pub)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use logvault_certs::{Pki, Role, TlsFiles};
use logvault_storage::frame::{Frame, FrameDecoder, write_frame};
use logvault_storage::{AckStatus, batch};
use tokio::io::AsyncReadExt as _;

const USAGE: &str = "usage: logvault-bench all [--scale full|tiny] [--dir DIR] [--publish]
       logvault-bench agent [--bytes N[K|M|G]] [--dir DIR] [--parser auto|none] \
[--compression zstd|none] [--no-rsyslog] [--runs N] [--out FILE]
       logvault-bench collector [--bytes N[K|M|G]] [--dir DIR] [--runs N] [--out FILE]
       logvault-bench search [--records N] [--dir DIR] [--out FILE]
       logvault-bench archive [--lines N] [--level L] [--dir DIR] [--out FILE]
       logvault-bench cluster [--bytes N[K|M|G]] [--dir DIR] [--out FILE]";

mod all_bench;
mod archive_bench;
mod cluster_bench;
mod collector_bench;
mod search_bench;

pub(crate) struct Options {
    pub(crate) bytes: u64,
    pub(crate) dir: PathBuf,
    parser: String,
    compression: String,
    rsyslog: bool,
    /// How many times logvault-agent ships the input; the median run counts.
    runs: usize,
    pub(crate) out: Option<PathBuf>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str);
    if !matches!(command, Some("all" | "agent" | "collector" | "search" | "archive" | "cluster")) {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    if command == Some("all") {
        let mut options = all_bench::AllOptions {
            scale: all_bench::Scale::Full,
            dir: PathBuf::from("target/bench"),
            publish: false,
        };
        let mut rest = args[1..].iter();
        while let Some(name) = rest.next() {
            match name.as_str() {
                "--publish" => options.publish = true,
                "--scale" => {
                    let value = rest.next().map(String::as_str).unwrap_or_default();
                    options.scale = all_bench::Scale::parse(value)
                        .unwrap_or_else(|| usage_error("--scale is full or tiny"));
                }
                "--dir" => options.dir = PathBuf::from(rest.next().map(String::as_str).unwrap_or_default()),
                other => usage_error(&format!("unknown argument {other:?}")),
            }
        }
        finish(all_bench::run(&options));
    }
    if command == Some("archive") {
        let mut options = archive_bench::ArchiveOptions {
            lines: 1_000_000,
            level: 3,
            dir: PathBuf::from("target/bench/archive"),
            out: None,
        };
        for_each_flag(&args[1..], |name, value| match name {
            "--lines" => options.lines = value.parse().unwrap_or(0),
            "--level" => options.level = value.parse().unwrap_or(0),
            "--dir" => options.dir = PathBuf::from(value),
            "--out" => options.out = Some(PathBuf::from(value)),
            other => usage_error(&format!("unknown argument {other:?}")),
        });
        if options.lines == 0 || !(1..=19).contains(&options.level) {
            usage_error("--lines needs a positive number and --level 1 to 19");
        }
        finish(archive_bench::run(&options));
    }
    if command == Some("search") {
        let mut options = search_bench::SearchOptions {
            records: 10_000_000,
            dir: PathBuf::from("target/bench/search"),
            out: None,
        };
        for_each_flag(&args[1..], |name, value| match name {
            "--records" => options.records = value.parse().unwrap_or(0),
            "--dir" => options.dir = PathBuf::from(value),
            "--out" => options.out = Some(PathBuf::from(value)),
            other => usage_error(&format!("unknown argument {other:?}")),
        });
        if options.records == 0 {
            usage_error("--records needs a positive number");
        }
        finish(search_bench::run(&options));
    }
    let mut options = match parse_options(&args[1..]) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let outcome = if command == Some("cluster") {
        if !args.iter().any(|a| a == "--dir") {
            options.dir = PathBuf::from("target/bench/cluster");
        }
        if !args.iter().any(|a| a == "--bytes") {
            options.bytes = 64 << 20;
        }
        cluster_bench::run(&options)
    } else if command == Some("collector") {
        if !args.iter().any(|a| a == "--dir") {
            options.dir = PathBuf::from("target/bench/collector");
        }
        if !args.iter().any(|a| a == "--bytes") {
            options.bytes = 200 << 20;
        }
        collector_bench::run(&options)
    } else {
        run_agent_bench(&options)
    };
    if let Err(message) = outcome {
        eprintln!("logvault-bench: {message}");
        std::process::exit(1);
    }
}

/// Calls `apply` with each `--flag value` pair.
fn for_each_flag(args: &[String], mut apply: impl FnMut(&str, &str)) {
    let mut rest = args.iter();
    while let Some(name) = rest.next() {
        let value = rest.next().map(String::as_str).unwrap_or_default();
        apply(name, value);
    }
}

fn usage_error(message: &str) -> ! {
    eprintln!("{message}\n{USAGE}");
    std::process::exit(2);
}

/// Exits with the outcome of a benchmark.
fn finish(outcome: Result<(), String>) -> ! {
    match outcome {
        Ok(()) => std::process::exit(0),
        Err(message) => {
            eprintln!("logvault-bench: {message}");
            std::process::exit(1);
        }
    }
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        bytes: 1 << 30,
        dir: PathBuf::from("target/bench/agent"),
        parser: "auto".into(),
        compression: "zstd".into(),
        rsyslog: true,
        runs: 1,
        out: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().cloned().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--bytes" => options.bytes = parse_size(&value()?)?,
            "--dir" => options.dir = PathBuf::from(value()?),
            "--parser" => options.parser = value()?,
            "--compression" => options.compression = value()?,
            "--out" => options.out = Some(PathBuf::from(value()?)),
            "--no-rsyslog" => options.rsyslog = false,
            "--runs" => {
                options.runs =
                    value()?.parse().ok().filter(|n| *n > 0).ok_or("--runs needs a positive number")?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(options)
}

fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size {text:?}"))?;
    let unit = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("bad size unit in {text:?}")),
    };
    Ok(n * unit)
}

/// What one shipper did.
struct Measured {
    name: &'static str,
    wall: Duration,
    cpu: Duration,
    peak_rss_kib: u64,
    steady_rss_kib: u64,
}

impl Measured {
    fn mb_per_cpu_second(&self, input_bytes: u64) -> f64 {
        input_bytes as f64 / 1e6 / self.cpu.as_secs_f64()
    }

    fn mb_per_second(&self, input_bytes: u64) -> f64 {
        input_bytes as f64 / 1e6 / self.wall.as_secs_f64()
    }

    fn json(&self, input_bytes: u64) -> serde_json::Value {
        serde_json::json!({
            "wall_s": round(self.wall.as_secs_f64()),
            "cpu_s": round(self.cpu.as_secs_f64()),
            "mb_per_cpu_s": round(self.mb_per_cpu_second(input_bytes)),
            "mb_per_s": round(self.mb_per_second(input_bytes)),
            "peak_rss_mib": round(self.peak_rss_kib as f64 / 1024.0),
            "steady_rss_mib": round(self.steady_rss_kib as f64 / 1024.0),
        })
    }
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn run_agent_bench(options: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&options.dir).map_err(|e| format!("{}: {e}", options.dir.display()))?;
    let dir = std::fs::canonicalize(&options.dir).map_err(|e| e.to_string())?;
    let input = dir.join("input");
    let (input_bytes, input_lines) = make_input(&input, options.bytes)?;
    println!(
        "input: 8 loghub samples repeated to {:.1} MB, {input_lines} lines, in {}",
        input_bytes as f64 / 1e6,
        input.display()
    );

    let pki = Pki::open_or_init(dir.join("pki")).map_err(|e| e.to_string())?;
    let sink_cert = pki
        .ensure(Role::Collector, "bench-sink", &["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| e.to_string())?;
    let agent_cert = pki.ensure(Role::Agent, "bench-agent", &[]).map_err(|e| e.to_string())?;
    let sender_cert = pki.ensure(Role::Sender, "bench-rsyslog", &[]).map_err(|e| e.to_string())?;
    let files = TlsFiles { ca: pki.ca_cert(), cert: sink_cert.cert.clone(), key: sink_cert.key.clone() };
    let sink = Sink::start(&files)?;

    let mut results = Vec::new();
    // Runs vary with what else the machine does: the median of `--runs`.
    let mut runs = Vec::new();
    for _ in 0..options.runs {
        let agent = run_logvault_agent(options, &dir, &input, &pki, &agent_cert, &sink, input_lines)?;
        report("logvault-agent", &agent, input_bytes);
        runs.push(agent);
    }
    runs.sort_by_key(|m| m.cpu);
    let agent_runs: Vec<f64> = runs.iter().map(|m| round(m.mb_per_cpu_second(input_bytes))).collect();
    results.push(runs.swap_remove(runs.len() / 2));
    if options.rsyslog {
        let rsyslog = run_rsyslog(&dir, &input, &pki, &sender_cert, &sink, input_lines)?;
        report("rsyslog", &rsyslog, input_bytes);
        results.push(rsyslog);
    }

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut report = serde_json::json!({
        "machine": machine(cores),
        "input": format!("8 loghub samples repeated to {input_bytes} bytes, {input_lines} lines"),
        "input_bytes": input_bytes,
        "input_lines": input_lines,
        "parser": options.parser,
        "compression": options.compression,
    });
    report["agent_runs_mb_s_per_core"] = agent_runs.into();
    for measured in &results {
        report[measured.name] = measured.json(input_bytes);
    }
    report["agent_mb_s_per_core"] = round(results[0].mb_per_cpu_second(input_bytes)).into();
    report["agent_rss_mib"] = round(results[0].steady_rss_kib as f64 / 1024.0).into();
    if let Some(rsyslog) = results.get(1) {
        let ratio = results[0].mb_per_cpu_second(input_bytes) / rsyslog.mb_per_cpu_second(input_bytes);
        report["agent_vs_rsyslog"] = round(ratio).into();
        println!("logvault-agent / rsyslog, MB per CPU second: {ratio:.2}x");
    }
    let out = options.out.clone().unwrap_or_else(|| dir.join("report.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n")
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("report: {}", out.display());
    Ok(())
}

fn report(name: &str, m: &Measured, input_bytes: u64) {
    println!(
        "{name:>15}: {:>7.1} MB per CPU second, {:>7.1} MB/s wall ({:.2} s wall, {:.2} s CPU), RSS steady {:.1} MiB, peak {:.1} MiB",
        m.mb_per_cpu_second(input_bytes),
        m.mb_per_second(input_bytes),
        m.wall.as_secs_f64(),
        m.cpu.as_secs_f64(),
        m.steady_rss_kib as f64 / 1024.0,
        m.peak_rss_kib as f64 / 1024.0,
    );
}

pub(crate) fn machine(cores: usize) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or("unknown CPU");
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kib| format!(", {:.0} GiB", kib as f64 / 1048576.0))
        .unwrap_or_default();
    format!("{cores} cores, {model}{memory}")
}

/// Writes the eight samples, each repeated to an eighth of `total`, unless
/// files of that size are there already. Returns bytes and lines.
pub(crate) fn make_input(dir: &Path, total: u64) -> Result<(u64, u64), String> {
    let loghub = logvault_e2e::loghub_dir();
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (mut bytes, mut lines) = (0, 0);
    for name in logvault_e2e::SAMPLES {
        let mut sample = std::fs::read(loghub.join(name)).map_err(|e| format!("{name}: {e}"))?;
        if sample.last() != Some(&b'\n') {
            sample.push(b'\n');
        }
        let copies = (total / 8).div_ceil(sample.len() as u64).max(1);
        let size = copies * sample.len() as u64;
        let path = dir.join(name);
        if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(size) {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| e.to_string())?);
            for _ in 0..copies {
                file.write_all(&sample).map_err(|e| e.to_string())?;
            }
            file.flush().map_err(|e| e.to_string())?;
        }
        bytes += size;
        lines += copies * sample.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    Ok((bytes, lines))
}

/// The receiving end: mutual TLS 1.3, then either the native protocol
/// (every batch acked, records counted) or a byte stream of syslog lines
/// (newlines counted). Nothing is verified or stored.
struct Sink {
    native: std::net::SocketAddr,
    syslog: std::net::SocketAddr,
    records: Arc<AtomicU64>,
    lines: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl Sink {
    fn start(files: &TlsFiles) -> Result<Sink, String> {
        let config = logvault_certs::server_config(files).map_err(|e| e.to_string())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let records = Arc::new(AtomicU64::new(0));
        let lines = Arc::new(AtomicU64::new(0));
        let (native, syslog) = runtime
            .block_on(async {
                let native = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let syslog = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                Ok::<_, std::io::Error>((native, syslog))
            })
            .map_err(|e| e.to_string())?;
        let addrs = (native.local_addr().unwrap(), syslog.local_addr().unwrap());
        let (acceptor2, records2, lines2) = (acceptor.clone(), records.clone(), lines.clone());
        runtime.spawn(async move {
            while let Ok((tcp, _)) = native.accept().await {
                let (acceptor, records) = (acceptor2.clone(), records2.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = ack_batches(tls, &records).await;
                    }
                });
            }
        });
        runtime.spawn(async move {
            while let Ok((tcp, _)) = syslog.accept().await {
                let (acceptor, lines) = (acceptor.clone(), lines2.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut buffer = vec![0u8; 256 * 1024];
                        while let Ok(n @ 1..) = tls.read(&mut buffer).await {
                            let newlines = buffer[..n].iter().filter(|&&b| b == b'\n').count();
                            lines.fetch_add(newlines as u64, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        Ok(Sink { native: addrs.0, syslog: addrs.1, records, lines, _runtime: runtime })
    }
}

async fn ack_batches(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    records: &AtomicU64,
) -> Result<(), String> {
    let decoder = FrameDecoder::new(32 * 1024 * 1024);
    while let Some(frame) = decoder.read(&mut tls).await.map_err(|e| e.to_string())? {
        if let Frame::Batch(bytes) = frame {
            let header = batch::peek_header(&bytes).map_err(|e| e.to_string())?;
            let hash = batch::encoded_batch_hash(&bytes).map_err(|e| e.to_string())?;
            write_frame(&mut tls, &Frame::Ack { batch_hash: hash, status: AckStatus::Stored })
                .await
                .map_err(|e| e.to_string())?;
            records.fetch_add(u64::from(header.count), Ordering::Relaxed);
        } else if let Frame::Resume { batches } = frame {
            // Nothing is kept, so nothing may be skipped.
            let answer = Frame::Resumed { stored: vec![false; batches.len()] };
            write_frame(&mut tls, &answer).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Polls a running shipper until `done` says all lines arrived, sampling
/// its memory; then reads its CPU time and stops it.
fn measure(
    name: &'static str,
    mut child: Child,
    started: Instant,
    expected: u64,
    done: impl Fn() -> u64,
) -> Result<Measured, String> {
    let pid = child.id();
    let mut samples = Vec::new();
    let mut last_report = Instant::now();
    let (mut last_got, mut last_progress) = (0, Instant::now());
    loop {
        let got = done();
        if got >= expected {
            break;
        }
        if got != last_got {
            (last_got, last_progress) = (got, Instant::now());
        } else if last_progress.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return Err(format!("{name} stalled at {got} of {expected} lines for 60 s; see its log"));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name} exited with {status} after {got} of {expected} lines"));
        }
        if let Some(rss) = proc_status(pid, "VmRSS:") {
            samples.push(rss);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  {name}: {got} of {expected} lines after {:.0} s", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = started.elapsed();
    let cpu = cpu_time(pid).ok_or_else(|| format!("cannot read the CPU time of {name}"))?;
    let peak_rss_kib = proc_status(pid, "VmHWM:").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    // Steady state: the median of the second half of the run.
    let mut steady: Vec<u64> = samples[samples.len() / 2..].to_vec();
    steady.sort_unstable();
    let steady_rss_kib = steady.get(steady.len() / 2).copied().unwrap_or(peak_rss_kib);
    Ok(Measured { name, wall, cpu, peak_rss_kib, steady_rss_kib })
}

fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// User plus system time of every thread of `pid`.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<u64>().ok())
        .unwrap_or(100);
    Some(Duration::from_millis(ticks * 1000 / hz))
}

fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        return Err(format!(
            "{} is not built: run `cargo build --release --workspace --bins` first",
            path.display()
        ));
    }
    Ok(path)
}

fn run_logvault_agent(
    options: &Options,
    dir: &Path,
    input: &Path,
    pki: &Pki,
    cert: &logvault_certs::Issued,
    sink: &Sink,
    expected: u64,
) -> Result<Measured, String> {
    let state = dir.join("agent-state");
    let _ = std::fs::remove_dir_all(&state);
    let config = dir.join("agent.toml");
    let toml = format!(
        r#"state_dir = "{state}"

[collector]
address = "{addr}"
server_name = "localhost"
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[[sources]]
include = ["{input}/*.log"]
read_from = "beginning"
parser = "{parser}"

[batch]
compression = "{compression}"
"#,
        state = state.display(),
        addr = sink.native,
        ca = pki.ca_cert().display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
        input = input.display(),
        parser = options.parser,
        compression = options.compression,
    );
    std::fs::write(&config, toml).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("agent.log")).map_err(|e| e.to_string())?;
    let before = sink.records.load(Ordering::Relaxed);
    let started = Instant::now();
    let child = Command::new(sibling_binary("logvault-agent")?)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("logvault-agent: {e}"))?;
    measure("logvault-agent", child, started, expected, || sink.records.load(Ordering::Relaxed) - before)
}

fn run_rsyslog(
    dir: &Path,
    input: &Path,
    pki: &Pki,
    cert: &logvault_certs::Issued,
    sink: &Sink,
    expected: u64,
) -> Result<Measured, String> {
    let rsyslogd = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("rsyslogd not found: apt-get install rsyslog rsyslog-gnutls (or pass --no-rsyslog)")?;
    let work = dir.join("rsyslog-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let config = dir.join("rsyslog.conf");
    // imfile reads every file from its start (no state yet); omfwd sends
    // each line over TLS 1.3 with this host's client certificate and checks
    // the receiver's name, as a production forwarder would. Queues are
    // rsyslog's defaults.
    let conf = format!(
        r#"global(
  workDirectory="{work}"
  maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imfile" mode="inotify")
input(type="imfile" file="{input}/*.log" tag="bench:" severity="info" facility="local0")
action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp"
  streamDriver="gtls" streamDriverMode="1" streamDriverAuthMode="x509/name"
  streamDriverPermittedPeers="localhost" action.resumeRetryCount="-1")
"#,
        work = work.display(),
        ca = pki.ca_cert().display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
        input = input.display(),
        port = sink.syslog.port(),
    );
    std::fs::write(&config, conf).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("rsyslog.log")).map_err(|e| e.to_string())?;
    let before = sink.lines.load(Ordering::Relaxed);
    let started = Instant::now();
    let child = Command::new(rsyslogd)
        .arg("-n")
        .arg("-f")
        .arg(&config)
        .arg("-i")
        .arg(work.join("rsyslogd.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("rsyslogd: {e}"))?;
    measure("rsyslog", child, started, expected, || sink.lines.load(Ordering::Relaxed) - before)
}
