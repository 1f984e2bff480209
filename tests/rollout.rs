//! A model version rollout in a running pipeline (listener, preprocessor and inferer
//! on a real nats-server, studies from DCMTK storescu): demo-tissue 1.0.0 serves, then
//! 1.1.0 joins as a shadow and writes its results beside 1.0.0's, then 1.1.0 serves
//! alone. The inferer applies each registry without a restart; the preprocessor is
//! restarted, as a Kubernetes rolling update would. Every study, including those sent
//! during a switch, gets exactly one serving result.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use radflow_shared::testing::NatsServer;

const BUILTIN: &str = include_str!("../models/models.toml");

/// The built-in registry entry with another version, optionally on trial.
fn entry(version: &str, shadow: bool) -> String {
    let body = BUILTIN.split("[[model]]").nth(1).unwrap();
    let body = body.replace("version = \"1.0.0\"", &format!("version = \"{version}\""));
    let body = if shadow {
        body.replacen("kind = ", "shadow = true\nkind = ", 1)
    } else {
        body
    };
    format!("[[model]]{body}")
}

fn write_registry(path: &Path, entries: &[String]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, entries.join("\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The summaries of a series: (version, shadow).
fn summaries(store: &Path, series: &str) -> Vec<(String, bool)> {
    let Ok(dir) = std::fs::read_dir(store.join("results").join(series)) else {
        return vec![];
    };
    let mut out: Vec<(String, bool)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join("summary.json")).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            Some((
                v["model_version"].as_str()?.to_owned(),
                v["shadow"].as_bool().unwrap_or(false),
            ))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_new_model_version_rolls_out_with_a_shadow_phase_and_no_study_lost() {
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("rollout");
    let store = work.path().join("store");
    let store_url = format!("file://{}", store.display());
    let registry = work.path().join("models.toml");
    write_registry(&registry, &[entry("1.0.0", false)]);

    let component = |role: &str| {
        let mut cmd = radflow();
        cmd.arg(role)
            .args(["--nats-url", &nats.url(), "--store-url", &store_url])
            .args(["--http-port", &free_port().to_string()])
            .arg("--models")
            .arg(&registry);
        cmd
    };
    let dicom_port = free_port();
    let mut listener = radflow();
    listener
        .arg("listener")
        .args(["--nats-url", &nats.url(), "--store-url", &store_url])
        .args(["--http-port", &free_port().to_string()]);
    listener.args(["--dicom-port", &dicom_port.to_string()]);
    listener.args([
        "--series-quiet-secs",
        "2",
        "--series-release-quiet-secs",
        "1",
    ]);
    let mut listener = Proc::spawn("listener", listener, work.path());
    let mut pre = Proc::spawn("preprocessor-1", component("preprocessor"), work.path());
    let mut inferer = component("inferer");
    inferer.args(["--models-reload-secs", "1"]);
    let mut inf = Proc::spawn("inferer", inferer, work.path());
    wait_port(dicom_port, &mut [&mut listener, &mut pre, &mut inf]);

    let study = |n: u64| {
        let dir = work.path().join(format!("study-{n}"));
        let truth = synth(&dir, 64, 12, &["--fov", "160", "--seed", &n.to_string()]);
        (dir, truth.series_uid)
    };
    let send = |dir: &Path| {
        let out = storescu(dicom_port, "RADFLOW", &dicom_files(dir));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let reloads = |inf: &Proc| inf.logs().matches("model registry reloaded").count();
    let wait_results = |series: &str, n: usize, procs: &mut [&mut Proc]| {
        wait_for(
            &format!("{n} result(s) of {series}"),
            Duration::from_secs(120),
            || {
                for p in procs.iter_mut() {
                    p.assert_running();
                }
                let s = summaries(&store, series);
                (s.len() >= n).then_some(s)
            },
        )
    };

    // 1.0.0 serves.
    let (dir1, s1) = study(1);
    send(&dir1);
    wait_results(&s1, 1, &mut [&mut listener, &mut pre, &mut inf]);

    // 1.1.0 joins as a shadow: the inferer reloads, the preprocessor rolls.
    write_registry(&registry, &[entry("1.0.0", false), entry("1.1.0", true)]);
    wait_for("the shadow registry", Duration::from_secs(60), || {
        (reloads(&inf) >= 1).then_some(())
    });
    pre.terminate(Duration::from_secs(30));
    let mut pre = Proc::spawn("preprocessor-2", component("preprocessor"), work.path());
    let (dir2, s2) = study(2);
    send(&dir2);
    let shadowed = wait_results(&s2, 2, &mut [&mut listener, &mut pre, &mut inf]);
    assert_eq!(
        shadowed,
        [("1.0.0".to_owned(), false), ("1.1.0".to_owned(), true)],
        "the shadow writes its result beside the serving one"
    );

    // 1.1.0 serves alone; one study arrives while the switch happens, one after.
    let (dir3, s3) = study(3);
    let (dir4, s4) = study(4);
    send(&dir3);
    write_registry(&registry, &[entry("1.1.0", false)]);
    pre.terminate(Duration::from_secs(30));
    let mut pre = Proc::spawn("preprocessor-3", component("preprocessor"), work.path());
    wait_for("the new registry", Duration::from_secs(60), || {
        (reloads(&inf) >= 2).then_some(())
    });
    send(&dir4);
    wait_results(&s3, 1, &mut [&mut listener, &mut pre, &mut inf]);
    let last = wait_results(&s4, 1, &mut [&mut listener, &mut pre, &mut inf]);
    assert_eq!(last, [("1.1.0".to_owned(), false)]);

    // Settle, then: each study has exactly one serving result.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(summaries(&store, &s1), [("1.0.0".to_owned(), false)]);
    for series in [&s1, &s2, &s3, &s4] {
        let serving: Vec<_> = summaries(&store, series)
            .into_iter()
            .filter(|(_, shadow)| !shadow)
            .collect();
        assert_eq!(serving.len(), 1, "{series}: {serving:?}");
    }
    // Nothing was dead-lettered on the way.
    for p in [&listener, &pre, &inf] {
        assert!(
            !p.logs().contains("giving up; dead-lettering"),
            "{}",
            p.logs()
        );
    }
}
