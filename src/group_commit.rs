//! Group commit: one sync (a folder fsync) made durable for every change
//! registered before it started, so a hundred changes at once cost a few syncs instead of
//! a hundred, and nobody waits for a sync that began before their change.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The changes registered so far and how many of them a finished sync covers.
#[derive(Debug, Default)]
pub struct GroupCommit {
    registered: AtomicU64,
    covered: AtomicU64,
    /// Syncs run one at a time: a waiter whose change the sync before it covered skips
    /// its own. (Concurrent `flush_async` calls also hang sled 0.34.)
    turn: tokio::sync::Mutex<()>,
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
        let _turn = self.turn.lock().await;
        if self.covered.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        let covers = self.registered.load(Ordering::SeqCst);
        sync().await?;
        self.covered.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
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
