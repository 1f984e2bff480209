//! `decode::read_slice` against files built here in memory: bit layouts, photometric
//! inversion, padding, every uncompressed syntax, lossless codecs, and each failure an
//! operator can meet.

use dicom_core::value::{C, PixelFragmentSequence};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::Transcode;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
use radflow_preprocessor::decode::{DecodeError, read_slice};

const PATIENT: &str = "DOE^JANE";

/// A minimal CT image data set with the given bit layout and raw stored samples.
fn image(rows: u16, cols: u16, bits: (u16, u16, u16), signed: bool) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    let s = |o: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str| {
        o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    s(&mut o, tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE);
    s(&mut o, tags::SOP_INSTANCE_UID, VR::UI, "2.25.1234");
    s(&mut o, tags::MODALITY, VR::CS, "CT");
    s(&mut o, tags::PATIENT_NAME, VR::PN, PATIENT);
    s(&mut o, tags::PATIENT_ID, VR::LO, "ID-12345");
    s(
        &mut o,
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        "-10\\20.5\\-30",
    );
    s(
        &mut o,
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        "1\\0\\0\\0\\1\\0",
    );
    s(&mut o, tags::PIXEL_SPACING, VR::DS, "0.5\\0.75");
    s(&mut o, tags::SLICE_THICKNESS, VR::DS, "2.5");
    s(&mut o, tags::INSTANCE_NUMBER, VR::IS, "7");
    s(
        &mut o,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    for (tag, v) in [
        (tags::SAMPLES_PER_PIXEL, 1),
        (tags::ROWS, rows),
        (tags::COLUMNS, cols),
        (tags::BITS_ALLOCATED, bits.0),
        (tags::BITS_STORED, bits.1),
        (tags::HIGH_BIT, bits.2),
        (tags::PIXEL_REPRESENTATION, u16::from(signed)),
    ] {
        o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    o
}

fn put_u16_pixels(o: &mut InMemDicomObject, raw: &[u16]) {
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(C::from_slice(raw)),
    ));
}

fn rescale(o: &mut InMemDicomObject, slope: &str, intercept: &str) {
    o.put(DataElement::new(
        tags::RESCALE_SLOPE,
        VR::DS,
        PrimitiveValue::from(slope),
    ));
    o.put(DataElement::new(
        tags::RESCALE_INTERCEPT,
        VR::DS,
        PrimitiveValue::from(intercept),
    ));
}

fn file(o: InMemDicomObject, ts: &str) -> Vec<u8> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(uids::CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid("2.25.1234")
        .transfer_syntax(ts)
        .implementation_class_uid("2.25.99")
        .build()
        .unwrap();
    let mut out = Vec::new();
    o.with_exact_meta(meta).write_all(&mut out).unwrap();
    out
}

/// 4×3 signed 16-bit CT with a spread of values.
fn ct() -> (InMemDicomObject, Vec<i16>) {
    let values: Vec<i16> = vec![-1024, -1000, -50, 0, 1, 40, 700, 2000, 3071, -3024, 12, 99];
    let mut o = image(3, 4, (16, 16, 15), true);
    rescale(&mut o, "1", "-1024");
    let raw: Vec<u16> = values.iter().map(|v| (*v + 1024) as u16).collect();
    put_u16_pixels(&mut o, &raw);
    (o, values)
}

fn hu(values: &[i16]) -> Vec<f32> {
    values.iter().map(|v| f32::from(*v)).collect()
}

fn assert_operator_message(e: &DecodeError) {
    let msg = e.to_string();
    assert!(!msg.contains("DOE") && !msg.contains("ID-12345"), "{msg}");
    assert!(msg.len() > 20, "{msg}");
}

#[test]
fn signed_ct_in_hu_with_header() {
    let (o, values) = ct();
    let s = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap();
    assert_eq!(s.pixels, hu(&values));
    let h = &s.header;
    assert_eq!((h.rows, h.cols), (3, 4));
    assert_eq!(h.image_position, Some([-10.0, 20.5, -30.0]));
    assert_eq!(h.image_orientation, Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
    assert_eq!(h.pixel_spacing, Some([0.5, 0.75]));
    assert_eq!(h.slice_thickness, Some(2.5));
    assert_eq!(h.instance_number, Some(7));
    assert_eq!(h.rescale, (1.0, -1024.0));
    assert_eq!(h.sop_instance_uid, "2.25.1234");
    assert_eq!(h.sop_class_uid, uids::CT_IMAGE_STORAGE);
    // Nothing in the header value carries demographics.
    assert!(!format!("{h:?}").contains("DOE"));
}

#[test]
fn every_uncompressed_syntax_gives_the_same_pixels() {
    let (_, values) = ct();
    for ts in [
        uids::IMPLICIT_VR_LITTLE_ENDIAN,
        uids::EXPLICIT_VR_LITTLE_ENDIAN,
        #[allow(deprecated)]
        uids::EXPLICIT_VR_BIG_ENDIAN,
        uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    ] {
        let (o, _) = ct();
        let s = read_slice(&file(o, ts)).unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert_eq!(s.pixels, hu(&values), "{ts}");
        assert_eq!(s.header.transfer_syntax, ts);
        assert_eq!(s.header.image_position, Some([-10.0, 20.5, -30.0]), "{ts}");
    }
}

#[test]
fn stored_bits_are_masked_and_sign_extended() {
    // 12 bits stored in 16, garbage in the top nibble.
    let raw = [0xF000 | 0x0FFF, 0x0800, 0xA000 | 5, 0x07FF];
    let mut o = image(2, 2, (16, 12, 11), false);
    put_u16_pixels(&mut o, &raw);
    let s = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap();
    assert_eq!(s.pixels, [4095.0, 2048.0, 5.0, 2047.0]);

    let mut o = image(2, 2, (16, 12, 11), true);
    put_u16_pixels(&mut o, &raw);
    rescale(&mut o, "2", "10");
    let s = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap();
    assert_eq!(
        s.pixels,
        [-2.0 + 10.0, -2048.0 * 2.0 + 10.0, 20.0, 2047.0 * 2.0 + 10.0]
    );
}

#[test]
fn eight_bit_monochrome1_is_inverted() {
    let mut o = image(1, 3, (8, 8, 7), false);
    o.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from("MONOCHROME1"),
    ));
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(C::from_slice(&[0u8, 255, 100, 0])),
    ));
    let s = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap();
    // Larger is brighter: stored 0 (white in MONOCHROME1) becomes the maximum.
    assert_eq!(s.pixels, [255.0, 0.0, 155.0]);
}

#[test]
fn padding_becomes_air_in_ct_and_the_minimum_elsewhere() {
    let padded = |modality: &str| {
        let (mut o, values) = ct();
        o.put(DataElement::new(
            tags::MODALITY,
            VR::CS,
            PrimitiveValue::from(modality),
        ));
        // Stored padding value -2000 (PixelRepresentation signed): the -3024 pixel.
        o.put(DataElement::new(
            tags::PIXEL_PADDING_VALUE,
            VR::SS,
            PrimitiveValue::from(-2000i16),
        ));
        let raw: Vec<u16> = values.iter().map(|v| (*v + 1024) as u16).collect();
        put_u16_pixels(&mut o, &raw);
        (
            read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap(),
            values,
        )
    };
    let at = |values: &[i16]| values.iter().position(|v| *v == -3024).unwrap();
    let (s, values) = padded("CT");
    let i = at(&values);
    assert_eq!(s.pixels[i], -1024.0);
    let mut rest = hu(&values);
    rest[i] = -1024.0;
    assert_eq!(s.pixels, rest);

    // Elsewhere: the smallest other value of the image (-1000 here).
    let (mut o, mut values) = ct();
    values[0] = -1000;
    o.put(DataElement::new(
        tags::MODALITY,
        VR::CS,
        PrimitiveValue::from("PT"),
    ));
    o.put(DataElement::new(
        tags::PIXEL_PADDING_VALUE,
        VR::SS,
        PrimitiveValue::from(-2000i16),
    ));
    let raw: Vec<u16> = values.iter().map(|v| (*v + 1024) as u16).collect();
    put_u16_pixels(&mut o, &raw);
    let s = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap();
    assert_eq!(s.pixels[at(&values)], -1000.0);
}

/// `o` as a Part-10 file in JPEG-LS Lossless, encoded by dicom-pixeldata (CharLS).
fn jpeg_ls(o: InMemDicomObject) -> Vec<u8> {
    let bytes = file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN);
    let mut obj = OpenFileOptions::new().from_reader(&bytes[..]).unwrap();
    let ts = TransferSyntaxRegistry
        .get(uids::JPEGLS_LOSSLESS)
        .expect("JPEG-LS is registered");
    obj.transcode(ts).unwrap();
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

#[test]
fn jpeg_ls_lossless_decodes_exactly() {
    let (o, values) = ct();
    let out = jpeg_ls(o);
    let s = read_slice(&out).unwrap();
    assert_eq!(s.header.transfer_syntax, uids::JPEGLS_LOSSLESS);
    assert_eq!(s.pixels, hu(&values));
}

/// A JPEG-LS frame header that claims far more samples than Rows and Columns is
/// refused before the codec allocates for it.
#[test]
fn a_stream_larger_than_the_image_is_refused_before_decoding() {
    let (o, _) = ct();
    let mut out = jpeg_ls(o);
    let sof = out
        .windows(2)
        .position(|w| w == [0xFF, 0xF7])
        .expect("a JPEG-LS frame header");
    out[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]); // 60000 x 60000
    let e = read_slice(&out).unwrap_err();
    assert!(matches!(e, DecodeError::Codec { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("the stream holds 60000x60000 samples"),
        "{e}"
    );
}

/// RLE Lossless of 16-bit samples: a 64-byte header, then one PackBits segment for
/// the high bytes and one for the low bytes (literal runs only).
fn rle_encode(samples: &[u16]) -> Vec<u8> {
    let planes: [Vec<u8>; 2] = [
        samples.iter().map(|s| (s >> 8) as u8).collect(),
        samples.iter().map(|s| *s as u8).collect(),
    ];
    let mut segments = Vec::new();
    for plane in &planes {
        let mut seg = Vec::new();
        for chunk in plane.chunks(128) {
            seg.push((chunk.len() - 1) as u8);
            seg.extend_from_slice(chunk);
        }
        if seg.len() % 2 == 1 {
            seg.push(0);
        }
        segments.push(seg);
    }
    let mut out = vec![0u8; 64];
    out[0..4].copy_from_slice(&2u32.to_le_bytes());
    out[4..8].copy_from_slice(&64u32.to_le_bytes());
    out[8..12].copy_from_slice(&(64 + segments[0].len() as u32).to_le_bytes());
    for s in segments {
        out.extend_from_slice(&s);
    }
    out
}

/// The test CT as RLE Lossless, its segments holding the first `keep` samples only.
fn rle_ct(keep: impl Fn(usize) -> usize) -> (Vec<u8>, Vec<i16>) {
    let (mut o, values) = ct();
    let raw: Vec<u16> = values.iter().map(|v| (*v + 1024) as u16).collect();
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new_fragments(vec![rle_encode(&raw[..keep(raw.len())])]),
    ));
    (file(o, uids::RLE_LOSSLESS), values)
}

#[test]
fn rle_lossless_decodes_exactly() {
    let (bytes, values) = rle_ct(|n| n);
    let s = read_slice(&bytes).unwrap();
    assert_eq!(s.pixels, hu(&values));
}

/// RLE segments that decode to half a frame: dicom-pixeldata's decoder indexes past
/// them and panics; the panic is this file's codec error.
#[test]
fn rle_segments_shorter_than_the_frame_are_a_codec_error() {
    let (bytes, _) = rle_ct(|n| n / 2);
    let e = read_slice(&bytes).unwrap_err();
    assert!(matches!(e, DecodeError::Codec { .. }), "{e:?}");
    assert!(e.to_string().contains("failed on damaged data"), "{e}");
    assert_operator_message(&e);
}

#[test]
fn truncated_pixel_data_is_reported() {
    let (o, _) = ct();
    let bytes = file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN);
    let e = read_slice(&bytes[..bytes.len() - 5]).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::TruncatedPixelData {
                expected: 24,
                present: 19
            }
        ),
        "{e:?}"
    );
    assert_operator_message(&e);

    // Pixel data shorter than rows × cols × 2 although the element itself is whole.
    let mut o = image(3, 4, (16, 16, 15), true);
    put_u16_pixels(&mut o, &[0; 6]);
    let e = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::TruncatedPixelData {
                expected: 24,
                present: 12
            }
        ),
        "{e:?}"
    );
}

#[test]
fn hostile_lengths_are_refused_before_parsing() {
    let (o, _) = ct();
    let mut bytes = file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN);
    // Rewrite the Patient Name element (short VR, 2-byte length) as an UN element
    // claiming almost 4 GiB.
    let pos = bytes
        .windows(4)
        .position(|w| w == [0x10, 0x00, 0x10, 0x00])
        .unwrap();
    let huge = [b'U', b'N', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF];
    bytes.splice(pos + 4..pos + 8, huge);
    let start = std::time::Instant::now();
    let e = read_slice(&bytes).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
    assert!(start.elapsed().as_millis() < 500);
    assert_operator_message(&e);
}

#[test]
fn meta_group_is_bounded_by_its_group_length() {
    // An element of group 0002 placed after the meta group's declared length is read
    // as part of the (implicit VR) data set, where its VR and reserved bytes become a
    // 4 GiB length. The scan must see it the way the parser does.
    let (o, _) = ct();
    let mut bytes = file(o, uids::IMPLICIT_VR_LITTLE_ENDIAN);
    let group_length = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    let start = 144 + group_length;
    let sneaky = [
        0x02, 0x00, 0x99, 0x00, b'X', b'X', 0xFF, 0xFF, 4, 0, 0, 0, 1, 2, 3, 4,
    ];
    bytes.splice(start..start, sneaky);
    let begin = std::time::Instant::now();
    let e = read_slice(&bytes).unwrap_err();
    assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
    assert!(begin.elapsed().as_millis() < 500);
}

#[test]
fn non_images_and_unsupported_objects() {
    // No pixel data: e.g. a structured report.
    let mut o = InMemDicomObject::new_empty();
    o.put(DataElement::new(
        tags::SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from(uids::BASIC_TEXT_SR_STORAGE),
    ));
    o.put(DataElement::new(
        tags::PATIENT_NAME,
        VR::PN,
        PrimitiveValue::from(PATIENT),
    ));
    let e = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap_err();
    assert!(matches!(e, DecodeError::NoPixelData { .. }), "{e:?}");
    assert!(e.to_string().contains(uids::BASIC_TEXT_SR_STORAGE));
    assert_operator_message(&e);

    // Multi-frame.
    let mut o = image(2, 2, (16, 16, 15), false);
    o.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("2"),
    ));
    put_u16_pixels(&mut o, &[0; 8]);
    let e = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap_err();
    assert!(matches!(e, DecodeError::MultiFrame { frames: 2 }), "{e:?}");
    assert_operator_message(&e);

    // Colour.
    let mut o = image(1, 1, (8, 8, 7), false);
    o.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(3u16),
    ));
    o.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from("RGB"),
    ));
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(C::from_slice(&[1, 2, 3, 0])),
    ));
    let e = read_slice(&file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN)).unwrap_err();
    assert!(matches!(e, DecodeError::UnsupportedImage(_)), "{e:?}");
    assert_operator_message(&e);

    // Not DICOM at all.
    let e = read_slice(b"hello").unwrap_err();
    assert!(matches!(e, DecodeError::NotDicom(_)), "{e:?}");
}

#[test]
fn undecodable_syntaxes_are_named() {
    // A syntax the registry knows but cannot decode (MPEG-2 video).
    let (mut o, _) = ct();
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new_fragments(vec![vec![0u8; 16]]),
    ));
    let e = read_slice(&file(o, uids::MPEG2MPML)).unwrap_err();
    match &e {
        DecodeError::UnsupportedTransferSyntax { uid, name } => {
            assert_eq!(uid, uids::MPEG2MPML);
            assert!(name.contains("MPEG"), "{name}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains(uids::MPEG2MPML));

    // An unknown syntax UID of the same length as Explicit VR Little Endian.
    let (o, _) = ct();
    let mut bytes = file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN);
    let needle = uids::EXPLICIT_VR_LITTLE_ENDIAN.as_bytes();
    let pos = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[pos..pos + needle.len()].copy_from_slice(b"1.2.840.99999.1.2.1");
    let e = read_slice(&bytes).unwrap_err();
    assert!(
        matches!(&e, DecodeError::UnsupportedTransferSyntax { uid, .. } if uid == "1.2.840.99999.1.2.1"),
        "{e:?}"
    );
}

#[test]
fn damaged_files_fail_cleanly() {
    let (o, _) = ct();
    let bytes = file(o, uids::EXPLICIT_VR_LITTLE_ENDIAN);
    // Every truncation is an error, never a panic.
    for len in 0..bytes.len() {
        assert!(
            read_slice(&bytes[..len]).is_err(),
            "prefix of {len} bytes decoded"
        );
    }
    // Deterministic single-byte corruptions: any outcome but a panic or a giant
    // allocation. A corrupt VR once hid a 4 GiB length from the scan and each such
    // file took half a second to zero memory, so the loop is bounded in time too.
    let start = std::time::Instant::now();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..2000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut damaged = bytes.clone();
        let at = 128 + (state as usize % (bytes.len() - 128));
        damaged[at] ^= (state >> 32) as u8 | 1;
        let _ = read_slice(&damaged);
    }
    assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
}

/// A frame of stored samples as one High-Throughput JPEG 2000 codestream, made by
/// OpenJPH's `ojph_compress` (the HTJ2K reference encoder): reversible, or
/// irreversible with quantisation step `qstep`. Returns the codestream and, for
/// checking a lossy one, OpenJPH's own decoding of it (`ojph_expand`).
fn htj2k_encode(
    samples: &[u16],
    (cols, rows): (u16, u16),
    bits: u16,
    signed: bool,
    qstep: Option<&str>,
) -> (Vec<u8>, Vec<u16>) {
    let dir = std::env::temp_dir().join(format!(
        "radflow-htj2k-{}-{bits}-{signed}-{}",
        std::process::id(),
        qstep.unwrap_or("reversible")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (raw, j2c, back) = (
        dir.join("in.yuv"),
        dir.join("out.j2c"),
        dir.join("back.yuv"),
    );
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&raw, bytes).unwrap();
    let mut compress = std::process::Command::new("ojph_compress");
    compress
        .args(["-i", raw.to_str().unwrap(), "-o", j2c.to_str().unwrap()])
        .args(["-num_comps", "1", "-downsamp", "{1,1}"])
        .args(["-dims", &format!("{{{cols},{rows}}}")])
        .args(["-bit_depth", &bits.to_string()])
        .args(["-signed", if signed { "true" } else { "false" }]);
    match qstep {
        None => compress.args(["-reversible", "true"]),
        Some(q) => compress.args(["-qstep", q]),
    };
    let out = compress
        .output()
        .expect("ojph_compress (Debian openjph-tools) runs");
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new("ojph_expand")
        .args(["-i", j2c.to_str().unwrap(), "-o", back.to_str().unwrap()])
        .output()
        .expect("ojph_expand runs");
    assert!(out.status.success(), "{out:?}");
    let stream = std::fs::read(&j2c).unwrap();
    let decoded = std::fs::read(&back)
        .unwrap()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    (stream, decoded)
}

/// CT of 16 and 12 bits stored, unsigned and signed, in each High-Throughput JPEG 2000
/// syntax: the decoded values are exactly the ones encoded.
///
/// The signed images hold no negative samples: the OpenJPH of Debian 12 (0.9) codes
/// negative samples in a way that no other implementation decodes to the same values
/// (Kakadu and OpenJPEG agree with each other; OpenJPH changed in later releases), so
/// its codestreams are no reference for them.
#[test]
fn htj2k_decodes_exactly() {
    let (rows, cols) = (24u16, 20u16);
    let n = usize::from(rows) * usize::from(cols);
    // Air to metal: HU -1024..5075 at 16 bits, up to what 12 bits hold otherwise.
    for (bits, signed, ts) in [
        (16, false, uids::HTJ2K_LOSSLESS),
        (16, true, uids::HTJ2K_LOSSLESS_RPCL),
        (12, false, uids::HTJ2K),
        (12, true, uids::HTJ2K_LOSSLESS),
    ] {
        let top = match (bits, signed) {
            (16, _) => 6100,
            (_, false) => 1 << bits,
            (_, true) => 1 << (bits - 1),
        };
        let stored: Vec<u16> = (0..n).map(|i| ((i * 7919) % top) as u16).collect();
        let mut o = image(rows, cols, (16, bits, bits - 1), signed);
        rescale(&mut o, "1", "-1024");
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new_fragments(vec![
                htj2k_encode(&stored, (cols, rows), bits, signed, None).0,
            ]),
        ));
        let what = format!("{bits} bits, signed {signed}, {ts}");
        let s = read_slice(&file(o, ts)).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(s.header.transfer_syntax, ts);
        let expected: Vec<f32> = stored.iter().map(|v| f32::from(*v) - 1024.0).collect();
        let wrong = s
            .pixels
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(wrong, 0, "{what}: {wrong} of {n} samples differ");
    }
}

/// Lossy (irreversible) HTJ2K: radflow's values are OpenJPH's own decoding of the
/// codestream, to within the one step two conforming 9/7 inverse transforms may differ.
#[test]
fn lossy_htj2k_matches_the_reference_decoder() {
    let (rows, cols) = (40u16, 36u16);
    let n = usize::from(rows) * usize::from(cols);
    // Smooth anatomy-like structure with some noise, unsigned 16-bit.
    let stored: Vec<u16> = (0..n)
        .map(|i| {
            let (r, c) = (
                (i / usize::from(cols)) as f64,
                (i % usize::from(cols)) as f64,
            );
            (2000.0 + 900.0 * (c / 5.0).sin() + 700.0 * (r / 7.0).cos()) as u16
                + ((i * 7919) % 40) as u16
        })
        .collect();
    let (stream, reference) = htj2k_encode(&stored, (cols, rows), 16, false, Some("0.001"));
    let mut o = image(rows, cols, (16, 16, 15), false);
    rescale(&mut o, "1", "-1024");
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new_fragments(vec![stream]),
    ));
    let s = read_slice(&file(o, uids::HTJ2K)).unwrap();
    let worst = s
        .pixels
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - (f32::from(*b) - 1024.0)).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1.0, "off by {worst}");
    // Lossy: the reference itself is not the input, so the comparison can tell.
    assert_ne!(reference, stored);
}

/// Encapsulated Uncompressed (each frame a fragment of the native bytes) and Deflated
/// Image Frame Compression (each frame deflated, RFC 1951) give the native pixels.
#[test]
fn encapsulated_uncompressed_and_deflated_frames_decode_exactly() {
    use std::io::Write as _;
    let values: Vec<i16> = vec![-1024, -1000, -50, 0, 1, 40, 700, 2000, 3071, -3024, 12, 99];
    let native: Vec<u8> = values
        .iter()
        .flat_map(|v| (v + 1024).to_le_bytes())
        .collect();
    let mut deflater = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    deflater.write_all(&native).unwrap();
    let deflated = deflater.finish().unwrap();
    for (ts, frame) in [
        (
            uids::ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN,
            native.clone(),
        ),
        (uids::DEFLATED_IMAGE_FRAME_COMPRESSION, deflated),
    ] {
        let (mut o, _) = ct();
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new_fragments(vec![frame]),
        ));
        let s = read_slice(&file(o, ts)).unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert_eq!(s.pixels, hu(&values), "{ts}");
    }
}
