//! OpenTelemetry span export over OTLP/gRPC, configured by the standard variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns it on,
//! `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (`dsreg` by default),
//! `OTEL_TRACES_SAMPLER` / `_ARG` sample, `OTEL_BSP_*` tune batching, and
//! `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turn it off. With no endpoint
//! nothing is built: spans cost what `tracing` costs without a subscriber layer.
//!
//! Spans are exported in batches from the SDK's own thread, encoded there straight into the
//! protocol's wire format ([`super::otlp`]) and sent through a small runtime of their own, so
//! exporting never runs on, or waits for, the registry's tasks; a collector that is down
//! costs the spans of each failed batch, counted by [`dropped_spans`] with those it rejects.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter};

/// Spans lost because their batch could not be exported.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans lost because their batch could not be exported (the collector down or too slow).
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Whether the environment asks for span export.
fn wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let off = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Live span export: the tracer provider and the runtime its exporter talks through.
pub struct Exporting {
    provider: SdkTracerProvider,
    runtime: tokio::runtime::Runtime,
}

impl Exporting {
    /// Builds export from the environment; `None` when no endpoint is set.
    ///
    /// # Errors
    /// The settings are unusable (a malformed endpoint, no runtime).
    pub fn from_env() -> Result<Option<Self>, String> {
        if !wanted() {
            return Ok(None);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dsreg-otlp")
            .enable_all()
            .build()
            .map_err(|e| format!("the span export runtime: {e}"))?;
        let settings = super::otlp::Settings::from_lookup(|name| std::env::var(name).ok())?;
        let exporter = {
            let _inside = runtime.enter();
            super::otlp::Exporter::new(&settings)?
        };
        let counting = Counting {
            inner: Arc::new(exporter),
            runtime: runtime.handle().clone(),
        };
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        let resource = if named {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("dsreg").build()
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(counting)
                    .with_batch_config(batch_config())
                    .build(),
            )
            .with_resource(resource)
            .build();
        Ok(Some(Self { provider, runtime }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        // Spans carry their own fields only: no busy/idle timing, thread or source location,
        // which cost on every enter and exit of every span. Nothing here reads the ambient
        // OpenTelemetry context (parents come from the `tracing` span tree), so entering a
        // span does not make its context current.
        tracing_opentelemetry::layer()
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_tracer(self.provider.tracer("dsreg"))
    }

    /// Flushes what is queued (bounded by the exporter's timeout) and stops export.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("dsreg: flushing spans on exit: {e}");
        }
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

/// Batching as `OTEL_BSP_*` set it, with defaults for a server that makes a span per call:
/// a queue of 65,536 spans (the SDK's 2,048 fills in 50 ms at 40,000 calls a second and drops
/// what follows), exported when 4,096 are waiting or a second has passed.
fn batch_config() -> opentelemetry_sdk::trace::BatchConfig {
    let unset = |name: &str| std::env::var_os(name).is_none();
    let mut config = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if unset("OTEL_BSP_MAX_QUEUE_SIZE") {
        config = config.with_max_queue_size(65_536);
    }
    if unset("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        config = config.with_max_export_batch_size(4_096);
    }
    if unset("OTEL_BSP_SCHEDULE_DELAY") {
        config = config.with_scheduled_delay(Duration::from_secs(1));
    }
    config.build()
}

/// Encodes each batch on the SDK's export thread, sends it on the export runtime, and counts
/// the spans of failed batches and those the collector rejected.
#[derive(Debug)]
struct Counting {
    inner: Arc<super::otlp::Exporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for Counting {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let request = self.inner.encode(&batch);
        drop(batch);
        let inner = self.inner.clone();
        let exported = self
            .runtime
            .spawn(async move { inner.send(request).await })
            .await;
        let result = match exported {
            Ok(result) => result,
            Err(e) => Err(OTelSdkError::InternalFailure(format!(
                "span export task: {e}"
            ))),
        };
        match result {
            Ok(exported) => {
                DROPPED.fetch_add(exported.rejected, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                DROPPED.fetch_add(spans, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn shutdown_with_timeout(&mut self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once while the provider is built, before any export shares the exporter.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}
