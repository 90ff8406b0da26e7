//! Authentication, RBAC and tenancy over a real socket: every RPC of the proto files called
//! with every kind of credential gets the code its documented role implies, and every denial
//! is audited; another tenant's datasource is NOT_FOUND from every RPC that takes an id, and
//! lists never show it.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dsreg::api::grpc::auth::issue_token;
use dsreg::api::grpc::pb;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{RawCodec, TestApp, TestDb};

const SECRET: &[u8] = b"rbac-test-secret-0123456789abcdef-0123456789";
const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A registry that verifies HS256 tokens of issuer `test` for audience `dsreg`.
async fn serve(db: &TestDb) -> (TestApp, Channel, tempfile::TempDir) {
    let (mut settings, dir) = crate::helpers::hs256_settings(db, SECRET);
    settings.master_keys = Some(MASTER_KEYS.into());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (app, channel, dir)
}

fn claims(role: &str, org: &str, projects: Option<&[&str]>) -> serde_json::Value {
    let mut c = serde_json::json!({
        "sub": format!("{role}@{org}"), "iss": "test", "aud": "dsreg", "org": org,
        "roles": [role], "exp": chrono::Utc::now().timestamp() + 600,
    });
    if let Some(p) = projects {
        c["projects"] = serde_json::json!(p);
    }
    c
}

fn token(role: &str, org: &str) -> String {
    issue_token(SECRET, &claims(role, org, None))
}

/// The credentials of the matrix and whether each is a valid token with a role.
fn credentials() -> Vec<(&'static str, Option<String>, Option<u8>)> {
    let mut expired = claims("datasource:admin", "acme", None);
    expired["exp"] = serde_json::json!(chrono::Utc::now().timestamp() - 3600);
    let mut audience = claims("datasource:admin", "acme", None);
    audience["aud"] = serde_json::json!("another-service");
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("datasource:admin", "acme", None).to_string())
    );
    vec![
        ("no token", None, None),
        ("expired", Some(issue_token(SECRET, &expired)), None),
        ("wrong audience", Some(issue_token(SECRET, &audience)), None),
        ("alg none", Some(alg_none), None),
        (
            "wrong key",
            Some(issue_token(
                b"another-secret-0123456789abcdef-0123456789",
                &claims("datasource:admin", "acme", None),
            )),
            None,
        ),
        ("viewer", Some(token("datasource:viewer", "acme")), Some(0)),
        (
            "operator",
            Some(token("datasource:operator", "acme")),
            Some(1),
        ),
        ("admin", Some(token("datasource:admin", "acme")), Some(2)),
    ]
}

/// Every RPC of the proto files as (`/dsreg.v1.Service/Method`, the rank of the role its doc
/// comment names: 0 viewer, 1 operator, 2 admin).
fn rpcs() -> Vec<(String, u8)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/dsreg/v1");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut service = String::new();
        let mut doc = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap().to_owned();
            } else if let Some(comment) = line.strip_prefix("//") {
                doc.push_str(comment);
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim();
                let rank = if doc.contains("Admin.") {
                    2
                } else if doc.contains("Operator.") {
                    1
                } else {
                    0
                };
                out.push((format!("/dsreg.v1.{service}/{method}"), rank));
                doc.clear();
            } else {
                doc.clear();
            }
        }
    }
    out.sort();
    out
}

/// Calls `path` with a body whose field 1 is `first` (every dsreg request is fine with that:
/// field 1 is an id, a name or absent), with `token`; returns the status code.
async fn call(channel: &Channel, path: &str, token: Option<&str>, first: &str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut body = vec![0x0a, u8::try_from(first.len()).unwrap()];
    body.extend_from_slice(first.as_bytes());
    let mut request = tonic::Request::new(body);
    request.set_timeout(Duration::from_secs(5));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path: tonic::codegen::http::uri::PathAndQuery = path.parse().unwrap();
    let streaming = path.path().contains("Watch");
    if streaming {
        match grpc.server_streaming(request, path, RawCodec).await {
            Ok(mut stream) => stream
                .get_mut()
                .message()
                .await
                .err()
                .map_or(Code::Ok, |s| s.code()),
            Err(s) => s.code(),
        }
    } else {
        grpc.unary(request, path, RawCodec)
            .await
            .err()
            .map_or(Code::Ok, |s| s.code())
    }
}

/// Denied calls audited so far (denials are aggregated: a row counts several).
async fn denied_rows(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT coalesce(sum(count), 0)::bigint FROM audit_log WHERE outcome = 'denied'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits (bounded) until at least `n` denials are audited (they are written off the answer's
/// path); returns how many are.
async fn denied_at_least(db: &TestDb, n: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = denied_rows(db).await;
        if now >= n || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn every_rpc_with_every_credential_gets_its_code_and_every_denial_is_audited() {
    let db = TestDb::new().await;
    let (_app, channel, _dir) = serve(&db).await;
    let rpcs = rpcs();
    assert_eq!(rpcs.len(), 38, "the proto files list every RPC: {rpcs:?}");
    // An id nobody has: allowed calls answer NOT_FOUND or INVALID_ARGUMENT, never a denial.
    let nobody = uuid::Uuid::new_v4().to_string();
    let mut failures = Vec::new();
    for (path, needed) in &rpcs {
        for (who, token, rank) in credentials() {
            let before = denied_rows(&db).await;
            let code = call(&channel, path, token.as_deref(), &nobody).await;
            let expected_denial = match rank {
                None => Some(Code::Unauthenticated),
                Some(r) if r < *needed => Some(Code::PermissionDenied),
                Some(_) => None,
            };
            let ok = match expected_denial {
                Some(c) => code == c,
                None => !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
            };
            let audited =
                denied_at_least(&db, before + i64::from(expected_denial.is_some())).await - before;
            if !ok || audited != i64::from(expected_denial.is_some()) {
                failures.push(format!(
                    "{path} as {who}: {code:?}, expected {expected_denial:?}; {audited} denial rows"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Denials name the caller when the token verified.
    let actors: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT DISTINCT actor FROM audit_log WHERE outcome = 'denied' ORDER BY actor",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(actors.contains(&"anonymous".to_owned()), "{actors:?}");
    assert!(
        actors.contains(&"datasource:viewer@acme".to_owned()),
        "{actors:?}"
    );
}

#[tokio::test]
async fn another_tenants_datasource_is_not_found_from_every_rpc_and_never_listed() {
    use pb::datasources_client::DatasourcesClient;
    let db = TestDb::new().await;
    let (_app, channel, _dir) = serve(&db).await;
    let with = |t: String| {
        move |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
            Ok(r)
        }
    };
    let platform = token("datasource:admin", "*");
    let mut root = DatasourcesClient::with_interceptor(channel.clone(), with(platform));
    let theirs = root
        .create_datasource(pb::CreateDatasourceRequest {
            org: "globex".into(),
            project: "ingest".into(),
            name: "secret-project".into(),
            kind: "generator".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let config = serde_json::json!({ "rate_per_sec": 0, "template": {} }).to_string();
    root.create_version(pb::CreateVersionRequest {
        datasource_id: theirs.id.clone(),
        config_json: config.clone(),
        comment: String::new(),
    })
    .await
    .unwrap();
    let acme = token("datasource:admin", "acme");
    let mut mine = DatasourcesClient::with_interceptor(channel.clone(), with(acme.clone()));
    mine.create_datasource(pb::CreateDatasourceRequest {
        org: "acme".into(),
        project: "ingest".into(),
        name: "ours".into(),
        kind: "generator".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Every RPC whose request starts with a datasource id, by path.
    let before = denied_rows(&db).await;
    let mut leaks = Vec::new();
    let mut id_rpcs = 0;
    for (path, _) in rpcs() {
        let takes_id = !path.contains("/Create")
            && !path.contains("/List")
            && !path.starts_with("/dsreg.v1.Registry/")
            && !path.starts_with("/dsreg.v1.Catalog/")
            && !path.contains("UpdateDatasource")
            // Selects by filter; its tenancy is checked with full requests below.
            && !path.contains("RestartWorkers")
            || path.contains("ListVersions")
            || path.contains("ListSecrets")
            || path.contains("ListEvents")
            || path.contains("ListDeadLetters")
            || path.contains("CreateVersion");
        if !takes_id {
            continue;
        }
        id_rpcs += 1;
        let code = call(&channel, &path, Some(&acme), &theirs.id).await;
        // These check their other fields first; their id checks are covered with full
        // requests below.
        let validated_first = [
            "CreateVersion",
            "UpdateVersion",
            "PublishVersion",
            "RunTest",
        ]
        .iter()
        .any(|m| path.ends_with(m));
        if code != Code::NotFound && !validated_first {
            leaks.push(format!("{path}: {code:?}"));
        }
    }
    assert!(id_rpcs >= 20, "{id_rpcs}");
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
    // A restart by filter never selects another tenant's datasource, named or not.
    let mut lifecycle = pb::lifecycle_client::LifecycleClient::with_interceptor(
        channel.clone(),
        with(acme.clone()),
    );
    for request in [
        pb::RestartWorkersRequest {
            datasource_ids: vec![theirs.id.clone()],
            ..Default::default()
        },
        pb::RestartWorkersRequest {
            org: "globex".into(),
            ..Default::default()
        },
        pb::RestartWorkersRequest {
            kind: "generator".into(),
            dry_run: true,
            ..Default::default()
        },
    ] {
        let answer = lifecycle
            .restart_workers(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(
            answer.workers.iter().all(|w| w.datasource_id != theirs.id),
            "{request:?} selected another tenant's datasource: {answer:?}"
        );
    }
    let created = mine
        .create_version(pb::CreateVersionRequest {
            datasource_id: theirs.id.clone(),
            config_json: config.clone(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(created.code(), Code::NotFound);
    let edited = mine
        .update_version(pb::UpdateVersionRequest {
            datasource_id: theirs.id.clone(),
            version: 1,
            config_json: config.clone(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(edited.code(), Code::NotFound);
    let published = mine
        .publish_version(pb::PublishVersionRequest {
            datasource_id: theirs.id.clone(),
            version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(published.code(), Code::NotFound);
    let updated = mine
        .update_datasource(pb::UpdateDatasourceRequest {
            datasource: Some(pb::Datasource {
                id: theirs.id.clone(),
                owner: "mallory".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["owner".into()],
            }),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(updated.code(), Code::NotFound);
    let tested =
        pb::harness_client::HarnessClient::with_interceptor(channel.clone(), with(acme.clone()))
            .run_test(pb::RunTestRequest {
                datasource_id: theirs.id.clone(),
                config_json: config.clone(),
                samples_json: vec!["{}".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(tested.code(), Code::NotFound);
    // Refusals by tenant are audited as denied.
    assert!(denied_at_least(&db, before + id_rpcs).await - before >= id_rpcs);

    // Lists never show it, whatever the filters; creating in another tenant is refused.
    let listed = mine
        .list_datasources(pb::ListDatasourcesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .datasources
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        vec!["ours"]
    );
    let asked = mine
        .list_datasources(pb::ListDatasourcesRequest {
            org: "globex".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(asked.datasources.is_empty());
    let events =
        pb::events_client::EventsClient::with_interceptor(channel.clone(), with(acme.clone()))
            .list_events(pb::ListEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(
        events.events.iter().all(|e| e.datasource_id != theirs.id),
        "another tenant's events listed"
    );
    let foreign = mine
        .create_datasource(pb::CreateDatasourceRequest {
            org: "globex".into(),
            project: "ingest".into(),
            name: "planted".into(),
            kind: "generator".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::PermissionDenied);

    // A page token of the platform admin's listing does not work for acme.
    let page = root
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!page.next_page_token.is_empty());
    let replayed = mine
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), Code::InvalidArgument);

    // A token limited to one project sees only that project.
    let narrow = issue_token(
        SECRET,
        &claims("datasource:viewer", "acme", Some(&["other"])),
    );
    let none = DatasourcesClient::with_interceptor(channel.clone(), with(narrow))
        .list_datasources(pb::ListDatasourcesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(none.datasources.is_empty());
}
