//! Reload latency's pairing: an outbox event asking for a worker, the supervisor's order to
//! (re)start it and the state writer's RUNNING, seen in either order (see [`super`]).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::seconds_between;

/// A (re)start waiting to be measured.
#[derive(Debug)]
struct Awaiting {
    /// The version ordered.
    version: i32,
    /// The earliest event asking for it, once read.
    asked_at: Option<DateTime<Utc>>,
    /// When RUNNING on `version` was written, if before the event was read.
    running_at: Option<DateTime<Utc>>,
}

/// The reloads waiting to be measured; each method returns the measurements it completed,
/// in seconds.
#[derive(Debug, Default)]
pub(super) struct Reloads {
    /// Invariant: an entry without `asked_at` lives only until the end of the wake-up that
    /// ordered it.
    awaiting: HashMap<Uuid, Awaiting>,
    /// Datasources (re)started in the current wake-up.
    ordered: HashSet<Uuid>,
    /// The earliest event per datasource read in the current wake-up.
    triggers: HashMap<Uuid, DateTime<Utc>>,
}

impl Reloads {
    /// An event asking for `id`'s worker, committed at `created_at`, was read.
    pub(super) fn asked(&mut self, id: Uuid, created_at: DateTime<Utc>) {
        self.triggers
            .entry(id)
            .and_modify(|t| *t = (*t).min(created_at))
            .or_insert(created_at);
    }

    /// The supervisor (re)started `id`'s worker on `version`.
    pub(super) fn ordered(&mut self, id: Uuid, version: i32) {
        let awaiting = self.awaiting.entry(id).or_insert(Awaiting {
            version,
            asked_at: None,
            running_at: None,
        });
        // A newer order supersedes the old one; the earliest request still waits for it.
        awaiting.version = version;
        awaiting.running_at = None;
        self.ordered.insert(id);
    }

    /// `id`'s worker stopped for good: nothing waits for it.
    pub(super) fn stopped(&mut self, id: Uuid) {
        self.awaiting.remove(&id);
    }

    /// RUNNING on `version` was written at `at`; returns a completed measurement.
    pub(super) fn running(
        &mut self,
        id: Uuid,
        version: Option<i32>,
        at: DateTime<Utc>,
    ) -> Option<f64> {
        let awaiting = self.awaiting.get_mut(&id)?;
        if Some(awaiting.version) != version {
            return None;
        }
        match awaiting.asked_at {
            Some(asked_at) => {
                self.awaiting.remove(&id);
                Some(seconds_between(asked_at, at))
            }
            None => {
                awaiting.running_at.get_or_insert(at);
                None
            }
        }
    }

    /// Ends one supervisor wake-up: pairs its orders with its events.
    pub(super) fn settle(&mut self) -> Vec<f64> {
        let mut samples = Vec::new();
        for id in std::mem::take(&mut self.ordered) {
            let Some(awaiting) = self.awaiting.get_mut(&id) else {
                continue;
            };
            if let Some(&trigger) = self.triggers.get(&id) {
                let earliest = awaiting.asked_at.map_or(trigger, |a| a.min(trigger));
                awaiting.asked_at = Some(earliest);
            }
            match (awaiting.asked_at, awaiting.running_at) {
                (None, _) => {
                    self.awaiting.remove(&id);
                }
                (Some(asked_at), Some(running_at)) => {
                    samples.push(seconds_between(asked_at, running_at));
                    self.awaiting.remove(&id);
                }
                (Some(_), None) => {}
            }
        }
        self.triggers.clear();
        samples
    }
}
