//! The Rhai engine a transform runs in, and the per-call state its hooks read.
//!
//! The engine is built once per [`Transform`](super::Transform) and shared by every thread
//! that applies it, so what differs per call (its operation, time and memory budget, its
//! cancel flag, whether `print` is captured) lives in thread-locals set by [`Call::begin`]
//! around one evaluation. Rhai evaluates on the caller's thread, callbacks included, so the
//! hooks see the state of the call that triggered them.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicBlobPackage, BasicFnPackage, BasicIteratorPackage,
    BasicMapPackage, BasicMathPackage, BasicStringPackage, BitFieldPackage, LogicPackage,
    MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, NativeCallContext};

use super::{Limits, meter};

/// Variables alive at once. Loops reuse theirs, so this bounds the memory a script can pin
/// with distinct `let`s (each value is itself capped by the size limits).
pub(super) const MAX_VARIABLES: usize = 1_000;
/// The clock, the cancel flag and the memory meter are read every this many operations (a
/// power of two): an operation costs tens of nanoseconds, `Instant::now()` about twenty, so
/// this keeps the checks under 1 % while a stopped call ends within a few microseconds.
const CHECK_EVERY: u64 = 64;
/// Captured `print`/`debug` output per call, so a printing loop cannot grow it unbounded.
const MAX_TRACE_LINES: usize = 1_000;
const MAX_TRACE_BYTES: usize = 64 * 1024;

rhai::def_package! {
    /// Rhai's standard library without `LanguageCorePackage` (it brings `sleep`, which blocks
    /// the thread where no deadline check can run, plus `exit` and reflection) and without
    /// `BasicTimePackage` (clocks make output depend on when a record ran).
    SandboxPackage(lib):
        ArithmeticPackage,
        LogicPackage,
        BitFieldPackage,
        BasicStringPackage,
        MoreStringPackage,
        BasicIteratorPackage,
        BasicFnPackage,
        BasicMathPackage,
        BasicArrayPackage,
        BasicBlobPackage,
        BasicMapPackage
    {}
}

/// The package is built once per process: building it registers hundreds of functions.
fn package() -> &'static SandboxPackage {
    static PACKAGE: OnceLock<SandboxPackage> = OnceLock::new();
    PACKAGE.get_or_init(SandboxPackage::new)
}

/// Builds the sandboxed engine for one transform.
///
/// `Engine::new_raw` has no module resolver (and the crate is built with `no_module`), no
/// `print` to stdout and no packages; only [`SandboxPackage`] is added, which has no file,
/// network, process, environment or clock access.
pub(super) fn engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new_raw();
    package().register_into_engine(&mut engine);
    engine.disable_symbol("eval");
    // `record` is the only free variable; anything else unknown is a typo, caught at publish.
    engine.set_strict_variables(true);
    // Rhai reads 0 as "unlimited" for these, so a zero limit is raised to 1 instead.
    engine.set_max_operations(limits.max_operations.max(1));
    engine.set_max_call_levels(limits.max_call_depth);
    let expr_depth = limits.max_expr_depth.max(1);
    engine.set_max_expr_depths(expr_depth, expr_depth);
    engine.set_max_string_size(limits.max_string_bytes.max(1));
    engine.set_max_array_size(limits.max_array_len.max(1));
    engine.set_max_map_size(limits.max_map_len.max(1));
    engine.set_max_variables(MAX_VARIABLES);
    register_checked_replace(&mut engine);
    // Rhai runs `map`/`filter`/`reduce`/… callbacks on a copy of its run state and does not
    // carry their operation count back, so its own count (and any check keyed to it) restarts
    // in every callback. The hook is called for every operation wherever it runs, so the
    // call's own budget, counted here, holds inside callbacks at any depth.
    engine.on_progress(|_| progress());
    engine.on_print(|text| trace(|| text.to_owned()));
    engine.on_debug(|text, _source, pos| {
        trace(|| match pos.line() {
            Some(line) => format!("[debug line {line}] {text}"),
            None => format!("[debug] {text}"),
        })
    });
    engine
}

/// Shadows the standard `replace` functions that can grow a string: Rhai measures their result
/// only once it is built, and replacing each of 64 Ki characters by 64 KiB builds 4 GiB first.
/// Functions in the engine's own namespace are found before the package's.
fn register_checked_replace(engine: &mut Engine) {
    engine.register_fn(
        "replace",
        |ctx: NativeCallContext, s: &mut ImmutableString, find: &str, with: &str| {
            replace_checked(&ctx, s, find, with)
        },
    );
    engine.register_fn(
        "replace",
        |ctx: NativeCallContext, s: &mut ImmutableString, find: &str, with: char| {
            replace_checked(&ctx, s, find, with.encode_utf8(&mut [0; 4]))
        },
    );
    engine.register_fn(
        "replace",
        |ctx: NativeCallContext, s: &mut ImmutableString, find: char, with: &str| {
            replace_checked(&ctx, s, find.encode_utf8(&mut [0; 4]), with)
        },
    );
}

/// `s.replace(find, with)` in place, refused before allocating when the result would exceed
/// the engine's string limit.
fn replace_checked(
    ctx: &NativeCallContext,
    s: &mut ImmutableString,
    find: &str,
    with: &str,
) -> Result<(), Box<EvalAltResult>> {
    if s.is_empty() {
        return Ok(());
    }
    if with.len() > find.len() {
        // An empty pattern matches at every character boundary, as `str::replace` does.
        let matches = if find.is_empty() {
            s.chars().count() + 1
        } else {
            s.matches(find).count()
        };
        let grown = matches.saturating_mul(with.len() - find.len());
        let max = ctx.engine().max_string_size();
        if max > 0 && s.len().saturating_add(grown) > max {
            return Err(EvalAltResult::ErrorDataTooLarge(
                "Length of string".to_owned(),
                ctx.call_position(),
            )
            .into());
        }
    }
    *s = s.replace(find, with).into();
    Ok(())
}

/// Why the progress hook stopped a call. It travels to the caller as the termination token
/// of Rhai's `ErrorTerminated`, which scripts cannot catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The call ran more operations than [`Limits::max_operations`], callbacks included.
    Operations,
    /// The call ran past its deadline.
    Deadline,
    /// The caller gave up on the call (its [`Cancel`] was set).
    Cancelled,
    /// The call built more than [`Limits::max_memory_bytes`].
    Memory,
}

impl Stop {
    const ALL: [Stop; 4] = [
        Stop::Operations,
        Stop::Deadline,
        Stop::Cancelled,
        Stop::Memory,
    ];

    fn token(self) -> Dynamic {
        Dynamic::from_int(self as i64)
    }

    /// The reason a termination token stands for.
    pub(super) fn from_token(token: &Dynamic) -> Option<Stop> {
        let n = token.as_int().ok()?;
        Stop::ALL.into_iter().find(|stop| *stop as i64 == n)
    }
}

/// A flag a caller sets to stop calls it no longer waits for; calls check it from the
/// progress hook, so a running script stops within [`CHECK_EVERY`] operations.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag not yet set.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Stops every call running under this flag, and every later one.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What one call may still spend. Kept per thread rather than in Rhai's run state, which
/// callbacks get a copy of: nothing a script does can reset it.
struct Budget {
    operations: u64,
    max_operations: u64,
    deadline: Option<Instant>,
    cancel: Option<Cancel>,
    /// The thread's live bytes when the call began.
    memory_base: i64,
    max_memory: i64,
    /// Once stopped, every later operation stops too (nothing can swallow the stop).
    stopped: Option<Stop>,
}

impl Budget {
    fn check(&mut self) -> Option<Stop> {
        // A paced thread rests here; the rest is not the script's time, so its deadline moves.
        if let Some(rested) = PACE.with(|p| p.borrow_mut().as_mut().and_then(Pace::rest_if_due)) {
            self.deadline = self.deadline.and_then(|d| d.checked_add(rested));
        }
        if self.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Some(Stop::Cancelled);
        }
        if meter::live_bytes().wrapping_sub(self.memory_base) > self.max_memory {
            return Some(Stop::Memory);
        }
        match self.deadline {
            Some(deadline) if Instant::now() >= deadline => Some(Stop::Deadline),
            _ => None,
        }
    }
}

/// The progress hook: runs at every operation Rhai evaluates, in callbacks too.
fn progress() -> Option<Dynamic> {
    BUDGET.with(|budget| {
        let mut budget = budget.borrow_mut();
        // No budget: the engine is evaluating outside a call (constant folding at compile).
        let budget = budget.as_mut()?;
        if let Some(stop) = budget.stopped {
            return Some(stop.token());
        }
        budget.operations += 1;
        let stop = if budget.operations > budget.max_operations {
            Some(Stop::Operations)
        } else if budget.operations % CHECK_EVERY == 0 {
            budget.check()
        } else {
            None
        };
        budget.stopped = stop;
        stop.map(Stop::token)
    })
}

/// How often a paced thread looks at what it has computed and rests for its share: short
/// enough that a core it shares with the registry is never held for long, long enough that
/// the look (one read of the thread's CPU clock) costs nothing.
const PACE_SLICE: std::time::Duration = std::time::Duration::from_millis(1);

/// A cap on the CPU a thread's scripts take, as a share of one core: every [`PACE_SLICE`],
/// the thread sleeps in proportion to the CPU time it used since it last rested.
///
/// A priority alone does not protect the registry's latency: on a virtual machine a core kept
/// busy by a thread of the lowest priority still slows the other core's work (measured on two
/// cores: a bystander call's p99 rose about threefold beside two such threads computing
/// without pause, and not at all beside two computing 1 ms in every 2).
struct Pace {
    /// When the thread last rested (or was paced), by the wall clock.
    since: Instant,
    /// The thread's CPU time then.
    cpu_since: std::time::Duration,
    /// Rest per unit of CPU time: (100 − percent) / percent.
    rest_per_cpu: f64,
}

impl Pace {
    /// Sleeps when a slice has passed; returns how long.
    fn rest_if_due(&mut self) -> Option<std::time::Duration> {
        if self.rest_per_cpu <= 0.0 || self.since.elapsed() < PACE_SLICE {
            return None;
        }
        let cpu = thread_cpu_time();
        let used = cpu.saturating_sub(self.cpu_since);
        let before = Instant::now();
        std::thread::sleep(used.mul_f64(self.rest_per_cpu));
        self.since = Instant::now();
        self.cpu_since = thread_cpu_time();
        let rested = self.since - before;
        crate::telemetry::metrics::HARNESS_RESTED.inc_by(rested.as_secs_f64());
        Some(rested)
    }
}

/// The CPU time the calling thread has used (zero where it cannot be read: no pacing then).
fn thread_cpu_time() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through a valid pointer to a local.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// Paces the scripts this thread runs from now on to `percent` of one core (1–100; 100: no
/// pacing). For threads of their own, such as a test run's.
pub fn pace_this_thread(percent: u8) {
    let percent = f64::from(percent.clamp(1, 100));
    PACE.with(|p| {
        *p.borrow_mut() = Some(Pace {
            since: Instant::now(),
            cpu_since: thread_cpu_time(),
            rest_per_cpu: (100.0 - percent) / percent,
        });
    });
}

thread_local! {
    /// This thread's CPU share for scripts, if it is paced.
    static PACE: RefCell<Option<Pace>> = const { RefCell::new(None) };
    /// The budget of the evaluation running on this thread, if any.
    static BUDGET: RefCell<Option<Budget>> = const { RefCell::new(None) };
    /// Where `print`/`debug` go during a traced evaluation; `None` discards them.
    static TRACE: RefCell<Option<Trace>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Trace {
    lines: Vec<String>,
    bytes: usize,
    dropped: usize,
}

/// Appends a line to the current trace, if the call is traced; `line` runs only then.
fn trace(line: impl FnOnce() -> String) {
    TRACE.with(|t| {
        let mut t = t.borrow_mut();
        let Some(t) = t.as_mut() else { return };
        let line = line();
        if t.lines.len() >= MAX_TRACE_LINES || t.bytes + line.len() > MAX_TRACE_BYTES {
            t.dropped += 1;
        } else {
            t.bytes += line.len();
            t.lines.push(line);
        }
    });
}

/// The per-call state of one evaluation on this thread; restores the previous state on drop,
/// so a panic cannot leave a stale budget behind.
pub(super) struct Call {
    previous_budget: Option<Budget>,
    previous_trace: Option<Trace>,
}

impl Call {
    /// Arms the budget of one call under `limits` (a deadline that does not fit in an
    /// `Instant` is none) and, when `traced`, starts capturing `print`/`debug`.
    pub(super) fn begin(limits: &Limits, cancel: Option<&Cancel>, traced: bool) -> Call {
        let budget = Budget {
            operations: 0,
            max_operations: limits.max_operations.max(1),
            deadline: Instant::now().checked_add(limits.deadline),
            cancel: cancel.cloned(),
            memory_base: meter::live_bytes(),
            max_memory: i64::try_from(limits.max_memory_bytes).unwrap_or(i64::MAX),
            stopped: None,
        };
        let previous_budget = BUDGET.with(|b| b.replace(Some(budget)));
        let previous_trace = TRACE.with(|t| t.replace(traced.then(Trace::default)));
        Call {
            previous_budget,
            previous_trace,
        }
    }

    /// Ends the call, returning what it printed (empty when not traced).
    pub(super) fn finish(self) -> Vec<String> {
        let trace = TRACE.with(|t| t.borrow_mut().take());
        // `self` drops here and restores the previous state.
        let Some(mut trace) = trace else {
            return Vec::new();
        };
        if trace.dropped > 0 {
            trace.lines.push(format!(
                "[{} more lines dropped: output is capped at {MAX_TRACE_LINES} lines and {MAX_TRACE_BYTES} bytes]",
                trace.dropped
            ));
        }
        trace.lines
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let previous_budget = self.previous_budget.take();
        BUDGET.with(|b| *b.borrow_mut() = previous_budget);
        let previous = self.previous_trace.take();
        TRACE.with(|t| *t.borrow_mut() = previous);
    }
}
