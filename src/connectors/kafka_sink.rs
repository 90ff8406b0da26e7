//! The `kafka` sink target: each record, as its JSON text, to one topic, keyed by a record
//! field when one is configured, with the writing worker's datasource, version and fencing
//! epoch as headers (`dsreg-datasource-id`, `dsreg-version`, `dsreg-epoch`).
//!
//! The producer is idempotent with `acks=all` (a broker's retry never writes a message twice
//! within a producer session), batches and compresses as librdkafka does (`compression`:
//! `lz4` by default), and retries within [`MESSAGE_TIMEOUT`] with its own backoff; past that the
//! sink's per-datasource backoff takes over (see [`super::sink`]). What the brokers refuse for
//! good (a message too large, an invalid record) is split out and dead-lettered by the sink.
//! It owns no lease logic: the sink asks which leases hold before anything is sent.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use uuid::Uuid;

/// How long librdkafka keeps trying to deliver one message before it reports failure: under
/// the sink's own attempt timeout, so a failure is reported, not cut off.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(25);

/// The compressions librdkafka offers here.
pub const COMPRESSIONS: &[&str] = &["none", "gzip", "snappy", "lz4", "zstd"];

/// A producer to one topic.
pub struct KafkaTarget {
    producer: FutureProducer,
    topic: String,
    key_field: Option<String>,
}

/// Why records were not all delivered.
#[derive(Debug)]
pub enum SendFailure {
    /// The brokers refuse this data for good; the same records fail again.
    Refused(String),
    /// May succeed later (brokers unreachable, a timeout, a leader moving).
    Transient(String),
}

/// One record to send and who writes it.
pub struct Outgoing<'a> {
    /// The writing worker's datasource.
    pub datasource_id: Uuid,
    /// Its version.
    pub version: i32,
    /// Its lease's fencing epoch.
    pub epoch: i64,
    /// The record.
    pub record: &'a Value,
}

impl KafkaTarget {
    /// A producer to `topic` at `brokers` (`host:port,…`).
    ///
    /// # Errors
    /// A setting the client refuses, named without its value.
    pub fn new(
        brokers: &str,
        topic: &str,
        key_field: Option<String>,
        compression: &str,
    ) -> Result<Self, String> {
        if !super::position::is_topic_name(topic) {
            return Err(format!("--sink-kafka-topic: {topic:?} is not a topic name"));
        }
        if !COMPRESSIONS.contains(&compression) {
            return Err(format!(
                "--sink-kafka-compression must be one of {}",
                COMPRESSIONS.join(", ")
            ));
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", compression)
            .set("linger.ms", "5")
            .set("retry.backoff.ms", "100")
            .set("retry.backoff.max.ms", "2000")
            .set("reconnect.backoff.max.ms", "2000")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            )
            .create()
            .map_err(|e| match e {
                KafkaError::ClientConfig(_, description, key, _) => {
                    format!("the Kafka sink's {key}: {description}")
                }
                other => format!("the Kafka sink's producer: {other}"),
            })?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            key_field,
        })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The key of `record`: its key field as text (a string as it is, anything else as its
    /// JSON text); none when the field is not configured or missing.
    fn key_of(&self, record: &Value) -> Option<String> {
        let value = record.get(self.key_field.as_deref()?)?;
        Some(match value {
            Value::String(s) => s.clone(),
            Value::Null => return None,
            other => other.to_string(),
        })
    }

    /// Sends every record and waits until each is acknowledged by all in-sync replicas.
    ///
    /// # Errors
    /// The first failure: refused when the brokers refuse the data itself, else transient.
    /// Records before or after it may have been delivered (at least once).
    pub async fn send(&self, records: &[Outgoing<'_>]) -> Result<(), SendFailure> {
        let mut pending = Vec::with_capacity(records.len());
        for out in records {
            let payload = out.record.to_string();
            let key = self.key_of(out.record);
            let datasource = out.datasource_id.to_string();
            let version = out.version.to_string();
            let epoch = out.epoch.to_string();
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "dsreg-datasource-id",
                    value: Some(datasource.as_str()),
                })
                .insert(Header {
                    key: "dsreg-version",
                    value: Some(version.as_str()),
                })
                .insert(Header {
                    key: "dsreg-epoch",
                    value: Some(epoch.as_str()),
                });
            let mut record = FutureRecord::to(&self.topic)
                .payload(&payload)
                .headers(headers);
            if let Some(key) = &key {
                record = record.key(key);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The client's queue is full: let deliveries drain first.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(classify(&e)),
                }
            }
        }
        let mut first = None;
        for delivery in pending {
            let failure = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => classify(&e),
                Err(_) => SendFailure::Transient("the producer shut down".into()),
            };
            // Every delivery is awaited, so none is left behind; the first failure answers.
            first.get_or_insert(failure);
        }
        first.map_or(Ok(()), Err)
    }
}

fn classify(e: &KafkaError) -> SendFailure {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => SendFailure::Refused(format!("the brokers refused the record: {e}")),
        _ => SendFailure::Transient(format!("the Kafka sink: {e}")),
    }
}
