//! The bounded fuzz run of CI, on stable Rust: every fuzz target's entry point (the
//! same functions the libFuzzer targets in `fuzz/` call) runs over its seed corpus
//! (`fuzz/corpus/<target>`), over every input that once crashed it
//! (`fuzz/regressions/<target>`), and over a fixed number of deterministic mutations
//! of each seed (bit flips, overwritten lengths, cuts, repeats). An input that
//! panics is written to a temporary file whose path the failure names, so that
//! `cargo +nightly fuzz run <target> <file>` reproduces it. The longer libFuzzer runs
//! are recorded in RELIABILITY.md.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Mutations of each seed per target in CI.
const MUTATIONS: usize = 300;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `seed`, chosen and placed by `rng`.
fn mutate(seed: &[u8], rng: &mut XorShift) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(m.len());
        match rng.below(6) {
            0 if !m.is_empty() => m[at] ^= 1 << rng.below(8),
            1 if !m.is_empty() => m[at] = rng.next() as u8,
            // A length field turned huge or zero, where 4 bytes fit.
            2 if m.len() >= at + 4 => {
                let v: [u8; 4] = match rng.below(3) {
                    0 => [0xFF; 4],
                    1 => [0; 4],
                    _ => (rng.next() as u32).to_le_bytes(),
                };
                m[at..at + 4].copy_from_slice(&v);
            }
            3 => m.truncate(at),
            4 if !m.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(m.len());
                let piece = m[at..end].to_vec();
                m.splice(at..at, piece);
            }
            _ if !m.is_empty() => {
                m.remove(at);
            }
            _ => m.push(rng.next() as u8),
        }
    }
    m
}

fn run(target: &str, entry: fn(&[u8])) {
    let corpus = inputs(&repo().join("fuzz/corpus").join(target));
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} has no seeds");
    let regressions = inputs(&repo().join("fuzz/regressions").join(target));
    let check = |label: &str, data: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| entry(data))).is_err() {
            let path = std::env::temp_dir().join(format!("radflow-fuzz-{target}-crash"));
            std::fs::write(&path, data).unwrap();
            panic!(
                "{target} panicked on {label}; input saved to {}",
                path.display()
            );
        }
    };
    for (name, data) in regressions.iter().chain(&corpus) {
        check(name, data);
    }
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ target.len() as u64);
    for (name, seed) in &corpus {
        for i in 0..MUTATIONS {
            let m = mutate(seed, &mut rng);
            check(&format!("mutation {i} of {name}"), &m);
        }
    }
}

#[test]
fn listener_dataset() {
    run("listener_dataset", radflow_listener::fuzzing::dataset);
}

#[test]
fn listener_pdus() {
    run("listener_pdus", radflow_listener::fuzzing::pdus);
}

#[test]
fn listener_commands() {
    run("listener_commands", radflow_listener::fuzzing::commands);
}

#[test]
fn preprocessor_file() {
    run("preprocessor_file", radflow_preprocessor::fuzzing::file);
}

#[test]
fn preprocessor_jpeg() {
    run("preprocessor_jpeg", radflow_preprocessor::fuzzing::jpeg);
}

#[test]
fn preprocessor_csa() {
    run("preprocessor_csa", radflow_preprocessor::fuzzing::csa);
}

#[test]
fn preprocessor_series() {
    run("preprocessor_series", radflow_preprocessor::fuzzing::series);
}

#[test]
fn volume_nifti_reader() {
    run("volume_nifti_reader", radflow_volume::fuzzing::nifti_reader);
}

#[test]
fn volume_nifti_writer() {
    run("volume_nifti_writer", radflow_volume::fuzzing::nifti_writer);
}

/// The harness can fail: an entry point that panics on one byte is caught.
#[test]
#[should_panic(expected = "panicked on")]
fn a_panicking_entry_point_is_reported() {
    run("listener_commands", |data| {
        assert!(data.len() < 10, "long input");
    });
}

/// Files where a binary value (US, UL, FD…) has a length that is not a whole number of
/// its values, found by libFuzzer making the preprocessor allocate up to 1.8 GB: the
/// parser read whole values only and took its next header from inside a value, with a
/// length from there. The scan before parsing refuses them now, with the element.
#[test]
fn binary_values_of_broken_length_are_refused_before_the_parser_runs() {
    let dir = repo().join("fuzz/regressions/preprocessor_file");
    let found: Vec<_> = inputs(&dir)
        .into_iter()
        .filter(|(name, _)| name.starts_with("binary-length-not-whole-"))
        .collect();
    assert!(found.len() >= 5, "{} inputs", found.len());
    for (name, bytes) in found {
        let err = radflow_preprocessor::decode::read_header(&bytes)
            .err()
            .unwrap_or_else(|| panic!("{name} was read"))
            .to_string();
        assert!(err.contains("whole number"), "{name}: {err}");
    }
}
