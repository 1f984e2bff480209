//! Helpers of the end-to-end tests: radflow processes, real DICOM peers, waiting.

#![allow(dead_code)]

pub mod demographics;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `python3` that has the test packages: the repository's `.venv` when present.
pub fn python() -> PathBuf {
    let venv = repo().join(".venv/bin/python3");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// A DCMTK tool by absolute path: pip's pynetdicom installs scripts of the same names
/// that exit 0 on failure.
pub fn dcmtk(tool: &str) -> Command {
    let path = Path::new("/usr/bin").join(tool);
    assert!(
        path.is_file(),
        "DCMTK's {tool} is missing: apt-get install dcmtk (see .ci/setup)"
    );
    let mut c = Command::new(path);
    c.env("TCP_NODELAY", "1");
    c
}

/// The ONNX Runtime library of the repository's `.venv`, for a radflow started outside
/// the repository (which would not find it by itself).
pub fn ort_library() -> PathBuf {
    // Tests run in the repository, where the library is found as `radflow run` finds it.
    radflow_inferer::runtime::locate_library(None)
        .unwrap_or_else(|e| panic!("ONNX Runtime library not found ({e}): run .ci/setup"))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("radflow-e2e-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("RADFLOW_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The radflow binary under test.
pub fn radflow() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_radflow"));
    c.current_dir(repo());
    c.env("RADFLOW_LOG_FORMAT", "json");
    c
}

/// A radflow process whose logs go to a file; killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes would, then wait for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); log:\n{}",
                self.name,
                self.logs()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns `Some`, failing after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a TCP port accepts connections.
pub fn wait_port(port: u16, procs: &mut [&mut Proc]) {
    wait_for(&format!("port {port}"), Duration::from_secs(60), || {
        for p in procs.iter_mut() {
            p.assert_running();
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// Writes a destinations file: each `(name, AE title, port)` a node on 127.0.0.1, and
/// one route of the demo model to `to` (destination names or `caller`).
pub fn destinations_file(path: &Path, destinations: &[(&str, &str, u16)], to: &[&str]) {
    let mut text = String::new();
    for (name, ae_title, port) in destinations {
        text.push_str(&format!(
            "[[destination]]\nname = \"{name}\"\nae_title = \"{ae_title}\"\nhost = \"127.0.0.1\"\nport = {port}\n\n"
        ));
    }
    let to: Vec<String> = to.iter().map(|t| format!("\"{t}\"")).collect();
    text.push_str(&format!(
        "[[route]]\nmodels = [\"demo-tissue\"]\nto = [{}]\n",
        to.join(", ")
    ));
    std::fs::write(path, text).unwrap();
}

/// The four stages as processes of their own on NATS and one store, as the
/// distributed mode runs them: the listener on `dicom_port` (quiet period 2 s), the
/// preprocessor, the inferer and the exporter with `exporter_args` (its destinations
/// file and limits). Each has a free HTTP port; `start` returns once the listener
/// takes associations and the inferer and the exporter are ready.
pub struct Stack {
    pub listener: Proc,
    pub preprocessor: Proc,
    pub inferer: Proc,
    pub exporter: Proc,
    pub exporter_http: u16,
}

impl Stack {
    pub fn start(
        nats_url: &str,
        store_url: &str,
        dicom_port: u16,
        exporter_args: &[&std::ffi::OsStr],
        logs: &Path,
    ) -> Self {
        let spawn = |stage: &str, http: u16, extra: &[&std::ffi::OsStr]| {
            let mut cmd = radflow();
            cmd.arg(stage)
                .args(["--nats-url", nats_url, "--store-url", store_url])
                .args(["--http-port", &http.to_string()])
                .args(extra);
            Proc::spawn(stage, cmd, logs)
        };
        let dicom = dicom_port.to_string();
        let listener_args =
            ["--dicom-port", dicom.as_str(), "--series-quiet-secs", "2"].map(std::ffi::OsStr::new);
        let (inferer_http, exporter_http) = (free_port(), free_port());
        let mut stack = Self {
            listener: spawn("listener", free_port(), &listener_args),
            preprocessor: spawn("preprocessor", free_port(), &[]),
            inferer: spawn("inferer", inferer_http, &[]),
            exporter: spawn("exporter", exporter_http, exporter_args),
            exporter_http,
        };
        wait_port(dicom_port, &mut stack.procs());
        wait_for(
            "inferer and exporter ready",
            Duration::from_secs(60),
            || {
                stack.assert_running();
                let ready = |port| http_get(port, "/readyz").is_some_and(|(s, _)| s == 200);
                (ready(inferer_http) && ready(exporter_http)).then_some(())
            },
        );
        stack
    }

    pub fn procs(&mut self) -> [&mut Proc; 4] {
        [
            &mut self.listener,
            &mut self.preprocessor,
            &mut self.inferer,
            &mut self.exporter,
        ]
    }

    /// Fails the test if a stage has exited.
    pub fn assert_running(&mut self) {
        for p in self.procs() {
            p.assert_running();
        }
    }
}

/// The counter `radflow_exports_total` of a destination and outcome, from /metrics.
pub fn exports(http: u16, destination: &str, outcome: &str) -> f64 {
    let Some((200, text)) = http_get(http, "/metrics") else {
        return 0.0;
    };
    let want =
        format!("radflow_exports_total{{destination=\"{destination}\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// HTTP GET on loopback; returns (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Runs a command to completion, panicking with its output on failure.
pub fn run_ok(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The phantom's ground truth, as `radflow synth` writes it.
#[derive(Debug, serde::Deserialize)]
pub struct Truth {
    pub study_uid: String,
    pub series_uid: String,
    pub dims: [usize; 3],
    pub volumes_ml: std::collections::BTreeMap<String, f64>,
    pub files: usize,
}

/// Writes a phantom series with `radflow synth` and returns its truth.
pub fn synth(out: &Path, size: usize, slices: usize, extra: &[&str]) -> Truth {
    let mut cmd = radflow();
    cmd.args(["synth", "--out"])
        .arg(out)
        .args(["--size", &size.to_string(), "--slices", &slices.to_string()])
        .args(["--spacing", "2.5"])
        .args(extra);
    run_ok(cmd, "radflow synth");
    serde_json::from_slice(&std::fs::read(out.join("truth.json")).unwrap()).unwrap()
}

/// The DICOM files of a folder (everything but truth.json), sorted by name.
pub fn dicom_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "json"))
        .collect();
    files.sort();
    files
}

/// DCMTK storescu of files to the listener.
pub fn storescu(port: u16, called_ae: &str, files: &[PathBuf]) -> Output {
    let mut cmd = dcmtk("storescu");
    cmd.args([
        "-aet",
        "CT-SCANNER",
        "-aec",
        called_ae,
        "127.0.0.1",
        &port.to_string(),
    ])
    .args(files);
    cmd.output().expect("run storescu")
}

/// Checks a result's label volumes against the phantom truth.
pub fn assert_volumes(summary: &serde_json::Value, truth: &Truth, rel_tol: f64) {
    let labels = summary["labels"].as_array().expect("labels in summary");
    for (name, expected) in &truth.volumes_ml {
        let got = labels
            .iter()
            .find(|l| l["name"] == name.as_str())
            .unwrap_or_else(|| panic!("label {name} missing in {summary}"))["volume_ml"]
            .as_f64()
            .unwrap();
        let rel = (got - expected).abs() / expected;
        assert!(
            rel <= rel_tol,
            "{name}: {got:.1} mL vs truth {expected:.1} mL ({:.1}% off, tolerance {:.1}%)",
            rel * 100.0,
            rel_tol * 100.0
        );
    }
}

/// The affine (RAS, as nibabel reads it) and shape of a NIfTI file, and the affine
/// computed independently from the DICOM files with pydicom.
pub fn nibabel_vs_dicom(nifti: &Path, dicom_dir: &Path) -> serde_json::Value {
    let script = r#"
import json, sys, glob, os
import numpy as np, nibabel as nib, pydicom
img = nib.load(sys.argv[1])
files = [f for f in glob.glob(os.path.join(sys.argv[2], '*')) if not f.endswith('.json')]
ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
iop = np.array(ds[0].ImageOrientationPatient, float)
r, c = iop[:3], iop[3:]
n = np.cross(r, c)
ds.sort(key=lambda d: float(np.dot(n, np.array(d.ImagePositionPatient, float))))
p0 = np.array(ds[0].ImagePositionPatient, float)
p1 = np.array(ds[-1].ImagePositionPatient, float)
dr, dc = [float(v) for v in ds[0].PixelSpacing]
step = (p1 - p0) / (len(ds) - 1)
lps = np.eye(4)
lps[:3, 0] = r * dc
lps[:3, 1] = c * dr
lps[:3, 2] = step
lps[:3, 3] = p0
ras = np.diag([-1, -1, 1, 1]) @ lps
print(json.dumps({
  "shape": list(img.shape),
  "affine": img.affine.tolist(),
  "expected_affine": ras.tolist(),
  "expected_shape": [int(ds[0].Columns), int(ds[0].Rows), len(ds)],
  "max_abs_diff": float(np.abs(img.affine - ras).max()),
  "labels": sorted(int(v) for v in np.unique(np.asarray(img.dataobj))),
}))
"#;
    let mut cmd = Command::new(python());
    cmd.arg("-c").arg(script).arg(nifti).arg(dicom_dir);
    let out = run_ok(cmd, "nibabel/pydicom check");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `dciodvfy` (dicom3tools) on a DICOM file: panics with its report if it finds an
/// error (warnings are allowed).
pub fn dciodvfy(path: &Path) {
    let out = Command::new("dciodvfy")
        .arg(path)
        .output()
        .expect("dciodvfy not found: install dicom3tools (.ci/setup does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.lines().any(|l| l.starts_with("Error")),
        "dciodvfy reports errors for {}:\n{text}",
        path.display()
    );
}

/// The SEG and SR of a result (`result_dir`) against its `labels.nii.gz` and
/// `summary.json` and the source files in `series_dir`: dciodvfy finds no error,
/// highdicom reads the SEG back to exactly the label map, the SR holds the volumes.
pub fn check_result_dicom(result_dir: &Path, series_dir: &Path) {
    for name in ["seg.dcm", "sr.dcm"] {
        dciodvfy(&result_dir.join(name));
    }
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/check_result_dicom.py"))
        .arg(result_dir)
        .arg(series_dir);
    let out = run_ok(cmd, "SEG/SR check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OK"), "SEG/SR check: {text}");
}

/// `promtool check metrics` on a /metrics text; panics with promtool's complaints.
pub fn promtool_check(metrics: &str, who: &str) {
    let promtool = Path::new("/usr/bin/promtool");
    assert!(
        promtool.is_file(),
        "promtool is missing: apt-get install prometheus (see .ci/setup)"
    );
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejects the metrics of {who}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A DCMTK storescp writing what it receives into `dir`, bit-preserving (the files are
/// the datasets as they came over the wire). Files are named by SOP Instance UID, so an
/// object received again replaces its file; with `unique_names` every arrival gets its
/// own file, so an object received twice shows as two.
pub fn storescp(port: u16, ae_title: &str, dir: &Path, log_dir: &Path, unique_names: bool) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = dcmtk("storescp");
    cmd.args(["--bit-preserving", "-aet", ae_title, "-od"])
        .arg(dir)
        .arg(if unique_names { "+uf" } else { "-uf" })
        .arg(port.to_string())
        .stdout(Stdio::null());
    Proc::spawn(&format!("storescp-{ae_title}"), cmd, log_dir)
}

/// The files of a folder (none if it is missing), sorted.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// `radflow run` on its own data folder and ports; callers add what else they need.
pub fn embedded(data: &Path, dicom_port: u16, http_port: u16) -> Command {
    let mut cmd = radflow();
    cmd.arg("run")
        .arg("--data")
        .arg(data)
        .args(["--dicom-port", &dicom_port.to_string()])
        .args(["--http-port", &http_port.to_string()]);
    cmd
}

/// Adds to `series` a copy of one of its slices with the SOP Instance UID `uid` and no
/// Image Position (Patient), so that the preprocessor dead-letters the series; returns
/// the new file.
pub fn poison(series: &Path, uid: &str) -> PathBuf {
    let src = dicom_files(series).remove(0);
    let dst = series.join("odd-one-out.dcm");
    std::fs::copy(&src, &dst).unwrap();
    let mut cmd = dcmtk("dcmodify");
    cmd.arg("-nb")
        .args(["-m", &format!("(0008,0018)={uid}")])
        .args(["-e", "(0020,0032)"])
        .arg(&dst);
    run_ok(cmd, "dcmodify");
    dst
}
