//! The `s3-exchange` binary: parse the command line, load the configuration, start
//! logging, run the library, map the outcome to an exit code. Nothing else lives here.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use s3_exchange::cli::{Cli, Command};
use s3_exchange::config::{self, Config};
use s3_exchange::daemon::{self, Daemon};
use s3_exchange::status::Snapshot;
use s3_exchange::{check, init, limits, logging};

/// `status` when no daemon runs (as `systemctl status` does for an inactive unit).
const EXIT_NOT_RUNNING: u8 = 3;

fn main() -> ExitCode {
    s3_exchange::memory::limit_arenas();
    let cli = Cli::parse();
    let path = cli.config.clone().unwrap_or_else(Config::default_path);
    // `init` makes the configuration, so it cannot need one.
    if let Command::Init { bucket, region } = &cli.command {
        return run_init(&path, bucket.as_deref(), region.as_deref());
    }
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("s3-exchange: configuration error: {err}");
            return exit(config::EXIT_CONFIG);
        }
    };
    // `status` only reads a file: no logging set-up, no runtime, no log file touched.
    if let Command::Status { json } = cli.command {
        return run_status(&config, json);
    }
    let _guard = match cli.command {
        Command::Run | Command::Sync => Some(logging::init(&config.log)),
        _ => None,
    };
    if matches!(cli.command, Command::Run | Command::Sync) {
        let needed = limits::open_files_needed(config.transfer.concurrency);
        if let Some(limit) = limits::raise_open_files(needed) {
            tracing::warn!(
                limit,
                needed,
                concurrency = config.transfer.concurrency,
                "the open-file limit is low for transfer.concurrency: transfers may fail with \"too many open files\"; raise it (LimitNOFILE= in the unit, ulimit -n) or lower transfer.concurrency"
            );
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("s3-exchange: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Check { write } = cli.command {
        let report = runtime.block_on(check::run(&config, write));
        println!("{report}");
        return if report.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    match runtime.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = %err, "s3-exchange cannot run");
            exit(err.exit_code())
        }
    }
}

async fn run(command: Command, config: Config) -> Result<ExitCode, daemon::Error> {
    let shutdown = CancellationToken::new();
    let control = daemon::handle_signals(shutdown.clone())?;
    let daemon = Daemon::start(&config).await?;
    if let Command::Sync = command {
        let summary = daemon.sync(shutdown).await?;
        return Ok(if summary.failures() == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    daemon.run(shutdown, control).await?;
    Ok(ExitCode::SUCCESS)
}

fn run_status(config: &Config, json: bool) -> ExitCode {
    let snapshot = match Snapshot::read(&config.state_dir) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("s3-exchange: {err}");
            return ExitCode::from(EXIT_NOT_RUNNING);
        }
    };
    let live = snapshot.is_live();
    if json {
        match serde_json::to_string_pretty(&serde_json::json!({
            "running": live,
            "status": snapshot,
        })) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("s3-exchange: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", snapshot.render(live));
    }
    if live {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_RUNNING)
    }
}

fn run_init(path: &Path, bucket: Option<&str>, region: Option<&str>) -> ExitCode {
    match init::init(path, bucket, region) {
        Ok(done) => {
            if done.wrote_config {
                println!("wrote {}", path.display());
            } else {
                println!("kept the existing {}", path.display());
            }
            for dir in &done.created {
                println!("created {}", dir.display());
            }
            let editor = if bucket.is_none() {
                format!(
                    "\n  $EDITOR {}    # set s3.bucket and s3.region",
                    path.display()
                )
            } else {
                String::new()
            };
            println!(
                "next:{editor}\n  s3-exchange check --write      # credentials, list and upload rights\n  systemctl --user enable --now s3-exchange   # or: s3-exchange run"
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("s3-exchange: {err}");
            exit(err.exit_code())
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
