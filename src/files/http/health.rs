//! How each HTTP source of the registry's own sync (`serve --sync-url`) is doing, for
//! `/metrics` (`dsreg_sync_source_up`, `dsreg_sync_source_failures_total`, a series per
//! source, named without its query) and `/readyz` (a warning line per failing source: the
//! registry still serves; its definitions wait for a good source).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::telemetry::metrics::names;

#[derive(Debug, Default, Clone)]
struct State {
    /// Why the last pass failed (or what it skipped), until one passes cleanly.
    failing: Option<String>,
    /// Passes that failed or skipped something.
    failures: u64,
    /// Whether a pass has run yet.
    passed: bool,
}

/// The sources' states, by name.
#[derive(Debug, Default)]
pub struct SourceHealth(Mutex<BTreeMap<String, State>>);

impl SourceHealth {
    fn update(&self, source: &str, f: impl FnOnce(&mut State)) {
        let mut sources = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(sources.entry(source.to_owned()).or_default());
    }

    /// A source is polled from now on (its series start at zero, not up).
    pub fn register(&self, source: &str) {
        self.update(source, |_| {});
    }

    /// A pass of `source` ran to its end, skipping `problems` definitions' files (with the
    /// first one's text).
    pub fn passed(&self, source: &str, problems: usize, first: Option<String>) {
        self.update(source, |s| {
            s.passed = true;
            if problems == 0 {
                s.failing = None;
            } else {
                s.failures += 1;
                s.failing = Some(format!(
                    "{problems} problem(s), nothing of them applied; first: {}",
                    first.unwrap_or_default()
                ));
            }
        });
    }

    /// A pass of `source` failed: nothing was applied.
    pub fn failed(&self, source: &str, reason: &str) {
        self.update(source, |s| {
            s.failures += 1;
            s.failing = Some(reason.to_owned());
        });
    }

    /// A line per failing source, for `/readyz`.
    pub fn warnings(&self) -> Vec<String> {
        let sources = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sources
            .iter()
            .filter_map(|(name, s)| {
                let why = s.failing.as_ref()?;
                Some(format!(
                    "the definition source {name} is failing (the database keeps what it has; retrying): {why}"
                ))
            })
            .collect()
    }
}

impl Collector for SourceHealth {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let sources: Vec<(String, State)> = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        {
            let mut family = names::SYNC_SOURCE_UP.describe(&mut encoder)?;
            for (name, s) in &sources {
                let up = i64::from(s.passed && s.failing.is_none());
                ConstGauge::new(up).encode(family.encode_family(&[("source", name.as_str())])?)?;
            }
        }
        let mut family = names::SYNC_SOURCE_FAILURES.describe(&mut encoder)?;
        for (name, s) in &sources {
            ConstCounter::new(s.failures)
                .encode(family.encode_family(&[("source", name.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_source_warns_until_a_clean_pass_and_counts_its_failures() {
        let health = SourceHealth::default();
        health.register("https://a.example/x.yaml");
        assert!(health.warnings().is_empty());
        health.failed("https://a.example/x.yaml", "the server answered 500");
        health.passed("https://a.example/x.yaml", 2, Some("x: bad".into()));
        let warnings = health.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("2 problem(s)"), "{warnings:?}");
        health.passed("https://a.example/x.yaml", 0, None);
        assert!(health.warnings().is_empty());
        let sources = health.0.lock().unwrap();
        assert_eq!(sources["https://a.example/x.yaml"].failures, 2);
    }
}
