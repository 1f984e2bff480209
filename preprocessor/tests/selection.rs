//! Series selection on real files shipped by pydicom and nibabel: what is not a slice
//! of a grey-scale volume is left out with its reason, and a series with nothing
//! usable is "not a volume", with the same reasons `radflow volume` prints.

mod common;

use common::{TempDir, native, package_data};

/// `n` copies of pydicom's `CT_small.dcm` 1.5 mm apart, as the series folder `series`.
fn ct_series(t: &TempDir, pydicom_data: &std::path::Path, n: usize) -> std::path::PathBuf {
    let series = t.path("series");
    let ct = pydicom_data.join("CT_small.dcm");
    common::reference(
        &[
            "replicate",
            ct.to_str().unwrap(),
            series.to_str().unwrap(),
            &n.to_string(),
            "1.5",
        ],
        None,
    );
    series
}

#[test]
fn reports_colour_projections_and_objects_are_left_out() {
    let (pydicom_data, nibabel_data) = package_data();
    let t = TempDir::new("select-mixed");
    let series = ct_series(&t, &pydicom_data, 5);
    let others = [
        pydicom_data.join("reportsi.dcm"), // structured report: no pixels
        pydicom_data.join("waveform_ecg.dcm"), // waveform: no pixels
        pydicom_data.join("examples_rgb_color.dcm"), // ultrasound, colour
        pydicom_data.join("liver_1frame.dcm"), // segmentation, 1-bit
        pydicom_data.join("rtdose.dcm"),   // RT dose grid, 15 frames
        nibabel_data.join("slicethickness_empty_string.dcm"), // MR MIP (J2K)
    ];
    for f in &others {
        std::fs::copy(f, series.join(f.file_name().unwrap())).unwrap();
    }
    let built = native(&series).unwrap();
    assert_eq!(built.volume.grid.dims, [128, 128, 5]);
    let notes = built.report.warnings.join(" | ");
    for want in [
        "2 image(s) without pixel data left out (Basic Text SR Storage, 12-lead ECG Waveform Storage)",
        "not cross-sectional left out (Ultrasound Image Storage, Segmentation Storage, RT Dose Storage)",
        "1 image(s) projection (MIP) left out (MR Image Storage)",
    ] {
        assert!(notes.contains(want), "{want:?} not in {notes}");
    }
}

#[test]
fn nothing_usable_is_not_a_volume() {
    let (pydicom_data, nibabel_data) = package_data();
    let t = TempDir::new("select-none");
    let only = |name: &str, files: &[std::path::PathBuf]| {
        let dir = t.dir(name);
        for f in files {
            std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
        }
        native(&dir).unwrap_err()
    };
    let e = only(
        "reports",
        &[
            pydicom_data.join("reportsi.dcm"),
            pydicom_data.join("test-SR.dcm"),
        ],
    );
    assert!(e.is_not_a_volume(), "{e}");
    assert_eq!(e.code(), "no_images");
    let e = only(
        "mip",
        &[nibabel_data.join("slicethickness_empty_string.dcm")],
    );
    assert_eq!(e.code(), "projection");
    assert!(
        e.to_string()
            .starts_with("not a volume: none of its 1 image(s)"),
        "{e}"
    );
    let e = only("colour", &[pydicom_data.join("examples_rgb_color.dcm")]);
    assert_eq!(e.code(), "not_cross_sectional");
    // One CT image is an image, not a volume.
    let e = only("single", &[pydicom_data.join("CT_small.dcm")]);
    assert!(e.is_not_a_volume(), "{e}");
    assert_eq!(e.code(), "too_few_slices");
    assert!(
        e.to_string()
            .contains("1 image(s) 128x128 axial at 1 position(s)"),
        "{e}"
    );
    // A file whose pixels were stripped (nibabel's CSA test file) is no image either.
    let e = only("stripped", &[nibabel_data.join("csa_slice_norm.dcm")]);
    assert_eq!(e.code(), "no_images");
}

/// Files as systems write them after converting to explicit VR without knowing every
/// attribute: a private sequence of VR UN and undefined length (GDCM's
/// `UN_sequence.dcm`) and a standard attribute left as UN (the SOP Class UID of
/// `rtdose_rle.dcm`). Both are read; neither is "malformed".
#[test]
fn un_sequences_and_un_attributes_of_real_files_are_read() {
    use radflow_preprocessor::decode::{DecodeError, read_header};
    let (pydicom_data, _) = package_data();
    let un_sequence = std::fs::read(pydicom_data.join("UN_sequence.dcm")).unwrap();
    match read_header(&un_sequence) {
        // A header-only CT object: the parser got through the UN sequence to its end.
        Err(DecodeError::NoPixelData { sop_class_uid }) => {
            assert_eq!(sop_class_uid, "1.2.840.10008.5.1.4.1.1.2")
        }
        other => panic!("UN_sequence.dcm: {other:?}"),
    }
    let rtdose = std::fs::read(pydicom_data.join("rtdose_rle.dcm")).unwrap();
    let header = read_header(&rtdose).expect("rtdose_rle.dcm is read");
    assert_eq!(header.images.len(), 15);
    assert_eq!(
        header.images[0].sop_class_uid,
        "1.2.840.10008.5.1.4.1.1.481.2"
    );
}

/// A series that holds an object radflow cannot read: left out when the file's meta
/// group says it is no cross-sectional image (a truncated RT Plan here), the series
/// refused when it claims to be one of the series' images.
#[test]
fn unreadable_non_images_are_left_out_and_unreadable_images_fail_the_series() {
    let (pydicom_data, _) = package_data();
    let t = TempDir::new("select-unreadable");
    let series = ct_series(&t, &pydicom_data, 4);
    let plan = pydicom_data.join("rtplan_truncated.dcm");
    std::fs::copy(&plan, series.join("plan.dcm")).unwrap();
    let built = native(&series).expect("the plan is left out");
    assert_eq!(built.volume.grid.dims, [128, 128, 4]);
    let notes = built.report.warnings.join(" | ");
    assert!(
        notes.contains("1 image(s) that cannot be read left out (RT Plan Storage)")
            && notes.contains("plan.dcm: the DICOM file is malformed"),
        "{notes}"
    );
    // Alone in a series, it makes the series "not a volume", with the reason.
    let alone = t.dir("alone");
    std::fs::copy(&plan, alone.join("plan.dcm")).unwrap();
    let e = native(&alone).unwrap_err();
    assert!(e.is_not_a_volume(), "{e}");
    assert_eq!(e.code(), "unreadable_objects");

    // The same damage in a file of the series' own class fails the series.
    let mut broken = std::fs::read(series.join("plan.dcm")).unwrap();
    let class = b"1.2.840.10008.5.1.4.1.1.481.5";
    let at = broken
        .windows(class.len())
        .position(|w| w == class)
        .expect("meta group names the class");
    let ct_class = b"1.2.840.10008.5.1.4.1.1.2\0\0\0\0";
    broken[at..at + class.len()].copy_from_slice(&ct_class[..class.len()]);
    std::fs::write(series.join("plan.dcm"), &broken).unwrap();
    let e = native(&series).unwrap_err();
    assert_eq!(e.code(), "malformed_dicom", "{e}");
}
