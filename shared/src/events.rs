//! The events that connect the stages, defined once.
//!
//! Every event is JSON with a `schema_version`, names a past fact, knows its subject
//! and derives its `Nats-Msg-Id` from its content identity (series UID, revision,
//! model@version), so a re-published duplicate is dropped by the server and a redone
//! step produces the same message. Events carry UIDs and technical facts only: no
//! patient names, IDs, birth dates or accession numbers.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Version of the event schema; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Subject prefix of every radflow subject.
pub const SUBJECT_PREFIX: &str = "radflow";

/// A typed event: subject, identity and correlation.
pub trait Event: Serialize + DeserializeOwned + Send + Sync {
    /// The subject it is published on.
    fn subject(&self) -> String;
    /// Content identity, used as `Nats-Msg-Id` (duplicate suppression).
    fn msg_id(&self) -> String;
    /// The id that joins the logs of every stage that handled one series revision.
    fn correlation_id(&self) -> &str;
}

/// Count hints a sender put in the data, used to decide that a series is complete
/// before the quiet period ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountHints {
    /// Images in Acquisition (0020,1002).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_in_acquisition: Option<u32>,
    /// Number of Series Related Instances (0020,1209).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series_related_instances: Option<u32>,
    /// Number of Frames (0028,0008).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number_of_frames: Option<u32>,
}

/// An instance was written to the store (and is therefore safe to acknowledge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStored {
    pub schema_version: u32,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    #[serde(default)]
    pub modality: String,
    /// Store key of the file.
    pub key: String,
    pub size_bytes: u64,
    pub calling_ae: String,
    pub called_ae: String,
    /// Unix milliseconds when the listener received it.
    pub received_at_ms: u64,
    #[serde(default)]
    pub hints: CountHints,
}

impl Event for InstanceStored {
    fn subject(&self) -> String {
        format!("{SUBJECT_PREFIX}.instance.stored")
    }
    fn msg_id(&self) -> String {
        format!("instance:{}", self.sop_instance_uid)
    }
    fn correlation_id(&self) -> &str {
        &self.series_uid
    }
}

/// Why a series was declared ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyReason {
    /// No new instance for the quiet period.
    Quiet,
    /// The association that sent it was released and a shorter quiet period passed.
    Released,
    /// The count hints in the data were reached.
    Complete,
    /// Re-queued at start-up because it had no result yet (embedded recovery).
    Recovered,
    /// Queued by `radflow score` for a series already in the store.
    Scored,
}

/// Priority of work. Each lane has its own subjects and durable consumers; workers
/// take `stat` first, `routine` next and `batch` only while both are empty, so
/// archive scoring never delays a study from a scanner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Urgent live work (e.g. from an emergency scanner's AE title).
    Stat,
    /// Live work from the listener.
    #[default]
    Routine,
    /// Bulk re-scoring of stored series.
    Batch,
}

impl Lane {
    /// The subject suffix of the lane: nothing for routine work, `.stat`, `.batch`.
    pub fn suffix(self) -> &'static str {
        match self {
            Lane::Stat => ".stat",
            Lane::Routine => "",
            Lane::Batch => ".batch",
        }
    }

    /// The suffix of the lane's durable consumer names (`preprocessor-stat`, …).
    pub fn durable_suffix(self) -> &'static str {
        match self {
            Lane::Stat => "-stat",
            Lane::Routine => "",
            Lane::Batch => "-batch",
        }
    }

    pub fn is_routine(&self) -> bool {
        *self == Lane::Routine
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lane::Stat => "stat",
            Lane::Routine => "routine",
            Lane::Batch => "batch",
        })
    }
}

/// A series revision has all the instances it is going to get (as far as anyone can
/// tell: DICOM has no "end of series").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesReady {
    pub schema_version: u32,
    pub correlation_id: String,
    pub study_uid: String,
    pub series_uid: String,
    /// Starts at 1; a late instance after `ready` starts the next revision.
    pub revision: u32,
    /// Instances received in this series so far (all revisions).
    pub instances: u32,
    #[serde(default)]
    pub modality: String,
    /// The called AE title that received the series (routing may depend on it).
    #[serde(default)]
    pub called_ae: String,
    #[serde(default)]
    pub calling_ae: String,
    pub reason: ReadyReason,
    /// Unix milliseconds.
    pub ready_at_ms: u64,
    /// The lane the series and its jobs travel in.
    #[serde(default, skip_serializing_if = "Lane::is_routine")]
    pub lane: Lane,
    /// Models to run (`name` or `name@version`), bypassing routing; empty: the routing
    /// rules of the registry decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

impl Event for SeriesReady {
    fn subject(&self) -> String {
        format!("{SUBJECT_PREFIX}.series.ready{}", self.lane.suffix())
    }
    fn msg_id(&self) -> String {
        if self.models.is_empty() {
            format!("series:{}:r{}", self.series_uid, self.revision)
        } else {
            format!(
                "series:{}:r{}:{}",
                self.series_uid,
                self.revision,
                self.models.join("+")
            )
        }
    }
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// A model-ready volume was written; one event per routed model: the inference job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeReady {
    pub schema_version: u32,
    pub correlation_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub revision: u32,
    pub model: String,
    pub model_version: String,
    pub preset: String,
    /// Store key of `volume.nii.gz`.
    pub volume_key: String,
    /// Store key of `meta.json`.
    pub meta_key: String,
    /// Problems that did not stop the volume (e.g. "suspect incomplete: gap at …").
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Why the series may be missing slices (a gap against its regular slice spacing),
    /// if it may; the volume was still built, and consumers decide what to trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_incomplete: Option<String>,
    /// The lane of the series this job comes from.
    #[serde(default, skip_serializing_if = "Lane::is_routine")]
    pub lane: Lane,
    /// Routed to a version on trial: its result is stored but announced as a shadow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// AE title of the node that sent the series (results can go back to it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub calling_ae: String,
}

impl VolumeReady {
    pub fn model_ref(&self) -> String {
        format!("{}@{}", self.model, self.model_version)
    }
}

impl Event for VolumeReady {
    fn subject(&self) -> String {
        format!("{SUBJECT_PREFIX}.job.{}{}", self.model, self.lane.suffix())
    }
    fn msg_id(&self) -> String {
        format!(
            "job:{}:r{}:{}@{}",
            self.series_uid, self.revision, self.model, self.model_version
        )
    }
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// Volume of one output label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelVolume {
    pub index: u8,
    pub name: String,
    pub voxels: u64,
    pub volume_ml: f64,
}

/// Result of one class of a classification model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub index: u8,
    pub name: String,
    /// Probability (after the model's activation) or raw score.
    pub score: f64,
    /// Whether the score reached the class threshold; absent when the class has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positive: Option<bool>,
}

/// A model ran on a series and its outputs are in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceCompleted {
    pub schema_version: u32,
    pub correlation_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub revision: u32,
    pub model: String,
    pub model_version: String,
    pub model_sha256: String,
    /// Execution provider that really ran the model (`cpu`, `cuda`, `tensorrt`).
    pub provider: String,
    /// Store prefix holding `summary.json`, `labels.nii.gz`, `preview.png`.
    pub result_prefix: String,
    /// Segmentation: volume per label.
    #[serde(default)]
    pub labels: Vec<LabelVolume>,
    /// Classification: score per class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassScore>,
    /// Produced by a version on trial (`shadow = true` in the registry): announced on
    /// `radflow.result.<model>.shadow`, so whatever forwards results ignores it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// AE title of the node that sent the series.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub calling_ae: String,
    /// The DICOM objects of the result (SEG, SR) in the store, for export.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dicom: Vec<DicomObject>,
}

/// One DICOM object of a result: where it is and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DicomObject {
    /// File name under the result prefix (`seg.dcm`, `sr.dcm`).
    pub file: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub series_instance_uid: String,
}

impl Event for InferenceCompleted {
    fn subject(&self) -> String {
        let shadow = if self.shadow { ".shadow" } else { "" };
        format!("{SUBJECT_PREFIX}.result.{}{shadow}", self.model)
    }
    fn msg_id(&self) -> String {
        format!(
            "result:{}:r{}:{}@{}",
            self.series_uid, self.revision, self.model, self.model_version
        )
    }
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// A result's DICOM objects are to be sent to one destination: the export job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRequested {
    pub schema_version: u32,
    pub correlation_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub revision: u32,
    pub model: String,
    pub model_version: String,
    /// Name of the destination (from the destinations file).
    pub destination: String,
    /// Store prefix of the result.
    pub result_prefix: String,
    /// The objects to send, in order (the SEG before the SR that references it).
    pub objects: Vec<DicomObject>,
}

impl Event for ExportRequested {
    fn subject(&self) -> String {
        format!("{SUBJECT_PREFIX}.export.{}", self.destination)
    }
    fn msg_id(&self) -> String {
        format!(
            "export:{}:r{}:{}@{}:{}",
            self.series_uid, self.revision, self.model, self.model_version, self.destination
        )
    }
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// A message that cannot succeed, parked with a machine-readable reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLettered {
    pub schema_version: u32,
    #[serde(default)]
    pub correlation_id: String,
    /// The stage that gave up (`assembler`, `preprocessor`, `inferer`).
    pub stage: String,
    /// Machine-readable reason, e.g. `unsupported_transfer_syntax`.
    pub code: String,
    /// Human-readable reason.
    pub reason: String,
    /// Deliveries made before giving up.
    pub attempts: u64,
    /// Subject the message was consumed from.
    pub original_subject: String,
    /// The original message, parsed as JSON when it was JSON.
    pub original: serde_json::Value,
    /// Unix milliseconds.
    pub at_ms: u64,
}

impl Event for DeadLettered {
    fn subject(&self) -> String {
        format!("{SUBJECT_PREFIX}.dlq.{}", self.stage)
    }
    fn msg_id(&self) -> String {
        let digest = crate::util::sha256_hex(self.original.to_string().as_bytes());
        format!("dlq:{}:{}:{}", self.stage, self.code, &digest[..16])
    }
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// Decodes an event, refusing a newer schema than this binary understands.
pub fn decode<E: Event>(payload: &[u8]) -> Result<E, DecodeError> {
    #[derive(Deserialize)]
    struct Version {
        schema_version: Option<u32>,
    }
    let v: Version = serde_json::from_slice(payload).map_err(DecodeError::Json)?;
    match v.schema_version {
        Some(SCHEMA_VERSION) => serde_json::from_slice(payload).map_err(DecodeError::Json),
        Some(other) => Err(DecodeError::Version(other)),
        None => Err(DecodeError::MissingVersion),
    }
}

/// An event payload that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event is not valid JSON for its type: {0}")]
    Json(serde_json::Error),
    #[error("event has schema_version {0}, this radflow understands {SCHEMA_VERSION}")]
    Version(u32),
    #[error("event has no schema_version field")]
    MissingVersion,
}

/// Serialises an event (infallible for these types).
pub fn encode<E: Event>(event: &E) -> bytes::Bytes {
    serde_json::to_vec(event)
        .expect("events serialise to JSON")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> SeriesReady {
        SeriesReady {
            schema_version: SCHEMA_VERSION,
            correlation_id: "c1".into(),
            study_uid: "1.2".into(),
            series_uid: "1.2.3".into(),
            revision: 2,
            instances: 10,
            modality: "CT".into(),
            called_ae: "RADFLOW".into(),
            calling_ae: "CT1".into(),
            reason: ReadyReason::Quiet,
            ready_at_ms: 1,
            lane: Lane::Routine,
            models: vec![],
        }
    }

    #[test]
    fn round_trip_and_identity() {
        let e = ready();
        let bytes = encode(&e);
        let back: SeriesReady = decode(&bytes).unwrap();
        assert_eq!(back, e);
        assert_eq!(e.subject(), "radflow.series.ready");
        assert_eq!(e.msg_id(), "series:1.2.3:r2");
    }

    #[test]
    fn refuses_other_schema_versions() {
        let mut v = serde_json::to_value(ready()).unwrap();
        v["schema_version"] = 99.into();
        let err = decode::<SeriesReady>(v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, DecodeError::Version(99)));
        v.as_object_mut().unwrap().remove("schema_version");
        assert!(matches!(
            decode::<SeriesReady>(v.to_string().as_bytes()),
            Err(DecodeError::MissingVersion)
        ));
    }

    #[test]
    fn job_subject_names_the_model() {
        let job = VolumeReady {
            schema_version: SCHEMA_VERSION,
            correlation_id: "c".into(),
            study_uid: "1".into(),
            series_uid: "1.2".into(),
            revision: 1,
            model: "demo-tissue".into(),
            model_version: "1.0.0".into(),
            preset: "p".into(),
            volume_key: "k".into(),
            meta_key: "m".into(),
            warnings: vec![],
            suspect_incomplete: None,
            lane: Lane::Routine,
            shadow: false,
            calling_ae: String::new(),
        };
        assert_eq!(job.subject(), "radflow.job.demo-tissue");
        assert_eq!(job.msg_id(), "job:1.2:r1:demo-tissue@1.0.0");
        let batch = VolumeReady {
            lane: Lane::Batch,
            ..job
        };
        assert_eq!(batch.subject(), "radflow.job.demo-tissue.batch");
        // The same job in another lane is still the same job.
        assert_eq!(batch.msg_id(), "job:1.2:r1:demo-tissue@1.0.0");
    }

    #[test]
    fn lanes_have_their_own_subjects_and_routine_events_keep_their_shape() {
        let routine = ready();
        let json = serde_json::to_value(&routine).unwrap();
        assert!(json.get("lane").is_none() && json.get("models").is_none());
        let stat = SeriesReady {
            lane: Lane::Stat,
            ..ready()
        };
        assert_eq!(stat.subject(), "radflow.series.ready.stat");
        let scored = SeriesReady {
            lane: Lane::Batch,
            models: vec!["demo-tissue@1.0.0".into()],
            reason: ReadyReason::Scored,
            ..ready()
        };
        assert_eq!(scored.subject(), "radflow.series.ready.batch");
        assert_eq!(scored.msg_id(), "series:1.2.3:r2:demo-tissue@1.0.0");
        let back: SeriesReady = decode(&encode(&scored)).unwrap();
        assert_eq!(back, scored);
    }
}
