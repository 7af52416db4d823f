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
        let files = logvault_certs::TlsFiles {
            ca: config.collector.ca.clone(),
            cert: config.collector.cert.clone(),
            key: config.collector.key.clone(),
        };
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
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        let signals = cancel.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; shutting down");
            signals.cancel();
        });
        logvault_agent::run(config, cancel).await
    })?;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler works");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
