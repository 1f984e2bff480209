//! The inferer stage with the in-process bus, a memory store and the real ONNX Runtime:
//! several models served at once with classification jobs batched into one run, and a
//! changed registry applied while the stage runs. (The phantom through the preprocessor
//! and the inferer is in the workspace's `tests/stages.rs`: this crate does not depend
//! on the preprocessor.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ndarray::Array3;
use radflow_inferer::classify::{class_scores, fit_to_patch};
use radflow_inferer::registry::{ModelHub, RegistryWatch};
use radflow_inferer::session::{ExecutionConfig, ProviderRequest};
use radflow_inferer::worker::{self, Inferer};
use radflow_shared::bus::{Bus, InProcBus, RESULTS, publish_event};
use radflow_shared::events::InferenceCompleted;
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{ModelKind, Registry};
use radflow_shared::store::Store;
use radflow_shared::worker::WorkerConfig;
use radflow_volume::Volume;
use tokio_util::sync::CancellationToken;

use common::stage::{grid, put_job, wait_summary};
use common::{
    Scratch, generate_model, generated_spec, random_values, small_model_args, tiny_classifier,
};

fn cpu() -> ExecutionConfig {
    radflow_inferer::runtime::init(None).unwrap_or_else(|e| panic!("{e}"));
    ExecutionConfig {
        provider: ProviderRequest::Cpu,
        intra_threads: Some(2),
        ..ExecutionConfig::default()
    }
}

/// An inferer on `bus` and `store` serving `registry`, running until the returned
/// token is cancelled.
struct Running {
    inferer: Arc<Inferer>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(
    store: &Store,
    bus: &Arc<dyn Bus>,
    registry: Registry,
    watch: Option<RegistryWatch>,
) -> Running {
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
    let ready = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker::run(
        inferer.clone(),
        WorkerConfig::new(worker::consumer("all")),
        watch,
        ready.clone(),
        stop.clone(),
    ));
    Running {
        inferer,
        ready,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_models_and_classification_jobs_batched_into_one_run() {
    let store = Store::memory();
    let inproc = InProcBus::new();
    let bus: Arc<dyn Bus> = Arc::new(inproc.clone());
    let (_generated, mut classifier) = tiny_classifier("worker-classifier", "tiny-classifier", "5");
    classifier.batch_size = 4;
    classifier.batch_wait_ms = 5_000;
    classifier.labels[1].threshold = Some(0.3);
    let demo = Registry::builtin().models[0].clone();
    let registry = Registry {
        models: vec![demo.clone(), classifier.clone()],
        base_dir: None,
    };
    let running = start(&store, &bus, registry, None).await;
    let set = running.inferer.models.current();
    assert_eq!(set.loaded.len(), 2, "{:?}", set.failed);
    let model = set.get(&classifier.reference()).unwrap().model.clone();
    let before = model.counts();

    // Four volumes of another size than the patch (cropped and padded about the
    // centre), each a job for the classifier, and one job for the demo model.
    let mut inputs = Vec::new();
    for n in 0..4u64 {
        let data =
            Array3::from_shape_vec((14, 18, 20), random_values(100 + n, 14 * 18 * 20, 0.0, 1.0))
                .unwrap();
        let volume = Volume::new(grid([20, 18, 14], 1.5), data).unwrap();
        let job = put_job(&store, &format!("1.2.3.{n}"), 1, &classifier, &volume).await;
        inputs.push(fit_to_patch(
            volume.data.view(),
            classifier.patch,
            classifier.padding,
        ));
        publish_event(&*bus, &job).await.unwrap();
    }
    let tissue = Volume::new(
        grid([30, 30, 20], 1.5),
        Array3::from_shape_fn((20, 30, 30), |(_, _, x)| if x < 15 { 0.45 } else { 0.52 }),
    )
    .unwrap();
    let job = put_job(&store, "1.2.3.9", 1, &demo, &tissue).await;
    publish_event(&*bus, &job).await.unwrap();

    for (n, input) in inputs.iter().enumerate() {
        let summary = wait_summary(
            &store,
            &format!("1.2.3.{n}"),
            &classifier.reference(),
            None,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(summary.kind, ModelKind::Classification);
        assert_eq!(summary.batch_size, 4, "all four jobs shared one run");
        assert!(summary.labels.is_empty());
        // The same scores as the volume run alone.
        let alone = model
            .run_scores(
                input
                    .view()
                    .insert_axis(ndarray::Axis(0))
                    .insert_axis(ndarray::Axis(0)),
            )
            .unwrap()
            .0;
        let expected = class_scores(alone.row(0).as_slice().unwrap(), &classifier).unwrap();
        assert_eq!(summary.classes.len(), 3);
        for (got, want) in summary.classes.iter().zip(&expected) {
            assert_eq!((got.index, &got.name), (want.index, &want.name));
            assert!((got.score - want.score).abs() < 1e-5, "{got:?} vs {want:?}");
            assert_eq!(got.positive, want.positive);
        }
        assert!(summary.classes[1].positive.is_some());
        let total: f64 = summary.classes.iter().map(|c| c.score).sum();
        assert!((total - 1.0).abs() < 1e-9, "softmax sums to 1: {total}");
    }
    // One run for the four jobs (plus the four single runs above).
    assert_eq!(model.counts().runs - before.runs, 1 + 4);
    assert_eq!(model.counts().items - before.items, 4 + 4);

    let summary = wait_summary(
        &store,
        "1.2.3.9",
        &demo.reference(),
        None,
        Duration::from_secs(60),
    )
    .await;
    let fat = summary.labels.iter().find(|l| l.name == "fat").unwrap();
    let soft = summary
        .labels
        .iter()
        .find(|l| l.name == "soft_tissue")
        .unwrap();
    assert!(fat.voxels > 0 && soft.voxels > 0, "{:?}", summary.labels);

    let results = inproc.stream_messages(RESULTS.name);
    assert_eq!(results.len(), 5);
    let classified = results
        .iter()
        .map(|(_, p)| radflow_shared::events::decode::<InferenceCompleted>(p).unwrap())
        .filter(|e| e.model == "tiny-classifier")
        .count();
    assert_eq!(classified, 4);
    let metrics = running.inferer.metrics.render();
    assert!(
        metrics
            .contains(r#"radflow_inference_batch_size_bucket{le="4.0",model="tiny-classifier"} 1"#)
            || metrics.contains(
                r#"radflow_inference_batch_size_bucket{model="tiny-classifier",le="4.0"} 1"#
            ),
        "{metrics}"
    );

    // A redelivered job is answered from its complete result, without a run.
    let runs = model.counts().runs;
    let again = put_job(
        &store,
        "1.2.3.0",
        1,
        &classifier,
        &Volume::new(grid([16, 16, 16], 1.5), Array3::zeros((16, 16, 16))).unwrap(),
    )
    .await;
    publish_event(&*bus, &again).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(model.counts().runs, runs);
    running.stop().await;
}

/// Writes the registry text atomically (as a ConfigMap update does).
fn write_registry(dir: &std::path::Path, text: &str) {
    let tmp = dir.join("models.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("models.toml")).unwrap();
}

fn registry_text(models: &[&radflow_shared::models::ModelSpec]) -> String {
    toml::to_string(&Registry {
        models: models.iter().map(|m| (*m).clone()).collect(),
        base_dir: None,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_registry_is_applied_without_a_restart() {
    let store = Store::memory();
    let bus: Arc<dyn Bus> = Arc::new(InProcBus::new());
    let dir = Scratch::new("reload");
    let generated = generate_model("reload-unet", &small_model_args("9"));
    std::fs::copy(&generated.path, dir.0.join("unet.onnx")).unwrap();
    let demo = Registry::builtin().models[0].clone();
    let mut unet = generated_spec(&generated, "unet", 3, [16, 16, 16], ModelKind::Segmentation);
    unet.file = "unet.onnx".into(); // relative to the registry file
    let mut broken = unet.clone();
    broken.name = "broken".into();
    broken.sha256 = "00".repeat(32);

    write_registry(&dir.0, &registry_text(&[&demo]));
    let path = dir.0.join("models.toml");
    let registry = Registry::load(&path).unwrap();
    let watch = RegistryWatch::new(path.clone(), Duration::from_millis(50));
    let running = start(&store, &bus, registry, Some(watch)).await;
    let demo_before = running
        .inferer
        .models
        .current()
        .get(&demo.reference())
        .unwrap();

    // Watch readiness while the registry changes.
    let saw_unready = Arc::new(AtomicBool::new(false));
    let (flag, seen, stop_probe) = (
        running.ready.clone(),
        saw_unready.clone(),
        CancellationToken::new(),
    );
    let probe_stop = stop_probe.clone();
    let probe = tokio::spawn(async move {
        while !probe_stop.is_cancelled() {
            if !flag.load(Ordering::SeqCst) {
                seen.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });

    write_registry(&dir.0, &registry_text(&[&demo, &unet, &broken]));
    let hub = running.inferer.models.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(hub.current().loaded.contains_key(&unet.reference())) {
        assert!(
            std::time::Instant::now() < deadline,
            "the new model was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let set = hub.current();
    // The unchanged model kept its warm session; the broken one is reported.
    assert!(Arc::ptr_eq(
        &set.get(&demo.reference()).unwrap(),
        &demo_before
    ));
    let why = set.get(&broken.reference()).unwrap_err();
    assert!(why.contains("SHA-256"), "{why}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        running.ready.load(Ordering::SeqCst),
        "ready again after the reload"
    );
    assert!(
        saw_unready.load(Ordering::SeqCst),
        "not ready while the new model warmed up"
    );
    stop_probe.cancel();
    probe.await.unwrap();

    // The new model serves jobs.
    let volume = Volume::new(
        grid([20, 24, 18], 1.5),
        Array3::from_shape_vec((18, 24, 20), random_values(4, 18 * 24 * 20, 0.0, 1.0)).unwrap(),
    )
    .unwrap();
    let job = put_job(&store, "4.5.6", 1, &unet, &volume).await;
    publish_event(&*bus, &job).await.unwrap();
    let summary = wait_summary(
        &store,
        "4.5.6",
        &unet.reference(),
        None,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(summary.model_sha256, unet.sha256);
    assert_eq!(summary.windows, 8);

    // An invalid registry is ignored; removing a model stops serving it.
    write_registry(&dir.0, "[[model]]\nname = ");
    let metrics = running.inferer.metrics.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics
        .render()
        .contains(r#"radflow_registry_reloads_total{result="invalid"} 1"#)
    {
        assert!(std::time::Instant::now() < deadline, "{}", metrics.render());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hub.current().loaded.len(), 2);
    write_registry(&dir.0, &registry_text(&[&unet]));
    while hub.current().loaded.contains_key(&demo.reference()) {
        assert!(std::time::Instant::now() < deadline + Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = metrics.render();
    assert!(
        text.contains(r#"radflow_registry_reloads_total{result="applied"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"radflow_model_load_failures_total{model="broken"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"radflow_execution_provider{model="demo-tissue",provider="cpu"} 0"#),
        "{text}"
    );
    assert!(text.contains("radflow_models_loaded 1"), "{text}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_does_not_take_the_others_down() {
    let store = Store::memory();
    let bus: Arc<dyn Bus> = Arc::new(InProcBus::new());
    let demo = Registry::builtin().models[0].clone();
    let mut missing = demo.clone();
    missing.name = "missing".into();
    missing.file = "/nonexistent/model.onnx".into();
    let running = start(
        &store,
        &bus,
        Registry {
            models: vec![demo.clone(), missing.clone()],
            base_dir: None,
        },
        None,
    )
    .await;
    let set = running.inferer.models.current();
    assert!(set.get(&demo.reference()).is_ok());
    assert!(
        set.get(&missing.reference())
            .unwrap_err()
            .contains("/nonexistent/model.onnx")
    );

    // The failed model's job is retried (transient), the other model serves.
    let volume = Volume::new(grid([8, 8, 8], 1.5), Array3::from_elem((8, 8, 8), 0.5)).unwrap();
    let job = put_job(&store, "7.7", 1, &missing, &volume).await;
    let err =
        radflow_shared::worker::Handler::handle(&*running.inferer, &common::stage::delivery(&job))
            .await
            .unwrap_err();
    assert!(
        matches!(err, radflow_shared::worker::HandleError::Transient(_)),
        "{err}"
    );
    let job = put_job(&store, "7.8", 1, &demo, &volume).await;
    publish_event(&*bus, &job).await.unwrap();
    wait_summary(
        &store,
        "7.8",
        &demo.reference(),
        None,
        Duration::from_secs(60),
    )
    .await;
    running.stop().await;
}
