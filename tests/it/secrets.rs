//! Secrets against a real Postgres: sealed at rest, bound to their row, opened only whole and
//! intact, rotated and rewrapped online without waking workers, and never shown in events,
//! listings or errors.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use base64::Engine;
use dsreg::db::repository::datasources::{self, NewDatasource};
use dsreg::db::repository::{self as repo, WriteContext};
use dsreg::domain::Name;
use dsreg::secrets::{
    EnvKeyProvider, Error, FileKeyProvider, KeyProvider, KeyStatus, SecretMeta, SecretString,
    Secrets,
};
use uuid::Uuid;

use crate::helpers::TestDb;

/// A provider with the given (version, key byte) pairs; the highest version active.
fn keys(versions: &[(u32, u8)]) -> Secrets {
    let value = versions
        .iter()
        .map(|(v, b)| {
            format!(
                "{v}:{}",
                base64::engine::general_purpose::STANDARD.encode([*b; 32])
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let provider: Arc<dyn KeyProvider> = Arc::new(EnvKeyProvider::parse(&value, None).unwrap());
    Secrets::new(provider)
}

fn canary(tag: &str) -> String {
    format!("canary-{tag}-{}", Uuid::new_v4().simple())
}

async fn put(db: &TestDb, secrets: &Secrets, ds: Uuid, name: &str, value: &str) -> SecretMeta {
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    let meta = secrets
        .put(&tx, ds, name, &SecretString::new(value.to_owned()).unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    meta
}

async fn open_all(
    db: &TestDb,
    secrets: &Secrets,
    ds: Uuid,
) -> Result<BTreeMap<String, String>, Error> {
    let client = db.client().await;
    let opened = secrets.open_all(&**client, ds).await?;
    Ok(opened
        .into_iter()
        .map(|(k, v)| (k, v.expose().to_owned()))
        .collect())
}

async fn sql(db: &TestDb, statement: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) {
    db.client().await.execute(statement, params).await.unwrap();
}

/// A datasource in another tenant (org `globex`).
async fn foreign_datasource(db: &TestDb, name: &str) -> Uuid {
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    let ds = datasources::create(
        &tx,
        &NewDatasource {
            org: Name::parse("org", "globex").unwrap(),
            project: Name::parse("project", "core").unwrap(),
            name: Name::parse("name", name).unwrap(),
            kind: "generator".into(),
            owner: "team-b".into(),
            tags: vec![],
            description: String::new(),
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    ds.id
}

fn assert_decrypt_error(result: Result<BTreeMap<String, String>, Error>, ds: Uuid, secret: &str) {
    match result {
        Err(Error::Decrypt {
            datasource, name, ..
        }) => {
            assert_eq!(datasource, ds);
            assert_eq!(name, secret);
        }
        other => panic!("expected Decrypt naming {secret}, got {other:?}"),
    }
}

async fn status(db: &TestDb, secrets: &Secrets) -> Vec<(u32, i64)> {
    secrets
        .status(&**db.client().await)
        .await
        .unwrap()
        .into_iter()
        .map(|s: KeyStatus| (s.key_version, s.secrets))
        .collect()
}

async fn secret_changed_events(db: &TestDb, ds: Uuid) -> usize {
    db.event_kinds(ds)
        .await
        .iter()
        .filter(|k| *k == "secret_changed")
        .count()
}

#[tokio::test]
async fn a_put_secret_opens_again_with_its_value() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let secrets = keys(&[(1, 7)]);
    let password = canary("password");
    let token = canary("token");

    put(&db, &secrets, ds, "password", &password).await;
    put(&db, &secrets, ds, "api.token", &token).await;

    let opened = open_all(&db, &secrets, ds).await.unwrap();
    assert_eq!(
        opened,
        BTreeMap::from([
            ("api.token".to_owned(), token),
            ("password".to_owned(), password)
        ])
    );
    let other = db.datasource("billing").await.id;
    assert!(open_all(&db, &secrets, other).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_table_holds_no_plaintext_and_events_carry_the_name_only() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let secrets = keys(&[(1, 7)]);
    let value = canary("event");

    put(&db, &secrets, ds, "password", &value).await;
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    assert!(secrets.delete(&tx, ds, "password").await.unwrap());
    assert!(!secrets.delete(&tx, ds, "password").await.unwrap());
    tx.rollback().await.unwrap();

    let changed: Vec<_> = db
        .events(ds)
        .await
        .into_iter()
        .filter(|e| e.kind == "secret_changed")
        .collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].payload["name"], "password");
    assert_eq!(changed[0].actor, "test");
    for event in db.events(ds).await {
        assert!(
            !event.payload.to_string().contains(&value),
            "{:?}",
            event.kind
        );
    }
    let row = db
        .client()
        .await
        .query_one(
            "SELECT ciphertext, nonce, fingerprint FROM datasource_secrets WHERE datasource_id = $1",
            &[&ds],
        )
        .await
        .unwrap();
    let ciphertext: Vec<u8> = row.get(0);
    assert!(
        !ciphertext
            .windows(value.len())
            .any(|w| w == value.as_bytes())
    );
    assert!(!row.get::<_, String>(2).contains(&value));
}

#[tokio::test]
async fn a_delete_removes_the_secret_and_tells_the_worker() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let secrets = keys(&[(1, 7)]);
    put(&db, &secrets, ds, "password", &canary("delete")).await;

    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    assert!(secrets.delete(&tx, ds, "password").await.unwrap());
    tx.commit().await.unwrap();

    assert!(open_all(&db, &secrets, ds).await.unwrap().is_empty());
    let payloads: Vec<_> = db
        .events(ds)
        .await
        .into_iter()
        .filter(|e| e.kind == "secret_changed")
        .map(|e| e.payload["operation"].clone())
        .collect();
    assert_eq!(payloads, vec!["put", "delete"]);
}

#[tokio::test]
async fn list_shows_metadata_and_never_the_value() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let secrets = keys(&[(1, 7)]);
    let first = canary("first");
    let second = canary("second");

    let created = put(&db, &secrets, ds, "password", &first).await;
    let replaced = put(&db, &secrets, ds, "password", &second).await;
    let again = put(&db, &secrets, ds, "password", &second).await;

    assert_eq!(created.revision, 1);
    assert_eq!(replaced.revision, 2);
    assert!(created.rotated_at.is_none());
    assert_eq!(replaced.rotated_by.as_deref(), Some("test"));
    assert_eq!(created.fingerprint.len(), 12);
    assert_ne!(created.fingerprint, replaced.fingerprint);
    assert_eq!(replaced.fingerprint, again.fingerprint);
    let listed = secrets.list(&**db.client().await, ds).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "password");
    assert_eq!(listed[0].key_version, 1);
    assert_eq!(listed[0].revision, 3);
    assert_eq!(listed[0].created_by, "test");
    let shown = format!("{listed:?}");
    assert!(
        !shown.contains(&first) && !shown.contains(&second),
        "{shown}"
    );
}

#[tokio::test]
async fn bad_names_and_unknown_datasources_are_refused_before_sealing() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let secrets = keys(&[(1, 7)]);
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    let value = SecretString::new(canary("name")).unwrap();

    let bad = secrets.put(&tx, ds, "no spaces", &value).await.unwrap_err();
    assert!(matches!(bad, Error::InvalidName(_)), "{bad:?}");
    let missing = Uuid::new_v4();
    let err = secrets
        .put(&tx, missing, "password", &value)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Db(dsreg::db::Error::DatasourceNotFound(id)) if id == missing),
        "{err:?}"
    );
}

#[tokio::test]
async fn one_tampered_byte_fails_the_whole_open_naming_the_secret() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let secrets = keys(&[(1, 7)]);
    put(&db, &secrets, ds, "a_ok", &canary("ok")).await;
    put(&db, &secrets, ds, "password", &canary("tamper")).await;

    sql(
        &db,
        "UPDATE datasource_secrets SET ciphertext = set_byte(ciphertext, 3, get_byte(ciphertext, 3) # 1)
         WHERE datasource_id = $1 AND name = 'password'",
        &[&ds],
    )
    .await;
    assert_decrypt_error(open_all(&db, &secrets, ds).await, ds, "password");

    put(&db, &secrets, ds, "password", &canary("again")).await;
    sql(
        &db,
        "UPDATE datasource_secrets SET nonce = set_byte(nonce, 0, get_byte(nonce, 0) # 128)
         WHERE datasource_id = $1 AND name = 'password'",
        &[&ds],
    )
    .await;
    assert_decrypt_error(open_all(&db, &secrets, ds).await, ds, "password");
}

#[tokio::test]
async fn a_ciphertext_copied_to_another_datasource_tenant_or_name_does_not_decrypt() {
    let db = TestDb::new().await;
    let source = db.datasource("orders").await.id;
    let sibling = db.datasource("billing").await.id;
    let foreign = foreign_datasource(&db, "orders").await;
    let secrets = keys(&[(1, 7)]);
    put(&db, &secrets, source, "password", &canary("source")).await;
    put(&db, &secrets, source, "api_key", &canary("name")).await;
    put(&db, &secrets, sibling, "password", &canary("sibling")).await;
    put(&db, &secrets, foreign, "password", &canary("foreign")).await;
    // Every row is at revision 1 and version 1: only datasource, tenant or name differ.
    let copy = "UPDATE datasource_secrets AS t SET nonce = s.nonce, ciphertext = s.ciphertext
                FROM datasource_secrets AS s
                WHERE s.datasource_id = $1 AND s.name = 'password'
                  AND t.datasource_id = $2 AND t.name = $3";

    sql(&db, copy, &[&source, &sibling, &"password"]).await;
    assert_decrypt_error(open_all(&db, &secrets, sibling).await, sibling, "password");

    sql(&db, copy, &[&source, &foreign, &"password"]).await;
    assert_decrypt_error(open_all(&db, &secrets, foreign).await, foreign, "password");

    sql(&db, copy, &[&source, &source, &"api_key"]).await;
    assert_decrypt_error(open_all(&db, &secrets, source).await, source, "api_key");
}

#[tokio::test]
async fn an_older_ciphertext_put_back_over_a_newer_write_does_not_decrypt() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let secrets = keys(&[(1, 7)]);
    put(&db, &secrets, ds, "password", &canary("old")).await;
    let old = db
        .client()
        .await
        .query_one(
            "SELECT nonce, ciphertext FROM datasource_secrets WHERE datasource_id = $1",
            &[&ds],
        )
        .await
        .unwrap();
    let (nonce, ciphertext): (Vec<u8>, Vec<u8>) = (old.get(0), old.get(1));
    put(&db, &secrets, ds, "password", &canary("new")).await;

    sql(
        &db,
        "UPDATE datasource_secrets SET nonce = $2, ciphertext = $3 WHERE datasource_id = $1",
        &[&ds, &nonce, &ciphertext],
    )
    .await;

    assert_decrypt_error(open_all(&db, &secrets, ds).await, ds, "password");
}

#[tokio::test]
async fn after_rotation_new_writes_use_the_new_version_and_old_rows_still_open() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    assert!(FileKeyProvider::create_dev(&path).unwrap());
    let v1 = Secrets::new(Arc::new(FileKeyProvider::load(&path).unwrap()));
    let old = canary("v1");
    put(&db, &v1, ds, "old", &old).await;

    assert_eq!(FileKeyProvider::add_version(&path).unwrap(), 2);
    let v2 = Secrets::new(Arc::new(FileKeyProvider::load(&path).unwrap()));
    let new = canary("v2");
    let meta = put(&db, &v2, ds, "new", &new).await;

    assert_eq!(meta.key_version, 2);
    assert_eq!(status(&db, &v2).await, vec![(1, 1), (2, 1)]);
    let opened = open_all(&db, &v2, ds).await.unwrap();
    assert_eq!(opened["old"], old);
    assert_eq!(opened["new"], new);
    // A registry still on the old key set cannot open the new row, and says which row and
    // which version.
    let err = open_all(&db, &v1, ds).await.unwrap_err();
    assert!(
        matches!(&err, Error::RowKeyNotLoaded { datasource, name, key_version: 2 } if *datasource == ds && name == "new"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&ds.to_string())
            && message.contains("\"new\"")
            && message.contains("version 2"),
        "{message}"
    );
    v2.check(&**db.client().await).await.unwrap();
}

#[tokio::test]
async fn rewrap_moves_every_row_to_the_active_version_without_waking_workers() {
    let db = TestDb::new().await;
    let a = db.datasource("orders").await.id;
    let b = foreign_datasource(&db, "billing").await;
    let v1 = keys(&[(1, 7)]);
    let mut expected = BTreeMap::new();
    for i in 0..13 {
        for ds in [a, b] {
            let value = canary(&format!("rw{i}"));
            put(&db, &v1, ds, &format!("s{i:02}"), &value).await;
            expected.insert((ds, format!("s{i:02}")), value);
        }
    }
    let before_list = v1.list(&**db.client().await, a).await.unwrap();
    let events_before = (
        secret_changed_events(&db, a).await,
        secret_changed_events(&db, b).await,
    );
    let v2 = keys(&[(1, 7), (2, 9)]);

    let mut calls = Vec::new();
    let report = v2
        .rewrap(&db.pool, 7, |done, total| {
            calls.push((done, total));
            ControlFlow::Continue(())
        })
        .await
        .unwrap();

    assert_eq!(report.active_version, 2);
    assert_eq!(
        (report.total, report.rewrapped, report.remaining),
        (26, 26, 0)
    );
    assert!(report.failed.is_empty() && !report.stopped);
    assert_eq!(
        calls,
        vec![(7, 26), (14, 26), (21, 26), (26, 26)],
        "progress after each batch"
    );
    assert_eq!(status(&db, &v2).await, vec![(1, 0), (2, 26)]);
    for ds in [a, b] {
        for (name, value) in open_all(&db, &v2, ds).await.unwrap() {
            assert_eq!(expected[&(ds, name)], value);
        }
    }
    assert_eq!(
        (
            secret_changed_events(&db, a).await,
            secret_changed_events(&db, b).await
        ),
        events_before
    );
    let after_list = v2.list(&**db.client().await, a).await.unwrap();
    for (before, after) in before_list.iter().zip(&after_list) {
        assert_eq!(after.key_version, 2);
        assert_eq!(after.revision, before.revision + 1);
        assert_eq!(
            after.rotated_at, before.rotated_at,
            "a rewrap is not a value change"
        );
    }
    // Nothing left to do: a second run is a no-op.
    let again = v2
        .rewrap(&db.pool, 7, |_, _| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!((again.total, again.rewrapped, again.remaining), (0, 0, 0));
    // The old key can go now.
    let only_v2 = keys(&[(2, 9)]);
    only_v2.check(&**db.client().await).await.unwrap();
    assert_eq!(open_all(&db, &only_v2, a).await.unwrap().len(), 13);
}

#[tokio::test]
async fn an_interrupted_rewrap_resumes_where_it_stopped() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let v1 = keys(&[(1, 7)]);
    for i in 0..20 {
        put(&db, &v1, ds, &format!("s{i:02}"), &canary("resume")).await;
    }
    let v2 = keys(&[(1, 7), (2, 9)]);

    let first = v2
        .rewrap(&db.pool, 5, |_, _| ControlFlow::Break(()))
        .await
        .unwrap();

    assert!(first.stopped);
    assert_eq!((first.total, first.rewrapped, first.remaining), (20, 5, 15));
    assert_eq!(status(&db, &v2).await, vec![(1, 15), (2, 5)]);
    assert_eq!(open_all(&db, &v2, ds).await.unwrap().len(), 20);

    let second = v2
        .rewrap(&db.pool, 5, |_, _| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert!(!second.stopped);
    assert_eq!(second.total, 15);
    assert_eq!(second.rewrapped, 15);
    assert_eq!(second.remaining, 0);
    assert_eq!(status(&db, &v2).await, vec![(1, 0), (2, 20)]);
}

#[tokio::test]
async fn rewrap_reports_a_row_that_does_not_open_and_finishes_the_rest() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let v1 = keys(&[(1, 7)]);
    for i in 0..6 {
        put(&db, &v1, ds, &format!("s{i}"), &canary("bad")).await;
    }
    sql(
        &db,
        "UPDATE datasource_secrets SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1)
         WHERE datasource_id = $1 AND name = 's2'",
        &[&ds],
    )
    .await;
    let v2 = keys(&[(1, 7), (2, 9)]);

    let report = v2
        .rewrap(&db.pool, 2, |_, _| ControlFlow::Continue(()))
        .await
        .unwrap();

    assert_eq!((report.rewrapped, report.remaining), (5, 1));
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].name, "s2");
    assert!(matches!(
        report.failed[0].error,
        Error::Decrypt { key_version: 1, .. }
    ));
    assert_eq!(status(&db, &v2).await, vec![(1, 1), (2, 5)]);
}

#[tokio::test]
async fn rewrap_runs_online_past_a_row_a_writer_holds() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let v1 = keys(&[(1, 7)]);
    for i in 0..4 {
        put(&db, &v1, ds, &format!("s{i}"), &canary("online")).await;
    }
    let v2 = keys(&[(1, 7), (2, 9)]);
    let mut writer = db.client().await;
    let tx = repo::begin(&mut writer, &WriteContext::actor("test"))
        .await
        .unwrap();
    let held = canary("held");
    // The API's put holds the row lock from here to its commit.
    v2.put(&tx, ds, "s1", &SecretString::new(held.clone()).unwrap())
        .await
        .unwrap();

    let report = v2
        .rewrap(&db.pool, 10, |_, _| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!((report.rewrapped, report.remaining), (3, 1));
    tx.commit().await.unwrap();

    assert_eq!(status(&db, &v2).await, vec![(1, 0), (2, 4)]);
    assert_eq!(open_all(&db, &v2, ds).await.unwrap()["s1"], held);
}

#[tokio::test]
async fn the_start_up_check_names_a_missing_or_wrong_key_version() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    put(&db, &keys(&[(1, 7)]), ds, "password", &canary("check")).await;

    let missing = keys(&[(2, 9)])
        .check(&**db.client().await)
        .await
        .unwrap_err();
    assert!(
        matches!(missing, Error::UnknownKeyVersion(1)),
        "{missing:?}"
    );
    assert!(missing.to_string().contains("version 1"));

    let wrong = keys(&[(1, 8)])
        .check(&**db.client().await)
        .await
        .unwrap_err();
    assert!(
        matches!(&wrong, Error::Decrypt { datasource, name, key_version: 1 } if *datasource == ds && name == "password"),
        "{wrong:?}"
    );
}

async fn integrity_audits(db: &TestDb) -> Vec<(String, String, String, serde_json::Value)> {
    db.client()
        .await
        .query(
            "SELECT actor, resource, reason, diff FROM audit_log
             WHERE action = 'secret.integrity_failure' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn a_tampered_row_is_audited_once_per_interval_per_datasource() {
    let db = TestDb::new().await;
    let a = db.datasource("orders").await.id;
    let b = db.datasource("billing").await.id;
    let secrets =
        keys(&[(1, 7)]).with_integrity_audit_interval(std::time::Duration::from_secs(3600));
    let value = canary("audited");
    put(&db, &secrets, a, "password", &value).await;
    put(&db, &secrets, b, "token", &canary("b")).await;
    sql(
        &db,
        "UPDATE datasource_secrets SET ciphertext = set_byte(ciphertext, 3, get_byte(ciphertext, 3) # 1)
         WHERE name = 'password'",
        &[],
    )
    .await;

    for _ in 0..3 {
        assert_decrypt_error(open_all(&db, &secrets, a).await, a, "password");
    }
    // Another datasource's rows are not affected.
    open_all(&db, &secrets, b).await.unwrap();
    let audits = integrity_audits(&db).await;
    assert_eq!(audits.len(), 1, "rate-limited to one row: {audits:?}");
    let (actor, resource, reason, diff) = &audits[0];
    assert_eq!(actor, "system");
    assert_eq!(resource, &format!("datasource/{a}"));
    assert_eq!(reason, "decrypt_failed");
    assert_eq!(diff["secret"], "password");
    assert_eq!(diff["key_version"], 1);
    assert!(!format!("{audits:?}").contains(&value));

    // Another datasource's failure is its own row, whatever the first one's limit.
    sql(
        &db,
        "UPDATE datasource_secrets SET key_version = 5 WHERE name = 'token'",
        &[],
    )
    .await;
    assert!(matches!(
        open_all(&db, &secrets, b).await,
        Err(Error::RowKeyNotLoaded { key_version: 5, .. })
    ));
    let audits = integrity_audits(&db).await;
    assert_eq!(audits.len(), 2, "{audits:?}");
    assert_eq!(audits[1].1, format!("datasource/{b}"));
    assert_eq!(audits[1].2, "key_version_not_loaded");
    assert_eq!(audits[1].3["secret"], "token");

    // After the interval, the next row counts the failures it stood for.
    let eager = keys(&[(1, 7)]).with_integrity_audit_interval(std::time::Duration::ZERO);
    assert_decrypt_error(open_all(&db, &eager, a).await, a, "password");
    assert_eq!(integrity_audits(&db).await.len(), 3);
}

#[tokio::test]
async fn a_worker_meeting_a_tampered_secret_is_refused_and_the_failure_audited() {
    let db = TestDb::new().await;
    let master_keys = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let ds = db.datasource_of("api", "http_poll").await.id;
    crate::helpers::put_secret(&db, master_keys, ds, "token", &canary("worker")).await;
    let mut settings = crate::helpers::test_settings(&db.url);
    settings.master_keys = Some(master_keys.into());
    // Started before the row is tampered with: the start-up check would refuse it after.
    let app = crate::helpers::TestApp::spawn_with(settings, |_| {}).await;
    sql(
        &db,
        "UPDATE datasource_secrets SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1)",
        &[],
    )
    .await;
    let v = db
        .version(
            ds,
            serde_json::json!({ "url": "http://127.0.0.1:9/", "bearer_secret": "token" }),
        )
        .await;
    db.publish_sql(ds, v).await;
    let state = db
        .wait_for_state(ds, "the worker refused", |s| {
            s.error_code.as_deref() == Some("secret_unavailable")
        })
        .await;
    assert!(
        state
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("\"token\"")),
        "{state:?}"
    );
    let audits = crate::helpers::wait_for(
        "the integrity audit row",
        std::time::Duration::from_secs(10),
        || async {
            let audits = integrity_audits(&db).await;
            (!audits.is_empty()).then_some(audits)
        },
    )
    .await;
    assert_eq!(audits[0].0, "system");
    assert_eq!(audits[0].1, format!("datasource/{ds}"));
    assert_eq!(audits[0].2, "decrypt_failed");
    assert_eq!(audits[0].3["secret"], "token");
    app.stop().await.unwrap();
}

/// `dsreg serve` on `db` with `master_keys` (and `extra` environment), run until it exits
/// or serves; returns its exit status (`None`: it served) and what it wrote.
async fn serve_with_keys(
    db: &TestDb,
    master_keys: &str,
    extra: &[(&str, &str)],
) -> (Option<std::process::ExitStatus>, String) {
    use tokio::io::AsyncReadExt;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"));
    command
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--insecure-no-auth",
        ])
        .env("DATABASE_URL", &db.url)
        .env("DSREG_MASTER_KEYS", master_keys)
        .env("DSREG_LOG", "info")
        .env_remove("DSREG_SKIP_KEY_CHECK")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut text = Vec::new();
    // Read until it exits (EOF) or says it serves.
    let served = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stderr.read(&mut buf).await.unwrap();
            if n == 0 {
                return false;
            }
            text.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&text).contains("dsreg serving") {
                return true;
            }
        }
    })
    .await
    .expect("dsreg serve exits or serves within 60 s");
    let status = if served {
        child.kill().await.unwrap();
        None
    } else {
        Some(child.wait().await.unwrap())
    };
    let mut out = String::new();
    let _ = stdout.read_to_string(&mut out).await;
    (status, format!("{}{out}", String::from_utf8_lossy(&text)))
}

#[tokio::test]
async fn serve_refuses_to_start_with_a_wrong_key_of_the_right_version() {
    let db = TestDb::new().await;
    let ds = db.datasource("orders").await.id;
    let right = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let wrong_key = "HyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4=";
    let wrong = format!("1:{wrong_key}");
    crate::helpers::put_secret(&db, right, ds, "password", &canary("startup")).await;

    let (status, output) = serve_with_keys(&db, &wrong, &[]).await;
    // The refusal is a JSON log line: read its text as written.
    let output = output.replace("\\\"", "\"");
    let status = status.expect("serve exits instead of serving");
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("the master keys do not open the stored secrets")
            && output.contains(&ds.to_string())
            && output.contains("\"password\"")
            && output.contains("--skip-key-check"),
        "the refusal says which row and what to do: {output}"
    );
    assert!(
        !output.contains(wrong_key) && !output.contains(&right[2..]),
        "a key was printed: {output}"
    );

    // Told to start anyway, it starts and warns.
    let (status, output) = serve_with_keys(&db, &wrong, &[("DSREG_SKIP_KEY_CHECK", "true")]).await;
    assert!(status.is_none(), "serves with the flag: {output}");
    assert!(output.contains("starting anyway"), "{output}");

    // With the right key it starts.
    let (status, output) = serve_with_keys(&db, right, &[]).await;
    assert!(status.is_none(), "serves with the right key: {output}");
}
