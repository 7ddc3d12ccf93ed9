//! notify -> tokio bridge for the outbox. Events are hints, never the truth: the
//! outbox worker stats every path it is told about, and the start-up scan, the
//! periodic rescan and the rescan after an overflow are what guarantee nothing is
//! missed.
//!
//! notify calls us on its only thread, so the callback never blocks: it `try_send`s
//! into a bounded channel, and when that is full it raises one "rescan" flag instead
//! of queueing more (memory stays bounded however many files arrive at once).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::{Notify, mpsc};

/// How many path hints may wait; beyond this the worker rescans instead.
const QUEUE: usize = 4096;

/// Keeps the OS watch alive; dropping it stops the hints.
pub struct Watcher {
    _inner: RecommendedWatcher,
}

/// The receiving end of the path hints, owned by the outbox worker.
pub type Hints = mpsc::Receiver<PathBuf>;

/// Raised when a full rescan is needed (overflow, lost events, watch errors).
#[derive(Default)]
pub struct Rescan {
    wanted: AtomicBool,
    notify: Notify,
}

impl Rescan {
    /// Raises the flag. An overflow is counted (and a full queue logged) once per episode,
    /// from the first lost hint until the worker lowers the flag, not once per lost hint.
    fn request(&self, queue_full: bool) {
        if !self.wanted.swap(true, Ordering::SeqCst) {
            crate::status::STATS.watcher_overflow();
            if queue_full {
                tracing::info!(
                    capacity = QUEUE,
                    "the watcher's queue is full: the outbox is walked instead"
                );
            }
        }
        self.notify.notify_one();
    }
}

impl Rescan {
    /// Resolves when a full rescan is needed, and lowers the flag.
    pub async fn needed(&self) {
        loop {
            if self.wanted.swap(false, Ordering::SeqCst) {
                return;
            }
            self.notify.notified().await;
        }
    }
}

/// Watches `dir` recursively.
pub fn watch(dir: &Path) -> Result<(Watcher, Hints, Arc<Rescan>), notify::Error> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let rescan = Arc::new(Rescan::default());
    let flag = Arc::clone(&rescan);
    let mut inner = RecommendedWatcher::new(
        move |res: notify::Result<notify::Event>| match res {
            Ok(event) if event.need_rescan() => {
                tracing::warn!("the watcher lost events (queue overflow): rescanning the outbox");
                flag.request(false);
            }
            Ok(event) if is_interesting(&event.kind) => {
                for path in event.paths {
                    // A sent file being taken away (see `crate::claim`): nothing to send.
                    if path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| crate::claim::claimed_from(n).is_some())
                    {
                        continue;
                    }
                    if tx.try_send(path).is_err() {
                        flag.request(true);
                        break;
                    }
                }
            }
            Ok(_) => {}
            Err(err) => {
                report_error(&err);
                flag.request(false);
            }
        },
        // Never follow symlinks: a link to a folder outside the outbox must not be
        // watched (and its files sent and moved away).
        notify::Config::default().with_follow_symlinks(false),
    )?;
    inner
        .watch(dir, RecursiveMode::Recursive)
        .inspect_err(report_error)?;
    Ok((Watcher { _inner: inner }, rx, rescan))
}

/// Creation, writes finished, renames in: what can make a file ready to send.
///
/// Not a rename's "from" side: that path no longer holds the file, and every file the
/// daemon moves into the sent folder raises one, so hinting it would cost a wake-up and
/// a stat per upload for nothing (a pending file that is renamed away is dropped when
/// the worker next stats it).
fn is_interesting(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(
                ModifyKind::Data(_)
                    | ModifyKind::Name(
                        RenameMode::To | RenameMode::Both | RenameMode::Any | RenameMode::Other
                    )
                    | ModifyKind::Any
                    | ModifyKind::Metadata(_)
            )
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Any
    )
}

fn report_error(err: &notify::Error) {
    if matches!(err.kind, notify::ErrorKind::MaxFilesWatch) {
        tracing::error!(
            error = %err,
            "out of inotify watches: new folders in the outbox are found only by the periodic rescan; raise the limit with `sysctl fs.inotify.max_user_watches=524288` (and persist it in /etc/sysctl.d/)"
        );
    } else {
        tracing::warn!(error = %err, "outbox watcher error: rescanning");
    }
}
