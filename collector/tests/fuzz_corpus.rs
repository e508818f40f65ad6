//! Replays the fuzz corpus (`collector/fuzz/corpus/<target>/`) through the fuzz targets on stable:
//! every input found or seeded so far must still decode, convert and round-trip without a panic.

use std::path::Path;

/// A fuzz target: takes any bytes, must not panic.
type Target = fn(&[u8]);

#[test]
fn the_fuzz_corpus_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus");
    let targets: [(&str, Target); 3] =
        [("otlp_protobuf", collector::fuzz::otlp_protobuf), ("otlp_json", collector::fuzz::otlp_json), ("codec", collector::fuzz::codec)];
    for (name, target) in targets {
        let dir = root.join(name);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("{name} panics on {}", path.display());
            }
            n += 1;
        }
        assert!(n >= 3, "{name}: the corpus has {n} inputs; it is seeded from real SDK exports");
    }
}
