//! The `dsreg` binary: parse the command line, run it, map the result to an exit code.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    dsreg::telemetry::init_logging();
    let cli = dsreg::cli::Cli::parse();
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsreg: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
