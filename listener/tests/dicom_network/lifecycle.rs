//! Association limits, admission, timeouts and shutdown.

use std::time::Duration;

use dicom_ul::pdu::Pdu;
use radflow_listener::association::Rejection;
use radflow_listener::dimse;
use radflow_listener::scp::ScpConfig;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn association_limit_rejects_transiently_then_recovers() {
    let config = ScpConfig {
        max_associations: 1,
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;
    let echoscu = dcmtk("echoscu");
    let port = server.port();
    let held = open_association(server.addr, &[(VERIFICATION, &[IMPLICIT_LE])]).await;

    let busy = run_tool(&echoscu, &["-aec", "RADFLOW", "127.0.0.1", &port]).await;
    assert!(!busy.status.success());
    let out = text(&busy).to_lowercase();
    assert!(
        out.contains("transient") && out.contains("local limit exceeded"),
        "{out}"
    );

    held.release().await.unwrap();
    // The slot is freed when the association task ends, right after the release.
    let mut ok = false;
    for _ in 0..50 {
        let again = run_tool(&echoscu, &["-aec", "RADFLOW", "127.0.0.1", &port]).await;
        if again.status.success() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "echo still refused after the other association ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_hook_can_refuse_for_back_pressure() {
    let server = TestServer::start(ScpConfig::default()).await;
    *server.hooks.refuse_with.lock().unwrap() = Some(Rejection::congested("bus backlog"));
    let echoscu = dcmtk("echoscu");
    let out = run_tool(&echoscu, &["-aec", "RADFLOW", "127.0.0.1", &server.port()]).await;
    assert!(!out.status.success());
    let text = text(&out).to_lowercase();
    assert!(
        text.contains("transient") && text.contains("temporary congestion"),
        "{text}"
    );
    *server.hooks.refuse_with.lock().unwrap() = None;
    let out = run_tool(&echoscu, &["-aec", "RADFLOW", "127.0.0.1", &server.port()]).await;
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_associations_are_aborted() {
    let config = ScpConfig {
        idle_timeout: Duration::from_millis(500),
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut assoc = open_association(server.addr, &[(VERIFICATION, &[IMPLICIT_LE])]).await;
    let started = std::time::Instant::now();
    let pdu = assoc.receive().await;
    assert!(matches!(pdu, Ok(Pdu::AbortRQ { .. })), "{pdu:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_associations_finish() {
    let server = TestServer::start(ScpConfig::default()).await;
    let dir = TempDir::new("shutdown");
    let ct = Ct::new(&new_uid(), &new_uid(), 1, 64);
    let path = dir.path("ct.dcm");
    write_ct(&path, &ct);
    let dataset = dataset_of(&path);
    let second = Ct::new(&ct.study, &ct.series, 2, 64);
    let second_path = dir.path("ct2.dcm");
    write_ct(&second_path, &second);
    let second_dataset = dataset_of(&second_path);

    // An idle association and one in the middle of a C-STORE.
    let mut idle = open_association(server.addr, &[(VERIFICATION, &[IMPLICIT_LE])]).await;
    let mut busy = open_association(server.addr, &[(CT_STORAGE, &[EXPLICIT_LE])]).await;
    let command = dimse::c_store_rq(1, CT_STORAGE, &ct.instance, dimse::PRIORITY_MEDIUM);
    busy.send(&pdata(1, true, true, &command)).await.unwrap();
    let half = dataset.len() / 2;
    busy.send(&pdata(1, false, false, &dataset[..half]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    server.shutdown.cancel();
    // New connections are no longer accepted.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::net::TcpStream::connect(server.addr).await;
    assert!(refused.is_err(), "listener still accepting");

    // The busy one completes its instance, sends another, and releases normally.
    busy.send(&pdata(1, false, true, &dataset[half..]))
        .await
        .unwrap();
    let rsp = receive_command(&mut busy)
        .await
        .expect("a C-STORE response");
    assert_eq!(rsp.status, Some(dimse::SUCCESS));
    let command = dimse::c_store_rq(3, CT_STORAGE, &second.instance, dimse::PRIORITY_MEDIUM);
    busy.send(&pdata(1, true, true, &command)).await.unwrap();
    busy.send(&pdata(1, false, true, &second_dataset))
        .await
        .unwrap();
    let rsp = receive_command(&mut busy)
        .await
        .expect("a C-STORE response");
    assert_eq!((rsp.message_id, rsp.status), (3, Some(dimse::SUCCESS)));
    busy.release().await.unwrap();
    // The idle one may still echo, then release.
    idle.send(&pdata(1, true, true, &dimse::c_echo_rq(9)))
        .await
        .unwrap();
    let rsp = receive_command(&mut idle).await.expect("a C-ECHO response");
    assert_eq!(rsp.status, Some(dimse::SUCCESS));
    idle.release().await.unwrap();
    assert_eq!(server.sink.take().len(), 2);

    let took = server.stop().await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_a_stalled_message() {
    let config = ScpConfig {
        shutdown_grace: Duration::from_millis(300),
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut stalled = open_association(server.addr, &[(CT_STORAGE, &[EXPLICIT_LE])]).await;
    let command = dimse::c_store_rq(1, CT_STORAGE, "1.2.3", dimse::PRIORITY_MEDIUM);
    stalled.send(&pdata(1, true, true, &command)).await.unwrap();
    stalled
        .send(&pdata(1, false, false, &[0; 100]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let took = server.stop().await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(matches!(stalled.receive().await, Ok(Pdu::AbortRQ { .. })));
}
