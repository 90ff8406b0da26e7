//! `transform`: what a version's Rhai transform costs per record, and what a test-harness run
//! (compile a script, apply it to one record) costs.
//!
//! - records/s through a typical 10-field mapping script on one thread, without and with an
//!   output schema (the mapping renames, converts, computes two fields and drops one), over
//!   1,024 distinct records (a batch, mostly out of L2) and over one record (hot in cache);
//! - test-harness runs/s: compile the same script and schema, apply it once, repeated.
//!
//! Pure CPU, no database: `cargo bench --bench transform`. `TRANSFORM_BENCH_SECONDS` sets
//! each run's length (default 3, at least 2 counts). Rates are per second of this thread's
//! CPU time (one core), so other work on the machine does not skew them; the wall-clock rate
//! is shown beside each.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use dsreg::transform::{Limits, Transform};
use serde_json::{Value, json};

/// Renames `id`, `ts`, `mail`; converts `age` and `amount`; computes `name` and
/// `total_cents`; drops `internal`; passes `country`, `plan` and `tags` through.
const MAPPING: &str = r#"
    #{
        event_id: record.id,
        occurred_at: record.ts,
        email: record.mail.to_lower(),
        age: parse_int(record.age),
        amount: parse_float(record.amount),
        name: record.first + " " + record.last,
        total_cents: record.qty * record.unit_cents,
        country: record.country,
        plan: record.plan,
        tags: record.tags,
    }
"#;

const RECORDS: usize = 1_024;
const TARGET_RECORDS_PER_S: f64 = 200_000.0;
const TARGET_RUNS_PER_S: f64 = 2_000.0;

fn main() {
    let seconds = common::env_num("TRANSFORM_BENCH_SECONDS", 3);
    let run_for = Duration::from_secs(seconds);
    let limits = Limits::default();
    let records: Vec<Value> = (0..RECORDS).map(input).collect();
    let schema = output_schema();

    let plain = Transform::compile(Some(MAPPING), None, &limits).expect("mapping compiles");
    let checked =
        Transform::compile(Some(MAPPING), Some(&schema), &limits).expect("mapping compiles");
    assert_eq!(
        plain.apply(&records[1]).expect("mapping applies")[0]["total_cents"],
        json!(3 * 1_999)
    );

    let rows = vec![
        (
            "transform throughput, 10-field mapping, 1 thread".to_owned(),
            throughput(&plain, &records, run_for).show("records/s"),
            format!("≥ {TARGET_RECORDS_PER_S:.0} records/s"),
        ),
        (
            "transform throughput, same mapping, one record repeated (hot cache), 1 thread"
                .to_owned(),
            throughput(&plain, &records[..1], run_for).show("records/s"),
            "floor".to_owned(),
        ),
        (
            "transform throughput, 10-field mapping + output_schema, 1 thread".to_owned(),
            throughput(&checked, &records, run_for).show("records/s"),
            "floor".to_owned(),
        ),
        (
            "test-harness runs (compile script + schema, apply to 1 record)".to_owned(),
            harness_runs(&schema, &records[0], &limits, run_for).show("runs/s"),
            format!("≥ {TARGET_RUNS_PER_S:.0} runs/s"),
        ),
    ];
    common::print_table(
        &format!("transform benchmark: {seconds}s per run, {RECORDS} distinct input records"),
        &rows,
    );
}

/// A rate: per second of this thread's CPU time, and per second of wall-clock time.
struct Rate {
    cpu: f64,
    wall: f64,
}

impl Rate {
    fn show(&self, unit: &str) -> String {
        format!("{:.0} {unit} (wall clock: {:.0})", self.cpu, self.wall)
    }
}

/// Calls `batch` (which does `per_batch` units of work) until `run_for` of CPU time passed.
fn measure(run_for: Duration, per_batch: u64, mut batch: impl FnMut()) -> Rate {
    batch();
    let (cpu_start, wall_start) = (thread_cpu_time(), Instant::now());
    let mut done = 0u64;
    while thread_cpu_time() - cpu_start < run_for {
        batch();
        done += per_batch;
    }
    Rate {
        cpu: done as f64 / (thread_cpu_time() - cpu_start).as_secs_f64(),
        wall: done as f64 / wall_start.elapsed().as_secs_f64(),
    }
}

/// Records/s applying `transform` to `records` in a loop on this thread.
fn throughput(transform: &Transform, records: &[Value], run_for: Duration) -> Rate {
    let per_batch = RECORDS.max(records.len());
    measure(run_for, per_batch as u64, || {
        for record in records.iter().cycle().take(per_batch) {
            black_box(transform.apply(black_box(record)).expect("mapping applies"));
        }
    })
}

/// Runs/s of what the test harness does per request: compile, then apply to one record.
fn harness_runs(schema: &Value, record: &Value, limits: &Limits, run_for: Duration) -> Rate {
    measure(run_for, 16, || {
        for _ in 0..16 {
            let transform = Transform::compile(Some(black_box(MAPPING)), Some(schema), limits)
                .expect("mapping compiles");
            let (output, _printed) = transform.apply_traced(record);
            black_box(output.expect("mapping applies"));
        }
    })
}

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on
    // Linux, and on failure `ts` stays zero, which only makes the run last longer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn input(n: usize) -> Value {
    json!({
        "id": format!("evt-{n:06}"),
        "ts": 1_700_000_000 + n as i64,
        "mail": format!("User{n}@Example.COM"),
        "age": format!("{}", 18 + n % 60),
        "amount": format!("{}.{:02}", n % 500, n % 100),
        "first": "Ada",
        "last": "Lovelace",
        "qty": (n % 7) as i64 + 2,
        "unit_cents": 1_999,
        "country": "GB",
        "plan": if n.is_multiple_of(3) { "pro" } else { "free" },
        "tags": ["a", "b"],
        "internal": {"trace": n},
    })
}

fn output_schema() -> Value {
    json!({
        "type": "object",
        "required": ["event_id", "email", "age", "total_cents"],
        "properties": {
            "event_id": {"type": "string", "pattern": "^evt-[0-9]+$"},
            "occurred_at": {"type": "integer"},
            "email": {"type": "string", "maxLength": 320},
            "age": {"type": "integer", "minimum": 0},
            "amount": {"type": "number"},
            "name": {"type": "string"},
            "total_cents": {"type": "integer", "minimum": 0},
            "country": {"type": "string", "minLength": 2, "maxLength": 2},
            "plan": {"enum": ["free", "pro"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "additionalProperties": false,
    })
}
