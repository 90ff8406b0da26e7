//! `dsreg kinds list|health` (the `Catalog` service) and `dsreg info` (the `Registry`
//! service): what a registry can run and who it is.

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
