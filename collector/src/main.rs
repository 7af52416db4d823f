//! `logvault`: the collector server and the admin CLI.

mod quickstart;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use logvault_certs::{Pki, Role as CertRole};
use logvault_collector::auth::{self, Claims, Role};
use logvault_collector::client;
use logvault_collector::config::CollectorConfig;
use tokio_util::sync::CancellationToken;

/// logvault: secure log aggregation. The collector server and its admin tools.
#[derive(Debug, Parser)]
#[command(name = "logvault", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a collector and an agent on this machine with a fresh dev PKI.
    Quickstart(quickstart::Options),
    /// Run the collector.
    Serve {
        /// The collector's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage the PKI: a CA and the certificates it issues.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Mint an API token (to query, or to ship with the HTTP senders' APIs) signed with an Ed25519 key.
    Token(TokenArgs),
    /// Create an Ed25519 token signing key (FILE, 0600) and its public
    /// half (FILE with .pub), which the collector's `api.jwt_public_key` names.
    Keygen {
        /// Where to write the private key; kept if it exists.
        #[arg(long)]
        out: PathBuf,
    },
    /// Search records through the query API.
    Search(SearchArgs),
    /// Prove an archive whole: checkpoint signatures and chain, every
    /// segment's hash and inclusion, objects no checkpoint names; with
    /// --key-file also every batch's agent signature, hash chain and
    /// sequence. Exit 0 only when everything verifies.
    Audit(AuditArgs),
    /// Archive keys and replay.
    #[command(subcommand)]
    Archive(ArchiveCommand),
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// The archive: file:///DIR, a path, or s3://BUCKET/PREFIX?endpoint=...
    #[arg(long)]
    archive: String,
    /// The collectors' checkpoint public key (the `.pub` beside
    /// `archive.checkpoint_key`).
    #[arg(long)]
    checkpoint_key: PathBuf,
    /// Key-encryption keys: decrypt and check every batch too. Repeat for
    /// several.
    #[arg(long)]
    key_file: Vec<PathBuf>,
    #[command(flatten)]
    range: TimeRange,
    /// Print the findings and the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Which segments: those with records in the range.
#[derive(Debug, Args)]
struct TimeRange {
    /// Only segments with records from this time (RFC 3339 or -7d).
    #[arg(long)]
    from: Option<String>,
    /// Only segments with records before this time.
    #[arg(long)]
    to: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ArchiveCommand {
    /// Create a key-encryption key file (0600).
    Keygen {
        /// The key's id, written into every segment it wraps.
        #[arg(long)]
        id: String,
        /// Where to write it; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Wrap every segment's data key under a new key-encryption key. The
    /// data and the segments' hashes do not change, so audits stay clean;
    /// afterwards the old key can be retired.
    RotateKey {
        /// The archive.
        #[arg(long)]
        archive: String,
        /// The keys the segments are wrapped under now; repeat for several.
        #[arg(long, required = true)]
        key_file: Vec<PathBuf>,
        /// The new key.
        #[arg(long)]
        new_key: PathBuf,
    },
    /// Replay archived segments into a fresh WAL and index under DIR, which
    /// `logvault serve` (data_dir = DIR) then serves.
    Restore {
        /// The archive.
        #[arg(long)]
        archive: String,
        /// Key-encryption keys; repeat for several.
        #[arg(long, required = true)]
        key_file: Vec<PathBuf>,
        #[command(flatten)]
        range: TimeRange,
        /// The new data directory.
        #[arg(long)]
        into: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a CA in DIR.
    Init {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Revoke the certificate of agent, sender or collector NAME: DIR's CRL
    /// is signed again, and a collector whose `ingest.crl` is that file
    /// refuses NAME's next connection, without a restart.
    Revoke {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
        /// The name the certificate was issued to.
        name: String,
    },
    /// Sign DIR's CRL again (it is valid for 397 days).
    Crl {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue an agent or collector certificate signed by DIR's CA.
    Issue {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
        /// Issue a client certificate for the agent NAME (Ed25519: it also
        /// signs the agent's batches).
        #[arg(long, required_unless_present_any = ["collector", "sender"])]
        agent: Option<String>,
        /// Issue a server certificate for the collector NAME.
        #[arg(long)]
        collector: Option<String>,
        /// Issue a client certificate for the syslog sender NAME (rsyslog,
        /// syslog-ng; ECDSA P-256, which every TLS library loads).
        #[arg(long)]
        sender: Option<String>,
        /// Extra DNS names or IP addresses of a collector.
        #[arg(long, requires = "collector")]
        san: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The Ed25519 private key (PKCS#8 PEM).
    #[arg(long)]
    key: PathBuf,
    /// Subject: who the token is for.
    #[arg(long)]
    sub: String,
    /// Tenant the token may read (or write); repeat for several.
    #[arg(long, required = true)]
    tenant: Vec<String>,
    /// What the token may do.
    #[arg(long, value_enum)]
    role: Role,
    /// Lifetime, such as 30m, 1h or 7d.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Issuer claim.
    #[arg(long, default_value = "logvault")]
    iss: String,
    /// Audience claim.
    #[arg(long, default_value = "logvault")]
    aud: String,
}

#[derive(Debug, Args)]
struct SearchArgs {
    /// The API's base URL.
    #[arg(long, env = "LOGVAULT_URL")]
    url: String,
    /// A bearer token.
    #[arg(long, env = "LOGVAULT_TOKEN", hide_env_values = true)]
    token: String,
    /// CA certificate that signed the API's certificate.
    #[arg(long, env = "LOGVAULT_CA")]
    ca: PathBuf,
    /// The query (tantivy syntax over message, level, host, source, flags
    /// and fields.NAME; `*` for all).
    query: String,
    /// Start: RFC 3339 or relative such as -15m.
    #[arg(long)]
    from: Option<String>,
    /// End: RFC 3339 or relative.
    #[arg(long)]
    to: Option<String>,
    /// Records to show.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Oldest first instead of newest first.
    #[arg(long)]
    oldest_first: bool,
    /// Print NDJSON, one record a line.
    #[arg(long)]
    json: bool,
    /// After the newest records, keep printing new ones as they arrive
    /// (live tail) until interrupted.
    #[arg(long, conflicts_with_all = ["count", "histogram", "oldest_first"])]
    follow: bool,
    /// Print only the number of matching records.
    #[arg(long, conflicts_with = "histogram")]
    count: bool,
    /// Print the matches per time bucket: auto, or an interval such as 1m.
    #[arg(long, num_args = 0..=1, default_missing_value = "auto", value_name = "INTERVAL")]
    histogram: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("logvault: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tantivy=warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn shutdown_on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler works");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received; shutting down");
        cancel.cancel();
    });
}

fn real_main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Quickstart(options) => {
            init_logging();
            runtime()?.block_on(async {
                let cancel = CancellationToken::new();
                shutdown_on_signal(cancel.clone());
                quickstart::run(options, cancel).await
            })?;
        }
        Command::Serve { config } => {
            let config = CollectorConfig::load(&config)?;
            init_logging();
            runtime()?.block_on(async {
                let cancel = CancellationToken::new();
                shutdown_on_signal(cancel.clone());
                let running = logvault_collector::server::start(config, cancel).await?;
                match running.syslog_addr {
                    Some(syslog) => {
                        println!(
                            "ingest {} api https://{} syslog {syslog}",
                            running.ingest_addr, running.api_addr
                        )
                    }
                    None => println!("ingest {} api https://{}", running.ingest_addr, running.api_addr),
                }
                running.wait().await?;
                anyhow::Ok(())
            })?;
        }
        Command::Certs(CertsCommand::Init { dir }) => {
            let pki = Pki::init(&dir)?;
            pki.write_crl()?;
            println!("{}", pki.ca_cert().display());
        }
        Command::Certs(CertsCommand::Revoke { dir, name }) => {
            println!("{}", Pki::open(&dir)?.revoke(&name)?.display());
        }
        Command::Certs(CertsCommand::Crl { dir }) => {
            println!("{}", Pki::open(&dir)?.write_crl()?.display());
        }
        Command::Certs(CertsCommand::Issue { dir, agent, collector, sender, san }) => {
            let pki = Pki::open(&dir)?;
            let issued = match (agent, collector, sender) {
                (Some(name), None, None) => pki.issue(CertRole::Agent, &name, &[])?,
                (None, Some(name), None) => pki.issue(CertRole::Collector, &name, &san)?,
                (None, None, Some(name)) => pki.issue(CertRole::Sender, &name, &[])?,
                _ => bail!("give exactly one of --agent, --collector or --sender"),
            };
            println!("{}\n{}", issued.cert.display(), issued.key.display());
        }
        Command::Token(args) => println!("{}", mint_token(args)?),
        Command::Keygen { out } => println!("{}", auth::ensure_key_pair(&out)?.display()),
        Command::Search(args) => return runtime()?.block_on(search(args)),
        Command::Audit(args) => return runtime()?.block_on(audit(args)),
        Command::Archive(ArchiveCommand::Keygen { id, out }) => {
            logvault_storage::keyring::Kek::generate(&id)?.write(&out)?;
            println!("{}", out.display());
        }
        Command::Archive(ArchiveCommand::RotateKey { archive, key_file, new_key }) => {
            return runtime()?.block_on(rotate_key(&archive, &key_file, &new_key));
        }
        Command::Archive(ArchiveCommand::Restore { archive, key_file, range, into }) => {
            let (from, to) = time_range(&range)?;
            let keyring = logvault_storage::keyring::Keyring::load(&key_file)?;
            let archive = logvault_storage::archive::Archive::open(&archive)?;
            let restored = runtime()?
                .block_on(logvault_collector::restore::restore(&archive, &keyring, from, to, &into))?;
            println!(
                "restored {} segments, {} batches, {} records into {}",
                restored.segments,
                restored.batches,
                restored.records,
                into.display()
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (amount, unit) = text.split_at(split);
    let amount: u64 = amount.parse().with_context(|| format!("bad ttl {text:?}"))?;
    let unit = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad ttl unit in {text:?}: use s, m, h or d"),
    };
    amount.checked_mul(unit).context("ttl out of range")
}

fn mint_token(args: TokenArgs) -> anyhow::Result<String> {
    for tenant in &args.tenant {
        logvault_certs::validate_name(tenant).with_context(|| format!("tenant {tenant:?}"))?;
    }
    let now = auth::now_secs();
    let (tenant, tenants) = match args.tenant.as_slice() {
        [one] => (Some(one.clone()), None),
        many => (None, Some(many.to_vec())),
    };
    let claims = Claims {
        sub: args.sub,
        iss: args.iss,
        aud: args.aud,
        exp: now + parse_ttl(&args.ttl)?,
        nbf: now,
        iat: now,
        tenant,
        tenants,
        role: args.role,
    };
    Ok(auth::mint(&args.key, &claims)?)
}

/// `--from` and `--to` (RFC 3339 or relative) as ns since the epoch.
fn time_range(range: &TimeRange) -> anyhow::Result<(Option<i64>, Option<i64>)> {
    let now = logvault_collector::time::now_ns();
    let parse = |t: &Option<String>| {
        t.as_deref()
            .map(|t| logvault_collector::time::parse_time(t, now))
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    Ok((parse(&range.from)?, parse(&range.to)?))
}

async fn audit(args: AuditArgs) -> anyhow::Result<std::process::ExitCode> {
    use logvault_storage::audit::{AuditOptions, audit};
    let public_key = logvault_collector::seal::read_public_key(&args.checkpoint_key)?;
    let keyring = if args.key_file.is_empty() {
        None
    } else {
        Some(logvault_storage::keyring::Keyring::load(&args.key_file)?)
    };
    let (from_ns, to_ns) = time_range(&args.range)?;
    let options = AuditOptions { keyring, from_ns, to_ns };
    let archive = logvault_storage::archive::Archive::open(&args.archive)?;
    let started = std::time::Instant::now();
    let mut last_shown = std::time::Instant::now();
    let report = audit(&archive, &public_key, &options, |done, total| {
        if last_shown.elapsed() >= std::time::Duration::from_secs(2) {
            eprintln!("audit: {done} of {total} segments checked");
            last_shown = std::time::Instant::now();
        }
    })
    .await?;
    let summary = &report.summary;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let findings: Vec<serde_json::Value> = report
            .findings
            .iter()
            .map(|f| serde_json::json!({ "kind": f.kind.as_str(), "object": f.object, "detail": f.detail }))
            .collect();
        let body = serde_json::json!({
            "ok": report.findings.is_empty(),
            "findings": findings,
            "checkpoints": summary.checkpoints,
            "segments": summary.segments,
            "bytes": summary.bytes,
            "batches": summary.batches,
            "records": summary.records,
            "pending": summary.pending,
            "seconds": seconds,
        });
        println!("{body}");
    } else {
        for finding in &report.findings {
            println!(
                "{} {} {}",
                finding.kind.as_str(),
                escape_control(&finding.object),
                escape_control(&finding.detail)
            );
        }
        println!(
            "audit: {} checkpoints, {} segments ({:.1} MB), {} batches, {} records verified, {} pending; {} findings in {seconds:.1} s",
            summary.checkpoints,
            summary.segments,
            summary.bytes as f64 / 1e6,
            summary.batches,
            summary.records,
            summary.pending,
            report.findings.len()
        );
    }
    Ok(if report.findings.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

async fn rotate_key(
    uri: &str,
    key_files: &[PathBuf],
    new_key: &std::path::Path,
) -> anyhow::Result<std::process::ExitCode> {
    use logvault_storage::segment::SegmentView;
    let mut keyring = logvault_storage::keyring::Keyring::load(key_files)?;
    let new = logvault_storage::keyring::Kek::load(new_key)?;
    keyring.insert(new.clone());
    let archive = logvault_storage::archive::Archive::open(uri)?;
    let (mut rewrapped, mut already) = (0u64, 0u64);
    for (key, _) in archive.list("").await? {
        if key.starts_with(logvault_storage::archive::CHECKPOINT_PREFIX) {
            continue;
        }
        let bytes = archive.get(&key).await?;
        let view = SegmentView::parse(&bytes).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        if view.kek_id == new.id() {
            already += 1;
            continue;
        }
        let updated = view.rewrap(&keyring, &new).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        archive.put_verified(&key, &updated).await?;
        rewrapped += 1;
    }
    println!("rewrapped {rewrapped} segments under {}; {already} already were", new.id());
    Ok(std::process::ExitCode::SUCCESS)
}

/// Escapes control characters so a log line can never move the cursor,
/// change colours or forge another line on the terminal.
fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            // Controls, and the bidirectional overrides that can make a
            // line read differently from what it holds.
            c if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') => {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// Prints records as readable lines (coloured levels on a terminal) or
/// NDJSON; control characters in records never reach the terminal raw.
struct Printer {
    json: bool,
    colour: bool,
}

impl Printer {
    fn print(&self, out: &mut impl Write, hit: &serde_json::Value) -> std::io::Result<()> {
        if self.json {
            return writeln!(out, "{hit}");
        }
        let field = |name: &str| escape_control(hit[name].as_str().unwrap_or_default());
        let level = field("level");
        let level = if self.colour {
            let code = match level.as_str() {
                "error" | "fatal" | "critical" => "31",
                "warn" => "33",
                "debug" | "trace" => "2",
                _ => "32",
            };
            format!("\x1b[{code}m{level:<5}\x1b[0m")
        } else {
            format!("{level:<5}")
        };
        writeln!(
            out,
            "{} {} {} {level} {}",
            field("timestamp"),
            field("host"),
            field("source"),
            field("message")
        )
    }
}

/// The API's answer as JSON, or the error it gave.
fn api_answer(answer: client::Answer) -> anyhow::Result<serde_json::Value> {
    let body: serde_json::Value = serde_json::from_slice(&answer.body)
        .with_context(|| format!("answer with status {} is not JSON", answer.status))?;
    if answer.status != 200 {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("the collector answered {}: {}", answer.status, escape_control(message));
    }
    Ok(body)
}

async fn search(args: SearchArgs) -> anyhow::Result<std::process::ExitCode> {
    let base = args.url.trim_end_matches('/').to_owned();
    let stdout = std::io::stdout();
    let printer = Printer { json: args.json, colour: stdout.is_terminal() };
    if args.count || args.histogram.is_some() {
        let mut request = serde_json::json!({ "q": args.query, "from": args.from, "to": args.to });
        if let Some(interval) = &args.histogram {
            request["histogram"] = serde_json::json!({ "interval": interval });
        }
        let answer = client::request(
            "POST",
            &format!("{base}/api/v1/aggregate"),
            &args.ca,
            Some(&args.token),
            Some(serde_json::to_vec(&request)?),
        )
        .await?;
        let body = api_answer(answer)?;
        let mut out = std::io::BufWriter::new(stdout.lock());
        if args.json {
            writeln!(out, "{body}")?;
        } else if args.count {
            writeln!(out, "{}", body["total"])?;
        } else {
            let buckets = body["histogram"]["buckets"].as_array().cloned().unwrap_or_default();
            let most = buckets.iter().filter_map(|b| b["count"].as_u64()).max().unwrap_or(0).max(1);
            for bucket in &buckets {
                let count = bucket["count"].as_u64().unwrap_or(0);
                let bar = "#".repeat(((count * 50).div_ceil(most)) as usize);
                writeln!(out, "{} {count:>10} {bar}", bucket["start"].as_str().unwrap_or_default())?;
            }
            writeln!(
                out,
                "total {} in {} buckets of {} ms",
                body["total"],
                buckets.len(),
                body["histogram"]["interval_ms"]
            )?;
        }
        out.flush()?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut url = format!(
        "{base}/api/v1/search?q={}&limit={}&order={}",
        client::encode_component(&args.query),
        args.limit,
        if args.oldest_first { "asc" } else { "desc" }
    );
    for (name, value) in [("from", &args.from), ("to", &args.to)] {
        if let Some(value) = value {
            url.push_str(&format!("&{name}={}", client::encode_component(value)));
        }
    }
    let body = api_answer(client::request("GET", &url, &args.ca, Some(&args.token), None).await?)?;
    let mut hits = body["hits"].as_array().cloned().unwrap_or_default();
    if args.follow {
        // Oldest first, so the live records follow on.
        hits.reverse();
    }
    {
        let mut out = std::io::BufWriter::new(stdout.lock());
        for hit in &hits {
            printer.print(&mut out, hit)?;
        }
        out.flush()?;
    }
    if !args.follow {
        if !args.json {
            eprintln!("{} of {} records", hits.len(), body["total"]);
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let url = format!("{base}/api/v1/tail?q={}", client::encode_component(&args.query));
    let mut pending = Vec::new();
    let mut failure = None;
    let answer = client::stream(&url, &args.ca, Some(&args.token), |chunk| {
        pending.extend_from_slice(chunk);
        let mut out = std::io::stdout().lock();
        // Events end with a blank line.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let (mut name, mut data) = ("message", String::new());
            for line in text.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = if value == "hit" { "hit" } else { "error" };
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&data) else { continue };
            if name == "error" {
                failure = Some(value["error"]["message"].as_str().unwrap_or("live tail ended").to_owned());
                return false;
            }
            if printer.print(&mut out, &value).and_then(|()| out.flush()).is_err() {
                return false;
            }
        }
        true
    })
    .await?;
    if answer.status != 200 {
        api_answer(answer)?;
    }
    if let Some(message) = failure {
        bail!("live tail ended: {}", escape_control(&message));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a\u{1b}[31mb\nc"), "a\\u{001b}[31mb\\nc");
        assert_eq!(escape_control("x\u{202e}y"), "x\\u{202e}y");
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        assert!(parse_ttl("1y").is_err());
    }
}
