//! Several instances on one database, as tests and benchmarks observe them: a fleet of
//! generator datasources, who holds which lease, which workers run where, and the wait for
//! the assignment every instance converges to.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use uuid::Uuid;

/// `n` published `generator` datasources in project `fleet`, each emitting `rate` records a
/// second.
pub async fn fleet(client: &Client, n: i64, rate: f64) -> Vec<Uuid> {
    let config = serde_json::json!({ "rate_per_sec": rate, "template": { "fleet": true } });
    published(client, "fleet", n, &config).await
}

/// `n` `generator` datasources in project `project` of org `acme`, each with `config` as its
/// published version 1.
pub async fn published(
    client: &Client,
    project: &str,
    n: i64,
    config: &serde_json::Value,
) -> Vec<Uuid> {
    let ids: Vec<Uuid> = client
        .query(
            "WITH d AS (
                INSERT INTO datasources (org, project, name, kind)
                SELECT 'acme', $3, 'g' || i, 'generator' FROM generate_series(1, $1::bigint) i
                RETURNING id
             )
             INSERT INTO datasource_versions (datasource_id, version, config)
             SELECT id, 1, $2 FROM d RETURNING datasource_id",
            &[&n, config, &project],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    client
        .execute(
            "UPDATE datasource_versions SET state = 'published' WHERE datasource_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    ids
}

/// The first two columns of every row `sql` returns, collected.
pub async fn pairs<A, B, C>(client: &Client, sql: &str) -> C
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
    C: FromIterator<(A, B)>,
{
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Datasources whose worker is RUNNING, with the instance and epoch their state names.
pub async fn running(client: &Client) -> HashMap<Uuid, (String, i64)> {
    client
        .query(
            "SELECT datasource_id, owner_instance, lease_epoch FROM datasource_state
             WHERE worker_status = 'running'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Leases held (their owner live): datasource → owner.
pub async fn owners(client: &Client) -> HashMap<Uuid, String> {
    pairs(
        client,
        "SELECT datasource_id, owner FROM datasource_leases
         WHERE owner IN (SELECT id FROM dsreg_instances
                         WHERE stopped_at IS NULL AND leases_until > now())",
    )
    .await
}

/// Waits (up to `within`, polling every 50 ms) until every datasource runs on the instance
/// the assignment over `instances` gives it, the state every instance converges to; returns
/// datasource → owner. Panics on timeout.
pub async fn balanced(
    client: &Client,
    ids: &[Uuid],
    instances: &[&str],
    within: Duration,
) -> HashMap<Uuid, String> {
    let names: Vec<String> = instances.iter().map(|s| (*s).to_owned()).collect();
    let expected: HashMap<Uuid, String> = dsreg::supervisor::lease::assign(ids, &names, 1.25)
        .into_iter()
        .map(|(id, owner)| (id, owner.to_owned()))
        .collect();
    let deadline = Instant::now() + within;
    loop {
        let running = running(client).await;
        let owners = owners(client).await;
        let done = ids.iter().all(|id| {
            owners.get(id) == expected.get(id)
                && running.get(id).map(|(on, _)| on) == expected.get(id)
        });
        if done {
            return owners;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for every datasource RUNNING on its assigned instance"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
