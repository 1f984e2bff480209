//! Negotiation policy: which associations are accepted, which refused and why, and which
//! presentation contexts are accepted with which transfer syntax.
//!
//! [`negotiate`] is a pure function of the A-ASSOCIATE-RQ, the configuration and the
//! peer's address; capacity and back-pressure are decided by the caller, which holds the
//! shared state, with the same [`Rejection`] type.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, Pdu, PresentationContextResult,
    PresentationContextResultReason, UserVariableItem,
};
use ipnet::IpNet;

use super::{
    DICOM_APPLICATION_CONTEXT, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME,
    effective_max_pdu,
};
use crate::scp::ScpConfig;
use crate::sop_classes::{VERIFICATION, is_storage_sop_class};

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
}
