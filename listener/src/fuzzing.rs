//! Entry points for the fuzz targets (`fuzz/`) and for the corpus replay that CI runs
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes and must neither panic nor
//! allocate from a claimed length, whatever it is given.

use std::time::Duration;

use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};

use crate::association::{Assembled, Connection, PdvAssembler};
use crate::dataset::{scan, scan_prefix};
use crate::dimse::parse_command;

/// Transfer syntaxes the first input byte chooses among.
const SYNTAXES: [&str; 6] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.5",
];

/// The dataset scanner, whole and streamed: the first byte picks the transfer syntax
/// and where the prefix ends; the verdicts must agree for native syntaxes.
pub fn dataset(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let ts = SYNTAXES[usize::from(choice) % SYNTAXES.len()];
    let whole = scan(rest, ts);
    let cut = (usize::from(choice) * 7) % (rest.len() + 1);
    if let Ok((_, mut tail)) = scan_prefix(&rest[..cut], ts) {
        for part in rest[cut..].chunks(1 + usize::from(choice % 13)) {
            tail.feed(part);
        }
        let streamed = tail.finish();
        // A dataset the streamed check refuses is refused whole as well (the whole
        // scan may refuse more: it sees what the prefix scan could not).
        if streamed.is_err() && ts != SYNTAXES[3] {
            assert!(
                whole.is_err(),
                "streamed refused, whole accepted: {streamed:?}"
            );
        }
    }
}

/// PDUs read from a peer: the association request first, then whatever follows, as
/// the listener reads them (bounded by the maximum PDU length it advertises); P-DATA
/// values go through reassembly.
pub fn pdus(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = peer.write_all(&input).await;
            let _ = peer.shutdown().await;
        });
        let mut conn = Connection::new(ours, 16_384);
        let mut assembler = PdvAssembler::new(1 << 16);
        let timeout = Duration::from_millis(200);
        let mut pdu = conn.receive_request(timeout).await;
        while let Ok(p) = pdu {
            if let Pdu::PData { data } = p {
                for pdv in data {
                    match assembler.push(pdv) {
                        Ok(Assembled::Command { context_id, .. }) => {
                            assembler.expect_dataset(context_id, None);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
            pdu = conn.receive(timeout).await;
        }
        let _ = writer.await;
    });
}

/// DIMSE command parsing, and P-DATA reassembly of the same bytes cut into values.
pub fn commands(data: &[u8]) {
    let _ = parse_command(data);
    let mut assembler = PdvAssembler::new(4096);
    for (i, chunk) in data.chunks(97).enumerate() {
        let flags = chunk.first().copied().unwrap_or(0);
        let pdv = PDataValue {
            presentation_context_id: 1 + (flags & 3),
            value_type: if flags & 4 == 0 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: flags & 8 != 0 || i % 5 == 4,
            data: chunk.to_vec(),
        };
        match assembler.push(pdv) {
            Ok(Assembled::Command { context_id, .. }) => assembler.expect_dataset(context_id, None),
            Ok(_) => {}
            Err(_) => break,
        }
    }
}
