//! What the objects say about the model and its labels: segment descriptions and the
//! algorithm identification, taken from the model registry.

use radflow_shared::models::{Code, ModelSpec, parse_color};

/// One label as a SEG segment and an SR finding.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentDescription {
    /// The label value in the label map.
    pub label: u8,
    /// Segment Label, e.g. `bone`.
    pub name: String,
    /// Segmented Property Category.
    pub category: Code,
    /// Segmented Property Type (also the SR's Finding).
    pub property_type: Code,
    /// Display colour (sRGB); written as Recommended Display CIELab Value.
    pub color: [u8; 3],
}

/// Algorithm identification of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Algorithm {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// SHA-256 of the ONNX file, hex.
    pub sha256: String,
}

impl Algorithm {
    /// The model's identity as the registry gives it.
    pub fn from_model(spec: &ModelSpec) -> Self {
        Self {
            name: spec.name.clone(),
            version: spec.version.clone(),
            sha256: spec.sha256.clone(),
        }
    }
}

impl SegmentDescription {
    /// The segments of a segmentation model: every label but 0 (the background, what
    /// no segment covers), in label order, with the registry's codes.
    pub fn from_model(spec: &ModelSpec) -> Vec<Self> {
        let mut labels: Vec<_> = spec.labels.iter().filter(|l| l.index != 0).collect();
        labels.sort_by_key(|l| l.index);
        labels
            .into_iter()
            .map(|l| {
                let codes = spec.label_codes(l.index);
                Self {
                    label: l.index,
                    name: l.name.clone(),
                    category: codes.category,
                    property_type: codes.property_type,
                    color: parse_color(&l.color).unwrap_or([255, 0, 0]),
                }
            })
            .collect()
    }

    /// The colour as DICOM's scaled CIELab (PS3.3 C.10.7.1.1: L* 0..100 and a*, b*
    /// -128..127 mapped onto 0..65535), from sRGB through XYZ with a D50 white point
    /// (the ICC profile connection space).
    pub fn cielab(&self) -> [u16; 3] {
        let lin = |c: u8| {
            let c = f64::from(c) / 255.0;
            if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        let [r, g, b] = self.color.map(lin);
        // sRGB to XYZ, Bradford-adapted to D50.
        let x = 0.4360747 * r + 0.3850649 * g + 0.1430804 * b;
        let y = 0.2225045 * r + 0.7168786 * g + 0.0606169 * b;
        let z = 0.0139322 * r + 0.0971045 * g + 0.7141733 * b;
        let f = |t: f64| {
            if t > (6.0f64 / 29.0).powi(3) {
                t.cbrt()
            } else {
                t / (3.0 * (6.0f64 / 29.0).powi(2)) + 4.0 / 29.0
            }
        };
        let (fx, fy, fz) = (f(x / 0.96422), f(y), f(z / 0.82521));
        let l = 116.0 * fy - 16.0;
        let a = 500.0 * (fx - fy);
        let bb = 200.0 * (fy - fz);
        let scale = |v: f64, lo: f64, hi: f64| {
            (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 65535.0).round() as u16
        };
        [
            scale(l, 0.0, 100.0),
            scale(a, -128.0, 127.0),
            scale(bb, -128.0, 127.0),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radflow_shared::models::Registry;

    #[test]
    fn demo_segments_skip_the_background_and_carry_codes() {
        let segments = SegmentDescription::from_model(&Registry::builtin().models[0]);
        let labels: Vec<u8> = segments.iter().map(|s| s.label).collect();
        assert_eq!(labels, [1, 2, 3]);
        assert_eq!(segments[2].property_type.value, "272673000");
    }

    #[test]
    fn cielab_of_white_black_and_red() {
        let with = |color| SegmentDescription {
            label: 1,
            name: "x".into(),
            category: Code::tissue(),
            property_type: Code::tissue(),
            color,
        };
        let white = with([255, 255, 255]).cielab();
        assert!(
            white[0] >= 65530 && white[1].abs_diff(32896) < 40,
            "{white:?}"
        );
        assert_eq!(with([0, 0, 0]).cielab()[0], 0);
        // sRGB red is about L* 54, a* 81, b* 70 under D50.
        let red = with([255, 0, 0]).cielab();
        let l = f64::from(red[0]) / 65535.0 * 100.0;
        let a = f64::from(red[1]) / 65535.0 * 255.0 - 128.0;
        assert!((l - 54.3).abs() < 1.0 && (a - 80.8).abs() < 1.5, "{l} {a}");
    }
}
