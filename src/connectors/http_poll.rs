//! The `http_poll` kind (pull): GET a URL on an interval and write the records found in the
//! response.
//!
//! Config: `url` (http or https), `interval_ms`, `headers` (an object of strings),
//! `bearer_secret` (the name of the datasource secret holding a bearer token), `record_path`
//! (a JSON pointer to the records: an array gives many, an object one), `timeout_ms`,
//! `max_retries` and `retry_base_ms` (5xx and connection errors are retried with exponential
//! backoff within a poll), `max_body_bytes`, and `cursor` (`{"field", "param"}`: the highest
//! `field` seen is sent as the query parameter `param` on the next poll).
//!
//! `ETag`/`If-None-Match` are honoured (a 304 is progress, not data). The ETag and the cursor
//! are stored in `datasource_state.source_cursor` after the records they cover are committed,
//! so a restart resumes where the last poll ended and writes nothing twice.

use std::sync::LazyLock;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{
    BoxFuture, ConfigError, Connector, Error, KindInfo, Mode, RunContext, VERSION_KEYS, integer_in,
};

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

    fn required_secrets(&self, config: &Value) -> Vec<String> {
        parse(config)
            .ok()
            .and_then(|s| s.bearer_secret)
            .into_iter()
            .collect()
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
        let bearer = parsed
            .as_ref()
            .ok()
            .and_then(|s| s.bearer_secret.as_ref())
            .and_then(|name| secrets.get(name))
            .map(|s| s.expose().to_owned());
        Box::pin(async move {
            let mut settings = parsed?;
            // One real document, as it is: no cursor, no ETag, no record path.
            settings.cursor = None;
            settings.record_path = String::new();
            settings.max_retries = 0;
            let client = super::http_client(settings.timeout)?;
            match poll(&client, &settings, bearer.as_deref(), &json!({})).await? {
                Some((_, mut records)) if records.len() == 1 => Ok(records.remove(0)),
                Some((_, records)) => Ok(Value::Array(records)),
                None => Ok(Value::Null),
            }
        })
    }

    fn stall_after(&self, config: &Value) -> Option<Duration> {
        let settings = parse(config).ok()?;
        let retries = settings
            .retry_base
            .saturating_mul(1 << settings.max_retries.min(16));
        Some((settings.interval + settings.timeout * (settings.max_retries + 1) + retries) * 3)
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        Box::pin(async move {
            let settings = parse(&ctx.config)?;
            let client = super::http_client(settings.timeout)?;
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
            let mut interval = tokio::time::interval(settings.interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    _ = interval.tick() => {}
                }
                let polled = tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    r = poll(&client, &settings, bearer.as_deref(), &state) => r?,
                };
                let Some((etag, records)) = polled else {
                    ctx.health.progress();
                    continue;
                };
                let count = records.len() as u64;
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
                ctx.health.records(count);
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

/// One poll with retries: `None` when the source answered 304 Not Modified.
async fn poll(
    client: &reqwest::Client,
    settings: &Settings,
    bearer: Option<&str>,
    state: &Value,
) -> Result<Option<(Option<String>, Vec<Value>)>, Error> {
    let mut attempt = 0;
    loop {
        match fetch(client, settings, bearer, state).await {
            Ok(result) => return Ok(result),
            Err(Fetch::Retryable(reason)) if attempt < settings.max_retries => {
                let delay = settings.retry_base.saturating_mul(1 << attempt.min(16));
                tracing::debug!(attempt, reason, "poll failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(Fetch::Retryable(reason) | Fetch::Fatal(reason)) => {
                return Err(Error::Source(reason));
            }
        }
    }
}

enum Fetch {
    Retryable(String),
    Fatal(String),
}

async fn fetch(
    client: &reqwest::Client,
    settings: &Settings,
    bearer: Option<&str>,
    state: &Value,
) -> Result<Option<(Option<String>, Vec<Value>)>, Fetch> {
    let mut request = client.get(&settings.url);
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
    // Connection failures and timeouts may pass; the URL is named, never the token.
    let response = request.send().await.map_err(|e| {
        Fetch::Retryable(format!("GET {} failed: {}", settings.url, without_url(&e)))
    })?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Err(Fetch::Retryable(format!(
            "GET {} answered {status}",
            settings.url
        )));
    }
    if !status.is_success() {
        return Err(Fetch::Fatal(format!(
            "GET {} answered {status}",
            settings.url
        )));
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
    Ok(Some((etag, super::records_in(found))))
}

/// A reqwest error's text without its URL (which may carry credentials in its query).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    text
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
    fn cursor_values_order_numbers_numerically() {
        assert_eq!(compare(&json!(9), &json!(10)), std::cmp::Ordering::Less);
        assert_eq!(
            compare(&json!("b"), &json!("a")),
            std::cmp::Ordering::Greater
        );
    }
}
