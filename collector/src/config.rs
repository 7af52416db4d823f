//! The collector's TOML configuration.
//!
//! ```toml
//! data_dir = "/var/lib/logvault"          # wal/ and index/ live here
//!
//! [ingest]
//! listen = "0.0.0.0:6000"
//! ca = "/etc/logvault/pki/ca.crt"         # agents' certificates must chain to it
//! cert = "/etc/logvault/pki/collectors/c1.crt"
//! key = "/etc/logvault/pki/collectors/c1.key"
//! max_connections = 1024
//! handshake_timeout_ms = 10000
//! max_frame_bytes = 16777216
//! idle_timeout_ms = 300000
//!
//! [api]
//! listen = "127.0.0.1:8443"
//! jwt_public_key = "/etc/logvault/jwt.pub" # Ed25519 public key, PEM
//! jwt_keys_dir = "/etc/logvault/jwt-keys"   # every *.pub in it, reloaded on change
//! issuer = "logvault"
//! audience = "logvault"
//! max_limit = 1000
//! query_timeout_ms = 10000
//! requests_per_second = 50                 # per token holder (iss, sub)
//! max_concurrent_queries = 2               # default: the number of cores
//! max_tails = 64
//!
//! [index]
//! commit_interval_ms = 500
//! retention_ms = 2592000000                # drop records over 30 days old from the index
//! max_bytes = 107374182400                 # and the oldest past 100 GiB
//! retention_check_ms = 60000
//!
//! [wal]
//! segment_bytes = 67108864
//! max_bytes = 0                            # hard cap; 0: none
//! high_watermark_percent = 95
//! prune = "auto"                           # remove indexed and archived segments; "always", "never"
//!
//! [tenants]
//! default = "default"
//! [[tenants.map]]
//! tenant = "payments"
//! agents = ["pay-*"]
//!
//! [archive]                                # off when absent
//! uri = "s3://logs/archive?endpoint=https://s3.example.org&region=eu-west-1"
//! kek_file = "/etc/logvault/archive.kek"   # logvault archive keygen
//! checkpoint_key = "/etc/logvault/checkpoint.key"
//! collector_id = "collector1"
//! segment_bytes = 67108864
//! seal_interval_ms = 300000
//! checkpoint_interval_ms = 60000
//! zstd_level = 3
//! max_pending_bytes = 1073741824
//! retention_ms = 31536000000               # default: kept
//!
//! [cluster]                                # several collectors, one bucket; off when absent
//! uri = "s3://logs/cluster?endpoint=https://s3.example.org&region=eu-west-1"
//! publish_interval_ms = 300000             # this collector's new records as a split
//! poll_interval_ms = 10000                 # the others' splits listed
//! cache_bytes = 10737418240                # their splits cached here, at most
//! compact_splits = 8                       # this many small splits merged into one; 0: never
//! compact_grace_ms = 600000                # replaced splits deleted this long after
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML does not parse or names an unknown key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("{key}: {message}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The whole collector configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Where the WAL and the index live.
    pub data_dir: PathBuf,
    /// The agents' listener.
    pub ingest: IngestConfig,
    /// The query API.
    pub api: ApiConfig,
    /// Which tenant each agent's data belongs to.
    #[serde(default)]
    pub tenants: TenantConfig,
    /// WAL settings.
    #[serde(default)]
    pub wal: WalConfig,
    /// Index settings.
    #[serde(default)]
    pub index: IndexConfig,
    /// The syslog-over-TLS listener (RFC 5425); off when absent.
    #[serde(default)]
    pub syslog: Option<SyslogConfig>,
    /// Sealing and archiving; off when absent.
    #[serde(default)]
    pub archive: Option<ArchiveConfig>,
    /// Several collectors sharing one bucket; off when absent.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// Collectors behind one load balancer, sharing a bucket (see
/// [`crate::cluster`]). Each needs its own `archive.collector_id`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Where the collectors keep what they share (streams' dedup state):
    /// `s3://BUCKET/PREFIX?endpoint=...`, on a store that writes
    /// conditionally (`If-Match`, `If-None-Match`), apart from the archive.
    pub uri: String,
    /// Publish this collector's newest index segments as a split at most
    /// this often, in ms: what the others find of it lags by about this
    /// much. Default 300000 (five minutes).
    #[serde(default = "default_publish_interval_ms")]
    pub publish_interval_ms: u64,
    /// List the other collectors' splits this often, in ms. Default 10000.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// The local cache of other collectors' splits, at most this many
    /// bytes (the least recently used go first). Default 10 GiB.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Merge this many of this collector's published splits of one size
    /// class into one (so the others open few, larger splits); 0 never
    /// does. Default 8.
    #[serde(default = "default_compact_splits")]
    pub compact_splits: usize,
    /// Delete splits replaced by a compacted one this long after it is
    /// published, in ms. Default 600000 (ten minutes).
    #[serde(default = "default_compact_grace_ms")]
    pub compact_grace_ms: u64,
}

fn default_compact_splits() -> usize {
    8
}
fn default_compact_grace_ms() -> u64 {
    600_000
}

fn default_publish_interval_ms() -> u64 {
    300_000
}
fn default_poll_interval_ms() -> u64 {
    10_000
}
fn default_cache_bytes() -> u64 {
    10 << 30
}

/// Sealed, encrypted segments in object storage, and signed checkpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// `file:///DIR`, a path, or `s3://BUCKET/PREFIX?endpoint=...&region=...`.
    pub uri: String,
    /// The key-encryption key new segments' data keys are wrapped under
    /// (`logvault archive keygen`).
    pub kek_file: PathBuf,
    /// The Ed25519 key checkpoints are signed with (PKCS#8 PEM); created,
    /// with its `.pub`, when missing.
    pub checkpoint_key: PathBuf,
    /// This collector's name in checkpoints and their keys. Default
    /// "collector".
    #[serde(default = "default_collector_id")]
    pub collector_id: String,
    /// A segment is sealed once this much WAL waits (per run; one segment
    /// per tenant and host). Default 64 MiB.
    #[serde(default = "default_archive_segment_bytes")]
    pub segment_bytes: u64,
    /// ... or once the oldest unsealed entry is this old, in ms. Default
    /// 300000 (5 minutes).
    #[serde(default = "default_seal_interval_ms")]
    pub seal_interval_ms: u64,
    /// A checkpoint is written this often, in ms, also when nothing
    /// arrived. Default 60000.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// zstd level of the segments. Default 3.
    #[serde(default = "default_archive_zstd_level")]
    pub zstd_level: i32,
    /// When more WAL than this waits to be archived (the object store is
    /// down), new batches are refused as busy, so agents keep their data.
    /// Default 1 GiB.
    #[serde(default = "default_max_pending_bytes")]
    pub max_pending_bytes: u64,
    /// Segments are deleted this long after they were sealed, in ms, and
    /// the deletion is listed in the next checkpoint. Default: kept.
    #[serde(default)]
    pub retention_ms: Option<u64>,
}

fn default_collector_id() -> String {
    "collector".into()
}
fn default_archive_segment_bytes() -> u64 {
    64 << 20
}
fn default_seal_interval_ms() -> u64 {
    300_000
}
fn default_checkpoint_interval_ms() -> u64 {
    60_000
}
fn default_archive_zstd_level() -> i32 {
    3
}
fn default_max_pending_bytes() -> u64 {
    1 << 30
}

/// The mutual-TLS listener agents ship to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// `address:port` to listen on; port 0 picks a free port.
    pub listen: String,
    /// CA whose certificates agents must present.
    pub ca: PathBuf,
    /// The collector's certificate.
    pub cert: PathBuf,
    /// The collector's private key.
    pub key: PathBuf,
    /// A CRL (PEM) from the same CA: certificates it lists are refused.
    /// Re-read within a second of changing, as are `ca`, `cert` and `key`.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Store a batch that starts past its stream's end instead of refusing
    /// it (counted in `logvault_sequence_gaps_total` and logged). Needed
    /// only for agents whose spool is `when_full = "drop_oldest"`.
    /// Default false.
    #[serde(default)]
    pub accept_gaps: bool,
    /// Also take TLS 1.2 on the ingest and syslog listeners, for syslog
    /// senders whose TLS library lacks 1.3 (agents always speak 1.3).
    /// Client certificates are required either way. Default false.
    #[serde(default)]
    pub allow_tls12: bool,
    /// Bytes per second one agent (or syslog sender) may store, with a
    /// one-second burst; a sender over it is slowed, never refused. 0 (the
    /// default) for no limit.
    #[serde(default)]
    pub agent_rate_bytes: u64,
    /// Connections one agent may hold open at once (both listeners).
    /// Default 4; 0 for no cap.
    #[serde(default = "default_connections_per_agent")]
    pub max_connections_per_agent: usize,
    /// Connections served at once; further ones are closed at accept.
    /// Default 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A TLS handshake (and the agent's hello) must finish within this,
    /// in milliseconds. Default 10000.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Largest frame accepted, in bytes; checked before allocation.
    /// Default 16 MiB.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: u32,
    /// A connection that sends nothing for this long is closed (the agent
    /// reconnects when it has data), in milliseconds. Default 300000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

/// Syslog over TLS for rsyslog, syslog-ng and other senders. It shares the
/// ingest CA, certificate, key, connection cap and handshake timeout:
/// senders need a client certificate from the same CA, and their name (so
/// each record's `host`) comes from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `address:port` to listen on (6514 is the registered port).
    pub listen: String,
    /// Longest message accepted, in bytes; longer ones are cut and flagged.
    /// Default and most 64 KiB.
    #[serde(default = "default_syslog_max_message")]
    pub max_message_bytes: u32,
    /// A connection that sends nothing for this long is closed, in
    /// milliseconds. Default 300000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

fn default_connections_per_agent() -> usize {
    4
}

fn default_syslog_max_message() -> u32 {
    64 * 1024
}

/// The HTTPS query API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `address:port` to listen on.
    pub listen: String,
    /// Server certificate. Default: the ingest certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Server key. Default: the ingest key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// An Ed25519 public key (SPKI PEM) tokens may be signed with.
    #[serde(default)]
    pub jwt_public_key: Option<PathBuf>,
    /// A directory whose `*.pub` files are all trusted token keys, read
    /// again when they change: put the new key's `.pub` here, sign with
    /// it, and remove the old one once its tokens have expired.
    #[serde(default)]
    pub jwt_keys_dir: Option<PathBuf>,
    /// Required `iss` claim. Default "logvault".
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Required `aud` claim. Default "logvault".
    #[serde(default = "default_issuer")]
    pub audience: String,
    /// Largest `limit` a search may ask for. Default 1000.
    #[serde(default = "default_max_limit")]
    pub max_limit: usize,
    /// A query running longer is stopped and answered 503. Default 10000.
    #[serde(default = "default_query_timeout_ms")]
    pub query_timeout_ms: u64,
    /// Queries one token holder (`iss` and `sub`) may start per second,
    /// with a burst of as many; over it the answer is 429 with
    /// Retry-After. Default 50; 0 turns the limit off.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u64,
    /// Queries run at once; the next waits for a slot until its timeout,
    /// then gets 503. Default: the number of cores.
    #[serde(default = "default_max_concurrent_queries")]
    pub max_concurrent_queries: usize,
    /// Live tails open at once across all callers; one more gets 429.
    /// Default 64.
    #[serde(default = "default_max_tails")]
    pub max_tails: usize,
    /// Bytes of one request body from an HTTP sender (Elasticsearch bulk,
    /// OTLP); a larger one is answered 413 before it is read. Default
    /// 33554432 (32 MiB).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Ask clients of this port for a certificate from the ingest CA
    /// (checked against `ingest.crl`), without requiring one: an HTTP
    /// sender presenting one ships as that certificate's name and tenant,
    /// with no token. Default false.
    #[serde(default)]
    pub client_certificates: bool,
}

/// Tenant assignment: the first mapping whose pattern matches the agent's
/// certificate name, or whose CA issued its certificate, wins; otherwise
/// `default`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant of agents no mapping names. Default "default".
    #[serde(default = "default_tenant")]
    pub default: String,
    /// Mappings, tried in order.
    #[serde(default)]
    pub map: Vec<TenantMapping>,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self { default: default_tenant(), map: Vec::new() }
    }
}

/// Agents whose names match `agents`, or whose certificates `ca` issued,
/// belong to `tenant`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantMapping {
    /// The tenant.
    pub tenant: String,
    /// Name patterns; `*` matches any run of characters.
    #[serde(default)]
    pub agents: Vec<String>,
    /// A CA certificate (PEM): every client certificate it issued belongs
    /// to `tenant`, whatever its name. The CA must also be in `ingest.ca`
    /// (a file may hold several CA certificates).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// WAL settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalConfig {
    /// A segment is rolled when it passes this size. Default 64 MiB.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Appends waiting for the writer, at most; further appenders wait
    /// (and so do their agents). Default 1024.
    #[serde(default = "default_wal_queue")]
    pub queue: usize,
    /// Hard cap on the WAL's size on disk, in bytes; 0 for none (the
    /// default). An append that would pass it is refused as busy (agents
    /// spool and retry) and logged as an error; nothing stored is touched.
    #[serde(default)]
    pub max_bytes: u64,
    /// When the file system holding the WAL is fuller than this percentage,
    /// new batches are refused as busy until space is freed. Default 95.
    #[serde(default = "default_high_watermark_percent")]
    pub high_watermark_percent: u8,
    /// Which segments are removed once they are no longer needed.
    #[serde(default)]
    pub prune: WalPrune,
    /// How often pruning runs, in ms. Default 5000.
    #[serde(default = "default_prune_check_ms")]
    pub prune_check_ms: u64,
}

/// When WAL segments are removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WalPrune {
    /// Once indexed and archived, when `[archive]` is on; otherwise kept
    /// (the WAL is then the only copy the index can be rebuilt from).
    #[default]
    Auto,
    /// Once indexed (and archived, when `[archive]` is on).
    Always,
    /// Never: the WAL grows until `max_bytes` or the disk's watermark.
    Never,
}

fn default_prune_check_ms() -> u64 {
    5000
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            segment_bytes: default_segment_bytes(),
            queue: default_wal_queue(),
            max_bytes: 0,
            high_watermark_percent: default_high_watermark_percent(),
            prune: WalPrune::Auto,
            prune_check_ms: default_prune_check_ms(),
        }
    }
}

fn default_high_watermark_percent() -> u8 {
    95
}

/// Index settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// How often new records are committed (made searchable), in
    /// milliseconds. Default 500.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Records whose time is older than this many ms are deleted from the
    /// index (the WAL and the archive keep them; `logvault archive
    /// restore` brings them back). Default: kept.
    #[serde(default)]
    pub retention_ms: Option<u64>,
    /// When the index's live records take more than this many bytes on
    /// disk, the oldest are deleted until they take 90% of it. Default:
    /// no cap.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// How often retention runs, in ms. Default 60000.
    #[serde(default = "default_retention_check_ms")]
    pub retention_check_ms: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            commit_interval_ms: default_commit_interval_ms(),
            retention_ms: None,
            max_bytes: None,
            retention_check_ms: default_retention_check_ms(),
        }
    }
}

fn default_max_connections() -> usize {
    1024
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_max_frame_bytes() -> u32 {
    logvault_storage::frame::DEFAULT_MAX_FRAME
}
fn default_idle_timeout_ms() -> u64 {
    300_000
}
fn default_issuer() -> String {
    "logvault".into()
}
fn default_max_limit() -> usize {
    1000
}
fn default_query_timeout_ms() -> u64 {
    10_000
}
fn default_requests_per_second() -> u64 {
    50
}
fn default_max_concurrent_queries() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
fn default_max_tails() -> usize {
    64
}
fn default_max_body_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_tenant() -> String {
    "default".into()
}
fn default_segment_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_wal_queue() -> usize {
    1024
}
fn default_retention_check_ms() -> u64 {
    60_000
}
fn default_commit_interval_ms() -> u64 {
    500
}

impl CollectorConfig {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<CollectorConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        CollectorConfig::parse(&text, path)
    }

    /// Parses and validates a configuration's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<CollectorConfig, ConfigError> {
        let config: CollectorConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if self.api.jwt_public_key.is_none() && self.api.jwt_keys_dir.is_none() {
            return invalid("api.jwt_public_key", "give jwt_public_key, jwt_keys_dir or both");
        }
        if let Some(archive) = &self.archive {
            if !logvault_storage::archive::valid_part(&archive.collector_id) {
                return invalid("archive.collector_id", "use 1 to 128 of A-Z a-z 0-9 . -");
            }
            if archive.segment_bytes < 4096 || archive.segment_bytes > 1 << 30 {
                return invalid("archive.segment_bytes", "must be between 4096 and 1 GiB");
            }
            if archive.checkpoint_interval_ms == 0 || archive.seal_interval_ms == 0 {
                return invalid("archive.checkpoint_interval_ms", "intervals must be at least 1 ms");
            }
            if !(1..=19).contains(&archive.zstd_level) {
                return invalid("archive.zstd_level", "must be 1 to 19");
            }
        }
        if let Some(cluster) = &self.cluster {
            let Some(archive) = &self.archive else {
                return invalid("cluster", "collectors sharing a bucket seal into it: set [archive] too");
            };
            if cluster.uri.trim_end_matches('/') == archive.uri.trim_end_matches('/') {
                return invalid("cluster.uri", "use a prefix apart from archive.uri");
            }
            if cluster.publish_interval_ms < 100 || cluster.poll_interval_ms < 100 {
                return invalid("cluster.publish_interval_ms", "intervals must be at least 100 ms");
            }
            if cluster.cache_bytes < 1 << 20 {
                return invalid("cluster.cache_bytes", "must be at least 1 MiB");
            }
            if cluster.compact_splits == 1 || cluster.compact_splits > 64 {
                return invalid("cluster.compact_splits", "must be 0 (never) or 2 to 64");
            }
            if cluster.compact_splits > 0 && cluster.compact_grace_ms < 3 * cluster.poll_interval_ms {
                return invalid(
                    "cluster.compact_grace_ms",
                    "must be at least three poll intervals, so every collector lists a compacted split before the ones it replaces go",
                );
            }
        }
        if self.api.max_concurrent_queries == 0 {
            return invalid("api.max_concurrent_queries", "must be at least 1");
        }
        if self.api.query_timeout_ms == 0 {
            return invalid("api.query_timeout_ms", "must be at least 1");
        }
        if self.ingest.max_connections == 0 {
            return invalid("ingest.max_connections", "must be at least 1");
        }
        if !(1024..=crate::wal::MAX_BATCH_BYTES).contains(&self.ingest.max_frame_bytes) {
            return invalid(
                "ingest.max_frame_bytes",
                &format!("must be between 1024 and {}", crate::wal::MAX_BATCH_BYTES),
            );
        }
        if let Some(syslog) = &self.syslog {
            if !(256..=64 * 1024).contains(&syslog.max_message_bytes) {
                return invalid("syslog.max_message_bytes", "must be between 256 and 65536");
            }
            if syslog.idle_timeout_ms < 1000 {
                return invalid("syslog.idle_timeout_ms", "must be at least 1000");
            }
        }
        if !(1..=100).contains(&self.wal.high_watermark_percent) {
            return invalid("wal.high_watermark_percent", "must be between 1 and 100");
        }
        if self.ingest.idle_timeout_ms < 1000 {
            return invalid("ingest.idle_timeout_ms", "must be at least 1000");
        }
        if self.api.max_limit == 0 {
            return invalid("api.max_limit", "must be at least 1");
        }
        if self.wal.queue == 0 || self.wal.segment_bytes < 1024 * 1024 {
            return invalid("wal", "queue must be at least 1 and segment_bytes at least 1 MiB");
        }
        if self.index.commit_interval_ms == 0 || self.index.commit_interval_ms > 60_000 {
            return invalid("index.commit_interval_ms", "must be between 1 and 60000");
        }
        if let Some(empty) = self.tenants.map.iter().find(|m| m.agents.is_empty() && m.ca.is_none()) {
            return invalid(
                "tenants.map",
                &format!("the mapping for {:?} names neither agents nor a ca", empty.tenant),
            );
        }
        for tenant in std::iter::once(&self.tenants.default).chain(self.tenants.map.iter().map(|m| &m.tenant))
        {
            if logvault_certs::validate_name(tenant).is_err() {
                return invalid("tenants", &format!("{tenant:?} is not a valid tenant name ([A-Za-z0-9.-])"));
            }
        }
        Ok(())
    }
}

/// Tenant mappings with their CAs loaded: what the listeners resolve each
/// connection's tenant with.
#[derive(Debug, Clone)]
pub struct TenantResolver {
    default: String,
    /// (tenant, name patterns, the CA's subject key identifier).
    map: Vec<(String, Vec<String>, Option<Vec<u8>>)>,
}

impl TenantResolver {
    /// Loads the CA of every mapping that names one.
    pub fn new(tenants: &TenantConfig) -> Result<TenantResolver, ConfigError> {
        let mut map = Vec::new();
        for mapping in &tenants.map {
            let ca_key = match &mapping.ca {
                None => None,
                Some(path) => {
                    let certs = logvault_certs::load_certs(path).map_err(|e| ConfigError::Invalid {
                        key: "tenants.map.ca",
                        message: e.to_string(),
                    })?;
                    let (_, subject) = logvault_certs::key_ids(&certs[0]);
                    Some(subject.ok_or_else(|| ConfigError::Invalid {
                        key: "tenants.map.ca",
                        message: format!(
                            "{}: the CA certificate has no subject key identifier",
                            path.display()
                        ),
                    })?)
                }
            };
            map.push((mapping.tenant.clone(), mapping.agents.clone(), ca_key));
        }
        Ok(TenantResolver { default: tenants.default.clone(), map })
    }

    /// The tenant of the agent `name` whose certificate names its issuer
    /// by `authority_key` (its authority key identifier).
    pub fn resolve(&self, name: &str, authority_key: Option<&[u8]>) -> &str {
        self.map
            .iter()
            .find(|(_, patterns, ca)| {
                patterns.iter().any(|pattern| wildcard_match(pattern, name))
                    || ca.as_deref().is_some_and(|ca| authority_key == Some(ca))
            })
            .map_or(self.default.as_str(), |(tenant, _, _)| tenant.as_str())
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("pay-*", "pay-1"));
        assert!(wildcard_match("*-db-*", "eu-db-3"));
        assert!(wildcard_match("exact", "exact"));
        assert!(!wildcard_match("pay-*", "web-1"));
        assert!(!wildcard_match("a*a", "a"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = toml::from_str::<CollectorConfig>("data_dir = \"x\"\n[injest]\n").unwrap_err();
        assert!(err.to_string().contains("injest"), "{err}");
    }
}
