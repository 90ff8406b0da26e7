//! Leases: how several instances share the datasources through Postgres.
//!
//! Each datasource's worker runs under a lease (`datasource_leases`) held by one instance,
//! with a fencing epoch; the leases hold while their instance is live. The [`Renewer`] task
//! keeps this instance live (one row written per tick, however many leases it holds), and
//! keeps the time until which its leases are surely still held ([`Tenure`]); when that time
//! passes without a renewal (the database unreachable, the process frozen) it cancels every
//! worker at once, before the leases can lapse in the database. Whatever a worker writes carries its epoch and is refused once the lease has
//! moved on, so an instance that wakes up late cannot write as an owner it no longer is.
//!
//! Who should own what is [`assign`]: rendezvous hashing over the live instances with a cap
//! per instance, so that an instance joining or leaving moves only the share that must move.
//! The supervisor claims what is assigned to it and free, and drains, a few per tick, what is
//! assigned elsewhere: it stops the worker, writes its last state, then releases the lease.
//!
//! The renewer runs on a thread of its own with its own runtime and connection
//! ([`Renewer::spawn_on_own_thread`]): workers saturating the shared runtime's threads or the
//! pools cannot make this instance miss a renewal and fence itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::repository::leases::{self, InstanceInfo};
use crate::telemetry::metrics::Metrics;

/// Whether another instance may be live, as the latest look at the instances saw it; cheap to
/// clone. The state writer NOTIFYs the datasources of each batch only for such others: a
/// notifying commit holds Postgres's one NOTIFY lock through its WAL flush, so with every state
/// write notifying, publishes queue behind state writes nobody listens for. Until the first
/// look, and once the leases are lost, others are assumed.
#[derive(Debug, Clone)]
pub struct Peers(Arc<AtomicBool>);

impl Default for Peers {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl Peers {
    /// Whether another instance may be live.
    pub fn others(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Records what a look saw.
    pub fn saw(&self, others: bool) {
        self.0.store(others, Ordering::Relaxed);
    }
}

/// Lease pacing.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal; a dead instance's datasources move after this.
    pub ttl: Duration,
    /// Leases an instance gives up at a time when others should have them.
    pub moves_per_tick: usize,
    /// How far above an even share an instance may be assigned (1.25: 25% more).
    pub slack: f64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            moves_per_tick: 100,
            slack: 1.25,
        }
    }
}

impl LeaseConfig {
    /// Renewal period: four renewals per lease time, so three may fail before the leases are
    /// given up.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 4
    }

    /// How often the instance looks (a read) whether an instance came or went or a lease is
    /// free, between renewals: at least once a second, so a dead instance's datasources are
    /// claimed within a second of their leases' expiry.
    pub fn look_every(&self) -> Duration {
        self.renew_every().min(Duration::from_secs(1))
    }

    /// How long after a renewal was sent its leases are surely still held: three quarters of
    /// the lease time (the database's expiry counts from when the statement ran, later).
    pub fn safe_for(&self) -> Duration {
        self.ttl - self.ttl / 4
    }
}

/// Until when this instance surely holds its leases, and the token every worker's
/// cancellation descends from, cancelled when that time passes unrenewed.
#[derive(Debug, Default)]
pub struct Tenure {
    inner: Mutex<TenureState>,
}

#[derive(Debug, Default)]
struct TenureState {
    token: CancellationToken,
    until: Option<Instant>,
    /// When the latest successful renewal was sent: every lease holds a lease time from then.
    renewed_at: Option<Instant>,
    /// The latest claim.
    claimed_at: Option<Instant>,
}

impl Tenure {
    fn state(&self) -> std::sync::MutexGuard<'_, TenureState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The parent of the cancellation tokens of workers started now.
    pub fn guard(&self) -> CancellationToken {
        self.state().token.clone()
    }

    /// What a worker started under `guard` asks before every external action: the guard is
    /// not cancelled and the leases are surely held now. Checked against the monotonic clock,
    /// so a process woken from a pause past its leases answers no at once, before the renewer
    /// has had a turn to cancel anything.
    pub fn check(self: &Arc<Self>, guard: CancellationToken) -> crate::connectors::LeaseCheck {
        let tenure = self.clone();
        crate::connectors::LeaseCheck::new(move || {
            !guard.is_cancelled() && tenure.until().is_some_and(|until| Instant::now() < until)
        })
    }

    /// When the leases stop being surely held, if any are.
    pub fn until(&self) -> Option<Instant> {
        self.state().until
    }

    /// A renewal sent at `sent` succeeded: what it renewed (`held_any`) is surely held for
    /// `safe_for` from then. With nothing renewed, there is no deadline, unless a claim made
    /// since has set one.
    fn renewed(&self, sent: Instant, held_any: bool, safe_for: Duration) {
        let mut state = self.state();
        state.renewed_at = Some(sent);
        if held_any {
            state.until = Some(sent + safe_for);
        } else if state.claimed_at.is_none_or(|at| at < sent) {
            state.until = None;
        }
    }

    /// Leases were claimed by a statement sent at `sent`. They hold as long as the others: a
    /// lease time from the latest renewal, so they are covered for `safe_for` from when it was
    /// sent, unless an earlier deadline already stands (it is the one to keep).
    pub fn claimed(&self, sent: Instant, safe_for: Duration) {
        let mut state = self.state();
        state.claimed_at = Some(sent);
        if state.until.is_none() {
            state.until = Some(state.renewed_at.unwrap_or(sent) + safe_for);
        }
    }

    /// The leases ran out: every worker is cancelled; later workers get a fresh guard.
    fn lose(&self) {
        let mut state = self.state();
        state.token.cancel();
        state.token = CancellationToken::new();
        state.until = None;
    }
}

/// The latest renewal, as the supervisor sees it.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// When its statement was sent.
    pub sent: Instant,
    /// The leases it renewed, with their epochs, the live instances, and how many live
    /// datasources no one holds.
    pub seen: Arc<leases::Renewed>,
    /// Whether it renewed the leases (else it only looked: `seen.held` is empty).
    pub renewed: bool,
    /// Whether the leases ran out instead (every worker was cancelled).
    pub lost: bool,
}

/// The renewal task: heartbeats this instance and renews its leases, one statement per
/// renewal, which also reports the live instances and the unheld datasources; between
/// renewals, once a second at least, it only looks at those two.
pub struct Renewer {
    pool: Pool,
    me: InstanceInfo,
    config: LeaseConfig,
    tenure: Arc<Tenure>,
    out: watch::Sender<Option<Renewal>>,
    metrics: Option<Metrics>,
}

impl Renewer {
    /// A renewer for `me`, and the receiver of its renewals.
    pub fn new(
        pool: Pool,
        me: InstanceInfo,
        config: LeaseConfig,
        tenure: Arc<Tenure>,
        metrics: Option<Metrics>,
    ) -> (Self, watch::Receiver<Option<Renewal>>) {
        let (out, rx) = watch::channel(None);
        (
            Self {
                pool,
                me,
                config,
                tenure,
                out,
                metrics,
            },
            rx,
        )
    }

    /// Renews until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.look_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Half a look early, so timer jitter never skips a renewal.
        let due = self
            .config
            .renew_every()
            .saturating_sub(self.config.look_every() / 2);
        let mut last_renewal: Option<Instant> = None;
        loop {
            let deadline = self.tenure.until();
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = sleep_until(deadline) => {
                    self.lose();
                    continue;
                }
                _ = tick.tick() => {}
            }
            // Claims may have set a deadline since; a process frozen past it wakes here: give
            // up before anything else.
            let deadline = self.tenure.until();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.lose();
                continue;
            }
            let sent = Instant::now();
            let renewing = last_renewal.is_none_or(|at| sent - at >= due);
            let renewal = tokio::time::timeout(self.config.look_every(), self.renew_once(renewing));
            let result = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = sleep_until(deadline) => {
                    self.lose();
                    continue;
                }
                r = renewal => r,
            };
            // An answer that comes back after the deadline (the process was paused while it
            // was on its way) is too late: the workers may already run elsewhere.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.lose();
                continue;
            }
            let ok = matches!(result, Ok(Ok(_)));
            if let (true, Some(metrics)) = (renewing, &self.metrics) {
                metrics.lease_renewed(ok);
            }
            match result {
                Ok(Ok(seen)) => {
                    if renewing {
                        last_renewal = Some(sent);
                        self.tenure
                            .renewed(sent, !seen.held.is_empty(), self.config.safe_for());
                    }
                    self.out.send_replace(Some(Renewal {
                        sent,
                        seen: Arc::new(seen),
                        renewed: renewing,
                        lost: false,
                    }));
                }
                Ok(Err(e)) => tracing::warn!(error = %e, renewing, "lease renewal failed"),
                Err(_) => tracing::warn!(
                    timeout_ms = self.config.look_every().as_millis() as u64,
                    renewing,
                    "lease renewal timed out"
                ),
            }
        }
    }

    /// Runs [`Renewer::run`] on a thread of its own with a single-threaded runtime, so that
    /// nothing the shared runtime does (thousands of workers starting, CPU-bound work on its
    /// threads) can delay a renewal: its pool should be one that only it uses, whose
    /// connections are then opened and driven on that thread too. The receiver completes when
    /// the thread has stopped (after `stop`, or if the renewer panicked).
    ///
    /// # Errors
    /// The runtime or the thread cannot be created.
    pub fn spawn_on_own_thread(
        self,
        stop: CancellationToken,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        Ok(crate::own_thread::spawn("dsreg-lease-renewer", self.run(stop))?.stopped)
    }

    /// A renewal, or (`renewing` false) a look.
    async fn renew_once(&self, renewing: bool) -> Result<leases::Renewed, crate::db::Error> {
        let client = self.pool.get().await?;
        if renewing {
            leases::renew(&**client, &self.me, self.config.ttl).await
        } else {
            leases::look(&**client, &self.me.id).await
        }
    }

    fn lose(&self) {
        tracing::warn!(
            "leases not renewed in time (database unreachable or process paused): stopping every worker"
        );
        self.tenure.lose();
        self.out.send_replace(Some(Renewal {
            sent: Instant::now(),
            seen: Arc::default(),
            renewed: false,
            lost: true,
        }));
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A stable score of `instance` for `datasource`: FNV-1a over both, then a 64-bit finaliser
/// (splitmix64), so every instance of every build computes the same.
fn score(instance: &str, datasource: &Uuid) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance
        .bytes()
        .chain(datasource.as_bytes().iter().copied())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Which of `instances` should own each of `datasources`: rendezvous (highest random weight)
/// hashing, each instance capped at `slack` times an even share (rounded up). Every instance
/// computes the same answer from the same inputs; adding or removing an instance changes the
/// owner of about its share only. Empty when there is no instance.
pub fn assign<'a>(
    datasources: &[Uuid],
    instances: &'a [String],
    slack: f64,
) -> HashMap<Uuid, &'a str> {
    let mut owners = HashMap::with_capacity(datasources.len());
    if instances.is_empty() {
        return owners;
    }
    let even = datasources.len().div_ceil(instances.len());
    let cap = ((even as f64 * slack.max(1.0)).ceil() as usize).max(1);
    let mut load = vec![0usize; instances.len()];
    let mut sorted: Vec<&Uuid> = datasources.iter().collect();
    sorted.sort_unstable();
    let mut ranked: Vec<(u64, usize)> = Vec::with_capacity(instances.len());
    for id in sorted {
        ranked.clear();
        ranked.extend(
            instances
                .iter()
                .enumerate()
                .map(|(i, name)| (score(name, id), i)),
        );
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        // The cap times the instances covers every datasource, so one always has room.
        if let Some(&(_, i)) = ranked.iter().find(|(_, i)| load[*i] < cap) {
            load[i] += 1;
            owners.insert(*id, instances[i].as_str());
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n as u128)
            .map(|i| Uuid::from_u128(i * 7919 + 13))
            .collect()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("instance-{i}")).collect()
    }

    #[test]
    fn every_datasource_gets_one_owner_and_shares_are_even_within_the_cap() {
        let datasources = ids(3_000);
        let instances = names(3);
        let owners = assign(&datasources, &instances, 1.25);
        assert_eq!(owners.len(), 3_000);
        for name in &instances {
            let share = owners.values().filter(|o| **o == name.as_str()).count();
            assert!((800..=1_250).contains(&share), "{name} got {share}");
        }
    }

    #[test]
    fn the_same_inputs_give_the_same_answer_in_any_order() {
        let datasources = ids(500);
        let mut reversed = datasources.clone();
        reversed.reverse();
        let instances = names(4);
        assert_eq!(
            assign(&datasources, &instances, 1.25),
            assign(&reversed, &instances, 1.25)
        );
    }

    #[test]
    fn a_fourth_instance_takes_about_a_quarter_and_nothing_else_moves() {
        let datasources = ids(3_000);
        let three = names(3);
        let four = names(4);
        let before = assign(&datasources, &three, 1.25);
        let after = assign(&datasources, &four, 1.25);
        let moved: Vec<&Uuid> = datasources
            .iter()
            .filter(|id| before[*id] != after[*id])
            .collect();
        assert!(
            (600..=900).contains(&moved.len()),
            "{} of 3000 moved",
            moved.len()
        );
        // Every move is to the new instance: none between the old ones.
        assert!(moved.iter().all(|id| after[*id] == "instance-3"));
    }

    #[test]
    fn an_instance_leaving_moves_only_its_own_share() {
        let datasources = ids(3_000);
        let three = names(3);
        let two: Vec<String> = three[..2].to_vec();
        let before = assign(&datasources, &three, 1.25);
        let after = assign(&datasources, &two, 1.25);
        for id in &datasources {
            if before[id] != "instance-2" {
                assert_eq!(before[id], after[id], "{id} moved without cause");
            }
        }
    }

    #[test]
    fn claimed_leases_are_covered_from_the_latest_renewal_not_from_the_claim() {
        let tenure = Tenure::default();
        let safe_for = Duration::from_secs(6);
        let renewed = Instant::now();
        // A renewal that held nothing sets no deadline; a claim later (renewals failing since)
        // holds only as long as that renewal made the instance live.
        tenure.renewed(renewed, false, safe_for);
        assert_eq!(tenure.until(), None);
        tenure.claimed(renewed + Duration::from_secs(5), safe_for);
        assert_eq!(tenure.until(), Some(renewed + safe_for));
        // A renewal holding them moves the deadline on; a claim keeps the earlier one.
        let later = renewed + Duration::from_secs(3);
        tenure.renewed(later, true, safe_for);
        assert_eq!(tenure.until(), Some(later + safe_for));
        tenure.claimed(later + Duration::from_secs(1), safe_for);
        assert_eq!(tenure.until(), Some(later + safe_for));
    }

    #[test]
    fn a_worker_may_act_only_while_the_leases_are_surely_held() {
        let safe_for = Duration::from_secs(6);
        let tenure = Arc::new(Tenure::default());
        let check = tenure.check(tenure.guard());
        assert!(!check.holds(), "nothing claimed yet");
        tenure.claimed(Instant::now(), safe_for);
        assert!(check.holds());
        // A process woken past its deadline, before anything cancelled the workers: no.
        let woken = Arc::new(Tenure::default());
        let late = woken.check(woken.guard());
        woken.claimed(Instant::now() - Duration::from_secs(7), safe_for);
        assert!(!late.holds());
        // Claimed again after the leases were lost: the old workers' guard stays cancelled.
        tenure.lose();
        tenure.claimed(Instant::now(), safe_for);
        assert!(!check.holds());
        assert!(tenure.check(tenure.guard()).holds());
    }

    #[test]
    fn the_cap_bounds_an_instance_even_when_hashing_favours_it() {
        let datasources = ids(100);
        let instances = names(2);
        let owners = assign(&datasources, &instances, 1.0);
        for name in &instances {
            assert!(owners.values().filter(|o| **o == name.as_str()).count() <= 50);
        }
        assert!(assign(&datasources, &[], 1.25).is_empty());
    }
}
