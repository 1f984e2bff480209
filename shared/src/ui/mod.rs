//! The web page of every process (`/ui/`): what an operator of the router wants to
//! look at rather than read as JSON.
//!
//! One static page (`index.html`, `page.css`, `page.js`, compiled into the binary with
//! `include_str!`, so nothing is built or fetched at run time) whose script fetches
//! `/ui/overview.json` (see [`overview`]) every two seconds and redraws the queues and
//! lag per lane, the series being assembled, the recent results with their preview and
//! label volumes, and the dead letters with their reasons. Previews are served from the
//! store by `/ui/results/<series>/<model>@<version>/preview.png`, whose path parts are
//! checked to be a UID and a model reference before any key is built from them.
//!
//! The page is served with the observation endpoints (`/metrics`, `/status`, `/dlq`),
//! never beside the probes alone; it changes nothing and needs no token. Its content
//! security policy lets it load only its own script, style, data and images, and the
//! script writes what it receives as text, never as markup.

pub mod overview;

use std::sync::Arc;

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};

use crate::bus::Bus;
use crate::store::{Store, StoreError};

const INDEX: &str = include_str!("index.html");
const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// The page may load its own files and nothing else, and may not be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct UiState {
    bus: Option<Arc<dyn Bus>>,
    store: Option<Store>,
    durations: Arc<overview::Durations>,
}

/// The routes of the page: `/` and `/ui` lead to `/ui/`.
pub fn router(bus: Option<Arc<dyn Bus>>, store: Option<Store>) -> Router {
    // Relative redirects, so that the page also works below a reverse proxy's prefix.
    Router::new()
        .route("/", get(|| async { Redirect::to("ui/") }))
        .route("/ui", get(|| async { Redirect::to("ui/") }))
        .route(
            "/ui/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/page.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/page.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route("/ui/overview.json", get(overview_handler))
        .route(
            "/ui/results/{series}/{model_ref}/preview.png",
            get(preview_handler),
        )
        .with_state(UiState {
            bus,
            store,
            durations: Default::default(),
        })
}

/// Headers every answer of the page carries.
fn guarded(mut r: Response, cache: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    // `no-cache`: revalidated on every load, so a new version's page is seen at once.
    guarded(
        ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        "no-cache",
    )
}

fn text(code: StatusCode, why: &'static str) -> Response {
    guarded((code, why).into_response(), "no-store")
}

async fn overview_handler(State(s): State<UiState>) -> Response {
    let Some(bus) = &s.bus else {
        return text(StatusCode::NOT_FOUND, "no bus in this process\n");
    };
    match overview::collect(&**bus, s.store.as_ref(), &s.durations).await {
        Ok(view) => guarded(
            (
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::to_string(&view).unwrap_or_default(),
            )
                .into_response(),
            "no-store",
        ),
        Err(e) => {
            tracing::debug!(error = %e, "cannot build the page's overview");
            text(StatusCode::SERVICE_UNAVAILABLE, "the bus does not answer\n")
        }
    }
}

/// Whether `s` is a DICOM UID usable in a store key: 1 to 64 characters, digits and
/// dots, no empty component (so never `.` or `..`).
fn is_uid(s: &str) -> bool {
    s.len() <= 64
        && s.split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `s` is `<model>@<version>` as the registry allows them.
fn is_model_ref(s: &str) -> bool {
    s.split_once('@').is_some_and(|(name, version)| {
        crate::models::is_token(name, false) && crate::models::is_token(version, true)
    })
}

async fn preview_handler(
    State(s): State<UiState>,
    Path((series, model_ref)): Path<(String, String)>,
) -> Response {
    if !is_uid(&series) {
        return text(StatusCode::BAD_REQUEST, "not a series instance UID\n");
    }
    if !is_model_ref(&model_ref) {
        return text(StatusCode::BAD_REQUEST, "not a <model>@<version>\n");
    }
    let Some(store) = &s.store else {
        return text(StatusCode::NOT_FOUND, "no store in this process\n");
    };
    match store
        .get(&Store::result_key(&series, &model_ref, "preview.png"))
        .await
    {
        // The key is the result's identity; a new revision is asked for with `?rev=`.
        Ok(png) => guarded(
            ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
            "private, max-age=300",
        ),
        Err(StoreError::NotFound { .. }) => text(StatusCode::NOT_FOUND, "no preview\n"),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read a preview");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store does not answer\n",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::net::TcpListener;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&out[..split]).into_owned();
        let code = head[9..12].parse().unwrap();
        (code, head, out[split + 4..].to_vec())
    }

    #[test]
    fn path_parts_are_checked() {
        assert!(is_uid("1.2.840.113619.2.55.3"));
        for bad in [
            "",
            ".",
            "..",
            "1..2",
            "1.2.",
            ".1",
            "1.2a",
            "1/2",
            &"1".repeat(65),
        ] {
            assert!(!is_uid(bad), "{bad:?}");
        }
        assert!(is_model_ref("demo-tissue@1.0.0"));
        for bad in [
            "demo-tissue",
            "@1",
            "demo@",
            "de.mo@1",
            "demo@1/2",
            "demo@..%2f",
        ] {
            assert!(!is_model_ref(bad), "{bad:?}");
        }
    }

    /// The page, its files and previews from the store, with the headers that keep
    /// it to itself; a path that is not a UID and a model reference is refused.
    #[tokio::test]
    async fn serves_the_page_and_previews() {
        let store = Store::memory();
        let png = Bytes::from_static(b"\x89PNG\r\n\x1a\nnot really");
        store
            .put_result("1.2.3", "demo-tissue@1.0.0", "preview.png", png.clone())
            .await
            .unwrap();
        store
            .put("results/secret.png", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let bus: Arc<dyn Bus> = Arc::new(crate::bus::InProcBus::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, router(Some(bus), Some(store)))
                .await
                .unwrap()
        });

        let (code, head, _) = get(addr, "/").await;
        assert_eq!(code, 303, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("location: ui/"),
            "{head}"
        );
        let (code, head, body) = get(addr, "/ui/").await;
        assert_eq!(code, 200, "{head}");
        assert!(head.contains("text/html"), "{head}");
        assert!(head.contains("frame-ancestors 'none'"), "{head}");
        let html = String::from_utf8(body).unwrap();
        assert!(
            html.contains("page.js") && html.contains("page.css"),
            "{html}"
        );
        for (path, kind) in [
            ("/ui/page.js", "text/javascript"),
            ("/ui/page.css", "text/css"),
        ] {
            let (code, head, _) = get(addr, path).await;
            assert_eq!(code, 200, "{path}");
            assert!(head.contains(kind), "{head}");
        }
        let (code, _, body) = get(addr, "/ui/overview.json").await;
        assert_eq!(code, 200);
        let view: overview::Overview = serde_json::from_slice(&body).unwrap();
        assert_eq!(view.bus, "in-process");

        let (code, head, body) = get(
            addr,
            "/ui/results/1.2.3/demo-tissue@1.0.0/preview.png?rev=1",
        )
        .await;
        assert_eq!(code, 200, "{head}");
        assert!(head.contains("image/png"), "{head}");
        assert!(body == png, "a different preview came back");
        let (code, _, _) = get(addr, "/ui/results/1.2.4/demo-tissue@1.0.0/preview.png").await;
        assert_eq!(code, 404);
        for bad in [
            "/ui/results/../demo-tissue@1.0.0/preview.png",
            "/ui/results/%2e%2e/demo-tissue@1.0.0/preview.png",
            "/ui/results/1.2.3/..%2Fsecret.png%23@1/preview.png",
            "/ui/results/1.2.3/demo-tissue/preview.png",
        ] {
            let (code, head, _) = get(addr, bad).await;
            assert!(code == 400 || code == 404, "{bad}: {head}");
        }
        let (code, _, _) = get(addr, "/ui/results/%2e%2e/demo-tissue@1.0.0/preview.png").await;
        assert_eq!(
            code, 400,
            "a percent-encoded parent is refused by the check"
        );
    }
}
