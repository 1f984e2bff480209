//! DICOM over TLS with DCMTK's storescu and our own SCU as clients, certificates made
//! by openssl.

use std::path::Path;

use radflow_listener::scp::ScpConfig;
use radflow_listener::scu::{self, ScuError, Session, TlsClient, TlsConnector};
use radflow_listener::tls::{TlsFiles, server_config};

use crate::helpers::*;

/// The shared test PKI in `dir`: `ca.crt`, `server.crt`/`server.key` for 127.0.0.1
/// and localhost, `client.crt`/`client.key` signed by the CA, and `rogue.crt`/
/// `rogue.key` of a CA nobody trusts.
async fn make_pki(dir: &Path) {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        radflow_shared::testing::TestPki::create(&dir).expect("test certificates (openssl)")
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storescu_over_tls_with_client_certificates() {
    let dir = TempDir::new("tls");
    make_pki(&dir.0).await;
    let tls = server_config(&TlsFiles {
        cert: dir.path("server.crt"),
        key: dir.path("server.key"),
        client_ca: Some(dir.path("ca.crt")),
    })
    .expect("TLS configuration");
    let server = TestServer::start(ScpConfig {
        tls: Some(tls),
        ..ScpConfig::default()
    })
    .await;
    let ct = Ct::new(&new_uid(), &new_uid(), 1, 512);
    let path = dir.path("ct.dcm");
    write_ct(&path, &ct);
    let storescu = dcmtk("storescu");
    let port = server.port();
    let (ca, file) = (dir.path_str("ca.crt"), path.to_str().unwrap().to_string());
    let send = |key: &str, crt: &str| {
        let (key, crt) = (dir.path_str(key), dir.path_str(crt));
        let (storescu, port, ca, file) = (storescu.clone(), port.clone(), ca.clone(), file.clone());
        async move {
            run_tool(
                &storescu,
                &[
                    "+tls",
                    &key,
                    &crt,
                    "+cf",
                    &ca,
                    "-aet",
                    "TLSSCU",
                    "-aec",
                    "RADFLOW",
                    "127.0.0.1",
                    &port,
                    &file,
                ],
            )
            .await
        }
    };

    let ok = send("client.key", "client.crt").await;
    assert!(ok.status.success(), "storescu over TLS: {}", text(&ok));
    let received = server.sink.take();
    assert_eq!(received.len(), 1);
    assert_stored_exactly(&received[0], &path, EXPLICIT_LE, "TLSSCU");

    // A certificate from an unknown CA, no certificate, and no TLS at all: refused.
    let rogue = send("rogue.key", "rogue.crt").await;
    assert!(
        !rogue.status.success(),
        "rogue certificate accepted: {}",
        text(&rogue)
    );
    let anonymous = run_tool(
        &storescu,
        &[
            "+tla",
            "+cf",
            &ca,
            "-aec",
            "RADFLOW",
            "127.0.0.1",
            &port,
            &file,
        ],
    )
    .await;
    assert!(
        !anonymous.status.success(),
        "client without certificate accepted"
    );
    let plain = run_tool(&storescu, &["-aec", "RADFLOW", "127.0.0.1", &port, &file]).await;
    assert!(!plain.status.success(), "plain TCP accepted on a TLS port");
    assert!(server.sink.take().is_empty());
    let expected = r#"radflow_dicom_associations_total{result="rejected_tls"} 3"#;
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = server.metrics.render();
        if metrics.contains(expected) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(metrics.contains(expected), "{metrics}");
}

/// A connector trusting `ca`, presenting `cert`/`key` when given.
fn connector(
    dir: &TempDir,
    ca: &str,
    client: Option<(&str, &str)>,
    server_name: Option<&str>,
) -> TlsConnector {
    TlsClient {
        ca: dir.path(ca),
        cert: client.map(|(cert, _)| dir.path(cert)),
        key: client.map(|(_, key)| dir.path(key)),
        server_name: server_name.map(str::to_owned),
    }
    .connector()
    .expect("client TLS configuration")
}

/// The reason of an association error, or a panic naming what was expected.
fn association_reason(result: Result<(), ScuError>, what: &str) -> String {
    match result {
        Err(ScuError::Association { reason, .. }) => reason,
        other => panic!("{what}: expected an association error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_scu_sends_over_mutual_tls_and_refuses_what_it_cannot_verify() {
    let dir = TempDir::new("scu-tls");
    make_pki(&dir.0).await;
    let tls = server_config(&TlsFiles {
        cert: dir.path("server.crt"),
        key: dir.path("server.key"),
        client_ca: Some(dir.path("ca.crt")),
    })
    .expect("TLS configuration");
    let server = TestServer::start(ScpConfig {
        tls: Some(tls),
        ..ScpConfig::default()
    })
    .await;
    let addr = server.addr.to_string();
    let (study, series) = (new_uid(), new_uid());
    let mut cts = Vec::new();
    let mut objects = Vec::new();
    for n in 1..=3 {
        // The last one is a 512x512 slice, larger than one PDU.
        let ct = Ct::new(&study, &series, n, if n == 3 { 512 } else { 64 });
        let path = dir.path(&format!("ct{n}.dcm"));
        write_ct(&path, &ct);
        objects.push(scu::Part10 {
            name: format!("results/tls/{n}.dcm"),
            bytes: std::fs::read(&path).unwrap().into(),
        });
        cts.push((path, ct));
    }
    let mutual = connector(&dir, "ca.crt", Some(("client.crt", "client.key")), None);

    scu::echo_with(&addr, "TLSSCU", "RADFLOW", Some(&mutual))
        .await
        .expect("C-ECHO over TLS");

    // One association over TLS for two sends; the server name defaults to the host
    // (the certificate's IP address), or is given (its DNS name).
    let pairs = scu::presentation_pairs(&objects);
    let mut session = Session::connect(&addr, "TLSSCU", "RADFLOW", &pairs, Some(&mutual))
        .await
        .expect("association over TLS");
    assert!(session.is_tls());
    for part in [&objects[..1], &objects[1..]] {
        let report = session.send(part).await;
        assert_eq!(
            (report.sent, report.failed.len()),
            (part.len(), 0),
            "{report:?}"
        );
    }
    assert!(!session.is_broken());
    session.release().await;
    let received = server.sink.take();
    assert_eq!(received.len(), 3);
    for (path, ct) in &cts {
        assert_stored_exactly(find(&received, &ct.instance), path, EXPLICIT_LE, "TLSSCU");
    }
    let by_name = connector(
        &dir,
        "ca.crt",
        Some(("client.crt", "client.key")),
        Some("localhost"),
    );
    let report = scu::send_objects_with(&addr, "TLSSCU", "RADFLOW", &objects[..1], Some(&by_name))
        .await
        .expect("one-shot send over TLS");
    assert_eq!(report.sent, 1, "{report:?}");
    assert_eq!(server.sink.take().len(), 1);

    // The server's certificate does not chain to the CA we trust.
    let wrong_ca = connector(&dir, "rogue.crt", Some(("client.crt", "client.key")), None);
    let reason = association_reason(
        scu::echo_with(&addr, "TLSSCU", "RADFLOW", Some(&wrong_ca)).await,
        "wrong CA",
    );
    assert!(
        reason.contains("over TLS") && reason.contains("UnknownIssuer"),
        "{reason}"
    );
    // The certificate does not carry the name we expect.
    let wrong_name = connector(
        &dir,
        "ca.crt",
        Some(("client.crt", "client.key")),
        Some("pacs.example.org"),
    );
    let reason = association_reason(
        scu::echo_with(&addr, "TLSSCU", "RADFLOW", Some(&wrong_name)).await,
        "wrong server name",
    );
    assert!(reason.contains("not valid for name"), "{reason}");
    // No client certificate, or one from a CA the server does not trust: the server
    // ends the handshake.
    for (what, client) in [
        ("no client certificate", None),
        ("rogue client certificate", Some(("rogue.crt", "rogue.key"))),
    ] {
        let refused = connector(&dir, "ca.crt", client, None);
        let reason = association_reason(
            scu::echo_with(&addr, "TLSSCU", "RADFLOW", Some(&refused)).await,
            what,
        );
        assert!(
            reason.contains("over TLS") && reason.contains("client certificate"),
            "{what}: {reason}"
        );
    }
    // Plain TCP to the TLS port.
    let reason = association_reason(scu::echo(&addr, "TLSSCU", "RADFLOW").await, "plain TCP");
    assert!(reason.contains("expects TLS"), "{reason}");
    let plain_session = Session::open(&addr, "TLSSCU", "RADFLOW", &pairs).await;
    assert!(
        matches!(plain_session, Err(ScuError::Association { .. })),
        "plain session to a TLS port"
    );
    assert!(server.sink.take().is_empty());

    // TLS to a port without TLS.
    let plain_server = TestServer::start(ScpConfig::default()).await;
    let reason = association_reason(
        scu::echo_with(
            &plain_server.addr.to_string(),
            "TLSSCU",
            "RADFLOW",
            Some(&mutual),
        )
        .await,
        "TLS to a plain port",
    );
    assert!(
        reason.contains("over TLS") && reason.contains("corrupt message"),
        "{reason}"
    );
}

#[test]
fn client_tls_files_are_checked() {
    let err = |client: TlsClient| client.connector().unwrap_err().to_string();
    let missing = err(TlsClient {
        ca: "/nonexistent/ca.pem".into(),
        cert: None,
        key: None,
        server_name: None,
    });
    assert!(
        missing.contains("CA certificate") && missing.contains("/nonexistent/ca.pem"),
        "{missing}"
    );
    let dir = TempDir::new("scu-tls-files");
    std::fs::write(dir.path("empty.pem"), "no PEM here\n").unwrap();
    let empty = err(TlsClient {
        ca: dir.path("empty.pem"),
        cert: None,
        key: None,
        server_name: None,
    });
    assert!(empty.contains("no CERTIFICATE block"), "{empty}");
}
