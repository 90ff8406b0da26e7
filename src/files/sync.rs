//! One pass from files to the database: scan and read the files (off the async threads),
//! check every definition, plan against the locked rows, apply in one transaction.
//!
//! An import is all or nothing: any problem in any file, or a conflict under `fail`, and
//! nothing is applied (conflicts are still recorded as events). A watcher's pass applies what
//! it can: a file with problems is skipped (its datasources keep what they have, and nothing
//! is pruned in that pass), a conflict under `fail` skips its datasource, and each conflict is
//! recorded once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::apply::{self, Context};
use super::format::{self, Definition};
use super::plan::{self, Plan, Rules, Snapshot};
use super::scan::{self, Scan};
use super::{ConflictPolicy, Error, Problem};
use crate::connectors::Catalog;
use crate::db::repository::{self as repo, WriteContext};
use crate::transform::Limits;

/// Import (all or nothing) or watch (what can be applied is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `dsreg import`.
    Import,
    /// `dsreg sync --watch` and `serve --sync-dir`.
    Watch,
}

/// How a pass runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Import or watch.
    pub mode: Mode,
    /// What to do with conflicts.
    pub conflict: ConflictPolicy,
    /// Archive datasources synced from the scanned paths that no file defines any more.
    pub prune: bool,
    /// Plan only; write nothing.
    pub dry_run: bool,
}

/// Which part of a pass is progressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading and checking files.
    Read,
    /// Writing the plan.
    Apply,
}

/// Receives (phase, done, total) as a pass goes.
pub type Progress = Arc<dyn Fn(Phase, u64, u64) + Send + Sync>;

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The plan, with the versions written.
    pub plan: Plan,
    /// Problems found: what a watcher's pass skipped, or what a dry run would refuse (an
    /// import fails on any instead).
    pub problems: Vec<Problem>,
    /// Files read.
    pub files: usize,
    /// Whether the plan was written (false for a dry run or when there was nothing to do).
    pub applied: bool,
    /// Time the pass took.
    pub elapsed: Duration,
}

/// A file read and checked, kept while its text does not change.
#[derive(Clone)]
struct Checked {
    text_hash: [u8; 32],
    definitions: Vec<Definition>,
    problems: Vec<Problem>,
}

/// Runs passes from files to the database; keeps what it checked so a watcher re-reads only
/// files whose text changed, and which conflicts it already recorded.
pub struct Syncer {
    pool: Pool,
    catalog: Catalog,
    limits: Limits,
    checked: HashMap<String, Checked>,
    announced: HashSet<(Uuid, String, i64)>,
}

impl Syncer {
    /// A syncer writing through `pool`, checking configs with `catalog` under `limits`.
    pub fn new(pool: Pool, catalog: Catalog, limits: Limits) -> Self {
        Self {
            pool,
            catalog,
            limits,
            checked: HashMap::new(),
            announced: HashSet::new(),
        }
    }

    /// One pass over `paths` (files and folders).
    ///
    /// # Errors
    /// [`Error::Problems`] for an import with problems (nothing applied); [`Error::Io`] for
    /// a path that cannot be read; [`Error::Db`] when the database fails (nothing applied).
    pub async fn run(
        &mut self,
        paths: &[PathBuf],
        options: Options,
        progress: Option<Progress>,
    ) -> Result<Report, Error> {
        let paths = paths.to_vec();
        self.run_source(move || scan::scan(&paths), options, progress)
            .await
    }

    /// One pass over documents already read (an HTTP source's): `scan` names each document
    /// and the roots that pruning is scoped to, as a folder scan does.
    ///
    /// # Errors
    /// As [`Syncer::run`].
    pub async fn run_scan(
        &mut self,
        scan: Scan,
        options: Options,
        progress: Option<Progress>,
    ) -> Result<Report, Error> {
        self.run_source(move || Ok(scan), options, progress).await
    }

    /// One pass over what `source` finds (called on a blocking thread).
    async fn run_source(
        &mut self,
        source: impl FnOnce() -> Result<Scan, Error> + Send + 'static,
        options: Options,
        progress: Option<Progress>,
    ) -> Result<Report, Error> {
        let started = Instant::now();
        let (scan, definitions, problems) = self.read(source, progress.clone()).await?;
        let strict = options.mode == Mode::Import;
        let mut report = Report {
            files: scan.sources.len(),
            ..Report::default()
        };
        // Problems skip their whole file in a watcher's pass, and pruning with them.
        let broken: HashSet<&PathBuf> = problems.iter().map(|p| &p.path).collect();
        let (definitions, mut problems) = if strict {
            (definitions, problems)
        } else {
            let usable = definitions
                .into_iter()
                .filter(|d| !broken.contains(&d.path))
                .collect();
            (usable, problems)
        };
        let prune = options.prune && (strict || problems.is_empty());
        let rules = Rules {
            conflict: options.conflict,
            prune,
        };
        let context = Context {
            action: if strict { "files.import" } else { "files.sync" },
            policy: options.conflict,
        };
        // An import whose files have problems reports them even when the database is down.
        let file_problems = |e: Error| {
            if strict && !problems.is_empty() {
                let mut problems = problems.clone();
                problems.sort();
                Error::Problems(problems)
            } else {
                e
            }
        };
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| file_problems(crate::db::Error::from(e).into()))?;
        let actor = if strict { "import" } else { "file-sync" };
        let tx = repo::begin(&mut client, &WriteContext::actor(actor))
            .await
            .map_err(|e| file_problems(e.into()))?;
        let roots = (scan.folders.as_slice(), scan.files.as_slice());
        let roots = prune.then_some(roots);
        // An import locks the rows it plans on; a watcher's pass, mostly finding nothing to
        // do, locks them only when it has something to write, and then plans again.
        let lock = strict && !options.dry_run;
        let snapshot = Snapshot::load(&tx, &definitions, roots, lock)
            .await
            .map_err(|e| file_problems(e.into()))?;
        let (mut plan, mut db_problems) = plan::plan(&definitions, &snapshot, rules);
        if !lock && !options.dry_run && worth_writing(&plan) {
            let snapshot = Snapshot::load(&tx, &definitions, roots, true).await?;
            (plan, db_problems) = plan::plan(&definitions, &snapshot, rules);
        }
        problems.extend(db_problems);
        let mut announced = Vec::new();
        for step in &mut plan.steps {
            if let Some(c) = &step.conflict {
                let hash = step
                    .definition
                    .map(|i| definitions[i].hash.clone())
                    .unwrap_or_default();
                let seen = (c.datasource, hash, c.database_revision);
                step.announce = strict || !self.announced.contains(&seen);
                announced.push(seen);
            }
        }
        if options.dry_run {
            drop(tx);
            problems.sort();
            report.plan = plan;
            report.problems = problems;
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        if strict && !problems.is_empty() {
            drop(tx);
            self.record_failed_conflicts(&plan, options.conflict)
                .await?;
            problems.sort();
            return Err(Error::Problems(problems));
        }
        let on_apply = |done: u64, total: u64| {
            if let Some(progress) = &progress {
                progress(Phase::Apply, done, total);
            }
        };
        if worth_writing(&plan) {
            apply::apply(&tx, &mut plan, &definitions, context, &on_apply).await?;
            tx.commit().await.map_err(crate::db::Error::from)?;
            self.announced.extend(announced);
            report.applied = plan.changes() > 0;
        }
        report.plan = plan;
        report.problems = problems;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Records the conflicts of a refused import on their own (the import's transaction
    /// rolled back).
    async fn record_failed_conflicts(
        &self,
        plan: &Plan,
        policy: ConflictPolicy,
    ) -> Result<(), Error> {
        if !plan.steps.iter().any(|s| s.conflict.is_some()) {
            return Ok(());
        }
        let mut client = self.pool.get().await.map_err(crate::db::Error::from)?;
        let tx = repo::begin(&mut client, &WriteContext::actor("import")).await?;
        apply::record_conflicts(&tx, &plan.steps, policy).await?;
        tx.commit().await.map_err(crate::db::Error::from)?;
        Ok(())
    }

    /// Scans (with `source`) and checks the files on a blocking thread, re-checking only
    /// files whose text changed since the last pass; duplicate definitions are problems of
    /// each.
    async fn read(
        &mut self,
        source: impl FnOnce() -> Result<Scan, Error> + Send + 'static,
        progress: Option<Progress>,
    ) -> Result<(Scan, Vec<Definition>, Vec<Problem>), Error> {
        let catalog = self.catalog.clone();
        let limits = self.limits.clone();
        let mut checked = std::mem::take(&mut self.checked);
        let result = tokio::task::spawn_blocking(move || {
            let scan = source()?;
            let total = scan.sources.len() as u64;
            let mut fresh = HashMap::with_capacity(scan.sources.len());
            for (i, source) in scan.sources.iter().enumerate() {
                let entry = match &source.text {
                    Err(problem) => Checked {
                        text_hash: [0; 32],
                        definitions: Vec::new(),
                        problems: vec![problem.clone()],
                    },
                    Ok(text) => {
                        let text_hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
                        match checked.remove(&source.file) {
                            Some(c)
                                if c.text_hash == text_hash
                                    && c.definitions.iter().all(|d| d.path == source.shown)
                                    && c.problems.iter().all(|p| p.path == source.shown) =>
                            {
                                c
                            }
                            _ => {
                                let (definitions, problems) = format::read(
                                    &source.shown,
                                    &source.file,
                                    text,
                                    &catalog,
                                    &limits,
                                );
                                Checked {
                                    text_hash,
                                    definitions,
                                    problems,
                                }
                            }
                        }
                    }
                };
                fresh.insert(source.file.clone(), entry);
                if let Some(progress) = &progress
                    && (i % 64 == 0 || i + 1 == scan.sources.len())
                {
                    progress(Phase::Read, i as u64 + 1, total);
                }
            }
            Ok::<_, Error>((scan, fresh))
        })
        .await
        .map_err(|e| Error::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("the file reader stopped: {e}")),
        });
        let (scan, fresh) = match result {
            Ok(Ok(done)) => done,
            Ok(Err(e)) | Err(e) => return Err(e),
        };
        let mut definitions = Vec::new();
        let mut problems = Vec::new();
        for source in &scan.sources {
            if let Some(c) = fresh.get(&source.file) {
                definitions.extend(c.definitions.iter().cloned());
                problems.extend(c.problems.iter().cloned());
            }
        }
        self.checked = fresh;
        let definitions = dedupe(definitions, &mut problems);
        Ok((scan, definitions, problems))
    }
}

/// Whether a plan has anything to write: a change, a sync record, a conflict to record.
fn worth_writing(plan: &Plan) -> bool {
    plan.steps
        .iter()
        .any(|s| s.action.writes() || s.record || (s.announce && s.conflict.is_some()))
}

/// Keeps definitions whose identity only one place defines; each place of a duplicate is a
/// problem naming the others.
fn dedupe(definitions: Vec<Definition>, problems: &mut Vec<Problem>) -> Vec<Definition> {
    let mut places: BTreeMap<format::Key, Vec<(PathBuf, usize)>> = BTreeMap::new();
    for d in &definitions {
        places
            .entry(d.key.clone())
            .or_default()
            .push((d.path.clone(), d.line));
    }
    let mut kept = Vec::with_capacity(definitions.len());
    for d in definitions {
        let here = &places[&d.key];
        if here.len() == 1 {
            kept.push(d);
            continue;
        }
        let others: Vec<String> = here
            .iter()
            .filter(|(p, l)| !(*p == d.path && *l == d.line))
            .map(|(p, l)| format!("{}:{l}", p.display()))
            .collect();
        problems.push(Problem::new(
            &d.path,
            d.line,
            Some(d.key.to_string()),
            format!("defined more than once (also at {})", others.join(", ")),
        ));
    }
    kept
}
