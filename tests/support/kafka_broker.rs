//! A Kafka-protocol broker of a test's own: `tansu` with in-memory storage on a free port,
//! stopped (SIGKILL, then reaped) when dropped. The binary is found through
//! `DSREG_TEST_KAFKA_BROKER`, by default where `.ci/kafka-broker` installs it
//! (`target/tools/tansu/bin/tansu`); a missing binary fails the test naming that script.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// The environment variable naming the broker binary.
pub const BROKER_ENV: &str = "DSREG_TEST_KAFKA_BROKER";

/// The broker binary: `DSREG_TEST_KAFKA_BROKER`, else `.ci/kafka-broker`'s install path.
///
/// # Panics
/// When the binary is not there: the message says how to get it.
pub fn broker_binary() -> PathBuf {
    let path = std::env::var_os(BROKER_ENV).map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
                PathBuf::from,
            );
            target.join("tools/tansu/bin/tansu")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no Kafka broker binary at {}: run `.ci/kafka-broker` (it installs tansu there) or set \
         {BROKER_ENV} to a tansu binary",
        path.display()
    );
    path
}

/// A running broker.
pub struct KafkaBroker {
    child: Option<std::process::Child>,
    port: u16,
    /// Where its output goes.
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KafkaBroker {
    /// Starts a broker on a free port and waits (up to 60 s) until it accepts connections.
    pub async fn start() -> Self {
        let port = free_port();
        Self::start_on(port).await
    }

    /// Starts a broker that requires a SASL login (SCRAM), with no users: every login fails.
    pub async fn start_authenticating() -> Self {
        Self::launch(free_port(), true).await
    }

    /// Starts a broker on `port` (to bring one back on the same address).
    pub async fn start_on(port: u16) -> Self {
        Self::launch(port, false).await
    }

    async fn launch(port: u16, authentication: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("broker.log");
        let out = std::fs::File::create(&log).unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = std::process::Command::new(broker_binary());
        command.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ]);
        if authentication {
            command.arg("--authentication");
        }
        let child = command
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .current_dir(dir.path())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the broker starts");
        let broker = Self {
            child: Some(child),
            port,
            log,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker did not listen on {port} within 60 s: {}",
                std::fs::read_to_string(&broker.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (SIGKILL) and waits for it to exit; its port is free again after.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open and nothing answers, as when a broker
    /// hangs or the network drops packets.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the broker runs");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).expect("signal delivered");
    }

    /// What it logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
