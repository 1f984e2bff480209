//! What a segmentation becomes for people: per-label volumes and a preview image.
//!
//! `summary.json` reports each label's voxel count and volume in millilitres (the
//! number a clinician or a QA dashboard reads), and `preview.png` shows axial, coronal
//! and sagittal slices through the volume centre with the labels overlaid, so an
//! operator can see at a glance whether a result is plausible without a DICOM viewer.
//! Slices are oriented for radiological reading: patient left on the image right,
//! anterior up (axial), superior up (coronal, sagittal), anterior left (sagittal).
//!
//! The result is brought from the model's grid onto the source series' grid either as
//! a label map, by nearest neighbour ([`labels_on_grid`]), or as per-class
//! probabilities, trilinearly ([`probabilities_on_grid`]: the label of a source voxel
//! is then its most probable class there, and a fractional SEG gets the probabilities
//! themselves).

use std::collections::BTreeMap;

use ndarray::{Array4, ArrayView4, Axis};
use rayon::prelude::*;

use radflow_shared::models::{Activation, ModelSpec, Normalization, parse_color};
use radflow_volume::resample::LinearSampler;
use radflow_volume::{Grid, Volume};
use serde::{Deserialize, Serialize};

/// Size of one label in a label map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelStat {
    /// Label value in the label map.
    pub index: u8,
    /// Name from the registry, or `label_<index>` for a value the registry does not list.
    pub name: String,
    /// Number of voxels with this label.
    pub voxels: u64,
    /// Physical volume in millilitres (voxels × voxel volume).
    pub volume_ml: f64,
}

/// Voxel count and volume of every label the model lists (in registry order, zero when
/// absent), followed by any other value found in the map.
pub fn label_stats(labels: &Volume<u8>, spec: &ModelSpec) -> Vec<LabelStat> {
    let mut counts = [0u64; 256];
    for &l in &labels.data {
        counts[usize::from(l)] += 1;
    }
    stats_from_counts(&counts, &labels.grid, spec)
}

/// [`label_stats`] from the voxel count of every label value on `grid`.
pub fn stats_from_counts(counts: &[u64; 256], grid: &Grid, spec: &ModelSpec) -> Vec<LabelStat> {
    let ml_per_voxel = grid.voxel_volume_mm3() / 1000.0;
    let stat = |index: u8, name: String| LabelStat {
        index,
        name,
        voxels: counts[usize::from(index)],
        volume_ml: counts[usize::from(index)] as f64 * ml_per_voxel,
    };
    let mut stats: Vec<LabelStat> = spec
        .labels
        .iter()
        .map(|l| stat(l.index, l.name.clone()))
        .collect();
    for index in 0..=u8::MAX {
        if counts[usize::from(index)] > 0 && !spec.labels.iter().any(|l| l.index == index) {
            stats.push(stat(index, format!("label_{index}")));
        }
    }
    stats
}

/// The label map moved onto `target` by nearest neighbour, exactly as
/// `radflow_volume::resample::resample_nearest` does it, and the voxel count of
/// every label value there.
///
/// A model grid and its source grid usually differ only by spacing (and perhaps by
/// axis order and direction): each target axis then reads one source axis, and the
/// source index along it depends on that target index alone. For such grids the
/// indices are computed once per axis and the map is a gather, counted as it is
/// written, one plane per thread; other grids use the general resampler.
pub fn labels_on_grid(labels: &Volume<u8>, target: &Grid) -> (Volume<u8>, [u64; 256]) {
    let Some(tables) = axis_tables(&labels.grid, target) else {
        let moved = radflow_volume::resample::resample_nearest(labels, target);
        let mut counts = [0u64; 256];
        for &l in &moved.data {
            counts[usize::from(l)] += 1;
        }
        return (moved, counts);
    };
    let source = labels.data.as_standard_layout();
    let source = source.as_slice().expect("standard layout is contiguous");
    let [tx, ty, tz] = target.dims;
    let mut out = vec![0u8; tx * ty * tz];
    let plane = tx * ty;
    // Target planes that read the same source plane are equal (a thin-slice series
    // under a coarser model grid): each run of them is filled once and copied.
    let mut runs: Vec<(usize, &mut [u8])> = Vec::new();
    let mut rest = out.as_mut_slice();
    let mut k = 0;
    while k < tz {
        let n = tables[2][k..]
            .iter()
            .take_while(|&&z| z == tables[2][k])
            .count();
        let (run, tail) = rest.split_at_mut(n * plane);
        runs.push((tables[2][k], run));
        rest = tail;
        k += n;
    }
    let counts = runs
        .into_par_iter()
        .map(|(zk, run)| {
            let (first, copies) = run.split_at_mut(plane);
            let mut counts = fill_plane(first, source, zk, &tables[1], &tables[0]);
            let repeats = (copies.len() / plane.max(1)) as u64;
            for copy in copies.chunks_exact_mut(plane.max(1)) {
                copy.copy_from_slice(first);
            }
            for c in &mut counts {
                *c *= repeats + 1;
            }
            counts
        })
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
                a
            },
        );
    let data = ndarray::Array3::from_shape_vec((tz, ty, tx), out).expect("target-sized buffer");
    let moved = Volume {
        grid: target.clone(),
        data,
    };
    (moved, counts)
}

/// Turns a model's blended scores `[C, Z, Y, X]` into probabilities in place: softmax
/// over the channels of each voxel, a sigmoid per value, or (`none`) the scores as
/// they are. One z-plane per thread.
pub fn activate(scores: &mut Array4<f32>, activation: Activation) {
    match activation {
        Activation::None => {}
        Activation::Sigmoid => {
            let sigmoid = |v: &mut f32| *v = 1.0 / (1.0 + (-*v).exp());
            match scores.as_slice_mut() {
                Some(all) => all
                    .par_chunks_mut(1 << 16)
                    .for_each(|c| c.iter_mut().for_each(sigmoid)),
                None => scores.iter_mut().for_each(sigmoid),
            }
        }
        Activation::Softmax => {
            let planes: Vec<_> = scores.axis_iter_mut(Axis(1)).collect();
            planes.into_par_iter().for_each(|mut plane| {
                for mut lane in plane.lanes_mut(Axis(0)) {
                    let max = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for v in lane.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    for v in lane.iter_mut() {
                        *v /= sum;
                    }
                }
            });
        }
    }
}

/// What [`probabilities_on_grid`] produced on the target grid.
pub struct OnGrid {
    /// The label of every voxel and the voxel count of every label value, when asked.
    pub labels: Option<(Volume<u8>, [u64; 256])>,
    /// `(segments, slices, rows, columns)`: the 8-bit fraction
    /// ([`radflow_results::seg::fraction`]) of the probability of each channel asked
    /// for, in the order asked; held slice-major in memory. `None` when none was asked.
    pub fractions: Option<Array4<u8>>,
}

/// Per-class probabilities `[C, Z, Y, X]` on `grid` moved onto `target` by trilinear
/// interpolation (as `radflow_volume::resample::resample_linear` does it: edge values
/// extend outward), one target plane per thread and one row at a time, so that no
/// class is ever held on the target grid in `f32`.
///
/// With `labels`, every target voxel gets the class with the largest interpolated
/// probability (the lowest index of equal ones; NaN never wins), counted as it is
/// written. For each channel in `fractions` the interpolated probability is kept as
/// its 8-bit fraction: `fractions.len()` bytes per target voxel, the only memory
/// beyond the label map that grows with the target grid.
///
/// # Panics
/// If `probabilities` is not on `grid`, has more than 256 channels, or `fractions`
/// names a channel it does not have.
pub fn probabilities_on_grid(
    probabilities: ArrayView4<f32>,
    grid: &Grid,
    target: &Grid,
    labels: bool,
    fractions: &[usize],
) -> OnGrid {
    let (c, d, h, w) = probabilities.dim();
    assert_eq!(
        (d, h, w),
        grid.shape(),
        "the probabilities are not on the grid"
    );
    assert!(c <= 256, "{c} output channels do not fit u8 labels");
    assert!(
        fractions.iter().all(|&ch| ch < c),
        "fractions {fractions:?} of {c} channels"
    );
    let src = probabilities.as_standard_layout();
    let all = src.as_slice().expect("standard layout is contiguous");
    let voxels = d * h * w;
    let sampler = LinearSampler::new(grid, target);
    let [tx, ty, tz] = target.dims;
    let plane = tx * ty;
    let segments = fractions.len();

    let mut label_data = vec![0u8; if labels { target.len() } else { 0 }];
    let mut fraction_data = vec![0u8; tz * segments * plane];
    let empty = |n: usize| -> Vec<&mut [u8]> { (0..n).map(|_| Default::default()).collect() };
    let label_planes = if labels && plane > 0 {
        label_data.chunks_mut(plane).collect()
    } else {
        empty(tz)
    };
    let fraction_planes = if segments > 0 && plane > 0 {
        fraction_data.chunks_mut(segments * plane).collect()
    } else {
        empty(tz)
    };
    // For each channel, where its fractions go (if anywhere).
    let segment_of: Vec<Option<usize>> = (0..c)
        .map(|ch| fractions.iter().position(|&f| f == ch))
        .collect();

    let counts = label_planes
        .into_par_iter()
        .zip(fraction_planes)
        .enumerate()
        .map(|(k, (label_plane, fraction_plane))| {
            let mut counts = [0u64; 256];
            let mut value = vec![0f32; tx];
            let mut best = vec![f32::NEG_INFINITY; tx];
            for j in 0..ty {
                let mut row = labels.then(|| &mut label_plane[j * tx..(j + 1) * tx]);
                best.fill(f32::NEG_INFINITY);
                for (ch, segment) in segment_of.iter().enumerate() {
                    if row.is_none() && segment.is_none() {
                        continue;
                    }
                    sampler.row(&all[ch * voxels..(ch + 1) * voxels], j, k, &mut value);
                    if let Some(s) = *segment {
                        let out = &mut fraction_plane[(s * ty + j) * tx..][..tx];
                        for (f, &p) in out.iter_mut().zip(&value) {
                            *f = radflow_results::seg::fraction(p);
                        }
                    }
                    if let Some(row) = row.as_deref_mut() {
                        for ((label, best), &p) in row.iter_mut().zip(best.iter_mut()).zip(&value) {
                            if p > *best {
                                *best = p;
                                *label = ch as u8;
                            }
                        }
                    }
                }
                if let Some(row) = row {
                    for &l in row.iter() {
                        counts[usize::from(l)] += 1;
                    }
                }
            }
            counts
        })
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
                a
            },
        );
    OnGrid {
        labels: labels.then(|| {
            let data = ndarray::Array3::from_shape_vec((tz, ty, tx), label_data)
                .expect("target-sized buffer");
            (
                Volume {
                    grid: target.clone(),
                    data,
                },
                counts,
            )
        }),
        fractions: (segments > 0).then(|| {
            Array4::from_shape_vec((tz, segments, ty, tx), fraction_data)
                .expect("target-sized buffer")
                .permuted_axes([1, 0, 2, 3])
        }),
    }
}

/// Fills one target plane from the source plane at offset `zk` (rows at `rows`,
/// columns at `columns`) and counts its labels. Rows that read the same source row
/// are copied and counted once.
fn fill_plane(
    plane: &mut [u8],
    source: &[u8],
    zk: usize,
    rows: &[usize],
    columns: &[usize],
) -> [u64; 256] {
    let tx = columns.len();
    let mut counts = [0u64; 256];
    if tx == 0 {
        return counts;
    }
    // Four interleaved histograms: consecutive equal labels do not wait on each
    // other's increment. A plane holds at most 32767² voxels, within `u32`.
    let mut h = [[0u32; 256]; 4];
    let mut j = 0;
    while j < rows.len() {
        let n = rows[j..].iter().take_while(|&&y| y == rows[j]).count();
        let (run, _) = plane[j * tx..].split_at_mut(n * tx);
        let (row, copies) = run.split_at_mut(tx);
        let from = &source[zk + rows[j]..];
        for (v, &xi) in row.iter_mut().zip(columns) {
            *v = from[xi];
        }
        for copy in copies.chunks_exact_mut(tx) {
            copy.copy_from_slice(row);
        }
        // The row stands for its `n` copies.
        let times = n as u32;
        let mut quads = row.chunks_exact(4);
        for q in &mut quads {
            h[0][usize::from(q[0])] += times;
            h[1][usize::from(q[1])] += times;
            h[2][usize::from(q[2])] += times;
            h[3][usize::from(q[3])] += times;
        }
        for &l in quads.remainder() {
            h[0][usize::from(l)] += times;
        }
        j += n;
    }
    for (l, c) in counts.iter_mut().enumerate() {
        *c = h.iter().map(|h| u64::from(h[l])).sum();
    }
    counts
}

/// For each target axis, the source offset (in elements) of each of its indices, when
/// every source axis follows exactly one target axis; `None` otherwise.
fn axis_tables(src: &Grid, target: &Grid) -> Option<[Vec<usize>; 3]> {
    let inv = src.inverse_affine()?;
    let t = &target.affine;
    // m = inv(src) · target: target index → source continuous index.
    let m: [[f64; 4]; 3] =
        std::array::from_fn(|r| std::array::from_fn(|c| (0..4).map(|k| inv[r][k] * t[k][c]).sum()));
    // Source axis a reads target axis follows[a]; every other coefficient must be
    // negligible over the whole grid (far below the 1e-6 voxel the resampler snaps).
    let mut follows = [usize::MAX; 3];
    for (row, follow) in m.iter().zip(&mut follows) {
        let mut moving = (0..3).filter(|&c| row[c].abs() * target.dims[c] as f64 > 1e-9);
        *follow = moving.next()?;
        if moving.next().is_some() {
            return None;
        }
    }
    if (0..3).any(|c| follows.iter().filter(|&&f| f == c).count() != 1) {
        return None;
    }
    let [nx, ny, _] = src.dims;
    let stride = [1, nx, nx * ny];
    let mut tables: [Vec<usize>; 3] = Default::default();
    for a in 0..3 {
        let c = follows[a];
        tables[c] = (0..target.dims[c])
            .map(|t| nearest(m[a][3] + t as f64 * m[a][c], src.dims[a]) * stride[a])
            .collect();
    }
    Some(tables)
}

/// The resampler's nearest index: coordinates within 1e-6 of an integer snap to it,
/// then round half away from zero, clamped into the axis.
fn nearest(c: f64, n: usize) -> usize {
    let r = c.round();
    let c = if (c - r).abs() < 1e-6 { r } else { c };
    c.round().clamp(0.0, (n - 1) as f64) as usize
}

/// Gap between the three panels, in pixels.
const PANEL_GAP: usize = 4;
/// Longest side of one panel, in pixels; larger volumes are shown coarser.
const MAX_PANEL: f64 = 768.0;

/// A PNG (8-bit RGB) of three slices through the volume centre, left to right: axial,
/// coronal, sagittal, top-aligned on black, `4` pixels apart, with square pixels of
/// the volume's smallest voxel spacing (coarser only when a panel would exceed 768
/// pixels). The grey image is windowed to `[0, 1]` when the preset normalised it to
/// that range (CT window, percentile), else to its 1st–99th percentile. Labels are
/// blended over it at 50% in their registry colours; label 0, black colours and values
/// the registry does not list are not drawn.
///
/// # Panics
/// If `image` and `labels` do not have the same shape.
pub fn preview_png(image: &Volume<f32>, labels: &Volume<u8>, spec: &ModelSpec) -> Vec<u8> {
    assert_eq!(
        image.data.dim(),
        labels.data.dim(),
        "the preview's image and label map must share a grid"
    );
    let (lo, hi) = match spec.preset.normalization {
        Normalization::CtWindow { .. } | Normalization::Percentile { .. } => (0.0, 1.0),
        Normalization::Zscore { .. } | Normalization::None => percentile_window(image),
    };
    let mut colors: BTreeMap<u8, [u8; 3]> = BTreeMap::new();
    for l in &spec.labels {
        if let Some(c) = parse_color(&l.color)
            && l.index != 0
            && c != [0, 0, 0]
        {
            colors.insert(l.index, c);
        }
    }

    let panels = views(&image.grid).map(|view| {
        render(&view, |ijk| {
            let (i, j, k) = (ijk[0], ijk[1], ijk[2]);
            let v = image.data[[k, j, i]];
            let t = if v.is_finite() {
                ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let grey = (t * 255.0).round() as u8;
            match colors.get(&labels.data[[k, j, i]]) {
                Some(c) => c.map(|c| (u16::from(c) + u16::from(grey)).div_ceil(2) as u8),
                None => [grey; 3],
            }
        })
    });

    let width = panels.iter().map(|p| p.width).sum::<usize>() + 2 * PANEL_GAP;
    let height = panels.iter().map(|p| p.height).max().unwrap_or(1);
    let mut rgb = vec![0u8; width * height * 3];
    let mut x0 = 0;
    for panel in &panels {
        for y in 0..panel.height {
            let src = &panel.rgb[y * panel.width * 3..(y + 1) * panel.width * 3];
            let start = (y * width + x0) * 3;
            rgb[start..start + src.len()].copy_from_slice(src);
        }
        x0 += panel.width + PANEL_GAP;
    }
    encode_png(&rgb, width, height)
}

/// The 1st and 99th percentile of the finite values (on at most ~1M samples).
fn percentile_window(image: &Volume<f32>) -> (f32, f32) {
    let step = (image.data.len() / 1_000_000).max(1);
    let mut values: Vec<f32> = image
        .data
        .iter()
        .step_by(step)
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    if values.is_empty() {
        return (0.0, 1.0);
    }
    let mut at = |q: f64| {
        let idx = ((values.len() - 1) as f64 * q).round() as usize;
        *values.select_nth_unstable_by(idx, f32::total_cmp).1
    };
    let (lo, hi) = (at(0.01), at(0.99));
    if hi > lo { (lo, hi) } else { (lo, lo + 1.0) }
}

/// One panel: which voxel axis runs along the screen's columns and rows, and in which
/// direction, and the fixed index of the third axis.
struct View {
    /// Voxel axis (0 = i, 1 = j, 2 = k) along screen columns, and whether the voxel
    /// index decreases as the column increases.
    col: (usize, bool),
    /// Same for screen rows (downwards).
    row: (usize, bool),
    /// The slice: voxel axis and index.
    fixed: (usize, usize),
    dims: [usize; 3],
    spacing: [f64; 3],
    /// Millimetres per screen pixel.
    pixel_mm: f64,
}

/// The axial, coronal and sagittal views of a grid.
fn views(grid: &Grid) -> [View; 3] {
    let axes = world_axes(grid);
    let spacing = grid.spacing();
    let extent = (0..3)
        .map(|a| grid.dims[a] as f64 * spacing[a])
        .fold(0.0, f64::max);
    let pixel_mm = spacing
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(extent / MAX_PANEL);
    // World axes 0 = R, 1 = A, 2 = S. Screen columns go towards the patient's left
    // (−R) or posterior (−A); rows go down towards posterior (−A) or inferior (−S).
    let view = |col_world: usize, row_world: usize, fixed_world: usize| {
        let (col_axis, col_sign) = axes[col_world];
        let (row_axis, row_sign) = axes[row_world];
        let fixed_axis = axes[fixed_world].0;
        View {
            // Screen moves towards the negative world direction, so the index runs
            // backwards where the voxel axis points towards the positive one.
            col: (col_axis, col_sign > 0.0),
            row: (row_axis, row_sign > 0.0),
            fixed: (fixed_axis, grid.dims[fixed_axis] / 2),
            dims: grid.dims,
            spacing,
            pixel_mm,
        }
    };
    [view(0, 1, 2), view(0, 2, 1), view(1, 2, 0)]
}

/// For each world axis (R, A, S): the voxel axis closest to it and the sign of that
/// voxel axis's component along it. Axes are paired greedily from the largest
/// component down, so every voxel axis is used once even on oblique grids.
fn world_axes(grid: &Grid) -> [(usize, f64); 3] {
    let a = &grid.affine;
    let mut pairs: Vec<(f64, usize, usize)> = (0..3)
        .flat_map(|w| (0..3).map(move |v| (a[w][v].abs(), w, v)))
        .collect();
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut out = [(usize::MAX, 1.0); 3];
    let mut used = [false; 3];
    for (_, w, v) in pairs {
        if out[w].0 == usize::MAX && !used[v] {
            let sign = if a[w][v] < 0.0 { -1.0 } else { 1.0 };
            out[w] = (v, sign);
            used[v] = true;
        }
    }
    out
}

struct Panel {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

fn render(view: &View, mut pixel: impl FnMut([usize; 3]) -> [u8; 3]) -> Panel {
    let screen_len = |axis: usize| {
        ((view.dims[axis] as f64 * view.spacing[axis] / view.pixel_mm).round() as usize).max(1)
    };
    let index = |axis: usize, reversed: bool, p: usize| {
        let n = view.dims[axis];
        let i = (((p as f64 + 0.5) * view.pixel_mm / view.spacing[axis]) as usize).min(n - 1);
        if reversed { n - 1 - i } else { i }
    };
    let (width, height) = (screen_len(view.col.0), screen_len(view.row.0));
    let mut rgb = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let mut ijk = [0; 3];
            ijk[view.fixed.0] = view.fixed.1;
            ijk[view.col.0] = index(view.col.0, view.col.1, x);
            ijk[view.row.0] = index(view.row.0, view.row.1, y);
            rgb.extend_from_slice(&pixel(ijk));
        }
    }
    Panel { width, height, rgb }
}

fn encode_png(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Writing a well-formed RGB buffer into memory cannot fail: width and height are
    // at least 1 and the buffer has exactly width × height × 3 bytes.
    let mut writer = encoder
        .write_header()
        .expect("PNG header for a non-empty image");
    writer
        .write_image_data(rgb)
        .expect("PNG data of the declared size");
    writer.finish().expect("PNG end into memory");
    out
}
