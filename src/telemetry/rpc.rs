//! RPC spans, recorded compactly. A registry answers tens of thousands of calls a second, and
//! each gets a span; built through `tracing-opentelemetry` and the SDK, one span cost a dozen
//! allocations (the builder, its attributes, the SDK span, the batch processor's message),
//! more than the call itself. So an RPC span is a fixed record: its ids, its parent, its
//! method's name (a `'static` string from the permission table) and two timestamps. Finished
//! records go into a queue that a thread of their own drains, turning each batch into the
//! SDK's `SpanData` for the same wire encoder and collector connection every other span uses.
//!
//! The call runs with the span's OpenTelemetry context attached, so spans made inside it
//! (`harness.run`, `secrets.put`, ...) are its children, the events a publish writes carry its
//! `traceparent`, and log lines carry its trace id. Sampling is the SDK's, read from the same
//! `OTEL_TRACES_SAMPLER` variables: a call that is not sampled records nothing, and its
//! children follow its decision under the parent-based samplers.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{
    SamplingDecision, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{ShouldSample, SpanData, SpanEvents, SpanLinks};

/// The recorder calls report to once export is on.
static ACTIVE: OnceLock<Arc<Recorder>> = OnceLock::new();

/// Makes `recorder` the one calls report to (the first made active stays).
pub(super) fn activate(recorder: &Arc<Recorder>) {
    let _ = ACTIVE.set(recorder.clone());
}

/// An RPC span that has not ended: ended (and queued for export, when sampled) on drop.
#[derive(Debug)]
pub struct OpenSpan {
    recorder: &'static Recorder,
    /// The span's own context, attached while the call runs.
    context: Context,
    parent: SpanId,
    parent_remote: bool,
    name: &'static str,
    start: SystemTime,
    /// The call's gRPC status code, once answered.
    code: Option<tonic::Code>,
}

impl OpenSpan {
    /// The context to attach while the call runs: its span is this one.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Ends the span of a call answered with `code`.
    pub fn answered(mut self, code: tonic::Code) {
        self.code = Some(code);
    }
}

impl Drop for OpenSpan {
    fn drop(&mut self) {
        let span = self.context.span();
        let context = span.span_context();
        if context.is_sampled() {
            self.recorder.finish(Finished {
                context: context.clone(),
                parent: self.parent,
                parent_remote: self.parent_remote,
                name: self.name,
                start: self.start,
                end: SystemTime::now(),
                // Dropped unanswered: the caller went away.
                code: self.code.unwrap_or(tonic::Code::Cancelled),
            });
        }
    }
}

/// Starts the server span of a call to the RPC named `name` (`dsreg.v1.Service/Method`), a
/// child of the caller's span when `traceparent` names one. `None` when spans are not
/// exported.
pub fn start(name: &'static str, traceparent: Option<&str>) -> Option<OpenSpan> {
    let recorder = ACTIVE.get()?;
    let remote = traceparent
        .map(super::span_context)
        .filter(SpanContext::is_valid);
    let parent_cx = remote
        .as_ref()
        .map(|sc| Context::new().with_remote_span_context(sc.clone()));
    let trace_id = remote.as_ref().map_or_else(
        || TraceId::from_bytes(rand::random::<u128>().max(1).to_be_bytes()),
        SpanContext::trace_id,
    );
    let span_id = SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes());
    // The environment's samplers read neither attributes nor links.
    let sampled = recorder.sampler.should_sample(
        parent_cx.as_ref(),
        trace_id,
        name,
        &SpanKind::Server,
        &[],
        &[],
    );
    let flags = match sampled.decision {
        SamplingDecision::RecordAndSample => TraceFlags::SAMPLED,
        SamplingDecision::Drop | SamplingDecision::RecordOnly => TraceFlags::default(),
    };
    let own = SpanContext::new(trace_id, span_id, flags, false, sampled.trace_state);
    Some(OpenSpan {
        recorder,
        context: Context::new().with_remote_span_context(own),
        parent: remote
            .as_ref()
            .map_or(SpanId::INVALID, SpanContext::span_id),
        parent_remote: remote.is_some(),
        name,
        start: SystemTime::now(),
        code: None,
    })
}

/// An ended RPC span.
#[derive(Debug)]
struct Finished {
    context: SpanContext,
    parent: SpanId,
    parent_remote: bool,
    name: &'static str,
    start: SystemTime,
    end: SystemTime,
    code: tonic::Code,
}

/// Whether a server answering with `code` failed, rather than its caller (OpenTelemetry's
/// RPC conventions): such a span's status is an error.
fn server_failed(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

impl Finished {
    /// The span as the SDK describes it: a server span with the RPC attributes and the
    /// call's status code.
    fn data(&self, scope: &InstrumentationScope) -> SpanData {
        // `dsreg.v1.Service`, `Method`.
        let (service, method) = self.name.rsplit_once('/').unwrap_or((self.name, ""));
        SpanData {
            span_context: self.context.clone(),
            parent_span_id: self.parent,
            parent_span_is_remote: self.parent_remote,
            span_kind: SpanKind::Server,
            name: Cow::Borrowed(self.name),
            start_time: self.start,
            end_time: self.end,
            attributes: vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service),
                KeyValue::new("rpc.method", method),
                KeyValue::new("rpc.grpc.status_code", i64::from(self.code as i32)),
            ],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if server_failed(self.code) {
                Status::error(self.code.description())
            } else {
                Status::Unset
            },
            instrumentation_scope: scope.clone(),
        }
    }
}

/// The queue of ended RPC spans and how it is drained.
#[derive(Debug)]
pub struct Recorder {
    sampler: Box<dyn ShouldSample>,
    queue: Mutex<Vec<Finished>>,
    /// Signalled when a batch is full, and on stop.
    ready: Condvar,
    stopping: AtomicBool,
    /// Spans held at most; more are dropped (and counted) until the queue drains.
    capacity: usize,
    /// Spans exported in one request at most.
    batch: usize,
    /// How long a span waits, at most, before a batch that is not full is exported.
    delay: Duration,
}

/// The queue, even if a thread panicked holding it (it holds plain records).
fn lock(queue: &Mutex<Vec<Finished>>) -> MutexGuard<'_, Vec<Finished>> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Recorder {
    /// A recorder sampling with `sampler` and batching as `capacity`, `batch` and `delay` say.
    pub(super) fn new(
        sampler: Box<dyn ShouldSample>,
        capacity: usize,
        batch: usize,
        delay: Duration,
    ) -> Self {
        Self {
            sampler,
            queue: Mutex::new(Vec::with_capacity(batch.min(capacity))),
            ready: Condvar::new(),
            stopping: AtomicBool::new(false),
            capacity: capacity.max(1),
            batch: batch.max(1),
            delay,
        }
    }

    fn finish(&self, span: Finished) {
        let mut queue = lock(&self.queue);
        if queue.len() >= self.capacity {
            drop(queue);
            super::otel::count_dropped(1);
            return;
        }
        queue.push(span);
        if queue.len() == self.batch {
            self.ready.notify_one();
        }
    }

    /// Drains the queue into `export` until [`Recorder::stop`], then exports what is left.
    /// Runs on a thread of its own: `export` may block (bounded by the exporter's timeout).
    pub(super) fn drain(&self, mut export: impl FnMut(Vec<SpanData>)) {
        let scope = InstrumentationScope::builder("dsreg").build();
        let mut taken = Vec::with_capacity(self.batch.min(self.capacity));
        loop {
            let stopping = {
                let mut queue = lock(&self.queue);
                let deadline = Instant::now() + self.delay;
                while queue.len() < self.batch && !self.stopping.load(Ordering::Relaxed) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    queue = self
                        .ready
                        .wait_timeout(queue, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                // The emptied buffer takes the queue's place, so neither grows again.
                std::mem::swap(&mut *queue, &mut taken);
                self.stopping.load(Ordering::Relaxed)
            };
            for chunk in taken.chunks(self.batch) {
                export(chunk.iter().map(|span| span.data(&scope)).collect());
            }
            taken.clear();
            if stopping {
                return;
            }
        }
    }

    /// Makes [`Recorder::drain`] export what is queued and return.
    pub(super) fn stop(&self) {
        let _queue = lock(&self.queue);
        self.stopping.store(true, Ordering::Relaxed);
        self.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceState;
    use opentelemetry_sdk::trace::Sampler;

    fn finished(n: u64) -> Finished {
        Finished {
            context: SpanContext::new(
                TraceId::from(u128::from(n)),
                SpanId::from(n),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent: SpanId::INVALID,
            parent_remote: false,
            name: "dsreg.v1.Lifecycle/GetStatus",
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(1),
            code: tonic::Code::Ok,
        }
    }

    #[test]
    fn a_finished_span_is_a_server_span_with_the_rpc_attributes() {
        let scope = InstrumentationScope::builder("dsreg").build();
        let data = finished(7).data(&scope);
        assert_eq!(data.name, "dsreg.v1.Lifecycle/GetStatus");
        assert_eq!(data.span_kind, SpanKind::Server);
        assert_eq!(data.span_context.span_id(), SpanId::from(7));
        let attribute = |key: &str| {
            data.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attribute("rpc.system").as_deref(), Some("grpc"));
        assert_eq!(
            attribute("rpc.service").as_deref(),
            Some("dsreg.v1.Lifecycle")
        );
        assert_eq!(attribute("rpc.method").as_deref(), Some("GetStatus"));
        assert_eq!(attribute("rpc.grpc.status_code").as_deref(), Some("0"));
        assert_eq!(data.status, Status::Unset);
        assert_eq!(data.instrumentation_scope.name(), "dsreg");
    }

    #[test]
    fn a_call_the_server_failed_is_an_error_and_one_the_caller_got_wrong_is_not() {
        let scope = InstrumentationScope::builder("dsreg").build();
        let status = |code| {
            Finished {
                code,
                ..finished(1)
            }
            .data(&scope)
            .status
        };
        assert_eq!(status(tonic::Code::NotFound), Status::Unset);
        assert_eq!(status(tonic::Code::PermissionDenied), Status::Unset);
        assert_eq!(status(tonic::Code::Cancelled), Status::Unset);
        assert_eq!(
            status(tonic::Code::Unavailable),
            Status::error("The service is currently unavailable")
        );
        assert!(matches!(
            status(tonic::Code::Internal),
            Status::Error { .. }
        ));
    }

    #[test]
    fn the_queue_is_exported_in_batches_and_a_full_one_drops_what_follows() {
        let recorder = Arc::new(Recorder::new(
            Box::new(Sampler::AlwaysOn),
            5,
            2,
            Duration::from_secs(60),
        ));
        let dropped = super::super::otel::dropped_spans();
        for n in 1..=7 {
            recorder.finish(finished(n));
        }
        assert!(super::super::otel::dropped_spans() >= dropped + 2);
        recorder.stop();
        let mut batches = Vec::new();
        recorder.drain(|batch| {
            batches.push(
                batch
                    .iter()
                    .map(|s| u64::from_be_bytes(s.span_context.span_id().to_bytes()))
                    .collect::<Vec<_>>(),
            );
        });
        assert_eq!(batches, vec![vec![1, 2], vec![3, 4], vec![5]]);
    }

    #[test]
    fn a_full_batch_is_exported_without_waiting_for_the_delay() {
        let recorder = Arc::new(Recorder::new(
            Box::new(Sampler::AlwaysOn),
            100,
            3,
            Duration::from_secs(600),
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let draining = {
            let recorder = recorder.clone();
            std::thread::spawn(move || recorder.drain(|batch| tx.send(batch.len()).unwrap()))
        };
        for n in 1..=3 {
            recorder.finish(finished(n));
        }
        let exported = rx.recv_timeout(Duration::from_secs(30));
        recorder.stop();
        draining.join().unwrap();
        assert_eq!(exported, Ok(3));
    }
}
