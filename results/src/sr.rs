//! The Structured Report of a result: a Comprehensive 3D SR following TID 1500
//! (Measurement Report).
//!
//! ```text
//! Imaging Measurement Report                      CONTAINER  (TID 1500)
//! ├ Language of Content Item and Descendants     CODE       en-US
//! ├ Observer Type = Device, Device Observer UID and Name     (TID 1001)
//! ├ Procedure reported                            CODE       Imaging procedure
//! └ Imaging Measurements                          CONTAINER
//!   └ Measurement Group, one per segment / class  CONTAINER  (TID 1411 / 1501)
//!     ├ Tracking Identifier, Tracking Unique Identifier
//!     ├ Finding                                   CODE       the label's type code
//!     ├ Referenced Segment                        IMAGE      SEG + segment number
//!     ├ Source series for segmentation            UIDREF
//!     └ Volume (mL) or the class score            NUM
//!       └ Algorithm Name, Version, Parameters (the SHA-256)  (TID 4019)
//! ```
//!
//! The Current Requested Procedure Evidence lists the source instances and the SEG.

use std::io::Write;

use dicom_core::VR;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use radflow_shared::models::Code;
use sha2::{Digest, Sha256};

use crate::dataset::{code_item, ds, put_seq, put_str, put_u16, write_part10};
use crate::seg::{SEGMENTATION_STORAGE, SegWritten};
use crate::segment::SegmentDescription;
use crate::uid::UidKind;
use crate::{ResultContext, WriteError, common_attributes};

/// Comprehensive 3D SR Storage.
pub const COMPREHENSIVE_3D_SR_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.88.34";

/// The volume of one segment.
#[derive(Debug, Clone)]
pub struct SegmentVolume {
    /// The segment.
    pub segment: SegmentDescription,
    /// Its volume in millilitres, as `summary.json` reports it.
    pub volume_ml: f64,
}

/// One class score of a classification model.
#[derive(Debug, Clone)]
pub struct ClassScore {
    /// Class name (the Tracking Identifier).
    pub name: String,
    /// Class index.
    pub label: u8,
    /// What the class means (the Finding).
    pub finding: Code,
    /// The score, as `summary.json` reports it.
    pub score: f64,
}

/// What the SR reports.
#[derive(Debug, Clone)]
pub enum Measurements<'a> {
    /// Segmentation: the volume of every segment of the SEG.
    Volumes {
        /// The SEG the volumes refer to.
        seg: &'a SegWritten,
        /// The volumes, one per segment of the SEG.
        volumes: &'a [SegmentVolume],
    },
    /// Classification: the class scores; `probability` says whether they are
    /// probabilities (DCM 122157 "Probability") or raw scores (SCT 246262008).
    Scores {
        scores: &'a [ClassScore],
        probability: bool,
    },
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrWritten {
    /// SOP Instance UID of the SR.
    pub sop_instance_uid: String,
    /// Series Instance UID of the SR.
    pub series_instance_uid: String,
}

/// Writes the SR as a Part-10 file into `out`.
pub fn write_sr(
    out: &mut dyn Write,
    ctx: &ResultContext<'_>,
    measurements: &Measurements<'_>,
) -> Result<SrWritten, WriteError> {
    let sop_instance_uid = ctx.identity.uid(UidKind::SrInstance);
    let series_instance_uid = ctx.identity.uid(UidKind::SrSeries);
    let mut obj = InMemDicomObject::new_empty();
    common_attributes(
        &mut obj,
        ctx,
        COMPREHENSIVE_3D_SR_STORAGE,
        &sop_instance_uid,
        &series_instance_uid,
        "SR",
        ctx.sr_series_number,
    );
    put_seq(
        &mut obj,
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    );
    put_str(&mut obj, tags::COMPLETION_FLAG, VR::CS, "COMPLETE");
    put_str(&mut obj, tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED");
    put_seq(&mut obj, tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]);
    put_seq(
        &mut obj,
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence(ctx, measurements)],
    );

    // Root content item.
    put_str(&mut obj, tags::VALUE_TYPE, VR::CS, "CONTAINER");
    put_seq(
        &mut obj,
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![code_item(&dcm("126000", "Imaging Measurement Report"))],
    );
    put_str(&mut obj, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    let mut template = InMemDicomObject::new_empty();
    put_str(&mut template, tags::MAPPING_RESOURCE, VR::CS, "DCMR");
    put_str(&mut template, tags::TEMPLATE_IDENTIFIER, VR::CS, "1500");
    put_seq(&mut obj, tags::CONTENT_TEMPLATE_SEQUENCE, vec![template]);

    let groups: Vec<InMemDicomObject> = match measurements {
        Measurements::Volumes { seg, volumes } => {
            if volumes.len() != seg.segments.len() {
                return Err(WriteError::Input(format!(
                    "{} volumes for a SEG of {} segments",
                    volumes.len(),
                    seg.segments.len()
                )));
            }
            volumes
                .iter()
                .map(|v| volume_group(ctx, seg, v))
                .collect::<Result<_, _>>()?
        }
        Measurements::Scores {
            scores,
            probability,
        } => scores
            .iter()
            .map(|s| score_group(ctx, s, *probability))
            .collect::<Result<_, _>>()?,
    };
    let mut measurements_container = container("CONTAINS", dcm("126010", "Imaging Measurements"));
    put_seq(&mut measurements_container, tags::CONTENT_SEQUENCE, groups);

    let model = format!("{}@{}", ctx.algorithm.name, ctx.algorithm.version);
    put_seq(
        &mut obj,
        tags::CONTENT_SEQUENCE,
        vec![
            code(
                "HAS CONCEPT MOD",
                dcm("121049", "Language of Content Item and Descendants"),
                &Code::new("RFC5646", "en-US", "English (United States)"),
            ),
            code(
                "HAS OBS CONTEXT",
                dcm("121005", "Observer Type"),
                &dcm("121007", "Device"),
            ),
            uidref(
                "HAS OBS CONTEXT",
                dcm("121012", "Device Observer UID"),
                &device_uid(&model),
            ),
            text(
                "HAS OBS CONTEXT",
                dcm("121013", "Device Observer Name"),
                &model,
            )?,
            code(
                "HAS CONCEPT MOD",
                dcm("121058", "Procedure reported"),
                &Code::new("SCT", "363679005", "Imaging procedure"),
            ),
            measurements_container,
        ],
    );
    write_part10(
        out,
        COMPREHENSIVE_3D_SR_STORAGE,
        &sop_instance_uid,
        &obj,
        None,
    )?;
    Ok(SrWritten {
        sop_instance_uid,
        series_instance_uid,
    })
}

/// The Device Observer UID of a model: `2.25.` of a hash of `name@version`, the same
/// for every result of that model version.
pub fn device_uid(model: &str) -> String {
    let digest = Sha256::digest(format!("radflow device\0{model}").as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(first))
}

fn dcm(value: &str, meaning: &str) -> Code {
    Code::new("DCM", value, meaning)
}

fn item(relationship: &str, value_type: &str, concept: Code) -> InMemDicomObject {
    let mut item = InMemDicomObject::new_empty();
    put_str(&mut item, tags::RELATIONSHIP_TYPE, VR::CS, relationship);
    put_str(&mut item, tags::VALUE_TYPE, VR::CS, value_type);
    put_seq(
        &mut item,
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![code_item(&concept)],
    );
    item
}

fn container(relationship: &str, concept: Code) -> InMemDicomObject {
    let mut c = item(relationship, "CONTAINER", concept);
    put_str(&mut c, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    c
}

fn code(relationship: &str, concept: Code, value: &Code) -> InMemDicomObject {
    let mut c = item(relationship, "CODE", concept);
    put_seq(&mut c, tags::CONCEPT_CODE_SEQUENCE, vec![code_item(value)]);
    c
}

fn text(relationship: &str, concept: Code, value: &str) -> Result<InMemDicomObject, WriteError> {
    if value.is_empty() {
        return Err(WriteError::Input(format!(
            "{} must not be empty",
            concept.meaning
        )));
    }
    let mut c = item(relationship, "TEXT", concept);
    put_str(&mut c, tags::TEXT_VALUE, VR::UT, value);
    Ok(c)
}

fn uidref(relationship: &str, concept: Code, value: &str) -> InMemDicomObject {
    let mut c = item(relationship, "UIDREF", concept);
    put_str(&mut c, tags::UID, VR::UI, value);
    c
}

fn num(
    concept: Code,
    value: f64,
    unit: &Code,
    ctx: &ResultContext<'_>,
) -> Result<InMemDicomObject, WriteError> {
    if !value.is_finite() {
        return Err(WriteError::Input(format!(
            "{} is not a finite number",
            concept.meaning
        )));
    }
    let mut c = item("CONTAINS", "NUM", concept);
    let mut measured = InMemDicomObject::new_empty();
    put_str(&mut measured, tags::NUMERIC_VALUE, VR::DS, &ds(value));
    put_seq(
        &mut measured,
        tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
        vec![code_item(unit)],
    );
    put_seq(&mut c, tags::MEASURED_VALUE_SEQUENCE, vec![measured]);
    put_seq(&mut c, tags::CONTENT_SEQUENCE, algorithm(ctx)?);
    Ok(c)
}

/// TID 4019 Algorithm Identification; the model's SHA-256 is its parameter.
fn algorithm(ctx: &ResultContext<'_>) -> Result<Vec<InMemDicomObject>, WriteError> {
    let a = &ctx.algorithm;
    Ok(vec![
        text("HAS CONCEPT MOD", dcm("111001", "Algorithm Name"), &a.name)?,
        text(
            "HAS CONCEPT MOD",
            dcm("111003", "Algorithm Version"),
            &a.version,
        )?,
        text(
            "HAS CONCEPT MOD",
            dcm("111002", "Algorithm Parameters"),
            &format!("sha256={}", a.sha256),
        )?,
    ])
}

fn tracking(
    ctx: &ResultContext<'_>,
    name: &str,
    label: u8,
) -> Result<[InMemDicomObject; 2], WriteError> {
    Ok([
        text(
            "HAS OBS CONTEXT",
            dcm("112039", "Tracking Identifier"),
            name,
        )?,
        uidref(
            "HAS OBS CONTEXT",
            dcm("112040", "Tracking Unique Identifier"),
            &ctx.identity.uid(UidKind::Tracking(label)),
        ),
    ])
}

fn volume_group(
    ctx: &ResultContext<'_>,
    seg: &SegWritten,
    v: &SegmentVolume,
) -> Result<InMemDicomObject, WriteError> {
    let number = seg
        .segments
        .iter()
        .find(|(label, _)| *label == v.segment.label)
        .map(|(_, n)| *n)
        .ok_or_else(|| {
            WriteError::Input(format!(
                "label {} is not a segment of the SEG",
                v.segment.label
            ))
        })?;
    let mut group = container("CONTAINS", dcm("125007", "Measurement Group"));
    let mut template = InMemDicomObject::new_empty();
    put_str(&mut template, tags::MAPPING_RESOURCE, VR::CS, "DCMR");
    put_str(&mut template, tags::TEMPLATE_IDENTIFIER, VR::CS, "1411");
    put_seq(&mut group, tags::CONTENT_TEMPLATE_SEQUENCE, vec![template]);
    let mut segment = item("CONTAINS", "IMAGE", dcm("121191", "Referenced Segment"));
    let mut reference = InMemDicomObject::new_empty();
    put_str(
        &mut reference,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        SEGMENTATION_STORAGE,
    );
    put_str(
        &mut reference,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        &seg.sop_instance_uid,
    );
    put_u16(&mut reference, tags::REFERENCED_SEGMENT_NUMBER, &[number]);
    put_seq(&mut segment, tags::REFERENCED_SOP_SEQUENCE, vec![reference]);
    let [id, uid] = tracking(ctx, &v.segment.name, v.segment.label)?;
    put_seq(
        &mut group,
        tags::CONTENT_SEQUENCE,
        vec![
            id,
            uid,
            code(
                "CONTAINS",
                dcm("121071", "Finding"),
                &v.segment.property_type,
            ),
            segment,
            uidref(
                "CONTAINS",
                dcm("121232", "Source series for segmentation"),
                &ctx.source.first().series_instance_uid,
            ),
            num(
                Code::new("SCT", "118565006", "Volume"),
                v.volume_ml,
                &Code::new("UCUM", "ml", "mL"),
                ctx,
            )?,
        ],
    );
    Ok(group)
}

fn score_group(
    ctx: &ResultContext<'_>,
    s: &ClassScore,
    probability: bool,
) -> Result<InMemDicomObject, WriteError> {
    let mut group = container("CONTAINS", dcm("125007", "Measurement Group"));
    let mut template = InMemDicomObject::new_empty();
    put_str(&mut template, tags::MAPPING_RESOURCE, VR::CS, "DCMR");
    put_str(&mut template, tags::TEMPLATE_IDENTIFIER, VR::CS, "1501");
    put_seq(&mut group, tags::CONTENT_TEMPLATE_SEQUENCE, vec![template]);
    let concept = if probability {
        dcm("122157", "Probability")
    } else {
        Code::new("SCT", "246262008", "Score (attribute)")
    };
    let [id, uid] = tracking(ctx, &s.name, s.label)?;
    put_seq(
        &mut group,
        tags::CONTENT_SEQUENCE,
        vec![
            id,
            uid,
            code("CONTAINS", dcm("121071", "Finding"), &s.finding),
            num(concept, s.score, &Code::new("UCUM", "1", "no units"), ctx)?,
        ],
    );
    Ok(group)
}

/// Current Requested Procedure Evidence: the source instances, and the SEG.
fn evidence(ctx: &ResultContext<'_>, measurements: &Measurements<'_>) -> InMemDicomObject {
    let sop = |class: &str, instance: &str| {
        let mut item = InMemDicomObject::new_empty();
        put_str(&mut item, tags::REFERENCED_SOP_CLASS_UID, VR::UI, class);
        put_str(
            &mut item,
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            instance,
        );
        item
    };
    let series = |uid: &str, items: Vec<InMemDicomObject>| {
        let mut s = InMemDicomObject::new_empty();
        put_str(&mut s, tags::SERIES_INSTANCE_UID, VR::UI, uid);
        put_seq(&mut s, tags::REFERENCED_SOP_SEQUENCE, items);
        s
    };
    let first = ctx.source.first();
    let mut list = vec![series(
        &first.series_instance_uid,
        ctx.source
            .slices()
            .iter()
            .map(|s| sop(&s.sop_class_uid, &s.sop_instance_uid))
            .collect(),
    )];
    if let Measurements::Volumes { seg, .. } = measurements {
        list.push(series(
            &seg.series_instance_uid,
            vec![sop(SEGMENTATION_STORAGE, &seg.sop_instance_uid)],
        ));
    }
    let mut study = InMemDicomObject::new_empty();
    let study_uid = first
        .copied
        .element_opt(tags::STUDY_INSTANCE_UID)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok().map(|s| s.trim_end_matches('\0').to_owned()))
        .unwrap_or_default();
    put_str(&mut study, tags::STUDY_INSTANCE_UID, VR::UI, &study_uid);
    put_seq(&mut study, tags::REFERENCED_SERIES_SEQUENCE, list);
    study
}
