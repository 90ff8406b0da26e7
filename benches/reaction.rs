//! `reaction`: a publish reaching a real connector, measured from outside. The real
//! `dsreg serve` binary runs against the bench Postgres; a local HTTP server in this process is
//! the `http_poll` target and records the monotonic arrival time of the first GET of each path;
//! every version published points at a path of its own. Both clocks are this process's
//! `Instant` (CLOCK_MONOTONIC); a publish's time starts when its COMMIT (or its RPC) is sent.
//!
//! Printed in one run, with the targets as ratios to the floor measured in the same run:
//!
//! - the floors: COMMIT of a bare NOTIFY → a plain LISTEN connection on the same Postgres
//!   receives it; for each one-at-a-time publish, its own notification reaching such a
//!   connection (a publish's commit flushes the WAL, a bare NOTIFY's does not); and before the
//!   registry starts, 1, 4 and 16 publishers each waiting only for its publish's notification;
//! - SQL publish COMMIT → the new version's worker's first GET: one at a time with 10 ms idle,
//!   and back to back (p50 / p99 / max);
//! - the same through the gRPC `PublishVersion` (from the call to the first GET);
//! - many datasources published in one transaction → every new worker has polled (first,
//!   median, all);
//! - 1, 4 and 16 concurrent publishers, each waiting for its worker's first GET:
//!   publishes/s, p50 / p99;
//! - the `webhook` kind: publish COMMIT → the ingress answers 202 to a post for the new
//!   datasource (the 202 includes the record's commit);
//! - resident memory of a fresh `dsreg serve` with many idle `http_poll` workers (1 h
//!   interval), and of another with as many idle `generator` workers.
//!
//! `cargo bench --bench reaction`. `REACTION_QUICK=1` runs smaller counts (a check that the
//! bench works, not figures). `REACTION_CONCURRENCY_SECONDS` sets each concurrent run (8);
//! `REACTION_PARTS` which phases run (`one,b2b,grpc,bulk,concurrent,webhook,rss`, all by
//! default).

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use dsreg::api::grpc::pb;
use dsreg::db::repository::{self as repo, WriteContext};
use dsreg::secrets::{EnvKeyProvider, SecretString, Secrets};
use serde_json::json;
use tokio::sync::oneshot;

/// How long any one awaited reaction may take before the run fails.
const BOUND: Duration = Duration::from_secs(60);
/// The master key the registry and this bench share (webhook secrets).
const KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const HMAC_KEY: &str = "reaction-webhook-key";
/// The idle gap between one-at-a-time publishes.
const IDLE: Duration = Duration::from_millis(10);
/// An interval no run of the bench reaches: each worker polls once, at its start.
const HOUR_MS: u64 = 3_600_000;

/// The counts of one run.
struct Counts {
    floor: usize,
    one_at_a_time: usize,
    back_to_back: usize,
    grpc: usize,
    bulk: usize,
    concurrency: Duration,
    webhook: usize,
    idle_workers: usize,
}

impl Counts {
    fn of_env() -> Self {
        let seconds = common::env_num("REACTION_CONCURRENCY_SECONDS", 8);
        if std::env::var("REACTION_QUICK").is_ok_and(|v| !v.is_empty() && v != "0") {
            Self {
                floor: 100,
                one_at_a_time: 100,
                back_to_back: 50,
                grpc: 50,
                bulk: 100,
                concurrency: Duration::from_secs(seconds.min(2)),
                webhook: 20,
                idle_workers: 500,
            }
        } else {
            Self {
                floor: 1_000,
                one_at_a_time: 1_000,
                back_to_back: 500,
                grpc: 1_000,
                bulk: 1_000,
                concurrency: Duration::from_secs(seconds),
                webhook: 200,
                idle_workers: 10_000,
            }
        }
    }
}

/// The local `http_poll` target: the arrival time of the first GET of each path, handed to
/// whoever waits for that path.
#[derive(Default)]
struct Target {
    waiting: Mutex<HashMap<String, oneshot::Sender<Instant>>>,
    seen: Mutex<HashSet<String>>,
}

impl Target {
    /// Registers a wait for the first GET of `path` (before the publish that causes it).
    fn expect(&self, path: &str) -> oneshot::Receiver<Instant> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(path.to_owned(), tx);
        rx
    }

    fn arrived(&self, path: &str, at: Instant) {
        if lock(&self.seen).insert(path.to_owned())
            && let Some(tx) = lock(&self.waiting).remove(path)
        {
            let _ = tx.send(at);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_target(target: Arc<Target>) -> anyhow::Result<String> {
    async fn handler(
        axum::extract::State(target): axum::extract::State<Arc<Target>>,
        uri: axum::http::Uri,
    ) -> &'static str {
        target.arrived(uri.path(), Instant::now());
        r#"{"items":[]}"#
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = axum::Router::new().fallback(handler).with_state(target);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(format!("http://{addr}"))
}

/// Waits for a first GET; the latency from `sent`, in ms.
async fn arrival(rx: oneshot::Receiver<Instant>, sent: Instant, what: &str) -> anyhow::Result<f64> {
    let at = tokio::time::timeout(BOUND, rx)
        .await
        .with_context(|| format!("{what}: no GET within {BOUND:?}"))??;
    Ok(at.saturating_duration_since(sent).as_secs_f64() * 1e3)
}

fn poll_config(base: &str, path: &str) -> serde_json::Value {
    json!({ "url": format!("{base}{path}"), "interval_ms": HOUR_MS, "record_path": "/items" })
}

/// A free loopback port (bound, then released for the registry to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A `dsreg serve` process of this build.
struct Registry {
    child: tokio::process::Child,
    http: String,
    grpc: String,
}

impl Registry {
    async fn start(url: &str, dir: &std::path::Path) -> anyhow::Result<Self> {
        let (http_port, grpc_port) = (free_port()?, free_port()?);
        let log = std::fs::File::create(dir.join("dsreg.log"))?;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"))
            .arg("serve")
            .env("DATABASE_URL", url)
            .env("DSREG_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("DSREG_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
            .env("DSREG_DATA_DIR", dir)
            .env("DSREG_INSECURE_NO_AUTH", "true")
            .env("DSREG_MASTER_KEYS", KEYS)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting dsreg serve")?;
        let registry = Self {
            child,
            http: format!("http://127.0.0.1:{http_port}"),
            grpc: format!("http://127.0.0.1:{grpc_port}"),
        };
        let http = dsreg::connectors::http::client()?;
        let deadline = Instant::now() + BOUND;
        loop {
            let ready = http
                .get(format!("{}/readyz", registry.http))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(registry);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "dsreg serve not ready within {BOUND:?} (see {})",
                dir.join("dsreg.log").display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rss_mb(&self) -> anyhow::Result<f64> {
        let pid = self.child.id().context("dsreg exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")?;
        Ok(kb / 1024.0)
    }

    /// CPU time (user and system) the process has used so far, in seconds.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.child.id().context("dsreg exited")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command (which ends with ')'): utime is field 14, stime 15.
        let (_, rest) = stat.rsplit_once(')').context("no command in stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // SAFETY: `sysconf` reads a configuration value and touches no memory of ours.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks / per_second)
    }

    /// Stops it gracefully (SIGTERM), then waits for it.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid)?),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        tokio::time::timeout(BOUND, self.child.wait()).await??;
        Ok(())
    }
}

/// A plain connection of this bench.
async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Creates a datasource of `kind` in project `project`; returns its id.
async fn datasource(
    client: &tokio_postgres::Client,
    project: &str,
    name: &str,
    kind: &str,
) -> anyhow::Result<uuid::Uuid> {
    Ok(client
        .query_one(
            "INSERT INTO datasources (org, project, name, kind) VALUES ('bench', $1, $2, $3) RETURNING id",
            &[&project, &name, &kind],
        )
        .await?
        .get(0))
}

/// Publishes a new version of `id` whose `http_poll` config points at `path`, in one
/// transaction; returns when its COMMIT was sent.
async fn publish_path(
    client: &tokio_postgres::Client,
    id: uuid::Uuid,
    version: i32,
    config: &serde_json::Value,
) -> anyhow::Result<Instant> {
    client.batch_execute("BEGIN").await?;
    client
        .execute(
            "INSERT INTO datasource_versions (datasource_id, version, config) VALUES ($1, $2, $3)",
            &[&id, &version, config],
        )
        .await?;
    client
        .execute("SELECT dsreg_publish($1, $2)", &[&id, &version])
        .await?;
    let sent = Instant::now();
    client.batch_execute("COMMIT").await?;
    Ok(sent)
}

/// p50 / p99 / max of `samples` (ms), sorted here.
fn summary(samples: &mut [f64]) -> String {
    samples.sort_by(f64::total_cmp);
    format!(
        "{:.2} / {:.2} / {:.2} ms (n = {})",
        common::quantile(samples, 0.5),
        common::quantile(samples, 0.99),
        samples.last().copied().unwrap_or(f64::NAN),
        samples.len()
    )
}

/// COMMIT of a NOTIFY → a plain LISTEN connection receives it, one at a time with the idle gap.
/// A plain LISTEN connection: each notification's payload and when it arrived.
struct Listening {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    _client: tokio_postgres::Client,
}

impl Listening {
    async fn on(url: &str, channel: &str) -> anyhow::Result<Self> {
        use futures_util::StreamExt;
        let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let _ = tx.send((n.payload().to_owned(), Instant::now()));
                }
            }
        });
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        Ok(Self {
            rx,
            _client: client,
        })
    }

    /// When the next notification whose payload contains every one of `needles` arrived.
    async fn next_with(&mut self, needles: &[&str]) -> anyhow::Result<Instant> {
        loop {
            let (payload, at) = tokio::time::timeout(BOUND, self.rx.recv())
                .await?
                .context("listener gone")?;
            if needles.iter().all(|n| payload.contains(n)) {
                return Ok(at);
            }
        }
    }
}

async fn floor(url: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut listening = Listening::on(url, "reaction_floor").await?;
    let notifier = connect(url).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        notifier.batch_execute("BEGIN").await?;
        notifier
            .execute("SELECT pg_notify('reaction_floor', $1)", &[&i.to_string()])
            .await?;
        let sent = Instant::now();
        notifier.batch_execute("COMMIT").await?;
        let at = listening.next_with(&[&i.to_string()]).await?;
        samples.push(at.saturating_duration_since(sent).as_secs_f64() * 1e3);
        tokio::time::sleep(IDLE).await;
    }
    Ok(samples)
}

/// Where a publish's time went, besides the first GET (ms from the COMMIT sent).
#[derive(Default)]
struct Split {
    /// The COMMIT answered to the publisher.
    committed: Vec<f64>,
    /// The publish's own notification on the registry's channel reached a plain LISTEN
    /// connection: what Postgres alone takes for this commit.
    notified: Vec<f64>,
}

/// Hot reloads of one `http_poll` datasource by SQL, each to a new path; `idle` between them.
/// With `split`, a plain LISTEN connection on the registry's channel also times each publish's
/// notification.
async fn sql_publishes(
    url: &str,
    target: &Target,
    base: &str,
    label: &str,
    n: usize,
    idle: Option<Duration>,
    mut split: Option<&mut Split>,
) -> anyhow::Result<Vec<f64>> {
    let client = connect(url).await?;
    let id = datasource(&client, "reaction", label, "http_poll").await?;
    let mut listening = match split {
        Some(_) => Some(Listening::on(url, "dsreg_events").await?),
        None => None,
    };
    let mut samples = Vec::with_capacity(n);
    // Version 1 starts the worker; the samples are the reloads after it.
    for version in 1..=(n as i32 + 1) {
        let path = format!("/{label}/{version}");
        let rx = target.expect(&path);
        let sent = publish_path(&client, id, version, &poll_config(base, &path)).await?;
        let committed = Instant::now();
        let ms = arrival(rx, sent, label).await?;
        let notified = match &mut listening {
            Some(l) => Some(l.next_with(&[&id.to_string(), "published"]).await?),
            None => None,
        };
        if version > 1 {
            samples.push(ms);
            if let (Some(split), Some(notified)) = (split.as_deref_mut(), notified) {
                let since = |t: Instant| t.saturating_duration_since(sent).as_secs_f64() * 1e3;
                split.committed.push(since(committed));
                split.notified.push(since(notified));
            }
        }
        if let Some(idle) = idle {
            tokio::time::sleep(idle).await;
        }
    }
    Ok(samples)
}

/// Hot reloads through `PublishVersion`, one at a time with the idle gap.
async fn grpc_publishes(
    url: &str,
    grpc: &str,
    target: &Target,
    base: &str,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let client = connect(url).await?;
    let id = datasource(&client, "reaction", "grpc", "http_poll").await?;
    let mut api = pb::datasources_client::DatasourcesClient::connect(grpc.to_owned()).await?;
    let mut samples = Vec::with_capacity(n);
    for version in 1..=(n as i32 + 1) {
        let path = format!("/grpc/{version}");
        client
            .execute(
                "INSERT INTO datasource_versions (datasource_id, version, config) VALUES ($1, $2, $3)",
                &[&id, &version, &poll_config(base, &path)],
            )
            .await?;
        let rx = target.expect(&path);
        let sent = Instant::now();
        api.publish_version(pb::PublishVersionRequest {
            datasource_id: id.to_string(),
            version,
        })
        .await?;
        let ms = arrival(rx, sent, "grpc").await?;
        if version > 1 {
            samples.push(ms);
        }
        tokio::time::sleep(IDLE).await;
    }
    Ok(samples)
}

/// `n` new `http_poll` datasources of `project` with version 1 drafts (each its own path);
/// returns the paths.
async fn seed_polls(
    client: &tokio_postgres::Client,
    project: &str,
    n: usize,
    base: &str,
) -> anyhow::Result<Vec<String>> {
    client
        .execute(
            "INSERT INTO datasources (org, project, name, kind)
             SELECT 'bench', $1, 'p-' || i, 'http_poll' FROM generate_series(1, $2::int) i",
            &[&project, &(n as i32)],
        )
        .await?;
    client
        .execute(
            "INSERT INTO datasource_versions (datasource_id, version, config)
             SELECT id, 1, jsonb_build_object('url', $2::text || '/' || project || '/' || name,
                 'interval_ms', $3::bigint, 'record_path', '/items')
             FROM datasources WHERE project = $1",
            &[&project, &base, &(HOUR_MS as i64)],
        )
        .await?;
    Ok((1..=n).map(|i| format!("/{project}/p-{i}")).collect())
}

/// Publishes version 1 of every datasource of `project` in one transaction; returns when the
/// COMMIT was sent.
async fn publish_project(
    client: &tokio_postgres::Client,
    project: &str,
) -> anyhow::Result<Instant> {
    client.batch_execute("BEGIN").await?;
    client
        .execute(
            "UPDATE datasource_versions v SET state = 'published' FROM datasources d
             WHERE d.id = v.datasource_id AND d.project = $1 AND v.version = 1",
            &[&project],
        )
        .await?;
    let sent = Instant::now();
    client.batch_execute("COMMIT").await?;
    Ok(sent)
}

/// Many datasources in one transaction → every new worker's first GET: sorted latencies.
async fn bulk(url: &str, target: &Target, base: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let client = connect(url).await?;
    let paths = seed_polls(&client, "bulk", n, base).await?;
    let waits: Vec<_> = paths.iter().map(|p| target.expect(p)).collect();
    let sent = publish_project(&client, "bulk").await?;
    let mut samples = Vec::with_capacity(n);
    for rx in waits {
        samples.push(arrival(rx, sent, "bulk").await?);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// `publishers` concurrent publishers, each reloading its own datasource and waiting for its
/// worker, for `window`: (publishes/s, latencies).
async fn concurrent(
    url: &str,
    target: &Arc<Target>,
    base: &str,
    publishers: usize,
    window: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut tasks = Vec::new();
    let started = Instant::now();
    for p in 0..publishers {
        let (url, target, base) = (url.to_owned(), target.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let label = format!("c{publishers}-{p}");
            let id = datasource(&client, "reaction", &label, "http_poll").await?;
            let mut samples = Vec::new();
            let mut version = 0;
            while started.elapsed() < window {
                version += 1;
                let path = format!("/{label}/{version}");
                let rx = target.expect(&path);
                let sent = publish_path(&client, id, version, &poll_config(&base, &path)).await?;
                samples.push(arrival(rx, sent, &label).await?);
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await??);
    }
    let rate = samples.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, samples))
}

/// The floor of the concurrent publishers: the same publish transactions, each publisher
/// waiting only for its publish's own notification, with no registry running; one plain LISTEN
/// connection receives them all (as the registry's one listener would) and hands each to its
/// publisher. Returns publishes/s and the samples (COMMIT sent → notified). Its datasources
/// are disabled afterwards, so the registry started later leaves them be.
async fn concurrent_floor(
    url: &str,
    base: &str,
    publishers: usize,
    window: Duration,
) -> anyhow::Result<(f64, Vec<f64>)> {
    type Routes = Arc<Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Instant>>>>;
    let routes: Routes = Arc::default();
    let mut listening = Listening::on(url, "dsreg_events").await?;
    let router = tokio::spawn({
        let routes = routes.clone();
        async move {
            while let Some((payload, at)) = listening.rx.recv().await {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&payload) else {
                    continue;
                };
                let published = event["type"].as_str() == Some("published");
                if let (true, Some(id)) = (published, event["datasource_id"].as_str())
                    && let Some(tx) = lock(&routes).get(id)
                {
                    let _ = tx.send(at);
                }
            }
        }
    });
    let mut tasks = Vec::new();
    let started = Instant::now();
    for p in 0..publishers {
        let (url, base, routes) = (url.to_owned(), base.to_owned(), routes.clone());
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let label = format!("f{publishers}-{p}");
            let id = datasource(&client, "reaction-floor", &label, "http_poll").await?;
            let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
            lock(&routes).insert(id.to_string(), tx);
            let mut samples = Vec::new();
            let mut version = 0;
            while started.elapsed() < window {
                version += 1;
                let path = format!("/{label}/{version}");
                let sent = publish_path(&client, id, version, &poll_config(&base, &path)).await?;
                let at = tokio::time::timeout(BOUND, notified.recv())
                    .await?
                    .context("the listener stopped")?;
                samples.push(at.saturating_duration_since(sent).as_secs_f64() * 1e3);
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await??);
    }
    let rate = samples.len() as f64 / started.elapsed().as_secs_f64();
    router.abort();
    connect(url)
        .await?
        .execute(
            "UPDATE datasources SET status = 'disabled' WHERE project = 'reaction-floor'",
            &[],
        )
        .await?;
    Ok((rate, samples))
}

/// Webhook datasources published one at a time; each sample is COMMIT → the first 202.
async fn webhooks(url: &str, http: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut client = connect(url).await?;
    let secrets = Secrets::new(Arc::new(EnvKeyProvider::parse(KEYS, None)?));
    let poster = dsreg::connectors::http::client()?;
    let body = serde_json::to_vec(&json!([{ "n": 1 }]))?;
    let signature = dsreg::connectors::webhook::sign(HMAC_KEY.as_bytes(), &body);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let id = datasource(&client, "hooks", &format!("hook-{i}"), "webhook").await?;
        let tx = repo::begin(&mut client, &WriteContext::actor("bench")).await?;
        secrets
            .put(
                &tx,
                id,
                dsreg::connectors::webhook::SECRET,
                &SecretString::new(HMAC_KEY.to_owned())?,
            )
            .await?;
        tx.execute(
            "INSERT INTO datasource_versions (datasource_id, version, config) VALUES ($1, 1, '{}')",
            &[&id],
        )
        .await?;
        tx.execute("SELECT dsreg_publish($1, 1)", &[&id]).await?;
        let sent = Instant::now();
        tx.commit().await?;
        let ingest = format!("{http}/ingest/{id}");
        let accepted = loop {
            let status = poster
                .post(&ingest)
                .timeout(Duration::from_secs(10))
                .header("content-type", "application/json")
                .header(dsreg::connectors::webhook::SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await?
                .status();
            if status == reqwest::StatusCode::ACCEPTED {
                break Instant::now();
            }
            anyhow::ensure!(
                sent.elapsed() < BOUND,
                "webhook {i}: no 202 within {BOUND:?}, last {status}"
            );
        };
        samples.push(accepted.saturating_duration_since(sent).as_secs_f64() * 1e3);
        tokio::time::sleep(IDLE).await;
    }
    Ok(samples)
}

/// Resident memory of a fresh registry: at start, and once `n` idle workers of `kind` run.
async fn idle_rss(
    url: &str,
    dir: &std::path::Path,
    target: &Target,
    base: &str,
    kind: &str,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let client = connect(url).await?;
    // Nothing else runs beside them.
    client
        .execute(
            "UPDATE datasources SET status = 'archived' WHERE status <> 'archived'",
            &[],
        )
        .await?;
    let registry = Registry::start(url, dir).await?;
    let before = registry.rss_mb()?;
    let project = format!("idle-{kind}");
    let waits = if kind == "http_poll" {
        let paths = seed_polls(&client, &project, n, base).await?;
        paths.iter().map(|p| target.expect(p)).collect()
    } else {
        client
            .execute(
                "INSERT INTO datasources (org, project, name, kind)
                 SELECT 'bench', $1, 'g-' || i, 'generator' FROM generate_series(1, $2::int) i",
                &[&project, &(n as i32)],
            )
            .await?;
        client
            .execute(
                "INSERT INTO datasource_versions (datasource_id, version, config)
                 SELECT id, 1, '{\"rate_per_sec\": 0}' FROM datasources WHERE project = $1",
                &[&project],
            )
            .await?;
        Vec::new()
    };
    let sent = publish_project(&client, &project).await?;
    for rx in waits {
        arrival(rx, sent, kind).await?;
    }
    // Every worker running (a first poll, for the pull kind; idling, for the generator).
    let deadline = Instant::now() + BOUND * 5;
    loop {
        let running: i64 = client
            .query_one(
                "SELECT count(*) FROM datasource_state s JOIN datasources d ON d.id = s.datasource_id
                 WHERE d.project = $1 AND s.worker_status = 'running'",
                &[&project],
            )
            .await?
            .get(0);
        if running == n as i64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{kind}: {running} of {n} running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = registry.rss_mb()?;
    registry.stop().await?;
    Ok((before, after))
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

/// Whether the phase `name` runs: `REACTION_PARTS` lists them (`one` with the floors,
/// `b2b`, `grpc`, `bulk`, `concurrent`, `webhook`, `rss`); all when unset.
fn part(name: &str) -> bool {
    match std::env::var("REACTION_PARTS") {
        Ok(parts) if !parts.trim().is_empty() => parts.split(',').any(|p| p.trim() == name),
        _ => true,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let counts = Counts::of_env();
    let db = common::database().await?;
    let dir = tempfile::tempdir()?;
    let target = Arc::new(Target::default());
    let base = serve_target(target.clone()).await?;
    let mut rows: Vec<(String, String, String)> = Vec::new();
    // The publishers' floor, before the registry runs: what Postgres alone allows the same
    // publish transactions.
    let mut floor_rates = HashMap::new();
    if part("concurrent") {
        for publishers in [1, 4, 16] {
            let (rate, mut samples) =
                concurrent_floor(&db.url, &base, publishers, counts.concurrency).await?;
            samples.sort_by(f64::total_cmp);
            floor_rates.insert(publishers, rate);
            rows.push((
                format!(
                    "floor: {publishers} publishers, each waiting for its publish's notification (no registry), {} s: publishes/s, p50 / p99",
                    counts.concurrency.as_secs()
                ),
                format!(
                    "{rate:.0}/s, {} / {}",
                    ms(common::quantile(&samples, 0.5)),
                    ms(common::quantile(&samples, 0.99))
                ),
                "—".into(),
            ));
        }
    }
    let registry = Registry::start(&db.url, dir.path()).await?;

    if part("one") {
        let mut floor = floor(&db.url, counts.floor).await?;
        floor.sort_by(f64::total_cmp);
        rows.push((
            "floor: COMMIT of a bare NOTIFY → a plain LISTEN connection receives, p50 / p99 / max"
                .into(),
            summary(&mut floor),
            "—".into(),
        ));
        let mut split = Split::default();
        let mut one = sql_publishes(
            &db.url,
            &target,
            &base,
            "one",
            counts.one_at_a_time,
            Some(IDLE),
            Some(&mut split),
        )
        .await?;
        // The floor of a publish is its own notification: a bare NOTIFY commits without a WAL
        // flush (it wrote nothing else), a publish's commit waits for one.
        split.notified.sort_by(f64::total_cmp);
        let (notified_p50, notified_p99) = (
            common::quantile(&split.notified, 0.5),
            common::quantile(&split.notified, 0.99),
        );
        rows.push((
            "SQL publish COMMIT → the new worker's first GET, one at a time (10 ms idle), p50 / p99 / max".into(),
            summary(&mut one),
            format!(
                "p50 ≤ {} , p99 ≤ {} (the publish's own notification + 0.6 / + 1.5 ms)",
                ms(notified_p50 + 0.6),
                ms(notified_p99 + 1.5)
            ),
        ));
        rows.push((
            "  of which: COMMIT sent → answered to the publisher, p50 / p99 / max".into(),
            summary(&mut split.committed),
            "—".into(),
        ));
        rows.push((
            "  of which: COMMIT sent → the publish's notification reaches a plain LISTEN connection (the floor of a publish), p50 / p99 / max".into(),
            summary(&mut split.notified),
            "—".into(),
        ));
    }
    if part("b2b") {
        let mut b2b = sql_publishes(
            &db.url,
            &target,
            &base,
            "b2b",
            counts.back_to_back,
            None,
            None,
        )
        .await?;
        rows.push((
            "SQL publish COMMIT → first GET, back to back, p50 / p99 / max".into(),
            summary(&mut b2b),
            "—".into(),
        ));
    }
    if part("grpc") {
        let mut grpc = grpc_publishes(&db.url, &registry.grpc, &target, &base, counts.grpc).await?;
        rows.push((
            "gRPC PublishVersion sent → first GET, one at a time (10 ms idle), p50 / p99 / max"
                .into(),
            summary(&mut grpc),
            "—".into(),
        ));
    }
    if part("bulk") {
        let bulk = bulk(&db.url, &target, &base, counts.bulk).await?;
        rows.push((
            format!("{} datasources published in one transaction → every new worker has polled: first / median / all", counts.bulk),
            format!(
                "{} / {} / {}",
                ms(bulk[0]),
                ms(common::quantile(&bulk, 0.5)),
                ms(*bulk.last().context("no workers")?)
            ),
            "all ≤ 300 ms".into(),
        ));
    }
    if part("concurrent") {
        for publishers in [1, 4, 16] {
            let cpu_before = registry.cpu_seconds()?;
            let (rate, mut samples) =
                concurrent(&db.url, &target, &base, publishers, counts.concurrency).await?;
            let cpu = registry.cpu_seconds()? - cpu_before;
            let per_publish = cpu * 1e6 / samples.len().max(1) as f64;
            samples.sort_by(f64::total_cmp);
            let of_floor = floor_rates.get(&publishers).map_or(String::new(), |floor| {
                format!(" ({:.0} % of the floor)", 100.0 * rate / floor)
            });
            rows.push((
                format!(
                    "{publishers} publishers, each waiting for its worker, {} s: publishes/s, p50 / p99",
                    counts.concurrency.as_secs()
                ),
                format!(
                    "{rate:.0}/s{of_floor}, {} / {}; the registry's CPU {per_publish:.0} µs a publish",
                    ms(common::quantile(&samples, 0.5)),
                    ms(common::quantile(&samples, 0.99))
                ),
                if publishers == 16 {
                    "≥ 1,500/s".into()
                } else {
                    "—".into()
                },
            ));
        }
    }
    if part("webhook") {
        let mut hooks = webhooks(&db.url, &registry.http, counts.webhook).await?;
        rows.push((
            "webhook: publish COMMIT → the ingress answers 202 (record committed), p50 / p99 / max"
                .into(),
            summary(&mut hooks),
            "—".into(),
        ));
    }
    registry.stop().await?;

    let n = counts.idle_workers;
    if part("rss") {
        let (http_before, http_after) =
            idle_rss(&db.url, dir.path(), &target, &base, "http_poll", n).await?;
        rows.push((
            format!("RSS, {n} idle http_poll workers (1 h interval), fresh process"),
            format!("{http_before:.0} → {http_after:.0} MB"),
            "≤ 300 MB at 10,000".into(),
        ));
        let (gen_before, gen_after) =
            idle_rss(&db.url, dir.path(), &target, &base, "generator", n).await?;
        rows.push((
            format!("RSS, {n} idle generator workers, fresh process"),
            format!("{gen_before:.0} → {gen_after:.0} MB"),
            "—".into(),
        ));
    }

    common::print_table(
        &format!(
            "reaction: a publish reaching a real connector, from outside (dsreg serve, {} build{})",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            if counts.idle_workers < 10_000 {
                ", quick counts"
            } else {
                ""
            }
        ),
        &rows,
    );
    Ok(())
}
