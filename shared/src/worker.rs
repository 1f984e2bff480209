//! The loop every queue-driven stage runs: take a delivery, call `handle`, settle it.
//!
//! `handle` does the work and says how it went; this loop alone decides what the bus
//! is told, so the policy lives in one place:
//! - `Ok` → ack;
//! - `Transient` (store or bus down, disk full…) → nak with a growing delay, until the
//!   consumer's `max_deliver`; then dead-letter with code `retries_exhausted`;
//! - `Permanent` (undecodable series, bad geometry, model error…) → dead-letter at once
//!   with the handler's machine-readable code, then term.
//!
//! A message is only termed after its dead letter was durably published, so a reason
//! is never lost. While `handle` runs, the delivery's ack timer is kept alive with
//! in-progress acks. Errors are logged once, here, with their chain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::bus::{Bus, ConsumerSpec, Delivery, Outgoing};
use crate::events::{DeadLettered, SCHEMA_VERSION};
use crate::metrics::Metrics;
use crate::util::now_ms;

/// How a message was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The work was done and its outputs written.
    Done,
    /// Nothing to do (e.g. no model routes this series); the reason is logged.
    Skipped(String),
}

/// Why a message was not handled.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// May succeed later: retried with backoff.
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// Will never succeed: dead-lettered with `code` and `reason`.
    #[error("{reason}")]
    Permanent { code: &'static str, reason: String },
}

impl HandleError {
    pub fn permanent(code: &'static str, reason: impl Into<String>) -> Self {
        Self::Permanent {
            code,
            reason: reason.into(),
        }
    }
}

/// A stage's unit of work.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Stage name, used in metrics, logs and the dead-letter subject.
    fn stage(&self) -> &'static str;
    /// Handles one message.
    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandleError>;
}

/// How a worker consumes.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub consumer: ConsumerSpec,
    /// Messages handled at once by this process.
    pub concurrency: usize,
    /// Delay before the n-th retry (the last value repeats).
    pub backoff: Backoff,
    /// How long a draining worker waits for the messages it holds.
    pub drain: Duration,
    /// A consumer served before `consumer` (stat work); its ack wait and delivery
    /// limit are those of `consumer`.
    pub stat: Option<ConsumerSpec>,
    /// A consumer served only while `consumer` and `stat` have nothing waiting
    /// (batch scoring), so archive work never delays live studies.
    pub batch: Option<ConsumerSpec>,
}

impl WorkerConfig {
    pub fn new(consumer: ConsumerSpec) -> Self {
        Self {
            consumer,
            concurrency: 1,
            // 1 s, 4 s, 16 s, then a minute between tries.
            backoff: Backoff::new(Duration::from_secs(1), 4, Duration::from_secs(60)),
            drain: Duration::from_secs(25),
            stat: None,
            batch: None,
        }
    }

    /// Adds the stat and batch lanes of `consumer` (see [`ConsumerSpec::in_lane`]).
    pub fn with_lanes(mut self) -> Self {
        self.stat = Some(self.consumer.in_lane(crate::events::Lane::Stat));
        self.batch = Some(self.consumer.in_lane(crate::events::Lane::Batch));
        self
    }

    /// The consumers in the order they are served.
    fn lanes(&self) -> Vec<&ConsumerSpec> {
        self.stat
            .iter()
            .chain(std::iter::once(&self.consumer))
            .chain(self.batch.iter())
            .collect()
    }
}

/// How long an idle priority worker waits on its main consumer before it looks at
/// the other lanes again (the extra latency a stat message can see).
const LANE_POLL: Duration = Duration::from_millis(250);

/// Takes the next delivery by priority: stat, then the main consumer (waiting up to
/// [`LANE_POLL`]), then batch. `None` when nothing was waiting.
async fn next_by_priority(
    bus: &dyn Bus,
    config: &WorkerConfig,
) -> Result<Option<Delivery>, crate::bus::BusError> {
    if let Some(stat) = &config.stat
        && let Some(d) = bus.fetch(stat, 1, Duration::ZERO).await?.pop()
    {
        return Ok(Some(d));
    }
    let wait = if config.batch.is_some() {
        Duration::ZERO
    } else {
        LANE_POLL
    };
    if let Some(d) = bus.fetch(&config.consumer, 1, wait).await?.pop() {
        return Ok(Some(d));
    }
    if let Some(batch) = &config.batch {
        if let Some(d) = bus.fetch(batch, 1, Duration::ZERO).await?.pop() {
            return Ok(Some(d));
        }
        // Nothing anywhere: wait on the main lane for a while before polling again.
        return Ok(bus.fetch(&config.consumer, 1, LANE_POLL).await?.pop());
    }
    Ok(None)
}

/// Handles a delivery on its own task, holding `permit` until it is settled.
fn spawn_process(
    tracker: &TaskTracker,
    bus: &Arc<dyn Bus>,
    handler: &Arc<dyn Handler>,
    config: &WorkerConfig,
    metrics: &Arc<Metrics>,
    delivery: Delivery,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (bus, handler, config, metrics) = (
        bus.clone(),
        handler.clone(),
        config.clone(),
        metrics.clone(),
    );
    tracker.spawn(async move {
        process(&*bus, &*handler, &config, &metrics, delivery).await;
        drop(permit);
    });
}

/// The consume loop: one message at a time per permit, pulled by priority when the
/// worker has several lanes, nothing prefetched.
async fn run_lanes(
    bus: Arc<dyn Bus>,
    handler: Arc<dyn Handler>,
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let stage = handler.stage();
    let permits = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    let names: Vec<&str> = config.lanes().iter().map(|c| c.durable.as_str()).collect();
    tracing::info!(stage, consumers = ?names, "consuming by priority");
    let mut retry = Duration::from_millis(500);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = next_by_priority(&*bus, &config) => n,
        };
        match next {
            Ok(Some(delivery)) => {
                retry = Duration::from_millis(500);
                spawn_process(tracker, &bus, &handler, &config, &metrics, delivery, permit);
            }
            Ok(None) => {}
            Err(e) => {
                metrics.bus_error(stage);
                tracing::warn!(stage, error = %e, "cannot pull; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Consumes until `shutdown`, then waits up to `drain` for the messages in hand.
pub async fn run(
    bus: Arc<dyn Bus>,
    handler: Arc<dyn Handler>,
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let stage = handler.stage();
    let tracker = TaskTracker::new();
    // Every worker pulls one message per free permit (`run_lanes`, also with a single
    // consumer): a message waiting in a client-side prefetch buffer gets no in-progress
    // acks, so behind a slow message it would pass its ack wait, be delivered again
    // (to this worker or another) and be handled twice, each time counting a delivery.
    run_lanes(
        bus.clone(),
        handler.clone(),
        config.clone(),
        metrics.clone(),
        shutdown.clone(),
        &tracker,
    )
    .await;
    tracker.close();
    if tokio::time::timeout(config.drain, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            stage,
            "drain deadline passed; unfinished messages will be redelivered"
        );
    }
    tracing::info!(stage, "worker stopped");
}

/// Handles one delivery and settles it. Public so tests can drive a single message.
pub async fn process(
    bus: &dyn Bus,
    handler: &dyn Handler,
    config: &WorkerConfig,
    metrics: &Metrics,
    delivery: Delivery,
) {
    let stage = handler.stage();
    let correlation_id = delivery.correlation_id.clone().unwrap_or_default();
    let span = tracing::info_span!(
        "message",
        stage,
        correlation_id = %correlation_id,
        subject = %delivery.subject,
        attempt = delivery.attempt
    );
    metrics.activity.begin();
    async {
        metrics.message(stage, "received");
        let started = Instant::now();
        let result = {
            let keepalive = config.consumer.ack_wait / 3;
            // A handler that panics on one message dead-letters that message (the same
            // input would panic again) and the worker goes on.
            let work = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                handler.handle(&delivery),
            ));
            tokio::pin!(work);
            loop {
                tokio::select! {
                    r = &mut work => break r.unwrap_or_else(|panic| {
                        Err(HandleError::permanent(
                            "handler_panicked",
                            format!(
                                "the {stage} stage failed unexpectedly on this message: {}",
                                crate::util::panic_message(&*panic)
                            ),
                        ))
                    }),
                    _ = tokio::time::sleep(keepalive) => {
                        if let Err(e) = delivery.acker.progress().await {
                            tracing::warn!(error = %e, "in-progress ack failed");
                        }
                    }
                }
            }
        };
        metrics.stage_time(stage, started.elapsed().as_secs_f64());
        match result {
            Ok(outcome) => {
                if let Outcome::Skipped(why) = &outcome {
                    tracing::info!(reason = %why, "skipped");
                }
                match delivery.acker.ack().await {
                    Ok(()) => metrics.message(stage, "processed"),
                    Err(e) => {
                        metrics.bus_error(stage);
                        tracing::warn!(error = %e, "ack failed; the message will be redelivered and redone idempotently");
                    }
                }
            }
            Err(HandleError::Transient(e)) if delivery.attempt < config.consumer.max_deliver => {
                let delay = config.backoff.delay(u32::try_from(delivery.attempt).unwrap_or(u32::MAX));
                tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "transient failure; will retry");
                metrics.message(stage, "retried");
                if let Err(e) = delivery.acker.nak(delay).await {
                    tracing::warn!(error = %e, "nak failed; the bus will redeliver after the ack wait");
                }
            }
            Err(e) => {
                let (code, reason) = match e {
                    HandleError::Transient(e) => ("retries_exhausted", format!("{e:#}")),
                    HandleError::Permanent { code, reason } => (code, reason),
                };
                tracing::error!(code, reason = %reason, "giving up; dead-lettering");
                dead_letter(bus, stage, code, &reason, &delivery, metrics).await;
            }
        }
    }
    .instrument(span)
    .await;
    metrics.activity.end();
}

/// Cancels `shutdown` once the process has had no message in hand for `idle` (the
/// work-queue pattern of a Kubernetes Job: workers exit when the queue is drained).
pub async fn exit_when_idle(metrics: Arc<Metrics>, idle: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if metrics.activity.idle_for() >= idle {
            tracing::info!(idle_secs = idle.as_secs_f64(), "no work left; stopping");
            shutdown.cancel();
            return;
        }
    }
}

async fn dead_letter(
    bus: &dyn Bus,
    stage: &str,
    code: &str,
    reason: &str,
    delivery: &Delivery,
    metrics: &Metrics,
) {
    let original = serde_json::from_slice(&delivery.payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&delivery.payload).into_owned())
    });
    let event = DeadLettered {
        schema_version: SCHEMA_VERSION,
        correlation_id: delivery.correlation_id.clone().unwrap_or_default(),
        stage: stage.to_owned(),
        code: code.to_owned(),
        reason: reason.to_owned(),
        attempts: delivery.attempt,
        original_subject: delivery.subject.clone(),
        original,
        at_ms: now_ms(),
    };
    match bus.publish(Outgoing::event(&event)).await {
        Ok(()) => {
            metrics.message(stage, "dead_lettered");
            if let Err(e) = delivery.acker.term().await {
                tracing::warn!(error = %e, "term after dead-letter failed; a redelivery will be dead-lettered again (deduplicated)");
            }
        }
        Err(e) => {
            metrics.bus_error(stage);
            tracing::warn!(error = %e, "cannot publish dead letter; retrying the message later");
            let _ = delivery.acker.nak(Duration::from_secs(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{DLQ, InProcBus, JOBS};
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Flaky {
        calls: AtomicU32,
        fail_first: u32,
        permanent: bool,
    }

    #[async_trait]
    impl Handler for Flaky {
        fn stage(&self) -> &'static str {
            "test"
        }
        async fn handle(&self, _d: &Delivery) -> Result<Outcome, HandleError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if self.permanent {
                return Err(HandleError::permanent("bad_input", "cannot ever work"));
            }
            if n <= self.fail_first {
                Err(HandleError::Transient(anyhow::anyhow!("store down")))
            } else {
                Ok(Outcome::Done)
            }
        }
    }

    async fn drive(handler: Arc<Flaky>, max_deliver: u64) -> InProcBus {
        drive_bodies(handler, &[r#"{"x":1}"#], max_deliver).await
    }

    /// Publishes `bodies` (message ids are the bodies, correlation id `corr`), runs a
    /// worker with `handler` until the stream is empty, and returns the bus.
    async fn drive_bodies(
        handler: Arc<dyn Handler>,
        bodies: &[&'static str],
        max_deliver: u64,
    ) -> InProcBus {
        let bus = InProcBus::new();
        for body in bodies {
            bus.publish(Outgoing {
                subject: "radflow.job.m".into(),
                msg_id: (*body).into(),
                correlation_id: "corr".into(),
                payload: bytes::Bytes::from_static(body.as_bytes()),
            })
            .await
            .unwrap();
        }
        let mut config = WorkerConfig::new(ConsumerSpec::new(JOBS, "w"));
        config.consumer.max_deliver = max_deliver;
        config.backoff = Backoff::constant(Duration::from_millis(10));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Arc::new(bus.clone()),
            handler,
            config,
            Metrics::new(),
            stop.clone(),
        ));
        for _ in 0..200 {
            if bus.stream_messages(JOBS.name).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap();
        bus
    }

    /// Records the bodies it handles; panics on the body `bad`.
    struct Recorder(std::sync::Mutex<Vec<String>>);

    #[async_trait]
    impl Handler for Recorder {
        fn stage(&self) -> &'static str {
            "test"
        }
        async fn handle(&self, d: &Delivery) -> Result<Outcome, HandleError> {
            if d.payload.as_ref() == b"bad" {
                let index = d.payload.len() + 7;
                let _ = d.payload[index]; // out of bounds: panics
            }
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&d.payload).into_owned());
            Ok(Outcome::Done)
        }
    }

    #[tokio::test]
    async fn lanes_are_served_stat_first_and_batch_last() {
        let bus = InProcBus::new();
        let publish = |subject: &'static str, body: &'static str| {
            let bus = bus.clone();
            async move {
                bus.publish(Outgoing {
                    subject: subject.into(),
                    msg_id: body.into(),
                    correlation_id: String::new(),
                    payload: bytes::Bytes::from_static(body.as_bytes()),
                })
                .await
                .unwrap()
            }
        };
        publish("radflow.job.m.batch", "batch-1").await;
        publish("radflow.job.m.batch", "batch-2").await;
        publish("radflow.job.m", "routine-1").await;
        publish("radflow.job.m.stat", "stat-1").await;
        publish("radflow.job.m", "routine-2").await;
        let lane = |name: &str, filter: &str| {
            let mut c = ConsumerSpec::new(JOBS, name);
            c.filter = filter.into();
            c
        };
        let mut config = WorkerConfig::new(lane("w", "radflow.job.m"));
        config.stat = Some(lane("w-stat", "radflow.job.m.stat"));
        config.batch = Some(lane("w-batch", "radflow.job.m.batch"));
        let recorder = Arc::new(Recorder(Default::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Arc::new(bus.clone()),
            recorder.clone(),
            config,
            Metrics::new(),
            stop.clone(),
        ));
        for _ in 0..300 {
            if recorder.0.lock().unwrap().len() == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            *recorder.0.lock().unwrap(),
            ["stat-1", "routine-1", "routine-2", "batch-1", "batch-2"]
        );
    }

    #[tokio::test]
    async fn transient_failures_are_retried_then_succeed() {
        let h = Arc::new(Flaky {
            calls: AtomicU32::new(0),
            fail_first: 2,
            permanent: false,
        });
        let bus = drive(h.clone(), 5).await;
        assert_eq!(h.calls.load(Ordering::SeqCst), 3);
        assert!(bus.stream_messages(DLQ.name).is_empty());
    }

    #[tokio::test]
    async fn exhausted_retries_are_dead_lettered() {
        let h = Arc::new(Flaky {
            calls: AtomicU32::new(0),
            fail_first: 100,
            permanent: false,
        });
        let bus = drive(h.clone(), 3).await;
        assert_eq!(h.calls.load(Ordering::SeqCst), 3);
        let dlq = bus.stream_messages(DLQ.name);
        assert_eq!(dlq.len(), 1);
        let ev: DeadLettered = crate::events::decode(&dlq[0].1).unwrap();
        assert_eq!(ev.code, "retries_exhausted");
        assert_eq!(ev.attempts, 3);
        assert_eq!(ev.original["x"], 1);
        assert_eq!(dlq[0].0, "radflow.dlq.test");
    }

    #[tokio::test]
    async fn permanent_failures_are_dead_lettered_at_once() {
        let h = Arc::new(Flaky {
            calls: AtomicU32::new(0),
            fail_first: 0,
            permanent: true,
        });
        let bus = drive(h.clone(), 5).await;
        assert_eq!(h.calls.load(Ordering::SeqCst), 1);
        let dlq = bus.stream_messages(DLQ.name);
        let ev: DeadLettered = crate::events::decode(&dlq[0].1).unwrap();
        assert_eq!((ev.code.as_str(), ev.attempts), ("bad_input", 1));
        assert_eq!(ev.correlation_id, "corr");
    }

    #[tokio::test]
    async fn a_panicking_message_is_dead_lettered_and_the_worker_goes_on() {
        let handler = Arc::new(Recorder(Default::default()));
        let bus = drive_bodies(handler.clone(), &["bad", "good"], 5).await;
        assert_eq!(*handler.0.lock().unwrap(), ["good"]);
        let dlq = bus.stream_messages(DLQ.name);
        assert_eq!(dlq.len(), 1);
        let ev: DeadLettered = crate::events::decode(&dlq[0].1).unwrap();
        assert_eq!((ev.code.as_str(), ev.attempts), ("handler_panicked", 1));
        assert!(ev.reason.contains("index out of bounds"), "{}", ev.reason);
    }
}
