//! PDU transport: one byte stream (TCP, or TLS over TCP) carrying PDUs.
//!
//! Every read is bounded by the maximum PDU length we advertised: a PDU whose header
//! claims more is refused before any of its body is read or allocated. P-DATA-TF, nearly
//! all the traffic, is split into its values here; every other PDU is decoded by
//! `dicom-ul`.

use std::time::Duration;

use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::effective_max_pdu;

/// Largest PDV payload we send, whatever the peer accepts (its 0 means "no limit").
const MAX_SEND_PDV: u32 = 1024 * 1024;

/// Largest A-ASSOCIATE-RQ read, whatever maximum PDU length we advertise for P-DATA:
/// a request proposing 128 contexts with several transfer syntaxes each is ~40 KiB.
const MAX_ASSOCIATE_RQ: u32 = 256 * 1024;

/// Why a PDU could not be received or sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// Nothing arrived within the allowed time.
    #[error("no PDU within {0:?}")]
    Timeout(Duration),
    /// The bytes received are not a valid PDU (or one larger than we accept).
    #[error("invalid PDU: {0}")]
    Protocol(String),
    /// A socket error.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// A byte stream that can carry PDUs: a TCP stream or a TLS session over one.
pub trait PduStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> PduStream for T {}

/// A stream carrying DICOM PDUs, as the association acceptor.
pub struct Connection {
    stream: Box<dyn PduStream>,
    /// The body of the PDU being read, reused from one PDU to the next.
    body: Vec<u8>,
    write_buffer: Vec<u8>,
    max_pdu: u32,
    peer_max_pdu: u32,
}

impl Connection {
    /// Wrap an accepted stream; `max_pdu` is the largest PDU we accept (and advertise).
    pub fn new(stream: impl PduStream + 'static, max_pdu: u32) -> Self {
        let max_pdu = effective_max_pdu(max_pdu);
        Connection {
            stream: Box::new(stream),
            body: Vec::with_capacity(64 * 1024),
            write_buffer: Vec::with_capacity(1024),
            max_pdu,
            peer_max_pdu: dicom_ul::pdu::DEFAULT_MAX_PDU,
        }
    }

    /// Record the peer's maximum PDU length (0 = unlimited) once negotiated.
    pub fn set_peer_max_pdu(&mut self, n: u32) {
        self.peer_max_pdu = n;
    }

    /// Receive one PDU, waiting at most `timeout`. A PDU longer than our maximum is an
    /// error before any of its body is read. Not cancel-safe: a PDU read halfway is
    /// lost, so the association must end when a read is abandoned.
    pub async fn receive(&mut self, timeout: Duration) -> Result<Pdu, ConnError> {
        self.receive_limited(timeout, self.max_pdu).await
    }

    /// Receive the first PDU of an association (normally an A-ASSOCIATE-RQ).
    pub async fn receive_request(&mut self, timeout: Duration) -> Result<Pdu, ConnError> {
        self.receive_limited(timeout, self.max_pdu.max(MAX_ASSOCIATE_RQ))
            .await
    }

    async fn receive_limited(&mut self, timeout: Duration, limit: u32) -> Result<Pdu, ConnError> {
        match tokio::time::timeout(timeout, self.read_pdu(limit)).await {
            Err(_) => Err(ConnError::Timeout(timeout)),
            Ok(result) => result,
        }
    }

    /// Reads the 6-byte header, checks the length, reads exactly the body. P-DATA-TF,
    /// nearly all the traffic, is split into its values here with one copy of the
    /// data; every other PDU is decoded by `dicom-ul`.
    async fn read_pdu(&mut self, limit: u32) -> Result<Pdu, ConnError> {
        let mut header = [0u8; 6];
        match self.stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnError::Closed);
            }
            Err(e) => return Err(ConnError::Io(e)),
        }
        let pdu_type = header[0];
        let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        if length > limit {
            return Err(ConnError::Protocol(format!(
                "PDU of {length} bytes exceeds the maximum of {limit}"
            )));
        }
        self.body.clear();
        let read = (&mut self.stream)
            .take(u64::from(length))
            .read_to_end(&mut self.body)
            .await?;
        if read < length as usize {
            return Err(ConnError::Closed);
        }
        if pdu_type == 0x04 {
            return parse_pdata(&self.body).map(|data| Pdu::PData { data });
        }
        let mut whole = Vec::with_capacity(6 + self.body.len());
        whole.extend_from_slice(&header);
        whole.extend_from_slice(&self.body);
        match dicom_ul::pdu::read_pdu(
            &mut std::io::Cursor::new(&whole[..]),
            limit.max(dicom_ul::pdu::MINIMUM_PDU_SIZE),
            true,
        ) {
            Ok(Some(pdu)) => Ok(pdu),
            Ok(None) => Err(ConnError::Protocol("truncated PDU".into())),
            Err(e) => Err(ConnError::Protocol(error_chain(&e))),
        }
    }

    /// Send one PDU.
    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), ConnError> {
        self.write_buffer.clear();
        dicom_ul::pdu::write_pdu(&mut self.write_buffer, pdu)
            .map_err(|e| ConnError::Protocol(error_chain(&e)))?;
        self.stream.write_all(&self.write_buffer).await?;
        Ok(())
    }

    /// Send a command set, fragmented to fit the peer's maximum PDU length.
    pub async fn send_command(&mut self, context_id: u8, command: &[u8]) -> Result<(), ConnError> {
        let max_data = match self.peer_max_pdu {
            0 => MAX_SEND_PDV,
            n => n.saturating_sub(dicom_ul::pdu::PDV_HEADER_SIZE).max(16),
        } as usize;
        let mut chunks = command.chunks(max_data).peekable();
        while let Some(chunk) = chunks.next() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context_id,
                    value_type: PDataValueType::Command,
                    is_last: chunks.peek().is_none(),
                    data: chunk.to_vec(),
                }],
            };
            self.send(&pdu).await?;
        }
        Ok(())
    }

    /// Send an A-ABORT (service provider, `reason`) and close, ignoring send errors: the
    /// association is over either way.
    pub async fn abort(&mut self, reason: AbortRQServiceProviderReason) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.send(&pdu)).await;
        let _ = self.stream.shutdown().await;
    }

    /// Send a final PDU (A-ASSOCIATE-RJ, A-RELEASE-RP), then [`finish`](Self::finish).
    pub async fn send_and_close(&mut self, pdu: &Pdu, artim: Duration) -> Result<(), ConnError> {
        self.send(pdu).await?;
        self.finish(artim).await;
        Ok(())
    }

    /// Wait up to `artim` for the peer to close the connection, as the upper layer state
    /// machine asks after a rejection or release, then close our side.
    pub async fn finish(&mut self, artim: Duration) {
        let _ = self.stream.flush().await;
        let mut scratch = [0u8; 512];
        let wait_eof = async {
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(artim, wait_eof).await;
        let _ = self.stream.shutdown().await;
    }
}

/// The presentation data values of a P-DATA-TF body (PS3.8 9.3.5).
fn parse_pdata(body: &[u8]) -> Result<Vec<PDataValue>, ConnError> {
    let mut values = Vec::with_capacity(1);
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 6 {
            return Err(ConnError::Protocol(
                "P-DATA-TF ends inside a presentation data value header".into(),
            ));
        }
        let item_length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if item_length < 2 || item_length > rest.len() - 4 {
            return Err(ConnError::Protocol(format!(
                "presentation data value of {item_length} bytes does not fit its P-DATA-TF"
            )));
        }
        let presentation_context_id = rest[4];
        let control = rest[5];
        values.push(PDataValue {
            presentation_context_id,
            value_type: if control & 0x01 != 0 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: control & 0x02 != 0,
            data: rest[6..4 + item_length].to_vec(),
        });
        rest = &rest[4 + item_length..];
    }
    if values.is_empty() {
        return Err(ConnError::Protocol(
            "P-DATA-TF without presentation data values".into(),
        ));
    }
    Ok(values)
}

/// `error: cause: cause` on one line, for logs.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-DATA-TF body holding one presentation data value.
    fn pdv_item(context_id: u8, control: u8, data: &[u8]) -> Vec<u8> {
        let mut item = (data.len() as u32 + 2).to_be_bytes().to_vec();
        item.push(context_id);
        item.push(control);
        item.extend_from_slice(data);
        item
    }

    #[test]
    fn pdata_bodies_split_into_values() {
        let mut body = pdv_item(1, 0x03, b"cmd");
        body.extend(pdv_item(3, 0x00, b"data"));
        let values = parse_pdata(&body).unwrap();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0].presentation_context_id, 1);
        assert_eq!(values[0].value_type, PDataValueType::Command);
        assert!(values[0].is_last);
        assert_eq!(values[0].data, b"cmd");
        assert_eq!(values[1].presentation_context_id, 3);
        assert_eq!(values[1].value_type, PDataValueType::Data);
        assert!(!values[1].is_last);
        assert_eq!(values[1].data, b"data");
    }

    #[test]
    fn malformed_pdata_bodies_are_refused() {
        assert!(parse_pdata(&[]).is_err());
        // Ends inside a value header.
        assert!(parse_pdata(&[0, 0, 0]).is_err());
        // A value longer than what is left of the PDU.
        let mut long = pdv_item(1, 0x02, b"abc");
        long[3] = 50;
        assert!(parse_pdata(&long).is_err());
        // A value too short to hold its own header.
        let mut short = pdv_item(1, 0x02, b"");
        short[3] = 1;
        assert!(parse_pdata(&short).is_err());
    }

    #[tokio::test]
    async fn oversized_pdus_are_refused_from_their_header() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let mut conn = Connection::new(ours, 0);
        let limit = effective_max_pdu(0);
        // A P-DATA-TF header claiming one byte more than we accept, and no body.
        let mut header = vec![0x04, 0];
        header.extend((limit + 1).to_be_bytes());
        theirs.write_all(&header).await.unwrap();
        match conn.receive(Duration::from_secs(5)).await {
            Err(ConnError::Protocol(why)) => assert!(why.contains("exceeds"), "{why}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn commands_are_fragmented_to_the_peer_maximum() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let mut sender = Connection::new(ours, 0);
        let mut receiver = Connection::new(theirs, 0);
        sender.set_peer_max_pdu(100);
        let command: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        sender.send_command(5, &command).await.unwrap();
        let mut joined = Vec::new();
        let mut fragments = 0;
        loop {
            let Pdu::PData { data } = receiver.receive(Duration::from_secs(5)).await.unwrap()
            else {
                panic!("expected P-DATA-TF");
            };
            let [value] = &data[..] else {
                panic!("expected one value per PDU");
            };
            assert_eq!(value.presentation_context_id, 5);
            assert_eq!(value.value_type, PDataValueType::Command);
            assert!(value.data.len() <= 100 - dicom_ul::pdu::PDV_HEADER_SIZE as usize);
            joined.extend_from_slice(&value.data);
            fragments += 1;
            if value.is_last {
                break;
            }
        }
        assert_eq!(joined, command);
        assert_eq!(fragments, 3);
    }
}
