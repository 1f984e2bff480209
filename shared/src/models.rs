//! The model registry (`models.toml`): which models exist, what input they expect and
//! which series they are run on.
//!
//! The registry is read by the preprocessor (routing and presets: spacing and
//! normalization) and by the inferer (the ONNX file, its tensors, patching and the
//! meaning of its outputs). Keeping one typed definition here means both stages agree
//! on what a preset called `ct-1.5mm` is. Nothing here knows DICOM or ONNX.
//!
//! ```toml
//! [[model]]
//! name = "demo-tissue"
//! version = "1.0.0"
//! file = "demo-tissue.onnx"          # relative to the registry file
//! sha256 = "…"
//! input = "image"
//! output = "logits"
//! kind = "segmentation"
//! patch = [96, 96, 96]                # D, H, W voxels
//! overlap = 0.25
//! padding = "edge"                    # or "constant" (zeros, MONAI's default)
//!
//! [model.preset]
//! name = "ct-1.5mm-window"
//! spacing = [1.5, 1.5, 1.5]           # x, y, z in mm
//! normalization = { kind = "ct_window", center = 0.0, width = 2000.0 }
//!
//! [[model.labels]]
//! index = 1
//! name = "fat"
//! color = "#e6c84b"
//!
//! [model.route]
//! modalities = ["CT"]
//! min_slices = 10
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The registry that ships inside the binary: the demo model, used when no
/// `--models` file is given.
pub const BUILTIN_REGISTRY: &str = include_str!("../../models/models.toml");

/// Prefix of a model `file` that names a model compiled into the binary.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// A parsed and validated `models.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Models in the order they are listed; routing produces jobs in this order.
    #[serde(rename = "model", default)]
    pub models: Vec<ModelSpec>,
    /// Folder that relative model files are resolved against (the registry's folder).
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// One model version and everything needed to feed it and read its output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Short name, used in NATS subjects and store keys: `[A-Za-z0-9_-]`.
    pub name: String,
    /// Version string, used with the name as `name@version` in keys and events.
    pub version: String,
    /// Path to the ONNX file (relative to the registry) or `builtin:<name>`.
    pub file: String,
    /// Expected SHA-256 of the ONNX file, hex; a mismatch refuses the model.
    pub sha256: String,
    /// Name of the input tensor.
    pub input: String,
    /// Name of the output tensor.
    pub output: String,
    /// Memory layout of the input tensor. Only `NCDHW` is supported: batch, channel,
    /// then the volume's slice (z), row (y) and column (x) axes.
    #[serde(default = "default_layout")]
    pub layout: String,
    /// Segmentation (per-voxel classes) or classification (per-volume classes).
    pub kind: ModelKind,
    /// Patch size in voxels, `[D, H, W]`; volumes larger than this are tiled.
    pub patch: [usize; 3],
    /// Fraction of a patch that neighbouring windows share, in `[0, 1)`.
    #[serde(default = "default_overlap")]
    pub overlap: f64,
    /// What fills a window where it reaches past the volume (small volumes, edges).
    #[serde(default)]
    pub padding: WindowPadding,
    /// Windows per `session.run`.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// How the volume is prepared for this model.
    pub preset: Preset,
    /// Output classes, by output channel index.
    #[serde(default)]
    pub labels: Vec<LabelSpec>,
    /// Which series this model is run on.
    #[serde(default)]
    pub route: Route,
}

fn default_layout() -> String {
    "NCDHW".into()
}
fn default_overlap() -> f64 {
    0.25
}
fn default_batch() -> usize {
    1
}

/// How the volume is extended where a window reaches past it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WindowPadding {
    /// Zeros, as MONAI's `sliding_window_inference` does by default.
    #[default]
    Constant,
    /// The nearest edge voxel repeated (MONAI's `replicate`): right for models whose
    /// input scale gives 0 a meaning (e.g. air) that the cut edge of a scan does not have.
    Edge,
}

/// What the model's output means.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The output has one channel per label; the label map is the argmax over channels.
    Segmentation,
    /// The output has one score per class for the whole volume.
    Classification,
}

/// A named way of turning a native volume into a model input. Models that share a
/// preset name share the stored volume (`volumes/<series>/<preset>/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Name used in the store key; `[A-Za-z0-9._-]`.
    pub name: String,
    /// Target voxel spacing in mm, `[x, y, z]`.
    pub spacing: [f64; 3],
    /// Intensity normalization applied after resampling.
    pub normalization: Normalization,
}

/// Intensity normalization presets.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Normalization {
    /// CT window: `clamp((v - (center - width/2)) / width, 0, 1)`, `v` in HU.
    CtWindow { center: f64, width: f64 },
    /// Z-score over voxels above `threshold` (the foreground), for MR.
    Zscore {
        #[serde(default)]
        threshold: f64,
    },
    /// Clip to the `lower`..`upper` percentiles, then scale to `[0, 1]`.
    Percentile { lower: f64, upper: f64 },
    /// Values are passed through unchanged.
    None,
}

/// One output class.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// Output channel / label value.
    pub index: u8,
    /// Human name, e.g. `bone`.
    pub name: String,
    /// Display colour `#rrggbb` for previews.
    #[serde(default = "default_color")]
    pub color: String,
    /// For classification: score at or above which the class is reported positive.
    #[serde(default)]
    pub threshold: Option<f64>,
}

fn default_color() -> String {
    "#ff0000".into()
}

/// Routing rules: a series is sent to the model when every given rule matches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// DICOM Modality values (e.g. `CT`); empty means any.
    #[serde(default)]
    pub modalities: Vec<String>,
    /// Body Part Examined values, compared case-insensitively; empty means any.
    #[serde(default)]
    pub body_parts: Vec<String>,
    /// Case-insensitive substrings of Series Description; empty means any.
    #[serde(default)]
    pub series_description: Vec<String>,
    /// Called AE titles that received the series; empty means any.
    #[serde(default)]
    pub called_ae: Vec<String>,
    /// Minimum number of slices in the volume.
    #[serde(default)]
    pub min_slices: usize,
}

/// What routing looks at: the few series attributes rules may test.
#[derive(Debug, Clone, Default)]
pub struct SeriesFacts<'a> {
    pub modality: &'a str,
    pub body_part: &'a str,
    pub series_description: &'a str,
    pub called_ae: &'a str,
    pub slices: usize,
}

/// Errors found while reading a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read model registry {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model registry is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("model registry: {0}")]
    Invalid(String),
}

impl Registry {
    /// Parses and validates registry text; relative files resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: Option<PathBuf>) -> Result<Self, RegistryError> {
        let mut registry: Registry = toml::from_str(text)?;
        registry.base_dir = base_dir;
        registry.validate()?;
        Ok(registry)
    }

    /// Reads a registry file.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path.parent().map(Path::to_owned))
    }

    /// The registry compiled into the binary.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_REGISTRY, None).expect("the built-in registry is valid")
    }

    /// `--models` if given, else the built-in registry.
    pub fn load_or_builtin(path: Option<&Path>) -> Result<Self, RegistryError> {
        match path {
            Some(path) => Self::load(path),
            None => Ok(Self::builtin()),
        }
    }

    /// Finds a model by `name@version`, or by `name` alone when that is unambiguous.
    pub fn find(&self, reference: &str) -> Option<&ModelSpec> {
        match reference.split_once('@') {
            Some((name, version)) => self
                .models
                .iter()
                .find(|m| m.name == name && m.version == version),
            None => {
                let mut it = self.models.iter().filter(|m| m.name == reference);
                let first = it.next()?;
                it.next().is_none().then_some(first)
            }
        }
    }

    /// Models whose routing rules select a series, in registry order.
    pub fn route<'a>(&'a self, facts: &SeriesFacts<'_>) -> Vec<&'a ModelSpec> {
        self.models
            .iter()
            .filter(|m| m.route.matches(facts))
            .collect()
    }

    /// Distinct presets in registry order, keyed by preset name.
    pub fn presets(&self) -> BTreeMap<&str, &Preset> {
        self.models
            .iter()
            .map(|m| (m.preset.name.as_str(), &m.preset))
            .collect()
    }

    fn validate(&self) -> Result<(), RegistryError> {
        let invalid = |msg: String| Err(RegistryError::Invalid(msg));
        let mut seen = std::collections::HashSet::new();
        let mut presets: BTreeMap<&str, &Preset> = BTreeMap::new();
        for m in &self.models {
            if !is_token(&m.name, false) {
                return invalid(format!(
                    "model name {:?} must be letters, digits, '-' or '_'",
                    m.name
                ));
            }
            if !is_token(&m.version, true) {
                return invalid(format!(
                    "model {}: version {:?} must be letters, digits, '.', '-' or '_'",
                    m.name, m.version
                ));
            }
            if !seen.insert(m.reference()) {
                return invalid(format!("model {} is listed twice", m.reference()));
            }
            if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return invalid(format!(
                    "model {}: sha256 must be 64 hex digits",
                    m.reference()
                ));
            }
            if m.layout != "NCDHW" {
                return invalid(format!(
                    "model {}: layout {:?} is not supported (only NCDHW)",
                    m.reference(),
                    m.layout
                ));
            }
            if m.patch.contains(&0) {
                return invalid(format!("model {}: patch sizes must be > 0", m.reference()));
            }
            if !(0.0..1.0).contains(&m.overlap) {
                return invalid(format!(
                    "model {}: overlap must be in [0, 1)",
                    m.reference()
                ));
            }
            if m.batch_size == 0 {
                return invalid(format!("model {}: batch_size must be > 0", m.reference()));
            }
            if !is_token(&m.preset.name, true) {
                return invalid(format!(
                    "model {}: preset name {:?} must be letters, digits, '.', '-' or '_'",
                    m.reference(),
                    m.preset.name
                ));
            }
            if m.preset
                .spacing
                .iter()
                .any(|s| !(s.is_finite() && *s > 0.0))
            {
                return invalid(format!(
                    "model {}: preset spacing must be positive",
                    m.reference()
                ));
            }
            if let Some(other) = presets.insert(&m.preset.name, &m.preset)
                && other != &m.preset
            {
                return invalid(format!(
                    "preset {:?} is defined twice with different settings",
                    m.preset.name
                ));
            }
            let mut indices = std::collections::HashSet::new();
            for l in &m.labels {
                if !indices.insert(l.index) {
                    return invalid(format!(
                        "model {}: label index {} is listed twice",
                        m.reference(),
                        l.index
                    ));
                }
                if parse_color(&l.color).is_none() {
                    return invalid(format!(
                        "model {}: label {} colour {:?} is not #rrggbb",
                        m.reference(),
                        l.name,
                        l.color
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ModelSpec {
    /// `name@version`, the identity used in keys, subjects and message ids.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Where the ONNX file is: a built-in name, or a path resolved against the registry.
    pub fn location(&self, base_dir: Option<&Path>) -> ModelLocation {
        if let Some(name) = self.file.strip_prefix(BUILTIN_PREFIX) {
            return ModelLocation::Builtin(name.to_owned());
        }
        let path = Path::new(&self.file);
        match base_dir {
            Some(base) if path.is_relative() => ModelLocation::File(base.join(path)),
            _ => ModelLocation::File(path.to_owned()),
        }
    }
}

/// Where a model's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Builtin(String),
    File(PathBuf),
}

impl Route {
    /// Whether every rule that is set matches the series.
    pub fn matches(&self, f: &SeriesFacts<'_>) -> bool {
        let any_eq = |list: &[String], v: &str| {
            list.is_empty() || list.iter().any(|x| x.trim().eq_ignore_ascii_case(v.trim()))
        };
        let desc = f.series_description.to_ascii_lowercase();
        any_eq(&self.modalities, f.modality)
            && any_eq(&self.body_parts, f.body_part)
            && any_eq(&self.called_ae, f.called_ae)
            && (self.series_description.is_empty()
                || self
                    .series_description
                    .iter()
                    .any(|s| desc.contains(&s.to_ascii_lowercase())))
            && f.slices >= self.min_slices
    }
}

/// Parses `#rrggbb`.
pub fn parse_color(s: &str) -> Option<[u8; 3]> {
    let hex = s.strip_prefix('#')?;
    if hex.len() != 6 {
        return None;
    }
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some([(v >> 16) as u8, (v >> 8) as u8, v as u8])
}

fn is_token(s: &str, allow_dot: bool) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (allow_dot && b == b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_parses_and_routes_ct_only() {
        let r = Registry::builtin();
        assert!(!r.models.is_empty());
        let ct = SeriesFacts {
            modality: "CT",
            slices: 100,
            ..Default::default()
        };
        let mr = SeriesFacts {
            modality: "MR",
            slices: 100,
            ..Default::default()
        };
        assert_eq!(r.route(&ct).len(), 1);
        assert!(r.route(&mr).is_empty());
        let few = SeriesFacts {
            modality: "CT",
            slices: 1,
            ..Default::default()
        };
        assert!(r.route(&few).is_empty());
    }

    #[test]
    fn find_by_reference() {
        let r = Registry::builtin();
        let m = &r.models[0];
        assert_eq!(r.find(&m.reference()).unwrap().name, m.name);
        assert_eq!(r.find(&m.name).unwrap().version, m.version);
        assert!(r.find("nope@1").is_none());
    }

    #[test]
    fn rejects_bad_names_and_conflicting_presets() {
        let base = Registry::builtin().models[0].clone();
        let mut bad = base.clone();
        bad.name = "a.b".into();
        let text = toml::to_string(&Registry {
            models: vec![bad],
            base_dir: None,
        })
        .unwrap();
        assert!(matches!(
            Registry::parse(&text, None),
            Err(RegistryError::Invalid(_))
        ));

        let mut other = base.clone();
        other.version = "9".into();
        other.preset.spacing = [2.0, 2.0, 2.0];
        let text = toml::to_string(&Registry {
            models: vec![base, other],
            base_dir: None,
        })
        .unwrap();
        let err = Registry::parse(&text, None).unwrap_err().to_string();
        assert!(err.contains("defined twice"), "{err}");
    }

    #[test]
    fn colors() {
        assert_eq!(parse_color("#ff8000"), Some([255, 128, 0]));
        assert_eq!(parse_color("ff8000"), None);
    }
}
