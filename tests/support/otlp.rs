//! Real OTLP trace receivers, built from the OpenTelemetry collector protocol, that keep what
//! they receive: for tests and benchmarks of span export. One speaks OTLP/gRPC (tonic), the
//! other OTLP/HTTP with protobuf or JSON bodies (`POST /v1/traces`, hyper); either can serve TLS with
//! a certificate the test made, accept gzip, require a header and answer with a partial
//! success.

#![allow(dead_code)]

use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message as _;

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
    /// Its string attributes.
    pub attributes: Vec<(String, String)>,
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

/// How a receiver behaves, and what it saw of the requests themselves.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// A header (lowercase name, value) every export must carry; one without it is refused.
    pub header: Option<(String, String)>,
    /// The partial success every answer reports: rejected spans and a message.
    pub partial: Option<(i64, String)>,
    /// Exports received gzip-compressed.
    pub gzipped: AtomicUsize,
    /// Exports received.
    pub requests: AtomicUsize,
    /// Exports refused for a missing or wrong header.
    pub refused: AtomicUsize,
}

#[derive(Clone, Default)]
pub struct Receiver(pub Arc<Mutex<Vec<Got>>>, pub Arc<Behaviour>);

impl Receiver {
    fn with(behaviour: Behaviour) -> Self {
        Self(Arc::default(), Arc::new(behaviour))
    }

    /// Checks a request's compression and header: `false` when it is refused.
    fn admit(&self, gzip: bool, header: impl Fn(&str) -> Option<String>) -> bool {
        let b = &self.1;
        b.requests.fetch_add(1, Ordering::Relaxed);
        if gzip {
            b.gzipped.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((name, value)) = &b.header
            && header(name).as_ref() != Some(value)
        {
            b.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Keeps the spans of `request`; the answer to send.
    fn keep(&self, request: ExportTraceServiceRequest) -> ExportTraceServiceResponse {
        let mut got = self.0.lock().unwrap();
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let attribute = |key: &str| {
                        span.attributes
                            .iter()
                            .find(|a| a.key == key)
                            .and_then(|a| a.value.as_ref()?.value.as_ref())
                    };
                    got.push(Got {
                        grpc_code: match attribute("rpc.grpc.status_code") {
                            Some(Value::IntValue(n)) => Some(*n),
                            _ => None,
                        },
                        attributes: span
                            .attributes
                            .iter()
                            .filter_map(|a| match a.value.as_ref()?.value.as_ref()? {
                                Value::StringValue(v) => Some((a.key.clone(), v.clone())),
                                _ => None,
                            })
                            .collect(),
                        name: span.name,
                        trace: hex(&span.trace_id),
                        span: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        links: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                        failed: span
                            .status
                            .as_ref()
                            .is_some_and(|s| s.code == StatusCode::Error as i32),
                    });
                }
            }
        }
        ExportTraceServiceResponse {
            partial_success: self.1.partial.as_ref().map(|(rejected, message)| {
                ExportTracePartialSuccess {
                    rejected_spans: *rejected,
                    error_message: message.clone(),
                }
            }),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let metadata = request.metadata();
        let gzip = metadata
            .get("grpc-encoding")
            .is_some_and(|v| v.as_bytes() == b"gzip");
        let admitted = self.admit(gzip, |name| {
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        if !admitted {
            return Err(tonic::Status::unauthenticated(
                "the collector's header is missing",
            ));
        }
        Ok(tonic::Response::new(self.keep(request.into_inner())))
    }
}

/// A server certificate and its key, PEM, and the CA a client's certificate must be signed
/// by, when clients must present one (mutual TLS).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

/// An OTLP/gRPC receiver on a free port; returns its endpoint and what it received.
pub async fn receiver() -> (String, Receiver) {
    grpc_receiver(Behaviour::default(), None).await
}

/// An OTLP/gRPC receiver behaving as `behaviour` says, over TLS when `tls` is given (its
/// endpoint then names `localhost`).
pub async fn grpc_receiver(behaviour: Behaviour, tls: Option<ServerTls>) -> (String, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::with(behaviour);
    let service = TraceServiceServer::new(receiver.clone())
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let mut server = tonic::transport::Server::builder();
    let endpoint = match tls {
        Some(tls) => {
            server = server
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(tls.cert, tls.key)),
                )
                .unwrap();
            format!("https://localhost:{port}")
        }
        None => format!("http://127.0.0.1:{port}"),
    };
    tokio::spawn(async move {
        server
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    (endpoint, receiver)
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf or JSON) behaving as `behaviour` says, over TLS
/// when `tls` is given (its endpoint then names `localhost`); returns its base URL (without
/// `/v1/traces`) and what it received.
pub async fn http_receiver(behaviour: Behaviour, tls: Option<ServerTls>) -> (String, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = Receiver::with(behaviour);
    let acceptor = tls.map(|tls| {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(&tls.cert)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&tls.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match &tls.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let endpoint = if acceptor.is_some() {
        format!("https://localhost:{port}")
    } else {
        format!("http://127.0.0.1:{port}")
    };
    let serving = receiver.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let receiver = serving.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let receiver = receiver.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&receiver, request).await) }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(socket).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                            .await;
                    }
                }
            });
        }
    });
    (endpoint, receiver)
}

/// The answer to one OTLP/HTTP request.
async fn answer(
    receiver: &Receiver,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt as _;
    let status = |code: u16, body: Vec<u8>| {
        hyper::Response::builder()
            .status(code)
            .header("content-type", "application/x-protobuf")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    if request.method() != hyper::Method::POST || request.uri().path() != "/v1/traces" {
        return status(404, Vec::new());
    }
    let headers = request.headers().clone();
    let gzip = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let admitted = receiver.admit(gzip, |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    if !admitted {
        return status(401, Vec::new());
    }
    let Ok(body) = request.into_body().collect().await else {
        return status(400, Vec::new());
    };
    let mut body = body.to_bytes().to_vec();
    if gzip {
        let mut plain = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut plain)
            .is_err()
        {
            return status(400, Vec::new());
        }
        body = plain;
    }
    let json = headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json {
        let Ok(export) = serde_json::from_slice::<ExportTraceServiceRequest>(&body) else {
            return status(400, Vec::new());
        };
        let answer = serde_json::to_vec(&receiver.keep(export)).unwrap();
        let mut response = status(200, answer);
        response.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return response;
    }
    let Ok(export) = ExportTraceServiceRequest::decode(&body[..]) else {
        return status(400, Vec::new());
    };
    status(200, receiver.keep(export).encode_to_vec())
}
