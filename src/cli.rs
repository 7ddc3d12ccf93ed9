//! The command line (clap derive). Raw arguments only; `main` turns them into work.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Trade files through an S3 bucket another organisation owns.
///
/// Files dropped into the outbox are uploaded to the outbox prefix (Submissions/) with
/// the canned ACL bucket-owner-full-control, so the owner can read them, then moved to
/// the sent folder. Objects the owner puts under the inbox prefix (Delivery/) appear in
/// the inbox, whole and exactly once.
///
/// Exit codes: 0 success; 1 a command found failures; 3 `status`: the daemon is not
/// running; 73 a folder cannot be created; 74 the ledger cannot be opened or written; 75 another
/// instance holds the ledger; 78 configuration error.
#[derive(Debug, Parser)]
#[command(name = "s3-exchange", version, about, long_about)]
pub struct Cli {
    /// Configuration file [default: ~/.config/s3-exchange/config.toml]
    #[arg(
        long,
        short,
        global = true,
        env = "S3_EXCHANGE_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground until SIGTERM or SIGINT. SIGHUP reloads the
    /// configuration; SIGUSR1 polls the inbox now. Under systemd (Type=notify) it
    /// reports readiness, status and watchdog pings.
    Run,
    /// One pass of both directions (settled outbox files, one poll of the inbox), then
    /// exit: 0 if everything succeeded, 1 if anything failed.
    Sync,
    /// Diagnose the set-up: configuration, credentials and whose they are (STS), a
    /// listing of the inbox prefix; each failure with its likely cause and fix. Exit 0
    /// only when every check passes.
    Check {
        /// Also upload a small probe object under the outbox prefix with the
        /// configured ACL (it stays there: the daemon may not delete).
        #[arg(long)]
        write: bool,
    },
    /// Show what the running daemon is doing: counts, queue, held-back files, last
    /// poll and rescan, last transfers. Works while it runs (it reads the snapshot the
    /// daemon publishes in state.dir). Exit 3 when it is not running.
    Status {
        /// Print the snapshot as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Create a starter configuration from the shipped template (never overwriting an
    /// existing one) and the folders it names.
    Init {
        /// The owner's bucket, written into the new configuration.
        #[arg(long)]
        bucket: Option<String>,
        /// The bucket's region, written into the new configuration.
        #[arg(long)]
        region: Option<String>,
    },
}
