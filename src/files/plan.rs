//! Comparing files with the database: for each definition, whether its datasource is created,
//! gets a new version, has its status or metadata updated, stays unchanged — and, with
//! pruning, which datasources no file defines any more. Planning is pure over a
//! [`Snapshot`] of the database, read (and locked) by [`Snapshot::load`].
//!
//! Conflicts: a file's definition hash and a datasource's revision are recorded at each sync
//! (`datasource_file_sync`). A datasource whose revision moved since (changed through the API
//! or SQL) while its definition in the file changed too is a conflict, settled by the
//! [`ConflictPolicy`]. A definition that did not change leaves the database's change
//! standing; a revision that did not move lets the file's change through.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use uuid::Uuid;

use super::format::{Definition, Key, same_config};
use super::{ConflictPolicy, Problem};
use crate::db::repository::datasources::{self, Datasource};
use crate::db::repository::file_sync::{self, SyncRow};
use crate::db::repository::versions::{self, Heads};
use crate::db::repository::{GenericClient, secrets};
use crate::domain::{DatasourceStatus, VersionState, changed_keys};

static EMPTY: serde_json::Value = serde_json::Value::Null;

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A new datasource with version 1.
    Create,
    /// A new version of the config (and any status or metadata change).
    NewVersion,
    /// Status or metadata only.
    Update,
    /// A version that waited for its secrets is published.
    Publish,
    /// Nothing to write.
    Unchanged,
    /// No file defines the datasource any more: it is archived (with pruning).
    Archive,
    /// Changed in both places; the file's change is not applied (database wins, or a
    /// watcher's `fail`).
    Conflict,
}

impl Action {
    /// How a plan names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::NewVersion => "new version",
            Action::Update => "update",
            Action::Publish => "publish",
            Action::Unchanged => "unchanged",
            Action::Archive => "archive",
            Action::Conflict => "conflict",
        }
    }

    /// Whether the step writes the datasource.
    pub fn writes(self) -> bool {
        !matches!(self, Action::Unchanged | Action::Conflict)
    }
}

/// How a conflict was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The file was applied.
    FileWins,
    /// The database's change stands.
    DbWins,
    /// Nothing was applied.
    Failed,
}

impl Resolution {
    /// As stored in the event payload.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::FileWins => "file_wins",
            Resolution::DbWins => "db_wins",
            Resolution::Failed => "failed",
        }
    }
}

/// A datasource changed both in its file and in the database since the file's last sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The datasource.
    pub datasource: Uuid,
    /// The published version the last sync left.
    pub synced_version: Option<i32>,
    /// The published version now.
    pub database_version: Option<i32>,
    /// The revision the last sync left.
    pub synced_revision: i64,
    /// The revision now.
    pub database_revision: i64,
    /// What happened.
    pub resolution: Resolution,
}

/// One datasource's part of a plan.
#[derive(Debug, Clone)]
pub struct Step {
    /// What it does.
    pub action: Action,
    /// The datasource.
    pub key: Key,
    /// The file, as found (for an archive: the file it was last synced from).
    pub path: PathBuf,
    /// The absolute path recorded in the database.
    pub file: String,
    /// Where its definition starts.
    pub line: usize,
    /// The datasource, when it exists (or once created).
    pub datasource: Option<Uuid>,
    /// The published version before.
    pub from_version: Option<i32>,
    /// The version the step publishes or leaves waiting (set by apply for new ones).
    pub version: Option<i32>,
    /// What changes: `config`, `status`, `owner`, `tags`, `description`.
    pub changes: Vec<&'static str>,
    /// The top-level config keys whose values change (names only: values may be
    /// credentials).
    pub config_keys: Vec<String>,
    /// Secrets the file names that the datasource does not have: its new version waits as a
    /// draft until they are put.
    pub waiting_for: Vec<String>,
    /// The conflict, if the datasource had one.
    pub conflict: Option<Conflict>,
    /// A remark for people.
    pub note: Option<String>,
    /// The definition (index into the plan's definitions); none for an archive.
    pub(crate) definition: Option<usize>,
    /// A draft with the file's config to publish instead of a new version.
    pub(crate) draft: Option<i32>,
    /// Whether the sync record must be written.
    pub(crate) record: bool,
    /// Whether its conflict is still to be recorded as an event (a watcher records each
    /// conflict once).
    pub(crate) announce: bool,
}

/// Everything a sync will do, in file order, archives last.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The steps.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Steps that write.
    pub fn changes(&self) -> usize {
        self.steps.iter().filter(|s| s.action.writes()).count()
    }
}

/// What the database holds of the datasources the files name.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Live datasources by identity.
    pub live: HashMap<Key, Datasource>,
    /// Archived datasources that a file synced, by identity (the newest one).
    pub archived: HashMap<Key, Datasource>,
    /// Published and newest versions.
    pub heads: HashMap<Uuid, Heads>,
    /// Secret names.
    pub secrets: HashMap<Uuid, Vec<String>>,
    /// Sync rows.
    pub sync: HashMap<Uuid, SyncRow>,
    /// Live datasources synced from files under the scanned paths (for pruning).
    pub synced_under: Vec<(SyncRow, Datasource)>,
}

fn key_of(ds: &Datasource) -> Key {
    Key {
        org: ds.org.clone(),
        project: ds.project.clone(),
        name: ds.name.clone(),
    }
}

impl Snapshot {
    /// Reads what `definitions` name, locking their live datasources when `lock` is set (so
    /// no publish slips between the plan and its apply), and the datasources synced from
    /// `folders` and `files` when `prune` is set.
    ///
    /// # Errors
    /// The database failed.
    pub async fn load(
        client: &impl GenericClient,
        definitions: &[Definition],
        prune: Option<(&[String], &[String])>,
        lock: bool,
    ) -> Result<Self, crate::db::Error> {
        let keys: Vec<(String, String, String)> = definitions
            .iter()
            .map(|d| (d.key.org.clone(), d.key.project.clone(), d.key.name.clone()))
            .collect();
        let found = datasources::by_names(client, &keys, lock).await?;
        let ids: Vec<Uuid> = found.iter().map(|d| d.id).collect();
        let sync = file_sync::get_many(client, &ids).await?;
        let mut snapshot = Snapshot {
            sync,
            ..Snapshot::default()
        };
        for ds in found {
            let key = key_of(&ds);
            if ds.status != DatasourceStatus::Archived {
                snapshot.live.insert(key, ds);
            } else if snapshot.sync.contains_key(&ds.id)
                && snapshot
                    .archived
                    .get(&key)
                    .is_none_or(|a| a.updated_at < ds.updated_at)
            {
                snapshot.archived.insert(key, ds);
            }
        }
        let live: Vec<Uuid> = snapshot.live.values().map(|d| d.id).collect();
        snapshot.heads = versions::heads(client, &live).await?;
        snapshot.secrets = secrets::names(client, &live).await?;
        if let Some((folders, files)) = prune {
            snapshot.synced_under = file_sync::live_under(client, folders, files).await?;
        }
        Ok(snapshot)
    }
}

/// How to plan.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// The conflict policy.
    pub conflict: ConflictPolicy,
    /// Archive live datasources synced from the scanned paths that no file defines.
    pub prune: bool,
}

/// Plans `definitions` (no two with one identity) against `snapshot`; returns the plan and
/// the problems only the database shows (a kind that changed, a conflict under `fail`).
/// Under `fail`, conflicts are also steps ([`Action::Conflict`], resolution `failed`), so
/// they can be recorded.
pub fn plan(definitions: &[Definition], snapshot: &Snapshot, rules: Rules) -> (Plan, Vec<Problem>) {
    let mut steps = Vec::new();
    let mut problems = Vec::new();
    for (index, def) in definitions.iter().enumerate() {
        let (step, problem) = plan_one(index, def, snapshot, rules.conflict);
        steps.extend(step);
        problems.extend(problem);
    }
    if rules.prune {
        let defined: HashSet<&Key> = definitions.iter().map(|d| &d.key).collect();
        for (row, ds) in &snapshot.synced_under {
            let key = key_of(ds);
            if defined.contains(&key) {
                continue;
            }
            steps.push(Step {
                action: Action::Archive,
                path: PathBuf::from(&row.path),
                file: row.path.clone(),
                line: 0,
                datasource: Some(ds.id),
                from_version: ds.current_version,
                version: None,
                changes: vec!["status"],
                config_keys: Vec::new(),
                waiting_for: Vec::new(),
                conflict: None,
                note: Some("no file defines it any more".to_owned()),
                definition: None,
                draft: None,
                record: false,
                announce: false,
                key,
            });
        }
    }
    (Plan { steps }, problems)
}

fn step(index: usize, def: &Definition, action: Action) -> Step {
    Step {
        action,
        key: def.key.clone(),
        path: def.path.clone(),
        file: def.file.clone(),
        line: def.line,
        datasource: None,
        from_version: None,
        version: None,
        changes: Vec::new(),
        config_keys: Vec::new(),
        waiting_for: Vec::new(),
        conflict: None,
        note: None,
        definition: Some(index),
        draft: None,
        record: true,
        announce: true,
    }
}

/// A step (none when the definition cannot be planned), and the problem the database shows.
type Planned = (Option<Step>, Option<Problem>);

fn plan_one(index: usize, def: &Definition, snap: &Snapshot, policy: ConflictPolicy) -> Planned {
    let Some(ds) = snap.live.get(&def.key) else {
        return plan_new(index, def, snap, policy);
    };
    if ds.kind != def.kind {
        let problem = Problem::new(
            &def.path,
            def.kind_line,
            Some(def.key.to_string()),
            format!(
                "kind: the datasource is a {}, and a datasource's kind cannot change (give \
                     this one another name, or archive the old one first)",
                ds.kind
            ),
        );
        return (None, Some(problem));
    }
    let heads = snap.heads.get(&ds.id);
    let published = heads.and_then(|h| h.published.as_ref());
    let newest = heads.and_then(|h| h.newest.as_ref());
    let mut s = step(index, def, Action::Unchanged);
    s.datasource = Some(ds.id);
    s.from_version = ds.current_version;
    s.version = ds.current_version;
    if published.is_none_or(|p| !same_config(&p.config, &def.config)) {
        s.changes.push("config");
        s.config_keys = changed_keys(published.map_or(&EMPTY, |p| &p.config), &def.config);
        s.draft = newest
            .filter(|v| v.state == VersionState::Draft && same_config(&v.config, &def.config))
            .map(|v| v.version);
    }
    if def.status.is_some_and(|st| st != ds.status) {
        s.changes.push("status");
    }
    if def.owner.as_ref().is_some_and(|o| *o != ds.owner) {
        s.changes.push("owner");
    }
    if def.tags.as_ref().is_some_and(|t| *t != ds.tags) {
        s.changes.push("tags");
    }
    if def
        .description
        .as_ref()
        .is_some_and(|d| *d != ds.description)
    {
        s.changes.push("description");
    }
    let have = snap.secrets.get(&ds.id);
    s.waiting_for = def
        .secrets
        .iter()
        .filter(|n| have.is_none_or(|h| !h.contains(n)))
        .cloned()
        .collect();
    let sync = snap.sync.get(&ds.id);
    let file_changed = sync.is_none_or(|r| r.content_hash != def.hash);
    let db_changed = sync.is_some_and(|r| r.synced_revision != ds.revision);
    s.record = sync.is_none_or(|r| {
        r.content_hash != def.hash || r.path != def.file || r.synced_revision != ds.revision
    });

    if s.changes.is_empty() {
        s.waiting_for.clear();
        return (Some(s), None);
    }
    if !file_changed {
        // The file says what it said at its last sync, which left this difference: a version
        // waiting for its secrets, or the database's version kept (a change made since, or
        // one kept over the file's under db-wins).
        if !db_changed
            && s.changes == ["config"]
            && let Some(draft) = s.draft
        {
            s.version = Some(draft);
            if s.waiting_for.is_empty() {
                s.action = Action::Publish;
            } else {
                s.changes.clear();
                s.note = Some(waiting_note(&s.waiting_for));
            }
            return (Some(s), None);
        }
        s.changes.clear();
        s.waiting_for.clear();
        s.record = false;
        s.note = Some(if db_changed {
            format!(
                "changed in the database since this file's last sync (version {} → {}); the \
                 file did not change, so the database's version stands",
                version(sync.and_then(|r| r.synced_version)),
                version(ds.current_version)
            )
        } else {
            "the database's version was kept over this file's (db-wins); the file's next \
             change applies"
                .to_owned()
        });
        return (Some(s), None);
    }
    if file_changed && db_changed {
        let sync = sync.expect("db_changed implies a sync row");
        let conflict = |resolution| Conflict {
            datasource: ds.id,
            synced_version: sync.synced_version,
            database_version: ds.current_version,
            synced_revision: sync.synced_revision,
            database_revision: ds.revision,
            resolution,
        };
        match policy {
            ConflictPolicy::FileWins => s.conflict = Some(conflict(Resolution::FileWins)),
            ConflictPolicy::DbWins => {
                s.conflict = Some(conflict(Resolution::DbWins));
                s.action = Action::Conflict;
                s.note = Some("changed in both places; the database's version stands".into());
                return (Some(s), None);
            }
            ConflictPolicy::Fail => {
                s.conflict = Some(conflict(Resolution::Failed));
                s.action = Action::Conflict;
                s.record = false;
                s.note = Some("changed in both places; nothing applied".into());
                let problem = conflict_problem(def, sync.synced_version, ds.current_version);
                return (Some(s), Some(problem));
            }
        }
    }
    s.action = if s.changes.contains(&"config") {
        Action::NewVersion
    } else {
        s.waiting_for.clear();
        Action::Update
    };
    if !s.waiting_for.is_empty() {
        s.note = Some(waiting_note(&s.waiting_for));
    }
    (Some(s), None)
}

/// A definition with no live datasource of its name.
fn plan_new(index: usize, def: &Definition, snap: &Snapshot, policy: ConflictPolicy) -> Planned {
    let mut s = step(index, def, Action::Create);
    s.changes.push("config");
    s.config_keys = changed_keys(&EMPTY, &def.config);
    s.waiting_for = def.secrets.clone();
    if !s.waiting_for.is_empty() {
        s.note = Some(waiting_note(&s.waiting_for));
    }
    let Some(archived) = snap.archived.get(&def.key) else {
        return (Some(s), None);
    };
    let Some(sync) = snap.sync.get(&archived.id) else {
        return (Some(s), None);
    };
    if sync.content_hash == def.hash {
        s.action = Action::Unchanged;
        s.changes.clear();
        s.waiting_for.clear();
        s.record = false;
        s.datasource = Some(archived.id);
        s.note = Some(
            "archived in the database since this file's last sync; the file did not change, so \
             it stays archived"
                .to_owned(),
        );
        return (Some(s), None);
    }
    let conflict = |resolution| Conflict {
        datasource: archived.id,
        synced_version: sync.synced_version,
        database_version: archived.current_version,
        synced_revision: sync.synced_revision,
        database_revision: archived.revision,
        resolution,
    };
    match policy {
        ConflictPolicy::FileWins => {
            s.conflict = Some(conflict(Resolution::FileWins));
            (Some(s), None)
        }
        ConflictPolicy::DbWins | ConflictPolicy::Fail => {
            let failed = policy == ConflictPolicy::Fail;
            s.action = Action::Conflict;
            s.changes.clear();
            s.waiting_for.clear();
            s.datasource = Some(archived.id);
            s.record = !failed;
            s.conflict = Some(conflict(if failed {
                Resolution::Failed
            } else {
                Resolution::DbWins
            }));
            s.note = Some("archived in the database, changed in the file".into());
            if failed {
                let problem = conflict_problem(def, sync.synced_version, archived.current_version);
                (Some(s), Some(problem))
            } else {
                (Some(s), None)
            }
        }
    }
}

fn conflict_problem(def: &Definition, synced: Option<i32>, now: Option<i32>) -> Problem {
    Problem::new(
        &def.path,
        def.line,
        Some(def.key.to_string()),
        format!(
            "conflict: changed in the database since this file's last sync (version {} → {}) \
             and changed in the file; nothing applied (choose with --conflict file-wins or \
             db-wins, or take the database's version with `dsreg export`)",
            version(synced),
            version(now)
        ),
    )
}

fn version(v: Option<i32>) -> String {
    v.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

fn waiting_note(missing: &[String]) -> String {
    format!(
        "waits as a draft for secret(s) {}: put them with `dsreg secret put`, then sync again",
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::Utc;

    use super::*;
    use crate::connectors::Catalog;
    use crate::transform::Limits;

    fn definition(rate: u32) -> Definition {
        let text = format!(
            "org: acme\nproject: shop\nname: orders\nkind: generator\nconfig: {{rate_per_sec: {rate}}}\n"
        );
        let (mut defs, problems) = super::super::format::read(
            Path::new("orders.yaml"),
            "/files/orders.yaml",
            &text,
            &Catalog::builtin(),
            &Limits::default(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        defs.remove(0)
    }

    fn archived(revision: i64) -> Datasource {
        Datasource {
            id: Uuid::new_v4(),
            org: "acme".into(),
            project: "shop".into(),
            name: "orders".into(),
            kind: "generator".into(),
            status: DatasourceStatus::Archived,
            owner: String::new(),
            tags: Vec::new(),
            description: String::new(),
            current_version: Some(1),
            revision,
            created_by: "test".into(),
            created_at: Utc::now(),
            updated_by: "test".into(),
            updated_at: Utc::now(),
        }
    }

    /// A snapshot where the datasource a file synced was archived in the database since.
    fn archived_since(synced: &Definition) -> Snapshot {
        let ds = archived(3);
        let row = SyncRow {
            datasource_id: ds.id,
            path: synced.file.clone(),
            content_hash: synced.hash.clone(),
            synced_version: Some(1),
            synced_revision: 2,
            synced_at: Utc::now(),
        };
        Snapshot {
            sync: HashMap::from([(ds.id, row)]),
            archived: HashMap::from([(synced.key.clone(), ds)]),
            ..Snapshot::default()
        }
    }

    fn rules(conflict: ConflictPolicy) -> Rules {
        Rules {
            conflict,
            prune: false,
        }
    }

    #[test]
    fn a_datasource_archived_in_the_database_stays_archived_while_its_file_does_not_change() {
        let def = definition(1);
        let snapshot = archived_since(&def);

        let (plan, problems) = plan(&[def], &snapshot, rules(ConflictPolicy::FileWins));

        assert!(problems.is_empty());
        assert_eq!(plan.steps[0].action, Action::Unchanged);
        assert!(plan.steps[0].note.as_deref().unwrap().contains("archived"));
    }

    #[test]
    fn a_file_changed_after_its_datasource_was_archived_is_a_conflict_under_each_policy() {
        let snapshot = archived_since(&definition(1));
        let edited = [definition(2)];

        let (wins, _) = plan(&edited, &snapshot, rules(ConflictPolicy::FileWins));
        let (kept, _) = plan(&edited, &snapshot, rules(ConflictPolicy::DbWins));
        let (failed, problems) = plan(&edited, &snapshot, rules(ConflictPolicy::Fail));

        assert_eq!(wins.steps[0].action, Action::Create);
        assert_eq!(
            wins.steps[0].conflict.as_ref().map(|c| c.resolution),
            Some(Resolution::FileWins)
        );
        assert_eq!(kept.steps[0].action, Action::Conflict);
        assert!(kept.steps[0].record, "the edit is taken as seen");
        assert_eq!(failed.steps[0].action, Action::Conflict);
        assert!(!failed.steps[0].record);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].message.starts_with("conflict: "),
            "{problems:?}"
        );
    }
}
