//! The export stage: a result's DICOM objects (SEG, SR) sent to the PACS and other
//! DICOM nodes, with the durable consumers, retries and dead letters of every stage.
//!
//! ```text
//! radflow.result.<model> ──▶ router ──▶ radflow.export.<destination> ──▶ sender ──C-STORE──▶ PACS
//! ```
//!
//! # Layout
//!
//! - [`destinations`]: the destinations file: DICOM nodes by name, routes by model,
//!   "back to the caller".
//! - [`router`]: results to export jobs (`export-router` on the results stream).
//! - [`sender`]: export jobs to C-STORE (`exporter` on the export stream).
//! - [`associations`]: associations kept open between jobs to a destination.
//! - [`deidentify`]: the Basic Application Confidentiality Profile for destinations
//!   outside the hospital.
//!
//! The objects are written by the inferer, where the label map is; this stage only
//! reads them from the store, so it links neither ONNX Runtime nor a pixel codec.

pub mod associations;
pub mod deidentify;
pub mod destinations;
pub mod router;
pub mod sender;

use std::sync::Arc;

use radflow_shared::bus::Bus;
use radflow_shared::metrics::Metrics;
use radflow_shared::store::Store;
use radflow_shared::worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

pub use destinations::Destinations;

/// The exporter's dependencies.
pub struct Exporter {
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub destinations: Arc<Destinations>,
    pub metrics: Arc<Metrics>,
}

/// Runs the router and the sender until `shutdown`. `sender` configures the sender's
/// consumer (its ack wait, deliveries and concurrency); the router takes the same
/// limits.
pub async fn run(exporter: Exporter, sender: WorkerConfig, shutdown: CancellationToken) {
    let mut routing = sender.clone();
    routing.consumer = with_limits(router::consumer(), &sender);
    let mut sending = sender;
    sending.consumer = with_limits(sender::consumer(), &sending);
    let router = Arc::new(router::Router {
        bus: exporter.bus.clone(),
        destinations: exporter.destinations.clone(),
        metrics: exporter.metrics.clone(),
    });
    let associations = Arc::new(associations::Pool::default());
    let send = Arc::new(sender::Sender {
        store: exporter.store,
        bus: exporter.bus.clone(),
        associations: associations.clone(),
        destinations: exporter.destinations,
        metrics: exporter.metrics.clone(),
    });
    tokio::join!(
        radflow_shared::worker::run(
            exporter.bus.clone(),
            router,
            routing,
            exporter.metrics.clone(),
            shutdown.clone(),
        ),
        async {
            radflow_shared::worker::run(
                exporter.bus,
                send,
                sending,
                exporter.metrics,
                shutdown.clone(),
            )
            .await;
            associations.release_idle(true).await;
        },
        release_idle(&associations, &shutdown),
    );
}

/// Releases idle associations until `shutdown`.
async fn release_idle(pool: &associations::Pool, shutdown: &CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(associations::IDLE / 2) => pool.release_idle(false).await,
        }
    }
}

/// `spec` with the limits configured for the stage.
fn with_limits(
    mut spec: radflow_shared::bus::ConsumerSpec,
    from: &WorkerConfig,
) -> radflow_shared::bus::ConsumerSpec {
    spec.ack_wait = from.consumer.ack_wait;
    spec.max_deliver = from.consumer.max_deliver;
    spec.max_ack_pending = from.consumer.max_ack_pending.max(from.concurrency);
    spec
}

/// The durable consumers of the stage (for lag metrics and status).
pub fn consumers() -> Vec<String> {
    vec![router::STAGE.to_owned(), sender::STAGE.to_owned()]
}
