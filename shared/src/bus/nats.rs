//! The NATS JetStream bus used when radflow runs as separate processes.
//!
//! Streams and the key-value bucket are created on first connect (idempotently), so a
//! fresh NATS server needs no set-up. Publishing waits for the stream's ack, which is
//! what makes "accepted by the bus" durable; `Nats-Msg-Id` lets the server drop
//! duplicates inside the duplicate window.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
    kv,
    stream::{self, RetentionPolicy, StorageType},
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    Acker, Bus, BusError, CORRELATION_HEADER, ConsumerSpec, ConsumerStatus, DUPLICATE_WINDOW,
    Delivery, Kv, KvEntry, Outgoing, StoredMessage, StreamSpec, StreamStatus, Subscription,
    TOPOLOGY,
};
use crate::backoff::Backoff;
use crate::secret::Secret;

/// How to reach NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// `nats://host:4222` (comma-separated for a cluster).
    pub url: String,
    /// Client name shown in NATS monitoring (`radflow-listener`, …).
    pub name: String,
    /// `.creds` file (JWT + NKey), the usual production credential.
    pub creds_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    /// Replicas for streams and the bucket when they are created (3 in a cluster).
    pub replicas: usize,
}

/// The JetStream bus.
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    replicas: usize,
    buckets: Mutex<HashMap<String, Arc<NatsKv>>>,
    consumers: Mutex<HashMap<String, jetstream::consumer::Consumer<pull::Config>>>,
}

impl NatsBus {
    /// Connects and makes sure every stream exists. Fails if the server cannot be
    /// reached within a few seconds; callers that want to wait use [`connect_retrying`].
    pub async fn connect(opts: &NatsOptions) -> Result<Self, BusError> {
        let mut connect = async_nats::ConnectOptions::new()
            .name(if opts.name.is_empty() {
                "radflow"
            } else {
                &opts.name
            })
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None);
        if let Some(path) = &opts.creds_file {
            connect = connect
                .credentials_file(path)
                .await
                .map_err(|e| BusError::Refused(format!("cannot read NATS credentials: {e}")))?;
        }
        if let (Some(user), Some(password)) = (&opts.user, &opts.password) {
            connect = connect.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &opts.token {
            connect = connect.token(token.expose().to_owned());
        }
        let client = connect
            .connect(opts.url.as_str())
            .await
            .map_err(BusError::unavailable)?;
        let js = jetstream::new(client.clone());
        let bus = Self {
            client,
            js,
            replicas: opts.replicas.max(1),
            buckets: Mutex::new(HashMap::new()),
            consumers: Mutex::new(HashMap::new()),
        };
        bus.ensure_topology().await?;
        Ok(bus)
    }

    /// Connects, retrying with backoff until it works or `cancel` fires.
    pub async fn connect_retrying(
        opts: &NatsOptions,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Self, BusError> {
        let backoff = Backoff::new(Duration::from_millis(250), 2, Duration::from_secs(5));
        for attempt in 1.. {
            match Self::connect(opts).await {
                Ok(bus) => return Ok(bus),
                Err(e) => {
                    tracing::warn!(error = %e, url = %opts.url, retry_in = ?backoff.delay(attempt), "NATS not reachable yet");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(BusError::Closed),
                _ = tokio::time::sleep(backoff.delay(attempt)) => {}
            }
        }
        unreachable!("the attempts never run out")
    }

    /// The JetStream context, for tools that read stream and consumer state.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The durable pull consumer of a spec, created on first use and cached.
    async fn consumer(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
        if let Some(c) = self.consumers.lock().unwrap().get(&spec.durable) {
            return Ok(c.clone());
        }
        let stream = self
            .js
            .get_stream(spec.stream.name)
            .await
            .map_err(BusError::unavailable)?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &spec.durable,
                pull::Config {
                    durable_name: Some(spec.durable.clone()),
                    filter_subject: spec.filter.clone(),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: if spec.deliver_new {
                        DeliverPolicy::New
                    } else {
                        DeliverPolicy::All
                    },
                    ack_wait: spec.ack_wait,
                    // The worker dead-letters at `max_deliver`; the server limit is a
                    // backstop one higher so the last delivery can still be parked.
                    max_deliver: spec.max_deliver as i64 + 1,
                    max_ack_pending: spec.max_ack_pending as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(BusError::unavailable)?;
        self.consumers
            .lock()
            .unwrap()
            .insert(spec.durable.clone(), consumer.clone());
        Ok(consumer)
    }

    async fn ensure_topology(&self) -> Result<(), BusError> {
        for spec in TOPOLOGY {
            self.js
                .get_or_create_stream(self.stream_config(&spec))
                .await
                .map_err(|e| {
                    BusError::unavailable(format!("cannot create stream {}: {e}", spec.name))
                })?;
        }
        Ok(())
    }

    fn stream_config(&self, spec: &StreamSpec) -> stream::Config {
        stream::Config {
            name: spec.name.to_owned(),
            subjects: vec![spec.subjects.to_owned()],
            retention: if spec.work_queue {
                RetentionPolicy::WorkQueue
            } else {
                RetentionPolicy::Limits
            },
            max_age: spec.max_age,
            storage: StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: self.replicas,
            // Lets status views read the oldest unfinished message of a consumer.
            allow_direct: true,
            ..Default::default()
        }
    }

    async fn consumer_status(
        stream: &jetstream::stream::Stream,
        info: jetstream::consumer::Info,
        now_ms: u64,
    ) -> ConsumerStatus {
        let filter = if info.config.filter_subject.is_empty() {
            ">".to_owned()
        } else {
            info.config.filter_subject.clone()
        };
        let unfinished = info.num_pending > 0 || info.num_ack_pending > 0;
        let oldest_pending_age_ms = if unfinished {
            stream
                .direct_get_next_for_subject(
                    filter.clone(),
                    Some(info.ack_floor.stream_sequence + 1),
                )
                .await
                .ok()
                .map(|m| now_ms.saturating_sub(unix_ms(m.time)))
        } else {
            None
        };
        ConsumerStatus {
            name: info.name,
            filter,
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
            oldest_pending_age_ms,
        }
    }
}

/// A JetStream message as a bus delivery.
fn delivery(m: jetstream::Message) -> Delivery {
    let attempt = m.info().map(|i| i.delivered.max(1) as u64).unwrap_or(1);
    let correlation_id = m
        .headers
        .as_ref()
        .and_then(|h| h.get(CORRELATION_HEADER))
        .map(|v| v.as_str().to_owned());
    let subject = m.subject.to_string();
    let payload = m.payload.clone();
    let (_, acker) = m.split();
    Delivery {
        subject,
        payload,
        correlation_id,
        attempt,
        acker: Box::new(NatsAcker(acker)),
    }
}

fn unix_ms(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        if !msg.correlation_id.is_empty() {
            headers.insert(CORRELATION_HEADER, msg.correlation_id.as_str());
        }
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(msg.payload)
            .headers(headers);
        if !msg.msg_id.is_empty() {
            publish = publish.message_id(&msg.msg_id);
        }
        let ack = self
            .js
            .send_publish(msg.subject, publish)
            .await
            .map_err(BusError::unavailable)?;
        ack.await.map_err(BusError::unavailable)?;
        Ok(())
    }

    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Subscription, BusError> {
        let consumer = self.consumer(spec).await?;
        let messages = consumer.messages().await.map_err(BusError::unavailable)?;
        Ok(Box::pin(
            messages.map(|m| Ok(delivery(m.map_err(BusError::unavailable)?))),
        ))
    }

    async fn fetch(
        &self,
        spec: &ConsumerSpec,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        let consumer = self.consumer(spec).await?;
        let max = max.max(1);
        let mut out = Vec::new();
        if wait.is_zero() {
            let mut batch = consumer
                .fetch()
                .max_messages(max)
                .messages()
                .await
                .map_err(BusError::unavailable)?;
            while let Some(m) = batch.next().await {
                out.push(delivery(m.map_err(BusError::unavailable)?));
            }
        } else {
            // The server needs some time to answer an empty pull; below a second it
            // may answer "request timeout" instead of an empty batch.
            let mut batch = consumer
                .batch()
                .max_messages(max)
                .expires(wait.max(Duration::from_millis(100)))
                .messages()
                .await
                .map_err(BusError::unavailable)?;
            while let Some(m) = batch.next().await {
                match m {
                    Ok(m) => out.push(delivery(m)),
                    Err(e) if out.is_empty() && e.to_string().contains("timed out") => break,
                    Err(e) => return Err(BusError::unavailable(e)),
                }
            }
        }
        Ok(out)
    }

    async fn kv(&self, bucket: &str) -> Result<Arc<dyn Kv>, BusError> {
        if let Some(kv) = self.buckets.lock().unwrap().get(bucket) {
            return Ok(kv.clone());
        }
        let store = match self.js.get_key_value(bucket).await {
            Ok(store) => store,
            Err(_) => self
                .js
                .create_key_value(kv::Config {
                    bucket: bucket.to_owned(),
                    history: 1,
                    max_age: Duration::from_secs(7 * 24 * 3600),
                    storage: StorageType::File,
                    num_replicas: self.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    BusError::unavailable(format!("cannot create bucket {bucket}: {e}"))
                })?,
        };
        let kv = Arc::new(NatsKv { store });
        self.buckets
            .lock()
            .unwrap()
            .insert(bucket.to_owned(), kv.clone());
        Ok(kv)
    }

    async fn check(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(BusError::Unavailable(format!(
                "NATS connection is {other:?}"
            ))),
        }
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn streams(&self) -> Result<Vec<StreamStatus>, BusError> {
        let now_ms = crate::util::now_ms();
        let mut out = Vec::new();
        for spec in TOPOLOGY {
            let mut stream = self
                .js
                .get_stream(spec.name)
                .await
                .map_err(BusError::unavailable)?;
            let state = stream
                .info()
                .await
                .map_err(BusError::unavailable)?
                .state
                .clone();
            let mut infos = Vec::new();
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                infos.push(info.map_err(BusError::unavailable)?);
            }
            let mut statuses = Vec::new();
            for info in infos {
                statuses.push(Self::consumer_status(&stream, info, now_ms).await);
            }
            statuses.sort_by(|a, b| a.name.cmp(&b.name));
            out.push(StreamStatus {
                name: spec.name.to_owned(),
                messages: state.messages,
                bytes: state.bytes,
                first_seq: state.first_sequence,
                last_seq: state.last_sequence,
                consumers: statuses,
            });
        }
        Ok(out)
    }

    async fn read(
        &self,
        stream: StreamSpec,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<StoredMessage>, BusError> {
        let mut js_stream = self
            .js
            .get_stream(stream.name)
            .await
            .map_err(BusError::unavailable)?;
        let last = js_stream
            .info()
            .await
            .map_err(BusError::unavailable)?
            .state
            .last_sequence;
        let mut out = Vec::new();
        let mut seq = from_seq.max(1);
        while seq <= last && out.len() < max {
            match js_stream.get_raw_message(seq).await {
                Ok(m) => out.push(StoredMessage {
                    seq: m.sequence,
                    subject: m.subject.to_string(),
                    payload: m.payload,
                    time_ms: unix_ms(m.time),
                }),
                // Deleted or expired messages leave gaps in the sequence.
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(BusError::unavailable(e)),
            }
            seq += 1;
        }
        Ok(out)
    }

    async fn remove(&self, stream: StreamSpec, seq: u64) -> Result<bool, BusError> {
        let js_stream = self
            .js
            .get_stream(stream.name)
            .await
            .map_err(BusError::unavailable)?;
        js_stream
            .delete_message(seq)
            .await
            .map_err(BusError::unavailable)
    }
}

struct NatsAcker(jetstream::message::Acker);

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BusError> {
        // Double ack: wait for the server to confirm, so an ack lost in a reconnect is
        // noticed instead of silently producing a redelivery later.
        self.0
            .double_ack_with(AckKind::Ack)
            .await
            .map_err(BusError::unavailable)
    }
    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(BusError::unavailable)
    }
    async fn term(&self) -> Result<(), BusError> {
        self.0
            .double_ack_with(AckKind::Term)
            .await
            .map_err(BusError::unavailable)
    }
    async fn progress(&self) -> Result<(), BusError> {
        self.0
            .ack_with(AckKind::Progress)
            .await
            .map_err(BusError::unavailable)
    }
}

struct NatsKv {
    store: kv::Store,
}

#[async_trait]
impl Kv for NatsKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, BusError> {
        let entry = self.store.entry(key).await.map_err(BusError::unavailable)?;
        Ok(entry.and_then(|e| {
            (e.operation == kv::Operation::Put).then_some(KvEntry {
                value: e.value,
                revision: e.revision,
            })
        }))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Option<u64>, BusError> {
        match self.store.create(key, value).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(BusError::unavailable(e)),
        }
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<Option<u64>, BusError> {
        match self.store.update(key, value, revision).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(BusError::unavailable(e)),
        }
    }

    async fn entries(&self) -> Result<Vec<(String, KvEntry)>, BusError> {
        let mut keys = self.store.keys().await.map_err(BusError::unavailable)?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(BusError::unavailable)?;
            if let Some(entry) = self.get(&key).await? {
                out.push((key, entry));
            }
        }
        Ok(out)
    }

    async fn delete(&self, key: &str, revision: u64) -> Result<bool, BusError> {
        match self.store.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(true),
            Err(e) if e.to_string().contains("wrong last sequence") => Ok(false),
            Err(e) => Err(BusError::unavailable(e)),
        }
    }
}
