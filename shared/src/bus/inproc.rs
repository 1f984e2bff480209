//! The in-process bus used by `radflow run` and by tests of single stages.
//!
//! It keeps the semantics of the NATS implementation that the stages rely on (durable
//! named consumers, explicit ack, nak with delay, redelivery after the ack wait,
//! duplicate suppression by message id, compare-and-set key-value), in memory. Nothing
//! survives the process: embedded mode recovers from the store at start-up instead.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Acker, Bus, BusError, ConsumerSpec, ConsumerStatus, DUPLICATE_WINDOW, Delivery, Kv, KvEntry,
    Outgoing, StoredMessage, StreamSpec, StreamStatus, Subscription, TOPOLOGY, subject_matches,
};

/// Retained-stream messages kept at most, so a long-running embedded process does not
/// grow without bound.
const MAX_RETAINED: usize = 100_000;

/// In-memory bus. Cheap to clone; clones share state.
#[derive(Clone, Default)]
pub struct InProcBus {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    streams: HashMap<&'static str, StreamState>,
    kv: HashMap<String, Arc<InProcKv>>,
}

struct StreamState {
    spec: StreamSpec,
    next_seq: u64,
    messages: BTreeMap<u64, Stored>,
    dedup: HashMap<String, Instant>,
    consumers: HashMap<String, ConsumerState>,
}

#[derive(Clone)]
struct Stored {
    subject: String,
    payload: Bytes,
    correlation_id: String,
    at: Instant,
    at_ms: u64,
}

struct ConsumerState {
    filter: String,
    ack_wait: Duration,
    ready: VecDeque<u64>,
    delayed: Vec<(Instant, u64)>,
    inflight: HashMap<u64, Instant>,
    attempts: HashMap<u64, u64>,
}

impl InProcBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn stream_for<'a>(state: &'a mut State, subject: &str) -> Option<&'a mut StreamState> {
        let spec = TOPOLOGY
            .iter()
            .find(|s| subject_matches(s.subjects, subject))?;
        Some(
            state
                .streams
                .entry(spec.name)
                .or_insert_with(|| StreamState {
                    spec: *spec,
                    next_seq: 1,
                    messages: BTreeMap::new(),
                    dedup: HashMap::new(),
                    consumers: HashMap::new(),
                }),
        )
    }

    /// Creates the durable consumer on first use (delivering what the stream already
    /// holds, like a JetStream consumer with `DeliverPolicy::All`, unless the spec
    /// asks for new messages only).
    fn join(&self, spec: &ConsumerSpec) -> Sub {
        let mut state = self.inner.state.lock().unwrap();
        let stream = state
            .streams
            .entry(spec.stream.name)
            .or_insert_with(|| StreamState {
                spec: spec.stream,
                next_seq: 1,
                messages: BTreeMap::new(),
                dedup: HashMap::new(),
                consumers: HashMap::new(),
            });
        if !stream.consumers.contains_key(&spec.durable) {
            let ready = stream
                .messages
                .iter()
                .filter(|(_, m)| !spec.deliver_new && subject_matches(&spec.filter, &m.subject))
                .map(|(seq, _)| *seq)
                .collect();
            stream.consumers.insert(
                spec.durable.clone(),
                ConsumerState {
                    filter: spec.filter.clone(),
                    ack_wait: spec.ack_wait,
                    ready,
                    delayed: Vec::new(),
                    inflight: HashMap::new(),
                    attempts: HashMap::new(),
                },
            );
        }
        Sub {
            inner: self.inner.clone(),
            stream: spec.stream.name,
            durable: spec.durable.clone(),
        }
    }

    /// Messages waiting (not yet acknowledged) for a consumer; for tests and status.
    pub fn pending(&self, stream: &str, durable: &str) -> usize {
        let state = self.inner.state.lock().unwrap();
        state
            .streams
            .get(stream)
            .and_then(|s| s.consumers.get(durable))
            .map(|c| c.ready.len() + c.delayed.len() + c.inflight.len())
            .unwrap_or(0)
    }

    /// Messages currently held by a stream; for tests and status.
    pub fn stream_messages(&self, stream: &str) -> Vec<(String, Bytes)> {
        let state = self.inner.state.lock().unwrap();
        state
            .streams
            .get(stream)
            .map(|s| {
                s.messages
                    .values()
                    .map(|m| (m.subject.clone(), m.payload.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl StreamState {
    fn prune(&mut self, now: Instant) {
        self.dedup
            .retain(|_, at| now.duration_since(*at) < DUPLICATE_WINDOW);
        if self.spec.work_queue {
            return;
        }
        let max_age = self.spec.max_age;
        while let Some((&seq, m)) = self.messages.first_key_value() {
            if self.messages.len() > MAX_RETAINED || now.duration_since(m.at) > max_age {
                self.messages.remove(&seq);
            } else {
                break;
            }
        }
    }

    /// Drops a work-queue message once no consumer holds it any more.
    fn settle(&mut self, seq: u64) {
        if !self.spec.work_queue {
            return;
        }
        let held = self.consumers.values().any(|c| {
            c.inflight.contains_key(&seq)
                || c.ready.contains(&seq)
                || c.delayed.iter().any(|(_, s)| *s == seq)
        });
        if !held {
            self.messages.remove(&seq);
        }
    }
}

#[async_trait]
impl Bus for InProcBus {
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        {
            let mut state = self.inner.state.lock().unwrap();
            let now = Instant::now();
            let stream = Self::stream_for(&mut state, &msg.subject).ok_or_else(|| {
                BusError::Refused(format!("no stream takes subject {}", msg.subject))
            })?;
            stream.prune(now);
            if !msg.msg_id.is_empty() {
                if stream.dedup.contains_key(&msg.msg_id) {
                    return Ok(());
                }
                stream.dedup.insert(msg.msg_id.clone(), now);
            }
            let seq = stream.next_seq;
            stream.next_seq += 1;
            stream.messages.insert(
                seq,
                Stored {
                    subject: msg.subject.clone(),
                    payload: msg.payload,
                    correlation_id: msg.correlation_id,
                    at: now,
                    at_ms: crate::util::now_ms(),
                },
            );
            for c in stream.consumers.values_mut() {
                if subject_matches(&c.filter, &msg.subject) {
                    c.ready.push_back(seq);
                }
            }
        }
        self.inner.notify.notify_waiters();
        Ok(())
    }

    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Subscription, BusError> {
        let sub = self.join(spec);
        Ok(Box::pin(futures::stream::unfold(sub, |sub| async move {
            let delivery = sub.next().await;
            Some((Ok(delivery), sub))
        })))
    }

    async fn fetch(
        &self,
        spec: &ConsumerSpec,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        let sub = self.join(spec);
        let mut out = Vec::new();
        let Some(first) = sub.next_until(Some(Instant::now() + wait)).await else {
            return Ok(out);
        };
        out.push(first);
        while out.len() < max {
            match sub.poll() {
                Ok(d) => out.push(d),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn kv(&self, bucket: &str) -> Result<Arc<dyn Kv>, BusError> {
        let mut state = self.inner.state.lock().unwrap();
        let kv = state.kv.entry(bucket.to_owned()).or_default().clone();
        Ok(kv)
    }

    async fn check(&self) -> Result<(), BusError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "in-process"
    }

    async fn streams(&self) -> Result<Vec<StreamStatus>, BusError> {
        let state = self.inner.state.lock().unwrap();
        let now_ms = crate::util::now_ms();
        Ok(TOPOLOGY
            .iter()
            .map(|spec| match state.streams.get(spec.name) {
                None => StreamStatus {
                    name: spec.name.to_owned(),
                    messages: 0,
                    bytes: 0,
                    first_seq: 0,
                    last_seq: 0,
                    consumers: Vec::new(),
                },
                Some(st) => {
                    let mut consumers: Vec<ConsumerStatus> = st
                        .consumers
                        .iter()
                        .map(|(name, c)| {
                            let oldest = c
                                .ready
                                .iter()
                                .chain(c.inflight.keys())
                                .chain(c.delayed.iter().map(|(_, seq)| seq))
                                .filter_map(|seq| st.messages.get(seq))
                                .map(|m| m.at_ms)
                                .min();
                            ConsumerStatus {
                                name: name.clone(),
                                filter: c.filter.clone(),
                                pending: c.ready.len() as u64,
                                ack_pending: (c.inflight.len() + c.delayed.len()) as u64,
                                redelivered: c.attempts.values().filter(|a| **a > 1).count() as u64,
                                oldest_pending_age_ms: oldest.map(|t| now_ms.saturating_sub(t)),
                            }
                        })
                        .collect();
                    consumers.sort_by(|a, b| a.name.cmp(&b.name));
                    StreamStatus {
                        name: spec.name.to_owned(),
                        messages: st.messages.len() as u64,
                        bytes: st.messages.values().map(|m| m.payload.len() as u64).sum(),
                        first_seq: st.messages.keys().next().copied().unwrap_or(0),
                        last_seq: st.next_seq.saturating_sub(1),
                        consumers,
                    }
                }
            })
            .collect())
    }

    async fn read(
        &self,
        stream: StreamSpec,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredMessage>, BusError> {
        let state = self.inner.state.lock().unwrap();
        Ok(state
            .streams
            .get(stream.name)
            .map(|st| {
                st.messages
                    .range(from_seq..)
                    .take(max)
                    .map(|(seq, m)| StoredMessage {
                        seq: *seq,
                        subject: m.subject.clone(),
                        payload: m.payload.clone(),
                        time_ms: m.at_ms,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn remove(&self, stream: StreamSpec, seq: u64) -> Result<bool, BusError> {
        let mut state = self.inner.state.lock().unwrap();
        let Some(st) = state.streams.get_mut(stream.name) else {
            return Ok(false);
        };
        for c in st.consumers.values_mut() {
            c.ready.retain(|s| *s != seq);
            c.delayed.retain(|(_, s)| *s != seq);
            c.inflight.remove(&seq);
        }
        Ok(st.messages.remove(&seq).is_some())
    }
}

struct Sub {
    inner: Arc<Inner>,
    stream: &'static str,
    durable: String,
}

impl Sub {
    /// Takes the next ready delivery, if any; otherwise says when to look again.
    fn poll(&self) -> Result<Delivery, Option<Instant>> {
        let mut state = self.inner.state.lock().unwrap();
        let now = Instant::now();
        let stream = state
            .streams
            .get_mut(self.stream)
            .expect("subscribed stream");
        let c = stream
            .consumers
            .get_mut(&self.durable)
            .expect("subscribed consumer");
        // Expired ack waits and elapsed nak delays become ready again.
        let expired: Vec<u64> = c
            .inflight
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            c.inflight.remove(&seq);
            c.ready.push_back(seq);
        }
        let (due, later): (Vec<_>, Vec<_>) = c.delayed.drain(..).partition(|(at, _)| *at <= now);
        c.delayed = later;
        c.ready.extend(due.into_iter().map(|(_, seq)| seq));

        while let Some(seq) = c.ready.pop_front() {
            let Some(m) = stream.messages.get(&seq) else {
                continue; // pruned meanwhile
            };
            let attempt = c.attempts.entry(seq).or_insert(0);
            *attempt += 1;
            c.inflight.insert(seq, now + c.ack_wait);
            return Ok(Delivery {
                subject: m.subject.clone(),
                payload: m.payload.clone(),
                correlation_id: (!m.correlation_id.is_empty()).then(|| m.correlation_id.clone()),
                attempt: *attempt,
                acker: Box::new(InProcAcker {
                    inner: self.inner.clone(),
                    stream: self.stream,
                    durable: self.durable.clone(),
                    seq,
                }),
            });
        }
        Err(c
            .delayed
            .iter()
            .map(|(at, _)| *at)
            .chain(c.inflight.values().copied())
            .min())
    }

    /// The next delivery, waiting until one is ready or `deadline` passes.
    async fn next_until(&self, deadline: Option<Instant>) -> Option<Delivery> {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = match self.poll() {
                Ok(d) => return Some(d),
                Err(wake_at) => wake_at,
            };
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return None;
            }
            let wake_at = match (wake_at, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn next(&self) -> Delivery {
        self.next_until(None)
            .await
            .expect("waiting without a deadline ends with a delivery")
    }
}

struct InProcAcker {
    inner: Arc<Inner>,
    stream: &'static str,
    durable: String,
    seq: u64,
}

impl InProcAcker {
    fn with_consumer<R>(&self, f: impl FnOnce(&mut StreamState, u64) -> R) -> R {
        let mut state = self.inner.state.lock().unwrap();
        let stream = state.streams.get_mut(self.stream).expect("stream exists");
        f(stream, self.seq)
    }

    fn finish(&self) {
        let durable = self.durable.clone();
        self.with_consumer(|stream, seq| {
            if let Some(c) = stream.consumers.get_mut(&durable) {
                c.inflight.remove(&seq);
                c.attempts.remove(&seq);
            }
            stream.settle(seq);
        });
    }
}

#[async_trait]
impl Acker for InProcAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.finish();
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        let durable = self.durable.clone();
        self.with_consumer(|stream, seq| {
            if let Some(c) = stream.consumers.get_mut(&durable)
                && c.inflight.remove(&seq).is_some()
            {
                c.delayed.push((Instant::now() + delay, seq));
            }
        });
        self.inner.notify.notify_waiters();
        Ok(())
    }

    async fn term(&self) -> Result<(), BusError> {
        self.finish();
        Ok(())
    }

    async fn progress(&self) -> Result<(), BusError> {
        let durable = self.durable.clone();
        self.with_consumer(|stream, seq| {
            if let Some(c) = stream.consumers.get_mut(&durable) {
                let wait = c.ack_wait;
                if let Some(deadline) = c.inflight.get_mut(&seq) {
                    *deadline = Instant::now() + wait;
                }
            }
        });
        Ok(())
    }
}

/// In-memory key-value bucket with revisions.
#[derive(Default)]
struct InProcKv {
    state: Mutex<KvState>,
}

#[derive(Default)]
struct KvState {
    next_revision: u64,
    entries: BTreeMap<String, KvEntry>,
}

impl KvState {
    fn bump(&mut self) -> u64 {
        self.next_revision += 1;
        self.next_revision
    }
}

#[async_trait]
impl Kv for InProcKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, BusError> {
        Ok(self.state.lock().unwrap().entries.get(key).cloned())
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Option<u64>, BusError> {
        let mut s = self.state.lock().unwrap();
        if s.entries.contains_key(key) {
            return Ok(None);
        }
        let revision = s.bump();
        s.entries
            .insert(key.to_owned(), KvEntry { value, revision });
        Ok(Some(revision))
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, BusError> {
        let mut s = self.state.lock().unwrap();
        match s.entries.get(key) {
            Some(e) if e.revision == revision => {
                let revision = s.bump();
                s.entries
                    .insert(key.to_owned(), KvEntry { value, revision });
                Ok(Some(revision))
            }
            _ => Ok(None),
        }
    }

    async fn entries(&self) -> Result<Vec<(String, KvEntry)>, BusError> {
        let s = self.state.lock().unwrap();
        Ok(s.entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn delete(&self, key: &str, revision: u64) -> Result<bool, BusError> {
        let mut s = self.state.lock().unwrap();
        match s.entries.get(key) {
            Some(e) if e.revision == revision => {
                s.entries.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{JOBS, RESULTS};
    use futures::StreamExt;

    fn msg(subject: &str, id: &str, body: &str) -> Outgoing {
        Outgoing {
            subject: subject.into(),
            msg_id: id.into(),
            correlation_id: "c".into(),
            payload: Bytes::from(body.to_owned()),
        }
    }

    #[tokio::test]
    async fn work_queue_ack_nak_and_dedup() {
        let bus = InProcBus::new();
        bus.publish(msg("radflow.job.m", "a", "1")).await.unwrap();
        bus.publish(msg("radflow.job.m", "a", "1")).await.unwrap(); // duplicate
        bus.publish(msg("radflow.job.m", "b", "2")).await.unwrap();
        let mut spec = ConsumerSpec::new(JOBS, "inferer");
        spec.ack_wait = Duration::from_secs(30);
        let mut sub = bus.subscribe(&spec).await.unwrap();

        let d1 = sub.next().await.unwrap().unwrap();
        assert_eq!(&d1.payload[..], b"1");
        assert_eq!(d1.attempt, 1);
        d1.acker.nak(Duration::from_millis(50)).await.unwrap();

        let d2 = sub.next().await.unwrap().unwrap();
        assert_eq!(&d2.payload[..], b"2");
        d2.acker.ack().await.unwrap();

        let again = sub.next().await.unwrap().unwrap();
        assert_eq!(&again.payload[..], b"1");
        assert_eq!(again.attempt, 2);
        again.acker.ack().await.unwrap();
        assert_eq!(bus.pending(JOBS.name, "inferer"), 0);
        assert!(bus.stream_messages(JOBS.name).is_empty());
    }

    #[tokio::test]
    async fn unacked_delivery_comes_back_after_ack_wait() {
        let bus = InProcBus::new();
        let mut spec = ConsumerSpec::new(JOBS, "w");
        spec.ack_wait = Duration::from_millis(50);
        let mut sub = bus.subscribe(&spec).await.unwrap();
        bus.publish(msg("radflow.job.m", "x", "1")).await.unwrap();
        let d = sub.next().await.unwrap().unwrap();
        drop(d); // a worker that died
        let d = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .expect("redelivered")
            .unwrap()
            .unwrap();
        assert_eq!(d.attempt, 2);
    }

    #[tokio::test]
    async fn retained_stream_keeps_acked_messages() {
        let bus = InProcBus::new();
        bus.publish(msg("radflow.result.m", "r", "x"))
            .await
            .unwrap();
        let mut sub = bus
            .subscribe(&ConsumerSpec::new(RESULTS, "reader"))
            .await
            .unwrap();
        let d = sub.next().await.unwrap().unwrap();
        d.acker.ack().await.unwrap();
        assert_eq!(bus.stream_messages(RESULTS.name).len(), 1);
    }

    #[tokio::test]
    async fn status_shows_pending_in_flight_and_oldest_age() {
        let bus = InProcBus::new();
        let mut sub = bus
            .subscribe(&ConsumerSpec::new(JOBS, "inferer"))
            .await
            .unwrap();
        for id in ["a", "b", "c"] {
            bus.publish(msg("radflow.job.m", id, id)).await.unwrap();
        }
        let held = sub.next().await.unwrap().unwrap();
        let streams = bus.streams().await.unwrap();
        let jobs = streams.iter().find(|s| s.name == JOBS.name).unwrap();
        assert_eq!((jobs.messages, jobs.first_seq, jobs.last_seq), (3, 1, 3));
        let c = &jobs.consumers[0];
        assert_eq!(
            (c.name.as_str(), c.pending, c.ack_pending),
            ("inferer", 2, 1)
        );
        assert!(c.oldest_pending_age_ms.is_some());
        held.acker.ack().await.unwrap();

        let last = crate::bus::last_messages(&bus, JOBS, 1).await.unwrap();
        assert_eq!((last[0].seq, &last[0].payload[..]), (3, &b"c"[..]));
        assert!(bus.remove(JOBS, 3).await.unwrap());
        assert_eq!(bus.read(JOBS, 1, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn fetch_takes_what_is_there_and_waits_at_most_the_given_time() {
        let bus = InProcBus::new();
        let spec = ConsumerSpec::new(JOBS, "batch");
        let none = bus
            .fetch(&spec, 5, Duration::from_millis(20))
            .await
            .unwrap();
        assert!(none.is_empty());
        for id in ["a", "b", "c"] {
            bus.publish(msg("radflow.job.m", id, id)).await.unwrap();
        }
        let got = bus.fetch(&spec, 2, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 2);
        for d in got {
            d.acker.ack().await.unwrap();
        }
        let rest = bus.fetch(&spec, 5, Duration::ZERO).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(&rest[0].payload[..], b"c");
    }

    #[tokio::test]
    async fn kv_compare_and_set() {
        let bus = InProcBus::new();
        let kv = bus.kv("b").await.unwrap();
        let r1 = kv.create("k", Bytes::from("1")).await.unwrap().unwrap();
        assert!(kv.create("k", Bytes::from("x")).await.unwrap().is_none());
        let r2 = kv.update("k", Bytes::from("2"), r1).await.unwrap().unwrap();
        assert!(
            kv.update("k", Bytes::from("3"), r1)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(kv.get("k").await.unwrap().unwrap().value, Bytes::from("2"));
        assert!(!kv.delete("k", r1).await.unwrap());
        assert!(kv.delete("k", r2).await.unwrap());
        assert!(kv.entries().await.unwrap().is_empty());
    }
}
