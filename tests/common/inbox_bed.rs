//! A test bed for the inbox half (`tests/inbox.rs`): the real daemon polling one bucket on
//! a real S3 server (moto, which stores hostile keys literally, or the in-process s3s-fs),
//! with a world around the inbox that must stay untouched.
//!
//! Layout of one bed (a fresh temporary folder):
//!
//! ```text
//! canary/secret.txt    next to the inbox: must never change, nothing may appear beside it
//! inbox/ outbox/ sent/ state/ log/    the daemon's folders (log/ holds its JSON lines)
//! output/              the daemon's stderr and stdout, one pair per run
//! s3/                  s3s-fs's data (in-process backend only)
//! ```
//!
//! The daemon talks to the harness's [`Proxy`] (what it sent, what it got; where a test
//! overwrites an object just before its GET, or damages a body), which forwards to the
//! server. The owner talks to the server directly. Every wait polls a
//! condition until a deadline; nothing sleeps to synchronise.

mod tmpfs;

pub use tmpfs::Tmpfs;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tempfile::TempDir;

use super::daemon::{self, Daemon};
use super::fixture::{DaemonFolders, INBOX_TEMP_DIR, assert_inbox_holds, config_toml};
use super::{Owner, POLL, Proxy, Recorded, S3Server, Settings, TIMEOUT, files_under, write_file};

/// Where a [`Bed`] keeps its canary, relative to its root: a folder next to the inbox.
pub const CANARY_FILE: &str = "canary/secret.txt";
/// What the canary holds, before and after every test.
pub const CANARY_TEXT: &[u8] = b"canary: nothing the daemon does may ever change this file\n";

/// The endpoint of the moto server `tests/interop/moto.sh` started (its env file exports it).
const MOTO_ENDPOINT: &str = "S3X_MOTO_ENDPOINT";
/// Set to `1` by the test scripts: then a missing server fails the test instead of skipping.
const REQUIRE: &str = "S3X_REQUIRE_INTEROP";

/// Prints `skipped: <test>: <why>` where a plain `cargo test` run shows it (libtest
/// captures `eprintln!`, not the stderr handle).
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

/// Prints a line (a measurement, a server limitation) that shows even when the test passes.
pub fn note(test: &str, text: &str) {
    let _ = writeln!(std::io::stderr(), "note: {test}: {text}");
}

/// The S3 server a bed trades through.
pub enum Backend {
    /// A moto server already running at this endpoint (shared; each bed has its own bucket).
    Moto(String),
    /// A fresh s3s-fs in this process, serving the bed's `s3/` folder.
    S3sFs,
}

impl Backend {
    /// moto, as `tests/run.sh` provides it (`S3X_MOTO_ENDPOINT`), or `None` after a visible
    /// "skipped" line. With `S3X_REQUIRE_INTEROP=1` a missing moto fails the test.
    pub fn moto(test: &str) -> Option<Self> {
        if let Some(endpoint) = std::env::var(MOTO_ENDPOINT).ok().filter(|v| !v.is_empty()) {
            return Some(Self::Moto(endpoint));
        }
        let why = format!(
            "{MOTO_ENDPOINT} is not set: this test needs moto (keys stored literally, ETags \
             in listings); run tests/run.sh, or `tests/interop/moto.sh start` and source \
             $S3X_INTEROP_HOME/moto.env (default /tmp/s3x-interop)"
        );
        assert!(
            std::env::var(REQUIRE).as_deref() != Ok("1"),
            "{REQUIRE}=1 but moto is missing: {why}"
        );
        skip(test, &why);
        None
    }
}

/// A bucket name no other bed (in this or another test process, on a shared moto) uses.
fn unique_bucket() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "s3x-inbox-{}-{}-{nanos:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's world. Fields drop in declaration order: the daemon dies first, then the
/// tmpfs is unmounted, the proxies and the server stop, and the folder goes last.
pub struct Bed {
    daemon: Option<Daemon>,
    /// File systems mounted over the bed's folders, by mount point.
    tmpfs: Vec<(PathBuf, Tmpfs)>,
    runs: u32,
    last_stderr: Option<PathBuf>,
    /// The harness's owner client, straight to the server (hostile keys, multipart and
    /// checksummed puts included).
    pub owner: Owner,
    /// What the daemon talks to: every request and its status, and the faults tests inject.
    pub proxy: Proxy,
    server: Option<S3Server>,
    /// The server's own endpoint (the owner's; the daemon's goes through the proxy).
    pub server_endpoint: String,
    pub bucket: String,
    pub settings: Settings,
    pub root: PathBuf,
    pub inbox: PathBuf,
    pub outbox: PathBuf,
    pub sent: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub output: PathBuf,
    pub canary: PathBuf,
    /// s3s-fs's data folder (its buckets are folders in it), for the in-process backend.
    pub s3_data: Option<PathBuf>,
    pub config_path: PathBuf,
    /// Everything outside the daemon's folders, as it was when the bed was made.
    baseline: BTreeMap<String, String>,
    /// Deleted on drop, unless the test failed: then it is kept for the post-mortem.
    dir: Option<TempDir>,
}

impl Bed {
    /// A bed on moto, or `None` (the test skips, or fails under `S3X_REQUIRE_INTEROP=1`)
    /// when moto is not there: see [`Backend::moto`].
    pub fn on_moto(test: &str, settings: Settings) -> Option<Self> {
        Backend::moto(test).map(|backend| Self::new(backend, settings))
    }

    /// Folders, canary, server (for [`Backend::S3sFs`]), proxies, a new bucket and the
    /// config file; the daemon is not started.
    pub fn new(backend: Backend, settings: Settings) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3x-inbox-test-")
            .tempdir()
            .expect("create the test's temporary folder");
        let root = dir.path().to_path_buf();
        let folder = |name: &str| {
            let path = root.join(name);
            fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            path
        };
        let (inbox, outbox, sent, state, log, output) = (
            folder("inbox"),
            folder("outbox"),
            folder("sent"),
            folder("state"),
            folder("log"),
            folder("output"),
        );
        write_file(&root.join(CANARY_FILE), CANARY_TEXT);
        let canary = root.join("canary");
        let (server, server_endpoint, s3_data) = match backend {
            Backend::Moto(endpoint) => (None, endpoint, None),
            Backend::S3sFs => {
                let data = folder("s3");
                let server = S3Server::start(&data);
                let endpoint = server.endpoint();
                (Some(server), endpoint, Some(data))
            }
        };
        let bucket = unique_bucket();
        let proxy = Proxy::start(&server_endpoint);
        let owner = Owner::new(&server_endpoint, &bucket);
        owner.create_bucket(&bucket);
        let mut bed = Self {
            daemon: None,
            tmpfs: Vec::new(),
            runs: 0,
            last_stderr: None,
            owner,
            proxy,
            server,
            server_endpoint,
            bucket,
            settings,
            config_path: root.join("s3-exchange.toml"),
            root,
            inbox,
            outbox,
            sent,
            state,
            log,
            output,
            canary,
            s3_data,
            baseline: BTreeMap::new(),
            dir: Some(dir),
        };
        bed.write_config();
        bed.baseline = bed.outside();
        bed
    }

    /// The config file for the current settings; the daemon talks to the proxy.
    pub fn config_text(&self) -> String {
        config_toml(
            &self.bucket,
            &self.proxy.endpoint(),
            &DaemonFolders {
                outbox: &self.outbox,
                sent: &self.sent,
                inbox: &self.inbox,
                state: &self.state,
                log: &self.log,
            },
            &self.settings,
        )
    }

    /// Writes the config file for the current settings (takes effect at the next start).
    pub fn write_config(&self) {
        fs::write(&self.config_path, self.config_text())
            .unwrap_or_else(|e| panic!("write {}: {e}", self.config_path.display()));
    }

    /// The object key that lands at `rel` in the inbox.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.settings.delivery_prefix)
    }

    // ----- the daemon -------------------------------------------------------------------

    /// Starts `s3-exchange run`. Panics if a daemon is still running.
    pub fn start(&mut self) -> &Daemon {
        if let Some(old) = &self.daemon {
            assert!(
                old.try_exit().is_some(),
                "start: a daemon is still running\n{}",
                old.stderr_tail()
            );
        }
        self.runs += 1;
        let stderr = self.output.join(format!("run-{}.stderr", self.runs));
        self.last_stderr = Some(stderr.clone());
        self.daemon = Some(Daemon::spawn(&self.root, &self.config_path, "run", stderr));
        self.daemon()
    }

    /// The current (or last) daemon.
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("no daemon was started")
    }

    /// SIGTERM, wait for the exit, and insist on exit code 0.
    #[track_caller]
    pub fn stop(&self) {
        let daemon = self.daemon();
        daemon.signal_term();
        let status: ExitStatus = daemon.wait_exit(TIMEOUT);
        assert_eq!(
            status.code(),
            Some(0),
            "exit status on SIGTERM: {status}\n{}",
            self.diagnostics()
        );
    }

    /// Sends SIGUSR1 ("poll now") to the running daemon.
    #[track_caller]
    pub fn signal_usr1(&self) {
        let daemon = self.daemon();
        assert!(
            daemon.try_exit().is_none(),
            "cannot send SIGUSR1: the daemon exited\n{}",
            self.diagnostics()
        );
        let status = Command::new("kill")
            .args(["-s", "USR1", &daemon.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill -s USR1: {e}"));
        assert!(status.success(), "kill -s USR1 {} failed", daemon.pid());
    }

    /// The running daemon's peak resident memory (`VmHWM`), in KiB.
    #[track_caller]
    pub fn peak_rss_kib(&self) -> u64 {
        let pid = self.daemon().pid();
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
    }

    /// The CPU time (user + system) the running daemon has used so far, in seconds.
    #[track_caller]
    pub fn cpu_seconds(&self) -> f64 {
        let pid = self.daemon().pid();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
        // Fields after the command name (which may hold spaces, inside parentheses):
        // state is field 3, utime 14 and stime 15, in clock ticks (USER_HZ, 100 on Linux).
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        let (Some(utime), Some(stime)) = (ticks(14), ticks(15)) else {
            panic!("cannot read the CPU times in /proc/{pid}/stat: {stat}");
        };
        (utime + stime) as f64 / 100.0
    }

    /// What a failure message should show: the stderr tail of the latest run.
    pub fn diagnostics(&self) -> String {
        match &self.last_stderr {
            Some(path) => daemon::stderr_tail(path),
            None => "(the daemon was not run)".into(),
        }
    }

    /// Polls `cond` every 20 ms for up to [`TIMEOUT`]; fails at once if the daemon exits.
    #[track_caller]
    pub fn wait_for(&self, what: &str, cond: impl FnMut() -> bool) {
        self.wait_for_within(what, TIMEOUT, POLL, cond);
    }

    /// Polls `cond` every `every` for up to `timeout`. Fails at once if the daemon exits
    /// meanwhile, and on timeout names `what` and shows the daemon's stderr.
    #[track_caller]
    pub fn wait_for_within(
        &self,
        what: &str,
        timeout: Duration,
        every: Duration,
        cond: impl FnMut() -> bool,
    ) {
        daemon::wait_while_running(
            || self.daemon.as_ref().and_then(Daemon::try_exit),
            what,
            (timeout, every),
            cond,
            || self.diagnostics(),
        );
    }

    // ----- the wire ---------------------------------------------------------------------

    /// Whether `r` starts an inbox poll: a ListObjectsV2 of the delivery prefix without a
    /// continuation token (later pages of the same poll carry one).
    pub fn is_poll_start(&self, r: &Recorded) -> bool {
        r.method == "GET"
            && r.query.contains("list-type=2")
            && !r.query.contains("continuation-token")
            && r.is_bucket_level(&self.bucket)
            && r.query_param("prefix").as_deref() == Some(self.settings.delivery_prefix.as_str())
    }

    /// Whether `r` is a GetObject of `key`.
    pub fn is_get_of(&self, r: &Recorded, key: &str) -> bool {
        r.method == "GET"
            && !r.query.contains("list-type")
            && r.key_in(&self.bucket).as_deref() == Some(key)
    }

    /// Whether `r` is a GetObject of any delivery key.
    pub fn is_delivery_get(&self, r: &Recorded) -> bool {
        r.method == "GET"
            && !r.query.contains("list-type")
            && r.key_in(&self.bucket)
                .is_some_and(|k| k.starts_with(&self.settings.delivery_prefix))
    }

    /// Indices of the requests that start a poll. A first page listed again right away
    /// with `encoding-type=url` (the daemon's answer to a listing XML cannot carry) is
    /// the same poll, not a new one.
    pub fn poll_start_indices(&self, requests: &[Recorded]) -> Vec<usize> {
        let mut starts: Vec<usize> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if !self.is_poll_start(r) {
                continue;
            }
            let retry = i > 0
                && starts.last() == Some(&(i - 1))
                && r.query.contains("encoding-type=url")
                && !requests[i - 1].query.contains("encoding-type=url");
            if !retry {
                starts.push(i);
            }
        }
        starts
    }

    /// How many polls the daemon has started.
    pub fn polls_started(&self) -> usize {
        self.poll_start_indices(&self.proxy.requests()).len()
    }

    /// Every GET of `key` so far, in order.
    pub fn gets_of(&self, key: &str) -> Vec<Recorded> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| self.is_get_of(r, key))
            .collect()
    }

    /// How many delivery GETs the daemon has made.
    pub fn delivery_gets(&self) -> usize {
        self.proxy.count(|r| self.is_delivery_get(r))
    }

    /// Waits until `polls` more polls than `since` have started: with `polls >= 2` the first
    /// of them, and everything it fetched, has completed.
    #[track_caller]
    pub fn wait_for_polls(&self, since: usize, polls: usize) {
        self.wait_for(
            &format!("{polls} more polls of the delivery prefix (after {since})"),
            || self.polls_started() >= since + polls,
        );
    }

    // ----- the log ----------------------------------------------------------------------

    /// Every event of every run so far, from the JSON lines in `log/` (lines still being
    /// written are skipped). Stop the daemon first to be sure everything is flushed.
    pub fn log_events(&self) -> Vec<Value> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.log)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The events whose `key` field is exactly `key`.
    pub fn events_about(&self, key: &str) -> Vec<Value> {
        self.log_events()
            .into_iter()
            .filter(|e| field(e, "key") == Some(key))
            .collect()
    }

    /// The rejection events of `key`: events about it that carry a `reason`.
    pub fn rejections_of(&self, key: &str) -> Vec<Value> {
        self.events_about(key)
            .into_iter()
            .filter(|e| field(e, "reason").is_some())
            .collect()
    }

    /// The `transfer` events of `key` whose outcome is not `ok`.
    pub fn failed_transfers_of(&self, key: &str) -> Vec<Value> {
        self.events_about(key)
            .into_iter()
            .filter(|e| {
                field(e, "message") == Some("transfer") && field(e, "outcome") != Some("ok")
            })
            .collect()
    }

    // ----- the disk ---------------------------------------------------------------------

    /// Mounts a tmpfs of `size` (`mount`'s syntax: `2m`) over the bed's folder `dir` (still
    /// empty: what it holds is hidden); call before [`Bed::start`]. `Err` says why not.
    pub fn mount_tmpfs(&mut self, dir: &Path, size: &str) -> Result<(), String> {
        let mounted = Tmpfs::mount(dir, size)?;
        self.tmpfs.push((dir.to_owned(), mounted));
        Ok(())
    }

    /// Remounts the tmpfs mounted over `dir` with `options` (`size=16m`, `ro`, `rw`),
    /// keeping what it holds.
    #[track_caller]
    pub fn remount_tmpfs(&self, dir: &Path, options: &str) {
        self.tmpfs
            .iter()
            .find(|(at, _)| at == dir)
            .unwrap_or_else(|| panic!("no tmpfs is mounted on {}", dir.display()))
            .1
            .remount(options);
    }

    /// Everything under the root except the daemon's own folders (inbox, outbox, sent,
    /// state, log), the captured output, the server's data and the config file: relative
    /// path -> what it is (`dir`, `file <len> <hash>`, `symlink -> target`).
    pub fn outside(&self) -> BTreeMap<String, String> {
        let mut skip: Vec<&Path> = vec![
            &self.inbox,
            &self.outbox,
            &self.sent,
            &self.state,
            &self.log,
            &self.output,
            &self.config_path,
        ];
        if let Some(data) = &self.s3_data {
            skip.push(data);
        }
        let mut out = BTreeMap::new();
        describe_tree(&self.root, &self.root, &skip, &mut out);
        out
    }

    /// Asserts nothing appeared, vanished or changed outside the daemon's folders since the
    /// bed was made, and the canary holds what it held.
    #[track_caller]
    pub fn assert_nothing_outside(&self) {
        let now = self.outside();
        let mut changes = Vec::new();
        for (path, was) in &self.baseline {
            match now.get(path) {
                None => changes.push(format!("vanished: {path:?} (was {was})")),
                Some(is) if is != was => changes.push(format!("changed: {path:?}: {was} -> {is}")),
                Some(_) => {}
            }
        }
        for (path, is) in &now {
            if !self.baseline.contains_key(path) {
                changes.push(format!("appeared: {path:?} ({is})"));
            }
        }
        assert!(
            changes.is_empty(),
            "the daemon touched things outside the inbox:\n{}\n{}",
            changes.join("\n"),
            self.diagnostics()
        );
        assert_eq!(
            fs::read(self.root.join(CANARY_FILE)).ok().as_deref(),
            Some(CANARY_TEXT),
            "the canary changed"
        );
    }

    /// Asserts the inbox holds exactly `expected` (relative, `/`-separated; symlinks count
    /// as entries) and the daemon's temp folder is empty.
    #[track_caller]
    pub fn assert_inbox_holds(&self, expected: &[&str]) {
        assert_inbox_holds(&self.inbox, expected, &self.diagnostics());
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("test failed: keeping {}", dir.keep().display());
        }
    }
}

/// A string field of an event (`fields.<name>`).
pub fn field<'a>(event: &'a Value, name: &str) -> Option<&'a str> {
    event.get("fields")?.get(name)?.as_str()
}

fn describe_tree(root: &Path, dir: &Path, skip: &[&Path], out: &mut BTreeMap<String, String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if skip.contains(&path.as_path()) {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("walked path is under the root")
            .to_string_lossy()
            .into_owned();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = fs::read_link(&path).unwrap_or_default();
            out.insert(rel, format!("symlink -> {}", target.display()));
        } else if kind.is_dir() {
            out.insert(rel, "dir".into());
            describe_tree(root, &path, skip, out);
        } else {
            let bytes = fs::read(&path).unwrap_or_default();
            out.insert(rel, format!("file {} {:016x}", bytes.len(), fnv1a(&bytes)));
        }
    }
}

/// FNV-1a, enough to notice a changed file.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
