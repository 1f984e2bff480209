//! VR UN retyping: standard attributes that a conversion from implicit to explicit VR
//! left as UN get their dictionary VR and value back (see [`crate::decode`]).

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::header::Header;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_object::InMemDicomObject;

use super::attributes::int;

/// Gives elements of VR UN whose tag the standard dictionary knows their proper VR
/// and value, in the data set and in its sequence items.
///
/// A system that converts an implicit VR file to explicit VR writes UN for every
/// attribute its own dictionary lacks (newer standard attributes, often whole
/// functional groups), and the parser then holds their values as raw bytes: read as
/// numbers, a position `"-125.0\\..."` would become the codes of its characters.
/// Text VRs are decoded as text; binary numbers in the data set's byte order (US or
/// SS after Pixel Representation where the dictionary says either); sequences, other
/// ambiguous VRs and private attributes stay as they are.
pub(super) fn retype_unknown(obj: &mut InMemDicomObject, big_endian: bool, depth: usize) {
    use dicom_core::dictionary::VirtualVr;
    use dicom_core::value::{DataSetSequence, Value};
    use dicom_core::{DataElement, PrimitiveValue};

    if depth > 16 {
        return;
    }
    let tags: Vec<Tag> = obj
        .iter()
        .filter(|e| e.vr() == VR::UN || e.vr() == VR::SQ)
        .map(|e| e.tag())
        .collect();
    for tag in tags {
        let Some(element) = obj.take(tag) else {
            continue;
        };
        let vr = element.vr();
        let element = match element.into_value() {
            Value::Sequence(seq) => {
                let mut items = seq.into_items();
                for item in items.iter_mut() {
                    retype_unknown(item, big_endian, depth + 1);
                }
                DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
            }
            Value::Primitive(PrimitiveValue::U8(bytes)) if vr == VR::UN => {
                let known = StandardDataDictionary
                    .by_tag(tag)
                    .and_then(|e| match e.vr() {
                        VirtualVr::Exact(v) => Some(v),
                        // US or SS after Pixel Representation, which precedes them.
                        VirtualVr::Xs => Some(if int(obj, tags::PIXEL_REPRESENTATION) == Some(1) {
                            VR::SS
                        } else {
                            VR::US
                        }),
                        _ => None,
                    });
                match known.and_then(|v| Some((v, typed_value(v, &bytes, big_endian)?))) {
                    Some((v, value)) => DataElement::new(tag, v, value),
                    None => DataElement::new(tag, VR::UN, PrimitiveValue::U8(bytes)),
                }
            }
            other => DataElement::new(tag, vr, other),
        };
        obj.put(element);
    }
}

/// The value of UN bytes read as `vr`; `None` where the bytes do not fit it.
fn typed_value(vr: VR, bytes: &[u8], big_endian: bool) -> Option<dicom_core::PrimitiveValue> {
    use dicom_core::PrimitiveValue;
    use dicom_core::smallvec::SmallVec;

    fn numbers<const N: usize, T>(
        bytes: &[u8],
        big_endian: bool,
        from: fn([u8; N]) -> T,
        from_be: fn([u8; N]) -> T,
    ) -> Option<SmallVec<[T; 2]>> {
        if !bytes.len().is_multiple_of(N) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let a: [u8; N] = c.try_into().expect("chunk of N");
                    if big_endian { from_be(a) } else { from(a) }
                })
                .collect(),
        )
    }
    Some(match vr {
        VR::AE
        | VR::AS
        | VR::CS
        | VR::DA
        | VR::DS
        | VR::DT
        | VR::IS
        | VR::LO
        | VR::PN
        | VR::SH
        | VR::TM
        | VR::UC
        | VR::UI => {
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim_end_matches(['\0', ' ']);
            PrimitiveValue::Strs(text.split('\\').map(str::to_owned).collect())
        }
        VR::LT | VR::ST | VR::UT | VR::UR => {
            let text = String::from_utf8_lossy(bytes);
            PrimitiveValue::Str(text.trim_end_matches(['\0', ' ']).to_owned())
        }
        VR::US => PrimitiveValue::U16(numbers(
            bytes,
            big_endian,
            u16::from_le_bytes,
            u16::from_be_bytes,
        )?),
        VR::SS => PrimitiveValue::I16(numbers(
            bytes,
            big_endian,
            i16::from_le_bytes,
            i16::from_be_bytes,
        )?),
        VR::UL => PrimitiveValue::U32(numbers(
            bytes,
            big_endian,
            u32::from_le_bytes,
            u32::from_be_bytes,
        )?),
        VR::SL => PrimitiveValue::I32(numbers(
            bytes,
            big_endian,
            i32::from_le_bytes,
            i32::from_be_bytes,
        )?),
        VR::FL => PrimitiveValue::F32(numbers(
            bytes,
            big_endian,
            f32::from_le_bytes,
            f32::from_be_bytes,
        )?),
        VR::FD => PrimitiveValue::F64(numbers(
            bytes,
            big_endian,
            f64::from_le_bytes,
            f64::from_be_bytes,
        )?),
        _ => return None,
    })
}
