//! Logs and traces, set up once per process: pretty logs in a terminal, JSON lines
//! otherwise, and OTLP span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithHttpConfig;
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

/// The exporter's HTTP client: the exporter's own default (blocking, the standard
/// timeout variables), but proxied by [`crate::outbound::environment_proxy`], so a
/// developer's `HTTP_PROXY` does not take the spans for a collector on this host to a
/// proxy that cannot reach it. Built on a thread of its own, as the exporter builds its
/// default: a blocking client starts a runtime, which cannot be done inside another.
fn otlp_client() -> Result<reqwest::blocking::Client, TelemetryError> {
    let timeout = ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok()?.parse().ok())
        .map_or(std::time::Duration::from_secs(10), std::time::Duration::from_millis);
    let build = move || {
        let builder = reqwest::blocking::Client::builder().timeout(timeout);
        match crate::outbound::environment_proxy() {
            Some(proxy) => builder.proxy(proxy),
            None => builder,
        }
        .build()
    };
    std::thread::spawn(build)
        .join()
        .map_err(|_| TelemetryError::Exporter("building its HTTP client panicked".into()))?
        .map_err(|e| TelemetryError::Exporter(crate::outbound::unbuilt(&e)))
}

/// OTLP over HTTP/protobuf; endpoint, headers and batching follow the standard
/// `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables.
fn otlp_provider(service: &'static str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(otlp_client()?)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}
