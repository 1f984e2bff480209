//! The preprocessor stage: a ready series in, one model-ready volume per preset and
//! one inference job per routed model out.
//!
//! `handle` reads the series' instances from the store, decodes them, builds the
//! native volume (ordered along the slice normal, in HU for CT), asks the registry
//! which models want it, and for each preset resamples, normalizes and writes
//! `volumes/<series>/<preset>/volume.nii.gz` + `meta.json`. Jobs are published only
//! after the files are written; the message is acked after the jobs are published.
//! Every key and message id is a function of the series, revision and model, so a
//! redelivered message redoes the same writes and its jobs are deduplicated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use radflow_shared::bus::{Bus, ConsumerSpec, Delivery, SERIES, publish_event};
use radflow_shared::events::{self, SCHEMA_VERSION, SeriesReady, VolumeReady};
use radflow_shared::metrics::Metrics;
use radflow_shared::models::{Preset, Registry, SeriesFacts};
use radflow_shared::store::{Store, VolumeFile};
use radflow_shared::worker::{HandleError, Handler, Outcome, WorkerConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::decode::{self, DecodeError, DecodedSlice};
use crate::geometry::{self, GeometryOptions};
use crate::volume::Grid;
use crate::{convert, resample};

/// Stage name in metrics, logs and `radflow.dlq.preprocessor`.
pub const STAGE: &str = "preprocessor";

/// Files fetched from the store at once.
const FETCH_CONCURRENCY: usize = 16;

/// What `meta.json` beside each volume says: enough for the inferer to put its output
/// back on the source grid, and for a person to see what was done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub schema_version: u32,
    pub study_uid: String,
    pub series_uid: String,
    pub revision: u32,
    pub correlation_id: String,
    pub modality: String,
    pub preset: Preset,
    /// The native grid of the series (slices ordered along the normal).
    pub source: Grid,
    /// The grid of `volume.nii.gz`.
    pub volume: Grid,
    pub slices: usize,
    pub warnings: Vec<String>,
}

/// The preprocessor's dependencies.
pub struct Preprocessor {
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub geometry: GeometryOptions,
}

/// The durable consumer every preprocessor replica shares.
pub fn consumer() -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(SERIES, "preprocessor");
    spec.filter = "radflow.series.ready".into();
    spec.ack_wait = std::time::Duration::from_secs(120);
    spec
}

/// Runs the stage until `shutdown`.
pub async fn run(pre: Arc<Preprocessor>, config: WorkerConfig, shutdown: CancellationToken) {
    let (bus, metrics) = (pre.bus.clone(), pre.metrics.clone());
    radflow_shared::worker::run(bus, pre, config, metrics, shutdown).await
}

impl Preprocessor {
    fn transient(&self, e: impl Into<anyhow::Error>) -> HandleError {
        self.metrics.store_error(STAGE);
        HandleError::Transient(e.into())
    }

    /// Fetches and decodes every instance of the series; non-image objects are left
    /// out with a warning, any other decoding failure fails the series.
    async fn load_slices(
        &self,
        ev: &SeriesReady,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<DecodedSlice>, HandleError> {
        let listed = self
            .store
            .list_instances(&ev.study_uid, &ev.series_uid)
            .await
            .map_err(|e| self.transient(e))?;
        if listed.is_empty() {
            return Err(HandleError::permanent(
                "no_instances",
                format!("series {} has no instances in the store", ev.series_uid),
            ));
        }
        let store = self.store.clone();
        // Each file is decoded as soon as it arrives, so the compressed bytes of the
        // whole series are never all in memory at once.
        let results: Vec<(String, Result<DecodedSlice, DecodeError>)> =
            futures::stream::iter(listed)
                .map(|obj| {
                    let store = store.clone();
                    async move {
                        let bytes: Bytes = store.get(&obj.key).await?;
                        let decoded =
                            tokio::task::spawn_blocking(move || decode::read_slice(&bytes))
                                .await
                                .map_err(anyhow::Error::from)?;
                        Ok::<_, anyhow::Error>((obj.key, decoded))
                    }
                })
                .buffer_unordered(FETCH_CONCURRENCY)
                .try_collect()
                .await
                .map_err(|e| self.transient(e))?;
        convert::collect_slices(results, warnings)
            .map_err(|e| HandleError::permanent(e.code(), e.to_string()))
    }
}

#[async_trait]
impl Handler for Preprocessor {
    fn stage(&self) -> &'static str {
        STAGE
    }

    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandleError> {
        let ev: SeriesReady = events::decode(&delivery.payload)
            .map_err(|e| HandleError::permanent("bad_event", e.to_string()))?;
        let mut warnings = Vec::new();

        let t = Instant::now();
        let slices = self.load_slices(&ev, &mut warnings).await?;
        self.metrics
            .phase_time(STAGE, "fetch_decode", t.elapsed().as_secs_f64());

        let t = Instant::now();
        let opts = self.geometry.clone();
        let built = tokio::task::spawn_blocking(move || geometry::build_volume(slices, &opts))
            .await
            .map_err(|e| HandleError::Transient(e.into()))?
            .map_err(|e| HandleError::permanent("bad_geometry", e.to_string()))?;
        self.metrics
            .phase_time(STAGE, "build", t.elapsed().as_secs_f64());
        warnings.extend(built.report.warnings.iter().cloned());

        let facts = SeriesFacts {
            modality: &built.report.modality,
            body_part: &built.report.body_part,
            series_description: &built.report.series_description,
            called_ae: &ev.called_ae,
            slices: built.report.slices,
        };
        let models = self.registry.route(&facts);
        if models.is_empty() {
            return Ok(Outcome::Skipped(format!(
                "no model routes a {} series of {} slices",
                built.report.modality, built.report.slices
            )));
        }

        let native = Arc::new(built.volume);
        let presets: BTreeMap<&str, &Preset> = models
            .iter()
            .map(|m| (m.preset.name.as_str(), &m.preset))
            .collect();
        let mut written: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (name, preset) in presets {
            let t = Instant::now();
            let (native, preset_owned) = (native.clone(), preset.clone());
            let meta = VolumeMeta {
                schema_version: SCHEMA_VERSION,
                study_uid: ev.study_uid.clone(),
                series_uid: ev.series_uid.clone(),
                revision: ev.revision,
                correlation_id: ev.correlation_id.clone(),
                modality: built.report.modality.clone(),
                preset: preset.clone(),
                source: native.grid.clone(),
                volume: resample::grid_with_spacing(&native.grid, preset.spacing),
                slices: built.report.slices,
                warnings: warnings.clone(),
            };
            let target = meta.volume.clone();
            let nii = tokio::task::spawn_blocking(move || {
                let vol = convert::prepare(&native, &preset_owned);
                debug_assert_eq!(vol.grid, target);
                convert::encode_nifti(&vol, &format!("radflow {}", preset_owned.name), true)
            })
            .await
            .map_err(|e| HandleError::Transient(e.into()))?;
            self.metrics
                .phase_time(STAGE, "resample_normalize", t.elapsed().as_secs_f64());

            let t = Instant::now();
            let volume_key = self
                .store
                .put_volume(&ev.series_uid, name, VolumeFile::Volume, Bytes::from(nii))
                .await
                .map_err(|e| self.transient(e))?;
            let meta_key = self
                .store
                .put_volume(
                    &ev.series_uid,
                    name,
                    VolumeFile::Meta,
                    Bytes::from(serde_json::to_vec_pretty(&meta).expect("meta serialises")),
                )
                .await
                .map_err(|e| self.transient(e))?;
            self.metrics
                .phase_time(STAGE, "write", t.elapsed().as_secs_f64());
            written.insert(name.to_owned(), (volume_key, meta_key));
        }

        for model in &models {
            let (volume_key, meta_key) = written[&model.preset.name].clone();
            let job = VolumeReady {
                schema_version: SCHEMA_VERSION,
                correlation_id: ev.correlation_id.clone(),
                study_uid: ev.study_uid.clone(),
                series_uid: ev.series_uid.clone(),
                revision: ev.revision,
                model: model.name.clone(),
                model_version: model.version.clone(),
                preset: model.preset.name.clone(),
                volume_key,
                meta_key,
                warnings: warnings.clone(),
            };
            publish_event(&*self.bus, &job).await.map_err(|e| {
                self.metrics.bus_error(STAGE);
                HandleError::Transient(e.into())
            })?;
        }
        tracing::info!(
            series_uid = %ev.series_uid,
            revision = ev.revision,
            slices = built.report.slices,
            models = models.len(),
            "volume ready"
        );
        Ok(Outcome::Done)
    }
}
