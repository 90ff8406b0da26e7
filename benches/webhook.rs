//! `webhook`: records pushed to `POST /ingest/{id}` → transform → postgres sink, end to end,
//! against one in-process registry and a durable Postgres. Every answer counted is a 202,
//! which dsreg sends only once the records are committed.
//!
//! After a one-second warm-up: the clients post back to back (the throughput, and the
//! latency that queueing at that throughput costs), then at 20,000 and 40,000 records/s
//! offered (the accept latency at a given load, measured from when each request was due).
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

/// Offered loads of the paced runs, records per second across all clients.
const PACED_RECORDS_PER_S: [f64; 2] = [20_000.0, 40_000.0];

/// Clients posting signed batches of records to one webhook datasource.
struct Load {
    http: reqwest::Client,
    url: String,
    clients: usize,
    batch: usize,
}

impl Load {
    /// Posts for `window`, back to back or at `rate` records/s across all clients (each
    /// client's requests spaced evenly, the clients staggered); `run` keeps record ids
    /// distinct between runs. Returns the records accepted (202), the seconds taken and the
    /// sorted accept latencies in milliseconds, from each send or, paced, from when it was
    /// due (so a late send counts against it).
    async fn run(
        &self,
        rate: Option<f64>,
        run: usize,
        window: Duration,
    ) -> anyhow::Result<(usize, f64, Vec<f64>)> {
        let started = Instant::now();
        let deadline = started + window;
        // Time between one client's requests.
        let spacing =
            rate.map(|r| Duration::from_secs_f64(self.clients as f64 * self.batch as f64 / r));
        let mut tasks = Vec::new();
        for c in 0..self.clients {
            let (http, url, batch) = (self.http.clone(), self.url.clone(), self.batch);
            let offset = spacing.map(|s| s.mul_f64(c as f64 / self.clients as f64));
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut accepted = 0usize;
                let mut n = 0u32;
                loop {
                    let due = match (spacing, offset) {
                        (Some(spacing), Some(offset)) => started + offset + spacing * n,
                        _ => Instant::now(),
                    };
                    if due >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(due.into()).await;
                    let records: Vec<_> = (0..batch)
                        .map(|i| {
                            json!({
                                "id": format!("{run}-{c}-{n}-{i}"), "customer": "ada lovelace", "amount": 12.5,
                                "currency": "EUR", "ts": "2026-11-23T08:00:00Z", "items": [1, 2, 3],
                            })
                        })
                        .collect();
                    n += 1;
                    let body = serde_json::to_vec(&records)?;
                    let response = http
                        .post(&url)
                        .timeout(Duration::from_secs(30))
                        .header("content-type", "application/json")
                        .header("x-dsreg-signature", sign(HMAC_KEY, &body))
                        .body(body)
                        .send()
                        .await?;
                    let status = response.status();
                    response.bytes().await?;
                    if status == 202 {
                        latencies.push(due.elapsed().as_secs_f64() * 1e3);
                        accepted += batch;
                    } else if status != 429 {
                        anyhow::bail!("unexpected {status}");
                    }
                }
                anyhow::Ok((accepted, latencies))
            }));
        }
        let mut accepted = 0;
        let mut latencies = Vec::new();
        for task in tasks {
            let (a, l) = task.await??;
            accepted += a;
            latencies.extend(l);
        }
        latencies.sort_by(f64::total_cmp);
        Ok((accepted, started.elapsed().as_secs_f64(), latencies))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = common::env_num("WEBHOOK_BENCH_SECONDS", 5);
    let clients = common::env_num("WEBHOOK_CLIENTS", 16) as usize;
    let batch = common::env_num("WEBHOOK_BATCH", 100) as usize;
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

    let http = dsreg::connectors::http::client()?;
    let url = format!("http://{addr}/ingest/{id}");
    let load = Load {
        http,
        url,
        clients,
        batch,
    };
    // Warm-up (connections, the pool's statements), then back to back, then paced.
    let window = Duration::from_secs(seconds);
    let (warm, _, _) = load.run(None, 0, Duration::from_secs(1)).await?;
    let (saturated, elapsed, saturated_latency) = load.run(None, 1, window).await?;
    let mut paced = Vec::new();
    for rate in PACED_RECORDS_PER_S {
        let (_, _, latency) = load.run(Some(rate), 2 + paced.len(), window).await?;
        paced.push((rate, latency));
    }
    let accepted = warm + saturated + paced.iter().map(|(_, l)| l.len() * batch).sum::<usize>();
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
    let ms = |l: &[f64]| {
        format!(
            "{:.2} / {:.2} ms",
            common::quantile(l, 0.5),
            common::quantile(l, 0.99)
        )
    };
    let mut rows = vec![
        (
            format!(
                "webhook → transform → postgres sink, records/s, {clients} clients back to back (202 = committed)"
            ),
            format!("{:.0}", saturated as f64 / elapsed),
            "≥ 20,000".to_owned(),
        ),
        (
            "accept latency per request at that saturation, p50 / p99".to_owned(),
            ms(&saturated_latency),
            "printed (queueing: clients ÷ request rate)".to_owned(),
        ),
    ];
    for (rate, latency) in &paced {
        rows.push((
            format!(
                "accept latency per request, {rate:.0} records/s offered ({clients} clients, paced; from when each request was due), p50 / p99"
            ),
            ms(latency),
            "p99 ≤ 10 ms".to_owned(),
        ));
    }
    common::print_table(
        &format!(
            "webhook benchmark: {clients} clients, {batch} records per request, {seconds}s per run, durable Postgres"
        ),
        &rows,
    );
    Ok(())
}
