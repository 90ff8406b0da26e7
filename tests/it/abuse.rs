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

/// Settings of a registry that verifies HS256 tokens of issuer `test` for audience `dsreg`;
/// the secret file lives in the returned folder.
fn hs256_settings(db: &TestDb) -> (dsreg::config::Settings, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hs256.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut settings = test_settings(&db.url);
    settings.auth.insecure_no_auth = false;
    settings.auth.auth_hs256_secret_file = Some(secret_file);
    settings.auth.auth_issuer = Some("test".into());
    settings.auth.auth_audience = Some("dsreg".into());
    (settings, dir)
}

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

async fn channel(app: &TestApp) -> Channel {
    Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
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
    let (mut settings, _dir) = hs256_settings(&db);
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
                after_id: 0,
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
                after_id: 0,
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
