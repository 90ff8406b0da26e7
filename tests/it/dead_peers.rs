//! A database that goes silent: the registry reaches Postgres through a TCP proxy that can
//! stop passing bytes without closing anything (a blackholed path, a hung middlebox). The
//! registry must notice within its bounds (readiness fails, RPCs answer UNAVAILABLE rather
//! than waiting for the caller's deadline), and once the path heals the listener reconnects
//! and what was committed meanwhile, directly to Postgres, is applied.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::domain::WorkerStatus;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

/// Generous bound for every wait: the suite runs on two busy cores.
const WAIT: Duration = Duration::from_secs(60);

/// A TCP proxy in front of one server that can go silent: it keeps every connection open
/// and accepts new ones, but passes no bytes in either direction until healed.
pub struct SilentProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    passing: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl SilentProxy {
    /// Starts a proxy to `upstream`, passing bytes.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (passing, _) = watch::channel(true);
        let gate = passing.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let gate = gate.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, gate.clone()),
                        pump(server_read, client_write, gate),
                    );
                });
            }
        });
        Self {
            addr,
            passing,
            accept,
        }
    }

    /// Stops passing bytes; nothing is closed.
    pub fn silence(&self) {
        self.passing.send_replace(false);
    }

    /// Passes bytes again, what was held first.
    pub fn heal(&self) {
        self.passing.send_replace(true);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding each chunk while the gate is shut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if gate.wait_for(|passing| *passing).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// `url` with its server replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> (String, SocketAddr) {
    let target = dsreg::db::Target::parse(url).unwrap();
    let port = target.config.get_ports()[0];
    let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let proxied = url.replacen(&format!("127.0.0.1:{port}"), &addr.to_string(), 1);
    assert_ne!(
        proxied, url,
        "the test database is reached over TCP on 127.0.0.1"
    );
    (proxied, upstream)
}

fn running_on(state: &dsreg::db::repository::state::State, version: i32) -> bool {
    state.worker_status == WorkerStatus::Running && state.running_version == Some(version)
}

#[tokio::test]
async fn a_silent_database_is_noticed_within_bounds_and_followed_again_once_it_heals() {
    let db = TestDb::new().await;
    let (_, upstream) = through(&db.url, "127.0.0.1:1".parse().unwrap());
    let proxy = SilentProxy::start(upstream).await;
    let (proxied, _) = through(&db.url, proxy.addr);
    // The default connect bound (5 s): a connect on two busy cores, SCRAM included, fits.
    let mut settings = test_settings(&proxied);
    settings.db_statement_timeout_ms = 10_000;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let http = app.http_addr.to_string();

    // Everything below goes to Postgres directly, never through the proxy.
    let ds = db.datasource("orders").await;
    let v1 = db.version(ds.id, json!({ "rate_per_sec": 5 })).await;
    db.publish_sql(ds.id, v1).await;
    wait_for("RUNNING on v1", WAIT, || async {
        running_on(&db.state(ds.id).await, v1).then_some(())
    })
    .await;
    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC port");
    let datasources = DatasourcesClient::new(channel);
    let list = || {
        let mut datasources = datasources.clone();
        async move {
            let mut request = tonic::Request::new(pb::ListDatasourcesRequest::default());
            // A patient caller: the answer must come from the registry's own bounds.
            request.set_timeout(Duration::from_secs(120));
            tokio::time::timeout(
                Duration::from_secs(120),
                datasources.list_datasources(request),
            )
            .await
            .expect("the registry answers before the caller's deadline")
        }
    };
    wait_for("ListDatasources through the proxy", WAIT, || async {
        list().await.ok()
    })
    .await;

    proxy.silence();

    wait_for("/readyz failing", WAIT, || async {
        (crate::serve::http_get(&http, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    wait_for(
        "the listener to give up the silent connection",
        WAIT,
        || async { (!app.listener_stats.connected.load(Ordering::Relaxed)).then_some(()) },
    )
    .await;
    // An RPC arriving while the path is silent answers UNAVAILABLE; it does not wait for
    // the caller's deadline.
    let refused = list()
        .await
        .expect_err("ListDatasources on a silent database fails");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    if let Some(password) = dsreg::db::Target::parse(&db.url)
        .unwrap()
        .config
        .get_password()
    {
        let password = String::from_utf8_lossy(password);
        assert!(!refused.message().contains(&*password), "{refused:?}");
    }

    // Committed while the registry cannot see the database.
    let v2 = db.version(ds.id, json!({ "rate_per_sec": 6 })).await;
    db.publish_sql(ds.id, v2).await;
    let reconnects = app.listener_stats.reconnects.load(Ordering::Relaxed);

    proxy.heal();

    wait_for("the listener to reconnect", WAIT, || async {
        (app.listener_stats.connected.load(Ordering::Relaxed)
            && app.listener_stats.reconnects.load(Ordering::Relaxed) > reconnects)
            .then_some(())
    })
    .await;
    wait_for(
        "RUNNING on v2, published during the silence",
        WAIT,
        || async { running_on(&db.state(ds.id).await, v2).then_some(()) },
    )
    .await;
    wait_for("/readyz passing again", WAIT, || async {
        (crate::serve::http_get(&http, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    wait_for("ListDatasources once healed", WAIT, || async {
        list().await.ok()
    })
    .await;
    app.stop().await.unwrap();
}

/// A server that accepts and then says nothing: a direct connect (the CLI's, migrations')
/// and a listener connect give up within the connect bound, naming the server, instead of
/// waiting for TCP to time out.
#[tokio::test]
async fn a_connect_to_a_server_that_never_answers_ends_within_its_bound() {
    let db = TestDb::new().await;
    let (_, upstream) = through(&db.url, "127.0.0.1:1".parse().unwrap());
    let proxy = SilentProxy::start(upstream).await;
    proxy.silence();
    let (proxied, _) = through(&db.url, proxy.addr);
    let bounds = dsreg::db::ConnectOptions {
        connect_timeout: Some(Duration::from_secs(2)),
        ..dsreg::db::ConnectOptions::default()
    };
    let direct = tokio::time::timeout(WAIT, dsreg::db::connect_with(&proxied, &bounds))
        .await
        .expect("the connect ends by itself");
    let Err(err) = direct else {
        panic!("a connection through a silent path");
    };
    assert!(err.is_unreachable(), "{err}");
    let message = err.to_string();
    assert!(message.contains(&proxy.addr.to_string()), "{message}");
    assert!(message.contains("no answer within"), "{message}");
    // The URL's own connect_timeout (libpq's, in seconds) bounds it as well.
    let by_url = format!("{proxied}?connect_timeout=2");
    let Err(err) = tokio::time::timeout(WAIT, dsreg::db::connect(&by_url))
        .await
        .expect("the connect ends by itself")
    else {
        panic!("a connection through a silent path");
    };
    assert!(err.to_string().contains("no answer within 2s"), "{err}");
    let listening = tokio::time::timeout(
        WAIT,
        dsreg::outbox::listener::Listener::connect(
            dsreg::outbox::listener::ListenerConfig {
                connect: bounds,
                ..dsreg::outbox::listener::ListenerConfig::new(proxied.clone())
            },
            Default::default(),
        ),
    )
    .await
    .expect("the listener's connect ends by itself");
    assert!(listening.is_err(), "no listener through a silent path");
    // A pool's checkout: the new connection is given up on, said as unavailable.
    let pool = dsreg::db::pool_with(&proxied, &bounds, 2, Duration::from_secs(30)).unwrap();
    let Err(err) = tokio::time::timeout(WAIT, pool.get())
        .await
        .expect("the checkout ends by itself")
    else {
        panic!("a pooled connection through a silent path");
    };
    let err = dsreg::db::Error::from(err);
    assert!(err.is_unreachable(), "{err}");
    assert!(err.to_string().contains("connect timeout"), "{err}");
    proxy.heal();
    let patient = dsreg::db::ConnectOptions {
        connect_timeout: Some(WAIT),
        ..dsreg::db::ConnectOptions::default()
    };
    let client = dsreg::db::connect_with(&proxied, &patient)
        .await
        .expect("connects once the path heals");
    let timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        timeout, "30s",
        "the startup options carry the statement timeout"
    );
}

/// The binary's own connect: `dsreg migrate` against a server that accepts and never answers
/// exits non-zero within its `--db-connect-timeout-ms`, naming the server, not the password.
#[tokio::test]
async fn the_cli_gives_up_on_a_silent_server_within_its_flag() {
    let db = TestDb::new().await;
    let (_, upstream) = through(&db.url, "127.0.0.1:1".parse().unwrap());
    let proxy = SilentProxy::start(upstream).await;
    proxy.silence();
    let (proxied, _) = through(&db.url, proxy.addr);
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"))
        .args(["migrate", "--db-connect-timeout-ms", "2000"])
        .env("DATABASE_URL", &proxied)
        .env("DSREG_LOG", "error")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, run)
        .await
        .expect("dsreg migrate ends by itself")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&proxy.addr.to_string()), "{stderr}");
    assert!(stderr.contains("no answer within 2s"), "{stderr}");
    if let Some(password) = dsreg::db::Target::parse(&db.url)
        .unwrap()
        .config
        .get_password()
    {
        assert!(
            !stderr.contains(&*String::from_utf8_lossy(password)),
            "{stderr}"
        );
    }
}

/// A statement already sent when the path goes silent: the proxy keeps acknowledging at the
/// TCP level (so neither keepalives nor `tcp_user_timeout` fire) but passes nothing. The
/// client gives up within the statement timeout plus its margin, says the database is
/// unavailable, and the pool replaces the connection once the path heals.
#[tokio::test]
async fn a_statement_in_flight_when_the_path_goes_silent_answers_unavailable_within_its_deadline() {
    let db = TestDb::new().await;
    let (_, upstream) = through(&db.url, "127.0.0.1:1".parse().unwrap());
    let proxy = SilentProxy::start(upstream).await;
    let (proxied, _) = through(&db.url, proxy.addr);
    let bounds = dsreg::db::ConnectOptions {
        statement_timeout: Some(Duration::from_secs(2)),
        ..dsreg::db::ConnectOptions::default()
    };
    let pool = dsreg::db::pool_with(&proxied, &bounds, 1, Duration::from_secs(30)).unwrap();
    let pooled = pool.get().await.unwrap();
    pooled.simple_query("SELECT 1").await.unwrap();
    let direct = dsreg::db::connect_with(&proxied, &bounds).await.unwrap();

    proxy.silence();

    for (what, client) in [("pooled", &**pooled), ("direct", &direct)] {
        let answered = tokio::time::timeout(
            WAIT,
            client.query_typed("SELECT count(*) FROM datasources", &[]),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("the {what} statement ends by itself, not at the caller's deadline")
        });
        let err = dsreg::db::Error::from(answered.expect_err("no answer through a silent path"));
        assert!(err.is_unreachable(), "{what}: {err}");
        assert!(
            client.is_closed(),
            "{what}: the silent connection is given up"
        );
    }
    drop(pooled);

    proxy.heal();
    let replaced = tokio::time::timeout(WAIT, pool.get())
        .await
        .expect("a checkout ends by itself")
        .expect("the pool connects again once the path heals");
    let count: i64 = replaced
        .query_one("SELECT count(*) FROM datasources", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
}
