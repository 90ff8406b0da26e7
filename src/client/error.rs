//! How a command fails: a refused or unanswered call ([`CallError`], exit code 1), a mistake
//! in how the command was called that clap could not see ([`UsageError`], exit code 2, as
//! clap's own), and stdout closed by the reader ([`StdoutClosed`], a quiet exit 0).

use std::fmt;

use tonic_types::StatusExt;

use super::table::clean;

/// A call the server refused or did not answer: its gRPC code, message and the field
/// violations of its `BadRequest` details. Displays as `INVALID_ARGUMENT: message` followed by
/// one `  field: description` line per violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The gRPC status code.
    pub code: tonic::Code,
    /// The server's message.
    pub message: String,
    /// `(field, description)` of each field violation.
    pub violations: Vec<(String, String)>,
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> Self {
        let violations = status
            .get_details_bad_request()
            .map(|bad| {
                bad.field_violations
                    .into_iter()
                    .map(|v| (v.field, v.description))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            code: status.code(),
            message: status.message().to_owned(),
            violations,
        }
    }
}

impl CallError {
    /// Whether the same call may succeed after reconnecting (the connection or the server
    /// went away), as opposed to a refusal that repeats.
    pub fn is_retryable(&self) -> bool {
        use tonic::Code;
        matches!(
            self.code,
            Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Aborted
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
        )
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", code_name(self.code))?;
        if !self.message.is_empty() {
            write!(f, ": {}", clean(&self.message))?;
        }
        for (field, description) in &self.violations {
            write!(f, "\n  {}: {}", clean(field), clean(description))?;
        }
        Ok(())
    }
}

impl std::error::Error for CallError {}

pub use crate::api::grpc::status::code_name;

/// A command called wrongly in a way clap's declarations cannot express (say, `version update`
/// with nothing to change). `cli` reports it the way clap reports its own, with exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Stdout was closed by its reader (`dsreg events watch | head`): nothing left to do, not a
/// failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// A [`UsageError`] as an `anyhow` error, for `return Err(usage(…))`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn field_violations_are_listed_under_the_code_and_message() {
        let mut details = ErrorDetails::new();
        details
            .add_bad_request_violation("name", "must be 1-128 of [A-Za-z0-9_.-]")
            .add_bad_request_violation("kind", "unknown kind \"nope\"");
        let status = tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "invalid datasource",
            details,
        );
        let error = CallError::from(status);
        assert_eq!(error.violations.len(), 2);
        assert_eq!(
            error.to_string(),
            "INVALID_ARGUMENT: invalid datasource\n  \
             name: must be 1-128 of [A-Za-z0-9_.-]\n  \
             kind: unknown kind \"nope\""
        );
    }

    #[test]
    fn a_plain_status_is_its_code_and_message() {
        let error = CallError::from(tonic::Status::not_found("datasource 42 not found"));
        assert_eq!(error.to_string(), "NOT_FOUND: datasource 42 not found");
        assert!(!error.is_retryable());
        assert!(CallError::from(tonic::Status::unavailable("gone")).is_retryable());
    }
}
