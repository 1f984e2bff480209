//! The preprocessor and the inferer stages in one process, with the in-process bus, a
//! memory store and the real ONNX Runtime: a synthetic phantom series goes in as the
//! listener leaves it, and the segmentation's label volumes and preview must show the
//! phantom's structures where they are.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TempDir;
use radflow_inferer::registry::ModelHub;
use radflow_inferer::session::{ExecutionConfig, ProviderRequest};
use radflow_inferer::worker::{self, Inferer, Summary};
use radflow_preprocessor::synth::{PhantomSpec, write_series};
use radflow_preprocessor::worker::Preprocessor;
use radflow_shared::bus::{Bus, InProcBus, RESULTS, publish_event};
use radflow_shared::events::{InferenceCompleted, ReadyReason, SCHEMA_VERSION, SeriesReady};
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{ModelKind, Registry, parse_color};
use radflow_shared::store::{Store, VolumeFile};
use radflow_shared::worker::WorkerConfig;
use radflow_volume::{Grid, VolumeMeta};
use tokio_util::sync::CancellationToken;

fn cpu() -> ExecutionConfig {
    radflow_inferer::runtime::init(None).unwrap_or_else(|e| panic!("{e}"));
    ExecutionConfig {
        provider: ProviderRequest::Cpu,
        intra_threads: Some(2),
        ..ExecutionConfig::default()
    }
}

/// An inferer on `bus` and `store` serving `registry`, running until stopped.
struct Running {
    inferer: Arc<Inferer>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(store: &Store, bus: &Arc<dyn Bus>, registry: Registry) -> Running {
    let metrics = Metrics::new();
    let m = metrics.clone();
    let hub = tokio::task::spawn_blocking(move || ModelHub::load(registry, cpu(), m))
        .await
        .unwrap();
    let inferer = Arc::new(Inferer {
        store: store.clone(),
        bus: bus.clone(),
        models: Arc::new(hub),
        metrics,
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker::run(
        inferer.clone(),
        WorkerConfig::new(worker::consumer("all")),
        None,
        Arc::new(AtomicBool::new(false)),
        stop.clone(),
    ));
    Running {
        inferer,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Waits for `summary.json` of `series` and `model_ref` (and `revision`, if given).
async fn wait_summary(
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

fn decode_png(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// Where a world point (LPS mm) is drawn in the preview's axial and coronal panels of
/// an axis-aligned grid with square in-plane voxels: the voxel nearest to it, and the
/// pixels, following the preview's documented orientation (patient left on the image
/// right, anterior up in the axial panel, superior up in the coronal one; one pixel
/// per voxel at the smallest spacing).
struct Panels<'a> {
    grid: &'a Grid,
}

impl Panels<'_> {
    fn voxel(&self, lps: [f64; 3]) -> [usize; 3] {
        let v = self.grid.voxel([-lps[0], -lps[1], lps[2]]).unwrap();
        std::array::from_fn(|a| v[a].round() as usize)
    }

    /// `(column, row)` in the axial panel and the voxel shown there.
    fn axial(&self, lps: [f64; 3]) -> ((usize, usize), [usize; 3]) {
        let [i, j, _] = self.voxel(lps);
        let k = self.grid.dims[2] / 2;
        ((i, j), [i, j, k])
    }

    /// `(column, row)` in the coronal panel (right of the axial one) and its voxel.
    fn coronal(&self, lps: [f64; 3]) -> ((usize, usize), [usize; 3]) {
        let [i, _, k] = self.voxel(lps);
        let j = self.grid.dims[1] / 2;
        let row = self.grid.dims[2] - 1 - k;
        ((self.grid.dims[0] + 4 + i, row), [i, j, k])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phantom_preview_shows_each_label_where_its_structure_is() {
    let store = Store::memory();
    let inproc = InProcBus::new();
    let bus: Arc<dyn Bus> = Arc::new(inproc.clone());
    let registry = Registry::builtin();
    let spec = registry.models[0].clone();

    // A phantom series in the store, as the listener leaves it.
    let dir = TempDir::new("phantom");
    let phantom = PhantomSpec {
        size: 160,
        slices: 40,
        slice_spacing_mm: 2.0,
        ..PhantomSpec::default()
    };
    let truth = write_series(&phantom, &dir.0).unwrap();
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        let path = entry.unwrap().path();
        let sop = path.file_stem().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        store
            .put_instance(
                &truth.study_uid,
                &truth.series_uid,
                &sop,
                Bytes::from(bytes),
            )
            .await
            .unwrap();
    }

    let stop = CancellationToken::new();
    let pre = tokio::spawn(radflow_preprocessor::worker::run(
        Arc::new(Preprocessor {
            store: store.clone(),
            bus: bus.clone(),
            registry: Arc::new(registry.clone()),
            metrics: Metrics::new(),
            geometry: Default::default(),
            // Compressed, as on an object store (the memory store's default is stored
            // blocks, which the preprocessor's own tests use).
            volume_gzip_level: 1,
        }),
        WorkerConfig::new(radflow_preprocessor::worker::consumer()),
        stop.clone(),
    ));
    let running = start(&store, &bus, registry).await;
    publish_event(
        &*bus,
        &SeriesReady {
            schema_version: SCHEMA_VERSION,
            correlation_id: "phantom-1".into(),
            study_uid: truth.study_uid.clone(),
            series_uid: truth.series_uid.clone(),
            revision: 1,
            instances: truth.files as u32,
            modality: "CT".into(),
            called_ae: "RADFLOW".into(),
            calling_ae: "TEST".into(),
            reason: ReadyReason::Quiet,
            ready_at_ms: 0,
            lane: Default::default(),
            models: vec![],
        },
    )
    .await
    .unwrap();

    let reference = spec.reference();
    let summary = wait_summary(
        &store,
        &truth.series_uid,
        &reference,
        None,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(summary.provider, "cpu");
    assert_eq!(summary.model_sha256, spec.sha256);
    assert_eq!(summary.kind, ModelKind::Segmentation);
    assert_eq!(summary.provider_nodes.get("CPUExecutionProvider"), Some(&3));
    assert!(
        summary.onnxruntime.starts_with("1.31"),
        "{}",
        summary.onnxruntime
    );
    assert!(summary.windows >= 4 && summary.batches == summary.windows);
    let t = &summary.timings_ms;
    assert!(t.session_run > 0.0 && t.session_run <= t.inference, "{t:?}");
    assert!(
        t.total >= t.fetch + t.decode + t.inference + t.postprocess,
        "{t:?}"
    );
    for label in ["fat", "soft_tissue", "bone"] {
        let found = summary.labels.iter().find(|l| l.name == label).unwrap();
        let expected = truth.volumes_ml[label];
        assert!(
            (found.volume_ml - expected).abs() < 0.05 * expected,
            "{label}: {} ml vs {expected} ml",
            found.volume_ml
        );
    }

    // The event carries the same facts.
    let results = inproc.stream_messages(RESULTS.name);
    let event: InferenceCompleted = radflow_shared::events::decode(&results[0].1).unwrap();
    assert_eq!(event.model_sha256, spec.sha256);
    assert_eq!(event.provider, "cpu");
    assert_eq!(event.labels.len(), 4);
    let text = running.inferer.metrics.render();
    assert!(
        text.contains(r#"radflow_execution_provider{model="demo-tissue",provider="cpu"} 1"#),
        "{text}"
    );
    let info = format!(
        r#"radflow_model_info{{model="demo-tissue",version="1.0.0",role="serving",sha256="{}"}} 1"#,
        spec.sha256
    );
    assert!(text.contains(&info), "{text}");

    // The preview: each structure in its label's colour over the grey image.
    let meta: VolumeMeta = serde_json::from_slice(
        &store
            .get(&Store::volume_key(
                &truth.series_uid,
                &spec.preset.name,
                VolumeFile::Meta,
            ))
            .await
            .unwrap(),
    )
    .unwrap();
    let volume = radflow_volume::nifti::read_nifti::<f32>(
        &store
            .get(&Store::volume_key(
                &truth.series_uid,
                &spec.preset.name,
                VolumeFile::Volume,
            ))
            .await
            .unwrap(),
    )
    .unwrap();
    let g = &meta.volume;
    let s = g.spacing();
    assert!(
        g.affine[0][0] < 0.0 && g.affine[1][1] < 0.0 && g.affine[2][2] > 0.0,
        "the test assumes a grid from an axial series: {g:?}"
    );
    assert!((s[0] - s[1]).abs() < 1e-9 && s[2] >= s[0] - 1e-9, "{s:?}");
    let png = store
        .get(&Store::result_key(
            &truth.series_uid,
            &reference,
            "preview.png",
        ))
        .await
        .unwrap();
    let (width, height, rgb) = decode_png(&png);
    assert_eq!(
        width,
        2 * g.dims[0] + g.dims[1] + 8,
        "three panels, 4 px apart"
    );
    assert!(height >= g.dims[1]);

    let colour = |name: &str| {
        let l = spec.labels.iter().find(|l| l.name == name).unwrap();
        parse_color(&l.color).unwrap()
    };
    let panels = Panels { grid: g };
    let centre = truth.centre_z_mm;
    let slice_z = g.world([0.0, 0.0, (g.dims[2] / 2) as f64])[2];
    let slice_y = -g.world([0.0, (g.dims[1] / 2) as f64, 0.0])[1];
    assert!((slice_z - centre).abs() < 2.0 && slice_y.abs() < 2.0);
    // What, where (pixel and voxel), and the label colour expected there (none: grey).
    type Check<'a> = (&'a str, ((usize, usize), [usize; 3]), Option<[u8; 3]>);
    let checks: Vec<Check> = vec![
        // Axial slice through the centre: organ, fat ring, spine, bone ball, gas.
        (
            "organ",
            panels.axial([0.0, -40.0, slice_z]),
            Some(colour("soft_tissue")),
        ),
        (
            "anterior fat",
            panels.axial([0.0, -100.0, slice_z]),
            Some(colour("fat")),
        ),
        (
            "lateral fat",
            panels.axial([138.0, 0.0, slice_z]),
            Some(colour("fat")),
        ),
        (
            "spine",
            panels.axial([0.0, 55.0, slice_z]),
            Some(colour("bone")),
        ),
        (
            "bone ball",
            panels.axial([-60.0, 0.0, slice_z]),
            Some(colour("bone")),
        ),
        ("gas pocket", panels.axial([60.0, -20.0, slice_z]), None),
        ("outside", panels.axial([0.0, -160.0, slice_z]), None),
        // Coronal slice through the centre: the bone ball and the organ around it.
        (
            "coronal bone ball",
            panels.coronal([-60.0, slice_y, centre]),
            Some(colour("bone")),
        ),
        (
            "coronal organ",
            panels.coronal([0.0, slice_y, centre + 30.0]),
            Some(colour("soft_tissue")),
        ),
        (
            "coronal fat",
            panels.coronal([138.0, slice_y, centre - 30.0]),
            Some(colour("fat")),
        ),
    ];
    for (what, ((col, row), [i, j, k]), label) in checks {
        let v = volume.data[[k, j, i]].clamp(0.0, 1.0);
        let grey = (v * 255.0).round() as u8;
        let expected = match label {
            Some(c) => c.map(|c| (u16::from(c) + u16::from(grey)).div_ceil(2) as u8),
            None => [grey; 3],
        };
        let at = (row * width + col) * 3;
        let got = [rgb[at], rgb[at + 1], rgb[at + 2]];
        let close = got.iter().zip(expected).all(|(&a, b)| a.abs_diff(b) <= 2);
        assert!(
            close,
            "{what}: pixel ({col}, {row}) is {got:?}, expected {expected:?} (grey {grey})"
        );
    }

    running.stop().await;
    stop.cancel();
    pre.await.unwrap();
}
