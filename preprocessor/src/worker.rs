//! The preprocessor stage: a ready series in, one model-ready volume per preset and
//! one inference job per routed model out.
//!
//! `handle` fetches the series' instances from the store and reads their headers,
//! chooses the images of the volume and plans its grid ([`convert::plan_series`]),
//! decodes them straight into the native volume (ordered along the slice normal, in HU
//! for CT), asks the registry which models want it, and for each preset prepares the
//! model input ([`preset`]) and writes `volumes/<series>/<preset>/volume.nii.gz` +
//! `meta.json`. Jobs are published only after the files are written; the message is
//! acked after the jobs are published. Every key and message id is a function of the
//! series, revision and model, so a redelivered message redoes the same writes and its
//! jobs are deduplicated.
//!
//! A series that is not a volume (reports, scouts, too few slices) is acked as
//! skipped, with the reason logged; a series that should be a volume but cannot be
//! (undecodable, truncated, missing positions, ambiguous stacks) is dead-lettered with
//! the code of [`ConvertError::code`]; a missing slice only marks the volume
//! *suspect incomplete*, in `meta.json` and in each job.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
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
use radflow_volume::VolumeMeta;
use tokio_util::sync::CancellationToken;

use crate::convert::{self, ConvertError, SeriesPlan};
use crate::decode::{self, DecodeError, InstanceHeader};
use crate::geometry::GeometryOptions;
use crate::preset;

/// Stage name in metrics, logs and `radflow.dlq.preprocessor`.
pub const STAGE: &str = "preprocessor";

/// Files fetched from the store at once.
const FETCH_CONCURRENCY: usize = 16;

/// The preprocessor's dependencies.
pub struct Preprocessor {
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub geometry: GeometryOptions,
    /// gzip level of the prepared `volume.nii.gz` (0 = stored blocks); see
    /// [`volume_gzip_level`].
    pub volume_gzip_level: u32,
}

/// The gzip level for prepared volumes when none is configured: on a folder or memory
/// store, 0 (stored blocks: a 300-slice CT is about 1.6× larger, but writing it is a
/// copy and reading it in the inferer takes a fifth of the time, where decompressing
/// would cost more than the bytes saved); on an object store, whose bytes cross a
/// network, [`radflow_volume::nifti::GZIP_LEVEL`].
pub fn volume_gzip_level(store: &Store, configured: Option<u32>) -> u32 {
    configured.unwrap_or(if store.is_remote() {
        radflow_volume::nifti::GZIP_LEVEL
    } else {
        0
    })
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

/// A series' files as fetched: store key, bytes and header.
type Fetched = Vec<(String, Bytes, Result<InstanceHeader, DecodeError>)>;

impl Preprocessor {
    fn transient(&self, e: impl Into<anyhow::Error>) -> HandleError {
        self.metrics.store_error(STAGE);
        HandleError::Transient(e.into())
    }

    /// Fetches every instance of the series and reads its header as it arrives; the
    /// pixels are decoded later, straight into the volume.
    async fn fetch(&self, ev: &SeriesReady) -> Result<Fetched, HandleError> {
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
        let mut fetched: Fetched = futures::stream::iter(listed)
            .map(|obj| {
                let store = store.clone();
                async move {
                    let bytes: Bytes = store.get(&obj.key).await?;
                    let (bytes, header) = tokio::task::spawn_blocking(move || {
                        let header = decode::read_header(&bytes);
                        (bytes, header)
                    })
                    .await
                    .map_err(anyhow::Error::from)?;
                    Ok::<_, anyhow::Error>((obj.key, bytes, header))
                }
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await
            .map_err(|e| self.transient(e))?;
        fetched.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(fetched)
    }
}

/// How a conversion failure settles the message: skipped when the series is simply
/// not a volume, retried when a file could not be read, dead-lettered otherwise.
fn settle(e: ConvertError) -> Result<Outcome, HandleError> {
    if e.is_not_a_volume() {
        Ok(Outcome::Skipped(format!("{e} ({})", e.code())))
    } else if e.is_transient() {
        Err(HandleError::Transient(anyhow::Error::new(e)))
    } else {
        Err(HandleError::permanent(e.code(), e.to_string()))
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

        let t = Instant::now();
        let fetched = self.fetch(&ev).await?;
        self.metrics
            .phase_time(STAGE, "fetch", t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut names = Vec::with_capacity(fetched.len());
        let mut headers = Vec::with_capacity(fetched.len());
        let mut files = Vec::with_capacity(fetched.len());
        for (name, bytes, header) in fetched {
            names.push(name);
            headers.push(header);
            files.push(Mutex::new(Some(bytes)));
        }
        let plan: SeriesPlan = match convert::plan_series(names, headers, &self.geometry) {
            Ok(plan) => plan,
            Err(e) => return settle(e),
        };
        let built = tokio::task::spawn_blocking(move || {
            convert::assemble(plan, |f| {
                Ok(files[f]
                    .lock()
                    .expect("not poisoned")
                    .take()
                    .expect("each file is loaded once"))
            })
        })
        .await
        .map_err(|e| HandleError::Transient(e.into()))?;
        let built = match built {
            Ok(built) => built,
            Err(e) => return settle(e),
        };
        self.metrics
            .phase_time(STAGE, "decode_build", t.elapsed().as_secs_f64());
        let warnings = built.report.warnings.clone();
        let suspect_incomplete = built.report.suspect_incomplete.clone();

        let facts = SeriesFacts {
            modality: &built.report.modality,
            body_part: &built.report.body_part,
            series_description: &built.report.series_description,
            called_ae: &ev.called_ae,
            slices: built.report.slices,
        };
        // A request for named models (`radflow score`) bypasses the routing rules.
        let models = if ev.models.is_empty() {
            self.registry.route(&facts)
        } else {
            let mut named = Vec::with_capacity(ev.models.len());
            for reference in &ev.models {
                match self.registry.find(reference) {
                    Some(model) => named.push(model),
                    None => {
                        return Err(HandleError::permanent(
                            "unknown_model",
                            format!("no model {reference:?} in this preprocessor's registry"),
                        ));
                    }
                }
            }
            named
        };
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
            let level = self.volume_gzip_level;
            let meta = VolumeMeta {
                schema_version: SCHEMA_VERSION,
                study_uid: ev.study_uid.clone(),
                series_uid: ev.series_uid.clone(),
                revision: ev.revision,
                correlation_id: ev.correlation_id.clone(),
                modality: built.report.modality.clone(),
                preset: preset.clone(),
                source: native.grid.clone(),
                volume: preset::input_grid(&native.grid, preset),
                slices: built.report.slices,
                warnings: warnings.clone(),
                suspect_incomplete: suspect_incomplete.clone(),
            };
            let target = meta.volume.clone();
            let nii = tokio::task::spawn_blocking(move || {
                let vol = convert::prepare(&native, &preset_owned);
                debug_assert_eq!(vol.grid, target);
                convert::encode_nifti(&vol, &format!("radflow {}", preset_owned.name), Some(level))
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
                suspect_incomplete: suspect_incomplete.clone(),
                lane: ev.lane,
                shadow: model.shadow,
                calling_ae: ev.calling_ae.clone(),
            };
            publish_event(&*self.bus, &job).await.map_err(|e| {
                self.metrics.bus_error(STAGE);
                HandleError::Transient(e.into())
            })?;
        }
        tracing::info!(
            series_uid = %ev.series_uid,
            revision = ev.revision,
            lane = %ev.lane,
            slices = built.report.slices,
            models = models.len(),
            suspect_incomplete = suspect_incomplete.is_some(),
            "volume ready"
        );
        Ok(Outcome::Done)
    }
}
