//! The result as DICOM: a Segmentation (`seg.dcm`) and a TID 1500 Structured Report
//! (`sr.dcm`) beside `labels.nii.gz` and `summary.json`, for the exporter to send to
//! the PACS.
//!
//! A binary SEG encodes the very label map that `labels.nii.gz` holds (on the source
//! grid, voxel for voxel), a fractional one (`segmentation_type = "fractional"`) each
//! label's probability on the source grid in 8 bits; the SR has the volumes of
//! `summary.json` (of the label map) either way. Both reference the
//! source instances each plane was computed on. Those are found among the stored
//! instances of the series by reading their headers only: one ranged GET of the first
//! [`HEADER_PREFIX`] bytes each, so the pixel data stays in the store.
//!
//! `radflow-results` writes the objects; it reads and writes headers, never pixel
//! data, so the inferer still links no pixel codec.

use futures::{StreamExt, TryStreamExt};
use ndarray::ArrayView4;
use radflow_results::seg::SEGMENTATION_STORAGE;
use radflow_results::sr::COMPREHENSIVE_3D_SR_STORAGE;
use radflow_results::{
    Algorithm, ClassScore, Created, Measurements, ResultContext, ResultIdentity, SegPixels,
    SegmentDescription, SegmentVolume, SourceInstance, SourceSeries, match_grid, read_source,
    write_seg, write_sr,
};
use radflow_shared::events::{self, DicomObject};
use radflow_shared::models::{Activation, ModelSpec};
use radflow_shared::store::{Store, StoreError};
use radflow_volume::{Grid, Volume};

use crate::outputs::LabelStat;

/// Name of the SEG among a result's files.
pub const SEG_FILE: &str = "seg.dcm";
/// Name of the SR among a result's files.
pub const SR_FILE: &str = "sr.dcm";
/// Series Number of the SEG series.
const SEG_SERIES_NUMBER: i32 = 901;
/// Series Number of the SR series.
const SR_SERIES_NUMBER: i32 = 902;
/// Bytes read from the start of a source instance for its header; an instance whose
/// header is longer is read whole.
pub const HEADER_PREFIX: u64 = 256 << 10;
/// Source headers read at once.
const HEADER_READS: usize = 16;

/// The headers of the stored instances of a series that can be a result's source
/// (images with a position, orientation and matrix); the others (presentation states,
/// reports, unreadable files) are left out.
pub async fn source_headers(
    store: &Store,
    study: &str,
    series: &str,
) -> Result<Vec<SourceInstance>, StoreError> {
    let listed = store.list_instances(study, series).await?;
    futures::stream::iter(listed)
        .map(|object| async move {
            let head = store.get_prefix(&object.key, HEADER_PREFIX).await?;
            match read_source(&head) {
                Ok(instance) => Ok(Some(instance)),
                Err(_) if object.size > head.len() as u64 => {
                    let whole = store.get(&object.key).await?;
                    Ok(read_source(&whole).ok())
                }
                Err(_) => Ok(None),
            }
        })
        .buffer_unordered(HEADER_READS)
        .try_filter_map(|found| async move { Ok(found) })
        .try_collect()
        .await
}

/// One written object: what it is and its Part-10 bytes.
pub struct Written {
    pub object: DicomObject,
    pub bytes: Vec<u8>,
}

/// What a result is: the label map on the source grid or the class scores.
pub enum Finding<'a> {
    Labels {
        on_source: &'a Volume<u8>,
        stats: &'a [LabelStat],
        /// For a fractional SEG: the 8-bit fractions `(segments, slices, rows,
        /// columns)` on the source grid, segments in the order of
        /// [`SegmentDescription::from_model`]; `None` writes the binary SEG of the
        /// label map.
        fractions: Option<ArrayView4<'a, u8>>,
    },
    Classes(&'a [events::ClassScore]),
}

/// Writes the objects of one result. `instances` are the stored source headers,
/// `grid` the source grid of `meta.json`, `created_at_ms` the result's time.
pub fn write_objects(
    spec: &ModelSpec,
    series_uid: &str,
    revision: u32,
    instances: Vec<SourceInstance>,
    grid: &Grid,
    finding: Finding<'_>,
    created_at_ms: u64,
) -> Result<Vec<Written>, String> {
    let source = source_series(instances, grid, &finding)?;
    let ctx = ResultContext {
        identity: ResultIdentity {
            source_series_uid: series_uid.to_owned(),
            revision,
            model: spec.reference(),
        },
        source: &source,
        algorithm: Algorithm::from_model(spec),
        created: created(created_at_ms),
        seg_series_number: SEG_SERIES_NUMBER,
        sr_series_number: SR_SERIES_NUMBER,
    };
    match finding {
        Finding::Labels {
            on_source,
            stats,
            fractions,
        } => {
            let segments = SegmentDescription::from_model(spec);
            let pixels = match fractions {
                Some(fractions) => SegPixels::Fractions(fractions),
                None => SegPixels::Labels(on_source.data.view()),
            };
            let mut seg = Vec::new();
            let written = write_seg(&mut seg, &ctx, &segments, pixels)
                .map_err(|e| format!("cannot write the SEG: {e}"))?;
            let volumes: Vec<SegmentVolume> = segments
                .iter()
                .map(|s| SegmentVolume {
                    volume_ml: stats
                        .iter()
                        .find(|l| l.index == s.label)
                        .map_or(0.0, |l| l.volume_ml),
                    segment: s.clone(),
                })
                .collect();
            let mut sr = Vec::new();
            let sr_written = write_sr(
                &mut sr,
                &ctx,
                &Measurements::Volumes {
                    seg: &written,
                    volumes: &volumes,
                },
            )
            .map_err(|e| format!("cannot write the SR: {e}"))?;
            Ok(vec![
                Written {
                    object: DicomObject {
                        file: SEG_FILE.into(),
                        sop_class_uid: SEGMENTATION_STORAGE.into(),
                        sop_instance_uid: written.sop_instance_uid,
                        series_instance_uid: written.series_instance_uid,
                    },
                    bytes: seg,
                },
                sr_file(sr_written, sr),
            ])
        }
        Finding::Classes(classes) => {
            let scores: Vec<ClassScore> = classes
                .iter()
                .map(|c| ClassScore {
                    name: c.name.clone(),
                    label: c.index,
                    finding: spec.label_codes(c.index).property_type,
                    score: c.score,
                })
                .collect();
            let mut sr = Vec::new();
            let sr_written = write_sr(
                &mut sr,
                &ctx,
                &Measurements::Scores {
                    scores: &scores,
                    probability: spec.activation != Activation::None,
                },
            )
            .map_err(|e| format!("cannot write the SR: {e}"))?;
            Ok(vec![sr_file(sr_written, sr)])
        }
    }
}

fn sr_file(written: radflow_results::SrWritten, bytes: Vec<u8>) -> Written {
    Written {
        object: DicomObject {
            file: SR_FILE.into(),
            sop_class_uid: COMPREHENSIVE_3D_SR_STORAGE.into(),
            sop_instance_uid: written.sop_instance_uid,
            series_instance_uid: written.series_instance_uid,
        },
        bytes,
    }
}

/// The source series of a result: for a label map exactly the planes of its grid; for
/// class scores (which reference the series, not planes) every image of the stack.
fn source_series(
    instances: Vec<SourceInstance>,
    grid: &Grid,
    finding: &Finding<'_>,
) -> Result<SourceSeries, String> {
    match finding {
        Finding::Labels { on_source, .. } => {
            if on_source.grid != *grid {
                return Err("the label map is not on the source grid".into());
            }
            match_grid(instances, grid).map_err(|e| e.to_string())
        }
        Finding::Classes(_) => match match_grid(instances.clone(), grid) {
            Ok(series) => Ok(series),
            Err(_) => SourceSeries::new(instances).map_err(|e| e.to_string()),
        },
    }
}

/// Content Date and Time (UTC) of a result made at `ms` since the epoch.
fn created(ms: u64) -> Created {
    let at = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    Created {
        date: format!("{:04}{:02}{:02}", at.year(), u8::from(at.month()), at.day()),
        time: format!("{:02}{:02}{:02}", at.hour(), at.minute(), at.second()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_date_and_time_are_utc() {
        // 2026-12-07 20:10:27 UTC.
        let c = created(1_796_674_227_000);
        assert_eq!((c.date.as_str(), c.time.as_str()), ("20261207", "201027"));
        assert_eq!(created(0).date, "19700101");
    }
}
