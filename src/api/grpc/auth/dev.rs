//! The embedded default's development credentials: an HS256 secret and an admin token under
//! `<data-dir>/auth`, created once and issued again before the token expires.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use rand::TryRngCore;
use zeroize::Zeroizing;

use super::super::principal::{Role, Tenant};
use super::claims::{Claims, principal_from};
use super::key_files::read_secret_file;
use super::settings::{AuthSetupError, key_file_error};
use super::verify::{Authenticator, validation_template};
use crate::secrets::private_file::{Existing, write_private};
use crate::secrets::zeroized;

/// The issuer of the embedded default's development tokens.
pub const DEV_ISSUER: &str = "dsreg-dev";

/// The audience of the embedded default's development tokens.
pub const DEV_AUDIENCE: &str = "dsreg";

/// The subject of the embedded default's admin token.
pub const DEV_SUBJECT: &str = "dev-admin";

pub(super) const DEV_TOKEN_LIFETIME_SECS: u64 = 365 * 24 * 3600;
/// A development token closer than this to its expiry is issued again at start-up.
pub(super) const DEV_TOKEN_RENEW_BEFORE_SECS: u64 = 24 * 3600;
pub(super) const DEV_SECRET_BYTES: usize = 48;

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
        let text = secret_file_text(random.as_ref());
        write_credential(&secret_file, text.as_bytes(), Existing::Keep)?
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
        let token = Zeroizing::new(issue_token(&secret, &claims));
        write_credential(
            &token_file,
            token_file_text(&token).as_bytes(),
            Existing::Replace,
        )?;
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
pub(super) fn dev_token_is_current(secret: &[u8], token_file: &Path) -> bool {
    super::crypto::install();
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
    super::crypto::install();
    // HMAC signing cannot fail and a JSON value always serializes: the error is unreachable.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing of a JSON value cannot fail")
}

/// The secret file's text: `random` in standard base64 and a newline.
fn secret_file_text(random: &[u8]) -> Zeroizing<String> {
    let encoded = Zeroizing::new(STANDARD.encode(random));
    zeroized::concat(&[&encoded, "\n"])
}

/// The token file's text: the token and a newline.
fn token_file_text(token: &str) -> Zeroizing<String> {
    zeroized::concat(&[token, "\n"])
}

/// Writes a development credential file (mode 0600, whole or not at all).
fn write_credential(path: &Path, bytes: &[u8], existing: Existing) -> Result<bool, AuthSetupError> {
    write_private(path, bytes, existing)
        .map_err(|e| key_file_error(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

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
    fn the_secret_and_token_texts_never_outgrow_their_first_allocation() {
        let secret = secret_file_text(&[7u8; DEV_SECRET_BYTES]);
        assert_eq!(secret.len(), 65);
        assert!(secret.ends_with('\n'));
        assert_eq!(
            secret.capacity(),
            secret.len(),
            "the secret text was reallocated"
        );
        let token = Zeroizing::new(issue_token(SECRET, &claims_for(Role::Admin)));
        let text = token_file_text(&token);
        assert_eq!(text.trim_end(), token.as_str());
        assert_eq!(
            text.capacity(),
            text.len(),
            "the token text was reallocated"
        );
    }
}
