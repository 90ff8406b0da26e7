//! The `generator` kind: synthetic records at a configured rate, for demos, tests and load.
//!
//! Config: `rate_per_sec` (default 1; 0 idles; otherwise from [`MIN_RATE`] to [`MAX_RATE`]),
//! `count` (stop emitting after this many),
//! `template` (an object merged into every record, which also carries `seq`).
//!
//! Its source position is `{"seq": n}`: every run numbers its records from `n` (0 when none
//! is set). A generator only reads it; it does not save its progress, so every run starts
//! from the position an operator set (`ResetSourcePosition`), not from where the last ended.

use std::sync::LazyLock;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{
    BoxFuture, ConfigError, Connector, Error, KindInfo, Mode, RunContext, VERSION_KEYS,
    optional_number,
};

/// Highest accepted rate.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Lowest accepted rate other than 0: one record every 1,000 s. Below it the tick and the
/// stall limit (both `1 / rate`) leave what a `Duration` can hold, and a generator that slow
/// is an idle one.
pub const MIN_RATE: f64 = 0.001;
/// Shortest pause between batches; higher rates emit several records per tick.
const MIN_TICK: Duration = Duration::from_millis(10);

static INFO: LazyLock<KindInfo> = LazyLock::new(|| KindInfo {
    name: "generator",
    version: "1.0.0",
    summary: "synthetic records at a configured rate",
    config_schema: json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "rate_per_sec": {
                "type": "number",
                "maximum": MAX_RATE,
                "anyOf": [{ "const": 0 }, { "minimum": MIN_RATE }],
                "default": 1
            },
            "count": { "type": "integer", "minimum": 0 },
            "template": { "type": "object" }
        }
    }),
    secrets: &[],
    mode: Mode::Pull,
    can_backfill: false,
});

/// The generator's position: where a run's numbering starts.
static POSITION: super::position::Format = super::position::Format {
    summary: "the seq every run of the generator numbers its first record with; the generator \
              reads it and never saves it",
    fields: &[super::position::Field {
        name: "seq",
        shape: super::position::Shape::Count,
        meaning: "the seq of the first record of each run (then seq + 1, …); missing: 0",
    }],
};

/// The `generator` connector.
#[derive(Debug, Default)]
pub struct Generator;

impl Generator {
    /// The kind.
    pub fn new() -> Self {
        Self
    }
}

struct Settings {
    rate: f64,
    count: Option<u64>,
    template: Map<String, Value>,
}

fn parse(config: &Value) -> Result<Settings, ConfigError> {
    let object = config
        .as_object()
        .ok_or_else(|| ConfigError::new("", "must be a JSON object"))?;
    for key in object.keys() {
        if !matches!(key.as_str(), "rate_per_sec" | "count" | "template")
            && !VERSION_KEYS.contains(&key.as_str())
        {
            return Err(ConfigError::new(
                key.clone(),
                "unknown field for kind generator",
            ));
        }
    }
    let rate = optional_number(config, "rate_per_sec")?.unwrap_or(1.0);
    if rate > MAX_RATE || (rate != 0.0 && rate < MIN_RATE) {
        return Err(ConfigError::new(
            "rate_per_sec",
            format!("must be 0 (idle) or from {MIN_RATE} to {MAX_RATE}"),
        ));
    }
    let count = match config.get("count") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ConfigError::new("count", format!("must be a non-negative integer, got {v}"))
        })?),
    };
    let template = match config.get("template") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map.clone(),
        Some(other) => {
            return Err(ConfigError::new(
                "template",
                format!("must be an object, got {other}"),
            ));
        }
    };
    Ok(Settings {
        rate,
        count,
        template,
    })
}

impl Connector for Generator {
    fn info(&self) -> &KindInfo {
        &INFO
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        parse(config).map(|_| ())
    }

    fn sample_records(
        &self,
        config: &Value,
        sample: Option<&Value>,
    ) -> Result<Vec<Value>, ConfigError> {
        let settings = parse(config)?;
        Ok(sample.map(super::records_in).unwrap_or_else(|| {
            let mut record = settings.template;
            record.insert("seq".into(), json!(0));
            vec![Value::Object(record)]
        }))
    }

    fn stall_after(&self, config: &Value) -> Option<Duration> {
        let settings = parse(config).ok()?;
        // An idle or finished generator makes no progress by design.
        if settings.rate == 0.0 || settings.count.is_some() {
            return None;
        }
        Some(Duration::from_secs_f64((10.0 / settings.rate).max(10.0)))
    }

    fn position(&self) -> Option<&'static super::position::Format> {
        Some(&POSITION)
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        Box::pin(async move {
            let settings = parse(&ctx.config)?;
            if settings.rate == 0.0 {
                // Idle by design: working as configured.
                ctx.health.working();
                ctx.cancel.cancelled().await;
                return Ok(());
            }
            let tick = Duration::from_secs_f64(1.0 / settings.rate).max(MIN_TICK);
            let per_tick = settings.rate * tick.as_secs_f64();
            let mut ticks = super::ticks::Ticks::every(tick);
            let mut owed = 0.0;
            // Checked when it was set; anything else stored there starts from 0.
            let first = ctx.cursor.load().await?;
            let first = first
                .as_ref()
                .and_then(|p| p.get("seq")?.as_u64())
                .unwrap_or(0);
            let mut emitted: u64 = 0;
            loop {
                if !ticks.next(&ctx.cancel).await {
                    return Ok(());
                }
                owed += per_tick;
                let mut n = owed.floor() as u64;
                owed -= n as f64;
                if let Some(count) = settings.count {
                    n = n.min(count.saturating_sub(emitted));
                    if n == 0 && emitted >= count {
                        ctx.cancel.cancelled().await;
                        return Ok(());
                    }
                }
                let batch: Vec<Value> = (0..n)
                    .map(|i| {
                        let mut record = settings.template.clone();
                        record.insert(
                            "seq".into(),
                            json!(first.saturating_add(emitted).saturating_add(i)),
                        );
                        Value::Object(record)
                    })
                    .collect();
                emitted += n;
                if !batch.is_empty() {
                    tokio::select! {
                        () = ctx.cancel.cancelled() => return Ok(()),
                        r = ctx.sink.write(batch) => { r?; }
                    }
                    // Counted once committed, by the sink.
                    ctx.health.progress();
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked_field_by_field() {
        let g = Generator::new();
        assert!(g.validate(&json!({})).is_ok());
        assert!(
            g.validate(&json!({"rate_per_sec": 5, "count": 10, "template": {"a": 1}}))
                .is_ok()
        );
        assert_eq!(
            g.validate(&json!({"rate_per_sec": -1})).unwrap_err().field,
            "rate_per_sec"
        );
        assert_eq!(
            g.validate(&json!({"rate_per_sec": "fast"}))
                .unwrap_err()
                .field,
            "rate_per_sec"
        );
        assert_eq!(
            g.validate(&json!({"count": 1.5})).unwrap_err().field,
            "count"
        );
        assert_eq!(
            g.validate(&json!({"template": [1]})).unwrap_err().field,
            "template"
        );
        assert_eq!(g.validate(&json!({"bogus": 1})).unwrap_err().field, "bogus");
        assert_eq!(
            g.validate(&json!([])).unwrap_err().reason,
            "must be a JSON object"
        );
    }

    #[test]
    fn idle_and_bounded_generators_never_stall() {
        let g = Generator::new();
        assert_eq!(g.stall_after(&json!({"rate_per_sec": 0})), None);
        assert_eq!(g.stall_after(&json!({"count": 3})), None);
        assert_eq!(
            g.stall_after(&json!({"rate_per_sec": 100})),
            Some(Duration::from_secs(10))
        );
    }
}
