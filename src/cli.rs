//! The command line: `serve`, `migrate`, `db url`. Flags and their environment variables are
//! declared in `config`; this module only routes.

use clap::{Parser, Subcommand};

use crate::app;
use crate::config::Settings;
use crate::db;

/// dsreg, the datasource registry.
#[derive(Debug, Parser)]
#[command(name = "dsreg", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the registry (on the embedded database unless DATABASE_URL is set).
    Serve {
        #[command(flatten)]
        settings: Settings,
    },
    /// Apply pending schema migrations, or revert down to a version.
    Migrate {
        #[command(flatten)]
        settings: Settings,
        /// Revert applied migrations newer than this version (0 reverts all).
        #[arg(long)]
        down_to: Option<i32>,
    },
    /// Database helpers.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Print the URL of the database dsreg uses (so `psql "$(dsreg db url)"` works).
    Url {
        #[command(flatten)]
        settings: Settings,
    },
}

impl Cli {
    /// Runs the chosen command.
    ///
    /// # Errors
    /// Whatever the command reports.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve { settings } => {
                settings.check().map_err(anyhow::Error::msg)?;
                app::serve(settings).await
            }
            Command::Migrate { settings, down_to } => {
                settings.check().map_err(anyhow::Error::msg)?;
                let database = app::Database::open(&settings).await?;
                let result = migrate(&database.url, down_to).await;
                database.close().await;
                result
            }
            Command::Db {
                command: DbCommand::Url { settings },
            } => {
                let url = match settings.database_url {
                    Some(url) => url,
                    None => db::embedded::running_url(&settings.pg_data_dir())?,
                };
                println!("{url}");
                Ok(())
            }
        }
    }
}

async fn migrate(url: &str, down_to: Option<i32>) -> anyhow::Result<()> {
    match down_to {
        Some(target) => {
            let mut client = db::connect(url).await?;
            let reverted = db::migrations::migrate_down(&mut client, target).await?;
            println!("reverted migrations {reverted:?}; schema now at {target}");
        }
        None => {
            let version = app::migrate(url).await?;
            println!("schema at migration {version}");
        }
    }
    Ok(())
}
