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
//! RPC spans take a shorter road of their own ([`super::rpc`]) to the same encoder and
//! connection, batched alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing_subscriber::Layer as _;

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

/// Counts `spans` lost.
pub(super) fn count_dropped(spans: u64) {
    DROPPED.fetch_add(spans, Ordering::Relaxed);
}

/// The target of the RPC span `tracing` makes for a call's log lines; the OpenTelemetry
/// layer leaves it to [`super::rpc`].
pub const RPC_TARGET: &str = "dsreg::rpc";

/// Whether the environment asks for span export.
fn wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let off = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Live span export: the tracer provider, the RPC span recorder and the thread draining it,
/// and the runtime their exporter talks through.
pub struct Exporting {
    provider: SdkTracerProvider,
    recorder: Arc<super::rpc::Recorder>,
    draining: std::thread::JoinHandle<()>,
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
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        let resource = if named {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("dsreg").build()
        };
        let mut exporter = {
            let _inside = runtime.enter();
            super::otlp::Exporter::new(&settings)?
        };
        exporter.set_resource(&resource);
        let exporter = Arc::new(exporter);
        let batching = Batching::from_env();
        let counting = Counting {
            inner: exporter.clone(),
            runtime: runtime.handle().clone(),
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(counting)
                    .with_batch_config(batching.config())
                    .build(),
            )
            .with_resource(resource)
            .build();
        let recorder = Arc::new(super::rpc::Recorder::new(
            opentelemetry_sdk::trace::Config::default().sampler,
            batching.queue,
            batching.batch,
            batching.delay,
        ));
        let draining = {
            let recorder = recorder.clone();
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("dsreg-otlp-rpc".into())
                .spawn(move || {
                    recorder.drain(|batch| {
                        let spans = batch.len() as u64;
                        let request = exporter.encode(&batch);
                        drop(batch);
                        // Failures are counted; nothing else waits on them.
                        let _ = counted(spans, handle.block_on(exporter.send(request)));
                    });
                })
                .map_err(|e| format!("the RPC span export thread: {e}"))?
        };
        Ok(Some(Self {
            provider,
            recorder,
            draining,
            runtime,
        }))
    }

    /// Makes calls record their RPC spans here; done once this export's layer is installed.
    pub fn activate(&self) {
        super::rpc::activate(&self.recorder);
    }

    /// The `tracing` layer that turns the spans `level` lets through into OpenTelemetry spans.
    pub fn layer<S>(
        &self,
        level: super::LevelFilter<S>,
    ) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use tracing_subscriber::filter::FilterExt as _;
        // Spans carry their own fields only: no busy/idle timing, thread or source location,
        // which cost on every enter and exit of every span. Parents come from the `tracing`
        // span tree, and entering a span does not make its context current. The RPC span is
        // not seen here ([`super::rpc`] records it): a span with no parent in the tree takes
        // the ambient context, which is the RPC span's while a call runs. The filter looks at
        // the callsite alone, so each callsite's answer is worked out once.
        let rpc = level.and(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target() != RPC_TARGET
        }));
        tracing_opentelemetry::layer()
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_tracer(self.provider.tracer("dsreg"))
            .with_filter(rpc)
    }

    /// Flushes what is queued (bounded by the exporter's timeout) and stops export.
    pub fn shutdown(self) {
        self.recorder.stop();
        if self.draining.join().is_err() {
            eprintln!("dsreg: the RPC span export thread panicked");
        }
        if let Err(e) = self.provider.shutdown() {
            eprintln!("dsreg: flushing spans on exit: {e}");
        }
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

/// Batching as `OTEL_BSP_*` set it, with defaults for a server that makes a span per call:
/// a queue of 65,536 spans (the SDK's 2,048 fills in 50 ms at 40,000 calls a second and drops
/// what follows), exported when 4,096 are waiting or a second has passed. A value that is not
/// a positive whole number is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batching {
    queue: usize,
    batch: usize,
    delay: Duration,
}

impl Batching {
    fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

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

/// The outcome of exporting `spans`: their count is added to the dropped when the batch
/// failed, and the collector's count of those it rejected when it did not.
fn counted(spans: u64, result: Result<super::otlp::Exported, OTelSdkError>) -> OTelSdkResult {
    match result {
        Ok(exported) => {
            count_dropped(exported.rejected);
            Ok(())
        }
        Err(e) => {
            count_dropped(spans);
            Err(e)
        }
    }
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
        counted(spans, result)
    }

    fn shutdown_with_timeout(&mut self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    // The exporter was given the provider's resource when it was made, as the RPC spans'
    // thread shares it.
}

#[cfg(test)]
mod tests {
    use super::*;

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
                Batching::from_lookup(crate::telemetry::env_of(pairs)),
                Batching {
                    queue,
                    batch,
                    delay: Duration::from_millis(delay)
                },
                "{pairs:?}"
            );
        }
    }
}
