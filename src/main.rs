//! The `radflow` binary: parses flags, opens resources, calls the components' `run`.
//!
//! Nothing here decides anything about DICOM, volumes or models; it only wires. See
//! `ARCHITECTURE.md` for the code map.

mod cli;
mod tools;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args as _, FromArgMatches, Parser};
use radflow_inferer::session::{ExecutionConfig, ProviderRequest};
use radflow_inferer::worker::{Inferer, ModelSet};
use radflow_listener::assembly::AssemblyConfig;
use radflow_listener::scp::ScpConfig;
use radflow_listener::service::{self, ListenerDeps};
use radflow_preprocessor::geometry::GeometryOptions;
use radflow_preprocessor::worker::Preprocessor;
use radflow_shared::bus::{Bus, ConsumerSpec};
use radflow_shared::config::{HttpArgs, TelemetryArgs};
use radflow_shared::http::Health;
use radflow_shared::metrics::Metrics;
use radflow_shared::models::Registry;
use radflow_shared::store::Store;
use radflow_shared::worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command, InfererArgs, ListenerArgs, RunArgs, WorkerArgs};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            None => {
                let matches =
                    RunArgs::augment_args(clap::Command::new("run")).get_matches_from(["radflow"]);
                run_embedded(RunArgs::from_arg_matches(&matches)?).await
            }
            Some(Command::Run(args)) => run_embedded(args).await,
            Some(Command::Listener(args)) => run_listener(args).await,
            Some(Command::Preprocessor(args)) => run_preprocessor(args).await,
            Some(Command::Inferer(args)) => run_inferer(args).await,
            Some(Command::Synth(args)) => tools::synth(args),
            Some(Command::Send(args)) => tools::send(args).await,
            Some(Command::Volume(args)) => tools::volume(args),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("radflow: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logs(t: &TelemetryArgs) {
    radflow_shared::telemetry::init(t.log_format, &t.log);
}

async fn start_http(
    args: &HttpArgs,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind((args.http_addr.as_str(), args.http_port))
        .await
        .with_context(|| {
            format!(
                "cannot open HTTP port {}:{}",
                args.http_addr, args.http_port
            )
        })?;
    tracing::info!(addr = %listener.local_addr()?, "health and metrics on HTTP");
    let shutdown = shutdown.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = radflow_shared::http::serve(listener, health, metrics, shutdown).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }))
}

/// Turns `/readyz` false as soon as shutdown is requested, before anything stops.
fn drain_on_shutdown(
    health: &Arc<Health>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (health, shutdown) = (health.clone(), shutdown.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        health.set_draining();
    })
}

fn scp_config(args: &ListenerArgs) -> ScpConfig {
    ScpConfig {
        ae_titles: args.ae_title.iter().map(|s| s.trim().to_owned()).collect(),
        max_pdu: args.max_pdu,
        max_associations: args.max_associations,
        max_instance_bytes: args.max_instance_bytes,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        ..ScpConfig::default()
    }
}

fn assembly_config(args: &ListenerArgs) -> AssemblyConfig {
    AssemblyConfig {
        quiet: args.quiet(),
        short_quiet: args.release_quiet(),
        ..AssemblyConfig::default()
    }
}

fn exec_config(args: &InfererArgs) -> Result<ExecutionConfig> {
    let provider = match args.provider.to_ascii_lowercase().as_str() {
        "auto" => ProviderRequest::Auto,
        "cpu" => ProviderRequest::Cpu,
        "cuda" | "gpu" => ProviderRequest::Cuda {
            device_id: args.cuda_device,
            memory_limit_bytes: args.cuda_memory_limit,
        },
        other => anyhow::bail!("--provider {other:?}: use auto, cpu or cuda"),
    };
    Ok(ExecutionConfig {
        provider,
        require_gpu: args.require_gpu,
        intra_threads: args.intra_threads,
    })
}

fn worker_config(consumer: ConsumerSpec, args: &WorkerArgs) -> WorkerConfig {
    let mut config = WorkerConfig::new(consumer);
    config.concurrency = args.concurrency.max(1);
    config.consumer.max_deliver = args.max_deliver.max(1);
    config
}

fn load_registry(models: &radflow_shared::config::ModelsArgs) -> Result<Arc<Registry>> {
    Ok(Arc::new(Registry::load_or_builtin(
        models.models.as_deref(),
    )?))
}

async fn bind_dicom(args: &ListenerArgs) -> Result<TcpListener> {
    TcpListener::bind((args.dicom_addr.as_str(), args.dicom_port))
        .await
        .with_context(|| {
            format!(
                "cannot open DICOM port {}:{}",
                args.dicom_addr, args.dicom_port
            )
        })
}

/// Loads the ONNX Runtime library and the models (blocking work, off the runtime).
async fn load_models(
    registry: Arc<Registry>,
    args: &InfererArgs,
    metrics: Arc<Metrics>,
) -> Result<Arc<ModelSet>> {
    let info = radflow_inferer::runtime::init(args.ort_lib.as_deref())?;
    tracing::info!(library = %info.library.display(), version = %info.version, "ONNX Runtime loaded");
    let exec = exec_config(args)?;
    let set =
        tokio::task::spawn_blocking(move || ModelSet::load(&registry, &exec, &metrics)).await?;
    if set.loaded.is_empty() {
        anyhow::bail!(
            "no model could be loaded: {}",
            set.failed
                .iter()
                .map(|(m, e)| format!("{m}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(Arc::new(set))
}

/// `radflow run`: every component in this process.
async fn run_embedded(args: RunArgs) -> Result<()> {
    init_logs(&args.telemetry);
    let shutdown = radflow_shared::shutdown::on_signals();
    let store = args.store.open()?;
    let bus: Arc<dyn Bus> = args.bus.connect_or_inproc("radflow", &shutdown).await?;
    let registry = load_registry(&args.models)?;
    let metrics = Metrics::new();
    let health = Health::new(Some(bus.clone()), Some(store.clone()));
    let inferer_ready = health.component("inferer");
    let http = start_http(&args.http, health.clone(), metrics.clone(), &shutdown).await?;

    let models = load_models(registry.clone(), &args.inferer, metrics.clone()).await?;
    let dicom = bind_dicom(&args.listener).await?;

    // The in-process bus forgets everything on exit: series in the store without a
    // result are assembled again.
    let mut unfinished = Vec::new();
    for (study, series) in store.list_series().await? {
        let mut done = true;
        for m in &registry.models {
            done &= store.has_result(&series, &m.reference()).await?;
        }
        if !done {
            unfinished.push((study, series));
        }
    }
    if !unfinished.is_empty() {
        let n = service::recover(&*bus, &store, &unfinished).await?;
        tracing::info!(series = n, "re-queued series without results");
    }

    tracing::info!(
        dicom = %dicom.local_addr()?,
        ae_titles = ?args.listener.ae_title,
        store = %store.url(),
        bus = bus.kind(),
        "radflow running: send DICOM to this port (e.g. `radflow send <folder>`)"
    );
    let listener = tokio::spawn(service::run(
        dicom,
        ListenerDeps {
            scp: scp_config(&args.listener),
            assembly: assembly_config(&args.listener),
            store: store.clone(),
            bus: bus.clone(),
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    ));
    let pre = Arc::new(Preprocessor {
        store: store.clone(),
        bus: bus.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        geometry: GeometryOptions::default(),
    });
    let preprocessing = tokio::spawn(radflow_preprocessor::worker::run(
        pre,
        worker_config(radflow_preprocessor::worker::consumer(), &args.worker),
        shutdown.clone(),
    ));
    let inferer = Arc::new(Inferer {
        store,
        bus,
        models,
        metrics,
    });
    let inferer_shutdown = shutdown.clone();
    let inferring = tokio::spawn(async move {
        radflow_inferer::worker::run(
            inferer,
            &registry,
            worker_config(radflow_inferer::worker::consumer("all"), &args.worker),
            inferer_ready,
            inferer_shutdown,
        )
        .await
    });
    let draining = drain_on_shutdown(&health, &shutdown);
    let listener_result = listener.await?;
    let _ = tokio::join!(preprocessing, inferring, draining);
    let _ = http.await;
    listener_result
}

/// `radflow listener`
async fn run_listener(args: cli::ListenerCmd) -> Result<()> {
    init_logs(&args.telemetry);
    let shutdown = radflow_shared::shutdown::on_signals();
    let store = args.store.open()?;
    let bus: Arc<dyn Bus> = args.bus.connect_nats("radflow-listener", &shutdown).await?;
    let metrics = Metrics::new();
    let health = Health::new(Some(bus.clone()), Some(store.clone()));
    let http = start_http(&args.http, health.clone(), metrics.clone(), &shutdown).await?;
    let dicom = bind_dicom(&args.listener).await?;
    tracing::info!(dicom = %dicom.local_addr()?, store = %store.url(), "listener running");
    let draining = drain_on_shutdown(&health, &shutdown);
    let result = service::run(
        dicom,
        ListenerDeps {
            scp: scp_config(&args.listener),
            assembly: assembly_config(&args.listener),
            store,
            bus,
            metrics,
        },
        shutdown,
    )
    .await;
    let _ = draining.await;
    let _ = http.await;
    result
}

/// `radflow preprocessor`
async fn run_preprocessor(args: cli::PreprocessorCmd) -> Result<()> {
    init_logs(&args.telemetry);
    let shutdown = radflow_shared::shutdown::on_signals();
    let store = args.store.open()?;
    let bus: Arc<dyn Bus> = args
        .bus
        .connect_nats("radflow-preprocessor", &shutdown)
        .await?;
    let registry = load_registry(&args.models)?;
    let metrics = Metrics::new();
    let health = Health::new(Some(bus.clone()), Some(store.clone()));
    let http = start_http(&args.http, health.clone(), metrics.clone(), &shutdown).await?;
    let pre = Arc::new(Preprocessor {
        store,
        bus,
        registry,
        metrics,
        geometry: GeometryOptions::default(),
    });
    let draining = drain_on_shutdown(&health, &shutdown);
    radflow_preprocessor::worker::run(
        pre,
        worker_config(radflow_preprocessor::worker::consumer(), &args.worker),
        shutdown,
    )
    .await;
    let _ = draining.await;
    let _ = http.await;
    Ok(())
}

/// `radflow inferer`
async fn run_inferer(args: cli::InfererCmd) -> Result<()> {
    init_logs(&args.telemetry);
    let shutdown = radflow_shared::shutdown::on_signals();
    let store: Store = args.store.open()?;
    let bus: Arc<dyn Bus> = args.bus.connect_nats("radflow-inferer", &shutdown).await?;
    let registry = load_registry(&args.models)?;
    let metrics = Metrics::new();
    let health = Health::new(Some(bus.clone()), Some(store.clone()));
    let ready = health.component("models");
    let http = start_http(&args.http, health.clone(), metrics.clone(), &shutdown).await?;
    let models = load_models(registry.clone(), &args.inferer, metrics.clone()).await?;
    let inferer = Arc::new(Inferer {
        store,
        bus,
        models,
        metrics,
    });
    let draining = drain_on_shutdown(&health, &shutdown);
    radflow_inferer::worker::run(
        inferer,
        &registry,
        worker_config(radflow_inferer::worker::consumer("all"), &args.worker),
        ready,
        shutdown,
    )
    .await;
    let _ = draining.await;
    let _ = http.await;
    Ok(())
}
