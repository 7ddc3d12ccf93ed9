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
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::claim;
use crate::config::{self, AfterUpload};
use crate::group_commit::FolderSyncs;
use crate::keys::ObjectKey;
use crate::ledger::Ledger;
use crate::plan::{self, Candidate, FileStamp};
use crate::store::Store;
use crate::upload::Outcome;
use crate::watcher;

/// Files waiting to settle, at most; beyond this the rest wait for the next rescan,
/// so memory is bounded by this queue, not by how many files arrive at once.
const MAX_PENDING: usize = 4096;
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
    /// [`crate::upload::PARTS_IN_FLIGHT_TOTAL`] slots, one taken by each part while it
    /// is hashed and sent.
    pub part_slots: Semaphore,
    /// The fsyncs that make moves into the sent folder durable, shared by files moved
    /// into the same folder at once.
    pub folder_syncs: FolderSyncs,
    /// Files (by key and stamp) whose multipart upload the server forgot (`NoSuchUpload`)
    /// and that went again as a new upload: a second time, the server is at fault and the
    /// file is quarantined instead of sent again and again.
    pub started_over: std::sync::Mutex<std::collections::HashSet<(ObjectKey, FileStamp)>>,
}

/// Counts for `sync` and the shutdown log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub sent: u64,
    pub failed: u64,
}

/// How a file came to the worker's attention. Only a watcher event means "someone is
/// writing": a rescan finding a pending file must not restart its settle clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    ByEvent,
    ByScan,
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
    /// Until the process's first scan is done: claims found are leftovers of a daemon
    /// that died inside one (see [`crate::claim`]) and get their names back. Later, a
    /// claim may be a live task's, also after a reload: an aborted task's blocking work
    /// runs on.
    first_scan: bool,
    /// Files were left out because `pending` was full: rescan once it drains.
    backlog: bool,
    /// False for `sync`: a failure is counted and the file left for the next run.
    retry: bool,
    permits: Arc<Semaphore>,
    /// Vouches for files' change times (see [`Self::quiet_since`]).
    clock: plan::WallClock,
    tasks: JoinSet<(PathBuf, FileStamp, Outcome)>,
    totals: Totals,
}

impl Outbox {
    /// Runs until `shutdown`; then lets in-flight uploads finish within the grace period.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Totals {
        self.sweep_stale_uploads().await;
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
            crate::status::STATS.outbox_queue(state.pending.len(), state.in_flight.len());
            let wake = state.next_wake();
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(path) = next_hint(&mut hints) => {
                    // Take the whole burst before the next dispatch pass.
                    let now = Instant::now();
                    state.consider(&path, now);
                    while let Some(path) = hints.as_mut().and_then(|h| h.try_recv().ok()) {
                        state.consider(&path, now);
                    }
                }
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

/// Whether this process's first outbox scan has begun (see `State::first_scan`).
static LEFTOVER_CLAIMS_SEEN: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl State {
    fn new(outbox: Arc<Outbox>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(outbox.transfer.concurrency)),
            clock: plan::WallClock::new(Instant::now(), SystemTime::now()),
            outbox,
            pending: HashMap::new(),
            in_flight: HashSet::new(),
            dirty: HashSet::new(),
            backoff: HashMap::new(),
            quarantined: HashMap::new(),
            unmoved: HashMap::new(),
            skipped: HashSet::new(),
            first_scan: !LEFTOVER_CLAIMS_SEEN.swap(true, std::sync::atomic::Ordering::Relaxed),
            retry: true,
            backlog: false,
            tasks: JoinSet::new(),
            totals: Totals::default(),
        }
    }

    /// Walks the whole outbox; every file found becomes a candidate.
    fn scan_all(&mut self) {
        let root = self.outbox.config.dir.clone();
        self.walk(&root, Instant::now());
        self.first_scan = false;
        crate::status::STATS.rescanned();
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
                    Ok(_) if self.first_scan => match claim::give_back_leftover(&path) {
                        Ok(Some(back)) => {
                            let recorded = self.outbox.stamp_of(&back).and_then(|stamp| {
                                Some((self.recorded_as_sent(&back, stamp)?, stamp))
                            });
                            tracing::info!(path = %back.display(), recorded = recorded.is_some(), "gave back the name of a sent file that a stopped daemon was taking away");
                            if let Some(sent) = recorded {
                                // Its upload is on record: only after_upload is left to do.
                                self.unmoved.insert(back.clone(), sent);
                            }
                            self.consider_file(&back, now, Found::ByScan);
                        }
                        Ok(None) => self.consider_file(&path, now, Found::ByScan),
                        Err(err) => {
                            tracing::error!(path = %path.display(), error = %err, "cannot give a sent file its name back; rename it without the leading dot and the .s3-exchange-claim suffix");
                        }
                    },
                    Ok(_) => self.consider_file(&path, now, Found::ByScan),
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
            Ok(_) => self.consider_file(path, now, Found::ByEvent),
            Err(_) => {
                self.pending.remove(path);
            }
        }
    }

    fn ignored(&self, path: &Path) -> bool {
        let Ok(rel) = path.strip_prefix(&self.outbox.config.dir) else {
            return true;
        };
        if self.through_link(rel) {
            return true;
        }
        // A sent file being taken away: never a file to send.
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| claim::claimed_from(n).is_some())
        {
            return true;
        }
        rel.components().any(|c| {
            c.as_os_str()
                .to_str()
                .is_some_and(|name| plan::is_ignored(name, &self.outbox.config.ignore))
        })
    }

    /// True if a folder on the way from the outbox to `rel` is a symlink: what lies
    /// behind it is outside the outbox and is never sent (a link to `/etc` must not
    /// upload, and then move away, what is written there).
    fn through_link(&self, rel: &Path) -> bool {
        let mut at = self.outbox.config.dir.clone();
        let mut components = rel.components().peekable();
        while let Some(component) = components.next() {
            if components.peek().is_none() {
                return false;
            }
            at.push(component);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return true;
            }
        }
        false
    }

    fn consider_file(&mut self, path: &Path, now: Instant, found: Found) {
        if self.ignored(path) {
            return;
        }
        let Some((stamp, changed_at)) = self.outbox.look_at(path) else {
            self.skip_once(path);
            return;
        };
        if self.in_flight.contains(path) {
            self.dirty.insert(path.to_owned());
            return;
        }
        if found == Found::ByEvent {
            // chmod (the fix for an unreadable file) changes neither size nor mtime:
            // any event on the path is worth another try.
            self.quarantined.remove(path);
        }
        if self.quarantined.get(path) == Some(&stamp) || self.already_kept(path, stamp) {
            return;
        }
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(path) {
            self.backlog = true;
            return;
        }
        let known = self.pending.contains_key(path);
        if known && found == Found::ByScan {
            return;
        }
        let quiet_since = self.quiet_since(path, changed_at, now);
        match self.pending.get_mut(path) {
            Some(c) => c.touched(stamp, quiet_since),
            None => {
                self.pending
                    .insert(path.to_owned(), Candidate::new(stamp, quiet_since));
            }
        }
    }

    /// Since when, on the monotonic clock, the file has been unchanged: `now`, or as far
    /// back as its change time vouches for, up to one settle time (see
    /// [`plan::WallClock`]). A finished folder moved in goes at once instead of after
    /// another settle time.
    fn quiet_since(&mut self, path: &Path, changed_at: SystemTime, now: Instant) -> Instant {
        let (mono, wall) = (Instant::now(), SystemTime::now());
        self.clock.sample(mono, wall);
        let settle = self.outbox.config.settle;
        let quiet = self.clock.quiet_since(changed_at, wall).min(settle);
        if quiet == settle && !settle.is_zero() {
            tracing::debug!(path = %path.display(), "settled already: unchanged for `settle` by its change time");
        }
        mono.checked_sub(quiet).unwrap_or(mono).min(now)
    }

    /// Forgets a path that is gone, and logs once why a path that is there is not sent.
    fn skip_once(&mut self, path: &Path) {
        self.pending.remove(path);
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if !self.skipped.insert(path.to_owned()) {
            return;
        }
        let why = if !meta.file_type().is_symlink() {
            "not a regular file"
        } else if self.outbox.config.follow_symlinks {
            "a symlink to a folder or to nothing (only links to files are followed)"
        } else {
            "a symlink (set outbox.follow_symlinks = true to send what links point to)"
        };
        tracing::warn!(path = %path.display(), "skipped: {why}");
    }

    /// With `after_upload = "keep"` the file stays: the ledger's stamp says it was sent.
    fn already_kept(&self, path: &Path, stamp: FileStamp) -> bool {
        if self.outbox.config.after_upload != AfterUpload::Keep {
            return false;
        }
        self.recorded_as_sent(path, stamp).is_some()
    }

    /// The key of the file at `path` if the ledger records it as sent with `stamp`.
    fn recorded_as_sent(&self, path: &Path, stamp: FileStamp) -> Option<ObjectKey> {
        let key = self.key_for(path).ok()?;
        let recorded = self.outbox.ledger.sent(&key).ok()??;
        (recorded.stamp == stamp).then_some(key)
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
        if self.backlog && self.pending.len() < MAX_PENDING / 2 {
            self.backlog = false;
            self.scan_all();
        }
        // While S3 does not answer, one upload at a time probes it.
        if self.outbox.store.is_down() && !self.in_flight.is_empty() {
            return;
        }
        // Only as many files as there are free permits can start: stat no more than
        // that (10,000 files dropped at once must not cost 10,000 stats per pass).
        let available = self.permits.available_permits();
        if available == 0 {
            return;
        }
        let now = Instant::now();
        let settle = self.outbox.config.settle;
        let mut ready = Vec::new();
        let mut gone = Vec::new();
        for (path, candidate) in &mut self.pending {
            if ready.len() == available {
                break;
            }
            if self.backoff.get(path).is_some_and(|b| b.until > now) {
                continue;
            }
            if candidate.due(settle) > now {
                continue;
            }
            match self.outbox.stamp_of(path) {
                Some(stamp) => {
                    if candidate.observe(stamp, now, settle) {
                        ready.push((path.clone(), candidate.stamp));
                    }
                }
                None => gone.push(path.clone()),
            }
        }
        for path in gone {
            self.pending.remove(&path);
        }
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
                    Some((key, _)) => {
                        drop(permit);
                        outbox.after_upload(&path, &key, stamp).await
                    }
                    None => outbox.send(&path, stamp, permit).await,
                };
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
                self.consider_file(&path, now, Found::ByEvent);
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
                crate::status::STATS.quarantined(&path, &reason);
                tracing::error!(path = %path.display(), reason = %reason, "quarantined: left in the outbox and not retried until it changes (or the daemon restarts)");
                self.quarantined.insert(path.clone(), stamp);
            }
        }
        if self.dirty.remove(&path) {
            self.consider_file(&path, now, Found::ByEvent);
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
        if self.outbox.store.is_down() {
            tracing::debug!(path = %path.display(), attempts, retry_in_ms = delay.as_millis() as u64, reason = %reason, "will retry");
        } else {
            tracing::warn!(path = %path.display(), attempts, retry_in_ms = delay.as_millis() as u64, reason = %reason, "will retry");
        }
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
                    // Waits for the aborted tasks to be dropped, so that their
                    // `abandoned` events come before the daemon's last lines.
                    self.tasks.shutdown().await;
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
}
