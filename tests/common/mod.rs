//! Shared harness for the end-to-end tests: a real S3-compatible server, a recording, fault-injecting proxy
//! in front of it, the bucket owner's client, and the real `s3-exchange` binary.
//!
//! Everything here is blocking so tests can be plain `#[test]` functions: the server and the
//! proxy own their tokio runtimes, the owner's client owns a current-thread runtime. Nothing
//! waits by sleeping: every wait polls a condition until a deadline and then fails loudly.

// Each integration-test crate compiles this module on its own and uses a different subset of
// it; what one crate leaves unused is not dead.
#![allow(dead_code, unused_imports)]

mod daemon;
pub mod expected_owner;
mod fixture;
mod gauge;
pub mod inbox_bed;
pub mod outbox;
mod owner;
mod proxy;
mod server;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

pub use daemon::{Daemon, Finished, wait_while_running};
pub use fixture::{BUCKET, Exchange, Settings};
pub use gauge::HeldGauge;
pub use owner::Owner;
pub use proxy::{Fault, Injected, Proxy, Recorded, get_of};
pub use server::{S3Server, SHORT_LIVED_PREFIX, short_lived_secret};

/// How long any single wait may take before the test fails. Generous because the machine has
/// two cores that may be busy compiling; a passing run never waits this long.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How often a condition is re-checked while waiting.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` every [`POLL`] until it holds or `timeout` passes, then panics naming `what`.
///
/// Prefer [`Exchange::wait_for`] inside a fixture: it also fails fast when the daemon dies and
/// prints the daemon's stderr.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(POLL);
    }
}

/// The last `lines` lines of `text`, for failure messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Deterministic pseudo-random bytes (splitmix64), so big files are incompressible and every
/// run uses the same data. Different seeds give different contents.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `bytes` to `path`, creating parent folders first.
pub fn write_file(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The contents of `path`, or `None` if it does not exist (any other error panics).
pub fn read_file(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// What [`write_slowly`]'s thread reports when it has written the last chunk.
#[derive(Debug, Clone, Copy)]
pub struct SlowWrite {
    /// The longest time between two consecutive writes as actually observed. If the machine
    /// stalled the writer for longer than the daemon's settle time, the daemon was entitled
    /// to take the file for complete, and the test must not blame it.
    pub max_gap: Duration,
}

/// Writes `bytes` to `path` in `chunks` pieces, `interval` apart, from a new thread, keeping
/// one file handle open the whole time (as a slow producer would). Returns the thread's
/// handle; join it to know the write is complete.
pub fn write_slowly(
    path: PathBuf,
    bytes: Vec<u8>,
    chunks: usize,
    interval: Duration,
) -> thread::JoinHandle<SlowWrite> {
    thread::spawn(move || {
        let mut file =
            fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let chunk_len = bytes.len().div_ceil(chunks.max(1)).max(1);
        let mut max_gap = Duration::ZERO;
        let mut last = Instant::now();
        for (i, chunk) in bytes.chunks(chunk_len).enumerate() {
            if i > 0 {
                thread::sleep(interval);
            }
            file.write_all(chunk)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            max_gap = max_gap.max(last.elapsed());
            last = Instant::now();
        }
        file.sync_all()
            .unwrap_or_else(|e| panic!("sync {}: {e}", path.display()));
        SlowWrite { max_gap }
    })
}

/// Every regular file under `root`, as `/`-separated paths relative to `root`, sorted.
/// Folders are walked, not listed; a missing `root` gives an empty list.
pub fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // A folder may vanish while we walk it (the daemon moves files out of the outbox).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("read dir {}: {e}", dir.display()),
    };
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()));
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .expect("walked path is under the root");
            let parts: Vec<_> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect();
            out.push(parts.join("/"));
        }
    }
}

/// Asserts `actual` is exactly `expected`, describing a mismatch by lengths and the first
/// differing offset rather than dumping megabytes. `context` is appended to the message
/// (typically the daemon's stderr tail).
#[track_caller]
pub fn assert_same_bytes(what: &str, actual: Option<&[u8]>, expected: &[u8], context: &str) {
    let Some(actual) = actual else {
        panic!(
            "{what}: missing (expected {} bytes)\n{context}",
            expected.len()
        );
    };
    if actual != expected {
        let first_difference = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(actual.len().min(expected.len()));
        panic!(
            "{what}: {} bytes, expected {} bytes; first difference at offset {first_difference}\n{context}",
            actual.len(),
            expected.len()
        );
    }
}
