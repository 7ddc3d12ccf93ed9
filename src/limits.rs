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

/// Raises the soft open-file limit to the hard one, always (a reload may raise
/// `transfer.concurrency` later). Returns the limit now in force when it is still below
/// `needed` (the hard limit is too low), so the caller can warn.
pub fn raise_open_files(needed: u64) -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    // An unlimited hard limit is no value Linux takes for the soft one (EPERM above
    // fs.nr_open, 2^20 by default): aim at that, then at what is needed.
    let targets = match limit.maximum {
        Some(hard) => vec![hard],
        None => vec![needed.max(1 << 20), needed],
    };
    for target in targets {
        if target <= soft {
            break;
        }
        let raised = Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            break;
        }
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    (now < needed).then_some(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_to_the_hard_one() {
        let needed = open_files_needed(128);
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        let short = raise_open_files(needed);
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        if hard >= needed {
            assert_eq!(short, None);
            assert!(soft >= needed, "soft limit {soft} < {needed}");
            // Raised all the way to a finite hard limit, not just to what is needed.
            if let Some(hard) = getrlimit(Resource::Nofile).maximum {
                assert_eq!(soft, hard);
            }
        } else {
            assert_eq!(short, Some(soft));
        }
    }
}
