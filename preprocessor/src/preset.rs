//! From a native volume to a model's input, as the model's preset says.
//!
//! A model was trained on volumes with a given axis order, voxel spacing, size and
//! intensity scale. [`input_grid`] works out the grid of its input from the native
//! grid, in this order:
//! 1. **axis order**: the voxel axes are flipped and permuted so that each points
//!    closest to the preset's axis code (`RAS`, `LPS`…, nibabel's convention);
//! 2. **spacing**: each axis keeps its extent at the preset's spacing
//!    ([`resample::grid_with_spacing`]);
//! 3. **crop or pad**: the grid is cut or extended about its centre to the preset's
//!    shape, as MONAI's centre crop and symmetric pad do.
//!
//! [`prepare`] then fills that grid from the native volume in one resampling pass
//! (trilinear, or nearest for masks; voxels outside the scan take the preset's pad
//! value or repeat the edge) and normalizes the intensities in place.

use radflow_shared::models::{Interpolation, Preset};
use radflow_volume::{Grid, Volume, resample};

use crate::normalize;

/// The axis code each voxel axis of `grid` points closest to, e.g. `['L', 'P', 'S']`
/// for an axial DICOM series (as nibabel's `aff2axcodes`).
pub fn axis_codes(grid: &Grid) -> [char; 3] {
    let world = world_axes(grid);
    std::array::from_fn(|a| {
        let (w, positive) = world[a];
        let letters = [['L', 'R'], ['P', 'A'], ['I', 'S']];
        letters[w][usize::from(positive)]
    })
}

/// For each voxel axis, the world axis (0 = x, 1 = y, 2 = z of RAS) it is closest to
/// and whether it points along it. Each world axis is used once: the largest
/// remaining component of the normalised columns is assigned first.
fn world_axes(grid: &Grid) -> [(usize, bool); 3] {
    let a = &grid.affine;
    let spacing = grid.spacing();
    let mut m = [[0.0f64; 3]; 3]; // m[world][voxel]
    for (w, row) in m.iter_mut().enumerate() {
        for (v, x) in row.iter_mut().enumerate() {
            *x = if spacing[v] > 0.0 {
                a[w][v] / spacing[v]
            } else {
                0.0
            };
        }
    }
    let mut out = [(0usize, true); 3];
    let (mut used_w, mut used_v) = ([false; 3], [false; 3]);
    for _ in 0..3 {
        let mut best = (0, 0, -1.0);
        for (w, row) in m.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                if !used_w[w] && !used_v[v] && x.abs() > best.2 {
                    best = (w, v, x.abs());
                }
            }
        }
        let (w, v, _) = best;
        used_w[w] = true;
        used_v[v] = true;
        out[v] = (w, m[w][v] >= 0.0);
    }
    out
}

/// The same voxels with axes flipped and permuted to point closest to `codes` (three
/// letters, one of each pair L/R, A/P, S/I; see
/// [`radflow_shared::models::valid_axis_codes`]).
///
/// # Panics
/// If `codes` is not valid.
pub fn reorient(grid: &Grid, codes: &str) -> Grid {
    let world = world_axes(grid);
    let a = &grid.affine;
    let mut affine = [[0.0; 4]; 4];
    let mut dims = [0usize; 3];
    let mut origin = [a[0][3], a[1][3], a[2][3]];
    for (t, c) in codes.chars().enumerate() {
        let (w, positive) = match c {
            'R' => (0, true),
            'L' => (0, false),
            'A' => (1, true),
            'P' => (1, false),
            'S' => (2, true),
            'I' => (2, false),
            other => panic!("invalid axis code {other:?} in {codes:?}"),
        };
        let v = (0..3)
            .find(|v| world[*v].0 == w)
            .unwrap_or_else(|| panic!("axis codes {codes:?} repeat an axis"));
        let flip = world[v].1 != positive;
        dims[t] = grid.dims[v];
        for (r, o) in origin.iter_mut().enumerate() {
            let col = a[r][v];
            if flip {
                *o += (grid.dims[v] as f64 - 1.0) * col;
            }
            affine[r][t] = if flip { -col } else { col };
        }
    }
    for (r, o) in origin.iter().enumerate() {
        affine[r][3] = *o;
    }
    affine[3][3] = 1.0;
    Grid { dims, affine }
}

/// The grid cut or extended about its centre to `shape` voxels `[x, y, z]`: an axis
/// losing `d` voxels starts `d / 2` voxels in, one gaining `d` starts `d / 2` voxels
/// before (integer halves, as MONAI's centre crop and symmetric pad).
pub fn crop_or_pad(grid: &Grid, shape: [usize; 3]) -> Grid {
    let mut out = grid.clone();
    for (axis, (&n, &m)) in grid.dims.iter().zip(&shape).enumerate() {
        let offset = if n >= m {
            ((n - m) / 2) as f64
        } else {
            -(((m - n) / 2) as f64)
        };
        for r in 0..3 {
            out.affine[r][3] += offset * grid.affine[r][axis];
        }
        out.dims[axis] = m;
    }
    out
}

/// The grid of a model's input for a native grid (see the module docs).
pub fn input_grid(native: &Grid, preset: &Preset) -> Grid {
    let grid = match &preset.orientation {
        Some(codes) => reorient(native, codes),
        None => native.clone(),
    };
    let grid = resample::grid_with_spacing(&grid, preset.spacing);
    match preset.shape {
        Some(shape) => crop_or_pad(&grid, shape),
        None => grid,
    }
}

/// Resamples `native` onto the preset's input grid and normalizes its intensities.
pub fn prepare(native: &Volume<f32>, preset: &Preset) -> Volume<f32> {
    let target = input_grid(&native.grid, preset);
    let outside = preset.pad_value.map(|v| v as f32);
    let mut vol = match preset.interpolation {
        Interpolation::Linear => resample::resample_linear_with(native, &target, outside),
        Interpolation::Nearest => resample::resample_nearest_with(native, &target, outside),
    };
    normalize::normalize(&mut vol.data, &preset.normalization);
    vol
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;
    use radflow_shared::models::Normalization;

    /// An axial DICOM-like grid: i → L (RAS −x), j → P (−y), k → S.
    fn axial() -> Grid {
        Grid {
            dims: [4, 3, 2],
            affine: [
                [-0.5, 0.0, 0.0, 10.0],
                [0.0, -0.7, 0.0, 20.0],
                [0.0, 0.0, 2.0, -5.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    fn preset(orientation: Option<&str>, spacing: [f64; 3]) -> Preset {
        Preset {
            name: "p".into(),
            spacing,
            normalization: Normalization::None,
            orientation: orientation.map(str::to_owned),
            shape: None,
            pad_value: None,
            interpolation: Interpolation::Linear,
        }
    }

    #[test]
    fn codes_and_reorientation() {
        let g = axial();
        assert_eq!(axis_codes(&g), ['L', 'P', 'S']);
        let ras = reorient(&g, "RAS");
        assert_eq!(axis_codes(&ras), ['R', 'A', 'S']);
        assert_eq!(ras.dims, [4, 3, 2]);
        // Voxel (0, 0, 0) of the RAS grid is the source's (3, 2, 0).
        assert_eq!(ras.world([0.0, 0.0, 0.0]), g.world([3.0, 2.0, 0.0]));
        let pir = reorient(&g, "PIR");
        assert_eq!(axis_codes(&pir), ['P', 'I', 'R']);
        assert_eq!(pir.dims, [3, 2, 4]);
        assert_eq!(pir.world([1.0, 1.0, 2.0]), g.world([1.0, 1.0, 0.0]));
        // Same voxels: every target voxel centre is a source voxel centre.
        let src = Volume::new(
            g.clone(),
            Array3::from_shape_fn((2, 3, 4), |(k, j, i)| (i + 10 * j + 100 * k) as f32),
        )
        .unwrap();
        let out = prepare(&src, &preset(Some("PIR"), pir.spacing()));
        assert_eq!(out.grid, pir);
        for ((k, j, i), v) in out.data.indexed_iter() {
            let s = g.voxel(pir.world([i as f64, j as f64, k as f64])).unwrap();
            let s = s.map(|x| x.round() as usize);
            assert_eq!(*v, src.data[[s[2], s[1], s[0]]]);
        }
    }

    #[test]
    fn crop_and_pad_about_the_centre() {
        let g = axial();
        let c = crop_or_pad(&g, [2, 6, 2]);
        assert_eq!(c.dims, [2, 6, 2]);
        // x loses 2 voxels: starts 1 in; y gains 3: starts 1 before.
        assert_eq!(c.world([0.0, 0.0, 0.0]), g.world([1.0, -1.0, 0.0]));
        let src = Volume::new(g.clone(), Array3::from_elem((2, 3, 4), 7.0f32)).unwrap();
        let mut p = preset(None, g.spacing());
        p.shape = Some([2, 6, 2]);
        p.pad_value = Some(-1024.0);
        let out = prepare(&src, &p);
        assert_eq!(out.grid, c);
        assert_eq!(out.data[[0, 0, 0]], -1024.0);
        assert_eq!(out.data[[0, 1, 0]], 7.0);
        assert_eq!(out.data[[1, 3, 1]], 7.0);
        assert_eq!(out.data[[1, 5, 1]], -1024.0);
        p.pad_value = None;
        assert_eq!(prepare(&src, &p).data[[0, 0, 0]], 7.0);
    }

    #[test]
    fn nearest_keeps_labels() {
        let g = axial();
        let src = Volume::new(
            g.clone(),
            Array3::from_shape_fn((2, 3, 4), |(_, _, i)| (i % 2) as f32),
        )
        .unwrap();
        let mut p = preset(Some("RAS"), [0.2, 0.3, 0.5]);
        p.interpolation = Interpolation::Nearest;
        let out = prepare(&src, &p);
        assert!(out.data.iter().all(|v| *v == 0.0 || *v == 1.0));
        assert!(out.data.iter().any(|v| *v == 1.0));
        assert_eq!(axis_codes(&out.grid), ['R', 'A', 'S']);
    }
}
