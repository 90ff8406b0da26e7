//! `otel`: what exporting traces costs. The real `dsreg serve` binary runs twice on the same
//! durable Postgres — once with no OTLP endpoint (tracing off), once exporting every span to a
//! live OTLP receiver — and the same load runs against each:
//!
//! - reload latency: PublishVersion (or a rollback) sent → the worker RUNNING on it, as the
//!   client sees it through WatchStatus, one reload at a time;
//! - GetStatus throughput over 64 concurrent streams.
//!
//! `cargo bench --bench otel`; `OTEL_BENCH_SECONDS` sets the throughput window (10),
//! `OTEL_BENCH_RELOADS` the reloads per run (200).

mod common;

#[path = "../tests/support/otlp.rs"]
mod otlp;
#[path = "../tests/support/serve_process.rs"]
mod serve_process;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use serve_process::ServeProcess;

const STREAMS: usize = 64;

struct Run {
    reload: Vec<f64>,
    status_rate: f64,
    status: Vec<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env_num = common::env_num;
    let window = Duration::from_secs(env_num("OTEL_BENCH_SECONDS", 10));
    let reloads = env_num("OTEL_BENCH_RELOADS", 200) as usize;
    let db = common::database().await?;
    let client = dsreg::db::connect(&db.url).await?;
    let (endpoint, received) = otlp::receiver().await;

    let off = measure(&db.url, &client, "off", &[], reloads, window).await?;
    let on = measure(
        &db.url,
        &client,
        "on",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "dsreg-bench"),
        ],
        reloads,
        window,
    )
    .await?;
    let spans = received.0.lock().map(|g| g.len()).unwrap_or(0);

    let q = |v: &[f64], p: f64| common::quantile(v, p);
    let pct = |off: f64, on: f64| format!("{:+.1}%", (on - off) / off * 100.0);
    let rows = vec![
        (
            format!("reload latency p50 ({reloads} reloads, one at a time)"),
            format!(
                "off {:.2} ms, exported {:.2} ms ({})",
                q(&off.reload, 0.5),
                q(&on.reload, 0.5),
                pct(q(&off.reload, 0.5), q(&on.reload, 0.5))
            ),
            "overhead ≤ 10%".to_owned(),
        ),
        (
            "reload latency p99".to_owned(),
            format!(
                "off {:.2} ms, exported {:.2} ms ({})",
                q(&off.reload, 0.99),
                q(&on.reload, 0.99),
                pct(q(&off.reload, 0.99), q(&on.reload, 0.99))
            ),
            "overhead ≤ 10%".to_owned(),
        ),
        (
            format!("GetStatus, {STREAMS} streams"),
            format!(
                "off {:.0}/s, exported {:.0}/s ({})",
                off.status_rate,
                on.status_rate,
                pct(off.status_rate, on.status_rate)
            ),
            "overhead ≤ 10%".to_owned(),
        ),
        (
            "GetStatus latency p99".to_owned(),
            format!(
                "off {:.2} ms, exported {:.2} ms",
                q(&off.status, 0.99),
                q(&on.status, 0.99)
            ),
            "-".to_owned(),
        ),
        (
            "spans received by the OTLP receiver".to_owned(),
            spans.to_string(),
            "> 0".to_owned(),
        ),
    ];
    common::print_table(
        "otel: tracing off versus exported to a live OTLP receiver",
        &rows,
    );
    Ok(())
}

async fn measure(
    url: &str,
    client: &tokio_postgres::Client,
    project: &str,
    env: &[(&str, &str)],
    reloads: usize,
    window: Duration,
) -> anyhow::Result<Run> {
    let ids = common::seed(client, project, STREAMS).await?;
    let server = ServeProcess::start(url, env).await;
    let channel = server.channel().await;
    let mut ds = DatasourcesClient::new(channel.clone());
    let mut life = LifecycleClient::new(channel.clone());

    // Reloads of one datasource: versions 1, 2, 3, then rollbacks between them.
    let id = ids[0].to_string();
    let mut watch = life
        .watch_status(pb::GetStatusRequest {
            datasource_id: id.clone(),
        })
        .await?
        .into_inner();
    let mut reload = Vec::with_capacity(reloads);
    for n in 0..reloads + 3 {
        let version = (n % 3) as i32 + 1;
        let sent = Instant::now();
        if n < 3 {
            ds.publish_version(pb::PublishVersionRequest {
                datasource_id: id.clone(),
                version,
            })
            .await?;
        } else {
            ds.rollback_version(pb::RollbackVersionRequest {
                datasource_id: id.clone(),
                to_version: version,
            })
            .await?;
        }
        loop {
            let state = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await??
                .ok_or_else(|| anyhow::anyhow!("the status stream ended"))?;
            if state.status == pb::WorkerStatus::Running as i32 && state.running_version == version
            {
                break;
            }
        }
        // The first three start the worker; the rest are reloads.
        if n >= 3 {
            reload.push(sent.elapsed().as_secs_f64() * 1000.0);
        }
    }
    reload.sort_by(f64::total_cmp);

    let deadline = Instant::now() + window;
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let mut life = LifecycleClient::new(channel.clone());
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut k = i;
            while Instant::now() < deadline {
                k = (k + 1) % ids.len();
                let t = Instant::now();
                life.get_status(pb::GetStatusRequest {
                    datasource_id: ids[k].to_string(),
                })
                .await
                .expect("GetStatus");
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let mut status = Vec::new();
    for t in tasks {
        status.extend(t.await?);
    }
    status.sort_by(f64::total_cmp);
    let status_rate = status.len() as f64 / window.as_secs_f64();
    server.stop().await;
    Ok(Run {
        reload,
        status_rate,
        status,
    })
}
