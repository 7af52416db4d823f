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
    /// Mint a query token signed with an Ed25519 key.
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
    /// Tenant the token may read; repeat for several.
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
    /// The query (tantivy syntax; `*` for all).
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
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

async fn search(args: SearchArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut url = format!(
        "{}/api/v1/search?q={}&limit={}&order={}",
        args.url.trim_end_matches('/'),
        client::encode_component(&args.query),
        args.limit,
        if args.oldest_first { "asc" } else { "desc" }
    );
    for (name, value) in [("from", &args.from), ("to", &args.to)] {
        if let Some(value) = value {
            url.push_str(&format!("&{name}={}", client::encode_component(value)));
        }
    }
    let answer = client::request("GET", &url, &args.ca, Some(&args.token), None).await?;
    let body: serde_json::Value = serde_json::from_slice(&answer.body)
        .with_context(|| format!("answer with status {} is not JSON", answer.status))?;
    if answer.status != 200 {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        eprintln!("logvault: search failed ({}): {}", answer.status, escape_control(message));
        return Ok(std::process::ExitCode::FAILURE);
    }
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let hits = body["hits"].as_array().cloned().unwrap_or_default();
    for hit in &hits {
        if args.json {
            writeln!(out, "{hit}")?;
            continue;
        }
        let field = |name: &str| escape_control(hit[name].as_str().unwrap_or_default());
        let level = field("level");
        let level = if colour {
            let code = match level.as_str() {
                "error" | "fatal" => "31",
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
        )?;
    }
    out.flush()?;
    if !args.json {
        eprintln!("{} of {} records", hits.len(), body["total"]);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a\u{1b}[31mb\nc"), "a\\u{001b}[31mb\\nc");
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        assert!(parse_ttl("1y").is_err());
    }
}
