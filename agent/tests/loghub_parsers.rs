//! Every line of the eight loghub samples, parsed as an operator would
//! configure the agent for it, against the ground truth in
//! `shared/data/loghub/*_structured.csv`: the parsed time and level of each
//! line match, and so do the fields the CSV names.

use std::path::PathBuf;

use logvault_agent::parse::{Parser, ParserKind};
use logvault_storage::Level;
use time::OffsetDateTime;

fn loghub() -> PathBuf {
    std::env::var_os("LOGVAULT_LOGHUB")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/loghub"))
}

/// The CSV's rows as maps from column name to value (RFC 4180 quoting).
fn ground_truth(name: &str) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(loghub().join(format!("{name}_2k.log_structured.csv"))).unwrap();
    let mut rows = Vec::new();
    let mut field = String::new();
    let mut row = Vec::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            ('\r', false) => {}
            (c, _) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    let header = rows.remove(0);
    rows.into_iter().map(|r| header.iter().cloned().zip(r).collect()).collect()
}

fn lines(name: &str) -> Vec<String> {
    let bytes = std::fs::read(loghub().join(format!("{name}_2k.log"))).unwrap();
    String::from_utf8_lossy(&bytes).lines().map(str::to_owned).collect()
}

fn format_ns(ns: i64, format: &str) -> String {
    let format = time::format_description::parse_owned::<2>(format).unwrap();
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)).unwrap().format(&format).unwrap()
}

struct Case {
    name: &'static str,
    parser: Parser,
    /// How the parsed time is written to compare with the CSV.
    shown_as: &'static str,
    /// The CSV's time, from its columns.
    csv_time: fn(&std::collections::HashMap<String, String>) -> String,
    /// The CSV column holding the level, if it has one.
    level_column: Option<&'static str>,
    /// Parsed fields that must equal CSV columns.
    fields: &'static [(&'static str, &'static str)],
}

fn regex(pattern: &str, format: &str) -> Parser {
    Parser::new(ParserKind::Regex, Some(pattern), Some(format), None).unwrap()
}

fn cases() -> Vec<Case> {
    let syslog = Parser::new(ParserKind::Syslog, None, None, None).unwrap();
    vec![
        Case {
            name: "HDFS",
            parser: regex(
                r"^(?P<timestamp>\d{6} \d{6}) (?P<pid>\d+) (?P<level>\w+) (?P<component>[^:]+): ",
                "[year repr:last_two][month][day] [hour][minute][second]",
            ),
            shown_as: "[year repr:last_two][month][day] [hour][minute][second]",
            csv_time: |row| format!("{} {}", row["Date"], row["Time"]),
            level_column: Some("Level"),
            fields: &[("pid", "Pid"), ("component", "Component")],
        },
        Case {
            name: "Hadoop",
            parser: regex(
                r"^(?P<timestamp>\S+ \S+) (?P<level>\w+) \[(?P<process>[^\]]*)\] (?P<component>\S+): ",
                "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond]",
            ),
            shown_as: "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond digits:3]",
            csv_time: |row| format!("{} {}", row["Date"], row["Time"]),
            level_column: Some("Level"),
            fields: &[("process", "Process"), ("component", "Component")],
        },
        Case {
            name: "Spark",
            parser: regex(
                r"^(?P<timestamp>\S+ \S+) (?P<level>\w+) (?P<component>[^:]+): ",
                "[year repr:last_two]/[month]/[day] [hour]:[minute]:[second]",
            ),
            shown_as: "[year repr:last_two]/[month]/[day] [hour]:[minute]:[second]",
            csv_time: |row| format!("{} {}", row["Date"], row["Time"]),
            level_column: Some("Level"),
            fields: &[("component", "Component")],
        },
        Case {
            name: "Zookeeper",
            parser: regex(
                r"^(?P<timestamp>\S+ \S+) - (?P<level>\w+)\s+\[(?P<node>[^:]*):(?P<component>[^@]*)@(?P<id>\d+)\] - ",
                "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond]",
            ),
            shown_as: "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond digits:3]",
            csv_time: |row| format!("{} {}", row["Date"], row["Time"]),
            level_column: Some("Level"),
            fields: &[("node", "Node"), ("component", "Component"), ("id", "Id")],
        },
        Case {
            name: "BGL",
            parser: regex(
                r"^(?P<label>\S+) (?P<epoch>\d+) (?P<date>\S+) (?P<node>\S+) (?P<timestamp>\S+) \S+ (?P<type>\S+) (?P<component>\S+) (?P<level>\S+) ",
                "[year]-[month]-[day]-[hour].[minute].[second].[subsecond]",
            ),
            shown_as: "[year]-[month]-[day]-[hour].[minute].[second].[subsecond digits:6]",
            csv_time: |row| row["Time"].clone(),
            level_column: Some("Level"),
            fields: &[("node", "Node"), ("type", "Type"), ("component", "Component")],
        },
        Case {
            name: "Apache",
            parser: regex(
                r"^\[(?P<timestamp>[^\]]+)\] \[(?P<level>\w+)\] ",
                "[weekday repr:short] [month repr:short] [day] [hour]:[minute]:[second] [year]",
            ),
            shown_as: "[weekday repr:short] [month repr:short] [day] [hour]:[minute]:[second] [year]",
            csv_time: |row| row["Time"].clone(),
            level_column: Some("Level"),
            fields: &[],
        },
        Case {
            name: "Linux",
            parser: syslog.clone(),
            shown_as: "[month repr:short] [day padding:none] [hour]:[minute]:[second]",
            csv_time: |row| format!("{} {} {}", row["Month"], row["Date"], row["Time"]),
            level_column: None,
            // This CSV calls the host "Level" and the tag "Component".
            fields: &[("hostname", "Level"), ("appname", "Component"), ("procid", "PID")],
        },
        Case {
            name: "OpenSSH",
            parser: syslog,
            shown_as: "[month repr:short] [day padding:none] [hour]:[minute]:[second]",
            csv_time: |row| format!("{} {} {}", row["Date"], row["Day"], row["Time"]),
            level_column: None,
            fields: &[("hostname", "Component"), ("procid", "Pid")],
        },
    ]
}

#[test]
fn every_loghub_line_parses_to_its_ground_truth() {
    for case in cases() {
        let lines = lines(case.name);
        let truth = ground_truth(case.name);
        assert_eq!(lines.len(), 2000, "{}", case.name);
        assert_eq!(truth.len(), 2000, "{}", case.name);
        for (number, (line, row)) in lines.iter().zip(&truth).enumerate() {
            let parsed = case.parser.parse(line);
            let context = format!("{} line {}: {line}", case.name, number + 1);
            let time = parsed.timestamp_ns.unwrap_or_else(|| panic!("no time in {context}"));
            assert_eq!(format_ns(time, case.shown_as), (case.csv_time)(row), "time of {context}");
            if let Some(column) = case.level_column {
                let want = Level::from_word(&row[column]).unwrap_or(Level::Unknown);
                assert_eq!(parsed.level, Some(want), "level of {context}");
            }
            for (field, column) in case.fields {
                let got = parsed.fields.iter().find(|(name, _)| name == field).map(|(_, v)| v.as_str());
                // An empty CSV cell means the line has no such part.
                assert_eq!(got.unwrap_or(""), row[*column].as_str(), "field {field} of {context}");
            }
        }
    }
}
