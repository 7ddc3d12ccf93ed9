//! The ledger: what was sent and what was received, in a sled database under
//! `state.dir`. The only module that knows sled.
//!
//! The ledger, not the inbox, decides what is fetched: a key whose change token is
//! recorded is never downloaded again, wherever the user moved the file. Records are
//! flushed to disk before the action that depends on them (moving an outbox file away,
//! reporting a delivery done). sled's own timer (an fsync every 500 ms) is turned off:
//! every write here is flushed explicitly, and an idle daemon must not touch the disk.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

mod writer;

use crate::keys::{ChangeToken, ETag, ObjectKey};
use crate::plan::{Delivered, FileStamp};
use writer::{Change, Writer};

/// The layout version written into new ledgers; a newer one is refused, never rewritten.
const SCHEMA: u32 = 1;
/// sled's page cache defaults to 1 GiB. A poll reads every record once, so a big cache
/// only holds on to memory: 1 MiB keeps an idle daemon with 100,000 records near 30 MiB.
const CACHE_BYTES: u64 = 1 << 20;
/// Keys in the default tree of the number of records in `sent` and `received`, kept as
/// records are added: counting by iterating pages the whole tree into memory for good
/// (sled evicts only what `get` touched), 35 MiB for 100,000 records. A crash between
/// a record and its count leaves the count one short: it is shown, never relied on.
const SENT_COUNT: &str = "count:sent";
const RECEIVED_COUNT: &str = "count:received";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the ledger {path} is in use by another process: is s3-exchange already running with this state.dir? Stop it first"
    )]
    Locked { path: PathBuf },
    #[error(
        "the ledger {path} was written by a newer s3-exchange (schema {found}, this one knows {SCHEMA}): upgrade s3-exchange"
    )]
    NewerSchema { path: PathBuf, found: u32 },
    #[error(
        "cannot open the ledger {path}: {source}. It remembers what was already fetched; do not delete it unless you accept that everything under the inbox prefix is downloaded again"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("ledger {path}: {source}")]
    Io { path: PathBuf, source: sled::Error },
    #[error(
        "cannot write the ledger {path}: {reason}. s3-exchange stops rather than transfer what it cannot remember: free space on (or repair) the disk of state.dir, then start it again (systemd restarts it); what was transferred but not recorded is checked again, not duplicated"
    )]
    Broken { path: PathBuf, reason: String },
    #[error("ledger {path}: record for {key} is unreadable: {source}")]
    Corrupt {
        path: PathBuf,
        key: String,
        source: serde_json::Error,
    },
}

/// An upload S3 confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    /// The file's path relative to the outbox.
    pub path: String,
    /// The file as uploaded; with `after_upload = "keep"` an equal stamp means "sent".
    pub stamp: FileStamp,
    /// Hex MD5 of a single PUT, or `md5-of-part-md5s-N` for a multipart upload.
    pub checksum: String,
    pub etag: Option<ETag>,
    pub sent_at_ms: i64,
}

/// A delivery written into the inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Received {
    #[serde(flatten)]
    pub delivered: Delivered,
    pub etag: Option<ETag>,
    pub size: u64,
    pub received_at_ms: i64,
}

/// A multipart upload in progress, kept so that a restart resumes it from the parts
/// already sent instead of starting over (or aborts it if the file changed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub upload_id: String,
    /// The file's path relative to the outbox.
    pub path: String,
    pub stamp: FileStamp,
    pub part_size: u64,
    /// Parts S3 accepted, in order of completion.
    pub parts: Vec<UploadedPart>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadedPart {
    pub number: i32,
    pub etag: Option<String>,
    /// Hex MD5 of the part, for the recorded checksum.
    pub md5: String,
}

/// A key that can never become a file in the inbox, remembered so that it is logged
/// once, not at every poll. A new version (token) is looked at again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub token: ChangeToken,
    pub reason: String,
}

pub struct Ledger {
    path: PathBuf,
    db: sled::Db,
    sent: sled::Tree,
    received: sled::Tree,
    rejected: sled::Tree,
    uploads: sled::Tree,
    /// The one thread that writes and flushes, answering each change once it is durable.
    writer: Writer,
    /// The first failure to write (disk full, IO error), after which sled refuses every
    /// write until the ledger is reopened: the daemon must stop, see [`Ledger::broken`].
    broken: std::sync::OnceLock<String>,
    broken_signal: tokio::sync::Notify,
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`. Fails rather than starting over: an empty
    /// ledger would download everything under the inbox prefix again.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let path = dir.join("ledger");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(None)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(io) if is_lock_error(io) => Error::Locked { path: path.clone() },
                _ => Error::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        match db.get("schema").map_err(io)? {
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                if found > SCHEMA {
                    return Err(Error::NewerSchema { path, found });
                }
            }
            None => {
                db.insert("schema", &SCHEMA.to_be_bytes()).map_err(io)?;
            }
        }
        // A ledger that cannot be written (its disk full) must stop the daemon before it
        // transfers anything, not after: a restart loop would fetch again and again what
        // it can never record.
        db.insert("opened_at_ms", &now_ms().to_be_bytes())
            .and_then(|_| db.flush())
            .map_err(|source| Error::Broken {
                path: path.clone(),
                reason: source.to_string(),
            })?;
        let sent = db.open_tree("sent").map_err(io)?;
        let received = db.open_tree("received").map_err(io)?;
        // A ledger from before the counts were kept is counted once.
        for (name, tree) in [(SENT_COUNT, &sent), (RECEIVED_COUNT, &received)] {
            if db.get(name).map_err(io)?.is_none() {
                let n = tree.len() as u64;
                db.insert(name, &n.to_be_bytes())
                    .and_then(|_| db.flush())
                    .map_err(|source| Error::Broken {
                        path: path.clone(),
                        reason: source.to_string(),
                    })?;
            }
        }
        Ok(Self {
            sent,
            received,
            rejected: db.open_tree("rejected").map_err(io)?,
            uploads: db.open_tree("uploads").map_err(io)?,
            writer: Writer::start(db.clone()).map_err(|e| io(sled::Error::Io(e)))?,
            broken: std::sync::OnceLock::new(),
            broken_signal: tokio::sync::Notify::new(),
            db,
            path,
        })
    }

    pub fn sent(&self, key: &ObjectKey) -> Result<Option<Sent>, Error> {
        self.get(&self.sent, key)
    }

    pub async fn record_sent(&self, key: &ObjectKey, record: &Sent) -> Result<(), Error> {
        self.put(&self.sent, key, record, Some(SENT_COUNT)).await
    }

    pub fn received(&self, key: &ObjectKey) -> Result<Option<Received>, Error> {
        self.get(&self.received, key)
    }

    /// Only the change token of the key's delivery: what each poll asks of every listed
    /// key, without decoding the rest of the record.
    pub fn received_token(&self, key: &ObjectKey) -> Result<Option<ChangeToken>, Error> {
        #[derive(Deserialize)]
        struct TokenOnly {
            token: ChangeToken,
        }
        Ok(self.get::<TokenOnly>(&self.received, key)?.map(|r| r.token))
    }

    pub async fn record_received(&self, key: &ObjectKey, record: &Received) -> Result<(), Error> {
        self.put(&self.received, key, record, Some(RECEIVED_COUNT))
            .await
    }

    pub fn rejected(&self, key: &ObjectKey) -> Result<Option<Rejected>, Error> {
        self.get(&self.rejected, key)
    }

    pub async fn record_rejected(&self, key: &ObjectKey, record: &Rejected) -> Result<(), Error> {
        self.put(&self.rejected, key, record, None).await
    }

    pub fn upload(&self, key: &ObjectKey) -> Result<Option<Upload>, Error> {
        self.get(&self.uploads, key)
    }

    pub async fn record_upload(&self, key: &ObjectKey, record: &Upload) -> Result<(), Error> {
        self.put(&self.uploads, key, record, None).await
    }

    pub async fn forget_upload(&self, key: &ObjectKey) -> Result<(), Error> {
        self.write(Change::Remove {
            tree: self.uploads.clone(),
            key: key.as_str().to_owned(),
        })
        .await
    }

    /// Every multipart upload in progress, for the start-up sweep.
    pub fn uploads(&self) -> Result<Vec<(ObjectKey, Upload)>, Error> {
        self.uploads
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(|s| self.io(s))?;
                let key = ObjectKey::from_listing(String::from_utf8_lossy(&k).into_owned());
                let record = serde_json::from_slice(&v).map_err(|source| Error::Corrupt {
                    path: self.path.clone(),
                    key: key.to_string(),
                    source,
                })?;
                Ok((key, record))
            })
            .collect()
    }

    /// Number of (sent, received) records, for the start-up log line and `status`.
    pub fn counts(&self) -> (u64, u64) {
        let count = |name: &str| {
            self.db
                .get(name)
                .ok()
                .flatten()
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0)
        };
        (count(SENT_COUNT), count(RECEIVED_COUNT))
    }

    /// Resolves once a write failed: from then on nothing can be recorded (sled keeps
    /// refusing until reopened), so the daemon must stop transferring.
    pub async fn broken(&self) {
        let notified = self.broken_signal.notified();
        if self.broken.get().is_none() {
            notified.await;
        }
    }

    /// The write failure that broke the ledger, as the error the daemon exits with.
    pub fn failure(&self) -> Option<Error> {
        self.broken.get().map(|reason| Error::Broken {
            path: self.path.clone(),
            reason: reason.clone(),
        })
    }

    /// Writes everything to disk; called on shutdown.
    pub async fn flush(&self) -> Result<(), Error> {
        self.write(Change::Flush).await
    }

    /// Hands `change` to the writing thread and waits until it is durable.
    async fn write(&self, change: Change) -> Result<(), Error> {
        self.writer
            .write(change)
            .await
            .map_err(|source| self.write_failed(source))
    }

    fn get<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &ObjectKey,
    ) -> Result<Option<T>, Error> {
        let Some(bytes) = tree.get(key.as_str()).map_err(|s| self.io(s))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Corrupt {
                path: self.path.clone(),
                key: key.to_string(),
                source,
            })
    }

    /// Inserts (counting a new key under `count`) and flushes: the caller acts on the
    /// record only once it is durable.
    async fn put<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &ObjectKey,
        record: &T,
        count: Option<&'static str>,
    ) -> Result<(), Error> {
        let bytes = serde_json::to_vec(record).map_err(|source| Error::Corrupt {
            path: self.path.clone(),
            key: key.to_string(),
            source,
        })?;
        self.write(Change::Put {
            tree: tree.clone(),
            key: key.as_str().to_owned(),
            bytes,
            count,
        })
        .await
    }

    /// A failed write: remembered (the first one) and announced to [`Ledger::broken`].
    fn write_failed(&self, source: sled::Error) -> Error {
        if self.broken.set(source.to_string()).is_ok() {
            self.broken_signal.notify_waiters();
        }
        self.io(source)
    }

    fn io(&self, source: sled::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// sled reports a held lock as an IO error ("could not acquire lock" / WouldBlock).
fn is_lock_error(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::WouldBlock || err.to_string().contains("lock")
}

/// Milliseconds since the epoch, for records.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_write_breaks_the_ledger_and_wakes_its_watchers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = Ledger::open(dir.path()).expect("open");
        assert!(ledger.failure().is_none());
        let watcher = ledger.broken();
        let err = ledger.write_failed(sled::Error::Io(std::io::Error::other("disk full")));
        assert!(matches!(err, Error::Io { .. }));
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher)
            .await
            .expect("broken() resolves once a write failed");
        let failure = ledger.failure().expect("the failure is kept");
        assert!(failure.to_string().contains("disk full"), "{failure}");
        // A later watcher resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), ledger.broken())
            .await
            .expect("broken() resolves at once after the failure");
    }

    fn key(k: &str) -> ObjectKey {
        ObjectKey::from_listing(k.to_owned())
    }

    #[tokio::test]
    async fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = Received {
            delivered: Delivered {
                token: ChangeToken::from_etag(&ETag::new("\"e\"")),
                path: "a/b".into(),
                stamp: FileStamp {
                    size: 1,
                    mtime_ns: 2,
                    inode: 3,
                },
            },
            etag: Some(ETag::new("\"e\"")),
            size: 1,
            received_at_ms: 4,
        };
        {
            let ledger = Ledger::open(dir.path()).expect("open");
            // A new version of a key replaces its record: still one record.
            for _ in 0..2 {
                ledger
                    .record_received(&key("Delivery/a/b"), &rec)
                    .await
                    .expect("record");
            }
            assert_eq!(ledger.counts(), (0, 1));
        }
        let ledger = Ledger::open(dir.path()).expect("reopen");
        assert_eq!(
            ledger.received(&key("Delivery/a/b")).expect("get"),
            Some(rec.clone())
        );
        assert_eq!(
            ledger.received_token(&key("Delivery/a/b")).expect("get"),
            Some(rec.delivered.token)
        );
        assert_eq!(ledger.received(&key("Delivery/x")).expect("get"), None);
        assert_eq!(
            ledger.received_token(&key("Delivery/x")).expect("get"),
            None
        );
        assert_eq!(ledger.counts(), (0, 1));
    }

    #[test]
    fn a_ledger_from_before_the_counts_is_counted_once_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let ledger = Ledger::open(dir.path()).expect("open");
            for k in ["Submissions/a", "Submissions/b"] {
                ledger.sent.insert(k, b"{}".to_vec()).expect("insert");
            }
            // As an older s3-exchange left it: records, no counts.
            ledger.db.remove(SENT_COUNT).expect("remove");
            ledger.db.remove(RECEIVED_COUNT).expect("remove");
            ledger.db.flush().expect("flush");
        }
        let ledger = Ledger::open(dir.path()).expect("reopen");
        assert_eq!(ledger.counts(), (2, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_records_all_become_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = std::sync::Arc::new(Ledger::open(dir.path()).expect("open"));
        let rejected = Rejected {
            token: ChangeToken::from_etag(&ETag::new("\"e\"")),
            reason: "test".into(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let ledger = std::sync::Arc::clone(&ledger);
            let rejected = rejected.clone();
            tasks.spawn(async move {
                ledger
                    .record_rejected(&key(&format!("Delivery/{i}")), &rejected)
                    .await
            });
        }
        let all = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(done) = tasks.join_next().await {
                done.expect("task").expect("record");
            }
        })
        .await;
        assert!(all.is_ok(), "concurrent records must not hang the ledger");
        // Durable means on disk while the ledger is still open: a copy of its files
        // (what a crash would leave) holds every answered record.
        let copy = tempfile::tempdir().expect("tempdir");
        copy_dir(&dir.path().join("ledger"), &copy.path().join("ledger"));
        let crashed = Ledger::open(copy.path()).expect("open the copy");
        for i in 0..200 {
            assert_eq!(
                crashed
                    .rejected(&key(&format!("Delivery/{i}")))
                    .expect("get"),
                Some(rejected.clone()),
                "Delivery/{i}"
            );
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read_dir") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copy");
            }
        }
    }

    #[test]
    fn a_second_opener_is_told_the_ledger_is_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Ledger::open(dir.path()).expect("open");
        let second = Ledger::open(dir.path());
        assert!(
            matches!(second, Err(Error::Locked { .. })),
            "{:?}",
            second.err()
        );
    }
}
