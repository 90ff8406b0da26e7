//! The embedded Postgres launcher: create, start, reuse, stop, restart with data kept, and
//! clear errors. Runs as whatever user the tests run as; as root it checks that the server
//! runs as the unprivileged user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use dsreg::db::embedded::{self, ClusterOptions, EmbeddedCluster, LaunchError};

fn reachable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // As root the server user must be able to traverse the parent of the data folder.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

async fn count_rows(url: &str) -> i64 {
    let client = dsreg::db::connect(url).await.unwrap();
    client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0)
}

async fn start(options: &ClusterOptions) -> Result<EmbeddedCluster, LaunchError> {
    let options = options.clone();
    tokio::task::spawn_blocking(move || EmbeddedCluster::start(&options))
        .await
        .unwrap()
}

#[tokio::test]
async fn the_launcher_starts_reuses_stops_and_restarts_a_cluster_with_its_data() {
    let dir = reachable_tempdir();
    let options = ClusterOptions {
        throwaway: true,
        ..ClusterOptions::durable(dir.path().join("pg"))
    };
    let mut first = start(&options).await.unwrap();
    assert!(first.started_here());
    let client = dsreg::db::connect(&first.url("postgres")).await.unwrap();
    client
        .batch_execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    if nix::unistd::geteuid().is_root() {
        let owner = std::fs::metadata(first.data_dir()).unwrap().uid();
        assert_ne!(
            owner, 0,
            "as root, the data folder belongs to the server user"
        );
        let pid: u32 = std::fs::read_to_string(first.data_dir().join("postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let server_owner = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
        assert_ne!(server_owner, 0, "the server does not run as root");
    }

    // A second launcher on the same folder reuses the running server and leaves it running.
    let mut second = start(&options).await.unwrap();
    assert!(!second.started_here());
    assert_eq!(second.port(), first.port());
    assert_eq!(
        embedded::running_url(first.data_dir()).unwrap(),
        first.url(embedded::DATABASE)
    );
    second.stop().unwrap();
    assert_eq!(count_rows(&first.url("postgres")).await, 1);
    drop(client);

    first.stop().unwrap();
    assert!(matches!(
        embedded::running_url(first.data_dir()),
        Err(LaunchError::NotRunning(_))
    ));

    let mut third = start(&options).await.unwrap();
    assert!(third.started_here());
    assert_eq!(
        count_rows(&third.url("postgres")).await,
        1,
        "data persists across restarts"
    );
    third.stop().unwrap();
}

#[tokio::test]
async fn a_configured_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = reachable_tempdir();
    let options = ClusterOptions {
        port: Some(port),
        throwaway: true,
        ..ClusterOptions::durable(dir.path().join("pg"))
    };
    let err = start(&options).await.unwrap_err();
    assert!(
        matches!(err, LaunchError::PortInUse(p) if p == port),
        "{err}"
    );
    assert!(err.to_string().contains("already in use"), "{err}");
}

#[tokio::test]
async fn a_data_folder_owned_by_someone_else_is_refused() {
    let dir = reachable_tempdir();
    let data = dir.path().join("pg");
    std::fs::create_dir(&data).unwrap();
    let foreign = if nix::unistd::geteuid().is_root() {
        // nobody: neither root nor the server user.
        nix::unistd::chown(&data, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        data
    } else {
        std::path::PathBuf::from("/")
    };
    let err = start(&ClusterOptions::durable(&foreign)).await.unwrap_err();
    assert!(matches!(err, LaunchError::ForeignOwner { .. }), "{err}");
    assert!(err.to_string().contains("is owned by"), "{err}");
}

#[tokio::test]
async fn a_cluster_that_will_not_start_reports_the_tail_of_its_log() {
    let dir = reachable_tempdir();
    let options = ClusterOptions {
        throwaway: true,
        ..ClusterOptions::durable(dir.path().join("pg"))
    };
    let mut cluster = start(&options).await.unwrap();
    cluster.stop().unwrap();
    // A setting the server refuses makes every later start fail.
    let conf = dir.path().join("pg").join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nshared_buffers = 'not a size'\n");
    std::fs::write(&conf, text).unwrap();
    let err = start(&options).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            LaunchError::Tool {
                step: "pg_ctl start",
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("shared_buffers"),
        "the log tail names the cause: {message}"
    );
}
