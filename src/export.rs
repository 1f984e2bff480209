//! `radflow export-dataset`: image and label pairs for retraining, from the results of
//! one model version.
//!
//! For every stored series with a complete result (`summary.json`) of the model
//! version, the command writes the model's input volume (`volumes/<series>/<preset>/`)
//! and the result's label map moved onto that volume's grid: `labels.nii.gz` is stored
//! on the source series' grid, so it is resampled (nearest neighbour, the preprocessor's
//! own resampling) onto the grid `meta.json` gives for the volume. Voxels of the volume
//! outside the scan get label 0 when the preset pads with a value, and the edge label
//! when it repeats the edge, as the image does. The pairs and a manifest
//! (`manifest.json`, and the same items as `manifest.jsonl`) go to a local folder:
//!
//! ```text
//! <out>/images/<id>.nii.gz   <out>/labels/<id>.nii.gz   <out>/manifest.json(l)
//! ```
//!
//! `<id>` is the Series Instance UID or, with `--deidentify`, a keyed hash of it
//! (HMAC-SHA-256 with `--salt`): the same series gets the same id in every export with
//! the same salt, and nobody without the salt can tell which series it is. A
//! de-identified export holds no UID: not in file names, not in the manifest, not in
//! the NIfTI headers (every file is written anew with a fixed description). Nothing is
//! read from DICOM headers, so no demographics can reach the output or the logs.
//!
//! A series whose volume, metadata or label map is missing or unreadable is reported
//! and skipped; the command fails only when nothing at all could be exported. The
//! folder ends up holding exactly the manifest's items: older `.nii.gz` files under
//! `images/` and `labels/` that are not in it are removed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::progress::Progress;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use radflow_inferer::worker::Summary;
use radflow_shared::backoff::Backoff;
use radflow_shared::config::{ModelsArgs, StoreArgs};
use radflow_shared::models::{ModelKind, Registry};
use radflow_shared::store::{Store, StoreError, VolumeFile};
use radflow_shared::util::now_ms;
use radflow_volume::{Volume, VolumeMeta, nifti, resample};
use serde::Serialize;

/// Version of the manifest's layout.
const SCHEMA_VERSION: u32 = 1;
/// Hex digits of a de-identified id (128 bits).
const ID_HEX_DIGITS: usize = 32;
/// Series exported at once (each one resamples and compresses on all cores).
const CONCURRENCY: usize = 4;
/// Tries of a store read that fails transiently.
const STORE_TRIES: u32 = 3;

/// `radflow export-dataset`
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The model whose results are exported, `name@version` (or `name`: its serving
    /// version in the registry).
    #[arg(long, env = "RADFLOW_EXPORT_MODEL")]
    pub model: String,
    /// Output folder (created): images/, labels/, manifest.json, manifest.jsonl.
    #[arg(long, env = "RADFLOW_EXPORT_OUT")]
    pub out: PathBuf,
    /// A file with one Series (or Study) Instance UID per line: export only those.
    #[arg(long, env = "RADFLOW_EXPORT_UIDS")]
    pub uids: Option<PathBuf>,
    /// Preset of the model's input volumes; needed only for a model version that is no
    /// longer in the registry (default: the registry's preset of the model).
    #[arg(long, env = "RADFLOW_EXPORT_PRESET")]
    pub preset: Option<String>,
    /// Replace Series Instance UIDs by keyed hashes (needs --salt) and leave every UID
    /// out of the manifest and the NIfTI headers.
    #[arg(long, env = "RADFLOW_EXPORT_DEIDENTIFY")]
    pub deidentify: bool,
    /// Secret key of the de-identified ids: a long random string, kept like a
    /// password; the same salt gives the same ids in every export.
    #[arg(long, env = "RADFLOW_EXPORT_SALT", hide_env_values = true)]
    pub salt: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub models: ModelsArgs,
}

/// One label of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
struct Label {
    index: u8,
    name: String,
}

/// Where an item came from; left out of a de-identified export.
#[derive(Debug, Clone, Serialize)]
struct Source {
    study_uid: String,
    series_uid: String,
}

/// One training pair of the manifest.
#[derive(Debug, Clone, Serialize)]
struct Item {
    id: String,
    /// Relative to the manifest.
    image: String,
    label: String,
    /// `[x, y, z]` voxels of both files.
    shape: [usize; 3],
    spacing_mm: [f64; 3],
    model: String,
    model_sha256: String,
    provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<Source>,
}

#[derive(Debug, Serialize)]
struct Manifest<'a> {
    schema_version: u32,
    model: &'a str,
    model_sha256: &'a str,
    created_at_ms: u64,
    labels: &'a [Label],
    deidentified: bool,
    items: &'a [Item],
}

/// What the export needs to know about one series.
struct Job {
    study_uid: String,
    series_uid: String,
    id: String,
    /// Leave the UIDs out of the item.
    deidentified: bool,
    reference: String,
    preset: String,
    out: PathBuf,
}

/// A series exported: its manifest item and the label values its map holds.
struct Exported {
    item: Item,
    values: BTreeSet<u8>,
    label_names: Vec<Label>,
}

/// `radflow export-dataset`
pub async fn export_dataset(args: ExportArgs) -> Result<()> {
    let registry = Registry::load_or_builtin(args.models.models.as_deref())?;
    let spec = registry.find(&args.model).cloned();
    let (reference, preset) = match (&spec, &args.preset) {
        (Some(spec), preset) => {
            if spec.kind != ModelKind::Segmentation {
                bail!(
                    "{} is a {:?} model: only segmentation results have label maps to export",
                    spec.reference(),
                    spec.kind
                );
            }
            (
                spec.reference(),
                preset.clone().unwrap_or_else(|| spec.preset.name.clone()),
            )
        }
        (None, Some(preset)) if args.model.contains('@') => (args.model.clone(), preset.clone()),
        (None, _) => bail!(
            "no model {:?} in the registry (for a version no longer in it, give name@version and --preset)",
            args.model
        ),
    };
    let salt = match (args.deidentify, args.salt.as_deref()) {
        (false, _) => None,
        (true, Some(salt)) if !salt.is_empty() => Some(salt.to_owned()),
        (true, _) => bail!("--deidentify needs --salt (or RADFLOW_EXPORT_SALT)"),
    };
    let store = args.store.open()?;

    let mut candidates = store.list_series().await?;
    if let Some(file) = &args.uids {
        crate::tools::keep_listed(&mut candidates, file)?;
    }

    let out = args.out.clone();
    for dir in [out.join("images"), out.join("labels")] {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }

    // Series with a complete result, exported a few at a time.
    let mut without_result = 0usize;
    let mut jobs = Vec::new();
    for (study, series) in candidates {
        if !store.has_result(&series, &reference).await? {
            without_result += 1;
            continue;
        }
        let id = match &salt {
            Some(salt) => pseudonym(salt, &series),
            None => series.clone(),
        };
        jobs.push(Job {
            study_uid: study,
            series_uid: series,
            id,
            deidentified: salt.is_some(),
            reference: reference.clone(),
            preset: preset.clone(),
            out: out.clone(),
        });
    }
    eprintln!(
        "{} series have a result of {reference} ({without_result} selected series have none)",
        jobs.len()
    );

    let progress = Progress::new(jobs.len() as u64, "series");
    let mut exported: Vec<Exported> = Vec::with_capacity(jobs.len());
    let mut skipped = 0usize;
    let mut queue = jobs.into_iter();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < CONCURRENCY {
            let Some(job) = queue.next() else { break };
            let store = store.clone();
            running.spawn(async move {
                let series = job.series_uid.clone();
                (series, export_one(&store, job).await)
            });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        match done.context("an export task failed")? {
            (_, Ok(e)) => {
                progress.inc(0);
                exported.push(e);
            }
            (series, Err(why)) => {
                skipped += 1;
                progress.println(format!("skipped series {series}: {why:#}"));
                progress.inc(0);
            }
        }
    }
    progress.finish();
    exported.sort_by(|a, b| a.item.id.cmp(&b.item.id));

    // The manifest: the registry's labels (or the results' own), then any other value
    // found in a label map, so that every value in a file is listed.
    let mut labels: BTreeMap<u8, String> = match &spec {
        Some(spec) => spec
            .labels
            .iter()
            .map(|l| (l.index, l.name.clone()))
            .collect(),
        None => BTreeMap::new(),
    };
    for e in &exported {
        for l in &e.label_names {
            labels.entry(l.index).or_insert_with(|| l.name.clone());
        }
        for &v in &e.values {
            labels.entry(v).or_insert_with(|| format!("label_{v}"));
        }
    }
    let labels: Vec<Label> = labels
        .into_iter()
        .map(|(index, name)| Label { index, name })
        .collect();
    let items: Vec<Item> = exported.into_iter().map(|e| e.item).collect();
    let model_sha256 = spec
        .as_ref()
        .map(|s| s.sha256.clone())
        .or_else(|| items.first().map(|i| i.model_sha256.clone()))
        .unwrap_or_default();
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        model: &reference,
        model_sha256: &model_sha256,
        created_at_ms: now_ms(),
        labels: &labels,
        deidentified: salt.is_some(),
        items: &items,
    };
    if items.is_empty() {
        bail!(
            "nothing exported for {reference}: {skipped} series skipped, {without_result} without a result"
        );
    }
    let mut jsonl = String::new();
    for item in &items {
        jsonl.push_str(&serde_json::to_string(item)?);
        jsonl.push('\n');
    }
    write_atomic(&out.join("manifest.jsonl"), jsonl.as_bytes())?;
    write_atomic(
        &out.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    let removed = prune(&out, &items)?;

    println!(
        "{reference}: {} exported, {skipped} skipped, {without_result} without a result{}{} -> {}",
        items.len(),
        if removed > 0 {
            format!(", {removed} old files removed")
        } else {
            String::new()
        },
        if salt.is_some() {
            " (de-identified)"
        } else {
            ""
        },
        out.display()
    );
    Ok(())
}

/// Reads an object, trying again when the store fails transiently.
async fn get(store: &Store, key: &str) -> Result<Bytes, StoreError> {
    Backoff::new(Duration::from_millis(500), 2, Duration::from_secs(5))
        .retry(STORE_TRIES, StoreError::is_transient, || store.get(key))
        .await
}

/// Exports one series: reads its result, volume and metadata, moves the labels onto
/// the volume's grid and writes both files.
async fn export_one(store: &Store, job: Job) -> Result<Exported> {
    let summary_key = Store::result_key(&job.series_uid, &job.reference, "summary.json");
    let summary: Summary = serde_json::from_slice(&get(store, &summary_key).await?)
        .with_context(|| format!("{summary_key} is not a result summary"))?;
    if summary.kind != ModelKind::Segmentation {
        bail!("the result is a classification: no label map");
    }
    let meta_key = Store::volume_key(&job.series_uid, &job.preset, VolumeFile::Meta);
    let meta: VolumeMeta = serde_json::from_slice(&get(store, &meta_key).await?)
        .with_context(|| format!("{meta_key} is not volume metadata"))?;
    if meta.revision != summary.revision {
        bail!(
            "the volume is of series revision {} and the result of revision {}",
            meta.revision,
            summary.revision
        );
    }
    let volume_key = Store::volume_key(&job.series_uid, &job.preset, VolumeFile::Volume);
    let labels_key = Store::result_key(&job.series_uid, &job.reference, "labels.nii.gz");
    let (volume_bytes, labels_bytes) =
        tokio::try_join!(get(store, &volume_key), get(store, &labels_key))?;

    let (reference, id, out) = (job.reference.clone(), job.id.clone(), job.out.clone());
    let (shape, spacing, values) = tokio::task::spawn_blocking(move || {
        let image = nifti::read_nifti::<f32>(&volume_bytes)
            .with_context(|| format!("{volume_key} is not a readable volume"))?;
        let labels = nifti::read_nifti::<u8>(&labels_bytes)
            .with_context(|| format!("{labels_key} is not a readable label map"))?;
        drop((volume_bytes, labels_bytes));
        if image.grid.dims != meta.volume.dims || !close(&image.grid.affine, &meta.volume.affine) {
            bail!("{volume_key} is not on the grid its meta.json gives");
        }
        if labels.grid.dims != meta.source.dims || !close(&labels.grid.affine, &meta.source.affine)
        {
            bail!("{labels_key} is not on the source grid of meta.json");
        }
        let outside = meta.preset.pad_value.map(|_| 0u8);
        let moved = resample::resample_nearest_with(&labels, &meta.volume, outside);
        // Both files get the image's header transform, to the bit.
        let moved = Volume::new(image.grid.clone(), moved.data)?;
        let values: BTreeSet<u8> = {
            let mut seen = [false; 256];
            for &v in &moved.data {
                seen[usize::from(v)] = true;
            }
            (0..=u8::MAX).filter(|v| seen[usize::from(*v)]).collect()
        };
        // Written anew with a fixed description: no UID can survive in a header.
        let image_gz = nifti::write_nifti_gz(&image, &format!("radflow {reference} image"));
        let labels_gz = nifti::write_nifti_gz(&moved, &format!("radflow {reference} labels"));
        write_atomic(&out.join("images").join(format!("{id}.nii.gz")), &image_gz)?;
        write_atomic(&out.join("labels").join(format!("{id}.nii.gz")), &labels_gz)?;
        let spacing = image.grid.spacing().map(|s| (s * 1e6).round() / 1e6);
        Ok::<_, anyhow::Error>((image.grid.dims, spacing, values))
    })
    .await??;

    Ok(Exported {
        item: Item {
            image: format!("images/{}.nii.gz", job.id),
            label: format!("labels/{}.nii.gz", job.id),
            id: job.id,
            shape,
            spacing_mm: spacing,
            model: format!("{}@{}", summary.model, summary.model_version),
            model_sha256: summary.model_sha256,
            provider: summary.provider,
            source: (!job.deidentified).then_some(Source {
                study_uid: job.study_uid,
                series_uid: job.series_uid,
            }),
        },
        values,
        label_names: summary
            .labels
            .iter()
            .map(|l| Label {
                index: l.index,
                name: l.name.clone(),
            })
            .collect(),
    })
}

/// Whether two affines agree within the precision of a NIfTI header (`f32`).
fn close(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> bool {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs().max(y.abs())))
}

/// The de-identified id of a series: the first hex digits of HMAC-SHA-256(salt, UID).
fn pseudonym(salt: &str, series_uid: &str) -> String {
    hmac_sha256_hex(salt.as_bytes(), series_uid.as_bytes())[..ID_HEX_DIGITS].to_owned()
}

/// HMAC-SHA-256 (RFC 2104) of `message` under `key`, as lower-case hex.
fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a file under a temporary name and renames it into place, so that a reader
/// (a training job) sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes the `.nii.gz` files under `images/` and `labels/` that the manifest does not
/// list (series no longer exported, or an earlier export with other ids); returns how
/// many.
fn prune(out: &Path, items: &[Item]) -> Result<usize> {
    let keep: HashSet<&str> = items
        .iter()
        .flat_map(|i| [i.image.as_str(), i.label.as_str()])
        .collect();
    let mut removed = 0;
    for dir in ["images", "labels"] {
        for entry in std::fs::read_dir(out.join(dir))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".nii.gz")
                && entry.file_type()?.is_file()
                && !keep.contains(format!("{dir}/{name}").as_str())
            {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2: a short key.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hmac_sha256_hex(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn pseudonyms_depend_on_salt_and_uid_only() {
        let a = pseudonym("s3cret", "1.2.826.0.1.3680043.2.1125.1");
        assert_eq!(a.len(), ID_HEX_DIGITS);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, pseudonym("s3cret", "1.2.826.0.1.3680043.2.1125.1"));
        assert_ne!(a, pseudonym("s3cret", "1.2.826.0.1.3680043.2.1125.2"));
        assert_ne!(a, pseudonym("other", "1.2.826.0.1.3680043.2.1125.1"));
    }

    #[test]
    fn affines_compare_at_header_precision() {
        let mut a = [[0.0; 4]; 4];
        a[0][0] = -0.7;
        a[0][3] = 123.456_789;
        let mut b = a;
        b[0][3] = f64::from(a[0][3] as f32);
        assert!(close(&a, &b));
        b[0][3] += 0.5;
        assert!(!close(&a, &b));
    }
}
