//! The tool subcommands: `synth`, `send`, `volume`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
#[cfg(feature = "preprocessor")]
use radflow_preprocessor::convert;
#[cfg(feature = "preprocessor")]
use radflow_preprocessor::geometry::{GeometryOptions, UnevenSpacing};
#[cfg(feature = "preprocessor")]
use radflow_preprocessor::synth::{PhantomSpec, SynthSyntax};
use radflow_shared::models::Registry;

use crate::cli::{GeometryArgs, SendArgs, SynthArgs, VolumeArgs};
use crate::progress::Progress;

#[cfg(feature = "preprocessor")]
/// `radflow synth`: a phantom study as DICOM files, plus `truth.json` beside them.
pub fn synth(args: SynthArgs) -> Result<()> {
    let spec = PhantomSpec {
        size: args.size,
        slices: args.slices,
        fov_mm: args.fov,
        slice_spacing_mm: args.spacing,
        shuffle: args.shuffle,
        seed: args.seed,
        transfer_syntax: if args.implicit {
            SynthSyntax::ImplicitLittle
        } else {
            SynthSyntax::ExplicitLittle
        },
        tilt_deg: args.tilt,
        enhanced: args.enhanced,
        long_uids: args.long_uids,
    };
    let truth = radflow_preprocessor::synth::write_series(&spec, &args.out)
        .with_context(|| format!("cannot write the phantom to {}", args.out.display()))?;
    let truth_path = args.out.join("truth.json");
    std::fs::write(&truth_path, serde_json::to_vec_pretty(&truth)?)
        .with_context(|| format!("cannot write {}", truth_path.display()))?;
    println!(
        "wrote {} DICOM files ({}x{}x{}) to {}; tissue volumes in {}",
        truth.files,
        truth.dims[0],
        truth.dims[1],
        truth.dims[2],
        args.out.display(),
        truth_path.display()
    );
    Ok(())
}

/// Keeps the `(study, series)` pairs whose series or study UID is listed in `file`
/// (one UID per line; blank lines ignored).
pub fn keep_listed(series: &mut Vec<(String, String)>, file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let wanted: std::collections::HashSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    series.retain(|(study, series)| {
        wanted.contains(series.as_str()) || wanted.contains(study.as_str())
    });
    Ok(())
}

/// Files under the given paths, recursively, sorted.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(p)? {
                walk(&entry?.path(), out)?;
            }
        } else if meta.is_file() {
            out.push(p.to_owned());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    out.sort();
    Ok(out)
}

#[cfg(feature = "listener")]
/// `radflow send`: C-ECHO, then C-STORE every DICOM file found.
pub async fn send(args: SendArgs) -> Result<()> {
    let files = collect_files(&args.paths)?;
    if files.is_empty() {
        bail!("no files under {:?}", args.paths);
    }
    radflow_listener::scu::echo(&args.to, &args.calling_ae, &args.called_ae)
        .await
        .with_context(|| format!("C-ECHO to {} ({}) failed", args.to, args.called_ae))?;
    let progress = Progress::new(files.len() as u64, "files");
    let report = radflow_listener::scu::send_files_with_progress(
        &args.to,
        &args.calling_ae,
        &args.called_ae,
        &files,
        &mut |bytes| progress.inc(bytes),
    )
    .await
    .with_context(|| format!("sending to {} failed", args.to))?;
    progress.finish();
    println!(
        "sent {} instance(s) to {} ({}); {} failed, {} skipped (not DICOM)",
        report.sent,
        args.to,
        args.called_ae,
        report.failed.len(),
        report.skipped.len()
    );
    for f in &report.failed {
        let status = f
            .status
            .map(|s| format!("status 0x{s:04X}"))
            .unwrap_or_else(|| "not sent".into());
        eprintln!("  {}: {status}: {}", f.path.display(), f.comment);
    }
    if !report.failed.is_empty() {
        bail!("{} instance(s) were not stored", report.failed.len());
    }
    Ok(())
}

#[cfg(feature = "preprocessor")]
/// The geometry flags as options of the converter.
pub fn geometry_options(args: &GeometryArgs) -> GeometryOptions {
    GeometryOptions {
        min_slices: args.min_slices,
        spacing_tolerance: args.spacing_tolerance,
        uneven_spacing: if args.uneven_spacing == "reject" {
            UnevenSpacing::Reject
        } else {
            UnevenSpacing::Interpolate
        },
        max_gap_ratio: args.max_gap_ratio,
    }
}

#[cfg(feature = "preprocessor")]
/// Whether a file starts like a DICOM Part-10 file (preamble and `DICM`).
fn is_dicom_file(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| &head[128..] == b"DICM")
}

#[cfg(feature = "preprocessor")]
/// `radflow volume`: one series folder to NIfTI, natively or for a model's preset.
/// Refuses what is not a volume with the reasons and codes the pipeline uses.
pub fn volume(args: VolumeArgs) -> Result<()> {
    let files: Vec<PathBuf> = collect_files(std::slice::from_ref(&args.input))?
        .into_iter()
        .filter(|f| is_dicom_file(f))
        .collect();
    if files.is_empty() {
        bail!("no DICOM files in {}", args.input.display());
    }
    // Validate the preset before the work.
    let preset = match &args.preset {
        None => None,
        Some(reference) => {
            let registry = Registry::load_or_builtin(args.models.models.as_deref())?;
            let model = registry
                .find(reference)
                .with_context(|| format!("no model {reference:?} in the registry"))?;
            Some(model.preset.clone())
        }
    };
    let built = convert::volume_from_paths(&files, &geometry_options(&args.geometry))
        .map_err(|e| anyhow::anyhow!("{} ({})", e, e.code()))?;
    for w in &built.report.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(why) = &built.report.suspect_incomplete {
        eprintln!("warning: suspect incomplete: {why}");
    }
    let vol = match &preset {
        None => built.volume,
        Some(preset) => {
            let input = convert::prepare(&built.volume, preset);
            // The native volume is the largest buffer; gone before encoding.
            drop(built.volume);
            input
        }
    };
    let gzip = args.out.extension().is_some_and(|e| e == "gz");
    let bytes = convert::encode_nifti(&vol, "radflow volume", gzip.then_some(args.gzip_level));
    std::fs::write(&args.out, bytes)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let [nx, ny, nz] = vol.grid.dims;
    let sp = vol.grid.spacing();
    println!(
        "wrote {} ({nx}x{ny}x{nz}, spacing {:.3}x{:.3}x{:.3} mm, {} planes from {} files)",
        args.out.display(),
        sp[0],
        sp[1],
        sp[2],
        built.report.slices,
        files.len()
    );
    Ok(())
}
