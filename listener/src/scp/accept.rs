//! The listener socket: the accept loop, connection limits, the TLS handshake, the
//! association request and its negotiation or rejection, and the drain on shutdown.
//!
//! Each connection becomes a task that ends here if the association is refused, or goes
//! on to [`session::run`] once the A-ASSOCIATE-AC is sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dicom_ul::pdu::{AbortRQServiceProviderReason, Pdu};
use radflow_shared::metrics::Metrics;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::config::{AssociationHooks, InstanceSink, ScpConfig};
use super::session;
use crate::association::{ConnError, Connection, PduStream, Rejection, negotiate};

/// Connections beyond `max_associations` that may wait for their rejection at once; more
/// are closed without a word.
const MAX_PENDING_REJECTIONS: usize = 64;

/// Everything an association task shares with the others.
pub(super) struct Shared {
    pub(super) config: Arc<ScpConfig>,
    pub(super) sink: Arc<dyn InstanceSink>,
    pub(super) hooks: Arc<dyn AssociationHooks>,
    pub(super) metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    connections: AtomicUsize,
    shutdown: CancellationToken,
    pub(super) hard_stop: CancellationToken,
}

/// Run the SCP on `listener` until `shutdown` is cancelled, then drain (see module docs).
///
/// Returns after every association task has ended. Errors accepting one connection are
/// logged and do not stop the server.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ScpConfig>,
    sink: Arc<dyn InstanceSink>,
    hooks: Arc<dyn AssociationHooks>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(config.max_associations)),
        config,
        sink,
        hooks,
        metrics,
        connections: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, ae_titles = ?shared.config.ae_titles, "DICOM listener ready");
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Typically out of file descriptors; back off instead of spinning.
                warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let open = shared.connections.fetch_add(1, Ordering::SeqCst);
        if open >= shared.config.max_associations + MAX_PENDING_REJECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            warn!(%peer, open, "too many open connections; closing without a reply");
            shared.metrics.association("rejected_connections");
            drop(stream);
            continue;
        }
        let span = info_span!(
            "association",
            %peer,
            calling_ae = tracing::field::Empty,
            called_ae = tracing::field::Empty
        );
        let task_shared = shared.clone();
        tracker.spawn(
            async move {
                run_association(stream, peer, &task_shared).await;
                task_shared.connections.fetch_sub(1, Ordering::SeqCst);
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    let running = tracker.len();
    if running > 0 {
        info!(running, grace = ?shared.config.shutdown_grace, "waiting for associations to finish");
    }
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            running = tracker.len(),
            "shutdown grace period over; aborting remaining associations"
        );
        shared.hard_stop.cancel();
        tracker.wait().await;
    }
    info!("DICOM listener stopped");
    Ok(())
}

/// One connection from first byte to close: the association's establishment here, its
/// data transfer in [`session::run`].
async fn run_association(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let config = &shared.config;
    // Responses are small writes; without this the peer's delayed ACK stalls each one.
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn PduStream> = match &config.tls {
        None => Box::new(stream),
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            match tokio::time::timeout(config.artim_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => Box::new(tls_stream),
                Ok(Err(e)) => {
                    warn!(error = %e, "TLS handshake failed; closing");
                    shared.metrics.association("rejected_tls");
                    return;
                }
                Err(_) => {
                    warn!("no TLS handshake within the ARTIM timeout; closing");
                    shared.metrics.association("rejected_tls");
                    return;
                }
            }
        }
    };
    let mut conn = Connection::new(stream, config.max_pdu);

    let request = match conn.receive_request(config.artim_timeout).await {
        Ok(Pdu::AssociationRQ(rq)) => rq,
        Ok(other) => {
            warn!(
                pdu = %other.short_description(),
                "expected an association request; aborting"
            );
            conn.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                .await;
            return;
        }
        Err(ConnError::Closed) => {
            debug!("connection closed before an association request");
            return;
        }
        Err(e) => {
            warn!(error = %e, "no valid association request; aborting");
            conn.abort(AbortRQServiceProviderReason::InvalidPduParameter)
                .await;
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("calling_ae", request.calling_ae_title.trim());
    span.record("called_ae", request.called_ae_title.trim());

    let negotiation = match negotiate(&request, config, peer.ip()) {
        Ok(n) => n,
        Err(rejection) => return reject(shared, &mut conn, rejection).await,
    };
    if shared.shutdown.is_cancelled() {
        let r = Rejection::congested("listener is shutting down");
        return reject(shared, &mut conn, r).await;
    }
    let Ok(_slot) = shared.slots.clone().try_acquire_owned() else {
        let r = Rejection::limit_exceeded(format!(
            "{} associations are already active",
            config.max_associations
        ));
        return reject(shared, &mut conn, r).await;
    };
    if let Err(rejection) = shared.hooks.admit() {
        return reject(shared, &mut conn, rejection).await;
    }

    conn.set_peer_max_pdu(negotiation.peer_max_pdu);
    if let Err(e) = conn
        .send(&Pdu::AssociationAC(negotiation.response.clone()))
        .await
    {
        warn!(error = %e, "could not send the association acceptance");
        return;
    }
    info!(
        accepted = negotiation.accepted.len(),
        proposed = negotiation.proposed,
        "association accepted"
    );
    shared.metrics.association("accepted");
    session::run(shared, peer, conn, &negotiation).await;
}

async fn reject(shared: &Shared, conn: &mut Connection, rejection: Rejection) {
    warn!(reason = %rejection, "association rejected");
    shared
        .metrics
        .association(&format!("rejected_{}", rejection.reason.label()));
    let _ = conn
        .send_and_close(&rejection.to_pdu(), shared.config.artim_timeout)
        .await;
}
