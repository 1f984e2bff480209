//! The inferer stage: an inference job in, a label map, a summary and a preview out.
//!
//! At start the registry's models are loaded (SHA-256 checked) and warmed up on a
//! patch of their input shape; `/readyz` turns true only then. A model that fails to
//! load is reported (log, metric) and the others keep serving; its jobs are retried
//! and eventually dead-lettered with the load error.
//!
//! Each model has its own durable consumer (`inferer-<model>` on
//! `radflow.job.<model>`), so GPU and CPU models can be served by different
//! deployments. `handle` reads the volume, runs the sliding window, puts the labels
//! back on the source series' grid (nearest neighbour), writes `labels.nii.gz`,
//! `preview.png` and, last, `summary.json` (its presence means "done"), publishes
//! `InferenceCompleted` and only then acks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use radflow_preprocessor::volume::Volume;
use radflow_preprocessor::worker::VolumeMeta;
use radflow_preprocessor::{nifti, resample};
use radflow_shared::bus::{Bus, ConsumerSpec, Delivery, JOBS, publish_event};
use radflow_shared::events::{self, InferenceCompleted, LabelVolume, SCHEMA_VERSION, VolumeReady};
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{ModelKind, Registry};
use radflow_shared::store::{Store, StoreError};
use radflow_shared::util::now_ms;
use radflow_shared::worker::{HandleError, Handler, Outcome, WorkerConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::outputs::{self, LabelStat};
use crate::session::{self, ExecutionConfig, LoadedModel};
use crate::sliding_window;

/// Stage name in metrics, logs and `radflow.dlq.inferer`.
pub const STAGE: &str = "inferer";

/// The loaded models, and the load errors of those that failed.
#[derive(Default)]
pub struct ModelSet {
    pub loaded: HashMap<String, Arc<LoadedModel>>,
    pub failed: HashMap<String, String>,
}

impl ModelSet {
    /// Loads and warms up every model of the registry. Never fails as a whole.
    pub fn load(registry: &Registry, exec: &ExecutionConfig, metrics: &Metrics) -> Self {
        let mut set = Self::default();
        for spec in &registry.models {
            let reference = spec.reference();
            let result = session::read_model(spec, registry.base_dir.as_deref())
                .and_then(|bytes| session::load(spec, &bytes, exec))
                .and_then(|model| warm_up(&model).map(|()| model));
            match result {
                Ok(model) => {
                    metrics.provider(&spec.name, model.provider.as_str());
                    set.loaded.insert(reference, Arc::new(model));
                }
                Err(e) => {
                    metrics.model_load_failure(&spec.name);
                    tracing::error!(model = %reference, error = %e, "model failed to load; the other models keep serving");
                    set.failed.insert(reference, e.to_string());
                }
            }
        }
        set
    }
}

/// Runs the model once on a patch of its input shape, so the first job does not pay
/// for memory allocation and kernel selection (and a broken model fails at start).
fn warm_up(model: &LoadedModel) -> Result<(), session::ModelError> {
    let [d, h, w] = model.spec.patch;
    let input = ndarray::Array5::<f32>::zeros((1, 1, d, h, w));
    let started = Instant::now();
    model.run_batch(input.view())?;
    tracing::info!(model = %model.spec.reference(), provider = %model.provider, ms = started.elapsed().as_millis() as u64, "model warmed up");
    Ok(())
}

/// `summary.json`: what was found, by which model, on what, and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub schema_version: u32,
    pub study_uid: String,
    pub series_uid: String,
    pub revision: u32,
    pub correlation_id: String,
    pub model: String,
    pub model_version: String,
    pub model_sha256: String,
    /// Execution provider that really ran the model.
    pub provider: String,
    pub labels: Vec<LabelStat>,
    /// `[nx, ny, nz]` of the source series (the grid of `labels.nii.gz`).
    pub source_dims: [usize; 3],
    pub source_spacing_mm: [f64; 3],
    /// `[nx, ny, nz]` of the model input.
    pub input_dims: [usize; 3],
    pub input_spacing_mm: [f64; 3],
    pub timings_ms: Timings,
    #[serde(default)]
    pub warnings: Vec<String>,
    pub created_at_ms: u64,
}

/// Time per phase, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub fetch: u64,
    pub inference: u64,
    pub postprocess: u64,
    pub write: u64,
    pub total: u64,
}

/// The inferer's dependencies.
pub struct Inferer {
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub models: Arc<ModelSet>,
    pub metrics: Arc<Metrics>,
}

/// The durable consumer of one model's jobs.
pub fn consumer(model: &str) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(JOBS, &format!("inferer-{model}"));
    spec.filter = format!("radflow.job.{model}");
    spec.ack_wait = Duration::from_secs(120);
    spec
}

/// Serves every model of the registry until `shutdown`; sets `ready` once the models
/// are loaded and warm.
pub async fn run(
    inferer: Arc<Inferer>,
    registry: &Registry,
    config: WorkerConfig,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut names: Vec<&str> = registry.models.iter().map(|m| m.name.as_str()).collect();
    names.dedup();
    ready.store(true, Ordering::SeqCst);
    let mut tasks = tokio::task::JoinSet::new();
    for name in names {
        let mut cfg = config.clone();
        cfg.consumer = consumer(name);
        let (bus, metrics, handler) = (
            inferer.bus.clone(),
            inferer.metrics.clone(),
            inferer.clone(),
        );
        tasks.spawn(radflow_shared::worker::run(
            bus,
            handler,
            cfg,
            metrics,
            shutdown.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

impl Inferer {
    fn store_err(&self, e: StoreError) -> HandleError {
        if let StoreError::NotFound { key } = &e {
            return HandleError::permanent("volume_missing", format!("{key} is not in the store"));
        }
        self.metrics.store_error(STAGE);
        HandleError::Transient(e.into())
    }
}

#[async_trait]
impl Handler for Inferer {
    fn stage(&self) -> &'static str {
        STAGE
    }

    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandleError> {
        let started = Instant::now();
        let job: VolumeReady = events::decode(&delivery.payload)
            .map_err(|e| HandleError::permanent("bad_event", e.to_string()))?;
        let reference = job.model_ref();
        let model = match self.models.loaded.get(&reference) {
            Some(m) => m.clone(),
            None => {
                let why = self
                    .models
                    .failed
                    .get(&reference)
                    .cloned()
                    .unwrap_or_else(|| {
                        format!("model {reference} is not in this inferer's registry")
                    });
                return Err(HandleError::Transient(anyhow::anyhow!(
                    "model unavailable: {why}"
                )));
            }
        };
        if model.spec.kind != ModelKind::Segmentation {
            return Err(HandleError::permanent(
                "unsupported_model_kind",
                format!("model {reference} is a classification model; only segmentation is served"),
            ));
        }

        let t = Instant::now();
        let (volume_bytes, meta_bytes) = tokio::try_join!(
            self.store.get(&job.volume_key),
            self.store.get(&job.meta_key)
        )
        .map_err(|e| self.store_err(e))?;
        let meta: VolumeMeta = serde_json::from_slice(&meta_bytes)
            .map_err(|e| HandleError::permanent("bad_meta", format!("{}: {e}", job.meta_key)))?;
        let fetch_ms = t.elapsed().as_millis() as u64;

        let t = Instant::now();
        let m = model.clone();
        let (volume, logits) = tokio::task::spawn_blocking(move || {
            let volume = nifti::read_nifti::<f32>(&volume_bytes)
                .map_err(|e| HandleError::permanent("bad_volume", e.to_string()))?;
            let logits = sliding_window::sliding_window(
                &*m,
                volume.data.view(),
                m.spec.patch,
                m.spec.overlap,
                m.spec.batch_size,
                m.spec.padding,
            )
            .map_err(|e| HandleError::permanent("inference_failed", e.to_string()))?;
            Ok::<_, HandleError>((volume, logits))
        })
        .await
        .map_err(|e| HandleError::Transient(e.into()))??;
        let inference = t.elapsed();
        self.metrics
            .inference(&model.spec.name, inference.as_secs_f64(), 1);

        let t = Instant::now();
        let spec = model.spec.clone();
        let source = meta.source.clone();
        let (labels_nii, preview, stats) = tokio::task::spawn_blocking(move || {
            let labels = Volume {
                grid: volume.grid.clone(),
                data: sliding_window::argmax_labels(logits.view()),
            };
            let preview = outputs::preview_png(&volume, &labels, &spec);
            let on_source = resample::resample_nearest(&labels, &source);
            let stats = outputs::label_stats(&on_source, &spec);
            let nii = nifti::write_nifti_gz(&on_source, &format!("radflow {}", spec.reference()));
            (nii, preview, stats)
        })
        .await
        .map_err(|e| HandleError::Transient(e.into()))?;
        let postprocess_ms = t.elapsed().as_millis() as u64;

        let t = Instant::now();
        self.store
            .put_result(
                &job.series_uid,
                &reference,
                "labels.nii.gz",
                Bytes::from(labels_nii),
            )
            .await
            .map_err(|e| self.store_err(e))?;
        self.store
            .put_result(
                &job.series_uid,
                &reference,
                "preview.png",
                Bytes::from(preview),
            )
            .await
            .map_err(|e| self.store_err(e))?;
        let mut summary = Summary {
            schema_version: SCHEMA_VERSION,
            study_uid: job.study_uid.clone(),
            series_uid: job.series_uid.clone(),
            revision: job.revision,
            correlation_id: job.correlation_id.clone(),
            model: model.spec.name.clone(),
            model_version: model.spec.version.clone(),
            model_sha256: model.sha256.clone(),
            provider: model.provider.as_str().to_owned(),
            labels: stats.clone(),
            source_dims: meta.source.dims,
            source_spacing_mm: meta.source.spacing(),
            input_dims: meta.volume.dims,
            input_spacing_mm: meta.volume.spacing(),
            timings_ms: Timings {
                fetch: fetch_ms,
                inference: inference.as_millis() as u64,
                postprocess: postprocess_ms,
                write: 0,
                total: 0,
            },
            warnings: job.warnings.clone(),
            created_at_ms: now_ms(),
        };
        summary.timings_ms.write = t.elapsed().as_millis() as u64;
        summary.timings_ms.total = started.elapsed().as_millis() as u64;
        self.store
            .put_result(
                &job.series_uid,
                &reference,
                "summary.json",
                Bytes::from(serde_json::to_vec_pretty(&summary).expect("summary serialises")),
            )
            .await
            .map_err(|e| self.store_err(e))?;

        let event = InferenceCompleted {
            schema_version: SCHEMA_VERSION,
            correlation_id: job.correlation_id.clone(),
            study_uid: job.study_uid.clone(),
            series_uid: job.series_uid.clone(),
            revision: job.revision,
            model: model.spec.name.clone(),
            model_version: model.spec.version.clone(),
            model_sha256: model.sha256.clone(),
            provider: model.provider.as_str().to_owned(),
            result_prefix: Store::result_prefix(&job.series_uid, &reference),
            labels: stats
                .iter()
                .map(|s| LabelVolume {
                    index: s.index,
                    name: s.name.clone(),
                    voxels: s.voxels,
                    volume_ml: s.volume_ml,
                })
                .collect(),
        };
        publish_event(&*self.bus, &event).await.map_err(|e| {
            self.metrics.bus_error(STAGE);
            HandleError::Transient(e.into())
        })?;
        tracing::info!(
            series_uid = %job.series_uid,
            model = %reference,
            provider = %model.provider,
            inference_ms = summary.timings_ms.inference,
            total_ms = summary.timings_ms.total,
            "inference completed"
        );
        Ok(Outcome::Done)
    }
}
