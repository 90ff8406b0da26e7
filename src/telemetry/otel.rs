//! OpenTelemetry span export through `opentelemetry-otlp`, configured by the standard
//! variables. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` turns it
//! on; `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turn it off. With no endpoint
//! nothing is built: spans cost what `tracing` costs without a subscriber layer.
//!
//! Every setting is read traces-specific variable first (`OTEL_EXPORTER_OTLP_TRACES_X`, then
//! `OTEL_EXPORTER_OTLP_X`):
//!
//! - `PROTOCOL`: `grpc` (the default, port 4317), `http/protobuf` or `http/json` (port 4318;
//!   the general endpoint gets `/v1/traces` appended, the traces one is used as it is);
//! - `ENDPOINT`: `http://` or `https://` (TLS through rustls, the system's roots unless
//!   `CERTIFICATE` names a CA file; `CLIENT_CERTIFICATE` and `CLIENT_KEY` for mutual TLS);
//! - `HEADERS` (`key=value,…`, values percent-encoded), `COMPRESSION` (`gzip` or `none`),
//!   `TIMEOUT` (milliseconds, 10,000 by default).
//!
//! `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (`dsreg` by default),
//! `OTEL_TRACES_SAMPLER` / `_ARG` sample (the SDK reads them), and `OTEL_BSP_*` tune batching.
//!
//! The SDK's batch processor exports from a thread of its own; requests go out through a
//! small runtime of their own, so exporting never runs on, or waits for, the registry's
//! tasks. A batch that fails costs its spans; they are counted ([`dropped_spans`]) with those a
//! collector rejects in a partial success, and both are logged (rate-limited). A partial
//! success is read by `opentelemetry-otlp` itself, over gRPC and OTLP/HTTP alike, and reported
//! only through its internal log (a `tracing` event, `…PartialSuccess`): [`PartialSuccesses`]
//! is the `tracing` layer that counts each one from that event, and the export it happened in
//! logs it, with the collector's message. The library's other internal events stay out of the
//! service's log (see [`super::level_filter`]): they repeat, unthrottled, what is logged here.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing_subscriber::Layer as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter};
use tonic::codegen::http;

use super::throttle::Throttle;

/// Why span export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A variable's value is unusable; the message names the variable, never a header's value.
    #[error("{0}")]
    Setting(String),
    /// A certificate or key file a variable names cannot be used.
    #[error("{0}")]
    File(String),
    /// The exporter, its HTTP client or its runtime could not be built.
    #[error("{0}")]
    Build(String),
}

/// Spans lost: their batch could not be exported, or the collector rejected them.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Export requests that failed or that the collector answered with a partial success.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// At most this many export failures are logged a second.
static FAILURE_LOG: Throttle = Throttle::new(1);

/// Spans lost because their batch could not be exported (the collector down, too slow, or
/// refusing them) or because the collector rejected them.
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Export requests that failed or were partly rejected.
pub fn failed_exports() -> u64 {
    FAILED.load(Ordering::Relaxed)
}

/// Counts and logs (rate-limited) an export of `spans` that failed with `message`.
fn export_failed(spans: u64, message: &str) {
    DROPPED.fetch_add(spans, Ordering::Relaxed);
    FAILED.fetch_add(1, Ordering::Relaxed);
    if let Some(held_back) = FAILURE_LOG.admit() {
        tracing::warn!(
            spans,
            held_back,
            // A URL in the message (the endpoint, as the HTTP client names it) is shown
            // without its credentials.
            error = %super::redact::redact_urls(message),
            "exporting spans to the OTLP collector failed; they are lost"
        );
    }
}

/// Counts an export the collector answered with a partial success: `rejected` spans refused.
fn count_partly_rejected(rejected: u64) {
    DROPPED.fetch_add(rejected, Ordering::Relaxed);
    FAILED.fetch_add(1, Ordering::Relaxed);
}

/// Logs (rate-limited) an export the collector answered with a partial success: `rejected`
/// spans refused, with `message`.
fn log_partly_rejected(rejected: u64, message: &str) {
    if let Some(held_back) = FAILURE_LOG.admit() {
        tracing::warn!(
            rejected,
            held_back,
            collector_message = %super::redact::redact_urls(message),
            "the OTLP collector rejected part of a span export"
        );
    }
}

/// The target of the RPC span each call runs in.
pub const RPC_TARGET: &str = "dsreg::rpc";

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
    /// OTLP/HTTP with JSON bodies.
    HttpJson,
}

impl Protocol {
    /// The name the `PROTOCOL` variables use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
            Self::HttpJson => "http/json",
        }
    }
}

/// The exporter's settings, read from the standard variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How spans travel.
    pub protocol: Protocol,
    /// Where they go: the full URL for OTLP/HTTP (`…/v1/traces`).
    pub endpoint: String,
    /// The CA file the collector's certificate is checked against (else the system's roots).
    pub ca: Option<PathBuf>,
    /// The certificate and key presented to the collector (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Whether requests are gzip-compressed.
    pub gzip: bool,
    /// How long one export may take.
    pub timeout: Duration,
    /// The names of the headers sent (never their values, often a credential).
    pub header_names: Vec<String>,
}

impl Settings {
    /// The settings `var` (a lookup of an environment variable) gives.
    ///
    /// # Errors
    /// A setting is malformed; the message names the variable, never a header's value.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let setting = |name: &str| {
            let traces = format!("OTEL_EXPORTER_OTLP_TRACES_{name}");
            let general = format!("OTEL_EXPORTER_OTLP_{name}");
            let set = |n: String| {
                var(&n)
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .map(|v| (n, v))
            };
            set(traces).or_else(|| set(general))
        };
        let protocol = match setting("PROTOCOL") {
            None => Protocol::Grpc,
            Some((_, p)) if p == "grpc" => Protocol::Grpc,
            Some((_, p)) if p == "http/protobuf" => Protocol::HttpProtobuf,
            Some((_, p)) if p == "http/json" => Protocol::HttpJson,
            Some((name, p)) => {
                return Err(Error::Setting(format!(
                    "{name}={p}: not grpc, http/protobuf or http/json"
                )));
            }
        };
        let traces_endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty());
        let general_endpoint = var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty());
        let (name, endpoint) = match (traces_endpoint, general_endpoint, protocol) {
            (Some(e), _, _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e),
            (None, Some(e), Protocol::Grpc) => ("OTEL_EXPORTER_OTLP_ENDPOINT", e),
            (None, Some(e), _) => (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{}/v1/traces", e.trim_end_matches('/')),
            ),
            (None, None, Protocol::Grpc) => ("the default", "http://localhost:4317".to_owned()),
            (None, None, _) => ("the default", "http://localhost:4318/v1/traces".to_owned()),
        };
        let shown = super::redact::redact_url(&endpoint);
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| Error::Setting(format!("{name} {shown:?} is not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(Error::Setting(format!(
                "{name} {shown:?} is not an http:// or https:// URL with a host"
            )));
        }
        let file = |name: &str| setting(name).map(|(_, v)| PathBuf::from(v));
        let ca = file("CERTIFICATE");
        let identity = match (file("CLIENT_CERTIFICATE"), file("CLIENT_KEY")) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(Error::Setting(
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY \
                     (or their TRACES_ forms) go together"
                        .to_owned(),
                ));
            }
        };
        let gzip = match setting("COMPRESSION") {
            None => false,
            Some((_, c)) if c == "gzip" => true,
            Some((_, c)) if c == "none" => false,
            Some((name, c)) => {
                return Err(Error::Setting(format!("{name}={c}: not gzip or none")));
            }
        };
        let timeout = match setting("TIMEOUT") {
            None => Duration::from_secs(10),
            Some((name, v)) => v
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    Error::Setting(format!("{name}: not a positive number of milliseconds"))
                })?,
        };
        let header_names = match setting("HEADERS") {
            None => Vec::new(),
            Some((name, v)) => {
                header_names(&v).map_err(|e| Error::Setting(format!("{name}: {e}")))?
            }
        };
        Ok(Self {
            protocol,
            endpoint,
            ca,
            identity,
            gzip,
            timeout,
            header_names,
        })
    }

    fn tls(&self) -> bool {
        self.endpoint.starts_with("https://")
    }

    /// The PEM files the TLS settings name: the CA, the client's certificate and key.
    ///
    /// # Errors
    /// A file cannot be read; the message names it.
    fn tls_files(&self) -> Result<TlsFiles, Error> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| Error::File(format!("reading {}: {e}", path.display())))
        };
        let ca = self.ca.as_ref().map(read).transpose()?;
        let identity = match &self.identity {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        Ok(TlsFiles { ca, identity })
    }
}

/// The contents of the PEM files the TLS settings name.
#[derive(Default)]
struct TlsFiles {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The names in a `key=value,…` header list, checked as the exporter will send them. Errors
/// name the entry by position, never by its value (a header is often a credential).
fn header_names(list: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!("entry {} is not key=value", i + 1));
        };
        let key = key.trim();
        let value = crate::encoding::percent_decode_strict(value.trim())
            .ok_or_else(|| format!("entry {}: a malformed percent escape", i + 1))?;
        if http::HeaderName::from_bytes(key.as_bytes()).is_err()
            || http::HeaderValue::from_str(&value).is_err()
        {
            return Err(format!("entry {}: not a valid header", i + 1));
        }
        names.push(key.to_ascii_lowercase());
    }
    Ok(names)
}

/// Takes `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION` and `OTEL_EXPORTER_OTLP_COMPRESSION` out of
/// the environment when they ask for no compression (`none`, the specification's word, or a
/// traces-specific `none` over a general `gzip`): `opentelemetry-otlp` reads them itself when
/// it is not given a compression (it cannot be told "none"), untrimmed, and skips a value it
/// does not know for the next variable, so a traces-specific ` none` would let a general
/// `gzip` through. [`Settings`] reads them first; the exporter is given gzip when they ask
/// for it.
///
/// # Safety
/// Changes the process's environment: call it before any other thread starts, as `main`
/// does first.
pub unsafe fn drop_compression_none() {
    let var = |name: &str| std::env::var(name).ok();
    if Settings::from_lookup(var).is_ok_and(|s| !s.gzip) {
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ] {
            // SAFETY: no other thread runs yet (the caller's contract).
            unsafe { std::env::remove_var(name) };
        }
    }
}

/// Whether the environment asks for span export.
fn wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    let off = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Live span export: the tracer provider and the runtime its exporter talks through.
pub struct Exporting {
    provider: SdkTracerProvider,
    runtime: tokio::runtime::Runtime,
    settings: Settings,
}

impl Exporting {
    /// Builds export from the environment; `None` when no endpoint is set.
    ///
    /// # Errors
    /// The settings are unusable (a malformed endpoint, an unreadable certificate, no
    /// runtime).
    pub fn from_env() -> Result<Option<Self>, Error> {
        let var = |name: &str| std::env::var(name).ok();
        if !wanted(var) {
            return Ok(None);
        }
        let settings = Settings::from_lookup(var)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dsreg-otlp")
            .enable_all()
            .build()
            .map_err(|e| Error::Build(format!("the span export runtime: {e}")))?;
        let named = var("OTEL_SERVICE_NAME").is_some()
            || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| v.contains("service.name="));
        let resource = if named {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("dsreg").build()
        };
        let mut exporter = {
            // The gRPC channel and the HTTP client start their tasks on the export runtime.
            let _inside = runtime.enter();
            build_exporter(&settings)?
        };
        exporter.set_resource(&resource);
        let metered = MeteredExporter {
            inner: Arc::new(exporter),
            runtime: runtime.handle().clone(),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(metered)
                    .with_batch_config(Batching::from_lookup(var).config())
                    .build(),
            )
            .with_resource(resource)
            .build();
        Ok(Some(Self {
            provider,
            runtime,
            settings,
        }))
    }

    /// Says once, in the log, where spans go and how.
    pub fn announce(&self) {
        let s = &self.settings;
        let var = |name: &str| std::env::var(name).ok();
        tracing::info!(
            endpoint = %super::redact::redact_url(&s.endpoint),
            protocol = s.protocol.name(),
            tls = s.tls(),
            ca = s.ca.as_ref().map(|p| p.display().to_string()),
            client_certificate = s.identity.is_some(),
            compression = if s.gzip { "gzip" } else { "none" },
            timeout_ms = u64::try_from(s.timeout.as_millis()).unwrap_or(u64::MAX),
            headers = ?s.header_names,
            sampler = var("OTEL_TRACES_SAMPLER").unwrap_or_else(|| "parentbased_always_on".to_owned()),
            sampler_arg = var("OTEL_TRACES_SAMPLER_ARG"),
            "spans are exported over OTLP"
        );
    }

    /// The `tracing` layer that turns the spans `level` lets through into OpenTelemetry spans.
    pub fn layer<S>(
        &self,
        level: super::LevelFilter<S>,
    ) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        // Spans carry their own fields only: no busy/idle timing, thread or source location,
        // which cost on every enter and exit of every span. Parents come from the `tracing`
        // span tree (a call's RPC span is the root of what the call does), and entering a
        // span does not make its context current.
        tracing_opentelemetry::layer()
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_tracer(self.provider.tracer("dsreg"))
            .with_filter(level)
    }

    /// The `tracing` layer that counts the partial successes the exporter reports; see
    /// [`PartialSuccesses`].
    pub fn partial_successes<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        PartialSuccesses.with_filter(OnlyPartialSuccesses)
    }

    /// Flushes what is queued (bounded by the exporter's timeout) and stops export.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("dsreg: flushing spans on exit: {e}");
        }
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

/// The `opentelemetry-otlp` exporter `settings` describe. Headers come from the variables,
/// read by the crate itself.
fn build_exporter(settings: &Settings) -> Result<opentelemetry_otlp::SpanExporter, Error> {
    let compression = settings
        .gzip
        .then_some(opentelemetry_otlp::Compression::Gzip);
    let TlsFiles { ca, identity } = if settings.tls() {
        settings.tls_files()?
    } else {
        TlsFiles::default()
    };
    let built = match settings.protocol {
        Protocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout);
            if let Some(compression) = compression {
                builder = builder.with_compression(compression);
            }
            if settings.tls() {
                let mut tls = tonic::transport::ClientTlsConfig::new();
                tls = match ca {
                    Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                    None => tls.with_native_roots(),
                };
                if let Some((cert, key)) = identity {
                    tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                builder = builder.with_tls_config(tls);
            }
            builder.build()
        }
        Protocol::HttpProtobuf | Protocol::HttpJson => {
            let client = http_client(settings, ca, identity)?;
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_protocol(if settings.protocol == Protocol::HttpJson {
                    opentelemetry_otlp::Protocol::HttpJson
                } else {
                    opentelemetry_otlp::Protocol::HttpBinary
                })
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout);
            if let Some(compression) = compression {
                builder = builder.with_compression(compression);
            }
            builder.build()
        }
    };
    built.map_err(|e| {
        Error::Build(format!(
            "the OTLP exporter for {}: {e}",
            super::redact::redact_url(&settings.endpoint)
        ))
    })
}

/// The HTTP client OTLP/HTTP exports go through: the service's `reqwest` (rustls with the
/// ring provider), trusting the CA file `ca` when given (else the system's roots) and
/// presenting `identity` (mutual TLS). `opentelemetry-http` sends the requests through it and
/// the exporter reads the answers, partial successes included.
fn http_client(
    settings: &Settings,
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<reqwest::Client, Error> {
    // Installing twice is refused and harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout);
    if let (Some(ca), Some(path)) = (ca, &settings.ca) {
        let certs = reqwest::Certificate::from_pem_bundle(&ca)
            .map_err(|e| Error::File(format!("{}: not PEM certificates: {e}", path.display())))?;
        builder = builder.tls_certs_only(certs);
    }
    if let (Some((mut cert, key)), Some((path, _))) = (identity, &settings.identity) {
        cert.push(b'\n');
        cert.extend_from_slice(&key);
        let identity = reqwest::Identity::from_pem(&cert).map_err(|e| {
            Error::File(format!(
                "{} and its key: not a PEM certificate and key: {e}",
                path.display()
            ))
        })?;
        builder = builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| Error::Build(format!("the OTLP/HTTP client: {e}")))
}

tokio::task_local! {
    /// The partial successes reported during the export running in this task: the spans the
    /// collector rejected and its message, logged once the export has returned.
    static REJECTIONS: RefCell<Vec<(u64, String)>>;
}

/// The target of `opentelemetry-otlp`'s internal events (its package name).
const LIBRARY_TARGET: &str = "opentelemetry-otlp";

/// The names of the events `opentelemetry-otlp` reports a span export's partial success with,
/// over gRPC and over OTLP/HTTP, with the fields `rejected_spans` and `error_message`.
const PARTIAL_SUCCESS_EVENTS: [&str; 2] = [
    "TonicTracesClient.PartialSuccess",
    "HttpTraceClient.PartialSuccess",
];

/// Whether `meta` is the callsite of a partial success report.
fn reports_partial_success(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_event()
        && meta.target() == LIBRARY_TARGET
        && PARTIAL_SUCCESS_EVENTS.contains(&meta.name())
}

/// The `tracing` layer that counts each partial success `opentelemetry-otlp` reports (its
/// only report of one is an event in its internal log) in the metrics a failed export counts
/// in, and hands it to the export it happened in, which logs it once it has returned: an
/// event written from inside the handling of another would be lost, or confuse the per-layer
/// filters handling the first. Installed with [`Exporting::partial_successes`].
pub struct PartialSuccesses;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PartialSuccesses {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut report = PartialSuccess::default();
        event.record(&mut report);
        count_partly_rejected(report.rejected);
        // Outside an export (never, as the exporter is wrapped) it is counted only.
        let _ = REJECTIONS.try_with(|r| r.borrow_mut().push((report.rejected, report.message)));
    }
}

/// Lets through the partial success reports alone, decided once per callsite.
struct OnlyPartialSuccesses;

impl<S> tracing_subscriber::layer::Filter<S> for OnlyPartialSuccesses {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        reports_partial_success(meta)
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if reports_partial_success(meta) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    // Whatever the log's level, the reports (warnings) are seen and counted.
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::WARN)
    }
}

/// The fields of a partial success report.
#[derive(Debug, Default, PartialEq, Eq)]
struct PartialSuccess {
    rejected: u64,
    message: String,
}

impl tracing::field::Visit for PartialSuccess {
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        if field.name() == "rejected_spans" {
            self.rejected = u64::try_from(value).unwrap_or(0);
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "rejected_spans" {
            self.rejected = value;
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "error_message" {
            value.clone_into(&mut self.message);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "error_message" {
            self.message = format!("{value:?}");
        }
    }
}

/// Batching as `OTEL_BSP_*` set it, with defaults for a server that makes a span per call:
/// a queue of 65,536 spans (the SDK's 2,048 fills in 50 ms at 40,000 calls a second and drops
/// what follows), exported when 4,096 are waiting or a second has passed. A value that is not
/// a positive whole number is ignored. `OTEL_BSP_EXPORT_TIMEOUT` and
/// `OTEL_BSP_MAX_CONCURRENT_EXPORTS` are the SDK's to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batching {
    queue: usize,
    batch: usize,
    delay: Duration,
}

impl Batching {
    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let number = |name: &str, default: usize| {
            var(name)
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let queue = number("OTEL_BSP_MAX_QUEUE_SIZE", 65_536);
        Self {
            queue,
            // The SDK holds a batch to the queue's size.
            batch: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 4_096).min(queue),
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 1_000) as u64),
        }
    }

    fn config(self) -> opentelemetry_sdk::trace::BatchConfig {
        opentelemetry_sdk::trace::BatchConfigBuilder::default()
            .with_max_queue_size(self.queue)
            .with_max_export_batch_size(self.batch)
            .with_scheduled_delay(self.delay)
            .build()
    }
}

/// Runs each export of the wrapped exporter on the export runtime, and counts and logs the
/// batches that fail.
#[derive(Debug)]
struct MeteredExporter<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for MeteredExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let inner = self.inner.clone();
        let exported = self
            .runtime
            .spawn(REJECTIONS.scope(RefCell::default(), async move {
                let result = inner.export(batch).await;
                (result, REJECTIONS.with(RefCell::take))
            }))
            .await;
        let (result, rejections) = match exported {
            Ok(exported) => exported,
            Err(e) => (
                Err(OTelSdkError::InternalFailure(format!(
                    "span export task: {e}"
                ))),
                Vec::new(),
            ),
        };
        for (rejected, message) in rejections {
            log_partly_rejected(rejected, &message);
        }
        if let Err(e) = &result {
            export_failed(spans, &e.to_string());
        }
        result
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    // The exporter was given the provider's resource before it was wrapped.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::env_of;

    #[test]
    fn batching_takes_the_bsp_variables_and_ignores_what_is_not_a_positive_number() {
        let defaults = (65_536, 4_096, 1_000);
        let cases: [(crate::telemetry::Pairs, (usize, usize, u64)); 3] = [
            (&[], defaults),
            (
                &[
                    ("OTEL_BSP_MAX_QUEUE_SIZE", "1000"),
                    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5000"),
                    ("OTEL_BSP_SCHEDULE_DELAY", " 250 "),
                ],
                (1_000, 1_000, 250),
            ),
            (
                &[
                    ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
                    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "-3"),
                    ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
                ],
                defaults,
            ),
        ];
        for (pairs, (queue, batch, delay)) in cases {
            assert_eq!(
                Batching::from_lookup(env_of(pairs)),
                Batching {
                    queue,
                    batch,
                    delay: Duration::from_millis(delay)
                },
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn settings_come_from_the_standard_variables_traces_specific_first() {
        let s = Settings::from_lookup(env_of(&[])).unwrap();
        assert_eq!(
            (s.protocol, s.endpoint.as_str(), s.gzip, s.timeout),
            (
                Protocol::Grpc,
                "http://localhost:4317",
                false,
                Duration::from_secs(10)
            )
        );
        let s = Settings::from_lookup(env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://general:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20s3cret, x-tenant = a ",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "/etc/c.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/c.key"),
        ]))
        .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.endpoint, "https://general:4318/v1/traces");
        assert!(s.gzip && s.tls());
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(s.header_names, vec!["authorization", "x-tenant"]);
        assert_eq!(s.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            s.identity,
            Some((PathBuf::from("/etc/c.pem"), PathBuf::from("/etc/c.key")))
        );
        // The traces endpoint is used as it is, whatever the protocol.
        let s = Settings::from_lookup(env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:9999/in",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]))
        .unwrap();
        assert_eq!(
            (s.protocol, s.endpoint.as_str()),
            (Protocol::HttpJson, "http://traces:9999/in")
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_variable_and_never_a_header_value() {
        let cases: [(crate::telemetry::Pairs, &str); 8] = [
            (
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")],
                "OTEL_EXPORTER_OTLP_PROTOCOL=thrift",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")],
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=zstd",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:21")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                &[(
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "Authorization=Bearer%zzs3cret",
                )],
                "entry 1",
            ),
            (&[("OTEL_EXPORTER_OTLP_HEADERS", "ok=1,s3cret")], "entry 2"),
            (
                &[("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "ok=1,x=s3%01cret")],
                "entry 2",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/s3cret.key")],
                "go together",
            ),
        ];
        for (pairs, says) in cases {
            let e = Settings::from_lookup(env_of(pairs))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{pairs:?}: {e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn export_is_wanted_only_with_an_endpoint_and_not_turned_off() {
        assert!(!wanted(env_of(&[])));
        assert!(wanted(env_of(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4317"
        )])));
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let pairs: crate::telemetry::Pairs = match off.0 {
                "OTEL_SDK_DISABLED" => &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_SDK_DISABLED", "true"),
                ],
                _ => &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_TRACES_EXPORTER", "none"),
                ],
            };
            assert!(!wanted(env_of(pairs)), "{off:?}");
        }
    }

    #[test]
    fn a_partial_success_report_is_counted_and_handed_to_the_export_it_happened_in() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber =
            tracing_subscriber::registry().with(PartialSuccesses.with_filter(OnlyPartialSuccesses));
        let (dropped, failed) = (dropped_spans(), failed_exports());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handed = tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(REJECTIONS.scope(RefCell::default(), async {
                // As `otel_warn!` writes it in `opentelemetry-otlp`.
                tracing::warn!(
                    name: "TonicTracesClient.PartialSuccess",
                    target: "opentelemetry-otlp",
                    name = "TonicTracesClient.PartialSuccess",
                    rejected_spans = 3_i64,
                    error_message = "spans too old",
                );
                // Other events of the library, or of the service, are not reports.
                tracing::warn!(
                    name: "Export.Failed.NonRetryable",
                    target: "opentelemetry-otlp",
                    rejected_spans = 5_i64,
                );
                tracing::warn!(rejected_spans = 7_i64, "not the library");
                REJECTIONS.with(RefCell::take)
            }))
        });
        assert_eq!(handed, vec![(3, "spans too old".to_owned())]);
        // No other unit test exports spans.
        assert_eq!(
            (dropped_spans(), failed_exports()),
            (dropped + 3, failed + 1)
        );
    }
}
