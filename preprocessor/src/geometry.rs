//! Stacking decoded slices into one volume with a correct voxel-to-world transform.
//!
//! DICOM gives every image its own position (IPP) and orientation (IOP); the order of
//! files and even Instance Number are not reliable. [`build_volume`] checks that the
//! slices form one regular stack, orders them by their position along the slice normal,
//! drops duplicates, flags gaps and uneven spacing, and derives the affine that maps
//! voxel `(i, j, k)` = (column, row, slice) to RAS+ millimetres.
//!
//! The slice axis of the affine is the mean step between the first and last slice
//! positions, not the normal times the spacing: for a tilted gantry the positions step
//! along the table while the image planes are tilted, and only the measured step keeps
//! that shear.

use std::fmt::Write as _;

use ndarray::Array3;

use crate::decode::DecodedSlice;
use crate::volume::{Grid, Volume};

/// How strict [`build_volume`] is.
#[derive(Debug, Clone, PartialEq)]
pub struct GeometryOptions {
    /// Accept a series of one slice (its slice spacing is taken from Slice Thickness,
    /// else 1 mm). Models usually need a stack, so this is off by default.
    pub allow_single_slice: bool,
    /// Largest accepted deviation of any slice gap from the median gap, as a fraction of
    /// the median (0.1 = 10 %).
    pub spacing_tolerance: f64,
    /// Fail on uneven spacing instead of only warning: resampling would silently
    /// stretch the anatomy across a gap.
    pub reject_gaps: bool,
}

impl Default for GeometryOptions {
    fn default() -> Self {
        Self {
            allow_single_slice: false,
            spacing_tolerance: 0.1,
            reject_gaps: false,
        }
    }
}

/// What was found while building a volume.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BuildReport {
    /// Slices in the volume (after removing duplicates).
    pub slices: usize,
    /// Slices dropped because another slice had the same position.
    pub duplicates_removed: usize,
    /// Voxel spacing in mm, `[column, row, slice]`; the slice spacing is the median gap.
    pub spacing: [f64; 3],
    /// Non-fatal problems, as sentences for an operator.
    pub warnings: Vec<String>,
    /// Modality of the first slice (routing).
    pub modality: String,
    /// Body Part Examined of the first slice (routing).
    pub body_part: String,
    /// Series Description of the first slice (routing).
    pub series_description: String,
}

/// A volume in physical units and the report of how it was built.
#[derive(Debug, Clone)]
pub struct BuiltVolume {
    pub volume: Volume<f32>,
    pub report: BuildReport,
}

/// Why the slices do not form one volume. Messages are sentences for an operator.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GeometryError {
    /// Too few slices for a volume.
    #[error("a volume needs at least {needed} slices, the series has {found}")]
    NotEnoughSlices { found: usize, needed: usize },
    /// Some slices lack an attribute that placing them in space needs.
    #[error("{missing} of {total} slices have no {attribute}")]
    MissingAttribute {
        attribute: &'static str,
        missing: usize,
        total: usize,
    },
    /// The slices disagree on an attribute that must be shared; `groups` lists the
    /// distinct values with their slice counts.
    #[error("slices have {count} different {what}: {groups}")]
    Inconsistent {
        what: &'static str,
        count: usize,
        groups: String,
    },
    /// A slice's pixel buffer does not match its header.
    #[error("slice {index} has {found} pixels, its header says {expected}")]
    PixelCount {
        index: usize,
        found: usize,
        expected: usize,
    },
    /// Image Orientation (Patient) is not two orthogonal unit vectors.
    #[error("image orientation {0:?} is not two orthogonal directions")]
    BadOrientation([f64; 6]),
    /// The slice gaps vary more than allowed (only with `reject_gaps`).
    #[error("{0}")]
    UnevenSpacing(String),
}

/// Orders, checks and stacks slices into a volume; see the module docs.
pub fn build_volume(
    slices: Vec<DecodedSlice>,
    opts: &GeometryOptions,
) -> Result<BuiltVolume, GeometryError> {
    let needed = if opts.allow_single_slice { 1 } else { 2 };
    if slices.len() < needed {
        return Err(GeometryError::NotEnoughSlices {
            found: slices.len(),
            needed,
        });
    }
    let total = slices.len();
    let missing = |attribute, n: usize| {
        if n > 0 {
            Err(GeometryError::MissingAttribute {
                attribute,
                missing: n,
                total,
            })
        } else {
            Ok(())
        }
    };
    missing(
        "Image Position (Patient)",
        slices
            .iter()
            .filter(|s| s.header.image_position.is_none())
            .count(),
    )?;
    missing(
        "Image Orientation (Patient)",
        slices
            .iter()
            .filter(|s| s.header.image_orientation.is_none())
            .count(),
    )?;
    missing(
        "Pixel Spacing",
        slices
            .iter()
            .filter(|s| s.header.pixel_spacing.is_none())
            .count(),
    )?;

    consistent(
        "matrix sizes",
        &slices,
        |s| [s.header.cols as f64, s.header.rows as f64],
        0.0,
        |v| format!("{}x{}", v[0], v[1]),
    )?;
    consistent(
        "orientations",
        &slices,
        |s| s.header.image_orientation.expect("checked above"),
        1e-4,
        |v| format!("{}", Fmt(v)),
    )?;
    consistent(
        "pixel spacings",
        &slices,
        |s| s.header.pixel_spacing.expect("checked above"),
        1e-4,
        |v| format!("{}", Fmt(v)),
    )?;
    let (rows, cols) = (slices[0].header.rows, slices[0].header.cols);
    for (index, s) in slices.iter().enumerate() {
        if s.pixels.len() != rows * cols {
            return Err(GeometryError::PixelCount {
                index,
                found: s.pixels.len(),
                expected: rows * cols,
            });
        }
    }

    let iop = slices[0].header.image_orientation.expect("checked above");
    let (row_dir, col_dir) = orientation_axes(iop)?;
    let normal = cross(row_dir, col_dir);
    let [row_spacing, col_spacing] = slices[0].header.pixel_spacing.expect("checked above");

    // Order by position along the normal; ties broken by identity for determinism.
    let mut slices: Vec<(f64, DecodedSlice)> = slices
        .into_iter()
        .map(|s| (dot(normal, s.header.image_position.expect("checked")), s))
        .collect();
    slices.sort_by(|a, b| {
        a.0.total_cmp(&b.0).then_with(|| {
            a.1.header
                .sop_instance_uid
                .cmp(&b.1.header.sop_instance_uid)
        })
    });

    let mut warnings = Vec::new();
    let before = slices.len();
    let mut distinct_dropped = 0usize;
    let mut kept: Vec<(f64, DecodedSlice)> = Vec::with_capacity(before);
    for (d, s) in slices {
        match kept.last() {
            Some((last_d, last)) if (d - last_d).abs() < DUPLICATE_TOLERANCE_MM => {
                if last.header.sop_instance_uid != s.header.sop_instance_uid {
                    distinct_dropped += 1;
                }
            }
            _ => kept.push((d, s)),
        }
    }
    let duplicates_removed = before - kept.len();
    if distinct_dropped > 0 {
        warnings.push(format!(
            "{distinct_dropped} slices share their position with another image and were \
             dropped (several acquisitions in one series?)"
        ));
    }
    if kept.len() < needed {
        return Err(GeometryError::NotEnoughSlices {
            found: kept.len(),
            needed,
        });
    }

    let n = kept.len();
    let first_ipp = kept[0].1.header.image_position.expect("checked");
    let last_ipp = kept[n - 1].1.header.image_position.expect("checked");
    let (step, slice_spacing) = if n == 1 {
        let t = kept[0]
            .1
            .header
            .slice_thickness
            .filter(|t| *t > 0.0)
            .unwrap_or(1.0);
        warnings.push(format!(
            "single-slice volume: slice spacing taken as {t} mm"
        ));
        (normal.map(|x| x * t), t)
    } else {
        let gaps: Vec<f64> = kept.windows(2).map(|w| w[1].0 - w[0].0).collect();
        let median = median(&gaps);
        if let Some(msg) = spacing_problem(&kept, &gaps, median, opts.spacing_tolerance) {
            if opts.reject_gaps {
                return Err(GeometryError::UnevenSpacing(msg));
            }
            warnings.push(msg);
        }
        let step: [f64; 3] = std::array::from_fn(|a| (last_ipp[a] - first_ipp[a]) / (n - 1) as f64);
        // Positions that stray from the line first → last (beyond half a pixel) mean the
        // affine cannot place every slice exactly.
        let worst = kept
            .iter()
            .enumerate()
            .map(|(k, (_, s))| {
                let p = s.header.image_position.expect("checked");
                norm(std::array::from_fn(|a| {
                    p[a] - (first_ipp[a] + k as f64 * step[a])
                }))
            })
            .fold(0.0, f64::max);
        let limit = 0.5 * row_spacing.min(col_spacing).min(median);
        if worst > limit {
            warnings.push(format!(
                "slice positions deviate up to {worst:.3} mm from a regular stack; the \
                 volume places them on a regular grid"
            ));
        }
        (step, median)
    };

    // LPS affine, then to RAS by negating the x and y rows.
    let cols_lps = [
        row_dir.map(|x| x * col_spacing),
        col_dir.map(|x| x * row_spacing),
        step,
        first_ipp,
    ];
    let mut affine = [[0.0; 4]; 4];
    for r in 0..3 {
        let sign = if r < 2 { -1.0 } else { 1.0 };
        for (c, col) in cols_lps.iter().enumerate() {
            affine[r][c] = sign * col[r];
        }
    }
    affine[3][3] = 1.0;

    let first = &kept[0].1.header;
    let report = BuildReport {
        slices: n,
        duplicates_removed,
        spacing: [col_spacing, row_spacing, slice_spacing],
        warnings,
        modality: first.modality.clone(),
        body_part: first.body_part.clone(),
        series_description: first.series_description.clone(),
    };

    let mut data = Vec::with_capacity(n * rows * cols);
    for (_, s) in kept {
        data.extend_from_slice(&s.pixels);
    }
    let data = Array3::from_shape_vec((n, rows, cols), data).expect("length checked above");
    let grid = Grid {
        dims: [cols, rows, n],
        affine,
    };
    let volume = Volume::new(grid, data).expect("shape built from the grid");
    Ok(BuiltVolume { volume, report })
}

/// Slices closer than this along the normal are the same slice.
const DUPLICATE_TOLERANCE_MM: f64 = 1e-3;

/// Describes uneven spacing, if any gap deviates from the median beyond tolerance.
fn spacing_problem(
    kept: &[(f64, DecodedSlice)],
    gaps: &[f64],
    median: f64,
    tolerance: f64,
) -> Option<String> {
    let (worst, dev) = gaps
        .iter()
        .enumerate()
        .map(|(i, g)| (i, (g - median).abs()))
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    if dev <= tolerance * median {
        return None;
    }
    let (min, max) = gaps
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), g| {
            (lo.min(*g), hi.max(*g))
        });
    let uneven = gaps
        .iter()
        .filter(|g| (*g - median).abs() > tolerance * median)
        .count();
    Some(format!(
        "slice spacing is uneven: median {median:.3} mm, gaps from {min:.3} to {max:.3} mm, \
         {uneven} of {} gaps off by more than {:.0} %; the largest is between slices at \
         {:.3} and {:.3} mm along the normal",
        gaps.len(),
        tolerance * 100.0,
        kept[worst].0,
        kept[worst + 1].0
    ))
}

/// Fails when a per-slice value takes more than one value (within `tol`).
fn consistent<const N: usize>(
    what: &'static str,
    slices: &[DecodedSlice],
    value: impl Fn(&DecodedSlice) -> [f64; N],
    tol: f64,
    show: impl Fn(&[f64; N]) -> String,
) -> Result<(), GeometryError> {
    let mut groups: Vec<([f64; N], usize)> = Vec::new();
    for s in slices {
        let v = value(s);
        match groups
            .iter_mut()
            .find(|(g, _)| g.iter().zip(&v).all(|(a, b)| (a - b).abs() <= tol))
        {
            Some((_, count)) => *count += 1,
            None => groups.push((v, 1)),
        }
    }
    if groups.len() <= 1 {
        return Ok(());
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    let mut text = String::new();
    for (i, (v, count)) in groups.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        let unit = if *count == 1 { "slice" } else { "slices" };
        let _ = write!(text, "{} ({count} {unit})", show(v));
    }
    Err(GeometryError::Inconsistent {
        what,
        count: groups.len(),
        groups: text,
    })
}

/// Unit row and column directions from IOP, re-orthogonalised against rounding.
fn orientation_axes(iop: [f64; 6]) -> Result<([f64; 3], [f64; 3]), GeometryError> {
    let r = [iop[0], iop[1], iop[2]];
    let c = [iop[3], iop[4], iop[5]];
    let (nr, nc) = (norm(r), norm(c));
    if !(0.9..1.1).contains(&nr) || !(0.9..1.1).contains(&nc) || dot(r, c).abs() > 0.01 {
        return Err(GeometryError::BadOrientation(iop));
    }
    let r = r.map(|x| x / nr);
    // Remove the small component of c along r, then renormalise.
    let d = dot(r, c);
    let c: [f64; 3] = std::array::from_fn(|a| c[a] - d * r[a]);
    let nc = norm(c);
    Ok((r, c.map(|x| x / nc)))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        0.5 * (s[m - 1] + s[m])
    }
}

pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub(crate) fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub(crate) fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

/// Compact display of a few numbers: `[1, 0, 0, 0, 1, 0]`.
struct Fmt<'a, const N: usize>(&'a [f64; N]);

impl<const N: usize> std::fmt::Display for Fmt<'_, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            // Round to 1e-5 so that printing noise does not hide the difference.
            let r = (v * 1e5).round() / 1e5;
            write!(f, "{}", if r == 0.0 { 0.0 } else { r })?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::SliceHeader;

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

    fn slice(uid: &str, ipp: [f64; 3], iop: [f64; 6], rows: usize, cols: usize) -> DecodedSlice {
        let z = ipp[2] as f32;
        DecodedSlice {
            header: SliceHeader {
                sop_instance_uid: uid.into(),
                image_position: Some(ipp),
                image_orientation: Some(iop),
                pixel_spacing: Some([0.5, 0.7]),
                rows,
                cols,
                number_of_frames: 1,
                modality: "CT".into(),
                body_part: "ABDOMEN".into(),
                series_description: "test".into(),
                rescale: (1.0, 0.0),
                ..Default::default()
            },
            // Each pixel encodes its slice position and in-plane index.
            pixels: (0..rows * cols).map(|p| z * 1000.0 + p as f32).collect(),
        }
    }

    fn stack(zs: &[f64]) -> Vec<DecodedSlice> {
        zs.iter()
            .enumerate()
            .map(|(i, z)| slice(&format!("1.2.{i}"), [-10.0, 20.0, *z], AXIAL, 3, 4))
            .collect()
    }

    #[test]
    fn orders_by_position_not_file_order() {
        let built = build_volume(stack(&[4.0, 0.0, 2.0, 6.0]), &Default::default()).unwrap();
        let v = &built.volume;
        assert_eq!(v.grid.dims, [4, 3, 4]);
        let zs: Vec<f32> = (0..4).map(|k| v.data[[k, 0, 0]] / 1000.0).collect();
        assert_eq!(zs, vec![0.0, 2.0, 4.0, 6.0]);
        // In-plane order preserved: (j=1, i=2) is pixel 1*4+2.
        assert_eq!(v.data[[1, 1, 2]], 2000.0 + 6.0);
        assert_eq!(built.report.spacing, [0.7, 0.5, 2.0]);
        assert_eq!(built.report.slices, 4);
        assert!(
            built.report.warnings.is_empty(),
            "{:?}",
            built.report.warnings
        );
        assert_eq!(built.report.modality, "CT");
    }

    #[test]
    fn affine_maps_voxels_to_ras() {
        let built = build_volume(stack(&[0.0, 2.0, 4.0]), &Default::default()).unwrap();
        let g = &built.volume.grid;
        // Voxel (0,0,0) = IPP of the first slice, LPS (-10, 20, 0) = RAS (10, -20, 0).
        assert_eq!(g.world([0.0, 0.0, 0.0]), [10.0, -20.0, 0.0]);
        // i steps along the row direction (+x LPS) by the column spacing 0.7.
        let w = g.world([1.0, 0.0, 0.0]);
        assert!((w[0] - (10.0 - 0.7)).abs() < 1e-12);
        // j steps along the column direction (+y LPS) by the row spacing 0.5.
        let w = g.world([0.0, 1.0, 0.0]);
        assert!((w[1] - (-20.0 - 0.5)).abs() < 1e-12);
        assert_eq!(g.world([0.0, 0.0, 2.0])[2], 4.0);
    }

    #[test]
    fn orders_along_oblique_normal() {
        // Sagittal: rows along -y (LPS anterior), columns along -z; normal = r × c.
        let iop = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0];
        let normal = cross([0.0, 1.0, 0.0], [0.0, 0.0, -1.0]);
        assert_eq!(normal, [-1.0, 0.0, 0.0]);
        let slices: Vec<_> = [3.0, -3.0, 0.0]
            .iter()
            .enumerate()
            .map(|(i, x)| slice(&format!("{i}"), [*x, 0.0, *x * 1000.0], iop, 2, 2))
            .collect();
        let built = build_volume(slices, &Default::default()).unwrap();
        // Ascending n·IPP = descending x: 3, 0, -3 (the IPP z marks each slice).
        let order: Vec<f32> = (0..3)
            .map(|k| built.volume.data[[k, 0, 0]] / 1000.0)
            .collect();
        assert_eq!(order, vec![3000.0, 0.0, -3000.0]);
    }

    #[test]
    fn tilted_stack_keeps_shear() {
        let t = 20f64.to_radians();
        let iop = [1.0, 0.0, 0.0, 0.0, t.cos(), -t.sin()];
        let slices: Vec<_> = (0..5)
            .map(|k| slice(&format!("{k}"), [0.0, 0.0, 2.0 * k as f64], iop, 2, 2))
            .collect();
        let built = build_volume(slices, &Default::default()).unwrap();
        let g = &built.volume.grid;
        for k in 0..5 {
            let w = g.world([0.0, 0.0, k as f64]);
            assert!((w[2] - 2.0 * k as f64).abs() < 1e-9 && w[0].abs() < 1e-12);
            assert!(w[1].abs() < 1e-12);
        }
        // Slice spacing is measured along the normal: 2 mm × cos(tilt).
        assert!((built.report.spacing[2] - 2.0 * t.cos()).abs() < 1e-9);
        assert!(
            built.report.warnings.is_empty(),
            "{:?}",
            built.report.warnings
        );
    }

    #[test]
    fn removes_duplicates() {
        let mut s = stack(&[0.0, 1.0, 2.0]);
        s.push(s[1].clone());
        let built = build_volume(s, &Default::default()).unwrap();
        assert_eq!(built.report.duplicates_removed, 1);
        assert_eq!(built.report.slices, 3);
        assert!(built.report.warnings.is_empty());

        let mut s = stack(&[0.0, 1.0, 2.0]);
        let mut other = s[1].clone();
        other.header.sop_instance_uid = "9.9".into();
        s.push(other);
        let built = build_volume(s, &Default::default()).unwrap();
        assert_eq!(built.report.duplicates_removed, 1);
        assert_eq!(built.report.warnings.len(), 1);
    }

    #[test]
    fn gaps_warn_or_fail() {
        let zs = [0.0, 1.0, 2.0, 3.0, 5.0, 6.0];
        let built = build_volume(stack(&zs), &Default::default()).unwrap();
        assert_eq!(
            built.report.warnings.len(),
            2,
            "{:?}",
            built.report.warnings
        );
        assert!(built.report.warnings[0].contains("uneven"));
        assert!(built.report.warnings[0].contains("3.000 and 5.000"));
        let opts = GeometryOptions {
            reject_gaps: true,
            ..Default::default()
        };
        let err = build_volume(stack(&zs), &opts).unwrap_err();
        assert!(matches!(err, GeometryError::UnevenSpacing(_)));
        // Small jitter within the 10 % tolerance passes.
        let built = build_volume(stack(&[0.0, 1.05, 2.0, 3.0]), &opts).unwrap();
        assert_eq!(built.report.slices, 4);
    }

    #[test]
    fn rejects_mixed_sizes_with_counts() {
        let mut s = stack(&[0.0, 1.0, 2.0, 3.0]);
        s.push(slice("x", [0.0, 0.0, 9.0], AXIAL, 2, 2));
        let err = build_volume(s, &Default::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slices have 2 different matrix sizes: 4x3 (4 slices), 2x2 (1 slice)"
        );
    }

    #[test]
    fn rejects_mixed_orientation_and_spacing() {
        let mut s = stack(&[0.0, 1.0]);
        s[1].header.image_orientation = Some([1.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
        let err = build_volume(s, &Default::default()).unwrap_err();
        assert!(
            err.to_string().contains("2 different orientations"),
            "{err}"
        );

        let mut s = stack(&[0.0, 1.0]);
        s[1].header.pixel_spacing = Some([0.5, 0.5]);
        let err = build_volume(s, &Default::default()).unwrap_err();
        assert!(
            err.to_string().contains("2 different pixel spacings"),
            "{err}"
        );
    }

    #[test]
    fn missing_attributes_and_counts() {
        let mut s = stack(&[0.0, 1.0, 2.0]);
        s[2].header.image_position = None;
        assert_eq!(
            build_volume(s, &Default::default()).unwrap_err(),
            GeometryError::MissingAttribute {
                attribute: "Image Position (Patient)",
                missing: 1,
                total: 3
            }
        );
        let err = build_volume(stack(&[0.0]), &Default::default()).unwrap_err();
        assert_eq!(
            err,
            GeometryError::NotEnoughSlices {
                found: 1,
                needed: 2
            }
        );
        // Two copies of one slice are one slice.
        let mut s = stack(&[0.0]);
        s.push(s[0].clone());
        assert!(build_volume(s, &Default::default()).is_err());
    }

    #[test]
    fn single_slice_when_allowed() {
        let mut s = stack(&[5.0]);
        s[0].header.slice_thickness = Some(3.0);
        let opts = GeometryOptions {
            allow_single_slice: true,
            ..Default::default()
        };
        let built = build_volume(s, &opts).unwrap();
        assert_eq!(built.volume.grid.dims, [4, 3, 1]);
        assert_eq!(built.report.spacing[2], 3.0);
        assert_eq!(built.volume.grid.spacing()[2], 3.0);
    }

    #[test]
    fn bad_orientation() {
        let mut s = stack(&[0.0, 1.0]);
        for x in &mut s {
            x.header.image_orientation = Some([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        }
        assert!(matches!(
            build_volume(s, &Default::default()),
            Err(GeometryError::BadOrientation(_))
        ));
    }
}
