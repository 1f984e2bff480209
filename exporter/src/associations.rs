//! Associations kept open between export jobs.
//!
//! Every result brings the same kinds of objects (a SEG and an SR) to the same
//! destinations, often seconds apart when a study's series finish together. Opening
//! an association per job costs a TCP connect and an A-ASSOCIATE round trip each, and
//! some PACS log every association; so a job takes an idle association to its
//! destination that was opened for the same presentation contexts, and gives it back
//! when it is done. An association idle for longer than [`IDLE`] is released: peers
//! close idle associations themselves after a while (often 30 s or more) and a
//! half-closed one costs a failed send.
//!
//! An association found closed by the peer when it is used again is not an export
//! failure: the job opens a fresh one and sends again (the objects' UIDs are
//! deterministic, so a resend never doubles them).
//!
//! A destination with a `[destination.tls]` table is sent to over TLS; its PEM files
//! are read for every new association (renewed certificates need no restart). Idle
//! associations are kept by the whole destination, address and TLS settings included,
//! so one is never reused for a destination configured differently.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use radflow_listener::scu::{self, Part10, ScuError, SendReport, Session, TlsConnector};

use crate::destinations::Destination;

/// How long an association may stay open with nothing to send.
pub const IDLE: Duration = Duration::from_secs(5);

/// Idle associations by destination (its name, address, AE titles and TLS settings).
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Destination, Vec<(Session, Instant)>>>,
}

/// The destination's client TLS configuration, read from its files now; `None` for
/// plain TCP.
fn connector(destination: &Destination) -> Result<Option<TlsConnector>, ScuError> {
    destination
        .tls
        .as_ref()
        .map(|tls| {
            tls.connector().map_err(|e| ScuError::Association {
                addr: destination.addr(),
                reason: format!("TLS configuration of {}: {e}", destination.name),
            })
        })
        .transpose()
}

impl Pool {
    /// Sends `objects` to `destination`, over an idle association when one fits.
    pub async fn send(
        &self,
        destination: &Destination,
        objects: &[Part10],
    ) -> Result<SendReport, ScuError> {
        let pairs = scu::presentation_pairs(objects);
        if pairs.is_empty() || pairs.len() > scu::MAX_CONTEXTS {
            // Nothing to negotiate (no Part-10 object) or more kinds than one
            // association carries: the one-shot path reports and splits them.
            return scu::send_objects_with(
                &destination.addr(),
                &destination.calling_ae,
                &destination.ae_title,
                objects,
                connector(destination)?.as_ref(),
            )
            .await;
        }
        if let Some(mut session) = self.take(destination, &pairs) {
            let report = session.send(objects).await;
            if !(session.is_broken() && report.sent == 0) {
                self.give_back(destination, session);
                return Ok(report);
            }
            // The peer closed it while it was idle: not the destination's failure.
            tracing::debug!(destination = %destination.name, "idle association was closed by the peer; opening a new one");
            session.release().await;
        }
        let mut session = Session::connect(
            &destination.addr(),
            &destination.calling_ae,
            &destination.ae_title,
            &pairs,
            connector(destination)?.as_ref(),
        )
        .await?;
        let report = session.send(objects).await;
        self.give_back(destination, session);
        Ok(report)
    }

    /// An idle association to `destination` opened for exactly `pairs`; expired ones
    /// met on the way are released.
    fn take(&self, destination: &Destination, pairs: &[(String, String)]) -> Option<Session> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(destination)?;
        let now = Instant::now();
        let mut found = None;
        let mut keep = Vec::with_capacity(list.len());
        for (session, since) in list.drain(..) {
            if now.duration_since(since) > IDLE {
                tokio::spawn(session.release());
            } else if found.is_none() && session.pairs() == pairs {
                found = Some(session);
            } else {
                keep.push((session, since));
            }
        }
        *list = keep;
        found
    }

    fn give_back(&self, destination: &Destination, session: Session) {
        if session.is_broken() {
            tokio::spawn(session.release());
            return;
        }
        self.idle
            .lock()
            .expect("pool lock")
            .entry(destination.clone())
            .or_default()
            .push((session, Instant::now()));
    }

    /// Releases the associations idle for longer than [`IDLE`] (or all, at shutdown).
    pub async fn release_idle(&self, all: bool) {
        let expired: Vec<Session> = {
            let mut idle = self.idle.lock().expect("pool lock");
            let now = Instant::now();
            let mut expired = Vec::new();
            for list in idle.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|(_, since)| all || now.duration_since(*since) > IDLE);
                *list = fresh;
                expired.extend(old.into_iter().map(|(s, _)| s));
            }
            expired
        };
        for session in expired {
            session.release().await;
        }
    }

    /// Associations open and idle now.
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum()
    }
}
