//! The registry behind a transaction-mode PgBouncer: the pool runs through it (nothing it
//! runs keeps session state or named statements across transactions) while the LISTEN
//! connection goes direct (`--listen-database-url`); with the listener behind it too, the
//! notification self-test reports the broken path and the outbox poll keeps publishes
//! converging. Statements prepared by name run only on sessions; one that a session does not
//! hold (a pooler between, `DEALLOCATE`) is sent again unnamed.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::db::repository::state::{self, DesiredFor};
use dsreg::db::repository::typed::{self, Pooled, Run as _};
use dsreg::domain::WorkerStatus;
use serde_json::json;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};
use crate::pgbouncer::PgBouncer;
use crate::serve::http_get;

/// Datasources published at once: more than PgBouncer's server sessions, so the registry's
/// statements share them.
const DATASOURCES: usize = 8;

async fn grpc(app: &TestApp) -> Channel {
    Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC port")
}

fn running_on(version: i32) -> impl Fn(&dsreg::db::repository::state::State) -> bool {
    move |s| s.worker_status == WorkerStatus::Running && s.running_version == Some(version)
}

/// Publishes a new version of each of `ids` and waits until every worker runs it.
async fn publish_and_wait(db: &TestDb, ids: &[Uuid], rate: i32, what: &str) -> Vec<i32> {
    let mut versions = Vec::new();
    for id in ids {
        let v = db.version(*id, json!({ "rate_per_sec": rate })).await;
        db.publish_sql(*id, v).await;
        versions.push(v);
    }
    for (id, v) in ids.iter().zip(&versions) {
        db.wait_for_state(*id, &format!("{what}: RUNNING on v{v}"), running_on(*v))
            .await;
    }
    versions
}

/// Settings that leave the full resync out of the picture: only notifications (or the
/// fallback poll) can bring a publish to a worker within a test's time.
fn without_resync(pool_url: &str) -> dsreg::config::Settings {
    let mut settings = test_settings(pool_url);
    settings.resync_interval_ms = 3_600_000;
    settings
}

#[tokio::test]
async fn the_pool_runs_through_a_transaction_pooler_with_the_listener_direct() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::transaction_mode(&db.url).await;
    let mut settings = without_resync(&bouncer.url(&db.name));
    settings.listen_database_url = Some(db.url.clone());
    let app = TestApp::spawn_with(settings, |_| {}).await;

    let mut ids = Vec::new();
    for n in 0..DATASOURCES {
        ids.push(db.datasource(&format!("pooled-{n}")).await.id);
    }
    let first = publish_and_wait(&db, &ids, 100, "first publish").await;
    wait_for("records in the sink", Duration::from_secs(60), || async {
        (db.records(ids[0], first[0]).await > 0).then_some(())
    })
    .await;
    publish_and_wait(&db, &ids, 150, "hot reload").await;

    // The API's writes go through the pooler too: create, version, publish.
    let mut api = DatasourcesClient::new(grpc(&app).await);
    let created = api
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "pooled".into(),
            name: "by-api".into(),
            kind: "generator".into(),
            owner: "team-data".into(),
            tags: vec!["eu".into()],
            description: "through a transaction pooler".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let version = api
        .create_version(pb::CreateVersionRequest {
            datasource_id: created.id.clone(),
            config_json: json!({ "rate_per_sec": 50 }).to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    api.publish_version(pb::PublishVersionRequest {
        datasource_id: created.id.clone(),
        version: version.version,
    })
    .await
    .unwrap();
    db.wait_for_state(
        created.id.parse().unwrap(),
        "the API's publish RUNNING",
        running_on(version.version),
    )
    .await;
    let listed = api
        .list_datasources(pb::ListDatasourcesRequest {
            org: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.datasources.len(), DATASOURCES + 1);

    // The direct listener receives what the pool sends: the path works, the registry is ready.
    wait_for(
        "the notification self-test to pass",
        Duration::from_secs(60),
        || async { app.listener_stats.path.working().then_some(()) },
    )
    .await;
    let http = app.http_addr.to_string();
    let (code, body) = http_get(&http, "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "ready\n"),
        "{}",
        bouncer.log_tail()
    );
    let (_, metrics) = http_get(&http, "/metrics").await;
    assert!(
        metrics.contains("\ndsreg_notification_path_ok 1\n"),
        "{metrics}"
    );
    // The registry's statements did go through the pooler.
    assert!(bouncer.transactions(&db.name).await > 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_listener_behind_a_transaction_pooler_is_reported_and_publishes_converge_by_polling() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::transaction_mode(&db.url).await;
    // Both the pool and the listener behind the pooler (no --listen-database-url): LISTEN
    // runs on a server session that goes straight back to the pool, and nothing arrives.
    let app = TestApp::spawn_with(without_resync(&bouncer.url(&db.name)), |_| {}).await;
    let http = app.http_addr.to_string();

    let reason = wait_for(
        "readiness to report the broken notification path",
        Duration::from_secs(30),
        || async {
            let (code, body) = http_get(&http, "/readyz").await;
            (code == 503 && body.contains("notification path is broken")).then_some(body)
        },
    )
    .await;
    assert!(reason.contains("--listen-database-url"), "{reason}");
    assert!(
        !reason.contains(&bouncer.url(&db.name)),
        "no URL in {reason}"
    );
    let (_, metrics) = http_get(&http, "/metrics").await;
    assert!(
        metrics.contains("\ndsreg_notification_path_ok 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("\ndsreg_notification_path_failures_total 0\n"),
        "{metrics}"
    );

    let health = tonic_health::pb::health_client::HealthClient::new(grpc(&app).await);
    wait_for("gRPC health NOT_SERVING", Duration::from_secs(30), || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .ok()?
                .into_inner()
                .status;
            (status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)
                .then_some(())
        }
    })
    .await;

    // Publishes still reach running workers: the outbox is polled.
    let mut ids = Vec::new();
    for n in 0..DATASOURCES {
        ids.push(db.datasource(&format!("polled-{n}")).await.id);
    }
    publish_and_wait(&db, &ids, 100, "first publish, polled").await;
    publish_and_wait(&db, &ids, 150, "hot reload, polled").await;
    let stats = &app.listener_stats;
    assert!(stats.connected.load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        stats.path.problem().is_some(),
        "the path stays reported broken while nothing arrives"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn migrations_run_through_a_transaction_pooler() {
    let db = TestDb::new().await;
    let admin = crate::helpers::with_database(&db.url, "postgres");
    let name = format!("m_{}", Uuid::new_v4().simple());
    dsreg::db::create_database(&admin, &name, None)
        .await
        .unwrap();
    let bouncer = PgBouncer::transaction_mode(&db.url).await;
    let migrated = dsreg::app::migrate(&bouncer.url(&name)).await;
    let direct = dsreg::db::connect(&crate::helpers::with_database(&admin, &name))
        .await
        .unwrap();
    let version = dsreg::db::migrations::current_version(&direct).await;
    drop(direct);
    drop(bouncer);
    dsreg::db::drop_database(&admin, &name).await.unwrap();
    let latest = dsreg::db::migrations::latest_known();
    assert_eq!(migrated.unwrap(), latest);
    assert_eq!(version.unwrap(), latest);
}

#[tokio::test]
async fn a_path_that_heals_is_reported_working_again_and_notifications_take_over() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::transaction_mode(&db.url).await;
    let mut settings = without_resync(&bouncer.url(&db.name));
    settings.listen_database_url = Some(db.url.clone());
    settings.notification_check_interval_ms = 1_000;
    settings.notification_check_timeout_ms = 2_000;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let http = app.http_addr.to_string();
    let path = &app.listener_stats.path;
    wait_for(
        "the first self-test to pass",
        Duration::from_secs(60),
        || async { path.working().then_some(()) },
    )
    .await;

    // The pooler holds every statement: the token cannot even be sent.
    bouncer.admin(&format!("PAUSE {}", db.name)).await;
    let cause = wait_for("the self-test to fail", Duration::from_secs(30), || async {
        path.problem()
    })
    .await;
    assert!(
        cause.contains("could not be sent through the pool"),
        "{cause}"
    );
    assert!(path.failures() > 0);
    let (code, _) = http_get(&http, "/readyz").await;
    assert_eq!(code, 503);

    bouncer.admin(&format!("RESUME {}", db.name)).await;
    wait_for(
        "the self-test to pass again",
        Duration::from_secs(60),
        || async { path.working().then_some(()) },
    )
    .await;
    let (code, body) = wait_for("ready again", Duration::from_secs(30), || async {
        let (code, body) = http_get(&http, "/readyz").await;
        (code == 200).then_some((code, body))
    })
    .await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (_, metrics) = http_get(&http, "/metrics").await;
    assert!(
        metrics.contains("\ndsreg_notification_path_ok 1\n"),
        "{metrics}"
    );
    let ds = db.datasource("after-healing").await;
    publish_and_wait(&db, &[ds.id], 100, "publish after healing").await;
    app.stop().await.unwrap();
}

/// The statements the session holds as prepared whose text starts with `start`.
async fn prepared_like(client: &deadpool_postgres::Client, start: &str) -> i64 {
    client
        .query_typed_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE $1 || '%'",
            &typed::params(&[&start]),
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn statements_run_by_name_on_a_session_and_unnamed_when_the_session_lost_them() {
    let db = TestDb::new().await;
    let ds = db.datasource("prepared").await;
    let v = db.version(ds.id, json!({ "rate_per_sec": 5 })).await;
    db.publish_sql(ds.id, v).await;
    let read = |rows: Vec<state::Desired>| {
        assert_eq!(rows.len(), 1);
        (rows[0].datasource_id, rows[0].version)
    };

    let client = db.client().await;
    for _ in 0..3 {
        let rows = state::desired(&Pooled::new(&client, true), DesiredFor::Ids(&[ds.id]), true)
            .await
            .unwrap();
        assert_eq!(read(rows), (ds.id, Some(v)));
    }
    assert_eq!(prepared_like(&client, "SELECT d.id, d.kind").await, 1);

    // The session forgets it, as a server session handed over by a pooler would not have it:
    // the read still answers, and the statement is prepared again after.
    client.batch_execute("DEALLOCATE ALL").await.unwrap();
    let pooled = Pooled::new(&client, true);
    let rows = state::desired(&pooled, DesiredFor::Ids(&[ds.id]), true)
        .await
        .unwrap();
    assert_eq!(read(rows), (ds.id, Some(v)));
    assert_eq!(prepared_like(&client, "SELECT d.id, d.kind").await, 0);
    let rows = pooled.rows("SELECT $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    state::desired(&pooled, DesiredFor::Ids(&[ds.id]), true)
        .await
        .unwrap();
    assert_eq!(prepared_like(&client, "SELECT d.id, d.kind").await, 1);

    // A statement that fails for what it does fails as it would unnamed, and is not retried.
    let err = pooled
        .rows("SELECT 1 / $1::int", &[&0i32])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );

    // Unprepared: nothing is kept on the session.
    let other = db.client().await;
    other.batch_execute("DEALLOCATE ALL").await.unwrap();
    state::desired(&Pooled::new(&other, false), DesiredFor::Ids(&[ds.id]), true)
        .await
        .unwrap();
    assert_eq!(prepared_like(&other, "").await, 0);
}

#[tokio::test]
async fn statements_prepared_behind_a_pooler_that_keeps_none_still_bring_publishes_to_workers() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::transaction_mode(&db.url).await;
    let mut settings = without_resync(&bouncer.url(&db.name));
    settings.listen_database_url = Some(db.url.clone());
    // Told to prepare although the pooler hands each transaction any server session.
    settings.prepared_statements = dsreg::config::PreparedStatements::On;
    let app = TestApp::spawn_with(settings, |_| {}).await;

    let mut ids = Vec::new();
    for n in 0..DATASOURCES {
        ids.push(db.datasource(&format!("named-{n}")).await.id);
    }
    let first = publish_and_wait(&db, &ids, 100, "first publish").await;
    publish_and_wait(&db, &ids, 150, "hot reload").await;
    wait_for("records in the sink", Duration::from_secs(60), || async {
        (db.records(ids[0], first[0]).await > 0).then_some(())
    })
    .await;
    assert!(bouncer.transactions(&db.name).await > 0);
    app.stop().await.unwrap();
}
