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
//! The parts pass through a [`TailCheck`](crate::dataset::TailCheck) that follows the
//! top-level elements (and the fragments of encapsulated pixel data) without keeping
//! them, so a dataset cut short is refused with 0xC000 and its parts discarded, as it is
//! when received whole.
//!
//! When a TLS configuration is given, every connection must complete a TLS handshake
//! (within the ARTIM timeout) before its first PDU is read.
//!
//! On shutdown the listener closes its port (a connection accepted just before but not
//! yet associated is rejected with "temporary congestion"), running associations carry
//! on until their sender releases them, and after `shutdown_grace` whatever is left is
//! aborted; an instance whose response was not sent is not acknowledged, so the sender
//! retries it.
//!
//! # Layout
//!
//! - `config.rs`: [`ScpConfig`], and what the SCP hands over: [`ReceivedInstance`] to an
//!   [`InstanceSink`] (or a [`PartWriter`] for a large one), [`StoreFailure`] back, and
//!   the [`AssociationHooks`];
//! - `accept.rs`: [`serve`]: the listener socket, the accept loop, connection limits, the
//!   TLS handshake, negotiation and rejections, and the drain on shutdown;
//! - `session.rs`: an accepted association's data transfer: commands, datasets, large
//!   instances written in parts, responses, and how the association ended.

mod accept;
mod config;
mod session;

pub use accept::serve;
pub use config::{
    AssociationHooks, InstanceSink, NoHooks, PartWriter, ReceivedInstance, ScpConfig, StoreFailure,
};
