//! Dead letters over a real socket and through the real binary: a transform that refuses
//! records leaves them listed; replayed through a fixed and published version they are
//! written and the list empties, and a second replay does nothing; dry runs change nothing;
//! another tenant's are never seen; bad input is refused naming the field.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::dead_letters_client::DeadLettersClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::helpers::{TestApp, TestDb, wait_for};
use crate::validate::{Authed, bearer, datasources, serve, token};

const WAIT: Duration = Duration::from_secs(60);

fn dead_letters(channel: &Channel, token: String) -> DeadLettersClient<Authed> {
    DeadLettersClient::with_interceptor(channel.clone(), bearer(token))
}

async fn count(db: &TestDb, sql: &str, id: Uuid) -> i64 {
    db.client()
        .await
        .query_one(sql, &[&id])
        .await
        .unwrap()
        .get(0)
}

async fn dead(db: &TestDb, id: Uuid) -> i64 {
    count(
        db,
        "SELECT count(*) FROM datasource_dead_letters WHERE datasource_id = $1",
        id,
    )
    .await
}

async fn records(db: &TestDb, id: Uuid) -> i64 {
    count(
        db,
        "SELECT count(*) FROM datasource_records WHERE datasource_id = $1",
        id,
    )
    .await
}

fn violated(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Creates `org/ingest/name` through the API and publishes `config` as version 1.
async fn published(channel: &Channel, org: &str, name: &str, config: serde_json::Value) -> Uuid {
    let mut admin = datasources(channel, token("datasource:admin", org));
    let ds = admin
        .create_datasource(pb::CreateDatasourceRequest {
            org: org.into(),
            project: "ingest".into(),
            name: name.into(),
            kind: "generator".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    publish(channel, org, &ds.id, config).await;
    ds.id.parse().unwrap()
}

async fn publish(channel: &Channel, org: &str, id: &str, config: serde_json::Value) -> i32 {
    let mut admin = datasources(channel, token("datasource:admin", org));
    let v = admin
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.to_owned(),
            config_json: config.to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.to_owned(),
            version: v.version,
        })
        .await
        .unwrap();
    v.version
}

fn replay(id: Uuid, dry_run: bool) -> pb::ReplayDeadLettersRequest {
    pb::ReplayDeadLettersRequest {
        datasource_id: id.to_string(),
        dry_run,
        ..Default::default()
    }
}

#[tokio::test]
async fn refused_records_are_listed_then_replayed_once_through_the_fixed_version() {
    let db = TestDb::new().await;
    let (_app, channel, _dir) = serve(&db).await;
    // Version 1 refuses every odd record.
    let id = published(
        &channel,
        "acme",
        "ticks",
        serde_json::json!({
            "rate_per_sec": 200, "count": 20, "template": {},
            "transform": "if record.seq % 2 == 1 { throw \"odd seq\" } record",
        }),
    )
    .await;
    wait_for("10 records and 10 dead letters", WAIT, || async {
        (records(&db, id).await == 10 && dead(&db, id).await == 10).then_some(())
    })
    .await;

    // Listed, paged, with the record, the reason and the version that refused it.
    let mut operator = dead_letters(&channel, token("datasource:operator", "acme"));
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = operator
            .list_dead_letters(pb::ListDeadLettersRequest {
                datasource_id: id.to_string(),
                page_size: 4,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.dead_letters.len() <= 4);
        seen.extend(page.dead_letters);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 10);
    assert!(seen.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    for d in &seen {
        let record: serde_json::Value = serde_json::from_str(&d.record_json).unwrap();
        assert_eq!(record["seq"].as_i64().unwrap() % 2, 1, "{d:?}");
        assert_eq!(d.version, 1);
        assert!(d.reason.contains("odd seq"), "{d:?}");
    }
    let code = seen[0].reason_code.clone();
    let by_code = operator
        .list_dead_letters(pb::ListDeadLettersRequest {
            datasource_id: id.to_string(),
            reason_code: "no_such_reason".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(by_code.dead_letters.is_empty());

    // Through version 1 they fail again: kept, with the replay counted.
    let again = operator
        .replay_dead_letters(replay(id, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.passed, again.failed), (0, 10));
    assert_eq!(dead(&db, id).await, 10);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM datasource_dead_letters WHERE datasource_id = $1 AND replays = 1",
            id
        )
        .await,
        10
    );

    // Version 2 takes every record (and emits nothing itself).
    let fixed = publish(
        &channel,
        "acme",
        &id.to_string(),
        serde_json::json!({
            "rate_per_sec": 0, "template": {},
            "transform": "record.replayed = true; record",
        }),
    )
    .await;
    let before = records(&db, id).await;
    let dry = operator
        .replay_dead_letters(replay(id, true))
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run);
    assert_eq!((dry.version, dry.passed, dry.failed), (fixed, 10, 0));
    assert_eq!(dry.records_written, 10);
    assert_eq!(dead(&db, id).await, 10, "a dry run changes nothing");
    assert_eq!(records(&db, id).await, before);

    let done = operator
        .replay_dead_letters(replay(id, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (done.passed, done.failed, done.records_written),
        (10, 0, 10)
    );
    assert_eq!(dead(&db, id).await, 0);
    assert_eq!(records(&db, id).await, before + 10);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM datasource_records WHERE datasource_id = $1 AND version = 2 \
             AND record->>'replayed' = 'true' AND (record->>'seq')::int % 2 = 1",
            id
        )
        .await,
        10
    );
    let listed = operator
        .list_dead_letters(pb::ListDeadLettersRequest {
            datasource_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.dead_letters.is_empty());

    // A second replay does nothing.
    let nothing = operator
        .replay_dead_letters(replay(id, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((nothing.passed, nothing.failed), (0, 0));
    assert_eq!(records(&db, id).await, before + 10);

    // Each replay that changed something is an event and every call is audited.
    let events = db.event_kinds(id).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "dead_letters_replayed")
            .count(),
        2,
        "{events:?}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_log WHERE action = 'ReplayDeadLetters' AND outcome = 'ok' \
             AND target_id = $1",
            id
        )
        .await,
        4
    );
    assert!(!code.is_empty());
}

/// Inserts `n` dead letters of `id` refused with `code`.
async fn seed(db: &TestDb, id: Uuid, n: i32, code: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO datasource_dead_letters (datasource_id, version, record, error_code, error)
             SELECT $1, 1, jsonb_build_object('n', i), $3, 'refused' FROM generate_series(1, $2) i",
            &[&id, &n, &code],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn another_tenants_dead_letters_are_never_seen_and_bad_requests_name_their_field() {
    let db = TestDb::new().await;
    let (_app, channel, _dir) = serve(&db).await;
    let idle = serde_json::json!({ "rate_per_sec": 0, "template": {} });
    let ours = published(&channel, "acme", "ours", idle.clone()).await;
    let theirs = published(&channel, "globex", "theirs", idle).await;
    seed(&db, ours, 3, "script_error").await;
    seed(&db, ours, 2, "unstorable").await;
    seed(&db, theirs, 4, "script_error").await;

    let mut operator = dead_letters(&channel, token("datasource:operator", "acme"));
    let all = operator
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.dead_letters.len(), 5);
    assert!(
        all.dead_letters
            .iter()
            .all(|d| d.datasource_id == ours.to_string())
    );
    let foreign = operator
        .list_dead_letters(pb::ListDeadLettersRequest {
            datasource_id: theirs.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    let replayed = operator
        .replay_dead_letters(replay(theirs, false))
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), Code::NotFound);
    let mut admin = dead_letters(&channel, token("datasource:admin", "acme"));
    let purged = admin
        .purge_dead_letters(pb::PurgeDeadLettersRequest {
            datasource_id: theirs.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(purged.code(), Code::NotFound);
    assert_eq!(dead(&db, theirs).await, 4);

    // An operator may not purge; an admin purges by reason, audited, with an event.
    let refused = operator
        .purge_dead_letters(pb::PurgeDeadLettersRequest {
            datasource_id: ours.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let purged = admin
        .purge_dead_letters(pb::PurgeDeadLettersRequest {
            datasource_id: ours.to_string(),
            reason_code: "unstorable".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged, 2);
    assert_eq!(dead(&db, ours).await, 3);
    assert!(
        db.event_kinds(ours)
            .await
            .contains(&"dead_letters_purged".to_owned())
    );

    // Bad input names its field.
    let bad_token = operator
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated(&bad_token), ["page_token"]);
    let bad_size = operator
        .list_dead_letters(pb::ListDeadLettersRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated(&bad_size), ["page_size"]);
    let bad_id = operator
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            datasource_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated(&bad_id), ["datasource_id"]);
    let bad_code = operator
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            datasource_id: ours.to_string(),
            reason_code: "a\0b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated(&bad_code), ["reason_code"]);
    let bad_limit = operator
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            datasource_id: ours.to_string(),
            limit: 99_999,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated(&bad_limit), ["limit"]);
    for status in [&bad_token, &bad_size, &bad_id, &bad_code, &bad_limit] {
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}

#[tokio::test]
async fn dsreg_deadletters_lists_replays_and_purges() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let url = format!("http://{}", app.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let ds = db.datasource("cli-ticks").await;
    let v = db
        .version(
            ds.id,
            serde_json::json!({
                "rate_per_sec": 0, "template": {},
                "transform": "if record.n == 2 { throw \"two\" } record",
            }),
        )
        .await;
    db.publish_sql(ds.id, v).await;
    seed(&db, ds.id, 3, "script_error").await;
    let id = ds.id.to_string();
    let run = |args: Vec<&str>| {
        let mut command = crate::cli::dsreg(dir.path());
        command.args(args).args(["--server", &url]);
        crate::cli::run(command, None)
    };

    let table = run(vec!["deadletters", "list", "--datasource", &id]).await;
    table.assert_success();
    assert_eq!(table.stdout.lines().count(), 4, "{}", table.stdout);
    assert!(table.stdout.contains("script_error"), "{}", table.stdout);
    let json = run(vec!["deadletters", "list", "-o", "json"]).await;
    json.assert_success();
    assert_eq!(json.json_lines().len(), 3);

    let dry = run(vec![
        "deadletters",
        "replay",
        &id,
        "--dry-run",
        "-o",
        "json",
    ])
    .await;
    assert_eq!(
        dry.status.code(),
        Some(1),
        "one fails again: {}",
        dry.stderr
    );
    let answer = &dry.json_lines()[0];
    assert_eq!(
        (answer["passed"].as_u64(), answer["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(dead(&db, ds.id).await, 3);

    let done = run(vec!["deadletters", "replay", &id]).await;
    assert_eq!(done.status.code(), Some(1));
    assert!(done.stdout.contains("2 passed"), "{}", done.stdout);
    assert!(done.stdout.contains("two"), "{}", done.stdout);
    assert_eq!(dead(&db, ds.id).await, 1);
    assert_eq!(records(&db, ds.id).await, 2);

    let purged = run(vec!["deadletters", "purge", &id, "-o", "json"]).await;
    purged.assert_success();
    assert_eq!(purged.json_lines()[0]["purged"], 1);
    assert_eq!(dead(&db, ds.id).await, 0);
}

async fn ids(db: &TestDb) -> Vec<i64> {
    db.client()
        .await
        .query("SELECT id FROM datasource_dead_letters ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect()
}

#[tokio::test]
async fn dead_letters_past_their_age_or_count_are_deleted_and_get_status_counts_the_rest() {
    let db = TestDb::new().await;
    let ds = db.datasource("kept").await;
    let v = db
        .version(
            ds.id,
            serde_json::json!({ "rate_per_sec": 0, "template": {} }),
        )
        .await;
    db.publish_sql(ds.id, v).await;
    seed(&db, ds.id, 5, "script_error").await;
    // The newest is past the age bound; of the other four, the count bound keeps three.
    db.client()
        .await
        .execute(
            "UPDATE datasource_dead_letters SET at = now() - interval '30 days'
             WHERE id = (SELECT max(id) FROM datasource_dead_letters)",
            &[],
        )
        .await
        .unwrap();
    let seeded = ids(&db).await;
    let mut settings = crate::helpers::test_settings(&db.url);
    settings.dead_letter_max_age_hours = 24;
    settings.dead_letter_max_per_datasource = 3;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    wait_for("the retention applied", WAIT, || async {
        (dead(&db, ds.id).await == 3).then_some(())
    })
    .await;
    assert_eq!(ids(&db).await, seeded[1..4].to_vec());

    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let state = pb::lifecycle_client::LifecycleClient::new(channel)
        .get_status(pb::GetStatusRequest {
            datasource_id: ds.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.dead_letters, Some(3));

    // /metrics shows the count per datasource, counted after the retention applied.
    let series = format!("dsreg_datasource_dead_letters{{datasource=\"{}\"}} ", ds.id);
    let text = wait_for("the dead letters counted", WAIT, || async {
        let (status, text) = crate::serve::http_get(&app.http_addr.to_string(), "/metrics").await;
        assert_eq!(status, 200);
        text.contains(&series).then_some(text)
    })
    .await;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .unwrap();
    assert_eq!(value.trim(), "3");
    assert!(
        text.contains("dsreg_dead_letters_other_datasources 0"),
        "{text}"
    );
}
