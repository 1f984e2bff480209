//! The HTTP port every process opens: `/healthz`, `/readyz`, `/metrics`.
//!
//! `/healthz` answers while the process runs (a liveness probe restarts a wedged
//! process, nothing more). `/readyz` is true only when the bus and the store answer,
//! every component of the process said it is ready (e.g. models warmed up) and the
//! process is not draining: it is what compose health checks and Kubernetes readiness
//! probes use, and it turns false first on SIGTERM.
//!
//! A process that holds the bus also answers `/status` and `/dlq` (JSON; what `radflow
//! status` and `radflow dlq list` show), so the embedded mode, whose bus lives in the
//! process, can be inspected from outside. `POST /dlq/replay[?seq=N]` changes state, so
//! it is served only by a process that holds the bus (embedded mode) *and* was given an
//! admin token (`--admin-token`), and only to requests that present it as
//! `Authorization: Bearer <token>`; it is off by default. The token is compared in
//! constant time and never logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::Store;

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What `/readyz` looks at.
pub struct Health {
    bus: Option<Arc<dyn Bus>>,
    store: Option<Store>,
    draining: AtomicBool,
    admin: std::sync::Mutex<Option<Secret>>,
    components: std::sync::Mutex<Vec<(String, Arc<AtomicBool>)>>,
}

impl Health {
    pub fn new(bus: Option<Arc<dyn Bus>>, store: Option<Store>) -> Arc<Self> {
        Arc::new(Self {
            bus,
            store,
            draining: AtomicBool::new(false),
            admin: std::sync::Mutex::new(None),
            components: Default::default(),
        })
    }

    /// A readiness flag for one component, false until it sets it.
    pub fn component(&self, name: &str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.components
            .lock()
            .unwrap()
            .push((name.to_owned(), flag.clone()));
        flag
    }

    /// Serves `POST /dlq/replay` to requests bearing `token` (embedded mode, where no
    /// other path to the bus exists). Without a token the endpoint stays off.
    pub fn enable_admin(&self, token: Option<Secret>) {
        *self.admin.lock().unwrap() = token.filter(|t| !t.expose().is_empty());
    }

    /// Whether `authorization` (the header's value) carries the admin token.
    fn admin_allowed(&self, authorization: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
        let admin = self.admin.lock().unwrap();
        let Some(token) = admin.as_ref() else {
            return Err((
                StatusCode::NOT_FOUND,
                "replay over HTTP is off: start radflow with --admin-token (RADFLOW_ADMIN_TOKEN), \
                 or use radflow dlq replay --nats-url",
            ));
        };
        let given = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
            Ok(())
        } else {
            Err((
                StatusCode::UNAUTHORIZED,
                "a valid admin token is required (Authorization: Bearer <token>)",
            ))
        }
    }

    /// Marks the process as draining: `/readyz` turns false.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Evaluates readiness; the JSON says what is missing.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let mut ok = true;
        let mut detail = serde_json::Map::new();
        if self.draining.load(Ordering::SeqCst) {
            ok = false;
            detail.insert("draining".into(), json!(true));
        }
        for (name, flag) in self.components.lock().unwrap().iter() {
            let ready = flag.load(Ordering::SeqCst);
            ok &= ready;
            detail.insert(name.clone(), json!(ready));
        }
        if let Some(bus) = &self.bus {
            let r = tokio::time::timeout(Duration::from_secs(2), bus.check()).await;
            let v = match r {
                Ok(Ok(())) => json!("ok"),
                Ok(Err(e)) => {
                    ok = false;
                    json!(e.to_string())
                }
                Err(_) => {
                    ok = false;
                    json!("timeout")
                }
            };
            detail.insert("bus".into(), v);
        }
        if let Some(store) = &self.store {
            let r = tokio::time::timeout(Duration::from_secs(2), store.check()).await;
            let v = match r {
                Ok(Ok(())) => json!("ok"),
                Ok(Err(e)) => {
                    ok = false;
                    json!(e.to_string())
                }
                Err(_) => {
                    ok = false;
                    json!("timeout")
                }
            };
            detail.insert("store".into(), v);
        }
        (ok, serde_json::Value::Object(detail))
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// Which endpoints a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// Everything on one port.
    All,
    /// The probes (`/healthz`, `/readyz`) and the token-guarded `POST /dlq/replay`:
    /// the HTTP port when observation has an address of its own.
    Probes,
    /// What tells about the pipeline (`/metrics`, `/status`, `/dlq`, the web page
    /// under `/ui/`) and `/healthz`: an address of their own, e.g. loopback or a
    /// monitoring network only.
    Observation,
}

/// The router, for tests that call it directly.
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    router_for(Endpoints::All, health, metrics)
}

/// The router of one socket.
pub fn router_for(which: Endpoints, health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    let mut r = Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
    if which != Endpoints::Observation {
        r = r
            .route("/readyz", axum::routing::get(readyz))
            .route("/dlq/replay", axum::routing::post(replay_handler));
    }
    if which != Endpoints::Probes {
        r = r
            .route("/metrics", axum::routing::get(metrics_handler))
            .route("/status", axum::routing::get(status_handler))
            .route("/dlq", axum::routing::get(dlq_handler));
    }
    let page = (which != Endpoints::Probes)
        .then(|| crate::ui::router(health.bus.clone(), health.store.clone()));
    let r = r.with_state(AppState { health, metrics });
    match page {
        Some(page) => r.merge(page),
        None => r,
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let (ok, detail) = s.health.readiness().await;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        detail.to_string(),
    )
}

fn json_response(code: StatusCode, body: serde_json::Value) -> axum::response::Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn status_handler(State(s): State<AppState>) -> axum::response::Response {
    let Some(bus) = &s.health.bus else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "no bus in this process"}),
        );
    };
    match crate::status::collect(&**bus, 10).await {
        Ok(r) => json_response(StatusCode::OK, serde_json::to_value(r).unwrap_or_default()),
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.to_string()}),
        ),
    }
}

async fn dlq_handler(State(s): State<AppState>) -> axum::response::Response {
    let Some(bus) = &s.health.bus else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "no bus in this process"}),
        );
    };
    match crate::status::dead_letters(&**bus, 10_000).await {
        Ok(list) => json_response(
            StatusCode::OK,
            serde_json::to_value(list).unwrap_or_default(),
        ),
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.to_string()}),
        ),
    }
}

#[derive(serde::Deserialize)]
struct ReplayQuery {
    seq: Option<u64>,
}

async fn replay_handler(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ReplayQuery>,
) -> axum::response::Response {
    let Some(bus) = s.health.bus.as_ref() else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "replay is served by embedded processes only; use radflow dlq replay --nats-url"}),
        );
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err((code, why)) = s.health.admin_allowed(authorization) {
        return json_response(code, json!({"error": why}));
    }
    match crate::status::replay(&**bus, q.seq).await {
        Ok(n) => json_response(StatusCode::OK, json!({"replayed": n})),
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.to_string()}),
        ),
    }
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
}

/// Serves the health and metrics endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    which: Endpoints,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, which, health, metrics, None, shutdown).await
}

/// Routes a component adds to the HTTP port (so the binary needs no axum of its own).
pub type Routes = Router;

/// Like [`serve`], with `extra` routes of a component (e.g. the listener's STOW-RS)
/// merged into every socket but the observation one.
pub async fn serve_with(
    listener: TcpListener,
    which: Endpoints,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    extra: Option<Router>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut router = router_for(which, health, metrics);
    if let Some(extra) = extra.filter(|_| which != Endpoints::Observation) {
        router = router.merge(extra);
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::InProcBus;

    #[tokio::test]
    async fn ready_only_when_components_ready_and_not_draining() {
        let health = Health::new(Some(Arc::new(InProcBus::new())), Some(Store::memory()));
        let flag = health.component("inferer");
        assert!(!health.readiness().await.0);
        flag.store(true, Ordering::SeqCst);
        let (ok, detail) = health.readiness().await;
        assert!(ok, "{detail}");
        health.set_draining();
        assert!(!health.readiness().await.0);
    }

    /// `POST /dlq/replay` is off without a token, and with one it needs the right one.
    #[tokio::test]
    async fn replay_needs_the_admin_token() {
        let bus: Arc<dyn Bus> = Arc::new(InProcBus::new());
        let health = Health::new(Some(bus), None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Endpoints::All,
            health.clone(),
            Metrics::new(),
            stop.clone(),
        ));
        let post = |auth: Option<&'static str>| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let auth = auth
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            let req =
                format!("POST /dlq/replay HTTP/1.0\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let off = post(Some("Bearer anything")).await;
        assert!(off.starts_with("HTTP/1.0 404"), "{off}");
        assert!(off.contains("--admin-token"), "{off}");

        health.enable_admin(Some(Secret::new("s3cr3t-t0ken")));
        for wrong in [
            None,
            Some("Bearer s3cr3t-t0keN"),
            Some("Basic s3cr3t-t0ken"),
        ] {
            let r = post(wrong).await;
            assert!(r.starts_with("HTTP/1.0 401"), "{wrong:?}: {r}");
        }
        let ok = post(Some("Bearer s3cr3t-t0ken")).await;
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(ok.contains("\"replayed\":0"), "{ok}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[tokio::test]
    async fn serves_endpoints() {
        let health = Health::new(None, None);
        let metrics = Metrics::new();
        metrics.message("listener", "received");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Endpoints::All,
            health,
            metrics,
            stop.clone(),
        ));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.0 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.0 200"));
        let m = get("/metrics").await;
        assert!(m.contains("radflow_messages_total"), "{m}");
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn observation_on_an_address_of_its_own() {
        let health = Health::new(None, None);
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let mut addrs = Vec::new();
        for which in [Endpoints::Probes, Endpoints::Observation] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            tokio::spawn(serve(
                listener,
                which,
                health.clone(),
                metrics.clone(),
                stop.clone(),
            ));
        }
        let status = |addr: std::net::SocketAddr, method: &'static str, path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out[9..12].parse::<u16>().unwrap()
        };
        let (probes, observation) = (addrs[0], addrs[1]);
        assert_eq!(status(probes, "GET", "/healthz").await, 200);
        assert_eq!(status(probes, "GET", "/readyz").await, 200);
        assert_eq!(status(probes, "GET", "/metrics").await, 404);
        assert_eq!(status(probes, "GET", "/status").await, 404);
        assert_eq!(status(probes, "GET", "/dlq").await, 404);
        // Replay stays beside the probes (a route for POST only: GET is 405 there).
        assert_eq!(status(probes, "GET", "/dlq/replay").await, 405);
        assert_eq!(status(observation, "GET", "/healthz").await, 200);
        assert_eq!(status(observation, "GET", "/metrics").await, 200);
        assert_eq!(status(observation, "GET", "/readyz").await, 404);
        assert_eq!(status(observation, "GET", "/dlq/replay").await, 404);
        // The web page goes with observation.
        assert_eq!(status(probes, "GET", "/ui/").await, 404);
        assert_eq!(status(observation, "GET", "/ui/").await, 200);
        stop.cancel();
    }
}
