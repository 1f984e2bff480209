//! Building data sets and writing them as Part-10 files.
//!
//! Small helpers over `dicom-object`'s in-memory data set, and the one function that
//! writes a Part-10 file: preamble, file meta group and data set through
//! `dicom-object`, then, for a SEG, the Pixel Data element whose value the caller
//! streams straight into the output (Pixel Data is the data set's last element, so its
//! bytes never have to be held as a value).

use std::io::Write;

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;
use radflow_shared::models::Code;

use crate::WriteError;

/// Implementation Class UID of radflow's Part-10 files (`2.25.` of the first 128 bits of SHA-256 over "radflow implementation class").
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.337322333667244214645930924594984310092";
/// Implementation Version Name.
pub const IMPLEMENTATION_VERSION_NAME: &str = "RADFLOW_0_1";

/// Puts a string element (one value, or several joined by `\`).
pub fn put_str(obj: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
}

/// Puts a multi-valued string element.
pub fn put_strs<S: AsRef<str>>(obj: &mut InMemDicomObject, tag: Tag, vr: VR, values: &[S]) {
    let values: Vec<String> = values.iter().map(|s| s.as_ref().to_owned()).collect();
    obj.put(DataElement::new(
        tag,
        vr,
        PrimitiveValue::Strs(values.into()),
    ));
}

/// Puts an element of unsigned 16-bit values (`US`).
pub fn put_u16(obj: &mut InMemDicomObject, tag: Tag, values: &[u16]) {
    obj.put(DataElement::new(
        tag,
        VR::US,
        PrimitiveValue::U16(values.iter().copied().collect()),
    ));
}

/// Puts an element of unsigned 32-bit values (`UL`).
pub fn put_u32(obj: &mut InMemDicomObject, tag: Tag, values: &[u32]) {
    obj.put(DataElement::new(
        tag,
        VR::UL,
        PrimitiveValue::U32(values.iter().copied().collect()),
    ));
}

/// Puts an Attribute Tag element (`AT`).
pub fn put_tag(obj: &mut InMemDicomObject, tag: Tag, value: Tag) {
    obj.put(DataElement::new(
        tag,
        VR::AT,
        PrimitiveValue::Tags([value].into_iter().collect()),
    ));
}

/// Puts a sequence of items.
pub fn put_seq(obj: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// An item holding one coded concept (Code Value, Coding Scheme Designator, Code
/// Meaning).
pub fn code_item(code: &Code) -> InMemDicomObject {
    use dicom_dictionary_std::tags;
    let mut item = InMemDicomObject::new_empty();
    put_str(&mut item, tags::CODE_VALUE, VR::SH, &code.value);
    put_str(
        &mut item,
        tags::CODING_SCHEME_DESIGNATOR,
        VR::SH,
        &code.scheme,
    );
    put_str(&mut item, tags::CODE_MEANING, VR::LO, &code.meaning);
    item
}

/// A decimal string (DS) of at most 16 characters for `v`.
pub fn ds(v: f64) -> String {
    for precision in (0..=10).rev() {
        let s = format!("{v:.precision$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        };
        if s.len() <= 16 {
            return if s == "-0" { "0".into() } else { s };
        }
    }
    format!("{v:.6e}")
}

/// The Pixel Data of a Part-10 file, written by the caller into the output.
pub struct PixelData<'a> {
    /// `OB` or `OW`.
    pub vr: VR,
    /// Length of the value in bytes (even).
    pub len: u32,
    /// Writes exactly `len` bytes.
    pub write: Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + 'a>,
}

/// Writes a Part-10 file in Explicit VR Little Endian: the data set `obj` (which must
/// not hold Pixel Data), then `pixel_data` if given.
pub fn write_part10(
    out: &mut dyn Write,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    obj: &InMemDicomObject,
    pixel_data: Option<PixelData<'_>>,
) -> Result<(), WriteError> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid)
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(EXPLICIT_VR_LITTLE_ENDIAN.uid())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| WriteError::Dicom(e.to_string()))?;
    out.write_all(&[0u8; 128])?;
    out.write_all(b"DICM")?;
    meta.write(&mut *out)
        .map_err(|e| WriteError::Dicom(e.to_string()))?;
    obj.write_dataset_with_ts(&mut *out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| WriteError::Dicom(e.to_string()))?;
    if let Some(pixel) = pixel_data {
        debug_assert!(pixel.len % 2 == 0);
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&[0xE0, 0x7F, 0x10, 0x00]);
        header[4..6].copy_from_slice(pixel.vr.to_bytes().as_slice());
        header[8..].copy_from_slice(&pixel.len.to_le_bytes());
        out.write_all(&header)?;
        (pixel.write)(out)?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        assert_eq!(ds(1.5), "1.5");
        assert_eq!(ds(-0.0), "0");
        assert_eq!(ds(2.0), "2");
        let long = ds(-123456.78901234567);
        assert!(long.len() <= 16, "{long}");
        assert!((long.parse::<f64>().unwrap() + 123456.78901234567).abs() < 1e-6);
    }
}
