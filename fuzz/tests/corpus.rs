//! Every fuzz target on its seeds, on every input a fuzzer once crashed on
//! (`fuzz/regressions/<target>/`), and on a few thousand deterministic
//! mutations of the seeds: the quick pass the normal test run makes; the
//! coverage-guided runs are `fuzz/run`.

use std::collections::BTreeMap;

fn by_target() -> BTreeMap<&'static str, Vec<Vec<u8>>> {
    let mut seeds: BTreeMap<&'static str, Vec<Vec<u8>>> = BTreeMap::new();
    for (target, bytes) in logvault_fuzz::seeds() {
        seeds.entry(target).or_default().push(bytes);
    }
    seeds
}

#[test]
fn every_target_has_seeds_and_takes_them() {
    let seeds = by_target();
    for (name, run) in logvault_fuzz::TARGETS {
        let inputs = seeds.get(name).unwrap_or_else(|| panic!("no seeds for {name}"));
        for input in inputs {
            run(input);
        }
    }
}

#[test]
fn every_input_a_fuzzer_crashed_on_is_handled() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut replayed = 0;
    for (name, run) in logvault_fuzz::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(name)) else { continue };
        for entry in dir {
            let path = entry.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
    }
    println!("{replayed} regression inputs replayed");
}

/// xorshift: the same mutations on every run.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Flips, overwrites with boundary values, inserts, deletes, truncates.
    fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + self.next() % 4 {
            let at = if out.is_empty() { 0 } else { self.next() as usize % out.len() };
            match self.next() % 6 {
                0 if !out.is_empty() => out[at] ^= 1 << (self.next() % 8),
                1 if !out.is_empty() => out[at] = [0, 0x7f, 0x80, 0xff][self.next() as usize % 4],
                2 => out.insert(at, self.next() as u8),
                3 if !out.is_empty() => {
                    out.remove(at);
                }
                4 => out.truncate(at),
                _ => {
                    let end = (at + 4).min(out.len());
                    out[at..end].fill(0xff);
                }
            }
        }
        out
    }
}

#[test]
fn no_target_panics_on_mutated_seeds() {
    let seeds = by_target();
    let mut mutator = Mutator(0x9e37_79b9_7f4a_7c15);
    for (name, run) in logvault_fuzz::TARGETS {
        for seed in &seeds[name] {
            for _ in 0..300 {
                let input = mutator.mutate(seed);
                if std::panic::catch_unwind(|| run(&input)).is_err() {
                    panic!("{name} panicked on {:?}", String::from_utf8_lossy(&input));
                }
            }
        }
    }
}
