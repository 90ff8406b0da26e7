//! A throwaway PgBouncer (Debian's `pgbouncer`) in front of the test cluster, in transaction
//! mode, run as the `postgres` user when the tests run as root (as the cluster is).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use crate::helpers::wait_for;

/// A running PgBouncer; stopped when dropped. Configured as an operator would for a client
/// that sends startup `options` (PgBouncer before 1.20 refuses any; later ones any but the
/// few they track): ignored, so a statement timeout set there does not hold behind it.
pub struct PgBouncer {
    child: Child,
    port: u16,
    user: String,
    password: String,
    dir: tempfile::TempDir,
}

/// Server sessions PgBouncer keeps per database and user: fewer than the registry's pool, so
/// client transactions really are multiplexed onto shared sessions. All are kept open and
/// handed out in turn (`server_round_robin`), so consecutive transactions of one client land
/// on different sessions: anything that leans on session state fails at once instead of by
/// chance.
const SERVER_SESSIONS: usize = 3;

fn binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file())
        .expect("pgbouncer is installed (Debian package `pgbouncer`)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode in front of the server `url` points at (any of
    /// its databases, with `url`'s user and password).
    pub async fn transaction_mode(url: &str) -> Self {
        let config = tokio_postgres::Config::from_str(url).expect("a test URL");
        let user = config.get_user().expect("a user").to_owned();
        let password = String::from_utf8(config.get_password().expect("a password").to_vec())
            .expect("a UTF-8 password");
        let upstream_port = config.get_ports().first().copied().unwrap_or(5432);
        let dir = tempfile::Builder::new()
            .prefix("dsreg-pgbouncer")
            .tempdir()
            .expect("a folder");
        let port = free_port();
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(
            path("userlist.txt"),
            format!("\"{user}\" \"{}\"\n", password.replace('"', "\"\"")),
        )
        .unwrap();
        std::fs::write(
            path("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 * = host=127.0.0.1 port={upstream_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = scram-sha-256\n\
                 auth_file = {}\n\
                 admin_users = {user}\n\
                 pool_mode = transaction\n\
                 default_pool_size = {SERVER_SESSIONS}\n\
                 min_pool_size = {SERVER_SESSIONS}\n\
                 server_round_robin = 1\n\
                 max_client_conn = 1000\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {}\n",
                path("userlist.txt"),
                path("pgbouncer.log"),
            ),
        )
        .unwrap();
        let mut command = Command::new(binary());
        command
            .arg(path("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/");
        if nix::unistd::geteuid().is_root() {
            // PgBouncer refuses to run as root; it runs as the cluster's user.
            let server = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("a `postgres` user to run pgbouncer as");
            for entry in std::fs::read_dir(dir.path())
                .unwrap()
                .map(Result::unwrap)
                .map(|e| e.path())
                .chain([dir.path().to_owned()])
            {
                nix::unistd::chown(&entry, Some(server.uid), Some(server.gid)).unwrap();
            }
            command.uid(server.uid.as_raw()).gid(server.gid.as_raw());
        }
        let log = path("pgbouncer.log");
        let child = command.spawn().expect("starting pgbouncer");
        let bouncer = Self {
            child,
            port,
            user,
            password,
            dir,
        };
        let admin = bouncer.url("pgbouncer");
        wait_for(
            &format!("pgbouncer to accept connections (its log: {log})"),
            Duration::from_secs(30),
            || async {
                let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(connection);
                client.simple_query("SHOW VERSION").await.ok().map(|_| ())
            },
        )
        .await;
        bouncer
    }

    /// The URL of `database` through PgBouncer.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{database}?sslmode=disable",
            self.user, self.password, self.port
        )
    }

    /// Runs `command` on PgBouncer's admin console (`PAUSE db`, `RESUME db`, `SHOW STATS`).
    pub async fn admin(&self, command: &str) -> Vec<tokio_postgres::SimpleQueryMessage> {
        let (client, connection) =
            tokio_postgres::connect(&self.url("pgbouncer"), tokio_postgres::NoTls)
                .await
                .expect("pgbouncer's admin console");
        tokio::spawn(connection);
        client
            .simple_query(command)
            .await
            .unwrap_or_else(|e| panic!("pgbouncer {command}: {e}"))
    }

    /// Transactions PgBouncer has passed to `database` (its admin console's `SHOW STATS`).
    pub async fn transactions(&self, database: &str) -> u64 {
        let messages = self.admin("SHOW STATS").await;
        messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row)
                    if row.get("database") == Some(database) =>
                {
                    row.get("total_xact_count").and_then(|n| n.parse().ok())
                }
                _ => None,
            })
            .unwrap_or(0)
    }

    /// The end of PgBouncer's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
