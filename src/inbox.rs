//! The inbox worker: poll -> plan -> download -> rename -> record.
//!
//! Each poll lists the inbox prefix page by page (memory bounded by a page and the
//! transfers in flight). A key is fetched only when the ledger has no record of it or a
//! different change token; the GET is pinned with `If-Match`, written to a temp file in
//! the inbox's hidden temp folder, checked (length, and MD5 where the ETag is one),
//! fsynced, renamed into place without following links, and only then recorded.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use md5::{Digest, Md5};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::keys::{ObjectKey, RelPath};
use crate::ledger::{self, Ledger, Received, Rejected};
use crate::localfs::{self, InboxRoot};
use crate::logging::{Direction, Transfer};
use crate::plan::{self, Delivered, Landing};
use crate::store::{Class, Listed, Store};

/// Immediate re-polls after a version change, at most, before the normal interval.
const MAX_QUICK_REPOLLS: u32 = 3;

/// What the inbox worker needs.
pub struct Inbox {
    pub config: config::Inbox,
    pub transfer: config::Transfer,
    pub store: Store,
    pub ledger: Arc<Ledger>,
    pub root: InboxRoot,
    /// Notified (SIGUSR1) to poll now instead of at the end of the interval.
    pub poll_now: tokio::sync::Notify,
}

/// Counts of one poll (or, summed, of a run).
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub received: u64,
    pub failed: u64,
    pub rejected: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Self) {
        self.received += o.received;
        self.failed += o.failed;
        self.rejected += o.rejected;
    }
}

/// How one fetch ended.
enum Fetched {
    Done,
    /// The object changed between the listing and the GET: poll again.
    Changed,
    /// The object was deleted between the listing and the GET.
    Gone,
    Failed,
}

impl Inbox {
    /// Polls at start-up and then every `poll_interval` (with jitter) until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Totals {
        let mut totals = Totals::default();
        let mut quick_repolls = 0;
        loop {
            let (poll, again) = Arc::clone(&self).poll(&shutdown).await;
            totals += poll;
            crate::memory::release_free();
            // An object that changed under a GET is listed again at once, but only a few
            // times in a row: a server whose listing and GET ETags disagree must not
            // make the daemon spin.
            let wait = if again && quick_repolls < MAX_QUICK_REPOLLS {
                quick_repolls += 1;
                Duration::from_millis(100)
            } else {
                quick_repolls = 0;
                jittered(self.config.poll_interval)
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
                () = self.poll_now.notified() => tracing::info!("polling now, as asked"),
            }
        }
        totals
    }

    /// One poll: list everything under the prefix and fetch what is new. Returns the
    /// counts and whether an object changed under us (so the caller polls again soon).
    pub async fn poll(self: Arc<Self>, shutdown: &CancellationToken) -> (Totals, bool) {
        let permits = Arc::new(Semaphore::new(self.transfer.concurrency));
        let mut tasks: JoinSet<Fetched> = JoinSet::new();
        let mut totals = Totals::default();
        let mut changed = false;
        let mut start = None;
        let mut listed = 0u64;
        'pages: loop {
            let page = match self
                .store
                .list_page(&self.config.prefix, start.take())
                .await
            {
                Ok(page) => page,
                Err(err) => {
                    if !err.unreachable {
                        tracing::warn!(prefix = %self.config.prefix, error = %err, "listing the inbox prefix failed; will try again at the next poll");
                    }
                    totals.failed += 1;
                    crate::status::STATS.list_failed();
                    break;
                }
            };
            for object in page.objects {
                listed += 1;
                if let Some(job) = self.plan(&object, &mut totals).await {
                    let permit = tokio::select! {
                        () = shutdown.cancelled() => break 'pages,
                        p = Arc::clone(&permits).acquire_owned() => p.expect("never closed"),
                    };
                    let this = Arc::clone(&self);
                    tasks.spawn(async move {
                        let out = this.fetch(object, job).await;
                        drop(permit);
                        out
                    });
                }
                while let Some(done) = tasks.try_join_next() {
                    tally(done, &mut totals, &mut changed);
                }
            }
            match page.next {
                Some(next) if !shutdown.is_cancelled() => start = Some(next),
                _ => break,
            }
        }
        let grace = self.transfer.shutdown_grace;
        loop {
            let next = if shutdown.is_cancelled() {
                match tokio::time::timeout(grace, tasks.join_next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::warn!(
                            abandoned = tasks.len(),
                            "grace period over: abandoning downloads in flight; they are fetched again next time"
                        );
                        tasks.abort_all();
                        break;
                    }
                }
            } else {
                tokio::select! {
                    next = tasks.join_next() => next,
                    () = shutdown.cancelled() => continue,
                }
            };
            let Some(done) = next else { break };
            tally(done, &mut totals, &mut changed);
        }
        crate::status::STATS.poll_done();
        tracing::debug!(
            listed,
            received = totals.received,
            failed = totals.failed,
            "poll done"
        );
        (totals, changed)
    }

    /// Decides about one listed object; `Some` means fetch it to that path.
    async fn plan(
        &self,
        object: &Listed,
        totals: &mut Totals,
    ) -> Option<(RelPath, Option<Received>)> {
        if object.key.is_folder_marker() {
            return None;
        }
        let token = object.token();
        // Every poll asks this of every listed key: only the token is decoded, the whole
        // record only for the few keys that are fetched.
        let unread = |err: ledger::Error, totals: &mut Totals| {
            tracing::error!(key = %object.key, error = %err, "cannot read the ledger; skipping the key");
            totals.failed += 1;
        };
        match self.ledger.received_token(&object.key) {
            Ok(recorded) if !plan::needs_fetch(&token, recorded.as_ref()) => return None,
            Ok(_) => {}
            Err(err) => {
                unread(err, totals);
                return None;
            }
        }
        let record = match self.ledger.received(&object.key) {
            Ok(r) => r,
            Err(err) => {
                unread(err, totals);
                return None;
            }
        };
        // A version already found unable to land (a file or link in its way) is not
        // downloaded again; a new version is tried.
        if matches!(self.ledger.rejected(&object.key), Ok(Some(r)) if r.token == token) {
            return None;
        }
        match RelPath::from_key(&self.config.prefix, &object.key) {
            Ok(rel) if rel.segments()[0] == localfs::TEMP_DIR => {
                let reason = format!("{} is the daemon's own temporary folder", localfs::TEMP_DIR);
                self.reject(&object.key, token, &reason, totals).await;
                None
            }
            Ok(rel) => Some((rel, record)),
            Err(reason) => {
                self.reject(&object.key, token, &reason.to_string(), totals)
                    .await;
                None
            }
        }
    }

    /// Logs a key that can never be a file (once per version) and remembers it.
    async fn reject(
        &self,
        key: &ObjectKey,
        token: crate::keys::ChangeToken,
        reason: &str,
        totals: &mut Totals,
    ) {
        if matches!(self.ledger.rejected(key), Ok(Some(r)) if r.token == token) {
            return;
        }
        totals.rejected += 1;
        crate::status::STATS.rejected(key.as_str(), reason);
        tracing::error!(key = %key, reason, "rejected: this key cannot become a file inside the inbox; it is not fetched (ask the owner to rename it)");
        let record = Rejected {
            token,
            reason: reason.to_owned(),
        };
        if let Err(err) = self.ledger.record_rejected(key, &record).await {
            tracing::warn!(key = %key, error = %err, "cannot remember the rejected key");
        }
    }

    async fn fetch(&self, object: Listed, (rel, record): (RelPath, Option<Received>)) -> Fetched {
        let mut transfer = Transfer::start(
            Direction::Download,
            &object.key,
            &self.root.path().join(rel.to_path()),
        );
        let download = match self
            .store
            .get_object(&object.key, object.etag.as_ref())
            .await
        {
            Ok(d) => d,
            Err(err) if err.class == Class::Changed => {
                tracing::info!(key = %object.key, error = %err, "the object changed since the listing; listing again");
                return Fetched::Changed;
            }
            Err(err) if err.class == Class::Gone => {
                tracing::info!(key = %object.key, "the object was deleted since the listing; nothing to fetch");
                return Fetched::Gone;
            }
            Err(err) => {
                if err.unreachable {
                    transfer.failed_quietly("failed", &err);
                } else {
                    transfer.failed("failed", &err);
                }
                return Fetched::Failed;
            }
        };
        let etag = download.etag.clone().or_else(|| object.etag.clone());
        let (temp, md5, size) = match self.write_temp(download).await {
            Ok(written) => written,
            Err(err) => {
                transfer.failed("failed", &err);
                return Fetched::Failed;
            }
        };
        let root_path = self.root.path().to_owned();
        let landed = tokio::task::block_in_place(|| {
            land(&self.root, &rel, &temp, md5, size, record.as_ref())
        });
        let (landed_rel, stamp) = match landed {
            Ok(done) => done,
            Err(LandError::Blocked(reason)) => {
                self.root.remove_temp(&temp);
                transfer.failed("rejected", &reason);
                let mut totals = Totals::default();
                self.reject(&object.key, object.token(), &reason, &mut totals)
                    .await;
                return Fetched::Failed;
            }
            Err(LandError::Io(err)) => {
                self.root.remove_temp(&temp);
                transfer.failed(
                    "failed",
                    &format!(
                        "{err} (inbox {}); retrying at the next poll",
                        root_path.display()
                    ),
                );
                return Fetched::Failed;
            }
        };
        transfer.landed_at(&root_path.join(&landed_rel));
        let received = Received {
            delivered: Delivered {
                token: object.token(),
                path: landed_rel,
                stamp,
            },
            etag: etag.clone(),
            size,
            received_at_ms: ledger::now_ms(),
        };
        if let Err(err) = self.ledger.record_received(&object.key, &received).await {
            transfer.failed("failed", &err);
            return Fetched::Failed;
        }
        transfer.done(size, etag.as_ref());
        Fetched::Done
    }

    /// Streams the body into a new temp file, checking length and (where the ETag is
    /// an MD5) content; the temp file is removed on any failure, and also when the
    /// download is abandoned (its task aborted at the end of the shutdown grace).
    async fn write_temp(
        &self,
        mut download: crate::store::Download,
    ) -> Result<(String, [u8; 16], u64), String> {
        let (name, file) = self.root.create_temp().map_err(|e| {
            format!(
                "cannot create a temporary file in {}: {e}",
                self.root.path().display()
            )
        })?;
        let temp = TempFile {
            root: &self.root,
            name: Some(name),
        };
        let root_path = self.root.path().display().to_string();
        // The body is read here and written, hashed and fsynced on a blocking thread of
        // its own, so the network and the disk work at once and the runtime's workers
        // never block (a `block_in_place` per chunk cost a thread hand-off per chunk: 35 s
        // for 1 GiB). Only an explicit `End` makes the writer fsync: a body that broke off
        // (or a task dropped mid-way) is not worth syncing.
        let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(WRITE_QUEUE);
        let writer = tokio::task::spawn_blocking(move || write_and_hash(file, rx));
        let mut broke_off = None;
        while let Some(chunk) = download.body.next().await {
            match chunk {
                Ok(chunk) => {
                    if tx.send(Piece::Chunk(chunk)).await.is_err() {
                        break; // the writer failed: its error says why
                    }
                }
                Err(e) => {
                    broke_off = Some(format!("the download broke off: {}", error_chain(&e)));
                    break;
                }
            }
        }
        if broke_off.is_none() {
            // Fails only if the writer already failed: its error says why.
            let _ = tx.send(Piece::End).await;
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| format!("the writer of the download failed: {e}"))?;
        if let Some(reason) = broke_off {
            return Err(reason);
        }
        let (md5, size) = written.map_err(|e| format!("cannot write into {root_path}: {e}"))?;
        if let Some(expected) = download.content_length
            && expected != size
        {
            return Err(format!("got {size} bytes, expected {expected}"));
        }
        if let Some(mismatch) = plan::md5_mismatch(download.etag.as_ref(), download.kms, &md5) {
            return Err(mismatch);
        }
        Ok((temp.keep(), md5, size))
    }
}

/// A download's temp file, removed on drop unless [`TempFile::keep`] hands it on.
struct TempFile<'a> {
    root: &'a InboxRoot,
    name: Option<String>,
}

impl TempFile<'_> {
    fn keep(mut self) -> String {
        self.name.take().unwrap_or_default()
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            self.root.remove_temp(name);
        }
    }
}

/// What the body reader hands the writer thread.
enum Piece {
    Chunk(bytes::Bytes),
    /// The body is complete: flush and fsync.
    End,
}

/// How many body chunks may wait for the writer thread while the disk catches up: bounds
/// a download's memory (hyper hands out chunks of at most a few dozen KiB).
const WRITE_QUEUE: usize = 8;

/// Writes the chunks arriving on `rx` into `file`, hashing them on the way, and fsyncs once
/// the body is complete; returns the MD5 and the length. Without an `End` (the body broke
/// off, the download was abandoned) it stops with `Interrupted` and syncs nothing. Runs on
/// a blocking thread.
fn write_and_hash(
    file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<Piece>,
) -> std::io::Result<([u8; 16], u64)> {
    let mut file = std::io::BufWriter::with_capacity(256 << 10, file);
    let mut hasher = Md5::new();
    let mut size = 0u64;
    loop {
        match rx.blocking_recv() {
            Some(Piece::Chunk(chunk)) => {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk)?;
            }
            Some(Piece::End) => break,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the download ended before its body did",
                ));
            }
        }
    }
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((hasher.finalize().into(), size))
}

/// Renames the verified temp file to its place (or beside a file the user changed) and
/// returns the landed path relative to the inbox with its stamp.
fn land(
    root: &InboxRoot,
    rel: &RelPath,
    temp: &str,
    md5: [u8; 16],
    size: u64,
    record: Option<&Received>,
) -> Result<(String, plan::FileStamp), LandError> {
    let dir = root.open_parent(rel).map_err(|e| match e.kind() {
        // A file or a symlink where a folder must be: this key can never land.
        std::io::ErrorKind::NotADirectory => LandError::Blocked(e.to_string()),
        _ => LandError::Io(e),
    })?;
    let name = rel.file_name();
    let existing = root.existing(&dir, name, |f| Ok(localfs::md5_file(f)? == md5), size)?;
    let rel_str = rel.to_string();
    match plan::landing(existing, record.map(|r| &r.delivered), &rel_str) {
        Landing::Path => {
            let stamp = root.land(temp, &dir, name, true)?;
            Ok((rel_str, stamp))
        }
        Landing::Beside => {
            let tag = plan::time_tag(std::time::SystemTime::now());
            let mut n = 0;
            loop {
                let beside = plan::beside_name(name, &tag, n);
                n += 1;
                if InboxRoot::taken(&dir, &beside) {
                    continue;
                }
                match root.land(temp, &dir, &beside, false) {
                    Ok(stamp) => {
                        tracing::warn!(path = %rel_str, new_version = %beside, "the local copy was changed (or is not ours): kept it, the new version lands beside it");
                        let parent = rel_str
                            .rsplit_once('/')
                            .map_or(String::new(), |(p, _)| format!("{p}/"));
                        return Ok((format!("{parent}{beside}"), stamp));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Why a verified download could not be put in its place.
enum LandError {
    /// A file or symlink stands where a folder of the key's path must be.
    Blocked(String),
    /// Disk trouble (full, not writable): try again later.
    Io(std::io::Error),
}

impl From<std::io::Error> for LandError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

fn tally(done: Result<Fetched, tokio::task::JoinError>, totals: &mut Totals, changed: &mut bool) {
    match done {
        Ok(Fetched::Done) => totals.received += 1,
        Ok(Fetched::Changed) => *changed = true,
        Ok(Fetched::Gone) => {}
        Ok(Fetched::Failed) => totals.failed += 1,
        Err(err) => {
            if !err.is_cancelled() {
                tracing::error!(error = %err, "a download task failed unexpectedly");
            }
            totals.failed += 1;
        }
    }
}

/// An error with its causes, `a: b: c`: body errors hide the useful part (a checksum
/// mismatch) in their sources.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `interval` +- 10%, so that many clients do not poll in lockstep.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}
