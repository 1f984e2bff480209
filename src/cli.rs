//! Command-line arguments. Every flag also reads `RADFLOW_<FLAG>`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
#[cfg(feature = "inferer")]
use radflow_inferer::session::{
    ArenaExtend, ConvAlgoSearch, CudaOptions, ExecutionConfig, ProviderRequest, TensorRtOptions,
};
use radflow_shared::config::{BusArgs, HttpArgs, ModelsArgs, StoreArgs, TelemetryArgs};

/// radflow: DICOM in, model-ready volumes and ONNX inference out.
///
/// Without a subcommand, `radflow` runs the whole pipeline in one process (`run`).
#[derive(Debug, Parser)]
#[command(name = "radflow", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// All components in one process: DICOM listener, preprocessor, inferer.
    #[cfg(all(feature = "listener", feature = "preprocessor", feature = "inferer"))]
    Run(Box<RunArgs>),
    /// The DICOM listener alone (needs NATS).
    #[cfg(feature = "listener")]
    Listener(ListenerCmd),
    /// The preprocessor alone (needs NATS).
    #[cfg(feature = "preprocessor")]
    Preprocessor(PreprocessorCmd),
    /// The inferer alone (needs NATS).
    #[cfg(feature = "inferer")]
    Inferer(InfererCmd),
    /// The exporter alone (needs NATS): results' SEG and SR to DICOM destinations.
    #[cfg(feature = "exporter")]
    Exporter(ExporterCmd),
    /// Write a synthetic CT study (a phantom of known tissue volumes) as DICOM files.
    #[cfg(feature = "preprocessor")]
    Synth(SynthArgs),
    /// Send DICOM files to a DICOM node (C-ECHO, then C-STORE).
    #[cfg(feature = "listener")]
    Send(SendArgs),
    /// Convert a folder of DICOM files of one series to NIfTI.
    #[cfg(feature = "preprocessor")]
    Volume(VolumeArgs),
    /// Queues, series being assembled, recent results and failures.
    Status(StatusArgs),
    /// Dead letters: list them, or replay them once the cause is fixed.
    Dlq(DlqArgs),
    /// Score stored series (or a folder) with a model, in the batch lane, with a report.
    #[cfg(all(feature = "listener", feature = "preprocessor"))]
    Score(ScoreArgs),
    /// Export image and label pairs of a model version's results, for retraining.
    #[cfg(feature = "inferer")]
    ExportDataset(crate::export::ExportArgs),
}

/// `radflow score`
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// The model, `name` or `name@version`.
    #[arg(long, env = "RADFLOW_SCORE_MODEL")]
    pub model: String,
    /// Only series whose `<StudyUID>/<SeriesUID>` starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only series of this modality (e.g. CT).
    #[arg(long)]
    pub modality: Option<String>,
    /// Only series of this Body Part Examined.
    #[arg(long)]
    pub body_part: Option<String>,
    /// Only studies from this date on (YYYY-MM-DD or YYYYMMDD).
    #[arg(long)]
    pub since: Option<String>,
    /// Only studies up to this date.
    #[arg(long)]
    pub until: Option<String>,
    /// A file with one Series (or Study) Instance UID per line.
    #[arg(long)]
    pub uids: Option<PathBuf>,
    /// Upload the DICOM files of this folder into the store first and score them.
    #[arg(long)]
    pub folder: Option<PathBuf>,
    /// Scoring requests in flight at once.
    #[arg(long, env = "RADFLOW_SCORE_MAX_IN_FLIGHT", default_value_t = 16)]
    pub max_in_flight: usize,
    /// Follow the results to the end before writing the report.
    #[arg(long)]
    pub wait: bool,
    /// Stop waiting after this many seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Score even series that already have a result for this model version.
    #[arg(long)]
    pub force: bool,
    /// Report path without extension: `<report>.csv` and `<report>.jsonl`.
    #[arg(long, default_value = "radflow-score-report")]
    pub report: PathBuf,
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub models: ModelsArgs,
}

/// Where `status` and `dlq` read from: NATS directly, or a running embedded radflow.
#[derive(Debug, Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// HTTP address of a running radflow, the way to inspect the embedded mode. Without
    /// it and without --nats-url: the local `radflow run`, http://127.0.0.1:8080.
    #[arg(long, env = "RADFLOW_URL")]
    pub url: Option<String>,
}

/// `radflow status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// NATS monitoring endpoint (e.g. http://nats:8222) for server figures (/varz, /jsz).
    #[arg(long, env = "RADFLOW_NATS_MONITOR_URL")]
    pub nats_monitor_url: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this many seconds until interrupted.
    #[arg(long)]
    pub watch: Option<f64>,
    /// How many recent results and failures to show.
    #[arg(long, default_value_t = 10)]
    pub recent: usize,
}

/// `radflow dlq`
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Every dead letter: stage, reason, series, attempts, when.
    List {
        #[command(flatten)]
        source: SourceArgs,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on their original subject and remove them from the DLQ.
    Replay {
        #[command(flatten)]
        source: SourceArgs,
        /// The dead letter's sequence number (from `dlq list`).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        seq: Option<u64>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
        /// The admin token of the radflow at --url (its --admin-token), sent as a
        /// bearer token; not needed with --nats-url.
        #[arg(long, env = "RADFLOW_ADMIN_TOKEN")]
        admin_token: Option<radflow_shared::secret::Secret>,
    },
}

/// `radflow run`
#[cfg(all(feature = "listener", feature = "preprocessor", feature = "inferer"))]
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub models: ModelsArgs,
    #[command(flatten)]
    pub listener: ListenerArgs,
    #[command(flatten)]
    pub inferer: InfererArgs,
    #[command(flatten)]
    pub geometry: GeometryArgs,
    #[command(flatten)]
    pub volumes: VolumeWriteArgs,
    #[command(flatten)]
    pub export: ExportArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// `radflow exporter`
#[derive(Debug, Args)]
pub struct ExporterCmd {
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub export: ExportArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// Where results are exported to.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Destinations file (destinations.toml): the DICOM nodes results are sent to
    /// and the routes that choose them (see docs/results.md). Without it, results
    /// stay in the store.
    #[arg(long, env = "RADFLOW_DESTINATIONS")]
    pub destinations: Option<PathBuf>,
}

/// `radflow listener`
#[derive(Debug, Args)]
pub struct ListenerCmd {
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub listener: ListenerArgs,
}

/// `radflow preprocessor`
#[derive(Debug, Args)]
pub struct PreprocessorCmd {
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub models: ModelsArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub geometry: GeometryArgs,
    #[command(flatten)]
    pub volumes: VolumeWriteArgs,
}

/// `radflow inferer`
#[cfg(feature = "inferer")]
#[derive(Debug, Args)]
pub struct InfererCmd {
    #[command(flatten)]
    pub bus: BusArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub models: ModelsArgs,
    #[command(flatten)]
    pub inferer: InfererArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// The DICOM listener's settings.
#[derive(Debug, Clone, Args)]
pub struct ListenerArgs {
    /// DICOM port.
    #[arg(long, env = "RADFLOW_DICOM_PORT", default_value_t = 11112)]
    pub dicom_port: u16,
    /// Address the DICOM port binds to.
    #[arg(long, env = "RADFLOW_DICOM_ADDR", default_value = "0.0.0.0")]
    pub dicom_addr: String,
    /// Called AE titles this node answers to (comma-separated).
    #[arg(
        long,
        env = "RADFLOW_AE_TITLE",
        default_value = "RADFLOW",
        value_delimiter = ','
    )]
    pub ae_title: Vec<String>,
    /// Seconds without a new instance after which a series is ready.
    #[arg(long, env = "RADFLOW_SERIES_QUIET_SECS", default_value_t = 10.0)]
    pub series_quiet_secs: f64,
    /// Calling AE titles whose series go to the stat lane, ahead of routine work
    /// (comma-separated; e.g. the emergency department's CT).
    #[arg(long, env = "RADFLOW_STAT_CALLING_AE", value_delimiter = ',')]
    pub stat_calling_ae: Vec<String>,
    /// Seconds after the sending association's release (or the announced instance
    /// count) after which a series is ready, if shorter than the quiet period.
    #[arg(long, env = "RADFLOW_SERIES_RELEASE_QUIET_SECS", default_value_t = 2.0)]
    pub series_release_quiet_secs: f64,
    /// Concurrent DICOM associations; more are rejected with a transient reason.
    #[arg(long, env = "RADFLOW_MAX_ASSOCIATIONS", default_value_t = 64)]
    pub max_associations: usize,
    /// Maximum PDU length advertised and accepted, in bytes.
    #[arg(long, env = "RADFLOW_MAX_PDU", default_value_t = 262_144)]
    pub max_pdu: u32,
    /// Largest instance accepted, in bytes.
    #[arg(long, env = "RADFLOW_MAX_INSTANCE_BYTES", default_value_t = 4 << 30)]
    pub max_instance_bytes: u64,
    /// Seconds an association may stay silent before it is aborted.
    #[arg(long, env = "RADFLOW_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Seconds allowed for the association request (and TLS handshake) to arrive, and
    /// for the peer to close after a release or rejection (the ARTIM timer).
    #[arg(long, env = "RADFLOW_ARTIM_TIMEOUT_SECS", default_value_t = 30)]
    pub artim_timeout_secs: u64,
    /// Who may send (comma-separated): `AE`, `AE@10.1.0.0/16` or `@10.1.2.3`; empty
    /// lets anyone in. C-ECHO is subject to the same check.
    #[arg(long, env = "RADFLOW_ALLOWED_CALLERS", value_delimiter = ',')]
    pub allowed_callers: Vec<String>,
    /// Private storage SOP class UIDs to accept besides the standard ones
    /// (comma-separated).
    #[arg(long, env = "RADFLOW_PRIVATE_SOP_CLASSES", value_delimiter = ',')]
    pub private_sop_classes: Vec<String>,
    /// Transfer syntaxes to accept (comma-separated): UIDs, `default` (every syntax
    /// the preprocessor decodes) or `lossless` (the lossless ones among them). Default:
    /// `default`.
    #[arg(long, env = "RADFLOW_TRANSFER_SYNTAXES", value_delimiter = ',')]
    pub transfer_syntaxes: Vec<String>,
    /// Instances larger than this many bytes are written to the store in parts as
    /// they arrive instead of being held whole in memory.
    #[arg(long, env = "RADFLOW_STREAM_THRESHOLD", default_value_t = 16 << 20)]
    pub stream_threshold: u64,
    /// Refuse new associations (transiently) while more series than this wait for
    /// the preprocessor; 0 means no limit.
    #[arg(long, env = "RADFLOW_MAX_SERIES_BACKLOG", default_value_t = 0)]
    pub max_series_backlog: u64,
    /// Seconds running associations may continue after SIGTERM.
    #[arg(long, env = "RADFLOW_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
    /// On a flushed folder store, make instances durable through a write-ahead
    /// journal under `<store>/.journal` (a reused region of one segment per instance,
    /// one flush of the segment shared by every instance completed meanwhile, replayed
    /// at start after a crash) instead of flushing each new file and its folder. Pays off on file systems that journal their metadata (ext4's
    /// default, XFS); measure yours with the `durable_write` example.
    #[arg(long, env = "RADFLOW_STORE_JOURNAL", default_value_t = false, action = clap::ArgAction::Set)]
    pub store_journal: bool,
    /// DICOM over TLS: the server certificate chain (PEM). Needs `--tls-key`.
    #[arg(long, env = "RADFLOW_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// DICOM over TLS: the server's private key (PEM).
    #[arg(long, env = "RADFLOW_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// DICOM over TLS: CA certificates (PEM) that client certificates must chain to;
    /// when set, clients without a valid certificate are refused.
    #[arg(long, env = "RADFLOW_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// DICOMweb STOW-RS (POST /dicomweb/studies[/{study}]) on the HTTP port, into the
    /// same ingest and limits as C-STORE. Default: on in `radflow run`, off in
    /// `radflow listener` (set true, or give a token, to turn it on).
    #[arg(long, env = "RADFLOW_DICOMWEB", action = clap::ArgAction::Set)]
    pub dicomweb: Option<bool>,
    /// Token that STOW-RS requires as `Authorization: Bearer <token>`. Prefer the
    /// variable or --dicomweb-token-file; never logged. Without one, STOW-RS takes
    /// requests from anyone who reaches the HTTP port.
    #[arg(long, env = "RADFLOW_DICOMWEB_TOKEN")]
    pub dicomweb_token: Option<radflow_shared::secret::Secret>,
    /// File holding the STOW-RS token (e.g. a mounted Kubernetes Secret).
    #[arg(
        long,
        env = "RADFLOW_DICOMWEB_TOKEN_FILE",
        conflicts_with = "dicomweb_token"
    )]
    pub dicomweb_token_file: Option<PathBuf>,
}

impl ListenerArgs {
    /// Whether STOW-RS is served: `--dicomweb`, else on where `default` says (embedded)
    /// or where a token was given.
    pub fn dicomweb_enabled(&self, default: bool) -> bool {
        self.dicomweb.unwrap_or(
            default || self.dicomweb_token.is_some() || self.dicomweb_token_file.is_some(),
        )
    }

    /// The STOW-RS token, from the flag, the variable or the file (trimmed).
    pub fn dicomweb_token(&self) -> std::io::Result<Option<radflow_shared::secret::Secret>> {
        if let Some(t) = &self.dicomweb_token {
            return Ok(Some(t.clone()));
        }
        match &self.dicomweb_token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("DICOMweb token file {}: {e}", path.display()),
                    )
                })?;
                Ok(Some(radflow_shared::secret::Secret::new(text.trim())))
            }
            None => Ok(None),
        }
    }

    pub fn quiet(&self) -> Duration {
        Duration::from_secs_f64(self.series_quiet_secs.max(0.0))
    }
    pub fn release_quiet(&self) -> Duration {
        Duration::from_secs_f64(self.series_release_quiet_secs.max(0.0))
    }
}

/// The inferer's settings.
#[cfg(feature = "inferer")]
#[derive(Debug, Clone, Args)]
pub struct InfererArgs {
    /// Execution provider: auto (CUDA when present, else CPU), cpu, cuda, tensorrt
    /// (TensorRT, then CUDA, then the CPU).
    #[arg(long, env = "RADFLOW_PROVIDER", default_value = "auto")]
    pub provider: ProviderRequest,
    /// CUDA device ordinal.
    #[arg(long, env = "RADFLOW_CUDA_DEVICE", default_value_t = 0)]
    pub cuda_device: i32,
    /// Cap of the CUDA memory arena in bytes (default: the device's memory).
    #[arg(long, env = "RADFLOW_CUDA_MEMORY_LIMIT")]
    pub cuda_memory_limit: Option<usize>,
    /// How the CUDA memory arena grows: same-as-requested or next-power-of-two.
    #[arg(
        long,
        env = "RADFLOW_CUDA_ARENA_EXTEND",
        default_value = "same-as-requested"
    )]
    pub cuda_arena_extend: ArenaExtend,
    /// cuDNN convolution algorithm search: exhaustive (benchmark once per shape, at
    /// warm-up), heuristic, or default.
    #[arg(
        long,
        env = "RADFLOW_CUDNN_CONV_ALGO_SEARCH",
        default_value = "exhaustive"
    )]
    pub cudnn_conv_algo_search: ConvAlgoSearch,
    /// Let cuDNN's exhaustive search use as much workspace memory as it needs (else
    /// 32 MB).
    #[arg(long, env = "RADFLOW_CUDNN_MAX_WORKSPACE", default_value_t = true, action = clap::ArgAction::Set)]
    pub cudnn_max_workspace: bool,
    /// Copy inputs and outputs on the compute stream (true) or on separate copy
    /// streams (false: overlaps copies with compute; can race on some models).
    #[arg(long, env = "RADFLOW_CUDA_COPY_IN_DEFAULT_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_copy_in_default_stream: bool,
    /// Allow TF32 math for float32 convolutions on Ampere and later GPUs.
    #[arg(long, env = "RADFLOW_CUDA_TF32", default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_tf32: bool,
    /// TensorRT: build float16 engines.
    #[arg(long, env = "RADFLOW_TENSORRT_FP16", default_value_t = false)]
    pub tensorrt_fp16: bool,
    /// TensorRT: folder caching built engines across restarts.
    #[arg(long, env = "RADFLOW_TENSORRT_ENGINE_CACHE")]
    pub tensorrt_engine_cache: Option<PathBuf>,
    /// Fail instead of falling back to the CPU when the GPU provider cannot be used.
    #[arg(long, env = "RADFLOW_REQUIRE_GPU", default_value_t = false)]
    pub require_gpu: bool,
    /// ONNX Runtime intra-op threads (default: one per core).
    #[arg(long, env = "RADFLOW_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    /// ONNX Runtime inter-op threads for running independent nodes in parallel
    /// (default: sequential execution).
    #[arg(long, env = "RADFLOW_INTER_THREADS")]
    pub inter_threads: Option<usize>,
    /// Use ONNX Runtime's CPU memory arena.
    #[arg(long, env = "RADFLOW_CPU_ARENA", default_value_t = true, action = clap::ArgAction::Set)]
    pub cpu_arena: bool,
    /// Let idle ONNX Runtime threads spin between runs (lower latency per run; takes
    /// cores from the blending between runs).
    #[arg(long, env = "RADFLOW_ORT_SPIN_WAIT", default_value_t = false)]
    pub ort_spin_wait: bool,
    /// Seconds between checks of the `--models` file for changes, which are applied
    /// without a restart; 0 turns reloading off.
    #[arg(long, env = "RADFLOW_MODELS_RELOAD_SECS", default_value_t = 10.0)]
    pub models_reload_secs: f64,
    /// Path of libonnxruntime.so (default: found in ./.venv or via python3).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
}

#[cfg(feature = "inferer")]
impl InfererArgs {
    /// How sessions are created.
    pub fn execution(&self) -> ExecutionConfig {
        ExecutionConfig {
            provider: self.provider,
            require_gpu: self.require_gpu,
            cuda: CudaOptions {
                device_id: self.cuda_device,
                memory_limit_bytes: self.cuda_memory_limit,
                arena_extend: self.cuda_arena_extend,
                conv_algo_search: self.cudnn_conv_algo_search,
                conv_max_workspace: self.cudnn_max_workspace,
                copy_in_default_stream: self.cuda_copy_in_default_stream,
                tf32: self.cuda_tf32,
            },
            tensorrt: TensorRtOptions {
                fp16: self.tensorrt_fp16,
                engine_cache: self.tensorrt_engine_cache.clone(),
                max_workspace_bytes: None,
            },
            intra_threads: self.intra_threads,
            inter_threads: self.inter_threads,
            cpu_arena: self.cpu_arena,
            spin_wait: self.ort_spin_wait,
        }
    }

    /// The registry reload interval, if reloading is on.
    pub fn reload_interval(&self) -> Option<Duration> {
        (self.models_reload_secs > 0.0).then(|| Duration::from_secs_f64(self.models_reload_secs))
    }
}

/// Queue-consumer settings.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Messages handled at once by this process.
    #[arg(long, env = "RADFLOW_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,
    /// Deliveries of a failing message before it is dead-lettered.
    #[arg(long, env = "RADFLOW_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: u64,
    /// Seconds a message may be held without a sign of life before the server
    /// redelivers it to another worker (a busy worker extends it as it goes, so this
    /// bounds how long a crashed worker's message waits).
    #[arg(long, env = "RADFLOW_ACK_WAIT_SECS", default_value_t = 120)]
    pub ack_wait_secs: u64,
    /// Exit (status 0) after this many seconds without a message: the workers of a
    /// Kubernetes batch-scoring Job stop once the queue is drained.
    #[arg(long, env = "RADFLOW_EXIT_WHEN_IDLE_SECS")]
    pub exit_when_idle_secs: Option<f64>,
}

impl WorkerArgs {
    pub fn exit_when_idle(&self) -> Option<Duration> {
        self.exit_when_idle_secs
            .map(|s| Duration::from_secs_f64(s.max(0.1)))
    }
}

/// `radflow synth`
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder (created).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Rows and columns.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Number of slices.
    #[arg(long, default_value_t = 120)]
    pub slices: usize,
    /// Slice spacing in mm.
    #[arg(long, default_value_t = 1.25)]
    pub spacing: f64,
    /// Field of view in mm.
    #[arg(long, default_value_t = 360.0)]
    pub fov: f64,
    /// Random file names and instance numbers unrelated to slice order.
    #[arg(long)]
    pub shuffle: bool,
    /// Gantry tilt in degrees.
    #[arg(long, default_value_t = 0.0)]
    pub tilt: f64,
    /// Write implicit VR little endian instead of explicit.
    #[arg(long)]
    pub implicit: bool,
    /// Write one Enhanced CT multi-frame object (per-frame positions and rescale)
    /// instead of one file per slice.
    #[arg(long, env = "RADFLOW_SYNTH_ENHANCED")]
    pub enhanced: bool,
    /// UIDs of the full 64 characters the standard allows, as many scanners write
    /// (store keys then reach their longest, 204 characters).
    #[arg(long)]
    pub long_uids: bool,
    /// Seed of the noise and UIDs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `radflow send`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Files or folders (searched recursively) to send.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Destination `host:port`.
    #[arg(long, env = "RADFLOW_SEND_TO", default_value = "127.0.0.1:11112")]
    pub to: String,
    /// Called AE title.
    #[arg(long, env = "RADFLOW_SEND_CALLED_AE", default_value = "RADFLOW")]
    pub called_ae: String,
    /// Calling AE title.
    #[arg(long, env = "RADFLOW_SEND_CALLING_AE", default_value = "RADFLOW-SEND")]
    pub calling_ae: String,
}

/// `radflow volume`
#[derive(Debug, Args)]
pub struct VolumeArgs {
    /// Folder holding the series' DICOM files.
    pub input: PathBuf,
    /// Output NIfTI file (.nii or .nii.gz).
    #[arg(short, long)]
    pub out: PathBuf,
    /// gzip level (0–9) of a `.nii.gz` output; 0 stores the voxels uncompressed, as
    /// the preprocessor does on a folder store.
    #[arg(long, default_value_t = radflow_volume::nifti::GZIP_LEVEL, value_parser = clap::value_parser!(u32).range(0..=9))]
    pub gzip_level: u32,
    /// Prepare for this model (`name` or `name@version`): resample and normalize as
    /// its preset says. Without it: the native grid, in HU for CT.
    #[arg(long)]
    pub preset: Option<String>,
    #[command(flatten)]
    pub models: ModelsArgs,
    #[command(flatten)]
    pub geometry: GeometryArgs,
}

/// How the preprocessor writes prepared volumes.
#[derive(Debug, Clone, Args)]
pub struct VolumeWriteArgs {
    /// gzip level (0–9) of the prepared `volume.nii.gz` the inferer reads: 0 stores
    /// the voxels uncompressed inside the gzip stream (about 1.6× larger for CT, but
    /// written and read at the speed of a copy), 1 is the fastest compression.
    /// Default: 0 on a folder or memory store, 1 on an object store over a network.
    #[arg(long, env = "RADFLOW_VOLUME_GZIP_LEVEL", value_parser = clap::value_parser!(u32).range(0..=9))]
    pub volume_gzip_level: Option<u32>,
}

/// How strictly a series must form one regular stack of slices.
#[derive(Debug, Clone, Args)]
pub struct GeometryArgs {
    /// Fewest distinct slice positions that make a volume.
    #[arg(long, env = "RADFLOW_MIN_SLICES", default_value_t = 3)]
    pub min_slices: usize,
    /// Slice gaps within this fraction of the regular spacing count as regular.
    #[arg(long, env = "RADFLOW_SPACING_TOLERANCE", default_value_t = 0.1)]
    pub spacing_tolerance: f64,
    /// Uneven slice spacing (missing slices included): `interpolate` planes at the
    /// regular spacing from the true positions, or `reject` the series.
    #[arg(
        long,
        env = "RADFLOW_UNEVEN_SPACING",
        default_value = "interpolate",
        value_parser = ["interpolate", "reject"]
    )]
    pub uneven_spacing: String,
    /// Widest gap, in regular spacings, that interpolation may bridge.
    #[arg(long, env = "RADFLOW_MAX_GAP_RATIO", default_value_t = 5.0)]
    pub max_gap_ratio: f64,
}
