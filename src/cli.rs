//! The command line (clap derive). Raw arguments only; `main` turns them into work.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Trade files through an S3 bucket another organisation owns.
///
/// Files dropped into the outbox are uploaded to the outbox prefix (Submissions/) with
/// the canned ACL bucket-owner-full-control, so the owner can read them, then moved to
/// the sent folder. Objects the owner puts under the inbox prefix (Delivery/) appear in
/// the inbox, whole and exactly once.
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
    /// Run the daemon in the foreground until SIGTERM or SIGINT.
    Run,
    /// One pass of both directions (settled outbox files, one poll of the inbox), then
    /// exit: 0 if everything succeeded, 1 if anything failed.
    Sync,
}
