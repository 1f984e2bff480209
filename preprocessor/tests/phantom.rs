//! The synthetic phantom end to end through the pure core: files written by `synth`
//! are decoded, stacked and measured, and must reproduce the phantom's ground truth.
//! An independent reader (pydicom) checks that the files are valid DICOM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use radflow_preprocessor::decode::{DecodedSlice, read_slice};
use radflow_preprocessor::geometry::{GeometryOptions, build_volume};
use radflow_preprocessor::synth::{
    PhantomSpec, PhantomTruth, SynthSyntax, Tissue, tissue_at, write_series,
};
use radflow_volume::Volume;

/// A fresh, empty folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("radflow-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn decode_dir(dir: &Path) -> Vec<DecodedSlice> {
    files(dir)
        .iter()
        .map(|f| read_slice(&std::fs::read(f).unwrap()).unwrap())
        .collect()
}

/// Tissue from HU, thresholds halfway between the phantom's values.
fn classify(hu: f32) -> Tissue {
    if hu < -550.0 {
        Tissue::Air
    } else if hu < -30.0 {
        Tissue::Fat
    } else if hu < 210.0 {
        Tissue::SoftTissue
    } else {
        Tissue::Bone
    }
}

fn ras_to_lps(p: [f64; 3]) -> [f64; 3] {
    [-p[0], -p[1], p[2]]
}

/// Checks every voxel's HU class against the phantom at the voxel's world position
/// and returns the measured volume per tissue (ml).
fn check_voxels(v: &Volume<f32>, truth: &PhantomTruth) -> BTreeMap<String, f64> {
    let mut counts = [0u64; 4];
    for ((k, j, i), hu) in v.data.indexed_iter() {
        let lps = ras_to_lps(v.grid.world([i as f64, j as f64, k as f64]));
        let want = tissue_at(lps, truth.centre_z_mm);
        let got = classify(*hu);
        assert_eq!(got, want, "voxel ({i},{j},{k}) at LPS {lps:?}: {hu} HU");
        counts[got.index()] += 1;
    }
    let ml = v.grid.voxel_volume_mm3() / 1000.0;
    Tissue::ALL
        .iter()
        .map(|t| (t.label_name().to_owned(), counts[t.index()] as f64 * ml))
        .collect()
}

#[test]
fn shuffled_series_round_trips_to_truth() {
    let dir = TempDir::new("phantom-shuffled");
    let spec = PhantomSpec {
        size: 64,
        slices: 12,
        slice_spacing_mm: 5.0,
        shuffle: true,
        seed: 42,
        ..Default::default()
    };
    let truth = write_series(&spec, &dir.0).unwrap();
    let paths = files(&dir.0);
    assert_eq!(paths.len(), 12);
    assert_eq!(truth.files, 12);
    assert!(paths.iter().all(|p| {
        !p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("slice_")
    }));

    let slices = decode_dir(&dir.0);
    let h = &slices[0].header;
    assert_eq!((h.rows, h.cols, h.number_of_frames), (64, 64, 1));
    assert_eq!(h.modality, "CT");
    assert_eq!(h.body_part, "ABDOMEN");
    assert_eq!(h.series_description, "radflow phantom");
    assert_eq!(h.image_type, ["ORIGINAL", "PRIMARY", "AXIAL"]);
    assert_eq!(h.rescale, (1.0, -1024.0));
    assert_eq!(h.photometric, "MONOCHROME2");
    assert_eq!(h.transfer_syntax, "1.2.840.10008.1.2.1");
    assert_eq!(h.pixel_spacing, Some([360.0 / 64.0, 360.0 / 64.0]));

    // Instance Numbers are a permutation that is not the position order.
    let mut by_z: Vec<(f64, i32)> = slices
        .iter()
        .map(|s| {
            (
                s.header.image_position.unwrap()[2],
                s.header.instance_number.unwrap(),
            )
        })
        .collect();
    by_z.sort_by(|a, b| a.0.total_cmp(&b.0));
    let numbers: Vec<i32> = by_z.iter().map(|x| x.1).collect();
    let mut sorted = numbers.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=12).collect::<Vec<_>>());
    assert_ne!(numbers, sorted);
    let first_ipp = slices
        .iter()
        .map(|s| s.header.image_position.unwrap())
        .min_by(|a, b| a[2].total_cmp(&b[2]))
        .unwrap();

    let built = build_volume(slices, &GeometryOptions::default()).unwrap();
    let v = &built.volume;
    assert_eq!(v.grid.dims, truth.dims);
    assert!(
        built.report.warnings.is_empty(),
        "{:?}",
        built.report.warnings
    );
    for a in 0..3 {
        assert!((built.report.spacing[a] - truth.spacing[a]).abs() < 1e-9);
    }
    // Voxel (0,0,0) is the lowest slice's first pixel, in RAS.
    let origin = v.grid.world([0.0, 0.0, 0.0]);
    assert_eq!(origin, [-first_ipp[0], -first_ipp[1], first_ipp[2]]);

    // Known points: soft tissue at the centre, fat near the body edge, spine, air.
    let mid = 6;
    let at = |lps: [f64; 3]| {
        let ijk = v.grid.voxel([-lps[0], -lps[1], lps[2]]).unwrap();
        let idx = ijk.map(|x| x.round() as usize);
        v.data[[idx[2], idx[1], idx[0]]]
    };
    let cz = v.grid.world([0.0, 0.0, mid as f64])[2];
    for (lps, hu) in [
        ([2.8, 2.8, cz], 40.0),
        ([138.0, 2.8, cz], -100.0),
        ([2.8, 58.0, cz], 380.0),
        ([170.0, 170.0, cz], -1000.0),
    ] {
        let got = at(lps);
        assert!((got - hu).abs() < 30.0, "{lps:?}: {got} vs {hu}");
    }

    let measured = check_voxels(v, &truth);
    for (name, want) in &truth.volumes_ml {
        let got = measured[name];
        assert!(*want > 0.0, "{name} has no volume in the truth");
        assert!(
            (got - want).abs() <= 0.02 * want,
            "{name}: {got} ml vs {want} ml"
        );
    }
    assert!((truth.voxel_volume_ml * 1000.0 - v.grid.voxel_volume_mm3()).abs() < 1e-9);

    // An independent reader agrees on validity and on the pixel values.
    let ours: f64 = v.data.iter().map(|x| f64::from(*x)).sum();
    pydicom_check(&dir.0, 12, ours);
}

#[test]
fn tilted_gantry_affine_matches_every_slice() {
    let dir = TempDir::new("phantom-tilt");
    let spec = PhantomSpec {
        size: 48,
        slices: 10,
        slice_spacing_mm: 4.0,
        tilt_deg: 15.0,
        seed: 3,
        ..Default::default()
    };
    let truth = write_series(&spec, &dir.0).unwrap();
    let slices = decode_dir(&dir.0);
    let ipps: Vec<[f64; 3]> = slices
        .iter()
        .map(|s| s.header.image_position.unwrap())
        .collect();
    let iop = slices[0].header.image_orientation.unwrap();
    assert!((iop[4] - 15f64.to_radians().cos()).abs() < 1e-9);
    // Positions step along z only.
    assert!(
        ipps.iter()
            .all(|p| p[0] == ipps[0][0] && p[1] == ipps[0][1])
    );

    let built = build_volume(slices, &GeometryOptions::default()).unwrap();
    let g = &built.volume.grid;
    assert!(
        built.report.warnings.is_empty(),
        "{:?}",
        built.report.warnings
    );
    let mut ks: Vec<f64> = ipps
        .iter()
        .map(|p| {
            let ijk = g.voxel([-p[0], -p[1], p[2]]).unwrap();
            assert!(ijk[0].abs() < 1e-4 && ijk[1].abs() < 1e-4, "{ijk:?}");
            assert!((ijk[2] - ijk[2].round()).abs() < 1e-4, "{ijk:?}");
            ijk[2]
        })
        .collect();
    ks.sort_by(f64::total_cmp);
    for (k, got) in ks.iter().enumerate() {
        assert!((got - k as f64).abs() < 1e-4);
    }
    assert!((g.voxel_volume_mm3() / 1000.0 - truth.voxel_volume_ml).abs() < 1e-9);
    assert!((built.report.spacing[2] - 4.0 * 15f64.to_radians().cos()).abs() < 1e-6);
    // Every voxel of the sheared grid sits where the phantom says it should.
    let measured = check_voxels(&built.volume, &truth);
    for (name, want) in &truth.volumes_ml {
        assert!(
            (measured[name] - want).abs() <= 0.02 * want.max(1.0),
            "{name}"
        );
    }
}

#[test]
fn implicit_and_explicit_syntax_decode_identically() {
    let a = TempDir::new("phantom-explicit");
    let b = TempDir::new("phantom-implicit");
    let spec = PhantomSpec {
        size: 16,
        slices: 3,
        ..Default::default()
    };
    write_series(&spec, &a.0).unwrap();
    let implicit = PhantomSpec {
        transfer_syntax: SynthSyntax::ImplicitLittle,
        ..spec
    };
    write_series(&implicit, &b.0).unwrap();
    let sa = decode_dir(&a.0);
    let sb = decode_dir(&b.0);
    assert_eq!(sb[0].header.transfer_syntax, "1.2.840.10008.1.2");
    for (x, y) in sa.iter().zip(&sb) {
        assert_eq!(x.pixels, y.pixels);
        assert_eq!(x.header.image_position, y.header.image_position);
        assert_eq!(x.header.rescale, y.header.rescale);
    }
    // Same seed, same noise; new UIDs every time.
    assert_ne!(sa[0].header.sop_instance_uid, sb[0].header.sop_instance_uid);
}

#[test]
fn long_uids_have_the_full_64_characters() {
    let dir = TempDir::new("phantom-long-uids");
    let spec = PhantomSpec {
        size: 16,
        slices: 3,
        long_uids: true,
        ..Default::default()
    };
    let truth = write_series(&spec, &dir.0).unwrap();
    assert_eq!(truth.study_uid.len(), 64, "{}", truth.study_uid);
    assert_eq!(truth.series_uid.len(), 64, "{}", truth.series_uid);
    let slices = decode_dir(&dir.0);
    assert_eq!(slices.len(), 3);
    for s in &slices {
        assert_eq!(s.header.sop_instance_uid.len(), 64);
        assert_eq!(s.header.series_uid, truth.series_uid);
    }
}

#[test]
fn truth_serialises() {
    let dir = TempDir::new("phantom-truth");
    let truth = write_series(
        &PhantomSpec {
            size: 8,
            slices: 2,
            ..Default::default()
        },
        &dir.0,
    )
    .unwrap();
    let json = serde_json::to_string(&truth).unwrap();
    let back: PhantomTruth = serde_json::from_str(&json).unwrap();
    assert_eq!(back, truth);
    assert_eq!(files(&dir.0).len(), 2);
    assert!(truth.study_uid.starts_with("2.25.") && truth.study_uid != truth.series_uid);
}

/// pydicom reads every file and its pixels; the sum of its HU must equal ours.
fn pydicom_check(dir: &Path, n: usize, hu_sum: f64) {
    let script = r#"
import sys, os, json, pydicom, numpy as np
total, count = 0.0, 0
for f in sorted(os.listdir(sys.argv[1])):
    ds = pydicom.dcmread(os.path.join(sys.argv[1], f))
    a = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert str(ds.PatientName) == "PHANTOM^RADFLOW"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    total += a.sum(); count += 1
print(json.dumps({"sum": total, "count": count}))
"#;
    let out = radflow_shared::testing::run_python(script, &[dir.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(j["count"].as_u64().unwrap() as usize, n);
    assert_eq!(j["sum"].as_f64().unwrap(), hu_sum);
}

/// Rewrites an explicit VR little endian file the way a system that lacks some
/// attributes in its dictionary re-encodes it: the attributes of `as_un` get VR UN,
/// and a private sequence of VR UN and undefined length (implicit VR content, PS3.5
/// 6.2.2) goes in front, with a nested undefined-length sequence inside.
fn reencode_with_un(file: &[u8], as_un: &[(u16, u16)]) -> Vec<u8> {
    let group_length = u32::from_le_bytes(file[140..144].try_into().unwrap()) as usize;
    let start = 144 + group_length;
    let mut out = file[..start].to_vec();
    // (0009,0010) LO private creator, then (0009,1001) UN of undefined length.
    let creator = b"RADFLOW TEST";
    out.extend_from_slice(&[0x09, 0x00, 0x10, 0x00, b'L', b'O']);
    out.extend_from_slice(&(creator.len() as u16).to_le_bytes());
    out.extend_from_slice(creator);
    out.extend_from_slice(&[
        0x09, 0x00, 0x01, 0x10, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    let implicit = |out: &mut Vec<u8>, tag: (u16, u16), len: u32| {
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    };
    implicit(&mut out, (0xFFFE, 0xE000), u32::MAX); // item
    implicit(&mut out, (0x0008, 0x1115), u32::MAX); // Referenced Series Sequence
    implicit(&mut out, (0xFFFE, 0xE000), u32::MAX);
    let uid = b"1.2.3.4.5.6\0";
    implicit(&mut out, (0x0020, 0x000E), uid.len() as u32);
    out.extend_from_slice(uid);
    implicit(&mut out, (0xFFFE, 0xE00D), 0);
    implicit(&mut out, (0xFFFE, 0xE0DD), 0);
    implicit(&mut out, (0xFFFE, 0xE00D), 0);
    implicit(&mut out, (0xFFFE, 0xE0DD), 0);
    // The data set, with the chosen attributes turned into UN.
    let mut pos = start;
    while pos < file.len() {
        let tag = (
            u16::from_le_bytes([file[pos], file[pos + 1]]),
            u16::from_le_bytes([file[pos + 2], file[pos + 3]]),
        );
        let vr = [file[pos + 4], file[pos + 5]];
        if tag == (0x7FE0, 0x0010) {
            out.extend_from_slice(&file[pos..]);
            break;
        }
        let long = matches!(
            &vr,
            b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN" | b"UC" | b"UR"
        );
        let (header, len) = if long {
            (
                12,
                u32::from_le_bytes(file[pos + 8..pos + 12].try_into().unwrap()) as usize,
            )
        } else {
            (
                8,
                u16::from_le_bytes([file[pos + 6], file[pos + 7]]) as usize,
            )
        };
        assert_ne!(
            len,
            u32::MAX as usize,
            "no undefined lengths in the synthetic files"
        );
        let value = &file[pos + header..pos + header + len];
        if as_un.contains(&tag) {
            out.extend_from_slice(&file[pos..pos + 4]);
            out.extend_from_slice(&[b'U', b'N', 0, 0]);
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.extend_from_slice(value);
        } else {
            out.extend_from_slice(&file[pos..pos + header + len]);
        }
        pos += header + len;
    }
    out
}

#[test]
fn un_attributes_and_un_sequences_decode_like_the_original() {
    let dir = TempDir::new("phantom-un");
    let spec = PhantomSpec {
        size: 16,
        slices: 4,
        ..Default::default()
    };
    write_series(&spec, &dir.0).unwrap();
    let as_un = [
        (0x0008, 0x0016), // SOP Class UID (text)
        (0x0020, 0x0032), // Image Position (Patient) (decimal strings)
        (0x0020, 0x0037), // Image Orientation (Patient)
        (0x0028, 0x0030), // Pixel Spacing
        (0x0028, 0x0010), // Rows (binary US)
        (0x0028, 0x0011), // Columns
        (0x0028, 0x0103), // Pixel Representation (signed)
        (0x0028, 0x1052), // Rescale Intercept
        (0x0028, 0x1053), // Rescale Slope
    ];
    let originals: Vec<Vec<u8>> = files(&dir.0)
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    let mut reencoded = Vec::new();
    for original in &originals {
        // dicom-object alone reads the UN sequence's content as explicit VR and fails
        // (or allocates the gigabytes an item tag read as a length claims).
        let bytes = reencode_with_un(original, &as_un);
        let a = read_slice(original).unwrap();
        let b = read_slice(&bytes).expect("the re-encoded file decodes");
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.header.image_position, b.header.image_position);
        assert_eq!(a.header.image_orientation, b.header.image_orientation);
        assert_eq!(a.header.pixel_spacing, b.header.pixel_spacing);
        assert_eq!(a.header.rescale, b.header.rescale);
        assert_eq!(
            (a.header.rows, a.header.cols),
            (b.header.rows, b.header.cols)
        );
        assert_eq!(a.header.sop_class_uid, b.header.sop_class_uid);
        reencoded.push(b);
    }
    let original: Vec<DecodedSlice> = originals.iter().map(|o| read_slice(o).unwrap()).collect();
    let opts = GeometryOptions::default();
    let va = build_volume(original, &opts).unwrap();
    let vb = build_volume(reencoded, &opts).unwrap();
    assert_eq!(va.volume.grid, vb.volume.grid);
    assert_eq!(va.volume.data, vb.volume.data);
}
