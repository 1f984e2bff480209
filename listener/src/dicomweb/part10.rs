//! The start of a DICOM Part-10 file as STOW-RS sends it: the 128-byte preamble, `DICM`
//! and the File Meta group (explicit VR little endian), read within a bound.
//!
//! A C-STORE brings its transfer syntax and UIDs in the command and the listener writes
//! the File Meta group itself; a STOW-RS part brings its own, so this reads the few
//! attributes the listener needs from it (Transfer Syntax UID, Media Storage SOP Class
//! and Instance UIDs) and where the dataset starts. Like the dataset scanner it never
//! trusts a claimed length beyond the bytes at hand and allocates nothing from one.

use crate::dataset::{has_long_length, is_valid_uid};

/// Largest File Meta group accepted; real ones are a few hundred bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// What the File Meta group says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    /// Bytes before the dataset: preamble, `DICM` and the File Meta group.
    pub len: usize,
    /// Transfer Syntax UID (0002,0010).
    pub transfer_syntax: String,
    /// Media Storage SOP Class UID (0002,0002), when present and valid.
    pub sop_class_uid: Option<String>,
    /// Media Storage SOP Instance UID (0002,0003), when present and valid.
    pub sop_instance_uid: Option<String>,
}

/// Why the start of a part is not a Part-10 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// More bytes are needed to read the header.
    #[error("the part ends inside its File Meta group")]
    Incomplete,
    /// No `DICM` at byte 128.
    #[error("the part is not a DICOM Part-10 file (no DICM prefix after the 128-byte preamble)")]
    NotPart10,
    /// The group is malformed, too long or lacks its transfer syntax.
    #[error("the File Meta group is malformed: {0}")]
    Malformed(&'static str),
}

/// Reads the Part-10 header at the start of `bytes` (which may be only a prefix of the
/// file). [`HeaderError::Incomplete`] asks for more bytes.
pub fn read_header(bytes: &[u8]) -> Result<FileHeader, HeaderError> {
    if bytes.len() < 132 {
        return Err(HeaderError::Incomplete);
    }
    if &bytes[128..132] != b"DICM" {
        return Err(HeaderError::NotPart10);
    }
    let mut pos = 132;
    // Where the group ends, once its group length (0002,0000) is read.
    let mut end: Option<usize> = None;
    let (mut ts, mut class, mut instance) = (None, None, None);
    loop {
        if end == Some(pos) {
            break;
        }
        if pos - 132 > MAX_HEADER_BYTES {
            return Err(HeaderError::Malformed("longer than 64 KiB"));
        }
        if bytes.len() < pos + 2 {
            return Err(HeaderError::Incomplete);
        }
        let group = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]);
        if group != 0x0002 {
            if end.is_some() {
                return Err(HeaderError::Malformed("the group length is wrong"));
            }
            break;
        }
        if bytes.len() < pos + 8 {
            return Err(HeaderError::Incomplete);
        }
        let element = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        let vr = [bytes[pos + 4], bytes[pos + 5]];
        if !vr.iter().all(u8::is_ascii_uppercase) {
            return Err(HeaderError::Malformed("an element has no explicit VR"));
        }
        let (value_at, length) = if has_long_length(vr) {
            if bytes.len() < pos + 12 {
                return Err(HeaderError::Incomplete);
            }
            let l = u32::from_le_bytes([
                bytes[pos + 8],
                bytes[pos + 9],
                bytes[pos + 10],
                bytes[pos + 11],
            ]);
            (pos + 12, l as usize)
        } else {
            (
                pos + 8,
                u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]]) as usize,
            )
        };
        if length > MAX_HEADER_BYTES {
            return Err(HeaderError::Malformed("an element is longer than 64 KiB"));
        }
        if bytes.len() < value_at + length {
            return Err(HeaderError::Incomplete);
        }
        let value = &bytes[value_at..value_at + length];
        match element {
            0x0000 if length == 4 && end.is_none() => {
                let l = u32::from_le_bytes([value[0], value[1], value[2], value[3]]) as usize;
                if l > MAX_HEADER_BYTES {
                    return Err(HeaderError::Malformed("the group length is beyond 64 KiB"));
                }
                end = Some(value_at + length + l);
            }
            0x0002 => class = uid(value),
            0x0003 => instance = uid(value),
            0x0010 => ts = uid(value),
            _ => {}
        }
        pos = value_at + length;
        if end.is_some_and(|e| pos > e) {
            return Err(HeaderError::Malformed("the group length is wrong"));
        }
    }
    let transfer_syntax = ts.ok_or(HeaderError::Malformed(
        "the Transfer Syntax UID (0002,0010) is missing",
    ))?;
    Ok(FileHeader {
        len: pos,
        transfer_syntax,
        sop_class_uid: class,
        sop_instance_uid: instance,
    })
}

/// A UID value without its padding, if it is a valid UID.
fn uid(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?;
    let s = s.trim_end_matches(['\0', ' ']);
    is_valid_uid(s).then(|| s.to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Explicit VR little endian element with a 16-bit length.
    fn short(element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x02, 0x00];
        v.extend_from_slice(&element.to_le_bytes());
        v.extend_from_slice(vr);
        v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        v.extend_from_slice(value);
        v
    }

    /// A Part-10 header with the given transfer syntax, class and instance.
    pub(crate) fn header(ts: &str, class: &str, instance: &str) -> Vec<u8> {
        let pad = |s: &str| {
            let mut b = s.as_bytes().to_vec();
            if b.len() % 2 == 1 {
                b.push(0);
            }
            b
        };
        let mut group = Vec::new();
        group.extend(short(0x0002, b"UI", &pad(class)));
        group.extend(short(0x0003, b"UI", &pad(instance)));
        group.extend(short(0x0010, b"UI", &pad(ts)));
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend(short(0x0000, b"UL", &(group.len() as u32).to_le_bytes()));
        out.extend(group);
        out
    }

    #[test]
    fn reads_the_file_meta_group() {
        let mut file = header(
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.4",
        );
        let len = file.len();
        file.extend_from_slice(&[0x08, 0x00, 0x16, 0x00]);
        let h = read_header(&file).unwrap();
        assert_eq!(h.len, len);
        assert_eq!(h.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(
            h.sop_class_uid.as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        assert_eq!(h.sop_instance_uid.as_deref(), Some("1.2.3.4"));
        // Every cut inside the header asks for more bytes.
        for cut in 0..len {
            assert_eq!(
                read_header(&file[..cut]),
                Err(HeaderError::Incomplete),
                "{cut}"
            );
        }
        // With the group length the dataset need not have started yet.
        assert!(read_header(&file[..len]).is_ok());
    }

    #[test]
    fn refuses_what_is_not_part10() {
        let mut file = header("1.2.840.10008.1.2.1", "1.2.3", "1.2.3.4");
        file[129] = b'X';
        assert_eq!(read_header(&file), Err(HeaderError::NotPart10));
        // A claimed length far beyond the bound is refused, not waited for.
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        file.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0]);
        file.extend_from_slice(&u32::MAX.to_le_bytes());
        file.extend_from_slice(&[0; 16]);
        assert!(matches!(read_header(&file), Err(HeaderError::Malformed(_))));
        // No transfer syntax.
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        file.extend(short(0x0003, b"UI", b"1.2.3.4\0"));
        file.extend_from_slice(&[0x08, 0x00, 0x16, 0x00]);
        assert!(matches!(read_header(&file), Err(HeaderError::Malformed(_))));
    }
}
