//! The images an object holds, read from its parsed header: one [`SliceHeader`] for a
//! classic image, one per frame of an enhanced multi-frame object (from its per-frame
//! and shared functional groups), one per tile of a Siemens mosaic; and the bit layout
//! its pixels are converted with.

use std::collections::HashMap;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntax;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use super::MAX_FRAMES;
use super::attributes::{
    float, int, item, orientation, pixel_spacing, position, private_element, private_uint,
    sop_class_uid, strings, text,
};
use crate::decode_error::DecodeError;
use crate::header::{InstanceHeader, MosaicTile, PixelPlan, SampleFormat, SliceHeader, Storage};
use crate::mosaic;

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

pub(super) fn read_images(
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
