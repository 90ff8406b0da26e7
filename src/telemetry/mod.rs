//! Telemetry: the `tracing` subscriber (JSON logs when stdout is not a terminal, readable
//! text when it is; level from `--log-level`, `DSREG_LOG` or `RUST_LOG`, `info` by default),
//! OpenTelemetry export of spans over OTLP when the standard `OTEL_*` variables name an
//! endpoint ([`otel`]), W3C trace-context helpers, and the Prometheus registry served at
//! `/metrics` ([`metrics`]).

pub mod metrics;
pub mod otel;
pub mod otlp;
pub mod panics;
pub mod rpc;
pub mod throttle;

use std::io::IsTerminal;

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps span export alive; dropping it flushes what is queued (bounded) and stops export.
pub struct Telemetry {
    otel: Option<otel::Exporting>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(otel) = self.otel.take() {
            otel.shutdown();
        }
    }
}

/// Installs the global subscriber once (later calls install nothing) with the level filter
/// `level` (else `DSREG_LOG`, `RUST_LOG`, `info`), and OTLP export when configured.
///
/// Each layer has the level filter as its own (per-layer) filter, rather than one filter for
/// all: the span export layer must not see the RPC span, and with a per-layer filter beside a
/// global one, every callsite the global filter turns off (each `trace!` in the HTTP/2 and
/// gRPC stacks) is reported as "sometimes" enabled, so the filters run on every one of them.
/// With per-layer filters alone, such a callsite is off for every layer and costs nothing.
pub fn init(level: Option<&str>) -> Telemetry {
    let directives = level
        .map(str::to_owned)
        .or_else(|| std::env::var("DSREG_LOG").ok())
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let (exporting, otel_error) = match otel::Exporting::from_env() {
        Ok(exporting) => (exporting, None),
        Err(e) => (None, Some(e)),
    };
    let otel_layer = exporting
        .as_ref()
        .map(|e| e.layer(level_filter(&directives)));
    let trace_ids = exporting
        .as_ref()
        .map(|_| TraceIds.with_filter(level_filter(&directives)));
    let registry = tracing_subscriber::registry()
        .with(otel_layer)
        .with(trace_ids);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = if std::io::stdout().is_terminal() {
        registry
            .with(fmt.with_filter(level_filter(&directives)))
            .try_init()
    } else {
        registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_filter(level_filter(&directives)),
            )
            .try_init()
    };
    if installed.is_ok()
        && let Some(exporting) = &exporting
    {
        exporting.activate();
    }
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "OpenTelemetry export is off: its settings are invalid");
    }
    Telemetry {
        otel: exporting.filter(|_| installed.is_ok()),
    }
}

/// A log layer's filter for `directives`. Plain `target=level` lists (`info`,
/// `warn,dsreg::app=debug`) become a [`Targets`](tracing_subscriber::filter::Targets), which
/// decides once per callsite and does nothing as spans are entered and left; anything else
/// (span and field directives) an [`EnvFilter`], which follows the spans it matches. Invalid
/// directives fall back to `info`.
pub type LevelFilter<S> = Box<dyn tracing_subscriber::layer::Filter<S> + Send + Sync>;

/// See [`LevelFilter`].
pub fn level_filter<S>(directives: &str) -> LevelFilter<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    match plain_targets(directives) {
        Some(targets) => Box::new(targets),
        None => Box::new(EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"))),
    }
}

/// `directives` as plain targets, when they are a non-empty list of `target=level` pairs.
fn plain_targets(directives: &str) -> Option<tracing_subscriber::filter::Targets> {
    if directives.trim().is_empty() || directives.contains(['[', ']', '{', '}']) {
        return None;
    }
    directives.parse().ok()
}

/// Installs the logging subscriber without span export (tests and benchmarks).
pub fn init_logging() {
    std::mem::forget(init(None));
}

/// Whether `value` is a W3C `traceparent` (version 00, non-zero ids).
pub fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

/// The remote span context a `traceparent` names (invalid when malformed).
pub fn span_context(traceparent: &str) -> opentelemetry::trace::SpanContext {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    if !valid_traceparent(traceparent) {
        return SpanContext::empty_context();
    }
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (Ok(trace), Ok(span), Ok(flags)) = (
        TraceId::from_hex(parts[1]),
        SpanId::from_hex(parts[2]),
        u8::from_str_radix(parts[3], 16),
    ) else {
        return SpanContext::empty_context();
    };
    SpanContext::new(trace, span, TraceFlags::new(flags), true, TraceState::NONE)
}

/// Makes the span named by `traceparent` the parent of `span`. A malformed value changes
/// nothing.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let remote = span_context(traceparent);
    if remote.is_valid() {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// Makes `span` a child of the span of `context`, when it has one.
pub fn child_of(span: &tracing::Span, context: &opentelemetry::Context) {
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context.clone());
    }
}

/// Links `span` to each span named in `traceparents` (a batch that serves several traces).
pub fn link_traces<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    for traceparent in traceparents {
        let remote = span_context(traceparent);
        if remote.is_valid() {
            span.add_link(remote);
        }
    }
}

/// Puts a span's OpenTelemetry trace id in its `trace_id` field (declared empty where the
/// span is made) when the first log line inside it is written, so every log line carries it.
/// Done then rather than when the span starts: most spans (an RPC's) log nothing, and
/// recording a field makes the log formatter rewrite the span's fields.
struct TraceIds;

/// Marks a span whose `trace_id` field [`TraceIds`] has dealt with.
struct TraceIdSeen;

impl<S> tracing_subscriber::Layer<S> for TraceIds
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            let Some(field) = span.metadata().fields().field("trace_id") else {
                continue;
            };
            let trace_id = {
                let mut extensions = span.extensions_mut();
                if extensions.get_mut::<TraceIdSeen>().is_some() {
                    continue;
                }
                extensions.insert(TraceIdSeen);
                // Starts the OpenTelemetry span if nothing has yet. The RPC span has none of
                // its own: its context is the one attached while the call runs.
                tracing::dispatcher::get_default(|dispatch| {
                    tracing_opentelemetry::get_otel_context(&mut extensions, dispatch)
                })
                .map_or_else(current_trace_id, |cx| cx.span().span_context().trace_id())
            };
            let trace_id = Some(trace_id).filter(|id| *id != opentelemetry::TraceId::INVALID);
            let Some(trace_id) = trace_id else { continue };
            // Recorded through the dispatcher, with no extension held, as `Span::record` does.
            let value = trace_id.to_string();
            let fields = span.metadata().fields();
            let values = [(&field, Some(&value as &dyn tracing::Value))];
            let values = fields.value_set(&values);
            tracing::dispatcher::get_default(|dispatch| {
                dispatch.record(&span.id(), &tracing::span::Record::new(&values));
            });
        }
    }
}

/// The trace id of the attached OpenTelemetry context (invalid when there is none).
fn current_trace_id() -> opentelemetry::TraceId {
    opentelemetry::Context::map_current(|cx| cx.span().span_context().trace_id())
}

/// The span context of the attached OpenTelemetry context, when it has a span: a call's
/// RPC span while the call runs, when spans are exported.
pub fn current_span_context() -> Option<opentelemetry::trace::SpanContext> {
    opentelemetry::Context::map_current(|cx| {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.clone())
    })
}

/// The W3C `traceparent` naming `sc`.
pub fn traceparent(sc: &opentelemetry::trace::SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Variables and their values, for [`env_of`].
#[cfg(test)]
pub(crate) type Pairs = &'static [(&'static str, &'static str)];

/// An environment of `pairs` alone, as the settings' `from_lookup` constructors read one.
#[cfg(test)]
pub(crate) fn env_of(pairs: Pairs) -> impl Fn(&str) -> Option<String> {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_level_directives_are_targets_and_span_directives_are_left_to_env_filter() {
        for plain in ["info", "warn,dsreg::app=debug", "dsreg=trace", "WARN"] {
            assert!(plain_targets(plain).is_some(), "{plain}");
        }
        for other in [
            "",
            " ",
            "[rpc]=debug",
            "dsreg[rpc{rpc.method=GetStatus}]=trace",
        ] {
            assert!(plain_targets(other).is_none(), "{other}");
        }
    }

    /// Counts the events a layer sees.
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_level_filter_lets_through_what_its_directives_name() {
        for directives in ["warn,dsreg::api=debug", "warn,[call]=trace"] {
            let seen = std::sync::Arc::default();
            let subscriber = tracing_subscriber::registry()
                .with(Count(std::sync::Arc::clone(&seen)).with_filter(level_filter(directives)));
            tracing::subscriber::with_default(subscriber, || {
                tracing::warn!(target: "dsreg::db", "counted");
                tracing::info!(target: "dsreg::db", "filtered out");
                tracing::debug!(target: "dsreg::api::grpc", "counted by the first");
                tracing::info_span!("call").in_scope(|| tracing::trace!("counted by the second"));
            });
            assert_eq!(
                seen.load(std::sync::atomic::Ordering::Relaxed),
                2,
                "{directives}"
            );
        }
    }

    #[test]
    fn traceparents_are_checked_strictly() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-xyz-00f067aa0ba902b7-01",
            "garbage",
            "",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
        let sc = span_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert!(!span_context("nonsense").is_valid());
    }
}
