//! A real PACS at both ends: Orthanc holds a synthetic CT study, sends it to radflow's
//! listener as a C-STORE SCU (`POST /modalities/radflow/store`), and receives the SEG
//! and the SR back from the exporter as its destination `pacs`. The preprocessor, the
//! inferer and the exporter run as their own processes on a real nats-server.
//!
//! The results land in the source's patient and study in Orthanc, as two new series
//! beside the CT; the SEG references the CT series; both pass dciodvfy and hold exactly
//! the stored label map and volumes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use radflow_shared::testing::{NatsServer, Orthanc};
use serde_json::Value;

const MODEL: &str = "demo-tissue@1.0.0";

/// The last lines of a log, for a failure message.
fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The series of an Orthanc study, expanded (`MainDicomTags`, `Instances`).
fn study_series(orthanc: &Orthanc, study: &str) -> Vec<Value> {
    let series = orthanc
        .get_json(&format!("/studies/{study}/series"))
        .unwrap();
    series.as_array().cloned().unwrap_or_default()
}

fn modality(series: &Value) -> &str {
    series["MainDicomTags"]["Modality"].as_str().unwrap_or("")
}

/// The one instance of a series, as Orthanc's ID.
fn only_instance(series: &Value) -> String {
    let instances = series["Instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{series}");
    instances[0].as_str().unwrap().to_owned()
}

#[test]
fn a_study_orthanc_sends_comes_back_into_its_study_as_seg_and_sr() {
    let started = Instant::now();
    let nats = NatsServer::start().expect("nats-server");
    let work = TempDir::new("orthanc-export");
    let store = work.path().join("store");
    let series_dir = work.path().join("series");
    let truth = synth(&series_dir, 64, 24, &["--seed", "5"]);
    let store_url = format!("file://{}", store.display());
    let dicom_port = free_port();

    // Orthanc knows radflow's listener as the modality "radflow".
    let orthanc = Orthanc::start(
        "ORTHANC",
        &[("radflow", "RADFLOW", "127.0.0.1", dicom_port)],
    )
    .expect("Orthanc starts");
    let files = dicom_files(&series_dir);
    assert_eq!(files.len(), truth.files);
    for file in &files {
        orthanc
            .upload(&std::fs::read(file).unwrap())
            .unwrap_or_else(|e| panic!("upload of {}: {e}", file.display()));
    }
    let studies = orthanc.get_json("/studies").unwrap();
    let studies = studies.as_array().unwrap();
    assert_eq!(studies.len(), 1, "{studies:?}");
    let study = studies[0].as_str().unwrap().to_owned();
    let study_info = orthanc.get_json(&format!("/studies/{study}")).unwrap();
    assert_eq!(
        study_info["MainDicomTags"]["StudyInstanceUID"],
        truth.study_uid.as_str(),
        "{study_info}"
    );
    let patient = study_info["ParentPatient"].as_str().unwrap().to_owned();

    // Orthanc is the destination "pacs", and the demo model's results go there.
    let destinations = work.path().join("destinations.toml");
    destinations_file(
        &destinations,
        &[("pacs", orthanc.aet(), orthanc.dicom_port())],
        &["pacs"],
    );

    let mut stack = Stack::start(
        &nats.url(),
        &store_url,
        dicom_port,
        &["--destinations".as_ref(), destinations.as_os_str()],
        work.path(),
    );
    let exp_http = stack.exporter_http;

    // Orthanc sends the study to radflow: a real C-STORE SCU, synchronously.
    let sent: Value = serde_json::from_str(
        &orthanc
            .post(
                "/modalities/radflow/store",
                serde_json::json!({ "Resources": [study], "Synchronous": true }).to_string(),
            )
            .expect("Orthanc sends the study to radflow"),
    )
    .unwrap();
    assert_eq!(sent["FailedInstancesCount"], 0, "{sent}");
    assert_eq!(sent["InstancesCount"], truth.files, "{sent}");

    // Two more series in the same study: the SEG and the SR.
    let deadline = Instant::now() + Duration::from_secs(180);
    let series = loop {
        stack.assert_running();
        let series = study_series(&orthanc, &study);
        let mut modalities: Vec<&str> = series.iter().map(modality).collect();
        modalities.sort();
        if modalities == ["CT", "SEG", "SR"] {
            break series;
        }
        // Orthanc is up all along: a failed try is a fault, not a wait.
        let failed_tries =
            exports(exp_http, "pacs", "retry") + exports(exp_http, "pacs", "refused");
        if failed_tries > 0.0 || Instant::now() > deadline {
            panic!(
                "Orthanc's study has the series {modalities:?}, not CT, SEG and SR; \
                 exports sent {} retry {} refused {}\nexporter log:\n{}\nOrthanc log:\n{}",
                exports(exp_http, "pacs", "sent"),
                exports(exp_http, "pacs", "retry"),
                exports(exp_http, "pacs", "refused"),
                tail(&stack.exporter.logs(), 30),
                tail(&orthanc.log(), 30),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    // Nothing beside it: one patient, one study, and the CT series untouched.
    assert_eq!(
        orthanc.get_json("/patients").unwrap(),
        serde_json::json!([patient])
    );
    assert_eq!(
        orthanc.get_json("/studies").unwrap(),
        serde_json::json!([study])
    );
    let of = |m: &str| series.iter().find(|s| modality(s) == m).unwrap();
    let ct = of("CT");
    assert_eq!(
        ct["MainDicomTags"]["SeriesInstanceUID"],
        truth.series_uid.as_str()
    );
    assert_eq!(ct["Instances"].as_array().unwrap().len(), truth.files);

    // The objects as Orthanc stores them, beside the result's label map and summary.
    let result = store.join(format!("results/{}/{MODEL}", truth.series_uid));
    let check = work.path().join("from-orthanc");
    std::fs::create_dir_all(&check).unwrap();
    for name in ["labels.nii.gz", "summary.json"] {
        std::fs::copy(result.join(name), check.join(name)).unwrap();
    }
    let (seg, sr) = (only_instance(of("SEG")), only_instance(of("SR")));
    for (id, name) in [(&seg, "seg.dcm"), (&sr, "sr.dcm")] {
        let file = orthanc.get_bytes(&format!("/instances/{id}/file")).unwrap();
        std::fs::write(check.join(name), file).unwrap();
    }
    check_result_dicom(&check, &series_dir);

    // In Orthanc's own reading: the SEG refers to the CT series it came from, and both
    // objects belong to the source's patient and study.
    let tags = |id: &str| {
        orthanc
            .get_json(&format!("/instances/{id}/simplified-tags"))
            .unwrap()
    };
    let seg_tags = tags(&seg);
    let referenced = seg_tags["ReferencedSeriesSequence"].as_array().unwrap();
    assert_eq!(referenced.len(), 1, "{seg_tags}");
    assert_eq!(
        referenced[0]["SeriesInstanceUID"],
        truth.series_uid.as_str(),
        "{seg_tags}"
    );
    assert_eq!(
        referenced[0]["ReferencedInstanceSequence"]
            .as_array()
            .map(Vec::len),
        Some(truth.files),
        "{seg_tags}"
    );
    let source_tags = tags(ct["Instances"][0].as_str().unwrap());
    for object in [&seg_tags, &tags(&sr)] {
        for key in ["StudyInstanceUID", "PatientID", "PatientName"] {
            assert_eq!(object[key], source_tags[key], "{key}: {object}");
        }
    }

    // Sent once, at the first try: one export to "pacs".
    assert_eq!(exports(exp_http, "pacs", "sent"), 1.0);
    assert_eq!(exports(exp_http, "pacs", "retry"), 0.0);
    assert_eq!(exports(exp_http, "pacs", "refused"), 0.0);
    eprintln!(
        "Orthanc round trip done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
