//! W3C trace context across NATS: ingest writes the `traceparent` of the span that
//! received a webhook into its envelope, the router continues that trace and writes its
//! own into each routed event, so one trace follows a webhook through the pipeline.
//! Without an OpenTelemetry exporter configured there is no trace, and nothing is written.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// The current span's `traceparent`, when it belongs to an exported trace.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the trace `traceparent` names (a malformed one is ignored),
/// and records the trace id in the span's `trace_id` field.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Writes the span's trace id into its `trace_id` field (declared `Empty`), so that
/// every log line written inside it carries the id. Nothing when nothing is traced.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt as _;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_trace_continues_across_a_message() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_traceparent(), None, "no span, no trace");
            let ingest = tracing::info_span!("receive_webhook");
            let sent = ingest.in_scope(current_traceparent).expect("a traceparent");
            assert_eq!(sent.len(), 55, "{sent}");
            assert!(sent.starts_with("00-"));

            let router = tracing::info_span!("route_webhook");
            continue_trace(&router, Some(&sent));
            let received = router.in_scope(current_traceparent).unwrap();
            assert_eq!(received[3..35], sent[3..35], "the same trace id");
            assert_ne!(received[36..52], sent[36..52], "a new span in it");

            let stray = tracing::info_span!("other");
            continue_trace(&stray, Some("garbage"));
            let own = stray.in_scope(current_traceparent).unwrap();
            assert_ne!(own[3..35], sent[3..35]);
        });
    }
}
