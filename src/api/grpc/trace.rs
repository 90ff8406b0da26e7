//! The RPC span: every `dsreg.v1` call runs inside a `tracing` span that follows
//! OpenTelemetry's RPC conventions (`rpc.system`, `rpc.service`, `rpc.method`,
//! `rpc.grpc.status_code`, `server.address`, `network.peer.address`), named after its method
//! and a child of the caller's W3C `traceparent` / `tracestate` when it sent them, so a
//! gateway's trace continues here (and, through the event a publish writes, into the
//! reconcile and the worker restart).
//!
//! It is a span like every other: its log lines carry its fields, and when spans are exported
//! the `tracing-opentelemetry` layer turns it into the call's server span, with the spans made
//! inside the call as its children. The span ends when the call is answered (a stream's
//! messages follow on their own).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

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

/// The address of the peer of `request`, as the transport knows it.
fn peer_of<B>(request: &http::Request<B>) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// The RPC span of `request`, a call to the RPC named `name`.
fn rpc_span<B>(name: &'static str, request: &http::Request<B>) -> tracing::Span {
    // `dsreg.v1.Service`, `Method`.
    let (service, method) = name.rsplit_once('/').unwrap_or((name, ""));
    let server = request.uri().host().or_else(|| {
        request
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(|host| host.rsplit_once(':').map_or(host, |(h, _)| h))
    });
    let peer = peer_of(request);
    let span = tracing::info_span!(
        target: crate::telemetry::otel::RPC_TARGET,
        "rpc",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        server.address = server,
        network.peer.address = peer.map(|p| tracing::field::display(p.ip())),
        network.peer.port = peer.map(|p| p.port()),
        trace_id = tracing::field::Empty,
    );
    if !span.is_disabled() && request.headers().contains_key("traceparent") {
        let _ = span.set_parent(crate::telemetry::context_of_headers(request.headers()));
    }
    span
}

/// A call's RPC span, ended with the call's status code when the call is answered, or as
/// `CANCELLED` when the call is dropped unanswered (the caller went away).
#[derive(Debug)]
struct CallSpan {
    span: tracing::Span,
    answered: bool,
}

impl CallSpan {
    fn answered(mut self, code: tonic::Code) {
        record(&self.span, code);
        self.answered = true;
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if !self.answered {
            record(&self.span, tonic::Code::Cancelled);
        }
    }
}

/// Records a call's status code on its span; a code the server is to blame for makes the
/// span an error (OpenTelemetry's RPC conventions).
fn record(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i64);
    if server_failed(code) {
        span.record("otel.status_code", "error");
    }
}

/// Whether a server answering with `code` failed, rather than its caller.
fn server_failed(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

pin_project_lite::pin_project! {
    /// A call's future, run inside its span; the span ends when the call is answered or the
    /// future is dropped.
    pub struct TracedFuture<F> {
        #[pin]
        inner: F,
        span: Option<CallSpan>,
    }
}

impl<F, B, E> Future for TracedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let polled = match this.span.as_ref() {
            Some(call) => call.span.in_scope(|| this.inner.poll(cx)),
            None => this.inner.poll(cx),
        };
        if let Poll::Ready(answer) = &polled
            && let Some(span) = this.span.take()
        {
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
                inner: self.inner.call(request),
                span: None,
            };
        };
        let span = rpc_span(name, &request);
        // The inner services (auth, limits, the method) start inside the span.
        let inner = span.in_scope(|| self.inner.call(request));
        TracedFuture {
            inner,
            span: Some(CallSpan {
                span,
                answered: false,
            }),
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

    #[test]
    fn a_call_the_server_failed_is_an_error_and_one_the_caller_got_wrong_is_not() {
        use tonic::Code;
        for code in [
            Code::Ok,
            Code::NotFound,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::Cancelled,
        ] {
            assert!(!server_failed(code), "{code:?}");
        }
        for code in [Code::Unavailable, Code::Internal, Code::Unknown] {
            assert!(server_failed(code), "{code:?}");
        }
    }
}
