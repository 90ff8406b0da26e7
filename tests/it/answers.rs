//! Answers that tell what happened, through the real gRPC API and the real `dsreg` binary: a
//! rollback runs the publish checks and is refused like the publish, a rollback answers its
//! `rolled_back` event (whichever way it moves) and the CLI says it rolled back, and a restart
//! answers the state it produced (a refused one is not `running, settled`), and a secret put or
//! deleted reaches the running worker.

use std::path::Path;
use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::api::grpc::pb::secrets_client::SecretsClient;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::cli::{Ran, dsreg, run};
use crate::grpc::serve;
use crate::helpers::{TestDb, wait_for};

/// `dsreg <args> --server <url>`, no token, run to its end.
async fn client(dir: &Path, url: &str, args: &[&str]) -> Ran {
    let mut command = dsreg(dir);
    command.args(args).args(["--server", url]);
    run(command, None).await
}

/// Creates a datasource of `kind` and returns its id.
async fn create(ds: &mut DatasourcesClient<Channel>, name: &str, kind: &str) -> String {
    ds.create_datasource(pb::CreateDatasourceRequest {
        org: "acme".into(),
        project: "ingest".into(),
        name: name.into(),
        kind: kind.into(),
        owner: "team-data".into(),
        tags: Vec::new(),
        description: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .id
}

/// Creates a version with `config` and publishes it; returns its number and event id.
async fn publish(
    ds: &mut DatasourcesClient<Channel>,
    id: &str,
    config: serde_json::Value,
) -> (i32, i64) {
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
    let published = ds
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.to_owned(),
            version,
        })
        .await
        .unwrap()
        .into_inner();
    (version, published.event_id)
}

/// Waits until the worker of `status` runs `version`.
async fn running_on(
    life: &LifecycleClient<Channel>,
    status: &pb::GetStatusRequest,
    version: i32,
    what: &str,
) {
    wait_for(what, Duration::from_secs(60), || {
        let mut life = life.clone();
        let status = status.clone();
        async move {
            let s = life.get_status(status).await.unwrap().into_inner();
            (s.status == pb::WorkerStatus::Running as i32 && s.running_version == version)
                .then_some(())
        }
    })
    .await;
}

async fn current_version(ds: &mut DatasourcesClient<Channel>, id: &str) -> i32 {
    ds.get_datasource(pb::GetDatasourceRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
        .current_version
}

/// (id, type, version) of the datasource's version events (publishes, rollbacks,
/// unpublishes), oldest first; worker events come and go on their own time.
async fn version_events(db: &TestDb, datasource: &str) -> Vec<(i64, String, Option<i32>)> {
    db.events(Uuid::parse_str(datasource).unwrap())
        .await
        .into_iter()
        .filter(|e| ["published", "rolled_back", "unpublished"].contains(&e.kind.as_str()))
        .map(|e| (e.id, e.kind, e.version))
        .collect()
}

#[tokio::test]
async fn a_rollback_to_a_version_whose_secret_was_deleted_is_refused_like_its_publish() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel.clone());
    let mut secrets = SecretsClient::new(channel);
    let id = create(&mut ds, "poll-secret", "http_poll").await;
    let put = pb::PutSecretRequest {
        datasource_id: id.clone(),
        name: "token".into(),
        value: "rollback-canary-7f3a".into(),
    };
    secrets.put_secret(put.clone()).await.unwrap();
    // Port 9 (discard) on loopback: nothing answers, and nothing here depends on polling.
    let source = "http://127.0.0.1:9/";
    let (with_secret, _) = publish(
        &mut ds,
        &id,
        serde_json::json!({ "url": source, "bearer_secret": "token" }),
    )
    .await;
    let (without, _) = publish(&mut ds, &id, serde_json::json!({ "url": source })).await;
    secrets
        .delete_secret(pb::DeleteSecretRequest {
            datasource_id: id.clone(),
            name: "token".into(),
        })
        .await
        .unwrap();
    let before = version_events(&db, &id).await;

    let publish_refused = ds
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.clone(),
            version: with_secret,
        })
        .await
        .unwrap_err();
    let rollback_refused = ds
        .rollback_version(pb::RollbackVersionRequest {
            datasource_id: id.clone(),
            to_version: 0,
        })
        .await
        .unwrap_err();
    let explicit_refused = ds
        .rollback_version(pb::RollbackVersionRequest {
            datasource_id: id.clone(),
            to_version: with_secret,
        })
        .await
        .unwrap_err();
    let cli_refused = client(dir.path(), &url, &["version", "rollback", &id]).await;

    assert_eq!(publish_refused.code(), Code::FailedPrecondition);
    assert!(
        publish_refused.message().contains("token"),
        "the publish names the missing secret: {}",
        publish_refused.message()
    );
    for refused in [&rollback_refused, &explicit_refused] {
        assert_eq!(refused.code(), publish_refused.code());
        assert_eq!(refused.message(), publish_refused.message());
        assert_eq!(refused.details(), publish_refused.details());
    }
    assert_eq!(cli_refused.status.code(), Some(1), "{}", cli_refused.stderr);
    assert!(
        cli_refused.stderr.contains(&format!(
            "FAILED_PRECONDITION: {}",
            publish_refused.message()
        )),
        "{}",
        cli_refused.stderr
    );
    assert_eq!(
        current_version(&mut ds, &id).await,
        without,
        "the running version stays"
    );
    assert_eq!(
        version_events(&db, &id).await,
        before,
        "a refused rollback writes no event"
    );

    // With the secret back the same rollback goes through.
    secrets.put_secret(put).await.unwrap();
    let rolled_back = ds
        .rollback_version(pb::RollbackVersionRequest {
            datasource_id: id.clone(),
            to_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled_back.version, with_secret);
    assert_eq!(current_version(&mut ds, &id).await, with_secret);
    let last = version_events(&db, &id).await.pop().unwrap();
    assert_eq!(
        last,
        (
            rolled_back.event_id,
            "rolled_back".to_owned(),
            Some(with_secret)
        )
    );
}

#[tokio::test]
async fn a_rollback_answers_its_rolled_back_event_and_the_cli_says_it_rolled_back() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel);
    let id = create(&mut ds, "gen-rollback", "generator").await;
    let config = |rate: u32| serde_json::json!({ "rate_per_sec": rate, "template": { "n": 1 } });
    let (v1, _) = publish(&mut ds, &id, config(0)).await;
    let (v2, _) = publish(&mut ds, &id, config(1)).await;
    let (v3, published) = publish(&mut ds, &id, config(2)).await;
    assert_ne!(published, 0);

    // Back to the previous version over gRPC.
    let back = ds
        .rollback_version(pb::RollbackVersionRequest {
            datasource_id: id.clone(),
            to_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.version, v2);
    assert_eq!(
        version_events(&db, &id).await.pop().unwrap(),
        (back.event_id, "rolled_back".to_owned(), Some(v2)),
        "the answer names the rollback's own event"
    );

    // Forward again to a version published before, by the CLI: still a rollback.
    let forward = client(
        dir.path(),
        &url,
        &["version", "rollback", &id, "--to-version", &v3.to_string()],
    )
    .await;
    forward.assert_success();
    let (event, kind, version) = version_events(&db, &id).await.pop().unwrap();
    assert_eq!((kind.as_str(), version), ("rolled_back", Some(v3)));
    assert_eq!(
        forward.stdout,
        format!("rolled back {id} to version {v3} (event {event})\n")
    );

    // Back to the first, as JSON.
    let first = client(
        dir.path(),
        &url,
        &[
            "version",
            "rollback",
            &id,
            "--to-version",
            &v1.to_string(),
            "-o",
            "json",
        ],
    )
    .await;
    first.assert_success();
    let answer = &first.json_lines()[0];
    let (event, kind, version) = version_events(&db, &id).await.pop().unwrap();
    assert_eq!((kind.as_str(), version), ("rolled_back", Some(v1)));
    assert_eq!(answer["version"], v1);
    assert_eq!(
        answer["event_id"]
            .as_i64()
            .or_else(|| answer["event_id"].as_str().and_then(|s| s.parse().ok())),
        Some(event)
    );

    // The target already current: nothing moves and the CLI says so.
    let events = version_events(&db, &id).await;
    let again = client(
        dir.path(),
        &url,
        &["version", "rollback", &id, "--to-version", &v1.to_string()],
    )
    .await;
    again.assert_success();
    assert_eq!(
        again.stdout,
        format!("version {v1} of {id} already was the published one; nothing rolled back\n")
    );
    assert_eq!(version_events(&db, &id).await, events);
    assert_eq!(current_version(&mut ds, &id).await, v1);
}

/// A source on a local port that answers every poll with an empty page.
async fn empty_source() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/", axum::routing::get(|| async { "[]" }));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/")
}

#[tokio::test]
async fn a_refused_restart_answers_its_refusal_not_running_and_settled() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel.clone());
    let mut secrets = SecretsClient::new(channel.clone());
    let mut life = LifecycleClient::new(channel);
    let id = create(&mut ds, "poll-restart", "http_poll").await;
    secrets
        .put_secret(pb::PutSecretRequest {
            datasource_id: id.clone(),
            name: "token".into(),
            value: "restart-canary-91c2".into(),
        })
        .await
        .unwrap();
    let source = empty_source().await;
    let (v1, _) = publish(
        &mut ds,
        &id,
        serde_json::json!({ "url": source, "bearer_secret": "token", "interval_ms": 100 }),
    )
    .await;
    let status = pb::GetStatusRequest {
        datasource_id: id.clone(),
    };
    running_on(&life, &status, v1, "the poller to run").await;
    // The secret the running version needs goes away: a restart cannot build the worker.
    secrets
        .delete_secret(pb::DeleteSecretRequest {
            datasource_id: id.clone(),
            name: "token".into(),
        })
        .await
        .unwrap();

    let answer = life
        .restart_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cli = client(dir.path(), &url, &["worker", "restart", &id]).await;

    assert!(
        !answer.settled,
        "a refused restart is not settled: {answer:?}"
    );
    // On a loaded machine the call's wait may end before the refusal is written: then the
    // answer is "not settled" with no error yet, which is true too.
    assert!(
        answer.error_code.is_empty() || answer.error_code == "reload_rejected",
        "{answer:?}"
    );
    assert!(
        !answer.error_message.contains("restart-canary-91c2"),
        "{answer:?}"
    );
    assert_eq!(cli.status.code(), Some(1), "{}", cli.stdout);
    assert!(
        cli.stderr.contains("is not restarted: reload_rejected")
            || cli.stderr.contains("at the call's deadline"),
        "{}",
        cli.stderr
    );
    // The refusal is what the state then says.
    wait_for("the refusal on the state", Duration::from_secs(30), || {
        let mut life = life.clone();
        let status = status.clone();
        async move {
            let s = life.get_status(status).await.unwrap().into_inner();
            (s.error_code == "reload_rejected").then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn an_archived_datasource_refuses_a_publish_and_a_secret_for_being_archived_first() {
    let db = TestDb::new().await;
    let (_app, channel) = serve(&db).await;
    let mut ds = DatasourcesClient::new(channel.clone());
    let mut secrets = SecretsClient::new(channel);
    let id = create(&mut ds, "poll-archived", "http_poll").await;
    // Needs a secret that is not stored: the publish has two reasons to refuse.
    let version = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json:
                serde_json::json!({ "url": "http://127.0.0.1:9/", "bearer_secret": "token" })
                    .to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    ds.archive_datasource(pb::ArchiveDatasourceRequest {
        id: id.clone(),
        etag: String::new(),
    })
    .await
    .unwrap();

    let publish = ds
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.clone(),
            version,
        })
        .await
        .unwrap_err();
    let put = secrets
        .put_secret(pb::PutSecretRequest {
            datasource_id: id.clone(),
            name: "token".into(),
            value: "archived-canary-5d0e".into(),
        })
        .await
        .unwrap_err();
    let listed = secrets
        .list_secrets(pb::ListSecretsRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    let archived = format!("datasource {id} is archived");
    for refused in [&publish, &put] {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(refused.message(), archived);
    }
    assert!(listed.secrets.is_empty(), "nothing was stored: {listed:?}");
}

#[tokio::test]
async fn a_restart_of_a_failing_worker_answers_its_failure() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel.clone());
    let mut life = LifecycleClient::new(channel);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source = format!("http://{}/", listener.local_addr().unwrap());
    let router = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let id = create(&mut ds, "poll-failing", "http_poll").await;
    publish(
        &mut ds,
        &id,
        serde_json::json!({ "url": source, "interval_ms": 100, "max_retries": 0 }),
    )
    .await;
    let status = pb::GetStatusRequest {
        datasource_id: id.clone(),
    };
    wait_for("the poller to fail", Duration::from_secs(30), || {
        let mut life = life.clone();
        let status = status.clone();
        async move {
            let s = life.get_status(status).await.unwrap().into_inner();
            (!s.error_code.is_empty() && s.status != pb::WorkerStatus::Running as i32).then_some(())
        }
    })
    .await;

    let answer = life
        .restart_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cli = client(dir.path(), &url, &["worker", "restart", &id]).await;

    assert!(!answer.settled, "{answer:?}");
    assert_ne!(
        answer.status,
        pb::WorkerStatus::Running as i32,
        "{answer:?}"
    );
    assert!(!answer.error_code.is_empty(), "{answer:?}");
    assert_eq!(cli.status.code(), Some(1), "{}", cli.stdout);
    assert!(
        cli.stderr
            .contains(&format!("is not restarted: {}", answer.error_code)),
        "the CLI names the failure: {}",
        cli.stderr
    );
}

/// A source answering `[]` that remembers every `Authorization` header it was sent.
async fn recording_source() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    let router = axum::Router::new().route(
        "/",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                record.lock().unwrap().push(auth);
                "[]"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}/"), seen)
}

async fn put_token(secrets: &mut SecretsClient<Channel>, id: &str, value: &str) {
    secrets
        .put_secret(pb::PutSecretRequest {
            datasource_id: id.to_owned(),
            name: "token".into(),
            value: value.into(),
        })
        .await
        .unwrap();
}

async fn wait_for_bearer(seen: &std::sync::Mutex<Vec<String>>, token: &str) {
    let wanted = format!("Bearer {token}");
    wait_for(
        &format!("the source to be sent {token}"),
        Duration::from_secs(60),
        || {
            let found = seen.lock().unwrap().contains(&wanted);
            async move { found.then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn a_rotated_secret_reaches_the_running_worker_and_a_put_back_one_revives_it() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let mut ds = DatasourcesClient::new(channel.clone());
    let mut secrets = SecretsClient::new(channel.clone());
    let id = create(&mut ds, "poll-rotate", "http_poll").await;
    put_token(&mut secrets, &id, "first-token-5d1e").await;
    let (source, seen) = recording_source().await;
    let (v1, _) = publish(
        &mut ds,
        &id,
        serde_json::json!({ "url": source, "bearer_secret": "token", "interval_ms": 100 }),
    )
    .await;
    wait_for_bearer(&seen, "first-token-5d1e").await;

    // A rotation reaches the worker that is running, without a restart or a publish.
    put_token(&mut secrets, &id, "second-token-77ab").await;
    wait_for_bearer(&seen, "second-token-77ab").await;

    // Deleting the secret the published version needs is answered with a warning naming it.
    let deleted = secrets
        .delete_secret(pb::DeleteSecretRequest {
            datasource_id: id.clone(),
            name: "token".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted, "{deleted:?}");
    assert!(
        deleted
            .warning
            .contains(&format!("published version {v1} needs secret token")),
        "{deleted:?}"
    );
    assert!(!deleted.warning.contains("second-token"), "{deleted:?}");

    // A fresh instance cannot build the worker without it: the state says so.
    app.stop().await.unwrap();
    let (app, channel) = serve(&db).await;
    let life = LifecycleClient::new(channel.clone());
    let mut secrets = SecretsClient::new(channel);
    let status = pb::GetStatusRequest {
        datasource_id: id.clone(),
    };
    let failed = wait_for(
        "the worker to fail for the secret",
        Duration::from_secs(60),
        || {
            let mut life = life.clone();
            let status = status.clone();
            async move {
                let s = life.get_status(status).await.unwrap().into_inner();
                (s.status == pb::WorkerStatus::Error as i32).then_some(s)
            }
        },
    )
    .await;
    assert!(failed.error_message.contains("token"), "{failed:?}");

    // Putting it back revives the worker, with the new value, and no restart call.
    put_token(&mut secrets, &id, "third-token-0c4f").await;
    wait_for_bearer(&seen, "third-token-0c4f").await;
    running_on(&life, &status, v1, "the worker to run again").await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn update_version_edits_drafts_only_and_leaves_a_published_comment_alone() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let mut ds = DatasourcesClient::new(channel);
    let id = create(&mut ds, "edit-published", "generator").await;
    let config = serde_json::json!({ "rate_per_sec": 1, "template": { "n": 1 } });
    let (v1, _) = publish(&mut ds, &id, config.clone()).await;
    let update = |comment: &str| pb::UpdateVersionRequest {
        datasource_id: id.clone(),
        version: v1,
        config_json: config.to_string(),
        comment: comment.into(),
    };

    let refused = ds
        .update_version(update("rewritten history"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("is published; only a draft can be edited"),
        "{refused:?}"
    );
    let versions = ds
        .list_versions(pb::ListVersionsRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    let published = versions.iter().find(|v| v.version == v1).unwrap();
    assert_eq!(published.comment, "", "{published:?}");

    // A version that does not exist is NOT_FOUND, not a precondition.
    let mut missing = update("x");
    missing.version = v1 + 10;
    let absent = ds.update_version(missing).await.unwrap_err();
    assert_eq!(absent.code(), Code::NotFound, "{absent:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn events_watch_after_id_zero_replays_from_the_first_event_and_an_unknown_type_is_a_usage_error()
 {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel.clone());
    let id = create(&mut ds, "replayed", "generator").await;
    let first = version_events(&db, &id).await;
    assert!(first.is_empty(), "{first:?}");
    let created = db.events(Uuid::parse_str(&id).unwrap()).await[0].id;

    let mut child = dsreg(dir.path())
        .args(["events", "watch", "--datasource", &id, "--after-id", "0"])
        .args(["-o", "json", "--server", &url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the watch prints the history")
        .unwrap()
        .expect("a line");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["id"].as_i64(), Some(created), "{event}");
    assert_eq!(event["type"], "created", "{event}");
    child.kill().await.unwrap();

    for args in [
        &["events", "list", "--type", "publishd"][..],
        &["events", "watch", "--type", "publishd"][..],
    ] {
        let ran = client(dir.path(), &url, args).await;
        assert_eq!(ran.status.code(), Some(2), "{args:?}: {}", ran.stderr);
        assert!(ran.stderr.contains("publishd"), "{}", ran.stderr);
        assert!(ran.stderr.contains("published"), "{}", ran.stderr);
    }
    // The server refuses it too, naming the field, for callers other than the CLI.
    let mut events = dsreg::api::grpc::pb::events_client::EventsClient::new(channel);
    let refused = events
        .list_events(pb::ListEventsRequest {
            types: vec!["publishd".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("types"), "{refused:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn client_flags_are_read_before_the_command_as_after_it() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel);
    let id = create(&mut ds, "global-flags", "generator").await;
    // Before the command, as after it.
    for args in [
        &["-o", "json", "--server", &url, "datasource", "list"][..],
        &["datasource", "list", "-o", "json", "--server", &url],
        &["--output=json", "datasource", "--server", &url, "list"],
    ] {
        let mut command = dsreg(dir.path());
        command.args(args);
        let ran = run(command, None).await;
        assert_eq!(ran.status.code(), Some(0), "{args:?}: {}", ran.stderr);
        let listed: serde_json::Value = serde_json::from_str(ran.stdout.lines().next().unwrap())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", ran.stdout));
        assert_eq!(listed["id"], id.as_str(), "{args:?}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_secret_put_by_the_cli_reaches_the_running_worker_and_its_delete_warns() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel.clone());
    let mut secrets = SecretsClient::new(channel);
    let id = create(&mut ds, "poll-rotate-cli", "http_poll").await;
    put_token(&mut secrets, &id, "first-token-a21c").await;
    let (source, seen) = recording_source().await;
    let (v1, _) = publish(
        &mut ds,
        &id,
        serde_json::json!({ "url": source, "bearer_secret": "token", "interval_ms": 100 }),
    )
    .await;
    wait_for_bearer(&seen, "first-token-a21c").await;

    // `dsreg secret put` rotates it: the running worker sends the new value, with no restart.
    let value = dir.path().join("token.txt");
    std::fs::write(&value, "second-token-e94b").unwrap();
    let put = client(
        dir.path(),
        &url,
        &[
            "secret",
            "put",
            &id,
            "token",
            "--from-file",
            value.to_str().unwrap(),
        ],
    )
    .await;
    put.assert_success();
    wait_for_bearer(&seen, "second-token-e94b").await;

    // `dsreg secret delete` of the secret the published version needs says so.
    let deleted = client(dir.path(), &url, &["secret", "delete", &id, "token"]).await;
    deleted.assert_success();
    assert_eq!(
        deleted.stdout,
        format!(
            "deleted secret token of {id}\nwarning: published version {v1} needs secret token: \
             its worker keeps the credentials it holds, but cannot be restarted or reloaded until \
             the secret is put back\n"
        )
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn dsreg_test_takes_an_ndjson_sample_as_its_records() {
    let db = TestDb::new().await;
    let (app, channel) = serve(&db).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let mut ds = DatasourcesClient::new(channel);
    let id = create(&mut ds, "hook-ndjson", "webhook").await;
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({ "transform": "#{ id: record.n * 2 }" }).to_string(),
    )
    .unwrap();
    // A webhook body as NDJSON: one document a line, a blank line among them.
    let sample = dir.path().join("body.ndjson");
    std::fs::write(&sample, "{\"n\": 1}\n\n{\"n\": 2}\n{\"n\": 3}\n").unwrap();
    let args = [
        "test",
        &id,
        "--config-file",
        config.to_str().unwrap(),
        "--sample-file",
        sample.to_str().unwrap(),
    ];

    let ran = client(dir.path(), &url, &args).await;
    ran.assert_success();
    assert!(
        ran.stdout.starts_with("inputs 3, outputs 3, rejected 0;"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stdout
            .contains("outputs:\n  {\"id\":2}\n  {\"id\":4}\n  {\"id\":6}\n"),
        "{}",
        ran.stdout
    );

    // A broken line is refused before any call, naming the line.
    std::fs::write(&sample, "{\"n\": 1}\n{oops}\n").unwrap();
    let refused = client(dir.path(), &url, &args).await;
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(refused.stderr.contains("line 2"), "{}", refused.stderr);
    app.stop().await.unwrap();
}
