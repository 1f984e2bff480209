//! The DICOM receiver: associations, C-ECHO and C-STORE, series assembly.
//!
//! # Layout
//!
//! - [`scp`]: the storage SCP: configuration, the sink that receives validated instances
//!   and the association hooks (`scp/config.rs`); accept loop, limits, TLS and shutdown
//!   (`scp/accept.rs`); the association tasks (`scp/session.rs`);
//! - [`association`]: negotiation policy (`association/negotiation.rs`), PDU transport
//!   (`association/connection.rs`), P-DATA reassembly (`association/assembler.rs`);
//! - [`dimse`]: DIMSE command sets, parsed and built;
//! - [`dataset`]: the bounded scanner that extracts a few attributes from a dataset;
//! - [`pixels`]: what the Pixel Data must be, from the image attributes and the syntax;
//! - [`sop_classes`]: which SOP classes and transfer syntaxes are accepted;
//! - [`local`]: writing instances into a folder store while they arrive;
//! - [`dicomweb`]: STOW-RS over HTTP into the same ingest (`dicomweb/part.rs` one part,
//!   `dicomweb/part10.rs` its File Meta group, `dicomweb/response.rs` the store response);
//! - [`ingest`]: what happens to an instance before Success: store, then publish;
//! - [`assembly`]: series state in the bus's KV bucket, quiet periods, revisions;
//! - [`service`]: the listener stage as a whole (`run`), and embedded recovery;
//! - [`scu`]: a C-ECHO/C-STORE client for sending files;
//! - [`tls`]: DICOM over TLS, configured from PEM files.

pub mod assembly;
pub mod association;
pub mod dataset;
pub mod dicomweb;
pub mod dimse;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod journal;
pub mod local;
pub mod pixels;
pub mod scp;
pub mod scu;
pub mod service;
pub mod sop_classes;
pub mod tls;
