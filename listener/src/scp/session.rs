//! An accepted association's data transfer phase: commands, datasets, large instances
//! written in parts, responses, and how the association ended.
//!
//! A C-STORE dataset is collected behind the Part-10 header built from its command, then
//! scanned and checked against the command before the sink sees it; one that reaches
//! `stream_threshold` goes to the sink's part writer as it arrives (see the module docs
//! of [`crate::scp`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use dicom_object::FileMetaTableBuilder;
use dicom_ul::pdu::{AbortRQServiceProviderReason, PDataValueType, Pdu};
use radflow_shared::metrics::Metrics;
use tracing::{debug, info, warn};

use super::accept::Shared;
use super::config::{PartWriter, ReceivedInstance, StoreFailure};
use crate::association::{
    AcceptedContext, Assembled, ConnError, Connection, IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME, Negotiation, PdvAssembler,
};
use crate::dataset::{InstanceFacts, ScanError, TailCheck, scan, scan_prefix};
use crate::dimse::{self, Command, field};
use crate::sop_classes::VERIFICATION;

/// Largest dataset prefix collected while looking for the attributes that name an
/// instance's store key, before it is written in parts.
const MAX_SCAN_PREFIX: usize = 16 * 1024 * 1024;

/// Initial dataset buffer size; it grows with the data actually received.
const INITIAL_DATASET_CAPACITY: u64 = 1024 * 1024;

/// The association from its acceptance to its end: the data transfer, then the release
/// hook, the end's log line and metrics.
pub(super) async fn run(
    shared: &Shared,
    peer: SocketAddr,
    conn: Connection,
    negotiation: &Negotiation,
) {
    let config = &shared.config;
    shared.metrics.associations_active.inc();
    let _active = ActiveGuard(&shared.metrics);

    let mut session = Session {
        shared,
        peer,
        negotiation,
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
