//! Linear inversion and fractional SEGs.
//!
//! `probabilities_on_grid` (the scores' probabilities moved trilinearly onto the
//! source grid, the label their argmax there) is compared with an independent SciPy
//! reference (`tests/invert_reference.py`: float64, `map_coordinates(order=1)`), on
//! grids where it differs from the nearest-neighbour label map. Then the stage itself:
//! the demo model with `invert_interpolation = "linear"` and `segmentation_type =
//! "fractional"` through `Inferer::handle`, its `seg.dcm` read back with highdicom to
//! the reference probabilities within 1/255 and checked with dciodvfy.

mod common;

use std::path::Path;
use std::process::Command;

use ndarray::{Array3, Array4};
use radflow_inferer::outputs::{activate, labels_on_grid, probabilities_on_grid};
use radflow_inferer::sliding_window::argmax_labels;
use radflow_shared::models::Activation;
use radflow_volume::{Grid, Volume};
use serde_json::json;

use common::{Scratch, random_values, read_f32, write_f32};

/// What the SciPy reference computed.
struct Reference {
    /// Probabilities on the scores' grid, `[C, Z, Y, X]` flattened.
    activated: Vec<f32>,
    /// Probabilities on the target grid, `[C, nz, ny, nx]` flattened.
    probabilities: Vec<f32>,
    /// Labels on the target grid, `[nz, ny, nx]` flattened.
    labels: Vec<u8>,
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Softmax => "softmax",
        Activation::Sigmoid => "sigmoid",
        Activation::None => "none",
    }
}

fn reference(
    tag: &str,
    scores: &Array4<f32>,
    grid: &Grid,
    target: &Grid,
    a: Activation,
) -> Reference {
    let scratch = Scratch::new(tag);
    let dir = &scratch.0;
    let (c, z, y, x) = scores.dim();
    let params = json!({
        "shape": [c, z, y, x],
        "grid": grid.affine,
        "target": { "dims": target.dims, "affine": target.affine },
        "activation": activation_name(a),
    });
    std::fs::write(dir.join("params.json"), params.to_string()).unwrap();
    write_f32(&dir.join("scores.f32"), scores.iter().copied());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invert_reference.py");
    let out = Command::new(radflow_shared::testing::python())
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 for the reference ({e})"));
    assert!(
        out.status.success(),
        "the SciPy reference failed (it needs numpy and scipy):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Reference {
        activated: read_f32(&dir.join("activated.f32")),
        probabilities: read_f32(&dir.join("probabilities.f32")),
        labels: std::fs::read(dir.join("labels.u8")).unwrap(),
    }
}

/// Scores with regions of each class (smooth, so that boundaries fall between voxels)
/// and some noise.
fn scores(channels: usize, grid: &Grid, seed: u64) -> Array4<f32> {
    let [nx, ny, nz] = grid.dims;
    let noise = random_values(seed, channels * nz * ny * nx, -0.4, 0.4);
    Array4::from_shape_fn((channels, nz, ny, nx), |(c, k, j, i)| {
        let phase = c as f32 * 2.1;
        let wave = (i as f32 * 0.55 + phase).sin()
            + (j as f32 * 0.4 - phase).cos()
            + (k as f32 * 0.7 + 0.5 * phase).sin();
        2.0 * wave + noise[((c * nz + k) * ny + j) * nx + i]
    })
}

fn axis_grid(dims: [usize; 3], spacing: [f64; 3], origin: [f64; 3]) -> Grid {
    Grid {
        dims,
        affine: [
            [-spacing[0], 0.0, 0.0, origin[0]],
            [0.0, -spacing[1], 0.0, origin[1]],
            [0.0, 0.0, spacing[2], origin[2]],
            [0.0, 0.0, 0.0, 1.0],
        ],
    }
}

/// Checks `probabilities_on_grid` against the reference and returns how many target
/// voxels the nearest-neighbour label map labels otherwise.
fn check_against_reference(tag: &str, grid: &Grid, target: &Grid, activation: Activation) -> usize {
    let channels = 4;
    let raw = scores(channels, grid, tag.len() as u64 * 7 + 3);
    let want = reference(tag, &raw, grid, target, activation);

    let mut probabilities = raw.clone();
    activate(&mut probabilities, activation);
    let worst = probabilities
        .iter()
        .zip(&want.activated)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "{tag}: activation differs by {worst}");

    let all: Vec<usize> = (0..channels).collect();
    let moved = probabilities_on_grid(probabilities.view(), grid, target, true, &all);
    let (labels, counts) = moved.labels.expect("labels were asked for");
    let fractions = moved.fractions.expect("fractions were asked for");
    assert_eq!(labels.grid, *target);
    let [tx, ty, tz] = target.dims;
    assert_eq!(fractions.dim(), (channels, tz, ty, tx));

    // Fractions: round(p × 255) of the reference's probability, within one step (the
    // reference is float64, radflow float32).
    let mut off = 0;
    for ((c, k, j, i), &f) in fractions.indexed_iter() {
        let p = want.probabilities[((c * tz + k) * ty + j) * tx + i];
        if (f32::from(f) - (p * 255.0).round()).abs() > 1.0 {
            off += 1;
        }
    }
    assert_eq!(
        off, 0,
        "{tag}: fractions more than 1/255 from the reference"
    );

    // Labels: the reference's, except where its two best classes tie within float32
    // rounding.
    let mut different = 0;
    let mut ties = 0;
    for ((k, j, i), &l) in labels.data.indexed_iter() {
        let at = (k * ty + j) * tx + i;
        let r = want.labels[at];
        if l != r {
            let p = |c: u8| want.probabilities[((usize::from(c) * tz + k) * ty + j) * tx + i];
            if (p(l) - p(r)).abs() < 1e-5 {
                ties += 1;
            } else {
                different += 1;
            }
        }
    }
    assert_eq!(different, 0, "{tag}: labels differ from the reference");
    assert!(ties * 1000 <= tz * ty * tx, "{tag}: {ties} near ties");
    let mut direct = [0u64; 256];
    for &l in &labels.data {
        direct[usize::from(l)] += 1;
    }
    assert_eq!(counts, direct, "{tag}: counts");
    assert!(
        counts.iter().filter(|&&n| n > 0).count() == channels,
        "{tag}: every class is present"
    );

    // Labels only (no fractions), and fractions only: the same results.
    let only_labels = probabilities_on_grid(probabilities.view(), grid, target, true, &[]);
    assert!(only_labels.fractions.is_none());
    assert!(only_labels.labels.unwrap().0.data == labels.data);
    let some = probabilities_on_grid(probabilities.view(), grid, target, false, &[3, 1]);
    assert!(some.labels.is_none());
    let some = some.fractions.unwrap();
    let same = |s: usize, c: usize| {
        some.index_axis(ndarray::Axis(0), s) == fractions.index_axis(ndarray::Axis(0), c)
    };
    assert!(
        same(0, 3) && same(1, 1),
        "{tag}: fractions of chosen channels"
    );

    // What nearest neighbour gives instead.
    let model_labels = Volume {
        grid: grid.clone(),
        data: argmax_labels(raw.view()),
    };
    let (nearest, _) = labels_on_grid(&model_labels, target);
    nearest
        .data
        .iter()
        .zip(labels.data.iter())
        .filter(|(a, b)| a != b)
        .count()
}

#[test]
fn linear_inversion_equals_the_scipy_reference_and_differs_from_nearest() {
    let model = axis_grid([14, 12, 9], [1.5, 1.5, 2.0], [20.0, 15.0, -40.0]);
    // A finer source of the same orientation, shifted and reaching past the model
    // grid (edge values extend), as a thin-slice CT under a 1.5 mm preset.
    let finer = axis_grid([31, 27, 22], [0.7, 0.68, 0.9], [20.6, 15.3, -40.8]);
    // Axes permuted and one flipped: still one source axis per target axis.
    let permuted = Grid {
        dims: [17, 23, 29],
        affine: [
            [0.0, 0.0, -0.7, 19.0],
            [0.0, 0.8, 0.0, -1.0],
            [1.1, 0.0, 0.0, -41.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    // An oblique source: the general path.
    let (c, s) = (0.35f64.cos(), 0.35f64.sin());
    let oblique = Grid {
        dims: [26, 24, 15],
        affine: [
            [-0.8 * c, -0.8 * s, 0.0, 18.0],
            [-0.8 * s, 0.8 * c, 0.0, 10.0],
            [0.0, 0.1, 1.1, -39.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    let mut differ = Vec::new();
    for (tag, target, activation) in [
        ("finer", &finer, Activation::Softmax),
        ("permuted", &permuted, Activation::Softmax),
        ("oblique", &oblique, Activation::Softmax),
        ("sigmoid", &finer, Activation::Sigmoid),
    ] {
        let n = check_against_reference(tag, &model, target, activation);
        differ.push((tag, n, target.len()));
    }
    // The option matters: on grids finer than the model's, linear inversion moves
    // the class boundaries off the nearest neighbour's voxel steps.
    for &(tag, n, total) in &differ {
        assert!(
            n * 100 > total,
            "{tag}: only {n} of {total} voxels differ from nearest"
        );
    }
}

#[test]
fn on_the_model_grid_itself_linear_and_nearest_agree() {
    let grid = axis_grid([11, 9, 7], [1.5, 1.5, 1.5], [0.0, 0.0, 0.0]);
    let raw = scores(3, &grid, 11);
    let mut probabilities = raw.clone();
    activate(&mut probabilities, Activation::Softmax);
    let moved = probabilities_on_grid(probabilities.view(), &grid, &grid, true, &[]);
    let (labels, _) = moved.labels.unwrap();
    let argmax: Array3<u8> = argmax_labels(raw.view());
    assert!(
        labels.data == argmax,
        "the same grid gives the model's labels"
    );
}

/// The stage's results of one model configuration.
mod stage {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;

    use bytes::Bytes;
    use dicom_core::value::PrimitiveValue;
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    use ndarray::Array3;
    use radflow_inferer::registry::ModelHub;
    use radflow_inferer::session::{ExecutionConfig, ProviderRequest};
    use radflow_inferer::sliding_window::{WindowSettings, run_windows};
    use radflow_inferer::worker::{Inferer, Summary};
    use radflow_shared::bus::{Bus, InProcBus};
    use radflow_shared::metrics::Metrics;
    use radflow_shared::models::{Interpolation, ModelSpec, Registry, SegmentationType};
    use radflow_shared::store::Store;
    use radflow_shared::worker::Handler;
    use radflow_volume::resample::grid_with_spacing;
    use radflow_volume::{Grid, Volume};
    use serde_json::json;

    use crate::common::Scratch;
    use crate::common::stage::{delivery, put_job_on};

    const STUDY: &str = "1.2.3";
    const SERIES: &str = "1.2.826.0.1.3680043.8.498.7301";
    const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";

    fn cpu() -> ExecutionConfig {
        radflow_inferer::runtime::init(None).unwrap_or_else(|e| panic!("{e}"));
        ExecutionConfig {
            provider: ProviderRequest::Cpu,
            intra_threads: Some(2),
            ..ExecutionConfig::default()
        }
    }

    /// The source grid: axial, 0.75 mm in-plane, 1 mm slices, RAS+ with (i, j, k) =
    /// (column, row, slice).
    pub fn source_grid() -> Grid {
        Grid {
            dims: [40, 36, 20],
            affine: [
                [-0.75, 0.0, 0.0, 10.0],
                [0.0, -0.75, 0.0, 12.0],
                [0.0, 0.0, 1.0, -30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    /// One axial CT header per plane of `grid` (pixels zero: the inferer reads
    /// headers only), written into `dir`; returns the files in slice order.
    pub fn write_source_series(dir: &Path, grid: &Grid) -> Vec<PathBuf> {
        let [nx, ny, nz] = grid.dims;
        let a = &grid.affine;
        let mut paths = Vec::new();
        for k in 0..nz {
            let uid = format!("{SERIES}.{}", k + 1);
            let world = grid.world([0.0, 0.0, k as f64]);
            // RAS+ → LPS.
            let ipp = format!("{:.4}\\{:.4}\\{:.4}", -world[0], -world[1], world[2]);
            let spacing = format!("{}\\{}", a[1][1].abs(), a[0][0].abs());
            let mut obj = InMemDicomObject::new_empty();
            let s = |obj: &mut InMemDicomObject, tag, vr, v: &str| {
                obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
            };
            s(&mut obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
            s(&mut obj, tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE);
            s(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, &uid);
            s(&mut obj, tags::STUDY_DATE, VR::DA, "20260101");
            s(&mut obj, tags::STUDY_TIME, VR::TM, "101500");
            s(&mut obj, tags::ACCESSION_NUMBER, VR::SH, "ACC7");
            s(&mut obj, tags::MODALITY, VR::CS, "CT");
            s(&mut obj, tags::MANUFACTURER, VR::LO, "Scanner Inc");
            s(&mut obj, tags::REFERRING_PHYSICIAN_NAME, VR::PN, "");
            s(&mut obj, tags::PATIENT_NAME, VR::PN, "Doe^John");
            s(&mut obj, tags::PATIENT_ID, VR::LO, "P0007");
            s(&mut obj, tags::PATIENT_BIRTH_DATE, VR::DA, "19700101");
            s(&mut obj, tags::PATIENT_SEX, VR::CS, "M");
            s(
                &mut obj,
                tags::SLICE_THICKNESS,
                VR::DS,
                &format!("{}", a[2][2]),
            );
            s(&mut obj, tags::STUDY_INSTANCE_UID, VR::UI, STUDY);
            s(&mut obj, tags::SERIES_INSTANCE_UID, VR::UI, SERIES);
            s(&mut obj, tags::STUDY_ID, VR::SH, "S7");
            s(&mut obj, tags::SERIES_NUMBER, VR::IS, "3");
            s(
                &mut obj,
                tags::INSTANCE_NUMBER,
                VR::IS,
                &(k + 1).to_string(),
            );
            s(&mut obj, tags::IMAGE_POSITION_PATIENT, VR::DS, &ipp);
            s(
                &mut obj,
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                "1\\0\\0\\0\\1\\0",
            );
            s(
                &mut obj,
                tags::FRAME_OF_REFERENCE_UID,
                VR::UI,
                "1.2.826.0.1.3680043.8.498.7302",
            );
            s(&mut obj, tags::PIXEL_SPACING, VR::DS, &spacing);
            s(
                &mut obj,
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                "MONOCHROME2",
            );
            let us = |obj: &mut InMemDicomObject, tag, v: u16| {
                obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
            };
            us(&mut obj, tags::SAMPLES_PER_PIXEL, 1);
            us(&mut obj, tags::ROWS, ny as u16);
            us(&mut obj, tags::COLUMNS, nx as u16);
            us(&mut obj, tags::BITS_ALLOCATED, 16);
            us(&mut obj, tags::BITS_STORED, 16);
            us(&mut obj, tags::HIGH_BIT, 15);
            us(&mut obj, tags::PIXEL_REPRESENTATION, 0);
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::from(vec![0u8; nx * ny * 2]),
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

    /// The model input: the preset's 1.5 mm grid over the source, values in the CT
    /// window's [0, 1] that cross every tissue class of the demo model.
    pub fn model_input(source: &Grid) -> Volume<f32> {
        let grid = grid_with_spacing(source, [1.5, 1.5, 1.5]);
        let [nx, ny, nz] = grid.dims;
        let data = Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
            0.47 + 0.28 * (0.45 * i as f32 + 0.3 * k as f32).sin() * (0.35 * j as f32).cos()
        });
        Volume::new(grid, data).unwrap()
    }

    /// The files one configuration produced.
    pub struct Outcome {
        pub dir: PathBuf,
        pub summary: Summary,
        pub labels_nii: Vec<u8>,
    }

    /// The demo model with `invert` and `seg`, run by `Inferer::handle` on `volume`
    /// (revision `revision` of the series, whose instances are in `store`); its
    /// results are copied into `out/<tag>/`. Returns them with the model's blended
    /// scores when `scores` is asked for.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        store: &Store,
        out: &Path,
        tag: &str,
        revision: u32,
        invert: Interpolation,
        seg: SegmentationType,
        volume: &Volume<f32>,
        source: &Grid,
        scores: bool,
    ) -> (Outcome, Option<ndarray::Array4<f32>>, ModelSpec) {
        let mut spec = Registry::builtin().models[0].clone();
        spec.invert_interpolation = invert;
        spec.segmentation_type = seg;
        let registry = Registry {
            models: vec![spec.clone()],
            base_dir: None,
        };
        let metrics = Metrics::new();
        let m = metrics.clone();
        let hub = tokio::task::spawn_blocking(move || ModelHub::load(registry, cpu(), m))
            .await
            .unwrap();
        let model = hub.current().get(&spec.reference()).unwrap().model.clone();
        let bus: Arc<dyn Bus> = Arc::new(InProcBus::new());
        let inferer = Inferer {
            store: store.clone(),
            bus,
            models: Arc::new(hub),
            metrics,
        };
        let job = put_job_on(store, SERIES, revision, &spec, volume, source).await;
        inferer.handle(&delivery(&job)).await.unwrap();

        let dir = out.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = std::collections::BTreeMap::new();
        for name in ["summary.json", "labels.nii.gz", "seg.dcm", "sr.dcm"] {
            let key = Store::result_key(SERIES, &spec.reference(), name);
            let bytes = store.get(&key).await.unwrap();
            std::fs::write(dir.join(name), &bytes).unwrap();
            files.insert(name, bytes);
        }
        let summary: Summary = serde_json::from_slice(&files["summary.json"]).unwrap();
        assert_eq!(summary.revision, revision);
        assert_eq!(summary.dicom.len(), 2, "{tag}: {:?}", summary.warnings);
        let scores = scores.then(|| {
            run_windows(&*model, volume.data.view(), &WindowSettings::of(&spec))
                .unwrap()
                .0
        });
        let outcome = Outcome {
            dir,
            summary,
            labels_nii: files["labels.nii.gz"].to_vec(),
        };
        (outcome, scores, spec)
    }

    /// Puts the source instances into the store.
    pub async fn put_sources(store: &Store, paths: &[PathBuf]) {
        for (k, path) in paths.iter().enumerate() {
            let key = Store::instance_key(STUDY, SERIES, &format!("{SERIES}.{}", k + 1));
            store
                .put(&key, Bytes::from(std::fs::read(path).unwrap()))
                .await
                .unwrap();
        }
    }

    pub fn source_uids(n: usize) -> Vec<String> {
        (1..=n).map(|k| format!("{SERIES}.{k}")).collect()
    }

    pub fn dciodvfy(path: &Path) {
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

    /// Runs a check script with the reference Python; it must print `OK`.
    pub fn python_check(script: &Path, args: &[&Path]) -> String {
        let out = Command::new(radflow_shared::testing::python())
            .arg(script)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e})"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.starts_with("OK"),
            "{} failed:\n{text}",
            script.display()
        );
        text
    }

    /// Writes what `check_inverted_result.py` needs into `outcome.dir` and runs it.
    pub fn check_inverted(
        outcome: &Outcome,
        scores: &ndarray::Array4<f32>,
        model_grid: &Grid,
        source: &Grid,
        invert: &str,
    ) -> String {
        let dir = &outcome.dir;
        crate::common::write_f32(&dir.join("scores.f32"), scores.iter().copied());
        let kind = match outcome.summary.segmentation_type {
            Some(SegmentationType::Fractional) => "fractional",
            Some(SegmentationType::Binary) => "binary",
            None => panic!("no SEG"),
        };
        let (c, z, y, x) = scores.dim();
        let expected = json!({
            "params": {
                "shape": [c, z, y, x],
                "grid": model_grid.affine,
                "target": { "dims": source.dims, "affine": source.affine },
                "activation": "softmax",
            },
            "invert": invert,
            "labels": dir.join("labels.nii.gz"),
            "seg": dir.join("seg.dcm"),
            "kind": kind,
            "source_uids": source_uids(source.dims[2]),
            "segments": [[1, 1], [2, 2], [3, 3]],
        });
        std::fs::write(dir.join("expected.json"), expected.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_inverted_result.py");
        python_check(&script, &[dir])
    }

    pub fn scratch(tag: &str) -> Scratch {
        Scratch::new(tag)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stage_writes_linear_labels_and_a_fractional_seg_that_reads_back_to_the_probabilities()
{
    use radflow_shared::models::{Interpolation, SegmentationType};
    use radflow_shared::store::Store;

    let scratch = stage::scratch("fractional-stage");
    let series_dir = scratch.0.join("series");
    std::fs::create_dir_all(&series_dir).unwrap();
    let source = stage::source_grid();
    let paths = stage::write_source_series(&series_dir, &source);
    let store = Store::memory();
    stage::put_sources(&store, &paths).await;
    let volume = stage::model_input(&source);
    assert_ne!(volume.grid.dims, source.dims, "the model grid is coarser");

    // Today's default: nearest neighbour, binary SEG.
    let (nearest, scores, _) = stage::run(
        &store,
        &scratch.0,
        "nearest-binary",
        1,
        Interpolation::Nearest,
        SegmentationType::Binary,
        &volume,
        &source,
        true,
    )
    .await;
    let scores = scores.unwrap();
    assert_eq!(
        nearest.summary.segmentation_type,
        Some(SegmentationType::Binary)
    );

    // Linear inversion, fractional SEG.
    let (both, _, _) = stage::run(
        &store,
        &scratch.0,
        "linear-fractional",
        2,
        Interpolation::Linear,
        SegmentationType::Fractional,
        &volume,
        &source,
        false,
    )
    .await;
    assert_eq!(
        both.summary.segmentation_type,
        Some(SegmentationType::Fractional)
    );
    let json = std::fs::read_to_string(both.dir.join("summary.json")).unwrap();
    assert!(
        json.contains(r#""segmentation_type": "fractional""#),
        "{json}"
    );
    stage::dciodvfy(&both.dir.join("seg.dcm"));
    stage::dciodvfy(&both.dir.join("sr.dcm"));
    let report = stage::check_inverted(&both, &scores, &volume.grid, &source, "linear");
    eprintln!("linear, fractional: {report}");
    assert!(
        both.labels_nii != nearest.labels_nii,
        "linear inversion changed no label"
    );

    // Linear inversion, binary SEG: the SEG is still exactly labels.nii.gz.
    let (linear, _, _) = stage::run(
        &store,
        &scratch.0,
        "linear-binary",
        3,
        Interpolation::Linear,
        SegmentationType::Binary,
        &volume,
        &source,
        false,
    )
    .await;
    assert!(
        linear.labels_nii == both.labels_nii,
        "the SEG type changed the labels"
    );
    stage::dciodvfy(&linear.dir.join("seg.dcm"));
    let report = stage::check_inverted(&linear, &scores, &volume.grid, &source, "linear");
    eprintln!("linear, binary: {report}");
    let check =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/check_result_dicom.py");
    stage::python_check(&check, &[&linear.dir, &series_dir]);
    stage::python_check(&check, &[&nearest.dir, &series_dir]);

    // Nearest neighbour, fractional SEG: the labels are today's, the SEG's
    // probabilities still trilinear.
    let (fractional, _, _) = stage::run(
        &store,
        &scratch.0,
        "nearest-fractional",
        4,
        Interpolation::Nearest,
        SegmentationType::Fractional,
        &volume,
        &source,
        false,
    )
    .await;
    assert!(
        fractional.labels_nii == nearest.labels_nii,
        "a fractional SEG changed the nearest-neighbour labels"
    );
    assert!(fractional.summary.labels == nearest.summary.labels);
    stage::dciodvfy(&fractional.dir.join("seg.dcm"));
    let report = stage::check_inverted(&fractional, &scores, &volume.grid, &source, "nearest");
    eprintln!("nearest, fractional: {report}");
}
