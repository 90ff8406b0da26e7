//! The `dsreg` command line through the real binary: `dsreg keys` against a test database and
//! a temporary key file, and the client against a live registry over its gRPC port (secret
//! values from stdin and never printed, refusals with their field violations, watch
//! resumption across a registry restart, the data folder's address and admin token).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use dsreg::api::grpc::auth::{DEV_AUDIENCE, DEV_ISSUER, dev_credentials};
use dsreg::config::Settings;
use dsreg::db::repository::{self as repo, WriteContext};
use dsreg::secrets::{EnvKeyProvider, FileKeyProvider, SecretString, Secrets};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use uuid::Uuid;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

const DSREG: &str = env!("CARGO_BIN_EXE_dsreg");

/// The binary with nothing inherited that would pick a server, token, key or database, and
/// `data_dir` as its data folder.
pub(crate) fn dsreg(data_dir: &Path) -> Command {
    let mut command = Command::new(DSREG);
    for name in [
        "DATABASE_URL",
        "DSREG_SERVER",
        "DSREG_CA_FILE",
        "DSREG_CLIENT_CERT",
        "DSREG_CLIENT_KEY",
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
pub(crate) struct Ran {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Ran {
    pub(crate) fn assert_success(&self) -> &Self {
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
    pub(crate) fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    pub(crate) fn mentions(&self, text: &str) -> bool {
        self.stdout.contains(text) || self.stderr.contains(text)
    }
}

/// Runs `command` to its end with `stdin` (or an empty stdin).
pub(crate) async fn run(mut command: Command, stdin: Option<&[u8]>) -> Ran {
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
// The client against a live registry

const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Settings of a registry on `db` that seals secrets under [`MASTER_KEYS`] and lets every
/// caller in.
fn live_settings(db: &TestDb) -> Settings {
    let mut settings = test_settings(&db.url);
    settings.master_keys = Some(MASTER_KEYS.to_owned());
    settings
}

/// A registry with [`live_settings`]; returns it and its gRPC URL.
async fn live_registry(db: &TestDb) -> (TestApp, String) {
    let app = TestApp::spawn_with(live_settings(db), |_| {}).await;
    let url = format!("http://{}", app.grpc_addr);
    (app, url)
}

/// `dsreg <args> --server <url>`, no token, run to its end.
async fn client(dir: &Path, url: &str, args: &[&str], stdin: Option<&[u8]>) -> Ran {
    let mut command = dsreg(dir);
    command.args(args).args(["--server", url]);
    run(command, stdin).await
}

/// The secrets of `datasource` opened with [`MASTER_KEYS`], by name.
async fn opened_secrets(db: &TestDb, datasource: Uuid) -> BTreeMap<String, String> {
    let keys = Secrets::new(Arc::new(EnvKeyProvider::parse(MASTER_KEYS, None).unwrap()));
    keys.open_all(&**db.client().await, datasource)
        .await
        .unwrap()
        .iter()
        .map(|(name, value)| (name.clone(), value.expose().to_owned()))
        .collect()
}

#[tokio::test]
async fn secret_put_reads_the_value_from_stdin_and_never_prints_it() {
    let db = TestDb::new().await;
    let (_app, url) = live_registry(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = db.datasource("with-secrets").await.id;
    let id = ds.to_string();
    let stdin_value = canary("stdin");
    let json_value = canary("json");
    let file_value = format!("{}\n", canary("file"));
    let file = dir.path().join("value.txt");
    std::fs::write(&file, &file_value).unwrap();

    let put_table = client(
        dir.path(),
        &url,
        &["secret", "put", &id, "api_key"],
        Some(format!("{stdin_value}\n").as_bytes()),
    )
    .await;
    let put_json = client(
        dir.path(),
        &url,
        &["secret", "put", &id, "password", "-o", "json"],
        Some(format!("{json_value}\n").as_bytes()),
    )
    .await;
    let put_file = client(
        dir.path(),
        &url,
        &[
            "secret",
            "put",
            &id,
            "cert",
            "--from-file",
            file.to_str().unwrap(),
        ],
        None,
    )
    .await;
    let listed = client(dir.path(), &url, &["secret", "list", &id], None).await;
    let listed_json = client(
        dir.path(),
        &url,
        &["secret", "list", &id, "-o", "json"],
        None,
    )
    .await;

    let outputs = [&put_table, &put_json, &put_file, &listed, &listed_json];
    for ran in outputs {
        ran.assert_success();
    }
    assert!(
        put_table.stdout.starts_with("stored secret api_key of "),
        "{}",
        put_table.stdout
    );
    assert_eq!(put_json.json_lines()[0]["name"], "password");
    assert!(listed.stdout.starts_with("NAME "), "{}", listed.stdout);
    let names: Vec<(String, u64)> = listed_json
        .json_lines()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["key_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("api_key".to_owned(), 1),
            ("cert".to_owned(), 1),
            ("password".to_owned(), 1)
        ]
    );
    assert_eq!(
        opened_secrets(&db, ds).await,
        BTreeMap::from([
            ("api_key".to_owned(), stdin_value.clone()),
            ("cert".to_owned(), file_value.clone()),
            ("password".to_owned(), json_value.clone()),
        ]),
        "stdin loses one trailing newline; a file is sent byte for byte"
    );
    let stored = db
        .client()
        .await
        .query(
            "SELECT s::text, s.ciphertext FROM datasource_secrets s WHERE datasource_id = $1",
            &[&ds],
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    for value in [&stdin_value, &json_value, file_value.trim()] {
        let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
        for row in &stored {
            let text: String = row.get(0);
            let ciphertext: Vec<u8> = row.get(1);
            assert!(!text.contains(value) && !text.contains(&hex));
            assert!(
                !ciphertext
                    .windows(value.len())
                    .any(|w| w == value.as_bytes()),
                "a secret is stored in plaintext"
            );
        }
        for ran in outputs {
            assert!(!ran.mentions(value), "a command printed a secret value");
        }
    }
}

#[tokio::test]
async fn secret_put_refuses_a_value_on_the_command_line_or_an_empty_stdin() {
    let db = TestDb::new().await;
    let (_app, url) = live_registry(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let ds = db.datasource("with-secrets").await.id;
    let id = ds.to_string();

    let positional = client(
        dir.path(),
        &url,
        &["secret", "put", &id, "api_key", "hunter2"],
        None,
    )
    .await;
    let flag = client(
        dir.path(),
        &url,
        &["secret", "put", &id, "api_key", "--value", "hunter2"],
        None,
    )
    .await;
    let empty = client(
        dir.path(),
        &url,
        &["secret", "put", &id, "api_key"],
        Some(b""),
    )
    .await;
    let listed = client(
        dir.path(),
        &url,
        &["secret", "list", &id, "-o", "json"],
        None,
    )
    .await;

    assert_eq!(positional.status.code(), Some(2), "{}", positional.stderr);
    assert_eq!(flag.status.code(), Some(2), "{}", flag.stderr);
    assert_eq!(empty.status.code(), Some(1), "{}", empty.stderr);
    assert!(empty.stderr.contains("empty"), "{}", empty.stderr);
    listed.assert_success();
    assert_eq!(listed.stdout, "", "no secret was stored");
    assert!(opened_secrets(&db, ds).await.is_empty());
}

#[tokio::test]
async fn a_refused_call_prints_its_code_message_and_field_violations() {
    let db = TestDb::new().await;
    let (_app, url) = live_registry(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = Uuid::new_v4().to_string();

    let invalid = client(
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
            "bad name",
            "--kind",
            "generator",
        ],
        None,
    )
    .await;
    let not_found = client(dir.path(), &url, &["datasource", "get", &missing], None).await;
    let listed = client(
        dir.path(),
        &url,
        &["datasource", "list", "-o", "json"],
        None,
    )
    .await;

    let reason = "contains ' '; only letters, digits, '_', '-' and '.' are allowed";
    assert_eq!(invalid.status.code(), Some(1), "{}", invalid.stderr);
    assert!(
        invalid.stderr.contains(&format!(
            "INVALID_ARGUMENT: name: {reason}\n  name: {reason}\n"
        )),
        "{}",
        invalid.stderr
    );
    assert!(invalid.stdout.is_empty(), "{}", invalid.stdout);
    assert_eq!(not_found.status.code(), Some(1), "{}", not_found.stderr);
    assert!(
        not_found
            .stderr
            .contains(&format!("NOT_FOUND: datasource {missing} not found")),
        "{}",
        not_found.stderr
    );
    listed.assert_success();
    assert_eq!(listed.stdout, "", "nothing was created");
}

/// (id, type) of every event of `datasource` in the table, oldest first.
async fn table_events(db: &TestDb, datasource: Uuid) -> Vec<(i64, String)> {
    db.events(datasource)
        .await
        .into_iter()
        .map(|e| (e.id, e.kind))
        .collect()
}

/// `dsreg worker restart <datasource>` `n` times; each restart writes one event.
async fn restart_worker(dir: &Path, url: &str, datasource: &str, n: usize) {
    for _ in 0..n {
        client(dir, url, &["worker", "restart", datasource], None)
            .await
            .assert_success();
    }
}

/// Waits until `printed` ends with the last event of the table, then returns the table.
async fn wait_for_watch(
    db: &TestDb,
    datasource: Uuid,
    printed: &Mutex<Vec<(i64, String)>>,
) -> Vec<(i64, String)> {
    wait_for(
        "the watch to print the table's last event",
        Duration::from_secs(30),
        || async {
            let table = table_events(db, datasource).await;
            let printed = printed.lock().unwrap();
            (table.last().is_some() && printed.last() == table.last()).then_some(table)
        },
    )
    .await
}

#[tokio::test]
async fn events_watch_resumes_after_the_last_event_it_saw_when_the_stream_drops() {
    let db = TestDb::new().await;
    let settings = live_settings(&db);
    let first = TestApp::spawn_with(settings.clone(), |_| {}).await;
    let grpc_addr = first.grpc_addr;
    let url = format!("http://{grpc_addr}");
    let dir = tempfile::tempdir().unwrap();
    let ds = db.datasource("watched").await.id;
    let id = ds.to_string();
    restart_worker(dir.path(), &url, &id, 3).await;
    let after = table_events(&db, ds).await[0].0;

    let mut child = dsreg(dir.path())
        .args(["events", "watch", "--datasource", &id, "--after-id"])
        .arg(after.to_string())
        .args(["-o", "json", "--server", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let printed = Arc::new(Mutex::new(Vec::new()));
    let reader = tokio::spawn({
        let printed = printed.clone();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        async move {
            while let Some(line) = stdout.next_line().await.unwrap() {
                let event: Value = serde_json::from_str(&line).unwrap();
                let kind = event["type"].as_str().unwrap().to_owned();
                printed
                    .lock()
                    .unwrap()
                    .push((event["id"].as_i64().unwrap(), kind));
            }
        }
    });
    let before_crash = wait_for_watch(&db, ds, &printed).await;
    first.crash().await;
    // The killed registry's listener may hold the port for a moment after its thread ends.
    let _second = wait_for(
        "a registry on the old gRPC address",
        Duration::from_secs(30),
        || {
            let mut settings = settings.clone();
            settings.grpc_addr = grpc_addr;
            async move { TestApp::try_spawn_with(settings, |_| {}).await.ok() }
        },
    )
    .await;
    restart_worker(dir.path(), &url, &id, 3).await;
    let table = wait_for_watch(&db, ds, &printed).await;
    child.kill().await.unwrap();
    reader.await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();

    let expected: Vec<_> = table.into_iter().filter(|(i, _)| *i > after).collect();
    let last_seen = before_crash.last().unwrap().0;
    assert!(
        expected.iter().filter(|(i, _)| *i > last_seen).count() >= 3,
        "the restarts after the crash are in the table: {expected:?}"
    );
    assert_eq!(
        *printed.lock().unwrap(),
        expected,
        "every event once, in id order"
    );
    assert!(
        stderr.contains("reconnecting") && stderr.contains(&format!("after event {last_seen}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_client_finds_the_local_registry_and_its_admin_token_in_the_data_folder() {
    let db = TestDb::new().await;
    let local = tempfile::tempdir().unwrap();
    let dev = dev_credentials(local.path()).unwrap();
    let mut settings = test_settings(&db.url);
    settings.auth.insecure_no_auth = false;
    settings.auth.auth_hs256_secret_file = Some(dev.secret_file.clone());
    settings.auth.auth_issuer = Some(DEV_ISSUER.to_owned());
    settings.auth.auth_audience = Some(DEV_AUDIENCE.to_owned());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let addr_file = local.path().join("grpc.addr");
    std::fs::write(&addr_file, format!("http://{}\n", app.grpc_addr)).unwrap();
    let token = std::fs::read_to_string(&dev.token_file).unwrap();
    // Another registry's folder pointing at this one: its admin token is signed with
    // another secret.
    let foreign = tempfile::tempdir().unwrap();
    let foreign_token =
        std::fs::read_to_string(dev_credentials(foreign.path()).unwrap().token_file).unwrap();
    std::fs::copy(&addr_file, foreign.path().join("grpc.addr")).unwrap();
    db.datasource("orders").await;
    let elsewhere = tempfile::tempdir().unwrap();
    let in_folder = |folder: &Path, args: &[&str]| {
        let mut command = dsreg(elsewhere.path());
        command.args(args).arg("--data-dir").arg(folder);
        command
    };

    let info = run(in_folder(local.path(), &["info"]), None).await;
    let listed = run(
        in_folder(local.path(), &["datasource", "list", "-o", "json"]),
        None,
    )
    .await;
    let refused = run(in_folder(foreign.path(), &["datasource", "list"]), None).await;
    // DSREG_TOKEN beats the folder's token.
    let mut env_token = in_folder(local.path(), &["info"]);
    env_token.env("DSREG_TOKEN", foreign_token.trim());
    let env_token = run(env_token, None).await;

    info.assert_success();
    assert!(
        info.stdout
            .contains(&format!("(from {})", addr_file.display())),
        "{}",
        info.stdout
    );
    assert!(info.stdout.contains("token:    sent"), "{}", info.stdout);
    listed.assert_success();
    assert_eq!(listed.json_lines()[0]["name"], "orders");
    for denied in [&refused, &env_token] {
        assert_eq!(denied.status.code(), Some(1), "{}", denied.stderr);
        assert!(
            denied.stderr.contains("UNAUTHENTICATED"),
            "{}",
            denied.stderr
        );
    }
    for ran in [&info, &listed, &refused, &env_token] {
        assert!(!ran.mentions(token.trim()) && !ran.mentions(foreign_token.trim()));
    }
    // Denials are written off the answer's path: wait for both.
    let denials: Vec<(String, String)> =
        crate::helpers::wait_for("two denial rows", Duration::from_secs(5), || async {
            let rows: Vec<(String, String)> = db
                .client()
                .await
                .query(
                    "SELECT actor, action FROM audit_log WHERE outcome = 'denied' ORDER BY action DESC",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            (rows.len() >= 2).then_some(rows)
        })
        .await;
    assert_eq!(
        denials,
        [
            ("anonymous".to_owned(), "ListDatasources".to_owned()),
            ("anonymous".to_owned(), "GetInfo".to_owned()),
        ]
    );
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
async fn dsreg_test_sends_a_test_credential_from_a_file_where_a_stored_one_may_not_go() {
    let db = TestDb::new().await;
    let (_app, url) = live_registry(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (saved_port, _) = crate::exfiltration::recorder().await;
    let (other_port, other_seen) = crate::exfiltration::recorder().await;
    let ds = db.datasource_of("api", "http_poll").await.id;
    let stored = canary("stored");
    crate::helpers::put_secret(&db, MASTER_KEYS, ds, "token", &stored).await;
    db.version(
        ds,
        serde_json::json!({ "url": format!("http://127.0.0.1:{saved_port}/"), "bearer_secret": "token" }),
    )
    .await;
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({ "url": format!("http://127.0.0.1:{other_port}/"), "bearer_secret": "token" })
            .to_string(),
    )
    .unwrap();
    let config = config.display().to_string();
    let id = ds.to_string();

    let refused = client(
        dir.path(),
        &url,
        &["test", &id, "--config-file", &config, "--fetch-sample"],
        None,
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("PERMISSION_DENIED")
            && refused.stderr.contains("saved destinations"),
        "{}",
        refused.stderr
    );
    assert!(other_seen.lock().unwrap().is_empty());

    let credential = dir.path().join("credential");
    std::fs::write(&credential, "from-a-file\n").unwrap();
    let test_secret = format!("token={}", credential.display());
    let ran = client(
        dir.path(),
        &url,
        &[
            "test",
            &id,
            "--config-file",
            &config,
            "--fetch-sample",
            "--test-secret",
            &test_secret,
        ],
        None,
    )
    .await;
    ran.assert_success();
    let seen = other_seen.lock().unwrap().clone();
    assert!(seen.contains("Bearer from-a-file\r\n"), "{seen}");
    assert!(!seen.contains(&stored));
}

/// `dsreg serve` with the auth flags and variables of `args` and `env`, nothing else of auth
/// inherited.
async fn serve_with_auth(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut command = dsreg(dir);
    for name in [
        "DSREG_AUTH_HS256_SECRET_FILE",
        "DSREG_AUTH_PUBLIC_KEY",
        "DSREG_AUTH_JWKS_FILE",
        "DSREG_AUTH_JWKS_URL",
        "DSREG_AUTH_OIDC_ISSUER",
        "DSREG_AUTH_JWKS_CA_FILE",
        "DSREG_AUTH_ALGORITHMS",
        "DSREG_AUTH_ISSUER",
        "DSREG_AUTH_AUDIENCE",
        "DSREG_AUTH_LEEWAY_SECS",
        "DSREG_INSECURE_NO_AUTH",
    ] {
        command.env_remove(name);
    }
    command.arg("serve").args(args).envs(env.iter().copied());
    run(command, None).await
}

#[tokio::test]
async fn serve_refuses_auth_flags_that_do_not_go_together_with_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let claims = ["--auth-issuer", "i", "--auth-audience", "a"];
    /// Flags, variables, and what the refusal names.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 6] = [
        (
            &[
                &["--auth-hs256-secret-file", "s", "--auth-jwks-file", "j"][..],
                &claims,
            ]
            .concat(),
            &[],
            &[
                "--auth-hs256-secret-file",
                "--auth-jwks-file",
                "cannot be used with",
            ],
        ),
        (
            &[&["--insecure-no-auth"][..], &claims].concat(),
            &[("DSREG_AUTH_JWKS_FILE", "j")],
            &[
                "--insecure-no-auth",
                "--auth-jwks-file",
                "cannot be used with",
            ],
        ),
        (
            &["--auth-jwks-file", "j", "--auth-audience", "a"],
            &[],
            &["--auth-issuer", "required"],
        ),
        (
            &["--auth-audience", "a"],
            &[],
            &["--auth-hs256-secret-file", "--auth-oidc-issuer", "required"],
        ),
        (
            &[
                &["--auth-jwks-file", "j", "--auth-jwks-ca-file", "c"][..],
                &claims,
            ]
            .concat(),
            &[],
            &["--auth-jwks-url", "--auth-oidc-issuer", "required"],
        ),
        (
            &[
                &["--auth-jwks-file", "j", "--auth-leeway-secs", "301"][..],
                &claims,
            ]
            .concat(),
            &[],
            &["--auth-leeway-secs", "301"],
        ),
    ];
    for (args, env, needles) in cases {
        let ran = serve_with_auth(dir.path(), args, env).await;
        assert_eq!(
            ran.status.code(),
            Some(2),
            "{args:?} {env:?}: {}",
            ran.stderr
        );
        assert!(ran.stderr.starts_with("error: "), "{}", ran.stderr);
        assert!(ran.stderr.contains("try '--help'"), "{}", ran.stderr);
        for needle in needles {
            assert!(ran.stderr.contains(needle), "{args:?}: {}", ran.stderr);
        }
    }
    // Nothing was started: no embedded cluster, no development credentials.
    assert!(!dir.path().join("pg").exists());
    assert!(!dir.path().join("auth").exists());
}
