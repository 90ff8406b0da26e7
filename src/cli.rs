//! The command line: `serve`, `migrate`, `db url`, `keys`, `import`, `sync`, `export`, and the
//! client commands that call a registry over gRPC (`datasource`, `version`, `secret`,
//! `events`, `status`, `worker`, `test`, `kinds`, `info`). Service flags and their environment
//! variables are declared in `config`, client flags in `client`; this module only routes, and
//! turns the client's usage errors into clap's (exit code 2).

use clap::{CommandFactory, Parser, Subcommand};

use crate::app;
use crate::client::{self, StdoutClosed, UsageError};
use crate::config::{Settings, SyncSettings};
use crate::db;

/// dsreg, the datasource registry.
#[derive(Debug, Parser)]
#[command(name = "dsreg", version, about)]
pub struct Cli {
    /// Log filter (`info`, `debug`, `dsreg=trace,info`, ...); overrides `DSREG_LOG` and
    /// `RUST_LOG`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the registry (on the embedded database unless DATABASE_URL is set).
    Serve {
        #[command(flatten)]
        settings: Settings,
        #[command(flatten)]
        sync: SyncSettings,
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
    /// Master keys: rotate, rewrap secrets onto the active key, status (on the database
    /// directly).
    Keys(client::keys::KeysArgs),
    /// Import datasources from YAML files and folders: checked first, applied all or nothing
    /// (on the database directly).
    Import(client::files::ImportArgs),
    /// Keep the database in step with a folder of datasource files (on the database
    /// directly), until Ctrl-C.
    Sync(client::files::SyncArgs),
    /// Write the published datasources as YAML files, in the format import reads.
    Export(client::files::ExportArgs),
    /// Datasources: create, get, list, update, archive.
    Datasource(client::datasources::DatasourceArgs),
    /// Configuration versions: create, get, list, update, publish, rollback.
    Version(client::versions::VersionArgs),
    /// Datasource secrets: put (value from stdin or a file), delete, list (never values).
    Secret(client::secrets::SecretArgs),
    /// The event history: list, or watch live.
    Events(client::events::EventsArgs),
    /// A datasource's worker state: get, watch, metrics.
    Status(client::lifecycle::StatusArgs),
    /// Drive a datasource's worker: start, stop, restart, reload, backfill.
    Worker(client::lifecycle::WorkerArgs),
    /// Try a version, or an unsaved config, on sample payloads (sandboxed; writes nothing).
    Test(client::harness::TestArgs),
    /// Connector kinds: list, health.
    Kinds(client::catalog::KindsArgs),
    /// The registry's version, instance and schema.
    Info(client::catalog::InfoArgs),
    /// The registry instances sharing the database, and the datasource leases each holds.
    Instances(client::catalog::InstancesArgs),
    /// Check a config for a kind (or a datasource) without saving it: every problem at once.
    Validate(client::validate::ValidateArgs),
    /// Dead letters: list, replay through the published version, purge.
    Deadletters(client::dead_letters::DeadLettersArgs),
    /// Source positions: where a worker's next run resumes from; get, or reset while stopped.
    Position(client::positions::PositionArgs),
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
    /// The log filter given on the command line.
    pub fn log_level(&self) -> Option<&str> {
        self.log_level.as_deref()
    }

    /// Whether the command is the long-running service, whose output is its log: a fatal
    /// error is then a log line like every other, not text among JSON lines.
    pub fn is_service(&self) -> bool {
        matches!(self.command, Command::Serve { .. })
    }

    /// Runs the chosen command. A client usage error is reported as clap reports its own and
    /// exits with code 2; a closed stdout ends the command successfully.
    ///
    /// # Errors
    /// Whatever the command reports.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.dispatch().await {
            Err(e) if e.is::<StdoutClosed>() => Ok(()),
            Err(e) => match e.downcast::<UsageError>() {
                Ok(usage) => Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, usage.0)
                    .exit(),
                Err(e) => Err(e),
            },
            Ok(()) => Ok(()),
        }
    }

    async fn dispatch(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve { settings, sync } => {
                settings.check().map_err(anyhow::Error::msg)?;
                app::serve(settings, sync).await
            }
            Command::Migrate { settings, down_to } => {
                settings.check().map_err(anyhow::Error::msg)?;
                let database = app::Database::open(&settings).await?;
                let result = migrate(&database.url, &settings.connect_options(), down_to).await;
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
            Command::Keys(args) => args.run().await,
            Command::Import(args) => args.run().await,
            Command::Sync(args) => args.run().await,
            Command::Export(args) => args.run().await,
            Command::Datasource(args) => args.run().await,
            Command::Version(args) => args.run().await,
            Command::Secret(args) => args.run().await,
            Command::Events(args) => args.run().await,
            Command::Status(args) => args.run().await,
            Command::Worker(args) => args.run().await,
            Command::Test(args) => args.run().await,
            Command::Kinds(args) => args.run().await,
            Command::Info(args) => args.run().await,
            Command::Instances(args) => args.run().await,
            Command::Validate(args) => args.run().await,
            Command::Deadletters(args) => args.run().await,
            Command::Position(args) => args.run().await,
        }
    }
}

async fn migrate(
    url: &str,
    bounds: &db::ConnectOptions,
    down_to: Option<i32>,
) -> anyhow::Result<()> {
    match down_to {
        Some(target) => {
            let mut client = db::connect_with(url, &bounds.without_statement_timeout()).await?;
            let reverted = db::migrations::migrate_down(&mut client, target).await?;
            println!("reverted migrations {reverted:?}; schema now at {target}");
        }
        None => {
            let version = app::migrate_with(url, bounds).await?;
            println!("schema at migration {version}");
        }
    }
    Ok(())
}

/// The client's flags that take a value (`--server URL`), as written before the command.
const CLIENT_VALUE_FLAGS: &[&str] = &[
    "--server",
    "--ca-file",
    "--client-cert",
    "--client-key",
    "--token-file",
    "--data-dir",
    "--output",
    "-o",
];

/// Parses the command line. The client's connection and output flags (`-o json`,
/// `--server URL`, `--token-file PATH`, ...) are global: written before the command
/// (`dsreg -o json datasource list`) they are read as if written after it.
pub fn parse() -> Cli {
    Cli::parse_from(client_flags_after_the_command(std::env::args_os()))
}

/// `args` with the client flags written between the program name and the command moved after
/// the command's name, where each command reads them. Anything else is left where it is, so
/// clap reports it as it would.
pub fn client_flags_after_the_command(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut args = args.into_iter();
    let mut out: Vec<std::ffi::OsString> = args.next().into_iter().collect();
    let mut hoisted = Vec::new();
    let mut rest: Vec<std::ffi::OsString> = args.collect();
    let mut i = 0;
    while i < rest.len() {
        let Some(arg) = rest[i].to_str() else { break };
        let name = arg.split_once('=').map_or(arg, |(n, _)| n);
        let joined_short = arg.starts_with("-o") && arg.len() > 2 && !arg.starts_with("--");
        if CLIENT_VALUE_FLAGS.contains(&name) && !arg.contains('=') && !joined_short {
            // The flag and its value.
            let end = (i + 2).min(rest.len());
            hoisted.extend(rest.drain(i..end));
        } else if CLIENT_VALUE_FLAGS.contains(&name) || joined_short {
            hoisted.push(rest.remove(i));
        } else if arg == "--log-level" {
            i += 2;
        } else if arg.starts_with('-') {
            i += 1;
        } else {
            // The command: the flags go right after its name.
            let after = i + 1;
            rest.splice(after..after, hoisted.drain(..));
            break;
        }
    }
    // No command: leave them for clap to report.
    out.append(&mut hoisted);
    out.append(&mut rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("dsreg").chain(args.iter().copied()))
    }

    fn moved(args: &[&str]) -> Vec<String> {
        client_flags_after_the_command(
            std::iter::once("dsreg")
                .chain(args.iter().copied())
                .map(std::ffi::OsString::from),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
    }

    #[test]
    fn client_flags_before_the_command_are_read_after_it() {
        assert_eq!(
            moved(&["-o", "json", "--server", "http://h:1", "datasource", "list"]),
            [
                "dsreg",
                "datasource",
                "-o",
                "json",
                "--server",
                "http://h:1",
                "list"
            ]
        );
        assert_eq!(
            moved(&[
                "--log-level",
                "debug",
                "-ojson",
                "--token-file=t",
                "events",
                "list"
            ]),
            [
                "dsreg",
                "--log-level",
                "debug",
                "events",
                "-ojson",
                "--token-file=t",
                "list"
            ]
        );
        // Already after the command, or no client flag: unchanged.
        for args in [
            &["datasource", "list", "-o", "json"][..],
            &["serve", "--data-dir", "d"],
            &["--help"],
        ] {
            let mut expected = vec!["dsreg"];
            expected.extend_from_slice(args);
            assert_eq!(moved(args), expected);
        }
        let cli = Cli::try_parse_from(moved(&["-o", "json", "datasource", "list"])).unwrap();
        assert!(matches!(cli.command, Command::Datasource(_)));
        // A client flag before a command that has none is refused as clap refuses it.
        assert!(Cli::try_parse_from(moved(&["-o", "json", "serve"])).is_err());
    }

    /// The README's list of `serve`'s environment variables is the flags' own: a flag added
    /// or renamed without the README, or a name the README keeps after its flag went, fails.
    #[test]
    fn the_readme_lists_every_environment_variable_of_serve_and_no_other() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("Every flag has an environment variable")
            .expect("the README's list");
        let paragraph = &readme[start..start + readme[start..].find("\n\n").unwrap()];
        let listed: std::collections::BTreeSet<&str> = paragraph
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| w.starts_with("DSREG_") || *w == "DATABASE_URL")
            .collect();
        let command = Cli::command();
        let serve = command
            .get_subcommands()
            .find(|c| c.get_name() == "serve")
            .unwrap();
        let flags: std::collections::BTreeSet<String> = serve
            .get_arguments()
            .filter_map(|a| a.get_env()?.to_str().map(str::to_owned))
            .collect();
        // Read by the log set-up, not a flag of `serve`.
        let outside = ["DSREG_LOG"];
        let missing: Vec<&String> = flags
            .iter()
            .filter(|f| !listed.contains(f.as_str()))
            .collect();
        let stale: Vec<&&str> = listed
            .iter()
            .filter(|l| !flags.contains(**l) && !outside.contains(*l))
            .collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "README: add {missing:?}, remove {stale:?}"
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn secret_put_takes_no_value_on_the_command_line() {
        assert!(parse(&["secret", "put", "ds-1", "api_key"]).is_ok());
        assert!(parse(&["secret", "put", "ds-1", "api_key", "--from-file", "v.txt"]).is_ok());
        for refused in [
            &["secret", "put", "ds-1", "api_key", "hunter2"][..],
            &["secret", "put", "ds-1", "api_key", "--value", "hunter2"],
            &["secret", "put", "ds-1", "api_key", "--value=hunter2"],
            &[
                "secret",
                "put",
                "ds-1",
                "api_key",
                "--from-stdin",
                "--from-file",
                "v",
            ],
        ] {
            assert_eq!(parse(refused).unwrap_err().exit_code(), 2, "{refused:?}");
        }
        let put = Cli::command();
        let put = put
            .find_subcommand("secret")
            .and_then(|c| c.find_subcommand("put"))
            .unwrap();
        let flags: Vec<&str> = put.get_arguments().filter_map(|a| a.get_long()).collect();
        assert!(
            flags
                .iter()
                .all(|f| !f.contains("value") && !f.contains("secret")),
            "{flags:?}"
        );
    }

    #[test]
    fn tokens_are_never_taken_on_the_command_line() {
        for command in [
            &["info"][..],
            &["datasource", "list"],
            &["secret", "list", "d"],
        ] {
            let mut args = command.to_vec();
            args.extend(["--token", "abc"]);
            assert_eq!(parse(&args).unwrap_err().exit_code(), 2, "{args:?}");
        }
        assert!(parse(&["info", "--token-file", "/run/token"]).is_ok());
    }

    #[test]
    fn client_flags_go_before_or_after_the_subcommand() {
        for args in [
            &[
                "datasource",
                "--server",
                "h:1",
                "-o",
                "json",
                "list",
                "--all",
            ][..],
            &[
                "datasource",
                "list",
                "--all",
                "--server",
                "h:1",
                "-o",
                "json",
            ],
        ] {
            let Command::Datasource(_) = parse(args).unwrap().command else {
                panic!("{args:?}");
            };
        }
        assert!(parse(&["worker", "start", "d", "--timeout", "5s"]).is_ok());
        assert!(parse(&["worker", "start", "d", "--timeout", "soon"]).is_err());
    }

    #[test]
    fn create_needs_tenant_name_and_kind() {
        assert!(
            parse(&[
                "datasource",
                "create",
                "--org",
                "a",
                "--project",
                "p",
                "--name",
                "n"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "datasource",
                "create",
                "--org",
                "a",
                "--project",
                "p",
                "--name",
                "n",
                "--kind",
                "generator",
                "--tag",
                "x",
                "--tag",
                "y",
            ])
            .is_ok()
        );
    }

    #[test]
    fn a_test_run_takes_a_version_or_a_config_not_both() {
        assert!(parse(&["test", "d", "--version", "2", "--sample-file", "a.json"]).is_ok());
        assert!(
            parse(&[
                "test",
                "d",
                "--config-file",
                "-",
                "--sample-file",
                "a",
                "--sample-file",
                "b"
            ])
            .is_ok()
        );
        assert!(parse(&["test", "d", "--version", "2", "--config-file", "c.json"]).is_err());
    }

    #[test]
    fn client_durations_take_a_unit_and_server_flags_count_milliseconds() {
        for timeout in ["500ms", "2s", "1m", "1m 30s"] {
            assert!(
                parse(&["worker", "start", "d", "--timeout", timeout]).is_ok(),
                "{timeout}"
            );
            assert!(
                parse(&["test", "d", "--sample-file", "a", "--timeout", timeout]).is_ok(),
                "{timeout}"
            );
        }
        for bare in ["10", "+2s", "0s", "soon"] {
            let error = parse(&["worker", "start", "d", "--timeout", bare]).unwrap_err();
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bare}"
            );
        }
        let error = parse(&["worker", "start", "d", "--timeout", "10"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("give a unit"), "{error}");
        let Command::Serve { settings, .. } = parse(&[
            "serve",
            "--backoff-base-ms",
            "500",
            "--backoff-max-ms",
            "2000",
        ])
        .unwrap()
        .command
        else {
            panic!("serve parses as serve");
        };
        assert_eq!(
            settings.backoff().base,
            std::time::Duration::from_millis(500)
        );
        assert_eq!(settings.backoff().max, std::time::Duration::from_secs(2));
    }
}
