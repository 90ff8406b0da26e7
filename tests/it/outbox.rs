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
