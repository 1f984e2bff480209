//! Shared contracts of radflow: events, configuration, the store, the bus, telemetry
//! and the worker loop. Nothing here knows DICOM or ONNX.
//!
//! # Layout
//! - [`events`]: the typed events that connect the stages (one schema version).
//! - [`bus`]: the bus trait, NATS JetStream and in-process implementations.
//! - [`store`]: the object store with the one place keys are spelled.
//! - [`models`]: the model registry (`models.toml`) both workers read.
//! - [`worker`]: the consume → handle → ack / retry / dead-letter loop.
//! - [`http`], [`metrics`], [`telemetry`]: health, Prometheus metrics and logs.
//! - [`status`]: the operator's view (queues, assembly, results, exports, dead
//!   letters) and dead-letter replay.
//! - [`ui`]: the web page (queues, assembly, results with previews, dead letters).
//! - [`export_state`]: what each export destination last did, shared by exporters.
//! - [`config`]: command-line option groups with their environment variables.
//! - [`shutdown`]: SIGINT/SIGTERM to a cancellation token.
//! - [`backoff`]: the one retry schedule (NATS connects, redeliveries, store reads).
//! - `testing` (feature `testing`, tests only): nats-server and Python starters.

pub mod backoff;
pub mod bus;
pub mod config;
pub mod events;
pub mod export_state;
pub mod http;
pub mod metrics;
pub mod models;
pub mod secret;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod ui;
pub mod util;
pub mod worker;
