//! radflow's volumes against reference readers of the same DICOM files: SimpleITK
//! (series reader and resampler), nibabel (enhanced multi-frame, Siemens mosaic) and
//! pydicom (pixel values), on generated series (shuffled, tilted, gapped, every
//! transfer syntax through DCMTK's compressors, multi-frame) and on the real files
//! that pydicom and nibabel ship. Volumes are compared in world space: same shape,
//! affine within 1e-3 mm, values within 1 (HU for CT) on average and 5 at the 99th
//! percentile; NIfTI files are read back by nibabel.

mod common;

use common::{TempDir, assert_close, dcmtk, files, jobs, native, package_data, write};
use radflow_preprocessor::convert;
use radflow_preprocessor::decode;
use radflow_preprocessor::synth::{PhantomSpec, SynthSyntax, write_series};
use serde_json::json;

fn phantom(size: usize, slices: usize, spacing: f64) -> PhantomSpec {
    PhantomSpec {
        size,
        slices,
        fov_mm: 320.0,
        slice_spacing_mm: spacing,
        seed: 11,
        ..Default::default()
    }
}

#[test]
fn synthetic_series_match_simpleitk_natively_and_resampled() {
    let t = TempDir::new("ref-synth");
    let shuffled = t.dir("shuffled");
    write_series(
        &PhantomSpec {
            shuffle: true,
            ..phantom(64, 24, 2.5)
        },
        &shuffled,
    )
    .unwrap();
    let implicit = t.dir("implicit");
    write_series(
        &PhantomSpec {
            transfer_syntax: SynthSyntax::ImplicitLittle,
            ..phantom(48, 12, 3.0)
        },
        &implicit,
    )
    .unwrap();

    let mut list = Vec::new();
    for (name, dir) in [("shuffled", &shuffled), ("implicit", &implicit)] {
        let built = native(dir).unwrap();
        assert!(
            built.report.warnings.is_empty(),
            "{:?}",
            built.report.warnings
        );
        let nii = write(&built.volume, t.path(&format!("{name}.nii")));
        list.push(json!({"kind": "sitk_series", "name": name, "dicom": dir, "nifti": nii}));
        let spacing = [1.5, 1.5, 1.5];
        let resampled = convert::prepare(&built.volume, &common::spacing_preset(spacing));
        let nii = write(&resampled, t.path(&format!("{name}-1.5.nii")));
        list.push(
            json!({"kind": "sitk_series", "name": format!("{name} at 1.5 mm"),
            "dicom": dir, "nifti": nii, "spacing": spacing}),
        );
    }
    // The same voxels in another axis order (flipped and permuted): the affine must
    // say so, in the sform and the qform.
    let built = native(&shuffled).unwrap();
    let mut pir = common::spacing_preset([5.0, 2.5, 5.0]);
    pir.orientation = Some("PIR".into());
    let reoriented = convert::prepare(&built.volume, &pir);
    assert_eq!(reoriented.grid.dims, [64, 24, 64]);
    let nii = write(&reoriented, t.path("pir.nii"));
    list.push(json!({"kind": "sitk_series", "name": "PIR", "dicom": shuffled, "nifti": nii}));

    let results = jobs(list);
    for r in &results {
        let name = r["name"].as_str().unwrap();
        if name.contains("1.5") {
            assert_close(r, 1.0, 5.0, true);
        } else {
            // Same files, same decoding: identical values.
            assert_close(r, 0.0, 0.0, true);
        }
    }
    assert_eq!(results[1]["shape"], json!([213, 213, 40]));
}

#[test]
fn every_transfer_syntax_decodes_like_simpleitk() {
    let t = TempDir::new("ref-syntaxes");
    let plain = t.dir("plain");
    write_series(&phantom(48, 6, 4.0), &plain).unwrap();
    let reference = native(&plain).unwrap().volume;

    // (name, tool, options, lossless)
    let variants: &[(&str, &str, &[&str], bool)] = &[
        ("jpeg-lossless-sv1", "dcmcjpeg", &["+e1"], true),
        ("jpeg-lossless-p14", "dcmcjpeg", &["+el"], true),
        (
            "jpeg-lossless-p14-sv2",
            "dcmcjpeg",
            &["+el", "+sv", "2"],
            true,
        ),
        (
            "jpeg-lossless-p14-sv3",
            "dcmcjpeg",
            &["+el", "+sv", "3"],
            true,
        ),
        (
            "jpeg-lossless-p14-sv4",
            "dcmcjpeg",
            &["+el", "+sv", "4"],
            true,
        ),
        (
            "jpeg-lossless-p14-sv5",
            "dcmcjpeg",
            &["+el", "+sv", "5"],
            true,
        ),
        (
            "jpeg-lossless-p14-sv7",
            "dcmcjpeg",
            &["+el", "+sv", "7"],
            true,
        ),
        ("jpeg-baseline", "dcmcjpeg", &["+eb"], false),
        ("jpeg-ls-lossless", "dcmcjpls", &["+el"], true),
        ("rle", "dcmcrle", &[], true),
        ("big-endian", "dcmconv", &["+tb"], true),
        ("deflated", "dcmconv", &["+td"], true),
        ("implicit", "dcmconv", &["+ti"], true),
    ];
    let mut list = Vec::new();
    for (name, tool, options, lossless) in variants {
        let dir = t.path(name);
        dcmtk(tool, options, &plain, &dir);
        let built = native(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        if *lossless {
            assert_eq!(built.volume, reference, "{name} is not bit-identical");
        }
        let nii = write(&built.volume, t.path(&format!("{name}.nii")));
        list.push(json!({"kind": "sitk_series", "name": name, "dicom": dir, "nifti": nii}));
    }
    // JPEG 2000 lossless, encoded by pydicom with OpenJPEG, and High-Throughput JPEG
    // 2000 lossless, encoded by OpenJPH.
    for (name, encode) in [("j2k", "encode_j2k"), ("htj2k", "encode_htj2k")] {
        let dir = t.dir(name);
        for f in files(&plain) {
            let out = dir.join(f.file_name().unwrap());
            common::reference(&[encode, f.to_str().unwrap(), out.to_str().unwrap()], None);
        }
        let built = native(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(built.volume, reference, "{name} is not bit-identical");
        let nii = write(&built.volume, t.path(&format!("{name}.nii")));
        list.push(json!({"kind": "sitk_series", "name": name, "dicom": dir, "nifti": nii}));
    }

    for r in jobs(list) {
        let name = r["name"].as_str().unwrap();
        if name == "jpeg-baseline" {
            // Lossy 8-bit (DCMTK rescales to ~8 HU steps): decoders may differ by a
            // step where their IDCTs round differently.
            assert_close(&r, 1.0, 9.0, true);
        } else {
            assert_close(&r, 0.0, 0.0, true);
        }
    }

    // 12-bit JPEG Extended (lossy; GDCM, and so SimpleITK, does not read it):
    // against DCMTK's own decompression of the same files (IJG's 12-bit decoder),
    // one HU apart at most where the two inverse DCTs round differently.
    let extended = t.path("jpeg-extended");
    dcmtk("dcmcjpeg", &["+ee"], &plain, &extended);
    let decompressed = t.path("jpeg-extended-dcmdjpeg");
    dcmtk("dcmdjpeg", &[], &extended, &decompressed);
    let ours = native(&extended).unwrap().volume;
    let ijg = native(&decompressed).unwrap().volume;
    assert_eq!(ours.data.dim(), ijg.data.dim());
    let diffs: Vec<f32> = ours
        .data
        .iter()
        .zip(&ijg.data)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let max = diffs.iter().copied().fold(0f32, f32::max);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    assert!(max <= 1.0 && mean < 0.1, "max {max}, mean {mean}");
    // Lossy, and not a copy of the source: the comparison can tell.
    assert_ne!(ours.data, reference.data);
    // A 12-bit stream radflow's decoder does not handle (its frame header turned
    // progressive) is refused by name, not handed to a codec that cannot read it.
    let mut progressive = std::fs::read(&files(&extended)[0]).unwrap();
    let sof1 = progressive
        .windows(2)
        .rposition(|w| w == [0xFF, 0xC1])
        .expect("a SOF1 marker");
    progressive[sof1 + 1] = 0xC2;
    let e = decode::read_slice(&progressive).unwrap_err();
    assert!(
        matches!(e, decode::DecodeError::UnsupportedTransferSyntax { .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("with 12-bit samples, frame type SOF2"),
        "{e}"
    );
}

#[test]
fn tilted_gantry_matches_simpleitk_slice_by_slice() {
    let t = TempDir::new("ref-tilt");
    let dir = t.dir("tilt");
    write_series(
        &PhantomSpec {
            tilt_deg: 18.0,
            shuffle: true,
            ..phantom(48, 14, 3.0)
        },
        &dir,
    )
    .unwrap();
    let built = native(&dir).unwrap();
    assert!(
        built.report.warnings.is_empty(),
        "{:?}",
        built.report.warnings
    );
    let nii = write(&built.volume, t.path("native.nii"));
    let resampled = convert::prepare(&built.volume, &common::spacing_preset([2.0, 2.0, 2.0]));
    let nii2 = write(&resampled, t.path("resampled.nii"));
    let r = jobs(vec![
        json!({"kind": "sitk_slices", "name": "native", "dicom": dir, "nifti": nii}),
        json!({"kind": "sitk_slices", "name": "resampled", "dicom": dir, "nifti": nii2}),
    ]);
    // The sheared affine is exact in the sform only; values at voxel centres agree to
    // the rounding of scipy's float32 interpolation.
    assert_close(&r[0], 1e-2, 1e-2, false);
    assert!(
        r[0]["native_affine_diff"].as_f64().unwrap() < 1e-3,
        "{}",
        r[0]
    );
    assert_close(&r[1], 1.0, 5.0, false);
}

#[test]
fn missing_slices_are_interpolated_and_flagged() {
    let t = TempDir::new("ref-gaps");
    let complete = t.dir("complete");
    write_series(&phantom(48, 12, 2.0), &complete).unwrap();
    let gapped = t.dir("gapped");
    for f in files(&complete) {
        let name = f.file_name().unwrap().to_str().unwrap().to_owned();
        // Slices 5 and 9 (1-based file names in position order) are lost.
        if name != "slice_0005.dcm" && name != "slice_0009.dcm" {
            std::fs::copy(&f, gapped.join(&name)).unwrap();
        }
    }
    let built = native(&gapped).unwrap();
    let why = built.report.suspect_incomplete.clone().expect("flagged");
    assert!(why.contains("about 2 slice(s) missing"), "{why}");
    assert_eq!(built.volume.grid.dims, [48, 48, 12]);
    let nii = write(&built.volume, t.path("gapped.nii"));
    let r = jobs(vec![json!({"kind": "gap_planes", "name": "gapped",
        "complete": complete, "nifti": nii, "missing": [4, 8]})]);
    assert_close(&r[0], 1e-3, 1e-3, true);

    // Refused instead when the options say so.
    let opts = radflow_preprocessor::geometry::GeometryOptions {
        uneven_spacing: radflow_preprocessor::geometry::UnevenSpacing::Reject,
        ..Default::default()
    };
    let e = convert::volume_from_paths(&files(&gapped), &opts).unwrap_err();
    assert_eq!(e.code(), "uneven_spacing");
    assert!(e.to_string().contains("about 2 slice(s) missing"), "{e}");
}

#[test]
fn enhanced_multiframe_matches_single_frame_and_nibabel() {
    let t = TempDir::new("ref-enhanced");
    let classic = t.dir("classic");
    let enhanced = t.dir("enhanced");
    let spec = PhantomSpec {
        shuffle: true,
        ..phantom(40, 10, 3.0)
    };
    write_series(&spec, &classic).unwrap();
    let truth = write_series(
        &PhantomSpec {
            enhanced: true,
            ..spec.clone()
        },
        &enhanced,
    )
    .unwrap();
    assert_eq!(truth.files, 1);
    let a = native(&classic).unwrap();
    let b = native(&enhanced).unwrap();
    // Frames stored out of order, with a different rescale each: same volume.
    assert_eq!(a.volume, b.volume);
    // nibabel's multi-frame reader takes the slice spacing from the first two frames
    // of the file, so it needs frames stored in position order.
    let ordered = t.dir("ordered");
    write_series(
        &PhantomSpec {
            enhanced: true,
            shuffle: false,
            ..spec
        },
        &ordered,
    )
    .unwrap();
    let c = native(&ordered).unwrap();
    assert_eq!(a.volume, c.volume);
    let file = files(&ordered).remove(0);
    let nii = write(&c.volume, t.path("enhanced.nii"));
    let r = jobs(vec![
        json!({"kind": "nibabel_dicom", "name": "enhanced", "dicom": file, "nifti": nii}),
    ]);
    assert_close(&r[0], 0.0, 0.0, true);
    assert!(
        r[0]["frame_position_dev"].as_f64().unwrap() < 1e-4,
        "{}",
        r[0]
    );
}

/// A package test file, gunzipped into `dir` when needed.
fn package_file(dir: &std::path::Path, src: &std::path::Path) -> std::path::PathBuf {
    let name = src.file_name().unwrap().to_str().unwrap();
    let out = dir.join(name.trim_end_matches(".gz"));
    let bytes = std::fs::read(src).unwrap();
    let bytes = if name.ends_with(".gz") {
        use std::io::Read;
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut v)
            .unwrap();
        v
    } else {
        bytes
    };
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn real_multiframe_and_mosaic_files_match_nibabel() {
    let (_, nibabel_data) = package_data();
    let t = TempDir::new("ref-nibabel");
    let mut list = Vec::new();
    for (name, file) in [
        ("philips-enhanced-mr", "philips_mprage.dcm.gz"),
        ("siemens-mosaic-b0", "siemens_dwi_0.dcm.gz"),
        ("siemens-mosaic-b1000", "siemens_dwi_1000.dcm.gz"),
    ] {
        let dir = t.dir(name);
        let f = package_file(&dir, &nibabel_data.join(file));
        let built = native(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let nii = write(&built.volume, t.path(&format!("{name}.nii")));
        list.push(json!({"kind": "nibabel_dicom", "name": name, "dicom": f, "nifti": nii}));
    }
    let mut results = jobs(list);
    // nibabel takes the slice spacing of this file from one pair of frames (1.000009
    // mm) where radflow measures it over all 176 (1.0000014 mm, every frame within
    // 1e-5 mm of its grid position); at the far end the two affines part by 1.3e-3 mm.
    let dev = results[0]["frame_position_dev"].as_f64().unwrap();
    assert!(dev < 1e-4, "{}", results[0]);
    let nibabel_diff = results[0]["affine_diff"].as_f64().unwrap();
    assert!(nibabel_diff < 2e-3, "{}", results[0]);
    results[0]["affine_diff"] = json!(0.0);
    for r in &results {
        assert_close(r, 0.0, 0.0, true);
    }
    assert_eq!(results[0]["shape"], json!([176, 256, 256]));
    assert_eq!(results[1]["shape"], json!([128, 128, 48]));

    // A mosaic whose matrix cannot hold its slices is refused, never one slice.
    let dir = t.dir("bad-mosaic");
    package_file(&dir, &nibabel_data.join("0.dcm"));
    let e = native(&dir).unwrap_err();
    assert_eq!(e.code(), "mosaic_unsupported");
    assert!(e.to_string().contains("cannot hold 48 images"), "{e}");
}

#[test]
fn real_files_as_series_match_simpleitk() {
    let (pydicom_data, _) = package_data();
    let t = TempDir::new("ref-pydicom");
    let mut list = Vec::new();
    for (name, file) in [
        ("ct-explicit", "CT_small.dcm"),
        ("mr-implicit", "MR_small_implicit.dcm"),
        ("mr-big-endian", "MR_small_bigendian.dcm"),
        ("mr-rle", "MR_small_RLE.dcm"),
        ("mr-jpeg-ls", "MR_small_jpeg_ls_lossless.dcm"),
        ("mr-j2k-lossless", "MR_small_jp2klossless.dcm"),
        ("ct-j2k-lossy", "693_J2KI.dcm"),
        ("ct-j2k-sign-mismatch", "J2K_pixelrep_mismatch.dcm"),
    ] {
        let dir = t.path(name);
        let src = pydicom_data.join(file);
        common::reference(
            &[
                "replicate",
                src.to_str().unwrap(),
                dir.to_str().unwrap(),
                "4",
                "2.5",
            ],
            None,
        );
        let built = native(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(built.volume.grid.dims[2], 4, "{name}");
        let nii = write(&built.volume, t.path(&format!("{name}.nii")));
        list.push(json!({"kind": "sitk_series", "name": name, "dicom": dir, "nifti": nii}));
    }
    for r in jobs(list) {
        let name = r["name"].as_str().unwrap();
        let lossy = name.contains("lossy");
        assert_close(
            &r,
            if lossy { 1.0 } else { 0.0 },
            if lossy { 5.0 } else { 0.0 },
            true,
        );
    }
}

#[test]
fn j2k_signedness_padding_near_lossless_and_12_bit_jpeg_match_pydicom() {
    let (pydicom_data, _) = package_data();
    let t = TempDir::new("ref-pixels");
    let mut list = Vec::new();
    for file in [
        "J2K_pixelrep_mismatch.dcm",
        "693_J2KI.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "JPGExtended.dcm",
    ] {
        let path = pydicom_data.join(file);
        let s = decode::read_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let raw = t.path(&format!("{file}.f32"));
        let bytes: Vec<u8> = s.pixels.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&raw, bytes).unwrap();
        list.push(json!({"kind": "pydicom_pixels", "name": file, "dicom": path, "raw": raw}));
    }
    let results = jobs(list);
    for r in &results[..4] {
        assert_eq!(r["max_abs"].as_f64().unwrap(), 0.0, "{r}");
    }
    // 12-bit JPEG Extended (lossy DCT, decoded here by `jpeg_extended`, by libjpeg
    // for pydicom): inverse DCTs may round a sample differently, by one at most.
    let r = &results[4];
    assert!(r["max_abs"].as_f64().unwrap() <= 1.0, "{r}");
    assert!(r["mean_abs"].as_f64().unwrap() < 0.1, "{r}");
    // The same image with the scan header an old encoder wrote (end of spectral
    // selection 0 instead of 63), which libjpeg refuses and IJG and radflow read.
    let read = |f: &str| decode::read_slice(&std::fs::read(pydicom_data.join(f)).unwrap());
    assert_eq!(
        read("JPEG-lossy.dcm").unwrap().pixels,
        read("JPGExtended.dcm").unwrap().pixels
    );
    // The mismatched codestream is unsigned while the data are signed (-2000 HU
    // padding in a 13-bit signed CT): read as unsigned, they would be positive.
    assert_eq!(
        results[0]["ref_min"].as_f64().unwrap(),
        -2000.0,
        "{}",
        results[0]
    );
    // Lossy CT with Pixel Padding Value: the padding becomes air, the rest is exact.
    assert!(results[1]["padded"].as_u64().unwrap() > 0, "{}", results[1]);
    assert_eq!(
        results[1]["ours_at_padding"],
        json!([-1024.0]),
        "{}",
        results[1]
    );
}
