//! The listener: a dedicated connection (never from the pool) that LISTENs on
//! [`super::CHANNEL`] and turns notifications into [`Signal`]s for the supervisor.
//!
//! A notification is a hint, never a delivery: its payload may name an event and its
//! datasource to look at first, and anything unparsable is counted, logged and still wakes
//! the reader. The first
//! connect fails fast; after that the listener reconnects with capped exponential backoff and
//! jitter, and every (re)connect is followed by [`Signal::Reconnected`] so the supervisor
//! catches up on whatever it missed. A half-open connection is found by TCP keepalive and a
//! periodic query on the connection itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::notifications::{Listening, listen_with};
use super::selftest::PROBE_CHANNEL;
use super::{CHANNEL, STATE_CHANNEL};
use crate::backoff::{Exponential, Retries, sleep_unless};
use crate::db::Error;

/// Malformed-notification log lines: one a second at most.
static MALFORMED_LINES: crate::telemetry::throttle::Throttle =
    crate::telemetry::throttle::Throttle::new(1);

/// What the listener tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Something was committed that the payload does not name (a burst folded into one
    /// notification, an event of no datasource, a payload that does not parse): read the
    /// outbox now.
    Wake,
    /// Event `event` of `datasource` was committed, by a writer in the W3C trace `trace` when
    /// it was traced: the datasource can be looked at without reading the outbox first.
    Event {
        /// The event's id.
        event: i64,
        /// Its datasource.
        datasource: Uuid,
        /// Its writer's trace context, when well formed.
        trace: Option<String>,
    },
    /// The connection was (re)established after a gap: catch up on everything.
    Reconnected,
}

/// Counters the listener keeps (exported as metrics).
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Notifications received.
    pub received: AtomicU64,
    /// Notifications whose payload could not be parsed.
    pub malformed: AtomicU64,
    /// Reconnects after the first connect.
    pub reconnects: AtomicU64,
    /// Whether the connection is up now.
    pub connected: AtomicBool,
    /// Bumped on every notification.
    pub activity: super::Activity,
    /// Whether notifications sent through the pool arrive here ([`super::selftest`]).
    pub path: super::selftest::NotificationPath,
}

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// The database URL.
    pub url: String,
    /// How often the connection is checked with a query.
    pub check_interval: Duration,
    /// How long that check may take.
    pub check_timeout: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Reconnect delay cap.
    pub backoff_max: Duration,
    /// The connection's bounds (connect, keepalives, statements).
    pub connect: crate::db::ConnectOptions,
}

impl ListenerConfig {
    /// Defaults for `url`: checked every 2 s, reconnects from 100 ms up to 5 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            check_interval: Duration::from_secs(2),
            check_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect: crate::db::ConnectOptions::default(),
        }
    }
}

/// A connected listener.
pub struct Listener {
    config: ListenerConfig,
    stats: Arc<ListenerStats>,
    connection: Option<Listening>,
}

/// Parses a notification payload into the signal it carries: the datasource it names and,
/// when the writer was traced, its trace context (dropped unless well formed).
///
/// # Errors
/// The payload is not one the trigger writes.
pub fn parse_payload(payload: &str) -> Result<Signal, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Payload {
        #[serde(default)]
        id: Option<i64>,
        #[serde(default)]
        datasource_id: Option<Uuid>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        more: Option<bool>,
        #[serde(default)]
        traceparent: Option<String>,
    }
    if payload.len() > 1024 {
        return Err(format!("payload of {} bytes", payload.len()));
    }
    let parsed: Payload = serde_json::from_str(payload).map_err(|e| e.to_string())?;
    match parsed {
        Payload {
            more: Some(true), ..
        } => Ok(Signal::Wake),
        Payload {
            id: Some(event),
            kind: Some(_),
            datasource_id: Some(datasource),
            traceparent,
            ..
        } => Ok(Signal::Event {
            event,
            datasource,
            trace: traceparent.and_then(|t| crate::telemetry::normalized_traceparent(&t)),
        }),
        Payload {
            id: Some(_),
            kind: Some(_),
            datasource_id: None,
            ..
        } => Ok(Signal::Wake),
        _ => Err("neither an event nor a 'more' marker".to_owned()),
    }
}

async fn connect(config: &ListenerConfig) -> Result<Listening, Error> {
    // The bounds every connection has: the whole startup within the connect timeout,
    // keepalives for a peer gone silent while nothing is sent.
    let mut target = crate::db::Target::parse_with(&config.url, &config.connect)?;
    target.config.application_name("dsreg-listener");
    // Notifications come from the primary only: unless the URL says otherwise, a multi-host
    // URL (`host=a,b`) finds the read-write server, and after a failover the new one.
    if !config.url.contains("target_session_attrs") {
        target
            .config
            .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    let listening = listen_with(&target, CHANNEL).await?;
    listening
        .client
        .batch_execute(&format!("LISTEN {STATE_CHANNEL}; LISTEN {PROBE_CHANNEL}"))
        .await?;
    Ok(listening)
}

/// The datasources a state notification names; `None` for "many" (`*`) or anything that does
/// not parse (both wake every watcher).
fn parse_state_payload(payload: &str) -> Option<Vec<Uuid>> {
    if payload.len() > 8_000 {
        return None;
    }
    payload
        .split(',')
        .map(|id| Uuid::parse_str(id.trim()).ok())
        .collect()
}

impl Listener {
    /// Connects and LISTENs, failing fast if the database cannot be reached.
    ///
    /// # Errors
    /// [`Error::Unavailable`].
    pub async fn connect(config: ListenerConfig, stats: Arc<ListenerStats>) -> Result<Self, Error> {
        let connection = connect(&config).await?;
        stats.connected.store(true, Ordering::Relaxed);
        Ok(Self {
            config,
            stats,
            connection: Some(connection),
        })
    }

    /// Forwards signals until `shutdown` or until the supervisor is gone.
    pub async fn run(
        mut self,
        signals: mpsc::UnboundedSender<Signal>,
        shutdown: CancellationToken,
    ) {
        let mut retries = Retries::new(Exponential::new(
            self.config.backoff_base,
            self.config.backoff_max,
        ));
        loop {
            let Some(connected) = self.connection.take() else {
                let delay = retries.failed(rand::random::<f64>());
                let attempt = retries.failures();
                tracing::info!(
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    "listener reconnecting"
                );
                if !sleep_unless(delay, &shutdown).await {
                    return;
                }
                let reconnect = tracing::info_span!("listener.reconnect", attempt);
                let connecting = connect(&self.config).instrument(reconnect);
                let connected = tokio::select! {
                    () = shutdown.cancelled() => return,
                    connected = connecting => connected,
                };
                match connected {
                    Ok(c) => {
                        retries.succeeded();
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.stats.connected.store(true, Ordering::Relaxed);
                        tracing::info!("listener reconnected");
                        self.connection = Some(c);
                        if signals.send(Signal::Reconnected).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(attempt, error = %e, "listener reconnect failed"),
                }
                continue;
            };
            let reason = self.listen(connected, &signals, &shutdown).await;
            self.stats.connected.store(false, Ordering::Relaxed);
            match reason {
                None => return,
                Some(reason) => tracing::warn!(reason, "listener connection lost"),
            }
        }
    }

    /// Serves one connection; returns why it ended (`None`: shutdown or no supervisor).
    async fn listen(
        &self,
        mut connected: Listening,
        signals: &mpsc::UnboundedSender<Signal>,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                message = connected.notifications.recv() => match message {
                    Some(notification) if notification.channel() == PROBE_CHANNEL => {
                        self.stats.path.received(notification.payload());
                    }
                    Some(notification) if notification.channel() == STATE_CHANNEL => {
                        // Worker states written (by any instance): wake waits and watches only.
                        match parse_state_payload(notification.payload()) {
                            Some(ids) => self.stats.activity.bump_for(ids),
                            None => self.stats.activity.bump(),
                        }
                    }
                    Some(notification) => {
                        let payload = notification.payload();
                        self.stats.received.fetch_add(1, Ordering::Relaxed);
                        let signal = parse_payload(payload).unwrap_or_else(|reason| {
                            let total = self.stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                            // Any role that can connect can send these: one line a second at most,
                            // with what was held back; the counter has them all.
                            if let Some(suppressed) = MALFORMED_LINES.admit() {
                                tracing::warn!(
                                    reason,
                                    bytes = payload.len(),
                                    suppressed,
                                    total,
                                    "malformed notification on {CHANNEL}; treated as a wake-up"
                                );
                            }
                            Signal::Wake
                        });
                        match &signal {
                            Signal::Event { datasource, .. } => {
                                self.stats.activity.bump_for([*datasource]);
                            }
                            Signal::Wake | Signal::Reconnected => self.stats.activity.bump(),
                        }
                        if signals.send(signal).is_err() {
                            return None;
                        }
                    }
                    None => return Some("connection closed".to_owned()),
                },
                _ = check.tick() => {
                    let probe = tokio::time::timeout(self.config.check_timeout, connected.client.simple_query("SELECT 1"));
                    match probe.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(e.to_string()),
                        Err(_) => return Some(format!("no answer within {:?}", self.config.check_timeout)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_payloads_name_datasources_or_everyone() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(parse_state_payload(&format!("{a},{b}")), Some(vec![a, b]));
        assert_eq!(parse_state_payload("*"), None);
        assert_eq!(parse_state_payload(&format!("{a},nope")), None);
        assert_eq!(parse_state_payload(&"x".repeat(9_000)), None);
    }

    #[test]
    fn payloads_from_the_trigger_parse_and_anything_else_is_refused() {
        let id = Uuid::new_v4();
        let event = format!(r#"{{"id": 7, "datasource_id": "{id}", "type": "published"}}"#);
        let named = |event: i64, trace: Option<&str>| Signal::Event {
            event,
            datasource: id,
            trace: trace.map(str::to_owned),
        };
        assert_eq!(parse_payload(&event), Ok(named(7, None)));
        assert_eq!(
            parse_payload(r#"{"id": 8, "datasource_id": null, "type": "reload_requested"}"#),
            Ok(Signal::Wake)
        );
        assert_eq!(parse_payload(r#"{"more":true}"#), Ok(Signal::Wake));
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = format!(
            r#"{{"id": 9, "datasource_id": "{id}", "type": "published", "traceparent": "{trace}"}}"#
        );
        assert_eq!(parse_payload(&traced), Ok(named(9, Some(trace))));
        // A later W3C version is read as the gRPC header is, and handed on as version 00.
        let later = format!(
            r#"{{"id": 9, "datasource_id": "{id}", "type": "published", "traceparent": "01{}"}}"#,
            &trace[2..]
        );
        assert_eq!(parse_payload(&later), Ok(named(9, Some(trace))));
        // A malformed trace context is ignored, the wake-up kept.
        let forged = format!(
            r#"{{"id": 9, "datasource_id": "{id}", "type": "published", "traceparent": "x\nEVIL"}}"#
        );
        assert_eq!(parse_payload(&forged), Ok(named(9, None)));
        for bad in [
            "garbage",
            "",
            "{}",
            r#"{"id": 1, "datasource_id": "not-a-uuid", "type": "x"}"#,
            r#"{"id": 1, "type": "x", "config": {"password": "p"}}"#,
            &"x".repeat(5000),
        ] {
            assert!(parse_payload(bad).is_err(), "{bad:.40} should be refused");
        }
    }
}
