//! STOW-RS into the listener's ingest (`Listener::dicomweb`) with the in-process bus, on
//! a memory store (multipart uploads) and a folder store: large parts written in pieces
//! while they arrive, the size limit, truncation found at the end of a streamed part,
//! and 503 before the listener runs.

use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use radflow_listener::assembly::AssemblyConfig;
use radflow_listener::ingest::AdmissionConfig;
use radflow_listener::scp::ScpConfig;
use radflow_listener::service::{Listener, ListenerDeps};
use radflow_shared::bus::{Bus, InProcBus};
use radflow_shared::metrics::Metrics;
use radflow_shared::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const STUDY: &str = "1.2.826.0.1.3680043.10.1";
const SERIES: &str = "1.2.826.0.1.3680043.10.1.1";

/// A CT instance of `rows`×`rows` 16-bit pixels as a Part-10 file.
fn instance(sop: &str, rows: u16) -> Vec<u8> {
    let s = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let pixels = usize::from(rows) * usize::from(rows);
    let obj = InMemDicomObject::from_element_iter([
        s(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE),
        s(tags::SOP_INSTANCE_UID, VR::UI, sop),
        s(tags::MODALITY, VR::CS, "CT"),
        s(tags::STUDY_INSTANCE_UID, VR::UI, STUDY),
        s(tags::SERIES_INSTANCE_UID, VR::UI, SERIES),
        us(tags::SAMPLES_PER_PIXEL, 1),
        us(tags::ROWS, rows),
        us(tags::COLUMNS, rows),
        us(tags::BITS_ALLOCATED, 16),
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16((0..pixels).map(|i| i as u16).collect()),
        ),
    ]);
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .media_storage_sop_class_uid(uids::CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(sop)
        .build()
        .unwrap();
    let mut out = Vec::new();
    obj.with_exact_meta(meta).write_all(&mut out).unwrap();
    out
}

/// A listener whose STOW-RS routes are served on a port of their own; `run` says
/// whether the listener itself runs (else STOW-RS must refuse).
struct Stow {
    http: std::net::SocketAddr,
    shutdown: CancellationToken,
}

async fn start(store: Store, scp: ScpConfig, run: bool) -> Stow {
    let bus: Arc<dyn Bus> = Arc::new(InProcBus::new());
    let listener = Listener::new(ListenerDeps {
        scp,
        assembly: AssemblyConfig::default(),
        admission: AdmissionConfig::default(),
        store,
        journal: None,
        bus,
        metrics: Metrics::new(),
        health: None,
    });
    let routes = listener.dicomweb(None);
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(http, routes)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    if run {
        let dicom = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tokio::spawn(listener.run(dicom, shutdown.clone()));
        // The listener opens STOW-RS once it serves.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Stow {
        http: addr,
        shutdown,
    }
}

/// POSTs `parts` as one multipart/related body, written in 64 KiB pieces; returns the
/// status, the headers and the body.
async fn post(addr: std::net::SocketAddr, parts: &[Vec<u8>]) -> (u16, String, String) {
    let boundary = "b0undary-x";
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(p);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: multipart/related; type=\"application/dicom\"; boundary={boundary}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(64 * 1024) {
        s.write_all(piece).await.unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head[9..12].parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

fn failure_reasons(body: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["00081198"]["Value"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["00081197"]["Value"][0].as_u64().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

fn small_parts() -> ScpConfig {
    ScpConfig {
        stream_threshold: 64 * 1024,
        part_size: 64 * 1024,
        ..ScpConfig::default()
    }
}

async fn streams_large_parts_as_sent(store: Store) {
    let stow = start(store.clone(), small_parts(), true).await;
    // 1.1 MB each: written in pieces of 64 KiB while they arrive.
    let a = instance("1.2.826.0.1.3680043.10.1.1.1", 740);
    let b = instance("1.2.826.0.1.3680043.10.1.1.2", 740);
    let mut cut = instance("1.2.826.0.1.3680043.10.1.1.3", 740);
    cut.truncate(cut.len() - 1000);
    let (status, head, body) = post(stow.http, &[a.clone(), cut, b.clone()]).await;
    assert_eq!(status, 202, "{head}\n{body}");
    assert!(head.contains("application/dicom+json"), "{head}");
    // Cut inside its pixel data: found at the end of the part, nothing of it kept.
    assert_eq!(failure_reasons(&body), vec![0xC000]);
    for (sop, want) in [
        ("1.2.826.0.1.3680043.10.1.1.1", &a),
        ("1.2.826.0.1.3680043.10.1.1.2", &b),
    ] {
        let got = store
            .get(&Store::instance_key(STUDY, SERIES, sop))
            .await
            .unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got.as_ref() == want.as_slice(), "{sop} differs");
    }
    let cut_key = Store::instance_key(STUDY, SERIES, "1.2.826.0.1.3680043.10.1.1.3");
    assert!(!store.exists(&cut_key).await.unwrap());
    stow.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_parts_stream_into_a_memory_store() {
    streams_large_parts_as_sent(Store::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_parts_stream_into_a_folder_store() {
    let dir = std::env::temp_dir().join(format!("radflow-stow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    streams_large_parts_as_sent(Store::local(&dir, true).unwrap()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_over_the_size_limit_fails_alone() {
    let store = Store::memory();
    let scp = ScpConfig {
        max_instance_bytes: 200_000,
        ..small_parts()
    };
    let stow = start(store.clone(), scp, true).await;
    let big = instance("1.2.826.0.1.3680043.10.1.1.7", 400);
    let small = instance("1.2.826.0.1.3680043.10.1.1.8", 64);
    let (status, head, body) = post(stow.http, &[big, small]).await;
    assert_eq!(status, 202, "{head}\n{body}");
    assert_eq!(failure_reasons(&body), vec![0xA700]);
    let key = |sop| Store::instance_key(STUDY, SERIES, sop);
    assert!(
        store
            .exists(&key("1.2.826.0.1.3680043.10.1.1.8"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .exists(&key("1.2.826.0.1.3680043.10.1.1.7"))
            .await
            .unwrap()
    );
    stow.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_with_retry_after_until_the_listener_runs() {
    let store = Store::memory();
    let stow = start(store.clone(), small_parts(), false).await;
    let (status, head, _) = post(stow.http, &[instance("1.2.826.0.1.3680043.10.1.1.9", 16)]).await;
    assert_eq!(status, 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
    assert!(store.list("dicom/").await.unwrap().is_empty());
    stow.shutdown.cancel();
}
