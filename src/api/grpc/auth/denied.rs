//! The denial type: why a request is refused, and the one message an unauthenticated caller
//! gets.

/// Why a request is refused. Reasons never contain the token or key material; an
/// unauthenticated one reaches only the log and the audit row (the client gets
/// [`UNAUTHENTICATED_MESSAGE`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No usable credentials: missing or malformed `authorization`, bad signature, wrong
    /// algorithm, unknown `kid`, expired or not yet valid, wrong issuer or audience.
    #[error("{0}")]
    Unauthenticated(String),
    /// A verified caller that may not do this: no datasource role, no tenant, or a role too low
    /// for the method.
    #[error("{reason}")]
    PermissionDenied {
        /// What is missing, for the client.
        reason: String,
        /// The token's verified `sub`, for the audit, when known.
        subject: Option<String>,
    },
}

impl Denied {
    pub(super) fn unauthenticated(reason: impl Into<String>) -> Self {
        Denied::Unauthenticated(reason.into())
    }

    /// A permission denial of the verified `subject`.
    pub fn permission_denied(reason: impl Into<String>, subject: Option<String>) -> Self {
        Denied::PermissionDenied {
            reason: reason.into(),
            subject,
        }
    }

    /// The message for the client.
    pub fn message(&self) -> &str {
        match self {
            Denied::Unauthenticated(reason) | Denied::PermissionDenied { reason, .. } => reason,
        }
    }

    /// The verified `sub` of the token, when the token was verified (permission denials).
    pub fn subject(&self) -> Option<&str> {
        match self {
            Denied::Unauthenticated(_) => None,
            Denied::PermissionDenied { subject, .. } => subject.as_deref(),
        }
    }

    /// The gRPC code: `UNAUTHENTICATED` or `PERMISSION_DENIED`.
    pub fn code(&self) -> tonic::Code {
        match self {
            Denied::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Denied::PermissionDenied { .. } => tonic::Code::PermissionDenied,
        }
    }
}

/// The one answer to every token that does not verify: which check failed goes to the log and
/// the audit row only, so a caller cannot probe algorithms, key ids or signatures.
pub const UNAUTHENTICATED_MESSAGE: &str =
    "not authenticated: send `authorization: Bearer <token>` with a valid token";

impl From<Denied> for tonic::Status {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Unauthenticated(_) => tonic::Status::unauthenticated(UNAUTHENTICATED_MESSAGE),
            Denied::PermissionDenied { reason, .. } => tonic::Status::permission_denied(reason),
        }
    }
}
