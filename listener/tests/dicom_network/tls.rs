//! DICOM over TLS with DCMTK's storescu as the client, certificates made by openssl.

use std::path::Path;

use radflow_listener::scp::ScpConfig;
use radflow_listener::tls::{TlsFiles, server_config};

use crate::helpers::*;

/// Run openssl and insist it succeeded.
async fn openssl(dir: &Path, args: &[&str]) {
    let program = Path::new("/usr/bin/openssl");
    assert!(
        program.exists(),
        "openssl is required at /usr/bin/openssl (apt-get install openssl)"
    );
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate, all PEM.
async fn make_pki(dir: &Path) {
    let days = ["-days", "2"];
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=radflow test CA",
            days[0],
            days[1],
        ],
    )
    .await;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let key = format!("{who}.key");
        let csr = format!("{who}.csr");
        let crt = format!("{who}.crt");
        let ext = format!("{who}.ext");
        let subject = format!("/CN=radflow test {who}");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subject,
            ],
        )
        .await;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-extfile",
                &ext,
                days[0],
                days[1],
            ],
        )
        .await;
    }
    // A client certificate from a CA the server does not trust.
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "rogue.key",
            "-out",
            "rogue.crt",
            "-subj",
            "/CN=rogue",
            days[0],
            days[1],
        ],
    )
    .await;
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
