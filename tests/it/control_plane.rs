//! The control plane never waits behind the data plane: thousands of pull workers starting at
//! once on a small pool queue for their cursor reads, while lease renewal, readiness and state
//! writes keep their own connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

/// A source answering every GET with no records; counts the requests.
async fn serve_empty(requests: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route(
        "/items",
        axum::routing::get(move || {
            requests.fetch_add(1, Ordering::Relaxed);
            async { axum::Json(json!([])) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/items")
}

async fn metric(client: &reqwest::Client, app: &TestApp, name: &str) -> f64 {
    let text = client
        .get(format!("http://{}/metrics", app.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test]
async fn three_thousand_pull_workers_published_at_once_on_a_small_pool_lose_no_lease() {
    pull_workers_published_at_once_on_a_small_pool(3_000).await;
}

/// Opt-in (`cargo test --test it -- --ignored ten_thousand`): on two cores shared with the rest
/// of the suite, 10,000 debug-build workers starting at once can starve the renewer of CPU,
/// which is a different fault from the pool starvation this guards against.
#[tokio::test]
#[ignore = "10,000 workers need the machine to themselves; run with --ignored"]
async fn ten_thousand_pull_workers_published_at_once_on_a_small_pool_lose_no_lease() {
    pull_workers_published_at_once_on_a_small_pool(10_000).await;
}

/// `workers` http_poll datasources published in one transaction on a pool of 4: every worker
/// polls and saves its cursor, no lease is lost, readiness never fails, no worker errors.
async fn pull_workers_published_at_once_on_a_small_pool(workers: usize) {
    let db = TestDb::new().await;
    let requests = Arc::new(AtomicUsize::new(0));
    let url = serve_empty(requests.clone()).await;
    let mut settings = test_settings(&db.url);
    settings.pool_size = 4;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();

    // Readiness is probed throughout the start.
    let probing = tokio_util::sync::CancellationToken::new();
    let prober = {
        let (http, stop, addr) = (http.clone(), probing.clone(), app.http_addr);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.is_cancelled() {
                let answer = http.get(format!("http://{addr}/readyz")).send().await;
                match answer {
                    Ok(r) if r.status().is_success() => ok += 1,
                    Ok(r) => failed.push(r.text().await.unwrap_or_default()),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            (ok, failed)
        })
    };

    let config = json!({ "url": url, "interval_ms": 3_600_000 }).to_string();
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO datasources (org, project, name, kind)
               SELECT 'acme', 'pull', 'ds-' || i, 'http_poll' FROM generate_series(1, {workers}) i;
             INSERT INTO datasource_versions (datasource_id, version, config)
               SELECT id, 1, '{config}'::jsonb FROM datasources WHERE project = 'pull';
             UPDATE datasource_versions SET state = 'published';"
        ))
        .await
        .unwrap();

    // Every worker has read its cursor, polled once and saved its cursor.
    let client = db.client().await;
    wait_for(
        &format!("{workers} workers polled and saved their cursors"),
        Duration::from_secs(300),
        || async {
            let saved: i64 = client
                .query_one(
                    "SELECT count(*) FROM datasource_state WHERE source_cursor IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (saved == workers as i64 && requests.load(Ordering::Relaxed) >= workers).then_some(())
        },
    )
    .await;
    probing.cancel();
    let (ok, failed) = prober.await.unwrap();

    assert_eq!(
        metric(&http, &app, "dsreg_lease_moves_total{kind=\"lost\"}").await,
        0.0,
        "no lease was lost"
    );
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "readiness failed {} times: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let errors: i64 = client
        .query_one(
            "SELECT count(*) FROM datasource_events WHERE type = 'worker_error'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 0, "no worker failed waiting for a connection");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_transaction_holding_the_outbox_horizon_shows_live_with_its_pid_and_age() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    let pid: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Taking a transaction id makes it hold the horizon.
    tx.batch_execute("SELECT pg_current_xact_id()")
        .await
        .unwrap();

    wait_for(
        "the holder's pid and age on /metrics",
        Duration::from_secs(15),
        || async {
            let shown = metric(&http, &app, "dsreg_outbox_horizon_holder_pid").await;
            let age = metric(&http, &app, "dsreg_outbox_horizon_age_seconds").await;
            (shown == f64::from(pid) && age > 0.0).then_some(())
        },
    )
    .await;

    tx.commit().await.unwrap();
    wait_for(
        "the holder gone from /metrics",
        Duration::from_secs(15),
        || async {
            let shown = metric(&http, &app, "dsreg_outbox_horizon_holder_pid").await;
            (shown != f64::from(pid)).then_some(())
        },
    )
    .await;
    app.stop().await.unwrap();
}
