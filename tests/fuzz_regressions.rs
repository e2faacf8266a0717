//! Replays the fuzz seeds (`fuzz/seeds/<target>/`) and every input a fuzz run ever crashed on
//! (`fuzz/regressions/<target>/`) through the checks the fuzz targets run (`fuzz/checks.rs`), so
//! a fixed crash stays fixed under plain `cargo test`, without cargo-fuzz or a nightly compiler.
//!
//! `make fuzz` runs the fuzzers themselves; a crash it finds goes into `fuzz/regressions/`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};
use std::panic;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            if path.is_file() && !path.file_name().unwrap().to_string_lossy().starts_with('.') {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no seeds for fuzz target {target}");
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs fail (messages above):\n{}", failed.len(), files.len(), failed.join("\n"));
}

#[test]
fn narinfo() {
    replay("narinfo", checks::narinfo);
}

#[test]
fn request_path() {
    replay("request_path", checks::request_path);
}

#[test]
fn parsers() {
    replay("parsers", checks::parsers);
}
