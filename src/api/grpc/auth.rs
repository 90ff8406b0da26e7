//! Who may call the gRPC port: bearer JWTs verified against pinned keys, and the one table of
//! the role each RPC needs.
//!
//! - [`AuthSettings`]: the `--auth-*` flags; [`AuthSettings::check`] says what contradicts.
//! - [`Authenticator`]: verifies `authorization: Bearer <jwt>` (signature under a pinned
//!   algorithm, `exp`, `nbf`, `iat`, `iss`, `aud`) and turns the claims into a [`Principal`].
//!   Keys come from one source: an HS256 secret file, PEM public keys, or a JWKS — a file, a
//!   URL, or the `jwks_uri` of an OpenID Connect issuer's discovery document. A JWKS is read
//!   again on a schedule (a file every `--auth-jwks-ttl-secs`, a URL for its `Cache-Control`
//!   max-age within [`JWKS_MIN_TTL`]..[`JWKS_MAX_TTL`]) and when a token names an unknown `kid`
//!   (at most once per [`JWKS_REREAD_INTERVAL`]), one read at a time, with a timeout; a read
//!   that fails keeps the keys already loaded.
//! - [`required_role`]: the permission of every `dsreg.v1` RPC, in one static table.
//! - [`dev_credentials`]: the embedded default's secret and admin token.
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

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::TryRngCore;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::idp::{Provider, discovery_url, error_chain, https_url};
use super::principal::{Principal, Role, Tenant};

/// The shortest gap between two JWKS re-reads caused by unknown key ids, so a flood of tokens
/// with made-up `kid`s cannot keep the registry reading the file.
pub const JWKS_REREAD_INTERVAL: Duration = Duration::from_secs(30);

/// How long a JWKS read (for a URL: the discovery document and the JWKS together) may take
/// before the keys already loaded are kept.
pub const JWKS_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest time keys fetched from a URL are kept, whatever `Cache-Control` says
/// (`no-cache` and `max-age=0` included): an identity provider cannot make every instance
/// fetch on every call.
pub const JWKS_MIN_TTL: Duration = Duration::from_secs(5);

/// The longest time keys fetched from a URL are kept before they are fetched again, whatever
/// `Cache-Control` says: a removed key stops verifying within a day at worst.
pub const JWKS_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The key source flags, for messages.
const KEY_SOURCE_FLAGS: &str = "--auth-hs256-secret-file, --auth-public-key, --auth-jwks-file, \
                                --auth-jwks-url or --auth-oidc-issuer";

/// The issuer of the embedded default's development tokens.
pub const DEV_ISSUER: &str = "dsreg-dev";

/// The audience of the embedded default's development tokens.
pub const DEV_AUDIENCE: &str = "dsreg";

/// The subject of the embedded default's admin token.
pub const DEV_SUBJECT: &str = "dev-admin";

const DEV_TOKEN_LIFETIME_SECS: u64 = 365 * 24 * 3600;
/// A development token closer than this to its expiry is issued again at start-up.
const DEV_TOKEN_RENEW_BEFORE_SECS: u64 = 24 * 3600;
const DEV_SECRET_BYTES: usize = 48;
const MIN_SECRET_BYTES: usize = 32;
const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;
/// Longer values are refused before any decoding: real tokens are a few hundred bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// `exp` and `nbf` arithmetic stays meaningful, and a typo cannot keep expired tokens valid
/// for hours.
const MAX_LEEWAY_SECS: u64 = 300;

const HMAC_ALGORITHMS: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const P256_ALGORITHMS: &[Algorithm] = &[Algorithm::ES256];
const P384_ALGORITHMS: &[Algorithm] = &[Algorithm::ES384];

// --- Settings -----------------------------------------------------------------------------

/// How the gRPC port authenticates callers. Flattened into the service's settings.
///
/// Give one key source (`--auth-hs256-secret-file`, `--auth-public-key` or `--auth-jwks-file`)
/// with `--auth-issuer` and `--auth-audience`; or `--insecure-no-auth`; or nothing, and let the
/// caller pick its default (the embedded default uses [`dev_credentials`]).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthSettings {
    /// A file holding the HS256 secret: its bytes, one trailing newline ignored; at least 32
    /// bytes; mode 0600 or stricter.
    #[arg(long, env = "DSREG_AUTH_HS256_SECRET_FILE")]
    pub auth_hs256_secret_file: Option<PathBuf>,

    /// A PEM RSA or EC public key (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`); repeat the
    /// flag (or separate paths with commas) to accept several, e.g. during a rotation.
    #[arg(long, env = "DSREG_AUTH_PUBLIC_KEY", value_delimiter = ',')]
    pub auth_public_key: Vec<PathBuf>,

    /// A JWKS file (`{"keys": [...]}`) of RSA and EC public keys, chosen by the token's `kid`;
    /// read again every `--auth-jwks-ttl-secs`, and on an unknown `kid` at most every 30 s.
    #[arg(long, env = "DSREG_AUTH_JWKS_FILE")]
    pub auth_jwks_file: Option<PathBuf>,

    /// An `https://` URL of a JWKS of RSA and EC public keys (an identity provider's
    /// `jwks_uri`), chosen by the token's `kid`; kept for the answer's `Cache-Control` max-age
    /// (5 s to 24 h; `--auth-jwks-ttl-secs` without one), fetched again on an unknown `kid` at
    /// most every 30 s; while it cannot be reached the keys already fetched keep working.
    #[arg(long, env = "DSREG_AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<String>,

    /// An OpenID Connect issuer (`https://…`): its keys are the JWKS at the `jwks_uri` of
    /// `<issuer>/.well-known/openid-configuration`, kept as with `--auth-jwks-url`. The issuer
    /// is the required `iss` claim unless `--auth-issuer` is given.
    #[arg(long, env = "DSREG_AUTH_OIDC_ISSUER")]
    pub auth_oidc_issuer: Option<String>,

    /// PEM CA certificates that alone are trusted for `--auth-jwks-url` and
    /// `--auth-oidc-issuer`; default: the system's roots.
    #[arg(long, env = "DSREG_AUTH_JWKS_CA_FILE")]
    pub auth_jwks_ca_file: Option<PathBuf>,

    /// The accepted signature algorithms, comma separated (e.g. `RS256,ES256`); tokens signed
    /// with any other, `none` included, are refused. Default: HS256 with a secret file, RS256
    /// with public keys or a JWKS file.
    #[arg(long, env = "DSREG_AUTH_ALGORITHMS", value_delimiter = ',', value_parser = parse_algorithm)]
    pub auth_algorithms: Vec<Algorithm>,

    /// The required `iss` claim (required with a key source).
    #[arg(long, env = "DSREG_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// The required `aud` claim (required with a key source).
    #[arg(long, env = "DSREG_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,

    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds (at most 300); a token issued
    /// (`iat`) further in the future is refused.
    #[arg(long, env = "DSREG_AUTH_LEEWAY_SECS", default_value_t = 30)]
    pub auth_leeway_secs: u64,

    /// The oldest token accepted, in seconds since its `iat` (which it must then carry);
    /// unset: any age until `exp`.
    #[arg(long, env = "DSREG_AUTH_MAX_TOKEN_AGE_SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_max_token_age_secs: Option<u64>,

    /// How often a JWKS file is read again, in seconds: a key removed from it stops verifying
    /// within this time. Also how long keys fetched from `--auth-jwks-url` or
    /// `--auth-oidc-issuer` are kept when the answer has no `Cache-Control` max-age.
    #[arg(long, env = "DSREG_AUTH_JWKS_TTL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub auth_jwks_ttl_secs: u64,

    /// Serve the gRPC port without authentication: every caller is an admin of every tenant.
    /// For local experiments only.
    #[arg(long, env = "DSREG_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

fn parse_algorithm(value: &str) -> Result<Algorithm, String> {
    let value = value.trim();
    let algorithm = Algorithm::from_str(value).map_err(|_| {
        format!("unknown signature algorithm {value:?}; use HS256/384/512, RS256/384/512, PS256/384/512, ES256 or ES384")
    })?;
    if algorithm == Algorithm::EdDSA {
        return Err("EdDSA is not supported; use RS*, PS* or ES* keys".to_owned());
    }
    Ok(algorithm)
}

/// Where verifying keys come from.
#[derive(Debug, Clone, Copy)]
enum SourceKind<'a> {
    Secret(&'a Path),
    PublicKeys(&'a [PathBuf]),
    Jwks(&'a Path),
    JwksUrl(&'a str),
    OidcIssuer(&'a str),
}

impl SourceKind<'_> {
    fn flag(self) -> &'static str {
        match self {
            SourceKind::Secret(_) => "--auth-hs256-secret-file",
            SourceKind::PublicKeys(_) => "--auth-public-key",
            SourceKind::Jwks(_) => "--auth-jwks-file",
            SourceKind::JwksUrl(_) => "--auth-jwks-url",
            SourceKind::OidcIssuer(_) => "--auth-oidc-issuer",
        }
    }
}

impl AuthSettings {
    fn sources(&self) -> Vec<SourceKind<'_>> {
        let mut sources = Vec::new();
        if let Some(path) = &self.auth_hs256_secret_file {
            sources.push(SourceKind::Secret(path));
        }
        if !self.auth_public_key.is_empty() {
            sources.push(SourceKind::PublicKeys(&self.auth_public_key));
        }
        if let Some(path) = &self.auth_jwks_file {
            sources.push(SourceKind::Jwks(path));
        }
        if let Some(url) = &self.auth_jwks_url {
            sources.push(SourceKind::JwksUrl(url));
        }
        if let Some(issuer) = &self.auth_oidc_issuer {
            sources.push(SourceKind::OidcIssuer(issuer));
        }
        sources
    }

    /// The required `iss` claim: `--auth-issuer`, or else the OpenID Connect issuer.
    fn issuer(&self) -> Option<&str> {
        self.auth_issuer
            .as_deref()
            .or(self.auth_oidc_issuer.as_deref())
    }

    /// Whether a key source is configured. Without one (and without `--insecure-no-auth`) the
    /// caller chooses the default, e.g. the embedded default's [`dev_credentials`].
    pub fn has_key_source(&self) -> bool {
        !self.sources().is_empty()
    }

    /// The pinned algorithms: `--auth-algorithms`, or the key source's default.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        if !self.auth_algorithms.is_empty() {
            return self.auth_algorithms.clone();
        }
        match self.sources().first() {
            Some(SourceKind::Secret(_)) => vec![Algorithm::HS256],
            _ => vec![Algorithm::RS256],
        }
    }

    /// Checks that the flags make sense together. No key source and no `--insecure-no-auth` is
    /// fine here: the caller decides the default.
    ///
    /// # Errors
    /// [`AuthSetupError::Settings`] saying what is wrong: two key sources, a key source with
    /// `--insecure-no-auth`, a key source without `--auth-issuer` or `--auth-audience`, issuer,
    /// audience or algorithms without a key source, an algorithm the key source cannot verify,
    /// or a leeway above 300 s.
    pub fn check(&self) -> Result<(), AuthSetupError> {
        let sources = self.sources();
        if let (true, Some(source)) = (self.insecure_no_auth, sources.first()) {
            return Err(settings_error(format!(
                "--insecure-no-auth turns authentication off, so it cannot go with {}; drop one",
                source.flag()
            )));
        }
        if let [first, second, ..] = sources[..] {
            return Err(settings_error(format!(
                "give one key source, not both {} and {}",
                first.flag(),
                second.flag()
            )));
        }
        if self.auth_leeway_secs > MAX_LEEWAY_SECS {
            return Err(settings_error(format!(
                "--auth-leeway-secs is {}; at most {MAX_LEEWAY_SECS} is allowed",
                self.auth_leeway_secs
            )));
        }
        let Some(source) = sources.first().copied() else {
            let stray = [
                ("--auth-algorithms", !self.auth_algorithms.is_empty()),
                ("--auth-issuer", self.auth_issuer.is_some()),
                ("--auth-audience", self.auth_audience.is_some()),
                ("--auth-jwks-ca-file", self.auth_jwks_ca_file.is_some()),
            ]
            .into_iter()
            .find_map(|(flag, given)| given.then_some(flag));
            return match stray {
                Some(flag) => Err(settings_error(format!(
                    "{flag} needs a key source: {KEY_SOURCE_FLAGS}"
                ))),
                None => Ok(()),
            };
        };
        match source {
            SourceKind::JwksUrl(url) => {
                https_url(url).map_err(|reason| {
                    settings_error(format!("--auth-jwks-url {url:?}: {reason}"))
                })?;
            }
            SourceKind::OidcIssuer(issuer) => {
                discovery_url(issuer).map_err(|reason| {
                    settings_error(format!("--auth-oidc-issuer {issuer:?}: {reason}"))
                })?;
            }
            SourceKind::Secret(_) | SourceKind::PublicKeys(_) | SourceKind::Jwks(_)
                if self.auth_jwks_ca_file.is_some() =>
            {
                return Err(settings_error(format!(
                    "--auth-jwks-ca-file is for --auth-jwks-url or --auth-oidc-issuer, not {}",
                    source.flag()
                )));
            }
            _ => {}
        }
        for (flag, value) in [
            ("--auth-issuer", self.issuer()),
            ("--auth-audience", self.auth_audience.as_deref()),
        ] {
            if value.is_none_or(|v| v.trim().is_empty()) {
                return Err(settings_error(format!(
                    "{flag} is required with {}",
                    source.flag()
                )));
            }
        }
        for algorithm in self.algorithms() {
            let fits = match source {
                SourceKind::Secret(_) => HMAC_ALGORITHMS.contains(&algorithm),
                SourceKind::PublicKeys(_)
                | SourceKind::Jwks(_)
                | SourceKind::JwksUrl(_)
                | SourceKind::OidcIssuer(_) => {
                    !HMAC_ALGORITHMS.contains(&algorithm) && algorithm != Algorithm::EdDSA
                }
            };
            if !fits {
                let allowed = match source {
                    SourceKind::Secret(_) => "a secret file verifies HS256, HS384 or HS512",
                    _ => "public keys verify RS*, PS*, ES256 or ES384",
                };
                return Err(settings_error(format!(
                    "--auth-algorithms has {algorithm:?}, which {} cannot verify: {allowed}",
                    source.flag()
                )));
            }
        }
        Ok(())
    }
}

/// Why authentication could not be set up. Messages name the file and the problem, never key
/// material.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The auth flags contradict each other or miss a value.
    #[error("auth settings: {0}")]
    Settings(String),
    /// A key, secret, JWKS or token file is missing, unreadable, too open, or not what it should
    /// be.
    #[error("{}: {reason}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The operating system's random source failed.
    #[error("cannot generate random bytes: {0}")]
    Random(String),
    /// The HTTPS client for a JWKS URL or an OpenID Connect issuer cannot be set up.
    #[error("cannot set up the HTTPS client for the identity provider: {0}")]
    Client(String),
}

fn settings_error(reason: String) -> AuthSetupError {
    AuthSetupError::Settings(reason)
}

fn key_file_error(path: &Path, reason: impl Into<String>) -> AuthSetupError {
    AuthSetupError::KeyFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

// --- Denials ------------------------------------------------------------------------------

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
    fn unauthenticated(reason: impl Into<String>) -> Self {
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

// --- Authenticator ------------------------------------------------------------------------

/// Verifies bearer tokens and turns them into principals. Cheap to clone (shared keys).
#[derive(Clone)]
pub struct Authenticator {
    /// `None`: `--insecure-no-auth`.
    verifier: Option<Arc<Verifier>>,
}

struct Verifier {
    times: TimeRules,
    pinned: Vec<Algorithm>,
    /// `"RS256, ES256"`, for messages.
    pinned_text: String,
    keys: KeySource,
}

enum KeySource {
    /// A secret or PEM public keys, fixed for the life of the process. A token is tried
    /// against each key that can verify its algorithm.
    Fixed(Vec<VerifyingKey>),
    /// Keys chosen by `kid`.
    Jwks(Arc<Jwks>),
}

struct VerifyingKey {
    key: DecodingKey,
    /// `algorithms` holds the pinned algorithms this key can verify (never empty).
    validation: Validation,
}

impl VerifyingKey {
    fn new(key: DecodingKey, algorithms: Vec<Algorithm>, template: &Validation) -> Self {
        let mut validation = template.clone();
        validation.algorithms = algorithms;
        Self { key, validation }
    }

    fn accepts(&self, algorithm: Algorithm) -> bool {
        self.validation.algorithms.contains(&algorithm)
    }

    fn decode(&self, token: &str) -> jsonwebtoken::errors::Result<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map(|data| data.claims)
    }
}

type KeyMap = HashMap<String, Arc<VerifyingKey>>;

/// A JWKS's keys, read again on a schedule ([`Authenticator::run_refresh`]) and for an unknown
/// `kid`, whatever the source (a file or a URL). Reads run one at a time with a timeout; a call
/// whose key is cached never waits for one.
struct Jwks {
    origin: Origin,
    pinned: Vec<Algorithm>,
    template: Validation,
    /// How long keys are kept without a `Cache-Control` max-age (for a file: always).
    default_ttl: Duration,
    /// How long the keys last read are kept before the next scheduled read, in milliseconds.
    ttl_ms: AtomicU64,
    /// Swapped whole on a re-read; readers clone the one key they need and drop the lock.
    keys: RwLock<Arc<KeyMap>>,
    /// Single flight: held (across the read) by the one request or tick reading the keys;
    /// holds when an unknown `kid` last caused a read.
    reading: tokio::sync::Mutex<Option<Instant>>,
    /// A file read still running on its blocking thread (it outlived its timeout): no new one
    /// starts until it ends, so a hung file costs one thread.
    busy: Arc<std::sync::atomic::AtomicBool>,
    rereads: AtomicU64,
}

/// Where a JWKS comes from.
enum Origin {
    File(PathBuf),
    Remote(Provider),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Remote(provider) => write!(f, "{provider}"),
        }
    }
}

/// What one read of a JWKS brought.
struct Loaded {
    keys: KeyMap,
    /// Keys ignored: without a `kid`, for encryption, of another type, for no pinned algorithm.
    skipped: usize,
    /// The answer's `Cache-Control` max-age (a URL only).
    max_age: Option<Duration>,
}

/// Why a JWKS is read.
#[derive(Debug, Clone, Copy)]
enum Reread {
    Scheduled,
    UnknownKid,
}

impl Jwks {
    fn new(
        origin: Origin,
        keys: KeyMap,
        pinned: Vec<Algorithm>,
        template: Validation,
        ttl: Duration,
    ) -> Self {
        Self {
            origin,
            pinned,
            template,
            default_ttl: ttl,
            ttl_ms: AtomicU64::new(millis(ttl)),
            keys: RwLock::new(Arc::new(keys)),
            reading: tokio::sync::Mutex::new(None),
            busy: Arc::default(),
            rereads: AtomicU64::new(0),
        }
    }

    fn get(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        // The map behind the lock is replaced whole, never edited in place: a poisoned lock
        // still holds a consistent map.
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(kid)
            .cloned()
    }

    /// Whether no key has been loaded yet (a URL before its first successful fetch).
    fn is_empty(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// How long the keys last read are kept.
    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// Reads the keys again for an unknown `kid`, unless an unknown `kid` caused a read less
    /// than [`JWKS_REREAD_INTERVAL`] ago; returns the key if the set has it now.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled wait gives up only this request's answer (a file read runs on
    /// its own thread; the keys are installed by whichever request or tick reads next).
    async fn reread_for(self: &Arc<Self>, kid: &str) -> Option<Arc<VerifyingKey>> {
        let mut last = self.reading.lock().await;
        // Another request may have read the keys while this one waited.
        if let Some(key) = self.get(kid) {
            return Some(key);
        }
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < JWKS_REREAD_INTERVAL) {
            return None;
        }
        *last = Some(now);
        self.read(Reread::UnknownKid).await;
        self.get(kid)
    }

    /// Reads the keys again on the schedule; says whether the read succeeded.
    async fn refresh(self: &Arc<Self>) -> bool {
        let _turn = self.reading.lock().await;
        self.read(Reread::Scheduled).await
    }

    /// Reads the set within [`JWKS_READ_TIMEOUT`] and installs its keys; a set that cannot be
    /// read or no longer parses keeps the keys already loaded. The caller holds `reading`.
    async fn read(self: &Arc<Self>, why: Reread) -> bool {
        let loaded = match &self.origin {
            Origin::File(path) => {
                if self.busy.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        source = %self.origin,
                        "the previous JWKS read has not finished; keeping the keys already loaded"
                    );
                    return false;
                }
                self.rereads.fetch_add(1, Ordering::Relaxed);
                self.read_file(path.clone()).await
            }
            Origin::Remote(provider) => {
                self.rereads.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout(JWKS_READ_TIMEOUT, provider.fetch()).await {
                    Ok(Ok(fetched)) => parse_jwks(&fetched.body, &self.pinned, &self.template)
                        .map(|(keys, skipped)| Loaded {
                            keys,
                            skipped,
                            max_age: fetched.max_age,
                        })
                        .map_err(|reason| format!("{}: {reason}", fetched.url)),
                    Ok(Err(failed)) => Err(failed.to_string()),
                    Err(_) => Err(format!("no answer within {JWKS_READ_TIMEOUT:?}")),
                }
            }
        };
        match loaded {
            Ok(Loaded {
                keys,
                skipped,
                max_age,
            }) => {
                let ttl = match &self.origin {
                    Origin::File(_) => self.default_ttl,
                    Origin::Remote(_) => max_age
                        .unwrap_or(self.default_ttl)
                        .clamp(JWKS_MIN_TTL, JWKS_MAX_TTL),
                };
                self.ttl_ms.store(millis(ttl), Ordering::Relaxed);
                tracing::info!(
                    source = %self.origin,
                    keys = keys.len(),
                    skipped,
                    ?why,
                    ?ttl,
                    "read the JWKS"
                );
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                true
            }
            Err(reason) => {
                tracing::warn!(
                    source = %self.origin,
                    %reason,
                    ?why,
                    "the JWKS could not be read; keeping the keys already loaded"
                );
                false
            }
        }
    }

    /// Reads the file on a blocking thread; the caller has set `busy`.
    async fn read_file(self: &Arc<Self>, path: PathBuf) -> Result<Loaded, String> {
        let jwks = Arc::clone(self);
        let read = tokio::task::spawn_blocking(move || {
            let read = read_jwks(&path, &jwks.pinned, &jwks.template);
            jwks.busy.store(false, Ordering::Release);
            read
        });
        match tokio::time::timeout(JWKS_READ_TIMEOUT, read).await {
            Ok(Ok(Ok((keys, skipped)))) => Ok(Loaded {
                keys,
                skipped,
                max_age: None,
            }),
            Ok(Ok(Err(reason))) => Err(reason),
            Ok(Err(panicked)) => Err(format!("the read failed: {panicked}")),
            Err(_) => Err(format!("no answer within {JWKS_READ_TIMEOUT:?}")),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(verifier) = &self.verifier else {
            return f.write_str("Authenticator(insecure: no authentication)");
        };
        let source = match &verifier.keys {
            KeySource::Fixed(keys) => format!("{} fixed key(s)", keys.len()),
            KeySource::Jwks(jwks) => {
                format!("JWKS {} (read again after {:?})", jwks.origin, jwks.ttl())
            }
        };
        f.debug_struct("Authenticator")
            .field("keys", &source)
            .field("algorithms", &verifier.pinned_text)
            .finish()
    }
}

impl Authenticator {
    /// Builds the authenticator the settings describe: reads the secret file, PEM keys or
    /// JWKS file once. With `--insecure-no-auth`, an authenticator that lets everyone in (and
    /// says so in the log).
    ///
    /// # Errors
    /// [`AuthSetupError::Settings`] as [`AuthSettings::check`], or when no key source is given
    /// and `--insecure-no-auth` is not set (the caller picks a default before calling this);
    /// [`AuthSetupError::KeyFile`] naming the file: missing, unreadable, a secret readable by
    /// group or others or shorter than 32 bytes, a PEM file that is not an RSA or EC public key
    /// (or is a private key), a key no pinned algorithm can verify, a JWKS file that does not
    /// parse or has no usable key.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, AuthSetupError> {
        settings.check()?;
        let Some(source) = settings.sources().first().copied() else {
            if settings.insecure_no_auth {
                tracing::warn!(
                    "gRPC authentication is off (--insecure-no-auth): every caller is an admin \
                     of every tenant"
                );
                return Ok(Self::insecure());
            }
            return Err(settings_error(format!(
                "no key source: give {KEY_SOURCE_FLAGS}, or --insecure-no-auth"
            )));
        };
        let pinned = settings.algorithms();
        // check() made sure both are present.
        let issuer = settings.issuer().unwrap_or_default();
        let audience = settings.auth_audience.as_deref().unwrap_or_default();
        let template = validation_template(issuer, audience, settings.auth_leeway_secs);
        let keys = match source {
            SourceKind::Secret(path) => {
                let secret = read_secret_file(path)?;
                let algorithms = usable(&pinned, HMAC_ALGORITHMS);
                KeySource::Fixed(vec![VerifyingKey::new(
                    DecodingKey::from_secret(&secret),
                    algorithms,
                    &template,
                )])
            }
            SourceKind::PublicKeys(paths) => KeySource::Fixed(
                paths
                    .iter()
                    .map(|path| read_pem_key(path, &pinned, &template))
                    .collect::<Result<_, _>>()?,
            ),
            SourceKind::Jwks(path) => {
                let (keys, skipped) = read_jwks(path, &pinned, &template)
                    .map_err(|reason| key_file_error(path, reason))?;
                if skipped > 0 {
                    tracing::warn!(
                        path = %path.display(),
                        skipped,
                        "JWKS keys without a kid, for encryption, of another type or for no \
                         pinned algorithm are ignored"
                    );
                }
                KeySource::Jwks(Arc::new(Jwks::new(
                    Origin::File(path.to_owned()),
                    keys,
                    pinned.clone(),
                    template,
                    Duration::from_secs(settings.auth_jwks_ttl_secs),
                )))
            }
            // check() made sure these are https URLs.
            SourceKind::JwksUrl(url) => {
                let client = jwks_client(settings.auth_jwks_ca_file.as_deref())?;
                let provider = Provider::jwks_url(client, url).map_err(settings_error)?;
                remote_jwks(provider, settings, &pinned, template)
            }
            SourceKind::OidcIssuer(issuer) => {
                let client = jwks_client(settings.auth_jwks_ca_file.as_deref())?;
                let provider = Provider::oidc_issuer(client, issuer).map_err(settings_error)?;
                remote_jwks(provider, settings, &pinned, template)
            }
        };
        let times = TimeRules {
            leeway_secs: settings.auth_leeway_secs.min(MAX_LEEWAY_SECS),
            max_age_secs: settings.auth_max_token_age_secs,
        };
        Ok(Self::with_keys(pinned, keys, times))
    }

    /// An authenticator that lets every request in as [`Principal::insecure`]
    /// (`--insecure-no-auth`).
    pub fn insecure() -> Self {
        Self { verifier: None }
    }

    /// An authenticator for HS256 tokens signed with `secret` (at least 32 bytes, which the
    /// caller ensures), issued by `issuer` for `audience`, with 30 s of leeway. Used by the
    /// embedded default and tests.
    pub fn hs256(secret: &[u8], issuer: &str, audience: &str) -> Self {
        let template = validation_template(issuer, audience, 30);
        let key = VerifyingKey::new(
            DecodingKey::from_secret(secret),
            vec![Algorithm::HS256],
            &template,
        );
        let times = TimeRules {
            leeway_secs: 30,
            max_age_secs: None,
        };
        Self::with_keys(vec![Algorithm::HS256], KeySource::Fixed(vec![key]), times)
    }

    fn with_keys(pinned: Vec<Algorithm>, keys: KeySource, times: TimeRules) -> Self {
        let pinned_text = pinned
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            verifier: Some(Arc::new(Verifier {
                times,
                pinned,
                pinned_text,
                keys,
            })),
        }
    }

    /// Whether this lets everyone in (`--insecure-no-auth`).
    pub fn is_insecure(&self) -> bool {
        self.verifier.is_none()
    }

    /// Verifies `authorization` (the raw `authorization` metadata value, `Bearer <jwt>`) and
    /// returns the caller; a token naming a JWKS `kid` that is not loaded waits for a re-read
    /// of the file (see [`Jwks`]). Insecure authenticators return [`Principal::insecure`] for
    /// anything.
    ///
    /// # Errors
    /// [`Denied::Unauthenticated`] for a missing or malformed header, a bad signature, an
    /// algorithm that is not pinned, an unknown `kid`, an expired or not yet valid token, an
    /// `iat` in the future or too long ago, a wrong issuer or audience, missing
    /// `exp`/`sub`/`iss`/`aud`; [`Denied::PermissionDenied`] for a verified token without a
    /// datasource role or tenant.
    ///
    /// # Cancel safety
    /// Cancel safe: a re-read runs on its own thread.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Denied> {
        match self.try_authenticate(authorization) {
            Attempt::Done(result) => result,
            Attempt::NeedsKey(wait) => wait.finish().await,
        }
    }

    /// [`Authenticator::authenticate`] with the keys already loaded, on the calling thread,
    /// without I/O; an unknown `kid` is refused without reading the JWKS file.
    ///
    /// # Errors
    /// As [`Authenticator::authenticate`].
    pub fn authenticate_now(&self, authorization: Option<&str>) -> Result<Principal, Denied> {
        match self.try_authenticate(authorization) {
            Attempt::Done(result) => result,
            Attempt::NeedsKey(_) => Err(Denied::unauthenticated(UNKNOWN_KID)),
        }
    }

    /// Verifies with the keys already loaded, without I/O; says when the token names a key
    /// that a re-read of the JWKS file may bring. The auth layer calls this so a request whose
    /// key is cached needs no extra future and never waits on a read.
    pub fn try_authenticate(&self, authorization: Option<&str>) -> Attempt {
        let Some(verifier) = &self.verifier else {
            return Attempt::Done(Ok(Principal::insecure()));
        };
        let token = match bearer_token(authorization) {
            Ok(token) => token,
            Err(denied) => return Attempt::Done(Err(denied)),
        };
        match verifier.verify(token) {
            Ok(principal) => Attempt::Done(Ok(principal)),
            Err(Unverified::Denied(denied)) => Attempt::Done(Err(denied)),
            Err(Unverified::UnknownKid { jwks, kid }) => Attempt::NeedsKey(KeyWait {
                verifier: Arc::clone(verifier),
                jwks,
                kid,
                token: token.to_owned(),
            }),
        }
    }

    /// Reads a JWKS again whenever its keys' time is up (a file every `--auth-jwks-ttl-secs`,
    /// a URL for its `Cache-Control` max-age), until `shutdown`, so a removed key stops
    /// verifying within that time; a URL's first fetch is at once. A failed read is tried
    /// again within [`JWKS_REREAD_INTERVAL`], keeping the keys already loaded. Returns at once
    /// for other key sources.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn run_refresh(self, shutdown: tokio_util::sync::CancellationToken) {
        let Some(KeySource::Jwks(jwks)) = self.verifier.as_deref().map(|v| &v.keys) else {
            return;
        };
        let mut wait = if jwks.is_empty() {
            Duration::ZERO
        } else {
            jwks.ttl()
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let read = tokio::select! {
                () = shutdown.cancelled() => return,
                read = jwks.refresh() => read,
            };
            wait = if read {
                jwks.ttl()
            } else {
                jwks.ttl().min(JWKS_REREAD_INTERVAL)
            };
        }
    }

    #[cfg(test)]
    fn jwks_rereads(&self) -> u64 {
        match self.verifier.as_deref().map(|v| &v.keys) {
            Some(KeySource::Jwks(jwks)) => jwks.rereads.load(Ordering::Relaxed),
            _ => 0,
        }
    }
}

/// What verifying with the loaded keys found.
pub enum Attempt {
    /// The answer.
    Done(Result<Principal, Denied>),
    /// The token names a JWKS key that is not loaded: re-read the file, then verify.
    NeedsKey(KeyWait),
}

/// A token waiting for a JWKS re-read.
pub struct KeyWait {
    verifier: Arc<Verifier>,
    jwks: Arc<Jwks>,
    kid: String,
    token: String,
}

impl KeyWait {
    /// Re-reads the JWKS file (single flight, rate limited, with a timeout) and verifies the
    /// token with the key it brings.
    ///
    /// # Errors
    /// As [`Authenticator::authenticate`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn finish(self) -> Result<Principal, Denied> {
        let key = self
            .jwks
            .reread_for(&self.kid)
            .await
            .ok_or_else(|| Denied::unauthenticated(UNKNOWN_KID))?;
        match self.verifier.verify_with(&key, &self.token) {
            Ok(principal) => Ok(principal),
            Err(Unverified::Denied(denied)) => Err(denied),
            Err(Unverified::UnknownKid { .. }) => Err(Denied::unauthenticated(UNKNOWN_KID)),
        }
    }
}

const UNKNOWN_KID: &str = "the token's key id (kid) is unknown";

/// Why the loaded keys did not verify a token.
enum Unverified {
    Denied(Denied),
    UnknownKid { jwks: Arc<Jwks>, kid: String },
}

impl From<Denied> for Unverified {
    fn from(denied: Denied) -> Self {
        Unverified::Denied(denied)
    }
}

impl Verifier {
    fn algorithm(&self, header: &PeekedHeader) -> Result<Algorithm, Denied> {
        header
            .alg
            .filter(|a| self.pinned.contains(a))
            .ok_or_else(|| {
                Denied::unauthenticated(format!(
                    "the token's signature algorithm is not accepted; this server accepts {}",
                    self.pinned_text
                ))
            })
    }

    fn verify(&self, token: &str) -> Result<Principal, Unverified> {
        let header = peek_header(token)?;
        let algorithm = self.algorithm(&header)?;
        match &self.keys {
            KeySource::Fixed(keys) => {
                let mut mismatch = None;
                for key in keys.iter().filter(|k| k.accepts(algorithm)) {
                    match key.decode(token) {
                        Ok(claims) => return Ok(self.principal(claims)?),
                        // With several keys (a rotation), the next one may be the signer.
                        Err(e) if is_signature_mismatch(&e) => mismatch = Some(e),
                        // The signature verified; the claims did not.
                        Err(e) => return Err(denial_of(&e).into()),
                    }
                }
                Err(match mismatch {
                    Some(e) => denial_of(&e),
                    None => Denied::unauthenticated(format!(
                        "no key of this server verifies {algorithm:?} tokens"
                    )),
                }
                .into())
            }
            KeySource::Jwks(jwks) => {
                let kid = header.kid.ok_or_else(|| {
                    Denied::unauthenticated("the token names no key id (kid) in its header")
                })?;
                match jwks.get(&kid) {
                    Some(key) => self.verify_with(&key, token),
                    None => Err(Unverified::UnknownKid {
                        jwks: Arc::clone(jwks),
                        kid,
                    }),
                }
            }
        }
    }

    /// Verifies `token` with the JWKS key its `kid` names.
    fn verify_with(&self, key: &VerifyingKey, token: &str) -> Result<Principal, Unverified> {
        let algorithm = self.algorithm(&peek_header(token)?)?;
        if !key.accepts(algorithm) {
            return Err(Denied::unauthenticated(
                "the token's signature algorithm does not match its key",
            )
            .into());
        }
        let claims = key.decode(token).map_err(|e| denial_of(&e))?;
        Ok(self.principal(claims)?)
    }

    /// The caller of verified claims, once their times are checked.
    fn principal(&self, claims: Claims) -> Result<Principal, Denied> {
        self.times.check(claims.iat.as_ref(), now_secs())?;
        principal_from(claims)
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The `iat` rules (`exp` and `nbf` are checked by [`Validation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeRules {
    /// Clock skew allowed, in seconds.
    leeway_secs: u64,
    /// The oldest `iat` accepted, in seconds before now; `None`: any (then `iat` is optional).
    max_age_secs: Option<u64>,
}

impl TimeRules {
    /// Checks the `iat` claim at `now`: a number, not in the future beyond the leeway, and
    /// (with a maximum age) present and recent enough.
    fn check(&self, iat: Option<&serde_json::Value>, now: u64) -> Result<(), Denied> {
        let iat = match iat {
            None if self.max_age_secs.is_some() => {
                return Err(Denied::unauthenticated("the token has no iat claim"));
            }
            None => return Ok(()),
            Some(value) => value
                .as_u64()
                .or_else(|| {
                    value
                        .as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| Denied::unauthenticated("the token's iat claim is malformed"))?,
        };
        if iat > now.saturating_add(self.leeway_secs) {
            return Err(Denied::unauthenticated(
                "the token's iat claim is in the future",
            ));
        }
        if let Some(max_age) = self.max_age_secs
            && now.saturating_sub(iat) > max_age.saturating_add(self.leeway_secs)
        {
            return Err(Denied::unauthenticated(
                "the token is older than the maximum token age",
            ));
        }
        Ok(())
    }
}

fn validation_template(issuer: &str, audience: &str, leeway_secs: u64) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = true;
    validation.leeway = leeway_secs.min(MAX_LEEWAY_SECS);
    validation
}

/// The pinned algorithms among `candidates`, in pinned order.
fn usable(pinned: &[Algorithm], candidates: &[Algorithm]) -> Vec<Algorithm> {
    pinned
        .iter()
        .copied()
        .filter(|a| candidates.contains(a))
        .collect()
}

fn bearer_token(authorization: Option<&str>) -> Result<&str, Denied> {
    const EXPECTED: &str = "the authorization metadata must be `Bearer <token>`";
    let value = authorization.ok_or_else(|| {
        Denied::unauthenticated(
            "missing authorization metadata; send `authorization: Bearer <token>`",
        )
    })?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| Denied::unauthenticated(EXPECTED))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::unauthenticated(EXPECTED));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Denied::unauthenticated("the bearer token is empty"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Denied::unauthenticated(format!(
            "the bearer token is longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(token)
}

const NOT_A_JWT: &str = "the bearer token is not a well-formed JWT";

struct PeekedHeader {
    /// `None`: an algorithm jsonwebtoken does not know, `none` included.
    alg: Option<Algorithm>,
    kid: Option<String>,
}

/// Reads the header's `alg` and `kid` before verification, to pin the algorithm with a clear
/// message and to pick the JWKS key.
fn peek_header(token: &str) -> Result<PeekedHeader, Denied> {
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        alg: Cow<'a, str>,
        #[serde(borrow, default)]
        kid: Option<Cow<'a, str>>,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Denied::unauthenticated(NOT_A_JWT));
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Denied::unauthenticated(NOT_A_JWT))?;
    let raw: Raw<'_> =
        serde_json::from_slice(&json).map_err(|_| Denied::unauthenticated(NOT_A_JWT))?;
    Ok(PeekedHeader {
        alg: Algorithm::from_str(&raw.alg).ok(),
        kid: raw.kid.map(Cow::into_owned),
    })
}

/// Failures where another key might still verify the token.
fn is_signature_mismatch(error: &jsonwebtoken::errors::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidKeyFormat
    )
}

/// The client-safe denial for a verification failure. jsonwebtoken's own messages are not
/// passed on: some quote parts of the input.
fn denial_of(error: &jsonwebtoken::errors::Error) -> Denied {
    let reason = match error.kind() {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not accepted",
        ErrorKind::InvalidAudience => "the token's audience (aud) is not accepted",
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidKeyFormat => "the token's signature does not verify",
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "the token's signature algorithm is not accepted"
        }
        ErrorKind::MissingRequiredClaim(claim) => {
            return Denied::unauthenticated(format!("the token has no {claim} claim"));
        }
        ErrorKind::InvalidClaimFormat(claim) => {
            return Denied::unauthenticated(format!("the token's {claim} claim is malformed"));
        }
        ErrorKind::Json(_) => "the token's claims are malformed",
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => NOT_A_JWT,
        _ => "the token was refused",
    };
    Denied::unauthenticated(reason)
}

/// The dsreg claims of a token (the registered ones are checked by [`Validation`]).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    projects: Option<Vec<String>>,
    /// Checked by [`TimeRules`]: kept raw so a malformed value is a clear refusal.
    #[serde(default)]
    iat: Option<serde_json::Value>,
}

fn principal_from(claims: Claims) -> Result<Principal, Denied> {
    let Claims {
        sub,
        roles,
        org,
        projects,
        iat: _,
    } = claims;
    if sub.trim().is_empty() {
        return Err(Denied::unauthenticated("the token's sub claim is empty"));
    }
    let Some(role) = roles.iter().filter_map(|r| Role::from_claim(r)).max() else {
        return Err(Denied::permission_denied(
            "the token grants no datasource role",
            Some(sub),
        ));
    };
    let Some(org) = org.filter(|o| !o.is_empty()) else {
        return Err(Denied::permission_denied(
            "the token names no org",
            Some(sub),
        ));
    };
    let projects = match projects {
        None => None,
        Some(projects) if projects.iter().any(|p| p == "*") => None,
        Some(projects) if projects.is_empty() => {
            return Err(Denied::permission_denied(
                "the token's projects claim lists no project",
                Some(sub),
            ));
        }
        Some(projects) => Some(projects),
    };
    let tenant = match (org.as_str(), projects) {
        ("*", None) => Tenant::All,
        ("*", Some(_)) => {
            return Err(Denied::permission_denied(
                "a token for every org (org \"*\") cannot limit projects",
                Some(sub),
            ));
        }
        (_, projects) => Tenant::Org { org, projects },
    };
    Ok(Principal {
        subject: sub,
        role,
        tenant,
    })
}

// --- Key files ----------------------------------------------------------------------------

fn read_limited(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), AuthSetupError> {
    let file = std::fs::File::open(path).map_err(|e| key_file_error(path, format!("{e}")))?;
    // The metadata of the file opened, not of whatever the name points to a moment later.
    let meta = file
        .metadata()
        .map_err(|e| key_file_error(path, format!("{e}")))?;
    if !meta.is_file() {
        return Err(key_file_error(path, "not a regular file"));
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(key_file_error(
            path,
            format!("larger than {MAX_KEY_FILE_BYTES} bytes"),
        ));
    }
    Ok((file, meta))
}

fn read_public_file(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    let (mut file, _) = read_limited(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| key_file_error(path, format!("{e}")))?;
    Ok(bytes)
}

/// Reads an HMAC secret: the file's bytes with one trailing newline removed. The file must not
/// be readable by group or others and must hold at least 32 bytes.
fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, AuthSetupError> {
    let (mut file, meta) = read_limited(path)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_file_error(
            path,
            format!(
                "mode {mode:04o} lets group or others read it; it must be 0600 (chmod 600 {})",
                path.display()
            ),
        ));
    }
    let mut secret = Zeroizing::new(Vec::new());
    file.read_to_end(&mut secret)
        .map_err(|e| key_file_error(path, format!("{e}")))?;
    if secret.ends_with(b"\n") {
        secret.pop();
        if secret.ends_with(b"\r") {
            secret.pop();
        }
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(key_file_error(
            path,
            format!(
                "holds {} bytes; an HS256 secret needs at least {MIN_SECRET_BYTES}",
                secret.len()
            ),
        ));
    }
    Ok(secret)
}

fn algorithm_list(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_pem_key(
    path: &Path,
    pinned: &[Algorithm],
    template: &Validation,
) -> Result<VerifyingKey, AuthSetupError> {
    let pem = read_public_file(path)?;
    if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(key_file_error(
            path,
            "holds a private key; give its public key (openssl pkey -in KEY -pubout)",
        ));
    }
    let (key, kind, candidates) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        (key, "RSA", RSA_ALGORITHMS)
    } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        // An uncompressed point: 0x04, then x and y.
        let candidates = match key.as_bytes().len() {
            65 => P256_ALGORITHMS,
            97 => P384_ALGORITHMS,
            _ => {
                return Err(key_file_error(
                    path,
                    "an EC key on a curve other than P-256 or P-384",
                ));
            }
        };
        (key, "EC", candidates)
    } else {
        return Err(key_file_error(
            path,
            "not a PEM RSA or EC public key (`PUBLIC KEY` or `RSA PUBLIC KEY`)",
        ));
    };
    let algorithms = usable(pinned, candidates);
    if algorithms.is_empty() {
        return Err(key_file_error(
            path,
            format!(
                "an {kind} key, but no pinned algorithm ({}) is for it; add one of {} to \
                 --auth-algorithms",
                algorithm_list(pinned),
                algorithm_list(candidates)
            ),
        ));
    }
    Ok(VerifyingKey::new(key, algorithms, template))
}

/// Reads a JWKS file: the usable keys by `kid`, and how many keys were skipped (no `kid`, for
/// encryption, symmetric or of another type, or for no pinned algorithm). Errors are reasons
/// (the caller names the file).
fn read_jwks(
    path: &Path,
    pinned: &[Algorithm],
    template: &Validation,
) -> Result<(KeyMap, usize), String> {
    let bytes = read_public_file(path).map_err(|e| match e {
        AuthSetupError::KeyFile { reason, .. } => reason,
        other => other.to_string(),
    })?;
    parse_jwks(&bytes, pinned, template)
}

/// Where a JSON document fails to parse, without quoting it.
fn json_error(error: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        error.classify(),
        error.line(),
        error.column()
    )
}

/// The usable keys of a JWKS document and how many were skipped.
fn parse_jwks(
    bytes: &[u8],
    pinned: &[Algorithm],
    template: &Validation,
) -> Result<(KeyMap, usize), String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {}", json_error(&e)))?;
    let mut keys = KeyMap::new();
    let mut skipped = 0;
    for value in set.keys {
        match jwks_key(value, pinned, template) {
            Some((kid, key)) => {
                keys.insert(kid, Arc::new(key));
            }
            None => skipped += 1,
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "no usable key: none is an RSA or EC signing key with a kid for a pinned \
             algorithm ({})",
            algorithm_list(pinned)
        ));
    }
    Ok((keys, skipped))
}

/// The key set served at `target`, empty until its first fetch: that is the refresh task's
/// first step (or that of a call before it), so the process starts while the identity
/// provider is down, and refuses every token until a fetch succeeds.
fn remote_jwks(
    provider: Provider,
    settings: &AuthSettings,
    pinned: &[Algorithm],
    template: Validation,
) -> KeySource {
    let origin = Origin::Remote(provider);
    tracing::info!(source = %origin, "token keys come from the identity provider");
    KeySource::Jwks(Arc::new(Jwks::new(
        origin,
        KeyMap::new(),
        pinned.to_vec(),
        template,
        Duration::from_secs(settings.auth_jwks_ttl_secs),
    )))
}

/// The HTTPS client for a JWKS URL or an issuer: the process's shared client, or with
/// `--auth-jwks-ca-file` one that trusts only that file's certificates.
fn jwks_client(ca_file: Option<&Path>) -> Result<reqwest::Client, AuthSetupError> {
    let Some(path) = ca_file else {
        return crate::connectors::http::client()
            .map_err(|e| AuthSetupError::Client(e.to_string()));
    };
    let pem = read_public_file(path)?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| key_file_error(path, format!("not PEM certificates: {}", error_chain(&e))))?;
    if roots.is_empty() {
        return Err(key_file_error(path, "holds no PEM certificate"));
    }
    crate::connectors::http::client_trusting(roots)
        .map_err(|e| AuthSetupError::Client(e.to_string()))
}

fn jwks_key(
    value: serde_json::Value,
    pinned: &[Algorithm],
    template: &Validation,
) -> Option<(String, VerifyingKey)> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let kid = jwk.common.key_id.clone()?;
    // Symmetric keys do not belong in a JWKS of public keys: accepting them would let whoever
    // reads the file sign tokens.
    let candidates = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA_ALGORITHMS,
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => P256_ALGORITHMS,
            EllipticCurve::P384 => P384_ALGORITHMS,
            _ => return None,
        },
        _ => return None,
    };
    let mut algorithms = usable(pinned, candidates);
    if let Some(declared) = jwk.common.key_algorithm {
        match Algorithm::from_str(&declared.to_string()) {
            Ok(declared) => algorithms.retain(|a| *a == declared),
            Err(_) => return None,
        }
    }
    if algorithms.is_empty() {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some((kid, VerifyingKey::new(key, algorithms, template)))
}

// --- Permissions --------------------------------------------------------------------------

/// The role each `dsreg.v1` RPC needs, by full gRPC path. Every RPC of `proto/dsreg/v1` is
/// here (a unit test parses the protos); a method missing from the table is refused.
static PERMISSIONS: &[(&str, Role)] = &[
    ("/dsreg.v1.Registry/GetInfo", Role::Viewer),
    ("/dsreg.v1.Registry/GetRegistryMetrics", Role::Viewer),
    ("/dsreg.v1.Registry/ListInstances", Role::Operator),
    ("/dsreg.v1.Audit/ListAudit", Role::Admin),
    ("/dsreg.v1.Catalog/ListKinds", Role::Viewer),
    ("/dsreg.v1.Catalog/GetKindHealth", Role::Viewer),
    ("/dsreg.v1.Datasources/CreateDatasource", Role::Admin),
    ("/dsreg.v1.Datasources/GetDatasource", Role::Viewer),
    ("/dsreg.v1.Datasources/ListDatasources", Role::Viewer),
    ("/dsreg.v1.Datasources/UpdateDatasource", Role::Admin),
    ("/dsreg.v1.Datasources/ArchiveDatasource", Role::Admin),
    ("/dsreg.v1.Datasources/CreateVersion", Role::Admin),
    ("/dsreg.v1.Datasources/GetVersion", Role::Viewer),
    ("/dsreg.v1.Datasources/ListVersions", Role::Viewer),
    ("/dsreg.v1.Datasources/UpdateVersion", Role::Admin),
    ("/dsreg.v1.Datasources/PublishVersion", Role::Admin),
    ("/dsreg.v1.Datasources/RollbackVersion", Role::Admin),
    ("/dsreg.v1.Events/ListEvents", Role::Viewer),
    ("/dsreg.v1.Events/WatchEvents", Role::Viewer),
    ("/dsreg.v1.Harness/RunTest", Role::Operator),
    ("/dsreg.v1.Lifecycle/StartWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/StopWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/RestartWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/ReloadWorker", Role::Operator),
    ("/dsreg.v1.Lifecycle/Backfill", Role::Operator),
    ("/dsreg.v1.Lifecycle/GetStatus", Role::Viewer),
    ("/dsreg.v1.Lifecycle/WatchStatus", Role::Viewer),
    ("/dsreg.v1.Lifecycle/GetDatasourceMetrics", Role::Viewer),
    ("/dsreg.v1.Secrets/PutSecret", Role::Admin),
    ("/dsreg.v1.Secrets/DeleteSecret", Role::Admin),
    ("/dsreg.v1.Secrets/ListSecrets", Role::Viewer),
    ("/dsreg.v1.Catalog/ValidateConfig", Role::Viewer),
    ("/dsreg.v1.DeadLetters/ListDeadLetters", Role::Operator),
    ("/dsreg.v1.DeadLetters/ReplayDeadLetters", Role::Operator),
    ("/dsreg.v1.DeadLetters/PurgeDeadLetters", Role::Admin),
];

/// The role the RPC at `path` (`/dsreg.v1.<Service>/<Method>`) needs: Viewer for reads,
/// Operator for lifecycle and test runs, Admin for create, update, archive, publish, rollback
/// and secret writes. `None` for any path not in the table: callers deny it (fail closed).
pub fn required_role(path: &str) -> Option<Role> {
    PERMISSIONS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, role)| *role)
}

/// The path of the RPC at `path` as the permission table holds it (a `'static` string), if
/// it is one.
pub fn known_path(path: &str) -> Option<&'static str> {
    PERMISSIONS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(p, _)| *p)
}

// --- Development credentials --------------------------------------------------------------

/// The embedded default's credentials, from [`dev_credentials`].
#[derive(Debug)]
pub struct DevCredentials {
    /// `<dir>/auth/hs256.secret`: 48 random bytes written as standard base64 (64 characters
    /// and a newline); the 64 characters themselves are the HMAC key, as for any
    /// `--auth-hs256-secret-file`.
    pub secret_file: PathBuf,
    /// `<dir>/auth/admin.token`: an admin token for every org, to send as
    /// `authorization: Bearer <token>`.
    pub token_file: PathBuf,
    /// Whether the secret was created by this call (first run).
    pub created: bool,
    /// Whether the token was written by this call: first run, or the old one had expired (or
    /// would within a day) or no longer verified.
    pub token_issued: bool,
    /// Verifies tokens signed with the secret, issued by [`DEV_ISSUER`] for [`DEV_AUDIENCE`].
    pub authenticator: Authenticator,
}

/// Creates (first run) or reuses the embedded default's development credentials under
/// `<dir>/auth` (folder mode 0700, files 0600): an HS256 secret and an admin token signed with
/// it (`sub` [`DEV_SUBJECT`], `roles` `["datasource:admin"]`, `org` `"*"`, `iss`
/// [`DEV_ISSUER`], `aud` [`DEV_AUDIENCE`], valid for 365 days). An existing token is issued
/// again when it has expired, expires within a day, or does not verify with the secret.
///
/// Concurrent first runs agree on one secret: it is linked into place only if absent.
///
/// # Errors
/// [`AuthSetupError::KeyFile`] when the folder or a file cannot be created, read or replaced,
/// or an existing secret is readable by others or too short; [`AuthSetupError::Random`].
pub fn dev_credentials(dir: &Path) -> Result<DevCredentials, AuthSetupError> {
    let auth_dir = dir.join("auth");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&auth_dir)
        .map_err(|e| key_file_error(&auth_dir, format!("cannot create: {e}")))?;
    let secret_file = auth_dir.join("hs256.secret");
    let token_file = auth_dir.join("admin.token");

    let created = if secret_file.exists() {
        false
    } else {
        let mut random = Zeroizing::new([0u8; DEV_SECRET_BYTES]);
        rand::rngs::OsRng
            .try_fill_bytes(random.as_mut())
            .map_err(|e| AuthSetupError::Random(e.to_string()))?;
        let mut text = Zeroizing::new(STANDARD.encode(random.as_ref()));
        text.push('\n');
        write_private(&secret_file, text.as_bytes(), Replace::No)?
    };
    let secret = read_secret_file(&secret_file)?;
    let authenticator = Authenticator::hs256(&secret, DEV_ISSUER, DEV_AUDIENCE);

    let current = !created && dev_token_is_current(&secret, &token_file);
    if !current {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({
            "sub": DEV_SUBJECT,
            "roles": [Role::Admin.claim()],
            "org": "*",
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "iat": now,
            "exp": now + DEV_TOKEN_LIFETIME_SECS,
        });
        let mut token = Zeroizing::new(issue_token(&secret, &claims));
        token.push('\n');
        write_private(&token_file, token.as_bytes(), Replace::Yes)?;
    }
    Ok(DevCredentials {
        secret_file,
        token_file,
        created,
        token_issued: !current,
        authenticator,
    })
}

/// Whether the token file holds a development admin token that verifies with `secret` and
/// stays valid for at least another day.
fn dev_token_is_current(secret: &[u8], token_file: &Path) -> bool {
    let Ok(token) = std::fs::read_to_string(token_file).map(Zeroizing::new) else {
        return false;
    };
    let mut validation = validation_template(DEV_ISSUER, DEV_AUDIENCE, 0);
    validation.reject_tokens_expiring_in_less_than = DEV_TOKEN_RENEW_BEFORE_SECS;
    jsonwebtoken::decode::<Claims>(token.trim(), &DecodingKey::from_secret(secret), &validation)
        .ok()
        .and_then(|data| principal_from(data.claims).ok())
        .is_some_and(|p| p.role == Role::Admin && p.tenant == Tenant::All)
}

/// Signs `claims` with `secret` as an HS256 JWT.
pub fn issue_token(secret: &[u8], claims: &serde_json::Value) -> String {
    // HMAC signing cannot fail and a JSON value always serializes: the error is unreachable.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of a JSON value cannot fail")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// Keep an existing file (returns `false`).
    No,
    /// Replace it atomically.
    Yes,
}

/// Writes `bytes` to `path` with mode 0600 from creation, through a synced temporary file
/// linked (or renamed) into place, so a crash never leaves a half-written file under the real
/// name. Returns whether the file was written.
fn write_private(path: &Path, bytes: &[u8], replace: Replace) -> Result<bool, AuthSetupError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| key_file_error(path, "not a file name"))?;
    let mut random = [0u8; 8];
    rand::rngs::OsRng
        .try_fill_bytes(&mut random)
        .map_err(|e| AuthSetupError::Random(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        u64::from_le_bytes(random)
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(key_file_error(
            path,
            format!("cannot write {}: {e}", tmp.display()),
        ));
    }
    let placed = match replace {
        Replace::Yes => std::fs::rename(&tmp, path).map(|()| true),
        // A hard link fails if the name exists: a concurrent first run keeps the first file.
        Replace::No => match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
    };
    let _ = std::fs::remove_file(&tmp);
    let placed = placed.map_err(|e| key_file_error(path, format!("cannot create: {e}")))?;
    // Makes the link or rename durable; best effort (some filesystems refuse to sync folders).
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::{Value, json};

    use super::*;

    const ISSUER: &str = "https://issuer.example";
    const AUDIENCE: &str = "dsreg-test";
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/auth")
            .join(name)
    }

    fn fixture_bytes(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims_with(roles: &[&str]) -> Value {
        json!({
            "sub": "alice",
            "roles": roles,
            "org": "acme",
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": now() + 600,
        })
    }

    fn claims_for(role: Role) -> Value {
        claims_with(&[role.claim()])
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        claims.as_object_mut().unwrap().remove(key);
        claims
    }

    fn sign(algorithm: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn hs() -> Authenticator {
        Authenticator::hs256(SECRET, ISSUER, AUDIENCE)
    }

    async fn check(auth: &Authenticator, claims: &Value) -> Result<Principal, Denied> {
        auth.authenticate(Some(&bearer(&issue_token(SECRET, claims))))
            .await
    }

    fn assert_unauthenticated(result: Result<Principal, Denied>, needle: &str) {
        match result {
            Err(Denied::Unauthenticated(message)) => assert!(
                message.contains(needle),
                "message {message:?} should mention {needle:?}"
            ),
            other => panic!("expected Unauthenticated({needle}), got {other:?}"),
        }
    }

    fn settings(args: &[&str]) -> Result<AuthSettings, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            auth: AuthSettings,
        }
        Cli::try_parse_from(std::iter::once("dsreg").chain(args.iter().copied())).map(|c| c.auth)
    }

    /// The x and y of a P-256 SPKI PEM public key, base64url: its DER ends with the
    /// uncompressed point 0x04 || x || y.
    fn ec_jwk(public_pem: &str, kid: &str) -> Value {
        let body: String = public_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = STANDARD.decode(body).unwrap();
        let point = &der[der.len() - 65..];
        assert_eq!(point[0], 0x04);
        json!({
            "kty": "EC",
            "crv": "P-256",
            "kid": kid,
            "use": "sig",
            "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        })
    }

    fn ec_signer(name: &str) -> EncodingKey {
        EncodingKey::from_ec_pem(&fixture_bytes(name)).unwrap()
    }

    fn write_jwks(path: &Path, keys: &[Value]) {
        std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
    }

    fn jwks_authenticator(path: &Path) -> Authenticator {
        let path = path.to_str().unwrap();
        let settings = settings(&[
            "--auth-jwks-file",
            path,
            "--auth-algorithms",
            "ES256",
            "--auth-issuer",
            ISSUER,
            "--auth-audience",
            AUDIENCE,
        ])
        .unwrap();
        Authenticator::from_settings(&settings).unwrap()
    }

    fn ec_public(name: &str) -> String {
        String::from_utf8(fixture_bytes(name)).unwrap()
    }

    #[tokio::test]
    async fn a_valid_token_of_each_role_becomes_a_principal_with_that_role() {
        let auth = hs();
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            let principal = check(&auth, &claims_for(role)).await.unwrap();
            assert_eq!(principal.subject, "alice");
            assert_eq!(principal.role, role);
            assert_eq!(
                principal.tenant,
                Tenant::Org {
                    org: "acme".into(),
                    projects: None
                }
            );
        }
    }

    #[tokio::test]
    async fn the_highest_datasource_role_counts_and_other_roles_are_ignored() {
        let auth = hs();
        let principal = check(
            &auth,
            &claims_with(&["billing:admin", "datasource:viewer", "datasource:operator"]),
        )
        .await
        .unwrap();
        assert_eq!(principal.role, Role::Operator);
    }

    #[tokio::test]
    async fn a_token_without_a_datasource_role_is_denied_naming_its_subject() {
        let auth = hs();
        for claims in [
            claims_with(&["billing:admin"]),
            without(claims_for(Role::Admin), "roles"),
        ] {
            let denied = check(&auth, &claims).await.unwrap_err();
            assert_eq!(
                denied,
                Denied::permission_denied(
                    "the token grants no datasource role",
                    Some("alice".into())
                )
            );
            assert_eq!(denied.subject(), Some("alice"));
            assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        }
    }

    #[tokio::test]
    async fn an_expired_token_is_unauthenticated() {
        let claims = with(claims_for(Role::Admin), "exp", json!(now() - 3600));
        assert_unauthenticated(check(&hs(), &claims).await, "expired");
    }

    #[tokio::test]
    async fn a_token_expired_within_the_leeway_still_passes() {
        let claims = with(claims_for(Role::Admin), "exp", json!(now() - 5));
        assert!(check(&hs(), &claims).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_without_exp_is_unauthenticated() {
        let claims = without(claims_for(Role::Admin), "exp");
        assert_unauthenticated(check(&hs(), &claims).await, "no exp claim");
    }

    #[tokio::test]
    async fn a_token_not_valid_yet_is_unauthenticated() {
        let claims = with(claims_for(Role::Admin), "nbf", json!(now() + 3600));
        assert_unauthenticated(check(&hs(), &claims).await, "not valid yet");
        let claims = with(claims_for(Role::Admin), "nbf", json!(now() - 10));
        assert!(check(&hs(), &claims).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_for_another_audience_is_unauthenticated() {
        let claims = with(claims_for(Role::Admin), "aud", json!("someone-else"));
        assert_unauthenticated(check(&hs(), &claims).await, "audience");
        let claims = without(claims_for(Role::Admin), "aud");
        assert_unauthenticated(check(&hs(), &claims).await, "no aud claim");
    }

    #[tokio::test]
    async fn a_token_from_another_issuer_is_unauthenticated() {
        let claims = with(
            claims_for(Role::Admin),
            "iss",
            json!("https://evil.example"),
        );
        assert_unauthenticated(check(&hs(), &claims).await, "issuer");
        let claims = without(claims_for(Role::Admin), "iss");
        assert_unauthenticated(check(&hs(), &claims).await, "no iss claim");
    }

    #[tokio::test]
    async fn a_token_without_sub_or_org_is_refused() {
        let claims = without(claims_for(Role::Admin), "sub");
        assert_unauthenticated(check(&hs(), &claims).await, "no sub claim");
        let denied = check(&hs(), &without(claims_for(Role::Admin), "org"))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "the token names no org");
    }

    #[tokio::test]
    async fn an_unsigned_alg_none_token_is_refused() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims_for(Role::Admin).to_string());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            let result = hs().authenticate(Some(&bearer(&token))).await;
            assert!(
                matches!(result, Err(Denied::Unauthenticated(_))),
                "{result:?}"
            );
        }
        let result = hs()
            .authenticate(Some(&bearer(&format!("{header}.{payload}."))))
            .await;
        assert_unauthenticated(
            result,
            "algorithm is not accepted; this server accepts HS256",
        );
    }

    #[tokio::test]
    async fn an_hs256_token_is_refused_when_rs256_is_pinned() {
        let public = fixture("rsa-public.pem");
        let settings = settings(&[
            "--auth-public-key",
            public.to_str().unwrap(),
            "--auth-issuer",
            ISSUER,
            "--auth-audience",
            AUDIENCE,
        ])
        .unwrap();
        let auth = Authenticator::from_settings(&settings).unwrap();
        // The classic key confusion: an HMAC token keyed with the public key's bytes.
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&fixture_bytes("rsa-public.pem")),
            None,
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(
            auth.authenticate(Some(&bearer(&forged))).await,
            "this server accepts RS256",
        );
    }

    #[tokio::test]
    async fn a_token_signed_with_another_key_is_unauthenticated() {
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
            None,
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(
            hs().authenticate(Some(&bearer(&token))).await,
            "signature does not verify",
        );
        // A valid token with its payload swapped.
        let good = issue_token(SECRET, &claims_for(Role::Viewer));
        let (head, rest) = good.split_once('.').unwrap();
        let signature = rest.rsplit_once('.').unwrap().1;
        let payload = URL_SAFE_NO_PAD.encode(claims_for(Role::Admin).to_string());
        let tampered = format!("{head}.{payload}.{signature}");
        assert_unauthenticated(
            hs().authenticate(Some(&bearer(&tampered))).await,
            "signature does not verify",
        );
    }

    #[tokio::test]
    async fn a_missing_or_malformed_authorization_is_unauthenticated_without_echoing_it() {
        let auth = hs();
        let cases: [(Option<&str>, &str); 8] = [
            (None, "missing authorization"),
            (Some(""), "must be `Bearer <token>`"),
            (Some("Basic x"), "must be `Bearer <token>`"),
            (Some("Bearer"), "must be `Bearer <token>`"),
            (Some("Bearer   "), "must be `Bearer <token>`"),
            (Some("garbage"), "must be `Bearer <token>`"),
            (Some("Bearer secret-garbage"), "not a well-formed JWT"),
            (Some("Bearer a.b.c"), "not a well-formed JWT"),
        ];
        for (header, needle) in cases {
            let denied = auth.authenticate(header).await.unwrap_err();
            assert_eq!(denied.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert!(denied.message().contains(needle), "{header:?}: {denied}");
            assert!(!denied.message().contains("garbage"));
        }
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_unauthenticated(auth.authenticate(Some(&long)).await, "longer than");
        // The scheme is case-insensitive.
        let token = issue_token(SECRET, &claims_for(Role::Viewer));
        assert!(
            auth.authenticate(Some(&format!("bearer {token}")))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn org_and_projects_claims_become_the_tenant() {
        let auth = hs();
        let cases = [
            (json!("*"), None, Tenant::All),
            (json!("*"), Some(json!(["*"])), Tenant::All),
            (
                json!("acme"),
                None,
                Tenant::Org {
                    org: "acme".into(),
                    projects: None,
                },
            ),
            (
                json!("acme"),
                Some(json!(["*"])),
                Tenant::Org {
                    org: "acme".into(),
                    projects: None,
                },
            ),
            (
                json!("acme"),
                Some(json!(["web", "mobile"])),
                Tenant::Org {
                    org: "acme".into(),
                    projects: Some(vec!["web".into(), "mobile".into()]),
                },
            ),
        ];
        for (org, projects, tenant) in cases {
            let mut claims = with(claims_for(Role::Viewer), "org", org);
            if let Some(projects) = projects {
                claims = with(claims, "projects", projects);
            }
            assert_eq!(check(&auth, &claims).await.unwrap().tenant, tenant);
        }
        for (org, projects) in [(json!("*"), json!(["web"])), (json!("acme"), json!([]))] {
            let claims = with(
                with(claims_for(Role::Viewer), "org", org),
                "projects",
                projects,
            );
            let denied = check(&auth, &claims).await.unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
        }
    }

    #[tokio::test]
    async fn rsa_and_ec_public_keys_from_pem_files_verify_their_tokens() {
        let settings = settings(&[
            "--auth-public-key",
            fixture("rsa-public.pem").to_str().unwrap(),
            "--auth-public-key",
            fixture("ec-public.pem").to_str().unwrap(),
            "--auth-algorithms",
            "RS256,ES256",
            "--auth-issuer",
            ISSUER,
            "--auth-audience",
            AUDIENCE,
        ])
        .unwrap();
        let auth = Authenticator::from_settings(&settings).unwrap();
        let rsa = EncodingKey::from_rsa_pem(&fixture_bytes("rsa-private.pem")).unwrap();
        let token = sign(Algorithm::RS256, &rsa, None, &claims_for(Role::Operator));
        assert_eq!(
            auth.authenticate(Some(&bearer(&token))).await.unwrap().role,
            Role::Operator
        );
        let token = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            None,
            &claims_for(Role::Admin),
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&token))).await.unwrap().role,
            Role::Admin
        );
        // Signed by a key the server does not have.
        let token = sign(
            Algorithm::ES256,
            &ec_signer("ec2-private.pem"),
            None,
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(
            auth.authenticate(Some(&bearer(&token))).await,
            "signature does not verify",
        );
        // Pinned RS256 only: an ES256 token is refused even though the key would verify it.
        let rs_only =
            Authenticator::from_settings(&settings_for_public_keys(&["rsa-public.pem"], None))
                .unwrap();
        let token = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            None,
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(
            rs_only.authenticate(Some(&bearer(&token))).await,
            "this server accepts RS256",
        );
    }

    fn settings_for_public_keys(names: &[&str], algorithms: Option<&str>) -> AuthSettings {
        let paths: Vec<String> = names
            .iter()
            .map(|n| fixture(n).to_str().unwrap().to_owned())
            .collect();
        let mut args = Vec::new();
        for path in &paths {
            args.extend(["--auth-public-key", path.as_str()]);
        }
        if let Some(algorithms) = algorithms {
            args.extend(["--auth-algorithms", algorithms]);
        }
        args.extend(["--auth-issuer", ISSUER, "--auth-audience", AUDIENCE]);
        settings(&args).unwrap()
    }

    #[test]
    fn unusable_pem_files_are_refused_naming_the_file_without_key_material() {
        // A private key given as the public one.
        let err =
            Authenticator::from_settings(&settings_for_public_keys(&["rsa-private.pem"], None))
                .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("rsa-private.pem") && message.contains("private key"),
            "{message}"
        );
        assert!(!message.contains("MII"), "{message}");
        // An EC key while only RS256 is pinned.
        let err = Authenticator::from_settings(&settings_for_public_keys(&["ec-public.pem"], None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ec-public.pem") && err.contains("ES256"),
            "{err}"
        );
        // Not a key at all.
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let settings = settings(&[
            "--auth-public-key",
            junk.to_str().unwrap(),
            "--auth-issuer",
            ISSUER,
            "--auth-audience",
            AUDIENCE,
        ])
        .unwrap();
        let err = Authenticator::from_settings(&settings)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("junk.pem") && err.contains("not a PEM"),
            "{err}"
        );
    }

    #[test]
    fn iat_is_refused_in_the_future_beyond_the_leeway_and_older_than_the_maximum_age() {
        let now = 1_800_000_000;
        let any_age = TimeRules {
            leeway_secs: 30,
            max_age_secs: None,
        };
        let hour = TimeRules {
            leeway_secs: 30,
            max_age_secs: Some(3600),
        };
        let cases: [(TimeRules, Option<Value>, Option<&str>); 10] = [
            (any_age, None, None),
            (any_age, Some(json!(now)), None),
            (any_age, Some(json!(now + 30)), None),
            (any_age, Some(json!(now + 31)), Some("future")),
            (
                any_age,
                Some(json!(now + 10 * 365 * 86_400)),
                Some("future"),
            ),
            (any_age, Some(json!("yesterday")), Some("malformed")),
            (any_age, Some(json!(-5)), Some("malformed")),
            (hour, None, Some("no iat")),
            (hour, Some(json!(now - 3600 - 30)), None),
            (
                hour,
                Some(json!(now - 3600 - 31)),
                Some("maximum token age"),
            ),
        ];
        for (rules, iat, refused) in cases {
            match (rules.check(iat.as_ref(), now), refused) {
                (Ok(()), None) => {}
                (Err(denied), Some(needle)) => {
                    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
                    assert!(denied.message().contains(needle), "{iat:?}: {denied}");
                }
                (result, _) => panic!("{iat:?} under {rules:?}: {result:?}"),
            }
        }
    }

    #[tokio::test]
    async fn jwks_keys_are_chosen_by_kid_and_an_unknown_kid_rereads_the_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        write_jwks(&path, &[ec_jwk(&ec_public("ec-public.pem"), "k1")]);
        let auth = jwks_authenticator(&path);

        let k1 = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            Some("k1"),
            &claims_for(Role::Viewer),
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&k1))).await.unwrap().role,
            Role::Viewer
        );
        assert_eq!(auth.jwks_rereads(), 0);

        // The issuer rotates: k2 appears in the file after start-up.
        write_jwks(
            &path,
            &[
                ec_jwk(&ec_public("ec-public.pem"), "k1"),
                ec_jwk(&ec_public("ec2-public.pem"), "k2"),
            ],
        );
        let k2 = sign(
            Algorithm::ES256,
            &ec_signer("ec2-private.pem"),
            Some("k2"),
            &claims_for(Role::Admin),
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&k2))).await.unwrap().role,
            Role::Admin
        );
        assert_eq!(auth.jwks_rereads(), 1);
        // Known now: no further read.
        assert!(auth.authenticate(Some(&bearer(&k2))).await.is_ok());
        assert!(auth.authenticate(Some(&bearer(&k1))).await.is_ok());
        assert_eq!(auth.jwks_rereads(), 1);

        // A kid that signs with the wrong key, and a token without a kid.
        let wrong = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            Some("k2"),
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(auth.authenticate(Some(&bearer(&wrong))).await, "signature");
        let no_kid = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            None,
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(auth.authenticate(Some(&bearer(&no_kid))).await, "no key id");
    }

    #[tokio::test]
    async fn jwks_rereads_for_unknown_kids_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        write_jwks(&path, &[ec_jwk(&ec_public("ec-public.pem"), "k1")]);
        let auth = jwks_authenticator(&path);

        // A flood of made-up kids costs one read.
        for i in 0..50 {
            let bogus = sign(
                Algorithm::ES256,
                &ec_signer("ec-private.pem"),
                Some(&format!("bogus-{i}")),
                &claims_for(Role::Admin),
            );
            assert_unauthenticated(auth.authenticate(Some(&bearer(&bogus))).await, "kid");
        }
        assert_eq!(auth.jwks_rereads(), 1);

        // A real new key within the interval waits for the next slot.
        write_jwks(
            &path,
            &[
                ec_jwk(&ec_public("ec-public.pem"), "k1"),
                ec_jwk(&ec_public("ec2-public.pem"), "k2"),
            ],
        );
        let k2 = sign(
            Algorithm::ES256,
            &ec_signer("ec2-private.pem"),
            Some("k2"),
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(auth.authenticate(Some(&bearer(&k2))).await, "kid");
        assert_eq!(auth.jwks_rereads(), 1);

        // Once the interval has passed, the next unknown kid reads the file again.
        age_last_reread(&auth, JWKS_REREAD_INTERVAL + Duration::from_secs(1));
        assert_eq!(
            auth.authenticate(Some(&bearer(&k2))).await.unwrap().role,
            Role::Admin
        );
        assert_eq!(auth.jwks_rereads(), 2);
    }

    /// Moves the last re-read `by` into the past, as if that much time had passed.
    fn age_last_reread(auth: &Authenticator, by: Duration) {
        let Some(KeySource::Jwks(jwks)) = auth.verifier.as_deref().map(|v| &v.keys) else {
            panic!("not a JWKS authenticator");
        };
        let mut last = jwks.reading.try_lock().unwrap();
        *last = last.and_then(|at| at.checked_sub(by));
    }

    #[tokio::test]
    async fn a_jwks_file_broken_on_reread_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        write_jwks(&path, &[ec_jwk(&ec_public("ec-public.pem"), "k1")]);
        let auth = jwks_authenticator(&path);
        std::fs::write(&path, "{ not json").unwrap();

        let bogus = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            Some("k9"),
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(auth.authenticate(Some(&bearer(&bogus))).await, "kid");
        assert_eq!(auth.jwks_rereads(), 1);
        let k1 = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            Some("k1"),
            &claims_for(Role::Admin),
        );
        assert!(auth.authenticate(Some(&bearer(&k1))).await.is_ok());
    }

    #[test]
    fn a_jwks_file_without_usable_keys_is_refused_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let path_text = path.to_str().unwrap();
        let build = || {
            Authenticator::from_settings(
                &settings(&[
                    "--auth-jwks-file",
                    path_text,
                    "--auth-issuer",
                    ISSUER,
                    "--auth-audience",
                    AUDIENCE,
                ])
                .unwrap(),
            )
        };
        std::fs::write(&path, "[]").unwrap();
        let err = build().unwrap_err().to_string();
        assert!(
            err.contains("jwks.json") && err.contains("not a JWKS"),
            "{err}"
        );
        // An EC key while RS256 (the default) is pinned, and a symmetric key.
        write_jwks(
            &path,
            &[
                ec_jwk(&ec_public("ec-public.pem"), "k1"),
                json!({"kty": "oct", "kid": "h", "k": URL_SAFE_NO_PAD.encode(SECRET)}),
            ],
        );
        let err = build().unwrap_err().to_string();
        assert!(err.contains("no usable key"), "{err}");
    }

    #[test]
    fn the_secret_file_must_be_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let build = || {
            Authenticator::from_settings(
                &settings(&[
                    "--auth-hs256-secret-file",
                    path.to_str().unwrap(),
                    "--auth-issuer",
                    ISSUER,
                    "--auth-audience",
                    AUDIENCE,
                ])
                .unwrap(),
            )
        };
        std::fs::write(&path, b"short\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = build().unwrap_err().to_string();
        assert!(err.contains("mode 0644") && err.contains("secret"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = build().unwrap_err().to_string();
        assert!(err.contains("holds 5 bytes"), "{err}");
        assert!(!err.contains("short"), "{err}");

        let mut contents = SECRET.to_vec();
        contents.push(b'\n');
        std::fs::write(&path, &contents).unwrap();
        let auth = build().unwrap();
        assert_eq!(
            auth.authenticate_now(Some(&bearer(&issue_token(
                SECRET,
                &claims_for(Role::Viewer)
            ))))
            .unwrap()
            .role,
            Role::Viewer
        );
        assert!(!format!("{auth:?}").contains("0123456789"));
    }

    #[test]
    fn settings_parse_and_check_say_what_is_wrong() {
        let base = ["--auth-issuer", ISSUER, "--auth-audience", AUDIENCE];
        let ok = settings(
            &[
                &[
                    "--auth-public-key",
                    "a.pem,b.pem",
                    "--auth-algorithms",
                    "RS256,ES256",
                ][..],
                &base[..],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            ok.auth_public_key,
            [PathBuf::from("a.pem"), PathBuf::from("b.pem")]
        );
        assert_eq!(ok.algorithms(), [Algorithm::RS256, Algorithm::ES256]);
        assert_eq!(ok.auth_leeway_secs, 30);
        ok.check().unwrap();

        assert!(settings(&["--auth-algorithms", "none"]).is_err());
        assert!(settings(&["--auth-algorithms", "EdDSA"]).is_err());

        let nothing = settings(&[]).unwrap();
        nothing.check().unwrap();
        assert!(!nothing.has_key_source());
        assert!(Authenticator::from_settings(&nothing).is_err());
        let insecure = settings(&["--insecure-no-auth"]).unwrap();
        insecure.check().unwrap();
        assert!(
            Authenticator::from_settings(&insecure)
                .unwrap()
                .is_insecure()
        );

        let wrong: [(&[&str], &str); 7] = [
            (
                &["--auth-hs256-secret-file", "s", "--auth-jwks-file", "j"],
                "not both --auth-hs256-secret-file and --auth-jwks-file",
            ),
            (
                &["--auth-jwks-file", "j", "--insecure-no-auth"],
                "--insecure-no-auth",
            ),
            (
                &["--auth-jwks-file", "j", "--auth-audience", "a"],
                "--auth-issuer is required",
            ),
            (
                &["--auth-jwks-file", "j", "--auth-issuer", "i"],
                "--auth-audience is required",
            ),
            (&["--auth-issuer", "i"], "--auth-issuer needs a key source"),
            (
                &[
                    "--auth-hs256-secret-file",
                    "s",
                    "--auth-algorithms",
                    "RS256",
                    "--auth-issuer",
                    "i",
                    "--auth-audience",
                    "a",
                ],
                "RS256",
            ),
            (
                &[
                    "--auth-jwks-file",
                    "j",
                    "--auth-algorithms",
                    "HS256",
                    "--auth-issuer",
                    "i",
                    "--auth-audience",
                    "a",
                ],
                "HS256",
            ),
        ];
        for (args, needle) in wrong {
            let err = settings(args).unwrap().check().unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let err = settings(
            &[
                &["--auth-jwks-file", "j", "--auth-leeway-secs", "3600"][..],
                &base[..],
            ]
            .concat(),
        )
        .unwrap()
        .check()
        .unwrap_err()
        .to_string();
        assert!(err.contains("--auth-leeway-secs"), "{err}");
    }

    #[tokio::test]
    async fn an_insecure_authenticator_lets_everyone_in_as_admin() {
        let auth = Authenticator::insecure();
        assert!(auth.is_insecure());
        assert_eq!(
            auth.authenticate(None).await.unwrap(),
            Principal::insecure()
        );
        assert_eq!(
            auth.authenticate(Some("Basic x")).await.unwrap(),
            Principal::insecure()
        );
        assert!(!hs().is_insecure());
    }

    /// Every `rpc` of every proto file, with the role its doc comment names (Registry's have
    /// none and are reads).
    fn proto_rpcs() -> Vec<(String, Role)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/dsreg/v1");
        let mut rpcs = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "proto"))
            .collect();
        files.sort();
        assert!(!files.is_empty());
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let mut package = None;
            let mut service = None;
            let mut comment = String::new();
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("package ") {
                    package = Some(rest.trim_end_matches(';').trim().to_owned());
                } else if let Some(rest) = line.strip_prefix("service ") {
                    service = Some(rest.split_whitespace().next().unwrap().to_owned());
                } else if let Some(rest) = line.strip_prefix("//") {
                    comment.push_str(rest);
                    comment.push(' ');
                    continue;
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap().trim();
                    let path = format!(
                        "/{}.{}/{method}",
                        package.as_deref().expect("package before rpc"),
                        service.as_deref().expect("service before rpc")
                    );
                    let role = comment
                        .split_whitespace()
                        .rev()
                        .find_map(|w| match w.trim_end_matches('.') {
                            "Viewer" => Some(Role::Viewer),
                            "Operator" => Some(Role::Operator),
                            "Admin" => Some(Role::Admin),
                            _ => None,
                        })
                        .unwrap_or(Role::Viewer);
                    rpcs.push((path, role));
                }
                comment.clear();
            }
        }
        rpcs
    }

    #[test]
    fn every_rpc_of_the_proto_files_has_the_permission_its_doc_names() {
        let rpcs = proto_rpcs();
        for (path, role) in &rpcs {
            assert_eq!(
                required_role(path),
                Some(*role),
                "{path} is missing from the permission table or has the wrong role"
            );
        }
        // No stale or duplicate entries either.
        assert_eq!(rpcs.len(), PERMISSIONS.len());
        let mut paths: Vec<_> = PERMISSIONS.iter().map(|(p, _)| *p).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), PERMISSIONS.len());
    }

    #[test]
    fn unknown_paths_have_no_permission() {
        for path in [
            "/dsreg.v1.Datasources/DropEverything",
            "/dsreg.v1.Nope/GetInfo",
            "/dsreg.v2.Registry/GetInfo",
            "dsreg.v1.Registry/GetInfo",
            "/dsreg.v1.Registry/GetInfo/",
            "",
        ] {
            assert_eq!(required_role(path), None, "{path}");
        }
        assert_eq!(
            required_role("/dsreg.v1.Datasources/PublishVersion"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role("/dsreg.v1.Harness/RunTest"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role("/dsreg.v1.Lifecycle/GetStatus"),
            Some(Role::Viewer)
        );
    }

    #[tokio::test]
    async fn dev_credentials_are_created_once_reused_and_reissued_when_expired() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_credentials(dir.path()).unwrap();
        assert!(first.created && first.token_issued);
        assert_eq!(first.secret_file, dir.path().join("auth/hs256.secret"));
        assert_eq!(first.token_file, dir.path().join("auth/admin.token"));
        for file in [&first.secret_file, &first.token_file] {
            let mode = std::fs::metadata(file).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
        let dir_mode = std::fs::metadata(dir.path().join("auth")).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let secret_text = std::fs::read_to_string(&first.secret_file).unwrap();
        assert_eq!(
            STANDARD.decode(secret_text.trim()).unwrap().len(),
            DEV_SECRET_BYTES
        );

        let token = std::fs::read_to_string(&first.token_file).unwrap();
        let admin = first
            .authenticator
            .authenticate(Some(&bearer(token.trim())))
            .await
            .unwrap();
        assert_eq!(
            admin,
            Principal {
                subject: DEV_SUBJECT.into(),
                role: Role::Admin,
                tenant: Tenant::All
            }
        );

        let second = dev_credentials(dir.path()).unwrap();
        assert!(!second.created && !second.token_issued);
        assert_eq!(std::fs::read_to_string(&second.token_file).unwrap(), token);
        assert_eq!(
            std::fs::read_to_string(&second.secret_file).unwrap(),
            secret_text
        );

        // An expired token is replaced by a fresh one under the same secret.
        let secret = read_secret_file(&first.secret_file).unwrap();
        let expired = issue_token(
            &secret,
            &json!({"sub": DEV_SUBJECT, "roles": ["datasource:admin"], "org": "*",
                    "iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "exp": now() - 60}),
        );
        std::fs::write(&first.token_file, &expired).unwrap();
        let third = dev_credentials(dir.path()).unwrap();
        assert!(!third.created && third.token_issued);
        let fresh = std::fs::read_to_string(&third.token_file).unwrap();
        assert_ne!(fresh.trim(), expired);
        assert!(
            third
                .authenticator
                .authenticate(Some(&bearer(fresh.trim())))
                .await
                .is_ok()
        );
        assert!(
            first
                .authenticator
                .authenticate(Some(&bearer(fresh.trim())))
                .await
                .is_ok()
        );
    }

    #[test]
    fn identity_provider_flags_need_https_and_fit_the_other_flags() {
        let oidc = settings(&[
            "--auth-oidc-issuer",
            "https://idp.example/realms/x/",
            "--auth-audience",
            "dsreg",
        ])
        .unwrap();
        oidc.check().unwrap();
        assert_eq!(oidc.issuer(), Some("https://idp.example/realms/x/"));
        assert_eq!(oidc.algorithms(), [Algorithm::RS256]);
        let explicit = settings(&[
            "--auth-oidc-issuer",
            "https://idp.example",
            "--auth-issuer",
            "other",
            "--auth-audience",
            "dsreg",
        ])
        .unwrap();
        assert_eq!(explicit.issuer(), Some("other"));
        settings(&[
            "--auth-jwks-url",
            "https://idp.example/keys",
            "--auth-issuer",
            "i",
            "--auth-audience",
            "a",
            "--auth-jwks-ca-file",
            "ca.pem",
        ])
        .unwrap()
        .check()
        .unwrap();

        let wrong: [(&[&str], &str); 7] = [
            (
                &[
                    "--auth-jwks-url",
                    "http://idp.example/keys",
                    "--auth-issuer",
                    "i",
                    "--auth-audience",
                    "a",
                ],
                "must be an https:// URL",
            ),
            (
                &[
                    "--auth-jwks-url",
                    "https://u:p@idp.example/keys",
                    "--auth-issuer",
                    "i",
                    "--auth-audience",
                    "a",
                ],
                "must not carry credentials",
            ),
            (
                &["--auth-oidc-issuer", "idp.example", "--auth-audience", "a"],
                "--auth-oidc-issuer \"idp.example\": is not a URL",
            ),
            (
                &[
                    "--auth-jwks-url",
                    "https://idp.example/keys",
                    "--auth-audience",
                    "a",
                ],
                "--auth-issuer is required with --auth-jwks-url",
            ),
            (
                &[
                    "--auth-oidc-issuer",
                    "https://idp.example",
                    "--auth-jwks-file",
                    "j",
                ],
                "not both --auth-jwks-file and --auth-oidc-issuer",
            ),
            (
                &[
                    "--auth-jwks-file",
                    "j",
                    "--auth-issuer",
                    "i",
                    "--auth-audience",
                    "a",
                    "--auth-jwks-ca-file",
                    "c",
                ],
                "--auth-jwks-ca-file is for --auth-jwks-url or --auth-oidc-issuer",
            ),
            (
                &["--auth-jwks-ca-file", "c"],
                "--auth-jwks-ca-file needs a key source",
            ),
        ];
        for (args, needle) in wrong {
            let err = settings(args).unwrap().check().unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_provider_source_starts_without_keys_and_a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let args = |ca: &Path| {
            settings(&[
                "--auth-jwks-url",
                "https://idp.example/keys",
                "--auth-issuer",
                ISSUER,
                "--auth-audience",
                AUDIENCE,
                "--auth-algorithms",
                "ES256",
                "--auth-jwks-ca-file",
                ca.to_str().unwrap(),
            ])
            .unwrap()
        };
        let junk = dir.path().join("ca.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let err = Authenticator::from_settings(&args(&junk))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&junk.display().to_string()), "{err}");
        assert!(err.contains("certificate"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = Authenticator::from_settings(&args(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");

        // Without a CA file: the system's roots; no fetch before the first call or tick.
        let mut plain = args(&junk);
        plain.auth_jwks_ca_file = None;
        let auth = Authenticator::from_settings(&plain).unwrap();
        assert_eq!(auth.jwks_rereads(), 0);
        let token = sign(
            Algorithm::ES256,
            &ec_signer("ec-private.pem"),
            Some("k1"),
            &claims_for(Role::Admin),
        );
        assert_unauthenticated(auth.authenticate_now(Some(&bearer(&token))), "kid");
    }
}
