//! `/metrics` on a real registry: a live worker's series follow its records, restarts and
//! state and vanish with it; the registry-level series (reload latency, outbox, listener,
//! pool, reconcile passes, RPCs) move; and the scrape passes `promtool check metrics`.

use std::process::Stdio;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::connectors::{BoxFuture, ConfigError, Connector, Error, KindInfo, Mode, RunContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb, wait_for};

/// The body of `GET /metrics`.
async fn scrape(app: &TestApp) -> String {
    let (status, body) = crate::serve::http_get(&app.http_addr.to_string(), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample named exactly `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Creates a datasource of `kind` and publishes `config` on it; returns its id.
async fn publish_new(ch: &Channel, name: &str, kind: &str, config: serde_json::Value) -> String {
    let mut ds = DatasourcesClient::new(ch.clone());
    let id = ds
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "metrics".into(),
            name: name.into(),
            kind: kind.into(),
            owner: "team-data".into(),
            tags: vec![],
            description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    publish(ch, &id, config).await;
    id
}

/// Publishes a new version with `config`.
async fn publish(ch: &Channel, id: &str, config: serde_json::Value) {
    let mut ds = DatasourcesClient::new(ch.clone());
    let version = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.to_owned(),
            config_json: config.to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    ds.publish_version(pb::PublishVersionRequest {
        datasource_id: id.to_owned(),
        version,
    })
    .await
    .unwrap();
}

/// Scrapes until `check` returns `Some` (60 s at most).
async fn wait_for_scrape<T>(app: &TestApp, what: &str, check: impl Fn(&str) -> Option<T>) -> T {
    wait_for(what, Duration::from_secs(60), || async {
        check(&scrape(app).await)
    })
    .await
}

/// Released by the test: each run of a `gated` worker then completes.
static GATE: LazyLock<Notify> = LazyLock::new(Notify::new);

/// A kind whose run lasts until [`GATE`] is released, then completes.
struct Gated;

static GATED: LazyLock<KindInfo> = LazyLock::new(|| KindInfo {
    name: "gated",
    version: "1.0.0",
    summary: "runs until the test releases it",
    config_schema: serde_json::json!({ "type": "object" }),
    secrets: &[],
    mode: Mode::Pull,
    can_backfill: false,
});

impl Connector for Gated {
    fn info(&self) -> &KindInfo {
        &GATED
    }

    fn validate(&self, _config: &serde_json::Value) -> Result<(), ConfigError> {
        Ok(())
    }

    fn stall_after(&self, _config: &serde_json::Value) -> Option<Duration> {
        None
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        Box::pin(async move {
            ctx.health.working();
            tokio::select! {
                () = ctx.cancel.cancelled() => {}
                () = GATE.notified() => {}
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_workers_records_restarts_and_state_are_scraped_and_vanish_with_it() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |app| app.catalog.register(Arc::new(Gated))).await;
    let ch = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut life = LifecycleClient::new(ch.clone());
    let id = publish_new(
        &ch,
        "metered",
        "generator",
        serde_json::json!({ "rate_per_sec": 50, "template": { "n": 1 } }),
    )
    .await;
    let labels = format!("datasource=\"{id}\",kind=\"generator\"");
    let records = format!("dsreg_datasource_records_total{{{labels}}}");
    let restarts = format!("dsreg_datasource_restarts_total{{{labels}}}");
    let running = format!("dsreg_datasource_worker_state{{{labels},state=\"running\"}}");

    // Records flow: the counter moves between scrapes.
    let first = wait_for_scrape(&app, "records counted while running", |text| {
        let n = value(text, &records)?;
        (n > 0.0 && value(text, &running) == Some(1.0)).then_some(n)
    })
    .await;
    let text = scrape(&app).await;
    assert_eq!(value(&text, &restarts), Some(0.0), "{text}");
    assert_eq!(
        value(&text, &format!("dsreg_datasource_errors_total{{{labels}}}")),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("dsreg_datasource_dead_lettered_total{{{labels}}}")
        ),
        Some(0.0)
    );
    let progress = value(
        &text,
        &format!("dsreg_datasource_last_progress_timestamp_seconds{{{labels}}}"),
    )
    .expect("a last progress time once records flowed");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - 60.0..=now + 1.0).contains(&progress),
        "{progress} vs {now}"
    );
    wait_for_scrape(&app, "the records counter moving", |text| {
        (value(text, &records)? > first).then_some(())
    })
    .await;

    // A restart over gRPC: one more connector run, running again, the count carried on.
    let restarted = life
        .restart_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restarted.status, pb::WorkerStatus::Running as i32);
    let carried = wait_for_scrape(&app, "the restart counted", |text| {
        (value(text, &restarts)? == 1.0 && value(text, &running) == Some(1.0))
            .then(|| value(text, &records))
            .flatten()
    })
    .await;
    assert!(carried >= first);

    // The state follows the worker: running, stopped once its run completes, running again
    // after a restart.
    let gated = publish_new(&ch, "gated", "gated", serde_json::json!({})).await;
    let gated_labels = format!("datasource=\"{gated}\",kind=\"gated\"");
    let state = |s: &str| format!("dsreg_datasource_worker_state{{{gated_labels},state=\"{s}\"}}");
    let gated_restarts = format!("dsreg_datasource_restarts_total{{{gated_labels}}}");
    wait_for_scrape(&app, "the gated worker running", |text| {
        (value(text, &state("running")) == Some(1.0)).then_some(())
    })
    .await;
    GATE.notify_one();
    wait_for_scrape(&app, "the completed worker stopped", |text| {
        (value(text, &state("stopped")) == Some(1.0)
            && value(text, &state("running")).is_none()
            && value(text, &gated_restarts) == Some(0.0))
        .then_some(())
    })
    .await;
    life.restart_worker(pb::LifecycleRequest {
        datasource_id: gated.clone(),
    })
    .await
    .unwrap();
    wait_for_scrape(&app, "the restarted worker running", |text| {
        (value(text, &state("running")) == Some(1.0)
            && value(text, &state("stopped")).is_none()
            && value(text, &gated_restarts) == Some(1.0))
        .then_some(())
    })
    .await;

    // Stopped for good: its series go, the other worker's stay.
    life.stop_worker(pb::LifecycleRequest {
        datasource_id: id.clone(),
    })
    .await
    .unwrap();
    let text = wait_for_scrape(&app, "the stopped worker's series gone", |text| {
        (!text.contains(&id)).then(|| text.to_owned())
    })
    .await;
    assert_eq!(value(&text, &state("running")), Some(1.0), "{text}");
    GATE.notify_one();
}

/// The `Content-Type` and body of `GET /metrics` sent with `accept` (no header: `None`).
async fn scrape_accepting(app: &TestApp, accept: Option<&str>) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(app.http_addr).await.unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: dsreg\r\n{accept}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .expect("a content type");
    (content_type, body.to_owned())
}

/// Runs `promtool check metrics` on `text`; returns its exit status and output.
async fn promtool_check(text: &str) -> (std::process::ExitStatus, String) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool on the PATH (Debian package `prometheus`; .ci/run installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let mut said = String::from_utf8_lossy(&output.stdout).into_owned();
    said.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status, said)
}

#[tokio::test]
async fn the_scrape_is_in_the_format_asked_for_with_registry_series_and_passes_promtool() {
    let db = TestDb::new().await;
    let (app, ch) = crate::grpc::serve(&db).await;
    // A worker that the start-up pass starts is not measured, and that pass goes a page at a
    // time: a publish committed before its page is read would be started by it. So the
    // publish is made once the pass has ended.
    wait_for_scrape(&app, "the start-up pass ended", |text| {
        (value(
            text,
            "dsreg_supervisor_reconcile_duration_seconds_count{pass=\"full\"}",
        )? >= 1.0)
            .then_some(())
    })
    .await;
    let id = publish_new(
        &ch,
        "linted",
        "generator",
        serde_json::json!({ "rate_per_sec": 20 }),
    )
    .await;

    // A failed call, a refused one and an open stream are counted too.
    let mut ds = DatasourcesClient::new(ch.clone());
    let missing = ds
        .get_datasource(pb::GetDatasourceRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let mut raw = tonic::client::Grpc::new(ch.clone());
    raw.ready().await.unwrap();
    let refused = raw
        .unary(
            tonic::Request::new(()),
            "/dsreg.v1.Datasources/DropEverything".parse().unwrap(),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let mut life = LifecycleClient::new(ch.clone());
    let _watch = life
        .watch_status(pb::GetStatusRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    // Readiness is a series too, written by each check (gRPC health checks every second).
    wait_for_scrape(&app, "the registry scraped as ready", |text| {
        (value(text, "dsreg_ready") == Some(1.0)).then_some(())
    })
    .await;
    let text = wait_for_scrape(&app, "the publish's reload measured", |text| {
        let running = format!(
            "dsreg_datasource_worker_state{{datasource=\"{id}\",kind=\"generator\",state=\"running\"}}"
        );
        // The reload-latency pairing can miss a reload whose worker reports working before
        // the order is recorded; the histogram is checked for its range, not its count.
        // The outbox is read shortly after the reconcile the notification woke.
        (value(text, &running) == Some(1.0)
            && value(text, "dsreg_supervisor_reload_latency_seconds_count").is_some()
            && value(text, "dsreg_outbox_lag_seconds_count").is_some_and(|n| n >= 1.0))
        .then(|| text.to_owned())
    })
    .await;
    // The datasource is named once for joins: tenant, kind and the version it runs.
    let info = format!(
        "dsreg_datasource_info{{datasource=\"{id}\",org=\"acme\",project=\"metrics\",name=\"linted\",kind=\"generator\",version=\"1\"}}"
    );
    assert_eq!(value(&text, &info), Some(1.0), "{text}");
    assert_eq!(
        text.matches("dsreg_datasource_info{").count(),
        1,
        "one series per datasource running here: {text}"
    );
    let latency = value(&text, "dsreg_supervisor_reload_latency_seconds_sum").unwrap();
    assert!((0.0..15.0).contains(&latency), "{latency}");
    assert!(
        value(&text, "dsreg_outbox_lag_seconds_count").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        value(
            &text,
            "dsreg_supervisor_reconcile_duration_seconds_count{pass=\"full\"}"
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    assert_eq!(value(&text, "dsreg_outbox_listener_connected"), Some(1.0));
    assert!(value(&text, "dsreg_outbox_notifications_received_total").unwrap() >= 1.0);
    assert_eq!(
        value(&text, "dsreg_outbox_notifications_malformed_total"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "dsreg_outbox_listener_reconnects_total"),
        Some(0.0)
    );
    assert_eq!(value(&text, "dsreg_db_pool_max_connections"), Some(8.0));
    let open = value(&text, "dsreg_db_pool_connections").unwrap();
    assert!((1.0..=8.0).contains(&open), "{open}");
    assert!(value(&text, "dsreg_db_pool_available_connections").unwrap() <= open);
    assert!(value(&text, "dsreg_db_pool_waiting_tasks").is_some());
    for (method, code) in [
        ("/dsreg.v1.Datasources/CreateDatasource", "OK"),
        ("/dsreg.v1.Datasources/PublishVersion", "OK"),
        ("/dsreg.v1.Datasources/GetDatasource", "NOT_FOUND"),
        ("/dsreg.v1.Lifecycle/WatchStatus", "OK"),
        // Refused by the auth layer, inside the metrics layer; unknown paths share one label.
        ("other", "PERMISSION_DENIED"),
    ] {
        let labels = format!("{{method=\"{method}\",code=\"{code}\"}}");
        assert_eq!(
            value(&text, &format!("dsreg_grpc_requests_total{labels}")),
            Some(1.0),
            "{method} {code}: {text}"
        );
        assert_eq!(
            value(
                &text,
                &format!("dsreg_grpc_request_duration_seconds_count{labels}")
            ),
            Some(1.0)
        );
    }

    // The format asked for: OpenMetrics to a Prometheus server, the text format otherwise,
    // which `promtool check metrics` reads.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (open_type, open_text) = scrape_accepting(&app, Some(prometheus_accept)).await;
    assert_eq!(
        open_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(open_text.ends_with("# EOF\n"), "{open_text}");
    assert!(open_text.contains("# TYPE dsreg_grpc_requests counter"));
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (plain_type, plain) = scrape_accepting(&app, accept).await;
        assert_eq!(
            plain_type, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        assert!(plain.contains("# TYPE dsreg_grpc_requests_total counter"));
        assert!(!plain.contains("# EOF"));
        let (status, said) = promtool_check(&plain).await;
        assert!(status.success(), "promtool check metrics: {said}\n{plain}");
    }
}
