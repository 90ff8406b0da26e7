//! Transforms: a datasource version's Rhai script, compiled once per version and run per
//! record under hard limits, and the JSON Schema every output record must match.
//!
//! Owns compiling `"transform"` and `"output_schema"` from a version config
//! ([`Transform::from_config`]), the sandbox scripts run in, and mapping one input record to
//! zero or more output records ([`Transform::apply`]). Does not own clocks beyond the
//! per-record deadline, sockets, where records come from or go to (that is `connectors`), nor
//! retries: every [`TransformError`] is about the record or the script, never transient.
//! Nothing runs in the background; a call stops when its script ends or a limit stops it.
//!
//! # Script contract
//!
//! The input record is the variable `record`, an object map converted from the JSON record
//! (`null` is `()`, integers beyond `i64` become floats). The script's value is its output:
//! - `()` (for example an `if` without `else` that did not match): no record;
//! - an object map: one record;
//! - an array of object maps: one record each (at most [`Limits::max_outputs`]);
//! - anything else: [`TransformError::InvalidOutput`].
//!
//! ```rhai
//! // Drop heartbeats.
//! if record.kind == "heartbeat" { return; }
//!
//! // Rename, convert and compute fields.
//! let out = #{
//!     id: record.event_id,
//!     amount_cents: (parse_float(record.amount) * 100.0).to_int(),
//!     user: record.user.to_lower(),
//! };
//!
//! // Split an order into one record per line item.
//! if record.items != () {
//!     return record.items.map(|item| #{ order: out.id, sku: item.sku, qty: item.qty });
//! }
//! out
//! ```
//!
//! # Sandbox and limits
//!
//! Scripts get Rhai's standard library minus clocks, `sleep`, `exit` and reflection. There is
//! no file, network, process or environment access, `eval` is disabled and the crate builds
//! Rhai with `no_module`, so `import` does not parse. A call to a function that is neither
//! built in nor defined in the script is refused at compile time, with its name and position
//! (calls through function pointers are resolved when they run). `print`/`debug` never reach
//! stdout: [`Transform::apply_traced`] returns them, [`Transform::apply`] drops them.
//!
//! Every limit in [`Limits`] holds per record, wherever the script runs — callbacks of `map`,
//! `filter`, `reduce` and the like, nested at any depth, included. Rhai runs callbacks on a
//! copy of its run state and does not carry their operation count back, so the sandbox keeps
//! its own budget per call, per thread, fed by the engine's progress hook (called at every
//! operation): the operation count is checked at every operation; the deadline, the cancel
//! flag of [`Transform::apply_traced_cancellable`] and the memory the call holds (counted by
//! the process's allocator, [`Metered`]) every 64 operations. A stopped call stays stopped:
//! `try`/`catch` cannot catch it, and every later operation stops again.
//!
//! String, array and map limits apply to the total inside one value: an array of maps counts
//! every map entry, and a record's strings count together. Rhai measures a value after each
//! operation that makes it, so one operation can build more than a size limit before it is
//! refused: `replace`, which could multiply a string, is shadowed by a version that checks
//! first; a native function collecting callback results (`array.map` building a long string
//! per element) is bounded by the memory limit, checked between its callbacks. Output is
//! measured again on the way out, since a map grown key by key (`m[k] = v`) is not measured
//! by Rhai until it is passed on.
//!
//! Output converts back to JSON: `()` is `null`, characters are strings, BLOBs are arrays of
//! numbers; NaN, infinities and function pointers are [`TransformError::InvalidOutput`], as is
//! nesting deeper than 128 levels. Output schemas must be self-contained (no external `$ref`
//! is fetched) and their `pattern`s use a linear-time regex engine, so look-around and
//! back-references are refused at compile time.
//!
//! `apply` is synchronous CPU work bounded by [`Limits::deadline`] (schema validation comes
//! after, outside it); async callers batching many records should run it on a blocking
//! thread.

mod check;
mod error;
mod meter;
mod sandbox;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_callbacks;
#[cfg(test)]
mod tests_check;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rhai::{AST, Dynamic, Engine, EvalAltResult, ParseError, ParseErrorType, Scope};
use serde_json::Value;

pub use error::{CompileError, TransformError};
pub use meter::{Metered, live_bytes};
pub use sandbox::{Cancel, pace_this_thread};

/// The name the input record has in scripts.
const RECORD: &str = "record";
/// Runtime messages are clipped to this many bytes, so a script cannot smuggle a whole
/// record into an error.
const MAX_MESSAGE_BYTES: usize = 256;
/// Nesting allowed in input and output records (serde_json's own parsing limit), so that
/// converting them cannot overflow the stack.
const MAX_DEPTH: usize = 128;

/// Hard limits a transform runs under, per record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Rhai operations per record (one per expression node evaluated, roughly).
    pub max_operations: u64,
    /// Nested function calls (recursion depth).
    pub max_call_depth: usize,
    /// Nesting of expressions in the script, checked at compile time.
    pub max_expr_depth: usize,
    /// Bytes of string data in one value (all strings inside an array or map together).
    pub max_string_bytes: usize,
    /// Elements in one array, nested arrays included.
    pub max_array_len: usize,
    /// Entries in one object map, nested maps included (so an array of 100 ten-field
    /// records counts 1,000).
    pub max_map_len: usize,
    /// Output records one input record may produce.
    pub max_outputs: usize,
    /// Size of the script source.
    pub max_script_bytes: usize,
    /// Bytes one call may hold allocated at once, everything it builds counted (values,
    /// callback results, intermediate strings), read between operations.
    pub max_memory_bytes: usize,
    /// Wall-clock time per record.
    pub deadline: Duration,
}

impl Default for Limits {
    /// 100,000 operations, call depth 32, expression depth 64, 64 KiB of strings, 10,000
    /// array elements, 10,000 map entries, 1,000 outputs, 64 KiB of script, 32 MiB of memory,
    /// 50 ms.
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_bytes: 64 * 1024,
            max_array_len: 10_000,
            max_map_len: 10_000,
            max_outputs: 1_000,
            max_script_bytes: 64 * 1024,
            max_memory_bytes: 32 * 1024 * 1024,
            deadline: Duration::from_millis(50),
        }
    }
}

/// A version's compiled transform and output schema, ready to apply to records.
///
/// Compiled once per version; cloning is cheap (an `Arc`) and clones may be applied from
/// several threads at once.
#[derive(Clone)]
pub struct Transform {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` is the identity transform.
    program: Option<Program>,
    schema: Option<jsonschema::Validator>,
    limits: Limits,
}

struct Program {
    engine: Engine,
    ast: AST,
}

impl fmt::Debug for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transform")
            .field("script", &self.inner.program.is_some())
            .field("output_schema", &self.inner.schema.is_some())
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Transform {
    /// Compiles `script` (`None` is the identity: each record passes through unchanged) and
    /// the optional output schema.
    ///
    /// # Errors
    ///
    /// [`CompileError::ScriptTooLarge`], [`CompileError::Syntax`] (including `eval`, `import`
    /// and variables other than `record` that are never defined), [`CompileError::TooDeep`],
    /// or [`CompileError::InvalidSchema`].
    pub fn compile(
        script: Option<&str>,
        output_schema: Option<&Value>,
        limits: &Limits,
    ) -> Result<Transform, CompileError> {
        let program = script.map(|s| compile_script(s, limits)).transpose()?;
        let schema = output_schema.map(compile_schema).transpose()?;
        Ok(Transform {
            inner: Arc::new(Inner {
                program,
                schema,
                limits: limits.clone(),
            }),
        })
    }

    /// Reads `"transform"` and `"output_schema"` from a version config object and compiles
    /// them. A missing or `null` field means no script (identity) or no schema.
    ///
    /// # Errors
    ///
    /// [`CompileError::NotAString`] when `transform` is not a string, otherwise as
    /// [`Transform::compile`].
    pub fn from_config(config: &Value, limits: &Limits) -> Result<Transform, CompileError> {
        let script = match config.get("transform") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(CompileError::NotAString),
        };
        let schema = match config.get("output_schema") {
            None | Some(Value::Null) => None,
            Some(schema) => Some(schema),
        };
        Transform::compile(script, schema, limits)
    }

    /// True when there is neither a script nor an output schema: `apply` returns each
    /// record unchanged and cannot fail, so callers may skip it.
    pub fn is_identity(&self) -> bool {
        self.inner.program.is_none() && self.inner.schema.is_none()
    }

    /// The limits this transform runs under.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Maps one input record to zero, one or many output records, each checked against the
    /// output schema. What the script prints is dropped.
    ///
    /// # Errors
    ///
    /// A [`TransformError`] for this record: a limit hit, a script failure, an output that is
    /// not records, or an output that violates the schema. Other records are unaffected.
    pub fn apply(&self, record: &Value) -> Result<Vec<Value>, TransformError> {
        self.run(record, None, false).0
    }

    /// Like [`Transform::apply`], also returning what the script printed with `print` and
    /// `debug` (capped at 1,000 lines and 64 KiB), for the test harness.
    pub fn apply_traced(
        &self,
        record: &Value,
    ) -> (Result<Vec<Value>, TransformError>, Vec<String>) {
        self.run(record, None, true)
    }

    /// Like [`Transform::apply_traced`], and stopped with [`TransformError::Cancelled`]
    /// within a few microseconds of `cancel` being set, wherever the script is.
    pub fn apply_traced_cancellable(
        &self,
        record: &Value,
        cancel: &Cancel,
    ) -> (Result<Vec<Value>, TransformError>, Vec<String>) {
        if cancel.is_cancelled() {
            return (Err(TransformError::Cancelled), Vec::new());
        }
        self.run(record, Some(cancel), true)
    }

    fn run(
        &self,
        record: &Value,
        cancel: Option<&Cancel>,
        traced: bool,
    ) -> (Result<Vec<Value>, TransformError>, Vec<String>) {
        let inner = &*self.inner;
        let Some(program) = &inner.program else {
            return (self.check(vec![record.clone()]), Vec::new());
        };
        let limits = &inner.limits;
        let call = sandbox::Call::begin(limits, cancel, traced);
        let output = to_dynamic(record).and_then(|input| {
            let mut scope = Scope::new();
            scope.push(RECORD, input);
            // Rhai's own functions can panic on odd data (sorting floats with a NaN among
            // them breaks the total order `sort` needs): that is this record's failure, not
            // the caller's. Unwinding is safe here: the engine and AST are only read during
            // an evaluation, the scope is dropped with the call, and `Call` restores the
            // thread's per-call state on drop.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                program
                    .engine
                    .eval_ast_with_scope::<Dynamic>(&mut scope, &program.ast)
            }))
            .map_err(|panic| TransformError::Panicked(clip(panic_message(panic.as_ref()))))?
            .map_err(|e| runtime_error(*e, limits))
        });
        let printed = call.finish();
        let result = output
            .and_then(|value| into_records(value, limits))
            .and_then(|records| self.check(records));
        (result, printed)
    }

    /// Validates output records against the output schema, if any.
    fn check(&self, records: Vec<Value>) -> Result<Vec<Value>, TransformError> {
        if let Some(schema) = &self.inner.schema {
            for record in &records {
                if let Err(e) = schema.validate(record) {
                    return Err(schema_violation(&e));
                }
            }
        }
        Ok(records)
    }
}

/// The text a panic carried, when it was a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

fn compile_script(script: &str, limits: &Limits) -> Result<Program, CompileError> {
    if script.len() > limits.max_script_bytes {
        return Err(CompileError::ScriptTooLarge {
            bytes: script.len(),
            limit: limits.max_script_bytes,
        });
    }
    let engine = sandbox::engine(limits);
    let mut scope = Scope::new();
    scope.push(RECORD, Dynamic::UNIT);
    let ast = engine
        .compile_with_scope(&scope, script)
        .map_err(|e| syntax_error(e, limits))?;
    if let Some((name, pos)) = check::unknown_call(&engine, &ast) {
        return Err(CompileError::UnknownFunction {
            name: clip(name),
            line: pos.line(),
            column: pos.position(),
        });
    }
    Ok(Program { engine, ast })
}

fn syntax_error(ParseError(kind, pos): ParseError, limits: &Limits) -> CompileError {
    match *kind {
        ParseErrorType::ExprTooDeep => CompileError::TooDeep {
            limit: limits.max_expr_depth,
            line: pos.line(),
        },
        kind => CompileError::Syntax {
            line: pos.line(),
            column: pos.position(),
            message: kind.to_string(),
        },
    }
}

fn compile_schema(schema: &Value) -> Result<jsonschema::Validator, CompileError> {
    jsonschema::options()
        // Linear-time regexes: a `pattern` cannot make validation backtrack for ever.
        .with_pattern_options(jsonschema::PatternOptions::regex())
        // Refuse every external `$ref` explicitly, whatever jsonschema's features say.
        .with_retriever(NoRetrieval)
        .build(schema)
        .map_err(|e| CompileError::InvalidSchema(clip(e.to_string())))
}

/// A schema retriever that fetches nothing: output schemas must be self-contained.
struct NoRetrieval;

impl jsonschema::Retrieve for NoRetrieval {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!(
            "external reference {uri} is not fetched: output_schema must be self-contained"
        )
        .into())
    }
}

fn schema_violation(e: &jsonschema::ValidationError<'_>) -> TransformError {
    use jsonschema::error::ValidationErrorKind as Kind;
    let detail = match e.kind() {
        Kind::Required { property } => format!("required property {property} is missing"),
        Kind::AdditionalProperties { unexpected } => {
            format!("unexpected properties {}", unexpected.join(", "))
        }
        kind => format!("value fails '{}'", kind.keyword()),
    };
    TransformError::SchemaViolation {
        path: e.instance_path().to_string(),
        reason: clip(format!("{detail} (schema {})", e.schema_path())),
    }
}

/// Converts the input record for the script. Written out rather than through
/// `rhai::serde::to_dynamic`, whose serde detour took an eighth of a mapping script's time.
fn to_dynamic(record: &Value) -> Result<Dynamic, TransformError> {
    let mut too_deep = false;
    let value = convert_input(record, MAX_DEPTH, &mut too_deep);
    if too_deep {
        return Err(TransformError::DataTooLarge(format!(
            "the record nests deeper than the limit of {MAX_DEPTH} levels"
        )));
    }
    Ok(value)
}

/// Infallible on purpose (collecting `Result`s measured slower): past `depth` levels it sets
/// `too_deep` and stops descending.
fn convert_input(value: &Value, depth: usize, too_deep: &mut bool) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        // Integers beyond i64 become floats, as with rhai's serde support.
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => s.as_str().into(),
        _ if depth == 0 => {
            *too_deep = true;
            Dynamic::UNIT
        }
        Value::Array(items) => Dynamic::from_array(
            items
                .iter()
                .map(|item| convert_input(item, depth - 1, too_deep))
                .collect(),
        ),
        Value::Object(fields) => Dynamic::from_map(
            fields
                .iter()
                .map(|(k, v)| (k.as_str().into(), convert_input(v, depth - 1, too_deep)))
                .collect(),
        ),
    }
}

/// Turns the script's value into output records.
fn into_records(value: Dynamic, limits: &Limits) -> Result<Vec<Value>, TransformError> {
    let value = value.flatten();
    let mut output = Output::new(limits);
    if value.is_unit() {
        return Ok(Vec::new());
    }
    if value.is_map() {
        return Ok(vec![
            output.convert(value).map_err(|e| (*e).into_error(None))?,
        ]);
    }
    if value.is_array() {
        let items = value
            .into_array()
            .map_err(|t| (*OutputError::no_json(t)).into_error(None))?;
        if items.len() > limits.max_outputs {
            return Err(TransformError::TooManyOutputs {
                count: items.len(),
                limit: limits.max_outputs,
            });
        }
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let item = item.flatten();
                if !item.is_map() {
                    return Err(TransformError::InvalidOutput(format!(
                        "element {i} of the returned array is {}, expected an object map",
                        item.type_name()
                    )));
                }
                output.convert(item).map_err(|e| (*e).into_error(Some(i)))
            })
            .collect();
    }
    Err(TransformError::InvalidOutput(format!(
        "the script returned {}, expected an object map, an array of object maps, or ()",
        value.type_name()
    )))
}

/// Converts output values to JSON, measuring them against the size limits as it goes.
///
/// Rhai measures a value when it is assigned or passed to a function, but not a map or array
/// grown element by element through an index (`m[k] = v`), so the output is measured again
/// here, all records together, the way Rhai measures one value.
struct Output<'a> {
    limits: &'a Limits,
    string_bytes: usize,
    array_len: usize,
    map_len: usize,
    /// Maps and arrays the value being converted is inside.
    depth: usize,
}

/// Why an output value could not be converted, and where: the path is collected on the way
/// out of the recursion (innermost token first), so converting costs nothing for it.
struct OutputError {
    fault: Fault,
    reversed_path: Vec<String>,
}

enum Fault {
    NoJson(&'static str),
    NonFinite(f64),
    Limit(TransformError),
}

impl OutputError {
    fn new(fault: Fault) -> Box<OutputError> {
        Box::new(OutputError {
            fault,
            reversed_path: Vec::new(),
        })
    }

    fn no_json(type_name: &'static str) -> Box<OutputError> {
        OutputError::new(Fault::NoJson(type_name))
    }

    fn limit(error: TransformError) -> Box<OutputError> {
        OutputError::new(Fault::Limit(error))
    }

    /// `record` is the index of the output record, when the script returned an array.
    fn into_error(self, record: Option<usize>) -> TransformError {
        let mut path = String::new();
        for token in self.reversed_path.iter().rev() {
            path.push('/');
            path.push_str(token);
        }
        let at = match record {
            Some(i) => format!("'{path}' of record {i}"),
            None => format!("'{path}'"),
        };
        match self.fault {
            Fault::NoJson(type_name) => TransformError::InvalidOutput(format!(
                "the value at {at} is a {type_name}, which has no JSON form"
            )),
            Fault::NonFinite(f) => TransformError::InvalidOutput(format!(
                "the number at {at} is {f}, which JSON cannot hold"
            )),
            Fault::Limit(error) => error,
        }
    }
}

/// The size limits output is measured against.
#[derive(Clone, Copy)]
enum Size {
    String,
    Array,
    Map,
}

impl<'a> Output<'a> {
    fn new(limits: &'a Limits) -> Self {
        Output {
            limits,
            string_bytes: 0,
            array_len: 0,
            map_len: 0,
            depth: 0,
        }
    }

    /// Adds `n` to the running total of `size` and fails once it passes its limit.
    fn count(&mut self, size: Size, n: usize) -> Result<(), Box<OutputError>> {
        let (total, limit, what) = match size {
            Size::String => (
                &mut self.string_bytes,
                self.limits.max_string_bytes,
                "string",
            ),
            Size::Array => (&mut self.array_len, self.limits.max_array_len, "array"),
            Size::Map => (&mut self.map_len, self.limits.max_map_len, "map"),
        };
        *total += n;
        if *total > limit {
            let error = TransformError::DataTooLarge(data_too_large(what, self.limits));
            return Err(OutputError::limit(error));
        }
        Ok(())
    }

    /// Enters a map or array of `len` items, refusing output nested deeper than [`MAX_DEPTH`].
    fn descend(&mut self, size: Size, len: usize) -> Result<(), Box<OutputError>> {
        self.count(size, len)?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(OutputError::limit(TransformError::InvalidOutput(format!(
                "the output nests deeper than the limit of {MAX_DEPTH} levels"
            ))));
        }
        Ok(())
    }

    fn convert(&mut self, value: Dynamic) -> Result<Value, Box<OutputError>> {
        let value = value.flatten();
        if value.is_string() {
            let s = value
                .into_immutable_string()
                .map_err(OutputError::no_json)?;
            self.count(Size::String, s.len())?;
            return Ok(Value::String(s.as_str().to_owned()));
        }
        if let Ok(i) = value.as_int() {
            return Ok(Value::from(i));
        }
        if value.is_map() {
            let map = value
                .try_cast::<rhai::Map>()
                .ok_or_else(|| OutputError::no_json("map"))?;
            self.descend(Size::Map, map.len())?;
            let mut fields = Vec::with_capacity(map.len());
            for (key, item) in map {
                match self.convert(item) {
                    Ok(item) => fields.push((String::from(key.as_str()), item)),
                    Err(mut e) => {
                        e.reversed_path.push(pointer_token(&key));
                        return Err(e);
                    }
                }
            }
            self.depth -= 1;
            // Keys arrive sorted: collecting sorts in one pass and bulk-builds the tree,
            // fewer instructions than inserting one by one.
            return Ok(Value::Object(fields.into_iter().collect()));
        }
        if value.is_unit() {
            return Ok(Value::Null);
        }
        if let Ok(b) = value.as_bool() {
            return Ok(Value::Bool(b));
        }
        if let Ok(f) = value.as_float() {
            return serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| OutputError::new(Fault::NonFinite(f)));
        }
        if value.is_array() {
            let items = value.into_array().map_err(OutputError::no_json)?;
            self.descend(Size::Array, items.len())?;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match self.convert(item) {
                    Ok(item) => out.push(item),
                    Err(mut e) => {
                        e.reversed_path.push(i.to_string());
                        return Err(e);
                    }
                }
            }
            self.depth -= 1;
            return Ok(Value::Array(out));
        }
        if let Ok(c) = value.as_char() {
            self.count(Size::String, c.len_utf8())?;
            return Ok(Value::String(c.to_string()));
        }
        if value.is_blob() {
            let bytes = value.into_blob().map_err(OutputError::no_json)?;
            self.count(Size::Array, bytes.len())?;
            return Ok(Value::Array(bytes.into_iter().map(Value::from).collect()));
        }
        Err(OutputError::no_json(value.type_name()))
    }
}

/// `key` escaped as a JSON Pointer token (RFC 6901).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Maps an evaluation error to ours: limits by the limit hit, everything else as a runtime
/// failure at the innermost position known.
fn runtime_error(mut error: EvalAltResult, limits: &Limits) -> TransformError {
    let mut line = error.position().line();
    // Errors inside script functions come wrapped once per call level; the cause is inside.
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, pos) = error {
        line = pos.line().or(line);
        error = *inner;
    }
    if let Some(inner_line) = error.take_position().line() {
        line = Some(inner_line);
    }
    match error {
        EvalAltResult::ErrorTerminated(token, ..) => match sandbox::Stop::from_token(&token) {
            Some(sandbox::Stop::Operations) => {
                TransformError::TooManyOperations(limits.max_operations)
            }
            Some(sandbox::Stop::Memory) => TransformError::Memory(limits.max_memory_bytes),
            Some(sandbox::Stop::Cancelled) => TransformError::Cancelled,
            Some(sandbox::Stop::Deadline) | None => TransformError::Deadline(limits.deadline),
        },
        EvalAltResult::ErrorTooManyOperations(..) => {
            TransformError::TooManyOperations(limits.max_operations)
        }
        EvalAltResult::ErrorStackOverflow(..) => TransformError::TooDeep(limits.max_call_depth),
        EvalAltResult::ErrorTooManyVariables(..) => TransformError::DataTooLarge(format!(
            "variables over the limit of {} alive at once",
            sandbox::MAX_VARIABLES
        )),
        EvalAltResult::ErrorDataTooLarge(what, ..) => {
            TransformError::DataTooLarge(data_too_large(&what, limits))
        }
        EvalAltResult::ErrorRuntime(thrown, ..) => TransformError::Runtime {
            line,
            message: match thrown.into_immutable_string() {
                Ok(s) if s.is_empty() => "script threw an empty string".to_owned(),
                Ok(s) => clip(s.to_string()),
                // A thrown map or array would echo the record: name its type only.
                Err(type_name) => format!("script threw a value of type {type_name}"),
            },
        },
        other => TransformError::Runtime {
            line,
            message: clip(other.to_string()),
        },
    }
}

/// Names the size limit behind a Rhai "... too large" error, with its value.
fn data_too_large(what: &str, limits: &Limits) -> String {
    let what = what.to_ascii_lowercase();
    if what.contains("string") {
        format!(
            "strings over the limit of {} bytes",
            limits.max_string_bytes
        )
    } else if what.contains("map") {
        format!(
            "object maps over the limit of {} entries",
            limits.max_map_len
        )
    } else if what.contains("array") || what.contains("blob") {
        format!("arrays over the limit of {} elements", limits.max_array_len)
    } else {
        clip(format!("{what} too large"))
    }
}

/// Cuts `s` to [`MAX_MESSAGE_BYTES`] on a character boundary.
fn clip(mut s: String) -> String {
    if s.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}
