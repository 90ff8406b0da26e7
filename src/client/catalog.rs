//! `dsreg kinds list|health` (the `Catalog` service), `dsreg info` and `dsreg instances` (the
//! `Registry` service): what a registry can run, who it is, and who shares its database.

use crate::api::grpc::pb;

use super::connect::{Client, ClientArgs};
use super::json::ToJson;
use super::table::{self, Table};

/// `dsreg kinds …`.
#[derive(Debug, clap::Args)]
pub struct KindsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: KindsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KindsCommand {
    /// List the connector kinds with their metadata (`-o json` includes each config schema).
    List,
    /// Check whether a kind can work on this registry (cached for a minute by the server).
    Health {
        /// The kind's name.
        kind: String,
    },
}

/// `dsreg info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    client: ClientArgs,
}

/// `dsreg instances`.
#[derive(Debug, clap::Args)]
pub struct InstancesArgs {
    #[command(flatten)]
    client: ClientArgs,
}

impl InstancesArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let client = self.client.connect().await?;
        let listed = client
            .unary(
                client
                    .registry()
                    .list_instances(client.request(pb::ListInstancesRequest {})),
            )
            .await?;
        if printer.is_json() {
            for instance in &listed.instances {
                printer.json(&instance.to_json())?;
            }
            return Ok(());
        }
        let mut table = Table::new([
            "ID",
            "LIVE",
            "LEASES",
            "ADDRESS",
            "VERSION",
            "STARTED",
            "HEARTBEAT",
        ]);
        for i in &listed.instances {
            let id = if i.id == listed.answered_by {
                format!("{} (answering)", i.id)
            } else {
                i.id.clone()
            };
            table.row([
                id,
                liveness(i).to_owned(),
                table::thousands(u64::try_from(i.leases).unwrap_or(0)),
                i.address.clone(),
                i.version.clone(),
                table::time(i.started_at.as_ref()),
                table::time(i.heartbeat_at.as_ref()),
            ]);
        }
        printer.text(&table.render())
    }
}

/// The LIVE column: a dead instance says how it died (a clean stop, or silence: killed,
/// frozen, cut off).
fn liveness(instance: &pb::Instance) -> &'static str {
    match (instance.live, instance.stopped_at.is_some()) {
        (true, _) => "yes",
        (false, true) => "no (stopped)",
        (false, false) => "no (silent)",
    }
}

impl KindsArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let client = self.client.connect().await?;
        let mut catalog = client.catalog();
        match self.command {
            KindsCommand::List => {
                let kinds = client
                    .unary(catalog.list_kinds(client.request(pb::ListKindsRequest {})))
                    .await?
                    .kinds;
                if printer.is_json() {
                    for kind in &kinds {
                        printer.json(&kind.to_json())?;
                    }
                    return Ok(());
                }
                printer.text(&kinds_table(&kinds).render())
            }
            KindsCommand::Health { kind } => {
                let health = client
                    .unary(
                        catalog.get_kind_health(client.request(pb::GetKindHealthRequest { kind })),
                    )
                    .await?;
                printer.one(&health, |h| {
                    table::fields(&[
                        ("kind", h.kind.clone()),
                        ("healthy", if h.healthy { "yes" } else { "no" }.to_owned()),
                        ("detail", h.detail.clone()),
                        ("checked", table::time(h.checked_at.as_ref())),
                    ])
                })
            }
        }
    }
}

impl InfoArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let client = self.client.connect().await?;
        let info = client
            .unary(
                client
                    .registry()
                    .get_info(client.request(pb::GetInfoRequest {})),
            )
            .await?;
        printer.one(&info, |i| info_text(&client, i))
    }
}

fn info_text(client: &Client, info: &pb::GetInfoResponse) -> String {
    table::fields(&[
        (
            "server",
            format!("{} (from {})", client.url, client.url_from),
        ),
        ("version", info.version.clone()),
        ("instance", info.instance_id.clone()),
        ("schema", info.schema_version.to_string()),
        ("client", env!("CARGO_PKG_VERSION").to_owned()),
        (
            "token",
            if client.has_token() { "sent" } else { "none" }.to_owned(),
        ),
    ])
}

/// The `kinds list` table.
pub fn kinds_table(kinds: &[pb::Kind]) -> Table {
    let mut table = Table::new(["NAME", "VERSION", "MODE", "BACKFILL", "SECRETS", "SUMMARY"]);
    for kind in kinds {
        table.row([
            kind.name.clone(),
            kind.version.clone(),
            if kind.push { "push" } else { "pull" }.to_owned(),
            table::yes(kind.can_backfill).to_owned(),
            kind.secrets.join(","),
            kind.summary.clone(),
        ]);
    }
    table
}
