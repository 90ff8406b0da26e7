//! The RPC span: every `dsreg.v1` call runs inside a span named after its method, a child of
//! the caller's W3C `traceparent` when it sent one, so a gateway's trace continues here (and,
//! through the event a publish writes, into the reconcile and the worker restart).

use std::task::{Context, Poll};

use tonic::codegen::http;

use tracing::Instrument;

/// Wraps the gRPC router so each call runs in its RPC span.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner }
    }
}

/// The service [`TraceLayer`] produces.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

/// The span of a call to `path`; `Span::none()` for health checks and reflection.
pub fn rpc_span(path: &str, traceparent: Option<&str>) -> tracing::Span {
    if !path.starts_with("/dsreg.v1.") {
        return tracing::Span::none();
    }
    let name = &path[1..];
    // `dsreg.v1.Service`, `Method`.
    let (service, method) = name.rsplit_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        "rpc",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        trace_id = tracing::field::Empty,
    );
    if let Some(traceparent) = traceparent {
        crate::telemetry::continue_trace(&span, traceparent);
    }
    span
}

impl<S, B> tower_service::Service<http::Request<B>> for Traced<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let traceparent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        let span = rpc_span(request.uri().path(), traceparent);
        self.inner.call(request).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registry_calls_get_a_span() {
        assert!(rpc_span("/grpc.health.v1.Health/Check", None).is_none());
        // With no subscriber the span is disabled either way; the point is that naming a
        // non-dsreg path never builds one.
        let _ = rpc_span("/dsreg.v1.Lifecycle/GetStatus", Some("garbage"));
    }
}
