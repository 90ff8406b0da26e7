//! Fixtures shared by the auth modules' unit tests: keys, claims and signing.

pub(super) use std::os::unix::fs::{MetadataExt, PermissionsExt};
pub(super) use std::path::{Path, PathBuf};

pub(super) use base64::Engine;
pub(super) use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
pub(super) use jsonwebtoken::{Algorithm, EncodingKey, Header};
pub(super) use serde_json::{Value, json};

pub(super) use super::super::principal::{Principal, Role, Tenant};
pub(super) use super::{AuthSettings, Authenticator, Denied, issue_token};

pub(super) const ISSUER: &str = "https://issuer.example";
pub(super) const AUDIENCE: &str = "dsreg-test";
pub(super) const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

pub(super) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

pub(super) fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

pub(super) fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

pub(super) fn claims_with(roles: &[&str]) -> Value {
    json!({
        "sub": "alice",
        "roles": roles,
        "org": "acme",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now() + 600,
    })
}

pub(super) fn claims_for(role: Role) -> Value {
    claims_with(&[role.claim()])
}

pub(super) fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

pub(super) fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

pub(super) fn sign(
    algorithm: Algorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    claims: &Value,
) -> String {
    super::install_jwt_crypto();
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

pub(super) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

pub(super) fn hs() -> Authenticator {
    Authenticator::hs256(SECRET, ISSUER, AUDIENCE)
}

pub(super) async fn check(auth: &Authenticator, claims: &Value) -> Result<Principal, Denied> {
    auth.authenticate(Some(&bearer(&issue_token(SECRET, claims))))
        .await
}

pub(super) fn assert_unauthenticated(result: Result<Principal, Denied>, needle: &str) {
    match result {
        Err(Denied::Unauthenticated(message)) => assert!(
            message.contains(needle),
            "message {message:?} should mention {needle:?}"
        ),
        other => panic!("expected Unauthenticated({needle}), got {other:?}"),
    }
}

pub(super) fn settings(args: &[&str]) -> Result<AuthSettings, clap::Error> {
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
pub(super) fn ec_jwk(public_pem: &str, kid: &str) -> Value {
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

pub(super) fn ec_signer(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&fixture_bytes(name)).unwrap()
}

pub(super) fn write_jwks(path: &Path, keys: &[Value]) {
    std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
}

pub(super) fn jwks_authenticator(path: &Path) -> Authenticator {
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

pub(super) fn ec_public(name: &str) -> String {
    String::from_utf8(fixture_bytes(name)).unwrap()
}
