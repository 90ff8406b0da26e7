//! `dsreg datasource create|get|list|update|archive`: the `Datasources` service's datasource
//! calls.

use crate::api::grpc::pb;

use super::connect::{Client, ClientArgs};
use super::error::usage;
use super::json::datasource_status;
use super::output::{Listing, Printer};
use super::table::{self, Table};

/// `dsreg datasource …`.
#[derive(Debug, clap::Args)]
pub struct DatasourceArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: DatasourceCommand,
}

/// A datasource status as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    /// Runs its published version.
    Active,
    /// Kept, not running.
    Disabled,
    /// Retired.
    Archived,
}

impl From<StatusArg> for pb::DatasourceStatus {
    fn from(status: StatusArg) -> Self {
        match status {
            StatusArg::Active => pb::DatasourceStatus::Active,
            StatusArg::Disabled => pb::DatasourceStatus::Disabled,
            StatusArg::Archived => pb::DatasourceStatus::Archived,
        }
    }
}

/// The statuses `update --status` may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SettableStatus {
    /// Runs its published version.
    Active,
    /// Kept, not running.
    Disabled,
}

#[derive(Debug, clap::Subcommand)]
enum DatasourceCommand {
    /// Register a datasource (active, with no version yet).
    Create {
        /// Tenant organisation.
        #[arg(long)]
        org: String,
        /// Tenant project.
        #[arg(long)]
        project: String,
        /// Name, unique among the tenant's live datasources (1-128 of A-Z a-z 0-9 _ . -).
        #[arg(long)]
        name: String,
        /// Connector kind (see `dsreg kinds list`).
        #[arg(long)]
        kind: String,
        /// Owning team or person.
        #[arg(long, default_value = "")]
        owner: String,
        /// A tag (repeat for several).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Free-form description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Show one datasource.
    Get {
        /// The datasource id.
        id: String,
    },
    /// List datasources by name, a page at a time (every set filter must match).
    List(ListArgs),
    /// Change owner, tags, description or status (only what is given).
    Update {
        /// The datasource id.
        id: String,
        /// New owner.
        #[arg(long)]
        owner: Option<String>,
        /// New tags, replacing the old ones (repeat for several).
        #[arg(long = "tag", value_name = "TAG", conflicts_with = "clear_tags")]
        tags: Vec<String>,
        /// Remove every tag.
        #[arg(long)]
        clear_tags: bool,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// New status.
        #[arg(long, value_enum)]
        status: Option<SettableStatus>,
        /// Refuse if the datasource changed since this etag was read.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Retire a datasource: its worker stops and its name is free again.
    Archive {
        /// The datasource id.
        id: String,
        /// Refuse if the datasource changed since this etag was read.
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Only this organisation.
    #[arg(long)]
    org: Option<String>,
    /// Only this project.
    #[arg(long)]
    project: Option<String>,
    /// Only this status (default: every status).
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// Only this connector kind.
    #[arg(long)]
    kind: Option<String>,
    /// Only this owner.
    #[arg(long)]
    owner: Option<String>,
    /// Only datasources carrying this tag.
    #[arg(long)]
    tag: Option<String>,
    /// Only names starting with this.
    #[arg(long)]
    name_prefix: Option<String>,
    /// Datasources per page (1-1000; the server's default is 100).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1000))]
    page_size: Option<i32>,
    /// Continue from a previous page.
    #[arg(long)]
    page_token: Option<String>,
    /// Follow page tokens to the last page.
    #[arg(long)]
    all: bool,
}

impl DatasourceArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        if let DatasourceCommand::Update {
            owner: None,
            tags,
            clear_tags: false,
            description: None,
            status: None,
            ..
        } = &self.command
            && tags.is_empty()
        {
            return Err(usage(
                "nothing to update: give --owner, --tag, --clear-tags, --description or --status",
            ));
        }
        let client = self.client.connect().await?;
        let mut svc = client.datasources();
        match self.command {
            DatasourceCommand::Create {
                org,
                project,
                name,
                kind,
                owner,
                tags,
                description,
            } => {
                let request = pb::CreateDatasourceRequest {
                    org,
                    project,
                    name,
                    kind,
                    owner,
                    tags,
                    description,
                };
                let ds = client
                    .unary(svc.create_datasource(client.request(request)))
                    .await?;
                printer.one(&ds, detail)
            }
            DatasourceCommand::Get { id } => {
                let ds = client
                    .unary(svc.get_datasource(client.request(pb::GetDatasourceRequest { id })))
                    .await?;
                printer.one(&ds, detail)
            }
            DatasourceCommand::List(args) => list(&client, printer, args).await,
            DatasourceCommand::Update {
                id,
                owner,
                tags,
                clear_tags,
                description,
                status,
                etag,
            } => {
                let mut datasource = pb::Datasource {
                    id,
                    ..Default::default()
                };
                let mut paths = Vec::new();
                if let Some(owner) = owner {
                    datasource.owner = owner;
                    paths.push("owner".to_owned());
                }
                if clear_tags || !tags.is_empty() {
                    datasource.tags = tags;
                    paths.push("tags".to_owned());
                }
                if let Some(description) = description {
                    datasource.description = description;
                    paths.push("description".to_owned());
                }
                if let Some(status) = status {
                    datasource.status = match status {
                        SettableStatus::Active => pb::DatasourceStatus::Active,
                        SettableStatus::Disabled => pb::DatasourceStatus::Disabled,
                    } as i32;
                    paths.push("status".to_owned());
                }
                let request = pb::UpdateDatasourceRequest {
                    datasource: Some(datasource),
                    update_mask: Some(prost_types::FieldMask { paths }),
                    etag: etag.unwrap_or_default(),
                };
                let ds = client
                    .unary(svc.update_datasource(client.request(request)))
                    .await?;
                printer.one(&ds, detail)
            }
            DatasourceCommand::Archive { id, etag } => {
                let request = pb::ArchiveDatasourceRequest {
                    id,
                    etag: etag.unwrap_or_default(),
                };
                let ds = client
                    .unary(svc.archive_datasource(client.request(request)))
                    .await?;
                printer.one(&ds, detail)
            }
        }
    }
}

async fn list(client: &Client, printer: Printer, args: ListArgs) -> anyhow::Result<()> {
    let mut svc = client.datasources();
    let mut request = pb::ListDatasourcesRequest {
        org: args.org.unwrap_or_default(),
        project: args.project.unwrap_or_default(),
        status: args
            .status
            .map_or(pb::DatasourceStatus::Unspecified, Into::into) as i32,
        kind: args.kind.unwrap_or_default(),
        owner: args.owner.unwrap_or_default(),
        tag: args.tag.unwrap_or_default(),
        name_prefix: args.name_prefix.unwrap_or_default(),
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
    };
    let mut listing = Listing::new(printer, list_table(), args.all);
    loop {
        let page = client
            .unary(svc.list_datasources(client.request(request.clone())))
            .await?;
        match listing.page(&page.datasources, page.next_page_token, list_row)? {
            Some(next) => request.page_token = next,
            None => return Ok(()),
        }
    }
}

/// The columns of `datasource list`.
pub fn list_table() -> Table {
    Table::new([
        "ID", "ORG", "PROJECT", "NAME", "KIND", "STATUS", "VERSION", "OWNER", "TAGS",
    ])
}

/// One row of `datasource list`.
pub fn list_row(table: &mut Table, ds: &pb::Datasource) {
    table.row([
        ds.id.clone(),
        ds.org.clone(),
        ds.project.clone(),
        ds.name.clone(),
        ds.kind.clone(),
        datasource_status(ds.status),
        table::version(ds.current_version),
        ds.owner.clone(),
        ds.tags.join(","),
    ]);
}

/// One datasource, field by field.
pub fn detail(ds: &pb::Datasource) -> String {
    table::fields(&[
        ("id", ds.id.clone()),
        ("org", ds.org.clone()),
        ("project", ds.project.clone()),
        ("name", ds.name.clone()),
        ("kind", ds.kind.clone()),
        ("status", datasource_status(ds.status)),
        ("version", table::version(ds.current_version)),
        ("owner", ds.owner.clone()),
        ("tags", ds.tags.join(", ")),
        ("description", ds.description.clone()),
        ("etag", ds.etag.clone()),
        ("created", by(&ds.created_by, ds.created_at.as_ref())),
        ("updated", by(&ds.updated_by, ds.updated_at.as_ref())),
    ])
}

/// `2024-05-01T12:00:03Z by alice`, or what of it is known.
pub fn by(who: &str, when: Option<&prost_types::Timestamp>) -> String {
    let when = table::time(when);
    match (when.is_empty(), who.is_empty()) {
        (false, false) => format!("{when} by {who}"),
        (false, true) => when,
        (true, false) => format!("by {who}"),
        (true, true) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_datasource_is_one_aligned_row() {
        let mut table = list_table();
        list_row(
            &mut table,
            &pb::Datasource {
                id: "d1".into(),
                org: "acme".into(),
                project: "core".into(),
                name: "orders".into(),
                kind: "webhook".into(),
                status: pb::DatasourceStatus::Active as i32,
                current_version: 2,
                owner: "team-a".into(),
                tags: vec!["a".into(), "b".into()],
                ..Default::default()
            },
        );
        assert_eq!(
            table.render(),
            "ID  ORG   PROJECT  NAME    KIND     STATUS  VERSION  OWNER   TAGS\n\
             d1  acme  core     orders  webhook  active  2        team-a  a,b\n"
        );
    }

    #[test]
    fn who_and_when_read_as_one_field() {
        let at = prost_types::Timestamp {
            seconds: 1_714_564_803,
            nanos: 0,
        };
        assert_eq!(by("alice", Some(&at)), "2024-05-01T12:00:03Z by alice");
        assert_eq!(by("", Some(&at)), "2024-05-01T12:00:03Z");
        assert_eq!(by("", None), "");
    }
}
