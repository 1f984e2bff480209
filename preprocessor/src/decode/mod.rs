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
//! (`un::retype_unknown`).
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

mod attributes;
mod codec;
mod images;
mod samples;
mod un;

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::transfer_syntax::{Codec, Endianness};
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

pub use crate::decode_error::DecodeError;
pub use crate::header::{DecodedSlice, InstanceHeader, MosaicTile, SliceHeader};
use crate::header::{Endian, PixelPlan, SampleFormat, Storage};
use crate::scan::{self, PixelSpan};

/// Largest decoded pixel buffer accepted for one frame (1 GiB). Compressed pixel data
/// can legitimately be thousands of times smaller than its decoded form (a blank
/// slice), so the decoded size of compressed data is bounded by this limit rather than
/// by a ratio.
pub const MAX_DECODED_BYTES: usize = 1 << 30;

/// Most bytes all the images of one file may decode to (as 32-bit floats): 4 GiB, a
/// 4000-frame 512 × 512 object.
pub const MAX_DECODED_TOTAL_BYTES: usize = 1 << 32;

/// Most frames accepted in one object.
const MAX_FRAMES: i64 = 100_000;

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
    // Judged before the buffers are allocated from the header's dimensions.
    header.check_decodable()?;
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
    un::retype_unknown(&mut obj, scan.big_endian, 0);
    let Some(pixel) = pixel else {
        return Err(DecodeError::NoPixelData {
            sop_class_uid: attributes::sop_class_uid(&obj),
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
    let mut header = images::read_images(&obj, ts, storage)?;
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
        // All frames as the 32-bit floats they are decoded into, before anything is
        // allocated: a header must not make us ask for more than a volume may hold.
        let decoded = p
            .frame_rows
            .checked_mul(p.frame_cols)
            .and_then(|n| n.checked_mul(p.frames as usize))
            .and_then(|n| n.checked_mul(std::mem::size_of::<f32>()))
            .unwrap_or(usize::MAX);
        if decoded > MAX_DECODED_TOTAL_BYTES {
            return Err(DecodeError::TooLarge {
                bytes: decoded,
                limit: MAX_DECODED_TOTAL_BYTES,
            });
        }
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
        codec::decode_checked(bytes, header, targets)
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
