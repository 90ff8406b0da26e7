//! The `http_poll` kind (pull): GET a URL on an interval and write the records found in the
//! response.
//!
//! Config: `url` (http or https), `interval_ms`, `headers` (an object of strings),
//! `bearer_secret` (the name of the datasource secret holding a bearer token), `record_path`
//! (a JSON pointer to the records: an array gives many, an object one), `timeout_ms`,
//! `max_retries` and `retry_base_ms` (5xx and connection errors are retried within a poll,
//! doubling from `retry_base_ms` up to a minute, with jitter), `max_body_bytes`, and `cursor` (`{"field", "param"}`: the highest
//! `field` seen is sent as the query parameter `param` on the next poll).
//!
//! Failures are told apart: connection errors and 5xx are transient (retried within the poll,
//! then the worker backs off); 429 and 503 with `Retry-After` (seconds or an HTTP-date) wait as
//! long as asked; 401, 403, 404, 410 and a certificate that does not verify are permanent
//! ([`Error::Refused`]: the worker tries again only after its long delay). Before every request
//! the run asks whether its lease still holds, so an instance woken past its lease sends none.
//!
//! `ETag`/`If-None-Match` are honoured (a 304 is progress, not data). The ETag and the cursor
//! are stored in `datasource_state.source_cursor` after the records they cover are committed,
//! so a restart resumes where the last poll ended and writes nothing twice.

use std::sync::LazyLock;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::telemetry::redact::{redact_url, redact_urls};

use super::{
    BoxFuture, ConfigError, Connector, Error, KindInfo, LeaseCheck, Mode, RunContext, VERSION_KEYS,
    integer_in,
};

/// The longest a `Retry-After` is waited out within one poll; a longer one ends the run with
/// [`Error::Throttled`], so the state shows it, and the worker waits the rest.
const MAX_WAIT_IN_POLL: Duration = Duration::from_secs(60);

static INFO: LazyLock<KindInfo> = LazyLock::new(|| KindInfo {
    name: "http_poll",
    version: "1.0.0",
    summary: "GET a URL on an interval; ETag and cursor aware",
    config_schema: json!({
        "type": "object",
        "required": ["url"],
        "properties": {
            "url": { "type": "string", "pattern": "^https?://" },
            "interval_ms": { "type": "integer", "minimum": 100, "maximum": 86_400_000, "default": 60_000 },
            "headers": { "type": "object", "additionalProperties": { "type": "string" } },
            "bearer_secret": { "type": "string" },
            "record_path": { "type": "string", "default": "" },
            "timeout_ms": { "type": "integer", "minimum": 100, "maximum": 300_000, "default": 10_000 },
            "max_retries": { "type": "integer", "minimum": 0, "maximum": 20, "default": 3 },
            "retry_base_ms": { "type": "integer", "minimum": 1, "maximum": 60_000, "default": 200 },
            "max_body_bytes": { "type": "integer", "minimum": 1, "maximum": 104_857_600, "default": 10_485_760 },
            "cursor": {
                "type": "object",
                "required": ["field", "param"],
                "properties": { "field": { "type": "string" }, "param": { "type": "string" } }
            }
        }
    }),
    secrets: &[],
    mode: Mode::Pull,
    can_backfill: true,
});

/// The position an `http_poll` worker saves after the records of a poll are committed.
static POSITION: super::position::Format = super::position::Format {
    summary: "where the next poll resumes: the ETag of the last answer and the highest cursor \
              value seen",
    fields: &[
        super::position::Field {
            name: "etag",
            shape: super::position::Shape::HeaderText,
            meaning: "the ETag of the last answer, sent as If-None-Match on the next poll (a 304 \
                      answer writes nothing); missing: the next poll asks unconditionally",
        },
        super::position::Field {
            name: "cursor",
            shape: super::position::Shape::TextOrNumber,
            meaning: "the highest value of the config's cursor.field seen, sent as the query \
                      parameter cursor.param on the next poll; missing: sent on no poll",
        },
    ],
};

/// The `http_poll` connector.
#[derive(Debug, Default)]
pub struct HttpPoll;

#[derive(Debug, Clone)]
struct Settings {
    url: String,
    interval: Duration,
    headers: Vec<(String, String)>,
    bearer_secret: Option<String>,
    record_path: String,
    timeout: Duration,
    max_retries: u32,
    retry_base: Duration,
    max_body_bytes: usize,
    cursor: Option<(String, String)>,
}

fn millis(
    config: &Value,
    field: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    integer_in(config, field, default, min, max).map(Duration::from_millis)
}

fn string(config: &Value, field: &str) -> Result<Option<String>, ConfigError> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ConfigError::new(
            field,
            format!("must be a string, got {other}"),
        )),
    }
}

fn parse(config: &Value) -> Result<Settings, ConfigError> {
    let object = config
        .as_object()
        .ok_or_else(|| ConfigError::new("", "must be a JSON object"))?;
    const FIELDS: &[&str] = &[
        "url",
        "interval_ms",
        "headers",
        "bearer_secret",
        "record_path",
        "timeout_ms",
        "max_retries",
        "retry_base_ms",
        "max_body_bytes",
        "cursor",
    ];
    if let Some(unknown) = object
        .keys()
        .find(|k| !FIELDS.contains(&k.as_str()) && !VERSION_KEYS.contains(&k.as_str()))
    {
        return Err(ConfigError::new(
            unknown.clone(),
            "unknown field for kind http_poll",
        ));
    }
    let url = string(config, "url")?.ok_or_else(|| ConfigError::new("url", "is required"))?;
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| ConfigError::new("url", format!("is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::new("url", "must be http or https"));
    }
    let headers = match config.get("headers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let value = v
                    .as_str()
                    .ok_or_else(|| ConfigError::new(format!("headers.{k}"), "must be a string"))?;
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                    ConfigError::new(format!("headers.{k}"), "is not a valid header name")
                })?;
                reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                    ConfigError::new(format!("headers.{k}"), "is not a valid header value")
                })?;
                Ok((k.clone(), value.to_owned()))
            })
            .collect::<Result<_, ConfigError>>()?,
        Some(other) => {
            return Err(ConfigError::new(
                "headers",
                format!("must be an object, got {other}"),
            ));
        }
    };
    let record_path = string(config, "record_path")?.unwrap_or_default();
    if !record_path.is_empty() && !record_path.starts_with('/') {
        return Err(ConfigError::new(
            "record_path",
            "must be a JSON pointer (\"\" or starting with '/')",
        ));
    }
    let cursor = match config.get("cursor") {
        None | Some(Value::Null) => None,
        Some(c) => {
            let field = string(c, "field")
                .map_err(|e| ConfigError::new("cursor.field", e.reason))?
                .ok_or_else(|| ConfigError::new("cursor.field", "is required"))?;
            let param = string(c, "param")
                .map_err(|e| ConfigError::new("cursor.param", e.reason))?
                .ok_or_else(|| ConfigError::new("cursor.param", "is required"))?;
            Some((field, param))
        }
    };
    Ok(Settings {
        url,
        interval: millis(config, "interval_ms", 60_000, 100, 86_400_000)?,
        headers,
        bearer_secret: string(config, "bearer_secret")?,
        record_path,
        timeout: millis(config, "timeout_ms", 10_000, 100, 300_000)?,
        // At most 20 (checked), so the cast keeps the value.
        max_retries: integer_in(config, "max_retries", 3, 0, 20)? as u32,
        retry_base: millis(config, "retry_base_ms", 200, 1, 60_000)?,
        max_body_bytes: integer_in(config, "max_body_bytes", 10_485_760, 1, 104_857_600)? as usize,
        cursor,
    })
}

impl HttpPoll {
    /// The kind.
    pub fn new() -> Self {
        Self
    }
}

impl Connector for HttpPoll {
    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        parse(config).map(|_| ())
    }

    fn destinations(&self, config: &Value) -> Result<Vec<super::Destination>, ConfigError> {
        let settings = parse(config)?;
        Ok(vec![super::Destination::of_url("url", &settings.url)?])
    }

    fn required_secrets(&self, config: &Value) -> Vec<String> {
        parse(config)
            .ok()
            .and_then(|s| s.bearer_secret)
            .into_iter()
            .collect()
    }

    fn secret_field(&self, config: &Value, name: &str) -> Option<String> {
        (config.get("bearer_secret")?.as_str()? == name).then(|| "bearer_secret".to_owned())
    }

    fn sample_records(
        &self,
        config: &Value,
        sample: Option<&Value>,
    ) -> Result<Vec<Value>, ConfigError> {
        let settings = parse(config)?;
        let document = sample
            .ok_or_else(|| ConfigError::new("sample", "http_poll needs a sample response body"))?;
        document
            .pointer(&settings.record_path)
            .map(super::records_in)
            .ok_or_else(|| {
                ConfigError::new(
                    "record_path",
                    format!("the sample has nothing at {:?}", settings.record_path),
                )
            })
    }

    fn fetch_sample(
        &self,
        config: &Value,
        secrets: &super::SecretMap,
    ) -> BoxFuture<Result<Value, Error>> {
        let parsed = parse(config);
        // A credential the config names and the run does not have is an error, never an
        // unauthenticated fetch.
        let bearer = match parsed.as_ref().ok().and_then(|s| s.bearer_secret.as_ref()) {
            Some(name) => match secrets.get(name) {
                Some(value) => Some(value.expose().to_owned()),
                None => {
                    let missing = Error::Config(ConfigError::new(
                        "bearer_secret",
                        format!("secret {name:?} is not available to this run"),
                    ));
                    return Box::pin(async move { Err(missing) });
                }
            },
            None => None,
        };
        Box::pin(async move {
            let mut settings = parsed?;
            // One real document, as it is: no cursor, no ETag, no record path.
            settings.cursor = None;
            settings.record_path = String::new();
            settings.max_retries = 0;
            let client = super::http::client()?;
            let always = LeaseCheck::always();
            match poll(&client, &settings, bearer.as_deref(), &json!({}), &always).await? {
                Polled::Records(_, mut records) if records.len() == 1 => Ok(records.remove(0)),
                Polled::Records(_, records) => Ok(Value::Array(records)),
                Polled::NotModified | Polled::Lapsed => Ok(Value::Null),
            }
        })
    }

    fn preflight(&self, config: &Value, within: Duration) -> BoxFuture<Result<(), String>> {
        let parsed = parse(config);
        Box::pin(async move {
            let settings = parsed.map_err(|e| e.to_string())?;
            let url = reqwest::Url::parse(&settings.url).map_err(|e| format!("config.url: {e}"))?;
            // Through a proxy, the proxy is what the poll connects to (the variables reqwest
            // itself reads).
            let url = proxy_for(&url, |name| std::env::var(name).ok()).unwrap_or(url);
            let (host, port) = endpoint(&url)?;
            let bound = within.min(settings.timeout);
            tokio::time::timeout(bound, reach(&host, port))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no connection to {host}:{port} within {} ms",
                        bound.as_millis()
                    ))
                })
        })
    }

    fn stall_after(&self, config: &Value) -> Option<Duration> {
        let settings = parse(config).ok()?;
        let pacing = pacing(&settings);
        let retries: Duration = (1..=settings.max_retries).map(|n| pacing.ceiling(n)).sum();
        Some((settings.interval + settings.timeout * (settings.max_retries + 1) + retries) * 3)
    }

    fn position(&self) -> Option<&'static super::position::Format> {
        Some(&POSITION)
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        Box::pin(async move {
            let settings = parse(&ctx.config)?;
            let client = super::http::client()?;
            let bearer = match &settings.bearer_secret {
                Some(name) => Some(
                    ctx.secret(name)
                        .ok_or_else(|| {
                            Error::Config(ConfigError::new(
                                "bearer_secret",
                                format!("secret {name:?} is missing"),
                            ))
                        })?
                        .to_owned(),
                ),
                None => None,
            };
            let mut state = ctx.cursor.load().await?.unwrap_or_else(|| json!({}));
            let mut ticks = super::ticks::Ticks::every(settings.interval);
            loop {
                if !ticks.next(&ctx.cancel).await {
                    return Ok(());
                }
                let polled = tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    r = poll(&client, &settings, bearer.as_deref(), &state, &ctx.lease) => r?,
                };
                let (etag, records) = match polled {
                    Polled::Records(etag, records) => (etag, records),
                    Polled::NotModified => {
                        ctx.health.progress();
                        continue;
                    }
                    Polled::Lapsed => {
                        // The lapsed lease cancels this run: nothing more goes out meanwhile.
                        ctx.cancel.cancelled().await;
                        return Ok(());
                    }
                };
                let next_cursor = settings.cursor.as_ref().and_then(|(field, _)| {
                    records
                        .iter()
                        .filter_map(|r| r.get(field))
                        .max_by(|a, b| compare(a, b))
                        .cloned()
                });
                ctx.sink.write_durable(records).await?;
                let mut next = Map::new();
                if let Some(etag) = etag {
                    next.insert("etag".into(), Value::String(etag));
                }
                if let Some(value) = next_cursor.or_else(|| state.get("cursor").cloned()) {
                    next.insert("cursor".into(), value);
                }
                state = Value::Object(next);
                ctx.cursor.save(&state).await?;
                ctx.health.progress();
            }
        })
    }
}

/// Orders cursor values: numbers numerically, anything else by its text.
fn compare(a: &Value, b: &Value) -> std::cmp::Ordering {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => a.to_string().cmp(&b.to_string()),
    }
}

/// What one poll found.
enum Polled {
    /// Records, and the ETag they came with.
    Records(Option<String>, Vec<Value>),
    /// 304 Not Modified.
    NotModified,
    /// The lease no longer surely holds: no request was sent.
    Lapsed,
}

/// How the retries within one poll are paced: doubling from `retry_base_ms`, at most
/// [`MAX_WAIT_IN_POLL`] apart.
fn pacing(settings: &Settings) -> crate::backoff::Exponential {
    crate::backoff::Exponential::new(settings.retry_base, MAX_WAIT_IN_POLL)
}

/// One poll with retries; before each request it asks `lease`.
async fn poll(
    client: &reqwest::Client,
    settings: &Settings,
    bearer: Option<&str>,
    state: &Value,
    lease: &LeaseCheck,
) -> Result<Polled, Error> {
    let mut retries = crate::backoff::Retries::new(pacing(settings));
    loop {
        if !lease.holds() {
            return Ok(Polled::Lapsed);
        }
        let failed = match fetch(client, settings, bearer, state).await {
            Ok(polled) => return Ok(polled),
            Err(failed) => failed,
        };
        let attempt = retries.failures();
        let backoff = retries.failed(rand::random::<f64>());
        let delay = match failed {
            Fetch::Retryable(reason) if attempt < settings.max_retries => {
                tracing::debug!(attempt, reason, "poll failed; retrying");
                backoff
            }
            Fetch::Throttled(reason, after)
                if attempt < settings.max_retries && after <= MAX_WAIT_IN_POLL =>
            {
                tracing::debug!(
                    attempt,
                    reason,
                    after_ms = after.as_millis() as u64,
                    "poll throttled; waiting as asked"
                );
                backoff.max(after)
            }
            Fetch::Retryable(reason) | Fetch::Fatal(reason) => return Err(Error::Source(reason)),
            Fetch::Throttled(message, after) => return Err(Error::Throttled { message, after }),
            Fetch::Refused(reason) => return Err(Error::Refused(reason)),
        };
        // The caller races the whole poll against the run's cancel token.
        tokio::time::sleep(delay).await;
    }
}

/// Why a fetch failed, by what a retry can do about it.
enum Fetch {
    /// May pass: a connection error, a timeout, a 5xx, a 429 that named no time.
    Retryable(String),
    /// The source named when to ask again.
    Throttled(String, Duration),
    /// Will not pass by itself: 401, 403, 404, 410, a certificate that does not verify.
    Refused(String),
    /// An answer this config cannot use (not JSON, too large, nothing at the record path).
    Fatal(String),
}

/// The host (without IPv6 brackets) and port a connection to `url` goes to.
fn endpoint(url: &reqwest::Url) -> Result<(String, u16), String> {
    let host = url
        .host_str()
        .ok_or_else(|| "config.url: has no host".to_owned())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| "config.url: has no port".to_owned())?;
    Ok((host, port))
}

/// The proxy a request to `url` goes through, by the usual variables (`HTTPS_PROXY` or
/// `HTTP_PROXY` by scheme, then `ALL_PROXY`, each also lower case; `NO_PROXY` lists hosts and
/// domains that go direct, `*` all), as `var` reads them.
fn proxy_for(url: &reqwest::Url, var: impl Fn(&str) -> Option<String>) -> Option<reqwest::Url> {
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|name| var(name).filter(|v| !v.trim().is_empty()))
    };
    let host = url
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let direct = first(&["NO_PROXY", "no_proxy"]).is_some_and(|list| {
        list.split(',').map(str::trim).any(|entry| {
            let domain = entry.trim_start_matches('.');
            entry == "*"
                || (!domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}"))))
        })
    });
    if direct {
        return None;
    }
    let by_scheme: &[&str] = if url.scheme() == "https" {
        &["HTTPS_PROXY", "https_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy"]
    };
    let proxy = first(by_scheme).or_else(|| first(&["ALL_PROXY", "all_proxy"]))?;
    let proxy = if proxy.contains("://") {
        proxy
    } else {
        format!("http://{proxy}")
    };
    reqwest::Url::parse(&proxy).ok()
}

/// Resolves `host` and opens a TCP connection to one of its addresses.
async fn reach(host: &str, port: u16) -> Result<(), String> {
    let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("host {host} does not resolve: {e}"))?
        .collect();
    let mut last = format!("host {host} resolves to no address");
    for address in addresses {
        match tokio::net::TcpStream::connect(address).await {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("no connection to {host}:{port} ({address}): {e}"),
        }
    }
    Err(last)
}

/// Whether an error, or one it wraps, is a server certificate that did not verify.
fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let refused = |e: &(dyn std::error::Error + 'static)| {
        e.downcast_ref::<rustls::Error>().is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
    };
    let mut next = Some(error);
    while let Some(e) = next {
        // An I/O error's `source` skips the error it wraps: look at that one too.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .is_some_and(|inner| refused(inner) || is_certificate_error(inner));
        if refused(e) || wrapped {
            return true;
        }
        next = e.source();
    }
    false
}

async fn fetch(
    client: &reqwest::Client,
    settings: &Settings,
    bearer: Option<&str>,
    state: &Value,
) -> Result<Polled, Fetch> {
    let mut request = client.get(&settings.url).timeout(settings.timeout);
    if let (Some((_, param)), Some(value)) = (&settings.cursor, state.get("cursor")) {
        let text = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        request = request.query(&[(param.as_str(), text.as_str())]);
    }
    for (name, value) in &settings.headers {
        request = request.header(name, value);
    }
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    if let Some(etag) = state.get("etag").and_then(Value::as_str) {
        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    // Connection failures and timeouts may pass, a certificate that does not verify will not.
    // The URL is named with its credentials (userinfo, token parameters) masked; the bearer
    // token is never named.
    let response = request.send().await.map_err(|e| {
        let reason = format!(
            "GET {} failed: {}",
            redact_url(&settings.url),
            without_url(&e)
        );
        if is_certificate_error(&e) {
            Fetch::Refused(reason)
        } else {
            Fetch::Retryable(reason)
        }
    })?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(Polled::NotModified);
    }
    let answered = || format!("GET {} answered {status}", redact_url(&settings.url));
    if matches!(
        status,
        reqwest::StatusCode::TOO_MANY_REQUESTS | reqwest::StatusCode::SERVICE_UNAVAILABLE
    ) && let Some(after) = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| super::retry_after(v, std::time::SystemTime::now()))
    {
        return Err(Fetch::Throttled(answered(), after));
    }
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Err(Fetch::Retryable(answered()));
    }
    if matches!(
        status,
        reqwest::StatusCode::UNAUTHORIZED
            | reqwest::StatusCode::FORBIDDEN
            | reqwest::StatusCode::NOT_FOUND
            | reqwest::StatusCode::GONE
    ) {
        return Err(Fetch::Refused(answered()));
    }
    if !status.is_success() {
        return Err(Fetch::Fatal(answered()));
    }
    let etag = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if response
        .content_length()
        .is_some_and(|n| n > settings.max_body_bytes as u64)
    {
        return Err(Fetch::Fatal(format!(
            "the response is over {} bytes",
            settings.max_body_bytes
        )));
    }
    let mut body = Vec::new();
    let mut response = response;
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        Fetch::Retryable(format!("reading the response failed: {}", without_url(&e)))
    })? {
        if body.len() + chunk.len() > settings.max_body_bytes {
            return Err(Fetch::Fatal(format!(
                "the response is over {} bytes",
                settings.max_body_bytes
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let document: Value = serde_json::from_slice(&body)
        .map_err(|e| Fetch::Fatal(format!("the response is not JSON: {e}")))?;
    let found = document.pointer(&settings.record_path).ok_or_else(|| {
        Fetch::Fatal(format!(
            "the response has nothing at record_path {:?}",
            settings.record_path
        ))
    })?;
    Ok(Polled::Records(etag, super::records_in(found)))
}

/// A reqwest error's text without its URL (named once, redacted, by the caller); any other
/// URL in it (a redirect's target) is redacted.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    redact_urls(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked_field_by_field() {
        let p = HttpPoll::new();
        assert!(p.validate(&json!({"url": "http://127.0.0.1:1/x"})).is_ok());
        assert_eq!(p.validate(&json!({})).unwrap_err().field, "url");
        assert_eq!(
            p.validate(&json!({"url": "ftp://x"})).unwrap_err().field,
            "url"
        );
        assert_eq!(
            p.validate(&json!({"url": "http://x", "interval_ms": 5}))
                .unwrap_err()
                .field,
            "interval_ms"
        );
        assert_eq!(
            p.validate(&json!({"url": "http://x", "headers": {"a b": "c"}}))
                .unwrap_err()
                .field,
            "headers.a b"
        );
        assert_eq!(
            p.validate(&json!({"url": "http://x", "record_path": "data"}))
                .unwrap_err()
                .field,
            "record_path"
        );
        assert_eq!(
            p.validate(&json!({"url": "http://x", "cursor": {"field": "id"}}))
                .unwrap_err()
                .field,
            "cursor.param"
        );
        assert_eq!(
            p.validate(&json!({"url": "http://x", "bogus": 1}))
                .unwrap_err()
                .field,
            "bogus"
        );
        assert_eq!(
            p.required_secrets(&json!({"url": "http://x", "bearer_secret": "token"})),
            ["token"]
        );
    }

    #[test]
    fn certificate_errors_are_found_inside_io_errors() {
        let bad = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(is_certificate_error(&bad));
        let other = std::io::Error::other(rustls::Error::HandshakeNotComplete);
        assert!(!is_certificate_error(&other));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_certificate_error(&refused));
    }

    #[tokio::test]
    async fn the_preflight_resolves_the_host_and_opens_a_connection() {
        let p = HttpPoll::new();
        let within = Duration::from_secs(5);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert_eq!(
            p.preflight(&json!({"url": format!("http://{open}/x")}), within)
                .await,
            Ok(())
        );
        drop(listener);
        let closed = p
            .preflight(&json!({"url": format!("http://{open}/x")}), within)
            .await
            .unwrap_err();
        assert!(closed.contains("no connection"), "{closed}");
        let nowhere = p
            .preflight(
                &json!({"url": "http://user:pw@no-such-host.invalid/x?key=secret"}),
                within,
            )
            .await
            .unwrap_err();
        assert!(nowhere.contains("no-such-host.invalid"), "{nowhere}");
        assert!(
            !nowhere.contains("secret") && !nowhere.contains("pw"),
            "{nowhere}"
        );
    }

    #[test]
    fn the_preflight_goes_to_the_proxy_the_poll_would_use() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        let target = url("https://api.example.com/x");
        assert_eq!(proxy_for(&target, env(&[])), None);
        assert_eq!(
            proxy_for(&target, env(&[("HTTPS_PROXY", "proxy.local:3128")])),
            Some(url("http://proxy.local:3128"))
        );
        assert_eq!(
            proxy_for(&target, env(&[("HTTP_PROXY", "http://p:1")])),
            None,
            "an http proxy is not for https"
        );
        assert_eq!(
            proxy_for(&target, env(&[("all_proxy", "http://p:1")])),
            Some(url("http://p:1"))
        );
        for no_proxy in ["example.com", ".example.com", "other, api.example.com", "*"] {
            let vars = [("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", no_proxy)];
            let var = |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            };
            assert_eq!(proxy_for(&target, var), None, "{no_proxy}");
        }
        let vars = [("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "ample.com")];
        let var = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        assert!(
            proxy_for(&target, var).is_some(),
            "a suffix is not a domain"
        );
        assert_eq!(
            endpoint(&url("http://[::1]:8080/x")).unwrap(),
            ("::1".to_owned(), 8080)
        );
    }

    #[test]
    fn the_stall_threshold_covers_a_polls_whole_retry_schedule() {
        let config = |base_ms: u64, retries: u32| {
            json!({
                "url": "http://example.test/",
                "interval_ms": 1_000,
                "timeout_ms": 1_000,
                "retry_base_ms": base_ms,
                "max_retries": retries,
            })
        };
        // 100 ms, 200 ms, 400 ms of retries: (1 s + 4 × 1 s + 0.7 s) × 3.
        assert_eq!(
            HttpPoll.stall_after(&config(100, 3)),
            Some(Duration::from_millis(17_100))
        );
        // The longest schedule: 20 retries a minute apart at most, not 2^20 minutes.
        let longest = HttpPoll.stall_after(&config(60_000, 20)).unwrap();
        assert_eq!(longest, (Duration::from_secs(1 + 21 + 20 * 60)) * 3);
    }

    #[test]
    fn cursor_values_order_numbers_numerically() {
        assert_eq!(compare(&json!(9), &json!(10)), std::cmp::Ordering::Less);
        assert_eq!(
            compare(&json!("b"), &json!("a")),
            std::cmp::Ordering::Greater
        );
    }
}
