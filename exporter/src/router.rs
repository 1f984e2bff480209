//! Results in, export jobs out: the routing half of the stage.
//!
//! The durable consumer `export-router` reads `radflow.result.<model>` (never the
//! `.shadow` results of versions on trial) and publishes one `ExportRequested` per
//! destination its routes name, on `radflow.export.<destination>`. Job ids are
//! content ids, so a result routed twice (a redelivery) queues each export once.
//! The consumer starts with the results published after it was first created: adding
//! an exporter to a running system does not send a month of history.

use std::sync::Arc;

use async_trait::async_trait;
use radflow_shared::bus::{Bus, ConsumerSpec, Delivery, RESULTS, publish_event};
use radflow_shared::events::{self, ExportRequested, InferenceCompleted, SCHEMA_VERSION};
use radflow_shared::metrics::Metrics;
use radflow_shared::worker::{HandleError, Handler, Outcome};

use crate::destinations::{Destinations, Target};

/// Stage name of the router in metrics, logs and `radflow.dlq.export-router`.
pub const STAGE: &str = "export-router";

/// The router's durable consumer: every model's results, not the shadows'.
pub fn consumer() -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(RESULTS, STAGE);
    spec.filter = "radflow.result.*".into();
    spec.deliver_new = true;
    spec
}

/// Routes results to destinations.
pub struct Router {
    pub bus: Arc<dyn Bus>,
    pub destinations: Arc<Destinations>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl Handler for Router {
    fn stage(&self) -> &'static str {
        STAGE
    }

    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandleError> {
        let result: InferenceCompleted = events::decode(&delivery.payload)
            .map_err(|e| HandleError::permanent("bad_event", e.to_string()))?;
        if result.shadow {
            return Ok(Outcome::Skipped("a shadow result is never exported".into()));
        }
        let targets = self.destinations.targets(&result.model, &result.calling_ae);
        if targets.is_empty() {
            return Ok(Outcome::Skipped(format!(
                "no route for model {}",
                result.model
            )));
        }
        if result.dicom.is_empty() {
            return Err(HandleError::permanent(
                "no_dicom",
                format!(
                    "result {} of series {} is routed for export but has no DICOM objects (see the warnings of its summary.json)",
                    result.model, result.series_uid
                ),
            ));
        }
        let mut queued = 0;
        for target in targets {
            let destination = match target {
                Target::Destination(d) => d,
                Target::UnknownCaller(ae) => {
                    self.metrics
                        .export(crate::destinations::CALLER, "unroutable");
                    tracing::warn!(
                        series_uid = %result.series_uid,
                        calling_ae = %ae,
                        "routed back to the caller, but no destination has its AE title"
                    );
                    continue;
                }
            };
            let job = ExportRequested {
                schema_version: SCHEMA_VERSION,
                correlation_id: result.correlation_id.clone(),
                study_uid: result.study_uid.clone(),
                series_uid: result.series_uid.clone(),
                revision: result.revision,
                model: result.model.clone(),
                model_version: result.model_version.clone(),
                destination: destination.name.clone(),
                result_prefix: result.result_prefix.clone(),
                objects: result.dicom.clone(),
            };
            publish_event(&*self.bus, &job).await.map_err(|e| {
                self.metrics.bus_error(STAGE);
                HandleError::Transient(e.into())
            })?;
            queued += 1;
        }
        tracing::info!(series_uid = %result.series_uid, model = %result.model, destinations = queued, "export queued");
        Ok(Outcome::Done)
    }
}
