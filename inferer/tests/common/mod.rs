//! Helpers shared by the integration tests: scratch folders, raw float32 files, a
//! seeded random source and the NumPy reference (`tests/monai_reference.py`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A fresh, empty scratch folder, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("radflow-inferer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes float32 values little-endian.
pub fn write_f32(path: &Path, values: impl IntoIterator<Item = f32>) {
    let bytes: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Reads little-endian float32 values.
pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Deterministic uniform values in `[lo, hi)` (xorshift64*), so failures reproduce.
pub fn random_values(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            lo + (hi - lo) * (r as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// Runs the NumPy reference on `image` (C order) with `params` in a scratch folder and
/// returns its output shape and values.
pub fn run_reference(tag: &str, params: Value, image: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let scratch = Scratch::new(tag);
    let dir = &scratch.0;
    std::fs::write(dir.join("params.json"), params.to_string()).unwrap();
    write_f32(&dir.join("image.f32"), image.iter().copied());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/monai_reference.py");
    let out = Command::new(radflow_shared::testing::python())
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 for the reference ({e}); install Python 3 with numpy")
        });
    assert!(
        out.status.success(),
        "the NumPy reference failed (it needs numpy, and onnxruntime==1.31.1 for the model tests):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("output.json")).unwrap()).unwrap();
    let shape = meta["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    (shape, read_f32(&dir.join("output.f32")))
}

/// Largest absolute difference, after checking the lengths agree.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "different numbers of values");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// A model written by `scripts/make_unet_model.py` into its own scratch folder (removed
/// with it).
pub struct GeneratedModel {
    pub scratch: Scratch,
    pub path: PathBuf,
    pub sha256: String,
}

/// Runs the U-Net generator with `args` (after the output path); `tag` names the
/// scratch folder.
pub fn generate_model(tag: &str, args: &[&str]) -> GeneratedModel {
    let scratch = Scratch::new(&format!("model-{tag}"));
    let path = scratch.0.join(format!("{tag}.onnx"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make_unet_model.py");
    let out = Command::new(radflow_shared::testing::python())
        .arg(&script)
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 for the model generator ({e})"));
    assert!(
        out.status.success(),
        "the model generator failed (it needs numpy and onnx==1.23.2):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    let sha256 = radflow_inferer::session::sha256_hex(&bytes);
    GeneratedModel {
        scratch,
        path,
        sha256,
    }
}

/// A registry entry for a generated model: the demo model's entry (preset, routing)
/// with this file, `classes` labels, the patch and the kind.
pub fn generated_spec(
    model: &GeneratedModel,
    name: &str,
    classes: u8,
    patch: [usize; 3],
    kind: radflow_shared::models::ModelKind,
) -> radflow_shared::models::ModelSpec {
    let mut spec = radflow_shared::models::Registry::builtin().models[0].clone();
    spec.name = name.to_owned();
    spec.version = "0.1.0".into();
    spec.file = model.path.display().to_string();
    spec.sha256 = model.sha256.clone();
    spec.kind = kind;
    spec.patch = patch;
    spec.padding = radflow_shared::models::WindowPadding::Constant;
    let colors = [
        "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    ];
    spec.labels = (0..classes)
        .map(|i| radflow_shared::models::LabelSpec {
            index: i,
            name: format!("class_{i}"),
            color: colors[usize::from(i) % colors.len()].into(),
            threshold: None,
        })
        .collect();
    // The demo's DICOM codes name its own labels, not these classes.
    spec.codes.clear();
    spec
}

/// Generator flags of the small models the tests use (CI-sized): seed `seed`, 4 base
/// channels, two poolings, three classes.
pub fn small_model_args(seed: &str) -> Vec<&str> {
    vec![
        "--seed",
        seed,
        "--base",
        "4",
        "--levels",
        "2",
        "--classes",
        "3",
    ]
}

/// A small generated 3-class classifier (16³ patch) and its registry entry.
pub fn tiny_classifier(
    tag: &str,
    name: &str,
    seed: &str,
) -> (GeneratedModel, radflow_shared::models::ModelSpec) {
    let mut args = small_model_args(seed);
    args.push("--classifier");
    let generated = generate_model(tag, &args);
    let spec = generated_spec(
        &generated,
        name,
        3,
        [16, 16, 16],
        radflow_shared::models::ModelKind::Classification,
    );
    (generated, spec)
}

/// Stage-level helpers: jobs, volumes and results in a store, deliveries for `handle`.
pub mod stage {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use radflow_inferer::worker::Summary;
    use radflow_shared::bus::{Acker, BusError, Delivery, Outgoing};
    use radflow_shared::events::{SCHEMA_VERSION, VolumeReady};
    use radflow_shared::models::ModelSpec;
    use radflow_shared::store::{Store, VolumeFile};
    use radflow_volume::{Grid, Volume, VolumeMeta};

    /// An acker that does nothing: for calling `handle` directly.
    pub struct NoAck;

    #[async_trait::async_trait]
    impl Acker for NoAck {
        async fn ack(&self) -> Result<(), BusError> {
            Ok(())
        }
        async fn nak(&self, _delay: Duration) -> Result<(), BusError> {
            Ok(())
        }
        async fn term(&self) -> Result<(), BusError> {
            Ok(())
        }
        async fn progress(&self) -> Result<(), BusError> {
            Ok(())
        }
    }

    /// A first delivery of `job`.
    pub fn delivery(job: &VolumeReady) -> Delivery {
        let out = Outgoing::event(job);
        Delivery {
            subject: out.subject,
            payload: out.payload,
            correlation_id: Some(out.correlation_id),
            attempt: 1,
            acker: Box::new(NoAck),
        }
    }

    /// An axis-aligned grid of `dims` (`[nx, ny, nz]`) and `spacing` mm.
    pub fn grid(dims: [usize; 3], spacing: f64) -> Grid {
        Grid {
            dims,
            affine: [
                [-spacing, 0.0, 0.0, 0.0],
                [0.0, -spacing, 0.0, 0.0],
                [0.0, 0.0, spacing, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    /// Puts `volume` (already the model input; the source grid is the same) and its
    /// `meta.json` into the store, and returns the job for `spec`.
    pub async fn put_job(
        store: &Store,
        series: &str,
        revision: u32,
        spec: &ModelSpec,
        volume: &Volume<f32>,
    ) -> VolumeReady {
        put_job_on(store, series, revision, spec, volume, &volume.grid).await
    }

    /// [`put_job`] for a series whose source grid is `source` (the model input
    /// `volume` was resampled from it).
    pub async fn put_job_on(
        store: &Store,
        series: &str,
        revision: u32,
        spec: &ModelSpec,
        volume: &Volume<f32>,
        source: &Grid,
    ) -> VolumeReady {
        let preset = &spec.preset.name;
        let volume_key = Store::volume_key(series, preset, VolumeFile::Volume);
        let meta_key = Store::volume_key(series, preset, VolumeFile::Meta);
        let meta = VolumeMeta {
            schema_version: SCHEMA_VERSION,
            study_uid: "1.2.3".into(),
            series_uid: series.into(),
            revision,
            correlation_id: format!("corr-{series}-{revision}"),
            modality: "CT".into(),
            preset: spec.preset.clone(),
            source: source.clone(),
            volume: volume.grid.clone(),
            slices: source.dims[2],
            warnings: vec![],
            suspect_incomplete: None,
        };
        let nii = radflow_volume::nifti::write_nifti_gz(volume, "test");
        store.put(&volume_key, Bytes::from(nii)).await.unwrap();
        store
            .put(&meta_key, Bytes::from(serde_json::to_vec(&meta).unwrap()))
            .await
            .unwrap();
        VolumeReady {
            schema_version: SCHEMA_VERSION,
            correlation_id: meta.correlation_id.clone(),
            study_uid: meta.study_uid.clone(),
            series_uid: series.into(),
            revision,
            model: spec.name.clone(),
            model_version: spec.version.clone(),
            preset: preset.clone(),
            volume_key,
            meta_key,
            warnings: vec![],
            suspect_incomplete: None,
            lane: Default::default(),
            shadow: false,
            calling_ae: String::new(),
        }
    }

    /// Waits for `summary.json` of `series` and `model_ref` (and `revision`, if given).
    pub async fn wait_summary(
        store: &Store,
        series: &str,
        model_ref: &str,
        revision: Option<u32>,
        timeout: Duration,
    ) -> Summary {
        let key = Store::result_key(series, model_ref, "summary.json");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(bytes) = store.get(&key).await {
                let summary: Summary = serde_json::from_slice(&bytes).unwrap();
                if revision.is_none_or(|r| summary.revision == r) {
                    return summary;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no summary.json for {series} {model_ref} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
