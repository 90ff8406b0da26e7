//! Who may call the gRPC port: bearer JWTs verified against pinned keys, and the one table of
//! the role each RPC needs. One job per module:
//!
//! - [`settings`]: the `--auth-*` flags ([`AuthSettings`]) and which of them go together;
//!   [`AuthSetupError`], why authentication could not be set up.
//! - [`denied`]: [`Denied`], why a request is refused, and the one answer an unauthenticated
//!   caller gets.
//! - [`verify`]: the [`Authenticator`], which verifies `authorization: Bearer <jwt>`
//!   (signature under a pinned algorithm, `exp`, `nbf`, `iat`, `iss`, `aud`).
//! - [`jwks`]: keys chosen by `kid` from a JWKS — a file, a URL, or the `jwks_uri` of an
//!   OpenID Connect issuer's discovery document — read again on a schedule (a file every
//!   `--auth-jwks-ttl-secs`, a URL for its `Cache-Control` max-age within
//!   [`JWKS_MIN_TTL`]..[`JWKS_MAX_TTL`]) and when a token names an unknown `kid` (at most once
//!   per [`JWKS_REREAD_INTERVAL`]), one read at a time, with a timeout; a read that fails keeps
//!   the keys already loaded.
//! - [`claims`]: the bearer token out of the header, and verified claims into a
//!   [`Principal`](super::principal::Principal).
//! - [`key_files`]: secret, PEM and JWKS files, with their size and mode checks.
//! - [`permissions`]: [`required_role`], the permission of every `dsreg.v1` RPC.
//! - [`dev`]: [`dev_credentials`], the embedded default's secret and admin token.
//! - [`crypto`]: the signatures themselves, on ring ([`install_jwt_crypto`]).
//!
//! The auth layer ([`super::layer`]) applies the authenticator and the table to every request.
//!
//! # Claims
//!
//! | claim | meaning |
//! | --- | --- |
//! | `sub` | required; the actor recorded in audits |
//! | `roles` | array of strings; the highest of `datasource:viewer`, `datasource:operator`, `datasource:admin` counts, others are ignored; none is a permission denial |
//! | `org` | required; `"*"` is every organisation |
//! | `projects` | optional array; absent or containing `"*"` is every project of the org |
//! | `exp`, `iss`, `aud` | required; `nbf` is checked when present |
//! | `iat` | not in the future beyond the leeway; required, and at most that old, with a maximum token age |
//!
//! The only background work is [`Authenticator::run_refresh`] (JWKS only), which stops with
//! its shutdown token. The only I/O is reading key files, at start-up and on a JWKS re-read,
//! and fetching a JWKS (and the discovery document) over HTTPS with the process's shared HTTP
//! client ([`super::idp`]).

mod claims;
mod crypto;
mod denied;
mod dev;
mod jwks;
mod key_files;
mod permissions;
mod settings;
mod verify;

#[cfg(test)]
mod test_support;

pub use crypto::install as install_jwt_crypto;
pub use denied::{Denied, UNAUTHENTICATED_MESSAGE};
pub use dev::{
    DEV_AUDIENCE, DEV_ISSUER, DEV_SUBJECT, DevCredentials, dev_credentials, issue_token,
};
pub use jwks::{JWKS_MAX_TTL, JWKS_MIN_TTL, JWKS_READ_TIMEOUT, JWKS_REREAD_INTERVAL};
pub use permissions::{known_path, required_role};
pub use settings::{AuthSettings, AuthSetupError};
pub use verify::{Attempt, Authenticator, KeyWait};
