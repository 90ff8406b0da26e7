//! `ValidateConfig` and `dsreg validate` over a real socket and through the real binary: every
//! problem of a config at once, each naming its key, the secrets it needs, nothing written;
//! bad input refused naming the field; another tenant's datasource not found.

use dsreg::api::grpc::auth::issue_token;
use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::catalog_client::CatalogClient;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::helpers::{TestApp, TestDb};

const SECRET: &[u8] = b"validate-test-secret-0123456789abcdef-012345";

/// A registry that verifies HS256 tokens (issuer `test`, audience `dsreg`) and a channel to it.
pub(crate) async fn serve(db: &TestDb) -> (TestApp, Channel, tempfile::TempDir) {
    let (mut settings, dir) = crate::helpers::hs256_settings(db, SECRET);
    settings.master_keys = Some("1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (app, channel, dir)
}

/// A token of `role` in `org`.
pub(crate) fn token(role: &str, org: &str) -> String {
    issue_token(
        SECRET,
        &serde_json::json!({
            "sub": format!("{role}@{org}"), "iss": "test", "aud": "dsreg", "org": org,
            "roles": [role], "exp": chrono::Utc::now().timestamp() + 600,
        }),
    )
}

/// Adds a bearer token to every request.
pub(crate) type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

/// A channel that sends a bearer token.
pub(crate) type Authed = tonic::service::interceptor::InterceptedService<Channel, AddToken>;

/// The interceptor that sends `token`.
pub(crate) fn bearer(token: String) -> AddToken {
    Box::new(move |mut r: tonic::Request<()>| {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        Ok(r)
    })
}

fn catalog(channel: &Channel, token: String) -> CatalogClient<Authed> {
    CatalogClient::with_interceptor(channel.clone(), bearer(token))
}

pub(crate) fn datasources(channel: &Channel, token: String) -> DatasourcesClient<Authed> {
    DatasourcesClient::with_interceptor(channel.clone(), bearer(token))
}

/// Rows in every table a call could write.
async fn written(db: &TestDb) -> Vec<i64> {
    let client = db.client().await;
    let mut counts = Vec::new();
    for table in [
        "datasources",
        "datasource_versions",
        "datasource_events",
        "datasource_state",
        "audit_log",
    ] {
        counts.push(
            client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0),
        );
    }
    counts
}

fn violated(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_config_with_three_mistakes_gives_three_problems_and_writes_nothing() {
    let db = TestDb::new().await;
    let (_app, channel, _dir) = serve(&db).await;
    let mut viewer = catalog(&channel, token("datasource:viewer", "acme"));
    let before = written(&db).await;

    let answer = viewer
        .validate_config(pb::ValidateConfigRequest {
            kind: "generator".into(),
            config_json: serde_json::json!({
                "rate_per_sec": "fast",
                "colour": "blue",
                "transform": "let x = ;",
            })
            .to_string(),
            datasource_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.valid);
    let mut fields: Vec<&str> = answer.problems.iter().map(|p| p.field.as_str()).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["colour", "rate_per_sec", "transform"],
        "{answer:?}"
    );
    assert!(answer.problems.iter().all(|p| !p.reason.is_empty()));
    let script = answer
        .problems
        .iter()
        .find(|p| p.field == "transform")
        .unwrap();
    assert_eq!(script.line, 1, "{script:?}");

    // A needed secret, with no datasource: listed as needed and missing, not a problem.
    let poll = viewer
        .validate_config(pb::ValidateConfigRequest {
            kind: "http_poll".into(),
            config_json:
                serde_json::json!({ "url": "http://127.0.0.1:9/x", "bearer_secret": "api_token" })
                    .to_string(),
            datasource_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(poll.valid, "{poll:?}");
    assert_eq!(poll.secrets_needed, ["api_token"]);
    assert_eq!(poll.secrets_missing, ["api_token"]);

    // Nothing was written: no datasource, version, event, state or audit row.
    assert_eq!(written(&db).await, before);
}

#[tokio::test]
async fn a_datasources_stored_secrets_are_checked_and_another_tenants_is_not_found() {
    let db = TestDb::new().await;
    let (_app, channel, _dir) = serve(&db).await;
    let mut admin = datasources(&channel, token("datasource:admin", "acme"));
    let ds = admin
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "poller".into(),
            kind: "http_poll".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let config = serde_json::json!({ "url": "http://127.0.0.1:9/x", "bearer_secret": "api_token" })
        .to_string();
    let mut viewer = catalog(&channel, token("datasource:viewer", "acme"));
    let answer = viewer
        .validate_config(pb::ValidateConfigRequest {
            kind: String::new(),
            config_json: config.clone(),
            datasource_id: ds.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.valid);
    assert_eq!(answer.kind, "http_poll");
    assert_eq!(answer.problems.len(), 1, "{answer:?}");
    assert_eq!(answer.problems[0].field, "bearer_secret");
    assert_eq!(answer.problems[0].missing_secret, "api_token");
    assert_eq!(answer.secrets_missing, ["api_token"]);

    // Once stored, it is valid.
    pb::secrets_client::SecretsClient::with_interceptor(
        channel.clone(),
        bearer(token("datasource:admin", "acme")),
    )
    .put_secret(pb::PutSecretRequest {
        datasource_id: ds.id.clone(),
        name: "api_token".into(),
        value: b"s3cr3t-value".to_vec(),
    })
    .await
    .unwrap();
    let stored = viewer
        .validate_config(pb::ValidateConfigRequest {
            kind: "http_poll".into(),
            config_json: config.clone(),
            datasource_id: ds.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.valid, "{stored:?}");
    assert!(stored.secrets_missing.is_empty());
    assert!(!format!("{stored:?}").contains("s3cr3t-value"));

    // A kind that is not the datasource's is refused naming `kind`.
    let other = viewer
        .validate_config(pb::ValidateConfigRequest {
            kind: "generator".into(),
            config_json: "{}".into(),
            datasource_id: ds.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument);
    assert_eq!(violated(&other), ["kind"]);

    // Another tenant's datasource does not exist for the caller.
    let foreign = catalog(&channel, token("datasource:viewer", "globex"))
        .validate_config(pb::ValidateConfigRequest {
            kind: String::new(),
            config_json: config,
            datasource_id: ds.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
}

#[tokio::test]
async fn bad_validation_requests_are_refused_naming_the_field() {
    let db = TestDb::new().await;
    let (_app, channel, _dir) = serve(&db).await;
    let mut viewer = catalog(&channel, token("datasource:viewer", "acme"));
    let huge = format!(
        "{{\"template\": {{\"pad\": \"{}\"}}}}",
        "x".repeat(dsreg::domain::MAX_CONFIG_BYTES)
    );
    let cases = [
        ("nope", "{}".to_owned(), "", "kind"),
        ("", "{}".to_owned(), "", "kind"),
        (
            "generator",
            r#"{"template": {"a": "x\u0000y"}}"#.to_owned(),
            "",
            "config_json",
        ),
        ("generator", huge, "", "config_json"),
        ("generator", "[1]".to_owned(), "", "config_json"),
        ("generator", "{".to_owned(), "", "config_json"),
        ("generator", "{}".to_owned(), "not-a-uuid", "datasource_id"),
    ];
    for (kind, config_json, datasource_id, field) in cases {
        let refused = viewer
            .validate_config(pb::ValidateConfigRequest {
                kind: kind.into(),
                config_json,
                datasource_id: datasource_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{kind}: {refused:?}");
        assert_eq!(violated(&refused), [field], "{kind}: {refused:?}");
    }
}

#[tokio::test]
async fn dsreg_validate_prints_every_problem_and_fails_on_any() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"rate_per_sec": "fast", "colour": "blue", "transform": "let x = ;"}"#,
    )
    .unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"rate_per_sec": 0, "template": {"a": 1}}"#).unwrap();
    let before = written(&db).await;

    let validate = |file: &std::path::Path, json: bool| {
        let mut command = crate::cli::dsreg(dir.path());
        command.args([
            "validate",
            "--kind",
            "generator",
            "--config-file",
            file.to_str().unwrap(),
            "--server",
            &url,
        ]);
        if json {
            command.args(["-o", "json"]);
        }
        crate::cli::run(command, None)
    };
    let table = validate(&bad, false).await;
    assert_eq!(table.status.code(), Some(1), "{}", table.stderr);
    for field in ["colour", "rate_per_sec", "transform"] {
        assert!(table.stdout.contains(field), "{}", table.stdout);
    }
    assert!(table.stdout.contains("3 problem(s)"), "{}", table.stdout);
    let json = validate(&bad, true).await;
    assert_eq!(json.status.code(), Some(1));
    let answer = &json.json_lines()[0];
    assert_eq!(answer["valid"], false);
    assert_eq!(answer["problems"].as_array().unwrap().len(), 3);

    let fine = validate(&good, true).await;
    fine.assert_success();
    assert_eq!(fine.json_lines()[0]["valid"], true);
    assert_eq!(written(&db).await, before);
}
