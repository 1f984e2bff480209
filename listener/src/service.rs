//! The listener stage as a whole: the DICOM server, the assembler that applies stored
//! instances to the series state, and the scanner that declares series ready.
//!
//! `run` takes an already bound socket and opened bus and store, so tests run it on
//! port 0 with the in-process bus and a memory store, and the binary only wires flags.

use std::sync::Arc;

use radflow_shared::bus::{Bus, BusError, ConsumerSpec, INSTANCES, Kv, SERIES_STATE_BUCKET};
use radflow_shared::metrics::Metrics;
use radflow_shared::store::Store;
use radflow_shared::util::now_ms;
use radflow_shared::worker::{self, WorkerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::assembly::{Assembler, AssemblyConfig, ReadyScanner, SeriesState, correlation_id};
use crate::ingest::{Hooks, Ingest};
use crate::scp::{self, ScpConfig};

/// What the listener needs.
pub struct ListenerDeps {
    pub scp: ScpConfig,
    pub assembly: AssemblyConfig,
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
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
    let ListenerDeps {
        scp,
        assembly,
        store,
        bus,
        metrics,
    } = deps;
    let sink = Arc::new(Ingest::new(store, bus.clone(), metrics.clone()));
    let hooks = Arc::new(Hooks::new(&*bus, metrics.clone()).await?);
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
    let served = scp::serve(dicom, Arc::new(scp), sink, hooks, shutdown.clone()).await;
    shutdown.cancel();
    let _ = tokio::join!(assembling, scanning);
    served?;
    Ok(())
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
        let count = store.list_instances(study, uid).await?.len() as u32;
        if count == 0 {
            continue;
        }
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
