//! The distributed pipeline on a real S3 server (SeaweedFS, the compose stack's): a
//! series whose UIDs have the full 64 characters (store keys of 204) and real vendor
//! files (the GE CT and Toshiba MR images that pydicom ships) are stored, and the series
//! gets its result, all in the bucket; and the server failing and coming back loses no
//! instance that was answered Success.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use radflow_shared::store::Store;
use radflow_shared::testing::{NatsServer, SeaweedFs};

const MODEL: &str = "demo-tissue@1.0.0";

/// A real vendor file from the pydicom package pinned in requirements-dev.txt.
fn pydicom_file(name: &str) -> PathBuf {
    let out = run_ok(
        {
            let mut c = std::process::Command::new(python());
            c.args([
                "-c",
                "import sys, pydicom.data; print(pydicom.data.get_testdata_file(sys.argv[1]))",
                name,
            ]);
            c
        },
        "pydicom test file",
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `(study, series, sop)` of a file, read by pydicom.
fn uids(file: &Path) -> [String; 3] {
    let mut c = std::process::Command::new(python());
    c.args([
        "-c",
        "import sys, pydicom; d = pydicom.dcmread(sys.argv[1]); \
         print(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID)",
    ])
    .arg(file);
    let out = run_ok(c, "pydicom reads the UIDs");
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    [v[0].clone(), v[1].clone(), v[2].clone()]
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn get(store: &Store, key: &str) -> Option<Vec<u8>> {
    block_on(store.get(key)).ok().map(|b| b.to_vec())
}

#[test]
fn distributed_pipeline_on_s3_with_64_character_uids_and_vendor_files() {
    let nats = NatsServer::start().expect("nats-server");
    let s3 = SeaweedFs::start().expect("SeaweedFS");
    let store = s3.store();
    let work = TempDir::new("s3-pipeline");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 96, 24, &["--long-uids", "--seed", "3"]);
    assert_eq!(truth.series_uid.len(), 64);
    let vendor = [pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")];
    let dicom_port = free_port();

    let start = |role: &str, http: u16, extra: &[&str]| {
        let mut cmd = radflow();
        cmd.arg(role)
            .args(["--nats-url", &nats.url(), "--store-url", &s3.store_url()])
            .args(["--http-port", &http.to_string()])
            .args(extra)
            .envs(s3.env());
        Proc::spawn(role, cmd, work.path())
    };
    let (listener_http, pre_http, inferer_http) = (free_port(), free_port(), free_port());
    let mut listener = start(
        "listener",
        listener_http,
        &[
            "--dicom-port",
            &dicom_port.to_string(),
            "--series-quiet-secs",
            "3",
        ],
    );
    let mut pre = start("preprocessor", pre_http, &[]);
    let mut inf = start("inferer", inferer_http, &[]);
    wait_port(dicom_port, &mut [&mut listener, &mut pre, &mut inf]);
    wait_for("inferer ready", Duration::from_secs(60), || {
        inf.assert_running();
        http_get(inferer_http, "/readyz").filter(|(s, _)| *s == 200)
    });

    let mut files = dicom_files(&series_dir);
    files.extend(vendor.iter().cloned());
    let out = storescu(dicom_port, "RADFLOW", &files);
    assert!(
        out.status.success(),
        "storescu failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The series' result lands in the bucket, with the phantom's volumes.
    let summary_key = format!("results/{}/{MODEL}/summary.json", truth.series_uid);
    let summary: serde_json::Value =
        wait_for("summary.json in S3", Duration::from_secs(120), || {
            for p in [&mut listener, &mut pre, &mut inf] {
                p.assert_running();
            }
            serde_json::from_slice(&get(&store, &summary_key)?).ok()
        });
    assert_volumes(&summary, &truth, 0.02);
    let labels = get(
        &store,
        &format!("results/{}/{MODEL}/labels.nii.gz", truth.series_uid),
    )
    .expect("labels.nii.gz in S3");
    let labels_path = work.path().join("labels.nii.gz");
    std::fs::write(&labels_path, labels).unwrap();
    let geo = nibabel_vs_dicom(&labels_path, &series_dir);
    assert_eq!(geo["shape"], geo["expected_shape"], "{geo}");
    assert!(geo["max_abs_diff"].as_f64().unwrap() < 1e-3, "{geo}");

    // Every instance is in the bucket under its 204-character key, the same dataset
    // as sent (pydicom compares every element after the file meta; group lengths and
    // Data Set Trailing Padding, which PS3.5 §7.2 and §7.8 let any receiver drop, aside).
    let listed = block_on(store.list_instances(&truth.study_uid, &truth.series_uid)).unwrap();
    assert_eq!(listed.len(), 24);
    assert!(listed.iter().all(|o| o.key.len() == 204), "{listed:?}");
    for file in files.iter().step_by(5).chain(&vendor) {
        let [study, series, sop] = uids(file);
        let key = Store::instance_key(&study, &series, &sop);
        let stored = get(&store, &key).unwrap_or_else(|| panic!("{key} is not in S3"));
        let copy = work.path().join("stored.dcm");
        std::fs::write(&copy, stored).unwrap();
        let mut c = std::process::Command::new(python());
        c.args([
            "-c",
            "import sys, pydicom\n\
             a, b = (pydicom.dcmread(p) for p in sys.argv[1:])\n\
             ta = {e.tag: e.value for e in a if e.tag.element != 0 and e.tag != 0xFFFCFFFC}\n\
             tb = {e.tag: e.value for e in b if e.tag.element != 0 and e.tag != 0xFFFCFFFC}\n\
             diff = sorted(str(t) for t in set(ta) | set(tb) if ta.get(t) != tb.get(t))\n\
             assert not diff, f'{sys.argv[1]}: elements differ: {diff}'\n\
             assert a.PixelData == b.PixelData",
        ])
        .arg(file)
        .arg(&copy);
        run_ok(c, "stored instance equals the sent one");
    }

    // The readiness of every component includes the bucket.
    for port in [listener_http, pre_http, inferer_http] {
        let (code, body) = http_get(port, "/readyz").expect("readyz");
        assert_eq!(code, 200, "{body}");
    }
}

/// Sends files on one association; prints `OK <SOP Instance UID>` for a Success and
/// `FAIL <SOP Instance UID> <status>` for any other answer.
const SENDER: &str = r#"
import sys
from pydicom import dcmread
from pynetdicom import AE
port, files = int(sys.argv[1]), sys.argv[2:]
ae = AE(ae_title="OUTAGESCU")
ae.dimse_timeout = 600
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
assert assoc.is_established, "association refused"
for f in files:
    ds = dcmread(f)
    status = assoc.send_c_store(ds)
    code = status.get("Status") if status else None
    if code == 0:
        print("OK", ds.SOPInstanceUID, flush=True)
    else:
        print("FAIL", ds.SOPInstanceUID, hex(code) if code is not None else "none", flush=True)
assoc.release()
"#;

fn send_each(work: &Path, port: u16, files: &[PathBuf]) -> Vec<(String, String)> {
    let script = work.join("sender.py");
    std::fs::write(&script, SENDER).unwrap();
    let mut c = std::process::Command::new(python());
    c.arg(&script).arg(port.to_string()).args(files);
    let out = run_ok(c, "pynetdicom sender");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some(kind), Some(uid)) => Some((kind.to_owned(), uid.to_owned())),
                _ => None,
            }
        })
        .collect()
}

/// The S3 server goes away mid-stream and comes back: while it is down every C-STORE
/// is answered with a failure (the sender keeps the instance), never with a Success
/// that is not stored; once it is back the same instances are stored, and every
/// instance ever answered Success is in the bucket.
#[test]
fn the_s3_server_failing_and_coming_back_loses_no_acknowledged_instance() {
    let nats = NatsServer::start().expect("nats-server");
    let mut s3 = SeaweedFs::start().expect("SeaweedFS");
    let store = s3.store();
    let work = TempDir::new("s3-outage");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 64, 12, &["--long-uids", "--seed", "5"]);
    let files = dicom_files(&series_dir);
    let (dicom, http) = (free_port(), free_port());
    let mut cmd = radflow();
    cmd.args([
        "listener",
        "--nats-url",
        &nats.url(),
        "--store-url",
        &s3.store_url(),
    ])
    .args([
        "--dicom-port",
        &dicom.to_string(),
        "--http-port",
        &http.to_string(),
    ])
    .envs(s3.env());
    let mut listener = Proc::spawn("listener", cmd, work.path());
    wait_port(dicom, &mut [&mut listener]);

    let before = send_each(work.path(), dicom, &files[..4]);
    assert!(before.iter().all(|(k, _)| k == "OK"), "{before:?}");

    s3.stop();
    let started = std::time::Instant::now();
    let during = send_each(work.path(), dicom, &files[4..8]);
    let outage_answer = started.elapsed();
    listener.assert_running();
    assert_eq!(during.len(), 4, "every C-STORE is answered: {during:?}");
    let (_, ready) = http_get(http, "/readyz").expect("readyz answers");
    s3.restart().expect("SeaweedFS comes back");

    let after = send_each(work.path(), dicom, &files[4..]);
    assert!(after.iter().all(|(k, _)| k == "OK"), "{after:?}");
    listener.assert_running();

    let stored: std::collections::BTreeSet<String> =
        block_on(store.list_instances(&truth.study_uid, &truth.series_uid))
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
    for (kind, uid) in before.iter().chain(&during).chain(&after) {
        let key = Store::instance_key(&truth.study_uid, &truth.series_uid, uid);
        if kind == "OK" {
            assert!(
                stored.contains(&key),
                "{uid} was answered Success but is not stored"
            );
        }
    }
    assert_eq!(stored.len(), 12, "all twelve stored once");
    eprintln!(
        "S3 down: {} of 4 C-STOREs failed ({:?}) within {:.1} s; readiness while down: {ready}",
        during.iter().filter(|(k, _)| k != "OK").count(),
        during.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        outage_answer.as_secs_f64()
    );
}
