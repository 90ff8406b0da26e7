//! The LISTEN connection's counters and the notification path's self-test, as metric
//! families the registry reads at each scrape.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::listener::ListenerStats;
use crate::telemetry::metrics::names;

/// The listener's counters, for [`crate::telemetry::metrics::Metrics::new`].
#[derive(Debug)]
pub struct ListenerMetrics(pub Arc<ListenerStats>);

impl Collector for ListenerMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &self.0;
        let connected = i64::from(stats.connected.load(Ordering::Relaxed));
        ConstGauge::new(connected).encode(names::LISTENER_CONNECTED.describe(&mut encoder)?)?;
        ConstGauge::new(i64::from(stats.path.working()))
            .encode(names::NOTIFICATION_PATH_OK.describe(&mut encoder)?)?;
        ConstCounter::new(stats.path.failures())
            .encode(names::NOTIFICATION_PATH_FAILURES.describe(&mut encoder)?)?;
        ConstCounter::new(stats.path.untested())
            .encode(names::NOTIFICATION_PATH_UNTESTED.describe(&mut encoder)?)?;
        for (family, value) in [
            (&names::LISTENER_RECONNECTS, &stats.reconnects),
            (&names::NOTIFICATIONS_RECEIVED, &stats.received),
            (&names::NOTIFICATIONS_MALFORMED, &stats.malformed),
        ] {
            ConstCounter::new(value.load(Ordering::Relaxed))
                .encode(family.describe(&mut encoder)?)?;
        }
        Ok(())
    }
}
