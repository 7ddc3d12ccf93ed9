//! The `s3-exchange` binary: parse the command line, load the configuration, start
//! logging, run the library, map the outcome to an exit code. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use s3_exchange::cli::{Cli, Command};
use s3_exchange::config::{self, Config};
use s3_exchange::daemon::{self, Daemon};
use s3_exchange::logging;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.clone().unwrap_or_else(Config::default_path);
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("s3-exchange: configuration error: {err}");
            return exit(config::EXIT_CONFIG);
        }
    };
    let _guard = logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, path, config)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = %err, "s3-exchange cannot run");
            exit(err.exit_code())
        }
    }
}

async fn run(
    command: Command,
    path: std::path::PathBuf,
    config: Config,
) -> Result<ExitCode, daemon::Error> {
    let shutdown = CancellationToken::new();
    daemon::handle_signals(shutdown.clone(), path, config.clone())?;
    let daemon = Daemon::start(&config).await?;
    match command {
        Command::Run => {
            daemon.run(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync => {
            let summary = daemon.sync(shutdown).await?;
            Ok(if summary.failures() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
