//! De-identified export, end to end: a study full of recognisable demographics goes
//! through `radflow run` with two destinations (DCMTK storescp each). The hospital's
//! PACS gets the SEG and SR as written; the research destination, configured with
//! `[destination.deidentify]`, gets them under the Basic Application Confidentiality
//! Profile: none of the demographics and none of the original UIDs appear anywhere in
//! its files, every UID was replaced by the keyed hash (recomputed independently in
//! Python), the SR still references its SEG, the label map and the measurements are
//! unchanged, and dciodvfy finds no error.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::demographics::{DEMOGRAPHICS, add_demographics, found_in};
use common::*;

const MODEL: &str = "demo-tissue@1.0.0";

/// Every `.dcm` below the store's `dicom/` folder, named by its SOP Instance UID.
fn source_uids(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![store.join("dicom")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(uid) = path
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .strip_suffix(".dcm")
            {
                out.push(uid.to_owned());
            }
        }
    }
    out
}

#[test]
fn a_deidentifying_destination_gets_no_demographics_and_consistent_uids() {
    let work = TempDir::new("deidentified-export");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 64, 16, &["--seed", "7"]);
    add_demographics(&series_dir);
    let key_file = work.path().join("deid.key");
    std::fs::write(&key_file, "c2b1e0f4a7d94e3b8a51f0c6d2e7b9a4\n").unwrap();

    let (dicom_port, http_port, pacs_port, research_port) =
        (free_port(), free_port(), free_port(), free_port());
    let (pacs_inbox, research_inbox) = (work.path().join("pacs"), work.path().join("research"));
    let mut pacs = storescp(pacs_port, "PACS", &pacs_inbox, work.path(), false);
    let mut research = storescp(
        research_port,
        "RESEARCH",
        &research_inbox,
        work.path(),
        false,
    );
    let destinations = work.path().join("destinations.toml");
    std::fs::write(
        &destinations,
        format!(
            r#"
[[destination]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}

[[destination]]
name = "research"
ae_title = "RESEARCH"
host = "127.0.0.1"
port = {research_port}

[destination.deidentify]
key_file = "{}"

[[route]]
to = ["pacs", "research"]
"#,
            key_file.display()
        ),
    )
    .unwrap();

    let data = work.path().join("data");
    let mut cmd = embedded(&data, dicom_port, http_port);
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
        "SEG and SR at both destinations",
        Duration::from_secs(150),
        || {
            run.assert_running();
            pacs.assert_running();
            research.assert_running();
            (files_in(&pacs_inbox).len() >= 2 && files_in(&research_inbox).len() >= 2).then_some(())
        },
    );
    let result = data.join(format!("results/{}/{MODEL}", truth.series_uid));

    // The PACS inside the hospital gets the objects as written, demographics and all:
    // the search below can tell.
    let identified: Vec<u8> = files_in(&pacs_inbox)
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();
    let in_pacs = found_in(&identified);
    for (tag, value, _) in DEMOGRAPHICS.iter().take(4) {
        assert!(
            in_pacs.contains(value),
            "{tag} is not in the identified objects"
        );
    }

    // The research destination: no demographic, no original UID, in any byte.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(result.join("summary.json")).unwrap()).unwrap();
    let mut original_uids = vec![truth.study_uid.clone(), truth.series_uid.clone()];
    for object in summary["dicom"].as_array().unwrap() {
        for field in ["sop_instance_uid", "series_instance_uid"] {
            original_uids.push(object[field].as_str().unwrap().to_owned());
        }
    }
    let sources = source_uids(&data);
    assert_eq!(sources.len(), truth.files);
    original_uids.extend(sources);
    let files = files_in(&research_inbox);
    assert_eq!(files.len(), 2, "{files:?}");
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        let leaked = found_in(&bytes);
        assert!(leaked.is_empty(), "{} holds {leaked:?}", file.display());
        for uid in &original_uids {
            assert!(
                !bytes.windows(uid.len()).any(|w| w == uid.as_bytes()),
                "{} still holds the UID {uid}",
                file.display()
            );
        }
        dciodvfy(file);
    }
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/check_deidentified.py"))
        .arg(&key_file)
        .arg(&result)
        .arg(&research_inbox);
    let out = run_ok(cmd, "de-identification check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OK"), "{text}");
    println!("{text}");

    // The key never reaches the logs.
    assert!(!run.logs().contains("c2b1e0f4a7d94e3b8a51f0c6d2e7b9a4"));
    pacs.kill();
    research.kill();
}
