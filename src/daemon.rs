//! Wires the workers together: folders, ledger, S3 client, the outbox and inbox
//! workers, signals, shutdown, reload, and what the service manager and `status` see.
//!
//! Shutdown is a `CancellationToken`: SIGTERM or SIGINT cancels it, the workers start
//! nothing new, let what is in flight finish within `transfer.shutdown_grace`, and the
//! ledger is flushed before `run` returns.
//!
//! Reload (SIGHUP) re-reads the configuration file. An invalid file is reported loudly
//! and the running configuration stays. A valid, changed one is applied the simplest
//! correct way: the workers of the old configuration wind down exactly as on shutdown
//! (in-flight transfers finish within the grace period), and new workers start with the
//! new one, in the same process and on the same ledger handle (sled can be opened only
//! once per process, so the ledger stays open across reloads).
//!
//! Under systemd (`Type=notify`), the daemon says READY=1 once the configuration, the
//! ledger, the client and credentials, and the outbox watcher (with its first scan) are
//! up; RELOADING=1 / READY=1 around a reload; STOPPING=1 on shutdown; a one-line
//! STATUS=; and WATCHDOG=1 at half of `WatchdogSec=`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inbox::{self, Inbox};
use crate::ledger::{self, Ledger};
use crate::localfs::InboxRoot;
use crate::outbox::{self, Outbox};
use crate::sdnotify::{self, Notifier};
use crate::status::{self, Phase, STATS, Snapshot};
use crate::store::{self, Store};

/// The status snapshot is rewritten on a change, at most every `PUBLISH_DELAY` (changes
/// in between are gathered into one write), and at the latest every `PUBLISH_EVERY`, so that
/// `status` can tell a live daemon from a stuck one. Between changes the publisher
/// sleeps: an idle daemon wakes twice a minute, not twice a second.
const PUBLISH_DELAY: Duration = Duration::from_millis(500);
const PUBLISH_EVERY: Duration = Duration::from_secs(30);
/// READY=1 waits at most this long for the outbox's first scan.
const READY_WAIT: Duration = Duration::from_secs(60);

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

    fn add(&mut self, outbox: outbox::Totals, inbox: inbox::Totals) {
        self.outbox.sent += outbox.sent;
        self.outbox.failed += outbox.failed;
        self.inbox += inbox;
    }
}

/// Requests that signals pass to the run loop: reload (SIGHUP) and poll now (SIGUSR1).
/// Several signals before the loop looks count once.
#[derive(Clone, Default)]
pub struct Control {
    reload: Arc<Notify>,
    poll_now: Arc<Notify>,
}

impl Control {
    /// Asks the run loop to re-read the configuration (what SIGHUP does).
    pub fn reload(&self) {
        self.reload.notify_one();
    }

    /// Asks the inbox worker to poll now (what SIGUSR1 does).
    pub fn poll_now(&self) {
        self.poll_now.notify_one();
    }
}

/// The two workers of one configuration.
struct Workers {
    outbox: Arc<Outbox>,
    inbox: Arc<Inbox>,
}

/// The daemon, set up and ready to run.
pub struct Daemon {
    config: Config,
    ledger: Arc<Ledger>,
    workers: Workers,
    notifier: Notifier,
    identity: status::Identity,
}

impl Daemon {
    /// Creates the folders, opens the ledger (refusing if another instance holds it),
    /// builds the S3 client and resolves the credentials. Nothing is sent or fetched yet.
    pub async fn start(config: &Config) -> Result<Self, Error> {
        let notifier = Notifier::from_env();
        notifier.status("starting");
        create_dir("the state folder", &config.state_dir)?;
        let ledger = Arc::new(Ledger::open(&config.state_dir)?);
        let workers = Workers::new(config, &ledger).await?;
        // The SDK resolves credentials lazily, at the first call; resolving them now
        // puts a missing or expired login into the start-up log, not the first failed
        // poll. Not fatal: an SSO session renewed later makes the daemon work again.
        match crate::check::credentials(config).await {
            Ok((_, found)) => tracing::info!(credentials = %found, "credentials resolved"),
            Err(crate::check::Outcome::Fail { what, hint }) => tracing::error!(
                error = %what,
                hint = hint.as_deref().unwrap_or(""),
                "no usable credentials yet: every S3 call will fail until this is fixed (s3-exchange check explains)"
            ),
            Err(_) => {}
        }
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
        let identity = status::Identity {
            started_at_ms: status::now_ms(),
            config: config.source.display().to_string(),
            bucket: config.s3.bucket.clone(),
            outbox: config.outbox.dir.display().to_string(),
            inbox: config.inbox.dir.display().to_string(),
            ledger_sent_at_start: sent,
            ledger_received_at_start: received,
        };
        Ok(Self {
            config: config.clone(),
            ledger,
            workers,
            notifier,
            identity,
        })
    }

    /// Runs the workers until `shutdown`, restarting them with a new configuration
    /// when `control` asks for a reload; then flushes the ledger.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        control: Control,
    ) -> Result<Summary, Error> {
        let Daemon {
            mut config,
            ledger,
            mut workers,
            notifier,
            mut identity,
        } = self;
        let (phase_tx, phase_rx) = watch::channel(Published {
            phase: Phase::Starting,
            reloads: 0,
            identity: identity.clone(),
        });
        let services = CancellationToken::new();
        let publisher = tokio::spawn(publish(
            config.state_dir.clone(),
            notifier.clone(),
            phase_rx,
            services.clone(),
        ));
        if let Some(every) = sdnotify::watchdog_interval().filter(|_| notifier.enabled()) {
            tokio::spawn(watchdog(notifier.clone(), every, services.clone()));
        }
        if let Some(addr) = config.metrics.listen {
            match crate::metrics::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(listen = %addr, "serving Prometheus metrics at /metrics");
                    tokio::spawn(crate::metrics::serve(
                        listener,
                        identity.started_at_ms,
                        services.clone(),
                    ));
                }
                Err(err) => tracing::error!(
                    listen = %addr,
                    error = %err,
                    "cannot serve metrics (is the port taken?); running without them (fix metrics.listen)"
                ),
            }
        }

        let mut summary = Summary::default();
        let mut reloads = 0u64;
        loop {
            let generation = shutdown.child_token();
            let scans_before = STATS.counters().rescans;
            let outbox_task = tokio::spawn(Arc::clone(&workers.outbox).run(generation.clone()));
            let inbox_task = tokio::spawn(Arc::clone(&workers.inbox).run(generation.clone()));
            wait_for_first_scan(scans_before, &shutdown).await;
            phase_tx.send_replace(Published {
                phase: Phase::Running,
                reloads,
                identity: identity.clone(),
            });
            let line = Snapshot::now(&identity, Phase::Running, reloads).summary();
            notifier.send(&format!("READY=1\nSTATUS={line}"));

            let next = loop {
                tokio::select! {
                    () = shutdown.cancelled() => break None,
                    () = ledger.broken() => {
                        if let Some(err) = ledger.failure() {
                            tracing::error!(error = %err, "the ledger cannot be written: stopping");
                        }
                        break None;
                    }
                    () = control.poll_now.notified() => workers.inbox.poll_now.notify_one(),
                    () = control.reload.notified() => {
                        if let Some(new) = reread(&config) {
                            break Some(new);
                        }
                        let line = Snapshot::now(&identity, Phase::Running, reloads).summary();
                        notifier.status(&line);
                    }
                }
            };
            let phase = if next.is_some() {
                notifier.send("RELOADING=1\nSTATUS=reloading: finishing transfers in flight");
                Phase::Reloading
            } else {
                notifier.send("STOPPING=1\nSTATUS=stopping: finishing transfers in flight");
                Phase::Stopping
            };
            phase_tx.send_replace(Published {
                phase,
                reloads,
                identity: identity.clone(),
            });
            generation.cancel();
            let (out, inn) = join(outbox_task, inbox_task).await;
            summary.add(out, inn);
            let Some(new) = next else { break };
            match Workers::new(&new, &ledger).await {
                Ok(fresh) => {
                    workers = fresh;
                    config = new;
                    reloads += 1;
                    identity.bucket = config.s3.bucket.clone();
                    identity.outbox = config.outbox.dir.display().to_string();
                    identity.inbox = config.inbox.dir.display().to_string();
                    STATS.workers_restarted();
                    tracing::info!(config = %config.source.display(), reloads, "configuration reloaded and applied");
                }
                Err(err) => tracing::error!(
                    error = %err,
                    "cannot apply the new configuration; carrying on with the running one"
                ),
            }
        }
        services.cancel();
        let _ = publisher.await;
        let result = match ledger.failure() {
            // Not a clean stop: exit non-zero so that a service manager restarts it.
            Some(err) => Err(err.into()),
            None => finish(&ledger, summary).await,
        };
        let last = Snapshot::now(&identity, Phase::Stopped, reloads);
        if let Err(err) = last.write(&config.state_dir) {
            tracing::warn!(error = %err, "cannot write the final status snapshot");
        }
        result
    }

    /// One pass of both directions, for `sync`.
    pub async fn sync(self, shutdown: CancellationToken) -> Result<Summary, Error> {
        // A ledger that cannot be written ends the pass at once, as it ends a run.
        let shutdown = shutdown.child_token();
        let watch = {
            let (ledger, shutdown) = (Arc::clone(&self.ledger), shutdown.clone());
            tokio::spawn(async move {
                ledger.broken().await;
                shutdown.cancel();
            })
        };
        let outbox = tokio::spawn(Arc::clone(&self.workers.outbox).run_once(shutdown.clone()));
        let inbox = {
            let inbox = Arc::clone(&self.workers.inbox);
            let shutdown = shutdown.clone();
            tokio::spawn(async move { inbox.poll(&shutdown).await.0 })
        };
        let summary = Summary {
            outbox: outbox.await.unwrap_or_default(),
            inbox: inbox.await.unwrap_or_default(),
        };
        watch.abort();
        match self.ledger.failure() {
            Some(err) => Err(err.into()),
            None => finish(&self.ledger, summary).await,
        }
    }
}

impl Workers {
    /// Folders, the inbox root and the S3 client for `config`, on the shared ledger.
    async fn new(config: &Config, ledger: &Arc<Ledger>) -> Result<Self, Error> {
        create_dir("the outbox", &config.outbox.dir)?;
        if config.outbox.after_upload == crate::config::AfterUpload::Move {
            create_dir("the sent folder", &config.outbox.sent_dir)?;
        }
        let root = InboxRoot::open(&config.inbox.dir).map_err(|source| Error::Folder {
            what: "the inbox",
            path: config.inbox.dir.clone(),
            source,
        })?;
        let store = Store::connect(&config.s3, &config.transfer).await?;
        Ok(Self {
            outbox: Arc::new(Outbox {
                config: config.outbox.clone(),
                transfer: config.transfer.clone(),
                store: store.clone(),
                ledger: Arc::clone(ledger),
                parts_denied: Default::default(),
                part_slots: Semaphore::new(crate::upload::PARTS_IN_FLIGHT_TOTAL),
                folder_syncs: crate::group_commit::FolderSyncs::default(),
                started_over: Default::default(),
            }),
            inbox: Arc::new(Inbox {
                config: config.inbox.clone(),
                transfer: config.transfer.clone(),
                store,
                ledger: Arc::clone(ledger),
                root: Arc::new(root),
                poll_now: Default::default(),
                range_slots: Semaphore::new(crate::inbox::RANGES_IN_FLIGHT_TOTAL),
                folder_syncs: crate::group_commit::FolderSyncs::default(),
            }),
        })
    }
}

/// Reads the configuration file again. `Some` is a valid, changed configuration to
/// apply; `None` means keep the running one (unchanged, or invalid: said loudly).
fn reread(current: &Config) -> Option<Config> {
    let path = &current.source;
    let mut new = match Config::load(path) {
        Ok(new) => new,
        Err(err) => {
            tracing::error!(
                config = %path.display(),
                error = %err,
                "SIGHUP: the new configuration is INVALID; keeping the running one (fix the file and reload again)"
            );
            return None;
        }
    };
    // What lives as long as the process cannot change with a reload: the ledger (sled
    // can be opened once per process), the log writers and the metrics socket.
    let mut kept = Vec::new();
    if new.state_dir != current.state_dir {
        kept.push("state.dir");
        new.state_dir.clone_from(&current.state_dir);
    }
    if new.log != current.log {
        kept.push("log");
        new.log = current.log.clone();
    }
    if new.metrics != current.metrics {
        kept.push("metrics");
        new.metrics = current.metrics.clone();
    }
    if !kept.is_empty() {
        tracing::warn!(
            settings = %kept.join(", "),
            "SIGHUP: these settings take effect only at the next restart; the rest is applied now"
        );
    }
    if new == *current {
        tracing::info!(config = %path.display(), "SIGHUP: configuration unchanged");
        return None;
    }
    tracing::info!(config = %path.display(), "SIGHUP: applying the new configuration once transfers in flight finish");
    Some(new)
}

/// Waits until the outbox worker finished its first scan (its watcher is set up
/// before it), so that READY=1 means files dropped from now on are seen.
async fn wait_for_first_scan(before: u64, shutdown: &CancellationToken) {
    tokio::select! {
        () = STATS.scanned_beyond(before) => {}
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(READY_WAIT) => tracing::warn!(
            waited_s = READY_WAIT.as_secs(),
            "the first scan of the outbox is still running; reporting ready anyway"
        ),
    }
}

async fn join(
    outbox: JoinHandle<outbox::Totals>,
    inbox: JoinHandle<inbox::Totals>,
) -> (outbox::Totals, inbox::Totals) {
    let out = outbox.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "the outbox worker failed");
        outbox::Totals::default()
    });
    let inn = inbox.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "the inbox worker failed");
        inbox::Totals::default()
    });
    (out, inn)
}

async fn finish(ledger: &Ledger, summary: Summary) -> Result<Summary, Error> {
    ledger.flush().await?;
    tracing::info!(
        sent = summary.outbox.sent,
        received = summary.inbox.received,
        failed = summary.failures(),
        "s3-exchange stopped"
    );
    Ok(summary)
}

/// What the run loop tells the publisher.
#[derive(Clone)]
struct Published {
    phase: Phase,
    reloads: u64,
    identity: status::Identity,
}

/// Rewrites `status.json` soon after every change and every `PUBLISH_EVERY` regardless,
/// and keeps systemd's STATUS= line current.
async fn publish(
    dir: PathBuf,
    notifier: Notifier,
    mut phase: watch::Receiver<Published>,
    stop: CancellationToken,
) {
    let mut last_line = String::new();
    let mut failing = false;
    let mut written = None;
    loop {
        if let Some(written) = written {
            let counters_changed = tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PUBLISH_EVERY) => false,
                () = STATS.next_change() => true,
                // A new phase (reloading, stopping) is shown at once.
                changed = phase.changed() => if changed.is_err() { return } else { false },
            };
            if counters_changed {
                // A change after a quiet spell is written at once; a burst of them at
                // most every PUBLISH_DELAY.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(written + PUBLISH_DELAY) => {}
                }
            }
        }
        written = Some(tokio::time::Instant::now());
        let Published {
            phase: current,
            reloads,
            identity,
        } = phase.borrow_and_update().clone();
        let snapshot = Snapshot::now(&identity, current, reloads);
        match snapshot.write(&dir) {
            Ok(()) => failing = false,
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(error = %err, "cannot publish the status snapshot; `s3-exchange status` will show stale data");
            }
            Err(_) => {}
        }
        let line = snapshot.summary();
        if line != last_line && current == Phase::Running {
            notifier.status(&line);
            last_line = line;
        }
    }
}

/// WATCHDOG=1 every `every` until `stop`; from the same runtime as the workers, so a
/// wedged runtime stops the pings and systemd restarts the daemon.
async fn watchdog(notifier: Notifier, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => notifier.send("WATCHDOG=1"),
        }
    }
}

fn create_dir(what: &'static str, path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Folder {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT; SIGHUP asks for a reload and SIGUSR1 for
/// an immediate poll, through the returned [`Control`].
pub fn handle_signals(shutdown: CancellationToken) -> Result<Control, Error> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(Error::Signals)?;
    let control = Control::default();
    let handle = control.clone();
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => {
                    tracing::info!("SIGHUP: re-reading the configuration");
                    handle.reload();
                }
                SIGUSR1 => handle.poll_now(),
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
    Ok(control)
}
