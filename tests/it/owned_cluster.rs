//! The embedded default as one owned process, through the real binary: a second `dsreg serve`
//! on the same data folder is refused naming the running one's pid; after a `kill -9` the next
//! `serve` adopts the Postgres left running and stops it at SIGTERM; rows of instances dead for
//! longer than the retention are deleted at start.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::helpers::wait_for;
use crate::serve::{db_url, dsreg, http_get, serve, terminate};

fn reachable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // As root the server user must be able to traverse the parent of the data folder.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The postmaster's pid from `postmaster.pid`, while the file exists.
fn postmaster_pid(pg_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(pg_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` runs (a zombie waiting for its parent to reap it does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The pids of processes whose command line names `pg_dir` (the postmaster runs with `-D`).
fn processes_on(pg_dir: &Path) -> Vec<u32> {
    let needle = pg_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(pid)
        })
        .collect()
}

#[tokio::test]
async fn a_second_serve_on_the_same_data_folder_is_refused_naming_the_running_pid() {
    let dir = reachable_tempdir();
    let data_dir = dir.path().join("state");
    let (first, http) = serve(&data_dir).await;
    let first_pid = first.id().unwrap();
    let addr_file = data_dir.join("grpc.addr");
    let recorded = wait_for("grpc.addr written", Duration::from_secs(60), || async {
        std::fs::read_to_string(&addr_file)
            .ok()
            .filter(|text| text.ends_with('\n'))
    })
    .await;

    let second = tokio::time::timeout(
        Duration::from_secs(60),
        dsreg(&data_dir)
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .output(),
    )
    .await
    .expect("a second serve on the same folder exits within 60s instead of joining")
    .unwrap();

    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another dsreg process (pid {first_pid}) already owns the embedded PostgreSQL"
        )),
        "the refusal names the running pid: {stderr}"
    );
    assert!(
        !stderr.contains("dsreg serving"),
        "the second never serves: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&addr_file).unwrap(),
        recorded,
        "grpc.addr still names the running server"
    );
    assert_eq!(http_get(&http, "/readyz").await.0, 200);
    terminate(first).await;
}

#[tokio::test]
async fn after_kill_9_the_next_serve_adopts_the_postgres_left_running_and_stops_it_on_sigterm() {
    let dir = reachable_tempdir();
    let data_dir = dir.path().join("state");
    let pg_dir = data_dir.join("pg");
    let (mut killed, _) = serve(&data_dir).await;
    let client = dsreg::db::connect(&db_url(&data_dir).await).await.unwrap();
    // Instances dead for two days (stopped, and silent) go at the next start; one stopped an
    // hour ago stays (the default retention is a day).
    client
        .batch_execute(
            "INSERT INTO dsreg_instances (id, started_at, heartbeat_at, stopped_at) VALUES
               ('old-stopped', now() - interval '3 days', now() - interval '2 days', now() - interval '2 days'),
               ('old-silent', now() - interval '3 days', now() - interval '2 days', NULL),
               ('recent-stopped', now() - interval '2 hours', now() - interval '1 hour', now() - interval '1 hour')",
        )
        .await
        .unwrap();
    // The instance registers once its elector starts, which may follow readiness.
    wait_for("the first instance registered", Duration::from_secs(60), || async {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM dsreg_instances WHERE id NOT LIKE '%-stopped' AND id <> 'old-silent'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    drop(client);
    let postmaster = postmaster_pid(&pg_dir).expect("the embedded server runs");

    killed.start_kill().unwrap();
    killed.wait().await.unwrap();
    assert!(
        alive(postmaster),
        "a killed dsreg leaves its Postgres running"
    );

    let (adopter, http) = serve(&data_dir).await;
    assert_eq!(
        postmaster_pid(&pg_dir),
        Some(postmaster),
        "the running server is adopted, not started twice"
    );
    assert_eq!(http_get(&http, "/readyz").await.0, 200);
    let client = dsreg::db::connect(&db_url(&data_dir).await).await.unwrap();
    let left: Vec<String> = wait_for(
        "the rows of long-dead instances deleted and the adopter registered",
        Duration::from_secs(60),
        || async {
            let ids: Vec<String> = client
                .query("SELECT id FROM dsreg_instances ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            // The adopter registers once its supervisor starts, after the pruning.
            (!ids.iter().any(|id| id.starts_with("old-")) && ids.len() >= 3).then_some(ids)
        },
    )
    .await;
    assert!(left.contains(&"recent-stopped".to_owned()), "{left:?}");
    assert_eq!(
        left.len(),
        3,
        "the killed and the running instance stay too: {left:?}"
    );
    drop(client);

    let listed = dsreg(&data_dir).args(["instances"]).output().await.unwrap();
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{table}");
    let recent = table
        .lines()
        .find(|l| l.starts_with("recent-stopped"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        recent.contains("no (stopped)"),
        "a dead instance says so: {table}"
    );

    terminate(adopter).await;
    wait_for(
        "no PostgreSQL process left on the data folder",
        Duration::from_secs(60),
        || async { (!alive(postmaster) && processes_on(&pg_dir).is_empty()).then_some(()) },
    )
    .await;
    let after = dsreg(&data_dir).args(["db", "url"]).output().await.unwrap();
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("no embedded PostgreSQL is running"),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
}
