//! What each export destination last did, kept on the bus so that `radflow status`
//! can show it in both modes and any exporter replica can add to it.
//!
//! One key per destination in the bucket [`EXPORT_STATE_BUCKET`]: when it last took a
//! result, when it last failed and why, and how many jobs it took and how many
//! attempts failed. Writers update by compare-and-set, so replicas never lose each
//! other's counts; a write that keeps losing the race is given up (the counts are
//! for operators; the export itself is tracked by the job's delivery, not by this).
//!
//! Reasons hold the destination, addresses and DICOM statuses, never patient data:
//! they are written by the exporter from its own errors, which name objects by store
//! key (UIDs) only.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bus::{Bus, BusError};

/// The key-value bucket holding one [`DestinationState`] per destination name.
pub const EXPORT_STATE_BUCKET: &str = "radflow-exports";

/// How often a write retries after losing the compare-and-set to another replica.
const CAS_TRIES: usize = 32;

/// One destination as seen by the exporters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationState {
    pub destination: String,
    /// Jobs the destination stored completely.
    pub sent: u64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    Sent,
    Failed(&'a str),
}

impl DestinationState {
    fn apply(&mut self, attempt: Attempt<'_>, at_ms: u64) {
        match attempt {
            Attempt::Sent => {
                self.sent += 1;
                self.last_success_ms = Some(at_ms);
            }
            Attempt::Failed(why) => {
                self.failed_attempts += 1;
                self.last_failure_ms = Some(at_ms);
                self.last_error = Some(why.chars().take(500).collect());
            }
        }
    }

    /// Whether the last thing that happened was a failure.
    pub fn failing(&self) -> bool {
        match (self.last_failure_ms, self.last_success_ms) {
            (Some(f), Some(s)) => f > s,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// Adds one attempt to the destination's state.
pub async fn record(
    bus: &dyn Bus,
    destination: &str,
    attempt: Attempt<'_>,
    at_ms: u64,
) -> Result<(), BusError> {
    let kv = bus.kv(EXPORT_STATE_BUCKET).await?;
    let key = key(destination);
    for _ in 0..CAS_TRIES {
        let current = kv.get(&key).await?;
        let mut state = current
            .as_ref()
            .and_then(|e| serde_json::from_slice::<DestinationState>(&e.value).ok())
            .unwrap_or_else(|| DestinationState {
                destination: destination.to_owned(),
                ..Default::default()
            });
        state.apply(attempt, at_ms);
        let value = Bytes::from(serde_json::to_vec(&state).expect("state serialises"));
        let written = match &current {
            Some(entry) => kv.update(&key, value, entry.revision).await?,
            None => kv.create(&key, value).await?,
        };
        if written.is_some() {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    Err(BusError::Unavailable(format!(
        "export state of {destination}: {CAS_TRIES} concurrent updates won over this one"
    )))
}

/// Every destination's state, by name.
pub async fn all(bus: &dyn Bus) -> Result<Vec<DestinationState>, BusError> {
    let mut states: Vec<DestinationState> = bus
        .kv(EXPORT_STATE_BUCKET)
        .await?
        .entries()
        .await?
        .into_iter()
        .filter_map(|(_, e)| serde_json::from_slice(&e.value).ok())
        .collect();
    states.sort_by(|a, b| a.destination.cmp(&b.destination));
    Ok(states)
}

/// Destination names are `[A-Za-z0-9_-]` (the destinations file checks), which NATS
/// key-value keys take as they are.
fn key(destination: &str) -> String {
    destination.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::InProcBus;

    #[tokio::test]
    async fn attempts_add_up_and_the_last_one_decides_failing() {
        let bus = InProcBus::new();
        record(
            &bus,
            "pacs",
            Attempt::Failed("pacs: connection refused"),
            10,
        )
        .await
        .unwrap();
        record(
            &bus,
            "pacs",
            Attempt::Failed("pacs: connection refused"),
            20,
        )
        .await
        .unwrap();
        let states = all(&bus).await.unwrap();
        assert_eq!(states.len(), 1);
        assert!(states[0].failing());
        assert_eq!(states[0].failed_attempts, 2);
        record(&bus, "pacs", Attempt::Sent, 30).await.unwrap();
        record(&bus, "archive", Attempt::Sent, 40).await.unwrap();
        let states = all(&bus).await.unwrap();
        let names: Vec<&str> = states.iter().map(|s| s.destination.as_str()).collect();
        assert_eq!(names, ["archive", "pacs"]);
        let pacs = &states[1];
        assert_eq!((pacs.sent, pacs.failed_attempts), (1, 2));
        assert_eq!(pacs.last_success_ms, Some(30));
        assert_eq!(pacs.last_error.as_deref(), Some("pacs: connection refused"));
        assert!(!pacs.failing());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_lose_no_count() {
        let bus = std::sync::Arc::new(InProcBus::new());
        let mut tasks = Vec::new();
        for i in 0..4u64 {
            let bus = bus.clone();
            tasks.push(tokio::spawn(async move {
                for j in 0..5 {
                    record(&*bus, "pacs", Attempt::Sent, i * 10 + j)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(all(&*bus).await.unwrap()[0].sent, 20);
    }
}
