//! Logs and traces, set up in one function for every command.
//!
//! Human-readable lines on a terminal, JSON lines otherwise (containers, CI), so log
//! collectors get fields (stage, correlation_id, subject…) without parsing text. With
//! an OTLP endpoint, spans (one per message handled, one per DICOM association, with
//! the series' correlation id as an attribute) are also exported over OTLP/HTTP to a
//! collector (Jaeger, Tempo, the OpenTelemetry Collector).

use std::io::IsTerminal;

use clap::ValueEnum;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// JSON unless standard error is a terminal.
    #[default]
    Auto,
    Json,
    Text,
}

/// Keeps the trace exporter alive; flushes buffered spans when dropped.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("radflow: flushing traces failed: {e}");
        }
    }
}

/// The URL spans are posted to: `<endpoint>/v1/traces` unless the endpoint already
/// names that path.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (e.g.
/// `info,radflow_listener=debug`); `otlp_endpoint` (e.g. `http://collector:4318`)
/// turns on span export for `service`. Safe to call twice (the second call only
/// returns a guard).
pub fn init(
    format: LogFormat,
    filter: &str,
    otlp_endpoint: Option<&str>,
    service: &str,
) -> TelemetryGuard {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let logs = if json {
        fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let provider = otlp_endpoint.and_then(|endpoint| {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(traces_url(endpoint))
            .build();
        match exporter {
            Ok(exporter) => Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service.to_owned())
                            .build(),
                    )
                    .build(),
            ),
            Err(e) => {
                eprintln!("radflow: OTLP export disabled: {e}");
                None
            }
        }
    });
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("radflow"))
            .boxed()
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init();
    TelemetryGuard { provider }
}

#[cfg(test)]
mod tests {
    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            super::traces_url("http://c:4318"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://c:4318/"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
