//! The NATS JetStream bus used when radflow runs as separate processes.
//!
//! Streams and the key-value bucket are created on first connect (idempotently), so a
//! fresh NATS server needs no set-up. Publishing waits for the stream's ack, which is
//! what makes "accepted by the bus" durable; `Nats-Msg-Id` lets the server drop
//! duplicates inside the duplicate window.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// How long past its own expiry a pull may go unanswered before the client gives up.
const PULL_GRACE: Duration = Duration::from_secs(5);

/// How to reach NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// `nats://host:4222` or `tls://host:4222` (TLS required), comma-separated for a
    /// cluster.
    pub url: String,
    /// Client name shown in NATS monitoring (`radflow-listener`, …).
    pub name: String,
    /// `.creds` file (JWT + NKey), the usual production credential.
    pub creds_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    /// PEM file of the CA (or CAs) that signed the server's certificate; trusted instead
    /// of the system's roots. Setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate (with its chain) and its key, for servers that verify
    /// clients (mutual TLS). Both or neither; setting them requires TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Replicas for streams and the bucket when they are created (3 in a cluster).
    pub replicas: usize,
}

impl NatsOptions {
    /// Whether the connection must be TLS: a `tls://` URL, a CA or a client certificate.
    /// A server that requires TLS gets it either way; this refuses a server that does
    /// not offer it.
    pub fn tls_required(&self) -> bool {
        self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self
                .url
                .split(',')
                .any(|u| u.trim().to_ascii_lowercase().starts_with("tls://"))
    }

    /// Checks the TLS files before any connection is tried: each must be readable and
    /// hold what it is named for, and a certificate comes with its key. A mistake here
    /// is a configuration error, reported once with the flag and the path, not a NATS
    /// outage to wait out.
    pub fn check_tls_files(&self) -> Result<(), BusError> {
        use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let refused = |flag: &str, path: &Path, why: String| {
            BusError::Refused(format!("{flag} {}: {why}", path.display()))
        };
        let certificates = |flag: &str, path: &Path| -> Result<(), BusError> {
            let text = std::fs::read(path)
                .map_err(|e| refused(flag, path, format!("cannot read it: {e}")))?;
            let certs = CertificateDer::pem_slice_iter(&text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| refused(flag, path, format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(refused(
                    flag,
                    path,
                    "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                ));
            }
            Ok(())
        };
        if let Some(path) = &self.tls_ca {
            certificates("--nats-tls-ca", path)?;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                certificates("--nats-tls-cert", cert)?;
                let text = std::fs::read(key)
                    .map_err(|e| refused("--nats-tls-key", key, format!("cannot read it: {e}")))?;
                PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
                    refused(
                        "--nats-tls-key",
                        key,
                        format!("holds no PEM private key: {e}"),
                    )
                })?;
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(BusError::Refused(
                    "--nats-tls-cert and --nats-tls-key go together: give both for a client certificate, or neither".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Makes ring rustls' process-wide crypto provider unless one is installed. async-nats
/// builds its TLS configuration from the process default, and with more than one
/// provider compiled in (object_store brings aws-lc-rs) rustls cannot choose one itself.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another part of the process installed one first: that one is used.
        let _ = async_nats::rustls::crypto::ring::default_provider().install_default();
    });
}

/// A connection error with what the TLS ones mean for the operator.
fn explain_connect_error(e: &str) -> String {
    let hint = if e.contains("InvalidContentType") {
        "the server does not speak TLS, and the client requires it (tls:// URL, --nats-tls-ca or a client certificate)"
    } else if e.contains("UnknownIssuer") {
        "the server's certificate is not signed by a trusted CA: give its CA with --nats-tls-ca"
    } else if e.contains("NotValidForName") {
        "the server's certificate does not name the host of the URL"
    } else if e.contains("CertificateRequired") {
        "the server demands a client certificate: --nats-tls-cert and --nats-tls-key"
    } else if e.contains("UnknownCA") || e.contains("BadCertificate") {
        "the server does not trust the client certificate (--nats-tls-cert)"
    } else {
        return e.to_owned();
    };
    format!("{e} ({hint})")
}

/// The URLs with any `user:password@` taken out, for logs.
fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}[redacted]@{}", &u[..scheme + 3], &u[at + 1..])
            }
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
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
        opts.check_tls_files()?;
        install_crypto_provider();
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
        // The files are read again on every (re)connect, so certificates renewed in
        // place are picked up by the next connection.
        if let Some(ca) = &opts.tls_ca {
            connect = connect.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        if opts.tls_required() {
            connect = connect.require_tls(true);
        }
        let client = connect
            .connect(opts.url.as_str())
            .await
            .map_err(|e| BusError::Unavailable(explain_connect_error(&e.to_string())))?;
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
        // A TLS file that is missing or wrong does not fix itself: fail at once.
        opts.check_tls_files()?;
        let backoff = Backoff::new(Duration::from_millis(250), 2, Duration::from_secs(5));
        let url = redacted(&opts.url);
        for attempt in 1.. {
            match Self::connect(opts).await {
                Ok(bus) => return Ok(bus),
                Err(e) => {
                    tracing::warn!(error = %e, url = %url, retry_in = ?backoff.delay(attempt), "NATS not reachable yet");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(BusError::Closed),
                _ = tokio::time::sleep(backoff.delay(attempt)) => {}
            }
        }
        unreachable!("the attempts never run out")
    }

    /// Connects, retrying with backoff for at most `limit`; then fails with the last
    /// attempt's error (a command-line tool says why, e.g. an untrusted certificate).
    pub async fn connect_within(opts: &NatsOptions, limit: Duration) -> Result<Self, BusError> {
        opts.check_tls_files()?;
        let deadline = tokio::time::Instant::now() + limit;
        let backoff = Backoff::new(Duration::from_millis(250), 2, Duration::from_secs(2));
        for attempt in 1.. {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let error = match tokio::time::timeout(left, Self::connect(opts)).await {
                Ok(Ok(bus)) => return Ok(bus),
                Ok(Err(BusError::Unavailable(e))) => e,
                Ok(Err(other)) => return Err(other),
                Err(_) => "no answer".to_owned(),
            };
            let wait = backoff.delay(attempt);
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(BusError::Unavailable(format!(
                    "no connection to NATS at {} within {} s: {error}",
                    redacted(&opts.url),
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(wait).await;
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

impl NatsBus {
    async fn pull(
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
        // A pull request lives on the server: one that restarts while the request is
        // open forgets it and never answers, not even with the end of the batch. The
        // client gives up on its own after the wait and this grace, and the caller
        // pulls again on the new connection instead of waiting forever.
        let deadline = wait + PULL_GRACE;
        match tokio::time::timeout(deadline, self.pull(spec, max, wait)).await {
            Ok(result) => result,
            Err(_) => Err(BusError::unavailable(format!(
                "a pull from {} got no answer within {deadline:?}",
                spec.durable
            ))),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_required_by_a_tls_url_a_ca_or_a_client_certificate() {
        let plain = NatsOptions {
            url: "nats://nats:4222".into(),
            ..Default::default()
        };
        assert!(!plain.tls_required());
        for opts in [
            NatsOptions {
                url: "nats://a:4222, TLS://b:4222".into(),
                ..Default::default()
            },
            NatsOptions {
                tls_ca: Some("ca.crt".into()),
                ..plain.clone()
            },
            NatsOptions {
                tls_cert: Some("client.crt".into()),
                tls_key: Some("client.key".into()),
                ..plain.clone()
            },
        ] {
            assert!(opts.tls_required(), "{opts:?}");
        }
    }

    #[test]
    fn tls_files_are_checked_with_the_flag_and_the_path() {
        let dir =
            std::env::temp_dir().join(format!("radflow-nats-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.crt");
        let not_pem = dir.join("not-pem.crt");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let err = |opts: NatsOptions| opts.check_tls_files().unwrap_err().to_string();

        let e = err(NatsOptions {
            tls_ca: Some(missing.clone()),
            ..Default::default()
        });
        assert!(
            e.contains("--nats-tls-ca") && e.contains(&*missing.to_string_lossy()),
            "{e}"
        );
        assert!(e.contains("cannot read it"), "{e}");
        let e = err(NatsOptions {
            tls_ca: Some(not_pem.clone()),
            ..Default::default()
        });
        assert!(
            e.contains("--nats-tls-ca") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        let e = err(NatsOptions {
            tls_cert: Some(not_pem.clone()),
            ..Default::default()
        });
        assert!(e.contains("go together"), "{e}");
        let e = err(NatsOptions {
            tls_key: Some(not_pem.clone()),
            ..Default::default()
        });
        assert!(e.contains("go together"), "{e}");
        assert!(NatsOptions::default().check_tls_files().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls_are_logged_without_credentials() {
        assert_eq!(
            redacted("nats://radflow:hunter2@a:4222,tls://b:4222"),
            "nats://[redacted]@a:4222,tls://b:4222"
        );
        assert_eq!(redacted("tls://nats:4222"), "tls://nats:4222");
    }
}
