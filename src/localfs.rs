//! Local disk work that must be exactly right: stamps, hashing, atomic landing of
//! deliveries without following planted symlinks, and moving sent files away.
//!
//! Everything here is blocking; the workers call it through `spawn_blocking`, except
//! [`SmallFile::open`] and [`SmallFile::read_cached`] (see there). An outbox file is read
//! only through a descriptor checked to be the file that settled ([`SmallFile`],
//! [`SettledFile`]).
//! Deliveries are written relative to an open handle on the inbox (`openat` and friends
//! with `O_NOFOLLOW`), so a symlink inside the inbox can never redirect a write.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

use crate::keys::RelPath;
use crate::md5::Md5;
use crate::plan::{Existing, FileStamp};

/// The hidden folder inside the inbox where downloads are written before the rename:
/// same file system as their destination, and cleared at start-up.
pub const TEMP_DIR: &str = ".s3-exchange.tmp";

/// The stamp of `meta`, for settle and change detection.
pub fn stamp_of(meta: &std::fs::Metadata) -> FileStamp {
    FileStamp {
        size: meta.len(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        inode: meta.ino(),
    }
}

/// When the file at `meta` last changed: its ctime, or its mtime if that is later (a
/// file system that does not keep ctime honestly still moves mtime on a write). See
/// [`crate::plan::WallClock`] for why ctime is the one to trust.
pub fn changed_at(meta: &std::fs::Metadata) -> std::time::SystemTime {
    let ctime = u64::try_from(meta.ctime())
        .ok()
        .and_then(|secs| {
            let nanos = u32::try_from(meta.ctime_nsec()).unwrap_or(0);
            std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
        })
        .unwrap_or(std::time::UNIX_EPOCH);
    meta.modified().map_or(ctime, |mtime| mtime.max(ctime))
}

pub(crate) fn stamp_of_stat(st: &rustix::fs::Stat) -> FileStamp {
    FileStamp {
        size: u64::try_from(st.st_size).unwrap_or(0),
        mtime_ns: st
            .st_mtime
            .saturating_mul(1_000_000_000)
            .saturating_add(st.st_mtime_nsec as i64),
        inode: st.st_ino,
    }
}

/// The largest read when hashing a range.
const HASH_READ: u64 = 256 << 10;

/// The MD5 of everything `reader` holds and its length, in reads of up to [`HASH_READ`]
/// bytes, fewer if `size_hint` says the whole is smaller: `io::copy`'s 8 KiB would be
/// 2,048 reads per 16 MiB part.
fn md5_of(mut reader: impl Read, size_hint: u64) -> io::Result<([u8; 16], u64)> {
    let mut buf = vec![0u8; usize::try_from(size_hint.clamp(1, HASH_READ)).unwrap_or(1)];
    let mut hasher = Md5::new();
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize(), total))
}

/// Whether reads that take only cached pages (`RWF_NOWAIT`) work here: cleared for good
/// the first time the outbox's file system (tmpfs, NFS, FUSE) or a seccomp filter refuses
/// one, after which small files are opened and read on blocking threads only.
static NOWAIT_READS: AtomicBool = AtomicBool::new(true);

/// See [`NOWAIT_READS`].
pub fn nowait_reads() -> bool {
    NOWAIT_READS.load(Ordering::Relaxed)
}

/// An outbox file small enough to be sent from memory, open, and checked to be the very
/// file that settled (the same inode, size and modification time as its stamp): a file
/// replaced since (by a rename, by a symlink, by a FIFO) is refused before a byte of it is
/// read, so nothing but what settled can be sent under its key.
///
/// Why it may be read on a runtime thread ([`Self::read_cached`]): a file dropped into the
/// outbox moments ago is nearly always still in the page cache, and handing each read to a
/// blocking thread cost two thread wake-ups per file. 1,000 x 4 KiB up beside s5cmd, six
/// rounds: 2.22 -> 2.01 s, the daemon's CPU 0.91 -> 0.82 CPU s (2026-12-07). What keeps
/// that thread from waiting:
/// - `O_NONBLOCK`: a FIFO swapped in since the stat does not block the open, and a file
///   another process holds a lease on (Samba, knfsd) fails with `WouldBlock` at once (the
///   lease holder is asked to let go; the upload is retried) instead of waiting for it;
/// - `O_NOATIME` where the daemon owns the file: reading a freshly written file would
///   otherwise update its access time (relatime), a journal transaction on ext4 or XFS;
/// - `RWF_NOWAIT`: a page not in the cache ends the attempt, and the read goes on from a
///   blocking thread ([`Self::read`]) on the same descriptor.
///
/// The open itself is a lookup of the entry the outbox loop has just stat'ed.
#[derive(Debug)]
pub struct SmallFile {
    fd: OwnedFd,
    size: u64,
}

impl SmallFile {
    /// Opens the file at `path` if it still is the file `stamp` describes.
    pub fn open(path: &Path, stamp: FileStamp, links: Links) -> io::Result<Self> {
        Ok(Self {
            fd: open_settled(path, stamp, links)?,
            size: stamp.size,
        })
    }

    /// The whole file and its MD5 if the page cache holds all of it, without waiting for
    /// the disk; `Ok(None)` otherwise, and then [`Self::read`] on a blocking thread.
    pub fn read_cached(&self) -> io::Result<Option<(Vec<u8>, [u8; 16])>> {
        use rustix::io::{Errno, ReadWriteFlags};
        let Ok(want) = usize::try_from(self.size.saturating_add(1)) else {
            return Ok(None);
        };
        // One byte more than expected tells a grown file from a complete one.
        let mut bytes = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let mut slice = [io::IoSliceMut::new(&mut bytes[filled..])];
            match rustix::io::preadv2(&self.fd, &mut slice, filled as u64, ReadWriteFlags::NOWAIT) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Ok(None),
                // Not here (tmpfs, NFS, FUSE; an old kernel; a seccomp filter's EPERM):
                // never again in this process.
                Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::PERM | Errno::INVAL) => {
                    if NOWAIT_READS.swap(false, Ordering::Relaxed) {
                        tracing::debug!(
                            "reads from the page cache alone are not available here: small outbox files are read on blocking threads"
                        );
                    }
                    return Ok(None);
                }
                Err(err) => return Err(err.into()),
            }
        }
        bytes.truncate(filled);
        small_body(bytes, self.size).map(Some)
    }

    /// The whole file and its MD5, waiting for the disk if need be: for a blocking thread.
    pub fn read(self) -> io::Result<(Vec<u8>, [u8; 16])> {
        let size = self.size;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // One byte more than expected tells a grown file from a complete one.
        File::from(self.fd)
            .take(size.saturating_add(1))
            .read_to_end(&mut bytes)?;
        small_body(bytes, size)
    }
}

/// Opens the file at `path` if it still is the file `stamp` describes: a regular file with
/// the same inode, size and modification time, checked with `fstat` on the open descriptor.
/// `O_NONBLOCK` (see [`SmallFile`]): a FIFO swapped in does not block the open, a lease
/// fails at once with `WouldBlock`. With [`Links::NotFollowed`], `O_NOFOLLOW`: a symlink
/// swapped in for the file itself is refused without opening what it points to (a
/// device's open can act). A folder above it swapped for a link is still followed; the
/// stamp check then refuses whatever is found there.
fn open_settled(path: &Path, stamp: FileStamp, links: Links) -> io::Result<OwnedFd> {
    let not_settled =
        || io::Error::other("it is no longer the file that settled (replaced or changed since)");
    let mut flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    if links == Links::NotFollowed {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = match rustix::fs::open(path, flags | OFlags::NOATIME, Mode::empty()) {
        // O_NOATIME is for the file's owner only.
        Err(rustix::io::Errno::PERM) => rustix::fs::open(path, flags, Mode::empty()),
        opened => opened,
    };
    let fd = fd.map_err(|err| match err {
        rustix::io::Errno::AGAIN => io::Error::new(
            io::ErrorKind::WouldBlock,
            "another process holds a lease on it (Samba or an NFS server); it was asked to let go, and the upload will be retried",
        ),
        rustix::io::Errno::LOOP if links == Links::NotFollowed => not_settled(),
        err => err.into(),
    })?;
    let st = rustix::fs::fstat(&fd)?;
    let regular = rustix::fs::FileType::from_raw_mode(st.st_mode).is_file();
    if !regular || stamp_of_stat(&st) != stamp {
        return Err(not_settled());
    }
    Ok(fd)
}

/// Whether an outbox file's open follows a symlink in its place: as
/// `outbox.follow_symlinks` says, so that the upload opens what the stamp was taken of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    Follow,
    NotFollowed,
}

/// An outbox file too big to be sent from memory, open, and checked to be the file that
/// settled, as a [`SmallFile`] is: hashed through this descriptor, and sent from the same
/// file (the SDK opens [`Self::body_path`]).
///
/// Why: the upload used to open the path again for each hash and each body, so a file
/// replaced after it settled was read in its place (a symlink to a file the daemon's user
/// can read went up under the key before the check after the upload caught it), and a
/// FIFO swapped in hung a blocking thread and the transfer slot for good.
///
/// The SDK opens its bodies by path, and again for each retry of a request:
/// [`Self::body_path`] names this descriptor (`/proc/self/fd/N`), which opens this file
/// whatever has become of its name since. Where `/proc` is missing, the SDK gets the name
/// (a warning says so, once). Deleted or replaced during the upload, the file is still
/// readable here: the upload checks its name before each body (`still_settled` in
/// `upload.rs`).
#[derive(Debug)]
pub struct SettledFile {
    file: File,
    body_path: PathBuf,
}

impl SettledFile {
    /// Opens the file at `path` if it still is the file `stamp` describes. Blocking.
    pub fn open(path: &Path, stamp: FileStamp, links: Links) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = File::from(open_settled(path, stamp, links)?);
        let own = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let body_path = match std::fs::metadata(&own) {
            Ok(meta) if meta.ino() == stamp.inode => own,
            // Without /proc (a bare chroot) the SDK gets the name, as before.
            _ => {
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "/proc/self/fd is not available: files over 64 KiB are read by name for each request, so one replaced during its upload is caught only by the checks around it; mount /proc for the daemon"
                    );
                }
                path.to_owned()
            }
        };
        Ok(Self { file, body_path })
    }

    /// A path that opens this very file, for the SDK's body; valid while `self` lives.
    pub fn body_path(&self) -> &Path {
        &self.body_path
    }

    /// MD5 of `len` bytes from `offset`; fails if the file is shorter. Blocking.
    pub fn md5_range(&self, offset: u64, len: u64) -> io::Result<[u8; 16]> {
        let at = ReadAt {
            file: &self.file,
            offset,
        };
        let (md5, copied) = md5_of(at.take(len), len)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file shrank while it was read ({copied} of {len} bytes)"),
            ));
        }
        Ok(md5)
    }
}

/// Reads a shared file from an offset of its own (`pread`): the parts of one upload are
/// hashed at once through one descriptor.
struct ReadAt<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// The body of a small file read whole, with its MD5, if it holds the `size` bytes its
/// stamp said: fewer or more mean it changed, and the upload must wait.
fn small_body(bytes: Vec<u8>, size: u64) -> io::Result<(Vec<u8>, [u8; 16])> {
    if bytes.len() as u64 != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the file changed while it was read ({} bytes, {size} expected)",
                bytes.len()
            ),
        ));
    }
    let md5 = Md5::digest(&bytes);
    Ok((bytes, md5))
}

/// Bytes written between two nudges of [`Writeback`].
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts the disk on a big download's pages while the rest still arrives, so that the
/// fsync before its rename finds little left to write.
///
/// Why: the fsync that makes a delivery durable wrote the whole file at the end. For 1 GiB
/// from the local Ceph RGW that was 0.57 s of a 2.45 s download, which s5cmd (no fsync)
/// does not pay. `sync_file_range(SYNC_FILE_RANGE_WRITE)` only queues the dirty pages for
/// writing and returns; it is a hint and proves nothing: the fsync still decides.
#[derive(Debug, Default)]
pub struct Writeback {
    since: u64,
}

impl Writeback {
    /// Notes `n` more bytes written into `file`; every [`WRITEBACK_EVERY`] of them, queues
    /// the file's dirty pages for writing.
    pub fn wrote(&mut self, file: &File, n: u64) {
        self.since += n;
        if self.since < WRITEBACK_EVERY {
            return;
        }
        self.since = 0;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: sync_file_range reads nothing of ours but the open descriptor,
            // which `file` keeps open for the call. Its result is a hint's: ignored.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }
}

/// An open handle on the inbox, the root of every delivery.
pub struct InboxRoot {
    path: PathBuf,
    root: OwnedFd,
    temp: OwnedFd,
}

impl InboxRoot {
    /// Opens (creating if needed) the inbox and its temp folder, and removes what an
    /// interrupted download left in the temp folder.
    pub fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let root = rustix::fs::open(path, dir_flags(), Mode::empty())?;
        let temp = open_or_create_dir(&root, TEMP_DIR).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "{} must be a plain folder (a symlink or file is in the way: {e}); remove it",
                    path.join(TEMP_DIR).display()
                ),
            )
        })?;
        let this = Self {
            path: path.to_owned(),
            root,
            temp,
        };
        this.clear_temp()?;
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes what downloads left in the temp folder. A file gone meanwhile is fine: after
    /// a reload, the writer threads of the downloads the old workers abandoned may still
    /// be removing theirs.
    fn clear_temp(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(self.path.join(TEMP_DIR))? {
            let entry = entry?;
            match rustix::fs::unlinkat(&self.temp, entry.file_name().as_os_str(), AtFlags::empty())
            {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Creates a new, empty temporary file; the caller writes the download into it.
    pub fn create_temp(&self) -> io::Result<(String, File)> {
        let name = format!("dl-{:016x}", rand::random::<u64>());
        let fd = rustix::fs::openat(
            &self.temp,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        Ok((name, File::from(fd)))
    }

    /// Opens a temp file for reading (links not followed).
    pub fn open_temp(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.temp,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    pub fn remove_temp(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.temp, name, AtFlags::empty());
    }

    /// Opens the folder a delivery at `rel` goes into, creating missing folders and
    /// refusing to pass through a symlink or a file: that fails with
    /// `ErrorKind::NotADirectory`, which means the key can never land.
    pub fn open_parent(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        let segments = rel.segments();
        let mut dir = rustix::fs::openat(&self.root, ".", dir_flags(), Mode::empty())?;
        for segment in &segments[..segments.len().saturating_sub(1)] {
            dir = match open_or_create_dir(&dir, segment) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!(
                            "{segment:?} on the way to {rel} is a file or a symlink, not a folder"
                        ),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
        }
        Ok(dir)
    }

    /// What is at `name` in `dir` now; `same_content` is asked only for a regular file
    /// of the same size (it hashes it).
    pub fn existing(
        &self,
        dir: &OwnedFd,
        name: &str,
        same_content: impl FnOnce(File) -> io::Result<bool>,
        new_size: u64,
    ) -> io::Result<Existing> {
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(Existing::Nothing),
            Err(e) => return Err(e.into()),
        };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Ok(Existing::Other);
        }
        let stamp = stamp_of_stat(&st);
        if stamp.size == new_size {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if same_content(File::from(fd))? {
                return Ok(Existing::SameContent);
            }
        }
        Ok(Existing::File(stamp))
    }

    /// Atomically renames the temp file to `name` in `dir` (replacing what is there
    /// when `replace`, else failing if the name is taken). Returns the stamp of the
    /// landed file; the caller makes the rename durable with an fsync of `dir` (shared
    /// with other landings in it: [`crate::group_commit::FolderSyncs`]).
    pub fn land(
        &self,
        temp_name: &str,
        dir: &OwnedFd,
        name: &str,
        replace: bool,
    ) -> io::Result<FileStamp> {
        if replace {
            rustix::fs::renameat(&self.temp, temp_name, dir, name)?;
        } else {
            rename_noreplace(&self.temp, Path::new(temp_name), dir, Path::new(name))?;
        }
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(stamp_of_stat(&st))
    }

    /// True if `name` exists in `dir` (as anything, links not followed).
    pub fn taken(dir: &OwnedFd, name: &str) -> bool {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }
}

/// MD5 of a whole open file.
pub fn md5_file(file: File) -> io::Result<[u8; 16]> {
    md5_of(file, HASH_READ).map(|(md5, _)| md5)
}

/// Whether two open files hold the same bytes (read from where each stands); stops at
/// the first difference.
pub fn same_bytes(a: File, b: File) -> io::Result<bool> {
    let mut a = io::BufReader::with_capacity(256 << 10, a);
    let mut b = io::BufReader::with_capacity(256 << 10, b);
    loop {
        let (x, y) = (a.fill_buf()?, b.fill_buf()?);
        if x.is_empty() || y.is_empty() {
            return Ok(x.is_empty() && y.is_empty());
        }
        let n = x.len().min(y.len());
        if x[..n] != y[..n] {
            return Ok(false);
        }
        a.consume(n);
        b.consume(n);
    }
}

/// `renameat2(RENAME_NOREPLACE)`: `from` takes the name `to` only if nothing has it.
/// Where the file system cannot do that (NFS and FUSE file systems without `rename2`
/// answer EINVAL), a look and then a plain rename: a name taken in the microseconds
/// between them is replaced. The first such fallback is logged.
pub fn rename_noreplace(
    from_dir: impl AsFd,
    from: &Path,
    to_dir: impl AsFd,
    to: &Path,
) -> rustix::io::Result<()> {
    static LOOKS_INSTEAD: AtomicBool = AtomicBool::new(false);
    match rustix::fs::renameat_with(&from_dir, from, &to_dir, to, RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL) => {
            if !LOOKS_INSTEAD.swap(true, Ordering::Relaxed) {
                tracing::info!(path = %to.display(), "this file system cannot rename without replacing (RENAME_NOREPLACE; NFS, some FUSE file systems): the daemon looks before each such rename instead");
            }
            match rustix::fs::statat(&to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => Err(rustix::io::Errno::EXIST),
                Err(rustix::io::Errno::NOENT) => rustix::fs::renameat(&from_dir, from, &to_dir, to),
                Err(e) => Err(e),
            }
        }
        done => done,
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn open_or_create_dir(parent: &impl AsFd, name: &str) -> rustix::io::Result<OwnedFd> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    rustix::fs::openat(parent, name, dir_flags(), Mode::empty())
}

/// Moves a sent file to `dest`, creating its folders; never overwrites: a name already
/// taken gets a `.<tag>` (then `.<tag>-N`) beside it. Falls back to copy + remove across
/// file systems (the copy is durable before the source goes). Returns where the file
/// went and its folder, open: the caller makes the rename durable with an fsync of it,
/// shared with other moves into it ([`crate::group_commit::FolderSyncs`]).
pub fn move_aside(src: &Path, dest: &Path, tag: &str) -> io::Result<(PathBuf, OwnedFd)> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_owned();
    // Opened first, created only when missing: in a burst every file but the first finds
    // its folder there, and a failing mkdir locks the parent folder all the same.
    let dir = match rustix::fs::open(parent, dir_flags(), Mode::empty()) {
        Ok(dir) => dir,
        Err(rustix::io::Errno::NOENT) => {
            std::fs::create_dir_all(parent)?;
            rustix::fs::open(parent, dir_flags(), Mode::empty())?
        }
        Err(e) => return Err(e.into()),
    };
    for candidate in crate::plan::names_to_try(&name, tag) {
        let target = parent.join(&candidate);
        match rename_noreplace(rustix::fs::CWD, src, &dir, Path::new(&candidate)) {
            Ok(()) => return Ok((target, dir)),
            Err(rustix::io::Errno::EXIST) => {}
            Err(rustix::io::Errno::XDEV) => {
                // Another file system: copy to a hidden temp name, then rename it in, so
                // a full disk never leaves a truncated file under the real name.
                let temp = format!(".{candidate}.s3-exchange-copy");
                if let Err(err) = copy_durably(src, &parent.join(&temp)) {
                    let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::empty());
                    return Err(err);
                }
                match rename_noreplace(&dir, Path::new(&temp), &dir, Path::new(&candidate)) {
                    Ok(()) => {
                        rustix::fs::fsync(&dir)?;
                        std::fs::remove_file(src)?;
                        return Ok((target, dir));
                    }
                    Err(rustix::io::Errno::EXIST) => {
                        let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::empty());
                    }
                    Err(e) => {
                        let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::empty());
                        return Err(e.into());
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(no_free_name(dest))
}

/// Every name [`crate::plan::names_to_try`] offers beside `path` is taken.
pub fn no_free_name(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("every name beside {} is taken", path.display()),
    )
}

fn copy_durably(src: &Path, dest: &Path) -> io::Result<()> {
    let mut from = File::open(src)?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)?;
    io::copy(&mut from, &mut to)?;
    to.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{ObjectKey, Prefix};

    fn rel(key: &str) -> RelPath {
        RelPath::from_key(
            &Prefix::new("D/").expect("prefix"),
            &ObjectKey::from_listing(format!("D/{key}")),
        )
        .expect("valid key")
    }

    fn stamp(path: &Path) -> FileStamp {
        stamp_of(&std::fs::metadata(path).expect("stat"))
    }

    fn append(path: &Path, bytes: &[u8]) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open");
        io::Write::write_all(&mut file, bytes).expect("append");
    }

    /// A temporary folder whose file system serves reads from the page cache alone, or
    /// `None` (tmpfs does not): the test is then skipped.
    fn nowait_tempdir() -> Option<tempfile::TempDir> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("probe");
        std::fs::write(&path, b"x").expect("write");
        let file = SmallFile::open(&path, stamp(&path), Links::Follow).expect("open");
        if file.read_cached().expect("read").is_some() || nowait_reads() {
            return Some(tmp);
        }
        eprintln!(
            "skipped: {} serves no RWF_NOWAIT reads",
            tmp.path().display()
        );
        None
    }

    /// md5("hello")
    const HELLO_MD5: &str = "5d41402abc4b2a76b9719d911017c592";

    /// Writes "hello" to `dir/f` and returns that path.
    fn hello_file(dir: &Path) -> PathBuf {
        let path = dir.join("f");
        std::fs::write(&path, b"hello").expect("write");
        path
    }

    fn assert_not_settled(err: &io::Error) {
        assert!(
            err.to_string().contains("no longer the file that settled"),
            "{err}"
        );
    }

    #[test]
    fn a_small_file_is_read_whole_with_its_md5_and_one_changed_since_it_settled_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = hello_file(tmp.path());
        let settled = stamp(&path);
        let (bytes, md5) = SmallFile::open(&path, settled, Links::Follow)
            .expect("open")
            .read()
            .expect("read");
        assert_eq!(bytes, b"hello");
        assert_eq!(crate::plan::hex(&md5), HELLO_MD5);
        let refused = |path: &Path, stamp: FileStamp| {
            let err =
                SmallFile::open(path, stamp, Links::Follow).expect_err("not the file that settled");
            assert_not_settled(&err);
        };
        // The stamp said 4 bytes (it grew since) or 6 (it shrank): never sent as it is.
        for size in [4, 6] {
            refused(&path, FileStamp { size, ..settled });
        }
        // Replaced by another file with the same bytes, or by a link to one: refused too.
        let other = tmp.path().join("other");
        std::fs::write(&other, b"hello").expect("write");
        std::fs::rename(&other, &path).expect("rename");
        refused(&path, settled);
        let settled = stamp(&path);
        std::fs::write(&other, b"hello").expect("write");
        std::fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink(&other, &path).expect("symlink");
        refused(&path, settled);
        // Grown after the open: one byte more is read than the stamp said.
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, b"hello").expect("write");
        let file = SmallFile::open(&path, stamp(&path), Links::Follow).expect("open");
        append(&path, b"!");
        let err = file.read().expect_err("grew");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let err = SmallFile::open(&tmp.path().join("gone"), settled, Links::Follow)
            .expect_err("vanished");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// With `follow_symlinks = false` a symlink swapped in after the stamp is refused
    /// without being followed, even to the very file that settled (whose stamp it would
    /// pass): what it points to is never opened.
    #[test]
    fn a_symlink_in_place_of_the_settled_file_is_not_followed_unless_links_are() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = hello_file(tmp.path());
        let settled = stamp(&real);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert_not_settled(
            &SmallFile::open(&link, settled, Links::NotFollowed).expect_err("a link"),
        );
        assert_not_settled(
            &SettledFile::open(&link, settled, Links::NotFollowed).expect_err("a link"),
        );
        SmallFile::open(&link, settled, Links::Follow).expect("followed");
        SettledFile::open(&link, settled, Links::Follow).expect("followed");
        SmallFile::open(&real, settled, Links::NotFollowed).expect("not a link");
    }

    #[test]
    fn a_cached_small_file_is_read_without_waiting_and_checked_the_same_way() {
        let Some(tmp) = nowait_tempdir() else {
            return;
        };
        let path = hello_file(tmp.path());
        let file = SmallFile::open(&path, stamp(&path), Links::Follow).expect("open");
        let (bytes, md5) = file
            .read_cached()
            .expect("read")
            .expect("just written, so in the page cache");
        assert_eq!(bytes, b"hello");
        assert_eq!(crate::plan::hex(&md5), HELLO_MD5);
        append(&path, b"!");
        let err = file.read_cached().expect_err("grew");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn a_fifo_in_place_of_an_outbox_file_is_refused_not_waited_for() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = hello_file(tmp.path());
        let settled = stamp(&path);
        std::fs::remove_file(&path).expect("rm");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        // Without O_NONBLOCK the open would wait for a writer for ever: on a thread of
        // its own, so that such a regression fails here instead of hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(SmallFile::open(&path, settled, Links::Follow).map(drop));
            let _ = tx.send(SettledFile::open(&path, settled, Links::Follow).map(drop));
        });
        for file in ["small", "big"] {
            let opened = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("the open of a {file} file waited for a writer"));
            assert_not_settled(&opened.expect_err("not a regular file"));
        }
    }

    #[test]
    fn a_big_file_is_hashed_and_sent_as_it_settled_whatever_replaces_its_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = hello_file(tmp.path());
        let settled = stamp(&path);
        let file = SettledFile::open(&path, settled, Links::Follow).expect("open");
        assert_ne!(file.body_path(), path.as_path(), "/proc is mounted here");
        // Replaced after the open, as a file in the outbox may be at any moment.
        let other = tmp.path().join("other");
        std::fs::write(&other, b"other!").expect("write");
        std::fs::rename(&other, &path).expect("rename");
        assert_eq!(
            crate::plan::hex(&file.md5_range(0, 5).expect("md5")),
            HELLO_MD5
        );
        // What the SDK opens for the body (and again for each retry) is the settled file.
        for _ in 0..2 {
            assert_eq!(std::fs::read(file.body_path()).expect("read"), b"hello");
        }
        // Opened after the replacement, it is refused, as a small file is.
        assert_not_settled(
            &SettledFile::open(&path, settled, Links::Follow).expect_err("replaced"),
        );
    }

    #[test]
    fn a_small_file_not_in_the_page_cache_is_left_to_a_blocking_read() {
        let Some(tmp) = nowait_tempdir() else {
            return;
        };
        let path = hello_file(tmp.path());
        let settled = stamp(&path);
        let sync = File::open(&path).expect("open");
        sync.sync_all().expect("fsync");
        // Clean pages may be dropped, and then the read has to wait for the disk. Linux
        // keeps a page just written in a per-CPU batch for a moment, where DONTNEED cannot
        // drop it (1 run in 8 here): asked again until it is gone.
        let left_to_disk = (0..100).any(|_| {
            rustix::fs::fadvise(&sync, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
            let file = SmallFile::open(&path, settled, Links::Follow).expect("open");
            match file.read_cached().expect("read") {
                None => {
                    assert_eq!(file.read().expect("read").0, b"hello");
                    true
                }
                Some((bytes, _)) => {
                    assert_eq!(bytes, b"hello");
                    std::thread::yield_now();
                    false
                }
            }
        });
        assert!(
            left_to_disk,
            "never refused a read that had to wait for the disk"
        );
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let inbox = tmp.path().join("inbox");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&inbox).expect("mkdir");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        std::os::unix::fs::symlink(&elsewhere, inbox.join("link")).expect("symlink");
        let root = InboxRoot::open(&inbox).expect("open");
        let err = root
            .open_parent(&rel("link/file"))
            .expect_err("must refuse the link");
        assert_eq!(err.kind(), io::ErrorKind::NotADirectory);
        assert_eq!(std::fs::read_dir(&elsewhere).expect("ls").count(), 0);
    }

    #[test]
    fn landing_creates_folders_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = InboxRoot::open(tmp.path()).expect("open");
        let (name, mut file) = root.create_temp().expect("temp");
        io::Write::write_all(&mut file, b"hello").expect("write");
        let r = rel("a/b/c.txt");
        let dir = root.open_parent(&r).expect("parent");
        let stamp = root.land(&name, &dir, r.file_name(), true).expect("land");
        assert_eq!(stamp.size, 5);
        assert_eq!(
            std::fs::read(tmp.path().join("a/b/c.txt")).expect("read"),
            b"hello"
        );
        assert_eq!(
            std::fs::read_dir(tmp.path().join(TEMP_DIR))
                .expect("ls")
                .count(),
            0
        );
    }

    #[test]
    fn leftover_temp_files_are_cleared_at_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join(TEMP_DIR)).expect("mkdir");
        std::fs::write(tmp.path().join(TEMP_DIR).join("dl-1"), b"partial").expect("write");
        InboxRoot::open(tmp.path()).expect("open");
        assert_eq!(
            std::fs::read_dir(tmp.path().join(TEMP_DIR))
                .expect("ls")
                .count(),
            0
        );
    }

    #[test]
    fn moving_never_overwrites() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sent = tmp.path().join("sent/sub/r.csv");
        std::fs::create_dir_all(sent.parent().expect("parent")).expect("mkdir");
        std::fs::write(&sent, b"old").expect("write");
        let src = tmp.path().join("r.csv");
        std::fs::write(&src, b"new").expect("write");
        let (went, _folder) = move_aside(&src, &sent, "T").expect("move");
        assert_eq!(went, tmp.path().join("sent/sub/r.T.csv"));
        assert_eq!(std::fs::read(&sent).expect("read"), b"old");
        assert_eq!(std::fs::read(&went).expect("read"), b"new");
        assert!(!src.exists());
    }

    #[test]
    fn same_bytes_compares_whole_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, bytes: &[u8]| {
            let p = tmp.path().join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        };
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let mut other = big.clone();
        other[600_000] ^= 1;
        let (a, b, c) = (write("a", &big), write("b", &big), write("c", &other));
        let d = write("d", &big[..699_999]);
        let same = |x: &Path, y: &Path| {
            same_bytes(File::open(x).expect("open"), File::open(y).expect("open")).expect("read")
        };
        assert!(same(&a, &b));
        assert!(!same(&a, &c), "one byte differs, late");
        assert!(!same(&a, &d), "one is a prefix of the other");
        assert!(!same(&d, &a));
    }

    #[test]
    fn md5_of_a_range() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("f");
        std::fs::write(&p, b"xxhelloxx").expect("write");
        let file = SettledFile::open(&p, stamp(&p), Links::Follow).expect("open");
        assert_eq!(file.md5_range(2, 5).expect("md5"), Md5::digest(b"hello"));
        assert!(file.md5_range(2, 50).is_err());
    }

    #[test]
    fn md5_of_a_range_longer_than_one_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("f");
        let data: Vec<u8> = (0..3 * HASH_READ as usize + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&p, &data).expect("write");
        let file = SettledFile::open(&p, stamp(&p), Links::Follow).expect("open");
        let (offset, len) = (17, 2 * HASH_READ as usize + 500);
        let expected = Md5::digest(&data[offset..offset + len]);
        assert_eq!(
            file.md5_range(offset as u64, len as u64).expect("md5"),
            expected
        );
        let err = file
            .md5_range(offset as u64, data.len() as u64)
            .expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let whole = md5_file(File::open(&p).expect("open")).expect("md5");
        assert_eq!(whole, Md5::digest(&data));
    }
}
