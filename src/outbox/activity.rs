//! A cheap "something was written" signal: the listener bumps it on every notification and
//! the state writer on every batch, so API waits and watches re-read at once instead of
//! polling fast. Receivers see the latest bump, never a backlog.

use std::sync::Arc;

use tokio::sync::watch;

/// The signal; cheap to clone.
#[derive(Debug, Clone)]
pub struct Activity(Arc<watch::Sender<u64>>);

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }
}

impl Activity {
    /// Tells every receiver that something changed.
    pub fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver whose `changed()` resolves at the next bump.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bump_wakes_a_subscriber() {
        let activity = Activity::default();
        let mut rx = activity.subscribe();
        activity.bump();
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed())
            .await
            .expect("woken")
            .expect("sender alive");
    }
}
