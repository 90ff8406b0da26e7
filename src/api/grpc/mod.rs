//! The gRPC port: the `dsreg.v1` services and standard gRPC health. Generated code stays in
//! [`pb`]. Served until the shutdown token is cancelled; health flips to NOT_SERVING first.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub mod principal;

/// Generated protobuf types and service stubs for `dsreg.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("dsreg.v1");
}

/// The `Registry` service: the instance's identity.
#[derive(Debug, Clone)]
pub struct RegistryService {
    /// This process's instance id.
    pub instance_id: String,
    /// The applied schema version.
    pub schema_version: i32,
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        Ok(Response::new(pb::GetInfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            instance_id: self.instance_id.clone(),
            schema_version: self.schema_version,
        }))
    }

    async fn get_registry_metrics(
        &self,
        _request: Request<pb::GetRegistryMetricsRequest>,
    ) -> Result<Response<pb::RegistryMetrics>, Status> {
        Err(Status::unimplemented("GetRegistryMetrics"))
    }
}

/// Serves the gRPC services on `listener` until `shutdown` is cancelled; health reports
/// NOT_SERVING as soon as shutdown begins.
///
/// # Errors
/// The transport failed.
pub async fn serve(
    listener: TcpListener,
    registry: RegistryService,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::registry_server::RegistryServer<RegistryService>>()
        .await;
    let draining = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            health
                .set_not_serving::<pb::registry_server::RegistryServer<RegistryService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(pb::registry_server::RegistryServer::new(registry))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            draining,
        )
        .await
}
