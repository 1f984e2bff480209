//! DCMTK senders against the listener.

use radflow_listener::scp::{ScpConfig, StoreFailure};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoscu_succeeds_and_a_wrong_called_ae_is_rejected() {
    let server = TestServer::start(ScpConfig::default()).await;
    let echoscu = dcmtk("echoscu");
    let port = server.port();

    let ok = run_tool(
        &echoscu,
        &["-aet", "ECHOER", "-aec", "RADFLOW", "127.0.0.1", &port],
    )
    .await;
    assert!(ok.status.success(), "echoscu failed: {}", text(&ok));

    let wrong = run_tool(
        &echoscu,
        &["-aet", "ECHOER", "-aec", "NOTUS", "127.0.0.1", &port],
    )
    .await;
    assert!(!wrong.status.success(), "echoscu to a wrong AE succeeded");
    let out = text(&wrong).to_lowercase();
    assert!(
        out.contains("rejected") && out.contains("called ae title not recognized"),
        "unexpected echoscu output: {out}"
    );
    // No association was released on the rejected attempt, one on the accepted echo.
    let releases = server.wait_releases(1).await;
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].0, "ECHOER");
    assert!(releases[0].2.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storescu_explicit_and_implicit_files_are_stored_exactly() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("storescu");
    let study = new_uid();
    let series = new_uid();
    // Two small slices and one 512x512 slice (512 KiB: several PDUs).
    let explicit: Vec<Ct> = [(1, 64), (2, 64), (3, 512)]
        .iter()
        .map(|&(n, size)| Ct::new(&study, &series, n, size))
        .collect();
    let mut explicit_files = Vec::new();
    for ct in &explicit {
        let path = dir.path(&format!("ct{}.dcm", ct.number));
        write_ct(&path, ct);
        explicit_files.push(path);
    }
    // Implicit VR copies of two other slices, converted by DCMTK.
    let implicit: Vec<Ct> = (4..6).map(|n| Ct::new(&study, &series, n, 64)).collect();
    let mut implicit_files = Vec::new();
    for ct in &implicit {
        let source = dir.path_str(&format!("src{}.dcm", ct.number));
        write_ct(std::path::Path::new(&source), ct);
        let target = dir.path(&format!("imp{}.dcm", ct.number));
        convert("dcmconv", &["+ti", &source, target.to_str().unwrap()]).await;
        assert_eq!(transfer_syntax_of(&target), IMPLICIT_LE);
        implicit_files.push(target);
    }

    let storescu = dcmtk("storescu");
    let port = server.port();
    let mut args = vec!["-aet", "MODALITY1", "-aec", "RADFLOW", "127.0.0.1", &port];
    let names: Vec<String> = explicit_files
        .iter()
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    args.extend(names.iter().map(String::as_str));
    let out = run_tool(&storescu, &args).await;
    assert!(out.status.success(), "storescu failed: {}", text(&out));

    // -xi: propose implicit VR only, so DCMTK sends the implicit bytes unconverted.
    let mut args = vec![
        "-xi",
        "-aet",
        "MODALITY1",
        "-aec",
        "RADFLOW",
        "127.0.0.1",
        &port,
    ];
    let names: Vec<String> = implicit_files
        .iter()
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    args.extend(names.iter().map(String::as_str));
    let out = run_tool(&storescu, &args).await;
    assert!(out.status.success(), "storescu -xi failed: {}", text(&out));

    let received = server.sink.take();
    assert_eq!(received.len(), 5);
    for (ct, path) in explicit.iter().zip(&explicit_files) {
        let r = find(&received, &ct.instance);
        assert_stored_exactly(r, path, EXPLICIT_LE, "MODALITY1");
        assert_eq!(r.facts.study_uid, study);
        assert_eq!(r.facts.series_uid, series);
        assert_eq!(r.facts.modality.as_deref(), Some("CT"));
        assert_eq!(r.facts.series_number, Some(3));
        assert_eq!(r.called_ae, "RADFLOW");
        assert!(r.peer.ip().is_loopback());
    }
    for (ct, path) in implicit.iter().zip(&implicit_files) {
        assert_stored_exactly(
            find(&received, &ct.instance),
            path,
            IMPLICIT_LE,
            "MODALITY1",
        );
    }
    let releases = server.wait_releases(2).await;
    assert_eq!(releases.len(), 2);
    for (calling, called, pairs) in releases {
        assert_eq!(
            (calling.as_str(), called.as_str()),
            ("MODALITY1", "RADFLOW")
        );
        assert_eq!(pairs, vec![(study.clone(), series.clone())]);
    }
}

/// (converter, its arguments, storescu proposal flag, resulting transfer syntax)
const COMPRESSED: &[(&str, &[&str], &str, &str)] = &[
    ("dcmcjpeg", &["+eb", "+be"], "-xy", "1.2.840.10008.1.2.4.50"),
    ("dcmcjpeg", &["+e1"], "-xs", "1.2.840.10008.1.2.4.70"),
    ("dcmcjpeg", &["+ee"], "-xx", "1.2.840.10008.1.2.4.51"),
    ("dcmcjpls", &["+el"], "-xt", "1.2.840.10008.1.2.4.80"),
    ("dcmcjpls", &["+en"], "-xu", "1.2.840.10008.1.2.4.81"),
    ("dcmcrle", &[], "-xr", "1.2.840.10008.1.2.5"),
    ("dcmconv", &["+td"], "-xd", "1.2.840.10008.1.2.1.99"),
    ("dcmconv", &["+tb"], "-xb", "1.2.840.10008.1.2.2"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_other_syntaxes_are_stored_exactly() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("compressed");
    let study = new_uid();
    let series = new_uid();
    let storescu = dcmtk("storescu");
    let port = server.port();
    for (i, (tool, tool_args, flag, ts)) in COMPRESSED.iter().enumerate() {
        let ct = Ct::new(&study, &series, i as u32 + 1, 128);
        let source = dir.path_str(&format!("src{i}.dcm"));
        write_ct(std::path::Path::new(&source), &ct);
        let target = dir.path(&format!("enc{i}.dcm"));
        let mut args: Vec<&str> = tool_args.to_vec();
        args.push(&source);
        args.push(target.to_str().unwrap());
        convert(tool, &args).await;
        assert_eq!(&transfer_syntax_of(&target), ts, "{tool} output syntax");

        let out = run_tool(
            &storescu,
            &[
                flag,
                "-aet",
                "MODALITY2",
                "-aec",
                "RADFLOW",
                "127.0.0.1",
                &port,
                target.to_str().unwrap(),
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "storescu {flag} failed: {}",
            text(&out)
        );
        let received = server.sink.take();
        assert_eq!(received.len(), 1, "{ts}");
        assert_stored_exactly(&received[0], &target, ts, "MODALITY2");
        // Lossy encoders give the image a new SOP Instance UID; lossless ones keep it.
        if !matches!(*flag, "-xx" | "-xu" | "-xy") {
            assert_eq!(received[0].facts.sop_instance_uid, ct.instance);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_failure_reaches_storescu_as_a700() {
    let server = TestServer::start(ScpConfig::default()).await;
    *server.sink.fail_with.lock().unwrap() =
        Some(StoreFailure::OutOfResources("store unavailable".into()));
    let dir = TempDir::new("a700");
    let ct = Ct::new(&new_uid(), &new_uid(), 1, 64);
    let path = dir.path("ct.dcm");
    write_ct(&path, &ct);
    let out = run_tool(
        &dcmtk("storescu"),
        &[
            "-v",
            "-aet",
            "MODALITY3",
            "-aec",
            "RADFLOW",
            "127.0.0.1",
            &server.port(),
            path.to_str().unwrap(),
        ],
    )
    .await;
    let output = text(&out);
    assert!(!out.status.success(), "storescu reported success: {output}");
    assert!(
        output.contains("Refused: OutOfResources"),
        "storescu output lacks the status ({:?}): {output}",
        out.status
    );
    assert!(server.sink.take().is_empty());
    // The association itself was released normally, with nothing stored on it.
    let releases = server.wait_releases(1).await;
    assert_eq!(releases.len(), 1);
    assert!(releases[0].2.is_empty());
    let metrics = server.metrics.render();
    assert!(
        metrics.contains(r#"radflow_dicom_cstore_failures_total{status="0xA700"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"radflow_dicom_associations_total{result="accepted"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calling_ae_allowlist_is_enforced() {
    let config = ScpConfig {
        allowed_callers: vec!["GOODSCU".parse().unwrap()],
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;
    let echoscu = dcmtk("echoscu");
    let port = server.port();
    let bad = run_tool(
        &echoscu,
        &["-aet", "BADSCU", "-aec", "RADFLOW", "127.0.0.1", &port],
    )
    .await;
    assert!(!bad.status.success());
    assert!(
        text(&bad)
            .to_lowercase()
            .contains("calling ae title not recognized"),
        "{}",
        text(&bad)
    );
    let good = run_tool(
        &echoscu,
        &["-aet", "GOODSCU", "-aec", "RADFLOW", "127.0.0.1", &port],
    )
    .await;
    assert!(good.status.success(), "{}", text(&good));
    // The gauge drops when the association task ends, just after the peer closed.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = server.metrics.render();
        if metrics.contains("radflow_dicom_associations_active 0") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for line in [
        r#"radflow_dicom_associations_total{result="rejected_calling_ae"} 1"#,
        r#"radflow_dicom_associations_total{result="accepted"} 1"#,
        "radflow_dicom_associations_active 0",
    ] {
        assert!(metrics.contains(line), "{line} missing in {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_checked_by_network_too() {
    // A rule for another network: loopback callers are refused whatever their title;
    // a rule naming the title and the loopback network lets exactly that title in.
    let config = ScpConfig {
        allowed_callers: vec![
            "@10.99.0.0/16".parse().unwrap(),
            "CT7@127.0.0.0/8".parse().unwrap(),
        ],
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;
    let echoscu = dcmtk("echoscu");
    let port = server.port();
    let other = run_tool(
        &echoscu,
        &["-aet", "CT8", "-aec", "RADFLOW", "127.0.0.1", &port],
    )
    .await;
    assert!(!other.status.success(), "{}", text(&other));
    let ok = run_tool(
        &echoscu,
        &["-aet", "CT7", "-aec", "RADFLOW", "127.0.0.1", &port],
    )
    .await;
    assert!(ok.status.success(), "{}", text(&ok));
}
