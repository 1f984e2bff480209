//! The crate graph follows the data flow: the inferer reads prepared volumes through
//! `radflow-volume` and never links the preprocessor or a DICOM pixel codec, nor does
//! the binary of its container image (`radflow` built with `--no-default-features
//! --features inferer`), and the volume contract itself knows neither DICOM nor ONNX. Each check reads `cargo tree`
//! for one package alone, as a per-crate build resolves it, dev-dependencies included.

use std::collections::BTreeSet;
use std::process::Command;

/// The packages (names only) that `package` depends on, normal and dev edges,
/// transitively, as `cargo tree -p <package>` resolves them.
fn dependencies(package: &str) -> BTreeSet<String> {
    tree(package, &["-e", "normal,dev"])
}

/// `cargo tree -p <package>` with `args`, as package names.
fn tree(package: &str, args: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--locked", "-p", package])
        .args(args)
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(
        names.contains(package),
        "cargo tree -p {package} does not list the package itself: {names:?}"
    );
    names
}

/// Crates that decode compressed DICOM pixel data: dicom-pixeldata and the codecs it
/// and the transfer syntax registry pull in (JPEG, JPEG-LS through CharLS, JPEG 2000
/// through OpenJPEG or its Rust port).
fn is_pixel_codec(name: &str) -> bool {
    name == "dicom-pixeldata"
        || ["charls", "openjp", "openjpeg", "jpeg", "jpeg2k", "jxl"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

fn offending(package: &str, bad: impl Fn(&str) -> bool) -> Vec<String> {
    dependencies(package)
        .into_iter()
        .filter(|name| name != package && bad(name))
        .collect()
}

#[test]
fn the_inferer_links_neither_the_preprocessor_nor_a_pixel_codec() {
    let found = offending("radflow-inferer", |name| {
        name == "radflow-preprocessor" || is_pixel_codec(name)
    });
    assert!(
        found.is_empty(),
        "radflow-inferer depends on {found:?}; read volumes through radflow-volume"
    );
    assert!(dependencies("radflow-inferer").contains("radflow-volume"));
}

#[test]
fn the_inferer_image_binary_links_no_pixel_codec() {
    let inferer_only = tree(
        "radflow",
        &[
            "-e",
            "normal",
            "--no-default-features",
            "--features",
            "inferer",
        ],
    );
    let found: Vec<_> = inferer_only
        .iter()
        .filter(|n| is_pixel_codec(n) || *n == "radflow-preprocessor" || *n == "radflow-listener")
        .collect();
    assert!(found.is_empty(), "the inferer build links {found:?}");
    assert!(inferer_only.contains("radflow-inferer"));
    // The default build, with every component, does link them: the check can fail.
    let full = tree("radflow", &["-e", "normal"]);
    assert!(full.contains("dicom-pixeldata") && full.contains("radflow-preprocessor"));
}

#[test]
fn the_volume_contract_knows_neither_dicom_nor_onnx() {
    let found = offending("radflow-volume", |name| {
        name.starts_with("radflow-") && name != "radflow-shared"
            || name.starts_with("dicom")
            || name.starts_with("ort")
            || is_pixel_codec(name)
    });
    assert!(
        found.is_empty(),
        "radflow-volume depends on {found:?}; it is the contract between the stages"
    );
}

/// The checks above can fail: the preprocessor, which decodes DICOM, is found to
/// link the codecs under the names they look for.
#[test]
fn the_preprocessor_is_seen_to_link_codecs() {
    let found = offending("radflow-preprocessor", is_pixel_codec);
    for codec in ["dicom-pixeldata", "jpeg-decoder", "openjp2"] {
        assert!(found.iter().any(|n| n == codec), "{codec} not in {found:?}");
    }
    assert!(dependencies("radflow-preprocessor").contains("radflow-volume"));
}

/// The exporter sends stored objects: it links no preprocessor, no inferer, no ONNX
/// Runtime and no pixel codec, and the inferer (which writes the objects) does not
/// link the exporter.
#[test]
fn the_exporter_links_neither_the_models_nor_a_pixel_codec() {
    let found = offending("radflow-exporter", |name| {
        matches!(name, "radflow-preprocessor" | "radflow-inferer")
            || name.starts_with("ort")
            || is_pixel_codec(name)
    });
    assert!(found.is_empty(), "radflow-exporter depends on {found:?}");
    assert!(!dependencies("radflow-inferer").contains("radflow-exporter"));
    assert!(dependencies("radflow-inferer").contains("radflow-results"));
}
