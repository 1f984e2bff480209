//! Runs ONNX models on prepared volumes and turns their output into results.
//!
//! Volumes come in through `radflow_volume` (NIfTI files inflated on every core, their
//! `meta.json`, resampling of label maps); this crate links no DICOM pixel codec.
//!
//! # Layout
//!
//! - [`runtime`]: finds the ONNX Runtime shared library and loads it once per process;
//! - [`builtin`]: the model files compiled into the binary (the demo model);
//! - [`session`]: one checked model ready to run, on CUDA, TensorRT or the CPU, with
//!   the provider really in use established by profiling its warm-up run;
//! - [`sliding_window`]: tiles a volume into model-sized patches, runs them in
//!   batches and blends the logits back together (MONAI's algorithm), then picks a
//!   label per voxel;
//! - [`classify`]: whole-volume classification, with jobs batched into one run;
//! - [`outputs`]: what a segmentation is turned into on the source grid and for
//!   people: the label map moved by nearest neighbour or the class probabilities
//!   trilinearly (`invert_interpolation`), label volumes in millilitres and a PNG
//!   preview;
//! - [`dicom`]: the result as DICOM SEG and SR, for the PACS (headers only, through
//!   `radflow-results`);
//! - [`registry`]: the set of models served, loaded and warmed up, and its reload
//!   when the registry file changes;
//! - [`worker`]: the stage: jobs in, `labels.nii.gz`, `preview.png`, `seg.dcm`,
//!   `sr.dcm`, `summary.json` out.

pub mod builtin;
pub mod classify;
pub mod dicom;
pub mod outputs;
pub mod registry;
pub mod runtime;
pub mod session;
pub mod sliding_window;
pub mod worker;
