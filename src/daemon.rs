//! Wires the workers together: folders, ledger, S3 client, the outbox and inbox
//! workers, signals and shutdown.
//!
//! Shutdown is a `CancellationToken`: SIGTERM or SIGINT cancels it, the workers start
//! nothing new, let what is in flight finish within `transfer.shutdown_grace`, and the
//! ledger is flushed before `run` returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inbox::{self, Inbox};
use crate::ledger::{self, Ledger};
use crate::localfs::InboxRoot;
use crate::outbox::{self, Outbox};
use crate::store::{self, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
    #[error(transparent)]
    Store(#[from] store::SetupError),
    #[error("cannot create or open {what} {path}: {source}")]
    Folder {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

impl Error {
    /// sysexits-style codes, so that a service manager (and a human) can tell
    /// "another instance holds the ledger" (75, EX_TEMPFAIL) from a broken set-up.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Ledger(ledger::Error::Locked { .. }) => 75,
            Error::Ledger(_) => 74,
            Error::Folder { .. } => 73,
            Error::Store(_) => crate::config::EXIT_CONFIG,
            Error::Signals(_) => 71,
        }
    }
}

/// What a run or a `sync` pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub outbox: outbox::Totals,
    pub inbox: inbox::Totals,
}

impl Summary {
    pub fn failures(&self) -> u64 {
        self.outbox.failed + self.inbox.failed + self.inbox.rejected
    }
}

/// The daemon, set up and ready to run.
pub struct Daemon {
    outbox: Arc<Outbox>,
    inbox: Arc<Inbox>,
    ledger: Arc<Ledger>,
}

impl Daemon {
    /// Creates the folders, opens the ledger (refusing if another instance holds it) and
    /// builds the S3 client. Nothing is sent or fetched yet.
    pub async fn start(config: &Config) -> Result<Self, Error> {
        for (what, dir) in [
            ("the outbox", &config.outbox.dir),
            ("the state folder", &config.state_dir),
        ] {
            create_dir(what, dir)?;
        }
        if config.outbox.after_upload == crate::config::AfterUpload::Move {
            create_dir("the sent folder", &config.outbox.sent_dir)?;
        }
        let root = InboxRoot::open(&config.inbox.dir).map_err(|source| Error::Folder {
            what: "the inbox",
            path: config.inbox.dir.clone(),
            source,
        })?;
        let ledger = Arc::new(Ledger::open(&config.state_dir)?);
        let store = Store::connect(&config.s3, &config.transfer).await?;
        let (sent, received) = ledger.counts();
        tracing::info!(
            config = %config.source.display(),
            bucket = %config.s3.bucket,
            outbox = %config.outbox.dir.display(),
            inbox = %config.inbox.dir.display(),
            ledger_sent = sent,
            ledger_received = received,
            "s3-exchange started"
        );
        Ok(Self {
            outbox: Arc::new(Outbox {
                config: config.outbox.clone(),
                transfer: config.transfer.clone(),
                store: store.clone(),
                ledger: Arc::clone(&ledger),
                parts_denied: Default::default(),
            }),
            inbox: Arc::new(Inbox {
                config: config.inbox.clone(),
                transfer: config.transfer.clone(),
                store,
                ledger: Arc::clone(&ledger),
                root,
            }),
            ledger,
        })
    }

    /// Runs both workers until `shutdown`, then flushes the ledger.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Summary, Error> {
        let outbox = tokio::spawn(Arc::clone(&self.outbox).run(shutdown.clone()));
        let inbox = tokio::spawn(Arc::clone(&self.inbox).run(shutdown.clone()));
        let summary = Summary {
            outbox: outbox.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "the outbox worker failed");
                outbox::Totals::default()
            }),
            inbox: inbox.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "the inbox worker failed");
                inbox::Totals::default()
            }),
        };
        self.finish(summary).await
    }

    /// One pass of both directions, for `sync`.
    pub async fn sync(self, shutdown: CancellationToken) -> Result<Summary, Error> {
        let outbox = tokio::spawn(Arc::clone(&self.outbox).run_once(shutdown.clone()));
        let inbox = {
            let inbox = Arc::clone(&self.inbox);
            let shutdown = shutdown.clone();
            tokio::spawn(async move { inbox.poll(&shutdown).await.0 })
        };
        let summary = Summary {
            outbox: outbox.await.unwrap_or_default(),
            inbox: inbox.await.unwrap_or_default(),
        };
        self.finish(summary).await
    }

    async fn finish(self, summary: Summary) -> Result<Summary, Error> {
        self.ledger.flush().await?;
        tracing::info!(
            sent = summary.outbox.sent,
            received = summary.inbox.received,
            failed = summary.failures(),
            "s3-exchange stopped"
        );
        Ok(summary)
    }
}

fn create_dir(what: &'static str, path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Folder {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT. SIGHUP re-reads `config_path` and reports
/// whether it is valid; changes take effect at the next start.
pub fn handle_signals(
    shutdown: CancellationToken,
    config_path: PathBuf,
    current: Config,
) -> Result<(), Error> {
    let mut signals =
        signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(Error::Signals)?;
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => match Config::load(&config_path) {
                    Ok(new) if new == current => {
                        tracing::info!(config = %config_path.display(), "SIGHUP: configuration unchanged")
                    }
                    Ok(_) => tracing::warn!(
                        config = %config_path.display(),
                        "SIGHUP: the new configuration is valid; restart the daemon to apply it"
                    ),
                    Err(err) => tracing::error!(
                        error = %err,
                        "SIGHUP: the new configuration is invalid; keeping the running one"
                    ),
                },
                _ => {
                    if shutdown.is_cancelled() {
                        tracing::warn!(
                            "second stop signal: still waiting for transfers in flight (the grace period bounds it)"
                        );
                    } else {
                        tracing::info!(signal, "stopping: finishing transfers in flight");
                        shutdown.cancel();
                    }
                }
            }
        }
    });
    Ok(())
}
