//! `webhook`: records pushed to `POST /ingest/{id}` → transform → postgres sink, end to end,
//! against one in-process registry and a durable Postgres. Every answer counted is a 202,
//! which dsreg sends only once the records are committed.
//!
//! `cargo bench --bench webhook`; `WEBHOOK_BENCH_SECONDS` (5), `WEBHOOK_CLIENTS` (16),
//! `WEBHOOK_BATCH` (records per request, 100).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dsreg::app::App;
use dsreg::config::Settings;
use dsreg::connectors::webhook::sign;
use dsreg::db::repository::{self as repo, WriteContext};
use dsreg::secrets::{EnvKeyProvider, SecretString, Secrets};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const HMAC_KEY: &[u8] = b"bench-webhook-key";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = env_or("WEBHOOK_BENCH_SECONDS", 5);
    let clients = env_or("WEBHOOK_CLIENTS", 16) as usize;
    let batch = env_or("WEBHOOK_BATCH", 100) as usize;
    let db = common::database().await?;

    let mut settings = Settings::for_database(&db.url);
    // Nothing here calls the gRPC port.
    settings.auth.insecure_no_auth = true;
    settings.master_keys = Some(KEYS.to_owned());
    let app = App::build(&settings, &db.url).await?;
    let addr = app.http_addr();
    let stats = app.listener_stats.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone(), Duration::from_secs(30)));
    while !stats.connected.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // One webhook datasource with a typical mapping.
    let pool = dsreg::db::pool(&db.url, 2, Duration::from_secs(5))?;
    let mut client = pool.get().await?;
    let id: uuid::Uuid = client
        .query_one(
            "INSERT INTO datasources (org, project, name, kind) VALUES ('bench', 'hooks', 'orders', 'webhook') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let tx = repo::begin(&mut client, &WriteContext::actor("bench")).await?;
    Secrets::new(Arc::new(EnvKeyProvider::parse(KEYS, None)?))
        .put(
            &tx,
            id,
            "webhook_secret",
            &SecretString::new(String::from_utf8(HMAC_KEY.to_vec())?)?,
        )
        .await?;
    tx.commit().await?;
    let config = json!({
        "queue_capacity": 1024,
        "max_body_bytes": 4 << 20,
        "transform": "#{ order_id: record.id, customer: record.customer.to_upper(), total_cents: record.amount * 100, currency: record.currency, placed_at: record.ts, items: record.items.len() }",
    });
    client
        .execute(
            "INSERT INTO datasource_versions (datasource_id, version, config) VALUES ($1, 1, $2)",
            &[&id, &config],
        )
        .await?;
    client
        .execute("SELECT dsreg_publish($1, 1)", &[&id])
        .await?;
    while client
        .query_one(
            "SELECT worker_status FROM datasource_state WHERE datasource_id = $1",
            &[&id],
        )
        .await?
        .get::<_, String>(0)
        != "running"
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let http = dsreg::connectors::http_client(Duration::from_secs(30))?;
    let url = format!("http://{addr}/ingest/{id}");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut accepted = 0usize;
            let mut n = 0usize;
            while Instant::now() < deadline {
                let records: Vec<_> = (0..batch)
                    .map(|i| {
                        json!({
                            "id": format!("{c}-{n}-{i}"), "customer": "ada lovelace", "amount": 12.5,
                            "currency": "EUR", "ts": "2026-11-23T08:00:00Z", "items": [1, 2, 3],
                        })
                    })
                    .collect();
                n += 1;
                let body = serde_json::to_vec(&records)?;
                let started = Instant::now();
                let response = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-dsreg-signature", sign(HMAC_KEY, &body))
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                response.bytes().await?;
                if status == 202 {
                    latencies.push(started.elapsed().as_secs_f64() * 1e3);
                    accepted += batch;
                } else if status != 429 {
                    anyhow::bail!("unexpected {status}");
                }
            }
            anyhow::Ok((accepted, latencies))
        }));
    }
    let started = Instant::now();
    let mut accepted = 0;
    let mut latencies = Vec::new();
    for task in tasks {
        let (a, l) = task.await??;
        accepted += a;
        latencies.extend(l);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let stored: i64 = client
        .query_one(
            "SELECT count(*) FROM datasource_records WHERE datasource_id = $1",
            &[&id],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        stored as usize >= accepted,
        "{stored} stored < {accepted} accepted"
    );

    shutdown.cancel();
    running.await??;
    common::print_table(
        &format!(
            "webhook benchmark: {clients} clients, {batch} records per request, {seconds}s, durable Postgres"
        ),
        &[
            (
                "webhook → transform → postgres sink, records/s (202 = committed)".into(),
                format!("{:.0}", accepted as f64 / elapsed),
                "≥ 20,000".into(),
            ),
            (
                "accept latency per request, p50 / p99".into(),
                format!(
                    "{:.2} / {:.2} ms",
                    common::quantile(&latencies, 0.5),
                    common::quantile(&latencies, 0.99)
                ),
                "p99 ≤ 10 ms".into(),
            ),
        ],
    );
    Ok(())
}
