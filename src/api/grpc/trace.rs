//! The RPC span: every `dsreg.v1` call runs inside a span named after its method, a child of
//! the caller's W3C `traceparent` when it sent one, so a gateway's trace continues here (and,
//! through the event a publish writes, into the reconcile and the worker restart).
//!
//! Two spans serve it. A `tracing` span holds the call's fields for its log lines; when spans
//! are exported, a compact OpenTelemetry span ([`crate::telemetry::rpc`]) is what the collector
//! receives, and its context is attached while the call's future runs, so the spans and events
//! made inside continue its trace.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;

use tracing::Instrument;

use crate::telemetry::rpc::OpenSpan;

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

/// The name of a span for a call to `path` that no served method has.
const UNKNOWN: &str = "dsreg.v1/_OTHER";

/// The span name of a call to `path` (`dsreg.v1.Service/Method`, a `'static` string); `None`
/// for health checks and reflection, which get no span.
fn span_name(path: &str) -> Option<&'static str> {
    if !path.starts_with("/dsreg.v1.") {
        return None;
    }
    Some(super::auth::known_path(path).map_or(UNKNOWN, |p| &p[1..]))
}

/// The `tracing` span of a call to the RPC named `name`: the fields its log lines carry.
fn log_span(name: &'static str) -> tracing::Span {
    // `dsreg.v1.Service`, `Method`.
    let (service, method) = name.rsplit_once('/').unwrap_or((name, ""));
    tracing::info_span!(
        target: crate::telemetry::otel::RPC_TARGET,
        "rpc",
        rpc.service = service,
        rpc.method = method,
        trace_id = tracing::field::Empty,
    )
}

pin_project_lite::pin_project! {
    /// A call's future, run inside its spans; the OpenTelemetry span ends when it completes
    /// or is dropped.
    pub struct TracedFuture<F> {
        #[pin]
        inner: tracing::instrument::Instrumented<F>,
        span: Option<OpenSpan>,
    }
}

impl<F, B, E> Future for TracedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let attached = this.span.as_ref().map(|s| s.context().clone().attach());
        let polled = this.inner.poll(cx);
        drop(attached);
        if let Poll::Ready(answer) = &polled
            && let Some(span) = this.span.take()
        {
            // Ends the span: the call is answered (a stream's messages follow on their own).
            span.answered(code(answer));
        }
        polled
    }
}

/// The gRPC status code of an answer. A failed call is answered with its status in the
/// headers (a trailers-only response); one that succeeds sends its status after its message,
/// in trailers that come after the span ends, so an answer without one is OK.
fn code<B, E>(answer: &Result<http::Response<B>, E>) -> tonic::Code {
    let Ok(response) = answer else {
        return tonic::Code::Unknown;
    };
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for Traced<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TracedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(name) = span_name(request.uri().path()) else {
            return TracedFuture {
                inner: self.inner.call(request).instrument(tracing::Span::none()),
                span: None,
            };
        };
        let traceparent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        let span = crate::telemetry::rpc::start(name, traceparent);
        TracedFuture {
            inner: self.inner.call(request).instrument(log_span(name)),
            span,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registry_calls_get_a_span_and_unknown_methods_share_one_name() {
        assert_eq!(span_name("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            span_name("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(
            span_name("/dsreg.v1.Lifecycle/GetStatus"),
            Some("dsreg.v1.Lifecycle/GetStatus")
        );
        assert_eq!(
            span_name("/dsreg.v1.Datasources/DropEverything"),
            Some(UNKNOWN)
        );
        assert_eq!(
            span_name(&format!("/dsreg.v1.{}", "x".repeat(10_000))),
            Some(UNKNOWN)
        );
    }
}
