//! radflow's side of the inferer benchmarks (`bench/inferer.py` runs it against the
//! Python onnxruntime + NumPy reference in `bench/inferer_reference.py`). Prints one
//! JSON object per command on stdout.
//!
//! ```text
//! inferer_bench patch  --model M.onnx --threads T --runs N [--warmup W] [--size 96]
//! inferer_bench window --model M.onnx --volume V.nii.gz --out L.nii.gz --threads T
//!                      [--roi 96] [--overlap 0.25] [--batch 1] [--repeat 2]
//! inferer_bench e2e    --volume V.nii.gz --source S.nii.gz --threads T [--runs 3]
//! ```
//!
//! - `patch`: `session.run` latency of one `[1, 1, size³]` patch, after warm-up runs;
//! - `window`: the whole-volume path: read the volume (NIfTI), sliding window with
//!   Gaussian blending, argmax, write the label map (NIfTI), with the time inside
//!   `session.run` measured separately; `--repeat` times in one process (the first
//!   pays for first-touch memory, the later ones are a running service);
//! - `e2e`: the demo model's inferer stage on one job, from the message to
//!   `summary.json` (memory store, in-process bus), for a volume already prepared by
//!   the preprocessor; `--source` gives the series' native grid for the label map.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::Array5;
use radflow_inferer::registry::ModelHub;
use radflow_inferer::session::{self, ExecutionConfig, ProviderRequest};
use radflow_inferer::sliding_window::{WindowSettings, run_windows_labels};
use radflow_inferer::worker::{Inferer, Summary};
use radflow_shared::bus::{Acker, Bus, BusError, Delivery, InProcBus, Outgoing};
use radflow_shared::events::{SCHEMA_VERSION, VolumeReady};
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{ModelKind, Registry, WindowPadding};
use radflow_shared::store::{Store, VolumeFile};
use radflow_shared::worker::Handler;
use radflow_volume::{Volume, VolumeMeta, nifti};
use serde_json::json;

fn main() {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut flags: HashMap<String, String> = HashMap::new();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        flags.insert(flag.trim_start_matches("--").to_owned(), value);
    }
    let get = |name: &str| -> String {
        flags
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("--{name} is required"))
    };
    let num = |name: &str, default: f64| -> f64 {
        flags
            .get(name)
            .map_or(default, |v| v.parse().expect("a number"))
    };
    radflow_inferer::runtime::init(None).unwrap_or_else(|e| panic!("{e}"));
    let exec = ExecutionConfig {
        provider: ProviderRequest::Cpu,
        intra_threads: Some(num("threads", 2.0) as usize),
        ..ExecutionConfig::default()
    };
    let out = match command.as_str() {
        "patch" => patch(
            &PathBuf::from(get("model")),
            &exec,
            num("size", 96.0) as usize,
            num("warmup", 3.0) as usize,
            num("runs", 20.0) as usize,
        ),
        "window" => window(
            &PathBuf::from(get("model")),
            &PathBuf::from(get("volume")),
            &PathBuf::from(get("out")),
            &exec,
            WindowSettings {
                roi: [num("roi", 96.0) as usize; 3],
                overlap: num("overlap", 0.25),
                batch_size: num("batch", 1.0) as usize,
                padding: WindowPadding::Constant,
            },
            num("repeat", 2.0) as usize,
        ),
        "e2e" => e2e(
            &PathBuf::from(get("volume")),
            &PathBuf::from(get("source")),
            exec,
            num("runs", 3.0) as usize,
        ),
        other => panic!("unknown command {other:?}: patch, window or e2e"),
    };
    println!("{out}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A registry entry for a benchmark model file (NCDHW float32, input `image`, output
/// `logits`, as `scripts/make_unet_model.py` writes them).
fn spec_for(
    model: &std::path::Path,
    patch: usize,
    batch: usize,
) -> (radflow_shared::models::ModelSpec, Vec<u8>) {
    let bytes = std::fs::read(model).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let mut spec = Registry::builtin().models[0].clone();
    spec.name = "bench".into();
    spec.file = model.display().to_string();
    spec.sha256 = session::sha256_hex(&bytes);
    spec.kind = ModelKind::Segmentation;
    spec.patch = [patch; 3];
    spec.batch_size = batch;
    spec.labels.truncate(1);
    (spec, bytes)
}

fn patch(
    model: &std::path::Path,
    exec: &ExecutionConfig,
    size: usize,
    warmup: usize,
    runs: usize,
) -> serde_json::Value {
    let (spec, bytes) = spec_for(model, size, 1);
    let model = session::load(&spec, &bytes, exec).unwrap_or_else(|e| panic!("{e}"));
    let values: Vec<f32> = (0..size * size * size)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 1000.0)
        .collect();
    let input = Array5::from_shape_vec((1, 1, size, size, size), values).unwrap();
    let mut times = Vec::new();
    for i in 0..warmup + runs {
        let t = model.run_patches(input.view(), &mut |_| Ok(())).unwrap();
        if i >= warmup {
            times.push(ms(t));
        }
    }
    json!({ "side": "radflow", "command": "patch", "size": size, "runs_ms": times })
}

fn window(
    model: &std::path::Path,
    volume: &std::path::Path,
    out: &std::path::Path,
    exec: &ExecutionConfig,
    settings: WindowSettings,
    repeat: usize,
) -> serde_json::Value {
    let (spec, bytes) = spec_for(model, settings.roi[0], settings.batch_size);
    let model = session::load(&spec, &bytes, exec).unwrap_or_else(|e| panic!("{e}"));
    let runs: Vec<serde_json::Value> = (0..repeat)
        .map(|_| window_once(&model, volume, out, &settings))
        .collect();
    json!({ "side": "radflow", "command": "window", "runs": runs })
}

/// One volume: read, sliding window and labels, write.
fn window_once(
    model: &session::LoadedModel,
    volume: &std::path::Path,
    out: &std::path::Path,
    settings: &WindowSettings,
) -> serde_json::Value {
    let started = Instant::now();
    let t = Instant::now();
    let bytes = std::fs::read(volume).unwrap();
    let image = radflow_volume::gunzip::read_volume::<f32>(&bytes).unwrap();
    let read = t.elapsed();
    let t = Instant::now();
    // radflow's path: the division by the weights and the argmax are one pass.
    let (labels, stats) = run_windows_labels(model, image.data.view(), settings).unwrap();
    let windowing = t.elapsed();
    let labels = Volume {
        grid: image.grid.clone(),
        data: labels,
    };
    let t = Instant::now();
    std::fs::write(out, nifti::write_nifti_gz(&labels, "bench")).unwrap();
    let write = t.elapsed();
    let total = started.elapsed();
    let run = stats.run_time();
    json!({
        "shape_dhw": image.data.shape(), "windows": stats.windows,
        "total_ms": ms(total), "session_run_ms": ms(run), "outside_ms": ms(total - run),
        "read_ms": ms(read), "window_and_argmax_outside_run_ms": ms(windowing - run),
        "write_ms": ms(write),
    })
}

struct NoAck;

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

fn e2e(
    volume: &std::path::Path,
    source: &std::path::Path,
    exec: ExecutionConfig,
    runs: usize,
) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let registry = Registry::builtin();
        let spec = registry.models[0].clone();
        let metrics = Metrics::new();
        let m = metrics.clone();
        let hub = tokio::task::spawn_blocking(move || ModelHub::load(registry, exec, m))
            .await
            .unwrap();
        let store = Store::memory();
        let bus: Arc<dyn Bus> = Arc::new(InProcBus::new());
        let inferer = Inferer {
            store: store.clone(),
            bus,
            models: Arc::new(hub),
            metrics,
        };
        let volume_bytes = std::fs::read(volume).unwrap();
        let grid = nifti::read_nifti::<f32>(&volume_bytes).unwrap().grid;
        let source_bytes = std::fs::read(source).unwrap();
        let source_grid = nifti::read_nifti::<f32>(&source_bytes)
            .map(|v| v.grid)
            .or_else(|_| nifti::read_nifti::<i16>(&source_bytes).map(|v| v.grid))
            .unwrap();
        drop(source_bytes);
        let series = "2.25.1";
        let volume_key = Store::volume_key(series, &spec.preset.name, VolumeFile::Volume);
        let meta_key = Store::volume_key(series, &spec.preset.name, VolumeFile::Meta);
        let meta = VolumeMeta {
            schema_version: SCHEMA_VERSION,
            study_uid: "2.25.2".into(),
            series_uid: series.into(),
            revision: 1,
            correlation_id: "bench".into(),
            modality: "CT".into(),
            preset: spec.preset.clone(),
            source: source_grid.clone(),
            volume: grid.clone(),
            slices: source_grid.dims[2],
            warnings: vec![],
            suspect_incomplete: None,
        };
        store.put(&volume_key, volume_bytes.into()).await.unwrap();
        store
            .put(&meta_key, serde_json::to_vec(&meta).unwrap().into())
            .await
            .unwrap();
        let mut summaries: Vec<Summary> = Vec::new();
        let mut handle_ms = Vec::new();
        for revision in 1..=runs as u32 {
            let job = VolumeReady {
                schema_version: SCHEMA_VERSION,
                correlation_id: "bench".into(),
                study_uid: "2.25.2".into(),
                series_uid: series.into(),
                revision,
                model: spec.name.clone(),
                model_version: spec.version.clone(),
                preset: spec.preset.name.clone(),
                volume_key: volume_key.clone(),
                meta_key: meta_key.clone(),
                warnings: vec![],
                suspect_incomplete: None,
                lane: Default::default(),
                shadow: false,
                calling_ae: String::new(),
            };
            let out = Outgoing::event(&job);
            let delivery = Delivery {
                subject: out.subject,
                payload: out.payload,
                correlation_id: Some(out.correlation_id),
                attempt: 1,
                acker: Box::new(NoAck),
            };
            let t = Instant::now();
            inferer.handle(&delivery).await.unwrap();
            handle_ms.push(ms(t.elapsed()));
            let bytes = store
                .get(&Store::result_key(series, &spec.reference(), "summary.json"))
                .await
                .unwrap();
            summaries.push(serde_json::from_slice(&bytes).unwrap());
        }
        json!({
            "side": "radflow", "command": "e2e",
            "input_dims": grid.dims, "source_dims": source_grid.dims,
            "windows": summaries[0].windows,
            "handle_ms": handle_ms,
            "timings_ms": summaries.iter().map(|s| serde_json::to_value(&s.timings_ms).unwrap()).collect::<Vec<_>>(),
        })
    })
}
