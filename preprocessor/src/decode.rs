//! Decoding of one stored DICOM Part-10 file into physical pixel values.
//!
//! The store keeps every instance exactly as received, with its 128-byte preamble and
//! `DICM` marker. Decoding is done in two steps so that a series can be decoded straight
//! into its volume, with no per-slice buffers and no second copy:
//! - [`read_header`] checks the file's structure (see the `scan` module), parses the
//!   header only, and describes every image the object holds as a [`SliceHeader`]: one
//!   for a classic image, one per frame of an enhanced multi-frame object (positions,
//!   orientation, spacing and rescale from its per-frame and shared functional groups),
//!   one per tile of a Siemens mosaic (see the `mosaic` module);
//! - [`decode_images`] then writes the pixels of chosen images, as `f32` in physical
//!   units (Hounsfield units for CT, modality LUT applied), into buffers the caller
//!   provides, which are the volume's own planes.
//!
//! [`read_frames`] and [`read_slice`] do both steps for one file.
//!
//! # Transfer syntaxes
//!
//! Decoded (dicom-pixeldata with `native`, `openjp2` and `charls`): Implicit VR Little
//! Endian, Explicit VR Little Endian, Explicit VR Big Endian, Deflated Explicit VR
//! Little Endian, Encapsulated Uncompressed, RLE Lossless (8 and 16 bits), JPEG
//! Baseline, JPEG Extended (8-bit samples by dicom-pixeldata, 12-bit grey-scale by
//! radflow's own decoder, [`crate::jpeg_extended`]), JPEG Lossless (Process 14 and SV1;
//! grey-scale streams through radflow's own decoder, [`crate::jpeg_lossless`]),
//! JPEG-LS Lossless and Near-Lossless (CharLS), JPEG 2000 and High-Throughput JPEG 2000,
//! lossless and lossy (OpenJPEG ported to Rust), and Deflated Image Frame Compression.
//! Refused with [`DecodeError::UnsupportedTransferSyntax`], which names the syntax: RLE
//! with 32-bit samples (dicom-pixeldata 0.10's codec fails on them), JPEG XL, MPEG/HEVC
//! video, JPIP, and unknown UIDs.
//!
//! # Attributes of VR UN
//!
//! Systems that convert implicit VR files to explicit VR write UN for attributes their
//! dictionary lacks. An undefined-length UN element (a sequence with implicit VR
//! content) is made an opaque value before `dicom-object` parses the file (see
//! `scan::OpaqueUn`); standard attributes left as UN get their dictionary VR back
//! (`retype_unknown`).
//!
//! # Intensities
//!
//! Stored bits are masked to Bits Stored and sign-extended per Pixel Representation;
//! the rescale slope and intercept of each image (per frame for enhanced objects) are
//! applied; `MONOCHROME1` is mirrored so that larger is always brighter; Pixel Padding
//! Value (and Range Limit) pixels, which lie outside the scanned field, become air
//! (-1024 HU) in CT and the smallest other value of their image otherwise.
//! A JPEG 2000 codestream whose signedness disagrees with Pixel Representation is
//! reinterpreted at the codestream's precision, as pydicom does: its bits are right and
//! only the sign flag of the codestream is wrong.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::header::Header;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::adapters::PixelDataObject;
use dicom_encoding::transfer_syntax::{Codec, Endianness, TransferSyntax};
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use crate::jpeg_extended;
use crate::jpeg_lossless;
use crate::jpeg_stream::JpegError;
use crate::mosaic;
use crate::scan::{self, PixelSpan};

/// Largest decoded pixel buffer accepted for one frame (1 GiB). Compressed pixel data
/// can legitimately be thousands of times smaller than its decoded form (a blank
/// slice), so the decoded size of compressed data is bounded by this limit rather than
/// by a ratio.
pub const MAX_DECODED_BYTES: usize = 1 << 30;

/// Most frames accepted in one object.
const MAX_FRAMES: i64 = 100_000;

/// Header facts of one image (a slice, a frame or a mosaic tile), enough to place it
/// in space, to decide whether it belongs in a volume and to route its series.
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
    /// Rows of this image (of one tile for a mosaic).
    pub rows: usize,
    /// Columns of this image (of one tile for a mosaic).
    pub cols: usize,
    /// Number of Frames (0028,0008) of the object; 1 when absent.
    pub number_of_frames: u32,
    /// Frame of the object this image is (0-based; 0 for single-frame objects).
    pub frame: u32,
    /// Where this image lies in a Siemens mosaic, if it is a mosaic tile.
    pub tile: Option<MosaicTile>,
    /// Modality (0008,0060), e.g. `CT`.
    pub modality: String,
    /// Body Part Examined (0008,0015), may be empty.
    pub body_part: String,
    /// Series Description (0008,103E), may be empty.
    pub series_description: String,
    /// Study Instance UID (0020,000D).
    pub study_uid: String,
    /// Series Instance UID (0020,000E).
    pub series_uid: String,
    /// Study Date (0008,0020) as `YYYYMMDD`, may be empty (selection by date).
    pub study_date: String,
    /// Image Type (0008,0008) values, e.g. `["ORIGINAL", "PRIMARY", "AXIAL"]`; for a
    /// frame of an enhanced object, its Frame Type (0008,9007) when present.
    pub image_type: Vec<String>,
    /// Photometric Interpretation (0028,0004) as stored.
    pub photometric: String,
    /// Samples per Pixel (0028,0002); 1 for greyscale.
    pub samples_per_pixel: u16,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: String,
    /// Transfer syntax UID of the file.
    pub transfer_syntax: String,
    /// Modality LUT applied to the pixels: `(slope, intercept)`; `(1, 0)` when absent.
    pub rescale: (f64, f64),
    /// Slice Thickness (0018,0050) in mm.
    pub slice_thickness: Option<f64>,
}

impl SliceHeader {
    /// Whether the image holds one grey value per pixel.
    pub fn is_greyscale(&self) -> bool {
        self.samples_per_pixel == 1
            && matches!(
                self.photometric.as_str(),
                "MONOCHROME1" | "MONOCHROME2" | ""
            )
    }
}

/// Position of a tile in a mosaic grid (0-based, row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MosaicTile {
    /// Slice number in the mosaic.
    pub index: u32,
    /// Tiles per side of the grid.
    pub grid: u32,
}

/// One decoded image: header and pixel values in physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSlice {
    pub header: SliceHeader,
    /// `rows * cols` values, row-major (column index fastest), modality LUT applied,
    /// `MONOCHROME1` inverted so that larger is brighter, padding masked (see the
    /// module docs).
    pub pixels: Vec<f32>,
}

/// Everything [`read_header`] learnt about a file: its images, and how to decode them.
#[derive(Debug, Clone)]
pub struct InstanceHeader {
    /// One header per image the object holds (slice, frame or mosaic tile), in frame
    /// order.
    pub images: Vec<SliceHeader>,
    plan: PixelPlan,
}

/// How the pixel data of a file is laid out and converted.
#[derive(Debug, Clone)]
struct PixelPlan {
    ts_uid: String,
    ts_name: String,
    storage: Storage,
    /// The bit layout, or why the images cannot be decoded; only an error once an image
    /// of this file is chosen for a volume.
    format: Result<SampleFormat, String>,
    /// Rows and columns of a whole frame (the mosaic, for mosaics).
    frame_rows: usize,
    frame_cols: usize,
    frames: u32,
    /// Undefined-length UN elements to make opaque before parsing the whole file.
    opaque_un: Vec<scan::OpaqueUn>,
    /// Whether the data set is big endian (for the length fields of `opaque_un`).
    big_endian: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    /// Uncompressed, at `offset` of the file, `len` bytes.
    Native {
        offset: usize,
        len: usize,
        endian: Endian,
    },
    /// Encapsulated fragments of `len` bytes in all, decoded by a codec.
    Encapsulated { len: usize },
    /// Uncompressed inside a deflated data set.
    Deflated,
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
    /// A file that is not a cross-sectional image by its meta group (a plan, a report,
    /// a private object) and could not be read; a series leaves it out.
    #[error("the DICOM object (SOP class {sop_class_uid}) cannot be read: {detail}")]
    UnreadableObject {
        sop_class_uid: String,
        detail: String,
    },
    /// The transfer syntax is unknown or its pixel data cannot be decoded here.
    #[error("transfer syntax {uid} ({name}) cannot be decoded")]
    UnsupportedTransferSyntax { uid: String, name: String },
    /// The file ends before all the pixel data it declares.
    #[error("pixel data is truncated: {expected} bytes are needed but only {present} are present")]
    TruncatedPixelData { expected: usize, present: usize },
    /// A multi-frame object where one image was expected ([`read_slice`]).
    #[error("the object holds {frames} images where one was expected")]
    MultiFrame { frames: u32 },
    /// A Siemens mosaic that cannot be cut into its slices.
    #[error("Siemens mosaic image cannot be split into slices: {0}")]
    Mosaic(String),
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

/// Reads and decodes one single-image Part-10 file held in memory (preamble and `DICM`
/// included); an object with several images is refused with
/// [`DecodeError::MultiFrame`] (see [`read_frames`]).
pub fn read_slice(bytes: &[u8]) -> Result<DecodedSlice, DecodeError> {
    let header = read_header(bytes)?;
    if header.images.len() > 1 {
        return Err(DecodeError::MultiFrame {
            frames: header.images.len() as u32,
        });
    }
    Ok(decode_all(bytes, header)?
        .pop()
        .expect("a header has at least one image"))
}

/// Reads and decodes every image of one Part-10 file held in memory.
pub fn read_frames(bytes: &[u8]) -> Result<Vec<DecodedSlice>, DecodeError> {
    decode_all(bytes, read_header(bytes)?)
}

fn decode_all(bytes: &[u8], header: InstanceHeader) -> Result<Vec<DecodedSlice>, DecodeError> {
    let mut pixels: Vec<Vec<f32>> = header
        .images
        .iter()
        .map(|h| vec![0.0; h.rows * h.cols])
        .collect();
    let targets = pixels
        .iter_mut()
        .enumerate()
        .map(|(i, p)| (i, p.as_mut_slice()))
        .collect();
    decode_images(bytes, &header, targets)?;
    Ok(header
        .images
        .into_iter()
        .zip(pixels)
        .map(|(header, pixels)| DecodedSlice { header, pixels })
        .collect())
}

/// Checks the structure of a file and reads the header of every image it holds,
/// without decoding pixels. Objects without pixel data fail with
/// [`DecodeError::NoPixelData`]. Problems that only matter if the images are decoded
/// (bit layout, transfer syntax, truncation) are reported by
/// [`InstanceHeader::check_decodable`] and [`decode_images`].
///
/// A file whose meta group names a SOP class that is not a cross-sectional image (a
/// plan, a report, a vendor's private object) and that cannot be read otherwise fails
/// with [`DecodeError::UnreadableObject`], which a series leaves out instead of failing.
pub fn read_header(bytes: &[u8]) -> Result<InstanceHeader, DecodeError> {
    let meta = scan::scan_meta(bytes)?;
    let read = std::panic::catch_unwind(|| read_header_after_meta(bytes, &meta))
        .unwrap_or_else(|panic| Err(DecodeError::Malformed(failed_on(&*panic))));
    read.map_err(|e| match (&meta.sop_class_uid, e) {
        (_, e @ DecodeError::NoPixelData { .. }) => e,
        (Some(class), e) if !crate::select::is_volume_class(class) => {
            DecodeError::UnreadableObject {
                sop_class_uid: class.clone(),
                detail: e.to_string(),
            }
        }
        (_, e) => e,
    })
}

fn read_header_after_meta(bytes: &[u8], meta: &scan::Meta) -> Result<InstanceHeader, DecodeError> {
    let (ts_uid, dataset_start) = (meta.transfer_syntax.clone(), meta.dataset_start);
    let ts = TransferSyntaxRegistry.get(&ts_uid).ok_or_else(|| {
        DecodeError::UnsupportedTransferSyntax {
            uid: ts_uid.clone(),
            name: "unknown transfer syntax".to_owned(),
        }
    })?;
    let scan = scan::scan_dataset(bytes, dataset_start, ts)?;
    let pixel = scan.pixel;
    let parsable = scan::without_un_sequences(bytes, &scan.opaque_un, scan.big_endian);
    let mut obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(&*parsable)
        .map_err(|e| DecodeError::Malformed(chain(&e)))?;
    retype_unknown(&mut obj, scan.big_endian, 0);
    let Some(pixel) = pixel else {
        return Err(DecodeError::NoPixelData {
            sop_class_uid: sop_class_uid(&obj),
        });
    };
    let storage = match (pixel, ts.codec()) {
        (PixelSpan::Native { offset, len }, Codec::None) => Storage::Native {
            offset,
            len,
            endian: if ts.endianness() == Endianness::Big {
                Endian::Big
            } else {
                Endian::Little
            },
        },
        (PixelSpan::Native { .. }, Codec::Dataset(_)) => Storage::Deflated,
        (PixelSpan::Encapsulated { len }, Codec::EncapsulatedPixelData(..)) => {
            Storage::Encapsulated { len }
        }
        (PixelSpan::Native { .. }, _) => {
            return Err(DecodeError::Malformed(format!(
                "{} pixel data is not encapsulated",
                ts.name()
            )));
        }
        (PixelSpan::Encapsulated { .. }, _) => {
            return Err(DecodeError::Malformed(format!(
                "{} pixel data is encapsulated",
                ts.name()
            )));
        }
    };
    let mut header = read_images(&obj, ts, storage)?;
    header.plan.opaque_un = scan.opaque_un;
    header.plan.big_endian = scan.big_endian;
    Ok(header)
}

/// Whether images in transfer syntax `uid` can be decoded here (with some bit layout:
/// [`InstanceHeader::check_decodable`] has the combinations the codecs refuse).
pub fn decodes_transfer_syntax(uid: &str) -> bool {
    TransferSyntaxRegistry
        .get(uid.trim_end_matches(['\0', ' ']))
        .is_some_and(|ts| ts.can_decode_all())
}

impl InstanceHeader {
    /// Whether the images of this file can be decoded here: a known bit layout, a
    /// transfer syntax with a working codec, and all the pixel data present.
    pub fn check_decodable(&self) -> Result<(), DecodeError> {
        let p = &self.plan;
        let format = p
            .format
            .as_ref()
            .map_err(|e| DecodeError::UnsupportedImage(e.clone()))?;
        let unsupported = || DecodeError::UnsupportedTransferSyntax {
            uid: p.ts_uid.clone(),
            name: p.ts_name.clone(),
        };
        let ts = TransferSyntaxRegistry
            .get(&p.ts_uid)
            .ok_or_else(unsupported)?;
        if !ts.can_decode_all() {
            return Err(unsupported());
        }
        // Combinations the codecs of dicom-pixeldata 0.10 get wrong.
        if p.ts_uid == uids::RLE_LOSSLESS && format.bits_allocated == 32 {
            return Err(DecodeError::UnsupportedTransferSyntax {
                uid: p.ts_uid.clone(),
                name: format!("{} with 32-bit samples", p.ts_name),
            });
        }
        let frame = frame_bytes(p, format)?;
        match p.storage {
            Storage::Native { len, .. } => {
                let expected = frame.saturating_mul(p.frames as usize);
                if len < expected {
                    return Err(DecodeError::TruncatedPixelData {
                        expected,
                        present: len,
                    });
                }
            }
            Storage::Encapsulated { len: 0 } => {
                return Err(DecodeError::TruncatedPixelData {
                    expected: frame,
                    present: 0,
                });
            }
            _ => {}
        }
        Ok(())
    }
}

fn frame_bytes(p: &PixelPlan, f: &SampleFormat) -> Result<usize, DecodeError> {
    let bytes = p
        .frame_rows
        .checked_mul(p.frame_cols)
        .and_then(|n| n.checked_mul(f.bytes_per_sample()))
        .unwrap_or(usize::MAX);
    if bytes > MAX_DECODED_BYTES {
        return Err(DecodeError::TooLarge {
            bytes,
            limit: MAX_DECODED_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes the images `targets` names (index into [`InstanceHeader::images`]) into
/// the buffers given with them, each of exactly `rows * cols` values.
///
/// # Panics
/// If a buffer has the wrong length or an index is out of range.
pub fn decode_images(
    bytes: &[u8],
    header: &InstanceHeader,
    targets: Vec<(usize, &mut [f32])>,
) -> Result<(), DecodeError> {
    header.check_decodable()?;
    // Some codecs index out of bounds on damaged data (dicom-pixeldata's RLE decoder
    // on segments that overrun their frame): a panic there is this file's codec
    // error, not the end of the process or of a worker's message.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_checked(bytes, header, targets)
    }))
    .unwrap_or_else(|panic| {
        Err(DecodeError::Codec {
            syntax: header.plan.ts_name.clone(),
            detail: failed_on(&*panic),
        })
    })
}

/// What a caught panic of a reader or codec is reported as.
fn failed_on(panic: &(dyn std::any::Any + Send)) -> String {
    format!(
        "the reader failed on damaged data ({})",
        radflow_shared::util::panic_message(panic)
    )
}

fn decode_checked(
    bytes: &[u8],
    header: &InstanceHeader,
    targets: Vec<(usize, &mut [f32])>,
) -> Result<(), DecodeError> {
    let p = &header.plan;
    let format = p.format.as_ref().expect("checked");
    let frame_len = frame_bytes(p, format)?;
    let mut by_frame: BTreeMap<u32, Vec<(usize, &mut [f32])>> = BTreeMap::new();
    for (index, out) in targets {
        let h = &header.images[index];
        assert_eq!(out.len(), h.rows * h.cols, "buffer of image {index}");
        by_frame.entry(h.frame).or_default().push((index, out));
    }
    match p.storage {
        Storage::Native { offset, endian, .. } => {
            for (frame, outs) in by_frame {
                let start = offset + frame as usize * frame_len;
                let raw = &bytes[start..start + frame_len];
                write_images(header, format, raw, endian, outs);
            }
        }
        Storage::Deflated => {
            let obj = parse_whole(bytes, p)?;
            let elem = obj
                .get(tags::PIXEL_DATA)
                .ok_or_else(|| DecodeError::NoPixelData {
                    sop_class_uid: sop_class_uid(&obj),
                })?;
            let data: Cow<[u8]> = match elem.value() {
                dicom_core::DicomValue::Primitive(v) => v.to_bytes(),
                _ => return Err(DecodeError::Malformed("pixel data is not a value".into())),
            };
            let needed = frame_len * p.frames as usize;
            if data.len() < needed {
                return Err(DecodeError::TruncatedPixelData {
                    expected: needed,
                    present: data.len(),
                });
            }
            for (frame, outs) in by_frame {
                let start = frame as usize * frame_len;
                // The parser holds the inflated value in host order.
                let raw = &data[start..start + frame_len];
                write_images(header, format, raw, Endian::native(), outs);
            }
        }
        Storage::Encapsulated { .. } => {
            let obj = parse_whole(bytes, p)?;
            let ts = TransferSyntaxRegistry.get(&p.ts_uid).expect("checked");
            let Codec::EncapsulatedPixelData(Some(reader), _) = ts.codec() else {
                return Err(DecodeError::UnsupportedTransferSyntax {
                    uid: p.ts_uid.clone(),
                    name: p.ts_name.clone(),
                });
            };
            let codec_error = |detail: String| DecodeError::Codec {
                syntax: p.ts_name.clone(),
                detail,
            };
            let mut buf = Vec::with_capacity(frame_len);
            // radflow's own decoders: lossless JPEG (see `jpeg_lossless`), with
            // dicom-pixeldata for the streams it declines; and JPEG Extended with
            // samples over 8 bits, which dicom-pixeldata's JPEG codec does not decode
            // at all (see `jpeg_extended`), so what it declines is refused by name.
            let own: Option<(JpegDecoder, bool)> = match p.ts_uid.as_str() {
                uids::JPEG_LOSSLESS | uids::JPEG_LOSSLESS_SV1 => {
                    Some((jpeg_lossless::decode, true))
                }
                uids::JPEG_EXTENDED12_BIT if format.bits_stored > 8 => {
                    Some((jpeg_extended::decode, false))
                }
                _ => None,
            };
            for (frame, outs) in by_frame {
                buf.clear();
                // Through radflow's decoder when it handles the stream, else through
                // dicom-pixeldata.
                let mut done = false;
                if let Some((decode, fallback)) = own
                    && let Some(data) = obj.frame_pixel_data(frame)
                {
                    match decode(
                        &data,
                        p.frame_rows,
                        p.frame_cols,
                        format.bytes_per_sample(),
                        &mut buf,
                    ) {
                        Ok(()) => done = true,
                        Err(JpegError::Unsupported(why)) if !fallback => {
                            return Err(DecodeError::UnsupportedTransferSyntax {
                                uid: p.ts_uid.clone(),
                                name: format!(
                                    "{} with {}-bit samples, {why}",
                                    p.ts_name, format.bits_stored
                                ),
                            });
                        }
                        Err(JpegError::Unsupported(_)) => buf.clear(),
                        Err(e) => return Err(codec_error(e.to_string())),
                    }
                }
                if !done {
                    // The codecs allocate what their stream's header claims: a
                    // damaged or hostile header must not cost gigabytes.
                    if let Some((cols, rows)) = obj
                        .frame_pixel_data(frame)
                        .and_then(|c| stream_dimensions(&p.ts_uid, &c))
                        && (cols as usize > p.frame_cols || rows as usize > p.frame_rows)
                    {
                        return Err(codec_error(format!(
                            "the stream holds {cols}x{rows} samples, the image is {}x{}",
                            p.frame_cols, p.frame_rows
                        )));
                    }
                    reader
                        .decode_frame(&obj, frame, &mut buf)
                        .map_err(|e| codec_error(chain(&e)))?;
                }
                if buf.len() < frame_len {
                    return Err(codec_error(format!(
                        "the codec produced {} bytes for a frame of {frame_len}",
                        buf.len()
                    )));
                }
                let mut f = format.clone();
                if is_jpeg2000(&p.ts_uid)
                    && let Some((precision, signed)) = obj
                        .frame_pixel_data(frame)
                        .and_then(|c| j2k_component_format(&c))
                    && signed != f.signed
                {
                    // The codestream's flag is wrong, its bits are right.
                    f.bits_stored = f.bits_stored.min(precision);
                }
                // JPEG codecs return samples at bit 0 whatever High Bit says; RLE and
                // the other byte-preserving codecs return the stored container bits.
                if p.ts_uid.starts_with("1.2.840.10008.1.2.4.") {
                    f.shift = 0;
                }
                write_images(header, &f, &buf[..frame_len], Endian::Little, outs);
            }
        }
    }
    Ok(())
}

/// A JPEG decoder of radflow's: stream, rows, columns, bytes per sample, output.
type JpegDecoder = fn(&[u8], usize, usize, usize, &mut Vec<u8>) -> Result<(), JpegError>;

fn parse_whole(bytes: &[u8], p: &PixelPlan) -> Result<DefaultDicomObject, DecodeError> {
    let parsable = scan::without_un_sequences(bytes, &p.opaque_un, p.big_endian);
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(&*parsable)
        .map_err(|e| DecodeError::Malformed(chain(&e)))
}

/// Converts the images of one decoded frame into their buffers.
fn write_images(
    header: &InstanceHeader,
    format: &SampleFormat,
    raw: &[u8],
    endian: Endian,
    outs: Vec<(usize, &mut [f32])>,
) {
    let bps = format.bytes_per_sample();
    for (index, out) in outs {
        let h = &header.images[index];
        match h.tile {
            None => convert(raw, endian, format, h.rescale, out),
            Some(t) => {
                // Gather the tile's rows, then convert them as one image.
                let (tr, tc) = (h.rows, h.cols);
                let (gr, gc) = ((t.index / t.grid) as usize, (t.index % t.grid) as usize);
                let stride = header.plan.frame_cols * bps;
                let mut tile = Vec::with_capacity(tr * tc * bps);
                for r in 0..tr {
                    let start = (gr * tr + r) * stride + gc * tc * bps;
                    tile.extend_from_slice(&raw[start..start + tc * bps]);
                }
                convert(&tile, endian, format, h.rescale, out);
            }
        }
    }
}

fn is_jpeg2000(ts: &str) -> bool {
    ts.starts_with("1.2.840.10008.1.2.4.9") || ts.starts_with("1.2.840.10008.1.2.4.20")
}

/// Precision and signedness of the first component of a JPEG 2000 codestream (its
/// SIZ marker segment), from a raw codestream or a JP2 file.
pub(crate) fn j2k_component_format(data: &[u8]) -> Option<(u16, bool)> {
    let cs = j2k_codestream(data)?;
    // SOC, then SIZ: marker, Lsiz, Rsiz, 8 × u32 sizes, Csiz, then Ssiz per component.
    if cs.len() < 43 || cs[0..2] != [0xFF, 0x4F] || cs[2..4] != [0xFF, 0x51] {
        return None;
    }
    let ssiz = cs[42];
    Some((u16::from(ssiz & 0x7F) + 1, ssiz & 0x80 != 0))
}

/// The codestream of a JPEG 2000 frame: the frame itself when it starts with SOC, else
/// the content of the `jp2c` box of a JP2 file.
fn j2k_codestream(data: &[u8]) -> Option<&[u8]> {
    if data.starts_with(&[0xFF, 0x4F]) {
        return Some(data);
    }
    let at = data.windows(4).position(|w| w == b"jp2c")?;
    Some(&data[at + 4..])
}

/// Columns and rows a compressed frame's own header declares: the SIZ segment of a
/// JPEG 2000 codestream, the frame header (SOF) of a JPEG or JPEG-LS stream. `None`
/// when the syntax has no such header or it is not found (the codec then judges).
pub(crate) fn stream_dimensions(ts_uid: &str, data: &[u8]) -> Option<(u32, u32)> {
    if is_jpeg2000(ts_uid) {
        let cs = j2k_codestream(data)?;
        if cs.len() < 24 || cs[0..4] != [0xFF, 0x4F, 0xFF, 0x51] {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([cs[i], cs[i + 1], cs[i + 2], cs[i + 3]]);
        let (x, y, x0, y0) = (u32_at(8), u32_at(12), u32_at(16), u32_at(20));
        return Some((x.checked_sub(x0)?, y.checked_sub(y0)?));
    }
    let jpeg = matches!(
        ts_uid,
        uids::JPEG_BASELINE8_BIT
            | uids::JPEG_EXTENDED12_BIT
            | uids::JPEG_LOSSLESS
            | uids::JPEG_LOSSLESS_SV1
            | uids::JPEGLS_LOSSLESS
            | uids::JPEGLS_NEAR_LOSSLESS
    );
    if !jpeg || !data.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    // Marker segments after SOI, up to the first frame header.
    let mut at = 2;
    while at + 4 <= data.len() {
        if data[at] != 0xFF {
            return None;
        }
        let marker = data[at + 1];
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        let len = usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
        let is_sof = matches!(marker, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF | 0xF7);
        if is_sof {
            let h = data.get(at + 4..at + 9)?;
            let rows = u32::from(u16::from_be_bytes([h[1], h[2]]));
            let cols = u32::from(u16::from_be_bytes([h[3], h[4]]));
            // A height of 0 is given later (DNL); only the width is known here.
            return Some((cols, rows));
        }
        if marker == 0xDA || len < 2 {
            return None; // scan data before any frame header
        }
        at += 2 + len;
    }
    None
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

/// How stored samples become physical values (the rescale is per image).
#[derive(Debug, Clone)]
struct SampleFormat {
    bits_allocated: u16,
    bits_stored: u16,
    /// Right shift that brings the stored bits to bit 0 (`high_bit + 1 - bits_stored`).
    shift: u16,
    signed: bool,
    monochrome1: bool,
    /// Pixel Padding Value and optional Range Limit, in stored units.
    padding: Option<(i64, i64)>,
    /// What padding becomes: a fixed value (air, -1024 HU, for CT), else the smallest
    /// other value of the image.
    pad_to: Option<f32>,
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

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(|c: char| c == ' ' || c == '\0').to_owned())
        .unwrap_or_default()
}

fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.get(tag)
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| !v.is_empty() && v.iter().all(|x| x.is_finite()))
}

fn float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    floats(obj, tag).and_then(|v| v.first().copied())
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag).and_then(|e| e.to_int::<i64>().ok())
}

fn strings(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<String>> {
    obj.get(tag)
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| v.iter().map(|s| s.trim().to_owned()).collect())
}

/// Gives elements of VR UN whose tag the standard dictionary knows their proper VR
/// and value, in the data set and in its sequence items.
///
/// A system that converts an implicit VR file to explicit VR writes UN for every
/// attribute its own dictionary lacks (newer standard attributes, often whole
/// functional groups), and the parser then holds their values as raw bytes: read as
/// numbers, a position `"-125.0\\..."` would become the codes of its characters.
/// Text VRs are decoded as text; binary numbers in the data set's byte order (US or
/// SS after Pixel Representation where the dictionary says either); sequences, other
/// ambiguous VRs and private attributes stay as they are.
fn retype_unknown(obj: &mut InMemDicomObject, big_endian: bool, depth: usize) {
    use dicom_core::dictionary::VirtualVr;
    use dicom_core::value::{DataSetSequence, Value};
    use dicom_core::{DataElement, PrimitiveValue};

    if depth > 16 {
        return;
    }
    let tags: Vec<Tag> = obj
        .iter()
        .filter(|e| e.vr() == VR::UN || e.vr() == VR::SQ)
        .map(|e| e.tag())
        .collect();
    for tag in tags {
        let Some(element) = obj.take(tag) else {
            continue;
        };
        let vr = element.vr();
        let element = match element.into_value() {
            Value::Sequence(seq) => {
                let mut items = seq.into_items();
                for item in items.iter_mut() {
                    retype_unknown(item, big_endian, depth + 1);
                }
                DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
            }
            Value::Primitive(PrimitiveValue::U8(bytes)) if vr == VR::UN => {
                let known = StandardDataDictionary
                    .by_tag(tag)
                    .and_then(|e| match e.vr() {
                        VirtualVr::Exact(v) => Some(v),
                        // US or SS after Pixel Representation, which precedes them.
                        VirtualVr::Xs => Some(if int(obj, tags::PIXEL_REPRESENTATION) == Some(1) {
                            VR::SS
                        } else {
                            VR::US
                        }),
                        _ => None,
                    });
                match known.and_then(|v| Some((v, typed_value(v, &bytes, big_endian)?))) {
                    Some((v, value)) => DataElement::new(tag, v, value),
                    None => DataElement::new(tag, VR::UN, PrimitiveValue::U8(bytes)),
                }
            }
            other => DataElement::new(tag, vr, other),
        };
        obj.put(element);
    }
}

/// The value of UN bytes read as `vr`; `None` where the bytes do not fit it.
fn typed_value(vr: VR, bytes: &[u8], big_endian: bool) -> Option<dicom_core::PrimitiveValue> {
    use dicom_core::PrimitiveValue;
    use dicom_core::smallvec::SmallVec;

    fn numbers<const N: usize, T>(
        bytes: &[u8],
        big_endian: bool,
        from: fn([u8; N]) -> T,
        from_be: fn([u8; N]) -> T,
    ) -> Option<SmallVec<[T; 2]>> {
        if !bytes.len().is_multiple_of(N) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let a: [u8; N] = c.try_into().expect("chunk of N");
                    if big_endian { from_be(a) } else { from(a) }
                })
                .collect(),
        )
    }
    Some(match vr {
        VR::AE
        | VR::AS
        | VR::CS
        | VR::DA
        | VR::DS
        | VR::DT
        | VR::IS
        | VR::LO
        | VR::PN
        | VR::SH
        | VR::TM
        | VR::UC
        | VR::UI => {
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim_end_matches(['\0', ' ']);
            PrimitiveValue::Strs(text.split('\\').map(str::to_owned).collect())
        }
        VR::LT | VR::ST | VR::UT | VR::UR => {
            let text = String::from_utf8_lossy(bytes);
            PrimitiveValue::Str(text.trim_end_matches(['\0', ' ']).to_owned())
        }
        VR::US => PrimitiveValue::U16(numbers(
            bytes,
            big_endian,
            u16::from_le_bytes,
            u16::from_be_bytes,
        )?),
        VR::SS => PrimitiveValue::I16(numbers(
            bytes,
            big_endian,
            i16::from_le_bytes,
            i16::from_be_bytes,
        )?),
        VR::UL => PrimitiveValue::U32(numbers(
            bytes,
            big_endian,
            u32::from_le_bytes,
            u32::from_be_bytes,
        )?),
        VR::SL => PrimitiveValue::I32(numbers(
            bytes,
            big_endian,
            i32::from_le_bytes,
            i32::from_be_bytes,
        )?),
        VR::FL => PrimitiveValue::F32(numbers(
            bytes,
            big_endian,
            f32::from_le_bytes,
            f32::from_be_bytes,
        )?),
        VR::FD => PrimitiveValue::F64(numbers(
            bytes,
            big_endian,
            f64::from_le_bytes,
            f64::from_be_bytes,
        )?),
        _ => return None,
    })
}

/// The first item of a sequence.
fn item(obj: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    obj.get(tag).and_then(|e| e.items()).and_then(|i| i.first())
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

/// Checks the bit layout and reads the sample format.
fn sample_format(
    obj: &InMemDicomObject,
    monochrome1: bool,
    pad_to: Option<f32>,
) -> Result<SampleFormat, String> {
    let bits_allocated = int(obj, tags::BITS_ALLOCATED)
        .ok_or_else(|| "the Bits Allocated attribute is missing or invalid".to_owned())?;
    if ![8, 16, 32].contains(&bits_allocated) {
        return Err(format!(
            "{bits_allocated} bits allocated per sample are not supported (8, 16 or 32)"
        ));
    }
    let bits_stored = int(obj, tags::BITS_STORED).unwrap_or(bits_allocated);
    let high_bit = int(obj, tags::HIGH_BIT).unwrap_or(bits_stored - 1);
    if bits_stored < 1
        || bits_stored > bits_allocated
        || high_bit + 1 < bits_stored
        || high_bit >= bits_allocated
    {
        return Err(format!(
            "inconsistent bit layout: {bits_allocated} allocated, {bits_stored} stored, high bit {high_bit}"
        ));
    }
    let mut format = SampleFormat {
        bits_allocated: bits_allocated as u16,
        bits_stored: bits_stored as u16,
        shift: (high_bit + 1 - bits_stored) as u16,
        signed: int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1,
        monochrome1,
        padding: None,
        pad_to,
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
    Ok(format)
}

fn read_images(
    obj: &DefaultDicomObject,
    ts: &TransferSyntax,
    storage: Storage,
) -> Result<InstanceHeader, DecodeError> {
    let size = |tag: Tag, name: &str| {
        int(obj, tag)
            .filter(|v| (1..=65535).contains(v))
            .map(|v| v as usize)
            .ok_or_else(|| {
                DecodeError::UnsupportedImage(format!("the {name} attribute is missing or invalid"))
            })
    };
    let rows = size(tags::ROWS, "Rows")?;
    let cols = size(tags::COLUMNS, "Columns")?;
    let frames = int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    if frames > MAX_FRAMES {
        return Err(DecodeError::UnsupportedImage(format!(
            "{frames} frames in one object are more than the limit of {MAX_FRAMES}"
        )));
    }
    let frames = frames as u32;
    let samples = int(obj, tags::SAMPLES_PER_PIXEL)
        .and_then(|v| u16::try_from(v).ok())
        .unwrap_or(1);
    let photometric = text(obj, tags::PHOTOMETRIC_INTERPRETATION);
    let slope = float(obj, tags::RESCALE_SLOPE)
        .filter(|s| *s != 0.0)
        .unwrap_or(1.0);
    let intercept = float(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    let base = SliceHeader {
        sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID),
        instance_number: int(obj, tags::INSTANCE_NUMBER).and_then(|v| i32::try_from(v).ok()),
        image_position: position(obj),
        image_orientation: orientation(obj),
        pixel_spacing: pixel_spacing(obj),
        rows,
        cols,
        number_of_frames: frames,
        frame: 0,
        tile: None,
        modality: text(obj, tags::MODALITY),
        body_part: text(obj, tags::BODY_PART_EXAMINED),
        series_description: text(obj, tags::SERIES_DESCRIPTION),
        study_uid: text(obj, tags::STUDY_INSTANCE_UID),
        series_uid: text(obj, tags::SERIES_INSTANCE_UID),
        study_date: text(obj, tags::STUDY_DATE),
        image_type: strings(obj, tags::IMAGE_TYPE).unwrap_or_default(),
        photometric,
        samples_per_pixel: samples,
        sop_class_uid: sop_class_uid(obj),
        transfer_syntax: ts.uid().to_owned(),
        rescale: (slope, intercept),
        slice_thickness: float(obj, tags::SLICE_THICKNESS).filter(|t| *t > 0.0),
    };
    let format = if base.is_greyscale() {
        // Padding marks pixels outside the scanned field; for CT they become air.
        let pad_to = (base.modality == "CT").then_some(-1024.0);
        sample_format(obj, base.photometric == "MONOCHROME1", pad_to)
    } else {
        Err(format!(
            "colour images ({samples} samples per pixel, {}) are not supported",
            base.photometric
        ))
    };
    let plan = PixelPlan {
        ts_uid: ts.uid().to_owned(),
        ts_name: ts.name().to_owned(),
        storage,
        format,
        frame_rows: rows,
        frame_cols: cols,
        frames,
        opaque_un: Vec::new(),
        big_endian: false,
    };

    let images = if obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .is_some()
    {
        enhanced_frames(obj, &base)?
    } else if base.image_type.iter().any(|t| t == "MOSAIC") && frames == 1 {
        mosaic_tiles(obj, &base)?
    } else {
        // Classic images; a multi-frame object without functional groups has one
        // position for all its frames.
        (0..frames)
            .map(|frame| SliceHeader {
                frame,
                ..base.clone()
            })
            .collect()
    };
    Ok(InstanceHeader { images, plan })
}

fn position(obj: &InMemDicomObject) -> Option<[f64; 3]> {
    floats(obj, tags::IMAGE_POSITION_PATIENT)
        .filter(|v| v.len() >= 3)
        .map(|v| [v[0], v[1], v[2]])
}

fn orientation(obj: &InMemDicomObject) -> Option<[f64; 6]> {
    floats(obj, tags::IMAGE_ORIENTATION_PATIENT)
        .filter(|v| v.len() >= 6)
        .map(|v| [v[0], v[1], v[2], v[3], v[4], v[5]])
}

fn pixel_spacing(obj: &InMemDicomObject) -> Option<[f64; 2]> {
    floats(obj, tags::PIXEL_SPACING)
        .filter(|v| v.len() >= 2 && v[0] > 0.0 && v[1] > 0.0)
        .map(|v| [v[0], v[1]])
}

/// One header per frame of an enhanced object: each functional group is looked up in
/// the frame's own item first, then in the shared item.
fn enhanced_frames(
    obj: &DefaultDicomObject,
    base: &SliceHeader,
) -> Result<Vec<SliceHeader>, DecodeError> {
    let per_frame = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .unwrap_or(&[]);
    if per_frame.len() < base.number_of_frames as usize {
        return Err(DecodeError::Malformed(format!(
            "the per-frame functional groups describe {} of {} frames",
            per_frame.len(),
            base.number_of_frames
        )));
    }
    let shared = item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let frame_type_sequences = [
        tags::CT_IMAGE_FRAME_TYPE_SEQUENCE,
        tags::MR_IMAGE_FRAME_TYPE_SEQUENCE,
        tags::PET_FRAME_TYPE_SEQUENCE,
    ];
    let frames = (0..base.number_of_frames)
        .map(|frame| {
            let own = &per_frame[frame as usize];
            // The macro `seq` of this frame, else of the shared group.
            let group = |seq: Tag| item(own, seq).or_else(|| shared.and_then(|s| item(s, seq)));
            let mut h = SliceHeader {
                frame,
                ..base.clone()
            };
            if let Some(g) = group(tags::PLANE_POSITION_SEQUENCE) {
                h.image_position = position(g);
            }
            if let Some(g) = group(tags::PLANE_ORIENTATION_SEQUENCE) {
                h.image_orientation = orientation(g);
            }
            if let Some(g) = group(tags::PIXEL_MEASURES_SEQUENCE) {
                h.pixel_spacing = pixel_spacing(g).or(h.pixel_spacing);
                h.slice_thickness = float(g, tags::SLICE_THICKNESS)
                    .filter(|t| *t > 0.0)
                    .or(h.slice_thickness);
            }
            if let Some(g) = group(tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE) {
                let slope = float(g, tags::RESCALE_SLOPE).filter(|s| *s != 0.0);
                let intercept = float(g, tags::RESCALE_INTERCEPT);
                h.rescale = (slope.unwrap_or(1.0), intercept.unwrap_or(0.0));
            }
            if let Some(t) = frame_type_sequences
                .iter()
                .find_map(|seq| group(*seq))
                .and_then(|g| strings(g, tags::FRAME_TYPE))
            {
                h.image_type = t;
            }
            h
        })
        .collect();
    Ok(frames)
}

/// One header per slice of a Siemens mosaic.
fn mosaic_tiles(
    obj: &DefaultDicomObject,
    base: &SliceHeader,
) -> Result<Vec<SliceHeader>, DecodeError> {
    let fail = |m: &str| DecodeError::Mosaic(m.to_owned());
    let position = base
        .image_position
        .ok_or_else(|| fail("it has no Image Position (Patient)"))?;
    let orientation = base
        .image_orientation
        .ok_or_else(|| fail("it has no Image Orientation (Patient)"))?;
    let pixel_spacing = base
        .pixel_spacing
        .ok_or_else(|| fail("it has no Pixel Spacing"))?;
    let images = private_element(obj, 0x0019, "SIEMENS MR HEADER", 0x0A)
        .and_then(private_uint)
        .map(|v| v as usize);
    let csa: Option<HashMap<String, Vec<String>>> =
        private_element(obj, 0x0029, "SIEMENS CSA HEADER", 0x10)
            .and_then(|e| e.to_bytes().ok())
            .and_then(|b| mosaic::parse_csa(&b).ok());
    let slice_step = float(obj, tags::SPACING_BETWEEN_SLICES)
        .filter(|v| *v > 0.0)
        .or(base.slice_thickness)
        .unwrap_or(1.0);
    let layout = mosaic::layout(&mosaic::MosaicInput {
        rows: base.rows,
        cols: base.cols,
        position,
        orientation,
        pixel_spacing,
        slice_step,
        images,
        csa: csa.as_ref(),
    })
    .map_err(DecodeError::Mosaic)?;
    Ok(layout
        .positions
        .iter()
        .enumerate()
        .map(|(k, p)| SliceHeader {
            image_position: Some(*p),
            rows: layout.tile_rows,
            cols: layout.tile_cols,
            tile: Some(MosaicTile {
                index: k as u32,
                grid: layout.grid as u32,
            }),
            ..base.clone()
        })
        .collect())
}

/// The element `(group, xxNN)` of the private block reserved by `creator`.
fn private_element<'a>(
    obj: &'a InMemDicomObject,
    group: u16,
    creator: &str,
    element: u8,
) -> Option<&'a InMemElement> {
    let block = (0x10u16..=0xFF).find(|b| text(obj, Tag(group, *b)) == creator)?;
    obj.get(Tag(group, (block << 8) | u16::from(element)))
}

/// An unsigned value, whether parsed as a number or left as two raw bytes (UN).
fn private_uint(e: &InMemElement) -> Option<u32> {
    match e.value() {
        dicom_core::DicomValue::Primitive(dicom_core::PrimitiveValue::U8(b)) if b.len() == 2 => {
            Some(u32::from(u16::from_le_bytes([b[0], b[1]])))
        }
        _ => e.to_int::<u32>().ok(),
    }
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

/// Converts `out.len()` raw samples to physical `f32` values in one pass.
fn convert(raw: &[u8], endian: Endian, f: &SampleFormat, rescale: (f64, f64), out: &mut [f32]) {
    let (slope, intercept) = rescale;
    // MONOCHROME1 is mirrored inside the physical range of the stored values, which folds
    // into the linear modality LUT: v' = (lo + hi) - (slope * s + intercept).
    let (smin, smax) = f.stored_range();
    let (pmin, pmax) = {
        let a = slope * smin as f64 + intercept;
        let b = slope * smax as f64 + intercept;
        (a.min(b), a.max(b))
    };
    let (slope, intercept) = if f.monochrome1 {
        (-slope, pmin + pmax - intercept)
    } else {
        (slope, intercept)
    };
    let (slope32, intercept32) = (slope as f32, intercept as f32);
    let raw = &raw[..out.len() * f.bytes_per_sample()];
    match f.padding {
        None => fill(out, raw, endian, f, |s: i64| {
            s as f32 * slope32 + intercept32
        }),
        Some((lo, hi)) => {
            fill(out, raw, endian, f, |s: i64| {
                if (lo..=hi).contains(&s) {
                    f32::NAN
                } else {
                    s as f32 * slope32 + intercept32
                }
            });
            let fill = f.pad_to.unwrap_or_else(|| {
                let min = out
                    .iter()
                    .copied()
                    .filter(|v| !v.is_nan())
                    .fold(f32::INFINITY, f32::min);
                if min.is_finite() { min } else { pmin as f32 }
            });
            for v in out.iter_mut().filter(|v| v.is_nan()) {
                *v = fill;
            }
        }
    }
}

fn fill(out: &mut [f32], raw: &[u8], endian: Endian, f: &SampleFormat, map: impl Fn(i64) -> f32) {
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
    let put = |out: &mut [f32], values: &mut dyn Iterator<Item = f32>| {
        for (o, v) in out.iter_mut().zip(values) {
            *o = v;
        }
    };
    match (f.bits_allocated, endian) {
        (8, _) => put(out, &mut raw.iter().map(|&b| map(small(u32::from(b))))),
        (16, Endian::Little) => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = map(small(u32::from(u16::from_le_bytes([c[0], c[1]]))));
            }
        }
        (16, Endian::Big) => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = map(small(u32::from(u16::from_be_bytes([c[0], c[1]]))));
            }
        }
        (_, Endian::Little) => put(
            out,
            &mut raw
                .chunks_exact(4)
                .map(|c| map(f.stored(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
        ),
        (_, Endian::Big) => put(
            out,
            &mut raw
                .chunks_exact(4)
                .map(|c| map(f.stored(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))),
        ),
    }
}

#[cfg(test)]
impl InstanceHeader {
    /// A header of one image that cannot be decoded, for tests of selection.
    pub(crate) fn for_tests(image: SliceHeader) -> Self {
        let plan = PixelPlan {
            ts_uid: String::new(),
            ts_name: String::new(),
            storage: Storage::Deflated,
            format: Err("test header".into()),
            frame_rows: image.rows,
            frame_cols: image.cols,
            frames: 1,
            opaque_un: Vec::new(),
            big_endian: false,
        };
        InstanceHeader {
            images: vec![image],
            plan,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn j2k_siz_is_read_from_codestream_and_jp2() {
        let mut cs = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        cs.extend_from_slice(&[0; 32]);
        cs.extend_from_slice(&[0, 1]);
        cs.push(0x80 | 12); // signed, 13 bits
        cs.extend_from_slice(&[1, 1]);
        assert_eq!(j2k_component_format(&cs), Some((13, true)));
        let mut jp2 = b"\0\0\0\x0cjP  \r\n\x87\n....jp2c".to_vec();
        cs[42] = 15; // unsigned, 16 bits
        jp2.extend_from_slice(&cs);
        assert_eq!(j2k_component_format(&jp2), Some((16, false)));
        assert_eq!(j2k_component_format(&cs[..30]), None);
        assert_eq!(j2k_component_format(b"nothing here"), None);
    }

    #[test]
    fn stream_dimensions_come_from_siz_and_sof() {
        // JPEG 2000: Xsiz 600, Ysiz 500, XOsiz 88, YOsiz 0 -> 512 x 500.
        let mut cs = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        for v in [600u32, 500, 88, 0, 600, 500, 0, 0] {
            cs.extend_from_slice(&v.to_be_bytes());
        }
        cs.extend_from_slice(&[0, 1, 15, 1, 1]);
        assert_eq!(stream_dimensions(uids::JPEG2000, &cs), Some((512, 500)));
        let mut jp2 = b"\0\0\0\x0cjP  \r\n\x87\n....jp2c".to_vec();
        jp2.extend_from_slice(&cs);
        assert_eq!(
            stream_dimensions(uids::JPEG2000_LOSSLESS, &jp2),
            Some((512, 500))
        );
        assert_eq!(stream_dimensions(uids::JPEG2000, &cs[..20]), None);
        // JPEG: SOI, an APP0 segment, a fill byte, then SOF3 of 300 rows x 400 columns.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0xAA, 0xBB, 0xFF];
        jpeg.extend_from_slice(&[0xFF, 0xC3, 0, 11, 16, 0x01, 0x2C, 0x01, 0x90, 1, 1, 0x11, 0]);
        assert_eq!(
            stream_dimensions(uids::JPEG_LOSSLESS_SV1, &jpeg),
            Some((400, 300))
        );
        // JPEG-LS frame header (SOF55) the same way.
        jpeg[10] = 0xF7;
        assert_eq!(
            stream_dimensions(uids::JPEGLS_LOSSLESS, &jpeg),
            Some((400, 300))
        );
        // Scan data before any frame header, other syntaxes, or no SOI: no claim.
        assert_eq!(
            stream_dimensions(uids::JPEG_BASELINE8_BIT, &[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]),
            None
        );
        assert_eq!(stream_dimensions(uids::RLE_LOSSLESS, &jpeg), None);
        assert_eq!(stream_dimensions(uids::JPEG_LOSSLESS_SV1, &jpeg[2..]), None);
    }
}
