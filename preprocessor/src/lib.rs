//! Turns a stored DICOM series into model-ready volumes.
pub mod convert;
pub mod decode;
pub mod geometry;
pub mod nifti;
pub mod normalize;
pub mod resample;
pub mod synth;
pub mod volume;
pub mod worker;
