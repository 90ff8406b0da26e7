//! `reconcile`: what users feel of the reconcile loop, on one in-process registry against a
//! durable Postgres on this machine.
//!
//! - publish COMMIT → the new version's worker started (in-process timestamp), and → its
//!   `datasource_state` row written as RUNNING on that version, over 1,000 publishes with
//!   1,000 active datasources; latencies start just before COMMIT in the publishing client;
//! - 1,000 datasources published in one transaction → all RUNNING;
//! - NOTIFYs sent for that publish and the worker events it caused;
//! - 9,000 more published in one transaction → all RUNNING (10,000 active idle workers);
//! - those 10,000 workers: resident memory, database statements per second at rest, and a
//!   full resync with nothing to change (a page of 1,000 at a time).
//!
//! `cargo bench --bench reconcile`; `RECONCILE_REST_SECONDS` sets the at-rest window (30).

mod common;

use std::time::{Duration, Instant};

use dsreg::app::App;
use dsreg::config::Settings;
use dsreg::supervisor::Pass;
use dsreg::supervisor::worker::Started;
use dsreg::supervisor::writer::Written;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

const ACTIVE: usize = 1_000;
const IDLE_TOTAL: usize = 10_000;

struct Observed {
    started: UnboundedReceiver<Started>,
    written: UnboundedReceiver<Written>,
    passes: UnboundedReceiver<Pass>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rest_seconds: u64 = std::env::var("RECONCILE_REST_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let db = common::database().await?;
    let client = dsreg::db::connect(&db.url).await?;
    let rss_before = rss_mb();

    let mut settings = Settings::for_database(&db.url);
    // Nothing here calls the gRPC port.
    settings.auth.insecure_no_auth = true;
    settings.pool_size = 16;
    let mut app = App::build(&settings, &db.url).await?;
    let (started_tx, started) = tokio::sync::mpsc::unbounded_channel();
    let (written_tx, written) = tokio::sync::mpsc::unbounded_channel();
    let (passes_tx, passes) = tokio::sync::mpsc::unbounded_channel();
    app.started = Some(started_tx);
    app.written = Some(written_tx);
    app.supervisor.passes = Some(passes_tx);
    let stats = app.listener_stats.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone(), Duration::from_secs(30)));
    let mut observed = Observed {
        started,
        written,
        passes,
    };
    while !stats.connected.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The initial resync of an empty registry.
    observed.passes.recv().await;
    let mut rows = Vec::new();

    // 1,000 datasources with three versions each; version 1 published in one transaction.
    let ids = common::seed(&client, "active", ACTIVE).await?;
    let mut notes = dsreg::outbox::notifications::listen(&db.url, dsreg::outbox::CHANNEL).await?;
    let bulk = Instant::now();
    client
        .execute(
            "UPDATE datasource_versions SET state = 'published'
             WHERE version = 1 AND datasource_id = ANY($1)",
            &[&ids],
        )
        .await?;
    let took = common::wait_running(&mut observed.written, &ids, 1).await;
    let bulk_ms = (took - bulk).as_secs_f64() * 1e3;
    rows.push(row(
        "1,000 datasources published in one transaction → all RUNNING",
        format!("{bulk_ms:.0} ms"),
        "≤ 1 s",
    ));
    // Notifications arrive in commit order: once the marker is in, everything before it is.
    notes.client.batch_execute("LISTEN bench_marker").await?;
    client
        .execute("SELECT pg_notify('bench_marker', '')", &[])
        .await?;
    let mut notifications = 0;
    while let Some(n) = notes.notifications.recv().await {
        if n.channel() == "bench_marker" {
            break;
        }
        notifications += 1;
    }
    rows.push(row(
        "NOTIFYs for a 1,000-datasource publish and its 2,000 worker events",
        format!("{notifications}"),
        "bounded",
    ));

    // 1,000 publishes, one at a time, each of a different datasource.
    let mut to_start = Vec::new();
    let mut to_running = Vec::new();
    for id in &ids {
        client.batch_execute("BEGIN").await?;
        client
            .query_one("SELECT dsreg_publish($1, 2)", &[id])
            .await?;
        let before_commit = Instant::now();
        client.batch_execute("COMMIT").await?;
        let started = loop {
            let s = observed.started.recv().await.expect("registry running");
            if s.datasource_id == *id && s.version == 2 {
                break s.at;
            }
        };
        let written =
            common::wait_running(&mut observed.written, std::slice::from_ref(id), 2).await;
        to_start.push((started - before_commit).as_secs_f64() * 1e3);
        to_running.push((written - before_commit).as_secs_f64() * 1e3);
    }
    for samples in [&mut to_start, &mut to_running] {
        samples.sort_by(f64::total_cmp);
    }
    rows.push(row(
        "publish COMMIT → new version's worker started, p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            common::quantile(&to_start, 0.5),
            common::quantile(&to_start, 0.99)
        ),
        "≤ 1.5 / 4 ms",
    ));
    rows.push(row(
        "publish COMMIT → datasource_state RUNNING on it, p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            common::quantile(&to_running, 0.5),
            common::quantile(&to_running, 0.99)
        ),
        "≤ 3 / 8 ms",
    ));

    // Up to 10,000 active idle workers.
    let more = common::seed(&client, "idle", IDLE_TOTAL - ACTIVE).await?;
    let bulk = Instant::now();
    client
        .execute(
            "UPDATE datasource_versions SET state = 'published' WHERE version = 1 AND datasource_id = ANY($1)",
            &[&more],
        )
        .await?;
    let took = common::wait_running(&mut observed.written, &more, 1).await;
    rows.push(row(
        &format!(
            "{} more published in one transaction → all RUNNING (state writes of up to 5,000 a statement)",
            more.len()
        ),
        format!("{:.0} ms", (took - bulk).as_secs_f64() * 1e3),
        "printed",
    ));
    // Let the start-up settle (allocations returned, first heartbeat written).
    tokio::time::sleep(Duration::from_secs(2)).await;
    rows.push(row(
        "10,000 active idle workers: resident memory of the registry",
        format!(
            "{:.0} MB (process {:.0} MB, {:.0} MB before start)",
            rss_mb() - rss_before,
            rss_mb(),
            rss_before
        ),
        "≤ 300 MB",
    ));

    let first = common::statements(&client).await;
    tokio::time::sleep(Duration::from_secs(rest_seconds)).await;
    let last = common::statements(&client).await;
    let statements = match (first, last) {
        (Some(first), Some(last)) => format!(
            "{:.2} ({rest_seconds} s window)",
            (last - first) as f64 / rest_seconds as f64
        ),
        _ => "n/a (pg_stat_statements not available)".to_owned(),
    };
    rows.push(row(
        "10,000 active workers: database statements per second at rest",
        statements,
        "≤ 5",
    ));

    let mut resyncs = Vec::new();
    for _ in 0..5 {
        while observed.passes.try_recv().is_ok() {}
        dsreg::supervisor::ops::apply(
            &dsreg::db::pool(&db.url, 1, Duration::from_secs(5))?,
            &dsreg::db::repository::WriteContext::actor("bench"),
            &dsreg::supervisor::ops::Op::Reload(None),
        )
        .await?;
        let pass = loop {
            let p = observed.passes.recv().await.expect("registry running");
            if p.full {
                break p;
            }
        };
        anyhow::ensure!(
            pass.datasources == IDLE_TOTAL,
            "resync saw {} datasources",
            pass.datasources
        );
        resyncs.push(pass.took.as_secs_f64() * 1e3);
    }
    resyncs.sort_by(f64::total_cmp);
    rows.push(row(
        "full resync of 10,000 datasources with nothing to change, median / max of 5",
        format!("{:.0} / {:.0} ms", resyncs[2], resyncs[4]),
        "≤ 1 s",
    ));
    let started_total = {
        let mut n = 0;
        while observed.started.try_recv().is_ok() {
            n += 1;
        }
        n
    };
    anyhow::ensure!(
        started_total == IDLE_TOTAL - ACTIVE,
        "{started_total} unexpected worker starts during the resyncs"
    );

    shutdown.cancel();
    running.await??;
    common::print_table("reconcile benchmark: one registry, durable Postgres", &rows);
    Ok(())
}

fn row(figure: &str, value: String, target: &str) -> (String, String, String) {
    (figure.to_owned(), value, target.to_owned())
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
