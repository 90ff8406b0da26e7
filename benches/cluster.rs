//! `cluster`: several `dsreg serve` processes sharing 3,000 datasources through leases on one
//! durable Postgres.
//!
//! - failover: SIGKILL one of three instances → every datasource it ran is RUNNING on another
//!   (p50/p99 over the kills; a fresh instance replaces the killed one between kills);
//! - join: a fourth instance starts → how many datasources move, and how long until every one
//!   runs where the assignment puts it;
//! - renewals: lease-renewal statements per second across the instances (from
//!   `pg_stat_statements`), and lease rows rewritten per second at rest (from
//!   `pg_stat_user_tables`): a renewal writes its instance's row, not its leases.
//!
//! `cargo bench --bench cluster`; `CLUSTER_BENCH_DATASOURCES` (3000), `CLUSTER_BENCH_KILLS`
//! (10), `CLUSTER_BENCH_TTL_MS` (the lease time, default the service's 10000).

mod common;

#[path = "../tests/support/cluster.rs"]
mod cluster;
#[path = "../tests/support/serve_process.rs"]
mod serve_process;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serve_process::ServeProcess;
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(300);

async fn start(url: &str, name: &str, ttl_ms: &str) -> ServeProcess {
    ServeProcess::start(
        url,
        &[
            ("DSREG_INSTANCE_ID", name),
            ("DSREG_LEASE_TTL_MS", ttl_ms),
            ("DSREG_POOL_SIZE", "6"),
            ("DSREG_LOG", "warn,dsreg::app=info"),
        ],
    )
    .await
}

/// Renewal statements run so far, and the lease rows updated so far.
async fn renewals(client: &tokio_postgres::Client) -> Option<(i64, i64)> {
    common::statements(client).await?;
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
                     WHERE query LIKE '%WITH was AS%'),
                    (SELECT coalesce(sum(n_tup_upd), 0)::bigint FROM pg_stat_user_tables
                     WHERE relname = 'datasource_leases')",
            &[],
        )
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env_num = common::env_num;
    let n = env_num("CLUSTER_BENCH_DATASOURCES", 3_000) as i64;
    let kills = env_num("CLUSTER_BENCH_KILLS", 10) as usize;
    let ttl = Duration::from_millis(env_num("CLUSTER_BENCH_TTL_MS", 10_000));
    let ttl_ms = ttl.as_millis().to_string();
    let db = common::database().await?;
    let client = dsreg::db::connect(&db.url).await?;
    let ids: Vec<Uuid> = cluster::fleet(&client, n, 0.5).await;

    let mut live: Vec<(String, ServeProcess)> = Vec::new();
    for i in 0..3 {
        let name = format!("node-{i}");
        live.push((name.clone(), start(&db.url, &name, &ttl_ms).await));
    }
    let names = |live: &[(String, ServeProcess)]| -> Vec<String> {
        live.iter().map(|(n, _)| n.clone()).collect()
    };
    let started = Instant::now();
    let three = names(&live);
    let three_refs: Vec<&str> = three.iter().map(String::as_str).collect();
    let before = cluster::balanced(&client, &ids, &three_refs, SETTLE).await;
    let first_balance = started.elapsed();

    // Renewal statements over a quiet window.
    let window = ttl.max(Duration::from_secs(10));
    let r0 = renewals(&client).await;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let r1 = renewals(&client).await;
    let renewal_rate = match (r0, r1) {
        (Some((c0, rows0)), Some((c1, rows1))) => {
            let secs = t0.elapsed().as_secs_f64();
            let calls = (c1 - c0) as f64;
            format!(
                "{:.2} statements/s for {} instances; {:.1} lease rows rewritten/s",
                calls / secs,
                live.len(),
                (rows1 - rows0) as f64 / secs
            )
        }
        _ => "pg_stat_statements unavailable".to_owned(),
    };

    // A fourth instance joins.
    let joined_at = Instant::now();
    live.push(("node-3".into(), start(&db.url, "node-3", &ttl_ms).await));
    let four = names(&live);
    let four_refs: Vec<&str> = four.iter().map(String::as_str).collect();
    let after = cluster::balanced(&client, &ids, &four_refs, SETTLE).await;
    let join_took = joined_at.elapsed();
    let moved = ids.iter().filter(|id| before[*id] != after[*id]).count();
    // Back to three for the kills.
    let (_, fourth) = live.pop().expect("four instances");
    fourth.stop().await;
    let back = names(&live);
    let back_refs: Vec<&str> = back.iter().map(String::as_str).collect();
    let mut owners: HashMap<Uuid, String> =
        cluster::balanced(&client, &ids, &back_refs, SETTLE).await;

    let mut failovers: Vec<f64> = Vec::with_capacity(kills);
    for k in 0..kills {
        let (victim, mut process) = live.remove(k % live.len());
        let theirs: Vec<Uuid> = ids
            .iter()
            .filter(|id| owners[*id] == victim)
            .copied()
            .collect();
        let killed = Instant::now();
        process.child.start_kill()?;
        let _ = process.child.wait().await;
        loop {
            let running = cluster::running(&client).await;
            if theirs
                .iter()
                .all(|id| running.get(id).is_some_and(|(on, _)| *on != victim))
            {
                break;
            }
            anyhow::ensure!(killed.elapsed() < SETTLE, "failover did not complete");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failovers.push(killed.elapsed().as_secs_f64() * 1e3);
        eprintln!(
            "kill {}: {} datasources of {victim} running elsewhere after {:.0} ms",
            k + 1,
            theirs.len(),
            failovers[k]
        );
        // A replacement joins; wait for the balance before the next kill.
        let name = format!("node-r{k}");
        live.push((name.clone(), start(&db.url, &name, &ttl_ms).await));
        let now = names(&live);
        let now_refs: Vec<&str> = now.iter().map(String::as_str).collect();
        owners = cluster::balanced(&client, &ids, &now_refs, SETTLE).await;
    }
    for (_, p) in live {
        p.stop().await;
    }

    failovers.sort_by(f64::total_cmp);
    let q = |p: f64| common::quantile(&failovers, p);
    common::print_table(
        &format!(
            "cluster: 3 instances, {n} datasources, lease time {} ms, {kills} kills",
            ttl.as_millis()
        ),
        &[
            (
                "failover after SIGKILL, p50".to_owned(),
                format!("{:.0} ms", q(0.5)),
                format!("≤ lease time + 2 s ({} ms)", ttl.as_millis() + 2_000),
            ),
            (
                "failover after SIGKILL, p99".to_owned(),
                format!("{:.0} ms", q(0.99)),
                format!("≤ {} ms", ttl.as_millis() + 2_000),
            ),
            (
                "datasources moved when a fourth instance joins".to_owned(),
                format!(
                    "{moved} of {n} ({:.1}%), balanced after {:.1} s",
                    moved as f64 * 100.0 / n as f64,
                    join_took.as_secs_f64()
                ),
                "about a quarter".to_owned(),
            ),
            (
                "lease renewals".to_owned(),
                renewal_rate,
                "one statement per instance per tick, no lease row rewritten".to_owned(),
            ),
            (
                "first start: every datasource RUNNING under its lease".to_owned(),
                format!("{:.1} s", first_balance.as_secs_f64()),
                String::new(),
            ),
        ],
    );
    Ok(())
}
