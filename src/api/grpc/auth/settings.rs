//! The `--auth-*` flags and how they combine: one key source, the claims it needs, the
//! algorithms it can verify. Which flags go together is said to clap on the flags themselves, so
//! a contradiction is a usage error before anything starts.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use jsonwebtoken::Algorithm;

use super::super::idp::{discovery_url, https_url};

/// The key source flags, for messages.
pub(super) const KEY_SOURCE_FLAGS: &str = "--auth-hs256-secret-file, --auth-public-key, \
                                           --auth-jwks-file, --auth-jwks-url or --auth-oidc-issuer";

/// `exp` and `nbf` arithmetic stays meaningful, and a typo cannot keep expired tokens valid
/// for hours.
pub(super) const MAX_LEEWAY_SECS: u64 = 300;

pub(super) const HMAC_ALGORITHMS: &[Algorithm] =
    &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
pub(super) const RSA_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
pub(super) const P256_ALGORITHMS: &[Algorithm] = &[Algorithm::ES256];
pub(super) const P384_ALGORITHMS: &[Algorithm] = &[Algorithm::ES384];

/// The clap group of the key source flags: at most one is given.
const KEY_SOURCE: &str = "auth_key_source";
/// The clap group of the key sources fetched over HTTPS.
const REMOTE_SOURCE: &str = "auth_remote_source";

/// How the gRPC port authenticates callers. Flattened into the service's settings.
///
/// Give one key source (`--auth-hs256-secret-file`, `--auth-public-key` or `--auth-jwks-file`)
/// with `--auth-issuer` and `--auth-audience`; or `--insecure-no-auth`; or nothing, and let the
/// caller pick its default (the embedded default uses [`dev_credentials`]).
///
/// Which flags go together is declared here, for clap to enforce: one key source at most
/// (`auth_key_source`); `--insecure-no-auth` with none; `--auth-issuer` (except for an OpenID
/// Connect issuer, which is its own) and `--auth-audience` with every key source; algorithms,
/// issuer, audience and a CA file only with one; a CA file only for a source fetched over
/// HTTPS (`auth_remote_source`); a leeway of at most 300 s.
///
/// [`dev_credentials`]: super::dev_credentials
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new(KEY_SOURCE)
        .multiple(false)
        .requires("auth_audience")
        .args([
            "auth_hs256_secret_file",
            "auth_public_key",
            "auth_jwks_file",
            "auth_jwks_url",
            "auth_oidc_issuer",
        ])
))]
#[command(group(
    clap::ArgGroup::new(REMOTE_SOURCE)
        .multiple(false)
        .args(["auth_jwks_url", "auth_oidc_issuer"])
))]
pub struct AuthSettings {
    /// A file holding the HS256 secret: its bytes, one trailing newline ignored; at least 32
    /// bytes; mode 0600 or stricter.
    #[arg(long, env = "DSREG_AUTH_HS256_SECRET_FILE", requires = "auth_issuer")]
    pub auth_hs256_secret_file: Option<PathBuf>,

    /// A PEM RSA or EC public key (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`); repeat the
    /// flag (or separate paths with commas) to accept several, e.g. during a rotation.
    #[arg(
        long,
        env = "DSREG_AUTH_PUBLIC_KEY",
        value_delimiter = ',',
        requires = "auth_issuer"
    )]
    pub auth_public_key: Vec<PathBuf>,

    /// A JWKS file (`{"keys": [...]}`) of RSA and EC public keys, chosen by the token's `kid`;
    /// read again every `--auth-jwks-ttl-secs`, and on an unknown `kid` at most every 30 s.
    #[arg(long, env = "DSREG_AUTH_JWKS_FILE", requires = "auth_issuer")]
    pub auth_jwks_file: Option<PathBuf>,

    /// An `https://` URL of a JWKS of RSA and EC public keys (an identity provider's
    /// `jwks_uri`), chosen by the token's `kid`; kept for the answer's `Cache-Control` max-age
    /// (5 s to 24 h; `--auth-jwks-ttl-secs` without one), fetched again on an unknown `kid` at
    /// most every 30 s; while it cannot be reached the keys already fetched keep working.
    #[arg(long, env = "DSREG_AUTH_JWKS_URL", requires = "auth_issuer")]
    pub auth_jwks_url: Option<String>,

    /// An OpenID Connect issuer (`https://…`): its keys are the JWKS at the `jwks_uri` of
    /// `<issuer>/.well-known/openid-configuration`, kept as with `--auth-jwks-url`. The issuer
    /// is the required `iss` claim unless `--auth-issuer` is given.
    #[arg(long, env = "DSREG_AUTH_OIDC_ISSUER")]
    pub auth_oidc_issuer: Option<String>,

    /// PEM CA certificates that alone are trusted for `--auth-jwks-url` and
    /// `--auth-oidc-issuer`; default: the system's roots.
    #[arg(long, env = "DSREG_AUTH_JWKS_CA_FILE", requires = REMOTE_SOURCE)]
    pub auth_jwks_ca_file: Option<PathBuf>,

    /// The accepted signature algorithms, comma separated (e.g. `RS256,ES256`); tokens signed
    /// with any other, `none` included, are refused. Default: HS256 with a secret file, RS256
    /// with public keys or a JWKS file.
    #[arg(
        long,
        env = "DSREG_AUTH_ALGORITHMS",
        value_delimiter = ',',
        value_parser = parse_algorithm,
        requires = KEY_SOURCE
    )]
    pub auth_algorithms: Vec<Algorithm>,

    /// The required `iss` claim (required with a key source).
    #[arg(long, env = "DSREG_AUTH_ISSUER", value_parser = non_blank, requires = KEY_SOURCE)]
    pub auth_issuer: Option<String>,

    /// The required `aud` claim (required with a key source).
    #[arg(long, env = "DSREG_AUTH_AUDIENCE", value_parser = non_blank, requires = KEY_SOURCE)]
    pub auth_audience: Option<String>,

    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds (at most 300); a token issued
    /// (`iat`) further in the future is refused.
    #[arg(
        long,
        env = "DSREG_AUTH_LEEWAY_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(..=MAX_LEEWAY_SECS)
    )]
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
    #[arg(long, env = "DSREG_INSECURE_NO_AUTH", conflicts_with = KEY_SOURCE)]
    pub insecure_no_auth: bool,
}

pub(super) fn parse_algorithm(value: &str) -> Result<Algorithm, String> {
    let value = value.trim();
    let algorithm = Algorithm::from_str(value).map_err(|_| {
        format!("unknown signature algorithm {value:?}; use HS256/384/512, RS256/384/512, PS256/384/512, ES256 or ES384")
    })?;
    if algorithm == Algorithm::EdDSA {
        return Err("EdDSA is not supported; use RS*, PS* or ES* keys".to_owned());
    }
    Ok(algorithm)
}

/// A claim value: not empty or blank.
fn non_blank(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(value.to_owned())
}

/// Where verifying keys come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum SourceKind<'a> {
    Secret(&'a Path),
    PublicKeys(&'a [PathBuf]),
    Jwks(&'a Path),
    JwksUrl(&'a str),
    OidcIssuer(&'a str),
}

impl SourceKind<'_> {
    pub(super) fn flag(self) -> &'static str {
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
    pub(super) fn sources(&self) -> Vec<SourceKind<'_>> {
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
    pub(super) fn issuer(&self) -> Option<&str> {
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

    /// Checks what clap cannot see on the flags alone (which flags go together it has
    /// checked already): that a URL is an `https://` URL without credentials, and that the
    /// pinned algorithms are ones the key source can verify.
    ///
    /// # Errors
    /// [`AuthSetupError::Settings`] saying what is wrong.
    pub fn check(&self) -> Result<(), AuthSetupError> {
        let Some(source) = self.sources().first().copied() else {
            return Ok(());
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
            SourceKind::Secret(_) | SourceKind::PublicKeys(_) | SourceKind::Jwks(_) => {}
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

pub(super) fn settings_error(reason: String) -> AuthSetupError {
    AuthSetupError::Settings(reason)
}

pub(super) fn key_file_error(path: &Path, reason: impl Into<String>) -> AuthSetupError {
    AuthSetupError::KeyFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use proptest::prelude::*;

    use super::super::test_support::*;
    use super::super::verify::Authenticator;
    use super::*;

    /// The clap refusal of `args`: its kind and its message.
    fn refusal(args: &[&str]) -> (ErrorKind, String) {
        let error = settings(args).expect_err("clap refuses these flags");
        (error.kind(), error.to_string())
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

        // Flags that do not go together: clap's usage errors, naming the flags.
        let conflicting: [(&[&str], ErrorKind, &[&str]); 7] = [
            (
                &["--auth-hs256-secret-file", "s", "--auth-jwks-file", "j"],
                ErrorKind::ArgumentConflict,
                &["--auth-hs256-secret-file", "--auth-jwks-file"],
            ),
            (
                &["--auth-jwks-file", "j", "--insecure-no-auth"],
                ErrorKind::ArgumentConflict,
                &["--insecure-no-auth", "--auth-jwks-file"],
            ),
            (
                &["--auth-jwks-file", "j", "--auth-audience", "a"],
                ErrorKind::MissingRequiredArgument,
                &["--auth-issuer"],
            ),
            (
                &["--auth-jwks-file", "j", "--auth-issuer", "i"],
                ErrorKind::MissingRequiredArgument,
                &["--auth-audience"],
            ),
            (
                &["--auth-issuer", "i"],
                ErrorKind::MissingRequiredArgument,
                &["--auth-hs256-secret-file", "--auth-oidc-issuer"],
            ),
            (
                &[
                    &["--auth-jwks-file", "j", "--auth-leeway-secs", "3600"][..],
                    &base[..],
                ]
                .concat(),
                ErrorKind::ValueValidation,
                &["--auth-leeway-secs", "0..=300"],
            ),
            (
                &[
                    "--auth-jwks-file",
                    "j",
                    "--auth-issuer",
                    " ",
                    "--auth-audience",
                    "a",
                ],
                ErrorKind::ValueValidation,
                &["--auth-issuer", "must not be empty"],
            ),
        ];
        for (args, kind, needles) in conflicting {
            let (refused, message) = refusal(args);
            assert_eq!(refused, kind, "{args:?}: {message}");
            for needle in needles {
                assert!(message.contains(needle), "{args:?}: {message}");
            }
        }

        // Algorithms the key source cannot verify: the one rule clap cannot see.
        let unfit: [(&[&str], &str); 2] = [
            (
                &[
                    "--auth-hs256-secret-file",
                    "s",
                    "--auth-algorithms",
                    "RS256",
                ],
                "RS256",
            ),
            (
                &["--auth-jwks-file", "j", "--auth-algorithms", "HS256"],
                "HS256",
            ),
        ];
        for (args, needle) in unfit {
            let args = [args, &base[..]].concat();
            let err = settings(&args).unwrap().check().unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
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

        let unusable: [(&[&str], &str); 3] = [
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
        ];
        for (args, needle) in unusable {
            let err = settings(args).unwrap().check().unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }

        let conflicting: [(&[&str], ErrorKind, &[&str]); 4] = [
            (
                &[
                    "--auth-jwks-url",
                    "https://idp.example/keys",
                    "--auth-audience",
                    "a",
                ],
                ErrorKind::MissingRequiredArgument,
                &["--auth-issuer"],
            ),
            (
                &[
                    "--auth-oidc-issuer",
                    "https://idp.example",
                    "--auth-jwks-file",
                    "j",
                ],
                ErrorKind::ArgumentConflict,
                &["--auth-jwks-file", "--auth-oidc-issuer"],
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
                ErrorKind::MissingRequiredArgument,
                &["--auth-jwks-url", "--auth-oidc-issuer"],
            ),
            (
                &["--auth-jwks-ca-file", "c"],
                ErrorKind::MissingRequiredArgument,
                &["--auth-jwks-url", "--auth-oidc-issuer"],
            ),
        ];
        for (args, kind, needles) in conflicting {
            let (refused, message) = refusal(args);
            assert_eq!(refused, kind, "{args:?}: {message}");
            for needle in needles {
                assert!(message.contains(needle), "{args:?}: {message}");
            }
        }
    }

    /// The auth flags a combination may hold (values that parse; the files need not exist).
    const FLAGS: [&[&str]; 10] = [
        &["--auth-hs256-secret-file", "s"],
        &["--auth-public-key", "k.pem"],
        &["--auth-jwks-file", "j.json"],
        &["--auth-jwks-url", "https://idp.example/keys"],
        &["--auth-oidc-issuer", "https://idp.example"],
        &["--auth-jwks-ca-file", "ca.pem"],
        &["--auth-algorithms", "RS256"],
        &["--auth-issuer", "i"],
        &["--auth-audience", "a"],
        &["--insecure-no-auth"],
    ];

    proptest! {
        /// Whatever flags are combined, clap accepts exactly the combinations that make sense:
        /// at most one key source; none with `--insecure-no-auth`; with one, an audience and
        /// an issuer (an OpenID Connect issuer is its own); without one, no issuer, audience,
        /// algorithms or CA file; a CA file only for a source fetched over HTTPS.
        #[test]
        fn clap_accepts_exactly_the_combinations_that_make_sense(
            chosen in proptest::collection::vec(any::<bool>(), FLAGS.len())
        ) {
            let given = |i: usize| chosen[i];
            let args: Vec<&str> = (0..FLAGS.len())
                .filter(|i| given(*i))
                .flat_map(|i| FLAGS[i].iter().copied())
                .collect();
            let sources = (0..5).filter(|i| given(*i)).count();
            let remote = given(3) || given(4);
            let sensible = sources <= 1
                && !(given(9) && sources == 1)
                && if sources == 1 {
                    given(8) && (given(7) || given(4)) && (!given(5) || remote)
                } else {
                    !(given(5) || given(6) || given(7) || given(8))
                };
            let parsed = settings(&args);
            prop_assert_eq!(parsed.is_ok(), sensible, "{:?}: {:?}", args, parsed.err());
            if let Ok(parsed) = parsed {
                prop_assert_eq!(parsed.has_key_source(), sources == 1);
                prop_assert_eq!(parsed.insecure_no_auth, given(9));
            }
        }
    }
}
