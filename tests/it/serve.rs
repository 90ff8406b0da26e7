//! The README's first command: `dsreg serve` on the embedded default, end to end through the
//! real binary: it migrates, serves `/healthz` and `/readyz`, `dsreg db url` reaches its
//! database, SIGTERM stops it with exit 0, and a second start keeps the data.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const DSREG: &str = env!("CARGO_BIN_EXE_dsreg");

pub fn dsreg(data_dir: &Path) -> Command {
    let mut command = Command::new(DSREG);
    command
        .env_remove("DATABASE_URL")
        .env("DSREG_LOG", "info")
        .env("DSREG_DATA_DIR", data_dir)
        .kill_on_drop(true);
    command
}

/// Starts `dsreg serve` on free ports; returns the child and its HTTP address once it serves.
pub async fn serve(data_dir: &Path) -> (Child, String) {
    let mut child = dsreg(data_dir)
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let http = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                && json["message"] == "dsreg serving"
            {
                return json["http"].as_str().unwrap().to_owned();
            }
        }
        panic!("dsreg serve exited before serving");
    })
    .await
    .expect("dsreg serve serving within 60s");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, http)
}

pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: dsreg\r\nConnection: close\r\n\r\n").as_bytes(),
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

pub async fn db_url(data_dir: &Path) -> String {
    let output = dsreg(data_dir).args(["db", "url"]).output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

pub async fn terminate(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("dsreg exits within 30s of SIGTERM")
        .unwrap();
    assert!(status.success(), "dsreg exits 0 on SIGTERM, got {status}");
}

#[tokio::test]
async fn dsreg_serve_runs_on_the_embedded_default_and_keeps_its_data_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("state");

    let (child, http) = serve(&data_dir).await;
    assert_eq!(http_get(&http, "/healthz").await.0, 200);
    let (status, body) = http_get(&http, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let url = db_url(&data_dir).await;
    let client = dsreg::db::connect(&url).await.unwrap();
    client
        .execute("INSERT INTO datasources (org, project, name, kind) VALUES ('acme', 'core', 'kept', 'generator')", &[])
        .await
        .unwrap();
    drop(client);
    terminate(child).await;

    let stopped = dsreg(&data_dir).args(["db", "url"]).output().await.unwrap();
    assert!(!stopped.status.success());
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("no embedded PostgreSQL is running"));

    let (child, http) = serve(&data_dir).await;
    assert_eq!(http_get(&http, "/readyz").await.0, 200);
    let client = dsreg::db::connect(&db_url(&data_dir).await).await.unwrap();
    let kept: i64 = client
        .query_one("SELECT count(*) FROM datasources WHERE name = 'kept'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the second start reuses the cluster and its data");
    drop(client);
    terminate(child).await;
}
