//! Telemetry: the `tracing` subscriber (JSON logs when stdout is not a terminal, readable
//! text when it is; level from `--log-level`, `DSREG_LOG` or `RUST_LOG`, `info` by default),
//! OpenTelemetry export of spans over OTLP when the standard `OTEL_*` variables name an
//! endpoint ([`otel`]), W3C trace context read and written by OpenTelemetry's
//! `TraceContextPropagator` alone (gRPC metadata, the SQL `dsreg.traceparent`, notification
//! payloads), and the Prometheus registry served at `/metrics` ([`metrics`]).

pub mod metrics;
pub mod otel;
pub mod panics;
pub mod redact;
pub mod throttle;

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
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
/// all: with a per-layer filter beside a global one, every callsite the global filter turns off (each `trace!` in the HTTP/2 and
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
    let partial_successes = exporting.as_ref().map(otel::Exporting::partial_successes);
    let registry = tracing_subscriber::registry()
        .with(otel_layer)
        .with(trace_ids)
        .with(partial_successes);
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
        exporting.announce();
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
///
/// The OpenTelemetry libraries' internal log (targets `opentelemetry…`) is off unless the
/// directives name it: what it says of exports is logged by [`otel`], rate-limited, with
/// credentials taken out of URLs, and counted; the library itself writes some of it on every
/// failed export.
pub type LevelFilter<S> = Box<dyn tracing_subscriber::layer::Filter<S> + Send + Sync>;

/// See [`LevelFilter`].
pub fn level_filter<S>(directives: &str) -> LevelFilter<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let directives = &without_library_log(directives);
    match plain_targets(directives) {
        Some(targets) => Box::new(targets),
        None => Box::new(
            EnvFilter::try_new(directives)
                .unwrap_or_else(|_| EnvFilter::new(without_library_log("info"))),
        ),
    }
}

/// `directives` with the OpenTelemetry libraries' internal log turned off, unless they name
/// it (a later directive for the same target would win anyway; one for a longer target, say
/// `opentelemetry_sdk=debug`, is more specific and wins too).
fn without_library_log(directives: &str) -> String {
    if directives.trim().is_empty() || directives.contains("opentelemetry") {
        directives.to_owned()
    } else {
        format!("opentelemetry=off,{directives}")
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

/// The two W3C trace-context fields, as a propagator reads them.
struct Fields<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Fields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The remote span context a W3C `traceparent` (with its `tracestate`) names, as
/// OpenTelemetry's `TraceContextPropagator` reads it; invalid when malformed. The one parser
/// of trace context: gRPC metadata, the SQL `dsreg.traceparent` and notification payloads
/// all come through here.
pub fn span_context(traceparent: &str, tracestate: Option<&str>) -> SpanContext {
    if !w3c_shape(traceparent) {
        return SpanContext::empty_context();
    }
    let fields = Fields {
        traceparent,
        tracestate,
    };
    TraceContextPropagator::new()
        .extract(&fields)
        .span()
        .span_context()
        .clone()
}

/// Whether `value` has the shape the W3C grammar gives a `traceparent` and the schema's
/// `dsreg_valid_traceparent` stores: `vv-<32 hex>-<16 hex>-ff`, lowercase, 55 characters. The
/// propagator alone also takes short ids (`1-a-1-…`), which the database would then drop:
/// every path must agree on what is a trace context.
fn w3c_shape(value: &str) -> bool {
    let b = value.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(0..2)
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && &b[0..2] != b"ff"
}

/// The context a request's W3C `traceparent` and `tracestate` headers name (no span when
/// they are absent or malformed).
pub fn context_of_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    let Some(traceparent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return opentelemetry::Context::new();
    };
    let tracestate = headers.get("tracestate").and_then(|v| v.to_str().ok());
    let remote = span_context(traceparent, tracestate);
    if remote.is_valid() {
        opentelemetry::Context::new().with_remote_span_context(remote)
    } else {
        opentelemetry::Context::new()
    }
}

/// Whether `value` is a well-formed W3C `traceparent` ([`span_context`] reads a span from it).
pub fn valid_traceparent(value: &str) -> bool {
    span_context(value, None).is_valid()
}

/// A well-formed `traceparent` as this service writes it (version `00`), or `None`: later
/// versions are read as W3C says and stored in the one form every reader takes.
pub fn normalized_traceparent(value: &str) -> Option<String> {
    let sc = span_context(value, None);
    sc.is_valid().then(|| traceparent(&sc))
}

/// Makes the span named by `traceparent` the parent of `span`. A malformed value changes
/// nothing.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let remote = span_context(traceparent, None);
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
        let remote = span_context(traceparent, None);
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
            {
                let mut extensions = span.extensions_mut();
                if extensions.get_mut::<TraceIdSeen>().is_some() {
                    continue;
                }
                extensions.insert(TraceIdSeen);
            }
            // Starts the OpenTelemetry span if nothing has yet; it takes the span's extensions
            // itself, so none may be held here.
            let trace_id = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            })
            .map_or_else(current_trace_id, |cx| cx.span().span_context().trace_id());
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

/// The span context of the current `tracing` span's OpenTelemetry span, when spans are
/// exported: inside a call, its RPC span or a span made inside it.
pub fn current_span_context() -> Option<SpanContext> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// The W3C `traceparent` naming `sc`.
pub fn traceparent(sc: &SpanContext) -> String {
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
                // The OpenTelemetry libraries' internal log, as `otel_warn!` writes it.
                tracing::warn!(target: "opentelemetry-otlp", name = "X.PartialSuccess", "not counted");
                tracing::error!(target: "opentelemetry_sdk", "not counted");
            });
            assert_eq!(
                seen.load(std::sync::atomic::Ordering::Relaxed),
                2,
                "{directives}"
            );
        }
    }

    #[test]
    fn traceparents_are_read_as_w3c_says() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        // A later version is read and written back as version 00.
        for later in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(
                normalized_traceparent(later).as_deref(),
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                "{later}"
            );
        }
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Extra fields are not read, in any version: the database stores the 55-character
            // form only, and every path agrees with it.
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
            // Short ids, which the propagator alone would take.
            "1-a-1-A-A-A0--A0A-00AA0aa0---Aa0-a00aA-A0aA0A-Aa-a",
            "01-a-1-01",
            "00-xyz-00f067aa0ba902b7-01",
            "garbage",
            "",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
            assert_eq!(normalized_traceparent(bad), None, "{bad}");
        }
        let sc = span_context(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=abc"),
        );
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_state().get("vendor"), Some("abc"));
        assert!(!span_context("nonsense", None).is_valid());
    }

    proptest::proptest! {
        /// Whatever the input, a value read as valid is written back as one that reads the
        /// same.
        #[test]
        fn what_is_read_is_written_back_the_same(
            version in "[0-9a-f]{2}",
            trace in "[0-9a-fA-F]{32}",
            span in "[0-9a-f]{16}",
            flags in "[0-9a-f]{2}",
            tail in proptest::option::of("[a-z0-9-]{0,12}"),
        ) {
            let value = match &tail {
                Some(t) => format!("{version}-{trace}-{span}-{flags}-{t}"),
                None => format!("{version}-{trace}-{span}-{flags}"),
            };
            let sc = span_context(&value, None);
            if let Some(written) = normalized_traceparent(&value) {
                let again = span_context(&written, None);
                proptest::prop_assert!(again.is_valid());
                proptest::prop_assert_eq!(again.trace_id(), sc.trace_id());
                proptest::prop_assert_eq!(again.span_id(), sc.span_id());
                proptest::prop_assert_eq!(again.is_sampled(), sc.is_sampled());
            } else {
                proptest::prop_assert!(!sc.is_valid());
            }
        }
    }
}
