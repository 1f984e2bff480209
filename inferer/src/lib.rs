//! Runs ONNX models on prepared volumes and turns their output into results.
//!
//! # Layout
//!
//! - [`runtime`]: finds the ONNX Runtime shared library and loads it once per process;
//! - [`builtin`]: the model files compiled into the binary (the demo model);
//! - [`session`]: one checked model ready to run, on CUDA or the CPU;
//! - [`sliding_window`]: tiles a volume into model-sized patches and blends the
//!   logits back together (MONAI's algorithm), then picks a label per voxel;
//! - [`outputs`]: what a segmentation is turned into for people: label volumes in
//!   millilitres and a PNG preview;
//! - [`worker`]: the stage: jobs in, `labels.nii.gz`, `preview.png`, `summary.json` out.

pub mod builtin;
pub mod outputs;
pub mod runtime;
pub mod session;
pub mod sliding_window;
pub mod worker;
