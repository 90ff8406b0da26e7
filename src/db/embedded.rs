//! The embedded Postgres launcher: a private cluster from the machine's own PostgreSQL
//! binaries, used by `dsreg serve` when no `DATABASE_URL` is given, by the tests and by the
//! benches.
//!
//! It owns one data folder: `initdb` on first use, a start on 127.0.0.1 on a free port (and
//! a socket inside the data folder), and a stop when its owner shuts down.
//!
//! One process owns a folder's cluster: the one holding an exclusive OS file lock
//! (`flock`) on `dsreg.lock` in the folder, held for the life of its [`EmbeddedCluster`]
//! and released by the kernel when the process ends, however it ends. The owner starts the
//! server, or adopts one left running by an owner that was killed, and stops it when it
//! shuts down. A launcher that finds the lock held either refuses
//! ([`EmbeddedCluster::start_exclusive`], naming the owner's pid) or reuses the running server
//! and leaves it running ([`EmbeddedCluster::start`]). When the
//! process runs as root, the server runs as an unprivileged user (`postgres` unless
//! `DSREG_PG_USER` names another) and the folder is handed to that user.
//!
//! Every call here is blocking (it runs `initdb` and `pg_ctl`); async callers use
//! `spawn_blocking`. It does not own the schema (see `db::migrations`).

use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The superuser `initdb` creates and the database dsreg uses inside the cluster.
pub const SUPERUSER: &str = "dsreg";
/// The database created for dsreg in a fresh cluster.
pub const DATABASE: &str = "dsreg";
const PASSWORD_FILE: &str = "dsreg.password";
const SERVER_CONF: &str = "dsreg.conf";
const SERVER_LOG: &str = "dsreg-server.log";
/// The file in the data folder whose `flock` marks the owning process (it holds the pid).
pub const LOCK_FILE: &str = "dsreg.lock";
const PG_LIB_DIR: &str = "/usr/lib/postgresql";
const INSTALL_HINT: &str = "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`), \
     put its bin folder on PATH, or set DATABASE_URL to use an existing database";

/// What can go wrong while finding, creating, starting or stopping the embedded cluster.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// No `initdb`/`pg_ctl` on PATH nor under `/usr/lib/postgresql/*/bin`.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in {PG_LIB_DIR}/*/bin; {INSTALL_HINT}"
    )]
    BinariesMissing,
    /// The cluster in the folder was made by another major version than any binaries found.
    #[error(
        "the cluster in {dir} was created by PostgreSQL {cluster}, but only PostgreSQL {found} binaries were found; install PostgreSQL {cluster} or use another data folder"
    )]
    VersionMismatch {
        /// The data folder.
        dir: PathBuf,
        /// Major version recorded in `PG_VERSION`.
        cluster: String,
        /// Major version of the binaries that were found.
        found: String,
    },
    /// The configured port is taken by another process.
    #[error(
        "port {0} on 127.0.0.1 is already in use; choose another with --pg-port or leave it unset to pick a free one"
    )]
    PortInUse(u16),
    /// The data folder belongs to a user this process may not act for.
    #[error(
        "data folder {dir} is owned by {owner}, not by {expected}; use a folder of your own (--data-dir) or fix its ownership"
    )]
    ForeignOwner {
        /// The data folder.
        dir: PathBuf,
        /// Who owns it.
        owner: String,
        /// Who should.
        expected: String,
    },
    /// Running as root with no unprivileged user to run the server as.
    #[error(
        "running as root, but there is no user `{0}` to run PostgreSQL as (it refuses to run as root); create it (`useradd --system {0}`) or set DSREG_PG_USER"
    )]
    NoServerUser(String),
    /// The server user cannot reach the data folder through its parents.
    #[error(
        "the PostgreSQL server user `{user}` cannot reach {dir}: {blocked} is not searchable by it; choose a data folder it can reach (--data-dir)"
    )]
    Unreachable {
        /// The server user.
        user: String,
        /// The data folder.
        dir: PathBuf,
        /// The parent folder that blocks it.
        blocked: PathBuf,
    },
    /// Another process owns the folder's cluster (holds its lock) and `exclusive` was asked.
    #[error(
        "another dsreg process{} already owns the embedded PostgreSQL in {dir}; stop it first, or give this one another --data-dir",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse {
        /// The data folder.
        dir: PathBuf,
        /// The owner's pid, as it wrote it in the lock file (absent while it is writing it).
        pid: Option<u32>,
    },
    /// No cluster is running on the folder (for `dsreg db url`).
    #[error("no embedded PostgreSQL is running on {0}; start one with `dsreg serve`")]
    NotRunning(PathBuf),
    /// A PostgreSQL tool failed; `log` holds the end of its output or of the server log.
    #[error("{step} failed for {dir}: {status}\n--- last lines of the log ---\n{log}")]
    Tool {
        /// What was being done (`initdb`, `pg_ctl start`, ...).
        step: &'static str,
        /// The data folder.
        dir: PathBuf,
        /// The exit status.
        status: String,
        /// The tail of the relevant log.
        log: String,
    },
    /// A file-system or process error around the launcher's own files.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LaunchError + 'a {
    move |source| LaunchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// How to launch a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The data folder (created if missing).
    pub data_dir: PathBuf,
    /// A fixed port; `None` picks a free one at every start.
    pub port: Option<u16>,
    /// Trade durability for speed (no fsync): for tests and benches only.
    pub throwaway: bool,
}

impl ClusterOptions {
    /// Options for a durable cluster in `data_dir`.
    pub fn durable(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            port: None,
            throwaway: false,
        }
    }
}

/// The user the server runs as, when the process is root.
#[derive(Debug, Clone)]
struct ServerUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// A running embedded cluster.
pub struct EmbeddedCluster {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    password: String,
    run_as: Option<ServerUser>,
    started_here: bool,
    /// The folder's lock, while this process owns the cluster (it then stops it, whether it
    /// started it or adopted it); dropped after the stop in [`Drop`].
    lock: Option<OwnerLock>,
    remove_on_stop: Option<PathBuf>,
    stopped: bool,
}

impl fmt::Debug for EmbeddedCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedCluster")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .field("started_here", &self.started_here)
            .field("owned", &self.lock.is_some())
            .finish_non_exhaustive()
    }
}

impl EmbeddedCluster {
    /// Takes the folder's lock when no other process holds it, creates the cluster if the
    /// folder holds none, starts it unless it already runs, and makes sure the `dsreg`
    /// database exists. With the lock, a server already running is one a killed owner left
    /// behind: it is adopted, and stopped with this cluster. Without it (another process
    /// owns the folder), the running server is reused and left running.
    ///
    /// # Errors
    /// Any [`LaunchError`]: binaries missing, port in use, a folder owned by someone else, a
    /// server that will not start (with the tail of its log); [`LaunchError::InUse`] when
    /// another process owns the folder and its server is not running yet.
    pub fn start(options: &ClusterOptions) -> Result<Self, LaunchError> {
        Self::launch(options, false)
    }

    /// [`Self::start`] for the folder's one owner (`dsreg serve`): refused with
    /// [`LaunchError::InUse`], naming the owner's pid, when another process owns the folder.
    ///
    /// # Errors
    /// As [`Self::start`].
    pub fn start_exclusive(options: &ClusterOptions) -> Result<Self, LaunchError> {
        Self::launch(options, true)
    }

    fn launch(options: &ClusterOptions, exclusive: bool) -> Result<Self, LaunchError> {
        let run_as = server_user()?;
        let data_dir = absolute(&options.data_dir)?;
        prepare_folder(&data_dir, run_as.as_ref())?;
        let lock = match OwnerLock::try_take(&data_dir)? {
            Taken::Owner(lock) => Some(lock),
            Taken::HeldBy(pid) if exclusive => {
                return Err(LaunchError::InUse { dir: data_dir, pid });
            }
            Taken::HeldBy(pid) => {
                // The owner starts the server; another process never does, so two never do.
                if running_port(&data_dir).is_none() {
                    return Err(LaunchError::InUse { dir: data_dir, pid });
                }
                None
            }
        };
        let bin_dir = find_bin_dir(cluster_version(&data_dir).as_deref(), &data_dir)?;
        let mut cluster = Self {
            bin_dir,
            data_dir,
            port: 0,
            password: String::new(),
            run_as,
            started_here: false,
            lock,
            remove_on_stop: None,
            stopped: false,
        };
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.initdb()?;
        }
        cluster.password = read_trimmed(&cluster.data_dir.join(PASSWORD_FILE))?;
        if let Some(port) = running_port(&cluster.data_dir) {
            cluster.port = port;
            if cluster.lock.is_some() {
                tracing::warn!(
                    data_dir = %cluster.data_dir.display(),
                    port,
                    "adopting the embedded PostgreSQL a previous dsreg process left running (it was killed); it is stopped at shutdown"
                );
            }
        } else {
            cluster.start_server(options)?;
        }
        Ok(cluster)
    }

    /// Starts a throwaway cluster in a new temporary folder, removed again by [`Self::stop`].
    ///
    /// # Errors
    /// As [`Self::start`].
    pub fn start_temporary() -> Result<Self, LaunchError> {
        let parent =
            std::env::temp_dir().join(format!("dsreg-pg-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
        // The server user must be able to traverse the temporary parent.
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o755))
            .map_err(io_err("setting permissions on", &parent))?;
        let options = ClusterOptions {
            data_dir: parent.join("pg"),
            port: None,
            throwaway: true,
        };
        match Self::launch(&options, true) {
            Ok(mut cluster) => {
                cluster.remove_on_stop = Some(parent);
                Ok(cluster)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&parent);
                Err(e)
            }
        }
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this process started the server.
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// Whether this process owns the server (holds the folder's lock), and so stops it:
    /// it started it, or adopted one a killed owner left running.
    pub fn owned(&self) -> bool {
        self.lock.is_some()
    }

    /// A connection URL for `database` (with the superuser's password).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Stops the server if this process owns it (started or adopted it), then lets the
    /// folder's lock go, and removes a temporary folder. Safe to call twice.
    ///
    /// # Errors
    /// `pg_ctl stop` failed.
    pub fn stop(&mut self) -> Result<(), LaunchError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if self.lock.is_some() {
            let mode = if self.remove_on_stop.is_some() {
                "immediate"
            } else {
                "fast"
            };
            let output = self
                .pg_command("pg_ctl")
                .args(["stop", "-w", "-t", "60", "-m", mode, "-D"])
                .arg(&self.data_dir)
                .output()
                .map_err(io_err("running pg_ctl stop in", &self.data_dir))?;
            if !output.status.success() && running_port(&self.data_dir).is_some() {
                // Still running: the lock stays held, so no other process adopts it while
                // it may yet be stopping.
                return Err(self.tool_error("pg_ctl stop", &output));
            }
            self.lock = None;
        }
        if let Some(parent) = self.remove_on_stop.take() {
            fs::remove_dir_all(&parent).map_err(io_err("removing", &parent))?;
        }
        Ok(())
    }

    /// Restarts the server in place (same port, same data), dropping every connection; for
    /// tests of what survives a database restart.
    ///
    /// # Errors
    /// `pg_ctl restart` failed.
    pub fn restart(&self) -> Result<(), LaunchError> {
        let output = self
            .pg_command("pg_ctl")
            .args(["restart", "-w", "-t", "60", "-s", "-m", "fast", "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.data_dir.join(SERVER_LOG))
            .output()
            .map_err(io_err("running pg_ctl restart in", &self.data_dir))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(self.tool_error("pg_ctl restart", &output))
        }
    }

    fn initdb(&self) -> Result<(), LaunchError> {
        let password: String = {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..32)
                .map(|_| format!("{:x}", rng.random_range(0..16u8)))
                .collect()
        };
        // initdb needs the password in a file the server user can read; it lives in the data
        // folder, which only that user (and root) can enter.
        let pwfile = self.data_dir.join(PASSWORD_FILE);
        fs::write(&pwfile, format!("{password}\n")).map_err(io_err("writing", &pwfile))?;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting permissions on", &pwfile))?;
        self.chown(&pwfile)?;
        // initdb wants an empty folder: it runs in a scratch folder beside the data folder
        // and the result is moved in.
        let scratch = self.data_dir.with_extension("initdb");
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch).map_err(io_err("creating", &scratch))?;
        fs::set_permissions(&scratch, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting permissions on", &scratch))?;
        self.chown(&scratch)?;
        let output = self
            .pg_command("initdb")
            .args([
                "--no-instructions",
                "--no-locale",
                "--encoding=UTF8",
                "--username",
                SUPERUSER,
            ])
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ])
            .arg("--pwfile")
            .arg(&pwfile)
            .arg("-D")
            .arg(&scratch)
            .output()
            .map_err(io_err("running initdb for", &self.data_dir))?;
        if !output.status.success() {
            let _ = fs::remove_dir_all(&scratch);
            return Err(self.tool_error("initdb", &output));
        }
        for entry in fs::read_dir(&scratch).map_err(io_err("reading", &scratch))? {
            let entry = entry.map_err(io_err("reading", &scratch))?;
            let target = self.data_dir.join(entry.file_name());
            fs::rename(entry.path(), &target)
                .map_err(io_err("moving initdb output to", &target))?;
        }
        fs::remove_dir(&scratch).map_err(io_err("removing", &scratch))?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(io_err("reading", &conf))?;
        text.push_str(&format!(
            "\n# dsreg: settings written at every start\ninclude_if_exists = '{SERVER_CONF}'\n"
        ));
        fs::write(&conf, text).map_err(io_err("writing", &conf))
    }

    fn start_server(&mut self, options: &ClusterOptions) -> Result<(), LaunchError> {
        // A free port can be taken between the check and the server's bind; a picked port is
        // retried, a configured one is reported.
        let attempts = if options.port.is_some() { 1 } else { 3 };
        let mut last = None;
        for _ in 0..attempts {
            let port = match options.port {
                Some(port) if !port_is_free(port) => return Err(LaunchError::PortInUse(port)),
                Some(port) => port,
                None => free_port().map_err(io_err("finding a free port for", &self.data_dir))?,
            };
            self.write_server_conf(port, options.throwaway)?;
            let log = self.data_dir.join(SERVER_LOG);
            truncate_log(&log);
            let output = self
                .pg_command("pg_ctl")
                .args(["start", "-w", "-t", "60", "-s", "-D"])
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&log)
                .output()
                .map_err(io_err("running pg_ctl start in", &self.data_dir))?;
            if output.status.success() {
                self.port = port;
                self.started_here = true;
                return Ok(());
            }
            let tail = tail_of(&log, 20);
            if (tail.contains("could not bind") || tail.contains("Address already in use"))
                && let Some(port) = options.port
            {
                return Err(LaunchError::PortInUse(port));
            }
            last = Some(LaunchError::Tool {
                step: "pg_ctl start",
                dir: self.data_dir.clone(),
                status: output.status.to_string(),
                log: if tail.is_empty() {
                    output_tail(&output)
                } else {
                    tail
                },
            });
        }
        Err(last.unwrap_or(LaunchError::PortInUse(0)))
    }

    fn write_server_conf(&self, port: u16, throwaway: bool) -> Result<(), LaunchError> {
        // A Unix socket path is limited to 107 bytes; a deep data folder gets TCP only.
        let socket_dir = if self.data_dir.as_os_str().len() + 20 < 107 {
            self.data_dir.display().to_string()
        } else {
            String::new()
        };
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nmax_connections = 200\n",
            socket_dir.replace('\'', "''")
        );
        if throwaway {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let path = self.data_dir.join(SERVER_CONF);
        fs::write(&path, conf).map_err(io_err("writing", &path))?;
        self.chown(&path)
    }

    /// A command for one of the PostgreSQL tools, run as the server user when we are root.
    fn pg_command(&self, tool: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(tool));
        // The tools resolve relative paths against the working folder, which must be
        // reachable by the server user.
        command
            .current_dir("/")
            .env_remove("PGDATA")
            .env("LC_ALL", "C");
        if let Some(user) = &self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        command
    }

    fn chown(&self, path: &Path) -> Result<(), LaunchError> {
        match &self.run_as {
            Some(user) => chown_to(path, user),
            None => Ok(()),
        }
    }

    fn tool_error(&self, step: &'static str, output: &Output) -> LaunchError {
        LaunchError::Tool {
            step,
            dir: self.data_dir.clone(),
            status: output.status.to_string(),
            log: output_tail(output),
        }
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the embedded PostgreSQL failed");
        }
        // The lock goes after the stop: no other process adopts a server still stopping.
        self.lock.take();
    }
}

/// The exclusive `flock` on a data folder's [`LOCK_FILE`], holding this process's pid.
/// The kernel releases it when the file is closed, so a killed owner never leaves a stale
/// lock; the file's descriptor is close-on-exec, so the server's processes do not inherit it.
struct OwnerLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Whether the folder's lock was taken.
enum Taken {
    /// This process owns the folder now.
    Owner(OwnerLock),
    /// Another process does; its pid as it recorded it.
    HeldBy(Option<u32>),
}

impl OwnerLock {
    fn try_take(data_dir: &Path) -> Result<Taken, LaunchError> {
        use std::io::Write;
        let path = data_dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                let mut file: &fs::File = &lock;
                file.set_len(0)
                    .and_then(|()| writeln!(file, "{}", std::process::id()))
                    .map_err(io_err("writing", &path))?;
                Ok(Taken::Owner(Self { _lock: lock }))
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let pid = fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
                Ok(Taken::HeldBy(pid))
            }
            Err((_, errno)) => Err(LaunchError::Io {
                what: "locking",
                path,
                source: errno.into(),
            }),
        }
    }
}

/// The URL of the cluster running on `data_dir`, for `dsreg db url`.
///
/// # Errors
/// [`LaunchError::NotRunning`] when no server runs there; I/O errors reading its files.
pub fn running_url(data_dir: &Path) -> Result<String, LaunchError> {
    let data_dir = absolute(data_dir)?;
    let port = running_port(&data_dir).ok_or_else(|| LaunchError::NotRunning(data_dir.clone()))?;
    let password = read_trimmed(&data_dir.join(PASSWORD_FILE))?;
    Ok(format!(
        "postgres://{SUPERUSER}:{password}@127.0.0.1:{port}/{DATABASE}"
    ))
}

/// The port of a live server on `data_dir`, from `postmaster.pid` (line 4) when the process
/// it names exists.
fn running_port(data_dir: &Path) -> Option<u16> {
    let pid_file = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let mut lines = pid_file.lines();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    let port: u16 = lines.nth(2)?.trim().parse().ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    let ready = pid_file.lines().nth(7).is_some_and(|s| s.trim() == "ready");
    (alive && ready).then_some(port)
}

fn server_user() -> Result<Option<ServerUser>, LaunchError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = std::env::var("DSREG_PG_USER").unwrap_or_else(|_| "postgres".to_owned());
    match nix::unistd::User::from_name(&name) {
        Ok(Some(user)) if !user.uid.is_root() => Ok(Some(ServerUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })),
        _ => Err(LaunchError::NoServerUser(name)),
    }
}

/// Creates the data folder, checks who owns it and hands it to the server user.
fn prepare_folder(data_dir: &Path, run_as: Option<&ServerUser>) -> Result<(), LaunchError> {
    fs::create_dir_all(data_dir).map_err(io_err("creating", data_dir))?;
    let meta = fs::metadata(data_dir).map_err(io_err("reading", data_dir))?;
    let me = nix::unistd::geteuid().as_raw();
    let allowed = match run_as {
        Some(user) => meta.uid() == me || meta.uid() == user.uid,
        None => meta.uid() == me,
    };
    if !allowed {
        return Err(LaunchError::ForeignOwner {
            dir: data_dir.to_path_buf(),
            owner: user_name(meta.uid()),
            expected: run_as.map_or_else(|| user_name(me), |u| format!("{} or root", u.name)),
        });
    }
    if let Some(user) = run_as {
        if let Some(blocked) = data_dir
            .ancestors()
            .skip(1)
            .find(|dir| !searchable_by(dir, user))
        {
            return Err(LaunchError::Unreachable {
                user: user.name.clone(),
                dir: data_dir.to_path_buf(),
                blocked: blocked.to_path_buf(),
            });
        }
        chown_tree(data_dir, user)?;
    }
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting permissions on", data_dir))
}

fn searchable_by(dir: &Path, user: &ServerUser) -> bool {
    let Ok(meta) = fs::metadata(dir) else {
        return false;
    };
    let mode = meta.mode();
    if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if meta.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

fn chown_to(path: &Path, user: &ServerUser) -> Result<(), LaunchError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    )
    .map_err(|e| LaunchError::Io {
        what: "changing the owner of",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Hands a whole folder to the server user; entries it already owns are left alone.
fn chown_tree(dir: &Path, user: &ServerUser) -> Result<(), LaunchError> {
    let meta = fs::symlink_metadata(dir).map_err(io_err("reading", dir))?;
    if meta.uid() != user.uid {
        chown_to(dir, user)?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(dir).map_err(io_err("reading", dir))? {
            let entry = entry.map_err(io_err("reading", dir))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, LaunchError> {
    std::path::absolute(path).map_err(io_err("resolving", path))
}

fn cluster_version(data_dir: &Path) -> Option<String> {
    fs::read_to_string(data_dir.join("PG_VERSION"))
        .ok()
        .map(|v| v.trim().to_owned())
}

/// Finds a folder holding `initdb` and `pg_ctl`: PATH first, then
/// `/usr/lib/postgresql/*/bin` newest first; when the cluster already exists, the binaries
/// of its major version win.
fn find_bin_dir(wanted: Option<&str>, data_dir: &Path) -> Result<PathBuf, LaunchError> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir(PG_LIB_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    candidates.extend(versioned.into_iter().map(|(_, dir)| dir));
    let usable: Vec<PathBuf> = candidates
        .into_iter()
        .filter(|dir| is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl")))
        .collect();
    let Some(first) = usable.first().cloned() else {
        return Err(LaunchError::BinariesMissing);
    };
    let Some(wanted) = wanted else {
        return Ok(first);
    };
    for dir in &usable {
        if binaries_major(dir).as_deref() == Some(wanted) {
            return Ok(dir.clone());
        }
    }
    Err(LaunchError::VersionMismatch {
        dir: data_dir.to_path_buf(),
        cluster: wanted.to_owned(),
        found: binaries_major(&first).unwrap_or_else(|| "unknown".to_owned()),
    })
}

/// The major version printed by `pg_ctl --version` ("pg_ctl (PostgreSQL) 15.18 ...").
fn binaries_major(dir: &Path) -> Option<String> {
    let output = Command::new(dir.join("pg_ctl"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.split_whitespace().nth(2)?;
    Some(version.split('.').next()?.to_owned())
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn read_trimmed(path: &Path) -> Result<String, LaunchError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(io_err("reading", path))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn truncate_log(path: &Path) {
    // The log is reopened by pg_ctl; keeping only this start's lines makes its tail useful.
    if let Ok(file) = fs::OpenOptions::new().write(true).open(path) {
        let _ = file.set_len(0);
    }
}

fn tail_of(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    last_lines(&text, lines)
}

fn output_tail(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    last_lines(&text, 20)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\nd", 2), "c\nd");
        assert_eq!(last_lines("a", 5), "a");
    }

    #[test]
    fn missing_binaries_message_says_how_to_install() {
        let text = LaunchError::BinariesMissing.to_string();
        assert!(text.contains("apt-get install postgresql"), "{text}");
        assert!(text.contains("DATABASE_URL"), "{text}");
    }
}
