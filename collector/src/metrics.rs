//! The collector's counters and their Prometheus text rendering, served at
//! `GET /metrics` to admin tokens.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use logvault_storage::frame::RefuseCode;

/// Why something was refused: each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Undecodable frame or batch.
    Malformed,
    /// A frame over the cap, or a decoded size over its cap.
    TooLarge,
    /// A protocol version this collector does not speak.
    Version,
    /// A batch naming another agent than its certificate.
    ForgedAgent,
    /// A signature that does not verify under the certificate's key.
    Signature,
    /// A certificate without a usable name or key.
    Certificate,
    /// A sequence gap in a stream.
    Gap,
    /// A batch older than what was stored, not a resend of it.
    Replay,
    /// A batch whose previous-batch hash does not match the stream.
    Chain,
    /// The WAL is over its high watermark.
    Busy,
    /// The WAL failed.
    Internal,
    /// Over the connection cap.
    ConnectionLimit,
    /// A syslog stream that cannot be framed.
    SyslogFraming,
}

impl Refusal {
    const ALL: [Refusal; 13] = [
        Refusal::Malformed,
        Refusal::TooLarge,
        Refusal::Version,
        Refusal::ForgedAgent,
        Refusal::Signature,
        Refusal::Certificate,
        Refusal::Gap,
        Refusal::Replay,
        Refusal::Chain,
        Refusal::Busy,
        Refusal::Internal,
        Refusal::ConnectionLimit,
        Refusal::SyslogFraming,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::TooLarge => "too_large",
            Refusal::Version => "version",
            Refusal::ForgedAgent => "forged_agent",
            Refusal::Signature => "signature",
            Refusal::Certificate => "certificate",
            Refusal::Gap => "gap",
            Refusal::Replay => "replay",
            Refusal::Chain => "chain",
            Refusal::Busy => "busy",
            Refusal::Internal => "internal",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::SyslogFraming => "syslog_framing",
        }
    }

    /// The code the agent acts on.
    pub fn code(self) -> RefuseCode {
        match self {
            Refusal::Malformed | Refusal::SyslogFraming => RefuseCode::Malformed,
            Refusal::Gap => RefuseCode::Gap,
            Refusal::Replay | Refusal::Chain => RefuseCode::Sequence,
            Refusal::TooLarge => RefuseCode::TooLarge,
            Refusal::Version => RefuseCode::UnsupportedVersion,
            Refusal::ForgedAgent | Refusal::Signature | Refusal::Certificate => RefuseCode::Identity,
            Refusal::Busy | Refusal::ConnectionLimit => RefuseCode::Busy,
            Refusal::Internal => RefuseCode::Internal,
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).expect("every refusal is listed")
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct TenantCounters {
    bytes: u64,
    records: u64,
    batches: u64,
}

/// Counters for operators, shared by every listener.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Batches acked (stored or duplicate).
    pub batches_acked: AtomicU64,
    /// Batches recognised as resends.
    pub batches_duplicate: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub handshake_failures: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Syslog messages received.
    pub syslog_messages: AtomicU64,
    /// Milliseconds senders were held back by their rate limit.
    pub rate_limited_ms: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    tenants: Mutex<BTreeMap<String, TenantCounters>>,
}

impl IngestStats {
    /// Counts a refusal.
    pub fn refused(&self, why: Refusal) {
        self.refusals[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far for `why`.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refusals[why.index()].load(Ordering::Relaxed)
    }

    /// Counts a stored batch of `tenant`: its size as received and the
    /// records it added.
    pub fn stored(&self, tenant: &str, bytes: usize, records: u64) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let counters = match tenants.get_mut(tenant) {
            Some(counters) => counters,
            None => tenants.entry(tenant.to_owned()).or_default(),
        };
        counters.bytes += bytes as u64;
        counters.records += records;
        counters.batches += 1;
    }
}

/// What `/metrics` reads.
pub struct MetricsSource {
    /// Ingest counters.
    pub ingest: std::sync::Arc<IngestStats>,
    /// The WAL directory (its size is read at scrape time).
    pub wal_dir: PathBuf,
    /// Position up to which the WAL is fsynced.
    pub durable: std::sync::Arc<AtomicU64>,
    /// The indexer's progress.
    pub index: std::sync::Arc<crate::index::IndexProgress>,
    /// Whether the WAL refuses new batches.
    pub wal_busy: crate::wal::WalBusy,
    /// Gaps stored under `ingest.accept_gaps`.
    pub gaps: std::sync::Arc<AtomicU64>,
    /// Batches taken without a chain check (predecessor forgotten).
    pub unverified: std::sync::Arc<AtomicU64>,
    /// WAL bytes removed after indexing and archiving.
    pub wal_pruned: std::sync::Arc<AtomicU64>,
    /// Splits published and fetched, when the collector shares a bucket.
    pub splits: Option<std::sync::Arc<crate::splits::Splits>>,
}

impl MetricsSource {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let tenants = self.ingest.tenants.lock().unwrap_or_else(|p| p.into_inner()).clone();
        type Read = fn(&TenantCounters) -> u64;
        let per_tenant: [(&str, &str, Read); 3] = [
            ("logvault_ingest_bytes_total", "Bytes of stored batches as received, by tenant", |c| c.bytes),
            ("logvault_ingest_records_total", "Records stored, by tenant", |c| c.records),
            ("logvault_ingest_batches_total", "Batches stored, by tenant", |c| c.batches),
        ];
        for (name, help, value) in per_tenant {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (tenant, counters) in &tenants {
                let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", label(tenant), value(counters));
            }
        }
        let name = "logvault_refusals_total";
        let _ =
            writeln!(out, "# HELP {name} Batches and connections refused, by reason\n# TYPE {name} counter");
        for why in Refusal::ALL {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {}", why.name(), self.ingest.refusals(why));
        }
        let durable = self.durable.load(Ordering::Acquire);
        let committed = self.index.committed.load(Ordering::Acquire);
        let single: [(&str, &str, &str, u64); 13] = [
            (
                "logvault_rate_limited_milliseconds_total",
                "counter",
                "Time senders were held back by ingest.agent_rate_bytes",
                load(&self.ingest.rate_limited_ms),
            ),
            (
                "logvault_chain_unverified_total",
                "counter",
                "Batches whose predecessor was older than the links remembered per stream",
                load(&self.unverified),
            ),
            (
                "logvault_sequence_gaps_total",
                "counter",
                "Batches stored past a sequence gap (ingest.accept_gaps)",
                load(&self.gaps),
            ),
            (
                "logvault_wal_busy",
                "gauge",
                "1 while new batches are refused: WAL at its cap or disk past the high watermark",
                u64::from(self.wal_busy.is_busy()),
            ),
            ("logvault_batches_acked_total", "counter", "Batches acked", load(&self.ingest.batches_acked)),
            (
                "logvault_batches_duplicate_total",
                "counter",
                "Acked batches that were resends",
                load(&self.ingest.batches_duplicate),
            ),
            (
                "logvault_handshake_failures_total",
                "counter",
                "TLS handshakes failed or timed out",
                load(&self.ingest.handshake_failures),
            ),
            (
                "logvault_syslog_messages_total",
                "counter",
                "Syslog messages received",
                load(&self.ingest.syslog_messages),
            ),
            ("logvault_connections", "gauge", "Ingest connections open", load(&self.ingest.connections)),
            ("logvault_wal_bytes", "gauge", "Bytes of WAL segments on disk", wal_bytes(&self.wal_dir)),
            (
                "logvault_wal_pruned_bytes_total",
                "counter",
                "WAL bytes removed once indexed and archived",
                load(&self.wal_pruned),
            ),
            (
                "logvault_index_lag_bytes",
                "gauge",
                "WAL bytes fsynced but not yet searchable",
                durable.saturating_sub(committed),
            ),
            (
                "logvault_index_failures_total",
                "counter",
                "Indexer failures (retried)",
                load(&self.index.failures),
            ),
        ];
        for (name, kind, help, value) in single {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        if let Some(splits) = &self.splits {
            let stats = &splits.stats;
            let cluster: [(&str, &str, &str, u64); 10] = [
                (
                    "logvault_splits_published_total",
                    "counter",
                    "Index splits this collector published",
                    load(&stats.published),
                ),
                (
                    "logvault_splits_publish_failures_total",
                    "counter",
                    "Split publications that failed (retried)",
                    load(&stats.publish_failures),
                ),
                (
                    "logvault_splits_known",
                    "gauge",
                    "Other collectors' splits listed in the bucket",
                    load(&stats.known),
                ),
                (
                    "logvault_splits_opened_total",
                    "counter",
                    "Other collectors' splits opened for searching",
                    load(&stats.opened),
                ),
                (
                    "logvault_splits_range_reads_total",
                    "counter",
                    "Ranged reads of split objects",
                    load(&stats.range_reads),
                ),
                (
                    "logvault_splits_fetched_bytes_total",
                    "counter",
                    "Bytes of split objects fetched",
                    load(&stats.fetched_bytes),
                ),
                (
                    "logvault_splits_cache_hits_total",
                    "counter",
                    "Searches that found a split open already",
                    load(&stats.cache_hits),
                ),
                (
                    "logvault_splits_cache_bytes",
                    "gauge",
                    "Bytes of other collectors' splits in the local cache",
                    splits.cache_bytes(),
                ),
                (
                    "logvault_splits_compacted_total",
                    "counter",
                    "This collector's splits replaced by compacted ones",
                    load(&stats.compacted),
                ),
                (
                    "logvault_splits_unreadable_total",
                    "counter",
                    "Other collectors' splits left out of a search because they could not be read",
                    load(&stats.unreadable),
                ),
            ];
            for (name, kind, help, value) in cluster {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
            }
        }
        out
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn wal_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_rendered_and_labels_are_escaped() {
        let stats = std::sync::Arc::new(IngestStats::default());
        stats.stored("alpha", 100, 10);
        stats.stored("alpha", 50, 5);
        stats.stored("we\"ird", 1, 1);
        stats.refused(Refusal::Gap);
        let source = MetricsSource {
            ingest: stats,
            wal_dir: std::env::temp_dir().join("logvault-no-such-wal"),
            durable: std::sync::Arc::new(AtomicU64::new(500)),
            index: std::sync::Arc::new(crate::index::IndexProgress::default()),
            wal_busy: crate::wal::WalBusy::default(),
            gaps: std::sync::Arc::new(AtomicU64::new(0)),
            unverified: std::sync::Arc::new(AtomicU64::new(0)),
            wal_pruned: std::sync::Arc::new(AtomicU64::new(0)),
            splits: None,
        };
        let text = source.render();
        assert!(text.contains("logvault_ingest_bytes_total{tenant=\"alpha\"} 150\n"), "{text}");
        assert!(text.contains("logvault_ingest_records_total{tenant=\"alpha\"} 15\n"));
        assert!(text.contains("logvault_ingest_batches_total{tenant=\"we\\\"ird\"} 1\n"));
        assert!(text.contains("logvault_refusals_total{reason=\"gap\"} 1\n"));
        assert!(text.contains("logvault_refusals_total{reason=\"replay\"} 0\n"));
        assert!(text.contains("logvault_index_lag_bytes 500\n"));
        assert!(text.contains("logvault_wal_bytes 0\n"));
    }
}
