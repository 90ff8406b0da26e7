//! The service's edges: `grpc` (tonic services) and `http` (health, metrics, webhook ingress). They call inward and own no SQL.

pub mod grpc;
pub mod http;
pub mod ready;
pub mod tls;
