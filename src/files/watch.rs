//! The folder watcher: `dsreg sync --watch DIR` and `dsreg serve --sync-dir DIR`. A change
//! under the folder is a hint, not a delivery: once the folder has been quiet for the
//! debounce time (a burst of saves is one pass), the whole folder is synced again, re-reading
//! only files whose text changed. A full pass also runs at start, on an interval (repairing
//! missed events, publishing versions whose secrets have since been put), and after a failed
//! pass, with backoff.
//!
//! Stops when its cancellation token fires; a pass in flight is dropped with its
//! transaction, which rolls back, so the next start redoes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use deadpool_postgres::Pool;
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::sync::{Mode, Options, Report, Syncer};
use super::{ConflictPolicy, Error};
use crate::connectors::Catalog;
use crate::transform::Limits;

/// What a watcher watches and how it syncs.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The folder.
    pub dir: PathBuf,
    /// What to do with conflicts.
    pub conflict: ConflictPolicy,
    /// Archive datasources whose file is gone.
    pub prune: bool,
    /// Quiet time after a change before a pass.
    pub debounce: Duration,
    /// Time between full passes with no change seen.
    pub rescan_interval: Duration,
}

/// A burst of changes longer than this many debounce times gets a pass anyway.
const MAX_DEBOUNCES: u32 = 10;

/// Keeps the database in step with a folder of datasource files.
pub struct Watcher {
    config: WatchConfig,
    syncer: Syncer,
    reports: Option<mpsc::UnboundedSender<Result<Report, String>>>,
}

impl Watcher {
    /// A watcher writing through `pool`, checking with `catalog` under `limits`.
    pub fn new(pool: Pool, catalog: Catalog, limits: Limits, config: WatchConfig) -> Self {
        Self {
            config,
            syncer: Syncer::new(pool, catalog, limits),
            reports: None,
        }
    }

    /// Sends each pass's report (or failure) to `reports`.
    pub fn report_to(&mut self, reports: mpsc::UnboundedSender<Result<Report, String>>) {
        self.reports = Some(reports);
    }

    /// Watches until `shutdown` fires.
    ///
    /// # Errors
    /// [`Error::Watch`] when the folder does not exist or cannot be watched.
    ///
    /// # Cancel safety
    /// Dropping it mid-pass rolls that pass's transaction back; nothing is half applied.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let dir = std::fs::canonicalize(&self.config.dir).map_err(|e| Error::Watch {
            path: self.config.dir.clone(),
            reason: e.to_string(),
        })?;
        if !dir.is_dir() {
            return Err(Error::Watch {
                path: self.config.dir.clone(),
                reason: "not a folder".into(),
            });
        }
        let (changed, mut changes) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    Ok(e) => {
                        !matches!(e.kind, EventKind::Access(_))
                            && e.paths.iter().any(|p| !hidden(p))
                    }
                    // An overflowed queue or a watch error: only a full pass is sure to catch up.
                    Err(_) => true,
                };
                if relevant {
                    let _ = changed.send(());
                }
            })
            .map_err(|e| watch_error(&dir, &e))?;
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .map_err(|e| watch_error(&dir, &e))?;
        tracing::info!(dir = %dir.display(), conflict = self.config.conflict.as_str(), prune = self.config.prune, "watching datasource files");

        let mut retry = Retry::default();
        let mut next_rescan = Instant::now();
        loop {
            let wait_retry = retry.at.unwrap_or(next_rescan).min(next_rescan);
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(()) = changes.recv() => {
                    if !self.settle(&mut changes, &shutdown).await {
                        break;
                    }
                }
                () = tokio::time::sleep_until(wait_retry) => {}
            }
            let ok = self.pass(&dir).await;
            retry.after(ok, self.config.rescan_interval);
            next_rescan = Instant::now() + self.config.rescan_interval;
        }
        drop(watcher);
        Ok(())
    }

    /// Waits until no change has come for the debounce time (at most [`MAX_DEBOUNCES`] of
    /// them); false when shutdown came first.
    async fn settle(
        &self,
        changes: &mut mpsc::UnboundedReceiver<()>,
        shutdown: &CancellationToken,
    ) -> bool {
        let debounce = self.config.debounce;
        let latest = Instant::now() + debounce * MAX_DEBOUNCES;
        let mut quiet_at = Instant::now() + debounce;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep_until(quiet_at.min(latest)) => return true,
                Some(()) = changes.recv() => quiet_at = Instant::now() + debounce,
            }
        }
    }

    /// One pass; true when it ran to its end (problems in files included).
    async fn pass(&mut self, dir: &Path) -> bool {
        let options = Options {
            mode: Mode::Watch,
            conflict: self.config.conflict,
            prune: self.config.prune,
            dry_run: false,
        };
        let result = self.syncer.run(&[dir.to_owned()], options, None).await;
        let ok = result.is_ok();
        match &result {
            Ok(report) => log(report),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "file sync pass failed; retrying")
            }
        }
        if let Some(reports) = &self.reports {
            let _ = reports.send(result.map_err(|e| e.to_string()));
        }
        ok
    }
}

fn watch_error(dir: &Path, e: &notify::Error) -> Error {
    Error::Watch {
        path: dir.to_owned(),
        reason: e.to_string(),
    }
}

fn hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn log(report: &Report) {
    for step in report
        .plan
        .steps
        .iter()
        .filter(|s| s.action.writes() || s.conflict.is_some())
    {
        tracing::info!(
            action = step.action.as_str(),
            datasource = %step.key,
            id = step.datasource.map(tracing::field::display),
            version = step.version,
            file = %step.path.display(),
            conflict = step.conflict.as_ref().map(|c| c.resolution.as_str()),
            waiting_for_secrets = step.waiting_for.join(","),
            "file sync"
        );
    }
    for problem in &report.problems {
        tracing::warn!(problem = %problem, "datasource file skipped");
    }
}

/// When to try again after a failed pass: 1 s, doubling up to the rescan interval.
#[derive(Debug, Default)]
struct Retry {
    at: Option<Instant>,
    delay: Duration,
}

impl Retry {
    fn after(&mut self, ok: bool, cap: Duration) {
        if ok {
            self.at = None;
            self.delay = Duration::ZERO;
        } else {
            self.delay = (self.delay * 2).max(Duration::from_secs(1)).min(cap);
            self.at = Some(Instant::now() + self.delay);
        }
    }
}
