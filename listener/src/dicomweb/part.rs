//! One part of a STOW-RS request, from its first byte to stored (or refused).
//!
//! The part is checked as a C-STORE's dataset is: its Part-10 header is read
//! ([`super::part10`]), its dataset scanned by [`crate::dataset`] (the same limits and
//! refusals), its SOP class and transfer syntax must be ones the listener accepts, and
//! the SOP UIDs of its File Meta group must be those of its dataset. It then goes to the
//! same [`Ingest`] as a C-STORE: a small part whole ([`InstanceSink::store`]), a large
//! one in parts while it arrives ([`InstanceSink::begin_parts`]), so a 2 GB instance is
//! never held in memory. The bytes are stored exactly as sent.
//!
//! A refused part is drained and dropped; the request goes on with the next part.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

use super::StowConfig;
use super::part10::{FileHeader, HeaderError, read_header};
use super::response::{self, Outcome};
use crate::dataset::{InstanceFacts, ScanError, TailCheck, scan, scan_prefix};
use crate::ingest::Ingest;
use crate::scp::{InstanceSink, PartWriter, ReceivedInstance, StoreFailure};
use crate::sop_classes::is_storage_sop_class;

/// Most bytes buffered while looking for the attributes the listener needs, as for a
/// C-STORE.
const MAX_SCAN_PREFIX: usize = 16 * 1024 * 1024;

/// The peer address given to the ingest: the HTTP side does not pass the client's.
const NO_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Why a part failed: its Failure Reason and the operator's text (no dataset values).
#[derive(Debug, Clone)]
struct Refusal {
    reason: u16,
    why: String,
}

impl From<StoreFailure> for Refusal {
    fn from(f: StoreFailure) -> Self {
        Refusal {
            reason: f.status(),
            why: f.comment().to_owned(),
        }
    }
}

fn refusal(reason: u16, why: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        why: why.into(),
    }
}

/// Where a part stands while its bytes arrive.
enum State {
    /// Collecting the start of the part (all of it, for a small one).
    Buffering { next_scan_at: usize },
    /// Being written to the store in parts.
    Writing {
        writer: Box<dyn PartWriter>,
        facts: InstanceFacts,
        transfer_syntax: String,
        tail: Box<TailCheck>,
    },
    /// Refused: the rest is drained.
    Refused(Refusal),
}

/// What [`store_part`] found.
pub struct PartResult {
    /// The part's entry in the response.
    pub outcome: Outcome,
    /// Whether the body broke off inside the part (no further part can be read).
    pub body_broken: bool,
}

/// Reads one part from `chunks` and stores it through `ingest`, `study` being the Study
/// Instance UID of the request's URL, if any.
pub async fn store_part<S, E>(
    ingest: &Ingest,
    config: &StowConfig,
    study: Option<&str>,
    mut chunks: S,
) -> PartResult
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    let mut received: u64 = 0;
    let mut header: Option<FileHeader> = None;
    let mut state = State::Buffering { next_scan_at: 0 };
    let mut body_broken = false;
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "the request body broke off inside a part");
                body_broken = true;
                state = abort(
                    state,
                    refusal(
                        response::PROCESSING_FAILURE,
                        "the request body broke off inside the part",
                    ),
                )
                .await;
                break;
            }
        };
        received += chunk.len() as u64;
        if received > config.max_instance_bytes && !matches!(state, State::Refused(_)) {
            buf = BytesMut::new();
            state = abort(
                state,
                StoreFailure::OutOfResources("instance exceeds the size limit".into()).into(),
            )
            .await;
        }
        state = match state {
            State::Refused(r) => State::Refused(r),
            State::Buffering { next_scan_at } => {
                buf.extend_from_slice(&chunk);
                let threshold = (config.stream_threshold as usize).max(next_scan_at);
                if buf.len() < threshold {
                    State::Buffering { next_scan_at }
                } else {
                    begin(ingest, config, study, &mut buf, &mut header).await
                }
            }
            State::Writing {
                mut writer,
                facts,
                transfer_syntax,
                mut tail,
            } => {
                tail.feed(&chunk);
                buf.extend_from_slice(&chunk);
                if buf.len() >= config.part_size {
                    match writer.write(buf.split().freeze()).await {
                        Ok(()) => State::Writing {
                            writer,
                            facts,
                            transfer_syntax,
                            tail,
                        },
                        Err(f) => {
                            writer.abort().await;
                            State::Refused(f.into())
                        }
                    }
                } else {
                    State::Writing {
                        writer,
                        facts,
                        transfer_syntax,
                        tail,
                    }
                }
            }
        };
        if matches!(state, State::Refused(_)) {
            buf = BytesMut::new();
        }
    }
    let result = match state {
        State::Refused(r) => Err(r),
        State::Buffering { .. } => whole(ingest, config, study, buf, &mut header).await,
        State::Writing {
            writer,
            facts,
            transfer_syntax,
            tail,
        } => {
            finish(
                writer,
                &facts,
                transfer_syntax,
                &tail,
                buf,
                received,
                config,
            )
            .await
        }
    };
    let (class, instance) = match &header {
        Some(h) => (h.sop_class_uid.clone(), h.sop_instance_uid.clone()),
        None => (None, None),
    };
    let failure = match result {
        Ok(()) => None,
        Err(r) => {
            tracing::warn!(
                reason = format_args!("{:#06x}", r.reason),
                error = %r.why,
                "STOW-RS part not stored"
            );
            Some(r.reason)
        }
    };
    PartResult {
        outcome: Outcome {
            sop_class_uid: class,
            sop_instance_uid: instance,
            failure,
        },
        body_broken,
    }
}

/// Ends the part's writing, if any, with `refusal`.
async fn abort(state: State, refusal: Refusal) -> State {
    match state {
        State::Writing { writer, .. } => {
            writer.abort().await;
            State::Refused(refusal)
        }
        State::Refused(earlier) => State::Refused(earlier),
        State::Buffering { .. } => State::Refused(refusal),
    }
}

/// Reads the header into `header` and checks what it says.
fn checked_header<'h>(
    config: &StowConfig,
    bytes: &[u8],
    header: &'h mut Option<FileHeader>,
) -> Result<&'h FileHeader, Result<HeaderError, Refusal>> {
    let h = match read_header(bytes) {
        Ok(h) => h,
        Err(HeaderError::Incomplete) => return Err(Ok(HeaderError::Incomplete)),
        Err(e) => return Err(Err(refusal(response::CANNOT_UNDERSTAND, e.to_string()))),
    };
    let h = header.insert(h);
    if !config.transfer_syntaxes.contains(&h.transfer_syntax) {
        return Err(Err(refusal(
            response::CANNOT_UNDERSTAND,
            "transfer syntax not accepted by this listener",
        )));
    }
    Ok(h)
}

/// The checks a C-STORE's negotiation and command make, here against the File Meta
/// group and the URL.
fn check_facts(
    config: &StowConfig,
    header: &FileHeader,
    facts: &InstanceFacts,
    study: Option<&str>,
) -> Result<(), Refusal> {
    let class = &facts.sop_class_uid;
    if !is_storage_sop_class(class) && !config.private_sop_classes.iter().any(|c| c == class) {
        return Err(refusal(
            response::SOP_CLASS_NOT_SUPPORTED,
            "SOP class not accepted by this listener",
        ));
    }
    if header.sop_class_uid.as_ref() != Some(class)
        || header.sop_instance_uid.as_ref() != Some(&facts.sop_instance_uid)
    {
        return Err(StoreFailure::DatasetMismatch(
            "SOP class/instance UID of the File Meta group differs from the dataset".into(),
        )
        .into());
    }
    if let Some(study) = study
        && study != facts.study_uid
    {
        return Err(refusal(
            response::DATASET_MISMATCH,
            "Study Instance UID differs from the request's URL",
        ));
    }
    Ok(())
}

/// The part reached the streaming threshold: validate its start and write it as the
/// first part, or wait for more bytes when its attributes lie further on.
async fn begin(
    ingest: &Ingest,
    config: &StowConfig,
    study: Option<&str>,
    buf: &mut BytesMut,
    header: &mut Option<FileHeader>,
) -> State {
    let more = |buf: &BytesMut| State::Buffering {
        next_scan_at: buf.len().saturating_mul(2),
    };
    let h = match checked_header(config, buf, header) {
        Ok(h) => h.clone(),
        Err(Ok(_)) if buf.len() < MAX_SCAN_PREFIX => return more(buf),
        Err(Ok(e)) => return State::Refused(refusal(response::CANNOT_UNDERSTAND, e.to_string())),
        Err(Err(r)) => return State::Refused(r),
    };
    let (facts, tail) = match scan_prefix(&buf[h.len..], &h.transfer_syntax) {
        Ok(scanned) => scanned,
        Err(
            ScanError::MissingAttribute(_)
            | ScanError::TruncatedHeader { .. }
            | ScanError::LengthBeyondEnd { .. },
        ) if buf.len() < MAX_SCAN_PREFIX => return more(buf),
        Err(e) => return State::Refused(StoreFailure::refusing(e).into()),
    };
    if let Err(r) = check_facts(config, &h, &facts, study) {
        return State::Refused(r);
    }
    let mut writer = match ingest.begin_parts(&facts).await {
        Ok(w) => w,
        Err(f) => return State::Refused(f.into()),
    };
    if let Err(f) = writer.write(buf.split().freeze()).await {
        writer.abort().await;
        return State::Refused(f.into());
    }
    State::Writing {
        writer,
        facts,
        transfer_syntax: h.transfer_syntax,
        tail: Box::new(tail),
    }
}

/// A part that ended before the streaming threshold: validate and store it whole.
async fn whole(
    ingest: &Ingest,
    config: &StowConfig,
    study: Option<&str>,
    buf: BytesMut,
    header: &mut Option<FileHeader>,
) -> Result<(), Refusal> {
    let h = match checked_header(config, &buf, header) {
        Ok(h) => h.clone(),
        Err(Ok(e)) => return Err(refusal(response::CANNOT_UNDERSTAND, e.to_string())),
        Err(Err(r)) => return Err(r),
    };
    let facts = scan(&buf[h.len..], &h.transfer_syntax)
        .map_err(|e| Refusal::from(StoreFailure::refusing(e)))?;
    check_facts(config, &h, &facts, study)?;
    let size = buf.len() as u64;
    let instance = ReceivedInstance {
        facts,
        transfer_syntax: h.transfer_syntax,
        calling_ae: String::new(),
        called_ae: config.called_ae.clone(),
        peer: NO_PEER,
        file: buf.freeze(),
        size,
    };
    ingest.store(instance).await.map_err(Refusal::from)
}

/// The last bytes of a part written in parts: judge its end, then keep it.
async fn finish(
    mut writer: Box<dyn PartWriter>,
    facts: &InstanceFacts,
    transfer_syntax: String,
    tail: &TailCheck,
    rest: BytesMut,
    size: u64,
    config: &StowConfig,
) -> Result<(), Refusal> {
    if let Err(e) = tail.finish() {
        // Judged before the last bytes are written: nothing of it is kept.
        writer.abort().await;
        return Err(StoreFailure::refusing(e).into());
    }
    if !rest.is_empty()
        && let Err(f) = writer.write(rest.freeze()).await
    {
        writer.abort().await;
        return Err(f.into());
    }
    let instance = ReceivedInstance {
        facts: facts.clone(),
        transfer_syntax,
        calling_ae: String::new(),
        called_ae: config.called_ae.clone(),
        peer: NO_PEER,
        file: Bytes::new(),
        size,
    };
    writer.finish(instance).await.map_err(Refusal::from)
}
