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
//!
//! TLS is the source's ([`super::kafka_client`]): the system roots, or a CA given as PEM
//! (`--sink-kafka-ca-file`), checked as the source checks its CA. A send that fails while the
//! TLS handshake with the brokers fails (a certificate the CA does not verify) is
//! [`SendFailure::Unusable`]: retrying does not help until someone fixes the settings, so the
//! sink hands the records back to their writers with the reason instead of retrying them.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use uuid::Uuid;

use super::kafka_client::{Context, Trust, check_ca, client_config, creation_error};

/// How long librdkafka keeps trying to deliver one message before it reports failure: under
/// the sink's own attempt timeout, so a failure is reported, not cut off.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(25);

/// The compressions librdkafka offers here.
pub const COMPRESSIONS: &[&str] = &["none", "gzip", "snappy", "lz4", "zstd"];

/// A producer to one topic.
pub struct KafkaTarget {
    producer: FutureProducer<Context>,
    /// The producer's context: what it reports of failed handshakes.
    context: Context,
    /// The brokers, as configured (for messages).
    brokers: String,
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
    /// Nothing was delivered while the TLS handshake with the brokers failed: the settings
    /// are wrong (a CA that does not verify the brokers), and retrying does not help.
    Unusable(String),
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
    /// A producer to `topic` at `brokers` (`host:port,…`), over TLS trusting `tls` when set.
    ///
    /// # Errors
    /// A topic that is no topic name, an unknown compression, a CA that holds no certificate,
    /// or a setting the client refuses, named without its value.
    pub fn new(
        brokers: &str,
        topic: &str,
        key_field: Option<String>,
        compression: &str,
        tls: Option<Trust>,
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
        if let Some(Trust::Ca(pem)) = &tls {
            check_ca(pem).map_err(|reason| format!("--sink-kafka-ca-file {reason}"))?;
        }
        let context = Context::new(None);
        let producer: FutureProducer<Context> = client_config(brokers, tls.as_ref(), None)
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
            .create_with_context(context.clone())
            .map_err(|e| creation_error(&e, "the Kafka sink's producer"))?;
        Ok(Self {
            producer,
            context,
            brokers: brokers.to_owned(),
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
        // A handshake that failed before this send says nothing about it.
        self.context.forget_handshake();
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
        let mut delivered = false;
        for delivery in pending {
            let failure = match delivery.await {
                Ok(Ok(_)) => {
                    delivered = true;
                    continue;
                }
                Ok(Err((e, _))) => classify(&e),
                Err(_) => SendFailure::Transient("the producer shut down".into()),
            };
            // Every delivery is awaited, so none is left behind; the first failure answers.
            first.get_or_insert(failure);
        }
        match (first, self.context.handshake_failure()) {
            (None, _) => Ok(()),
            (Some(SendFailure::Transient(_)), Some(handshake)) if !delivered => {
                Err(SendFailure::Unusable(format!(
                    "the Kafka sink: the TLS handshake with {} failed: {handshake}",
                    self.brokers
                )))
            }
            (Some(failure), _) => Err(failure),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_are_checked_and_a_bad_ca_is_named_without_its_text() {
        let new = |topic: &str, compression: &str, tls: Option<Trust>| {
            KafkaTarget::new("localhost:9092", topic, None, compression, tls).err()
        };
        assert!(new("out", "lz4", None).is_none());
        assert!(new("out", "lz4", Some(Trust::SystemRoots)).is_none());
        assert!(
            new("a b", "lz4", None)
                .unwrap()
                .contains("--sink-kafka-topic")
        );
        assert!(
            new("out", "brotli", None)
                .unwrap()
                .contains("--sink-kafka-compression")
        );
        let text = "not a certificate at all";
        let refused = new("out", "lz4", Some(Trust::Ca(text.into()))).unwrap();
        assert!(refused.contains("--sink-kafka-ca-file"), "{refused}");
        assert!(!refused.contains(text), "{refused}");
    }
}
