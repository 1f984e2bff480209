//! Entry points for the fuzz targets (`fuzz/`) and for the corpus replay that CI runs
//! (`tests/fuzz_corpus.rs`).

use ndarray::Array3;

use crate::{Grid, Volume, gunzip, nifti};

/// NIfTI readers (whole-stream and block-parallel gunzip) on arbitrary bytes: an
/// error, never a panic or an allocation from a claimed size.
pub fn nifti_reader(data: &[u8]) {
    let _ = nifti::read_nifti::<f32>(data);
    let _ = nifti::read_nifti::<u8>(data);
    let _ = gunzip::read_volume::<f32>(data);
}

/// The NIfTI writer on arbitrary input: dims of 1 to 8 per axis, an affine of any
/// 16 floats (NaN, infinite, singular), voxel values of any bits. What it writes
/// must read back to the same voxels, plain and gzipped.
pub fn nifti_writer(data: &[u8]) {
    let [x, y, z, rest @ ..] = data else {
        return;
    };
    let dims = [x % 8 + 1, y % 8 + 1, z % 8 + 1].map(usize::from);
    let mut floats = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let mut affine = [[0.0f64; 4]; 4];
    for row in affine.iter_mut().take(3) {
        for v in row.iter_mut() {
            *v = f64::from(floats.next().unwrap_or(1.0));
        }
    }
    affine[3] = [0.0, 0.0, 0.0, 1.0];
    let n = dims[0] * dims[1] * dims[2];
    let values: Vec<f32> = floats.chain(std::iter::repeat(0.0)).take(n).collect();
    let grid = Grid { dims, affine };
    let Ok(data) = Array3::from_shape_vec(grid.shape(), values) else {
        return;
    };
    let Ok(volume) = Volume::new(grid, data) else {
        return;
    };
    for bytes in [
        nifti::write_nifti(&volume, "fuzz"),
        nifti::write_nifti_gz(&volume, "fuzz"),
    ] {
        let back = nifti::read_nifti::<f32>(&bytes).expect("what was written reads back");
        assert_eq!(back.grid.dims, volume.grid.dims);
        let same = back
            .data
            .iter()
            .zip(volume.data.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same, "voxels changed through the writer");
    }
}
