//! Command-line option groups shared by every command.
//!
//! Every flag also reads an environment variable `RADFLOW_<FLAG>`, and the names are
//! the ones compose files, Kubernetes manifests and operators use. Groups are
//! flattened into each command, so `--nats-url` means the same thing everywhere.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, InProcBus, NatsBus, NatsOptions};
use crate::secret::Secret;
use crate::store::{Store, StoreError};
use crate::telemetry::LogFormat;

/// Where the bus is.
#[derive(Debug, Clone, Args)]
pub struct BusArgs {
    /// NATS server URL (e.g. nats://nats:4222; tls://nats:4222 requires TLS).
    /// Without it, `run` uses an in-process bus; single-component commands require it.
    #[arg(long, env = "RADFLOW_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS credentials file (.creds).
    #[arg(long, env = "RADFLOW_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user name.
    #[arg(long, env = "RADFLOW_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (prefer the environment variable or a creds file).
    #[arg(long, env = "RADFLOW_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,
    /// File holding the NATS password (e.g. a mounted Secret; trimmed), instead of
    /// --nats-password.
    #[arg(
        long,
        env = "RADFLOW_NATS_PASSWORD_FILE",
        value_name = "FILE",
        conflicts_with = "nats_password"
    )]
    pub nats_password_file: Option<PathBuf>,
    /// NATS token (prefer the environment variable).
    #[arg(long, env = "RADFLOW_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,
    /// CA certificate(s) that signed the NATS server's certificate (PEM), trusted
    /// instead of the system's; implies TLS required.
    #[arg(long, env = "RADFLOW_NATS_TLS_CA", value_name = "PEM file")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM, with its chain) for a NATS server that verifies
    /// clients (mutual TLS); needs --nats-tls-key, implies TLS required.
    #[arg(
        long,
        env = "RADFLOW_NATS_TLS_CERT",
        value_name = "PEM file",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// Private key of --nats-tls-cert (PEM); needs --nats-tls-cert.
    #[arg(
        long,
        env = "RADFLOW_NATS_TLS_KEY",
        value_name = "PEM file",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
    /// Replicas of streams and buckets when radflow creates them (3 on a cluster).
    #[arg(long, env = "RADFLOW_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
}

impl BusArgs {
    /// The connection options; reads the password file.
    pub fn options(&self, url: &str, name: &str) -> Result<NatsOptions, BusError> {
        let password = match (&self.nats_password, &self.nats_password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    BusError::Refused(format!(
                        "--nats-password-file {}: cannot read it: {e}",
                        path.display()
                    ))
                })?;
                Some(Secret::new(text.trim()))
            }
            (None, None) => None,
        };
        Ok(NatsOptions {
            url: url.to_owned(),
            name: name.to_owned(),
            creds_file: self.nats_creds.clone(),
            user: self.nats_user.clone(),
            password,
            token: self.nats_token.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            replicas: self.nats_replicas,
        })
    }

    /// NATS if a URL is set (waiting for it to come up), else the in-process bus.
    pub async fn connect_or_inproc(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Arc<dyn Bus>, BusError> {
        match &self.nats_url {
            Some(url) => Ok(Arc::new(
                NatsBus::connect_retrying(&self.options(url, name)?, cancel).await?,
            )),
            None => Ok(Arc::new(InProcBus::new())),
        }
    }

    /// NATS, required (single-component commands).
    pub async fn connect_nats(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Arc<NatsBus>, BusError> {
        let url = self.nats_url.as_deref().ok_or_else(|| {
            BusError::Refused(
                "this command needs --nats-url (or RADFLOW_NATS_URL); `radflow run` works without NATS"
                    .into(),
            )
        })?;
        Ok(Arc::new(
            NatsBus::connect_retrying(&self.options(url, name)?, cancel).await?,
        ))
    }

    /// NATS, required, for tools that run once: retried for at most `limit`, then the
    /// last error (an untrusted certificate, a wrong password) is the answer.
    pub async fn connect_nats_within(
        &self,
        name: &str,
        limit: std::time::Duration,
    ) -> Result<Arc<NatsBus>, BusError> {
        let url = self.nats_url.as_deref().ok_or_else(|| {
            BusError::Refused("this command needs --nats-url (or RADFLOW_NATS_URL)".into())
        })?;
        Ok(Arc::new(
            NatsBus::connect_within(&self.options(url, name)?, limit).await?,
        ))
    }
}

/// Where the store is.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Object store URL: file:///path, s3://bucket[/prefix] (AWS_* variables for
    /// endpoint and credentials), memory://. Default: the data folder.
    #[arg(long, env = "RADFLOW_STORE_URL")]
    pub store_url: Option<String>,
    /// Data folder of the embedded store.
    #[arg(long, env = "RADFLOW_DATA", default_value = "radflow-data")]
    pub data: PathBuf,
    /// Flush every write to disk before acknowledging it (file:// stores).
    #[arg(long, env = "RADFLOW_STORE_FSYNC", default_value_t = true, action = clap::ArgAction::Set)]
    pub store_fsync: bool,
}

impl StoreArgs {
    pub fn open(&self) -> Result<Store, StoreError> {
        match &self.store_url {
            Some(url) => Store::open(url, self.store_fsync),
            None => Store::local(&self.data, self.store_fsync),
        }
    }
}

/// The HTTP port for health and metrics.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Port of /healthz, /readyz and /metrics (0 picks a free one).
    #[arg(long, env = "RADFLOW_HTTP_PORT", default_value_t = 8080)]
    pub http_port: u16,
    /// Address the HTTP port binds to.
    #[arg(long, env = "RADFLOW_HTTP_ADDR", default_value = "0.0.0.0")]
    pub http_addr: String,
    /// `host:port` of its own for /metrics, /status, /dlq and the web page (e.g. loopback, or a
    /// monitoring network only); the HTTP port then serves only the probes (/healthz,
    /// /readyz) and the token-guarded replay. Unset: everything on the HTTP port.
    #[arg(long, env = "RADFLOW_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Token that `POST /dlq/replay` (embedded mode) requires as `Authorization: Bearer
    /// <token>`. Without one, replay over HTTP is off. Prefer the variable or
    /// --admin-token-file; never logged.
    #[arg(long, env = "RADFLOW_ADMIN_TOKEN")]
    pub admin_token: Option<Secret>,
    /// File holding the admin token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "RADFLOW_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<std::path::PathBuf>,
}

impl HttpArgs {
    /// The admin token, from the flag, the variable or the file (trimmed).
    pub fn admin_token(&self) -> std::io::Result<Option<Secret>> {
        if let Some(t) = &self.admin_token {
            return Ok(Some(t.clone()));
        }
        match &self.admin_token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("admin token file {}: {e}", path.display()),
                    )
                })?;
                Ok(Some(Secret::new(text.trim())))
            }
            None => Ok(None),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format: auto (JSON unless on a terminal), json, text.
    #[arg(long, env = "RADFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Log filter in RUST_LOG syntax.
    #[arg(long, env = "RADFLOW_LOG", default_value = "info,ort=warn")]
    pub log: String,
    /// OTLP/HTTP collector to export spans to (e.g. http://otel-collector:4318).
    #[arg(long, env = "RADFLOW_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// The model registry.
#[derive(Debug, Clone, Args)]
pub struct ModelsArgs {
    /// Model registry file (models.toml). Default: the built-in demo model.
    #[arg(long, env = "RADFLOW_MODELS")]
    pub models: Option<PathBuf>,
}
