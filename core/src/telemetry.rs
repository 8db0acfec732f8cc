//! Logs and traces, set up once per process: pretty logs in a terminal, JSON lines
//! otherwise, and OTLP span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Flushes exported spans when dropped; keep it alive for the life of `main`.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("hookyard: flushing traces failed: {error}");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.log_filter {0:?} is not a valid filter: {1}")]
    Filter(String, String),
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global subscriber is already installed: {0}")]
    AlreadySet(String),
}

/// Installs the global subscriber. `service` names the process in exported traces.
pub fn init(config: &TelemetryConfig, service: &'static str) -> Result<TelemetryGuard, TelemetryError> {
    // The OTLP exporter's HTTP client is built below.
    crate::outbound::install_tls_provider();
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => {
            EnvFilter::try_new(&env).map_err(|e| TelemetryError::Filter(env, e.to_string()))?
        }
        _ => EnvFilter::try_new(&config.log_filter)
            .map_err(|e| TelemetryError::Filter(config.log_filter.clone(), e.to_string()))?,
    };
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(std::io::stderr)
            .boxed()
    };

    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(otlp_provider(service)?),
        _ => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("hookyard")));

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// OTLP over HTTP/protobuf; endpoint, headers and batching follow the standard
/// `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables.
fn otlp_provider(service: &'static str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}
