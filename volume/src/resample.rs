//! Resampling a volume onto another grid, in world space.
//!
//! Models are trained at a fixed voxel spacing, and their label maps must be brought
//! back onto the source grid; both are the same operation: for every target voxel, find
//! the world position of its centre, map it into the source's continuous voxel index
//! through the inverse source affine, and interpolate there. Because the composed
//! mapping is affine, the source index moves by a constant vector along a target row,
//! so the inner loop is additions and loads only, with no allocation per voxel.
//! Coordinates outside the source are clamped to `[0, n - 1]` per axis, i.e. the edge
//! values extend outward. Target slices are computed in parallel with rayon.
//!
//! When each target axis runs along one source axis (a change of spacing, a flip or
//! an axis permutation, which is what model presets do), the source index along each
//! axis depends on one target index only; the neighbours and weights are then
//! tabulated per axis once, and the inner loop is eight loads and seven
//! interpolations per voxel.
//!
//! [`LinearSampler`] gives the same trilinear values one target row at a time, for
//! callers that reduce several volumes of one grid voxel by voxel (a model's class
//! probabilities to a label) without holding each of them resampled.

use ndarray::Array3;
use rayon::prelude::*;

use crate::{Grid, Volume};

/// A grid with the same orientation and first-voxel centre as `src` and the given
/// voxel `spacing` (mm, `[x, y, z]`); each axis keeps its extent:
/// `dims = max(1, round(n * old / new))`.
pub fn grid_with_spacing(src: &Grid, spacing: [f64; 3]) -> Grid {
    let old = src.spacing();
    let mut affine = src.affine;
    let mut dims = [1usize; 3];
    for a in 0..3 {
        let ratio = old[a] / spacing[a];
        dims[a] = ((src.dims[a] as f64 * ratio).round() as usize).max(1);
        for row in affine.iter_mut().take(3) {
            row[a] /= ratio;
        }
    }
    Grid { dims, affine }
}

/// Trilinear resampling of `src` onto `target` (see the module docs).
///
/// # Panics
/// If `src` has no voxel or a singular affine (neither can come out of the
/// preprocessor's geometry planning).
pub fn resample_linear(src: &Volume<f32>, target: &Grid) -> Volume<f32> {
    resample_linear_with(src, target, None)
}

/// Trilinear resampling where target voxels whose centre falls outside the source
/// (beyond half a voxel past its edge voxels) take `outside`; with `None` the edge
/// values extend outward.
///
/// # Panics
/// As [`resample_linear`].
pub fn resample_linear_with(src: &Volume<f32>, target: &Grid, outside: Option<f32>) -> Volume<f32> {
    if let Some(tables) = separable(src, target) {
        return separable_linear(src, target, &tables, outside);
    }
    general_linear(src, target, outside)
}

/// Trilinear resampling for any affine mapping (oblique, sheared).
fn general_linear(src: &Volume<f32>, target: &Grid, outside: Option<f32>) -> Volume<f32> {
    resample(src, target, outside, |data, dims, p| {
        let [nx, ny, _] = dims;
        let (x0, x1, fx) = axis(p[0], dims[0]);
        let (y0, y1, fy) = axis(p[1], dims[1]);
        let (z0, z1, fz) = axis(p[2], dims[2]);
        let at = |x: usize, y: usize, z: usize| data[(z * ny + y) * nx + x];
        // `a + f * (b - a)` returns `a` exactly when `f == 0`, so a resample onto the
        // same grid reproduces the input bit for bit.
        let lerp = |a: f32, b: f32, f: f32| a + f * (b - a);
        let c00 = lerp(at(x0, y0, z0), at(x1, y0, z0), fx);
        let c10 = lerp(at(x0, y1, z0), at(x1, y1, z0), fx);
        let c01 = lerp(at(x0, y0, z1), at(x1, y0, z1), fx);
        let c11 = lerp(at(x0, y1, z1), at(x1, y1, z1), fx);
        lerp(lerp(c00, c10, fy), lerp(c01, c11, fy), fz)
    })
}

/// Nearest-neighbour resampling of `src` onto `target`, for label maps and masks.
///
/// # Panics
/// As [`resample_linear`].
pub fn resample_nearest<T: Copy + Send + Sync>(src: &Volume<T>, target: &Grid) -> Volume<T> {
    resample_nearest_with(src, target, None)
}

/// Nearest-neighbour resampling with a value for voxels outside the source, as
/// [`resample_linear_with`].
///
/// # Panics
/// As [`resample_linear`].
pub fn resample_nearest_with<T: Copy + Send + Sync>(
    src: &Volume<T>,
    target: &Grid,
    outside: Option<T>,
) -> Volume<T> {
    if let Some(tables) = separable(src, target) {
        return separable_nearest(src, target, &tables, outside);
    }
    resample(src, target, outside, |data, dims, p| {
        let [nx, ny, _] = dims;
        let x = nearest(p[0], dims[0]);
        let y = nearest(p[1], dims[1]);
        let z = nearest(p[2], dims[2]);
        data[(z * ny + y) * nx + x]
    })
}

/// Index below, index above and fraction for one axis, clamped to the volume.
#[inline(always)]
fn axis(c: f64, n: usize) -> (usize, usize, f32) {
    let c = snap(c).clamp(0.0, (n - 1) as f64);
    let i0 = c as usize; // c >= 0, so truncation is floor
    let i1 = (i0 + 1).min(n - 1);
    (i0, i1, (c - i0 as f64) as f32)
}

#[inline(always)]
fn nearest(c: f64, n: usize) -> usize {
    (snap(c).round().clamp(0.0, (n - 1) as f64)) as usize
}

/// Rounds coordinates within 1e-6 voxel of an integer to it, so that mappings which
/// are exact in theory but carry rounding error (inverse × forward affine) land on
/// voxel centres.
#[inline(always)]
fn snap(c: f64) -> f64 {
    let r = c.round();
    if (c - r).abs() < 1e-6 { r } else { c }
}

/// Target index → source continuous index: rows are source axes, columns the target
/// axes and the translation.
fn mapping(src: &Grid, target: &Grid) -> [[f64; 4]; 3] {
    let inv = src.inverse_affine().expect("source affine is invertible");
    let t = &target.affine;
    std::array::from_fn(|r| std::array::from_fn(|c| (0..4).map(|k| inv[r][k] * t[k][c]).sum()))
}

/// Neighbours along one target axis, as element offsets into the source data.
struct AxisTable {
    lo: Vec<usize>,
    hi: Vec<usize>,
    frac: Vec<f32>,
    near: Vec<usize>,
    inside: Vec<bool>,
}

/// Per-axis tables when every target axis runs along one source axis.
fn separable<T>(src: &Volume<T>, target: &Grid) -> Option<[AxisTable; 3]> {
    assert!(!src.grid.is_empty(), "source volume has no voxel");
    separable_grids(&src.grid, target)
}

/// [`separable`] from the source grid alone.
fn separable_grids(src: &Grid, target: &Grid) -> Option<[AxisTable; 3]> {
    let m = mapping(src, target);
    let dims = src.dims;
    let stride = [1, dims[0], dims[0] * dims[1]];
    let mut axis_of = [0usize; 3];
    for (t, a) in axis_of.iter_mut().enumerate() {
        let col: [f64; 3] = std::array::from_fn(|r| m[r][t]);
        let largest = col.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let big: Vec<usize> = (0..3)
            .filter(|r| col[*r].abs() > 1e-9 * largest.max(1.0))
            .collect();
        if big.len() != 1 {
            return None;
        }
        *a = big[0];
    }
    if axis_of[0] == axis_of[1] || axis_of[1] == axis_of[2] || axis_of[0] == axis_of[2] {
        return None;
    }
    Some(std::array::from_fn(|t| {
        let a = axis_of[t];
        let n = dims[a];
        let mut table = AxisTable {
            lo: Vec::with_capacity(target.dims[t]),
            hi: Vec::with_capacity(target.dims[t]),
            frac: Vec::with_capacity(target.dims[t]),
            near: Vec::with_capacity(target.dims[t]),
            inside: Vec::with_capacity(target.dims[t]),
        };
        for i in 0..target.dims[t] {
            let c = m[a][3] + i as f64 * m[a][t];
            let (i0, i1, f) = axis(c, n);
            table.lo.push(i0 * stride[a]);
            table.hi.push(i1 * stride[a]);
            table.frac.push(f);
            table.near.push(nearest(c, n) * stride[a]);
            table
                .inside
                .push(c >= -0.5 - 1e-6 && c <= n as f64 - 0.5 + 1e-6);
        }
        table
    }))
}

/// Trilinear sampling of data on one grid at the voxel centres of another, one target
/// row at a time: exactly the values of [`resample_linear`] (edge values extend
/// outward), for callers that combine several volumes of the same grid voxel by voxel
/// and must not hold each resampled volume whole (the per-class probabilities of a
/// model, reduced to a label per voxel as they are sampled).
pub struct LinearSampler {
    src_dims: [usize; 3],
    target_dims: [usize; 3],
    how: Sampling,
}

enum Sampling {
    /// Every target axis runs along one source axis: per-axis tables.
    Separable(Box<[AxisTable; 3]>),
    /// Any affine mapping: target index → source continuous index.
    General([[f64; 4]; 3]),
}

impl LinearSampler {
    /// A sampler of data on `src` at the voxels of `target`.
    ///
    /// # Panics
    /// If `src` has no voxel or a singular affine.
    pub fn new(src: &Grid, target: &Grid) -> Self {
        assert!(!src.is_empty(), "source grid has no voxel");
        let how = match separable_grids(src, target) {
            Some(tables) => Sampling::Separable(Box::new(tables)),
            None => Sampling::General(mapping(src, target)),
        };
        Self {
            src_dims: src.dims,
            target_dims: target.dims,
            how,
        }
    }

    /// Samples `data` (the source grid's voxels in standard layout, x fastest) along
    /// row `j` of target plane `k` into `out` (one value per target column).
    ///
    /// # Panics
    /// If `data` does not hold the source grid's voxels, `out` is not one target row
    /// long, or `(j, k)` lies outside the target grid.
    pub fn row(&self, data: &[f32], j: usize, k: usize, out: &mut [f32]) {
        let [nx, ny, nz] = self.src_dims;
        let [tx, ty, tz] = self.target_dims;
        assert_eq!(data.len(), nx * ny * nz, "data is not the source grid's");
        assert_eq!(out.len(), tx, "out is not one target row");
        assert!(
            j < ty && k < tz,
            "row ({j}, {k}) is outside the target grid"
        );
        let lerp = |a: f32, b: f32, f: f32| a + f * (b - a);
        match &self.how {
            Sampling::Separable(t) => {
                let (c0, c1, fz) = (t[2].lo[k], t[2].hi[k], t[2].frac[k]);
                let (b0, b1, fy) = (t[1].lo[j], t[1].hi[j], t[1].frac[j]);
                let (p00, p10, p01, p11) = (b0 + c0, b1 + c0, b0 + c1, b1 + c1);
                for (i, v) in out.iter_mut().enumerate() {
                    let (a0, a1, fx) = (t[0].lo[i], t[0].hi[i], t[0].frac[i]);
                    let x00 = lerp(data[a0 + p00], data[a1 + p00], fx);
                    let x10 = lerp(data[a0 + p10], data[a1 + p10], fx);
                    let x01 = lerp(data[a0 + p01], data[a1 + p01], fx);
                    let x11 = lerp(data[a0 + p11], data[a1 + p11], fx);
                    *v = lerp(lerp(x00, x10, fy), lerp(x01, x11, fy), fz);
                }
            }
            Sampling::General(m) => {
                let col = |c: usize| [m[0][c], m[1][c], m[2][c]];
                let (di, dj, dk, origin) = (col(0), col(1), col(2), col(3));
                let base: [f64; 3] =
                    std::array::from_fn(|a| origin[a] + j as f64 * dj[a] + k as f64 * dk[a]);
                let at = |x: usize, y: usize, z: usize| data[(z * ny + y) * nx + x];
                for (i, v) in out.iter_mut().enumerate() {
                    let fi = i as f64;
                    let p = [
                        base[0] + fi * di[0],
                        base[1] + fi * di[1],
                        base[2] + fi * di[2],
                    ];
                    let (x0, x1, fx) = axis(p[0], nx);
                    let (y0, y1, fy) = axis(p[1], ny);
                    let (z0, z1, fz) = axis(p[2], nz);
                    let c00 = lerp(at(x0, y0, z0), at(x1, y0, z0), fx);
                    let c10 = lerp(at(x0, y1, z0), at(x1, y1, z0), fx);
                    let c01 = lerp(at(x0, y0, z1), at(x1, y0, z1), fx);
                    let c11 = lerp(at(x0, y1, z1), at(x1, y1, z1), fx);
                    *v = lerp(lerp(c00, c10, fy), lerp(c01, c11, fy), fz);
                }
            }
        }
    }
}

fn separable_linear(
    src: &Volume<f32>,
    target: &Grid,
    t: &[AxisTable; 3],
    outside: Option<f32>,
) -> Volume<f32> {
    let data = src.data.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let [tx, ty, tz] = target.dims;
    let lerp = |a: f32, b: f32, f: f32| a + f * (b - a);
    let mut out = vec![0f32; target.len()];
    if !out.is_empty() {
        out.par_chunks_mut(tx * ty)
            .enumerate()
            .for_each(|(k, plane)| {
                let (c0, c1, fz) = (t[2].lo[k], t[2].hi[k], t[2].frac[k]);
                for (j, row) in plane.chunks_mut(tx).enumerate() {
                    let (b0, b1, fy) = (t[1].lo[j], t[1].hi[j], t[1].frac[j]);
                    let (p00, p10, p01, p11) = (b0 + c0, b1 + c0, b0 + c1, b1 + c1);
                    let edge_inside = t[2].inside[k] && t[1].inside[j];
                    for (i, v) in row.iter_mut().enumerate() {
                        if let Some(value) = outside
                            && !(edge_inside && t[0].inside[i])
                        {
                            *v = value;
                            continue;
                        }
                        let (a0, a1, fx) = (t[0].lo[i], t[0].hi[i], t[0].frac[i]);
                        let x00 = lerp(data[a0 + p00], data[a1 + p00], fx);
                        let x10 = lerp(data[a0 + p10], data[a1 + p10], fx);
                        let x01 = lerp(data[a0 + p01], data[a1 + p01], fx);
                        let x11 = lerp(data[a0 + p11], data[a1 + p11], fx);
                        *v = lerp(lerp(x00, x10, fy), lerp(x01, x11, fy), fz);
                    }
                }
            });
    }
    let data = Array3::from_shape_vec((tz, ty, tx), out).expect("length is the grid's");
    Volume {
        grid: target.clone(),
        data,
    }
}

fn separable_nearest<T: Copy + Send + Sync>(
    src: &Volume<T>,
    target: &Grid,
    t: &[AxisTable; 3],
    outside: Option<T>,
) -> Volume<T> {
    let data = src.data.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let [tx, ty, tz] = target.dims;
    let fill = data[0];
    let mut out = vec![fill; target.len()];
    if !out.is_empty() {
        out.par_chunks_mut(tx * ty)
            .enumerate()
            .for_each(|(k, plane)| {
                for (j, row) in plane.chunks_mut(tx).enumerate() {
                    let base = t[2].near[k] + t[1].near[j];
                    let edge_inside = t[2].inside[k] && t[1].inside[j];
                    for (i, v) in row.iter_mut().enumerate() {
                        *v = match outside {
                            Some(value) if !(edge_inside && t[0].inside[i]) => value,
                            _ => data[base + t[0].near[i]],
                        };
                    }
                }
            });
    }
    let data = Array3::from_shape_vec((tz, ty, tx), out).expect("length is the grid's");
    Volume {
        grid: target.clone(),
        data,
    }
}

/// The shared loop: `sample(data, dims, index)` reads the source at a continuous index.
fn resample<T: Copy + Send + Sync>(
    src: &Volume<T>,
    target: &Grid,
    outside: Option<T>,
    sample: impl Fn(&[T], [usize; 3], [f64; 3]) -> T + Sync,
) -> Volume<T> {
    assert!(!src.grid.is_empty(), "source volume has no voxel");
    let fill = *src.data.iter().next().expect("source volume has no voxel");
    let m = mapping(&src.grid, target);
    let col = |c: usize| [m[0][c], m[1][c], m[2][c]];
    let (di, dj, dk, origin) = (col(0), col(1), col(2), col(3));

    let data = src.data.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let dims = src.grid.dims;
    let [tx, ty, tz] = target.dims;
    let inside =
        |p: [f64; 3]| (0..3).all(|a| p[a] >= -0.5 - 1e-6 && p[a] <= dims[a] as f64 - 0.5 + 1e-6);

    let mut out = vec![fill; target.len()];
    if !out.is_empty() {
        out.par_chunks_mut(tx * ty)
            .enumerate()
            .for_each(|(k, plane)| {
                for (j, row) in plane.chunks_mut(tx).enumerate() {
                    let base: [f64; 3] =
                        std::array::from_fn(|a| origin[a] + j as f64 * dj[a] + k as f64 * dk[a]);
                    for (i, v) in row.iter_mut().enumerate() {
                        let fi = i as f64;
                        let p = [
                            base[0] + fi * di[0],
                            base[1] + fi * di[1],
                            base[2] + fi * di[2],
                        ];
                        *v = match outside {
                            Some(value) if !inside(p) => value,
                            _ => sample(data, dims, p),
                        };
                    }
                }
            });
    }
    let data = Array3::from_shape_vec((tz, ty, tx), out).expect("length is the grid's");
    Volume {
        grid: target.clone(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(dims: [usize; 3], spacing: [f64; 3], origin: [f64; 3]) -> Grid {
        let mut affine = [[0.0; 4]; 4];
        for a in 0..3 {
            affine[a][a] = spacing[a];
            affine[a][3] = origin[a];
        }
        affine[3][3] = 1.0;
        Grid { dims, affine }
    }

    /// Values that are a linear function of the index, which trilinear interpolation
    /// reproduces exactly (up to rounding).
    fn ramp(g: Grid) -> Volume<f32> {
        let (nz, ny, nx) = g.shape();
        let data = Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
            i as f32 + 10.0 * j as f32 + 100.0 * k as f32
        });
        Volume::new(g, data).unwrap()
    }

    #[test]
    fn identity_reproduces_input_exactly() {
        // Oblique affine so that the inverse carries rounding error.
        let mut g = grid([7, 5, 4], [0.7, 0.9, 2.5], [-12.3, 44.1, 7.7]);
        g.affine[0][1] = 0.31;
        g.affine[2][0] = -0.17;
        let (nz, ny, nx) = g.shape();
        let data = Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
            ((i * 7919 + j * 104_729 + k * 1_299_709) % 1000) as f32 * 0.37 - 100.0
        });
        let src = Volume::new(g.clone(), data).unwrap();
        let out = resample_linear(&src, &g);
        assert_eq!(out.data, src.data);
        let near = resample_nearest(&src, &g);
        assert_eq!(near.data, src.data);
    }

    #[test]
    fn grid_with_spacing_keeps_origin_and_extent() {
        let mut g = grid([512, 512, 100], [0.7, 0.7, 1.25], [10.0, 20.0, 30.0]);
        // Flip x (as RAS grids from DICOM are) to check that signs are kept.
        g.affine[0][0] = -0.7;
        let t = grid_with_spacing(&g, [1.4, 1.4, 2.5]);
        assert_eq!(t.dims, [256, 256, 50]);
        assert_eq!(t.world([0.0, 0.0, 0.0]), g.world([0.0, 0.0, 0.0]));
        assert_eq!(t.affine[0][0], -1.4);
        assert_eq!(t.affine[1][1], 1.4);
        assert_eq!(t.affine[2][2], 2.5);
        let t = grid_with_spacing(&g, [1000.0, 0.35, 1.25]);
        assert_eq!(t.dims, [1, 1024, 100]);
    }

    #[test]
    fn scaling_interpolates_linear_ramp() {
        let src = ramp(grid([6, 5, 4], [2.0, 2.0, 3.0], [0.0, 0.0, 0.0]));
        let target = grid_with_spacing(&src.grid, [1.0, 1.0, 1.0]);
        assert_eq!(target.dims, [12, 10, 12]);
        let out = resample_linear(&src, &target);
        for ((k, j, i), v) in out.data.indexed_iter() {
            // Source continuous index, clamped at the far edge.
            let x = (i as f64 / 2.0).min(5.0);
            let y = (j as f64 / 2.0).min(4.0);
            let z = (k as f64 / 3.0).min(3.0);
            let want = x + 10.0 * y + 100.0 * z;
            assert!(
                (*v as f64 - want).abs() < 1e-3,
                "({i},{j},{k}): {v} vs {want}"
            );
        }
        // Downsampling by 2 picks every other source voxel exactly.
        let down = resample_linear(&src, &grid_with_spacing(&src.grid, [4.0, 4.0, 6.0]));
        assert_eq!(down.grid.dims, [3, 3, 2]);
        assert_eq!(down.data[[1, 2, 1]], src.data[[2, 4, 2]]);
    }

    #[test]
    fn flipped_and_rotated_targets() {
        let src = ramp(grid([4, 3, 2], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]));
        // Target with x flipped: its voxel 0 is the source's last column.
        let mut flip = src.grid.clone();
        flip.affine[0][0] = -1.0;
        flip.affine[0][3] = 3.0;
        let out = resample_linear(&src, &flip);
        for ((k, j, i), v) in out.data.indexed_iter() {
            assert_eq!(*v, src.data[[k, j, 3 - i]]);
        }
        // Target rotated 90° in-plane: target i runs along source j, target j along
        // source -i.
        let mut rot = Grid {
            dims: [3, 4, 2],
            affine: [
                [0.0, -1.0, 0.0, 3.0],
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let out = resample_nearest(&src, &rot);
        for ((k, j, i), v) in out.data.indexed_iter() {
            assert_eq!(*v, src.data[[k, i, 3 - j]]);
        }
        // Half-voxel shift along the oblique axis gives the average of neighbours.
        rot.affine[0][3] = 2.5;
        let out = resample_linear(&src, &rot);
        assert!((out.data[[0, 0, 0]] - 2.5).abs() < 1e-6);
    }

    #[test]
    fn per_axis_tables_agree_with_the_general_path() {
        let mut g = grid([9, 7, 5], [0.8, 1.1, 2.5], [3.0, -4.0, 10.0]);
        g.affine[0][0] = -0.8;
        let (nz, ny, nx) = g.shape();
        let src = Volume::new(
            g.clone(),
            Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
                ((i * 7919 + j * 104_729 + k * 1_299_709) % 1000) as f32 - 500.0
            }),
        )
        .unwrap();
        // Finer spacing, flipped and permuted axes, shifted past the edges.
        let target = Grid {
            dims: [12, 11, 13],
            affine: [
                [0.0, 0.0, 0.7, 4.0],
                [0.0, -0.6, 0.0, 3.0],
                [1.3, 0.0, 0.0, 8.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        assert!(separable(&src, &target).is_some());
        for outside in [None, Some(-1024.0)] {
            let fast = resample_linear_with(&src, &target, outside);
            let slow = general_linear(&src, &target, outside);
            for (a, b) in fast.data.iter().zip(slow.data.iter()) {
                assert!((a - b).abs() < 1e-3, "{a} vs {b}");
            }
        }
        // An oblique target takes the general path.
        let mut oblique = target.clone();
        oblique.affine[0][1] = 0.1;
        assert!(separable(&src, &oblique).is_none());
    }

    #[test]
    fn the_row_sampler_gives_the_resampled_values_bit_for_bit() {
        let mut g = grid([9, 7, 5], [0.8, 1.1, 2.5], [3.0, -4.0, 10.0]);
        g.affine[0][0] = -0.8;
        let (nz, ny, nx) = g.shape();
        let src = Volume::new(
            g.clone(),
            Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
                ((i * 7919 + j * 104_729 + k * 1_299_709) % 1000) as f32 / 7.0 - 50.0
            }),
        )
        .unwrap();
        let separable_target = Grid {
            dims: [12, 11, 13],
            affine: [
                [0.0, 0.0, 0.7, 4.0],
                [0.0, -0.6, 0.0, 3.0],
                [1.3, 0.0, 0.0, 8.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let mut oblique = separable_target.clone();
        oblique.affine[0][1] = 0.1;
        oblique.affine[2][2] = 0.2;
        let data = src.data.as_slice().unwrap();
        for target in [separable_target, oblique] {
            let sampler = LinearSampler::new(&g, &target);
            let whole = resample_linear(&src, &target);
            let [tx, ty, tz] = target.dims;
            let mut row = vec![0.0; tx];
            let mut differ = 0;
            for k in 0..tz {
                for j in 0..ty {
                    sampler.row(data, j, k, &mut row);
                    let want = whole.data.slice(ndarray::s![k, j, ..]);
                    differ += row
                        .iter()
                        .zip(want.iter())
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                }
            }
            assert_eq!(differ, 0, "{:?}", target.affine);
        }
    }

    #[test]
    fn outside_points_take_edge_values() {
        let src = ramp(grid([3, 3, 3], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]));
        let big = grid([7, 7, 7], [1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]);
        let out = resample_linear(&src, &big);
        assert_eq!(out.data[[0, 0, 0]], src.data[[0, 0, 0]]);
        assert_eq!(out.data[[6, 6, 6]], src.data[[2, 2, 2]]);
        assert_eq!(out.data[[3, 0, 6]], src.data[[1, 0, 2]]);
        let labels =
            Volume::new(src.grid.clone(), src.data.mapv(|v| (v as u32 % 7) as u8)).unwrap();
        let out = resample_nearest(&labels, &big);
        assert_eq!(out.data[[6, 0, 0]], labels.data[[2, 0, 0]]);
    }
}
