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
use crate::backoff::{Exponential, Retries};
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

        // After a failed pass: 1 s, doubling up to the rescan interval.
        let mut retries = Retries::new(Exponential::new(
            Duration::from_secs(1),
            self.config.rescan_interval.max(Duration::from_secs(1)),
        ));
        let mut retry_at: Option<Instant> = None;
        let mut next_rescan = Instant::now();
        loop {
            let wake = retry_at.map_or(next_rescan, |at| at.min(next_rescan));
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(()) = changes.recv() => {
                    if !self.settle(&mut changes, &shutdown).await {
                        break;
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
            // Dropping a pass rolls its transaction back: stopping mid-pass is safe.
            let ok = tokio::select! {
                () = shutdown.cancelled() => break,
                ok = self.pass(&dir) => ok,
            };
            retry_at = if ok {
                retries.succeeded();
                None
            } else {
                Some(Instant::now() + retries.failed(rand::random::<f64>()))
            };
            next_rescan = Instant::now() + self.config.rescan_interval;
        }
        drop(watcher);
        Ok(())
    }

    /// Waits until the burst of changes that just began is over (see [`Debounce`]); false
    /// when shutdown came first.
    async fn settle(
        &self,
        changes: &mut mpsc::UnboundedReceiver<()>,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut burst = Debounce::new(self.config.debounce, Instant::now());
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep_until(burst.due_at()) => return true,
                Some(()) = changes.recv() => burst.changed(Instant::now()),
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

/// One burst of changes, as a pure state machine (the caller tells the time): the pass is
/// due once no change has come for the debounce `window`, or [`MAX_DEBOUNCES`] windows after
/// the burst began, whichever is first, so a folder that never goes quiet is still synced.
#[derive(Debug, Clone, Copy)]
struct Debounce {
    window: Duration,
    began: Instant,
    last: Instant,
}

impl Debounce {
    /// A burst whose first change came at `now`.
    fn new(window: Duration, now: Instant) -> Self {
        Self {
            window,
            began: now,
            last: now,
        }
    }

    /// Another change, at `now`.
    fn changed(&mut self, now: Instant) {
        self.last = self.last.max(now);
    }

    /// When the pass is due.
    fn due_at(&self) -> Instant {
        (self.last + self.window).min(self.began + self.window * MAX_DEBOUNCES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(100);

    /// The times at which passes run for changes at `changes` (sorted), as the watcher runs
    /// them: a pass when a burst's due time comes before its next change.
    fn passes(changes: &[Instant]) -> Vec<Instant> {
        let mut passes = Vec::new();
        let mut burst: Option<Debounce> = None;
        for &at in changes {
            match &mut burst {
                Some(b) if at < b.due_at() => b.changed(at),
                _ => {
                    if let Some(b) = burst.take() {
                        passes.push(b.due_at());
                    }
                    burst = Some(Debounce::new(WINDOW, at));
                }
            }
        }
        passes.extend(burst.map(|b| b.due_at()));
        passes
    }

    #[test]
    fn saves_closer_than_the_window_are_one_pass_after_the_last() {
        let start = Instant::now();
        let saves: Vec<Instant> = (0..10u32).map(|i| start + WINDOW * 3 / 10 * i).collect();
        assert_eq!(passes(&saves), [saves[9] + WINDOW]);
    }

    #[test]
    fn a_gap_longer_than_the_window_ends_the_burst() {
        let start = Instant::now();
        let saves = [start, start + WINDOW / 2, start + WINDOW * 2];
        assert_eq!(
            passes(&saves),
            [start + WINDOW / 2 + WINDOW, start + WINDOW * 3]
        );
    }

    #[test]
    fn a_folder_that_never_goes_quiet_is_synced_every_ten_windows() {
        let start = Instant::now();
        let saves: Vec<Instant> = (0..100u32).map(|i| start + WINDOW / 2 * i).collect();
        let passes = passes(&saves);
        assert_eq!(passes[0], start + WINDOW * MAX_DEBOUNCES);
        assert!(passes.len() >= 4, "{passes:?}");
    }

    proptest::proptest! {
        /// Whatever the gaps: a pass is due within a window of a burst's last change and never
        /// later than ten windows after it began; changes closer than the window never get
        /// two passes unless the burst outlasts ten windows.
        #[test]
        fn a_burst_is_due_after_its_last_change_within_its_bounds(
            gaps in proptest::collection::vec(0u64..250, 1..40),
        ) {
            let start = Instant::now();
            let mut at = start;
            let mut burst = Debounce::new(WINDOW, start);
            for gap in &gaps {
                at += Duration::from_millis(*gap);
                if at >= burst.due_at() {
                    burst = Debounce::new(WINDOW, at);
                } else {
                    burst.changed(at);
                }
                let due = burst.due_at();
                proptest::prop_assert!(due > at);
                proptest::prop_assert!(due <= at + WINDOW);
                proptest::prop_assert!(due <= burst.began + WINDOW * MAX_DEBOUNCES);
            }
            if gaps.iter().all(|g| *g < WINDOW.as_millis() as u64) && gaps.iter().sum::<u64>() < 900 {
                let times: Vec<Instant> = gaps
                    .iter()
                    .scan(start, |t, g| {
                        *t += Duration::from_millis(*g);
                        Some(*t)
                    })
                    .collect();
                proptest::prop_assert_eq!(passes(&times).len(), 1);
            }
        }
    }
}
