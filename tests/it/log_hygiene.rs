//! What anyone can cause is counted, not logged at will: a flood of malformed notifications
//! is counted in full and logged at most once a second, each line with what it held back.

use std::time::{Duration, Instant};

use crate::helpers::{ServeProcess, TestDb, wait_for};

const FLOOD: usize = 600;

#[tokio::test]
async fn a_flood_of_malformed_notifications_is_counted_and_logged_once_a_second() {
    let db = TestDb::new().await;
    let serve = ServeProcess::start(&db.url, &[]).await;
    let http = dsreg::connectors::http_client(Duration::from_secs(10)).unwrap();
    let sent = Instant::now();
    db.client()
        .await
        .batch_execute(&format!(
            "SELECT pg_notify('dsreg_events', 'garbage-' || i) FROM generate_series(1, {FLOOD}) i"
        ))
        .await
        .unwrap();
    let metrics_url = format!("http://{}/metrics", serve.http_addr);
    wait_for(
        "every malformed notification counted",
        Duration::from_secs(120),
        || async {
            let text = http
                .get(&metrics_url)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .any(|l| l == format!("dsreg_outbox_notifications_malformed_total {FLOOD}"))
                .then_some(())
        },
    )
    .await;
    let elapsed = sent.elapsed();
    let lines: Vec<serde_json::Value> = serve
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| {
            j["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("malformed notification"))
        })
        .collect();
    assert!(!lines.is_empty(), "the flood is logged");
    assert!(
        lines.len() as u64 <= elapsed.as_secs() + 1,
        "{} lines in {elapsed:?}",
        lines.len()
    );
    let covered: u64 = lines
        .iter()
        .map(|l| 1 + l["suppressed"].as_u64().unwrap_or(0))
        .sum();
    assert!(covered <= FLOOD as u64, "{covered}");
    serve.stop().await;
}
