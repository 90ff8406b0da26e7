//! The outbox reader: "the events after my cursor that are safe to read".
//!
//! Ids are taken in one order and committed in another, so "the highest id I saw" is not a
//! cursor: a transaction holding a lower id may still commit. The cursor here is a
//! transaction horizon instead, the `xmin` of the snapshot of the last complete read: every
//! transaction below it had finished, so no new row can appear below it. Rows at or above it
//! are read as soon as they are visible (low latency) and remembered until the horizon passes
//! them, so each is returned exactly once.
//!
//! Transaction ids mean something on one server's history only. A standby promoted after its
//! primary died reuses the xids the primary had handed out but never shipped, and a database
//! restored from a dump carries rows whose xids the new cluster has not reached. So every read
//! also names the server that answered (system identifier and timeline); when that changes, or
//! the horizon goes backwards, the reader re-anchors on the server now answering (a new
//! horizon, nothing remembered) and says so, and its caller catches up on the tables. Rows
//! inherited from another cluster are fenced off once, when the reader anchors (see
//! [`Fence`]), so they are never read, let alone on every read.
//!
//! A history that lost commits may also have lost advances of the event id sequence, and
//! would hand out again ids this process (and the clients it served) already saw. Every read
//! notes how far the sequence had gone (ids of every event, those this reader skips or never
//! reaches included); before it anchors on a new history, the reader moves the sequence past
//! the highest id it knew (`setval`, never backwards), so an event id keeps meaning one event.

use std::collections::HashMap;

use crate::db::Error;
use crate::db::repository::GenericClient;
use crate::db::repository::events::{self, Anchor, Event, Fence, ServerIdentity};

/// Rows per query page.
const PAGE: i64 = 1000;

/// Reads each committed outbox event exactly once, in id order within a read.
#[derive(Debug)]
pub struct OutboxReader {
    horizon: i64,
    fence: Fence,
    server: ServerIdentity,
    wakes_only: bool,
    /// Ids already returned whose transaction is at or above the horizon, with that xid.
    seen: HashMap<i64, i64>,
    /// Rows the outbox query returned, over the reader's life.
    rows_read: u64,
    /// The highest event id known taken: the sequence at each anchor and each read, and every
    /// id read.
    highest_id: i64,
}

/// What one [`OutboxReader::read`] found.
#[derive(Debug, Default)]
pub struct Read {
    /// The events that became visible since the last read, by id.
    pub events: Vec<Event>,
    /// Set when the server or its history changed since the last read: the reader started
    /// over from the present, so whatever was committed before it is only in the tables.
    pub reanchored: Option<Reanchored>,
}

/// Why a reader started over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reanchored {
    /// Another server, or another timeline of it, answered (a failover, a restore).
    ServerChanged {
        /// The server of the last read.
        from: ServerIdentity,
        /// The server answering now.
        to: ServerIdentity,
    },
    /// The snapshot horizon went backwards, which one server's history never does.
    HorizonBackwards {
        /// The cursor before.
        from: i64,
        /// The horizon the server reported.
        to: i64,
    },
}

impl std::fmt::Display for Reanchored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reanchored::ServerChanged { from, to } => {
                write!(f, "the database server changed from {from} to {to}")
            }
            Reanchored::HorizonBackwards { from, to } => write!(
                f,
                "the transaction horizon went back from {from} to {to} (another server answered)"
            ),
        }
    }
}

impl OutboxReader {
    /// A reader that returns events committed from now on (callers catch up on the tables,
    /// not on history).
    ///
    /// # Errors
    /// The query failed.
    pub async fn from_now(client: &impl GenericClient) -> Result<Self, Error> {
        let Anchor {
            horizon,
            fence,
            server,
        } = events::anchor(client).await?;
        Ok(Self {
            horizon,
            highest_id: fence.last_id,
            fence,
            server,
            wakes_only: false,
            seen: HashMap::new(),
            rows_read: 0,
        })
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

    /// Rows the outbox query returned so far (returned events, and rows already returned
    /// once that a read passed over): what reading costs.
    pub fn rows_read(&self) -> u64 {
        self.rows_read
    }

    /// Returns the events that became visible since the last read, by id; or, when another
    /// server or timeline answers, none, having re-anchored on it.
    ///
    /// # Cancel safety
    /// Cancel safe: the cursor only moves after a complete read, so an interrupted read is
    /// repeated in full by the next call.
    ///
    /// # Errors
    /// The query failed; the cursor is unchanged.
    pub async fn read(&mut self, client: &impl GenericClient) -> Result<Read, Error> {
        let mut fresh = Vec::new();
        let mut after_id = 0;
        // The first page's snapshot is the oldest of the sweep, so its horizon is the one
        // every later page also honours.
        let mut sweep_horizon = None;
        loop {
            let page = events::read_safe(
                client,
                self.horizon,
                self.fence,
                after_id,
                PAGE,
                self.wakes_only,
            )
            .await?;
            if let Some(change) = self.changed(&page.server, page.horizon) {
                return self.reanchor(client, change).await;
            }
            sweep_horizon.get_or_insert(page.horizon);
            self.highest_id = self.highest_id.max(page.ids_taken);
            self.rows_read += page.events.len() as u64;
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
        let horizon = sweep_horizon.unwrap_or(self.horizon);
        for event in &fresh {
            self.seen.insert(event.id, event.xid);
            self.highest_id = self.highest_id.max(event.id);
        }
        self.seen.retain(|_, xid| *xid >= horizon);
        self.horizon = horizon;
        Ok(Read {
            events: fresh,
            reanchored: None,
        })
    }

    /// Whether a page read from `server` at `horizon` comes from another history than the
    /// reader's cursor.
    fn changed(&self, server: &ServerIdentity, horizon: i64) -> Option<Reanchored> {
        if *server != self.server {
            return Some(Reanchored::ServerChanged {
                from: self.server.clone(),
                to: server.clone(),
            });
        }
        (horizon < self.horizon).then_some(Reanchored::HorizonBackwards {
            from: self.horizon,
            to: horizon,
        })
    }

    /// Starts over on the server `client` talks to now.
    async fn reanchor(
        &mut self,
        client: &impl GenericClient,
        change: Reanchored,
    ) -> Result<Read, Error> {
        // Before the anchor reads the sequence: ids handed out from now on are new ones.
        events::advance_ids_past(client, self.highest_id).await?;
        let Anchor {
            horizon,
            fence,
            server,
        } = events::anchor(client).await?;
        self.highest_id = self.highest_id.max(fence.last_id);
        self.horizon = horizon;
        self.fence = fence;
        self.server = server;
        self.seen.clear();
        Ok(Read {
            events: Vec::new(),
            reanchored: Some(change),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(horizon: i64, server: ServerIdentity) -> OutboxReader {
        OutboxReader {
            horizon,
            fence: Fence {
                last_id: 0,
                next_xid: horizon,
            },
            server,
            wakes_only: false,
            seen: HashMap::new(),
            rows_read: 0,
            highest_id: 0,
        }
    }

    fn server(system_identifier: i64, timeline: Option<&str>) -> ServerIdentity {
        ServerIdentity {
            system_identifier: Some(system_identifier),
            timeline: timeline.map(str::to_owned),
        }
    }

    #[test]
    fn another_timeline_another_system_or_a_horizon_going_back_is_another_history() {
        let here = server(7, Some("00000001"));
        let r = reader(1000, here.clone());
        assert_eq!(r.changed(&here, 1000), None);
        assert_eq!(r.changed(&here, 1500), None);
        assert!(matches!(
            r.changed(&server(7, Some("00000002")), 1500),
            Some(Reanchored::ServerChanged { .. })
        ));
        assert!(matches!(
            r.changed(&server(8, Some("00000001")), 1500),
            Some(Reanchored::ServerChanged { .. })
        ));
        assert!(matches!(
            r.changed(&server(7, None), 1500),
            Some(Reanchored::ServerChanged { .. })
        ));
        assert_eq!(
            r.changed(&here, 999),
            Some(Reanchored::HorizonBackwards {
                from: 1000,
                to: 999
            })
        );
    }
}
