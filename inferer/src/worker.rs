//! The inferer stage: an inference job in, a label map (or class scores), a summary and
//! a preview out.
//!
//! At start the registry's models are loaded (SHA-256 checked) and warmed up on a
//! batch of their input shape; `/readyz` turns true only then, and turns false again
//! while a changed registry's new models load and warm up. A model that fails to load
//! is reported (log, metric) and the others keep serving; its jobs are retried and
//! eventually dead-lettered with the load error.
//!
//! Each model name has its own durable consumer (`inferer-<model>` on
//! `radflow.job.<model>`), so GPU and CPU models can be served by different
//! deployments; consumers start and stop as the registry changes. `handle` reads the
//! volume, runs the sliding window (segmentation) or the job batcher (classification),
//! puts the labels back on the source series' grid (nearest neighbour, or the class
//! probabilities trilinearly with `invert_interpolation = "linear"`), writes
//! `labels.nii.gz`, `preview.png`, `seg.dcm`, `sr.dcm` and, last, `summary.json` (its
//! presence means "done"), publishes `InferenceCompleted` and only then acks. A job
//! whose result is already complete (same series revision and model file: a
//! redelivery after a lost ack) is answered from its `summary.json` without running
//! the model again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use radflow_shared::bus::{Bus, ConsumerSpec, Delivery, JOBS, publish_event};
use radflow_shared::events::{
    self, ClassScore, DicomObject, InferenceCompleted, LabelVolume, SCHEMA_VERSION, VolumeReady,
};
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{Interpolation, ModelKind, ModelSpec, SegmentationType};
use radflow_shared::store::{Store, StoreError};
use radflow_shared::util::now_ms;
use radflow_shared::worker::{HandleError, Handler, Outcome, WorkerConfig};
use radflow_volume::{Volume, VolumeMeta, nifti};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::classify;
use crate::dicom::{self, Finding};
use crate::outputs::{self, LabelStat};
use crate::registry::{ModelHub, RegistryWatch, ServedModel};
use crate::session::LoadedModel;
use crate::sliding_window::{self, WindowSettings};

/// Stage name in metrics, logs and `radflow.dlq.inferer`.
pub const STAGE: &str = "inferer";

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
    /// SHA-256 of the ONNX file that produced the result.
    pub model_sha256: String,
    /// A version on trial whose results are stored but not forwarded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// `segmentation` or `classification`.
    pub kind: ModelKind,
    /// Execution provider that really ran the model (`cpu`, `cuda`, `tensorrt`).
    pub provider: String,
    /// Graph nodes per ONNX Runtime provider, as profiled during the warm-up.
    #[serde(default)]
    pub provider_nodes: BTreeMap<String, usize>,
    /// Version of the ONNX Runtime library.
    #[serde(default)]
    pub onnxruntime: String,
    /// Segmentation: volume per label on the source grid.
    #[serde(default)]
    pub labels: Vec<LabelStat>,
    /// Classification: score per class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassScore>,
    /// `[nx, ny, nz]` of the source series (the grid of `labels.nii.gz`).
    pub source_dims: [usize; 3],
    pub source_spacing_mm: [f64; 3],
    /// `[nx, ny, nz]` of the model input.
    pub input_dims: [usize; 3],
    pub input_spacing_mm: [f64; 3],
    /// Sliding windows run (segmentation), or 1.
    #[serde(default)]
    pub windows: usize,
    /// `session.run` calls for this job (for classification: 1, shared with the
    /// other jobs of its batch).
    #[serde(default)]
    pub batches: usize,
    /// Items per `session.run` (windows, or jobs sharing the run).
    #[serde(default)]
    pub batch_size: usize,
    pub timings_ms: Timings,
    #[serde(default)]
    pub warnings: Vec<String>,
    pub created_at_ms: u64,
    /// AE title of the node that sent the series.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub calling_ae: String,
    /// The result as DICOM (`seg.dcm`, `sr.dcm`), beside the other files; empty when
    /// the source could not be matched (the reason is among the warnings).
    #[serde(default)]
    pub dicom: Vec<DicomObject>,
    /// Segmentation Type of `seg.dcm` (`binary`: the label map; `fractional`: 8-bit
    /// probabilities per label); absent when no SEG was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation_type: Option<SegmentationType>,
}

/// Time per phase, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Reading the volume and its metadata from the store.
    pub fetch: f64,
    /// Decompressing and parsing the volume.
    pub decode: f64,
    /// Running the model: the sliding window (gathering, `session.run`, blending and
    /// the label of each voxel) or waiting for and running the classification batch.
    pub inference: f64,
    /// Of `inference`, the time inside ONNX Runtime's `session.run`.
    #[serde(default)]
    pub session_run: f64,
    /// Preview, labels onto the source grid, label volumes and encoding
    /// `labels.nii.gz` (classification: the preview).
    pub postprocess: f64,
    /// Writing the result files.
    pub write: f64,
    pub total: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// The inferer's dependencies.
pub struct Inferer {
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub models: Arc<ModelHub>,
    pub metrics: Arc<Metrics>,
}

/// The durable consumer of one model's jobs.
pub fn consumer(model: &str) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(JOBS, &format!("inferer-{model}"));
    spec.filter = format!("radflow.job.{model}");
    spec.ack_wait = Duration::from_secs(120);
    spec
}

/// A running consumer of one model name.
struct Consumer {
    concurrency: usize,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts consumers for the model names of the current set and stops those whose name
/// left the registry (or whose concurrency changed: they restart).
fn reconcile(
    inferer: &Arc<Inferer>,
    config: &WorkerConfig,
    running: &mut BTreeMap<String, Consumer>,
    shutdown: &CancellationToken,
) {
    let wanted = inferer
        .models
        .current()
        .consumers(config.concurrency.max(1));
    let stale: Vec<String> = running
        .iter()
        .filter(|(name, c)| wanted.get(*name) != Some(&c.concurrency))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some(c) = running.remove(&name) {
            tracing::info!(model = %name, "stopping the consumer of a model that left the registry or changed");
            c.stop.cancel();
        }
    }
    for (name, concurrency) in wanted {
        if running.contains_key(&name) {
            continue;
        }
        // The model's consumer with the limits configured for this process, served
        // stat first, then routine, then batch (archive scoring).
        let mut cfg = config.clone();
        cfg.consumer = consumer(&name);
        cfg.consumer.ack_wait = config.consumer.ack_wait;
        cfg.consumer.max_deliver = config.consumer.max_deliver;
        cfg.consumer.max_ack_pending = config.consumer.max_ack_pending.max(concurrency);
        cfg.concurrency = concurrency;
        let cfg = cfg.with_lanes();
        let stop = shutdown.child_token();
        let task = tokio::spawn(radflow_shared::worker::run(
            inferer.bus.clone(),
            inferer.clone(),
            cfg,
            inferer.metrics.clone(),
            stop.clone(),
        ));
        running.insert(
            name,
            Consumer {
                concurrency,
                stop,
                task,
            },
        );
    }
}

/// Serves the models of `inferer` until `shutdown`; sets `ready` (the models are loaded
/// and warm when this is called). With a `watch`, the registry file is re-read every
/// `watch.interval` and a change is applied without a restart: `ready` is false while
/// new models load and warm up, consumers follow the new set of model names.
pub async fn run(
    inferer: Arc<Inferer>,
    config: WorkerConfig,
    watch: Option<RegistryWatch>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut running = BTreeMap::new();
    reconcile(&inferer, &config, &mut running, &shutdown);
    ready.store(true, Ordering::SeqCst);

    if let Some(mut watch) = watch {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(watch.interval) => {}
            }
            let current = inferer.models.current().registry.clone();
            let (returned, change) = match tokio::task::spawn_blocking(move || {
                let change = watch.poll(&current);
                (watch, change)
            })
            .await
            {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "the registry watch failed; no further reloads");
                    break;
                }
            };
            watch = returned;
            match change {
                None => {}
                Some(Err(e)) => {
                    inferer.metrics.registry_reload("invalid");
                    tracing::error!(error = %e, "the changed model registry cannot be used; the models loaded keep serving");
                }
                Some(Ok(registry)) => {
                    ready.store(false, Ordering::SeqCst);
                    let hub = inferer.models.clone();
                    let report = tokio::task::spawn_blocking(move || hub.reload(registry)).await;
                    ready.store(true, Ordering::SeqCst);
                    match report {
                        Ok(report) => {
                            inferer.metrics.registry_reload("applied");
                            tracing::info!(
                                kept = ?report.kept,
                                loaded = ?report.loaded,
                                removed = ?report.removed,
                                failed = ?report.failed.iter().map(|(m, _)| m).collect::<Vec<_>>(),
                                "model registry reloaded"
                            );
                        }
                        Err(e) => tracing::error!(error = %e, "the registry reload failed"),
                    }
                    reconcile(&inferer, &config, &mut running, &shutdown);
                }
            }
        }
    } else {
        shutdown.cancelled().await;
    }
    for (_, c) in running {
        c.stop.cancel();
        let _ = c.task.await;
    }
}

impl Inferer {
    fn store_err(&self, e: StoreError) -> HandleError {
        if let StoreError::NotFound { key } = &e {
            return HandleError::permanent("volume_missing", format!("{key} is not in the store"));
        }
        self.metrics.store_error(STAGE);
        HandleError::Transient(e.into())
    }

    async fn put(
        &self,
        job: &VolumeReady,
        reference: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), HandleError> {
        self.store
            .put_result(&job.series_uid, reference, name, Bytes::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.store_err(e))
    }

    /// Stores the DICOM objects of a result and lists them in its summary, or records
    /// in the summary why there are none.
    async fn put_dicom(
        &self,
        job: &VolumeReady,
        reference: &str,
        objects: Result<Vec<dicom::Written>, String>,
        summary: &mut Summary,
    ) -> Result<(), HandleError> {
        match objects {
            Ok(objects) => {
                for written in objects {
                    self.put(job, reference, &written.object.file, written.bytes)
                        .await?;
                    summary.dicom.push(written.object);
                }
            }
            Err(why) => {
                tracing::warn!(series_uid = %job.series_uid, model = %reference, reason = %why, "no DICOM SEG or SR for this result");
                summary.warnings.push(format!("no DICOM SEG or SR: {why}"));
            }
        }
        Ok(())
    }

    /// The summary of a result that is already complete for this job (a redelivery
    /// after the outputs were written), if any.
    async fn finished(&self, job: &VolumeReady, model: &LoadedModel) -> Option<Summary> {
        let key = Store::result_key(&job.series_uid, &model.spec.reference(), "summary.json");
        let bytes = self.store.get(&key).await.ok()?;
        let summary: Summary = serde_json::from_slice(&bytes).ok()?;
        (summary.revision == job.revision
            && summary.model_sha256 == model.sha256
            && summary.shadow == job.shadow)
            .then_some(summary)
    }

    async fn publish(&self, summary: &Summary) -> Result<(), HandleError> {
        let reference = format!("{}@{}", summary.model, summary.model_version);
        let event = InferenceCompleted {
            schema_version: SCHEMA_VERSION,
            correlation_id: summary.correlation_id.clone(),
            study_uid: summary.study_uid.clone(),
            series_uid: summary.series_uid.clone(),
            revision: summary.revision,
            model: summary.model.clone(),
            model_version: summary.model_version.clone(),
            model_sha256: summary.model_sha256.clone(),
            provider: summary.provider.clone(),
            result_prefix: Store::result_prefix(&summary.series_uid, &reference),
            labels: summary
                .labels
                .iter()
                .map(|s| LabelVolume {
                    index: s.index,
                    name: s.name.clone(),
                    voxels: s.voxels,
                    volume_ml: s.volume_ml,
                })
                .collect(),
            classes: summary.classes.clone(),
            shadow: summary.shadow,
            calling_ae: summary.calling_ae.clone(),
            dicom: summary.dicom.clone(),
        };
        publish_event(&*self.bus, &event).await.map_err(|e| {
            self.metrics.bus_error(STAGE);
            HandleError::Transient(e.into())
        })
    }
}

/// The summary fields every result shares.
fn summary_for(job: &VolumeReady, meta: &VolumeMeta, model: &LoadedModel) -> Summary {
    Summary {
        schema_version: SCHEMA_VERSION,
        study_uid: job.study_uid.clone(),
        series_uid: job.series_uid.clone(),
        revision: job.revision,
        correlation_id: job.correlation_id.clone(),
        model: model.spec.name.clone(),
        model_version: model.spec.version.clone(),
        model_sha256: model.sha256.clone(),
        shadow: job.shadow,
        kind: model.spec.kind,
        provider: model.provider.as_str().to_owned(),
        provider_nodes: model.placement.clone(),
        onnxruntime: crate::runtime::info()
            .map(|i| i.version)
            .unwrap_or_default(),
        labels: Vec::new(),
        classes: Vec::new(),
        source_dims: meta.source.dims,
        source_spacing_mm: meta.source.spacing(),
        input_dims: meta.volume.dims,
        input_spacing_mm: meta.volume.spacing(),
        windows: 1,
        batches: 1,
        batch_size: 1,
        timings_ms: Timings::default(),
        warnings: job.warnings.clone(),
        created_at_ms: now_ms(),
        calling_ae: job.calling_ae.clone(),
        dicom: Vec::new(),
        segmentation_type: None,
    }
}

/// What the blocking part of a segmentation job produced.
struct Segmented {
    labels_nii: Vec<u8>,
    preview: Vec<u8>,
    stats: Vec<LabelStat>,
    /// `seg.dcm` and `sr.dcm`, or why they could not be written.
    dicom: Result<Vec<dicom::Written>, String>,
    /// The Segmentation Type of `seg.dcm`, when it was written.
    seg_type: Option<SegmentationType>,
    windows: sliding_window::WindowStats,
    decode: Duration,
    inference: Duration,
    postprocess: Duration,
}

/// Decodes the volume, runs the sliding window and turns the logits into outputs.
///
/// With the defaults (`invert_interpolation = "nearest"`, a binary SEG) the argmax is
/// fused into the blending and the label map is moved onto the source grid by nearest
/// neighbour. When probabilities are needed (linear inversion, a fractional SEG) the
/// blended scores are kept, turned into probabilities by the model's `activation` and
/// interpolated onto the source grid plane by plane ([`outputs::probabilities_on_grid`]):
/// the labels there are their argmax (linear) and the SEG gets each segment's
/// probability as 8 bits (fractional), `segments × source voxels` bytes.
fn segment(
    model: &LoadedModel,
    volume_bytes: &[u8],
    meta: &VolumeMeta,
    sources: Vec<radflow_results::SourceInstance>,
    created_at_ms: u64,
) -> Result<Segmented, HandleError> {
    let spec = &model.spec;
    let t = Instant::now();
    let volume = radflow_volume::gunzip::read_volume::<f32>(volume_bytes)
        .map_err(|e| HandleError::permanent("bad_volume", e.to_string()))?;
    let decode = t.elapsed();

    let t = Instant::now();
    let settings = WindowSettings::of(spec);
    let linear = spec.invert_interpolation == Interpolation::Linear;
    let fractional = spec.segmentation_type == SegmentationType::Fractional;
    let failed =
        |e: crate::session::ModelError| HandleError::permanent("inference_failed", e.to_string());
    let (labels, scores, windows) = if linear || fractional {
        let (logits, windows) =
            sliding_window::run_windows(model, volume.data.view(), &settings).map_err(failed)?;
        let labels = sliding_window::argmax_labels(logits.view());
        (labels, Some(logits), windows)
    } else {
        let (labels, windows) =
            sliding_window::run_windows_labels(model, volume.data.view(), &settings)
                .map_err(failed)?;
        (labels, None, windows)
    };
    let inference = t.elapsed();

    let t = Instant::now();
    let labels = Volume {
        grid: volume.grid.clone(),
        data: labels,
    };
    let preview = outputs::preview_png(&volume, &labels, spec);
    let mut fractions = None;
    let mut fraction_error = None;
    let (on_source, counts) = match scores {
        None => outputs::labels_on_grid(&labels, &meta.source),
        Some(mut scores) => {
            outputs::activate(&mut scores, spec.activation);
            let channels = if fractional {
                match fraction_channels(spec, &scores) {
                    Ok(channels) => channels,
                    Err(why) => {
                        fraction_error = Some(why);
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let moved = outputs::probabilities_on_grid(
                scores.view(),
                &volume.grid,
                &meta.source,
                linear,
                &channels,
            );
            drop(scores);
            fractions = moved.fractions;
            match moved.labels {
                Some(labels) => labels,
                None => outputs::labels_on_grid(&labels, &meta.source),
            }
        }
    };
    let stats = outputs::stats_from_counts(&counts, &on_source.grid, spec);
    let labels_nii = nifti::write_nifti_gz(&on_source, &format!("radflow {}", spec.reference()));
    let dicom = match fraction_error {
        Some(why) => Err(format!("no fractional SEG: {why}")),
        None => dicom::write_objects(
            spec,
            &meta.series_uid,
            meta.revision,
            sources,
            &meta.source,
            Finding::Labels {
                on_source: &on_source,
                stats: &stats,
                fractions: fractions.as_ref().map(|f| f.view()),
            },
            created_at_ms,
        ),
    };
    let seg_type = dicom.is_ok().then_some(spec.segmentation_type);
    Ok(Segmented {
        labels_nii,
        preview,
        stats,
        dicom,
        seg_type,
        windows,
        decode,
        inference,
        postprocess: t.elapsed(),
    })
}

/// The output channels of the segments of a fractional SEG, in segment order (label
/// `l` is channel `l`), once the probabilities are known to be numbers.
fn fraction_channels(
    spec: &ModelSpec,
    probabilities: &ndarray::Array4<f32>,
) -> Result<Vec<usize>, String> {
    let channels = probabilities.dim().0;
    let labels: Vec<usize> = radflow_results::SegmentDescription::from_model(spec)
        .iter()
        .map(|s| usize::from(s.label))
        .collect();
    if let Some(l) = labels.iter().find(|&&l| l >= channels) {
        return Err(format!(
            "label {l} has no output channel (the model gives {channels})"
        ));
    }
    if probabilities.iter().any(|p| !p.is_finite()) {
        return Err("the model's probabilities are not all finite numbers".into());
    }
    Ok(labels)
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
        let served: Arc<ServedModel> =
            self.models.current().serve(&job).map_err(|why| {
                HandleError::Transient(anyhow::anyhow!("model unavailable: {why}"))
            })?;
        let model = served.model.clone();
        let reference = model.spec.reference();

        if let Some(done) = self.finished(&job, &model).await {
            tracing::info!(series_uid = %job.series_uid, model = %reference, "result already complete; publishing it again");
            self.publish(&done).await?;
            return Ok(Outcome::Done);
        }

        let t = Instant::now();
        let (volume_bytes, meta_bytes, sources) = tokio::try_join!(
            self.store.get(&job.volume_key),
            self.store.get(&job.meta_key),
            dicom::source_headers(&self.store, &job.study_uid, &job.series_uid),
        )
        .map_err(|e| self.store_err(e))?;
        let meta: VolumeMeta = serde_json::from_slice(&meta_bytes)
            .map_err(|e| HandleError::permanent("bad_meta", format!("{}: {e}", job.meta_key)))?;
        let fetch = t.elapsed();
        let mut summary = summary_for(&job, &meta, &model);

        let write_started;
        match model.spec.kind {
            ModelKind::Segmentation => {
                let (m, meta2, at) = (model.clone(), meta.clone(), summary.created_at_ms);
                let out = tokio::task::spawn_blocking(move || {
                    segment(&m, &volume_bytes, &meta2, sources, at)
                })
                .await
                .map_err(|e| HandleError::Transient(e.into()))??;
                for &(n, run) in &out.windows.batches {
                    self.metrics
                        .inference(&model.spec.name, run.as_secs_f64(), n);
                }
                summary.labels = out.stats;
                summary.windows = out.windows.windows;
                summary.batches = out.windows.batches.len();
                summary.batch_size = model.spec.batch_size;
                summary.timings_ms.decode = ms(out.decode);
                summary.timings_ms.inference = ms(out.inference);
                summary.timings_ms.session_run = ms(out.windows.run_time());
                summary.timings_ms.postprocess = ms(out.postprocess);
                write_started = Instant::now();
                self.put(&job, &reference, "labels.nii.gz", out.labels_nii)
                    .await?;
                self.put(&job, &reference, "preview.png", out.preview)
                    .await?;
                self.put_dicom(&job, &reference, out.dicom, &mut summary)
                    .await?;
                summary.segmentation_type = out.seg_type;
            }
            ModelKind::Classification => {
                let t = Instant::now();
                let spec = model.spec.clone();
                let (volume, input) = tokio::task::spawn_blocking(move || {
                    let volume = radflow_volume::gunzip::read_volume::<f32>(&volume_bytes)
                        .map_err(|e| HandleError::permanent("bad_volume", e.to_string()))?;
                    let input =
                        classify::fit_to_patch(volume.data.view(), spec.patch, spec.padding);
                    Ok::<_, HandleError>((volume, input))
                })
                .await
                .map_err(|e| HandleError::Transient(e.into()))??;
                summary.timings_ms.decode = ms(t.elapsed());

                let t = Instant::now();
                let scored = served
                    .batcher(&self.metrics)
                    .classify(input)
                    .await
                    .map_err(|e| HandleError::permanent("inference_failed", e.to_string()))?;
                summary.timings_ms.inference = ms(t.elapsed());
                summary.timings_ms.session_run = ms(scored.run_time);
                summary.batch_size = scored.batch;

                let t = Instant::now();
                summary.classes = classify::class_scores(&scored.scores, &model.spec)
                    .map_err(|e| HandleError::permanent("inference_failed", e.to_string()))?;
                let spec = model.spec.clone();
                let (classes, at) = (summary.classes.clone(), summary.created_at_ms);
                let (series_uid, revision) = (job.series_uid.clone(), job.revision);
                let source_grid = meta.source.clone();
                let (preview, objects) = tokio::task::spawn_blocking(move || {
                    let none = Volume {
                        grid: volume.grid.clone(),
                        data: ndarray::Array3::<u8>::zeros(volume.data.dim()),
                    };
                    let objects = dicom::write_objects(
                        &spec,
                        &series_uid,
                        revision,
                        sources,
                        &source_grid,
                        Finding::Classes(&classes),
                        at,
                    );
                    (outputs::preview_png(&volume, &none, &spec), objects)
                })
                .await
                .map_err(|e| HandleError::Transient(e.into()))?;
                summary.timings_ms.postprocess = ms(t.elapsed());
                write_started = Instant::now();
                self.put(&job, &reference, "preview.png", preview).await?;
                self.put_dicom(&job, &reference, objects, &mut summary)
                    .await?;
            }
        }
        summary.timings_ms.fetch = ms(fetch);
        summary.created_at_ms = now_ms();
        summary.timings_ms.write = ms(write_started.elapsed());
        summary.timings_ms.total = ms(started.elapsed());
        self.put(
            &job,
            &reference,
            "summary.json",
            serde_json::to_vec_pretty(&summary).expect("summary serialises"),
        )
        .await?;
        summary.timings_ms.write = ms(write_started.elapsed());

        let t = &summary.timings_ms;
        for (phase, value) in [
            ("fetch", t.fetch),
            ("decode", t.decode),
            ("inference", t.inference),
            ("session_run", t.session_run),
            ("postprocess", t.postprocess),
            ("write", t.write),
        ] {
            self.metrics.phase_time(STAGE, phase, value / 1000.0);
        }
        self.publish(&summary).await?;
        tracing::info!(
            series_uid = %job.series_uid,
            model = %reference,
            provider = %model.provider,
            windows = summary.windows,
            inference_ms = summary.timings_ms.inference,
            session_run_ms = summary.timings_ms.session_run,
            total_ms = summary.timings_ms.total,
            "inference completed"
        );
        Ok(Outcome::Done)
    }
}
