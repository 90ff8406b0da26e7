//! The server's NOTIFY queue: its usage is a metric, and a change refused at COMMIT with the
//! SQLSTATE of a full queue (54000) is answered UNAVAILABLE with a retry hint, nothing of it
//! written.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::helpers::{OwnServer, TestApp, wait_for};

const WAIT: Duration = Duration::from_secs(60);

async fn channel(app: &TestApp) -> Channel {
    Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_queue_usage_is_a_metric_that_rises_while_a_listener_lags() {
    // The NOTIFY queue and the horizon are the server's: a server of its own.
    let server = OwnServer::start().await;
    let db = server.db().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    let usage = || async {
        let text = http
            .get(format!("http://{}/metrics", app.http_addr))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("dsreg_outbox_notify_queue_usage_ratio "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    wait_for("the gauge in the scrape", WAIT, || async { usage().await }).await;

    // A listening session inside a transaction reads nothing: the queue's tail stays where it
    // is while 16 MB of notifications are queued behind it.
    let mut laggard = db.client().await;
    laggard.batch_execute("LISTEN w22b_lagging").await.unwrap();
    let open = laggard.transaction().await.unwrap();
    open.batch_execute("SELECT 1").await.unwrap();
    db.client()
        .await
        .batch_execute(
            "SELECT pg_notify('w22b_lagging', repeat('x', 7900) || i) FROM generate_series(1, 2000) i",
        )
        .await
        .unwrap();
    let risen = wait_for("the gauge to rise", WAIT, || async {
        usage().await.filter(|u| *u > 0.0)
    })
    .await;
    assert!(risen < 0.5, "{risen}");
    open.rollback().await.unwrap();
    laggard.batch_execute("UNLISTEN *").await.unwrap();
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_at_commit_for_a_full_notify_queue_is_unavailable_and_writes_nothing() {
    // The NOTIFY queue and the horizon are the server's: a server of its own.
    let server = OwnServer::start().await;
    let db = server.db().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let mut ds = DatasourcesClient::new(channel(&app).await);
    let created = ds
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "queued".into(),
            kind: "generator".into(),
            owner: "team-data".into(),
            tags: vec![],
            description: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let v = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: created.id.clone(),
            config_json: serde_json::json!({ "rate_per_sec": 0 }).to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The server refuses the COMMIT the way a full queue does (SQLSTATE 54000, raised at
    // commit, after every statement of the transaction succeeded). Filling the real queue
    // takes 8 GB.
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION w22b_queue_full() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION 'too many notifications in the NOTIFY queue'
                     USING ERRCODE = 'program_limit_exceeded';
             END $$;
             CREATE CONSTRAINT TRIGGER w22b_queue_full AFTER UPDATE ON datasource_versions
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION w22b_queue_full();",
        )
        .await
        .unwrap();
    let refused = ds
        .publish_version(pb::PublishVersionRequest {
            datasource_id: created.id.clone(),
            version: v.version,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("nothing was written"),
        "{refused:?}"
    );
    let retry = refused.get_details_retry_info().expect("a retry hint");
    assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));

    // Nothing half-written: the version is still a draft, and no publish event exists.
    let client = db.client().await;
    let state: String = client
        .query_one(
            "SELECT state FROM datasource_versions WHERE datasource_id = $1::text::uuid AND version = $2",
            &[&created.id, &v.version],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "draft");
    let id: uuid::Uuid = created.id.parse().unwrap();
    assert!(!db.event_kinds(id).await.contains(&"published".to_owned()));

    // Once the queue drains, the same request succeeds.
    client
        .batch_execute("DROP TRIGGER w22b_queue_full ON datasource_versions")
        .await
        .unwrap();
    ds.publish_version(pb::PublishVersionRequest {
        datasource_id: created.id.clone(),
        version: v.version,
    })
    .await
    .unwrap();
    app.stop().await.unwrap();
}
