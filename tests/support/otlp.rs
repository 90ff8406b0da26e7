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
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

/// One received span: its name, and its ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct Got {
    pub name: String,
    pub trace: String,
    pub span: String,
    pub parent: String,
    pub links: Vec<String>,
    /// Its `rpc.grpc.status_code` attribute, if it has one.
    pub grpc_code: Option<i64>,
    /// Whether its status is an error.
    pub failed: bool,
}

/// `bytes` in lowercase hex, in one allocation: the receiver shares the machine with what it
/// measures, so it keeps its own cost per span small.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[derive(Clone, Default)]
pub struct Receiver(pub Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
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
                        grpc_code: span
                            .attributes
                            .iter()
                            .find(|a| a.key == "rpc.grpc.status_code")
                            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                                Value::IntValue(n) => Some(*n),
                                _ => None,
                            }),
                        failed: span
                            .status
                            .as_ref()
                            .is_some_and(|s| s.code == StatusCode::Error as i32),
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
