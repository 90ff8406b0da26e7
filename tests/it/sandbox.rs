//! Hostile transforms from outside: through the harness RPC of the real binary and as live
//! transforms of a running worker. Each is stopped by the limit it hits, named in the answer;
//! a run past its deadline stops using the CPU, its memory stays bounded, and concurrent runs
//! are capped.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::harness_client::HarnessClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::db::repository::state::State;
use dsreg::domain::WorkerStatus;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{ServeProcess, TestApp, TestDb, test_settings, wait_for};

/// Sums over a 3,000-element array inside a reduce over the same: nine million callback
/// operations, all inside callbacks.
const NESTED_REDUCE: &str = r#"
    let a = []; a.pad(3000, 1);
    let b = a;
    #{ n: a.reduce(|s, x| s + b.reduce(|t, y| t + 1, 0), 0) }
"#;

/// 10,000 strings of 60 KB built through `map`: 600 MB before Rhai would measure the array.
const MAP_BOMB: &str = r#"
    let s = ""; s.pad(60000, 'x');
    let a = []; a.pad(10000, 0);
    #{ out: a.map(|x| s + x) }
"#;

/// A webhook datasource, for test runs on given samples.
async fn webhook(ch: &Channel) -> String {
    DatasourcesClient::new(ch.clone())
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "hook".into(),
            kind: "webhook".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// A test run of `script` over `records` empty records, under `timeout`.
fn test_request(
    id: &str,
    script: &str,
    records: usize,
    timeout: Duration,
) -> tonic::Request<pb::RunTestRequest> {
    let sample = serde_json::Value::Array(vec![serde_json::json!({}); records]);
    let mut request = tonic::Request::new(pb::RunTestRequest {
        datasource_id: id.to_owned(),
        config_json: serde_json::json!({ "transform": script }).to_string(),
        samples_json: vec![sample.to_string()],
        ..Default::default()
    });
    request.set_timeout(timeout);
    request
}

/// CPU time the process `pid` has used, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The scheduling policy of a test-run thread of process `pid` (0 SCHED_OTHER, 5
/// SCHED_IDLE), if one is running.
fn harness_thread_policy(pid: u32) -> Option<i64> {
    harness_thread_stat(pid, 38)?.parse().ok()
}

/// The time test runs rested to keep to their share of a core, from the registry's
/// `/metrics`.
async fn rested_seconds(http_addr: &str) -> f64 {
    let (status, body) = crate::serve::http_get(http_addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("dsreg_harness_rested_seconds_total "))
        .expect("dsreg_harness_rested_seconds_total on /metrics")
        .trim()
        .parse()
        .unwrap()
}

/// Field `n` after the command name of the first test-run thread of `pid`.
fn harness_thread_stat(pid: u32, n: usize) -> Option<String> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(stat) = std::fs::read_to_string(task.ok()?.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != "dsreg-harness" {
            continue;
        }
        // Field 3 of the line is the state, field 41 the policy: the 39th after the name.
        return stat[close + 2..].split(' ').nth(n).map(str::to_owned);
    }
    None
}

/// How many test-run threads process `pid` has.
fn harness_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "dsreg-harness")
        .count()
}

/// The peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test]
async fn hostile_scripts_through_the_harness_are_stopped_by_the_limit_they_hit() {
    let db = TestDb::new().await;
    // The limits are under test, not the pacing: the runs compute without rest (a debug
    // build takes seconds for these scripts).
    let server = ServeProcess::start(
        &db.url,
        &[
            ("DSREG_TRANSFORM_DEADLINE_MS", "20000"),
            ("DSREG_HARNESS_CPU_PERCENT", "100"),
        ],
    )
    .await;
    let ch = server.channel().await;
    let id = webhook(&ch).await;
    let mut harness = HarnessClient::new(ch.clone());

    let reduce = harness
        .run_test(test_request(&id, NESTED_REDUCE, 1, Duration::from_secs(30)))
        .await
        .expect("the run answers")
        .into_inner();
    let bomb = harness
        .run_test(test_request(&id, MAP_BOMB, 1, Duration::from_secs(30)))
        .await
        .expect("the run answers")
        .into_inner();

    assert!(reduce.outputs_json.is_empty(), "{:?}", reduce.outputs_json);
    assert_eq!(reduce.rejected.len(), 1);
    assert_eq!(reduce.rejected[0].code, "too_many_operations");
    assert!(
        reduce.rejected[0].message.contains("100000 operations"),
        "{}",
        reduce.rejected[0].message
    );
    assert_eq!(bomb.rejected.len(), 1);
    assert_eq!(bomb.rejected[0].code, "memory_limit");
    assert!(
        bomb.rejected[0].message.contains("33554432 bytes"),
        "{}",
        bomb.rejected[0].message
    );
    let pid = server.child.id().expect("serve runs");
    assert!(
        peak_rss_kib(pid) < 512 * 1024,
        "peak resident {} KiB",
        peak_rss_kib(pid)
    );
    server.stop().await;
}

#[tokio::test]
async fn harness_runs_past_their_deadline_stop_and_excess_runs_are_refused() {
    let db = TestDb::new().await;
    let server = ServeProcess::start(
        &db.url,
        &[
            ("DSREG_HARNESS_MAX_CONCURRENT_RUNS", "2"),
            ("DSREG_TRANSFORM_DEADLINE_MS", "60000"),
            ("DSREG_TRANSFORM_MAX_OPERATIONS", "1000000000000"),
        ],
    )
    .await;
    let pid = server.child.id().expect("serve runs");
    let ch = server.channel().await;
    let id = webhook(&ch).await;
    assert_eq!(rested_seconds(&server.http_addr).await, 0.0);

    // Three hostile runs at once, each 1,000 records of minutes of work, answered at 1 s.
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let mut harness = HarnessClient::new(ch.clone());
            let request = test_request(&id, NESTED_REDUCE, 1_000, Duration::from_secs(1));
            tokio::spawn(async move { harness.run_test(request).await })
        })
        .collect();
    // While they run, their threads run in the idle scheduling class, below every thread of
    // the registry's own.
    // A run's thread takes its class as it starts, so it may be seen an instant before.
    let idle = i64::from(libc::SCHED_IDLE);
    wait_for(
        "a test run's thread in the idle class",
        Duration::from_secs(5),
        || async { harness_thread_policy(pid).filter(|policy| *policy == idle) },
    )
    .await;
    // And they compute a slice at a time, resting as long as they computed (half a core
    // each by default), however little CPU a busy machine leaves them.
    wait_for(
        "a test run's thread resting between slices",
        Duration::from_secs(30),
        || async { (rested_seconds(&server.http_addr).await > 0.0).then_some(()) },
    )
    .await;
    let mut codes = Vec::new();
    for run in runs {
        codes.push(
            run.await
                .unwrap()
                .expect_err("no hostile run completes")
                .code(),
        );
    }

    codes.sort_by_key(|c| *c as i32);
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == Code::ResourceExhausted)
            .count(),
        1,
        "{codes:?}"
    );
    assert!(
        codes
            .iter()
            .filter(|c| matches!(c, Code::DeadlineExceeded | Code::Cancelled))
            .count()
            == 2,
        "{codes:?}"
    );
    // The runs' work stops once they are answered: their threads end (in the idle class they
    // run only when a core is free, so on a busy machine ending may wait for one), then the
    // process goes idle (under 5 % of a core over a half-second sample); how soon is a
    // bench's figure, so the waits are generous.
    wait_for(
        "the runs' threads ending",
        Duration::from_secs(60),
        || async { (harness_threads(pid) == 0).then_some(()) },
    )
    .await;
    let idle = wait_for(
        "the registry going idle",
        Duration::from_secs(30),
        || async {
            let before = cpu_ticks(pid);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let used = cpu_ticks(pid) - before;
            (used <= 2).then_some(used)
        },
    )
    .await;
    assert!(idle <= 2);
    // And their slots are free: two runs fit again.
    for _ in 0..2 {
        let report = HarnessClient::new(ch.clone())
            .run_test(test_request(&id, "#{ n: 1 }", 1, Duration::from_secs(5)))
            .await
            .expect("a slot is free")
            .into_inner();
        assert_eq!(report.outputs_json, vec!["{\"n\":1}"]);
    }
    server.stop().await;
}

/// Publishes a generator whose transform runs `script` on every other record.
async fn live(db: &TestDb, script: &str) -> uuid::Uuid {
    let ds = db.datasource_of("ticks", "generator").await;
    let transform = format!("if record.seq % 2 == 0 {{ {script} }} else {{ record }}");
    let v = db
        .version(
            ds.id,
            serde_json::json!({ "rate_per_sec": 20, "template": {}, "transform": transform }),
        )
        .await;
    db.publish_sql(ds.id, v).await;
    ds.id
}

/// Dead letters of a datasource: (code, message).
async fn dead_letters(db: &TestDb, id: uuid::Uuid) -> Vec<(String, String)> {
    db.client()
        .await
        .query(
            "SELECT error_code, error FROM datasource_dead_letters WHERE datasource_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn hostile_live_transforms_dead_letter_their_records_and_the_worker_keeps_running() {
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.transform_deadline_ms = 20_000;
    let _app = TestApp::spawn_with(settings, |_| {}).await;
    let reduce = live(&db, NESTED_REDUCE).await;

    let letters = wait_for("two dead letters", Duration::from_secs(30), || async {
        let letters = dead_letters(&db, reduce).await;
        (letters.len() >= 2).then_some(letters)
    })
    .await;
    for (code, message) in &letters {
        assert_eq!(code, "too_many_operations");
        assert!(message.contains("100000 operations"), "{message}");
    }
    db.wait_for_state(reduce, "the worker running and writing", |s: &State| {
        s.worker_status == WorkerStatus::Running
    })
    .await;
    wait_for(
        "records of the other half written",
        Duration::from_secs(30),
        || async { (db.records(reduce, 1).await >= 2).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_live_map_bomb_is_stopped_by_the_memory_limit() {
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.transform_deadline_ms = 20_000;
    let _app = TestApp::spawn_with(settings, |_| {}).await;
    let bomb = live(&db, MAP_BOMB).await;

    let letters = wait_for("two dead letters", Duration::from_secs(30), || async {
        let letters = dead_letters(&db, bomb).await;
        (letters.len() >= 2).then_some(letters)
    })
    .await;
    for (code, message) in &letters {
        assert_eq!(code, "memory_limit");
        assert!(message.contains("33554432 bytes"), "{message}");
    }
}

/// The fields named in a status's BadRequest details.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_call_to_an_unknown_function_is_refused_at_create_publish_and_test() {
    let db = TestDb::new().await;
    let (_app, ch) = crate::grpc::serve(&db).await;
    let id = webhook(&ch).await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let script = "let n = record.n;\nfrobnicate(n)";
    let config = serde_json::json!({ "transform": script }).to_string();

    let created = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: config.clone(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    // A draft written by a SQL client, which no check stood in front of.
    let uuid: uuid::Uuid = id.parse().unwrap();
    let v = db
        .version(uuid, serde_json::json!({ "transform": script }))
        .await;
    let published = ds
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.clone(),
            version: v,
        })
        .await
        .unwrap_err();
    let tested = HarnessClient::new(ch.clone())
        .run_test(test_request(&id, script, 1, Duration::from_secs(5)))
        .await
        .unwrap_err();

    for status in [&created, &published, &tested] {
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::FailedPrecondition
            ),
            "{status:?}"
        );
        assert!(
            status
                .message()
                .contains("unknown function frobnicate at line 2, column 1"),
            "{status:?}"
        );
        assert_eq!(
            violated_fields(status).first().map(String::as_str),
            Some("config_json.transform"),
            "{status:?}"
        );
    }
    assert_eq!(created.code(), Code::InvalidArgument);
    assert_eq!(tested.code(), Code::InvalidArgument);
}

/// A script whose `sort` hands the standard library an inconsistent order (NaN among
/// floats): the sort panics inside Rhai.
const NAN_SORT: &str = r#"
    let a = [];
    for i in 0..21 {
        if i % 3 == 0 { a.push(parse_float("NaN")) } else { a.push(((i * 7919) % 101).to_float()) }
    }
    a.sort();
    record
"#;

#[tokio::test]
async fn a_panic_provoked_from_outside_is_one_structured_log_line_and_counted() {
    let db = TestDb::new().await;
    let server = ServeProcess::start(&db.url, &[]).await;
    let ch = server.channel().await;
    let id = webhook(&ch).await;
    let panics = || async {
        let (status, body) = crate::serve::http_get(&server.http_addr, "/metrics").await;
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix("dsreg_panics_total "))
            .expect("dsreg_panics_total on /metrics")
            .trim()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(panics().await, 0.0);

    let answer = HarnessClient::new(ch.clone())
        .run_test(test_request(&id, NAN_SORT, 1, Duration::from_secs(30)))
        .await
        .expect("the run answers")
        .into_inner();
    assert!(answer.outputs_json.is_empty(), "{:?}", answer.outputs_json);
    assert_eq!(answer.rejected.len(), 1, "the record is rejected, not lost");

    // The panic is counted and written as one JSON line at ERROR naming where it happened.
    assert_eq!(panics().await, 1.0);
    wait_for("the panic's log line", Duration::from_secs(60), || async {
        let logs = server.logs.lock().unwrap();
        logs.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|line| line["panic.location"].is_string())
    })
    .await;
    let logs = server.logs.lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = logs
        .iter()
        .filter(|l| l.contains("panic.location"))
        .map(|l| serde_json::from_str(l).expect("the panic's line is JSON"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["level"], "ERROR", "{}", lines[0]);
    assert!(
        lines[0]["panic.message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        lines[0]
    );
    server.stop().await;
}

/// Never ends on its own: only the deadline (or the operation limit) stops it.
const SPIN: &str = "let n = 0; loop { n += 1; }";

#[tokio::test]
async fn get_status_is_answered_while_twenty_hostile_harness_runs_are_in_flight() {
    let db = TestDb::new().await;
    let server = ServeProcess::start(
        &db.url,
        &[
            ("DSREG_HARNESS_MAX_CONCURRENT_RUNS", "20"),
            ("DSREG_TRANSFORM_DEADLINE_MS", "60000"),
            ("DSREG_TRANSFORM_MAX_OPERATIONS", "1000000000000"),
        ],
    )
    .await;
    let ch = server.channel().await;
    let id = webhook(&ch).await;
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(20));

    // Twenty hostile runs at once (runaway loops, nested closures, output bombs), each cut
    // off by its caller's 5 s deadline.
    let harness_ch = server.channel().await;
    let runs: Vec<_> = (0..20)
        .map(|i| {
            let script = [SPIN, NESTED_REDUCE, MAP_BOMB][i % 3];
            let mut harness = HarnessClient::new(harness_ch.clone());
            let request = test_request(&id, script, 1_000, Duration::from_secs(5));
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let answer = harness.run_test(request).await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                answer
            })
        })
        .collect();

    // A bystander on its own connection: every GetStatus is answered while they run.
    let mut lifecycle = LifecycleClient::new(server.channel().await);
    let mut answered_during = 0;
    while in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        let mut request = tonic::Request::new(pb::GetStatusRequest {
            datasource_id: id.clone(),
        });
        request.set_timeout(Duration::from_secs(30));
        let state = lifecycle
            .get_status(request)
            .await
            .expect("GetStatus is answered during the runs")
            .into_inner();
        assert_eq!(state.datasource_id, id);
        if in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            answered_during += 1;
        }
    }
    assert!(
        answered_during >= 3,
        "{answered_during} GetStatus calls answered while runs were in flight"
    );
    for run in runs {
        let code = run
            .await
            .unwrap()
            .expect_err("no hostile run completes")
            .code();
        assert!(
            matches!(code, Code::DeadlineExceeded | Code::Cancelled),
            "{code:?}"
        );
    }
    server.stop().await;
}
