//! Large instances are written in parts as they arrive, never held whole.

use std::sync::atomic::Ordering;

use radflow_listener::scp::ScpConfig;

use crate::helpers::*;

/// Small thresholds so a 1024×1024 slice (2 MiB of pixels) travels in many parts.
fn streaming_config() -> ScpConfig {
    ScpConfig {
        stream_threshold: 256 * 1024,
        part_size: 128 * 1024,
        ..ScpConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_instances_are_stored_in_parts_byte_for_byte() {
    let server = TestServer::start(streaming_config()).await;
    let dir = TempDir::new("large");
    let study = new_uid();
    let series = new_uid();
    let big = Ct::new(&study, &series, 1, 1024);
    let big_path = dir.path("big.dcm");
    write_ct(&big_path, &big);
    // A deflated copy of another large slice: its UIDs are read from a partial inflate.
    let other = Ct::new(&study, &series, 2, 1024);
    let source = dir.path_str("src2.dcm");
    write_ct(std::path::Path::new(&source), &other);
    let deflated = dir.path("deflated.dcm");
    convert("dcmconv", &["+td", &source, deflated.to_str().unwrap()]).await;
    // A small one stays on the whole-instance path.
    let small = Ct::new(&study, &series, 3, 64);
    let small_path = dir.path("small.dcm");
    write_ct(&small_path, &small);

    let storescu = dcmtk("storescu");
    for (flag, path) in [("-xe", &big_path), ("-xd", &deflated), ("-xe", &small_path)] {
        let out = run_tool(
            &storescu,
            &[
                flag,
                "-aet",
                "BIGSCU",
                "-aec",
                "RADFLOW",
                "127.0.0.1",
                &server.port(),
                path.to_str().unwrap(),
            ],
        )
        .await;
        assert!(out.status.success(), "storescu {flag}: {}", text(&out));
    }
    let received = server.sink.take();
    assert_eq!(received.len(), 3);
    assert_stored_exactly(
        find(&received, &big.instance),
        &big_path,
        EXPLICIT_LE,
        "BIGSCU",
    );
    assert_stored_exactly(
        find(&received, &other.instance),
        &deflated,
        DEFLATED_LE,
        "BIGSCU",
    );
    assert_stored_exactly(
        find(&received, &small.instance),
        &small_path,
        EXPLICIT_LE,
        "BIGSCU",
    );
    // The big slice came in parts: the first once the threshold was passed, then parts
    // of about part_size, never the whole file at once.
    let parts = server.sink.parts.lock().unwrap().clone();
    let big_parts = parts
        .iter()
        .find(|p| p.iter().sum::<usize>() == find(&received, &big.instance).file.len())
        .expect("the big slice was written in parts");
    assert!(big_parts.len() >= 8, "{big_parts:?}");
    let file_len = find(&received, &big.instance).file.len();
    assert!(big_parts.iter().all(|&n| n < file_len / 2), "{big_parts:?}");
    assert_eq!(server.sink.aborted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_over_the_size_limit_is_refused_and_its_parts_discarded() {
    let config = ScpConfig {
        max_instance_bytes: 1024 * 1024,
        ..streaming_config()
    };
    let server = TestServer::start(config).await;
    let dir = TempDir::new("too-large");
    let big = Ct::new(&new_uid(), &new_uid(), 1, 1024);
    let path = dir.path("big.dcm");
    write_ct(&path, &big);
    let out = run_tool(
        &dcmtk("storescu"),
        &[
            "-v",
            "-aec",
            "RADFLOW",
            "127.0.0.1",
            &server.port(),
            path.to_str().unwrap(),
        ],
    )
    .await;
    let output = text(&out);
    assert!(!out.status.success(), "{output}");
    assert!(output.contains("Refused: OutOfResources"), "{output}");
    assert!(server.sink.take().is_empty());
    assert_eq!(server.sink.aborted.load(Ordering::SeqCst), 1);
    // The association stayed usable and was released normally.
    assert_eq!(server.wait_releases(1).await.len(), 1);
}

/// Sends `dataset` as one C-STORE in PDVs of 16 KiB; returns the response status.
async fn store_raw(server: &TestServer, instance: &str, dataset: &[u8]) -> Option<u16> {
    let mut assoc = open_association(server.addr, &[(CT_STORAGE, &[EXPLICIT_LE])]).await;
    let command = radflow_listener::dimse::c_store_rq(
        1,
        CT_STORAGE,
        instance,
        radflow_listener::dimse::PRIORITY_MEDIUM,
    );
    assoc.send(&pdata(1, true, true, &command)).await.unwrap();
    let chunks: Vec<&[u8]> = dataset.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        assoc.send(&pdata(1, false, last, chunk)).await.unwrap();
    }
    let status = receive_command(&mut assoc).await.and_then(|c| c.status);
    assoc.release().await.unwrap();
    status
}

/// A dataset cut short inside its pixel data, sent whole as far as DIMSE goes (the
/// last fragment says "last"): refused as unparsable and nothing kept, as when it is
/// not streamed; the same dataset uncut is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_dataset_cut_short_is_refused_and_its_parts_discarded() {
    let server = TestServer::start(streaming_config()).await;
    let dir = TempDir::new("cut-short");
    let ct = Ct::new(&new_uid(), &new_uid(), 1, 1024);
    let path = dir.path("big.dcm");
    write_ct(&path, &ct);
    let dataset = dataset_of(&path);

    let cut = &dataset[..dataset.len() - 1000];
    let status = store_raw(&server, &ct.instance, cut).await;
    assert_eq!(status, Some(0xC000));
    assert!(server.sink.take().is_empty());
    assert_eq!(server.sink.aborted.load(Ordering::SeqCst), 1);

    let status = store_raw(&server, &ct.instance, &dataset).await;
    assert_eq!(status, Some(radflow_listener::dimse::SUCCESS));
    let received = server.sink.take();
    assert_eq!(received.len(), 1);
    assert_stored_exactly(&received[0], &path, EXPLICIT_LE, "RAWSCU");
}
