//! Writes the SEG and the SR of a 4-label map on a source series, for
//! `bench/results_dicom.py`: reads the series' headers, makes the label map (four
//! ellipsoids), saves it raw (`labels.u8`, slices × rows × columns in slice order)
//! so that the reference writer gets the same input, then writes `seg.dcm` and
//! `sr.dcm` and prints one JSON line of timings and memory.
//!
//! ```text
//! cargo run --release -p radflow-results --example write_results -- SERIES_DIR OUT_DIR
//! ```
//!
//! Memory: the peak resident set is reset (`/proc/self/clear_refs`) once the label map
//! and the headers are in memory, so `write_extra_kib` is what writing adds on top of
//! its inputs.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array3;
use radflow_results::*;
use radflow_shared::models::Code;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn code(scheme: &str, value: &str, meaning: &str) -> Code {
    Code {
        scheme: scheme.into(),
        value: value.into(),
        meaning: meaning.into(),
    }
}

/// Four organs, as a model registry would describe them.
fn segments() -> Vec<SegmentDescription> {
    let anatomy = code("SCT", "123037004", "Anatomical Structure");
    [
        (1, "liver", "10200004", "Liver", [221, 130, 101]),
        (2, "spleen", "78961009", "Spleen", [157, 108, 162]),
        (3, "left_kidney", "64033007", "Kidney", [185, 102, 83]),
        (4, "vertebra", "51282000", "Spine", [241, 214, 145]),
    ]
    .into_iter()
    .map(|(label, name, value, meaning, color)| SegmentDescription {
        label,
        name: name.into(),
        category: anatomy.clone(),
        property_type: code("SCT", value, meaning),
        color,
    })
    .collect()
}

/// Four ellipsoids of different sizes, centred at fractions of the volume.
fn label_map(nz: usize, rows: usize, cols: usize) -> Array3<u8> {
    let blobs = [
        (1u8, [0.5, 0.35, 0.35], [0.30, 0.22, 0.20]),
        (2, [0.45, 0.40, 0.75], [0.15, 0.10, 0.08]),
        (3, [0.55, 0.65, 0.70], [0.12, 0.07, 0.06]),
        (4, [0.5, 0.75, 0.5], [0.45, 0.06, 0.05]),
    ];
    Array3::from_shape_fn((nz, rows, cols), |(z, y, x)| {
        let p = [
            z as f64 / nz as f64,
            y as f64 / rows as f64,
            x as f64 / cols as f64,
        ];
        blobs
            .iter()
            .find(|(_, c, r)| (0..3).map(|i| ((p[i] - c[i]) / r[i]).powi(2)).sum::<f64>() <= 1.0)
            .map_or(0, |&(label, _, _)| label)
    })
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [series_dir, out] = args.as_slice() else {
        eprintln!("usage: write_results SERIES_DIR OUT_DIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(out).expect("output folder");
    let t0 = Instant::now();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(series_dir)
        .expect("series folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    paths.sort();
    let instances: Vec<SourceInstance> = paths
        .iter()
        .map(|p| read_source_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    let series = SourceSeries::new(instances).expect("one series");
    let headers_s = t0.elapsed().as_secs_f64();
    let (nz, rows, cols) = series.shape();
    let labels = label_map(nz, rows, cols);
    write_raw(
        &out.join("labels.u8"),
        labels.as_slice().expect("standard layout"),
    );
    let uids: Vec<&str> = series
        .slices()
        .iter()
        .map(|s| s.sop_instance_uid.as_str())
        .collect();
    std::fs::write(out.join("slice_uids.txt"), uids.join("\n").into_bytes()).expect("uids");

    let segments = segments();
    let voxel_ml = {
        let spacing = &series.first().pixel_spacing;
        let mm = |s: &str| s.trim().parse::<f64>().expect("Pixel Spacing is a number");
        mm(&spacing[0]) * mm(&spacing[1]) * series.slice_spacing().unwrap_or(1.0) / 1000.0
    };
    let ctx = ResultContext {
        identity: ResultIdentity {
            source_series_uid: series.first().series_instance_uid.clone(),
            revision: 1,
            model: "bench-organs@1.0.0".into(),
        },
        source: &series,
        algorithm: Algorithm {
            name: "bench-organs".into(),
            version: "1.0.0".into(),
            sha256: "0".repeat(64),
        },
        created: Created {
            date: "20261207".into(),
            time: "120000".into(),
        },
        seg_series_number: 901,
        sr_series_number: 902,
    };

    let rss_before = status_kib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t1 = Instant::now();
    let mut seg_out = BufWriter::new(std::fs::File::create(out.join("seg.dcm")).expect("seg.dcm"));
    let seg = write_seg(
        &mut seg_out,
        &ctx,
        &segments,
        SegPixels::Labels(labels.view()),
    )
    .expect("SEG written");
    seg_out.flush().expect("seg.dcm flushed");
    drop(seg_out);
    let seg_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    let mut counts = [0u64; 256];
    for &v in labels.iter() {
        counts[usize::from(v)] += 1;
    }
    let volumes: Vec<SegmentVolume> = segments
        .iter()
        .map(|s| SegmentVolume {
            segment: s.clone(),
            volume_ml: counts[usize::from(s.label)] as f64 * voxel_ml,
        })
        .collect();
    let mut sr_bytes = Vec::new();
    write_sr(
        &mut sr_bytes,
        &ctx,
        &Measurements::Volumes {
            seg: &seg,
            volumes: &volumes,
        },
    )
    .expect("SR written");
    std::fs::write(out.join("sr.dcm"), &sr_bytes).expect("sr.dcm");
    let sr_s = t2.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:");
    println!(
        "{{\"headers_s\":{headers_s:.4},\"seg_s\":{seg_s:.4},\"sr_s\":{sr_s:.4},\"frames\":{},\
         \"label_map_kib\":{},\"rss_before_kib\":{rss_before},\"peak_kib\":{peak},\
         \"write_extra_kib\":{},\"seg_bytes\":{}}}",
        seg.frames,
        labels.len() / 1024,
        peak.saturating_sub(rss_before),
        std::fs::metadata(out.join("seg.dcm")).map_or(0, |m| m.len()),
    );
}

fn write_raw(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
