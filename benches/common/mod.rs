//! What the benchmarks share: a durable embedded cluster in a temporary folder (or
//! `DATABASE_URL`), percentiles, and the table they print.

#![allow(dead_code)]

use dsreg::db::embedded::{ClusterOptions, DATABASE, EmbeddedCluster};

/// A database for one benchmark run; the cluster stops when this is dropped.
pub struct BenchDb {
    /// Its URL.
    pub url: String,
    _cluster: Option<EmbeddedCluster>,
    _dir: Option<tempfile::TempDir>,
}

/// Starts a durable cluster (fsync on, as users run it) or uses `DATABASE_URL`, migrated.
pub async fn database() -> anyhow::Result<BenchDb> {
    let db = if let Ok(url) = std::env::var("DATABASE_URL") {
        BenchDb {
            url,
            _cluster: None,
            _dir: None,
        }
    } else {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let options = ClusterOptions::durable(dir.path().join("pg"));
        let cluster =
            tokio::task::spawn_blocking(move || EmbeddedCluster::start(&options)).await??;
        // Statement counts come from pg_stat_statements, which must be preloaded.
        dsreg::db::connect(&cluster.url("postgres"))
            .await?
            .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            .await?;
        let cluster =
            tokio::task::spawn_blocking(move || cluster.restart().map(|()| cluster)).await??;
        dsreg::db::create_database(&cluster.url("postgres"), DATABASE, None).await?;
        BenchDb {
            url: cluster.url(DATABASE),
            _cluster: Some(cluster),
            _dir: Some(dir),
        }
    };
    dsreg::app::migrate(&db.url).await?;
    Ok(db)
}

/// Statements executed in this database so far (`pg_stat_statements`, our own probes
/// excluded), or `None` when the extension is not available.
pub async fn statements(client: &tokio_postgres::Client) -> Option<i64> {
    if let Err(e) = client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
    {
        eprintln!("pg_stat_statements: {e:?}");
        return None;
    }
    let row = client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND query NOT LIKE '%pg_stat_statements%'",
            &[],
        )
        .await
        .map_err(|e| eprintln!("pg_stat_statements: {e:?}"))
        .ok()?;
    Some(row.get(0))
}

/// Waits until every id has been written as RUNNING on `version`; returns when the last was.
pub async fn wait_running(
    written: &mut tokio::sync::mpsc::UnboundedReceiver<dsreg::supervisor::writer::Written>,
    ids: &[uuid::Uuid],
    version: i32,
) -> std::time::Instant {
    let mut missing: std::collections::HashSet<uuid::Uuid> = ids.iter().copied().collect();
    loop {
        let batch = written.recv().await.expect("registry running");
        for (id, status, v) in &batch.states {
            if *status == Some(dsreg::domain::WorkerStatus::Running) && *v == Some(version) {
                missing.remove(id);
            }
        }
        if missing.is_empty() {
            return batch.at;
        }
    }
}

/// The number in environment variable `name`, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The `q` quantile of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// Prints a markdown table of (figure, value, target).
pub fn print_table(title: &str, rows: &[(String, String, String)]) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\n{title} ({cpus} CPUs)\n");
    println!("| figure | value | target |\n| --- | --- | --- |");
    for (figure, value, target) in rows {
        println!("| {figure} | {value} | {target} |");
    }
}

/// Creates `n` generator datasources (`ds-1`..) in org `bench`, project `project`, each with
/// three draft versions that emit nothing; returns their ids.
pub async fn seed(
    client: &tokio_postgres::Client,
    project: &str,
    n: usize,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    client
        .execute(
            "INSERT INTO datasources (org, project, name, kind)
             SELECT 'bench', $1, 'ds-' || i, 'generator' FROM generate_series(1, $2::int) i",
            &[&project, &(n as i32)],
        )
        .await?;
    client
        .execute(
            "INSERT INTO datasource_versions (datasource_id, version, config)
             SELECT id, v, jsonb_build_object('rate_per_sec', 0, 'template', jsonb_build_object('v', v))
             FROM datasources, generate_series(1, 3) v WHERE project = $1",
            &[&project],
        )
        .await?;
    Ok(client
        .query("SELECT id FROM datasources WHERE project = $1", &[&project])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
