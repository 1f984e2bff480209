//! Export jobs in, C-STORE out: the sending half of the stage.
//!
//! The durable consumer `exporter` takes `radflow.export.<destination>` jobs, reads
//! the result's objects from the store and sends them over one association (the SEG
//! before the SR that references it), each in the transfer syntax it was written in;
//! the association stays open for the next job to the same destination
//! ([`crate::associations`]).
//! A destination that cannot be reached, or that answers "out of resources", is
//! retried with the shared backoff; after the configured deliveries the job is
//! dead-lettered on `radflow.dlq.exporter` with the reason. A destination that
//! refuses an object for good (a status other than out of resources) dead-letters
//! it at once: retrying would not change the answer.
//!
//! The objects' UIDs are derived from the result, so an object sent twice (a retry
//! after a lost response) replaces itself at the destination instead of doubling. A
//! destination with `[destination.deidentify]` gets each object de-identified first
//! ([`crate::deidentify`]); the keyed UIDs keep that property.

use std::sync::Arc;

use async_trait::async_trait;
use radflow_listener::scu::{Part10, ScuError};
use radflow_shared::bus::{Bus, ConsumerSpec, Delivery, EXPORTS};
use radflow_shared::events::{self, ExportRequested};
use radflow_shared::export_state::{self, Attempt};
use radflow_shared::metrics::Metrics;
use radflow_shared::store::{Store, StoreError};
use radflow_shared::worker::{HandleError, Handler, Outcome};

use crate::associations::Pool;
use crate::deidentify::{Key, deidentify_part10};
use crate::destinations::Destinations;

/// Stage name of the sender in metrics, logs and `radflow.dlq.exporter`.
pub const STAGE: &str = "exporter";

/// The sender's durable consumer: every destination's jobs.
pub fn consumer() -> ConsumerSpec {
    ConsumerSpec::new(EXPORTS, STAGE)
}

/// Sends export jobs.
pub struct Sender {
    pub store: Store,
    /// Where each destination's state is kept for `radflow status`.
    pub bus: Arc<dyn Bus>,
    /// Associations kept open between jobs.
    pub associations: Arc<Pool>,
    pub destinations: Arc<Destinations>,
    pub metrics: Arc<Metrics>,
}

/// Whether a C-STORE failure status may pass (PS3.4 Annex B: A7xx "Refused: out of
/// resources").
fn retryable(status: u16) -> bool {
    status & 0xff00 == 0xa700
}

#[async_trait]
impl Handler for Sender {
    fn stage(&self) -> &'static str {
        STAGE
    }

    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandleError> {
        let job: ExportRequested = events::decode(&delivery.payload)
            .map_err(|e| HandleError::permanent("bad_event", e.to_string()))?;
        let Some(destination) = self.destinations.get(&job.destination) else {
            return Err(HandleError::permanent(
                "unknown_destination",
                format!(
                    "destination {:?} is not in the destinations file",
                    job.destination
                ),
            ));
        };
        let result = self.send(&job, destination).await;
        let why = match &result {
            Ok(_) => None,
            Err(HandleError::Transient(e)) => Some(format!("{e:#}")),
            Err(HandleError::Permanent { reason, .. }) => Some(reason.clone()),
        };
        let attempt = why.as_deref().map_or(Attempt::Sent, Attempt::Failed);
        let at = radflow_shared::util::now_ms();
        if let Err(e) = export_state::record(&*self.bus, &destination.name, attempt, at).await {
            // The job's own delivery is what counts; the state is for operators.
            tracing::warn!(destination = %destination.name, error = %e, "export state not updated");
        }
        result
    }
}

impl Sender {
    async fn send(
        &self,
        job: &ExportRequested,
        destination: &crate::destinations::Destination,
    ) -> Result<Outcome, HandleError> {
        let deid = match &destination.deidentify {
            // Read for every job: a Secret remounted with the same key is picked up.
            Some(config) => Some(Key::load(&config.key_file).map_err(|e| {
                HandleError::Transient(anyhow::anyhow!("{}: {e}", destination.name))
            })?),
            None => None,
        };
        let mut objects = Vec::with_capacity(job.objects.len());
        for object in &job.objects {
            let key = format!("{}{}", job.result_prefix, object.file);
            let bytes = self.store.get(&key).await.map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    HandleError::permanent("object_missing", format!("{key} is not in the store"))
                }
                e => {
                    self.metrics.store_error(STAGE);
                    HandleError::Transient(e.into())
                }
            })?;
            let bytes = match &deid {
                Some(secret) => deidentify_part10(&bytes, secret)
                    .map(Into::into)
                    .map_err(|e| {
                        HandleError::permanent("deidentify_failed", format!("{key}: {e}"))
                    })?,
                None => bytes,
            };
            objects.push(Part10 { name: key, bytes });
        }
        let name = &destination.name;
        let report = self
            .associations
            .send(destination, &objects)
            .await
            .map_err(|e| {
            self.metrics.export(name, "retry");
            match e {
                ScuError::NothingAccepted { .. } => HandleError::permanent(
                    "refused",
                    format!("{name} ({}) accepts none of the objects' SOP classes and transfer syntaxes", destination.ae_title),
                ),
                e => HandleError::Transient(anyhow::anyhow!("{name}: {e}")),
            }
        })?;
        if let Some(failed) = report.failed.first() {
            let why = format!(
                "{name} ({}) did not store {}: {}{}",
                destination.ae_title,
                failed.path.display(),
                failed
                    .status
                    .map(|s| format!("status {s:#06x} "))
                    .unwrap_or_default(),
                failed.comment
            );
            return match failed.status {
                Some(status) if !retryable(status) => {
                    self.metrics.export(name, "refused");
                    Err(HandleError::permanent("refused", why))
                }
                _ => {
                    self.metrics.export(name, "retry");
                    Err(HandleError::Transient(anyhow::anyhow!(why)))
                }
            };
        }
        self.metrics.export(name, "sent");
        tracing::info!(
            series_uid = %job.series_uid,
            model = %job.model,
            destination = %name,
            objects = report.sent,
            "result exported"
        );
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_out_of_resources_is_retried() {
        assert!(super::retryable(0xa700) && super::retryable(0xa7ff));
        assert!(
            !super::retryable(0xa900) && !super::retryable(0xc000) && !super::retryable(0x0122)
        );
    }
}
