//! The demo model through the real ONNX Runtime library (the pinned wheel's, found the
//! way radflow finds it): loading, checks on load, and outputs equal to Python
//! onnxruntime's on the same input.

mod common;

use std::path::Path;

use ndarray::{Array3, Array5};
use radflow_inferer::runtime;
use radflow_inferer::session::{
    ExecutionConfig, LoadedModel, ModelError, Provider, ProviderRequest, load, read_model,
};
use radflow_inferer::sliding_window::{argmax_labels, sliding_window};
use radflow_shared::models::{ModelSpec, Registry, WindowPadding};
use serde_json::json;

use common::{max_abs_diff, random_values, run_reference};

/// Loads ONNX Runtime or fails with the operator's fix.
fn runtime_ready() -> runtime::RuntimeInfo {
    runtime::init(None).unwrap_or_else(|e| panic!("{e}"))
}

fn demo_spec() -> ModelSpec {
    Registry::builtin()
        .find("demo-tissue")
        .expect("the built-in registry lists demo-tissue")
        .clone()
}

fn cpu() -> ExecutionConfig {
    ExecutionConfig {
        provider: ProviderRequest::Cpu,
        intra_threads: Some(1),
        ..ExecutionConfig::default()
    }
}

fn load_demo(cfg: &ExecutionConfig) -> LoadedModel {
    runtime_ready();
    let spec = demo_spec();
    let bytes = read_model(&spec, None).unwrap();
    load(&spec, &bytes, cfg).unwrap_or_else(|e| panic!("{e}"))
}

fn model_file() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/demo-tissue.onnx")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn the_pinned_runtime_is_found_and_loaded_once() {
    let info = runtime_ready();
    assert!(info.version.starts_with("1.31."), "{info:?}");
    assert!(info.library.is_file(), "{info:?}");
    assert!(
        info.library
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("libonnxruntime.so.1.31"),
        "{info:?}"
    );
    // The CPU wheel has the CPU provider; a GPU build lists CUDA (and TensorRT) too.
    assert!(
        info.providers.iter().any(|p| p == "CPUExecutionProvider"),
        "{info:?}"
    );
    assert_eq!(runtime::init(None).unwrap(), info);
    assert_eq!(runtime::info(), Some(info));
}

#[test]
fn the_registry_checksum_matches_the_embedded_model() {
    let model = load_demo(&cpu());
    assert_eq!(model.sha256, demo_spec().sha256);
    assert_eq!(model.provider, Provider::Cpu);
    // The warm-up run was profiled: every node of the demo graph ran on the CPU.
    assert_eq!(
        model.placement.get("CPUExecutionProvider"),
        Some(&3),
        "{:?}",
        model.placement
    );
    assert_eq!(model.placement.len(), 1, "{:?}", model.placement);
    assert_eq!(model.counts().runs, 1, "one warm-up run");
    assert!(!model.fixed_batch());
}

#[test]
fn run_batch_equals_python_onnxruntime() {
    let model = load_demo(&cpu());
    let shape = (2, 1, 13, 17, 11);
    let values = random_values(42, 2 * 13 * 17 * 11, -0.2, 1.2);
    let input = Array5::from_shape_vec(shape, values.clone()).unwrap();
    let ours = model.run_batch(input.view()).unwrap();
    assert_eq!(ours.dim(), (2, 4, 13, 17, 11));

    let params = json!({ "mode": "run", "shape": [2, 1, 13, 17, 11], "model": model_file() });
    let (ref_shape, reference) = run_reference("run", params, &values);
    assert_eq!(ours.shape(), &ref_shape[..]);
    let ours: Vec<f32> = ours.iter().copied().collect();
    let diff = max_abs_diff(&ours, &reference);
    assert!(diff < 1e-5, "max |radflow − onnxruntime| = {diff}");
}

#[test]
fn sliding_window_with_the_model_equals_the_reference_with_python_onnxruntime() {
    let model = load_demo(&cpu());
    let shape = [30usize, 41, 25];
    let values = random_values(9, shape.iter().product(), 0.0, 1.0);
    let image = Array3::from_shape_vec((30, 41, 25), values.clone()).unwrap();
    let ours = sliding_window(
        &model,
        image.view(),
        [16, 16, 16],
        0.25,
        3,
        WindowPadding::Constant,
    )
    .unwrap();

    let params = json!({
        "mode": "onnx", "shape": shape, "roi": [16, 16, 16], "overlap": 0.25,
        "batch_size": 3, "model": model_file(),
    });
    let (ref_shape, reference) = run_reference("window", params, &values);
    assert_eq!(ours.shape(), &ref_shape[..]);
    let ours: Vec<f32> = ours.iter().copied().collect();
    let diff = max_abs_diff(&ours, &reference);
    assert!(diff < 1e-5, "max |radflow − reference| = {diff}");
}

#[test]
fn the_demo_model_labels_tissue_by_hounsfield_units() {
    let model = load_demo(&cpu());
    let spec = demo_spec();
    // (HU, expected label): each side of each threshold (−400, −50, +200).
    let cases = [
        (-1000.0, 0),
        (-410.0, 0),
        (-390.0, 1),
        (-60.0, 1),
        (-40.0, 2),
        (190.0, 2),
        (210.0, 3),
        (1500.0, 3),
    ];
    for (hu, expected) in cases {
        let x = ((hu + 1000.0) / 2000.0f32).clamp(0.0, 1.0);
        let image = Array3::from_elem((9, 9, 9), x);
        let logits = sliding_window(
            &model,
            image.view(),
            spec.patch,
            spec.overlap,
            spec.batch_size,
            spec.padding,
        )
        .unwrap();
        let labels = argmax_labels(logits.view());
        assert_eq!(labels[[4, 4, 4]], expected, "{hu} HU");
        let name = &spec
            .labels
            .iter()
            .find(|l| l.index == expected)
            .unwrap()
            .name;
        assert!(!name.is_empty());
    }
}

#[test]
fn a_wrong_checksum_is_refused_naming_both_values() {
    runtime_ready();
    let mut spec = demo_spec();
    spec.sha256 = "ab".repeat(32);
    let bytes = read_model(&spec, None).unwrap();
    let err = load(&spec, &bytes, &cpu()).unwrap_err();
    assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&"ab".repeat(32)), "{msg}");
    assert!(msg.contains(&demo_spec().sha256), "{msg}");
    assert!(msg.contains("demo-tissue@1.0.0"), "{msg}");
}

#[test]
fn tensor_names_missing_from_the_model_are_refused() {
    runtime_ready();
    let mut spec = demo_spec();
    spec.output = "probabilities".into();
    let bytes = read_model(&spec, None).unwrap();
    let err = load(&spec, &bytes, &cpu()).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingTensor { kind: "output", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("\"logits\""), "{err}");

    let mut spec = demo_spec();
    spec.input = "img".into();
    let err = load(&spec, &bytes, &cpu()).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingTensor { kind: "input", .. }),
        "{err}"
    );
}

#[test]
fn an_unknown_builtin_or_bad_bytes_are_errors_not_panics() {
    runtime_ready();
    let mut spec = demo_spec();
    spec.file = "builtin:nope".into();
    assert!(matches!(
        read_model(&spec, None),
        Err(ModelError::UnknownBuiltin { .. })
    ));

    let junk = b"not an onnx model";
    let mut spec = demo_spec();
    spec.sha256 = radflow_inferer::session::sha256_hex(junk);
    let err = load(&spec, junk, &cpu()).unwrap_err();
    assert!(matches!(err, ModelError::Session { .. }), "{err}");
}

/// On a CPU-only library CUDA falls back (or is refused with `require_gpu`); where
/// CUDA works, its output must equal the CPU's.
#[test]
fn cuda_is_used_or_the_fallback_is_recorded_and_require_gpu_refuses() {
    let mut cuda = ExecutionConfig {
        provider: ProviderRequest::Cuda,
        ..ExecutionConfig::default()
    };
    cuda.cuda.memory_limit_bytes = Some(1 << 30);
    cuda.cuda.conv_algo_search = "heuristic".parse().unwrap();
    let model = load_demo(&cuda);
    let spec = demo_spec();
    let bytes = read_model(&spec, None).unwrap();
    match model.provider {
        Provider::Cpu => {
            let strict = ExecutionConfig {
                require_gpu: true,
                ..cuda.clone()
            };
            let err = load(&spec, &bytes, &strict).unwrap_err();
            assert!(matches!(err, ModelError::GpuUnavailable { .. }), "{err}");
            let auto = ExecutionConfig {
                require_gpu: true,
                ..ExecutionConfig::default()
            };
            let err = load(&spec, &bytes, &auto).unwrap_err();
            assert!(matches!(err, ModelError::GpuUnavailable { .. }), "{err}");
            // TensorRT falls back through CUDA to the CPU, and says why for each.
            let trt = ExecutionConfig {
                provider: ProviderRequest::TensorRt,
                require_gpu: true,
                ..ExecutionConfig::default()
            };
            let err = load(&spec, &bytes, &trt).unwrap_err().to_string();
            assert!(err.contains("tensorrt:") && err.contains("cuda:"), "{err}");
            let trt = ExecutionConfig {
                require_gpu: false,
                ..trt
            };
            assert_eq!(load(&spec, &bytes, &trt).unwrap().provider, Provider::Cpu);
        }
        Provider::TensorRt => unreachable!("TensorRT was not requested"),
        Provider::Cuda => {
            let input = Array5::from_shape_vec(
                (1, 1, 20, 24, 28),
                random_values(3, 20 * 24 * 28, 0.0, 1.0),
            )
            .unwrap();
            assert!(model.fixed_batch());
            assert!(model.placement["CUDAExecutionProvider"] > 0);
            let on_gpu = model.run_batch(input.view()).unwrap();
            let on_cpu = load_demo(&cpu()).run_batch(input.view()).unwrap();
            let diff = max_abs_diff(on_gpu.as_slice().unwrap(), on_cpu.as_slice().unwrap());
            assert!(diff < 1e-4, "CUDA vs CPU: {diff}");
        }
    }
}
