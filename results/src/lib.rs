//! DICOM results: the Segmentation (SEG) and Structured Report (SR) of a model's
//! result, written from plain inputs (a label map or class scores, the source series'
//! headers, the model's registry entry) so that the stage that makes a result can
//! store them beside it.
//!
//! What goes in is exactly what radflow reports elsewhere: the SEG encodes the label
//! map on the source grid voxel for voxel, the SR the volumes of `summary.json` mL for
//! mL. Patient and study attributes are copied from the source, never made up; every
//! UID is derived from (source series, revision, model@version), so a re-run replaces
//! its objects. The crate writes and reads headers only, never pixel data: it needs no
//! image codec.
//!
//! # Layout
//!
//! - [`header`]: the bounded reader of one source instance's header.
//! - [`source`]: the source series in slice order.
//! - [`grid`]: which stored instances are the planes of a label map's grid.
//! - [`segment`]: segment descriptions and the algorithm, from the model registry.
//! - [`uid`]: deterministic UIDs.
//! - [`dataset`]: data set helpers and Part-10 writing with streamed pixel data.
//! - [`seg`]: the SEG writer.
//! - [`sr`]: the TID 1500 Comprehensive 3D SR writer.

pub mod dataset;
pub mod grid;
pub mod header;
pub mod seg;
pub mod segment;
pub mod source;
pub mod sr;
pub mod uid;

use dicom_core::VR;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

pub use grid::{GridMismatch, match_grid};
pub use header::{HeaderError, SourceInstance, read_source, read_source_file};
pub use seg::{SegPixels, SegWritten, write_seg};
pub use segment::{Algorithm, SegmentDescription};
pub use source::{SeriesError, SourceSeries};
pub use sr::{ClassScore, Measurements, SegmentVolume, SrWritten, write_sr};
pub use uid::{ResultIdentity, UidKind};

use crate::dataset::{put_str, put_strs};

/// Why an object could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cannot encode the data set: {0}")]
    Dicom(String),
    #[error("cannot write: {0}")]
    Io(#[from] std::io::Error),
}

/// When the objects were made (Content Date and Time): given by the caller, so that
/// writing is a pure function of its inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// `YYYYMMDD`.
    pub date: String,
    /// `HHMMSS`.
    pub time: String,
}

/// Everything the objects of one result share.
#[derive(Debug, Clone)]
pub struct ResultContext<'a> {
    /// What the UIDs are derived from.
    pub identity: ResultIdentity,
    /// The source series.
    pub source: &'a SourceSeries,
    /// The model.
    pub algorithm: Algorithm,
    /// Content Date and Time.
    pub created: Created,
    /// Series Number of the SEG series.
    pub seg_series_number: i32,
    /// Series Number of the SR series.
    pub sr_series_number: i32,
}

/// Attributes every object carries: SOP Common, the copied Patient and Study
/// modules, the series, the equipment (radflow's, not the scanner's: the object was
/// made by radflow) and the content time.
pub(crate) fn common_attributes(
    obj: &mut InMemDicomObject,
    ctx: &ResultContext<'_>,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    series_instance_uid: &str,
    modality: &str,
    series_number: i32,
) {
    let first = ctx.source.first();
    for &(tag, type2) in header::COPIED_TAGS {
        match first.copied.element_opt(tag) {
            Ok(Some(e)) => {
                obj.put(e.clone());
            }
            _ if type2 => {
                let vr = match tag {
                    tags::PATIENT_NAME | tags::REFERRING_PHYSICIAN_NAME => VR::PN,
                    tags::PATIENT_BIRTH_DATE | tags::STUDY_DATE => VR::DA,
                    tags::STUDY_TIME => VR::TM,
                    tags::PATIENT_SEX => VR::CS,
                    tags::STUDY_ID | tags::ACCESSION_NUMBER => VR::SH,
                    tags::STUDY_INSTANCE_UID => VR::UI,
                    _ => VR::LO,
                };
                put_str(obj, tag, vr, "");
            }
            _ => {}
        }
    }
    put_str(obj, tags::SOP_CLASS_UID, VR::UI, sop_class_uid);
    put_str(obj, tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid);
    put_str(obj, tags::INSTANCE_CREATION_DATE, VR::DA, &ctx.created.date);
    put_str(obj, tags::INSTANCE_CREATION_TIME, VR::TM, &ctx.created.time);
    put_str(obj, tags::MODALITY, VR::CS, modality);
    put_str(obj, tags::SERIES_INSTANCE_UID, VR::UI, series_instance_uid);
    put_str(obj, tags::SERIES_NUMBER, VR::IS, &series_number.to_string());
    put_str(
        obj,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &format!(
            "{} {} {}",
            ctx.algorithm.name, ctx.algorithm.version, modality
        ),
    );
    put_str(obj, tags::INSTANCE_NUMBER, VR::IS, "1");
    put_str(obj, tags::CONTENT_DATE, VR::DA, &ctx.created.date);
    put_str(obj, tags::CONTENT_TIME, VR::TM, &ctx.created.time);
    put_str(obj, tags::MANUFACTURER, VR::LO, "radflow");
    put_str(
        obj,
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &ctx.algorithm.name,
    );
    put_str(
        obj,
        tags::DEVICE_SERIAL_NUMBER,
        VR::LO,
        &ctx.algorithm.version,
    );
    put_strs(
        obj,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        &[concat!("radflow ", env!("CARGO_PKG_VERSION"))],
    );
    if modality == "SEG" {
        put_str(
            obj,
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            &first.frame_of_reference_uid,
        );
        put_str(obj, tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
    }
}
