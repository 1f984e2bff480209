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
