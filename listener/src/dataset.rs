//! A bounded, zero-copy scanner for received datasets.
//!
//! The listener needs a handful of attributes from each instance (the UIDs that form its
//! store key, the modality and a few counts for series assembly), and it must get them
//! from bytes that arrived from the network. Parsing the whole dataset with a general
//! DICOM reader would trust every claimed element length (dicom-object allocates a claimed
//! length before reading it), so this module walks the element headers itself:
//!
//! - every claimed length is checked against the bytes that remain before it is used, and
//!   nothing is ever allocated from a claimed length;
//! - sequences and items of undefined length are walked item by item, up to a nesting
//!   limit, so a malformed nesting cannot recurse without bound;
//! - scanning stops at the top-level Pixel Data element: everything the listener needs
//!   comes before it;
//! - deflated datasets are inflated into a buffer of bounded size first.
//!
//! Only top-level attributes are extracted, and no patient demographics are read at all.

use crate::pixels::{PixelError, PixelRules, is_encapsulated_syntax};
use std::fmt;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::sop_classes::{
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};

/// The attributes of a received instance that the listener uses. No patient demographics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceFacts {
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: String,
    /// SOP Instance UID (0008,0018): the last part of the store key.
    pub sop_instance_uid: String,
    /// Study Instance UID (0020,000D).
    pub study_uid: String,
    /// Series Instance UID (0020,000E): the unit of series assembly.
    pub series_uid: String,
    /// Modality (0008,0060), e.g. `CT`; absent or malformed values give `None`.
    pub modality: Option<String>,
    /// Number of Frames (0028,0008), for multi-frame objects.
    pub number_of_frames: Option<u32>,
    /// Images in Acquisition (0020,1002): a hint of the expected series size.
    pub images_in_acquisition: Option<u32>,
    /// Number of Series Related Instances (0020,1209): another completeness hint.
    pub number_of_series_related_instances: Option<u32>,
    /// Series Number (0020,0011).
    pub series_number: Option<i32>,
}

/// Why a dataset could not be scanned. Messages name tags and byte offsets, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// The dataset ended inside an element header.
    #[error("dataset is truncated: an element header at byte {offset} is incomplete")]
    TruncatedHeader {
        /// Offset of the incomplete header.
        offset: usize,
    },
    /// An element claims more bytes than remain in the dataset.
    #[error(
        "element {tag} at byte {offset} claims {length} bytes but only {remaining} remain in the dataset"
    )]
    LengthBeyondEnd {
        /// The element's tag.
        tag: TagDisplay,
        /// Offset of the element header.
        offset: usize,
        /// The claimed value length.
        length: u32,
        /// Bytes actually left after the header.
        remaining: usize,
    },
    /// An explicit VR that is not one of the DICOM value representations.
    #[error("element {tag} at byte {offset} has an invalid value representation")]
    InvalidVr {
        /// The element's tag.
        tag: TagDisplay,
        /// Offset of the element header.
        offset: usize,
    },
    /// Undefined length on an element that cannot have one.
    #[error("element {tag} at byte {offset} has an undefined length but is not a sequence")]
    UnexpectedUndefinedLength {
        /// The element's tag.
        tag: TagDisplay,
        /// Offset of the element header.
        offset: usize,
    },
    /// An item or delimiter where a data element was expected, or the reverse.
    #[error("unexpected {tag} at byte {offset}: the sequence/item structure is malformed")]
    MalformedStructure {
        /// The tag found.
        tag: TagDisplay,
        /// Its offset.
        offset: usize,
    },
    /// Sequences nested deeper than the scanner allows.
    #[error("sequences are nested deeper than {MAX_DEPTH} levels")]
    NestingTooDeep,
    /// A required attribute is absent.
    #[error("required attribute {0} is missing")]
    MissingAttribute(&'static str),
    /// A UID attribute that cannot be used as a store key.
    #[error("attribute {0} is not a valid UID (it must be 1 to 64 characters of digits and '.')")]
    InvalidUid(&'static str),
    /// The transfer syntax is not one whose dataset encoding the scanner knows.
    #[error("transfer syntax {0} is not supported by the dataset scanner")]
    UnsupportedTransferSyntax(String),
    /// A deflated dataset could not be inflated.
    #[error("deflated dataset could not be inflated: {0}")]
    Inflate(String),
    /// The Pixel Data cannot be what the image attributes and the transfer syntax say.
    #[error("{0}")]
    Pixels(#[from] PixelError),
}

/// A tag printed as `(gggg,eeee)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagDisplay(pub u16, pub u16);

impl fmt::Display for TagDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:04X},{:04X})", self.0, self.1)
    }
}

/// Deepest sequence nesting walked before the dataset is refused.
pub const MAX_DEPTH: usize = 32;

/// Most bytes a deflated dataset is inflated to for scanning. The attributes the listener
/// needs sit at the start of a dataset; beyond this the scan uses what it has.
pub const MAX_INFLATED_BYTES: usize = 64 * 1024 * 1024;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_DELIMITATION: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_DELIMITATION: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);

const SOP_CLASS_UID: (u16, u16) = (0x0008, 0x0016);
const SOP_INSTANCE_UID: (u16, u16) = (0x0008, 0x0018);
const MODALITY: (u16, u16) = (0x0008, 0x0060);
const STUDY_INSTANCE_UID: (u16, u16) = (0x0020, 0x000D);
const SERIES_INSTANCE_UID: (u16, u16) = (0x0020, 0x000E);
const SERIES_NUMBER: (u16, u16) = (0x0020, 0x0011);
const IMAGES_IN_ACQUISITION: (u16, u16) = (0x0020, 0x1002);
const NUMBER_OF_SERIES_RELATED_INSTANCES: (u16, u16) = (0x0020, 0x1209);
const NUMBER_OF_FRAMES: (u16, u16) = (0x0028, 0x0008);
const SAMPLES_PER_PIXEL: (u16, u16) = (0x0028, 0x0002);
const PHOTOMETRIC_INTERPRETATION: (u16, u16) = (0x0028, 0x0004);
const ROWS: (u16, u16) = (0x0028, 0x0010);
const COLUMNS: (u16, u16) = (0x0028, 0x0011);
const BITS_ALLOCATED: (u16, u16) = (0x0028, 0x0100);

/// How a dataset's elements are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Encoding {
    explicit_vr: bool,
    big_endian: bool,
}

const IMPLICIT_LE: Encoding = Encoding {
    explicit_vr: false,
    big_endian: false,
};

impl Encoding {
    /// The dataset encoding of a transfer syntax. Every encapsulated (compressed) syntax
    /// uses explicit VR little endian outside the pixel data.
    fn of(ts_uid: &str) -> Result<(Encoding, bool), ScanError> {
        let ts = ts_uid.trim_end_matches(['\0', ' ']);
        let explicit_le = Encoding {
            explicit_vr: true,
            big_endian: false,
        };
        match ts {
            IMPLICIT_VR_LITTLE_ENDIAN => Ok((IMPLICIT_LE, false)),
            EXPLICIT_VR_BIG_ENDIAN => Ok((
                Encoding {
                    explicit_vr: true,
                    big_endian: true,
                },
                false,
            )),
            DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN => Ok((explicit_le, true)),
            _ if ts.starts_with("1.2.840.10008.1.2.") && crate::dataset::is_valid_uid(ts) => {
                Ok((explicit_le, false))
            }
            _ => Err(ScanError::UnsupportedTransferSyntax(ts.to_string())),
        }
    }
}

/// A header read from the dataset.
struct Header {
    tag: (u16, u16),
    vr: Option<[u8; 2]>,
    length: u32,
    offset: usize,
}

/// A read position over the dataset bytes.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    enc: Encoding,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, offset: usize) -> Result<&'a [u8], ScanError> {
        if self.remaining() < n {
            return Err(ScanError::TruncatedHeader { offset });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self, offset: usize) -> Result<u16, ScanError> {
        let b = self.take(2, offset)?;
        let b = [b[0], b[1]];
        Ok(if self.enc.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self, offset: usize) -> Result<u32, ScanError> {
        let b = self.take(4, offset)?;
        let b = [b[0], b[1], b[2], b[3]];
        Ok(if self.enc.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// Read an element, item or delimiter header.
    fn header(&mut self) -> Result<Header, ScanError> {
        let offset = self.pos;
        let group = self.u16(offset)?;
        let element = self.u16(offset)?;
        let tag = (group, element);
        if group == 0xFFFE || !self.enc.explicit_vr {
            // Items and delimiters never carry a VR; implicit VR elements neither.
            let length = self.u32(offset)?;
            return Ok(Header {
                tag,
                vr: None,
                length,
                offset,
            });
        }
        let vr_bytes = self.take(2, offset)?;
        let vr = [vr_bytes[0], vr_bytes[1]];
        if !is_known_vr(vr) {
            return Err(ScanError::InvalidVr {
                tag: TagDisplay(group, element),
                offset,
            });
        }
        let length = if has_long_length(vr) {
            self.take(2, offset)?; // reserved
            self.u32(offset)?
        } else {
            u32::from(self.u16(offset)?)
        };
        Ok(Header {
            tag,
            vr: Some(vr),
            length,
            offset,
        })
    }

    /// Take a defined-length value, checking the claim against the bytes that remain.
    fn value(&mut self, h: &Header) -> Result<&'a [u8], ScanError> {
        let remaining = self.remaining();
        if h.length as usize > remaining {
            return Err(ScanError::LengthBeyondEnd {
                tag: TagDisplay(h.tag.0, h.tag.1),
                offset: h.offset,
                length: h.length,
                remaining,
            });
        }
        let s = &self.data[self.pos..self.pos + h.length as usize];
        self.pos += h.length as usize;
        Ok(s)
    }
}

/// One of the value representations of the standard (PS3.5 Table 6.2-1).
fn is_known_vr(vr: [u8; 2]) -> bool {
    dicom_core::VR::from_binary(vr).is_some()
}

/// VRs whose explicit encoding has two reserved bytes and a 32-bit length.
pub(crate) fn has_long_length(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// Attributes seen so far at the top level.
#[derive(Default)]
struct Collected<'a> {
    sop_class_uid: Option<&'a [u8]>,
    sop_instance_uid: Option<&'a [u8]>,
    study_uid: Option<&'a [u8]>,
    series_uid: Option<&'a [u8]>,
    modality: Option<&'a [u8]>,
    number_of_frames: Option<&'a [u8]>,
    images_in_acquisition: Option<&'a [u8]>,
    number_of_series_related_instances: Option<&'a [u8]>,
    series_number: Option<&'a [u8]>,
    samples_per_pixel: Option<&'a [u8]>,
    photometric: Option<&'a [u8]>,
    rows: Option<&'a [u8]>,
    columns: Option<&'a [u8]>,
    bits_allocated: Option<&'a [u8]>,
    /// Where the top-level walk stopped: the start of the element it could not finish,
    /// or the end of the data.
    resume: usize,
    /// Whether the walk got to the end of the top-level Pixel Data element.
    pixel_done: bool,
}

impl<'a> Collected<'a> {
    fn offer(&mut self, tag: (u16, u16), value: &'a [u8]) {
        let slot = match tag {
            SOP_CLASS_UID => &mut self.sop_class_uid,
            SOP_INSTANCE_UID => &mut self.sop_instance_uid,
            STUDY_INSTANCE_UID => &mut self.study_uid,
            SERIES_INSTANCE_UID => &mut self.series_uid,
            MODALITY => &mut self.modality,
            NUMBER_OF_FRAMES => &mut self.number_of_frames,
            IMAGES_IN_ACQUISITION => &mut self.images_in_acquisition,
            NUMBER_OF_SERIES_RELATED_INSTANCES => &mut self.number_of_series_related_instances,
            SERIES_NUMBER => &mut self.series_number,
            SAMPLES_PER_PIXEL => &mut self.samples_per_pixel,
            PHOTOMETRIC_INTERPRETATION => &mut self.photometric,
            ROWS => &mut self.rows,
            COLUMNS => &mut self.columns,
            BITS_ALLOCATED => &mut self.bits_allocated,
            _ => return,
        };
        slot.get_or_insert(value);
    }

    fn has_required(&self) -> bool {
        self.sop_class_uid.is_some()
            && self.sop_instance_uid.is_some()
            && self.study_uid.is_some()
            && self.series_uid.is_some()
    }

    /// The rules the Pixel Data must follow, from the attributes seen so far.
    fn pixel_rules(&self, enc: Encoding, ts_uid: &str) -> PixelRules {
        let mut rules = PixelRules {
            encapsulated_syntax: is_encapsulated_syntax(ts_uid),
            transfer_syntax: ts_uid.trim_end_matches(['\0', ' ']).to_string(),
            ..Default::default()
        };
        for (tag, value) in [
            (SAMPLES_PER_PIXEL, self.samples_per_pixel),
            (PHOTOMETRIC_INTERPRETATION, self.photometric),
            (ROWS, self.rows),
            (COLUMNS, self.columns),
            (BITS_ALLOCATED, self.bits_allocated),
            (NUMBER_OF_FRAMES, self.number_of_frames),
        ] {
            if let Some(value) = value {
                offer_pixel_attribute(&mut rules, tag, value, enc);
            }
        }
        rules
    }

    fn into_facts(self) -> Result<InstanceFacts, ScanError> {
        let uid = |v: Option<&[u8]>, name: &'static str| -> Result<String, ScanError> {
            let v = v.ok_or(ScanError::MissingAttribute(name))?;
            parse_uid(v).ok_or(ScanError::InvalidUid(name))
        };
        Ok(InstanceFacts {
            sop_class_uid: uid(self.sop_class_uid, "SOP Class UID (0008,0016)")?,
            sop_instance_uid: uid(self.sop_instance_uid, "SOP Instance UID (0008,0018)")?,
            study_uid: uid(self.study_uid, "Study Instance UID (0020,000D)")?,
            series_uid: uid(self.series_uid, "Series Instance UID (0020,000E)")?,
            modality: self.modality.and_then(parse_code_string),
            number_of_frames: self.number_of_frames.and_then(parse_integer_string),
            images_in_acquisition: self.images_in_acquisition.and_then(parse_integer_string),
            number_of_series_related_instances: self
                .number_of_series_related_instances
                .and_then(parse_integer_string),
            series_number: self.series_number.and_then(parse_integer_string),
        })
    }
}

/// The image attributes that size the pixel data.
const PIXEL_ATTRIBUTES: [(u16, u16); 6] = [
    SAMPLES_PER_PIXEL,
    PHOTOMETRIC_INTERPRETATION,
    ROWS,
    COLUMNS,
    BITS_ALLOCATED,
    NUMBER_OF_FRAMES,
];

/// Record one of the [`PIXEL_ATTRIBUTES`] in `rules`.
fn offer_pixel_attribute(rules: &mut PixelRules, tag: (u16, u16), value: &[u8], enc: Encoding) {
    let us = || -> Option<u16> {
        let b: [u8; 2] = value.try_into().ok()?;
        Some(if enc.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    match tag {
        SAMPLES_PER_PIXEL => rules.samples = us(),
        ROWS => rules.rows = us(),
        COLUMNS => rules.columns = us(),
        BITS_ALLOCATED => rules.bits_allocated = us(),
        NUMBER_OF_FRAMES => {
            let frames = parse_integer_string::<u64>(value).filter(|&f| f > 0);
            rules.frames = frames;
            rules.frames_invalid = frames.is_none();
        }
        PHOTOMETRIC_INTERPRETATION => {
            rules.subsampled_422 = parse_code_string(value).is_some_and(|p| p.ends_with("_422"));
        }
        _ => {}
    }
}

/// Scan a dataset (without File Meta group) encoded in transfer syntax `ts_uid`.
///
/// Checks the element structure up to the top-level Pixel Data element and returns the
/// listener's facts. Fails on truncation, lengths beyond the data, malformed nesting,
/// missing or unusable UIDs. Never panics and never allocates from a claimed length.
pub fn scan(dataset: &[u8], ts_uid: &str) -> Result<InstanceFacts, ScanError> {
    let (enc, deflated) = Encoding::of(ts_uid)?;
    if deflated {
        let (inflated, complete) = inflate_bounded(dataset, MAX_INFLATED_BYTES)?;
        return scan_encoded(&inflated, enc, ts_uid, complete).map(|s| s.facts);
    }
    scan_encoded(dataset, enc, ts_uid, true).map(|s| s.facts)
}

/// Scan the first bytes of a dataset whose remainder has not arrived yet (a large
/// instance written to the store in parts as it arrives).
///
/// The structure is checked as far as the prefix goes; the prefix may end anywhere
/// after the attributes the listener needs (normally inside the Pixel Data element).
/// Fails like [`scan`] when the structure is broken or the required attributes are not
/// within the prefix.
pub fn scan_prefix(prefix: &[u8], ts_uid: &str) -> Result<(InstanceFacts, TailCheck), ScanError> {
    let (enc, deflated) = Encoding::of(ts_uid)?;
    if deflated {
        let inflated = inflate_prefix(prefix, MAX_INFLATED_BYTES)?;
        let scanned = scan_encoded(&inflated, enc, ts_uid, false)?;
        return Ok((scanned.facts, TailCheck::unchecked(enc)));
    }
    let scanned = scan_encoded(prefix, enc, ts_uid, false)?;
    if scanned.pixel_done {
        // The prefix held the whole pixel data: nothing after it is judged.
        return Ok((scanned.facts, TailCheck::unchecked(enc)));
    }
    let mut tail = TailCheck::at(enc, scanned.resume as u64, scanned.rules);
    tail.feed(&prefix[scanned.resume..]);
    Ok((scanned.facts, tail))
}
/// Inflate the start of a raw deflate stream whose end may be missing.
fn inflate_prefix(data: &[u8], cap: usize) -> Result<Vec<u8>, ScanError> {
    let mut decompress = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(data.len().saturating_mul(3).min(cap).min(1 << 20));
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let consumed = decompress.total_in() as usize;
        let before = decompress.total_out();
        let room = (cap - out.len()).min(chunk.len());
        if room == 0 {
            return Ok(out);
        }
        let status = decompress
            .decompress(
                &data[consumed..],
                &mut chunk[..room],
                flate2::FlushDecompress::None,
            )
            .map_err(|e| ScanError::Inflate(e.to_string()))?;
        let produced = (decompress.total_out() - before) as usize;
        out.extend_from_slice(&chunk[..produced]);
        let no_progress = produced == 0 && decompress.total_in() as usize == consumed;
        if status == flate2::Status::StreamEnd || no_progress {
            return Ok(out);
        }
    }
}

/// What a scan found.
struct Scanned {
    facts: InstanceFacts,
    /// Where the top-level walk stopped (see `Collected::resume`).
    resume: usize,
    /// Whether the walk got through the pixel data.
    pixel_done: bool,
    /// The rules of the pixel data, for what follows the prefix.
    rules: PixelRules,
}

fn scan_encoded(
    data: &[u8],
    enc: Encoding,
    ts_uid: &str,
    complete: bool,
) -> Result<Scanned, ScanError> {
    let mut reader = Reader { data, pos: 0, enc };
    let mut collected = Collected::default();
    match walk_top_level(&mut reader, &mut collected, ts_uid, complete) {
        Ok(()) => {}
        // A prefix may end anywhere; what was found before the cut still counts.
        Err(ScanError::TruncatedHeader { .. } | ScanError::LengthBeyondEnd { .. })
            if !complete && collected.has_required() => {}
        Err(e) => return Err(e),
    }
    let (resume, pixel_done) = (collected.resume, collected.pixel_done);
    let rules = collected.pixel_rules(enc, ts_uid);
    Ok(Scanned {
        facts: collected.into_facts()?,
        resume,
        pixel_done,
        rules,
    })
}

/// Follows the top level of a streamed dataset from where [`scan_prefix`] stopped, part
/// by part and without keeping its bytes, so that its end can be judged: a dataset cut
/// inside an element (most often its pixel data, native or encapsulated) or inside an
/// element header is refused like one received whole. Top-level sequences of undefined
/// length after that point, and deflated datasets, are not followed.
#[derive(Debug, Clone)]
pub struct TailCheck {
    enc: Encoding,
    state: Tail,
    /// Header bytes collected so far.
    header: Vec<u8>,
    /// Dataset offset of the next byte fed.
    offset: u64,
    /// The element whose value is being skipped: tag, header offset, length.
    current: ((u16, u16), u64, u32),
    /// What the pixel data must be: the image attributes of the prefix, completed by
    /// those that follow it.
    rules: PixelRules,
    /// Items of encapsulated pixel data seen (the first is the Basic Offset Table).
    items: u64,
    /// Whether the value being skipped is one of the image attributes, kept in `kept`
    /// (a few bytes at most).
    keeping: bool,
    kept: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tail {
    /// Expecting a top-level element header.
    Element,
    /// Inside a value; then back to `fragments` or top-level elements.
    Skip { left: u64, fragments: bool },
    /// Expecting an item or the sequence delimiter of encapsulated pixel data.
    Fragment,
    /// Not followed any further: no verdict.
    Unchecked,
    /// The structure is broken here.
    Broken(ScanError),
}

impl TailCheck {
    fn at(enc: Encoding, offset: u64, rules: PixelRules) -> Self {
        Self {
            enc,
            state: Tail::Element,
            header: Vec::with_capacity(12),
            offset,
            current: ((0, 0), 0, 0),
            rules,
            items: 0,
            keeping: false,
            kept: Vec::new(),
        }
    }

    fn unchecked(enc: Encoding) -> Self {
        Self {
            state: Tail::Unchecked,
            ..Self::at(enc, 0, PixelRules::default())
        }
    }

    /// The pixel data header, judged by the image attributes of the prefix and the tail.
    fn judge_pixel_header(&self, length: u32) -> Result<(), ScanError> {
        self.rules
            .check_header((length != UNDEFINED).then_some(length))
            .map_err(ScanError::from)
    }

    /// Whether the fragments seen are enough for the frames.
    fn judge_fragments(&self) -> Result<(), ScanError> {
        self.rules
            .check_fragments(self.items.saturating_sub(1))
            .map_err(ScanError::from)
    }

    /// Follows the next bytes of the dataset.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                Tail::Unchecked | Tail::Broken(_) => return,
                Tail::Skip { left, fragments } => {
                    let n = left.min(bytes.len() as u64);
                    if self.keeping {
                        self.kept.extend_from_slice(&bytes[..n as usize]);
                    }
                    bytes = &bytes[n as usize..];
                    self.offset += n;
                    self.state = if n == left {
                        if fragments {
                            Tail::Fragment
                        } else if self.current.0 == PIXEL_DATA {
                            // As for a dataset received whole, what follows the pixel
                            // data is not judged.
                            Tail::Unchecked
                        } else {
                            if self.keeping {
                                let kept = std::mem::take(&mut self.kept);
                                offer_pixel_attribute(
                                    &mut self.rules,
                                    self.current.0,
                                    &kept,
                                    self.enc,
                                );
                            }
                            Tail::Element
                        }
                    } else {
                        Tail::Skip {
                            left: left - n,
                            fragments,
                        }
                    };
                }
                Tail::Element | Tail::Fragment => {
                    let want = self.header_len();
                    let n = (want - self.header.len()).min(bytes.len());
                    self.header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.header.len() == self.header_len() {
                        self.offset += self.header.len() as u64;
                        self.state = self.next_after_header();
                        self.header.clear();
                    }
                }
            }
        }
    }

    /// Bytes of the header being read: 8, or 12 for an explicit VR with a 32-bit
    /// length (known once the VR is in).
    fn header_len(&self) -> usize {
        if self.header.len() < 8 || self.state == Tail::Fragment || !self.enc.explicit_vr {
            return 8;
        }
        let group = self.reader().u16(0).unwrap_or(0);
        if group != 0xFFFE && has_long_length([self.header[4], self.header[5]]) {
            12
        } else {
            8
        }
    }

    /// A reader over the collected header bytes.
    fn reader(&self) -> Reader<'_> {
        Reader {
            data: &self.header,
            pos: 0,
            enc: self.enc,
        }
    }

    /// The state after a complete header (`self.offset` is already past it), read by
    /// the same code as a dataset received whole.
    fn next_after_header(&mut self) -> Tail {
        let at = self.offset - self.header.len() as u64;
        let mut r = self.reader();
        let read = if self.state == Tail::Fragment {
            item_header(&mut r)
        } else {
            r.header()
        };
        let h = match read {
            Ok(h) => h,
            Err(ScanError::InvalidVr { tag, .. }) => {
                return Tail::Broken(ScanError::InvalidVr {
                    tag,
                    offset: at as usize,
                });
            }
            Err(e) => return Tail::Broken(e),
        };
        let malformed = Tail::Broken(ScanError::MalformedStructure {
            tag: TagDisplay(h.tag.0, h.tag.1),
            offset: at as usize,
        });
        let fragments = self.state == Tail::Fragment;
        if h.tag == PIXEL_DATA
            && !fragments
            && let Err(e) = self.judge_pixel_header(h.length)
        {
            return Tail::Broken(e);
        }
        match h.tag {
            SEQUENCE_DELIMITATION if fragments => {
                return match self.judge_fragments() {
                    Ok(()) => Tail::Unchecked,
                    Err(e) => Tail::Broken(e),
                };
            }
            ITEM if fragments && h.length != UNDEFINED => self.items += 1,
            _ if fragments || h.tag.0 == 0xFFFE => return malformed,
            PIXEL_DATA if h.length == UNDEFINED => return Tail::Fragment,
            _ if h.length == UNDEFINED => return Tail::Unchecked,
            _ => {}
        }
        self.current = (h.tag, at, h.length);
        // A longer value is not one these attributes can have: it is left unread and
        // the attribute counts as absent.
        self.keeping = PIXEL_ATTRIBUTES.contains(&h.tag) && h.length <= 64;
        self.kept.clear();
        if self.keeping && h.length == 0 {
            offer_pixel_attribute(&mut self.rules, h.tag, &[], self.enc);
            return Tail::Element;
        }
        Tail::Skip {
            left: u64::from(h.length),
            fragments,
        }
    }

    /// Whether the dataset ended where an element could end.
    pub fn finish(&self) -> Result<(), ScanError> {
        let at = self.offset as usize;
        match &self.state {
            Tail::Unchecked => Ok(()),
            Tail::Broken(e) => Err(e.clone()),
            // A missing delimiter after the last whole fragment is taken, as it is
            // when the dataset is received whole.
            Tail::Fragment if self.header.is_empty() => self.judge_fragments(),
            Tail::Element if self.header.is_empty() => Ok(()),
            Tail::Element | Tail::Fragment => Err(ScanError::TruncatedHeader {
                offset: at - self.header.len(),
            }),
            Tail::Skip { left, .. } => {
                let (tag, offset, length) = self.current;
                Err(ScanError::LengthBeyondEnd {
                    tag: TagDisplay(tag.0, tag.1),
                    offset: offset as usize,
                    length,
                    remaining: (u64::from(length) - left) as usize,
                })
            }
        }
    }
}

/// Walks the top level up to the end of the Pixel Data element (what follows it is not
/// judged). `complete` says whether `r` holds the whole dataset or only its start.
fn walk_top_level<'a>(
    r: &mut Reader<'a>,
    out: &mut Collected<'a>,
    ts_uid: &str,
    complete: bool,
) -> Result<(), ScanError> {
    while r.remaining() > 0 {
        out.resume = r.pos;
        let h = r.header()?;
        if h.tag.0 == 0xFFFE {
            return Err(malformed(&h));
        }
        if h.tag == PIXEL_DATA {
            // Everything needed precedes the pixel data; it must still be whole: a
            // native value fits, encapsulated fragments fit and end, and both are what
            // the image attributes and the transfer syntax say.
            let rules = out.pixel_rules(r.enc, ts_uid);
            rules.check_header((h.length != UNDEFINED).then_some(h.length))?;
            if h.length != UNDEFINED {
                r.value(&h)?;
            } else {
                let fragments = skip_fragments(r, complete)?;
                rules.check_fragments(fragments)?;
            }
            out.resume = r.pos;
            out.pixel_done = true;
            return Ok(());
        }
        if h.length == UNDEFINED {
            skip_undefined(r, &h, 0)?;
        } else {
            let start = r.pos;
            let value = r.value(&h)?;
            if h.vr == Some(*b"SQ") {
                walk_defined_items(r, start, 1)?;
            }
            out.offer(h.tag, value);
        }
    }
    out.resume = r.pos;
    Ok(())
}

/// Walk the items of a defined-length sequence whose value ends where `r` is now and
/// began at `start`: every item must fit the sequence and its elements the item.
fn walk_defined_items(r: &Reader<'_>, start: usize, depth: usize) -> Result<(), ScanError> {
    if depth > MAX_DEPTH {
        return Err(ScanError::NestingTooDeep);
    }
    let mut items = Reader {
        data: &r.data[..r.pos],
        pos: start,
        enc: r.enc,
    };
    while items.remaining() > 0 {
        let h = item_header(&mut items)?;
        match h.tag {
            ITEM if h.length == UNDEFINED => skip_item_content(&mut items, depth)?,
            ITEM => {
                let begin = items.pos;
                items.value(&h)?;
                walk_defined_item(&items, begin, depth)?;
            }
            _ => return Err(malformed(&h)),
        }
    }
    Ok(())
}

/// Walk the elements of a defined-length item whose value ends where `r` is now.
fn walk_defined_item(r: &Reader<'_>, start: usize, depth: usize) -> Result<(), ScanError> {
    let mut elements = Reader {
        data: &r.data[..r.pos],
        pos: start,
        enc: r.enc,
    };
    while elements.remaining() > 0 {
        let h = elements.header()?;
        match h.tag {
            (0xFFFE, _) => return Err(malformed(&h)),
            _ if h.length == UNDEFINED => skip_undefined(&mut elements, &h, depth)?,
            _ => {
                let begin = elements.pos;
                elements.value(&h)?;
                if h.vr == Some(*b"SQ") {
                    walk_defined_items(&elements, begin, depth + 1)?;
                }
            }
        }
    }
    Ok(())
}

/// Skip the value of an element whose length is undefined: a sequence, a UN sequence
/// (whose items are implicit VR little endian) or encapsulated pixel data.
fn skip_undefined(r: &mut Reader<'_>, h: &Header, depth: usize) -> Result<(), ScanError> {
    let Some(vr) = h.vr else {
        return skip_items(r, depth + 1);
    };
    match &vr {
        b"SQ" => skip_items(r, depth + 1),
        b"UN" => {
            let outer = r.enc;
            r.enc = IMPLICIT_LE;
            let result = skip_items(r, depth + 1);
            r.enc = outer;
            result
        }
        b"OB" | b"OW" if h.tag == PIXEL_DATA => skip_items(r, depth + 1),
        _ => Err(ScanError::UnexpectedUndefinedLength {
            tag: TagDisplay(h.tag.0, h.tag.1),
            offset: h.offset,
        }),
    }
}

/// Walk the fragments of encapsulated pixel data up to their sequence delimiter. A
/// complete dataset that ends after a whole fragment but without the delimiter is
/// taken as it is, as other readers take it.
///
/// Returns the number of fragments: the items after the Basic Offset Table.
fn skip_fragments(r: &mut Reader<'_>, complete: bool) -> Result<u64, ScanError> {
    let mut items = 0u64;
    loop {
        if r.remaining() == 0 {
            return if complete {
                Ok(items.saturating_sub(1))
            } else {
                Err(ScanError::TruncatedHeader { offset: r.pos })
            };
        }
        let h = item_header(r)?;
        match h.tag {
            SEQUENCE_DELIMITATION => return Ok(items.saturating_sub(1)),
            ITEM if h.length != UNDEFINED => {
                r.value(&h)?;
                items += 1;
            }
            _ => return Err(malformed(&h)),
        }
    }
}

/// Walk the items of an undefined-length sequence up to its delimiter.
fn skip_items(r: &mut Reader<'_>, depth: usize) -> Result<(), ScanError> {
    if depth > MAX_DEPTH {
        return Err(ScanError::NestingTooDeep);
    }
    loop {
        let h = item_header(r)?;
        match h.tag {
            SEQUENCE_DELIMITATION => return Ok(()),
            ITEM if h.length == UNDEFINED => skip_item_content(r, depth)?,
            ITEM => {
                let begin = r.pos;
                r.value(&h)?;
                walk_defined_item(r, begin, depth)?;
            }
            _ => return Err(malformed(&h)),
        }
    }
}

/// Walk the elements of an undefined-length item up to its delimiter.
fn skip_item_content(r: &mut Reader<'_>, depth: usize) -> Result<(), ScanError> {
    loop {
        let h = r.header()?;
        match h.tag {
            ITEM_DELIMITATION => return Ok(()),
            (0xFFFE, _) => return Err(malformed(&h)),
            _ if h.length == UNDEFINED => skip_undefined(r, &h, depth)?,
            _ => {
                let begin = r.pos;
                r.value(&h)?;
                if h.vr == Some(*b"SQ") {
                    walk_defined_items(r, begin, depth + 1)?;
                }
            }
        }
    }
}

/// Items and delimiters: a tag and a 32-bit length in every encoding.
fn item_header(r: &mut Reader<'_>) -> Result<Header, ScanError> {
    let offset = r.pos;
    let group = r.u16(offset)?;
    let element = r.u16(offset)?;
    let length = r.u32(offset)?;
    Ok(Header {
        tag: (group, element),
        vr: None,
        length,
        offset,
    })
}

fn malformed(h: &Header) -> ScanError {
    ScanError::MalformedStructure {
        tag: TagDisplay(h.tag.0, h.tag.1),
        offset: h.offset,
    }
}

/// Inflate a raw deflate stream, stopping at `cap` bytes. Returns the output and whether
/// the stream ended within the cap. Memory grows only with data actually produced.
fn inflate_bounded(data: &[u8], cap: usize) -> Result<(Vec<u8>, bool), ScanError> {
    let mut decoder = flate2::read::DeflateDecoder::new(data);
    let mut out = Vec::with_capacity(data.len().saturating_mul(3).min(cap).min(1 << 20));
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let room = cap - out.len();
        if room == 0 {
            return Ok((out, false));
        }
        let want = room.min(chunk.len());
        match decoder.read(&mut chunk[..want]) {
            Ok(0) => return Ok((out, true)),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ScanError::Inflate(e.to_string())),
        }
    }
}

/// Whether `uid` can be used as a UID and a store key: 1 to 64 characters, digits and '.'.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A UID value with its trailing NUL/space padding removed, if valid.
pub(crate) fn parse_uid(value: &[u8]) -> Option<String> {
    let end = value
        .iter()
        .rposition(|&b| b != 0 && b != b' ')
        .map_or(0, |p| p + 1);
    let s = std::str::from_utf8(&value[..end]).ok()?;
    is_valid_uid(s).then(|| s.to_string())
}

/// A code string (e.g. Modality), first value only, if it has the allowed characters.
fn parse_code_string(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?;
    let first = s.split('\\').next()?.trim_matches([' ', '\0']);
    let ok = !first.is_empty()
        && first.len() <= 16
        && first
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ' || b == b'_');
    ok.then(|| first.to_string())
}

/// An integer string (IS), first value only, if it parses into the target type.
fn parse_integer_string<T: TryFrom<i64>>(value: &[u8]) -> Option<T> {
    if value.len() > 64 {
        return None;
    }
    let s = std::str::from_utf8(value).ok()?;
    let first = s.split('\\').next()?.trim_matches([' ', '\0']);
    let n: i64 = first.parse().ok()?;
    T::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.70";

    /// Minimal element writer for test datasets.
    #[derive(Debug, Clone, Copy)]
    struct W {
        explicit: bool,
        be: bool,
    }

    impl W {
        fn u16(&self, out: &mut Vec<u8>, v: u16) {
            out.extend(if self.be {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        }
        fn u32(&self, out: &mut Vec<u8>, v: u32) {
            out.extend(if self.be {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        }
        fn header(&self, out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], len: u32) {
            self.u16(out, tag.0);
            self.u16(out, tag.1);
            if self.explicit {
                out.extend(vr);
                if has_long_length(*vr) {
                    out.extend([0, 0]);
                    self.u32(out, len);
                } else {
                    self.u16(out, len as u16);
                }
            } else {
                self.u32(out, len);
            }
        }
        fn elem(&self, out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], value: &[u8]) {
            let mut v = value.to_vec();
            if v.len() % 2 == 1 {
                v.push(if vr == b"UI" { 0 } else { b' ' });
            }
            self.header(out, tag, vr, v.len() as u32);
            out.extend(v);
        }
        fn item_tag(&self, out: &mut Vec<u8>, tag: (u16, u16), len: u32) {
            self.u16(out, tag.0);
            self.u16(out, tag.1);
            self.u32(out, len);
        }
    }

    /// A small dataset with a nested undefined-length sequence before the UIDs it needs.
    fn dataset(w: W, pixel: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        w.elem(&mut d, (0x0008, 0x0005), b"CS", b"ISO_IR 100");
        w.elem(&mut d, SOP_CLASS_UID, b"UI", CT.as_bytes());
        w.elem(&mut d, SOP_INSTANCE_UID, b"UI", b"1.2.3.4.5.6");
        w.elem(&mut d, MODALITY, b"CS", b"CT");
        // Referenced Image Sequence, undefined length, one undefined-length item holding
        // another undefined-length sequence.
        w.header(&mut d, (0x0008, 0x1140), b"SQ", UNDEFINED);
        w.item_tag(&mut d, ITEM, UNDEFINED);
        w.elem(&mut d, (0x0008, 0x1150), b"UI", CT.as_bytes());
        w.header(&mut d, (0x0008, 0x1199), b"SQ", UNDEFINED);
        w.item_tag(&mut d, ITEM, UNDEFINED);
        w.elem(&mut d, (0x0008, 0x1155), b"UI", b"9.9.9");
        w.item_tag(&mut d, ITEM_DELIMITATION, 0);
        w.item_tag(&mut d, SEQUENCE_DELIMITATION, 0);
        w.item_tag(&mut d, ITEM_DELIMITATION, 0);
        w.item_tag(&mut d, SEQUENCE_DELIMITATION, 0);
        // Patient's Name is present in real data; the scanner must simply skip it.
        w.elem(&mut d, (0x0010, 0x0010), b"PN", b"DOE^JANE");
        w.elem(&mut d, STUDY_INSTANCE_UID, b"UI", b"1.2.3.100");
        w.elem(&mut d, SERIES_INSTANCE_UID, b"UI", b"1.2.3.100.1");
        w.elem(&mut d, SERIES_NUMBER, b"IS", b"7");
        w.elem(&mut d, IMAGES_IN_ACQUISITION, b"IS", b"120 ");
        w.elem(&mut d, NUMBER_OF_SERIES_RELATED_INSTANCES, b"IS", b"240");
        w.elem(&mut d, NUMBER_OF_FRAMES, b"IS", b"1");
        // A 4 × 2 image of 8-bit samples: the 8 bytes of `native_pixels`.
        let us = |v: u16| {
            if w.be {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        w.elem(&mut d, ROWS, b"US", &us(4));
        w.elem(&mut d, COLUMNS, b"US", &us(2));
        w.elem(&mut d, BITS_ALLOCATED, b"US", &us(8));
        d.extend_from_slice(pixel);
        d
    }

    fn native_pixels(w: W) -> Vec<u8> {
        let mut d = Vec::new();
        w.elem(&mut d, PIXEL_DATA, b"OW", &[1, 2, 3, 4, 5, 6, 7, 8]);
        d
    }

    fn check_facts(f: &InstanceFacts) {
        assert_eq!(f.sop_class_uid, CT);
        assert_eq!(f.sop_instance_uid, "1.2.3.4.5.6");
        assert_eq!(f.study_uid, "1.2.3.100");
        assert_eq!(f.series_uid, "1.2.3.100.1");
        assert_eq!(f.modality.as_deref(), Some("CT"));
        assert_eq!(f.series_number, Some(7));
        assert_eq!(f.images_in_acquisition, Some(120));
        assert_eq!(f.number_of_series_related_instances, Some(240));
        assert_eq!(f.number_of_frames, Some(1));
    }

    #[test]
    fn scans_explicit_little_endian() {
        let w = W {
            explicit: true,
            be: false,
        };
        let d = dataset(w, &native_pixels(w));
        check_facts(&scan(&d, EXPLICIT_LE).unwrap());
    }

    #[test]
    fn scans_implicit_little_endian() {
        let w = W {
            explicit: false,
            be: false,
        };
        let d = dataset(w, &native_pixels(w));
        check_facts(&scan(&d, "1.2.840.10008.1.2\0").unwrap());
    }

    #[test]
    fn scans_explicit_big_endian() {
        let w = W {
            explicit: true,
            be: true,
        };
        let d = dataset(w, &native_pixels(w));
        check_facts(&scan(&d, EXPLICIT_VR_BIG_ENDIAN).unwrap());
        // The same bytes read as little endian do not make sense.
        assert!(scan(&d, EXPLICIT_LE).is_err());
    }

    #[test]
    fn walks_the_fragments_of_encapsulated_pixel_data() {
        let w = W {
            explicit: true,
            be: false,
        };
        let mut px = Vec::new();
        w.header(&mut px, PIXEL_DATA, b"OB", UNDEFINED);
        w.item_tag(&mut px, ITEM, 0); // empty basic offset table
        w.item_tag(&mut px, ITEM, 4);
        px.extend([0xFF, 0xD8, 0xFF, 0xD9]);
        w.item_tag(&mut px, SEQUENCE_DELIMITATION, 0);
        let d = dataset(w, &px);
        check_facts(&scan(&d, JPEG_LOSSLESS).unwrap());
        // Garbage among the fragments is refused, as DCMTK's receiver refuses it.
        let mut cut = dataset(w, &px[..20]);
        cut.extend([0xAB; 7]);
        assert!(matches!(
            scan(&cut, JPEG_LOSSLESS),
            Err(ScanError::TruncatedHeader { .. })
        ));
        let mut garbage = dataset(w, &px[..20]);
        garbage.extend([0xAB; 12]);
        assert!(matches!(
            scan(&garbage, JPEG_LOSSLESS),
            Err(ScanError::MalformedStructure { .. })
        ));
        // What follows the pixel data is not looked at.
        let mut after = d.clone();
        after.extend([0xAB; 7]);
        check_facts(&scan(&after, JPEG_LOSSLESS).unwrap());
    }

    #[test]
    fn walks_undefined_length_un_as_implicit() {
        let w = W {
            explicit: true,
            be: false,
        };
        let imp = W {
            explicit: false,
            be: false,
        };
        let mut d = Vec::new();
        w.elem(&mut d, SOP_CLASS_UID, b"UI", CT.as_bytes());
        w.elem(&mut d, SOP_INSTANCE_UID, b"UI", b"1.2.3.4.5.6");
        w.header(&mut d, (0x0009, 0x1010), b"UN", UNDEFINED);
        imp.item_tag(&mut d, ITEM, UNDEFINED);
        imp.elem(&mut d, (0x0009, 0x1011), b"LO", b"private");
        imp.item_tag(&mut d, ITEM_DELIMITATION, 0);
        imp.item_tag(&mut d, SEQUENCE_DELIMITATION, 0);
        w.elem(&mut d, STUDY_INSTANCE_UID, b"UI", b"1.2.3.100");
        w.elem(&mut d, SERIES_INSTANCE_UID, b"UI", b"1.2.3.100.1");
        let f = scan(&d, EXPLICIT_LE).unwrap();
        assert_eq!(f.series_uid, "1.2.3.100.1");
        assert_eq!(f.modality, None);
        assert_eq!(f.series_number, None);
    }

    #[test]
    fn scans_deflated() {
        use std::io::Write;
        let w = W {
            explicit: true,
            be: false,
        };
        let d = dataset(w, &native_pixels(w));
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&d).unwrap();
        let deflated = enc.finish().unwrap();
        check_facts(&scan(&deflated, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN).unwrap());
        let err = scan(&[0xFF; 16], DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN).unwrap_err();
        assert!(matches!(err, ScanError::Inflate(_)), "{err}");
    }

    #[test]
    fn inflation_is_bounded() {
        use std::io::Write;
        // 8 MiB of zeros deflate to a few KiB; a cap of 1 MiB must hold.
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 8 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 64 * 1024);
        let (out, complete) = inflate_bounded(&bomb, 1 << 20).unwrap();
        assert_eq!(out.len(), 1 << 20);
        assert!(!complete);
    }

    #[test]
    fn reports_truncation_and_bad_lengths() {
        let w = W {
            explicit: true,
            be: false,
        };
        let d = dataset(w, &native_pixels(w));
        // Cut inside the native pixel data value: its claimed length exceeds what is left.
        let err = scan(&d[..d.len() - 3], EXPLICIT_LE).unwrap_err();
        assert!(
            matches!(
                err,
                ScanError::LengthBeyondEnd {
                    tag: TagDisplay(0x7FE0, 0x0010),
                    length: 8,
                    remaining: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "element (7FE0,0010) at byte {} claims 8 bytes but only 5 remain in the dataset",
                d.len() - 20
            )
        );
        // Cut inside a header.
        let err = scan(&d[..5], EXPLICIT_LE).unwrap_err();
        assert_eq!(err, ScanError::TruncatedHeader { offset: 0 });
    }

    #[test]
    fn reports_missing_and_invalid_uids() {
        let w = W {
            explicit: true,
            be: false,
        };
        let mut d = Vec::new();
        w.elem(&mut d, SOP_CLASS_UID, b"UI", CT.as_bytes());
        w.elem(&mut d, SOP_INSTANCE_UID, b"UI", b"1.2.3");
        w.elem(&mut d, STUDY_INSTANCE_UID, b"UI", b"1.2.3");
        let err = scan(&d, EXPLICIT_LE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "required attribute Series Instance UID (0020,000E) is missing"
        );
        for bad in [&b"../../etc"[..], b"", b"1.2.3\\4.5", &[b'1'; 65]] {
            let mut e = d.clone();
            w.elem(&mut e, SERIES_INSTANCE_UID, b"UI", bad);
            let err = scan(&e, EXPLICIT_LE).unwrap_err();
            assert_eq!(
                err,
                ScanError::InvalidUid("Series Instance UID (0020,000E)"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_malformed_structure() {
        let w = W {
            explicit: true,
            be: false,
        };
        // A top-level item tag.
        let mut d = Vec::new();
        w.item_tag(&mut d, ITEM, 0);
        assert!(matches!(
            scan(&d, EXPLICIT_LE),
            Err(ScanError::MalformedStructure { .. })
        ));
        // An undefined-length string.
        let mut d = Vec::new();
        w.header(&mut d, (0x0008, 0x0070), b"UT", UNDEFINED);
        assert!(matches!(
            scan(&d, EXPLICIT_LE),
            Err(ScanError::UnexpectedUndefinedLength { .. })
        ));
        // An invalid VR.
        let mut d = Vec::new();
        w.header(&mut d, (0x0008, 0x0070), b"ZZ", 0);
        assert!(matches!(
            scan(&d, EXPLICIT_LE),
            Err(ScanError::InvalidVr { .. })
        ));
        // Unknown transfer syntax.
        assert!(matches!(
            scan(&[], "1.2.3"),
            Err(ScanError::UnsupportedTransferSyntax(_))
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let w = W {
            explicit: true,
            be: false,
        };
        let mut d = Vec::new();
        for _ in 0..(MAX_DEPTH + 5) {
            w.header(&mut d, (0x0008, 0x1140), b"SQ", UNDEFINED);
            w.item_tag(&mut d, ITEM, UNDEFINED);
        }
        assert_eq!(scan(&d, EXPLICIT_LE), Err(ScanError::NestingTooDeep));
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_uid(b"1.2.3\0").as_deref(), Some("1.2.3"));
        assert_eq!(parse_uid(b"1.2.3 ").as_deref(), Some("1.2.3"));
        assert_eq!(parse_uid(b" 1.2.3"), None);
        assert_eq!(parse_uid(b"\0\0"), None);
        assert_eq!(parse_code_string(b"MR"), Some("MR".to_string()));
        assert_eq!(parse_code_string(b"mr"), None);
        assert_eq!(parse_integer_string::<u32>(b" 12 "), Some(12));
        assert_eq!(parse_integer_string::<u32>(b"-1"), None);
        assert_eq!(parse_integer_string::<i32>(b"-1\\4"), Some(-1));
        assert_eq!(parse_integer_string::<u32>(b"x"), None);
    }

    /// A tiny deterministic generator for the fuzz-style tests.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn truncations_and_mutations_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for (explicit, be, ts) in [
            (true, false, EXPLICIT_LE),
            (false, false, IMPLICIT_VR_LITTLE_ENDIAN),
            (true, true, EXPLICIT_VR_BIG_ENDIAN),
        ] {
            let w = W { explicit, be };
            let d = dataset(w, &native_pixels(w));
            for cut in 0..d.len() {
                let _ = scan(&d[..cut], ts);
            }
            for _ in 0..5000 {
                let mut m = d.clone();
                for _ in 0..(1 + rng.next() % 4) {
                    let i = (rng.next() % m.len() as u64) as usize;
                    m[i] = rng.next() as u8;
                }
                // Lengths turned huge must be caught by the bounds check, not allocated.
                if let Err(ScanError::LengthBeyondEnd {
                    length, remaining, ..
                }) = scan(&m, ts)
                {
                    assert!(length as usize > remaining);
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(42);
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 300).map(|_| rng.next() as u8).collect();
            for ts in [
                EXPLICIT_LE,
                IMPLICIT_VR_LITTLE_ENDIAN,
                EXPLICIT_VR_BIG_ENDIAN,
                DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            ] {
                let _ = scan(&bytes, ts);
            }
        }
    }

    /// Streams `data` as [`scan_prefix`] and parts of `chunk` bytes would, returning
    /// the verdict at the end.
    fn streamed(data: &[u8], ts: &str, prefix: usize, chunk: usize) -> Result<(), ScanError> {
        let (facts, mut tail) = scan_prefix(&data[..prefix], ts).unwrap();
        assert_eq!(facts.sop_instance_uid, "1.2.3.4.5.6");
        for part in data[prefix..].chunks(chunk) {
            tail.feed(part);
        }
        tail.finish()
    }

    fn big_native(w: W, len: usize) -> Vec<u8> {
        let mut d = dataset(w, &[]);
        w.elem(&mut d, PIXEL_DATA, b"OW", &vec![7u8; len]);
        d
    }

    #[test]
    fn a_streamed_native_dataset_is_whole_only_with_all_its_pixels() {
        for w in [
            W {
                explicit: true,
                be: false,
            },
            W {
                explicit: false,
                be: false,
            },
            W {
                explicit: true,
                be: true,
            },
        ] {
            let ts = match (w.explicit, w.be) {
                (false, _) => IMPLICIT_VR_LITTLE_ENDIAN,
                (true, true) => EXPLICIT_VR_BIG_ENDIAN,
                (true, false) => EXPLICIT_LE,
            };
            let d = big_native(w, 5000);
            let header_end = d.len() - 5000;
            for (prefix, chunk) in [(header_end + 10, 1), (header_end + 100, 777), (d.len(), 64)] {
                assert_eq!(
                    streamed(&d, ts, prefix, chunk),
                    Ok(()),
                    "{w:?} {prefix} {chunk}"
                );
            }
            // Cut inside the pixel data, wherever the prefix ended.
            for prefix in [header_end + 10, header_end - 3] {
                match streamed(&d[..d.len() - 1], ts, prefix.min(d.len() - 1), 333) {
                    Err(ScanError::LengthBeyondEnd {
                        tag,
                        length,
                        remaining,
                        ..
                    }) => {
                        assert_eq!(tag, TagDisplay(0x7FE0, 0x0010));
                        assert_eq!((length, remaining), (5000, 4999));
                    }
                    other => panic!("{w:?}: {other:?}"),
                }
            }
            // After the pixel data nothing is judged, streamed or not: an element cut
            // inside its header there is taken as it is.
            let mut trailing = d.clone();
            w.elem(&mut trailing, (0xFFFC, 0xFFFC), b"OB", &[0, 0]);
            let cut = &trailing[..trailing.len() - 7];
            assert_eq!(streamed(cut, ts, header_end + 1, 100), Ok(()));
            assert!(scan(cut, ts).is_ok());
        }
    }

    #[test]
    fn a_streamed_encapsulated_dataset_needs_every_fragment_and_its_delimiter() {
        let w = W {
            explicit: true,
            be: false,
        };
        let mut d = dataset(w, &[]);
        w.header(&mut d, PIXEL_DATA, b"OB", UNDEFINED);
        w.item_tag(&mut d, ITEM, 0); // empty basic offset table
        w.item_tag(&mut d, ITEM, 3000);
        d.extend(vec![9u8; 3000]);
        w.item_tag(&mut d, ITEM, 1000);
        d.extend(vec![8u8; 1000]);
        w.item_tag(&mut d, SEQUENCE_DELIMITATION, 0);
        let start = d.len() - 4000 - 32;
        for (prefix, chunk) in [(start - 4, 1), (start + 20, 500), (d.len(), 10)] {
            assert_eq!(
                streamed(&d, JPEG_LOSSLESS, prefix, chunk),
                Ok(()),
                "{prefix} {chunk}"
            );
        }
        // Without its delimiter after the last whole fragment: taken, as when received
        // whole. Cut inside the delimiter or inside a fragment: refused, both ways.
        assert_eq!(
            streamed(&d[..d.len() - 8], JPEG_LOSSLESS, start, 256),
            Ok(())
        );
        assert!(scan(&d[..d.len() - 8], JPEG_LOSSLESS).is_ok());
        assert!(matches!(
            streamed(&d[..d.len() - 4], JPEG_LOSSLESS, start, 256),
            Err(ScanError::TruncatedHeader { .. })
        ));
        assert!(matches!(
            scan(&d[..d.len() - 4], JPEG_LOSSLESS),
            Err(ScanError::TruncatedHeader { .. })
        ));
        for cut in [
            streamed(&d[..d.len() - 200], JPEG_LOSSLESS, start, 256),
            scan(&d[..d.len() - 200], JPEG_LOSSLESS).map(|_| ()),
        ] {
            assert!(
                matches!(
                    cut,
                    Err(ScanError::LengthBeyondEnd {
                        length: 1000,
                        remaining: 808,
                        ..
                    })
                ),
                "{cut:?}"
            );
        }
        // An element with an invalid VR after the prefix, named at its offset.
        let mut bad_vr = dataset(w, &[]);
        let at = bad_vr.len();
        w.elem(&mut bad_vr, (0x0009, 0x1001), b"ZZ", b"ab");
        bad_vr.extend_from_slice(&d[start..]);
        assert_eq!(
            streamed(&bad_vr, JPEG_LOSSLESS, at, 3),
            Err(ScanError::InvalidVr {
                tag: TagDisplay(0x0009, 0x1001),
                offset: at
            })
        );
        // Something other than an item among the fragments.
        let mut bad = d[..d.len() - 8].to_vec();
        w.elem(&mut bad, (0x0008, 0x0060), b"CS", b"CT");
        assert!(matches!(
            streamed(&bad, JPEG_LOSSLESS, start, 256),
            Err(ScanError::MalformedStructure { .. })
        ));
    }

    /// The test dataset with a defined-length Referenced Series Sequence made by `sq`
    /// (its value bytes) before the UIDs, then `pixel`.
    fn with_sequence(w: W, sq: &[u8], pixel: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        w.elem(&mut d, SOP_CLASS_UID, b"UI", CT.as_bytes());
        w.elem(&mut d, SOP_INSTANCE_UID, b"UI", b"1.2.3.4.5.6");
        w.elem(&mut d, MODALITY, b"CS", b"CT");
        w.header(&mut d, (0x0008, 0x1115), b"SQ", sq.len() as u32);
        d.extend_from_slice(sq);
        let rest = dataset(w, pixel);
        // The rest of the usual dataset from its Study Instance UID on.
        let at = rest
            .windows(4)
            .position(|b| b == [0x20, 0x00, 0x0D, 0x00])
            .unwrap();
        d.extend_from_slice(&rest[at..]);
        d
    }

    fn item_of(w: W, len: Option<u32>) -> Vec<u8> {
        let mut content = Vec::new();
        w.elem(&mut content, (0x0008, 0x1150), b"UI", CT.as_bytes());
        let mut item = Vec::new();
        w.item_tag(&mut item, ITEM, len.unwrap_or(content.len() as u32));
        item.extend(content);
        item
    }

    #[test]
    fn defined_length_sequences_are_walked_item_by_item() {
        let w = W {
            explicit: true,
            be: false,
        };
        let px = native_pixels(w);
        let good = with_sequence(w, &item_of(w, None), &px);
        check_facts(&scan(&good, EXPLICIT_LE).unwrap());
        // An item whose length lies, inside a sequence whose length is right.
        let lying = with_sequence(w, &item_of(w, Some(0x7FFF_FFF0)), &px);
        assert!(
            matches!(
                scan(&lying, EXPLICIT_LE),
                Err(ScanError::LengthBeyondEnd {
                    length: 0x7FFF_FFF0,
                    ..
                })
            ),
            "{:?}",
            scan(&lying, EXPLICIT_LE)
        );
        // An item longer than its sequence by a few bytes.
        let mut item = item_of(w, None);
        let n = item.len() as u32 - 8 + 4;
        item[4..8].copy_from_slice(&n.to_le_bytes());
        let over = with_sequence(w, &item, &px);
        assert!(scan(&over, EXPLICIT_LE).is_err());
        // Elements where items must be.
        let mut bare = Vec::new();
        w.elem(&mut bare, (0x0008, 0x1150), b"UI", CT.as_bytes());
        assert!(matches!(
            scan(&with_sequence(w, &bare, &px), EXPLICIT_LE),
            Err(ScanError::MalformedStructure { .. })
        ));
        // A defined-length sequence inside an item, with a lying item of its own.
        let mut inner = Vec::new();
        let lying_item = item_of(w, Some(1000));
        w.header(&mut inner, (0x0008, 0x1199), b"SQ", lying_item.len() as u32);
        inner.extend(lying_item);
        let mut outer = Vec::new();
        w.item_tag(&mut outer, ITEM, inner.len() as u32);
        outer.extend(inner);
        assert!(scan(&with_sequence(w, &outer, &px), EXPLICIT_LE).is_err());
    }

    #[test]
    fn pixel_data_must_fit_the_image_and_the_syntax() {
        let w = W {
            explicit: true,
            be: false,
        };
        // Short native data: 6 bytes for a 4 × 2 image of 8-bit samples.
        let mut short = Vec::new();
        w.elem(&mut short, PIXEL_DATA, b"OW", &[1, 2, 3, 4, 5, 6]);
        let err = scan(&dataset(w, &short), EXPLICIT_LE).unwrap_err();
        assert!(
            matches!(
                err,
                ScanError::Pixels(PixelError::Short {
                    actual: 6,
                    expected: 8,
                    ..
                })
            ),
            "{err}"
        );
        // Native data under JPEG Lossless, and encapsulated data under a native syntax.
        let err = scan(&dataset(w, &native_pixels(w)), JPEG_LOSSLESS).unwrap_err();
        assert!(
            matches!(err, ScanError::Pixels(PixelError::NotEncapsulated(_))),
            "{err}"
        );
        assert!(err.to_string().contains(JPEG_LOSSLESS), "{err}");
        let mut fragments = Vec::new();
        w.header(&mut fragments, PIXEL_DATA, b"OB", UNDEFINED);
        w.item_tag(&mut fragments, ITEM, 0);
        w.item_tag(&mut fragments, ITEM, 4);
        fragments.extend([1, 2, 3, 4]);
        w.item_tag(&mut fragments, SEQUENCE_DELIMITATION, 0);
        assert!(scan(&dataset(w, &fragments), JPEG_LOSSLESS).is_ok());
        let err = scan(&dataset(w, &fragments), EXPLICIT_LE).unwrap_err();
        assert!(
            matches!(err, ScanError::Pixels(PixelError::Encapsulated(_))),
            "{err}"
        );
        // Two frames need two fragments.
        let two = dataset(w, &fragments).replace_number_of_frames(w, b"2");
        let err = scan(&two, JPEG_LOSSLESS).unwrap_err();
        assert!(
            matches!(
                err,
                ScanError::Pixels(PixelError::TooFewFragments {
                    fragments: 1,
                    frames: 2
                })
            ),
            "{err}"
        );
        // Streamed, the same verdicts come from the tail.
        let big_short = {
            let mut d = dataset(w, &[]).replace_rows(w, 4000);
            w.elem(&mut d, PIXEL_DATA, b"OW", &vec![0u8; 4000]);
            d
        };
        let header_end = big_short.len() - 4000 - 12;
        assert!(matches!(
            streamed(&big_short, EXPLICIT_LE, header_end - 2, 100),
            Err(ScanError::Pixels(PixelError::Short {
                actual: 4000,
                expected: 8000,
                ..
            }))
        ));
        assert!(matches!(
            streamed(&big_short, JPEG_LOSSLESS, header_end - 2, 100),
            Err(ScanError::Pixels(PixelError::NotEncapsulated(_)))
        ));
        let mut many = dataset(w, &[]).replace_number_of_frames(w, b"3");
        w.header(&mut many, PIXEL_DATA, b"OB", UNDEFINED);
        w.item_tag(&mut many, ITEM, 0);
        for _ in 0..2 {
            w.item_tag(&mut many, ITEM, 2000);
            many.extend(vec![5u8; 2000]);
        }
        let cut = many.len();
        w.item_tag(&mut many, SEQUENCE_DELIMITATION, 0);
        let start = cut - 4000 - 24 - 12;
        for data in [&many[..], &many[..cut]] {
            assert!(
                matches!(
                    streamed(data, JPEG_LOSSLESS, start, 300),
                    Err(ScanError::Pixels(PixelError::TooFewFragments {
                        fragments: 2,
                        frames: 3
                    }))
                ),
                "{:?}",
                streamed(data, JPEG_LOSSLESS, start, 300)
            );
        }
    }

    /// Edits of the test dataset's image attributes.
    trait Edit {
        fn replace_number_of_frames(self, w: W, frames: &[u8]) -> Vec<u8>;
        fn replace_rows(self, w: W, rows: u16) -> Vec<u8>;
    }

    impl Edit for Vec<u8> {
        fn replace_number_of_frames(self, w: W, frames: &[u8]) -> Vec<u8> {
            let mut old = Vec::new();
            w.elem(&mut old, NUMBER_OF_FRAMES, b"IS", b"1");
            let mut new = Vec::new();
            w.elem(&mut new, NUMBER_OF_FRAMES, b"IS", frames);
            replace(self, &old, &new)
        }
        fn replace_rows(self, w: W, rows: u16) -> Vec<u8> {
            let mut old = Vec::new();
            w.elem(&mut old, ROWS, b"US", &4u16.to_le_bytes());
            let mut new = Vec::new();
            w.elem(&mut new, ROWS, b"US", &rows.to_le_bytes());
            replace(self, &old, &new)
        }
    }

    fn replace(data: Vec<u8>, old: &[u8], new: &[u8]) -> Vec<u8> {
        let at = data.windows(old.len()).position(|b| b == old).unwrap();
        [&data[..at], new, &data[at + old.len()..]].concat()
    }
}
