//! The outbox reader never skips an event committed out of id order.

use dsreg::db::repository::{self as repo, WriteContext, versions};
use dsreg::outbox::OutboxReader;

use crate::helpers::TestDb;

#[tokio::test]
async fn the_reader_returns_a_row_committed_late_and_never_passes_it_while_uncommitted() {
    let db = TestDb::new().await;
    let a = db.datasource("first").await;
    let b = db.datasource("second").await;
    let va = db.drafts(a.id, 1).await[0];
    let vb = db.drafts(b.id, 1).await[0];
    let reader_client = db.client().await;
    let mut reader = OutboxReader::from_now(&**reader_client).await.unwrap();

    // Writer A takes the lower event id first and commits last.
    let mut writer_a = db.client().await;
    let tx_a = repo::begin(&mut writer_a, &WriteContext::actor("a"))
        .await
        .unwrap();
    let id_a = versions::publish(&tx_a, a.id, va).await.unwrap().unwrap();
    let xid_a: i64 = tx_a
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap()
        .get(0);
    let mut writer_b = db.client().await;
    let tx_b = repo::begin(&mut writer_b, &WriteContext::actor("b"))
        .await
        .unwrap();
    let id_b = versions::publish(&tx_b, b.id, vb).await.unwrap().unwrap();
    tx_b.commit().await.unwrap();
    assert!(id_a < id_b);

    // Other tests share the cluster, so only this test's publishes are looked at.
    let published = |events: Vec<dsreg::db::repository::events::Event>| -> Vec<i64> {
        events
            .iter()
            .filter(|e| e.kind == "published")
            .map(|e| e.id)
            .collect()
    };
    let first = reader.read(&**reader_client).await.unwrap().events;
    assert_eq!(published(first), [id_b]);
    assert!(
        reader.horizon() <= xid_a,
        "the cursor must not pass the open transaction"
    );
    // Reading again while A is open returns nothing new and still holds the cursor.
    assert!(published(reader.read(&**reader_client).await.unwrap().events).is_empty());
    assert!(reader.horizon() <= xid_a);

    tx_a.commit().await.unwrap();
    let second = reader.read(&**reader_client).await.unwrap().events;
    assert_eq!(published(second), [id_a], "the late row, exactly once");
    // The horizon is cluster-wide: other tests' open transactions may hold it back briefly.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while reader.horizon() <= xid_a {
        let again = published(reader.read(&**reader_client).await.unwrap().events);
        assert!(again.is_empty(), "nothing twice: {again:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cursor stays behind A after it committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_reader_pages_through_a_large_burst_without_losing_or_repeating_rows() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut reader = OutboxReader::from_now(&**client).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO datasources (org, project, name, kind)
               SELECT 'acme', 'burst', 'ds-' || i, 'generator' FROM generate_series(1, 2500) i",
        )
        .await
        .unwrap();
    let events = reader.read(&**client).await.unwrap().events;
    assert_eq!(events.len(), 2500);
    let mut ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 2500);
    assert!(reader.read(&**client).await.unwrap().events.is_empty());
}

/// The value of the counter `name` on `app`'s `/metrics`.
async fn counter(app: &crate::helpers::TestApp, name: &str) -> f64 {
    let (status, body) = crate::serve::http_get(&app.http_addr.to_string(), "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not on /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_malformed_traceparent_set_in_sql_is_dropped_from_the_event_and_counted() {
    let db = TestDb::new().await;
    let app = crate::helpers::TestApp::spawn(&db.url, |_| {}).await;
    let name = "dsreg_outbox_invalid_traceparent_total";
    assert_eq!(counter(&app, name).await, 0.0);
    // Another datasource running: the registry has made its first pass, so it reads every
    // event committed from now on (it starts reading at its first pass).
    let warm = db.datasource("warm-up").await;
    let warm_version = db
        .version(warm.id, serde_json::json!({ "rate_per_sec": 5 }))
        .await;
    db.publish_sql(warm.id, warm_version).await;
    db.wait_for_state(warm.id, "the warm-up datasource running", |s| {
        s.running_version == Some(warm_version)
    })
    .await;
    let ds = db.datasource("orders").await;
    let first = db
        .version(ds.id, serde_json::json!({ "rate_per_sec": 5 }))
        .await;
    let second = db
        .version(ds.id, serde_json::json!({ "rate_per_sec": 6 }))
        .await;
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let junk = "z".repeat(10_000);
    let mut client = db.client().await;
    for (version, traceparent) in [(first, junk.as_str()), (second, good)] {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "SELECT set_config('dsreg.traceparent', $1, true)",
            &[&traceparent],
        )
        .await
        .unwrap();
        tx.execute(
            "UPDATE datasource_versions SET state = 'published'
              WHERE datasource_id = $1 AND version = $2",
            &[&ds.id, &version],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    // Both publishes were written; the junk one untraced and marked.
    let rows = client
        .query(
            "SELECT version, traceparent, traceparent_invalid FROM datasource_events
              WHERE type = 'published' AND datasource_id = $1 ORDER BY version",
            &[&ds.id],
        )
        .await
        .unwrap();
    let seen: Vec<(i32, Option<String>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        seen,
        [(first, None, true), (second, Some(good.to_owned()), false)]
    );
    // The registry read both and counted the one.
    crate::helpers::wait_for(
        "the second version running and the junk counted",
        std::time::Duration::from_secs(60),
        || async {
            let state = db.state(ds.id).await;
            (state.running_version == Some(second) && counter(&app, name).await == 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(counter(&app, name).await, 1.0);
    app.stop().await.unwrap();
}

/// Generated trace contexts, well formed, mutated and arbitrary, set with `dsreg.traceparent`
/// on an event's transaction: each is either stored as given or dropped and marked, never
/// both and never neither; every one the registry's parser accepts is stored.
#[test]
fn every_trace_context_set_in_sql_is_either_stored_or_marked_invalid() {
    use proptest::prelude::*;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(TestDb::new());
    let client = runtime.block_on(db.client());
    let well_formed = ("[0-9a-f]{32}", "[0-9a-f]{16}", "0[01]")
        .prop_map(|(trace, span, flags)| format!("00-{trace}-{span}-{flags}"));
    let mutated = (well_formed.clone(), 0usize..55, any::<char>()).prop_map(|(v, at, c)| {
        let mut chars: Vec<char> = v.chars().collect();
        chars[at] = c;
        chars.into_iter().collect::<String>()
    });
    let values = prop_oneof![
        well_formed,
        mutated,
        ".{0,80}",
        "[0-9a-fA-F-]{50,60}",
        Just("z".repeat(10_000)),
    ]
    .prop_map(|v: String| v.replace('\0', ""));
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 200,
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&values, |value| {
            let (stored, invalid): (Option<String>, bool) = runtime.block_on(async {
                client.batch_execute("BEGIN").await.unwrap();
                client
                    .execute(
                        "SELECT set_config('dsreg.traceparent', $1, true)",
                        &[&value],
                    )
                    .await
                    .unwrap();
                let row = client
                    .query_one(
                        "INSERT INTO datasource_events (type) VALUES ('probe')
                         RETURNING traceparent, traceparent_invalid",
                        &[],
                    )
                    .await
                    .unwrap();
                client.batch_execute("ROLLBACK").await.unwrap();
                (row.get(0), row.get(1))
            });
            match &stored {
                Some(kept) => {
                    prop_assert_eq!(kept, &value);
                    prop_assert!(!invalid, "{:?} stored and marked", value);
                }
                None => prop_assert_eq!(invalid, !value.is_empty(), "{:?}", value),
            }
            if dsreg::telemetry::valid_traceparent(&value) {
                prop_assert_eq!(stored.as_deref(), Some(value.as_str()));
            }
            Ok(())
        })
        .unwrap();
}
