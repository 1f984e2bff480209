//! The listener stage as a whole: the DICOM server, the assembler that applies stored
//! instances to the series state, and the scanner that declares series ready.
//!
//! `run` takes an already bound socket and opened bus and store, so tests run it on
//! port 0 with the in-process bus and a memory store, and the binary only wires flags.
//!
//! Shutdown order: when `shutdown` is cancelled, readiness turns false first (so load
//! balancers and Kubernetes stop sending new associations here), then the DICOM port
//! stops accepting, running associations finish within the grace period, and the
//! assembler and the ready scanner stop last.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use radflow_shared::bus::{Bus, BusError, ConsumerSpec, INSTANCES, Kv, SERIES_STATE_BUCKET};
use radflow_shared::http::Health;
use radflow_shared::metrics::Metrics;
use radflow_shared::store::Store;
use radflow_shared::util::now_ms;
use radflow_shared::worker::{self, WorkerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::assembly::{
    Assembler, AssemblyConfig, ReadyScanner, SeriesState, correlation_id, instance_digest,
};
use crate::ingest::{AdmissionConfig, Hooks, Ingest, Pressure};
use crate::journal::Journal;
use crate::scp::{self, ScpConfig};

/// On a folder store, instances are written in parts from this many bytes on.
const LOCAL_STREAM_START: u64 = 64 * 1024;

/// Part size on a folder store.
const LOCAL_PART_SIZE: usize = 256 * 1024;

/// What the listener needs.
pub struct ListenerDeps {
    /// The DICOM server's settings.
    pub scp: ScpConfig,
    /// When series are ready.
    pub assembly: AssemblyConfig,
    /// When new associations are refused for back-pressure.
    pub admission: AdmissionConfig,
    /// Where instances go.
    pub store: Store,
    /// The store's write-ahead journal (a flushed folder store), from [`open_journal`].
    pub journal: Option<Arc<Journal>>,
    /// Where their events go; also holds the series state.
    pub bus: Arc<dyn Bus>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The process's readiness, turned to draining first on shutdown.
    pub health: Option<Arc<Health>>,
}

/// The durable consumer shared by the assemblers of every listener replica.
pub fn assembler_consumer() -> ConsumerSpec {
    ConsumerSpec::new(INSTANCES, "assembler")
}

/// Serves DICOM on `dicom` and assembles series until `shutdown`.
pub async fn run(
    dicom: TcpListener,
    deps: ListenerDeps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Listener::new(deps).run(dicom, shutdown).await
}

/// The listener built but not yet serving: its ingest exists, so the HTTP side can
/// mount STOW-RS on it ([`Listener::dicomweb`]) before [`Listener::run`] starts.
pub struct Listener {
    deps: ListenerDeps,
    sink: Arc<Ingest>,
    pressure: Arc<Pressure>,
    /// Whether instances may arrive over HTTP: true while `run` serves (the process's
    /// readiness component "listener").
    open: Arc<AtomicBool>,
    /// One permit per STOW-RS request that may run at once; `run` takes them all
    /// back before the journal closes, so no request writes past it.
    requests: Arc<tokio::sync::Semaphore>,
}

impl Listener {
    /// Builds the ingest (store, journal, bus) and the back-pressure record.
    pub fn new(mut deps: ListenerDeps) -> Self {
        let pressure = Pressure::new(deps.admission.clone());
        let sink = Arc::new(Ingest::new(
            deps.store.clone(),
            deps.journal.clone(),
            deps.bus.clone(),
            deps.metrics.clone(),
            pressure.clone(),
        ));
        if sink.writes_locally() {
            // A folder takes parts of any size: write while receiving, from the first PDU.
            deps.scp.stream_threshold = deps.scp.stream_threshold.min(LOCAL_STREAM_START);
            deps.scp.part_size = deps.scp.part_size.min(LOCAL_PART_SIZE);
        }
        let requests = Arc::new(tokio::sync::Semaphore::new(stow_requests(&deps.scp)));
        // `/readyz` says "listener" once it serves, so HTTP clients know when to send.
        let open = match &deps.health {
            Some(health) => health.component("listener"),
            None => Arc::new(AtomicBool::new(false)),
        };
        Self {
            deps,
            sink,
            pressure,
            open,
            requests,
        }
    }

    /// The STOW-RS routes into this listener's ingest, with the DICOM port's limits and
    /// `token`; they answer 503 until [`Listener::run`] serves, and again once it drains.
    pub fn dicomweb(&self, token: Option<radflow_shared::secret::Secret>) -> axum::Router {
        crate::dicomweb::router(
            self.sink.clone(),
            self.pressure.clone(),
            crate::dicomweb::StowConfig::from_scp(&self.deps.scp, token),
            self.open.clone(),
            self.requests.clone(),
        )
    }

    /// Serves DICOM on `dicom` (and STOW-RS, where mounted) and assembles series until
    /// `shutdown`.
    pub async fn run(self, dicom: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Listener {
            deps,
            sink,
            pressure,
            open,
            requests,
        } = self;
        let ListenerDeps {
            scp,
            assembly,
            admission: _,
            store: _,
            journal,
            bus,
            metrics,
            health,
        } = deps;
        let hooks = Arc::new(Hooks::new(&*bus, metrics.clone(), pressure.clone()).await?);
        let assembler = Arc::new(Assembler::new(&*bus).await?);
        let scanner = ReadyScanner::new(bus.clone(), assembly, metrics.clone()).await?;

        let assembling = tokio::spawn(worker::run(
            bus.clone(),
            assembler,
            WorkerConfig::new(assembler_consumer()),
            metrics.clone(),
            shutdown.clone(),
        ));
        let scanning = tokio::spawn(scanner.run(shutdown.clone()));
        let watching = tokio::spawn(pressure.watch_bus(bus.clone(), shutdown.clone()));
        // The DICOM server stops only after readiness has turned false.
        let stop_serving = CancellationToken::new();
        open.store(true, Ordering::SeqCst);
        let draining = {
            let (shutdown, stop_serving, open) =
                (shutdown.clone(), stop_serving.clone(), open.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                if let Some(health) = health {
                    health.set_draining();
                }
                open.store(false, Ordering::SeqCst);
                stop_serving.cancel();
            })
        };
        let (grace, stow_permits) = (scp.shutdown_grace, stow_requests(&scp) as u32);
        let served = scp::serve(
            dicom,
            Arc::new(scp),
            sink,
            hooks,
            metrics.clone(),
            stop_serving.clone(),
        )
        .await;
        open.store(false, Ordering::SeqCst);
        shutdown.cancel();
        // STOW-RS requests still running finish (within the grace period) before the
        // journal closes.
        let _ = tokio::time::timeout(grace, requests.acquire_many(stow_permits)).await;
        let _ = tokio::join!(assembling, scanning, watching, draining);
        if let Some(journal) = journal {
            // Everything acknowledged is flushed: nothing is left to replay.
            let _ = tokio::task::spawn_blocking(move || journal.close()).await;
        }
        served?;
        Ok(())
    }
}

/// How many STOW-RS requests may run at once: as many as associations.
fn stow_requests(scp: &ScpConfig) -> usize {
    scp.max_associations.max(1)
}

/// Opens the write-ahead journal of a flushed folder store when `enabled`, after
/// replaying what crashed listeners left in it; `None` for other stores. With the
/// journal off, journals of earlier runs are still replayed (and removed).
pub async fn open_journal(store: &Store, enabled: bool) -> anyhow::Result<Option<Arc<Journal>>> {
    let Some(root) = store.local_root().map(ToOwned::to_owned) else {
        return Ok(None);
    };
    if !enabled || !store.fsync() || !cfg!(target_os = "linux") {
        if root.join(crate::journal::JOURNAL_FOLDER).is_dir() {
            let replayed = tokio::task::spawn_blocking(move || Journal::replay_gone(&root))
                .await?
                .map_err(|e| {
                    anyhow::anyhow!("cannot replay the store journal under {}: {e}", store.url())
                })?;
            log_replay(replayed);
        }
        return Ok(None);
    }
    let (journal, replayed) = tokio::task::spawn_blocking(move || Journal::open(&root))
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open the store journal under {}: {e} (--store-journal false turns it off)",
                store.url()
            )
        })?;
    log_replay(replayed);
    Ok(Some(journal))
}

fn log_replay(replayed: crate::journal::Replayed) {
    if replayed.records > 0 || replayed.torn > 0 {
        tracing::info!(
            records = replayed.records,
            rewritten = replayed.rewritten,
            torn = replayed.torn,
            "replayed the store journal"
        );
    }
}

/// Finds the series in the store that lack a result of any of `models` (`name@version`)
/// and re-opens their assembly ([`recover`]): the in-process bus of embedded mode
/// forgets everything on exit. Returns how many were re-queued.
pub async fn recover_unfinished(
    bus: &dyn Bus,
    store: &Store,
    models: &[String],
) -> Result<usize, RecoverError> {
    let mut unfinished = Vec::new();
    for (study, series) in store.list_series().await? {
        let mut done = true;
        for model in models {
            done &= store.has_result(&series, model).await?;
        }
        if !done {
            unfinished.push((study, series));
        }
    }
    if unfinished.is_empty() {
        return Ok(0);
    }
    recover(bus, store, &unfinished).await
}

/// Re-opens assembly for series found in the store that have no result yet (embedded
/// mode, whose bus does not survive a restart). Each becomes ready again after the
/// quiet period, so an interrupted sender that resumes joins the same revision.
pub async fn recover(
    bus: &dyn Bus,
    store: &Store,
    series: &[(String, String)],
) -> Result<usize, RecoverError> {
    let kv: Arc<dyn Kv> = bus.kv(SERIES_STATE_BUCKET).await?;
    let mut n = 0;
    for (study, uid) in series {
        let stored = store.list_instances(study, uid).await?;
        let count = stored.len() as u32;
        if count == 0 {
            continue;
        }
        let mut digests: Vec<u64> = stored
            .iter()
            .filter_map(|o| o.key.rsplit('/').next()?.strip_suffix(".dcm"))
            .map(instance_digest)
            .collect();
        digests.sort_unstable();
        digests.dedup();
        let state = SeriesState {
            study_uid: study.clone(),
            series_uid: uid.clone(),
            modality: String::new(),
            called_ae: String::new(),
            calling_ae: String::new(),
            revision: 1,
            instances: count,
            last_instance_ms: now_ms(),
            released_ms: None,
            expected: None,
            emitted: false,
            emitted_ms: None,
            correlation_id: correlation_id(uid, 1),
            instance_digests: digests,
        };
        let value = serde_json::to_vec(&state).expect("series state serialises");
        if kv.create(uid, value.into()).await?.is_some() {
            n += 1;
        }
    }
    Ok(n)
}

/// Recovery failed to read the store or write the bus.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] radflow_shared::store::StoreError),
}
