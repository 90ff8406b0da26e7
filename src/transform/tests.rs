use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

/// Slack on top of a deadline for a stopped script to come back (debug builds, busy CI).
const MARGIN: Duration = Duration::from_millis(500);

/// Compiles with the default limits but a deadline no busy test machine reaches: tests of
/// what a script does must not fail for the time it took (the deadline has its own tests).
fn compile(script: &str) -> Transform {
    let limits = Limits {
        deadline: std::time::Duration::from_secs(30),
        ..Limits::default()
    };
    Transform::compile(Some(script), None, &limits).expect("script compiles")
}

fn compile_with(script: &str, limits: &Limits) -> Transform {
    Transform::compile(Some(script), None, limits).expect("script compiles")
}

/// Runs `script` on an empty record and checks it stopped within its deadline plus a margin.
fn stopped(script: &str, limits: &Limits) -> TransformError {
    let transform = compile_with(script, limits);
    let started = Instant::now();
    let result = transform.apply(&json!({}));
    let elapsed = started.elapsed();
    assert!(
        elapsed < limits.deadline + MARGIN,
        "stopped after {elapsed:?}, deadline {:?}",
        limits.deadline
    );
    result.expect_err("the script must be stopped")
}

const MAPPING: &str = r#"
    #{
        id: record.id,
        name: record.first + " " + record.last,
        email: record.email.to_lower(),
        age: parse_int(record.age),
        score: record.score * 2.0,
        active: record.status == "active",
        city: record.address.city,
        tags: record.tags,
        tag_count: record.tags.len(),
        source: "webhook",
    }
"#;

fn mapping_input(n: i64) -> Value {
    json!({
        "id": n, "first": "Ada", "last": "Lovelace", "email": "ADA@Example.com", "age": "36",
        "score": 1.25, "status": "active", "address": {"city": "London"}, "tags": ["a", "b"],
        "internal": "dropped",
    })
}

#[test]
fn identity_passes_records_through_unchanged() {
    let transform = Transform::compile(None, None, &Limits::default()).unwrap();
    let record = json!({"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}});

    assert_eq!(transform.apply(&record).unwrap(), vec![record]);
}

#[test]
fn from_config_reads_transform_and_output_schema() {
    let config = json!({
        "transform": "#{ doubled: record.n * 2 }",
        "output_schema": {"type": "object", "required": ["doubled"]},
    });

    let transform = Transform::from_config(&config, &Limits::default()).unwrap();

    assert_eq!(
        transform.apply(&json!({"n": 21})).unwrap(),
        vec![json!({"doubled": 42})]
    );
}

#[test]
fn from_config_without_transform_is_the_identity() {
    let transform = Transform::from_config(&json!({"url": "x"}), &Limits::default()).unwrap();

    assert_eq!(
        transform.apply(&json!({"n": 1})).unwrap(),
        vec![json!({"n": 1})]
    );
}

#[test]
fn from_config_refuses_a_transform_that_is_not_a_string() {
    let err = Transform::from_config(&json!({"transform": 42}), &Limits::default()).unwrap_err();

    assert_eq!(err, CompileError::NotAString);
    assert_eq!(err.field(), "transform");
}

#[test]
fn a_ten_field_mapping_script_maps_correctly() {
    let transform = compile(MAPPING);

    let out = transform.apply(&mapping_input(7)).unwrap();

    assert_eq!(
        out,
        vec![json!({
            "id": 7, "name": "Ada Lovelace", "email": "ada@example.com", "age": 36,
            "score": 2.5, "active": true, "city": "London", "tags": ["a", "b"], "tag_count": 2,
            "source": "webhook",
        })]
    );
}

#[test]
fn unit_output_produces_no_record() {
    let transform = compile("if record.keep { record }");

    assert_eq!(
        transform.apply(&json!({"keep": false})).unwrap(),
        Vec::<Value>::new()
    );
    assert_eq!(
        transform.apply(&json!({"keep": true})).unwrap(),
        vec![json!({"keep": true})]
    );
}

#[test]
fn an_array_of_maps_produces_one_record_each() {
    let transform = compile("record.items.map(|i| #{ sku: i })");

    let out = transform.apply(&json!({"items": ["a", "b", "c"]})).unwrap();

    assert_eq!(
        out,
        vec![
            json!({"sku": "a"}),
            json!({"sku": "b"}),
            json!({"sku": "c"})
        ]
    );
}

#[test]
fn the_module_doc_example_renames_drops_and_splits() {
    let script = r#"
        if record.kind == "heartbeat" { return; }
        let out = #{
            id: record.event_id,
            amount_cents: (parse_float(record.amount) * 100.0).to_int(),
            user: record.user.to_lower(),
        };
        if record.items != () {
            return record.items.map(|item| #{ order: out.id, sku: item.sku, qty: item.qty });
        }
        out
    "#;
    let transform = compile(script);

    let dropped = transform.apply(&json!({"kind": "heartbeat"})).unwrap();
    let one = transform
        .apply(&json!({"kind": "pay", "event_id": "e1", "amount": "12.34", "user": "BOB"}))
        .unwrap();
    let split = transform
        .apply(
            &json!({"kind": "order", "event_id": "o1", "amount": "1", "user": "x",
            "items": [{"sku": "s1", "qty": 1}, {"sku": "s2", "qty": 3}]}),
        )
        .unwrap();

    assert!(dropped.is_empty());
    assert_eq!(
        one,
        vec![json!({"id": "e1", "amount_cents": 1234, "user": "bob"})]
    );
    assert_eq!(
        split,
        vec![
            json!({"order": "o1", "sku": "s1", "qty": 1}),
            json!({"order": "o1", "sku": "s2", "qty": 3}),
        ]
    );
}

#[test]
fn a_script_may_modify_the_record_in_place() {
    let transform = compile("record.seen = true; record.remove(\"secret\"); record");

    let out = transform.apply(&json!({"a": 1, "secret": "x"})).unwrap();

    assert_eq!(out, vec![json!({"a": 1, "seen": true})]);
}

#[test]
fn other_outputs_are_invalid() {
    for (script, expected) in [
        ("42", "i64"),
        ("\"text\"", "string"),
        ("[#{a: 1}, 2]", "element 1"),
        ("#{ f: Fn(\"x\") }", "/f"),
        ("#{ nan: 0.0 / 0.0 }", "/nan"),
    ] {
        let err = compile(script).apply(&json!({})).unwrap_err();

        let TransformError::InvalidOutput(message) = &err else {
            panic!("{script}: expected InvalidOutput, got {err:?}");
        };
        assert!(message.contains(expected), "{script}: {message}");
    }
}

#[test]
fn output_nested_deeper_than_128_levels_is_invalid() {
    let transform = compile("let m = #{}; for i in 0..200 { m = #{ a: m }; } m");

    let err = transform.apply(&json!({})).unwrap_err();

    assert_eq!(
        err,
        TransformError::InvalidOutput(
            "the output nests deeper than the limit of 128 levels".into()
        )
    );
}

#[test]
fn input_nested_deeper_than_128_levels_is_refused() {
    let mut record = json!({});
    for _ in 0..200 {
        record = json!({ "a": record });
    }

    let err = compile("record").apply(&record).unwrap_err();

    assert_eq!(err.code(), "data_too_large");
}

#[test]
fn big_integers_become_floats_and_chars_and_blobs_become_json() {
    let transform = compile("#{ big: record.big, c: 'x', b: blob(2, 7), f: 1.5 }");

    let out = transform.apply(&json!({"big": u64::MAX})).unwrap();

    assert_eq!(
        out,
        vec![json!({"big": u64::MAX as f64, "c": "x", "b": [7, 7], "f": 1.5})]
    );
}

#[test]
fn print_and_debug_are_captured_by_apply_traced_only() {
    let transform = compile("print(`n is ${record.n}`); debug(record.n); record");

    let (out, printed) = transform.apply_traced(&json!({"n": 5}));

    assert_eq!(out.unwrap(), vec![json!({"n": 5})]);
    assert_eq!(
        printed,
        vec!["n is 5".to_owned(), "[debug line 1] 5".to_owned()]
    );
    assert_eq!(
        transform.apply(&json!({"n": 5})).unwrap(),
        vec![json!({"n": 5})]
    );
}

#[test]
fn captured_output_is_capped() {
    let limits = Limits {
        max_operations: 10_000_000,
        deadline: Duration::from_secs(5),
        ..Limits::default()
    };
    let transform = compile_with("for i in 0..5000 { print(i) }", &limits);

    let (out, printed) = transform.apply_traced(&json!({}));

    assert!(out.unwrap().is_empty());
    assert_eq!(printed.len(), 1_001);
    assert!(
        printed[1_000].contains("4000 more lines dropped"),
        "{}",
        printed[1_000]
    );
}

#[test]
fn an_endless_loop_is_stopped_by_the_deadline() {
    let limits = Limits {
        max_operations: u64::MAX,
        ..Limits::default()
    };

    let err = stopped("loop {}", &limits);

    assert_eq!(err, TransformError::Deadline(limits.deadline));
    assert_eq!(err.code(), "deadline_exceeded");
    assert!(err.to_string().contains("50 ms"), "{err}");
}

#[test]
fn an_endless_loop_is_stopped_by_the_operation_limit() {
    let limits = Limits {
        deadline: Duration::from_secs(10),
        ..Limits::default()
    };

    let err = stopped("let x = 0; loop { x += 1; }", &limits);

    assert_eq!(err, TransformError::TooManyOperations(100_000));
    assert!(err.to_string().contains("100000 operations"), "{err}");
}

#[test]
fn endless_recursion_is_stopped_at_the_call_depth_limit() {
    let err = stopped("fn f(x) { f(x + 1) } f(0)", &Limits::default());

    assert_eq!(err, TransformError::TooDeep(32));
}

#[test]
fn a_string_that_doubles_forever_is_stopped_at_the_size_limit() {
    let err = stopped("let s = \"x\"; loop { s += s; }", &Limits::default());

    assert_eq!(
        err,
        TransformError::DataTooLarge("strings over the limit of 65536 bytes".into())
    );
}

#[test]
fn an_array_that_doubles_forever_is_stopped_at_the_size_limit() {
    let err = stopped("let a = [1]; loop { a += a; }", &Limits::default());

    assert_eq!(
        err,
        TransformError::DataTooLarge("arrays over the limit of 10000 elements".into())
    );
}

#[test]
fn a_map_that_grows_forever_is_stopped() {
    // Rhai does not re-measure a map grown through `m[k] = v`; the operation limit stops it.
    // The deadline is far off: in a debug build on a busy machine, 100,000 operations can take
    // longer than the default 50 ms.
    let limits = Limits {
        deadline: Duration::from_secs(10),
        ..Limits::default()
    };
    let err = stopped(
        "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }",
        &limits,
    );

    assert_eq!(err, TransformError::TooManyOperations(100_000));
}

#[test]
fn a_map_grown_past_the_limit_is_refused_when_returned() {
    let limits = Limits {
        max_operations: u64::MAX,
        deadline: Duration::from_secs(10),
        ..Limits::default()
    };

    let err = stopped(
        "let m = #{}; for i in 0..20000 { m[`k${i}`] = i; } m",
        &limits,
    );

    assert_eq!(
        err,
        TransformError::DataTooLarge("object maps over the limit of 10000 entries".into())
    );
}

#[test]
fn a_map_that_doubles_forever_is_stopped_at_the_size_limit() {
    let err = stopped(
        "let m = #{ a: 1 }; loop { m = #{ l: m, r: m }; }",
        &Limits::default(),
    );

    assert_eq!(
        err,
        TransformError::DataTooLarge("object maps over the limit of 10000 entries".into())
    );
}

#[test]
fn a_replace_that_would_multiply_a_string_is_refused_before_it_runs() {
    let script = "let s = \"a\"; s.pad(60000, 'a'); let t = \"b\"; t.pad(60000, 'b'); \
                  s.replace(\"a\", t); #{ n: s.len() }";

    let err = stopped(script, &Limits::default());

    assert_eq!(
        err,
        TransformError::DataTooLarge("strings over the limit of 65536 bytes".into())
    );
}

#[test]
fn replace_still_replaces() {
    let transform = compile(
        "let a = record.s; a.replace(\"b\", \"xyz\"); let b = record.s; b.replace('b', \"-\"); \
         let c = record.s; c.replace(\"ab\", '!'); let d = record.s; d.replace('a', 'A'); \
         #{ a: a, b: b, c: c, d: d }",
    );

    let out = transform.apply(&json!({"s": "abab"})).unwrap();

    assert_eq!(
        out,
        vec![json!({"a": "axyzaxyz", "b": "a-a-", "c": "!!", "d": "AbAb"})]
    );
}

#[test]
fn a_huge_output_is_refused_as_too_many_outputs() {
    // Raised so that only max_outputs stands between the script and its 100k records.
    let limits = Limits {
        max_operations: u64::MAX,
        max_array_len: 200_000,
        max_map_len: 200_000,
        deadline: Duration::from_secs(30),
        ..Limits::default()
    };
    // `pad` builds the array in one operation (a `push` loop would re-measure it each time).
    let transform = compile_with("let out = []; out.pad(100000, #{ i: 1 }); out", &limits);

    let err = transform.apply(&json!({})).unwrap_err();

    assert_eq!(
        err,
        TransformError::TooManyOutputs {
            count: 100_000,
            limit: 1_000
        }
    );
}

#[test]
fn a_huge_output_under_default_limits_is_stopped_while_it_is_built() {
    let err = stopped(
        "let out = []; for i in 0..100000 { out.push(#{ i: i }) } out",
        &Limits::default(),
    );

    // Which limit comes first depends on the machine's speed; any of them stops it in time.
    assert!(
        matches!(
            err,
            TransformError::DataTooLarge(_)
                | TransformError::TooManyOperations(_)
                | TransformError::Deadline(_)
        ),
        "{err:?}"
    );
}

#[test]
fn a_runtime_error_fails_only_the_records_that_raise_it() {
    let transform = compile("if record.n == 3 { throw \"bad record\" } record");

    let results: Vec<_> = (1..=5).map(|n| transform.apply(&json!({"n": n}))).collect();

    for (n, result) in (1..=5).zip(&results) {
        if n == 3 {
            assert_eq!(
                result,
                &Err(TransformError::Runtime {
                    line: Some(1),
                    message: "bad record".into()
                })
            );
        } else {
            assert_eq!(result, &Ok(vec![json!({"n": n})]));
        }
    }
}

#[test]
fn a_thrown_record_is_not_echoed_into_the_error() {
    let transform = compile("throw record");

    let err = transform
        .apply(&json!({"password": "hunter2"}))
        .unwrap_err();

    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert_eq!(err.code(), "runtime_error");
}

#[test]
fn an_error_inside_a_function_reports_the_line_that_failed() {
    let transform =
        compile("fn check(n) {\n  if n > 1 { throw \"too big\" }\n  n\n}\n#{ n: check(record.n) }");

    let err = transform.apply(&json!({"n": 2})).unwrap_err();

    assert_eq!(
        err,
        TransformError::Runtime {
            line: Some(2),
            message: "too big".into()
        }
    );
}

#[test]
fn eval_is_refused() {
    let err = Transform::compile(Some("eval(\"1 + 1\")"), None, &Limits::default()).unwrap_err();

    assert!(matches!(err, CompileError::Syntax { .. }), "{err:?}");
    assert!(err.to_string().contains("eval"), "{err}");
}

#[test]
fn import_is_refused() {
    let err = Transform::compile(
        Some("import \"std\" as s; record"),
        None,
        &Limits::default(),
    )
    .unwrap_err();

    assert!(matches!(err, CompileError::Syntax { .. }), "{err:?}");
    assert!(err.to_string().contains("import"), "{err}");
}

#[test]
fn sleep_and_clocks_are_not_available() {
    for script in ["sleep(10); record", "timestamp(); record"] {
        let err = Transform::compile(Some(script), None, &Limits::default()).unwrap_err();

        assert!(
            matches!(&err, CompileError::UnknownFunction { line: Some(1), .. }),
            "{script}: {err:?}"
        );
    }
    // Called through a pointer, which no compile-time check can follow, they are not found.
    let err = compile("let f = Fn(\"sleep\"); f.call(10); record")
        .apply(&json!({}))
        .unwrap_err();
    assert!(
        matches!(&err, TransformError::Runtime { message, .. } if message.contains("not found")),
        "{err:?}"
    );
}

#[test]
fn a_syntax_error_reports_line_and_column() {
    let err =
        Transform::compile(Some("let a = 1;\nlet b = ;"), None, &Limits::default()).unwrap_err();

    let CompileError::Syntax { line, column, .. } = &err else {
        panic!("expected Syntax, got {err:?}");
    };
    assert_eq!((*line, *column), (Some(2), Some(9)));
    assert_eq!(err.field(), "transform");
    assert!(err.to_string().contains("line 2, column 9"), "{err}");
}

#[test]
fn an_undefined_variable_is_refused_at_compile_time() {
    let err = Transform::compile(Some("#{ a: recrod.a }"), None, &Limits::default()).unwrap_err();

    assert!(err.to_string().contains("recrod"), "{err}");
}

#[test]
fn an_oversized_script_is_refused() {
    let script = format!("// {}\nrecord", "x".repeat(70_000));

    let err = Transform::compile(Some(&script), None, &Limits::default()).unwrap_err();

    assert_eq!(
        err,
        CompileError::ScriptTooLarge {
            bytes: script.len(),
            limit: 65_536
        }
    );
    assert_eq!(err.code(), "script_too_large");
}

#[test]
fn a_too_deeply_nested_expression_is_refused() {
    let script = format!("{}1{}", "(".repeat(200), ")".repeat(200));

    let err = Transform::compile(Some(&script), None, &Limits::default()).unwrap_err();

    assert!(
        matches!(err, CompileError::TooDeep { limit: 64, .. }),
        "{err:?}"
    );
}

#[test]
fn an_invalid_output_schema_is_refused_at_compile() {
    let err = Transform::compile(
        None,
        Some(&json!({"type": "no-such-type"})),
        &Limits::default(),
    )
    .unwrap_err();

    assert!(matches!(err, CompileError::InvalidSchema(_)), "{err:?}");
    assert_eq!(err.field(), "output_schema");
}

#[test]
fn an_output_schema_with_an_external_reference_is_refused_without_fetching() {
    let schema = json!({"$ref": "http://127.0.0.1:9/schema.json"});

    let err = Transform::compile(None, Some(&schema), &Limits::default()).unwrap_err();

    assert!(matches!(err, CompileError::InvalidSchema(_)), "{err:?}");
}

#[test]
fn an_output_schema_pattern_needing_backtracking_is_refused_at_compile() {
    let schema = json!({"properties": {"s": {"type": "string", "pattern": "^(?=a)a+$"}}});

    let err = Transform::compile(None, Some(&schema), &Limits::default()).unwrap_err();

    assert!(matches!(err, CompileError::InvalidSchema(_)), "{err:?}");
}

#[test]
fn an_output_violating_the_schema_reports_the_path() {
    let schema = json!({
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"age": {"type": "integer"}}}},
        "required": ["user"],
    });
    let transform = Transform::compile(Some("record"), Some(&schema), &Limits::default()).unwrap();

    let bad_type = transform
        .apply(&json!({"user": {"age": "forty-two"}}))
        .unwrap_err();
    let missing = transform.apply(&json!({"name": "x"})).unwrap_err();

    let TransformError::SchemaViolation { path, reason } = &bad_type else {
        panic!("expected SchemaViolation, got {bad_type:?}");
    };
    assert_eq!(path, "/user/age");
    assert!(reason.contains("type"), "{reason}");
    assert!(!bad_type.to_string().contains("forty-two"), "{bad_type}");
    let TransformError::SchemaViolation { path, reason } = &missing else {
        panic!("expected SchemaViolation, got {missing:?}");
    };
    assert_eq!(path, "");
    assert!(reason.contains("\"user\""), "{reason}");
    assert!(transform.apply(&json!({"user": {"age": 42}})).is_ok());
}

#[test]
fn the_identity_transform_is_checked_against_the_schema_too() {
    let schema = json!({"type": "object", "required": ["id"]});
    let transform = Transform::compile(None, Some(&schema), &Limits::default()).unwrap();

    assert!(transform.apply(&json!({"id": 1})).is_ok());
    assert_eq!(
        transform.apply(&json!({})).unwrap_err().code(),
        "schema_violation"
    );
}

#[test]
fn no_transform_error_is_retryable() {
    let errors = [
        TransformError::Deadline(Duration::from_millis(50)),
        TransformError::TooManyOperations(1),
        TransformError::TooDeep(1),
        TransformError::DataTooLarge("x".into()),
        TransformError::TooManyOutputs { count: 2, limit: 1 },
        TransformError::Runtime {
            line: None,
            message: "x".into(),
        },
        TransformError::InvalidOutput("x".into()),
        TransformError::SchemaViolation {
            path: "".into(),
            reason: "x".into(),
        },
    ];

    for err in errors {
        assert!(!err.is_retryable(), "{err:?}");
    }
}

#[test]
fn threads_sharing_a_transform_do_not_share_deadlines() {
    let limits = Limits {
        max_operations: u64::MAX,
        deadline: Duration::from_millis(200),
        ..Limits::default()
    };
    let transform = compile_with(
        "if record.slow { loop {} } let s = 0; for i in 0..100 { s += i } #{ s: s }",
        &limits,
    );

    let (slow, fast) = std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            let started = Instant::now();
            (transform.apply(&json!({"slow": true})), started.elapsed())
        });
        let fast: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    // Keep applying while the slow record runs: each fast call arms and
                    // clears its own deadline on its own thread.
                    let started = Instant::now();
                    let mut results = Vec::new();
                    while started.elapsed() < Duration::from_millis(300) {
                        results.push(transform.apply(&json!({"slow": false})));
                    }
                    results
                })
            })
            .collect();
        (
            slow.join().unwrap(),
            fast.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
        )
    });

    let (slow_result, slow_elapsed) = slow;
    assert_eq!(slow_result, Err(TransformError::Deadline(limits.deadline)));
    assert!(slow_elapsed >= limits.deadline, "{slow_elapsed:?}");
    assert!(slow_elapsed < limits.deadline + MARGIN, "{slow_elapsed:?}");
    for results in fast {
        assert!(!results.is_empty());
        for result in results {
            assert_eq!(result, Ok(vec![json!({"s": 4950})]));
        }
    }
}

#[test]
fn transform_is_send_sync_and_clone() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    assert_send_sync_clone::<Transform>();
}

/// Sorts floats with NaNs among them when `record.nan` is true: Rhai's sort hands the
/// inconsistent order to the standard library's sort, which panics on detecting it.
const NAN_SORT: &str = r#"
let a = [];
for i in 0..21 {
    if record.nan && i % 3 == 0 { a.push(parse_float("NaN")) } else { a.push(((i * 7919) % 101).to_float()) }
}
a.sort();
#{ n: record.n, sorted: a.len() }
"#;

#[test]
fn a_panic_inside_the_engine_fails_only_the_record_that_caused_it() {
    let transform = compile(NAN_SORT);

    let poisoned = transform.apply(&json!({"n": 1, "nan": true}));
    let clean = transform.apply(&json!({"n": 2, "nan": false}));

    let err = poisoned.unwrap_err();
    assert_eq!(err.code(), "transform_panicked", "{err}");
    assert!(err.to_string().starts_with("transform panicked: "), "{err}");
    assert_eq!(clean, Ok(vec![json!({"n": 2, "sorted": 21})]));
    // The thread's per-call state was restored by the unwinding: a traced call still works.
    let (again, printed) = compile("print(\"hi\"); record").apply_traced(&json!({"n": 3}));
    assert_eq!(
        (again, printed),
        (Ok(vec![json!({"n": 3})]), vec!["hi".to_owned()])
    );
}

#[test]
fn a_paced_thread_rests_and_its_rests_do_not_count_against_the_deadline() {
    // 5 % of a core: 19 ms of rest after every 1 ms of computing. The loop computes for a few
    // milliseconds, so paced it takes several times its 60 ms deadline in all.
    let limits = Limits {
        deadline: Duration::from_millis(60),
        max_operations: 50_000_000,
        ..Limits::default()
    };
    let transform = compile_with(
        "let n = 0; for i in 0..20000 { n += i % 7; } #{ n: n }",
        &limits,
    );
    let (result, elapsed) = std::thread::spawn(move || {
        pace_this_thread(5);
        let started = Instant::now();
        (transform.apply(&json!({})), started.elapsed())
    })
    .join()
    .expect("the paced thread ran");
    assert!(
        elapsed > limits.deadline,
        "the paced run took {elapsed:?}: it did not rest"
    );
    let out = result.expect("rests are not the script's time");
    assert_eq!(out[0]["n"], json!((0..20_000).map(|i| i % 7).sum::<i64>()));
}
