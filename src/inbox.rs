//! The inbox worker: poll -> plan -> download -> rename -> record.
//!
//! Each poll lists the inbox prefix page by page (memory bounded by a page and the
//! transfers in flight). A key is fetched only when the ledger has no record of it or a
//! different change token; the GET is pinned with `If-Match`, written to a temp file in
//! the inbox's hidden temp folder, checked (length, and MD5 where the ETag is one),
//! fsynced, renamed into place without following links, and only then recorded.
//!
//! A large object whose whole body nothing could check anyway (multipart ETag, no
//! full-object checksum: [`plan::download_shape`]) comes by several ranged GETs at once,
//! each pinned with `If-Match` and checked for its exact range and length, written at its
//! offset into the same temp file.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::group_commit::FolderSyncs;
use crate::keys::{ETag, ObjectKey, RelPath};
use crate::ledger::{self, Ledger, Received, Rejected};
use crate::localfs::{self, InboxRoot};
use crate::logging::{Direction, Transfer, error_chain};
use crate::md5::Md5;
use crate::plan::{self, Delivered, DownloadShape, Landing};
use crate::store::{ByteStream, Class, Listed, Store};

/// Immediate re-polls after a version change, at most, before the normal interval.
const MAX_QUICK_REPOLLS: u32 = 3;

/// Ranged GETs in flight at once for one download: several connections hide each
/// request's latency and the limits of one stream (s5cmd's parallel ranged GETs took a
/// 1 GiB delivery from the local Ceph RGW in half the time of our single GET, issue 8).
/// Measured there (benches/run.sh big): one GET 4.1 s, 4 ranges 2.98 s, 8 ranges 2.69 s
/// (s5cmd 2.45 s); peak RSS 47 -> 70 MiB. Memory stays bounded by the writer's queue,
/// not by the object's size.
const RANGES_IN_FLIGHT: usize = 8;

/// Ranged GETs in flight at once across all downloads. Each holds up to a few MiB of
/// buffers, so with `transfer.concurrency` big deliveries at once memory would grow with
/// the concurrency; this cap keeps it bounded. Two big deliveries go at full speed; more
/// take the slots in turn (first come, first served), so they progress together rather
/// than one after another. Small deliveries take no slot, but a big one waiting for slots
/// still holds its `transfer.concurrency` permit.
pub const RANGES_IN_FLIGHT_TOTAL: usize = 2 * RANGES_IN_FLIGHT;

/// What the inbox worker needs.
pub struct Inbox {
    pub config: config::Inbox,
    pub transfer: config::Transfer,
    pub store: Store,
    pub ledger: Arc<Ledger>,
    pub root: Arc<InboxRoot>,
    /// Notified (SIGUSR1) to poll now instead of at the end of the interval.
    pub poll_now: tokio::sync::Notify,
    /// [`RANGES_IN_FLIGHT_TOTAL`] slots, one taken by each ranged GET while it runs.
    pub range_slots: Semaphore,
    /// The fsyncs that make landings durable, shared by deliveries landing in the same
    /// folder at once.
    pub folder_syncs: FolderSyncs,
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
            // On a blocking thread: it walks the allocator's arenas under their locks.
            let _ = tokio::task::spawn_blocking(crate::memory::release_free).await;
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
                    tasks.spawn(async move { this.fetch(object, job, permit).await });
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
                        // Waits for the aborted tasks to be dropped, so that their
                        // `abandoned` events come before the daemon's last lines.
                        tasks.shutdown().await;
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

    /// Downloads one object, lands it and records it. `permit` is its transfer slot,
    /// given back once the file is in its place: making that durable and recording it
    /// wait for group commits (a few milliseconds in a burst) that must not keep the next
    /// download from starting.
    async fn fetch(
        &self,
        object: Listed,
        (rel, record): (RelPath, Option<Received>),
        permit: OwnedSemaphorePermit,
    ) -> Fetched {
        let mut transfer = Transfer::start(
            Direction::Download,
            &object.key,
            &self.root.path().join(rel.to_path()),
        );
        // Ranges are as large as the configured part size (16 MiB by default): AWS's
        // performance guidelines name 8 or 16 MiB as typical for ranged GETs, large enough
        // that a request's round trip and If-Match check are a small share of its time,
        // small enough that several in flight keep connections busy on a 100 MiB
        // object, and, when the owner uploaded with the same part size, aligned with the
        // parts that servers such as Ceph RGW store apart.
        let shape = plan::download_shape(
            object.size,
            object.etag.as_ref(),
            object.full_object_checksum,
            self.transfer.multipart_threshold,
            self.transfer.part_size,
        );
        // Cancelled when this fetch is dropped (its task aborted at the end of the shutdown
        // grace): its writer thread, which outlives it, then removes the file instead of
        // landing it with no record to follow.
        let wanted = CancellationToken::new();
        let _abandon_on_drop = wanted.clone().drop_guard();
        let dest = Destination {
            root: Arc::clone(&self.root),
            rel,
            record,
            wanted,
        };
        let downloaded = match (shape, object.etag.as_ref()) {
            (DownloadShape::Ranged { range }, Some(etag)) => {
                self.download_ranged(&object, etag, range, dest).await
            }
            _ => self.download_whole(&object, dest).await,
        };
        // Landed (or not) before the slot is free: with `concurrency = 1` a delivery is in
        // its place before the next one is fetched, so of `x` and `x/y` the one listed
        // first wins, every time.
        drop(permit);
        let root_path = self.root.path();
        let retry_later = |err: &std::io::Error| {
            format!(
                "{err} (inbox {}); retrying at the next poll",
                root_path.display()
            )
        };
        let Downloaded { landed, size, etag } = match downloaded {
            Ok(downloaded) => downloaded,
            Err(DownloadError::Changed(err)) => {
                tracing::info!(key = %object.key, error = %err, "the object changed since the listing; listing again");
                transfer.called_off();
                return Fetched::Changed;
            }
            Err(DownloadError::Gone) => {
                tracing::info!(key = %object.key, "the object was deleted since the listing; nothing to fetch");
                transfer.called_off();
                return Fetched::Gone;
            }
            Err(DownloadError::Failed { error, quiet }) => {
                if quiet {
                    transfer.failed_quietly("failed", &error);
                } else {
                    transfer.failed("failed", &error);
                }
                return Fetched::Failed;
            }
            Err(DownloadError::Land(LandError::Blocked(reason))) => {
                transfer.failed("rejected", &reason);
                let mut totals = Totals::default();
                self.reject(&object.key, object.token(), &reason, &mut totals)
                    .await;
                return Fetched::Failed;
            }
            Err(DownloadError::Land(LandError::Io(err))) => {
                transfer.failed("failed", &retry_later(&err));
                return Fetched::Failed;
            }
        };
        // The rename is durable before the ledger says the key was received: a crash
        // must never leave a record of a file that is not there.
        if let Err(err) = self.folder_syncs.sync(landed.folder).await {
            transfer.failed("failed", &retry_later(&err));
            return Fetched::Failed;
        }
        transfer.landed_at(&root_path.join(&landed.rel));
        let received = Received {
            delivered: Delivered {
                token: object.token(),
                path: landed.rel,
                stamp: landed.stamp,
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

    /// One GET of the whole object, written, checked and landed by
    /// [`Inbox::write_and_land`].
    async fn download_whole(
        &self,
        object: &Listed,
        dest: Destination,
    ) -> Result<Downloaded, DownloadError> {
        let download = self
            .store
            .get_object(&object.key, object.etag.as_ref())
            .await
            .map_err(DownloadError::from_store)?;
        let etag = download.etag.clone().or_else(|| object.etag.clone());
        let (landed, size) = self.write_and_land(download, dest).await?;
        Ok(Downloaded { landed, size, etag })
    }

    /// Ranged GETs of `range` bytes, [`RANGES_IN_FLIGHT`] at once, all pinned to `etag`,
    /// written at their offsets into a new temp file by one blocking writer thread, which
    /// fsyncs and lands it only once every range arrived whole. Any failure (a range
    /// refused, cut short, a 412) stops the others and removes the temp file, as does the
    /// task's abort at the end of the shutdown grace (see [`Destination::wanted`]). No MD5
    /// is computed: nothing could be checked against it.
    async fn download_ranged(
        &self,
        object: &Listed,
        etag: &ETag,
        range: u64,
        dest: Destination,
    ) -> Result<Downloaded, DownloadError> {
        let size = object.size;
        // Created before any GET: an inbox that cannot take it costs no request.
        let root = Arc::clone(&self.root);
        let (temp, file) =
            joined(tokio::task::spawn_blocking(move || TempFile::create(root)).await)
                .map_err(|e| self.not_written(e))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Placed>(WRITE_QUEUE * RANGES_IN_FLIGHT);
        let writer = tokio::task::spawn_blocking(move || -> Result<Landed, WriteError> {
            write_at_offsets(&file, rx, size)?;
            dest.land(temp, None, size)
        });
        let mut ranges = futures_util::stream::iter(plan::byte_ranges(size, range))
            .map(|r| {
                let tx = tx.clone();
                async move {
                    // Never closed, so `acquire` cannot fail; the slot is held until the
                    // range is handed to the writer whole.
                    let _slot = self.range_slots.acquire().await.ok();
                    self.fetch_range(&object.key, etag, r, size, tx).await
                }
            })
            .buffer_unordered(RANGES_IN_FLIGHT);
        let mut failure = None;
        while let Some(done) = ranges.next().await {
            if let Err(err) = done {
                failure = Some(err);
                break;
            }
        }
        // Cancels the ranges still in flight: their bodies are dropped unread.
        drop(ranges);
        if failure.is_none() {
            // Fails only if the writer already failed: its error says why.
            let _ = tx.send(Placed::End).await;
        }
        drop(tx);
        let written = joined(writer.await).map_err(|e| self.not_written(e));
        let landed = match failure {
            // The writer stopped first (disk full, read-only): its error is the cause.
            Some(RangeError::WriterGone) => {
                return Err(written.err().unwrap_or_else(|| DownloadError::Failed {
                    error: "the writer of the download stopped".into(),
                    quiet: false,
                }));
            }
            Some(RangeError::Failed(err)) => return Err(err),
            None => written?,
        };
        Ok(Downloaded {
            landed,
            size,
            etag: Some(etag.clone()),
        })
    }

    /// One ranged GET: bytes `offset..offset+len` of the object, handed to the writer at
    /// their offsets. Fails if the body holds more or fewer bytes than asked.
    async fn fetch_range(
        &self,
        key: &ObjectKey,
        etag: &ETag,
        (offset, len): (u64, u64),
        size: u64,
        tx: tokio::sync::mpsc::Sender<Placed>,
    ) -> Result<(), RangeError> {
        let last = offset + len.saturating_sub(1);
        let failed = |cause: String, quiet: bool| {
            RangeError::Failed(DownloadError::Failed {
                error: format!("{key}: bytes {offset}-{last} of {size}: {cause}"),
                quiet,
            })
        };
        let mut body = match self.store.get_range(key, etag, (offset, len), size).await {
            Ok(body) => body,
            Err(err) if matches!(err.class, Class::Changed | Class::Gone) => {
                return Err(RangeError::Failed(DownloadError::from_store(err)));
            }
            Err(err) => return Err(failed(err.to_string(), err.unreachable)),
        };
        let end = offset + len;
        let mut at = offset;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                failed(
                    format!(
                        "the download broke off after {} of {len} bytes: {}",
                        at - offset,
                        error_chain(&e)
                    ),
                    false,
                )
            })?;
            let n = chunk.len() as u64;
            if n > end - at {
                return Err(failed(
                    format!("the server sent more than the {len} bytes asked"),
                    false,
                ));
            }
            if tx.send(Placed::At(at, chunk)).await.is_err() {
                return Err(RangeError::WriterGone);
            }
            at += n;
        }
        if at != end {
            return Err(failed(
                format!("the body ended after {} of {len} bytes", at - offset),
                false,
            ));
        }
        Ok(())
    }

    /// Streams the body into a new temp file, checks its length and (where the ETag is an
    /// MD5) its content, fsyncs it and lands it at `dest`: everything but the network on
    /// one blocking thread. The temp file is removed on any failure, and also when the
    /// download is abandoned (see [`Destination::wanted`]).
    async fn write_and_land(
        &self,
        mut download: crate::store::Download,
        dest: Destination,
    ) -> Result<(Landed, u64), DownloadError> {
        let expected = Expected {
            length: download.content_length,
            etag: download.etag.clone(),
            kms: download.kms,
        };
        let landed = match download.content_length {
            Some(length) if length <= SMALL_BODY => {
                gather_then_write(&mut download.body, length, expected, dest).await
            }
            _ => stream_to(&mut download.body, expected, dest).await,
        };
        landed.map_err(|e| self.not_written(e))
    }

    /// What a writer thread's failure means for the fetch.
    fn not_written(&self, err: WriteError) -> DownloadError {
        match err {
            WriteError::Body(error) => DownloadError::Failed {
                error,
                quiet: false,
            },
            WriteError::Create(e) => DownloadError::Failed {
                error: format!(
                    "cannot create a temporary file in {}: {e}",
                    self.root.path().join(localfs::TEMP_DIR).display()
                ),
                quiet: false,
            },
            WriteError::Disk(e) => DownloadError::Failed {
                error: format!("cannot write into {}: {e}", self.root.path().display()),
                quiet: false,
            },
            WriteError::Land(e) => DownloadError::Land(e),
            // Nobody waits for this one any more.
            WriteError::Abandoned => DownloadError::Failed {
                error: "abandoned at the end of the shutdown grace".into(),
                quiet: true,
            },
        }
    }
}

/// Where a download goes once it is written whole, checked and fsynced. The blocking
/// thread that wrote it lands it too, in the same call: a second blocking call for the
/// landing (`block_in_place`) cost about 1.3 more context switches per delivery (1,000 x
/// 4 KiB down: 13.1-13.5k against 12.0k).
struct Destination {
    root: Arc<InboxRoot>,
    rel: RelPath,
    /// What the ledger holds for the key, if anything (see [`plan::landing`]).
    record: Option<Received>,
    /// Cancelled once the fetch is gone (its task aborted at the end of the shutdown grace,
    /// while a writer thread, which cannot be aborted, still writes or fsyncs). Checked
    /// just before the rename: a delivery landed then would never be recorded, and a
    /// consumer could take it before the next start fetches it again; and after a reload
    /// the old thread could land an old version beside a newer one.
    wanted: CancellationToken,
}

impl Destination {
    /// Checks a single GET's body against what was announced, fsyncs it and lands it.
    fn check_and_land(
        &self,
        temp: TempFile,
        file: &std::fs::File,
        (md5, size): ([u8; 16], u64),
        expected: &Expected,
    ) -> Result<(Landed, u64), WriteError> {
        expected.check(&md5, size)?;
        file.sync_all()?;
        Ok((self.land(temp, Some(&md5), size)?, size))
    }

    /// Puts the temp file in its place (see [`Destination::rename_into_place`]), unless the fetch was abandoned; if
    /// it does not, the temp file goes.
    fn land(
        &self,
        temp: TempFile,
        md5: Option<&[u8; 16]>,
        size: u64,
    ) -> Result<Landed, WriteError> {
        if self.wanted.is_cancelled() {
            return Err(WriteError::Abandoned);
        }
        let landed = self.rename_into_place(temp.name(), md5, size)?;
        temp.keep();
        Ok(landed)
    }

    /// Renames the verified temp file to its place (or beside a file the user changed).
    fn rename_into_place(
        &self,
        temp: &str,
        md5: Option<&[u8; 16]>,
        size: u64,
    ) -> Result<Landed, LandError> {
        let (root, rel) = (&*self.root, &self.rel);
        let dir = root.open_parent(rel).map_err(|e| match e.kind() {
            // A file or a symlink where a folder must be: this key can never land.
            std::io::ErrorKind::NotADirectory => LandError::Blocked(e.to_string()),
            _ => LandError::Io(e),
        })?;
        let name = rel.file_name();
        // Only a regular file of the same size is compared: by the download's MD5 where it
        // computed one, else byte for byte against the temp file.
        let same_content = |file| match md5 {
            Some(md5) => Ok(localfs::md5_file(file)? == *md5),
            None => localfs::same_bytes(file, root.open_temp(temp)?),
        };
        let existing = root.existing(&dir, name, same_content, size)?;
        let rel_str = rel.to_string();
        if plan::landing(
            existing,
            self.record.as_ref().map(|r| &r.delivered),
            &rel_str,
        ) == Landing::Path
        {
            // Over a file only where the look above found one to replace: a file made at
            // the name since then is kept, and the delivery lands beside it.
            let replace = existing != plan::Existing::Nothing;
            match root.land(temp, &dir, name, replace) {
                Ok(stamp) => {
                    return Ok(Landed {
                        rel: rel_str,
                        stamp,
                        folder: dir,
                    });
                }
                Err(e) if !replace && e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
        }
        let tag = plan::time_tag(std::time::SystemTime::now());
        for beside in plan::names_to_try(name, &tag).skip(1) {
            if InboxRoot::taken(&dir, &beside) {
                continue;
            }
            match root.land(temp, &dir, &beside, false) {
                Ok(stamp) => {
                    tracing::warn!(path = %rel_str, new_version = %beside, "the local copy was changed (or is not ours): kept it, the new version lands beside it");
                    let parent = rel_str
                        .rsplit_once('/')
                        .map_or(String::new(), |(p, _)| format!("{p}/"));
                    return Ok(Landed {
                        rel: format!("{parent}{beside}"),
                        stamp,
                        folder: dir,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(localfs::no_free_name(std::path::Path::new(&rel_str)).into())
    }
}

/// A delivery renamed into its place, not yet durable: the caller fsyncs `folder`.
struct Landed {
    /// Its path relative to the inbox (beside the key's own path if that was taken).
    rel: String,
    stamp: plan::FileStamp,
    folder: OwnedFd,
}

/// A download in its place.
struct Downloaded {
    landed: Landed,
    size: u64,
    etag: Option<ETag>,
}

/// What a single GET's body must be: as long as announced, and where the ETag is an MD5
/// (and not an SSE-KMS one), of that MD5.
struct Expected {
    length: Option<u64>,
    etag: Option<ETag>,
    kms: bool,
}

impl Expected {
    fn check(&self, md5: &[u8; 16], size: u64) -> Result<(), WriteError> {
        if let Some(length) = self.length
            && length != size
        {
            return Err(WriteError::Body(format!(
                "got {size} bytes, expected {length}"
            )));
        }
        match plan::md5_mismatch(self.etag.as_ref(), self.kms, md5) {
            Some(mismatch) => Err(WriteError::Body(mismatch)),
            None => Ok(()),
        }
    }
}

/// A download's temp file, removed on drop unless it landed ([`TempFile::keep`]).
///
/// It is created, written and landed (or removed) on blocking threads, never on the
/// runtime's: a create is file system work that holds the temp folder's lock and can take
/// long (on this machine's journal-less ext4, 0.6-1.2 ms where many files had been deleted
/// in the last minutes, against 25 us), and on a runtime thread it would hold up every
/// other transfer. It owns its handle on the inbox so that it can outlive the fetch: a
/// download abandoned while its writer thread runs is removed by that thread (see
/// [`Destination::wanted`]).
struct TempFile {
    root: Arc<InboxRoot>,
    name: String,
    kept: bool,
}

impl TempFile {
    /// Creates a new, empty temp file. Blocking.
    fn create(root: Arc<InboxRoot>) -> Result<(Self, std::fs::File), WriteError> {
        let (name, file) = root.create_temp().map_err(WriteError::Create)?;
        let temp = Self {
            root,
            name,
            kept: false,
        };
        Ok((temp, file))
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// It was renamed into its place: nothing to remove.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            self.root.remove_temp(&self.name);
        }
    }
}

/// Why a download did not land.
enum DownloadError {
    /// The object changed between the listing and a GET (412): list again.
    Changed(crate::store::Error),
    /// The object was deleted between the listing and a GET (404).
    Gone,
    /// Anything else: logged as the transfer's failure (quietly while S3 is
    /// unreachable), fetched again at the next poll.
    Failed { error: String, quiet: bool },
    /// Written whole and checked, but it cannot go to its place.
    Land(LandError),
}

impl DownloadError {
    fn from_store(err: crate::store::Error) -> Self {
        match err.class {
            Class::Changed => Self::Changed(err),
            Class::Gone => Self::Gone,
            _ => Self::Failed {
                quiet: err.unreachable,
                error: err.to_string(),
            },
        }
    }
}

/// Why one ranged GET stopped.
enum RangeError {
    /// The writer thread is gone (it failed: its error is the cause).
    WriterGone,
    Failed(DownloadError),
}

/// What the range readers hand the writer thread of a ranged download.
enum Placed {
    /// Bytes of the object at this offset.
    At(u64, bytes::Bytes),
    /// Every range arrived whole: fsync and land.
    End,
}

/// Writes the pieces arriving on `rx` at their offsets into `file` (one `pwrite` each:
/// ranges arrive interleaved, and a buffer per range would only copy the bytes again),
/// and fsyncs once `End` came and exactly `size` bytes were written. Without an `End` (a
/// range failed, the download was abandoned) it stops with `Interrupted` and syncs
/// nothing. Runs on a blocking thread.
fn write_at_offsets(
    file: &std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<Placed>,
    size: u64,
) -> std::io::Result<()> {
    let mut written = 0u64;
    let mut writeback = localfs::Writeback::default();
    loop {
        match rx.blocking_recv() {
            Some(Placed::At(offset, chunk)) => {
                file.write_all_at(&chunk, offset)?;
                written += chunk.len() as u64;
                writeback.wrote(file, chunk.len() as u64);
            }
            Some(Placed::End) => break,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the download ended before its ranges did",
                ));
            }
        }
    }
    if written != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("wrote {written} bytes of {size}"),
        ));
    }
    file.sync_all()
}

/// What the body reader hands the writer thread.
enum Piece {
    Chunk(bytes::Bytes),
    /// The body is complete: flush, check, fsync and land.
    End,
}

/// How many body chunks may wait for the writer thread while the disk catches up: bounds
/// a download's memory (hyper hands out chunks of at most a few dozen KiB).
const WRITE_QUEUE: usize = 8;

/// Bodies up to this size are gathered in memory and written in one blocking call (see
/// [`gather_then_write`]); at the default concurrency of 128 that is at most 32 MiB, the
/// same as the 256 KiB write buffers of as many streaming writers.
const SMALL_BODY: u64 = 256 << 10;

/// Why a writer thread did not land its download.
enum WriteError {
    /// The body broke off, or is not what the server announced: why.
    Body(String),
    /// The temp file could not be created.
    Create(std::io::Error),
    /// The disk (or the writer thread) failed.
    Disk(std::io::Error),
    /// Written whole and checked, but it cannot go to its place.
    Land(LandError),
    /// The fetch is gone (see [`Destination::wanted`]).
    Abandoned,
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        Self::Disk(e)
    }
}

impl From<LandError> for WriteError {
    fn from(e: LandError) -> Self {
        Self::Land(e)
    }
}

/// A writer thread's result, its panic counted as a failure of the disk.
fn joined<T>(
    written: Result<Result<T, WriteError>, tokio::task::JoinError>,
) -> Result<T, WriteError> {
    written.unwrap_or_else(|e| {
        Err(WriteError::Disk(std::io::Error::other(format!(
            "the writer of the download failed: {e}"
        ))))
    })
}

/// A body of known small size is gathered in memory first and then written, hashed,
/// checked, fsynced and landed in one blocking call: the download holds a blocking thread
/// only for its disk work, not while it waits for the network. With 128 deliveries of a
/// few KiB at once, a writer thread each while waiting made 150 to 190 threads and a
/// 256 KiB buffer each (the daemon grew to 170 MiB over 100,000 of them).
async fn gather_then_write(
    body: &mut ByteStream,
    length: u64,
    expected: Expected,
    dest: Destination,
) -> Result<(Landed, u64), WriteError> {
    let mut chunks = Vec::with_capacity(1);
    let mut gathered = 0u64;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                gathered += chunk.len() as u64;
                if gathered > length {
                    // A broken server: the HTTP client holds to Content-Length.
                    return Err(WriteError::Body(format!(
                        "got more than the {length} bytes announced"
                    )));
                }
                chunks.push(chunk);
            }
            Err(e) => {
                return Err(WriteError::Body(format!(
                    "the download broke off: {}",
                    error_chain(&e)
                )));
            }
        }
    }
    joined(tokio::task::spawn_blocking(move || write_chunks(&chunks, &expected, &dest)).await)
}

/// Streams a body of unknown or large size: read here, written, hashed, checked, fsynced
/// and landed on a blocking thread of its own, so the network and the disk work at once
/// and the runtime's workers never block (a `block_in_place` per chunk cost a thread
/// hand-off per chunk: 35 s for 1 GiB). Only an explicit `End` makes the writer go on
/// past the writing: a body that broke off (or a task dropped mid-way) is not worth
/// syncing.
async fn stream_to(
    body: &mut ByteStream,
    expected: Expected,
    dest: Destination,
) -> Result<(Landed, u64), WriteError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(WRITE_QUEUE);
    let writer = tokio::task::spawn_blocking(move || write_and_hash(rx, &expected, &dest));
    let mut broke_off = None;
    while let Some(chunk) = body.next().await {
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
    let landed = joined(writer.await);
    // A body that broke off is the reason, whatever its writer made of the rest.
    match broke_off {
        Some(reason) => Err(WriteError::Body(reason)),
        None => landed,
    }
}

/// Writes gathered chunks into a new temp file, hashing them; checks, fsyncs and lands it.
fn write_chunks(
    chunks: &[bytes::Bytes],
    expected: &Expected,
    dest: &Destination,
) -> Result<(Landed, u64), WriteError> {
    let (temp, mut file) = TempFile::create(Arc::clone(&dest.root))?;
    let mut hasher = Md5::new();
    let mut size = 0u64;
    for chunk in chunks {
        hasher.update(chunk);
        size += chunk.len() as u64;
        file.write_all(chunk)?;
    }
    dest.check_and_land(temp, &file, (hasher.finalize(), size), expected)
}

/// Writes the chunks arriving on `rx` into a new temp file, hashing them on the way, and
/// once the body is complete checks, fsyncs and lands it; returns where it landed and its
/// length. Without an `End` (the body broke off, the download was abandoned) it stops,
/// syncs nothing and removes the temp file. Runs on a blocking thread.
fn write_and_hash(
    mut rx: tokio::sync::mpsc::Receiver<Piece>,
    expected: &Expected,
    dest: &Destination,
) -> Result<(Landed, u64), WriteError> {
    let (temp, file) = TempFile::create(Arc::clone(&dest.root))?;
    let mut file = std::io::BufWriter::with_capacity(256 << 10, file);
    let mut hasher = Md5::new();
    let mut size = 0u64;
    let mut writeback = localfs::Writeback::default();
    loop {
        match rx.blocking_recv() {
            Some(Piece::Chunk(chunk)) => {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk)?;
                writeback.wrote(file.get_ref(), chunk.len() as u64);
            }
            Some(Piece::End) => break,
            // The reader stopped (its body broke off, which is the reason it gives) or
            // was dropped.
            None => return Err(WriteError::Abandoned),
        }
    }
    let file = file.into_inner().map_err(|e| e.into_error())?;
    dest.check_and_land(temp, &file, (hasher.finalize(), size), expected)
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

/// `interval` +- 10%, so that many clients do not poll in lockstep.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Prefix;

    fn destination(root: &Arc<InboxRoot>, key: &str) -> Destination {
        let rel = RelPath::from_key(
            &Prefix::new("D/").expect("prefix"),
            &ObjectKey::from_listing(format!("D/{key}")),
        )
        .expect("valid key");
        Destination {
            root: Arc::clone(root),
            rel,
            record: None,
            wanted: CancellationToken::new(),
        }
    }

    fn temp_files(inbox: &std::path::Path) -> usize {
        std::fs::read_dir(inbox.join(localfs::TEMP_DIR))
            .expect("ls")
            .count()
    }

    #[test]
    fn a_checked_body_lands_and_a_damaged_one_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = Arc::new(InboxRoot::open(tmp.path()).expect("open"));
        let body = [bytes::Bytes::from_static(b"hello")];
        let md5 = plan::hex(&Md5::digest(b"hello"));
        let expected = |length, etag: &str| Expected {
            length: Some(length),
            etag: Some(ETag::new(format!("\"{etag}\""))),
            kms: false,
        };
        let (landed, size) = write_chunks(&body, &expected(5, &md5), &destination(&root, "a/ok"))
            .unwrap_or_else(|_| panic!("landed"));
        assert_eq!((landed.rel.as_str(), size), ("a/ok", 5));
        assert_eq!(
            std::fs::read(tmp.path().join("a/ok")).expect("read"),
            b"hello"
        );

        let wrong_md5 = "0123456789abcdef0123456789abcdef";
        for (expected, why) in [
            (expected(6, &md5), "got 5 bytes, expected 6"),
            (expected(5, wrong_md5), "does not match the ETag"),
        ] {
            match write_chunks(&body, &expected, &destination(&root, "a/bad")) {
                Err(WriteError::Body(reason)) => assert!(reason.contains(why), "{reason}"),
                _ => panic!("a damaged body must not land"),
            }
        }
        assert!(!tmp.path().join("a/bad").exists());
        assert_eq!(temp_files(tmp.path()), 0);
    }

    #[test]
    fn an_abandoned_download_is_removed_not_landed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = Arc::new(InboxRoot::open(tmp.path()).expect("open"));
        let dest = destination(&root, "late.txt");
        // The fetch is dropped while its writer thread still works.
        drop(dest.wanted.clone().drop_guard());
        let body = [bytes::Bytes::from_static(b"late")];
        let expected = Expected {
            length: Some(4),
            etag: None,
            kms: false,
        };
        assert!(matches!(
            write_chunks(&body, &expected, &dest),
            Err(WriteError::Abandoned)
        ));
        assert!(!tmp.path().join("late.txt").exists());
        assert_eq!(temp_files(tmp.path()), 0);
    }
}
