//! Several registry instances on one database, each a real `dsreg serve` process: every
//! datasource runs on exactly one of them, a killed or frozen instance's datasources move to
//! the others within the lease time, a frozen one's late writes are refused by their epoch, a
//! joining instance takes its share without restarting anything else, and lifecycle calls
//! work through any instance. The lease elector is also driven on its own, as the supervisor
//! drives it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::api::grpc::pb::registry_client::RegistryClient;
use dsreg::db::repository::leases::{self, InstanceInfo};
use dsreg::db::repository::records::{self, SinkColumns};
use dsreg::db::repository::state::{self, Heartbeat, Transition, Writer};
use dsreg::supervisor::elector::Elector;
use dsreg::supervisor::lease::{LeaseConfig, PeerPresence};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::cluster::{
    balanced as balanced_on, fleet as fleet_on, owners as owners_on, pairs, running as running_on,
};
use crate::helpers::{ServeProcess, TestDb, wait_for};

async fn fleet(db: &TestDb, n: i64, rate: f64) -> Vec<Uuid> {
    fleet_on(&**db.client().await, n, rate).await
}

async fn running(db: &TestDb) -> HashMap<Uuid, (String, i64)> {
    running_on(&**db.client().await).await
}

async fn owners(db: &TestDb) -> HashMap<Uuid, String> {
    owners_on(&**db.client().await).await
}

async fn balanced(db: &TestDb, ids: &[Uuid], instances: &[&str]) -> HashMap<Uuid, String> {
    balanced_on(
        &**db.client().await,
        ids,
        instances,
        Duration::from_secs(90),
    )
    .await
}

/// The lease time the instances run with.
const TTL: Duration = Duration::from_millis(3_000);

async fn instance(db: &TestDb, name: &str) -> ServeProcess {
    ServeProcess::start(
        &db.url,
        &[
            ("DSREG_INSTANCE_ID", name),
            ("DSREG_LEASE_TTL_MS", "3000"),
            ("DSREG_HEARTBEAT_INTERVAL_MS", "1000"),
            ("DSREG_POOL_SIZE", "4"),
            ("DSREG_LOG", "info"),
        ],
    )
    .await
}

fn signal(process: &ServeProcess, signal: Signal) {
    let pid = process.child.id().expect("the process runs");
    kill(Pid::from_raw(pid as i32), signal).expect("signal delivered");
}

/// The datasources whose worker series an instance's `/metrics` shows: the workers it runs.
async fn workers_on(process: &ServeProcess) -> HashSet<String> {
    let (status, body) = crate::serve::http_get(&process.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| l.starts_with("dsreg_datasource_records_total{"))
        .filter_map(|l| {
            let rest = &l[l.find("datasource=\"")? + "datasource=\"".len()..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect()
}

/// Waits until `process` has logged a line containing `text`.
async fn logged(process: &ServeProcess, text: &str) {
    wait_for(
        &format!("the log line {text:?}"),
        Duration::from_secs(10),
        || async {
            let logs = process.logs.lock().unwrap();
            logs.iter().any(|l| l.contains(text)).then_some(())
        },
    )
    .await;
}

/// Samples every instance's workers `times` times: no datasource runs on two instances at once,
/// and together they run all `n`.
async fn sample_exclusive(db: &TestDb, processes: &[&ServeProcess], n: usize, times: usize) {
    for _ in 0..times {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, p) in processes.iter().enumerate() {
            for ds in workers_on(p).await {
                if let Some(other) = seen.insert(ds.clone(), i) {
                    panic!("{ds} runs on instances {other} and {i} at once");
                }
            }
        }
        if seen.len() != n {
            let running = running(db).await;
            let missing: Vec<(&Uuid, &(String, i64))> = running
                .iter()
                .filter(|(id, _)| !seen.contains_key(&id.to_string()))
                .collect();
            panic!(
                "{} of {n} datasources run somewhere; RUNNING in the tables but not seen: {missing:?}",
                seen.len()
            );
        }
        // The spacing of the samples, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sink's record of who wrote: for each datasource, records of different epochs never
/// interleave in time (the old owner's last record precedes the new owner's first).
async fn assert_no_double_run(db: &TestDb) {
    let rows = db
        .client()
        .await
        .query(
            "SELECT datasource_id, epoch, min(ingested_at), max(ingested_at), count(*)
             FROM datasource_records GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "the workers wrote records");
    let mut previous: Option<(Uuid, i64, chrono::DateTime<chrono::Utc>)> = None;
    for r in &rows {
        let (id, epoch): (Uuid, i64) = (r.get(0), r.get(1));
        let (first, last): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
            (r.get(2), r.get(3));
        assert!(epoch > 0, "{id}: records written outside any lease");
        if let Some((prev_id, prev_epoch, prev_last)) = previous
            && prev_id == id
        {
            assert!(
                prev_last < first,
                "{id}: epoch {prev_epoch} wrote until {prev_last}, after epoch {epoch} began at {first}"
            );
        }
        previous = Some((id, epoch, last));
    }
}

/// How many times each datasource's worker has started.
async fn starts(db: &TestDb) -> HashMap<Uuid, i64> {
    pairs(
        &**db.client().await,
        "SELECT datasource_id, count(*) FROM datasource_events
         WHERE type = 'worker_starting' GROUP BY 1",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_300_datasources_a_fourth_takes_a_quarter_and_a_killed_ones_move() {
    let db = TestDb::new().await;
    let ids = fleet(&db, 300, 2.0).await;
    let started = Instant::now();
    let a = instance(&db, "node-a").await;
    let b = instance(&db, "node-b").await;
    let c = instance(&db, "node-c").await;
    let before = balanced(&db, &ids, &["node-a", "node-b", "node-c"]).await;
    // Whoever starts first takes everything; the moves to the others follow one after
    // another, well before the periodic resync (30 s) would repair a stalled balance.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "balanced after {took:?}");
    for name in ["node-a", "node-b", "node-c"] {
        let share = before.values().filter(|o| *o == name).count();
        assert!((60..=140).contains(&share), "{name} holds {share} of 300");
    }
    sample_exclusive(&db, &[&a, &b, &c], 300, 10).await;

    // A fourth instance: only its share moves, and nothing else restarts.
    let started_before = starts(&db).await;
    let d = instance(&db, "node-d").await;
    let after = balanced(&db, &ids, &["node-a", "node-b", "node-c", "node-d"]).await;
    let moved: Vec<&Uuid> = ids.iter().filter(|id| before[*id] != after[*id]).collect();
    assert!(
        (40..=110).contains(&moved.len()),
        "{} of 300 moved to the fourth instance",
        moved.len()
    );
    // Nearly every move is to the new instance; the cap per instance may shift a few between
    // the others (one that held more than the new cap sheds its excess to its next choice).
    let sideways = moved.iter().filter(|id| after[**id] != "node-d").count();
    assert!(
        sideways * 10 <= moved.len(),
        "{sideways} of {} moves were between the old instances",
        moved.len()
    );
    let started_after = starts(&db).await;
    let restarted: Vec<&Uuid> = ids
        .iter()
        .filter(|id| started_after.get(*id) != started_before.get(*id))
        .collect();
    let moved_set: HashSet<&Uuid> = moved.iter().copied().collect();
    assert!(
        restarted.iter().all(|id| moved_set.contains(id)),
        "{} restarted, {} of them not moved",
        restarted.len(),
        restarted
            .iter()
            .filter(|id| !moved_set.contains(*id))
            .count()
    );
    sample_exclusive(&db, &[&a, &b, &c, &d], 300, 5).await;

    // SIGKILL: the killed instance's datasources run elsewhere within the lease time + 2 s.
    let victims: Vec<Uuid> = ids
        .iter()
        .filter(|id| after[*id] == "node-b")
        .copied()
        .collect();
    assert!(!victims.is_empty());
    let killed_at = Instant::now();
    signal(&b, Signal::SIGKILL);
    let took = wait_for(
        "the killed instance's datasources RUNNING elsewhere",
        Duration::from_secs(30),
        || async {
            let running = running(&db).await;
            victims
                .iter()
                .all(|id| running.get(id).is_some_and(|(on, _)| on != "node-b"))
                .then(|| killed_at.elapsed())
        },
    )
    .await;
    assert!(
        took <= TTL + Duration::from_secs(2),
        "failover took {took:?}, more than the lease time + 2 s"
    );
    balanced(&db, &ids, &["node-a", "node-c", "node-d"]).await;
    sample_exclusive(&db, &[&a, &c, &d], 300, 5).await;
    assert_no_double_run(&db).await;

    // ListInstances: the killed one is no longer live; the others hold every lease.
    let listed = RegistryClient::new(a.channel().await)
        .list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.answered_by, "node-a");
    let by_id: HashMap<&str, &pb::Instance> = listed
        .instances
        .iter()
        .map(|i| (i.id.as_str(), i))
        .collect();
    wait_for("node-b seen dead", Duration::from_secs(10), || async {
        let listed = RegistryClient::new(a.channel().await)
            .list_instances(pb::ListInstancesRequest {})
            .await
            .unwrap()
            .into_inner();
        listed
            .instances
            .iter()
            .any(|i| i.id == "node-b" && !i.live && i.leases == 0)
            .then_some(())
    })
    .await;
    assert!(by_id["node-a"].live && by_id["node-d"].live);
    let (_, metrics) = crate::serve::http_get(&d.http_addr, "/metrics").await;
    assert!(
        metrics.contains("dsreg_lease_moves_total{kind=\"acquired\"}"),
        "{metrics}"
    );
    for p in [a, c, d] {
        p.stop().await;
    }
    // Clean stops release every lease at once.
    assert!(owners(&db).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_stops_its_workers_its_late_writes_are_refused_and_it_rejoins() {
    let db = TestDb::new().await;
    let ids = fleet(&db, 60, 20.0).await;
    let a = instance(&db, "node-a").await;
    let b = instance(&db, "node-b").await;
    let before = balanced(&db, &ids, &["node-a", "node-b"]).await;
    let frozen: Vec<Uuid> = ids
        .iter()
        .filter(|id| before[*id] == "node-b")
        .copied()
        .collect();
    assert!(!frozen.is_empty());
    let epochs_before = running(&db).await;

    signal(&b, Signal::SIGSTOP);
    // node-a takes them over once the leases expire, under new epochs.
    wait_for(
        "the frozen instance's datasources RUNNING on node-a",
        Duration::from_secs(30),
        || async {
            let running = running(&db).await;
            frozen
                .iter()
                .all(|id| {
                    running
                        .get(id)
                        .is_some_and(|(on, epoch)| on == "node-a" && *epoch > epochs_before[id].1)
                })
                .then_some(())
        },
    )
    .await;
    // Long enough for node-a to write under the new epochs before node-b wakes.
    wait_for(
        "records under the new epochs",
        Duration::from_secs(10),
        || async {
            let n: i64 = db
                .client()
                .await
                .query_one(
                    "SELECT count(DISTINCT r.datasource_id) FROM datasource_records r
                 JOIN datasource_leases l ON l.datasource_id = r.datasource_id AND l.epoch = r.epoch
                 WHERE r.datasource_id = ANY($1) AND l.owner = 'node-a'",
                    &[&frozen],
                )
                .await
                .unwrap()
                .get(0);
            (n == frozen.len() as i64).then_some(())
        },
    )
    .await;
    signal(&b, Signal::SIGCONT);

    // It notices its leases ran out, and stops its workers.
    logged(&b, "leases not renewed in time").await;
    // It rejoins: its share moves back to it, with nothing running twice.
    assert_eq!(balanced(&db, &ids, &["node-a", "node-b"]).await, before);
    sample_exclusive(&db, &[&a, &b], 60, 5).await;
    // Its late writes were refused: no record of an old epoch after the takeover.
    assert_no_double_run(&db).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_and_lifecycle_calls_through_an_instance_that_does_not_own_the_worker() {
    let db = TestDb::new().await;
    let ids = fleet(&db, 20, 1.0).await;
    let a = instance(&db, "node-a").await;
    let b = instance(&db, "node-b").await;
    let owners = balanced(&db, &ids, &["node-a", "node-b"]).await;
    let (id, owner_name) = owners.iter().next().unwrap();
    let owner_name = owner_name.clone();
    let other = if owner_name == "node-a" { &b } else { &a };
    let through = other.channel().await;

    // `dsreg instances` through either one lists both, live, sharing the leases.
    let listed = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"))
        .args(["instances", "-o", "json", "--server"])
        .arg(format!("http://{}", other.grpc_addr))
        .env_remove("DSREG_TOKEN")
        .env_remove("DSREG_TOKEN_FILE")
        .output()
        .await
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let instances: Vec<serde_json::Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let live: HashMap<&str, i64> = instances
        .iter()
        .filter(|i| i["live"] == true)
        .map(|i| (i["id"].as_str().unwrap(), i["leases"].as_i64().unwrap()))
        .collect();
    assert_eq!(live.len(), 2, "{instances:?}");
    assert_eq!(live.values().sum::<i64>(), 20, "{instances:?}");
    let mut datasources = DatasourcesClient::new(through.clone());
    let mut lifecycle = LifecycleClient::new(through);
    let id = id.to_string();

    // A publish through the other instance reaches the owner.
    let config = serde_json::json!({ "rate_per_sec": 3, "template": { "v": 2 } }).to_string();
    let v2 = datasources
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: config,
            comment: "through the other instance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    datasources
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.clone(),
            version: v2.version,
        })
        .await
        .unwrap();
    wait_for("v2 running on the owner", Duration::from_secs(10), || {
        let mut lifecycle = lifecycle.clone();
        let id = id.clone();
        let owner_name = owner_name.clone();
        async move {
            let s = lifecycle
                .get_status(pb::GetStatusRequest { datasource_id: id })
                .await
                .unwrap()
                .into_inner();
            (s.status() == pb::WorkerStatus::Running
                && s.running_version == v2.version
                && s.owner_instance == owner_name
                && s.lease_epoch > 0)
                .then_some(())
        }
    })
    .await;

    // Stop, start and restart through it answer once the owner got there: the owner, seeing
    // another instance live, NOTIFYs its state writes.
    let mut states = dsreg::outbox::notifications::listen(&db.url, dsreg::outbox::STATE_CHANNEL)
        .await
        .unwrap();
    let stopped = lifecycle
        .stop_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stopped.settled, "{stopped:?}");
    assert_eq!(stopped.status(), pb::WorkerStatus::Stopped);
    assert_eq!(stopped.owner_instance, owner_name);
    let started = lifecycle
        .start_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(started.settled, "{started:?}");
    assert_eq!(started.status(), pb::WorkerStatus::Running);
    let restarted = lifecycle
        .restart_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(restarted.settled, "{restarted:?}");
    assert_eq!(restarted.owner_instance, owner_name);
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(n) = states.notifications.recv().await {
            if n.payload() == "*" || n.payload().split(',').any(|named| named == id) {
                return Some(n);
            }
        }
        None
    })
    .await
    .expect("a state notification naming the datasource");
    assert!(heard.is_some(), "the notifications ended");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_id_reused_right_after_a_crash_waits_out_the_old_process() {
    let db = TestDb::new().await;
    let ids = fleet(&db, 10, 1.0).await;
    let first = instance(&db, "node-x").await;
    balanced(&db, &ids, &["node-x"]).await;
    let before = running(&db).await;
    signal(&first, Signal::SIGKILL);
    let second = instance(&db, "node-x").await;
    logged(&second, "this instance id was alive moments ago").await;
    // Its leases are claimed again under new epochs, never renewed as if nothing happened.
    wait_for(
        "every datasource RUNNING again under a new epoch",
        Duration::from_secs(30),
        || async {
            let now = running(&db).await;
            ids.iter()
                .all(|id| {
                    now.get(id)
                        .is_some_and(|(on, epoch)| on == "node-x" && *epoch > before[id].1)
                })
                .then_some(())
        },
    )
    .await;
    second.stop().await;
}

/// The fence itself, statement by statement: once a lease has moved on, the old owner's
/// records, states, events, heartbeats and cursor saves are refused, and its renewal
/// renews nothing.
#[tokio::test]
async fn writes_under_a_lease_that_moved_on_are_refused() {
    let db = TestDb::new().await;
    let ds = db.datasource("fenced").await;
    let ttl = Duration::from_secs(60);
    let renew = |me: &'static str| {
        let db = &db;
        let me = named(me);
        async move { leases::renew(&**db.client().await, &me, ttl).await.unwrap() }
    };
    // Not live before its first renewal: an instance claims nothing.
    let mut client = db.client().await;
    assert!(
        leases::claim(&mut client, "x", &[ds.id])
            .await
            .unwrap()
            .is_empty(),
        "an instance that never renewed claims nothing"
    );
    drop(client);
    renew("x").await;
    renew("y").await;
    let claim = |me: &'static str| {
        let db = &db;
        async move {
            let mut client = db.client().await;
            leases::claim(&mut client, me, &[ds.id]).await.unwrap()
        }
    };
    let first = claim("x").await;
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].epoch, first[0].previous.as_deref()), (1, None));
    assert!(
        claim("y").await.is_empty(),
        "a held lease cannot be claimed"
    );

    let record = serde_json::json!({ "n": 1 });
    let write = |me: &'static str, epoch: i64| {
        let db = &db;
        let record = &record;
        async move {
            let rows = SinkColumns {
                datasource_ids: vec![ds.id],
                versions: vec![1],
                epochs: vec![epoch],
                records: vec![record],
                ..SinkColumns::default()
            };
            records::append(&**db.client().await, &rows, me)
                .await
                .unwrap()
        }
    };
    assert_eq!(write("x", 1).await, vec![(ds.id, 1)]);
    assert!(write("y", 1).await.is_empty(), "only the owner writes");

    assert_eq!(
        renew("x").await.held,
        vec![(ds.id, 1)],
        "x renews what it holds"
    );

    // x's leases run out (as if it froze); y claims the lease under epoch 2.
    db.client()
        .await
        .execute(
            "UPDATE dsreg_instances SET leases_until = now() - interval '1 second' WHERE id = 'x'",
            &[],
        )
        .await
        .unwrap();
    assert!(!renew("y").await.live.contains(&"x".to_owned()));
    let second = claim("y").await;
    assert_eq!(
        (second[0].epoch, second[0].previous.as_deref()),
        (2, Some("x"))
    );
    assert!(
        renew("x").await.held.is_empty(),
        "a lease that moved on is not renewed"
    );
    assert_eq!(renew("y").await.held, vec![(ds.id, 2)]);

    // x wakes up and writes as before: everything is refused.
    assert!(write("x", 1).await.is_empty());
    let transition = |epoch| Transition {
        datasource_id: ds.id,
        status: Some(dsreg::domain::WorkerStatus::Running),
        running_version: Some(1),
        error: None,
        restart_count: None,
        event: Some(dsreg::db::repository::events::NewEvent {
            at: None,
            datasource_id: Some(ds.id),
            kind: "worker_running".into(),
            version: Some(1),
            payload: serde_json::json!({}),
        }),
        epoch,
    };
    let apply_notifying = |me: &'static str, epoch: i64, notify: bool| {
        let db = &db;
        let t = transition(epoch);
        async move {
            let event = t.event.clone().unwrap();
            let actor = format!("dsreg:{me}");
            let client = db.client().await;
            state::apply_transitions(&**client, &[t], &[event], me, &actor, notify)
                .await
                .unwrap()
        }
    };
    let apply = |me: &'static str, epoch: i64| apply_notifying(me, epoch, true);
    assert_eq!(apply("x", 1).await, vec![ds.id]);
    let s = db.state(ds.id).await;
    assert_eq!(s.worker_status, dsreg::domain::WorkerStatus::Init);
    let beat = Heartbeat {
        datasource_id: ds.id,
        last_progress_at: None,
        metrics: serde_json::json!({ "records_total": 1 }),
    };
    state::heartbeat(&**db.client().await, std::slice::from_ref(&beat), "x")
        .await
        .unwrap();
    assert_eq!(db.state(ds.id).await.last_heartbeat_at, None);
    let writer = |instance: &str, epoch| Writer {
        generation: 0,
        instance: instance.into(),
        epoch,
    };
    let cursor = serde_json::json!({ "page": 2 });
    assert!(
        !state::save_cursor(&**db.client().await, ds.id, &writer("x", 1), &cursor)
            .await
            .unwrap()
    );
    assert_eq!(
        db.event_kinds(ds.id)
            .await
            .iter()
            .filter(|k| *k == "worker_running")
            .count(),
        0
    );

    // y, the owner under epoch 2, writes all of it; every instance hears whose state changed.
    let mut states = dsreg::outbox::notifications::listen(&db.url, dsreg::outbox::STATE_CHANNEL)
        .await
        .unwrap();
    assert_eq!(write("y", 2).await, vec![(ds.id, 2)]);
    assert!(apply("y", 2).await.is_empty());
    let heard = tokio::time::timeout(Duration::from_secs(5), states.notifications.recv())
        .await
        .expect("a state notification")
        .expect("listening");
    assert_eq!(heard.payload(), ds.id.to_string());
    // Written with no other instance to hear it, a batch is not NOTIFYed: notifications
    // arrive in commit order, so the marker sent after it is the next one heard.
    assert!(apply_notifying("y", 2, false).await.is_empty());
    db.client()
        .await
        .batch_execute(&format!(
            "NOTIFY {}, 'marker'",
            dsreg::outbox::STATE_CHANNEL
        ))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), states.notifications.recv())
        .await
        .expect("the marker")
        .expect("listening");
    assert_eq!(
        next.payload(),
        "marker",
        "a batch written for no one was NOTIFYed"
    );
    let s = db.state(ds.id).await;
    assert_eq!(
        (s.worker_status, s.owner_instance.as_deref(), s.lease_epoch),
        (dsreg::domain::WorkerStatus::Running, Some("y"), 2)
    );
    assert!(
        state::save_cursor(&**db.client().await, ds.id, &writer("y", 2), &cursor)
            .await
            .unwrap()
    );
    state::heartbeat(&**db.client().await, std::slice::from_ref(&beat), "y")
        .await
        .unwrap();
    let s = db.state(ds.id).await;
    assert!(
        s.last_heartbeat_at.is_some(),
        "the owner's heartbeat is written"
    );
    let epochs: Vec<i64> = db
        .client()
        .await
        .query(
            "SELECT epoch FROM datasource_records WHERE datasource_id = $1 ORDER BY id",
            &[&ds.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(epochs, vec![1, 2]);
    let kinds = db.event_kinds(ds.id).await;
    assert_eq!(
        kinds.iter().filter(|k| k.starts_with("lease_")).count(),
        2,
        "{kinds:?}"
    );
}

/// An instance known by its id alone, as the repository calls below register one.
fn named(id: &str) -> InstanceInfo {
    InstanceInfo {
        id: id.into(),
        address: String::new(),
        version: String::new(),
    }
}

/// Each lease row's version (`xmin`), by datasource.
async fn lease_versions(client: &tokio_postgres::Client) -> Vec<(Uuid, String)> {
    pairs(
        client,
        "SELECT datasource_id, xmin::text FROM datasource_leases ORDER BY 1",
    )
    .await
}

/// Until when instance `id`'s leases hold.
async fn leases_until(client: &tokio_postgres::Client, id: &str) -> chrono::DateTime<chrono::Utc> {
    client
        .query_one(
            "SELECT leases_until FROM dsreg_instances WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// A renewal writes its instance's row and no lease row, however many leases it holds; an
/// instance whose leases ran out gets none of them back by renewing: they are let go, and the
/// next claim (its own included) takes them under a new epoch.
#[tokio::test]
async fn a_renewal_rewrites_no_lease_and_a_lapsed_instance_gets_none_back() {
    let db = TestDb::new().await;
    let ttl = Duration::from_secs(60);
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(db.datasource(&format!("leased-{i}")).await.id);
    }
    let me = named("x");
    let client = db.client().await;
    leases::renew(&**client, &me, ttl).await.unwrap();
    let mut tx_client = db.client().await;
    let claimed = leases::claim(&mut tx_client, "x", &ids).await.unwrap();
    assert_eq!(claimed.len(), 20);
    let before = lease_versions(&client).await;
    let until_before = leases_until(&client, "x").await;
    let renewed = leases::renew(&**client, &me, ttl).await.unwrap();
    assert_eq!(renewed.held.len(), 20);
    assert_eq!(
        lease_versions(&client).await,
        before,
        "no lease row was rewritten"
    );
    assert!(
        leases_until(&client, "x").await > until_before,
        "the instance's leases were extended"
    );

    // Its leases run out and no one claims them; renewing gets none back.
    client
        .execute(
            "UPDATE dsreg_instances SET leases_until = now() - interval '1 second' WHERE id = 'x'",
            &[],
        )
        .await
        .unwrap();
    let lapsed = leases::renew(&**client, &me, ttl).await.unwrap();
    assert!(lapsed.held.is_empty(), "{:?}", lapsed.held);
    assert_eq!(lapsed.free, 20, "its leases were let go");
    assert!(owners(&db).await.is_empty());
    let again = leases::claim(&mut tx_client, "x", &ids).await.unwrap();
    assert_eq!(again.len(), 20);
    assert!(
        again.iter().all(|c| c.epoch == 2 && c.previous.is_none()),
        "{again:?}"
    );
}

/// A claim does not wait for a publish in progress: the datasource it holds locked is
/// skipped (claimed once the publisher commits), the others are claimed at once, and the
/// instance's renewals are never held up behind it.
#[tokio::test]
async fn a_claim_skips_a_datasource_a_publish_in_progress_holds() {
    let db = TestDb::new().await;
    let ttl = Duration::from_secs(60);
    let held = db.datasource("publishing").await;
    let other = db.datasource("idle").await;
    let version = db
        .version(held.id, serde_json::json!({ "rate_per_sec": 0 }))
        .await;
    let me = named("x");
    leases::renew(&**db.client().await, &me, ttl).await.unwrap();
    let mut publisher = db.client().await;
    let tx = publisher.transaction().await.unwrap();
    tx.execute("SELECT dsreg_publish($1, $2)", &[&held.id, &version])
        .await
        .unwrap();

    let mut client = db.client().await;
    let claimed = tokio::time::timeout(
        Duration::from_secs(5),
        leases::claim(&mut client, "x", &[held.id, other.id]),
    )
    .await
    .expect("the claim does not wait for the publisher")
    .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.datasource_id).collect::<Vec<_>>(),
        vec![other.id]
    );
    let renewed = tokio::time::timeout(
        Duration::from_secs(5),
        leases::renew(&**db.client().await, &me, ttl),
    )
    .await
    .expect("the renewal does not wait for the publisher")
    .unwrap();
    assert_eq!(renewed.free, 1);

    tx.commit().await.unwrap();
    let claimed = leases::claim(&mut client, "x", &[held.id, other.id])
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.datasource_id).collect::<Vec<_>>(),
        vec![held.id]
    );
}

/// The elector on its own, driven as the supervisor drives it: alone, it claims every
/// datasource; once another instance is live it publishes that one's share as draining and
/// keeps holding it until told the workers stopped, then releases it; after shutdown it
/// takes nothing, and signing off releases the rest and ends it.
#[tokio::test]
async fn the_elector_claims_releases_a_drain_only_once_its_workers_stopped_and_signs_off() {
    let db = TestDb::new().await;
    let mut ids = HashSet::new();
    for i in 0..8 {
        ids.insert(db.datasource(&format!("elected-{i}")).await.id);
    }
    let config = LeaseConfig {
        ttl: Duration::from_secs(4),
        moves_per_tick: 100,
        slack: 1.0,
    };
    let peers = PeerPresence::default();
    let (elector, mut handle) = Elector::new(
        named("a"),
        config,
        db.pool.clone(),
        db.pool.clone(),
        None,
        peers.clone(),
    );
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(elector.run(shutdown.clone()));

    // Its first renewal makes it live, and a balance follows every renewal that finds a lease
    // free.
    handle.balance().await.unwrap();
    let alone = wait_for("every lease claimed", Duration::from_secs(60), || {
        let leases = handle.leases().borrow().clone();
        let all = leases.held.keys().copied().collect::<HashSet<_>>() == ids;
        async move { all.then_some(leases) }
    })
    .await;
    assert!(alone.draining.is_empty());
    assert!(!peers.others_may_be_live());
    let again: Vec<Uuid> = ids.iter().copied().collect();
    assert!(
        handle.claim(again).await.unwrap().is_empty(),
        "what it holds is not claimed again"
    );

    // Another instance is live: its share is given up once its workers have stopped.
    let b = named("b");
    leases::renew(&**db.client().await, &b, Duration::from_secs(60))
        .await
        .unwrap();
    let draining = wait_for("b's share draining", Duration::from_secs(60), || {
        let leases = handle.leases().borrow().clone();
        async move { (!leases.draining.is_empty()).then(|| leases.draining.clone()) }
    })
    .await;
    assert!(peers.others_may_be_live());
    assert!(draining.len() < ids.len(), "{draining:?}");
    let owned = owners(&db).await;
    assert!(
        draining
            .keys()
            .all(|id| owned.get(id).map(String::as_str) == Some("a")),
        "a lease being given up is held until its worker has stopped: {owned:?}"
    );
    handle
        .releaser()
        .release(draining.iter().map(|(id, n)| (*id, *n)).collect());
    let kept = wait_for(
        "the drained leases released",
        Duration::from_secs(60),
        || {
            let leases = handle.leases().borrow().clone();
            async move { leases.draining.is_empty().then_some(leases) }
        },
    )
    .await;
    assert_eq!(kept.held.len() + draining.len(), ids.len());
    let owned = owners(&db).await;
    assert!(
        draining.keys().all(|id| !owned.contains_key(id)),
        "{owned:?}"
    );
    assert!(
        kept.held
            .keys()
            .all(|id| owned.get(id).map(String::as_str) == Some("a"))
    );

    // After shutdown it takes nothing, even alone again; the sign-off releases everything
    // and ends it.
    shutdown.cancel();
    let mut client = db.client().await;
    leases::sign_off(&mut client, "b").await.unwrap();
    handle.balance().await.unwrap();
    let owned = owners(&db).await;
    assert!(
        draining.keys().all(|id| !owned.contains_key(id)),
        "no lease is taken after shutdown: {owned:?}"
    );
    handle.sign_off().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the elector ends once signed off")
        .unwrap();
    assert!(owners(&db).await.is_empty());
}

/// A renewal sent while a claim was still running does not see the leases being claimed: the
/// elector does not count them lost when it takes stock of that renewal after the claim.
#[tokio::test]
async fn a_renewal_sent_while_a_claim_runs_does_not_count_the_claimed_leases_lost() {
    let db = TestDb::new().await;
    let free = db.datasource("free").await.id;
    let orphan = db.datasource("orphan").await.id;
    // The orphan's lease belongs to an instance that has died: claimable, under a lock.
    let mut client = db.client().await;
    leases::renew(&**client, &named("gone"), Duration::from_secs(60))
        .await
        .unwrap();
    leases::claim(&mut client, "gone", &[orphan]).await.unwrap();
    client
        .execute(
            "UPDATE dsreg_instances SET leases_until = now() - interval '1 second' WHERE id = 'gone'",
            &[],
        )
        .await
        .unwrap();
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM datasource_leases WHERE datasource_id = $1 FOR UPDATE",
        &[&orphan],
    )
    .await
    .unwrap();

    let metrics = dsreg::telemetry::metrics::Metrics::new(Vec::new());
    let config = LeaseConfig {
        ttl: Duration::from_secs(4),
        moves_per_tick: 100,
        slack: 1.0,
    };
    let (elector, mut handle) = Elector::new(
        named("a"),
        config,
        db.pool.clone(),
        db.pool.clone(),
        Some(metrics.clone()),
        PeerPresence::default(),
    );
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(elector.run(shutdown.clone()));

    // The claim of both waits on the orphan's lock; a renewal runs meanwhile.
    crate::helpers::wait_for_lock_wait(
        &client,
        "the claim waiting on the lock",
        "INSERT INTO datasource_leases",
    )
    .await;
    let before = leases_until(&client, "a").await;
    wait_for(
        "a renewal during the claim",
        Duration::from_secs(60),
        || async { (leases_until(&client, "a").await > before).then_some(()) },
    )
    .await;
    lock.commit().await.unwrap();
    wait_for("both leases claimed", Duration::from_secs(60), || {
        let leases = handle.leases().borrow().clone();
        async move { (leases.held.len() == 2).then_some(()) }
    })
    .await;
    // Answered after every renewal that arrived before it was taken stock of.
    handle.balance().await.unwrap();

    let held = handle.leases().borrow().clone();
    assert!(
        held.held.contains_key(&free) && held.held.contains_key(&orphan),
        "{held:?}"
    );
    let text = metrics.encode().unwrap();
    let lost = text
        .lines()
        .find(|l| l.starts_with("dsreg_lease_moves_total{kind=\"lost\"}"));
    assert!(
        lost.is_none_or(|l| l.ends_with(" 0")),
        "no lease was counted lost: {lost:?}"
    );
    shutdown.cancel();
    handle.sign_off().await.unwrap();
    run.await.unwrap();
}

/// A registry that keeps running prunes dead instances' rows while it runs, not only at its
/// start: a row that dies (or is found dead) later goes within a retention.
#[tokio::test]
async fn dead_instance_rows_are_pruned_while_the_registry_runs() {
    let db = TestDb::new().await;
    let mut settings = crate::helpers::test_settings(&db.url);
    settings.dead_instance_retention_secs = 1;
    let _app = crate::helpers::TestApp::spawn_with(settings, |_| {}).await;
    let client = db.client().await;
    // A peer whose leases lapse 15 s from now: live through the start's pruning, so only a
    // later round can delete it. A peer live for the hour stays.
    client
        .batch_execute(
            "INSERT INTO dsreg_instances (id, started_at, heartbeat_at, stopped_at, leases_until) VALUES
               ('dying-peer', now(), now(), NULL, now() + interval '15 seconds'),
               ('live-peer', now(), now(), NULL, now() + interval '1 hour')",
        )
        .await
        .unwrap();
    wait_for("the dead row pruned", Duration::from_secs(90), || async {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM dsreg_instances WHERE id = 'dying-peer'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    let live: i64 = client
        .query_one(
            "SELECT count(*) FROM dsreg_instances WHERE id = 'live-peer'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 1, "a live instance's row is never pruned");
}
