//! Command-line arguments. Every flag also reads `RADFLOW_<FLAG>`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
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
    Run(RunArgs),
    /// The DICOM listener alone (needs NATS).
    Listener(ListenerCmd),
    /// The preprocessor alone (needs NATS).
    Preprocessor(PreprocessorCmd),
    /// The inferer alone (needs NATS).
    Inferer(InfererCmd),
    /// Write a synthetic CT study (a phantom of known tissue volumes) as DICOM files.
    Synth(SynthArgs),
    /// Send DICOM files to a DICOM node (C-ECHO, then C-STORE).
    Send(SendArgs),
    /// Convert a folder of DICOM files of one series to NIfTI.
    Volume(VolumeArgs),
}

/// `radflow run`
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
    pub worker: WorkerArgs,
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
}

/// `radflow inferer`
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
}

impl ListenerArgs {
    pub fn quiet(&self) -> Duration {
        Duration::from_secs_f64(self.series_quiet_secs.max(0.0))
    }
    pub fn release_quiet(&self) -> Duration {
        Duration::from_secs_f64(self.series_release_quiet_secs.max(0.0))
    }
}

/// The inferer's settings.
#[derive(Debug, Clone, Args)]
pub struct InfererArgs {
    /// Execution provider: auto (CUDA when present, else CPU), cpu, cuda.
    #[arg(long, env = "RADFLOW_PROVIDER", default_value = "auto")]
    pub provider: String,
    /// CUDA device ordinal.
    #[arg(long, env = "RADFLOW_CUDA_DEVICE", default_value_t = 0)]
    pub cuda_device: i32,
    /// Cap of the CUDA memory arena in bytes.
    #[arg(long, env = "RADFLOW_CUDA_MEMORY_LIMIT")]
    pub cuda_memory_limit: Option<usize>,
    /// Fail instead of falling back to the CPU when CUDA cannot be used.
    #[arg(long, env = "RADFLOW_REQUIRE_GPU", default_value_t = false)]
    pub require_gpu: bool,
    /// ONNX Runtime intra-op threads (default: one per core).
    #[arg(long, env = "RADFLOW_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    /// Path of libonnxruntime.so (default: found in ./.venv or via python3).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
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
    /// Prepare for this model (`name` or `name@version`): resample and normalize as
    /// its preset says. Without it: the native grid, in HU for CT.
    #[arg(long)]
    pub preset: Option<String>,
    #[command(flatten)]
    pub models: ModelsArgs,
}
