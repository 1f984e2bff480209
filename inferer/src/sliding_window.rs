//! Sliding-window inference: run a model that takes fixed-size patches over a volume of
//! any size, and blend the overlapping patch outputs into one logit volume.
//!
//! Models are trained on patches and deployed with MONAI's `sliding_window_inference`
//! (`mode="gaussian"`, `sigma_scale=0.125`, `padding_mode="constant"`, `cval=0`); a
//! model gives the results its authors validated only when it is tiled and blended the
//! same way, so this module reproduces that algorithm (MONAI 1.x) step by step. The
//! window logic depends only on [`PatchRunner`], so it is tested with a fake model
//! against an independent NumPy implementation (`tests/monai_reference.py`).
//!
//! # The algorithm
//!
//! For each spatial axis with image size `n`, patch (ROI) size `r` and overlap `o`:
//!
//! - **padding**: `pad = max(r − n, 0)`, split as `pad / 2` before and `pad − pad / 2`
//!   after (integer division), filled with 0; the padded size is `p = max(n, r)`;
//! - **scan interval**: `s = r` if `r == p`, else `s = max(⌊r · (1 − o)⌋, 1)`;
//! - **window count**: `k = 1` if `p ≤ r`, else `k = ⌈(p − r) / s⌉ + 1` (MONAI: the
//!   first `d` with `d·s + r ≥ p`, plus one);
//! - **window starts**: `start_i = min(i · s, p − r)` for `i` in `0..k`, so the last
//!   window ends exactly at the end of the padded axis.
//!
//! Windows are the Cartesian product of the per-axis starts, D slowest and W fastest
//! (MONAI's `dense_patch_slices`), and are sent to the model `batch_size` at a time in
//! that order.
//!
//! Each window's output is weighted by the Gaussian importance map
//! `w(z, y, x) = g_D(z) · g_H(y) · g_W(x)` with
//! `g_a(i) = exp(−(i − (r_a − 1)/2)² / (2 σ_a²))`, `σ_a = 0.125 · r_a`, and then every
//! weight below `max(min w, 0.001)` raised to that floor (MONAI's
//! `compute_importance_map`). The result is `Σ w · logits / Σ w` over all windows
//! covering a voxel, cropped back to the unpadded image.
//!
//! When the image fits in one window the model runs once and its output (cropped) is
//! returned as is: the weighted mean over a single window is the window itself.

use ndarray::{Array3, Array4, Array5, ArrayView3, ArrayView4, ArrayView5, Axis, CowArray, Zip, s};

use radflow_shared::models::WindowPadding;

use crate::session::{LoadedModel, ModelError};

/// MONAI's default Gaussian width, as a fraction of the patch size.
pub const SIGMA_SCALE: f64 = 0.125;

/// Smallest importance weight (MONAI keeps weights at least 1e-3 so window corners
/// still count where nothing else covers them).
const MIN_WEIGHT: f32 = 1e-3;

/// Something that turns a batch of patches `[N, 1, D, H, W]` into logits
/// `[N, C, D, H, W]`: a loaded model, or a fake one in tests.
pub trait PatchRunner {
    /// Runs one batch.
    fn run(&self, batch: ArrayView5<f32>) -> Result<Array5<f32>, ModelError>;
}

impl PatchRunner for LoadedModel {
    fn run(&self, batch: ArrayView5<f32>) -> Result<Array5<f32>, ModelError> {
        self.run_batch(batch)
    }
}

/// How one axis is padded and tiled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AxisPlan {
    /// Voxels of padding before the image.
    pad_before: usize,
    /// Padded size, `max(size, roi)`.
    padded: usize,
    /// Window start positions in the padded axis.
    starts: Vec<usize>,
}

fn plan_axis(size: usize, roi: usize, overlap: f64) -> AxisPlan {
    let pad = roi.saturating_sub(size);
    let padded = size + pad;
    let interval = if roi == padded {
        roi
    } else {
        ((roi as f64 * (1.0 - overlap)) as usize).max(1)
    };
    let count = if padded <= roi {
        1
    } else {
        (padded - roi).div_ceil(interval) + 1
    };
    AxisPlan {
        pad_before: pad / 2,
        padded,
        starts: (0..count)
            .map(|i| (i * interval).min(padded - roi))
            .collect(),
    }
}

/// The Gaussian importance map for a patch of size `roi` (`[D, H, W]`).
pub fn importance_map(roi: [usize; 3]) -> Array3<f32> {
    let gauss = |r: usize| -> Vec<f32> {
        let sigma = r as f64 * SIGMA_SCALE;
        let centre = (r as f64 - 1.0) / 2.0;
        (0..r)
            .map(|i| {
                let x = i as f64 - centre;
                (-(x * x) / (2.0 * sigma * sigma)).exp() as f32
            })
            .collect()
    };
    let (gd, gh, gw) = (gauss(roi[0]), gauss(roi[1]), gauss(roi[2]));
    let mut map =
        Array3::from_shape_fn((roi[0], roi[1], roi[2]), |(z, y, x)| gd[z] * gh[y] * gw[x]);
    let floor = map
        .iter()
        .copied()
        .fold(f32::INFINITY, f32::min)
        .max(MIN_WEIGHT);
    map.mapv_inplace(|w| w.max(floor));
    map
}

/// Runs `model` over `image` (`[D, H, W]`) in windows of `roi` voxels that overlap by
/// the fraction `overlap`, `batch_size` windows per model call, and returns the blended
/// logits `[C, D, H, W]` (see the module docs for the exact algorithm).
pub fn sliding_window(
    model: &dyn PatchRunner,
    image: ArrayView3<f32>,
    roi: [usize; 3],
    overlap: f64,
    batch_size: usize,
    padding: WindowPadding,
) -> Result<Array4<f32>, ModelError> {
    let size: [usize; 3] = image.dim().into();
    if roi.contains(&0) {
        return Err(ModelError::Window(format!(
            "patch size {roi:?} has a zero axis"
        )));
    }
    if !(0.0..1.0).contains(&overlap) {
        return Err(ModelError::Window(format!(
            "overlap {overlap} is not in [0, 1)"
        )));
    }
    if batch_size == 0 {
        return Err(ModelError::Window("batch size is 0".into()));
    }
    if size.contains(&0) {
        return Err(ModelError::Window(format!("the image {size:?} is empty")));
    }

    let plans: [AxisPlan; 3] = std::array::from_fn(|a| plan_axis(size[a], roi[a], overlap));
    let padded = if plans.iter().zip(size).all(|(p, n)| p.padded == n) {
        CowArray::from(image)
    } else {
        CowArray::from(pad_image(image, &plans, padding))
    };
    let mut windows: Vec<[usize; 3]> = Vec::new();
    for &z in &plans[0].starts {
        for &y in &plans[1].starts {
            for &x in &plans[2].starts {
                windows.push([z, y, x]);
            }
        }
    }
    let crop = |a: usize| plans[a].pad_before..plans[a].pad_before + size[a];

    let mut batch =
        Array5::<f32>::zeros((batch_size.min(windows.len()), 1, roi[0], roi[1], roi[2]));
    if let [only] = windows[..] {
        let n = fill_batch(&mut batch, &padded.view(), &[only], roi);
        let logits = run_checked(model, batch.slice(s![..n, .., .., .., ..]), roi, None)?;
        let cropped = logits.slice(s![0, .., crop(0), crop(1), crop(2)]);
        return Ok(cropped.to_owned());
    }

    let weights = importance_map(roi);
    let [pd, ph, pw] = [plans[0].padded, plans[1].padded, plans[2].padded];
    let mut count = Array3::<f32>::zeros((pd, ph, pw));
    let mut acc: Option<Array4<f32>> = None;
    for chunk in windows.chunks(batch_size) {
        let n = fill_batch(&mut batch, &padded.view(), chunk, roi);
        let channels = acc.as_ref().map(|a| a.dim().0);
        let logits = run_checked(model, batch.slice(s![..n, .., .., .., ..]), roi, channels)?;
        let acc = acc.get_or_insert_with(|| Array4::zeros((logits.dim().1, pd, ph, pw)));
        for (b, &[z, y, x]) in chunk.iter().enumerate() {
            let region = s![z..z + roi[0], y..y + roi[1], x..x + roi[2]];
            Zip::from(count.slice_mut(region))
                .and(&weights)
                .for_each(|c, &w| *c += w);
            for (mut channel, out) in acc
                .axis_iter_mut(Axis(0))
                .zip(logits.index_axis(Axis(0), b).axis_iter(Axis(0)))
            {
                Zip::from(channel.slice_mut(region))
                    .and(&weights)
                    .and(&out)
                    .for_each(|a, &w, &l| *a += w * l);
            }
        }
    }
    let acc = acc.expect("there is at least one window");

    let count = count.slice(s![crop(0), crop(1), crop(2)]);
    let mut out = Array4::<f32>::zeros((acc.dim().0, size[0], size[1], size[2]));
    for (mut o, a) in out.axis_iter_mut(Axis(0)).zip(acc.axis_iter(Axis(0))) {
        Zip::from(&mut o)
            .and(&a.slice(s![crop(0), crop(1), crop(2)]))
            .and(&count)
            .for_each(|o, &a, &c| *o = a / c);
    }
    Ok(out)
}

/// The image padded up to the ROI where it is smaller, with zeros or edge values.
fn pad_image(image: ArrayView3<f32>, plans: &[AxisPlan; 3], padding: WindowPadding) -> Array3<f32> {
    let (d, h, w) = image.dim();
    let [z0, y0, x0] = [
        plans[0].pad_before,
        plans[1].pad_before,
        plans[2].pad_before,
    ];
    match padding {
        WindowPadding::Constant => {
            let mut padded = Array3::zeros((plans[0].padded, plans[1].padded, plans[2].padded));
            padded
                .slice_mut(s![z0..z0 + d, y0..y0 + h, x0..x0 + w])
                .assign(&image);
            padded
        }
        WindowPadding::Edge => {
            // Each padded index reads the nearest index inside the image.
            let src = |i: usize, before: usize, n: usize| i.saturating_sub(before).min(n - 1);
            Array3::from_shape_fn(
                (plans[0].padded, plans[1].padded, plans[2].padded),
                |(z, y, x)| image[[src(z, z0, d), src(y, y0, h), src(x, x0, w)]],
            )
        }
    }
}

/// Copies the windows starting at `starts` into the first slots of `batch`; returns how
/// many slots are in use.
fn fill_batch(
    batch: &mut Array5<f32>,
    image: &ArrayView3<f32>,
    starts: &[[usize; 3]],
    roi: [usize; 3],
) -> usize {
    for (b, &[z, y, x]) in starts.iter().enumerate() {
        batch
            .slice_mut(s![b, 0, .., .., ..])
            .assign(&image.slice(s![z..z + roi[0], y..y + roi[1], x..x + roi[2]]));
    }
    starts.len()
}

/// Runs a batch and checks the output is `[n, C, roi…]` with the expected `C`.
fn run_checked(
    model: &dyn PatchRunner,
    batch: ArrayView5<f32>,
    roi: [usize; 3],
    channels: Option<usize>,
) -> Result<Array5<f32>, ModelError> {
    let n = batch.dim().0;
    let out = model.run(batch)?;
    let (on, oc, od, oh, ow) = out.dim();
    let ok = on == n && oc > 0 && [od, oh, ow] == roi && channels.is_none_or(|c| c == oc);
    if !ok {
        return Err(ModelError::PatchOutput(format!(
            "a batch of {n} patches {roi:?} gave an output of shape {:?}; expected [{n}, {}, {}, {}, {}]",
            out.shape(),
            channels.map_or("C".to_string(), |c| c.to_string()),
            roi[0],
            roi[1],
            roi[2]
        )));
    }
    Ok(out)
}

/// The label of each voxel: the index of its largest logit (`[C, D, H, W]` → `[D, H,
/// W]`); the lowest index wins a tie, and NaN never wins.
///
/// # Panics
/// If there are more than 256 channels (labels are `u8`).
pub fn argmax_labels(logits: ArrayView4<f32>) -> Array3<u8> {
    let (c, d, h, w) = logits.dim();
    assert!(c <= 256, "{c} output channels do not fit u8 labels");
    let mut labels = Array3::<u8>::zeros((d, h, w));
    Zip::from(&mut labels)
        .and(logits.lanes(Axis(0)))
        .for_each(|label, lane| {
            let mut best = 0;
            let mut best_value = f32::NEG_INFINITY;
            for (i, &v) in lane.iter().enumerate() {
                if v > best_value {
                    best = i;
                    best_value = v;
                }
            }
            *label = best as u8;
        });
    labels
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use ndarray::Array;

    use super::*;

    /// Returns `[a·x + b, offset_by_window]` per voxel and records batch sizes.
    struct Recorder {
        batches: RefCell<Vec<usize>>,
    }

    impl PatchRunner for Recorder {
        fn run(&self, batch: ArrayView5<f32>) -> Result<Array5<f32>, ModelError> {
            let (n, _, d, h, w) = batch.dim();
            self.batches.borrow_mut().push(n);
            Ok(Array5::from_shape_fn((n, 2, d, h, w), |(b, c, z, y, x)| {
                let v = batch[[b, 0, z, y, x]];
                if c == 0 { 2.0 * v + 1.0 } else { -v }
            }))
        }
    }

    fn starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
        plan_axis(size, roi, overlap).starts
    }

    #[test]
    fn axis_plans_match_monai() {
        // interval int(96 * 0.75) = 72; windows until d*72 + 96 >= 200 → d = 2.
        assert_eq!(starts(200, 96, 0.25), vec![0, 72, 104]);
        // roi == size: one window with interval = roi.
        assert_eq!(starts(96, 96, 0.25), vec![0]);
        // Smaller than the roi: padded to it, one window, padding split low-first.
        let p = plan_axis(5, 8, 0.5);
        assert_eq!((p.pad_before, p.padded, p.starts), (1, 8, vec![0]));
        // int(4 * 0.5) = 2: starts 0, 2, 4, 6 (then 6+4 >= 10).
        assert_eq!(starts(10, 4, 0.5), vec![0, 2, 4, 6]);
        // Interval rounds down and never reaches 0: int(3 * 0.9) = 2, int(2 * 0.9) = 1.
        assert_eq!(starts(7, 3, 0.1), vec![0, 2, 4]);
        assert_eq!(starts(4, 2, 0.9), vec![0, 1, 2]);
        assert_eq!(starts(4, 1, 0.9), vec![0, 1, 2, 3]);
        // Last window is pulled back to end at the edge: 0, 3, 6 → 5.
        assert_eq!(starts(9, 4, 0.25), vec![0, 3, 5]);
    }

    #[test]
    fn importance_map_is_a_floored_gaussian_peaking_at_the_centre() {
        let map = importance_map([5, 4, 96]);
        // Odd axis: exact centre weight exp(0) = 1; even axis: two centre voxels ±0.5.
        let g = |x: f64, r: f64| (-(x * x) / (2.0 * (0.125 * r).powi(2))).exp();
        let expected = (g(0.0, 5.0) * g(0.5, 4.0) * g(0.5, 96.0)) as f32;
        assert!((map[[2, 1, 47]] - expected).abs() < 1e-6);
        assert_eq!(map[[2, 1, 47]], map[[2, 2, 48]]);
        // Corners of this small patch are far below 1e-3 before flooring.
        assert_eq!(map[[0, 0, 0]], MIN_WEIGHT);
        assert!(map.iter().all(|&w| (MIN_WEIGHT..=1.0).contains(&w)));
        // Symmetric.
        assert_eq!(map[[0, 1, 10]], map[[4, 2, 85]]);
        // A wide patch floors nothing where the Gaussian stays above 1e-3.
        let wide = importance_map([1, 1, 3]);
        let edge = g(1.0, 3.0) as f32;
        assert_eq!(wide[[0, 0, 0]], edge.max(MIN_WEIGHT));
    }

    #[test]
    fn a_volume_that_fits_one_patch_is_one_run_and_the_output_is_the_cropped_logits() {
        let image = Array::from_shape_fn((3, 7, 6), |(z, y, x)| (z * 100 + y * 10 + x) as f32);
        let runner = Recorder {
            batches: RefCell::default(),
        };
        let out = sliding_window(
            &runner,
            image.view(),
            [4, 8, 6],
            0.25,
            4,
            WindowPadding::Constant,
        )
        .unwrap();
        assert_eq!(*runner.batches.borrow(), vec![1]);
        assert_eq!(out.dim(), (2, 3, 7, 6));
        for ((c, z, y, x), &v) in out.indexed_iter() {
            let i = image[[z, y, x]];
            let expected = if c == 0 { 2.0 * i + 1.0 } else { -i };
            assert_eq!(v, expected);
        }
    }

    #[test]
    fn a_voxelwise_model_is_reproduced_exactly_and_batches_are_filled_in_order() {
        // Any per-voxel model gives the same value in every window, so the blend must
        // return it unchanged wherever windows overlap.
        let image = Array::from_shape_fn((9, 10, 11), |(z, y, x)| {
            ((z * 7 + y * 3 + x) % 13) as f32 / 13.0
        });
        let runner = Recorder {
            batches: RefCell::default(),
        };
        let out = sliding_window(
            &runner,
            image.view(),
            [4, 4, 4],
            0.5,
            5,
            WindowPadding::Constant,
        )
        .unwrap();
        let windows = starts(9, 4, 0.5).len() * starts(10, 4, 0.5).len() * starts(11, 4, 0.5).len();
        let batches = runner.batches.borrow();
        assert_eq!(batches.iter().sum::<usize>(), windows);
        assert!(batches[..batches.len() - 1].iter().all(|&n| n == 5));
        for ((c, z, y, x), &v) in out.indexed_iter() {
            let i = image[[z, y, x]];
            let expected = if c == 0 { 2.0 * i + 1.0 } else { -i };
            assert!(
                (v - expected).abs() < 1e-5,
                "{c} {z} {y} {x}: {v} vs {expected}"
            );
        }
    }

    #[test]
    fn bad_settings_and_bad_outputs_are_errors() {
        let image = Array3::<f32>::zeros((4, 4, 4));
        let runner = Recorder {
            batches: RefCell::default(),
        };
        for (roi, overlap, batch) in [
            ([0, 4, 4], 0.25, 1),
            ([4, 4, 4], 1.0, 1),
            ([4, 4, 4], -0.1, 1),
            ([4, 4, 4], 0.25, 0),
        ] {
            let err = sliding_window(
                &runner,
                image.view(),
                roi,
                overlap,
                batch,
                WindowPadding::Constant,
            )
            .unwrap_err();
            assert!(matches!(err, ModelError::Window(_)), "{err}");
        }

        struct Wrong;
        impl PatchRunner for Wrong {
            fn run(&self, batch: ArrayView5<f32>) -> Result<Array5<f32>, ModelError> {
                let (n, _, d, h, w) = batch.dim();
                Ok(Array5::zeros((n, 2, d, h, w - 1)))
            }
        }
        let err = sliding_window(
            &Wrong,
            image.view(),
            [2, 2, 2],
            0.0,
            2,
            WindowPadding::Constant,
        )
        .unwrap_err();
        assert!(err.to_string().contains("expected ["), "{err}");
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_ignores_nan() {
        let logits = Array4::from_shape_vec(
            (3, 1, 1, 4),
            vec![
                0.0,
                5.0,
                1.0,
                f32::NAN, //
                2.0,
                5.0,
                0.0,
                1.0, //
                1.0,
                1.0,
                3.0,
                0.5,
            ],
        )
        .unwrap();
        let labels = argmax_labels(logits.view());
        assert_eq!(labels.iter().copied().collect::<Vec<_>>(), vec![1, 0, 2, 1]);
    }
}
