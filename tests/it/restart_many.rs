//! `dsreg worker restart --failed` through the real binary and API: of 20 datasources of which
//! 5 fail, a dry run lists exactly the 5 and restarts nothing; the restart restarts exactly
//! those 5 (a restart request and an audit row each), answering each with the state reached.
//! Bad filters are INVALID_ARGUMENT naming the field.

use std::collections::BTreeSet;
use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use uuid::Uuid;

use crate::cli::{dsreg, run};
use crate::helpers::cluster::fleet;
use crate::helpers::{TestApp, TestDb, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// `n` generator datasources whose published version's transform does not compile: each
/// worker is refused, in ERROR.
async fn failing(db: &TestDb, n: i64) -> Vec<Uuid> {
    let config = serde_json::json!({
        "rate_per_sec": 1, "template": {}, "transform": "let = ;"
    });
    crate::helpers::cluster::published(&**db.client().await, "broken", n, &config).await
}

async fn statuses(db: &TestDb, ids: &[Uuid]) -> Vec<(Uuid, String, i64)> {
    db.client()
        .await
        .query(
            "SELECT datasource_id, worker_status, restart_generation FROM datasource_state
             WHERE datasource_id = ANY($1) ORDER BY datasource_id",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn ids_of(lines: &[serde_json::Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| l["datasource_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn restart_failed_restarts_exactly_the_failing_workers() {
    let db = TestDb::new().await;
    let healthy = fleet(&**db.client().await, 15, 1.0).await;
    let broken = failing(&db, 5).await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let url = format!("http://{}", app.grpc_addr);
    let all: Vec<Uuid> = healthy.iter().chain(&broken).copied().collect();
    wait_for("15 running and 5 in error", WAIT, || async {
        let now = statuses(&db, &all).await;
        let running = now.iter().filter(|(_, s, _)| s == "running").count();
        let error = now
            .iter()
            .filter(|(id, s, _)| s == "error" && broken.contains(id))
            .count();
        (running == 15 && error == 5).then_some(())
    })
    .await;
    let want: BTreeSet<String> = broken.iter().map(Uuid::to_string).collect();
    let dir = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let mut command = dsreg(dir.path());
        command.args(args).args(["--server", &url]);
        command
    };

    // A dry run lists the five and restarts nothing.
    let dry = run(
        cli(&["worker", "restart", "--failed", "--dry-run", "-o", "json"]),
        None,
    )
    .await;
    dry.assert_success();
    assert_eq!(ids_of(&dry.json_lines()), want, "{}", dry.stdout);
    assert!(
        statuses(&db, &all).await.iter().all(|(_, _, g)| *g == 0),
        "a dry run restarted something"
    );
    let table = run(cli(&["worker", "restart", "--failed", "--dry-run"]), None).await;
    table.assert_success();
    assert!(table.stdout.contains("5 would restart"), "{}", table.stdout);

    // The restart: exactly the five, each answered with the state it reached (they fail
    // again: not settled, and the command says so).
    let restarted = run(cli(&["worker", "restart", "--failed", "-o", "json"]), None).await;
    assert_eq!(restarted.status.code(), Some(1), "{}", restarted.stderr);
    let lines = restarted.json_lines();
    assert_eq!(ids_of(&lines), want, "{}", restarted.stdout);
    for line in &lines {
        assert_eq!(line["status"], "error", "{line}");
        assert_eq!(line["settled"], false, "{line}");
        assert_eq!(line["restarts_requested"], 1, "{line}");
    }
    assert!(
        restarted
            .stderr
            .contains("5 of 5 workers are not running again"),
        "{}",
        restarted.stderr
    );
    for (id, status, generation) in statuses(&db, &all).await {
        let expected = i64::from(broken.contains(&id));
        assert_eq!(generation, expected, "{id} ({status})");
    }
    let audited: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'RestartWorkers' AND target_id = ANY($1)",
            &[&broken],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 5);

    // Bad filters are refused naming the field; no filter at all is refused too.
    let mut lifecycle = LifecycleClient::connect(url.clone()).await.unwrap();
    for (request, field) in [
        (
            pb::RestartWorkersRequest {
                statuses: vec![pb::WorkerStatus::Running as i32],
                ..Default::default()
            },
            "statuses[0]",
        ),
        (
            pb::RestartWorkersRequest {
                datasource_ids: vec!["not-a-uuid".into()],
                ..Default::default()
            },
            "datasource_ids[0]",
        ),
        (pb::RestartWorkersRequest::default(), "statuses"),
    ] {
        let refused = lifecycle.restart_workers(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{refused:?}");
    }
    app.stop().await.unwrap();
}
