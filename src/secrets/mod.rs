//! Secrets: connector credentials sealed at rest and opened only for the worker or test run
//! that needs them.
//!
//! Owns key loading ([`keys`]), sealing and opening ([`cipher`]), the plaintext wrapper
//! ([`SecretString`]) and the operations the API and the CLI call ([`Secrets`]: put, delete,
//! list, open, rewrap, status). Does not own ciphertext storage: the rows live in
//! `db::repository::secrets`; the few statements rewrap needs that the repository does not have
//! yet are in [`store`], marked to move there.
//!
//! - AES-256-GCM-SIV with a fresh random 96-bit nonce per encryption. GCM-SIV is
//!   nonce-misuse resistant: a repeated nonce leaks only whether two plaintexts were equal.
//! - The data key of a tenant (org, project) is HKDF-SHA256 of the master key of a version;
//!   each row records the version it was sealed under.
//! - The associated data binds a ciphertext to tenant, datasource, secret name, key version and
//!   the row's revision: copied to another row, or put back over a newer write, it does not
//!   open. (Restoring a whole old row, revision included, is a database rollback and opens.)
//! - Rotation adds a master key version ([`keys::FileKeyProvider::add_version`] or a new entry
//!   in `DSREG_MASTER_KEYS`); [`Secrets::rewrap`] moves old rows to it in batches, online, and
//!   resumes where an interrupted run stopped.
//! - Plaintext never reaches `Debug`, `Display`, serialization, errors, logs or spans: only
//!   names, datasource ids and key versions are ever recorded.
//!
//! Nothing here runs in the background; every operation ends when its future completes.

pub mod cipher;
pub mod integrity;
pub mod keys;
pub mod kms;
mod plaintext;
pub mod private_file;
mod service;
pub mod zeroized;

use std::path::PathBuf;

use uuid::Uuid;

pub use crate::telemetry::redact::{redact_url, redact_urls};
pub use keys::{EnvKeyProvider, FileKeyProvider, KeyProvider, MasterKey};
pub use kms::{ExecKeyProvider, VaultKeyProvider, VaultSettings};
pub use plaintext::SecretString;
pub use service::{KeyStatus, RewrapFailure, RewrapReport, Secrets};

/// What operators see of a secret (re-exported from the repository): never its value.
pub use crate::db::repository::secrets::SecretMeta;

/// The largest secret value, in bytes (the table's check allows this plus the 16-byte tag).
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// What went wrong sealing, opening or managing secrets. No variant carries plaintext, key
/// material or ciphertext bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A row or an operation needs a master key version the provider does not have.
    #[error(
        "master key version {0} is not loaded: add it to DSREG_MASTER_KEYS or the key file, \
         or rewrap the secrets sealed under it while it is still available"
    )]
    UnknownKeyVersion(u32),
    /// A sealed secret did not open: tampered, copied from another row, put back over a newer
    /// write, or sealed under a different key of the same version.
    #[error(
        "secret {name:?} of datasource {datasource} does not decrypt under key version \
         {key_version} (tampered, copied from another row, or a wrong key)"
    )]
    Decrypt {
        /// The datasource.
        datasource: Uuid,
        /// The secret's name.
        name: String,
        /// The key version the row records, as stored (a corrupt row may record a
        /// version no key can have, such as -1).
        key_version: i64,
    },
    /// A row is sealed under a master key version the provider does not have.
    #[error(
        "secret {name:?} of datasource {datasource} is sealed under master key version \
         {key_version}, which is not loaded: add it to DSREG_MASTER_KEYS or the key file"
    )]
    RowKeyNotLoaded {
        /// The datasource.
        datasource: Uuid,
        /// The secret's name.
        name: String,
        /// The key version the row records.
        key_version: u32,
    },
    /// A key file that cannot be used (unreadable, malformed, readable by others).
    #[error("key file {}: {reason}", path.display())]
    InvalidKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An external key source (a key command, Vault) failed or gave unusable keys; names the
    /// source and the version, never key material.
    #[error("master keys from {origin}: {reason}")]
    KeySource {
        /// The command, or Vault's address.
        origin: String,
        /// What went wrong.
        reason: String,
    },
    /// A malformed master key list (`DSREG_MASTER_KEYS`); names the entry, never its key.
    #[error("master keys (DSREG_MASTER_KEYS): {0}")]
    InvalidKeys(String),
    /// A secret value over the limit.
    #[error("secret value is {bytes} bytes; the limit is {limit}")]
    TooLarge {
        /// The value's size.
        bytes: usize,
        /// The limit ([`MAX_SECRET_BYTES`]).
        limit: usize,
    },
    /// A secret name outside `^[A-Za-z0-9_.-]{1,128}$`.
    #[error("invalid secret name {0:?}: use 1 to 128 of A-Z a-z 0-9 _ . -")]
    InvalidName(String),
    /// The system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}

impl Error {
    /// Whether the same operation may succeed if retried later (only database hiccups; a
    /// secret that does not decrypt keeps not decrypting).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Db(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Db(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Db(e.into())
    }
}

/// Checks a secret name against the table's rule, so a bad one is [`Error::InvalidName`]
/// rather than a constraint violation.
///
/// # Errors
/// [`Error::InvalidName`].
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}
