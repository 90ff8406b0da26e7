//! TLS to Postgres with libpq's conventions, for every connection dsreg makes (the pool, the
//! listener, migrations, the CLI subcommands, tests and benches).
//!
//! `sslmode` (`disable | prefer | require | verify-ca | verify-full`, default `prefer`),
//! `sslrootcert` (a PEM file, or `system` for the operating system's roots), `sslcert` and
//! `sslkey` (a client certificate) come from the connection string (URL query or
//! `key=value` form) or, when the string does not set them, from `PGSSLMODE`,
//! `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY`, as libpq reads them. tokio-postgres's own
//! parser refuses `sslrootcert`, `sslcert`, `sslkey` and the `verify-*` modes, so
//! [`Target::parse`] strips those parameters and hands the rest to tokio-postgres.
//!
//! | mode | encrypts | checks the chain | checks the host name |
//! | --- | --- | --- | --- |
//! | `disable` | no | | |
//! | `prefer` | when the server offers it | no | no |
//! | `require` | yes | only when `sslrootcert` is given (then as `verify-ca`) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! The connector is written here on `tokio-rustls` (already in the tree for the gRPC and HTTP
//! clients, with the `ring` provider) rather than taken from `tokio-postgres-rustls`: that
//! crate only adapts a `rustls::ClientConfig`, while the part that carries libpq's semantics
//! (a verifier that checks the chain but not the name for `verify-ca`, none for `require`,
//! client certificates, system roots) has to be written either way, and the adapter is a few
//! dozen lines without another dependency tree. Channel binding is not offered (SCRAM runs
//! without `-PLUS`, which is what libpq's default `channel_binding=prefer` accepts).
//!
//! Certificates are read once per distinct set of files and cached; [`Target::tls`] reads
//! them on a blocking thread.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use super::connection::{ConnectOptions, URL_KEYS};

/// A connection string that cannot be used, or certificate material that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The connection string is malformed.
    #[error("database URL: {0}")]
    Url(String),
    /// A certificate or key file cannot be read or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which parameter named the file (`sslrootcert`, `sslcert`, `sslkey`).
        what: &'static str,
        /// The file.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The certificates load but rustls refuses them together.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, unverified.
    #[default]
    Prefer,
    /// TLS always; the certificate is checked only when a root certificate is given.
    Require,
    /// TLS, the chain checked against the root certificates, not the host name.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, TlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plain first; encrypting when offered is the closer match
            // tokio-postgres can do.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(TlsError::Url(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// Where the root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RootCert {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's trust store.
    System,
}

/// The TLS part of a connection string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct TlsOptions {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_cert: Option<RootCert>,
    /// `sslcert`.
    pub cert: Option<PathBuf>,
    /// `sslkey`.
    pub key: Option<PathBuf>,
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

impl TlsOptions {
    fn verify(&self) -> Verify {
        match self.mode {
            SslMode::Disable | SslMode::Prefer => Verify::Nothing,
            SslMode::Require if self.root_cert.is_some() => Verify::Chain,
            SslMode::Require => Verify::Nothing,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::VerifyFull => Verify::ChainAndName,
        }
    }

    fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// Reads the files and builds the rustls configuration (blocking I/O).
    fn load(&self) -> Result<ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let verify = self.verify();
        let builder = if verify == Verify::Nothing {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        } else {
            let roots = Arc::new(self.roots()?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            if verify == Verify::Chain {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            } else {
                builder.with_webpki_verifier(webpki)
            }
        };
        match (&self.cert, &self.key) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| file_error("sslcert", cert, &e))?;
                if chain.is_empty() {
                    return Err(file_error("sslcert", cert, &"no certificate in the file"));
                }
                let key_der =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("sslkey", key, &e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| TlsError::Config(format!("client certificate: {e}")))
            }
            (Some(_), None) => Err(TlsError::Config("sslcert is set without sslkey".to_owned())),
            (None, Some(_)) => Err(TlsError::Config("sslkey is set without sslcert".to_owned())),
        }
    }

    /// The root certificates: `sslrootcert`, else `~/.postgresql/root.crt` when it exists
    /// (libpq's default), else the system's.
    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let file = match &self.root_cert {
            Some(RootCert::File(path)) => Some(path.clone()),
            Some(RootCert::System) => None,
            None => std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".postgresql/root.crt"))
                .filter(|path| path.is_file()),
        };
        let mut store = RootCertStore::empty();
        match file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(&path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| file_error("sslrootcert", &path, &e))?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(file_error("sslrootcert", &path, &"no usable certificate"));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(TlsError::Config(
                        "sslrootcert=system: the system has no root certificates".to_owned(),
                    ));
                }
            }
        }
        Ok(store)
    }
}

fn file_error(
    what: &'static str,
    path: &std::path::Path,
    reason: &dyn std::fmt::Display,
) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// A connection string split into what tokio-postgres understands, the TLS options and the
/// connection's bounds.
#[derive(Debug, Clone)]
pub struct Target {
    /// Everything but the TLS files, with `ssl_mode` set from [`TlsOptions::mode`] and the
    /// bounds of [`Target::connect`] applied.
    pub config: tokio_postgres::Config,
    /// The TLS options.
    pub tls: TlsOptions,
    /// The bounds: the caller's, with what the connection string sets
    /// ([`super::connection`]).
    pub connect: ConnectOptions,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl Target {
    /// Parses `url` (a `postgres://` URL or libpq's `key=value` form), with the `PG*`
    /// variables of the process as defaults for what it does not set.
    ///
    /// # Errors
    /// [`TlsError::Url`] for a malformed string or an unknown `sslmode`.
    pub fn parse(url: &str) -> Result<Self, TlsError> {
        Self::parse_with(url, &ConnectOptions::default())
    }

    /// [`Target::parse`] with `bounds` for what the connection string leaves unset.
    ///
    /// # Errors
    /// As [`Target::parse`], and a bound in the string that is not a number.
    pub fn parse_with(url: &str, bounds: &ConnectOptions) -> Result<Self, TlsError> {
        Self::parse_with_env(url, bounds, |name| std::env::var(name).ok())
    }

    /// [`Target::parse_with`] with the variables from `env`.
    ///
    /// # Errors
    /// As [`Target::parse_with`].
    pub fn parse_with_env(
        url: &str,
        bounds: &ConnectOptions,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TlsError> {
        let (rest, mut found) = split_params(url)?;
        for (key, var) in
            TLS_KEYS
                .iter()
                .zip(["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"])
        {
            if !found.contains_key(*key)
                && let Some(value) = env(var).filter(|v| !v.is_empty())
            {
                found.insert((*key).to_owned(), value);
            }
        }
        let tls = TlsOptions {
            mode: found
                .get("sslmode")
                .map(|m| SslMode::parse(m))
                .transpose()?
                .unwrap_or_default(),
            root_cert: found.get("sslrootcert").map(|v| match v.as_str() {
                "system" => RootCert::System,
                path => RootCert::File(PathBuf::from(path)),
            }),
            cert: found.get("sslcert").map(PathBuf::from),
            key: found.get("sslkey").map(PathBuf::from),
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| TlsError::Url(e.to_string()))?;
        config.ssl_mode(tls.tokio_mode());
        let connect = bounds.with_url(&found)?;
        connect.apply(&mut config);
        Ok(Target {
            config,
            tls,
            connect,
        })
    }

    /// The client-side deadline for an answer to a statement ([`super::watchdog`]): the
    /// `statement_timeout` these connections run with (the URL's own, when its `options` set
    /// one) plus a margin; `None` without a statement timeout, or one that cannot be read.
    pub fn statement_deadline(&self) -> Option<std::time::Duration> {
        let timeout = match self.config.get_options() {
            Some(options) => super::connection::statement_timeout_in(options),
            None => self.connect.statement_timeout,
        };
        super::watchdog::deadline_for(timeout)
    }

    /// How long one connect may take in all (TCP, TLS, authentication, startup): the
    /// connect timeout per host named; `None` when unbounded.
    pub fn connect_bound(&self) -> Option<std::time::Duration> {
        let hosts = u32::try_from(self.config.get_hosts().len().max(1)).unwrap_or(u32::MAX);
        self.connect
            .connect_timeout
            .map(|timeout| timeout.saturating_mul(hosts))
    }

    /// The TLS connector for this target, its certificates read on a blocking thread the
    /// first time these options are used and cached after.
    ///
    /// # Errors
    /// A certificate or key that cannot be loaded.
    pub async fn tls(&self) -> Result<MakeRustls, TlsError> {
        if let Some(cached) = cached(&self.tls) {
            return Ok(cached);
        }
        let options = self.tls.clone();
        tokio::task::spawn_blocking(move || load_cached(&options))
            .await
            .map_err(|e| TlsError::Config(format!("loading certificates: {e}")))?
    }

    /// [`Target::tls`] for callers outside async code: on a multi-threaded runtime the
    /// worker hands its other tasks away while the files are read.
    ///
    /// # Errors
    /// As [`Target::tls`].
    pub fn tls_blocking(&self) -> Result<MakeRustls, TlsError> {
        if let Some(cached) = cached(&self.tls) {
            return Ok(cached);
        }
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| load_cached(&self.tls))
            }
            _ => load_cached(&self.tls),
        }
    }

    /// The servers this target names, `host:port` (or the socket directory), for messages.
    pub fn describe(&self) -> String {
        describe(&self.config)
    }
}

/// The servers `config` names, `host:port` each, for messages; never the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port(i)),
        })
        .collect();
    let hosts = if hosts.is_empty() {
        format!("localhost:{}", port(0))
    } else {
        hosts.join(",")
    };
    let user = config.get_user().unwrap_or("(default user)");
    let dbname = config.get_dbname().unwrap_or(user);
    format!("{hosts} (user {user}, database {dbname})")
}

type Cache = Mutex<HashMap<TlsOptions, MakeRustls>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

fn cached(options: &TlsOptions) -> Option<MakeRustls> {
    cache()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(options)
        .cloned()
}

fn load_cached(options: &TlsOptions) -> Result<MakeRustls, TlsError> {
    if let Some(hit) = cached(options) {
        return Ok(hit);
    }
    let made = MakeRustls {
        config: Arc::new(options.load()?),
    };
    cache()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(options.clone(), made.clone());
    Ok(made)
}

/// Whether dsreg reads this connection string parameter itself (TLS and the bounds).
fn taken(key: &str) -> bool {
    TLS_KEYS.contains(&key) || URL_KEYS.contains(&key)
}

/// Removes the TLS parameters and the bounds from a connection string: the rest (for
/// tokio-postgres) and the removed `key → value`s.
fn split_params(url: &str) -> Result<(String, HashMap<String, String>), TlsError> {
    let mut found = HashMap::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), found));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key_plain = crate::encoding::percent_decode_strict(key).ok_or_else(|| {
                TlsError::Url(format!(
                    "bad percent escape or not UTF-8 in the parameter name {key:?}"
                ))
            })?;
            if taken(&key_plain) {
                // The value is not echoed: it may be a credential.
                let value = crate::encoding::percent_decode_strict(value).ok_or_else(|| {
                    TlsError::Url(format!(
                        "bad percent escape or not UTF-8 in the value of {key_plain}"
                    ))
                })?;
                found.insert(key_plain, value);
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, found));
    }
    let mut kept = Vec::new();
    for (key, value) in key_values(url)? {
        if taken(&key) {
            found.insert(key, value);
        } else {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{quoted}'"));
        }
    }
    Ok((kept.join(" "), found))
}

/// libpq's `key = value` form: values bare or single-quoted with backslash escapes.
fn key_values(s: &str) -> Result<Vec<(String, String)>, TlsError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(TlsError::Url(format!("expected '=' after {key:?}")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(TlsError::Url("unterminated quoted value".into())),
                    },
                    Some(c) => value.push(c),
                    None => return Err(TlsError::Url("unterminated quoted value".into())),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Accepts any certificate (`prefer`, `require` without a root): encryption without
/// authentication, as libpq. The handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not compared.
/// webpki checks the name last, so a name mismatch means the chain already passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS connector maker over rustls.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{domain}: {e}")))?;
        Ok(RustlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One TLS handshake towards a named server.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// An encrypted stream to the server.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn url_tls_parameters_are_taken_out_and_the_rest_parsed() {
        let t = Target::parse_with_env(
            "postgres://u:p@db.example:6432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x&sslcert=/c.pem&sslkey=/k.pem",
            &ConnectOptions::default(),
            no_env,
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(t.tls.root_cert, Some(RootCert::File("/etc/ca.pem".into())));
        assert_eq!(t.tls.cert, Some("/c.pem".into()));
        assert_eq!(t.tls.key, Some("/k.pem".into()));
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(t.config.get_dbname(), Some("app"));
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn a_malformed_escape_in_a_parameter_is_refused_without_echoing_its_value() {
        for (url, named) in [
            ("postgres://h/app?sslkey=%+1-canary-k3y", "sslkey"),
            ("postgres://h/app?sslrootcert=%zzcanary-k3y", "sslrootcert"),
            ("postgres://h/app?sslmode=%ff%fecanary-k3y", "sslmode"),
        ] {
            let Err(error) = Target::parse_with_env(url, &ConnectOptions::default(), no_env) else {
                panic!("{url} is refused");
            };
            let error = error.to_string();
            assert!(error.contains(named), "{error}");
            assert!(!error.contains("canary-k3y"), "{error}");
        }
        let Err(error) = Target::parse_with_env(
            "postgres://h/app?ssl%+1mode=require",
            &ConnectOptions::default(),
            no_env,
        ) else {
            panic!("a malformed name is refused too");
        };
        let error = error.to_string();
        assert!(error.contains("ssl%+1mode"), "{error}");
    }

    #[test]
    fn key_value_form_with_quotes() {
        let t = Target::parse_with_env(
            r"host=db port=5433 user=u password='it\'s' dbname=app sslmode=verify-ca sslrootcert='/a b/ca.pem'",
            &ConnectOptions::default(),
            no_env,
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyCa);
        assert_eq!(t.tls.root_cert, Some(RootCert::File("/a b/ca.pem".into())));
        assert_eq!(t.config.get_password(), Some(&b"it's"[..]));
        assert_eq!(t.config.get_ports(), &[5433]);
    }

    #[test]
    fn environment_fills_what_the_string_leaves_out() {
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("require".to_owned()),
            "PGSSLROOTCERT" => Some("system".to_owned()),
            _ => None,
        };
        let t =
            Target::parse_with_env("postgres://db/app", &ConnectOptions::default(), env).unwrap();
        assert_eq!(t.tls.mode, SslMode::Require);
        assert_eq!(t.tls.root_cert, Some(RootCert::System));
        assert_eq!(t.tls.verify(), Verify::Chain);
        let t = Target::parse_with_env(
            "postgres://db/app?sslmode=disable",
            &ConnectOptions::default(),
            env,
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::Disable);
    }

    #[test]
    fn default_is_prefer_and_unknown_modes_are_refused() {
        let t = Target::parse_with_env("postgres://db/app", &ConnectOptions::default(), no_env)
            .unwrap();
        assert_eq!(t.tls.mode, SslMode::Prefer);
        assert_eq!(t.tls.verify(), Verify::Nothing);
        let err = Target::parse_with_env(
            "postgres://db/app?sslmode=verify-everything",
            &ConnectOptions::default(),
            no_env,
        )
        .unwrap_err();
        assert!(err.to_string().contains("verify-everything"), "{err}");
    }

    #[test]
    fn description_names_hosts_and_ports_never_the_password() {
        let t = Target::parse_with_env(
            "postgres://u:hunter2@a:1,b:2/app",
            &ConnectOptions::default(),
            no_env,
        )
        .unwrap();
        let d = t.describe();
        assert!(
            d.contains("a:1") && d.contains("b:2") && d.contains("database app"),
            "{d}"
        );
        assert!(!d.contains("hunter2"), "{d}");
    }

    #[test]
    fn bounds_in_the_string_win_in_libpq_units_in_both_forms() {
        for url in [
            "postgres://u@a:1,b:2/app?connect_timeout=3&tcp_user_timeout=2500&keepalives_count=7&options=-c%20statement_timeout%3D1s",
            "host=a,b port=1,2 user=u dbname=app connect_timeout=3 tcp_user_timeout=2500 keepalives_count=7 options='-c statement_timeout=1s'",
        ] {
            let t = Target::parse_with_env(url, &ConnectOptions::default(), no_env).unwrap();
            assert_eq!(
                t.config.get_tcp_user_timeout(),
                Some(&std::time::Duration::from_millis(2500)),
                "{url}"
            );
            assert_eq!(t.config.get_keepalives_retries(), Some(7), "{url}");
            assert_eq!(
                t.config.get_options(),
                Some("-c statement_timeout=1s"),
                "{url}"
            );
            // Each of the two hosts gets the connect timeout.
            assert_eq!(
                t.connect_bound(),
                Some(std::time::Duration::from_secs(6)),
                "{url}"
            );
        }
        let bad = Target::parse_with_env(
            "postgres://db/app?keepalives_idle=later",
            &ConnectOptions::default(),
            no_env,
        )
        .unwrap_err();
        assert!(bad.to_string().contains("keepalives_idle"), "{bad}");
    }

    proptest::proptest! {
        #[test]
        fn a_connect_timeout_reads_as_libpq_reads_it_in_both_forms(seconds in -5i64..100_000) {
            let expected = u64::try_from(seconds)
                .ok()
                .filter(|s| *s > 0)
                .map(|s| std::time::Duration::from_secs(s.max(2)));
            for url in [
                format!("postgres://u@db/app?connect_timeout={seconds}"),
                format!("host=db user=u dbname=app connect_timeout={seconds}"),
            ] {
                let t = Target::parse_with_env(&url, &ConnectOptions::default(), no_env).unwrap();
                proptest::prop_assert_eq!(t.connect.connect_timeout, expected);
                proptest::prop_assert_eq!(t.connect_bound(), expected);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn key_value_values_round_trip(value in "[ -~]{0,40}") {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            let parsed = key_values(&format!("sslrootcert='{quoted}' host=x")).unwrap();
            proptest::prop_assert_eq!(&parsed[0], &("sslrootcert".to_owned(), value.clone()));
            let t = Target::parse_with_env(&format!("host=x password='{quoted}' sslkey='{quoted}' sslcert=c"), &ConnectOptions::default(), no_env).unwrap();
            proptest::prop_assert_eq!(t.config.get_password(), Some(value.as_bytes()));
            proptest::prop_assert_eq!(t.tls.key, Some(PathBuf::from(&value)));
        }
    }
}
