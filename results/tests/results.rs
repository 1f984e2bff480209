//! SEG and SR written for synthetic source series, checked with the reference tools:
//! `dciodvfy` (dicom3tools) must report no error, highdicom must read the SEG back to
//! exactly the label map on the source grid, and the SR's measurements must be the
//! inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use ndarray::{Array3, Array4};
use radflow_results::*;
use radflow_shared::models::{Code, Registry};

const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const SERIES: &str = "1.2.826.0.1.3680043.8.498.4242";

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("radflow-results-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `slices` CT files of `rows × cols` with the given orientation, shuffled on
/// disk; returns their paths.
fn source_series(
    dir: &Path,
    slices: usize,
    rows: u16,
    cols: u16,
    orientation: [f64; 6],
) -> Vec<PathBuf> {
    let r = [orientation[0], orientation[1], orientation[2]];
    let c = [orientation[3], orientation[4], orientation[5]];
    let n = [
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    ];
    let mut paths = Vec::new();
    for k in (0..slices).rev() {
        let uid = format!("{SERIES}.{}", k + 1);
        let pos: Vec<String> = (0..3)
            .map(|i| format!("{:.4}", -100.0 + 2.5 * k as f64 * n[i]))
            .collect();
        let mut obj = InMemDicomObject::new_empty();
        let s = |obj: &mut InMemDicomObject, tag, vr, v: &str| {
            obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        };
        s(&mut obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
        s(&mut obj, tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE);
        s(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, &uid);
        s(&mut obj, tags::STUDY_DATE, VR::DA, "20260101");
        s(&mut obj, tags::STUDY_TIME, VR::TM, "101500");
        s(&mut obj, tags::ACCESSION_NUMBER, VR::SH, "ACC123");
        s(&mut obj, tags::MODALITY, VR::CS, "CT");
        s(&mut obj, tags::MANUFACTURER, VR::LO, "Scanner Inc");
        s(&mut obj, tags::REFERRING_PHYSICIAN_NAME, VR::PN, "");
        s(&mut obj, tags::PATIENT_NAME, VR::PN, "Doe^Jane");
        s(&mut obj, tags::PATIENT_ID, VR::LO, "P0042");
        s(&mut obj, tags::PATIENT_BIRTH_DATE, VR::DA, "19700101");
        s(&mut obj, tags::PATIENT_SEX, VR::CS, "F");
        s(&mut obj, tags::SLICE_THICKNESS, VR::DS, "2.5");
        s(
            &mut obj,
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.8.498.4241",
        );
        s(&mut obj, tags::SERIES_INSTANCE_UID, VR::UI, SERIES);
        s(&mut obj, tags::STUDY_ID, VR::SH, "S1");
        s(&mut obj, tags::SERIES_NUMBER, VR::IS, "3");
        s(
            &mut obj,
            tags::INSTANCE_NUMBER,
            VR::IS,
            &(k + 1).to_string(),
        );
        s(
            &mut obj,
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            &pos.join("\\"),
        );
        let o: Vec<String> = orientation.iter().map(|v| format!("{v:.6}")).collect();
        s(
            &mut obj,
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            &o.join("\\"),
        );
        s(
            &mut obj,
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.8.498.4243",
        );
        s(&mut obj, tags::PIXEL_SPACING, VR::DS, "0.75\\0.8");
        let us = |obj: &mut InMemDicomObject, tag, v: u16| {
            obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
        };
        us(&mut obj, tags::SAMPLES_PER_PIXEL, 1);
        s(
            &mut obj,
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2",
        );
        us(&mut obj, tags::ROWS, rows);
        us(&mut obj, tags::COLUMNS, cols);
        us(&mut obj, tags::BITS_ALLOCATED, 16);
        us(&mut obj, tags::BITS_STORED, 16);
        us(&mut obj, tags::HIGH_BIT, 15);
        us(&mut obj, tags::PIXEL_REPRESENTATION, 0);
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::from(vec![0u8; usize::from(rows) * usize::from(cols) * 2]),
        ));
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid(CT_IMAGE_STORAGE)
                    .media_storage_sop_instance_uid(&uid),
            )
            .unwrap();
        let path = dir.join(format!("{k:03}.dcm"));
        file.write_to_file(&path).unwrap();
        paths.push(path);
    }
    paths
}

/// Labels 1..3 in blocks, with slices 0 and 4 empty and label 2 absent from slice 5.
fn label_map(slices: usize, rows: usize, cols: usize) -> Array3<u8> {
    Array3::from_shape_fn((slices, rows, cols), |(z, y, x)| {
        if z == 0 || z == 4 {
            0
        } else if x < cols / 3 && y > 2 {
            1
        } else if x < 2 * cols / 3 && z != 5 && (x + y + z) % 3 != 0 {
            2
        } else if x >= 2 * cols / 3 && y % 2 == 1 {
            3
        } else {
            0
        }
    })
}

fn dciodvfy(path: &Path) {
    let out = Command::new("dciodvfy").arg(path).output().expect(
        "dciodvfy not found: install dicom3tools (apt-get install dicom3tools, see .ci/setup)",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.lines().any(|l| l.starts_with("Error")),
        "dciodvfy reports errors for {}:\n{text}",
        path.display()
    );
}

fn python_check(kind: &str, path: &Path, expected: &serde_json::Value, dir: &Path) {
    let json = dir.join(format!("{kind}-expected.json"));
    std::fs::write(&json, expected.to_string()).unwrap();
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_results.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(kind)
        .arg(path)
        .arg(&json)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (run .ci/setup)", python.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.starts_with("OK"),
        "{kind} check failed:\n{text}"
    );
}

struct Written {
    seg: PathBuf,
    seg_bytes: Vec<u8>,
    sr_bytes: Vec<u8>,
    seg_info: SegWritten,
    sr_info: SrWritten,
}

fn write_both(
    dir: &Path,
    series: &SourceSeries,
    pixels: SegPixels<'_>,
    volumes: &[f64],
) -> Written {
    let spec = &Registry::builtin().models[0];
    let ctx = ResultContext {
        identity: ResultIdentity {
            source_series_uid: SERIES.into(),
            revision: 1,
            model: spec.reference(),
        },
        source: series,
        algorithm: Algorithm::from_model(spec),
        created: Created {
            date: "20260102".into(),
            time: "030405".into(),
        },
        seg_series_number: 901,
        sr_series_number: 902,
    };
    let segments = SegmentDescription::from_model(spec);
    let mut seg_bytes = Vec::new();
    let seg_info = write_seg(&mut seg_bytes, &ctx, &segments, pixels).unwrap();
    let seg = dir.join("seg.dcm");
    std::fs::write(&seg, &seg_bytes).unwrap();
    let volumes: Vec<SegmentVolume> = segments
        .iter()
        .zip(volumes)
        .map(|(s, &v)| SegmentVolume {
            segment: s.clone(),
            volume_ml: v,
        })
        .collect();
    let mut sr_bytes = Vec::new();
    let sr_info = write_sr(
        &mut sr_bytes,
        &ctx,
        &Measurements::Volumes {
            seg: &seg_info,
            volumes: &volumes,
        },
    )
    .unwrap();
    Written {
        seg,
        seg_bytes,
        sr_bytes,
        seg_info,
        sr_info,
    }
}

fn read_series(paths: &[PathBuf]) -> (SourceSeries, Vec<String>, Vec<String>) {
    let instances = paths.iter().map(|p| read_source_file(p).unwrap()).collect();
    let series = SourceSeries::new(instances).unwrap();
    let uids = series
        .slices()
        .iter()
        .map(|s| s.sop_instance_uid.clone())
        .collect();
    let files = paths.iter().map(|p| p.display().to_string()).collect();
    (series, uids, files)
}

fn check_binary(name: &str, orientation: [f64; 6]) {
    let dir = tmp(name);
    let (nz, rows, cols) = (8, 13, 17); // odd sizes: bits run across frame boundaries
    let paths = source_series(&dir, nz, rows as u16, cols as u16, orientation);
    let (series, uids, files) = read_series(&paths);
    // Slice order is along the normal whatever the file order.
    assert_eq!(uids[0], format!("{SERIES}.1"));
    assert_eq!(series.shape(), (nz, rows, cols));
    let labels = label_map(nz, rows, cols);
    let volumes = [1.25, 20.5, 0.001];
    let w = write_both(&dir, &series, SegPixels::Labels(labels.view()), &volumes);
    dciodvfy(&w.seg);
    let sr = dir.join("sr.dcm");
    std::fs::write(&sr, &w.sr_bytes).unwrap();
    dciodvfy(&sr);

    let raw = dir.join("labels.raw");
    std::fs::write(&raw, labels.as_standard_layout().as_slice().unwrap()).unwrap();
    let segments: Vec<[u32; 2]> = w
        .seg_info
        .segments
        .iter()
        .map(|&(l, n)| [u32::from(l), u32::from(n)])
        .collect();
    python_check(
        "seg",
        &w.seg,
        &serde_json::json!({
            "kind": "binary", "source_uids": uids, "source_files": files,
            "shape": [nz, rows, cols], "raw": raw, "segments": segments,
        }),
        &dir,
    );
    let spec = &Registry::builtin().models[0];
    python_check(
        "sr",
        &sr,
        &serde_json::json!({
            "sha256": spec.sha256,
            "measurements": {
                "fat": ["Volume", 1.25, "ml"],
                "soft_tissue": ["Volume", 20.5, "ml"],
                "bone": ["Volume", 0.001, "ml"],
            },
            "evidence_series": [SERIES, w.seg_info.series_instance_uid],
        }),
        &dir,
    );
    // Frames: one per (segment, slice) holding the segment.
    let expected_frames: usize = (1..=3u8)
        .map(|l| {
            (0..nz)
                .filter(|&z| {
                    labels
                        .index_axis(ndarray::Axis(0), z)
                        .iter()
                        .any(|&v| v == l)
                })
                .count()
        })
        .sum();
    assert_eq!(w.seg_info.frames, expected_frames);

    // A re-run gives the same UIDs and the same bytes.
    let again = write_both(&dir, &series, SegPixels::Labels(labels.view()), &volumes);
    assert_eq!(again.seg_info, w.seg_info);
    assert_eq!(again.sr_info, w.sr_info);
    assert!(again.seg_bytes == w.seg_bytes && again.sr_bytes == w.sr_bytes);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_seg_and_sr_of_an_axial_series_pass_dciodvfy_and_read_back_exactly() {
    check_binary("axial", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn binary_seg_of_an_oblique_series_keeps_the_source_geometry() {
    let (c, s) = (0.3f64.cos(), 0.3f64.sin());
    check_binary("oblique", [c, s, 0.0, -s * 0.8, c * 0.8, -0.6]);
}

#[test]
fn fractional_seg_passes_dciodvfy_and_reads_back_exactly() {
    let dir = tmp("fractional");
    let (nz, rows, cols) = (6, 11, 9);
    let paths = source_series(
        &dir,
        nz,
        rows as u16,
        cols as u16,
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    );
    let (series, uids, files) = read_series(&paths);
    // Fractions k/255, so the stored byte is exactly k; segment 3 is empty on slice 2.
    let fractions = Array4::from_shape_fn((3, nz, rows, cols), |(s, z, y, x)| {
        if z == 2 && s == 2 {
            0u8
        } else {
            ((s * 71 + z * 13 + y * 7 + x * 3) % 256) as u8
        }
    });
    let probabilities = fractions.mapv(|k| f32::from(k) / 255.0);
    let w = write_both(
        &dir,
        &series,
        SegPixels::Probabilities(probabilities.view()),
        &[1.0, 2.0, 3.0],
    );
    dciodvfy(&w.seg);
    let raw = dir.join("fractions.raw");
    std::fs::write(&raw, fractions.as_slice().unwrap()).unwrap();
    python_check(
        "seg",
        &w.seg,
        &serde_json::json!({
            "kind": "fractional", "source_uids": uids, "source_files": files,
            "shape": [nz, rows, cols], "raw": raw, "segments": [[1, 1], [2, 2], [3, 3]],
        }),
        &dir,
    );
    assert_eq!(w.seg_info.frames, 3 * nz - 1);

    // The same fractions given as bytes, held slice-major (another memory layout),
    // write the same file.
    let slice_major = fractions
        .view()
        .permuted_axes([1, 0, 2, 3])
        .as_standard_layout()
        .into_owned();
    let as_bytes = write_both(
        &dir,
        &series,
        SegPixels::Fractions(slice_major.view().permuted_axes([1, 0, 2, 3])),
        &[1.0, 2.0, 3.0],
    );
    assert_eq!(as_bytes.seg_info, w.seg_info);
    assert!(
        as_bytes.seg_bytes == w.seg_bytes,
        "the SEG of the fractions differs from the SEG of the probabilities"
    );
    // Out-of-range probabilities are clamped by `fraction`, never wrapped.
    assert_eq!(
        [-0.5, 0.0, 0.4, 1.0, 1.0000001, f32::NAN].map(seg::fraction),
        [0, 0, 102, 255, 255, 0]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn classification_sr_reports_the_class_scores() {
    let dir = tmp("scores");
    let paths = source_series(&dir, 3, 8, 8, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    let (series, _, _) = read_series(&paths);
    let spec = &Registry::builtin().models[0];
    let ctx = ResultContext {
        identity: ResultIdentity {
            source_series_uid: SERIES.into(),
            revision: 2,
            model: spec.reference(),
        },
        source: &series,
        algorithm: Algorithm::from_model(spec),
        created: Created {
            date: "20260102".into(),
            time: "030405".into(),
        },
        seg_series_number: 901,
        sr_series_number: 902,
    };
    let scores = [
        ClassScore {
            name: "normal".into(),
            label: 0,
            finding: Code::tissue(),
            score: 0.125,
        },
        ClassScore {
            name: "abnormal".into(),
            label: 1,
            finding: Code::new("SCT", "52988006", "Lesion"),
            score: 0.875,
        },
    ];
    let mut bytes = Vec::new();
    write_sr(
        &mut bytes,
        &ctx,
        &Measurements::Scores {
            scores: &scores,
            probability: true,
        },
    )
    .unwrap();
    let sr = dir.join("sr.dcm");
    std::fs::write(&sr, &bytes).unwrap();
    dciodvfy(&sr);
    python_check(
        "sr",
        &sr,
        &serde_json::json!({
            "sha256": spec.sha256,
            "measurements": {
                "normal": ["Probability", 0.125, "1"],
                "abnormal": ["Probability", 0.875, "1"],
            },
            "evidence_series": [SERIES],
        }),
        &dir,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_label_map_of_the_wrong_shape_is_refused() {
    let dir = tmp("shape");
    let paths = source_series(&dir, 3, 8, 8, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    let (series, _, _) = read_series(&paths);
    let spec = &Registry::builtin().models[0];
    let ctx = ResultContext {
        identity: ResultIdentity {
            source_series_uid: SERIES.into(),
            revision: 1,
            model: spec.reference(),
        },
        source: &series,
        algorithm: Algorithm::from_model(spec),
        created: Created {
            date: "20260102".into(),
            time: "030405".into(),
        },
        seg_series_number: 901,
        sr_series_number: 902,
    };
    let labels = Array3::<u8>::zeros((4, 8, 8));
    let err = write_seg(
        &mut Vec::new(),
        &ctx,
        &SegmentDescription::from_model(spec),
        SegPixels::Labels(labels.view()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("differs from the source series"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The grid the preprocessor gives a series written by [`source_series`]: `(i, j, k)` =
/// (column, row, slice) in RAS+, columns 0.8 mm apart, rows 0.75 mm, slices 2.5 mm.
fn grid_of(slices: usize, rows: usize, cols: usize, orientation: [f64; 6]) -> radflow_volume::Grid {
    let r = [orientation[0], orientation[1], orientation[2]];
    let c = [orientation[3], orientation[4], orientation[5]];
    let n = [
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    ];
    let mut affine = [[0.0; 4]; 4];
    for a in 0..3 {
        let sign = if a < 2 { -1.0 } else { 1.0 };
        affine[a][0] = sign * 0.8 * r[a];
        affine[a][1] = sign * 0.75 * c[a];
        affine[a][2] = sign * 2.5 * n[a];
        affine[a][3] = sign * -100.0;
    }
    affine[3][3] = 1.0;
    radflow_volume::Grid {
        dims: [cols, rows, slices],
        affine,
    }
}

#[test]
fn the_planes_of_the_grid_are_found_among_the_stored_instances() {
    let dir = tmp("grid");
    let oblique = [0.9961947, 0.0871557, 0.0, -0.0871557, 0.9961947, 0.0];
    let paths = source_series(&dir, 8, 13, 17, oblique);
    // A localizer of the same series: another orientation, left out.
    let localizer_dir = dir.join("localizer");
    std::fs::create_dir_all(&localizer_dir).unwrap();
    let localizer = source_series(&localizer_dir, 1, 13, 17, [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
    let mut instances: Vec<SourceInstance> =
        paths.iter().map(|p| read_source_file(p).unwrap()).collect();
    instances.push(read_source_file(&localizer[0]).unwrap());

    let series = match_grid(instances.clone(), &grid_of(8, 13, 17, oblique)).unwrap();
    let uids: Vec<String> = series
        .slices()
        .iter()
        .map(|s| s.sop_instance_uid.clone())
        .collect();
    let want: Vec<String> = (1..=8).map(|k| format!("{SERIES}.{k}")).collect();
    assert_eq!(uids, want);

    // One plane more than there are images (an interpolated or missing plane).
    let err = match_grid(instances.clone(), &grid_of(9, 13, 17, oblique)).unwrap_err();
    assert!(
        matches!(
            err,
            GridMismatch::NoInstance {
                plane: 8,
                planes: 9
            }
        ),
        "{err}"
    );
    // A grid of another matrix: no instance is a plane of it.
    let err = match_grid(instances, &grid_of(8, 12, 17, oblique)).unwrap_err();
    assert!(matches!(err, GridMismatch::NoStack { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
