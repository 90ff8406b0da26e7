//! The gRPC port: the `dsreg.v1` services, standard gRPC health and reflection, behind the
//! auth layer (one place for authentication and RBAC) and the RPC metrics layer. Generated
//! code stays in [`pb`]. Served until the shutdown token is cancelled; health flips to
//! NOT_SERVING first.

pub mod audit;
pub mod auditor;
pub mod auth;
pub mod call;
pub mod catalog;
pub mod codec;
pub mod convert;
pub mod datasources;
pub mod dead_letters;
pub mod events;
pub mod feed;
pub mod harness;
pub mod idp;
pub mod layer;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod page;
pub mod positions;
pub mod principal;
pub mod reads;
pub mod secrets;
pub mod status;
pub mod trace;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::connectors::Catalog;
use crate::outbox::Activity;
use crate::outbox::listener::ListenerStats;
use crate::transform::Limits;

/// Generated protobuf types and service stubs for `dsreg.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("dsreg.v1");

    /// The encoded descriptors of `dsreg.v1`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/dsreg_descriptor.bin"));
}

/// Largest request message accepted (a 1 MiB config plus its envelope); larger ones are
/// refused before they are buffered.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// The largest header list a call may carry: above the longest token the auth layer reads
/// (8 KiB), so an oversized `authorization` is refused on its call (UNAUTHENTICATED, audited);
/// larger lists are answered RESOURCE_EXHAUSTED on their call
/// ([`limits::HeaderSizeLayer`]).
pub const MAX_HEADER_LIST_BYTES: usize = 64 * 1024;

/// The largest header list the HTTP/2 transport decodes: beyond it (up to four times it) the
/// stream is refused (HTTP 431 and REFUSED_STREAM) and the connection serves on; beyond four
/// times it, HTTP/2's abuse guard closes the connection. So an 8 MB header is refused on its
/// stream, not by closing the connection with every call on it.
pub const TRANSPORT_HEADER_LIST_BYTES: u32 = 4 * 1024 * 1024;

/// The largest HTTP/2 frame a client may send. HTTP/2's CONTINUATION flood guard allows a
/// header block five continuation frames after its first (at these limits), and clients cut
/// header blocks at the frame size the server announces: at 2 MiB a frame, header blocks up to
/// 12 MiB get an answer on their stream. A connection decodes one header block at a time, so
/// this bounds what one connection can make the server hold for headers (flow control keeps
/// bounding data frames).
pub const MAX_FRAME_BYTES: u32 = 2 * 1024 * 1024;

/// How often gRPC health re-checks readiness.
const READINESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What every service shares.
pub struct Ctx {
    /// The database.
    pub pool: Pool,
    /// Status reads, coalesced.
    pub reads: reads::StatusReads,
    /// The connector kinds.
    pub catalog: Catalog,
    /// Seals secrets; `None` without a master key.
    pub secrets: Option<Arc<crate::secrets::Secrets>>,
    /// Limits of test runs' transforms.
    pub limits: Limits,
    /// The test runs allowed at once.
    pub harness_slots: crate::harness::Slots,
    /// Bumped when workers' states or the outbox change.
    pub activity: Activity,
    /// The listener's counters.
    pub listener_stats: Arc<ListenerStats>,
    /// This process's instance id.
    pub instance_id: String,
    /// The applied schema version.
    pub schema_version: i32,
    /// Ends streams when the server stops.
    pub shutdown: CancellationToken,
    /// Tracks stream tasks.
    pub tracker: TaskTracker,
    /// Whether the registry can serve (gRPC health follows it).
    pub readiness: crate::api::ready::Readiness,
    /// The outbox follower every event watch reads from.
    pub feed: Arc<feed::Feed>,
    /// Open streams per caller.
    pub streams: limits::StreamSlots,
    /// The port's limits.
    pub rpc_limits: limits::RpcLimits,
    /// Writes denials to the audit log off the answer's path.
    pub auditor: auditor::Auditor,
    /// Signs page tokens.
    pub page_key: page::PageKey,
    /// This instance's metrics, which hold the live counters of the workers it runs.
    pub metrics: crate::telemetry::metrics::Metrics,
    /// Where workers' records go: a dead-letter replay writes there too.
    pub sink_target: crate::connectors::sink::Target,
}

/// The `Registry` service: the instance's identity and figures.
#[derive(Clone)]
pub struct RegistryService(pub Arc<Ctx>);

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        call::Call::of(&request, "GetInfo")?;
        Ok(Response::new(pb::GetInfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            instance_id: self.0.instance_id.clone(),
            schema_version: self.0.schema_version,
        }))
    }

    async fn get_registry_metrics(
        &self,
        request: Request<pb::GetRegistryMetricsRequest>,
    ) -> Result<Response<pb::RegistryMetrics>, Status> {
        let call = call::Call::of(&request, "GetRegistryMetrics")?;
        let tenant = &call.principal.tenant;
        let client = call::client(&self.0.pool).await?;
        let (datasources, by_status) =
            crate::db::repository::state::counts(&**client, tenant.org(), tenant.projects())
                .await
                .map_err(status::db)?;
        let stats = &self.0.listener_stats;
        Ok(Response::new(pb::RegistryMetrics {
            datasources,
            workers_by_status: by_status.into_iter().collect(),
            listener_connected: stats.connected.load(Ordering::Relaxed),
            listener_reconnects: stats.reconnects.load(Ordering::Relaxed),
            notifications_received: stats.received.load(Ordering::Relaxed),
            notifications_malformed: stats.malformed.load(Ordering::Relaxed),
            at: Some(convert::timestamp(chrono::Utc::now())),
            spans_dropped: crate::telemetry::otel::dropped_spans(),
        }))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        call::Call::of(&request, "ListInstances")?;
        let client = call::client(&self.0.pool).await?;
        let instances = crate::db::repository::leases::instances(&**client)
            .await
            .map_err(status::db)?;
        Ok(Response::new(pb::ListInstancesResponse {
            instances: instances.into_iter().map(convert::instance).collect(),
            answered_by: self.0.instance_id.clone(),
        }))
    }
}

/// Serves the gRPC services on `listener` until `shutdown` is cancelled, counting every call
/// in `metrics`; health reports NOT_SERVING as soon as shutdown begins. Over TLS with `tls`
/// (only), plaintext without.
///
/// # Errors
/// The transport failed.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<crate::api::tls::ServerTls>>,
    ctx: Arc<Ctx>,
    auth: auth::Authenticator,
    metrics: crate::telemetry::metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let sink = Arc::new(AuditDenials(ctx.auditor.clone()));
    ctx.tracker
        .spawn(auth.clone().run_refresh(ctx.shutdown.clone()));
    let health = tonic_health::server::HealthReporter::new();
    let health_service = tonic_health::pb::health_server::HealthServer::new(DrainingHealth {
        inner: tonic_health::server::HealthService::from_health_reporter(health.clone()),
        shutdown: shutdown.clone(),
    });
    set_health(&health, tonic_health::ServingStatus::Serving).await;
    let reflection = reflection_builder()
        .build_v1()
        .expect("the build's own descriptor sets are valid");
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .expect("the build's own descriptor sets are valid");
    // Health follows readiness (checked every second) until shutdown, then NOT_SERVING.
    let draining = {
        let shutdown = shutdown.clone();
        let readiness = ctx.readiness.clone();
        async move {
            let mut tick = tokio::time::interval(READINESS_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut serving = true;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let ready = readiness.check().await;
                        if ready.is_ok() != serving {
                            serving = ready.is_ok();
                            let status = if serving {
                                tonic_health::ServingStatus::Serving
                            } else {
                                tonic_health::ServingStatus::NotServing
                            };
                            if let Err(reason) = &ready {
                                tracing::warn!(reason = %reason, "not ready: gRPC health NOT_SERVING");
                            } else {
                                tracing::info!("ready again: gRPC health SERVING");
                            }
                            set_health(&health, status).await;
                        }
                    }
                }
            }
            set_health(&health, tonic_health::ServingStatus::NotServing).await;
        }
    };
    macro_rules! service {
        ($($server:ident)::+, $svc:expr) => {
            pb::$($server)::+::new($svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        };
    }
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(ctx.rpc_limits.streams_per_connection))
        .http2_max_header_list_size(TRANSPORT_HEADER_LIST_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .layer(trace::TraceLayer)
        .layer(metrics::RpcMetricsLayer::new(metrics))
        .layer(limits::HeaderSizeLayer::new(MAX_HEADER_LIST_BYTES))
        .layer(layer::AuthLayer::new(auth, sink))
        .layer(limits::ConcurrencyLayer::new(
            ctx.rpc_limits.concurrent_calls,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service!(
            registry_server::RegistryServer,
            RegistryService(ctx.clone())
        ))
        .add_service(service!(
            datasources_server::DatasourcesServer,
            datasources::DatasourcesService(ctx.clone())
        ))
        .add_service(service!(
            lifecycle_server::LifecycleServer,
            lifecycle::LifecycleService(ctx.clone())
        ))
        .add_service(service!(
            harness_server::HarnessServer,
            harness::HarnessService(ctx.clone())
        ))
        .add_service(service!(
            events_server::EventsServer,
            events::EventsService(ctx.clone())
        ))
        .add_service(service!(
            secrets_server::SecretsServer,
            secrets::SecretsService(ctx.clone())
        ))
        .add_service(service!(
            audit_server::AuditServer,
            audit::AuditService(ctx.clone())
        ))
        .add_service(service!(
            catalog_server::CatalogServer,
            catalog::CatalogService(ctx.clone())
        ))
        .add_service(service!(
            dead_letters_server::DeadLettersServer,
            dead_letters::DeadLettersService(ctx.clone())
        ));
    match tls {
        Some(tls) => {
            // The accept loop sets TCP_NODELAY before the handshake, as below.
            let incoming =
                crate::api::tls::TlsIncoming::start(listener, tls, shutdown.child_token(), "grpc");
            router
                .serve_with_incoming_shutdown(incoming, draining)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    // Small streamed messages (status and event watches) go out at once, not
                    // after a delayed acknowledgement.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    draining,
                )
                .await
        }
    }
}

/// The `dsreg.v1` services of the port, by their full names: gRPC health answers for each of
/// them as for `""` (the whole server), and all follow readiness together.
pub const SERVICE_NAMES: &[&str] = &[
    pb::registry_server::SERVICE_NAME,
    pb::datasources_server::SERVICE_NAME,
    pb::lifecycle_server::SERVICE_NAME,
    pb::harness_server::SERVICE_NAME,
    pb::events_server::SERVICE_NAME,
    pb::secrets_server::SERVICE_NAME,
    pb::audit_server::SERVICE_NAME,
    pb::catalog_server::SERVICE_NAME,
    pb::dead_letters_server::SERVICE_NAME,
];

/// Sets the health of the server (`""`) and of every service in [`SERVICE_NAMES`] at once.
async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        health.set_service_status(*name, status).await;
    }
}

/// What reflection describes, for both its v1 and its v1alpha service (grpcurl and the stock
/// Python client ask v1alpha): the `dsreg.v1` services, health and reflection itself, so that
/// both versions list the same services.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false)
}

/// The standard health service, except that `Watch` streams end at shutdown (after telling
/// the watcher NOT_SERVING): an open stream would otherwise hold the server's graceful stop
/// for the whole grace period.
struct DrainingHealth {
    inner: tonic_health::server::HealthService,
    shutdown: CancellationToken,
}

type HealthStream = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<tonic_health::pb::HealthCheckResponse, tonic::Status>,
            > + Send,
    >,
>;

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for DrainingHealth {
    async fn check(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        use futures_util::StreamExt;
        let statuses = self.inner.watch(request).await?.into_inner();
        let last = tonic_health::pb::HealthCheckResponse {
            status: tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
        };
        let stream = statuses
            .take_until(self.shutdown.clone().cancelled_owned())
            .chain(futures_util::stream::once(async move { Ok(last) }));
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// Hands every call the auth layer refuses to the auditor: no database work on the answer's
/// path.
struct AuditDenials(auditor::Auditor);

impl layer::DenialSink for AuditDenials {
    fn record(&self, denial: layer::Denial) -> layer::BoxFuture<()> {
        use crate::db::repository::audit::{AuditContext, AuditEntry, Outcome};
        tracing::info!(
            actor = %denial.actor,
            action = %denial.action,
            code = ?denial.code,
            reason = %denial.reason,
            "call denied"
        );
        let entry = AuditEntry {
            actor: denial.actor,
            action: denial.action,
            resource: denial.resource,
            org: None,
            project: None,
            version: None,
            outcome: Outcome::Denied,
            reason: Some(format!("{:?}: {}", denial.code, denial.reason)),
            diff: denial.peer.map(|p| serde_json::json!({ "peer": p })),
            trace_id: denial.trace_id.or_else(|| Some(auditor::new_trace_id())),
        };
        let context = AuditContext {
            reason_class: Some(status::code_name(denial.code).to_owned()),
            via: "grpc",
            ..AuditContext::default()
        };
        self.0.deny(entry, context);
        Box::pin(std::future::ready(()))
    }
}
