//! Postgres over TLS, with libpq's `sslmode` conventions, against a cluster of the test's own
//! with `ssl = on` and only `hostssl` lines in `pg_hba.conf`, a CA and certificates generated
//! here with the `openssl` CLI; and connection errors that say why.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dsreg::db::embedded::{ClusterOptions, EmbeddedCluster};
use dsreg::domain::WorkerStatus;
use serde_json::json;

use crate::helpers::{TestApp, TestDb, wait_for};

/// A TLS-only cluster and the files its clients need.
struct TlsCluster {
    cluster: EmbeddedCluster,
    certs: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsCluster {
    fn file(&self, name: &str) -> String {
        self.certs.join(name).display().to_string()
    }

    /// The superuser's URL for `database` through `host`, with `params` appended.
    fn url(&self, host: &str, database: &str, params: &str) -> String {
        let url = self
            .cluster
            .url(database)
            .replace("@127.0.0.1:", &format!("@{host}:"));
        if params.is_empty() {
            url
        } else {
            format!("{url}?{params}")
        }
    }

    fn port(&self) -> u16 {
        self.cluster.port()
    }
}

pub(crate) fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name`.crt/.key.
pub(crate) fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// A certificate `name`.crt/.key for `cn`, signed by `ca`, with the extensions in `ext`.
pub(crate) fn leaf(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

async fn tls_cluster() -> TlsCluster {
    crate::helpers::init_test_log();
    let dir = tempfile::tempdir().unwrap();
    // As root the server runs unprivileged and must reach its files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let options = ClusterOptions {
        throwaway: true,
        ..ClusterOptions::durable(dir.path().join("pg"))
    };
    let cluster = tokio::task::spawn_blocking(move || EmbeddedCluster::start(&options))
        .await
        .unwrap()
        .expect("a cluster");
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).unwrap();
    ca(&certs, "ca");
    ca(&certs, "other-ca");
    leaf(
        &certs,
        "ca",
        "server",
        "localhost",
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    leaf(
        &certs,
        "ca",
        "client",
        "certuser",
        "extendedKeyUsage=clientAuth\n",
    );
    // The server's key belongs to the server's user, readable by it alone.
    let owner = std::fs::metadata(cluster.data_dir()).unwrap();
    for name in ["server.key", "server.crt", "ca.crt"] {
        std::os::unix::fs::chown(certs.join(name), Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    std::fs::set_permissions(
        certs.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let plain = dsreg::db::connect(&format!("{}?sslmode=disable", cluster.url("postgres")))
        .await
        .expect("a plain connection before TLS is switched on");
    // ALTER SYSTEM runs outside a transaction block: one statement at a time.
    let folder = certs.display();
    for statement in [
        "ALTER SYSTEM SET ssl = on".to_owned(),
        format!("ALTER SYSTEM SET ssl_cert_file = '{folder}/server.crt'"),
        format!("ALTER SYSTEM SET ssl_key_file = '{folder}/server.key'"),
        format!("ALTER SYSTEM SET ssl_ca_file = '{folder}/ca.crt'"),
        "CREATE ROLE certuser LOGIN".to_owned(),
    ] {
        plain.batch_execute(&statement).await.unwrap();
    }
    std::fs::write(
        cluster.data_dir().join("pg_hba.conf"),
        "hostssl all certuser 127.0.0.1/32 cert\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    plain
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let tls = TlsCluster {
        cluster,
        certs,
        _dir: dir,
    };
    let url = tls.url("127.0.0.1", "postgres", "sslmode=require");
    wait_for("TLS switched on", Duration::from_secs(20), || async {
        dsreg::db::connect(&url).await.ok().map(|_| ())
    })
    .await;
    tls
}

/// Whether the session of `client` is encrypted.
async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn refused(url: &str) -> String {
    match dsreg::db::connect(url).await {
        Ok(_) => panic!("connected to {url}"),
        Err(e) => {
            assert!(e.is_unreachable(), "{e} is classified as unreachable");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn sslmodes_root_certificates_and_client_certificates_follow_libpq() {
    let tls = tls_cluster().await;
    let port = tls.port();
    let ca = tls.file("ca.crt");
    let other = tls.file("other-ca.crt");

    // Only hostssl lines: a plain connection is refused by pg_hba.conf, with its reason.
    let plain = refused(&tls.url("127.0.0.1", "postgres", "sslmode=disable")).await;
    assert!(plain.contains("28000"), "{plain}");
    assert!(plain.contains("pg_hba.conf"), "{plain}");
    assert!(plain.contains(&format!("127.0.0.1:{port}")), "{plain}");

    // require: encrypted, the certificate not checked; prefer (the default) encrypts too.
    for params in ["sslmode=require", "", "sslmode=prefer"] {
        let client = dsreg::db::connect(&tls.url("127.0.0.1", "postgres", params))
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}"));
        assert!(encrypted(&client).await, "{params}");
    }

    // verify-full with the right CA and the certificate's name.
    let client = dsreg::db::connect(&tls.url(
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-full with the right CA");
    assert!(encrypted(&client).await);

    // verify-full with a CA that did not sign the server's certificate.
    let wrong_ca = refused(&tls.url(
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await;
    assert!(wrong_ca.contains("TLS handshake"), "{wrong_ca}");
    assert!(wrong_ca.contains("invalid peer certificate"), "{wrong_ca}");
    assert!(
        wrong_ca.contains(&format!("localhost:{port}")),
        "{wrong_ca}"
    );
    // require with a root certificate verifies the chain, as libpq does.
    let require_wrong_ca = refused(&tls.url(
        "localhost",
        "postgres",
        &format!("sslmode=require&sslrootcert={other}"),
    ))
    .await;
    assert!(
        require_wrong_ca.contains("invalid peer certificate"),
        "{require_wrong_ca}"
    );

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let wrong_name = refused(&tls.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(
        wrong_name.contains("invalid peer certificate"),
        "{wrong_name}"
    );
    assert!(wrong_name.contains("not valid for name"), "{wrong_name}");
    let client = dsreg::db::connect(&tls.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-ca does not compare the host name");
    assert!(encrypted(&client).await);
    let wrong_chain = refused(&tls.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    ))
    .await;
    assert!(
        wrong_chain.contains("invalid peer certificate"),
        "{wrong_chain}"
    );

    // A client certificate logs in the user of its CN (`cert` auth); the libpq key=value form.
    let cert_url = format!(
        "host=localhost port={port} user=certuser dbname=postgres sslmode=verify-full sslrootcert='{ca}' sslcert='{}' sslkey='{}'",
        tls.file("client.crt"),
        tls.file("client.key"),
    );
    let client = dsreg::db::connect(&cert_url)
        .await
        .expect("the client certificate is accepted");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "certuser");
    let no_cert = refused(&format!(
        "host=localhost port={port} user=certuser dbname=postgres sslmode=verify-full sslrootcert='{ca}'"
    ))
    .await;
    assert!(no_cert.contains("SQLSTATE 28"), "{no_cert}");

    // The pool speaks TLS too.
    let pool = dsreg::db::pool(
        &tls.url(
            "localhost",
            "postgres",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        2,
        Duration::from_secs(10),
    )
    .unwrap();
    let pooled = pool.get().await.expect("a pooled TLS connection");
    assert!(encrypted(&pooled).await);

    // A certificate file that does not exist is named.
    let missing = match dsreg::db::connect(&tls.url(
        "localhost",
        "postgres",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    {
        Ok(_) => panic!("connected without its root certificate"),
        Err(e) => e.to_string(),
    };
    assert!(
        missing.contains("sslrootcert /nonexistent/ca.pem"),
        "{missing}"
    );
}

#[tokio::test]
async fn connection_failures_name_the_server_and_carry_the_servers_reason() {
    let tls = tls_cluster().await;
    let port = tls.port();

    let wrong_password =
        tls.cluster
            .url("postgres")
            .replacen("dsreg:", "dsreg:not-the-password-x9", 1);
    let bad = refused(&format!("{wrong_password}?sslmode=require")).await;
    assert!(bad.contains("28P01"), "{bad}");
    assert!(bad.contains("password authentication failed"), "{bad}");
    assert!(bad.contains(&format!("127.0.0.1:{port}")), "{bad}");
    assert!(
        !bad.contains("not-the-password-x9"),
        "the password leaked: {bad}"
    );

    let unknown = refused(&tls.url("127.0.0.1", "no_such_db", "sslmode=require")).await;
    assert!(unknown.contains("3D000"), "{unknown}");
    assert!(unknown.contains("no_such_db"), "{unknown}");

    // A port nobody listens on: connection refused, with the address.
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let url = tls
        .cluster
        .url("postgres")
        .replace(&format!(":{port}/"), &format!(":{closed}/"));
    let down = refused(&url).await;
    assert!(down.to_lowercase().contains("refused"), "{down}");
    assert!(down.contains(&format!("127.0.0.1:{closed}")), "{down}");
    assert!(
        !down.contains(
            tls.cluster
                .url("postgres")
                .split(['@', ':'])
                .nth(2)
                .unwrap()
        ),
        "{down}"
    );

    // The pool says the same, in the database's words rather than the pool's.
    let pool = dsreg::db::pool(
        &format!("{wrong_password}?sslmode=require"),
        1,
        Duration::from_secs(5),
    )
    .unwrap();
    let pooled = match pool.get().await {
        Ok(_) => panic!("the pool connected with a wrong password"),
        Err(e) => dsreg::db::Error::from(e),
    };
    assert!(pooled.is_unreachable(), "{pooled}");
    assert!(pooled.to_string().contains("28P01"), "{pooled}");
}

#[tokio::test]
async fn publishes_reach_workers_over_tls_listener_included() {
    let tls = tls_cluster().await;
    let ca = tls.file("ca.crt");
    let admin = tls.url(
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let db = TestDb::on_server(&admin).await;
    let app = TestApp::spawn(&db.url, |_| {}).await;

    let ds = db.datasource("over-tls").await;
    let v1 = db.version(ds.id, json!({ "rate_per_sec": 100 })).await;
    db.publish_sql(ds.id, v1).await;
    db.wait_for_state(ds.id, "RUNNING on v1 over TLS", |s| {
        s.worker_status == WorkerStatus::Running && s.running_version == Some(v1)
    })
    .await;

    // Every session of the registry, the listener's included, is encrypted.
    let client = db.client().await;
    let sessions: Vec<(String, bool)> = client
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        sessions.iter().any(|(name, _)| name == "dsreg-listener"),
        "{sessions:?}"
    );
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_refused_statement_says_the_servers_code_and_message() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let e = dsreg::db::Error::from(
        client
            .query_one("SELECT 1 / 0", &[])
            .await
            .expect_err("division by zero"),
    );
    let said = e.to_string();
    assert!(said.contains("22012"), "{said}");
    assert!(said.contains("division by zero"), "{said}");
    assert!(!e.is_unreachable(), "{said}");
}

#[tokio::test]
async fn the_binary_migrates_over_verify_full_and_says_why_it_cannot_connect() {
    let tls = tls_cluster().await;
    let ca = tls.file("ca.crt");
    dsreg::db::create_database(
        &tls.url("localhost", "postgres", "sslmode=require"),
        "cli",
        None,
    )
    .await
    .unwrap();
    let migrate = |url: String| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"))
            .arg("migrate")
            .env("DATABASE_URL", url)
            .env_remove("PGSSLMODE")
            .env_remove("PGSSLROOTCERT")
            .output()
    };
    let done = migrate(tls.url(
        "localhost",
        "cli",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    assert!(done.status.success(), "{done:?}");

    let wrong = tls.url("localhost", "cli", "sslmode=verify-full").replacen(
        "dsreg:",
        "dsreg:wrong-pw-7q",
        1,
    );
    // The CA from the environment, as libpq reads PGSSLROOTCERT.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"))
        .arg("migrate")
        .env("DATABASE_URL", &wrong)
        .env("PGSSLROOTCERT", &ca)
        .env_remove("PGSSLMODE")
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("28P01"), "{stderr}");
    assert!(
        stderr.contains(&format!("localhost:{}", tls.port())),
        "{stderr}"
    );
    assert!(
        !stderr.contains("wrong-pw-7q"),
        "the password leaked: {stderr}"
    );
}
