//! Helpers shared by the preprocessor's integration tests: temporary folders, the
//! reference tools (SimpleITK, nibabel, pydicom through `reference.py`, DCMTK) and
//! conversions with radflow's own code.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use radflow_preprocessor::convert::{self, ConvertError};
use radflow_preprocessor::geometry::{BuiltVolume, GeometryOptions};
use radflow_shared::models::{Interpolation, Normalization, Preset};
use radflow_volume::Volume;
use radflow_volume::nifti;
use serde_json::Value;

/// A fresh, empty folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("radflow-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A new sub-folder.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Set RADFLOW_KEEP_TEST_FILES to look at what a failing test wrote.
        if std::env::var_os("RADFLOW_KEEP_TEST_FILES").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Files of a folder, sorted.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "json"))
        .collect();
    v.sort();
    v
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference.py")
}

/// Runs `reference.py` with arguments; panics with its stderr on failure.
pub fn reference(args: &[&str], stdin: Option<&str>) -> String {
    let python = radflow_shared::testing::python();
    let mut child = Command::new(&python)
        .arg(script())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reference.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs reference jobs (see `reference.py`); returns one result per job, by name.
pub fn jobs(jobs: Vec<Value>) -> Vec<Value> {
    let out = reference(&[], Some(&Value::Array(jobs).to_string()));
    let results: Vec<Value> = serde_json::from_str(&out).unwrap();
    for r in &results {
        assert!(r.get("error").is_none(), "reference job failed: {r}");
    }
    results
}

/// Where pydicom and nibabel keep their test files.
pub fn package_data() -> (PathBuf, PathBuf) {
    let v: Value = serde_json::from_str(&reference(&["paths"], None)).unwrap();
    (
        PathBuf::from(v["pydicom"].as_str().unwrap()),
        PathBuf::from(v["nibabel"].as_str().unwrap()),
    )
}

/// radflow's native volume of a folder, as `radflow volume` makes it.
pub fn native(dir: &Path) -> Result<BuiltVolume, ConvertError> {
    convert::volume_from_paths(&files(dir), &GeometryOptions::default())
}

/// A preset that only resamples (linear, no normalization).
pub fn spacing_preset(spacing: [f64; 3]) -> Preset {
    Preset {
        name: "test".into(),
        spacing,
        normalization: Normalization::None,
        orientation: None,
        shape: None,
        pad_value: None,
        interpolation: Interpolation::Linear,
    }
}

/// Writes a volume as plain NIfTI and returns its path.
pub fn write(vol: &Volume<f32>, path: PathBuf) -> PathBuf {
    std::fs::write(&path, nifti::write_nifti(vol, "radflow test")).unwrap();
    path
}

/// Runs a DCMTK tool (by absolute path) on every file of `src`, writing into `dst`.
pub fn dcmtk(tool: &str, options: &[&str], src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let exe = format!("/usr/bin/{tool}");
    for f in files(src) {
        let out = dst.join(f.file_name().unwrap());
        let status = Command::new(&exe)
            .args(options)
            .arg(&f)
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"));
        assert!(
            status.status.success(),
            "{exe} {options:?} failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
}

/// Asserts the geometry and values of a comparison with a reference: same shape,
/// affine within 1e-3 mm, values within `mean` on average and `p99` at the 99th
/// percentile; radflow's file carries the affine as sform and (unless sheared) qform.
pub fn assert_close(r: &Value, mean: f64, p99: f64, qform_exact: bool) {
    let name = &r["name"];
    assert_eq!(r["shape"], r["ref_shape"], "{name}: shapes differ: {r}");
    let f = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{name}: no {k} in {r}"))
    };
    assert!(f("affine_diff") < 1e-3, "{name}: affines differ: {r}");
    assert!(f("sform_diff") < 1e-3, "{name}: sform: {r}");
    assert_eq!(r["sform_code"], 1, "{name}: {r}");
    if qform_exact {
        assert!(f("qform_diff") < 1e-3, "{name}: qform: {r}");
        assert_eq!(r["qform_code"], 1, "{name}: {r}");
    }
    assert!(f("mean_abs") <= mean, "{name}: mean difference: {r}");
    assert!(
        f("p99_abs") <= p99,
        "{name}: 99th percentile difference: {r}"
    );
}
