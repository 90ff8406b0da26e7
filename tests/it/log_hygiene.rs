//! What anyone can cause is counted, not logged at will: a flood of malformed notifications
//! is counted in full and logged at most once a second, each line with what it held back.

use std::time::{Duration, Instant};

use crate::helpers::{ServeProcess, TestDb, wait_for};

const FLOOD: usize = 600;

#[tokio::test]
async fn a_flood_of_malformed_notifications_is_counted_and_logged_once_a_second() {
    let db = TestDb::new().await;
    let serve = ServeProcess::start(&db.url, &[]).await;
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    let sent = Instant::now();
    db.client()
        .await
        .batch_execute(&format!(
            "SELECT pg_notify('dsreg_events', 'garbage-' || i) FROM generate_series(1, {FLOOD}) i"
        ))
        .await
        .unwrap();
    let metrics_url = format!("http://{}/metrics", serve.http_addr);
    let last = std::sync::Mutex::new(String::new());
    let counted = wait_for(
        "every malformed notification counted",
        Duration::from_secs(200),
        || async {
            let text = http
                .get(&metrics_url)
                .send()
                .await
                .map_err(|e| *last.lock().unwrap() = format!("scrape failed: {e}"))
                .ok()?
                .text()
                .await
                .ok()?;
            let line = text
                .lines()
                .find(|l| l.starts_with("dsreg_outbox_notifications_malformed_total "))
                .unwrap_or("no malformed counter")
                .to_owned();
            let done = line == format!("dsreg_outbox_notifications_malformed_total {FLOOD}");
            *last.lock().unwrap() = line;
            done.then_some(())
        },
    );
    if tokio::time::timeout(Duration::from_secs(125), counted)
        .await
        .is_err()
    {
        panic!("last seen: {}", last.lock().unwrap());
    }
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
