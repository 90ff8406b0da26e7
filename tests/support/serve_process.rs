//! `dsreg serve` as a process of its own, for tests and benchmarks that need the real binary
//! (its logs, its own telemetry setup).

#![allow(dead_code)]

/// `dsreg serve` as a process of its own on `url`, with auth off and the given environment,
/// every line it logs kept.
pub struct ServeProcess {
    /// The process.
    pub child: tokio::process::Child,
    /// Its gRPC address.
    pub grpc_addr: String,
    /// Its HTTP address.
    pub http_addr: String,
    /// Every line it wrote to stdout and stderr so far.
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Starts it and waits until it serves.
    pub async fn start(url: &str, env: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"));
        command
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--insecure-no-auth",
            ])
            .env("DATABASE_URL", url)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("dsreg serve starts");
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let mut addr_tx = Some(addr_tx);
        let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut err = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = out.next_line().await {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = err.next_line().await {
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                        && json["message"] == "dsreg serving"
                        && let Some(tx) = addr_tx.take()
                    {
                        let _ = tx.send((
                            json["grpc"].as_str().unwrap_or_default().to_owned(),
                            json["http"].as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let (grpc_addr, http_addr) =
            tokio::time::timeout(std::time::Duration::from_secs(60), addr_rx)
                .await
                .expect("dsreg serving within 60 s")
                .expect("dsreg serve logged its addresses");
        Self {
            child,
            grpc_addr,
            http_addr,
            logs,
        }
    }

    /// Waits (up to 60 s) until `/readyz` answers 200: the listener is connected, so a
    /// notification sent from now on is received.
    pub async fn ready(&self) {
        let url = format!("http://{}/readyz", self.http_addr);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ok = client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url} not ready within 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// A channel to its gRPC port.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Stops it (SIGTERM) and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait()).await;
    }
}
