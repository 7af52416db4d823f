//! The agent's TOML configuration.
//!
//! ```toml
//! state_dir = "/var/lib/logvault-agent"   # checkpoints live here
//! metrics_listen = "127.0.0.1:9601"       # /metrics and /healthz; off when absent
//!
//! [collector]
//! address = "collector.example.org:6000"
//! failover = ["collector2.example.org:6000"] # tried in turn when one cannot be reached
//! server_name = "collector.example.org"   # default: the host part of each address
//! ca = "/etc/logvault/ca.crt"
//! cert = "/etc/logvault/agent.crt"        # Ed25519; its SAN names this agent
//! key = "/etc/logvault/agent.key"
//!
//! [[sources]]
//! include = ["/var/log/*.log", "/srv/app/**/*.log"]
//! exclude = ["/var/log/debug*.log"]
//! read_from = "beginning"                 # or "end", for files present at first start
//! max_line_bytes = 65536
//! on_long_line = "split"                  # or "truncate"
//! parser = "regex"                        # none, auto, json, logfmt, syslog, apache, regex
//! pattern = '^(?P<timestamp>\S+ \S+) (?P<level>\w+) (?P<component>[^:]+): '
//! timestamp_format = "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond]"
//! timezone = "+00:00"
//! redact = [{ pattern = 'password=\S+', replacement = "password=<redacted>" }]
//! multiline = { start = '^\d{4}-\d{2}-\d{2} ', timeout_ms = 1000 }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::parse::{Parser, ParserError, ParserKind, RedactRule, Redactor};

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

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where checkpoints are kept. Must survive restarts.
    pub state_dir: PathBuf,
    /// The collector and the TLS files to reach it.
    pub collector: CollectorConfig,
    /// The files to tail.
    pub sources: Vec<SourceConfig>,
    /// How records are grouped into batches.
    #[serde(default)]
    pub batch: BatchConfig,
    /// How often files are polled for new data and new files, in
    /// milliseconds. Default 200.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// `address:port` for `/metrics` and `/healthz` (plain HTTP: keep it on
    /// loopback). Off when absent.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// A disk spool between reading and shipping (see [`crate::spool`]).
    /// Without it the tailer waits for the collector and the files are the
    /// buffer.
    #[serde(default)]
    pub spool: Option<crate::spool::SpoolConfig>,
}

/// Where and how to reach the collector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// `host:port` of the collector's ingest listener.
    pub address: String,
    /// More collectors sharing a bucket with it (`host:port` each). When
    /// the one in use cannot be reached the agent connects to the next,
    /// round the list; the stream carries on there without loss or
    /// duplicates. Default: none.
    #[serde(default)]
    pub failover: Vec<String>,
    /// The name the collector's certificate must carry. Default: the host
    /// part of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// CA certificate that signed the collector's certificate.
    pub ca: PathBuf,
    /// This agent's certificate (Ed25519 key; its SAN is the agent's name).
    pub cert: PathBuf,
    /// This agent's private key.
    pub key: PathBuf,
    /// Batches sent and not yet acked, at most. When the window is full the
    /// agent stops reading files until acks arrive. Default 32, at most 64.
    #[serde(default = "default_window")]
    pub max_in_flight: usize,
    /// Largest delay between reconnect attempts, in milliseconds. Attempts
    /// back off exponentially from 100 ms with jitter and never stop.
    /// Default 10000.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// Where to start in a file the agent has never seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadFrom {
    /// From the first byte.
    #[default]
    Beginning,
    /// From the end as it is when first seen; applies to files present at
    /// the agent's first start only. Files created later are always read
    /// from the beginning.
    End,
}

/// What happens to a line longer than `max_line_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LongLine {
    /// Cut into records of at most `max_line_bytes`; every piece after the
    /// first is flagged as a continuation. Nothing is lost.
    #[default]
    Split,
    /// Keep the first `max_line_bytes`, flag the record as truncated and
    /// count the discarded bytes.
    Truncate,
}

/// One group of files to tail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Glob patterns of files to tail (`*`, `?`, `[...]`, `**`). Rescanned
    /// at every poll.
    #[serde(default)]
    pub include: Vec<String>,
    /// Read standard input instead of files (see [`crate::stdin`]).
    #[serde(default)]
    pub stdin: bool,
    /// Read the systemd journal instead of files (see [`crate::journald`]).
    #[serde(default)]
    pub journald: bool,
    /// Extra `journalctl` arguments, e.g. `["--unit=ssh.service"]`.
    #[serde(default)]
    pub journalctl_args: Vec<String>,
    /// Glob patterns of files to leave alone, matched against the full path.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Where to start in a file seen for the first time.
    #[serde(default)]
    pub read_from: ReadFrom,
    /// Longest line kept as one record, in bytes. Default 65536.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// What happens to longer lines.
    #[serde(default)]
    pub on_long_line: LongLine,
    /// How lines are parsed: none (default), auto, json, logfmt, syslog,
    /// apache, regex. See [`crate::parse`].
    #[serde(default)]
    pub parser: ParserKind,
    /// For `parser = "regex"`: a pattern with named captures; `timestamp`
    /// and `level` are read as such, every other capture becomes a field.
    #[serde(default)]
    pub pattern: Option<String>,
    /// How a captured `timestamp` is written, in the `time` crate's format
    /// description syntax, e.g. `[year]-[month]-[day] [hour]:[minute]:[second],[subsecond]`.
    /// Without it, RFC 3339 and epoch seconds or milliseconds are read.
    #[serde(default)]
    pub timestamp_format: Option<String>,
    /// Offset of times written without one: `Z` (default) or like `+02:00`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Redaction rules, applied in order to every line before it is
    /// parsed, signed or shipped.
    #[serde(default)]
    pub redact: Vec<RedactRule>,
    /// Merging of multi-line records (stack traces and the like).
    #[serde(default)]
    pub multiline: Option<MultilineConfig>,
    /// How the files are encoded: `utf-8` (default), `utf-16le`, `utf-16be`.
    /// Records are always UTF-8; invalid sequences are replaced and counted.
    #[serde(default)]
    pub encoding: Encoding,
}

/// A file's text encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Encoding {
    /// UTF-8 (and ASCII).
    #[default]
    #[serde(rename = "utf-8")]
    Utf8,
    /// UTF-16, little-endian (Windows' "Unicode").
    #[serde(rename = "utf-16le")]
    Utf16Le,
    /// UTF-16, big-endian.
    #[serde(rename = "utf-16be")]
    Utf16Be,
}

/// Lines that belong together become one record, joined with `\n`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultilineConfig {
    /// A line matching this starts a new record; others join the one
    /// before (e.g. `^\d{4}-\d{2}-\d{2}`).
    #[serde(default)]
    pub start: Option<String>,
    /// Only lines matching this join the record before (e.g. `^\s`).
    #[serde(default)]
    pub continuation: Option<String>,
    /// A record that gets no line for this long is shipped, in
    /// milliseconds. Default 1000.
    #[serde(default = "default_multiline_timeout_ms")]
    pub timeout_ms: u64,
    /// Lines in one record, at most; the record also stays within
    /// `max_line_bytes`. Default 500.
    #[serde(default = "default_multiline_max_lines")]
    pub max_lines: u32,
}

fn default_multiline_timeout_ms() -> u64 {
    1000
}

fn default_multiline_max_lines() -> u32 {
    500
}

impl SourceConfig {
    /// A file source for `include` with every other setting at its
    /// default: what a `[[sources]]` table naming only `include` gives.
    pub fn files(include: Vec<String>) -> SourceConfig {
        SourceConfig {
            include,
            stdin: false,
            journald: false,
            journalctl_args: Vec::new(),
            exclude: Vec::new(),
            read_from: ReadFrom::default(),
            max_line_bytes: default_max_line_bytes(),
            on_long_line: LongLine::default(),
            parser: ParserKind::default(),
            pattern: None,
            timestamp_format: None,
            timezone: None,
            redact: Vec::new(),
            multiline: None,
            encoding: Encoding::default(),
        }
    }

    /// The compiled redaction rules.
    pub fn redactor(&self) -> Result<Redactor, ParserError> {
        Redactor::new(&self.redact)
    }

    /// The parser this source's settings describe.
    pub fn parser(&self) -> Result<Parser, ParserError> {
        Parser::new(
            self.parser,
            self.pattern.as_deref(),
            self.timestamp_format.as_deref(),
            self.timezone.as_deref(),
        )
    }
}

/// Batching limits: a batch is sent when it reaches either size, or when a
/// poll finds no more data (so latency stays within one poll interval).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records in a batch. Default 10000: with `max_bytes`, about
    /// 1 MiB of lines, so each signature covers that much.
    #[serde(default = "default_max_records")]
    pub max_records: u32,
    /// Most message bytes in a batch. Default 1 MiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Signed batches waiting for the connection, at most; when full the
    /// tailer blocks (it stops reading, nothing is dropped). Default 16.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// How the record section of a batch is compressed before signing.
    /// Default `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// zstd level, 1 (fast) to 19. Default 1.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: default_max_records(),
            max_bytes: default_max_bytes(),
            queue: default_queue(),
            compression: Compression::default(),
            compression_level: default_compression_level(),
        }
    }
}

/// Batch compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Records as they are.
    None,
    /// zstd at `compression_level`.
    #[default]
    Zstd,
}

fn default_compression_level() -> i32 {
    1
}

fn default_poll_interval_ms() -> u64 {
    200
}
fn default_window() -> usize {
    32
}
fn default_max_backoff_ms() -> u64 {
    10_000
}
fn default_max_line_bytes() -> usize {
    64 * 1024
}
fn default_max_records() -> u32 {
    10_000
}
fn default_max_bytes() -> usize {
    1024 * 1024
}
fn default_queue() -> usize {
    16
}

impl AgentConfig {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        AgentConfig::parse(&text, path)
    }

    /// Parses and validates a configuration's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if self.sources.is_empty() {
            return invalid("sources", "at least one [[sources]] is needed");
        }
        for source in &self.sources {
            let kinds = usize::from(!source.include.is_empty())
                + usize::from(source.stdin)
                + usize::from(source.journald);
            if kinds != 1 {
                return invalid(
                    "sources.include",
                    "a source needs one of include patterns, stdin = true or journald = true",
                );
            }
            for pattern in source.include.iter().chain(&source.exclude) {
                if let Err(err) = glob::Pattern::new(pattern) {
                    return invalid("sources.include", &format!("{pattern:?}: {err}"));
                }
            }
            if let Err(err) = source.parser() {
                return invalid("sources.parser", &err.to_string());
            }
            if let Err(err) = source.redactor() {
                return invalid("sources.redact", &err.to_string());
            }
            if let Some(multiline) = &source.multiline {
                if multiline.start.is_none() && multiline.continuation.is_none() {
                    return invalid("sources.multiline", "needs start, continuation or both");
                }
                for pattern in multiline.start.iter().chain(&multiline.continuation) {
                    if let Err(err) = regex_lite::Regex::new(pattern) {
                        return invalid("sources.multiline", &format!("{pattern:?}: {err}"));
                    }
                }
                if multiline.max_lines == 0 || multiline.timeout_ms == 0 {
                    return invalid("sources.multiline", "max_lines and timeout_ms must be at least 1");
                }
            }
            // The collector refuses messages over 1 MiB.
            if !(16..=1024 * 1024).contains(&source.max_line_bytes) {
                return invalid("sources.max_line_bytes", "must be between 16 and 1048576");
            }
        }
        if self.sources.iter().filter(|s| s.stdin).count() > 1 {
            return invalid("sources.stdin", "only one source can read stdin");
        }
        if self.sources.iter().filter(|s| s.journald).count() > 1 {
            return invalid("sources.journald", "only one source can read the journal");
        }
        if self.sources.iter().any(|s| s.stdin && (s.multiline.is_some() || s.encoding != Encoding::Utf8)) {
            return invalid("sources.stdin", "multiline and encoding are for file sources");
        }
        if self.batch.max_records == 0 || self.batch.max_records > 100_000 {
            return invalid("batch.max_records", "must be between 1 and 100000");
        }
        if !(1024..=8 * 1024 * 1024).contains(&self.batch.max_bytes) {
            return invalid("batch.max_bytes", "must be between 1024 and 8388608");
        }
        if !(1..=19).contains(&self.batch.compression_level) {
            return invalid("batch.compression_level", "must be between 1 and 19");
        }
        if self.collector.max_in_flight > 64 {
            // The collector checks a resent batch's chain against the last
            // 128 batches of its stream.
            return invalid("collector.max_in_flight", "must be at most 64");
        }
        if self.batch.queue == 0 || self.collector.max_in_flight == 0 {
            return invalid("batch.queue", "queues need room for at least one batch");
        }
        if self.spool.as_ref().is_some_and(|s| s.max_bytes < 1024 * 1024) {
            return invalid("spool.max_bytes", "must be at least 1048576");
        }
        if self.poll_interval_ms == 0 || self.poll_interval_ms > 60_000 {
            return invalid("poll_interval_ms", "must be between 1 and 60000");
        }
        Ok(())
    }

    /// How often files are polled.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

impl CollectorConfig {
    /// Every collector address, `address` first.
    pub fn addresses(&self) -> Vec<&str> {
        std::iter::once(self.address.as_str()).chain(self.failover.iter().map(String::as_str)).collect()
    }

    /// The TLS name to expect of the collector at `address`:
    /// `server_name`, else the host of `address`.
    pub fn tls_name(&self, address: &str) -> String {
        if let Some(name) = &self.server_name {
            return name.clone();
        }
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_is_named() {
        let err = toml::from_str::<AgentConfig>(
            r#"
            state_dir = "/tmp/x"
            colector = {}
            "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colector"), "{err}");
    }

    #[test]
    fn tls_name_defaults_to_the_host() {
        let mut config = CollectorConfig {
            address: "[::1]:6000".into(),
            failover: vec!["c2.example.org:6000".into()],
            server_name: None,
            ca: "a".into(),
            cert: "b".into(),
            key: "c".into(),
            max_in_flight: 1,
            max_backoff_ms: 1,
        };
        assert_eq!(config.addresses(), ["[::1]:6000", "c2.example.org:6000"]);
        assert_eq!(config.tls_name(config.addresses()[0]), "::1");
        assert_eq!(config.tls_name(config.addresses()[1]), "c2.example.org");
        config.server_name = Some("collectors.example.org".into());
        assert_eq!(config.tls_name(config.addresses()[1]), "collectors.example.org");
    }
}
