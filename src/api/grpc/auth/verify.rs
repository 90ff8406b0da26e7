//! Token verification: the [`Authenticator`] checks a bearer JWT's signature under a pinned
//! algorithm with a fixed key or a JWKS key chosen by `kid`, then its times, issuer and
//! audience, and hands the claims on to become a principal.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::super::idp::Provider;
use super::super::principal::Principal;
use super::claims::{Claims, bearer_token, principal_from};
use super::denied::Denied;
use super::jwks::{JWKS_REREAD_INTERVAL, Jwks, Origin, jwks_client, read_jwks, remote_jwks};
use super::key_files::{read_pem_key, read_secret_file};
use super::settings::{
    AuthSettings, AuthSetupError, HMAC_ALGORITHMS, KEY_SOURCE_FLAGS, MAX_LEEWAY_SECS, SourceKind,
    key_file_error, settings_error,
};

// --- Authenticator ------------------------------------------------------------------------

/// Verifies bearer tokens and turns them into principals. Cheap to clone (shared keys).
#[derive(Clone)]
pub struct Authenticator {
    /// `None`: `--insecure-no-auth`.
    verifier: Option<Arc<Verifier>>,
}

pub(super) struct Verifier {
    times: TimeRules,
    pinned: Vec<Algorithm>,
    /// `"RS256, ES256"`, for messages.
    pinned_text: String,
    keys: KeySource,
}

pub(super) enum KeySource {
    /// A secret or PEM public keys, fixed for the life of the process. A token is tried
    /// against each key that can verify its algorithm.
    Fixed(Vec<VerifyingKey>),
    /// Keys chosen by `kid`.
    Jwks(Arc<Jwks>),
}

pub(super) struct VerifyingKey {
    key: DecodingKey,
    /// `algorithms` holds the pinned algorithms this key can verify (never empty).
    validation: Validation,
}

impl VerifyingKey {
    pub(super) fn new(key: DecodingKey, algorithms: Vec<Algorithm>, template: &Validation) -> Self {
        let mut validation = template.clone();
        validation.algorithms = algorithms;
        Self { key, validation }
    }

    pub(super) fn accepts(&self, algorithm: Algorithm) -> bool {
        self.validation.algorithms.contains(&algorithm)
    }

    pub(super) fn decode(&self, token: &str) -> jsonwebtoken::errors::Result<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map(|data| data.claims)
    }
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
        super::crypto::install();
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
        // The flags require both with a key source; settings built in code may still lack one.
        let required = |flag: &str, value: Option<&'_ str>| {
            value
                .filter(|v| !v.trim().is_empty())
                .map(str::to_owned)
                .ok_or_else(|| settings_error(format!("{flag} is required with {}", source.flag())))
        };
        let issuer = required("--auth-issuer", settings.issuer())?;
        let audience = required("--auth-audience", settings.auth_audience.as_deref())?;
        let template = validation_template(&issuer, &audience, settings.auth_leeway_secs);
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
        super::crypto::install();
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

    /// The JWKS behind this authenticator, if its keys come from one.
    #[cfg(test)]
    pub(super) fn jwks(&self) -> Option<&Arc<Jwks>> {
        match self.verifier.as_deref().map(|v| &v.keys) {
            Some(KeySource::Jwks(jwks)) => Some(jwks),
            _ => None,
        }
    }

    #[cfg(test)]
    pub(super) fn jwks_rereads(&self) -> u64 {
        self.jwks().map_or(0, |jwks| jwks.rereads())
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

pub(super) const UNKNOWN_KID: &str = "the token's key id (kid) is unknown";

/// Why the loaded keys did not verify a token.
pub(super) enum Unverified {
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
pub(super) fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The `iat` rules (`exp` and `nbf` are checked by [`Validation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TimeRules {
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

pub(super) fn validation_template(issuer: &str, audience: &str, leeway_secs: u64) -> Validation {
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
pub(super) fn usable(pinned: &[Algorithm], candidates: &[Algorithm]) -> Vec<Algorithm> {
    pinned
        .iter()
        .copied()
        .filter(|a| candidates.contains(a))
        .collect()
}

pub(super) const NOT_A_JWT: &str = "the bearer token is not a well-formed JWT";

pub(super) struct PeekedHeader {
    /// `None`: an algorithm jsonwebtoken does not know, `none` included.
    alg: Option<Algorithm>,
    kid: Option<String>,
}

/// Reads the header's `alg` and `kid` before verification, to pin the algorithm with a clear
/// message and to pick the JWKS key.
pub(super) fn peek_header(token: &str) -> Result<PeekedHeader, Denied> {
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
pub(super) fn is_signature_mismatch(error: &jsonwebtoken::errors::Error) -> bool {
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
pub(super) fn denial_of(error: &jsonwebtoken::errors::Error) -> Denied {
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

#[cfg(test)]
mod tests {
    use super::super::claims::MAX_TOKEN_BYTES;
    use super::super::test_support::*;
    use super::*;

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
}
