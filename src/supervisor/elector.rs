//! The lease elector: which datasources this instance runs when several instances share them.
//!
//! It owns this instance's leases (`datasource_leases`, see [`super::lease`]): it claims the
//! ones assigned here that no one holds, gives up (a few at a time) the ones assigned
//! elsewhere or retired, takes stock of every renewal (what it did not renew is lost; what
//! the database holds for this instance and the elector forgot is taken up again), and signs
//! off at shutdown. The lease [`Renewer`] runs under it, on a thread of its own.
//!
//! It never starts or stops a worker. It talks to the supervisor through an
//! [`ElectorHandle`]: it publishes the leases it holds ([`Leases`], a `watch`); the supervisor
//! runs the workers of the leases held and not being given up, stops the others, and asks
//! for claims, balances, releases and the sign-off over a channel.
//!
//! Stopping: once its token is cancelled it claims and balances no more, but keeps renewing,
//! for the workers still run while they stop. It signs off when the supervisor asks (every
//! worker stopped, their last states written), or stops renewing when the supervisor is gone
//! (its leases then lapse), and returns once the renewer's thread has stopped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::lease::{self, LeaseConfig, LeaseDeadline, PeerPresence, Renewal, Renewer};
use crate::db::Error;
use crate::db::repository::leases::{self as repo, Claimed, InstanceInfo, Release};
use crate::telemetry::metrics::Metrics;

/// The leases this instance holds, as the elector last published them.
#[derive(Debug, Clone, Default)]
pub struct Leases {
    /// The fencing epoch of each lease held.
    pub held: HashMap<Uuid, i64>,
    /// The leases held that are being given up, each with the number of its drain: their
    /// workers stop, then the supervisor asks for their release with that number (so a lease
    /// given up, kept after all and given up again is not released on the first drain's word).
    pub draining: HashMap<Uuid, u64>,
    /// How many times every lease ran out at once (the renewals failed for too long): every
    /// worker was cancelled then, whatever is held now.
    pub ran_out: u64,
}

/// What the supervisor asks of the elector.
enum Request {
    /// Balance now (at start and every resync): answered once done.
    Balance(oneshot::Sender<Result<(), Error>>),
    /// Claim those of these datasources that are this instance's to take and free.
    Claim {
        ids: Vec<Uuid>,
        reply: oneshot::Sender<Result<Vec<Claimed>, Error>>,
    },
    /// The workers of these drains have stopped and their last records and states are
    /// written: their leases can go.
    Release(Vec<(Uuid, u64)>),
    /// Every worker has stopped and its last state is written: release every lease, and stop.
    SignOff(oneshot::Sender<Result<(), Error>>),
}

/// The supervisor's side of the elector: the leases it publishes, and its requests.
pub struct ElectorHandle {
    requests: mpsc::UnboundedSender<Request>,
    leases: watch::Receiver<Arc<Leases>>,
    deadline: Arc<LeaseDeadline>,
}

/// Sends the releases of drained leases from wherever their workers are awaited; it does not
/// keep the elector waiting for requests.
pub struct Releaser(mpsc::WeakUnboundedSender<Request>);

impl Releaser {
    /// The workers of `drained` (datasource, drain number) have stopped and their last
    /// records and states are written.
    pub fn release(&self, drained: Vec<(Uuid, u64)>) {
        if let Some(requests) = self.0.upgrade() {
            // The elector is gone only after the sign-off, which releases everything.
            let _ = requests.send(Request::Release(drained));
        }
    }
}

impl ElectorHandle {
    /// The leases as the elector publishes them; `changed()` fails once it has stopped.
    pub fn leases(&mut self) -> &mut watch::Receiver<Arc<Leases>> {
        &mut self.leases
    }

    /// Until when the leases are surely held, and the token every worker's cancellation
    /// descends from.
    pub fn deadline(&self) -> &Arc<LeaseDeadline> {
        &self.deadline
    }

    /// A sender of releases for tasks that wait for workers to stop.
    pub fn releaser(&self) -> Releaser {
        Releaser(self.requests.downgrade())
    }

    /// Balances now: claims what is assigned here and free, starts giving up what is not.
    /// Once it returns, the published leases show the outcome.
    ///
    /// # Errors
    /// The database could not be read or written. An elector that has stopped balances
    /// nothing and answers `Ok`.
    pub async fn balance(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request::Balance(reply)).is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }

    /// Claims those of `ids` that this instance should take and no one holds; returns those
    /// claimed, which the published leases show from then on.
    ///
    /// # Errors
    /// The claim statement failed. An elector that has stopped claims nothing.
    pub async fn claim(&self, ids: Vec<Uuid>) -> Result<Vec<Claimed>, Error> {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request::Claim { ids, reply }).is_err() {
            return Ok(Vec::new());
        }
        answer.await.unwrap_or_else(|_| Ok(Vec::new()))
    }

    /// Shutdown, once every worker has stopped and its last state is written: every lease
    /// is released and this instance signs off, so the others take over at once.
    ///
    /// # Errors
    /// The release failed (the leases then expire on their own).
    pub async fn sign_off(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request::SignOff(reply)).is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}

/// A lease this instance holds.
#[derive(Debug, Clone, Copy)]
struct HeldLease {
    epoch: i64,
    /// When its claim was known to be committed, or when a renewal first listed it: a renewal
    /// sent earlier need not list it.
    since: Instant,
}

/// A lease being given up.
#[derive(Debug, Clone)]
struct Drain {
    /// To whom (`None`: the datasource is archived or gone).
    to: Option<String>,
    /// Tells this drain from an earlier one of the same lease.
    number: u64,
    /// Its worker has stopped and its last writes are done: the lease can be released.
    stopped: bool,
}

/// The elector service: owns this instance's leases and their renewer.
pub struct Elector {
    me: InstanceInfo,
    config: LeaseConfig,
    /// The control plane's connections: claims, releases, looks at the instances.
    control: Pool,
    /// The renewer's own connection, opened and driven on its own thread.
    renewal: Pool,
    metrics: Option<Metrics>,
    deadline: Arc<LeaseDeadline>,
    peers: PeerPresence,
    requests: mpsc::UnboundedReceiver<Request>,
    published: watch::Sender<Arc<Leases>>,
    held: HashMap<Uuid, HeldLease>,
    draining: HashMap<Uuid, Drain>,
    /// The number the next drain gets.
    next_drain: u64,
    /// Leases released lately, so a renewal sent before the release does not bring them back.
    released: HashMap<Uuid, Instant>,
    /// Live instances (this one included), sorted.
    live: Vec<String>,
    /// The last balance's assignment: whether each datasource it saw is this instance's.
    assigned: HashMap<Uuid, bool>,
    /// More leases should move than one balance gives up: the next renewal balances again.
    moves_left: bool,
    ran_out: u64,
}

impl Elector {
    /// The elector of instance `me`, which claims and releases on `control` (a small pool of
    /// the control plane's own) and renews on `renewal` (a pool of one connection nothing else
    /// uses); it records every look at the instances in `peers`. Returns the supervisor's
    /// handle with it.
    pub fn new(
        me: InstanceInfo,
        config: LeaseConfig,
        control: Pool,
        renewal: Pool,
        metrics: Option<Metrics>,
        peers: PeerPresence,
    ) -> (Self, ElectorHandle) {
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (published, leases) = watch::channel(Arc::default());
        let deadline = Arc::<LeaseDeadline>::default();
        let handle = ElectorHandle {
            requests: requests_tx,
            leases,
            deadline: deadline.clone(),
        };
        let elector = Self {
            live: vec![me.id.clone()],
            me,
            config,
            control,
            renewal,
            metrics,
            deadline,
            peers,
            requests,
            published,
            held: HashMap::new(),
            draining: HashMap::new(),
            next_drain: 0,
            released: HashMap::new(),
            assigned: HashMap::new(),
            moves_left: false,
            ran_out: 0,
        };
        (elector, handle)
    }

    fn metered(&self, record: impl FnOnce(&Metrics)) {
        if let Some(metrics) = &self.metrics {
            record(metrics);
        }
    }

    /// Shows the supervisor the leases as they stand.
    fn publish(&self) {
        let leases = Leases {
            held: self.held.iter().map(|(id, h)| (*id, h.epoch)).collect(),
            draining: self
                .draining
                .iter()
                .map(|(id, d)| (*id, d.number))
                .collect(),
            ran_out: self.ran_out,
        };
        self.published.send_replace(Arc::new(leases));
    }

    /// Renews, balances on what the renewals see, and answers the supervisor, until the
    /// supervisor signs off or is gone; claims and balances no more once `shutdown` fires.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.wait_until_instance_id_is_free(&shutdown).await;
        let renewer_stop = CancellationToken::new();
        // However this task ends (a panic included), the leases stop being renewed: another
        // instance can take over once they lapse.
        let _renewer_stop = renewer_stop.clone().drop_guard();
        let (renewer, mut renewals) = Renewer::new(
            self.renewal.clone(),
            self.me.clone(),
            self.config.clone(),
            self.deadline.clone(),
            self.metrics.clone(),
        );
        // On a thread of its own, so no load on the shared runtime delays a renewal.
        let finished = match renewer.spawn_on_own_thread(renewer_stop.clone()) {
            Ok(finished) => finished,
            Err(e) => {
                // Without a renewer no lease can be held: the supervisor sees the elector
                // gone and ends, and the process exits non-zero.
                tracing::error!(error = %e, "cannot start the lease renewer's thread");
                return;
            }
        };
        if let Err(e) = self.register().await {
            tracing::warn!(error = %e, "registering this instance failed; the renewals retry");
        }
        loop {
            tokio::select! {
                biased;
                Ok(()) = renewals.changed() => {
                    let renewal = renewals.borrow_and_update().clone();
                    if let Some(renewal) = renewal {
                        let taking = !shutdown.is_cancelled();
                        if let Err(e) = self.on_renewal(renewal, taking).await {
                            tracing::warn!(error = %e, "balancing the leases failed; the next renewal balances again");
                        }
                    }
                }
                request = self.requests.recv() => {
                    let taking = !shutdown.is_cancelled();
                    match request {
                        Some(Request::Balance(reply)) => {
                            let result = if taking { self.balance().await } else { Ok(()) };
                            let _ = reply.send(result);
                        }
                        Some(Request::Claim { ids, reply }) => {
                            let result = if taking {
                                let ids: Vec<Uuid> = ids
                                    .into_iter()
                                    .filter(|id| !self.held.contains_key(id) && self.takes(*id))
                                    .collect();
                                self.claim(&ids).await
                            } else {
                                Ok(Vec::new())
                            };
                            let _ = reply.send(result);
                        }
                        Some(Request::Release(drained)) => {
                            for (id, number) in drained {
                                if let Some(drain) = self.draining.get_mut(&id).filter(|d| d.number == number) {
                                    drain.stopped = true;
                                }
                            }
                            if let Err(e) = self.release_drained().await {
                                tracing::warn!(error = %e, "releasing drained leases failed; the next balance releases them");
                            }
                        }
                        Some(Request::SignOff(reply)) => {
                            let _ = reply.send(self.sign_off().await);
                            break;
                        }
                        // The supervisor is gone without signing off (it panicked): the
                        // leases lapse, its workers were aborted as it unwound.
                        None => break,
                    }
                }
            }
        }
        renewer_stop.cancel();
        let _ = finished.await;
    }

    /// A process that ran under this instance id moments ago (a crash, then a restart with
    /// `--instance-id`) may still look alive, and renewing its leases would run its workers
    /// twice if it is in fact still running (two hosts given one id): wait until it is seen
    /// dead, so its leases are claimed again under new epochs.
    async fn wait_until_instance_id_is_free(&self, shutdown: &CancellationToken) {
        let mut said = false;
        loop {
            let left = match self.control.get().await {
                Ok(client) => repo::live_for(&**client, &self.me.id).await,
                Err(e) => Err(e.into()),
            };
            let left = match left {
                Ok(Some(left)) => left,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check whether this instance id is in use");
                    return;
                }
            };
            if !said {
                said = true;
                tracing::warn!(
                    instance = %self.me.id,
                    wait_ms = left.as_millis() as u64,
                    "this instance id was alive moments ago (another process, or this one before a crash): waiting until it is seen dead before taking any lease"
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(left.min(Duration::from_secs(1)) + Duration::from_millis(50)) => {}
            }
        }
    }

    async fn register(&self) -> Result<(), Error> {
        let client = self.control.get().await?;
        repo::register(&**client, &self.me).await
    }

    /// Whether this instance should take a datasource no one holds straight away: the last
    /// balance assigned it here, or (a datasource it has not seen yet) rendezvous alone puts it
    /// here first; the next balance evens out the rest.
    fn takes(&self, id: Uuid) -> bool {
        match self.assigned.get(&id) {
            Some(mine) => *mine,
            None => lease::assign(&[id], &self.live, f64::INFINITY)
                .get(&id)
                .is_some_and(|o| *o == self.me.id),
        }
    }

    /// A renewal (or a look between renewals) arrived: what it renewed is taken stock of, and
    /// what it saw of the others may call for a balance (only while `taking`).
    async fn on_renewal(&mut self, renewal: Renewal, taking: bool) -> Result<(), Error> {
        if renewal.lost {
            self.peers.record(true);
            let lost = self.held.len();
            self.held.clear();
            self.draining.clear();
            self.ran_out += 1;
            self.publish();
            self.metered(|m| {
                m.lease_moves("lost", lost as u64);
                m.leases_held(0, self.live.len());
            });
            return Ok(());
        }
        if renewal.renewed {
            self.account_for_renewal(&renewal);
        }
        // Someone came or went, a lease is free, or leases are being (or still to be) given
        // up: look again.
        let mut live = renewal.seen.live.clone();
        if let Err(at) = live.binary_search(&self.me.id) {
            live.insert(at, self.me.id.clone());
        }
        self.peers.record(live.len() > 1);
        if taking
            && (live != self.live
                || renewal.seen.free > 0
                || !self.draining.is_empty()
                || self.moves_left)
        {
            self.balance().await?;
        }
        Ok(())
    }

    /// Leases the renewal did not renew are lost (the supervisor stops their workers); leases
    /// held in the database that this elector forgot (kept through a brief outage) are taken
    /// up again (the supervisor reconciles them).
    fn account_for_renewal(&mut self, renewal: &Renewal) {
        let renewed: HashMap<Uuid, i64> = renewal.seen.held.iter().copied().collect();
        let lost: Vec<Uuid> = self
            .held
            .iter()
            .filter(|(id, h)| h.since < renewal.sent && renewed.get(id) != Some(&h.epoch))
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            tracing::warn!(datasource_id = %id, "lease lost: stopping its worker");
            self.held.remove(id);
            self.draining.remove(id);
        }
        let adopted: Vec<(Uuid, i64)> = renewed
            .iter()
            .filter(|(id, _)| !self.held.contains_key(id))
            .filter(|(id, _)| self.released.get(id).is_none_or(|at| *at < renewal.sent))
            .map(|(id, epoch)| (*id, *epoch))
            .collect();
        for (id, epoch) in &adopted {
            let since = renewal.sent;
            self.held.insert(
                *id,
                HeldLease {
                    epoch: *epoch,
                    since,
                },
            );
        }
        if !lost.is_empty() || !adopted.is_empty() {
            self.publish();
        }
        let held = self.held.len();
        self.metered(|m| {
            m.lease_moves("lost", lost.len() as u64);
            m.leases_held(held, self.live.len());
        });
    }

    /// Claims what is assigned here and free, gives up (a few per tick) what is assigned
    /// elsewhere, and gives up the leases of retired datasources; releases those whose
    /// workers have stopped.
    async fn balance(&mut self) -> Result<(), Error> {
        let result = self.balance_once().await;
        if result.is_err() {
            // Forget what it saw, so the next renewal balances again rather than wait for the
            // periodic resync.
            self.live.clear();
        }
        result
    }

    async fn balance_once(&mut self) -> Result<(), Error> {
        let ttl = self.config.ttl;
        self.released
            .retain(|_, at| at.elapsed() < ttl.saturating_mul(2));
        let (mut live, standings) = {
            let client = self.control.get().await?;
            (
                repo::live_instances(&**client).await?,
                repo::standings(&**client).await?,
            )
        };
        let me = self.me.id.clone();
        if let Err(at) = live.binary_search(&me) {
            live.insert(at, me.clone());
        }
        self.live.clone_from(&live);
        let ids: Vec<Uuid> = standings.iter().map(|s| s.datasource_id).collect();
        let owners = lease::assign(&ids, &live, self.config.slack);
        let mine = |id: &Uuid| owners.get(id).is_some_and(|o| *o == me);
        self.assigned = ids.iter().map(|id| (*id, mine(id))).collect();

        let free: Vec<Uuid> = standings
            .iter()
            .filter(|s| s.owner.is_none() && mine(&s.datasource_id))
            .filter(|s| !self.held.contains_key(&s.datasource_id))
            .map(|s| s.datasource_id)
            .collect();
        self.claim(&free).await?;

        // Draining ones assigned back here stay.
        let before = self.draining.len();
        self.draining.retain(|id, _| !mine(id));
        let mut changed = self.draining.len() != before;
        let standing: HashSet<Uuid> = ids.iter().copied().collect();
        let mut leaving: Vec<(Uuid, Option<String>)> = Vec::new();
        for id in self.held.keys() {
            if self.draining.contains_key(id) {
                continue;
            }
            if !standing.contains(id) {
                leaving.push((*id, None));
            } else if let Some(to) = owners.get(id).filter(|o| **o != me) {
                leaving.push((*id, Some((*to).to_owned())));
            }
        }
        // Retired ones first, then moves in a stable order, a few at a time.
        leaving.sort_by_key(|(id, to)| (to.is_some(), *id));
        let room = self
            .config
            .moves_per_tick
            .saturating_sub(self.draining.len());
        let retired = leaving.iter().filter(|(_, to)| to.is_none()).count();
        let take = retired.max(room);
        self.moves_left = leaving.len() > take;
        leaving.truncate(take);
        for (id, to) in leaving {
            let number = self.next_drain;
            self.next_drain += 1;
            self.draining.insert(
                id,
                Drain {
                    to,
                    number,
                    stopped: false,
                },
            );
            changed = true;
        }
        if changed {
            self.publish();
        }
        self.release_drained().await?;
        let held = self.held.len();
        self.metered(|m| m.leases_held(held, self.live.len()));
        Ok(())
    }

    /// Claims the leases of `ids` that are free; returns those claimed.
    async fn claim(&mut self, ids: &[Uuid]) -> Result<Vec<Claimed>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sent = Instant::now();
        let claimed = {
            let mut client = self.control.get().await?;
            repo::claim(&mut client, &self.me.id, ids).await?
        };
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        // Covered from when the claim was sent (the earlier, safe side); but only a renewal
        // sent after its commit surely sees it, so one sent while the claim ran (a claim of
        // thousands can take seconds) does not count it lost.
        self.deadline.claimed(sent, self.config.safe_for());
        let committed = Instant::now();
        for c in &claimed {
            self.held.insert(
                c.datasource_id,
                HeldLease {
                    epoch: c.epoch,
                    since: committed,
                },
            );
            self.released.remove(&c.datasource_id);
        }
        self.publish();
        self.metered(|m| m.lease_moves("acquired", claimed.len() as u64));
        Ok(claimed)
    }

    /// Releases the draining leases whose workers have stopped (the supervisor said so, after
    /// their last records and states were written).
    async fn release_drained(&mut self) -> Result<(), Error> {
        let done: Vec<(Uuid, Option<String>)> = self
            .draining
            .iter()
            .filter(|(_, d)| d.stopped)
            .map(|(id, d)| (*id, d.to.clone()))
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        let released = {
            let mut client = self.control.get().await?;
            repo::release(&mut client, &self.me.id, &done, Release::Retired).await?
        };
        let now = Instant::now();
        for (id, _) in &done {
            self.draining.remove(id);
            self.held.remove(id);
            self.released.insert(*id, now);
        }
        self.publish();
        self.metered(|m| m.lease_moves("released", released.len() as u64));
        Ok(())
    }

    /// Releases every lease and signs this instance off, so the others take over at once.
    async fn sign_off(&mut self) -> Result<(), Error> {
        let mut client = self.control.get().await?;
        let released = repo::sign_off(&mut client, &self.me.id).await?;
        self.held.clear();
        self.draining.clear();
        self.publish();
        self.metered(|m| m.lease_moves("released", released as u64));
        Ok(())
    }
}
