//! `dsreg version create|get|list|update|publish|rollback`: the `Datasources` service's
//! version calls.

use crate::api::grpc::pb;

use super::connect::ClientArgs;
use super::datasources::by;
use super::error::usage;
use super::input::read_config;
use super::json::{ToJson, version_state};
use super::table::{self, Table};

/// `dsreg version …`.
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: VersionCommand,
}

#[derive(Debug, clap::Subcommand)]
enum VersionCommand {
    /// Add a draft version.
    Create {
        /// The datasource id.
        datasource_id: String,
        /// The config, a JSON object: a file, or `-` for stdin.
        #[arg(long, value_name = "PATH|-")]
        config_file: String,
        /// What changed and why.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Show one version with its config.
    Get {
        /// The datasource id.
        datasource_id: String,
        /// The version number.
        version: i32,
    },
    /// List a datasource's versions, newest first.
    List {
        /// The datasource id.
        datasource_id: String,
    },
    /// Replace a draft's config or comment (what is not given is kept).
    Update {
        /// The datasource id.
        datasource_id: String,
        /// The draft's number.
        version: i32,
        /// The new config, a JSON object: a file, or `-` for stdin.
        #[arg(long, value_name = "PATH|-")]
        config_file: Option<String>,
        /// The new comment.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Make a version the running one.
    Publish {
        /// The datasource id.
        datasource_id: String,
        /// The version number.
        version: i32,
    },
    /// Republish a given version, or the previously published one.
    Rollback {
        /// The datasource id.
        datasource_id: String,
        /// The version to republish (default: the previously published one).
        #[arg(long)]
        to_version: Option<i32>,
    },
}

impl VersionArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// An unreadable config, or the server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        // Read input before connecting: a bad file fails without a round trip.
        let config = match &self.command {
            VersionCommand::Create { config_file, .. } => Some(read_config(config_file)?),
            VersionCommand::Update {
                config_file: Some(path),
                ..
            } => Some(read_config(path)?),
            _ => None,
        };
        if let VersionCommand::Update {
            config_file: None,
            comment: None,
            ..
        } = &self.command
        {
            return Err(usage("nothing to update: give --config-file or --comment"));
        }
        let client = self.client.connect().await?;
        let mut svc = client.datasources();
        match self.command {
            VersionCommand::Create {
                datasource_id,
                comment,
                ..
            } => {
                let request = pb::CreateVersionRequest {
                    datasource_id,
                    config_json: config.unwrap_or_default(),
                    comment,
                };
                let version = client
                    .unary(svc.create_version(client.request(request)))
                    .await?;
                printer.one(&version, detail)
            }
            VersionCommand::Get {
                datasource_id,
                version,
            } => {
                let request = pb::GetVersionRequest {
                    datasource_id,
                    version,
                };
                let version = client
                    .unary(svc.get_version(client.request(request)))
                    .await?;
                printer.one(&version, detail)
            }
            VersionCommand::List { datasource_id } => {
                let request = pb::ListVersionsRequest { datasource_id };
                let versions = client
                    .unary(svc.list_versions(client.request(request)))
                    .await?
                    .versions;
                if printer.is_json() {
                    for version in &versions {
                        printer.json(&version.to_json())?;
                    }
                    return Ok(());
                }
                let mut table = list_table();
                for version in &versions {
                    list_row(&mut table, version);
                }
                printer.text(&table.render())
            }
            VersionCommand::Update {
                datasource_id,
                version,
                comment,
                ..
            } => {
                // The call replaces both fields; whichever was not given is kept as stored.
                let (config_json, comment) = match (config, comment) {
                    (Some(config), Some(comment)) => (config, comment),
                    (config, comment) => {
                        let current = client
                            .unary(svc.get_version(client.request(pb::GetVersionRequest {
                                datasource_id: datasource_id.clone(),
                                version,
                            })))
                            .await?;
                        (
                            config.unwrap_or(current.config_json),
                            comment.unwrap_or(current.comment),
                        )
                    }
                };
                let request = pb::UpdateVersionRequest {
                    datasource_id,
                    version,
                    config_json,
                    comment,
                };
                let version = client
                    .unary(svc.update_version(client.request(request)))
                    .await?;
                printer.one(&version, detail)
            }
            VersionCommand::Publish {
                datasource_id,
                version,
            } => {
                let request = pb::PublishVersionRequest {
                    datasource_id,
                    version,
                };
                let published = client
                    .unary(svc.publish_version(client.request(request)))
                    .await?;
                printer.one(&published, published_text)
            }
            VersionCommand::Rollback {
                datasource_id,
                to_version,
            } => {
                let request = pb::RollbackVersionRequest {
                    datasource_id,
                    to_version: to_version.unwrap_or(0),
                };
                let published = client
                    .unary(svc.rollback_version(client.request(request)))
                    .await?;
                printer.one(&published, rolled_back_text)
            }
        }
    }
}

/// The columns of `version list`.
pub fn list_table() -> Table {
    Table::new([
        "VERSION",
        "STATE",
        "CREATED",
        "CREATED BY",
        "PUBLISHED",
        "COMMENT",
    ])
}

/// One row of `version list`.
pub fn list_row(table: &mut Table, version: &pb::Version) {
    table.row([
        version.version.to_string(),
        version_state(version.state),
        table::time(version.created_at.as_ref()),
        version.created_by.clone(),
        table::time(version.published_at.as_ref()),
        table::truncate(&version.comment, 60),
    ]);
}

/// One version, field by field, then its config pretty-printed.
pub fn detail(version: &pb::Version) -> String {
    let mut text = table::fields(&[
        ("datasource", version.datasource_id.clone()),
        ("version", version.version.to_string()),
        ("state", version_state(version.state)),
        ("comment", version.comment.clone()),
        (
            "created",
            by(&version.created_by, version.created_at.as_ref()),
        ),
        (
            "published",
            by(&version.published_by, version.published_at.as_ref()),
        ),
    ]);
    text.push_str("config:\n");
    let config = match serde_json::from_str::<serde_json::Value>(&version.config_json) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_default(),
        Err(_) => version.config_json.clone(),
    };
    text.push_str(&config);
    text.push('\n');
    text
}

/// What a rollback did.
pub fn rolled_back_text(rolled_back: &pb::PublishResponse) -> String {
    if rolled_back.event_id == 0 {
        format!(
            "version {} of {} already was the published one; nothing rolled back\n",
            rolled_back.version, rolled_back.datasource_id
        )
    } else {
        format!(
            "rolled back {} to version {} (event {})\n",
            rolled_back.datasource_id, rolled_back.version, rolled_back.event_id
        )
    }
}

/// What a publish did.
pub fn published_text(published: &pb::PublishResponse) -> String {
    if published.event_id == 0 {
        format!(
            "version {} of {} was already published\n",
            published.version, published.datasource_id
        )
    } else {
        format!(
            "published version {} of {} (event {})\n",
            published.version, published.datasource_id, published.event_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_shows_its_config_pretty_printed() {
        let text = detail(&pb::Version {
            datasource_id: "d1".into(),
            version: 3,
            config_json: r#"{"rate_per_sec":5}"#.into(),
            state: pb::VersionState::Draft as i32,
            comment: "faster".into(),
            ..Default::default()
        });
        assert!(text.starts_with("datasource: d1\nversion:    3\nstate:      draft\n"));
        assert!(
            text.ends_with("config:\n{\n  \"rate_per_sec\": 5\n}\n"),
            "{text}"
        );
    }

    #[test]
    fn a_publish_says_whether_it_changed_anything() {
        let mut published = pb::PublishResponse {
            datasource_id: "d1".into(),
            version: 2,
            event_id: 17,
        };
        assert_eq!(
            published_text(&published),
            "published version 2 of d1 (event 17)\n"
        );
        published.event_id = 0;
        assert!(published_text(&published).contains("already published"));
    }

    #[test]
    fn a_rollback_says_it_rolled_back_or_that_nothing_moved() {
        let mut rolled_back = pb::PublishResponse {
            datasource_id: "d1".into(),
            version: 1,
            event_id: 18,
        };
        assert_eq!(
            rolled_back_text(&rolled_back),
            "rolled back d1 to version 1 (event 18)\n"
        );
        rolled_back.event_id = 0;
        assert!(rolled_back_text(&rolled_back).contains("nothing rolled back"));
    }
}
