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

/// Run alone, after the suite (`.ci/run` runs `cargo test --test it -- --ignored`): 10,000
/// workers starting take both cores while they start, which would slow every other test of
/// the suite running beside them. That such a start starving the runtime of CPU cannot cost
/// the leases is also shown within the suite by
/// [`a_runtime_starved_of_cpu_for_several_lease_times_loses_no_lease`].
#[tokio::test]
#[ignore = "10,000 workers take both cores while they start; .ci/run runs it alone after the suite"]
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

/// Every thread of the registry's runtime kept busy by CPU-bound work that never yields (what
/// thousands of workers starting at once do to it), for several lease times: the leases are
/// renewed all along (the instance's `leases_until` moves on while the runtime is starved), no
/// lease is lost and every worker keeps running.
#[tokio::test]
async fn a_runtime_starved_of_cpu_for_several_lease_times_loses_no_lease() {
    const WORKERS: usize = 20;
    let db = TestDb::new().await;
    let requests = Arc::new(AtomicUsize::new(0));
    let url = serve_empty(requests.clone()).await;
    let mut settings = test_settings(&db.url);
    settings.lease_ttl_ms = 3_000;
    let ttl = Duration::from_millis(settings.lease_ttl_ms);
    let (runtime_tx, runtime_rx) = std::sync::mpsc::channel();
    let app = TestApp::spawn_with(settings, move |_| {
        let _ = runtime_tx.send(tokio::runtime::Handle::current());
    })
    .await;
    let runtime = runtime_rx.recv().unwrap();
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();

    let config = json!({ "url": url, "interval_ms": 3_600_000 }).to_string();
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO datasources (org, project, name, kind)
               SELECT 'acme', 'pull', 'ds-' || i, 'http_poll' FROM generate_series(1, {WORKERS}) i;
             INSERT INTO datasource_versions (datasource_id, version, config)
               SELECT id, 1, '{config}'::jsonb FROM datasources WHERE project = 'pull';
             UPDATE datasource_versions SET state = 'published';"
        ))
        .await
        .unwrap();
    let running = || async {
        client
            .query_one(
                "SELECT count(*) FROM datasource_state WHERE worker_status = 'running'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_for("every worker running", Duration::from_secs(60), || async {
        (running().await == WORKERS as i64).then_some(())
    })
    .await;
    let leases_until = || async {
        client
            .query_one("SELECT leases_until FROM dsreg_instances", &[])
            .await
            .unwrap()
            .get::<_, std::time::SystemTime>(0)
    };

    // Spinners that never yield, more than the runtime has threads, all until one instant
    // four lease times away; each counts how many spin at once.
    let spin_until = std::time::Instant::now() + 4 * ttl;
    let spinning = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut spinners = Vec::new();
    for _ in 0..8 {
        let (spinning, most) = (spinning.clone(), most.clone());
        spinners.push(runtime.spawn(async move {
            let now = spinning.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            while std::time::Instant::now() < spin_until {
                std::hint::spin_loop();
            }
            spinning.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    // While they spin, the renewals go on: `leases_until` moves forward twice.
    let mut seen = vec![leases_until().await];
    while std::time::Instant::now() < spin_until && seen.len() < 3 {
        let now = leases_until().await;
        if now > *seen.last().unwrap() {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let starved = std::time::Instant::now() < spin_until;
    for spinner in spinners {
        spinner.await.unwrap();
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "both of the runtime's threads were kept busy at once"
    );
    assert!(
        starved && seen.len() == 3,
        "the leases were renewed twice while the runtime was starved: {seen:?}"
    );

    // The runtime back, the instance still holds everything and stopped nothing.
    assert_eq!(
        metric(&http, &app, "dsreg_lease_moves_total{kind=\"lost\"}").await,
        0.0,
        "no lease was lost"
    );
    assert_eq!(
        running().await,
        WORKERS as i64,
        "every worker still running"
    );
    let stopped: i64 = client
        .query_one(
            "SELECT count(*) FROM datasource_events
              WHERE type IN ('worker_stopped', 'worker_error')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stopped, 0, "no worker was stopped or failed");
    app.stop().await.unwrap();
}
