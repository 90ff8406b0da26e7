//! Master keys from outside the registry, loaded once at start and held in memory:
//!
//! - [`ExecKeyProvider`]: a configured command prints the key set
//!   (`{"active": 2, "keys": {"1": "<base64 32 bytes>", …}}`) on stdout, as Kafka's config
//!   providers and Vector's exec secrets backend do, so any KMS CLI plugs in. The command
//!   runs without a shell; its output is never logged or quoted in errors.
//! - [`VaultKeyProvider`]: the keys are kept wrapped at rest (a file in the key set shape
//!   whose entries are Vault transit ciphertexts, `vault:v1:…`) and unwrapped through
//!   Vault's transit `decrypt` endpoint at start; the plaintext keys are never written to
//!   disk. Vault unreachable or refusing at start is a clear error; Vault going down later
//!   changes nothing, since every key is in memory.
//!
//! Both answer from memory afterwards, like the built-in providers (the trait is called per
//! secret). Errors name the source and the version, never key material.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

use super::keys::{KeyRing, decode_key, parse_key_set};
use super::{Error, KeyProvider, MasterKey, SecretString, redact_url};

/// How long a key command or a Vault request may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn failed(source: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::KeySource {
        origin: source.into(),
        reason: reason.into(),
    }
}

/// Master keys printed by a command (see the module doc).
#[derive(Debug, Clone)]
pub struct ExecKeyProvider {
    ring: KeyRing,
}

impl ExecKeyProvider {
    /// Runs `command` (a program and its arguments, no shell) with at most `timeout` and
    /// reads the key set it prints.
    ///
    /// # Errors
    /// [`Error::KeySource`] naming the program: it cannot start, times out, exits with a
    /// failure (with the first line of its stderr), or prints something that is not a key set
    /// of valid keys.
    pub async fn load(command: &[String], timeout: Duration) -> Result<Self, Error> {
        let Some((program, args)) = command.split_first() else {
            return Err(failed("the key command", "is empty"));
        };
        let source = format!("the key command {program:?}");
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(&source, format!("cannot start: {e}")))?;
        let output = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| failed(&source, format!("did not finish within {timeout:?}")))?
            .map_err(|e| failed(&source, format!("failed: {e}")))?;
        let stdout = Zeroizing::new(output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let first: String = stderr
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            return Err(failed(
                &source,
                format!("exited with {}: {first}", output.status),
            ));
        }
        let text = std::str::from_utf8(&stdout)
            .map_err(|_| failed(&source, "printed something that is not UTF-8"))?;
        let set = parse_key_set(text).map_err(|reason| failed(&source, reason))?;
        let mut keys = BTreeMap::new();
        for (version, encoded) in &set.entries {
            keys.insert(
                *version,
                decode_key(*version, encoded).map_err(|reason| failed(&source, reason))?,
            );
        }
        let ring =
            KeyRing::new(keys, Some(set.active)).map_err(|reason| failed(&source, reason))?;
        Ok(Self { ring })
    }
}

impl KeyProvider for ExecKeyProvider {
    fn active_version(&self) -> u32 {
        self.ring.active_version()
    }

    fn key(&self, version: u32) -> Result<MasterKey, Error> {
        self.ring.key(version)
    }

    fn versions(&self) -> Vec<u32> {
        self.ring.versions()
    }
}

/// Where and how to unwrap master keys with Vault's transit engine.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// Vault's address (`https://vault.internal:8200`).
    pub addr: String,
    /// The token, sent as `X-Vault-Token`.
    pub token: SecretString,
    /// The transit engine's mount (`transit`).
    pub mount: String,
    /// The transit key that wrapped the master keys.
    pub key_name: String,
    /// The wrapped key set: `{"active": 2, "keys": {"1": "vault:v1:…", …}}`.
    pub wrapped_keys: PathBuf,
    /// How long each request may take.
    pub timeout: Duration,
}

/// Master keys unwrapped by Vault's transit engine at start (see the module doc).
#[derive(Debug, Clone)]
pub struct VaultKeyProvider {
    ring: KeyRing,
}

#[derive(serde::Deserialize)]
struct DecryptAnswer {
    data: DecryptData,
}

#[derive(serde::Deserialize)]
struct DecryptData {
    plaintext: String,
}

impl VaultKeyProvider {
    /// Reads the wrapped key set and unwraps every version through
    /// `POST {addr}/v1/{mount}/decrypt/{key_name}`, sent with `client`.
    ///
    /// # Errors
    /// [`Error::KeySource`] naming Vault's address (credentials masked) or the wrapped key
    /// file: unreadable or malformed file, Vault unreachable, a refusal (with Vault's own
    /// error text), or an unwrapped key that is not 32 bytes.
    pub async fn load(settings: &VaultSettings, client: reqwest::Client) -> Result<Self, Error> {
        let file_source = format!("the wrapped key file {}", settings.wrapped_keys.display());
        let text = Zeroizing::new(
            tokio::fs::read_to_string(&settings.wrapped_keys)
                .await
                .map_err(|e| failed(&file_source, e.to_string()))?,
        );
        let set = parse_key_set(&text).map_err(|reason| failed(&file_source, reason))?;
        let addr = settings.addr.trim_end_matches('/');
        let source = format!("Vault at {}", redact_url(addr));
        let url = format!(
            "{addr}/v1/{}/decrypt/{}",
            settings.mount.trim_matches('/'),
            settings.key_name
        );
        let mut keys = BTreeMap::new();
        for (version, wrapped) in &set.entries {
            let answer = client
                .post(&url)
                .timeout(settings.timeout)
                .header("X-Vault-Token", settings.token.expose())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::json!({ "ciphertext": wrapped.as_str() }).to_string())
                .send()
                .await
                .map_err(|e| {
                    let what = if e.is_timeout() {
                        "did not answer in time"
                    } else {
                        "is unreachable"
                    };
                    failed(
                        &source,
                        format!("{what} (unwrapping key version {version})"),
                    )
                })?;
            let status = answer.status();
            if !status.is_success() {
                let body: serde_json::Value = answer
                    .bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let errors = body["errors"]
                    .as_array()
                    .map(|e| {
                        e.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                return Err(failed(
                    &source,
                    format!("answered {status} unwrapping key version {version}: {errors}"),
                ));
            }
            let body = Zeroizing::new(
                answer
                    .bytes()
                    .await
                    .map_err(|_| {
                        failed(
                            &source,
                            format!("the answer for key version {version} broke off"),
                        )
                    })?
                    .to_vec(),
            );
            let answer: DecryptAnswer = serde_json::from_slice(&body).map_err(|_| {
                failed(
                    &source,
                    format!("the answer for key version {version} has no data.plaintext"),
                )
            })?;
            let plaintext = Zeroizing::new(answer.data.plaintext);
            keys.insert(
                *version,
                decode_key(*version, &plaintext)
                    .map_err(|reason| failed(&source, format!("unwrapped {reason}")))?,
            );
        }
        let ring =
            KeyRing::new(keys, Some(set.active)).map_err(|reason| failed(&file_source, reason))?;
        Ok(Self { ring })
    }
}

impl KeyProvider for VaultKeyProvider {
    fn active_version(&self) -> u32 {
        self.ring.active_version()
    }

    fn key(&self, version: u32) -> Result<MasterKey, Error> {
        self.ring.key(version)
    }

    fn versions(&self) -> Vec<u32> {
        self.ring.versions()
    }
}
