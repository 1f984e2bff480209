//! What an operator needs to see at a glance: where studies wait, what is being
//! assembled, what finished and what failed, and the tools to act on dead letters.
//!
//! The same report comes from the JetStream API (distributed mode, `radflow status
//! --nats-url …`, optionally enriched by the NATS monitoring endpoint's `/varz` and
//! `/jsz`) or from a running embedded process over HTTP (`/status`), because both are
//! computed here from a [`Bus`].

use serde::{Deserialize, Serialize};

use crate::bus::{
    self, Bus, BusError, DLQ, EXPORTS, Outgoing, RESULTS, SERIES_STATE_BUCKET, StoredMessage,
    StreamStatus,
};
use crate::events::{self, DeadLettered, InferenceCompleted};
use crate::export_state::{self, DestinationState};
use crate::util::now_ms;

/// A series whose instances are still arriving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssemblingSeries {
    pub series_uid: String,
    pub revision: u64,
    pub instances: u64,
    /// Time since the last instance arrived.
    pub quiet_for_ms: u64,
}

/// A recent result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentResult {
    pub series_uid: String,
    pub model: String,
    pub provider: String,
    pub correlation_id: String,
    pub at_ms: u64,
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Sequence in the dead-letter stream: what `radflow dlq replay --seq` takes.
    pub seq: u64,
    pub stage: String,
    pub code: String,
    pub reason: String,
    pub series_uid: String,
    pub attempts: u64,
    pub correlation_id: String,
    pub at_ms: u64,
}

/// The NATS server as its monitoring endpoint describes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    pub connections: u64,
    pub mem_bytes: u64,
    pub jetstream_streams: u64,
    pub jetstream_consumers: u64,
    pub jetstream_messages: u64,
    pub jetstream_bytes: u64,
}

/// One export destination: what waits for it, what it last did, what was given up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStatus {
    #[serde(flatten)]
    pub state: DestinationState,
    /// Export jobs queued for it (not yet stored there).
    pub waiting: u64,
    /// Its jobs in the dead-letter stream.
    pub dead_letters: u64,
}

/// How many messages of a stream are read to count exports per destination.
const EXPORT_SCAN: usize = 10_000;

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub generated_at_ms: u64,
    /// `nats` or `in-process`.
    pub bus: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerInfo>,
    pub streams: Vec<StreamStatus>,
    pub assembling: Vec<AssemblingSeries>,
    /// Series and jobs being worked on now (delivered, not yet acknowledged).
    pub in_flight: u64,
    pub recent_results: Vec<RecentResult>,
    pub recent_failures: Vec<Failure>,
    /// Per export destination (absent from reports of older versions).
    #[serde(default)]
    pub exports: Vec<ExportStatus>,
}

/// Builds the report from the bus; `recent` bounds the result and failure lists.
pub async fn collect(bus: &dyn Bus, recent: usize) -> Result<StatusReport, BusError> {
    let streams = bus.streams().await?;
    let in_flight = streams
        .iter()
        .filter(|s| s.name == bus::SERIES.name || s.name == bus::JOBS.name)
        .flat_map(|s| s.consumers.iter())
        .map(|c| c.ack_pending)
        .sum();
    let now = now_ms();
    let mut assembling = Vec::new();
    for (key, entry) in bus.kv(SERIES_STATE_BUCKET).await?.entries().await? {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&entry.value) else {
            continue;
        };
        if v["emitted"].as_bool().unwrap_or(false) {
            continue;
        }
        assembling.push(AssemblingSeries {
            series_uid: v["series_uid"].as_str().unwrap_or(&key).to_owned(),
            revision: v["revision"].as_u64().unwrap_or(0),
            instances: v["instances"].as_u64().unwrap_or(0),
            quiet_for_ms: now.saturating_sub(v["last_instance_ms"].as_u64().unwrap_or(now)),
        });
    }
    assembling.sort_by(|a, b| a.series_uid.cmp(&b.series_uid));
    let recent_results = bus::last_messages(bus, RESULTS, recent)
        .await?
        .into_iter()
        .rev()
        .filter_map(|m| {
            let e: InferenceCompleted = events::decode(&m.payload).ok()?;
            Some(RecentResult {
                series_uid: e.series_uid,
                model: format!("{}@{}", e.model, e.model_version),
                provider: e.provider,
                correlation_id: e.correlation_id,
                at_ms: m.time_ms,
            })
        })
        .collect();
    let recent_failures = bus::last_messages(bus, DLQ, recent)
        .await?
        .iter()
        .rev()
        .filter_map(failure)
        .collect();
    let exports = exports(bus).await?;
    Ok(StatusReport {
        exports,
        generated_at_ms: now,
        bus: bus.kind().to_owned(),
        server: None,
        streams,
        assembling,
        in_flight,
        recent_results,
        recent_failures,
    })
}

/// Every destination that has a state, a queued job or a dead letter.
async fn exports(bus: &dyn Bus) -> Result<Vec<ExportStatus>, BusError> {
    use std::collections::BTreeMap;
    fn slot<'a>(
        by_name: &'a mut BTreeMap<String, ExportStatus>,
        name: &str,
    ) -> &'a mut ExportStatus {
        by_name
            .entry(name.to_owned())
            .or_insert_with(|| ExportStatus {
                state: DestinationState {
                    destination: name.to_owned(),
                    ..Default::default()
                },
                waiting: 0,
                dead_letters: 0,
            })
    }
    let mut by_name = BTreeMap::new();
    for state in export_state::all(bus).await? {
        let name = state.destination.clone();
        slot(&mut by_name, &name).state = state;
    }
    let prefix = format!("{}.export.", events::SUBJECT_PREFIX);
    for m in bus.read(EXPORTS, 0, EXPORT_SCAN).await? {
        if let Some(name) = m.subject.strip_prefix(&prefix) {
            slot(&mut by_name, name).waiting += 1;
        }
    }
    for m in bus::last_messages(bus, DLQ, EXPORT_SCAN).await? {
        let Ok(dead) = events::decode::<DeadLettered>(&m.payload) else {
            continue;
        };
        if let Some(name) = dead.original["destination"].as_str()
            && dead.original_subject.starts_with(&prefix)
        {
            slot(&mut by_name, name).dead_letters += 1;
        }
    }
    Ok(by_name.into_values().collect())
}

pub(crate) fn failure(m: &StoredMessage) -> Option<Failure> {
    let e: DeadLettered = events::decode(&m.payload).ok()?;
    Some(Failure {
        seq: m.seq,
        series_uid: e.original["series_uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        stage: e.stage,
        code: e.code,
        reason: e.reason,
        attempts: e.attempts,
        correlation_id: e.correlation_id,
        at_ms: m.time_ms,
    })
}

/// Every dead letter, oldest first (at most `max`).
pub async fn dead_letters(bus: &dyn Bus, max: usize) -> Result<Vec<Failure>, BusError> {
    Ok(bus
        .read(DLQ, 0, max)
        .await?
        .iter()
        .filter_map(failure)
        .collect())
}

/// Puts dead letters back on their original subjects (one by sequence, or all) and
/// removes them from the dead-letter stream. Returns how many were replayed.
pub async fn replay(bus: &dyn Bus, seq: Option<u64>) -> Result<usize, BusError> {
    let messages = match seq {
        Some(seq) => bus
            .read(DLQ, seq, 1)
            .await?
            .into_iter()
            .filter(|m| m.seq == seq)
            .collect(),
        None => bus.read(DLQ, 0, usize::MAX).await?,
    };
    let mut replayed = 0;
    for m in messages {
        let Ok(e) = events::decode::<DeadLettered>(&m.payload) else {
            continue;
        };
        let payload = match &e.original {
            serde_json::Value::String(s) => s.clone().into_bytes(),
            other => serde_json::to_vec(other).expect("JSON values serialise"),
        };
        bus.publish(Outgoing {
            subject: e.original_subject.clone(),
            // A new id: the original one may still be inside the duplicate window.
            msg_id: format!("replay:{}:{}", e.stage, m.seq),
            correlation_id: e.correlation_id.clone(),
            payload: payload.into(),
        })
        .await?;
        bus.remove(DLQ, m.seq).await?;
        replayed += 1;
    }
    Ok(replayed)
}

/// Exports the lag of the named consumers as metrics every `interval` until
/// `shutdown` (each stage reports its own consumers, so no series is doubled).
pub async fn report_lag(
    bus: std::sync::Arc<dyn Bus>,
    consumers: Vec<String>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match bus.streams().await {
            Ok(streams) => {
                for c in streams.iter().flat_map(|s| s.consumers.iter()) {
                    if consumers.contains(&c.name) {
                        let oldest = c.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0;
                        metrics.queue(&c.name, c.pending, c.ack_pending, oldest);
                    }
                }
            }
            Err(e) => {
                metrics.bus_error("status");
                tracing::debug!(error = %e, "cannot read consumer lag");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Reads `/varz` and `/jsz` from a NATS monitoring endpoint (`http://nats:8222`).
pub async fn server_info(monitor_url: &str) -> Result<ServerInfo, String> {
    let base = monitor_url.trim_end_matches('/');
    let get = |path: &'static str| {
        let url = format!("{base}{path}");
        async move {
            let resp = reqwest::get(&url)
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            resp.json::<serde_json::Value>()
                .await
                .map_err(|e| format!("{url}: {e}"))
        }
    };
    let varz = get("/varz").await?;
    let jsz = get("/jsz").await?;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Ok(ServerInfo {
        version: varz["version"].as_str().unwrap_or_default().to_owned(),
        connections: n(&varz["connections"]),
        mem_bytes: n(&varz["mem"]),
        jetstream_streams: n(&jsz["streams"]),
        jetstream_consumers: n(&jsz["consumers"]),
        jetstream_messages: n(&jsz["messages"]),
        jetstream_bytes: n(&jsz["bytes"]),
    })
}

fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn short(uid: &str) -> String {
    if uid.len() <= 28 {
        uid.to_owned()
    } else {
        format!("…{}", &uid[uid.len() - 27..])
    }
}

/// One screen of text.
pub fn render(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = write!(out, "radflow status — bus: {}", r.bus);
    if let Some(s) = &r.server {
        let _ = write!(
            out,
            " (nats-server {}, {} connections, {} streams, {} consumers, {} messages)",
            s.version,
            s.connections,
            s.jetstream_streams,
            s.jetstream_consumers,
            s.jetstream_messages
        );
    }
    out.push_str("\n\n");
    let _ = writeln!(
        out,
        "{:<18} {:>7} {:<22} {:>8} {:>9} {:>11} {:>8}",
        "STREAM", "MSGS", "CONSUMER", "PENDING", "IN FLIGHT", "REDELIVERED", "OLDEST"
    );
    for s in &r.streams {
        if s.consumers.is_empty() {
            let _ = writeln!(out, "{:<18} {:>7} {:<22}", s.name, s.messages, "-");
        }
        for (i, c) in s.consumers.iter().enumerate() {
            let _ = writeln!(
                out,
                "{:<18} {:>7} {:<22} {:>8} {:>9} {:>11} {:>8}",
                if i == 0 { s.name.as_str() } else { "" },
                if i == 0 {
                    s.messages.to_string()
                } else {
                    String::new()
                },
                c.name,
                c.pending,
                c.ack_pending,
                c.redelivered,
                c.oldest_pending_age_ms
                    .map(age)
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    let _ = writeln!(out, "\nIn flight: {}", r.in_flight);
    let _ = writeln!(out, "Series being assembled: {}", r.assembling.len());
    for a in &r.assembling {
        let _ = writeln!(
            out,
            "  {}  rev {}  {} instances  quiet for {}",
            short(&a.series_uid),
            a.revision,
            a.instances,
            age(a.quiet_for_ms)
        );
    }
    let _ = writeln!(out, "Recent results: {}", r.recent_results.len());
    for x in &r.recent_results {
        let _ = writeln!(
            out,
            "  {}  {}  {}  {} ago",
            short(&x.series_uid),
            x.model,
            x.provider,
            age(r.generated_at_ms.saturating_sub(x.at_ms))
        );
    }
    if !r.exports.is_empty() {
        let _ = writeln!(
            out,
            "Exports:\n  {:<16} {:>7} {:>6} {:>6} {:>5} {:>12}  LAST ERROR",
            "DESTINATION", "WAITING", "SENT", "FAILED", "DEAD", "LAST SENT"
        );
        for e in &r.exports {
            let s = &e.state;
            let last_sent = s
                .last_success_ms
                .map(|t| format!("{} ago", age(r.generated_at_ms.saturating_sub(t))))
                .unwrap_or_else(|| "never".into());
            let last_error = match (s.failing(), &s.last_error, s.last_failure_ms) {
                (true, Some(why), Some(t)) => {
                    format!("{why} ({} ago)", age(r.generated_at_ms.saturating_sub(t)))
                }
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {:<16} {:>7} {:>6} {:>6} {:>5} {:>12}  {}",
                s.destination,
                e.waiting,
                s.sent,
                s.failed_attempts,
                e.dead_letters,
                last_sent,
                last_error
            );
        }
    }
    let _ = writeln!(out, "Recent failures: {}", r.recent_failures.len());
    for f in &r.recent_failures {
        let _ = writeln!(out, "  {}", render_failure(f, r.generated_at_ms));
    }
    out
}

/// One dead letter on one line.
pub fn render_failure(f: &Failure, now_ms: u64) -> String {
    format!(
        "#{} {} {} [{}] {} (series {}, {} attempt{}, {} ago)",
        f.seq,
        f.stage,
        f.code,
        f.correlation_id,
        f.reason,
        short(&f.series_uid),
        f.attempts,
        if f.attempts == 1 { "" } else { "s" },
        age(now_ms.saturating_sub(f.at_ms))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{InProcBus, publish_event};
    use crate::events::SCHEMA_VERSION;

    fn dead(code: &str) -> DeadLettered {
        DeadLettered {
            schema_version: SCHEMA_VERSION,
            correlation_id: "c1".into(),
            stage: "preprocessor".into(),
            code: code.into(),
            reason: "slices have 2 different matrix sizes".into(),
            attempts: 1,
            original_subject: "radflow.series.ready".into(),
            original: serde_json::json!({"series_uid": "1.2.3", "schema_version": 1}),
            at_ms: 1,
        }
    }

    #[tokio::test]
    async fn report_lists_failures_and_replay_puts_them_back() {
        let bus = InProcBus::new();
        publish_event(&bus, &dead("bad_geometry")).await.unwrap();
        let report = collect(&bus, 10).await.unwrap();
        assert_eq!(report.recent_failures.len(), 1);
        let f = &report.recent_failures[0];
        assert_eq!(
            (f.code.as_str(), f.series_uid.as_str()),
            ("bad_geometry", "1.2.3")
        );
        let text = render(&report);
        assert!(text.contains("bad_geometry"), "{text}");
        assert!(text.contains("RADFLOW_DLQ"), "{text}");

        assert_eq!(replay(&bus, Some(f.seq)).await.unwrap(), 1);
        assert!(dead_letters(&bus, 10).await.unwrap().is_empty());
        let series = bus.read(bus::SERIES, 0, 10).await.unwrap();
        assert_eq!(series.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&series[0].payload).unwrap();
        assert_eq!(v["series_uid"], "1.2.3");
    }

    #[tokio::test]
    async fn exports_show_what_waits_what_was_sent_and_what_was_given_up() {
        let bus = InProcBus::new();
        let job = |dest: &str, series: &str| events::ExportRequested {
            schema_version: SCHEMA_VERSION,
            correlation_id: "c1".into(),
            study_uid: "1.2".into(),
            series_uid: series.into(),
            revision: 1,
            model: "m".into(),
            model_version: "1".into(),
            destination: dest.into(),
            result_prefix: "results/x/".into(),
            objects: Vec::new(),
        };
        publish_event(&bus, &job("pacs", "1.2.3")).await.unwrap();
        publish_event(&bus, &job("pacs", "1.2.4")).await.unwrap();
        let failed = job("archive", "1.2.5");
        let mut dead = dead("retries_exhausted");
        dead.stage = "exporter".into();
        dead.original_subject = events::Event::subject(&failed);
        dead.original = serde_json::to_value(&failed).unwrap();
        publish_event(&bus, &dead).await.unwrap();
        export_state::record(
            &bus,
            "archive",
            export_state::Attempt::Failed("archive: connection refused"),
            5,
        )
        .await
        .unwrap();
        export_state::record(&bus, "pacs", export_state::Attempt::Sent, 7)
            .await
            .unwrap();

        let report = collect(&bus, 10).await.unwrap();
        let rows: Vec<(&str, u64, u64, u64)> = report
            .exports
            .iter()
            .map(|e| {
                (
                    e.state.destination.as_str(),
                    e.waiting,
                    e.state.sent,
                    e.dead_letters,
                )
            })
            .collect();
        assert_eq!(rows, [("archive", 0, 0, 1), ("pacs", 2, 1, 0)]);
        let text = render(&report);
        assert!(text.contains("archive: connection refused"), "{text}");
        let pacs_line = text
            .lines()
            .find(|l| l.trim_start().starts_with("pacs"))
            .unwrap();
        assert!(
            pacs_line.trim_end().ends_with('-'),
            "pacs is not failing: {text}"
        );
        // Reports of versions without exports still parse.
        let mut old = serde_json::to_value(&report).unwrap();
        old.as_object_mut().unwrap().remove("exports");
        let back: StatusReport = serde_json::from_value(old).unwrap();
        assert!(back.exports.is_empty());
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(age(250), "250ms");
        assert_eq!(age(12_300), "12.3s");
        assert_eq!(age(125_000), "2m05s");
        assert_eq!(age(7_500_000), "2h05m");
    }
}
