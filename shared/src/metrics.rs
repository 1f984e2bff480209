//! Prometheus metrics of every stage, in one registry per process.
//!
//! Names follow Prometheus conventions (base units in the name, `_total` counters,
//! histograms for latency). Labels are stage names, outcomes, status codes, model
//! names and providers: never a UID or anything about a patient.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 8))
}

/// Every metric radflow exports. Cheap to share (`Arc`).
pub struct Metrics {
    registry: Registry,
    messages: Family<Labels, Counter>,
    stage_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    phase_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    associations: Family<Labels, Counter>,
    pub associations_active: Gauge,
    pub instances_stored: Counter,
    pub instance_bytes: Counter,
    pub cstore_seconds: Histogram,
    /// Flushes of a folder store, by kind: `journal` (one flush of the journal's
    /// segment, shared by the instances of a batch), `checkpoint`, `file`, `folder`.
    store_flushes: Family<Labels, Counter>,
    /// Instances made durable through the store's write-ahead journal.
    pub journal_records: Counter,
    cstore_failures: Family<Labels, Counter>,
    series_ready: Family<Labels, Counter>,
    pub series_assembling: Gauge,
    inference_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    inference_batch: Family<Labels, Histogram, fn() -> Histogram>,
    execution_provider: Family<Labels, Gauge>,
    model_info: Family<Labels, Gauge>,
    model_load_failures: Family<Labels, Counter>,
    registry_reloads: Family<Labels, Counter>,
    models_loaded: Gauge,
    store_errors: Family<Labels, Counter>,
    bus_errors: Family<Labels, Counter>,
    queue_pending: Family<Labels, Gauge>,
    queue_in_flight: Family<Labels, Gauge>,
    queue_oldest: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    exports: Family<Labels, Counter>,
    export_last_success: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Messages in hand and the time of the last one, for workers that exit when idle.
    pub activity: Activity,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Whether a worker process is doing anything: messages in hand, and when the last
/// one was taken or settled.
#[derive(Debug)]
pub struct Activity {
    in_hand: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<std::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_hand: Default::default(),
            last: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Activity {
    fn touch(&self) {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::time::Instant::now();
    }

    /// A message was taken.
    pub fn begin(&self) {
        self.in_hand
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.touch();
    }

    /// A message was settled.
    pub fn end(&self) {
        self.in_hand
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.touch();
    }

    /// How long nothing has been in hand (zero while something is).
    pub fn idle_for(&self) -> std::time::Duration {
        if self.in_hand.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return std::time::Duration::ZERO;
        }
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let messages = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_messages",
            "Messages handled per stage and outcome (received, processed, retried, dead_lettered, failed)",
            messages.clone(),
        );
        let stage_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "radflow_stage_duration_seconds",
            "Time to handle one message, per stage",
            stage_seconds.clone(),
        );
        let phase_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "radflow_phase_duration_seconds",
            "Time spent in each phase of a stage (fetch, decode, resample, infer, write…)",
            phase_seconds.clone(),
        );
        let associations = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_dicom_associations",
            "DICOM associations by result (accepted, rejected_<reason>, aborted)",
            associations.clone(),
        );
        let associations_active = Gauge::default();
        registry.register(
            "radflow_dicom_associations_active",
            "DICOM associations open now",
            associations_active.clone(),
        );
        let instances_stored = Counter::default();
        registry.register(
            "radflow_dicom_instances_stored",
            "Instances stored and acknowledged with Success",
            instances_stored.clone(),
        );
        let instance_bytes = Counter::default();
        registry.register(
            "radflow_dicom_instance_bytes",
            "Bytes of instances stored",
            instance_bytes.clone(),
        );
        let store_flushes = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_listener_store_flushes",
            "Flushes of the folder store by kind (journal, checkpoint, file, folder)",
            store_flushes.clone(),
        );
        let journal_records = Counter::default();
        registry.register(
            "radflow_listener_journal_records",
            "Instances made durable through the store's write-ahead journal",
            journal_records.clone(),
        );
        let cstore_seconds = latency_histogram();
        registry.register(
            "radflow_dicom_cstore_duration_seconds",
            "Time from the last fragment of a C-STORE data set to its response",
            cstore_seconds.clone(),
        );
        let cstore_failures = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_dicom_cstore_failures",
            "C-STORE requests answered with a failure status, by status",
            cstore_failures.clone(),
        );
        let series_ready = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_series_ready",
            "Series revisions declared ready, by reason",
            series_ready.clone(),
        );
        let series_assembling = Gauge::default();
        registry.register(
            "radflow_series_assembling",
            "Series receiving instances and not yet ready",
            series_assembling.clone(),
        );
        let inference_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "radflow_inference_duration_seconds",
            "ONNX Runtime session.run time per batch, per model",
            inference_seconds.clone(),
        );
        let inference_batch: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(batch_histogram);
        registry.register(
            "radflow_inference_batch_size",
            "Windows or volumes per session.run, per model",
            inference_batch.clone(),
        );
        let execution_provider = Family::<Labels, Gauge>::default();
        registry.register(
            "radflow_execution_provider",
            "1 for the execution provider each loaded model really runs on",
            execution_provider.clone(),
        );
        let model_info = Family::<Labels, Gauge>::default();
        registry.register(
            "radflow_model_info",
            "1 for each model version served (with its role and SHA-256), 0 once retired",
            model_info.clone(),
        );
        let model_load_failures = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_model_load_failures",
            "Models that failed to load, per model",
            model_load_failures.clone(),
        );
        let registry_reloads = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_registry_reloads",
            "Model registry changes seen by an inferer, by result (applied, invalid)",
            registry_reloads.clone(),
        );
        let models_loaded = Gauge::default();
        registry.register(
            "radflow_models_loaded",
            "Models loaded, warmed up and serving in this process",
            models_loaded.clone(),
        );
        let store_errors = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_store_errors",
            "Object store operations that failed, per stage",
            store_errors.clone(),
        );
        let bus_errors = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_bus_errors",
            "Bus operations that failed, per stage",
            bus_errors.clone(),
        );
        let queue_pending = Family::<Labels, Gauge>::default();
        registry.register(
            "radflow_queue_pending_messages",
            "Messages waiting for a durable consumer (not yet delivered)",
            queue_pending.clone(),
        );
        let queue_in_flight = Family::<Labels, Gauge>::default();
        registry.register(
            "radflow_queue_in_flight_messages",
            "Messages delivered to a durable consumer and not yet acknowledged",
            queue_in_flight.clone(),
        );
        let queue_oldest = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "radflow_queue_oldest_pending_age_seconds",
            "Age of the oldest message a durable consumer has not finished",
            queue_oldest.clone(),
        );
        let exports = Family::<Labels, Counter>::default();
        registry.register(
            "radflow_exports",
            "Export attempts per destination, by outcome (sent, retry, refused, unroutable)",
            exports.clone(),
        );
        let export_last_success =
            Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "radflow_export_last_success_timestamp_seconds",
            "When a destination last stored a result (Unix time)",
            export_last_success.clone(),
        );
        Arc::new(Self {
            registry,
            messages,
            stage_seconds,
            phase_seconds,
            associations,
            associations_active,
            instances_stored,
            instance_bytes,
            cstore_seconds,
            store_flushes,
            journal_records,
            cstore_failures,
            series_ready,
            series_assembling,
            inference_seconds,
            inference_batch,
            execution_provider,
            model_info,
            model_load_failures,
            registry_reloads,
            models_loaded,
            store_errors,
            bus_errors,
            queue_pending,
            queue_in_flight,
            queue_oldest,
            exports,
            export_last_success,
            activity: Activity::default(),
        })
    }

    /// The text exposition of every metric.
    /// The Prometheus text exposition format (0.0.4), which every scraper and
    /// `promtool check metrics` read.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        openmetrics_to_text(&out)
    }

    pub fn message(&self, stage: &str, outcome: &str) {
        self.messages
            .get_or_create(&vec![
                ("stage", stage.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    pub fn stage_time(&self, stage: &str, seconds: f64) {
        self.stage_seconds
            .get_or_create(&vec![("stage", stage.to_owned())])
            .observe(seconds);
    }

    pub fn phase_time(&self, stage: &str, phase: &str, seconds: f64) {
        self.phase_seconds
            .get_or_create(&vec![
                ("stage", stage.to_owned()),
                ("phase", phase.to_owned()),
            ])
            .observe(seconds);
    }

    pub fn association(&self, result: &str) {
        self.associations
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    pub fn cstore_failure(&self, status: u16) {
        self.cstore_failures
            .get_or_create(&vec![("status", format!("0x{status:04X}"))])
            .inc();
    }

    /// One export attempt to `destination` ended with `outcome`.
    pub fn export(&self, destination: &str, outcome: &str) {
        self.exports
            .get_or_create(&vec![
                ("destination", destination.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
        if outcome == "sent" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.export_last_success
                .get_or_create(&vec![("destination", destination.to_owned())])
                .set(now);
        }
    }

    pub fn series_ready(&self, reason: &str) {
        self.series_ready
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    pub fn inference(&self, model: &str, seconds: f64, batch: usize) {
        let labels = vec![("model", model.to_owned())];
        self.inference_seconds
            .get_or_create(&labels)
            .observe(seconds);
        self.inference_batch
            .get_or_create(&labels)
            .observe(batch as f64);
    }

    pub fn provider(&self, model: &str, provider: &str) {
        self.execution_provider
            .get_or_create(&vec![
                ("model", model.to_owned()),
                ("provider", provider.to_owned()),
            ])
            .set(1);
    }

    /// A model version started (`serving`) or stopped serving.
    pub fn model_info(
        &self,
        model: &str,
        version: &str,
        sha256: &str,
        shadow: bool,
        serving: bool,
    ) {
        self.model_info
            .get_or_create(&vec![
                ("model", model.to_owned()),
                ("version", version.to_owned()),
                ("role", if shadow { "shadow" } else { "serving" }.to_owned()),
                ("sha256", sha256.to_owned()),
            ])
            .set(i64::from(serving));
    }

    /// A model stopped serving (removed or replaced): its provider gauge drops to 0.
    pub fn provider_unset(&self, model: &str, provider: &str) {
        self.execution_provider
            .get_or_create(&vec![
                ("model", model.to_owned()),
                ("provider", provider.to_owned()),
            ])
            .set(0);
    }

    pub fn registry_reload(&self, result: &str) {
        self.registry_reloads
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    pub fn models_loaded(&self, count: usize) {
        self.models_loaded.set(count as i64);
    }

    pub fn model_load_failure(&self, model: &str) {
        self.model_load_failures
            .get_or_create(&vec![("model", model.to_owned())])
            .inc();
    }

    /// One flush of a folder store (`journal`, `checkpoint`, `file` or `folder`).
    pub fn store_flush(&self, kind: &str) {
        self.store_flushes
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
    }

    pub fn store_error(&self, stage: &str) {
        self.store_errors
            .get_or_create(&vec![("stage", stage.to_owned())])
            .inc();
    }

    /// Lag of one durable consumer.
    pub fn queue(&self, consumer: &str, pending: u64, in_flight: u64, oldest_age_s: f64) {
        let labels = vec![("consumer", consumer.to_owned())];
        self.queue_pending
            .get_or_create(&labels)
            .set(pending as i64);
        self.queue_in_flight
            .get_or_create(&labels)
            .set(in_flight as i64);
        self.queue_oldest.get_or_create(&labels).set(oldest_age_s);
    }

    pub fn bus_error(&self, stage: &str) {
        self.bus_errors
            .get_or_create(&vec![("stage", stage.to_owned())])
            .inc();
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text (what `prometheus-client` encodes) as the classic
/// Prometheus text format: a counter family's `HELP`/`TYPE` lines carry the `_total`
/// name of its samples, and the OpenMetrics-only `UNIT` and `EOF` lines go.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let lines: Vec<&str> = openmetrics.lines().collect();
    let mut counters = std::collections::HashSet::new();
    for line in &lines {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_owned());
        }
    }
    for line in lines {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_counters_with_labels() {
        let m = super::Metrics::new();
        m.message("preprocessor", "processed");
        m.message("preprocessor", "processed");
        m.stage_time("preprocessor", 0.5);
        let text = m.render();
        assert!(
            text.contains(r#"radflow_messages_total{stage="preprocessor",outcome="processed"} 2"#),
            "{text}"
        );
        assert!(text.contains("radflow_stage_duration_seconds_bucket"));
        assert!(
            text.contains("# TYPE radflow_messages_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP radflow_messages_total "), "{text}");
        assert!(!text.contains("# EOF"));
    }
}
