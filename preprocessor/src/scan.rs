//! Structural scan of a DICOM Part-10 file before any parser allocates.
//!
//! `dicom-object` allocates an element's claimed length before reading it, so a few
//! hundred hostile bytes can claim gigabytes. This pass walks the file meta group and
//! the data set, checks every claimed length against the bytes that are actually there,
//! and finds where the top-level pixel data lies, without allocating for any value.
//! Uncompressed pixels are then converted straight from the input buffer.

use std::io::Read;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_encoding::transfer_syntax::{Codec, Endianness, TransferSyntax};

use crate::decode_error::DecodeError;

/// Largest data set accepted after inflating a deflated file.
const MAX_INFLATED_BYTES: usize = 1 << 30;

/// Deepest sequence nesting the scanner follows; real files nest a handful of levels.
const MAX_DEPTH: usize = 32;

const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// Where the top-level pixel data lies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum PixelSpan {
    /// Uncompressed: `len` value bytes at `offset` of the input buffer.
    Native { offset: usize, len: usize },
    /// Encapsulated fragments totalling `len` bytes.
    Encapsulated { len: usize },
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    big: bool,
    /// Value length of the header just read by [`explicit_header`].
    pending_len: u32,
    /// Undefined-length UN elements met in explicit VR (see [`OpaqueUn`]).
    opaque_un: Vec<OpaqueUn>,
}

/// An element of VR UN and undefined length in an explicit VR data set: a sequence
/// whose content is implicit VR little endian (PS3.5 6.2.2, from CP-246), as written
/// when a system that did not know the attribute (typically a private one) converted
/// an implicit VR file to explicit VR. `dicom-object` reads such content as explicit
/// VR and fails on it, so before it parses the file the element is turned into an
/// opaque value of the same size: its length field, at `length_at`, gets `content`
/// (the bytes up to and including the sequence delimiter). Nothing around it moves,
/// so every enclosing length stays right; the element's content is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpaqueUn {
    pub length_at: usize,
    pub content: u32,
}

/// What [`scan_dataset`] found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DatasetScan {
    /// Where the top-level pixel data lies, if there is any.
    pub pixel: Option<PixelSpan>,
    /// Elements to make opaque before a parser reads the file ([`opaque_un`]).
    pub opaque_un: Vec<OpaqueUn>,
    /// Whether length fields are big endian.
    pub big_endian: bool,
}

/// `bytes` with every element of `scan.opaque_un` turned into an opaque value; the
/// bytes themselves when there is none.
pub(crate) fn without_un_sequences<'a>(
    bytes: &'a [u8],
    opaque_un: &[OpaqueUn],
    big_endian: bool,
) -> std::borrow::Cow<'a, [u8]> {
    if opaque_un.is_empty() {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = bytes.to_vec();
    for o in opaque_un {
        let field = if big_endian {
            o.content.to_be_bytes()
        } else {
            o.content.to_le_bytes()
        };
        out[o.length_at..o.length_at + 4].copy_from_slice(&field);
    }
    std::borrow::Cow::Owned(out)
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.buf.get(self.pos..self.pos + N).ok_or_else(|| {
            malformed(format!(
                "the file ends inside an element header at byte {}",
                self.pos
            ))
        })?;
        self.pos += N;
        Ok(bytes.try_into().expect("slice of length N"))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take::<2>()?;
        Ok(if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take::<4>()?;
        Ok(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
}

fn malformed(detail: String) -> DecodeError {
    DecodeError::Malformed(detail)
}

/// Whether an explicit-VR header has two reserved bytes and a 32-bit length: every VR
/// but the short ones of PS3.5 Table 7.1-2. Unknown VR bytes are read as `UN` (long)
/// by the parser, so they are long here too; anything else would let a corrupt VR
/// hide a huge length from this scan.
fn long_vr(vr: [u8; 2]) -> bool {
    !matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

/// What the file meta group says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Meta {
    pub transfer_syntax: String,
    /// Where the data set starts.
    pub dataset_start: usize,
    /// Media Storage SOP Class UID (0002,0002), if present.
    pub sop_class_uid: Option<String>,
}

/// Walks the file meta group the way `dicom-object` reads it: the group length
/// (0002,0000) comes first and says how many bytes of elements follow; the data set
/// starts after them.
pub(crate) fn scan_meta(bytes: &[u8]) -> Result<Meta, DecodeError> {
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(DecodeError::NotDicom(
            "the 128-byte preamble and DICM marker are missing".into(),
        ));
    }
    let not_meta = |m: &str| DecodeError::NotDicom(format!("invalid file meta group: {m}"));
    let mut c = Cursor {
        buf: bytes,
        pos: 132,
        big: false,
        pending_len: 0,
        opaque_un: Vec::new(),
    };
    let tag = explicit_header(&mut c)?;
    if tag != Tag(0x0002, 0x0000) || c.pending_len != 4 {
        return Err(not_meta("it does not start with its group length"));
    }
    let group_length = c.u32()? as usize;
    let mut transfer_syntax = None;
    let mut sop_class_uid = None;
    let mut consumed = 0usize;
    while consumed < group_length {
        let header_start = c.pos;
        let tag = explicit_header(&mut c)?;
        let len = c.pending_len;
        if len == UNDEFINED_LENGTH {
            return Err(not_meta("an element has an undefined length"));
        }
        let len = len as usize;
        if len > c.remaining() {
            return Err(malformed(format!(
                "file meta element ({:04X},{:04X}) claims {len} bytes but only {} remain",
                tag.0,
                tag.1,
                c.remaining()
            )));
        }
        let uid = || {
            String::from_utf8_lossy(&bytes[c.pos..c.pos + len])
                .trim_matches(|ch: char| ch == '\0' || ch == ' ')
                .to_owned()
        };
        if tag == Tag(0x0002, 0x0010) {
            transfer_syntax = Some(uid());
        } else if tag == Tag(0x0002, 0x0002) {
            sop_class_uid = Some(uid()).filter(|u| !u.is_empty());
        }
        c.pos += len;
        consumed += c.pos - header_start;
    }
    let transfer_syntax = transfer_syntax.ok_or_else(|| not_meta("it has no transfer syntax"))?;
    Ok(Meta {
        transfer_syntax,
        dataset_start: c.pos,
        sop_class_uid,
    })
}

/// Reads an explicit VR little endian element header (as the file meta group is
/// encoded), leaving its length in `c.pending_len`.
fn explicit_header(c: &mut Cursor<'_>) -> Result<Tag, DecodeError> {
    let group = c.u16()?;
    let elem = c.u16()?;
    if group == 0xFFFE {
        c.pending_len = c.u32()?;
        return Ok(Tag(group, elem));
    }
    let vr = c.take::<2>()?;
    c.pending_len = if long_vr(vr) {
        c.take::<2>()?;
        c.u32()?
    } else {
        u32::from(c.u16()?)
    };
    Ok(Tag(group, elem))
}

/// Checks every element length of the data set against the bytes present and finds
/// the top-level pixel data and any undefined-length UN elements, without allocating
/// for any value.
pub(crate) fn scan_dataset(
    bytes: &[u8],
    start: usize,
    ts: &TransferSyntax,
) -> Result<DatasetScan, DecodeError> {
    let mut pixel_data = None;
    let big_endian = ts.endianness() == Endianness::Big;
    if let Codec::Dataset(Some(_)) = ts.codec() {
        // A deflated data set (explicit VR little endian inside): inflate a bounded
        // copy and scan that. Offsets then refer to the copy; only presence is used.
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(&bytes[start..])
            .take(MAX_INFLATED_BYTES as u64 + 1)
            .read_to_end(&mut inflated)
            .map_err(|e| malformed(format!("the deflated data set cannot be inflated: {e}")))?;
        if inflated.len() > MAX_INFLATED_BYTES {
            return Err(DecodeError::TooLarge {
                bytes: inflated.len(),
                limit: MAX_INFLATED_BYTES,
            });
        }
        let mut c = Cursor {
            buf: &inflated,
            pos: 0,
            big: false,
            pending_len: 0,
            opaque_un: Vec::new(),
        };
        walk_dataset(&mut c, None, true, 0, &mut pixel_data)?;
        // The parser inflates the data set itself; offsets into this copy are no use.
        Ok(DatasetScan {
            pixel: pixel_data,
            opaque_un: Vec::new(),
            big_endian,
        })
    } else {
        let mut c = Cursor {
            buf: bytes,
            pos: start,
            big: big_endian,
            pending_len: 0,
            opaque_un: Vec::new(),
        };
        walk_dataset(&mut c, None, ts.uid() != IMPLICIT_VR_LE, 0, &mut pixel_data)?;
        Ok(DatasetScan {
            pixel: pixel_data,
            opaque_un: c.opaque_un,
            big_endian,
        })
    }
}

fn walk_dataset(
    c: &mut Cursor<'_>,
    end: Option<usize>,
    explicit: bool,
    depth: usize,
    pixel: &mut Option<PixelSpan>,
) -> Result<(), DecodeError> {
    loop {
        match end {
            Some(end) if c.pos == end => return Ok(()),
            Some(end) if c.pos > end => {
                return Err(malformed(format!(
                    "an element crosses the end of its sequence item at byte {end}"
                )));
            }
            // Top level: the data set ends with the file (a few stray padding bytes are
            // tolerated, as other readers do).
            None if depth == 0 && c.remaining() < 8 => return Ok(()),
            None if c.remaining() == 0 => {
                return Err(malformed("the file ends inside a sequence item".into()));
            }
            _ => {}
        }
        let group = c.u16()?;
        let elem = c.u16()?;
        if group == 0xFFFE {
            let _len = c.u32()?;
            if elem == 0xE00D && end.is_none() && depth > 0 {
                return Ok(());
            }
            return Err(malformed(format!(
                "unexpected item tag (FFFE,{elem:04X}) inside a data set"
            )));
        }
        let tag = Tag(group, elem);
        let (vr, len) = if explicit {
            let vr = c.take::<2>()?;
            let len = if long_vr(vr) {
                c.take::<2>()?;
                c.u32()?
            } else {
                u32::from(c.u16()?)
            };
            (Some(vr), len)
        } else {
            (None, c.u32()?)
        };
        let is_pixel_tag = tag == tags::PIXEL_DATA;
        if len == UNDEFINED_LENGTH {
            if is_pixel_tag || matches!(vr.as_ref(), Some(b"OB") | Some(b"OW")) {
                let total = walk_fragments(c, depth == 0 && is_pixel_tag)?;
                if depth == 0 && is_pixel_tag {
                    *pixel = Some(PixelSpan::Encapsulated { len: total });
                }
            } else if vr.as_ref() == Some(b"UN") {
                // A sequence whose content is implicit VR little endian, whatever the
                // data set's encoding (PS3.5 6.2.2).
                let start = c.pos;
                let outer_big = std::mem::replace(&mut c.big, false);
                let walked = walk_sequence(c, None, false, depth + 1);
                c.big = outer_big;
                walked?;
                let content = u32::try_from(c.pos - start).map_err(|_| {
                    malformed(format!("element ({:04X},{:04X}) is too long", tag.0, tag.1))
                })?;
                c.opaque_un.push(OpaqueUn {
                    length_at: start - 4,
                    content,
                });
            } else {
                // SQ, or implicit VR of undefined length: a sequence.
                walk_sequence(c, None, explicit, depth + 1)?;
            }
            continue;
        }
        let len = len as usize;
        let limit = end.map_or(c.remaining(), |e| e.saturating_sub(c.pos));
        if len > limit {
            if depth == 0 && is_pixel_tag {
                return Err(DecodeError::TruncatedPixelData {
                    expected: len,
                    present: limit,
                });
            }
            return Err(malformed(format!(
                "element ({:04X},{:04X}) claims {len} bytes but only {limit} remain",
                tag.0, tag.1
            )));
        }
        let is_sequence = match vr {
            Some(vr) => &vr == b"SQ",
            // Implicit VR: the parser takes the VR from the dictionary, so do the same.
            None => {
                !is_pixel_tag
                    && StandardDataDictionary
                        .by_tag(tag)
                        .is_some_and(|e| e.vr().relaxed() == VR::SQ)
            }
        };
        if is_sequence {
            walk_sequence(c, Some(c.pos + len), explicit, depth + 1)?;
        } else {
            // The parser reads a binary value as whole numbers and moves on by what it
            // read: a length that is not a multiple of the number's size would leave it
            // a few bytes behind this scan, reading the next header out of the middle
            // of a value (and trusting whatever length it finds there).
            let binary = match vr {
                Some(vr) => VR::from_binary(vr),
                None => StandardDataDictionary.by_tag(tag).map(|e| e.vr().relaxed()),
            };
            if let Some(size) = binary.and_then(number_size)
                && !is_pixel_tag
                && len % size != 0
            {
                return Err(malformed(format!(
                    "element ({:04X},{:04X}) has {len} bytes, not a whole number of its {size}-byte values",
                    tag.0, tag.1
                )));
            }
            if depth == 0 && is_pixel_tag {
                *pixel = Some(PixelSpan::Native { offset: c.pos, len });
            }
            c.pos += len;
        }
    }
}

/// Bytes of one value of a binary VR (numbers and tags), `None` for the others.
fn number_size(vr: VR) -> Option<usize> {
    match vr {
        VR::US | VR::SS | VR::OW => Some(2),
        VR::UL | VR::SL | VR::FL | VR::OF | VR::OL | VR::AT => Some(4),
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => Some(8),
        _ => None,
    }
}

fn walk_sequence(
    c: &mut Cursor<'_>,
    end: Option<usize>,
    explicit: bool,
    depth: usize,
) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(malformed(format!(
            "sequences are nested more than {MAX_DEPTH} levels deep"
        )));
    }
    let mut ignored = None;
    loop {
        if let Some(end) = end {
            if c.pos == end {
                return Ok(());
            }
            if c.pos > end {
                return Err(malformed(
                    "a sequence item crosses the end of its sequence".into(),
                ));
            }
        }
        let group = c.u16()?;
        let elem = c.u16()?;
        let len = c.u32()?;
        match (group, elem) {
            (0xFFFE, 0xE000) if len == UNDEFINED_LENGTH => {
                walk_dataset(c, None, explicit, depth, &mut ignored)?;
            }
            (0xFFFE, 0xE000) => {
                let len = len as usize;
                let limit = end.map_or(c.remaining(), |e| e.saturating_sub(c.pos));
                if len > limit {
                    return Err(malformed(format!(
                        "a sequence item claims {len} bytes but only {limit} remain"
                    )));
                }
                walk_dataset(c, Some(c.pos + len), explicit, depth, &mut ignored)?;
            }
            (0xFFFE, 0xE0DD) if end.is_none() => return Ok(()),
            _ => {
                return Err(malformed(format!(
                    "expected a sequence item, found ({group:04X},{elem:04X})"
                )));
            }
        }
    }
}

/// Walks encapsulated pixel data fragments; returns their total length.
fn walk_fragments(c: &mut Cursor<'_>, top_pixel: bool) -> Result<usize, DecodeError> {
    let mut total = 0usize;
    loop {
        if top_pixel && c.remaining() < 8 {
            return Err(DecodeError::TruncatedPixelData {
                expected: total + 8,
                present: total + c.remaining(),
            });
        }
        let group = c.u16()?;
        let elem = c.u16()?;
        let len = c.u32()?;
        match (group, elem) {
            (0xFFFE, 0xE000) if len != UNDEFINED_LENGTH => {
                let len = len as usize;
                if len > c.remaining() {
                    if top_pixel {
                        return Err(DecodeError::TruncatedPixelData {
                            expected: total + len,
                            present: total + c.remaining(),
                        });
                    }
                    return Err(malformed(format!(
                        "a pixel data fragment claims {len} bytes but only {} remain",
                        c.remaining()
                    )));
                }
                c.pos += len;
                total += len;
            }
            (0xFFFE, 0xE0DD) => return Ok(total),
            _ => {
                return Err(malformed(format!(
                    "expected a pixel data fragment, found ({group:04X},{elem:04X})"
                )));
            }
        }
    }
}
