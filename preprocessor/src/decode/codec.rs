//! Codec dispatch: the pixel data of the chosen frames, native, in a deflated data
//! set or encapsulated, through radflow's own JPEG decoders where they apply
//! ([`crate::jpeg_lossless`], [`crate::jpeg_extended`]) and dicom-pixeldata's codecs
//! otherwise, with the checks on each compressed stream's own header that keep a
//! damaged or hostile stream from costing gigabytes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::adapters::PixelDataObject;
use dicom_encoding::transfer_syntax::Codec;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use super::attributes::sop_class_uid;
use super::samples::write_images;
use super::{chain, frame_bytes};
use crate::decode_error::DecodeError;
use crate::header::{Endian, InstanceHeader, PixelPlan, Storage};
use crate::jpeg_extended;
use crate::jpeg_lossless;
use crate::jpeg_stream::JpegError;
use crate::scan;

pub(super) fn decode_checked(
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

fn is_jpeg2000(ts: &str) -> bool {
    ts.starts_with("1.2.840.10008.1.2.4.9") || ts.starts_with("1.2.840.10008.1.2.4.20")
}

/// Precision and signedness of the first component of a JPEG 2000 codestream (its
/// SIZ marker segment), from a raw codestream or a JP2 file.
fn j2k_component_format(data: &[u8]) -> Option<(u16, bool)> {
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
fn stream_dimensions(ts_uid: &str, data: &[u8]) -> Option<(u32, u32)> {
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
