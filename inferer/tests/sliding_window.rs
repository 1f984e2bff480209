//! The sliding window against an independent NumPy implementation of MONAI's
//! algorithm, with a fake model whose output depends on the voxel, its position in the
//! patch and the whole patch, so window placement, padding and blending all show.

mod common;

use std::cell::Cell;
use std::time::Duration;

use ndarray::{Array3, Array5, ArrayView5};
use radflow_inferer::session::ModelError;
use radflow_inferer::sliding_window::{PatchRunner, argmax_labels, sliding_window};
use radflow_shared::models::WindowPadding;
use serde_json::json;

use common::{max_abs_diff, random_values, run_reference};

/// Channel `c`: `a_c·x + b_c + k_c·(z + 2y + 3x)/(D + 2H + 3W) + g_c·mean(patch)`,
/// evaluated in the same order and precision as the NumPy copy.
struct Fake {
    a: Vec<f32>,
    b: Vec<f32>,
    k: Vec<f32>,
    g: Vec<f32>,
    calls: Cell<usize>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            a: vec![1.0, -0.5, 2.0],
            b: vec![0.1, 0.3, -0.2],
            k: vec![0.5, -1.0, 0.25],
            g: vec![2.0, 0.0, -3.0],
            calls: Cell::new(0),
        }
    }

    fn params(&self) -> serde_json::Value {
        json!({ "a": self.a, "b": self.b, "k": self.k, "g": self.g })
    }
}

impl PatchRunner for Fake {
    fn run(
        &self,
        batch: ArrayView5<f32>,
        consume: &mut dyn FnMut(ArrayView5<f32>) -> Result<(), ModelError>,
    ) -> Result<Duration, ModelError> {
        self.calls.set(self.calls.get() + 1);
        let (n, _, d, h, w) = batch.dim();
        let denom = (d + 2 * h + 3 * w) as f64;
        let means: Vec<f32> = (0..n)
            .map(|i| {
                let patch = batch.slice(ndarray::s![i, 0, .., .., ..]);
                (patch.iter().map(|&v| f64::from(v)).sum::<f64>() / patch.len() as f64) as f32
            })
            .collect();
        let out = Array5::from_shape_fn((n, self.a.len(), d, h, w), |(i, c, z, y, x)| {
            let pos = ((z + 2 * y + 3 * x) as f64 / denom) as f32;
            self.a[c] * batch[[i, 0, z, y, x]] + self.b[c] + self.k[c] * pos + self.g[c] * means[i]
        });
        consume(out.view())?;
        Ok(Duration::ZERO)
    }
}

fn compare(
    tag: &str,
    shape: [usize; 3],
    roi: [usize; 3],
    overlap: f64,
    batch_size: usize,
) -> usize {
    compare_padded(
        tag,
        shape,
        roi,
        overlap,
        batch_size,
        WindowPadding::Constant,
    )
}

fn compare_padded(
    tag: &str,
    shape: [usize; 3],
    roi: [usize; 3],
    overlap: f64,
    batch_size: usize,
    padding: WindowPadding,
) -> usize {
    let values = random_values(
        shape.iter().product::<usize>() as u64,
        shape.iter().product(),
        0.0,
        1.0,
    );
    let image = Array3::from_shape_vec((shape[0], shape[1], shape[2]), values.clone()).unwrap();
    let fake = Fake::new();
    let ours = sliding_window(&fake, image.view(), roi, overlap, batch_size, padding).unwrap();

    let params = json!({
        "mode": "fake", "shape": shape, "roi": roi, "overlap": overlap,
        "batch_size": batch_size, "fake": fake.params(),
        "padding": match padding { WindowPadding::Constant => "constant", WindowPadding::Edge => "edge" },
    });
    let (ref_shape, reference) = run_reference(tag, params, &values);
    assert_eq!(ours.shape(), &ref_shape[..], "{tag}: output shape");
    let ours: Vec<f32> = ours.iter().copied().collect();
    let diff = max_abs_diff(&ours, &reference);
    assert!(diff < 1e-5, "{tag}: max |radflow − reference| = {diff}");
    fake.calls.get()
}

#[test]
fn overlapping_windows_with_a_partial_last_batch() {
    // Intervals 12, 15, 9 give 3 × 3 × 3 windows; in batches of 5 the last has 2.
    let calls = compare("overlap", [37, 50, 29], [16, 20, 12], 0.25, 5);
    assert_eq!(calls, 6);
}

#[test]
fn edge_padding_repeats_the_border_like_monai_replicate() {
    // Smaller than the patch on two axes, larger on one: padded with edge values.
    compare_padded(
        "edge",
        [5, 30, 9],
        [8, 12, 12],
        0.25,
        3,
        WindowPadding::Edge,
    );
}

#[test]
fn image_smaller_than_the_patch_on_some_axes_is_padded_and_cropped() {
    compare("padded", [10, 40, 7], [16, 16, 16], 0.5, 4);
}

#[test]
fn patch_equal_to_the_image_on_one_axis_and_no_overlap() {
    compare("equal", [16, 33, 20], [16, 16, 16], 0.0, 1);
}

#[test]
fn large_overlap_gives_a_stride_of_one_voxel() {
    // int(3 × 0.2) = 0 → interval 1 on every axis.
    compare("stride1", [6, 7, 5], [3, 3, 3], 0.8, 16);
}

#[test]
fn a_volume_inside_one_patch_is_one_run_and_matches_the_blended_reference() {
    let calls = compare("single", [8, 9, 10], [16, 16, 16], 0.25, 4);
    assert_eq!(calls, 1);
}

#[test]
fn labels_are_the_argmax_of_the_blended_logits() {
    let image = Array3::from_shape_vec((12, 12, 12), random_values(7, 1728, 0.0, 1.0)).unwrap();
    let logits = sliding_window(
        &Fake::new(),
        image.view(),
        [8, 8, 8],
        0.5,
        2,
        WindowPadding::Constant,
    )
    .unwrap();
    let labels = argmax_labels(logits.view());
    for ((z, y, x), &l) in labels.indexed_iter() {
        let lane = logits.slice(ndarray::s![.., z, y, x]);
        let best = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(lane[usize::from(l)], best);
    }
}
