//! Key files: bounded reads of public key and JWKS files, HMAC secret files that must be
//! private (mode 0600) and long enough, and PEM RSA or EC public keys matched to the pinned
//! algorithms. Errors name the file, never its contents.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use zeroize::Zeroizing;

use super::settings::{
    AuthSetupError, P256_ALGORITHMS, P384_ALGORITHMS, RSA_ALGORITHMS, key_file_error,
};
use super::verify::{VerifyingKey, usable};

pub(super) const MIN_SECRET_BYTES: usize = 32;
pub(super) const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;

pub(super) fn read_limited(
    path: &Path,
) -> Result<(std::fs::File, std::fs::Metadata), AuthSetupError> {
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

pub(super) fn read_public_file(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    let (mut file, _) = read_limited(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| key_file_error(path, format!("{e}")))?;
    Ok(bytes)
}

/// Reads an HMAC secret: the file's bytes with one trailing newline removed. The file must not
/// be readable by group or others and must hold at least 32 bytes.
pub(super) fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, AuthSetupError> {
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

pub(super) fn algorithm_list(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn read_pem_key(
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

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
}
