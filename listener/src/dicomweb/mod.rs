//! DICOMweb STOW-RS (PS3.18 10.5): `POST /dicomweb/studies` and
//! `POST /dicomweb/studies/{study}` with `multipart/related; type="application/dicom"`,
//! on the listener process's HTTP port, into the same ingest as C-STORE.
//!
//! Each part is a DICOM Part-10 file. It is read as it arrives ([`part`]), checked as a
//! C-STORE dataset is, and stored through the listener's [`Ingest`]: an instance counts
//! as stored only once it is durable in the store and its `InstanceStored` event was
//! acknowledged by the bus. The response ([`response`]) lists the stored instances and
//! the failed parts with their reasons; a failed part loses nothing else.
//!
//! The request body is parsed by `multer` (the streaming multipart parser behind axum's
//! own multipart support), with the boundary read from the `multipart/related` media
//! type here (leniently: `type=application/dicom` often comes unquoted); `multer` takes parts without a Content-Disposition, which STOW-RS parts
//! do not carry. It never holds more than its search window, and a part is written in
//! pieces while it arrives, so memory per request stays bounded whatever its size.
//!
//! Admission is the DICOM port's: the same back-pressure ([`Pressure`]) answers
//! 503 with Retry-After instead of a refused association, and at most as many requests
//! as associations run at once. A bearer token, when configured, guards both routes.

pub mod part;
pub mod part10;
pub mod response;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use radflow_shared::secret::Secret;
use tokio::sync::Semaphore;

use crate::ingest::{Ingest, Pressure};
use crate::scp::ScpConfig;
use response::{Format, Outcome};

/// Seconds a client is asked to wait (Retry-After) while the listener refuses work.
const RETRY_AFTER_SECS: u64 = 5;

/// What STOW-RS accepts, taken from the DICOM port's settings.
#[derive(Debug, Clone)]
pub struct StowConfig {
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<Secret>,
    /// Largest instance accepted (the DICOM port's limit).
    pub max_instance_bytes: u64,
    /// Parts larger than this are written to the store in pieces as they arrive.
    pub stream_threshold: u64,
    /// Size of each piece written while streaming.
    pub part_size: usize,
    /// Transfer syntaxes accepted.
    pub transfer_syntaxes: Vec<String>,
    /// Private storage SOP classes accepted besides the standard ones.
    pub private_sop_classes: Vec<String>,
    /// The AE title recorded as the called AE of instances received over HTTP.
    pub called_ae: String,
    /// Requests handled at once; more are answered 503.
    pub max_requests: usize,
}

impl StowConfig {
    /// The settings of `scp` (after the listener's adjustments for its store), with
    /// `token`.
    pub fn from_scp(scp: &ScpConfig, token: Option<Secret>) -> Self {
        Self {
            token: token.filter(|t| !t.expose().is_empty()),
            max_instance_bytes: scp.max_instance_bytes,
            stream_threshold: scp.stream_threshold,
            part_size: scp.part_size,
            transfer_syntaxes: scp.transfer_syntaxes.clone(),
            private_sop_classes: scp.private_sop_classes.clone(),
            called_ae: scp.ae_titles.first().cloned().unwrap_or_default(),
            max_requests: scp.max_associations.max(1),
        }
    }
}

/// The STOW-RS service's shared state.
#[derive(Clone)]
struct Stow {
    ingest: Arc<Ingest>,
    pressure: Arc<Pressure>,
    config: Arc<StowConfig>,
    /// True while the listener runs (not before it started, not once it drains).
    open: Arc<AtomicBool>,
    requests: Arc<Semaphore>,
}

/// The STOW-RS routes, to be merged into the process's HTTP router. Requests are
/// answered 503 until `open` is true.
/// `requests` holds `config.max_requests` permits, one per running request, so the
/// listener can wait for running requests before it closes the store's journal.
pub fn router(
    ingest: Arc<Ingest>,
    pressure: Arc<Pressure>,
    config: StowConfig,
    open: Arc<AtomicBool>,
    requests: Arc<Semaphore>,
) -> Router {
    let state = Stow {
        ingest,
        pressure,
        config: Arc::new(config),
        open,
        requests,
    };
    Router::new()
        .route("/dicomweb/studies", axum::routing::post(store_any))
        .route(
            "/dicomweb/studies/{study}",
            axum::routing::post(store_study),
        )
        .with_state(state)
}

async fn store_any(State(s): State<Stow>, headers: HeaderMap, body: Body) -> Response {
    handle(s, None, headers, body).await
}

async fn store_study(
    State(s): State<Stow>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(s, Some(study), headers, body).await
}

fn text(code: StatusCode, why: impl Into<String>) -> Response {
    let mut why = why.into();
    why.push('\n');
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        why,
    )
        .into_response()
}

fn unavailable(why: impl Into<String>) -> Response {
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    r
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A media type's essence (lower case) and its parameters (names in lower case, values
/// unquoted). Lenient on purpose: STOW-RS clients often send `type=application/dicom`
/// unquoted, which RFC 2045 would reject (the `/` needs quotes).
fn media_type(value: &str) -> (String, Vec<(String, String)>) {
    let mut items = value.split(';');
    let essence = items.next().unwrap_or_default().trim().to_ascii_lowercase();
    let params = items
        .filter_map(|item| {
            let (k, v) = item.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_ascii_lowercase(), v.to_owned()))
        })
        .collect();
    (essence, params)
}

/// The boundary of a `multipart/related` body of DICOM parts, or why the request is
/// refused (415).
fn boundary(headers: &HeaderMap) -> Result<String, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or("Content-Type multipart/related; type=\"application/dicom\" is required")?;
    let (essence, params) = media_type(ct);
    if essence != "multipart/related" {
        return Err("STOW-RS takes multipart/related; type=\"application/dicom\"".into());
    }
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    if let Some(t) = param("type")
        && !t.eq_ignore_ascii_case("application/dicom")
    {
        return Err(
            "only type=\"application/dicom\" (Part-10 files) is accepted, not metadata and bulk data"
                .into(),
        );
    }
    param("boundary")
        .filter(|b| !b.is_empty())
        .cloned()
        .ok_or_else(|| "the multipart Content-Type has no boundary".into())
}

async fn handle(s: Stow, study: Option<String>, headers: HeaderMap, body: Body) -> Response {
    if let Some(token) = &s.config.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "a valid token is required (Authorization: Bearer <token>)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    if let Some(study) = &study
        && !crate::dataset::is_valid_uid(study)
    {
        return text(
            StatusCode::BAD_REQUEST,
            "the study in the URL is not a valid UID",
        );
    }
    let boundary = match boundary(&headers) {
        Ok(b) => b,
        Err(why) => return text(StatusCode::UNSUPPORTED_MEDIA_TYPE, why),
    };
    if !s.open.load(Ordering::SeqCst) {
        return unavailable("the listener is not accepting instances now (starting or stopping)");
    }
    if let Err(rejection) = s.pressure.admit() {
        tracing::info!(reason = %rejection, "STOW-RS request refused for back-pressure");
        return unavailable(format!("busy, retry later: {}", rejection.detail));
    }
    let Ok(_permit) = s.requests.clone().try_acquire_owned() else {
        return unavailable(format!(
            "{} STOW-RS requests are running, the most at once",
            s.config.max_requests
        ));
    };
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let mut multipart = multer::Multipart::new(body.into_data_stream(), boundary);
    let mut outcomes: Vec<Outcome> = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "STOW-RS body is not a well-formed multipart body");
                if outcomes.is_empty() {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("the body is not a well-formed multipart/related body: {e}"),
                    );
                }
                outcomes.push(Outcome {
                    sop_class_uid: None,
                    sop_instance_uid: None,
                    failure: Some(response::PROCESSING_FAILURE),
                });
                break;
            }
        };
        let part_type = field
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| media_type(v).0);
        if part_type.is_some_and(|t| t != "application/dicom") {
            // Drain the part; it is not an instance.
            let mut field = field;
            while let Ok(Some(_)) = field.chunk().await {}
            outcomes.push(Outcome {
                sop_class_uid: None,
                sop_instance_uid: None,
                failure: Some(response::CANNOT_UNDERSTAND),
            });
            continue;
        }
        let result = part::store_part(&s.ingest, &s.config, study.as_deref(), field).await;
        outcomes.push(result.outcome);
        if result.body_broken {
            break;
        }
    }
    if outcomes.is_empty() {
        return text(StatusCode::BAD_REQUEST, "the request holds no instance");
    }
    let stored = outcomes.iter().filter(|o| o.failure.is_none()).count();
    tracing::info!(
        stored,
        failed = outcomes.len() - stored,
        "STOW-RS request answered"
    );
    (
        response::status(&outcomes),
        [(header::CONTENT_TYPE, format.content_type())],
        response::encode(&outcomes, format),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_type(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn boundary_of_a_multipart_related_body() {
        // dicomweb-client's header: quoted parameters.
        let h = with_type(
            "multipart/related; type=\"application/dicom\"; boundary=\"0f3cf5c0-70e0-41ef\"",
        );
        assert_eq!(boundary(&h).unwrap(), "0f3cf5c0-70e0-41ef");
        // Unquoted, as many clients send it.
        let h = with_type("multipart/related; boundary=abc; type=application/dicom");
        assert_eq!(boundary(&h).unwrap(), "abc");
        // Without `type` the parts are still taken as Part-10 files.
        assert_eq!(
            boundary(&with_type("Multipart/Related; boundary=x")).unwrap(),
            "x"
        );
        for refused in [
            "multipart/form-data; boundary=x",
            "application/dicom",
            "multipart/related; type=\"application/dicom+json\"; boundary=x",
            "multipart/related; type=\"application/dicom\"",
        ] {
            assert!(boundary(&with_type(refused)).is_err(), "{refused}");
        }
        assert!(boundary(&HeaderMap::new()).is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
