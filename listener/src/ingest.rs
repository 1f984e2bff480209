//! What happens to a received instance before the sender hears Success.
//!
//! The SCP hands each validated instance to [`Ingest::store`], which writes the file to
//! the store and publishes `InstanceStored`; only when both are durable does it return
//! `Ok`, and the SCP answers Success. A store or bus failure becomes an Out of
//! Resources status (0xA700) so the sender retries: nothing acknowledged is lost, and a
//! retry overwrites the same key and is deduplicated by message id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use radflow_shared::bus::{Bus, Kv, SERIES_STATE_BUCKET, publish_event};
use radflow_shared::events::{CountHints, InstanceStored, SCHEMA_VERSION};
use radflow_shared::metrics::Metrics;
use radflow_shared::store::Store;
use radflow_shared::util::now_ms;

use crate::assembly;
use crate::association::Rejection;
use crate::scp::{AssociationHooks, InstanceSink, ReceivedInstance, StoreFailure};

/// Longest a single store write or bus publish may take before the instance is
/// refused (the sender's own timeout is usually a minute or more).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Stores instances and announces them.
pub struct Ingest {
    store: Store,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(store: Store, bus: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            bus,
            metrics,
        }
    }
}

#[async_trait]
impl InstanceSink for Ingest {
    async fn store(&self, instance: ReceivedInstance) -> Result<(), StoreFailure> {
        let started = Instant::now();
        let facts = &instance.facts;
        let size = instance.file.len() as u64;
        let put = self.store.put_instance(
            &facts.study_uid,
            &facts.series_uid,
            &facts.sop_instance_uid,
            instance.file.clone(),
        );
        let key = match tokio::time::timeout(OPERATION_TIMEOUT, put).await {
            Ok(Ok(key)) => key,
            Ok(Err(e)) => {
                self.metrics.store_error("listener");
                tracing::warn!(error = %e, series_uid = %facts.series_uid, "store write failed; refusing the instance");
                return Err(StoreFailure::OutOfResources(if e.is_transient() {
                    "storage unavailable, retry later".into()
                } else {
                    "storage error".into()
                }));
            }
            Err(_) => {
                self.metrics.store_error("listener");
                tracing::warn!(series_uid = %facts.series_uid, "store write timed out; refusing the instance");
                return Err(StoreFailure::OutOfResources(
                    "storage too slow, retry later".into(),
                ));
            }
        };
        let event = InstanceStored {
            schema_version: SCHEMA_VERSION,
            study_uid: facts.study_uid.clone(),
            series_uid: facts.series_uid.clone(),
            sop_instance_uid: facts.sop_instance_uid.clone(),
            sop_class_uid: facts.sop_class_uid.clone(),
            transfer_syntax: instance.transfer_syntax.clone(),
            modality: facts.modality.clone().unwrap_or_default(),
            key,
            size_bytes: size,
            calling_ae: instance.calling_ae.clone(),
            called_ae: instance.called_ae.clone(),
            received_at_ms: now_ms(),
            hints: CountHints {
                images_in_acquisition: facts.images_in_acquisition,
                series_related_instances: facts.number_of_series_related_instances,
                number_of_frames: facts.number_of_frames,
            },
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, publish_event(&*self.bus, &event)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.metrics.bus_error("listener");
                tracing::warn!(error = %e, series_uid = %facts.series_uid, "bus publish failed; refusing the instance");
                return Err(StoreFailure::OutOfResources(
                    "event bus unavailable, retry later".into(),
                ));
            }
            Err(_) => {
                self.metrics.bus_error("listener");
                tracing::warn!(series_uid = %facts.series_uid, "bus publish timed out; refusing the instance");
                return Err(StoreFailure::OutOfResources(
                    "event bus too slow, retry later".into(),
                ));
            }
        }
        self.metrics.instances_stored.inc();
        self.metrics.instance_bytes.inc_by(size);
        self.metrics
            .cstore_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Association-level hooks: admission (back-pressure) and release hints for assembly.
pub struct Hooks {
    kv: Arc<dyn Kv>,
    metrics: Arc<Metrics>,
}

impl Hooks {
    pub async fn new(
        bus: &dyn Bus,
        metrics: Arc<Metrics>,
    ) -> Result<Self, radflow_shared::bus::BusError> {
        Ok(Self {
            kv: bus.kv(SERIES_STATE_BUCKET).await?,
            metrics,
        })
    }
}

impl AssociationHooks for Hooks {
    fn admit(&self) -> Result<(), Rejection> {
        Ok(())
    }

    fn released(&self, _calling_ae: &str, _called_ae: &str, study_series: &[(String, String)]) {
        if study_series.is_empty() {
            return;
        }
        let kv = self.kv.clone();
        let metrics = self.metrics.clone();
        let series: Vec<String> = study_series.iter().map(|(_, s)| s.clone()).collect();
        tokio::spawn(async move {
            // The instance events may still be on their way to the assembler; give
            // them a moment so the hint finds the series' state.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Err(e) = assembly::mark_released(&*kv, &series).await {
                metrics.bus_error("listener");
                tracing::debug!(error = %e, "release hint not recorded; the quiet period applies");
            }
        });
    }
}
