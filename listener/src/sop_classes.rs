//! Which SOP classes and transfer syntaxes the listener accepts.
//!
//! Association negotiation decides per proposed presentation context whether we take it.
//! The abstract syntax must be Verification, a standard Storage SOP class, or one of the
//! private SOP classes an operator configured; the transfer syntax must be one of ours.
//! The standard list comes from the DICOM dictionary rather than a hand-kept table, so new
//! storage classes are accepted as soon as the dictionary knows them.

use dicom_core::dictionary::{UidDictionary, UidDictionaryEntry, UidType};
use dicom_dictionary_std::StandardSopClassDictionary;

/// Verification SOP class (C-ECHO), always accepted.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Implicit VR Little Endian, the DICOM default transfer syntax.
pub const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// Deflated Explicit VR Little Endian.
pub const DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1.99";
/// Explicit VR Big Endian (retired, still sent by old equipment).
pub const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";

/// Transfer syntaxes accepted unless configured otherwise.
///
/// Instances are stored as received, so accepting a compressed syntax only requires the
/// preprocessor to be able to decode it later; the listener itself never decodes pixels.
pub const DEFAULT_TRANSFER_SYNTAXES: &[&str] = &[
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.50",  // JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  // JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  // JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  // JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.80",  // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  // JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  // JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  // JPEG 2000
    "1.2.840.10008.1.2.4.92",  // JPEG 2000 Part 2 Multi-component Lossless
    "1.2.840.10008.1.2.4.93",  // JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.201", // High-Throughput JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.202", // High-Throughput JPEG 2000 with RPCL Options Lossless
    "1.2.840.10008.1.2.4.203", // High-Throughput JPEG 2000
    "1.2.840.10008.1.2.5",     // RLE Lossless
    "1.2.840.10008.1.2.1.98",  // Encapsulated Uncompressed Explicit VR Little Endian
    "1.2.840.10008.1.2.8.1",   // Deflated Image Frame Compression
];

/// The lossless subset of [`DEFAULT_TRANSFER_SYNTAXES`], which `--transfer-syntaxes
/// lossless` accepts: for sites whose models must never see lossy-compressed pixels
/// (a sender that has the original then sends it uncompressed or losslessly coded).
pub const LOSSLESS_TRANSFER_SYNTAXES: &[&str] = &[
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.57", // JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70", // JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.80", // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.92", // JPEG 2000 Part 2 Multi-component Lossless
    "1.2.840.10008.1.2.4.201", // High-Throughput JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.202", // High-Throughput JPEG 2000 with RPCL Options Lossless
    "1.2.840.10008.1.2.5",    // RLE Lossless
    "1.2.840.10008.1.2.1.98", // Encapsulated Uncompressed Explicit VR Little Endian
    "1.2.840.10008.1.2.8.1",  // Deflated Image Frame Compression
];

/// The transfer syntaxes to accept, from an operator's list (`--transfer-syntaxes`):
/// UIDs of transfer syntaxes the DICOM standard defines, and the words `default` (the
/// [`DEFAULT_TRANSFER_SYNTAXES`]) and `lossless` ([`LOSSLESS_TRANSFER_SYNTAXES`]), in
/// any mix. An empty list means the default. Order does not matter: the sender's
/// preference decides among the syntaxes it proposes.
pub fn transfer_syntaxes_from(items: &[String]) -> Result<Vec<String>, String> {
    use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
    fn add(out: &mut Vec<String>, uids: &[&str]) {
        for uid in uids {
            if !out.iter().any(|u| u == uid) {
                out.push((*uid).to_owned());
            }
        }
    }
    let mut out: Vec<String> = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match item {
            "default" => add(&mut out, DEFAULT_TRANSFER_SYNTAXES),
            "lossless" => add(&mut out, LOSSLESS_TRANSFER_SYNTAXES),
            uid if TransferSyntaxRegistry.get(uid).is_some() => add(&mut out, &[uid]),
            other => {
                return Err(format!(
                    "{other:?} is not a transfer syntax UID of the DICOM standard, nor \
                     `default` or `lossless`"
                ));
            }
        }
    }
    if out.is_empty() {
        add(&mut out, DEFAULT_TRANSFER_SYNTAXES);
    }
    Ok(out)
}

/// Names that contain "Storage" in the dictionary but are not services of the Storage
/// Service Class (they are never the subject of a C-STORE).
const NOT_STORAGE: &[&str] = &[
    "Storage Commitment",
    "Media Storage Directory",
    "Storage Management",
];

/// Whether `uid` is a standard Storage SOP class, i.e. one a modality sends with C-STORE.
///
/// Trailing NUL or space padding is ignored. Verification, Storage Commitment and the
/// Media Storage Directory (DICOMDIR) class are not storage classes in this sense.
pub fn is_storage_sop_class(uid: &str) -> bool {
    let uid = uid.trim_end_matches(['\0', ' ']);
    let Some(entry) = StandardSopClassDictionary.by_uid(uid) else {
        return false;
    };
    if !matches!(entry.r#type, UidType::SopClass) {
        return false;
    }
    let name = entry.name();
    name.contains("Storage") && !NOT_STORAGE.iter().any(|n| name.contains(n))
}

/// The human name of a standard SOP class, for log lines; `None` for private classes.
pub fn sop_class_name(uid: &str) -> Option<&'static str> {
    StandardSopClassDictionary
        .by_uid(uid.trim_end_matches(['\0', ' ']))
        .map(|e| e.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_storage_classes_are_accepted() {
        for (uid, what) in [
            ("1.2.840.10008.5.1.4.1.1.2", "CT Image Storage"),
            ("1.2.840.10008.5.1.4.1.1.4", "MR Image Storage"),
            ("1.2.840.10008.5.1.4.1.1.2.1", "Enhanced CT Image Storage"),
            ("1.2.840.10008.5.1.4.1.1.481.3", "RT Structure Set Storage"),
            ("1.2.840.10008.5.1.4.1.1.88.22", "Enhanced SR Storage"),
            ("1.2.840.10008.5.1.4.1.1.104.1", "Encapsulated PDF Storage"),
            ("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation Storage"),
            ("1.2.840.10008.5.1.4.1.1.128", "PET Image Storage"),
        ] {
            assert!(is_storage_sop_class(uid), "{what} ({uid}) must be storage");
        }
    }

    #[test]
    fn transfer_syntax_lists_from_an_operator() {
        let list = |items: &[&str]| {
            transfer_syntaxes_from(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(list(&[]).unwrap(), DEFAULT_TRANSFER_SYNTAXES);
        assert_eq!(list(&[" "]).unwrap(), DEFAULT_TRANSFER_SYNTAXES);
        let lossless = list(&["lossless"]).unwrap();
        assert_eq!(lossless, LOSSLESS_TRANSFER_SYNTAXES);
        assert!(!lossless.iter().any(|u| u == "1.2.840.10008.1.2.4.50"));
        // Every lossless syntax is also a default one.
        assert!(
            lossless
                .iter()
                .all(|u| DEFAULT_TRANSFER_SYNTAXES.contains(&u.as_str()))
        );
        // A standard syntax outside the default (MPEG-4 video), once, after the rest.
        let more = list(&[
            "lossless",
            " 1.2.840.10008.1.2.4.102",
            "1.2.840.10008.1.2.1",
        ]);
        let more = more.unwrap();
        assert_eq!(more.len(), LOSSLESS_TRANSFER_SYNTAXES.len() + 1);
        assert_eq!(more.last().unwrap(), "1.2.840.10008.1.2.4.102");
        for bad in ["1.2.3.4", "jpeg", "1.2.840.10008.5.1.4.1.1.2"] {
            let e = list(&[bad]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn padding_is_ignored() {
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.2\0"));
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.2 "));
    }

    #[test]
    fn non_storage_classes_are_refused() {
        for (uid, what) in [
            ("1.2.840.10008.1.20.1", "Storage Commitment Push Model"),
            ("1.2.840.10008.1.20.2", "Storage Commitment Pull Model"),
            ("1.2.840.10008.1.3.10", "Media Storage Directory Storage"),
            (VERIFICATION, "Verification"),
            ("1.2.840.10008.5.1.4.1.2.1.1", "Patient Root Q/R Find"),
            ("1.2.840.10008.5.1.4.31", "Modality Worklist Find"),
            ("1.2.840.10008.1.2.1", "a transfer syntax"),
            ("1.2.3.4.5.6.7", "an unknown UID"),
            ("", "the empty string"),
        ] {
            assert!(
                !is_storage_sop_class(uid),
                "{what} ({uid}) must not be storage"
            );
        }
    }

    #[test]
    fn names_come_from_the_dictionary() {
        assert_eq!(
            sop_class_name("1.2.840.10008.5.1.4.1.1.2"),
            Some("CT Image Storage")
        );
        assert_eq!(sop_class_name("1.2.3.4"), None);
    }
}
