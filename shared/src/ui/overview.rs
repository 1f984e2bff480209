//! What the web page shows, as one JSON document (`/ui/overview.json`): queues and lag
//! per lane, series being assembled, recent results with their label volumes and
//! preview, dead letters with their reasons.
//!
//! Every row is built field by field from a whitelist of typed values (UIDs, modality,
//! counts, model, volumes, times, reason codes); nothing is passed through from the
//! stored JSON, so an attribute that a future version writes into the series state or
//! an event can reach the page only when a line here names it. Patient names, IDs,
//! birth dates and accession numbers are never among them.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::bus::{self, Bus, BusError, DLQ, RESULTS, SERIES_STATE_BUCKET};
use crate::events::{self, InferenceCompleted, Lane};
use crate::status::Failure;
use crate::store::Store;
use crate::util::now_ms;

/// How many recent results and dead letters the page lists.
pub const RECENT: usize = 20;
/// How many series being assembled the page lists (the most recently active).
pub const ASSEMBLING: usize = 100;

/// The whole page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// The server's clock, so that ages do not depend on the browser's.
    pub generated_at_ms: u64,
    /// `nats` or `in-process`.
    pub bus: String,
    pub queues: Vec<Queue>,
    pub assembling: Vec<Assembling>,
    /// Newest first.
    pub results: Vec<ResultRow>,
    /// Newest first.
    pub dead_letters: Vec<Failure>,
}

/// One durable consumer: the work that waits for a stage in one lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub stream: String,
    pub consumer: String,
    pub lane: Lane,
    /// Not yet delivered.
    pub waiting: u64,
    /// Delivered, not yet acknowledged.
    pub in_flight: u64,
    pub redelivered: u64,
    /// Age of the oldest message not yet finished: the lag.
    pub oldest_ms: Option<u64>,
}

/// A series whose instances are still arriving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assembling {
    pub series_uid: String,
    pub modality: String,
    pub revision: u64,
    pub instances: u64,
    /// The instance count the data announced, if it did.
    pub expected: Option<u64>,
    /// Time since the last instance arrived.
    pub quiet_for_ms: u64,
}

/// One label's volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRow {
    pub name: String,
    pub volume_ml: f64,
}

/// One class's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassRow {
    pub name: String,
    pub score: f64,
    pub positive: Option<bool>,
}

/// A recent result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    pub series_uid: String,
    pub revision: u32,
    /// From the series state; empty when that is gone.
    pub modality: String,
    pub model: String,
    pub model_version: String,
    pub provider: String,
    /// Written by a version on trial.
    pub shadow: bool,
    pub labels: Vec<LabelRow>,
    pub classes: Vec<ClassRow>,
    /// The preview, relative to the page (`/ui/`).
    pub preview: String,
    /// The inferer's time for the job (`timings_ms.total` of `summary.json`), when
    /// the store could be read.
    pub took_ms: Option<f64>,
    /// When the result was announced.
    pub at_ms: u64,
}

/// The inferer's time of results already looked up, by result and revision: a
/// result's `summary.json` is read once, not at every refresh of every viewer.
#[derive(Default)]
pub struct Durations(Mutex<HashMap<(String, u32), f64>>);

/// How many durations are remembered before the memory starts afresh (results are
/// listed newest first, so the ones on the page are soon read again).
const DURATIONS_KEPT: usize = 1024;

impl Durations {
    async fn fill(&self, store: &Store, rows: &mut [ResultRow]) {
        let reads = rows.iter_mut().map(|row| async move {
            let model_ref = format!("{}@{}", row.model, row.model_version);
            let key = (
                Store::result_prefix(&row.series_uid, &model_ref),
                row.revision,
            );
            if let Some(ms) = self.0.lock().unwrap().get(&key) {
                row.took_ms = Some(*ms);
                return;
            }
            let summary = store
                .get(&Store::result_key(
                    &row.series_uid,
                    &model_ref,
                    "summary.json",
                ))
                .await;
            let ms = summary.ok().and_then(|bytes| {
                let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
                v["timings_ms"]["total"].as_f64()
            });
            if let Some(ms) = ms {
                let mut known = self.0.lock().unwrap();
                if known.len() >= DURATIONS_KEPT {
                    known.clear();
                }
                known.insert(key, ms);
            }
            row.took_ms = ms;
        });
        futures::future::join_all(reads).await;
    }
}

/// The lane of a consumer, from the subject suffix of its filter.
fn lane_of(filter: &str) -> Lane {
    for lane in [Lane::Stat, Lane::Batch] {
        if filter.ends_with(lane.suffix()) {
            return lane;
        }
    }
    Lane::Routine
}

/// Builds the page's document from the bus, and the inferer's times from the store.
pub async fn collect(
    bus: &dyn Bus,
    store: Option<&Store>,
    durations: &Durations,
) -> Result<Overview, BusError> {
    let now = now_ms();
    let streams = bus.streams().await?;
    let queues = streams
        .iter()
        .flat_map(|s| {
            s.consumers.iter().map(|c| Queue {
                stream: s.name.clone(),
                consumer: c.name.clone(),
                lane: lane_of(&c.filter),
                waiting: c.pending,
                in_flight: c.ack_pending,
                redelivered: c.redelivered,
                oldest_ms: c.oldest_pending_age_ms,
            })
        })
        .collect();

    let mut modality = HashMap::new();
    let mut assembling = Vec::new();
    for (key, entry) in bus.kv(SERIES_STATE_BUCKET).await?.entries().await? {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&entry.value) else {
            continue;
        };
        let series_uid = v["series_uid"].as_str().unwrap_or(&key).to_owned();
        let m = v["modality"].as_str().unwrap_or_default().to_owned();
        if !v["emitted"].as_bool().unwrap_or(false) {
            assembling.push(Assembling {
                series_uid: series_uid.clone(),
                modality: m.clone(),
                revision: v["revision"].as_u64().unwrap_or(0),
                instances: v["instances"].as_u64().unwrap_or(0),
                expected: v["expected"].as_u64(),
                quiet_for_ms: now.saturating_sub(v["last_instance_ms"].as_u64().unwrap_or(now)),
            });
        }
        modality.insert(series_uid, m);
    }
    assembling
        .sort_by(|a, b| (a.quiet_for_ms, &a.series_uid).cmp(&(b.quiet_for_ms, &b.series_uid)));
    assembling.truncate(ASSEMBLING);

    let mut results: Vec<ResultRow> = bus::last_messages(bus, RESULTS, RECENT)
        .await?
        .into_iter()
        .rev()
        .filter_map(|m| {
            let e: InferenceCompleted = events::decode(&m.payload).ok()?;
            Some(result_row(e, &modality, m.time_ms))
        })
        .collect();
    if let Some(store) = store {
        durations.fill(store, &mut results).await;
    }
    let dead_letters = bus::last_messages(bus, DLQ, RECENT)
        .await?
        .iter()
        .rev()
        .filter_map(crate::status::failure)
        .collect();
    Ok(Overview {
        generated_at_ms: now,
        bus: bus.kind().to_owned(),
        queues,
        assembling,
        results,
        dead_letters,
    })
}

fn result_row(e: InferenceCompleted, modality: &HashMap<String, String>, at_ms: u64) -> ResultRow {
    let preview = format!(
        "results/{}/{}@{}/preview.png?rev={}",
        e.series_uid, e.model, e.model_version, e.revision
    );
    ResultRow {
        modality: modality.get(&e.series_uid).cloned().unwrap_or_default(),
        labels: e
            .labels
            .into_iter()
            .map(|l| LabelRow {
                name: l.name,
                volume_ml: l.volume_ml,
            })
            .collect(),
        classes: e
            .classes
            .into_iter()
            .map(|c| ClassRow {
                name: c.name,
                score: c.score,
                positive: c.positive,
            })
            .collect(),
        series_uid: e.series_uid,
        revision: e.revision,
        model: e.model,
        model_version: e.model_version,
        provider: e.provider,
        shadow: e.shadow,
        preview,
        took_ms: None,
        at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{ConsumerSpec, InProcBus, JOBS, publish_event};
    use crate::events::{DeadLettered, LabelVolume, SCHEMA_VERSION};

    /// Demographics as a source file would hold them.
    const DEMOGRAPHICS: &[&str] = &[
        "Zwetschgenbaum^Hildegard",
        "PID-83746251",
        "19410317",
        "ACC99283715",
    ];

    fn result(series: &str) -> InferenceCompleted {
        InferenceCompleted {
            schema_version: SCHEMA_VERSION,
            correlation_id: "c1".into(),
            study_uid: "1.2".into(),
            series_uid: series.into(),
            revision: 2,
            model: "demo-tissue".into(),
            model_version: "1.0.0".into(),
            model_sha256: "0".repeat(64),
            provider: "cpu".into(),
            result_prefix: format!("results/{series}/demo-tissue@1.0.0/"),
            labels: vec![LabelVolume {
                index: 1,
                name: "fat".into(),
                voxels: 100,
                volume_ml: 12.5,
            }],
            classes: Vec::new(),
            shadow: false,
            calling_ae: "CT-SCANNER".into(),
            dicom: Vec::new(),
        }
    }

    /// Everything the page shows comes from named fields only: series state, events
    /// and dead letters that carry demographics (as an older or newer writer, or a
    /// dead letter's copy of the original message, might) do not bring them along.
    #[tokio::test]
    async fn shows_uids_counts_models_and_volumes_never_demographics() {
        let bus = InProcBus::new();
        let kv = bus.kv(SERIES_STATE_BUCKET).await.unwrap();
        let state = |series: &str, emitted: bool| {
            serde_json::json!({
                "study_uid": "1.2", "series_uid": series, "modality": "CT",
                "revision": 1, "instances": 7, "expected": 12, "emitted": emitted,
                "last_instance_ms": now_ms(), "correlation_id": "c1",
                "patient_name": DEMOGRAPHICS[0], "patient_id": DEMOGRAPHICS[1],
                "PatientBirthDate": DEMOGRAPHICS[2], "accession_number": DEMOGRAPHICS[3],
            })
            .to_string()
            .into()
        };
        kv.create("1.2.3", state("1.2.3", false)).await.unwrap();
        kv.create("1.2.4", state("1.2.4", true)).await.unwrap();
        // An event whose JSON carries extra attributes (unknown fields are ignored).
        let mut ev = serde_json::to_value(result("1.2.4")).unwrap();
        ev["patient_name"] = DEMOGRAPHICS[0].into();
        bus.publish(bus::Outgoing {
            subject: "radflow.result.demo-tissue".into(),
            msg_id: "r1".into(),
            correlation_id: "c1".into(),
            payload: ev.to_string().into(),
        })
        .await
        .unwrap();
        publish_event(
            &bus,
            &DeadLettered {
                schema_version: SCHEMA_VERSION,
                correlation_id: "c2".into(),
                stage: "preprocessor".into(),
                code: "bad_geometry".into(),
                reason: "slice 3 has no Image Position (Patient)".into(),
                attempts: 1,
                original_subject: "radflow.series.ready".into(),
                original: serde_json::json!({
                    "series_uid": "1.2.5", "patient_name": DEMOGRAPHICS[0],
                    "accession_number": DEMOGRAPHICS[3],
                }),
                at_ms: 1,
            },
        )
        .await
        .unwrap();
        let _sub = bus
            .subscribe(&ConsumerSpec::new(JOBS, "inferer-demo-tissue").in_lane(Lane::Stat))
            .await
            .unwrap();

        let store = Store::memory();
        let summary =
            serde_json::json!({"timings_ms": {"total": 1234.5}, "patient_name": DEMOGRAPHICS[0]});
        store
            .put_result(
                "1.2.4",
                "demo-tissue@1.0.0",
                "summary.json",
                summary.to_string().into(),
            )
            .await
            .unwrap();
        let durations = Durations::default();
        let view = collect(&bus, Some(&store), &durations).await.unwrap();
        let text = serde_json::to_string(&view).unwrap();
        for needle in DEMOGRAPHICS {
            assert!(!text.contains(needle), "{needle} in {text}");
        }
        // The check can tell: the sources did hold them.
        let raw = kv.get("1.2.3").await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&raw.value).contains(DEMOGRAPHICS[0]));

        assert_eq!(view.assembling.len(), 1, "{text}");
        let a = &view.assembling[0];
        assert_eq!(
            (
                a.series_uid.as_str(),
                a.modality.as_str(),
                a.instances,
                a.expected
            ),
            ("1.2.3", "CT", 7, Some(12))
        );
        assert_eq!(view.results.len(), 1, "{text}");
        let r = &view.results[0];
        assert_eq!(r.modality, "CT");
        assert_eq!(r.took_ms, Some(1234.5));
        // Read once: a later view takes the time from memory.
        store
            .delete("results/1.2.4/demo-tissue@1.0.0/summary.json")
            .await
            .unwrap();
        let again = collect(&bus, Some(&store), &durations).await.unwrap();
        assert_eq!(again.results[0].took_ms, Some(1234.5));
        assert_eq!(
            r.labels,
            [LabelRow {
                name: "fat".into(),
                volume_ml: 12.5
            }]
        );
        assert_eq!(
            r.preview,
            "results/1.2.4/demo-tissue@1.0.0/preview.png?rev=2"
        );
        assert_eq!(view.dead_letters.len(), 1, "{text}");
        let d = &view.dead_letters[0];
        assert_eq!(
            (d.code.as_str(), d.series_uid.as_str()),
            ("bad_geometry", "1.2.5")
        );
        let q = view
            .queues
            .iter()
            .find(|q| q.consumer == "inferer-demo-tissue-stat")
            .unwrap_or_else(|| panic!("no stat queue in {text}"));
        assert_eq!((q.stream.as_str(), q.lane), ("RADFLOW_JOBS", Lane::Stat));
    }

    #[test]
    fn lanes_from_filters() {
        assert_eq!(lane_of("radflow.series.ready.stat"), Lane::Stat);
        assert_eq!(lane_of("radflow.job.demo-tissue.batch"), Lane::Batch);
        assert_eq!(lane_of("radflow.job.demo-tissue"), Lane::Routine);
        assert_eq!(lane_of("radflow.instance.>"), Lane::Routine);
    }
}
