//! The gRPC port under abuse, over real sockets with real tokens: stream floods, key rotation,
//! time claims, denials that reveal nothing, and the audit rows they leave.

use std::time::Duration;

use dsreg::api::grpc::auth::issue_token;
use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::events_client::EventsClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

const SECRET: &[u8] = b"abuse-test-secret-0123456789abcdef-0123456789";

fn claims(sub: &str, role: &str) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    serde_json::json!({
        "sub": sub, "iss": "test", "aud": "dsreg", "org": "acme",
        "roles": [role], "iat": now, "exp": now + 600,
    })
}

fn token(sub: &str, role: &str) -> String {
    issue_token(SECRET, &claims(sub, role))
}

pub(crate) async fn channel(app: &TestApp) -> Channel {
    Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub(crate) fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn a_stream_flood_is_capped_per_caller_and_a_bystander_is_still_served() {
    const CAP: usize = 40;
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await;
    let (mut settings, _dir) = crate::helpers::hs256_settings(&db, SECRET);
    settings.grpc_max_streams_per_caller = CAP;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let flooder = token("flooder", "datasource:viewer");
    let bystander = token("bystander", "datasource:operator");

    // The flood: every stream the cap allows, over four connections.
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(EventsClient::new(channel(&app).await));
    }
    let mut streams = Vec::new();
    for i in 0..CAP {
        let client = &mut connections[i % 4];
        let request = authorized(
            pb::WatchEventsRequest {
                datasource_id: String::new(),
                types: vec![],
                after_id: None,
            },
            &flooder,
        );
        streams.push(client.watch_events(request).await.unwrap().into_inner());
    }
    // One more is refused, on any connection.
    let refused = connections[0]
        .watch_events(authorized(pb::WatchEventsRequest::default(), &flooder))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // The bystander's calls all complete, and it may open a stream of its own.
    let mut life = LifecycleClient::new(channel(&app).await);
    for _ in 0..20 {
        let mut request = authorized(
            pb::GetStatusRequest {
                datasource_id: ds.id.to_string(),
            },
            &bystander,
        );
        request.set_timeout(Duration::from_secs(10));
        life.get_status(request).await.unwrap();
    }
    let mut own = EventsClient::new(channel(&app).await)
        .watch_events(authorized(
            pb::WatchEventsRequest {
                datasource_id: ds.id.to_string(),
                types: vec![],
                after_id: None,
            },
            &bystander,
        ))
        .await
        .unwrap()
        .into_inner();

    // The restart's events reach every open stream.
    let before = db.events(ds.id).await.last().map_or(0, |e| e.id);
    let mut request = authorized(
        pb::LifecycleRequest {
            datasource_id: ds.id.to_string(),
        },
        &bystander,
    );
    request.set_timeout(Duration::from_secs(10));
    life.restart_worker(request).await.unwrap();
    for stream in streams.iter_mut().chain(std::iter::once(&mut own)) {
        let event = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = stream.message().await.unwrap().expect("an event");
                if event.id > before {
                    return event;
                }
            }
        })
        .await
        .expect("the restart's event arrives");
        assert_eq!(event.datasource_id, ds.id.to_string());
    }

    // A closed stream gives its slot back.
    drop(streams.pop());
    let mut client = connections[1].clone();
    let _taken = wait_for("a freed stream slot", Duration::from_secs(10), || {
        let mut client = client.clone();
        let flooder = flooder.clone();
        async move {
            client
                .watch_events(authorized(pb::WatchEventsRequest::default(), &flooder))
                .await
                .ok()
        }
    })
    .await;
    client = connections[2].clone();
    let again = client
        .watch_events(authorized(pb::WatchEventsRequest::default(), &flooder))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
}

// --- Keys that rotate --------------------------------------------------------------------

pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

/// The JWK of a P-256 public key in a PEM fixture.
pub(crate) fn ec_jwk(public_pem: &str, kid: &str) -> serde_json::Value {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let pem = std::fs::read_to_string(fixture(public_pem)).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(body).unwrap();
    let point = &der[der.len() - 65..];
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..]),
    })
}

fn write_jwks(path: &std::path::Path, keys: &[serde_json::Value]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An ES256 token signed by the private key of a fixture, naming `kid`.
fn es256_token(private_pem: &str, kid: &str, sub: &str) -> String {
    dsreg::api::grpc::auth::install_jwt_crypto();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(fixture(private_pem)).unwrap())
        .unwrap();
    jsonwebtoken::encode(&header, &claims(sub, "datasource:viewer"), &key).unwrap()
}

/// A registry verifying ES256 tokens against the JWKS file `jwks`, re-read every `ttl_secs`.
async fn serve_jwks(db: &TestDb, jwks: &std::path::Path, ttl_secs: u64) -> TestApp {
    let mut settings = test_settings(&db.url);
    settings.auth.insecure_no_auth = false;
    settings.auth.auth_jwks_file = Some(jwks.to_owned());
    settings.auth.auth_algorithms = vec![jsonwebtoken::Algorithm::ES256];
    settings.auth.auth_issuer = Some("test".into());
    settings.auth.auth_audience = Some("dsreg".into());
    settings.auth.auth_jwks_ttl_secs = ttl_secs;
    TestApp::spawn_with(settings, |_| {}).await
}

pub(crate) async fn get_info(channel: &Channel, token: &str) -> Result<(), tonic::Status> {
    let mut client = pb::registry_client::RegistryClient::new(channel.clone());
    let mut request = authorized(pb::GetInfoRequest {}, token);
    request.set_timeout(Duration::from_secs(3));
    client.get_info(request).await.map(|_| ())
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_file_stops_verifying_within_the_ttl() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(
        &jwks,
        &[
            ec_jwk("ec-public.pem", "k1"),
            ec_jwk("ec2-public.pem", "k2"),
        ],
    );
    let app = serve_jwks(&db, &jwks, 1).await;
    let ch = channel(&app).await;
    let k1 = es256_token("ec-private.pem", "k1", "alice");
    let k2 = es256_token("ec2-private.pem", "k2", "bob");
    get_info(&ch, &k1).await.unwrap();
    get_info(&ch, &k2).await.unwrap();

    // The issuer retires k2.
    write_jwks(&jwks, &[ec_jwk("ec-public.pem", "k1")]);
    let refused = wait_for("k2 to stop verifying", Duration::from_secs(15), || {
        let (ch, k2) = (ch.clone(), k2.clone());
        async move { get_info(&ch, &k2).await.err() }
    })
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated);
    get_info(&ch, &k1).await.unwrap();
}

#[tokio::test]
async fn a_hanging_jwks_read_holds_up_no_call_with_a_cached_key() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[ec_jwk("ec-public.pem", "k1")]);
    let app = serve_jwks(&db, &jwks, 3600).await;
    let ch = channel(&app).await;
    let k1 = es256_token("ec-private.pem", "k1", "alice");
    get_info(&ch, &k1).await.unwrap();

    // The file becomes a pipe no one writes: opening it for reading blocks.
    std::fs::remove_file(&jwks).unwrap();
    let fifo = std::ffi::CString::new(jwks.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    // More unknown-kid calls than the registry has runtime threads.
    let unknown: Vec<_> = (0..4)
        .map(|i| {
            let ch = ch.clone();
            let token = es256_token("ec-private.pem", &format!("new-{i}"), "mallory");
            tokio::spawn(async move {
                let mut client = pb::registry_client::RegistryClient::new(ch);
                let mut request = authorized(pb::GetInfoRequest {}, &token);
                request.set_timeout(Duration::from_secs(30));
                client.get_info(request).await.map(|_| ())
            })
        })
        .collect();
    // Calls with a cached key, and the health endpoint, are answered meanwhile.
    for _ in 0..20 {
        get_info(&ch, &k1).await.unwrap();
    }
    let http = app.http_addr.to_string();
    let health = tokio::time::timeout(
        Duration::from_secs(3),
        crate::serve::http_get(&http, "/healthz"),
    )
    .await
    .expect("healthz answers");
    assert_eq!(health.0, 200);
    for call in unknown {
        let refused = call.await.unwrap().unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    // Release the blocked read: open the pipe for writing and close it.
    let path = jwks.clone();
    tokio::task::spawn_blocking(move || drop(std::fs::OpenOptions::new().write(true).open(path)))
        .await
        .unwrap();
    get_info(&ch, &k1).await.unwrap();
}

// --- Time claims and denials -------------------------------------------------------------

/// Waits (bounded) until `n` denials are audited (written off the answer's path, aggregated);
/// returns the denied rows' reasons.
async fn denial_reasons(db: &TestDb, n: i64) -> Vec<String> {
    wait_for(
        "the denials' audit rows",
        Duration::from_secs(10),
        || async {
            let rows = db
                .client()
                .await
                .query(
                    "SELECT coalesce(reason, ''), count FROM audit_log WHERE outcome = 'denied'
                 ORDER BY id",
                    &[],
                )
                .await
                .unwrap();
            let total: i64 = rows.iter().map(|r| i64::from(r.get::<_, i32>(1))).sum();
            (total >= n).then(|| rows.iter().map(|r| r.get(0)).collect())
        },
    )
    .await
}

#[tokio::test]
async fn every_forged_token_gets_one_answer_and_the_reason_goes_only_to_the_audit() {
    let db = TestDb::new().await;
    let (mut settings, _dir) = crate::helpers::hs256_settings(&db, SECRET);
    settings.auth.auth_max_token_age_secs = Some(3600);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ch = channel(&app).await;
    let now = chrono::Utc::now().timestamp();
    let with = |key: &str, value: serde_json::Value| {
        let mut c = claims("forger", "datasource:admin");
        c[key] = value;
        issue_token(SECRET, &c)
    };
    let without = |key: &str| {
        let mut c = claims("forger", "datasource:admin");
        c.as_object_mut().unwrap().remove(key);
        issue_token(SECRET, &c)
    };
    let header_of = |header: serde_json::Value| {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let good = token("forger", "datasource:admin");
        let rest = good.split_once('.').unwrap().1;
        format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()))
    };
    let forged: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("basic auth", Some("Basic eDp5".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("garbage", Some("Bearer garbage".into())),
        ("oversized", Some(format!("Bearer {}", "a".repeat(9_000)))),
        (
            "wrong key",
            Some(format!(
                "Bearer {}",
                issue_token(
                    b"another-secret-0123456789abcdef-0123456789",
                    &claims("forger", "datasource:admin")
                )
            )),
        ),
        (
            "alg none",
            Some(format!(
                "Bearer {}",
                header_of(serde_json::json!({"alg": "none", "typ": "JWT"}))
            )),
        ),
        (
            "alg RS256",
            Some(format!(
                "Bearer {}",
                header_of(serde_json::json!({"alg": "RS256", "typ": "JWT"}))
            )),
        ),
        (
            "expired",
            Some(format!("Bearer {}", with("exp", (now - 3600).into()))),
        ),
        (
            "not yet valid",
            Some(format!("Bearer {}", with("nbf", (now + 3600).into()))),
        ),
        (
            "issued ten years ahead",
            Some(format!(
                "Bearer {}",
                with("iat", (now + 10 * 365 * 86_400).into())
            )),
        ),
        (
            "older than the maximum age",
            Some(format!("Bearer {}", with("iat", (now - 7200).into()))),
        ),
        ("no iat", Some(format!("Bearer {}", without("iat")))),
        ("no exp", Some(format!("Bearer {}", without("exp")))),
        (
            "wrong issuer",
            Some(format!("Bearer {}", with("iss", "evil".into()))),
        ),
        (
            "wrong audience",
            Some(format!("Bearer {}", with("aud", "other".into()))),
        ),
        (
            "empty sub",
            Some(format!("Bearer {}", with("sub", "".into()))),
        ),
    ];
    let mut messages = std::collections::BTreeSet::new();
    let mut client = pb::registry_client::RegistryClient::new(ch.clone());
    for (what, authorization) in &forged {
        let mut request = tonic::Request::new(pb::GetInfoRequest {});
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        let refused = client.get_info(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{what}: {refused:?}");
        messages.insert(refused.message().to_owned());
    }
    assert_eq!(messages.len(), 1, "{messages:?}");
    // Each denial's reason is in the audit, and tells the cases apart.
    let reasons = denial_reasons(&db, forged.len() as i64).await;
    let distinct: std::collections::BTreeSet<_> = reasons.iter().collect();
    assert!(distinct.len() >= 12, "{reasons:#?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("iat") && r.contains("future")),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("maximum token age")),
        "{reasons:#?}"
    );

    // A token issued now, and one a little ahead within the leeway, are fine.
    get_info(&ch, &token("alice", "datasource:viewer"))
        .await
        .unwrap();
    get_info(&ch, &with("iat", (now + 10).into()))
        .await
        .unwrap();
}

/// POSTs a signed-looking JSON body to the webhook ingress; returns the status and body.
async fn post_ingest(http: &str, id: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"n":1}"#;
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /ingest/{id} HTTP/1.1\r\nHost: dsreg\r\nConnection: close\r\n\
                 content-type: application/json\r\nx-dsreg-signature: sha256=00\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[tokio::test]
async fn the_webhook_answers_alike_for_every_id_that_is_not_a_running_webhook() {
    let db = TestDb::new().await;
    let generator = db.datasource("not-a-webhook").await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let http = app.http_addr.to_string();
    let missing = post_ingest(&http, &uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(missing.0, 404, "{missing:?}");
    for id in [generator.id.to_string(), "not-a-uuid".to_owned()] {
        assert_eq!(post_ingest(&http, &id).await, missing, "{id}");
    }
}

// --- The audit trail ---------------------------------------------------------------------

#[tokio::test]
async fn audit_log_refuses_update_delete_and_truncate() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO audit_log (actor, action, resource, outcome) VALUES ('a', 'b', 'c', 'ok')",
            &[],
        )
        .await
        .unwrap();
    for statement in [
        "UPDATE audit_log SET actor = 'someone else'",
        "UPDATE audit_log SET count = count + 1",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let refused = client.execute(statement, &[]).await.unwrap_err();
        assert!(
            refused.to_string().contains("append-only")
                || refused
                    .as_db_error()
                    .is_some_and(|e| e.message().contains("append-only")),
            "{statement}: {refused:?}"
        );
    }
    let rows: i64 = client
        .query_one("SELECT count(*) FROM audit_log WHERE actor = 'a'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_flood_of_ten_thousand_forged_tokens_writes_a_bounded_number_of_rows() {
    const FLOOD: i64 = 10_000;
    let db = TestDb::new().await;
    let (settings, _dir) = crate::helpers::hs256_settings(&db, SECRET);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let forged = issue_token(
        b"another-secret-0123456789abcdef-0123456789",
        &claims("mallory", "datasource:admin"),
    );
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let ch = channel(&app).await;
        let forged = forged.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = pb::registry_client::RegistryClient::new(ch);
            for _ in 0..FLOOD / 16 {
                let refused = client
                    .get_info(authorized(pb::GetInfoRequest {}, &forged))
                    .await
                    .unwrap_err();
                assert_eq!(refused.code(), Code::Unauthenticated);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let counted = wait_for("every denial counted", Duration::from_secs(30), || async {
        let row = db
            .client()
            .await
            .query_one(
                "SELECT coalesce(sum(count), 0)::bigint, count(*) FROM audit_log
                 WHERE outcome = 'denied'",
                &[],
            )
            .await
            .unwrap();
        let (total, rows): (i64, i64) = (row.get(0), row.get(1));
        (total >= FLOOD).then_some((total, rows))
    })
    .await;
    assert_eq!(counted.0, FLOOD);
    // One row per caller, action, reason and minute: the flood spans a minute or two.
    assert!(counted.1 <= 3, "{counted:?}");
}

#[tokio::test]
async fn audit_rows_name_the_caller_the_target_and_a_trace_for_each_denial_class() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await;
    let (settings, _dir) = crate::helpers::hs256_settings(&db, SECRET);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ch = channel(&app).await;
    let globex = |role: &str| {
        let mut c = claims(&format!("{role}@globex"), role);
        c["org"] = "globex".into();
        issue_token(SECRET, &c)
    };
    let mut datasources = pb::datasources_client::DatasourcesClient::new(ch.clone());

    // Unauthenticated, no trace context sent.
    let refused = datasources
        .get_datasource(pb::GetDatasourceRequest {
            id: ds.id.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // A role too low.
    let refused = datasources
        .publish_version(authorized(
            pb::PublishVersionRequest {
                datasource_id: ds.id.to_string(),
                version: 1,
            },
            &token("viewer@acme", "datasource:viewer"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // Another tenant's datasource, read and written.
    let read = datasources
        .get_datasource(authorized(
            pb::GetDatasourceRequest {
                id: ds.id.to_string(),
            },
            &globex("datasource:viewer"),
        ))
        .await
        .unwrap_err();
    let missing = datasources
        .get_datasource(authorized(
            pb::GetDatasourceRequest {
                id: uuid::Uuid::new_v4().to_string(),
            },
            &globex("datasource:viewer"),
        ))
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        read.message().replace(&ds.id.to_string(), "ID"),
        missing.message().replace(
            missing
                .message()
                .split_whitespace()
                .find(|w| w.len() >= 36)
                .unwrap_or(""),
            "ID"
        )
    );
    let written = datasources
        .archive_datasource(authorized(
            pb::ArchiveDatasourceRequest {
                id: ds.id.to_string(),
                ..Default::default()
            },
            &globex("datasource:admin"),
        ))
        .await
        .unwrap_err();
    assert_eq!(written.code(), Code::NotFound);

    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<uuid::Uuid>,
        Option<String>,
        String,
    );
    let rows: Vec<Row> = wait_for("four denial rows", Duration::from_secs(10), || async {
        let rows: Vec<Row> = db
            .client()
            .await
            .query(
                "SELECT actor, action, caller_org, org, target_id, reason_class,
                        coalesce(trace_id, '')
                 FROM audit_log WHERE outcome = 'denied' ORDER BY action, actor",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                )
            })
            .collect();
        (rows.len() >= 4).then_some(rows)
    })
    .await;
    for row in &rows {
        assert_eq!(row.6.len(), 32, "a trace id on every row: {row:?}");
        assert!(row.6.bytes().all(|b| b.is_ascii_hexdigit()), "{row:?}");
    }
    let by_action = |action: &str| {
        rows.iter()
            .find(|r| r.1 == action)
            .unwrap_or_else(|| panic!("no {action} row in {rows:#?}"))
            .clone()
    };
    let archive = by_action("ArchiveDatasource");
    assert_eq!(archive.0, "datasource:admin@globex");
    assert_eq!(archive.2.as_deref(), Some("globex"));
    assert_eq!(archive.3.as_deref(), Some("acme"));
    assert_eq!(archive.4, Some(ds.id));
    assert_eq!(archive.5.as_deref(), Some("NOT_FOUND"));
    let get_rows: Vec<_> = rows.iter().filter(|r| r.1 == "GetDatasource").collect();
    assert_eq!(get_rows.len(), 2, "{rows:#?}");
    let tenant = get_rows
        .iter()
        .find(|r| r.0 == "datasource:viewer@globex")
        .expect("the cross-tenant read");
    assert_eq!(tenant.2.as_deref(), Some("globex"));
    assert_eq!(tenant.3.as_deref(), Some("acme"));
    assert_eq!(tenant.4, Some(ds.id));
    assert_eq!(tenant.5.as_deref(), Some("NOT_FOUND"));
    let anonymous = get_rows.iter().find(|r| r.0 == "anonymous").unwrap();
    assert_eq!(anonymous.5.as_deref(), Some("UNAUTHENTICATED"));
    let publish = by_action("PublishVersion");
    assert_eq!(publish.0, "viewer@acme");
    assert_eq!(publish.5.as_deref(), Some("PERMISSION_DENIED"));
}

#[tokio::test]
async fn sql_publishes_are_audited_by_the_trigger_with_the_database_role() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await;
    let v = db
        .version(
            ds.id,
            serde_json::json!({ "rate_per_sec": 0, "template": { "n": 1 } }),
        )
        .await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "SELECT set_config('dsreg.actor', 'claims-to-be-alice', true)",
        &[],
    )
    .await
    .unwrap();
    tx.execute("SELECT dsreg_publish($1, $2)", &[&ds.id, &v])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let role: String = client
        .query_one("SELECT session_user::text", &[])
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT actor, action, via, db_role, target_id, org, version, trace_id
             FROM audit_log WHERE via = 'sql'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>("actor"), "claims-to-be-alice");
    assert_eq!(row.get::<_, String>("action"), "sql.published");
    assert_eq!(row.get::<_, String>("db_role"), role);
    assert_eq!(row.get::<_, Option<uuid::Uuid>>("target_id"), Some(ds.id));
    assert_eq!(row.get::<_, Option<String>>("org").as_deref(), Some("acme"));
    assert_eq!(row.get::<_, Option<i32>>("version"), Some(v));
    assert_eq!(row.get::<_, Option<String>>("trace_id").unwrap().len(), 32);
}

#[tokio::test]
async fn the_readme_sql_publisher_role_publishes_and_cannot_touch_the_audit() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await;
    let v = db
        .version(
            ds.id,
            serde_json::json!({ "rate_per_sec": 0, "template": { "n": 1 } }),
        )
        .await;
    // The README's grants, for a role of this test's own (roles are cluster-wide).
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("CREATE ROLE sql_publisher")
        .expect("the README's grants");
    let end = start + readme[start..].find("```").unwrap();
    let role = format!("sql_publisher_{}", uuid::Uuid::new_v4().simple());
    let grants = readme[start..end]
        .replace("sql_publisher", &role)
        .replace("'…'", "'publisher-password'");
    db.client().await.batch_execute(&grants).await.unwrap();

    let mut config: tokio_postgres::Config = db.url.parse().unwrap();
    config.user(&role).password("publisher-password");
    let (mut publisher, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    let tx = publisher.transaction().await.unwrap();
    tx.execute("SELECT set_config('dsreg.actor', 'release-bot', true)", &[])
        .await
        .unwrap();
    tx.execute("SELECT dsreg_publish($1, $2)", &[&ds.id, &v])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for statement in [
        "UPDATE audit_log SET actor = 'nobody'",
        "DELETE FROM audit_log",
        "INSERT INTO audit_log (actor, action, resource, outcome) VALUES ('x', 'y', 'z', 'ok')",
        "SELECT count(*) FROM audit_log",
    ] {
        let refused = publisher.execute(statement, &[]).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{statement}: {refused:?}"
        );
    }
    drop(publisher);
    let _ = connection.await;

    let row = db
        .client()
        .await
        .query_one(
            "SELECT actor, db_role FROM audit_log WHERE via = 'sql' AND target_id = $1",
            &[&ds.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "release-bot");
    assert_eq!(row.get::<_, String>(1), role);
    db.client()
        .await
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_page_token_with_a_rewritten_position_is_refused() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let db = TestDb::new().await;
    for name in ["a-orders", "b-orders", "c-orders"] {
        db.datasource(name).await;
    }
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let mut client = pb::datasources_client::DatasourcesClient::new(channel(&app).await);
    let first = client
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.datasources.len(), 1);
    let token = first.next_page_token;
    // The token as issued pages on.
    let second = client
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 1,
            page_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.datasources[0].name, "b-orders");
    // Its position rewritten by the holder (skip ahead to after "b-orders").
    let mut decoded: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&token).unwrap()).unwrap();
    let text = decoded.to_string().replace("a-orders", "b-orders");
    decoded = serde_json::from_str(&text).unwrap();
    let forged = URL_SAFE_NO_PAD.encode(decoded.to_string());
    let refused = client
        .list_datasources(pb::ListDatasourcesRequest {
            page_size: 1,
            page_token: forged,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("page_token"), "{refused:?}");
}

#[tokio::test]
async fn admins_read_their_tenants_audit_trail_page_by_page() {
    let db = TestDb::new().await;
    let ours = uuid::Uuid::new_v4();
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO audit_log (actor, action, resource, org, project, outcome, target_id)
             VALUES ('a', 'PublishVersion', 'datasource/{ours}', 'acme', 'web', 'ok', '{ours}'),
                    ('b', 'UpdateDatasource', 'datasource/{ours}', 'acme', 'web', 'error', '{ours}'),
                    ('c', 'GetDatasource', 'datasource/{ours}', 'acme', 'web', 'denied', '{ours}'),
                    ('d', 'PublishVersion', 'datasource/x', 'globex', 'web', 'ok', NULL),
                    ('e', 'GetInfo', '/dsreg.v1.Registry/GetInfo', NULL, NULL, 'denied', NULL)"
        ))
        .await
        .unwrap();
    let (settings, _dir) = crate::helpers::hs256_settings(&db, SECRET);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let mut client = pb::audit_client::AuditClient::new(channel(&app).await);
    let admin = token("admin@acme", "datasource:admin");
    let list = |page_token: String, outcome: &str| {
        authorized(
            pb::ListAuditRequest {
                page_size: 2,
                page_token,
                outcome: outcome.to_owned(),
                ..Default::default()
            },
            &admin,
        )
    };
    let first = client
        .list_audit(list(String::new(), ""))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .list_audit(list(first.next_page_token.clone(), ""))
        .await
        .unwrap()
        .into_inner();
    let actors: Vec<_> = first
        .records
        .iter()
        .chain(&second.records)
        .map(|r| r.actor.as_str())
        .collect();
    assert_eq!(actors, ["c", "b", "a"], "newest first, acme's only");
    assert!(second.next_page_token.is_empty());
    assert!(
        first
            .records
            .iter()
            .all(|r| r.org == "acme" && r.target_id == ours.to_string())
    );
    let denied = client
        .list_audit(list(String::new(), "denied"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.records.len(), 1);
    assert_eq!(denied.records[0].actor, "c");
    let bad = client
        .list_audit(list(String::new(), "maybe"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // Viewers and operators may not read it.
    let refused = client
        .list_audit(authorized(
            pb::ListAuditRequest::default(),
            &token("op@acme", "datasource:operator"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn an_oversized_authorization_header_is_refused_on_its_call_and_the_connection_lives() {
    let db = TestDb::new().await;
    let (settings, _dir) = crate::helpers::hs256_settings(&db, SECRET);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ch = channel(&app).await;
    let mut client = pb::registry_client::RegistryClient::new(ch.clone());
    let mut request = tonic::Request::new(pb::GetInfoRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", "a".repeat(40 * 1024)).parse().unwrap(),
    );
    let refused = client.get_info(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // The same connection serves the next call.
    get_info(&ch, &token("alice", "datasource:viewer"))
        .await
        .unwrap();
    let reasons = denial_reasons(&db, 1).await;
    assert!(reasons[0].contains("longer than"), "{reasons:?}");
}

/// `t=…,v1=…,id=…` for `body` signed now under `key`.
fn stamped_signature(key: &[u8], t: i64, id: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{t}.{id}.").as_bytes());
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex},id={id}")
}

#[tokio::test]
async fn a_webhook_delivery_with_an_id_is_accepted_once_and_a_stale_one_refused() {
    const KEY: &str = "whsec-abuse-key";
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.master_keys = Some(crate::connectors::MASTER_KEYS.to_owned());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ds = db.datasource_of("hook", "webhook").await;
    crate::helpers::put_secret(
        &db,
        crate::connectors::MASTER_KEYS,
        ds.id,
        "webhook_secret",
        KEY,
    )
    .await;
    let v = db
        .version(ds.id, serde_json::json!({ "queue_capacity": 64 }))
        .await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "webhook RUNNING", |s| {
        s.worker_status == dsreg::domain::WorkerStatus::Running && s.running_version == Some(v)
    })
    .await;
    let client = crate::helpers::http_client(Duration::from_secs(30)).unwrap();
    let url = format!("http://{}/ingest/{}", app.http_addr, ds.id);
    let body = br#"{"n": 1}"#;
    let send = |signature: String| {
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-dsreg-signature", signature)
            .body(body.to_vec());
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let now = chrono::Utc::now().timestamp();
    let signature = stamped_signature(KEY.as_bytes(), now, "delivery-1", body);
    assert_eq!(send(signature.clone()).await, 202);
    for _ in 0..200 {
        assert_eq!(send(signature.clone()).await, 409);
    }
    assert_eq!(db.records(ds.id, v).await, 1);
    // Outside the window, even a new id is refused.
    let stale = stamped_signature(KEY.as_bytes(), now - 3600, "delivery-2", body);
    assert_eq!(send(stale).await, 401);
    assert_eq!(db.records(ds.id, v).await, 1);
}

#[tokio::test]
async fn a_webhook_delivery_accepted_by_one_instance_is_a_replay_on_another() {
    const KEY: &str = "whsec-abuse-key";
    let db = TestDb::new().await;
    let spawn = |name: &str| {
        let mut settings = test_settings(&db.url);
        settings.master_keys = Some(crate::connectors::MASTER_KEYS.to_owned());
        settings.instance_id = Some(name.to_owned());
        settings.lease_ttl_ms = 3_000;
        TestApp::spawn_with(settings, |_| {})
    };
    let mut apps = vec![spawn("a").await, spawn("b").await];
    let ds = db.datasource_of("hook", "webhook").await;
    crate::helpers::put_secret(
        &db,
        crate::connectors::MASTER_KEYS,
        ds.id,
        "webhook_secret",
        KEY,
    )
    .await;
    let v = db.version(ds.id, serde_json::json!({})).await;
    db.publish_sql(ds.id, v).await;
    let owner = db
        .wait_for_state(ds.id, "webhook RUNNING", |s| {
            s.worker_status == dsreg::domain::WorkerStatus::Running && s.running_version == Some(v)
        })
        .await
        .owner_instance
        .expect("the running webhook has an owner");
    let client = crate::helpers::http_client(Duration::from_secs(30)).unwrap();
    let body = br#"{"n": 1}"#;
    let send = |app: &TestApp, signature: String| {
        let request = client
            .post(format!("http://{}/ingest/{}", app.http_addr, ds.id))
            .header("content-type", "application/json")
            .header("x-dsreg-signature", signature)
            .body(body.to_vec());
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let now = chrono::Utc::now().timestamp();
    let signature = stamped_signature(KEY.as_bytes(), now, "delivery-1", body);
    let (first, other) = if owner == "a" { (0, 1) } else { (1, 0) };
    assert_eq!(send(&apps[first], signature.clone()).await, 202);

    // The owner stops; the other instance takes the webhook over and refuses the replay.
    let survivor = apps.remove(other);
    apps.remove(0).stop().await.unwrap();
    let survivor_id = if owner == "a" { "b" } else { "a" };
    db.wait_for_state(ds.id, "the webhook RUNNING on the other instance", |s| {
        s.worker_status == dsreg::domain::WorkerStatus::Running
            && s.owner_instance.as_deref() == Some(survivor_id)
    })
    .await;
    assert_eq!(
        send(&survivor, signature).await,
        409,
        "the replay is refused"
    );
    let fresh = stamped_signature(KEY.as_bytes(), now, "delivery-2", body);
    assert_eq!(send(&survivor, fresh).await, 202, "a new id is accepted");
    assert_eq!(db.records(ds.id, v).await, 2);
    survivor.stop().await.unwrap();
}

/// A TCP relay to `target` counting the connections it accepts; its address.
async fn counting_relay(
    target: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_eight_megabyte_header_is_refused_on_its_call_and_the_connection_serves_on() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let relay = counting_relay(app.grpc_addr, accepted.clone()).await;
    let ch = Channel::from_shared(format!("http://{relay}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::registry_client::RegistryClient::new(ch.clone());
    // A first call: the client has the server's settings (its frame size) from then on.
    client.get_info(pb::GetInfoRequest {}).await.unwrap();

    let mut request = tonic::Request::new(pb::GetInfoRequest {});
    request
        .metadata_mut()
        .insert("x-padding", "a".repeat(8 << 20).parse().unwrap());
    let refused = client.get_info(request).await.unwrap_err();
    // HTTP 431 on its stream (no gRPC status: tonic reports it as UNKNOWN naming the 431).
    assert_eq!(refused.code(), Code::Unknown, "{refused:?}");
    assert!(refused.message().contains("431"), "{refused:?}");
    // A header list the transport decodes but a call may not carry: answered on the call.
    let mut request = tonic::Request::new(pb::GetInfoRequest {});
    request
        .metadata_mut()
        .insert("x-padding", "a".repeat(1 << 20).parse().unwrap());
    let refused = client.get_info(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("at most 65536"), "{refused:?}");

    // The same connection serves the next calls, and other clients are served.
    for _ in 0..3 {
        client.get_info(pb::GetInfoRequest {}).await.unwrap();
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "every call went over the one connection"
    );
    let other = channel(&app).await;
    pb::registry_client::RegistryClient::new(other)
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap();
}
