//! The record model: what one log line becomes.
//!
//! An agent fills a [`WireRecord`] (timestamp, level, message, parsed
//! fields); the collector adds what only it can vouch for (tenant, the host
//! from the client certificate, the source and sequence number from the
//! signed batch header, the time it received the batch).

use std::fmt;

/// Flag: the line was longer than `max_line_bytes` and was cut; the rest of
/// it follows in the next record (split) or was discarded (truncate).
pub const FLAG_TRUNCATED: u8 = 0b0000_0001;
/// Flag: this record continues a line that was split at `max_line_bytes`.
pub const FLAG_CONTINUED: u8 = 0b0000_0010;
/// Flag: the line held invalid UTF-8, replaced by U+FFFD.
pub const FLAG_INVALID_UTF8: u8 = 0b0000_0100;

/// A normalised severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// No level was found in the line.
    Unknown,
    /// trace, finest
    Trace,
    /// debug, fine
    Debug,
    /// info, notice
    Info,
    /// warn, warning
    Warn,
    /// error, err, severe, failure
    Error,
    /// fatal, critical, alert, emerg, panic
    Fatal,
}

impl Level {
    /// The byte this level is encoded as on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            Level::Unknown => 0,
            Level::Trace => 1,
            Level::Debug => 2,
            Level::Info => 3,
            Level::Warn => 4,
            Level::Error => 5,
            Level::Fatal => 6,
        }
    }

    /// The level a wire byte names, `None` for a byte no version defines.
    pub fn from_byte(byte: u8) -> Option<Level> {
        Some(match byte {
            0 => Level::Unknown,
            1 => Level::Trace,
            2 => Level::Debug,
            3 => Level::Info,
            4 => Level::Warn,
            5 => Level::Error,
            6 => Level::Fatal,
            _ => return None,
        })
    }

    /// The normalised name, as stored in the index and shown in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Unknown => "unknown",
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
            Level::Fatal => "fatal",
        }
    }

    /// Normalises a level word as logging libraries and syslog spell it
    /// (`WARNING`, `err`, `CRIT`, ...); `None` when the word is no level.
    pub fn from_word(word: &str) -> Option<Level> {
        const WORDS: &[(&str, Level)] = &[
            ("trace", Level::Trace),
            ("finest", Level::Trace),
            ("debug", Level::Debug),
            ("fine", Level::Debug),
            ("info", Level::Info),
            ("information", Level::Info),
            ("notice", Level::Info),
            ("warn", Level::Warn),
            ("warning", Level::Warn),
            ("error", Level::Error),
            ("err", Level::Error),
            ("severe", Level::Error),
            ("failure", Level::Error),
            ("fatal", Level::Fatal),
            ("crit", Level::Fatal),
            ("critical", Level::Fatal),
            ("alert", Level::Fatal),
            ("emerg", Level::Fatal),
            ("panic", Level::Fatal),
        ];
        WORDS.iter().find(|(name, _)| name.eq_ignore_ascii_case(word)).map(|(_, level)| *level)
    }

    /// Finds the level of a raw line: the first of its first eight words
    /// (runs of ASCII letters, taken whole) that names a level. Good enough
    /// for log4j, syslog-style and bracketed `[error]` layouts; structured
    /// parsers set the level from their own field instead.
    pub fn sniff(line: &str) -> Level {
        let bytes = line.as_bytes();
        let mut at = 0;
        for _ in 0..8 {
            while at < bytes.len() && !bytes[at].is_ascii_alphabetic() {
                at += 1;
            }
            if at == bytes.len() {
                break;
            }
            let from = at;
            while at < bytes.len() && bytes[at].is_ascii_alphabetic() {
                at += 1;
            }
            let word = &bytes[from..at];
            // Level names are 3 to 11 letters. Only upper-case words or
            // bracketed ones are levels: "error" inside prose is not a
            // severity.
            if !(3..=11).contains(&word.len()) {
                continue;
            }
            let upper = word.iter().all(u8::is_ascii_uppercase);
            let bracketed = from > 0 && bytes[from - 1] == b'[' && bytes.get(at) == Some(&b']');
            if (upper || bracketed)
                && let Some(level) = Level::from_word(&line[from..at])
            {
                return level;
            }
        }
        Level::Unknown
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record as the agent ships it inside a signed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    /// When the event happened, in nanoseconds since the Unix epoch: parsed
    /// from the line when the parser finds a time, else the time it was read.
    pub timestamp_ns: i64,
    /// The normalised severity.
    pub level: Level,
    /// `FLAG_*` bits saying what the agent did to the line.
    pub flags: u8,
    /// The original line, without its line terminator.
    pub message: String,
    /// Structured fields a parser found, in the order found.
    pub fields: Vec<(String, String)>,
}

impl WireRecord {
    /// A record with no flags and no fields.
    pub fn new(timestamp_ns: i64, level: Level, message: impl Into<String>) -> Self {
        Self { timestamp_ns, level, flags: 0, message: message.into(), fields: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_bytes_round_trip() {
        for byte in 0..=255u8 {
            if let Some(level) = Level::from_byte(byte) {
                assert_eq!(level.to_byte(), byte);
            }
        }
        assert_eq!(Level::from_byte(7), None);
    }

    #[test]
    fn sniff_finds_the_levels_of_the_loghub_layouts() {
        assert_eq!(
            Level::sniff("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1"),
            Level::Info
        );
        assert_eq!(
            Level::sniff("[Sun Dec 04 04:47:44 2005] [error] mod_jk child workerEnv in error state 6"),
            Level::Error
        );
        assert_eq!(Level::sniff("2015-10-18 18:01:47,978 WARN [main] org.apache.hadoop: x"), Level::Warn);
        assert_eq!(Level::sniff("an error occurred while reading"), Level::Unknown);
    }
}
