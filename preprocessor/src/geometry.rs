//! Stacking images into one volume with a correct voxel-to-world transform.
//!
//! DICOM gives every image its own position (IPP) and orientation (IOP); the order of
//! files and even Instance Number are not reliable. [`plan_volume`] checks that the
//! images form one stack, orders them by their position along the slice normal, drops
//! duplicates, refuses a time series (several images at every position), and derives
//! the regular grid and the affine that maps voxel `(i, j, k)` = (column, row, slice)
//! to RAS+ millimetres. The plan says where each plane of the volume comes from, so the
//! pixels can be decoded straight into place ([`crate::convert`]).
//!
//! The slice axis of the affine is the mean step between the first and last slice
//! positions, not the normal times the spacing: for a tilted gantry the positions step
//! along the table while the image planes are tilted, and only the measured step keeps
//! that shear.
//!
//! # Uneven spacing and missing slices
//!
//! The regular spacing is the median gap between neighbouring positions. Gaps within
//! `spacing_tolerance` of it are jitter, and the images are the planes. Otherwise the
//! series is uneven: a gap of about twice the spacing or more means missing slices,
//! which makes the series *suspect incomplete* (the reason travels with the volume).
//! Depending on [`UnevenSpacing`], the series is then refused, or its planes are
//! interpolated linearly, at the regular spacing, from the images at their true
//! positions; a gap wider than `max_gap_ratio` times the spacing is always refused.

use std::fmt::Write as _;

use ndarray::Array3;
use radflow_volume::{Grid, Volume};

use crate::header::{DecodedSlice, SliceHeader};

/// What to do when slice gaps vary beyond the tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnevenSpacing {
    /// Interpolate planes at the regular spacing from the true positions.
    #[default]
    Interpolate,
    /// Refuse the series.
    Reject,
}

/// How strict [`plan_volume`] is.
#[derive(Debug, Clone, PartialEq)]
pub struct GeometryOptions {
    /// Fewest distinct slice positions that make a volume. A series with fewer is not a
    /// volume (a scout, a single image, a cine loop at one position).
    pub min_slices: usize,
    /// Largest deviation of a slice gap from the regular (median) gap that still counts
    /// as regular, as a fraction of it (0.1 = 10 %).
    pub spacing_tolerance: f64,
    /// What to do with gaps beyond the tolerance.
    pub uneven_spacing: UnevenSpacing,
    /// Widest gap, in regular spacings, that interpolation may bridge.
    pub max_gap_ratio: f64,
}

impl Default for GeometryOptions {
    fn default() -> Self {
        Self {
            min_slices: 3,
            spacing_tolerance: 0.1,
            uneven_spacing: UnevenSpacing::Interpolate,
            max_gap_ratio: 5.0,
        }
    }
}

/// What was found while planning a volume.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BuildReport {
    /// Planes (slices) of the volume.
    pub slices: usize,
    /// Images dropped because another image had the same position.
    pub duplicates_removed: usize,
    /// Voxel spacing in mm, `[column, row, slice]`; the slice spacing is the median gap.
    pub spacing: [f64; 3],
    /// Non-fatal problems, as sentences for an operator.
    pub warnings: Vec<String>,
    /// Why the series may be missing slices, if it may.
    pub suspect_incomplete: Option<String>,
    /// Modality of the first image (routing).
    pub modality: String,
    /// Body Part Examined of the first image (routing).
    pub body_part: String,
    /// Series Description of the first image (routing).
    pub series_description: String,
}

/// Where the pixels of one plane of the volume come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlaneSource {
    /// This image, as it is.
    Image(usize),
    /// `(1 - weight) * below + weight * above`, interpolated between two images.
    Blend {
        below: usize,
        above: usize,
        weight: f32,
    },
}

/// The grid of a volume and where each of its planes comes from; image indices refer
/// to the headers given to [`plan_volume`].
#[derive(Debug, Clone, PartialEq)]
pub struct VolumePlan {
    pub grid: Grid,
    /// One entry per plane `k`, in order.
    pub planes: Vec<PlaneSource>,
    pub report: BuildReport,
}

impl VolumePlan {
    /// Whether every plane is an image as it is (nothing is interpolated).
    pub fn is_direct(&self) -> bool {
        self.planes
            .iter()
            .all(|p| matches!(p, PlaneSource::Image(_)))
    }

    /// Images the planes read, each once, in plane order.
    pub fn images(&self) -> Vec<usize> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for p in &self.planes {
            let (a, b) = match *p {
                PlaneSource::Image(i) => (i, None),
                PlaneSource::Blend { below, above, .. } => (below, Some(above)),
            };
            for i in std::iter::once(a).chain(b) {
                if seen.insert(i) {
                    out.push(i);
                }
            }
        }
        out
    }
}

/// A volume in physical units and the report of how it was built.
#[derive(Debug, Clone)]
pub struct BuiltVolume {
    pub volume: Volume<f32>,
    pub report: BuildReport,
}

/// Why the images do not form one volume. Messages are sentences for an operator.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GeometryError {
    /// Too few slice positions for a volume.
    #[error("a volume needs at least {needed} slice positions, the series has {found}")]
    NotEnoughSlices { found: usize, needed: usize },
    /// Some images lack an attribute that placing them in space needs.
    #[error("{missing} of {total} images have no {attribute}")]
    MissingAttribute {
        attribute: &'static str,
        missing: usize,
        total: usize,
    },
    /// The images disagree on an attribute that must be shared; `groups` lists the
    /// distinct values with their image counts.
    #[error("images have {count} different {what}: {groups}")]
    Inconsistent {
        what: &'static str,
        count: usize,
        groups: String,
    },
    /// An image's pixel buffer does not match its header.
    #[error("image {index} has {found} pixels, its header says {expected}")]
    PixelCount {
        index: usize,
        found: usize,
        expected: usize,
    },
    /// Image Orientation (Patient) is not two orthogonal unit vectors.
    #[error("image orientation {0:?} is not two orthogonal directions")]
    BadOrientation([f64; 6]),
    /// The slice gaps vary more than allowed and the options say to refuse.
    #[error("{0}")]
    UnevenSpacing(String),
    /// A gap is wider than interpolation may bridge.
    #[error("{0}")]
    GapTooLarge(String),
    /// Every position holds several images: a time series or other 4D acquisition.
    #[error(
        "the series holds {volumes} images at each of its {positions} slice positions \
         (a time series, diffusion or multi-echo acquisition); it is not one volume"
    )]
    MultipleVolumes { volumes: usize, positions: usize },
}

impl GeometryError {
    /// Machine-readable reason.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotEnoughSlices { .. } => "too_few_slices",
            Self::MissingAttribute { .. } => "missing_attribute",
            Self::Inconsistent { .. } => "inconsistent_images",
            Self::PixelCount { .. } => "pixel_count_mismatch",
            Self::BadOrientation(_) => "bad_orientation",
            Self::UnevenSpacing(_) => "uneven_spacing",
            Self::GapTooLarge(_) => "gap_too_large",
            Self::MultipleVolumes { .. } => "multiple_volumes",
        }
    }
}

/// Slices closer than this along the normal are at the same position.
const DUPLICATE_TOLERANCE_MM: f64 = 1e-3;

/// Orders and checks images and plans the volume's grid; see the module docs.
pub fn plan_volume(
    headers: &[SliceHeader],
    opts: &GeometryOptions,
) -> Result<VolumePlan, GeometryError> {
    let needed = opts.min_slices.max(1);
    if headers.len() < needed {
        return Err(GeometryError::NotEnoughSlices {
            found: headers.len(),
            needed,
        });
    }
    check_attributes(headers)?;
    let iop = headers[0].image_orientation.expect("checked");
    let (row_dir, col_dir) = orientation_axes(iop)?;
    let normal = cross(row_dir, col_dir);
    let [row_spacing, col_spacing] = headers[0].pixel_spacing.expect("checked");

    // Order by position along the normal; ties broken by identity for determinism.
    let identity = |h: &SliceHeader| (h.sop_instance_uid.clone(), h.frame, h.tile.map(|t| t.index));
    let mut order: Vec<(f64, usize)> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| (dot(normal, h.image_position.expect("checked")), i))
        .collect();
    order.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then_with(|| identity(&headers[a.1]).cmp(&identity(&headers[b.1])))
    });

    // Group images at the same position; count the distinct images of each group.
    let mut groups: Vec<(f64, Vec<usize>)> = Vec::new();
    for (d, i) in order {
        match groups.last_mut() {
            Some((gd, members)) if (d - *gd).abs() < DUPLICATE_TOLERANCE_MM => members.push(i),
            _ => groups.push((d, vec![i])),
        }
    }
    if groups.len() < needed {
        return Err(GeometryError::NotEnoughSlices {
            found: groups.len(),
            needed,
        });
    }
    let distinct = |members: &[usize]| {
        let mut ids: Vec<_> = members.iter().map(|i| identity(&headers[*i])).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    let counts: Vec<usize> = groups.iter().map(|(_, m)| distinct(m)).collect();
    if counts[0] > 1 && counts.iter().all(|c| *c == counts[0]) {
        return Err(GeometryError::MultipleVolumes {
            volumes: counts[0],
            positions: groups.len(),
        });
    }
    let mut warnings = Vec::new();
    let dropped_distinct: usize = counts.iter().map(|c| c - 1).sum();
    if dropped_distinct > 0 {
        warnings.push(format!(
            "{dropped_distinct} images share their position with another image and were \
             dropped (several acquisitions in one series?)"
        ));
    }
    let kept: Vec<(f64, usize)> = groups.iter().map(|(d, m)| (*d, m[0])).collect();
    let duplicates_removed = headers.len() - kept.len();

    let n = kept.len();
    let ipp = |k: usize| headers[kept[k].1].image_position.expect("checked");
    let (first_ipp, last_ipp) = (ipp(0), ipp(n - 1));
    let mut suspect_incomplete = None;
    let (step, slice_spacing, planes) = if n == 1 {
        let t = headers[kept[0].1].slice_thickness.unwrap_or(1.0);
        warnings.push(format!(
            "single-slice volume: slice spacing taken as {t} mm"
        ));
        (
            normal.map(|x| x * t),
            t,
            vec![PlaneSource::Image(kept[0].1)],
        )
    } else {
        let gaps: Vec<f64> = kept.windows(2).map(|w| w[1].0 - w[0].0).collect();
        let s = median(&gaps);
        let tol = opts.spacing_tolerance * s;
        if gaps.iter().all(|g| (g - s).abs() <= tol) {
            let step: [f64; 3] =
                std::array::from_fn(|a| (last_ipp[a] - first_ipp[a]) / (n - 1) as f64);
            // Positions that stray from the line first → last (beyond half a pixel)
            // mean the affine cannot place every slice exactly.
            let worst = (0..n)
                .map(|k| {
                    let p = ipp(k);
                    norm(std::array::from_fn(|a| {
                        p[a] - (first_ipp[a] + k as f64 * step[a])
                    }))
                })
                .fold(0.0, f64::max);
            let limit = 0.5 * row_spacing.min(col_spacing).min(s);
            if worst > limit {
                warnings.push(format!(
                    "slice positions deviate up to {worst:.3} mm from a regular stack; the \
                     volume places them on a regular grid"
                ));
            }
            let planes = kept.iter().map(|(_, i)| PlaneSource::Image(*i)).collect();
            (step, s, planes)
        } else {
            let description = describe_uneven(&kept, &gaps, s, opts.spacing_tolerance);
            suspect_incomplete = description.missing.clone();
            let summary = description.summary();
            if opts.uneven_spacing == UnevenSpacing::Reject {
                return Err(GeometryError::UnevenSpacing(summary));
            }
            let widest = gaps.iter().copied().fold(0.0, f64::max);
            if widest > opts.max_gap_ratio * s {
                return Err(GeometryError::GapTooLarge(format!(
                    "{summary}; a gap of {widest:.3} mm is more than {} times the regular \
                     spacing, too wide to interpolate",
                    opts.max_gap_ratio
                )));
            }
            let (d0, dn) = (kept[0].0, kept[n - 1].0);
            let count = ((dn - d0) / s).round() as usize + 1;
            let mut planes = Vec::with_capacity(count);
            let mut j = 0;
            for k in 0..count {
                let t = (d0 + k as f64 * s).min(dn);
                while j + 2 < n && kept[j + 1].0 <= t {
                    j += 1;
                }
                let (lo, hi) = (kept[j], kept[j + 1]);
                let w = ((t - lo.0) / (hi.0 - lo.0)).clamp(0.0, 1.0);
                planes.push(if w < 1e-6 {
                    PlaneSource::Image(lo.1)
                } else if w > 1.0 - 1e-6 {
                    PlaneSource::Image(hi.1)
                } else {
                    PlaneSource::Blend {
                        below: lo.1,
                        above: hi.1,
                        weight: w as f32,
                    }
                });
            }
            warnings.push(format!(
                "{summary}; {count} planes were interpolated at {s:.3} mm from the true \
                 slice positions"
            ));
            // Along the line first → last, `s` mm of normal distance per plane.
            let step = std::array::from_fn(|a| (last_ipp[a] - first_ipp[a]) / (dn - d0) * s);
            (step, s, planes)
        }
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

    let first = &headers[kept[0].1];
    let grid = Grid {
        dims: [first.cols, first.rows, planes.len()],
        affine,
    };
    let report = BuildReport {
        slices: planes.len(),
        duplicates_removed,
        spacing: [col_spacing, row_spacing, slice_spacing],
        warnings,
        suspect_incomplete,
        modality: first.modality.clone(),
        body_part: first.body_part.clone(),
        series_description: first.series_description.clone(),
    };
    Ok(VolumePlan {
        grid,
        planes,
        report,
    })
}

/// Fills the planes of `out` (shape of the plan's grid) from decoded images;
/// `image(i)` returns the pixels of image `i`, each of one plane's length.
pub fn fill_planes<'a>(
    plan: &VolumePlan,
    image: impl Fn(usize) -> &'a [f32] + Sync,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let plane = plan.grid.dims[0] * plan.grid.dims[1];
    out.par_chunks_mut(plane)
        .zip(plan.planes.par_iter())
        .for_each(|(dst, src)| match *src {
            PlaneSource::Image(i) => dst.copy_from_slice(image(i)),
            PlaneSource::Blend {
                below,
                above,
                weight,
            } => {
                for ((d, a), b) in dst.iter_mut().zip(image(below)).zip(image(above)) {
                    *d = a + weight * (b - a);
                }
            }
        });
}

/// Orders, checks and stacks decoded images into a volume (see [`plan_volume`]).
pub fn build_volume(
    slices: Vec<DecodedSlice>,
    opts: &GeometryOptions,
) -> Result<BuiltVolume, GeometryError> {
    let headers: Vec<SliceHeader> = slices.iter().map(|s| s.header.clone()).collect();
    let plan = plan_volume(&headers, opts)?;
    for (index, s) in slices.iter().enumerate() {
        let expected = s.header.rows * s.header.cols;
        if s.pixels.len() != expected {
            return Err(GeometryError::PixelCount {
                index,
                found: s.pixels.len(),
                expected,
            });
        }
    }
    let (nz, ny, nx) = plan.grid.shape();
    let mut data = vec![0f32; nz * ny * nx];
    fill_planes(&plan, |i| &slices[i].pixels, &mut data);
    let data = Array3::from_shape_vec((nz, ny, nx), data).expect("length from the grid");
    let volume = Volume::new(plan.grid, data).expect("shape from the grid");
    Ok(BuiltVolume {
        volume,
        report: plan.report,
    })
}

/// Every image must have a position, orientation, spacing and the same matrix,
/// orientation and pixel spacing as the others.
fn check_attributes(headers: &[SliceHeader]) -> Result<(), GeometryError> {
    let total = headers.len();
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
    let count = |f: fn(&SliceHeader) -> bool| headers.iter().filter(|h| f(h)).count();
    missing(
        "Image Position (Patient)",
        count(|h| h.image_position.is_none()),
    )?;
    missing(
        "Image Orientation (Patient)",
        count(|h| h.image_orientation.is_none()),
    )?;
    missing("Pixel Spacing", count(|h| h.pixel_spacing.is_none()))?;
    consistent(
        "matrix sizes",
        headers,
        |h| [h.cols as f64, h.rows as f64],
        0.0,
        |v| format!("{}x{}", v[0], v[1]),
    )?;
    consistent(
        "orientations",
        headers,
        |h| h.image_orientation.expect("checked above"),
        1e-4,
        |v| format!("{}", Fmt(v)),
    )?;
    consistent(
        "pixel spacings",
        headers,
        |h| h.pixel_spacing.expect("checked above"),
        1e-4,
        |v| format!("{}", Fmt(v)),
    )
}

/// What is uneven about a stack's gaps.
struct UnevenDescription {
    /// "N slices missing: …" when some gaps are about a multiple of the spacing.
    missing: Option<String>,
    /// Gaps off by more than the tolerance but shorter than two spacings.
    uneven: usize,
    median: f64,
    range: (f64, f64),
    gaps: usize,
    tolerance: f64,
}

impl UnevenDescription {
    fn summary(&self) -> String {
        let mut s = format!(
            "slice spacing is uneven: regular spacing {:.3} mm, gaps from {:.3} to {:.3} mm",
            self.median, self.range.0, self.range.1
        );
        if let Some(m) = &self.missing {
            let _ = write!(s, "; {m}");
        }
        if self.uneven > 0 {
            let _ = write!(
                s,
                "; {} of {} gaps off by more than {:.0} %",
                self.uneven,
                self.gaps,
                self.tolerance * 100.0
            );
        }
        s
    }
}

fn describe_uneven(
    kept: &[(f64, usize)],
    gaps: &[f64],
    median: f64,
    tolerance: f64,
) -> UnevenDescription {
    let mut missing = 0usize;
    let mut holes = Vec::new();
    let mut uneven = 0;
    for (i, g) in gaps.iter().enumerate() {
        let ratio = g / median;
        if ratio >= 1.5 {
            let m = ratio.round() as usize - 1;
            missing += m;
            if holes.len() < 3 {
                holes.push(format!(
                    "{m} between {:.3} and {:.3} mm",
                    kept[i].0,
                    kept[i + 1].0
                ));
            }
        } else if (g - median).abs() > tolerance * median {
            uneven += 1;
        }
    }
    let missing = (missing > 0).then(|| {
        let more = if holes.len() < gaps.iter().filter(|g| **g / median >= 1.5).count() {
            ", …"
        } else {
            ""
        };
        format!(
            "about {missing} slice(s) missing ({}{more} along the normal)",
            holes.join(", ")
        )
    });
    let range = gaps
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), g| {
            (lo.min(*g), hi.max(*g))
        });
    UnevenDescription {
        missing,
        uneven,
        median,
        range,
        gaps: gaps.len(),
        tolerance,
    }
}

/// Fails when a per-image value takes more than one value (within `tol`).
fn consistent<const N: usize>(
    what: &'static str,
    headers: &[SliceHeader],
    value: impl Fn(&SliceHeader) -> [f64; N],
    tol: f64,
    show: impl Fn(&[f64; N]) -> String,
) -> Result<(), GeometryError> {
    let groups = group_by(headers.iter(), value, tol);
    if groups.len() <= 1 {
        return Ok(());
    }
    let mut text = String::new();
    for (i, (v, count)) in groups.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        let unit = if *count == 1 { "image" } else { "images" };
        let _ = write!(text, "{} ({count} {unit})", show(v));
    }
    Err(GeometryError::Inconsistent {
        what,
        count: groups.len(),
        groups: text,
    })
}

/// Distinct values (within `tol`) and their counts, most frequent first.
pub(crate) fn group_by<'a, const N: usize>(
    items: impl Iterator<Item = &'a SliceHeader>,
    value: impl Fn(&SliceHeader) -> [f64; N],
    tol: f64,
) -> Vec<([f64; N], usize)> {
    let mut groups: Vec<([f64; N], usize)> = Vec::new();
    for h in items {
        let v = value(h);
        match groups
            .iter_mut()
            .find(|(g, _)| g.iter().zip(&v).all(|(a, b)| (a - b).abs() <= tol))
        {
            Some((_, count)) => *count += 1,
            None => groups.push((v, 1)),
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    groups
}

/// Unit row and column directions from IOP, re-orthogonalised against rounding.
pub(crate) fn orientation_axes(iop: [f64; 6]) -> Result<([f64; 3], [f64; 3]), GeometryError> {
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
pub(crate) struct Fmt<'a, const N: usize>(pub &'a [f64; N]);

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
    use crate::header::SliceHeader;

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
    fn missing_slice_is_interpolated_and_flagged_or_refused() {
        let zs = [0.0, 1.0, 2.0, 3.0, 5.0, 6.0];
        let built = build_volume(stack(&zs), &Default::default()).unwrap();
        let r = &built.report;
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("uneven"), "{:?}", r.warnings);
        assert!(
            r.warnings[0].contains("7 planes were interpolated"),
            "{:?}",
            r.warnings
        );
        let why = r.suspect_incomplete.as_deref().unwrap();
        assert!(
            why.contains("about 1 slice(s) missing (1 between 3.000 and 5.000 mm"),
            "{why}"
        );
        let v = &built.volume;
        assert_eq!(v.grid.dims, [4, 3, 7]);
        assert_eq!(v.grid.world([0.0, 0.0, 6.0])[2], 6.0);
        // Plane 4 (z = 4) is halfway between the images at 3 and 5.
        assert_eq!(v.data[[4, 1, 2]], 4000.0 + 6.0);
        assert_eq!(v.data[[5, 0, 0]], 5000.0);
        let opts = GeometryOptions {
            uneven_spacing: UnevenSpacing::Reject,
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
            "images have 2 different matrix sizes: 4x3 (4 images), 2x2 (1 image)"
        );
    }

    #[test]
    fn rejects_mixed_orientation_and_spacing() {
        let mut s = stack(&[0.0, 1.0, 2.0]);
        s[1].header.image_orientation = Some([1.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
        let err = build_volume(s, &Default::default()).unwrap_err();
        assert!(
            err.to_string().contains("2 different orientations"),
            "{err}"
        );

        let mut s = stack(&[0.0, 1.0, 2.0]);
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
                needed: 3
            }
        );
        // Three copies of one slice are one slice.
        let mut s = stack(&[0.0]);
        s.push(s[0].clone());
        s.push(s[0].clone());
        assert_eq!(
            build_volume(s, &Default::default()).unwrap_err().code(),
            "too_few_slices"
        );
    }

    #[test]
    fn single_slice_when_allowed() {
        let mut s = stack(&[5.0]);
        s[0].header.slice_thickness = Some(3.0);
        let opts = GeometryOptions {
            min_slices: 1,
            ..Default::default()
        };
        let built = build_volume(s, &opts).unwrap();
        assert_eq!(built.volume.grid.dims, [4, 3, 1]);
        assert_eq!(built.report.spacing[2], 3.0);
        assert_eq!(built.volume.grid.spacing()[2], 3.0);
    }

    #[test]
    fn bad_orientation() {
        let mut s = stack(&[0.0, 1.0, 2.0]);
        for x in &mut s {
            x.header.image_orientation = Some([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        }
        assert!(matches!(
            build_volume(s, &Default::default()),
            Err(GeometryError::BadOrientation(_))
        ));
    }
    #[test]
    fn time_series_is_not_one_volume() {
        // Three images (frames of one object) at each of four positions.
        let mut s = Vec::new();
        for frame in 0..3 {
            for mut x in stack(&[0.0, 1.0, 2.0, 3.0]) {
                x.header.sop_instance_uid = "2.25.7".into();
                x.header.frame = frame * 4 + (x.header.image_position.unwrap()[2] as u32);
                s.push(x);
            }
        }
        let err = build_volume(s, &Default::default()).unwrap_err();
        assert_eq!(
            err,
            GeometryError::MultipleVolumes {
                volumes: 3,
                positions: 4
            }
        );
        assert_eq!(err.code(), "multiple_volumes");
        assert!(err.to_string().contains("time series"), "{err}");
    }

    #[test]
    fn uneven_spacing_interpolates_on_true_positions() {
        // Gaps of 1.0 and 1.3 mm: beyond 10 %, no slice missing.
        let zs = [0.0, 1.0, 2.0, 3.3, 4.3, 5.3];
        let built = build_volume(stack(&zs), &Default::default()).unwrap();
        let r = &built.report;
        assert_eq!(r.suspect_incomplete, None);
        assert!(
            r.warnings[0].contains("1 of 5 gaps off by more than 10 %"),
            "{:?}",
            r.warnings
        );
        let v = &built.volume;
        assert_eq!(v.grid.dims[2], 6);
        // Plane 3 sits at z = 3.0, 1/1.3 of the way from 2.0 to 3.3.
        let want = 2000.0 + (1.0 / 1.3) * 1300.0;
        assert!(
            (v.data[[3, 0, 0]] - want as f32).abs() < 1e-2,
            "{}",
            v.data[[3, 0, 0]]
        );
        // The last plane is clamped to the last image (5.0 of 5.3 mm).
        assert!(
            (v.data[[5, 0, 0]] - 5000.0).abs() < 1e-2,
            "{}",
            v.data[[5, 0, 0]]
        );
    }

    #[test]
    fn gap_too_wide_is_refused() {
        let zs = [0.0, 1.0, 2.0, 9.0, 10.0];
        let err = build_volume(stack(&zs), &Default::default()).unwrap_err();
        assert_eq!(err.code(), "gap_too_large");
        assert!(
            err.to_string().contains("about 6 slice(s) missing"),
            "{err}"
        );
        let opts = GeometryOptions {
            max_gap_ratio: 8.0,
            ..Default::default()
        };
        let built = build_volume(stack(&zs), &opts).unwrap();
        assert_eq!(built.volume.grid.dims[2], 11);
    }

    #[test]
    fn tilted_stack_with_a_gap_keeps_shear() {
        let t = 20f64.to_radians();
        let iop = [1.0, 0.0, 0.0, 0.0, t.cos(), -t.sin()];
        let slices: Vec<_> = [0, 1, 2, 4, 5]
            .iter()
            .map(|k| slice(&format!("{k}"), [0.0, 0.0, 2.0 * *k as f64], iop, 2, 2))
            .collect();
        let built = build_volume(slices, &Default::default()).unwrap();
        assert!(built.report.suspect_incomplete.is_some());
        let g = &built.volume.grid;
        assert_eq!(g.dims[2], 6);
        for k in 0..6 {
            let w = g.world([0.0, 0.0, k as f64]);
            assert!(
                (w[2] - 2.0 * k as f64).abs() < 1e-9 && w[1].abs() < 1e-12,
                "{w:?}"
            );
        }
    }
}
