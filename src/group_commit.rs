//! Group commit: one sync (a folder fsync) made durable for every change
//! registered before it started, so a hundred changes at once cost a few syncs instead of
//! a hundred, and nobody waits for a sync that began before their change.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest a sync in a burst waits for more changes to join it.
const COMMIT_WINDOW: Duration = Duration::from_millis(20);

/// A sync in a burst stops waiting once no change came for this long: the last changes
/// of a burst are not held for the whole window.
const QUIET: Duration = Duration::from_millis(2);

/// A sync that follows the previous one by less than this is part of a burst.
const BURST_GAP: Duration = Duration::from_millis(50);

/// The commit delay of group commit (PostgreSQL's `commit_delay`): when syncs follow one
/// another closely, the next one waits while changes keep coming (until [`QUIET`] passes
/// without one, at most [`COMMIT_WINDOW`]) so that they join it; a change after a quiet
/// spell is synced at once.
///
/// Why: without it a sync covers only what queued while the previous one ran. 1,000
/// uploads finishing over a second came to ~570 ledger flushes and a few hundred fsyncs
/// of the sent folder, each a journal commit: their CPU, and the Ceph OSD's extra work
/// behind them, made the daemon 1.05x slower than s5cmd on 1,000 x 4 KiB (issue 8).
#[derive(Debug, Default)]
pub struct CommitWindow {
    last_sync: Option<Instant>,
}

impl CommitWindow {
    /// Until when a sync about to start at `now` may wait for more changes: `None` after
    /// a quiet spell.
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        let at = self.last_sync?;
        (now.saturating_duration_since(at) < BURST_GAP).then(|| now + COMMIT_WINDOW)
    }

    /// How long to wait for the next change at `now`: [`QUIET`], never past `until`;
    /// `None` once the window is closed.
    pub fn next_wait(until: Instant, now: Instant) -> Option<Duration> {
        let left = until.saturating_duration_since(now);
        (!left.is_zero()).then(|| left.min(QUIET))
    }

    /// Notes a sync that ended at `at` (failed or not: either way the disk was busy).
    pub fn synced(&mut self, at: Instant) {
        self.last_sync = Some(at);
    }
}

/// The changes registered so far and how many of them a finished sync covers.
#[derive(Debug, Default)]
pub struct GroupCommit {
    registered: AtomicU64,
    covered: AtomicU64,
    /// Syncs run one at a time: a waiter whose change the sync before it covered skips
    /// its own. (Concurrent `flush_async` calls also hang sled 0.34.) The turn holds
    /// the window: a sync waiting in it keeps the turn, and those queued behind find
    /// themselves covered.
    turn: tokio::sync::Mutex<CommitWindow>,
}

impl GroupCommit {
    /// Registers a change that is complete now; the ticket says which sync covers it.
    pub fn register(&self) -> u64 {
        self.registered.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Resolves once a sync that started after the change with `ticket` succeeded:
    /// runs `sync` unless one already did. A failed sync covers nothing: the next
    /// waiter tries its own.
    pub async fn sync_through<E, Fut>(
        &self,
        ticket: u64,
        sync: impl FnOnce() -> Fut,
    ) -> Result<(), E>
    where
        Fut: Future<Output = Result<(), E>>,
    {
        let mut window = self.turn.lock().await;
        if self.covered.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        if let Some(until) = window.open_until(now()) {
            let mut seen = self.registered.load(Ordering::SeqCst);
            while let Some(wait) = CommitWindow::next_wait(until, now()) {
                tokio::time::sleep(wait).await;
                let latest = self.registered.load(Ordering::SeqCst);
                if latest == seen {
                    break;
                }
                seen = latest;
            }
        }
        let covers = self.registered.load(Ordering::SeqCst);
        let synced = sync().await;
        window.synced(now());
        synced?;
        self.covered.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
}

/// The runtime's clock, which tests can pause and advance.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A group commit per folder for the fsync that makes renames into it durable: 1,000
/// files moved into `sent/batch/` (or landing in one inbox folder) at once cost a few
/// hundred fsyncs of that folder, not 1,000 (each one a journal commit).
///
/// Folders are told apart by identity (device and inode of the open handle the rename
/// went through), not by path: a folder renamed meanwhile is still the one synced, and
/// the inbox is never reached by a path that could pass through a planted symlink.
#[derive(Debug, Default)]
pub struct FolderSyncs {
    /// Only folders with a sync asked for or running: an entry goes with its last waiter.
    folders: Mutex<HashMap<(u64, u64), Arc<GroupCommit>>>,
}

impl FolderSyncs {
    /// Makes every rename into the folder `dir` (an open handle on it) that completed
    /// before this call durable.
    pub async fn sync(&self, dir: OwnedFd) -> std::io::Result<()> {
        let st = rustix::fs::fstat(&dir)?;
        let id = (st.st_dev, st.st_ino);
        let commit = {
            let mut folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(folders.entry(id).or_default())
        };
        let ticket = commit.register();
        let result = commit
            .sync_through(ticket, || async move {
                tokio::task::spawn_blocking(move || rustix::fs::fsync(&dir))
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::from)
            })
            .await;
        let mut folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and this one: nobody else waits on this folder.
        if Arc::strong_count(&commit) == 2 {
            folders.remove(&id);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn a_sync_covers_every_change_registered_before_it_began() {
        let commit = GroupCommit::default();
        let syncs = AtomicUsize::new(0);
        let sync = || async {
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok::<(), ()>(())
        };
        let tickets: Vec<u64> = (0..5).map(|_| commit.register()).collect();
        for ticket in tickets {
            commit.sync_through(ticket, sync).await.unwrap();
        }
        assert_eq!(syncs.load(Ordering::SeqCst), 1, "one sync for five changes");
        let later = commit.register();
        commit.sync_through(later, sync).await.unwrap();
        assert_eq!(
            syncs.load(Ordering::SeqCst),
            2,
            "a later change needs its own"
        );
    }

    #[test]
    fn only_a_sync_soon_after_another_waits_and_never_past_the_window() {
        let mut window = CommitWindow::default();
        let t0 = Instant::now();
        assert_eq!(window.open_until(t0), None, "the first sync");
        window.synced(t0);
        let at = t0 + Duration::from_millis(1);
        let until = window
            .open_until(at)
            .expect("a sync soon after another waits");
        assert_eq!(until, at + COMMIT_WINDOW);
        assert_eq!(CommitWindow::next_wait(until, at), Some(QUIET));
        assert_eq!(
            CommitWindow::next_wait(until, until - Duration::from_millis(1)),
            Some(Duration::from_millis(1)),
            "never past the window"
        );
        assert_eq!(CommitWindow::next_wait(until, until), None);
        assert_eq!(
            window.open_until(t0 + BURST_GAP),
            None,
            "after a quiet spell"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_burst_a_change_made_during_the_window_joins_its_sync() {
        let commit = Arc::new(GroupCommit::default());
        let syncs = Arc::new(AtomicUsize::new(0));
        let sync = {
            let syncs = Arc::clone(&syncs);
            move || {
                let syncs = Arc::clone(&syncs);
                async move {
                    syncs.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), ()>(())
                }
            }
        };
        let first = commit.register();
        let started = tokio::time::Instant::now();
        commit.sync_through(first, sync.clone()).await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "after a quiet spell, at once"
        );

        let second = commit.register();
        let waiting = tokio::spawn({
            let (commit, sync) = (Arc::clone(&commit), sync.clone());
            async move { commit.sync_through(second, sync).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let third = commit.register();
        commit.sync_through(third, sync.clone()).await.unwrap();
        waiting.await.unwrap().unwrap();
        assert_eq!(
            syncs.load(Ordering::SeqCst),
            2,
            "the second and third changes share one sync"
        );

        // The burst's last change: its sync waits one quiet spell, not the whole window.
        let last = commit.register();
        let started = tokio::time::Instant::now();
        commit.sync_through(last, sync).await.unwrap();
        assert_eq!(started.elapsed(), QUIET);
        assert_eq!(syncs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_sync_covers_nothing() {
        let commit = GroupCommit::default();
        let first = commit.register();
        let second = commit.register();
        assert!(
            commit
                .sync_through(first, || async { Err("EIO") })
                .await
                .is_err()
        );
        let mut ran = false;
        commit
            .sync_through(second, || async {
                ran = true;
                Ok::<(), ()>(())
            })
            .await
            .unwrap();
        assert!(ran, "the change before the failed sync was synced again");
    }

    #[tokio::test]
    async fn folder_syncs_leave_no_entry_behind() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            rustix::fs::open(
                dir.path(),
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
                rustix::fs::Mode::empty(),
            )
            .unwrap()
        };
        let syncs = FolderSyncs::default();
        let (a, b) = tokio::join!(syncs.sync(open()), syncs.sync(open()));
        a.unwrap();
        b.unwrap();
        assert!(syncs.folders.lock().unwrap().is_empty());
    }
}
