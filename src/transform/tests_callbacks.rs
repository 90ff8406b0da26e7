//! Limits inside callbacks: Rhai runs `map`/`filter`/`reduce`/… callbacks on a copy of its
//! run state, so these prove the sandbox's own budget holds there, at any nesting.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::json;

use super::*;

/// Slack on top of a deadline for a stopped script to come back (debug builds, busy CI).
const MARGIN: Duration = Duration::from_millis(500);
/// Far enough off that only the limit under test can stop a script.
const FAR: Duration = Duration::from_secs(20);

/// The nested reduce that returned `{"n": 9000000}` after 6.5 s under the default limits.
const NESTED_REDUCE: &str = r#"
    let a = []; a.pad(3000, 1);
    let b = a;
    #{ n: a.reduce(|s, x| s + b.reduce(|t, y| t + 1, 0), 0) }
"#;

/// Builds 10,000 strings of 60 KB each through `map`: every one is under the string limit,
/// and Rhai measures the array only once `map` returns it.
const MAP_BOMB: &str = r#"
    let s = ""; s.pad(60000, 'x');
    let a = []; a.pad(10000, 0);
    #{ out: a.map(|x| s + x) }
"#;

fn run(script: &str, limits: &Limits) -> (Result<Vec<Value>, TransformError>, Duration) {
    let transform = Transform::compile(Some(script), None, limits).expect("script compiles");
    let started = Instant::now();
    let result = transform.apply(&json!({}));
    (result, started.elapsed())
}

#[test]
fn a_nested_reduce_is_stopped_by_the_operation_limit() {
    let limits = Limits {
        deadline: FAR,
        ..Limits::default()
    };

    let (result, _) = run(NESTED_REDUCE, &limits);

    let err = result.expect_err("the nested reduce must be stopped");
    assert_eq!(err, TransformError::TooManyOperations(100_000));
    assert!(err.to_string().contains("100000 operations"), "{err}");
}

#[test]
fn a_nested_reduce_is_stopped_by_the_deadline() {
    let limits = Limits {
        max_operations: u64::MAX,
        ..Limits::default()
    };

    let (result, elapsed) = run(NESTED_REDUCE, &limits);

    assert_eq!(result, Err(TransformError::Deadline(limits.deadline)));
    assert!(
        elapsed < limits.deadline + MARGIN,
        "stopped after {elapsed:?}"
    );
}

#[test]
fn a_map_building_large_strings_is_stopped_by_the_memory_limit_and_frees_it() {
    let limits = Limits {
        max_operations: u64::MAX,
        deadline: FAR,
        ..Limits::default()
    };
    let before = live_bytes();

    let (result, _) = run(MAP_BOMB, &limits);

    assert_eq!(result, Err(TransformError::Memory(limits.max_memory_bytes)));
    assert!(
        result.unwrap_err().to_string().contains("33554432 bytes"),
        "the message names the limit"
    );
    // Everything the call built is freed once it returns (the compiled script is kept by
    // nobody: `run` drops it too).
    let left = live_bytes() - before;
    assert!(left < 1024 * 1024, "{left} bytes still held after the call");
}

#[test]
fn a_lower_memory_limit_stops_a_smaller_build() {
    let limits = Limits {
        max_operations: u64::MAX,
        deadline: FAR,
        max_memory_bytes: 1024 * 1024,
        ..Limits::default()
    };
    let script = r#"let s = ""; s.pad(1000, 'x'); let a = []; a.pad(5000, 0); #{ n: a.map(|x| s + x).len() }"#;

    let (result, _) = run(script, &limits);

    assert_eq!(result, Err(TransformError::Memory(1024 * 1024)));
}

#[test]
fn a_script_within_its_memory_limit_runs() {
    let script = r#"let a = []; a.pad(100, 0); #{ n: a.map(|x| `item ${x}`).len() }"#;

    let (result, _) = run(script, &Limits::default());

    assert_eq!(result, Ok(vec![json!({"n": 100})]));
}

#[test]
fn a_cancelled_call_stops_inside_a_callback() {
    let limits = Limits {
        max_operations: u64::MAX,
        deadline: FAR,
        ..Limits::default()
    };
    let transform = Transform::compile(Some(NESTED_REDUCE), None, &limits).unwrap();
    let cancel = Cancel::new();
    let started = Arc::new(Barrier::new(2));
    let worker = {
        let (transform, cancel, started) = (transform.clone(), cancel.clone(), started.clone());
        std::thread::spawn(move || {
            started.wait();
            let begun = Instant::now();
            let (result, _) = transform.apply_traced_cancellable(&json!({}), &cancel);
            (result, begun.elapsed())
        })
    };

    started.wait();
    cancel.cancel();
    let (result, elapsed) = worker.join().expect("the call does not panic");

    assert_eq!(result, Err(TransformError::Cancelled));
    assert!(elapsed < FAR, "stopped after {elapsed:?}");
}

#[test]
fn a_stop_cannot_be_caught_by_the_script() {
    let limits = Limits {
        max_operations: 1_000,
        deadline: FAR,
        ..Limits::default()
    };
    let script = r#"
        let a = []; a.pad(100, 1);
        let n = 0;
        loop {
            try {
                n += a.reduce(|s, x| { let k = 0; while k < 100 { k += 1; } s + k }, 0);
            } catch {
                n += 1;
            }
        }
    "#;

    let (result, _) = run(script, &limits);

    assert_eq!(result, Err(TransformError::TooManyOperations(1_000)));
}

/// An integer-valued expression in `x` that iterates the array `A` through callbacks `depth`
/// deep. `A` stands for an array literal: a captured variable would be shared, and Rhai
/// refuses to iterate a shared array from inside a callback already iterating it.
fn shape(depth: u32) -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("x + 1".to_owned()),
        Just("f(x)".to_owned()),
        Just("x * 2 - x".to_owned()),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    shape(depth - 1)
        .prop_flat_map(|inner| {
            prop_oneof![
                Just(format!("A.map(|x| {inner}).len()")),
                Just(format!("A.filter(|x| ({inner}) >= 0).len()")),
                Just(format!("A.reduce(|s, x| s + ({inner}), 0)")),
                Just(format!("A.reduce_rev(|s, x| s + ({inner}), 0)")),
                Just(format!("if A.all(|x| ({inner}) >= 0) {{ 1 }} else {{ 0 }}")),
                Just(format!("if A.some(|x| ({inner}) < 0) {{ 1 }} else {{ 0 }}")),
                Just(format!("A.index_of(|x| ({inner}) < 0)")),
                Just(format!("{{ let t = 0; for x in A {{ t += {inner}; }} t }}")),
                Just(format!("g(A, |x| {inner})")),
            ]
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every level iterates at least 20 elements and shapes nest at least twice, so each one
    /// needs more than 400 operations: under a limit of 100, every one stops, and stops by
    /// that limit, however its callbacks nest.
    #[test]
    fn nested_callback_shapes_are_stopped_by_a_tiny_operation_limit(
        len in 20usize..40,
        body in (2u32..5).prop_flat_map(shape),
    ) {
        let array = format!("[{}]", vec!["1"; len].join(", "));
        let body = body.replace('A', &array);
        let limits = Limits { max_operations: 100, deadline: FAR, ..Limits::default() };
        let script = format!(
            "fn f(v) {{ v + 1 }}\n\
             fn g(arr, p) {{ arr.map(p).len() }}\n\
             #{{ n: {body} }}"
        );

        let (result, elapsed) = run(&script, &limits);

        prop_assert_eq!(result, Err(TransformError::TooManyOperations(100)), "{}", script);
        prop_assert!(elapsed < FAR);
    }
}
