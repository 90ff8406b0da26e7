//! What the `kafka` source and the `kafka` sink share about reaching brokers: the security
//! settings (TLS trusting the system roots or a CA, a SASL login), how they become
//! librdkafka's configuration, the checks a CA is held to, and the client context that keeps
//! the password out of every log line and error and remembers why a login or a TLS handshake
//! failed. It owns no client and no run: the source ([`super::kafka`]) and the sink
//! ([`super::kafka_sink`]) create theirs from it.

use std::sync::{Arc, Mutex};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde_json::Value;

use super::ConfigError;

/// Whom the brokers' certificates must chain to.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's root certificates.
    SystemRoots,
    /// The CA certificates of this PEM text.
    Ca(String),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::SystemRoots => f.write_str("SystemRoots"),
            Trust::Ca(_) => f.write_str("Ca(..)"),
        }
    }
}

/// A SASL login: the mechanism, the user and the password.
#[derive(Clone)]
pub struct Login {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: String,
    /// The user.
    pub username: String,
    /// The password (never logged: the client context scrubs it).
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The SASL mechanisms a login may use.
pub const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// The `tls` setting of a config object: absent (plain text), `{}` (the system roots) or
/// `{"ca_secret": NAME}` (the CA in the secret NAME). `Some(None)`: TLS with the system roots.
///
/// # Errors
/// `tls` is not an object, or its `ca_secret` not a non-empty string.
pub fn tls_setting(config: &Value) -> Result<Option<Option<String>>, ConfigError> {
    match config.get("tls") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => match object.get("ca_secret") {
            None | Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(name)) if !name.is_empty() => Ok(Some(Some(name.clone()))),
            Some(_) => Err(ConfigError::new(
                "tls.ca_secret",
                "must be a non-empty string",
            )),
        },
        Some(_) => Err(ConfigError::new("tls", "must be an object")),
    }
}

/// Checks that `pem` holds CA certificates a client can trust: at least one PEM
/// `CERTIFICATE` block that decodes. The answer never quotes the text.
///
/// # Errors
/// What is wrong, in words.
pub fn check_ca(pem: &str) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut found = 0usize;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|_| "holds a PEM block that does not decode".to_owned())?;
        found += 1;
    }
    if found == 0 {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(())
}

/// A client configuration for `servers` (`host:port,…`) speaking TLS when `tls` is set and
/// logging in when `login` is: `security.protocol`, the CA and the SASL settings.
pub fn client_config(servers: &str, tls: Option<&Trust>, login: Option<&Login>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", servers);
    let protocol = match (login, tls) {
        (None, None) => "plaintext",
        (None, Some(_)) => "ssl",
        (Some(_), None) => "sasl_plaintext",
        (Some(_), Some(_)) => "sasl_ssl",
    };
    config.set("security.protocol", protocol);
    if let Some(login) = login {
        config
            .set("sasl.mechanism", &login.mechanism)
            .set("sasl.username", &login.username)
            .set("sasl.password", &login.password);
    }
    if let Some(Trust::Ca(pem)) = tls {
        config.set("ssl.ca.pem", pem);
    }
    config
}

/// Why the client could not be created, naming the setting at fault and never its value
/// (the value may be the password or the CA).
pub fn creation_error(e: &KafkaError, whose: &str) -> String {
    match e {
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("{whose} refused {key}: {description}")
        }
        _ => format!("{whose} could not be created"),
    }
}

/// What a client reports outside of requests: the last refusal of its login and the last
/// failed TLS handshake; librdkafka's own log lines go to `tracing`, scrubbed of the password.
/// Clones share one state, so the owner of a client keeps a clone to ask it (a producer's
/// context is not reachable through the producer).
#[derive(Clone)]
pub struct Context(Arc<Reports>);

struct Reports {
    password: Option<String>,
    refused: Mutex<Option<String>>,
    handshake: Mutex<Option<String>>,
}

impl Context {
    /// The context of a client logging in with `login`, if any.
    pub fn new(login: Option<&Login>) -> Self {
        Self(Arc::new(Reports {
            password: login.map(|l| l.password.clone()),
            refused: Mutex::new(None),
            handshake: Mutex::new(None),
        }))
    }

    /// `text` with the password replaced.
    pub fn scrub(&self, text: &str) -> String {
        match &self.0.password {
            Some(p) if !p.is_empty() => text.replace(p.as_str(), "[redacted]"),
            _ => text.to_owned(),
        }
    }

    /// Why the brokers refused the login (or an authorisation), if they did.
    pub fn refusal(&self) -> Option<String> {
        Self::read(&self.0.refused)
    }

    /// Why the last TLS handshake with a broker failed (an untrusted certificate, a name that
    /// does not match), if one did since the last [`Context::forget_handshake`].
    pub fn handshake_failure(&self) -> Option<String> {
        Self::read(&self.0.handshake)
    }

    /// Forgets the last failed handshake, so that a later one is known to be new.
    pub fn forget_handshake(&self) {
        *self
            .0
            .handshake
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn read(slot: &Mutex<Option<String>>) -> Option<String> {
        // A poisoned lock only means a panic elsewhere while a string was stored.
        slot.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let message = self.scrub(message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}");
            }
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = self.scrub(reason);
        let slot = match error.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            ) => Some(&self.0.refused),
            Some(RDKafkaErrorCode::SSL) => Some(&self.0.handshake),
            _ => None,
        };
        if let Some(slot) = slot {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.clone());
        }
        tracing::debug!(target: "librdkafka", "client error: {reason}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_tls_setting_is_plain_system_roots_or_a_named_ca() {
        assert_eq!(tls_setting(&json!({})), Ok(None));
        assert_eq!(tls_setting(&json!({"tls": {}})), Ok(Some(None)));
        assert_eq!(
            tls_setting(&json!({"tls": {"ca_secret": "ca"}})),
            Ok(Some(Some("ca".into())))
        );
        assert_eq!(
            tls_setting(&json!({"tls": {"ca_secret": ""}}))
                .unwrap_err()
                .field,
            "tls.ca_secret"
        );
        assert_eq!(tls_setting(&json!({"tls": true})).unwrap_err().field, "tls");
    }

    #[test]
    fn a_ca_must_hold_a_certificate_and_the_answer_never_quotes_it() {
        let not_pem = "secret-looking text";
        let answer = check_ca(not_pem).unwrap_err();
        assert!(!answer.contains(not_pem), "{answer}");
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(check_ca(broken).is_err());
    }

    #[test]
    fn the_protocol_follows_tls_and_login_and_the_password_is_scrubbed() {
        let login = Login {
            mechanism: "SCRAM-SHA-256".into(),
            username: "u".into(),
            password: "hunter2".into(),
        };
        let protocol = |tls, login| {
            client_config("h:1", tls, login)
                .get("security.protocol")
                .map(str::to_owned)
        };
        assert_eq!(protocol(None, None).as_deref(), Some("plaintext"));
        assert_eq!(
            protocol(Some(&Trust::SystemRoots), None).as_deref(),
            Some("ssl")
        );
        assert_eq!(
            protocol(None, Some(&login)).as_deref(),
            Some("sasl_plaintext")
        );
        let ca = Trust::Ca("pem".into());
        assert_eq!(
            protocol(Some(&ca), Some(&login)).as_deref(),
            Some("sasl_ssl")
        );
        assert!(!format!("{login:?} {ca:?}").contains("hunter2"));
        assert!(!format!("{ca:?}").contains("pem"));
        let context = Context::new(Some(&login));
        assert_eq!(context.scrub("pw hunter2 here"), "pw [redacted] here");
    }
}
