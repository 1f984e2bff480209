//! Series assembly: deciding when a series has all its instances.
//!
//! DICOM has no "end of series" message. A series revision is declared ready when no
//! new instance arrived for the quiet period, sooner when the association that sent it
//! was released or when the count hints in the data were reached.
//!
//! The state lives in the bus's key-value bucket (JetStream KV in NATS mode), keyed by
//! Series Instance UID, and is only changed by compare-and-set, so:
//! - listener replicas stay stateless, and a crash loses no pending series (the
//!   `InstanceStored` events are durable and re-applied by whichever replica's
//!   assembler consumes them);
//! - two replicas that both see a quiet series publish the same `SeriesReady` with the
//!   same message id, which the bus deduplicates, and only one of them marks it;
//! - an instance that arrives after `ready` opens the next revision, which becomes ready
//!   in turn (the preprocessor rebuilds the series and overwrites its outputs);
//! - a SOP Instance UID seen before in the series (a sender's retry, or the same study
//!   sent twice) changes nothing: the state keeps a 64-bit digest of every instance UID
//!   (up to [`MAX_TRACKED_INSTANCES`]) and ignores repeats.
//!
//! Count hints: Number of Series Related Instances, else Images in Acquisition, is the
//! expected instance count; a multi-frame instance (Number of Frames > 1) without
//! either counts as a series of one. Reaching the expected count shortens the wait to
//! the short quiet period; an instance after that simply opens the next revision.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use radflow_shared::bus::{Bus, BusError, Delivery, Kv, SERIES_STATE_BUCKET, publish_event};
use radflow_shared::events::{
    self, InstanceStored, Lane, ReadyReason, SCHEMA_VERSION, SeriesReady,
};
use radflow_shared::metrics::Metrics;
use radflow_shared::util::now_ms;
use radflow_shared::worker::{HandleError, Handler, Outcome};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Instance digests kept per series for duplicate detection (8 bytes each in memory,
/// about 20 in the JSON state); beyond this, repeats of later instances are counted.
pub const MAX_TRACKED_INSTANCES: usize = 20_000;

/// The 64-bit digest of a SOP Instance UID kept in the series state.
pub fn instance_digest(sop_instance_uid: &str) -> u64 {
    let hex = radflow_shared::util::sha256_hex(sop_instance_uid.as_bytes());
    u64::from_str_radix(&hex[..16], 16).expect("hex digest")
}

/// When series become ready.
#[derive(Debug, Clone)]
pub struct AssemblyConfig {
    /// Quiet period after the last instance (`--series-quiet-secs`).
    pub quiet: Duration,
    /// Quiet period once the sending association was released, or the count hints
    /// were reached (never longer than `quiet`).
    pub short_quiet: Duration,
    /// Emitted series are forgotten after this long (a later instance then starts
    /// again at revision 1; outputs are keyed by series, so nothing duplicates).
    pub forget_after: Duration,
    /// Calling AE titles whose series travel in the stat lane (ahead of routine work).
    pub stat_calling_aes: Vec<String>,
}

impl AssemblyConfig {
    /// The lane of a series sent by `calling_ae`.
    pub fn lane(&self, calling_ae: &str) -> Lane {
        let ae = calling_ae.trim();
        if self
            .stat_calling_aes
            .iter()
            .any(|s| s.trim().eq_ignore_ascii_case(ae))
        {
            Lane::Stat
        } else {
            Lane::Routine
        }
    }
}

impl Default for AssemblyConfig {
    fn default() -> Self {
        Self {
            quiet: Duration::from_secs(10),
            short_quiet: Duration::from_secs(2),
            forget_after: Duration::from_secs(24 * 3600),
            stat_calling_aes: Vec::new(),
        }
    }
}

/// The state of one series in the bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesState {
    pub study_uid: String,
    pub series_uid: String,
    #[serde(default)]
    pub modality: String,
    #[serde(default)]
    pub called_ae: String,
    #[serde(default)]
    pub calling_ae: String,
    /// The revision being assembled, or the last one emitted when `emitted`.
    pub revision: u32,
    /// Instances received for the series over all revisions.
    pub instances: u32,
    /// Unix ms of the newest instance.
    pub last_instance_ms: u64,
    /// Unix ms when an association that sent instances of this revision was released.
    #[serde(default)]
    pub released_ms: Option<u64>,
    /// Largest instance count announced by the data (Images in Acquisition, Number
    /// of Series Related Instances).
    #[serde(default)]
    pub expected: Option<u32>,
    /// Whether `revision` was published as ready.
    pub emitted: bool,
    /// Unix ms when `revision` was emitted.
    #[serde(default)]
    pub emitted_ms: Option<u64>,
    pub correlation_id: String,
    /// Sorted digests of the instances received (see [`instance_digest`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_digests: Vec<u64>,
}

impl SeriesState {
    fn new(ev: &InstanceStored) -> Self {
        Self {
            study_uid: ev.study_uid.clone(),
            series_uid: ev.series_uid.clone(),
            modality: ev.modality.clone(),
            called_ae: ev.called_ae.clone(),
            calling_ae: ev.calling_ae.clone(),
            revision: 1,
            instances: 0,
            last_instance_ms: 0,
            released_ms: None,
            expected: None,
            emitted: false,
            emitted_ms: None,
            correlation_id: correlation_id(&ev.series_uid, 1),
            instance_digests: Vec::new(),
        }
    }

    /// Applies one stored instance; `false` (and no change) if it was seen before.
    pub fn apply(&mut self, ev: &InstanceStored) -> bool {
        let digest = instance_digest(&ev.sop_instance_uid);
        match self.instance_digests.binary_search(&digest) {
            Ok(_) => return false,
            Err(at) if self.instance_digests.len() < MAX_TRACKED_INSTANCES => {
                self.instance_digests.insert(at, digest)
            }
            Err(_) => {}
        }
        if self.emitted {
            self.revision += 1;
            self.emitted = false;
            self.emitted_ms = None;
            self.released_ms = None;
            self.correlation_id = correlation_id(&self.series_uid, self.revision);
        }
        self.instances += 1;
        self.last_instance_ms = self.last_instance_ms.max(ev.received_at_ms);
        if self.modality.is_empty() {
            self.modality = ev.modality.clone();
        }
        let hint = ev
            .hints
            .series_related_instances
            .or(ev.hints.images_in_acquisition);
        if let Some(h) = hint.filter(|h| *h > 0) {
            self.expected = Some(self.expected.map_or(h, |e| e.max(h)));
        } else if ev.hints.number_of_frames.is_some_and(|f| f > 1) {
            self.expected = Some(self.expected.unwrap_or(1));
        }
        true
    }

    /// Why the series is ready at `now`, if it is.
    pub fn ready_reason(&self, now: u64, cfg: &AssemblyConfig) -> Option<ReadyReason> {
        if self.emitted {
            return None;
        }
        let quiet_for = now.saturating_sub(self.last_instance_ms);
        let short = cfg.short_quiet.min(cfg.quiet).as_millis() as u64;
        if quiet_for >= cfg.quiet.as_millis() as u64 {
            return Some(ReadyReason::Quiet);
        }
        if self.expected.is_some_and(|e| self.instances >= e) && quiet_for >= short {
            return Some(ReadyReason::Complete);
        }
        if self
            .released_ms
            .is_some_and(|r| r >= self.last_instance_ms && now.saturating_sub(r) >= short)
        {
            return Some(ReadyReason::Released);
        }
        None
    }
}

/// The correlation id of a series revision: stable, so every replica and every retry
/// uses the same one, and free of patient data.
pub fn correlation_id(series_uid: &str, revision: u32) -> String {
    let digest = radflow_shared::util::sha256_hex(format!("{series_uid}#{revision}").as_bytes());
    digest[..16].to_owned()
}

fn encode(state: &SeriesState) -> Bytes {
    serde_json::to_vec(state)
        .expect("series state serialises")
        .into()
}

fn decode(bytes: &[u8]) -> Option<SeriesState> {
    serde_json::from_slice(bytes).ok()
}

/// Applies `InstanceStored` events to the bucket (stage `assembler`).
pub struct Assembler {
    kv: Arc<dyn Kv>,
}

impl Assembler {
    pub async fn new(bus: &dyn Bus) -> Result<Self, BusError> {
        Ok(Self {
            kv: bus.kv(SERIES_STATE_BUCKET).await?,
        })
    }

    /// Records one instance with compare-and-set, retrying on conflicts.
    pub async fn record(&self, ev: &InstanceStored) -> Result<(), BusError> {
        loop {
            match self.kv.get(&ev.series_uid).await? {
                None => {
                    let mut state = SeriesState::new(ev);
                    state.apply(ev);
                    if self
                        .kv
                        .create(&ev.series_uid, encode(&state))
                        .await?
                        .is_some()
                    {
                        return Ok(());
                    }
                }
                Some(entry) => {
                    let mut state = decode(&entry.value).unwrap_or_else(|| SeriesState::new(ev));
                    if !state.apply(ev) {
                        tracing::debug!(series_uid = %ev.series_uid, "instance received again; series unchanged");
                        return Ok(());
                    }
                    if self
                        .kv
                        .update(&ev.series_uid, encode(&state), entry.revision)
                        .await?
                        .is_some()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Handler for Assembler {
    fn stage(&self) -> &'static str {
        "assembler"
    }

    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandleError> {
        let ev: InstanceStored = events::decode(&delivery.payload)
            .map_err(|e| HandleError::permanent("bad_event", e.to_string()))?;
        self.record(&ev)
            .await
            .map_err(|e| HandleError::Transient(e.into()))?;
        Ok(Outcome::Done)
    }
}

/// Marks series whose association was released at `released_at_ms` (a hint that may
/// shorten the wait).
pub async fn mark_released(
    kv: &dyn Kv,
    series_uids: &[String],
    released_at_ms: u64,
) -> Result<(), BusError> {
    let now = released_at_ms;
    for uid in series_uids {
        for _ in 0..10 {
            let Some(entry) = kv.get(uid).await? else {
                break;
            };
            let Some(mut state) = decode(&entry.value) else {
                break;
            };
            if state.emitted {
                break;
            }
            state.released_ms = Some(now);
            if kv
                .update(uid, encode(&state), entry.revision)
                .await?
                .is_some()
            {
                break;
            }
        }
    }
    Ok(())
}

/// Publishes ready series; runs on every listener replica.
pub struct ReadyScanner {
    bus: Arc<dyn Bus>,
    kv: Arc<dyn Kv>,
    config: AssemblyConfig,
    metrics: Arc<Metrics>,
}

impl ReadyScanner {
    pub async fn new(
        bus: Arc<dyn Bus>,
        config: AssemblyConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BusError> {
        let kv = bus.kv(SERIES_STATE_BUCKET).await?;
        Ok(Self {
            bus,
            kv,
            config,
            metrics,
        })
    }

    /// How often the bucket is scanned.
    pub fn interval(&self) -> Duration {
        (self.config.short_quiet.min(self.config.quiet) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// One pass: publishes every ready series; returns how many were published.
    pub async fn scan_once(&self) -> Result<usize, BusError> {
        let now = now_ms();
        let mut published = 0;
        let mut assembling = 0;
        for (key, entry) in self.kv.entries().await? {
            let Some(state) = decode(&entry.value) else {
                continue;
            };
            if state.emitted {
                let old = state.emitted_ms.is_some_and(|t| {
                    now.saturating_sub(t) > self.config.forget_after.as_millis() as u64
                });
                if old {
                    let _ = self.kv.delete(&key, entry.revision).await;
                }
                continue;
            }
            let Some(reason) = state.ready_reason(now, &self.config) else {
                assembling += 1;
                continue;
            };
            let event = SeriesReady {
                schema_version: SCHEMA_VERSION,
                correlation_id: state.correlation_id.clone(),
                study_uid: state.study_uid.clone(),
                series_uid: state.series_uid.clone(),
                revision: state.revision,
                instances: state.instances,
                modality: state.modality.clone(),
                called_ae: state.called_ae.clone(),
                calling_ae: state.calling_ae.clone(),
                reason,
                ready_at_ms: now,
                lane: self.config.lane(&state.calling_ae),
                models: Vec::new(),
            };
            publish_event(&*self.bus, &event).await?;
            if self.mark_emitted(&key, &state).await? {
                published += 1;
                self.metrics.series_ready(reason_label(reason));
                tracing::info!(
                    correlation_id = %state.correlation_id,
                    series_uid = %state.series_uid,
                    revision = state.revision,
                    instances = state.instances,
                    reason = reason_label(reason),
                    "series ready"
                );
            }
        }
        self.metrics.series_assembling.set(assembling);
        Ok(published)
    }

    /// After publishing `published`: marks it emitted, or, if instances arrived in
    /// the meantime, opens the next revision so they are not left out.
    async fn mark_emitted(&self, key: &str, published: &SeriesState) -> Result<bool, BusError> {
        loop {
            let Some(entry) = self.kv.get(key).await? else {
                return Ok(false);
            };
            let Some(mut state) = decode(&entry.value) else {
                return Ok(false);
            };
            if state.revision != published.revision || state.emitted {
                return Ok(false); // another replica marked it, or it moved on
            }
            if state.instances == published.instances {
                state.emitted = true;
                state.emitted_ms = Some(now_ms());
            } else {
                // Instances arrived between the scan and now: they get a revision.
                state.revision += 1;
                state.released_ms = None;
                state.correlation_id = correlation_id(&state.series_uid, state.revision);
            }
            let emitted = state.emitted;
            if self
                .kv
                .update(key, encode(&state), entry.revision)
                .await?
                .is_some()
            {
                return Ok(emitted);
            }
        }
    }

    /// Scans until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let interval = self.interval();
        loop {
            if let Err(e) = self.scan_once().await {
                self.metrics.bus_error("assembler");
                tracing::warn!(error = %e, "series scan failed; retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

fn reason_label(r: ReadyReason) -> &'static str {
    match r {
        ReadyReason::Quiet => "quiet",
        ReadyReason::Released => "released",
        ReadyReason::Complete => "complete",
        ReadyReason::Recovered => "recovered",
        ReadyReason::Scored => "scored",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radflow_shared::bus::{InProcBus, SERIES};
    use radflow_shared::events::CountHints;

    fn instance(series: &str, sop: &str, at: u64) -> InstanceStored {
        InstanceStored {
            schema_version: SCHEMA_VERSION,
            study_uid: "1.2".into(),
            series_uid: series.into(),
            sop_instance_uid: sop.into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            modality: "CT".into(),
            key: format!("dicom/1.2/{series}/{sop}.dcm"),
            size_bytes: 10,
            calling_ae: "CT1".into(),
            called_ae: "RADFLOW".into(),
            received_at_ms: at,
            hints: CountHints::default(),
        }
    }

    fn cfg() -> AssemblyConfig {
        AssemblyConfig {
            quiet: Duration::from_millis(10_000),
            short_quiet: Duration::from_millis(2_000),
            forget_after: Duration::from_secs(3600),
            stat_calling_aes: vec!["ER-CT".into()],
        }
    }

    #[test]
    fn stat_lane_by_calling_ae() {
        assert_eq!(cfg().lane("ER-CT"), Lane::Stat);
        assert_eq!(cfg().lane("er-ct "), Lane::Stat);
        assert_eq!(cfg().lane("CT1"), Lane::Routine);
        assert_eq!(AssemblyConfig::default().lane("ER-CT"), Lane::Routine);
    }

    #[test]
    fn quiet_period_release_and_count_hints() {
        let mut s = SeriesState::new(&instance("1.2.3", "a", 1_000));
        s.apply(&instance("1.2.3", "a", 1_000));
        assert_eq!(s.ready_reason(5_000, &cfg()), None);
        assert_eq!(s.ready_reason(11_000, &cfg()), Some(ReadyReason::Quiet));

        s.released_ms = Some(1_500);
        assert_eq!(s.ready_reason(3_000, &cfg()), None);
        assert_eq!(s.ready_reason(3_600, &cfg()), Some(ReadyReason::Released));

        let mut h = SeriesState::new(&instance("1.2.4", "a", 0));
        let mut ev = instance("1.2.4", "a", 1_000);
        ev.hints.series_related_instances = Some(2);
        h.apply(&ev);
        assert_eq!(h.ready_reason(4_000, &cfg()), None);
        h.apply(&instance("1.2.4", "b", 1_000));
        assert_eq!(h.ready_reason(3_100, &cfg()), Some(ReadyReason::Complete));
    }

    #[test]
    fn repeated_instances_change_nothing() {
        let mut s = SeriesState::new(&instance("1.2.3", "a", 0));
        assert!(s.apply(&instance("1.2.3", "a", 1_000)));
        assert!(s.apply(&instance("1.2.3", "b", 1_000)));
        let before = s.clone();
        assert!(!s.apply(&instance("1.2.3", "a", 9_000)));
        assert_eq!(s, before);
        // Also after the series was emitted: no new revision for a repeat.
        s.emitted = true;
        assert!(!s.apply(&instance("1.2.3", "b", 60_000)));
        assert_eq!((s.revision, s.instances, s.emitted), (1, 2, true));
        // The digests survive the round trip through the bucket.
        let back = decode(&encode(&s)).unwrap();
        assert_eq!(back.instance_digests.len(), 2);
    }

    #[test]
    fn a_multi_frame_instance_without_count_hints_is_a_series_of_one() {
        let mut s = SeriesState::new(&instance("1.2.5", "a", 0));
        let mut ev = instance("1.2.5", "a", 1_000);
        ev.hints.number_of_frames = Some(300);
        s.apply(&ev);
        assert_eq!(s.expected, Some(1));
        assert_eq!(s.ready_reason(2_000, &cfg()), None);
        assert_eq!(s.ready_reason(3_100, &cfg()), Some(ReadyReason::Complete));
    }

    #[test]
    fn late_instance_opens_a_new_revision() {
        let mut s = SeriesState::new(&instance("1.2.3", "a", 0));
        s.apply(&instance("1.2.3", "a", 0));
        s.emitted = true;
        let first = s.correlation_id.clone();
        s.apply(&instance("1.2.3", "b", 50_000));
        assert_eq!((s.revision, s.instances, s.emitted), (2, 2, false));
        assert_ne!(s.correlation_id, first);
    }

    #[tokio::test]
    async fn two_scanners_publish_one_ready_per_revision() {
        let bus = Arc::new(InProcBus::new());
        let assembler = Assembler::new(&*bus).await.unwrap();
        let old = now_ms() - 60_000;
        for sop in ["a", "b", "c"] {
            assembler
                .record(&instance("1.2.3", sop, old))
                .await
                .unwrap();
        }
        let m = Metrics::new();
        let s1 = ReadyScanner::new(bus.clone(), cfg(), m.clone())
            .await
            .unwrap();
        let s2 = ReadyScanner::new(bus.clone(), cfg(), m.clone())
            .await
            .unwrap();
        let (a, b) = tokio::join!(s1.scan_once(), s2.scan_once());
        assert_eq!(a.unwrap() + b.unwrap(), 1);
        assert_eq!(s1.scan_once().await.unwrap(), 0);
        let ready = bus.stream_messages(SERIES.name);
        assert_eq!(ready.len(), 1, "duplicates must be suppressed");
        let ev: SeriesReady = events::decode(&ready[0].1).unwrap();
        assert_eq!((ev.revision, ev.instances), (1, 3));

        // A late instance yields revision 2.
        assembler
            .record(&instance("1.2.3", "d", old))
            .await
            .unwrap();
        assert_eq!(s2.scan_once().await.unwrap(), 1);
        let ready = bus.stream_messages(SERIES.name);
        let ev: SeriesReady = events::decode(&ready.last().unwrap().1).unwrap();
        assert_eq!((ev.revision, ev.instances), (2, 4));
    }
}
