//! What happens to a received instance before the sender hears Success, and when the
//! listener stops taking new associations.
//!
//! The SCP hands each validated instance to [`Ingest::store`] (or, for a large one, to
//! the part writer from [`Ingest::begin_parts`]), which writes the file to the store and
//! publishes `InstanceStored`; only when both are durable does it return `Ok`, and the
//! SCP answers Success. A store or bus failure becomes an Out of Resources status
//! (0xA700) so the sender retries: nothing acknowledged is lost, a retry overwrites the
//! same key and is deduplicated by message id, and an interrupted part upload leaves
//! nothing under the key.
//!
//! On a folder store the event is published while the file is flushed and renamed (its
//! key is known from the start), so the sender waits for the longer of the two rather
//! than their sum. Should the file then fail, the sender hears a failure and retries;
//! the event already accepted names an instance that is not (yet) in the store, which
//! misleads nobody: the preprocessor builds a series from what the store holds, and
//! the retried instance's event is a repeat the assembler ignores.
//!
//! [`Pressure`] is what admission looks at. Every association that is let in can hold
//! one instance at a time, so memory is bounded by the association limit; beyond that,
//! new associations are refused with a transient reason ("temporary congestion") while
//! the bus is unreachable, while the store or the bus has just failed, while they are
//! slow, or while more series wait for the preprocessor than configured. Running associations continue: a slow store
//! slows them through TCP back-pressure, because the next PDU is read only after the
//! current instance is stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use radflow_shared::bus::{Bus, Kv, SERIES, SERIES_STATE_BUCKET, publish_event};
use radflow_shared::events::{CountHints, InstanceStored, SCHEMA_VERSION};
use radflow_shared::metrics::Metrics;
use radflow_shared::store::{InstanceUpload, Store, StoreError};
use radflow_shared::util::now_ms;
use tokio_util::sync::CancellationToken;

use crate::assembly;
use crate::association::Rejection;
use crate::dataset::InstanceFacts;
use crate::journal::Journal;
use crate::local::{LocalFile, LocalFiles};
use crate::scp::{AssociationHooks, InstanceSink, PartWriter, ReceivedInstance, StoreFailure};

/// Longest a single store write or bus publish may take before the instance is
/// refused (the sender's own timeout is usually a minute or more).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The durable consumer whose backlog admission watches.
pub const BACKLOG_CONSUMER: &str = "preprocessor";

/// When new associations are refused for back-pressure.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// After a store or bus failure, new associations are refused for this long,
    /// unless an instance was stored successfully since.
    pub failure_cooldown: Duration,
    /// New associations are refused while the recent average time to store and
    /// publish one instance is above this.
    pub slow_store: Duration,
    /// New associations are refused while more series than this wait for the
    /// preprocessor (pending plus in flight); 0 turns the check off.
    pub max_series_backlog: u64,
    /// How often the bus's reachability and backlog are read.
    pub backlog_poll: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            failure_cooldown: Duration::from_secs(5),
            slow_store: Duration::from_secs(10),
            max_series_backlog: 0,
            backlog_poll: Duration::from_secs(1),
        }
    }
}

/// Shared record of how the store, the bus and the downstream queue are doing.
#[derive(Debug)]
pub struct Pressure {
    config: AdmissionConfig,
    last_failure_ms: AtomicU64,
    last_success_ms: AtomicU64,
    /// Moving average of store + publish time, in microseconds.
    latency_us: AtomicU64,
    /// Series waiting for the preprocessor; `u64::MAX` when unknown.
    backlog: AtomicU64,
    /// Whether the last look at the bus found it disconnected.
    bus_down: std::sync::atomic::AtomicBool,
}

impl Pressure {
    /// A record with nothing observed yet.
    pub fn new(config: AdmissionConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            last_failure_ms: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            backlog: AtomicU64::new(u64::MAX),
            bus_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// An instance was stored and published in `took`.
    pub fn succeeded(&self, took: Duration) {
        self.last_success_ms.store(now_ms(), Ordering::SeqCst);
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.latency_us.load(Ordering::SeqCst);
        // Weight 1/8: a handful of slow instances moves it, one outlier does not.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.latency_us.store(new, Ordering::SeqCst);
    }

    /// The store or the bus failed (or timed out) for an instance.
    pub fn failed(&self) {
        self.last_failure_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// Records the downstream backlog read from the bus.
    pub fn set_backlog(&self, series: Option<u64>) {
        self.backlog
            .store(series.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Records whether the bus is reachable.
    pub fn set_bus_reachable(&self, reachable: bool) {
        self.bus_down.store(!reachable, Ordering::SeqCst);
    }

    /// Whether a new association may start now.
    pub fn admit(&self) -> Result<(), Rejection> {
        if self.bus_down.load(Ordering::SeqCst) {
            return Err(Rejection::congested("the event bus is unreachable"));
        }
        let failure = self.last_failure_ms.load(Ordering::SeqCst);
        let success = self.last_success_ms.load(Ordering::SeqCst);
        let cooldown = self.config.failure_cooldown.as_millis() as u64;
        if failure > success && now_ms().saturating_sub(failure) < cooldown {
            return Err(Rejection::congested(
                "the store or the bus failed moments ago",
            ));
        }
        let latency = Duration::from_micros(self.latency_us.load(Ordering::SeqCst));
        if latency > self.config.slow_store {
            return Err(Rejection::congested(format!(
                "storing an instance takes {latency:?} on average"
            )));
        }
        let backlog = self.backlog.load(Ordering::SeqCst);
        let max = self.config.max_series_backlog;
        if max > 0 && backlog != u64::MAX && backlog > max {
            return Err(Rejection::congested(format!(
                "{backlog} series wait for the preprocessor (limit {max})"
            )));
        }
        Ok(())
    }

    /// Watches the bus until `shutdown`: whether it is reachable, and the
    /// preprocessor's backlog when a limit is configured.
    pub async fn watch_bus(self: Arc<Self>, bus: Arc<dyn Bus>, shutdown: CancellationToken) {
        loop {
            self.set_bus_reachable(bus.check().await.is_ok());
            if self.config.max_series_backlog == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.config.backlog_poll) => {}
                }
                continue;
            }
            let backlog = match bus.streams().await {
                Ok(streams) => streams
                    .into_iter()
                    .find(|s| s.name == SERIES.name)
                    .and_then(|s| s.consumers.into_iter().find(|c| c.name == BACKLOG_CONSUMER))
                    .map(|c| c.pending + c.ack_pending),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the downstream backlog");
                    None
                }
            };
            self.set_backlog(backlog);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.backlog_poll) => {}
            }
        }
    }
}

/// Stores instances and announces them.
#[derive(Clone)]
pub struct Ingest {
    store: Store,
    /// On a folder store, instances are written into it directly as they arrive.
    local: Option<Arc<LocalFiles>>,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    pressure: Arc<Pressure>,
}

impl Ingest {
    /// An ingest that reports to `pressure`; a folder store's instances are made
    /// durable through `journal` when there is one.
    pub fn new(
        store: Store,
        journal: Option<Arc<Journal>>,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        pressure: Arc<Pressure>,
    ) -> Self {
        let local = store
            .local_root()
            .map(|root| LocalFiles::new(root.to_owned(), store.fsync(), journal, metrics.clone()));
        Self {
            store,
            local,
            bus,
            metrics,
            pressure,
        }
    }

    /// Whether instances go straight into a folder as they arrive (so the SCP should
    /// hand them over in small parts from the start).
    pub fn writes_locally(&self) -> bool {
        self.local.is_some()
    }

    fn local_failed(&self, e: &std::io::Error, facts: &InstanceFacts) -> StoreFailure {
        let error = if e.raw_os_error() == Some(28) || e.raw_os_error() == Some(122) {
            StoreError::Full {
                key: facts.sop_instance_uid.clone(),
                detail: e.to_string(),
            }
        } else {
            StoreError::Unavailable {
                op: "put",
                key: facts.sop_instance_uid.clone(),
                detail: e.to_string(),
            }
        };
        self.store_failed(Some(&error), facts)
    }

    fn store_failed(&self, e: Option<&StoreError>, facts: &InstanceFacts) -> StoreFailure {
        self.metrics.store_error("listener");
        self.pressure.failed();
        let comment = match e {
            None => {
                tracing::warn!(series_uid = %facts.series_uid, "store write timed out; refusing the instance");
                "storage too slow, retry later"
            }
            Some(e) => {
                tracing::warn!(error = %e, series_uid = %facts.series_uid, "store write failed; refusing the instance");
                match e {
                    StoreError::Full { .. } => "storage full, retry later",
                    e if e.is_transient() => "storage unavailable, retry later",
                    _ => "storage error",
                }
            }
        };
        StoreFailure::OutOfResources(comment.into())
    }

    /// Publishes `InstanceStored` for an instance now in the store under `key`.
    async fn announce(
        &self,
        instance: &ReceivedInstance,
        key: String,
        started: Instant,
    ) -> Result<(), StoreFailure> {
        self.publish(instance, key).await?;
        self.counted(instance, started);
        Ok(())
    }

    /// Counts an instance stored and announced, `started` being when its storing began.
    fn counted(&self, instance: &ReceivedInstance, started: Instant) {
        self.metrics.instances_stored.inc();
        self.metrics.instance_bytes.inc_by(instance.size);
        self.pressure.succeeded(started.elapsed());
    }

    /// Publishes `InstanceStored` for an instance stored under `key`.
    async fn publish(&self, instance: &ReceivedInstance, key: String) -> Result<(), StoreFailure> {
        let facts = &instance.facts;
        let event = InstanceStored {
            schema_version: SCHEMA_VERSION,
            study_uid: facts.study_uid.clone(),
            series_uid: facts.series_uid.clone(),
            sop_instance_uid: facts.sop_instance_uid.clone(),
            sop_class_uid: facts.sop_class_uid.clone(),
            transfer_syntax: instance.transfer_syntax.clone(),
            modality: facts.modality.clone().unwrap_or_default(),
            key,
            size_bytes: instance.size,
            calling_ae: instance.calling_ae.clone(),
            called_ae: instance.called_ae.clone(),
            received_at_ms: now_ms(),
            hints: CountHints {
                images_in_acquisition: facts.images_in_acquisition,
                series_related_instances: facts.number_of_series_related_instances,
                number_of_frames: facts.number_of_frames,
            },
        };
        let failed = |comment: &str| {
            self.metrics.bus_error("listener");
            self.pressure.failed();
            StoreFailure::OutOfResources(comment.into())
        };
        // A bus known to be disconnected would only make the sender wait for a timeout.
        if let Err(e) = self.bus.check().await {
            tracing::warn!(error = %e, series_uid = %facts.series_uid, "bus unavailable; refusing the instance");
            return Err(failed("event bus unavailable, retry later"));
        }
        match tokio::time::timeout(OPERATION_TIMEOUT, publish_event(&*self.bus, &event)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, series_uid = %facts.series_uid, "bus publish failed; refusing the instance");
                return Err(failed("event bus unavailable, retry later"));
            }
            Err(_) => {
                tracing::warn!(series_uid = %facts.series_uid, "bus publish timed out; refusing the instance");
                return Err(failed("event bus too slow, retry later"));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl InstanceSink for Ingest {
    async fn store(&self, instance: ReceivedInstance) -> Result<(), StoreFailure> {
        let started = Instant::now();
        let facts = &instance.facts;
        if self.local.is_some() {
            let mut parts = self.begin_parts(facts).await?;
            if let Err(failure) = parts.write(instance.file.clone()).await {
                parts.abort().await;
                return Err(failure);
            }
            return parts.finish(instance).await;
        }
        let put = self.store.put_instance(
            &facts.study_uid,
            &facts.series_uid,
            &facts.sop_instance_uid,
            instance.file.clone(),
        );
        let key = match tokio::time::timeout(OPERATION_TIMEOUT, put).await {
            Ok(Ok(key)) => key,
            Ok(Err(e)) => return Err(self.store_failed(Some(&e), facts)),
            Err(_) => return Err(self.store_failed(None, facts)),
        };
        self.announce(&instance, key, started).await
    }

    async fn begin_parts(
        &self,
        facts: &InstanceFacts,
    ) -> Result<Box<dyn PartWriter>, StoreFailure> {
        let started = Instant::now();
        if let Some(local) = &self.local {
            let key =
                Store::instance_key(&facts.study_uid, &facts.series_uid, &facts.sop_instance_uid);
            let file = match local.begin(&key).await {
                Ok(file) => file,
                Err(e) => return Err(self.local_failed(&e, facts)),
            };
            return Ok(Box::new(IngestParts {
                ingest: self.clone(),
                target: Target::Local(file),
                facts: facts.clone(),
                started,
            }));
        }
        let begin = self.store.begin_instance_upload(
            &facts.study_uid,
            &facts.series_uid,
            &facts.sop_instance_uid,
        );
        let upload = match tokio::time::timeout(OPERATION_TIMEOUT, begin).await {
            Ok(Ok(upload)) => upload,
            Ok(Err(e)) => return Err(self.store_failed(Some(&e), facts)),
            Err(_) => return Err(self.store_failed(None, facts)),
        };
        Ok(Box::new(IngestParts {
            ingest: self.clone(),
            target: Target::Upload(upload),
            facts: facts.clone(),
            started,
        }))
    }
}

/// Where the parts of an instance go.
enum Target {
    /// A multipart upload through `object_store` (S3, memory).
    Upload(InstanceUpload),
    /// A staging file in the store's folder.
    Local(LocalFile),
}

/// An instance on its way into the store in parts.
struct IngestParts {
    ingest: Ingest,
    target: Target,
    facts: InstanceFacts,
    started: Instant,
}

#[async_trait]
impl PartWriter for IngestParts {
    async fn write(&mut self, part: Bytes) -> Result<(), StoreFailure> {
        let (ingest, facts) = (&self.ingest, &self.facts);
        match &mut self.target {
            Target::Upload(upload) => {
                match tokio::time::timeout(OPERATION_TIMEOUT, upload.put_part(part)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(ingest.store_failed(Some(&e), facts)),
                    Err(_) => Err(ingest.store_failed(None, facts)),
                }
            }
            Target::Local(file) => {
                match tokio::time::timeout(OPERATION_TIMEOUT, file.write(part)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(ingest.local_failed(&e, facts)),
                    Err(_) => Err(ingest.store_failed(None, facts)),
                }
            }
        }
    }

    async fn finish(self: Box<Self>, instance: ReceivedInstance) -> Result<(), StoreFailure> {
        let IngestParts {
            ingest,
            target,
            facts,
            started,
        } = *self;
        let key = match target {
            Target::Upload(upload) => {
                match tokio::time::timeout(OPERATION_TIMEOUT, upload.complete()).await {
                    Ok(Ok(key)) => key,
                    Ok(Err(e)) => return Err(ingest.store_failed(Some(&e), &facts)),
                    Err(_) => return Err(ingest.store_failed(None, &facts)),
                }
            }
            Target::Local(file) => {
                // The event names the file's final key: JetStream's round trip runs
                // while the file is flushed and renamed, and Success waits for both.
                let key = file.key().to_owned();
                let placing = async {
                    match tokio::time::timeout(OPERATION_TIMEOUT, file.complete()).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(ingest.local_failed(&e, &facts)),
                        Err(_) => Err(ingest.store_failed(None, &facts)),
                    }
                };
                let (placed, published) =
                    tokio::join!(placing, ingest.publish(&instance, key.clone()));
                placed?;
                published?;
                ingest.counted(&instance, started);
                return Ok(());
            }
        };
        ingest.announce(&instance, key, started).await
    }

    async fn abort(self: Box<Self>) {
        match self.target {
            Target::Upload(upload) => upload.abort().await,
            Target::Local(file) => file.abort().await,
        }
    }
}

/// Association-level hooks: admission (back-pressure) and release hints for assembly.
pub struct Hooks {
    kv: Arc<dyn Kv>,
    metrics: Arc<Metrics>,
    pressure: Arc<Pressure>,
}

impl Hooks {
    /// Hooks that admit by `pressure` and record releases in the series bucket.
    pub async fn new(
        bus: &dyn Bus,
        metrics: Arc<Metrics>,
        pressure: Arc<Pressure>,
    ) -> Result<Self, radflow_shared::bus::BusError> {
        Ok(Self {
            kv: bus.kv(SERIES_STATE_BUCKET).await?,
            metrics,
            pressure,
        })
    }
}

impl AssociationHooks for Hooks {
    fn admit(&self) -> Result<(), Rejection> {
        self.pressure.admit()
    }

    fn released(&self, _calling_ae: &str, _called_ae: &str, study_series: &[(String, String)]) {
        if study_series.is_empty() {
            return;
        }
        let kv = self.kv.clone();
        let metrics = self.metrics.clone();
        let series: Vec<String> = study_series.iter().map(|(_, s)| s.clone()).collect();
        let released_at = now_ms();
        tokio::spawn(async move {
            // The instance events may still be on their way to the assembler; give
            // them a moment so the hint finds the series' state.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Err(e) = assembly::mark_released(&*kv, &series, released_at).await {
                metrics.bus_error("listener");
                tracing::debug!(error = %e, "release hint not recorded; the quiet period applies");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_follows_failures_latency_and_backlog() {
        let p = Pressure::new(AdmissionConfig {
            failure_cooldown: Duration::from_secs(60),
            slow_store: Duration::from_secs(1),
            max_series_backlog: 3,
            backlog_poll: Duration::from_secs(1),
        });
        assert!(p.admit().is_ok());
        p.failed();
        let r = p.admit().unwrap_err();
        assert!(r.transient, "{r}");
        // A success after the failure lifts the refusal.
        std::thread::sleep(Duration::from_millis(2));
        p.succeeded(Duration::from_millis(5));
        assert!(p.admit().is_ok());
        // Slow stores: the average moves past the limit after a few slow instances.
        for _ in 0..30 {
            p.succeeded(Duration::from_secs(3));
        }
        assert!(p.admit().unwrap_err().detail.contains("on average"));
        for _ in 0..60 {
            p.succeeded(Duration::from_millis(1));
        }
        assert!(p.admit().is_ok());
        p.set_backlog(Some(4));
        assert!(p.admit().unwrap_err().detail.contains("preprocessor"));
        p.set_backlog(Some(3));
        assert!(p.admit().is_ok());
        p.set_backlog(None);
        assert!(p.admit().is_ok());
        p.set_bus_reachable(false);
        assert!(p.admit().unwrap_err().detail.contains("unreachable"));
        p.set_bus_reachable(true);
        assert!(p.admit().is_ok());
    }
}
