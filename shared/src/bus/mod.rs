//! The bus: durable publish, durable work-queue consumers and a small key-value store.
//!
//! One trait, two implementations: NATS JetStream for the distributed deployment and an
//! in-process bus for `radflow run`. Components receive an `Arc<dyn Bus>` and never
//! know which one they got.
//!
//! Semantics both implementations keep:
//! - `publish` returns only after the bus durably accepted the message; a message with
//!   a `msg_id` already seen within the duplicate window is accepted and dropped;
//! - consumers are durable and named; each message goes to one subscriber of a
//!   consumer; a message stays pending until `ack`, `term`, or it is redelivered after
//!   `nak(delay)` (or, on NATS, after the ack wait without `progress`);
//! - the key-value store offers compare-and-set by revision, which is what lets
//!   several listener replicas share series-assembly state safely.

pub mod inproc;
pub mod nats;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::events::{self, Event};

pub use inproc::InProcBus;
pub use nats::{NatsBus, NatsOptions};

/// Header carrying the correlation id of a series revision through every hop.
pub const CORRELATION_HEADER: &str = "Radflow-Correlation-Id";

/// Header that NATS JetStream uses for duplicate suppression.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// How long the bus remembers message ids for duplicate suppression.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A stream of the topology: a set of subjects and how long messages are kept.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: &'static str,
    /// Work queue: a message is deleted once acknowledged. Otherwise kept for `max_age`.
    pub work_queue: bool,
    pub max_age: Duration,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Instances as they are stored; consumed by the series assembler.
pub const INSTANCES: StreamSpec = StreamSpec {
    name: "RADFLOW_INSTANCES",
    subjects: "radflow.instance.>",
    work_queue: false,
    max_age: DAY.saturating_mul(7),
};
/// Ready series; consumed by preprocessors.
pub const SERIES: StreamSpec = StreamSpec {
    name: "RADFLOW_SERIES",
    subjects: "radflow.series.>",
    work_queue: true,
    max_age: DAY.saturating_mul(14),
};
/// Inference jobs, one subject per model; consumed by inferers.
pub const JOBS: StreamSpec = StreamSpec {
    name: "RADFLOW_JOBS",
    subjects: "radflow.job.>",
    work_queue: true,
    max_age: DAY.saturating_mul(14),
};
/// Results, kept for downstream consumers (PACS bridges, dashboards).
pub const RESULTS: StreamSpec = StreamSpec {
    name: "RADFLOW_RESULTS",
    subjects: "radflow.result.>",
    work_queue: false,
    max_age: DAY.saturating_mul(30),
};
/// Export jobs, one subject per destination (`radflow.export.<destination>`);
/// consumed by exporters.
pub const EXPORTS: StreamSpec = StreamSpec {
    name: "RADFLOW_EXPORTS",
    subjects: "radflow.export.>",
    work_queue: true,
    max_age: DAY.saturating_mul(14),
};
/// Dead letters, per stage, kept for inspection and replay.
pub const DLQ: StreamSpec = StreamSpec {
    name: "RADFLOW_DLQ",
    subjects: "radflow.dlq.>",
    work_queue: false,
    max_age: DAY.saturating_mul(30),
};

/// Every stream radflow uses.
pub const TOPOLOGY: [StreamSpec; 6] = [INSTANCES, SERIES, JOBS, RESULTS, EXPORTS, DLQ];

/// The key-value bucket holding series-assembly state.
pub const SERIES_STATE_BUCKET: &str = "radflow-series";

/// A durable consumer of one stream.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: StreamSpec,
    /// Durable name shared by every worker of a stage.
    pub durable: String,
    /// Subject filter within the stream.
    pub filter: String,
    /// Time a delivery may stay unacknowledged before it is redelivered.
    pub ack_wait: Duration,
    /// Deliveries after which the worker dead-letters instead of retrying.
    pub max_deliver: u64,
    /// Messages a subscriber may hold unacknowledged at once.
    pub max_ack_pending: usize,
    /// A consumer created now starts with the next message published, not with what
    /// the stream already holds (a late subscriber of a kept stream, such as the
    /// exporter's of results, must not act on a month of history).
    pub deliver_new: bool,
}

impl ConsumerSpec {
    /// The same consumer for another lane: `<durable>-stat` on `<filter>.stat`, … with
    /// the same ack wait and limits (see [`crate::events::Lane`]).
    pub fn in_lane(&self, lane: crate::events::Lane) -> Self {
        Self {
            durable: format!("{}{}", self.durable, lane.durable_suffix()),
            filter: format!("{}{}", self.filter, lane.suffix()),
            ..self.clone()
        }
    }

    /// A consumer of the whole stream with defaults that suit radflow's stages.
    pub fn new(stream: StreamSpec, durable: &str) -> Self {
        Self {
            stream,
            durable: durable.to_owned(),
            filter: stream.subjects.to_owned(),
            ack_wait: Duration::from_secs(60),
            max_deliver: 5,
            max_ack_pending: 64,
            deliver_new: false,
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub correlation_id: String,
    pub payload: Bytes,
}

impl Outgoing {
    /// The message for a typed event.
    pub fn event<E: Event>(event: &E) -> Self {
        Self {
            subject: event.subject(),
            msg_id: event.msg_id(),
            correlation_id: event.correlation_id().to_owned(),
            payload: events::encode(event),
        }
    }
}

/// One delivery of a message to a subscriber.
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    pub correlation_id: Option<String>,
    /// 1 on first delivery.
    pub attempt: u64,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("attempt", &self.attempt)
            .field("bytes", &self.payload.len())
            .finish()
    }
}

/// Settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: never deliver again.
    async fn ack(&self) -> Result<(), BusError>;
    /// Not now: deliver again after `delay`.
    async fn nak(&self, delay: Duration) -> Result<(), BusError>;
    /// Give up on it without success (after it was dead-lettered).
    async fn term(&self) -> Result<(), BusError>;
    /// Still working: restart the ack-wait timer.
    async fn progress(&self) -> Result<(), BusError>;
}

/// Deliveries of a subscription; ends when the bus closes.
pub type Subscription = BoxStream<'static, Result<Delivery, BusError>>;

/// A value in the key-value store with its revision (for compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub value: Bytes,
    pub revision: u64,
}

/// A key-value bucket with compare-and-set.
#[async_trait]
pub trait Kv: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, BusError>;
    /// Creates the key; `Ok(None)` if it already exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<Option<u64>, BusError>;
    /// Replaces the value if the key is still at `revision`; `Ok(None)` if it moved on.
    async fn update(&self, key: &str, value: Bytes, revision: u64)
    -> Result<Option<u64>, BusError>;
    /// Every live key with its value.
    async fn entries(&self) -> Result<Vec<(String, KvEntry)>, BusError>;
    /// Deletes the key if it is still at `revision`; `Ok(false)` if it moved on.
    async fn delete(&self, key: &str, revision: u64) -> Result<bool, BusError>;
}

/// State of one durable consumer, for status views and lag metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub filter: String,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged (in flight).
    pub ack_pending: u64,
    /// Messages delivered more than once.
    pub redelivered: u64,
    /// Age of the oldest message the consumer has not finished, if any.
    pub oldest_pending_age_ms: Option<u64>,
}

/// State of one stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub consumers: Vec<ConsumerStatus>,
}

/// A message as kept by a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub subject: String,
    pub payload: Bytes,
    /// Unix milliseconds when the stream stored it.
    pub time_ms: u64,
}

/// The bus.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes and waits until the bus has durably accepted the message.
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError>;
    /// Joins a durable consumer (created on first use).
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Subscription, BusError>;
    /// Pulls up to `max` deliveries of a durable consumer (created on first use),
    /// waiting at most `wait` for the first; empty when none is waiting. Unlike
    /// [`Bus::subscribe`] nothing is prefetched, so a worker can serve several
    /// consumers by priority without holding messages it does not work on.
    async fn fetch(
        &self,
        spec: &ConsumerSpec,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError>;
    /// Opens a key-value bucket (created on first use).
    async fn kv(&self, bucket: &str) -> Result<Arc<dyn Kv>, BusError>;
    /// Whether the bus is reachable now (for `/readyz`).
    async fn check(&self) -> Result<(), BusError>;
    /// `nats` or `in-process`, for logs and status.
    fn kind(&self) -> &'static str;
    /// Every radflow stream with its consumers.
    async fn streams(&self) -> Result<Vec<StreamStatus>, BusError>;
    /// Up to `max` messages of a stream with sequence ≥ `from_seq`, in order.
    async fn read(
        &self,
        stream: StreamSpec,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredMessage>, BusError>;
    /// Removes one message from a stream (after a dead letter was replayed).
    async fn remove(&self, stream: StreamSpec, seq: u64) -> Result<bool, BusError>;
}

/// The last `n` messages of a stream, oldest first.
pub async fn last_messages(
    bus: &dyn Bus,
    stream: StreamSpec,
    n: usize,
) -> Result<Vec<StoredMessage>, BusError> {
    let Some(state) = bus
        .streams()
        .await?
        .into_iter()
        .find(|s| s.name == stream.name)
    else {
        return Ok(Vec::new());
    };
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let from = state
        .last_seq
        .saturating_sub(n as u64)
        .saturating_add(1)
        .max(state.first_seq);
    bus.read(stream, from, n).await
}

/// Publishes a typed event.
pub async fn publish_event<E: Event>(bus: &dyn Bus, event: &E) -> Result<(), BusError> {
    bus.publish(Outgoing::event(event)).await
}

/// Bus failures. All of them are transient from a worker's point of view: the bus
/// comes back, the message is retried.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the bus is unreachable: {0}")]
    Unavailable(String),
    #[error("the bus refused the request: {0}")]
    Refused(String),
    #[error("the bus is closed")]
    Closed,
}

impl BusError {
    pub(crate) fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::Unavailable(format!("{e:#}"))
    }
}

/// Whether `subject` matches a NATS-style `filter` (`*` one token, `>` the rest).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_filters() {
        assert!(subject_matches("radflow.job.>", "radflow.job.demo"));
        assert!(subject_matches("radflow.job.>", "radflow.job.a.b"));
        assert!(!subject_matches("radflow.job.>", "radflow.job"));
        assert!(subject_matches("radflow.*.ready", "radflow.series.ready"));
        assert!(!subject_matches(
            "radflow.series.ready",
            "radflow.series.readyx"
        ));
        assert!(!subject_matches("radflow.series", "radflow.series.ready"));
    }
}
