//! Helpers shared by the integration tests: scratch folders, raw float32 files, a
//! seeded random source and the NumPy reference (`tests/monai_reference.py`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A fresh, empty scratch folder, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("radflow-inferer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes float32 values little-endian.
pub fn write_f32(path: &Path, values: impl IntoIterator<Item = f32>) {
    let bytes: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Reads little-endian float32 values.
pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Deterministic uniform values in `[lo, hi)` (xorshift64*), so failures reproduce.
pub fn random_values(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            lo + (hi - lo) * (r as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// Runs the NumPy reference on `image` (C order) with `params` in a scratch folder and
/// returns its output shape and values.
pub fn run_reference(tag: &str, params: Value, image: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let scratch = Scratch::new(tag);
    let dir = &scratch.0;
    std::fs::write(dir.join("params.json"), params.to_string()).unwrap();
    write_f32(&dir.join("image.f32"), image.iter().copied());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/monai_reference.py");
    let out = Command::new(radflow_shared::testing::python())
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 for the reference ({e}); install Python 3 with numpy")
        });
    assert!(
        out.status.success(),
        "the NumPy reference failed (it needs numpy, and onnxruntime==1.31.1 for the model tests):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("output.json")).unwrap()).unwrap();
    let shape = meta["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    (shape, read_f32(&dir.join("output.f32")))
}

/// Largest absolute difference, after checking the lengths agree.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "different numbers of values");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}
