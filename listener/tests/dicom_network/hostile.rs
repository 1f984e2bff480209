//! Hostile and broken peers: the server answers with A-ABORT or closes, never panics,
//! never waits for (or allocates) a claimed length beyond its limits, and keeps serving.

use std::time::Duration;

use dicom_ul::pdu::{AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem};
use radflow_listener::dimse;
use radflow_listener::scp::ScpConfig;
use radflow_listener::scu;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Read what the server sends until it closes (or 5 s pass).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_all)
        .await
        .expect("the server closed the connection within 5 s");
    all
}

fn association_rq() -> Vec<u8> {
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "FUZZ".into(),
        called_ae_title: "RADFLOW".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![
            PresentationContextProposed {
                id: 1,
                abstract_syntax: VERIFICATION.into(),
                transfer_syntaxes: vec![IMPLICIT_LE.into()],
            },
            PresentationContextProposed {
                id: 3,
                abstract_syntax: CT_STORAGE.into(),
                transfer_syntaxes: vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
            },
        ],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    });
    let mut bytes = Vec::new();
    dicom_ul::pdu::write_pdu(&mut bytes, &rq).unwrap();
    bytes
}

async fn server_still_answers(server: &TestServer) {
    scu::echo(&server.addr.to_string(), "CHECK", "RADFLOW")
        .await
        .expect("the server still answers C-ECHO");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_claimed_pdu_length_is_refused_at_once() {
    let server = TestServer::start(ScpConfig::default()).await;
    // An A-ASSOCIATE-RQ header claiming almost 4 GiB, and nothing after it.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(&[0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xF0])
        .await
        .unwrap();
    // The answer comes without our closing the connection: the claim was refused from
    // the header alone, not after waiting for (or buffering) the body.
    let mut reply = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut reply))
        .await
        .expect("an immediate answer")
        .unwrap();
    assert_eq!(reply[0], 0x07, "A-ABORT expected, got {reply:?}");
    assert_eq!(&reply[1..6], &[0, 0, 0, 0, 4]);
    drop(stream);

    // The same inside an established association: a P-DATA-TF claiming 2 GiB.
    let mut assoc = open_association(server.addr, &[(VERIFICATION, &[IMPLICIT_LE])]).await;
    assoc
        .inner_stream()
        .write_all(&[0x04, 0x00, 0x7F, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(2), assoc.receive())
        .await
        .expect("an immediate answer");
    assert!(matches!(answer, Ok(Pdu::AbortRQ { .. })), "{answer:?}");
    server_still_answers(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_pdus_do_not_hurt_the_server() {
    let config = ScpConfig {
        artim_timeout: Duration::from_secs(1),
        ..ScpConfig::default()
    };
    let server = TestServer::start(config).await;

    // Not DICOM at all.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: radflow\r\n\r\n")
        .await
        .unwrap();
    let reply = read_until_closed(&mut stream).await;
    assert!(reply.is_empty() || reply[0] == 0x07, "{reply:?}");

    // Half an association request, then silence: the ARTIM timer ends it.
    let rq = association_rq();
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&rq[..rq.len() / 2]).await.unwrap();
    let started = std::time::Instant::now();
    read_until_closed(&mut stream).await;
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Half a request, then a close.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&rq[..rq.len() / 3]).await.unwrap();
    drop(stream);

    // An unknown PDU type inside an association.
    let mut assoc = open_association(server.addr, &[(VERIFICATION, &[IMPLICIT_LE])]).await;
    assoc
        .inner_stream()
        .write_all(&[0x09, 0x00, 0x00, 0x00, 0x00, 0x02, 0xAB, 0xCD])
        .await
        .unwrap();
    assert!(matches!(assoc.receive().await, Ok(Pdu::AbortRQ { .. })));

    // A dataset fragment with no command before it.
    let mut assoc = open_association(server.addr, &[(CT_STORAGE, &[EXPLICIT_LE])]).await;
    assoc.send(&pdata(1, false, true, &[0; 32])).await.unwrap();
    assert!(matches!(assoc.receive().await, Ok(Pdu::AbortRQ { .. })));

    // A command on a context that was never proposed.
    let mut assoc = open_association(server.addr, &[(VERIFICATION, &[IMPLICIT_LE])]).await;
    assoc
        .send(&pdata(7, true, true, &dimse::c_echo_rq(1)))
        .await
        .unwrap();
    assert!(matches!(assoc.receive().await, Ok(Pdu::AbortRQ { .. })));

    // A command set whose element claims more bytes than it has.
    let mut assoc = open_association(server.addr, &[(VERIFICATION, &[IMPLICIT_LE])]).await;
    let mut broken = dimse::c_echo_rq(1);
    let n = broken.len();
    broken[n - 6..n - 2].copy_from_slice(&u32::MAX.to_le_bytes());
    assoc.send(&pdata(1, true, true, &broken)).await.unwrap();
    assert!(matches!(assoc.receive().await, Ok(Pdu::AbortRQ { .. })));

    server_still_answers(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_association_requests_never_take_the_server_down() {
    let server = TestServer::start(ScpConfig::default()).await;
    let valid = association_rq();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let mut bytes = valid.clone();
        for _ in 0..(1 + next() % 6) {
            let i = (next() % bytes.len() as u64) as usize;
            bytes[i] = next() as u8;
        }
        if round % 3 == 0 {
            bytes.truncate((next() % bytes.len() as u64) as usize);
        }
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let _ = stream.shutdown().await;
        read_until_closed(&mut stream).await;
    }
    server_still_answers(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_operations_get_0211_and_the_association_continues() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;

    let server = TestServer::start(ScpConfig::default()).await;
    let mut assoc = open_association(
        server.addr,
        &[(VERIFICATION, &[IMPLICIT_LE]), (CT_STORAGE, &[EXPLICIT_LE])],
    )
    .await;
    // A C-FIND-RQ (0x0020) with an identifier, written by dicom-object.
    let mut find = InMemDicomObject::new_empty();
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    find.put(DataElement::new(
        tags::AFFECTED_SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from(CT_STORAGE),
    ));
    find.put(us(tags::COMMAND_FIELD, 0x0020));
    find.put(us(tags::MESSAGE_ID, 5));
    find.put(us(tags::PRIORITY, 0));
    find.put(us(tags::COMMAND_DATA_SET_TYPE, 0x0000));
    let mut command = Vec::new();
    find.write_dataset_with_ts(
        &mut command,
        &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .unwrap();
    assoc.send(&pdata(3, true, true, &command)).await.unwrap();
    assoc
        .send(&pdata(
            3,
            false,
            true,
            &[0x10, 0x00, 0x10, 0x00, b'U', b'N', 0, 0],
        ))
        .await
        .unwrap();
    let rsp = receive_command(&mut assoc).await.expect("a response");
    assert_eq!(rsp.field, 0x8020);
    assert_eq!(rsp.message_id, 5);
    assert_eq!(rsp.status, Some(dimse::UNRECOGNIZED_OPERATION));

    // A C-STORE-RQ on the verification context is refused, the dataset drained.
    let store = dimse::c_store_rq(6, CT_STORAGE, "1.2.3.4", dimse::PRIORITY_MEDIUM);
    assoc.send(&pdata(1, true, true, &store)).await.unwrap();
    assoc.send(&pdata(1, false, true, &[0; 64])).await.unwrap();
    let rsp = receive_command(&mut assoc).await.expect("a response");
    assert_eq!(rsp.field, 0x8001);
    assert_eq!(rsp.status, Some(dimse::REFUSED_SOP_CLASS_NOT_SUPPORTED));

    // A C-STORE whose dataset is garbage: Cannot Understand.
    let store = dimse::c_store_rq(7, CT_STORAGE, "1.2.3.4", dimse::PRIORITY_MEDIUM);
    assoc.send(&pdata(3, true, true, &store)).await.unwrap();
    assoc
        .send(&pdata(
            3,
            false,
            false,
            &[0x08, 0x00, 0x18, 0x00, b'U', b'I'],
        ))
        .await
        .unwrap();
    assoc
        .send(&pdata(3, false, true, &[0xFF, 0x7F, 1, 2]))
        .await
        .unwrap();
    let rsp = receive_command(&mut assoc).await.expect("a response");
    assert_eq!(rsp.status, Some(dimse::CANNOT_UNDERSTAND));
    assert_eq!(rsp.message_id, 7);
    assert!(server.sink.take().is_empty());

    // Still usable: C-ECHO on the same association.
    assoc
        .send(&pdata(1, true, true, &dimse::c_echo_rq(8)))
        .await
        .unwrap();
    let rsp = receive_command(&mut assoc).await.expect("a response");
    assert_eq!(
        (rsp.field, rsp.message_id, rsp.status),
        (0x8030, 8, Some(0))
    );
    assoc.release().await.unwrap();
}
