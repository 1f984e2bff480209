//! Turns a stored DICOM series into model-ready volumes.
//!
//! # Layout
//!
//! - [`decode`] reads one file: its images' headers, then their pixels in physical
//!   units; `scan` checks a file's structure before anything parses it,
//!   `mosaic` cuts Siemens mosaics into slices, [`jpeg_lossless`] decodes the
//!   commonest compressed syntax fast and [`jpeg_extended`] the 12-bit lossy one no
//!   crate reads (both on [`jpeg_stream`]).
//! - [`select`] decides which images of a series make its volume (and why the others
//!   do not); [`geometry`] orders them along the slice normal and plans the regular
//!   grid; [`convert`] decodes the chosen images straight into that grid.
//! - [`preset`] turns the native volume into a model's input (axis order, spacing,
//!   crop or pad, then [`normalize`]) through `radflow_volume::resample`.
//! - [`worker`] is the pipeline stage, which writes each volume with its
//!   `meta.json` in the form `radflow_volume` defines; [`synth`] writes test phantoms.
pub mod convert;
pub mod decode;
mod decode_error;
#[doc(hidden)]
pub mod fuzzing;
pub mod geometry;
pub mod header;
pub mod jpeg_extended;
pub mod jpeg_lossless;
pub mod jpeg_stream;
mod mosaic;
pub mod normalize;
pub mod preset;
mod scan;
pub mod select;
pub mod synth;
pub mod worker;
