//! The `dsreg` command line through the real binary: `dsreg keys` against a test database and
//! a temporary key file; the client against a scripted gRPC server (secret values from stdin
//! and never printed, the token header, field violations, watch resumption, the data folder's
//! address and admin token); and the client against a live registry (ignored until the
//! registry serves the `dsreg.v1` services).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use dsreg::api::grpc::pb;
use dsreg::db::repository::{self as repo, WriteContext};
use dsreg::secrets::{EnvKeyProvider, FileKeyProvider, SecretString, Secrets};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use crate::helpers::{TestApp, TestDb};

const DSREG: &str = env!("CARGO_BIN_EXE_dsreg");

/// The binary with nothing inherited that would pick a server, token, key or database, and
/// `data_dir` as its data folder.
fn dsreg(data_dir: &Path) -> Command {
    let mut command = Command::new(DSREG);
    for name in [
        "DATABASE_URL",
        "DSREG_SERVER",
        "DSREG_TOKEN",
        "DSREG_TOKEN_FILE",
        "DSREG_MASTER_KEYS",
        "DSREG_MASTER_KEY_FILE",
        "DSREG_ACTIVE_KEY_VERSION",
    ] {
        command.env_remove(name);
    }
    command
        .env("DSREG_DATA_DIR", data_dir)
        .env("DSREG_LOG", "warn")
        .kill_on_drop(true);
    command
}

/// What a finished command left behind.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status.code(),
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout as JSON lines.
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    fn mentions(&self, text: &str) -> bool {
        self.stdout.contains(text) || self.stderr.contains(text)
    }
}

/// Runs `command` to its end with `stdin` (or an empty stdin).
async fn run(mut command: Command, stdin: Option<&[u8]>) -> Ran {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input).await.unwrap();
    }
    drop(pipe);
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command ends within 60 s")
        .unwrap();
    Ran {
        status: output.status,
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn canary(tag: &str) -> String {
    format!("canary-{tag}-{}", Uuid::new_v4().simple())
}

// ---------------------------------------------------------------------------------------------
// dsreg keys

/// Seals `values` (datasource, name, value) under `secrets` in one transaction.
async fn put_all(db: &TestDb, secrets: &Secrets, values: &[(Uuid, String, String)]) {
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    for (ds, name, value) in values {
        secrets
            .put(&tx, *ds, name, &SecretString::new(value.clone()).unwrap())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// `dsreg keys <args>` on `db` with the key file `key_file`.
fn keys(dir: &Path, db: &TestDb, key_file: &Path, args: &[&str]) -> Command {
    let mut command = dsreg(dir);
    command
        .env("DATABASE_URL", &db.url)
        .env("DSREG_MASTER_KEY_FILE", key_file)
        .arg("keys")
        .args(args);
    command
}

fn key_rows(ran: &Ran) -> Vec<(u64, u64, bool)> {
    ran.json_lines()
        .iter()
        .map(|v| {
            assert_eq!(v["loaded"], true, "{v}");
            (
                v["key_version"].as_u64().unwrap(),
                v["secrets"].as_u64().unwrap(),
                v["active"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn keys_status_rotate_and_rewrap_move_every_secret_to_a_new_key_version() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.json");
    assert!(FileKeyProvider::create_dev(&key_file).unwrap());
    let v1 = Secrets::new(Arc::new(FileKeyProvider::load(&key_file).unwrap()));
    let a = db.datasource("alpha").await.id;
    let b = db.datasource("beta").await.id;
    let values = vec![
        (a, "token".to_owned(), canary("a-token")),
        (a, "password".to_owned(), canary("a-password")),
        (b, "token".to_owned(), canary("b-token")),
    ];
    put_all(&db, &v1, &values).await;
    let mut outputs = Vec::new();

    let status = run(
        keys(dir.path(), &db, &key_file, &["status", "-o", "json"]),
        None,
    )
    .await;
    status.assert_success();
    assert_eq!(key_rows(&status), [(1, 3, true)]);
    outputs.push(status);

    let rotated = run(keys(dir.path(), &db, &key_file, &["rotate"]), None).await;
    rotated.assert_success();
    assert!(
        rotated.stdout.contains("added key version 2"),
        "{}",
        rotated.stdout
    );
    assert!(
        rotated.stdout.contains("dsreg keys rewrap"),
        "{}",
        rotated.stdout
    );
    outputs.push(rotated);

    let status = run(keys(dir.path(), &db, &key_file, &["status"]), None).await;
    status.assert_success();
    assert_eq!(
        status.stdout,
        "VERSION  SECRETS  ACTIVE  LOADED\n\
         1        3                yes\n\
         2        0        yes     yes\n"
    );
    outputs.push(status);

    let rewrapped = run(
        keys(
            dir.path(),
            &db,
            &key_file,
            &["rewrap", "--batch-size", "2", "-o", "json"],
        ),
        None,
    )
    .await;
    rewrapped.assert_success();
    let report = &rewrapped.json_lines()[0];
    assert_eq!(report["active_version"], 2);
    assert_eq!(report["total"], 3);
    assert_eq!(report["rewrapped"], 3);
    assert_eq!(report["remaining"], 0);
    assert_eq!(report["stopped"], false);
    assert_eq!(report["failed"], serde_json::json!([]));
    // stderr is not a terminal here: plain progress lines, the last one complete.
    assert!(
        rewrapped.stderr.contains("rewrap: 3/3 rows"),
        "{}",
        rewrapped.stderr
    );
    outputs.push(rewrapped);

    let status = run(
        keys(dir.path(), &db, &key_file, &["status", "-o", "json"]),
        None,
    )
    .await;
    status.assert_success();
    assert_eq!(key_rows(&status), [(1, 0, false), (2, 3, true)]);
    outputs.push(status);

    let again = run(keys(dir.path(), &db, &key_file, &["rewrap"]), None).await;
    again.assert_success();
    assert!(
        again
            .stdout
            .contains("every secret is already on key version 2"),
        "{}",
        again.stdout
    );
    outputs.push(again);

    // The values are intact under the rotated key file, and no command printed one.
    let v2 = Secrets::new(Arc::new(FileKeyProvider::load(&key_file).unwrap()));
    let client = db.client().await;
    for (ds, name, value) in &values {
        let opened = v2.open_all(&**client, *ds).await.unwrap();
        assert_eq!(opened[name].expose(), value);
        for ran in &outputs {
            assert!(!ran.mentions(value), "a command printed a secret value");
        }
    }
}

#[tokio::test]
async fn keys_rewrap_stops_after_its_batch_on_ctrl_c_and_the_next_run_finishes() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.json");
    assert!(FileKeyProvider::create_dev(&key_file).unwrap());
    let v1 = Secrets::new(Arc::new(FileKeyProvider::load(&key_file).unwrap()));
    let mut values = Vec::new();
    for d in 0..10 {
        let ds = db.datasource(&format!("ds{d}")).await.id;
        for s in 0..100 {
            values.push((ds, format!("s{s:03}"), format!("value-{d}-{s}")));
        }
    }
    put_all(&db, &v1, &values).await;
    assert_eq!(FileKeyProvider::add_version(&key_file).unwrap(), 2);

    let mut child = keys(dir.path(), &db, &key_file, &["rewrap", "--batch-size", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            let progress = line.starts_with("rewrap: ");
            seen.push(line);
            if progress {
                return;
            }
        }
        panic!("rewrap ended without progress: {seen:?}");
    })
    .await
    .expect("a first batch within 60 s");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("rewrap stops within 30 s of Ctrl-C")
        .unwrap();
    while let Some(line) = stderr.next_line().await.unwrap() {
        seen.push(line);
    }
    let stderr = seen.join("\n");

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopping after the current batch"),
        "{stderr}"
    );
    assert!(
        stderr.contains("run `dsreg keys rewrap` again to resume"),
        "{stderr}"
    );
    let status = run(
        keys(dir.path(), &db, &key_file, &["status", "-o", "json"]),
        None,
    )
    .await;
    let rows = key_rows(status.assert_success());
    assert!(rows[0].1 > 0 && rows[1].1 > 0, "stopped part way: {rows:?}");
    assert_eq!(rows[0].1 + rows[1].1, 1_000);

    let resumed = run(
        keys(
            dir.path(),
            &db,
            &key_file,
            &["rewrap", "--batch-size", "500"],
        ),
        None,
    )
    .await;
    resumed.assert_success();
    let status = run(
        keys(dir.path(), &db, &key_file, &["status", "-o", "json"]),
        None,
    )
    .await;
    assert_eq!(
        key_rows(status.assert_success()),
        [(1, 0, false), (2, 1_000, true)]
    );
}

#[tokio::test]
async fn keys_rotate_with_keys_in_the_environment_explains_the_steps_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);

    let mut command = dsreg(dir.path());
    command
        .env("DATABASE_URL", "postgres://unused@127.0.0.1:1/unused")
        .env("DSREG_MASTER_KEYS", format!("1:{key}"))
        .args(["keys", "rotate"]);
    let ran = run(command, None).await;

    assert_eq!(ran.status.code(), Some(1), "{}", ran.stderr);
    assert!(ran.stderr.contains("DSREG_MASTER_KEYS"), "{}", ran.stderr);
    assert!(ran.stderr.contains("2:<new key>"), "{}", ran.stderr);
    assert!(ran.stderr.contains("dsreg keys rewrap"), "{}", ran.stderr);
    assert!(!ran.mentions(&key), "the existing key was printed");
}

// ---------------------------------------------------------------------------------------------
// The client against a scripted server

/// What the scripted server saw.
#[derive(Debug, Default)]
struct Seen {
    /// The `authorization` header of every call.
    authorization: Vec<Option<String>>,
    /// Every secret value put.
    secret_values: Vec<Vec<u8>>,
    /// The `after_id` of every watch.
    watch_after_ids: Vec<i64>,
}

/// A gRPC server with scripted answers: `GetInfo`, `PutSecret`, a `CreateDatasource` that
/// refuses with a field violation, and a `WatchEvents` whose first stream breaks after two
/// events.
#[derive(Clone, Default)]
struct Scripted {
    seen: Arc<Mutex<Seen>>,
}

impl Scripted {
    fn record<T>(&self, request: &Request<T>) {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        self.seen.lock().unwrap().authorization.push(header);
    }

    fn authorization(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().authorization.clone()
    }
}

/// Serves `scripted` on a free port; returns its URL (the server stops with the test).
async fn serve(scripted: Scripted) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(pb::registry_server::RegistryServer::new(scripted.clone()))
        .add_service(pb::secrets_server::SecretsServer::new(scripted.clone()))
        .add_service(pb::datasources_server::DatasourcesServer::new(
            scripted.clone(),
        ))
        .add_service(pb::events_server::EventsServer::new(scripted))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    format!("http://{addr}")
}

#[tonic::async_trait]
impl pb::registry_server::Registry for Scripted {
    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        self.record(&request);
        Ok(Response::new(pb::GetInfoResponse {
            version: "9.9.9".into(),
            instance_id: "scripted".into(),
            schema_version: 7,
        }))
    }

    async fn get_registry_metrics(
        &self,
        _: Request<pb::GetRegistryMetricsRequest>,
    ) -> Result<Response<pb::RegistryMetrics>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

#[tonic::async_trait]
impl pb::secrets_server::Secrets for Scripted {
    async fn put_secret(
        &self,
        request: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::SecretMeta>, Status> {
        self.record(&request);
        let request = request.into_inner();
        self.seen.lock().unwrap().secret_values.push(request.value);
        Ok(Response::new(pb::SecretMeta {
            name: request.name,
            key_version: 1,
            fingerprint: "f1f1".into(),
            ..Default::default()
        }))
    }

    async fn delete_secret(
        &self,
        _: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn list_secrets(
        &self,
        _: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

#[tonic::async_trait]
impl pb::datasources_server::Datasources for Scripted {
    async fn create_datasource(
        &self,
        request: Request<pb::CreateDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        self.record(&request);
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("name", "must be 1-128 of [A-Za-z0-9_.-]");
        Err(Status::with_error_details(
            tonic::Code::InvalidArgument,
            "invalid datasource",
            details,
        ))
    }

    async fn get_datasource(
        &self,
        _: Request<pb::GetDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        Err(Status::not_found("datasource not found"))
    }

    async fn list_datasources(
        &self,
        _: Request<pb::ListDatasourcesRequest>,
    ) -> Result<Response<pb::ListDatasourcesResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn update_datasource(
        &self,
        _: Request<pb::UpdateDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn archive_datasource(
        &self,
        _: Request<pb::ArchiveDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn create_version(
        &self,
        _: Request<pb::CreateVersionRequest>,
    ) -> Result<Response<pb::Version>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn get_version(
        &self,
        _: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::Version>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn list_versions(
        &self,
        _: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn update_version(
        &self,
        _: Request<pb::UpdateVersionRequest>,
    ) -> Result<Response<pb::Version>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn publish_version(
        &self,
        _: Request<pb::PublishVersionRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn rollback_version(
        &self,
        _: Request<pb::RollbackVersionRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Event, Status>> + Send>>;

fn event(id: i64) -> pb::Event {
    pb::Event {
        id,
        datasource_id: "ds-1".into(),
        r#type: "published".into(),
        version: 1,
        actor: "alice".into(),
        payload_json: format!(r#"{{"n": {id}}}"#),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl pb::events_server::Events for Scripted {
    async fn list_events(
        &self,
        _: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use tokio_stream::StreamExt;
        self.record(&request);
        let after = request.into_inner().after_id;
        let first = {
            let mut seen = self.seen.lock().unwrap();
            seen.watch_after_ids.push(after);
            seen.watch_after_ids.len() == 1
        };
        let stream: EventStream = if first {
            // Two events, then the connection "drops".
            Box::pin(tokio_stream::iter(vec![
                Ok(event(after + 1)),
                Ok(event(after + 2)),
                Err(Status::unavailable("connection reset")),
            ]))
        } else {
            Box::pin(tokio_stream::iter(vec![Ok(event(after + 1))]).chain(tokio_stream::pending()))
        };
        Ok(Response::new(stream))
    }
}

#[tokio::test]
async fn secret_put_reads_the_value_from_stdin_and_never_prints_it() {
    let scripted = Scripted::default();
    let url = serve(scripted.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let value = canary("stdin");
    let file_value = format!("{}\n", canary("file"));
    let file = dir.path().join("value.txt");
    std::fs::write(&file, &file_value).unwrap();

    let mut outputs = Vec::new();
    for output in ["table", "json"] {
        let mut command = dsreg(dir.path());
        command.env("DSREG_TOKEN", "tok-123").args([
            "secret", "put", "ds-1", "api_key", "--server", &url, "-o", output,
        ]);
        let ran = run(command, Some(format!("{value}\n").as_bytes())).await;
        ran.assert_success();
        assert!(ran.stdout.contains("api_key"), "{}", ran.stdout);
        outputs.push(ran);
    }
    let mut command = dsreg(dir.path());
    command.env("DSREG_TOKEN", "tok-123").args([
        "secret",
        "put",
        "ds-1",
        "cert",
        "--from-file",
        file.to_str().unwrap(),
        "--server",
        &url,
    ]);
    let ran = run(command, None).await;
    ran.assert_success();
    outputs.push(ran);

    let seen = scripted.seen.lock().unwrap();
    assert_eq!(
        seen.secret_values,
        [
            value.as_bytes().to_vec(),
            value.as_bytes().to_vec(),
            file_value.as_bytes().to_vec(),
        ],
        "stdin loses one trailing newline; a file is sent byte for byte"
    );
    assert_eq!(
        seen.authorization,
        vec![Some("Bearer tok-123".to_owned()); 3]
    );
    for ran in &outputs {
        assert!(!ran.mentions(&value) && !ran.mentions(file_value.trim()));
        assert!(!ran.mentions("tok-123"), "the token was printed");
    }
    assert_eq!(outputs[1].json_lines()[0]["name"], "api_key");
}

#[tokio::test]
async fn secret_put_refuses_a_value_on_the_command_line_or_an_empty_stdin() {
    let scripted = Scripted::default();
    let url = serve(scripted.clone()).await;
    let dir = tempfile::tempdir().unwrap();

    let mut command = dsreg(dir.path());
    command.args([
        "secret", "put", "ds-1", "api_key", "hunter2", "--server", &url,
    ]);
    assert_eq!(run(command, None).await.status.code(), Some(2));
    let mut command = dsreg(dir.path());
    command.args([
        "secret", "put", "ds-1", "api_key", "--value", "hunter2", "--server", &url,
    ]);
    assert_eq!(run(command, None).await.status.code(), Some(2));
    let mut command = dsreg(dir.path());
    command.args(["secret", "put", "ds-1", "api_key", "--server", &url]);
    let empty = run(command, Some(b"")).await;
    assert_eq!(empty.status.code(), Some(1));
    assert!(empty.stderr.contains("empty"), "{}", empty.stderr);

    assert!(scripted.seen.lock().unwrap().secret_values.is_empty());
}

#[tokio::test]
async fn a_refused_call_prints_its_code_message_and_field_violations() {
    let scripted = Scripted::default();
    let url = serve(scripted.clone()).await;
    let dir = tempfile::tempdir().unwrap();

    let mut command = dsreg(dir.path());
    command.args([
        "datasource",
        "create",
        "--org",
        "acme",
        "--project",
        "core",
        "--name",
        "bad name",
        "--kind",
        "generator",
        "--server",
        &url,
    ]);
    let ran = run(command, None).await;

    assert_eq!(ran.status.code(), Some(1));
    assert!(
        ran.stderr.contains(
            "INVALID_ARGUMENT: invalid datasource\n  name: must be 1-128 of [A-Za-z0-9_.-]"
        ),
        "{}",
        ran.stderr
    );
    assert!(ran.stdout.is_empty());
    assert_eq!(scripted.authorization(), [None], "no token, no header");

    let mut command = dsreg(dir.path());
    command.args(["datasource", "get", "nope", "--server", &url]);
    let ran = run(command, None).await;
    assert_eq!(ran.status.code(), Some(1));
    assert!(
        ran.stderr.contains("NOT_FOUND: datasource not found"),
        "{}",
        ran.stderr
    );
}

#[tokio::test]
async fn events_watch_resumes_after_the_last_event_it_saw_when_the_stream_drops() {
    let scripted = Scripted::default();
    let url = serve(scripted.clone()).await;
    let dir = tempfile::tempdir().unwrap();

    let mut child = dsreg(dir.path())
        .args([
            "events",
            "watch",
            "--after-id",
            "40",
            "-o",
            "json",
            "--server",
            &url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ids = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while ids.len() < 3 {
            let line = stdout
                .next_line()
                .await
                .unwrap()
                .expect("the watch keeps going");
            let event: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                event["payload"]["n"], event["id"],
                "payload embedded as JSON"
            );
            ids.push(event["id"].as_i64().unwrap());
        }
    })
    .await
    .expect("three events within 30 s");
    child.kill().await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();

    assert_eq!(ids, [41, 42, 43]);
    assert_eq!(scripted.seen.lock().unwrap().watch_after_ids, [40, 42]);
    assert!(
        stderr.contains("reconnecting") && stderr.contains("after event 42"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_client_finds_the_local_registry_and_its_admin_token_in_the_data_folder() {
    let scripted = Scripted::default();
    let url = serve(scripted.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("grpc.addr"), format!("{url}\n")).unwrap();

    let mut command = dsreg(dir.path());
    command.args(["info", "-o", "json"]);
    let ran = run(command, None).await;
    ran.assert_success();
    assert_eq!(ran.json_lines()[0]["instance_id"], "scripted");

    std::fs::create_dir_all(dir.path().join("auth")).unwrap();
    std::fs::write(dir.path().join("auth/admin.token"), "admin-tok\n").unwrap();
    let mut command = dsreg(dir.path());
    command.arg("info");
    let ran = run(command, None).await;
    ran.assert_success();
    assert!(ran.stdout.contains("instance: scripted"), "{}", ran.stdout);
    assert!(ran.stdout.contains("token:    sent"), "{}", ran.stdout);
    assert!(!ran.mentions("admin-tok"));

    // DSREG_TOKEN beats the data folder's token.
    let mut command = dsreg(dir.path());
    command.env("DSREG_TOKEN", "env-tok").arg("info");
    run(command, None).await.assert_success();

    assert_eq!(
        scripted.authorization(),
        [
            None,
            Some("Bearer admin-tok".to_owned()),
            Some("Bearer env-tok".to_owned())
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// The client against a live registry

const LIVE_KEYS_BYTE: u8 = 42;

/// A registry on `db` that seals secrets under a test key; returns it and its gRPC URL.
async fn live_registry(db: &TestDb) -> (TestApp, String) {
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let app = TestApp::spawn(&db.url, move |app| {
        app.secrets = Some(Arc::new(live_keys()));
        let _ = addr_tx.send(app.grpc_addr());
    })
    .await;
    let addr = addr_rx.await.expect("the registry's gRPC address");
    (app, format!("http://{addr}"))
}

fn live_keys() -> Secrets {
    let key = base64::engine::general_purpose::STANDARD.encode([LIVE_KEYS_BYTE; 32]);
    Secrets::new(Arc::new(
        EnvKeyProvider::parse(&format!("1:{key}"), None).unwrap(),
    ))
}

/// `dsreg <args> --server <url>`, no token, run to its end.
async fn client(dir: &Path, url: &str, args: &[&str], stdin: Option<&[u8]>) -> Ran {
    let mut command = dsreg(dir);
    command.args(args).args(["--server", url]);
    run(command, stdin).await
}

#[tokio::test]
async fn the_client_creates_publishes_and_lists_a_datasource() {
    let db = TestDb::new().await;
    let (_app, url) = live_registry(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"rate_per_sec": 0, "template": {"source": "cli"}}"#,
    )
    .unwrap();

    let created = client(
        dir.path(),
        &url,
        &[
            "datasource",
            "create",
            "--org",
            "acme",
            "--project",
            "core",
            "--name",
            "orders",
            "--kind",
            "generator",
            "--owner",
            "team-a",
            "--tag",
            "demo",
            "--tag",
            "cli",
            "-o",
            "json",
        ],
        None,
    )
    .await;
    created.assert_success();
    let ds = &created.json_lines()[0];
    assert_eq!(ds["name"], "orders");
    assert_eq!(ds["status"], "active");
    assert_eq!(ds["tags"], serde_json::json!(["demo", "cli"]));
    let id = ds["id"].as_str().unwrap().to_owned();

    let version = client(
        dir.path(),
        &url,
        &[
            "version",
            "create",
            &id,
            "--config-file",
            config.to_str().unwrap(),
            "--comment",
            "first",
            "-o",
            "json",
        ],
        None,
    )
    .await;
    version.assert_success();
    let version = &version.json_lines()[0];
    assert_eq!(version["version"], 1);
    assert_eq!(version["state"], "draft");
    assert_eq!(
        version["config"]["rate_per_sec"], 0,
        "config embedded as JSON"
    );

    let published = client(dir.path(), &url, &["version", "publish", &id, "1"], None).await;
    published.assert_success();
    assert!(
        published.stdout.starts_with("published version 1 of"),
        "{}",
        published.stdout
    );

    let table = client(
        dir.path(),
        &url,
        &["datasource", "list", "--org", "acme"],
        None,
    )
    .await;
    table.assert_success();
    let mut lines = table.stdout.lines();
    let header = lines.next().unwrap();
    let row = lines
        .find(|l| l.contains("orders"))
        .expect("a row for orders");
    assert!(header.starts_with("ID  "), "{header}");
    assert_eq!(header.find("NAME"), row.find("orders"), "columns align");
    assert_eq!(header.find("KIND"), row.find("generator"), "columns align");
    assert!(row.contains("active") && row.contains("demo,cli"), "{row}");

    let json = client(
        dir.path(),
        &url,
        &["datasource", "list", "-o", "json"],
        None,
    )
    .await;
    json.assert_success();
    let listed = json.json_lines();
    let orders = listed.iter().find(|d| d["id"] == id.as_str()).unwrap();
    assert_eq!(orders["current_version"], 1);

    let versions = client(dir.path(), &url, &["version", "list", &id], None).await;
    versions.assert_success();
    assert!(versions.stdout.contains("published"), "{}", versions.stdout);

    let events = client(
        dir.path(),
        &url,
        &["events", "list", "--datasource", &id, "--all", "-o", "json"],
        None,
    )
    .await;
    events.assert_success();
    let events = events.json_lines();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "published" && e["version"] == 1),
        "{events:?}"
    );
    let table = client(
        dir.path(),
        &url,
        &["events", "list", "--datasource", &id],
        None,
    )
    .await;
    table.assert_success();
    assert!(table.stdout.starts_with("ID  "), "{}", table.stdout);
    assert!(table.stdout.contains("published"), "{}", table.stdout);
}

#[tokio::test]
async fn the_client_prints_the_field_violation_of_an_invalid_create() {
    let db = TestDb::new().await;
    let (_app, url) = live_registry(&db).await;
    let dir = tempfile::tempdir().unwrap();

    let ran = client(
        dir.path(),
        &url,
        &[
            "datasource",
            "create",
            "--org",
            "acme",
            "--project",
            "core",
            "--name",
            "not a valid name!",
            "--kind",
            "generator",
        ],
        None,
    )
    .await;

    assert_eq!(ran.status.code(), Some(1), "{}", ran.stderr);
    assert!(ran.stderr.contains("INVALID_ARGUMENT"), "{}", ran.stderr);
    assert!(
        ran.stderr.lines().any(|l| l.starts_with("  name: ")),
        "a `name: …` violation line: {}",
        ran.stderr
    );
}

#[tokio::test]
async fn the_client_puts_a_secret_from_stdin_on_a_live_registry() {
    let db = TestDb::new().await;
    let (_app, url) = live_registry(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = db.datasource("with-secret").await.id.to_string();
    let value = canary("live");

    let put = client(
        dir.path(),
        &url,
        &["secret", "put", &ds, "api_key"],
        Some(format!("{value}\n").as_bytes()),
    )
    .await;
    put.assert_success();
    let listed = client(dir.path(), &url, &["secret", "list", &ds], None).await;
    listed.assert_success();
    let listed_json = client(
        dir.path(),
        &url,
        &["secret", "list", &ds, "-o", "json"],
        None,
    )
    .await;
    listed_json.assert_success();

    assert!(listed.stdout.starts_with("NAME "), "{}", listed.stdout);
    assert!(listed.stdout.contains("api_key"), "{}", listed.stdout);
    assert_eq!(listed_json.json_lines()[0]["key_version"], 1);
    for ran in [&put, &listed, &listed_json] {
        assert!(!ran.mentions(&value), "a command printed the secret");
    }
    let opened = live_keys()
        .open_all(&**db.client().await, ds.parse().unwrap())
        .await
        .unwrap();
    let opened: BTreeMap<_, _> = opened
        .iter()
        .map(|(k, v)| (k.clone(), v.expose().to_owned()))
        .collect();
    assert_eq!(opened, BTreeMap::from([("api_key".to_owned(), value)]));
}
