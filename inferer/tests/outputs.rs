//! Label statistics and the preview PNG, decoded and checked pixel by pixel, including
//! its radiological orientation.

use ndarray::Array3;
use radflow_inferer::outputs::{LabelStat, label_stats, preview_png};
use radflow_shared::models::{ModelSpec, Normalization, Registry, parse_color};
use radflow_volume::{Grid, Volume};

fn demo_spec() -> ModelSpec {
    Registry::builtin().find("demo-tissue").unwrap().clone()
}

fn grid(dims: [usize; 3], diag: [f64; 3]) -> Grid {
    Grid {
        dims,
        affine: [
            [diag[0], 0.0, 0.0, 0.0],
            [0.0, diag[1], 0.0, 0.0],
            [0.0, 0.0, diag[2], 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    }
}

fn decode(png_bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

fn color(spec: &ModelSpec, index: u8) -> [u8; 3] {
    parse_color(&spec.labels.iter().find(|l| l.index == index).unwrap().color).unwrap()
}

fn blend(c: [u8; 3], grey: u8) -> [u8; 3] {
    c.map(|c| (u16::from(c) + u16::from(grey)).div_ceil(2) as u8)
}

/// A 40 × 30 × 20 volume (i, j, k) of grey 0.5 with three label blocks, each visible
/// in exactly one of the centre slices.
fn labelled(diag: [f64; 3]) -> (Volume<f32>, Volume<u8>) {
    let g = grid([40, 30, 20], diag);
    let image = Volume::new(g.clone(), Array3::from_elem((20, 30, 40), 0.5f32)).unwrap();
    let labels = Array3::from_shape_fn((20, 30, 40), |(k, j, i)| {
        if i >= 30 && j >= 20 {
            1 // fat: high i, high j — in the axial slice k = 10
        } else if k >= 15 && i < 5 {
            3 // bone: high k, low i — in the coronal slice j = 15
        } else if j < 5 && k < 4 {
            2 // soft tissue: low j, low k — in the sagittal slice i = 20
        } else {
            0
        }
    });
    (image, Volume::new(g, labels).unwrap())
}

/// Checks every pixel of the three panels against `expected(panel, x, y)` and that the
/// gaps and the space under short panels are black.
fn check_pixels(
    png_bytes: &[u8],
    sizes: [(usize, usize); 3],
    expected: impl Fn(usize, usize, usize) -> [u8; 3],
) {
    let (width, height, rgb) = decode(png_bytes);
    assert_eq!(width, sizes.iter().map(|s| s.0).sum::<usize>() + 8);
    assert_eq!(height, sizes.iter().map(|s| s.1).max().unwrap());
    let pixel = |x: usize, y: usize| -> [u8; 3] {
        let o = (y * width + x) * 3;
        [rgb[o], rgb[o + 1], rgb[o + 2]]
    };
    let mut x0 = 0;
    for (p, &(w, h)) in sizes.iter().enumerate() {
        for y in 0..height {
            for x in 0..w {
                let want = if y < h { expected(p, x, y) } else { [0, 0, 0] };
                assert_eq!(pixel(x0 + x, y), want, "panel {p} at ({x}, {y})");
            }
            if p < 2 {
                for gap in 0..4 {
                    assert_eq!(pixel(x0 + w + gap, y), [0, 0, 0], "gap after panel {p}");
                }
            }
        }
        x0 += w + 4;
    }
}

#[test]
fn preview_shows_each_label_where_it_is_in_radiological_orientation() {
    let spec = demo_spec();
    let (image, labels) = labelled([1.0, 1.0, 1.0]); // i → right, j → anterior, k → superior
    let png_bytes = preview_png(&image, &labels, &spec);
    let grey = 128; // 0.5 in the CT window [0, 1]
    let (fat, soft, bone) = (color(&spec, 1), color(&spec, 2), color(&spec, 3));
    check_pixels(&png_bytes, [(40, 30), (40, 20), (30, 20)], |panel, x, y| {
        let hit = match panel {
            // Axial: patient right (high i) on the image left, anterior (high j) up.
            0 => (x < 10 && y < 10).then_some(fat),
            // Coronal: patient left (low i) on the image right, superior (high k) up.
            1 => (x >= 35 && y < 5).then_some(bone),
            // Sagittal: anterior on the left, so posterior (low j) right; inferior down.
            _ => (x >= 25 && y >= 16).then_some(soft),
        };
        hit.map_or([grey; 3], |c| blend(c, grey))
    });
}

#[test]
fn preview_follows_the_affine_not_the_array_order() {
    // Same data, but i now points to the patient's left and j to posterior (LPS-like
    // voxel axes): the fat block is on the patient's left and posterior, so it must
    // show on the right of the axial panel and at its bottom.
    let spec = demo_spec();
    let (image, labels) = labelled([-1.0, -1.0, 1.0]);
    let png_bytes = preview_png(&image, &labels, &spec);
    let grey = 128;
    let (fat, soft, bone) = (color(&spec, 1), color(&spec, 2), color(&spec, 3));
    check_pixels(&png_bytes, [(40, 30), (40, 20), (30, 20)], |panel, x, y| {
        let hit = match panel {
            0 => (x >= 30 && y >= 20).then_some(fat),
            1 => (x < 5 && y < 5).then_some(bone),
            _ => (x < 5 && y >= 16).then_some(soft),
        };
        hit.map_or([grey; 3], |c| blend(c, grey))
    });
}

#[test]
fn anisotropic_voxels_are_shown_with_square_pixels() {
    let spec = demo_spec();
    let (image, labels) = labelled([1.0, 1.0, 2.0]); // 2 mm slices
    let (width, height, _) = decode(&preview_png(&image, &labels, &spec));
    // Axial 40 × 30, coronal 40 × 40, sagittal 30 × 40 pixels of 1 mm.
    assert_eq!((width, height), (40 + 4 + 40 + 4 + 30, 40));
}

#[test]
fn unnormalised_images_are_windowed_to_their_percentiles() {
    let mut spec = demo_spec();
    spec.preset.normalization = Normalization::None;
    spec.labels.clear();
    let g = grid([40, 30, 20], [1.0, 1.0, 1.0]);
    // A ramp along i from −1000 to 2900: the axial panel's top row runs from the
    // highest value (patient right, image left) to the lowest.
    let image = Volume::new(
        g.clone(),
        Array3::from_shape_fn((20, 30, 40), |(_, _, i)| -1000.0 + 100.0 * i as f32),
    )
    .unwrap();
    let labels = Volume::new(g, Array3::zeros((20, 30, 40))).unwrap();
    let (width, _, rgb) = decode(&preview_png(&image, &labels, &spec));
    assert_eq!(&rgb[0..3], &[255, 255, 255]);
    assert_eq!(&rgb[39 * 3..40 * 3], &[0, 0, 0]);
    let middle = rgb[20 * 3];
    assert!((100..160).contains(&middle), "{middle}");
    assert_eq!(width, 118);
}

#[test]
fn label_stats_count_voxels_and_millilitres() {
    let spec = demo_spec();
    // 0.5 × 0.5 × 2 mm = 0.5 mm³ per voxel.
    let g = grid([10, 10, 10], [0.5, 0.5, 2.0]);
    let data = Array3::from_shape_fn((10, 10, 10), |(k, _, _)| match k {
        0..=1 => 1u8,
        2 => 3,
        9 => 7,
        _ => 0,
    });
    let stats = label_stats(&Volume::new(g, data).unwrap(), &spec);
    let expect = |index: u8, name: &str, voxels: u64| LabelStat {
        index,
        name: name.into(),
        voxels,
        volume_ml: voxels as f64 * 0.5 / 1000.0,
    };
    assert_eq!(
        stats,
        vec![
            expect(0, "air", 600),
            expect(1, "fat", 200),
            expect(2, "soft_tissue", 0),
            expect(3, "bone", 100),
            expect(7, "label_7", 100),
        ]
    );
    let json = serde_json::to_value(&stats[1]).unwrap();
    assert_eq!(json["name"], "fat");
    assert_eq!(json["volume_ml"], 0.1);
}

/// A label volume with a value that changes along every axis.
fn ramp(g: &Grid) -> Volume<u8> {
    let [nx, ny, nz] = g.dims;
    let data = Array3::from_shape_fn((nz, ny, nx), |(k, j, i)| {
        ((i * 7 + j * 3 + k * 5) % 11) as u8
    });
    Volume::new(g.clone(), data).unwrap()
}

#[test]
fn labels_on_grid_equals_the_nearest_resampler_and_counts_the_labels() {
    use radflow_inferer::outputs::labels_on_grid;
    use radflow_volume::resample::resample_nearest;

    let src = Grid {
        dims: [31, 27, 19],
        affine: [
            [-1.5, 0.0, 0.0, 40.0],
            [0.0, -1.5, 0.0, 30.0],
            [0.0, 0.0, 1.5, -180.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    let labels = ramp(&src);
    let mut targets = vec![
        // A finer source grid of the same orientation, as from the preprocessor.
        Grid {
            dims: [66, 58, 28],
            affine: [
                [-0.703125, 0.0, 0.0, 40.3],
                [0.0, -0.703125, 0.0, 30.2],
                [0.0, 0.0, 1.0, -180.25],
                [0.0, 0.0, 0.0, 1.0],
            ],
        },
        // Axes permuted and flipped (another orientation of the same space), and
        // reaching past the source (clamped).
        Grid {
            dims: [20, 35, 40],
            affine: [
                [0.0, 0.0, -1.2, 44.0],
                [0.0, 1.3, 0.0, -12.0],
                [-1.1, 0.0, 0.0, -150.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        },
    ];
    // An oblique grid: the general resampler.
    let (c, s) = (0.3f64.cos(), 0.3f64.sin());
    targets.push(Grid {
        dims: [25, 25, 15],
        affine: [
            [-c, -s, 0.0, 30.0],
            [-s, c, 0.0, 10.0],
            [0.0, 0.0, 1.7, -178.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    });
    for target in targets {
        let (moved, counts) = labels_on_grid(&labels, &target);
        let expected = resample_nearest(&labels, &target);
        assert_eq!(moved.grid, expected.grid);
        assert_eq!(moved.data, expected.data, "{target:?}");
        let mut direct = [0u64; 256];
        for &l in &expected.data {
            direct[usize::from(l)] += 1;
        }
        assert_eq!(counts, direct);
        assert!(counts.iter().filter(|&&n| n > 0).count() > 5);
    }
}
