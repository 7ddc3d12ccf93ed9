//! The process's open-file limit.
//!
//! Each transfer holds a file and a connection open, in both directions at once, and the
//! HTTP pool keeps idle connections for reuse: at `transfer.concurrency = 128` that is
//! about 600 descriptors at the peak of a burst, close to the 1024 a process gets by
//! default (the "soft" limit) although far more is allowed (the "hard" limit: 524288
//! under systemd). Running out would fail transfers with EMFILE, so the daemon raises its
//! soft limit to the hard one at start, as Go programs such as s5cmd and rclone do.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors a daemon with `concurrency` transfers per direction may hold at once:
/// per transfer a file and a connection, both directions, an idle connection each in the
/// pool, and a margin for the ledger, the watcher, logs and folders.
pub fn open_files_needed(concurrency: usize) -> u64 {
    (concurrency as u64) * 6 + 128
}

/// Raises the soft open-file limit to the hard one. Returns the limit now in force when
/// it is still below `needed` (the hard limit is too low), so the caller can warn.
pub fn raise_open_files(needed: u64) -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    let now = limit.current.unwrap_or(u64::MAX);
    if now >= needed {
        return None;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let now = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum.unwrap_or(u64::MAX),
        Err(_) => now,
    };
    (now < needed).then_some(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_to_what_is_needed() {
        let needed = open_files_needed(128);
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        let short = raise_open_files(needed);
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        if hard >= needed {
            assert_eq!(short, None);
            assert!(soft >= needed, "soft limit {soft} < {needed}");
        } else {
            assert_eq!(short, Some(soft));
        }
    }
}
