//! De-identification of exported objects: the DICOM Basic Application Confidentiality
//! Profile (PS3.15 Annex E), for destinations outside the hospital.
//!
//! A destination with a `[destination.deidentify]` table receives its SEG and SR only
//! after every attribute of the profile's table (PS3.15 Table E.1-1, [`table`]) has had
//! its action applied, in the top-level dataset and in every sequence item:
//!
//! | action | what radflow does |
//! |---|---|
//! | X | removed |
//! | Z, X/Z | kept with an empty value (type 2 attributes stay present) |
//! | D, Z/D, X/D, X/Z/D | replaced with a dummy value of its VR; a sequence keeps its items, each de-identified in turn |
//! | U | each UID replaced by `2.25.<decimal>` of a keyed hash of it |
//! | X/Z/U* | the sequence is kept and its items de-identified (their UIDs replaced) |
//!
//! Private attributes (odd groups), curves (groups 50xx) and overlay data and comments
//! (60xx,3000 and 60xx,4000) are removed. The options the profile allows are not taken:
//! dates and times are not kept, nor descriptions.
//!
//! UIDs are replaced with an HMAC-SHA-256 keyed by the destination's secret, so the
//! same UID maps to the same replacement in every object and every export: the SR's
//! references to its SEG and to the source images still resolve among de-identified
//! objects, a result sent twice still replaces itself at the destination, and nobody
//! without the key can go back. Patient's Name and Patient ID are replaced with the
//! same keyed pseudonym of the Patient ID (a value the profile allows for these
//! attributes), so a research archive keeps one patient's studies together.
//!
//! Every object then says what was done: Patient Identity Removed `YES`,
//! De-identification Method, De-identification Method Code Sequence (DCM 113100, Basic
//! Application Confidentiality Profile) and Longitudinal Temporal Information Modified
//! `REMOVED`. The object is written again in the transfer syntax it came in, with the
//! File Meta Information's Media Storage SOP Instance UID following its new UID.

mod table;

use std::path::{Path, PathBuf};

use dicom_core::header::{HasLength, Header};
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Shortest key accepted: 128 bits.
pub const MIN_KEY_BYTES: usize = 16;

/// Text of De-identification Method (0012,0063).
const METHOD: &str = "PS3.15 E.1 Basic Application Confidentiality Profile";

/// Hex digits of a patient pseudonym (80 bits).
const PSEUDONYM_HEX: usize = 20;

/// An action of PS3.15 Table E.1-1 (combinations as the table writes them).
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Remove.
    X,
    /// Zero length (or a dummy).
    Z,
    /// A dummy value.
    D,
    /// Replace the UID.
    U,
    ZD,
    XZ,
    XD,
    XZD,
    /// X/Z/U*: a sequence whose UIDs are replaced.
    XZUStar,
}

/// The `[destination.deidentify]` table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidentifyConfig {
    /// A file holding the secret key of the UID and patient pseudonyms (at least 16
    /// bytes; surrounding white space is ignored), e.g. a mounted Secret. Keep it: a
    /// new key gives every object new UIDs.
    pub key_file: PathBuf,
}

/// Why an object could not be de-identified.
#[derive(Debug, thiserror::Error)]
pub enum DeidentifyError {
    #[error("cannot read the de-identification key {path}: {source}")]
    Key {
        path: String,
        source: std::io::Error,
    },
    #[error("the de-identification key {path} is shorter than {MIN_KEY_BYTES} bytes")]
    ShortKey { path: String },
    #[error("not a DICOM file: {0}")]
    Parse(String),
    #[error("unknown transfer syntax {0}")]
    TransferSyntax(String),
    #[error("cannot write the de-identified object: {0}")]
    Write(String),
}

/// The key of one destination's pseudonyms. `Debug` does not show it.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key([redacted])")
    }
}

impl Key {
    /// Reads the key file (a trailing newline or spaces are not part of the key).
    pub fn load(path: &Path) -> Result<Self, DeidentifyError> {
        let raw = std::fs::read(path).map_err(|source| DeidentifyError::Key {
            path: path.display().to_string(),
            source,
        })?;
        let key = raw.trim_ascii().to_vec();
        if key.len() < MIN_KEY_BYTES {
            return Err(DeidentifyError::ShortKey {
                path: path.display().to_string(),
            });
        }
        Ok(Self(key))
    }

    /// A key from bytes, for tests and tools.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    fn mac(&self, domain: &str, value: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The replacement of a UID: `2.25.` and the first 128 bits of its keyed hash as a
    /// decimal (PS3.5 B.2), at most 44 characters.
    pub fn uid(&self, uid: &str) -> String {
        let digest = self.mac("uid", uid.trim_end_matches(['\0', ' ']));
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        format!("2.25.{}", u128::from_be_bytes(first))
    }

    /// The pseudonym that replaces Patient ID and Patient's Name.
    pub fn pseudonym(&self, patient_id: &str) -> String {
        let digest = self.mac("patient", patient_id.trim());
        let hex: String = digest.iter().map(|b| format!("{b:02X}")).collect();
        format!("RF{}", &hex[..PSEUDONYM_HEX])
    }
}

/// De-identifies one Part-10 object held in memory.
pub fn deidentify_part10(bytes: &[u8], key: &Key) -> Result<Vec<u8>, DeidentifyError> {
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(DeidentifyError::Parse(
            "no DICM prefix after the preamble".into(),
        ));
    }
    let object = OpenFileOptions::new()
        .from_reader(&bytes[128..])
        .map_err(|e| DeidentifyError::Parse(e.to_string()))?;
    let meta = object.meta().clone();
    let ts = TransferSyntaxRegistry
        .get(meta.transfer_syntax())
        .ok_or_else(|| DeidentifyError::TransferSyntax(meta.transfer_syntax().to_owned()))?;
    let dataset = deidentify_dataset(object.into_inner(), key);
    let sop_instance_uid = dataset
        .get(tags::SOP_INSTANCE_UID)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_else(|| key.uid(meta.media_storage_sop_instance_uid()));
    let mut builder = FileMetaTableBuilder::new()
        .information_version(meta.information_version)
        .media_storage_sop_class_uid(meta.media_storage_sop_class_uid())
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(meta.transfer_syntax())
        .implementation_class_uid(meta.implementation_class_uid());
    if let Some(name) = &meta.implementation_version_name {
        builder = builder.implementation_version_name(name.trim_end_matches(['\0', ' ']));
    }
    let meta = builder
        .build()
        .map_err(|e| DeidentifyError::Write(e.to_string()))?;
    let mut out = Vec::with_capacity(bytes.len() + 512);
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|e| DeidentifyError::Write(e.to_string()))?;
    dataset
        .write_dataset_with_ts(&mut out, ts)
        .map_err(|e| DeidentifyError::Write(e.to_string()))?;
    Ok(out)
}

/// Applies the profile to a dataset and adds the attributes that record it.
pub fn deidentify_dataset(dataset: InMemDicomObject, key: &Key) -> InMemDicomObject {
    let patient_id = dataset
        .get(tags::PATIENT_ID)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mut out = clean(dataset, key);
    if !patient_id.is_empty() {
        let pseudonym = key.pseudonym(&patient_id);
        out.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            pseudonym.as_str(),
        ));
        out.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::PN,
            pseudonym.as_str(),
        ));
    }
    out.put(DataElement::new(
        tags::PATIENT_IDENTITY_REMOVED,
        VR::CS,
        "YES",
    ));
    out.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD,
        VR::LO,
        METHOD,
    ));
    let code = InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, "113100"),
        DataElement::new(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "DCM"),
        DataElement::new(
            tags::CODE_MEANING,
            VR::LO,
            "Basic Application Confidentiality Profile",
        ),
    ]);
    out.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        VR::SQ,
        DataSetSequence::new(vec![code], Length::UNDEFINED),
    ));
    out.put(DataElement::new(
        tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        VR::CS,
        "REMOVED",
    ));
    out
}

/// The table's action for a tag, or the rule for private attributes, curves and
/// overlays; `None` keeps the attribute (a sequence's items are still cleaned).
fn action(tag: Tag) -> Option<Action> {
    let (group, element) = (tag.group(), tag.element());
    if group % 2 == 1 {
        return Some(Action::X);
    }
    if (0x5000..=0x50FF).contains(&group)
        || ((0x6000..=0x60FF).contains(&group) && matches!(element, 0x3000 | 0x4000))
    {
        return Some(Action::X);
    }
    table::TABLE
        .binary_search_by(|&(g, e, _)| (g, e).cmp(&(group, element)))
        .ok()
        .map(|i| table::TABLE[i].2)
}

fn clean(dataset: InMemDicomObject, key: &Key) -> InMemDicomObject {
    let elements = dataset
        .into_iter()
        .filter_map(|element| clean_element(element, key));
    InMemDicomObject::from_element_iter(elements)
}

type Element = DataElement<InMemDicomObject>;

fn clean_element(element: Element, key: &Key) -> Option<Element> {
    use Action::*;
    let tag = element.tag();
    let vr = element.vr();
    let act = action(tag);
    if vr == VR::SQ || matches!(element.value(), Value::Sequence(_)) {
        return match act {
            Some(X) => None,
            Some(Z | XZ) => Some(DataElement::new(
                tag,
                VR::SQ,
                DataSetSequence::<InMemDicomObject>::new(Vec::new(), Length::UNDEFINED),
            )),
            // Kept (or D, or U*): every item is cleaned by the same table.
            _ => {
                let items = match element.into_value() {
                    Value::Sequence(seq) => seq.into_items().into_iter().collect(),
                    _ => Vec::new(),
                };
                let items: Vec<_> = items.into_iter().map(|item| clean(item, key)).collect();
                Some(DataElement::new(
                    tag,
                    VR::SQ,
                    DataSetSequence::new(items, Length::UNDEFINED),
                ))
            }
        };
    }
    match act {
        None => Some(element),
        Some(X) => None,
        Some(Z | XZ) => Some(DataElement::new(tag, vr, PrimitiveValue::Empty)),
        Some(D | ZD | XD | XZD) => Some(DataElement::new(tag, vr, dummy(vr, &element, key))),
        Some(U) => Some(replace_uids(element, key)),
        // U* on something that is not a sequence: a UID is replaced, anything else emptied.
        Some(XZUStar) if vr == VR::UI => Some(replace_uids(element, key)),
        Some(XZUStar) => Some(DataElement::new(tag, vr, PrimitiveValue::Empty)),
    }
}

fn replace_uids(element: Element, key: &Key) -> Element {
    let tag = element.tag();
    let uids: Vec<String> = element
        .to_multi_str()
        .map(|values| {
            values
                .iter()
                .map(|u| u.trim_end_matches(['\0', ' ']))
                .filter(|u| !u.is_empty())
                .map(|u| key.uid(u))
                .collect()
        })
        .unwrap_or_default();
    if uids.is_empty() {
        return DataElement::new(tag, VR::UI, PrimitiveValue::Empty);
    }
    DataElement::new(tag, VR::UI, PrimitiveValue::Strs(uids.into()))
}

/// A dummy of the VR, the same for every object (it reveals nothing).
fn dummy(vr: VR, element: &Element, key: &Key) -> PrimitiveValue {
    if element.is_empty() {
        return PrimitiveValue::Empty;
    }
    let text = match vr {
        VR::DA => "19000101",
        VR::TM => "000000",
        VR::DT => "19000101000000",
        VR::PN => "ANONYMIZED",
        VR::AE | VR::CS | VR::LO | VR::LT | VR::SH | VR::ST | VR::UC | VR::UT => "ANONYMIZED",
        VR::AS => "000Y",
        VR::IS | VR::DS => "0",
        VR::UR => "",
        VR::UI => {
            let uid = element.to_str().map(|s| key.uid(&s)).unwrap_or_default();
            return PrimitiveValue::from(uid);
        }
        // Binary values (signatures, encapsulated documents) are not kept at all.
        _ => return PrimitiveValue::Empty,
    };
    PrimitiveValue::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn the_table_is_sorted_without_repeats() {
        for pair in table::TABLE.windows(2) {
            assert!((pair[0].0, pair[0].1) < (pair[1].0, pair[1].1), "{pair:x?}");
        }
        assert!(table::TABLE.len() > 600, "{}", table::TABLE.len());
    }

    #[test]
    fn actions_follow_the_table_and_the_rules() {
        use Action::*;
        assert_eq!(action(tags::PATIENT_NAME), Some(Z));
        assert_eq!(action(tags::PATIENT_BIRTH_DATE), Some(Z));
        assert_eq!(action(tags::PATIENT_ADDRESS), Some(X));
        assert_eq!(action(tags::ACCESSION_NUMBER), Some(Z));
        assert_eq!(action(tags::STUDY_INSTANCE_UID), Some(U));
        assert_eq!(action(tags::SOURCE_IMAGE_SEQUENCE), Some(XZUStar));
        assert_eq!(action(tags::CONTENT_DATE), Some(ZD));
        assert_eq!(action(tags::SOP_CLASS_UID), None);
        assert_eq!(action(tags::ROWS), None);
        assert_eq!(action(Tag(0x0029, 0x1010)), Some(X));
        assert_eq!(action(Tag(0x6000, 0x3000)), Some(X));
        assert_eq!(action(Tag(0x6000, 0x0010)), None);
        assert_eq!(action(Tag(0x5002, 0x3000)), Some(X));
    }

    #[test]
    fn uids_are_keyed_consistent_and_valid() {
        let (a, b) = (key(), Key::from_bytes(b"another key of 32 bytes.........."));
        let uid = "1.2.826.0.1.3680043.8.498.12345";
        assert_eq!(a.uid(uid), a.uid(uid));
        assert_eq!(a.uid(uid), a.uid(&format!("{uid}\0")));
        assert_ne!(a.uid(uid), b.uid(uid));
        assert_ne!(a.uid(uid), a.uid("1.2.3"));
        let new = a.uid(uid);
        assert!(new.starts_with("2.25.") && new.len() <= 44, "{new}");
        assert!(new[5..].bytes().all(|c| c.is_ascii_digit()) && !new[5..].starts_with('0'));
        assert_eq!(a.pseudonym("PID-1"), a.pseudonym(" PID-1 "));
        assert_ne!(a.pseudonym("PID-1"), a.pseudonym("PID-2"));
        assert!(format!("{a:?}").contains("redacted"));
    }

    #[test]
    fn a_short_key_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("radflow-deid-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            Key::load(&path),
            Err(DeidentifyError::ShortKey { .. })
        ));
        std::fs::write(&path, "0123456789abcdef-long-enough\n").unwrap();
        assert_eq!(Key::load(&path).unwrap().0, b"0123456789abcdef-long-enough");
        assert!(matches!(
            Key::load(&dir.join("missing")),
            Err(DeidentifyError::Key { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn item(elements: Vec<Element>) -> InMemDicomObject {
        InMemDicomObject::from_element_iter(elements)
    }

    fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> Element {
        DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
    }

    fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
        obj.get(tag)
            .map(|e| e.to_str().map(|s| s.to_string()).unwrap_or_default())
    }

    #[test]
    fn demographics_go_and_references_follow_their_uids() {
        let k = key();
        let source_uid = "1.2.3.4.5.6";
        let dataset = item(vec![
            DataElement::new(tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
            DataElement::new(tags::PATIENT_ID, VR::LO, "MRN-0042"),
            DataElement::new(tags::PATIENT_BIRTH_DATE, VR::DA, "19610412"),
            DataElement::new(tags::PATIENT_ADDRESS, VR::LO, "1 Main Street"),
            DataElement::new(tags::ACCESSION_NUMBER, VR::SH, "ACC-77"),
            DataElement::new(tags::INSTITUTION_NAME, VR::LO, "St Elsewhere"),
            DataElement::new(tags::CONTENT_DATE, VR::DA, "20261201"),
            DataElement::new(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.66.4"),
            DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "9.8.7"),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(16_u16)),
            DataElement::new(Tag(0x0029, 0x0010), VR::LO, "VENDOR"),
            DataElement::new(Tag(0x0029, 0x1010), VR::LO, "Doe^Jane"),
            DataElement::new(
                Tag(0x6000, 0x3000),
                VR::OW,
                PrimitiveValue::from(vec![0u8; 4]),
            ),
            seq(
                tags::REFERENCED_SERIES_SEQUENCE,
                vec![item(vec![
                    DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4"),
                    seq(
                        tags::REFERENCED_INSTANCE_SEQUENCE,
                        vec![item(vec![
                            DataElement::new(
                                tags::REFERENCED_SOP_CLASS_UID,
                                VR::UI,
                                "1.2.840.10008.5.1.4.1.1.2",
                            ),
                            DataElement::new(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, source_uid),
                        ])],
                    ),
                ])],
            ),
            seq(
                tags::REQUEST_ATTRIBUTES_SEQUENCE,
                vec![item(vec![DataElement::new(
                    tags::ACCESSION_NUMBER,
                    VR::SH,
                    "ACC-77",
                )])],
            ),
            seq(
                tags::CONTENT_SEQUENCE,
                vec![item(vec![
                    DataElement::new(tags::VALUE_TYPE, VR::CS, "PNAME"),
                    DataElement::new(tags::PERSON_NAME, VR::PN, "Doe^Jane"),
                    DataElement::new(tags::TEXT_VALUE, VR::UT, "segment 1"),
                ])],
            ),
        ]);
        let out = deidentify_dataset(dataset, &k);

        let pseudonym = k.pseudonym("MRN-0042");
        assert_eq!(
            text(&out, tags::PATIENT_ID).as_deref(),
            Some(pseudonym.as_str())
        );
        assert_eq!(
            text(&out, tags::PATIENT_NAME).as_deref(),
            Some(pseudonym.as_str())
        );
        assert_eq!(text(&out, tags::PATIENT_BIRTH_DATE).as_deref(), Some(""));
        assert_eq!(text(&out, tags::ACCESSION_NUMBER).as_deref(), Some(""));
        assert!(out.get(tags::PATIENT_ADDRESS).is_none());
        assert!(out.get(tags::REQUEST_ATTRIBUTES_SEQUENCE).is_none());
        assert_eq!(
            text(&out, tags::INSTITUTION_NAME).as_deref(),
            Some("ANONYMIZED")
        );
        assert_eq!(text(&out, tags::CONTENT_DATE).as_deref(), Some("19000101"));
        assert!(out.get(Tag(0x0029, 0x0010)).is_none() && out.get(Tag(0x0029, 0x1010)).is_none());
        assert!(out.get(Tag(0x6000, 0x3000)).is_none());
        assert_eq!(out.get(tags::ROWS).unwrap().to_int::<u16>().unwrap(), 16);
        assert_eq!(
            text(&out, tags::SOP_CLASS_UID).as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.66.4")
        );
        assert_eq!(text(&out, tags::SOP_INSTANCE_UID), Some(k.uid("9.8.7")));
        assert_eq!(
            text(&out, tags::PATIENT_IDENTITY_REMOVED).as_deref(),
            Some("YES")
        );
        let method = out
            .get(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
            .unwrap();
        let code = &method.items().unwrap()[0];
        assert_eq!(text(code, tags::CODE_VALUE).as_deref(), Some("113100"));

        let series = &out
            .get(tags::REFERENCED_SERIES_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0];
        assert_eq!(
            text(series, tags::SERIES_INSTANCE_UID),
            Some(k.uid("1.2.3.4"))
        );
        let instance = &series
            .get(tags::REFERENCED_INSTANCE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0];
        assert_eq!(
            text(instance, tags::REFERENCED_SOP_INSTANCE_UID),
            Some(k.uid(source_uid))
        );
        assert_eq!(
            text(instance, tags::REFERENCED_SOP_CLASS_UID).as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        let content = &out.get(tags::CONTENT_SEQUENCE).unwrap().items().unwrap()[0];
        assert_eq!(
            text(content, tags::PERSON_NAME).as_deref(),
            Some("ANONYMIZED")
        );
        assert_eq!(
            text(content, tags::TEXT_VALUE).as_deref(),
            Some("segment 1")
        );
    }
}
