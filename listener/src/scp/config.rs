//! The SCP's configuration, and its contract with the rest of the listener: the sink that
//! keeps validated instances (whole, or in parts), the failures it may answer with, and
//! the hooks into the association life cycle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::association::{CallerRule, Rejection};
use crate::dataset::{InstanceFacts, ScanError};
use crate::dimse;
use crate::sop_classes::DEFAULT_TRANSFER_SYNTAXES;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pixels::PixelError;

    #[test]
    fn store_failures_map_to_their_status() {
        let failure = StoreFailure::OutOfResources("store unavailable".into());
        assert_eq!(failure.status(), dimse::OUT_OF_RESOURCES);
        assert_eq!(failure.comment(), "store unavailable");
        // Pixel data that cannot be what the image attributes say: 0xA900.
        let pixels = StoreFailure::refusing(ScanError::Pixels(PixelError::Attribute("Rows")));
        assert_eq!(pixels.status(), dimse::DATASET_DOES_NOT_MATCH_SOP_CLASS);
        // A broken structure: 0xC000.
        let broken = StoreFailure::refusing(ScanError::TruncatedHeader { offset: 8 });
        assert_eq!(broken.status(), dimse::CANNOT_UNDERSTAND);
        assert!(
            broken.comment().contains("truncated"),
            "{}",
            broken.comment()
        );
    }
}
