//! One outbox file's upload, from a settled file to an [`Outcome`]: the key, a single
//! PUT or a resumable multipart upload, the ledger record, then `after_upload`.
//!
//! The worker in [`crate::outbox`] decides *when* a file goes; this module decides
//! *how*. An upload counts only if the file is unchanged from the first byte read to
//! S3's confirmation; only then is it recorded, and only after the record is durable is
//! the file moved, deleted or kept.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use futures_util::StreamExt;

use crate::claim::{self, Claim};
use crate::config::{self, AfterUpload};
use crate::keys::{ETag, ObjectKey};
use crate::ledger::{self, Sent, Upload, UploadedPart};
use crate::localfs;
use crate::logging::{Direction, Transfer};
use crate::md5::Md5;
use crate::outbox::Outbox;
use crate::plan::{self, FileStamp, UploadShape};
use crate::store::{self, Class};

/// Parts of one multipart upload in flight at once: each part is hashed (Content-MD5)
/// and then sent, so several at once keep both the disk and the network busy. 1 GiB to
/// the local Ceph RGW (benches/run.sh big): 4 parts 6.31 s, 8 parts 6.12 s (s5cmd 5.7 s).
const PARTS_IN_FLIGHT: usize = 8;

/// Parts in flight at once across all multipart uploads, so that `transfer.concurrency`
/// big files at once do not mean `concurrency` times [`PARTS_IN_FLIGHT`] streams (and
/// their buffers): two big files go at full speed, more take the slots in turn (first
/// come, first served) and progress together.
pub const PARTS_IN_FLIGHT_TOTAL: usize = 2 * PARTS_IN_FLIGHT;

/// Files up to this size are read into memory once, hashed and sent from there: one
/// open and one read instead of two of each, and the bytes hashed are the bytes sent.
/// Small enough that `transfer.concurrency` of them at once stay a few MiB.
const IN_MEMORY_MAX: u64 = 64 << 10;

/// How one file's attempt ended.
pub(crate) enum Outcome {
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

impl Outbox {
    /// The stamp of the file at `path` as the upload sees it: links are followed only
    /// with `follow_symlinks`, and only to regular files.
    pub(crate) fn stamp_of(&self, path: &Path) -> Option<FileStamp> {
        self.look_at(path).map(|(stamp, _)| stamp)
    }

    /// Whether opening an outbox file follows a symlink in its place: only where its stamp
    /// was taken through one (see [`Self::look_at`]).
    fn links(&self) -> localfs::Links {
        if self.config.follow_symlinks {
            localfs::Links::Follow
        } else {
            localfs::Links::NotFollowed
        }
    }

    /// The stamp of the file at `path` (see [`Self::stamp_of`]) and when it last changed.
    pub(crate) fn look_at(&self, path: &Path) -> Option<(FileStamp, SystemTime)> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        let meta = if meta.file_type().is_symlink() && self.config.follow_symlinks {
            std::fs::metadata(path).ok()?
        } else {
            meta
        };
        meta.is_file()
            .then(|| (localfs::stamp_of(&meta), localfs::changed_at(&meta)))
    }

    /// Uploads one settled file and applies `after_upload`. `permit` is its transfer
    /// slot, given back as soon as S3 answered: recording the upload and moving the file
    /// wait for group commits (a few milliseconds in a burst) that must not keep the
    /// next file from starting.
    pub(crate) async fn send(
        &self,
        path: &Path,
        stamp: FileStamp,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Outcome {
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
        // `stamp` was taken by the worker just before this task started. The file is
        // opened only if it still is what the worker saw settle, and a big one is checked
        // again before each body (`still_settled`); the look after the upload decides:
        // it counts only if the file is still exactly that.
        let result = self.upload(&key, path, rel, stamp).await;
        drop(permit);
        let after = self.stamp_of(path);
        // A failure may come from the file, not from S3: a body read by name (where
        // /proc is missing, see `localfs::SettledFile`) from a file that vanished or
        // changed surfaces inside the SDK as a dispatch error.
        let result = match (result, after) {
            (Err(_), None) => {
                transfer.failed("vanished", &"the file vanished during the upload");
                return Outcome::Vanished;
            }
            (Err(_), Some(now)) if now != stamp => Err(UploadError::Changed),
            (result, _) => result,
        };
        let (etag, checksum) = match result {
            Ok(done) => done,
            Err(UploadError::Changed) => {
                transfer.failed("changed", &"the file changed during the upload");
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
                if err.unreachable {
                    transfer.failed_quietly("failed", &err);
                } else {
                    transfer.failed("failed", &err);
                }
                return match err.class {
                    Class::Permanent => Outcome::Quarantine(err.to_string()),
                    _ => Outcome::Retry(err.to_string()),
                };
            }
        };
        // The upload counts only if the file is still what was read.
        if after != Some(stamp) {
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
        self.after_upload(path, &key, stamp).await
    }

    /// Single PUT or multipart, by size; falls back to a single PUT when the bucket
    /// denies parts.
    async fn upload(
        &self,
        key: &ObjectKey,
        path: &Path,
        rel: &Path,
        stamp: FileStamp,
    ) -> Result<(Option<ETag>, String), UploadError> {
        let single_only =
            self.parts_denied.load(Ordering::Relaxed) && stamp.size <= config::MAX_SINGLE_PUT;
        let shape = plan::upload_shape(
            stamp.size,
            self.transfer.multipart_threshold,
            self.transfer.part_size,
        );
        let part_size = match shape {
            UploadShape::Multipart { part_size, .. } if !single_only => part_size,
            _ => return self.put_single(key, path, stamp).await,
        };
        match self.put_multipart(key, path, rel, stamp, part_size).await {
            Err(UploadError::S3(err))
                if is_parts_denied(&err) && stamp.size <= config::MAX_SINGLE_PUT =>
            {
                self.parts_denied.store(true, Ordering::Relaxed);
                tracing::warn!(key = %key, error = %err, "the bucket accepts multipart uploads but denies their parts; sending files up to 5GiB as single PUTs from now on");
                self.put_single(key, path, stamp).await
            }
            other => other,
        }
    }

    async fn put_single(
        &self,
        key: &ObjectKey,
        path: &Path,
        stamp: FileStamp,
    ) -> Result<(Option<ETag>, String), UploadError> {
        let size = stamp.size;
        if size <= IN_MEMORY_MAX {
            let (bytes, md5) = read_small(path, stamp, self.links())
                .await
                .map_err(UploadError::Local)?;
            let etag = self.store.put_object_bytes(key, bytes.into(), &md5).await?;
            return Ok((etag, plan::hex(&md5)));
        }
        let file = open_big(path, stamp, self.links()).await?;
        let md5 = hash_range(&file, 0, size).await?;
        self.still_settled(path, stamp)?;
        let etag = self
            .store
            .put_object(key, file.body_path(), size, &md5)
            .await?;
        Ok((etag, plan::hex(&md5)))
    }

    /// Fails with `Changed` once the file at `path` is no longer the one that settled.
    /// Why, before each body: it is read through a descriptor opened once
    /// ([`localfs::SettledFile`]), which a deleted or replaced file does not stop, so
    /// without this a file the user deleted (to free the disk, say) would go on being
    /// sent, part after part, until the check before the upload completes.
    fn still_settled(&self, path: &Path, stamp: FileStamp) -> Result<(), UploadError> {
        if self.stamp_of(path) == Some(stamp) {
            Ok(())
        } else {
            Err(UploadError::Changed)
        }
    }

    /// A multipart upload that survives restarts: the UploadId and every accepted part
    /// are recorded, so the next attempt sends only the missing parts. Aborted (and
    /// forgotten) when it cannot complete: the file changed, or S3 refused for good.
    async fn put_multipart(
        &self,
        key: &ObjectKey,
        path: &Path,
        rel: &Path,
        stamp: FileStamp,
        part_size: u64,
    ) -> Result<(Option<ETag>, String), UploadError> {
        let resumed = self.resumable(key, stamp, part_size).await;
        // Opened before any request: a file gone or replaced since it settled costs no
        // CreateMultipartUpload (and no abort after it).
        let file = match open_big(path, stamp, self.links()).await {
            Ok(file) => file,
            Err(err) => {
                let failed = Err(err);
                if let Some(upload) = &resumed {
                    self.conclude(key, path, stamp, &upload.upload_id, &failed)
                        .await;
                }
                return failed;
            }
        };
        let fresh = resumed.is_none();
        let mut upload = match resumed {
            Some(upload) => {
                tracing::info!(key = %key, parts_done = upload.parts.len(), "resuming the multipart upload");
                upload
            }
            None => Upload {
                upload_id: self.store.create_multipart(key).await?,
                path: rel.to_string_lossy().into_owned(),
                stamp,
                part_size,
                parts: Vec::new(),
            },
        };
        if let Err(err) = self.remember(key, &upload).await {
            // Not recorded, so no later attempt would find it to resume or abort.
            if fresh {
                self.abort(key, &upload.upload_id).await;
            }
            return Err(err);
        }
        let mut result = self.send_parts(key, path, stamp, &file, &mut upload).await;
        self.conclude(key, path, stamp, &upload.upload_id, &result)
            .await;
        if let Err(UploadError::S3(err)) = &mut result
            && err.code.as_deref() == Some("NoSuchUpload")
        {
            self.start_over(key, stamp, err);
        }
        result
    }

    /// After `NoSuchUpload` (the upload is aborted and forgotten by then, as a permanent
    /// refusal): the server no longer knows the upload. The owner's lifecycle rule
    /// aborted it (a daemon stopped for days), or an earlier try completed it and its
    /// answer was lost. Nothing is wrong with the file, so it goes again as a new upload,
    /// once: a server that forgets that one too is at fault, and the file is quarantined.
    fn start_over(&self, key: &ObjectKey, stamp: FileStamp, err: &mut store::Error) {
        let first = self
            .started_over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((key.clone(), stamp));
        if first {
            tracing::info!(key = %key, "the server no longer knows this multipart upload (a lifecycle rule aborted it, or a completion's answer was lost): the file goes again as a new upload");
            err.class = Class::Transient;
        } else {
            err.message.push_str(
                "; the server forgot a second multipart upload of this file: check the bucket's lifecycle rule (AbortIncompleteMultipartUpload) or the server, or raise transfer.multipart_threshold so the file goes as one PUT",
            );
        }
    }

    /// After an attempt at the multipart upload `upload_id`: forgets it once complete,
    /// keeps it to be resumed after a transient failure of an unchanged file, and aborts
    /// it otherwise.
    async fn conclude(
        &self,
        key: &ObjectKey,
        path: &Path,
        stamp: FileStamp,
        upload_id: &str,
        result: &Result<(Option<ETag>, String), UploadError>,
    ) {
        let unchanged = self.stamp_of(path) == Some(stamp);
        let keep_for_resume = unchanged
            && (matches!(result, Err(UploadError::S3(e)) if e.class == Class::Transient)
                || matches!(result, Err(UploadError::Local(_))));
        if result.is_ok() {
            self.forget(key).await;
        } else if !keep_for_resume {
            self.abort(key, upload_id).await;
        }
    }

    async fn send_parts(
        &self,
        key: &ObjectKey,
        path: &Path,
        stamp: FileStamp,
        file: &Arc<localfs::SettledFile>,
        upload: &mut Upload,
    ) -> Result<(Option<ETag>, String), UploadError> {
        let part_size = upload.part_size;
        let count = stamp.size.div_ceil(part_size);
        let done: std::collections::HashSet<i32> = upload.parts.iter().map(|p| p.number).collect();
        let upload_id = upload.upload_id.clone();
        let mut parts = futures_util::stream::iter(1..=count)
            .filter_map(|n| {
                let number = i32::try_from(n).unwrap_or(i32::MAX);
                std::future::ready((!done.contains(&number)).then_some((n, number)))
            })
            .map(|(n, number)| {
                let upload_id = upload_id.as_str();
                async move {
                    // Never closed, so `acquire` cannot fail.
                    let _slot = self.part_slots.acquire().await.ok();
                    let offset = (n - 1) * part_size;
                    let len = part_size.min(stamp.size - offset);
                    let md5 = hash_range(file, offset, len).await?;
                    self.still_settled(path, stamp)?;
                    let part = self
                        .store
                        .upload_part(key, upload_id, number, file.body_path(), offset, len, &md5)
                        .await?;
                    Ok::<_, UploadError>(UploadedPart {
                        number,
                        etag: part.etag,
                        md5: plan::hex(&md5),
                    })
                }
            })
            .buffer_unordered(PARTS_IN_FLIGHT);
        while let Some(part) = parts.next().await {
            upload.parts.push(part?);
            self.remember(key, upload).await?;
        }
        drop(parts);
        self.still_settled(path, stamp)?;
        upload.parts.sort_by_key(|p| p.number);
        let completed: Vec<store::Part> = upload
            .parts
            .iter()
            .map(|p| store::Part {
                number: p.number,
                etag: p.etag.clone(),
            })
            .collect();
        let etag = self
            .store
            .complete_multipart(key, &upload.upload_id, &completed)
            .await?;
        let checksum = composite_checksum(&upload.parts);
        Ok((etag, checksum))
    }

    /// The recorded upload for `key` if it can continue: same file, same part size.
    /// One that cannot is aborted.
    async fn resumable(&self, key: &ObjectKey, stamp: FileStamp, part_size: u64) -> Option<Upload> {
        let upload = self.ledger.upload(key).ok().flatten()?;
        if upload.stamp == stamp && upload.part_size == part_size {
            return Some(upload);
        }
        tracing::info!(key = %key, "the file changed since its multipart upload started: aborting that upload");
        self.abort(key, &upload.upload_id).await;
        None
    }

    async fn remember(&self, key: &ObjectKey, upload: &Upload) -> Result<(), UploadError> {
        self.ledger
            .record_upload(key, upload)
            .await
            .map_err(|e| UploadError::Local(std::io::Error::other(e.to_string())))
    }

    async fn forget(&self, key: &ObjectKey) {
        if let Err(err) = self.ledger.forget_upload(key).await {
            tracing::warn!(key = %key, error = %err, "cannot forget the finished multipart upload");
        }
    }

    /// Aborts and forgets a multipart upload that will not complete.
    pub(crate) async fn abort(&self, key: &ObjectKey, upload_id: &str) {
        match self.store.abort_multipart(key, upload_id).await {
            Ok(()) => {}
            Err(err) if err.class == Class::Gone || err.code.as_deref() == Some("NoSuchUpload") => {
            }
            Err(err) => {
                tracing::warn!(key = %key, error = %err, "could not abort a multipart upload; its parts stay until the bucket's lifecycle rule removes them");
            }
        }
        self.forget(key).await;
    }

    /// Start-up sweep: multipart uploads recorded for files that are gone or changed
    /// can never complete; abort them so their parts do not linger.
    pub(crate) async fn sweep_stale_uploads(&self) {
        let uploads = match self.ledger.uploads() {
            Ok(u) => u,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the multipart uploads in progress");
                return;
            }
        };
        for (key, upload) in uploads {
            if self.stamp_of(&self.config.dir.join(&upload.path)) != Some(upload.stamp) {
                tracing::info!(key = %key, "aborting the multipart upload of a file that changed or vanished");
                self.abort(&key, &upload.upload_id).await;
            }
        }
    }

    /// Applies `after_upload` to a file whose upload is recorded, if the file at `path`
    /// still is the one sent (`stamp`): it is claimed first (see [`crate::claim`]), so a
    /// new file put under its name after the upload is left where it is, to go in its
    /// turn.
    pub(crate) async fn after_upload(
        &self,
        path: &Path,
        key: &ObjectKey,
        stamp: FileStamp,
    ) -> Outcome {
        let sent_to = match self.config.after_upload {
            AfterUpload::Keep => return Outcome::Done,
            AfterUpload::Delete => None,
            AfterUpload::Move => {
                let rel = path.strip_prefix(&self.config.dir).unwrap_or(path);
                Some(self.config.sent_dir.join(rel))
            }
        };
        let src = path.to_owned();
        let links = self.links();
        let result = blocking(move || {
            let held = match claim::claim(&src, stamp, links)? {
                Claim::Held(held) => held,
                Claim::Gone => return Ok(Away::Gone),
                Claim::Replaced => return Ok(Away::Replaced),
            };
            let Some(dest) = sent_to else {
                return held.remove().map(|()| Away::Deleted);
            };
            let tag = plan::time_tag(SystemTime::now());
            let held_path = held.path();
            match localfs::move_aside(&held_path, &dest, &tag) {
                Ok((dest, folder)) => Ok(Away::Moved(dest, folder)),
                Err(err) => {
                    // It keeps its name in the outbox, where the next try finds it.
                    match held.give_back() {
                        Ok(back) if back != src => tracing::warn!(path = %src.display(), now = %back.display(), "a new file took the name of a sent file while it could not be moved; the sent one is beside it"),
                        Ok(_) => {}
                        Err(back) => tracing::error!(path = %src.display(), claim = %held_path.display(), error = %back, "cannot give the sent file its name back: it stays under its claim name until the next start gives it back"),
                    }
                    Err(err)
                }
            }
        })
        .await;
        let result = match result {
            Ok(Away::Moved(dest, folder)) => self.folder_syncs.sync(folder).await.map(|()| {
                tracing::debug!(key = %key, path = %path.display(), moved_to = %dest.display(), "moved to the sent folder");
            }),
            Ok(Away::Deleted | Away::Gone) => Ok(()),
            Ok(Away::Replaced) => {
                tracing::warn!(key = %key, path = %path.display(), "after its upload a new file took its name: the new file stays in the outbox and goes in its turn");
                Ok(())
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => Outcome::Done,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Outcome::Done,
            Err(err) => {
                let folder = path.parent().unwrap_or(&self.config.dir).display();
                let fix = match self.config.after_upload {
                    AfterUpload::Move => format!(
                        "check that outbox.sent_dir ({}) is writable and has space, and that the daemon may rename files in {folder}",
                        self.config.sent_dir.display()
                    ),
                    _ => format!("check that the daemon may rename and delete files in {folder}"),
                };
                Outcome::AfterUploadFailed(format!(
                    "uploaded as {key}, but after_upload failed: {err}; {fix}"
                ))
            }
        }
    }
}

/// What became of a sent file (see [`Outbox::after_upload`]).
enum Away {
    Moved(std::path::PathBuf, std::os::fd::OwnedFd),
    Deleted,
    Gone,
    Replaced,
}

/// A small file whole with its MD5, if it still is the file `stamp` describes: from the
/// page cache on this runtime thread when it holds all of it, else on a blocking thread
/// (see [`localfs::SmallFile`]).
async fn read_small(
    path: &Path,
    stamp: FileStamp,
    links: localfs::Links,
) -> std::io::Result<(Vec<u8>, [u8; 16])> {
    if !localfs::nowait_reads() {
        let path = path.to_owned();
        return blocking(move || localfs::SmallFile::open(&path, stamp, links)?.read()).await;
    }
    let file = localfs::SmallFile::open(path, stamp, links)?;
    match file.read_cached()? {
        Some(read) => Ok(read),
        None => blocking(move || file.read()).await,
    }
}

/// A file too big for memory, opened once if it still is the file `stamp` describes: its
/// hashes and its bodies are all read through it (see [`localfs::SettledFile`]).
async fn open_big(
    path: &Path,
    stamp: FileStamp,
    links: localfs::Links,
) -> Result<Arc<localfs::SettledFile>, UploadError> {
    let path = path.to_owned();
    blocking(move || localfs::SettledFile::open(&path, stamp, links))
        .await
        .map(Arc::new)
        .map_err(UploadError::Local)
}

async fn hash_range(
    file: &Arc<localfs::SettledFile>,
    offset: u64,
    len: u64,
) -> Result<[u8; 16], UploadError> {
    let file = Arc::clone(file);
    blocking(move || file.md5_range(offset, len))
        .await
        .map_err(UploadError::Local)
}

/// Runs `work` on a blocking thread; a panic there becomes an error.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// MD5 of the parts' MD5s, `-N`: what S3 computes as a multipart ETag.
fn composite_checksum(parts: &[UploadedPart]) -> String {
    let mut all = Md5::new();
    for part in parts {
        let bytes = (0..part.md5.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(part.md5.get(i..i + 2)?, 16).ok());
        all.update(&bytes.collect::<Vec<u8>>());
    }
    format!("{}-{}", plan::hex(&all.finalize()), parts.len())
}

/// AccessDenied on a part after the upload was created: the ACL-condition policy trap.
fn is_parts_denied(err: &store::Error) -> bool {
    err.op == "UploadPart" && err.code.as_deref() == Some("AccessDenied")
}
