//! Failover and restore: transaction ids belong to one server's history. A streaming standby
//! promoted after its primary died reuses the xids the primary had handed out but never
//! shipped; a database restored from a dump carries rows with xids the new cluster has not
//! reached. The registry follows the new primary, reverts what only the lost history had
//! applied, and reads the outbox of the new history as it reads any other: every event once,
//! none skipped, restored history never read again.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dsreg::db::embedded::{ClusterOptions, EmbeddedCluster, SUPERUSER};
use dsreg::db::repository::{self as repo, WriteContext, versions};
use dsreg::domain::WorkerStatus;
use serde_json::json;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

/// Generous: the machine may be busy; the waits end as soon as the condition holds.
const WAIT: Duration = Duration::from_secs(60);

/// A cluster of the test's own in a temporary folder the server user can reach.
struct Node {
    cluster: EmbeddedCluster,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // As root the server runs unprivileged and must reach its files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

async fn start(data: PathBuf, port: Option<u16>) -> EmbeddedCluster {
    let options = ClusterOptions {
        throwaway: true,
        port,
        ..ClusterOptions::durable(data)
    };
    tokio::task::spawn_blocking(move || EmbeddedCluster::start(&options))
        .await
        .unwrap()
        .expect("a cluster")
}

async fn node() -> Node {
    crate::helpers::init_test_log();
    let dir = scratch();
    let data = dir.path().join("pg");
    let cluster = start(data.clone(), None).await;
    Node {
        cluster,
        data,
        _dir: dir,
    }
}

/// The password the embedded launcher gave the superuser, from its URL.
fn password(cluster: &EmbeddedCluster) -> String {
    let url = cluster.url("postgres");
    let after = url.split_once("://").unwrap().1;
    let userinfo = after.split_once('@').unwrap().0;
    userinfo.split_once(':').unwrap().1.to_owned()
}

/// A PostgreSQL tool of the data folder's version, run as the folder's owner.
fn tool(data: &Path, name: &str) -> Command {
    let version = std::fs::read_to_string(data.join("PG_VERSION")).unwrap();
    let bin = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", version.trim())).join(name);
    let mut command = Command::new(if bin.exists() { bin } else { name.into() });
    let owner = std::fs::metadata(data).unwrap();
    command.current_dir("/").env("LC_ALL", "C");
    // The server user owns the data; as root, the tool runs as that user.
    if unsafe { libc::geteuid() } == 0 {
        command.uid(owner.uid()).gid(owner.gid());
    }
    command
}

fn run(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A streaming standby of `primary`, made with `pg_basebackup -R`, started.
async fn standby_of(primary: &Node) -> Node {
    let dir = scratch();
    let data = dir.path().join("pg");
    std::fs::create_dir(&data).unwrap();
    let owner = std::fs::metadata(&primary.data).unwrap();
    std::os::unix::fs::chown(&data, Some(owner.uid()), Some(owner.gid())).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut backup = tool(&primary.data, "pg_basebackup");
    backup
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            SUPERUSER,
            "-X",
            "stream",
            "-R",
            "-D",
        ])
        .arg(&data)
        .args(["-p", &primary.cluster.port().to_string()])
        .env("PGPASSWORD", password(&primary.cluster));
    let data_for_tool = data.clone();
    tokio::task::spawn_blocking(move || run(backup, "pg_basebackup"))
        .await
        .unwrap();
    let cluster = start(data_for_tool.clone(), None).await;
    Node {
        cluster,
        data: data_for_tool,
        _dir: dir,
    }
}

async fn lsn_caught_up(primary: &tokio_postgres::Client, standby: &tokio_postgres::Client) {
    let target: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for("the standby to replay the primary's WAL", WAIT, || async {
        let caught: bool = standby
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&target],
            )
            .await
            .ok()?
            .get(0);
        caught.then_some(())
    })
    .await;
}

/// `cluster`'s URL for `database`.
fn with_db(cluster: &EmbeddedCluster, database: &str) -> String {
    cluster.url(database)
}

async fn client(url: &str) -> tokio_postgres::Client {
    dsreg::db::connect(url).await.expect("a connection")
}

/// Publishes a new version of each of `ids`, all in one transaction; returns the versions.
async fn publish_many(db: &TestDb, ids: &[uuid::Uuid]) -> Vec<i32> {
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    let mut published = Vec::new();
    for id in ids {
        let v = versions::create_draft(&tx, *id, &json!({ "rate_per_sec": 0 }), "")
            .await
            .unwrap();
        versions::publish(&tx, *id, v.version).await.unwrap();
        published.push(v.version);
    }
    tx.commit().await.unwrap();
    published
}

async fn running(db: &TestDb, id: uuid::Uuid) -> Option<i32> {
    let state = dsreg::db::repository::state::get(&**db.client().await, id)
        .await
        .ok()?;
    (state.worker_status == WorkerStatus::Running)
        .then_some(state.running_version)
        .flatten()
}

async fn wait_running(db: &TestDb, id: uuid::Uuid, version: i32, what: &str) {
    wait_for(what, WAIT, || async {
        (running(db, id).await == Some(version)).then_some(())
    })
    .await;
}

async fn metrics(app: &TestApp) -> String {
    let client = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    client
        .get(format!("http://{}/metrics", app.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in the scrape:\n{text}"))
}

/// How many times the worker of `id` was recorded RUNNING on `version` (started, or reloaded
/// onto it).
async fn runs_on(db: &TestDb, id: uuid::Uuid, version: i32) -> usize {
    db.events(id)
        .await
        .iter()
        .filter(|e| {
            matches!(e.kind.as_str(), "worker_running" | "reload_applied")
                && e.version == Some(version)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_to_a_standby_that_lost_commits_every_publish_of_the_new_primary_applies()
{
    let mut primary = node().await;
    let mut db = TestDb::on_server(&primary.cluster.url("postgres")).await;
    let mut standby = standby_of(&primary).await;
    let (p1, p2) = (primary.cluster.port(), standby.cluster.port());
    let pw = password(&primary.cluster);
    let multi = format!(
        "postgres://{SUPERUSER}:{pw}@127.0.0.1:{p1},127.0.0.1:{p2}/{}",
        db.name
    );
    // The test sees the database as the registry does: through the multi-host URL.
    db.pool = dsreg::db::pool(&multi, 8, Duration::from_secs(10)).unwrap();
    // Only the outbox path can apply what follows: the periodic resync never comes.
    let mut settings = test_settings(&multi);
    settings.resync_interval_ms = 3_600_000;
    let app = TestApp::spawn_with(settings, |_| {}).await;

    let kept = db.datasource("kept").await;
    let v1 = db.version(kept.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(kept.id, v1).await;
    wait_running(&db, kept.id, v1, "kept on v1").await;
    // Twenty more, running: their leases are held, so only the outbox tells of a new version.
    let mut fleet = Vec::new();
    for i in 0..20 {
        let ds = db.datasource(&format!("fleet-{i}")).await;
        let v = db.version(ds.id, json!({ "rate_per_sec": 0 })).await;
        db.publish_sql(ds.id, v).await;
        fleet.push((ds.id, v));
    }
    for (i, (id, v)) in fleet.iter().enumerate() {
        wait_running(&db, *id, *v, &format!("fleet-{i} on its first version")).await;
    }
    let runs_before = {
        let p = client(&with_db(&primary.cluster, &db.name)).await;
        let s = client(&with_db(&standby.cluster, &db.name)).await;
        lsn_caught_up(&p, &s).await;
        runs_on(&db, kept.id, v1).await
    };

    // The standby goes away; what the primary commits now never reaches it.
    standby = tokio::task::spawn_blocking(move || {
        standby.cluster.stop().unwrap();
        standby
    })
    .await
    .unwrap();
    let v2 = db.version(kept.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(kept.id, v2).await;
    let lost = db.datasource("lost").await;
    let lv = db.version(lost.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(lost.id, lv).await;
    // Transaction ids the standby never hears of move the reader's horizon past its own.
    client(&with_db(&primary.cluster, &db.name))
        .await
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..2000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
        )
        .await
        .unwrap();
    wait_running(&db, kept.id, v2, "kept on v2 (a commit the standby lost)").await;
    wait_running(&db, lost.id, lv, "lost running (a commit the standby lost)").await;
    let lost_label = format!("datasource=\"{}\"", lost.id);
    assert!(metrics(&app).await.contains(&lost_label));
    // The registry reads the outbox past those transactions before the primary dies.
    let reads = counter(&metrics(&app).await, "dsreg_outbox_rows_read_total");
    db.publish_sql(kept.id, v2).await;
    let touched = db.datasource("touched").await;
    let tv = db.version(touched.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(touched.id, tv).await;
    wait_for("an outbox read after the lost commits", WAIT, || async {
        (counter(&metrics(&app).await, "dsreg_outbox_rows_read_total") > reads).then_some(())
    })
    .await;
    wait_running(
        &db,
        touched.id,
        tv,
        "touched running (read from the outbox)",
    )
    .await;
    // Ids the registry's reader never returns: a transaction takes a wake event's id and
    // stays open while two hundred later ids go to worker events (not read by the reader,
    // served to any client listing events), then commits; the reader's next read returns an
    // id below them all. Only how far the sequence went says they were taken.
    let mut holder = client(&with_db(&primary.cluster, &db.name)).await;
    let held = holder.transaction().await.unwrap();
    held.batch_execute(&format!(
        "INSERT INTO datasource_events (datasource_id, type) VALUES ('{}', 'reload_requested')",
        touched.id
    ))
    .await
    .unwrap();
    client(&with_db(&primary.cluster, &db.name))
        .await
        .batch_execute(&format!(
            "INSERT INTO datasource_events (datasource_id, type)
             SELECT '{}', 'worker_running' FROM generate_series(1, 200)",
            touched.id
        ))
        .await
        .unwrap();
    let reads = counter(&metrics(&app).await, "dsreg_outbox_rows_read_total");
    held.commit().await.unwrap();
    wait_for("the outbox read of the held event", WAIT, || async {
        (counter(&metrics(&app).await, "dsreg_outbox_rows_read_total") > reads).then_some(())
    })
    .await;
    // The highest id a client may have seen: the standby's sequence never got this far.
    let seen_before: i64 = db
        .events(touched.id)
        .await
        .iter()
        .map(|e| e.id)
        .max()
        .expect("touched has events");

    // A client follows every published event across the failover.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut feed = dsreg::api::grpc::pb::events_client::EventsClient::new(channel);
    let mut following = feed
        .watch_events(dsreg::api::grpc::pb::WatchEventsRequest {
            datasource_id: String::new(),
            types: vec!["published".to_owned()],
            after_id: Some(seen_before),
        })
        .await
        .unwrap()
        .into_inner();

    // The primary dies; the standby comes back on its port and is promoted.
    primary = tokio::task::spawn_blocking(move || {
        primary.cluster.stop().unwrap();
        primary
    })
    .await
    .unwrap();
    let promoted = start(standby.data.clone(), Some(p2)).await;
    client(&with_db(&promoted, &db.name))
        .await
        .batch_execute("SELECT pg_promote(true, 60)")
        .await
        .unwrap();

    // What only the lost history had applied is reverted.
    wait_for("the lost datasource's worker to stop", WAIT, || async {
        (!metrics(&app).await.contains(&lost_label)).then_some(())
    })
    .await;
    wait_for("kept back on v1", WAIT, || async {
        (runs_on(&db, kept.id, v1).await > runs_before).then_some(())
    })
    .await;

    // One transaction publishes a new version of 20 datasources on the new primary (16 are
    // named by notifications, the rest only by the outbox): each one applies.
    let ids: Vec<uuid::Uuid> = fleet.iter().map(|(id, _)| *id).collect();
    let published = publish_many(&db, &ids).await;
    for (i, (id, v)) in ids.iter().zip(&published).enumerate() {
        wait_running(&db, *id, *v, &format!("fleet-{i} on its new version")).await;
    }
    let text = metrics(&app).await;
    assert!(
        counter(&text, "dsreg_outbox_reanchors_total") >= 1.0,
        "{text}"
    );
    // The new history hands out no id the registry (or a client it served) already saw.
    for (id, v) in ids.iter().zip(&published) {
        for event in db.events(*id).await {
            if event.kind == "published" && event.version == Some(*v) {
                assert!(
                    event.id > seen_before,
                    "event {} of the new primary reuses an id at or below {seen_before}",
                    event.id
                );
            }
        }
    }
    // The stream opened on the lost history delivers the new primary's publishes.
    let mut awaited: std::collections::BTreeSet<(String, i32)> = ids
        .iter()
        .zip(&published)
        .map(|(id, v)| (id.to_string(), *v))
        .collect();
    while !awaited.is_empty() {
        let Ok(event) = tokio::time::timeout(WAIT, following.message()).await else {
            panic!("the stream across the failover never delivered {awaited:?}");
        };
        let event = event.unwrap().expect("the stream stays open");
        awaited.remove(&(event.datasource_id, event.version));
    }
    // A cursor from the lost history, beyond every id this one has: said, not skipped over.
    let beyond = seen_before + 1_000_000;
    let refused = feed
        .watch_events(dsreg::api::grpc::pb::WatchEventsRequest {
            datasource_id: String::new(),
            types: vec![],
            after_id: Some(beyond),
        })
        .await
        .expect_err("a cursor beyond the newest id is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains(&format!("after_id {beyond}")),
        "{refused:?}"
    );
    let resumed = feed
        .watch_events(dsreg::api::grpc::pb::WatchEventsRequest {
            datasource_id: String::new(),
            types: vec![],
            after_id: Some(seen_before),
        })
        .await;
    assert!(
        resumed.is_ok(),
        "a cursor the new history has passed resumes: {resumed:?}"
    );

    app.stop().await.unwrap();
    drop(db);
    drop(promoted);
    drop(primary);
    drop(standby);
}

/// A PostgreSQL client tool of `data`'s version, run as this process's user.
fn client_tool(data: &Path, name: &str) -> Command {
    let version = std::fs::read_to_string(data.join("PG_VERSION")).unwrap();
    let bin = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", version.trim())).join(name);
    Command::new(if bin.exists() { bin } else { name.into() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_a_dump_applies_publishes_and_never_reads_its_history_again() {
    // History written after transaction ids a fresh cluster will not reach for a while.
    let source = TestDb::new().await;
    source
        .client()
        .await
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..3000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
        )
        .await
        .unwrap();
    for i in 0..40 {
        let ds = source.datasource(&format!("old-{i}")).await;
        let v = source.version(ds.id, json!({ "rate_per_sec": 0 })).await;
        source.publish_sql(ds.id, v).await;
    }

    // Dumped, and restored into a database of a fresh cluster.
    let fresh = node().await;
    let dumps = tempfile::tempdir().unwrap();
    let dump = dumps.path().join("dsreg.dump");
    let mut pg_dump = client_tool(&fresh.data, "pg_dump");
    pg_dump
        .args(["-Fc", "-f"])
        .arg(&dump)
        .args(["-d", &source.url]);
    tokio::task::spawn_blocking(move || run(pg_dump, "pg_dump"))
        .await
        .unwrap();
    dsreg::db::create_database(&fresh.cluster.url("postgres"), "restored", None)
        .await
        .unwrap();
    let url = fresh.cluster.url("restored");
    let mut pg_restore = client_tool(&fresh.data, "pg_restore");
    pg_restore.args(["--no-owner", "-d", &url]).arg(&dump);
    tokio::task::spawn_blocking(move || run(pg_restore, "pg_restore"))
        .await
        .unwrap();
    let restored = client(&url).await;
    let (history, future): (i64, i64) = {
        let row = restored
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE xid > pg_current_xact_id())
                 FROM datasource_events WHERE dsreg_event_wakes(type)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        future >= 40,
        "the restored history has xids the fresh cluster has not reached ({future} of {history})"
    );

    let app = TestApp::spawn(&url, |_| {}).await;
    // The fixture's helpers, pointed at the restored database.
    let mut db = TestDb::on_server(&fresh.cluster.url("postgres")).await;
    db.pool = dsreg::db::pool(&url, 4, Duration::from_secs(10)).unwrap();

    // Publishes apply.
    let first = db.datasource("after-restore").await;
    let v = db.version(first.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(first.id, v).await;
    wait_running(&db, first.id, v, "a datasource published after the restore").await;

    // And reading the outbox costs what the new events cost, not the restored history.
    let before = counter(&metrics(&app).await, "dsreg_outbox_rows_read_total");
    let second = db.datasource("and-another").await;
    let v2 = db.version(second.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(second.id, v2).await;
    wait_running(&db, second.id, v2, "another datasource published").await;
    let read = counter(&metrics(&app).await, "dsreg_outbox_rows_read_total") - before;
    assert!(
        read < future as f64,
        "{read} rows read for one publish; the restored history has {future} rows with future xids"
    );

    app.stop().await.unwrap();
    drop(restored);
    drop(db);
    drop(fresh);
}
