//! Datasources from files: import (all or nothing, idempotent, every problem with its file and
//! line), a watched folder the database follows (edits, additions, deletions with and without
//! pruning, bursts of saves), conflicts under each policy, secrets a datasource waits for,
//! export → import as a no-op, and the real binary's `import`, `export` and `sync --watch`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use dsreg::connectors::Catalog;
use dsreg::db::repository::datasources::{self, Datasource};
use dsreg::db::repository::events::Event;
use dsreg::db::repository::versions;
use dsreg::domain::{DatasourceStatus, VersionState, WorkerStatus};
use dsreg::files::{Action, ConflictPolicy, Error, Mode, Options, Report, Syncer, WatchConfig};
use dsreg::transform::Limits;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cli::{dsreg, run};
use crate::helpers::{ServeProcess, TestApp, TestDb, put_secret, wait_for};

/// How soon the database follows a watched folder.
const FOLLOWS_WITHIN: Duration = Duration::from_secs(1);
/// A generous bound for conditions that are not the subject of the test.
const WAIT: Duration = Duration::from_secs(15);
const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A generator datasource file of `name` in acme/shop emitting records `{"n": rate}`.
fn generator(name: &str, rate: u32) -> String {
    format!(
        "org: acme\nproject: shop\nname: {name}\nkind: generator\nowner: team-shop\n\
         tags: [shop]\nconfig:\n  rate_per_sec: {rate}\n  template:\n    n: {rate}\n"
    )
}

fn write(dir: &Path, relative: &str, text: &str) -> PathBuf {
    let path = dir.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn syncer(db: &TestDb) -> Syncer {
    Syncer::new(db.pool.clone(), Catalog::builtin(), Limits::default())
}

fn import(conflict: ConflictPolicy) -> Options {
    Options {
        mode: Mode::Import,
        conflict,
        prune: false,
        dry_run: false,
    }
}

async fn import_dir(db: &TestDb, dir: &Path, options: Options) -> Result<Report, Error> {
    syncer(db).run(&[dir.to_owned()], options, None).await
}

fn actions(report: &Report) -> Vec<(String, Action)> {
    report
        .plan
        .steps
        .iter()
        .map(|s| (s.key.name.clone(), s.action))
        .collect()
}

/// The live datasource of acme/shop named `name`.
async fn live(db: &TestDb, name: &str) -> Option<Datasource> {
    datasources::by_names(
        &**db.client().await,
        &[("acme".into(), "shop".into(), name.into())],
        false,
    )
    .await
    .unwrap()
    .into_iter()
    .find(|d| d.status != DatasourceStatus::Archived)
}

async fn published_config(db: &TestDb, id: uuid::Uuid) -> Option<(i32, Value)> {
    versions::published(&**db.client().await, id)
        .await
        .unwrap()
        .map(|v| (v.version, v.config))
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Versions, events and audit rows in the whole database: what a no-op must leave as it is.
async fn footprint(db: &TestDb) -> (i64, i64, i64, i64) {
    (
        count(db, "SELECT count(*) FROM datasource_versions").await,
        count(db, "SELECT count(*) FROM datasource_events").await,
        count(db, "SELECT count(*) FROM audit_log").await,
        count(
            db,
            "SELECT coalesce(sum(revision), 0)::bigint FROM datasources",
        )
        .await,
    )
}

fn running_on(version: i32) -> impl Fn(&dsreg::db::repository::state::State) -> bool {
    move |s| s.worker_status == WorkerStatus::Running && s.running_version == Some(version)
}

async fn conflict_events(db: &TestDb, id: uuid::Uuid) -> Vec<Event> {
    db.events(id)
        .await
        .into_iter()
        .filter(|e| e.kind == "sync_conflict")
        .collect()
}

#[tokio::test]
async fn an_imported_folder_is_published_again_changes_nothing_and_an_edit_is_one_new_version() {
    let db = TestDb::new().await;
    let _app = TestApp::spawn(&db.url, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let orders = write(dir.path(), "shop/orders.yaml", &generator("orders", 1));
    write(
        dir.path(),
        "shop/more.yml",
        "- org: acme\n  project: shop\n  name: carts\n  kind: generator\n  status: disabled\n\
         - org: acme\n  project: shop\n  name: users\n  kind: generator\n\
         \x20 transform: |\n    record.seen = true;\n    record\n",
    );
    write(dir.path(), "README.md", "not a datasource file");

    let first = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();

    assert_eq!(
        actions(&first),
        [
            ("carts".into(), Action::Create),
            ("users".into(), Action::Create),
            ("orders".into(), Action::Create)
        ]
    );
    let ds = live(&db, "orders").await.unwrap();
    assert_eq!(
        (ds.owner.as_str(), ds.tags.as_slice()),
        ("team-shop", &["shop".to_owned()][..])
    );
    assert_eq!(
        published_config(&db, ds.id).await.unwrap(),
        (1, json!({"rate_per_sec": 1, "template": {"n": 1}}))
    );
    let users = live(&db, "users").await.unwrap();
    assert_eq!(
        published_config(&db, users.id).await.unwrap().1["transform"],
        "record.seen = true;\nrecord\n"
    );
    assert_eq!(
        live(&db, "carts").await.unwrap().status,
        DatasourceStatus::Disabled
    );
    db.wait_for_state(ds.id, "orders RUNNING on v1", running_on(1))
        .await;
    db.wait_for_state(users.id, "users RUNNING on v1", running_on(1))
        .await;
    let audit = db
        .client()
        .await
        .query(
            "SELECT actor, action FROM audit_log WHERE resource = $1",
            &[&format!("datasource/{}", ds.id)],
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    let actor: String = audit[0].get(0);
    assert_eq!(
        actor,
        format!("file:{}", std::fs::canonicalize(&orders).unwrap().display())
    );
    assert_eq!(audit[0].get::<_, String>(1), "files.import");

    // Again: nothing changes.
    let before = footprint(&db).await;
    let again = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();
    assert!(
        again
            .plan
            .steps
            .iter()
            .all(|s| s.action == Action::Unchanged),
        "{:?}",
        actions(&again)
    );
    assert!(!again.applied);
    assert_eq!(footprint(&db).await, before);

    // One edit: one new version, one reload.
    let events_of_users = db.events(users.id).await.len();
    write(dir.path(), "shop/orders.yaml", &generator("orders", 2));
    let edited = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();
    let changed: Vec<_> = edited
        .plan
        .steps
        .iter()
        .filter(|s| s.action != Action::Unchanged)
        .map(|s| (s.key.name.as_str(), s.action, s.version))
        .collect();
    assert_eq!(changed, [("orders", Action::NewVersion, Some(2))]);
    assert_eq!(
        published_config(&db, ds.id).await.unwrap(),
        (2, json!({"rate_per_sec": 2, "template": {"n": 2}}))
    );
    db.wait_for_state(ds.id, "orders RUNNING on v2", running_on(2))
        .await;
    let published = db
        .event_kinds(ds.id)
        .await
        .into_iter()
        .filter(|k| k == "published")
        .count();
    assert_eq!(published, 2, "one publish per version");
    assert_eq!(
        db.events(users.id).await.len(),
        events_of_users,
        "the others are untouched"
    );
}

#[tokio::test]
async fn an_invalid_file_among_valid_ones_applies_nothing_and_every_problem_has_its_file_and_line()
{
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a-good.yaml", &generator("good", 1));
    write(
        dir.path(),
        "b-bad.yaml",
        "org: acme\nproject: shop\nname: bad\nkind: generator\nconfig:\n  template: {}\n  \
         rate_per_sec: fast\nschedule: hourly\n",
    );
    write(
        dir.path(),
        "c-broken.yaml",
        "org: acme\nproject: shop\n  name: broken\n",
    );
    write(
        dir.path(),
        "d-list.yaml",
        "- org: acme\n  project: shop\n  name: good\n  kind: generator\n\
         - org: acme\n  project: shop\n  name: hook\n  kind: webhook\n\
         - org: acme\n  project: shop\n  name: script\n  kind: generator\n  transform: |\n    \
         let x = 1;\n    let = ;\n",
    );

    let err = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap_err();

    let Error::Problems(problems) = err else {
        panic!("{err}");
    };
    let found: Vec<(String, usize, String)> = problems
        .iter()
        .map(|p| {
            (
                p.path.file_name().unwrap().to_string_lossy().into_owned(),
                p.line,
                p.message
                    .split([':', '('])
                    .next()
                    .unwrap()
                    .trim()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("a-good.yaml".into(), 1, "defined more than once".into()),
            ("b-bad.yaml".into(), 8, "schedule".into()),
            ("c-broken.yaml".into(), 3, "not valid YAML".into()),
            ("d-list.yaml".into(), 1, "defined more than once".into()),
            ("d-list.yaml".into(), 8, "secrets.webhook_secret".into()),
            ("d-list.yaml".into(), 15, "transform".into()),
        ],
        "{problems:#?}"
    );
    assert!(
        problems[0].message.contains("d-list.yaml:1"),
        "{problems:#?}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM datasources").await, 0);

    // With the duplicate and the broken files gone, the schema problem is still reported at
    // its line, and still nothing is applied.
    std::fs::remove_file(dir.path().join("c-broken.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("d-list.yaml")).unwrap();
    write(
        dir.path(),
        "b-bad.yaml",
        "org: acme\nproject: shop\nname: bad\nkind: generator\nconfig:\n  template: {}\n  \
         rate_per_sec: fast\n",
    );
    let Error::Problems(problems) = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap_err()
    else {
        panic!("problems expected");
    };
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, 7);
    assert!(
        problems[0]
            .to_string()
            .contains("b-bad.yaml:7: acme/shop/bad: config.rate_per_sec: "),
        "{}",
        problems[0]
    );
    assert_eq!(count(&db, "SELECT count(*) FROM datasources").await, 0);
}

#[tokio::test]
async fn a_datasource_whose_secrets_are_missing_waits_as_a_draft_until_they_are_put() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "hook.yaml",
        "org: acme\nproject: shop\nname: hook\nkind: webhook\nsecrets: [webhook_secret]\n",
    );

    let first = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();
    let again = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();
    let hook = live(&db, "hook").await.unwrap();
    let drafts = versions::list(&**db.client().await, hook.id).await.unwrap();
    put_secret(&db, MASTER_KEYS, hook.id, "webhook_secret", "whsec-1").await;
    let published = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();

    assert_eq!(first.plan.steps[0].action, Action::Create);
    assert_eq!(first.plan.steps[0].waiting_for, ["webhook_secret"]);
    assert_eq!(again.plan.steps[0].action, Action::Unchanged);
    assert_eq!(again.plan.steps[0].waiting_for, ["webhook_secret"]);
    assert_eq!(drafts.len(), 1, "waiting makes no second draft");
    assert_eq!(drafts[0].state, VersionState::Draft);
    assert_eq!(published.plan.steps[0].action, Action::Publish);
    assert_eq!(published_config(&db, hook.id).await.unwrap().0, 1);
}

#[tokio::test]
async fn each_conflict_policy_settles_a_conflict_and_records_it_as_an_event() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let canary = format!("canary-{}", uuid::Uuid::new_v4().simple());
    let file = |rate: u32| {
        format!(
            "org: acme\nproject: shop\nname: orders\nkind: generator\nconfig:\n  \
             rate_per_sec: {rate}\n  template:\n    note: {canary}\n"
        )
    };
    write(dir.path(), "orders.yaml", &file(1));
    import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();
    let ds = live(&db, "orders").await.unwrap();
    // Changed in the database (a publisher), then in the file.
    let v2 = db.version(ds.id, json!({ "rate_per_sec": 7 })).await;
    db.publish_sql(ds.id, v2).await;
    write(dir.path(), "orders.yaml", &file(3));

    // fail: nothing applied, the conflict recorded.
    let Error::Problems(problems) = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap_err()
    else {
        panic!("a conflict under fail is refused");
    };
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].to_string().contains(
            "orders.yaml:1: acme/shop/orders: conflict: changed in the database since this \
             file's last sync (version 1 → 2)"
        ),
        "{}",
        problems[0]
    );
    assert_eq!(published_config(&db, ds.id).await.unwrap().0, v2);

    // db-wins: the database's version stands; the file's edit is taken as seen.
    let kept = import_dir(&db, dir.path(), import(ConflictPolicy::DbWins))
        .await
        .unwrap();
    assert_eq!(actions(&kept), [("orders".into(), Action::Conflict)]);
    assert_eq!(published_config(&db, ds.id).await.unwrap().0, v2);
    let quiet = import_dir(&db, dir.path(), import(ConflictPolicy::DbWins))
        .await
        .unwrap();
    assert_eq!(actions(&quiet), [("orders".into(), Action::Unchanged)]);

    // file-wins: after another change on both sides, the file is applied over it.
    let v3 = db.version(ds.id, json!({ "rate_per_sec": 9 })).await;
    db.publish_sql(ds.id, v3).await;
    write(dir.path(), "orders.yaml", &file(5));
    let applied = import_dir(&db, dir.path(), import(ConflictPolicy::FileWins))
        .await
        .unwrap();
    assert_eq!(actions(&applied), [("orders".into(), Action::NewVersion)]);
    let (now, config) = published_config(&db, ds.id).await.unwrap();
    assert_eq!((now, &config["rate_per_sec"]), (v3 + 1, &json!(5)));

    let events = conflict_events(&db, ds.id).await;
    let seen: Vec<Value> = events
        .iter()
        .map(|e| {
            json!([
                e.payload["resolution"],
                e.payload["policy"],
                e.payload["synced_version"],
                e.payload["database_version"],
                e.payload["file_version"],
            ])
        })
        .collect();
    assert_eq!(
        seen,
        [
            json!(["failed", "fail", 1, 2, null]),
            json!(["db_wins", "db-wins", 1, 2, null]),
            json!(["file_wins", "file-wins", 2, v3, v3 + 1]),
        ]
    );
    let path = std::fs::canonicalize(dir.path().join("orders.yaml")).unwrap();
    for e in &events {
        assert_eq!(e.payload["file"], path.display().to_string());
        assert_eq!(e.actor, format!("file:{}", path.display()));
        assert!(!e.payload.to_string().contains(&canary), "{}", e.payload);
    }
}

/// A registry that keeps `db` in step with `dir`.
async fn watching(db: &TestDb, dir: &Path, prune: bool) -> TestApp {
    watching_with(db, dir, prune, Duration::from_millis(100)).await
}

/// A registry that keeps `db` in step with `dir`, passing once changes have been quiet for
/// `debounce`.
async fn watching_with(db: &TestDb, dir: &Path, prune: bool, debounce: Duration) -> TestApp {
    let config = WatchConfig {
        dir: dir.to_owned(),
        conflict: ConflictPolicy::Fail,
        prune,
        debounce,
        rescan_interval: Duration::from_secs(30),
    };
    TestApp::spawn(&db.url, move |app| app.file_sync = Some(config)).await
}

/// Waits until `check` holds, failing after [`FOLLOWS_WITHIN`] from `since`.
async fn follows<T, F, Fut>(what: &str, since: Instant, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let value = wait_for(what, FOLLOWS_WITHIN * 3, check).await;
    assert!(
        since.elapsed() <= FOLLOWS_WITHIN,
        "{what} took {:?}",
        since.elapsed()
    );
    value
}

/// Saves `orders.yaml` at rate 2; waits for version 2 to be published within
/// [`FOLLOWS_WITHIN`] and for the worker to run it.
async fn edit_orders_to_v2(db: &TestDb, dir: &Path, id: uuid::Uuid) {
    let edited = Instant::now();
    write(dir, "orders.yaml", &generator("orders", 2));
    follows("the edit", edited, || async {
        published_rate(db, "orders").await.filter(|r| *r == (2, 2))
    })
    .await;
    db.wait_for_state(id, "orders RUNNING on v2", running_on(2))
        .await;
}

async fn published_rate(db: &TestDb, name: &str) -> Option<(i32, u64)> {
    let ds = live(db, name).await?;
    let (version, config) = published_config(db, ds.id).await?;
    Some((version, config["rate_per_sec"].as_u64()?))
}

#[tokio::test]
async fn a_watched_folder_is_followed_within_a_second_and_a_removed_file_is_kept_without_prune() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "orders.yaml", &generator("orders", 1));
    let _app = watching(&db, dir.path(), false).await;
    wait_for("the first pass", WAIT, || async {
        published_rate(&db, "orders").await.filter(|r| *r == (1, 1))
    })
    .await;
    let orders = live(&db, "orders").await.unwrap();
    db.wait_for_state(orders.id, "orders RUNNING on v1", running_on(1))
        .await;

    // An edit.
    edit_orders_to_v2(&db, dir.path(), orders.id).await;

    // A new file.
    let added = Instant::now();
    write(dir.path(), "more/carts.yaml", &generator("carts", 1));
    follows("the new file", added, || async {
        published_rate(&db, "carts").await.filter(|r| *r == (1, 1))
    })
    .await;

    // A removed file, without pruning: once a later edit is in, the removal was seen too,
    // and the datasource is still there.
    std::fs::remove_file(dir.path().join("more/carts.yaml")).unwrap();
    let removed = Instant::now();
    write(dir.path(), "orders.yaml", &generator("orders", 3));
    follows("the edit after the removal", removed, || async {
        published_rate(&db, "orders").await.filter(|r| *r == (3, 3))
    })
    .await;
    let carts = live(&db, "carts").await.expect("not pruned");
    assert_eq!(carts.status, DatasourceStatus::Active);
}

#[tokio::test]
async fn with_prune_a_removed_file_archives_its_datasource_within_a_second() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "orders.yaml", &generator("orders", 1));
    write(dir.path(), "carts.yaml", &generator("carts", 1));
    let _app = watching(&db, dir.path(), true).await;
    let carts = wait_for("the first pass", WAIT, || async {
        live(&db, "carts")
            .await
            .filter(|d| d.current_version == Some(1))
    })
    .await;
    db.wait_for_state(carts.id, "carts RUNNING", running_on(1))
        .await;

    let removed = Instant::now();
    std::fs::remove_file(dir.path().join("carts.yaml")).unwrap();
    follows("the archive", removed, || async {
        live(&db, "carts").await.is_none().then_some(())
    })
    .await;

    db.wait_for_state(carts.id, "carts stopped", |s| {
        s.worker_status == WorkerStatus::Stopped
    })
    .await;
    assert!(live(&db, "orders").await.is_some());
    let archived = datasources::get(&**db.client().await, carts.id)
        .await
        .unwrap();
    assert_eq!(archived.status, DatasourceStatus::Archived);
    assert_eq!(
        archived.updated_by,
        format!(
            "file:{}",
            std::fs::canonicalize(dir.path())
                .unwrap()
                .join("carts.yaml")
                .display()
        )
    );
}

#[tokio::test]
async fn a_burst_of_saves_in_a_watched_folder_is_one_version() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "orders.yaml", &generator("orders", 1));
    // A debounce window far longer than the burst takes, however busy the machine: the
    // saves below follow each other within milliseconds. (How the window groups changes by
    // their spacing is the debounce's own unit tests' job.)
    let _app = watching_with(&db, dir.path(), false, Duration::from_secs(5)).await;
    wait_for("the first pass", WAIT, || async {
        published_rate(&db, "orders").await.filter(|r| *r == (1, 1))
    })
    .await;

    // Ten saves back to back: each within the debounce window of the one before.
    for rate in 2..=11 {
        write(dir.path(), "orders.yaml", &generator("orders", rate));
    }
    let (version, _) = wait_for("the last save", WAIT, || async {
        published_rate(&db, "orders").await.filter(|r| r.1 == 11)
    })
    .await;

    assert_eq!(version, 2, "one version for the whole burst");
    let ds = live(&db, "orders").await.unwrap();
    assert_eq!(
        versions::list(&**db.client().await, ds.id)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn export_then_import_changes_nothing() {
    let db = TestDb::new().await;
    let orders = db.datasource("orders").await;
    let v = db
        .version(
            orders.id,
            json!({
                "rate_per_sec": 1.5, "count": 10,
                "template": {"flag": "true", "empty": "", "list": [1, "two", null], "big": 1e300},
                "transform": "let r = record;\nr.seen = true;\nr\n",
                "output_schema": {"type": "object"}
            }),
        )
        .await;
    db.publish_sql(orders.id, v).await;
    let hook = db.datasource_of("hook", "webhook").await;
    put_secret(&db, MASTER_KEYS, hook.id, "webhook_secret", "whsec-1").await;
    let v = db.version(hook.id, json!({ "max_body_bytes": 1024 })).await;
    db.publish_sql(hook.id, v).await;
    let paused = db.datasource("paused").await;
    let v = db.version(paused.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(paused.id, v).await;
    db.set_status(paused.id, "disabled").await;
    let never = db.datasource("never-published").await;
    db.version(never.id, json!({})).await;
    let dir = tempfile::tempdir().unwrap();

    let exported = dsreg::files::export::export(
        &db.pool,
        &dsreg::files::export::ExportOptions {
            dir: dir.path().to_owned(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = footprint(&db).await;
    let dry = import_dir(
        &db,
        dir.path(),
        Options {
            dry_run: true,
            ..import(ConflictPolicy::Fail)
        },
    )
    .await
    .unwrap();
    let imported = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();
    let again = import_dir(&db, dir.path(), import(ConflictPolicy::Fail))
        .await
        .unwrap();

    assert_eq!(exported.written.len(), 3);
    assert_eq!(exported.unpublished.len(), 1);
    let hook_file = std::fs::read_to_string(dir.path().join("acme/core/hook.yaml")).unwrap();
    assert!(
        hook_file.contains("secrets:\n  - webhook_secret\n"),
        "{hook_file}"
    );
    assert!(!hook_file.contains("whsec-1"));
    for report in [&dry, &imported, &again] {
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            actions(report),
            [
                ("hook".into(), Action::Unchanged),
                ("orders".into(), Action::Unchanged),
                ("paused".into(), Action::Unchanged)
            ]
        );
    }
    assert_eq!(
        footprint(&db).await,
        before,
        "no version, event, audit row or revision"
    );
    // Export again: every file already says the same.
    let second = dsreg::files::export::export(
        &db.pool,
        &dsreg::files::export::ExportOptions {
            dir: dir.path().to_owned(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((second.written.len(), second.unchanged.len()), (0, 3));
}

#[tokio::test]
async fn the_binary_imports_with_a_dry_run_a_plan_and_problems_and_exports() {
    let db = TestDb::new().await;
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "orders.yaml", &generator("orders", 1));
    write(dir.path(), "carts.yaml", &generator("carts", 1));
    let folder = dir.path().to_str().unwrap();
    let dsreg_on = |args: &[&str]| {
        let mut command = dsreg(home.path());
        command.env("DATABASE_URL", &db.url).args(args);
        command
    };

    let dry = run(dsreg_on(&["import", "--dry-run", folder]), None).await;
    let applied = run(dsreg_on(&["import", folder, "-o", "json"]), None).await;
    write(
        dir.path(),
        "carts.yaml",
        "org: acme\nproject: shop\nname: carts\nkind: generator\nconfig:\n  rate_per_sec: -1\n",
    );
    let refused = run(dsreg_on(&["import", folder]), None).await;
    let out = home.path().join("export");
    let exported = run(dsreg_on(&["export", out.to_str().unwrap()]), None).await;

    dry.assert_success();
    assert!(dry.stdout.starts_with("ACTION "), "{}", dry.stdout);
    assert_eq!(
        dry.stdout.matches("would create").count(),
        2,
        "{}",
        dry.stdout
    );
    assert!(
        dry.stderr.contains("dry run: nothing written"),
        "{}",
        dry.stderr
    );
    applied.assert_success();
    let steps = applied.json_lines();
    assert_eq!(steps.len(), 2);
    assert!(
        steps
            .iter()
            .all(|s| s["action"] == "create" && s["version"] == 1)
    );
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("carts.yaml:6: acme/shop/carts: config.rate_per_sec: "),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("nothing was applied"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        published_rate(&db, "carts").await,
        Some((1, 1)),
        "the refused import changed nothing"
    );
    exported.assert_success();
    assert!(
        exported.stdout.starts_with("wrote 2 file(s)"),
        "{}",
        exported.stdout
    );
    assert_eq!(
        std::fs::read_to_string(out.join("acme/shop/orders.yaml")).unwrap(),
        "org: acme\nproject: shop\nname: orders\nkind: generator\nstatus: active\n\
         owner: team-shop\ntags:\n  - shop\nconfig:\n  rate_per_sec: 1\n  template:\n    n: 1\n"
    );
}

#[tokio::test]
async fn the_binary_syncs_a_watched_folder_until_ctrl_c() {
    let db = TestDb::new().await;
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "orders.yaml", &generator("orders", 1));
    let mut command = dsreg(home.path());
    command
        .env("DATABASE_URL", &db.url)
        .args(["sync", "--watch", dir.path().to_str().unwrap()])
        .args(["--debounce-ms", "50", "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a change within the wait")
            .unwrap()
            .expect("the command is running");
        serde_json::from_str(&line).unwrap()
    };

    let created = next().await;
    write(dir.path(), "orders.yaml", &generator("orders", 2));
    let edited = next().await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("sync stops on Ctrl-C")
        .unwrap();

    assert_eq!(
        (&created["action"], &created["version"]),
        (&json!("create"), &json!(1))
    );
    assert_eq!(
        (&edited["action"], &edited["version"], &edited["datasource"]),
        (&json!("new version"), &json!(2), &json!("acme/shop/orders"))
    );
    assert!(status.success(), "{status:?}");
    assert_eq!(published_rate(&db, "orders").await, Some((2, 2)));
}

#[tokio::test]
async fn serve_with_a_sync_folder_runs_what_the_files_define() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "orders.yaml", &generator("orders", 1));

    let _serve = ServeProcess::start(
        &db.url,
        &[
            ("DSREG_SYNC_DIR", dir.path().to_str().unwrap()),
            ("DSREG_SYNC_DEBOUNCE_MS", "50"),
        ],
    )
    .await;
    let orders = wait_for("the datasource from the file", WAIT, || async {
        live(&db, "orders").await
    })
    .await;
    db.wait_for_state(orders.id, "RUNNING on v1", running_on(1))
        .await;
    edit_orders_to_v2(&db, dir.path(), orders.id).await;
}
