//! The outbox worker: scan + watcher hints -> settled files -> upload -> ledger ->
//! `after_upload`.
//!
//! A file is sent only once complete (not ignored, a regular file, unchanged for the
//! settle time), under `prefix + relative path`, with the configured ACL and an MD5 per
//! PUT or part that the server checks. Only after S3 confirmed it is the upload recorded
//! in the ledger, and only then is the file moved, deleted or kept. A file that changed
//! while it was uploaded is not recorded and goes again once it settles.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{self, AfterUpload};
use crate::keys::{ETag, ObjectKey};
use crate::ledger::{self, Ledger, Sent};
use crate::localfs;
use crate::logging::{Direction, Transfer};
use crate::plan::{self, Candidate, FileStamp, UploadShape};
use crate::store::{self, Class, Store};
use crate::watcher;

/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Longest wait before retrying a file after a transient failure.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What the outbox worker needs.
pub struct Outbox {
    pub config: config::Outbox,
    pub transfer: config::Transfer,
    pub store: Store,
    pub ledger: Arc<Ledger>,
    /// Set once the bucket refused an UploadPart after accepting the
    /// CreateMultipartUpload: a policy demanding `s3:x-amz-acl` denies every part (parts
    /// carry no ACL header). From then on files up to 5 GiB go as single PUTs.
    pub parts_denied: AtomicBool,
}

/// Counts for `sync` and the shutdown log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub sent: u64,
    pub failed: u64,
}

/// How one file's attempt ended.
enum Outcome {
    /// Uploaded, recorded, and `after_upload` applied.
    Done,
    /// Uploaded and recorded, but `after_upload` failed: retry only that.
    AfterUploadFailed(String),
    /// Not sent this time, for a reason that resolves itself (the file changed).
    Again(String),
    /// A transient failure: retry after a backoff.
    Retry(String),
    /// Cannot be sent as it is: left in place until it changes.
    Quarantine(String),
    /// Gone before or during the upload: nothing to do.
    Vanished,
}

/// Per-file bookkeeping that is not "waiting to settle".
struct Backoff {
    stamp: FileStamp,
    attempts: u32,
    until: Instant,
}

/// The worker's state; one task owns it, so no locks.
struct State {
    outbox: Arc<Outbox>,
    pending: HashMap<PathBuf, Candidate>,
    in_flight: HashSet<PathBuf>,
    /// Touched while in flight: look again when the upload ends.
    dirty: HashSet<PathBuf>,
    backoff: HashMap<PathBuf, Backoff>,
    /// Refused permanently, with the stamp they had: skipped until they change.
    quarantined: HashMap<PathBuf, FileStamp>,
    /// Uploaded and recorded but not yet moved/deleted (the sent folder failed).
    unmoved: HashMap<PathBuf, (ObjectKey, FileStamp)>,
    /// Paths already logged as skipped (symlinks, special files), to log once.
    skipped: HashSet<PathBuf>,
    /// False for `sync`: a failure is counted and the file left for the next run.
    retry: bool,
    permits: Arc<Semaphore>,
    tasks: JoinSet<(PathBuf, FileStamp, Outcome)>,
    totals: Totals,
}

impl Outbox {
    /// Runs until `shutdown`; then lets in-flight uploads finish within the grace period.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Totals {
        let mut state = State::new(Arc::clone(&self));
        let (_watcher, mut hints, rescan_flag) = match watcher::watch(&self.config.dir) {
            Ok((w, h, r)) => (Some(w), Some(h), Some(r)),
            Err(err) => {
                tracing::error!(dir = %self.config.dir.display(), error = %err, "cannot watch the outbox: relying on the periodic rescan");
                (None, None, None)
            }
        };
        state.scan_all();
        let mut rescan = tokio::time::interval(self.config.rescan_interval);
        rescan.tick().await;
        loop {
            state.dispatch();
            let wake = state.next_wake();
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(path) = next_hint(&mut hints) => state.consider(&path, Instant::now()),
                () = rescan_needed(rescan_flag.as_deref()) => state.scan_all(),
                _ = rescan.tick() => state.scan_all(),
                () = tokio::time::sleep_until(wake.into()) => {}
                Some(done) = state.tasks.join_next(), if !state.tasks.is_empty() => state.finished(done),
            }
        }
        state.wind_down(self.transfer.shutdown_grace).await;
        state.totals
    }

    /// One pass for `sync`: everything in the outbox now, once settled, then return.
    /// What fails is counted, not retried.
    pub async fn run_once(self: Arc<Self>, shutdown: CancellationToken) -> Totals {
        let mut state = State::new(Arc::clone(&self));
        state.retry = false;
        state.scan_all();
        while !(state.pending.is_empty() && state.tasks.is_empty()) {
            state.dispatch();
            let wake = state.next_wake();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(wake.into()) => {}
                Some(done) = state.tasks.join_next(), if !state.tasks.is_empty() => state.finished(done),
            }
        }
        state.wind_down(self.transfer.shutdown_grace).await;
        state.totals
    }
}

async fn next_hint(hints: &mut Option<watcher::Hints>) -> Option<PathBuf> {
    match hints {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

async fn rescan_needed(flag: Option<&watcher::Rescan>) {
    match flag {
        Some(f) => f.needed().await,
        None => std::future::pending().await,
    }
}

impl State {
    fn new(outbox: Arc<Outbox>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(outbox.transfer.concurrency)),
            outbox,
            pending: HashMap::new(),
            in_flight: HashSet::new(),
            dirty: HashSet::new(),
            backoff: HashMap::new(),
            quarantined: HashMap::new(),
            unmoved: HashMap::new(),
            skipped: HashSet::new(),
            retry: true,
            tasks: JoinSet::new(),
            totals: Totals::default(),
        }
    }

    /// Walks the whole outbox; every file found becomes a candidate.
    fn scan_all(&mut self) {
        let root = self.outbox.config.dir.clone();
        self.walk(&root, Instant::now());
    }

    /// Walks a folder the watcher reported: notify does not report files that were
    /// already inside a folder created or moved in.
    fn walk(&mut self, dir: &Path, now: Instant) {
        let mut stack = vec![dir.to_owned()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot read outbox folder; will retry at the next rescan");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => {
                        if !self.ignored(&path) {
                            stack.push(path);
                        }
                    }
                    Ok(_) => self.consider_file(&path, now),
                    Err(_) => {}
                }
            }
        }
    }

    /// A watcher hint: a file to (re)consider, or a folder to walk.
    fn consider(&mut self, path: &Path, now: Instant) {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                if !self.ignored(path) {
                    self.walk(path, now);
                }
            }
            Ok(_) => self.consider_file(path, now),
            Err(_) => {
                self.pending.remove(path);
            }
        }
    }

    fn ignored(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.outbox.config.dir) else {
            return true;
        };
        rel.components().any(|c| {
            c.as_os_str()
                .to_str()
                .is_some_and(|name| plan::is_ignored(name, &self.outbox.config.ignore))
        })
    }

    fn consider_file(&mut self, path: &Path, now: Instant) {
        if self.ignored(path) {
            return;
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => {
                self.pending.remove(path);
                return;
            }
        };
        if !meta.is_file() {
            if self.skipped.insert(path.to_owned()) {
                let what = if meta.file_type().is_symlink() {
                    "a symlink"
                } else {
                    "not a regular file"
                };
                tracing::warn!(path = %path.display(), "skipped: {what}; only regular files are sent (replace the link with the file itself)");
            }
            return;
        }
        let stamp = localfs::stamp_of(&meta);
        if self.in_flight.contains(path) {
            self.dirty.insert(path.to_owned());
            return;
        }
        if self.quarantined.get(path) == Some(&stamp) || self.already_kept(path, stamp) {
            return;
        }
        self.pending
            .entry(path.to_owned())
            .and_modify(|c| c.touched(now))
            .or_insert_with(|| Candidate::new(stamp, now));
    }

    /// With `after_upload = "keep"` the file stays: the ledger's stamp says it was sent.
    fn already_kept(&self, path: &Path, stamp: FileStamp) -> bool {
        if self.outbox.config.after_upload != AfterUpload::Keep {
            return false;
        }
        let Some(key) = self.key_for(path).ok() else {
            return false;
        };
        matches!(self.outbox.ledger.sent(&key), Ok(Some(rec)) if rec.stamp == stamp)
    }

    fn key_for(&self, path: &Path) -> Result<ObjectKey, String> {
        let rel = path
            .strip_prefix(&self.outbox.config.dir)
            .map_err(|_| "not inside the outbox".to_owned())?;
        ObjectKey::for_upload(&self.outbox.config.prefix, rel)
            .map_err(|e| format!("its name cannot be an S3 key: {e}; rename the file to leave it"))
    }

    /// Starts uploads for every settled file, as far as permits allow.
    fn dispatch(&mut self) {
        let now = Instant::now();
        let settle = self.outbox.config.settle;
        let mut ready = Vec::new();
        let mut gone = Vec::new();
        for (path, candidate) in &mut self.pending {
            if self.backoff.get(path).is_some_and(|b| b.until > now) {
                continue;
            }
            if candidate.due(settle) > now {
                continue;
            }
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.is_file() => {
                    if candidate.observe(localfs::stamp_of(&meta), now, settle) {
                        ready.push((path.clone(), candidate.stamp));
                    }
                }
                _ => gone.push(path.clone()),
            }
        }
        for path in gone {
            self.pending.remove(&path);
        }
        ready.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, stamp) in ready {
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                break;
            };
            self.pending.remove(&path);
            self.in_flight.insert(path.clone());
            let outbox = Arc::clone(&self.outbox);
            let unmoved = self.unmoved.remove(&path).filter(|(_, s)| *s == stamp);
            self.tasks.spawn(async move {
                let outcome = match unmoved {
                    Some((key, _)) => outbox.after_upload(&path, &key).await,
                    None => outbox.send(&path, stamp).await,
                };
                drop(permit);
                (path, stamp, outcome)
            });
        }
    }

    /// When the loop must next look at the pending files.
    fn next_wake(&self) -> Instant {
        let settle = self.outbox.config.settle;
        let now = Instant::now();
        self.pending
            .iter()
            .map(|(path, c)| {
                let due = c.due(settle);
                self.backoff.get(path).map_or(due, |b| due.max(b.until))
            })
            .min()
            .map_or(now + Duration::from_secs(3600), |t| {
                t.max(now + Duration::from_millis(10))
            })
    }

    fn finished(&mut self, done: Result<(PathBuf, FileStamp, Outcome), tokio::task::JoinError>) {
        let (path, stamp, outcome) = match done {
            Ok(done) => done,
            Err(err) => {
                tracing::error!(error = %err, "an upload task failed unexpectedly");
                self.totals.failed += 1;
                return;
            }
        };
        self.in_flight.remove(&path);
        let now = Instant::now();
        match outcome {
            Outcome::Done => {
                self.totals.sent += 1;
                self.backoff.remove(&path);
            }
            Outcome::Vanished => {}
            Outcome::Again(reason) => {
                tracing::info!(path = %path.display(), reason = %reason, "not sent this time; will send once it settles again");
                self.consider_file(&path, now);
            }
            Outcome::AfterUploadFailed(reason) => {
                self.totals.failed += 1;
                if let Ok(key) = self.key_for(&path) {
                    self.unmoved.insert(path.clone(), (key, stamp));
                }
                self.retry_later(&path, stamp, &reason, now);
            }
            Outcome::Retry(reason) => {
                self.totals.failed += 1;
                self.retry_later(&path, stamp, &reason, now);
            }
            Outcome::Quarantine(reason) => {
                self.totals.failed += 1;
                tracing::error!(path = %path.display(), reason = %reason, "quarantined: left in the outbox and not retried until it changes (or the daemon restarts)");
                self.quarantined.insert(path.clone(), stamp);
            }
        }
        if self.dirty.remove(&path) {
            self.consider_file(&path, now);
        }
    }

    fn retry_later(&mut self, path: &Path, stamp: FileStamp, reason: &str, now: Instant) {
        if !self.retry {
            tracing::error!(path = %path.display(), reason = %reason, "not sent; it stays in the outbox");
            return;
        }
        let attempts = self
            .backoff
            .get(path)
            .filter(|b| b.stamp == stamp)
            .map_or(1, |b| b.attempts + 1);
        let delay = backoff_delay(attempts);
        tracing::warn!(path = %path.display(), attempts, retry_in_ms = delay.as_millis() as u64, reason = %reason, "will retry");
        self.backoff.insert(
            path.to_owned(),
            Backoff {
                stamp,
                attempts,
                until: now + delay,
            },
        );
        self.pending
            .insert(path.to_owned(), Candidate::new(stamp, now));
    }

    /// Shutdown: start nothing new; give in-flight uploads the grace period, then drop
    /// them. A dropped upload was never recorded, so the file is still in the outbox.
    async fn wind_down(&mut self, grace: Duration) {
        if self.tasks.is_empty() {
            return;
        }
        tracing::info!(
            in_flight = self.tasks.len(),
            grace_ms = grace.as_millis() as u64,
            "waiting for uploads in flight"
        );
        let deadline = tokio::time::Instant::now() + grace;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(done)) => self.finished(done),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        abandoned = self.tasks.len(),
                        "grace period over: abandoning uploads in flight; their files stay in the outbox"
                    );
                    self.tasks.abort_all();
                    break;
                }
            }
        }
    }
}

/// 1 s, 2 s, 4 s ... capped at 5 min, with up to 50% jitter so that files failing
/// together do not retry together.
fn backoff_delay(attempts: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1 << attempts.saturating_sub(1).min(16));
    let base = base.min(MAX_BACKOFF);
    let jitter = rand::random::<f64>() * 0.5;
    base.mul_f64(1.0 - jitter / 2.0)
        .max(Duration::from_millis(100))
}

impl Outbox {
    /// Uploads one settled file and applies `after_upload`.
    async fn send(&self, path: &Path, stamp: FileStamp) -> Outcome {
        let rel = path.strip_prefix(&self.config.dir).unwrap_or(path);
        let key = match ObjectKey::for_upload(&self.config.prefix, rel) {
            Ok(key) => key,
            Err(e) => {
                return Outcome::Quarantine(format!(
                    "its name cannot be an S3 key: {e}; rename the file"
                ));
            }
        };
        let transfer = Transfer::start(Direction::Upload, &key, path);
        match current_stamp(path) {
            None => return Outcome::Vanished,
            Some(now) if now != stamp => {
                return Outcome::Again("it changed before the upload".into());
            }
            Some(_) => {}
        }
        let single_only =
            self.parts_denied.load(Ordering::Relaxed) && stamp.size <= config::MAX_SINGLE_PUT;
        let shape = match plan::upload_shape(
            stamp.size,
            self.transfer.multipart_threshold,
            self.transfer.part_size,
        ) {
            UploadShape::Multipart { .. } if single_only => UploadShape::Single,
            shape => shape,
        };
        let result = match shape {
            UploadShape::Single => self.put_single(&key, path, stamp.size).await,
            UploadShape::Multipart { part_size, parts } => {
                match self
                    .put_multipart(&key, path, stamp, part_size, parts)
                    .await
                {
                    Err(UploadError::S3(err))
                        if is_parts_denied(&err) && stamp.size <= config::MAX_SINGLE_PUT =>
                    {
                        self.parts_denied.store(true, Ordering::Relaxed);
                        tracing::warn!(key = %key, error = %err, "the bucket accepts multipart uploads but denies their parts; sending files up to 5GiB as single PUTs from now on");
                        self.put_single(&key, path, stamp.size).await
                    }
                    other => other,
                }
            }
        };
        let (etag, checksum) = match result {
            Ok(done) => done,
            Err(UploadError::Changed) => {
                return Outcome::Again("it changed during the upload".into());
            }
            Err(UploadError::Local(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                transfer.failed("vanished", &err);
                return Outcome::Vanished;
            }
            Err(UploadError::Local(err)) => {
                transfer.failed("failed", &err);
                return match err.kind() {
                    std::io::ErrorKind::PermissionDenied => Outcome::Quarantine(format!(
                        "cannot read it: {err}; make it readable by the daemon's user"
                    )),
                    _ => Outcome::Retry(err.to_string()),
                };
            }
            Err(UploadError::S3(err)) => {
                transfer.failed("failed", &err);
                return match err.class {
                    Class::Permanent => Outcome::Quarantine(err.to_string()),
                    _ => Outcome::Retry(err.to_string()),
                };
            }
        };
        // The upload counts only if the file is still what was read.
        if current_stamp(path) != Some(stamp) {
            transfer.failed("changed", &"the file changed during the upload");
            return Outcome::Again("it changed during the upload".into());
        }
        let record = Sent {
            path: rel.to_string_lossy().into_owned(),
            stamp,
            checksum,
            etag: etag.clone(),
            sent_at_ms: ledger::now_ms(),
        };
        if let Err(err) = self.ledger.record_sent(&key, &record).await {
            transfer.failed("failed", &err);
            return Outcome::Retry(err.to_string());
        }
        transfer.done(stamp.size, etag.as_ref());
        self.after_upload(path, &key).await
    }

    async fn put_single(
        &self,
        key: &ObjectKey,
        path: &Path,
        size: u64,
    ) -> Result<(Option<ETag>, String), UploadError> {
        let md5 = hash_range(path, 0, size).await?;
        let etag = self.store.put_object(key, path, size, &md5).await?;
        Ok((etag, hex(&md5)))
    }

    async fn put_multipart(
        &self,
        key: &ObjectKey,
        path: &Path,
        stamp: FileStamp,
        part_size: u64,
        parts: u64,
    ) -> Result<(Option<ETag>, String), UploadError> {
        let upload_id = self.store.create_multipart(key).await?;
        let result = async {
            let sent: Vec<(store::Part, [u8; 16])> = futures_util::stream::iter(0..parts)
                .map(|i| {
                    let upload_id = upload_id.as_str();
                    async move {
                        let offset = i * part_size;
                        let len = part_size.min(stamp.size - offset);
                        let md5 = hash_range(path, offset, len).await?;
                        let number = i32::try_from(i + 1).unwrap_or(i32::MAX);
                        let part = self
                            .store
                            .upload_part(key, upload_id, number, path, offset, len, &md5)
                            .await?;
                        Ok::<_, UploadError>((part, md5))
                    }
                })
                .buffered(PARTS_IN_FLIGHT)
                .try_collect()
                .await?;
            if current_stamp(path) != Some(stamp) {
                return Err(UploadError::Changed);
            }
            let parts: Vec<store::Part> = sent.iter().map(|(p, _)| p.clone()).collect();
            let etag = self
                .store
                .complete_multipart(key, &upload_id, &parts)
                .await?;
            let mut all = Md5::new();
            for (_, md5) in &sent {
                all.update(md5);
            }
            let checksum = format!("{}-{}", hex(&all.finalize().into()), sent.len());
            Ok((etag, checksum))
        }
        .await;
        if result.is_err()
            && let Err(err) = self.store.abort_multipart(key, &upload_id).await
        {
            tracing::warn!(key = %key, error = %err, "could not abort the failed multipart upload; its parts stay until the bucket's lifecycle rule removes them");
        }
        result
    }

    /// Applies `after_upload` to a file whose upload is recorded.
    async fn after_upload(&self, path: &Path, key: &ObjectKey) -> Outcome {
        let result = match self.config.after_upload {
            AfterUpload::Keep => return Outcome::Done,
            AfterUpload::Delete => tokio::fs::remove_file(path).await.map(|()| None),
            AfterUpload::Move => {
                let rel = path.strip_prefix(&self.config.dir).unwrap_or(path);
                let dest = self.config.sent_dir.join(rel);
                let src = path.to_owned();
                let tag = timestamp_tag();
                tokio::task::spawn_blocking(move || localfs::move_aside(&src, &dest, &tag))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    .map(Some)
            }
        };
        match result {
            Ok(dest) => {
                if let Some(dest) = dest {
                    tracing::debug!(key = %key, path = %path.display(), moved_to = %dest.display(), "moved to the sent folder");
                }
                Outcome::Done
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Outcome::Done,
            Err(err) => Outcome::AfterUploadFailed(format!(
                "uploaded as {key}, but after_upload failed: {err}; check that outbox.sent_dir ({}) is writable and has space",
                self.config.sent_dir.display()
            )),
        }
    }
}

enum UploadError {
    Changed,
    Local(std::io::Error),
    S3(store::Error),
}

impl From<store::Error> for UploadError {
    fn from(e: store::Error) -> Self {
        Self::S3(e)
    }
}

async fn hash_range(path: &Path, offset: u64, len: u64) -> Result<[u8; 16], UploadError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || localfs::md5_range(&path, offset, len))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(UploadError::Local)
}

/// AccessDenied on a part after the upload was created: the ACL-condition policy trap.
fn is_parts_denied(err: &store::Error) -> bool {
    err.op == "UploadPart" && err.code.as_deref() == Some("AccessDenied")
}

fn current_stamp(path: &Path) -> Option<FileStamp> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|m| localfs::stamp_of(&m))
}

fn hex(bytes: &[u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `2026-11-28T10-15-00Z`: a name-safe UTC time for copies that must not overwrite.
pub fn timestamp_tag() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff_delay(1) <= Duration::from_secs(1));
        assert!(backoff_delay(1) >= Duration::from_millis(700));
        assert!(backoff_delay(4) >= Duration::from_secs(6));
        assert!(backoff_delay(60) <= MAX_BACKOFF);
        assert!(backoff_delay(60) >= MAX_BACKOFF.mul_f64(0.7));
    }

    #[test]
    fn timestamp_tags_are_name_safe() {
        let tag = timestamp_tag();
        assert!(
            tag.ends_with('Z') && !tag.contains(':') && !tag.contains('/'),
            "{tag}"
        );
    }
}
