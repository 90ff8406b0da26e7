//! The gRPC API over a real socket with a tonic client: every service's happy path, its bad
//! inputs with the right code and field, lifecycle end to end, the event watch's resume, and
//! the audit trail.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::catalog_client::CatalogClient;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::events_client::EventsClient;
use dsreg::api::grpc::pb::harness_client::HarnessClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::api::grpc::pb::registry_client::RegistryClient;
use dsreg::api::grpc::pb::secrets_client::SecretsClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A registry with secrets enabled, and a channel to its gRPC port.
pub async fn serve(db: &TestDb) -> (TestApp, Channel) {
    let mut settings = test_settings(&db.url);
    settings.master_keys = Some(MASTER_KEYS.to_owned());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC port");
    (app, channel)
}

/// A `generator` datasource `name` in acme/ingest.
pub fn create_req(name: &str) -> pb::CreateDatasourceRequest {
    pb::CreateDatasourceRequest {
        org: "acme".into(),
        project: "ingest".into(),
        name: name.into(),
        kind: "generator".into(),
        owner: "team-data".into(),
        tags: vec!["eu".into()],
        description: "test".into(),
    }
}

fn generator_config(rate: u32) -> String {
    serde_json::json!({ "rate_per_sec": rate, "template": { "n": 1 } }).to_string()
}

/// Creates a generator version emitting `rate` records a second and publishes it.
async fn publish_generator(
    ds: &mut DatasourcesClient<Channel>,
    id: &str,
    rate: u32,
) -> pb::Version {
    let v = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.to_owned(),
            config_json: generator_config(rate),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    ds.publish_version(pb::PublishVersionRequest {
        datasource_id: id.to_owned(),
        version: v.version,
    })
    .await
    .unwrap();
    v
}

/// The field of the first violation in a status's BadRequest details.
fn violated_field(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_else(|| panic!("no field violation in {status:?}"))
}

#[tokio::test]
async fn datasources_create_get_list_update_archive_and_refuse_bad_input() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch);

    let created = ds
        .create_datasource(create_req("orders"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "orders");
    assert_eq!(created.status, pb::DatasourceStatus::Active as i32);
    let got = ds
        .get_datasource(pb::GetDatasourceRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);

    // Bad inputs: the right code and the field to blame.
    let cases: Vec<(pb::CreateDatasourceRequest, Code, &str)> = vec![
        (create_req(""), Code::InvalidArgument, "name"),
        (create_req(&"x".repeat(129)), Code::InvalidArgument, "name"),
        (create_req("bad name"), Code::InvalidArgument, "name"),
        (
            pb::CreateDatasourceRequest {
                kind: "ftp".into(),
                ..create_req("x1")
            },
            Code::InvalidArgument,
            "kind",
        ),
        (
            pb::CreateDatasourceRequest {
                org: String::new(),
                ..create_req("x2")
            },
            Code::InvalidArgument,
            "org",
        ),
        (
            pb::CreateDatasourceRequest {
                tags: vec![String::new()],
                ..create_req("x3")
            },
            Code::InvalidArgument,
            "tags",
        ),
    ];
    for (req, code, field) in cases {
        let err = ds.create_datasource(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert_eq!(violated_field(&err), field);
    }
    let dup = ds
        .create_datasource(create_req("orders"))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let missing = ds
        .get_datasource(pb::GetDatasourceRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let not_uuid = ds
        .get_datasource(pb::GetDatasourceRequest { id: "42".into() })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&not_uuid), "id");

    // Update with the current etag, then a stale one.
    let updated = ds
        .update_datasource(pb::UpdateDatasourceRequest {
            datasource: Some(pb::Datasource {
                id: created.id.clone(),
                owner: "team-ops".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["owner".into()],
            }),
            etag: created.etag.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.owner, "team-ops");
    assert_ne!(updated.etag, created.etag);
    let stale = ds
        .update_datasource(pb::UpdateDatasourceRequest {
            datasource: Some(pb::Datasource {
                id: created.id.clone(),
                owner: "late".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["owner".into()],
            }),
            etag: created.etag.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    let bad_mask = ds
        .update_datasource(pb::UpdateDatasourceRequest {
            datasource: Some(pb::Datasource {
                id: created.id.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into()],
            }),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&bad_mask), "update_mask");

    let archived = ds
        .archive_datasource(pb::ArchiveDatasourceRequest {
            id: created.id.clone(),
            etag: updated.etag,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(archived.status, pb::DatasourceStatus::Archived as i32);
    // The name is free again.
    ds.create_datasource(create_req("orders")).await.unwrap();
}

#[tokio::test]
async fn lists_page_through_every_datasource_once_and_refuse_bad_tokens() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch);
    for i in 0..25 {
        ds.create_datasource(create_req(&format!("ds-{i:02}")))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ds
            .list_datasources(pb::ListDatasourcesRequest {
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.datasources.len() <= 10);
        seen.extend(page.datasources.into_iter().map(|d| d.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("ds-{i:02}")).collect();
    assert_eq!(seen, expected);

    let filtered = ds
        .list_datasources(pb::ListDatasourcesRequest {
            name_prefix: "ds-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.datasources.len(), 10);

    let garbage = ds
        .list_datasources(pb::ListDatasourcesRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&garbage), "page_token");
    // A token from one filter is refused under another.
    let first = ds
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let other = ds
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 5,
            tag: "eu".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&other), "page_token");
    let size = ds
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&size), "page_size");
}

#[tokio::test]
async fn versions_publish_over_grpc_and_the_worker_runs_the_answered_state() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut life = LifecycleClient::new(ch);
    let created = ds
        .create_datasource(create_req("orders"))
        .await
        .unwrap()
        .into_inner();
    let id = created.id.clone();

    // Bad configs name their field.
    let broken = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: "{\"rate_per_sec\": ".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&broken), "config_json");
    let wrong = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: "{\"rate_per_sec\": \"fast\"}".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    assert_eq!(
        violated_field(&wrong),
        "config_json.rate_per_sec",
        "{wrong:?}"
    );
    // A key the kind does not have is named by itself, not by the object holding it.
    let unknown = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: "{\"rate_per_sec\": 1, \"rate_per_second\": 2}".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(
        violated_field(&unknown),
        "config_json.rate_per_second",
        "{unknown:?}"
    );
    let huge = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: format!("{{\"x\": \"{}\"}}", "a".repeat(1_100_000)),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::InvalidArgument, "{huge:?}");

    let v1 = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: generator_config(5),
            comment: "first".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1.state, pb::VersionState::Draft as i32);
    let v1 = ds
        .update_version(pb::UpdateVersionRequest {
            datasource_id: id.clone(),
            version: v1.version,
            config_json: generator_config(10),
            comment: "edited".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1.comment, "edited");

    let mut publish = tonic::Request::new(pb::PublishVersionRequest {
        datasource_id: id.clone(),
        version: v1.version,
    });
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    publish
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let published = ds.publish_version(publish).await.unwrap().into_inner();
    assert!(published.event_id > 0);
    // Drafts only: a published version is no longer editable.
    let edit = ds
        .update_version(pb::UpdateVersionRequest {
            datasource_id: id.clone(),
            version: v1.version,
            config_json: generator_config(1),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(edit.code(), Code::FailedPrecondition);

    let ds_id: uuid::Uuid = id.parse().unwrap();
    let events = db.events(ds_id).await;
    let event = events
        .iter()
        .find(|e| e.id == published.event_id)
        .expect("the publish event");
    assert_eq!(event.traceparent.as_deref(), Some(traceparent));
    assert_eq!(event.actor, "anonymous");

    // The lifecycle answers with the state the worker reached.
    let running = wait_for("worker running on v1", Duration::from_secs(15), || {
        let mut life = life.clone();
        let id = id.clone();
        async move {
            let s = life
                .get_status(pb::GetStatusRequest { datasource_id: id })
                .await
                .ok()?
                .into_inner();
            (s.status == pb::WorkerStatus::Running as i32).then_some(s)
        }
    })
    .await;
    assert_eq!(running.running_version, v1.version);

    let stopped = life
        .stop_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stopped.settled, "{stopped:?}");
    assert_eq!(stopped.status, pb::WorkerStatus::Stopped as i32);
    assert!(!stopped.desired_running);
    let again = life
        .stop_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.status,
        pb::WorkerStatus::Stopped as i32,
        "stop is idempotent"
    );
    let started = life
        .start_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(started.settled, "{started:?}");
    assert_eq!(started.status, pb::WorkerStatus::Running as i32);
    let restarted = life
        .restart_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        restarted.settled && restarted.status == pb::WorkerStatus::Running as i32,
        "{restarted:?}"
    );
    assert!(restarted.updated_at.unwrap().seconds >= started.updated_at.unwrap().seconds);
    let reloaded = life
        .reload_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reloaded.settled);
    let backfill = life
        .backfill(pb::BackfillRequest {
            datasource_id: id.clone(),
            from_cursor_json: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        backfill.code(),
        Code::FailedPrecondition,
        "the generator cannot backfill"
    );

    // Roll forward and back.
    publish_generator(&mut ds, &id, 20).await;
    let back = ds
        .rollback_version(pb::RollbackVersionRequest {
            datasource_id: id.clone(),
            to_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.version, v1.version);
    let never = ds
        .rollback_version(pb::RollbackVersionRequest {
            datasource_id: id.clone(),
            to_version: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(never.code(), Code::NotFound);
    let listed = ds
        .list_versions(pb::ListVersionsRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![2, 1]
    );

    let metrics = life
        .get_datasource_metrics(pb::GetStatusRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metrics.datasource_id, id);
}

#[tokio::test]
async fn a_version_needing_a_missing_secret_is_not_published() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut secrets = SecretsClient::new(ch);
    let created = ds
        .create_datasource(pb::CreateDatasourceRequest {
            kind: "http_poll".into(),
            ..create_req("api")
        })
        .await
        .unwrap()
        .into_inner();
    let config = serde_json::json!({
        "url": "http://127.0.0.1:9/items",
        "interval_ms": 1000,
        "bearer_secret": "api_token"
    });
    let v = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: created.id.clone(),
            config_json: config.to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let refused = ds
        .publish_version(pb::PublishVersionRequest {
            datasource_id: created.id.clone(),
            version: v.version,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // Named by the key the user wrote, the secret by its name.
    assert_eq!(violated_field(&refused), "config_json.bearer_secret");
    assert!(
        refused.message().contains("\"api_token\""),
        "{}",
        refused.message()
    );

    let canary = format!("canary-{}", uuid::Uuid::new_v4());
    let meta = secrets
        .put_secret(pb::PutSecretRequest {
            datasource_id: created.id.clone(),
            name: "api_token".into(),
            value: canary.clone().into_bytes(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.key_version, 1);
    let listed = secrets
        .list_secrets(pb::ListSecretsRequest {
            datasource_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.secrets.len(), 1);
    assert!(!format!("{listed:?}").contains(&canary));
    let bad = secrets
        .put_secret(pb::PutSecretRequest {
            datasource_id: created.id.clone(),
            name: "bad name".into(),
            value: b"x".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&bad), "name");
    let big = secrets
        .put_secret(pb::PutSecretRequest {
            datasource_id: created.id.clone(),
            name: "big".into(),
            value: vec![b'a'; 70_000],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&big), "value");
    ds.publish_version(pb::PublishVersionRequest {
        datasource_id: created.id.clone(),
        version: v.version,
    })
    .await
    .unwrap();
    let deleted = secrets
        .delete_secret(pb::DeleteSecretRequest {
            datasource_id: created.id.clone(),
            name: "api_token".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);

    // The audit trail: secrets appear as changed, never with their value.
    let rows = db
        .client()
        .await
        .query(
            "SELECT action, outcome, coalesce(diff::text, '') FROM audit_log ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let actions: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(actions.contains(&("PutSecret".into(), "ok".into())));
    assert!(actions.contains(&("PublishVersion".into(), "error".into())));
    assert!(actions.contains(&("PublishVersion".into(), "ok".into())));
    for r in &rows {
        assert!(!r.get::<_, String>(2).contains(&canary));
    }
}

#[tokio::test]
async fn watch_events_resumes_from_the_last_id_with_no_gap_and_no_duplicate() {
    // The feed waits for every transaction on its server that may hold a lower id: a server of
    // its own, so other tests' transactions do not hold it back.
    let server = crate::helpers::OwnServer::start().await;
    let db = server.db().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut events = EventsClient::new(ch.clone());
    let created = ds
        .create_datasource(create_req("orders"))
        .await
        .unwrap()
        .into_inner();
    let id = created.id.clone();
    // Each restart request writes one event of the datasource.
    let restarts = {
        let life = LifecycleClient::new(ch.clone());
        let id = id.clone();
        move |n: usize| {
            let mut life = life.clone();
            let id = id.clone();
            async move {
                for _ in 0..n {
                    life.restart_worker(pb::LifecycleRequest {
                        datasource_id: id.clone(),
                    })
                    .await
                    .unwrap();
                }
            }
        }
    };
    restarts(5).await;
    let mut first = events
        .watch_events(pb::WatchEventsRequest {
            datasource_id: id.clone(),
            types: vec![],
            after_id: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    // Concurrent writers while the client reads, disconnects and resumes.
    let writers = tokio::spawn(async move {
        tokio::join!(restarts(20), async {
            let mut other = DatasourcesClient::new(ch.clone());
            for i in 0..20 {
                other
                    .create_datasource(create_req(&format!("noise-{i}")))
                    .await
                    .unwrap();
            }
        });
    });
    let mut got = Vec::new();
    while got.len() < 8 {
        let e = tokio::time::timeout(Duration::from_secs(60), first.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(e.id);
    }
    drop(first);
    let mut resumed = events
        .watch_events(pb::WatchEventsRequest {
            datasource_id: id.clone(),
            types: vec![],
            after_id: Some(*got.last().unwrap()),
        })
        .await
        .unwrap()
        .into_inner();
    writers.await.unwrap();
    let all: Vec<i64> = db
        .events(id.parse().unwrap())
        .await
        .iter()
        .map(|e| e.id)
        .filter(|i| *i > 1)
        .collect();
    while got.len() < all.len() {
        let Ok(e) = tokio::time::timeout(Duration::from_secs(60), resumed.message()).await else {
            let missing: Vec<_> = all.iter().filter(|i| !got.contains(i)).collect();
            panic!("no event within 60 s; got {got:?}, the table has {all:?}, missing {missing:?}");
        };
        got.push(e.unwrap().unwrap().id);
    }
    assert_eq!(got, all, "every event once, in id order");

    // History pages.
    let page = events
        .list_events(pb::ListEventsRequest {
            datasource_id: id.clone(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 10);
    assert!(!page.next_page_token.is_empty());
    let bad = events
        .list_events(pb::ListEventsRequest {
            page_token: "zzz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&bad), "page_token");
}

#[tokio::test]
async fn harness_catalog_and_registry_answer() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let created = ds
        .create_datasource(pb::CreateDatasourceRequest {
            kind: "webhook".into(),
            ..create_req("hook")
        })
        .await
        .unwrap()
        .into_inner();
    let config = serde_json::json!({ "transform": "#{ id: record.n * 2 }" });
    let report = HarnessClient::new(ch.clone())
        .run_test(pb::RunTestRequest {
            datasource_id: created.id.clone(),
            config_json: config.to_string(),
            samples_json: vec!["[{\"n\": 1}, {\"n\": 2}]".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.inputs, 2);
    assert_eq!(report.outputs_json, vec!["{\"id\":2}", "{\"id\":4}"]);
    let bad_sample = HarnessClient::new(ch.clone())
        .run_test(pb::RunTestRequest {
            datasource_id: created.id.clone(),
            config_json: config.to_string(),
            samples_json: vec!["{".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&bad_sample), "samples_json[0]");

    let kinds = CatalogClient::new(ch.clone())
        .list_kinds(pb::ListKindsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = kinds.kinds.iter().map(|k| k.name.as_str()).collect();
    assert!(
        names.contains(&"generator") && names.contains(&"http_poll") && names.contains(&"webhook")
    );
    let health = CatalogClient::new(ch.clone())
        .get_kind_health(pb::GetKindHealthRequest {
            kind: "generator".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(health.healthy);
    let unknown = CatalogClient::new(ch.clone())
        .get_kind_health(pb::GetKindHealthRequest { kind: "ftp".into() })
        .await
        .unwrap_err();
    assert_eq!(violated_field(&unknown), "kind");

    let metrics = RegistryClient::new(ch.clone())
        .get_registry_metrics(pb::GetRegistryMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metrics.datasources, 1);
    assert!(metrics.listener_connected);
    let info = RegistryClient::new(ch)
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.schema_version, dsreg::db::migrations::latest_known());
}

#[tokio::test]
async fn a_database_that_is_down_is_unavailable_and_not_ready_and_recovers() {
    let db = TestDb::new().await;
    let (app, ch) = serve(&db).await;
    let http = app.http_addr.to_string();
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let serving = || {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status)
                .ok()
        }
    };
    let mut ds = DatasourcesClient::new(ch);
    let created = ds
        .create_datasource(create_req("orders"))
        .await
        .unwrap()
        .into_inner();
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let admin = dsreg::db::connect(&crate::helpers::with_database(&db.url, "postgres"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
        ))
        .await
        .unwrap();
    let get = || {
        let mut ds = ds.clone();
        let id = created.id.clone();
        async move { ds.get_datasource(pb::GetDatasourceRequest { id }).await }
    };
    let down = wait_for("UNAVAILABLE", Duration::from_secs(60), || async {
        get().await.err().filter(|e| e.code() == Code::Unavailable)
    })
    .await;
    assert!(
        !down.message().contains(&name),
        "internal detail leaked: {down:?}"
    );
    let (code, body) = wait_for("/readyz failing", Duration::from_secs(60), || async {
        let (code, body) = crate::serve::http_get(&http, "/readyz").await;
        (code == 503).then_some((code, body))
    })
    .await;
    assert!(body.contains("not ready"), "{code} {body}");
    wait_for(
        "gRPC health NOT_SERVING",
        Duration::from_secs(60),
        || async { (serving().await == Some(NOT_SERVING)).then_some(()) },
    )
    .await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
    wait_for("recovery", Duration::from_secs(60), || async {
        get().await.ok()
    })
    .await;
    wait_for("/readyz passing again", Duration::from_secs(15), || async {
        (crate::serve::http_get(&http, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    wait_for(
        "gRPC health SERVING again",
        Duration::from_secs(60),
        || async { (serving().await == Some(SERVING)).then_some(()) },
    )
    .await;
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

#[tokio::test]
async fn an_oversized_message_is_refused() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch);
    let created = ds
        .create_datasource(create_req("orders"))
        .await
        .unwrap()
        .into_inner();
    let err = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: created.id,
            config_json: "x".repeat(dsreg::api::grpc::MAX_MESSAGE_BYTES + 1),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
}

/// Every service the port serves, as reflection lists it and health names it.
const SERVED: &[&str] = &[
    "dsreg.v1.Datasources",
    "dsreg.v1.Lifecycle",
    "dsreg.v1.Harness",
    "dsreg.v1.Events",
    "dsreg.v1.Secrets",
    "dsreg.v1.Audit",
    "dsreg.v1.Catalog",
    "dsreg.v1.Registry",
    "dsreg.v1.DeadLetters",
];

#[tokio::test]
async fn health_answers_for_the_server_and_for_each_service_by_name_without_a_token() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    for service in std::iter::once("").chain(SERVED.iter().copied()) {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e:?}"))
            .into_inner();
        assert_eq!(answer.status, SERVING, "{service:?}");
    }
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dsreg.v1.Nothing".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
}

/// Reflection v1 and v1alpha answer a `grpcurl list` and a `grpcurl describe` alike, without
/// a token: the request each version's generated client sends, and the services each lists.
macro_rules! reflect {
    ($version:ident, $ch:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("dsreg.v1.Datasources".to_owned()),
        ]
        .map(|message| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        });
        let mut stream = ServerReflectionClient::new($ch)
            .server_reflection_info(futures_util::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("not a list of services");
        };
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("not the file of dsreg.v1.Datasources");
        };
        let files: Vec<prost_types::FileDescriptorProto> = files
            .file_descriptor_proto
            .iter()
            .map(|b| prost::Message::decode(b.as_slice()).unwrap())
            .collect();
        let described = files.iter().any(|f| {
            f.package() == "dsreg.v1" && f.service.iter().any(|s| s.name() == "Datasources")
        });
        assert!(
            described,
            "Datasources not described by {}",
            stringify!($version)
        );
        list.service
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<String>>()
    }};
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_and_describe_every_service_without_a_token() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let v1alpha = reflect!(v1alpha, ch.clone());
    let mut v1 = reflect!(v1, ch);
    for service in SERVED.iter().chain(&[
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        assert!(
            v1alpha.iter().any(|n| n == service),
            "{service} in {v1alpha:?}"
        );
    }
    let mut sorted = v1alpha.clone();
    sorted.sort();
    v1.sort();
    assert_eq!(v1, sorted, "v1 and v1alpha list the same services");
}

/// Idle streams re-read together at the shared clock's tick: a change that wakes no one (a
/// heartbeat written by SQL, no notification) reaches every idle stream of every datasource,
/// and each answer carries the datasource's dead-letter count.
#[tokio::test]
async fn idle_watch_status_streams_see_a_change_no_one_notified() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut streams = Vec::new();
    for n in 0..10 {
        let id = ds
            .create_datasource(create_req(&format!("idle-{n}")))
            .await
            .unwrap()
            .into_inner()
            .id;
        for _ in 0..3 {
            let mut watch = LifecycleClient::new(ch.clone())
                .watch_status(pb::GetStatusRequest {
                    datasource_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let first = watch.message().await.unwrap().unwrap();
            assert_eq!(first.dead_letters, Some(0), "{first:?}");
            assert_eq!(first.last_heartbeat_at, None, "{first:?}");
            streams.push(watch);
        }
    }
    let written = db
        .client()
        .await
        .execute(
            "UPDATE datasource_state SET last_heartbeat_at = now()
             WHERE datasource_id IN (SELECT id FROM datasources WHERE name LIKE 'idle-%')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(written, 10);
    // Other changes (the datasource's lease being claimed) may come first; the heartbeat must
    // follow on every stream.
    for watch in &mut streams {
        let seen = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let next = watch.message().await.unwrap().unwrap();
                if next.last_heartbeat_at.is_some() {
                    return next;
                }
            }
        })
        .await
        .expect("the heartbeat within a re-read tick");
        assert_eq!(seen.dead_letters, Some(0), "{seen:?}");
    }
}

#[tokio::test]
async fn watch_status_streams_the_state_then_every_change() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut life = LifecycleClient::new(ch.clone());
    let created = ds
        .create_datasource(create_req("orders"))
        .await
        .unwrap()
        .into_inner();
    let id = created.id.clone();
    let mut watch = life
        .watch_status(pb::GetStatusRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, pb::WorkerStatus::Init as i32);
    let v = publish_generator(&mut ds, &id, 5).await;
    let mut seen = Vec::new();
    while !seen.contains(&(pb::WorkerStatus::Running as i32)) {
        let next = tokio::time::timeout(Duration::from_secs(60), watch.message())
            .await
            .expect("a change within 10 s")
            .unwrap()
            .unwrap();
        seen.push(next.status);
    }
    life.stop_worker(pb::LifecycleRequest {
        datasource_id: id.clone(),
    })
    .await
    .unwrap();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(60), watch.message())
            .await
            .expect("a change within 10 s")
            .unwrap()
            .unwrap();
        if next.status == pb::WorkerStatus::Stopped as i32 {
            assert!(!next.desired_running);
            break;
        }
    }
    // An unknown id is an error, not an empty stream.
    let unknown = life
        .watch_status(pb::GetStatusRequest {
            datasource_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // Event history filters by type and time.
    let mut events = EventsClient::new(ch);
    let published = events
        .list_events(pb::ListEventsRequest {
            datasource_id: id.clone(),
            types: vec!["published".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.events.len(), 1);
    assert_eq!(published.events[0].version, v.version);
    let future = events
        .list_events(pb::ListEventsRequest {
            datasource_id: id,
            since: Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() + 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(future.events.is_empty());
}

#[tokio::test]
async fn concurrent_status_reads_each_get_their_own_datasource() {
    let db = TestDb::new().await;
    let (_app, ch) = serve(&db).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut ids = Vec::new();
    for i in 0..30 {
        let created = ds
            .create_datasource(create_req(&format!("ds-{i}")))
            .await
            .unwrap()
            .into_inner();
        ids.push(created.id);
    }
    // Every datasource read by five callers at once, among unknown ids: reads that share a
    // statement must each get their own row, and an unknown id its NOT_FOUND.
    let unknown: Vec<String> = (0..10).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let asked: Vec<String> = ids
        .iter()
        .cycle()
        .take(ids.len() * 5)
        .chain(&unknown)
        .cloned()
        .collect();
    let calls = asked.iter().map(|id| {
        let mut life = LifecycleClient::new(ch.clone());
        let id = id.clone();
        async move {
            let answer = life
                .get_status(pb::GetStatusRequest {
                    datasource_id: id.clone(),
                })
                .await;
            (id, answer)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert_eq!(answers.len(), asked.len());
    for (id, answer) in answers {
        if unknown.contains(&id) {
            assert_eq!(answer.unwrap_err().code(), Code::NotFound, "{id}");
        } else {
            let state = answer.unwrap().into_inner();
            assert_eq!(state.datasource_id, id);
            assert_eq!(state.status, pb::WorkerStatus::Init as i32);
        }
    }
}
