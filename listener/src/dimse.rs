//! DIMSE command sets: parsing requests and responses, building them.
//!
//! A command set is a small dataset of group 0000 elements, always encoded in implicit VR
//! little endian. Like the dataset scanner, the parser walks element headers itself and
//! checks every length against the bytes that remain, because the bytes come from the
//! network. The builders are pure functions producing the exact bytes to put in P-DATA.

use crate::dataset::parse_uid;

/// Status Success.
pub const SUCCESS: u16 = 0x0000;
/// Failure: Refused: SOP class not supported.
pub const REFUSED_SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Failure: Unrecognized operation.
pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
/// Failure: Refused: Out of Resources (storage class-specific, 0xA7xx).
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// Failure: Data Set does not match SOP Class (storage class-specific, 0xA9xx).
pub const DATASET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
/// Failure: Cannot understand (storage class-specific, 0xCxxx).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;

/// Command Field values used by the listener and the sender.
pub mod field {
    /// C-STORE-RQ.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO-RQ.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP.
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// C-CANCEL-RQ, which has no response.
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Priority MEDIUM, the usual value of a C-STORE-RQ.
pub const PRIORITY_MEDIUM: u16 = 0x0000;

/// Command Data Set Type value meaning "no dataset follows".
const NO_DATASET: u16 = 0x0101;

/// Longest Error Comment (0000,0902) we send (LO: 64 characters).
pub const MAX_ERROR_COMMENT: usize = 64;

const COMMAND_GROUP_LENGTH: u16 = 0x0000;
const AFFECTED_SOP_CLASS_UID: u16 = 0x0002;
const COMMAND_FIELD: u16 = 0x0100;
const MESSAGE_ID: u16 = 0x0110;
const MESSAGE_ID_BEING_RESPONDED_TO: u16 = 0x0120;
const PRIORITY: u16 = 0x0700;
const COMMAND_DATA_SET_TYPE: u16 = 0x0800;
const STATUS: u16 = 0x0900;
const ERROR_COMMENT: u16 = 0x0902;
const AFFECTED_SOP_INSTANCE_UID: u16 = 0x1000;

/// A parsed command set, request or response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Command Field (0000,0100): which operation, e.g. 0x0001 for C-STORE-RQ.
    pub field: u16,
    /// Message ID (0000,0110) of a request, or Message ID Being Responded To (0000,0120)
    /// of a response.
    pub message_id: u16,
    /// Affected SOP Class UID (0000,0002), padding removed.
    pub affected_sop_class_uid: Option<String>,
    /// Affected SOP Instance UID (0000,1000), padding removed.
    pub affected_sop_instance_uid: Option<String>,
    /// Priority (0000,0700) of a request.
    pub priority: Option<u16>,
    /// Whether a dataset follows the command (Command Data Set Type other than 0x0101).
    pub has_dataset: bool,
    /// Status (0000,0900) of a response.
    pub status: Option<u16>,
    /// Error Comment (0000,0902) of a response.
    pub error_comment: Option<String>,
}

impl Command {
    /// Whether this is a response (bit 15 of the command field).
    pub fn is_response(&self) -> bool {
        self.field & 0x8000 != 0
    }
}

/// Why a command set could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The command set ended inside an element.
    #[error("command set is truncated at byte {0}")]
    Truncated(usize),
    /// An element claims more bytes than remain.
    #[error(
        "command element (0000,{element:04X}) claims {length} bytes but only {remaining} remain"
    )]
    LengthBeyondEnd {
        /// Element number within group 0000.
        element: u16,
        /// Claimed length.
        length: u32,
        /// Bytes remaining.
        remaining: usize,
    },
    /// An element outside group 0000.
    #[error("command set contains an element outside group 0000 at byte {0}")]
    NotCommandGroup(usize),
    /// A fixed-size element with the wrong size.
    #[error("command element (0000,{0:04X}) has the wrong size")]
    BadValueSize(u16),
    /// A required element is absent.
    #[error("command set lacks {0}")]
    Missing(&'static str),
    /// A UID element with an unusable value.
    #[error("command element {0} is not a valid UID")]
    InvalidUid(&'static str),
}

/// Parse a command set (implicit VR little endian, group 0000 only).
pub fn parse_command(bytes: &[u8]) -> Result<Command, CommandError> {
    let mut pos = 0usize;
    let mut field = None;
    let mut message_id = None;
    let mut responded_to = None;
    let mut cmd = Command {
        field: 0,
        message_id: 0,
        affected_sop_class_uid: None,
        affected_sop_instance_uid: None,
        priority: None,
        has_dataset: false,
        status: None,
        error_comment: None,
    };
    let mut data_set_type = None;
    while pos < bytes.len() {
        let header = bytes
            .get(pos..pos + 8)
            .ok_or(CommandError::Truncated(pos))?;
        let group = u16::from_le_bytes([header[0], header[1]]);
        let element = u16::from_le_bytes([header[2], header[3]]);
        let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if group != 0x0000 {
            return Err(CommandError::NotCommandGroup(pos));
        }
        pos += 8;
        let remaining = bytes.len() - pos;
        if length as usize > remaining {
            return Err(CommandError::LengthBeyondEnd {
                element,
                length,
                remaining,
            });
        }
        let value = &bytes[pos..pos + length as usize];
        pos += length as usize;
        let us = || -> Result<u16, CommandError> {
            match value {
                [a, b] => Ok(u16::from_le_bytes([*a, *b])),
                _ => Err(CommandError::BadValueSize(element)),
            }
        };
        match element {
            COMMAND_FIELD => field = Some(us()?),
            MESSAGE_ID => message_id = Some(us()?),
            MESSAGE_ID_BEING_RESPONDED_TO => responded_to = Some(us()?),
            PRIORITY => cmd.priority = Some(us()?),
            COMMAND_DATA_SET_TYPE => data_set_type = Some(us()?),
            STATUS => cmd.status = Some(us()?),
            AFFECTED_SOP_CLASS_UID => {
                cmd.affected_sop_class_uid = Some(parse_uid(value).ok_or(
                    CommandError::InvalidUid("Affected SOP Class UID (0000,0002)"),
                )?);
            }
            AFFECTED_SOP_INSTANCE_UID => {
                cmd.affected_sop_instance_uid = Some(parse_uid(value).ok_or(
                    CommandError::InvalidUid("Affected SOP Instance UID (0000,1000)"),
                )?);
            }
            ERROR_COMMENT => {
                let text: String = value
                    .iter()
                    .take(MAX_ERROR_COMMENT)
                    .map(|&b| if b.is_ascii_graphic() { b as char } else { ' ' })
                    .collect();
                cmd.error_comment = Some(text.trim().to_string());
            }
            _ => {}
        }
    }
    cmd.field = field.ok_or(CommandError::Missing("Command Field (0000,0100)"))?;
    cmd.message_id = if cmd.is_response() {
        responded_to.ok_or(CommandError::Missing(
            "Message ID Being Responded To (0000,0120)",
        ))?
    } else {
        message_id.ok_or(CommandError::Missing("Message ID (0000,0110)"))?
    };
    cmd.has_dataset = data_set_type
        .ok_or(CommandError::Missing("Command Data Set Type (0000,0800)"))?
        != NO_DATASET;
    Ok(cmd)
}

/// Accumulates group 0000 elements and prepends the Command Group Length.
struct CommandWriter {
    body: Vec<u8>,
}

impl CommandWriter {
    fn new() -> Self {
        CommandWriter {
            body: Vec::with_capacity(192),
        }
    }

    fn raw(&mut self, element: u16, value: &[u8]) {
        self.body.extend(0u16.to_le_bytes());
        self.body.extend(element.to_le_bytes());
        self.body.extend((value.len() as u32).to_le_bytes());
        self.body.extend(value);
    }

    fn us(&mut self, element: u16, v: u16) {
        self.raw(element, &v.to_le_bytes());
    }

    fn uid(&mut self, element: u16, uid: &str) {
        let mut v = uid.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.raw(element, &v);
    }

    fn text(&mut self, element: u16, text: &str) {
        let mut v = text.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.raw(element, &v);
    }

    fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.body.len());
        out.extend(0u16.to_le_bytes());
        out.extend(COMMAND_GROUP_LENGTH.to_le_bytes());
        out.extend(4u32.to_le_bytes());
        out.extend((self.body.len() as u32).to_le_bytes());
        out.extend(self.body);
        out
    }
}

/// Make an Error Comment safe to send: printable ASCII only (no backslash, which would
/// split the value), at most 64 characters.
pub fn sanitize_comment(comment: &str) -> String {
    comment
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '\\' || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(MAX_ERROR_COMMENT)
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// Build a response command set (no dataset follows).
///
/// `comment` becomes the Error Comment after [`sanitize_comment`]; callers pass only
/// operator-facing text, never values taken from the dataset.
pub fn build_response(
    field: u16,
    message_id: u16,
    sop_class_uid: Option<&str>,
    sop_instance_uid: Option<&str>,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    let mut w = CommandWriter::new();
    if let Some(uid) = sop_class_uid {
        w.uid(AFFECTED_SOP_CLASS_UID, uid);
    }
    w.us(COMMAND_FIELD, field);
    w.us(MESSAGE_ID_BEING_RESPONDED_TO, message_id);
    w.us(COMMAND_DATA_SET_TYPE, NO_DATASET);
    w.us(STATUS, status);
    if let Some(c) = comment.map(sanitize_comment).filter(|c| !c.is_empty()) {
        w.text(ERROR_COMMENT, &c);
    }
    if let Some(uid) = sop_instance_uid {
        w.uid(AFFECTED_SOP_INSTANCE_UID, uid);
    }
    w.finish()
}

/// Build a C-ECHO-RSP.
pub fn c_echo_rsp(message_id: u16, status: u16) -> Vec<u8> {
    build_response(
        field::C_ECHO_RSP,
        message_id,
        Some(crate::sop_classes::VERIFICATION),
        None,
        status,
        None,
    )
}

/// Build a C-STORE-RSP with an optional Error Comment (sanitized, ≤ 64 characters).
pub fn c_store_rsp(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    build_response(
        field::C_STORE_RSP,
        message_id,
        Some(sop_class_uid),
        Some(sop_instance_uid),
        status,
        comment,
    )
}

/// Build a C-ECHO-RQ.
pub fn c_echo_rq(message_id: u16) -> Vec<u8> {
    let mut w = CommandWriter::new();
    w.uid(AFFECTED_SOP_CLASS_UID, crate::sop_classes::VERIFICATION);
    w.us(COMMAND_FIELD, field::C_ECHO_RQ);
    w.us(MESSAGE_ID, message_id);
    w.us(COMMAND_DATA_SET_TYPE, NO_DATASET);
    w.finish()
}

/// Build a C-STORE-RQ announcing a dataset.
pub fn c_store_rq(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    priority: u16,
) -> Vec<u8> {
    let mut w = CommandWriter::new();
    w.uid(AFFECTED_SOP_CLASS_UID, sop_class_uid);
    w.us(COMMAND_FIELD, field::C_STORE_RQ);
    w.us(MESSAGE_ID, message_id);
    w.us(PRIORITY, priority);
    w.us(COMMAND_DATA_SET_TYPE, 0x0000);
    w.uid(AFFECTED_SOP_INSTANCE_UID, sop_instance_uid);
    w.finish()
}

/// Status classes of DIMSE, as a sender acts on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// 0x0000.
    Success,
    /// 0x0001, 0x0107, 0x0116, 0xB000–0xBFFF: done, with a remark.
    Warning,
    /// 0xFF00, 0xFF01: more responses follow.
    Pending,
    /// 0xFE00.
    Cancel,
    /// Everything else.
    Failure,
}

/// Classify a DIMSE status.
pub fn status_kind(status: u16) -> StatusKind {
    match status {
        SUCCESS => StatusKind::Success,
        0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => StatusKind::Warning,
        0xFF00 | 0xFF01 => StatusKind::Pending,
        0xFE00 => StatusKind::Cancel,
        _ => StatusKind::Failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    /// Read a command set with dicom-object, as an independent check of the encoding.
    fn read_with_dicom_object(bytes: &[u8]) -> InMemDicomObject {
        InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .expect("dicom-object reads the command set")
    }

    #[test]
    fn c_store_rsp_is_read_back_by_dicom_object() {
        let bytes = c_store_rsp(
            7,
            CT,
            "1.2.3.4",
            OUT_OF_RESOURCES,
            Some("store unavailable\\retry later é"),
        );
        let obj = read_with_dicom_object(&bytes);
        let group_len = obj
            .element(tags::COMMAND_GROUP_LENGTH)
            .unwrap()
            .to_int::<u32>()
            .unwrap();
        assert_eq!(group_len as usize, bytes.len() - 12);
        let get = |t| obj.element(t).unwrap().to_int::<u16>().unwrap();
        assert_eq!(get(tags::COMMAND_FIELD), 0x8001);
        assert_eq!(get(tags::MESSAGE_ID_BEING_RESPONDED_TO), 7);
        assert_eq!(get(tags::STATUS), 0xA700);
        assert_eq!(get(tags::COMMAND_DATA_SET_TYPE), 0x0101);
        let s = |t| obj.element(t).unwrap().to_str().unwrap().to_string();
        assert_eq!(s(tags::AFFECTED_SOP_CLASS_UID), CT);
        assert_eq!(s(tags::AFFECTED_SOP_INSTANCE_UID), "1.2.3.4");
        assert_eq!(s(tags::ERROR_COMMENT), "store unavailable?retry later ?");

        let parsed = parse_command(&bytes).unwrap();
        assert_eq!(parsed.field, field::C_STORE_RSP);
        assert_eq!(parsed.message_id, 7);
        assert_eq!(parsed.status, Some(OUT_OF_RESOURCES));
        assert!(!parsed.has_dataset);
        assert_eq!(
            parsed.error_comment.as_deref(),
            Some("store unavailable?retry later ?")
        );
    }

    #[test]
    fn comments_are_bounded() {
        let long = "x".repeat(200);
        let bytes = c_store_rsp(1, CT, "1.2", CANNOT_UNDERSTAND, Some(&long));
        let parsed = parse_command(&bytes).unwrap();
        assert_eq!(parsed.error_comment.unwrap().len(), MAX_ERROR_COMMENT);
    }

    #[test]
    fn c_echo_rsp_round_trips() {
        let bytes = c_echo_rsp(300, SUCCESS);
        let obj = read_with_dicom_object(&bytes);
        assert_eq!(
            obj.element(tags::COMMAND_FIELD)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            0x8030
        );
        let parsed = parse_command(&bytes).unwrap();
        assert_eq!(parsed.message_id, 300);
        assert_eq!(parsed.status, Some(SUCCESS));
        assert_eq!(
            parsed.affected_sop_class_uid.as_deref(),
            Some(crate::sop_classes::VERIFICATION)
        );
    }

    #[test]
    fn requests_written_by_dicom_object_are_parsed() {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(format!("{CT}\0")),
        ));
        obj.put(DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(0x0001u16),
        ));
        obj.put(DataElement::new(
            tags::MESSAGE_ID,
            VR::US,
            PrimitiveValue::from(42u16),
        ));
        obj.put(DataElement::new(
            tags::PRIORITY,
            VR::US,
            PrimitiveValue::from(2u16),
        ));
        obj.put(DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0000u16),
        ));
        obj.put(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3.4.5\0"),
        ));
        let mut bytes = Vec::new();
        obj.write_dataset_with_ts(&mut bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        let cmd = parse_command(&bytes).unwrap();
        assert_eq!(
            cmd,
            Command {
                field: field::C_STORE_RQ,
                message_id: 42,
                affected_sop_class_uid: Some(CT.to_string()),
                affected_sop_instance_uid: Some("1.2.3.4.5".to_string()),
                priority: Some(2),
                has_dataset: true,
                status: None,
                error_comment: None,
            }
        );
    }

    #[test]
    fn our_requests_parse_back() {
        let cmd = parse_command(&c_store_rq(9, CT, "1.2.3", PRIORITY_MEDIUM)).unwrap();
        assert_eq!(cmd.field, field::C_STORE_RQ);
        assert_eq!(cmd.message_id, 9);
        assert!(cmd.has_dataset);
        assert_eq!(cmd.affected_sop_instance_uid.as_deref(), Some("1.2.3"));
        let cmd = parse_command(&c_echo_rq(3)).unwrap();
        assert_eq!(cmd.field, field::C_ECHO_RQ);
        assert!(!cmd.has_dataset);
        let obj = read_with_dicom_object(&c_store_rq(9, CT, "1.2.3", PRIORITY_MEDIUM));
        assert_eq!(
            obj.element(tags::MESSAGE_ID)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            9
        );
    }

    #[test]
    fn malformed_commands_are_errors() {
        let good = c_echo_rq(1);
        for cut in 0..good.len() {
            // Any proper prefix either lacks an element or is cut inside one.
            assert!(parse_command(&good[..cut]).is_err(), "prefix {cut}");
        }
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_command(&bad),
            Err(CommandError::LengthBeyondEnd { .. })
        ));
        let mut other_group = good.clone();
        other_group[0] = 8;
        assert_eq!(
            parse_command(&other_group),
            Err(CommandError::NotCommandGroup(0))
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_kind(0), StatusKind::Success);
        assert_eq!(status_kind(0xB007), StatusKind::Warning);
        assert_eq!(status_kind(0xA700), StatusKind::Failure);
        assert_eq!(status_kind(0x0122), StatusKind::Failure);
        assert_eq!(status_kind(0xFF00), StatusKind::Pending);
    }
}
