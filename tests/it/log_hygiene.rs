//! What anyone can cause is counted, not logged at will: a flood of malformed notifications
//! is counted in full and logged at most once a second, each line with what it held back; and
//! every line is structured, fatal ones included, with no debug text in its fields; a
//! database on a closed port is a fatal line naming the address and "Connection refused".

use std::time::{Duration, Instant};

use crate::helpers::{ServeProcess, TestDb, wait_for};

const FLOOD: usize = 600;

#[tokio::test]
async fn a_flood_of_malformed_notifications_is_counted_and_logged_once_a_second() {
    let db = TestDb::new().await;
    let serve = ServeProcess::start(&db.url, &[]).await;
    // Notifications sent before the listener listens are nobody's: wait until it does.
    serve.ready().await;
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    let sent = Instant::now();
    db.client()
        .await
        .batch_execute(&format!(
            "SELECT pg_notify('dsreg_events', 'garbage-' || i) FROM generate_series(1, {FLOOD}) i"
        ))
        .await
        .unwrap();
    let metrics_url = format!("http://{}/metrics", serve.http_addr);
    let last = std::sync::Mutex::new(String::new());
    let counted = wait_for(
        "every malformed notification counted",
        Duration::from_secs(200),
        || async {
            let text = http
                .get(&metrics_url)
                .send()
                .await
                .map_err(|e| *last.lock().unwrap() = format!("scrape failed: {e}"))
                .ok()?
                .text()
                .await
                .ok()?;
            let line = text
                .lines()
                .find(|l| l.starts_with("dsreg_outbox_notifications_malformed_total "))
                .unwrap_or("no malformed counter")
                .to_owned();
            let done = line == format!("dsreg_outbox_notifications_malformed_total {FLOOD}");
            *last.lock().unwrap() = line;
            done.then_some(())
        },
    );
    if tokio::time::timeout(Duration::from_secs(125), counted)
        .await
        .is_err()
    {
        let logs = serve.logs.lock().unwrap();
        let tail = logs[logs.len().saturating_sub(20)..].join("\n");
        panic!(
            "last seen: {}; the registry's last lines:\n{tail}",
            last.lock().unwrap()
        );
    }
    let elapsed = sent.elapsed();
    let lines: Vec<serde_json::Value> = serve
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| {
            j["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("malformed notification"))
        })
        .collect();
    assert!(!lines.is_empty(), "the flood is logged");
    assert!(
        lines.len() as u64 <= elapsed.as_secs() + 1,
        "{} lines in {elapsed:?}",
        lines.len()
    );
    let covered: u64 = lines
        .iter()
        .map(|l| 1 + l["suppressed"].as_u64().unwrap_or(0))
        .sum();
    assert!(covered <= FLOOD as u64, "{covered}");
    serve.stop().await;
}

/// Every line `lines` holds is a JSON object, and no field of one shows Rust's debug text.
fn structured(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
            for (key, value) in v.as_object().expect("a JSON object") {
                let text = value.to_string();
                assert!(
                    !text.contains("Some(") && text != "\"None\"",
                    "{key} holds debug text in {l}"
                );
            }
            v
        })
        .collect()
}

#[tokio::test]
async fn a_committed_change_logs_its_version_as_a_number_and_no_debug_text() {
    use dsreg::api::grpc::pb;
    use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
    let db = TestDb::new().await;
    let serve = ServeProcess::start(&db.url, &[]).await;
    let mut ds = DatasourcesClient::connect(format!("http://{}", serve.grpc_addr))
        .await
        .unwrap();
    let id = ds
        .create_datasource(crate::grpc::create_req("logged"))
        .await
        .unwrap()
        .into_inner()
        .id;
    let version = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: r#"{"rate_per_sec": 1}"#.into(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    ds.publish_version(pb::PublishVersionRequest {
        datasource_id: id,
        version,
    })
    .await
    .unwrap();
    let published = wait_for("the publish logged", Duration::from_secs(60), || {
        let lines = serve.logs.lock().unwrap().clone();
        async move {
            structured(&lines)
                .into_iter()
                .find(|l| l["message"] == "change committed" && l["action"] == "PublishVersion")
        }
    })
    .await;
    assert_eq!(
        published["version"],
        serde_json::json!(version),
        "{published}"
    );
}

#[tokio::test]
async fn a_fatal_start_up_error_is_a_json_log_line_like_the_rest() {
    let db = TestDb::new().await;
    // No token verification keys and no --insecure-no-auth: serve refuses to start.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"))
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", &db.url)
        .env_remove("DSREG_INSECURE_NO_AUTH")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    let logged = structured(&lines);
    let last = logged.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("no token verification keys")),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_database_on_a_closed_port_is_a_fatal_json_line_that_says_connection_refused() {
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"))
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--insecure-no-auth",
            ])
            .env(
                "DATABASE_URL",
                format!("postgres://dsreg:closed-port-pw-3b7e@127.0.0.1:{closed}/dsreg"),
            )
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("serve gives up on a closed port")
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    let logged = structured(&lines);
    let last = logged.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    let error = last["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("127.0.0.1:{closed}")) && error.contains("Connection refused"),
        "the address and the cause: {stderr}"
    );
    assert!(!stderr.contains("closed-port-pw-3b7e"), "{stderr}");
}
