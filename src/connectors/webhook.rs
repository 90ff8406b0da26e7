//! The `webhook` kind (push): the HTTP port's `POST /ingest/{datasource_id}` hands verified
//! bodies to the datasource's running worker through its inbox.
//!
//! Config: `max_body_bytes` (default 1 MiB), `queue_capacity` (deliveries waiting for the
//! worker; beyond it senders get 429), `signature_header` (default `x-dsreg-signature`).
//! Secret: `webhook_secret`, the HMAC-SHA256 key; the signature header carries
//! `sha256=<hex of HMAC(body)>`.
//!
//! A delivery is answered 202 only once every one of its records is committed or
//! dead-lettered by the sink, so nothing accepted is lost; a full inbox is backpressure (429),
//! a stopped worker is 503.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::sink::Outcome;
use super::{
    BoxFuture, ConfigError, Connector, Error, KindInfo, Mode, RunContext, VERSION_KEYS, integer_in,
};

/// The secret holding the HMAC key.
pub const SECRET: &str = "webhook_secret";
/// Default signature header.
pub const SIGNATURE_HEADER: &str = "x-dsreg-signature";
const DEFAULT_MAX_BODY: usize = 1 << 20;
const MAX_BODY_LIMIT: usize = 64 << 20;
const DEFAULT_QUEUE: usize = 256;

static INFO: LazyLock<KindInfo> = LazyLock::new(|| KindInfo {
    name: "webhook",
    version: "1.0.0",
    summary: "records pushed to POST /ingest/{datasource_id}, HMAC-SHA256 signed",
    config_schema: json!({
        "type": "object",
        "properties": {
            "max_body_bytes": { "type": "integer", "minimum": 1, "maximum": MAX_BODY_LIMIT, "default": DEFAULT_MAX_BODY },
            "queue_capacity": { "type": "integer", "minimum": 1, "maximum": 65_536, "default": DEFAULT_QUEUE },
            "signature_header": { "type": "string", "default": SIGNATURE_HEADER }
        }
    }),
    secrets: &[SECRET],
    mode: Mode::Push,
    can_backfill: false,
});

/// A delivery handed to a worker: records, and where to say what became of them.
pub struct Delivery {
    /// Parsed records.
    pub records: Vec<Value>,
    /// Answered once the records are committed (or refused).
    pub reply: oneshot::Sender<Result<Outcome, String>>,
}

/// A running webhook worker's inbox.
#[derive(Clone)]
pub struct Inbox {
    queue: mpsc::Sender<Delivery>,
    key: Arc<Vec<u8>>,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// The header carrying the signature.
    pub signature_header: String,
    /// Deliveries are accepted only while the worker's lease surely holds.
    lease: super::LeaseCheck,
    /// Delivery ids seen within the tolerance window, with their timestamps.
    seen: Arc<std::sync::Mutex<HashMap<String, i64>>>,
}

/// How far a timestamped signature's `t` may be from the registry's clock, in seconds.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// Delivery ids remembered at once per webhook; beyond it, a delivery with an id is refused
/// until older ones leave the window (memory stays bounded).
const MAX_SEEN_IDS: usize = 100_000;

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("signature_header", &self.signature_header)
            .finish_non_exhaustive()
    }
}

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or wrong signature.
    BadSignature,
    /// A timestamped signature outside the tolerance window.
    Stale,
    /// A delivery id already accepted within the tolerance window.
    Replayed,
    /// The inbox is full.
    Busy,
    /// The worker stopped.
    Stopped,
}

impl Inbox {
    /// Checks `signature` against the body, in constant time: `sha256=<hex>` (HMAC of the
    /// body), or `t=<unix seconds>,v1=<hex>[,id=<delivery id>]` (HMAC of `<t>.<body>`, or of
    /// `<t>.<id>.<body>` with an id), whose `t` must be within
    /// [`SIGNATURE_TOLERANCE_SECS`] of now and whose id must not have been seen within that
    /// window (a replay).
    ///
    /// A delivery id is reserved by the returned [`Reserved`]: kept once the delivery is
    /// accepted ([`Reserved::keep`]), released when it is dropped, so a sender may retry a
    /// delivery that was refused after its signature checked out.
    pub fn verify(&self, body: &[u8], signature: Option<&str>) -> Result<Reserved, Refusal> {
        self.verify_at(body, signature, chrono::Utc::now().timestamp())
    }

    fn verify_at(
        &self,
        body: &[u8],
        signature: Option<&str>,
        now: i64,
    ) -> Result<Reserved, Refusal> {
        let mut reserved = Reserved {
            seen: Arc::clone(&self.seen),
            id: None,
            expires_at: 0,
        };
        let signature = signature.map(str::trim).ok_or(Refusal::BadSignature)?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).map_err(|_| Refusal::BadSignature)?;
        if let Some(hex) = signature.strip_prefix("sha256=") {
            let expected = crate::encoding::hex_decode(hex).ok_or(Refusal::BadSignature)?;
            mac.update(body);
            return mac
                .verify_slice(&expected)
                .map(|()| reserved)
                .map_err(|_| Refusal::BadSignature);
        }
        let (mut t, mut v1, mut id) = (None, None, None);
        for part in signature.split(',') {
            match part.trim().split_once('=') {
                Some(("t", value)) if t.is_none() => t = value.parse::<i64>().ok(),
                Some(("v1", value)) if v1.is_none() => v1 = crate::encoding::hex_decode(value),
                Some(("id", value)) if id.is_none() && !value.is_empty() && value.len() <= 128 => {
                    id = Some(value);
                }
                _ => return Err(Refusal::BadSignature),
            }
        }
        let (Some(t), Some(expected)) = (t, v1) else {
            return Err(Refusal::BadSignature);
        };
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        if let Some(id) = id {
            mac.update(id.as_bytes());
            mac.update(b".");
        }
        mac.update(body);
        mac.verify_slice(&expected)
            .map_err(|_| Refusal::BadSignature)?;
        if (now - t).abs() > SIGNATURE_TOLERANCE_SECS {
            return Err(Refusal::Stale);
        }
        if let Some(id) = id {
            // A map of timestamps: consistent after a panic elsewhere.
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            seen.retain(|_, at| (now - *at).abs() <= SIGNATURE_TOLERANCE_SECS);
            if seen.contains_key(id) {
                return Err(Refusal::Replayed);
            }
            if seen.len() >= MAX_SEEN_IDS {
                return Err(Refusal::Busy);
            }
            seen.insert(id.to_owned(), t);
            reserved.id = Some(id.to_owned());
            reserved.expires_at = t + SIGNATURE_TOLERANCE_SECS;
        }
        Ok(reserved)
    }

    /// Hands records to the worker without waiting for room.
    pub fn offer(
        &self,
        records: Vec<Value>,
    ) -> Result<oneshot::Receiver<Result<Outcome, String>>, Refusal> {
        if !self.lease.holds() {
            return Err(Refusal::Stopped);
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Delivery { records, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Refusal::Busy,
                mpsc::error::TrySendError::Closed(_) => Refusal::Stopped,
            })?;
        Ok(answer)
    }
}

/// A delivery id held while its delivery is in hand; released on drop unless kept.
#[derive(Debug)]
pub struct Reserved {
    seen: Arc<std::sync::Mutex<HashMap<String, i64>>>,
    id: Option<String>,
    /// When the id leaves the window (Unix seconds): its signature's `t` is stale by then.
    expires_at: i64,
}

impl Reserved {
    /// The delivery id and when it leaves the tolerance window (Unix seconds), when the
    /// signature carried one: the id to claim across instances as well
    /// ([`crate::db::repository::deliveries::claim`]).
    pub fn delivery_id(&self) -> Option<(&str, i64)> {
        self.id.as_deref().map(|id| (id, self.expires_at))
    }

    /// The delivery was accepted: its id stays seen for the tolerance window.
    pub fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        }
    }
}

/// The signature a sender puts in the header for `body` under `key`: `sha256=<hex>`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The inboxes of the running webhook workers, by datasource; shared with the HTTP port.
#[derive(Clone, Default)]
pub struct Ingress(Arc<RwLock<HashMap<Uuid, Inbox>>>);

impl Ingress {
    /// The inbox of a running worker.
    pub fn inbox(&self, datasource: Uuid) -> Option<Inbox> {
        self.0.read().ok()?.get(&datasource).cloned()
    }

    fn register(&self, datasource: Uuid, inbox: Inbox) -> Registration {
        if let Ok(mut map) = self.0.write() {
            map.insert(datasource, inbox.clone());
        }
        Registration {
            ingress: self.clone(),
            datasource,
            queue: inbox.queue,
        }
    }
}

/// Removes an inbox when its worker run ends (unless a newer run replaced it).
struct Registration {
    ingress: Ingress,
    datasource: Uuid,
    queue: mpsc::Sender<Delivery>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.ingress.0.write()
            && map
                .get(&self.datasource)
                .is_some_and(|i| i.queue.same_channel(&self.queue))
        {
            map.remove(&self.datasource);
        }
    }
}

/// The `webhook` connector.
#[derive(Debug, Default)]
pub struct Webhook;

impl Webhook {
    /// The kind.
    pub fn new() -> Self {
        Self
    }
}

struct Settings {
    max_body_bytes: usize,
    queue_capacity: usize,
    signature_header: String,
}

fn parse(config: &Value) -> Result<Settings, ConfigError> {
    let object = config
        .as_object()
        .ok_or_else(|| ConfigError::new("", "must be a JSON object"))?;
    if let Some(unknown) = object.keys().find(|k| {
        !matches!(
            k.as_str(),
            "max_body_bytes" | "queue_capacity" | "signature_header"
        ) && !VERSION_KEYS.contains(&k.as_str())
    }) {
        return Err(ConfigError::new(
            unknown.clone(),
            "unknown field for kind webhook",
        ));
    }
    let max_body_bytes = integer_in(
        config,
        "max_body_bytes",
        DEFAULT_MAX_BODY as u64,
        1,
        MAX_BODY_LIMIT as u64,
    )?;
    let queue_capacity = integer_in(config, "queue_capacity", DEFAULT_QUEUE as u64, 1, 65_536)?;
    let signature_header = match config.get("signature_header") {
        None | Some(Value::Null) => SIGNATURE_HEADER.to_owned(),
        Some(Value::String(s)) if axum::http::HeaderName::from_bytes(s.as_bytes()).is_ok() => {
            s.to_ascii_lowercase()
        }
        Some(other) => {
            return Err(ConfigError::new(
                "signature_header",
                format!("is not a header name: {other}"),
            ));
        }
    };
    Ok(Settings {
        max_body_bytes: max_body_bytes as usize,
        queue_capacity: queue_capacity as usize,
        signature_header,
    })
}

impl Connector for Webhook {
    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        parse(config).map(|_| ())
    }

    fn stall_after(&self, _config: &Value) -> Option<Duration> {
        // No traffic is not a fault of a push source.
        None
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        Box::pin(async move {
            let settings = parse(&ctx.config)?;
            let key = ctx
                .secret(SECRET)
                .ok_or_else(|| Error::Config(ConfigError::new(SECRET, "secret is missing")))?
                .as_bytes()
                .to_vec();
            let (queue, mut deliveries) = mpsc::channel(settings.queue_capacity);
            let _registration = ctx.ingress.register(
                ctx.datasource_id,
                Inbox {
                    queue,
                    key: Arc::new(key),
                    max_body_bytes: settings.max_body_bytes,
                    signature_header: settings.signature_header,
                    lease: ctx.lease.clone(),
                    seen: Arc::default(),
                },
            );
            // Bound: deliveries reach this run from now on.
            ctx.health.working();
            // Deliveries are transformed and committed concurrently (the sink groups their
            // commits); each is answered when its own records are committed.
            let mut inflight = tokio::task::JoinSet::new();
            let mut failed = None;
            loop {
                let delivery = tokio::select! {
                    () = ctx.cancel.cancelled() => break,
                    Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                        if let Ok(Err(e)) = done {
                            failed = Some(e);
                            break;
                        }
                        continue;
                    }
                    // At most `queue_capacity` deliveries in flight: beyond that the inbox
                    // fills and senders get 429.
                    d = deliveries.recv(), if inflight.len() < settings.queue_capacity => match d {
                        Some(d) => d,
                        None => break,
                    },
                };
                let (sink, health) = (ctx.sink.clone(), ctx.health.clone());
                inflight.spawn(async move {
                    match sink.write_durable(delivery.records).await {
                        Ok(outcome) => {
                            // The sink counted what it committed and dead-lettered.
                            health.progress();
                            let _ = delivery.reply.send(Ok(outcome));
                            Ok(())
                        }
                        Err(e) => {
                            let _ = delivery.reply.send(Err(e.to_string()));
                            Err(e)
                        }
                    }
                });
            }
            // What was handed to the sink is answered once committed.
            while let Some(done) = inflight.join_next().await {
                if let Ok(Err(e)) = done {
                    failed.get_or_insert(e);
                }
            }
            // Deliveries still queued were never accepted: their senders get 503 and retry.
            deliveries.close();
            while let Ok(d) = deliveries.try_recv() {
                let _ = d.reply.send(Err("the worker stopped".into()));
            }
            failed.map_or(Ok(()), Err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `t=…,v1=…[,id=…]` for `body` signed at `t`.
    fn stamped(key: &[u8], t: i64, id: Option<&str>, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{t}.").as_bytes());
        if let Some(id) = id {
            mac.update(format!("{id}.").as_bytes());
        }
        mac.update(body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        match id {
            Some(id) => format!("t={t},v1={hex},id={id}"),
            None => format!("t={t},v1={hex}"),
        }
    }

    #[test]
    fn timestamped_signatures_are_checked_against_the_window_and_ids_are_not_replayed() {
        let key = b"webhook-key";
        let (inbox, _rx) = inbox(key);
        let body = br#"{"n":1}"#;
        let now = 1_800_000_000;
        let verify = |signature: &str| inbox.verify_at(body, Some(signature), now);
        // The plain form still works; the timestamped one within the window.
        assert!(inbox.verify_at(body, Some(&sign(key, body)), now).is_ok());
        assert!(verify(&stamped(key, now - 299, None, body)).is_ok());
        assert_eq!(
            verify(&stamped(key, now - 301, None, body)).unwrap_err(),
            Refusal::Stale
        );
        assert_eq!(
            verify(&stamped(key, now + 301, None, body)).unwrap_err(),
            Refusal::Stale
        );
        assert_eq!(
            verify(&stamped(b"other", now, None, body)).unwrap_err(),
            Refusal::BadSignature
        );
        // The timestamp and the id are signed: changing either breaks the signature.
        let signed = stamped(key, now, Some("d-1"), body);
        assert_eq!(
            verify(&signed.replace("id=d-1", "id=d-2")).unwrap_err(),
            Refusal::BadSignature
        );
        assert_eq!(
            verify(&signed.replace(&format!("t={now}"), &format!("t={}", now - 1))).unwrap_err(),
            Refusal::BadSignature
        );
        for garbage in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=00,t=2", "sha1=00"] {
            assert_eq!(
                verify(garbage).unwrap_err(),
                Refusal::BadSignature,
                "{garbage}"
            );
        }
        // A delivery refused after its signature checked out may be sent again.
        drop(verify(&signed).unwrap());
        let accepted = verify(&signed).unwrap();
        // Once accepted, the same id is a replay, whatever else is held.
        assert_eq!(verify(&signed).unwrap_err(), Refusal::Replayed);
        accepted.keep();
        assert_eq!(verify(&signed).unwrap_err(), Refusal::Replayed);
        // Another id is fine.
        verify(&stamped(key, now, Some("d-2"), body))
            .unwrap()
            .keep();
    }

    fn inbox(key: &[u8]) -> (Inbox, mpsc::Receiver<Delivery>) {
        let (queue, rx) = mpsc::channel(1);
        (
            Inbox {
                queue,
                key: Arc::new(key.to_vec()),
                max_body_bytes: 10,
                signature_header: SIGNATURE_HEADER.into(),
                lease: crate::connectors::LeaseCheck::always(),
                seen: Arc::default(),
            },
            rx,
        )
    }

    #[test]
    fn signatures_verify_only_for_the_same_key_and_body() {
        let (inbox, _rx) = inbox(b"k1");
        let body = br#"{"a":1}"#;
        assert!(inbox.verify(body, Some(&sign(b"k1", body))).is_ok());
        assert_eq!(
            inbox.verify(body, Some(&sign(b"k2", body))).unwrap_err(),
            Refusal::BadSignature
        );
        assert_eq!(
            inbox.verify(b"{}", Some(&sign(b"k1", body))).unwrap_err(),
            Refusal::BadSignature
        );
        for bad in [
            None,
            Some(""),
            Some("sha256=zz"),
            Some("md5=00"),
            Some("sha256=abc"),
        ] {
            assert_eq!(
                inbox.verify(body, bad).unwrap_err(),
                Refusal::BadSignature,
                "{bad:?}"
            );
        }
    }

    /// A signature spelled with a sign in a hex pair (`+a` for `0a`) is not the signature.
    #[test]
    fn a_signature_with_a_signed_hex_pair_is_refused() {
        let key = b"k1";
        let (inbox, _rx) = inbox(key);
        let now = 1_800_000_000;
        // A body whose signatures both hold a pair starting with `0` at a pair boundary.
        let leading_zero = |hex: &str| {
            (0..hex.len())
                .step_by(2)
                .find(|i| hex.as_bytes()[*i] == b'0')
        };
        let (body, plain, stamped_form, at_plain, at_stamped) = (0..10_000u32)
            .find_map(|n| {
                let body = format!("{{\"n\":{n}}}").into_bytes();
                let plain = sign(key, &body);
                let stamped_form = stamped(key, now, None, &body);
                let at_plain = leading_zero(plain.strip_prefix("sha256=")?)? + "sha256=".len();
                let v1 = stamped_form.find("v1=")? + 3;
                let at_stamped = leading_zero(&stamped_form[v1..])? + v1;
                Some((body, plain, stamped_form, at_plain, at_stamped))
            })
            .expect("some body signs with a 0 at a pair boundary");
        let signed_pair = |signature: &str, at: usize| {
            let mut s = signature.to_owned();
            s.replace_range(at..=at, "+");
            s
        };
        assert!(inbox.verify_at(&body, Some(&plain), now).is_ok());
        assert!(
            inbox
                .verify_at(
                    &body,
                    Some(&plain.to_ascii_uppercase().replace("SHA256=", "sha256=")),
                    now
                )
                .is_ok(),
            "either case"
        );
        assert_eq!(
            inbox
                .verify_at(&body, Some(&signed_pair(&plain, at_plain)), now)
                .unwrap_err(),
            Refusal::BadSignature
        );
        assert_eq!(
            inbox
                .verify_at(&body, Some(&signed_pair(&stamped_form, at_stamped)), now)
                .unwrap_err(),
            Refusal::BadSignature
        );
        assert!(inbox.verify_at(&body, Some(&stamped_form), now).is_ok());
    }

    #[test]
    fn an_inbox_whose_lease_lapsed_accepts_nothing() {
        let (mut inbox, mut rx) = inbox(b"k");
        inbox.lease = crate::connectors::LeaseCheck::new(|| false);
        assert_eq!(inbox.offer(vec![json!(1)]).unwrap_err(), Refusal::Stopped);
        assert!(rx.try_recv().is_err(), "nothing reached the worker");
    }

    #[test]
    fn a_full_inbox_is_busy_and_a_closed_one_stopped() {
        let (inbox, rx) = inbox(b"k");
        let _first = inbox.offer(vec![json!(1)]).unwrap();
        assert_eq!(inbox.offer(vec![json!(2)]).unwrap_err(), Refusal::Busy);
        drop(rx);
        assert_eq!(inbox.offer(vec![json!(3)]).unwrap_err(), Refusal::Stopped);
    }

    #[test]
    fn configs_are_checked() {
        let w = Webhook::new();
        assert!(w.validate(&json!({})).is_ok());
        assert_eq!(
            w.validate(&json!({"max_body_bytes": 0})).unwrap_err().field,
            "max_body_bytes"
        );
        assert_eq!(
            w.validate(&json!({"signature_header": "bad header"}))
                .unwrap_err()
                .field,
            "signature_header"
        );
        assert_eq!(w.required_secrets(&json!({})), [SECRET]);
    }
}
