//! Our SCU against our SCP and against DCMTK's storescp.

use std::path::PathBuf;
use std::time::Duration;

use radflow_listener::dimse;
use radflow_listener::scp::{ScpConfig, StoreFailure};
use radflow_listener::scu::{self, ScuError};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_works_and_a_wrong_called_ae_fails() {
    let server = TestServer::start(ScpConfig::default()).await;
    let addr = server.addr.to_string();
    scu::echo(&addr, "RADSEND", "RADFLOW").await.unwrap();
    let err = scu::echo(&addr, "RADSEND", "NOBODY").await.unwrap_err();
    match &err {
        ScuError::Association { reason, .. } => {
            assert!(reason.contains("called AE title not recognized"), "{err}")
        }
        other => panic!("unexpected error {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_files_round_trips_byte_exact() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("scu-send");
    let study = new_uid();
    let series = new_uid();
    let mut files: Vec<(PathBuf, Ct, &str)> = Vec::new();
    for n in 1..=2 {
        let ct = Ct::new(&study, &series, n, 64);
        let path = dir.path(&format!("ct{n}.dcm"));
        write_ct(&path, &ct);
        files.push((path, ct, EXPLICIT_LE));
    }
    // A 512x512 slice, larger than one PDU.
    let big = Ct::new(&study, &series, 3, 512);
    let big_path = dir.path("big.dcm");
    write_ct(&big_path, &big);
    files.push((big_path, big, EXPLICIT_LE));
    // Implicit VR, JPEG-LS and deflated copies made by DCMTK.
    for (n, tool, arg, ts) in [
        (4, "dcmconv", "+ti", IMPLICIT_LE),
        (5, "dcmcjpls", "+el", "1.2.840.10008.1.2.4.80"),
        (6, "dcmconv", "+td", DEFLATED_LE),
    ] {
        let ct = Ct::new(&study, &series, n, 64);
        let source = dir.path_str(&format!("src{n}.dcm"));
        write_ct(std::path::Path::new(&source), &ct);
        let path = dir.path(&format!("conv{n}.dcm"));
        convert(tool, &[arg, &source, path.to_str().unwrap()]).await;
        files.push((path, ct, ts));
    }
    // A deflated stream of odd length, which travels with one padding byte.
    let mut odd = None;
    for n in 10..40 {
        let ct = Ct::new(&study, &series, n, 16 + n as u16);
        let source = dir.path_str(&format!("src{n}.dcm"));
        write_ct(std::path::Path::new(&source), &ct);
        let path = dir.path(&format!("deflated{n}.dcm"));
        convert("dcmconv", &["+td", &source, path.to_str().unwrap()]).await;
        if dataset_of(&path).len() % 2 == 1 {
            odd = Some((path, ct, DEFLATED_LE));
            break;
        }
    }
    files.push(odd.expect("an odd-length deflated dataset among 30 tries"));
    // Not DICOM: skipped.
    let text_file = dir.path("notes.txt");
    std::fs::write(&text_file, "not a DICOM file").unwrap();
    // Command (from the meta group) and dataset disagree on the SOP Instance UID.
    let liar = Ct::new(&study, &series, 7, 64);
    let liar_path = dir.path("liar.dcm");
    write_ct_with_meta_instance(&liar_path, &liar, &new_uid());

    let mut paths: Vec<PathBuf> = files.iter().map(|(p, _, _)| p.clone()).collect();
    paths.push(text_file.clone());
    paths.push(liar_path.clone());
    let report = scu::send_files(&server.addr.to_string(), "RADSEND", "RADFLOW", &paths)
        .await
        .unwrap();

    assert_eq!(report.sent, files.len(), "{report:?}");
    assert_eq!(report.skipped, vec![text_file]);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].path, liar_path);
    assert_eq!(
        report.failed[0].status,
        Some(dimse::DATASET_DOES_NOT_MATCH_SOP_CLASS)
    );
    assert!(!report.failed[0].comment.is_empty());

    let received = server.sink.take();
    assert_eq!(received.len(), files.len());
    for (path, ct, ts) in &files {
        assert_stored_exactly(find(&received, &ct.instance), path, ts, "RADSEND");
    }
    // One association (fewer than 128 contexts), released with its one series.
    let releases = server.wait_releases(1).await;
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].2, vec![(study, series)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_size_limit_are_reported_per_file() {
    let config = ScpConfig {
        max_instance_bytes: 100_000,
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;
    let dir = TempDir::new("scu-fail");
    let big = Ct::new(&new_uid(), &new_uid(), 1, 512);
    let small = Ct::new(&big.study, &big.series, 2, 64);
    let big_path = dir.path("big.dcm");
    let small_path = dir.path("small.dcm");
    write_ct(&big_path, &big);
    write_ct(&small_path, &small);
    let addr = server.addr.to_string();

    // The oversized instance is refused, and the association carries on with the next.
    let report = scu::send_files(
        &addr,
        "RADSEND",
        "RADFLOW",
        &[big_path.clone(), small_path.clone()],
    )
    .await
    .unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].path, big_path);
    assert_eq!(report.failed[0].status, Some(dimse::OUT_OF_RESOURCES));
    assert_eq!(report.failed[0].comment, "instance exceeds the size limit");
    let received = server.sink.take();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].facts.sop_instance_uid, small.instance);

    // A SOP class the listener does not take: refused per context, or per association
    // when it is the only one proposed.
    let mut private = Ct::new(&big.study, &big.series, 3, 16);
    private.sop_class = "1.3.6.1.4.1.99999.1.1".into();
    let private_path = dir.path("private.dcm");
    write_ct(&private_path, &private);
    let report = scu::send_files(
        &addr,
        "RADSEND",
        "RADFLOW",
        &[private_path.clone(), small_path.clone()],
    )
    .await
    .unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].path, private_path);
    assert_eq!(report.failed[0].status, None);
    assert_eq!(
        report.failed[0].comment,
        "receiver refused the SOP class or transfer syntax"
    );
    let report = scu::send_files(
        &addr,
        "RADSEND",
        "RADFLOW",
        std::slice::from_ref(&private_path),
    )
    .await
    .unwrap();
    assert_eq!(report.sent, 0);
    assert_eq!(
        report.failed[0].comment,
        "receiver accepted no presentation context"
    );
    assert_eq!(server.sink.take().len(), 1);

    // A failing sink: its status and comment reach the sender.
    *server.sink.fail_with.lock().unwrap() = Some(StoreFailure::OutOfResources(
        "object store unreachable".into(),
    ));
    let report = scu::send_files(
        &addr,
        "RADSEND",
        "RADFLOW",
        std::slice::from_ref(&small_path),
    )
    .await
    .unwrap();
    assert_eq!(report.sent, 0);
    assert_eq!(report.failed[0].status, Some(0xA700));
    assert_eq!(report.failed[0].comment, "object store unreachable");
    *server.sink.fail_with.lock().unwrap() =
        Some(StoreFailure::CannotUnderstand("undecodable".into()));
    let report = scu::send_files(&addr, "RADSEND", "RADFLOW", &[small_path])
        .await
        .unwrap();
    assert_eq!(report.failed[0].status, Some(0xC000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_128_contexts_use_several_associations() {
    // 130 private SOP classes, one file each: 130 distinct presentation contexts.
    let classes: Vec<String> = (1..=130)
        .map(|i| format!("1.3.6.1.4.1.99999.7.{i}"))
        .collect();
    let config = ScpConfig {
        private_sop_classes: classes.clone(),
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;
    let dir = TempDir::new("scu-many");
    let study = new_uid();
    let series = new_uid();
    let mut paths = Vec::new();
    for (i, class) in classes.iter().enumerate() {
        let mut ct = Ct::new(&study, &series, i as u32 + 1, 8);
        ct.sop_class = class.clone();
        let path = dir.path(&format!("p{i}.dcm"));
        write_ct(&path, &ct);
        paths.push(path);
    }
    let report = scu::send_files(&server.addr.to_string(), "RADSEND", "RADFLOW", &paths)
        .await
        .unwrap();
    assert_eq!(report.sent, 130, "{:?}", report.failed.first());
    assert_eq!(server.sink.take().len(), 130);
    assert_eq!(server.wait_releases(2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_files_to_dcmtk_storescp() {
    let storescp = dcmtk("storescp");
    let dir = TempDir::new("storescp");
    let out_dir = dir.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    // +xa: accept every syntax it knows; +B: write the data exactly as received.
    let mut child = tokio::process::Command::new(&storescp)
        .args([
            "-aet",
            "STORESCP",
            "+xa",
            "+B",
            "-od",
            out_dir.to_str().unwrap(),
            &port,
        ])
        .env("TCP_NODELAY", "1")
        .kill_on_drop(true)
        .spawn()
        .expect("storescp starts");
    let addr = format!("127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..100 {
        if scu::echo(&addr, "RADSEND", "STORESCP").await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "storescp did not answer C-ECHO on {addr}");

    let ct = Ct::new(&new_uid(), &new_uid(), 1, 64);
    let explicit = dir.path("ct.dcm");
    write_ct(&explicit, &ct);
    let jls_source = Ct::new(&ct.study, &ct.series, 2, 64);
    let source = dir.path_str("src.dcm");
    write_ct(std::path::Path::new(&source), &jls_source);
    let jls = dir.path("jls.dcm");
    convert("dcmcjpls", &["+el", &source, jls.to_str().unwrap()]).await;

    let report = scu::send_files(
        &addr,
        "RADSEND",
        "STORESCP",
        &[explicit.clone(), jls.clone()],
    )
    .await
    .unwrap();
    assert_eq!(report.sent, 2, "{report:?}");
    assert!(report.failed.is_empty());
    child.kill().await.unwrap();

    for (sent, instance) in [(explicit, &ct.instance), (jls, &jls_source.instance)] {
        let stored = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains(instance.as_str()))
            .unwrap_or_else(|| panic!("storescp did not write {instance}"));
        assert!(
            dataset_of(&stored) == dataset_of(&sent),
            "storescp's copy of {} differs",
            sent.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_in_memory_are_sent_as_they_are() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("scu-memory");
    let (study, series) = (new_uid(), new_uid());
    let mut objects = Vec::new();
    let mut cts = Vec::new();
    for n in 1..=3 {
        let ct = Ct::new(&study, &series, n, 32);
        let path = dir.path(&format!("{n}.dcm"));
        write_ct(&path, &ct);
        objects.push(scu::Part10 {
            name: format!("results/x/{n}.dcm"),
            bytes: std::fs::read(&path).unwrap().into(),
        });
        cts.push((path, ct));
    }
    objects.push(scu::Part10 {
        name: "results/x/junk".into(),
        bytes: bytes::Bytes::from_static(b"not DICOM"),
    });
    let report = scu::send_objects(&server.addr.to_string(), "RADEXP", "RADFLOW", &objects)
        .await
        .unwrap();
    assert_eq!(report.sent, 3, "{report:?}");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].path, PathBuf::from("results/x/junk"));
    let received = server.sink.take();
    assert_eq!(received.len(), 3);
    for (path, ct) in &cts {
        assert_stored_exactly(find(&received, &ct.instance), path, EXPLICIT_LE, "RADEXP");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_closes_without_answering_is_an_association_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peer = tokio::spawn(async move {
        // Reads the A-ASSOCIATE-RQ, then hangs up.
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
    });
    match scu::echo(&addr, "RADSEND", "RADFLOW").await {
        Err(ScuError::Association { reason, .. }) => {
            assert!(reason.contains("closed the connection"), "{reason}")
        }
        other => panic!("expected an association error, got {other:?}"),
    }
    peer.await.unwrap();
}
