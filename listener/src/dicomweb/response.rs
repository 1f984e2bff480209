//! The STOW-RS store response (PS3.18 10.5.3): which instances were stored, which
//! failed and why, as DICOM JSON (`application/dicom+json`, PS3.18 F.2) or as the
//! Native DICOM Model in XML (`application/dicom+xml`, PS3.19 A.1).
//!
//! - Referenced SOP Sequence (0008,1199): one item per stored instance, with its
//!   Referenced SOP Class UID (0008,1150) and Referenced SOP Instance UID (0008,1155);
//! - Failed SOP Sequence (0008,1198): one item per failed part, with the UIDs when the
//!   part had valid ones and the Failure Reason (0008,1197), a DIMSE status code.
//!
//! Retrieve URL (0008,1190) is left out: it is present only when the instances can be
//! retrieved with WADO-RS, which this server does not serve. Only validated UIDs (digits
//! and dots) ever appear, so nothing from a dataset needs escaping and no patient data
//! can leak into a response.

use axum::http::StatusCode;

/// Failure Reason: the instance could not be kept now (store or bus); retry later.
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// Failure Reason: the dataset does not fit its SOP class, or its study is not the
/// one of the request's URL.
pub const DATASET_MISMATCH: u16 = 0xA900;
/// Failure Reason: the part cannot be understood (not Part 10, broken structure).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
/// Failure Reason: the SOP class is not one this server stores.
pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Failure Reason: processing failure (the request body broke off inside the part).
pub const PROCESSING_FAILURE: u16 = 0x0110;

/// What became of one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// SOP Class UID, when known and valid.
    pub sop_class_uid: Option<String>,
    /// SOP Instance UID, when known and valid.
    pub sop_instance_uid: Option<String>,
    /// `None` when stored, else the Failure Reason.
    pub failure: Option<u16>,
}

/// The response format the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

impl Format {
    /// From the Accept header: XML only when asked for and JSON is not; JSON otherwise
    /// (also for `*/*` or no header, PS3.18's default for STOW-RS responses).
    pub fn from_accept(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Format::Json;
        };
        let accept = accept.to_ascii_lowercase();
        if accept.contains("xml") && !accept.contains("json") {
            Format::Xml
        } else {
            Format::Json
        }
    }

    /// The Content-Type of the response.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/dicom+json",
            Format::Xml => "application/dicom+xml",
        }
    }
}

/// HTTP status by PS3.18 10.5.3: 200 when every instance was stored, 202 when some
/// failed, 409 when all failed.
pub fn status(outcomes: &[Outcome]) -> StatusCode {
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    if failed == 0 {
        StatusCode::OK
    } else if failed < outcomes.len() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CONFLICT
    }
}

/// The response body in `format`.
pub fn encode(outcomes: &[Outcome], format: Format) -> String {
    match format {
        Format::Json => json(outcomes),
        Format::Xml => xml(outcomes),
    }
}

fn stored(outcomes: &[Outcome]) -> impl Iterator<Item = &Outcome> {
    outcomes.iter().filter(|o| o.failure.is_none())
}

fn failed(outcomes: &[Outcome]) -> impl Iterator<Item = &Outcome> {
    outcomes.iter().filter(|o| o.failure.is_some())
}

fn json(outcomes: &[Outcome]) -> String {
    use serde_json::{Map, Value, json};
    let ui = |v: &Option<String>| match v {
        Some(uid) => json!({"vr": "UI", "Value": [uid]}),
        None => json!({"vr": "UI"}),
    };
    let item = |o: &Outcome| {
        let mut m = Map::new();
        m.insert("00081150".into(), ui(&o.sop_class_uid));
        m.insert("00081155".into(), ui(&o.sop_instance_uid));
        if let Some(reason) = o.failure {
            m.insert("00081197".into(), json!({"vr": "US", "Value": [reason]}));
        }
        Value::Object(m)
    };
    let mut top = Map::new();
    let failures: Vec<Value> = failed(outcomes).map(item).collect();
    if !failures.is_empty() {
        top.insert("00081198".into(), json!({"vr": "SQ", "Value": failures}));
    }
    let references: Vec<Value> = stored(outcomes).map(item).collect();
    if !references.is_empty() {
        top.insert("00081199".into(), json!({"vr": "SQ", "Value": references}));
    }
    Value::Object(top).to_string()
}

fn xml(outcomes: &[Outcome]) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <NativeDicomModel xmlns=\"http://dicom.nema.org/PS3.19/models/NativeDICOM\">\n",
    );
    let attribute = |out: &mut String, tag: &str, vr: &str, keyword: &str, value: Option<&str>| {
        let _ = write!(
            out,
            "<DicomAttribute tag=\"{tag}\" vr=\"{vr}\" keyword=\"{keyword}\">"
        );
        if let Some(v) = value {
            let _ = write!(out, "<Value number=\"1\">{v}</Value>");
        }
        out.push_str("</DicomAttribute>\n");
    };
    let sequence = |out: &mut String, tag: &str, keyword: &str, items: Vec<&Outcome>| {
        if items.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "<DicomAttribute tag=\"{tag}\" vr=\"SQ\" keyword=\"{keyword}\">"
        );
        for (n, o) in items.into_iter().enumerate() {
            let _ = writeln!(out, "<Item number=\"{}\">", n + 1);
            attribute(
                out,
                "00081150",
                "UI",
                "ReferencedSOPClassUID",
                o.sop_class_uid.as_deref(),
            );
            attribute(
                out,
                "00081155",
                "UI",
                "ReferencedSOPInstanceUID",
                o.sop_instance_uid.as_deref(),
            );
            if let Some(reason) = o.failure {
                attribute(
                    out,
                    "00081197",
                    "US",
                    "FailureReason",
                    Some(&reason.to_string()),
                );
            }
            out.push_str("</Item>\n");
        }
        out.push_str("</DicomAttribute>\n");
    };
    sequence(
        &mut out,
        "00081198",
        "FailedSOPSequence",
        failed(outcomes).collect(),
    );
    sequence(
        &mut out,
        "00081199",
        "ReferencedSOPSequence",
        stored(outcomes).collect(),
    );
    out.push_str("</NativeDicomModel>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes() -> Vec<Outcome> {
        vec![
            Outcome {
                sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
                sop_instance_uid: Some("1.2.3.1".into()),
                failure: None,
            },
            Outcome {
                sop_class_uid: None,
                sop_instance_uid: None,
                failure: Some(CANNOT_UNDERSTAND),
            },
            Outcome {
                sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
                sop_instance_uid: Some("1.2.3.3".into()),
                failure: Some(DATASET_MISMATCH),
            },
        ]
    }

    #[test]
    fn status_by_how_many_failed() {
        let all = outcomes();
        assert_eq!(status(&all[..1]), StatusCode::OK);
        assert_eq!(status(&all), StatusCode::ACCEPTED);
        assert_eq!(status(&all[1..]), StatusCode::CONFLICT);
    }

    #[test]
    fn json_lists_stored_and_failed_instances() {
        let v: serde_json::Value =
            serde_json::from_str(&encode(&outcomes(), Format::Json)).unwrap();
        let referenced = &v["00081199"]["Value"];
        assert_eq!(referenced.as_array().unwrap().len(), 1);
        assert_eq!(referenced[0]["00081155"]["Value"][0], "1.2.3.1");
        assert_eq!(referenced[0]["00081150"]["vr"], "UI");
        let failed = &v["00081198"]["Value"];
        assert_eq!(failed.as_array().unwrap().len(), 2);
        assert_eq!(failed[0]["00081197"]["Value"][0], 0xC000);
        assert!(failed[0]["00081155"].get("Value").is_none());
        assert_eq!(failed[1]["00081197"]["Value"][0], 43264);
        assert_eq!(failed[1]["00081197"]["vr"], "US");
        // All stored: no Failed SOP Sequence at all.
        let v: serde_json::Value =
            serde_json::from_str(&encode(&outcomes()[..1], Format::Json)).unwrap();
        assert!(v.get("00081198").is_none());
    }

    #[test]
    fn xml_is_the_native_model() {
        let x = encode(&outcomes(), Format::Xml);
        assert!(x.starts_with("<?xml"), "{x}");
        assert!(x.contains(
            "<NativeDicomModel xmlns=\"http://dicom.nema.org/PS3.19/models/NativeDICOM\">"
        ));
        let failed = x.find("keyword=\"FailedSOPSequence\"").unwrap();
        let referenced = x.find("keyword=\"ReferencedSOPSequence\"").unwrap();
        assert!(failed < referenced, "sequences in tag order: {x}");
        assert!(x.contains("<Value number=\"1\">43264</Value>"), "{x}");
        assert!(x.contains("<Value number=\"1\">1.2.3.1</Value>"), "{x}");
        assert_eq!(x.matches("<Item number=").count(), 3);
    }

    #[test]
    fn format_follows_accept() {
        assert_eq!(Format::from_accept(None), Format::Json);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Json);
        assert_eq!(
            Format::from_accept(Some("application/dicom+xml")),
            Format::Xml
        );
        assert_eq!(
            Format::from_accept(Some("application/dicom+xml, application/dicom+json")),
            Format::Json
        );
    }
}
