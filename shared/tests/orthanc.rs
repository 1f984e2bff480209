//! The Orthanc test peer against the real server: it starts on its own ports without
//! plugins, knows the modalities it was given, answers C-ECHO on its DICOM port to its
//! own AE title only, and stores and lists an instance uploaded over REST, byte for
//! byte.

use std::process::Command;

use radflow_shared::testing::{Orthanc, run_python};

/// A small CT image (8×8, 16 bits) as a Part-10 file, written by pydicom.
const MAKE_CT: &str = r#"
import io, sys
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
study, series, sop = sys.argv[1:4]
meta = FileMetaDataset()
meta.MediaStorageSOPClassUID = CTImageStorage
meta.MediaStorageSOPInstanceUID = sop
meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds = Dataset()
ds.file_meta = meta
ds.SOPClassUID = CTImageStorage
ds.SOPInstanceUID = sop
ds.StudyInstanceUID = study
ds.SeriesInstanceUID = series
ds.PatientID = "ORTHANC-TEST"
ds.PatientName = "Test^Orthanc"
ds.Modality = "CT"
ds.SeriesNumber = 1
ds.InstanceNumber = 1
ds.Rows = ds.Columns = 8
ds.SamplesPerPixel = 1
ds.PhotometricInterpretation = "MONOCHROME2"
ds.BitsAllocated = 16
ds.BitsStored = 16
ds.HighBit = 15
ds.PixelRepresentation = 1
ds.RescaleIntercept = -1024
ds.RescaleSlope = 1
ds.PixelData = (np.arange(64, dtype=np.int16) * 10).tobytes()
out = io.BytesIO()
ds.save_as(out, enforce_file_format=True)
sys.stdout.buffer.write(out.getvalue())
"#;

const ROOT: &str = "1.2.826.0.1.3680043.8.498.4242";

#[test]
fn stores_and_lists_an_uploaded_instance_and_answers_echo() {
    let orthanc = Orthanc::start("ORTHANC", &[("peer", "PEER-AE", "127.0.0.1", 11112)])
        .expect("Orthanc starts");
    assert_eq!(orthanc.aet(), "ORTHANC");
    assert!(
        orthanc
            .http_url()
            .ends_with(&orthanc.http_port().to_string())
    );
    assert_ne!(orthanc.dicom_port(), orthanc.http_port());

    let system = orthanc.get_json("/system").unwrap();
    assert_eq!(system["DicomAet"], "ORTHANC", "{system}");
    assert_eq!(system["DicomPort"], orthanc.dicom_port(), "{system}");
    // Nothing but the configuration's plugins (none), whatever the package installs;
    // `explorer.js` is the web interface's own script, always listed.
    let plugins = orthanc.get_json("/plugins").unwrap();
    let loaded: Vec<_> = plugins
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| *p != "explorer.js")
        .collect();
    assert!(loaded.is_empty(), "plugins loaded: {plugins}");
    let modality = orthanc.get_json("/modalities/peer/configuration").unwrap();
    assert_eq!(modality["AET"], "PEER-AE", "{modality}");
    assert_eq!(modality["Port"], 11112, "{modality}");
    assert_eq!(
        orthanc.get_json("/instances").unwrap(),
        serde_json::json!([])
    );

    // Its DICOM port is a DICOM SCP (DCMTK's echoscu, by absolute path: pip's
    // pynetdicom brings an echoscu that exits 0 on failure).
    let echo = |called: &str| {
        Command::new("/usr/bin/echoscu")
            .args(["-aet", "RADFLOW", "-aec", called, "127.0.0.1"])
            .arg(orthanc.dicom_port().to_string())
            .output()
            .expect("DCMTK's echoscu (apt-get install dcmtk; .ci/setup does it)")
    };
    let answered = echo("ORTHANC");
    assert!(
        answered.status.success(),
        "C-ECHO to Orthanc failed: {}",
        String::from_utf8_lossy(&answered.stderr)
    );
    // Only its own AE title: an association to another is rejected.
    let misaddressed = echo("NOT-ORTHANC");
    assert!(
        !misaddressed.status.success(),
        "Orthanc answers a Called AE title not its own"
    );

    let (study, series, sop) = (
        format!("{ROOT}.1"),
        format!("{ROOT}.2"),
        format!("{ROOT}.3"),
    );
    let file = run_python(MAKE_CT, &[&study, &series, &sop]);
    assert_eq!(&file[128..132], b"DICM", "pydicom wrote a Part-10 file");
    let id = orthanc.upload(&file).expect("the upload is stored");

    let instances = orthanc.get_json("/instances").unwrap();
    assert_eq!(instances, serde_json::json!([id]));
    let tags = orthanc
        .get_json(&format!("/instances/{id}/simplified-tags"))
        .unwrap();
    assert_eq!(tags["SOPInstanceUID"], sop.as_str(), "{tags}");
    assert_eq!(tags["SeriesInstanceUID"], series.as_str(), "{tags}");
    assert_eq!(tags["StudyInstanceUID"], study.as_str(), "{tags}");
    assert_eq!(tags["PatientID"], "ORTHANC-TEST", "{tags}");
    let studies = orthanc.get_json("/studies").unwrap();
    assert_eq!(studies.as_array().map(Vec::len), Some(1), "{studies}");

    // Stored as sent.
    let stored = orthanc.get_bytes(&format!("/instances/{id}/file")).unwrap();
    assert!(
        stored == file,
        "Orthanc gives back {} bytes for the {} uploaded, or other bytes",
        stored.len(),
        file.len()
    );

    // The same file again is known; an unknown resource is an error with the status.
    assert_eq!(orthanc.upload(&file).unwrap(), id);
    let missing = orthanc.get("/instances/nope").unwrap_err().to_string();
    assert!(missing.contains("404"), "{missing}");
}
