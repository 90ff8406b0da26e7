//! The transform layer's errors: [`CompileError`] when a version is published or loaded,
//! [`TransformError`] per record. Messages name the limit and its value; they never carry
//! input records (at most a field name, a path or a type).

use std::time::Duration;

/// Why a version's `transform` script or `output_schema` could not be compiled.
///
/// Reported at publish time as a violation of the field [`CompileError::field`] names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// `transform` is present but not a string.
    #[error("transform must be a string holding a Rhai script")]
    NotAString,
    /// The script is longer than [`Limits::max_script_bytes`](super::Limits::max_script_bytes).
    #[error("transform script is {bytes} bytes, over the limit of {limit} bytes")]
    ScriptTooLarge {
        /// Size of the script.
        bytes: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The script does not parse; `line` and `column` are 1-based when known.
    #[error("transform syntax error{}: {message}", at(*line, *column))]
    Syntax {
        /// Line of the error, 1-based.
        line: Option<usize>,
        /// Column of the error, 1-based.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The script nests expressions deeper than
    /// [`Limits::max_expr_depth`](super::Limits::max_expr_depth).
    #[error("transform nests expressions deeper than the limit of {limit}{}", at(*line, None))]
    TooDeep {
        /// The limit it exceeds.
        limit: usize,
        /// Line where the limit was hit, 1-based.
        line: Option<usize>,
    },
    /// The script calls a function that is neither built in, registered nor defined in it.
    #[error("transform calls unknown function {name}{}", at(*line, *column))]
    UnknownFunction {
        /// The function's name.
        name: String,
        /// Line of the call, 1-based.
        line: Option<usize>,
        /// Column of the call, 1-based.
        column: Option<usize>,
    },
    /// `output_schema` is not a valid JSON Schema (or refers to an external document, which
    /// is never fetched).
    #[error("output_schema is not a valid JSON Schema: {0}")]
    InvalidSchema(String),
}

impl CompileError {
    /// The version config field at fault: `"transform"` or `"output_schema"`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::InvalidSchema(_) => "output_schema",
            Self::NotAString
            | Self::ScriptTooLarge { .. }
            | Self::Syntax { .. }
            | Self::TooDeep { .. }
            | Self::UnknownFunction { .. } => "transform",
        }
    }

    /// The 1-based line of the script the error is at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Syntax { line, .. }
            | Self::TooDeep { line, .. }
            | Self::UnknownFunction { line, .. } => *line,
            Self::NotAString | Self::ScriptTooLarge { .. } | Self::InvalidSchema(_) => None,
        }
    }

    /// A short snake_case code for API error details and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotAString => "not_a_string",
            Self::ScriptTooLarge { .. } => "script_too_large",
            Self::Syntax { .. } => "syntax_error",
            Self::TooDeep { .. } => "too_deep",
            Self::UnknownFunction { .. } => "unknown_function",
            Self::InvalidSchema(_) => "invalid_schema",
        }
    }
}

/// Why one record could not be transformed. It is about the record or the script, never
/// transient: see [`TransformError::is_retryable`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    /// The script ran past the per-record wall-clock deadline.
    #[error("transform ran past its deadline of {} ms", .0.as_millis())]
    Deadline(Duration),
    /// The script ran more operations than allowed (the limit).
    #[error("transform exceeded the limit of {0} operations")]
    TooManyOperations(u64),
    /// The script built more memory than allowed (the limit, in bytes), callbacks included.
    #[error("transform built more than the limit of {0} bytes of memory")]
    Memory(usize),
    /// The run this call belonged to ended (its deadline passed or its caller went away).
    #[error("transform stopped: the run it belonged to ended")]
    Cancelled,
    /// Function calls nested deeper than allowed (the limit).
    #[error("transform exceeded the limit of {0} nested function calls")]
    TooDeep(usize),
    /// A string, array or map grew past its limit; the message names which and the limit.
    #[error("transform data too large: {0}")]
    DataTooLarge(String),
    /// The script returned more records than allowed.
    #[error("transform returned {count} records, over the limit of {limit}")]
    TooManyOutputs {
        /// Records returned.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The script failed: a `throw`, a type mismatch, an unknown function...
    #[error("transform failed{}: {message}", at(*line, None))]
    Runtime {
        /// Line of the failure, 1-based, when known.
        line: Option<usize>,
        /// What failed (thrown strings are kept, clipped; other thrown values by type only).
        message: String,
    },
    /// The script returned something that is not `()`, an object map or an array of them,
    /// or a value with no JSON form.
    #[error("transform output is invalid: {0}")]
    InvalidOutput(String),
    /// The script engine panicked on this record (a bug in a library function meeting odd
    /// data, such as sorting floats with a NaN among them); the message is the panic's.
    #[error("transform panicked: {0}")]
    Panicked(String),
    /// An output record does not match the version's `output_schema`.
    #[error("transform output violates output_schema at '{path}': {reason}")]
    SchemaViolation {
        /// JSON Pointer to the offending value in the output record (`""` is the record).
        path: String,
        /// The schema keyword that failed, and where in the schema.
        reason: String,
    },
}

impl TransformError {
    /// Always false: the same record through the same script fails the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// A short snake_case code for API error details, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Deadline(_) => "deadline_exceeded",
            Self::TooManyOperations(_) => "too_many_operations",
            Self::TooDeep(_) => "too_deep",
            Self::Memory(_) => "memory_limit",
            Self::Cancelled => "cancelled",
            Self::DataTooLarge(_) => "data_too_large",
            Self::TooManyOutputs { .. } => "too_many_outputs",
            Self::Runtime { .. } => "runtime_error",
            Self::InvalidOutput(_) => "invalid_output",
            Self::SchemaViolation { .. } => "schema_violation",
            Self::Panicked(_) => "transform_panicked",
        }
    }
}

/// Formats an optional source position as ` at line L, column C`.
fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l}, column {c}"),
        (Some(l), None) => format!(" at line {l}"),
        _ => String::new(),
    }
}
