//! NATS over TLS against a real nats-server whose certificates openssl makes for the
//! test: the CA flag is what makes the server trusted, a TLS-only server takes no
//! cleartext client, a client that asks for TLS takes no cleartext server, mutual TLS
//! admits only a client certificate of the server's CA, and the flags' mistakes are
//! startup errors that name the flag and the file.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use radflow_shared::bus::{Bus, BusError, ConsumerSpec, JOBS, NatsBus, NatsOptions, Outgoing};
use radflow_shared::config::BusArgs;
use radflow_shared::testing::{NatsServer, NatsServerTls, TestPki};
use tokio_util::sync::CancellationToken;

/// A folder of the test's, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("radflow-nats-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pki(name: &str) -> (TempDir, TestPki) {
    let dir = TempDir::new(name);
    let pki = TestPki::create(&dir.0).expect("openssl makes the test certificates");
    (dir, pki)
}

fn options(url: String) -> NatsOptions {
    NatsOptions {
        url,
        name: "tls-test".into(),
        replicas: 1,
        ..Default::default()
    }
}

/// What connecting gives, within a bound (a refused handshake must not hang).
async fn try_connect(opts: NatsOptions) -> Result<NatsBus, BusError> {
    tokio::time::timeout(Duration::from_secs(20), NatsBus::connect(&opts))
        .await
        .expect("connect gives up within 20 s")
}

async fn refused(opts: NatsOptions) -> String {
    match try_connect(opts).await {
        Ok(_) => panic!("the connection was accepted"),
        Err(e) => e.to_string(),
    }
}

/// A job published and consumed through JetStream: the connection carries real work.
async fn round_trip(bus: &NatsBus, id: &str) {
    bus.publish(Outgoing {
        subject: "radflow.job.tls".into(),
        msg_id: id.into(),
        correlation_id: "corr-tls".into(),
        payload: Bytes::from(id.to_owned()),
    })
    .await
    .expect("publish over TLS");
    let mut sub = bus
        .subscribe(&ConsumerSpec::new(JOBS, &format!("tls-{id}")))
        .await
        .expect("subscribe over TLS");
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the job arrives")
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], id.as_bytes());
    assert_eq!(got.correlation_id.as_deref(), Some("corr-tls"));
    got.acker.ack().await.expect("ack over TLS");
}

#[tokio::test]
async fn with_the_ca_a_tls_connection_carries_jetstream_work() {
    let (_dir, pki) = pki("ca");
    let server = NatsServer::start_tls(NatsServerTls::from_pki(&pki, false)).expect("nats-server");
    assert!(server.url().starts_with("tls://"), "{}", server.url());
    let bus = try_connect(NatsOptions {
        tls_ca: Some(pki.ca.clone()),
        ..options(server.url())
    })
    .await
    .expect("TLS connection with the CA");
    round_trip(&bus, "job-ca").await;
    bus.check().await.unwrap();
}

#[tokio::test]
async fn without_the_ca_the_server_certificate_is_refused() {
    let (_dir, pki) = pki("no-ca");
    let server = NatsServer::start_tls(NatsServerTls::from_pki(&pki, false)).expect("nats-server");
    // tls:// and the system's roots: the test CA is not among them.
    let err = refused(options(server.url())).await;
    assert!(
        err.contains("UnknownIssuer") && err.contains("--nats-tls-ca"),
        "not a clear certificate error: {err}"
    );
    // A CA that did not sign the server's certificate is no better.
    let err = refused(NatsOptions {
        tls_ca: Some(pki.rogue_cert.clone()),
        ..options(server.url())
    })
    .await;
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn a_tls_only_server_takes_no_cleartext_client() {
    let (_dir, pki) = pki("cleartext");
    let server = NatsServer::start_tls(NatsServerTls::from_pki(&pki, false)).expect("nats-server");
    // A nats:// client: the server's INFO demands TLS, so the client can only go on in
    // TLS, and without the CA that fails. Nothing is ever spoken in the clear.
    let plain_url = server.url().replacen("tls://", "nats://", 1);
    let err = refused(options(plain_url)).await;
    assert!(err.contains("UnknownIssuer"), "{err}");

    // At the protocol level: a client that ignores the demand and speaks NATS in
    // cleartext gets no answer (the server reads its bytes as a failed TLS handshake)
    // and is cut off.
    let stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(
        info.starts_with("INFO ") && info.contains("\"tls_required\":true"),
        "{info}"
    );
    (&stream)
        .write_all(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false}\r\nPING\r\n",
        )
        .unwrap();
    let mut answer = Vec::new();
    match std::io::Read::read_to_end(&mut reader, &mut answer) {
        Ok(_) => {}
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "the server kept the cleartext connection open"
        ),
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("PONG") && !answer.contains("+OK"),
        "cleartext was answered: {answer:?}"
    );
}

#[tokio::test]
async fn a_client_that_asks_for_tls_takes_no_cleartext_server() {
    let (_dir, pki) = pki("plain-server");
    let server = NatsServer::start().expect("nats-server");
    // The CA alone makes TLS required: no silent fallback to the clear.
    let err = refused(NatsOptions {
        tls_ca: Some(pki.ca.clone()),
        ..options(server.url())
    })
    .await;
    assert!(err.contains("the server does not speak TLS"), "{err}");
    // So does a tls:// URL.
    let tls_url = server.url().replacen("nats://", "tls://", 1);
    let err = refused(options(tls_url)).await;
    assert!(err.contains("the server does not speak TLS"), "{err}");
    // The same server in the clear, for contrast.
    try_connect(options(server.url()))
        .await
        .expect("plain NATS");
}

#[tokio::test]
async fn with_verify_only_a_client_certificate_of_the_ca_gets_in() {
    let (_dir, pki) = pki("mtls");
    let server = NatsServer::start_tls(NatsServerTls::from_pki(&pki, true)).expect("nats-server");
    let with_ca = || NatsOptions {
        tls_ca: Some(pki.ca.clone()),
        ..options(server.url())
    };
    let err = refused(with_ca()).await;
    assert!(
        err.contains("CertificateRequired") && err.contains("--nats-tls-cert"),
        "{err}"
    );
    let err = refused(NatsOptions {
        tls_cert: Some(pki.rogue_cert.clone()),
        tls_key: Some(pki.rogue_key.clone()),
        ..with_ca()
    })
    .await;
    assert!(
        err.contains("UnknownCA") && err.contains("does not trust"),
        "{err}"
    );
    let bus = try_connect(NatsOptions {
        tls_cert: Some(pki.client_cert.clone()),
        tls_key: Some(pki.client_key.clone()),
        ..with_ca()
    })
    .await
    .expect("mutual TLS with the client certificate");
    round_trip(&bus, "job-mtls").await;
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bus: BusArgs,
}

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("radflow").chain(args.iter().copied()))
}

#[tokio::test]
async fn the_flags_connect_and_their_mistakes_are_startup_errors() {
    let (dir, pki) = pki("flags");
    let server = NatsServer::start_tls(NatsServerTls {
        user_password: Some(("radflow".into(), "pw-of-the-test".into())),
        ..NatsServerTls::from_pki(&pki, true)
    })
    .expect("nats-server");
    let password_file = dir.0.join("nats-password");
    std::fs::write(&password_file, "pw-of-the-test\n").unwrap();
    let password_file = password_file.to_str().unwrap().to_owned();
    let cancel = CancellationToken::new();
    let (url, ca, cert, key) = (
        server.url(),
        pki.ca.to_str().unwrap().to_owned(),
        pki.client_cert.to_str().unwrap().to_owned(),
        pki.client_key.to_str().unwrap().to_owned(),
    );

    // What compose gives every radflow service (there without a client certificate).
    let cli = parse(&[
        "--nats-url",
        &url,
        "--nats-tls-ca",
        &ca,
        "--nats-tls-cert",
        &cert,
        "--nats-tls-key",
        &key,
        "--nats-user",
        "radflow",
        "--nats-password-file",
        &password_file,
    ])
    .unwrap();
    let bus = tokio::time::timeout(
        Duration::from_secs(20),
        cli.bus.connect_nats("tls-flags", &cancel),
    )
    .await
    .expect("connects within 20 s")
    .expect("the flags make a mutual TLS connection");
    round_trip(&bus, "job-flags").await;

    // A certificate without its key, or a key without its certificate, is refused by
    // the parser.
    for args in [
        vec!["--nats-url", &url, "--nats-tls-cert", &cert],
        vec!["--nats-url", &url, "--nats-tls-key", &key],
    ] {
        let err = parse(&args).err().expect("refused").to_string();
        assert!(
            err.contains("--nats-tls-key") && err.contains("--nats-tls-cert"),
            "{err}"
        );
    }

    // Without the password the server refuses (an authorization error, which
    // connect_nats would retry: checked on one connection).
    let err = refused(NatsOptions {
        tls_ca: Some(pki.ca.clone()),
        tls_cert: Some(pki.client_cert.clone()),
        tls_key: Some(pki.client_key.clone()),
        ..options(url.clone())
    })
    .await;
    assert!(err.to_lowercase().contains("authorization"), "{err}");

    // A missing file is a configuration error at once, not an outage retried forever.
    let missing = dir.0.join("missing-ca.crt");
    let key_as_cert = pki.client_key.to_str().unwrap();
    for (args, flag, path) in [
        (
            vec![
                "--nats-url",
                &url,
                "--nats-tls-ca",
                missing.to_str().unwrap(),
            ],
            "--nats-tls-ca",
            missing.to_str().unwrap(),
        ),
        (
            vec![
                "--nats-url",
                &url,
                "--nats-tls-ca",
                &ca,
                "--nats-tls-cert",
                key_as_cert,
                "--nats-tls-key",
                &key,
            ],
            "--nats-tls-cert",
            key_as_cert,
        ),
        (
            vec![
                "--nats-url",
                &url,
                "--nats-tls-ca",
                &ca,
                "--nats-tls-cert",
                &cert,
                "--nats-tls-key",
                &ca,
            ],
            "--nats-tls-key",
            ca.as_str(),
        ),
        (
            vec![
                "--nats-url",
                &url,
                "--nats-password-file",
                missing.to_str().unwrap(),
            ],
            "--nats-password-file",
            missing.to_str().unwrap(),
        ),
    ] {
        let cli = parse(&args).unwrap();
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            cli.bus.connect_nats("tls-flags", &cancel),
        )
        .await
        .expect("a configuration error is not retried")
        .err()
        .expect("refused")
        .to_string();
        assert!(err.contains(flag) && err.contains(path), "{err}");
    }
}
