//! External key sources: a key command and Vault's transit engine, each handing the registry
//! the keys that open secrets sealed before. Vault is stood in for by a local HTTP server
//! speaking its transit `decrypt` API (`POST /v1/<mount>/decrypt/<key>`, `X-Vault-Token`,
//! `{"data": {"plaintext": "<base64>"}}`, `{"errors": [...]}`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dsreg::secrets::Secrets;

use crate::helpers::{TestDb, put_secret, test_settings};

const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const TOKEN: &str = "s.vault-test-token";

/// A row sealed under version 1 of `KEY_B64`; the start-up check of a registry whose keys
/// come from elsewhere must open it.
async fn sealed_row(db: &TestDb) {
    let ds = db.datasource("orders").await.id;
    put_secret(
        db,
        &format!("1:{KEY_B64}"),
        ds,
        "password",
        "opens-with-version-1",
    )
    .await;
}

async fn check(db: &TestDb, settings: &dsreg::config::Settings) -> anyhow::Result<Arc<Secrets>> {
    let secrets = dsreg::app::secrets_service(settings)
        .await?
        .expect("a key source");
    secrets.check(&**db.client().await).await?;
    Ok(secrets)
}

#[tokio::test]
async fn a_key_command_supplies_the_keys_and_its_failure_is_a_clear_error() {
    let db = TestDb::new().await;
    sealed_row(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("print-keys");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nprintf '{{\"active\": 1, \"keys\": {{\"1\": \"{KEY_B64}\"}}}}'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut settings = test_settings(&db.url);
    settings.master_key_command = Some(script.display().to_string());
    let secrets = check(&db, &settings)
        .await
        .expect("the command's keys open the row");
    assert_eq!(secrets.keys().active_version(), 1);

    let failing = dir.path().join("fail");
    std::fs::write(
        &failing,
        format!("#!/bin/sh\necho '{KEY_B64}'\necho 'kms: access denied' >&2\nexit 3\n"),
    )
    .unwrap();
    std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o700)).unwrap();
    settings.master_key_command = Some(failing.display().to_string());
    let message = check(&db, &settings).await.unwrap_err().to_string();
    assert!(
        message.contains("key command") && message.contains("kms: access denied"),
        "{message}"
    );
    assert!(
        !message.contains(KEY_B64),
        "the output was quoted: {message}"
    );

    settings.master_keys = Some(format!("1:{KEY_B64}"));
    let message = check(&db, &settings).await.unwrap_err().to_string();
    assert!(message.contains("give one master key source"), "{message}");
}

/// The stand-in's state: ciphertext → plaintext, and requests served.
#[derive(Clone, Default)]
struct Transit {
    wrapped: Arc<HashMap<String, String>>,
    served: Arc<std::sync::atomic::AtomicUsize>,
}

async fn decrypt(
    State(transit): State<Transit>,
    Path((mount, key)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> (StatusCode, Json<serde_json::Value>) {
    transit
        .served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if headers.get("x-vault-token").and_then(|v| v.to_str().ok()) != Some(TOKEN) {
        return (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({ "errors": ["permission denied"] })),
        );
    }
    let ciphertext = body["ciphertext"].as_str().unwrap_or_default();
    match transit.wrapped.get(ciphertext) {
        Some(plaintext) if mount == "transit" && key == "dsreg" => (
            StatusCode::OK,
            Json(serde_json::json!({ "data": { "plaintext": plaintext } })),
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "errors": ["invalid ciphertext: unable to decrypt"] })),
        ),
    }
}

/// Starts the stand-in; returns its address, its state and the handle that stops it.
async fn vault(transit: Transit) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/v1/{mount}/decrypt/{key}", post(decrypt))
        .with_state(transit);
    let handle = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, handle)
}

#[tokio::test]
async fn vault_transit_unwraps_the_keys_at_start_and_is_not_needed_after() {
    let db = TestDb::new().await;
    sealed_row(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let wrapped_file = dir.path().join("wrapped.json");
    let ciphertext = "vault:v1:c3RhbmQtaW4td3JhcHBlZC1rZXk=";
    std::fs::write(
        &wrapped_file,
        serde_json::json!({ "active": 1, "keys": { "1": ciphertext } }).to_string(),
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let transit = Transit {
        wrapped: Arc::new(HashMap::from([(ciphertext.to_owned(), KEY_B64.to_owned())])),
        ..Transit::default()
    };
    let (addr, server) = vault(transit.clone()).await;
    let mut settings = test_settings(&db.url);
    settings.vault_addr = Some(addr.clone());
    settings.vault_token_file = Some(token_file.clone());
    settings.vault_wrapped_keys = Some(wrapped_file.clone());

    let secrets = check(&db, &settings)
        .await
        .expect("Vault's keys open the row");
    assert_eq!(transit.served.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(
        !std::fs::read_to_string(&wrapped_file)
            .unwrap()
            .contains(KEY_B64),
        "the key is kept wrapped at rest"
    );

    // Vault down later changes nothing: the keys are in memory.
    server.abort();
    let _ = server.await;
    secrets.check(&**db.client().await).await.unwrap();

    // Vault down at start is a clear error.
    let message = check(&db, &settings).await.unwrap_err().to_string();
    assert!(
        message.contains(&format!("Vault at {addr}")) && message.contains("unreachable"),
        "{message}"
    );

    // A wrong token: Vault's refusal, named.
    let (addr, _server) = vault(transit.clone()).await;
    settings.vault_addr = Some(addr);
    std::fs::write(&token_file, "s.wrong").unwrap();
    let message = check(&db, &settings).await.unwrap_err().to_string();
    assert!(
        message.contains("403") && message.contains("permission denied"),
        "{message}"
    );
    assert!(
        !message.contains("s.wrong") && !message.contains(KEY_B64),
        "{message}"
    );
}
