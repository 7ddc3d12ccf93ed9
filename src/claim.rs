//! Taking a sent file out of the outbox (`after_upload = "delete"` or `"move"`) only if
//! it still is the file that was sent: it is first renamed to a hidden claim name beside
//! it (`.NAME.s3-exchange-claim`), checked there, and only then deleted or moved on.
//!
//! Why: the upload is recorded (a group commit of a few milliseconds) before the file
//! goes, and a move to the sent folder on another file system copies the whole file
//! first. A producer that puts a new file under the same name meanwhile (`mv new
//! report.csv`) would have had that new file deleted, or moved into the sent folder, by a
//! daemon acting on the name: a file never sent, gone from the outbox. A rename is atomic,
//! so the file under the claim is the one to check, and a new file put under the name
//! after it keeps its name and goes in its turn.
//!
//! A claim lives for a few system calls, or for the copy to another file system. One
//! outlives that only if the daemon dies inside it: the next process's first outbox scan
//! gives such a file its name back ([`give_back_leftover`]); it is sent again unless the
//! ledger records its upload with the same stamp, and then only moved or deleted. Claim
//! names are never sent, whatever `outbox.ignore` says.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::localfs::{self, Links};
use crate::plan::{self, FileStamp};

const SUFFIX: &str = ".s3-exchange-claim";

/// The longest name (in bytes) that is claimed: its claim name and the timestamped name
/// it may be given back under (`name.<UTC time>-N.ext`, see [`plan::beside_name`]) must
/// both fit in the 255 bytes file systems allow. A longer one is checked and then acted
/// on by its name, with a window of two system calls.
const LONGEST_CLAIMED: usize = 224;

/// The claim name of a file named `name`.
fn claim_name(name: &str) -> String {
    format!(".{name}{SUFFIX}")
}

/// The name a claim was taken from, if `name` is a claim's.
pub fn claimed_from(name: &str) -> Option<&str> {
    name.strip_prefix('.')?
        .strip_suffix(SUFFIX)
        .filter(|n| !n.is_empty())
}

/// What [`claim`] found at a sent file's name.
#[derive(Debug)]
pub enum Claim {
    /// The file that was sent, now held under its claim name.
    Held(Held),
    /// Nothing is there any more.
    Gone,
    /// Another file is there (put there after the upload); it keeps its name.
    Replaced,
}

/// A sent file held under its claim name, checked to be the file that was sent.
#[derive(Debug)]
pub struct Held {
    dir: OwnedFd,
    folder: PathBuf,
    name: String,
    /// The claim name, or the file's own name where that is longer than
    /// [`LONGEST_CLAIMED`].
    held_as: String,
}

/// Claims the file at `path` if it still is the file `stamp` describes (looked at as the
/// upload looked at it: through a symlink only if `links` follow them).
pub fn claim(path: &Path, stamp: FileStamp, links: Links) -> io::Result<Claim> {
    let (Some(folder), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name in UTF-8", path.display()),
        ));
    };
    let dir = match rustix::fs::open(folder, dir_flags(), Mode::empty()) {
        Ok(dir) => dir,
        Err(rustix::io::Errno::NOENT) => return Ok(Claim::Gone),
        Err(e) => return Err(e.into()),
    };
    let claim = claim_name(name);
    let claimed = if name.len() > LONGEST_CLAIMED {
        Err(rustix::io::Errno::NAMETOOLONG)
    } else {
        localfs::rename_noreplace(&dir, Path::new(name), &dir, Path::new(&claim))
    };
    let held_as = match claimed {
        Ok(()) => claim,
        Err(rustix::io::Errno::NOENT) => return Ok(Claim::Gone),
        Err(rustix::io::Errno::NAMETOOLONG) => name.to_owned(),
        Err(rustix::io::Errno::EXIST) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} is in the way (the daemon's own claim name for {name}); move it out of the outbox",
                    folder.join(&claim).display()
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let held = Held {
        dir,
        folder: folder.to_owned(),
        name: name.to_owned(),
        held_as,
    };
    let flags = match links {
        Links::Follow => AtFlags::empty(),
        Links::NotFollowed => AtFlags::SYMLINK_NOFOLLOW,
    };
    match rustix::fs::statat(&held.dir, held.held_as.as_str(), flags) {
        Ok(st) if localfs::stamp_of_stat(&st) == stamp => Ok(Claim::Held(held)),
        Ok(_) => {
            held.give_back()?;
            Ok(Claim::Replaced)
        }
        Err(rustix::io::Errno::NOENT) if held.held_as == held.name => Ok(Claim::Gone),
        Err(err) => {
            // A symlink to nothing, where links are followed, is not the file sent either.
            held.give_back()?;
            match err {
                rustix::io::Errno::NOENT => Ok(Claim::Replaced),
                err => Err(err.into()),
            }
        }
    }
}

impl Held {
    /// Where the file is now.
    pub fn path(&self) -> PathBuf {
        self.folder.join(&self.held_as)
    }

    /// Deletes it.
    pub fn remove(self) -> io::Result<()> {
        rustix::fs::unlinkat(&self.dir, self.held_as.as_str(), AtFlags::empty())?;
        Ok(())
    }

    /// Renames it back to its own name or, if a new file took that meanwhile, to a
    /// timestamped name beside it (as the sent folder does); returns where it went.
    pub fn give_back(self) -> io::Result<PathBuf> {
        if self.held_as == self.name {
            return Ok(self.folder.join(&self.name));
        }
        give_back(&self.dir, &self.folder, &self.held_as, &self.name)
    }
}

/// Gives a claim left by a daemon that died inside it (see the module doc) its name back;
/// `None` if `path` is not a claim's name.
pub fn give_back_leftover(path: &Path) -> io::Result<Option<PathBuf>> {
    let (Some(folder), Some(claim)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Ok(None);
    };
    let Some(name) = claimed_from(claim) else {
        return Ok(None);
    };
    let dir = rustix::fs::open(folder, dir_flags(), Mode::empty())?;
    give_back(&dir, folder, claim, name).map(Some)
}

fn give_back(dir: &OwnedFd, folder: &Path, held_as: &str, name: &str) -> io::Result<PathBuf> {
    let tag = plan::time_tag(std::time::SystemTime::now());
    for candidate in plan::names_to_try(name, &tag) {
        match localfs::rename_noreplace(dir, Path::new(held_as), dir, Path::new(&candidate)) {
            Ok(()) => return Ok(folder.join(candidate)),
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(localfs::no_free_name(&folder.join(name)))
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn stamp(path: &Path) -> FileStamp {
        localfs::stamp_of(&fs::metadata(path).expect("stat"))
    }

    /// A folder holding `report.csv`, the file that was sent, and its path.
    fn sent_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("report.csv");
        fs::write(&path, b"sent\n").expect("write");
        (dir, path)
    }

    /// The claim of the file at `path`, which must be held.
    fn hold(path: &Path, stamp: FileStamp, links: Links) -> Held {
        match claim(path, stamp, links).expect("claim") {
            Claim::Held(held) => held,
            other => panic!("not held: {other:?}"),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("UTF-8"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_file_that_was_sent_is_held_aside_and_removed() {
        let (dir, path) = sent_file();
        let held = hold(&path, stamp(&path), Links::NotFollowed);
        assert_eq!(names(dir.path()), [".report.csv.s3-exchange-claim"]);
        assert_eq!(fs::read(held.path()).expect("read"), b"sent\n");
        held.remove().expect("remove");
        assert!(names(dir.path()).is_empty());
    }

    /// The defect this module exists for: a new file put under the name after the upload
    /// is neither deleted nor moved, and keeps its name.
    #[test]
    fn a_file_put_in_place_of_the_sent_one_keeps_its_name_and_is_not_taken() {
        let (dir, path) = sent_file();
        let sent = stamp(&path);
        let new = dir.path().join("new.tmp");
        fs::write(&new, b"not sent yet\n").expect("write");
        fs::rename(&new, &path).expect("rename over");
        assert!(matches!(
            claim(&path, sent, Links::NotFollowed).expect("claim"),
            Claim::Replaced
        ));
        assert_eq!(names(dir.path()), ["report.csv"]);
        assert_eq!(fs::read(&path).expect("read"), b"not sent yet\n");
    }

    #[test]
    fn a_file_that_is_gone_is_gone() {
        let (dir, path) = sent_file();
        let sent = stamp(&path);
        fs::remove_file(&path).expect("remove");
        assert!(matches!(
            claim(&path, sent, Links::NotFollowed).expect("claim"),
            Claim::Gone
        ));
        assert!(matches!(
            claim(
                &dir.path().join("no/such/folder/x"),
                sent,
                Links::NotFollowed
            )
            .expect("claim"),
            Claim::Gone
        ));
    }

    #[test]
    fn a_symlink_in_place_is_not_the_sent_file_unless_links_are_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target.csv");
        fs::write(&target, b"sent\n").expect("write");
        let path = dir.path().join("report.csv");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let through = stamp(&path);
        assert!(matches!(
            claim(&path, through, Links::NotFollowed).expect("claim"),
            Claim::Replaced
        ));
        assert_eq!(names(dir.path()), ["report.csv", "target.csv"]);
        let held = hold(&path, through, Links::Follow);
        held.remove().expect("remove");
        assert_eq!(
            names(dir.path()),
            ["target.csv"],
            "the link goes, not its target"
        );
    }

    #[test]
    fn a_held_file_given_back_goes_beside_a_new_file_that_took_its_name() {
        let (dir, path) = sent_file();
        let held = hold(&path, stamp(&path), Links::NotFollowed);
        fs::write(&path, b"new\n").expect("write");
        let back = held.give_back().expect("give back");
        assert_ne!(back, path);
        assert_eq!(fs::read(&back).expect("read"), b"sent\n");
        assert_eq!(fs::read(&path).expect("read"), b"new\n");
        assert_eq!(names(dir.path()).len(), 2, "{:?}", names(dir.path()));
    }

    #[test]
    fn a_leftover_claim_gets_its_name_back_and_other_names_are_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leftover = dir.path().join(".report.csv.s3-exchange-claim");
        fs::write(&leftover, b"sent\n").expect("write");
        let back = give_back_leftover(&leftover).expect("give back");
        assert_eq!(back, Some(dir.path().join("report.csv")));
        assert_eq!(names(dir.path()), ["report.csv"]);
        for other in [".report.csv", ".s3-exchange-claim", "report.csv"] {
            assert_eq!(
                give_back_leftover(&dir.path().join(other)).expect("no-op"),
                None
            );
        }
        assert_eq!(claimed_from(".a.s3-exchange-claim"), Some("a"));
    }

    /// The longest name claimed can still be given back beside a new file that took it.
    #[test]
    fn the_longest_claimed_name_fits_under_a_timestamped_name_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = format!("{}.csv", "x".repeat(LONGEST_CLAIMED - 4));
        let path = dir.path().join(&name);
        fs::write(&path, b"sent\n").expect("write");
        let held = hold(&path, stamp(&path), Links::NotFollowed);
        assert_ne!(held.path(), path, "not claimed");
        fs::write(&path, b"new\n").expect("write");
        let back = held.give_back().expect("give back");
        assert_eq!(fs::read(&back).expect("read"), b"sent\n");
        assert_eq!(fs::read(&path).expect("read"), b"new\n");
    }

    #[test]
    fn a_name_too_long_for_a_claim_is_checked_and_taken_by_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x".repeat(LONGEST_CLAIMED + 1));
        fs::write(&path, b"sent\n").expect("write");
        let held = hold(&path, stamp(&path), Links::NotFollowed);
        assert_eq!(held.path(), path);
        held.remove().expect("remove");
        assert!(names(dir.path()).is_empty());
    }
}
