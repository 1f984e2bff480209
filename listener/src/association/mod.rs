//! The association acceptor: negotiation policy, PDU transport and P-DATA reassembly.
//!
//! `dicom-ul` encodes and decodes the PDUs; this module decides what to answer. We do not
//! use `ServerAssociationOptions` because the listener needs what it cannot express:
//! transient rejections for back-pressure and connection limits, a refusal reason per
//! presentation context, several called AE titles, and a calling-AE allowlist that also
//! looks at the peer's network address.
//!
//! Three parts, each usable on its own and each in its own file:
//! - [`negotiate`] (`negotiation.rs`): a pure function from an A-ASSOCIATE-RQ and the
//!   configuration to either an A-ASSOCIATE-AC with the accepted contexts, or a
//!   [`Rejection`];
//! - [`Connection`] (`connection.rs`): one byte stream (TCP, or TLS over TCP) carrying
//!   PDUs, whose reads are bounded by the maximum PDU length we advertised (a larger claim
//!   is refused before anything is allocated);
//! - [`PdvAssembler`] (`assembler.rs`): turns P-DATA value fragments into whole command
//!   sets and datasets, holding at most `max_instance_bytes` of a dataset (the rest is
//!   drained and dropped).

mod assembler;
mod connection;
mod negotiation;

pub use assembler::{Assembled, AssemblyError, PdvAssembler};
pub(crate) use connection::error_chain;
pub use connection::{ConnError, Connection, PduStream};
pub use negotiation::{
    AcceptedContext, CallerRule, CallerRuleParseError, Negotiation, RejectReason, Rejection,
    negotiate,
};

/// Our Implementation Class UID, sent in A-ASSOCIATE-AC/RQ and written into File Meta.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.155821344162961049251119363182117420304";
/// Our Implementation Version Name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("RADFLOW_", env!("CARGO_PKG_VERSION"));

/// The DICOM application context, the only one there is.
pub const DICOM_APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

/// The maximum PDU length we actually advertise and enforce: the configured one, kept
/// between the protocol minimum and 16 MiB.
pub fn effective_max_pdu(configured: u32) -> u32 {
    configured.clamp(dicom_ul::pdu::MINIMUM_PDU_SIZE, 16 * 1024 * 1024)
}
