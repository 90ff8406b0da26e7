//! `dsreg secret put|delete|list`: the `Secrets` service. A value goes in from stdin or a
//! file, never from argv, and nothing here prints it: only names and metadata come back.

use std::path::PathBuf;

use crate::api::grpc::pb;

use super::connect::ClientArgs;
use super::input::{SecretSource, read_secret};
use super::json::ToJson;
use super::table::{self, Table};

/// `dsreg secret …`.
#[derive(Debug, clap::Args)]
pub struct SecretArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: SecretCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SecretCommand {
    /// Create or replace a secret; the datasource's worker reloads. The value is read from
    /// stdin (one trailing newline stripped) or a file, never from the command line, and is
    /// never printed.
    Put {
        /// The datasource id.
        datasource_id: String,
        /// The secret's name (1-128 of A-Z a-z 0-9 _ . -).
        name: String,
        /// Read the value from stdin (the default), e.g. `dsreg secret put ID NAME < value.txt`.
        #[arg(long, conflicts_with = "from_file")]
        from_stdin: bool,
        /// Read the value from this file, byte for byte.
        #[arg(long, value_name = "PATH")]
        from_file: Option<PathBuf>,
    },
    /// Remove a secret; the datasource's worker reloads.
    Delete {
        /// The datasource id.
        datasource_id: String,
        /// The secret's name.
        name: String,
    },
    /// List a datasource's secrets: names and metadata, never values.
    List {
        /// The datasource id.
        datasource_id: String,
    },
}

impl SecretArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// An unreadable value, or the server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        match self.command {
            SecretCommand::Put {
                datasource_id,
                name,
                from_stdin: _,
                from_file,
            } => {
                let source = from_file.map_or(SecretSource::Stdin, SecretSource::File);
                // Read before connecting: a missing value fails without a round trip.
                let mut value = read_secret(&source)?;
                let client = self.client.connect().await?;
                let request = pb::PutSecretRequest {
                    datasource_id: datasource_id.clone(),
                    name,
                    // Moved, not copied: the buffer leaves the zeroizing wrapper for the
                    // request, which is encoded and dropped by the call.
                    value: std::mem::take(&mut *value),
                };
                let meta = client
                    .unary(client.secrets().put_secret(client.request(request)))
                    .await?;
                printer.one(&meta, |m| {
                    format!(
                        "stored secret {} of {} (key version {}, fingerprint {})\n",
                        table::clean(&m.name),
                        datasource_id,
                        m.key_version,
                        table::clean(&m.fingerprint)
                    )
                })
            }
            SecretCommand::Delete {
                datasource_id,
                name,
            } => {
                let client = self.client.connect().await?;
                let request = pb::DeleteSecretRequest {
                    datasource_id: datasource_id.clone(),
                    name: name.clone(),
                };
                let deleted = client
                    .unary(client.secrets().delete_secret(client.request(request)))
                    .await?;
                printer.one(&deleted, |d| {
                    if d.deleted && !d.warning.is_empty() {
                        format!(
                            "deleted secret {name} of {datasource_id}\nwarning: {}\n",
                            table::clean(&d.warning)
                        )
                    } else if d.deleted {
                        format!("deleted secret {name} of {datasource_id}\n")
                    } else {
                        format!("no secret {name} on {datasource_id}; nothing deleted\n")
                    }
                })
            }
            SecretCommand::List { datasource_id } => {
                let client = self.client.connect().await?;
                let secrets = client
                    .unary(
                        client
                            .secrets()
                            .list_secrets(client.request(pb::ListSecretsRequest { datasource_id })),
                    )
                    .await?
                    .secrets;
                if printer.is_json() {
                    for meta in &secrets {
                        printer.json(&meta.to_json())?;
                    }
                    return Ok(());
                }
                printer.text(&list_table(&secrets).render())
            }
        }
    }
}

/// The `secret list` table.
pub fn list_table(secrets: &[pb::SecretMeta]) -> Table {
    let mut table = Table::new(["NAME", "KEY VERSION", "FINGERPRINT", "CREATED", "ROTATED"]);
    for meta in secrets {
        table.row([
            meta.name.clone(),
            meta.key_version.to_string(),
            meta.fingerprint.clone(),
            table::time(meta.created_at.as_ref()),
            table::time(meta.rotated_at.as_ref()),
        ]);
    }
    table
}
