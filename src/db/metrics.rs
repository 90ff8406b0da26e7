//! The database pool's usage, as metric families the registry reads at each scrape.

use std::fmt;

use deadpool_postgres::Pool;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::telemetry::metrics::names;

/// The pool's usage, for [`crate::telemetry::metrics::Metrics::new`].
pub struct PoolMetrics(pub Pool);

impl fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PoolMetrics").finish_non_exhaustive()
    }
}

impl Collector for PoolMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let status = self.0.status();
        for (family, value) in [
            (&names::POOL_MAX, status.max_size),
            (&names::POOL_CONNECTIONS, status.size),
            (&names::POOL_AVAILABLE, status.available),
            (&names::POOL_WAITING, status.waiting),
        ] {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            ConstGauge::new(value).encode(family.describe(&mut encoder)?)?;
        }
        Ok(())
    }
}
