//! `kafka`: the `kafka` source and sink against a real Kafka-protocol broker (tansu, in
//! memory; found as the tests find it, `DSREG_TEST_KAFKA_BROKER` or `.ci/kafka-broker`'s
//! path), one in-process registry and a durable Postgres.
//!
//! - **source → Postgres**: `KAFKA_BENCH_RECORDS` (200,000) JSON messages already in a topic
//!   of two partitions; a `kafka` datasource with a 10-field mapping reads them into the
//!   Postgres sink. Records/s from the first record committed to the last (the worker's
//!   start-up apart), and from the publish. Its floor, in the same run: Postgres alone
//!   appending the same records, 5,000 a statement as the sink does.
//! - **source → Kafka sink**: a `generator` datasource emitting the same number of records as
//!   fast as the sink takes them, with `--sink kafka`; records/s until the topic holds them
//!   all (acks=all, idempotent, lz4).
//! - **latency**: messages produced at a paced 10,000 records/s for `KAFKA_BENCH_SECONDS` (5)
//!   seconds, each carrying its send time; p50 / p99 from the send to the sink's commit
//!   (`ingested_at`, the committing transaction's start).
//!
//! `cargo bench --bench kafka`.

mod common;

#[path = "../tests/support/kafka_broker.rs"]
mod kafka_broker;

use std::time::{Duration, Instant};

use dsreg::app::App;
use dsreg::config::Settings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The 10-field mapping the source runs.
const MAPPING: &str = "#{ order_id: record.value.id, customer: record.value.customer.to_upper(), \
    total_cents: record.value.amount * 100, currency: record.value.currency, \
    placed_at: record.value.ts, items: record.value.items.len(), region: record.value.region, \
    partition: record.partition, offset: record.offset, sent_us: record.value.sent_us }";

fn message(id: u64, sent_us: i64) -> String {
    json!({
        "id": id, "customer": format!("customer-{}", id % 1000), "amount": id % 500,
        "currency": "EUR", "ts": "2026-01-05T10:00:00Z", "items": [1, 2, 3],
        "region": "eu", "sent_us": sent_us,
    })
    .to_string()
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Produces `count` messages (ids from `first`), at `rate` messages/s when given, each
/// carrying its send time, and waits for every acknowledgement.
fn produce(broker: &str, topic: &str, first: u64, count: u64, rate: Option<f64>) {
    kafka_broker::produce_paced(
        &kafka_broker::plain(broker),
        topic,
        first,
        count,
        rate,
        |id| message(id, now_us()),
    );
}

async fn count(client: &tokio_postgres::Client, id: uuid::Uuid) -> anyhow::Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM datasource_records WHERE datasource_id = $1",
            &[&id],
        )
        .await?
        .get(0))
}

/// How long a phase may store nothing new before the bench gives up on it, saying why.
const STALL: Duration = Duration::from_secs(60);

/// What the worker of `id` says of itself: its state, error, restarts and position, and its
/// dead letters.
async fn worker(client: &tokio_postgres::Client, id: uuid::Uuid) -> anyhow::Result<String> {
    let state = client
        .query_opt(
            "SELECT worker_status, error_code, error_message, restart_count, source_cursor::text
             FROM datasource_state WHERE datasource_id = $1",
            &[&id],
        )
        .await?;
    let dead: i64 = client
        .query_one(
            "SELECT count(*) FROM datasource_dead_letters WHERE datasource_id = $1",
            &[&id],
        )
        .await?
        .get(0);
    Ok(match state {
        None => format!("no state yet, {dead} dead letters"),
        Some(r) => format!(
            "{}, error {:?} {:?}, {} restarts, position {:?}, {dead} dead letters",
            r.get::<_, String>(0),
            r.get::<_, Option<String>>(1),
            r.get::<_, Option<String>>(2),
            r.get::<_, i32>(3),
            r.get::<_, Option<String>>(4),
        ),
    })
}

/// Waits until `id` has stored `target` records; returns when the first record beyond what
/// was stored at the call arrived. A minute with nothing new stored ends the bench with what
/// the worker says, instead of waiting for ever.
async fn stored(
    client: &tokio_postgres::Client,
    id: uuid::Uuid,
    target: i64,
    what: &str,
) -> anyhow::Result<Instant> {
    // Counted a poll's new rows at a time (ids past the highest seen, along the
    // (datasource_id, id) index), so that watching costs Postgres next to nothing: a whole
    // count every 20 ms scans every row stored so far and takes a core from the sink. The one
    // sink writer flushes one statement at a time, so ids commit in order and none is passed.
    let past = |seen: i64| async move {
        let row = client
            .query_one(
                "SELECT count(*), coalesce(max(id), $2) FROM datasource_records
                 WHERE datasource_id = $1 AND id > $2",
                &[&id, &seen],
            )
            .await?;
        anyhow::Ok((row.get::<_, i64>(0), row.get::<_, i64>(1)))
    };
    let (mut n, mut seen) = past(0).await?;
    let mut first = None;
    let mut moved = Instant::now();
    loop {
        let (new, max) = past(seen).await?;
        if new > 0 {
            first.get_or_insert_with(Instant::now);
            (n, seen, moved) = (n + new, max, Instant::now());
        } else if moved.elapsed() >= STALL {
            anyhow::bail!(
                "{what}: {n} of {target} records stored, none for {} s; the worker: {}",
                STALL.as_secs(),
                worker(client, id).await?
            );
        }
        if n >= target {
            return Ok(first.unwrap_or_else(Instant::now));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn datasource(
    client: &tokio_postgres::Client,
    name: &str,
    kind: &str,
    config: serde_json::Value,
) -> anyhow::Result<uuid::Uuid> {
    let id: uuid::Uuid = client
        .query_one(
            "INSERT INTO datasources (org, project, name, kind) VALUES ('bench', 'kafka', $1, $2) RETURNING id",
            &[&name, &kind],
        )
        .await?
        .get(0);
    client
        .execute(
            "INSERT INTO datasource_versions (datasource_id, version, config) VALUES ($1, 1, $2)",
            &[&id, &config],
        )
        .await?;
    client
        .execute("SELECT dsreg_publish($1, 1)", &[&id])
        .await?;
    Ok(id)
}

async fn start(
    settings: &Settings,
    url: &str,
) -> anyhow::Result<(
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let app = App::build(settings, url).await?;
    let stats = app.listener_stats.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone(), Duration::from_secs(30)));
    while !stats.connected.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((shutdown, running))
}

/// Stops a registry started by [`start`]; a registry that does not stop within a minute ends
/// the bench, instead of waiting for ever.
async fn stop(
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    shutdown.cancel();
    match tokio::time::timeout(STALL, running).await {
        Ok(stopped) => stopped?,
        Err(_) => anyhow::bail!("the registry did not stop within {} s", STALL.as_secs()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let records = common::env_num("KAFKA_BENCH_RECORDS", 200_000);
    let seconds = common::env_num("KAFKA_BENCH_SECONDS", 5);
    let broker = kafka_broker::KafkaBroker::start().await;
    let address = broker.address();
    let db = common::database().await?;
    let pg = dsreg::db::connect(&db.url).await?;
    let mut rows = Vec::new();

    // Source → transform → Postgres.
    kafka_broker::create_topic(&address, "bench-in", 2).await;
    {
        let address = address.clone();
        tokio::task::spawn_blocking(move || produce(&address, "bench-in", 0, records, None))
            .await?;
    }
    let mut settings = Settings::for_database(&db.url);
    settings.auth.insecure_no_auth = true;
    let (shutdown, running) = start(&settings, &db.url).await?;
    let published = Instant::now();
    let id = datasource(
        &pg,
        "in",
        "kafka",
        json!({
            "bootstrap_servers": [address], "topics": ["bench-in"],
            "batch_max_records": 5000, "batch_linger_ms": 5, "transform": MAPPING,
        }),
    )
    .await?;
    let first_seen = stored(&pg, id, records as i64, "source → postgres").await?;
    let from_publish = published.elapsed().as_secs_f64();
    let from_first = first_seen.elapsed().as_secs_f64();
    rows.push((
        format!("kafka source → 10-field mapping → postgres sink, {records} records"),
        format!(
            "{:.0} records/s from the first commit ({:.0} from the publish)",
            records as f64 / from_first,
            records as f64 / from_publish
        ),
        "≥ 50,000 records/s".to_owned(),
    ));
    // Each figure as soon as it is measured; the table at the end.
    println!("{:?}", rows.last());

    // Latency at a paced 10,000 records/s.
    let paced = 10_000 * seconds;
    let before = count(&pg, id).await?;
    {
        let address = address.clone();
        tokio::task::spawn_blocking(move || {
            produce(&address, "bench-in", records, paced, Some(10_000.0));
        })
        .await?;
    }
    stored(&pg, id, before + paced as i64, "paced latency").await?;
    let latency = pg
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l), percentile_cont(0.99) WITHIN GROUP (ORDER BY l)
             FROM (SELECT (extract(epoch FROM ingested_at) * 1e6 - (record->>'sent_us')::float8) / 1000 AS l
                   FROM datasource_records WHERE datasource_id = $1 AND (record->>'order_id')::bigint >= $2) x",
            &[&id, &(records as i64)],
        )
        .await?;
    let (p50, p99): (f64, f64) = (latency.get(0), latency.get(1));
    rows.push((
        "send → committed in Postgres at a paced 10,000 records/s, p50 / p99".to_owned(),
        format!("{p50:.1} / {p99:.1} ms"),
        "—".to_owned(),
    ));
    println!("{:?}", rows.last());
    stop(shutdown, running).await?;

    // The floor: what Postgres alone takes of the same records, appended as the sink
    // appends them (5,000 a statement, each its own durable transaction).
    let mapped: Vec<serde_json::Value> = pg
        .query(
            "SELECT record FROM datasource_records WHERE datasource_id = $1 ORDER BY id LIMIT $2",
            &[&id, &(records as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let floor_id = uuid::Uuid::new_v4();
    let started = Instant::now();
    for chunk in mapped.chunks(5_000) {
        pg.execute(
            "INSERT INTO datasource_records (datasource_id, version, epoch, record)
             SELECT $1, 1, 1, r FROM unnest($2::jsonb[]) AS r",
            &[&floor_id, &chunk],
        )
        .await?;
    }
    let floor = mapped.len() as f64 / started.elapsed().as_secs_f64();
    rows.push((
        "floor: Postgres alone appending the same records, 5,000 a statement".to_owned(),
        format!(
            "{floor:.0} records/s (the source reaches {:.0} % of it)",
            100.0 * records as f64 / from_first / floor
        ),
        "—".to_owned(),
    ));
    println!("{:?}", rows.last());

    // Source → Kafka sink.
    kafka_broker::create_topic(&address, "bench-out", 2).await;
    let mut settings = Settings::for_database(&db.url);
    settings.auth.insecure_no_auth = true;
    settings.sink = "kafka".into();
    settings.sink_kafka_brokers = Some(address.clone());
    settings.sink_kafka_topic = Some("bench-out".into());
    settings.sink_kafka_key_field = Some("seq".into());
    let (shutdown, running) = start(&settings, &db.url).await?;
    let started = Instant::now();
    let out = datasource(
        &pg,
        "out",
        "generator",
        json!({
            "rate_per_sec": 1_000_000, "count": records,
            "template": { "customer": "customer-1", "amount": 12, "currency": "EUR", "region": "eu" },
        }),
    )
    .await?;
    let reader: BaseConsumer = kafka_broker::plain(&address)
        .set("group.id", "bench-reader")
        .create()?;
    let reader = std::sync::Arc::new(reader);
    // Done when the sink has had every record acknowledged (acks=all) and the topic has
    // stopped growing; timed to the last message the topic took. tansu 0.6's in-memory
    // storage acknowledges some produce batches it does not keep (the worker counts every
    // record written, no error, no dead letter, and the topic's end stays short of it), so the
    // topic alone would never reach the count.
    let (mut last, mut moved) = (0, Instant::now());
    let total = loop {
        let reader = reader.clone();
        let total = tokio::task::spawn_blocking(move || {
            (0..2)
                .map(|p| {
                    reader
                        .fetch_watermarks("bench-out", p, Duration::from_secs(5))
                        .map_or(0, |(_, high)| high)
                })
                .sum::<i64>()
        })
        .await?;
        if total != last {
            (last, moved) = (total, Instant::now());
        }
        if total >= records as i64 {
            break total;
        }
        let acknowledged: i64 = pg
            .query_one(
                "SELECT coalesce((metrics->>'records_total')::bigint, 0) FROM datasource_state
                 WHERE datasource_id = $1",
                &[&out],
            )
            .await?
            .get(0);
        if acknowledged >= records as i64 && moved.elapsed() >= Duration::from_secs(2) {
            break total;
        }
        if moved.elapsed() >= STALL {
            anyhow::bail!(
                "generator → kafka sink: {total} of {records} messages in the topic, none for {} s; \
                 the worker: {}",
                STALL.as_secs(),
                worker(&pg, out).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = moved.duration_since(started).as_secs_f64();
    if total < records as i64 {
        println!(
            "the topic holds {total} of the {records} messages the brokers acknowledged (tansu's loss)"
        );
    }
    rows.push((
        format!("generator → kafka sink (acks=all, idempotent, lz4), {records} records"),
        format!("{:.0} records/s", records as f64 / took),
        "≥ 100,000 records/s".to_owned(),
    ));
    stop(shutdown, running).await?;

    common::print_table(
        "kafka benchmark: tansu in memory, durable Postgres, one registry",
        &rows,
    );
    Ok(())
}
