//! Loading a model: checking its bytes against the registry, opening an ONNX Runtime
//! session on the execution provider the operator asked for, and running batches.
//!
//! Two things here protect results. The SHA-256 check means a result labelled
//! `model@version` was produced by exactly the file the registry names. And the
//! provider that is really in use is recorded and logged: by default ONNX Runtime
//! silently runs on the CPU when the CUDA provider cannot be registered, which on a GPU
//! node would quietly make inference a hundred times slower. Here a failed CUDA
//! registration either falls back with a warning or, with `require_gpu`, refuses to
//! load.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ndarray::{Array5, ArrayView5, Ix5};
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use ort::value::{TensorElementType, TensorRef, ValueType};
use radflow_shared::models::{ModelKind, ModelLocation, ModelSpec};
use sha2::{Digest, Sha256};

use crate::builtin::builtin_model;
use crate::runtime::{self, RuntimeError};

/// Which execution provider to run a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderRequest {
    /// CUDA device 0 when the library and a GPU allow it, else the CPU (logged at info
    /// level: running on the CPU is expected on a machine without a GPU).
    #[default]
    Auto,
    /// The CPU only.
    Cpu,
    /// A CUDA device; falling back to the CPU is logged as a warning.
    Cuda {
        /// CUDA device ordinal.
        device_id: i32,
        /// Cap on the CUDA memory arena (bytes); `None` lets ONNX Runtime grow it.
        memory_limit_bytes: Option<usize>,
    },
}

/// How sessions are created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutionConfig {
    /// Execution provider to try.
    pub provider: ProviderRequest,
    /// Refuse to load a model rather than run it on the CPU (for GPU nodes, where a
    /// CPU fallback would silently starve the queue).
    pub require_gpu: bool,
    /// Threads ONNX Runtime uses inside one operator; `None` = its default (one per
    /// core).
    pub intra_threads: Option<usize>,
}

/// The execution provider a session really runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
}

impl Provider {
    /// Lower-case name, as used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(
        "model {model}: built-in model {name:?} does not exist; use a `builtin:` name this radflow ships (demo-tissue) or a file path"
    )]
    UnknownBuiltin { model: String, name: String },
    #[error("model {model}: cannot read {path}: {source}")]
    Read {
        model: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "model {model}: the file's SHA-256 is {actual} but the registry expects {expected}; \
         put the right file in place or update the registry's sha256 after checking the file"
    )]
    Checksum {
        model: String,
        expected: String,
        actual: String,
    },
    #[error("model {model}: ONNX Runtime cannot load it: {reason}")]
    Session { model: String, reason: String },
    #[error(
        "model {model}: a GPU is required (require_gpu) but CUDA cannot be used: {reason}; \
         install onnxruntime-gpu 1.31.x with its CUDA 13 libraries next to it, or allow CPU inference"
    )]
    GpuUnavailable { model: String, reason: String },
    #[error(
        "model {model}: the registry names {kind} tensor {name:?}, but the model has {available:?}; fix `{kind}` in the registry"
    )]
    MissingTensor {
        model: String,
        kind: &'static str,
        name: String,
        available: Vec<String>,
    },
    #[error(
        "model {model}: {kind} tensor {name:?} is {found}, but radflow feeds float32 [N, 1, D, H, W] and reads float32 [N, C, D, H, W]"
    )]
    TensorType {
        model: String,
        kind: &'static str,
        name: String,
        found: String,
    },
    #[error("model {model}: inference failed: {reason}")]
    Run { model: String, reason: String },
    #[error("model {model}: unexpected output: {reason}")]
    Output { model: String, reason: String },
    #[error(
        "the model's output does not fit the sliding window: {0}; check the registry's patch size and output tensor"
    )]
    PatchOutput(String),
    #[error("invalid sliding-window settings: {0}")]
    Window(String),
}

// Models are shared between worker tasks.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<LoadedModel>();
};

/// A model ready to run: its registry entry, checked bytes and an open session.
pub struct LoadedModel {
    /// The registry entry it was loaded for.
    pub spec: ModelSpec,
    /// SHA-256 of the ONNX file (hex), equal to `spec.sha256`.
    pub sha256: String,
    /// The execution provider the session runs on.
    pub provider: Provider,
    /// `Session::run` needs `&mut`: ONNX Runtime sessions are not safe to run from
    /// several threads at once, so runs are serialised.
    session: Mutex<Session>,
}

impl fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model", &self.spec.reference())
            .field("sha256", &self.sha256)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Hex SHA-256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The bytes of a model's ONNX file: a built-in model, or a file resolved against the
/// registry's folder `base_dir`.
pub fn read_model(
    spec: &ModelSpec,
    base_dir: Option<&Path>,
) -> Result<Cow<'static, [u8]>, ModelError> {
    match spec.location(base_dir) {
        ModelLocation::Builtin(name) => {
            builtin_model(&name)
                .map(Cow::Borrowed)
                .ok_or_else(|| ModelError::UnknownBuiltin {
                    model: spec.reference(),
                    name,
                })
        }
        ModelLocation::File(path) => {
            std::fs::read(&path)
                .map(Cow::Owned)
                .map_err(|source| ModelError::Read {
                    model: spec.reference(),
                    path,
                    source,
                })
        }
    }
}

/// Checks `bytes` against `spec.sha256`, opens a session on the requested provider
/// (loading ONNX Runtime with the default search if [`runtime::init`] was not called)
/// and checks that the tensors the registry names exist.
pub fn load(
    spec: &ModelSpec,
    bytes: &[u8],
    cfg: &ExecutionConfig,
) -> Result<LoadedModel, ModelError> {
    let model = spec.reference();
    let sha256 = sha256_hex(bytes);
    if !sha256.eq_ignore_ascii_case(&spec.sha256) {
        return Err(ModelError::Checksum {
            model,
            expected: spec.sha256.to_ascii_lowercase(),
            actual: sha256,
        });
    }
    let env = runtime::environment()?;
    let session_error = |reason: String| ModelError::Session {
        model: model.clone(),
        reason,
    };

    let cuda = match cfg.provider {
        ProviderRequest::Cpu => None,
        ProviderRequest::Auto => Some((0, None)),
        ProviderRequest::Cuda {
            device_id,
            memory_limit_bytes,
        } => Some((device_id, memory_limit_bytes)),
    };
    let cuda_attempt = cuda.map(|(device_id, limit)| {
        commit_cuda(env, bytes, cfg, device_id, limit).map(|s| (s, device_id))
    });
    let (session, provider) = match cuda_attempt {
        Some(Ok((session, device_id))) => {
            tracing::debug!(model = %model, device_id, "CUDA execution provider registered");
            (session, Provider::Cuda)
        }
        Some(Err(reason)) => {
            if cfg.require_gpu {
                return Err(ModelError::GpuUnavailable { model, reason });
            }
            if cfg.provider == ProviderRequest::Auto {
                tracing::info!(model = %model, %reason, "CUDA is not available; running on the CPU");
            } else {
                tracing::warn!(
                    model = %model,
                    %reason,
                    "CUDA was requested but cannot be used; falling back to the CPU"
                );
            }
            (
                commit_cpu(env, bytes, cfg).map_err(session_error)?,
                Provider::Cpu,
            )
        }
        None => {
            if cfg.require_gpu {
                return Err(ModelError::GpuUnavailable {
                    model,
                    reason: "the CPU provider was requested".into(),
                });
            }
            (
                commit_cpu(env, bytes, cfg).map_err(session_error)?,
                Provider::Cpu,
            )
        }
    };

    check_tensors(spec, &session)?;
    tracing::info!(
        model = %model,
        sha256 = &sha256[..12],
        provider = %provider,
        "model loaded"
    );
    Ok(LoadedModel {
        spec: spec.clone(),
        sha256,
        provider,
        session: Mutex::new(session),
    })
}

fn new_builder(
    env: &ort::environment::Environment,
    cfg: &ExecutionConfig,
) -> Result<SessionBuilder, String> {
    let builder = Session::builder(env).map_err(|e| e.to_string())?;
    match cfg.intra_threads {
        Some(n) => builder.with_intra_threads(n).map_err(|e| e.to_string()),
        None => Ok(builder),
    }
}

fn commit_cpu(
    env: &ort::environment::Environment,
    bytes: &[u8],
    cfg: &ExecutionConfig,
) -> Result<Session, String> {
    new_builder(env, cfg)?
        .commit_from_memory(bytes)
        .map_err(|e| e.to_string())
}

/// A session with the CUDA provider registered, or why not. Registration errors are
/// turned on (`error_on_failure`): otherwise ONNX Runtime would quietly use the CPU.
fn commit_cuda(
    env: &ort::environment::Environment,
    bytes: &[u8],
    cfg: &ExecutionConfig,
    device_id: i32,
    memory_limit_bytes: Option<usize>,
) -> Result<Session, String> {
    let mut cuda = ort::ep::CUDA::default().with_device_id(device_id);
    if let Some(limit) = memory_limit_bytes {
        cuda = cuda.with_memory_limit(limit);
    }
    new_builder(env, cfg)?
        .with_execution_providers([cuda.build().error_on_failure()])
        .map_err(|e| e.to_string())?
        .commit_from_memory(bytes)
        .map_err(|e| e.to_string())
}

/// The registry's input and output must exist and be float32 tensors of rank 5, with
/// one input channel and (for segmentation) room for every listed label.
fn check_tensors(spec: &ModelSpec, session: &Session) -> Result<(), ModelError> {
    let model = spec.reference();
    let find = |kind: &'static str, outlets: &[ort::value::Outlet], name: &str| {
        outlets
            .iter()
            .find(|o| o.name() == name)
            .map(|o| o.dtype().clone())
            .ok_or_else(|| ModelError::MissingTensor {
                model: model.clone(),
                kind,
                name: name.to_owned(),
                available: outlets.iter().map(|o| o.name().to_owned()).collect(),
            })
    };
    let input = find("input", session.inputs(), &spec.input)?;
    let output = find("output", session.outputs(), &spec.output)?;

    for (kind, name, dtype) in [
        ("input", &spec.input, &input),
        ("output", &spec.output, &output),
    ] {
        let type_error = || ModelError::TensorType {
            model: model.clone(),
            kind,
            name: name.clone(),
            found: dtype.to_string(),
        };
        let ValueType::Tensor { ty, shape, .. } = dtype else {
            return Err(type_error());
        };
        if *ty != TensorElementType::Float32 || shape.len() != 5 {
            return Err(type_error());
        }
        let channels = shape[1];
        let bad_channels = match kind {
            "input" => channels > 0 && channels != 1,
            _ => {
                spec.kind == ModelKind::Segmentation
                    && channels > 0
                    && spec.labels.iter().any(|l| i64::from(l.index) >= channels)
            }
        };
        if bad_channels {
            return Err(type_error());
        }
    }
    Ok(())
}

impl LoadedModel {
    /// Runs one batch `[N, 1, D, H, W]` through the model (one `session.run`) and
    /// returns the output tensor `[N, C, D, H, W]`.
    pub fn run_batch(&self, input: ArrayView5<f32>) -> Result<Array5<f32>, ModelError> {
        let run_error = |reason: String| ModelError::Run {
            model: self.spec.reference(),
            reason,
        };
        let input = input.as_standard_layout();
        let tensor = TensorRef::from_array_view(&input).map_err(|e| run_error(e.to_string()))?;
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session
            .run(ort::inputs![self.spec.input.as_str() => tensor])
            .map_err(|e| run_error(e.to_string()))?;
        let output = outputs
            .get(&self.spec.output)
            .ok_or_else(|| run_error(format!("no output named {:?}", self.spec.output)))?;
        let array = output
            .try_extract_array::<f32>()
            .map_err(|e| run_error(e.to_string()))?;
        let shape = array.shape().to_vec();
        let array = array
            .into_dimensionality::<Ix5>()
            .map_err(|_| ModelError::Output {
                model: self.spec.reference(),
                reason: format!(
                    "output {:?} has shape {shape:?}, expected [N, C, D, H, W]",
                    self.spec.output
                ),
            })?;
        Ok(array.to_owned())
    }
}
