//! The auth layer: one tower middleware around the gRPC router that authenticates every
//! `dsreg.v1` request, checks its role against [`required_role`], and puts the caller's
//! [`Principal`] in the request's extensions (services read it with
//! `request.extensions().get::<Principal>()`).
//!
//! Health (`grpc.health.v1.Health`) and reflection (`grpc.reflection.*`) pass without a token.
//! Every other path needs a token and a permission in the table; a path that has none is
//! refused, so a new service or method fails closed until it is added to the table.
//!
//! Every denial goes to a [`DenialSink`] (the service writes `audit_log`) before the
//! `UNAUTHENTICATED` or `PERMISSION_DENIED` response leaves. The layer holds no background
//! state: it stops with the server.
//!
//! ```ignore
//! tonic::transport::Server::builder()
//!     .layer(AuthLayer::new(authenticator, sink))
//!     .add_service(...)
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tonic::codegen::http;
use tower_service::Service;

use super::auth::{Attempt, Authenticator, Denied, required_role};
use super::principal::Principal;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A refused request, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The token's verified `sub`, or `"anonymous"` when the token did not verify.
    pub actor: String,
    /// The method name, e.g. `PublishVersion`.
    pub action: String,
    /// The full gRPC path, e.g. `/dsreg.v1.Datasources/PublishVersion`.
    pub resource: String,
    /// Why, for the audit (an unauthenticated client is told only
    /// [`super::auth::UNAUTHENTICATED_MESSAGE`]).
    pub reason: String,
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`.
    pub code: tonic::Code,
    /// The client's address, when the transport knows it.
    pub peer: Option<String>,
    /// The trace id of a well-formed W3C `traceparent` header.
    pub trace_id: Option<String>,
}

/// Where denials are recorded. The service writes them to `audit_log`; the layer awaits
/// [`DenialSink::record`] before answering, so a sink should bound its own time (a slow sink
/// delays only denied requests).
pub trait DenialSink: Send + Sync + 'static {
    /// Records one denial.
    fn record(&self, denial: Denial) -> BoxFuture<()>;
}

impl<F> DenialSink for F
where
    F: Fn(Denial) -> BoxFuture<()> + Send + Sync + 'static,
{
    fn record(&self, denial: Denial) -> BoxFuture<()> {
        self(denial)
    }
}

/// A sink that only logs denials (at `warn`), for setups without an audit table.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogDenials;

impl DenialSink for LogDenials {
    fn record(&self, denial: Denial) -> BoxFuture<()> {
        tracing::warn!(
            actor = %denial.actor,
            action = %denial.action,
            resource = %denial.resource,
            reason = %denial.reason,
            code = ?denial.code,
            peer = denial.peer.as_deref().unwrap_or(""),
            trace_id = denial.trace_id.as_deref().unwrap_or(""),
            "grpc.denied"
        );
        Box::pin(std::future::ready(()))
    }
}

/// The tower layer: `Server::builder().layer(AuthLayer::new(authenticator, sink))`.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

struct Shared {
    authenticator: Authenticator,
    sink: Arc<dyn DenialSink>,
}

impl AuthLayer {
    /// A layer that authenticates with `authenticator` and records denials in `sink`.
    pub fn new(authenticator: Authenticator, sink: Arc<dyn DenialSink>) -> Self {
        Self {
            shared: Arc::new(Shared {
                authenticator,
                sink,
            }),
        }
    }
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("authenticator", &self.shared.authenticator)
            .finish_non_exhaustive()
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service [`AuthLayer`] wraps around the router.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for AuthService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService").finish_non_exhaustive()
    }
}

impl<S, B, R> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    /// Accepted requests go straight to the inner future; denials and requests waiting for a
    /// key re-read are boxed.
    type Future = Either<S::Future, BoxFuture<Result<http::Response<R>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if passes_without_auth(path) {
            return Either::Left(self.inner.call(request));
        }
        let attempt = match authorization_of(&request) {
            Ok(authorization) => self.shared.authenticator.try_authenticate(authorization),
            Err(denied) => Attempt::Done(Err(denied)),
        };
        match attempt {
            Attempt::Done(result) => match result.and_then(|p| permitted(p, path)) {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    Either::Left(self.inner.call(request))
                }
                Err(denied) => Either::Right(self.deny(&request, denied)),
            },
            Attempt::NeedsKey(wait) => {
                // The service polled ready is the one that must be called: keep it, leave a
                // clone in its place (the tower pattern for calling from a future).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let shared = Arc::clone(&self.shared);
                Either::Right(Box::pin(async move {
                    let path = request.uri().path().to_owned();
                    match wait.finish().await.and_then(|p| permitted(p, &path)) {
                        Ok(principal) => {
                            request.extensions_mut().insert(principal);
                            inner.call(request).await
                        }
                        Err(denied) => {
                            let recorded = shared.sink.record(denial_of(&request, &denied));
                            recorded.await;
                            Ok(tonic::Status::from(denied).into_http())
                        }
                    }
                }))
            }
        }
    }
}

impl<S> AuthService<S> {
    fn deny<B, R, E>(
        &self,
        request: &http::Request<B>,
        denied: Denied,
    ) -> BoxFuture<Result<http::Response<R>, E>>
    where
        R: Default + Send + 'static,
        E: Send + 'static,
    {
        let recorded = self.shared.sink.record(denial_of(request, &denied));
        Box::pin(async move {
            recorded.await;
            Ok(tonic::Status::from(denied).into_http())
        })
    }
}

fn passes_without_auth(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The `authorization` metadata, if any.
fn authorization_of<B>(request: &http::Request<B>) -> Result<Option<&str>, Denied> {
    match request.headers().get(http::header::AUTHORIZATION) {
        None => Ok(None),
        Some(value) => value.to_str().map(Some).map_err(|_| {
            Denied::Unauthenticated(
                "the authorization metadata must be `Bearer <token>` in ASCII".to_owned(),
            )
        }),
    }
}

/// Checks the caller's role for the path.
fn permitted(principal: Principal, path: &str) -> Result<Principal, Denied> {
    let Some(needed) = required_role(path) else {
        return Err(Denied::permission_denied(
            "this method has no permission defined; it is refused",
            Some(principal.subject),
        ));
    };
    if principal.role < needed {
        return Err(Denied::permission_denied(
            format!(
                "{} needs {needed}; the token grants {}",
                method_name(path),
                principal.role
            ),
            Some(principal.subject),
        ));
    }
    Ok(principal)
}

/// The caller's address, over plaintext or TLS.
pub fn peer_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
}

/// `PublishVersion` of `/dsreg.v1.Datasources/PublishVersion`.
fn method_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, method)| method)
}

fn denial_of<B>(request: &http::Request<B>, denied: &Denied) -> Denial {
    let path = request.uri().path();
    let peer = peer_addr(request.extensions()).map(|addr| addr.to_string());
    let trace_id = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id_of);
    Denial {
        actor: denied.subject().unwrap_or("anonymous").to_owned(),
        action: method_name(path).to_owned(),
        resource: path.to_owned(),
        reason: denied.message().to_owned(),
        code: denied.code(),
        peer,
        trace_id,
    }
}

/// The trace id of a well-formed W3C `traceparent`, as the one trace-context parser reads it.
fn trace_id_of(traceparent: &str) -> Option<String> {
    let sc = crate::telemetry::span_context(traceparent, None);
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use serde_json::json;
    use tonic::Code;
    use tower_layer::Layer;

    use super::super::auth::issue_token;
    use super::super::pb;
    use super::super::principal::{Role, Tenant};
    use super::*;

    const SECRET: &[u8] = b"layer-test-secret-layer-test-secret-0123";
    const ISSUER: &str = "https://issuer.example";
    const AUDIENCE: &str = "dsreg-test";
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    /// Answers with the principal it was given, in the response's extensions.
    #[derive(Clone, Default)]
    struct Echo {
        calls: Arc<Mutex<u32>>,
    }

    impl<B> Service<http::Request<B>> for Echo {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<B>) -> Self::Future {
            *self.calls.lock().unwrap() += 1;
            let mut response = http::Response::new(tonic::body::Body::default());
            if let Some(principal) = request.extensions().get::<Principal>() {
                response.extensions_mut().insert(principal.clone());
            }
            std::future::ready(Ok(response))
        }
    }

    #[derive(Clone, Default)]
    struct MemorySink {
        denials: Arc<Mutex<Vec<Denial>>>,
    }

    impl DenialSink for MemorySink {
        fn record(&self, denial: Denial) -> BoxFuture<()> {
            let denials = Arc::clone(&self.denials);
            Box::pin(async move { denials.lock().unwrap().push(denial) })
        }
    }

    impl MemorySink {
        fn taken(&self) -> Vec<Denial> {
            std::mem::take(&mut *self.denials.lock().unwrap())
        }
    }

    fn token(role: &str) -> String {
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        issue_token(
            SECRET,
            &json!({"sub": "alice", "roles": [role], "org": "acme", "projects": ["web"],
                    "iss": ISSUER, "aud": AUDIENCE, "exp": exp}),
        )
    }

    fn request(path: &str, authorization: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"));
        if let Some(value) = authorization {
            builder = builder.header("authorization", value);
        }
        builder.body(()).unwrap()
    }

    struct Harness {
        service: AuthService<Echo>,
        sink: MemorySink,
        echo: Echo,
    }

    fn harness(authenticator: Authenticator) -> Harness {
        let sink = MemorySink::default();
        let echo = Echo::default();
        let service = AuthLayer::new(authenticator, Arc::new(sink.clone())).layer(echo.clone());
        Harness {
            service,
            sink,
            echo,
        }
    }

    impl Harness {
        async fn send(
            &mut self,
            path: &str,
            authorization: Option<&str>,
        ) -> http::Response<tonic::body::Body> {
            std::future::poll_fn(|cx| {
                Service::<http::Request<()>>::poll_ready(&mut self.service, cx)
            })
            .await
            .unwrap();
            self.service
                .call(request(path, authorization))
                .await
                .unwrap()
        }

        fn calls(&self) -> u32 {
            *self.echo.calls.lock().unwrap()
        }
    }

    /// The gRPC status of a trailers-only response, or `None` for a response of the service.
    fn status_of(response: &http::Response<tonic::body::Body>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(response.headers())
    }

    const GET_STATUS: &str = "/dsreg.v1.Lifecycle/GetStatus";
    const PUBLISH: &str = "/dsreg.v1.Datasources/PublishVersion";

    #[tokio::test]
    async fn an_allowed_request_reaches_the_service_with_its_principal() {
        let mut h = harness(Authenticator::hs256(SECRET, ISSUER, AUDIENCE));
        let header = format!("Bearer {}", token("datasource:viewer"));
        let response = h.send(GET_STATUS, Some(&header)).await;
        assert!(status_of(&response).is_none());
        assert_eq!(
            response.extensions().get::<Principal>(),
            Some(&Principal {
                subject: "alice".into(),
                role: Role::Viewer,
                tenant: Tenant::Org {
                    org: "acme".into(),
                    projects: Some(vec!["web".into()])
                },
            })
        );
        let admin = format!("Bearer {}", token("datasource:admin"));
        let response = h.send(PUBLISH, Some(&admin)).await;
        assert!(status_of(&response).is_none());
        assert_eq!(h.calls(), 2);
        assert!(h.sink.taken().is_empty());
    }

    #[tokio::test]
    async fn bad_credentials_are_unauthenticated_and_audited_as_anonymous() {
        let mut h = harness(Authenticator::hs256(SECRET, ISSUER, AUDIENCE));
        let wrong_key = issue_token(
            b"some-other-secret-some-other-secret-000",
            &json!({"sub": "mallory", "roles": ["datasource:admin"], "org": "*",
                    "iss": ISSUER, "aud": AUDIENCE,
                    "exp": jsonwebtoken::get_current_timestamp() + 600}),
        );
        let wrong_key = format!("Bearer {wrong_key}");
        let cases: [(Option<&str>, &str); 5] = [
            (None, "missing authorization"),
            (Some("Basic eDp5"), "Bearer <token>"),
            (Some("Bearer"), "Bearer <token>"),
            (Some("Bearer garbage"), "not a well-formed JWT"),
            (Some(&wrong_key), "signature does not verify"),
        ];
        for (header, needle) in cases {
            let response = h.send(GET_STATUS, header).await;
            let status = status_of(&response).expect("a denial");
            assert_eq!(status.code(), Code::Unauthenticated, "{header:?}");
            // One answer for every failure; the reason is in the audit only.
            assert_eq!(
                status.message(),
                super::super::auth::UNAUTHENTICATED_MESSAGE
            );
            let denials = h.sink.taken();
            assert!(
                denials[0].reason.contains(needle),
                "{header:?}: {denials:?}"
            );
            assert_eq!(
                denials,
                [Denial {
                    actor: "anonymous".into(),
                    action: "GetStatus".into(),
                    resource: GET_STATUS.into(),
                    reason: denials[0].reason.clone(),
                    code: Code::Unauthenticated,
                    peer: None,
                    trace_id: Some(TRACE_ID.into()),
                }],
                "{header:?}"
            );
        }
        assert_eq!(h.calls(), 0);
    }

    #[tokio::test]
    async fn a_role_too_low_is_permission_denied_naming_the_role_needed() {
        let mut h = harness(Authenticator::hs256(SECRET, ISSUER, AUDIENCE));
        let viewer = format!("Bearer {}", token("datasource:viewer"));
        let response = h.send(PUBLISH, Some(&viewer)).await;
        let status = status_of(&response).expect("a denial");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "PublishVersion needs datasource:admin; the token grants datasource:viewer"
        );
        let operator = format!("Bearer {}", token("datasource:operator"));
        let response = h.send("/dsreg.v1.Secrets/PutSecret", Some(&operator)).await;
        assert_eq!(status_of(&response).unwrap().code(), Code::PermissionDenied);
        let response = h.send("/dsreg.v1.Harness/RunTest", Some(&operator)).await;
        assert!(status_of(&response).is_none());

        let denials = h.sink.taken();
        assert_eq!(denials.len(), 2);
        assert_eq!(denials[0].actor, "alice");
        assert_eq!(denials[0].action, "PublishVersion");
        assert_eq!(denials[0].resource, PUBLISH);
        assert_eq!(denials[0].code, Code::PermissionDenied);
        assert_eq!(denials[1].action, "PutSecret");
        assert_eq!(h.calls(), 1);
    }

    #[tokio::test]
    async fn a_token_without_a_datasource_role_is_denied_and_audited_with_its_subject() {
        let mut h = harness(Authenticator::hs256(SECRET, ISSUER, AUDIENCE));
        let header = format!("Bearer {}", token("billing:admin"));
        let response = h.send(GET_STATUS, Some(&header)).await;
        let status = status_of(&response).unwrap();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "the token grants no datasource role");
        assert_eq!(h.sink.taken()[0].actor, "alice");
    }

    #[tokio::test]
    async fn unknown_methods_are_refused_even_for_admins() {
        let mut h = harness(Authenticator::hs256(SECRET, ISSUER, AUDIENCE));
        let admin = format!("Bearer {}", token("datasource:admin"));
        for path in ["/dsreg.v1.Datasources/DropEverything", "/other.v1.Thing/Do"] {
            let response = h.send(path, Some(&admin)).await;
            assert_eq!(status_of(&response).unwrap().code(), Code::PermissionDenied);
        }
        // Even with authentication off.
        let mut open = harness(Authenticator::insecure());
        let response = open
            .send("/dsreg.v1.Datasources/DropEverything", None)
            .await;
        assert_eq!(status_of(&response).unwrap().code(), Code::PermissionDenied);
        assert_eq!(h.calls() + open.calls(), 0);
        assert_eq!(h.sink.taken().len(), 2);
        assert_eq!(open.sink.taken()[0].actor, "anonymous");
    }

    #[tokio::test]
    async fn health_and_reflection_pass_without_a_token() {
        let mut h = harness(Authenticator::hs256(SECRET, ISSUER, AUDIENCE));
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let response = h.send(path, None).await;
            assert!(status_of(&response).is_none(), "{path}");
            assert!(response.extensions().get::<Principal>().is_none());
        }
        assert_eq!(h.calls(), 4);
        assert!(h.sink.taken().is_empty());
    }

    #[tokio::test]
    async fn with_auth_off_every_request_is_an_admin_of_every_tenant() {
        let mut h = harness(Authenticator::insecure());
        let response = h.send(PUBLISH, None).await;
        assert!(status_of(&response).is_none());
        assert_eq!(
            response.extensions().get::<Principal>(),
            Some(&Principal::insecure())
        );
    }

    #[test]
    fn trace_ids_come_only_from_well_formed_traceparents() {
        let good = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
        assert_eq!(trace_id_of(&good).as_deref(), Some(TRACE_ID));
        assert_eq!(
            trace_id_of(&format!("01-{TRACE_ID}-00f067aa0ba902b7-01-future")).as_deref(),
            Some(TRACE_ID)
        );
        for bad in [
            String::new(),
            "garbage".to_owned(),
            format!("00-{TRACE_ID}-00f067aa0ba902b7-01-extra"),
            format!("ff-{TRACE_ID}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", TRACE_ID.to_uppercase()),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
            format!("00-{TRACE_ID}-0000000000000000-01"),
            format!("00-{TRACE_ID}-00f067aa0ba902b7-0x"),
            format!("00_{TRACE_ID}_00f067aa0ba902b7_01"),
        ] {
            assert_eq!(trace_id_of(&bad), None, "{bad}");
        }
    }

    /// Reports the caller's subject as its instance id.
    struct WhoAmI;

    #[tonic::async_trait]
    impl pb::registry_server::Registry for WhoAmI {
        async fn get_info(
            &self,
            request: tonic::Request<pb::GetInfoRequest>,
        ) -> Result<tonic::Response<pb::GetInfoResponse>, tonic::Status> {
            let principal = request
                .extensions()
                .get::<Principal>()
                .ok_or_else(|| tonic::Status::internal("no principal"))?;
            Ok(tonic::Response::new(pb::GetInfoResponse {
                version: String::new(),
                instance_id: principal.subject.clone(),
                schema_version: 0,
            }))
        }

        async fn get_registry_metrics(
            &self,
            _request: tonic::Request<pb::GetRegistryMetricsRequest>,
        ) -> Result<tonic::Response<pb::RegistryMetrics>, tonic::Status> {
            Err(tonic::Status::unimplemented("GetRegistryMetrics"))
        }

        async fn list_instances(
            &self,
            _request: tonic::Request<pb::ListInstancesRequest>,
        ) -> Result<tonic::Response<pb::ListInstancesResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("ListInstances"))
        }
    }

    #[tokio::test]
    async fn a_tonic_server_behind_the_layer_sees_the_principal_and_denials_name_the_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = MemorySink::default();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .layer(AuthLayer::new(
                Authenticator::hs256(SECRET, ISSUER, AUDIENCE),
                Arc::new(sink.clone()),
            ))
            .add_service(pb::registry_server::RegistryServer::new(WhoAmI))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown.clone().cancelled_owned(),
            );
        let server = tokio::spawn(server);

        let mut client = pb::registry_client::RegistryClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut call = tonic::Request::new(pb::GetInfoRequest {});
        call.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token("datasource:viewer"))
                .parse()
                .unwrap(),
        );
        let info = client.get_info(call).await.unwrap().into_inner();
        assert_eq!(info.instance_id, "alice");

        let status = client
            .get_info(tonic::Request::new(pb::GetInfoRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        let denials = sink.taken();
        assert_eq!(denials.len(), 1);
        let peer = denials[0].peer.as_deref().expect("the peer address");
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
