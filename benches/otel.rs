//! `otel`: what exporting traces costs. The real `dsreg serve` binary runs on the same durable
//! Postgres three ways: with no OTLP endpoint (tracing off), exporting through
//! `opentelemetry-otlp` to a live OTLP/gRPC receiver with the default sampler (every span),
//! and the same with `OTEL_TRACES_SAMPLER=parentbased_traceidratio` at 0.1, in rounds whose
//! order rotates (off, default, ratio; default, ratio, off; ...) so that drift in the
//! machine's speed falls on all alike, and the same load runs against each:
//!
//! - reload latency: PublishVersion (or a rollback) sent → the worker RUNNING on it, as the
//!   client sees it through WatchStatus, one reload at a time (all rounds' samples pooled);
//! - GetStatus throughput over 64 concurrent streams, after a one-second warm-up, and the
//!   registry process's CPU time per call (the medians of the rounds; the change is the
//!   median of each round's change, its two runs side by side).
//!
//! `cargo bench --bench otel`; `OTEL_BENCH_SECONDS` sets the throughput window (10),
//! `OTEL_BENCH_RELOADS` the reloads per run (400: a p99 of 500 pooled reloads is the fifth
//! slowest, and moves by more than the overhead measured with one slow reload either way),
//! `OTEL_BENCH_ROUNDS` the rounds (5).

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
/// GetStatus calls made before the window, not counted.
const WARM_UP: Duration = Duration::from_secs(1);

/// CPU time (user and system) the process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..]
        .split(' ')
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // Clock ticks per second: 100 on Linux.
    ticks / 100.0
}

/// Rates as a short list: `21,051 / 17,682`.
fn list(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

#[derive(Default)]
struct Run {
    reload: Vec<f64>,
    status_rate: f64,
    status: Vec<f64>,
    /// Each round's GetStatus rate, in round order.
    rates: Vec<f64>,
    /// The registry process's CPU time per GetStatus in each round, in microseconds, in round
    /// order.
    cpu: Vec<f64>,
}

impl Run {
    /// Pools another round's samples.
    fn add(&mut self, round: Run) {
        self.reload.extend(round.reload);
        self.status.extend(round.status);
        self.rates.push(round.status_rate);
        self.cpu.extend(round.cpu);
    }

    /// Sorts the pooled samples; the rate is the rounds' median.
    fn finish(mut self) -> Run {
        self.reload.sort_by(f64::total_cmp);
        self.status.sort_by(f64::total_cmp);
        self.status_rate = median(self.rates.clone());
        self
    }
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median over rounds of exported against off, each round's two runs side by side (the
/// machine's speed drifts between rounds more than between a round's two runs), in percent.
fn paired(off: &[f64], on: &[f64]) -> String {
    let changes = off.iter().zip(on).map(|(off, on)| (on - off) / off * 100.0);
    format!("{:+.1}%", median(changes.collect()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env_num = common::env_num;
    let window = Duration::from_secs(env_num("OTEL_BENCH_SECONDS", 10));
    let reloads = env_num("OTEL_BENCH_RELOADS", 400) as usize;
    let rounds = env_num("OTEL_BENCH_ROUNDS", 5).max(1) as usize;
    let db = common::database().await?;
    let client = dsreg::db::connect(&db.url).await?;
    let (endpoint, received) = otlp::receiver().await;
    let exporting = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "dsreg-bench"),
    ];
    let sampled = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "dsreg-bench"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
    ];
    let setups: [(&str, &[(&str, &str)]); 3] =
        [("off", &[]), ("default", &exporting), ("ratio", &sampled)];

    let mut runs: [Run; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..setups.len() {
            let which = (round + k) % setups.len();
            let (name, env) = setups[which];
            let project = format!("{name}-{round}");
            runs[which].add(measure(&db.url, &client, &project, env, reloads, window).await?);
        }
    }
    let [off, on, ratio] = runs.map(Run::finish);
    let spans = received.0.lock().map(|g| g.len()).unwrap_or(0);

    let q = |v: &[f64], p: f64| common::quantile(v, p);
    let pct = |off: f64, on: f64| format!("{:+.1}%", (on - off) / off * 100.0);
    let mut rows = Vec::new();
    for (label, on) in [
        ("exported, default sampler", &on),
        ("exported, parentbased_traceidratio 0.1", &ratio),
    ] {
        rows.push((
            format!("{label}: reload latency p50 ({rounds} × {reloads} reloads, one at a time)"),
            format!(
                "off {:.2} ms, exported {:.2} ms ({})",
                q(&off.reload, 0.5),
                q(&on.reload, 0.5),
                pct(q(&off.reload, 0.5), q(&on.reload, 0.5))
            ),
            "overhead ≤ 10%".to_owned(),
        ));
        rows.push((
            format!("{label}: reload latency p99"),
            format!(
                "off {:.2} ms, exported {:.2} ms ({})",
                q(&off.reload, 0.99),
                q(&on.reload, 0.99),
                pct(q(&off.reload, 0.99), q(&on.reload, 0.99))
            ),
            "-".to_owned(),
        ));
        rows.push((
            format!(
                "{label}: GetStatus, {STREAMS} streams, median of {rounds} rounds (change: median of the rounds' changes)"
            ),
            format!(
                "off {:.0}/s, exported {:.0}/s ({}); rounds off {}, exported {}",
                off.status_rate,
                on.status_rate,
                paired(&off.rates, &on.rates),
                list(&off.rates),
                list(&on.rates),
            ),
            "-".to_owned(),
        ));
        rows.push((
            format!("{label}: registry CPU time per GetStatus (user + system; medians as above)"),
            format!(
                "off {:.1} µs, exported {:.1} µs ({})",
                median(off.cpu.clone()),
                median(on.cpu.clone()),
                paired(&off.cpu, &on.cpu)
            ),
            "-".to_owned(),
        ));
        rows.push((
            format!("{label}: GetStatus latency p99"),
            format!(
                "off {:.2} ms, exported {:.2} ms",
                q(&off.status, 0.99),
                q(&on.status, 0.99)
            ),
            "-".to_owned(),
        ));
    }
    rows.push((
        "spans received by the OTLP receiver".to_owned(),
        spans.to_string(),
        "> 0".to_owned(),
    ));
    common::print_table(
        "otel: tracing off versus exported to a live OTLP receiver (opentelemetry-otlp, gRPC)",
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
    let measured_from = Instant::now() + WARM_UP;
    let deadline = measured_from + window;
    let pid = server.child.id().expect("dsreg serve is running");
    let cpu_at_start = tokio::spawn(async move {
        tokio::time::sleep_until(measured_from.into()).await;
        cpu_seconds(pid)
    });
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
                if t >= measured_from {
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        }));
    }
    let mut status = Vec::new();
    for t in tasks {
        status.extend(t.await?);
    }
    let cpu = cpu_seconds(pid) - cpu_at_start.await?;
    let status_rate = status.len() as f64 / window.as_secs_f64();
    server.stop().await;
    Ok(Run {
        reload,
        status_rate,
        cpu: vec![cpu * 1e6 / status.len() as f64],
        status,
        rates: Vec::new(),
    })
}
