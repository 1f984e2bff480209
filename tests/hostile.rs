//! Every C-STORE gets an answer: the hostile corpus (`tests/fixtures/hostile`, made by
//! its `gen.py`) sent as its bytes are by pynetdicom, on one association, to a running
//! `radflow run`. Each malformed instance gets a failure status with an error comment
//! and is not stored; each good one is stored; the association goes on to the end; and
//! the same holds for instances large enough to be judged part by part as they arrive.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::*;

/// Failure statuses a refusal may carry: 0xA7xx Out of Resources, 0xA900 Dataset does
/// not match SOP Class, 0xCxxx Cannot Understand.
fn is_refusal(status: u64) -> bool {
    (0xA700..=0xA7FF).contains(&status) || status == 0xA900 || (0xC000..=0xCFFF).contains(&status)
}

fn stored_sop_uids(root: &Path) -> HashSet<String> {
    let mut found = HashSet::new();
    let mut dirs = vec![root.join("dicom")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(uid) = name.strip_suffix(".dcm")
            {
                found.insert(uid.to_string());
            }
        }
    }
    found
}

/// Sends a corpus folder and checks every answer and what the store holds.
fn send_and_check(corpus: &Path, dicom_port: u16, store: &Path) {
    let listing: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(corpus.join("corpus.json")).unwrap())
            .unwrap();
    let mut send = std::process::Command::new(python());
    send.arg(repo().join("tests/fixtures/hostile/send.py"))
        .arg(dicom_port.to_string())
        .arg("RADFLOW")
        .arg(corpus);
    let out = run_ok(send, "send.py");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().expect("send.py printed nothing");
    assert_eq!(
        last["association"], "up",
        "the association must go on after every refusal: {lines:#?}"
    );
    let controls = listing.iter().filter(|c| c["expect"] == "stored").count();
    assert_eq!(lines.len(), listing.len() + controls + 1, "{lines:#?}");

    let stored = stored_sop_uids(store);
    for (entry, answer) in listing.iter().zip(&lines) {
        let file = entry["file"].as_str().unwrap();
        assert_eq!(answer["file"], file);
        let status = answer["status"]
            .as_u64()
            .unwrap_or_else(|| panic!("{file}: no C-STORE response ({answer})"));
        let uid = entry["sop_instance_uid"].as_str().unwrap();
        match entry["expect"].as_str().unwrap() {
            "stored" => {
                assert_eq!(status, 0, "{file} ({}): {answer}", entry["why"]);
                assert!(
                    stored.contains(uid),
                    "{file} answered Success but not stored"
                );
            }
            _ => {
                assert!(
                    is_refusal(status),
                    "{file} ({}): status {status:#06x}, expected a failure",
                    entry["why"]
                );
                let comment = answer["comment"].as_str().unwrap_or_default();
                assert!(!comment.is_empty(), "{file}: a refusal says why");
                assert!(!stored.contains(uid), "{file} was refused but stored");
            }
        }
    }
    // The good controls, sent again after all the hostile instances, are stored again.
    for answer in &lines[listing.len()..lines.len() - 1] {
        assert_eq!(answer["status"], 0, "control after the corpus: {answer}");
    }
}

#[test]
fn every_c_store_of_the_hostile_corpus_gets_an_answer_and_nothing_broken_is_kept() {
    let work = TempDir::new("hostile");
    let (dicom_port, http_port) = (free_port(), free_port());
    let mut cmd = radflow();
    cmd.current_dir(work.path())
        .env("ORT_DYLIB_PATH", ort_library())
        .args(["run", "--dicom-port", &dicom_port.to_string()])
        .args(["--http-port", &http_port.to_string()])
        // Instances over 8 MiB are judged part by part as they arrive.
        .args(["--stream-threshold", &(8u64 << 20).to_string()])
        .args(["--series-quiet-secs", "600"]);
    let mut run = Proc::spawn("run", cmd, work.path());
    wait_port(dicom_port, &mut [&mut run]);
    let store = work.path().join("radflow-data");

    send_and_check(&repo().join("tests/fixtures/hostile"), dicom_port, &store);

    let large: PathBuf = work.path().join("large");
    let mut generate = std::process::Command::new(python());
    generate
        .arg(repo().join("tests/fixtures/hostile/gen.py"))
        .arg("--large")
        .arg(&large);
    run_ok(generate, "gen.py --large");
    send_and_check(&large, dicom_port, &store);

    run.assert_running();
    let mut echo = dcmtk("echoscu");
    echo.args(["-aec", "RADFLOW", "127.0.0.1", &dicom_port.to_string()]);
    run_ok(echo, "echoscu after the corpus");
    // The refusals are logged with their reason, which names tags and offsets only.
    let logs = run.logs();
    assert!(logs.contains("instance refused"), "{logs}");
}
