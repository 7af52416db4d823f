//! Times as the API reads and writes them.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Formats nanoseconds since the epoch as RFC 3339 (UTC).
pub fn format_ns(ns: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ns.to_string())
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

/// Parses an RFC 3339 time, `now`, or a relative time such as `-15m`
/// (units s, m, h, d, w) counted back from `now_ns`.
pub fn parse_time(text: &str, now_ns: i64) -> Result<i64, String> {
    let text = text.trim();
    if text == "now" {
        return Ok(now_ns);
    }
    if let Some(relative) = text.strip_prefix('-') {
        let split = relative.find(|c: char| !c.is_ascii_digit()).unwrap_or(relative.len());
        let (amount, unit) = relative.split_at(split);
        let amount: i64 = amount.parse().map_err(|_| format!("bad relative time {text:?}"))?;
        let unit_ns: i64 = match unit {
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "w" => 7 * 86_400 * 1_000_000_000,
            _ => return Err(format!("bad unit in {text:?}: use s, m, h, d or w")),
        };
        return amount
            .checked_mul(unit_ns)
            .and_then(|back| now_ns.checked_sub(back))
            .ok_or_else(|| format!("{text:?} is out of range"));
    }
    let parsed = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{text:?} is neither RFC 3339 nor a relative time like -15m: {e}"))?;
    i64::try_from(parsed.unix_timestamp_nanos()).map_err(|_| format!("{text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_times() {
        let now = 1_000_000_000_000_000_000;
        assert_eq!(parse_time("-15m", now).unwrap(), now - 900_000_000_000);
        assert_eq!(parse_time("now", now).unwrap(), now);
        assert_eq!(parse_time("1970-01-01T00:00:01Z", now).unwrap(), 1_000_000_000);
        assert!(parse_time("-15y", now).is_err());
        assert!(parse_time("yesterday", now).is_err());
        assert_eq!(format_ns(1_500_000_000), "1970-01-01T00:00:01.5Z");
    }
}
