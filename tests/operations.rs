//! What operators rely on, with real tools: every `/metrics` passes `promtool check
//! metrics` and a real Prometheus scrapes a stage counter; `radflow status` shows a
//! stuck consumer's lag on a real nats-server; a poisoned series lands in the
//! dead-letter stream with its reason and is reprocessed by `dlq replay` once fixed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use radflow_shared::testing::NatsServer;

const MODEL: &str = "demo-tissue@1.0.0";

fn radflow_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = radflow();
    cmd.args(args);
    let out = run_ok(cmd, &format!("radflow {}", args.join(" ")));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `radflow run` with its data in `work`; returns it with its DICOM and HTTP ports.
fn embedded(work: &TempDir, quiet_secs: &str) -> (Proc, u16, u16) {
    let (dicom_port, http_port) = (free_port(), free_port());
    let mut cmd = radflow();
    cmd.arg("run")
        .arg("--data")
        .arg(work.path().join("data"))
        .args(["--dicom-port", &dicom_port.to_string()])
        .args(["--http-port", &http_port.to_string()])
        .args(["--series-quiet-secs", quiet_secs]);
    let mut run = Proc::spawn("run", cmd, work.path());
    wait_port(dicom_port, &mut [&mut run]);
    (run, dicom_port, http_port)
}

#[test]
fn metrics_pass_promtool_and_prometheus_scrapes_a_stage_counter() {
    let work = TempDir::new("metrics");
    let series = work.path().join("series");
    let truth = synth(&series, 64, 16, &[]);
    let (mut run, dicom_port, http_port) = embedded(&work, "2");

    // A real Prometheus scraping the process every second.
    let prom_port = free_port();
    let config = work.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: radflow\n    static_configs:\n      - targets: ['127.0.0.1:{http_port}']\n"
        ),
    )
    .unwrap();
    let prometheus = Path::new("/usr/bin/prometheus");
    assert!(
        prometheus.is_file(),
        "prometheus is missing: apt-get install prometheus"
    );
    let mut prom_cmd = Command::new(prometheus);
    prom_cmd
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            work.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"));
    let mut prom = Proc::spawn("prometheus", prom_cmd, work.path());
    wait_port(prom_port, &mut [&mut prom]);

    let out = storescu(dicom_port, "RADFLOW", &dicom_files(&series));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = work.path().join(format!(
        "data/results/{}/{MODEL}/summary.json",
        truth.series_uid
    ));
    wait_for("result", Duration::from_secs(90), || {
        run.assert_running();
        summary.is_file().then_some(())
    });

    // The worker counts a message once its handler has returned, which is a moment after
    // the handler wrote summary.json: wait for the count rather than race it.
    let processed = r#"radflow_messages_total{stage="inferer",outcome="processed"} 1"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        run.assert_running();
        let (code, metrics) = http_get(http_port, "/metrics").unwrap();
        assert_eq!(code, 200);
        if metrics.contains(processed) {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{processed} never appeared in:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&metrics, "radflow run");
    assert!(
        metrics.contains("radflow_dicom_instances_stored_total 16"),
        "{metrics}"
    );

    let query = "/api/v1/query?query=radflow_messages_total%7Bstage%3D%22inferer%22%2Coutcome%3D%22processed%22%7D";
    let value = wait_for(
        "Prometheus to scrape the inferer counter",
        Duration::from_secs(60),
        || {
            prom.assert_running();
            let (code, body) = http_get(prom_port, query)?;
            if code != 200 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let sample = v["data"]["result"].get(0)?["value"][1].as_str()?.to_owned();
            Some(sample)
        },
    );
    assert_eq!(value, "1");
}

#[test]
fn status_shows_a_stuck_consumer_and_a_poisoned_series_is_replayed_after_the_fix() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("ops");
    let store = work.path().join("store");
    let store_url = format!("file://{}", store.display());
    let dicom_port = free_port();
    let component = |name: &str, extra: &[&str]| {
        let mut cmd = radflow();
        cmd.arg(name)
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &free_port().to_string()])
            .args(extra);
        Proc::spawn(name, cmd, work.path())
    };
    let mut listener = component(
        "listener",
        &[
            "--dicom-port",
            &dicom_port.to_string(),
            "--series-quiet-secs",
            "1",
        ],
    );
    wait_port(dicom_port, &mut [&mut listener]);

    // A preprocessor joins (creating its durable consumer) and dies: its queue is stuck.
    let mut pre = component("preprocessor", &["--max-deliver", "2"]);
    wait_for("preprocessor consumer", Duration::from_secs(30), || {
        pre.assert_running();
        pre.logs().contains("consuming").then_some(())
    });
    pre.kill();

    let good = work.path().join("good");
    let good_truth = synth(&good, 48, 12, &["--seed", "3"]);
    let bad = work.path().join("bad");
    let bad_truth = synth(&bad, 48, 12, &["--seed", "4"]);
    let odd = poison(&bad, "2.25.1234567890123456789");
    for dir in [&good, &bad] {
        let out = storescu(dicom_port, "RADFLOW", &dicom_files(dir));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let url = nats.url();
    let monitor = nats.monitor_url();
    let stuck = wait_for(
        "two series waiting for the preprocessor, the oldest for a while",
        Duration::from_secs(30),
        || {
            let report = radflow_json(&[
                "status",
                "--json",
                "--nats-url",
                &url,
                "--nats-monitor-url",
                &monitor,
            ]);
            let series = report["streams"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == "RADFLOW_SERIES")?
                .clone();
            let consumer = series["consumers"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "preprocessor")?
                .clone();
            // The age is in whole milliseconds: read right after the second series
            // arrived it may still be 0, so wait until it has grown.
            let aged = consumer["oldest_pending_age_ms"].as_u64()? > 0;
            (consumer["pending"] == 2 && aged).then_some(report)
        },
    );
    let report = stuck;
    assert_eq!(report["bus"], "nats");
    assert!(
        report["server"]["version"]
            .as_str()
            .unwrap()
            .starts_with("2."),
        "{report}"
    );
    let mut text = radflow();
    text.args(["status", "--nats-url", &url]);
    let text = String::from_utf8(run_ok(text, "radflow status").stdout).unwrap();
    assert!(
        text.contains("RADFLOW_SERIES") && text.contains("preprocessor"),
        "{text}"
    );

    // The pipeline comes up: the good series gets a result, the bad one a dead letter.
    let _pre = component("preprocessor", &["--max-deliver", "2"]);
    let mut inf = component("inferer", &[]);
    let result = |t: &Truth| store.join(format!("results/{}/{MODEL}/summary.json", t.series_uid));
    wait_for("the good series' result", Duration::from_secs(120), || {
        inf.assert_running();
        result(&good_truth).is_file().then_some(())
    });
    let dead = wait_for("a dead letter", Duration::from_secs(60), || {
        let list = radflow_json(&["dlq", "list", "--json", "--nats-url", &url]);
        let first = list.as_array()?.first()?.clone();
        Some(first)
    });
    assert_eq!(dead["stage"], "preprocessor");
    assert_eq!(dead["code"], "missing_attribute");
    assert_eq!(dead["series_uid"], bad_truth.series_uid.as_str());
    assert!(
        dead["reason"]
            .as_str()
            .unwrap()
            .contains("1 of 13 images have no"),
        "{dead}"
    );
    assert!(!result(&bad_truth).exists());

    // The fix: remove the instance that does not belong, then replay.
    let stored_odd = store.join(format!(
        "dicom/{}/{}/2.25.1234567890123456789.dcm",
        bad_truth.study_uid, bad_truth.series_uid
    ));
    assert!(stored_odd.is_file(), "{} not stored", odd.display());
    std::fs::remove_file(&stored_odd).unwrap();
    let mut replay = radflow();
    replay.args(["dlq", "replay", "--all", "--nats-url", &url]);
    let out = run_ok(replay, "radflow dlq replay");
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 1"));
    wait_for(
        "the repaired series' result",
        Duration::from_secs(120),
        || {
            inf.assert_running();
            result(&bad_truth).is_file().then_some(())
        },
    );
    let list = radflow_json(&["dlq", "list", "--json", "--nats-url", &url]);
    assert_eq!(list, serde_json::json!([]));
}

#[test]
fn embedded_status_over_http() {
    let work = TempDir::new("embedded-status");
    let (_run, dicom_port, http_port) = embedded(&work, "30");
    let series = work.path().join("series");
    let truth = synth(&series, 32, 4, &[]);
    let out = storescu(dicom_port, "RADFLOW", &dicom_files(&series));
    assert!(out.status.success());
    let url = format!("http://127.0.0.1:{http_port}");
    let report = wait_for("the series in assembly", Duration::from_secs(20), || {
        let r = radflow_json(&["status", "--json", "--url", &url]);
        (r["assembling"].as_array()?.len() == 1).then_some(r)
    });
    assert_eq!(report["bus"], "in-process");
    assert_eq!(
        report["assembling"][0]["series_uid"],
        truth.series_uid.as_str()
    );
    assert_eq!(report["assembling"][0]["instances"], 4);
}

/// What a newcomer does: `radflow run` in an empty folder with its defaults (HTTP on
/// 8080), a study sent, then `radflow status` and `radflow dlq list` with no flags at
/// all find that instance. Only the DICOM port is moved off 11112, so that a DICOM node
/// running on the machine cannot get in the way; the HTTP port is the default one, which
/// is the point of the test. Before the instance starts, `radflow status` says where it
/// looked and how to point it elsewhere, instead of a bare connection error.
#[test]
fn status_and_dlq_find_the_local_instance_without_flags() {
    let work = TempDir::new("status-no-flags");
    let no_flags = |args: &[&str]| {
        let mut cmd = radflow();
        cmd.current_dir(work.path())
            .env_remove("RADFLOW_URL")
            .env_remove("RADFLOW_NATS_URL")
            .env_remove("RADFLOW_ADMIN_TOKEN")
            .args(args);
        cmd
    };
    let out = no_flags(&["status", "--json"]).output().unwrap();
    assert!(!out.status.success(), "nothing should answer on 8080 yet");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:8080"), "{err}");
    assert!(err.contains("--nats-url") && err.contains("--url"), "{err}");

    let dicom_port = free_port();
    let mut cmd = radflow();
    cmd.current_dir(work.path())
        .env("ORT_DYLIB_PATH", ort_library())
        .env("RADFLOW_ADMIN_TOKEN", "t0ken-of-the-admin")
        .env_remove("RADFLOW_URL")
        .env_remove("RADFLOW_NATS_URL")
        .args(["run", "--dicom-port", &dicom_port.to_string()])
        .args(["--series-quiet-secs", "30"]);
    let mut run = Proc::spawn("run", cmd, work.path());
    wait_port(dicom_port, &mut [&mut run]);
    wait_port(8080, &mut [&mut run]);

    let series = work.path().join("series");
    let truth = synth(&series, 32, 3, &[]);
    let mut send = radflow();
    send.arg("send")
        .arg(&series)
        .args(["--to", &format!("127.0.0.1:{dicom_port}")]);
    let sent = run_ok(send, "radflow send");
    // Not on a terminal: progress as plain lines on stderr, the last one complete (the
    // phantom's truth.json is a file too, skipped as not DICOM).
    let stderr = String::from_utf8_lossy(&sent.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("4/4 files (100 %)") && l.contains("MB/s")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&sent.stdout);
    assert!(stdout.contains("sent 3 instance(s)"), "{stdout}");
    assert!(
        work.path().join("radflow-data/dicom").is_dir(),
        "`radflow run` keeps its data in ./radflow-data"
    );

    let json = |args: &[&str]| {
        let out = run_ok(no_flags(args), &format!("radflow {}", args.join(" ")));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let report = wait_for(
        "the study in `radflow status`",
        Duration::from_secs(20),
        || {
            let r = json(&["status", "--json"]);
            (r["assembling"].as_array()?.len() == 1).then_some(r)
        },
    );
    assert_eq!(report["bus"], "in-process");
    assert_eq!(
        report["assembling"][0]["series_uid"],
        truth.series_uid.as_str()
    );
    assert_eq!(report["assembling"][0]["instances"], 3);
    assert_eq!(json(&["dlq", "list", "--json"]), serde_json::json!([]));

    // Replay changes state: refused without the instance's admin token, done with it.
    let refused = no_flags(&["dlq", "replay", "--all"]).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("401") && err.contains("admin token"), "{err}");
    let mut replay = no_flags(&["dlq", "replay", "--all"]);
    replay.env("RADFLOW_ADMIN_TOKEN", "t0ken-of-the-admin");
    let out = run_ok(replay, "radflow dlq replay with the token");
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 0"));
    assert!(
        !run.logs().contains("t0ken-of-the-admin"),
        "the admin token was logged"
    );
    run.assert_running();
}

/// A minimal OTLP/HTTP receiver: records the bodies POSTed to /v1/traces.
fn otlp_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = header.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if request_line.starts_with("POST /v1/traces") {
                        sink.lock().unwrap().push(body);
                    }
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (port, bodies)
}

#[test]
fn spans_are_exported_over_otlp_with_the_correlation_id() {
    let work = TempDir::new("otlp");
    let (otlp_port, bodies) = otlp_receiver();
    let (dicom_port, http_port) = (free_port(), free_port());
    let mut cmd = radflow();
    cmd.arg("run")
        .arg("--data")
        .arg(work.path().join("data"))
        .args(["--dicom-port", &dicom_port.to_string()])
        .args(["--http-port", &http_port.to_string()])
        .args(["--series-quiet-secs", "1"])
        .args(["--otlp-endpoint", &format!("http://127.0.0.1:{otlp_port}")]);
    let mut run = Proc::spawn("run", cmd, work.path());
    wait_port(dicom_port, &mut [&mut run]);
    let series = work.path().join("series");
    let truth = synth(&series, 48, 12, &[]);
    assert!(
        storescu(dicom_port, "RADFLOW", &dicom_files(&series))
            .status
            .success()
    );
    let summary_path = work.path().join(format!(
        "data/results/{}/{MODEL}/summary.json",
        truth.series_uid
    ));
    let summary: serde_json::Value = wait_for("result", Duration::from_secs(90), || {
        run.assert_running();
        serde_json::from_slice(&std::fs::read(&summary_path).ok()?).ok()
    });
    let status = run
        .terminate(Duration::from_secs(30))
        .expect("stops on SIGTERM");
    assert!(status.success());
    let correlation = summary["correlation_id"]
        .as_str()
        .unwrap()
        .as_bytes()
        .to_vec();
    let bodies = bodies.lock().unwrap();
    assert!(!bodies.is_empty(), "no OTLP export arrived");
    let all: Vec<u8> = bodies.iter().flatten().copied().collect();
    let found = all.windows(correlation.len()).any(|w| w == correlation);
    assert!(found, "no exported span carries the correlation id");
    for stage in [&b"preprocessor"[..], b"inferer", b"assembler"] {
        assert!(
            all.windows(stage.len()).any(|w| w == stage),
            "no span of stage {}",
            String::from_utf8_lossy(stage)
        );
    }
}
