//! A synthetic CT phantom written as real DICOM files, with its exact ground truth.
//!
//! Tests, benchmarks and `radflow synth` need CT series without patient data and with a
//! known answer. The phantom is an abdomen-like set of nested shapes in patient
//! coordinates (LPS mm, centred on x = y = 0 and on the middle of the series in z):
//!
//! | structure | shape | HU | tissue |
//! | --- | --- | --- | --- |
//! | background | — | −1000 | air |
//! | body | elliptic cylinder 150 × 110 mm (x × y semi-axes) | −100 | fat |
//! | organ block | elliptic cylinder 125 × 88 mm | 40 | soft tissue |
//! | spine | cylinder r = 18 mm along z at (0, +55) (posterior) | 380 | bone |
//! | bone ball | sphere r = 25 mm at (−60, 0, centre) | 420 | bone |
//! | gas pocket | sphere r = 20 mm at (60, −20, centre) | −900 | air |
//!
//! Pixels carry small deterministic noise (σ ≈ 8 HU) and are stored as signed 16-bit
//! values `HU + 1024` (Rescale Intercept −1024, slope 1). [`write_series`] returns a
//! [`PhantomTruth`] whose tissue volumes are counted from the voxel centres actually
//! written, so a pipeline that decodes and measures the series can be scored exactly.
//! An optional gantry tilt and shuffled file names/Instance Numbers exercise the
//! geometry code the way real scanners and senders do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_core::value::{C, DataSetSequence};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Identifies the software that wrote a file (File Meta Implementation Class UID).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.63791444947975678818195091792044250427";
/// File Meta Implementation Version Name.
pub const IMPLEMENTATION_VERSION_NAME: &str = "RADFLOW_0_1";

/// Standard deviation of the pixel noise, HU.
const NOISE_SIGMA_HU: f64 = 8.0;

/// Transfer syntax of the written files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SynthSyntax {
    /// Explicit VR Little Endian (1.2.840.10008.1.2.1).
    #[default]
    ExplicitLittle,
    /// Implicit VR Little Endian (1.2.840.10008.1.2), the DICOM default syntax.
    ImplicitLittle,
}

impl SynthSyntax {
    /// The transfer syntax UID.
    pub fn uid(self) -> &'static str {
        match self {
            SynthSyntax::ExplicitLittle => uids::EXPLICIT_VR_LITTLE_ENDIAN,
            SynthSyntax::ImplicitLittle => uids::IMPLICIT_VR_LITTLE_ENDIAN,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct PhantomSpec {
    /// Rows = columns per slice.
    pub size: usize,
    /// Number of slices.
    pub slices: usize,
    /// In-plane field of view, mm; pixel spacing = `fov_mm / size`.
    pub fov_mm: f64,
    /// Distance between slice positions along z, mm.
    pub slice_spacing_mm: f64,
    /// Random file names and Instance Numbers unrelated to position, as senders and
    /// stores often produce.
    pub shuffle: bool,
    /// Seeds the noise and the shuffling (UIDs are always new).
    pub seed: u64,
    /// Transfer syntax of the files.
    pub transfer_syntax: SynthSyntax,
    /// Gantry tilt about the x axis, degrees: the image planes tilt (IOP column cosine)
    /// while slice positions step along z only.
    pub tilt_deg: f64,
    /// Write one Enhanced CT multi-frame object instead of one file per slice: per-frame
    /// positions and a per-frame rescale intercept that differs between frames (the
    /// stored values differ, the HU do not); with `shuffle`, frames are stored out of
    /// position order.
    pub enhanced: bool,
    /// UIDs of the full 64 characters the standard allows (as many scanners write), so
    /// that store keys reach their longest (`dicom/<study>/<series>/<sop>.dcm`, 204).
    pub long_uids: bool,
}

impl Default for PhantomSpec {
    fn default() -> Self {
        Self {
            size: 512,
            slices: 120,
            fov_mm: 360.0,
            slice_spacing_mm: 1.25,
            shuffle: false,
            seed: 1,
            transfer_syntax: SynthSyntax::ExplicitLittle,
            tilt_deg: 0.0,
            enhanced: false,
            long_uids: false,
        }
    }
}

/// Tissue classes of the phantom, in label order (index 0..=3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tissue {
    Air,
    Fat,
    SoftTissue,
    Bone,
}

impl Tissue {
    /// All classes in label order.
    pub const ALL: [Tissue; 4] = [Tissue::Air, Tissue::Fat, Tissue::SoftTissue, Tissue::Bone];

    /// Nominal HU of the class (the gas pocket is −900 and the bone ball 420, see the
    /// module docs).
    pub fn hu(self) -> f64 {
        match self {
            Tissue::Air => -1000.0,
            Tissue::Fat => -100.0,
            Tissue::SoftTissue => 40.0,
            Tissue::Bone => 380.0,
        }
    }

    /// Label name, as used in truth files and model label lists.
    pub fn label_name(self) -> &'static str {
        match self {
            Tissue::Air => "air",
            Tissue::Fat => "fat",
            Tissue::SoftTissue => "soft_tissue",
            Tissue::Bone => "bone",
        }
    }

    /// Label index, 0..=3.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Tissue class at a point (LPS mm) of a phantom whose series is centred at `centre_z`.
pub fn tissue_at(lps_mm: [f64; 3], centre_z: f64) -> Tissue {
    region_at(lps_mm, centre_z).0
}

/// Tissue and exact HU at a point.
fn region_at(p: [f64; 3], centre_z: f64) -> (Tissue, f64) {
    let (x, y, z) = (p[0], p[1], p[2] - centre_z);
    let inside_ellipse = |a: f64, b: f64| (x / a).powi(2) + (y / b).powi(2) <= 1.0;
    if (x - 60.0).powi(2) + (y + 20.0).powi(2) + z * z <= 20.0 * 20.0 {
        (Tissue::Air, -900.0)
    } else if (x + 60.0).powi(2) + y * y + z * z <= 25.0 * 25.0 {
        (Tissue::Bone, 420.0)
    } else if x * x + (y - 55.0).powi(2) <= 18.0 * 18.0 {
        (Tissue::Bone, 380.0)
    } else if inside_ellipse(125.0, 88.0) {
        (Tissue::SoftTissue, 40.0)
    } else if inside_ellipse(150.0, 110.0) {
        (Tissue::Fat, -100.0)
    } else {
        (Tissue::Air, -1000.0)
    }
}

/// The exact answer for a written phantom series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhantomTruth {
    pub study_uid: String,
    pub series_uid: String,
    /// `[nx, ny, nz]`: columns, rows, slices.
    pub dims: [usize; 3],
    /// Voxel spacing, mm: `[column, row, slice]`, the slice spacing measured along the
    /// slice normal (smaller than the table step when tilted).
    pub spacing: [f64; 3],
    /// Volume of one voxel, ml (exact for a tilted, sheared grid too).
    pub voxel_volume_ml: f64,
    /// Volume per tissue (`Tissue::label_name`), ml, from the voxel centres written.
    pub volumes_ml: BTreeMap<String, f64>,
    /// Number of files written.
    pub files: usize,
    /// z (LPS mm) of the series centre, the phantom's centre.
    pub centre_z_mm: f64,
}

/// Why a phantom could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid phantom specification: {0}")]
    InvalidSpec(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode DICOM: {0}")]
    Dicom(String),
}

/// z (LPS mm) of the series centre: a realistic table position, away from 0 so that
/// code which silently assumes a zero origin fails tests.
const CENTRE_Z_MM: f64 = -182.5;

/// Writes one Part-10 CT file per slice into `out_dir` (created if missing) and
/// returns the ground truth. Nothing else is written there.
pub fn write_series(spec: &PhantomSpec, out_dir: &Path) -> Result<PhantomTruth, SynthError> {
    validate(spec)?;
    std::fs::create_dir_all(out_dir).map_err(|source| SynthError::Io {
        path: out_dir.to_owned(),
        source,
    })?;
    let n = spec.slices;
    let size = spec.size;
    let px = spec.fov_mm / size as f64;
    let tilt = spec.tilt_deg.to_radians();
    let row_dir = [1.0, 0.0, 0.0];
    let col_dir = [0.0, tilt.cos(), -tilt.sin()];
    // Image centre on the z axis: first pixel half the image back along both axes.
    let half = (size as f64 - 1.0) / 2.0 * px;
    let slice_z =
        |k: usize| CENTRE_Z_MM + (k as f64 - (n as f64 - 1.0) / 2.0) * spec.slice_spacing_mm;
    let ipp = |k: usize| -> [f64; 3] {
        std::array::from_fn(|a| {
            -half * row_dir[a] - half * col_dir[a] + if a == 2 { slice_z(k) } else { 0.0 }
        })
    };

    // UIDs are new on every call; noise, names and numbering depend on the seed only.
    let mut uid_rng = Rng::new(entropy() ^ spec.seed.rotate_left(17));
    let mut new_uid = || {
        if spec.long_uids {
            uid_rng.long_uid()
        } else {
            uid_rng.uid()
        }
    };
    let study_uid = new_uid();
    let series_uid = new_uid();
    let frame_uid = new_uid();
    let sop_uids: Vec<String> = (0..n).map(|_| new_uid()).collect();

    let mut rng = Rng::new(spec.seed);
    let mut instance_numbers: Vec<usize> = (1..=n).collect();
    let names: Vec<String> = if spec.shuffle {
        rng.shuffle(&mut instance_numbers);
        (0..n).map(|_| format!("{:016x}.dcm", rng.next())).collect()
    } else {
        (0..n).map(|k| format!("slice_{:04}.dcm", k + 1)).collect()
    };

    let now = time::OffsetDateTime::now_utc();
    let date = format!(
        "{:04}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day()
    );
    let time = format!("{:02}{:02}{:02}", now.hour(), now.minute(), now.second());
    let common = Common {
        spec,
        study_uid: &study_uid,
        series_uid: &series_uid,
        frame_uid: &frame_uid,
        date: &date,
        time: &time,
        iop: [row_dir, col_dir].concat(),
        px,
    };

    if spec.enhanced {
        let counts = write_enhanced(&common, &sop_uids[0], &instance_numbers, ipp, out_dir)?;
        return Ok(truth(spec, counts, px, tilt, study_uid, series_uid, 1));
    }
    let counts = (0..n)
        .into_par_iter()
        .map(|k| -> Result<[u64; 4], SynthError> {
            let origin = ipp(k);
            let (pixels, counts) = slice_pixels(spec, origin, row_dir, col_dir, px, k);
            let slice = Slice {
                sop_uid: &sop_uids[k],
                instance_number: instance_numbers[k],
                ipp: origin,
                slice_location: slice_z(k),
                pixels,
            };
            let bytes = encode(&common, slice)?;
            let path = out_dir.join(&names[k]);
            std::fs::write(&path, bytes).map_err(|source| SynthError::Io { path, source })?;
            Ok(counts)
        })
        .try_reduce(|| [0; 4], |a, b| Ok(std::array::from_fn(|i| a[i] + b[i])))?;
    Ok(truth(spec, counts, px, tilt, study_uid, series_uid, n))
}

fn truth(
    spec: &PhantomSpec,
    counts: [u64; 4],
    px: f64,
    tilt: f64,
    study_uid: String,
    series_uid: String,
    files: usize,
) -> PhantomTruth {
    let n = spec.slices;
    let size = spec.size;
    let normal_spacing = spec.slice_spacing_mm * tilt.cos();
    let voxel_volume_ml = px * px * normal_spacing / 1000.0;
    let volumes_ml = Tissue::ALL
        .iter()
        .map(|t| {
            (
                t.label_name().to_owned(),
                counts[t.index()] as f64 * voxel_volume_ml,
            )
        })
        .collect();
    PhantomTruth {
        study_uid,
        series_uid,
        dims: [size, size, n],
        spacing: [px, px, normal_spacing],
        voxel_volume_ml,
        volumes_ml,
        files,
        centre_z_mm: CENTRE_Z_MM,
    }
}

/// Per-frame rescale intercept of the enhanced phantom: it varies so that a reader
/// that applies one rescale to every frame is caught.
fn frame_intercept(k: usize) -> f64 {
    -1024.0 - 16.0 * (k % 3) as f64
}

/// Writes the whole series as one Enhanced CT Image object; returns the tissue counts.
fn write_enhanced(
    c: &Common<'_>,
    sop_uid: &str,
    instance_numbers: &[usize],
    ipp: impl Fn(usize) -> [f64; 3] + Sync,
    out_dir: &Path,
) -> Result<[u64; 4], SynthError> {
    let spec = c.spec;
    let n = spec.slices;
    let px = c.px;
    let iop = &c.iop;
    let (row_dir, col_dir) = ([iop[0], iop[1], iop[2]], [iop[3], iop[4], iop[5]]);
    // Frame f holds slice order[f]: shuffled frames are stored out of position order.
    let mut order: Vec<usize> = (0..n).collect();
    if spec.shuffle {
        let mut by_number: Vec<(usize, usize)> =
            instance_numbers.iter().copied().zip(0..n).collect();
        by_number.sort();
        order = by_number.into_iter().map(|(_, k)| k).collect();
    }
    let slices: Vec<(Vec<u16>, [u64; 4])> = order
        .par_iter()
        .map(|&k| {
            let (pixels, counts) = slice_pixels(spec, ipp(k), row_dir, col_dir, px, k);
            // Stored = HU + 1024 from slice_pixels; re-base on this frame's intercept.
            let shift = (-1024.0 - frame_intercept(k)) as i32;
            let pixels = pixels
                .into_iter()
                .map(|p| (i32::from(p as i16) + shift) as i16 as u16)
                .collect();
            (pixels, counts)
        })
        .collect();
    let mut counts = [0u64; 4];
    let mut data = Vec::with_capacity(n * spec.size * spec.size);
    for (pixels, c) in slices {
        data.extend_from_slice(&pixels);
        for i in 0..4 {
            counts[i] += c[i];
        }
    }

    let item = |elements: Vec<DataElement<InMemDicomObject>>| {
        InMemDicomObject::from_element_iter(elements)
    };
    let text = |tag: Tag, vr: VR, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let seq = |tag: Tag, items: Vec<InMemDicomObject>| {
        DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
    };
    let shared = item(vec![
        seq(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![item(vec![
                text(tags::PIXEL_SPACING, VR::DS, &ds_list(&[px, px])),
                text(tags::SLICE_THICKNESS, VR::DS, &ds(spec.slice_spacing_mm)),
            ])],
        ),
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![item(vec![text(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                &ds_list(iop),
            )])],
        ),
        seq(
            tags::CT_IMAGE_FRAME_TYPE_SEQUENCE,
            vec![item(vec![text(
                tags::FRAME_TYPE,
                VR::CS,
                "ORIGINAL\\PRIMARY\\AXIAL\\NONE",
            )])],
        ),
    ]);
    let per_frame: Vec<InMemDicomObject> = order
        .iter()
        .map(|&k| {
            item(vec![
                seq(
                    tags::FRAME_CONTENT_SEQUENCE,
                    vec![item(vec![
                        text(tags::STACK_ID, VR::SH, "1"),
                        // Numbered from the top of the stack down, as scanners do.
                        DataElement::new(
                            tags::IN_STACK_POSITION_NUMBER,
                            VR::UL,
                            PrimitiveValue::from((n - k) as u32),
                        ),
                        DataElement::new(
                            tags::DIMENSION_INDEX_VALUES,
                            VR::UL,
                            PrimitiveValue::U32(C::from_vec(vec![1, (n - k) as u32])),
                        ),
                    ])],
                ),
                seq(
                    tags::PLANE_POSITION_SEQUENCE,
                    vec![item(vec![text(
                        tags::IMAGE_POSITION_PATIENT,
                        VR::DS,
                        &ds_list(&ipp(k)),
                    )])],
                ),
                seq(
                    tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
                    vec![item(vec![
                        text(tags::RESCALE_INTERCEPT, VR::DS, &ds(frame_intercept(k))),
                        text(tags::RESCALE_SLOPE, VR::DS, "1"),
                        text(tags::RESCALE_TYPE, VR::LO, "HU"),
                    ])],
                ),
            ])
        })
        .collect();
    let dimension = |pointer: Tag| {
        item(vec![
            DataElement::new(
                tags::DIMENSION_INDEX_POINTER,
                VR::AT,
                PrimitiveValue::Tags(C::from_vec(vec![pointer])),
            ),
            DataElement::new(
                tags::FUNCTIONAL_GROUP_POINTER,
                VR::AT,
                PrimitiveValue::Tags(C::from_vec(vec![tags::FRAME_CONTENT_SEQUENCE])),
            ),
        ])
    };

    let mut obj = InMemDicomObject::new_empty();
    let mut put = |e: DataElement<InMemDicomObject>| {
        obj.put(e);
    };
    put(text(
        tags::IMAGE_TYPE,
        VR::CS,
        "ORIGINAL\\PRIMARY\\AXIAL\\NONE",
    ));
    put(text(
        tags::SOP_CLASS_UID,
        VR::UI,
        uids::ENHANCED_CT_IMAGE_STORAGE,
    ));
    put(text(tags::SOP_INSTANCE_UID, VR::UI, sop_uid));
    for tag in [tags::STUDY_DATE, tags::SERIES_DATE, tags::CONTENT_DATE] {
        put(text(tag, VR::DA, c.date));
    }
    for tag in [tags::STUDY_TIME, tags::SERIES_TIME, tags::CONTENT_TIME] {
        put(text(tag, VR::TM, c.time));
    }
    put(text(
        tags::ACQUISITION_DATE_TIME,
        VR::DT,
        &format!("{}{}", c.date, c.time),
    ));
    put(text(tags::ACCESSION_NUMBER, VR::SH, ""));
    put(text(tags::MODALITY, VR::CS, "CT"));
    put(text(tags::MANUFACTURER, VR::LO, "radflow"));
    put(text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""));
    put(text(tags::SERIES_DESCRIPTION, VR::LO, "radflow phantom"));
    put(text(tags::PATIENT_NAME, VR::PN, "PHANTOM^RADFLOW"));
    put(text(tags::PATIENT_ID, VR::LO, "RADFLOW-PHANTOM"));
    put(text(tags::BODY_PART_EXAMINED, VR::CS, "ABDOMEN"));
    put(text(tags::STUDY_INSTANCE_UID, VR::UI, c.study_uid));
    put(text(tags::SERIES_INSTANCE_UID, VR::UI, c.series_uid));
    put(text(tags::FRAME_OF_REFERENCE_UID, VR::UI, c.frame_uid));
    put(text(tags::SERIES_NUMBER, VR::IS, "1"));
    put(text(tags::INSTANCE_NUMBER, VR::IS, "1"));
    put(text(tags::NUMBER_OF_FRAMES, VR::IS, &n.to_string()));
    put(text(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    ));
    put(seq(
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dimension(tags::STACK_ID),
            dimension(tags::IN_STACK_POSITION_NUMBER),
        ],
    ));
    put(seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));
    put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
    let size = spec.size as u16;
    for (tag, v) in [
        (tags::SAMPLES_PER_PIXEL, 1),
        (tags::ROWS, size),
        (tags::COLUMNS, size),
        (tags::BITS_ALLOCATED, 16),
        (tags::BITS_STORED, 16),
        (tags::HIGH_BIT, 15),
        (tags::PIXEL_REPRESENTATION, 1),
    ] {
        put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(C::from_vec(data)),
    ));
    let bytes = finish(obj, uids::ENHANCED_CT_IMAGE_STORAGE, sop_uid, spec)?;
    let path = out_dir.join("enhanced.dcm");
    std::fs::write(&path, bytes).map_err(|source| SynthError::Io { path, source })?;
    Ok(counts)
}

fn validate(spec: &PhantomSpec) -> Result<(), SynthError> {
    let bad = |m: &str| Err(SynthError::InvalidSpec(m.to_owned()));
    if spec.size == 0 || spec.size > 4096 {
        return bad("size must be between 1 and 4096");
    }
    if spec.slices == 0 || spec.slices > 10_000 {
        return bad("slices must be between 1 and 10000");
    }
    if !(spec.fov_mm.is_finite() && spec.fov_mm > 0.0) {
        return bad("fov_mm must be positive");
    }
    if !(spec.slice_spacing_mm.is_finite() && spec.slice_spacing_mm > 0.0) {
        return bad("slice_spacing_mm must be positive");
    }
    if !(spec.tilt_deg.is_finite() && spec.tilt_deg.abs() < 60.0) {
        return bad("tilt_deg must be within ±60 degrees");
    }
    Ok(())
}

/// Stored values (`HU + 1024`, noise added) of one slice and its tissue voxel counts.
fn slice_pixels(
    spec: &PhantomSpec,
    origin: [f64; 3],
    row_dir: [f64; 3],
    col_dir: [f64; 3],
    px: f64,
    k: usize,
) -> (Vec<u16>, [u64; 4]) {
    let size = spec.size;
    let mut rng = Rng::new(spec.seed ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut counts = [0u64; 4];
    let mut pixels = Vec::with_capacity(size * size);
    for j in 0..size {
        for i in 0..size {
            let (fi, fj) = (i as f64 * px, j as f64 * px);
            let p: [f64; 3] =
                std::array::from_fn(|a| origin[a] + fi * row_dir[a] + fj * col_dir[a]);
            let (tissue, hu) = region_at(p, CENTRE_Z_MM);
            counts[tissue.index()] += 1;
            let stored = (hu + rng.noise() * NOISE_SIGMA_HU + 1024.0).round();
            // Signed 16-bit storage, carried as its two's-complement bit pattern.
            pixels.push(stored.clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16 as u16);
        }
    }
    (pixels, counts)
}

/// Attributes shared by every file of the series.
struct Common<'a> {
    spec: &'a PhantomSpec,
    study_uid: &'a str,
    series_uid: &'a str,
    frame_uid: &'a str,
    date: &'a str,
    time: &'a str,
    iop: Vec<f64>,
    px: f64,
}

/// What differs per file.
struct Slice<'a> {
    sop_uid: &'a str,
    instance_number: usize,
    ipp: [f64; 3],
    slice_location: f64,
    pixels: Vec<u16>,
}

fn encode(c: &Common<'_>, s: Slice<'_>) -> Result<Vec<u8>, SynthError> {
    let spec = c.spec;
    let mut obj = InMemDicomObject::new_empty();
    let mut text = |tag: Tag, vr: VR, v: &str| {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    text(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL");
    text(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE);
    text(tags::SOP_INSTANCE_UID, VR::UI, s.sop_uid);
    for tag in [tags::STUDY_DATE, tags::SERIES_DATE, tags::CONTENT_DATE] {
        text(tag, VR::DA, c.date);
    }
    for tag in [tags::STUDY_TIME, tags::SERIES_TIME, tags::CONTENT_TIME] {
        text(tag, VR::TM, c.time);
    }
    text(tags::ACCESSION_NUMBER, VR::SH, "");
    text(tags::MODALITY, VR::CS, "CT");
    text(tags::MANUFACTURER, VR::LO, "radflow");
    text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "");
    text(tags::STUDY_DESCRIPTION, VR::LO, "radflow phantom study");
    text(tags::SERIES_DESCRIPTION, VR::LO, "radflow phantom");
    text(tags::MANUFACTURER_MODEL_NAME, VR::LO, "radflow synth");
    text(tags::PATIENT_NAME, VR::PN, "PHANTOM^RADFLOW");
    text(tags::PATIENT_ID, VR::LO, "RADFLOW-PHANTOM");
    text(tags::PATIENT_BIRTH_DATE, VR::DA, "");
    text(tags::PATIENT_SEX, VR::CS, "O");
    text(tags::BODY_PART_EXAMINED, VR::CS, "ABDOMEN");
    text(tags::SLICE_THICKNESS, VR::DS, &ds(spec.slice_spacing_mm));
    text(tags::KVP, VR::DS, "120");
    text(tags::GANTRY_DETECTOR_TILT, VR::DS, &ds(spec.tilt_deg));
    text(tags::PATIENT_POSITION, VR::CS, "HFS");
    text(tags::STUDY_INSTANCE_UID, VR::UI, c.study_uid);
    text(tags::SERIES_INSTANCE_UID, VR::UI, c.series_uid);
    text(tags::STUDY_ID, VR::SH, "1");
    text(tags::SERIES_NUMBER, VR::IS, "1");
    text(tags::ACQUISITION_NUMBER, VR::IS, "1");
    text(
        tags::INSTANCE_NUMBER,
        VR::IS,
        &s.instance_number.to_string(),
    );
    text(tags::IMAGE_POSITION_PATIENT, VR::DS, &ds_list(&s.ipp));
    text(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, &ds_list(&c.iop));
    text(tags::FRAME_OF_REFERENCE_UID, VR::UI, c.frame_uid);
    text(tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
    text(tags::SLICE_LOCATION, VR::DS, &ds(s.slice_location));
    text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    text(tags::PIXEL_SPACING, VR::DS, &ds_list(&[c.px, c.px]));
    text(tags::WINDOW_CENTER, VR::DS, "40");
    text(tags::WINDOW_WIDTH, VR::DS, "400");
    text(tags::RESCALE_INTERCEPT, VR::DS, "-1024");
    text(tags::RESCALE_SLOPE, VR::DS, "1");
    text(tags::RESCALE_TYPE, VR::LO, "HU");
    let size = spec.size as u16;
    for (tag, v) in [
        (tags::SAMPLES_PER_PIXEL, 1),
        (tags::ROWS, size),
        (tags::COLUMNS, size),
        (tags::BITS_ALLOCATED, 16),
        (tags::BITS_STORED, 16),
        (tags::HIGH_BIT, 15),
        (tags::PIXEL_REPRESENTATION, 1),
    ] {
        obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(C::from_vec(s.pixels)),
    ));

    finish(obj, uids::CT_IMAGE_STORAGE, s.sop_uid, spec)
}

/// Adds the file meta group and encodes a Part-10 file.
fn finish(
    obj: InMemDicomObject,
    sop_class: &str,
    sop_uid: &str,
    spec: &PhantomSpec,
) -> Result<Vec<u8>, SynthError> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_uid)
        .transfer_syntax(spec.transfer_syntax.uid())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| SynthError::Dicom(e.to_string()))?;
    let file = obj.with_exact_meta(meta);
    let mut out = Vec::with_capacity(spec.size * spec.size * 2 + 4096);
    file.write_all(&mut out)
        .map_err(|e| SynthError::Dicom(e.to_string()))?;
    Ok(out)
}

/// A Decimal String value (at most 16 characters) as precise as fits.
fn ds(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v }; // no "-0"
    for decimals in (0..=10).rev() {
        let s = format!("{v:.decimals$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        };
        if s.len() <= 16 {
            return if s == "-0" { "0".to_owned() } else { s };
        }
    }
    format!("{v:.3e}")
}

fn ds_list(v: &[f64]) -> String {
    v.iter().map(|x| ds(*x)).collect::<Vec<_>>().join("\\")
}

/// Process entropy for UIDs: time, process id and a per-call counter.
fn entropy() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    nanos ^ u64::from(std::process::id()).rotate_left(32) ^ call.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// A small deterministic generator (SplitMix64): enough for noise, shuffling and
/// UID bits, and no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Approximately standard normal: the sum of four uniforms, centred and scaled to
    /// unit variance (Irwin–Hall), from one 64-bit draw.
    fn noise(&mut self) -> f64 {
        let r = self.next();
        let sum: f64 = (0..4)
            .map(|i| ((r >> (16 * i)) & 0xFFFF) as f64 / 65536.0)
            .sum();
        (sum - 2.0) * 3f64.sqrt()
    }

    /// Fisher–Yates shuffle.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }

    /// A UID under the `2.25` root: the decimal form of a random 128-bit value.
    fn uid(&mut self) -> String {
        let v = (u128::from(self.next()) << 64) | u128::from(self.next());
        format!("2.25.{v}")
    }

    /// A UID of exactly 64 characters: a [`Rng::uid`] arc with one more component of
    /// random digits (no leading zero) filling the rest.
    fn long_uid(&mut self) -> String {
        let mut uid = self.uid();
        uid.push('.');
        uid.push(char::from(b'1' + (self.next() % 9) as u8));
        while uid.len() < 64 {
            uid.push(char::from(b'0' + (self.next() % 10) as u8));
        }
        uid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tissue_layout() {
        let cz = 10.0;
        assert_eq!(tissue_at([0.0, 0.0, cz], cz), Tissue::SoftTissue);
        assert_eq!(tissue_at([140.0, 0.0, cz], cz), Tissue::Fat);
        assert_eq!(tissue_at([0.0, 105.0, 99.0], cz), Tissue::Fat);
        assert_eq!(tissue_at([160.0, 0.0, cz], cz), Tissue::Air);
        assert_eq!(tissue_at([0.0, 55.0, 500.0], cz), Tissue::Bone);
        assert_eq!(tissue_at([-60.0, 0.0, cz + 24.0], cz), Tissue::Bone);
        assert_eq!(tissue_at([-60.0, 0.0, cz + 26.0], cz), Tissue::SoftTissue);
        assert_eq!(region_at([60.0, -20.0, cz], cz), (Tissue::Air, -900.0));
        assert_eq!(region_at([-60.0, 0.0, cz], cz), (Tissue::Bone, 420.0));
        let names: Vec<_> = Tissue::ALL.iter().map(|t| t.label_name()).collect();
        assert_eq!(names, ["air", "fat", "soft_tissue", "bone"]);
        assert_eq!(Tissue::Bone.index(), 3);
    }

    #[test]
    fn decimal_strings_fit() {
        assert_eq!(ds(0.703125), "0.703125");
        assert_eq!(ds(-179.6484375), "-179.6484375");
        assert_eq!(ds(1.0), "1");
        assert_eq!(ds(-0.0), "0");
        let s = ds(-0.258_819_045_102_520_76);
        assert!(s.len() <= 16 && (s.parse::<f64>().unwrap() + 0.258_819_045).abs() < 1e-9);
        assert!(ds(-123456.123456789).len() <= 16);
    }

    #[test]
    fn noise_has_unit_variance_and_uids_are_valid() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.noise()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        let uid = r.uid();
        assert!(uid.len() <= 64 && uid.starts_with("2.25.") && !uid[5..].starts_with('0'));
        for _ in 0..100 {
            let long = r.long_uid();
            assert_eq!(long.len(), 64, "{long}");
            assert!(long.starts_with("2.25."));
            let parts: Vec<&str> = long.split('.').collect();
            assert_eq!(parts.len(), 4, "{long}");
            assert!(parts.iter().all(|p| {
                !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (p.len() == 1 || !p.starts_with('0'))
            }));
        }
        let mut v: Vec<usize> = (0..50).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
