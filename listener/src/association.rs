//! The association acceptor: negotiation policy, PDU transport and P-DATA reassembly.
//!
//! `dicom-ul` encodes and decodes the PDUs; this module decides what to answer. We do not
//! use `ServerAssociationOptions` because the listener needs what it cannot express:
//! transient rejections for back-pressure and connection limits, a refusal reason per
//! presentation context, several called AE titles, and a calling-AE allowlist that also
//! looks at the peer's network address.
//!
//! Three parts, each usable on its own:
//! - [`negotiate`]: a pure function from an A-ASSOCIATE-RQ and the configuration to either
//!   an A-ASSOCIATE-AC with the accepted contexts, or a [`Rejection`];
//! - [`Connection`]: one byte stream (TCP, or TLS over TCP) carrying PDUs, whose reads are
//!   bounded by the maximum PDU length we advertised (a larger claim is refused before
//!   anything is allocated);
//! - [`PdvAssembler`]: turns P-DATA value fragments into whole command sets and datasets,
//!   holding at most `max_instance_bytes` of a dataset (the rest is drained and dropped).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationAC, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderASCEReason, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, AssociationRQ, PDataValue, PDataValueType,
    Pdu, PresentationContextResult, PresentationContextResultReason, UserVariableItem,
};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::scp::ScpConfig;
use crate::sop_classes::{VERIFICATION, is_storage_sop_class};

/// Our Implementation Class UID, sent in A-ASSOCIATE-AC/RQ and written into File Meta.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.155821344162961049251119363182117420304";
/// Our Implementation Version Name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("RADFLOW_", env!("CARGO_PKG_VERSION"));

/// The DICOM application context, the only one there is.
pub const DICOM_APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

/// Largest command set accepted; real ones are under 300 bytes.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Largest PDV payload we send, whatever the peer accepts (its 0 means "no limit").
const MAX_SEND_PDV: u32 = 1024 * 1024;

/// Largest A-ASSOCIATE-RQ read, whatever maximum PDU length we advertise for P-DATA:
/// a request proposing 128 contexts with several transfer syntaxes each is ~40 KiB.
const MAX_ASSOCIATE_RQ: u32 = 256 * 1024;

/// The maximum PDU length we actually advertise and enforce: the configured one, kept
/// between the protocol minimum and 16 MiB.
pub fn effective_max_pdu(configured: u32) -> u32 {
    configured.clamp(dicom_ul::pdu::MINIMUM_PDU_SIZE, 16 * 1024 * 1024)
}

/// Who may open associations: an AE title, a network, or both must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerRule {
    /// Calling AE title that must match exactly (after trimming); `None` matches any.
    pub ae_title: Option<String>,
    /// Network the peer's address must be in; `None` matches any.
    pub network: Option<IpNet>,
}

impl CallerRule {
    /// Whether a peer with this calling AE title and address satisfies the rule.
    pub fn matches(&self, calling_ae: &str, peer: IpAddr) -> bool {
        let ae_ok = self
            .ae_title
            .as_deref()
            .is_none_or(|ae| ae.trim() == calling_ae.trim());
        let net_ok = self
            .network
            .is_none_or(|net| net.contains(&peer.to_canonical()));
        ae_ok && net_ok
    }
}

/// Why a caller rule could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid caller rule {0:?}: expected AE, AE@NETWORK or @NETWORK (e.g. CT1@10.0.0.0/8)")]
pub struct CallerRuleParseError(String);

impl FromStr for CallerRule {
    type Err = CallerRuleParseError;

    /// `AE`, `AE@10.1.0.0/16`, `@10.1.2.3` (a bare address is a /32 or /128 network).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CallerRuleParseError(s.to_string());
        let (ae, net) = match s.split_once('@') {
            Some((ae, net)) => (ae.trim(), Some(net.trim())),
            None => (s.trim(), None),
        };
        if ae.len() > 16 {
            return Err(err());
        }
        let network = match net {
            None => None,
            Some(n) => Some(match n.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => IpNet::from(n.parse::<IpAddr>().map_err(|_| err())?),
            }),
        };
        let ae_title = (!ae.is_empty()).then(|| ae.to_string());
        if ae_title.is_none() && network.is_none() {
            return Err(err());
        }
        Ok(CallerRule { ae_title, network })
    }
}

/// The reason given in an A-ASSOCIATE-RJ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Service user: no reason given.
    NoReasonGiven,
    /// Service user: application context name not supported.
    ApplicationContextNotSupported,
    /// Service user: calling AE title not recognized.
    CallingAeNotRecognized,
    /// Service user: called AE title not recognized.
    CalledAeNotRecognized,
    /// Service provider (ACSE): protocol version not supported.
    ProtocolVersionNotSupported,
    /// Service provider (presentation): temporary congestion.
    TemporaryCongestion,
    /// Service provider (presentation): local limit exceeded.
    LocalLimitExceeded,
}

impl RejectReason {
    /// A short label for metrics (`rejected_<label>`).
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::NoReasonGiven => "no_reason",
            RejectReason::ApplicationContextNotSupported => "application_context",
            RejectReason::CallingAeNotRecognized => "calling_ae",
            RejectReason::CalledAeNotRecognized => "called_ae",
            RejectReason::ProtocolVersionNotSupported => "protocol_version",
            RejectReason::TemporaryCongestion => "congestion",
            RejectReason::LocalLimitExceeded => "limit",
        }
    }

    fn source(self) -> AssociationRJSource {
        use AssociationRJSource as S;
        match self {
            RejectReason::NoReasonGiven => {
                S::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven)
            }
            RejectReason::ApplicationContextNotSupported => {
                S::ServiceUser(AssociationRJServiceUserReason::ApplicationContextNameNotSupported)
            }
            RejectReason::CallingAeNotRecognized => {
                S::ServiceUser(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
            }
            RejectReason::CalledAeNotRecognized => {
                S::ServiceUser(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
            }
            RejectReason::ProtocolVersionNotSupported => S::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            RejectReason::TemporaryCongestion => S::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::TemporaryCongestion,
            ),
            RejectReason::LocalLimitExceeded => S::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source(), f)
    }
}

/// A refused association: what goes into the A-ASSOCIATE-RJ, and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Transient rejections invite the caller to retry later; permanent ones do not.
    pub transient: bool,
    /// The reason sent to the caller.
    pub reason: RejectReason,
    /// Operator-facing detail for the log (never sent, never patient data).
    pub detail: String,
}

impl Rejection {
    /// A permanent rejection.
    pub fn permanent(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            transient: false,
            reason,
            detail: detail.into(),
        }
    }

    /// A transient "temporary congestion" rejection, for back-pressure.
    pub fn congested(detail: impl Into<String>) -> Self {
        Rejection {
            transient: true,
            reason: RejectReason::TemporaryCongestion,
            detail: detail.into(),
        }
    }

    /// A transient "local limit exceeded" rejection, e.g. too many associations.
    pub fn limit_exceeded(detail: impl Into<String>) -> Self {
        Rejection {
            transient: true,
            reason: RejectReason::LocalLimitExceeded,
            detail: detail.into(),
        }
    }

    /// The A-ASSOCIATE-RJ PDU.
    pub fn to_pdu(&self) -> Pdu {
        Pdu::AssociationRJ(AssociationRJ {
            result: if self.transient {
                AssociationRJResult::Transient
            } else {
                AssociationRJResult::Permanent
            },
            source: self.reason.source(),
        })
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.transient {
            "transient"
        } else {
            "permanent"
        };
        write!(f, "{kind} rejection, {}: {}", self.reason, self.detail)
    }
}

/// A presentation context we accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    /// Presentation context ID (odd, 1–255).
    pub id: u8,
    /// Its abstract syntax: Verification or a storage SOP class.
    pub abstract_syntax: String,
    /// The transfer syntax chosen for it.
    pub transfer_syntax: String,
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone)]
pub struct Negotiation {
    /// Calling AE title (the peer's), trimmed.
    pub calling_ae: String,
    /// Called AE title (ours, as the peer addressed us), trimmed.
    pub called_ae: String,
    /// The largest PDU (variable field length) the peer accepts; 0 means unlimited.
    pub peer_max_pdu: u32,
    /// Contexts accepted, in the order proposed.
    pub accepted: Vec<AcceptedContext>,
    /// Number of contexts proposed.
    pub proposed: usize,
    /// The A-ASSOCIATE-AC to send.
    pub response: AssociationAC,
}

impl Negotiation {
    /// The accepted context with this ID.
    pub fn context(&self, id: u8) -> Option<&AcceptedContext> {
        self.accepted.iter().find(|c| c.id == id)
    }
}

/// Check the association request against the configuration and negotiate its contexts.
///
/// Rejections, in order: protocol version without bit 0 (permanent, ACSE), unknown
/// application context, called AE not ours, calling AE/address not allowed (permanent,
/// service user). Capacity and back-pressure are the caller's (they need shared state).
/// Each context is accepted, or refused as "abstract syntax not supported" or
/// "transfer syntaxes not supported"; an association with no usable context is still
/// accepted, and the peer decides what to do.
pub fn negotiate(
    rq: &AssociationRQ,
    config: &ScpConfig,
    peer: IpAddr,
) -> Result<Negotiation, Rejection> {
    let calling_ae = rq.calling_ae_title.trim().to_string();
    let called_ae = rq.called_ae_title.trim().to_string();
    if rq.protocol_version & 1 == 0 {
        return Err(Rejection::permanent(
            RejectReason::ProtocolVersionNotSupported,
            format!(
                "protocol version {:#06x} lacks version 1",
                rq.protocol_version
            ),
        ));
    }
    if rq.application_context_name.trim_end_matches(['\0', ' ']) != DICOM_APPLICATION_CONTEXT {
        return Err(Rejection::permanent(
            RejectReason::ApplicationContextNotSupported,
            "application context is not the DICOM application context",
        ));
    }
    if !config.ae_titles.iter().any(|ae| ae.trim() == called_ae) {
        return Err(Rejection::permanent(
            RejectReason::CalledAeNotRecognized,
            format!("called AE title {called_ae:?} is not one of ours"),
        ));
    }
    if !config.allowed_callers.is_empty()
        && !config
            .allowed_callers
            .iter()
            .any(|rule| rule.matches(&calling_ae, peer))
    {
        return Err(Rejection::permanent(
            RejectReason::CallingAeNotRecognized,
            format!("calling AE title {calling_ae:?} from {peer} is not allowed"),
        ));
    }

    let peer_max_pdu = rq
        .user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);

    let mut accepted = Vec::new();
    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    for pc in &rq.presentation_contexts {
        let abstract_syntax = pc.abstract_syntax.trim_end_matches(['\0', ' ']);
        let supported = abstract_syntax == VERIFICATION
            || is_storage_sop_class(abstract_syntax)
            || config
                .private_sop_classes
                .iter()
                .any(|p| p == abstract_syntax);
        let chosen = pc
            .transfer_syntaxes
            .iter()
            .map(|ts| ts.trim_end_matches(['\0', ' ']))
            .find(|ts| config.transfer_syntaxes.iter().any(|ours| ours == ts));
        let (reason, transfer_syntax) = match (supported, chosen) {
            (false, _) => (
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                first_or_default(&pc.transfer_syntaxes),
            ),
            (true, None) => (
                PresentationContextResultReason::TransferSyntaxesNotSupported,
                first_or_default(&pc.transfer_syntaxes),
            ),
            (true, Some(ts)) => {
                accepted.push(AcceptedContext {
                    id: pc.id,
                    abstract_syntax: abstract_syntax.to_string(),
                    transfer_syntax: ts.to_string(),
                });
                (PresentationContextResultReason::Acceptance, ts.to_string())
            }
        };
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            transfer_syntax,
        });
    }

    let response = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: DICOM_APPLICATION_CONTEXT.to_string(),
        presentation_contexts: results,
        user_variables: vec![
            UserVariableItem::MaxLength(effective_max_pdu(config.max_pdu)),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
        ],
    };
    Ok(Negotiation {
        calling_ae,
        called_ae,
        peer_max_pdu,
        accepted,
        proposed: rq.presentation_contexts.len(),
        response,
    })
}

/// A refused context still carries a transfer syntax sub-item; its value is not
/// significant, so echo the first proposed one.
fn first_or_default(proposed: &[String]) -> String {
    proposed
        .first()
        .cloned()
        .unwrap_or_else(|| crate::sop_classes::IMPLICIT_VR_LITTLE_ENDIAN.to_string())
}

/// Why a PDU could not be received or sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// Nothing arrived within the allowed time.
    #[error("no PDU within {0:?}")]
    Timeout(Duration),
    /// The bytes received are not a valid PDU (or one larger than we accept).
    #[error("invalid PDU: {0}")]
    Protocol(String),
    /// A socket error.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// A byte stream that can carry PDUs: a TCP stream or a TLS session over one.
pub trait PduStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> PduStream for T {}

/// A stream carrying DICOM PDUs, as the association acceptor.
pub struct Connection {
    stream: Box<dyn PduStream>,
    /// The body of the PDU being read, reused from one PDU to the next.
    body: Vec<u8>,
    write_buffer: Vec<u8>,
    max_pdu: u32,
    peer_max_pdu: u32,
}

impl Connection {
    /// Wrap an accepted stream; `max_pdu` is the largest PDU we accept (and advertise).
    pub fn new(stream: impl PduStream + 'static, max_pdu: u32) -> Self {
        let max_pdu = effective_max_pdu(max_pdu);
        Connection {
            stream: Box::new(stream),
            body: Vec::with_capacity(64 * 1024),
            write_buffer: Vec::with_capacity(1024),
            max_pdu,
            peer_max_pdu: dicom_ul::pdu::DEFAULT_MAX_PDU,
        }
    }

    /// Record the peer's maximum PDU length (0 = unlimited) once negotiated.
    pub fn set_peer_max_pdu(&mut self, n: u32) {
        self.peer_max_pdu = n;
    }

    /// Receive one PDU, waiting at most `timeout`. A PDU longer than our maximum is an
    /// error before any of its body is read. Not cancel-safe: a PDU read halfway is
    /// lost, so the association must end when a read is abandoned.
    pub async fn receive(&mut self, timeout: Duration) -> Result<Pdu, ConnError> {
        self.receive_limited(timeout, self.max_pdu).await
    }

    /// Receive the first PDU of an association (normally an A-ASSOCIATE-RQ).
    pub async fn receive_request(&mut self, timeout: Duration) -> Result<Pdu, ConnError> {
        self.receive_limited(timeout, self.max_pdu.max(MAX_ASSOCIATE_RQ))
            .await
    }

    async fn receive_limited(&mut self, timeout: Duration, limit: u32) -> Result<Pdu, ConnError> {
        match tokio::time::timeout(timeout, self.read_pdu(limit)).await {
            Err(_) => Err(ConnError::Timeout(timeout)),
            Ok(result) => result,
        }
    }

    /// Reads the 6-byte header, checks the length, reads exactly the body. P-DATA-TF,
    /// nearly all the traffic, is split into its values here with one copy of the
    /// data; every other PDU is decoded by `dicom-ul`.
    async fn read_pdu(&mut self, limit: u32) -> Result<Pdu, ConnError> {
        let mut header = [0u8; 6];
        match self.stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnError::Closed);
            }
            Err(e) => return Err(ConnError::Io(e)),
        }
        let pdu_type = header[0];
        let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        if length > limit {
            return Err(ConnError::Protocol(format!(
                "PDU of {length} bytes exceeds the maximum of {limit}"
            )));
        }
        self.body.clear();
        let read = (&mut self.stream)
            .take(u64::from(length))
            .read_to_end(&mut self.body)
            .await?;
        if read < length as usize {
            return Err(ConnError::Closed);
        }
        if pdu_type == 0x04 {
            return parse_pdata(&self.body).map(|data| Pdu::PData { data });
        }
        let mut whole = Vec::with_capacity(6 + self.body.len());
        whole.extend_from_slice(&header);
        whole.extend_from_slice(&self.body);
        match dicom_ul::pdu::read_pdu(
            &mut std::io::Cursor::new(&whole[..]),
            limit.max(dicom_ul::pdu::MINIMUM_PDU_SIZE),
            true,
        ) {
            Ok(Some(pdu)) => Ok(pdu),
            Ok(None) => Err(ConnError::Protocol("truncated PDU".into())),
            Err(e) => Err(ConnError::Protocol(error_chain(&e))),
        }
    }

    /// Send one PDU.
    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), ConnError> {
        self.write_buffer.clear();
        dicom_ul::pdu::write_pdu(&mut self.write_buffer, pdu)
            .map_err(|e| ConnError::Protocol(error_chain(&e)))?;
        self.stream.write_all(&self.write_buffer).await?;
        Ok(())
    }

    /// Send a command set, fragmented to fit the peer's maximum PDU length.
    pub async fn send_command(&mut self, context_id: u8, command: &[u8]) -> Result<(), ConnError> {
        let max_data = match self.peer_max_pdu {
            0 => MAX_SEND_PDV,
            n => n.saturating_sub(dicom_ul::pdu::PDV_HEADER_SIZE).max(16),
        } as usize;
        let mut chunks = command.chunks(max_data).peekable();
        while let Some(chunk) = chunks.next() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context_id,
                    value_type: PDataValueType::Command,
                    is_last: chunks.peek().is_none(),
                    data: chunk.to_vec(),
                }],
            };
            self.send(&pdu).await?;
        }
        Ok(())
    }

    /// Send an A-ABORT (service provider, `reason`) and close, ignoring send errors: the
    /// association is over either way.
    pub async fn abort(&mut self, reason: AbortRQServiceProviderReason) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.send(&pdu)).await;
        let _ = self.stream.shutdown().await;
    }

    /// Send a final PDU (A-ASSOCIATE-RJ, A-RELEASE-RP), then [`finish`](Self::finish).
    pub async fn send_and_close(&mut self, pdu: &Pdu, artim: Duration) -> Result<(), ConnError> {
        self.send(pdu).await?;
        self.finish(artim).await;
        Ok(())
    }

    /// Wait up to `artim` for the peer to close the connection, as the upper layer state
    /// machine asks after a rejection or release, then close our side.
    pub async fn finish(&mut self, artim: Duration) {
        let _ = self.stream.flush().await;
        let mut scratch = [0u8; 512];
        let wait_eof = async {
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(artim, wait_eof).await;
        let _ = self.stream.shutdown().await;
    }
}

/// The presentation data values of a P-DATA-TF body (PS3.8 9.3.5).
fn parse_pdata(body: &[u8]) -> Result<Vec<PDataValue>, ConnError> {
    let mut values = Vec::with_capacity(1);
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 6 {
            return Err(ConnError::Protocol(
                "P-DATA-TF ends inside a presentation data value header".into(),
            ));
        }
        let item_length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if item_length < 2 || item_length > rest.len() - 4 {
            return Err(ConnError::Protocol(format!(
                "presentation data value of {item_length} bytes does not fit its P-DATA-TF"
            )));
        }
        let presentation_context_id = rest[4];
        let control = rest[5];
        values.push(PDataValue {
            presentation_context_id,
            value_type: if control & 0x01 != 0 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: control & 0x02 != 0,
            data: rest[6..4 + item_length].to_vec(),
        });
        rest = &rest[4 + item_length..];
    }
    if values.is_empty() {
        return Err(ConnError::Protocol(
            "P-DATA-TF without presentation data values".into(),
        ));
    }
    Ok(values)
}

/// `error: cause: cause` on one line, for logs.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// What the assembler produced from a fragment.
#[derive(Debug)]
pub enum Assembled {
    /// Nothing complete yet.
    Partial,
    /// A complete command set arrived on this context.
    Command {
        /// Presentation context ID.
        context_id: u8,
        /// The command set bytes.
        bytes: Vec<u8>,
    },
    /// The dataset announced by the last command is complete.
    Dataset {
        /// Presentation context ID.
        context_id: u8,
        /// The collected bytes (after the prefix given to [`PdvAssembler::expect_dataset`]),
        /// or `None` if the dataset was discarded or went over the size limit.
        buffer: Option<BytesMut>,
        /// Dataset bytes received in total.
        received: u64,
        /// Whether the dataset went over the size limit.
        over_limit: bool,
    },
}

/// A violation of the DIMSE message structure; the association must be aborted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    /// A dataset fragment when a command was expected, or the reverse.
    #[error("a {0} fragment arrived when it was not expected")]
    Unexpected(&'static str),
    /// Fragments of one message on different presentation contexts.
    #[error("message fragments switched from presentation context {0} to {1}")]
    ContextSwitch(u8, u8),
    /// A command set larger than any real one.
    #[error("command set exceeds {MAX_COMMAND_BYTES} bytes")]
    CommandTooLarge,
}

#[derive(Debug)]
enum State {
    Command {
        context_id: Option<u8>,
        bytes: Vec<u8>,
    },
    Dataset {
        context_id: u8,
        buffer: Option<BytesMut>,
        received: u64,
        over_limit: bool,
    },
}

/// Reassembles P-DATA value fragments into command sets and datasets.
///
/// After a command that announces a dataset, the caller says where the dataset goes with
/// [`expect_dataset`](Self::expect_dataset): into a buffer (possibly pre-filled with the
/// file header) or nowhere (drained and dropped, when the answer is already known).
#[derive(Debug)]
pub struct PdvAssembler {
    max_dataset: u64,
    state: State,
}

impl PdvAssembler {
    /// An assembler holding at most `max_dataset` bytes of any one dataset.
    pub fn new(max_dataset: u64) -> Self {
        PdvAssembler {
            max_dataset,
            state: State::Command {
                context_id: None,
                bytes: Vec::new(),
            },
        }
    }

    /// Whether no message is in progress (a good moment to stop).
    pub fn is_idle(&self) -> bool {
        matches!(
            &self.state,
            State::Command {
                context_id: None,
                ..
            }
        )
    }

    /// Bytes of the current dataset held in its buffer now.
    pub fn buffered(&self) -> usize {
        match &self.state {
            State::Dataset {
                buffer: Some(b), ..
            } => b.len(),
            _ => 0,
        }
    }

    /// What the current dataset's buffer holds now.
    pub fn peek(&self) -> &[u8] {
        match &self.state {
            State::Dataset {
                buffer: Some(b), ..
            } => b,
            _ => &[],
        }
    }

    /// Takes what the current dataset's buffer holds (for writing it out as a part),
    /// leaving the buffer empty and the dataset still being collected.
    pub fn take_buffered(&mut self) -> Option<BytesMut> {
        match &mut self.state {
            State::Dataset {
                buffer: Some(b), ..
            } => Some(b.split()),
            _ => None,
        }
    }

    /// Drops the rest of the current dataset as it arrives (its answer is known).
    pub fn discard(&mut self) {
        if let State::Dataset { buffer, .. } = &mut self.state {
            *buffer = None;
        }
    }

    /// Collect the next dataset on `context_id` into `buffer` (appending), or drop it.
    pub fn expect_dataset(&mut self, context_id: u8, buffer: Option<BytesMut>) {
        self.state = State::Dataset {
            context_id,
            buffer,
            received: 0,
            over_limit: false,
        };
    }

    /// Take one fragment.
    pub fn push(&mut self, pdv: PDataValue) -> Result<Assembled, AssemblyError> {
        let max_dataset = self.max_dataset;
        match (&mut self.state, pdv.value_type) {
            (State::Command { context_id, bytes }, PDataValueType::Command) => {
                if let Some(ctx) = *context_id
                    && ctx != pdv.presentation_context_id
                {
                    return Err(AssemblyError::ContextSwitch(
                        ctx,
                        pdv.presentation_context_id,
                    ));
                }
                if bytes.len() + pdv.data.len() > MAX_COMMAND_BYTES {
                    return Err(AssemblyError::CommandTooLarge);
                }
                *context_id = Some(pdv.presentation_context_id);
                if bytes.is_empty() {
                    *bytes = pdv.data;
                } else {
                    bytes.extend_from_slice(&pdv.data);
                }
                if !pdv.is_last {
                    return Ok(Assembled::Partial);
                }
                let bytes = std::mem::take(bytes);
                self.state = State::Command {
                    context_id: None,
                    bytes: Vec::new(),
                };
                Ok(Assembled::Command {
                    context_id: pdv.presentation_context_id,
                    bytes,
                })
            }
            (
                State::Dataset {
                    context_id,
                    buffer,
                    received,
                    over_limit,
                },
                PDataValueType::Data,
            ) => {
                if *context_id != pdv.presentation_context_id {
                    return Err(AssemblyError::ContextSwitch(
                        *context_id,
                        pdv.presentation_context_id,
                    ));
                }
                *received += pdv.data.len() as u64;
                if *received > max_dataset {
                    // Drain and drop: keep counting, hold nothing more.
                    *over_limit = true;
                    *buffer = None;
                } else if let Some(buf) = buffer {
                    buf.extend_from_slice(&pdv.data);
                }
                if !pdv.is_last {
                    return Ok(Assembled::Partial);
                }
                let done = Assembled::Dataset {
                    context_id: *context_id,
                    buffer: buffer.take(),
                    received: *received,
                    over_limit: *over_limit,
                };
                self.state = State::Command {
                    context_id: None,
                    bytes: Vec::new(),
                };
                Ok(done)
            }
            (State::Command { .. }, PDataValueType::Data) => {
                Err(AssemblyError::Unexpected("dataset"))
            }
            (State::Dataset { .. }, PDataValueType::Command) => {
                Err(AssemblyError::Unexpected("command"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const IMPLICIT: &str = "1.2.840.10008.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    const JPEG_LS: &str = "1.2.840.10008.1.2.4.80";

    fn rq(called: &str, calling: &str, contexts: Vec<(u8, &str, Vec<&str>)>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling.to_string(),
            called_ae_title: called.to_string(),
            application_context_name: DICOM_APPLICATION_CONTEXT.to_string(),
            presentation_contexts: contexts
                .into_iter()
                .map(|(id, a, ts)| PresentationContextProposed {
                    id,
                    abstract_syntax: a.to_string(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn localhost() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn contexts_are_decided_one_by_one() {
        let config = ScpConfig {
            private_sop_classes: vec!["1.3.6.1.4.1.99.1".to_string()],
            ..ScpConfig::default()
        };
        let request = rq(
            "RADFLOW",
            "CT1",
            vec![
                (1, VERIFICATION, vec![IMPLICIT]),
                (3, CT, vec!["1.2.840.10008.1.2.4.100", JPEG_LS, EXPLICIT]),
                (5, "1.2.840.10008.5.1.4.1.2.2.1", vec![IMPLICIT]),
                (7, CT, vec!["1.2.840.10008.1.2.4.100"]),
                (9, "1.3.6.1.4.1.99.1", vec![EXPLICIT]),
            ],
        );
        let n = negotiate(&request, &config, localhost()).unwrap();
        assert_eq!(n.calling_ae, "CT1");
        assert_eq!(n.peer_max_pdu, 16384);
        assert_eq!(n.proposed, 5);
        let ids: Vec<u8> = n.accepted.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![1, 3, 9]);
        // The proposer's order wins: JPEG-LS before explicit LE.
        assert_eq!(n.context(3).unwrap().transfer_syntax, JPEG_LS);
        use PresentationContextResultReason as R;
        let reasons: Vec<R> = n
            .response
            .presentation_contexts
            .iter()
            .map(|r| r.reason.clone())
            .collect();
        assert_eq!(
            reasons,
            vec![
                R::Acceptance,
                R::Acceptance,
                R::AbstractSyntaxNotSupported,
                R::TransferSyntaxesNotSupported,
                R::Acceptance
            ]
        );
        assert!(
            n.response
                .user_variables
                .contains(&UserVariableItem::MaxLength(256 * 1024))
        );
    }

    #[test]
    fn rejections_have_the_right_reason() {
        let config = ScpConfig {
            ae_titles: vec!["RADFLOW".into(), "RADFLOW2".into()],
            allowed_callers: vec!["CT1".parse().unwrap(), "@10.1.0.0/16".parse().unwrap()],
            ..ScpConfig::default()
        };
        let ok = rq("RADFLOW2", "CT1", vec![(1, VERIFICATION, vec![IMPLICIT])]);
        assert!(negotiate(&ok, &config, localhost()).is_ok());

        let wrong_called = rq("OTHER", "CT1", vec![]);
        let r = negotiate(&wrong_called, &config, localhost()).unwrap_err();
        assert_eq!(r.reason, RejectReason::CalledAeNotRecognized);
        assert!(!r.transient);
        assert!(matches!(
            r.to_pdu(),
            Pdu::AssociationRJ(AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized
                )
            })
        ));

        let stranger = rq("RADFLOW", "MR9", vec![]);
        let r = negotiate(&stranger, &config, localhost()).unwrap_err();
        assert_eq!(r.reason, RejectReason::CallingAeNotRecognized);
        // The same caller from an allowed network is fine.
        assert!(negotiate(&stranger, &config, "10.1.2.3".parse().unwrap()).is_ok());
        // Also when the address arrives IPv4-mapped on a dual-stack socket.
        assert!(negotiate(&stranger, &config, "::ffff:10.1.2.3".parse().unwrap()).is_ok());

        let mut bad_version = ok.clone();
        bad_version.protocol_version = 2;
        let r = negotiate(&bad_version, &config, localhost()).unwrap_err();
        assert_eq!(r.reason, RejectReason::ProtocolVersionNotSupported);

        let mut bad_context = ok.clone();
        bad_context.application_context_name = "1.2.3".into();
        let r = negotiate(&bad_context, &config, localhost()).unwrap_err();
        assert_eq!(r.reason, RejectReason::ApplicationContextNotSupported);
    }

    #[test]
    fn transient_rejections() {
        let r = Rejection::limit_exceeded("64 associations active");
        assert_eq!(
            r.to_string(),
            "transient rejection, local limit exceeded: 64 associations active"
        );
        assert!(matches!(
            r.to_pdu(),
            Pdu::AssociationRJ(AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded
                )
            })
        ));
    }

    #[test]
    fn caller_rules_parse() {
        let r: CallerRule = "CT1@10.0.0.0/8".parse().unwrap();
        assert_eq!(r.ae_title.as_deref(), Some("CT1"));
        assert!(r.matches("CT1", "10.9.9.9".parse().unwrap()));
        assert!(!r.matches("CT1", "11.0.0.1".parse().unwrap()));
        assert!(!r.matches("CT2", "10.9.9.9".parse().unwrap()));
        let r: CallerRule = "@192.168.1.7".parse().unwrap();
        assert!(r.matches("ANY", "192.168.1.7".parse().unwrap()));
        assert!(!r.matches("ANY", "192.168.1.8".parse().unwrap()));
        assert!("@".parse::<CallerRule>().is_err());
        assert!("CT@not-a-net".parse::<CallerRule>().is_err());
        assert!("ABCDEFGHIJKLMNOPQ".parse::<CallerRule>().is_err());
    }

    fn pdv(ctx: u8, command: bool, last: bool, data: &[u8]) -> PDataValue {
        PDataValue {
            presentation_context_id: ctx,
            value_type: if command {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: last,
            data: data.to_vec(),
        }
    }

    #[test]
    fn assembler_joins_fragments() {
        let mut a = PdvAssembler::new(1000);
        assert!(a.is_idle());
        assert!(matches!(
            a.push(pdv(1, true, false, b"ab")).unwrap(),
            Assembled::Partial
        ));
        assert!(!a.is_idle());
        match a.push(pdv(1, true, true, b"cd")).unwrap() {
            Assembled::Command { context_id, bytes } => {
                assert_eq!(context_id, 1);
                assert_eq!(bytes, b"abcd");
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut prefix = BytesMut::new();
        prefix.extend_from_slice(b"HDR");
        a.expect_dataset(1, Some(prefix));
        a.push(pdv(1, false, false, b"xy")).unwrap();
        match a.push(pdv(1, false, true, b"z")).unwrap() {
            Assembled::Dataset {
                buffer,
                received,
                over_limit,
                ..
            } => {
                assert_eq!(&buffer.unwrap()[..], b"HDRxyz");
                assert_eq!(received, 3);
                assert!(!over_limit);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(a.is_idle());
    }

    #[test]
    fn assembler_drains_oversized_datasets() {
        let mut a = PdvAssembler::new(10);
        a.expect_dataset(3, Some(BytesMut::new()));
        a.push(pdv(3, false, false, &[0; 8])).unwrap();
        a.push(pdv(3, false, false, &[0; 8])).unwrap();
        match a.push(pdv(3, false, true, &[0; 8])).unwrap() {
            Assembled::Dataset {
                buffer,
                received,
                over_limit,
                ..
            } => {
                assert!(buffer.is_none());
                assert_eq!(received, 24);
                assert!(over_limit);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn assembler_refuses_protocol_violations() {
        let mut a = PdvAssembler::new(10);
        assert_eq!(
            a.push(pdv(1, false, true, b"x")).unwrap_err(),
            AssemblyError::Unexpected("dataset")
        );
        let mut a = PdvAssembler::new(10);
        a.push(pdv(1, true, false, b"x")).unwrap();
        assert_eq!(
            a.push(pdv(3, true, true, b"x")).unwrap_err(),
            AssemblyError::ContextSwitch(1, 3)
        );
        let mut a = PdvAssembler::new(10);
        a.expect_dataset(1, None);
        assert_eq!(
            a.push(pdv(1, true, true, b"x")).unwrap_err(),
            AssemblyError::Unexpected("command")
        );
        let mut a = PdvAssembler::new(10);
        assert_eq!(
            a.push(pdv(1, true, false, &vec![0; MAX_COMMAND_BYTES + 1]))
                .unwrap_err(),
            AssemblyError::CommandTooLarge
        );
    }
}
