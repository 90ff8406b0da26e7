//! `publish`: publishes per second through `dsreg_publish` with 1, 4 and 16 concurrent clients,
//! and publish COMMIT → NOTIFY received latency on a LISTEN connection. The floor every later
//! reload latency is measured against.
//!
//! Runs on a durable embedded cluster in a temporary folder (or `DATABASE_URL`):
//! `cargo bench --bench publish`. `PUBLISH_BENCH_SECONDS` sets each throughput run's length.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

const DATASOURCES_PER_CLIENT: usize = 32;
const LATENCY_SAMPLES: usize = 1_000;

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("PUBLISH_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let db = common::database().await?;
    let url = db.url.clone();

    let mut rows = Vec::new();
    for clients in [1usize, 4, 16] {
        let sets = seed(&url, clients).await?;
        let rate = throughput(&url, sets, Duration::from_secs(seconds)).await?;
        rows.push((
            format!("publishes/s through dsreg_publish, {clients} client(s)"),
            format!("{rate:.0}"),
            "floor".to_owned(),
        ));
    }
    let (p50, p99, max) = notify_latency(&url).await?;
    for (q, v) in [("p50", p50), ("p99", p99), ("max", max)] {
        rows.push((
            format!("publish COMMIT → NOTIFY received, {q}"),
            format!("{v:.2} ms"),
            "floor".to_owned(),
        ));
    }
    common::print_table(
        &format!(
            "publish benchmark: durable cluster, {seconds}s per throughput run, {LATENCY_SAMPLES} latency samples"
        ),
        &rows,
    );
    Ok(())
}

/// Creates, per client, a set of datasources with two versions each.
async fn seed(url: &str, clients: usize) -> anyhow::Result<Vec<Vec<Uuid>>> {
    let client = dsreg::db::connect(url).await?;
    let project = format!("bench-{}", Uuid::new_v4().simple());
    client
        .execute(
            "INSERT INTO datasources (org, project, name, kind)
             SELECT 'bench', $1, 'ds-' || i, 'generator' FROM generate_series(1, $2::int) i",
            &[&project, &((clients * DATASOURCES_PER_CLIENT) as i32)],
        )
        .await?;
    client
        .execute(
            "INSERT INTO datasource_versions (datasource_id, version, config)
             SELECT id, v, '{\"rate\": 1}' FROM datasources, generate_series(1, 2) v WHERE project = $1",
            &[&project],
        )
        .await?;
    let ids: Vec<Uuid> = client
        .query(
            "SELECT id FROM datasources WHERE project = $1 ORDER BY name",
            &[&project],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(ids
        .chunks(DATASOURCES_PER_CLIENT)
        .map(<[Uuid]>::to_vec)
        .collect())
}

/// Each client publishes alternate versions of its own datasources for `length`.
async fn throughput(url: &str, sets: Vec<Vec<Uuid>>, length: Duration) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for set in sets {
        let client = dsreg::db::connect(url).await?;
        let statement = client
            .prepare("SELECT dsreg_publish($1, $2, 'bench')")
            .await?;
        let (done, count) = (done.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0i32;
            while !done.load(Ordering::Relaxed) {
                let id = set[round as usize % set.len()];
                let version = 1 + (round / set.len() as i32) % 2;
                client.query_one(&statement, &[&id, &version]).await?;
                count.fetch_add(1, Ordering::Relaxed);
                round += 1;
            }
            anyhow::Ok(())
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(length).await;
    done.store(true, Ordering::Relaxed);
    let published = count.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    for task in tasks {
        task.await??;
    }
    Ok(published as f64 / elapsed.as_secs_f64())
}

/// Publishes one at a time; measures from just before COMMIT to the notification's arrival.
async fn notify_latency(url: &str) -> anyhow::Result<(f64, f64, f64)> {
    let sets = seed(url, 1).await?;
    let ids = &sets[0];
    let mut listening = dsreg::outbox::notifications::listen(url, dsreg::outbox::CHANNEL).await?;
    let publisher = dsreg::db::connect(url).await?;
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for round in 0..LATENCY_SAMPLES {
        let id = ids[round % ids.len()];
        let version = 1 + ((round / ids.len()) % 2) as i32;
        publisher.batch_execute("BEGIN").await?;
        publisher
            .query_one("SELECT dsreg_publish($1, $2, 'bench')", &[&id, &version])
            .await?;
        let before_commit = Instant::now();
        publisher.batch_execute("COMMIT").await?;
        let notification =
            tokio::time::timeout(Duration::from_secs(5), listening.notifications.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("listener closed"))?;
        samples.push(before_commit.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            notification.payload().contains(&id.to_string()),
            "unexpected notification"
        );
    }
    samples.sort_by(f64::total_cmp);
    Ok((
        common::quantile(&samples, 0.50),
        common::quantile(&samples, 0.99),
        samples[samples.len() - 1],
    ))
}
