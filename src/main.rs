//! The `dsreg` binary: parse the command line, set up telemetry, run the command on a Tokio
//! runtime, flush telemetry, map the result to an exit code.

fn main() -> std::process::ExitCode {
    let cli = dsreg::cli::parse();
    // SAFETY: no other thread has started yet.
    unsafe { dsreg::telemetry::otel::drop_compression_none() };
    let telemetry = dsreg::telemetry::init(cli.log_level());
    // Panics become structured, throttled log lines (contained ones included).
    dsreg::telemetry::panics::install_hook();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dsreg: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let service = cli.is_service();
    let result = runtime.block_on(cli.run());
    drop(runtime);
    let code = match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if service => {
            tracing::error!(error = %format!("{e:#}"), "dsreg stopped: fatal error");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("dsreg: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    drop(telemetry);
    code
}
