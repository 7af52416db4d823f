//! Realistic log lines in any number, from the loghub samples.
//!
//! Each sample's templates (`*_templates.csv`, with `<*>` where a value
//! goes) are filled with values seen in that slot of the same template in
//! the sample's structured CSV, and the line gets the header (time, level,
//! component...) of a real line of the same event. Events come at the
//! frequency they have in the sample. The same seed gives the same lines.

use std::collections::HashMap;

use crate::{SAMPLES, loghub_dir, loghub_ground_truth};

/// One event of one sample: its template and what fills it.
struct Event {
    /// The template split at each `<*>`.
    pieces: Vec<String>,
    /// Values seen in each slot.
    slots: Vec<Vec<String>>,
    /// Real lines of this event: the header before the content, and the level.
    headers: Vec<(String, String)>,
}

struct Sample {
    name: &'static str,
    events: Vec<Event>,
    /// Event indices, repeated by their count in the sample.
    weighted: Vec<usize>,
}

/// A generated line.
#[derive(Debug, Clone)]
pub struct Line {
    /// The sample it imitates (`HDFS_2k.log`, ...).
    pub sample: &'static str,
    /// The level the CSV gives its event's line (may be empty).
    pub level: String,
    /// The whole line.
    pub text: String,
}

/// Generates lines like the loghub samples'.
pub struct Generator {
    samples: Vec<Sample>,
    state: u64,
}

/// Values in `content` at the template's `<*>` slots, if it matches.
fn slot_values(pieces: &[String], content: &str) -> Option<Vec<String>> {
    let mut rest = content.strip_prefix(pieces[0].as_str())?;
    let mut values = Vec::new();
    for (i, piece) in pieces.iter().enumerate().skip(1) {
        let last = i == pieces.len() - 1;
        let end = if piece.is_empty() {
            if last { rest.len() } else { 0 }
        } else if last {
            rest.len().checked_sub(piece.len()).filter(|&at| rest[at..] == **piece)?
        } else {
            rest.find(piece.as_str())?
        };
        values.push(rest[..end].to_owned());
        rest = &rest[end + piece.len()..];
    }
    Some(values)
}

impl Generator {
    /// Loads the eight samples; `seed` fixes the sequence.
    pub fn new(seed: u64) -> Generator {
        let mut samples = Vec::new();
        for name in SAMPLES {
            let raw = std::fs::read(loghub_dir().join(name)).unwrap();
            let raw_lines: Vec<String> = String::from_utf8_lossy(&raw).lines().map(str::to_owned).collect();
            let rows = loghub_ground_truth(name);
            let mut by_id: HashMap<String, usize> = HashMap::new();
            let mut events: Vec<Event> = Vec::new();
            let mut weighted = Vec::new();
            for (row, line) in rows.iter().zip(&raw_lines) {
                let (Some(id), Some(template), Some(content)) =
                    (row.get("EventId"), row.get("EventTemplate"), row.get("Content"))
                else {
                    continue;
                };
                let index = *by_id.entry(id.clone()).or_insert_with(|| {
                    let pieces: Vec<String> = template.split("<*>").map(str::to_owned).collect();
                    events.push(Event {
                        slots: vec![Vec::new(); pieces.len() - 1],
                        pieces,
                        headers: Vec::new(),
                    });
                    events.len() - 1
                });
                let event = &mut events[index];
                if let Some(values) = slot_values(&event.pieces, content) {
                    for (slot, value) in event.slots.iter_mut().zip(values) {
                        slot.push(value);
                    }
                }
                if let Some(header) = line.strip_suffix(content.as_str()) {
                    event.headers.push((header.to_owned(), row.get("Level").cloned().unwrap_or_default()));
                }
                weighted.push(index);
            }
            events.iter_mut().for_each(|e| e.slots.iter_mut().for_each(|s| s.push(String::new())));
            weighted.retain(|&i| !events[i].headers.is_empty());
            samples.push(Sample { name, events, weighted });
        }
        Generator { samples, state: seed.max(1) }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: fast, deterministic, good enough to pick values.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick(&mut self, len: usize) -> usize {
        (self.next_u64() % len as u64) as usize
    }

    /// The next line.
    pub fn line(&mut self) -> Line {
        let sample = self.pick(self.samples.len());
        let pick = self.pick(self.samples[sample].weighted.len());
        let event = self.samples[sample].weighted[pick];
        let header = self.pick(self.samples[sample].events[event].headers.len());
        let picks: Vec<usize> = (0..self.samples[sample].events[event].slots.len())
            .map(|slot| self.pick(self.samples[sample].events[event].slots[slot].len()))
            .collect();
        let chosen = &self.samples[sample];
        let event = &chosen.events[event];
        let (head, level) = &event.headers[header];
        let mut text = head.clone();
        text.push_str(&event.pieces[0]);
        for (slot, piece) in event.pieces.iter().enumerate().skip(1) {
            text.push_str(&event.slots[slot - 1][picks[slot - 1]]);
            text.push_str(piece);
        }
        Line { sample: chosen.name, level: level.clone(), text }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_read_back_from_real_content() {
        let pieces: Vec<String> =
            "<*>:<*> Served block blk_<*> to /<*>".split("<*>").map(str::to_owned).collect();
        let values = slot_values(&pieces, "10.0.0.1:50010 Served block blk_-123 to /10.0.0.2").unwrap();
        assert_eq!(values, ["10.0.0.1", "50010", "-123", "10.0.0.2"]);
        assert!(slot_values(&pieces, "something else").is_none());
    }

    #[test]
    fn lines_look_like_the_samples_and_repeat_with_the_seed() {
        let mut a = Generator::new(7);
        let mut b = Generator::new(7);
        let lines: Vec<Line> = (0..2000).map(|_| a.line()).collect();
        for line in &lines {
            assert_eq!(line.text, b.line().text);
            assert!(!line.text.is_empty());
        }
        let samples: std::collections::HashSet<&str> = lines.iter().map(|l| l.sample).collect();
        assert_eq!(samples.len(), 8);
        let hdfs = lines.iter().find(|l| l.sample == "HDFS_2k.log").unwrap();
        assert!(hdfs.text.chars().take(6).all(|c| c.is_ascii_digit()), "{}", hdfs.text);
        let distinct: std::collections::HashSet<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert!(distinct.len() > 1500, "{} distinct of 2000", distinct.len());
    }
}
