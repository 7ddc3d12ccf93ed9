//! The ledger's one writing thread: every insert, removal and flush of the ledger runs
//! here, in batches. A batch is what queued up while the previous flush ran, and in a
//! burst what comes within [`CommitWindow`]'s few milliseconds more; it is applied and
//! then flushed once, and only then is each writer told its record is durable. That is
//! group commit: a thousand records at once cost a few flushes.
//!
//! Why a thread of its own and not the runtime's blocking pool: sled 0.34 frees replaced
//! pages through epoch-based reclamation, whose garbage is kept per thread and collected
//! only as that thread comes back to the database. Flushes spread over the blocking pool
//! (176 threads during a delivery of 100,000 files) left their garbage on threads that
//! seldom came back: the daemon grew to 170 MiB over such a delivery and still held
//! 130 MiB after it. One writing thread keeps it to what one thread leaves behind.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::group_commit::CommitWindow;

/// The most changes applied before a flush: bounds how long the first writer of a
/// long queue waits for its answer.
const MAX_BATCH: usize = 1024;

/// One change to the ledger.
pub enum Change {
    /// Inserts `bytes` under `key`; a new key adds one to the counter `count`, a key of
    /// the default tree holding a big-endian u64.
    Put {
        tree: sled::Tree,
        key: String,
        bytes: Vec<u8>,
        count: Option<&'static str>,
    },
    Remove {
        tree: sled::Tree,
        key: String,
    },
    /// Changes nothing: resolves once everything written before it is durable.
    Flush,
}

struct Request {
    change: Change,
    done: tokio::sync::oneshot::Sender<Result<(), sled::Error>>,
}

/// The handle of the writing thread; dropping it lets the thread finish its queue and
/// waits for it.
pub struct Writer {
    queue: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(db: sled::Db) -> std::io::Result<Self> {
        let (queue, requests) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || write_batches(&db, &requests))?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Applies `change` and resolves once it is on disk (or failed).
    pub async fn write(&self, change: Change) -> Result<(), sled::Error> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let gone = || sled::Error::Io(std::io::Error::other("the ledger's writer thread ended"));
        self.queue
            .as_ref()
            .ok_or_else(gone)?
            .send(Request { change, done })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // It has nothing left but the queue, which every writer awaited: quick.
            let _ = thread.join();
        }
    }
}

/// The thread's loop: until every sender is gone, take what is queued, apply it, flush
/// once, answer. A change that fails is answered at once and is not flushed for; a
/// failed flush fails every change of its batch.
fn write_batches(db: &sled::Db, requests: &mpsc::Receiver<Request>) {
    let mut window = CommitWindow::default();
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        if let Some(until) = window.open_until(Instant::now()) {
            while batch.len() < MAX_BATCH {
                let Some(wait) = CommitWindow::next_wait(until, Instant::now()) else {
                    break;
                };
                match requests.recv_timeout(wait) {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
        }
        batch.extend(requests.try_iter().take(MAX_BATCH - batch.len()));
        let mut applied = Vec::new();
        for request in batch {
            match apply(db, request.change) {
                Ok(()) => applied.push(request.done),
                Err(err) => {
                    let _ = request.done.send(Err(err));
                }
            }
        }
        if applied.is_empty() {
            continue;
        }
        let flushed = db.flush().map(drop);
        window.synced(Instant::now());
        for done in applied {
            // A writer that stopped waiting (its task cancelled) needs no answer.
            let _ = done.send(flushed.clone());
        }
    }
}

fn apply(db: &sled::Db, change: Change) -> Result<(), sled::Error> {
    match change {
        Change::Put {
            tree,
            key,
            bytes,
            count,
        } => {
            let previous = tree.insert(key, bytes)?;
            if let (None, Some(name)) = (previous, count) {
                db.update_and_fetch(name, |n| {
                    let n = n
                        .and_then(|v| v.try_into().ok())
                        .map_or(0, u64::from_be_bytes);
                    Some((n + 1).to_be_bytes().to_vec())
                })?;
            }
            Ok(())
        }
        Change::Remove { tree, key } => tree.remove(key).map(drop),
        Change::Flush => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_are_applied_counted_and_flushed_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .expect("open");
        let tree = db.open_tree("t").expect("tree");
        let writer = Writer::start(db.clone()).expect("start");
        let put = |key: &str, value: &[u8]| Change::Put {
            tree: tree.clone(),
            key: key.into(),
            bytes: value.to_vec(),
            count: Some("n"),
        };
        writer.write(put("a", b"1")).await.expect("put a");
        // A new value for a known key is not counted again.
        writer.write(put("a", b"2")).await.expect("put a again");
        writer.write(put("b", b"3")).await.expect("put b");
        writer
            .write(Change::Remove {
                tree: tree.clone(),
                key: "b".into(),
            })
            .await
            .expect("remove b");
        writer.write(Change::Flush).await.expect("flush");
        assert_eq!(tree.get("a").expect("get").as_deref(), Some(&b"2"[..]));
        assert_eq!(tree.get("b").expect("get"), None);
        let n = db.get("n").expect("get").expect("counted");
        assert_eq!(u64::from_be_bytes(n.as_ref().try_into().expect("u64")), 2);
    }
}
