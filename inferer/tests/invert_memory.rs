//! Linear inversion is bounded in memory: moving four classes' probabilities onto a
//! 512×512×300 source grid holds the `u8` label map of that grid (79 MB) and a row per
//! thread, never one `f32` volume per class (1.26 GB); a fractional SEG's three
//! segments add one byte each per source voxel (236 MB), not four.
//!
//! The peak resident size is Linux's high-water mark (`VmHWM`), reset through
//! `/proc/self/clear_refs` just before the call. Alone in its test binary so that no
//! other test's allocations are measured.

use ndarray::Array4;
use radflow_inferer::outputs::probabilities_on_grid;
use radflow_volume::Grid;

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// The peak resident memory of `f` above what the process held before, in MiB.
fn peak_mib<T>(f: impl FnOnce() -> T) -> (T, u64) {
    std::fs::write("/proc/self/clear_refs", "5").expect("the peak RSS can be reset");
    let before = status_kb("VmRSS:");
    let out = f();
    let peak = status_kb("VmHWM:");
    (out, peak.saturating_sub(before) >> 10)
}

#[test]
fn a_512_by_512_by_300_source_does_not_hold_a_volume_per_class() {
    // A 1.5 mm model grid over a 0.7 × 0.7 × 1 mm source of 512 × 512 × 300.
    let source = Grid {
        dims: [512, 512, 300],
        affine: [
            [-0.7, 0.0, 0.0, 0.0],
            [0.0, -0.7, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    let model = radflow_volume::resample::grid_with_spacing(&source, [1.5, 1.5, 1.5]);
    let [nx, ny, nz] = model.dims;
    let probabilities = Array4::from_shape_fn((4, nz, ny, nx), |(c, k, j, i)| {
        let v = ((i * 3 + j * 5 + k * 7 + c * 11) % 17) as f32;
        v / 16.0
    });
    let labels_mib = (source.len() >> 20) as u64;

    let (moved, peak) =
        peak_mib(|| probabilities_on_grid(probabilities.view(), &model, &source, true, &[]));
    let (labels, counts) = moved.labels.unwrap();
    assert_eq!(counts.iter().sum::<u64>(), source.len() as u64);
    drop(labels);
    eprintln!("labels only: peak {peak} MiB above the start ({labels_mib} MiB of labels)");
    assert!(
        peak < labels_mib + 48,
        "labels only: {peak} MiB at the peak for {labels_mib} MiB of labels"
    );

    let (moved, peak) =
        peak_mib(|| probabilities_on_grid(probabilities.view(), &model, &source, true, &[1, 2, 3]));
    let fractions = moved.fractions.unwrap();
    assert_eq!(fractions.dim(), (3, 300, 512, 512));
    drop(moved.labels);
    drop(fractions);
    eprintln!("labels and 3 fractions: peak {peak} MiB above the start");
    assert!(
        peak < 4 * labels_mib + 48,
        "labels and fractions: {peak} MiB at the peak for {} MiB of output",
        4 * labels_mib
    );
}
