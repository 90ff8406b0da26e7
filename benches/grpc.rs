//! `grpc`: the API as the gateway feels it, over loopback with 64 concurrent streams against
//! one in-process registry and a durable Postgres on this machine, every call authenticated
//! with a bearer token:
//!
//! - GetStatus: requests per second and latency percentiles;
//! - ListDatasources, 100 per page, over 10,000 datasources (each stream walks the pages);
//! - PublishVersion RPC sent → the worker's state written as RUNNING on that version;
//! - a bystander's GetStatus (one call at a time, on a connection of its own) idle, then while
//!   2,000 idle streams are open (1,000 `WatchEvents`, 1,000 `WatchStatus`, on 10
//!   connections), target p99 within 1.5× of idle;
//! - the same bystander while 20 callers send hostile test runs (runaway loops, nested
//!   closures, output bombs) back to back, under the default cap on runs at once (a caller
//!   refused RESOURCE_EXHAUSTED tries again after 100 ms), target p99 within 2× of idle; the
//!   bench prints the runs' answers by code and the scheduling class their threads ran in.
//!
//! `cargo bench --bench grpc`; `GRPC_BENCH_SECONDS` sets each throughput window (10),
//! `GRPC_BENCH_PACED_SECONDS` each paced publish run (30: a p99 over a few seconds is the
//! worst handful of publishes, set by whatever else the machine did in those seconds),
//! `GRPC_BENCH_PARTS` which parts run (`status,list,publish,idle_streams,hostile_harness`, all
//! by default), `GRPC_BENCH_IDLE_KINDS` which idle streams open (`events`, `status`, both by
//! default), `GRPC_BENCH_HARNESS_RUNS` the cap on test runs at once (the registry's default),
//! `GRPC_BENCH_HOSTILE_SCRIPTS` which hostile scripts the callers send (by index, `0,1,2`: all),
//! `GRPC_BENCH_HARNESS_CPU_PERCENT` each run's share of a core (the registry's default).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::events_client::EventsClient;
use dsreg::api::grpc::pb::harness_client::HarnessClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::app::App;
use dsreg::config::Settings;
use dsreg::domain::WorkerStatus;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const STREAMS: usize = 64;
const CHANNELS: usize = 4;
const DATASOURCES: usize = 10_000;
/// Datasources each unpaced publish run uses; each has versions 1, 2 and 3 published in turn.
const PUBLISHED: usize = 256;
/// Versions each publish run publishes per datasource.
const VERSIONS: usize = 3;
/// Aggregate publish rates of the paced runs, per second.
const PACED_RATES: [f64; 2] = [100.0, 250.0];
/// Calls made before each throughput window, not counted.
const WARM_UP: Duration = Duration::from_secs(1);
/// Idle streams the bystander figure opens: half `WatchEvents`, half `WatchStatus`.
const IDLE_STREAMS: usize = 2_000;
/// Connections the idle streams are spread over (within the per-connection stream limit).
const IDLE_CHANNELS: usize = 10;
/// Hostile test runs in flight during the second bystander figure.
const HOSTILE_RUNS: usize = 20;

type Authed = InterceptedService<Channel, Bearer>;

/// Adds the bearer token to every call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let window = Duration::from_secs(common::env_num("GRPC_BENCH_SECONDS", 10));
    let db = common::database().await?;
    let client = dsreg::db::connect(&db.url).await?;
    let ids = common::seed(&client, "api", DATASOURCES).await?;

    let secret = b"0123456789abcdef0123456789abcdef-grpc-bench".to_vec();
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("hs256.secret");
    std::fs::write(&secret_file, &secret)?;
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let mut settings = Settings::for_database(&db.url);
    settings.auth.auth_hs256_secret_file = Some(secret_file);
    settings.auth.auth_issuer = Some("bench".into());
    settings.auth.auth_audience = Some("dsreg".into());
    // One bench principal opens every idle stream. Test runs keep the default cap (one per
    // CPU): the hostile part measures what the registry as shipped does with 20 callers.
    settings.grpc_max_streams_per_caller = IDLE_STREAMS * 2;
    if let Ok(cap) = std::env::var("GRPC_BENCH_HARNESS_RUNS") {
        settings.harness_max_concurrent_runs = cap.parse()?;
    }
    if let Ok(percent) = std::env::var("GRPC_BENCH_HARNESS_CPU_PERCENT") {
        settings.harness_cpu_percent = percent.parse()?;
    }
    let harness_cap = settings.harness_max_concurrent_runs;
    let mut app = App::build(&settings, &db.url).await?;
    let (written_tx, mut written) = tokio::sync::mpsc::unbounded_channel();
    app.written = Some(written_tx);
    let (passes_tx, mut passes) = tokio::sync::mpsc::unbounded_channel();
    app.supervisor.passes = Some(passes_tx);
    let addr = app.grpc_addr();
    let stats = app.listener_stats.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone(), Duration::from_secs(30)));
    while !stats.connected.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Settled: the start-up pass over every datasource (leases claimed) has ended, and a
    // publish made after it has reached RUNNING (its state written after the pass's).
    while let Some(pass) = passes.recv().await {
        if pass.full {
            break;
        }
    }
    drop(passes);
    let settle = *ids.last().expect("seeded");
    client
        .execute("SELECT dsreg_publish($1, 1)", &[&settle])
        .await?;
    common::wait_running(&mut written, &[settle], 1).await;
    let token = dsreg::api::grpc::auth::issue_token(
        &secret,
        &serde_json::json!({
            "sub": "bench", "iss": "bench", "aud": "dsreg", "org": "bench",
            "roles": ["datasource:admin"],
            "exp": chrono::Utc::now().timestamp() + 3600,
        }),
    );
    let bearer = Bearer(format!("Bearer {token}").parse()?);
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
        );
    }
    let channel =
        |i: usize| InterceptedService::new(channels[i % CHANNELS].clone(), bearer.clone());
    let mut rows = Vec::new();

    let parts = std::env::var("GRPC_BENCH_PARTS").unwrap_or_default();
    let runs = |part: &str| parts.is_empty() || parts.split(',').any(|p| p == part);

    // GetStatus.
    let ids = Arc::new(ids);
    if runs("status") {
        let (n, lat) = throughput(window, |i| {
            let life: LifecycleClient<Authed> = LifecycleClient::new(channel(i));
            let ids = ids.clone();
            let mut k = i;
            move || {
                k = (k + 7919) % ids.len();
                let req = pb::GetStatusRequest {
                    datasource_id: ids[k].to_string(),
                };
                let mut life = life.clone();
                async move { life.get_status(req).await.map(|_| ()) }
            }
        })
        .await;
        rows.push(rate_row("GetStatus", n, window, "≥ 20,000 requests/s"));
        rows.push(latency_row("GetStatus latency", &lat, "p99 ≤ 5 ms"));
    }

    // ListDatasources, following page tokens.
    if runs("list") {
        let (n, lat) = throughput(window, |i| {
            let ds: DatasourcesClient<Authed> = DatasourcesClient::new(channel(i));
            let token = Arc::new(Mutex::new(String::new()));
            move || {
                let mut ds = ds.clone();
                let token = token.clone();
                async move {
                    let mut token = token.lock().await;
                    let page = ds
                        .list_datasources(pb::ListDatasourcesRequest {
                            page_size: 100,
                            page_token: token.clone(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    *token = page.next_page_token;
                    Ok(())
                }
            }
        })
        .await;
        rows.push(rate_row(
            "ListDatasources, 100 per page, 10,000 datasources",
            n,
            window,
            "≥ 2,000 requests/s",
        ));
        rows.push(latency_row("ListDatasources latency", &lat, "-"));
    }

    // PublishVersion → RUNNING: one stream at a time; 64 streams publishing at a steady
    // aggregate rate (latency measured from when each publish was due, so a late send counts
    // against it); 64 streams back to back, which is the throughput and the queueing it costs.
    if runs("publish") {
        let paced_for = common::env_num("GRPC_BENCH_PACED_SECONDS", 30) as f64;
        let mut unused = &ids[..];
        let mut next = |n: usize| {
            let (taken, rest) = unused.split_at(n.min(unused.len()));
            unused = rest;
            assert_eq!(taken.len(), n, "enough datasources for every publish run");
            taken
        };
        let one = next(PUBLISHED);
        let (lat, answered) = publish_to_running(&mut written, &channel, one, 1, None).await;
        rows.push(latency_row(
            "PublishVersion RPC answered, one at a time",
            &answered,
            "-",
        ));
        rows.push(latency_row(
            &format!(
                "PublishVersion RPC → RUNNING, one at a time ({} publishes)",
                lat.len()
            ),
            &lat,
            "p99 ≤ 25 ms",
        ));
        for rate in PACED_RATES {
            let n = ((rate * paced_for) as usize / VERSIONS).max(STREAMS);
            let targets = next(n);
            let (lat, _) =
                publish_to_running(&mut written, &channel, targets, STREAMS, Some(rate)).await;
            rows.push(latency_row(
                &format!(
                    "PublishVersion RPC → RUNNING, {STREAMS} streams publishing {rate:.0}/s together ({} publishes)",
                    lat.len()
                ),
                &lat,
                "p99 ≤ 25 ms",
            ));
        }
        let targets = next(PUBLISHED);
        let started = Instant::now();
        let (lat, answered) =
            publish_to_running(&mut written, &channel, targets, STREAMS, None).await;
        let took = started.elapsed().as_secs_f64();
        rows.push((
            format!("PublishVersion, {STREAMS} streams back to back: publishes/s to RUNNING"),
            format!("{:.0}", lat.len() as f64 / took),
            "printed".into(),
        ));
        rows.push(latency_row(
            &format!("PublishVersion RPC answered, {STREAMS} streams back to back"),
            &answered,
            "printed",
        ));
        rows.push(latency_row(
            &format!(
                "PublishVersion RPC → RUNNING, {STREAMS} streams back to back ({} publishes)",
                lat.len()
            ),
            &lat,
            "printed (queueing: streams ÷ throughput)",
        ));
    }

    // A bystander's GetStatus idle, then beside 2,000 idle streams, then beside 20 hostile
    // test runs.
    if runs("idle_streams") || runs("hostile_harness") {
        let bystander = InterceptedService::new(
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
            bearer.clone(),
        );
        let bystander = LifecycleClient::new(bystander);
        let target = ids[0].to_string();
        let idle = bystander_latencies(&bystander, &target, window).await;
        rows.push(latency_row("bystander GetStatus, idle", &idle, "-"));
        let idle_p99 = common::quantile(&idle, 0.99);
        if runs("idle_streams") {
            let mut idle_channels = Vec::with_capacity(IDLE_CHANNELS);
            for _ in 0..IDLE_CHANNELS {
                idle_channels.push(
                    Channel::from_shared(format!("http://{addr}"))?
                        .connect()
                        .await?,
                );
            }
            let (mut events, mut states) = (Vec::new(), Vec::new());
            for i in 0..IDLE_STREAMS {
                let ch = InterceptedService::new(
                    idle_channels[i % IDLE_CHANNELS].clone(),
                    bearer.clone(),
                );
                let kinds = std::env::var("GRPC_BENCH_IDLE_KINDS").unwrap_or_default();
                let events_stream = match kinds.as_str() {
                    "events" => true,
                    "status" => false,
                    _ => i % 2 == 0,
                };
                if events_stream {
                    events.push(
                        EventsClient::new(ch)
                            .watch_events(pb::WatchEventsRequest::default())
                            .await?
                            .into_inner(),
                    );
                } else {
                    states.push(
                        LifecycleClient::new(ch)
                            .watch_status(pb::GetStatusRequest {
                                datasource_id: ids[i % ids.len()].to_string(),
                            })
                            .await?
                            .into_inner(),
                    );
                }
            }
            let loaded = bystander_latencies(&bystander, &target, window).await;
            rows.push(ratio_row(
                &format!("bystander GetStatus, {IDLE_STREAMS} idle streams open"),
                &loaded,
                idle_p99,
                "p99 ≤ 1.5× idle",
            ));
            drop((events, states));
        }
        if runs("hostile_harness") {
            let hook: uuid::Uuid = client
                .query_one(
                    "INSERT INTO datasources (org, project, name, kind)
                     VALUES ('bench', 'api', 'bench-harness-hook', 'webhook') RETURNING id",
                    &[],
                )
                .await?
                .get(0);
            let hook = hook.to_string();
            let stop = CancellationToken::new();
            let mut hostile = Vec::new();
            // Which of the scripts the callers send (`GRPC_BENCH_HOSTILE_SCRIPTS=0,2`), all by
            // default: to tell which shape costs the bystander what.
            let scripts: Vec<usize> = match std::env::var("GRPC_BENCH_HOSTILE_SCRIPTS") {
                Ok(list) => list
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .filter(|n| *n < HOSTILE_SCRIPTS.len())
                    .collect(),
                Err(_) => (0..HOSTILE_SCRIPTS.len()).collect(),
            };
            anyhow::ensure!(
                !scripts.is_empty(),
                "GRPC_BENCH_HOSTILE_SCRIPTS names no script"
            );
            for i in 0..HOSTILE_RUNS {
                let mut harness = HarnessClient::new(channel(i));
                let (hook, stop) = (hook.clone(), stop.clone());
                let script = HOSTILE_SCRIPTS[scripts[i % scripts.len()]];
                hostile.push(tokio::spawn(async move {
                    let mut outcomes = HashMap::<tonic::Code, usize>::new();
                    // Each run is cut off by its caller's deadline and sent again, until the
                    // figure is taken; a caller refused for want of a slot tries again after
                    // a back-off, as a gRPC client's retry policy does.
                    while !stop.is_cancelled() {
                        let mut request = tonic::Request::new(pb::RunTestRequest {
                            datasource_id: hook.clone(),
                            config_json: serde_json::json!({
                                "transform": script
                            })
                            .to_string(),
                            samples_json: vec![
                                serde_json::Value::Array(vec![serde_json::json!({}); 100])
                                    .to_string(),
                            ],
                            ..Default::default()
                        });
                        request.set_timeout(Duration::from_secs(2));
                        let code = match harness.run_test(request).await {
                            Ok(_) => tonic::Code::Ok,
                            Err(status) => status.code(),
                        };
                        *outcomes.entry(code).or_default() += 1;
                        if code == tonic::Code::ResourceExhausted {
                            tokio::select! {
                                () = stop.cancelled() => {}
                                () = tokio::time::sleep(HOSTILE_BACKOFF) => {}
                            }
                        }
                    }
                    outcomes
                }));
            }
            let threads = tokio::spawn(harness_threads(window + WARM_UP));
            let loaded = bystander_latencies(&bystander, &target, window).await;
            rows.push(ratio_row(
                &format!(
                    "bystander GetStatus, {HOSTILE_RUNS} callers sending hostile test runs (at most {harness_cap} run at once, each at most {}% of a core)",
                    settings.harness_cpu_percent
                ),
                &loaded,
                idle_p99,
                "p99 ≤ 2× idle",
            ));
            stop.cancel();
            let mut outcomes = HashMap::<tonic::Code, usize>::new();
            for run in hostile {
                for (code, n) in run.await? {
                    *outcomes.entry(code).or_default() += n;
                }
            }
            let mut outcomes: Vec<String> = outcomes
                .into_iter()
                .map(|(code, n)| format!("{code:?} {n}"))
                .collect();
            outcomes.sort();
            rows.push((
                "hostile test runs answered, by code".into(),
                outcomes.join(", "),
                "printed".into(),
            ));
            rows.push((
                "test-run threads seen during the figure: most at once, scheduling classes".into(),
                threads.await?,
                "SCHED_IDLE".into(),
            ));
        }
    }

    common::print_table(
        "grpc: the API over loopback, 64 concurrent streams, bearer tokens",
        &rows,
    );
    shutdown.cancel();
    running.await??;
    Ok(())
}

/// Scripts of the hostile test runs: a runaway loop, closures nested past the operation
/// count, an output bomb built through `map`.
const HOSTILE_SCRIPTS: [&str; 3] = [
    "let n = 0; loop { n += 1; }",
    "let a = []; a.pad(3000, 1); let b = a; #{ n: a.reduce(|s, x| s + b.reduce(|t, y| t + 1, 0), 0) }",
    "let s = \"\"; s.pad(60000, 'x'); let a = []; a.pad(10000, 0); #{ out: a.map(|x| s + x) }",
];

/// How long a hostile caller refused RESOURCE_EXHAUSTED waits before it tries again.
const HOSTILE_BACKOFF: Duration = Duration::from_millis(100);

/// Samples this process's test-run threads (`dsreg-harness`) every 50 ms for `span`: the most
/// seen at once and the scheduling policies and nice values they ran under, as
/// `/proc/self/task/*/stat` shows them (policy 0 = SCHED_OTHER, 5 = SCHED_IDLE).
async fn harness_threads(span: Duration) -> String {
    let until = Instant::now() + span;
    let mut most = 0;
    let mut seen = std::collections::BTreeMap::<(String, String), usize>::new();
    while Instant::now() < until {
        let mut now = 0;
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let path = task.path();
                let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                if comm.trim() != "dsreg-harness" {
                    continue;
                }
                let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
                // Fields after the command (which ends with ')'): state is field 3, nice 19,
                // policy 41.
                let Some((_, rest)) = stat.rsplit_once(')') else {
                    continue;
                };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let (Some(nice), Some(policy)) = (fields.get(16), fields.get(38)) else {
                    continue;
                };
                now += 1;
                *seen
                    .entry(((*policy).to_owned(), (*nice).to_owned()))
                    .or_default() += 1;
            }
        }
        most = most.max(now);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let classes: Vec<String> = seen
        .into_iter()
        .map(|((policy, nice), n)| {
            let name = match policy.as_str() {
                "0" => "SCHED_OTHER",
                "3" => "SCHED_BATCH",
                "5" => "SCHED_IDLE",
                other => other,
            };
            format!("{name} nice {nice} ×{n}")
        })
        .collect();
    format!("{most}; {}", classes.join(", "))
}

/// One caller's GetStatus of `target`, one call at a time, for a warm-up and then `window`;
/// the sorted milliseconds of the calls in the window.
async fn bystander_latencies(
    client: &LifecycleClient<Authed>,
    target: &str,
    window: Duration,
) -> Vec<f64> {
    let mut client = client.clone();
    let measured_from = Instant::now() + WARM_UP;
    let deadline = measured_from + window;
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        client
            .get_status(pb::GetStatusRequest {
                datasource_id: target.to_owned(),
            })
            .await
            .expect("the bystander's call succeeds");
        if t >= measured_from {
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// A latency row with its p99 as a multiple of `baseline_p99`.
fn ratio_row(
    figure: &str,
    sorted: &[f64],
    baseline_p99: f64,
    target: &str,
) -> (String, String, String) {
    let (figure, value, target) = latency_row(figure, sorted, target);
    let ratio = common::quantile(sorted, 0.99) / baseline_p99.max(f64::MIN_POSITIVE);
    (figure, format!("{value}; p99 {ratio:.2}× idle"), target)
}

/// Runs `STREAMS` loops of the call `make(i)` builds for `WARM_UP`, then for `window`;
/// returns the calls done in the window and their sorted latencies in milliseconds. The
/// warm-up opens the pool's connections and prepares their statements, which the first
/// calls would otherwise wait for.
async fn throughput<M, C, F>(window: Duration, make: M) -> (usize, Vec<f64>)
where
    M: Fn(usize) -> C,
    C: FnMut() -> F + Send + 'static,
    F: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let measured_from = Instant::now() + WARM_UP;
    let deadline = measured_from + window;
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let mut call = make(i);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                call().await.expect("call succeeds");
                if t >= measured_from {
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("stream task"));
    }
    all.sort_by(f64::total_cmp);
    (all.len(), all)
}

/// Publishes versions 1, 2 and 3 of `targets` from `streams` concurrent streams, each stream
/// one publish at a time: back to back, or at `rate` publishes a second across all streams
/// (each stream's sends spaced evenly, the streams staggered). Returns the sorted
/// milliseconds from each publish's send (or, when paced, from when it was due) to the
/// worker's state written as RUNNING on that version, and the sorted milliseconds until each
/// RPC was answered.
async fn publish_to_running(
    written: &mut tokio::sync::mpsc::UnboundedReceiver<dsreg::supervisor::writer::Written>,
    channel: &(impl Fn(usize) -> Authed + Sync),
    targets: &[uuid::Uuid],
    streams: usize,
    rate: Option<f64>,
) -> (Vec<f64>, Vec<f64>) {
    let sent: Arc<std::sync::Mutex<HashMap<(uuid::Uuid, i32), Instant>>> = Arc::default();
    let expected = targets.len() * VERSIONS;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, chunk) in targets.chunks(targets.len().div_ceil(streams)).enumerate() {
        let mut ds: DatasourcesClient<Authed> = DatasourcesClient::new(channel(i));
        let chunk = chunk.to_vec();
        let sent = sent.clone();
        // Each stream sends every `streams / rate` seconds, offset by its index.
        let spacing = rate.map(|r| Duration::from_secs_f64(streams as f64 / r));
        let offset = rate.map(|r| Duration::from_secs_f64(i as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            let mut k = 0u32;
            for version in 1..=VERSIONS as i32 {
                for id in &chunk {
                    let due = match (spacing, offset) {
                        (Some(spacing), Some(offset)) => {
                            let due = start + offset + spacing * k;
                            tokio::time::sleep_until(due.into()).await;
                            due
                        }
                        _ => Instant::now(),
                    };
                    k += 1;
                    sent.lock()
                        .expect("not poisoned")
                        .insert((*id, version), due);
                    ds.publish_version(pb::PublishVersionRequest {
                        datasource_id: id.to_string(),
                        version,
                    })
                    .await
                    .expect("publish");
                    answered.push(due.elapsed().as_secs_f64() * 1000.0);
                }
            }
            answered
        }));
    }
    let mut latencies = Vec::new();
    let collect = async {
        while latencies.len() < expected {
            let Some(batch) = written.recv().await else {
                break;
            };
            for (id, status, version) in batch.states {
                let (Some(WorkerStatus::Running), Some(version)) = (status, version) else {
                    continue;
                };
                if let Some(t) = sent.lock().expect("not poisoned").remove(&(id, version)) {
                    latencies.push(batch.at.duration_since(t).as_secs_f64() * 1000.0);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .expect("every publish reaches RUNNING within 120 s");
    let mut answered = Vec::new();
    for t in tasks {
        answered.extend(t.await.expect("publisher"));
    }
    latencies.sort_by(f64::total_cmp);
    answered.sort_by(f64::total_cmp);
    (latencies, answered)
}

fn rate_row(figure: &str, n: usize, window: Duration, target: &str) -> (String, String, String) {
    (
        figure.into(),
        format!("{:.0} requests/s", n as f64 / window.as_secs_f64()),
        target.into(),
    )
}

fn latency_row(figure: &str, sorted: &[f64], target: &str) -> (String, String, String) {
    (
        figure.into(),
        format!(
            "p50 {:.2} ms, p99 {:.2} ms (p99.9 {:.2}, max {:.2})",
            common::quantile(sorted, 0.5),
            common::quantile(sorted, 0.99),
            common::quantile(sorted, 0.999),
            sorted.last().copied().unwrap_or(0.0)
        ),
        target.into(),
    )
}
