//! Results back to DICOM nodes, end to end with real peers: DCMTK's storescu sends a
//! synthetic CT to the listener; the preprocessor, the inferer and the exporter run as
//! their own processes on a real nats-server; DCMTK's storescp plays the destinations.
//!
//! One destination is the sending AE ("back to the caller") and is down when the first
//! export is tried: once it is up, it receives the SEG and the SR exactly once each,
//! byte for byte as stored. Another stays down: its job ends in the dead-letter stream
//! after the configured deliveries, with the reason. The embedded mode (`radflow run
//! --destinations`) exports the same way.

mod common;

use std::time::Duration;

use common::*;
use radflow_shared::testing::NatsServer;

const MODEL: &str = "demo-tissue@1.0.0";

#[test]
fn results_reach_the_caller_once_after_it_comes_back_and_a_dead_destination_is_dead_lettered() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("dicom-export");
    let store = work.path().join("store");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 64, 24, &["--seed", "3"]);
    let store_url = format!("file://{}", store.display());
    let (dicom_port, console_port, down_port) = (free_port(), free_port(), free_port());

    // The sender (calling AE CT-SCANNER) is also a destination; "down" never listens.
    let destinations = work.path().join("destinations.toml");
    destinations_file(
        &destinations,
        &[
            ("console", "CT-SCANNER", console_port),
            ("down", "NOBODY", down_port),
        ],
        &["caller", "down"],
    );

    let mut stack = Stack::start(
        &nats.url(),
        &store_url,
        dicom_port,
        &[
            "--destinations".as_ref(),
            destinations.as_os_str(),
            "--max-deliver".as_ref(),
            "3".as_ref(),
        ],
        work.path(),
    );
    let exp_http = stack.exporter_http;

    let out = storescu(dicom_port, "RADFLOW", &dicom_files(&series_dir));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The console is down at first: the exporter counts a retry for it.
    wait_for(
        "a failed try to the console",
        Duration::from_secs(120),
        || {
            stack.assert_running();
            (exports(exp_http, "console", "retry") >= 1.0).then_some(())
        },
    );
    let inbox = work.path().join("console");
    let mut console = storescp(console_port, "CT-SCANNER", &inbox, work.path(), false);

    wait_for("SEG and SR at the console", Duration::from_secs(60), || {
        stack.exporter.assert_running();
        console.assert_running();
        (exports(exp_http, "console", "sent") >= 1.0 && files_in(&inbox).len() >= 2).then_some(())
    });
    // Exactly once each, byte for byte the stored objects' datasets.
    let result = store.join(format!("results/{}/{MODEL}", truth.series_uid));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(result.join("summary.json")).unwrap()).unwrap();
    let files = files_in(&inbox);
    assert_eq!(files.len(), 2, "{files:?}");
    for object in summary["dicom"].as_array().unwrap() {
        let uid = object["sop_instance_uid"].as_str().unwrap();
        let got = files
            .iter()
            .find(|f| f.file_name().unwrap().to_string_lossy().contains(uid))
            .unwrap_or_else(|| panic!("{uid} not received: {files:?}"));
        let stored = std::fs::read(result.join(object["file"].as_str().unwrap())).unwrap();
        let arrived = std::fs::read(got).unwrap();
        let (arrived, stored) = (dataset(&arrived), dataset(&stored));
        let first_difference = arrived.iter().zip(stored).position(|(a, b)| a != b);
        assert!(
            arrived.len() == stored.len() && first_difference.is_none(),
            "{uid} arrived changed: {} bytes for {}, first difference at {first_difference:?}",
            arrived.len(),
            stored.len()
        );
        dciodvfy(got);
    }

    // The destination that stays down: dead-lettered after 3 deliveries, with why.
    let dead = wait_for("the dead letter of 'down'", Duration::from_secs(90), || {
        stack.exporter.assert_running();
        let (code, body) = http_get(exp_http, "/dlq")?;
        assert_eq!(code, 200, "{body}");
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        list.as_array()?
            .iter()
            .find(|d| d["stage"] == "exporter")
            .cloned()
    });
    assert_eq!(dead["attempts"], 3, "{dead}");
    let reason = dead["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("down: ") && reason.contains(&down_port.to_string()),
        "{dead}"
    );
    assert_eq!(dead["series_uid"], truth.series_uid.as_str());

    // Nothing more arrives at the console, and its job left the queue.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(files_in(&inbox).len(), 2);
    assert_eq!(exports(exp_http, "console", "sent"), 1.0);
    let (_, metrics) = http_get(exp_http, "/metrics").unwrap();
    promtool_check(&metrics, "exporter");

    // `radflow status` shows each destination: the console took its job after failed
    // tries, "down" failed every time and its job is dead.
    let out = radflow()
        .args(["status", "--json", "--nats-url", &nats.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = status["exports"].as_array().expect("exports in status");
    let row = |name: &str| {
        exports
            .iter()
            .find(|e| e["destination"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {status}"))
            .clone()
    };
    let (console_row, down_row) = (row("console"), row("down"));
    assert_eq!(console_row["sent"], 1, "{console_row}");
    assert_eq!(console_row["waiting"], 0, "{console_row}");
    assert!(
        console_row["failed_attempts"].as_u64().unwrap() >= 1,
        "{console_row}"
    );
    assert!(
        console_row["last_success_ms"].as_u64() > console_row["last_failure_ms"].as_u64(),
        "{console_row}"
    );
    assert_eq!(down_row["sent"], 0, "{down_row}");
    assert_eq!(down_row["failed_attempts"], 3, "{down_row}");
    assert_eq!(down_row["dead_letters"], 1, "{down_row}");
    assert!(
        down_row["last_error"]
            .as_str()
            .unwrap()
            .contains(&down_port.to_string()),
        "{down_row}"
    );
    let out = radflow()
        .args(["status", "--nats-url", &nats.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let down_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("down "))
        .unwrap_or_else(|| panic!("no line for down in:\n{text}"));
    assert!(
        down_line.contains("never") && down_line.contains(&down_port.to_string()),
        "{text}"
    );
    console.kill();
}

/// The dataset of a Part-10 file: what follows the File Meta group.
fn dataset(file: &[u8]) -> &[u8] {
    assert_eq!(&file[128..132], b"DICM");
    // (0002,0000) File Meta Information Group Length, UL, explicit VR.
    let group_len = u32::from_le_bytes(file[140..144].try_into().unwrap()) as usize;
    &file[144 + group_len..]
}

/// The embedded mode exports too: `radflow run --destinations` sends the SEG and the SR
/// of a result to its destination, byte for byte as stored.
#[test]
fn the_embedded_mode_exports_the_results() {
    let work = TempDir::new("dicom-export-embedded");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 64, 16, &["--seed", "5"]);
    let (dicom_port, http_port, pacs_port) = (free_port(), free_port(), free_port());
    let inbox = work.path().join("pacs");
    let mut pacs = storescp(pacs_port, "PACS", &inbox, work.path(), false);
    let destinations = work.path().join("destinations.toml");
    destinations_file(&destinations, &[("pacs", "PACS", pacs_port)], &["pacs"]);
    let mut cmd = embedded(&work.path().join("data"), dicom_port, http_port);
    cmd.args(["--series-quiet-secs", "2"])
        .arg("--destinations")
        .arg(&destinations);
    let mut run = Proc::spawn("run", cmd, work.path());
    wait_port(dicom_port, &mut [&mut run]);

    let out = storescu(dicom_port, "RADFLOW", &dicom_files(&series_dir));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "SEG and SR at the destination",
        Duration::from_secs(120),
        || {
            run.assert_running();
            pacs.assert_running();
            (exports(http_port, "pacs", "sent") >= 1.0 && files_in(&inbox).len() >= 2).then_some(())
        },
    );
    let result = work
        .path()
        .join(format!("data/results/{}/{MODEL}", truth.series_uid));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(result.join("summary.json")).unwrap()).unwrap();
    let files = files_in(&inbox);
    assert_eq!(files.len(), 2, "{files:?}");
    for object in summary["dicom"].as_array().unwrap() {
        let uid = object["sop_instance_uid"].as_str().unwrap();
        let got = files
            .iter()
            .find(|f| f.file_name().unwrap().to_string_lossy().contains(uid))
            .unwrap_or_else(|| panic!("{uid} not received: {files:?}"));
        let stored = std::fs::read(result.join(object["file"].as_str().unwrap())).unwrap();
        let arrived = std::fs::read(got).unwrap();
        assert!(
            dataset(&arrived) == dataset(&stored),
            "{uid} arrived changed ({} bytes for {})",
            arrived.len(),
            stored.len()
        );
    }
    pacs.kill();
}
