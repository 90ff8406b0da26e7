//! The outbox side of the data path: the reader that turns committed `datasource_events`
//! rows into an ordered stream without skipping a row committed out of id order, the
//! dedicated LISTEN connection that wakes it, and the self-test of that notification path.

pub mod activity;
pub mod listener;
pub mod metrics;
pub mod notifications;
pub mod pressure;
pub mod reader;
pub mod selftest;

pub use activity::Activity;
pub use reader::OutboxReader;

/// The channel the schema's trigger NOTIFYs.
pub const CHANNEL: &str = "dsreg_events";

/// The channel the state writer NOTIFYs with the datasources whose worker state it wrote
/// (comma-separated ids, or `*` for many): it wakes API waits and watches on every instance.
pub const STATE_CHANNEL: &str = "dsreg_state";
