//! Reading what a result needs from one source instance: its header only.
//!
//! The source files are untrusted input. `dicom-object` allocates an element's
//! claimed length before reading it, so before the header is handed to it this module
//! walks the file meta group and the data set up to Pixel Data and checks every claimed
//! length against the bytes that are really there (sequences and items included, to a
//! bounded depth). Only the bytes before Pixel Data are parsed; at most
//! [`MAX_HEADER_BYTES`] are read. The patient and study values are kept in memory for
//! writing only: [`SourceInstance`]'s `Debug` does not show them.

use std::io::Read;
use std::path::Path;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_object::{InMemDicomObject, OpenFileOptions};

/// Most bytes of a source file read to find its header.
pub const MAX_HEADER_BYTES: usize = 64 << 20;
/// Deepest nesting of sequences accepted in a source header.
const MAX_DEPTH: usize = 16;
/// Explicit VR Little Endian.
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
/// Implicit VR Little Endian.
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// Attributes copied from the source into every object (Patient, General Study and
/// Patient Study modules, the character set); type 2 attributes absent in the source
/// are written empty.
pub const COPIED_TAGS: &[(Tag, bool)] = &[
    (tags::SPECIFIC_CHARACTER_SET, false),
    (tags::PATIENT_NAME, true),
    (tags::PATIENT_ID, true),
    (tags::ISSUER_OF_PATIENT_ID, false),
    (tags::PATIENT_BIRTH_DATE, true),
    (tags::PATIENT_SEX, true),
    (tags::PATIENT_AGE, false),
    (tags::PATIENT_SIZE, false),
    (tags::PATIENT_WEIGHT, false),
    (tags::STUDY_INSTANCE_UID, true),
    (tags::STUDY_DATE, true),
    (tags::STUDY_TIME, true),
    (tags::REFERRING_PHYSICIAN_NAME, true),
    (tags::STUDY_ID, true),
    (tags::ACCESSION_NUMBER, true),
    (tags::STUDY_DESCRIPTION, false),
];

/// Why a source header cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read source file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a DICOM Part-10 file (no DICM prefix)")]
    NotPart10,
    #[error("malformed header at byte {at}: {why}")]
    Malformed { at: usize, why: String },
    #[error("the header is larger than {MAX_HEADER_BYTES} bytes")]
    TooLarge,
    #[error("transfer syntax {0} is not supported for source headers")]
    TransferSyntax(String),
    #[error("cannot parse header: {0}")]
    Parse(String),
    #[error("source attribute {0} is missing or unusable")]
    Missing(&'static str),
}

/// What one source image contributes to a result.
#[derive(Clone)]
pub struct SourceInstance {
    /// SOP Class UID (referenced by the SEG's derivation and the SR's evidence).
    pub sop_class_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Series Instance UID of the source series.
    pub series_instance_uid: String,
    /// Frame of Reference UID.
    pub frame_of_reference_uid: String,
    /// Image Position (Patient) exactly as the source spells it (DS).
    pub image_position: [String; 3],
    /// Image Orientation (Patient) as the source spells it (DS).
    pub image_orientation: [String; 6],
    /// Pixel Spacing (row spacing, column spacing) as the source spells it.
    pub pixel_spacing: [String; 2],
    /// Slice Thickness, when the source has it.
    pub slice_thickness: Option<String>,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub columns: u16,
    /// The attributes of [`COPIED_TAGS`] present in the source.
    pub(crate) copied: InMemDicomObject,
}

impl std::fmt::Debug for SourceInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the copied patient and study values.
        f.debug_struct("SourceInstance")
            .field("sop_instance_uid", &self.sop_instance_uid)
            .field("series_instance_uid", &self.series_instance_uid)
            .field("rows", &self.rows)
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

impl SourceInstance {
    /// Image Position (Patient) as numbers.
    pub fn position(&self) -> [f64; 3] {
        self.image_position
            .clone()
            .map(|s| s.trim().parse().unwrap_or(f64::NAN))
    }

    /// Image Orientation (Patient) as numbers: row direction, then column direction.
    pub fn orientation(&self) -> [f64; 6] {
        self.image_orientation
            .clone()
            .map(|s| s.trim().parse().unwrap_or(f64::NAN))
    }
}

/// Reads the header of one source Part-10 file.
pub fn read_source_file(path: &Path) -> Result<SourceInstance, HeaderError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_HEADER_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    read_source(&bytes)
}

/// Reads the header of one source Part-10 file held in memory (a prefix is enough
/// when it reaches Pixel Data).
pub fn read_source(bytes: &[u8]) -> Result<SourceInstance, HeaderError> {
    let end = checked_header_len(bytes)?;
    let object = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .from_reader(&bytes[128..end])
        .map_err(|e| HeaderError::Parse(e.to_string()))?;
    let get = |tag: Tag, name: &'static str| -> Result<String, HeaderError> {
        object
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
            .filter(|s| !s.is_empty())
            .ok_or(HeaderError::Missing(name))
    };
    let strings = |tag: Tag, name: &'static str, n: usize| -> Result<Vec<String>, HeaderError> {
        let values: Vec<String> = get(tag, name)?
            .split('\\')
            .map(|s| s.trim().to_owned())
            .collect();
        if values.len() != n
            || values
                .iter()
                .any(|v| v.parse::<f64>().is_err() || v.len() > 16)
        {
            return Err(HeaderError::Missing(name));
        }
        Ok(values)
    };
    let number = |tag: Tag, name: &'static str| -> Result<u16, HeaderError> {
        object
            .element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<u16>().ok())
            .filter(|&v| v > 0)
            .ok_or(HeaderError::Missing(name))
    };
    let mut copied = InMemDicomObject::new_empty();
    for &(tag, _) in COPIED_TAGS {
        if let Ok(Some(e)) = object.element_opt(tag) {
            copied.put(e.clone());
        }
    }
    let position = strings(tags::IMAGE_POSITION_PATIENT, "Image Position (Patient)", 3)?;
    let orientation = strings(
        tags::IMAGE_ORIENTATION_PATIENT,
        "Image Orientation (Patient)",
        6,
    )?;
    let spacing = strings(tags::PIXEL_SPACING, "Pixel Spacing", 2)?;
    Ok(SourceInstance {
        sop_class_uid: get(tags::SOP_CLASS_UID, "SOP Class UID")?,
        sop_instance_uid: get(tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
        series_instance_uid: get(tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
        frame_of_reference_uid: get(tags::FRAME_OF_REFERENCE_UID, "Frame of Reference UID")?,
        image_position: position.try_into().expect("checked length"),
        image_orientation: orientation.try_into().expect("checked length"),
        pixel_spacing: spacing.try_into().expect("checked length"),
        slice_thickness: get(tags::SLICE_THICKNESS, "Slice Thickness")
            .ok()
            .filter(|s| s.parse::<f64>().is_ok() && s.len() <= 16),
        rows: number(tags::ROWS, "Rows")?,
        columns: number(tags::COLUMNS, "Columns")?,
        copied,
    })
}

/// Checks the preamble, meta group and data set up to Pixel Data; returns where Pixel
/// Data starts (or the end of the bytes when there is none).
fn checked_header_len(bytes: &[u8]) -> Result<usize, HeaderError> {
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(HeaderError::NotPart10);
    }
    let truncated = bytes.len() > MAX_HEADER_BYTES;
    let bytes = &bytes[..bytes.len().min(MAX_HEADER_BYTES)];
    // The meta group: explicit VR little endian, group 0002 only.
    let mut walker = Walker {
        bytes,
        explicit: true,
    };
    let mut pos = 132;
    let mut ts = None;
    while pos + 4 <= bytes.len() && read_u16(bytes, pos) == 0x0002 {
        let (tag, value, next) = walker.element(pos, bytes.len())?;
        if tag == tags::TRANSFER_SYNTAX_UID {
            let raw = &bytes[value..value + (next - value)];
            ts = Some(
                String::from_utf8_lossy(raw)
                    .trim_end_matches(['\0', ' '])
                    .to_owned(),
            );
        }
        pos = next;
    }
    let ts = ts.ok_or(HeaderError::Missing("Transfer Syntax UID"))?;
    walker.explicit = match ts.as_str() {
        IMPLICIT_LE => false,
        EXPLICIT_LE => true,
        // Compressed pixel data: the data set before it is explicit VR little endian.
        t if t.starts_with("1.2.840.10008.1.2.4.") || t == "1.2.840.10008.1.2.5" => true,
        other => return Err(HeaderError::TransferSyntax(other.to_owned())),
    };
    match walker.elements(pos, bytes.len(), 0, true)? {
        (at, Stop::PixelData) => Ok(at),
        (at, Stop::End) if !truncated => Ok(at),
        (_, Stop::End) => Err(HeaderError::TooLarge),
        (at, Stop::ItemEnd) => Err(HeaderError::Malformed {
            at,
            why: "item delimiter outside a sequence".into(),
        }),
    }
}

enum Stop {
    End,
    PixelData,
    ItemEnd,
}

struct Walker<'a> {
    bytes: &'a [u8],
    explicit: bool,
}

const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_END: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_END: Tag = Tag(0xFFFE, 0xE0DD);
const UNDEFINED: u32 = 0xFFFF_FFFF;

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Walker<'_> {
    fn malformed<T>(&self, at: usize, why: impl Into<String>) -> Result<T, HeaderError> {
        Err(HeaderError::Malformed {
            at,
            why: why.into(),
        })
    }

    /// Reads one element header at `pos`; returns its tag, where its value starts and
    /// where the next element starts. A value of undefined length is walked.
    fn element(&mut self, pos: usize, end: usize) -> Result<(Tag, usize, usize), HeaderError> {
        self.element_at(pos, end, 0)
    }

    fn element_at(
        &self,
        pos: usize,
        end: usize,
        depth: usize,
    ) -> Result<(Tag, usize, usize), HeaderError> {
        let b = self.bytes;
        if end - pos < 8 {
            return self.malformed(pos, "element header cut short");
        }
        let tag = Tag(read_u16(b, pos), read_u16(b, pos + 2));
        let (vr, len, value) = if self.explicit && tag.0 != 0xFFFE {
            let vr = VR::from_binary([b[pos + 4], b[pos + 5]]);
            let long = matches!(
                vr,
                Some(
                    VR::OB
                        | VR::OD
                        | VR::OF
                        | VR::OL
                        | VR::OV
                        | VR::OW
                        | VR::SQ
                        | VR::SV
                        | VR::UC
                        | VR::UN
                        | VR::UR
                        | VR::UT
                        | VR::UV
                )
            );
            if vr.is_none() {
                return self.malformed(pos, "unknown value representation");
            }
            if long {
                if end - pos < 12 {
                    return self.malformed(pos, "element header cut short");
                }
                (vr, read_u32(b, pos + 8), pos + 12)
            } else {
                (vr, u32::from(read_u16(b, pos + 6)), pos + 8)
            }
        } else {
            let vr = match StandardDataDictionary.by_tag(tag).map(|e| e.vr()) {
                Some(VirtualVr::Exact(vr)) => Some(vr),
                _ => None,
            };
            (vr, read_u32(b, pos + 4), pos + 8)
        };
        let sequence =
            vr == Some(VR::SQ) || (self.explicit && vr == Some(VR::UN) && len == UNDEFINED);
        if len == UNDEFINED {
            if tag == tags::PIXEL_DATA {
                // Encapsulated pixel data ends the header; its caller stops here.
                return Ok((tag, value, end));
            }
            if !sequence && self.explicit {
                return self.malformed(pos, "undefined length on a non-sequence element");
            }
            if self.explicit && vr == Some(VR::UN) {
                return self.malformed(pos, "undefined-length UN element");
            }
            let next = self.items(value, end, None, depth + 1)?;
            return Ok((tag, value, next));
        }
        let len = len as usize;
        if len > end - value {
            return self.malformed(
                pos,
                format!("element claims {len} bytes, {} remain", end - value),
            );
        }
        if sequence {
            self.items(value, value + len, Some(value + len), depth + 1)?;
        }
        Ok((tag, value, value + len))
    }

    /// Walks the items of a sequence from `pos`; `defined_end` is the end of a
    /// defined-length sequence, else it ends at its delimiter.
    fn items(
        &self,
        mut pos: usize,
        end: usize,
        defined_end: Option<usize>,
        depth: usize,
    ) -> Result<usize, HeaderError> {
        if depth > MAX_DEPTH {
            return self.malformed(pos, "sequences nested too deeply");
        }
        let b = self.bytes;
        loop {
            if Some(pos) == defined_end {
                return Ok(pos);
            }
            if end - pos < 8 {
                return self.malformed(pos, "sequence cut short");
            }
            let tag = Tag(read_u16(b, pos), read_u16(b, pos + 2));
            let len = read_u32(b, pos + 4);
            match tag {
                SEQUENCE_END if defined_end.is_none() => return Ok(pos + 8),
                ITEM if len == UNDEFINED => match self.elements(pos + 8, end, depth, false)? {
                    (at, Stop::ItemEnd) => pos = at,
                    (at, _) => return self.malformed(at, "item without its delimiter"),
                },
                ITEM => {
                    let len = len as usize;
                    if len > end - (pos + 8) {
                        return self.malformed(pos, format!("item claims {len} bytes"));
                    }
                    match self.elements(pos + 8, pos + 8 + len, depth, false)? {
                        (at, Stop::End) => pos = at,
                        (at, _) => return self.malformed(at, "unexpected delimiter in an item"),
                    }
                }
                _ => return self.malformed(pos, "expected a sequence item"),
            }
        }
    }

    /// Walks elements from `pos` to `end`, an item delimiter, or (at the top level)
    /// Pixel Data; returns where it stopped.
    fn elements(
        &self,
        mut pos: usize,
        end: usize,
        depth: usize,
        top: bool,
    ) -> Result<(usize, Stop), HeaderError> {
        while pos < end {
            if end - pos >= 4 {
                let tag = Tag(read_u16(self.bytes, pos), read_u16(self.bytes, pos + 2));
                if top && tag == tags::PIXEL_DATA {
                    return Ok((pos, Stop::PixelData));
                }
                if !top && tag == ITEM_END {
                    return Ok((pos + 8, Stop::ItemEnd));
                }
            }
            let (_, _, next) = self.element_at(pos, end, depth)?;
            pos = next;
        }
        Ok((pos, Stop::End))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part10(dataset: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        let ts = b"1.2.840.10008.1.2.1\0";
        let mut meta = Vec::new();
        meta.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        meta.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        meta.extend_from_slice(ts);
        out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(dataset);
        out
    }

    #[test]
    fn a_huge_claimed_length_is_refused_before_parsing() {
        // (0008,0016) UT with a claimed length of 4 GB - 2 and six bytes present.
        let mut ds = vec![0x08, 0x00, 0x16, 0x00, b'U', b'T', 0, 0];
        ds.extend_from_slice(&0xFFFF_FFFEu32.to_le_bytes());
        ds.extend_from_slice(b"abcdef");
        let err = read_source(&part10(&ds)).unwrap_err();
        assert!(matches!(err, HeaderError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("claims"), "{err}");
    }

    #[test]
    fn nested_items_are_checked_too() {
        // (0008,1115) SQ undefined length, one item of undefined length holding an
        // element that claims more than there is.
        let mut ds = vec![
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        ds.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, b'U', b'I', 0xFF, 0x7F]);
        let err = read_source(&part10(&ds)).unwrap_err();
        assert!(err.to_string().contains("claims"), "{err}");
        assert!(matches!(
            read_source(b"not dicom"),
            Err(HeaderError::NotPart10)
        ));
    }
}
