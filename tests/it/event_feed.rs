//! The event feed never passes over an id still held by a running transaction, whatever order
//! the writers took their transaction ids and event ids in.
//!
//! The case a snapshot's `xmax` misses: writer A takes its xid, writer B takes a newer xid and
//! an event id, A takes a higher event id and commits. `xmax` is then one past A's xid, at or
//! below B's, so a snapshot shows `xmin == xmax` while B still holds the lower id. Each test
//! runs on a server of its own: a transaction finishing elsewhere on the server would move
//! `xmax` past B's xid and hide the case.

use std::time::Duration;

use deadpool_postgres::Transaction;
use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::events_client::EventsClient;
use dsreg::db::repository::events;

use crate::helpers::{OwnServer, TestApp, TestDb, test_settings};

const WAIT: Duration = Duration::from_secs(60);

/// Takes the transaction's xid.
async fn take_xid(tx: &Transaction<'_>) -> i64 {
    tx.query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap()
        .get(0)
}

/// Writes a registry-wide event; its id.
async fn write_event(tx: &Transaction<'_>) -> i64 {
    tx.query_one(
        "INSERT INTO datasource_events (type) VALUES ('sync_conflict') RETURNING id",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The interleaving: `older` takes its xid, `newer` a later xid and the lower event id,
/// `older` the higher id and commits. Returns (the lower id, the higher id, `newer`'s xid).
async fn interleave(older: Transaction<'_>, newer: &Transaction<'_>) -> (i64, i64, i64) {
    let older_xid = take_xid(&older).await;
    let newer_xid = take_xid(newer).await;
    assert!(newer_xid > older_xid);
    let lower = write_event(newer).await;
    let higher = write_event(&older).await;
    assert!(higher > lower);
    older.commit().await.unwrap();
    (lower, higher, newer_xid)
}

#[tokio::test]
async fn a_transaction_that_took_its_xid_last_is_below_the_bound_of_a_read_after_the_others_commit()
{
    let server = OwnServer::start().await;
    let db: TestDb = server.db().await;
    let (mut a, mut b) = (db.client().await, db.client().await);
    let newer = b.transaction().await.unwrap();
    let (_, _, newer_xid) = interleave(a.transaction().await.unwrap(), &newer).await;

    let reader = db.client().await;
    let events::Bounds {
        xmin,
        xid_bound: bound,
        ..
    } = events::snapshot_bounds(&**reader).await.unwrap();
    assert!(
        bound > newer_xid,
        "the bound {bound} is not above the running transaction's xid {newer_xid}"
    );
    assert!(xmin <= newer_xid, "xmin {xmin}, running xid {newer_xid}");
    newer.commit().await.unwrap();
}

#[tokio::test]
async fn watch_events_delivers_an_id_held_by_a_transaction_with_a_newer_xid_in_id_order() {
    let server = OwnServer::start().await;
    let db = server.db().await;
    let app = TestApp::spawn_with(test_settings(&db.url), |_| {}).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = EventsClient::new(channel)
        .watch_events(pb::WatchEventsRequest {
            datasource_id: String::new(),
            types: vec!["sync_conflict".to_owned()],
            after_id: None,
        })
        .await
        .unwrap()
        .into_inner();

    let (mut a, mut b) = (db.client().await, db.client().await);
    let newer = b.transaction().await.unwrap();
    let (lower, higher, _) = interleave(a.transaction().await.unwrap(), &newer).await;
    newer.commit().await.unwrap();

    let mut got = Vec::new();
    while got.len() < 2 {
        let Ok(event) = tokio::time::timeout(WAIT, stream.message()).await else {
            panic!("no event within {WAIT:?}; got {got:?}, expected [{lower}, {higher}]");
        };
        got.push(event.unwrap().expect("the stream stays open").id);
    }
    assert_eq!(got, vec![lower, higher], "both events once, in id order");
    app.stop().await.unwrap();
}
