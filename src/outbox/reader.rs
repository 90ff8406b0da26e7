//! The outbox reader: "the events after my cursor that are safe to read".
//!
//! Ids are taken in one order and committed in another, so "the highest id I saw" is not a
//! cursor: a transaction holding a lower id may still commit. The cursor here is a
//! transaction horizon instead, the `xmin` of the snapshot of the last complete read: every
//! transaction below it had finished, so no new row can appear below it. Rows at or above it
//! are read as soon as they are visible (low latency) and remembered until the horizon passes
//! them, so each is returned exactly once.

use std::collections::HashMap;

use crate::db::Error;
use crate::db::repository::GenericClient;
use crate::db::repository::events::{self, Event};

/// Rows per query page.
const PAGE: i64 = 1000;

/// Reads each committed outbox event exactly once, in id order within a read.
#[derive(Debug)]
pub struct OutboxReader {
    horizon: i64,
    wakes_only: bool,
    /// Ids already returned whose transaction is at or above the horizon, with that xid.
    seen: HashMap<i64, i64>,
}

impl OutboxReader {
    /// A reader that returns events committed from now on (callers catch up on the tables,
    /// not on history).
    ///
    /// # Errors
    /// The query failed.
    pub async fn from_now(client: &impl GenericClient) -> Result<Self, Error> {
        Ok(Self::from_horizon(events::current_horizon(client).await?))
    }

    /// A reader that returns every event of transactions at or after `horizon`.
    pub fn from_horizon(horizon: i64) -> Self {
        Self {
            horizon,
            wakes_only: false,
            seen: HashMap::new(),
        }
    }

    /// Restricts the reader to events that call for a reconcile (not the workers' own).
    pub fn wakes_only(mut self) -> Self {
        self.wakes_only = true;
        self
    }

    /// The cursor: no transaction below it can add an event this reader has not returned.
    pub fn horizon(&self) -> i64 {
        self.horizon
    }

    /// Returns the events that became visible since the last read, by id.
    ///
    /// # Cancel safety
    /// Cancel safe: the cursor only moves after a complete read, so an interrupted read is
    /// repeated in full by the next call.
    ///
    /// # Errors
    /// The query failed; the cursor is unchanged.
    pub async fn read(&mut self, client: &impl GenericClient) -> Result<Vec<Event>, Error> {
        let mut fresh = Vec::new();
        let mut after_id = 0;
        // The first page's snapshot is the oldest of the sweep, so its horizon is the one
        // every later page also honours.
        let mut sweep_horizon = None;
        loop {
            let page =
                events::read_safe(client, self.horizon, after_id, PAGE, self.wakes_only).await?;
            sweep_horizon.get_or_insert(page.horizon);
            let full = page.events.len() as i64 == PAGE;
            if let Some(last) = page.events.last() {
                after_id = last.id;
            }
            fresh.extend(
                page.events
                    .into_iter()
                    .filter(|e| !self.seen.contains_key(&e.id)),
            );
            if !full {
                break;
            }
        }
        let horizon = sweep_horizon.unwrap_or(self.horizon).max(self.horizon);
        for event in &fresh {
            self.seen.insert(event.id, event.xid);
        }
        self.seen.retain(|_, xid| *xid >= horizon);
        self.horizon = horizon;
        Ok(fresh)
    }
}
