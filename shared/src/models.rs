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
//! invert_interpolation = "nearest"    # or "linear": class probabilities onto the source grid
//! segmentation_type = "binary"        # or "fractional": SEG of 8-bit probabilities
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
//! [[model.codes]]                    # optional: how DICOM SEG and SR name label 1
//! label = 1
//! category = { scheme = "SCT", value = "85756007", meaning = "Tissue" }
//! type = { scheme = "SCT", value = "55603005", meaning = "Fat" }
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
    /// Memory layout of the input and output tensors: `NCDHW` (batch, channel, then
    /// the volume's slice z, row y and column x axes) or channels-last `NDHWC`.
    #[serde(default)]
    pub layout: TensorLayout,
    /// Element type of the input and output tensors: `float32` or `float16`
    /// (half-precision exports; radflow converts on the way in and out).
    #[serde(default)]
    pub dtype: TensorDtype,
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
    /// Windows per `session.run` (segmentation), or jobs per `session.run`
    /// (classification: jobs that arrive together are run as one batch).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Classification: how long the first job of a batch waits for others, in
    /// milliseconds, before the batch runs with the jobs it has.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// How raw scores become probabilities: for classification before thresholds
    /// apply; for segmentation where probabilities are needed (linear
    /// `invert_interpolation`, fractional `segmentation_type`), softmax over the
    /// channels of each voxel or a sigmoid per channel.
    #[serde(default)]
    pub activation: Activation,
    /// How the volume is prepared for this model.
    pub preset: Preset,
    /// Output classes, by output channel index (`[[model.classes]]` is accepted as
    /// another name, for classification models).
    #[serde(default, alias = "classes")]
    pub labels: Vec<LabelSpec>,
    /// DICOM codes of the labels (SEG segment and SR finding), by label index; a
    /// label without an entry gets the generic [`Code::tissue`] for both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<LabelCodes>,
    /// How a segmentation result is written as DICOM SEG: `binary` (the label map) or
    /// `fractional` (per label its probability, after `activation`, interpolated
    /// trilinearly onto the source grid whatever `invert_interpolation` says, in 8
    /// bits; `labels.nii.gz` stays the label map).
    #[serde(default, skip_serializing_if = "SegmentationType::is_binary")]
    pub segmentation_type: SegmentationType,
    /// Segmentation: how the result is brought from the model's grid back onto the
    /// source series' grid (MONAI's `Invertd`). `nearest` (the default): the label
    /// map, nearest neighbour. `linear`: each class's probability (after
    /// `activation`) trilinearly, the label of a voxel the class most probable there
    /// (the lowest index of equal ones); smoother edges where the source is finer
    /// than the model grid.
    #[serde(
        default = "Interpolation::nearest",
        skip_serializing_if = "Interpolation::is_nearest"
    )]
    pub invert_interpolation: Interpolation,
    /// Which series this model is run on.
    #[serde(default)]
    pub route: Route,
    /// A version on trial: it scores the same series as the serving version of its
    /// name, and its results are stored beside theirs and announced on
    /// `radflow.result.<name>.shadow`, never on the subject that results are
    /// forwarded from.
    #[serde(default)]
    pub shadow: bool,
}

fn default_batch_wait_ms() -> u64 {
    20
}

/// Memory layout of a model's tensors.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum TensorLayout {
    /// Batch, channel, depth (z), height (y), width (x).
    #[default]
    #[serde(rename = "NCDHW")]
    Ncdhw,
    /// Channels last: batch, depth, height, width, channel.
    #[serde(rename = "NDHWC")]
    Ndhwc,
}

/// Element type of a model's input and output tensors.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TensorDtype {
    #[default]
    Float32,
    Float16,
}

/// How a classification model's scores become probabilities.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Mutually exclusive classes: softmax over the scores.
    #[default]
    Softmax,
    /// Independent findings (multi-label): a sigmoid per score.
    Sigmoid,
    /// The model already outputs what the thresholds compare with.
    None,
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
    /// Directions of the input's voxel axes `x, y, z` (the `W, H, D` of `NCDHW`) as
    /// nibabel's axis codes, one letter per axis for the direction its index increases
    /// towards: `RAS` (x to the patient's right, y anterior, z superior), `LPS`, `PIR`…
    /// The volume is flipped and permuted to the closest such axes (an oblique scan
    /// stays oblique). Without it the source's axes are kept: columns, rows, slices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orientation: Option<String>,
    /// Input shape in voxels `[x, y, z]`: after resampling, the volume is cropped or
    /// padded about its centre to this size. Without it the volume keeps its extent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<[usize; 3]>,
    /// Value of voxels outside the scan (padding), in the volume's units before
    /// normalization (HU for CT, e.g. -1024). Without it the nearest edge voxel is
    /// repeated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_value: Option<f64>,
    /// How values are resampled: `linear` (images) or `nearest` (masks, label maps).
    #[serde(default, skip_serializing_if = "Interpolation::is_linear")]
    pub interpolation: Interpolation,
}

/// Resampling interpolation of a preset.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Trilinear, for images.
    #[default]
    Linear,
    /// Nearest neighbour, for masks and label maps (no new values appear).
    Nearest,
}

impl Interpolation {
    fn is_linear(&self) -> bool {
        *self == Interpolation::Linear
    }

    fn nearest() -> Self {
        Interpolation::Nearest
    }

    fn is_nearest(&self) -> bool {
        *self == Interpolation::Nearest
    }
}

/// Whether `codes` are three axis codes, one of each pair L/R, A/P, S/I (any order).
pub fn valid_axis_codes(codes: &str) -> bool {
    let pairs = ["LR", "AP", "SI"];
    let mut used = [false; 3];
    codes.len() == 3
        && codes
            .chars()
            .all(|c| match pairs.iter().position(|p| p.contains(c)) {
                Some(i) if !used[i] => {
                    used[i] = true;
                    true
                }
                _ => false,
            })
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

/// A coded concept of a DICOM coding scheme (SNOMED CT `SCT`, DICOM `DCM`, …): the
/// triplet DICOM stores as Code Value, Coding Scheme Designator and Code Meaning.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Code {
    /// Coding Scheme Designator, e.g. `SCT` or `DCM`.
    pub scheme: String,
    /// Code Value, e.g. `85756007`.
    pub value: String,
    /// Code Meaning, e.g. `Tissue`.
    pub meaning: String,
}

impl Code {
    /// A code from its three parts.
    pub fn new(scheme: &str, value: &str, meaning: &str) -> Self {
        Self {
            scheme: scheme.into(),
            value: value.into(),
            meaning: meaning.into(),
        }
    }

    /// SNOMED CT 85756007 "Tissue": the category and type of a label whose model
    /// gives no codes.
    pub fn tissue() -> Self {
        Self::new("SCT", "85756007", "Tissue")
    }
}

/// The DICOM codes of one label: Segmented Property Category and Type of its SEG
/// segment, and the Finding of its SR measurement group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LabelCodes {
    /// The label index these codes describe.
    pub label: u8,
    /// Segmented Property Category (DICOM CID 7150, e.g. SCT 85756007 "Tissue",
    /// SCT 91723000 "Anatomical Structure").
    #[serde(default = "Code::tissue")]
    pub category: Code,
    /// Segmented Property Type (e.g. SCT 272673000 "Bone").
    #[serde(default = "Code::tissue", rename = "type")]
    pub property_type: Code,
}

/// The Segmentation Type of a model's DICOM SEG.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SegmentationType {
    /// One bit per voxel and label: exactly the label map.
    #[default]
    Binary,
    /// Eight bits per voxel and label: the model's probability of the label.
    Fractional,
}

impl SegmentationType {
    fn is_binary(&self) -> bool {
        *self == SegmentationType::Binary
    }
}

impl ModelSpec {
    /// The DICOM codes of a label: the registry's `[[model.codes]]` entry, or the
    /// generic "Tissue" for both category and type.
    pub fn label_codes(&self, label: u8) -> LabelCodes {
        self.codes
            .iter()
            .find(|c| c.label == label)
            .cloned()
            .unwrap_or(LabelCodes {
                label,
                category: Code::tissue(),
                property_type: Code::tissue(),
            })
    }
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

    /// Finds a model by `name@version`, or by `name` alone: its serving version.
    pub fn find(&self, reference: &str) -> Option<&ModelSpec> {
        match reference.split_once('@') {
            Some((name, version)) => self
                .models
                .iter()
                .find(|m| m.name == name && m.version == version),
            None => self.serving(reference),
        }
    }

    /// The serving (not shadow) version of a model name.
    pub fn serving(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.name == name && !m.shadow)
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
            if !m.shadow
                && self
                    .models
                    .iter()
                    .any(|o| o.name == m.name && !o.shadow && o.version != m.version)
            {
                return invalid(format!(
                    "model {} has more than one serving version; mark the version on trial `shadow = true`",
                    m.name
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
            if m.patch.contains(&0) {
                return invalid(format!("model {}: patch sizes must be > 0", m.reference()));
            }
            if !(0.0..1.0).contains(&m.overlap) {
                return invalid(format!(
                    "model {}: overlap must be in [0, 1)",
                    m.reference()
                ));
            }
            if !(1..=256).contains(&m.batch_size) {
                return invalid(format!(
                    "model {}: batch_size must be between 1 and 256",
                    m.reference()
                ));
            }
            if let Err(msg) = m.check_outputs() {
                return invalid(format!("model {}: {msg}", m.reference()));
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
            if let Some(codes) = &m.preset.orientation
                && !valid_axis_codes(codes)
            {
                return invalid(format!(
                    "model {}: preset orientation {codes:?} must be three letters, one of \
                     each pair L/R, A/P, S/I (e.g. \"RAS\")",
                    m.reference()
                ));
            }
            if let Some(shape) = m.preset.shape
                && shape.iter().any(|n| !(1..=32767).contains(n))
            {
                return invalid(format!(
                    "model {}: preset shape {shape:?} must be between 1 and 32767 voxels per axis",
                    m.reference()
                ));
            }
            if m.preset.pad_value.is_some_and(|v| !v.is_finite()) {
                return invalid(format!(
                    "model {}: preset pad_value must be a finite number",
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
            for c in &m.codes {
                if !m.labels.iter().any(|l| l.index == c.label) {
                    return invalid(format!(
                        "model {}: codes are given for label {}, which is not listed",
                        m.reference(),
                        c.label
                    ));
                }
                for code in [&c.category, &c.property_type] {
                    if [&code.scheme, &code.value, &code.meaning]
                        .iter()
                        .any(|p| p.trim().is_empty() || p.len() > 64)
                    {
                        return invalid(format!(
                            "model {}: a code of label {} needs a scheme, value and meaning \
                             of 1 to 64 characters",
                            m.reference(),
                            c.label
                        ));
                    }
                }
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

    /// Rules on the output description that depend on the kind: a classification
    /// model lists its classes, thresholds belong to classes only, and a probability
    /// threshold lies in `[0, 1]`; a fixed preset shape must be the patch.
    fn check_outputs(&self) -> Result<(), String> {
        match self.kind {
            ModelKind::Segmentation => {
                if let Some(l) = self.labels.iter().find(|l| l.threshold.is_some()) {
                    return Err(format!(
                        "label {} has a threshold, but thresholds apply to classification classes only",
                        l.name
                    ));
                }
            }
            ModelKind::Classification => {
                if self.invert_interpolation != Interpolation::Nearest {
                    return Err("invert_interpolation applies to segmentation models only".into());
                }
                if self.labels.is_empty() {
                    return Err("a classification model must list its classes".into());
                }
                let probability = self.activation != Activation::None;
                for l in &self.labels {
                    match l.threshold {
                        Some(t) if !t.is_finite() => {
                            return Err(format!("class {}: threshold must be a number", l.name));
                        }
                        Some(t) if probability && !(0.0..=1.0).contains(&t) => {
                            return Err(format!(
                                "class {}: threshold {t} is not a probability in [0, 1]",
                                l.name
                            ));
                        }
                        _ => {}
                    }
                }
                let [d, h, w] = self.patch;
                if let Some(shape) = self.preset.shape
                    && shape != [w, h, d]
                {
                    return Err(format!(
                        "the preset shape {shape:?} (x, y, z) differs from the patch {:?} (D, H, W) the model takes",
                        self.patch
                    ));
                }
            }
        }
        Ok(())
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

pub(crate) fn is_token(s: &str, allow_dot: bool) -> bool {
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
        other.shadow = true;
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
    fn preset_axis_order_shape_and_interpolation() {
        let text = BUILTIN_REGISTRY.replace(
            "normalization = { kind = \"ct_window\", center = 0.0, width = 2000.0 }",
            "normalization = { kind = \"ct_window\", center = 0.0, width = 2000.0 }\n\
             orientation = \"PIR\"\nshape = [96, 128, 64]\npad_value = -1024.0\n\
             interpolation = \"nearest\"",
        );
        let r = Registry::parse(&text, None).unwrap();
        let p = &r.models[0].preset;
        assert_eq!(p.orientation.as_deref(), Some("PIR"));
        assert_eq!(p.shape, Some([96, 128, 64]));
        assert_eq!(p.pad_value, Some(-1024.0));
        assert_eq!(p.interpolation, Interpolation::Nearest);
        // The built-in preset has none of them and serialises as before.
        let builtin = &Registry::builtin().models[0].preset;
        assert_eq!(builtin.orientation, None);
        assert_eq!(builtin.interpolation, Interpolation::Linear);
        let json = serde_json::to_string(builtin).unwrap();
        assert!(
            !json.contains("orientation") && !json.contains("interpolation"),
            "{json}"
        );

        for bad in ["RAR", "RA", "XYZ", "rAS"] {
            let text = text.replace("\"PIR\"", &format!("{bad:?}"));
            let err = Registry::parse(&text, None).unwrap_err().to_string();
            assert!(err.contains("orientation"), "{bad}: {err}");
        }
        assert!(valid_axis_codes("LPS") && valid_axis_codes("SAR"));
        let zero = text.replace("[96, 128, 64]", "[96, 0, 64]");
        assert!(Registry::parse(&zero, None).is_err());
    }

    #[test]
    fn classification_fields_and_rules() {
        let text = BUILTIN_REGISTRY
            .replace("kind = \"segmentation\"", "kind = \"classification\"\nactivation = \"sigmoid\"\nbatch_wait_ms = 50\ndtype = \"float16\"\nlayout = \"NDHWC\"")
            .replace("[[model.labels]]", "[[model.classes]]")
            .replace("name = \"fat\"", "name = \"fat\"\nthreshold = 0.5");
        let r = Registry::parse(&text, None).unwrap();
        let m = &r.models[0];
        assert_eq!(m.kind, ModelKind::Classification);
        assert_eq!(m.activation, Activation::Sigmoid);
        assert_eq!((m.batch_wait_ms, m.dtype), (50, TensorDtype::Float16));
        assert_eq!(m.layout, TensorLayout::Ndhwc);
        assert_eq!(m.labels.len(), 4);
        assert_eq!(m.labels[1].threshold, Some(0.5));
        // The built-in model keeps the defaults.
        let builtin = &Registry::builtin().models[0];
        assert_eq!(builtin.layout, TensorLayout::Ncdhw);
        assert_eq!(builtin.dtype, TensorDtype::Float32);

        for (bad, why) in [
            (
                text.replace("threshold = 0.5", "threshold = 1.5"),
                "probability",
            ),
            (
                BUILTIN_REGISTRY.replace("name = \"fat\"", "name = \"fat\"\nthreshold = 0.5"),
                "classification classes only",
            ),
            (
                text.replace("layout = \"NDHWC\"", "layout = \"NHWC\""),
                "NHWC",
            ),
            (
                text.replace("batch_size = 1", "batch_size = 0"),
                "batch_size",
            ),
        ] {
            let err = Registry::parse(&bad, None).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
        let mut no_classes = m.clone();
        no_classes.labels.clear();
        assert!(
            no_classes
                .check_outputs()
                .unwrap_err()
                .contains("list its classes")
        );
    }

    #[test]
    fn one_serving_version_per_name_and_shadows_beside_it() {
        let v2 = BUILTIN_REGISTRY
            .split("[[model]]")
            .nth(1)
            .unwrap()
            .replace("version = \"1.0.0\"", "version = \"1.1.0\"");
        let two = format!("{BUILTIN_REGISTRY}\n[[model]]{v2}");
        let err = Registry::parse(&two, None).unwrap_err().to_string();
        assert!(err.contains("more than one serving version"), "{err}");

        let shadowed = format!(
            "{BUILTIN_REGISTRY}\n[[model]]{}",
            v2.replacen("kind = ", "shadow = true\nkind = ", 1)
        );
        let r = Registry::parse(&shadowed, None).unwrap();
        assert_eq!(r.find("demo-tissue").unwrap().version, "1.0.0");
        assert_eq!(r.serving("demo-tissue").unwrap().version, "1.0.0");
        assert!(r.find("demo-tissue@1.1.0").unwrap().shadow);
        // Both versions are routed to the same series.
        let facts = SeriesFacts {
            modality: "CT",
            body_part: "",
            series_description: "",
            called_ae: "RADFLOW",
            slices: 100,
        };
        let routed: Vec<String> = r.route(&facts).iter().map(|m| m.reference()).collect();
        assert_eq!(routed, ["demo-tissue@1.0.0", "demo-tissue@1.1.0"]);
    }

    #[test]
    fn label_codes_default_to_tissue_and_must_name_a_label() {
        let builtin = &Registry::builtin().models[0];
        assert_eq!(builtin.label_codes(3).property_type.meaning, "Bone");
        assert_eq!(builtin.label_codes(9).category, Code::tissue());
        assert_eq!(builtin.segmentation_type, SegmentationType::Binary);
        let text = BUILTIN_REGISTRY
            .replace(
                "batch_size = 1\n",
                "batch_size = 1\nsegmentation_type = \"fractional\"\n",
            )
            .replace("label = 2\ncategory = { scheme = \"SCT\", value = \"85756007\", meaning = \"Tissue\" }\n", "label = 2\n")
            .replace("value = \"272673000\", meaning = \"Bone\" }", "value = \"272673000\", meaning = \"Bone\" }\n\n[[model.codes]]\nlabel = 0");
        let m = &Registry::parse(&text, None).unwrap().models[0];
        assert_eq!(m.segmentation_type, SegmentationType::Fractional);
        assert_eq!(m.invert_interpolation, Interpolation::Nearest);
        let soft = m.label_codes(2);
        assert_eq!(soft.category, Code::tissue());
        assert_eq!(soft.property_type.meaning, "Soft tissue");
        assert_eq!(m.label_codes(0).property_type, Code::tissue());
        let unknown = text.replace("label = 2", "label = 7");
        let err = Registry::parse(&unknown, None).unwrap_err().to_string();
        assert!(err.contains("label 7"), "{err}");
        let empty = text.replace("value = \"87784001\"", "value = \"\"");
        assert!(Registry::parse(&empty, None).is_err());
    }

    #[test]
    fn invert_interpolation_defaults_to_nearest_and_is_for_segmentation() {
        let builtin = &Registry::builtin().models[0];
        assert_eq!(builtin.invert_interpolation, Interpolation::Nearest);
        // The default is not written out: serialised specs stay as they were.
        let json = serde_json::to_string(builtin).unwrap();
        assert!(!json.contains("invert_interpolation"), "{json}");

        let text = BUILTIN_REGISTRY.replace(
            "batch_size = 1\n",
            "batch_size = 1\ninvert_interpolation = \"linear\"\n",
        );
        let m = &Registry::parse(&text, None).unwrap().models[0];
        assert_eq!(m.invert_interpolation, Interpolation::Linear);
        let json = serde_json::to_string(m).unwrap();
        assert!(
            json.contains(r#""invert_interpolation":"linear""#),
            "{json}"
        );
        let round_trip = toml::to_string(&Registry {
            models: vec![m.clone()],
            base_dir: None,
        })
        .unwrap();
        assert_eq!(&Registry::parse(&round_trip, None).unwrap().models[0], m);

        let bad = text.replace("\"linear\"", "\"cubic\"");
        assert!(Registry::parse(&bad, None).is_err());
        let classifier = text
            .replace("kind = \"segmentation\"", "kind = \"classification\"")
            .replace("[[model.labels]]", "[[model.classes]]");
        let err = Registry::parse(&classifier, None).unwrap_err().to_string();
        assert!(err.contains("segmentation models only"), "{err}");
    }

    #[test]
    fn colors() {
        assert_eq!(parse_color("#ff8000"), Some([255, 128, 0]));
        assert_eq!(parse_color("ff8000"), None);
    }
}
