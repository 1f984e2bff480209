//! A 3D image on a physical grid: the value type every stage after decoding passes on.
//!
//! Conventions, shared with the NIfTI files radflow writes and with the models:
//! - voxel index `(i, j, k)` = (column, row, slice) = NIfTI `(x, y, z)`;
//! - `Grid::affine` maps `(i, j, k, 1)` to RAS+ millimetres (the NIfTI/nibabel
//!   convention; DICOM's LPS is converted on the way in);
//! - `Volume::data` is an `ndarray::Array3` of shape `(nz, ny, nx)` in C order, so `i`
//!   varies fastest in memory, exactly like NIfTI's data block and a model's `D, H, W`.

use ndarray::Array3;
use serde::{Deserialize, Serialize};

/// Voxel grid: dimensions and the voxel-to-world transform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    /// `[nx, ny, nz]`: columns, rows, slices (NIfTI `dim[1..=3]`).
    pub dims: [usize; 3],
    /// Row-major 4×4 matrix: `(i, j, k, 1)` → RAS+ mm.
    pub affine: [[f64; 4]; 4],
}

impl Grid {
    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the grid has no voxel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `ndarray` shape of data on this grid: `(nz, ny, nx)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.dims[2], self.dims[1], self.dims[0])
    }

    /// Voxel spacing in mm along i, j, k (the lengths of the affine's columns).
    pub fn spacing(&self) -> [f64; 3] {
        let a = &self.affine;
        std::array::from_fn(|c| (a[0][c].powi(2) + a[1][c].powi(2) + a[2][c].powi(2)).sqrt())
    }

    /// Volume of one voxel in mm³ (the absolute determinant of the linear part, which
    /// is also right for sheared grids such as a tilted gantry).
    pub fn voxel_volume_mm3(&self) -> f64 {
        let a = &self.affine;
        let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
        det.abs()
    }

    /// World position (RAS+ mm) of a voxel centre.
    pub fn world(&self, ijk: [f64; 3]) -> [f64; 3] {
        let a = &self.affine;
        std::array::from_fn(|r| a[r][0] * ijk[0] + a[r][1] * ijk[1] + a[r][2] * ijk[2] + a[r][3])
    }

    /// The inverse transform, RAS+ mm → continuous voxel index; `None` when the affine
    /// is singular (a zero spacing or collinear axes).
    pub fn inverse_affine(&self) -> Option<[[f64; 4]; 4]> {
        let a = &self.affine;
        // Inverse of the 3×3 linear part by cofactors, then the translation.
        let cof = |r0: usize, r1: usize, c0: usize, c1: usize| {
            a[r0][c0] * a[r1][c1] - a[r0][c1] * a[r1][c0]
        };
        let det = a[0][0] * cof(1, 2, 1, 2) - a[0][1] * cof(1, 2, 0, 2) + a[0][2] * cof(1, 2, 0, 1);
        if !det.is_finite() || det.abs() < 1e-12 {
            return None;
        }
        let m = [
            [cof(1, 2, 1, 2), -cof(0, 2, 1, 2), cof(0, 1, 1, 2)],
            [-cof(1, 2, 0, 2), cof(0, 2, 0, 2), -cof(0, 1, 0, 2)],
            [cof(1, 2, 0, 1), -cof(0, 2, 0, 1), cof(0, 1, 0, 1)],
        ];
        let mut inv = [[0.0; 4]; 4];
        for r in 0..3 {
            for c in 0..3 {
                inv[r][c] = m[r][c] / det;
            }
            inv[r][3] = -(0..3).map(|c| inv[r][c] * a[c][3]).sum::<f64>();
        }
        inv[3][3] = 1.0;
        Some(inv)
    }

    /// Continuous voxel index of a world position (RAS+ mm); `None` for a singular
    /// affine.
    pub fn voxel(&self, ras: [f64; 3]) -> Option<[f64; 3]> {
        let inv = self.inverse_affine()?;
        Some(std::array::from_fn(|r| {
            inv[r][0] * ras[0] + inv[r][1] * ras[1] + inv[r][2] * ras[2] + inv[r][3]
        }))
    }
}

/// Values on a grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    pub grid: Grid,
    /// Shape `(nz, ny, nx)`, see the module docs.
    pub data: Array3<T>,
}

impl<T> Volume<T> {
    /// Pairs data with its grid, checking that the shapes agree.
    pub fn new(grid: Grid, data: Array3<T>) -> Result<Self, ShapeMismatch> {
        if data.dim() != grid.shape() {
            return Err(ShapeMismatch {
                grid: grid.shape(),
                data: data.dim(),
            });
        }
        Ok(Self { grid, data })
    }
}

/// Data and grid disagree on the shape.
#[derive(Debug, thiserror::Error)]
#[error("data shape {data:?} does not match grid shape {grid:?} (nz, ny, nx)")]
pub struct ShapeMismatch {
    pub grid: (usize, usize, usize),
    pub data: (usize, usize, usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Grid {
        Grid {
            dims: [4, 3, 2],
            affine: [
                [-0.5, 0.0, 0.0, 10.0],
                [0.0, -0.5, 0.0, 20.0],
                [0.0, 0.0, 2.0, -5.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    #[test]
    fn spacing_volume_and_world() {
        let g = grid();
        assert_eq!(g.spacing(), [0.5, 0.5, 2.0]);
        assert!((g.voxel_volume_mm3() - 0.5).abs() < 1e-12);
        assert_eq!(g.world([1.0, 2.0, 1.0]), [9.5, 19.0, -3.0]);
        assert_eq!(g.shape(), (2, 3, 4));
        assert_eq!(g.len(), 24);
    }

    #[test]
    fn inverse_round_trips() {
        let mut g = grid();
        // Add a rotation and shear so that every cofactor matters.
        g.affine[0][1] = 0.2;
        g.affine[1][2] = -0.3;
        g.affine[2][0] = 0.1;
        let inv = g.inverse_affine().unwrap();
        for ijk in [[0.0, 0.0, 0.0], [1.5, -2.0, 3.25], [7.0, 2.0, 1.0]] {
            let back = g.voxel(g.world(ijk)).unwrap();
            for a in 0..3 {
                assert!((back[a] - ijk[a]).abs() < 1e-12, "{back:?} vs {ijk:?}");
            }
        }
        assert_eq!(inv[3], [0.0, 0.0, 0.0, 1.0]);
        g.affine[2][2] = 0.0;
        g.affine[2][0] = 0.0;
        g.affine[1][2] = 0.0;
        assert!(g.inverse_affine().is_none());
    }

    #[test]
    fn new_checks_shape() {
        assert!(Volume::new(grid(), Array3::<f32>::zeros((2, 3, 4))).is_ok());
        assert!(Volume::new(grid(), Array3::<f32>::zeros((4, 3, 2))).is_err());
    }
}
