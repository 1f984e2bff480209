//! Intensity normalization presets, applied in place after resampling.
//!
//! A model expects its input on the intensity scale it was trained with; the registry
//! names that scale with a [`Normalization`] preset. CT values are absolute (HU) and are
//! windowed; MR values are arbitrary per scan and are standardised per volume (z-score
//! of the foreground, or percentile scaling).

use ndarray::Array3;
use radflow_shared::models::Normalization;
use rayon::prelude::*;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 16;

/// Applies `n` to every voxel of `data`.
///
/// - `CtWindow`: `clamp((v - (center - width/2)) / width, 0, 1)`; a width ≤ 0 becomes a
///   step at `center` (0 below, 1 at or above).
/// - `Zscore`: `(v - mean) / std` with mean and std over voxels `> threshold`; over all
///   voxels when none is above it; a zero std only subtracts the mean.
/// - `Percentile`: clip to the `lower`/`upper` percentiles (0–100, linear interpolation
///   between order statistics as numpy's default), then scale to `[0, 1]`; a constant
///   volume becomes 0.
/// - `None`: unchanged.
pub fn normalize(data: &mut Array3<f32>, n: &Normalization) {
    match *n {
        Normalization::None => {}
        Normalization::CtWindow { center, width } => {
            if width > 0.0 {
                let lo = (center - width / 2.0) as f32;
                let scale = (1.0 / width) as f32;
                map(data, move |v| ((v - lo) * scale).clamp(0.0, 1.0));
            } else {
                let c = center as f32;
                map(data, move |v| if v >= c { 1.0 } else { 0.0 });
            }
        }
        Normalization::Zscore { threshold } => {
            let t = threshold as f32;
            let (mut count, mut sum, mut sq) = moments(data, |v| v > t);
            if count == 0 {
                (count, sum, sq) = moments(data, |_| true);
            }
            if count == 0 {
                return;
            }
            let mean = sum / count as f64;
            let var = (sq / count as f64 - mean * mean).max(0.0);
            let std = var.sqrt();
            let inv = if std > 1e-12 { 1.0 / std } else { 1.0 };
            let (mean, inv) = (mean as f32, inv as f32);
            map(data, move |v| (v - mean) * inv);
        }
        Normalization::Percentile { lower, upper } => {
            let (lower, upper) = (lower.clamp(0.0, 100.0), upper.clamp(0.0, 100.0));
            let (lower, upper) = (lower.min(upper), lower.max(upper));
            let Some((lo, hi)) = percentiles(data, lower, upper) else {
                return;
            };
            if hi > lo {
                let scale = 1.0 / (hi - lo);
                map(data, move |v| ((v - lo) * scale).clamp(0.0, 1.0));
            } else {
                map(data, |_| 0.0);
            }
        }
    }
}

/// Applies `f` to every element, in parallel when the data is contiguous.
fn map(data: &mut Array3<f32>, f: impl Fn(f32) -> f32 + Sync + Send) {
    match data.as_slice_memory_order_mut() {
        Some(s) => s.par_chunks_mut(CHUNK).for_each(|c| {
            for v in c {
                *v = f(*v);
            }
        }),
        None => data.mapv_inplace(f),
    }
}

/// Count, sum and sum of squares (f64) of the elements selected by `keep`.
fn moments(data: &Array3<f32>, keep: impl Fn(f32) -> bool + Sync) -> (u64, f64, f64) {
    let acc = |(n, s, q): (u64, f64, f64), v: f32| {
        if keep(v) {
            let v = f64::from(v);
            (n + 1, s + v, q + v * v)
        } else {
            (n, s, q)
        }
    };
    let add = |a: (u64, f64, f64), b: (u64, f64, f64)| (a.0 + b.0, a.1 + b.1, a.2 + b.2);
    match data.as_slice_memory_order() {
        Some(s) => s
            .par_chunks(CHUNK)
            .map(|c| c.iter().copied().fold((0, 0.0, 0.0), acc))
            .reduce(|| (0, 0.0, 0.0), add),
        None => data.iter().copied().fold((0, 0.0, 0.0), acc),
    }
}

/// The two percentiles (0–100) of the data, or `None` when it is empty.
fn percentiles(data: &Array3<f32>, lower: f64, upper: f64) -> Option<(f32, f32)> {
    let mut values: Vec<f32> = data.iter().copied().filter(|v| !v.is_nan()).collect();
    if values.is_empty() {
        return None;
    }
    let lo = percentile(&mut values, lower);
    let hi = percentile(&mut values, upper);
    Some((lo, hi))
}

/// Percentile by selection (O(n)), interpolating linearly between order statistics.
fn percentile(values: &mut [f32], p: f64) -> f32 {
    let rank = p / 100.0 * (values.len() - 1) as f64;
    let below = rank.floor() as usize;
    let frac = rank - below as f64;
    let (_, &mut a, rest) = values.select_nth_unstable_by(below, f32::total_cmp);
    if frac == 0.0 || rest.is_empty() {
        return a;
    }
    let b = rest.iter().copied().fold(f32::INFINITY, f32::min);
    (f64::from(a) + frac * (f64::from(b) - f64::from(a))) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(v: &[f32]) -> Array3<f32> {
        Array3::from_shape_vec((1, 1, v.len()), v.to_vec()).unwrap()
    }

    fn close(a: &Array3<f32>, b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn ct_window() {
        let mut a = arr(&[-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]);
        normalize(
            &mut a,
            &Normalization::CtWindow {
                center: 0.0,
                width: 2000.0,
            },
        );
        close(&a, &[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]);
        let mut a = arr(&[39.0, 40.0, 41.0]);
        normalize(
            &mut a,
            &Normalization::CtWindow {
                center: 40.0,
                width: 0.0,
            },
        );
        close(&a, &[0.0, 1.0, 1.0]);
    }

    #[test]
    fn zscore_over_foreground() {
        // Foreground (> 0): 2, 4, 6 → mean 4, std sqrt(8/3).
        let mut a = arr(&[0.0, 2.0, 4.0, 6.0]);
        normalize(&mut a, &Normalization::Zscore { threshold: 0.0 });
        let s = (8.0f32 / 3.0).sqrt();
        close(&a, &[-4.0 / s, -2.0 / s, 0.0, 2.0 / s]);
        // Nothing above the threshold: statistics over all voxels.
        let mut a = arr(&[1.0, 3.0]);
        normalize(&mut a, &Normalization::Zscore { threshold: 10.0 });
        close(&a, &[-1.0, 1.0]);
        // Constant: zero mean, no division by zero.
        let mut a = arr(&[5.0, 5.0, 5.0]);
        normalize(&mut a, &Normalization::Zscore { threshold: 0.0 });
        close(&a, &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn zscore_large_volume_is_standardised() {
        let mut a = Array3::from_shape_fn((20, 30, 40), |(k, j, i)| {
            ((i * 31 + j * 17 + k * 7) % 101) as f32 + 1.0
        });
        normalize(&mut a, &Normalization::Zscore { threshold: 0.0 });
        let n = a.len() as f64;
        let mean = a.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-4, "{mean}");
        assert!((var - 1.0).abs() < 1e-4, "{var}");
    }

    #[test]
    fn percentile_scaling() {
        // 0..=100: the 10th and 90th percentiles are 10 and 90.
        let v: Vec<f32> = (0..=100).map(|x| x as f32).collect();
        let mut a = arr(&v);
        normalize(
            &mut a,
            &Normalization::Percentile {
                lower: 10.0,
                upper: 90.0,
            },
        );
        assert_eq!(a[[0, 0, 0]], 0.0);
        assert_eq!(a[[0, 0, 10]], 0.0);
        assert!((a[[0, 0, 50]] - 0.5).abs() < 1e-6);
        assert_eq!(a[[0, 0, 90]], 1.0);
        assert_eq!(a[[0, 0, 100]], 1.0);
        // Interpolated percentile, as numpy: percentile([0, 10], 25) = 2.5.
        let mut a = arr(&[10.0, 0.0]);
        normalize(
            &mut a,
            &Normalization::Percentile {
                lower: 25.0,
                upper: 100.0,
            },
        );
        close(&a, &[1.0, 0.0]);
        let mut v = vec![10.0f32, 0.0];
        assert_eq!(percentile(&mut v, 25.0), 2.5);
        // Constant input becomes zeros.
        let mut a = arr(&[3.0, 3.0]);
        normalize(
            &mut a,
            &Normalization::Percentile {
                lower: 1.0,
                upper: 99.0,
            },
        );
        close(&a, &[0.0, 0.0]);
    }

    #[test]
    fn none_is_identity() {
        let mut a = arr(&[-5.0, 7.5]);
        normalize(&mut a, &Normalization::None);
        assert_eq!(a, arr(&[-5.0, 7.5]));
    }
}
