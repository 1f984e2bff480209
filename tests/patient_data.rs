//! No patient data outside the DICOM files: a study full of recognisable demographics
//! goes through the distributed pipeline (real nats-server, the three components as
//! processes, debug logging), one of its series poisoned so that a dead letter is made
//! too; then every log line, every `/metrics` page, every message of every JetStream
//! stream (events, KV series state, dead letters, with their headers), the output of
//! `radflow status` and `radflow dlq list`, every component's web page and the JSON it
//! draws, and every stored file except the DICOM
//! instances themselves are searched for each value. None may appear.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::demographics::{DEMOGRAPHICS, add_demographics, found_in};
use common::*;
use radflow_shared::testing::NatsServer;

const MODEL: &str = "demo-tissue@1.0.0";

/// Every file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every message of every JetStream stream on the server, headers and payload, as
/// `(stream, sequence, bytes)`.
fn every_stream_message(nats_url: &str) -> Vec<(String, u64, Vec<u8>)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures::TryStreamExt;
        let client = async_nats::connect(nats_url)
            .await
            .expect("connect to NATS");
        let js = async_nats::jetstream::new(client);
        let names: Vec<String> = js.stream_names().try_collect().await.unwrap();
        let mut out = Vec::new();
        for name in names {
            let mut stream = js.get_stream(&name).await.unwrap();
            let info = stream.info().await.unwrap();
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            for seq in first..=last {
                let Ok(msg) = stream.get_raw_message(seq).await else {
                    continue; // deleted (work queue acked, KV superseded)
                };
                let mut bytes = msg.subject.as_bytes().to_vec();
                for (k, values) in msg.headers.iter() {
                    bytes.extend_from_slice(k.to_string().as_bytes());
                    for v in values {
                        bytes.extend_from_slice(v.as_str().as_bytes());
                    }
                }
                bytes.extend_from_slice(&msg.payload);
                out.push((name.clone(), seq, bytes));
            }
        }
        out
    })
}

#[test]
fn no_demographics_in_logs_metrics_events_status_or_results() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("patient-data");
    let store = work.path().join("store");
    let store_url = format!("file://{}", store.display());
    let dicom_port = free_port();
    let http = [free_port(), free_port(), free_port()];
    let component = |name: &str, port: u16, extra: &[&str]| {
        let mut cmd = radflow();
        cmd.arg(name)
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &port.to_string()])
            .args(["--log", "debug,ort=warn,async_nats=info,hyper=info"])
            .args(extra);
        Proc::spawn(name, cmd, work.path())
    };
    let dicom = dicom_port.to_string();
    let mut listener = component(
        "listener",
        http[0],
        &["--dicom-port", &dicom, "--series-quiet-secs", "1"],
    );
    let mut pre = component("preprocessor", http[1], &["--max-deliver", "1"]);
    let mut inf = component("inferer", http[2], &[]);
    wait_port(dicom_port, &mut [&mut listener]);

    let good = work.path().join("good");
    let good_truth = synth(&good, 48, 12, &["--seed", "11"]);
    add_demographics(&good);
    let bad = work.path().join("bad");
    let bad_truth = synth(&bad, 48, 12, &["--seed", "12"]);
    poison(&bad, "2.25.98765432109876543210");
    add_demographics(&bad);
    // The check can tell: the demographics really are in what was sent.
    let sent = std::fs::read(dicom_files(&good).remove(0)).unwrap();
    let found = found_in(&sent);
    for (tag, value, _) in DEMOGRAPHICS {
        assert!(found.contains(value), "dcmodify did not write {tag}");
    }
    for dir in [&good, &bad] {
        let out = storescu(dicom_port, "RADFLOW", &dicom_files(dir));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let summary = store.join(format!(
        "results/{}/{MODEL}/summary.json",
        good_truth.series_uid
    ));
    wait_for("the good series' result", Duration::from_secs(180), || {
        for p in [&mut listener, &mut pre, &mut inf] {
            p.assert_running();
        }
        summary.is_file().then_some(())
    });
    let dead = wait_for(
        "the poisoned series' dead letter",
        Duration::from_secs(60),
        || {
            let mut cmd = radflow();
            cmd.args(["dlq", "list", "--json", "--nats-url", &nats.url()]);
            let out = run_ok(cmd, "radflow dlq list");
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let first = list.as_array()?.first()?.clone();
            (first["series_uid"] == bad_truth.series_uid.as_str()).then_some(out.stdout)
        },
    );

    let mut leaks: Vec<String> = Vec::new();
    let mut check = |what: String, bytes: &[u8]| {
        let found = found_in(bytes);
        if !found.is_empty() {
            leaks.push(format!("{what}: {found:?}"));
        }
    };

    // Dead letters and status, as an operator reads them.
    check("radflow dlq list --json".into(), &dead);
    for args in [
        vec!["dlq", "list"],
        vec!["status", "--json"],
        vec!["status"],
    ] {
        let mut cmd = radflow();
        cmd.args(&args).args(["--nats-url", &nats.url()]);
        let out = run_ok(cmd, "radflow status/dlq");
        check(format!("radflow {}", args.join(" ")), &out.stdout);
        check(format!("radflow {} (stderr)", args.join(" ")), &out.stderr);
    }
    // Metrics of every component.
    for (name, port) in ["listener", "preprocessor", "inferer"].iter().zip(http) {
        let (code, body) = http_get(port, "/metrics").expect("metrics");
        assert_eq!(code, 200);
        assert!(body.contains("radflow_"), "{name}: no radflow metrics");
        check(format!("{name} /metrics"), body.as_bytes());
    }
    // The web page of every component and the data it draws (which does show the
    // result and the dead letter, so the search can tell).
    for (name, port) in ["listener", "preprocessor", "inferer"].iter().zip(http) {
        for path in ["/ui/", "/ui/overview.json"] {
            let (code, body) = http_get(port, path).expect("the web page");
            assert_eq!(code, 200, "{name} {path}: {body}");
            if path.ends_with(".json") {
                assert!(
                    body.contains(&good_truth.series_uid),
                    "{name}: no result in {body}"
                );
                assert!(
                    body.contains(&bad_truth.series_uid),
                    "{name}: no dead letter in {body}"
                );
            }
            check(format!("{name} {path}"), body.as_bytes());
        }
    }
    // Every message of every stream: events, series state, dead letters.
    let messages = every_stream_message(&nats.url());
    assert!(
        messages.iter().any(|(s, _, _)| s == "RADFLOW_DLQ"),
        "no dead letter in the streams"
    );
    assert!(
        messages.iter().any(|(s, _, _)| s == "RADFLOW_RESULTS"),
        "no result event in the streams"
    );
    for (stream, seq, bytes) in &messages {
        check(format!("stream {stream} message {seq}"), bytes);
    }
    // Every stored file but the instances as received and DICOM results.
    let mut searched = 0;
    for file in files_below(&store) {
        let rel = file
            .strip_prefix(&store)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel.starts_with("dicom/") || rel.ends_with(".dcm") {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap();
        let bytes = if rel.ends_with(".gz") {
            use std::io::Read;
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .unwrap_or_else(|e| panic!("{rel}: {e}"));
            out.extend_from_slice(&bytes); // the gzip header (file name, comment) too
            out
        } else {
            bytes
        };
        check(format!("store {rel}"), &bytes);
        searched += 1;
    }
    assert!(searched >= 5, "only {searched} result files found");
    // Logs of every process, at debug level.
    for p in [&mut listener, &mut pre, &mut inf] {
        p.assert_running();
        let logs = p.logs();
        assert!(logs.lines().count() > 5, "{}: too few log lines", p.name);
        let found = found_in(logs.as_bytes());
        if !found.is_empty() {
            let lines: Vec<&str> = logs
                .lines()
                .filter(|l| !found_in(l.as_bytes()).is_empty())
                .take(3)
                .collect();
            leaks.push(format!("{} log: {found:?} in {lines:#?}", p.name));
        }
    }
    assert!(
        leaks.is_empty(),
        "patient data found:\n{}",
        leaks.join("\n")
    );
}
