//! The listener stage as a whole (`service::run`) on a real nats-server and a folder
//! store: replicas, outages and failing storage, with radflow's own SCU as the sender.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use futures::StreamExt;
use radflow_listener::assembly::AssemblyConfig;
use radflow_listener::ingest::AdmissionConfig;
use radflow_listener::scp::ScpConfig;
use radflow_listener::scu::{self, ScuError};
use radflow_listener::service::{self, ListenerDeps};
use radflow_shared::bus::{Bus, ConsumerSpec, NatsBus, NatsOptions, Outgoing, SERIES};
use radflow_shared::events::{self, SeriesReady};
use radflow_shared::metrics::Metrics;
use radflow_shared::store::Store;
use radflow_shared::testing::NatsServer;
use tokio_util::sync::CancellationToken;

/// A scratch folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "radflow-listener-svc-{name}-{}-{}",
            std::process::id(),
            radflow_shared::util::now_ms()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "2.25.{}{:04}",
        radflow_shared::util::now_ms(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// `n` small CT slices of one series, written to `dir`; returns (paths, SOP UIDs).
fn write_series(dir: &Path, study: &str, series: &str, n: usize) -> (Vec<PathBuf>, Vec<String>) {
    let mut paths = Vec::new();
    let mut sops = Vec::new();
    for i in 0..n {
        let sop = uid();
        let s = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
        let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        let obj = InMemDicomObject::from_element_iter([
            s(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE),
            s(tags::SOP_INSTANCE_UID, VR::UI, &sop),
            s(tags::MODALITY, VR::CS, "CT"),
            s(tags::STUDY_INSTANCE_UID, VR::UI, study),
            s(tags::SERIES_INSTANCE_UID, VR::UI, series),
            s(tags::INSTANCE_NUMBER, VR::IS, &(i + 1).to_string()),
            us(tags::ROWS, 16),
            us(tags::COLUMNS, 16),
            us(tags::BITS_ALLOCATED, 16),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(vec![i as u16; 256].into()),
            ),
        ]);
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
            .media_storage_sop_class_uid(uids::CT_IMAGE_STORAGE)
            .media_storage_sop_instance_uid(&sop)
            .build()
            .unwrap();
        let path = dir.join(format!("{i:03}.dcm"));
        obj.with_exact_meta(meta).write_to_file(&path).unwrap();
        paths.push(path);
        sops.push(sop);
    }
    (paths, sops)
}

async fn nats_bus(nats: &NatsServer) -> Arc<dyn Bus> {
    Arc::new(
        NatsBus::connect(&NatsOptions {
            url: nats.url(),
            name: "listener-test".into(),
            replicas: 1,
            ..Default::default()
        })
        .await
        .expect("NATS connection"),
    )
}

/// One listener replica on port 0.
struct Replica {
    addr: String,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn replica(bus: Arc<dyn Bus>, store: Store, quiet_secs: u64) -> Replica {
    let admission = AdmissionConfig {
        failure_cooldown: Duration::from_secs(1),
        ..AdmissionConfig::default()
    };
    replica_with(bus, store, quiet_secs, admission).await
}

async fn replica_with(
    bus: Arc<dyn Bus>,
    store: Store,
    quiet_secs: u64,
    admission: AdmissionConfig,
) -> Replica {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let deps = ListenerDeps {
        scp: ScpConfig::default(),
        assembly: AssemblyConfig {
            quiet: Duration::from_secs(quiet_secs),
            short_quiet: Duration::from_secs(1),
            ..AssemblyConfig::default()
        },
        admission,
        journal: service::open_journal(&store, true).await.unwrap(),
        store,
        bus,
        metrics: Metrics::new(),
        health: None,
    };
    let handle = tokio::spawn(service::run(socket, deps, shutdown.clone()));
    Replica {
        addr,
        shutdown,
        handle,
    }
}

impl Replica {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
    }
}

/// Every SeriesReady published so far for `series`.
async fn ready_events(bus: &dyn Bus, series: &str) -> Vec<SeriesReady> {
    bus.read(SERIES, 1, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| events::decode::<SeriesReady>(&m.payload).ok())
        .filter(|e| e.series_uid == series)
        .collect()
}

async fn wait_ready(bus: &dyn Bus, series: &str, n: usize, within: Duration) -> Vec<SeriesReady> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let events = ready_events(bus, series).await;
        if events.len() >= n || tokio::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to 60 s) until a ready revision of `series` holds `instances`; returns
/// every ready event of the series.
async fn wait_all(bus: &dyn Bus, series: &str, instances: u32) -> Vec<SeriesReady> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = ready_events(bus, series).await;
        if ready.iter().any(|r| r.instances == instances) {
            return ready;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Send until every file was answered Success (transient refusals are retried).
async fn send_until_stored(addr: &str, files: &[PathBuf]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut left = files.to_vec();
    loop {
        match scu::send_files(addr, "RETRYSCU", "RADFLOW", &left).await {
            Ok(report) => {
                left = report.failed.into_iter().map(|f| f.path).collect();
                if left.is_empty() {
                    return;
                }
            }
            Err(ScuError::Association { .. }) => {}
            Err(e) => panic!("sending failed: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} files still refused after 60 s",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn stored_file(root: &Path, study: &str, series: &str, sop: &str) -> PathBuf {
    root.join(format!("dicom/{study}/{series}/{sop}.dcm"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_ready_event_per_revision_and_repeats_change_nothing() {
    let nats = NatsServer::start().expect("nats-server");
    let dir = TempDir::new("replicas");
    let store = Store::local(&dir.0.join("store"), true).unwrap();
    let (bus_a, bus_b) = (nats_bus(&nats).await, nats_bus(&nats).await);
    let a = replica(bus_a.clone(), store.clone(), 3).await;
    let b = replica(bus_b, store.clone(), 3).await;

    let (study, series) = (uid(), uid());
    let files_dir = dir.0.join("in");
    std::fs::create_dir_all(&files_dir).unwrap();
    let (files, sops) = write_series(&files_dir, &study, &series, 21);
    // Replica A gets the first half, B the second half plus three of A's again.
    let to_a = files[..10].to_vec();
    let mut to_b = files[10..20].to_vec();
    to_b.extend_from_slice(&files[..3]);
    let (ra, rb) = tokio::join!(
        scu::send_files(&a.addr, "CT_A", "RADFLOW", &to_a),
        scu::send_files(&b.addr, "CT_B", "RADFLOW", &to_b),
    );
    assert_eq!(ra.unwrap().sent, 10);
    assert_eq!(rb.unwrap().sent, 13);

    let ready = wait_ready(&*bus_a, &series, 1, Duration::from_secs(30)).await;
    assert_eq!(ready.len(), 1, "{ready:?}");
    // Both scanners had time to see the quiet series; still one event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ready = ready_events(&*bus_a, &series).await;
    assert_eq!(ready.len(), 1, "{ready:?}");
    assert_eq!((ready[0].revision, ready[0].instances), (1, 20));
    assert_eq!(ready[0].called_ae, "RADFLOW");
    assert_eq!(ready[0].study_uid, study);
    for sop in &sops[..20] {
        assert!(stored_file(&dir.0.join("store"), &study, &series, sop).is_file());
    }

    // The same instances again change nothing; a new one opens revision 2.
    assert_eq!(
        scu::send_files(&b.addr, "CT_B", "RADFLOW", &files[..5])
            .await
            .unwrap()
            .sent,
        5
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(ready_events(&*bus_a, &series).await.len(), 1);
    scu::send_files(&a.addr, "CT_A", "RADFLOW", &files[20..])
        .await
        .unwrap();
    let ready = wait_ready(&*bus_a, &series, 2, Duration::from_secs(30)).await;
    assert_eq!(ready.len(), 2, "{ready:?}");
    assert_eq!((ready[1].revision, ready[1].instances), (2, 21));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_mid_transfer_fails_instances_until_it_returns() {
    let mut nats = NatsServer::start().expect("nats-server");
    let dir = TempDir::new("outage");
    let root = dir.0.join("store");
    let store = Store::local(&root, true).unwrap();
    let bus = nats_bus(&nats).await;
    let listener = replica(bus.clone(), store, 3).await;
    let (study, series) = (uid(), uid());
    let files_dir = dir.0.join("in");
    std::fs::create_dir_all(&files_dir).unwrap();
    let (files, sops) = write_series(&files_dir, &study, &series, 60);

    // Stop NATS while an association is sending.
    let sending = {
        let (addr, files) = (listener.addr.clone(), files.clone());
        tokio::spawn(async move { scu::send_files(&addr, "OUTAGE", "RADFLOW", &files).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stored = || {
        std::fs::read_dir(root.join(format!("dicom/{study}/{series}")))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".dcm"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    while stored() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "nothing stored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nats.stop();
    let report = sending
        .await
        .unwrap()
        .expect("the association itself works");
    assert!(report.sent >= 4, "{report:?}");
    assert!(
        !report.failed.is_empty(),
        "no instance failed during the outage"
    );
    for f in &report.failed {
        assert_eq!(f.status, Some(0xA700), "{f:?}");
    }
    let acked: Vec<&PathBuf> = files
        .iter()
        .filter(|p| !report.failed.iter().any(|f| &&f.path == p))
        .collect();
    assert_eq!(acked.len(), report.sent);
    for (path, sop) in files.iter().zip(&sops) {
        if acked.contains(&path) {
            assert!(
                stored_file(&root, &study, &series, sop).is_file(),
                "acknowledged {sop} missing"
            );
        }
    }

    // While NATS is down, new attempts fail too.
    let during = scu::send_files(&listener.addr, "OUTAGE", "RADFLOW", &files[..1]).await;
    assert!(
        matches!(&during, Err(ScuError::Association { .. }))
            || during.as_ref().is_ok_and(|r| r.sent == 0),
        "{during:?}"
    );

    nats.restart().expect("nats-server restarts");
    let failed: Vec<PathBuf> = report.failed.iter().map(|f| f.path.clone()).collect();
    send_until_stored(&listener.addr, &failed).await;
    // The part sent before the outage may have become a revision of its own (its
    // association was released); the retried instances then make the next one. Either
    // way a ready revision holds all 60, and each revision is announced once.
    let ready = wait_all(&*bus, &series, 60).await;
    let mut revisions: Vec<u32> = ready.iter().map(|r| r.revision).collect();
    revisions.dedup();
    assert_eq!(revisions.len(), ready.len(), "{ready:?}");
    for sop in &sops {
        assert!(stored_file(&root, &study, &series, sop).is_file());
    }
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_storage_gives_a700_and_nothing_acknowledged_is_missing() {
    let nats = NatsServer::start().expect("nats-server");
    let dir = TempDir::new("storage");
    let root = dir.0.join("store");
    let store = Store::local(&root, true).unwrap();
    let bus = nats_bus(&nats).await;
    let listener = replica(bus.clone(), store, 3).await;
    let (study, series) = (uid(), uid());
    let files_dir = dir.0.join("in");
    std::fs::create_dir_all(&files_dir).unwrap();
    let (files, sops) = write_series(&files_dir, &study, &series, 10);

    let first = scu::send_files(&listener.addr, "DISKSCU", "RADFLOW", &files[..4])
        .await
        .unwrap();
    assert_eq!(first.sent, 4);
    // Break the storage: the folder that holds the study becomes a plain file.
    let study_dir = root.join(format!("dicom/{study}"));
    let moved = dir.0.join("moved");
    std::fs::rename(&study_dir, &moved).unwrap();
    std::fs::write(&study_dir, b"not a folder").unwrap();
    let broken = scu::send_files(&listener.addr, "DISKSCU", "RADFLOW", &files[4..])
        .await
        .unwrap();
    assert_eq!(broken.sent, 0);
    assert_eq!(broken.failed.len(), 6);
    assert!(
        broken.failed.iter().all(|f| f.status == Some(0xA700)),
        "{broken:?}"
    );
    // Repair it; the sender's retry succeeds.
    std::fs::remove_file(&study_dir).unwrap();
    std::fs::rename(&moved, &study_dir).unwrap();
    send_until_stored(&listener.addr, &files[4..]).await;

    for sop in &sops {
        assert!(
            stored_file(&root, &study, &series, sop).is_file(),
            "{sop} missing"
        );
    }
    // Nothing half-written is left beside the instances.
    let names: Vec<String> = std::fs::read_dir(root.join(format!("dicom/{study}/{series}")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 10, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".dcm")), "{names:?}");
    // The first four may have made a revision of their own (their association was
    // released before the failures); a ready revision holds all ten in the end.
    let ready = wait_all(&*bus, &series, 10).await;
    let mut revisions: Vec<u32> = ready.iter().map(|r| r.revision).collect();
    revisions.dedup();
    assert_eq!(revisions.len(), ready.len(), "{ready:?}");
    listener.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_backlog_refuses_new_associations_transiently() {
    let nats = NatsServer::start().expect("nats-server");
    let dir = TempDir::new("backlog");
    let store = Store::local(&dir.0.join("store"), true).unwrap();
    let bus = nats_bus(&nats).await;
    // The preprocessors' queue holds three series nobody has taken yet.
    let mut queue = bus
        .subscribe(&ConsumerSpec::new(SERIES, "preprocessor"))
        .await
        .unwrap();
    for n in 0..3 {
        bus.publish(Outgoing {
            subject: "radflow.series.ready".into(),
            msg_id: format!("backlog-test-{n}"),
            correlation_id: String::new(),
            payload: bytes::Bytes::from_static(b"{}"),
        })
        .await
        .unwrap();
    }
    let admission = AdmissionConfig {
        max_series_backlog: 2,
        backlog_poll: Duration::from_millis(100),
        ..AdmissionConfig::default()
    };
    let listener = replica_with(bus.clone(), store, 3, admission).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match scu::echo(&listener.addr, "BUSY", "RADFLOW").await {
            Err(ScuError::Association { reason, .. }) => {
                assert!(reason.contains("temporary congestion"), "{reason}");
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "still admitted with a backlog: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The preprocessors catch up: associations are admitted again.
    for _ in 0..3 {
        let delivery = queue.next().await.unwrap().unwrap();
        delivery.acker.ack().await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while scu::echo(&listener.addr, "BUSY", "RADFLOW").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    listener.stop().await;
}
