//! Shared fixtures: an in-memory sink, recording hooks, a server on port 0, generated
//! CT files, and runners for the external DICOM tools.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use radflow_listener::association::Rejection;
use radflow_listener::dataset::InstanceFacts;
use radflow_listener::scp::{
    AssociationHooks, InstanceSink, PartWriter, ReceivedInstance, ScpConfig, StoreFailure, serve,
};
use radflow_shared::metrics::Metrics;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
pub const DEFLATED_LE: &str = "1.2.840.10008.1.2.1.99";

/// Keeps every instance in memory, or fails each store with a configured failure.
#[derive(Default)]
pub struct MemorySink {
    pub instances: Arc<Mutex<Vec<ReceivedInstance>>>,
    pub fail_with: Mutex<Option<StoreFailure>>,
    /// Sizes of the parts written for instances received in parts, per instance.
    pub parts: Arc<Mutex<Vec<Vec<usize>>>>,
    /// Part writers aborted.
    pub aborted: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl InstanceSink for MemorySink {
    async fn store(&self, instance: ReceivedInstance) -> Result<(), StoreFailure> {
        if let Some(failure) = self.fail_with.lock().unwrap().clone() {
            return Err(failure);
        }
        self.instances.lock().unwrap().push(instance);
        Ok(())
    }

    async fn begin_parts(
        &self,
        _facts: &InstanceFacts,
    ) -> Result<Box<dyn PartWriter>, StoreFailure> {
        if let Some(failure) = self.fail_with.lock().unwrap().clone() {
            return Err(failure);
        }
        Ok(Box::new(MemoryParts {
            bytes: Vec::new(),
            sizes: Vec::new(),
            instances: self.instances.clone(),
            parts: self.parts.clone(),
            aborted: self.aborted.clone(),
        }))
    }
}

/// Collects the parts of one instance.
pub struct MemoryParts {
    bytes: Vec<u8>,
    sizes: Vec<usize>,
    instances: Arc<Mutex<Vec<ReceivedInstance>>>,
    parts: Arc<Mutex<Vec<Vec<usize>>>>,
    aborted: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl PartWriter for MemoryParts {
    async fn write(&mut self, part: bytes::Bytes) -> Result<(), StoreFailure> {
        self.sizes.push(part.len());
        self.bytes.extend_from_slice(&part);
        Ok(())
    }

    async fn finish(self: Box<Self>, mut instance: ReceivedInstance) -> Result<(), StoreFailure> {
        assert_eq!(instance.size, self.bytes.len() as u64, "announced size");
        instance.file = self.bytes.into();
        self.parts.lock().unwrap().push(self.sizes);
        self.instances.lock().unwrap().push(instance);
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        self.aborted.fetch_add(1, Ordering::SeqCst);
    }
}

impl MemorySink {
    pub fn take(&self) -> Vec<ReceivedInstance> {
        std::mem::take(&mut *self.instances.lock().unwrap())
    }
}

/// A release as seen by the hooks: calling AE, called AE, (study, series) pairs.
pub type Release = (String, String, Vec<(String, String)>);

/// Records releases; refuses admission when told to.
#[derive(Default)]
pub struct RecordingHooks {
    pub released: Mutex<Vec<Release>>,
    pub refuse_with: Mutex<Option<Rejection>>,
}

impl AssociationHooks for RecordingHooks {
    fn admit(&self) -> Result<(), Rejection> {
        match self.refuse_with.lock().unwrap().clone() {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    fn released(&self, calling_ae: &str, called_ae: &str, study_series: &[(String, String)]) {
        self.released.lock().unwrap().push((
            calling_ae.to_string(),
            called_ae.to_string(),
            study_series.to_vec(),
        ));
    }
}

/// A running SCP on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub sink: Arc<MemorySink>,
    pub hooks: Arc<RecordingHooks>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: ScpConfig) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Arc::new(MemorySink::default());
        let hooks = Arc::new(RecordingHooks::default());
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        let handle = tokio::spawn(serve(
            listener,
            Arc::new(config),
            sink.clone(),
            hooks.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        TestServer {
            addr,
            sink,
            hooks,
            metrics,
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// Wait (briefly) until the hooks saw `n` releases; they run after the last response.
    pub async fn wait_releases(&self, n: usize) -> Vec<Release> {
        for _ in 0..100 {
            if self.hooks.released.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.hooks.released.lock().unwrap().clone()
    }

    /// Cancel and wait for `serve` to return; returns how long that took.
    pub async fn stop(mut self) -> Duration {
        let started = std::time::Instant::now();
        self.shutdown.cancel();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
        started.elapsed()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A DCMTK tool from /usr/bin (pip's pynetdicom installs same-named scripts elsewhere).
pub fn dcmtk(name: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(
        path.exists(),
        "DCMTK's {name} is required at {} (apt-get install dcmtk)",
        path.display()
    );
    path
}

/// Run a tool with Nagle disabled (DCMTK reads TCP_NODELAY), killed after 60 s.
pub async fn run_tool(program: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).env("TCP_NODELAY", "1").kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} did not finish within 60 s", program.display()))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

/// stdout and stderr together, for assertions and failure messages.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Run a DCMTK converter and insist it succeeded.
pub async fn convert(tool: &str, args: &[&str]) {
    let out = run_tool(&dcmtk(tool), args).await;
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        text(&out)
    );
}

/// python3 with pynetdicom, or a failure naming what is missing.
pub fn python_with_pynetdicom() -> PathBuf {
    let python = radflow_shared::testing::python();
    let ok = std::process::Command::new(&python)
        .args(["-c", "import pydicom, pynetdicom"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} with pydicom and pynetdicom is required (.ci/setup installs them into .venv)",
        python.display()
    );
    python
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "radflow-listener-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    pub fn path_str(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh UID under 2.25 (unique per call within and across test runs).
pub fn new_uid() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "2.25.{}{:05}",
        nanos % 10u128.pow(30),
        N.fetch_add(1, Ordering::SeqCst) % 100_000
    )
}

/// Identity of a generated CT image.
#[derive(Debug, Clone)]
pub struct Ct {
    pub sop_class: String,
    pub study: String,
    pub series: String,
    pub instance: String,
    pub number: u32,
    pub size: u16,
}

impl Ct {
    pub fn new(study: &str, series: &str, number: u32, size: u16) -> Ct {
        Ct {
            sop_class: uids::CT_IMAGE_STORAGE.to_string(),
            study: study.to_string(),
            series: series.to_string(),
            instance: new_uid(),
            number,
            size,
        }
    }
}

/// Write a small 12-bit CT slice in explicit VR little endian, with a patient name (the
/// listener must carry it through untouched and never log it).
pub fn write_ct(path: &Path, ct: &Ct) {
    write_ct_with_meta_instance(path, ct, &ct.instance)
}

/// Like [`write_ct`], but with a File Meta SOP Instance UID of our choosing (to make the
/// C-STORE command disagree with the dataset).
pub fn write_ct_with_meta_instance(path: &Path, ct: &Ct, meta_instance: &str) {
    let n = ct.size as usize;
    let pixels: Vec<u16> = (0..n * n)
        .map(|i| ((i % n) * 7 + (i / n) * 3 + ct.number as usize * 11) as u16 % 4096)
        .collect();
    let s = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let obj = InMemDicomObject::from_element_iter([
        s(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        s(tags::SOP_CLASS_UID, VR::UI, &ct.sop_class),
        s(tags::SOP_INSTANCE_UID, VR::UI, &ct.instance),
        s(tags::STUDY_DATE, VR::DA, "20240131"),
        s(tags::MODALITY, VR::CS, "CT"),
        s(tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
        s(tags::PATIENT_ID, VR::LO, "RF-0001"),
        s(tags::STUDY_INSTANCE_UID, VR::UI, &ct.study),
        s(tags::SERIES_INSTANCE_UID, VR::UI, &ct.series),
        s(tags::SERIES_NUMBER, VR::IS, "3"),
        s(tags::INSTANCE_NUMBER, VR::IS, &ct.number.to_string()),
        s(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            &format!("0\\0\\{}", ct.number as f32 * 2.5),
        ),
        s(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\1\\0"),
        s(tags::SLICE_THICKNESS, VR::DS, "2.5"),
        s(tags::PIXEL_SPACING, VR::DS, "0.7\\0.7"),
        us(tags::SAMPLES_PER_PIXEL, 1),
        s(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        us(tags::ROWS, ct.size),
        us(tags::COLUMNS, ct.size),
        us(tags::BITS_ALLOCATED, 16),
        us(tags::BITS_STORED, 12),
        us(tags::HIGH_BIT, 11),
        us(tags::PIXEL_REPRESENTATION, 0),
        s(tags::RESCALE_INTERCEPT, VR::DS, "-1024"),
        s(tags::RESCALE_SLOPE, VR::DS, "1"),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
    ]);
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(EXPLICIT_LE)
        .media_storage_sop_class_uid(&ct.sop_class)
        .media_storage_sop_instance_uid(meta_instance)
        .build()
        .unwrap();
    obj.with_exact_meta(meta).write_to_file(path).unwrap();
}

/// Byte offset of the dataset in a Part-10 file, read from the File Meta group length
/// (independently of the code under test).
pub fn dataset_offset(file: &[u8]) -> usize {
    assert_eq!(&file[128..132], b"DICM", "not a Part-10 file");
    assert_eq!(
        &file[132..138],
        &[2, 0, 0, 0, b'U', b'L'],
        "no group length first"
    );
    let len = u32::from_le_bytes(file[140..144].try_into().unwrap()) as usize;
    144 + len
}

/// The dataset bytes of a Part-10 file on disk.
pub fn dataset_of(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[dataset_offset(&bytes)..].to_vec()
}

/// The transfer syntax recorded in a file's meta group.
pub fn transfer_syntax_of(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    dicom_object::meta::FileMetaTable::from_reader(&bytes[128..])
        .unwrap()
        .transfer_syntax()
        .to_string()
}

/// Find the received instance with this SOP Instance UID.
pub fn find<'a>(instances: &'a [ReceivedInstance], sop_instance: &str) -> &'a ReceivedInstance {
    instances
        .iter()
        .find(|i| i.facts.sop_instance_uid == sop_instance)
        .unwrap_or_else(|| panic!("instance {sop_instance} was not received"))
}

/// Check that a received instance carries the sent file's dataset byte for byte, that its
/// meta group is right, and that dicom-object can open it.
pub fn assert_stored_exactly(received: &ReceivedInstance, sent: &Path, ts: &str, calling: &str) {
    let stored = &received.file[..];
    let offset = dataset_offset(stored);
    let mut expected = dataset_of(sent);
    if ts == DEFLATED_LE && expected.len() % 2 == 1 {
        // A deflated bitstream of odd length travels padded with one NUL (PS3.5 A.5).
        expected.push(0);
    }
    assert_eq!(
        stored.len() - offset,
        expected.len(),
        "dataset length of {}",
        sent.display()
    );
    assert!(
        stored[offset..] == expected[..],
        "dataset bytes of {} differ",
        sent.display()
    );
    assert_eq!(received.transfer_syntax, ts);
    assert_eq!(received.calling_ae, calling);

    let dir = TempDir::new("stored");
    let path = dir.path("stored.dcm");
    std::fs::write(&path, stored).unwrap();
    let obj = dicom_object::open_file(&path).expect("dicom-object opens the stored file");
    assert_eq!(obj.meta().transfer_syntax(), ts);
    assert_eq!(
        obj.meta().media_storage_sop_instance_uid(),
        received.facts.sop_instance_uid
    );
    assert_eq!(
        obj.meta().media_storage_sop_class_uid(),
        received.facts.sop_class_uid
    );
    assert_eq!(obj.meta().source_application_entity_title(), Some(calling));
    assert_eq!(
        obj.meta().implementation_class_uid(),
        radflow_listener::association::IMPLEMENTATION_CLASS_UID
    );
    let uid = obj
        .element(tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(uid, received.facts.sop_instance_uid);
}

/// A client association opened with dicom-ul, for driving the protocol by hand.
pub async fn open_association(
    addr: SocketAddr,
    contexts: &[(&str, &[&str])],
) -> dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream> {
    let mut options = dicom_ul::association::ClientAssociationOptions::new()
        .calling_ae_title("RAWSCU")
        .called_ae_title("RADFLOW")
        .read_timeout(Duration::from_secs(10));
    for (abstract_syntax, syntaxes) in contexts {
        options = options.with_presentation_context(*abstract_syntax, syntaxes.to_vec());
    }
    options
        .establish_async(addr)
        .await
        .expect("association established")
}

/// One P-DATA-TF with one fragment.
pub fn pdata(context_id: u8, command: bool, is_last: bool, data: &[u8]) -> dicom_ul::pdu::Pdu {
    dicom_ul::pdu::Pdu::PData {
        data: vec![dicom_ul::pdu::PDataValue {
            presentation_context_id: context_id,
            value_type: if command {
                dicom_ul::pdu::PDataValueType::Command
            } else {
                dicom_ul::pdu::PDataValueType::Data
            },
            is_last,
            data: data.to_vec(),
        }],
    }
}

/// Receive PDUs until a complete command set arrives; `None` on abort or close.
pub async fn receive_command(
    assoc: &mut dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream>,
) -> Option<radflow_listener::dimse::Command> {
    let mut bytes = Vec::new();
    loop {
        match assoc.receive().await.ok()? {
            dicom_ul::pdu::Pdu::PData { data } => {
                for pdv in data {
                    bytes.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        return Some(radflow_listener::dimse::parse_command(&bytes).unwrap());
                    }
                }
            }
            _ => return None,
        }
    }
}

pub const VERIFICATION: &str = "1.2.840.10008.1.1";
pub const CT_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
