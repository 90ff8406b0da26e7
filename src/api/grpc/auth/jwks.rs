//! JWKS key sets, from a file or an identity provider's URL: parsed into verifying keys by
//! `kid`, read again on a schedule and for an unknown `kid` (single flight, rate limited, with
//! a timeout), keeping the keys already loaded when a read fails.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::super::idp::{Provider, error_chain};
use super::key_files::{algorithm_list, read_public_file};
use super::settings::{
    AuthSettings, AuthSetupError, P256_ALGORITHMS, P384_ALGORITHMS, RSA_ALGORITHMS, key_file_error,
};
use super::verify::{KeySource, VerifyingKey, usable};

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

pub(super) type KeyMap = HashMap<String, Arc<VerifyingKey>>;

/// A JWKS's keys, read again on a schedule ([`Authenticator::run_refresh`]) and for an unknown
/// `kid`, whatever the source (a file or a URL). Reads run one at a time with a timeout; a call
/// whose key is cached never waits for one.
pub(super) struct Jwks {
    pub(super) origin: Origin,
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
pub(super) enum Origin {
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
pub(super) struct Loaded {
    keys: KeyMap,
    /// Keys ignored: without a `kid`, for encryption, of another type, for no pinned algorithm.
    skipped: usize,
    /// The answer's `Cache-Control` max-age (a URL only).
    max_age: Option<Duration>,
}

/// Why a JWKS is read.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reread {
    Scheduled,
    UnknownKid,
}

impl Jwks {
    pub(super) fn new(
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

    /// How many reads have started.
    #[cfg(test)]
    pub(super) fn rereads(&self) -> u64 {
        self.rereads.load(Ordering::Relaxed)
    }

    pub(super) fn get(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        // The map behind the lock is replaced whole, never edited in place: a poisoned lock
        // still holds a consistent map.
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(kid)
            .cloned()
    }

    /// Whether no key has been loaded yet (a URL before its first successful fetch).
    pub(super) fn is_empty(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// How long the keys last read are kept.
    pub(super) fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// Reads the keys again for an unknown `kid`, unless an unknown `kid` caused a read less
    /// than [`JWKS_REREAD_INTERVAL`] ago; returns the key if the set has it now.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled wait gives up only this request's answer (a file read runs on
    /// its own thread; the keys are installed by whichever request or tick reads next).
    pub(super) async fn reread_for(self: &Arc<Self>, kid: &str) -> Option<Arc<VerifyingKey>> {
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
    pub(super) async fn refresh(self: &Arc<Self>) -> bool {
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

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Reads a JWKS file: the usable keys by `kid`, and how many keys were skipped (no `kid`, for
/// encryption, symmetric or of another type, or for no pinned algorithm). Errors are reasons
/// (the caller names the file).
pub(super) fn read_jwks(
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
pub(super) fn json_error(error: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        error.classify(),
        error.line(),
        error.column()
    )
}

/// The usable keys of a JWKS document and how many were skipped.
pub(super) fn parse_jwks(
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
pub(super) fn remote_jwks(
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
pub(super) fn jwks_client(ca_file: Option<&Path>) -> Result<reqwest::Client, AuthSetupError> {
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

pub(super) fn jwks_key(
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

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
        let jwks = auth.jwks().expect("a JWKS authenticator");
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
