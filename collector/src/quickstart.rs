//! `logvault quickstart`: a collector and an agent on one machine, with a
//! fresh dev PKI and token key, in one command.

use std::path::{Path, PathBuf};

use anyhow::Context;
use logvault_agent::config::{AgentConfig, BatchConfig, CollectorConfig as AgentCollector, SourceConfig};
use logvault_agent::parse::ParserKind;
use logvault_certs::{Pki, Role as CertRole};
use logvault_collector::auth::{self, Claims, Role};
use logvault_collector::config::{
    ApiConfig, CollectorConfig, IndexConfig, IngestConfig, SyslogConfig, TenantConfig, WalConfig,
};
use tokio_util::sync::CancellationToken;

/// The samples tailed when no `--logs` is given (see collector/samples/README.md).
const SAMPLES: &[(&str, &str)] = &[
    ("HDFS_2k.log", include_str!("../samples/HDFS_2k.log")),
    ("OpenSSH_2k.log", include_str!("../samples/OpenSSH_2k.log")),
    ("Apache_2k.log", include_str!("../samples/Apache_2k.log")),
    ("LICENSE", include_str!("../samples/LICENSE")),
    ("README.md", include_str!("../samples/README.md")),
];
const TOKEN_TTL_SECS: u64 = 24 * 3600;

/// Options of `logvault quickstart`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Directory for certificates, keys, data and checkpoints; reused when
    /// run again.
    #[arg(long, default_value = "logvault-data")]
    data: PathBuf,
    /// Files or glob patterns to tail. Default: the bundled samples.
    #[arg(long, num_args = 1..)]
    logs: Vec<String>,
    /// Address of the query API.
    #[arg(long, default_value = "127.0.0.1:8443")]
    api_listen: String,
    /// Address of the agents' mutual-TLS listener.
    #[arg(long, default_value = "127.0.0.1:6000")]
    ingest_listen: String,
    /// Address of the syslog-over-TLS listener (RFC 5425).
    #[arg(long, default_value = "127.0.0.1:6514")]
    syslog_listen: String,
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() { path.to_owned() } else { std::env::current_dir()?.join(path) })
}

fn agent_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    if logvault_certs::validate_name(host).is_ok() { host.to_owned() } else { "localhost".to_owned() }
}

/// Runs until `cancel` fires.
pub(crate) async fn run(options: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    let data = absolute(&options.data)?;
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let certs_dir = data.join("certs");
    let pki = Pki::open_or_init(&certs_dir)?;
    let sans: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let collector_cert = pki.ensure(CertRole::Collector, "collector", &sans)?;
    let agent = agent_name();
    let agent_cert = pki.ensure(CertRole::Agent, &agent, &[])?;
    // A fresh CRL every start: `logvault certs revoke` rewrites it while
    // the collector runs.
    let crl = pki.write_crl()?;
    let jwt_key = data.join("jwt.key");
    let jwt_public = auth::ensure_key_pair(&jwt_key)?;
    // The archive: a key-encryption key and a checkpoint signing key,
    // kept across runs like the rest.
    let keys = data.join("keys");
    std::fs::create_dir_all(&keys)?;
    let kek_file = keys.join("archive.kek");
    if !kek_file.exists() {
        logvault_storage::keyring::Kek::generate("quickstart-1")?.write(&kek_file)?;
    }
    let checkpoint_key = keys.join("checkpoint.key");
    logvault_collector::seal::load_or_create_archive_key(&checkpoint_key)?;
    let checkpoint_public = checkpoint_key.with_extension("pub");
    let archive_dir = data.join("archive");
    std::fs::create_dir_all(&archive_dir)?;
    let archive_uri = format!("file://{}", archive_dir.display());

    let logs = if options.logs.is_empty() {
        let samples = data.join("samples");
        std::fs::create_dir_all(&samples)?;
        for (name, text) in SAMPLES {
            let path = samples.join(name);
            if !path.exists() {
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        vec![samples.join("*.log").to_string_lossy().into_owned()]
    } else {
        options
            .logs
            .iter()
            .map(|log| absolute(Path::new(log)).map(|p| p.to_string_lossy().into_owned()))
            .collect::<anyhow::Result<_>>()?
    };

    let collector = CollectorConfig {
        data_dir: data.join("collector"),
        ingest: IngestConfig {
            listen: options.ingest_listen.clone(),
            ca: pki.ca_cert(),
            cert: collector_cert.cert.clone(),
            key: collector_cert.key.clone(),
            crl: Some(crl),
            accept_gaps: false,
            allow_tls12: false,
            agent_rate_bytes: 0,
            max_connections_per_agent: 4,
            max_connections: 64,
            handshake_timeout_ms: 10_000,
            max_frame_bytes: logvault_storage::frame::DEFAULT_MAX_FRAME,
            idle_timeout_ms: 300_000,
        },
        api: ApiConfig {
            listen: options.api_listen.clone(),
            cert: None,
            key: None,
            jwt_public_key: Some(jwt_public.clone()),
            jwt_keys_dir: None,
            query_timeout_ms: 10_000,
            requests_per_second: 50,
            max_concurrent_queries: 2,
            max_tails: 64,
            max_body_bytes: 32 * 1024 * 1024,
            client_certificates: false,
            issuer: "logvault".into(),
            audience: "logvault".into(),
            max_limit: 1000,
        },
        tenants: TenantConfig::default(),
        wal: WalConfig::default(),
        index: IndexConfig::default(),
        cluster: None,
        archive: Some(logvault_collector::config::ArchiveConfig {
            uri: archive_uri.clone(),
            kek_file: kek_file.clone(),
            checkpoint_key: checkpoint_key.clone(),
            collector_id: "quickstart".into(),
            segment_bytes: 64 << 20,
            seal_interval_ms: 10_000,
            checkpoint_interval_ms: 30_000,
            zstd_level: 3,
            max_pending_bytes: 1 << 30,
            retention_ms: None,
        }),
        syslog: Some(SyslogConfig {
            listen: options.syslog_listen.clone(),
            max_message_bytes: 64 * 1024,
            idle_timeout_ms: 300_000,
        }),
    };
    let collector_cancel = CancellationToken::new();
    let running = logvault_collector::server::start(collector, collector_cancel.clone()).await?;

    let agent_config = AgentConfig {
        state_dir: data.join("agent"),
        collector: AgentCollector {
            failover: Vec::new(),
            address: running.ingest_addr.to_string(),
            server_name: None,
            ca: pki.ca_cert(),
            cert: agent_cert.cert.clone(),
            key: agent_cert.key.clone(),
            max_in_flight: 32,
            max_backoff_ms: 5_000,
        },
        sources: vec![SourceConfig { parser: ParserKind::Auto, ..SourceConfig::files(logs.clone()) }],
        batch: BatchConfig::default(),
        poll_interval_ms: 200,
        metrics_listen: None,
        spool: None,
    };
    let agent_cancel = CancellationToken::new();
    let agent_task = tokio::spawn(logvault_agent::run(agent_config, agent_cancel.clone()));

    let now = auth::now_secs();
    let claims = Claims {
        sub: "quickstart".into(),
        iss: "logvault".into(),
        aud: "logvault".into(),
        exp: now + TOKEN_TTL_SECS,
        nbf: now,
        iat: now,
        tenant: Some("default".into()),
        tenants: None,
        role: Role::Reader,
    };
    let token = auth::mint(&jwt_key, &claims)?;
    // For the Elasticsearch bulk API and OTLP: ships, never reads.
    let writer_token = auth::mint(
        &jwt_key,
        &Claims { sub: "quickstart-writer".into(), role: Role::Writer, ..claims.clone() },
    )?;
    let api_url = format!("https://{}", running.api_addr);
    let ca_file = pki.ca_cert();
    let details = serde_json::json!({
        "api_url": api_url,
        "token": token,
        "writer_token": writer_token,
        "ca_file": ca_file,
        "ingest_addr": running.ingest_addr.to_string(),
        "syslog_addr": running.syslog_addr.map(|a| a.to_string()),
        "certs_dir": certs_dir,
        "jwt_key": jwt_key,
        "archive_uri": archive_uri,
        "checkpoint_key": checkpoint_public,
        "kek_file": kek_file,
        "agent": agent,
        "logs": logs,
    });
    let json_path = data.join("quickstart.json");
    logvault_certs::write_private_file(&json_path, serde_json::to_string_pretty(&details)?.as_bytes())?;

    println!("logvault quickstart is running");
    println!("  query API   {api_url}");
    println!("  ingest      {} (mutual TLS, agent {agent})", running.ingest_addr);
    if let Some(syslog) = running.syslog_addr {
        println!("  syslog      {syslog} (RFC 5425 over mutual TLS; `logvault certs issue --sender NAME`)");
    }
    println!("  tailing     {}", logs.join(" "));
    println!("  data        {}", data.display());
    println!();
    println!("A reader token for tenant \"default\", valid 24 hours:");
    println!("  export LOGVAULT_TOKEN='{token}'");
    println!();
    println!("Search:");
    println!(
        "  curl --cacert {} -H \"Authorization: Bearer $LOGVAULT_TOKEN\" '{api_url}/api/v1/search?q=PacketResponder&limit=5'",
        ca_file.display()
    );
    println!(
        "  cargo run --release --bin logvault -- search --url {api_url} --ca {} --token \"$LOGVAULT_TOKEN\" PacketResponder",
        ca_file.display()
    );
    println!(
        "  cargo run --release --bin logvault -- search --url {api_url} --ca {} --token \"$LOGVAULT_TOKEN\" --follow '*'",
        ca_file.display()
    );
    println!();
    println!(
        "The web page: open {api_url}/ (trust {} or accept the certificate) and paste the token.",
        ca_file.display()
    );
    println!();
    println!(
        "Ship with the Elasticsearch bulk API (or OTLP at {api_url}/v1/logs); the writer token is writer_token in {}:",
        json_path.display()
    );
    println!(
        "  curl --cacert {} -H \"Authorization: Bearer $(jq -r .writer_token {})\" --data-binary $'{{\"index\":{{\"_index\":\"app\"}}}}\\n{{\"message\":\"hello from curl\"}}\\n' {api_url}/_bulk",
        ca_file.display(),
        json_path.display()
    );
    println!();
    println!("The same details for scripts: {}", json_path.display());
    println!("Ctrl-C stops.");

    cancel.cancelled().await;
    tracing::info!("stopping agent, then collector");
    agent_cancel.cancel();
    match agent_task.await {
        Ok(result) => result?,
        Err(err) => anyhow::bail!("agent task failed: {err}"),
    }
    collector_cancel.cancel();
    running.wait().await?;
    Ok(())
}
