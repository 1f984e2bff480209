//! Destinations over TLS (PS3.15 Annex B) against DCMTK's storescp with mutual TLS:
//! the `[destination.tls]` table as the exporter reads it, sends over an association
//! kept open, and the peers and configurations that must be refused.

mod common;

use std::path::Path;

use common::{Storescp, free_port, make_pki, objects, scratch};
use radflow_exporter::associations::Pool;
use radflow_exporter::destinations::{DestinationTls, Destinations};
use radflow_listener::scu::ScuError;

/// A destinations file with the destination `pacs` on `port`, its TLS table `tls`
/// (lines; none for plain TCP) and a route to it.
fn file(port: u16, tls: &[String]) -> String {
    let mut text = format!(
        "[[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {port}\n"
    );
    if !tls.is_empty() {
        text.push_str("\n[destination.tls]\n");
        for line in tls {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.push_str("\n[[route]]\nto = [\"pacs\"]\n");
    text
}

fn line(dir: &Path, key: &str, file: &str) -> String {
    format!("{key} = {:?}", dir.join(file).display().to_string())
}

fn association_reason(result: Result<radflow_listener::scu::SendReport, ScuError>) -> String {
    match result {
        Err(ScuError::Association { reason, .. }) => reason,
        other => panic!("expected an association error, got {other:?}"),
    }
}

#[test]
fn the_tls_table_is_read_and_its_files_checked() {
    let dir = scratch("tls-config");
    make_pki(&dir);
    let mutual = [
        line(&dir, "ca", "ca.crt"),
        line(&dir, "cert", "client.crt"),
        line(&dir, "key", "client.key"),
        "server_name = \"localhost\"".to_owned(),
    ];
    let parsed = Destinations::parse(&file(104, &mutual), "test").unwrap();
    assert_eq!(
        parsed.get("pacs").unwrap().tls,
        Some(DestinationTls {
            ca: dir.join("ca.crt"),
            cert: Some(dir.join("client.crt")),
            key: Some(dir.join("client.key")),
            server_name: Some("localhost".into()),
        })
    );
    // Server authentication only; the server name is the host.
    let ca_only = Destinations::parse(&file(104, &mutual[..1]), "test").unwrap();
    let tls = ca_only.get("pacs").unwrap().tls.as_ref().unwrap();
    assert_eq!(
        (&tls.cert, &tls.key, &tls.server_name),
        (&None, &None, &None)
    );

    let bad = |lines: &[String], want: &[&str]| {
        let err = Destinations::parse(&file(104, lines), "test")
            .unwrap_err()
            .to_string();
        for want in want {
            assert!(err.contains(want), "{want:?} not in: {err}");
        }
    };
    // A certificate without its key, and the other way round.
    bad(&mutual[..2], &["\"pacs\"", "`cert` and `key` go together"]);
    bad(
        &[mutual[0].clone(), mutual[2].clone()],
        &["`cert` and `key` go together"],
    );
    // Files that cannot be read or hold no certificate are named.
    let missing = dir.join("missing.crt").display().to_string();
    bad(
        &[line(&dir, "ca", "missing.crt")],
        &["\"pacs\"", "CA certificate", &missing],
    );
    bad(
        &[line(&dir, "ca", "ca.key")],
        &["CA certificate", "no CERTIFICATE block"],
    );
    bad(
        &[
            mutual[0].clone(),
            mutual[1].clone(),
            line(&dir, "key", "nokey.pem"),
        ],
        &["client private key", "nokey.pem"],
    );
    // A key that is not the certificate's.
    bad(
        &[
            mutual[0].clone(),
            mutual[1].clone(),
            line(&dir, "key", "rogue.key"),
        ],
        &["\"pacs\"", "client certificate and key"],
    );
    bad(
        &[
            mutual[0].clone(),
            "server_name = \"not a name!\"".to_owned(),
        ],
        &["not a DNS name or an IP address"],
    );
    bad(
        &[mutual[0].clone(), "verify = false".to_owned()],
        &["unknown field `verify`"],
    );
    bad(&["cert = \"x\"".to_owned()], &["missing field `ca`"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_go_to_a_tls_destination_over_mutual_tls_and_unverified_peers_are_refused() {
    let dir = scratch("tls-send");
    make_pki(&dir);
    let port = free_port();
    let path = |f: &str| dir.join(f).display().to_string();
    // storescp requires a client certificate (its default, -rc) from our CA; it
    // serves each association in its own process, so the one kept open does not hold
    // up the others.
    let scp = Storescp::start_with(
        port,
        &dir,
        "tls",
        &[
            "--fork",
            "+tls",
            &path("server.key"),
            &path("server.crt"),
            "+cf",
            &path("ca.crt"),
        ],
    );
    let mutual = [
        line(&dir, "ca", "ca.crt"),
        line(&dir, "cert", "client.crt"),
        line(&dir, "key", "client.key"),
    ];
    let destinations = Destinations::parse(&file(port, &mutual), "test").unwrap();
    let pacs = destinations.get("pacs").unwrap();
    let objects = objects(&dir, 3);
    let pool = Pool::default();

    // Two jobs over one TLS association.
    for job in objects[..2].chunks(1) {
        let report = pool.send(pacs, job).await.unwrap();
        assert_eq!((report.sent, report.failed.len()), (1, 0), "{report:?}");
    }
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(scp.associations(), 1, "{}", scp.log_text());

    // The same destination without its TLS table is not given the TLS association,
    // and a TLS-only peer refuses plain TCP.
    let plain = Destinations::parse(&file(port, &[]), "test").unwrap();
    let reason = association_reason(pool.send(plain.get("pacs").unwrap(), &objects[2..]).await);
    assert!(reason.contains("expects TLS"), "{reason}");
    assert_eq!(pool.idle_count(), 1);

    // Trusting another CA: storescp's certificate is refused.
    let wrong_ca = [
        line(&dir, "ca", "rogue.crt"),
        mutual[1].clone(),
        mutual[2].clone(),
    ];
    let wrong = Destinations::parse(&file(port, &wrong_ca), "test").unwrap();
    let reason = association_reason(pool.send(wrong.get("pacs").unwrap(), &objects[2..]).await);
    assert!(
        reason.contains("over TLS") && reason.contains("UnknownIssuer"),
        "{reason}"
    );

    // A name the certificate does not carry.
    let other_name = [
        mutual[0].clone(),
        mutual[1].clone(),
        mutual[2].clone(),
        "server_name = \"pacs.example.org\"".to_owned(),
    ];
    let named = Destinations::parse(&file(port, &other_name), "test").unwrap();
    let reason = association_reason(pool.send(named.get("pacs").unwrap(), &objects[2..]).await);
    assert!(reason.contains("not valid for name"), "{reason}");

    // No client certificate: storescp ends the handshake.
    let anonymous = Destinations::parse(&file(port, &mutual[..1]), "test").unwrap();
    let reason = association_reason(
        pool.send(anonymous.get("pacs").unwrap(), &objects[2..])
            .await,
    );
    assert!(
        reason.contains("over TLS") && reason.contains("client certificate"),
        "{reason}"
    );

    // The TLS association kept open still works, and only the accepted jobs arrived.
    let report = pool.send(pacs, &objects[2..]).await.unwrap();
    assert_eq!(report.sent, 1, "{report:?}");
    assert_eq!(scp.associations(), 1, "{}", scp.log_text());
    pool.release_idle(true).await;
    scp.wait_stored(3).await;
    assert_eq!(scp.stored(), 3);
    drop(scp);
    let _ = std::fs::remove_dir_all(&dir);
}
