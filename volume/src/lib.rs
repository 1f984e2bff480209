//! The volume contract between the preprocessor, which writes prepared volumes into the
//! store, and everything that reads them (the inferer, dataset exports): values on a
//! physical grid, their files and the grid operations both sides need. Nothing here
//! knows DICOM or ONNX.
//!
//! # Layout
//!
//! - [`Volume`] and [`Grid`] (`volume.rs`): a 3D image and the voxel-to-world
//!   transform it lives on, in NIfTI's axis and RAS+ conventions;
//! - [`nifti`]: NIfTI-1 written and read in memory, `.nii.gz` deflated in parallel
//!   blocks with their index in the gzip header;
//! - [`gunzip`]: those files inflated on every core, from that index;
//! - [`resample`]: a volume onto another grid, trilinear or nearest neighbour (label
//!   maps back onto the source grid);
//! - [`VolumeMeta`] (`meta.rs`): the `meta.json` beside each volume.
#[doc(hidden)]
pub mod fuzzing;
pub mod gunzip;
mod meta;
pub mod nifti;
pub mod resample;
mod volume;

pub use meta::VolumeMeta;
pub use volume::{Grid, ShapeMismatch, Volume};
