//! What every long-running mode of the binary starts and ends with: logs, the shutdown
//! signal, the store, the bus, metrics, health and the HTTP side, then draining.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use radflow_shared::bus::Bus;
use radflow_shared::config::{BusArgs, HttpArgs, StoreArgs, TelemetryArgs};
use radflow_shared::http::Health;
use radflow_shared::metrics::Metrics;
use radflow_shared::store::Store;
use radflow_shared::telemetry::TelemetryGuard;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Which bus a mode uses.
#[derive(Debug, Clone, Copy)]
pub enum BusMode {
    /// NATS JetStream, required (the distributed components).
    Nats,
    /// NATS when `--nats-url` is given, else the in-process bus (`radflow run`).
    NatsOrInProcess,
}

/// The resources of one running component (or of all of them, embedded).
pub struct Node {
    pub shutdown: CancellationToken,
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    http: Option<JoinHandle<()>>,
    draining: JoinHandle<()>,
    _telemetry: TelemetryGuard,
}

impl Node {
    /// Starts logs (as `service`) and signal handling, opens the store and connects
    /// the bus (retrying until shutdown), and makes metrics and health. HTTP is not
    /// served yet: components register their readiness first ([`Node::serve_http`]).
    pub async fn start(
        service: &str,
        telemetry: &TelemetryArgs,
        store: &StoreArgs,
        bus: &BusArgs,
        mode: BusMode,
    ) -> Result<Self> {
        let telemetry = radflow_shared::telemetry::init(
            telemetry.log_format,
            &telemetry.log,
            telemetry.otlp_endpoint.as_deref(),
            service,
        );
        let shutdown = radflow_shared::shutdown::on_signals();
        let store = store.open()?;
        let bus: Arc<dyn Bus> = match mode {
            BusMode::Nats => bus.connect_nats(service, &shutdown).await?,
            BusMode::NatsOrInProcess => bus.connect_or_inproc(service, &shutdown).await?,
        };
        let health = Health::new(Some(bus.clone()), Some(store.clone()));
        let draining = drain_on_shutdown(&health, &shutdown);
        Ok(Self {
            shutdown,
            store,
            bus,
            metrics: Metrics::new(),
            health,
            http: None,
            draining,
            _telemetry: telemetry,
        })
    }

    /// Serves health, metrics and status on the HTTP port, and `extra` routes of a
    /// component (the listener's STOW-RS) beside the probes.
    pub async fn serve_http(
        &mut self,
        args: &HttpArgs,
        extra: Option<radflow_shared::http::Routes>,
    ) -> Result<()> {
        use radflow_shared::http::Endpoints;
        let listener = TcpListener::bind((args.http_addr.as_str(), args.http_port))
            .await
            .with_context(|| {
                format!(
                    "cannot open HTTP port {}:{}",
                    args.http_addr, args.http_port
                )
            })?;
        let observation = match &args.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr.as_str())
                    .await
                    .with_context(|| format!("cannot open the metrics address {addr}"))?,
            ),
            None => None,
        };
        let probes = if let Some(obs) = &observation {
            tracing::info!(addr = %listener.local_addr()?, "health probes on HTTP");
            tracing::info!(addr = %obs.local_addr()?, "metrics, status and dead letters on HTTP");
            Endpoints::Probes
        } else {
            tracing::info!(addr = %listener.local_addr()?, "health and metrics on HTTP");
            Endpoints::All
        };
        let mut servers = vec![(listener, probes)];
        servers.extend(observation.map(|l| (l, Endpoints::Observation)));
        let tasks: Vec<_> = servers
            .into_iter()
            .map(|(listener, which)| {
                let (health, metrics, shutdown, extra) = (
                    self.health.clone(),
                    self.metrics.clone(),
                    self.shutdown.clone(),
                    extra.clone(),
                );
                tokio::spawn(async move {
                    if let Err(e) = radflow_shared::http::serve_with(
                        listener, which, health, metrics, extra, shutdown,
                    )
                    .await
                    {
                        tracing::error!(error = %e, "HTTP server failed");
                    }
                })
            })
            .collect();
        self.http = Some(tokio::spawn(async move {
            for task in tasks {
                let _ = task.await;
            }
        }));
        Ok(())
    }

    /// Exports the lag of these durable consumers as metrics.
    pub fn report_lag(&self, consumers: Vec<String>) {
        tokio::spawn(radflow_shared::status::report_lag(
            self.bus.clone(),
            consumers,
            self.metrics.clone(),
            Duration::from_secs(5),
            self.shutdown.clone(),
        ));
    }

    /// Shuts down once nothing has been processed for `idle` (batch-scoring Jobs).
    pub fn exit_when_idle(&self, idle: Option<Duration>) {
        if let Some(idle) = idle {
            tokio::spawn(radflow_shared::worker::exit_when_idle(
                self.metrics.clone(),
                idle,
                self.shutdown.clone(),
            ));
        }
    }

    /// Waits for draining and the HTTP side to end, after the components have.
    pub async fn finish(self) {
        let _ = self.draining.await;
        if let Some(http) = self.http {
            let _ = http.await;
        }
    }
}

/// Turns `/readyz` false as soon as shutdown is requested, before anything stops.
fn drain_on_shutdown(health: &Arc<Health>, shutdown: &CancellationToken) -> JoinHandle<()> {
    let (health, shutdown) = (health.clone(), shutdown.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        health.set_draining();
    })
}
