//! Which stored instances are the planes of a label map's grid.
//!
//! The label map of a result lies on the source grid of `meta.json`: voxel
//! `(i, j, k)` = (column, row, slice), slices ascending along the normal, the affine in
//! RAS+. A series in the store may hold more than those planes (a localizer, a
//! repeated instance, a derived image), and the preprocessor may have filled a gap
//! with interpolated planes that no instance stands for. [`match_grid`] picks, for
//! every plane of the grid, the one instance that lies on it (same orientation and
//! matrix, its position within a fraction of the spacing of the plane's corner), so
//! that every SEG frame references the image it was computed on. A plane without an
//! instance is an error: a SEG frame would have nothing to point at.

use radflow_volume::Grid;

use crate::header::SourceInstance;
use crate::source::{SeriesError, SourceSeries};

/// Why the instances do not cover the grid.
#[derive(Debug, thiserror::Error)]
pub enum GridMismatch {
    #[error(
        "no stored instance lies on slice {plane} of the {planes}-slice grid (an interpolated plane, or an instance missing)"
    )]
    NoInstance { plane: usize, planes: usize },
    #[error("no stored instance has the grid's orientation and matrix ({rows}×{columns})")]
    NoStack { rows: usize, columns: usize },
    #[error(transparent)]
    Series(#[from] SeriesError),
}

/// The instances of `instances` that are the planes of `grid`, as a [`SourceSeries`]
/// in the grid's slice order.
pub fn match_grid(
    instances: Vec<SourceInstance>,
    grid: &Grid,
) -> Result<SourceSeries, GridMismatch> {
    let [nx, ny, nz] = grid.dims;
    let a = &grid.affine;
    // RAS+ → LPS: negate x and y.
    let lps = |v: [f64; 3]| [-v[0], -v[1], v[2]];
    let column = |c: usize| lps([a[0][c], a[1][c], a[2][c]]);
    let unit = |v: [f64; 3]| {
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        v.map(|x| x / n)
    };
    // The direction of i (along a row) and of j (down a column), as IOP gives them.
    let (row_dir, col_dir) = (unit(column(0)), unit(column(1)));
    let spacing = grid.spacing();
    let tolerance = 0.25 * spacing.iter().copied().fold(f64::INFINITY, f64::min);

    let stack: Vec<SourceInstance> = instances
        .into_iter()
        .filter(|i| {
            let o = i.orientation();
            usize::from(i.rows) == ny
                && usize::from(i.columns) == nx
                && (0..3).all(|d| (o[d] - row_dir[d]).abs() < 1e-3)
                && (0..3).all(|d| (o[3 + d] - col_dir[d]).abs() < 1e-3)
        })
        .collect();
    if stack.is_empty() {
        return Err(GridMismatch::NoStack {
            rows: ny,
            columns: nx,
        });
    }
    let mut chosen = Vec::with_capacity(nz);
    for k in 0..nz {
        let corner = lps(grid.world([0.0, 0.0, k as f64]));
        let nearest = stack
            .iter()
            .map(|i| {
                let p = i.position();
                let d = ((p[0] - corner[0]).powi(2)
                    + (p[1] - corner[1]).powi(2)
                    + (p[2] - corner[2]).powi(2))
                .sqrt();
                (d, i)
            })
            // Repeated instances at one position: the lowest SOP Instance UID, as the
            // series orders them.
            .min_by(|(da, a), (db, b)| {
                da.total_cmp(db)
                    .then_with(|| a.sop_instance_uid.cmp(&b.sop_instance_uid))
            })
            .filter(|(d, _)| *d <= tolerance);
        match nearest {
            Some((_, i)) => chosen.push(i.clone()),
            None => {
                return Err(GridMismatch::NoInstance {
                    plane: k,
                    planes: nz,
                });
            }
        }
    }
    let order: Vec<String> = chosen.iter().map(|i| i.sop_instance_uid.clone()).collect();
    let series = SourceSeries::new(chosen)?;
    let sorted = series.slices().iter().map(|i| &i.sop_instance_uid);
    if !sorted.eq(order.iter()) {
        return Err(SeriesError::Inconsistent("do not ascend along the grid's slice axis").into());
    }
    Ok(series)
}
