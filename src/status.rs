//! What the running daemon tells the outside: counters, a JSON snapshot for
//! `s3-exchange status`, the one-line summary for systemd's `STATUS=`, and the numbers
//! behind the Prometheus endpoint.
//!
//! Why a file: sled holds an exclusive lock on the ledger, so a second process cannot
//! ask the ledger while the daemon runs. Instead the daemon writes `status.json` into
//! `state.dir` every few seconds and soon after every change, atomically (temp file +
//! rename), and `status` only reads it.
//!
//! Why a global: the counters are bumped from deep inside the workers (one line each
//! in `outbox.rs`, `inbox.rs`, `watcher.rs` and in `logging::Transfer`), and there is
//! one daemon per process. Atomics and one small mutex; nothing here blocks for long.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The process's counters.
pub static STATS: Stats = Stats::new();

/// The snapshot's file name inside `state.dir`.
pub const FILE_NAME: &str = "status.json";
/// Transfers kept for "last transfers".
const RECENT: usize = 20;
/// Quarantined files and rejected keys listed at most (the counts stay exact).
const LISTED: usize = 100;
/// Bumped when the snapshot's shape changes incompatibly.
const FORMAT: u32 = 1;
/// A live daemon's snapshot older than this means it stopped publishing.
const STALE_MS: i64 = 120_000;

/// Why the snapshot cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot read {path}: {source} (has the daemon run with this configuration? it writes the file once it is up)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a status file of this version: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Counters and recent events of this process.
pub struct Stats {
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
    queued: AtomicU64,
    in_flight: AtomicU64,
    polls: AtomicU64,
    poll_failures: AtomicU64,
    /// Raised by a failed listing, lowered (and judged) when the poll ends.
    poll_failing: AtomicBool,
    last_poll_ms: AtomicI64,
    last_good_poll_ms: AtomicI64,
    last_rescan_ms: AtomicI64,
    rescans: AtomicU64,
    watcher_overflows: AtomicU64,
    /// Woken on every change, so the publisher sleeps while nothing happens.
    changed_signal: tokio::sync::Notify,
    /// Woken after every full walk of the outbox (readiness waits for the first).
    scanned: tokio::sync::Notify,
    detail: Mutex<Detail>,
}

struct Detail {
    /// (direction, outcome) -> failed transfers.
    failures: BTreeMap<(&'static str, String), u64>,
    quarantined: BTreeMap<String, Item>,
    rejected: BTreeMap<String, Item>,
    recent: VecDeque<TransferRecord>,
}

/// A file or key held back, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub name: String,
    pub reason: String,
    pub since_ms: i64,
}

/// One finished transfer, as the `transfer` log event has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub at_ms: i64,
    pub direction: String,
    pub key: String,
    pub path: String,
    pub bytes: u64,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Failed transfers by direction and outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureCount {
    pub direction: String,
    pub outcome: String,
    pub count: u64,
}

impl Stats {
    const fn new() -> Self {
        Self {
            sent: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            poll_failures: AtomicU64::new(0),
            poll_failing: AtomicBool::new(false),
            last_poll_ms: AtomicI64::new(0),
            last_good_poll_ms: AtomicI64::new(0),
            last_rescan_ms: AtomicI64::new(0),
            rescans: AtomicU64::new(0),
            watcher_overflows: AtomicU64::new(0),
            changed_signal: tokio::sync::Notify::const_new(),
            scanned: tokio::sync::Notify::const_new(),
            detail: Mutex::new(Detail {
                failures: BTreeMap::new(),
                quarantined: BTreeMap::new(),
                rejected: BTreeMap::new(),
                recent: VecDeque::new(),
            }),
        }
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        // A panic elsewhere while holding it leaves plain data behind: keep using it.
        self.detail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changed_signal.notify_one();
    }

    /// Resolves after the next change (at once if one happened since the last call).
    pub async fn next_change(&self) {
        self.changed_signal.notified().await;
    }

    /// A transfer ended well (called by `logging::Transfer::done`).
    pub fn transfer_done(&self, direction: &'static str, key: &str, path: &str, bytes: u64) {
        let (count, total) = if direction == "upload" {
            (&self.sent, &self.sent_bytes)
        } else {
            (&self.received, &self.received_bytes)
        };
        count.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
        let mut d = self.detail();
        d.quarantined.remove(path);
        d.push_recent(TransferRecord {
            at_ms: now_ms(),
            direction: direction.into(),
            key: key.into(),
            path: path.into(),
            bytes,
            outcome: "ok".into(),
            error: None,
        });
        drop(d);
        self.changed();
    }

    /// A transfer failed (called by `logging::Transfer::failed`).
    pub fn transfer_failed(
        &self,
        direction: &'static str,
        key: &str,
        path: &str,
        outcome: &str,
        error: String,
    ) {
        let mut d = self.detail();
        *d.failures
            .entry((direction, outcome.to_owned()))
            .or_default() += 1;
        d.push_recent(TransferRecord {
            at_ms: now_ms(),
            direction: direction.into(),
            key: key.into(),
            path: path.into(),
            bytes: 0,
            outcome: outcome.into(),
            error: Some(error),
        });
        drop(d);
        self.changed();
    }

    /// The outbox worker's queue: files waiting to settle or retry, and uploads running.
    pub fn outbox_queue(&self, queued: usize, in_flight: usize) {
        let (q, f) = (queued as u64, in_flight as u64);
        if self.queued.swap(q, Ordering::Relaxed) != q
            || self.in_flight.swap(f, Ordering::Relaxed) != f
        {
            self.changed();
        }
    }

    /// An outbox file was quarantined (refused permanently until it changes).
    pub fn quarantined(&self, path: &Path, reason: &str) {
        self.detail().quarantined.insert(
            path.display().to_string(),
            Item {
                name: path.display().to_string(),
                reason: reason.into(),
                since_ms: now_ms(),
            },
        );
        self.changed();
    }

    /// An inbox key was rejected (it can never become a file inside the inbox).
    pub fn rejected(&self, key: &str, reason: &str) {
        self.detail().rejected.insert(
            key.into(),
            Item {
                name: key.into(),
                reason: reason.into(),
                since_ms: now_ms(),
            },
        );
        self.changed();
    }

    /// A full walk of the outbox (start-up, periodic, or after an overflow).
    pub fn rescanned(&self) {
        self.rescans.fetch_add(1, Ordering::Relaxed);
        self.last_rescan_ms.store(now_ms(), Ordering::Relaxed);
        self.changed();
        self.scanned.notify_waiters();
    }

    /// Resolves once the outbox has been walked more than `before` times in all.
    pub async fn scanned_beyond(&self, before: u64) {
        loop {
            let woken = self.scanned.notified();
            tokio::pin!(woken);
            // Registered before the check, so a walk in between is not missed.
            woken.as_mut().enable();
            if self.rescans.load(Ordering::Relaxed) > before {
                return;
            }
            woken.await;
        }
    }

    /// The watcher lost events (queue overflow or watch error): a rescan follows.
    pub fn watcher_overflow(&self) {
        self.watcher_overflows.fetch_add(1, Ordering::Relaxed);
        self.changed();
    }

    /// Listing the inbox prefix failed during the current poll.
    pub fn list_failed(&self) {
        self.poll_failing.store(true, Ordering::Relaxed);
    }

    /// A poll of the inbox prefix ended; it succeeded unless [`list_failed`] was called
    /// since the last poll ended.
    ///
    /// [`list_failed`]: Self::list_failed
    pub fn poll_done(&self) {
        let now = now_ms();
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.last_poll_ms.store(now, Ordering::Relaxed);
        if self.poll_failing.swap(false, Ordering::Relaxed) {
            self.poll_failures.fetch_add(1, Ordering::Relaxed);
        } else {
            self.last_good_poll_ms.store(now, Ordering::Relaxed);
        }
        self.changed();
    }

    /// A reload starts new workers: what the old ones held back is looked at afresh.
    pub fn workers_restarted(&self) {
        self.detail().quarantined.clear();
        self.queued.store(0, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        self.changed();
    }

    /// The counters as plain numbers.
    pub fn counters(&self) -> Counters {
        let d = self.detail();
        Counters {
            sent: self.sent.load(Ordering::Relaxed),
            sent_bytes: self.sent_bytes.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            received_bytes: self.received_bytes.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            quarantined: d.quarantined.len() as u64,
            rejected: d.rejected.len() as u64,
            polls: self.polls.load(Ordering::Relaxed),
            poll_failures: self.poll_failures.load(Ordering::Relaxed),
            last_poll_ms: nonzero(self.last_poll_ms.load(Ordering::Relaxed)),
            last_successful_poll_ms: nonzero(self.last_good_poll_ms.load(Ordering::Relaxed)),
            last_rescan_ms: nonzero(self.last_rescan_ms.load(Ordering::Relaxed)),
            rescans: self.rescans.load(Ordering::Relaxed),
            watcher_overflows: self.watcher_overflows.load(Ordering::Relaxed),
            failures: d
                .failures
                .iter()
                .map(|((direction, outcome), count)| FailureCount {
                    direction: (*direction).into(),
                    outcome: outcome.clone(),
                    count: *count,
                })
                .collect(),
        }
    }

    fn lists(&self) -> (Vec<Item>, Vec<Item>, Vec<TransferRecord>) {
        let d = self.detail();
        (
            d.quarantined.values().take(LISTED).cloned().collect(),
            d.rejected.values().take(LISTED).cloned().collect(),
            d.recent.iter().rev().cloned().collect(),
        )
    }
}

impl Detail {
    fn push_recent(&mut self, record: TransferRecord) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }
}

fn nonzero(ms: i64) -> Option<i64> {
    (ms != 0).then_some(ms)
}

/// The counters of this process, for the snapshot and the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub sent: u64,
    pub sent_bytes: u64,
    pub received: u64,
    pub received_bytes: u64,
    pub queued: u64,
    pub in_flight: u64,
    pub quarantined: u64,
    pub rejected: u64,
    pub polls: u64,
    pub poll_failures: u64,
    pub last_poll_ms: Option<i64>,
    pub last_successful_poll_ms: Option<i64>,
    pub last_rescan_ms: Option<i64>,
    pub rescans: u64,
    pub watcher_overflows: u64,
    pub failures: Vec<FailureCount>,
}

/// The daemon's life cycle, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Running,
    Reloading,
    Stopping,
    Stopped,
}

/// What `status.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub pid: u32,
    pub phase: Phase,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    pub config: String,
    pub bucket: String,
    pub outbox: String,
    pub inbox: String,
    /// Configurations applied by SIGHUP since start.
    pub reloads: u64,
    /// Records in the ledger when the daemon started.
    pub ledger_sent_at_start: u64,
    pub ledger_received_at_start: u64,
    /// This process's counters.
    #[serde(flatten)]
    pub counters: Counters,
    pub quarantined_items: Vec<Item>,
    pub rejected_items: Vec<Item>,
    /// Newest first.
    pub recent: Vec<TransferRecord>,
}

/// The parts of a snapshot that do not change while the daemon runs.
#[derive(Debug, Clone)]
pub struct Identity {
    pub started_at_ms: i64,
    pub config: String,
    pub bucket: String,
    pub outbox: String,
    pub inbox: String,
    pub ledger_sent_at_start: u64,
    pub ledger_received_at_start: u64,
}

impl Snapshot {
    /// The current state of this process.
    pub fn now(identity: &Identity, phase: Phase, reloads: u64) -> Self {
        let (quarantined_items, rejected_items, recent) = STATS.lists();
        Self {
            format: FORMAT,
            pid: std::process::id(),
            phase,
            started_at_ms: identity.started_at_ms,
            updated_at_ms: now_ms(),
            config: identity.config.clone(),
            bucket: identity.bucket.clone(),
            outbox: identity.outbox.clone(),
            inbox: identity.inbox.clone(),
            reloads,
            ledger_sent_at_start: identity.ledger_sent_at_start,
            ledger_received_at_start: identity.ledger_received_at_start,
            counters: STATS.counters(),
            quarantined_items,
            rejected_items,
            recent,
        }
    }

    /// The line systemd shows as the unit's status (`STATUS=`).
    pub fn summary(&self) -> String {
        let c = &self.counters;
        let mut line = format!(
            "{}: sent {}, received {}, queued {}",
            phase_word(self.phase),
            c.sent,
            c.received,
            c.queued + c.in_flight
        );
        if c.quarantined + c.rejected > 0 {
            line.push_str(&format!(", held back {}", c.quarantined + c.rejected));
        }
        let failed: u64 = c.failures.iter().map(|f| f.count).sum();
        if failed > 0 {
            line.push_str(&format!(", failed {failed}"));
        }
        match c.last_poll_ms {
            Some(ms) => line.push_str(&format!(", last poll {}", clock(ms))),
            None => line.push_str(", not polled yet"),
        }
        if c.last_poll_ms.is_some() && c.last_poll_ms != c.last_successful_poll_ms {
            line.push_str(" (failed)");
        }
        line
    }

    /// Writes the snapshot to `dir/status.json` atomically: readers see the old file or
    /// the new one, never half of one.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(FILE_NAME);
        let temp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let err = |source| Error::Write {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        let mut file = std::fs::File::create(&temp).map_err(err)?;
        file.write_all(&json).map_err(err)?;
        file.write_all(b"\n").map_err(err)?;
        drop(file);
        std::fs::rename(&temp, &path).map_err(err)
    }

    /// Reads `dir/status.json`.
    pub fn read(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(FILE_NAME);
        let text = std::fs::read(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| Error::Parse { path, source })
    }

    /// Whether the process that wrote it is still running (and did not say it stopped).
    /// A PID reused by another program does not count: its name must be ours.
    pub fn is_live(&self) -> bool {
        let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
        self.phase != Phase::Stopped
            && comm(&self.pid.to_string()).is_some_and(|theirs| Some(theirs) == comm("self"))
    }

    /// How long ago the daemon last wrote the snapshot.
    pub fn age_ms(&self) -> i64 {
        now_ms().saturating_sub(self.updated_at_ms)
    }

    /// The human-readable report of `s3-exchange status`.
    pub fn render(&self, live: bool) -> String {
        let c = &self.counters;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        if live {
            line(format!(
                "s3-exchange is {} (pid {}, up since {}, {} reload{})",
                phase_word(self.phase),
                self.pid,
                clock(self.started_at_ms),
                self.reloads,
                if self.reloads == 1 { "" } else { "s" }
            ));
            if self.age_ms() > STALE_MS {
                line(format!(
                    "  WARNING: the snapshot is {} s old (it is rewritten every 30 s): the daemon may be stuck",
                    self.age_ms() / 1000
                ));
            }
        } else {
            line(format!(
                "s3-exchange is not running (last seen {} as pid {})",
                clock(self.updated_at_ms),
                self.pid
            ));
        }
        line(format!("  config    {}", self.config));
        line(format!("  bucket    {}", self.bucket));
        line(format!("  outbox    {}", self.outbox));
        line(format!("  inbox     {}", self.inbox));
        line(format!(
            "  sent      {} ({}) this run, {} in the ledger at start",
            c.sent,
            bytes(c.sent_bytes),
            self.ledger_sent_at_start
        ));
        line(format!(
            "  received  {} ({}) this run, {} in the ledger at start",
            c.received,
            bytes(c.received_bytes),
            self.ledger_received_at_start
        ));
        line(format!(
            "  queued    {} waiting, {} uploading",
            c.queued, c.in_flight
        ));
        let poll = match (c.last_poll_ms, c.last_successful_poll_ms) {
            (None, _) => "not yet".to_owned(),
            (Some(a), Some(b)) if a == b => clock(a),
            (Some(a), Some(b)) => format!("{} FAILED (last good {})", clock(a), clock(b)),
            (Some(a), None) => format!("{} FAILED (none succeeded yet)", clock(a)),
        };
        line(format!("  last poll {poll}"));
        line(format!(
            "  rescan    {} (watcher overflows: {})",
            c.last_rescan_ms.map_or("not yet".to_owned(), clock),
            c.watcher_overflows
        ));
        for f in &c.failures {
            line(format!(
                "  failed    {} {}: {}",
                f.direction, f.outcome, f.count
            ));
        }
        if !self.quarantined_items.is_empty() {
            line(format!("quarantined ({}):", c.quarantined));
            for item in &self.quarantined_items {
                line(format!("  {}: {}", item.name, item.reason));
            }
        }
        if !self.rejected_items.is_empty() {
            line(format!("rejected keys ({}):", c.rejected));
            for item in &self.rejected_items {
                line(format!("  {}: {}", item.name, item.reason));
            }
        }
        if !self.recent.is_empty() {
            line("last transfers:".into());
            for t in &self.recent {
                let what = match &t.error {
                    Some(e) => format!("{} {e}", t.outcome),
                    None => bytes(t.bytes),
                };
                line(format!(
                    "  {} {:8} {} ({what})",
                    clock(t.at_ms),
                    t.direction,
                    t.key
                ));
            }
        }
        out
    }
}

fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Reloading => "reloading",
        Phase::Stopping => "stopping",
        Phase::Stopped => "stopped",
    }
}

/// Milliseconds since the epoch as `2026-11-28T03:15:00Z`.
fn clock(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            started_at_ms: 1_700_000_000_000,
            config: "/etc/x.toml".into(),
            bucket: "b".into(),
            outbox: "/o".into(),
            inbox: "/i".into(),
            ledger_sent_at_start: 3,
            ledger_received_at_start: 4,
        }
    }

    #[test]
    fn a_snapshot_survives_the_round_trip_through_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snap = Snapshot::now(&identity(), Phase::Running, 2);
        snap.write(dir.path()).expect("write");
        let back = Snapshot::read(dir.path()).expect("read");
        assert_eq!(back, snap);
        assert!(back.is_live(), "this process wrote it and runs");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "no temp file is left behind");
    }

    #[test]
    fn a_stopped_or_vanished_daemon_is_not_live() {
        let mut snap = Snapshot::now(&identity(), Phase::Stopped, 0);
        assert!(!snap.is_live());
        snap.phase = Phase::Running;
        snap.pid = u32::MAX;
        assert!(!snap.is_live());
        // A live process that is not an s3-exchange (PID 1 is init, whatever it is).
        snap.pid = 1;
        assert!(!snap.is_live());
        assert!(snap.render(false).contains("not running"));
    }

    #[test]
    fn a_missing_file_says_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Snapshot::read(dir.path()).expect_err("no file").to_string();
        assert!(
            err.contains("status.json") && err.contains("daemon"),
            "{err}"
        );
    }

    #[test]
    fn the_summary_is_one_line_with_the_counts() {
        let mut snap = Snapshot::now(&identity(), Phase::Running, 0);
        snap.counters = Counters {
            sent: 5,
            received: 7,
            queued: 1,
            in_flight: 1,
            quarantined: 1,
            last_poll_ms: Some(1_700_000_000_000),
            last_successful_poll_ms: Some(1_699_000_000_000),
            failures: vec![FailureCount {
                direction: "upload".into(),
                outcome: "failed".into(),
                count: 2,
            }],
            ..Counters::default()
        };
        let line = snap.summary();
        assert!(!line.contains('\n'));
        for part in [
            "running",
            "sent 5",
            "received 7",
            "queued 2",
            "held back 1",
            "failed 2",
            "(failed)",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
    }

    #[test]
    fn sizes_read_like_sizes() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(16 << 20), "16.0 MiB");
    }
}
