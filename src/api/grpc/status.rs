//! The one mapping from the registry's errors to gRPC statuses. Client mistakes get their
//! code and, where a field is to blame, a `BadRequest` field violation; internal failures are
//! logged here with their cause and answered without it.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::db;
use crate::domain::InvalidField;
use crate::harness;
use crate::secrets;

/// The canonical name of a status code, as gRPC documents it (`NOT_FOUND`): in metrics
/// labels and in the client's messages.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// INVALID_ARGUMENT naming `field`.
pub fn invalid(field: &str, reason: impl Into<String>) -> Status {
    let reason = reason.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        invalid(e.field, e.reason)
    }
}

/// NOT_FOUND for a datasource, the same whether it does not exist or belongs to another
/// tenant.
pub fn datasource_not_found(id: impl std::fmt::Display) -> Status {
    Status::not_found(format!("datasource {id} not found"))
}

/// An internal failure: logged with its cause, answered without it.
pub fn internal(context: &str, cause: &dyn std::error::Error) -> Status {
    tracing::error!(error = %cause, context, "request failed");
    Status::internal(format!("{context} failed; see the registry's log"))
}

/// The retry delay suggested when the database's NOTIFY queue is full.
const NOTIFY_QUEUE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Maps a database error.
pub fn db(e: db::Error) -> Status {
    use db::Error as E;
    match e {
        E::DatasourceNotFound(id) => datasource_not_found(id),
        E::VersionNotFound { .. } => Status::not_found(e.to_string()),
        E::NameTaken { .. } => Status::already_exists(e.to_string()),
        E::StaleRevision { .. } => Status::with_error_details(
            Code::FailedPrecondition,
            e.to_string(),
            ErrorDetails::with_precondition_failure_violation(
                "ETAG",
                "etag",
                "the datasource changed; read it again",
            ),
        ),
        E::DatasourceArchived(_)
        | E::NoEarlierVersion(_)
        | E::NeverPublished { .. }
        | E::VersionNotDraft { .. } => Status::failed_precondition(e.to_string()),
        E::Conflict(_) => Status::aborted(e.to_string()),
        E::NotifyQueueFull => {
            tracing::warn!(error = %e, "a change was refused at COMMIT");
            Status::with_error_details(
                Code::Unavailable,
                "the database's notification queue is full, so nothing was written; retry later",
                ErrorDetails::with_retry_info(Some(NOTIFY_QUEUE_RETRY)),
            )
        }
        E::Unavailable(_) => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the registry's database is unavailable; retry later")
        }
        E::Invalid(ref what) => invalid("request", format!("refused by the schema: {what}")),
        other => internal("the database request", &other),
    }
}

/// Maps a secrets error; never carries a value.
pub fn secrets(e: secrets::Error) -> Status {
    use secrets::Error as E;
    match e {
        E::Db(e) => db(e),
        E::InvalidName(_) => invalid("name", e.to_string()),
        E::TooLarge { .. } => invalid("value", e.to_string()),
        E::UnknownKeyVersion(_) | E::Decrypt { .. } | E::RowKeyNotLoaded { .. } => {
            Status::failed_precondition(e.to_string())
        }
        other => internal("the secrets operation", &other),
    }
}

/// Maps a harness error.
pub fn harness(e: harness::Error) -> Status {
    use harness::Error as E;
    match e {
        E::UnknownKind(_) => invalid("kind", e.to_string()),
        E::Config(c) => invalid(&format!("config_json.{}", c.field), c.reason),
        E::Compile(c) => invalid("config_json.transform", c.to_string()),
        E::Deadline(_) => Status::deadline_exceeded(e.to_string()),
        E::Fetch(_) => Status::failed_precondition(e.to_string()),
        E::Busy(_) => Status::resource_exhausted(e.to_string()),
        E::Failed => Status::internal(e.to_string()),
        // The kind's code cannot handle this config or sample: the caller's input to change.
        E::Panicked(_) => invalid("config_json", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_the_field_in_rich_details() {
        let status = invalid("name", "must not be empty");
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status
            .get_details_bad_request()
            .expect("bad request details");
        assert_eq!(bad.field_violations[0].field, "name");
        assert_eq!(bad.field_violations[0].description, "must not be empty");
    }

    #[test]
    fn a_full_notify_queue_is_unavailable_with_a_retry_hint() {
        let status = db(db::Error::NotifyQueueFull);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("nothing was written"),
            "{status:?}"
        );
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(NOTIFY_QUEUE_RETRY));
    }

    #[test]
    fn database_errors_map_to_their_codes_and_hide_internal_causes() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(db(db::Error::DatasourceNotFound(id)).code(), Code::NotFound);
        assert_eq!(
            db(db::Error::StaleRevision {
                datasource: id,
                expected: 1,
                actual: 2
            })
            .code(),
            Code::FailedPrecondition
        );
        let down = db(db::Error::Unavailable(
            "connection refused at 10.0.0.5".into(),
        ));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(!down.message().contains("10.0.0.5"));
        let internal = db(db::Error::Migration("secret detail".into()));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("secret detail"));
    }
}
