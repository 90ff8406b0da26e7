//! The schema's data path: publish and rollback (by function and by plain SQL) archive the
//! previous version, move `current_version`, write the outbox event and NOTIFY.

use std::time::Duration;

use dsreg::db::Error;
use dsreg::db::repository::events::{self, EventFilter};
use dsreg::db::repository::{self as repo, WriteContext, datasources, versions};
use dsreg::domain::{DatasourceStatus, VersionState};
use dsreg::outbox::notifications::listen;
use serde_json::Value;
use tokio_postgres::Notification;

use crate::helpers::TestDb;

const WAIT: Duration = Duration::from_secs(5);

async fn next_notification(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Notification>) -> Value {
    let n = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a notification within 5s")
        .expect("listener alive");
    assert_eq!(n.channel(), "dsreg_events");
    serde_json::from_str(n.payload()).expect("JSON payload")
}

async fn events_of(db: &TestDb, ds: uuid::Uuid) -> Vec<events::Event> {
    let client = db.client().await;
    events::list(
        &**client,
        &EventFilter {
            datasource_id: Some(ds),
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .events
}

#[tokio::test]
async fn publish_by_function_and_by_raw_update_both_write_the_event_and_notify() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await;
    let v = db.drafts(ds.id, 2).await;
    let mut listening = listen(&db.url, "dsreg_events").await.unwrap();

    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("alice"))
        .await
        .unwrap();
    let event_id = versions::publish(&tx, ds.id, v[0])
        .await
        .unwrap()
        .expect("an event");
    tx.commit().await.unwrap();

    let payload = next_notification(&mut listening.notifications).await;
    assert_eq!(payload["id"], event_id);
    assert_eq!(payload["datasource_id"], ds.id.to_string());
    assert_eq!(payload["type"], "published");
    assert!(
        payload.get("config").is_none(),
        "payload carries ids only: {payload}"
    );

    client
        .execute(
            "UPDATE datasource_versions SET state = 'published' WHERE datasource_id = $1 AND version = $2",
            &[&ds.id, &v[1]],
        )
        .await
        .unwrap();
    let payload = next_notification(&mut listening.notifications).await;
    assert_eq!(payload["type"], "published");
    assert_eq!(payload["datasource_id"], ds.id.to_string());

    let history = events_of(&db, ds.id).await;
    let kinds: Vec<&str> = history.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["created", "published", "published"]);
    assert_eq!(history[1].actor, "alice");
    assert_eq!(history[1].version, Some(v[0]));
    assert_eq!(history[2].version, Some(v[1]));
    assert_eq!(history[2].payload["previous_version"], v[0]);
    assert_eq!(
        datasources::get(&**client, ds.id)
            .await
            .unwrap()
            .current_version,
        Some(v[1])
    );
    assert_eq!(
        versions::get(&**client, ds.id, v[0]).await.unwrap().state,
        VersionState::Archived
    );
}

#[tokio::test]
async fn publishing_the_published_version_again_changes_nothing() {
    let db = TestDb::new().await;
    let ds = db.datasource("idempotent").await;
    let v = db.drafts(ds.id, 1).await;
    let mut client = db.client().await;
    for expected_event in [true, false] {
        let tx = repo::begin(&mut client, &WriteContext::actor("bob"))
            .await
            .unwrap();
        let event = versions::publish(&tx, ds.id, v[0]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(event.is_some(), expected_event);
    }
    assert_eq!(
        events_of(&db, ds.id).await.len(),
        2,
        "created + one published"
    );
}

#[tokio::test]
async fn rollback_writes_rolled_back_archives_the_newer_version_and_moves_current_version() {
    let db = TestDb::new().await;
    let ds = db.datasource("rollback").await;
    let v = db.drafts(ds.id, 3).await;
    let mut client = db.client().await;
    for version in &v {
        let tx = repo::begin(&mut client, &WriteContext::actor("ops"))
            .await
            .unwrap();
        versions::publish(&tx, ds.id, *version).await.unwrap();
        tx.commit().await.unwrap();
    }
    let mut listening = listen(&db.url, "dsreg_events").await.unwrap();

    let tx = repo::begin(&mut client, &WriteContext::actor("ops"))
        .await
        .unwrap();
    let now = versions::rollback(&tx, ds.id, None).await.unwrap().version;
    tx.commit().await.unwrap();

    assert_eq!(now, v[1]);
    assert_eq!(
        next_notification(&mut listening.notifications).await["type"],
        "rolled_back"
    );
    let current = datasources::get(&**client, ds.id).await.unwrap();
    assert_eq!(current.current_version, Some(v[1]));
    assert_eq!(
        versions::get(&**client, ds.id, v[2]).await.unwrap().state,
        VersionState::Archived
    );
    assert_eq!(
        versions::get(&**client, ds.id, v[1]).await.unwrap().state,
        VersionState::Published
    );
    let last = events_of(&db, ds.id).await.pop().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.version),
        ("rolled_back", Some(v[1]))
    );
    assert_eq!(last.payload["previous_version"], v[2]);

    // An explicit target, and the target that is already current.
    let tx = repo::begin(&mut client, &WriteContext::actor("ops"))
        .await
        .unwrap();
    let moved = versions::rollback(&tx, ds.id, Some(v[0])).await.unwrap();
    assert_eq!(moved.version, v[0]);
    assert!(
        moved.event.is_some(),
        "a rollback that moved names its event"
    );
    let again = versions::rollback(&tx, ds.id, Some(v[0])).await.unwrap();
    assert_eq!(
        again,
        versions::RolledBack {
            version: v[0],
            event: None
        },
        "the target already current: nothing written"
    );
    tx.commit().await.unwrap();
    let kinds: Vec<String> = events_of(&db, ds.id)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "rolled_back").count(), 2);
}

#[tokio::test]
async fn bad_publish_and_rollback_requests_get_domain_errors() {
    let db = TestDb::new().await;
    let ds = db.datasource("refusals").await;
    let v = db.drafts(ds.id, 2).await;
    let mut client = db.client().await;
    let unknown = uuid::Uuid::new_v4();

    macro_rules! attempt {
        ($call:expr) => {{
            let tx = repo::begin(&mut client, &WriteContext::actor("t"))
                .await
                .unwrap();
            let tx = &tx;
            $call(tx).await.map(|_| ()).unwrap_err()
        }};
    }
    let e = attempt!(|tx| versions::publish(tx, unknown, 1));
    assert!(
        matches!(e, Error::DatasourceNotFound(id) if id == unknown),
        "{e}"
    );
    let e = attempt!(|tx| versions::publish(tx, ds.id, 99));
    assert!(
        matches!(e, Error::VersionNotFound { version: 99, .. }),
        "{e}"
    );
    let e = attempt!(|tx| versions::rollback(tx, ds.id, None));
    assert!(matches!(e, Error::NoEarlierVersion(_)), "{e}");
    let e = attempt!(|tx| versions::rollback(tx, ds.id, Some(v[1])));
    assert!(
        matches!(e, Error::NeverPublished { version, .. } if version == v[1]),
        "{e}"
    );

    // A published version's config is frozen.
    let tx = repo::begin(&mut client, &WriteContext::actor("t"))
        .await
        .unwrap();
    versions::publish(&tx, ds.id, v[0]).await.unwrap();
    tx.commit().await.unwrap();
    let changed = serde_json::json!({"x": 1});
    let e = attempt!(|tx| versions::update_draft(tx, ds.id, v[0], &changed, ""));
    assert!(matches!(e, Error::VersionNotDraft { .. }), "{e}");

    // Archived datasources cannot be published, not even by plain SQL.
    let tx = repo::begin(&mut client, &WriteContext::actor("t"))
        .await
        .unwrap();
    let patch = datasources::DatasourcePatch {
        status: Some(DatasourceStatus::Archived),
        ..Default::default()
    };
    datasources::update(&tx, ds.id, &patch, None).await.unwrap();
    tx.commit().await.unwrap();
    let e = attempt!(|tx| versions::publish(tx, ds.id, v[1]));
    assert!(matches!(e, Error::DatasourceArchived(_)), "{e}");
    let raw = client
        .execute(
            "UPDATE datasource_versions SET state = 'published' WHERE datasource_id = $1 AND version = $2",
            &[&ds.id, &v[1]],
        )
        .await
        .unwrap_err();
    assert_eq!(raw.code().map(|c| c.code()), Some("DSR03"));
    assert!(
        raw.to_string().contains(&ds.id.to_string()) || format!("{raw:?}").contains("archived")
    );
}

#[tokio::test]
async fn status_changes_are_events() {
    let db = TestDb::new().await;
    let ds = db.datasource("status").await;
    let mut client = db.client().await;
    for status in [
        DatasourceStatus::Disabled,
        DatasourceStatus::Active,
        DatasourceStatus::Archived,
    ] {
        let tx = repo::begin(&mut client, &WriteContext::actor("ops"))
            .await
            .unwrap();
        let patch = datasources::DatasourcePatch {
            status: Some(status),
            ..Default::default()
        };
        let updated = datasources::update(&tx, ds.id, &patch, None).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(updated.status, status);
    }
    let kinds: Vec<String> = events_of(&db, ds.id)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["created", "disabled", "enabled", "archived"]);
}

#[tokio::test]
async fn a_stale_etag_is_refused_and_names_are_unique_among_live_datasources() {
    let db = TestDb::new().await;
    let ds = db.datasource("etag").await;
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("ops"))
        .await
        .unwrap();
    let patch = datasources::DatasourcePatch {
        owner: Some("team-b".into()),
        ..Default::default()
    };
    let updated = datasources::update(&tx, ds.id, &patch, Some(ds.revision))
        .await
        .unwrap();
    assert_eq!(updated.revision, ds.revision + 1);
    let stale = datasources::update(&tx, ds.id, &patch, Some(ds.revision))
        .await
        .unwrap_err();
    assert!(
        matches!(stale, Error::StaleRevision { expected, actual, .. } if expected == ds.revision && actual == ds.revision + 1)
    );
    drop(tx);

    let db2 = db.datasource("etag-other").await;
    assert_ne!(db2.id, ds.id);
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("ops"))
        .await
        .unwrap();
    let again = datasources::create(
        &tx,
        &datasources::NewDatasource {
            org: dsreg::domain::Name::parse("org", "acme").unwrap(),
            project: dsreg::domain::Name::parse("project", "core").unwrap(),
            name: dsreg::domain::Name::parse("name", "etag").unwrap(),
            kind: "generator".into(),
            owner: String::new(),
            tags: vec![],
            description: String::new(),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(again, Error::NameTaken { .. }), "{again}");
}

#[tokio::test]
async fn two_concurrent_publishers_of_one_datasource_leave_exactly_one_published_version() {
    let db = TestDb::new().await;
    let ds = db.datasource("race").await;
    let v = db.drafts(ds.id, 2).await;
    let mut first = db.client().await;
    let mut second = db.client().await;

    let tx1 = repo::begin(&mut first, &WriteContext::actor("one"))
        .await
        .unwrap();
    versions::publish(&tx1, ds.id, v[0]).await.unwrap();
    // The second publisher blocks on the datasource row until the first commits.
    let racer = {
        let id = ds.id;
        let version = v[1];
        tokio::spawn(async move {
            let tx2 = repo::begin(&mut second, &WriteContext::actor("two"))
                .await
                .unwrap();
            let r = versions::publish(&tx2, id, version).await;
            tx2.commit().await.unwrap();
            r
        })
    };
    let observer = db.client().await;
    crate::helpers::wait_for_lock_wait(&observer, "the second publisher to wait on a lock", "")
        .await;
    tx1.commit().await.unwrap();
    racer
        .await
        .unwrap()
        .expect("the second publish serializes after the first");

    let published: i64 = observer
        .query_one(
            "SELECT count(*) FROM datasource_versions WHERE datasource_id = $1 AND state = 'published'",
            &[&ds.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1);
    assert_eq!(
        datasources::get(&**observer, ds.id)
            .await
            .unwrap()
            .current_version,
        Some(v[1])
    );
    let kinds: Vec<String> = events_of(&db, ds.id)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["created", "published", "published"]);
}

#[tokio::test]
async fn a_publish_of_a_thousand_datasources_in_one_statement_sends_a_bounded_number_of_notifications()
 {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO datasources (org, project, name, kind)
               SELECT 'acme', 'bulk', 'ds-' || i, 'generator' FROM generate_series(1, 1000) i;
             INSERT INTO datasource_versions (datasource_id, version, config)
               SELECT id, 1, '{}' FROM datasources WHERE project = 'bulk';",
        )
        .await
        .unwrap();
    let marker = db.datasource("marker").await;
    let marker_version = db.drafts(marker.id, 1).await[0];
    let mut listening = listen(&db.url, "dsreg_events").await.unwrap();

    let published = client
        .execute(
            "UPDATE datasource_versions SET state = 'published'
             WHERE datasource_id IN (SELECT id FROM datasources WHERE project = 'bulk')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(published, 1000);
    // Notifications arrive in commit order: once the marker's arrives, the bulk ones are in.
    client
        .execute(
            "SELECT dsreg_publish($1, $2)",
            &[&marker.id, &marker_version],
        )
        .await
        .unwrap();
    let mut bulk = 0;
    loop {
        let payload = next_notification(&mut listening.notifications).await;
        if payload["datasource_id"] == marker.id.to_string() {
            break;
        }
        bulk += 1;
    }
    assert!(
        (1..=17).contains(&bulk),
        "{bulk} notifications for one 1,000-row publish"
    );
    let events: i64 = client
        .query_one(
            "SELECT count(*) FROM datasource_events WHERE type = 'published'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1001, "one event per published datasource");
}

#[tokio::test]
async fn the_transaction_traceparent_is_stored_when_well_formed_and_ignored_otherwise() {
    let db = TestDb::new().await;
    let ds = db.datasource("traced").await;
    let v = db.drafts(ds.id, 2).await;
    let mut client = db.client().await;
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (version, traceparent) in [(v[0], good), (v[1], "00-'; DROP TABLE x;--")] {
        let ctx = WriteContext {
            actor: "tracer".into(),
            traceparent: Some(traceparent.into()),
        };
        let tx = repo::begin(&mut client, &ctx).await.unwrap();
        versions::publish(&tx, ds.id, version).await.unwrap();
        tx.commit().await.unwrap();
    }
    let history = events_of(&db, ds.id).await;
    assert_eq!(history[1].traceparent.as_deref(), Some(good));
    assert_eq!(
        history[2].traceparent, None,
        "a malformed traceparent is not stored"
    );
    assert_eq!(
        history[2].kind, "published",
        "and does not break the publish"
    );
}
