//! Attribute access: the values of a parsed data set the header reading needs, as
//! text, numbers and sequence items, tolerant of padding and of values left as raw
//! bytes; nothing here fails, a missing or invalid value is `None` or empty.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

pub(super) fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(|c: char| c == ' ' || c == '\0').to_owned())
        .unwrap_or_default()
}

pub(super) fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.get(tag)
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| !v.is_empty() && v.iter().all(|x| x.is_finite()))
}

pub(super) fn float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    floats(obj, tag).and_then(|v| v.first().copied())
}

pub(super) fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag).and_then(|e| e.to_int::<i64>().ok())
}

pub(super) fn strings(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<String>> {
    obj.get(tag)
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| v.iter().map(|s| s.trim().to_owned()).collect())
}

/// The first item of a sequence.
pub(super) fn item(obj: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    obj.get(tag).and_then(|e| e.items()).and_then(|i| i.first())
}

/// SOP Class UID from the data set, else from the file meta group.
pub(super) fn sop_class_uid(obj: &DefaultDicomObject) -> String {
    let s = text(obj, tags::SOP_CLASS_UID);
    if s.is_empty() {
        obj.meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0')
            .to_owned()
    } else {
        s
    }
}

pub(super) fn position(obj: &InMemDicomObject) -> Option<[f64; 3]> {
    floats(obj, tags::IMAGE_POSITION_PATIENT)
        .filter(|v| v.len() >= 3)
        .map(|v| [v[0], v[1], v[2]])
}

pub(super) fn orientation(obj: &InMemDicomObject) -> Option<[f64; 6]> {
    floats(obj, tags::IMAGE_ORIENTATION_PATIENT)
        .filter(|v| v.len() >= 6)
        .map(|v| [v[0], v[1], v[2], v[3], v[4], v[5]])
}

pub(super) fn pixel_spacing(obj: &InMemDicomObject) -> Option<[f64; 2]> {
    floats(obj, tags::PIXEL_SPACING)
        .filter(|v| v.len() >= 2 && v[0] > 0.0 && v[1] > 0.0)
        .map(|v| [v[0], v[1]])
}

/// The element `(group, xxNN)` of the private block reserved by `creator`.
pub(super) fn private_element<'a>(
    obj: &'a InMemDicomObject,
    group: u16,
    creator: &str,
    element: u8,
) -> Option<&'a InMemElement> {
    let block = (0x10u16..=0xFF).find(|b| text(obj, Tag(group, *b)) == creator)?;
    obj.get(Tag(group, (block << 8) | u16::from(element)))
}

/// An unsigned value, whether parsed as a number or left as two raw bytes (UN).
pub(super) fn private_uint(e: &InMemElement) -> Option<u32> {
    match e.value() {
        dicom_core::DicomValue::Primitive(dicom_core::PrimitiveValue::U8(b)) if b.len() == 2 => {
            Some(u32::from(u16::from_le_bytes([b[0], b[1]])))
        }
        _ => e.to_int::<u32>().ok(),
    }
}
