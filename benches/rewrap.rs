//! `rewrap`: what `dsreg keys rewrap` costs, against a durable Postgres on this machine.
//!
//! Seeds 100,000 secrets (1,000 datasources in 10 tenants, 100 secrets each, ~48-byte values)
//! sealed under key version 1, adds version 2 and times the rewrap to it in batches of
//! `REWRAP_BATCH` (1000); then adds version 3 and times a second pass in batches of
//! `REWRAP_BATCH_SMALL` (100). Prints rows per second and checks that every row opens.
//!
//! `cargo bench --bench rewrap`; `REWRAP_SECRETS` sets the row count (100000).

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use dsreg::secrets::cipher::{self, Binding};
use dsreg::secrets::{EnvKeyProvider, KeyProvider, Secrets};
use rand::RngCore;
use uuid::Uuid;

const DATASOURCES: usize = 1_000;
const TENANTS: usize = 10;
const SEED_CHUNK: usize = 5_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A provider with `versions` random keys, the highest active.
fn provider(keys: &[[u8; 32]]) -> anyhow::Result<Arc<dyn KeyProvider>> {
    let value = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "{}:{}",
                i + 1,
                base64::engine::general_purpose::STANDARD.encode(k)
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    Ok(Arc::new(EnvKeyProvider::parse(&value, None)?))
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Inserts `total` secrets sealed under `secrets`' version-1 key, through unnest in chunks.
async fn seed(
    client: &tokio_postgres::Client,
    secrets: &Secrets,
    total: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    client
        .execute(
            "INSERT INTO datasources (org, project, name, kind)
             SELECT 'bench', 'tenant-' || (i % $2::int), 'ds-' || i, 'generator'
             FROM generate_series(1, $1::int) i",
            &[&(DATASOURCES as i32), &(TENANTS as i32)],
        )
        .await?;
    let datasources: Vec<(Uuid, String, String)> = client
        .query("SELECT id, org, project FROM datasources ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let key = secrets.keys().key(1)?;
    let per_datasource = total.div_ceil(DATASOURCES);
    let mut rows = Vec::with_capacity(SEED_CHUNK);
    let mut written = 0;
    'outer: for (id, org, project) in &datasources {
        for j in 0..per_datasource {
            if written == total {
                break 'outer;
            }
            let name = format!("secret-{j:03}");
            let value = format!("password-{}", Uuid::new_v4().simple());
            let binding = Binding {
                org,
                project,
                datasource: *id,
                name: &name,
                revision: 1,
            };
            let sealed = cipher::seal(&key, &binding, value.as_bytes())?;
            let fingerprint = cipher::fingerprint(&key, &binding, value.as_bytes());
            rows.push((*id, name, sealed, fingerprint));
            written += 1;
            if rows.len() == SEED_CHUNK {
                insert(client, &mut rows).await?;
            }
        }
    }
    insert(client, &mut rows).await?;
    client.batch_execute("ANALYZE datasource_secrets").await?;
    Ok(started.elapsed())
}

async fn insert(
    client: &tokio_postgres::Client,
    rows: &mut Vec<(Uuid, String, cipher::Sealed, String)>,
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let names: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let nonces: Vec<&[u8]> = rows.iter().map(|r| r.2.nonce.as_slice()).collect();
    let ciphertexts: Vec<&[u8]> = rows.iter().map(|r| r.2.ciphertext.as_slice()).collect();
    let fingerprints: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    client
        .execute(
            "INSERT INTO datasource_secrets
                 (datasource_id, name, key_version, nonce, ciphertext, revision, fingerprint, created_by)
             SELECT d, n, 1, o, c, 1, f, 'bench'
             FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[], $5::text[]) AS u(d, n, o, c, f)",
            &[&ids, &names, &nonces, &ciphertexts, &fingerprints],
        )
        .await?;
    rows.clear();
    Ok(())
}

/// Rewraps everything to `secrets`' active version; returns (elapsed, rows re-sealed, batches).
async fn run(
    pool: &deadpool_postgres::Pool,
    secrets: &Secrets,
    batch: usize,
) -> anyhow::Result<(Duration, u64, usize)> {
    let mut batches = 0;
    let report = secrets
        .rewrap(pool, batch, |_, _| {
            batches += 1;
            ControlFlow::Continue(())
        })
        .await?;
    anyhow::ensure!(
        report.failed.is_empty() && report.remaining == 0,
        "rewrap left {} rows ({} failed)",
        report.remaining,
        report.failed.len()
    );
    Ok((report.elapsed, report.rewrapped, batches))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total = env_usize("REWRAP_SECRETS", 100_000);
    let batch = env_usize("REWRAP_BATCH", 1_000);
    let small = env_usize("REWRAP_BATCH_SMALL", 100);
    let db = common::database().await?;
    let client = dsreg::db::connect(&db.url).await?;
    let pool = dsreg::db::pool(&db.url, 4, Duration::from_secs(30))?;
    let keys = [random_key(), random_key(), random_key()];

    let v1 = Secrets::new(provider(&keys[..1])?);
    let seeded = seed(&client, &v1, total).await?;

    let v2 = Secrets::new(provider(&keys[..2])?);
    let (first, rows_first, batches_first) = run(&pool, &v2, batch).await?;
    let v3 = Secrets::new(provider(&keys[..3])?);
    let (second, rows_second, batches_second) = run(&pool, &v3, small).await?;

    // Every row still opens, under the last key only.
    let only_v3 = Secrets::new(provider(&keys[..3])?);
    only_v3.check(&client).await?;
    let sample: Uuid = client
        .query_one("SELECT id FROM datasources ORDER BY id LIMIT 1", &[])
        .await?
        .get(0);
    let opened = only_v3.open_all(&client, sample).await?;
    anyhow::ensure!(!opened.is_empty(), "the sample datasource has secrets");

    let rate = |rows: u64, d: Duration| format!("{:.0} rows/s", rows as f64 / d.as_secs_f64());
    let dash = || "—".to_owned();
    common::print_table(
        "dsreg keys rewrap",
        &[
            ("secrets".into(), format!("{total}"), dash()),
            (
                "seeding (seal + insert)".into(),
                format!("{:.2} s", seeded.as_secs_f64()),
                dash(),
            ),
            (
                format!("rewrap v1→v2, batch {batch}"),
                format!("{:.2} s, {batches_first} batches", first.as_secs_f64()),
                dash(),
            ),
            (
                format!("rewrap throughput, batch {batch}"),
                rate(rows_first, first),
                dash(),
            ),
            (
                format!("rewrap v2→v3, batch {small}"),
                format!("{:.2} s, {batches_second} batches", second.as_secs_f64()),
                dash(),
            ),
            (
                format!("rewrap throughput, batch {small}"),
                rate(rows_second, second),
                dash(),
            ),
        ],
    );
    Ok(())
}
