//! Deterministic UIDs of the objects radflow writes.
//!
//! A result is a pure function of (source series, revision, model@version), so its
//! DICOM identities are too: re-running a model on the same series revision gives the
//! same SOP Instance and Series Instance UIDs, and a PACS replaces the object instead
//! of storing a second copy. UIDs are `2.25.<decimal>` (PS3.5 §B.2: a UUID-like
//! 128-bit integer under the `2.25` root) of the first 128 bits of a SHA-256 over the
//! inputs, at most 44 characters.

use sha2::{Digest, Sha256};

/// What a UID identifies; part of the hashed input, so each kind gets its own UID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidKind {
    /// The SEG's series.
    SegSeries,
    /// The SEG instance.
    SegInstance,
    /// The SEG's Dimension Organization.
    SegDimensionOrganization,
    /// The SR's series.
    SrSeries,
    /// The SR instance.
    SrInstance,
    /// The Tracking Unique Identifier of one segment (label value) in the SR.
    Tracking(u8),
}

impl UidKind {
    fn tag(&self) -> String {
        match self {
            UidKind::SegSeries => "seg-series".into(),
            UidKind::SegInstance => "seg-instance".into(),
            UidKind::SegDimensionOrganization => "seg-dimension-organization".into(),
            UidKind::SrSeries => "sr-series".into(),
            UidKind::SrInstance => "sr-instance".into(),
            UidKind::Tracking(label) => format!("tracking-{label}"),
        }
    }
}

/// The identity a result's UIDs are derived from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultIdentity {
    /// Series Instance UID of the source series.
    pub source_series_uid: String,
    /// Revision of the source series (starts at 1).
    pub revision: u32,
    /// `name@version` of the model.
    pub model: String,
}

impl ResultIdentity {
    /// The UID of one object kind of this result: `2.25.<decimal>`, at most 44
    /// characters.
    pub fn uid(&self, kind: UidKind) -> String {
        let mut hash = Sha256::new();
        // Fields are separated by a byte no UID or model reference contains.
        for part in [
            self.source_series_uid.as_bytes(),
            self.revision.to_string().as_bytes(),
            self.model.as_bytes(),
            kind.tag().as_bytes(),
        ] {
            hash.update(part);
            hash.update([0u8]);
        }
        let digest = hash.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        format!("2.25.{}", u128::from_be_bytes(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(revision: u32) -> ResultIdentity {
        ResultIdentity {
            source_series_uid: "1.2.826.0.1.3680043.8.498.1".into(),
            revision,
            model: "demo-tissue@1.0.0".into(),
        }
    }

    #[test]
    fn uids_are_stable_distinct_and_valid() {
        let a = id(1);
        assert_eq!(a.uid(UidKind::SegInstance), id(1).uid(UidKind::SegInstance));
        assert_ne!(a.uid(UidKind::SegInstance), id(2).uid(UidKind::SegInstance));
        assert_ne!(a.uid(UidKind::SegInstance), a.uid(UidKind::SegSeries));
        assert_ne!(a.uid(UidKind::Tracking(1)), a.uid(UidKind::Tracking(2)));
        for kind in [
            UidKind::SegSeries,
            UidKind::SrInstance,
            UidKind::Tracking(3),
        ] {
            let uid = a.uid(kind);
            assert!(uid.len() <= 64 && uid.starts_with("2.25."), "{uid}");
            let digits = &uid[5..];
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{uid}");
            assert!(digits == "0" || !digits.starts_with('0'), "{uid}");
        }
    }
}
