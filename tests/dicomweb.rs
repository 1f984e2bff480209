//! DICOMweb STOW-RS end to end: a real DICOMweb client (PyPI `dicomweb-client`) sends a
//! study to `radflow run` over HTTP; the store holds exactly the bytes it sent and the
//! series is scored. Malformed parts fail one by one with their reasons while the good
//! ones are stored; the token guards the routes; a distributed listener serves STOW-RS
//! only when configured.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use radflow_shared::testing::NatsServer;

const MODEL: &str = "demo-tissue@1.0.0";
const TOKEN: &str = "stow-test-t0ken";

/// Runs tests/stow_client.py and parses what it prints.
fn client(args: &[&str]) -> serde_json::Value {
    let mut cmd = std::process::Command::new(python());
    cmd.arg(repo().join("tests/stow_client.py")).args(args);
    let out = run_ok(cmd, "stow_client.py");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stow_client.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn uids(sequence: &serde_json::Value) -> Vec<String> {
    sequence["Value"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["00081155"]["Value"][0].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn stored(data: &Path, study: &str, series: &str, sop: &str) -> std::path::PathBuf {
    data.join(format!("dicom/{study}/{series}/{sop}.dcm"))
}

fn start_embedded(work: &Path, data: &Path, http: u16) -> Proc {
    let token_file = work.join("stow-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut cmd = radflow();
    cmd.arg("run")
        .arg("--data")
        .arg(data)
        .args(["--dicom-port", &free_port().to_string()])
        .args(["--http-port", &http.to_string()])
        .args(["--series-quiet-secs", "2"])
        .arg("--dicomweb-token-file")
        .arg(&token_file);
    let mut p = Proc::spawn("run", cmd, work);
    wait_for("HTTP ready", Duration::from_secs(60), || {
        p.assert_running();
        http_get(http, "/readyz").filter(|(s, _)| *s == 200)
    });
    p
}

#[test]
fn stow_rs_study_is_stored_byte_for_byte_and_scored() {
    let work = TempDir::new("stow");
    let data = work.path().join("data");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 96, 30, &["--shuffle", "--seed", "5"]);
    let files = dicom_files(&series_dir);
    let http = free_port();
    let mut run = start_embedded(work.path(), &data, http);
    let url = format!("http://127.0.0.1:{http}/dicomweb");

    let sent = work.path().join("sent");
    std::fs::create_dir_all(&sent).unwrap();
    let mut args = vec!["study", url.as_str(), TOKEN, sent.to_str().unwrap()];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    let response = client(&args);
    assert!(response.get("00081198").is_none(), "failures: {response}");
    let referenced = uids(&response["00081199"]);
    assert_eq!(referenced.len(), files.len(), "{response}");

    // Every part the client sent is in the store, byte for byte.
    let sent_files = dicom_files(&sent);
    assert_eq!(sent_files.len(), files.len());
    for part in &sent_files {
        let sop = part.file_stem().unwrap().to_str().unwrap();
        assert!(referenced.iter().any(|r| r == sop), "{sop} not referenced");
        let want = std::fs::read(part).unwrap();
        let got = std::fs::read(stored(&data, &truth.study_uid, &truth.series_uid, sop))
            .unwrap_or_else(|e| panic!("{sop} not stored: {e}"));
        assert_eq!(got.len(), want.len(), "{sop}: size");
        assert!(got == want, "{sop}: stored bytes differ from the sent ones");
    }

    // The series is scored like one received by C-STORE.
    let summary = data.join(format!("results/{}/{MODEL}/summary.json", truth.series_uid));
    let summary: serde_json::Value = wait_for("summary.json", Duration::from_secs(120), || {
        run.assert_running();
        serde_json::from_slice(&std::fs::read(&summary).ok()?).ok()
    });
    assert_volumes(&summary, &truth, 0.03);
    assert_eq!(
        summary["source_dims"][2].as_u64(),
        Some(files.len() as u64),
        "{summary}"
    );
}

#[test]
fn malformed_parts_fail_alone_and_the_token_is_required() {
    let work = TempDir::new("stow-malformed");
    let data = work.path().join("data");
    let study_dir = work.path().join("study");
    let other_dir = work.path().join("other");
    let truth = synth(&study_dir, 64, 6, &["--seed", "3"]);
    let other = synth(&other_dir, 64, 2, &["--seed", "4"]);
    let files = dicom_files(&study_dir);
    let others = dicom_files(&other_dir);
    let http = free_port();
    let mut run = start_embedded(work.path(), &data, http);
    let url = format!("http://127.0.0.1:{http}/dicomweb");

    let good = files[0].to_str().unwrap();
    let mut args = vec![
        "malformed",
        url.as_str(),
        TOKEN,
        truth.study_uid.as_str(),
        good,
    ];
    args.extend(others.iter().map(|f| f.to_str().unwrap()));
    let r = client(&args);
    assert_eq!(r["status"], 202, "some stored, some failed: {r}");
    let response = &r["response"];
    let referenced = uids(&response["00081199"]);
    assert_eq!(referenced.len(), 1, "{response}");
    let failed = response["00081198"]["Value"].as_array().unwrap();
    let reasons: Vec<u64> = failed
        .iter()
        .map(|i| i["00081197"]["Value"][0].as_u64().unwrap())
        .collect();
    // Truncated, no SOP Instance UID, then each instance of the other study.
    let mut expected = vec![0xC000, 0xC000];
    expected.extend(std::iter::repeat_n(0xA900, others.len()));
    assert_eq!(reasons, expected, "{response}");
    assert!(failed.iter().all(|i| i["00081150"]["vr"] == "UI"));

    // The good part is stored; nothing of the failed ones is.
    let sop = &referenced[0];
    let got = std::fs::read(stored(&data, &truth.study_uid, &truth.series_uid, sop)).unwrap();
    let want = std::fs::read(&files[0]).unwrap();
    assert!(got == want, "the good part is not stored as sent");
    let series_folder = data.join(format!("dicom/{}/{}", truth.study_uid, truth.series_uid));
    let kept = std::fs::read_dir(&series_folder).unwrap().count();
    assert_eq!(
        kept,
        1,
        "only the good part is in {}",
        series_folder.display()
    );
    assert!(!data.join(format!("dicom/{}", other.study_uid)).exists());

    // The XML response, read by dicomweb-client's own XML reader.
    let x = client(&["xml", url.as_str(), TOKEN, files[1].to_str().unwrap()]);
    assert_eq!(x["status"], 200, "{x}");
    assert_eq!(x["content_type"], "application/dicom+xml");
    assert_eq!(uids(&x["response"]["00081199"]).len(), 1, "{x}");

    // No token, a wrong one: 401, and nothing is stored.
    let third = files[2].to_str().unwrap();
    for token in ["-", "stow-test-t0keN"] {
        let s = client(&["status", url.as_str(), token, third]);
        assert_eq!(s, 401, "token {token}");
    }
    assert_eq!(std::fs::read_dir(&series_folder).unwrap().count(), 2);
    run.assert_running();
}

#[test]
fn a_distributed_listener_serves_stow_rs_only_when_configured() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("stow-distributed");
    let series_dir = work.path().join("series");
    synth(&series_dir, 32, 1, &[]);
    let file = dicom_files(&series_dir).remove(0);
    let store_url = format!("file://{}", work.path().join("store").display());
    let start = |name: &str, extra: &[&str]| {
        let (http, dicom) = (free_port(), free_port());
        let mut cmd = radflow();
        cmd.arg("listener")
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &http.to_string()])
            .args(["--dicom-port", &dicom.to_string()])
            .args(extra);
        let mut p = Proc::spawn(name, cmd, work.path());
        wait_port(dicom, &mut [&mut p]);
        wait_for("listener ready", Duration::from_secs(30), || {
            p.assert_running();
            http_get(http, "/readyz").filter(|(s, _)| *s == 200)
        });
        (p, format!("http://127.0.0.1:{http}/dicomweb"))
    };
    let (mut off, url) = start("listener-off", &[]);
    let s = client(&["status", url.as_str(), "-", file.to_str().unwrap()]);
    assert_eq!(s, 404, "STOW-RS is off by default in distributed mode");
    off.terminate(Duration::from_secs(20));

    let (mut on, url) = start("listener-on", &["--dicomweb-token", TOKEN]);
    let s = client(&["status", url.as_str(), "-", file.to_str().unwrap()]);
    assert_eq!(s, 401);
    let s = client(&["status", url.as_str(), TOKEN, file.to_str().unwrap()]);
    assert_eq!(s, 200);
    on.assert_running();
}
