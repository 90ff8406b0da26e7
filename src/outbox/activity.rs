//! A cheap "something was written" signal: the listener bumps it on every notification and
//! the state writer on every batch, so API waits and watches re-read at once instead of
//! polling fast. Receivers see the latest bump, never a backlog.
//!
//! Two kinds of receivers: [`Activity::subscribe`] wakes on every bump (the event feed);
//! [`Activity::subscribe_to`] only on bumps that name its datasource (or name none), so
//! thousands of status watchers are not all woken by every worker's write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;
use uuid::Uuid;

/// The signal; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    all: watch::Sender<u64>,
    /// One sender per watched datasource, alive while a [`Watching`] holds it.
    keyed: Mutex<HashMap<Uuid, Weak<watch::Sender<u64>>>>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            all: watch::Sender::new(0),
            keyed: Mutex::default(),
        }
    }
}

fn bump_one(sender: &watch::Sender<u64>) {
    sender.send_modify(|n| *n = n.wrapping_add(1));
}

/// A receiver of one datasource's bumps.
#[derive(Debug)]
pub struct Watching {
    // Keeps the datasource's sender alive while watched.
    _sender: Arc<watch::Sender<u64>>,
    rx: watch::Receiver<u64>,
}

impl Watching {
    /// Resolves at the next bump for this datasource (or for all).
    pub async fn changed(&mut self) {
        // The sender lives as long as this receiver; an error cannot happen.
        let _ = self.rx.changed().await;
    }
}

impl Activity {
    fn keyed(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Weak<watch::Sender<u64>>>> {
        self.0
            .keyed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells every receiver that something changed.
    pub fn bump(&self) {
        bump_one(&self.0.all);
        let mut keyed = self.keyed();
        keyed.retain(|_, sender| match sender.upgrade() {
            Some(sender) => {
                bump_one(&sender);
                true
            }
            None => false,
        });
    }

    /// Tells the receivers of every datasource that something changed for `ids`; the
    /// receivers of other datasources sleep on.
    pub fn bump_for(&self, ids: impl IntoIterator<Item = Uuid>) {
        bump_one(&self.0.all);
        let mut keyed = self.keyed();
        if keyed.is_empty() {
            return;
        }
        for id in ids {
            match keyed.get(&id).map(Weak::upgrade) {
                Some(Some(sender)) => bump_one(&sender),
                Some(None) => {
                    keyed.remove(&id);
                }
                None => {}
            }
        }
    }

    /// A receiver whose `changed()` resolves at the next bump.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.all.subscribe()
    }

    /// A receiver of the bumps that concern `datasource`.
    pub fn subscribe_to(&self, datasource: Uuid) -> Watching {
        let mut keyed = self.keyed();
        let sender = match keyed.get(&datasource).and_then(Weak::upgrade) {
            Some(sender) => sender,
            None => {
                let sender = Arc::new(watch::Sender::new(0));
                keyed.insert(datasource, Arc::downgrade(&sender));
                sender
            }
        };
        let rx = sender.subscribe();
        Watching {
            _sender: sender,
            rx,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    #[tokio::test]
    async fn a_bump_for_one_datasource_wakes_its_watchers_and_the_feed_only() {
        let activity = Activity::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut feed = activity.subscribe();
        let mut watch_a = activity.subscribe_to(a);
        let mut also_a = activity.subscribe_to(a);
        let mut watch_b = activity.subscribe_to(b);
        activity.bump_for([a]);
        let soon = Duration::from_millis(200);
        tokio::time::timeout(soon, feed.changed())
            .await
            .expect("the feed woken")
            .unwrap();
        tokio::time::timeout(soon, watch_a.changed())
            .await
            .expect("a's watcher woken");
        tokio::time::timeout(soon, also_a.changed())
            .await
            .expect("a's other watcher woken");
        assert!(
            tokio::time::timeout(soon, watch_b.changed()).await.is_err(),
            "b's watcher sleeps on"
        );
        // A bump for everyone wakes b too.
        activity.bump();
        tokio::time::timeout(soon, watch_b.changed())
            .await
            .expect("b's watcher woken");
    }

    #[test]
    fn a_datasource_no_longer_watched_is_forgotten() {
        let activity = Activity::default();
        let a = Uuid::new_v4();
        drop(activity.subscribe_to(a));
        activity.bump_for([a]);
        assert!(activity.keyed().is_empty());
    }
}
