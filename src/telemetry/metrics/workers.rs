//! The series of this instance's live workers, read at each scrape from the figures each
//! worker keeps ([`Figures`], implemented by the connectors' health counters): a datasource's
//! series appear when its worker starts here and disappear when it stops, which bounds them by
//! the datasources this instance owns.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use uuid::Uuid;

use super::lock;
use super::names::{self, Family};
use crate::domain::WorkerStatus;

/// What a worker counts, read at each scrape.
pub trait Figures: fmt::Debug + Send + Sync {
    /// Records committed to the sink.
    fn records(&self) -> u64;
    /// Errors met without stopping.
    fn errors(&self) -> u64;
    /// Input records sent to dead letters.
    fn dead_lettered(&self) -> u64;
    /// Connector runs after the first.
    fn restarts(&self) -> u64;
    /// When it last made progress, in Unix milliseconds; 0 before its first.
    fn last_progress_ms(&self) -> i64;
}

/// Who a datasource is, for `dsreg_datasource_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Organisation.
    pub org: String,
    /// Project.
    pub project: String,
    /// Its name in the project.
    pub name: String,
    /// The version its worker was last given.
    pub version: i32,
}

/// A live worker as the scrape sees it.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) kind: &'static str,
    pub(super) figures: Arc<dyn Figures>,
    /// The last status the state writer recorded.
    pub(super) status: WorkerStatus,
    /// Its identity, once the supervisor named it.
    pub(super) identity: Option<Identity>,
}

/// This instance's live workers, by datasource.
#[derive(Debug, Default)]
pub(super) struct Workers(pub(super) Mutex<HashMap<Uuid, Worker>>);

/// One worker's figures, read at once.
struct Row {
    datasource: String,
    kind: &'static str,
    records: u64,
    errors: u64,
    dead_lettered: u64,
    restarts: u64,
    last_progress_ms: i64,
    status: WorkerStatus,
    identity: Option<Identity>,
}

impl Row {
    fn labels(&self) -> [(&'static str, &str); 2] {
        [
            ("datasource", self.datasource.as_str()),
            ("kind", self.kind),
        ]
    }
}

fn encode_counters(
    encoder: &mut DescriptorEncoder,
    family: &Family,
    rows: &[Row],
    value: impl Fn(&Row) -> u64,
) -> fmt::Result {
    let mut metric = family.describe(encoder)?;
    for row in rows {
        ConstCounter::new(value(row)).encode(metric.encode_family(&row.labels())?)?;
    }
    Ok(())
}

impl Collector for Workers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut rows: Vec<Row> = lock(&self.0)
            .iter()
            .map(|(id, w)| Row {
                datasource: id.to_string(),
                kind: w.kind,
                records: w.figures.records(),
                errors: w.figures.errors(),
                dead_lettered: w.figures.dead_lettered(),
                restarts: w.figures.restarts(),
                last_progress_ms: w.figures.last_progress_ms(),
                status: w.status,
                identity: w.identity.clone(),
            })
            .collect();
        rows.sort_unstable_by(|a, b| a.datasource.cmp(&b.datasource));
        let e = &mut encoder;
        encode_counters(e, &names::DATASOURCE_RECORDS, &rows, |r| r.records)?;
        encode_counters(e, &names::DATASOURCE_DEAD_LETTERED, &rows, |r| {
            r.dead_lettered
        })?;
        encode_counters(e, &names::DATASOURCE_ERRORS, &rows, |r| r.errors)?;
        encode_counters(e, &names::DATASOURCE_RESTARTS, &rows, |r| r.restarts)?;
        let mut progress = names::DATASOURCE_LAST_PROGRESS.describe(e)?;
        for row in rows.iter().filter(|r| r.last_progress_ms > 0) {
            ConstGauge::new(row.last_progress_ms as f64 / 1000.0)
                .encode(progress.encode_family(&row.labels())?)?;
        }
        let mut state = names::DATASOURCE_WORKER_STATE.describe(e)?;
        for row in &rows {
            let [datasource, kind] = row.labels();
            let labels = [datasource, kind, ("state", row.status.as_str())];
            ConstGauge::new(1i64).encode(state.encode_family(&labels)?)?;
        }
        let mut info = names::DATASOURCE_INFO.describe(e)?;
        for row in &rows {
            let Some(identity) = &row.identity else {
                continue;
            };
            let [datasource, kind] = row.labels();
            let version = identity.version.to_string();
            let labels = [
                datasource,
                ("org", identity.org.as_str()),
                ("project", identity.project.as_str()),
                ("name", identity.name.as_str()),
                kind,
                ("version", version.as_str()),
            ];
            ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
