//! Batch scoring end to end: `radflow score` uploads 20 synthetic series, queues them
//! in the batch lane of a real nats-server, two inferer processes share the work, one
//! is killed in the middle and the command is interrupted; a second run of the command
//! resumes from the store and finishes. Every series must end with exactly one result,
//! scored exactly once, and the report must have one row per series.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use radflow_shared::testing::NatsServer;

const MODEL: &str = "demo-tissue@1.0.0";
const SERIES: usize = 20;

fn results(store: &Path) -> usize {
    std::fs::read_dir(store.join("results"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().join(MODEL).join("summary.json").is_file())
                .count()
        })
        .unwrap_or(0)
}

/// Series UID -> how many times a log says the model ran on it.
fn completions(logs: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in logs.iter().flat_map(|l| l.lines()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["fields"]["message"] == "inference completed"
            && let Some(series) = v["fields"]["series_uid"].as_str()
        {
            *out.entry(series.to_owned()).or_default() += 1;
        }
    }
    out
}

#[test]
fn score_survives_a_killed_inferer_and_resumes() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("score");
    let store = work.path().join("store");
    let store_url = format!("file://{}", store.display());
    let folder = work.path().join("archive");
    let mut uids = Vec::new();
    for i in 0..SERIES {
        let truth = synth(
            &folder.join(format!("s{i:02}")),
            64,
            12,
            &["--fov", "160", "--seed", &(i + 1).to_string()],
        );
        uids.push(truth.series_uid);
    }

    let worker = |role: &str, name: &str| {
        let mut cmd = radflow();
        cmd.arg(role)
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &free_port().to_string()])
            // A killed worker's message comes back quickly.
            .args(["--ack-wait-secs", "4"]);
        Proc::spawn(name, cmd, work.path())
    };
    let mut pre = worker("preprocessor", "preprocessor");
    let mut inf_a = worker("inferer", "inferer-a");
    let mut inf_b = worker("inferer", "inferer-b");

    let score = |report: &str, folder: Option<&Path>| {
        let mut cmd = radflow();
        cmd.args(["score", "--model", "demo-tissue", "--wait"])
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--max-in-flight", "4", "--timeout-secs", "400"])
            .arg("--report")
            .arg(work.path().join(report));
        if let Some(folder) = folder {
            cmd.arg("--folder").arg(folder);
        }
        cmd
    };

    // First run: upload and score until a few results are in, then a crash of one
    // inferer and of the command itself.
    let mut first = Proc::spawn("score-1", score("report-1", Some(&folder)), work.path());
    wait_for("the first results", Duration::from_secs(300), || {
        for p in [&mut pre, &mut inf_a, &mut inf_b] {
            p.assert_running();
        }
        let b_working = !completions(&[inf_b.logs()]).is_empty();
        (results(&store) >= 5 && b_working).then_some(())
    });
    inf_b.kill();
    first.kill();
    let done_before = results(&store);
    assert!(
        done_before < SERIES,
        "everything finished before the crash; the test proves nothing"
    );

    // Second run: from the store, no upload; resumes where the first stopped.
    let out = run_ok(score("report-2", None), "radflow score (resumed)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("0 failed"),
        "second run reported failures: {stdout}"
    );

    // Every series has one result.
    assert_eq!(results(&store), SERIES);
    for uid in &uids {
        let summary: serde_json::Value = serde_json::from_slice(
            &std::fs::read(store.join(format!("results/{uid}/{MODEL}/summary.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(summary["series_uid"], uid.as_str());
        assert!(
            summary["labels"].as_array().is_some_and(|l| !l.is_empty()),
            "{summary}"
        );
    }

    // The report: one row per series, nothing missing, the resumed ones marked.
    let csv = std::fs::read_to_string(work.path().join("report-2.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), SERIES, "{csv}");
    for uid in &uids {
        let row = rows
            .iter()
            .find(|r| r.contains(uid.as_str()))
            .unwrap_or_else(|| panic!("no row for {uid} in\n{csv}"));
        assert!(
            row.contains(",scored,") || row.contains(",already_scored,"),
            "{row}"
        );
    }
    let already = rows
        .iter()
        .filter(|r| r.contains(",already_scored,"))
        .count();
    assert!(
        already >= done_before,
        "{already} rows already scored, but {done_before} results existed: {csv}"
    );
    assert!(
        csv.lines().next().unwrap().contains("soft_tissue_ml"),
        "{csv}"
    );
    let jsonl = std::fs::read_to_string(work.path().join("report-2.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), SERIES);
    for line in jsonl.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(row["total_ms"].as_u64().is_some(), "no time in {row}");
        assert_eq!(row["provider"], "cpu", "{row}");
        assert!(
            row["label_volumes_ml"]["soft_tissue"].as_f64().unwrap() > 0.0,
            "{row}"
        );
    }
    let stored_reports = std::fs::read_dir(store.join(format!("reports/{MODEL}")))
        .unwrap()
        .count();
    assert!(stored_reports >= 2, "the report is also in the store");

    // Selection: a UID list, and filters on the headers (the phantom is an abdominal
    // CT of today); nothing left to score, every row is already scored.
    let rows_of = |report: &str| -> Vec<String> {
        std::fs::read_to_string(work.path().join(format!("{report}.csv")))
            .unwrap()
            .lines()
            .skip(1)
            .map(str::to_owned)
            .collect()
    };
    let list = work.path().join("uids.txt");
    std::fs::write(&list, format!("{}\n\n{}\n", uids[3], uids[7])).unwrap();
    let mut by_list = score("report-3", None);
    by_list.arg("--uids").arg(&list);
    run_ok(by_list, "radflow score --uids");
    let listed = rows_of("report-3");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.iter().all(|r| r.contains(",already_scored,")),
        "{listed:?}"
    );
    assert!(listed.iter().any(|r| r.contains(uids[3].as_str())));
    let mut by_header = score("report-4", None);
    by_header.args([
        "--modality",
        "ct",
        "--body-part",
        "ABDOMEN",
        "--since",
        "2000-01-01",
    ]);
    run_ok(by_header, "radflow score with header filters");
    assert_eq!(rows_of("report-4").len(), SERIES);
    for filter in [["--modality", "MR"], ["--until", "2000-01-01"]] {
        let mut none = score("report-5", None);
        none.args(filter);
        let out = none.output().unwrap();
        assert!(!out.status.success(), "{filter:?} selected something");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no series matches"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Nothing was scored twice: at most one "inference completed" per series over
    // both inferers (a series whose result the killed inferer had written before it
    // could log is finished by the other from that result, without running again).
    let counts = completions(&[inf_a.logs(), inf_b.logs()]);
    for (uid, n) in &counts {
        assert_eq!(*n, 1, "series {uid} was scored {n} times");
    }
    assert!(
        counts.len() >= SERIES - 1,
        "only {} series logged a completion",
        counts.len()
    );

    // The work went through the batch lane.
    assert!(
        pre.logs().contains("\"lane\":\"batch\""),
        "the preprocessor did not log batch-lane work"
    );
}

#[test]
fn batch_workers_exit_when_the_queue_is_drained() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("idle-exit");
    let store_url = format!("file://{}", work.path().join("store").display());
    for role in ["preprocessor", "inferer"] {
        let mut cmd = radflow();
        cmd.arg(role)
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &free_port().to_string()])
            .args(["--exit-when-idle-secs", "1"]);
        let mut proc = Proc::spawn(role, cmd, work.path());
        let status = wait_for(&format!("{role} to exit"), Duration::from_secs(60), || {
            proc.child.try_wait().unwrap()
        });
        assert!(
            status.success(),
            "{role} exited with {status}: {}",
            proc.logs()
        );
        assert!(proc.logs().contains("no work left"), "{}", proc.logs());
    }
}
