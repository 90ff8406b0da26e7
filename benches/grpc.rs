//! `grpc`: the API as the gateway feels it, over loopback with 64 concurrent streams against
//! one in-process registry and a durable Postgres on this machine, every call authenticated
//! with a bearer token:
//!
//! - GetStatus: requests per second and latency percentiles;
//! - ListDatasources, 100 per page, over 10,000 datasources (each stream walks the pages);
//! - PublishVersion RPC sent → the worker's state written as RUNNING on that version.
//!
//! `cargo bench --bench grpc`; `GRPC_BENCH_SECONDS` sets each throughput window (10),
//! `GRPC_BENCH_PARTS` which parts run (`status,list,publish`, all by default).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
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
const PUBLISHED: usize = 256;
const SEQUENTIAL: usize = 200;
/// Calls made before each throughput window, not counted.
const WARM_UP: Duration = Duration::from_secs(1);

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
    let seconds: u64 = std::env::var("GRPC_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let window = Duration::from_secs(seconds);
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
    let mut app = App::build(&settings, &db.url).await?;
    let (written_tx, mut written) = tokio::sync::mpsc::unbounded_channel();
    app.written = Some(written_tx);
    let addr = app.grpc_addr();
    let stats = app.listener_stats.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone(), Duration::from_secs(30)));
    while !stats.connected.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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

    // PublishVersion → RUNNING: one stream at a time, then 64 streams at once.
    if runs("publish") {
        let one: Vec<_> = ids[..SEQUENTIAL].to_vec();
        let (lat, answered) = publish_to_running(&mut written, &channel, &one, 1, 1).await;
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
        let many: Vec<_> = ids[SEQUENTIAL..SEQUENTIAL + PUBLISHED].to_vec();
        let (lat, answered) = publish_to_running(&mut written, &channel, &many, STREAMS, 3).await;
        rows.push(latency_row(
            &format!("PublishVersion RPC answered, {STREAMS} streams"),
            &answered,
            "-",
        ));
        rows.push(latency_row(
            &format!(
                "PublishVersion RPC → RUNNING, {STREAMS} streams ({} publishes)",
                lat.len()
            ),
            &lat,
            "p99 ≤ 25 ms",
        ));
    }

    common::print_table(
        "grpc: the API over loopback, 64 concurrent streams, bearer tokens",
        &rows,
    );
    shutdown.cancel();
    running.await??;
    Ok(())
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

/// Publishes versions 1..=`versions` of `targets` from `streams` concurrent streams, each
/// stream one publish at a time; returns the sorted milliseconds from sending each RPC to the
/// worker's state written as RUNNING on that version, and the sorted milliseconds until each
/// RPC was answered.
async fn publish_to_running(
    written: &mut tokio::sync::mpsc::UnboundedReceiver<dsreg::supervisor::writer::Written>,
    channel: &(impl Fn(usize) -> Authed + Sync),
    targets: &[uuid::Uuid],
    streams: usize,
    versions: i32,
) -> (Vec<f64>, Vec<f64>) {
    let sent: Arc<std::sync::Mutex<HashMap<(uuid::Uuid, i32), Instant>>> = Arc::default();
    let expected = targets.len() * versions as usize;
    let mut tasks = Vec::new();
    for (i, chunk) in targets.chunks(targets.len().div_ceil(streams)).enumerate() {
        let mut ds: DatasourcesClient<Authed> = DatasourcesClient::new(channel(i));
        let chunk = chunk.to_vec();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for version in 1..=versions {
                for id in &chunk {
                    let t = Instant::now();
                    sent.lock().expect("not poisoned").insert((*id, version), t);
                    ds.publish_version(pb::PublishVersionRequest {
                        datasource_id: id.to_string(),
                        version,
                    })
                    .await
                    .expect("publish");
                    answered.push(t.elapsed().as_secs_f64() * 1000.0);
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
            "p50 {:.2} ms, p99 {:.2} ms",
            common::quantile(sorted, 0.5),
            common::quantile(sorted, 0.99)
        ),
        target.into(),
    )
}
