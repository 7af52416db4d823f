//! Writes the seed inputs into `DIR/<target>/` (default `fuzz/corpus`), where
//! cargo fuzz starts from them.

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into());
    let mut counts = std::collections::BTreeMap::new();
    for (target, bytes) in logvault_fuzz::seeds() {
        let n = counts.entry(target).or_insert(0usize);
        let target_dir = std::path::Path::new(&dir).join(target);
        std::fs::create_dir_all(&target_dir).unwrap_or_else(|e| panic!("{}: {e}", target_dir.display()));
        let path = target_dir.join(format!("seed-{n}"));
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        *n += 1;
    }
    for (target, n) in counts {
        println!("{target}: {n} seeds");
    }
}
