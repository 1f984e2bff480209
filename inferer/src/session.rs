//! Loading a model: checking its bytes against the registry, opening an ONNX Runtime
//! session on the execution provider the operator asked for, finding out which provider
//! really runs it, and running batches.
//!
//! Two things here protect results. The SHA-256 check means a result labelled
//! `model@version` was produced by exactly the file the registry names. And the
//! provider that is really in use is established, not assumed: by default ONNX Runtime
//! silently runs on the CPU when the CUDA provider cannot be registered, which on a GPU
//! node would quietly make inference a hundred times slower. Here providers are
//! registered with `error_on_failure`, and the warm-up run (which every model gets
//! before it serves, so the first job pays no allocation or cuDNN algorithm search) is
//! profiled: ONNX Runtime's profile names the provider of every node it executed. A
//! model whose accelerator could not be used falls back to the CPU with a warning or,
//! with `require_gpu`, refuses to load.
//!
//! # GPU hygiene
//!
//! On an accelerator every batch has the registry's `batch_size` (a short last batch is
//! filled with zeros whose outputs are ignored), so a session only ever sees the one
//! input shape it was warmed up on: the CUDA memory arena stops growing after the
//! warm-up and cuDNN's exhaustive algorithm search runs once, not once per new shape.
//! The arena's growth policy, its size limit and the cuDNN search policy are settings
//! ([`CudaOptions`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use half::f16;
use ndarray::{Array2, Array5, ArrayView5, ArrayViewD, Ix2, Ix5};
use ort::ep::ArbitrarilyConfigurableExecutionProvider;
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use ort::value::{TensorElementType, TensorRef, ValueType};
use radflow_shared::models::{ModelKind, ModelLocation, ModelSpec, TensorDtype, TensorLayout};
use sha2::{Digest, Sha256};

use crate::builtin::builtin_model;
use crate::runtime::{self, RuntimeError};

/// Which execution provider to run models on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderRequest {
    /// CUDA when the library and a GPU allow it, else the CPU (logged at info level:
    /// running on the CPU is expected on a machine without a GPU).
    #[default]
    Auto,
    /// The CPU only.
    Cpu,
    /// CUDA; falling back to the CPU is logged as a warning.
    Cuda,
    /// TensorRT, with CUDA for the nodes TensorRT does not take; then CUDA alone, then
    /// the CPU (each fallback logged as a warning).
    TensorRt,
}

/// A setting given as text that is not one of the accepted values.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{value:?} is not one of: {expected}")]
pub struct SettingError {
    value: String,
    expected: &'static str,
}

fn parse_setting<T: Copy>(
    value: &str,
    table: &[(&str, T)],
    expected: &'static str,
) -> Result<T, SettingError> {
    let wanted = value.trim().to_ascii_lowercase().replace('_', "-");
    table
        .iter()
        .find(|(name, _)| *name == wanted)
        .map(|(_, v)| *v)
        .ok_or_else(|| SettingError {
            value: value.to_owned(),
            expected,
        })
}

impl FromStr for ProviderRequest {
    type Err = SettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_setting(
            s,
            &[
                ("auto", Self::Auto),
                ("cpu", Self::Cpu),
                ("cuda", Self::Cuda),
                ("gpu", Self::Cuda),
                ("tensorrt", Self::TensorRt),
                ("trt", Self::TensorRt),
            ],
            "auto, cpu, cuda, tensorrt",
        )
    }
}

/// How cuDNN picks a convolution algorithm (ONNX Runtime's `cudnn_conv_algo_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgoSearch {
    /// Benchmark every algorithm on the first run of each input shape and keep the
    /// fastest (ONNX Runtime's default). With radflow's fixed shapes this happens once,
    /// during the warm-up.
    #[default]
    Exhaustive,
    /// cuDNN's heuristics: no benchmarking, less memory at start, sometimes slower.
    Heuristic,
    /// cuDNN's default algorithm, rarely the fastest.
    Default,
}

impl FromStr for ConvAlgoSearch {
    type Err = SettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_setting(
            s,
            &[
                ("exhaustive", Self::Exhaustive),
                ("heuristic", Self::Heuristic),
                ("default", Self::Default),
            ],
            "exhaustive, heuristic, default",
        )
    }
}

/// How the CUDA memory arena grows when it needs more memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArenaExtend {
    /// By exactly what was asked: the arena never holds more than the peak need.
    #[default]
    SameAsRequested,
    /// By doubling (ONNX Runtime's default): fewer allocations, up to twice the memory.
    NextPowerOfTwo,
}

impl FromStr for ArenaExtend {
    type Err = SettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_setting(
            s,
            &[
                ("same-as-requested", Self::SameAsRequested),
                ("next-power-of-two", Self::NextPowerOfTwo),
            ],
            "same-as-requested, next-power-of-two",
        )
    }
}

/// Options of the CUDA execution provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device_id: i32,
    /// Cap on the CUDA memory arena (bytes); `None` lets it grow to the device's memory.
    /// cuDNN workspaces and CUDA's own context come on top.
    pub memory_limit_bytes: Option<usize>,
    /// How the arena grows.
    pub arena_extend: ArenaExtend,
    /// How cuDNN chooses convolution algorithms.
    pub conv_algo_search: ConvAlgoSearch,
    /// Let the exhaustive search use as much workspace memory as it wants (otherwise
    /// 32 MB, which may rule out the fastest algorithms).
    pub conv_max_workspace: bool,
    /// Copy inputs and outputs on the compute stream (`true`, ONNX Runtime's default)
    /// or on separate copy streams, which overlaps copies with compute but can race on
    /// some models.
    pub copy_in_default_stream: bool,
    /// Allow TF32 tensor-core math for float32 convolutions and matrix products
    /// (faster on Ampere and later; about 1e-3 relative error instead of 1e-6).
    pub tf32: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device_id: 0,
            memory_limit_bytes: None,
            arena_extend: ArenaExtend::default(),
            conv_algo_search: ConvAlgoSearch::default(),
            conv_max_workspace: true,
            copy_in_default_stream: true,
            tf32: true,
        }
    }
}

/// Options of the TensorRT execution provider (used with `ProviderRequest::TensorRt`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TensorRtOptions {
    /// Build engines in float16 where TensorRT judges it safe.
    pub fp16: bool,
    /// Folder where built engines are cached, so a restart does not rebuild them
    /// (building takes minutes for a 3D U-Net).
    pub engine_cache: Option<PathBuf>,
    /// Builder workspace limit in bytes.
    pub max_workspace_bytes: Option<usize>,
}

/// How sessions are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionConfig {
    /// Execution provider to try.
    pub provider: ProviderRequest,
    /// Refuse to load a model rather than run it on the CPU (for GPU nodes, where a
    /// CPU fallback would silently starve the queue).
    pub require_gpu: bool,
    /// CUDA provider options (also used under TensorRT).
    pub cuda: CudaOptions,
    /// TensorRT provider options.
    pub tensorrt: TensorRtOptions,
    /// Threads ONNX Runtime uses inside one operator; `None` = its default (one per
    /// physical core).
    pub intra_threads: Option<usize>,
    /// Threads running independent nodes in parallel; `None` = sequential execution.
    pub inter_threads: Option<usize>,
    /// Use ONNX Runtime's CPU memory arena (faster; holds on to the peak allocation).
    pub cpu_arena: bool,
    /// Let ONNX Runtime's idle intra-op threads spin, waiting for the next run
    /// (ONNX Runtime's default). Off by default here: between two runs of a sliding
    /// window radflow gathers and blends on the same cores, and spinning threads would
    /// take them.
    pub spin_wait: bool,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        Self {
            provider: ProviderRequest::Auto,
            require_gpu: false,
            cuda: CudaOptions::default(),
            tensorrt: TensorRtOptions::default(),
            intra_threads: None,
            inter_threads: None,
            cpu_arena: true,
            spin_wait: false,
        }
    }
}

/// The execution provider a session really runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
}

impl Provider {
    /// Lower-case name, as used in logs, `summary.json` and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }

    /// ONNX Runtime's name of the provider.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::TensorRt => "TensorrtExecutionProvider",
        }
    }

    /// Whether this is a GPU provider.
    pub fn is_accelerator(self) -> bool {
        self != Provider::Cpu
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
        "model {model}: a GPU is required (require_gpu) but it cannot run there: {reason}; \
         install onnxruntime-gpu 1.31.x with its CUDA 13 and cuDNN 9 libraries next to it, or allow CPU inference"
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
    #[error("model {model}: {kind} tensor {name:?} is {found}, but the registry says {expected}")]
    TensorType {
        model: String,
        kind: &'static str,
        name: String,
        found: String,
        expected: String,
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

/// Counters of one model's `session.run` calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// `session.run` calls, the warm-up included.
    pub runs: u64,
    /// Batch items (windows or jobs) in them, padding slots excluded.
    pub items: u64,
}

/// A model ready to run: its registry entry, checked bytes and a warm session.
pub struct LoadedModel {
    /// The registry entry it was loaded for.
    pub spec: ModelSpec,
    /// SHA-256 of the ONNX file (hex), equal to `spec.sha256`.
    pub sha256: String,
    /// The execution provider the session runs on.
    pub provider: Provider,
    /// Nodes per ONNX Runtime provider name in the warm-up run, from its profile
    /// (empty when the profile could not be read).
    pub placement: BTreeMap<String, usize>,
    /// Time of the warm-up run.
    pub warm_up: Duration,
    /// Batches are always `batch_size` items: on accelerators (one shape per session)
    /// and for models exported with a fixed batch dimension.
    fixed_batch: bool,
    /// `Session::run` needs `&mut`: ONNX Runtime sessions are not safe to run from
    /// several threads at once, so runs are serialised.
    session: Mutex<Session>,
    runs: AtomicU64,
    items: AtomicU64,
}

impl fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model", &self.spec.reference())
            .field("sha256", &self.sha256)
            .field("provider", &self.provider)
            .field("placement", &self.placement)
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
/// (loading ONNX Runtime with the default search if [`runtime::init`] was not called),
/// checks the tensors the registry names, and warms the session up on a batch of the
/// registry's shape, profiling that run to learn which provider executes the nodes.
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

    let plan: &[Provider] = match cfg.provider {
        ProviderRequest::Cpu => &[],
        ProviderRequest::Auto | ProviderRequest::Cuda => &[Provider::Cuda],
        ProviderRequest::TensorRt => &[Provider::TensorRt, Provider::Cuda],
    };
    let mut failures: Vec<String> = Vec::new();
    for &provider in plan {
        let session = match commit(env, bytes, cfg, provider) {
            Ok(session) => session,
            Err(reason) => {
                failures.push(format!("{provider}: {reason}"));
                continue;
            }
        };
        let loaded = finish(spec, sha256.clone(), session, provider)?;
        if loaded.provider == provider {
            return Ok(loaded);
        }
        failures.push(format!(
            "{provider}: registered, but the warm-up ran {:?}",
            loaded.placement
        ));
    }

    let reason = if failures.is_empty() {
        "the CPU provider was requested".to_owned()
    } else {
        failures.join("; ")
    };
    if cfg.require_gpu {
        return Err(ModelError::GpuUnavailable { model, reason });
    }
    match cfg.provider {
        ProviderRequest::Cpu => {}
        ProviderRequest::Auto => {
            tracing::info!(model = %model, %reason, "no GPU provider can be used; running on the CPU");
        }
        ProviderRequest::Cuda | ProviderRequest::TensorRt => tracing::warn!(
            model = %model,
            %reason,
            "the GPU provider that was requested cannot be used; falling back to the CPU"
        ),
    }
    let session = commit(env, bytes, cfg, Provider::Cpu).map_err(|reason| ModelError::Session {
        model: model.clone(),
        reason,
    })?;
    finish(spec, sha256, session, Provider::Cpu)
}

/// Checks the tensors, warms up and works out the provider really in use.
fn finish(
    spec: &ModelSpec,
    sha256: String,
    session: Session,
    registered: Provider,
) -> Result<LoadedModel, ModelError> {
    check_tensors(spec, &session)?;
    // A model exported with a fixed batch size only ever takes that many items.
    let static_batch = session
        .inputs()
        .iter()
        .find(|o| o.name() == spec.input)
        .and_then(|o| match o.dtype() {
            ValueType::Tensor { shape, .. } => shape.first().copied(),
            _ => None,
        })
        .is_some_and(|n| n > 0);
    let mut loaded = LoadedModel {
        spec: spec.clone(),
        sha256,
        provider: registered,
        placement: BTreeMap::new(),
        warm_up: Duration::ZERO,
        fixed_batch: static_batch || registered.is_accelerator(),
        session: Mutex::new(session),
        runs: AtomicU64::new(0),
        items: AtomicU64::new(0),
    };
    let started = Instant::now();
    loaded.warm()?;
    loaded.warm_up = started.elapsed();

    let profile = loaded
        .session
        .get_mut()
        .unwrap_or_else(PoisonError::into_inner)
        .end_profiling()
        .map_err(|e| e.to_string())
        .and_then(|path| read_profile(Path::new(&path)));
    match profile {
        Ok(placement) => {
            loaded.provider = provider_in_use(registered, &placement);
            if loaded.provider != registered {
                loaded.fixed_batch = static_batch || loaded.provider.is_accelerator();
            }
            loaded.placement = placement;
        }
        Err(e) => {
            tracing::debug!(model = %spec.reference(), error = %e, "no profile of the warm-up run; trusting the provider registration");
        }
    }
    if loaded.provider == registered {
        tracing::info!(
            model = %spec.reference(),
            sha256 = &loaded.sha256[..12],
            provider = %loaded.provider,
            nodes = ?loaded.placement,
            warm_up_ms = loaded.warm_up.as_millis() as u64,
            "model loaded and warmed up"
        );
    }
    Ok(loaded)
}

/// The provider that ran the most important share of the graph: an accelerator when
/// any node ran on it (shape arithmetic is routinely left to the CPU), else the CPU.
fn provider_in_use(registered: Provider, placement: &BTreeMap<String, usize>) -> Provider {
    if placement.is_empty() {
        return registered;
    }
    [Provider::TensorRt, Provider::Cuda]
        .into_iter()
        .find(|p| placement.get(p.ort_name()).is_some_and(|&n| n > 0))
        .unwrap_or(Provider::Cpu)
}

/// Nodes per provider in an ONNX Runtime profile (a JSON array of events; each
/// executed node has a `<node>_kernel_time` event whose `args.provider` names its
/// provider). The file is removed.
fn read_profile(path: &Path) -> Result<BTreeMap<String, usize>, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&text?).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut nodes: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for e in &events {
        let (Some(name), Some(provider)) = (e["name"].as_str(), e["args"]["provider"].as_str())
        else {
            continue;
        };
        if e["cat"] == "Node"
            && let Some(node) = name.strip_suffix("_kernel_time")
        {
            nodes
                .entry(provider.to_owned())
                .or_default()
                .insert(node.to_owned());
        }
    }
    Ok(nodes.into_iter().map(|(p, n)| (p, n.len())).collect())
}

/// A unique prefix for a session's profile file (ONNX Runtime appends a timestamp).
fn profile_prefix() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "radflow-profile-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn new_builder(
    env: &ort::environment::Environment,
    cfg: &ExecutionConfig,
) -> Result<SessionBuilder, String> {
    let err = |e: ort::Error| e.to_string();
    let mut builder = Session::builder(env).map_err(err)?;
    if let Some(n) = cfg.intra_threads {
        builder = builder.with_intra_threads(n).map_err(|e| e.to_string())?;
    }
    if let Some(n) = cfg.inter_threads {
        builder = builder
            .with_parallel_execution(true)
            .map_err(|e| e.to_string())?
            .with_inter_threads(n)
            .map_err(|e| e.to_string())?;
    }
    builder = builder
        .with_intra_op_spinning(cfg.spin_wait)
        .map_err(|e| e.to_string())?;
    builder
        .with_profiling(profile_prefix())
        .map_err(|e| e.to_string())
}

/// A session with `provider` registered (with `error_on_failure`: otherwise ONNX
/// Runtime would quietly use the CPU), or why not.
fn commit(
    env: &ort::environment::Environment,
    bytes: &[u8],
    cfg: &ExecutionConfig,
    provider: Provider,
) -> Result<Session, String> {
    let cpu = ort::ep::CPU::default()
        .with_arena_allocator(cfg.cpu_arena)
        .build();
    let providers = match provider {
        Provider::Cpu => vec![cpu],
        Provider::Cuda => vec![cuda_provider(&cfg.cuda).build().error_on_failure(), cpu],
        Provider::TensorRt => vec![
            tensorrt_provider(cfg).build().error_on_failure(),
            cuda_provider(&cfg.cuda).build().error_on_failure(),
            cpu,
        ],
    };
    new_builder(env, cfg)?
        .with_execution_providers(providers)
        .map_err(|e| e.to_string())?
        .commit_from_memory(bytes)
        .map_err(|e| e.to_string())
}

fn cuda_provider(o: &CudaOptions) -> ort::ep::CUDA {
    use ort::ep::cuda::ConvAlgorithmSearch;
    let mut cuda = ort::ep::CUDA::default()
        .with_device_id(o.device_id)
        .with_arena_extend_strategy(match o.arena_extend {
            ArenaExtend::SameAsRequested => ort::ep::ArenaExtendStrategy::SameAsRequested,
            ArenaExtend::NextPowerOfTwo => ort::ep::ArenaExtendStrategy::NextPowerOfTwo,
        })
        .with_conv_algorithm_search(match o.conv_algo_search {
            ConvAlgoSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
            ConvAlgoSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
            ConvAlgoSearch::Default => ConvAlgorithmSearch::Default,
        })
        .with_conv_max_workspace(o.conv_max_workspace)
        .with_tf32(o.tf32)
        // `ort` dropped the setter, but ONNX Runtime 1.31 still reads the key.
        .with_arbitrary_config(
            "do_copy_in_default_stream",
            if o.copy_in_default_stream { "1" } else { "0" },
        );
    if let Some(limit) = o.memory_limit_bytes {
        cuda = cuda.with_memory_limit(limit);
    }
    cuda
}

fn tensorrt_provider(cfg: &ExecutionConfig) -> ort::ep::TensorRT {
    let o = &cfg.tensorrt;
    let mut trt = ort::ep::TensorRT::default()
        .with_device_id(cfg.cuda.device_id)
        .with_fp16(o.fp16);
    if let Some(dir) = &o.engine_cache {
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(dir.display())
            .with_timing_cache(true)
            .with_timing_cache_path(dir.display());
    }
    if let Some(bytes) = o.max_workspace_bytes {
        trt = trt.with_max_workspace_size(bytes);
    }
    trt
}

/// Position of the channel axis in a rank-5 tensor of this layout.
fn channel_axis(layout: TensorLayout) -> usize {
    match layout {
        TensorLayout::Ncdhw => 1,
        TensorLayout::Ndhwc => 4,
    }
}

/// The registry's input and output must exist with the registry's element type; the
/// input is rank 5 with one channel and (where the model fixes them) the patch size and
/// batch size; a segmentation output is rank 5 and a classification output `[N, C]`,
/// with room for every listed label.
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
    let element = match spec.dtype {
        TensorDtype::Float32 => TensorElementType::Float32,
        TensorDtype::Float16 => TensorElementType::Float16,
    };
    let dtype_name = match spec.dtype {
        TensorDtype::Float32 => "float32",
        TensorDtype::Float16 => "float16",
    };
    let layout = match spec.layout {
        TensorLayout::Ncdhw => "NCDHW",
        TensorLayout::Ndhwc => "NDHWC",
    };
    let c = channel_axis(spec.layout);
    let [d, h, w] = spec.patch.map(|v| v as i64);
    let spatial = match spec.layout {
        TensorLayout::Ncdhw => [2, 3, 4],
        TensorLayout::Ndhwc => [1, 2, 3],
    };
    let classes_needed = spec
        .labels
        .iter()
        .map(|l| i64::from(l.index) + 1)
        .max()
        .unwrap_or(1);
    let batch = spec.batch_size as i64;
    // A dimension the model fixes (> 0) must equal what radflow feeds.
    let fits = |dim: i64, want: i64| dim <= 0 || dim == want;

    let checks: [(&'static str, &String, &ValueType, String); 2] = [
        (
            "input",
            &spec.input,
            &input,
            format!(
                "{dtype_name} {layout} with 1 channel, batch {batch} and patch {:?}",
                spec.patch
            ),
        ),
        (
            "output",
            &spec.output,
            &output,
            match spec.kind {
                ModelKind::Segmentation => {
                    format!("{dtype_name} {layout} with at least {classes_needed} channels")
                }
                ModelKind::Classification => {
                    format!("{dtype_name} [N, classes] with at least {classes_needed} classes")
                }
            },
        ),
    ];
    for (kind, name, dtype, expected) in checks {
        let type_error = || ModelError::TensorType {
            model: model.clone(),
            kind,
            name: name.clone(),
            found: dtype.to_string(),
            expected: expected.clone(),
        };
        let ValueType::Tensor { ty, shape, .. } = dtype else {
            return Err(type_error());
        };
        if *ty != element {
            return Err(type_error());
        }
        let ok = match (kind, spec.kind) {
            ("input", _) => {
                shape.len() == 5
                    && fits(shape[c], 1)
                    && fits(shape[0], batch)
                    && fits(shape[spatial[0]], d)
                    && fits(shape[spatial[1]], h)
                    && fits(shape[spatial[2]], w)
            }
            (_, ModelKind::Segmentation) => {
                shape.len() == 5
                    && (shape[c] <= 0 || shape[c] >= classes_needed)
                    && fits(shape[spatial[0]], d)
                    && fits(shape[spatial[1]], h)
                    && fits(shape[spatial[2]], w)
            }
            (_, ModelKind::Classification) => {
                shape.len() == 2 && (shape[1] <= 0 || shape[1] >= classes_needed)
            }
        };
        if !ok {
            return Err(type_error());
        }
    }
    Ok(())
}

impl LoadedModel {
    /// Whether every batch must have `batch_size` items (accelerators, models with a
    /// fixed batch dimension), the unused slots filled with zeros.
    pub fn fixed_batch(&self) -> bool {
        self.fixed_batch
    }

    /// Takes back `slots` items counted by a run whose batch was padded to the
    /// model's fixed size with zeros.
    pub fn uncount_padding(&self, slots: usize) {
        self.items.fetch_sub(slots as u64, Ordering::Relaxed);
    }

    /// `session.run` calls and batch items so far.
    pub fn counts(&self) -> RunCounts {
        RunCounts {
            runs: self.runs.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
        }
    }

    /// Runs a batch of zeros of the serving shape.
    fn warm(&self) -> Result<(), ModelError> {
        let [d, h, w] = self.spec.patch;
        let input = Array5::<f32>::zeros((self.spec.batch_size, 1, d, h, w));
        match self.spec.kind {
            ModelKind::Segmentation => self.run_patches(input.view(), &mut |_| Ok(())),
            ModelKind::Classification => self.run_scores(input.view()).map(|(_, t)| t),
        }
        .map(|_| ())
    }

    fn run_error(&self, reason: impl fmt::Display) -> ModelError {
        ModelError::Run {
            model: self.spec.reference(),
            reason: reason.to_string(),
        }
    }

    fn output_error(&self, reason: String) -> ModelError {
        ModelError::Output {
            model: self.spec.reference(),
            reason,
        }
    }

    /// One `session.run` on `input` (`[N, 1, D, H, W]`, converted to the model's
    /// layout and element type), handing the raw output (float32, as the model lays it
    /// out) to `read` while the session is held; returns what `read` returned and the
    /// time spent in `session.run`.
    fn run_raw<R>(
        &self,
        input: ArrayView5<f32>,
        read: impl FnOnce(ArrayViewD<f32>) -> Result<R, ModelError>,
    ) -> Result<(R, Duration), ModelError> {
        let (n, _, d, h, w) = input.dim();
        let input = input.as_standard_layout();
        // One channel: NCDHW and NDHWC hold the same values in the same order.
        let shaped = match self.spec.layout {
            TensorLayout::Ncdhw => input.view(),
            TensorLayout::Ndhwc => input
                .view()
                .into_shape_with_order((n, d, h, w, 1))
                .map_err(|e| self.run_error(e))?,
        };
        let half;
        let tensor = match self.spec.dtype {
            TensorDtype::Float32 => TensorRef::from_array_view(shaped)
                .map_err(|e| self.run_error(e))?
                .into_dyn(),
            TensorDtype::Float16 => {
                half = shaped.mapv(f16::from_f32);
                TensorRef::from_array_view(&half)
                    .map_err(|e| self.run_error(e))?
                    .into_dyn()
            }
        };

        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let outputs = session
            .run(ort::inputs![self.spec.input.as_str() => tensor])
            .map_err(|e| self.run_error(e))?;
        let elapsed = started.elapsed();
        self.runs.fetch_add(1, Ordering::Relaxed);
        let output = outputs
            .get(&self.spec.output)
            .ok_or_else(|| self.run_error(format!("no output named {:?}", self.spec.output)))?;
        let result = match self.spec.dtype {
            TensorDtype::Float32 => read(
                output
                    .try_extract_array::<f32>()
                    .map_err(|e| self.run_error(e))?,
            ),
            TensorDtype::Float16 => {
                let values = output
                    .try_extract_array::<f16>()
                    .map_err(|e| self.run_error(e))?
                    .mapv(f16::to_f32);
                read(values.view())
            }
        }?;
        Ok((result, elapsed))
    }

    /// Runs one batch of patches `[N, 1, D, H, W]` (one `session.run`) and hands the
    /// logits `[N, C, D, H, W]` to `consume`, as a view that is only valid during the
    /// call (ONNX Runtime's own output buffer: nothing is copied). Returns the time
    /// spent in `session.run`.
    pub fn run_patches(
        &self,
        input: ArrayView5<f32>,
        consume: &mut dyn FnMut(ArrayView5<f32>) -> Result<(), ModelError>,
    ) -> Result<Duration, ModelError> {
        let n = input.dim().0;
        let layout = self.spec.layout;
        let ((), elapsed) = self.run_raw(input, |raw| {
            let shape = raw.shape().to_vec();
            let logits = raw.into_dimensionality::<Ix5>().map_err(|_| {
                self.output_error(format!(
                    "output {:?} has shape {shape:?}, expected rank 5",
                    self.spec.output
                ))
            })?;
            match layout {
                TensorLayout::Ncdhw => consume(logits),
                TensorLayout::Ndhwc => consume(logits.permuted_axes([0, 4, 1, 2, 3])),
            }
        })?;
        self.items.fetch_add(n as u64, Ordering::Relaxed);
        Ok(elapsed)
    }

    /// Runs one batch `[N, 1, D, H, W]` and returns the logits `[N, C, D, H, W]`.
    pub fn run_batch(&self, input: ArrayView5<f32>) -> Result<Array5<f32>, ModelError> {
        let mut out = None;
        self.run_patches(input, &mut |logits| {
            out = Some(logits.to_owned());
            Ok(())
        })?;
        Ok(out.expect("run_patches calls consume once"))
    }

    /// Runs a classification batch `[N, 1, D, H, W]` and returns its scores `[N, C]`
    /// and the time spent in `session.run`.
    pub fn run_scores(
        &self,
        input: ArrayView5<f32>,
    ) -> Result<(Array2<f32>, Duration), ModelError> {
        let n = input.dim().0;
        let result = self.run_raw(input, |raw| {
            let shape = raw.shape().to_vec();
            let scores = raw.into_dimensionality::<Ix2>().map_err(|_| {
                self.output_error(format!(
                    "output {:?} has shape {shape:?}, expected [N, classes]",
                    self.spec.output
                ))
            })?;
            if scores.dim().0 != n {
                return Err(self.output_error(format!(
                    "a batch of {n} gave {} rows of scores",
                    scores.dim().0
                )));
            }
            Ok(scores.to_owned())
        })?;
        self.items.fetch_add(n as u64, Ordering::Relaxed);
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_case_and_separator_insensitively() {
        assert_eq!(
            "CUDA".parse::<ProviderRequest>().unwrap(),
            ProviderRequest::Cuda
        );
        assert_eq!(
            "trt".parse::<ProviderRequest>().unwrap(),
            ProviderRequest::TensorRt
        );
        assert_eq!(
            "Heuristic".parse::<ConvAlgoSearch>().unwrap(),
            ConvAlgoSearch::Heuristic
        );
        assert_eq!(
            "next_power_of_two".parse::<ArenaExtend>().unwrap(),
            ArenaExtend::NextPowerOfTwo
        );
        let err = "rocm".parse::<ProviderRequest>().unwrap_err().to_string();
        assert!(err.contains("auto, cpu, cuda, tensorrt"), "{err}");
    }

    #[test]
    fn provider_in_use_prefers_the_accelerator_that_ran_nodes() {
        let placement = |pairs: &[(&str, usize)]| {
            pairs
                .iter()
                .map(|(p, n)| (p.to_string(), *n))
                .collect::<BTreeMap<_, _>>()
        };
        let mixed = placement(&[("CPUExecutionProvider", 2), ("CUDAExecutionProvider", 40)]);
        assert_eq!(provider_in_use(Provider::Cuda, &mixed), Provider::Cuda);
        let cpu_only = placement(&[("CPUExecutionProvider", 42)]);
        assert_eq!(provider_in_use(Provider::Cuda, &cpu_only), Provider::Cpu);
        let trt = placement(&[
            ("TensorrtExecutionProvider", 1),
            ("CUDAExecutionProvider", 3),
        ]);
        assert_eq!(
            provider_in_use(Provider::TensorRt, &trt),
            Provider::TensorRt
        );
        assert_eq!(
            provider_in_use(Provider::Cuda, &BTreeMap::new()),
            Provider::Cuda
        );
    }

    #[test]
    fn profiles_are_counted_per_node_and_removed() {
        let path =
            std::env::temp_dir().join(format!("radflow-profile-test-{}.json", std::process::id()));
        let events = serde_json::json!([
            {"cat": "Session", "name": "model_run", "args": {}},
            {"cat": "Node", "name": "conv_1_kernel_time", "args": {"provider": "CUDAExecutionProvider"}},
            {"cat": "Node", "name": "conv_1_fence_before", "args": {}},
            {"cat": "Node", "name": "conv_2_kernel_time", "args": {"provider": "CUDAExecutionProvider"}},
            {"cat": "Node", "name": "shape_kernel_time", "args": {"provider": "CPUExecutionProvider"}},
            {"cat": "Node", "name": "conv_1_kernel_time", "args": {"provider": "CUDAExecutionProvider"}}
        ]);
        std::fs::write(&path, events.to_string()).unwrap();
        let counts = read_profile(&path).unwrap();
        assert_eq!(counts["CUDAExecutionProvider"], 2);
        assert_eq!(counts["CPUExecutionProvider"], 1);
        assert!(!path.exists());
        assert!(read_profile(&path).is_err());
    }
}
