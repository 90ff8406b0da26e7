//! A real OTLP/gRPC trace receiver, built from the OpenTelemetry collector protocol, that
//! keeps what it receives: for tests and benchmarks of span export.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// One received span.
#[derive(Debug, Clone)]
pub struct Got {
    pub name: String,
    pub trace: String,
    pub span: String,
    pub parent: String,
    pub links: Vec<String>,
    /// Every attribute and event of the span, as `key=value` text.
    pub attributes: Vec<String>,
}

#[derive(Clone, Default)]
pub struct Receiver(pub Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut got = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    got.push(Got {
                        name: span.name,
                        trace: hex(&span.trace_id),
                        span: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        links: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| format!("{}={:?}", a.key, a.value))
                            .chain(span.events.iter().map(|e| format!("{e:?}")))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver on a free port; returns its endpoint and what it received.
pub async fn receiver() -> (String, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    (endpoint, receiver)
}
