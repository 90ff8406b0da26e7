//! The compile-time check of function calls.

use super::*;

fn compiled(script: &str) -> Result<Transform, CompileError> {
    Transform::compile(Some(script), None, &Limits::default())
}

#[test]
fn a_call_to_an_unknown_function_is_refused_with_its_name_and_position() {
    let err = compiled("let x = 1;\nlet y = frobnicate(record.n, x);\ny").unwrap_err();

    assert_eq!(
        err,
        CompileError::UnknownFunction {
            name: "frobnicate".into(),
            line: Some(2),
            column: Some(9),
        }
    );
    assert_eq!(err.field(), "transform");
    assert_eq!(err.code(), "unknown_function");
    assert!(
        err.to_string()
            .contains("unknown function frobnicate at line 2, column 9"),
        "{err}"
    );
}

#[test]
fn unknown_calls_are_found_inside_closures_functions_and_methods() {
    for script in [
        "let a = [1]; a.map(|x| nope(x))",
        "fn f(x) { nope(x) } f(1)",
        "record.name.nope()",
        "if record.n > 1 { #{ a: [1, 2].filter(|x| x.nope()) } }",
    ] {
        let err = compiled(script).err();
        assert!(
            matches!(&err, Some(CompileError::UnknownFunction { name, .. }) if name == "nope"),
            "{script}: {err:?}"
        );
    }
}

#[test]
fn every_form_of_a_known_call_compiles() {
    for script in [
        // Built-ins, operators and what the syntax turns into calls.
        r#"let s = `a ${record.n} b`; let t = "x" in s; let r = 0..3; for i in r {} !t"#,
        "let a = [3, 1, 2]; a.sort(); a.len(); a.contains(1); -a[0] + abs(-1)",
        "let m = #{ a: 1 }; m.keys(); m.values(); m?.a ?? 0",
        "switch record.n { 1 => 1, _ => 2 }",
        "print(1); debug(2); type_of(3); is_def_fn(\"f\", 1)",
        // Defined functions, closures and function pointers.
        "fn double(x) { x * 2 } double(record.n)",
        "let f = |x| x + 1; f.call(1); f(2)",
        "let g = Fn(\"h\"); fn h(x) { x } g.call(1); call(g, 2); g.curry(3)",
        "let o = #{ f: |x| x }; o.f(1)",
        "let o = #{}; o.handler = |x| x; o.handler(2)",
        "fn apply(p, v) { p(v) } apply(|x| x, 1)",
        "parse_int(\"1\") + parse_float(\"1.5\").to_int() + \"abc\".len()",
        "record.tags.map(|t| t.to_upper()).reduce(|s, t| s + t, \"\")",
    ] {
        if let Err(e) = compiled(script) {
            panic!("{script}: {e}");
        }
    }
}
