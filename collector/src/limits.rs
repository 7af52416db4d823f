//! Fair share between senders: a byte-rate token bucket per agent and a
//! cap on each agent's connections.
//!
//! Each connection has at most one batch in the WAL's queue (it waits for
//! the fsync before reading the next frame), so the WAL serves connections
//! in turn; the connection cap keeps one agent from taking many turns, and
//! the rate limit keeps a noisy agent from using more than its share of the
//! disk and the indexer. A sender over its rate is slowed, never refused:
//! its connection waits before storing, its window fills, and it stops
//! reading its files until the bucket refills.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets by sender name.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_second: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `bytes_per_second` per sender, with a burst of one second's worth;
    /// 0 means no limit.
    pub fn new(bytes_per_second: u64) -> RateLimiter {
        RateLimiter { bytes_per_second: bytes_per_second as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// How long `sender` must wait before storing `bytes` more.
    pub fn delay(&self, sender: &str, bytes: usize) -> Duration {
        self.delay_at(sender, bytes, Instant::now())
    }

    /// Takes `cost` for `sender` when its bucket holds that much; when it
    /// does not, takes nothing and says how long until it will.
    pub fn try_take(&self, sender: &str, cost: usize) -> Result<(), Duration> {
        if self.bytes_per_second <= 0.0 {
            return Ok(());
        }
        let (rate, now) = (self.bytes_per_second, Instant::now());
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(sender.to_owned()).or_insert((rate, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        let cost = cost as f64;
        if *tokens >= cost {
            *tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((cost - *tokens) / rate))
        }
    }

    fn delay_at(&self, sender: &str, bytes: usize, now: Instant) -> Duration {
        if self.bytes_per_second <= 0.0 {
            return Duration::ZERO;
        }
        let rate = self.bytes_per_second;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(sender.to_owned()).or_insert((rate, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        *tokens -= bytes as f64;
        if *tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-*tokens / rate) }
    }
}

/// Open connections by sender name, capped.
#[derive(Debug)]
pub struct ConnectionCounts {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl ConnectionCounts {
    /// At most `max` connections per sender (0: no cap).
    pub fn new(max: usize) -> ConnectionCounts {
        ConnectionCounts { max, open: Mutex::new(HashMap::new()) }
    }

    /// A slot for `sender`, released when dropped; `None` at the cap.
    pub fn enter<'a>(&'a self, sender: &str) -> Option<ConnectionSlot<'a>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(sender.to_owned()).or_insert(0);
        if self.max > 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot { counts: self, sender: sender.to_owned() })
    }
}

/// One open connection of a sender.
#[derive(Debug)]
pub struct ConnectionSlot<'a> {
    counts: &'a ConnectionCounts,
    sender: String,
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.sender) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_over_its_rate_waits_and_others_do_not() {
        let limiter = RateLimiter::new(1000);
        let start = Instant::now();
        // One second's burst is free; the next 500 bytes cost half a second.
        assert_eq!(limiter.delay_at("noisy", 1000, start), Duration::ZERO);
        assert_eq!(limiter.delay_at("noisy", 500, start), Duration::from_millis(500));
        // Another sender is not affected.
        assert_eq!(limiter.delay_at("quiet", 100, start), Duration::ZERO);
        // After two seconds the bucket is full again (and no fuller).
        let later = start + Duration::from_secs(2);
        assert_eq!(limiter.delay_at("noisy", 1000, later), Duration::ZERO);
        assert_eq!(RateLimiter::new(0).delay("any", usize::MAX), Duration::ZERO);
    }

    #[test]
    fn a_query_over_its_rate_is_refused_without_using_the_bucket() {
        let limiter = RateLimiter::new(2);
        assert!(limiter.try_take("alice", 1).is_ok());
        assert!(limiter.try_take("alice", 1).is_ok());
        let wait = limiter.try_take("alice", 1).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
        assert!(limiter.try_take("bob", 1).is_ok());
        assert!(RateLimiter::new(0).try_take("any", usize::MAX).is_ok());
    }

    #[test]
    fn connections_are_capped_per_sender_and_slots_come_back() {
        let counts = ConnectionCounts::new(2);
        let a = counts.enter("web-1").unwrap();
        let _b = counts.enter("web-1").unwrap();
        assert!(counts.enter("web-1").is_none());
        assert!(counts.enter("web-2").is_some());
        drop(a);
        assert!(counts.enter("web-1").is_some());
    }
}
