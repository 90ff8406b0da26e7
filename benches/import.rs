//! `import`: datasources from files, against a durable Postgres on this machine.
//!
//! - a watched folder (`serve --sync-dir`, 100 datasource files, default 200 ms debounce and
//!   a 50 ms one): a file saved → its worker RUNNING on the new version (as the registry's
//!   state writer records it), p50 / p99 over `IMPORT_BENCH_EDITS` edits (40), one at a time;
//! - `dsreg import` of 10,000 datasources from 10,000 files (100 folders of 100): a dry run
//!   (read, check, plan), the import itself (one transaction), the same import again (no
//!   change), and an import with 100 of the files edited.
//!
//! `cargo bench --bench import`; `IMPORT_BENCH_DATASOURCES` sets the count (10000).

mod common;

use std::time::{Duration, Instant};

use dsreg::app::App;
use dsreg::config::Settings;
use dsreg::connectors::Catalog;
use dsreg::files::{Action, ConflictPolicy, Mode, Options, Syncer, WatchConfig};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WATCHED: usize = 100;
const PER_FOLDER: usize = 100;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A generator file of `name` in `project` that emits nothing (rate 0), at revision `n`.
fn file(project: &str, name: &str, n: usize) -> String {
    format!(
        "org: bench\nproject: {project}\nname: {name}\nkind: generator\ntags: [bench]\n\
         config:\n  rate_per_sec: 0\n  template:\n    n: {n}\n    source: {name}\n\
         transform: |\n  record.seen = true;\n  record\n"
    )
}

fn row(figure: impl Into<String>, value: String, target: &str) -> (String, String, String) {
    (figure.into(), value, target.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let datasources = env_usize("IMPORT_BENCH_DATASOURCES", 10_000);
    let edits = env_usize("IMPORT_BENCH_EDITS", 40);
    let db = common::database().await?;
    let mut rows = Vec::new();

    for debounce_ms in [200, 50] {
        let (p50, p99) = watch_latency(&db.url, debounce_ms, edits).await?;
        rows.push(row(
            format!(
                "watched folder: file saved → worker RUNNING on the new version, p50 / p99 \
                 ({debounce_ms} ms debounce, {WATCHED} files, {edits} edits)"
            ),
            format!("{p50:.0} / {p99:.0} ms"),
            "≤ 1 s",
        ));
    }
    rows.extend(import(&db.url, datasources).await?);
    common::print_table(
        &format!("import benchmark: durable cluster, {datasources} datasources from files"),
        &rows,
    );
    Ok(())
}

/// Edits one file at a time in a folder a registry watches; each latency runs from the write
/// to the state writer's RUNNING row for the new version.
async fn watch_latency(url: &str, debounce_ms: u64, edits: usize) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let project = format!("watch-{debounce_ms}");
    for i in 0..WATCHED {
        std::fs::write(
            dir.path().join(format!("ds-{i}.yaml")),
            file(&project, &format!("ds-{i}"), 0),
        )?;
    }
    let mut settings = Settings::for_database(url);
    settings.auth.insecure_no_auth = true;
    let mut app = App::build(&settings, url).await?;
    app.file_sync = Some(WatchConfig {
        dir: dir.path().to_owned(),
        conflict: ConflictPolicy::Fail,
        prune: false,
        debounce: Duration::from_millis(debounce_ms),
        rescan_interval: Duration::from_secs(30),
    });
    let (written_tx, mut written) = tokio::sync::mpsc::unbounded_channel();
    app.written = Some(written_tx);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone(), Duration::from_secs(30)));
    let client = dsreg::db::connect(url).await?;
    let ids = loop {
        let rows = client
            .query(
                "SELECT id FROM datasources WHERE project = $1 AND current_version = 1 ORDER BY name",
                &[&project],
            )
            .await?;
        if rows.len() == WATCHED {
            break rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    common::wait_running(&mut written, &ids, 1).await;
    let mut samples = Vec::with_capacity(edits);
    let names: Vec<String> = client
        .query(
            "SELECT name FROM datasources WHERE project = $1 ORDER BY name",
            &[&project],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for edit in 0..edits {
        let i = edit % WATCHED;
        let version = 2 + (edit / WATCHED) as i32;
        let saved = Instant::now();
        std::fs::write(
            dir.path().join(format!("{}.yaml", names[i])),
            file(&project, &names[i], edit + 1),
        )?;
        let at = common::wait_running(&mut written, &ids[i..=i], version).await;
        samples.push((at - saved).as_secs_f64() * 1e3);
    }
    shutdown.cancel();
    running.await??;
    samples.sort_by(f64::total_cmp);
    Ok((
        common::quantile(&samples, 0.50),
        common::quantile(&samples, 0.99),
    ))
}

/// `dsreg import` of `n` datasources: dry run, import, again, 100 edited.
async fn import(url: &str, n: usize) -> anyhow::Result<Vec<(String, String, String)>> {
    let dir = tempfile::tempdir()?;
    let written = Instant::now();
    for i in 0..n {
        let folder = dir.path().join(format!("team-{:03}", i / PER_FOLDER));
        if i % PER_FOLDER == 0 {
            std::fs::create_dir_all(&folder)?;
        }
        let project = format!("team-{:03}", i / PER_FOLDER);
        std::fs::write(
            folder.join(format!("ds-{i}.yaml")),
            file(&project, &format!("ds-{i}"), 0),
        )?;
    }
    eprintln!(
        "wrote {n} files in {:.1} s",
        written.elapsed().as_secs_f64()
    );
    let pool = dsreg::db::pool(url, 2, Duration::from_secs(30))?;
    let mut syncer = Syncer::new(
        pool,
        Catalog::builtin(),
        dsreg::transform::Limits::default(),
    );
    let paths = [dir.path().to_owned()];
    let options = |dry_run| Options {
        mode: Mode::Import,
        conflict: ConflictPolicy::Fail,
        prune: false,
        dry_run,
    };
    let mut rows = Vec::new();
    let mut timed =
        async |label: String, dry_run: bool, expect: Action, count: usize| -> anyhow::Result<()> {
            let report = syncer.run(&paths, options(dry_run), None).await?;
            let seen = report
                .plan
                .steps
                .iter()
                .filter(|s| s.action == expect)
                .count();
            anyhow::ensure!(
                seen == count,
                "{label}: {seen} × {expect:?}, expected {count}"
            );
            let seconds = report.elapsed.as_secs_f64();
            rows.push(row(
                label,
                format!("{seconds:.2} s ({:.0} datasources/s)", n as f64 / seconds),
                "printed",
            ));
            Ok(())
        };
    timed(
        format!("`dsreg import --dry-run` of {n} files (read, check, plan)"),
        true,
        Action::Create,
        n,
    )
    .await?;
    timed(
        format!("`dsreg import` of {n} files: create and publish {n} datasources, one transaction"),
        false,
        Action::Create,
        n,
    )
    .await?;
    timed(
        format!("`dsreg import` of the same {n} files again (nothing to change)"),
        false,
        Action::Unchanged,
        n,
    )
    .await?;
    for i in (0..n).step_by((n / 100).max(1)) {
        let project = format!("team-{:03}", i / PER_FOLDER);
        std::fs::write(
            dir.path().join(&project).join(format!("ds-{i}.yaml")),
            file(&project, &format!("ds-{i}"), 1),
        )?;
    }
    let edited = n.div_ceil((n / 100).max(1));
    timed(
        format!("`dsreg import` of {n} files, {edited} of them edited"),
        false,
        Action::NewVersion,
        edited,
    )
    .await?;
    Ok(rows)
}
