//! A C-ECHO / C-STORE client, for `radflow send`, the exporter and tests: files from
//! disk or Part-10 objects held in memory.
//!
//! Files are sent as they are stored: the dataset bytes after the File Meta group go on
//! the wire unchanged, in the file's own transfer syntax, so what arrives is what was on
//! disk (an odd-length deflated stream gets the one padding NUL the standard asks for). One presentation context is proposed per distinct (SOP class, transfer syntax)
//! pair; more than [`MAX_CONTEXTS`] pairs are spread over several associations.
//!
//! Every exchange can run over plain TCP or over TLS (PS3.15 Annex B): a
//! [`TlsConnector`], built from PEM files by [`TlsClient::connector`], verifies the
//! peer against the given CA certificates and presents a client certificate when one
//! is configured; the `_with` variants ([`echo_with`], [`send_objects_with`],
//! [`Session::connect`]) take it, the others stay on plain TCP.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dicom_object::meta::FileMetaTable;
use dicom_ul::association::client::AsyncTlsStream;
use dicom_ul::association::{AsyncClientAssociation, ClientAssociationOptions};
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu, PresentationContextNegotiated};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::association::error_chain;
use crate::dimse::{self, StatusKind, field};
use crate::sop_classes::{
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION,
};
use crate::tls::{TlsError, certificates, pem_error};

/// Most presentation contexts proposed in one association (the protocol allows 128).
pub const MAX_CONTEXTS: usize = 128;

/// Time to wait for a response; the receiver may be persisting the instance meanwhile.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest PDV payload we send even if the receiver accepts more.
const MAX_SEND_PDV: usize = 1024 * 1024;

/// Why sending failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    /// The association could not be established (connection refused, rejected, …).
    #[error("could not associate with {addr}: {reason}")]
    Association {
        /// The address tried.
        addr: String,
        /// What went wrong, from the DICOM upper layer.
        reason: String,
    },
    /// The association was accepted, but none of its presentation contexts.
    #[error("{addr} accepted none of the proposed SOP class / transfer syntax pairs")]
    NothingAccepted {
        /// The address tried.
        addr: String,
    },
    /// The peer broke the protocol or the connection during an exchange.
    #[error("DICOM exchange with {addr} failed: {reason}")]
    Exchange {
        /// The peer's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// C-ECHO was answered with a non-success status.
    #[error("C-ECHO answered with status {status:#06x}")]
    EchoStatus {
        /// The status received.
        status: u16,
    },
}

/// A file that was not stored by the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedFile {
    /// The file.
    pub path: PathBuf,
    /// The C-STORE-RSP status, or `None` if the file was never sent (unreadable,
    /// presentation context refused, association lost).
    pub status: Option<u16>,
    /// The receiver's Error Comment, or why it was not sent.
    pub comment: String,
}

/// What [`send_files`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Files answered with Success or a Warning status.
    pub sent: usize,
    /// Files refused or not sent.
    pub failed: Vec<FailedFile>,
    /// Files skipped because they are not DICOM Part-10 files (no `DICM` at byte 128).
    pub skipped: Vec<PathBuf>,
}

/// Where the client side of DICOM over TLS finds its PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsClient {
    /// CA certificates (PEM) the peer's certificate must chain to.
    pub ca: PathBuf,
    /// The client certificate chain (PEM, leaf first) presented to peers that ask for
    /// one (mutual TLS); goes with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// The name the peer's certificate must carry (a DNS name or an IP address);
    /// the host of the address when `None`.
    pub server_name: Option<String>,
}

impl TlsClient {
    /// Reads the files and builds the rustls client configuration (the `ring`
    /// provider, TLS 1.2 and 1.3).
    pub fn connector(&self) -> Result<TlsConnector, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certificates("CA certificate", &self.ca)? {
            roots
                .add(ca)
                .map_err(|e| pem_error("CA certificate", &self.ca, e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = certificates("client certificate", cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| pem_error("client private key", key, e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Config(format!("client certificate and key: {e}")))?
            }
            _ => {
                return Err(TlsError::Config(
                    "a client certificate and its key go together: give both or neither".into(),
                ));
            }
        };
        if let Some(name) = &self.server_name {
            check_server_name(name)?;
        }
        Ok(TlsConnector {
            config: Arc::new(config),
            server_name: self.server_name.clone(),
        })
    }
}

/// A loaded client TLS configuration, ready to open associations with; cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl TlsConnector {
    /// A connector from a rustls configuration built elsewhere; `server_name` as in
    /// [`TlsClient::server_name`].
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: Option<String>) -> Self {
        Self {
            config,
            server_name,
        }
    }

    /// The name the certificate of the peer at `addr` (`host:port`) must carry: the
    /// configured server name, or the host; an error when it is neither a DNS name
    /// nor an IP address.
    pub fn server_name_for<'a>(&'a self, addr: &'a str) -> Result<&'a str, TlsError> {
        let name = match &self.server_name {
            Some(name) => name.as_str(),
            None => {
                let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
                // `[::1]:104`: the brackets are not part of the address.
                host.strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host)
            }
        };
        check_server_name(name)?;
        Ok(name)
    }
}

fn check_server_name(name: &str) -> Result<(), TlsError> {
    ServerName::try_from(name).map(|_| ()).map_err(|_| {
        TlsError::Config(format!(
            "server name {name:?} is not a DNS name or an IP address to verify the peer's certificate against"
        ))
    })
}

/// Verify that a DICOM node answers: associate, C-ECHO, release.
pub async fn echo(addr: &str, calling_ae: &str, called_ae: &str) -> Result<(), ScuError> {
    echo_with(addr, calling_ae, called_ae, None).await
}

/// [`echo`], over TLS when `tls` is given.
pub async fn echo_with(
    addr: &str,
    calling_ae: &str,
    called_ae: &str,
    tls: Option<&TlsConnector>,
) -> Result<(), ScuError> {
    let mut assoc = associate(
        addr,
        tls,
        calling_ae,
        called_ae,
        &[(
            VERIFICATION.to_string(),
            vec![
                EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
                IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
            ],
        )],
    )
    .await?;
    let exchange = |reason: String| ScuError::Exchange {
        addr: addr.to_string(),
        reason,
    };
    let context_id = assoc
        .presentation_contexts()
        .first()
        .map(|c| c.id)
        .ok_or_else(|| exchange("no presentation context accepted".into()))?;
    send_pdvs(
        &mut assoc,
        context_id,
        PDataValueType::Command,
        &dimse::c_echo_rq(1),
    )
    .await
    .map_err(exchange)?;
    let response = receive_command(&mut assoc).await.map_err(exchange)?;
    let _ = assoc.release().await;
    if response.field != field::C_ECHO_RSP || response.message_id != 1 {
        return Err(exchange(format!(
            "unexpected response {:#06x} to message {}",
            response.field, response.message_id
        )));
    }
    match response.status {
        Some(dimse::SUCCESS) => Ok(()),
        Some(status) => Err(ScuError::EchoStatus { status }),
        None => Err(exchange("C-ECHO-RSP without a status".into())),
    }
}

/// A Part-10 object held in memory, with the name reports give it (a store key).
#[derive(Debug, Clone)]
pub struct Part10 {
    /// Shown as the `path` of a [`FailedFile`].
    pub name: String,
    /// The whole file: preamble, `DICM`, File Meta group, dataset.
    pub bytes: bytes::Bytes,
}

/// Where the bytes of a prepared object are.
enum Source {
    File,
    Memory(bytes::Bytes),
}

/// A file or object ready to send.
struct Prepared {
    path: PathBuf,
    source: Source,
    sop_class: String,
    sop_instance: String,
    transfer_syntax: String,
    dataset_offset: u64,
}

/// Send files with C-STORE, each in its own transfer syntax, sequentially.
///
/// Fails as a whole only when an association cannot be established; every file-level
/// problem is recorded in the report.
pub async fn send_files(
    addr: &str,
    calling_ae: &str,
    called_ae: &str,
    files: &[PathBuf],
) -> Result<SendReport, ScuError> {
    send_files_with_progress(addr, calling_ae, called_ae, files, &mut |_| {}).await
}

/// [`send_files`], calling `on_file` once per file as it is done with (sent, failed or
/// skipped), with the number of dataset bytes sent for it (0 if none), so a caller can
/// show progress.
pub async fn send_files_with_progress(
    addr: &str,
    calling_ae: &str,
    called_ae: &str,
    files: &[PathBuf],
    on_file: &mut (dyn FnMut(u64) + Send),
) -> Result<SendReport, ScuError> {
    let mut report = SendReport::default();
    let mut prepared = Vec::new();
    for path in files {
        let read = std::fs::File::open(path)
            .map_err(|e| format!("cannot open: {e}"))
            .and_then(|f| read_meta(std::io::BufReader::new(f)));
        match read {
            Ok(Some(meta)) => prepared.push(meta.prepared(path.clone(), Source::File)),
            Ok(None) => {
                report.skipped.push(path.clone());
                on_file(0);
            }
            Err(comment) => {
                report.failed.push(FailedFile {
                    path: path.clone(),
                    status: None,
                    comment,
                });
                on_file(0);
            }
        }
    }
    send_prepared(addr, None, calling_ae, called_ae, prepared, report, on_file).await
}

/// Sends Part-10 objects held in memory with C-STORE over one association per up to
/// [`MAX_CONTEXTS`] (SOP class, transfer syntax) pairs, each in its own transfer
/// syntax; reports name them by [`Part10::name`]. An object that is not Part-10 is
/// reported failed, not skipped.
pub async fn send_objects(
    addr: &str,
    calling_ae: &str,
    called_ae: &str,
    objects: &[Part10],
) -> Result<SendReport, ScuError> {
    send_objects_with(addr, calling_ae, called_ae, objects, None).await
}

/// [`send_objects`], over TLS when `tls` is given.
pub async fn send_objects_with(
    addr: &str,
    calling_ae: &str,
    called_ae: &str,
    objects: &[Part10],
    tls: Option<&TlsConnector>,
) -> Result<SendReport, ScuError> {
    let (prepared, report) = prepare_objects(objects);
    send_prepared(
        addr,
        tls,
        calling_ae,
        called_ae,
        prepared,
        report,
        &mut |_| {},
    )
    .await
}

/// The (SOP class, transfer syntax) pairs of Part-10 objects, in order of first
/// appearance; objects that are not Part-10 have none.
pub fn presentation_pairs(objects: &[Part10]) -> Vec<(String, String)> {
    let (prepared, _) = prepare_objects(objects);
    let mut pairs: Vec<(String, String)> = Vec::new();
    for p in prepared {
        let pair = (p.sop_class, p.transfer_syntax);
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    pairs
}

/// An association kept open across several sends, for a sender that sends the same
/// kinds of objects to the same node again and again (the exporter): one A-ASSOCIATE
/// and one A-RELEASE for many C-STOREs.
pub struct Session {
    assoc: Link,
    pairs: Vec<(String, String)>,
    message_id: u16,
    broken: bool,
}

impl Session {
    /// Associates over plain TCP, proposing one presentation context per (SOP class,
    /// transfer syntax) pair (at most [`MAX_CONTEXTS`]).
    pub async fn open(
        addr: &str,
        calling_ae: &str,
        called_ae: &str,
        pairs: &[(String, String)],
    ) -> Result<Self, ScuError> {
        Self::connect(addr, calling_ae, called_ae, pairs, None).await
    }

    /// [`Session::open`], over TLS when `tls` is given.
    pub async fn connect(
        addr: &str,
        calling_ae: &str,
        called_ae: &str,
        pairs: &[(String, String)],
        tls: Option<&TlsConnector>,
    ) -> Result<Self, ScuError> {
        if pairs.is_empty() || pairs.len() > MAX_CONTEXTS {
            return Err(ScuError::Association {
                addr: addr.to_string(),
                reason: format!(
                    "{} presentation contexts proposed: 1 to {MAX_CONTEXTS} are possible",
                    pairs.len()
                ),
            });
        }
        let contexts: Vec<(String, Vec<String>)> = pairs
            .iter()
            .map(|(class, ts)| (class.clone(), vec![ts.clone()]))
            .collect();
        let assoc = associate(addr, tls, calling_ae, called_ae, &contexts).await?;
        Ok(Self {
            assoc,
            pairs: pairs.to_vec(),
            message_id: 0,
            broken: false,
        })
    }

    /// Whether this association runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.assoc, Link::Tls(_))
    }

    /// The pairs this association was opened for.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// Whether the association ended during a send (the peer closed it, the network
    /// broke): it cannot be used again.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Sends the objects over this association, reporting each; an object whose pair
    /// the peer did not accept is reported failed, not sent.
    pub async fn send(&mut self, objects: &[Part10]) -> SendReport {
        let (prepared, mut report) = prepare_objects(objects);
        if self.broken {
            for p in &prepared {
                report
                    .failed
                    .push(not_sent(p, "not sent: the association ended"));
            }
            return report;
        }
        let files: Vec<&Prepared> = prepared.iter().collect();
        let alive = send_batch(
            &mut self.assoc,
            &files,
            &mut report,
            &mut self.message_id,
            &mut |_| {},
        )
        .await;
        self.broken = !alive;
        report
    }

    /// Releases the association (A-RELEASE), or aborts it if it is broken.
    pub async fn release(self) {
        if self.broken {
            let _ = self.assoc.abort().await;
        } else {
            let _ = self.assoc.release().await;
        }
    }
}

/// The Part-10 objects' meta groups read, and a report holding those that are not
/// Part-10.
fn prepare_objects(objects: &[Part10]) -> (Vec<Prepared>, SendReport) {
    let mut report = SendReport::default();
    let mut prepared = Vec::new();
    for object in objects {
        let path = PathBuf::from(&object.name);
        match read_meta(std::io::Cursor::new(&object.bytes[..])) {
            Ok(Some(meta)) => {
                prepared.push(meta.prepared(path, Source::Memory(object.bytes.clone())))
            }
            Ok(None) => report.failed.push(FailedFile {
                path,
                status: None,
                comment: "not a DICOM Part-10 object".into(),
            }),
            Err(comment) => report.failed.push(FailedFile {
                path,
                status: None,
                comment,
            }),
        }
    }
    (prepared, report)
}

async fn send_prepared(
    addr: &str,
    tls: Option<&TlsConnector>,
    calling_ae: &str,
    called_ae: &str,
    prepared: Vec<Prepared>,
    mut report: SendReport,
    on_file: &mut (dyn FnMut(u64) + Send),
) -> Result<SendReport, ScuError> {
    // Distinct (SOP class, transfer syntax) pairs in order of first appearance.
    let mut pairs: Vec<(String, String)> = Vec::new();
    for p in &prepared {
        let pair = (p.sop_class.clone(), p.transfer_syntax.clone());
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    for batch in pairs.chunks(MAX_CONTEXTS) {
        let contexts: Vec<(String, Vec<String>)> = batch
            .iter()
            .map(|(class, ts)| (class.clone(), vec![ts.clone()]))
            .collect();
        let batch_files: Vec<&Prepared> = prepared
            .iter()
            .filter(|p| {
                batch
                    .iter()
                    .any(|(c, t)| *c == p.sop_class && *t == p.transfer_syntax)
            })
            .collect();
        let mut assoc = match associate(addr, tls, calling_ae, called_ae, &contexts).await {
            Ok(a) => a,
            Err(ScuError::NothingAccepted { .. }) => {
                for p in batch_files {
                    report
                        .failed
                        .push(not_sent(p, "receiver accepted no presentation context"));
                    on_file(0);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut message_id = 0;
        if send_batch(
            &mut assoc,
            &batch_files,
            &mut report,
            &mut message_id,
            on_file,
        )
        .await
        {
            let _ = assoc.release().await;
        } else {
            let _ = assoc.abort().await;
        }
    }
    Ok(report)
}

/// Send the files over one association; on a broken association mark the rest failed
/// and return `false`.
async fn send_batch(
    assoc: &mut Link,
    files: &[&Prepared],
    report: &mut SendReport,
    message_id: &mut u16,
    on_file: &mut (dyn FnMut(u64) + Send),
) -> bool {
    for (i, p) in files.iter().enumerate() {
        let Some(context_id) = assoc
            .presentation_contexts()
            .iter()
            .find(|c| c.abstract_syntax == p.sop_class && c.transfer_syntax == p.transfer_syntax)
            .map(|c| c.id)
        else {
            report.failed.push(not_sent(
                p,
                "receiver refused the SOP class or transfer syntax",
            ));
            on_file(0);
            continue;
        };
        let dataset = match read_dataset(p).await {
            Ok(d) => d,
            Err(comment) => {
                report.failed.push(not_sent(p, &comment));
                on_file(0);
                continue;
            }
        };
        *message_id = message_id.wrapping_add(1).max(1);
        let result = store_one(assoc, context_id, *message_id, p, &dataset).await;
        on_file(dataset.len() as u64);
        match result {
            Ok(response) => {
                let status = response.status.unwrap_or(dimse::CANNOT_UNDERSTAND);
                match dimse::status_kind(status) {
                    StatusKind::Success | StatusKind::Warning => report.sent += 1,
                    _ => report.failed.push(FailedFile {
                        path: p.path.clone(),
                        status: Some(status),
                        comment: response.error_comment.unwrap_or_default(),
                    }),
                }
            }
            Err(reason) => {
                report.failed.push(not_sent(p, &reason));
                for rest in &files[i + 1..] {
                    report
                        .failed
                        .push(not_sent(rest, "not sent: the association ended"));
                    on_file(0);
                }
                return false;
            }
        }
    }
    true
}

async fn store_one(
    assoc: &mut Link,
    context_id: u8,
    message_id: u16,
    p: &Prepared,
    dataset: &[u8],
) -> Result<dimse::Command, String> {
    let command = dimse::c_store_rq(
        message_id,
        &p.sop_class,
        &p.sop_instance,
        dimse::PRIORITY_MEDIUM,
    );
    send_pdvs(assoc, context_id, PDataValueType::Command, &command).await?;
    send_pdvs(assoc, context_id, PDataValueType::Data, dataset).await?;
    let response = receive_command(assoc).await?;
    if response.field != field::C_STORE_RSP || response.message_id != message_id {
        return Err(format!(
            "unexpected response {:#06x} to message {message_id}",
            response.field
        ));
    }
    Ok(response)
}

fn not_sent(p: &Prepared, why: &str) -> FailedFile {
    FailedFile {
        path: p.path.clone(),
        status: None,
        comment: why.to_string(),
    }
}

/// What the File Meta group of a Part-10 object says.
struct Meta {
    sop_class: String,
    sop_instance: String,
    transfer_syntax: String,
    dataset_offset: u64,
}

impl Meta {
    fn prepared(self, path: PathBuf, source: Source) -> Prepared {
        Prepared {
            path,
            source,
            sop_class: self.sop_class,
            sop_instance: self.sop_instance,
            transfer_syntax: self.transfer_syntax,
            dataset_offset: self.dataset_offset,
        }
    }
}

/// Read the File Meta group of a Part-10 object. `Ok(None)` if it is not one.
fn read_meta(mut reader: impl Read) -> Result<Option<Meta>, String> {
    let mut preamble = [0u8; 128];
    if reader.read_exact(&mut preamble).is_err() {
        return Ok(None);
    }
    let mut counting = CountingReader {
        inner: &mut reader,
        count: 0,
    };
    let mut magic = [0u8; 4];
    if counting.read_exact(&mut magic).is_err() || &magic != b"DICM" {
        return Ok(None);
    }
    let meta = FileMetaTable::from_reader(std::io::Cursor::new(magic).chain(&mut counting))
        .map_err(|e| format!("unreadable file meta group: {}", error_chain(&e)))?;
    let dataset_offset = 128 + counting.count;
    Ok(Some(Meta {
        sop_class: meta.media_storage_sop_class_uid().to_string(),
        sop_instance: meta.media_storage_sop_instance_uid().to_string(),
        transfer_syntax: meta.transfer_syntax().to_string(),
        dataset_offset,
    }))
}

/// The dataset bytes of a prepared file, exactly as stored.
async fn read_dataset(p: &Prepared) -> Result<Vec<u8>, String> {
    let mut bytes = match &p.source {
        Source::File => tokio::fs::read(&p.path)
            .await
            .map_err(|e| format!("cannot read: {e}"))?,
        Source::Memory(bytes) => bytes.to_vec(),
    };
    let offset = usize::try_from(p.dataset_offset).unwrap_or(usize::MAX);
    if offset > bytes.len() {
        return Err("file ends inside its meta group".into());
    }
    bytes.drain(..offset);
    if p.transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN && bytes.len() % 2 == 1 {
        // A deflated bitstream of odd length is sent padded with one NUL (PS3.5 A.5).
        bytes.push(0);
    }
    Ok(bytes)
}

/// Counts the bytes read through it.
struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// An established association, over plain TCP or TLS.
enum Link {
    // Boxed: an association over TLS carries some 1.3 KB of session state.
    Tcp(Box<AsyncClientAssociation<TcpStream>>),
    Tls(Box<AsyncClientAssociation<AsyncTlsStream>>),
}

impl Link {
    fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        match self {
            Link::Tcp(a) => a.presentation_contexts(),
            Link::Tls(a) => a.presentation_contexts(),
        }
    }

    fn acceptor_max_pdu_length(&self) -> u32 {
        match self {
            Link::Tcp(a) => a.acceptor_max_pdu_length(),
            Link::Tls(a) => a.acceptor_max_pdu_length(),
        }
    }

    async fn send(&mut self, pdu: &Pdu) -> Result<(), dicom_ul::association::Error> {
        match self {
            Link::Tcp(a) => a.send(pdu).await,
            Link::Tls(a) => a.send(pdu).await,
        }
    }

    async fn receive(&mut self) -> Result<Pdu, dicom_ul::association::Error> {
        match self {
            Link::Tcp(a) => a.receive().await,
            Link::Tls(a) => a.receive().await,
        }
    }

    async fn release(self) -> Result<(), dicom_ul::association::Error> {
        match self {
            Link::Tcp(a) => a.release().await,
            Link::Tls(a) => a.release().await,
        }
    }

    async fn abort(self) -> Result<(), dicom_ul::association::Error> {
        match self {
            Link::Tcp(a) => a.abort().await,
            Link::Tls(a) => a.abort().await,
        }
    }
}

async fn associate(
    addr: &str,
    tls: Option<&TlsConnector>,
    calling_ae: &str,
    called_ae: &str,
    contexts: &[(String, Vec<String>)],
) -> Result<Link, ScuError> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(calling_ae)
        .called_ae_title(called_ae)
        .connection_timeout(CONNECT_TIMEOUT)
        .read_timeout(RESPONSE_TIMEOUT)
        .write_timeout(RESPONSE_TIMEOUT);
    for (class, syntaxes) in contexts {
        options = options.with_presentation_context(
            class.as_str(),
            syntaxes.iter().map(String::as_str).collect(),
        );
    }
    let failed = |e: dicom_ul::association::Error| match e {
        dicom_ul::association::Error::NoAcceptedPresentationContexts { .. } => {
            ScuError::NothingAccepted {
                addr: addr.to_string(),
            }
        }
        // With TLS support compiled in, dicom-ul reports every failure to read the
        // A-ASSOCIATE response as "TLS not enabled, but peer seems to be sending TLS
        // data", whatever happened; say what it can mean instead.
        dicom_ul::association::Error::TlsNotSupported => ScuError::Association {
            addr: addr.to_string(),
            reason: match tls {
                Some(_) => "over TLS: no A-ASSOCIATE response after the TLS handshake: the peer \
                    closed the connection (it may have refused the client certificate, or \
                    none was configured) or did not answer in time"
                    .into(),
                None => "no A-ASSOCIATE response: the peer closed the connection, did not \
                    answer in time, or expects TLS on this port"
                    .into(),
            },
        },
        e => ScuError::Association {
            addr: addr.to_string(),
            reason: match tls {
                Some(_) => format!("over TLS: {}", error_chain(&e)),
                None => error_chain(&e),
            },
        },
    };
    // Commands are small writes; without TCP_NODELAY each one waits for a delayed ACK.
    match tls {
        None => {
            let mut assoc = options.establish_async(addr).await.map_err(failed)?;
            let _ = assoc.inner_stream().set_nodelay(true);
            Ok(Link::Tcp(Box::new(assoc)))
        }
        Some(tls) => {
            let server_name = tls
                .server_name_for(addr)
                .map_err(|e| ScuError::Association {
                    addr: addr.to_string(),
                    reason: format!("over TLS: {e}"),
                })?;
            let mut assoc = options
                .tls_config(tls.config.clone())
                .server_name(server_name)
                .establish_tls_async(addr)
                .await
                .map_err(failed)?;
            let _ = assoc.inner_stream().get_ref().0.set_nodelay(true);
            Ok(Link::Tls(Box::new(assoc)))
        }
    }
}

/// Send `data` as PDVs of one type, each in its own P-DATA-TF within the peer's limit.
async fn send_pdvs(
    assoc: &mut Link,
    context_id: u8,
    value_type: PDataValueType,
    data: &[u8],
) -> Result<(), String> {
    let max = (assoc.acceptor_max_pdu_length() as usize)
        .saturating_sub(dicom_ul::pdu::PDV_HEADER_SIZE as usize)
        .clamp(16, MAX_SEND_PDV);
    // An empty value still needs its last fragment.
    let empty: &[&[u8]] = &[&[]];
    let fragments: Box<dyn Iterator<Item = &[u8]> + Send> = if data.is_empty() {
        Box::new(empty.iter().copied())
    } else {
        Box::new(data.chunks(max))
    };
    let mut chunks = fragments.peekable();
    while let Some(chunk) = chunks.next() {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: value_type.clone(),
                is_last: chunks.peek().is_none(),
                data: chunk.to_vec(),
            }],
        };
        assoc.send(&pdu).await.map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

/// Receive one complete command set.
async fn receive_command(assoc: &mut Link) -> Result<dimse::Command, String> {
    let mut bytes = Vec::new();
    loop {
        let pdu = assoc.receive().await.map_err(|e| error_chain(&e))?;
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    if pdv.value_type != PDataValueType::Command {
                        return Err("unexpected dataset in a response".into());
                    }
                    if bytes.len() + pdv.data.len() > 64 * 1024 {
                        return Err("response command set is too large".into());
                    }
                    bytes.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        return dimse::parse_command(&bytes).map_err(|e| e.to_string());
                    }
                }
            }
            Pdu::AbortRQ { source } => {
                return Err(format!("association aborted by the receiver ({source:?})"));
            }
            other => {
                return Err(format!(
                    "unexpected PDU while waiting for a response: {}",
                    other.short_description()
                ));
            }
        }
    }
}
