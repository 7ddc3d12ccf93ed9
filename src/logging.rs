//! Logging: text or JSON to stderr, and JSON lines to a daily file under `log.dir`
//! (tracing-appender, non-blocking, so a slow disk never stalls a transfer).
//!
//! Every transfer ends in exactly one event named `transfer` with the fields
//! `direction`, `key`, `path`, `bytes`, `duration_ms`, `etag`, `outcome` and, on
//! failure, `error`: `jq 'select(.fields.message == "transfer")'` finds them all.

use std::fmt::Display;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::config::{self, LogFormat};
use crate::keys::{ETag, ObjectKey};

/// Keeps the file writer's background thread alive; drop it last (it flushes).
pub struct Guard {
    _file: Option<WorkerGuard>,
}

/// Installs the global subscriber. `RUST_LOG` overrides `log.level`. A log folder that
/// cannot be created costs the file log, not the daemon: stderr says why.
pub fn init(log: &config::Log) -> Guard {
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("warn,s3_exchange={}", log.level)))
    };
    // Under systemd the journal stamps each line itself.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let stderr = match (log.format, journald) {
        (LogFormat::Json, _) => fmt::layer().json().with_writer(std::io::stderr).boxed(),
        (LogFormat::Text, true) => fmt::layer()
            .event_format(JournalPriority(
                fmt::format().without_time().with_ansi(false),
            ))
            .with_writer(std::io::stderr)
            .boxed(),
        (LogFormat::Text, false) => fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (file, guard, file_error) = match file_writer(&log.dir, log.max_files) {
        Ok((writer, guard)) => (
            Some(
                fmt::layer()
                    .json()
                    .with_ansi(false)
                    .with_writer(writer)
                    .with_filter(filter()),
            ),
            Some(guard),
            None,
        ),
        Err(err) => (None, None, Some(err)),
    };
    tracing_subscriber::registry()
        .with(stderr.with_filter(filter()))
        .with(file)
        .init();
    if let Some(err) = file_error {
        tracing::error!(dir = %log.dir.display(), error = %err, "cannot write the log file; logging to stderr only (fix log.dir)");
    }
    Guard { _file: guard }
}

/// A daily file, of which the newest `max_files` are kept (tracing-appender deletes
/// the oldest when it rolls over), so an unattended daemon never fills the disk.
/// Under journald, each line starts with its syslog priority (`<3>` error ... `<7>`
/// debug), which journald strips and records, so `journalctl -p warning` and colouring
/// work (sd-daemon(3)).
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    F: FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority of a tracing level.
fn priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

fn file_writer(
    dir: &Path,
    max_files: usize,
) -> Result<(tracing_appender::non_blocking::NonBlocking, WorkerGuard), Box<dyn std::error::Error>>
{
    std::fs::create_dir_all(dir)?;
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("s3-exchange")
        .filename_suffix("jsonl")
        .max_log_files(max_files)
        .build(dir)?;
    Ok(tracing_appender::non_blocking(appender))
}

#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Upload,
    Download,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

/// An error with its causes, `a: b: c`, each cause left out if the text already holds it:
/// the SDK's errors hide the useful part (a checksum mismatch, the credential provider's
/// complaint) in their sources, and their `Debug` is a dump no reader wants.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// One transfer, from start to its single `transfer` event: [`Transfer::done`] or
/// [`Transfer::failed`] end it, and one dropped without either (its task aborted at the
/// end of a shutdown's or reload's grace, or unwound by a panic) logs it as `abandoned`,
/// so that every transfer a tail of the log saw start also ends there.
pub struct Transfer {
    direction: Direction,
    key: String,
    path: PathBuf,
    started: Instant,
    ended: bool,
}

impl Transfer {
    pub fn start(direction: Direction, key: &ObjectKey, path: &Path) -> Self {
        tracing::debug!(
            target: "s3_exchange::transfer",
            direction = direction.as_str(),
            key = %key,
            path = %path.display(),
            "transfer started"
        );
        Self {
            direction,
            key: key.to_string(),
            path: path.to_owned(),
            started: Instant::now(),
            ended: false,
        }
    }

    fn duration_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The path the file ended at, when it differs from where it started.
    pub fn landed_at(&mut self, path: &Path) {
        path.clone_into(&mut self.path);
    }

    /// Ends the transfer without a `transfer` event: it turned out not to be one (the
    /// object changed or was deleted since the listing), and the caller's line says so.
    pub fn called_off(mut self) {
        self.ended = true;
    }

    pub fn done(mut self, bytes: u64, etag: Option<&ETag>) {
        self.ended = true;
        let path = self.path.display().to_string();
        crate::status::STATS.transfer_done(self.direction.as_str(), &self.key, &path, bytes);
        tracing::info!(
            target: "s3_exchange::transfer",
            direction = self.direction.as_str(),
            key = %self.key,
            path = %path,
            bytes,
            duration_ms = self.duration_ms(),
            etag = etag.map_or("", ETag::as_str),
            outcome = "ok",
            "transfer"
        );
    }

    pub fn failed(mut self, outcome: &str, error: &dyn Display) {
        self.fail(outcome, error, false);
    }

    /// As [`Transfer::failed`], at debug level: for failures while S3 is unreachable,
    /// which the store reports once for all transfers.
    pub fn failed_quietly(mut self, outcome: &str, error: &dyn Display) {
        self.fail(outcome, error, true);
    }

    /// Ends the transfer as `outcome`: counted in the status and logged, at WARN or, when
    /// `quiet`, at DEBUG.
    fn fail(&mut self, outcome: &str, error: &dyn Display, quiet: bool) {
        self.ended = true;
        crate::status::STATS.transfer_failed(
            self.direction.as_str(),
            &self.key,
            &self.path.display().to_string(),
            outcome,
            error.to_string(),
        );
        macro_rules! event {
            ($level:ident) => {
                tracing::$level!(
                    target: "s3_exchange::transfer",
                    direction = self.direction.as_str(),
                    key = %self.key,
                    path = %self.path.display(),
                    bytes = 0u64,
                    duration_ms = self.duration_ms(),
                    etag = "",
                    outcome,
                    error = %error,
                    "transfer"
                )
            };
        }
        if quiet {
            event!(debug);
        } else {
            event!(warn);
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let error = if std::thread::panicking() {
            "its task panicked (a bug: please report it with this log); it is tried again"
        } else {
            "its task was stopped before it ended (the grace of a shutdown or a reload ran out); it is tried again"
        };
        self.fail("abandoned", &error, false);
    }
}
