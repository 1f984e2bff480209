//! Model files compiled into the binary.
//!
//! The embedded mode (`radflow run`) must work with nothing but the binary and the
//! ONNX Runtime library, so the demo model's bytes live in the executable. The registry
//! refers to them as `file = "builtin:<name>"`; their SHA-256 is still checked against
//! the registry like any other file. `scripts/make_demo_model.py` regenerates the file.

/// The demo tissue model: air, fat, soft tissue and bone from CT intensities.
const DEMO_TISSUE: &[u8] = include_bytes!("../../models/demo-tissue.onnx");

/// The bytes of a built-in model, by the name after `builtin:`; `None` for an unknown
/// name.
pub fn builtin_model(name: &str) -> Option<&'static [u8]> {
    match name {
        "demo-tissue" => Some(DEMO_TISSUE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_model_is_embedded_and_unknown_names_are_not() {
        let bytes = builtin_model("demo-tissue").expect("demo model");
        assert!(
            bytes.len() > 100 && bytes.len() < 2048,
            "{} bytes",
            bytes.len()
        );
        assert!(builtin_model("demo").is_none());
        assert!(builtin_model("").is_none());
    }
}
