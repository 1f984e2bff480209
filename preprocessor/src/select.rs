//! Which images of a series make its volume, and why the others do not.
//!
//! A "series" as scanners send it is often more than one stack of slices: dose reports
//! and structured reports, scouts, maximum-intensity projections, screenshots, a
//! second orientation, stray images of another size. [`select`] keeps only images that
//! can be slices of a grey-scale volume:
//! - cross-sectional image SOP classes (CT, MR, PET, their enhanced and legacy
//!   converted forms); everything else (secondary captures, X-ray, ultrasound,
//!   segmentations, dose objects…) is left out;
//! - not a localizer or scout (`LOCALIZER`/`SCOUT` in Image Type or Frame Type);
//! - not a projection (`MIP`, `MINIP`, `PROJECTION IMAGE`…);
//! - grey-scale (models here take one channel; colour images are left out).
//!
//! The rest is split into stacks that share matrix size, orientation and pixel spacing.
//! A stack with at least `min_slices` distinct positions could be a volume. Exactly one
//! such stack is the volume, and the others are noted as left out; none means the
//! series is not a volume (nothing is wrong with it, there is just nothing to do); two
//! or more are ambiguous and the series is refused, naming the stacks.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use dicom_core::dictionary::UidDictionary;
use dicom_dictionary_std::StandardSopClassDictionary;

use crate::geometry::{self, GeometryError, GeometryOptions};
use crate::header::{InstanceHeader, SliceHeader};

/// SOP classes whose images are slices of a cross-sectional volume.
const VOLUME_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.2",     // CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",   // Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",   // Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",     // MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",   // Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.4",   // Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",   // Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.128.1", // Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.130",   // Enhanced PET Image
];

/// Whether images of SOP class `uid` can be slices of a cross-sectional volume.
pub fn is_volume_class(uid: &str) -> bool {
    VOLUME_CLASSES.contains(&uid)
}

/// An image of the series: the file it is in and its index among that file's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef {
    pub file: usize,
    pub image: usize,
}

/// The images chosen for the volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Images of the chosen stack, in file order.
    pub images: Vec<ImageRef>,
    /// What was left out and why, as sentences for an operator.
    pub notes: Vec<String>,
}

/// Why no volume is chosen.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectError {
    /// Nothing in the series can be a volume. Not a fault of the data: the series is
    /// skipped with this reason.
    #[error("not a volume: {reason}")]
    NotAVolume { code: &'static str, reason: String },
    /// Several stacks could each be the volume.
    #[error("the series mixes {count} stacks that could each be a volume: {stacks}")]
    MixedStacks { count: usize, stacks: String },
    /// Images that would be slices cannot be placed in space.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
}

impl SelectError {
    /// Machine-readable reason.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotAVolume { code, .. } => code,
            Self::MixedStacks { .. } => "mixed_stacks",
            Self::Geometry(e) => e.code(),
        }
    }
}

/// Why an image is not a slice of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Exclusion {
    NoPixelData,
    Unreadable,
    NotCrossSectional,
    Localizer,
    Projection,
    Colour,
}

impl Exclusion {
    fn code(self) -> &'static str {
        match self {
            Self::NoPixelData => "no_images",
            Self::Unreadable => "unreadable_objects",
            Self::NotCrossSectional => "not_cross_sectional",
            Self::Localizer => "localizer",
            Self::Projection => "projection",
            Self::Colour => "colour",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::NoPixelData => "without pixel data",
            Self::Unreadable => "that cannot be read",
            Self::NotCrossSectional => "not cross-sectional",
            Self::Localizer => "localizer or scout",
            Self::Projection => "projection (MIP)",
            Self::Colour => "colour",
        }
    }
}

fn exclusion(h: &SliceHeader) -> Option<Exclusion> {
    let class = h.sop_class_uid.as_str();
    let cross_sectional = VOLUME_CLASSES.contains(&class)
        || (class.is_empty() && matches!(h.modality.as_str(), "CT" | "MR" | "PT"));
    let types: Vec<String> = h
        .image_type
        .iter()
        .map(|t| t.to_ascii_uppercase())
        .collect();
    let has_token = |words: &[&str]| {
        types.iter().any(|t| {
            t.split(|c: char| c.is_whitespace() || c == '_')
                .any(|w| words.contains(&w))
        })
    };
    if !cross_sectional {
        Some(Exclusion::NotCrossSectional)
    } else if has_token(&["LOCALIZER", "SCOUT"]) {
        Some(Exclusion::Localizer)
    } else if has_token(&["MIP", "MINIP", "MNIP", "MAXIP"])
        || types.iter().any(|t| t.starts_with("PROJECTION"))
    {
        Some(Exclusion::Projection)
    } else if !h.is_greyscale() {
        Some(Exclusion::Colour)
    } else {
        None
    }
}

/// Human name of a SOP class, else its UID.
pub fn sop_class_name(uid: &str) -> String {
    StandardSopClassDictionary
        .by_uid(uid)
        .map(|e| e.name.to_owned())
        .unwrap_or_else(|| {
            if uid.is_empty() {
                "unknown SOP class".to_owned()
            } else {
                uid.to_owned()
            }
        })
}

/// Chooses the images of the volume among every image of the series (`files`, by
/// file index), given the SOP classes of objects without pixel data (`non_images`)
/// and of objects that are no images and could not be read (`unreadable`).
pub fn select(
    files: &[&InstanceHeader],
    non_images: &[String],
    unreadable: &[String],
    opts: &GeometryOptions,
) -> Result<Selection, SelectError> {
    // Left-out images by reason, with the SOP classes involved.
    let mut left_out: BTreeMap<Exclusion, (usize, Vec<String>)> = BTreeMap::new();
    let mut note = |why: Exclusion, class: &str| {
        let e = left_out.entry(why).or_default();
        e.0 += 1;
        let name = sop_class_name(class);
        if !e.1.contains(&name) {
            e.1.push(name);
        }
    };
    for class in non_images {
        note(Exclusion::NoPixelData, class);
    }
    for class in unreadable {
        note(Exclusion::Unreadable, class);
    }
    let mut candidates: Vec<(ImageRef, &SliceHeader)> = Vec::new();
    for (file, header) in files.iter().enumerate() {
        for (image, h) in header.images.iter().enumerate() {
            match exclusion(h) {
                Some(why) => note(why, &h.sop_class_uid),
                None => candidates.push((ImageRef { file, image }, h)),
            }
        }
    }
    let mut notes: Vec<String> = left_out
        .iter()
        .map(|(why, (n, classes))| {
            format!(
                "{n} image(s) {} left out ({})",
                why.describe(),
                classes.join(", ")
            )
        })
        .collect();
    if candidates.is_empty() {
        let Some((why, (n, _))) = left_out.iter().max_by_key(|(_, (n, _))| *n) else {
            return Err(SelectError::NotAVolume {
                code: Exclusion::NoPixelData.code(),
                reason: "the series holds no objects".to_owned(),
            });
        };
        let total: usize = left_out.values().map(|v| v.0).sum();
        return Err(SelectError::NotAVolume {
            code: why.code(),
            reason: format!(
                "none of its {total} image(s) can be a slice of a volume ({}; {n} {})",
                notes.join("; "),
                why.describe()
            ),
        });
    }
    // Placing images needs their geometry; a candidate without it is an error of the
    // data, not a reason to leave it out.
    for (attribute, missing) in [
        (
            "Image Position (Patient)",
            candidates
                .iter()
                .filter(|c| c.1.image_position.is_none())
                .count(),
        ),
        (
            "Image Orientation (Patient)",
            candidates
                .iter()
                .filter(|c| c.1.image_orientation.is_none())
                .count(),
        ),
        (
            "Pixel Spacing",
            candidates
                .iter()
                .filter(|c| c.1.pixel_spacing.is_none())
                .count(),
        ),
    ] {
        if missing > 0 {
            return Err(GeometryError::MissingAttribute {
                attribute,
                missing,
                total: candidates.len(),
            }
            .into());
        }
    }

    let stacks = split_stacks(&candidates);
    let positions = |s: &Stack| distinct_positions(s, &candidates);
    let qualifying: Vec<&Stack> = stacks
        .iter()
        .filter(|s| positions(s) >= opts.min_slices.max(1))
        .collect();
    match qualifying.len() {
        0 => {
            let described = describe_stacks(stacks.iter(), &candidates);
            Err(SelectError::NotAVolume {
                code: "too_few_slices",
                reason: format!(
                    "a volume needs at least {} slice positions; the series has {described}",
                    opts.min_slices
                ),
            })
        }
        1 => {
            let chosen = qualifying[0];
            let others: usize = stacks
                .iter()
                .filter(|s| !std::ptr::eq(*s, chosen))
                .map(|s| s.members.len())
                .sum();
            if others > 0 {
                let described = describe_stacks(
                    stacks.iter().filter(|s| !std::ptr::eq(*s, chosen)),
                    &candidates,
                );
                notes.push(format!(
                    "{others} image(s) of another size, orientation or spacing left out ({described})"
                ));
            }
            let mut images: Vec<ImageRef> =
                chosen.members.iter().map(|m| candidates[*m].0).collect();
            images.sort();
            Ok(Selection { images, notes })
        }
        count => Err(SelectError::MixedStacks {
            count,
            stacks: describe_stacks(qualifying.into_iter(), &candidates),
        }),
    }
}

/// Images (indices into the candidates) that share a matrix, orientation and spacing.
struct Stack {
    members: Vec<usize>,
}

fn split_stacks(candidates: &[(ImageRef, &SliceHeader)]) -> Vec<Stack> {
    let mut stacks: Vec<(Vec<f64>, Stack)> = Vec::new();
    for (i, (_, h)) in candidates.iter().enumerate() {
        let key: Vec<f64> = [h.rows as f64, h.cols as f64]
            .into_iter()
            .chain(h.image_orientation.expect("checked"))
            .chain(h.pixel_spacing.expect("checked"))
            .collect();
        let same = |k: &[f64]| {
            k[..2] == key[..2]
                && k[2..]
                    .iter()
                    .zip(&key[2..])
                    .all(|(a, b)| (a - b).abs() <= 1e-4)
        };
        match stacks.iter_mut().find(|(k, _)| same(k)) {
            Some((_, s)) => s.members.push(i),
            None => stacks.push((key, Stack { members: vec![i] })),
        }
    }
    let mut stacks: Vec<Stack> = stacks.into_iter().map(|(_, s)| s).collect();
    stacks.sort_by_key(|s| std::cmp::Reverse(s.members.len()));
    stacks
}

fn distinct_positions(s: &Stack, candidates: &[(ImageRef, &SliceHeader)]) -> usize {
    let h0 = candidates[s.members[0]].1;
    let iop = h0.image_orientation.expect("checked");
    let normal = geometry::cross([iop[0], iop[1], iop[2]], [iop[3], iop[4], iop[5]]);
    let mut d: Vec<f64> = s
        .members
        .iter()
        .map(|m| geometry::dot(normal, candidates[*m].1.image_position.expect("checked")))
        .collect();
    d.sort_by(f64::total_cmp);
    d.dedup_by(|a, b| (*a - *b).abs() < 1e-3);
    d.len()
}

/// "40 images 512x512 axial at 12 positions, 3 images 256x256 coronal at 3 positions".
fn describe_stacks<'a>(
    stacks: impl Iterator<Item = &'a Stack>,
    candidates: &[(ImageRef, &SliceHeader)],
) -> String {
    let mut text = String::new();
    for (i, s) in stacks.enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        let h = candidates[s.members[0]].1;
        let _ = write!(
            text,
            "{} image(s) {}x{} {} at {} position(s)",
            s.members.len(),
            h.cols,
            h.rows,
            plane_name(h.image_orientation.expect("checked")),
            distinct_positions(s, candidates)
        );
    }
    text
}

/// The anatomical plane of an orientation: the patient axis its normal is closest to.
fn plane_name(iop: [f64; 6]) -> &'static str {
    let n = geometry::cross([iop[0], iop[1], iop[2]], [iop[3], iop[4], iop[5]]);
    let (axis, value) = n
        .iter()
        .enumerate()
        .map(|(a, v)| (a, v.abs()))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("three components");
    if value < 0.9 {
        return "oblique";
    }
    ["sagittal", "coronal", "axial"][axis]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::SliceHeader;

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    const CORONAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0];

    fn image(z: f64, size: usize, iop: [f64; 6]) -> SliceHeader {
        SliceHeader {
            sop_instance_uid: format!("2.25.{}", (z * 10.0) as i64 + 1000 * size as i64),
            image_position: Some(if iop == AXIAL {
                [0.0, 0.0, z]
            } else {
                [0.0, z, 0.0]
            }),
            image_orientation: Some(iop),
            pixel_spacing: Some([1.0, 1.0]),
            rows: size,
            cols: size,
            number_of_frames: 1,
            modality: "CT".into(),
            image_type: vec!["ORIGINAL".into(), "PRIMARY".into(), "AXIAL".into()],
            photometric: "MONOCHROME2".into(),
            samples_per_pixel: 1,
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            ..Default::default()
        }
    }

    fn files(images: Vec<SliceHeader>) -> Vec<InstanceHeader> {
        images.into_iter().map(InstanceHeader::for_tests).collect()
    }

    fn run(images: Vec<SliceHeader>, non_images: &[&str]) -> Result<Selection, SelectError> {
        let f = files(images);
        let refs: Vec<&InstanceHeader> = f.iter().collect();
        let non: Vec<String> = non_images.iter().map(|s| s.to_string()).collect();
        select(&refs, &non, &[], &GeometryOptions::default())
    }

    #[test]
    fn leaves_out_what_is_not_a_slice() {
        let mut all: Vec<SliceHeader> = (0..5).map(|k| image(k as f64, 8, AXIAL)).collect();
        let mut scout = image(0.0, 8, CORONAL);
        scout.image_type = vec!["ORIGINAL".into(), "PRIMARY".into(), "LOCALIZER".into()];
        let mut mip = image(3.0, 8, AXIAL);
        mip.image_type = vec!["DERIVED".into(), "SECONDARY".into(), "CSA MIP".into()];
        let mut colour = image(4.0, 8, AXIAL);
        colour.samples_per_pixel = 3;
        colour.photometric = "RGB".into();
        let mut capture = image(2.0, 8, AXIAL);
        capture.sop_class_uid = "1.2.840.10008.5.1.4.1.1.7".into();
        all.extend([scout, mip, colour, capture]);
        let s = run(all, &["1.2.840.10008.5.1.4.1.1.88.67"]).unwrap();
        assert_eq!(s.images.len(), 5);
        assert!(s.images.iter().all(|r| r.file < 5));
        let notes = s.notes.join(" | ");
        for want in [
            "1 image(s) without pixel data left out (X-Ray Radiation Dose SR Storage)",
            "1 image(s) not cross-sectional left out (Secondary Capture Image Storage)",
            "localizer or scout",
            "projection (MIP)",
            "colour",
        ] {
            assert!(notes.contains(want), "{notes}");
        }
    }

    #[test]
    fn nothing_usable_is_not_a_volume() {
        let mut scouts: Vec<SliceHeader> = (0..3).map(|k| image(k as f64, 8, AXIAL)).collect();
        for s in &mut scouts {
            s.image_type = vec!["ORIGINAL".into(), "PRIMARY".into(), "LOCALIZER".into()];
        }
        let e = run(scouts, &["1.2.840.10008.5.1.4.1.1.88.11"]).unwrap_err();
        assert_eq!(e.code(), "localizer");
        assert!(e.to_string().contains("none of its 4 image(s)"), "{e}");
        let e = run(vec![], &["1.2.840.10008.5.1.4.1.1.88.11"]).unwrap_err();
        assert_eq!(e.code(), "no_images");
        let e = run(vec![image(0.0, 8, AXIAL), image(1.0, 8, AXIAL)], &[]).unwrap_err();
        assert_eq!(e.code(), "too_few_slices");
        assert!(
            e.to_string()
                .contains("2 image(s) 8x8 axial at 2 position(s)"),
            "{e}"
        );
    }

    #[test]
    fn one_qualifying_stack_wins_two_are_refused() {
        let mut all: Vec<SliceHeader> = (0..6).map(|k| image(k as f64, 8, AXIAL)).collect();
        all.push(image(0.0, 4, AXIAL));
        all.push(image(1.0, 8, CORONAL));
        let s = run(all.clone(), &[]).unwrap();
        assert_eq!(s.images.len(), 6);
        assert!(
            s.notes[0].contains("2 image(s) of another size"),
            "{:?}",
            s.notes
        );

        all.extend((0..4).map(|k| image(k as f64, 4, AXIAL)));
        let e = run(all, &[]).unwrap_err();
        assert_eq!(e.code(), "mixed_stacks");
        assert_eq!(
            e.to_string(),
            "the series mixes 2 stacks that could each be a volume: 6 image(s) 8x8 axial at \
             6 position(s), 5 image(s) 4x4 axial at 4 position(s)"
        );
    }

    #[test]
    fn missing_geometry_is_an_error() {
        let mut all: Vec<SliceHeader> = (0..4).map(|k| image(k as f64, 8, AXIAL)).collect();
        all[2].image_position = None;
        let e = run(all, &[]).unwrap_err();
        assert_eq!(e.code(), "missing_attribute");
        assert_eq!(
            e.to_string(),
            "1 of 4 images have no Image Position (Patient)"
        );
    }

    #[test]
    fn plane_names() {
        assert_eq!(plane_name(AXIAL), "axial");
        assert_eq!(plane_name(CORONAL), "coronal");
        assert_eq!(plane_name([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]), "sagittal");
        let t = 30f64.to_radians();
        assert_eq!(
            plane_name([1.0, 0.0, 0.0, 0.0, t.cos(), t.sin()]),
            "oblique"
        );
    }
}
