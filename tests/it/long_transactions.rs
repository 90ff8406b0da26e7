//! Long transactions are visible: a transaction holding an xid anywhere on the server holds
//! back every event committed after it. The registry shows the horizon's age as a gauge, names
//! the blocking backend in its log, and its event feed catches up as soon as it ends.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::events_client::EventsClient;
use tonic::transport::Channel;

use crate::helpers::{OwnServer, ServeProcess, wait_for};

/// Generous: the machine may be busy; the waits end as soon as the condition holds.
const WAIT: Duration = Duration::from_secs(60);

async fn scrape(http: &reqwest::Client, addr: &str) -> Option<String> {
    http.get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_another_database_shows_in_the_gauge_and_the_log_and_the_feed_catches_up()
{
    // The open transaction holds back every database of its server: a server of its own.
    let server = OwnServer::start().await;
    let db = server.db().await;
    let other = server.db().await;
    let serve = ServeProcess::start(
        &db.url,
        &[
            ("DSREG_OUTBOX_HORIZON_WARN_AFTER_MS", "300"),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    let channel = Channel::from_shared(format!("http://{}", serve.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut feed = EventsClient::new(channel)
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    // Another database of the same server: a transaction that holds an xid and stays open.
    let mut holder = other.client().await;
    let open = holder.transaction().await.unwrap();
    let pid: i32 = open
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    open.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();

    // Meanwhile a datasource is created: its event waits behind the open transaction.
    let ds = db.datasource("held-back").await;

    wait_for("the horizon age gauge to rise", WAIT, || async {
        let text = scrape(&http, &serve.http_addr).await?;
        (gauge(&text, "dsreg_outbox_horizon_age_seconds")? >= 1.0).then_some(())
    })
    .await;
    let named = |line: &serde_json::Value| {
        line["pid"].as_i64() == Some(i64::from(pid))
            && line["database"].as_str() == Some(other.name.as_str())
            && line["transaction_age_s"].is_u64()
    };
    wait_for("a log line naming the blocking backend", WAIT, || async {
        let logs = serve.logs.lock().unwrap();
        logs.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| named(&l))
            .then_some(())
    })
    .await;

    // The transaction ends: the feed delivers the event it held back.
    open.rollback().await.unwrap();
    let wanted = ds.id.to_string();
    let delivered = tokio::time::timeout(WAIT, async {
        while let Some(event) = feed.message().await.unwrap() {
            if event.datasource_id == wanted {
                return event;
            }
        }
        panic!("the feed ended");
    })
    .await
    .expect("the held-back event once the transaction ended");
    assert_eq!(delivered.r#type, "created");
}
