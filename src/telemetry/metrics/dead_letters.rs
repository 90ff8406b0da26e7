//! Dead letters waiting, as the retention task last counted them: the datasources with the
//! most (at most [`DEAD_LETTER_SERIES`]) a series each, and all the others together, so the
//! number of series stays bounded whatever the number of datasources.

use std::fmt;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use uuid::Uuid;

use super::{lock, names};

/// Most datasources with a dead-letter series of their own.
pub const DEAD_LETTER_SERIES: i64 = 100;

/// The datasources with the most dead letters, with their counts, and the others' total.
pub(super) type Counted = (Vec<(Uuid, i64)>, i64);

/// The last count; nothing is served before the first.
#[derive(Debug, Default)]
pub(super) struct DeadLetterCounts(pub(super) Mutex<Option<Counted>>);

impl Collector for DeadLetterCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some((top, rest)) = lock(&self.0).clone() else {
            return Ok(());
        };
        {
            let mut family = names::DATASOURCE_DEAD_LETTERS.describe(&mut encoder)?;
            for (id, n) in &top {
                let id = id.to_string();
                ConstGauge::new(*n)
                    .encode(family.encode_family(&[("datasource", id.as_str())])?)?;
            }
        }
        ConstGauge::new(rest).encode(names::DEAD_LETTERS_OTHER_DATASOURCES.describe(&mut encoder)?)
    }
}
