//! The manual pages, generated from the command line's clap definitions (`src/cli.rs`)
//! with clap_mangen: `s3-exchange.1` and one `s3-exchange-COMMAND.1` per command, which
//! the first one lists. `packaging/build.sh` runs it and puts the pages, gzipped, into
//! the .deb and the .rpm.
//!
//! `cargo run --example manpage [DIR [DATE]]` (default `target/man`, today), then
//! `man -l DIR/s3-exchange.1`. packaging/build.sh passes the date of the last commit,
//! so that the same sources give the same pages.

use std::path::PathBuf;
use std::time::SystemTime;

use clap::CommandFactory;
use clap_mangen::Man;

use s3_exchange::cli::Cli;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map_or_else(|| PathBuf::from("target/man"), PathBuf::from);
    // YYYY-MM-DD. Never empty: an empty date drops out of the .TH line and shifts the
    // footer.
    let date = args.next().unwrap_or_else(|| {
        humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..10].to_owned()
    });
    std::fs::create_dir_all(&dir)?;
    // No `help` command in a manual; build() gives each command its full name
    // (`s3-exchange check`) and the global `--config`.
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let source = format!("s3-exchange {}", env!("CARGO_PKG_VERSION"));
    let commands = cli.get_subcommands().filter(|c| !c.is_hide_set()).cloned();
    for cmd in std::iter::once(cli.clone()).chain(commands) {
        let page = Man::new(cmd)
            .date(date.as_str())
            .source(source.as_str())
            .manual("s3-exchange manual")
            .generate_to(&dir)?;
        println!("{}", page.display());
    }
    Ok(())
}
