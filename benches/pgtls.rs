//! `pgtls`: what TLS to Postgres costs the registry's reaction, plain against TLS in the same
//! run on the same cluster: publish COMMIT → NOTIFY received on a LISTEN connection (the path
//! every publish takes to a worker) and a `SELECT 1` round trip, p50 and p99 of each and the
//! difference.
//!
//! Runs a durable embedded cluster of its own in a temporary folder with `ssl = on` and a
//! self-signed certificate made with the `openssl` CLI; both connections of a sample use the
//! same mode, and the modes alternate sample by sample so load on the machine falls on both
//! alike. `cargo bench --bench pgtls`; `PGTLS_BENCH_SAMPLES` sets the samples per mode.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use dsreg::db::embedded::{ClusterOptions, DATABASE, EmbeddedCluster};

mod common;

/// One connection mode under test: a listener and a publisher.
struct Mode {
    name: &'static str,
    listening: dsreg::outbox::notifications::Listening,
    publisher: tokio_postgres::Client,
    reaction: Vec<f64>,
    round_trip: Vec<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let samples = usize::try_from(common::env_num("PGTLS_BENCH_SAMPLES", 2_000))?.max(1);
    let dir = tempfile::tempdir()?;
    // As root the server runs unprivileged and must reach its files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let options = ClusterOptions::durable(dir.path().join("pg"));
    let cluster = tokio::task::spawn_blocking(move || EmbeddedCluster::start(&options)).await??;
    switch_tls_on(&cluster, &dir.path().join("certs")).await?;
    dsreg::db::create_database(&cluster.url("postgres"), DATABASE, None).await?;
    let url = cluster.url(DATABASE);
    dsreg::app::migrate(&url).await?;
    let ids = common::seed(&dsreg::db::connect(&url).await?, "pgtls", 64).await?;

    let mut modes = Vec::new();
    for (name, sslmode) in [("plain", "disable"), ("TLS", "require")] {
        let url = format!("{url}?sslmode={sslmode}");
        modes.push(Mode {
            name,
            listening: dsreg::outbox::notifications::listen(&url, dsreg::outbox::CHANNEL).await?,
            publisher: dsreg::db::connect(&url).await?,
            reaction: Vec::with_capacity(samples),
            round_trip: Vec::with_capacity(samples),
        });
    }
    let encrypted: bool = modes[1]
        .publisher
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(encrypted, "the TLS mode's connection is not encrypted");

    for round in 0..samples * modes.len() {
        let mode = &mut modes[round % 2];
        let id = ids[(round / 2) % ids.len()];
        // Versions 1..3 in turn: each publish changes the published version.
        let version = 1 + ((round / 2 / ids.len()) % 3) as i32;
        mode.publisher.batch_execute("BEGIN").await?;
        mode.publisher
            .query_one("SELECT dsreg_publish($1, $2, 'bench')", &[&id, &version])
            .await?;
        let before_commit = Instant::now();
        mode.publisher.batch_execute("COMMIT").await?;
        let notification =
            tokio::time::timeout(Duration::from_secs(5), mode.listening.notifications.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the {} listener closed", mode.name))?;
        mode.reaction
            .push(before_commit.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            notification.payload().contains(&id.to_string()),
            "unexpected notification"
        );
        let before_query = Instant::now();
        mode.publisher.simple_query("SELECT 1").await?;
        mode.round_trip
            .push(before_query.elapsed().as_secs_f64() * 1e3);
    }

    let mut rows = Vec::new();
    let mut figures = Vec::new();
    for mode in &mut modes {
        mode.reaction.sort_by(f64::total_cmp);
        mode.round_trip.sort_by(f64::total_cmp);
        let figure = [
            common::quantile(&mode.reaction, 0.50),
            common::quantile(&mode.reaction, 0.99),
            common::quantile(&mode.round_trip, 0.50),
            common::quantile(&mode.round_trip, 0.99),
        ];
        for (what, value) in [
            "publish COMMIT → NOTIFY received, p50",
            "publish COMMIT → NOTIFY received, p99",
            "SELECT 1 round trip, p50",
            "SELECT 1 round trip, p99",
        ]
        .iter()
        .zip(figure)
        {
            rows.push((
                format!("{what}, {}", mode.name),
                format!("{value:.3} ms"),
                "measured".to_owned(),
            ));
        }
        figures.push(figure);
    }
    for (i, what) in [
        "publish COMMIT → NOTIFY received, p50",
        "publish COMMIT → NOTIFY received, p99",
        "SELECT 1 round trip, p50",
        "SELECT 1 round trip, p99",
    ]
    .iter()
    .enumerate()
    {
        rows.push((
            format!("{what}, TLS − plain"),
            format!("{:+.3} ms", figures[1][i] - figures[0][i]),
            "the cost of TLS".to_owned(),
        ));
    }
    common::print_table(
        &format!(
            "pgtls benchmark: durable cluster, plain and TLS (sslmode=require) alternating, {samples} samples each"
        ),
        &rows,
    );
    Ok(())
}

/// Generates a self-signed certificate for `localhost` and 127.0.0.1 in `certs` and turns
/// TLS on (plain connections are still accepted).
async fn switch_tls_on(cluster: &EmbeddedCluster, certs: &Path) -> anyhow::Result<()> {
    std::fs::create_dir(certs)?;
    std::fs::set_permissions(certs, std::fs::Permissions::from_mode(0o755))?;
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
        ])
        .current_dir(certs)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server's key belongs to the server's user, readable by it alone.
    let owner = std::fs::metadata(cluster.data_dir())?;
    for name in ["server.key", "server.crt"] {
        std::os::unix::fs::chown(certs.join(name), Some(owner.uid()), Some(owner.gid()))?;
    }
    std::fs::set_permissions(
        certs.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let admin = dsreg::db::connect(&format!("{}?sslmode=disable", cluster.url("postgres"))).await?;
    let folder = certs.display();
    // ALTER SYSTEM runs outside a transaction block: one statement at a time.
    for statement in [
        "ALTER SYSTEM SET ssl = on".to_owned(),
        format!("ALTER SYSTEM SET ssl_cert_file = '{folder}/server.crt'"),
        format!("ALTER SYSTEM SET ssl_key_file = '{folder}/server.key'"),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        admin.batch_execute(&statement).await?;
    }
    let url = format!("{}?sslmode=require", cluster.url("postgres"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match dsreg::db::connect(&url).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("TLS did not come on within 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
