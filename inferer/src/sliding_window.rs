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
//!
//! # Buffers
//!
//! One batch buffer is filled window after window and handed to the model; the model
//! lends its output (ONNX Runtime's own buffer) for the blending, so nothing is copied
//! between `session.run` calls. The blended sum is divided in place by the weight sum
//! and returned without a copy unless the image had to be padded. On an accelerator
//! (`PatchRunner::fixed_batch`) a short last batch is filled up with zeros, so every
//! `session.run` sees the one shape the session was warmed up on.
//!
//! The two volume-sized accumulators (weighted sums per channel, weight sums) come
//! from a small pool and go back to it after the label pass: the next job of the same
//! size reuses them instead of mapping (and page-faulting, and unmapping with TLB
//! shoot-downs across the process's threads) hundreds of megabytes again. The pool keeps
//! at most [`POOLED_BUFFERS`] buffers, so what it holds is bounded by the largest jobs.
//! New accumulators are backed by transparent huge pages where Linux allows it, which
//! more than halves the cost of first touching them. The blending runs one channel per
//! thread (rayon), the division by the weight sums and the argmax one z-plane per
//! thread; each thread adds exactly `w · l` per voxel in window order, so the result
//! does not depend on the number of threads.

use std::time::Duration;

use ndarray::{
    Array3, Array4, Array5, ArrayView3, ArrayView4, ArrayView5, ArrayViewMut3, Axis, CowArray, Zip,
    s,
};

use radflow_shared::models::WindowPadding;
use rayon::prelude::*;

use crate::session::{LoadedModel, ModelError};

/// MONAI's default Gaussian width, as a fraction of the patch size.
pub const SIGMA_SCALE: f64 = 0.125;

/// Smallest importance weight (MONAI keeps weights at least 1e-3 so window corners
/// still count where nothing else covers them).
const MIN_WEIGHT: f32 = 1e-3;

/// Something that turns a batch of patches `[N, 1, D, H, W]` into logits
/// `[N, C, D, H, W]`: a loaded model, or a fake one in tests.
pub trait PatchRunner {
    /// Runs one batch and hands its logits to `consume` (a view that is only valid
    /// during the call). Returns the time the model itself took.
    fn run(
        &self,
        batch: ArrayView5<f32>,
        consume: &mut dyn FnMut(ArrayView5<f32>) -> Result<(), ModelError>,
    ) -> Result<Duration, ModelError>;

    /// Whether every batch must have exactly `batch_size` items (the unused ones
    /// zeros, their outputs ignored).
    fn fixed_batch(&self) -> bool {
        false
    }

    /// Told after a run that `slots` items of the batch were zero padding, so that
    /// counts of work done leave them out.
    fn padding(&self, _slots: usize) {}
}

impl PatchRunner for LoadedModel {
    fn run(
        &self,
        batch: ArrayView5<f32>,
        consume: &mut dyn FnMut(ArrayView5<f32>) -> Result<(), ModelError>,
    ) -> Result<Duration, ModelError> {
        self.run_patches(batch, consume)
    }

    fn fixed_batch(&self) -> bool {
        LoadedModel::fixed_batch(self)
    }

    fn padding(&self, slots: usize) {
        self.uncount_padding(slots);
    }
}

/// The window settings of one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSettings {
    /// Patch (ROI) size `[D, H, W]`.
    pub roi: [usize; 3],
    /// Fraction of a window shared with its neighbour, in `[0, 1)`.
    pub overlap: f64,
    /// Windows per model call.
    pub batch_size: usize,
    /// What fills windows past the image.
    pub padding: WindowPadding,
}

impl WindowSettings {
    /// The settings a registry entry asks for.
    pub fn of(spec: &radflow_shared::models::ModelSpec) -> Self {
        Self {
            roi: spec.patch,
            overlap: spec.overlap,
            batch_size: spec.batch_size,
            padding: spec.padding,
        }
    }
}

/// Accumulation buffers kept for the next job (see the module docs).
pub const POOLED_BUFFERS: usize = 4;

static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// A zeroed buffer of `len` values: a pooled one when one is large enough (zeroed
/// in parallel), else a new one (zero pages from the system, touched lazily).
fn take_zeroed(len: usize) -> Vec<f32> {
    let reused = {
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pool.iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)
            .map(|i| pool.swap_remove(i))
    };
    match reused {
        Some(mut buffer) => {
            // Zero what is kept on every core, then extend (one pass over the memory).
            buffer.truncate(len);
            buffer.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
            buffer.resize(len, 0.0);
            buffer
        }
        None => {
            let buffer = vec![0.0; len];
            advise_huge_pages(&buffer);
            buffer
        }
    }
}

/// Asks Linux to back a fresh, untouched buffer with transparent huge pages: a few
/// hundred faults of 2 MiB instead of a hundred thousand of 4 KiB when hundreds of
/// megabytes are first written (the pages still arrive zeroed). Only advice: where
/// huge pages are off, nothing changes.
fn advise_huge_pages(buffer: &[f32]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buffer.as_ptr() as usize;
        let end = start + std::mem::size_of_val(buffer);
        let first = start.next_multiple_of(PAGE);
        if end > first + (2 << 20) {
            let len = (end - first) / PAGE * PAGE;
            // SAFETY: the range lies inside memory this buffer owns; MADV_HUGEPAGE
            // changes how pages are backed, never their contents.
            unsafe {
                libc::madvise(first as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buffer;
}

/// Returns a buffer to the pool, dropping the smallest one beyond the pool's size.
fn give_back(buffer: Vec<f32>) {
    let mut pool = POOL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    pool.push(buffer);
    if pool.len() > POOLED_BUFFERS {
        let smallest = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)
            .expect("the pool is not empty");
        pool.swap_remove(smallest);
    }
}

/// What one sliding-window pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowStats {
    /// Windows run.
    pub windows: usize,
    /// `(windows in the batch, time in the model)` per model call.
    pub batches: Vec<(usize, Duration)>,
}

impl WindowStats {
    /// Total time spent in the model.
    pub fn run_time(&self) -> Duration {
        self.batches.iter().map(|(_, t)| *t).sum()
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

/// Number of windows MONAI's algorithm runs for an image of `size` voxels `[D, H, W]`.
pub fn window_count(size: [usize; 3], roi: [usize; 3], overlap: f64) -> usize {
    (0..3)
        .map(|a| plan_axis(size[a], roi[a], overlap).starts.len())
        .product()
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
    let settings = WindowSettings {
        roi,
        overlap,
        batch_size,
        padding,
    };
    run_windows(model, image, &settings).map(|(logits, _)| logits)
}

/// [`sliding_window`] with its settings in one value, also returning what it did.
pub fn run_windows(
    model: &dyn PatchRunner,
    image: ArrayView3<f32>,
    settings: &WindowSettings,
) -> Result<(Array4<f32>, WindowStats), ModelError> {
    let (blended, stats) = blend(model, image, settings)?;
    let logits = match blended {
        Blended::Single(logits) => logits,
        Blended::Sums {
            mut sums,
            weights: weights_array,
            crop,
            padded,
        } => {
            let weights = weights_array.as_slice().expect("a new array is contiguous");
            sums.as_slice_mut()
                .expect("a new array is contiguous")
                .par_chunks_mut(weights.len())
                .for_each(|channel| {
                    for (a, &w) in channel.iter_mut().zip(weights) {
                        *a /= w;
                    }
                });
            give_back(weights_array.into_raw_vec_and_offset().0);
            if padded {
                let [z, y, x] = crop;
                sums.slice(s![.., z, y, x]).to_owned()
            } else {
                sums
            }
        }
    };
    Ok((logits, stats))
}

/// The label map of [`run_windows`]'s logits (what [`argmax_labels`] would give), with
/// the division by the weights and the argmax done in one pass over the sums: the
/// blended logits are never written out.
pub fn run_windows_labels(
    model: &dyn PatchRunner,
    image: ArrayView3<f32>,
    settings: &WindowSettings,
) -> Result<(Array3<u8>, WindowStats), ModelError> {
    let (blended, stats) = blend(model, image, settings)?;
    let labels = match blended {
        Blended::Single(logits) => argmax_labels(logits.view()),
        Blended::Sums {
            sums: sums_array,
            weights: weights_array,
            crop,
            ..
        } => {
            let (c, pd, ph, pw) = sums_array.dim();
            assert!(c <= 256, "{c} output channels do not fit u8 labels");
            let sums = sums_array.as_slice().expect("a new array is contiguous");
            let weights = weights_array.as_slice().expect("a new array is contiguous");
            let plane = pd * ph * pw;
            let [zr, yr, xr] = crop;
            let (d, h, w) = (zr.len(), yr.len(), xr.len());
            let mut labels = Array3::<u8>::zeros((d, h, w));
            labels
                .as_slice_mut()
                .expect("a new array is contiguous")
                .par_chunks_mut((h * w).max(1))
                .enumerate()
                .for_each(|(dz, out)| {
                    let mut best = vec![f32::NEG_INFINITY; w];
                    for (dy, out) in out.chunks_exact_mut(w.max(1)).enumerate() {
                        let at = ((zr.start + dz) * ph + yr.start + dy) * pw + xr.start;
                        let weight = &weights[at..at + w];
                        best.fill(f32::NEG_INFINITY);
                        for ch in 0..c {
                            let row = &sums[ch * plane + at..][..w];
                            for (((label, best), &s), &wt) in
                                out.iter_mut().zip(best.iter_mut()).zip(row).zip(weight)
                            {
                                let v = s / wt;
                                if v > *best {
                                    *best = v;
                                    *label = ch as u8;
                                }
                            }
                        }
                    }
                });
            give_back(sums_array.into_raw_vec_and_offset().0);
            give_back(weights_array.into_raw_vec_and_offset().0);
            labels
        }
    };
    Ok((labels, stats))
}

/// What the windows add up to before the division.
enum Blended {
    /// The image fitted one window: its cropped logits.
    Single(Array4<f32>),
    /// Weighted sums `[C, D', H', W']` and weight sums `[D', H', W']` over the padded
    /// image, with the ranges of the image inside it.
    Sums {
        sums: Array4<f32>,
        weights: Array3<f32>,
        crop: [std::ops::Range<usize>; 3],
        padded: bool,
    },
}

/// Pads, tiles, runs the batches and accumulates the weighted logits.
fn blend(
    model: &dyn PatchRunner,
    image: ArrayView3<f32>,
    settings: &WindowSettings,
) -> Result<(Blended, WindowStats), ModelError> {
    let WindowSettings {
        roi,
        overlap,
        batch_size,
        padding,
    } = *settings;
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
    let is_padded = plans.iter().zip(size).any(|(p, n)| p.padded != n);
    let padded = if is_padded {
        CowArray::from(pad_image(image, &plans, padding))
    } else {
        CowArray::from(image)
    };
    let mut windows: Vec<[usize; 3]> = Vec::new();
    for &z in &plans[0].starts {
        for &y in &plans[1].starts {
            for &x in &plans[2].starts {
                windows.push([z, y, x]);
            }
        }
    }
    let crop: [std::ops::Range<usize>; 3] =
        std::array::from_fn(|a| plans[a].pad_before..plans[a].pad_before + size[a]);
    let mut stats = WindowStats {
        windows: windows.len(),
        batches: Vec::new(),
    };

    let slots = if model.fixed_batch() {
        batch_size
    } else {
        batch_size.min(windows.len())
    };
    let mut batch = Array5::<f32>::zeros((slots, 1, roi[0], roi[1], roi[2]));

    if let [only] = windows[..] {
        let used = fill_batch(&mut batch, &padded.view(), &[only], roi);
        let mut out = None;
        let [z, y, x] = crop.clone();
        let time = run_checked(model, &batch, used, roi, None, &mut |logits| {
            out = Some(
                logits
                    .slice(s![0, .., z.clone(), y.clone(), x.clone()])
                    .to_owned(),
            );
        })?;
        stats.batches.push((1, time));
        return Ok((
            Blended::Single(out.expect("the model output was consumed")),
            stats,
        ));
    }

    let importance = importance_map(roi);
    let [pd, ph, pw] = [plans[0].padded, plans[1].padded, plans[2].padded];
    let weights = weight_sums(&windows, importance.view(), [pd, ph, pw]);
    let mut acc: Option<Array4<f32>> = None;
    for chunk in windows.chunks(batch_size) {
        let used = fill_batch(&mut batch, &padded.view(), chunk, roi);
        let channels = acc.as_ref().map(|a| a.dim().0);
        let time = run_checked(model, &batch, used, roi, channels, &mut |logits| {
            let acc = acc.get_or_insert_with(|| {
                let channels = logits.dim().1;
                let buffer = take_zeroed(channels * pd * ph * pw);
                Array4::from_shape_vec((channels, pd, ph, pw), buffer).expect("sized buffer")
            });
            for (b, &start) in chunk.iter().enumerate() {
                let item = logits.index_axis(Axis(0), b);
                match (acc.as_slice_mut(), item.as_slice()) {
                    // Channels are independent: one per thread.
                    (Some(sums), Some(values)) => sums
                        .par_chunks_mut(pd * ph * pw)
                        .zip(values.par_chunks(roi.iter().product()))
                        .for_each(|(sums, values)| {
                            let sums = ArrayViewMut3::from_shape((pd, ph, pw), sums)
                                .expect("a channel of the sums");
                            let values = ArrayView3::from_shape((roi[0], roi[1], roi[2]), values)
                                .expect("a channel of the logits");
                            add_weighted(sums, start, importance.view(), values);
                        }),
                    _ => {
                        for (channel, out) in
                            acc.axis_iter_mut(Axis(0)).zip(item.axis_iter(Axis(0)))
                        {
                            add_weighted(channel, start, importance.view(), out);
                        }
                    }
                }
            }
        })?;
        stats.batches.push((chunk.len(), time));
    }
    let sums = acc.expect("there is at least one window");
    Ok((
        Blended::Sums {
            sums,
            weights,
            crop,
            padded: is_padded,
        },
        stats,
    ))
}

/// The sum of the importance weights of every window at every voxel of the padded
/// image, computed plane by plane in parallel (each plane adds the rows of the windows
/// that cover it, in window order, as a window-by-window sum would).
fn weight_sums(
    windows: &[[usize; 3]],
    importance: ArrayView3<f32>,
    dims: [usize; 3],
) -> Array3<f32> {
    let [pd, ph, pw] = dims;
    let (rd, rh, rw) = importance.dim();
    let importance = importance.as_standard_layout();
    let importance = importance
        .as_slice()
        .expect("standard layout is contiguous");
    let mut sums =
        Array3::from_shape_vec((pd, ph, pw), take_zeroed(pd * ph * pw)).expect("sized buffer");
    sums.as_slice_mut()
        .expect("a new array is contiguous")
        .par_chunks_mut((ph * pw).max(1))
        .enumerate()
        .for_each(|(z, plane)| {
            for &[wz, wy, wx] in windows {
                if !(wz..wz + rd).contains(&z) {
                    continue;
                }
                let dz = z - wz;
                for dy in 0..rh {
                    let at = (wy + dy) * pw + wx;
                    let from = (dz * rh + dy) * rw;
                    for (a, &w) in plane[at..at + rw]
                        .iter_mut()
                        .zip(&importance[from..from + rw])
                    {
                        *a += w;
                    }
                }
            }
        });
    sums
}

/// `target[start + p] += weights[p] · values[p]` over the window at `start`, row by row
/// over contiguous memory where the arrays allow it, so the inner loop vectorises;
/// element by element otherwise. Both paths compute exactly `a + w · l` per voxel.
fn add_weighted(
    mut target: ArrayViewMut3<f32>,
    [z, y, x]: [usize; 3],
    weights: ArrayView3<f32>,
    values: ArrayView3<f32>,
) {
    let (rd, rh, rw) = weights.dim();
    let (_, th, tw) = target.dim();
    if let (Some(t), Some(w), Some(v)) =
        (target.as_slice_mut(), weights.as_slice(), values.as_slice())
    {
        for dz in 0..rd {
            for dy in 0..rh {
                let at = ((z + dz) * th + y + dy) * tw + x;
                let from = (dz * rh + dy) * rw;
                let (w, v) = (&w[from..from + rw], &v[from..from + rw]);
                for ((a, &w), &l) in t[at..at + rw].iter_mut().zip(w).zip(v) {
                    *a += w * l;
                }
            }
        }
        return;
    }
    Zip::from(target.slice_mut(s![z..z + rd, y..y + rh, x..x + rw]))
        .and(&weights)
        .and(&values)
        .for_each(|a, &w, &l| *a += w * l);
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

/// Copies the windows starting at `starts` into the first slots of `batch` and zeroes
/// the slots after them (a fixed-size batch's padding); returns how many are in use.
fn fill_batch(
    batch: &mut Array5<f32>,
    image: &ArrayView3<f32>,
    starts: &[[usize; 3]],
    roi: [usize; 3],
) -> usize {
    let (_, ih, iw) = image.dim();
    let source = image.as_slice();
    for (b, &[z, y, x]) in starts.iter().enumerate() {
        let mut slot = batch.slice_mut(s![b, 0, .., .., ..]);
        match (slot.as_slice_mut(), source) {
            (Some(slot), Some(source)) => {
                // Row by row: one copy of `roi[2]` contiguous values each.
                for (r, row) in slot.chunks_exact_mut(roi[2]).enumerate() {
                    let (dz, dy) = (r / roi[1], r % roi[1]);
                    let at = ((z + dz) * ih + y + dy) * iw + x;
                    row.copy_from_slice(&source[at..at + roi[2]]);
                }
            }
            _ => slot.assign(&image.slice(s![z..z + roi[0], y..y + roi[1], x..x + roi[2]])),
        }
    }
    batch
        .slice_mut(s![starts.len().., .., .., .., ..])
        .fill(0.0);
    starts.len()
}

/// Runs the batch (its first `used` slots, or all of them for a fixed-batch model),
/// checks the output is `[n, C, roi…]` with the expected `C`, and hands the first
/// `used` items to `consume`.
fn run_checked(
    model: &dyn PatchRunner,
    batch: &Array5<f32>,
    used: usize,
    roi: [usize; 3],
    channels: Option<usize>,
    consume: &mut dyn FnMut(ArrayView5<f32>),
) -> Result<Duration, ModelError> {
    let input = if model.fixed_batch() {
        batch.view()
    } else {
        batch.slice(s![..used, .., .., .., ..])
    };
    let n = input.dim().0;
    let time = model.run(input, &mut |out| {
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
        consume(out.slice_move(s![..used, .., .., .., ..]));
        Ok(())
    })?;
    if n > used {
        model.padding(n - used);
    }
    Ok(time)
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
    if let (Some(all), Some(out)) = (logits.as_slice(), labels.as_slice_mut()) {
        // Row by row, every channel's row against a best-so-far row that stays in
        // cache: the logits are read once.
        let plane = d * h * w;
        out.par_chunks_mut((h * w).max(1))
            .enumerate()
            .for_each(|(z, slice)| {
                let mut best = vec![f32::NEG_INFINITY; w];
                for (y, out) in slice.chunks_exact_mut(w.max(1)).enumerate() {
                    best.fill(f32::NEG_INFINITY);
                    let r = z * h + y;
                    for ch in 0..c {
                        let row = &all[ch * plane + r * w..][..w];
                        for ((label, best), &v) in out.iter_mut().zip(best.iter_mut()).zip(row) {
                            if v > *best {
                                *best = v;
                                *label = ch as u8;
                            }
                        }
                    }
                }
            });
        return labels;
    }
    // Any layout: channel by channel.
    let mut best = Array3::<f32>::from_elem((d, h, w), f32::NEG_INFINITY);
    for (i, channel) in logits.axis_iter(Axis(0)).enumerate() {
        let i = i as u8;
        Zip::from(&mut labels)
            .and(&mut best)
            .and(&channel)
            .for_each(|label, best, &v| {
                if v > *best {
                    *best = v;
                    *label = i;
                }
            });
    }
    labels
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use ndarray::Array;

    use super::*;

    /// Returns `[2x + 1, −x]` per voxel and records batch sizes; with `fixed`, asks
    /// for fixed-size batches.
    struct Recorder {
        batches: RefCell<Vec<usize>>,
        fixed: bool,
    }

    impl Recorder {
        fn new(fixed: bool) -> Self {
            Self {
                batches: RefCell::default(),
                fixed,
            }
        }
    }

    impl PatchRunner for Recorder {
        fn run(
            &self,
            batch: ArrayView5<f32>,
            consume: &mut dyn FnMut(ArrayView5<f32>) -> Result<(), ModelError>,
        ) -> Result<Duration, ModelError> {
            let (n, _, d, h, w) = batch.dim();
            self.batches.borrow_mut().push(n);
            let out = Array5::from_shape_fn((n, 2, d, h, w), |(b, c, z, y, x)| {
                let v = batch[[b, 0, z, y, x]];
                if c == 0 { 2.0 * v + 1.0 } else { -v }
            });
            consume(out.view())?;
            Ok(Duration::from_millis(n as u64))
        }

        fn fixed_batch(&self) -> bool {
            self.fixed
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
        let runner = Recorder::new(false);
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
        let runner = Recorder::new(false);
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
    fn fixed_batches_are_filled_with_zeros_and_give_the_same_result() {
        let image = Array::from_shape_fn((9, 10, 11), |(z, y, x)| {
            1.0 + ((z * 7 + y * 3 + x) % 13) as f32 / 13.0
        });
        let settings = WindowSettings {
            roi: [4, 4, 4],
            overlap: 0.5,
            batch_size: 6,
            padding: WindowPadding::Constant,
        };
        let windows = window_count([9, 10, 11], [4, 4, 4], 0.5);
        assert_eq!(
            (windows, windows % 6),
            (80, 2),
            "the test needs a short last batch"
        );
        let free = Recorder::new(false);
        let (expected, free_stats) = run_windows(&free, image.view(), &settings).unwrap();
        let fixed = Recorder::new(true);
        let (got, stats) = run_windows(&fixed, image.view(), &settings).unwrap();
        assert_eq!(got, expected);
        assert_eq!(stats.windows, windows);
        // Every call has 6 slots; the statistics count the windows really run.
        assert!(fixed.batches.borrow().iter().all(|&n| n == 6));
        assert_eq!(*free.batches.borrow().last().unwrap(), 2);
        let counted: Vec<usize> = stats.batches.iter().map(|&(n, _)| n).collect();
        let free_counted: Vec<usize> = free_stats.batches.iter().map(|&(n, _)| n).collect();
        assert_eq!(counted, free_counted);
        assert_eq!(counted.iter().sum::<usize>(), windows);
        // The fake reports n ms per call of n slots.
        assert_eq!(
            stats.run_time(),
            Duration::from_millis(6 * counted.len() as u64)
        );
    }

    #[test]
    fn the_fused_label_pass_equals_argmax_of_the_logits() {
        // Not a per-voxel model: the label depends on the window, so blending matters.
        struct Mixed;
        impl PatchRunner for Mixed {
            fn run(
                &self,
                batch: ArrayView5<f32>,
                consume: &mut dyn FnMut(ArrayView5<f32>) -> Result<(), ModelError>,
            ) -> Result<Duration, ModelError> {
                let (n, _, d, h, w) = batch.dim();
                let out = Array5::from_shape_fn((n, 3, d, h, w), |(b, c, z, y, x)| {
                    let v = batch[[b, 0, z, y, x]];
                    let mean = batch.slice(s![b, 0, .., .., ..]).mean().unwrap();
                    [v, 1.0 - v, mean + 0.1 * (x as f32 - y as f32)][c]
                });
                consume(out.view())?;
                Ok(Duration::ZERO)
            }
        }
        let image = Array::from_shape_fn((9, 13, 11), |(z, y, x)| {
            ((z * 7 + y * 3 + x * 5) % 17) as f32 / 17.0
        });
        for (roi, padding) in [
            ([4, 5, 6], WindowPadding::Constant),
            ([12, 8, 6], WindowPadding::Edge),
            ([12, 16, 16], WindowPadding::Constant),
        ] {
            let settings = WindowSettings {
                roi,
                overlap: 0.4,
                batch_size: 3,
                padding,
            };
            let (logits, _) = run_windows(&Mixed, image.view(), &settings).unwrap();
            let (labels, stats) = run_windows_labels(&Mixed, image.view(), &settings).unwrap();
            assert_eq!(labels, argmax_labels(logits.view()), "{roi:?}");
            assert_eq!(labels.dim(), (9, 13, 11));
            assert!(stats.windows >= 1);
            let distinct: std::collections::BTreeSet<u8> = labels.iter().copied().collect();
            assert!(distinct.len() > 1, "{roi:?}: {distinct:?}");
        }
    }

    #[test]
    fn fill_batch_zeroes_the_unused_slots() {
        let image = Array3::from_elem((4, 4, 4), 3.0f32);
        let mut batch = Array5::from_elem((3, 1, 2, 2, 2), 9.0f32);
        let used = fill_batch(&mut batch, &image.view(), &[[0, 0, 0]], [2, 2, 2]);
        assert_eq!(used, 1);
        assert!(batch.slice(s![0, .., .., .., ..]).iter().all(|&v| v == 3.0));
        assert!(
            batch
                .slice(s![1.., .., .., .., ..])
                .iter()
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn bad_settings_and_bad_outputs_are_errors() {
        let image = Array3::<f32>::zeros((4, 4, 4));
        let runner = Recorder::new(false);
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
            fn run(
                &self,
                batch: ArrayView5<f32>,
                consume: &mut dyn FnMut(ArrayView5<f32>) -> Result<(), ModelError>,
            ) -> Result<Duration, ModelError> {
                let (n, _, d, h, w) = batch.dim();
                consume(Array5::zeros((n, 2, d, h, w - 1)).view())?;
                Ok(Duration::ZERO)
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
