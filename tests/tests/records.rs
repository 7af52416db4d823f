//! What the collector makes of a record: times far from arrival are kept
//! and flagged, with the received time beside them; control characters
//! stay data.

use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;
use logvault_storage::{AckStatus, BatchBuilder, Frame, Level, WireRecord};

#[test]
fn far_timestamps_are_kept_and_flagged_beside_the_received_time() {
    let setup = Setup::new("records");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let token = setup.token(&["default"], Role::Reader);
    let mut raw = RawAgent::connect(&setup, "clock-1", collector.ingest);
    let now = logvault_collector::time::now_ns();
    let mut builder = BatchBuilder::new("clock-1", "/var/log/clock.log", 0, 0, [0; 32]);
    builder.push(WireRecord::new(now, Level::Info, "ontime record"));
    builder.push(WireRecord::new(4_102_444_800_000_000_000, Level::Info, "future record")); // 2100
    builder.push(WireRecord::new(631_152_000_000_000_000, Level::Info, "past record")); // 1990
    builder.push(WireRecord::new(now, Level::Warn, "bell \u{7} and escape \u{1b}[2J record"));
    let batch = builder.sign(&raw.key);
    assert!(matches!(raw.send_batch(batch), Some(Frame::Ack { status: AckStatus::Stored, .. })));
    collector.wait_total(&token, "record", 4, Duration::from_secs(30));
    assert_eq!(collector.total(&token, "flags:future"), 1);
    assert_eq!(collector.total(&token, "flags:past"), 1);
    assert_eq!(collector.total(&token, "ontime -flags:future -flags:past"), 1);
    let (status, body) = collector.search_raw(Some(&token), &[("q", "future"), ("limit", "1")]);
    assert_eq!(status, 200);
    let hit = &body["hits"][0];
    assert_eq!(hit["timestamp"], "2100-01-01T00:00:00Z", "{hit}");
    assert_eq!(hit["flags"], serde_json::json!(["future"]), "{hit}");
    let received = hit["received"].as_str().unwrap();
    assert!(received.starts_with("20") && !received.starts_with("2100"), "{received}");
    // Control characters are data: stored as sent, escaped in the JSON.
    let (_, body) = collector.search_raw(Some(&token), &[("q", "bell"), ("limit", "1")]);
    assert_eq!(body["hits"][0]["message"], "bell \u{7} and escape \u{1b}[2J record");
    collector.process.stop();
}
