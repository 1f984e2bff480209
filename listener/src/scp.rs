//! The DICOM storage SCP: accept loop, one task per association, C-ECHO and C-STORE.
//!
//! [`serve`] takes an already bound listener (tests use port 0) and runs until the
//! shutdown token is cancelled. Each connection becomes an association task that
//! negotiates (see [`crate::association`]), then reads PDUs until release, abort, timeout
//! or shutdown.
//!
//! A C-STORE dataset is collected directly behind a Part-10 header built from the command
//! (preamble, `DICM`, File Meta group), so the stored file is the header plus the dataset
//! bytes exactly as they arrived, with no copy. Before the sink sees an instance, the
//! dataset must scan cleanly and carry the SOP Class/Instance UIDs of its command. The
//! association task waits for the sink before it answers: a Success status therefore
//! means whatever the sink means by "stored" (for radflow: durable in the store and on the
//! bus). Any failure is answered with a failure status, so the sender keeps the instance
//! and retries.
//!
//! A dataset larger than `stream_threshold` is not held whole: once that much has
//! arrived, the scanner reads the UIDs from what is there (collecting more, up to 16 MiB,
//! if they lie further on), the sink opens a part writer (a multipart upload, or a
//! staging file on a folder store) and the rest goes to the store in parts of
//! `part_size` as it arrives. A part is handed over before the next PDU is read, so a
//! slow store slows the sender (TCP back-pressure) instead of filling memory; an
//! association therefore holds at most about `stream_threshold + part_size` bytes.
//! The parts pass through a [`TailCheck`] that follows the top-level elements (and the
//! fragments of encapsulated pixel data) without keeping them, so a dataset cut short
//! is refused with 0xC000 and its parts discarded, as it is when received whole.
//!
//! When a TLS configuration is given, every connection must complete a TLS handshake
//! (within the ARTIM timeout) before its first PDU is read.
//!
//! On shutdown the listener closes its port (a connection accepted just before but not
//! yet associated is rejected with "temporary congestion"), running associations carry
//! on until their sender releases them, and after `shutdown_grace` whatever is left is
//! aborted; an instance whose response was not sent is not acknowledged, so the sender
//! retries it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use dicom_object::FileMetaTableBuilder;
use dicom_ul::pdu::{AbortRQServiceProviderReason, PDataValueType, Pdu};
use radflow_shared::metrics::Metrics;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::association::{
    AcceptedContext, Assembled, CallerRule, ConnError, Connection, IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME, Negotiation, PduStream, PdvAssembler, Rejection, negotiate,
};
use crate::dataset::{InstanceFacts, ScanError, TailCheck, scan, scan_prefix};
use crate::dimse::{self, Command, field};
use crate::sop_classes::{DEFAULT_TRANSFER_SYNTAXES, VERIFICATION};

/// Listener settings. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// Called AE titles we answer to; a request to any other is rejected.
    pub ae_titles: Vec<String>,
    /// Who may associate; empty means anyone. A caller must match one rule.
    pub allowed_callers: Vec<CallerRule>,
    /// Maximum PDU length we advertise and enforce (bounds every read from a peer).
    pub max_pdu: u32,
    /// Concurrent associations; more are rejected transiently ("local limit exceeded").
    pub max_associations: usize,
    /// Time allowed for the A-ASSOCIATE-RQ to arrive, and for the peer to close after
    /// release (the upper layer's ARTIM timer).
    pub artim_timeout: Duration,
    /// An association with no PDU for this long is aborted.
    pub idle_timeout: Duration,
    /// Largest dataset accepted; a larger one is drained, dropped and refused (0xA700).
    pub max_instance_bytes: u64,
    /// Transfer syntaxes accepted, any order (the proposer's preference decides).
    pub transfer_syntaxes: Vec<String>,
    /// Private (non-standard) storage SOP classes to accept besides the standard ones.
    pub private_sop_classes: Vec<String>,
    /// How long running associations may continue after shutdown is requested.
    pub shutdown_grace: Duration,
    /// Datasets larger than this are written to the store in parts as they arrive.
    pub stream_threshold: u64,
    /// Size of each part written while streaming (S3 wants at least 5 MiB).
    pub part_size: usize,
    /// DICOM over TLS: when set, every connection must complete a TLS handshake.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ScpConfig {
    fn default() -> Self {
        ScpConfig {
            ae_titles: vec!["RADFLOW".to_string()],
            allowed_callers: Vec::new(),
            max_pdu: 256 * 1024,
            max_associations: 64,
            artim_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_instance_bytes: 4 * 1024 * 1024 * 1024,
            transfer_syntaxes: DEFAULT_TRANSFER_SYNTAXES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            private_sop_classes: Vec::new(),
            shutdown_grace: Duration::from_secs(20),
            stream_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            tls: None,
        }
    }
}

/// An instance received with C-STORE and validated, handed to the sink.
#[derive(Debug, Clone)]
pub struct ReceivedInstance {
    /// The attributes scanned from its dataset.
    pub facts: InstanceFacts,
    /// The transfer syntax of the dataset (the presentation context's).
    pub transfer_syntax: String,
    /// The sender's AE title.
    pub calling_ae: String,
    /// The AE title the sender addressed.
    pub called_ae: String,
    /// The sender's network address.
    pub peer: SocketAddr,
    /// The complete Part-10 file: preamble, `DICM`, File Meta group, dataset as received.
    /// Empty when the instance was written in parts (see [`PartWriter::finish`]).
    pub file: Bytes,
    /// Size of the Part-10 file in bytes.
    pub size: u64,
}

/// Why the sink could not take an instance; each maps to a C-STORE failure status.
///
/// The message becomes the Error Comment (cut to 64 characters): operator text only,
/// never values from the dataset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreFailure {
    /// 0xA700: the instance could not be kept now (store or bus unavailable, disk full);
    /// the sender should retry later.
    #[error("out of resources: {0}")]
    OutOfResources(String),
    /// 0xA900: the dataset does not fit its SOP class.
    #[error("dataset does not match SOP class: {0}")]
    DatasetMismatch(String),
    /// 0xC000: the dataset cannot be processed.
    #[error("cannot understand: {0}")]
    CannotUnderstand(String),
}

impl StoreFailure {
    /// The refusal of a dataset the scanner could not accept: 0xA900 when its pixel
    /// data cannot be what its image attributes say, 0xC000 when its structure is
    /// broken.
    pub fn refusing(e: ScanError) -> Self {
        match e {
            ScanError::Pixels(_) => StoreFailure::DatasetMismatch(e.to_string()),
            _ => StoreFailure::CannotUnderstand(e.to_string()),
        }
    }

    /// The DIMSE status for the C-STORE-RSP.
    pub fn status(&self) -> u16 {
        match self {
            StoreFailure::OutOfResources(_) => dimse::OUT_OF_RESOURCES,
            StoreFailure::DatasetMismatch(_) => dimse::DATASET_DOES_NOT_MATCH_SOP_CLASS,
            StoreFailure::CannotUnderstand(_) => dimse::CANNOT_UNDERSTAND,
        }
    }

    /// The operator text, used as the Error Comment.
    pub fn comment(&self) -> &str {
        match self {
            StoreFailure::OutOfResources(s)
            | StoreFailure::DatasetMismatch(s)
            | StoreFailure::CannotUnderstand(s) => s,
        }
    }
}

/// Where validated instances go. `store` returns once the instance is safe (or failed);
/// the C-STORE response waits for it.
#[async_trait::async_trait]
pub trait InstanceSink: Send + Sync + 'static {
    /// Keep one instance. `Ok` is answered with Success.
    async fn store(&self, instance: ReceivedInstance) -> Result<(), StoreFailure>;

    /// Start keeping an instance whose Part-10 bytes follow in parts (one that reached
    /// `stream_threshold`). `Err` refuses it (the rest of the dataset is drained and
    /// dropped).
    async fn begin_parts(&self, facts: &InstanceFacts)
    -> Result<Box<dyn PartWriter>, StoreFailure>;
}

/// Receives a large instance part by part; see [`InstanceSink::begin_parts`].
#[async_trait::async_trait]
pub trait PartWriter: Send {
    /// The next bytes of the Part-10 file (the first part starts with its header).
    async fn write(&mut self, part: Bytes) -> Result<(), StoreFailure>;
    /// Every part was written: keep the instance (`instance.file` is empty). `Ok` is
    /// answered with Success; on `Err` nothing of the instance may remain visible.
    async fn finish(self: Box<Self>, instance: ReceivedInstance) -> Result<(), StoreFailure>;
    /// The instance will not be completed: discard what was written.
    async fn abort(self: Box<Self>);
}

/// Hooks into the association life cycle.
pub trait AssociationHooks: Send + Sync {
    /// Called for each association that passed the AE title and caller checks, before it
    /// is accepted. `Err` rejects it (use a transient [`Rejection`] for back-pressure).
    fn admit(&self) -> Result<(), Rejection>;

    /// Called when an association was released normally, with the distinct
    /// (Study Instance UID, Series Instance UID) pairs stored on it: a hint that these
    /// series may be complete.
    fn released(&self, calling_ae: &str, called_ae: &str, study_series: &[(String, String)]);
}

/// Hooks that admit everything and ignore releases.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl AssociationHooks for NoHooks {
    fn admit(&self) -> Result<(), Rejection> {
        Ok(())
    }

    fn released(&self, _calling_ae: &str, _called_ae: &str, _study_series: &[(String, String)]) {}
}

/// Connections beyond `max_associations` that may wait for their rejection at once; more
/// are closed without a word.
const MAX_PENDING_REJECTIONS: usize = 64;

/// Largest dataset prefix collected while looking for the attributes that name an
/// instance's store key, before it is written in parts.
const MAX_SCAN_PREFIX: usize = 16 * 1024 * 1024;

/// Initial dataset buffer size; it grows with the data actually received.
const INITIAL_DATASET_CAPACITY: u64 = 1024 * 1024;

/// Everything an association task shares with the others.
struct Shared {
    config: Arc<ScpConfig>,
    sink: Arc<dyn InstanceSink>,
    hooks: Arc<dyn AssociationHooks>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    connections: AtomicUsize,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

/// Run the SCP on `listener` until `shutdown` is cancelled, then drain (see module docs).
///
/// Returns after every association task has ended. Errors accepting one connection are
/// logged and do not stop the server.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ScpConfig>,
    sink: Arc<dyn InstanceSink>,
    hooks: Arc<dyn AssociationHooks>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(config.max_associations)),
        config,
        sink,
        hooks,
        metrics,
        connections: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, ae_titles = ?shared.config.ae_titles, "DICOM listener ready");
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Typically out of file descriptors; back off instead of spinning.
                warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let open = shared.connections.fetch_add(1, Ordering::SeqCst);
        if open >= shared.config.max_associations + MAX_PENDING_REJECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, open, "too many open connections; closing without a reply");
            shared.metrics.association("rejected_connections");
            drop(stream);
            continue;
        }
        let span = info_span!(
            "association",
            %peer,
            calling_ae = tracing::field::Empty,
            called_ae = tracing::field::Empty
        );
        let task_shared = shared.clone();
        tracker.spawn(
            async move {
                run_association(stream, peer, &task_shared).await;
                task_shared.connections.fetch_sub(1, Ordering::SeqCst);
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    let running = tracker.len();
    if running > 0 {
        info!(running, grace = ?shared.config.shutdown_grace, "waiting for associations to finish");
    }
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            running = tracker.len(),
            "shutdown grace period over; aborting remaining associations"
        );
        shared.hard_stop.cancel();
        tracker.wait().await;
    }
    info!("DICOM listener stopped");
    Ok(())
}

/// One connection from first byte to close.
async fn run_association(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let config = &shared.config;
    // Responses are small writes; without this the peer's delayed ACK stalls each one.
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn PduStream> = match &config.tls {
        None => Box::new(stream),
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            match tokio::time::timeout(config.artim_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => Box::new(tls_stream),
                Ok(Err(e)) => {
                    warn!(error = %e, "TLS handshake failed; closing");
                    shared.metrics.association("rejected_tls");
                    return;
                }
                Err(_) => {
                    warn!("no TLS handshake within the ARTIM timeout; closing");
                    shared.metrics.association("rejected_tls");
                    return;
                }
            }
        }
    };
    let mut conn = Connection::new(stream, config.max_pdu);

    let request = match conn.receive_request(config.artim_timeout).await {
        Ok(Pdu::AssociationRQ(rq)) => rq,
        Ok(other) => {
            warn!(
                pdu = %other.short_description(),
                "expected an association request; aborting"
            );
            conn.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                .await;
            return;
        }
        Err(ConnError::Closed) => {
            debug!("connection closed before an association request");
            return;
        }
        Err(e) => {
            warn!(error = %e, "no valid association request; aborting");
            conn.abort(AbortRQServiceProviderReason::InvalidPduParameter)
                .await;
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("calling_ae", request.calling_ae_title.trim());
    span.record("called_ae", request.called_ae_title.trim());

    let negotiation = match negotiate(&request, config, peer.ip()) {
        Ok(n) => n,
        Err(rejection) => return reject(shared, &mut conn, rejection).await,
    };
    if shared.shutdown.is_cancelled() {
        let r = Rejection::congested("listener is shutting down");
        return reject(shared, &mut conn, r).await;
    }
    let Ok(_slot) = shared.slots.clone().try_acquire_owned() else {
        let r = Rejection::limit_exceeded(format!(
            "{} associations are already active",
            config.max_associations
        ));
        return reject(shared, &mut conn, r).await;
    };
    if let Err(rejection) = shared.hooks.admit() {
        return reject(shared, &mut conn, rejection).await;
    }

    conn.set_peer_max_pdu(negotiation.peer_max_pdu);
    if let Err(e) = conn
        .send(&Pdu::AssociationAC(negotiation.response.clone()))
        .await
    {
        warn!(error = %e, "could not send the association acceptance");
        return;
    }
    info!(
        accepted = negotiation.accepted.len(),
        proposed = negotiation.proposed,
        "association accepted"
    );
    shared.metrics.association("accepted");
    shared.metrics.associations_active.inc();
    let _active = ActiveGuard(&shared.metrics);

    let mut session = Session {
        shared,
        peer,
        negotiation: &negotiation,
        conn,
        assembler: PdvAssembler::new(config.max_instance_bytes),
        pending: None,
        instances: 0,
        failures: 0,
        study_series: Vec::new(),
        seen: HashSet::new(),
        streaming: None,
        next_scan_at: 0,
    };
    let end = session.run().await;
    if let Some(Streaming::Writing { writer, .. }) = session.streaming.take() {
        writer.abort().await;
    }
    if matches!(end, End::PeerAborted | End::Aborted(_)) {
        shared.metrics.association("aborted");
    }
    let (instances, failures) = (session.instances, session.failures);
    match end {
        End::Released => {
            info!(instances, failures, "association released");
            shared.hooks.released(
                &negotiation.calling_ae,
                &negotiation.called_ae,
                &session.study_series,
            );
            session.conn.finish(config.artim_timeout).await;
        }
        End::PeerAborted => warn!(instances, failures, "association aborted by the peer"),
        End::Closed(why) => warn!(instances, failures, reason = %why, "association ended"),
        End::Aborted(why) => warn!(instances, failures, reason = %why, "association aborted"),
    }
}

async fn reject(shared: &Shared, conn: &mut Connection, rejection: Rejection) {
    warn!(reason = %rejection, "association rejected");
    shared
        .metrics
        .association(&format!("rejected_{}", rejection.reason.label()));
    let _ = conn
        .send_and_close(&rejection.to_pdu(), shared.config.artim_timeout)
        .await;
}

/// Keeps the active-associations gauge right however the association ends.
struct ActiveGuard<'a>(&'a Metrics);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.associations_active.dec();
    }
}

/// A large instance being written in parts.
enum Streaming {
    /// Parts go to this writer.
    Writing {
        writer: Box<dyn PartWriter>,
        facts: InstanceFacts,
        /// Follows the dataset's structure to its end (a cut dataset is refused).
        tail: Box<TailCheck>,
    },
    /// Refused before or while writing; the rest is drained, this is the answer.
    Refused(StoreFailure),
}

/// How an association ended.
enum End {
    /// A-RELEASE completed.
    Released,
    /// The peer sent A-ABORT.
    PeerAborted,
    /// The connection ended without release or abort.
    Closed(String),
    /// We sent A-ABORT, for this reason.
    Aborted(String),
}

/// What to answer once the dataset announced by a command has arrived.
struct Pending {
    context_id: u8,
    message_id: u16,
    action: PendingAction,
}

enum PendingAction {
    /// Validate and store the dataset, collected behind a file header of this length.
    Store {
        sop_class: String,
        sop_instance: String,
        header_len: usize,
    },
    /// Drop the dataset and answer with this response.
    Reply(Vec<u8>),
    /// Drop the dataset, answer nothing (C-CANCEL).
    Nothing,
}

/// The accepted association's data transfer phase.
struct Session<'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    negotiation: &'a Negotiation,
    conn: Connection,
    assembler: PdvAssembler,
    pending: Option<Pending>,
    instances: u64,
    failures: u64,
    study_series: Vec<(String, String)>,
    seen: HashSet<(String, String)>,
    streaming: Option<Streaming>,
    /// Buffered bytes at which the next prefix scan is tried.
    next_scan_at: u64,
}

/// What woke the session loop.
enum Wake {
    Pdu(Result<Pdu, ConnError>),
    HardStop,
}

/// A reason to abort the association.
struct Abort(AbortRQServiceProviderReason, String);

impl Session<'_> {
    async fn run(&mut self) -> End {
        let config = &self.shared.config;
        loop {
            let wake = tokio::select! {
                biased;
                _ = self.shared.hard_stop.cancelled() => Wake::HardStop,
                r = self.conn.receive(config.idle_timeout) => Wake::Pdu(r),
            };
            let pdu = match wake {
                Wake::HardStop => {
                    return self
                        .abort(Abort(
                            AbortRQServiceProviderReason::ReasonNotSpecified,
                            "shutdown grace period over".into(),
                        ))
                        .await;
                }
                Wake::Pdu(Ok(pdu)) => pdu,
                Wake::Pdu(Err(ConnError::Closed)) => {
                    return End::Closed("peer closed the connection without release".into());
                }
                Wake::Pdu(Err(ConnError::Io(e))) => return End::Closed(format!("socket: {e}")),
                Wake::Pdu(Err(e @ ConnError::Timeout(_))) => {
                    return self
                        .abort(Abort(
                            AbortRQServiceProviderReason::ReasonNotSpecified,
                            e.to_string(),
                        ))
                        .await;
                }
                Wake::Pdu(Err(e @ ConnError::Protocol(_))) => {
                    return self
                        .abort(Abort(
                            AbortRQServiceProviderReason::InvalidPduParameter,
                            e.to_string(),
                        ))
                        .await;
                }
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        if let Err(abort) = self.on_fragment(pdv).await {
                            return self.abort(abort).await;
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    if !self.assembler.is_idle() {
                        warn!("release requested in the middle of a message");
                    }
                    // The connection is closed by the caller, after the hooks ran.
                    if let Err(e) = self.conn.send(&Pdu::ReleaseRP).await {
                        return End::Closed(format!("could not answer the release: {e}"));
                    }
                    return End::Released;
                }
                Pdu::AbortRQ { .. } => return End::PeerAborted,
                Pdu::Unknown { pdu_type, .. } => {
                    return self
                        .abort(Abort(
                            AbortRQServiceProviderReason::UnrecognizedPdu,
                            format!("unrecognized PDU type {pdu_type:#04x}"),
                        ))
                        .await;
                }
                other => {
                    let what = other.short_description().to_string();
                    return self
                        .abort(Abort(
                            AbortRQServiceProviderReason::UnexpectedPdu,
                            format!("unexpected PDU during data transfer: {what}"),
                        ))
                        .await;
                }
            }
        }
    }

    async fn abort(&mut self, Abort(reason, why): Abort) -> End {
        self.conn.abort(reason).await;
        End::Aborted(why)
    }

    async fn on_fragment(&mut self, pdv: dicom_ul::pdu::PDataValue) -> Result<(), Abort> {
        let is_data = pdv.value_type == PDataValueType::Data;
        let assembled = self.assembler.push(pdv).map_err(|e| {
            Abort(
                AbortRQServiceProviderReason::UnexpectedPduParameter,
                e.to_string(),
            )
        })?;
        match assembled {
            Assembled::Partial if is_data => self.stream_parts().await,
            Assembled::Partial => Ok(()),
            Assembled::Command { context_id, bytes } => self.on_command(context_id, &bytes).await,
            Assembled::Dataset {
                context_id,
                buffer,
                received,
                over_limit,
            } => {
                let Some(pending) = self.pending.take() else {
                    return Err(Abort(
                        AbortRQServiceProviderReason::UnexpectedPduParameter,
                        "dataset without a command".into(),
                    ));
                };
                debug_assert_eq!(pending.context_id, context_id);
                self.on_dataset(pending, buffer, received, over_limit).await
            }
        }
    }

    async fn on_command(&mut self, context_id: u8, bytes: &[u8]) -> Result<(), Abort> {
        let negotiation = self.negotiation;
        let Some(context) = negotiation.context(context_id) else {
            return Err(Abort(
                AbortRQServiceProviderReason::UnexpectedPduParameter,
                format!("message on presentation context {context_id}, which was not accepted"),
            ));
        };
        let command = dimse::parse_command(bytes).map_err(|e| {
            Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
                format!("unreadable command set: {e}"),
            )
        })?;
        if command.is_response() {
            return Err(Abort(
                AbortRQServiceProviderReason::UnexpectedPduParameter,
                format!("unexpected response command {:#06x}", command.field),
            ));
        }
        let mut action = self.decide(context, &command);
        if command.has_dataset {
            let buffer = match &mut action {
                PendingAction::Store {
                    sop_class,
                    sop_instance,
                    header_len,
                } => {
                    let header = self
                        .file_header(sop_class, sop_instance, &context.transfer_syntax)
                        .map_err(|e| Abort(AbortRQServiceProviderReason::ReasonNotSpecified, e))?;
                    *header_len = header.len();
                    Some(header)
                }
                _ => None,
            };
            self.assembler.expect_dataset(context_id, buffer);
            self.pending = Some(Pending {
                context_id,
                message_id: command.message_id,
                action,
            });
            return Ok(());
        }
        match action {
            PendingAction::Reply(response) => self.respond(context_id, &response).await,
            // decide() only stores when a dataset follows.
            PendingAction::Store { .. } | PendingAction::Nothing => Ok(()),
        }
    }

    /// What to do with a request on an accepted context.
    fn decide(&self, context: &AcceptedContext, command: &Command) -> PendingAction {
        let rsp = |status: u16, comment: &str| {
            if command.field == field::C_STORE_RQ {
                self.shared.metrics.cstore_failure(status);
            }
            dimse::build_response(
                command.field | 0x8000,
                command.message_id,
                command.affected_sop_class_uid.as_deref(),
                command.affected_sop_instance_uid.as_deref(),
                status,
                Some(comment),
            )
        };
        match command.field {
            field::C_ECHO_RQ => {
                PendingAction::Reply(dimse::c_echo_rsp(command.message_id, dimse::SUCCESS))
            }
            field::C_STORE_RQ => {
                let (Some(sop_class), Some(sop_instance)) = (
                    &command.affected_sop_class_uid,
                    &command.affected_sop_instance_uid,
                ) else {
                    return PendingAction::Reply(rsp(
                        dimse::CANNOT_UNDERSTAND,
                        "C-STORE-RQ lacks the affected SOP class or instance UID",
                    ));
                };
                if !command.has_dataset {
                    return PendingAction::Reply(rsp(
                        dimse::CANNOT_UNDERSTAND,
                        "C-STORE-RQ without a dataset",
                    ));
                }
                if context.abstract_syntax == VERIFICATION || *sop_class != context.abstract_syntax
                {
                    return PendingAction::Reply(rsp(
                        dimse::REFUSED_SOP_CLASS_NOT_SUPPORTED,
                        "SOP class differs from the presentation context",
                    ));
                }
                PendingAction::Store {
                    sop_class: sop_class.clone(),
                    sop_instance: sop_instance.clone(),
                    header_len: 0,
                }
            }
            field::C_CANCEL_RQ => PendingAction::Nothing,
            other => {
                debug!(
                    command = format_args!("{other:#06x}"),
                    "unsupported DIMSE operation"
                );
                PendingAction::Reply(rsp(
                    dimse::UNRECOGNIZED_OPERATION,
                    "only C-ECHO and C-STORE are supported",
                ))
            }
        }
    }

    /// Preamble, `DICM` and File Meta group for an instance about to arrive.
    fn file_header(
        &self,
        sop_class: &str,
        sop_instance: &str,
        transfer_syntax: &str,
    ) -> Result<BytesMut, String> {
        let mut builder = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(sop_class)
            .media_storage_sop_instance_uid(sop_instance)
            .transfer_syntax(transfer_syntax)
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
        if !self.negotiation.calling_ae.is_empty() {
            builder = builder.source_application_entity_title(self.negotiation.calling_ae.as_str());
        }
        let meta = builder
            .build()
            .map_err(|e| format!("could not build the file meta group: {e}"))?;
        let capacity = self
            .shared
            .config
            .max_instance_bytes
            .min(INITIAL_DATASET_CAPACITY) as usize;
        let mut buffer = BytesMut::with_capacity(132 + 256 + capacity);
        buffer.put_bytes(0, 128);
        buffer.put_slice(b"DICM");
        let mut writer = buffer.writer();
        meta.write(&mut writer)
            .map_err(|e| format!("could not write the file meta group: {e}"))?;
        Ok(writer.into_inner())
    }

    async fn on_dataset(
        &mut self,
        pending: Pending,
        buffer: Option<BytesMut>,
        received: u64,
        over_limit: bool,
    ) -> Result<(), Abort> {
        let started = Instant::now();
        let Pending {
            context_id,
            message_id,
            action,
        } = pending;
        let (sop_class, sop_instance, header_len) = match action {
            PendingAction::Reply(response) => return self.respond(context_id, &response).await,
            PendingAction::Nothing => return Ok(()),
            PendingAction::Store {
                sop_class,
                sop_instance,
                header_len,
            } => (sop_class, sop_instance, header_len),
        };
        let streaming = self.streaming.take();
        self.next_scan_at = 0;
        let outcome = if over_limit {
            if let Some(Streaming::Writing { writer, .. }) = streaming {
                writer.abort().await;
            }
            self.failures += 1;
            warn!(
                received,
                limit = self.shared.config.max_instance_bytes,
                "instance refused: larger than the size limit"
            );
            Err(StoreFailure::OutOfResources(
                "instance exceeds the size limit".into(),
            ))
        } else {
            match (streaming, buffer) {
                (Some(Streaming::Refused(failure)), _) => {
                    self.failures += 1;
                    Err(failure)
                }
                (
                    Some(Streaming::Writing {
                        writer,
                        facts,
                        tail,
                    }),
                    rest,
                ) => {
                    let size = header_len as u64 + received;
                    self.finish_parts(context_id, writer, facts, tail, rest, size)
                        .await?
                }
                (None, Some(file)) => {
                    self.store(context_id, &sop_class, &sop_instance, file, header_len)
                        .await?
                }
                (None, None) => {
                    self.failures += 1;
                    Err(StoreFailure::OutOfResources(
                        "instance could not be buffered".into(),
                    ))
                }
            }
        };
        let (status, comment) = match &outcome {
            Ok(()) => (dimse::SUCCESS, None),
            Err(f) => {
                self.shared.metrics.cstore_failure(f.status());
                (f.status(), Some(f.comment()))
            }
        };
        let response = dimse::c_store_rsp(message_id, &sop_class, &sop_instance, status, comment);
        let sent = self.respond(context_id, &response).await;
        self.shared
            .metrics
            .cstore_seconds
            .observe(started.elapsed().as_secs_f64());
        sent
    }

    /// Once `stream_threshold` bytes of a dataset to be stored have arrived, start
    /// writing it in parts; after that, write a part whenever `part_size` is buffered.
    async fn stream_parts(&mut self) -> Result<(), Abort> {
        let Some(Pending {
            context_id,
            action:
                PendingAction::Store {
                    sop_class,
                    sop_instance,
                    header_len,
                },
            ..
        }) = &self.pending
        else {
            return Ok(());
        };
        let config = &self.shared.config;
        let buffered = self.assembler.buffered();
        match &mut self.streaming {
            Some(Streaming::Refused(_)) => Ok(()),
            Some(Streaming::Writing { writer, tail, .. }) => {
                if buffered < config.part_size {
                    return Ok(());
                }
                let part = self.assembler.take_buffered().unwrap_or_default().freeze();
                tail.feed(&part);
                let written = tokio::select! {
                    r = writer.write(part) => r,
                    _ = self.shared.hard_stop.cancelled() => return Err(Abort(
                        AbortRQServiceProviderReason::ReasonNotSpecified,
                        "shutdown grace period over while storing".into(),
                    )),
                };
                if let Err(failure) = written {
                    warn!(status = format_args!("{:#06x}", failure.status()), error = %failure, "writing a part failed; draining the rest");
                    if let Some(Streaming::Writing { writer, .. }) = self.streaming.take() {
                        writer.abort().await;
                    }
                    self.streaming = Some(Streaming::Refused(failure));
                    self.assembler.discard();
                }
                Ok(())
            }
            None => {
                if (buffered as u64) < config.stream_threshold.max(self.next_scan_at) {
                    return Ok(());
                }
                let (context_id, header_len) = (*context_id, *header_len);
                let (sop_class, sop_instance) = (sop_class.clone(), sop_instance.clone());
                let Some(context) = self.negotiation.context(context_id) else {
                    return Err(Abort(
                        AbortRQServiceProviderReason::UnexpectedPduParameter,
                        "dataset on an unknown presentation context".into(),
                    ));
                };
                let facts = match scan_prefix(
                    &self.assembler.peek()[header_len..],
                    &context.transfer_syntax,
                ) {
                    Ok(facts) => Ok(facts),
                    // The attributes may lie further on: collect more, up to a limit.
                    Err(
                        ScanError::MissingAttribute(_)
                        | ScanError::TruncatedHeader { .. }
                        | ScanError::LengthBeyondEnd { .. },
                    ) if buffered < MAX_SCAN_PREFIX => {
                        self.next_scan_at = (buffered as u64).saturating_mul(2);
                        return Ok(());
                    }
                    Err(e) => Err(e),
                };
                let first = self.assembler.take_buffered().unwrap_or_default();
                let state = self
                    .begin_parts(&sop_class, &sop_instance, first, facts)
                    .await?;
                if matches!(state, Streaming::Refused(_)) {
                    self.assembler.discard();
                }
                self.streaming = Some(state);
                Ok(())
            }
        }
    }

    /// Validate the start of an instance and write it as the first part.
    async fn begin_parts(
        &mut self,
        sop_class: &str,
        sop_instance: &str,
        first: BytesMut,
        scanned: Result<(InstanceFacts, TailCheck), ScanError>,
    ) -> Result<Streaming, Abort> {
        let (facts, tail) = match scanned {
            Ok(scanned) => scanned,
            Err(e) => {
                warn!(error = %e, "instance refused: dataset is malformed");
                return Ok(Streaming::Refused(StoreFailure::refusing(e)));
            }
        };
        if facts.sop_class_uid != sop_class || facts.sop_instance_uid != sop_instance {
            warn!(
                "large instance refused: dataset SOP class/instance UID differs from the command"
            );
            return Ok(Streaming::Refused(StoreFailure::DatasetMismatch(
                "SOP class/instance UID differs from the command".into(),
            )));
        }
        debug!(
            buffered = first.len(),
            "writing the instance to the store in parts"
        );
        let begun = tokio::select! {
            r = self.shared.sink.begin_parts(&facts) => r,
            _ = self.shared.hard_stop.cancelled() => return Err(Abort(
                AbortRQServiceProviderReason::ReasonNotSpecified,
                "shutdown grace period over while storing".into(),
            )),
        };
        let mut writer = match begun {
            Ok(w) => w,
            Err(failure) => return Ok(Streaming::Refused(failure)),
        };
        let written = tokio::select! {
            r = writer.write(first.freeze()) => r,
            _ = self.shared.hard_stop.cancelled() => {
                writer.abort().await;
                return Err(Abort(
                    AbortRQServiceProviderReason::ReasonNotSpecified,
                    "shutdown grace period over while storing".into(),
                ));
            }
        };
        match written {
            Ok(()) => Ok(Streaming::Writing {
                writer,
                facts,
                tail: Box::new(tail),
            }),
            Err(failure) => {
                writer.abort().await;
                Ok(Streaming::Refused(failure))
            }
        }
    }

    /// Write the last part of a large instance and let the sink keep it.
    async fn finish_parts(
        &mut self,
        context_id: u8,
        mut writer: Box<dyn PartWriter>,
        facts: InstanceFacts,
        mut tail: Box<TailCheck>,
        rest: Option<BytesMut>,
        size: u64,
    ) -> Result<Result<(), StoreFailure>, Abort> {
        let negotiation = self.negotiation;
        let Some(context) = negotiation.context(context_id) else {
            writer.abort().await;
            return Err(Abort(
                AbortRQServiceProviderReason::UnexpectedPduParameter,
                "dataset on an unknown presentation context".into(),
            ));
        };
        let key = (facts.study_uid.clone(), facts.series_uid.clone());
        if let Some(rest) = &rest {
            tail.feed(rest);
        }
        if let Err(e) = tail.finish() {
            // Checked before the last part is written: nothing of it is kept.
            writer.abort().await;
            let result = Err(StoreFailure::refusing(e));
            self.record_outcome(&result, key, size);
            return Ok(result);
        }
        let instance = ReceivedInstance {
            facts,
            transfer_syntax: context.transfer_syntax.clone(),
            calling_ae: negotiation.calling_ae.clone(),
            called_ae: negotiation.called_ae.clone(),
            peer: self.peer,
            file: Bytes::new(),
            size,
        };
        let stop = self.shared.hard_stop.clone();
        let finished = async move {
            if let Some(rest) = rest.filter(|r| !r.is_empty())
                && let Err(failure) = writer.write(rest.freeze()).await
            {
                writer.abort().await;
                return Err(failure);
            }
            writer.finish(instance).await
        };
        let result = tokio::select! {
            r = finished => r,
            _ = stop.cancelled() => return Err(Abort(
                AbortRQServiceProviderReason::ReasonNotSpecified,
                "shutdown grace period over while storing".into(),
            )),
        };
        self.record_outcome(&result, key, size);
        Ok(result)
    }

    /// Count an instance's outcome and remember its series for the release hint.
    fn record_outcome(
        &mut self,
        result: &Result<(), StoreFailure>,
        key: (String, String),
        size: u64,
    ) {
        match result {
            Ok(()) => {
                self.instances += 1;
                debug!(size, "instance stored");
                if self.seen.insert(key.clone()) {
                    self.study_series.push(key);
                }
            }
            Err(failure) => {
                self.failures += 1;
                warn!(status = format_args!("{:#06x}", failure.status()), error = %failure, "instance not stored");
            }
        }
    }

    /// Validate a complete instance and hand it to the sink.
    async fn store(
        &mut self,
        context_id: u8,
        sop_class: &str,
        sop_instance: &str,
        file: BytesMut,
        header_len: usize,
    ) -> Result<Result<(), StoreFailure>, Abort> {
        let negotiation = self.negotiation;
        let Some(context) = negotiation.context(context_id) else {
            return Err(Abort(
                AbortRQServiceProviderReason::UnexpectedPduParameter,
                "dataset on an unknown presentation context".into(),
            ));
        };
        let facts = match scan(&file[header_len..], &context.transfer_syntax) {
            Ok(facts) => facts,
            Err(e) => {
                self.failures += 1;
                warn!(error = %e, "instance refused: dataset is malformed");
                return Ok(Err(StoreFailure::refusing(e)));
            }
        };
        if facts.sop_class_uid != sop_class || facts.sop_instance_uid != sop_instance {
            self.failures += 1;
            warn!("instance refused: dataset SOP class/instance UID differs from the command");
            return Ok(Err(StoreFailure::DatasetMismatch(
                "SOP class/instance UID differs from the command".into(),
            )));
        }
        let key = (facts.study_uid.clone(), facts.series_uid.clone());
        let size = file.len() as u64;
        let instance = ReceivedInstance {
            facts,
            transfer_syntax: context.transfer_syntax.clone(),
            calling_ae: negotiation.calling_ae.clone(),
            called_ae: negotiation.called_ae.clone(),
            peer: self.peer,
            file: file.freeze(),
            size,
        };
        let result = tokio::select! {
            r = self.shared.sink.store(instance) => r,
            _ = self.shared.hard_stop.cancelled() => {
                return Err(Abort(
                    AbortRQServiceProviderReason::ReasonNotSpecified,
                    "shutdown grace period over while storing".into(),
                ));
            }
        };
        self.record_outcome(&result, key, size);
        Ok(result)
    }

    async fn respond(&mut self, context_id: u8, response: &[u8]) -> Result<(), Abort> {
        self.conn
            .send_command(context_id, response)
            .await
            .map_err(|e| {
                Abort(
                    AbortRQServiceProviderReason::ReasonNotSpecified,
                    format!("could not send a response: {e}"),
                )
            })
    }
}
