//! `meta.json`, written beside each prepared volume: the grids and facts a reader of
//! `volume.nii.gz` needs to put its results back on the series.

use radflow_shared::models::Preset;
use serde::{Deserialize, Serialize};

use crate::Grid;

/// What `meta.json` beside each volume says: enough for the inferer to put its output
/// back on the source grid, and for a person to see what was done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub schema_version: u32,
    pub study_uid: String,
    pub series_uid: String,
    pub revision: u32,
    pub correlation_id: String,
    pub modality: String,
    pub preset: Preset,
    /// The native grid of the series (slices ordered along the normal).
    pub source: Grid,
    /// The grid of `volume.nii.gz`.
    pub volume: Grid,
    pub slices: usize,
    pub warnings: Vec<String>,
    /// Why the series may be missing slices, if it may (see `VolumeReady`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_incomplete: Option<String>,
}
