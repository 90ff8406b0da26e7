//! The `datasources` table: identity, tenancy, status and the etag (`revision`).

use chrono::{DateTime, Utc};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::GenericClient;
use super::typed;
use crate::db::{Error, constraint};
use crate::domain::{DatasourceStatus, Name};

pub(super) const COLUMNS: &str = "id, org, project, name, kind, status, owner, tags, description, current_version, \
     revision, created_by, created_at, updated_by, updated_at";

/// A datasource as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Datasource {
    /// Its id.
    pub id: Uuid,
    /// Tenant: organisation.
    pub org: String,
    /// Tenant: project.
    pub project: String,
    /// Unique among the tenant's live datasources.
    pub name: String,
    /// The connector kind.
    pub kind: String,
    /// Active, disabled or archived.
    pub status: DatasourceStatus,
    /// Owning team or person.
    pub owner: String,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Free-form description.
    pub description: String,
    /// The published version, if any.
    pub current_version: Option<i32>,
    /// The etag: bumped by every update.
    pub revision: i64,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// Who changed it last.
    pub updated_by: String,
    /// When.
    pub updated_at: DateTime<Utc>,
}

impl Datasource {
    pub(super) fn from_row(row: &Row) -> Result<Self, Error> {
        Ok(Self {
            id: row.get("id"),
            org: row.get("org"),
            project: row.get("project"),
            name: row.get("name"),
            kind: row.get("kind"),
            status: row
                .get::<_, &str>("status")
                .parse()
                .map_err(|e| Error::Invalid(format!("stored status: {e}")))?,
            owner: row.get("owner"),
            tags: row.get("tags"),
            description: row.get("description"),
            current_version: row.get("current_version"),
            revision: row.get("revision"),
            created_by: row.get("created_by"),
            created_at: row.get("created_at"),
            updated_by: row.get("updated_by"),
            updated_at: row.get("updated_at"),
        })
    }
}

/// What a new datasource is made of.
#[derive(Debug, Clone)]
pub struct NewDatasource {
    /// Tenant: organisation.
    pub org: Name,
    /// Tenant: project.
    pub project: Name,
    /// Its name.
    pub name: Name,
    /// The connector kind.
    pub kind: String,
    /// Owning team or person.
    pub owner: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Description.
    pub description: String,
}

/// Creates a datasource (active, no version yet) and its runtime state row.
///
/// # Errors
/// [`Error::NameTaken`] when a live datasource of the tenant has the name.
pub async fn create(tx: &Transaction<'_>, new: &NewDatasource) -> Result<Datasource, Error> {
    let row = tx
        .query_typed_one(
            &format!(
                "INSERT INTO datasources (org, project, name, kind, owner, tags, description, created_by, updated_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, dsreg_actor(), dsreg_actor())
                 RETURNING {COLUMNS}"
            ),
            &typed::params(&[
                &new.org.as_str(),
                &new.project.as_str(),
                &new.name.as_str(),
                &new.kind,
                &new.owner,
                &new.tags,
                &new.description,
            ]),)
        .await
        .map_err(|e| {
            if constraint(&e) == Some("datasources_name_live_key") {
                Error::NameTaken {
                    org: new.org.to_string(),
                    project: new.project.to_string(),
                    name: new.name.to_string(),
                }
            } else {
                e.into()
            }
        })?;
    Datasource::from_row(&row)
}

/// Reads one datasource.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn get(client: &impl GenericClient, id: Uuid) -> Result<Datasource, Error> {
    let row = client
        .query_typed_opt(
            &format!("SELECT {COLUMNS} FROM datasources WHERE id = $1"),
            &typed::params(&[&id]),
        )
        .await?
        .ok_or(Error::DatasourceNotFound(id))?;
    Datasource::from_row(&row)
}

/// Every datasource (archived ones too) named by one of `keys` (org, project, name), locked
/// for update when `lock` is set.
///
/// # Errors
/// The query failed.
pub async fn by_names(
    client: &impl GenericClient,
    keys: &[(String, String, String)],
    lock: bool,
) -> Result<Vec<Datasource>, Error> {
    let orgs: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let projects: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let names: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    let rows = client
        .query_typed(
            &format!(
                "SELECT {COLUMNS} FROM datasources
                 WHERE (org, project, name) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))
                 ORDER BY id{}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            &typed::params(&[&orgs, &projects, &names]),)
        .await?;
    rows.iter().map(Datasource::from_row).collect()
}

/// Filters for [`list`]; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Organisation.
    pub org: Option<String>,
    /// Project.
    pub project: Option<String>,
    /// Only these projects (a caller's tenant scope).
    pub projects: Option<Vec<String>>,
    /// Status.
    pub status: Option<DatasourceStatus>,
    /// Connector kind.
    pub kind: Option<String>,
    /// Owner.
    pub owner: Option<String>,
    /// Carries this tag.
    pub tag: Option<String>,
    /// Name starts with.
    pub name_prefix: Option<String>,
    /// Keyset page: strictly after this (name, id).
    pub after: Option<(String, Uuid)>,
    /// Page size.
    pub limit: i64,
}

/// Lists datasources ordered by (name, id), one keyset page at a time.
///
/// # Errors
/// The query failed.
pub async fn list(
    client: &deadpool_postgres::ClientWrapper,
    filter: &ListFilter,
) -> Result<Vec<Datasource>, Error> {
    type Param<'a> = &'a dyn typed::Param;
    let prefix = filter.name_prefix.as_ref().map(|p| {
        format!(
            "{}%",
            p.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    let status = filter.status.map(DatasourceStatus::as_str);
    // Only the filters in use reach the statement, so each combination is one simple
    // statement the server plans for what it filters on. It goes out with its parameters'
    // types, unnamed: nothing is kept on the server session (a transaction pooler may hand
    // the next statement to another).
    let mut conditions: Vec<String> = Vec::new();
    let mut params: Vec<Param<'_>> = Vec::new();
    let optional: [(&str, Option<Param<'_>>); 8] = [
        ("org = $", filter.org.as_ref().map(|v| v as Param<'_>)),
        (
            "project = $",
            filter.project.as_ref().map(|v| v as Param<'_>),
        ),
        ("status = $", status.as_ref().map(|v| v as Param<'_>)),
        ("kind = $", filter.kind.as_ref().map(|v| v as Param<'_>)),
        ("owner = $", filter.owner.as_ref().map(|v| v as Param<'_>)),
        (
            "tags @> ARRAY[$::text]",
            filter.tag.as_ref().map(|v| v as Param<'_>),
        ),
        ("name LIKE $", prefix.as_ref().map(|v| v as Param<'_>)),
        (
            "project = ANY($)",
            filter.projects.as_ref().map(|v| v as Param<'_>),
        ),
    ];
    for (condition, value) in optional {
        if let Some(value) = value {
            params.push(value);
            conditions.push(condition.replace('$', &format!("${}", params.len())));
        }
    }
    if let Some((name, id)) = &filter.after {
        params.push(name);
        params.push(id);
        conditions.push(format!(
            "(name, id) > (${}, ${})",
            params.len() - 1,
            params.len()
        ));
    }
    params.push(&filter.limit);
    let sql = format!(
        "SELECT {COLUMNS} FROM datasources WHERE {} ORDER BY name, id LIMIT ${}",
        if conditions.is_empty() {
            "true".to_owned()
        } else {
            conditions.join(" AND ")
        },
        params.len()
    );
    let rows = client.query_typed(&sql, &typed::params(&params)).await?;
    rows.iter().map(Datasource::from_row).collect()
}

/// The ids of every datasource that is not archived, for a full resync.
///
/// # Errors
/// The query failed.
pub async fn live_ids(client: &impl GenericClient) -> Result<Vec<Uuid>, Error> {
    let rows = client
        .query_typed("SELECT id FROM datasources WHERE status <> 'archived'", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The fields an update may change.
#[derive(Debug, Clone, Default)]
pub struct DatasourcePatch {
    /// New owner.
    pub owner: Option<String>,
    /// New tags (replacing).
    pub tags: Option<Vec<String>>,
    /// New description.
    pub description: Option<String>,
    /// New status (the triggers record it as an event).
    pub status: Option<DatasourceStatus>,
}

/// Applies `patch` if the datasource is still at `expected_revision` (when given).
///
/// # Errors
/// [`Error::DatasourceNotFound`], [`Error::StaleRevision`], [`Error::DatasourceArchived`] (an
/// archived datasource is final), [`Error::NameTaken`] when re-activation would clash.
pub async fn update(
    tx: &Transaction<'_>,
    id: Uuid,
    patch: &DatasourcePatch,
    expected_revision: Option<i64>,
) -> Result<Datasource, Error> {
    let current = tx
        .query_typed_opt(
            "SELECT revision, status FROM datasources WHERE id = $1 FOR UPDATE",
            &typed::params(&[&id]),
        )
        .await?
        .ok_or(Error::DatasourceNotFound(id))?;
    let revision: i64 = current.get(0);
    if let Some(expected) = expected_revision
        && expected != revision
    {
        return Err(Error::StaleRevision {
            datasource: id,
            expected,
            actual: revision,
        });
    }
    if current.get::<_, &str>(1) == DatasourceStatus::Archived.as_str() {
        return Err(Error::DatasourceArchived(id));
    }
    let row = tx
        .query_typed_one(
            &format!(
                "UPDATE datasources SET
                    owner = coalesce($2, owner),
                    tags = coalesce($3, tags),
                    description = coalesce($4, description),
                    status = coalesce($5, status),
                    updated_by = dsreg_actor()
                 WHERE id = $1
                 RETURNING {COLUMNS}"
            ),
            &typed::params(&[
                &id,
                &patch.owner,
                &patch.tags,
                &patch.description,
                &patch.status.map(DatasourceStatus::as_str),
            ]),
        )
        .await
        .map_err(|e| {
            if constraint(&e) == Some("datasources_name_live_key") {
                Error::Conflict(format!(
                    "datasource {id}: its name is taken by a live datasource"
                ))
            } else {
                e.into()
            }
        })?;
    Datasource::from_row(&row)
}
