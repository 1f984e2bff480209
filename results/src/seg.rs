//! The DICOM Segmentation (SEG) of a label map or of per-label probabilities.
//!
//! One segment per label (label 0, the background, is what no segment covers), one
//! frame per (segment, slice) that holds any voxel of the segment, segment by segment
//! and in slice order within a segment. Empty frames are left out because a label
//! usually covers a small part of the series: a 300-slice series with a lesion on
//! twelve slices gets twelve frames, not 300, and a reader loses nothing (a slice
//! without a frame has no voxel of that segment). Only when no segment has any voxel
//! is one empty frame written, since a SEG needs at least one.
//!
//! Every frame carries its source image (Derivation Image), its Image Position
//! (Patient) exactly as the source gives it and its Dimension Index Values (segment,
//! slice); orientation and pixel spacing are shared. The pixel data is the data set's
//! last element and is packed while it is written: binary frames as one bit per voxel,
//! little-endian within each byte and continuous across frame boundaries (PS3.5
//! §8.1.1), fractional frames as one byte per voxel. Nothing but the header and a
//! 64 KiB buffer is held beside the label map (or the probabilities, given as `f32`
//! or already as their 8-bit fractions).

use std::io::Write;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use ndarray::{ArrayView3, ArrayView4, Axis};
use radflow_shared::models::Code;

use crate::dataset::{
    PixelData, code_item, ds, put_seq, put_str, put_strs, put_tag, put_u16, put_u32, write_part10,
};
use crate::segment::SegmentDescription;
use crate::uid::UidKind;
use crate::{ResultContext, WriteError, common_attributes};

/// Segmentation Storage.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// Maximum Fractional Value of fractional SEGs: probabilities are stored as
/// `round(p × 255)`.
pub const MAX_FRACTIONAL: u8 = 255;

/// What the SEG encodes.
#[derive(Debug, Clone, Copy)]
pub enum SegPixels<'a> {
    /// BINARY: the label map, `(slices, rows, columns)` in source slice order.
    Labels(ArrayView3<'a, u8>),
    /// FRACTIONAL (PROBABILITY): per segment (in the order of the segment
    /// descriptions) a probability volume `(segments, slices, rows, columns)` in
    /// `[0, 1]`.
    Probabilities(ArrayView4<'a, f32>),
    /// FRACTIONAL (PROBABILITY) as the stored 8-bit values, `(segments, slices, rows,
    /// columns)` in any memory layout: [`fraction`] of each probability. The same SEG
    /// as [`SegPixels::Probabilities`] of those probabilities, for a quarter of the
    /// memory.
    Fractions(ArrayView4<'a, u8>),
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegWritten {
    /// SOP Instance UID of the SEG.
    pub sop_instance_uid: String,
    /// Series Instance UID of the SEG.
    pub series_instance_uid: String,
    /// Number of frames.
    pub frames: usize,
    /// `(label value, segment number)` of every segment.
    pub segments: Vec<(u8, u16)>,
}

/// Writes the SEG of `pixels` as a Part-10 file into `out`.
pub fn write_seg(
    out: &mut dyn Write,
    ctx: &ResultContext<'_>,
    segments: &[SegmentDescription],
    pixels: SegPixels<'_>,
) -> Result<SegWritten, WriteError> {
    let (nz, rows, columns) = ctx.source.shape();
    if segments.is_empty() || segments.len() > usize::from(u16::MAX) {
        return Err(WriteError::Input("a SEG needs 1 to 65535 segments".into()));
    }
    if segments.iter().any(|s| s.label == 0) {
        return Err(WriteError::Input(
            "label 0 is the background and cannot be a segment".into(),
        ));
    }
    // Labels, standard layout: each slice is one contiguous run of voxels (a copy only
    // when the caller's view is not).
    let labels;
    let probabilities;
    let mut fractions = None;
    let frames: Vec<(usize, usize)> = match &pixels {
        SegPixels::Labels(view) => {
            if view.dim() != (nz, rows, columns) {
                return Err(WriteError::Input(format!(
                    "label map shape {:?} differs from the source series {:?}",
                    view.dim(),
                    (nz, rows, columns)
                )));
            }
            labels = Some(view.as_standard_layout());
            probabilities = None;
            let labels = labels.as_ref().expect("set");
            let mut frames = Vec::new();
            let mut present = vec![[false; 256]; nz];
            for (z, slice) in labels.axis_iter(Axis(0)).enumerate() {
                let seen = &mut present[z];
                for &v in slice.as_slice().expect("standard layout") {
                    seen[usize::from(v)] = true;
                }
            }
            for (s, segment) in segments.iter().enumerate() {
                for (z, seen) in present.iter().enumerate() {
                    if seen[usize::from(segment.label)] {
                        frames.push((s, z));
                    }
                }
            }
            frames
        }
        SegPixels::Probabilities(view) => {
            if view.dim() != (segments.len(), nz, rows, columns) {
                return Err(WriteError::Input(format!(
                    "probabilities shape {:?} differs from (segments, slices, rows, columns) {:?}",
                    view.dim(),
                    (segments.len(), nz, rows, columns)
                )));
            }
            if view.iter().any(|p| !(0.0..=1.0).contains(p)) {
                return Err(WriteError::Input("probabilities must lie in [0, 1]".into()));
            }
            labels = None;
            probabilities = Some(view.as_standard_layout());
            let probs = probabilities.as_ref().expect("set");
            let mut frames = Vec::new();
            for s in 0..segments.len() {
                for z in 0..nz {
                    let slice = probs.index_axis(Axis(0), s);
                    let slice = slice.index_axis(Axis(0), z);
                    if slice.iter().any(|&p| fraction(p) > 0) {
                        frames.push((s, z));
                    }
                }
            }
            frames
        }
        SegPixels::Fractions(view) => {
            if view.dim() != (segments.len(), nz, rows, columns) {
                return Err(WriteError::Input(format!(
                    "fractions shape {:?} differs from (segments, slices, rows, columns) {:?}",
                    view.dim(),
                    (segments.len(), nz, rows, columns)
                )));
            }
            labels = None;
            probabilities = None;
            fractions = Some(*view);
            let mut frames = Vec::new();
            for s in 0..segments.len() {
                for z in 0..nz {
                    if view.slice(ndarray::s![s, z, .., ..]).iter().any(|&f| f > 0) {
                        frames.push((s, z));
                    }
                }
            }
            frames
        }
    };
    let frames = if frames.is_empty() {
        vec![(0, 0)]
    } else {
        frames
    };
    let binary = labels.is_some();

    let sop_instance_uid = ctx.identity.uid(UidKind::SegInstance);
    let series_instance_uid = ctx.identity.uid(UidKind::SegSeries);
    let mut obj = InMemDicomObject::new_empty();
    common_attributes(
        &mut obj,
        ctx,
        SEGMENTATION_STORAGE,
        &sop_instance_uid,
        &series_instance_uid,
        "SEG",
        ctx.seg_series_number,
    );
    put_strs(&mut obj, tags::IMAGE_TYPE, VR::CS, &["DERIVED", "PRIMARY"]);
    put_str(&mut obj, tags::CONTENT_LABEL, VR::CS, "SEGMENTATION");
    put_str(
        &mut obj,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        &format!("{} {}", ctx.algorithm.name, ctx.algorithm.version),
    );
    put_str(&mut obj, tags::CONTENT_CREATOR_NAME, VR::PN, "");
    put_u16(&mut obj, tags::SAMPLES_PER_PIXEL, &[1]);
    put_str(
        &mut obj,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    put_u16(&mut obj, tags::ROWS, &[rows as u16]);
    put_u16(&mut obj, tags::COLUMNS, &[columns as u16]);
    let bits = if binary { 1 } else { 8 };
    put_u16(&mut obj, tags::BITS_ALLOCATED, &[bits]);
    put_u16(&mut obj, tags::BITS_STORED, &[bits]);
    put_u16(&mut obj, tags::HIGH_BIT, &[bits - 1]);
    put_u16(&mut obj, tags::PIXEL_REPRESENTATION, &[0]);
    put_str(&mut obj, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    if binary {
        put_str(&mut obj, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
        // Labels of one map are disjoint.
        put_str(&mut obj, tags::SEGMENTS_OVERLAP, VR::CS, "NO");
    } else {
        put_str(&mut obj, tags::SEGMENTATION_TYPE, VR::CS, "FRACTIONAL");
        put_str(
            &mut obj,
            tags::SEGMENTATION_FRACTIONAL_TYPE,
            VR::CS,
            "PROBABILITY",
        );
        put_u16(
            &mut obj,
            tags::MAXIMUM_FRACTIONAL_VALUE,
            &[u16::from(MAX_FRACTIONAL)],
        );
    }
    put_seq(
        &mut obj,
        tags::SEGMENT_SEQUENCE,
        segments
            .iter()
            .enumerate()
            .map(|(i, s)| segment_item(i as u16 + 1, s, ctx))
            .collect(),
    );
    put_str(
        &mut obj,
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        &frames.len().to_string(),
    );
    dimensions(
        &mut obj,
        &ctx.identity.uid(UidKind::SegDimensionOrganization),
    );
    referenced_series(&mut obj, ctx);
    shared_groups(&mut obj, ctx);
    let slices = ctx.source.slices();
    put_seq(
        &mut obj,
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        frames
            .iter()
            .map(|&(s, z)| frame_item(s as u16 + 1, z, &slices[z]))
            .collect(),
    );

    let voxels = rows * columns;
    let bytes = if binary {
        (frames.len() * voxels).div_ceil(8)
    } else {
        frames.len() * voxels
    };
    let padded = bytes + bytes % 2;
    let len = u32::try_from(padded)
        .map_err(|_| WriteError::Input("the SEG's pixel data exceeds 4 GiB".into()))?;
    let frames_ref = &frames;
    let write: Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()>> =
        match (&labels, &probabilities, fractions) {
            (Some(labels), _, _) => Box::new(move |out: &mut dyn Write| {
                let mut packer = BitPacker::new(out);
                for &(s, z) in frames_ref {
                    let slice = labels.index_axis(Axis(0), z);
                    packer.frame(
                        slice.as_slice().expect("standard layout"),
                        segments[s].label,
                    )?;
                }
                packer.finish(padded - bytes)
            }),
            (None, Some(probs), _) => Box::new(move |out: &mut dyn Write| {
                let mut buf = Vec::with_capacity(1 << 16);
                for &(s, z) in frames_ref {
                    let seg = probs.index_axis(Axis(0), s);
                    let slice = seg.index_axis(Axis(0), z);
                    for &p in slice.as_slice().expect("standard layout") {
                        buf.push(fraction(p));
                        if buf.len() == buf.capacity() {
                            out.write_all(&buf)?;
                            buf.clear();
                        }
                    }
                }
                buf.extend(std::iter::repeat_n(0, padded - bytes));
                out.write_all(&buf)
            }),
            (None, None, Some(fractions)) => Box::new(move |out: &mut dyn Write| {
                let mut buf = Vec::with_capacity(1 << 16);
                for &(s, z) in frames_ref {
                    let frame = fractions.slice(ndarray::s![s, z, .., ..]);
                    for &f in frame.iter() {
                        buf.push(f);
                        if buf.len() == buf.capacity() {
                            out.write_all(&buf)?;
                            buf.clear();
                        }
                    }
                }
                buf.extend(std::iter::repeat_n(0, padded - bytes));
                out.write_all(&buf)
            }),
            _ => unreachable!("one pixel source is set"),
        };
    write_part10(
        out,
        SEGMENTATION_STORAGE,
        &sop_instance_uid,
        &obj,
        Some(PixelData {
            vr: VR::OB,
            len,
            write,
        }),
    )?;
    Ok(SegWritten {
        sop_instance_uid,
        series_instance_uid,
        frames: frames.len(),
        segments: segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.label, i as u16 + 1))
            .collect(),
    })
}

/// A probability as the stored 8-bit fraction: `round(p × 255)`, with `p` clamped
/// into `[0, 1]` first (NaN becomes 0).
pub fn fraction(p: f32) -> u8 {
    (p.clamp(0.0, 1.0) * f32::from(MAX_FRACTIONAL)).round() as u8
}

/// Packs frames of one bit per voxel into the output, bits continuous across frames.
struct BitPacker<'a> {
    out: &'a mut dyn Write,
    buf: Vec<u8>,
    /// Bits of the byte being filled, and how many of them are used.
    byte: u8,
    used: u32,
}

impl<'a> BitPacker<'a> {
    fn new(out: &'a mut dyn Write) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(1 << 16),
            byte: 0,
            used: 0,
        }
    }

    fn push_byte(&mut self, b: u8) -> std::io::Result<()> {
        self.buf.push(b);
        if self.buf.len() == self.buf.capacity() {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn frame(&mut self, voxels: &[u8], label: u8) -> std::io::Result<()> {
        let mut rest = voxels;
        // Finish a byte begun by the previous frame.
        while self.used != 0 && !rest.is_empty() {
            self.bit(rest[0] == label)?;
            rest = &rest[1..];
        }
        let mut chunks = rest.chunks_exact(8);
        for c in &mut chunks {
            let mut b = 0u8;
            for (i, &v) in c.iter().enumerate() {
                b |= u8::from(v == label) << i;
            }
            self.push_byte(b)?;
        }
        for &v in chunks.remainder() {
            self.bit(v == label)?;
        }
        Ok(())
    }

    fn bit(&mut self, set: bool) -> std::io::Result<()> {
        self.byte |= u8::from(set) << self.used;
        self.used += 1;
        if self.used == 8 {
            let b = self.byte;
            self.byte = 0;
            self.used = 0;
            self.push_byte(b)?;
        }
        Ok(())
    }

    fn finish(mut self, padding: usize) -> std::io::Result<()> {
        if self.used != 0 {
            let b = self.byte;
            self.push_byte(b)?;
        }
        for _ in 0..padding {
            self.push_byte(0)?;
        }
        self.out.write_all(&self.buf)
    }
}

fn segment_item(number: u16, s: &SegmentDescription, ctx: &ResultContext<'_>) -> InMemDicomObject {
    let mut item = InMemDicomObject::new_empty();
    put_u16(&mut item, tags::SEGMENT_NUMBER, &[number]);
    put_str(&mut item, tags::SEGMENT_LABEL, VR::LO, &s.name);
    put_seq(
        &mut item,
        tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
        vec![code_item(&s.category)],
    );
    put_seq(
        &mut item,
        tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
        vec![code_item(&s.property_type)],
    );
    put_str(&mut item, tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC");
    put_str(
        &mut item,
        tags::SEGMENT_ALGORITHM_NAME,
        VR::LO,
        &ctx.algorithm.name,
    );
    put_u16(
        &mut item,
        tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE,
        &s.cielab(),
    );
    put_str(&mut item, tags::TRACKING_ID, VR::UT, &s.name);
    put_str(
        &mut item,
        tags::TRACKING_UID,
        VR::UI,
        &ctx.identity.uid(UidKind::Tracking(s.label)),
    );
    item
}

fn dimensions(obj: &mut InMemDicomObject, organization: &str) {
    let mut org = InMemDicomObject::new_empty();
    put_str(
        &mut org,
        tags::DIMENSION_ORGANIZATION_UID,
        VR::UI,
        organization,
    );
    put_seq(obj, tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org]);
    put_str(obj, tags::DIMENSION_ORGANIZATION_TYPE, VR::CS, "3D");
    let index = |pointer: Tag, group: Tag, label: &str| {
        let mut item = InMemDicomObject::new_empty();
        put_tag(&mut item, tags::DIMENSION_INDEX_POINTER, pointer);
        put_tag(&mut item, tags::FUNCTIONAL_GROUP_POINTER, group);
        put_str(
            &mut item,
            tags::DIMENSION_ORGANIZATION_UID,
            VR::UI,
            organization,
        );
        put_str(&mut item, tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label);
        item
    };
    put_seq(
        obj,
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            index(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "ReferencedSegmentNumber",
            ),
            index(
                tags::IMAGE_POSITION_PATIENT,
                tags::PLANE_POSITION_SEQUENCE,
                "ImagePositionPatient",
            ),
        ],
    );
}

/// Referenced Series Sequence (Common Instance Reference): every source instance.
pub(crate) fn referenced_series(obj: &mut InMemDicomObject, ctx: &ResultContext<'_>) {
    let mut series = InMemDicomObject::new_empty();
    put_str(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &ctx.source.first().series_instance_uid,
    );
    put_seq(
        &mut series,
        tags::REFERENCED_INSTANCE_SEQUENCE,
        ctx.source
            .slices()
            .iter()
            .map(|s| {
                let mut item = InMemDicomObject::new_empty();
                put_str(
                    &mut item,
                    tags::REFERENCED_SOP_CLASS_UID,
                    VR::UI,
                    &s.sop_class_uid,
                );
                put_str(
                    &mut item,
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    &s.sop_instance_uid,
                );
                item
            })
            .collect(),
    );
    put_seq(obj, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);
}

fn shared_groups(obj: &mut InMemDicomObject, ctx: &ResultContext<'_>) {
    let first = ctx.source.first();
    let mut orientation = InMemDicomObject::new_empty();
    put_strs(
        &mut orientation,
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        &first.image_orientation,
    );
    let mut measures = InMemDicomObject::new_empty();
    put_strs(
        &mut measures,
        tags::PIXEL_SPACING,
        VR::DS,
        &first.pixel_spacing,
    );
    let spacing = ctx.source.slice_spacing();
    let thickness = first
        .slice_thickness
        .clone()
        .or_else(|| spacing.map(ds))
        .unwrap_or_else(|| "1".into());
    put_str(&mut measures, tags::SLICE_THICKNESS, VR::DS, &thickness);
    if let Some(spacing) = spacing.filter(|s| *s > 0.0) {
        put_str(
            &mut measures,
            tags::SPACING_BETWEEN_SLICES,
            VR::DS,
            &ds(spacing),
        );
    }
    let mut shared = InMemDicomObject::new_empty();
    put_seq(
        &mut shared,
        tags::PLANE_ORIENTATION_SEQUENCE,
        vec![orientation],
    );
    put_seq(&mut shared, tags::PIXEL_MEASURES_SEQUENCE, vec![measures]);
    put_seq(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]);
}

fn frame_item(segment: u16, z: usize, source: &crate::SourceInstance) -> InMemDicomObject {
    let mut image = InMemDicomObject::new_empty();
    put_str(
        &mut image,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        &source.sop_class_uid,
    );
    put_str(
        &mut image,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        &source.sop_instance_uid,
    );
    // The frame is on the source image's grid, pixel for pixel.
    put_str(&mut image, tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES");
    put_seq(
        &mut image,
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![code_item(&Code::new(
            "DCM",
            "121322",
            "Source image for image processing operation",
        ))],
    );
    let mut derivation = InMemDicomObject::new_empty();
    put_seq(
        &mut derivation,
        tags::DERIVATION_CODE_SEQUENCE,
        vec![code_item(&Code::new("DCM", "113076", "Segmentation"))],
    );
    put_seq(&mut derivation, tags::SOURCE_IMAGE_SEQUENCE, vec![image]);

    let mut content = InMemDicomObject::new_empty();
    put_u32(
        &mut content,
        tags::DIMENSION_INDEX_VALUES,
        &[u32::from(segment), z as u32 + 1],
    );
    let mut position = InMemDicomObject::new_empty();
    put_strs(
        &mut position,
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        &source.image_position,
    );
    let mut identification = InMemDicomObject::new_empty();
    put_u16(
        &mut identification,
        tags::REFERENCED_SEGMENT_NUMBER,
        &[segment],
    );

    let mut frame = InMemDicomObject::new_empty();
    put_seq(
        &mut frame,
        tags::DERIVATION_IMAGE_SEQUENCE,
        vec![derivation],
    );
    put_seq(&mut frame, tags::FRAME_CONTENT_SEQUENCE, vec![content]);
    put_seq(&mut frame, tags::PLANE_POSITION_SEQUENCE, vec![position]);
    put_seq(
        &mut frame,
        tags::SEGMENT_IDENTIFICATION_SEQUENCE,
        vec![identification],
    );
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_packed_little_endian_and_across_frames() {
        let mut out = Vec::new();
        let mut p = BitPacker::new(&mut out);
        // Two frames of 5 voxels: bits 1,0,1,1,0 | 0,1,0,0,1 → 0b01001101, 0b10 ...
        p.frame(&[2, 0, 2, 2, 1], 2).unwrap();
        p.frame(&[0, 2, 0, 0, 2], 2).unwrap();
        p.finish(1).unwrap();
        assert_eq!(out, [0b0100_1101, 0b0000_0010, 0]);
        let mut out = Vec::new();
        let mut p = BitPacker::new(&mut out);
        p.frame(&[1, 1, 0, 0, 0, 0, 0, 1, 1], 1).unwrap();
        p.finish(0).unwrap();
        assert_eq!(out, [0b1000_0011, 0b1]);
    }
}
