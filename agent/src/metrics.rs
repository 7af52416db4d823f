//! `/metrics` (Prometheus text) and `/healthz` on a local port.
//!
//! A deliberately small HTTP/1.1 responder: one request per connection,
//! the request head capped at 8 KiB and 5 seconds, nothing but GET.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Stats;

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Renders every counter and gauge in the Prometheus text format.
pub fn render(stats: &Stats) -> String {
    let counters: [(&str, &str, u64); 17] = [
        ("lines_read_total", "Records produced from files", stats.lines_read.load(Ordering::Relaxed)),
        ("bytes_read_total", "Bytes of lines read", stats.bytes_read.load(Ordering::Relaxed)),
        (
            "lines_split_total",
            "Lines longer than max_line_bytes split into pieces",
            stats.lines_split.load(Ordering::Relaxed),
        ),
        (
            "lines_truncated_total",
            "Lines longer than max_line_bytes truncated",
            stats.lines_truncated.load(Ordering::Relaxed),
        ),
        (
            "bytes_discarded_total",
            "Bytes discarded by truncation",
            stats.bytes_discarded.load(Ordering::Relaxed),
        ),
        (
            "invalid_utf8_lines_total",
            "Lines with invalid UTF-8 replaced",
            stats.invalid_utf8_lines.load(Ordering::Relaxed),
        ),
        (
            "lines_redacted_total",
            "Lines changed by a redaction rule",
            stats.lines_redacted.load(Ordering::Relaxed),
        ),
        ("batches_sent_total", "Batches written to a connection", stats.batches_sent.load(Ordering::Relaxed)),
        ("batches_acked_total", "Batches the collector acked", stats.batches_acked.load(Ordering::Relaxed)),
        ("records_acked_total", "Records in acked batches", stats.records_acked.load(Ordering::Relaxed)),
        (
            "batches_duplicate_total",
            "Acked batches the collector already had",
            stats.batches_duplicate.load(Ordering::Relaxed),
        ),
        (
            "batches_resumed_total",
            "Unacked batches not resent after a reconnect: the collector had them",
            stats.batches_resumed.load(Ordering::Relaxed),
        ),
        (
            "batches_refused_total",
            "Batches the collector refused",
            stats.batches_refused.load(Ordering::Relaxed),
        ),
        ("connects_total", "Connections made to the collector", stats.connects.load(Ordering::Relaxed)),
        (
            "spool_dropped_records_total",
            "Records dropped from a full spool (drop_oldest)",
            stats.spool_dropped_records.load(Ordering::Relaxed),
        ),
        (
            "spool_corrupt_entries_total",
            "Damaged spool entries skipped",
            stats.spool_corrupt_entries.load(Ordering::Relaxed),
        ),
        (
            "spool_orphans_dropped_total",
            "Spooled batches refused out of sequence after spool damage, dropped and read again from their file",
            stats.spool_orphans_dropped.load(Ordering::Relaxed),
        ),
    ];
    let gauges: [(&str, &str, u64); 4] = [
        ("connected", "1 while connected to the collector", stats.connected.load(Ordering::Relaxed)),
        ("unacked_batches", "Batches sent and not yet acked", stats.unacked_batches.load(Ordering::Relaxed)),
        ("files_tracked", "Files being tailed", stats.files_tracked.load(Ordering::Relaxed)),
        ("spool_bytes", "Bytes in the disk spool", stats.spool_bytes.load(Ordering::Relaxed)),
    ];
    let mut out = String::new();
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP logvault_agent_{name} {help}\n# TYPE logvault_agent_{name} counter\nlogvault_agent_{name} {value}"
        );
    }
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP logvault_agent_{name} {help}\n# TYPE logvault_agent_{name} gauge\nlogvault_agent_{name} {value}"
        );
    }
    out
}

/// Serves until `cancel` fires.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &stats)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, stats: &Stats) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let request_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = request_line.split(|&b| b == b' ');
    let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", "text/plain; version=0.0.4", render(stats)),
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
