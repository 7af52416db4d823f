//! Parsers: what a line's time, level and fields are, found at the edge.
//!
//! A parser never changes the line: `message` stays the original text.
//! It only adds a timestamp (else the read time is used), a normalised
//! level (else the level is sniffed from the first words) and fields.
//!
//! | parser | lines it reads |
//! |---|---|
//! | `none` | anything; level sniffed, no fields |
//! | `json` | one JSON object a line; `timestamp`/`@timestamp`/`time`/`ts`, `level`/`severity`/`lvl` |
//! | `logfmt` | `key=value key2="quoted value"` |
//! | `syslog` | RFC 5424, and RFC 3164 with or without `<PRI>` (`Jun 14 15:16:01 host tag[pid]: msg`) |
//! | `apache` | Apache/nginx common and combined access logs |
//! | `regex` | a pattern with named captures: `timestamp`, `level`, and any others as fields |
//! | `auto` | tries json, syslog, apache, logfmt in that order, else `none` |

use std::sync::Arc;

use logvault_storage::Level;
use serde::Deserialize;
use time::format_description::OwnedFormatItem;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// One redaction rule: every match of `pattern` is replaced before the
/// line is parsed, signed or shipped, so the secret never leaves the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactRule {
    /// A regular expression (`regex-lite` syntax).
    pub pattern: String,
    /// What each match becomes; `$name` and `$1` refer to captures.
    #[serde(default = "default_replacement")]
    pub replacement: String,
}

fn default_replacement() -> String {
    "<redacted>".to_owned()
}

/// Compiled redaction rules of a source.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    rules: Arc<Vec<(regex_lite::Regex, String)>>,
}

impl Redactor {
    /// Compiles the rules; an invalid pattern is an error naming it.
    pub fn new(rules: &[RedactRule]) -> Result<Redactor, ParserError> {
        let compiled = rules
            .iter()
            .map(|rule| {
                regex_lite::Regex::new(&rule.pattern)
                    .map(|regex| (regex, rule.replacement.clone()))
                    .map_err(|e| ParserError::Pattern(format!("redact {:?}: {e}", rule.pattern)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Redactor { rules: Arc::new(compiled) })
    }

    /// The line with every rule applied, and whether anything matched.
    pub fn apply<'a>(&self, line: &'a str) -> (std::borrow::Cow<'a, str>, bool) {
        let mut text = std::borrow::Cow::Borrowed(line);
        let mut changed = false;
        for (regex, replacement) in self.rules.iter() {
            if regex.is_match(&text) {
                text = std::borrow::Cow::Owned(regex.replace_all(&text, replacement.as_str()).into_owned());
                changed = true;
            }
        }
        (text, changed)
    }
}

/// Fields a line may yield, at most.
const MAX_FIELDS: usize = 64;

/// The parser of a source, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParserKind {
    /// No parsing: the level is sniffed from the first words.
    #[default]
    None,
    /// Try the structured formats in turn.
    Auto,
    /// JSON objects.
    Json,
    /// logfmt pairs.
    Logfmt,
    /// RFC 5424 or RFC 3164.
    Syslog,
    /// Apache/nginx common or combined access log.
    Apache,
    /// A regular expression with named captures.
    Regex,
}

/// Why a parser could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParserError {
    /// `pattern` does not compile.
    #[error("pattern: {0}")]
    Pattern(String),
    /// `parser = "regex"` without a `pattern`.
    #[error("parser \"regex\" needs a pattern")]
    MissingPattern,
    /// `timestamp_format` is not a valid format description.
    #[error("timestamp_format {format:?}: {message}")]
    Format {
        /// The format as given.
        format: String,
        /// What is wrong.
        message: String,
    },
    /// `timezone` is not `Z` or `+HH:MM`.
    #[error("timezone {0:?}: expected Z or an offset like +02:00")]
    Timezone(String),
}

/// A `timestamp_format` as the `time` crate reads it. Malformed nested
/// descriptions (`[optional [...]]`) trip an internal assertion of its
/// parser (found by the config fuzz target), so nesting is refused before
/// it is asked; any other panic is caught and reported as a bad format.
fn parse_format(format: &str) -> Result<OwnedFormatItem, ParserError> {
    let error = |message: String| ParserError::Format { format: format.to_owned(), message };
    let (mut depth, mut escaped) = (0usize, false);
    for byte in format.bytes() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'[' if depth > 0 => {
                return Err(error("nested descriptions ([optional [...]]) are not supported".into()));
            }
            b'[' => depth += 1,
            b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let parsed = std::panic::catch_unwind(|| time::format_description::parse_owned::<2>(format));
    match parsed {
        Ok(Ok(item)) => Ok(item),
        Ok(Err(err)) => Err(error(err.to_string())),
        Err(_) => Err(error("not a valid format description".into())),
    }
}

/// What a parser found in a line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Event time, ns since the epoch.
    pub timestamp_ns: Option<i64>,
    /// Normalised level.
    pub level: Option<Level>,
    /// Structured fields, in the order found.
    pub fields: Vec<(String, String)>,
}

/// A configured parser, cheap to clone.
#[derive(Clone)]
pub struct Parser {
    kind: ParserKind,
    regex: Option<Arc<regex_lite::Regex>>,
    format: Option<Arc<OwnedFormatItem>>,
    offset: UtcOffset,
}

impl std::fmt::Debug for Parser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parser").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Parser {
    /// For times written without a year: this year, unless that puts the
    /// time more than a day ahead of now (December lines read in January),
    /// then last year.
    fn with_inferred_year(&self, parse: impl Fn(i32) -> Option<PrimitiveDateTime>) -> Option<i64> {
        let now = OffsetDateTime::now_utc().to_offset(self.offset);
        let this_year = parse(now.year())?.assume_offset(self.offset);
        let time = if this_year > now + time::Duration::days(1) {
            parse(now.year() - 1).map_or(this_year, |t| t.assume_offset(self.offset))
        } else {
            this_year
        };
        to_ns(time)
    }

    /// Builds a parser. `timestamp_format` uses the `time` crate's format
    /// description syntax (`[year]-[month]-[day] [hour]:[minute]:[second]`);
    /// times without an offset are read in `timezone` (default UTC).
    pub fn new(
        kind: ParserKind,
        pattern: Option<&str>,
        timestamp_format: Option<&str>,
        timezone: Option<&str>,
    ) -> Result<Parser, ParserError> {
        let regex = match (kind, pattern) {
            (_, Some(pattern)) => Some(Arc::new(
                regex_lite::Regex::new(pattern).map_err(|e| ParserError::Pattern(e.to_string()))?,
            )),
            (ParserKind::Regex, None) => return Err(ParserError::MissingPattern),
            _ => None,
        };
        let format = timestamp_format.map(parse_format).transpose()?;
        let offset = match timezone.map(str::trim) {
            None | Some("Z" | "UTC" | "utc") => UtcOffset::UTC,
            Some(text) => parse_offset(text).ok_or_else(|| ParserError::Timezone(text.to_owned()))?,
        };
        Ok(Parser { kind, regex, format: format.map(Arc::new), offset })
    }

    /// A parser that only sniffs the level.
    pub fn none() -> Parser {
        Parser::new(ParserKind::None, None, None, None).expect("the plain parser has no settings")
    }

    /// Parses one line.
    pub fn parse(&self, line: &str) -> Parsed {
        let mut parsed = match self.kind {
            ParserKind::None => Parsed::default(),
            ParserKind::Json => parse_json(line).unwrap_or_default(),
            ParserKind::Logfmt => parse_logfmt(line).unwrap_or_default(),
            ParserKind::Syslog => self.parse_syslog(line).unwrap_or_default(),
            ParserKind::Apache => parse_apache(line).unwrap_or_default(),
            ParserKind::Regex => self.parse_regex(line).unwrap_or_default(),
            ParserKind::Auto => {
                let trimmed = line.trim_start();
                let json = if trimmed.starts_with('{') { parse_json(line) } else { None };
                json.or_else(|| self.parse_syslog(line))
                    .or_else(|| parse_apache(line))
                    .or_else(|| parse_logfmt(line).filter(|p| p.fields.len() >= 2))
                    .unwrap_or_default()
            }
        };
        if parsed.level.is_none() {
            let sniffed = Level::sniff(line);
            parsed.level = (sniffed != Level::Unknown).then_some(sniffed);
        }
        parsed.fields.truncate(MAX_FIELDS);
        parsed
    }

    fn parse_regex(&self, line: &str) -> Option<Parsed> {
        let regex = self.regex.as_ref()?;
        let captures = regex.captures(line)?;
        let mut parsed = Parsed::default();
        for name in regex.capture_names().flatten() {
            let Some(value) = captures.name(name) else { continue };
            match name {
                "timestamp" => parsed.timestamp_ns = self.parse_time(value.as_str()),
                // A level capture is authoritative: no sniffing after it.
                "level" => {
                    parsed.level = Some(Level::from_word(value.as_str().trim()).unwrap_or(Level::Unknown))
                }
                _ => parsed.fields.push((name.to_owned(), value.as_str().to_owned())),
            }
        }
        Some(parsed)
    }

    /// Reads a time with the configured format, else as RFC 3339, else as
    /// epoch seconds or milliseconds.
    fn parse_time(&self, text: &str) -> Option<i64> {
        let text = text.trim();
        if let Some(format) = &self.format {
            let mut parsed = time::parsing::Parsed::new();
            if let Ok(b"") = parsed.parse_item(text.as_bytes(), format.as_ref()) {
                if parsed.year().is_some() {
                    return PrimitiveDateTime::try_from(parsed)
                        .ok()
                        .and_then(|t| to_ns(t.assume_offset(self.offset)));
                }
                if let Some(last_two) = parsed.year_last_two() {
                    // Two-digit years: 70..=99 are 19xx, the rest 20xx.
                    let year = i32::from(last_two) + if last_two >= 70 { 1900 } else { 2000 };
                    return parsed
                        .with_year(year)
                        .and_then(|p| PrimitiveDateTime::try_from(p).ok())
                        .and_then(|t| to_ns(t.assume_offset(self.offset)));
                }
                let with_year =
                    |year| parsed.with_year(year).and_then(|p| PrimitiveDateTime::try_from(p).ok());
                if let Some(ns) = self.with_inferred_year(with_year) {
                    return Some(ns);
                }
            }
        }
        parse_common_time(text, self.offset)
    }

    fn parse_syslog(&self, line: &str) -> Option<Parsed> {
        let (priority, rest) = match line.strip_prefix('<') {
            Some(after) => {
                let end = after.find('>')?;
                let priority: u8 = after[..end].parse().ok().filter(|p| *p <= 191)?;
                (Some(priority), &after[end + 1..])
            }
            None => (None, line),
        };
        let mut parsed = if let Some(rest5424) = rest.strip_prefix("1 ") {
            parse_5424(rest5424)?
        } else {
            self.parse_3164(rest)?
        };
        if let Some(priority) = priority {
            parsed.level = Some(severity_level(priority & 7));
            parsed.fields.insert(0, ("facility".into(), (priority >> 3).to_string()));
        }
        Some(parsed)
    }

    fn parse_3164(&self, rest: &str) -> Option<Parsed> {
        // "Jun 14 15:16:01 combo sshd(pam_unix)[19939]: message", or the
        // same with an RFC 3339 time, as rsyslog's RSYSLOG_ForwardFormat
        // and syslog-ng send it.
        let stamp = rest.get(..15)?;
        let bytes = stamp.as_bytes();
        if bytes[3] != b' ' || bytes[6] != b' ' || bytes[9] != b':' || bytes[12] != b':' {
            let (stamp, after) = rest.split_once(' ')?;
            let timestamp = OffsetDateTime::parse(stamp, &Rfc3339).ok().and_then(to_ns)?;
            let parsed = Parsed { timestamp_ns: Some(timestamp), ..Parsed::default() };
            return header_3164(parsed, after);
        }
        // The checks above make every slice below fall on ASCII.
        const MONTHS: [&str; 12] =
            ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let month = MONTHS.iter().position(|m| *m == &stamp[..3])?;
        let month = time::Month::try_from(month as u8 + 1).ok()?;
        let day: u8 = stamp[4..6].trim_start().parse().ok()?;
        let two = |at: usize| stamp[at..at + 2].parse::<u8>().ok();
        let clock = time::Time::from_hms(two(7)?, two(10)?, two(13)?).ok()?;
        let parse = |year: i32| {
            time::Date::from_calendar_date(year, month, day)
                .ok()
                .map(|date| PrimitiveDateTime::new(date, clock))
        };
        let parsed = Parsed { timestamp_ns: Some(self.with_inferred_year(parse)?), ..Parsed::default() };
        header_3164(parsed, rest.get(16..)?)
    }
}

/// The part of an RFC 3164 line after its time: `HOST TAG[PID]: MSG`.
fn header_3164(mut parsed: Parsed, after: &str) -> Option<Parsed> {
    let (host, after) = after.split_once(' ')?;
    let after = after.trim_start();
    parsed.fields.push(("hostname".into(), host.to_owned()));
    if let Some((tag, _message)) = after.split_once(": ") {
        let (app, pid) = match tag.rfind('[') {
            Some(open) if tag.ends_with(']') => (&tag[..open], Some(&tag[open + 1..tag.len() - 1])),
            _ => (tag, None),
        };
        // A tag is short; a longer "x: y" is part of the message.
        if app.len() <= 48 {
            parsed.fields.push(("appname".into(), app.to_owned()));
            if let Some(pid) = pid {
                parsed.fields.push(("procid".into(), pid.to_owned()));
            }
        }
    }
    Some(parsed)
}

fn to_ns(time: OffsetDateTime) -> Option<i64> {
    i64::try_from(time.unix_timestamp_nanos()).ok()
}

fn parse_offset(text: &str) -> Option<UtcOffset> {
    let sign = match text.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (hours, minutes) = text[1..].split_once(':')?;
    let hours: u8 = hours.parse().ok().filter(|h| *h <= 25)?;
    let minutes: u8 = minutes.parse().ok().filter(|m| *m <= 59)?;
    UtcOffset::from_hms(sign * hours as i8, sign * minutes as i8, 0).ok()
}

/// RFC 3339, or a number of seconds or milliseconds since the epoch.
fn parse_common_time(text: &str, _offset: UtcOffset) -> Option<i64> {
    if let Ok(time) = OffsetDateTime::parse(text, &Rfc3339) {
        return to_ns(time);
    }
    let number: f64 = text.parse().ok()?;
    // Values past 1e11 are milliseconds (1e11 seconds is the year 5138).
    let seconds = if number.abs() >= 1e11 { number / 1000.0 } else { number };
    let ns = seconds * 1e9;
    (ns.is_finite() && ns.abs() < 9.2e18).then_some(ns as i64)
}

fn severity_level(severity: u8) -> Level {
    match severity {
        0..=2 => Level::Fatal,
        3 => Level::Error,
        4 => Level::Warn,
        5 | 6 => Level::Info,
        _ => Level::Debug,
    }
}

fn parse_5424(rest: &str) -> Option<Parsed> {
    // TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG
    let mut parts = rest.splitn(6, ' ');
    let timestamp = parts.next()?;
    let names = ["hostname", "appname", "procid", "msgid"];
    let mut parsed = Parsed {
        timestamp_ns: if timestamp == "-" { None } else { parse_common_time(timestamp, UtcOffset::UTC) },
        ..Parsed::default()
    };
    if timestamp != "-" && parsed.timestamp_ns.is_none() {
        return None;
    }
    for name in names {
        let value = parts.next()?;
        if value != "-" {
            parsed.fields.push((name.to_owned(), value.to_owned()));
        }
    }
    Some(parsed)
}

fn parse_json(line: &str) -> Option<Parsed> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let object = value.as_object()?;
    let mut parsed = Parsed::default();
    let mut flat = Vec::new();
    flatten("", object, &mut flat);
    for (key, value) in flat {
        match key.as_str() {
            "timestamp" | "@timestamp" | "time" | "ts" if parsed.timestamp_ns.is_none() => {
                parsed.timestamp_ns = parse_common_time(&value, UtcOffset::UTC);
                if parsed.timestamp_ns.is_none() {
                    parsed.fields.push((key, value));
                }
            }
            "level" | "severity" | "lvl" | "log.level" | "loglevel" if parsed.level.is_none() => {
                parsed.level = Level::from_word(&value);
            }
            _ => parsed.fields.push((key, value)),
        }
    }
    Some(parsed)
}

fn flatten(
    prefix: &str,
    object: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<(String, String)>,
) {
    for (key, value) in object {
        if out.len() >= MAX_FIELDS {
            return;
        }
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            serde_json::Value::Object(inner) => flatten(&name, inner, out),
            serde_json::Value::String(text) => out.push((name, text.clone())),
            serde_json::Value::Null => {}
            other => out.push((name, other.to_string())),
        }
    }
}

fn parse_logfmt(line: &str) -> Option<Parsed> {
    let mut parsed = Parsed::default();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = &rest[..eq];
        if key.is_empty() || key.contains(char::is_whitespace) || key.contains('"') {
            return None;
        }
        rest = &rest[eq + 1..];
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end?;
            value = quoted[..end].replace("\\\"", "\"");
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            value = rest[..end].to_owned();
            rest = rest[end..].trim_start();
        }
        match key {
            "time" | "ts" | "timestamp" if parsed.timestamp_ns.is_none() => {
                parsed.timestamp_ns = parse_common_time(&value, UtcOffset::UTC);
            }
            "level" | "lvl" | "severity" if parsed.level.is_none() => parsed.level = Level::from_word(&value),
            _ => parsed.fields.push((key.to_owned(), value)),
        }
    }
    (!parsed.fields.is_empty() || parsed.timestamp_ns.is_some()).then_some(parsed)
}

fn parse_apache(line: &str) -> Option<Parsed> {
    // host ident user [10/Oct/2000:13:55:36 -0700] "GET /x HTTP/1.0" 200 2326 ["referer" "agent"]
    let (host, rest) = line.split_once(' ')?;
    let (ident, rest) = rest.split_once(' ')?;
    let (user, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once("] ")?;
    let format = time::macros::format_description!(
        "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]"
    );
    let time = OffsetDateTime::parse(stamp, &format).ok()?;
    let rest = rest.strip_prefix('"')?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut words = rest.split(' ');
    let status = words.next()?;
    let bytes = words.next()?;
    let status_code: u16 = status.parse().ok()?;
    let mut parsed = Parsed { timestamp_ns: to_ns(time), ..Parsed::default() };
    parsed.level = Some(match status_code {
        500.. => Level::Error,
        400..=499 => Level::Warn,
        _ => Level::Info,
    });
    let mut push = |name: &str, value: &str| {
        if value != "-" {
            parsed.fields.push((name.to_owned(), value.to_owned()));
        }
    };
    push("client", host);
    push("ident", ident);
    push("user", user);
    let mut request_parts = request.splitn(3, ' ');
    push("method", request_parts.next().unwrap_or("-"));
    push("path", request_parts.next().unwrap_or("-"));
    push("protocol", request_parts.next().unwrap_or("-"));
    push("status", status);
    push("bytes", bytes);
    let tail: String = words.collect::<Vec<_>>().join(" ");
    let quoted: Vec<&str> = tail.split('"').collect();
    if quoted.len() >= 4 {
        push("referer", quoted[1]);
        push("user_agent", quoted[3]);
    }
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(text: &str) -> i64 {
        to_ns(OffsetDateTime::parse(text, &Rfc3339).unwrap()).unwrap()
    }

    #[test]
    fn json_lines() {
        let parser = Parser::new(ParserKind::Json, None, None, None).unwrap();
        let parsed = parser.parse(
            r#"{"ts":"2024-05-01T10:00:00Z","level":"WARNING","msg":"disk","ctx":{"dev":"sda","pct":91}}"#,
        );
        assert_eq!(parsed.timestamp_ns, Some(ns("2024-05-01T10:00:00Z")));
        assert_eq!(parsed.level, Some(Level::Warn));
        assert_eq!(
            parsed.fields,
            vec![
                ("ctx.dev".into(), "sda".into()),
                ("ctx.pct".into(), "91".into()),
                ("msg".into(), "disk".into())
            ]
        );
    }

    #[test]
    fn logfmt_lines() {
        let parser = Parser::new(ParserKind::Logfmt, None, None, None).unwrap();
        let parsed = parser.parse(r#"time=1714557600 level=error msg="no \"space\" left" dev=sda"#);
        assert_eq!(parsed.timestamp_ns, Some(ns("2024-05-01T10:00:00Z")));
        assert_eq!(parsed.level, Some(Level::Error));
        assert_eq!(
            parsed.fields,
            vec![("msg".into(), "no \"space\" left".into()), ("dev".into(), "sda".into())]
        );
    }

    #[test]
    fn syslog_5424_and_3164() {
        let parser = Parser::new(ParserKind::Syslog, None, None, None).unwrap();
        let parsed =
            parser.parse("<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - 'su root' failed");
        assert_eq!(parsed.timestamp_ns, Some(ns("2003-10-11T22:14:15.003Z")));
        assert_eq!(parsed.level, Some(Level::Fatal));
        assert!(parsed.fields.contains(&("appname".into(), "su".into())));
        // rsyslog's RSYSLOG_ForwardFormat: an RFC 3164 header with an RFC 3339 time.
        let parsed = parser.parse("<13>2026-11-24T09:30:00.123456+01:00 web-1 app[42]: hello there");
        assert_eq!(parsed.timestamp_ns, Some(ns("2026-11-24T08:30:00.123456Z")));
        assert_eq!(parsed.level, Some(Level::Info));
        assert!(parsed.fields.contains(&("appname".into(), "app".into())));
        assert!(parsed.fields.contains(&("procid".into(), "42".into())));
        assert!(parsed.fields.contains(&("hostname".into(), "web-1".into())));
        let parsed =
            parser.parse("Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user webmaster from 173.234.31.186");
        // No year in the line: this year, or last year if that is in the future.
        let now = OffsetDateTime::now_utc();
        let this_year = ns(&format!("{}-12-10T06:55:46Z", now.year()));
        let expected = if this_year > to_ns(now + time::Duration::days(1)).unwrap() {
            ns(&format!("{}-12-10T06:55:46Z", now.year() - 1))
        } else {
            this_year
        };
        assert_eq!(parsed.timestamp_ns, Some(expected));
        assert_eq!(
            parsed.fields,
            vec![
                ("hostname".into(), "LabSZ".into()),
                ("appname".into(), "sshd".into()),
                ("procid".into(), "24200".into())
            ]
        );
    }

    #[test]
    fn apache_combined() {
        let parser = Parser::new(ParserKind::Apache, None, None, None).unwrap();
        let line = r#"127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 503 2326 "http://x/" "Mozilla/4.08""#;
        let parsed = parser.parse(line);
        assert_eq!(parsed.timestamp_ns, Some(ns("2000-10-10T20:55:36Z")));
        assert_eq!(parsed.level, Some(Level::Error));
        assert!(parsed.fields.contains(&("path".into(), "/apache_pb.gif".into())));
        assert!(parsed.fields.contains(&("user_agent".into(), "Mozilla/4.08".into())));
    }

    #[test]
    fn auto_picks_the_format() {
        let parser = Parser::new(ParserKind::Auto, None, None, None).unwrap();
        assert!(parser.parse(r#"{"level":"info"}"#).level == Some(Level::Info));
        assert!(parser.parse("a=1 b=2").fields.len() == 2);
        assert!(parser.parse("just words, no structure").fields.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn no_parser_panics_on_any_line(line in ".{0,200}") {
            for kind in [ParserKind::None, ParserKind::Auto, ParserKind::Json, ParserKind::Logfmt, ParserKind::Syslog, ParserKind::Apache] {
                let _ = Parser::new(kind, None, None, None).unwrap().parse(&line);
            }
            let regex = Parser::new(ParserKind::Regex, Some(r"^(?P<timestamp>\S+) (?P<level>\w+) (?P<rest>.*)"), Some("[year]-[month]-[day]"), None).unwrap();
            let _ = regex.parse(&line);
        }

        #[test]
        fn syslog_lookalikes_never_panic(prefix in "(<[0-9]{1,3}>)?(1 )?", stamp in "[A-Z][a-z]{2} [ 0-9][0-9] [0-9:]{8}", rest in ".{0,40}") {
            let line = format!("{prefix}{stamp}{rest}");
            let _ = Parser::new(ParserKind::Syslog, None, None, None).unwrap().parse(&line);
        }
    }

    #[test]
    fn redaction_replaces_every_match_and_keeps_the_rest() {
        let redactor = Redactor::new(&[
            RedactRule { pattern: r"password=\S+".into(), replacement: "password=<redacted>".into() },
            RedactRule { pattern: r"\b\d{4}-\d{4}-\d{4}-\d{4}\b".into(), replacement: default_replacement() },
        ])
        .unwrap();
        let (line, changed) = redactor.apply("login password=hunter2 card 1234-5678-9012-3456 ok");
        assert!(changed);
        assert_eq!(line, "login password=<redacted> card <redacted> ok");
        let (line, changed) = redactor.apply("nothing secret");
        assert!(!changed && matches!(line, std::borrow::Cow::Borrowed(_)));
        assert!(Redactor::new(&[RedactRule { pattern: "(".into(), replacement: String::new() }]).is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(matches!(Parser::new(ParserKind::Regex, None, None, None), Err(ParserError::MissingPattern)));
        assert!(matches!(
            Parser::new(ParserKind::Regex, Some("(?P<x"), None, None),
            Err(ParserError::Pattern(_))
        ));
        assert!(matches!(
            Parser::new(ParserKind::None, None, Some("[nonsense"), None),
            Err(ParserError::Format { .. })
        ));
        assert!(matches!(
            Parser::new(ParserKind::None, None, None, Some("Mars")),
            Err(ParserError::Timezone(_))
        ));
    }
}
