//! Decoding of one stored DICOM Part-10 file into physical pixel values.
//!
//! The store keeps every instance exactly as received, with its 128-byte preamble and
//! `DICM` marker. [`read_slice`] turns such a file, held in memory, into a
//! [`DecodedSlice`]: the few header facts that geometry and routing need, and the pixels
//! as `f32` in physical units (Hounsfield units for CT) with the modality LUT applied.
//!
//! Why the file is scanned before it is parsed: `dicom-object` allocates an element's
//! claimed length before reading it, so a few hundred hostile bytes can claim gigabytes.
//! A structural pass over the bytes checks every claimed length against the bytes that
//! are actually there before any parser allocates. The same pass finds where the pixel
//! data lies, so uncompressed pixels are converted straight from the input buffer in one
//! pass (no intermediate copy) while `dicom-object` only parses the header.
//!
//! # Transfer syntaxes
//!
//! Decoded (dicom-pixeldata with `native`, `openjp2` and `charls`): Implicit VR Little
//! Endian, Explicit VR Little Endian, Explicit VR Big Endian, Deflated Explicit VR
//! Little Endian, Encapsulated Uncompressed, RLE Lossless, JPEG Baseline (8-bit),
//! JPEG Extended (8-bit only: 12-bit fails in the codec), JPEG Lossless (Process 14
//! and SV1), JPEG-LS Lossless and Near-Lossless (CharLS), JPEG 2000 and
//! High-Throughput JPEG 2000, lossless and lossy (OpenJPEG ported to Rust), and
//! Deflated Image Frame Compression. Anything else (JPEG XL, MPEG/HEVC video, JPIP)
//! fails with [`DecodeError::UnsupportedTransferSyntax`], which names the syntax.
//!
//! Only single-frame greyscale images (`MONOCHROME1`/`MONOCHROME2`, one sample per pixel)
//! are accepted for now.

use std::borrow::Cow;
use std::io::Read;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_encoding::transfer_syntax::{Codec, Endianness, TransferSyntax};
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

/// Largest decoded pixel buffer accepted for one file (1 GiB). Compressed pixel data can
/// legitimately be thousands of times smaller than its decoded form (a blank slice), so
/// the decoded size of compressed data is bounded by this limit rather than by a ratio.
pub const MAX_DECODED_BYTES: usize = 1 << 30;

/// Largest data set accepted after inflating a deflated file.
const MAX_INFLATED_BYTES: usize = 1 << 30;

/// Deepest sequence nesting the scanner follows; real files nest a handful of levels.
const MAX_DEPTH: usize = 32;

const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// Header facts of one image, enough to place it in space and route its series.
///
/// Deliberately holds no patient demographics (names, IDs, birth dates, accession
/// numbers): this value is logged, compared and copied into events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SliceHeader {
    /// SOP Instance UID (0008,0018).
    pub sop_instance_uid: String,
    /// Instance Number (0020,0013); informative only, never used for ordering.
    pub instance_number: Option<i32>,
    /// Image Position (Patient) (0020,0032): centre of the first pixel, LPS mm.
    pub image_position: Option<[f64; 3]>,
    /// Image Orientation (Patient) (0020,0037): row cosine then column cosine, LPS.
    pub image_orientation: Option<[f64; 6]>,
    /// Pixel Spacing (0028,0030) as in DICOM: `[row spacing, column spacing]` mm, i.e.
    /// the distance between rows first (along a column), then between columns.
    pub pixel_spacing: Option<[f64; 2]>,
    /// Rows (0028,0010).
    pub rows: usize,
    /// Columns (0028,0011).
    pub cols: usize,
    /// Number of Frames (0028,0008); 1 when absent.
    pub number_of_frames: u32,
    /// Modality (0008,0060), e.g. `CT`.
    pub modality: String,
    /// Body Part Examined (0018,0015), may be empty.
    pub body_part: String,
    /// Series Description (0008,103E), may be empty.
    pub series_description: String,
    /// Image Type (0008,0008) values, e.g. `["ORIGINAL", "PRIMARY", "AXIAL"]`.
    pub image_type: Vec<String>,
    /// Photometric Interpretation (0028,0004) as stored.
    pub photometric: String,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: String,
    /// Transfer syntax UID of the file.
    pub transfer_syntax: String,
    /// Modality LUT applied to the pixels: `(slope, intercept)`; `(1, 0)` when absent.
    pub rescale: (f64, f64),
    /// Slice Thickness (0018,0050) in mm.
    pub slice_thickness: Option<f64>,
}

/// One decoded image: header and pixel values in physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSlice {
    pub header: SliceHeader,
    /// `rows * cols` values, row-major (column index fastest), modality LUT applied,
    /// `MONOCHROME1` inverted so that larger is brighter, padding set to the minimum.
    pub pixels: Vec<f32>,
}

/// Why a file could not be decoded. Every message is a sentence for an operator and
/// never contains patient demographics.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a DICOM Part-10 file.
    #[error("not a DICOM file: {0}")]
    NotDicom(String),
    /// The file is structurally broken (bad element lengths, nesting, parse failure).
    #[error("the DICOM file is malformed: {0}")]
    Malformed(String),
    /// The file holds no image pixel data (e.g. a structured report).
    #[error("the DICOM file has no pixel data (SOP class {sop_class_uid}); it is not an image")]
    NoPixelData { sop_class_uid: String },
    /// The transfer syntax is unknown or its pixel data cannot be decoded here.
    #[error("transfer syntax {uid} ({name}) cannot be decoded")]
    UnsupportedTransferSyntax { uid: String, name: String },
    /// The file ends before all the pixel data it declares.
    #[error("pixel data is truncated: {expected} bytes are needed but only {present} are present")]
    TruncatedPixelData { expected: usize, present: usize },
    /// A multi-frame object; not supported yet.
    #[error("multi-frame images ({frames} frames) are not supported yet")]
    MultiFrame { frames: u32 },
    /// A valid image of a kind this decoder does not handle (colour, odd bit depth…).
    #[error("unsupported image: {0}")]
    UnsupportedImage(String),
    /// The image would decode to more memory than allowed.
    #[error("the image would decode to {bytes} bytes, more than the limit of {limit}")]
    TooLarge { bytes: usize, limit: usize },
    /// The compressed pixel data could not be decoded.
    #[error("the {syntax} pixel data could not be decoded: {detail}")]
    Codec { syntax: String, detail: String },
}

/// Reads and decodes one Part-10 file held in memory (preamble and `DICM` included).
pub fn read_slice(bytes: &[u8]) -> Result<DecodedSlice, DecodeError> {
    let (ts_uid, dataset_start) = scan_meta(bytes)?;
    let ts_uid = ts_uid.as_str();
    let ts = TransferSyntaxRegistry.get(ts_uid).ok_or_else(|| {
        DecodeError::UnsupportedTransferSyntax {
            uid: ts_uid.to_owned(),
            name: "unknown transfer syntax".to_owned(),
        }
    })?;
    let unsupported = || DecodeError::UnsupportedTransferSyntax {
        uid: ts_uid.to_owned(),
        name: ts.name().to_owned(),
    };
    if !ts.can_decode_all() {
        return Err(unsupported());
    }
    let pixel_data = scan_dataset(bytes, dataset_start, ts)?;
    let encapsulated = ts.is_encapsulated_pixel_data();
    let native = matches!(ts.codec(), Codec::None);

    // Only the header is parsed for native syntaxes: the pixels are read from `bytes`.
    let options = OpenFileOptions::new().read_preamble(ReadPreamble::Always);
    let options = if native {
        options.read_until(tags::PIXEL_DATA)
    } else {
        options
    };
    let obj = options
        .from_reader(bytes)
        .map_err(|e| DecodeError::Malformed(chain(&e)))?;

    let Some(pixel) = pixel_data else {
        return Err(DecodeError::NoPixelData {
            sop_class_uid: sop_class_uid(&obj),
        });
    };
    let (header, format) = read_header(&obj, ts_uid)?;
    if header.number_of_frames > 1 {
        return Err(DecodeError::MultiFrame {
            frames: header.number_of_frames,
        });
    }
    let expected = header
        .rows
        .checked_mul(header.cols)
        .and_then(|n| n.checked_mul(format.bytes_per_sample()))
        .ok_or(DecodeError::TooLarge {
            bytes: usize::MAX,
            limit: MAX_DECODED_BYTES,
        })?;
    if expected > MAX_DECODED_BYTES {
        return Err(DecodeError::TooLarge {
            bytes: expected,
            limit: MAX_DECODED_BYTES,
        });
    }
    let n = header.rows * header.cols;

    let pixels = if native {
        let PixelSpan::Native { offset, len } = pixel else {
            return Err(DecodeError::Malformed(
                "uncompressed transfer syntax with encapsulated pixel data".into(),
            ));
        };
        if len < expected {
            return Err(DecodeError::TruncatedPixelData {
                expected,
                present: len,
            });
        }
        let endian = if ts.endianness() == Endianness::Big {
            Endian::Big
        } else {
            Endian::Little
        };
        convert(&bytes[offset..offset + expected], endian, &format, n)
    } else if encapsulated {
        if let PixelSpan::Encapsulated { len: 0 } = pixel {
            return Err(DecodeError::TruncatedPixelData {
                expected,
                present: 0,
            });
        }
        let decoded = obj.decode_pixel_data().map_err(|e| DecodeError::Codec {
            syntax: ts.name().to_owned(),
            detail: chain(&e),
        })?;
        if decoded.samples_per_pixel() != 1 || decoded.bits_allocated() != format.bits_allocated {
            return Err(DecodeError::Codec {
                syntax: ts.name().to_owned(),
                detail: format!(
                    "the codec produced {} samples of {} bits, the header declares 1 of {}",
                    decoded.samples_per_pixel(),
                    decoded.bits_allocated(),
                    format.bits_allocated
                ),
            });
        }
        let data = decoded.data();
        if data.len() < expected {
            return Err(DecodeError::TruncatedPixelData {
                expected,
                present: data.len(),
            });
        }
        convert(&data[..expected], Endian::Little, &format, n)
    } else {
        // Deflated data set: `dicom-object` inflated it; the value is in host order.
        let elem = obj
            .get(tags::PIXEL_DATA)
            .ok_or_else(|| DecodeError::NoPixelData {
                sop_class_uid: header.sop_class_uid.clone(),
            })?;
        let data: Cow<[u8]> = match elem.value() {
            dicom_core::DicomValue::Primitive(p) => p.to_bytes(),
            _ => return Err(unsupported()),
        };
        if data.len() < expected {
            return Err(DecodeError::TruncatedPixelData {
                expected,
                present: data.len(),
            });
        }
        convert(&data[..expected], Endian::native(), &format, n)
    };
    Ok(DecodedSlice { header, pixels })
}

/// An error and its sources, `outer: inner: innermost`, for a one-line message.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Header

/// How stored samples become physical values.
#[derive(Debug, Clone)]
struct SampleFormat {
    bits_allocated: u16,
    bits_stored: u16,
    /// Right shift that brings the stored bits to bit 0 (`high_bit + 1 - bits_stored`).
    shift: u16,
    signed: bool,
    slope: f64,
    intercept: f64,
    monochrome1: bool,
    /// Pixel Padding Value and optional Range Limit, in stored units.
    padding: Option<(i64, i64)>,
}

impl SampleFormat {
    fn bytes_per_sample(&self) -> usize {
        usize::from(self.bits_allocated / 8)
    }

    /// Stored (sign-extended) value of the raw container bits.
    #[inline(always)]
    fn stored(&self, raw: u32) -> i64 {
        let up = 32 - u32::from(self.bits_stored);
        let v = (raw >> self.shift) << up;
        if self.signed {
            i64::from((v as i32) >> up)
        } else {
            i64::from(v >> up)
        }
    }

    /// Smallest and largest stored values representable.
    fn stored_range(&self) -> (i64, i64) {
        let b = u32::from(self.bits_stored);
        if self.signed {
            (-(1i64 << (b - 1)), (1i64 << (b - 1)) - 1)
        } else {
            (0, (1i64 << b) - 1)
        }
    }
}

fn element(obj: &DefaultDicomObject, tag: Tag) -> Option<&InMemElement> {
    obj.get(tag)
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> String {
    element(obj, tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(|c: char| c == ' ' || c == '\0').to_owned())
        .unwrap_or_default()
}

fn floats(obj: &DefaultDicomObject, tag: Tag) -> Option<Vec<f64>> {
    element(obj, tag)
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| v.iter().all(|x| x.is_finite()))
}

fn float(obj: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    floats(obj, tag).and_then(|v| v.first().copied())
}

fn int(obj: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    element(obj, tag).and_then(|e| e.to_int::<i64>().ok())
}

/// SOP Class UID from the data set, else from the file meta group.
fn sop_class_uid(obj: &DefaultDicomObject) -> String {
    let s = text(obj, tags::SOP_CLASS_UID);
    if s.is_empty() {
        obj.meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0')
            .to_owned()
    } else {
        s
    }
}

fn read_header(
    obj: &DefaultDicomObject,
    ts_uid: &str,
) -> Result<(SliceHeader, SampleFormat), DecodeError> {
    let required = |tag: Tag, name: &str| {
        int(obj, tag).ok_or_else(|| {
            DecodeError::UnsupportedImage(format!("the {name} attribute is missing or invalid"))
        })
    };
    let rows = required(tags::ROWS, "Rows")?;
    let cols = required(tags::COLUMNS, "Columns")?;
    if rows <= 0 || cols <= 0 || rows > 65535 || cols > 65535 {
        return Err(DecodeError::UnsupportedImage(format!(
            "the image size {cols}x{rows} is invalid"
        )));
    }
    let frames = int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let samples = int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION);
    let sop_class_uid = sop_class_uid(obj);
    if samples != 1 {
        return Err(DecodeError::UnsupportedImage(format!(
            "colour images ({samples} samples per pixel, {photometric}) are not supported"
        )));
    }
    let monochrome1 = match photometric.as_str() {
        "MONOCHROME1" => true,
        "MONOCHROME2" | "" => false,
        other => {
            return Err(DecodeError::UnsupportedImage(format!(
                "photometric interpretation {other} is not supported (only MONOCHROME1/2)"
            )));
        }
    };
    let bits_allocated = required(tags::BITS_ALLOCATED, "Bits Allocated")?;
    if ![8, 16, 32].contains(&bits_allocated) {
        return Err(DecodeError::UnsupportedImage(format!(
            "{bits_allocated} bits allocated per sample are not supported (8, 16 or 32)"
        )));
    }
    let bits_stored = int(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    let high_bit = int(obj, tags::HIGH_BIT).unwrap_or(bits_stored - 1);
    if bits_stored < 1
        || bits_stored > bits_allocated
        || high_bit + 1 < bits_stored
        || high_bit >= bits_allocated
    {
        return Err(DecodeError::UnsupportedImage(format!(
            "inconsistent bit layout: {bits_allocated} allocated, {bits_stored} stored, high bit {high_bit}"
        )));
    }
    let signed = int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
    let slope = float(obj, tags::RESCALE_SLOPE)
        .filter(|s| *s != 0.0)
        .unwrap_or(1.0);
    let intercept = float(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0);

    let mut format = SampleFormat {
        bits_allocated: bits_allocated as u16,
        bits_stored: bits_stored as u16,
        shift: (high_bit + 1 - bits_stored) as u16,
        signed,
        slope,
        intercept,
        monochrome1,
        padding: None,
    };
    // The padding value is given in stored units; its VR (US or SS) may have been
    // guessed wrongly for implicit VR, so it is brought into the stored domain the same
    // way as a sample.
    let to_stored = |v: i64| format.stored(v as u32);
    if let Some(pad) = int(obj, tags::PIXEL_PADDING_VALUE) {
        let a = to_stored(pad);
        let b = int(obj, tags::PIXEL_PADDING_RANGE_LIMIT)
            .map(to_stored)
            .unwrap_or(a);
        format.padding = Some((a.min(b), a.max(b)));
    }

    let array =
        |tag: Tag, n: usize| -> Option<Vec<f64>> { floats(obj, tag).filter(|v| v.len() >= n) };
    let header = SliceHeader {
        sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID),
        instance_number: int(obj, tags::INSTANCE_NUMBER).and_then(|v| i32::try_from(v).ok()),
        image_position: array(tags::IMAGE_POSITION_PATIENT, 3).map(|v| [v[0], v[1], v[2]]),
        image_orientation: array(tags::IMAGE_ORIENTATION_PATIENT, 6)
            .map(|v| [v[0], v[1], v[2], v[3], v[4], v[5]]),
        pixel_spacing: array(tags::PIXEL_SPACING, 2)
            .filter(|v| v[0] > 0.0 && v[1] > 0.0)
            .map(|v| [v[0], v[1]]),
        rows: rows as usize,
        cols: cols as usize,
        number_of_frames: u32::try_from(frames).unwrap_or(u32::MAX),
        modality: text(obj, tags::MODALITY),
        body_part: text(obj, tags::BODY_PART_EXAMINED),
        series_description: text(obj, tags::SERIES_DESCRIPTION),
        image_type: element(obj, tags::IMAGE_TYPE)
            .and_then(|e| e.to_multi_str().ok())
            .map(|v| v.iter().map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default(),
        photometric,
        sop_class_uid,
        transfer_syntax: ts_uid.to_owned(),
        rescale: (slope, intercept),
        slice_thickness: float(obj, tags::SLICE_THICKNESS),
    };
    Ok((header, format))
}

// ---------------------------------------------------------------------------------------
// Pixel conversion

#[derive(Debug, Clone, Copy, PartialEq)]
enum Endian {
    Little,
    Big,
}

impl Endian {
    fn native() -> Self {
        if cfg!(target_endian = "big") {
            Endian::Big
        } else {
            Endian::Little
        }
    }
}

/// Converts `n` raw samples to physical `f32` values in one pass over the input.
fn convert(raw: &[u8], endian: Endian, f: &SampleFormat, n: usize) -> Vec<f32> {
    // MONOCHROME1 is mirrored inside the physical range of the stored values, which folds
    // into the linear modality LUT: v' = (lo + hi) - (slope * s + intercept).
    let (smin, smax) = f.stored_range();
    let (pmin, pmax) = {
        let a = f.slope * smin as f64 + f.intercept;
        let b = f.slope * smax as f64 + f.intercept;
        (a.min(b), a.max(b))
    };
    let (slope, intercept) = if f.monochrome1 {
        (-f.slope, pmin + pmax - f.intercept)
    } else {
        (f.slope, f.intercept)
    };
    let (slope32, intercept32) = (slope as f32, intercept as f32);

    let mut out = Vec::with_capacity(n);
    let padded = match f.padding {
        None => {
            let map = |s: i64| s as f32 * slope32 + intercept32;
            fill(&mut out, raw, endian, f, map);
            false
        }
        Some((lo, hi)) => {
            let map = |s: i64| {
                if (lo..=hi).contains(&s) {
                    f32::NAN
                } else {
                    s as f32 * slope32 + intercept32
                }
            };
            fill(&mut out, raw, endian, f, map);
            true
        }
    };
    if padded {
        let min = out
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::INFINITY, f32::min);
        let min = if min.is_finite() { min } else { pmin as f32 };
        for v in out.iter_mut().filter(|v| v.is_nan()) {
            *v = min;
        }
    }
    out
}

fn fill(
    out: &mut Vec<f32>,
    raw: &[u8],
    endian: Endian,
    f: &SampleFormat,
    map: impl Fn(i64) -> f32,
) {
    // The sign extension is done in i32 for 8/16-bit samples (the common, hot path).
    let up = 32 - u32::from(f.bits_stored);
    let shift = u32::from(f.shift);
    let signed = f.signed;
    let small = |raw: u32| -> i64 {
        let v = (raw >> shift) << up;
        if signed {
            i64::from((v as i32) >> up)
        } else {
            i64::from(v >> up)
        }
    };
    match (f.bits_allocated, endian) {
        (8, _) => out.extend(raw.iter().map(|&b| map(small(u32::from(b))))),
        (16, Endian::Little) => out.extend(
            raw.chunks_exact(2)
                .map(|c| map(small(u32::from(u16::from_le_bytes([c[0], c[1]]))))),
        ),
        (16, Endian::Big) => out.extend(
            raw.chunks_exact(2)
                .map(|c| map(small(u32::from(u16::from_be_bytes([c[0], c[1]]))))),
        ),
        (_, Endian::Little) => out.extend(
            raw.chunks_exact(4)
                .map(|c| map(f.stored(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
        ),
        (_, Endian::Big) => out.extend(
            raw.chunks_exact(4)
                .map(|c| map(f.stored(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Structural scan

/// Where the top-level pixel data lies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PixelSpan {
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

/// Walks the file meta group the way `dicom-object` reads it: the group length
/// (0002,0000) comes first and says how many bytes of elements follow; the data set
/// starts after them. Returns the transfer syntax UID and where the data set starts.
fn scan_meta(bytes: &[u8]) -> Result<(String, usize), DecodeError> {
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
    };
    let tag = explicit_header(&mut c)?;
    if tag != Tag(0x0002, 0x0000) || c.pending_len != 4 {
        return Err(not_meta("it does not start with its group length"));
    }
    let group_length = c.u32()? as usize;
    let mut transfer_syntax = None;
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
        if tag == Tag(0x0002, 0x0010) {
            let v = &bytes[c.pos..c.pos + len];
            transfer_syntax = Some(
                String::from_utf8_lossy(v)
                    .trim_matches(|ch: char| ch == '\0' || ch == ' ')
                    .to_owned(),
            );
        }
        c.pos += len;
        consumed += c.pos - header_start;
    }
    let transfer_syntax = transfer_syntax.ok_or_else(|| not_meta("it has no transfer syntax"))?;
    Ok((transfer_syntax, c.pos))
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
/// the top-level pixel data, without allocating for any value.
fn scan_dataset(
    bytes: &[u8],
    start: usize,
    ts: &TransferSyntax,
) -> Result<Option<PixelSpan>, DecodeError> {
    let mut pixel_data = None;
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
        };
        walk_dataset(&mut c, None, true, 0, &mut pixel_data)?;
    } else {
        let mut c = Cursor {
            buf: bytes,
            pos: start,
            big: ts.endianness() == Endianness::Big,
            pending_len: 0,
        };
        walk_dataset(&mut c, None, ts.uid() != IMPLICIT_VR_LE, 0, &mut pixel_data)?;
    }
    Ok(pixel_data)
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
            } else {
                // SQ, or UN / implicit VR of undefined length: a sequence, whose
                // content is implicit VR little endian when the VR is UN.
                let inner_explicit = explicit && vr.as_ref() != Some(b"UN");
                walk_sequence(c, None, inner_explicit, depth + 1)?;
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
            if depth == 0 && is_pixel_tag {
                *pixel = Some(PixelSpan::Native { offset: c.pos, len });
            }
            c.pos += len;
        }
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
