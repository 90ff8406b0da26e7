//! The `kafka` kind (pull): consume one or more topics and write each message as a record.
//!
//! Config: `bootstrap_servers` (`host:port` each), `topics`, `group_id` (default
//! `dsreg-<datasource id>`), `start` (where a datasource with no position starts: `earliest`,
//! `latest`, or Unix milliseconds), `key_format` and `value_format` (`json`, `text` for UTF-8,
//! `base64` for raw bytes), `headers` (the names of the headers kept on each record), `sasl`
//! (`{mechanism: PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512, username, password_secret}`: the
//! password is the datasource secret named), `tls` (`{}` verifies the brokers against the
//! system roots, `{ca_secret}` against the PEM the secret holds), `batch_max_records` and
//! `batch_linger_ms` (how many messages one sink write carries, and how long a batch waits to
//! fill).
//!
//! # Position and delivery
//!
//! The datasource's lease already makes one worker the only reader, so the run assigns itself
//! every partition of its topics (no group membership, whose rebalances would fight the
//! lease) and keeps its position in `datasource_state.source_cursor`: `{"offsets":
//! {"<topic>:<partition>": next offset}}`, saved under the worker's fencing epoch only after
//! the sink has committed (or dead-lettered) every record before it, then committed to the
//! consumer group too, for Kafka's own tools. A crash, a hot reload or a lease move resumes
//! from the saved offsets: nothing is skipped, and what is read again is at most the batch in
//! flight (at least once). While the sink writes one batch, the run reads and transforms the
//! next, and hands it over once that one is settled: one batch is written at a time. A
//! position may also carry `start` (`earliest`, `latest`, Unix milliseconds) for partitions it
//! names no offset for; a backfill sets either.
//!
//! Partitions added to a topic while a run reads it are found by asking the brokers for the
//! topics' metadata every 5 s (librdkafka notices new partitions by itself only for a
//! subscribed consumer group, through a rebalance, and the run subscribes to none), and added
//! to the assignment from their start without a restart: their offsets are saved first, as at
//! the start of a run.
//!
//! # Failures
//!
//! Brokers that cannot be reached are transient ([`Error::Source`], the worker backs off); an
//! unknown topic, a refused login or a missing authorisation are permanent until someone acts
//! ([`Error::Refused`]: tried again only after the long delay). A message whose key or value
//! does not decode as configured is dead-lettered (`undecodable`) with its bytes in base64.
//! The password never leaves the client: errors and librdkafka's log lines are scrubbed of it.
//!
//! Progress for the stall detector is a batch committed, or, when nothing arrives, every
//! partition read to its end while the brokers answer.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{Map, Value, json};
use tokio_util::task::AbortOnDropHandle;

use super::kafka_client::{Context, Login, Trust, check_ca, client_config, creation_error};
use super::position::{self, Field, Format, Shape};
use super::sink::DeadLetter;
use super::{
    BoxFuture, ConfigError, Connector, Destination, Error, KindInfo, Mode, RunContext,
    VERSION_KEYS, integer_in,
};

/// How long a metadata, watermark or offset request to the brokers may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle run checks that the brokers answer and it has read everything.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// How long the brokers may fail to answer before the run ends with an error.
const UNREACHABLE_FOR: Duration = Duration::from_secs(60);
/// How often a run asks the brokers whether its topics have gained partitions.
const PARTITIONS_CHECK: Duration = Duration::from_secs(5);
/// The most records one sink write carries.
pub const MAX_BATCH: u64 = 5_000;

static INFO: LazyLock<KindInfo> = LazyLock::new(|| KindInfo {
    name: "kafka",
    version: "1.0.0",
    summary: "consume Kafka topics; offsets saved after the sink commits",
    config_schema: json!({
        "type": "object",
        "required": ["bootstrap_servers", "topics"],
        "additionalProperties": false,
        "properties": {
            "bootstrap_servers": {
                "type": "array", "minItems": 1, "maxItems": 32,
                "items": { "type": "string", "pattern": "^[^\\s:/]+:[0-9]{1,5}$" }
            },
            "topics": {
                "type": "array", "minItems": 1, "maxItems": 100, "uniqueItems": true,
                "items": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,249}$" }
            },
            "group_id": { "type": "string", "minLength": 1, "maxLength": 255 },
            "start": {
                "anyOf": [
                    { "enum": ["earliest", "latest"] },
                    { "type": "integer", "minimum": 0 }
                ],
                "default": "earliest"
            },
            "key_format": { "enum": ["json", "text", "base64"], "default": "text" },
            "value_format": { "enum": ["json", "text", "base64"], "default": "json" },
            "headers": {
                "type": "array", "maxItems": 64, "uniqueItems": true,
                "items": { "type": "string", "minLength": 1, "maxLength": 255 }
            },
            "sasl": {
                "type": "object",
                "required": ["mechanism", "username", "password_secret"],
                "additionalProperties": false,
                "properties": {
                    "mechanism": { "enum": ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] },
                    "username": { "type": "string", "minLength": 1, "maxLength": 255 },
                    "password_secret": { "type": "string", "minLength": 1 }
                }
            },
            "tls": {
                "type": "object",
                "additionalProperties": false,
                "properties": { "ca_secret": { "type": "string", "minLength": 1 } }
            },
            "batch_max_records": { "type": "integer", "minimum": 1, "maximum": MAX_BATCH, "default": 1000 },
            "batch_linger_ms": { "type": "integer", "minimum": 0, "maximum": 10_000, "default": 20 }
        }
    }),
    secrets: &[],
    mode: Mode::Pull,
    can_backfill: true,
});

/// The position a `kafka` worker saves after the records it covers are committed.
static POSITION: Format = Format {
    summary: "the next offset to read in each partition of the datasource's topics",
    fields: &[
        Field {
            name: "offsets",
            shape: Shape::Offsets,
            meaning: "\"<topic>:<partition>\" → the offset of the next message to read there \
                      (one past the last committed to the sink); a partition not named starts \
                      from `start`",
        },
        Field {
            name: "start",
            shape: Shape::StartPoint,
            meaning: "where partitions without an offset start: \"earliest\", \"latest\" or a \
                      time in Unix milliseconds (the first message at or after it); missing: \
                      the config's start",
        },
    ],
};

/// How a key or value is turned into JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoding {
    /// Parsed as JSON.
    Json,
    /// UTF-8 text, as a string.
    Text,
    /// Raw bytes, as a base64 string.
    Base64,
}

impl Decoding {
    fn parse(config: &Value, field: &str, default: Decoding) -> Result<Self, ConfigError> {
        match config.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => match s.as_str() {
                "json" => Ok(Decoding::Json),
                "text" => Ok(Decoding::Text),
                "base64" => Ok(Decoding::Base64),
                _ => Err(ConfigError::new(field, "must be json, text or base64")),
            },
            Some(_) => Err(ConfigError::new(field, "must be json, text or base64")),
        }
    }

    /// The bytes as JSON, or why they do not decode.
    fn decode(self, bytes: &[u8]) -> Result<Value, String> {
        match self {
            Decoding::Json => {
                serde_json::from_slice(bytes).map_err(|e| format!("is not JSON: {e}"))
            }
            Decoding::Text => std::str::from_utf8(bytes)
                .map(|s| Value::String(s.to_owned()))
                .map_err(|e| format!("is not UTF-8 text: {e}")),
            Decoding::Base64 => Ok(Value::String(
                base64::engine::general_purpose::STANDARD.encode(bytes),
            )),
        }
    }
}

/// Where a partition with no saved offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Earliest,
    Latest,
    /// The first message at or after this time (Unix milliseconds).
    At(i64),
}

impl Start {
    fn of(value: &Value, field: &str) -> Result<Self, ConfigError> {
        match value {
            Value::String(s) if s == "earliest" => Ok(Start::Earliest),
            Value::String(s) if s == "latest" => Ok(Start::Latest),
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| i64::try_from(n).ok())
                .map(Start::At)
                .ok_or_else(|| ConfigError::new(field, "must be non-negative Unix milliseconds")),
            _ => Err(ConfigError::new(
                field,
                "must be \"earliest\", \"latest\" or Unix milliseconds",
            )),
        }
    }
}

#[derive(Debug, Clone)]
struct Sasl {
    mechanism: String,
    username: String,
    password_secret: String,
}

#[derive(Debug, Clone)]
struct Settings {
    bootstrap: Vec<(String, u16)>,
    topics: Vec<String>,
    group_id: Option<String>,
    start: Start,
    key: Decoding,
    value: Decoding,
    headers: Vec<String>,
    sasl: Option<Sasl>,
    /// `Some(ca_secret)` when TLS is on (`Some(None)`: the system roots).
    tls: Option<Option<String>>,
    batch_max: usize,
    linger: Duration,
}

fn strings(config: &Value, field: &str, max: usize) -> Result<Vec<String>, ConfigError> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() <= max => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ConfigError::new(format!("{field}.{i}"), "must be a string"))
            })
            .collect(),
        Some(Value::Array(_)) => Err(ConfigError::new(
            field,
            format!("may hold at most {max} items"),
        )),
        Some(_) => Err(ConfigError::new(field, "must be an array of strings")),
    }
}

/// The header names to keep: as the schema says, each 1 to 255 characters, none twice.
fn header_names(config: &Value) -> Result<Vec<String>, ConfigError> {
    let names = strings(config, "headers", 64)?;
    for (i, name) in names.iter().enumerate() {
        if !(1..=255).contains(&name.chars().count()) {
            return Err(ConfigError::new(
                format!("headers.{i}"),
                "must be 1 to 255 characters",
            ));
        }
        if names[..i].contains(name) {
            return Err(ConfigError::new(format!("headers.{i}"), "is named twice"));
        }
    }
    Ok(names)
}

fn string_in(object: &Value, prefix: &str, field: &str) -> Result<String, ConfigError> {
    match object.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(ConfigError::new(
            format!("{prefix}.{field}"),
            "must be a non-empty string",
        )),
        None => Err(ConfigError::new(format!("{prefix}.{field}"), "is required")),
    }
}

fn parse(config: &Value) -> Result<Settings, ConfigError> {
    let object = config
        .as_object()
        .ok_or_else(|| ConfigError::new("", "must be a JSON object"))?;
    const FIELDS: &[&str] = &[
        "bootstrap_servers",
        "topics",
        "group_id",
        "start",
        "key_format",
        "value_format",
        "headers",
        "sasl",
        "tls",
        "batch_max_records",
        "batch_linger_ms",
    ];
    if let Some(unknown) = object
        .keys()
        .find(|k| !FIELDS.contains(&k.as_str()) && !VERSION_KEYS.contains(&k.as_str()))
    {
        return Err(ConfigError::new(
            unknown.clone(),
            "unknown field for kind kafka",
        ));
    }
    let servers = strings(config, "bootstrap_servers", 32)?;
    if servers.is_empty() {
        return Err(ConfigError::new(
            "bootstrap_servers",
            "is required: at least one host:port",
        ));
    }
    let bootstrap = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let field = format!("bootstrap_servers.{i}");
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| ConfigError::new(&field, "must be host:port"))?;
            let port: u16 =
                port.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                    ConfigError::new(&field, "must end in a port from 1 to 65535")
                })?;
            if host.is_empty()
                || host
                    .chars()
                    .any(|c| c.is_whitespace() || c == '/' || c == ',' || c.is_control())
            {
                return Err(ConfigError::new(&field, "must be host:port"));
            }
            Ok((host.to_ascii_lowercase(), port))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let topics = strings(config, "topics", 100)?;
    if topics.is_empty() {
        return Err(ConfigError::new(
            "topics",
            "is required: at least one topic",
        ));
    }
    for (i, topic) in topics.iter().enumerate() {
        if topics[..i].contains(topic) {
            return Err(ConfigError::new(format!("topics.{i}"), "is named twice"));
        }
        if !position::is_topic_name(topic) {
            return Err(ConfigError::new(
                format!("topics.{i}"),
                "is not a topic name (1 to 249 letters, digits, '.', '_', '-')",
            ));
        }
    }
    let group_id = match config.get("group_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => Some(s.clone()),
        Some(_) => {
            return Err(ConfigError::new(
                "group_id",
                "must be a string of 1 to 255 bytes",
            ));
        }
    };
    let start = match config.get("start") {
        None | Some(Value::Null) => Start::Earliest,
        Some(v) => Start::of(v, "start")?,
    };
    let sasl = match config.get("sasl") {
        None | Some(Value::Null) => None,
        Some(s @ Value::Object(_)) => {
            let mechanism = string_in(s, "sasl", "mechanism")?;
            if !super::kafka_client::MECHANISMS.contains(&mechanism.as_str()) {
                return Err(ConfigError::new(
                    "sasl.mechanism",
                    "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                ));
            }
            Some(Sasl {
                mechanism,
                username: string_in(s, "sasl", "username")?,
                password_secret: string_in(s, "sasl", "password_secret")?,
            })
        }
        Some(_) => return Err(ConfigError::new("sasl", "must be an object")),
    };
    let tls = super::kafka_client::tls_setting(config)?;
    Ok(Settings {
        bootstrap,
        topics,
        group_id,
        start,
        key: Decoding::parse(config, "key_format", Decoding::Text)?,
        value: Decoding::parse(config, "value_format", Decoding::Json)?,
        headers: header_names(config)?,
        sasl,
        tls,
        batch_max: integer_in(config, "batch_max_records", 1000, 1, MAX_BATCH)? as usize,
        linger: Duration::from_millis(integer_in(config, "batch_linger_ms", 20, 0, 10_000)?),
    })
}

/// The `kafka` connector.
#[derive(Debug, Default)]
pub struct Kafka;

impl Kafka {
    /// The kind.
    pub fn new() -> Self {
        Self
    }
}

impl Connector for Kafka {
    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        parse(config).map(|_| ())
    }

    fn required_secrets(&self, config: &Value) -> Vec<String> {
        let Ok(settings) = parse(config) else {
            return Vec::new();
        };
        settings
            .sasl
            .map(|s| s.password_secret)
            .into_iter()
            .chain(settings.tls.flatten())
            .collect()
    }

    fn secret_field(&self, config: &Value, name: &str) -> Option<String> {
        let settings = parse(config).ok()?;
        if settings.sasl.is_some_and(|s| s.password_secret == name) {
            return Some("sasl.password_secret".into());
        }
        (settings.tls.flatten().as_deref() == Some(name)).then(|| "tls.ca_secret".into())
    }

    fn destinations(&self, config: &Value) -> Result<Vec<Destination>, ConfigError> {
        let settings = parse(config)?;
        let scheme = if settings.tls.is_some() {
            "kafka+tls"
        } else {
            "kafka"
        };
        Ok(settings
            .bootstrap
            .iter()
            .map(|(host, port)| Destination {
                scheme: scheme.into(),
                host: host.clone(),
                port: *port,
            })
            .collect())
    }

    fn sample_records(
        &self,
        config: &Value,
        sample: Option<&Value>,
    ) -> Result<Vec<Value>, ConfigError> {
        let settings = parse(config)?;
        let sample =
            sample.ok_or_else(|| ConfigError::new("sample", "kafka needs a sample message"))?;
        // A sample is message values: each becomes the record a message with that value does.
        Ok(super::records_in(sample)
            .into_iter()
            .enumerate()
            .map(|(i, value)| {
                json!({
                    "topic": settings.topics[0],
                    "partition": 0,
                    "offset": i,
                    "timestamp_ms": null,
                    "key": null,
                    "value": value,
                })
            })
            .collect())
    }

    fn stall_after(&self, config: &Value) -> Option<Duration> {
        parse(config).ok()?;
        Some(UNREACHABLE_FOR)
    }

    fn position(&self) -> Option<&'static Format> {
        Some(&POSITION)
    }

    fn preflight(&self, config: &Value, within: Duration) -> BoxFuture<Result<(), String>> {
        let parsed = parse(config);
        Box::pin(async move {
            let settings = parsed.map_err(|e| e.to_string())?;
            let bound = within.min(REQUEST_TIMEOUT);
            let mut last = String::new();
            for (host, port) in &settings.bootstrap {
                match tokio::time::timeout(bound, tokio::net::TcpStream::connect((&**host, *port)))
                    .await
                {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => last = format!("no connection to {host}:{port}: {e}"),
                    Err(_) => {
                        last = format!(
                            "no connection to {host}:{port} within {} ms",
                            bound.as_millis()
                        );
                    }
                }
            }
            Err(last)
        })
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        Box::pin(async move {
            let settings = parse(&ctx.config)?;
            let consumer = Arc::new(connect(&settings, &ctx)?);
            let result = consume(&settings, &ctx, &consumer).await;
            // Closing a consumer waits on librdkafka's threads: not on the runtime's.
            let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
            result
        })
    }
}

impl ConsumerContext for Context {}

type KafkaConsumer = StreamConsumer<Context>;

/// The consumer for `settings`, not yet assigned anything.
fn connect(settings: &Settings, ctx: &RunContext) -> Result<KafkaConsumer, Error> {
    let secret = |field: &str, name: &str| {
        ctx.secret(name).map(str::to_owned).ok_or_else(|| {
            Error::Config(ConfigError::new(
                field,
                format!("secret {name:?} is not available to this run"),
            ))
        })
    };
    let login = match &settings.sasl {
        Some(sasl) => Some(Login {
            mechanism: sasl.mechanism.clone(),
            username: sasl.username.clone(),
            password: secret("sasl.password_secret", &sasl.password_secret)?,
        }),
        None => None,
    };
    let trust = match &settings.tls {
        Some(Some(name)) => {
            let pem = secret("tls.ca_secret", name)?;
            check_ca(&pem).map_err(|reason| {
                Error::Config(ConfigError::new(
                    "tls.ca_secret",
                    format!("secret {name:?} {reason}"),
                ))
            })?;
            Some(Trust::Ca(pem))
        }
        Some(None) => Some(Trust::SystemRoots),
        None => None,
    };
    let servers: Vec<String> = settings
        .bootstrap
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect();
    let mut config = client_config(&servers.join(","), trust.as_ref(), login.as_ref());
    config
        .set("group.id", group_id(settings, ctx.datasource_id))
        .set("client.id", format!("dsreg-{}", ctx.datasource_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Only reached when a saved offset has left the log (retention): the oldest kept.
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("socket.timeout.ms", "10000")
        .set("reconnect.backoff.max.ms", "5000")
        // A broker that holds a fetch for its whole wait even when messages are there (tansu
        // waits half of it) delays every batch by as much: 100 ms instead of librdkafka's 500.
        .set("fetch.wait.max.ms", "100")
        .set_log_level(RDKafkaLogLevel::Warning);
    config
        .create_with_context(Context::new(login.as_ref()))
        .map_err(|e| Error::Source(creation_error(&e, "the Kafka client")))
}

/// The consumer group: the configured one, else one of the datasource's own.
fn group_id(settings: &Settings, datasource: uuid::Uuid) -> String {
    settings
        .group_id
        .clone()
        .unwrap_or_else(|| format!("dsreg-{datasource}"))
}

/// Runs a blocking client call off the runtime.
async fn blocking<T: Send + 'static>(
    consumer: &Arc<KafkaConsumer>,
    call: impl FnOnce(&KafkaConsumer) -> T + Send + 'static,
) -> Result<T, Error> {
    let consumer = Arc::clone(consumer);
    tokio::task::spawn_blocking(move || call(&consumer))
        .await
        .map_err(|_| Error::Source("the runtime is shutting down".into()))
}

/// Lets the client hand over what it queued for the application (a refused login or a failed
/// TLS handshake reaches [`Context::error`] only so), for at most a moment: every queued event,
/// since the one that says why may follow others (a broker down, a transport failure).
async fn pump(consumer: &KafkaConsumer) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    loop {
        let context = consumer.context();
        if context.refusal().is_some() || context.handshake_failure().is_some() {
            return;
        }
        if tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Why a request to the brokers failed, as the worker retries it.
fn failure(consumer: &KafkaConsumer, servers: &str, doing: &str, e: &KafkaError) -> Error {
    let context = consumer.context();
    if let Some(refusal) = context.refusal() {
        return Error::Refused(format!("{doing}: the brokers refused the login: {refusal}"));
    }
    if let Some(handshake) = context.handshake_failure() {
        return Error::Source(format!(
            "{doing} at {servers}: the TLS handshake failed: {handshake}"
        ));
    }
    let e = context.scrub(&e.to_string());
    Error::Source(format!("{doing} at {servers}: {e}"))
}

/// Every partition of the configured topics.
async fn partitions(
    settings: &Settings,
    consumer: &Arc<KafkaConsumer>,
) -> Result<Vec<(String, i32)>, Error> {
    match lookup_partitions(settings, consumer).await? {
        Ok(found) => Ok(found),
        Err(e) => {
            pump(consumer).await;
            let servers: Vec<String> = settings
                .bootstrap
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect();
            Err(failure(
                consumer,
                &servers.join(","),
                "reading the topics' metadata",
                &e,
            ))
        }
    }
}

/// Every partition of the configured topics (the outer error: a topic is missing or may not
/// be read; the inner: the brokers did not answer). Reads no message.
async fn lookup_partitions(
    settings: &Settings,
    consumer: &Arc<KafkaConsumer>,
) -> Result<Result<Vec<(String, i32)>, KafkaError>, Error> {
    let mut found = Vec::new();
    for topic in &settings.topics {
        let name = topic.clone();
        let metadata = match blocking(consumer, move |c| {
            c.fetch_metadata(Some(&name), REQUEST_TIMEOUT)
        })
        .await?
        {
            Ok(metadata) => metadata,
            Err(e) => return Ok(Err(e)),
        };
        let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(Error::Refused(format!("topic {topic:?} does not exist")));
        };
        match meta.error().map(RDKafkaErrorCode::from) {
            None => {}
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::InvalidTopic,
            ) => return Err(Error::Refused(format!("topic {topic:?} does not exist"))),
            Some(
                code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed),
            ) => {
                return Err(Error::Refused(format!(
                    "topic {topic:?} may not be read: {code}"
                )));
            }
            Some(code) => {
                return Err(Error::Source(format!(
                    "the metadata of topic {topic:?}: {code}"
                )));
            }
        }
        if meta.partitions().is_empty() {
            return Err(Error::Refused(format!("topic {topic:?} has no partitions")));
        }
        found.extend(meta.partitions().iter().map(|p| (topic.clone(), p.id())));
    }
    Ok(Ok(found))
}

fn key_of(topic: &str, partition: i32) -> String {
    format!("{topic}:{partition}")
}

/// The saved offsets, and where partitions without one start.
fn saved(position: Option<&Value>, settings: &Settings) -> (BTreeMap<String, i64>, Start) {
    let offsets = position
        .and_then(|p| p.get("offsets"))
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter(|(k, _)| position::offsets_key(k).is_some())
                .filter_map(|(k, v)| Some((k.clone(), i64::try_from(v.as_u64()?).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let start = position
        .and_then(|p| p.get("start"))
        .and_then(|s| Start::of(s, "start").ok())
        .unwrap_or(settings.start);
    (offsets, start)
}

/// The offset each partition starts from: its saved one, else where `start` says, as a
/// concrete offset (so a position saved before anything is read resumes from the same place).
async fn starting_offsets(
    consumer: &Arc<KafkaConsumer>,
    partitions: &[(String, i32)],
    offsets: &BTreeMap<String, i64>,
    start: Start,
) -> Result<BTreeMap<String, i64>, Error> {
    let mut resolved = BTreeMap::new();
    let missing: Vec<(String, i32)> = partitions
        .iter()
        .filter(|(t, p)| !offsets.contains_key(&key_of(t, *p)))
        .cloned()
        .collect();
    for (topic, partition) in partitions {
        if let Some(offset) = offsets.get(&key_of(topic, *partition)) {
            resolved.insert(key_of(topic, *partition), *offset);
        }
    }
    if missing.is_empty() {
        return Ok(resolved);
    }
    let at_time = match start {
        Start::At(ms) => {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in &missing {
                list.add_partition_offset(topic, *partition, Offset::Offset(ms))
                    .map_err(|e| Error::Source(format!("an offset request: {e}")))?;
            }
            let found = blocking(consumer, move |c| {
                c.offsets_for_times(list, REQUEST_TIMEOUT)
            })
            .await?
            .map_err(|e| Error::Source(format!("finding the offsets at {ms} ms: {e}")))?;
            Some(found.to_topic_map())
        }
        _ => None,
    };
    for (topic, partition) in missing {
        let (t, p) = (topic.clone(), partition);
        let (low, high) = blocking(consumer, move |c| {
            c.fetch_watermarks(&t, p, REQUEST_TIMEOUT)
        })
        .await?
        .map_err(|e| {
            Error::Source(format!(
                "reading the offsets of {}: {e}",
                key_of(&topic, partition)
            ))
        })?;
        let offset = match start {
            Start::Earliest => low,
            Start::Latest => high,
            Start::At(_) => match at_time
                .as_ref()
                .and_then(|m| m.get(&(topic.clone(), partition)))
            {
                Some(Offset::Offset(o)) => (*o).clamp(low, high),
                // No message at or after the time: from the end.
                _ => high,
            },
        };
        resolved.insert(key_of(&topic, partition), offset);
    }
    Ok(resolved)
}

/// The position saved for `offsets`.
fn position_of(offsets: &BTreeMap<String, i64>) -> Value {
    json!({ "offsets": offsets })
}

/// The record a message becomes, or the dead letter it is.
fn record_of(
    settings: &Settings,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<Value, DeadLetter> {
    let mut record = Map::new();
    record.insert("topic".into(), json!(message.topic()));
    record.insert("partition".into(), json!(message.partition()));
    record.insert("offset".into(), json!(message.offset()));
    record.insert(
        "timestamp_ms".into(),
        json!(message.timestamp().to_millis()),
    );
    let undecodable = |what: &str, reason: String| {
        let raw = |b: Option<&[u8]>| {
            b.map(|b| base64::engine::general_purpose::STANDARD.encode(b))
                .map_or(Value::Null, Value::String)
        };
        DeadLetter::new(
            json!({
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "key_base64": raw(message.key()),
                "value_base64": raw(message.payload()),
            }),
            "undecodable",
            format!("the message's {what} {reason}"),
        )
    };
    let key = match message.key() {
        None => Value::Null,
        Some(bytes) => settings
            .key
            .decode(bytes)
            .map_err(|r| undecodable("key", r))?,
    };
    let value = match message.payload() {
        None => Value::Null,
        Some(bytes) => settings
            .value
            .decode(bytes)
            .map_err(|r| undecodable("value", r))?,
    };
    record.insert("key".into(), key);
    record.insert("value".into(), value);
    if !settings.headers.is_empty() {
        let mut kept = Map::new();
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                if settings.headers.iter().any(|h| h == header.key) {
                    let value = match header.value {
                        None => Value::Null,
                        Some(bytes) => match std::str::from_utf8(bytes) {
                            Ok(text) => Value::String(text.to_owned()),
                            Err(_) => json!({
                                "base64": base64::engine::general_purpose::STANDARD.encode(bytes)
                            }),
                        },
                    };
                    kept.insert(header.key.to_owned(), value);
                }
            }
        }
        record.insert("headers".into(), Value::Object(kept));
    }
    Ok(Value::Object(record))
}

/// Whether a consumption error ends the run, and how.
fn consumption_failure(e: &KafkaError, consumer: &KafkaConsumer) -> Option<Error> {
    if let Some(refusal) = consumer.context().refusal() {
        return Some(Error::Refused(format!(
            "the brokers refused the login: {refusal}"
        )));
    }
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => Some(Error::Refused(format!(
            "a topic or partition is gone: {}",
            consumer.context().scrub(&e.to_string())
        ))),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => Some(Error::Refused(format!(
            "not authorised: {}",
            consumer.context().scrub(&e.to_string())
        ))),
        _ if matches!(e, KafkaError::MessageConsumptionFatal(_)) => {
            Some(Error::Source(consumer.context().scrub(&e.to_string())))
        }
        // librdkafka retries the rest itself.
        _ => None,
    }
}

async fn consume(
    settings: &Settings,
    ctx: &RunContext,
    consumer: &Arc<KafkaConsumer>,
) -> Result<(), Error> {
    if !ctx.may_act() {
        ctx.cancel.cancelled().await;
        return Ok(());
    }
    let partitions = tokio::select! {
        () = ctx.cancel.cancelled() => return Ok(()),
        r = partitions(settings, consumer) => r?,
    };
    let stored = ctx.cursor.load().await?;
    let (offsets, start) = saved(stored.as_ref(), settings);
    let mut next = tokio::select! {
        () = ctx.cancel.cancelled() => return Ok(()),
        r = starting_offsets(consumer, &partitions, &offsets, start) => r?,
    };
    // Where the run starts is saved before anything is read: a `latest` or a time resolved
    // now is where every later run resumes too, not wherever the end is then.
    let position = position_of(&next);
    if stored.as_ref() != Some(&position) {
        ctx.cursor.save(&position).await?;
    }
    let mut assignment = TopicPartitionList::new();
    for (topic, partition) in &partitions {
        let offset = next[&key_of(topic, *partition)];
        assignment
            .add_partition_offset(topic, *partition, Offset::Offset(offset))
            .map_err(|e| Error::Source(format!("assigning partitions: {e}")))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Error::Source(format!("assigning partitions: {e}")))?;
    ctx.health.working();
    tracing::debug!(
        datasource_id = %ctx.datasource_id,
        partitions = partitions.len(),
        "kafka.assigned"
    );

    let servers = settings
        .bootstrap
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut answered = Instant::now();
    let mut idle = tokio::time::interval(IDLE_CHECK);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    idle.reset();
    let mut watch = tokio::time::interval(PARTITIONS_CHECK);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    watch.reset();
    // The batch the sink is writing while the next one is read: at most one, settled (its
    // position saved and committed to the group) before the next is handed over.
    let mut in_flight: Option<InFlight> = None;
    loop {
        let mut records = Vec::new();
        let mut dead = Vec::new();
        let mut batch_next: BTreeMap<String, i64> = BTreeMap::new();
        // Wait for the first message of a batch (or the batch in flight, an idle or a
        // partitions check), then fill the batch for at most the linger. The checks come
        // only once every record read is committed, so the assignment may grow there.
        let first = tokio::select! {
            () = ctx.cancel.cancelled() => return Ok(()),
            (written, batch_next) = wait(&mut in_flight) => {
                settle(ctx, consumer, &mut next, written, batch_next).await?;
                answered = Instant::now();
                idle.reset();
                continue;
            }
            _ = watch.tick(), if in_flight.is_none() => {
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    r = take_up_new_partitions(settings, ctx, consumer, &mut next) => r?,
                }
                continue;
            }
            _ = idle.tick(), if in_flight.is_none() => None,
            m = consumer.recv() => Some(m),
        };
        let Some(first) = first else {
            if let Some(refusal) = consumer.context().refusal() {
                return Err(Error::Refused(format!(
                    "the brokers refused the login: {refusal}"
                )));
            }
            // Nothing arrived for a while: caught up when the brokers answer and no
            // partition's end lies past what was committed.
            match caught_up(consumer, &next).await? {
                Ok(caught_up) => {
                    answered = Instant::now();
                    if caught_up {
                        ctx.health.progress();
                    }
                }
                Err(e) if answered.elapsed() >= UNREACHABLE_FOR => {
                    pump(consumer).await;
                    return Err(failure(
                        consumer,
                        &servers,
                        &format!("no broker answered for {} s", UNREACHABLE_FOR.as_secs()),
                        &e,
                    ));
                }
                Err(_) => {}
            }
            continue;
        };
        let linger = tokio::time::sleep(settings.linger);
        tokio::pin!(linger);
        let mut got = Some(first);
        loop {
            if let Some(result) = got.take() {
                match result {
                    Ok(message) => {
                        let key = key_of(message.topic(), message.partition());
                        batch_next.insert(key, message.offset() + 1);
                        match record_of(settings, &message) {
                            Ok(record) => records.push(record),
                            Err(letter) => dead.push(letter),
                        }
                    }
                    Err(e) => {
                        if let Some(failure) = consumption_failure(&e, consumer) {
                            return Err(failure);
                        }
                        ctx.health.error();
                        tracing::debug!(
                            datasource_id = %ctx.datasource_id,
                            error = %consumer.context().scrub(&e.to_string()),
                            "kafka.consume_error"
                        );
                    }
                }
            }
            if records.len() + dead.len() >= settings.batch_max {
                break;
            }
            got = tokio::select! {
                () = ctx.cancel.cancelled() => return Ok(()),
                () = &mut linger => break,
                m = consumer.recv() => Some(m),
            };
        }
        if batch_next.is_empty() {
            continue;
        }
        // Transformed while the batch before is written; handed to the sink once that one is
        // settled, so positions are saved and committed in order and a crash repeats at most
        // one batch.
        let edged = tokio::select! {
            () = ctx.cancel.cancelled() => return Ok(()),
            edged = ctx.sink.edge(records, dead) => edged?,
        };
        if in_flight.is_some() {
            let (written, batch_next) = tokio::select! {
                () = ctx.cancel.cancelled() => return Ok(()),
                settled = wait(&mut in_flight) => settled,
            };
            settle(ctx, consumer, &mut next, written, batch_next).await?;
        }
        if !ctx.may_act() {
            ctx.cancel.cancelled().await;
            return Ok(());
        }
        let sink = ctx.sink.clone();
        in_flight = Some(InFlight {
            write: AbortOnDropHandle::new(tokio::spawn(async move {
                sink.write_edged_durable(edged).await
            })),
            batch_next,
        });
        answered = Instant::now();
        idle.reset();
    }
}

/// A batch handed to the sink, written by a task of its own while the run reads the next one.
/// Dropped with the run (a stop, a reload, a failure), its task is aborted: whatever it had
/// already queued may still be committed, and is read again by the next run, since its
/// position was never saved.
struct InFlight {
    write: AbortOnDropHandle<Result<super::sink::Outcome, Error>>,
    batch_next: BTreeMap<String, i64>,
}

/// The end of the write in flight, with the offsets its batch moves the position to; never,
/// when there is none. Once it ends, none is in flight.
async fn wait(
    in_flight: &mut Option<InFlight>,
) -> (Result<super::sink::Outcome, Error>, BTreeMap<String, i64>) {
    let Some(batch) = in_flight else {
        return std::future::pending().await;
    };
    let written = (&mut batch.write)
        .await
        .unwrap_or_else(|_| Err(Error::Source("the runtime is shutting down".into())));
    let batch_next = in_flight.take().map(|b| b.batch_next).unwrap_or_default();
    (written, batch_next)
}

/// After the sink settled a batch: its position is saved, then committed to the group.
async fn settle(
    ctx: &RunContext,
    consumer: &KafkaConsumer,
    next: &mut BTreeMap<String, i64>,
    written: Result<super::sink::Outcome, Error>,
    batch_next: BTreeMap<String, i64>,
) -> Result<(), Error> {
    written?;
    next.extend(batch_next.iter().map(|(k, v)| (k.clone(), *v)));
    ctx.cursor.save(&position_of(next)).await?;
    commit_to_group(consumer, &batch_next);
    ctx.health.progress();
    Ok(())
}

/// Partitions of `settings`' topics the run does not read yet, from the brokers' metadata now;
/// none when the brokers do not answer or refuse (the idle check and the consumer report
/// that).
async fn new_partitions(
    settings: &Settings,
    consumer: &Arc<KafkaConsumer>,
    next: &BTreeMap<String, i64>,
) -> Vec<(String, i32)> {
    // Not `partitions`: on a failure it lets the client hand over what it queued, a
    // message included, which a running run must not lose.
    match lookup_partitions(settings, consumer).await {
        Ok(Ok(found)) => unread(found, next),
        Ok(Err(e)) => {
            tracing::debug!(error = %consumer.context().scrub(&e.to_string()), "kafka.partitions_check_failed");
            Vec::new()
        }
        Err(e) => {
            tracing::debug!(error = %e, "kafka.partitions_check_failed");
            Vec::new()
        }
    }
}

/// The partitions of `found` that `next` has no offset for.
fn unread(found: Vec<(String, i32)>, next: &BTreeMap<String, i64>) -> Vec<(String, i32)> {
    found
        .into_iter()
        .filter(|(topic, partition)| !next.contains_key(&key_of(topic, *partition)))
        .collect()
}

/// Adds partitions created since the run started to its assignment, each read from its
/// start: everything in a partition that did not exist when the run began arrived after it.
/// Their offsets are saved (under the worker's epoch) before anything is read from them, as
/// at the start of a run, so a crash right after resumes there too.
///
/// # Errors
/// The position could not be saved, or the client refused the assignment.
async fn take_up_new_partitions(
    settings: &Settings,
    ctx: &RunContext,
    consumer: &Arc<KafkaConsumer>,
    next: &mut BTreeMap<String, i64>,
) -> Result<(), Error> {
    let added = new_partitions(settings, consumer, next).await;
    if added.is_empty() || !ctx.may_act() {
        return Ok(());
    }
    let offsets = match starting_offsets(consumer, &added, &BTreeMap::new(), Start::Earliest).await
    {
        Ok(offsets) => offsets,
        // The brokers did not answer: the next check tries again.
        Err(e) => {
            tracing::debug!(error = %e, "kafka.partitions_check_failed");
            return Ok(());
        }
    };
    let mut grown = next.clone();
    grown.extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
    ctx.cursor.save(&position_of(&grown)).await?;
    let mut list = TopicPartitionList::new();
    for (topic, partition) in &added {
        let offset = offsets[&key_of(topic, *partition)];
        list.add_partition_offset(topic, *partition, Offset::Offset(offset))
            .map_err(|e| Error::Source(format!("assigning partitions: {e}")))?;
    }
    // Manual assignment (no group membership): adding leaves the partitions already read
    // where they are, their fetched messages included.
    consumer
        .incremental_assign(&list)
        .map_err(|e| Error::Source(format!("assigning partitions: {e}")))?;
    *next = grown;
    tracing::info!(
        datasource_id = %ctx.datasource_id,
        partitions = ?added,
        "kafka.partitions_added"
    );
    Ok(())
}

/// Whether every partition's end is at or before the offset the run reads next (the outer
/// error: the runtime stops; the inner: a broker did not answer).
async fn caught_up(
    consumer: &Arc<KafkaConsumer>,
    next: &BTreeMap<String, i64>,
) -> Result<Result<bool, KafkaError>, Error> {
    let next = next.clone();
    blocking(consumer, move |c| {
        for (key, offset) in &next {
            let Some((topic, partition)) = position::offsets_key(key) else {
                continue;
            };
            let (_, high) = c.fetch_watermarks(topic, partition, IDLE_CHECK)?;
            if high > *offset {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

/// Commits the saved offsets to the consumer group too (for Kafka's own tools; the saved
/// position is what runs resume from), without waiting: a failed commit is only logged.
fn commit_to_group(consumer: &KafkaConsumer, offsets: &BTreeMap<String, i64>) {
    let mut list = TopicPartitionList::new();
    for (key, offset) in offsets {
        if let Some((topic, partition)) = position::offsets_key(key) {
            let _ = list.add_partition_offset(topic, partition, Offset::Offset(*offset));
        }
    }
    if let Err(e) = consumer.commit(&list, CommitMode::Async) {
        tracing::debug!(error = %e, "kafka.group_commit_failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"bootstrap_servers": ["localhost:9092"], "topics": ["orders"]})
    }

    fn with(extra: Value) -> Value {
        let mut config = base();
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    #[test]
    fn configs_are_checked_field_by_field() {
        let k = Kafka::new();
        assert!(k.validate(&base()).is_ok());
        assert!(
            k.validate(&with(json!({
                "group_id": "g", "start": 1_700_000_000_000_u64, "key_format": "base64",
                "value_format": "text", "headers": ["trace"],
                "sasl": {"mechanism": "SCRAM-SHA-512", "username": "u", "password_secret": "pw"},
                "tls": {"ca_secret": "ca"}, "batch_max_records": 10, "batch_linger_ms": 0
            })))
            .is_ok()
        );
        let field = |v: Value| k.validate(&v).unwrap_err().field;
        assert_eq!(field(json!({"topics": ["a"]})), "bootstrap_servers");
        assert_eq!(field(json!({"bootstrap_servers": ["h:1"]})), "topics");
        assert_eq!(
            field(with(json!({"bootstrap_servers": ["nohost"]}))),
            "bootstrap_servers.0"
        );
        assert_eq!(
            field(with(json!({"bootstrap_servers": ["h:0"]}))),
            "bootstrap_servers.0"
        );
        assert_eq!(field(with(json!({"topics": ["a b"]}))), "topics.0");
        assert_eq!(field(with(json!({"start": "soon"}))), "start");
        assert_eq!(field(with(json!({"value_format": "xml"}))), "value_format");
        assert_eq!(
            field(with(
                json!({"sasl": {"mechanism": "GSSAPI", "username": "u", "password_secret": "p"}})
            )),
            "sasl.mechanism"
        );
        assert_eq!(
            field(with(
                json!({"sasl": {"mechanism": "PLAIN", "username": "u"}})
            )),
            "sasl.password_secret"
        );
        assert_eq!(
            field(with(json!({"batch_max_records": 0}))),
            "batch_max_records"
        );
        assert_eq!(field(with(json!({"bogus": 1}))), "bogus");
        assert_eq!(field(with(json!({"headers": [""]}))), "headers.0");
        assert_eq!(field(with(json!({"headers": ["a", "a"]}))), "headers.1");
        assert_eq!(field(with(json!({"topics": ["a", "a"]}))), "topics.1");
    }

    #[test]
    fn the_secrets_a_config_names_are_required_and_traced_to_their_field() {
        let k = Kafka::new();
        let config = with(json!({
            "sasl": {"mechanism": "PLAIN", "username": "u", "password_secret": "pw"},
            "tls": {"ca_secret": "ca"}
        }));
        assert_eq!(k.required_secrets(&config), ["pw", "ca"]);
        assert_eq!(
            k.secret_field(&config, "pw").as_deref(),
            Some("sasl.password_secret")
        );
        assert_eq!(
            k.secret_field(&config, "ca").as_deref(),
            Some("tls.ca_secret")
        );
        assert!(k.required_secrets(&base()).is_empty());
        let destinations = k.destinations(&config).unwrap();
        assert_eq!(destinations[0].to_string(), "kafka+tls://localhost:9092");
    }

    #[test]
    fn only_partitions_without_an_offset_are_new() {
        let next: BTreeMap<String, i64> = [("orders:0".to_owned(), 7), ("audit:0".to_owned(), 0)]
            .into_iter()
            .collect();
        let found = vec![
            ("orders".to_owned(), 0),
            ("orders".to_owned(), 1),
            ("audit".to_owned(), 0),
            ("orders".to_owned(), 2),
        ];
        assert_eq!(
            unread(found, &next),
            [("orders".to_owned(), 1), ("orders".to_owned(), 2)]
        );
        assert!(unread(vec![("orders".to_owned(), 0)], &next).is_empty());
    }

    #[test]
    fn keys_and_values_decode_as_configured() {
        assert_eq!(Decoding::Json.decode(br#"{"a":1}"#), Ok(json!({"a": 1})));
        assert!(Decoding::Json.decode(b"{").is_err());
        assert_eq!(Decoding::Text.decode(b"hi"), Ok(json!("hi")));
        assert!(Decoding::Text.decode(&[0xff]).is_err());
        assert_eq!(Decoding::Base64.decode(&[0xff]), Ok(json!("/w==")));
    }

    #[test]
    fn a_saved_position_gives_offsets_and_the_start_for_the_rest() {
        let settings = parse(&base()).unwrap();
        let (offsets, start) = saved(
            Some(&json!({"offsets": {"orders:0": 5, "bad key": 1}, "start": "latest"})),
            &settings,
        );
        assert_eq!(
            offsets.into_iter().collect::<Vec<_>>(),
            [("orders:0".to_owned(), 5)]
        );
        assert_eq!(start, Start::Latest);
        let (offsets, start) = saved(None, &settings);
        assert!(offsets.is_empty());
        assert_eq!(start, Start::Earliest);
        assert!(
            POSITION
                .check(&json!({"offsets": {"orders:0": 5}, "start": 17}))
                .is_ok()
        );
        assert_eq!(
            POSITION
                .check(&json!({"offsets": {"orders": 5}}))
                .unwrap_err()
                .field,
            "offsets"
        );
        assert_eq!(
            POSITION
                .check(&json!({"offsets": {"orders:+1": 5}}))
                .unwrap_err()
                .field,
            "offsets"
        );
        assert_eq!(
            POSITION
                .check(&json!({"offsets": {"orders:1": -5}}))
                .unwrap_err()
                .field,
            "offsets"
        );
        assert_eq!(
            POSITION.check(&json!({"start": "now"})).unwrap_err().field,
            "start"
        );
    }
}
