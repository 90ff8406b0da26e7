//! `dsreg import`, `dsreg sync --watch`, `dsreg export`: datasource files. Like `dsreg keys`,
//! these work on the database directly with the same settings as `serve` (they write to the
//! source of truth; the registries reload their workers through the outbox). The work is
//! `files`'; this module parses flags, shows progress and prints plans.
//!
//! `sync --watch` runs until Ctrl-C; the others end with their pass.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::keys::with_database;
use super::output::{Output, Printer, note};
use super::progress::Progress;
use super::table::{Table, thousands};
use crate::config::Settings;
use crate::connectors::Catalog;
use crate::db;
use crate::files::export::{self, ExportOptions};
use crate::files::http::Poller;
use crate::files::http::poll::Outcome;
use crate::files::sync::{Phase, Progress as ProgressFn};
use crate::files::{Action, ConflictPolicy, Error, Mode, Options, Report, Step, Syncer};
use crate::files::{WatchConfig, Watcher};

/// What to do with a conflict, for import and sync.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncFlags {
    /// What to do with a datasource changed both in its file and in the database (through the
    /// API or SQL) since the file's last sync: `fail` applies nothing (and records the
    /// conflict), `file-wins` applies the file, `db-wins` keeps the database's version. Every
    /// conflict is recorded as a `sync_conflict` event.
    #[arg(long, value_enum, env = "DSREG_SYNC_CONFLICT", default_value_t = ConflictPolicy::Fail)]
    conflict: ConflictPolicy,
    /// Archive the datasources last synced from a file under these paths that no file defines
    /// any more (without it, a removed file leaves its datasource as it is).
    #[arg(long)]
    prune: bool,
}

/// `dsreg import PATH...`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    settings: Settings,
    /// Datasource files, and folders (every `*.yaml` and `*.yml` in them, recursively).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Print the plan (create / new version / unchanged / archive) and write nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    flags: SyncFlags,
    /// Output: `table` for people, `json` for scripts (one document per datasource).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// `dsreg sync --watch DIR`, `dsreg sync --from URL [--once]`.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    #[command(flatten)]
    settings: Settings,
    /// The folder of datasource files to keep the database in step with, until Ctrl-C.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "from",
        conflicts_with = "from"
    )]
    watch: Option<PathBuf>,
    /// An HTTP(S) URL serving datasource definitions (a YAML document, a multi-document YAML
    /// bundle, or a `.tar.gz` / `.zip` archive of a folder) to keep the database in step
    /// with: polled every `--sync-poll-interval-ms` until Ctrl-C, or once with `--once`.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// Fetch and sync once, all or nothing as `dsreg import` does, and exit.
    #[arg(long, requires = "from")]
    once: bool,
    #[command(flatten)]
    http: crate::config::HttpSourceSettings,
    #[command(flatten)]
    flags: SyncFlags,
    /// Quiet time after a change before syncing, in milliseconds (a burst of saves is one
    /// sync).
    #[arg(long, env = "DSREG_SYNC_DEBOUNCE_MS", default_value_t = 200)]
    debounce_ms: u64,
    /// Time between full rescans of the folder, in milliseconds.
    #[arg(long, env = "DSREG_SYNC_RESCAN_INTERVAL_MS", default_value_t = 30_000)]
    rescan_interval_ms: u64,
    /// Output: `table` for people, `json` for scripts (one document per change).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// `dsreg export DIR`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    settings: Settings,
    /// The folder to write `<org>/<project>/<name>.yaml` files in.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Only datasources of this organisation.
    #[arg(long)]
    org: Option<String>,
    /// Only datasources of this project.
    #[arg(long)]
    project: Option<String>,
    /// Overwrite existing files that say something else.
    #[arg(long)]
    force: bool,
    /// Output: `table` for people, `json` for scripts.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn syncer(settings: &Settings, url: &str) -> anyhow::Result<Syncer> {
    let pool = db::pool_with(url, &settings.connect_options(), 2, settings.pool_wait())?;
    Ok(Syncer::new(
        pool,
        Catalog::builtin(),
        settings.transform_limits(),
    ))
}

/// The context for a failure that may be an unmigrated database.
const MIGRATED: &str = "syncing datasource files (is the database migrated? `dsreg migrate`)";

impl ImportArgs {
    /// Runs the import.
    ///
    /// # Errors
    /// Problems in the files (each printed with its file and line; nothing applied), a
    /// conflict under `--conflict fail`, unreadable paths, database failures.
    pub async fn run(self) -> anyhow::Result<()> {
        self.settings.check().map_err(anyhow::Error::msg)?;
        let options = Options {
            mode: Mode::Import,
            conflict: self.flags.conflict,
            prune: self.flags.prune,
            dry_run: self.dry_run,
        };
        let printer = Printer::new(self.output);
        let paths = self.paths.clone();
        let settings = self.settings.clone();
        with_database(&self.settings, |url| async move {
            let mut syncer = syncer(&settings, &url)?;
            let (progress, bars) = progress();
            let result = syncer.run(&paths, options, Some(progress)).await;
            finish(&bars);
            imported(result, options, printer)
        })
        .await
    }
}

/// An import's outcome, printed: the plan, or every problem.
fn imported(
    result: Result<Report, Error>,
    options: Options,
    printer: Printer,
) -> anyhow::Result<()> {
    match result {
        Ok(report) => print_report(&report, options, printer),
        Err(Error::Problems(problems)) => {
            for p in &problems {
                note(&p.to_string());
            }
            bail!(
                "{} problem(s) in {} file(s); nothing was applied",
                problems.len(),
                files_of(&problems)
            )
        }
        Err(e @ Error::Db(_)) => Err(anyhow::Error::new(e).context(MIGRATED)),
        Err(e) => Err(e.into()),
    }
}

type Bars = Arc<Mutex<(Progress, Progress)>>;

/// A progress callback drawing a bar for reading and one for applying.
fn progress() -> (ProgressFn, Bars) {
    let bars: Bars = Arc::new(Mutex::new((
        Progress::new("reading", "files"),
        Progress::new("applying", "datasources"),
    )));
    let shared = bars.clone();
    let callback: ProgressFn = Arc::new(move |phase, done, total| {
        if let Ok(mut bars) = shared.lock() {
            match phase {
                Phase::Read => bars.0.update(done, total),
                Phase::Apply => {
                    bars.0.finish();
                    bars.1.update(done, total);
                }
            }
        }
    });
    (callback, bars)
}

fn finish(bars: &Bars) {
    if let Ok(mut bars) = bars.lock() {
        bars.0.finish();
        bars.1.finish();
    }
}

fn files_of(problems: &[crate::files::Problem]) -> usize {
    let mut files: Vec<_> = problems.iter().map(|p| &p.path).collect();
    files.sort();
    files.dedup();
    files.len()
}

fn step_json(step: &Step) -> serde_json::Value {
    json!({
        "action": step.action.as_str(),
        "datasource": step.key.to_string(),
        "id": step.datasource.map(|id| id.to_string()),
        "version": step.version,
        "from_version": step.from_version,
        "file": step.path.display().to_string(),
        "line": step.line,
        "changes": step.changes,
        "waiting_for_secrets": step.waiting_for,
        "conflict": step.conflict.as_ref().map(|c| c.resolution.as_str()),
        "note": step.note,
    })
}

/// How a step reads in a plan: `would create` in a dry run.
fn action_text(step: &Step, dry_run: bool) -> String {
    let action = step.action.as_str();
    if dry_run && step.action.writes() {
        format!("would {action}")
    } else {
        action.to_owned()
    }
}

/// The plan as a table (or JSON lines), problems, then a summary.
fn print_report(report: &Report, options: Options, printer: Printer) -> anyhow::Result<()> {
    if printer.is_json() {
        for step in &report.plan.steps {
            printer.json(&step_json(step))?;
        }
    } else {
        let mut table = Table::new(["ACTION", "DATASOURCE", "ID", "VERSION", "FILE", "NOTE"]);
        for step in &report.plan.steps {
            let file = if step.line > 0 {
                format!("{}:{}", step.path.display(), step.line)
            } else {
                step.path.display().to_string()
            };
            table.row([
                action_text(step, options.dry_run),
                step.key.to_string(),
                step.datasource.map(|id| id.to_string()).unwrap_or_default(),
                step.version.map(|v| v.to_string()).unwrap_or_default(),
                file,
                step.note.clone().unwrap_or_default(),
            ]);
        }
        if !table.is_empty() {
            printer.text(&table.render())?;
        }
    }
    let count = |a: Action| report.plan.steps.iter().filter(|s| s.action == a).count() as u64;
    let waiting = report
        .plan
        .steps
        .iter()
        .filter(|s| !s.waiting_for.is_empty())
        .count() as u64;
    note(&format!(
        "{} file(s): {} created, {} new version(s), {} updated, {} published, {} unchanged, {} \
         archived, {} conflict(s), {} waiting for secrets{} in {:.2} s",
        thousands(report.files as u64),
        thousands(count(Action::Create)),
        thousands(count(Action::NewVersion)),
        thousands(count(Action::Update)),
        thousands(count(Action::Publish)),
        thousands(count(Action::Unchanged)),
        thousands(count(Action::Archive)),
        thousands(count(Action::Conflict)),
        thousands(waiting),
        if options.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        },
        report.elapsed.as_secs_f64()
    ));
    if waiting > 0 && !options.dry_run {
        note(
            "put each missing secret with `dsreg secret put ID NAME`, then import again to \
             publish",
        );
    }
    if !report.problems.is_empty() {
        for p in &report.problems {
            note(&p.to_string());
        }
        bail!(
            "{} problem(s) in {} file(s); an import would apply nothing",
            report.problems.len(),
            files_of(&report.problems)
        );
    }
    Ok(())
}

impl SyncArgs {
    /// Watches until Ctrl-C.
    ///
    /// # Errors
    /// The folder cannot be watched, or the database cannot be opened.
    pub async fn run(self) -> anyhow::Result<()> {
        self.settings.check().map_err(anyhow::Error::msg)?;
        let (dir, url) = (self.watch.clone(), self.from.clone());
        let dir = match (dir, url) {
            (_, Some(url)) => return self.run_http(&url).await,
            (Some(dir), None) => dir,
            (None, None) => bail!("give --watch DIR or --from URL"),
        };
        if self.debounce_ms == 0 || self.rescan_interval_ms == 0 {
            bail!("--debounce-ms and --rescan-interval-ms must be positive");
        }
        let config = WatchConfig {
            dir,
            conflict: self.flags.conflict,
            prune: self.flags.prune,
            debounce: std::time::Duration::from_millis(self.debounce_ms),
            rescan_interval: std::time::Duration::from_millis(self.rescan_interval_ms),
        };
        let printer = Printer::new(self.output);
        let settings = self.settings.clone();
        with_database(&self.settings, |url| async move {
            let pool = db::pool_with(&url, &settings.connect_options(), 2, settings.pool_wait())?;
            let mut watcher = Watcher::new(
                pool.clone(),
                Catalog::builtin(),
                settings.transform_limits(),
                config,
            );
            let (reports_tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
            watcher.report_to(reports_tx);
            // One listener for the whole run: a Ctrl-C between two polls is not lost.
            let mut interrupt =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                    .context("watching for Ctrl-C")?;
            let stop = CancellationToken::new();
            let run = watcher.run(stop.clone());
            tokio::pin!(run);
            let result = loop {
                tokio::select! {
                    result = &mut run => break result,
                    Some(report) = reports.recv() => print_pass(&report, printer)?,
                    Some(()) = interrupt.recv() => stop.cancel(),
                }
            };
            pool.close();
            match result {
                Err(e @ Error::Db(_)) => Err(anyhow::Error::new(e).context(MIGRATED)),
                other => Ok(other?),
            }
        })
        .await
    }
}

impl SyncArgs {
    /// `--from URL`: once (all or nothing), or polling until Ctrl-C.
    async fn run_http(self, url: &str) -> anyhow::Result<()> {
        let config = self
            .http
            .source(url, self.flags.conflict, self.flags.prune)
            .map_err(anyhow::Error::msg)?;
        let printer = Printer::new(self.output);
        let settings = self.settings.clone();
        let once = self.once;
        with_database(&self.settings, |db_url| async move {
            let pool = db::pool_with(
                &db_url,
                &settings.connect_options(),
                2,
                settings.pool_wait(),
            )?;
            let mut poller = Poller::new(
                pool.clone(),
                Catalog::builtin(),
                settings.transform_limits(),
                config,
            )?;
            if once {
                let options = Options {
                    mode: Mode::Import,
                    conflict: self.flags.conflict,
                    prune: self.flags.prune,
                    dry_run: false,
                };
                let result = poller.pass(Mode::Import, false).await;
                pool.close();
                return match result {
                    Ok(Outcome::Synced(report)) => imported(Ok(report), options, printer),
                    // A first request is never conditional.
                    Ok(Outcome::NotModified) => Ok(()),
                    Err(e) => imported(Err(e), options, printer),
                };
            }
            let (reports_tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
            poller.report_to(reports_tx);
            let mut interrupt =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                    .context("watching for Ctrl-C")?;
            let stop = CancellationToken::new();
            let run = poller.run(stop.clone());
            tokio::pin!(run);
            loop {
                tokio::select! {
                    () = &mut run => break,
                    Some(outcome) = reports.recv() => match outcome {
                        Ok(Outcome::NotModified) => {}
                        Ok(Outcome::Synced(report)) => print_pass(&Ok(report), printer)?,
                        Err(e) => print_pass(&Err(e), printer)?,
                    },
                    Some(()) = interrupt.recv() => stop.cancel(),
                }
            }
            pool.close();
            Ok(())
        })
        .await
    }
}

/// What a watcher's pass changed, one line (or JSON document) per change.
fn print_pass(report: &Result<Report, String>, printer: Printer) -> anyhow::Result<()> {
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            note(&format!("sync failed (retrying): {e}"));
            return Ok(());
        }
    };
    for step in report
        .plan
        .steps
        .iter()
        .filter(|s| s.action.writes() || s.conflict.is_some())
    {
        if printer.is_json() {
            printer.json(&step_json(step))?;
        } else {
            let version = step.version.map(|v| format!(" v{v}")).unwrap_or_default();
            let note_text = step
                .note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default();
            printer.text(&format!(
                "{} {}{version} ({}){note_text}\n",
                step.action.as_str(),
                step.key,
                step.path.display()
            ))?;
        }
    }
    for p in &report.problems {
        note(&format!("skipped: {p}"));
    }
    Ok(())
}

impl ExportArgs {
    /// Writes the files.
    ///
    /// # Errors
    /// Files that would be overwritten (without `--force`), write or database failures.
    pub async fn run(self) -> anyhow::Result<()> {
        self.settings.check().map_err(anyhow::Error::msg)?;
        let options = ExportOptions {
            dir: self.dir.clone(),
            org: self.org.clone(),
            project: self.project.clone(),
            force: self.force,
        };
        let printer = Printer::new(self.output);
        let settings = self.settings.clone();
        with_database(&self.settings, |url| async move {
            let pool = db::pool_with(&url, &settings.connect_options(), 2, settings.pool_wait())?;
            let result = export::export(&pool, &options).await;
            pool.close();
            let report = result.context("exporting datasources")?;
            if printer.is_json() {
                printer.json(&json!({
                    "written": report.written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                    "unchanged": report.unchanged.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                    "unpublished": report.unpublished.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }))?;
            } else {
                printer.text(&format!(
                    "wrote {} file(s) to {} ({} already up to date)\n",
                    thousands(report.written.len() as u64),
                    options.dir.display(),
                    thousands(report.unchanged.len() as u64)
                ))?;
            }
            if !report.unpublished.is_empty() {
                note(&format!(
                    "skipped {} datasource(s) with no published version",
                    report.unpublished.len()
                ));
            }
            Ok(())
        })
        .await
    }
}
