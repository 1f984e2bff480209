//! From decoded files to volumes: the steps the worker and `radflow volume` share.
//!
//! Both turn a set of files into one native volume with the same rules (non-image
//! objects left out, any other decoding failure fails the series) and prepare it for a
//! preset the same way (resample, then normalize), so the command-line converter
//! produces exactly what the pipeline feeds a model.

use radflow_shared::models::Preset;

use crate::decode::{self, DecodeError, DecodedSlice};
use crate::geometry::{self, BuiltVolume, GeometryError, GeometryOptions};
use crate::resample;
use crate::volume::Volume;
use crate::{nifti, normalize};

/// Why a set of files does not make a volume; `code` is the machine-readable reason
/// used in dead letters.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{name}: {source}")]
    Decode { name: String, source: DecodeError },
    #[error("no image among {0} file(s)")]
    NoImages(usize),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
}

impl ConvertError {
    /// Machine-readable reason.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Decode { source, .. } => decode_code(source),
            Self::NoImages(_) => "no_images",
            Self::Geometry(_) => "bad_geometry",
        }
    }
}

/// Machine-readable reason of a decoding failure.
pub fn decode_code(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::NotDicom(_) => "not_dicom",
        DecodeError::Malformed(_) => "malformed_dicom",
        DecodeError::NoPixelData { .. } => "no_pixel_data",
        DecodeError::UnsupportedTransferSyntax { .. } => "unsupported_transfer_syntax",
        DecodeError::TruncatedPixelData { .. } => "truncated_pixel_data",
        DecodeError::MultiFrame { .. } => "multi_frame_unsupported",
        DecodeError::UnsupportedImage(_) => "unsupported_image",
        DecodeError::TooLarge { .. } => "image_too_large",
        DecodeError::Codec { .. } => "codec_error",
    }
}

/// Keeps the decoded images of a series: objects without pixel data are counted in
/// `warnings` and left out; any other failure fails the whole series.
pub fn collect_slices(
    decoded: Vec<(String, Result<DecodedSlice, DecodeError>)>,
    warnings: &mut Vec<String>,
) -> Result<Vec<DecodedSlice>, ConvertError> {
    let total = decoded.len();
    let mut slices = Vec::with_capacity(total);
    let mut not_images = 0usize;
    for (name, r) in decoded {
        match r {
            Ok(s) => slices.push(s),
            Err(DecodeError::NoPixelData { .. }) => not_images += 1,
            Err(source) => return Err(ConvertError::Decode { name, source }),
        }
    }
    if not_images > 0 {
        warnings.push(format!(
            "{not_images} instance(s) without pixel data left out"
        ));
    }
    if slices.is_empty() {
        return Err(ConvertError::NoImages(total));
    }
    Ok(slices)
}

/// Decodes files held in memory (in parallel) and builds the native volume.
pub fn volume_from_files(
    files: Vec<(String, Vec<u8>)>,
    opts: &GeometryOptions,
) -> Result<(BuiltVolume, Vec<String>), ConvertError> {
    use rayon::prelude::*;
    let decoded: Vec<_> = files
        .into_par_iter()
        .map(|(name, bytes)| {
            let r = decode::read_slice(&bytes);
            (name, r)
        })
        .collect();
    let mut warnings = Vec::new();
    let slices = collect_slices(decoded, &mut warnings)?;
    let built = geometry::build_volume(slices, opts)?;
    Ok((built, warnings))
}

/// Resamples to the preset's spacing and normalizes its intensities.
pub fn prepare(native: &Volume<f32>, preset: &Preset) -> Volume<f32> {
    let target = resample::grid_with_spacing(&native.grid, preset.spacing);
    let mut vol = resample::resample_linear(native, &target);
    normalize::normalize(&mut vol.data, &preset.normalization);
    vol
}

/// Encodes a volume as `.nii.gz` (or plain `.nii` when `gzip` is false).
pub fn encode_nifti(vol: &Volume<f32>, description: &str, gzip: bool) -> Vec<u8> {
    if gzip {
        nifti::write_nifti_gz(vol, description)
    } else {
        nifti::write_nifti(vol, description)
    }
}
