//! The test harness: runs a version's connector logic and transform once on a sample
//! payload, sandboxed and under a deadline, and reports the output, the records that would be
//! dead-lettered, what the script printed, warnings and timings. It never writes to a live
//! sink and never touches a running worker, so a draft can be tried while its datasource's
//! published version keeps running. Secrets are used only to fetch a real sample when asked
//! (`http_poll`); the report holds records and script output, never secret values.
//!
//! A run that ends, ends: past its deadline (or when its caller goes away) the record loop on
//! its blocking thread is cancelled, and the script running at that moment stops within a few
//! dozen operations, wherever it is. At most [`Slots`] runs execute at once, counted until
//! their blocking work has really stopped; a run beyond that is refused with [`Error::Busy`].

pub mod destinations;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connectors::contain::{Panicked, contain};
use crate::connectors::{Catalog, ConfigError, SecretMap};
use crate::transform::{self, Cancel, Limits, Transform};

/// What to try.
#[derive(Debug, Clone)]
pub struct Request {
    /// The connector kind.
    pub kind: String,
    /// The version's config (with its `transform` and `output_schema`).
    pub config: Value,
    /// Payloads as the source would deliver them (webhook bodies, polled responses); kinds
    /// that can make their own (the generator) accept none.
    pub samples: Vec<Value>,
    /// With no samples, let a pull kind fetch one real sample from its source (`http_poll`).
    pub fetch_sample: bool,
    /// The datasource's secrets, for a fetched sample; never part of the report.
    pub secrets: SecretMap,
}

/// A record the transform refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Which sample payload it came from.
    pub sample: usize,
    /// Position of the input record within that payload.
    pub index: usize,
    /// Short machine-readable reason.
    pub code: &'static str,
    /// The reason.
    pub message: String,
}

/// What a test run produced.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Input records the connector logic found in the sample.
    pub inputs: usize,
    /// Output records, in order.
    pub outputs: Vec<Value>,
    /// Inputs that would go to dead letters.
    pub rejected: Vec<Rejected>,
    /// What the script printed.
    pub logs: Vec<String>,
    /// Things worth a look that are not errors.
    pub warnings: Vec<String>,
    /// Time to validate the config and compile the transform.
    pub compile: Duration,
    /// Time to run the transform over the inputs.
    pub run: Duration,
}

/// Why a test run could not happen at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such connector kind.
    #[error("unknown connector kind {0:?}")]
    UnknownKind(String),
    /// The config is refused by the kind.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The transform or output schema does not compile.
    #[error(transparent)]
    Compile(#[from] transform::CompileError),
    /// The run exceeded the harness deadline.
    #[error("the test run exceeded its deadline of {0:?}")]
    Deadline(Duration),
    /// Fetching a real sample failed.
    #[error("fetching a sample failed: {0}")]
    Fetch(String),
    /// As many runs as allowed are executing already.
    #[error("{0} test runs are executing already, the most allowed at once; try again shortly")]
    Busy(usize),
    /// The run's blocking work failed (it panicked).
    #[error("the test run failed")]
    Failed,
    /// The kind's code panicked on this config or sample.
    #[error(transparent)]
    Panicked(#[from] Panicked),
}

impl Error {
    /// Test runs are deterministic: retrying the same request cannot help, unless every
    /// slot was taken.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Busy(_))
    }
}

/// The test runs allowed to execute at once. A slot is held until the run's blocking work has
/// stopped, not just until its caller got an answer. Cloning shares the slots.
#[derive(Debug, Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    max: usize,
    cpu_percent: u8,
}

impl Slots {
    /// `max` runs at once (at least one), each computing at most `cpu_percent` of a core
    /// (1–100).
    pub fn new(max: usize, cpu_percent: u8) -> Slots {
        let max = max.max(1);
        Slots {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
            cpu_percent: cpu_percent.clamp(1, 100),
        }
    }

    /// Takes a slot for one run, before anything else of the run is done.
    ///
    /// # Errors
    /// [`Error::Busy`] when every slot is taken.
    pub fn take(&self) -> Result<Slot, Error> {
        self.semaphore
            .clone()
            .try_acquire_owned()
            .map(|permit| Slot {
                _permit: permit,
                cpu_percent: self.cpu_percent,
            })
            .map_err(|_| Error::Busy(self.max))
    }
}

/// One run's place among [`Slots`], given back when the run's work has stopped.
#[derive(Debug)]
pub struct Slot {
    /// Held, never read: dropping it frees the slot.
    _permit: OwnedSemaphorePermit,
    /// The share of a core the run's scripts may take.
    cpu_percent: u8,
}

/// The nice value of a test run's thread where the idle scheduling class cannot be had:
/// the lowest priority there is.
const RUN_NICENESS: i32 = 19;

/// Puts the calling thread in Linux's idle scheduling class (`SCHED_IDLE`): it runs only on a
/// CPU that no other thread wants, and a registry thread that wakes takes the CPU from it at
/// once. A nice value alone is not enough on a busy machine: CFS still hands a niced thread
/// its (small) share, a slice at a time, and every such slice is one a waking runtime thread
/// may wait behind. Where the class cannot be set (another OS), the thread takes the lowest
/// nice value instead; where that fails too, the run keeps the normal priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: on Linux, `sched_setscheduler` with pid 0 changes the calling thread only;
        // `param` is a valid, initialised struct that outlives the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) } == 0 {
            return;
        }
    }
    // SAFETY: `setpriority` with `who = 0` changes the calling thread only and touches no
    // memory.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, RUN_NICENESS) };
}

/// Sets its flag when dropped: a run whose future is dropped (its deadline passed, its caller
/// went away) cancels its blocking work.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Most input records one test run takes.
pub const MAX_INPUTS: usize = 1_000;
/// The deadline of a run when the caller gives none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);
/// The longest deadline a caller may ask for.
pub const MAX_DEADLINE: Duration = Duration::from_secs(30);
/// Memory the outputs of one run may hold: records past it are not run, and a warning says so.
pub const MAX_OUTPUT_BYTES: i64 = 16 * 1024 * 1024;

/// Runs `request` once in `slot` (see [`Slots::take`]). The transform runs on the blocking pool under
/// `limits` (its per-record deadline) and the whole run under `deadline` (`None`:
/// [`DEFAULT_DEADLINE`]; capped at [`MAX_DEADLINE`]).
///
/// # Errors
/// [`Error`] when nothing could run; per-record failures are in the report instead.
///
/// # Cancel safety
/// Dropping the future cancels the run: its blocking work stops within a few dozen script
/// operations, and its slot is freed then.
#[tracing::instrument(name = "harness.run", skip_all, fields(kind = %request.kind, samples = request.samples.len()))]
pub async fn run(
    catalog: &Catalog,
    slot: Slot,
    request: Request,
    limits: &Limits,
    deadline: Option<Duration>,
) -> Result<Report, Error> {
    let deadline = deadline.unwrap_or(DEFAULT_DEADLINE).min(MAX_DEADLINE);
    let cancel = CancelOnDrop(Cancel::new());
    let result = tokio::time::timeout(
        deadline,
        run_within(catalog, request, limits, slot, &cancel.0),
    )
    .await
    .map_err(|_| Error::Deadline(deadline));
    drop(cancel);
    result?
}

async fn run_within(
    catalog: &Catalog,
    request: Request,
    limits: &Limits,
    slot: Slot,
    cancel: &Cancel,
) -> Result<Report, Error> {
    let started = Instant::now();
    let connector = catalog
        .get(&request.kind)
        .ok_or_else(|| Error::UnknownKind(request.kind.clone()))?;
    contain("validate", || connector.validate(&request.config))??;
    let transform = contain("transform", || {
        Transform::from_config(&request.config, limits)
    })??;
    let mut samples = request.samples;
    if samples.is_empty() && request.fetch_sample {
        // In a task of its own, so a panic while fetching is this run's error.
        let fetch = connector.clone();
        let (config, secrets) = (request.config.clone(), request.secrets.clone());
        let fetched = tokio::spawn(async move { fetch.fetch_sample(&config, &secrets).await })
            .await
            .map_err(|e| match e.try_into_panic() {
                Ok(payload) => Error::Panicked(Panicked::from_payload("fetch_sample", &*payload)),
                Err(e) => Error::Fetch(format!("the fetch was cancelled: {e}")),
            })?
            .map_err(|e| Error::Fetch(e.to_string()))?;
        samples.push(fetched);
    }
    // (sample, index) of every input record.
    let mut positions = Vec::new();
    let mut inputs = Vec::new();
    if samples.is_empty() {
        inputs = contain("sample_records", || {
            connector.sample_records(&request.config, None)
        })??;
        positions.extend((0..inputs.len()).map(|i| (0, i)));
    }
    for (n, sample) in samples.iter().enumerate() {
        let found = contain("sample_records", || {
            connector.sample_records(&request.config, Some(sample))
        })??;
        positions.extend((0..found.len()).map(|i| (n, i)));
        inputs.extend(found);
    }
    let mut report = Report {
        compile: started.elapsed(),
        ..Report::default()
    };
    if inputs.len() > MAX_INPUTS {
        report.warnings.push(format!(
            "the sample holds {} records; only the first {MAX_INPUTS} were run",
            inputs.len()
        ));
        inputs.truncate(MAX_INPUTS);
    }
    if request.config.get("output_schema").is_none() {
        report
            .warnings
            .push("no output_schema: outputs are not validated".to_owned());
    }
    report.inputs = inputs.len();
    let ran = Instant::now();
    let cancel = cancel.clone();
    let (done, work) = tokio::sync::oneshot::channel();
    let cpu_percent = slot.cpu_percent;
    let records = move || {
        // The slot is this run's until its records stop running, answered or not.
        let _slot = slot;
        lower_priority();
        transform::pace_this_thread(cpu_percent);
        let mut outputs = Vec::new();
        let mut rejected = Vec::new();
        let mut logs = Vec::new();
        let mut warnings = Vec::new();
        let memory_base = transform::live_bytes();
        for (record, (sample, index)) in inputs.iter().zip(positions) {
            if cancel.is_cancelled() {
                break;
            }
            if transform::live_bytes().wrapping_sub(memory_base) > MAX_OUTPUT_BYTES {
                warnings.push(format!(
                    "the outputs grew past {} MiB; records from sample {sample}, index {index} on were not run",
                    MAX_OUTPUT_BYTES / (1024 * 1024)
                ));
                break;
            }
            // A record the transform panics on is that record's rejection, not the run's.
            let (result, printed) = match contain("transform", || {
                transform.apply_traced_cancellable(record, &cancel)
            }) {
                Ok(traced) => traced,
                Err(panicked) => {
                    rejected.push(Rejected {
                        sample,
                        index,
                        code: "transform_panicked",
                        message: panicked.to_string(),
                    });
                    continue;
                }
            };
            logs.extend(printed);
            match result {
                Ok(out) => outputs.extend(out),
                Err(e) => rejected.push(Rejected {
                    sample,
                    index,
                    code: e.code(),
                    message: e.to_string(),
                }),
            }
        }
        // The caller may be gone (its deadline passed): nobody to tell.
        let _ = done.send((outputs, rejected, logs, warnings));
    };
    // A thread of its own rather than the blocking pool: it runs at a lower priority than the
    // runtime, so test runs (hostile ones included) cannot slow the registry's other calls,
    // and the pool's threads keep their priority.
    std::thread::Builder::new()
        .name("dsreg-harness".to_owned())
        .spawn(records)
        .map_err(|_| Error::Failed)?;
    // Each record is bounded by the transform's own deadline; the run's is the caller's.
    let (outputs, rejected, logs, warnings) = work.await.map_err(|_| Error::Failed)?;
    report.run = ran.elapsed();
    report.warnings.extend(warnings);
    if outputs.is_empty() && rejected.is_empty() && report.inputs > 0 {
        report
            .warnings
            .push("the transform dropped every record".to_owned());
    }
    report.outputs = outputs;
    report.rejected = rejected;
    report.logs = logs;
    Ok(report)
}
