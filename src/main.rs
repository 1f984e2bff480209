//! The `radflow` binary: parses flags, opens resources, calls the components' `run`.
//!
//! Nothing here decides anything about DICOM, volumes or models; it only wires. See
//! `ARCHITECTURE.md` for the code map.
//!
//! The components are cargo features (`listener`, `preprocessor`, `inferer`, all on by
//! default): a component's image builds only its own, and leaves out the subcommands
//! of the others.
#![cfg_attr(
    not(all(feature = "listener", feature = "preprocessor", feature = "inferer")),
    allow(dead_code, unused_imports)
)]

mod bootstrap;
mod cli;
#[cfg(feature = "inferer")]
mod export;
mod ops;
mod progress;
#[cfg(all(
    test,
    feature = "listener",
    feature = "preprocessor",
    feature = "inferer"
))]
mod reference;
#[cfg(all(feature = "listener", feature = "preprocessor"))]
mod score;
mod tools;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args as _, FromArgMatches, Parser};
#[cfg(feature = "inferer")]
use radflow_inferer::registry::{ModelHub, RegistryWatch};
#[cfg(feature = "inferer")]
use radflow_inferer::worker::Inferer;
#[cfg(feature = "listener")]
use radflow_listener::assembly::AssemblyConfig;
#[cfg(feature = "listener")]
use radflow_listener::ingest::AdmissionConfig;
#[cfg(feature = "listener")]
use radflow_listener::scp::ScpConfig;
#[cfg(feature = "listener")]
use radflow_listener::service::{self, Listener, ListenerDeps};
#[cfg(feature = "preprocessor")]
use radflow_preprocessor::worker::Preprocessor;
use radflow_shared::bus::ConsumerSpec;
use radflow_shared::events::Lane;
use radflow_shared::metrics::Metrics;
use radflow_shared::models::Registry;
use radflow_shared::worker::WorkerConfig;
use tokio::net::TcpListener;

use bootstrap::{BusMode, Node};
#[cfg(feature = "inferer")]
use cli::InfererArgs;
#[cfg(all(feature = "listener", feature = "preprocessor", feature = "inferer"))]
use cli::RunArgs;
use cli::{Cli, Command, ListenerArgs, WorkerArgs};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            #[cfg(all(feature = "listener", feature = "preprocessor", feature = "inferer"))]
            None => {
                let matches =
                    RunArgs::augment_args(clap::Command::new("run")).get_matches_from(["radflow"]);
                run_embedded(RunArgs::from_arg_matches(&matches)?).await
            }
            #[cfg(not(all(feature = "listener", feature = "preprocessor", feature = "inferer")))]
            None => Err(anyhow::anyhow!(
                "this build has only some components; name one (see --help)"
            )),
            #[cfg(all(feature = "listener", feature = "preprocessor", feature = "inferer"))]
            Some(Command::Run(args)) => run_embedded(*args).await,
            #[cfg(feature = "listener")]
            Some(Command::Listener(args)) => run_listener(args).await,
            #[cfg(feature = "preprocessor")]
            Some(Command::Preprocessor(args)) => run_preprocessor(args).await,
            #[cfg(feature = "inferer")]
            Some(Command::Inferer(args)) => run_inferer(args).await,
            #[cfg(feature = "exporter")]
            Some(Command::Exporter(args)) => run_exporter(args).await,
            #[cfg(feature = "preprocessor")]
            Some(Command::Synth(args)) => tools::synth(args),
            #[cfg(feature = "listener")]
            Some(Command::Send(args)) => tools::send(args).await,
            #[cfg(feature = "preprocessor")]
            Some(Command::Volume(args)) => tools::volume(args),
            Some(Command::Status(args)) => ops::status(args).await,
            Some(Command::Dlq(args)) => ops::dlq(args).await,
            #[cfg(all(feature = "listener", feature = "preprocessor"))]
            Some(Command::Score(args)) => score::score(args).await,
            #[cfg(feature = "inferer")]
            Some(Command::ExportDataset(args)) => export::export_dataset(args).await,
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

/// A durable consumer's name in each lane: `name-stat`, `name`, `name-batch`.
fn with_lanes(name: &str) -> Vec<String> {
    [Lane::Stat, Lane::Routine, Lane::Batch]
        .iter()
        .map(|lane| format!("{name}{}", lane.durable_suffix()))
        .collect()
}

#[cfg(feature = "inferer")]
/// The inferer's consumers: one per model name and lane.
fn inferer_consumers(registry: &Registry) -> Vec<String> {
    let names: std::collections::BTreeSet<&str> =
        registry.models.iter().map(|m| m.name.as_str()).collect();
    names
        .into_iter()
        .flat_map(|name| with_lanes(&format!("inferer-{name}")))
        .collect()
}

#[cfg(feature = "listener")]
fn scp_config(args: &ListenerArgs) -> Result<ScpConfig> {
    let allowed_callers = args
        .allowed_callers
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.parse())
        .collect::<Result<Vec<_>, _>>()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(radflow_listener::tls::server_config(
            &radflow_listener::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            },
        )?),
        _ => None,
    };
    Ok(ScpConfig {
        ae_titles: args.ae_title.iter().map(|s| s.trim().to_owned()).collect(),
        allowed_callers,
        private_sop_classes: args
            .private_sop_classes
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        transfer_syntaxes: transfer_syntaxes(args)?,
        max_pdu: args.max_pdu,
        max_associations: args.max_associations,
        max_instance_bytes: args.max_instance_bytes,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        artim_timeout: Duration::from_secs(args.artim_timeout_secs.max(1)),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        stream_threshold: args.stream_threshold.max(8 << 20),
        tls,
        ..ScpConfig::default()
    })
}

#[cfg(feature = "listener")]
/// The listener's transfer syntaxes; a syntax the preprocessor cannot decode is
/// accepted and stored as received, with a warning, since its series will be refused
/// (or skipped, when its objects are not cross-sectional images).
fn transfer_syntaxes(args: &ListenerArgs) -> Result<Vec<String>> {
    let list = radflow_listener::sop_classes::transfer_syntaxes_from(&args.transfer_syntaxes)
        .map_err(|e| anyhow::anyhow!("--transfer-syntaxes: {e}"))?;
    for uid in &list {
        if !radflow_preprocessor::decode::decodes_transfer_syntax(uid) {
            tracing::warn!(
                transfer_syntax = %uid,
                "accepted transfer syntax that the preprocessor does not decode: instances \
                 are stored as received, image series in it will be refused"
            );
        }
    }
    Ok(list)
}

#[cfg(feature = "listener")]
fn admission_config(args: &ListenerArgs) -> AdmissionConfig {
    AdmissionConfig {
        max_series_backlog: args.max_series_backlog,
        ..AdmissionConfig::default()
    }
}

#[cfg(feature = "listener")]
fn assembly_config(args: &ListenerArgs) -> AssemblyConfig {
    AssemblyConfig {
        quiet: args.quiet(),
        short_quiet: args.release_quiet(),
        stat_calling_aes: args.stat_calling_ae.clone(),
        ..AssemblyConfig::default()
    }
}

#[cfg(any(feature = "preprocessor", feature = "inferer", feature = "exporter"))]
fn worker_config(consumer: ConsumerSpec, args: &WorkerArgs) -> WorkerConfig {
    let mut config = WorkerConfig::new(consumer);
    config.concurrency = args.concurrency.max(1);
    config.consumer.max_deliver = args.max_deliver.max(1);
    config.consumer.ack_wait = Duration::from_secs(args.ack_wait_secs.max(1));
    config
}

#[cfg(feature = "preprocessor")]
/// The preprocessor's worker: the routine consumer with its stat and batch lanes.
fn preprocessor_config(args: &WorkerArgs) -> WorkerConfig {
    worker_config(radflow_preprocessor::worker::consumer(), args).with_lanes()
}

fn load_registry(models: &radflow_shared::config::ModelsArgs) -> Result<Arc<Registry>> {
    Ok(Arc::new(Registry::load_or_builtin(
        models.models.as_deref(),
    )?))
}

#[cfg(feature = "listener")]
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

#[cfg(feature = "inferer")]
/// Loads the ONNX Runtime library and the models (blocking work, off the runtime).
async fn load_models(
    registry: Arc<Registry>,
    args: &InfererArgs,
    metrics: Arc<Metrics>,
) -> Result<Arc<ModelHub>> {
    let info = radflow_inferer::runtime::init(args.ort_lib.as_deref())?;
    tracing::info!(library = %info.library.display(), version = %info.version, "ONNX Runtime loaded");
    let exec = args.execution();
    let hub = tokio::task::spawn_blocking(move || {
        ModelHub::load(Registry::clone(&registry), exec, metrics)
    })
    .await?;
    let set = hub.current();
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
    Ok(Arc::new(hub))
}

#[cfg(feature = "inferer")]
/// The watch of `--models` for changes, unless reloading is off or the registry is
/// the built-in one.
fn registry_watch(
    models: &radflow_shared::config::ModelsArgs,
    args: &InfererArgs,
) -> Option<RegistryWatch> {
    let path = models.models.clone()?;
    args.reload_interval()
        .map(|interval| RegistryWatch::new(path, interval))
}

#[cfg(all(feature = "listener", feature = "preprocessor", feature = "inferer"))]
/// `radflow run`: every component in this process.
async fn run_embedded(args: RunArgs) -> Result<()> {
    let mut node = Node::start(
        "radflow",
        &args.telemetry,
        &args.store,
        &args.bus,
        BusMode::NatsOrInProcess,
    )
    .await?;
    let registry = load_registry(&args.models)?;
    let inferer_ready = node.health.component("inferer");
    // Instances acknowledged before a crash are back in the store before it is read.
    let listener = listener_stage(&node, &args.listener).await?;
    let stow = dicomweb_routes(&listener, &args.listener, true)?;
    node.serve_http(&args.http, stow).await?;
    node.health.enable_admin(args.http.admin_token()?);
    let mut consumers = vec!["assembler".to_owned()];
    consumers.extend(with_lanes("preprocessor"));
    consumers.extend(inferer_consumers(&registry));
    #[cfg(feature = "exporter")]
    let exporter = load_destinations(&args.export)?;
    #[cfg(feature = "exporter")]
    if exporter.is_some() {
        consumers.extend(radflow_exporter::consumers());
    }
    node.report_lag(consumers);

    let models = load_models(registry.clone(), &args.inferer, node.metrics.clone()).await?;
    let dicom = bind_dicom(&args.listener).await?;
    let (store, bus, metrics, shutdown) = (
        node.store.clone(),
        node.bus.clone(),
        node.metrics.clone(),
        node.shutdown.clone(),
    );

    // The in-process bus forgets everything on exit: series in the store without a
    // result are assembled again.
    let references: Vec<String> = registry.models.iter().map(|m| m.reference()).collect();
    let requeued = service::recover_unfinished(&*bus, &store, &references).await?;
    if requeued > 0 {
        tracing::info!(series = requeued, "re-queued series without results");
    }

    tracing::info!(
        dicom = %dicom.local_addr()?,
        ae_titles = ?args.listener.ae_title,
        store = %store.url(),
        bus = bus.kind(),
        "radflow running: send DICOM to this port (e.g. `radflow send <folder>`)"
    );
    let listener = tokio::spawn(listener.run(dicom, shutdown.clone()));
    let pre = Arc::new(Preprocessor {
        store: store.clone(),
        bus: bus.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        geometry: tools::geometry_options(&args.geometry),
        volume_gzip_level: radflow_preprocessor::worker::volume_gzip_level(
            &store,
            args.volumes.volume_gzip_level,
        ),
    });
    let preprocessing = tokio::spawn(radflow_preprocessor::worker::run(
        pre,
        preprocessor_config(&args.worker),
        shutdown.clone(),
    ));
    let inferer = Arc::new(Inferer {
        store,
        bus,
        models,
        metrics,
    });
    let inferring = tokio::spawn(radflow_inferer::worker::run(
        inferer,
        worker_config(radflow_inferer::worker::consumer("all"), &args.worker),
        registry_watch(&args.models, &args.inferer),
        inferer_ready,
        shutdown,
    ));
    #[cfg(feature = "exporter")]
    let exporting = match &exporter {
        Some(destinations) => {
            let exporter = radflow_exporter::Exporter {
                store: node.store.clone(),
                bus: node.bus.clone(),
                destinations: destinations.clone(),
                metrics: node.metrics.clone(),
            };
            Some(tokio::spawn(radflow_exporter::run(
                exporter,
                worker_config(radflow_exporter::sender::consumer(), &args.worker),
                node.shutdown.clone(),
            )))
        }
        None => None,
    };
    let listener_result = listener.await?;
    let _ = tokio::join!(preprocessing, inferring);
    #[cfg(feature = "exporter")]
    if let Some(exporting) = exporting {
        let _ = exporting.await;
    }
    node.finish().await;
    listener_result
}

#[cfg(feature = "listener")]
/// The listener stage on the node's store, bus, metrics and health, once its journal
/// (if any) has been replayed into the store.
async fn listener_stage(node: &Node, args: &ListenerArgs) -> Result<Listener> {
    let journal = service::open_journal(&node.store, args.store_journal).await?;
    Ok(Listener::new(ListenerDeps {
        scp: scp_config(args)?,
        assembly: assembly_config(args),
        admission: admission_config(args),
        store: node.store.clone(),
        journal,
        bus: node.bus.clone(),
        metrics: node.metrics.clone(),
        health: Some(node.health.clone()),
    }))
}

#[cfg(feature = "listener")]
/// The STOW-RS routes of `listener` when they are on (`default`: on unless turned off).
fn dicomweb_routes(
    listener: &Listener,
    args: &ListenerArgs,
    default: bool,
) -> Result<Option<radflow_shared::http::Routes>> {
    if !args.dicomweb_enabled(default) {
        return Ok(None);
    }
    let token = args.dicomweb_token()?;
    if token.is_none() {
        tracing::warn!("DICOMweb STOW-RS takes requests without a token (--dicomweb-token-file)");
    }
    tracing::info!("DICOMweb STOW-RS on the HTTP port at /dicomweb/studies");
    Ok(Some(listener.dicomweb(token)))
}

#[cfg(feature = "listener")]
/// `radflow listener`
async fn run_listener(args: cli::ListenerCmd) -> Result<()> {
    let mut node = Node::start(
        "radflow-listener",
        &args.telemetry,
        &args.store,
        &args.bus,
        BusMode::Nats,
    )
    .await?;
    let listener = listener_stage(&node, &args.listener).await?;
    let stow = dicomweb_routes(&listener, &args.listener, false)?;
    node.serve_http(&args.http, stow).await?;
    node.report_lag(vec!["assembler".into()]);
    let dicom = bind_dicom(&args.listener).await?;
    tracing::info!(dicom = %dicom.local_addr()?, store = %node.store.url(), "listener running");
    let result = listener.run(dicom, node.shutdown.clone()).await;
    node.finish().await;
    result
}

#[cfg(feature = "preprocessor")]
/// `radflow preprocessor`
async fn run_preprocessor(args: cli::PreprocessorCmd) -> Result<()> {
    let mut node = Node::start(
        "radflow-preprocessor",
        &args.telemetry,
        &args.store,
        &args.bus,
        BusMode::Nats,
    )
    .await?;
    let registry = load_registry(&args.models)?;
    node.serve_http(&args.http, None).await?;
    node.report_lag(with_lanes("preprocessor"));
    node.exit_when_idle(args.worker.exit_when_idle());
    let pre = Arc::new(Preprocessor {
        store: node.store.clone(),
        bus: node.bus.clone(),
        registry,
        metrics: node.metrics.clone(),
        geometry: tools::geometry_options(&args.geometry),
        volume_gzip_level: radflow_preprocessor::worker::volume_gzip_level(
            &node.store,
            args.volumes.volume_gzip_level,
        ),
    });
    radflow_preprocessor::worker::run(
        pre,
        preprocessor_config(&args.worker),
        node.shutdown.clone(),
    )
    .await;
    node.finish().await;
    Ok(())
}

#[cfg(feature = "exporter")]
/// The destinations file, if one is configured.
fn load_destinations(
    args: &cli::ExportArgs,
) -> Result<Option<Arc<radflow_exporter::Destinations>>> {
    args.destinations
        .as_deref()
        .map(|path| Ok(Arc::new(radflow_exporter::Destinations::load(path)?)))
        .transpose()
}

#[cfg(feature = "exporter")]
/// `radflow exporter`
async fn run_exporter(args: cli::ExporterCmd) -> Result<()> {
    let Some(destinations) = load_destinations(&args.export)? else {
        anyhow::bail!("the exporter needs --destinations (RADFLOW_DESTINATIONS): where results go");
    };
    let mut node = Node::start(
        "radflow-exporter",
        &args.telemetry,
        &args.store,
        &args.bus,
        BusMode::Nats,
    )
    .await?;
    node.serve_http(&args.http, None).await?;
    node.report_lag(radflow_exporter::consumers());
    node.exit_when_idle(args.worker.exit_when_idle());
    tracing::info!(
        destinations = ?destinations.destinations.iter().map(|d| &d.name).collect::<Vec<_>>(),
        "exporter running"
    );
    let exporter = radflow_exporter::Exporter {
        store: node.store.clone(),
        bus: node.bus.clone(),
        destinations,
        metrics: node.metrics.clone(),
    };
    radflow_exporter::run(
        exporter,
        worker_config(radflow_exporter::sender::consumer(), &args.worker),
        node.shutdown.clone(),
    )
    .await;
    node.finish().await;
    Ok(())
}

#[cfg(feature = "inferer")]
/// `radflow inferer`
async fn run_inferer(args: cli::InfererCmd) -> Result<()> {
    let mut node = Node::start(
        "radflow-inferer",
        &args.telemetry,
        &args.store,
        &args.bus,
        BusMode::Nats,
    )
    .await?;
    let registry = load_registry(&args.models)?;
    let ready = node.health.component("models");
    node.serve_http(&args.http, None).await?;
    node.report_lag(inferer_consumers(&registry));
    let models = load_models(registry.clone(), &args.inferer, node.metrics.clone()).await?;
    node.exit_when_idle(args.worker.exit_when_idle());
    let inferer = Arc::new(Inferer {
        store: node.store.clone(),
        bus: node.bus.clone(),
        models,
        metrics: node.metrics.clone(),
    });
    radflow_inferer::worker::run(
        inferer,
        worker_config(radflow_inferer::worker::consumer("all"), &args.worker),
        registry_watch(&args.models, &args.inferer),
        ready,
        node.shutdown.clone(),
    )
    .await;
    node.finish().await;
    Ok(())
}
