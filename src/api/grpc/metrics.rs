//! The RPC metrics layer: one tower middleware around the gRPC router (outside the auth layer,
//! so denials count too) that reports every call's method, status code and duration to
//! [`Metrics`].
//!
//! The code is the `grpc-status` of the response: from its headers for a trailers-only
//! response (every error tonic or the auth layer answers with), else from its trailers at the
//! end of the body. A server-streaming or bidirectional call is counted when its response
//! starts, as `OK` unless it failed at once, so a long watch shows up when it begins. A unary
//! response dropped before its trailers (the client went away) counts as `CANCELLED`.
//!
//! Methods are labelled by their path when the served descriptor sets (`dsreg.v1`, health,
//! reflection) define them, and as `other` otherwise, so callers cannot grow the series. The
//! layer holds no background state: it stops with the server.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message;
use tonic::Code;
use tonic::codegen::http;
use tower_service::Service;

use crate::telemetry::metrics::Metrics;

/// The label of a path no served service defines.
pub const OTHER_METHOD: &str = "other";

/// Every served method's path, and whether its response streams.
static METHODS: LazyLock<HashMap<String, bool>> = LazyLock::new(|| {
    let mut methods = HashMap::new();
    for encoded in [
        super::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        // The descriptor sets are compiled into the binary; one that does not decode is a
        // build defect, not a runtime condition.
        let set = prost_types::FileDescriptorSet::decode(encoded)
            .expect("a compiled-in descriptor set decodes");
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    let streams = method.server_streaming() || method.client_streaming();
                    methods.insert(path, streams);
                }
            }
        }
    }
    methods
});

/// The label of `path` and whether its response streams.
fn method_of(path: &str) -> (&'static str, bool) {
    match METHODS.get_key_value(path) {
        Some((path, streams)) => (path.as_str(), *streams),
        None => (OTHER_METHOD, false),
    }
}

/// The `grpc-status` in `headers` (response headers or trailers), if any.
fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from)
}

/// The tower layer: `Server::builder().layer(RpcMetricsLayer::new(metrics))`.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Metrics,
}

impl RpcMetricsLayer {
    /// A layer reporting to `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

/// A boxed, sendable future.
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> Service<http::Request<B>> for RpcMetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: http_body::Body + Unpin + Send + 'static,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (method, streams) = method_of(request.uri().path());
        let call = Call {
            metrics: self.metrics.clone(),
            method,
            started: Instant::now(),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(e) => {
                    call.done(Code::Unknown);
                    return Err(e);
                }
            };
            let pending = match status_in(response.headers()) {
                Some(code) => {
                    call.done(code);
                    None
                }
                None if streams => {
                    call.done(Code::Ok);
                    None
                }
                None => Some(call),
            };
            Ok(response.map(|inner| MeteredBody { inner, pending }))
        })
    }
}

/// One call being measured.
#[derive(Debug)]
struct Call {
    metrics: Metrics,
    method: &'static str,
    started: Instant,
}

impl Call {
    fn done(self, code: Code) {
        self.metrics.rpc_handled(
            self.method,
            super::status::code_name(code),
            self.started.elapsed(),
        );
    }
}

/// A response body that reports its call when the trailers pass (or when it ends without
/// them, or is dropped first).
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    pending: Option<Call>,
}

impl<B> MeteredBody<B> {
    fn finish(&mut self, code: Code) {
        if let Some(call) = self.pending.take() {
            call.done(code);
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(Code::Unknown),
            // A body that ends without a status broke the protocol.
            Poll::Ready(None) => self.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_are_known_with_their_streaming() {
        assert_eq!(
            method_of("/dsreg.v1.Datasources/PublishVersion"),
            ("/dsreg.v1.Datasources/PublishVersion", false)
        );
        assert_eq!(
            method_of("/dsreg.v1.Lifecycle/WatchStatus"),
            ("/dsreg.v1.Lifecycle/WatchStatus", true)
        );
        assert_eq!(
            method_of("/grpc.health.v1.Health/Check"),
            ("/grpc.health.v1.Health/Check", false)
        );
        assert_eq!(
            method_of("/grpc.health.v1.Health/Watch"),
            ("/grpc.health.v1.Health/Watch", true)
        );
        assert!(method_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").1);
        assert_eq!(
            method_of("/dsreg.v1.Datasources/DropEverything"),
            (OTHER_METHOD, false)
        );
        assert_eq!(method_of("/"), (OTHER_METHOD, false));
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(crate::api::grpc::status::code_name(Code::Ok), "OK");
        assert_eq!(
            crate::api::grpc::status::code_name(Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_in(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(status_in(&headers), Some(Code::NotFound));
    }
}
