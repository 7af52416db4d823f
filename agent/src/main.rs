//! `logvault-agent`: tails log files and ships them to a collector.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use logvault_agent::config::AgentConfig;
use tokio_util::sync::CancellationToken;

/// Tails log files and ships them, signed, to a logvault collector over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "logvault-agent", version)]
struct Cli {
    /// The agent's TOML configuration.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the configuration and the certificate, then exit.
    Check,
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("logvault-agent: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.config.context("--config is required")?;
    let config = AgentConfig::load(&path)?;
    if let Some(Command::Check) = cli.command {
        let files = tls_files(&config);
        let identity = logvault_agent::AgentIdentity::load(&files)?;
        logvault_certs::client_config(&files)?;
        println!("ok: agent {} ships to {}", identity.name, config.collector.address);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_reloading(path, config))?;
    Ok(())
}

/// How often the certificate files are checked for changes.
const CERT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the agent; on SIGHUP, or when its certificate files change, reads
/// the configuration again and restarts the pipeline with it. Acked
/// checkpoints are flushed first, so nothing is lost or shipped twice. A
/// configuration or certificate that does not load is refused and the
/// running one kept.
async fn run_reloading(path: PathBuf, mut config: AgentConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; shutting down");
        signals.cancel();
    });
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        let token = shutdown.child_token();
        let mut running = tokio::spawn(logvault_agent::run(config.clone(), token.clone()));
        let stamp = tls_stamp(&config);
        let next = loop {
            let reason = tokio::select! {
                result = &mut running => return Ok(result??),
                _ = hangup.recv() => "SIGHUP",
                _ = tokio::time::sleep(CERT_CHECK_INTERVAL) => {
                    if tls_stamp(&config) == stamp {
                        continue;
                    }
                    "certificate files changed"
                }
            };
            match load_checked(&path) {
                Ok(next) => {
                    tracing::info!(reason, "reloading configuration and certificates");
                    break next;
                }
                Err(err) => {
                    tracing::error!(reason, error = %format!("{err:#}"), "reload refused; keeping the running configuration")
                }
            }
        };
        token.cancel();
        running.await??;
        config = next;
    }
}

/// Loads a configuration and checks that its certificate and key load.
fn load_checked(path: &std::path::Path) -> anyhow::Result<AgentConfig> {
    let config = AgentConfig::load(path)?;
    let files = tls_files(&config);
    logvault_agent::AgentIdentity::load(&files)?;
    logvault_certs::client_config(&files)?;
    Ok(config)
}

fn tls_files(config: &AgentConfig) -> logvault_certs::TlsFiles {
    logvault_certs::TlsFiles {
        ca: config.collector.ca.clone(),
        cert: config.collector.cert.clone(),
        key: config.collector.key.clone(),
    }
}

/// Modification times of the TLS files, to notice a renewal.
fn tls_stamp(config: &AgentConfig) -> Vec<Option<std::time::SystemTime>> {
    let files = tls_files(config);
    [files.ca, files.cert, files.key]
        .iter()
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler works");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
