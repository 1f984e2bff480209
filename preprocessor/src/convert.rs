//! From the files of a series to its native volume: the steps the worker and
//! `radflow volume` share, so the command-line converter produces exactly what the
//! pipeline feeds a model.
//!
//! 1. [`read_headers`]: every file's structure is checked and its header read
//!    (in parallel); no pixels are decoded.
//! 2. [`plan_series`]: [`select`] chooses the images of the volume,
//!    [`geometry`] orders them and plans the grid.
//! 3. [`assemble`]: the volume is allocated once and each chosen image is decoded
//!    straight into its plane (in parallel, file by file); a file's bytes are dropped
//!    as soon as its images are in place. Only an uneven series, whose planes are
//!    interpolated, decodes its images into a separate buffer first.
//!
//! Peak memory is therefore the volume (`f32`) plus the files still waiting, not a
//! decoded copy of every slice and a stacked copy on top.
//!
//! Whether a failure is a fault of the data or just "not a volume" matters to the
//! worker: [`ConvertError::is_not_a_volume`] series are skipped, the others are
//! dead-lettered with [`ConvertError::code`].

use std::path::PathBuf;
use std::sync::Mutex;

use ndarray::Array3;
use radflow_volume::{Volume, nifti};
use rayon::prelude::*;

use crate::decode::{self, DecodeError, InstanceHeader, SliceHeader};
use crate::geometry::{self, BuiltVolume, GeometryError, GeometryOptions, VolumePlan};
use crate::select::{self, ImageRef, SelectError};

pub use crate::preset::prepare;

/// Most voxels of a native volume (4 GiB of `f32`): a few bytes of hostile header can
/// claim any matrix size and frame count.
pub const MAX_VOLUME_VOXELS: usize = 1 << 30;

/// Why a set of files does not make a volume; `code` is the machine-readable reason
/// used in dead letters and skip messages.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A file of the series cannot be read or decoded.
    #[error("{name}: {source}")]
    Decode { name: String, source: DecodeError },
    /// Image selection found no volume, or an ambiguous one.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// The chosen images do not form a volume.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// The volume would be too large to hold.
    #[error("the volume would have {voxels} voxels, more than the limit of {limit}")]
    TooLarge { voxels: usize, limit: usize },
    /// A file could not be read again for its pixels.
    #[error("{name}: {detail}")]
    Io { name: String, detail: String },
}

impl ConvertError {
    /// Machine-readable reason.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Decode { source, .. } => decode_code(source),
            Self::Select(e) => e.code(),
            Self::Geometry(e) => e.code(),
            Self::TooLarge { .. } => "volume_too_large",
            Self::Io { .. } => "io_error",
        }
    }

    /// Whether the series is simply not a volume (nothing in it is wrong): reports,
    /// scouts, single images, too few slices. The worker skips such series.
    pub fn is_not_a_volume(&self) -> bool {
        matches!(
            self,
            Self::Select(SelectError::NotAVolume { .. })
                | Self::Geometry(GeometryError::NotEnoughSlices { .. })
        )
    }

    /// Whether retrying could help (a file could not be read); everything else is a
    /// property of the data.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Io { .. })
    }
}

/// Machine-readable reason of a decoding failure.
pub fn decode_code(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::NotDicom(_) => "not_dicom",
        DecodeError::Malformed(_) => "malformed_dicom",
        DecodeError::NoPixelData { .. } => "no_pixel_data",
        DecodeError::UnreadableObject { .. } => "unreadable_object",
        DecodeError::UnsupportedTransferSyntax { .. } => "unsupported_transfer_syntax",
        DecodeError::TruncatedPixelData { .. } => "truncated_pixel_data",
        DecodeError::MultiFrame { .. } => "multi_frame",
        DecodeError::Mosaic(_) => "mosaic_unsupported",
        DecodeError::UnsupportedImage(_) => "unsupported_image",
        DecodeError::TooLarge { .. } => "image_too_large",
        DecodeError::Codec { .. } => "codec_error",
    }
}

/// The images chosen for a series' volume and the grid they go on.
#[derive(Debug, Clone)]
pub struct SeriesPlan {
    /// Grid, plane sources and report; image indices refer to `images`.
    pub volume: VolumePlan,
    /// The chosen images: file index (as given to [`plan_series`]) and image index.
    pub images: Vec<ImageRef>,
    /// Headers of the files, by file index (`None` for objects without pixel data).
    headers: Vec<Option<InstanceHeader>>,
    /// File names, for messages.
    names: Vec<String>,
}

/// Step 1: the header of every file, read in parallel.
pub fn read_headers<B: AsRef<[u8]> + Sync>(
    files: &[(String, B)],
) -> Vec<Result<InstanceHeader, DecodeError>> {
    files
        .par_iter()
        .map(|(_, bytes)| decode::read_header(bytes.as_ref()))
        .collect()
}

/// Step 2: chooses the images and plans the volume. `headers` are by file, with the
/// file names in `names`; objects without pixel data are left out, any other header
/// failure fails the series.
pub fn plan_series(
    names: Vec<String>,
    headers: Vec<Result<InstanceHeader, DecodeError>>,
    opts: &GeometryOptions,
) -> Result<SeriesPlan, ConvertError> {
    let mut kept: Vec<Option<InstanceHeader>> = Vec::with_capacity(headers.len());
    let mut non_images = Vec::new();
    let mut unreadable = Vec::new();
    let mut first_unreadable = None;
    for (name, h) in names.iter().zip(headers) {
        match h {
            Ok(h) => kept.push(Some(h)),
            Err(DecodeError::NoPixelData { sop_class_uid }) => {
                non_images.push(sop_class_uid);
                kept.push(None);
            }
            Err(DecodeError::UnreadableObject {
                sop_class_uid,
                detail,
            }) => {
                unreadable.push(sop_class_uid);
                first_unreadable.get_or_insert_with(|| format!("{name}: {detail}"));
                kept.push(None);
            }
            Err(source) => {
                return Err(ConvertError::Decode {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    // `select` sees the files with images only; map its file indices back.
    let with_images: Vec<usize> = (0..kept.len()).filter(|i| kept[*i].is_some()).collect();
    let refs: Vec<&InstanceHeader> = with_images
        .iter()
        .map(|i| kept[*i].as_ref().expect("filtered"))
        .collect();
    let selection = select::select(&refs, &non_images, &unreadable, opts)?;
    let images: Vec<ImageRef> = selection
        .images
        .iter()
        .map(|r| ImageRef {
            file: with_images[r.file],
            image: r.image,
        })
        .collect();
    let header = |r: &ImageRef| -> &SliceHeader {
        &kept[r.file].as_ref().expect("has images").images[r.image]
    };
    let chosen: Vec<SliceHeader> = images.iter().map(|r| header(r).clone()).collect();
    let mut volume = geometry::plan_volume(&chosen, opts)?;
    let voxels = volume.grid.len();
    let needed = if volume.is_direct() {
        voxels
    } else {
        voxels + volume.images().len() * volume.grid.dims[0] * volume.grid.dims[1]
    };
    if needed > MAX_VOLUME_VOXELS {
        return Err(ConvertError::TooLarge {
            voxels: needed,
            limit: MAX_VOLUME_VOXELS,
        });
    }
    // Every file that holds a used image must be decodable.
    let used = volume.images();
    let mut files: Vec<usize> = used.iter().map(|i| images[*i].file).collect();
    files.sort_unstable();
    files.dedup();
    for f in files {
        kept[f]
            .as_ref()
            .expect("has images")
            .check_decodable()
            .map_err(|source| ConvertError::Decode {
                name: names[f].clone(),
                source,
            })?;
    }
    let mut notes = selection.notes;
    if let Some(first) = first_unreadable {
        notes.push(format!("the first object that cannot be read: {first}"));
    }
    notes.append(&mut volume.report.warnings);
    volume.report.warnings = notes;
    Ok(SeriesPlan {
        volume,
        images,
        headers: kept,
        names,
    })
}

/// The images of one file to decode, with the buffers they go to.
type FileWork<'a> = (usize, Vec<(usize, &'a mut [f32])>);

/// Step 3: decodes the chosen images into the volume. `load(file)` returns the bytes
/// of a file (by the index given to [`plan_series`]); it is called once per file that
/// holds a used image, and the bytes are dropped when that file is done.
pub fn assemble<B: AsRef<[u8]>>(
    series: SeriesPlan,
    load: impl Fn(usize) -> Result<B, ConvertError> + Sync,
) -> Result<BuiltVolume, ConvertError> {
    let SeriesPlan {
        volume: plan,
        images,
        headers,
        names,
    } = series;
    let (nz, ny, nx) = plan.grid.shape();
    let plane = nx * ny;
    let used = plan.images();
    // Planes of the volume itself when every plane is an image; else a buffer of the
    // used images, blended into the volume afterwards.
    let direct = plan.is_direct();
    let mut data = vec![0f32; nz * plane];
    let mut sources = if direct {
        Vec::new()
    } else {
        vec![0f32; used.len() * plane]
    };
    let mut slots: Vec<(usize, &mut [f32])> = if direct {
        plan.planes
            .iter()
            .zip(data.chunks_mut(plane))
            .map(|(p, out)| match p {
                geometry::PlaneSource::Image(i) => (*i, out),
                geometry::PlaneSource::Blend { .. } => unreachable!("direct plan"),
            })
            .collect()
    } else {
        used.iter()
            .copied()
            .zip(sources.chunks_mut(plane))
            .collect()
    };
    let position_in_sources: Vec<usize> = {
        let mut pos = vec![usize::MAX; images.len()];
        for (k, i) in used.iter().enumerate() {
            pos[*i] = k;
        }
        pos
    };

    // Group the slots by file.
    slots.sort_by_key(|(i, _)| images[*i].file);
    let mut work: Vec<FileWork<'_>> = Vec::new();
    for (i, out) in slots {
        let r = images[i];
        match work.last_mut() {
            Some((f, targets)) if *f == r.file => targets.push((r.image, out)),
            _ => work.push((r.file, vec![(r.image, out)])),
        }
    }
    let threads = rayon::current_num_threads().max(1);
    work.into_par_iter().try_for_each(|(file, targets)| {
        let bytes = load(file)?;
        let header = headers[file].as_ref().expect("has images");
        let fail = |source| ConvertError::Decode {
            name: names[file].clone(),
            source,
        };
        if targets.len() <= 1 {
            return decode::decode_images(bytes.as_ref(), header, targets).map_err(fail);
        }
        // A multi-frame file: its frames are decoded in a few parallel chunks.
        let per_chunk = targets.len().div_ceil(threads);
        let mut chunks: Vec<Vec<(usize, &mut [f32])>> = Vec::new();
        for t in targets {
            match chunks.last_mut() {
                Some(c) if c.len() < per_chunk => c.push(t),
                _ => chunks.push(vec![t]),
            }
        }
        let bytes = bytes.as_ref();
        chunks
            .into_par_iter()
            .try_for_each(|c| decode::decode_images(bytes, header, c).map_err(fail))
    })?;

    if !direct {
        geometry::fill_planes(
            &plan,
            |i| {
                let k = position_in_sources[i];
                &sources[k * plane..(k + 1) * plane]
            },
            &mut data,
        );
        drop(sources);
    }
    let data = Array3::from_shape_vec((nz, ny, nx), data).expect("length from the grid");
    let volume = Volume::new(plan.grid, data).expect("shape from the grid");
    Ok(BuiltVolume {
        volume,
        report: plan.report,
    })
}

/// All three steps for files held in memory. Each file's bytes are released as soon
/// as its images are in the volume.
pub fn volume_from_files<B: AsRef<[u8]> + Send + Sync>(
    files: Vec<(String, B)>,
    opts: &GeometryOptions,
) -> Result<BuiltVolume, ConvertError> {
    let headers = read_headers(&files);
    let (names, bytes): (Vec<String>, Vec<B>) = files.into_iter().unzip();
    let plan = plan_series(names, headers, opts)?;
    let bytes: Vec<Mutex<Option<B>>> = bytes.into_iter().map(|b| Mutex::new(Some(b))).collect();
    assemble(plan, |f| {
        Ok(bytes[f]
            .lock()
            .expect("not poisoned")
            .take()
            .expect("each file is loaded once"))
    })
}

/// All three steps for files on disk. Each file is read twice (headers, then pixels),
/// so that at no point are all files held in memory beside the volume.
pub fn volume_from_paths(
    paths: &[PathBuf],
    opts: &GeometryOptions,
) -> Result<BuiltVolume, ConvertError> {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let read = |i: usize| {
        Pooled::read(&paths[i]).map_err(|e| ConvertError::Io {
            name: paths[i].display().to_string(),
            detail: e.to_string(),
        })
    };
    let headers: Vec<Result<InstanceHeader, DecodeError>> = (0..paths.len())
        .into_par_iter()
        .map(|i| read(i).map(|bytes| decode::read_header(bytes.as_ref())))
        .collect::<Result<_, _>>()?;
    let plan = plan_series(names, headers, opts)?;
    assemble(plan, read)
}

std::thread_local! {
    /// Read buffers kept by each thread for the next file, so that reading a series
    /// does not map and fault in fresh pages for every file.
    static BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bytes of a file in a reused buffer, returned to its thread's pool on drop.
struct Pooled(Vec<u8>);

impl Pooled {
    fn read(path: &std::path::Path) -> std::io::Result<Self> {
        use std::io::Read;
        let mut buf = BUFFERS.with(|b| b.borrow_mut().pop()).unwrap_or_default();
        buf.clear();
        std::fs::File::open(path)?.read_to_end(&mut buf)?;
        Ok(Pooled(buf))
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        BUFFERS.with(|b| {
            let mut pool = b.borrow_mut();
            if pool.len() < 2 {
                pool.push(buf);
            }
        });
    }
}

/// Encodes a volume as `.nii.gz` at gzip level `gzip` (0 = stored blocks), or as
/// plain `.nii` when `gzip` is `None`.
pub fn encode_nifti(vol: &Volume<f32>, description: &str, gzip: Option<u32>) -> Vec<u8> {
    match gzip {
        Some(level) => nifti::write_nifti_gz_level(vol, description, level),
        None => nifti::write_nifti(vol, description),
    }
}
