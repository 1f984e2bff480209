//! A 3D U-Net-shaped model with random weights (fixed seed), generated here by
//! `scripts/make_unet_model.py`, through the real ONNX Runtime library: radflow's
//! outputs must equal Python onnxruntime's on the same input within 1e-5, for a single
//! batch and for the whole sliding window, in float32 and float16, in the NCDHW and
//! channels-last layouts, and for the classification variant.

mod common;

use ndarray::{Array3, Array5, Axis};
use radflow_inferer::session::{ExecutionConfig, ModelError, Provider, ProviderRequest, load};
use radflow_inferer::sliding_window::{WindowSettings, run_windows, window_count};
use radflow_shared::models::{ModelKind, TensorDtype, TensorLayout, WindowPadding};
use serde_json::json;

use common::{
    generate_model, generated_spec, max_abs_diff, random_values, run_reference, small_model_args,
    tiny_classifier,
};

/// The U-Net of these tests: small enough for CI (see [`small_model_args`]).
fn unet_args() -> Vec<&'static str> {
    small_model_args("11")
}

fn cpu() -> ExecutionConfig {
    radflow_inferer::runtime::init(None).unwrap_or_else(|e| panic!("{e}"));
    ExecutionConfig {
        provider: ProviderRequest::Cpu,
        intra_threads: Some(2),
        ..ExecutionConfig::default()
    }
}

#[test]
fn unet_batch_equals_python_onnxruntime() {
    let generated = generate_model("unet-batch", &unet_args());
    let spec = generated_spec(&generated, "unet", 3, [32, 32, 32], ModelKind::Segmentation);
    let bytes = std::fs::read(&generated.path).unwrap();
    let model = load(&spec, &bytes, &cpu()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.provider, Provider::Cpu);
    // Every Conv, InstanceNormalization, LeakyRelu, MaxPool, ConvTranspose, Concat ran
    // on the CPU provider during the profiled warm-up.
    assert!(
        model.placement["CPUExecutionProvider"] > 30,
        "{:?}",
        model.placement
    );

    let shape = (2, 1, 24, 32, 16);
    let values = random_values(5, 2 * 24 * 32 * 16, -1.0, 2.0);
    let input = Array5::from_shape_vec(shape, values.clone()).unwrap();
    let ours = model.run_batch(input.view()).unwrap();
    assert_eq!(ours.dim(), (2, 3, 24, 32, 16));
    let params = json!({"mode": "run", "shape": [2, 1, 24, 32, 16], "model": generated.path});
    let (ref_shape, reference) = run_reference("unet-run", params, &values);
    assert_eq!(ours.shape(), &ref_shape[..]);
    let diff = max_abs_diff(ours.as_slice().unwrap(), &reference);
    assert!(diff < 1e-5, "max |radflow − onnxruntime| = {diff}");
    // Not a constant: the comparison means something.
    let spread = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.5, "{spread}");
}

#[test]
fn unet_sliding_window_in_batches_equals_the_numpy_reference() {
    let generated = generate_model("unet-window", &unet_args());
    let mut spec = generated_spec(&generated, "unet", 3, [16, 16, 16], ModelKind::Segmentation);
    spec.batch_size = 4;
    let bytes = std::fs::read(&generated.path).unwrap();
    let model = load(&spec, &bytes, &cpu()).unwrap_or_else(|e| panic!("{e}"));

    let size = [21usize, 40, 30];
    let values = random_values(77, size.iter().product(), 0.0, 1.0);
    let image = Array3::from_shape_vec((size[0], size[1], size[2]), values.clone()).unwrap();
    let settings = WindowSettings {
        roi: [16, 16, 16],
        overlap: 0.25,
        batch_size: 4,
        padding: WindowPadding::Constant,
    };
    let before = model.counts();
    let (ours, stats) = run_windows(&model, image.view(), &settings).unwrap();
    let windows = window_count(size, settings.roi, settings.overlap);
    assert_eq!(stats.windows, windows);
    assert_eq!(stats.batches.len(), windows.div_ceil(4));
    assert_eq!(
        model.counts().runs - before.runs,
        windows.div_ceil(4) as u64
    );
    assert_eq!(model.counts().items - before.items, windows as u64);
    assert!(stats.run_time() > std::time::Duration::ZERO);

    let params = json!({
        "mode": "onnx", "shape": size, "roi": [16, 16, 16], "overlap": 0.25,
        "batch_size": 4, "model": generated.path,
    });
    let (ref_shape, reference) = run_reference("unet-window", params, &values);
    assert_eq!(ours.shape(), &ref_shape[..]);
    let ours: Vec<f32> = ours.iter().copied().collect();
    let diff = max_abs_diff(&ours, &reference);
    assert!(diff < 1e-5, "max |radflow − reference| = {diff}");
}

#[test]
fn a_model_with_a_fixed_batch_size_gets_full_batches() {
    // The same weights with N fixed to 3: 8 windows make batches of 3, 3 and 2 + 1
    // slot of zeros, and the result equals the dynamic model's.
    let fixed = generate_model(
        "unet-fixed",
        &[unet_args().as_slice(), &["--batch", "3"]].concat(),
    );
    let dynamic = generate_model("unet-dynamic", &unet_args());
    let mut spec = generated_spec(
        &fixed,
        "unet-fixed",
        3,
        [16, 16, 16],
        ModelKind::Segmentation,
    );
    spec.batch_size = 3;
    let model = load(&spec, &std::fs::read(&fixed.path).unwrap(), &cpu()).unwrap();
    assert!(model.fixed_batch());
    let mut dspec = generated_spec(&dynamic, "unet", 3, [16, 16, 16], ModelKind::Segmentation);
    dspec.batch_size = 3;
    let free = load(&dspec, &std::fs::read(&dynamic.path).unwrap(), &cpu()).unwrap();
    assert!(!free.fixed_batch());
    let values = random_values(13, 20 * 20 * 20, 0.0, 1.0);
    let image = Array3::from_shape_vec((20, 20, 20), values).unwrap();
    let settings = WindowSettings {
        roi: [16, 16, 16],
        overlap: 0.25,
        batch_size: 3,
        padding: WindowPadding::Constant,
    };
    let before = model.counts();
    let (a, stats) = run_windows(&model, image.view(), &settings).unwrap();
    let (b, _) = run_windows(&free, image.view(), &settings).unwrap();
    assert_eq!(stats.windows, 8);
    assert_eq!(
        model.counts().items - before.items,
        8,
        "padding slots are not counted"
    );
    let diff = max_abs_diff(a.as_slice().unwrap(), b.as_slice().unwrap());
    assert!(diff < 1e-5, "{diff}");
    // Declaring another batch size than the model's is refused on load.
    spec.batch_size = 2;
    let err = load(&spec, &std::fs::read(&fixed.path).unwrap(), &cpu()).unwrap_err();
    assert!(err.to_string().contains("batch 2"), "{err}");
}

#[test]
fn float16_and_channels_last_models_equal_python_onnxruntime() {
    let shape = (2usize, 16usize, 16usize, 24usize);
    let values = random_values(21, shape.0 * shape.1 * shape.2 * shape.3, 0.0, 1.0);
    let input =
        Array5::from_shape_vec((shape.0, 1, shape.1, shape.2, shape.3), values.clone()).unwrap();

    // float16 throughout: radflow converts in and out.
    let half = generate_model(
        "unet-f16",
        &[unet_args().as_slice(), &["--dtype", "float16"]].concat(),
    );
    let mut spec = generated_spec(&half, "unet-half", 3, [16, 16, 24], ModelKind::Segmentation);
    spec.dtype = TensorDtype::Float16;
    let bytes = std::fs::read(&half.path).unwrap();
    let model = load(&spec, &bytes, &cpu()).unwrap_or_else(|e| panic!("{e}"));
    let ours = model.run_batch(input.view()).unwrap();
    let params =
        json!({"mode": "run", "shape": [2, 1, 16, 16, 24], "model": half.path, "dtype": "float16"});
    let (_, reference) = run_reference("unet-f16", params, &values);
    let diff = max_abs_diff(ours.as_slice().unwrap(), &reference);
    assert!(diff < 1e-5, "float16: max |radflow − onnxruntime| = {diff}");

    // The registry must say float16 for a float16 model.
    spec.dtype = TensorDtype::Float32;
    let err = load(&spec, &bytes, &cpu()).unwrap_err();
    assert!(matches!(err, ModelError::TensorType { .. }), "{err}");
    assert!(err.to_string().contains("f16"), "{err}");

    // Channels last: radflow feeds [N, D, H, W, 1] and reads [N, D, H, W, C].
    let last = generate_model(
        "unet-ndhwc",
        &[unet_args().as_slice(), &["--layout", "ndhwc"]].concat(),
    );
    let mut spec = generated_spec(&last, "unet-last", 3, [16, 16, 24], ModelKind::Segmentation);
    spec.layout = TensorLayout::Ndhwc;
    let bytes = std::fs::read(&last.path).unwrap();
    let model = load(&spec, &bytes, &cpu()).unwrap_or_else(|e| panic!("{e}"));
    let ours = model.run_batch(input.view()).unwrap();
    assert_eq!(ours.dim(), (2, 3, 16, 16, 24));
    let params = json!({"mode": "run", "shape": [2, 16, 16, 24, 1], "model": last.path});
    let (ref_shape, reference) = run_reference("unet-ndhwc", params, &values);
    assert_eq!(ref_shape, vec![2, 16, 16, 24, 3]);
    let ours_last: Vec<f32> = ours
        .permuted_axes([0, 2, 3, 4, 1])
        .iter()
        .copied()
        .collect();
    let diff = max_abs_diff(&ours_last, &reference);
    assert!(diff < 1e-5, "NDHWC: max |radflow − onnxruntime| = {diff}");

    // The same model declared NCDHW does not fit: its input has 24 where a channel
    // count of 1 belongs.
    spec.layout = TensorLayout::Ncdhw;
    spec.patch = [16, 24, 1];
    assert!(load(&spec, &bytes, &cpu()).is_err());
}

#[test]
fn classifier_scores_equal_python_onnxruntime_and_batches_are_independent() {
    let (generated, mut spec) = tiny_classifier("classifier", "cls", "3");
    spec.batch_size = 3;
    let bytes = std::fs::read(&generated.path).unwrap();
    let model = load(&spec, &bytes, &cpu()).unwrap_or_else(|e| panic!("{e}"));
    let values = random_values(8, 3 * 16 * 16 * 16, 0.0, 1.0);
    let input = Array5::from_shape_vec((3, 1, 16, 16, 16), values.clone()).unwrap();
    let (scores, _) = model.run_scores(input.view()).unwrap();
    assert_eq!(scores.dim(), (3, 3));
    let params = json!({"mode": "run", "shape": [3, 1, 16, 16, 16], "model": generated.path});
    let (_, reference) = run_reference("classifier", params, &values);
    let diff = max_abs_diff(scores.as_slice().unwrap(), &reference);
    assert!(diff < 1e-5, "max |radflow − onnxruntime| = {diff}");
    // Each row is what that volume gives alone.
    for (i, row) in scores.axis_iter(Axis(0)).enumerate() {
        let alone = model
            .run_scores(input.slice(ndarray::s![i..i + 1, .., .., .., ..]))
            .unwrap()
            .0;
        let diff = max_abs_diff(row.as_slice().unwrap(), alone.as_slice().unwrap());
        assert!(diff < 1e-6, "row {i}: {diff}");
    }

    // A segmentation entry for a classifier is refused on load: its output is [N, C].
    spec.kind = ModelKind::Segmentation;
    let err = load(&spec, &bytes, &cpu()).unwrap_err().to_string();
    assert!(err.contains("NCDHW"), "{err}");
}
