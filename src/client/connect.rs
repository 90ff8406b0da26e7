//! Where the registry is, which token goes with every call, and the connected [`Client`].
//!
//! The server address, first found: `--server`, `DSREG_SERVER`, then `<data-dir>/grpc.addr`
//! (written by a local `dsreg serve` at start-up). An `https://` server is reached over TLS,
//! verified against the system's root certificates, or only against `--ca-file`
//! (`DSREG_CA_FILE`) when given; `--client-cert`/`--client-key` (`DSREG_CLIENT_CERT`,
//! `DSREG_CLIENT_KEY`) present a client certificate to a server that asks for one. Those
//! options with an `http://` server are refused rather than ignored (the calls would be
//! plaintext). The token, first found: `--token-file`,
//! `DSREG_TOKEN`, `DSREG_TOKEN_FILE`, then `<data-dir>/auth/admin.token`, the local
//! registry's admin token, sent only to the address in `<data-dir>/grpc.addr` so it never
//! leaves for another server. A token is never taken from argv (it would show in `ps` and
//! shell history). With no token, calls carry no `authorization` header.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use super::error::CallError;
use super::output::{Output, Printer};
use crate::api::grpc::pb;
use crate::secrets::SecretString;

/// Environment variable naming the server (`http://127.0.0.1:50051`).
pub const SERVER_ENV: &str = "DSREG_SERVER";
/// Environment variable naming the CA certificates (PEM) to verify an `https://` server with.
pub const CA_FILE_ENV: &str = "DSREG_CA_FILE";
/// Environment variable naming the client certificate (PEM) for mutual TLS.
pub const CLIENT_CERT_ENV: &str = "DSREG_CLIENT_CERT";
/// Environment variable naming the client certificate's private key (PEM).
pub const CLIENT_KEY_ENV: &str = "DSREG_CLIENT_KEY";
/// Environment variable holding the bearer token itself.
pub const TOKEN_ENV: &str = "DSREG_TOKEN";
/// Environment variable naming a file that holds the bearer token.
pub const TOKEN_FILE_ENV: &str = "DSREG_TOKEN_FILE";
/// The file in the data folder where `dsreg serve` writes its gRPC URL.
pub const ADDR_FILE: &str = "grpc.addr";
/// The file in the data folder holding the local registry's admin token.
pub const ADMIN_TOKEN_FILE: &str = "auth/admin.token";
/// How long a call may take unless a command says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than its deadline the client waits for the server's own answer to a call
/// (the server reports the state it reached when the deadline ends).
const DEADLINE_SLACK: Duration = Duration::from_secs(5);

/// Connection and output flags shared by every client command; accepted before or after the
/// subcommand (`dsreg datasource --server URL list` and `dsreg datasource list --server URL`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The registry's gRPC URL, `http://host:port` or `https://host:port` (TLS) [env:
    /// DSREG_SERVER] (default: the address a local `dsreg serve` wrote to
    /// <data-dir>/grpc.addr).
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,

    /// CA certificates (PEM) an `https://` server's certificate must chain to, instead of the
    /// system's root certificates [env: DSREG_CA_FILE].
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// A client certificate (PEM) for a server that requires one (mutual TLS), with
    /// `--client-key` [env: DSREG_CLIENT_CERT].
    #[arg(long, global = true, value_name = "PATH")]
    pub client_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM) [env: DSREG_CLIENT_KEY].
    #[arg(long, global = true, value_name = "PATH")]
    pub client_key: Option<PathBuf>,

    /// A file holding the bearer token [env: DSREG_TOKEN_FILE]. Tokens are never taken on the
    /// command line: use this, or DSREG_TOKEN. Default: the local registry's
    /// <data-dir>/auth/admin.token, when talking to the local registry.
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// The local registry's folder, where `dsreg serve` writes its address and admin token.
    #[arg(
        long,
        global = true,
        env = "DSREG_DATA_DIR",
        default_value = ".dsreg",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// Output: `table` for people, `json` for scripts (one JSON document per line).
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ClientArgs {
    /// A printer for the chosen output.
    pub fn printer(&self) -> Printer {
        Printer::new(self.output)
    }

    /// Resolves the server and token from the flags and the process environment and connects.
    ///
    /// # Errors
    /// No server found, an unreadable token file, or the server cannot be reached.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let target = resolve(self, |name| std::env::var(name).ok())?;
        Client::connect(&target).await
    }
}

/// Where a setting came from, for messages (`--server`, `DSREG_SERVER`, a file's path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag.
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// A file.
    File(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag(name) | Origin::Env(name) => f.write_str(name),
            Origin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A resolved server and token.
#[derive(Debug)]
pub struct Target {
    /// The server's URL, `http://host:port` or `https://host:port`.
    pub url: String,
    /// Where the URL came from.
    pub url_from: Origin,
    /// How to reach an `https://` server; `None` for `http://`.
    pub tls: Option<ClientTls>,
    /// The bearer token, if any (redacted in `Debug`).
    pub token: Option<SecretString>,
    /// Where the token came from.
    pub token_from: Option<Origin>,
}

/// Resolves the server and token of `args`, reading environment variables through `env`
/// (empty values count as unset); see the module doc for the order.
///
/// # Errors
/// No server anywhere, a malformed address, or a token file that cannot be read or is empty.
pub fn resolve(args: &ClientArgs, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Target> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let addr_file = args.data_dir.join(ADDR_FILE);
    let local = read_optional(&addr_file)?;
    let (url, url_from) = if let Some(server) = &args.server {
        (normalize_url(server)?, Origin::Flag("--server"))
    } else if let Some(server) = env(SERVER_ENV) {
        (
            normalize_url(&server).context(SERVER_ENV)?,
            Origin::Env(SERVER_ENV),
        )
    } else if let Some(server) = &local {
        (
            normalize_url(server).with_context(|| addr_file.display().to_string())?,
            Origin::File(addr_file.clone()),
        )
    } else {
        bail!(
            "no server: pass --server URL or set {SERVER_ENV} (e.g. http://127.0.0.1:50051), \
             or start `dsreg serve` with this data folder ({}), which writes {}",
            args.data_dir.display(),
            addr_file.display()
        );
    };
    let tls = client_tls(args, &env, &url, &url_from)?;
    let local_url = local.as_deref().and_then(|s| normalize_url(s).ok());
    let (token, token_from) = if let Some(path) = &args.token_file {
        (Some(read_token(path)?), Some(Origin::Flag("--token-file")))
    } else if let Some(token) = env(TOKEN_ENV) {
        let token = SecretString::new(token.trim().to_owned())
            .map_err(|e| anyhow::anyhow!("{TOKEN_ENV}: {e}"))?;
        (Some(token), Some(Origin::Env(TOKEN_ENV)))
    } else if let Some(path) = env(TOKEN_FILE_ENV) {
        (
            Some(read_token(Path::new(&path))?),
            Some(Origin::Env(TOKEN_FILE_ENV)),
        )
    } else if local_url.as_deref() == Some(url.as_str())
        && args.data_dir.join(ADMIN_TOKEN_FILE).exists()
    {
        let path = args.data_dir.join(ADMIN_TOKEN_FILE);
        (Some(read_token(&path)?), Some(Origin::File(path)))
    } else {
        (None, None)
    };
    Ok(Target {
        url,
        url_from,
        tls,
        token,
        token_from,
    })
}

/// The TLS files of a client: where the roots come from and the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates (PEM) to trust instead of the system's roots, and where the path came
    /// from.
    pub ca_file: Option<(PathBuf, Origin)>,
    /// The client certificate and key (PEM) for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The TLS settings for `url`: flags first, then the environment. `None` for `http://`,
/// where any TLS option is refused (it would be silently unused).
fn client_tls(
    args: &ClientArgs,
    env: &impl Fn(&str) -> Option<String>,
    url: &str,
    url_from: &Origin,
) -> anyhow::Result<Option<ClientTls>> {
    let pick = |flag: &Option<PathBuf>, name: &'static str, var: &'static str| {
        flag.clone()
            .map(|path| (path, Origin::Flag(name)))
            .or_else(|| env(var).map(|path| (PathBuf::from(path), Origin::Env(var))))
    };
    let ca_file = pick(&args.ca_file, "--ca-file", CA_FILE_ENV);
    let cert = pick(&args.client_cert, "--client-cert", CLIENT_CERT_ENV);
    let key = pick(&args.client_key, "--client-key", CLIENT_KEY_ENV);
    if url.starts_with("http://") {
        if let Some((_, origin)) = [&ca_file, &cert, &key].into_iter().flatten().next() {
            bail!(
                "{origin} is set but the server {url} (from {url_from}) is plaintext: use \
                 https://host:port for a TLS server, or unset {origin}"
            );
        }
        return Ok(None);
    }
    let identity = match (cert, key) {
        (Some((cert, _)), Some((key, _))) => Some((cert, key)),
        (None, None) => None,
        (Some((_, origin)), None) => bail!("{origin} needs --client-key ({CLIENT_KEY_ENV})"),
        (None, Some((_, origin))) => bail!("{origin} needs --client-cert ({CLIENT_CERT_ENV})"),
    };
    Ok(Some(ClientTls { ca_file, identity }))
}

impl ClientTls {
    /// The tonic configuration: the roots and the client certificate read from their files.
    ///
    /// # Errors
    /// A file that cannot be read (named with its option; the contents are never shown).
    fn config(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_file {
            Some((path, origin)) => config.ca_certificate(Certificate::from_pem(read(
                path,
                &format!("CA file ({origin})"),
            )?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            let cert = read(cert, "client certificate")?;
            let key = Zeroizing::new(read(key, "client key")?);
            config = config.identity(Identity::from_pem(cert, &*key));
        }
        Ok(config)
    }
}

/// `http://host:port` or `https://host:port` from what a person typed: `host:port` gets
/// `http://`, a trailing `/` is dropped; other schemes are refused.
///
/// # Errors
/// An empty or otherwise unusable address.
pub fn normalize_url(raw: &str) -> anyhow::Result<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        bail!("the server address is empty");
    }
    let url = match raw.split_once("://") {
        Some(("http" | "https", _)) => raw.to_owned(),
        Some((scheme, _)) => bail!(
            "{raw}: unsupported scheme {scheme:?}; use http://host:port, or https://host:port \
             for TLS"
        ),
        None => format!("http://{raw}"),
    };
    let url = url.trim_end_matches('/').to_owned();
    Endpoint::from_shared(url.clone()).with_context(|| format!("{raw} is not a server address"))?;
    Ok(url)
}

/// The trimmed contents of `path`, or `None` when it does not exist.
fn read_optional(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    }
}

fn read_token(path: &Path) -> anyhow::Result<SecretString> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?,
    );
    let token = text.trim();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    SecretString::new(token.to_owned()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Adds `authorization: Bearer <token>` to every call when there is a token, and nothing when
/// there is none. The value is marked sensitive (kept out of HTTP/2 header compression
/// tables) and never printed.
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// The header for `token`.
    ///
    /// # Errors
    /// The token holds characters a header cannot carry (the message does not show it).
    pub fn new(token: Option<&SecretString>) -> anyhow::Result<Self> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        let header = Zeroizing::new(format!("Bearer {}", token.expose()));
        let mut value = MetadataValue::try_from(header.as_str()).map_err(|_| {
            anyhow::anyhow!("the token holds characters an authorization header cannot carry")
        })?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Whether a token is sent.
    pub fn has_token(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Auth")
            .field(&self.0.as_ref().map(|_| "Bearer [redacted]"))
            .finish()
    }
}

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The transport every service client uses: the channel with the [`Auth`] interceptor.
pub type Service = InterceptedService<Channel, Auth>;

/// A connection to a registry, handing out service clients that send the token.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    channel: Channel,
    auth: Auth,
    /// The server's URL.
    pub url: String,
    /// Where the URL came from.
    pub url_from: Origin,
    timeout: Duration,
}

impl Client {
    /// Connects to `target`.
    ///
    /// # Errors
    /// The server cannot be reached (the message names the address and where it came from).
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        let auth = Auth::new(target.token.as_ref())?;
        let mut endpoint = Endpoint::from_shared(target.url.clone())?;
        if let Some(tls) = &target.tls {
            endpoint = endpoint
                .tls_config(tls.config()?)
                .context("the TLS settings")?;
        }
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Watches idle for long stretches; pings notice a dead connection so the watch
            // reconnects instead of waiting forever.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.with_context(|| {
            format!(
                "cannot reach dsreg at {} (from {})",
                target.url, target.url_from
            )
        })?;
        Ok(Self {
            endpoint,
            channel,
            auth,
            url: target.url.clone(),
            url_from: target.url_from.clone(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Opens a fresh connection (after the server went away).
    ///
    /// # Errors
    /// The server cannot be reached.
    pub async fn reconnect(&mut self) -> Result<(), tonic::transport::Error> {
        self.channel = self.endpoint.connect().await?;
        Ok(())
    }

    /// The same connection with another deadline for unary calls.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The deadline of unary calls.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether calls carry a token.
    pub fn has_token(&self) -> bool {
        self.auth.has_token()
    }

    /// `message` as a unary request carrying the deadline (the `grpc-timeout` header).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Awaits a unary call: its message, or a [`CallError`] (`DEADLINE_EXCEEDED` when the
    /// server does not answer a little after the deadline).
    ///
    /// # Errors
    /// [`CallError`].
    pub async fn unary<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout + DEADLINE_SLACK, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CallError::from(status).into()),
            Err(_) => Err(CallError {
                code: tonic::Code::DeadlineExceeded,
                message: format!(
                    "no answer from {} within {:?}",
                    self.url,
                    self.timeout + DEADLINE_SLACK
                ),
                violations: Vec::new(),
            }
            .into()),
        }
    }

    /// The `Datasources` service.
    pub fn datasources(&self) -> pb::datasources_client::DatasourcesClient<Service> {
        pb::datasources_client::DatasourcesClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// The `Secrets` service.
    pub fn secrets(&self) -> pb::secrets_client::SecretsClient<Service> {
        pb::secrets_client::SecretsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The `Events` service.
    pub fn events(&self) -> pb::events_client::EventsClient<Service> {
        pb::events_client::EventsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The `Lifecycle` service.
    pub fn lifecycle(&self) -> pb::lifecycle_client::LifecycleClient<Service> {
        pb::lifecycle_client::LifecycleClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// The `Harness` service.
    pub fn harness(&self) -> pb::harness_client::HarnessClient<Service> {
        pb::harness_client::HarnessClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The `Catalog` service.
    pub fn catalog(&self) -> pb::catalog_client::CatalogClient<Service> {
        pb::catalog_client::CatalogClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The `DeadLetters` service.
    pub fn dead_letters(&self) -> pb::dead_letters_client::DeadLettersClient<Service> {
        pb::dead_letters_client::DeadLettersClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// The `Registry` service.
    pub fn registry(&self) -> pb::registry_client::RegistryClient<Service> {
        pb::registry_client::RegistryClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn args(dir: &Path) -> ClientArgs {
        ClientArgs {
            server: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            token_file: None,
            data_dir: dir.to_owned(),
            output: Output::Table,
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    /// A data folder as `dsreg serve` leaves it: its address and admin token.
    fn data_dir(addr: &str, token: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ADDR_FILE), format!("{addr}\n")).unwrap();
        if let Some(token) = token {
            std::fs::create_dir_all(dir.path().join("auth")).unwrap();
            std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), format!("{token}\n")).unwrap();
        }
        dir
    }

    fn token(target: &Target) -> Option<&str> {
        target.token.as_ref().map(SecretString::expose)
    }

    #[test]
    fn the_flag_beats_the_environment_which_beats_the_data_folder() {
        let dir = data_dir("http://127.0.0.1:50051", None);
        let mut a = args(dir.path());

        let t = resolve(&a, env(&[])).unwrap();
        assert_eq!(t.url, "http://127.0.0.1:50051");
        assert_eq!(t.url_from, Origin::File(dir.path().join(ADDR_FILE)));

        let t = resolve(&a, env(&[(SERVER_ENV, "http://env:1")])).unwrap();
        assert_eq!(
            (t.url.as_str(), &t.url_from),
            ("http://env:1", &Origin::Env(SERVER_ENV))
        );

        a.server = Some("flag:2".into());
        let t = resolve(&a, env(&[(SERVER_ENV, "http://env:1")])).unwrap();
        assert_eq!(
            (t.url.as_str(), &t.url_from),
            ("http://flag:2", &Origin::Flag("--server"))
        );
    }

    #[test]
    fn the_token_file_flag_beats_the_token_variables_which_beat_the_admin_token() {
        let dir = data_dir("http://127.0.0.1:50051", Some("admin-token"));
        let files = tempfile::tempdir().unwrap();
        let flag_file = files.path().join("flag.token");
        std::fs::write(&flag_file, "flag-token\n").unwrap();
        let env_file = files.path().join("env.token");
        std::fs::write(&env_file, "env-file-token").unwrap();
        let env_file = env_file.to_str().unwrap();
        let mut a = args(dir.path());

        let t = resolve(&a, env(&[])).unwrap();
        assert_eq!(token(&t), Some("admin-token"));
        assert_eq!(
            t.token_from,
            Some(Origin::File(dir.path().join(ADMIN_TOKEN_FILE)))
        );

        let t = resolve(&a, env(&[(TOKEN_FILE_ENV, env_file)])).unwrap();
        assert_eq!(token(&t), Some("env-file-token"));

        let t = resolve(
            &a,
            env(&[(TOKEN_FILE_ENV, env_file), (TOKEN_ENV, "env-token")]),
        )
        .unwrap();
        assert_eq!(token(&t), Some("env-token"));
        assert_eq!(t.token_from, Some(Origin::Env(TOKEN_ENV)));

        a.token_file = Some(flag_file);
        let t = resolve(&a, env(&[(TOKEN_ENV, "env-token")])).unwrap();
        assert_eq!(token(&t), Some("flag-token"));
        assert_eq!(t.token_from, Some(Origin::Flag("--token-file")));
    }

    #[test]
    fn the_admin_token_goes_only_to_the_local_registry() {
        let dir = data_dir("http://127.0.0.1:50051", Some("admin-token"));
        let mut a = args(dir.path());
        a.server = Some("127.0.0.1:50051/".into());
        assert_eq!(token(&resolve(&a, env(&[])).unwrap()), Some("admin-token"));

        a.server = Some("http://registry.example:50051".into());
        let t = resolve(&a, env(&[])).unwrap();
        assert!(t.token.is_none() && t.token_from.is_none());
        let t = resolve(&args(dir.path()), env(&[(SERVER_ENV, "http://other:1")])).unwrap();
        assert!(t.token.is_none());
    }

    #[test]
    fn no_token_anywhere_means_no_authorization_header() {
        let dir = data_dir("http://127.0.0.1:50051", None);
        let t = resolve(&args(dir.path()), env(&[(TOKEN_ENV, "  ")])).unwrap();
        assert!(t.token.is_none());
        let mut auth = Auth::new(t.token.as_ref()).unwrap();
        let request = auth.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn a_token_is_sent_as_a_sensitive_bearer_header_and_never_debug_printed() {
        let token = SecretString::new("s3cret-token".into()).unwrap();
        let mut auth = Auth::new(Some(&token)).unwrap();
        let request = auth.call(tonic::Request::new(())).unwrap();
        let header = request.metadata().get("authorization").unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer s3cret-token");
        assert!(header.is_sensitive());
        assert!(!format!("{auth:?}").contains("s3cret"));
        let bad = SecretString::new("bad\ntoken".into()).unwrap();
        let error = Auth::new(Some(&bad)).unwrap_err().to_string();
        assert!(!error.contains("bad"), "{error}");
    }

    #[test]
    fn no_server_anywhere_says_where_to_look() {
        let dir = tempfile::tempdir().unwrap();
        let error = resolve(&args(dir.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--server") && error.contains(SERVER_ENV),
            "{error}"
        );
        assert!(error.contains(ADDR_FILE), "{error}");
    }

    #[test]
    fn addresses_are_normalized_and_other_schemes_refused() {
        assert_eq!(
            normalize_url("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(normalize_url(" http://h:1/ ").unwrap(), "http://h:1");
        assert_eq!(normalize_url("https://h:1/").unwrap(), "https://h:1");
        assert!(normalize_url("ftp://h:1").is_err());
        assert!(normalize_url("").is_err());
    }

    #[test]
    fn tls_options_follow_flags_then_environment_and_only_apply_to_https() {
        let dir = data_dir("https://127.0.0.1:50051", Some("admin-token"));
        let mut a = args(dir.path());
        let t = resolve(&a, env(&[])).unwrap();
        assert_eq!(
            t.tls,
            Some(ClientTls {
                ca_file: None,
                identity: None
            })
        );
        assert_eq!(
            token(&t),
            Some("admin-token"),
            "the local registry over TLS"
        );

        let t = resolve(
            &a,
            env(&[
                (CA_FILE_ENV, "/env/ca.pem"),
                (CLIENT_CERT_ENV, "/env/c.pem"),
                (CLIENT_KEY_ENV, "/env/k.pem"),
            ]),
        )
        .unwrap();
        let tls = t.tls.unwrap();
        assert_eq!(
            tls.ca_file,
            Some(("/env/ca.pem".into(), Origin::Env(CA_FILE_ENV)))
        );
        assert_eq!(
            tls.identity,
            Some(("/env/c.pem".into(), "/env/k.pem".into()))
        );

        a.ca_file = Some("/flag/ca.pem".into());
        let t = resolve(&a, env(&[(CA_FILE_ENV, "/env/ca.pem")])).unwrap();
        assert_eq!(
            t.tls.unwrap().ca_file,
            Some(("/flag/ca.pem".into(), Origin::Flag("--ca-file")))
        );

        a.client_cert = Some("/flag/c.pem".into());
        let error = resolve(&a, env(&[])).unwrap_err().to_string();
        assert!(error.contains("--client-key"), "{error}");

        let plain = data_dir("http://127.0.0.1:50051", None);
        let error = resolve(&args(plain.path()), env(&[(CA_FILE_ENV, "/env/ca.pem")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(CA_FILE_ENV) && error.contains("plaintext"),
            "{error}"
        );
        assert_eq!(resolve(&args(plain.path()), env(&[])).unwrap().tls, None);
    }

    #[test]
    fn an_empty_token_file_is_an_error() {
        let dir = data_dir("http://127.0.0.1:50051", None);
        let file = dir.path().join("empty.token");
        std::fs::write(&file, "\n").unwrap();
        let mut a = args(dir.path());
        a.token_file = Some(file);
        assert!(
            resolve(&a, env(&[]))
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
