//! The service's edges: `grpc` (tonic services) and `http` (health, later metrics and webhook
//! ingress). They call inward and own no SQL.

pub mod grpc;
pub mod http;
