//! End to end, with real peers: DCMTK sends a synthetic CT study to radflow, and the
//! segmentation that comes out must have the phantom's tissue volumes and the source
//! series' geometry. Once with the three components as separate processes on a real
//! nats-server, once embedded (`radflow run`) with a crash in the middle.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use radflow_shared::testing::NatsServer;

const MODEL: &str = "demo-tissue@1.0.0";
/// Relative tolerance on each tissue's volume: the label map went through resampling
/// to 1.5 mm, a smoothing convolution and back to the source grid.
const VOLUME_TOLERANCE: f64 = 0.03;

/// The listener takes only the transfer syntaxes whose images the preprocessor can
/// decode: a syntax accepted and then refused would fail a whole series after its
/// sender was told Success, instead of letting the sender fall back at negotiation.
#[test]
fn the_listener_accepts_only_syntaxes_the_preprocessor_decodes() {
    use radflow_listener::sop_classes::DEFAULT_TRANSFER_SYNTAXES;
    use radflow_preprocessor::decode::decodes_transfer_syntax;
    let undecodable: Vec<&str> = DEFAULT_TRANSFER_SYNTAXES
        .iter()
        .copied()
        .filter(|ts| !decodes_transfer_syntax(ts))
        .collect();
    assert!(
        undecodable.is_empty(),
        "accepted, never decoded: {undecodable:?}"
    );
    // The check can tell: video is neither accepted nor decodable.
    assert!(!decodes_transfer_syntax("1.2.840.10008.1.2.4.100"));
    assert!(!DEFAULT_TRANSFER_SYNTAXES.contains(&"1.2.840.10008.1.2.4.100"));
    assert!(decodes_transfer_syntax("1.2.840.10008.1.2.4.201\0"));
}

fn summary_path(store: &Path, series: &str) -> std::path::PathBuf {
    store.join(format!("results/{series}/{MODEL}/summary.json"))
}

fn read_summary(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn check_result(store: &Path, series_dir: &Path, truth: &Truth, summary: &serde_json::Value) {
    assert_volumes(summary, truth, VOLUME_TOLERANCE);
    assert_eq!(summary["model"], "demo-tissue");
    assert_eq!(summary["provider"], "cpu");
    let labels = store.join(format!(
        "results/{}/{MODEL}/labels.nii.gz",
        truth.series_uid
    ));
    let geo = nibabel_vs_dicom(&labels, series_dir);
    assert_eq!(geo["shape"], geo["expected_shape"], "{geo}");
    assert!(
        geo["max_abs_diff"].as_f64().unwrap() < 1e-3,
        "label map affine differs from the series geometry: {geo}"
    );
    assert_eq!(geo["labels"], serde_json::json!([0, 1, 2, 3]), "{geo}");
    assert!(
        store
            .join(format!("results/{}/{MODEL}/preview.png", truth.series_uid))
            .is_file()
    );
    // The result as DICOM: exactly this label map and these volumes.
    check_result_dicom(
        &store.join(format!("results/{}/{MODEL}", truth.series_uid)),
        series_dir,
    );
}

#[test]
fn distributed_pipeline_with_nats_and_storescu() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("distributed");
    let store = work.path().join("store");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 128, 40, &["--shuffle", "--seed", "7"]);
    let store_url = format!("file://{}", store.display());
    let dicom_port = free_port();

    let common = |cmd: &mut std::process::Command, http: u16| {
        cmd.args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &http.to_string()]);
    };
    let (listener_http, pre_http) = (free_port(), free_port());
    let mut listener = radflow();
    listener.arg("listener");
    common(&mut listener, listener_http);
    listener.args([
        "--dicom-port",
        &dicom_port.to_string(),
        "--series-quiet-secs",
        "3",
    ]);
    let mut listener = Proc::spawn("listener", listener, work.path());
    let mut pre = radflow();
    pre.arg("preprocessor");
    common(&mut pre, pre_http);
    let mut pre = Proc::spawn("preprocessor", pre, work.path());
    let inferer_http = free_port();
    let mut inf = radflow();
    inf.arg("inferer");
    common(&mut inf, inferer_http);
    let mut inf = Proc::spawn("inferer", inf, work.path());

    wait_port(dicom_port, &mut [&mut listener, &mut pre, &mut inf]);
    wait_for("inferer ready", Duration::from_secs(60), || {
        inf.assert_running();
        http_get(inferer_http, "/readyz").filter(|(s, _)| *s == 200)
    });

    let files = dicom_files(&series_dir);
    assert_eq!(files.len(), 40);
    let out = storescu(dicom_port, "RADFLOW", &files);
    assert!(
        out.status.success(),
        "storescu failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let summary = wait_for("summary.json", Duration::from_secs(120), || {
        for p in [&mut listener, &mut pre, &mut inf] {
            p.assert_running();
        }
        read_summary(&summary_path(&store, &truth.series_uid))
    });
    check_result(&store, &series_dir, &truth, &summary);

    // Every instance is in the store as it was sent.
    let stored =
        std::fs::read_dir(store.join(format!("dicom/{}/{}", truth.study_uid, truth.series_uid)))
            .unwrap()
            .count();
    assert_eq!(stored, 40);

    // Every component's metrics pass promtool.
    for (who, port) in [
        ("listener", listener_http),
        ("preprocessor", pre_http),
        ("inferer", inferer_http),
    ] {
        let (code, text) = http_get(port, "/metrics").expect("metrics");
        assert_eq!(code, 200);
        promtool_check(&text, who);
    }

    // One correlation id joins the logs of all three stages.
    let corr = summary["correlation_id"].as_str().unwrap().to_owned();
    for p in [&listener, &pre, &inf] {
        assert!(
            p.logs().contains(&corr),
            "{} logs lack correlation id {corr}",
            p.name
        );
    }
}

#[test]
fn embedded_pipeline_recovers_after_a_crash() {
    let work = TempDir::new("embedded");
    let data = work.path().join("data");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 96, 30, &["--shuffle", "--seed", "11"]);
    let files = dicom_files(&series_dir);
    let dicom_port = free_port();
    let http_port = free_port();
    let start = || {
        let mut cmd = embedded(&data, dicom_port, http_port);
        cmd.args(["--series-quiet-secs", "3"]);
        cmd
    };

    // First life: every instance is acknowledged, then the process dies before the
    // quiet period ends, so nothing but the store knows about the series.
    let mut first = Proc::spawn("run-1", start(), work.path());
    wait_port(dicom_port, &mut [&mut first]);
    let out = storescu(dicom_port, "RADFLOW", &files);
    assert!(
        out.status.success(),
        "storescu failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The listener logs the release just after answering it, so storescu can exit a
    // moment before the line is written: wait for it (well inside the 2 s quiet
    // period that follows a release), then crash.
    wait_for("the release in the log", Duration::from_secs(1), || {
        first.logs().contains("association released").then_some(())
    });
    first.kill();
    assert!(!summary_path(&data, &truth.series_uid).exists());
    assert!(
        !first.logs().contains("series ready"),
        "the series became ready before the crash"
    );

    // Second life: the series is recovered from the store and processed.
    let mut second = Proc::spawn("run-2", start(), work.path());
    let summary = wait_for("summary.json", Duration::from_secs(120), || {
        second.assert_running();
        read_summary(&summary_path(&data, &truth.series_uid))
    });
    check_result(&data, &series_dir, &truth, &summary);
    let (status, body) = http_get(http_port, "/readyz").unwrap();
    assert_eq!(status, 200, "{body}");

    // A clean stop on SIGTERM.
    let status = second
        .terminate(Duration::from_secs(30))
        .expect("exits on SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn echo_and_called_ae_check() {
    let work = TempDir::new("echo");
    let dicom_port = free_port();
    let mut cmd = radflow();
    cmd.arg("run")
        .arg("--data")
        .arg(work.path().join("data"))
        .args(["--dicom-port", &dicom_port.to_string(), "--http-port", "0"]);
    let mut run = Proc::spawn("run", cmd, work.path());
    wait_port(dicom_port, &mut [&mut run]);

    let mut echo = dcmtk("echoscu");
    echo.args(["-aec", "RADFLOW", "127.0.0.1", &dicom_port.to_string()]);
    run_ok(echo, "echoscu");

    let series = work.path().join("series");
    synth(&series, 32, 3, &[]);
    let out = storescu(dicom_port, "NOT-RADFLOW", &dicom_files(&series));
    assert!(
        !out.status.success(),
        "a store to a wrong called AE title was accepted"
    );
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Called AE Title Not Recognized"), "{text}");
}
