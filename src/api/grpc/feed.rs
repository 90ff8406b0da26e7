//! The event feed: one follower of `datasource_events` per process, fanning every final event
//! out to all `WatchEvents` streams. A stream costs no database work while idle: the follower
//! reads once per wake-up (a notification, a state write, or a slow fallback tick) whatever the
//! number of streams, and only while at least one stream listens.
//!
//! Ids are taken in one order and committed in another; an id is final (visible, or never to
//! be) once every transaction that could hold it has ended. Event ids are taken after the
//! writer's xid (migration V5), so when a read sees ids up to `m`, every transaction holding a
//! lower id already had its xid, below that read's xid bound (above every xid taken by then:
//! the snapshot's `xmax` raised by the running transactions' xids, see
//! [`events::snapshot_bounds`]); a later read whose `xmin` has reached that bound proves them
//! all finished, and re-reading up to `m` then returns every event up to `m` for good. With no
//! transaction holding an xid (`xmin` equal to the bound) the first read is already final.
//!
//! The follower publishes a cursor: every event up to it has been broadcast and is final. A
//! stream subscribes and reads the cursor in one step ([`Feed::join`]), so the events up to the
//! cursor are in the table for good (it reads them there) and every later one reaches its
//! receiver. A stream that falls behind the broadcast buffer joins again the same way.
//!
//! Another history of the database (a promoted standby that lost commits, a restore) may
//! hand out again ids the feed already passed; when the server answering changes, the
//! follower moves the id sequence past its cursor (never backwards; the outbox reader does
//! the same for the ids it knew), so the next events get ids the streams have not seen.
//!
//! The follower stops with the server's shutdown token.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::db::repository::events::{self, EventFilter, ScopedEvent};
use crate::outbox::Activity;

/// Events per read.
pub const BATCH: i64 = 500;
/// How often the follower reads when nothing wakes it (events written by another instance's
/// state writer are not notified).
const FALLBACK_POLL: Duration = Duration::from_millis(200);
/// How soon the follower first reads again while a transaction that may hold a lower id runs;
/// each further read waits twice as long, up to [`SETTLE_MAX`], so a long transaction costs a
/// read a second, not two hundred. A notification (a commit) wakes it at once.
const SETTLE_FIRST: Duration = Duration::from_millis(5);
/// The longest wait between reads while a transaction holds the feed back.
const SETTLE_MAX: Duration = Duration::from_secs(1);
/// Batches a slow stream may fall behind before it re-reads from the table.
const BUFFER: usize = 256;
/// The wait after a failed read.
const RETRY: Duration = Duration::from_millis(500);

/// Final events, in id order, through `through`.
#[derive(Debug)]
pub struct Batch {
    /// The events (possibly none: the cursor moved over ids that were never committed).
    pub events: Vec<ScopedEvent>,
    /// Every event up to this id is final and was in this batch or an earlier one.
    pub through: i64,
}

/// The process's event feed; shared by every stream.
#[derive(Debug)]
pub struct Feed {
    /// The cursor, and the sender under the same lock so joining is atomic with publishing.
    /// `None` until the follower's first read settled.
    inner: Mutex<(Option<i64>, broadcast::Sender<Arc<Batch>>)>,
    /// Wakes the follower when a stream joins (it idles while no one listens).
    joined: Notify,
    /// Wakes streams waiting for the first cursor.
    started: Notify,
}

/// A stream's place in the feed: events after `cursor` arrive on `rx`; those up to it are
/// final and in the table.
#[derive(Debug)]
pub struct Joined {
    /// Later batches.
    pub rx: broadcast::Receiver<Arc<Batch>>,
    /// Every event up to here is final.
    pub cursor: i64,
}

impl Feed {
    /// A feed whose follower runs on `tracker` until `shutdown`.
    pub fn start(
        pool: Pool,
        activity: Activity,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let feed = Arc::new(Self {
            inner: Mutex::new((None, broadcast::channel(BUFFER).0)),
            joined: Notify::new(),
            started: Notify::new(),
        });
        tracker.spawn(follow(feed.clone(), pool, activity, shutdown));
        feed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<i64>, broadcast::Sender<Arc<Batch>>)> {
        // Only a cursor and a sender are behind the lock; both stay consistent on a panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes and returns the cursor at that instant, waiting for the follower's first
    /// settled read.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn join(&self) -> Joined {
        loop {
            let started = self.started.notified();
            // While waiting, the receiver counts as a listener, so the follower starts.
            let (cursor, rx) = {
                let guard = self.lock();
                (guard.0, guard.1.subscribe())
            };
            self.joined.notify_one();
            if let Some(cursor) = cursor {
                return Joined { rx, cursor };
            }
            started.await;
            drop(rx);
        }
    }

    fn publish(&self, batch: Batch) {
        let mut guard = self.lock();
        let first = guard.0.is_none();
        guard.0 = Some(batch.through);
        // No receiver is not an error: the batch is in the table.
        let _ = guard.1.send(Arc::new(batch));
        drop(guard);
        if first {
            self.started.notify_waiters();
        }
    }

    fn listeners(&self) -> usize {
        self.lock().1.receiver_count()
    }
}

/// Waits until `f` succeeds, retrying after a pause; `None` on shutdown.
async fn retrying<T, F, Fut>(shutdown: &CancellationToken, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::db::Error>>,
{
    loop {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return None,
            r = f() => r,
        };
        match attempt {
            Ok(value) => return Some(value),
            Err(e) => {
                tracing::warn!(error = %e, "the event feed could not read the outbox; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// Where the follower starts: after the newest id taken, once every transaction that could
/// hold a lower one has ended; with the server that id is from. `None` on shutdown.
async fn starting_point(
    pool: &Pool,
    shutdown: &CancellationToken,
) -> Option<(i64, events::ServerIdentity)> {
    'start: loop {
        // The id first, the bound second: a transaction holding an id up to `last` took its
        // xid before `last` was read, so below the later read's bound.
        let (last, first) = retrying(shutdown, || async {
            let client = pool.get().await.map_err(crate::db::Error::from)?;
            let last = events::last_id(&**client).await?;
            let bounds = events::snapshot_bounds(&**client).await?;
            Ok((last, bounds))
        })
        .await?;
        let mut wait = SETTLE_FIRST;
        loop {
            let now = retrying(shutdown, || async {
                let client = pool.get().await.map_err(crate::db::Error::from)?;
                events::snapshot_bounds(&**client).await
            })
            .await?;
            // Another server answers (a failover): its xids say nothing of the first's.
            if now.server != first.server {
                continue 'start;
            }
            if now.xmin >= first.xid_bound {
                return Some((last, first.server));
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(SETTLE_MAX);
        }
    }
}

/// The follower: reads final events after its cursor and broadcasts them.
async fn follow(feed: Arc<Feed>, pool: Pool, activity: Activity, shutdown: CancellationToken) {
    let mut wake = activity.subscribe();
    let mut filter = EventFilter {
        limit: BATCH,
        ..EventFilter::default()
    };
    let mut cursor: Option<i64> = None;
    // The server (and its history) the cursor's ids come from.
    let mut server: Option<events::ServerIdentity> = None;
    // A read that saw ids up to `.0`, waiting for every transaction below its xid bound `.1`.
    let mut pending: Option<(i64, i64)> = None;
    let mut settle_wait = SETTLE_FIRST;
    loop {
        // Idle while no stream listens: the table keeps what a later stream needs.
        while feed.listeners() == 0 {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = feed.joined.notified() => {}
            }
        }
        let start = match cursor {
            Some(c) => c,
            None => {
                let Some((start, from)) = starting_point(&pool, &shutdown).await else {
                    return;
                };
                server = Some(from);
                feed.publish(Batch {
                    events: Vec::new(),
                    through: start,
                });
                cursor = Some(start);
                start
            }
        };
        filter.after_id = Some(start);
        filter.through_id = pending.map(|(m, _)| m);
        let Some(page) = retrying(&shutdown, || async {
            let client = pool.get().await.map_err(crate::db::Error::from)?;
            events::list_scoped(&**client, &filter).await
        })
        .await
        else {
            return;
        };
        if server.as_ref().is_some_and(|known| *known != page.server) {
            tracing::info!(
                from = %server.as_ref().map(ToString::to_string).unwrap_or_default(),
                to = %page.server,
                cursor = start,
                "the event feed reads another history of the database; moving event ids past its cursor"
            );
            let advanced = async {
                let client = pool.get().await.map_err(crate::db::Error::from)?;
                events::advance_ids_past(&**client, start).await
            };
            // A server that refuses (a read-only one) leaves the ids as they are; the feed
            // goes on.
            if let Err(e) = advanced.await {
                tracing::warn!(error = %e, "the event feed could not move event ids past its cursor");
            }
            server = Some(page.server);
            pending = None;
            continue;
        }
        server = Some(page.server);
        let last = page.events.last().map(|e| e.event.id);
        let full = page.events.len() as i64 >= filter.limit;
        // One server's bound does not go back; when it does, another history answers (a
        // promoted standby reusing xids) and a wait for the old bound might never end: the
        // transactions that could hold a lower id are this server's, below its own bound.
        // (A lower bound is safe anyway: a transaction still running is below it.)
        if let Some((m, bound)) = pending
            && page.xid_bound < bound
        {
            pending = Some((m, page.xid_bound));
        }
        let settle = match pending {
            Some((_, bound)) => page.xmin >= bound,
            None => page.xmin >= page.xid_bound,
        };
        let mut more = false;
        if settle {
            if let Some(upto) = pending.map(|(m, _)| m).or(last) {
                // A full page stops at its last row; otherwise every id up to `upto` is done.
                let through = if full {
                    last.unwrap_or(upto)
                } else {
                    upto.max(start)
                };
                feed.publish(Batch {
                    events: page.events,
                    through,
                });
                cursor = Some(through);
                more = full;
            }
            pending = None;
        } else if pending.is_none()
            && let Some(m) = last
        {
            pending = Some((m, page.xid_bound));
        }
        if more {
            continue;
        }
        let pause = if pending.is_some() {
            let pause = settle_wait;
            settle_wait = (settle_wait * 2).min(SETTLE_MAX);
            pause
        } else {
            settle_wait = SETTLE_FIRST;
            FALLBACK_POLL
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tokio::time::timeout(pause, wake.changed()) => {}
        }
    }
}
