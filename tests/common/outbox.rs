//! Helpers for the outbox tests: which request is which, config lines the [`Settings`] do
//! not cover, the daemon's own count of outbox walks (from `status.json`) as the clock of
//! "nothing else happens" assertions, `kill -9`, and the daemon's peak memory.
//!
//! [`Settings`]: super::Settings

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use super::{BUCKET, Daemon, Exchange, POLL, Recorded, TIMEOUT, tail};

/// Whether `r` is a PutObject of `key` (a PUT that is not an UploadPart).
pub fn is_put_object_of(r: &Recorded, key: &str) -> bool {
    is_put_object(r) && r.key_in(BUCKET).as_deref() == Some(key)
}

/// Whether `r` is a PutObject of any key.
pub fn is_put_object(r: &Recorded) -> bool {
    r.method == "PUT"
        && r.key_in(BUCKET).is_some()
        && !r.has_query_param("partNumber")
        && !r.has_query_param("uploadId")
}

/// Whether `r` is a CreateMultipartUpload of `key`.
pub fn is_create_multipart_of(r: &Recorded, key: &str) -> bool {
    r.method == "POST" && r.key_in(BUCKET).as_deref() == Some(key) && r.has_query_param("uploads")
}

/// Whether `r` is an UploadPart of `key`.
pub fn is_upload_part_of(r: &Recorded, key: &str) -> bool {
    r.method == "PUT" && r.key_in(BUCKET).as_deref() == Some(key) && r.has_query_param("partNumber")
}

/// Whether `r` is a CompleteMultipartUpload of `key`.
pub fn is_complete_multipart_of(r: &Recorded, key: &str) -> bool {
    r.method == "POST" && r.key_in(BUCKET).as_deref() == Some(key) && r.has_query_param("uploadId")
}

/// Whether `r` is an AbortMultipartUpload of `key`.
pub fn is_abort_multipart_of(r: &Recorded, key: &str) -> bool {
    r.method == "DELETE"
        && r.key_in(BUCKET).as_deref() == Some(key)
        && r.has_query_param("uploadId")
}

/// The `partNumber` of an UploadPart.
pub fn part_number(r: &Recorded) -> Option<u32> {
    r.query_param("partNumber")?.parse().ok()
}

/// The `uploadId` of a multipart request.
pub fn upload_id(r: &Recorded) -> Option<String> {
    r.query_param("uploadId")
}

/// Every key the daemon addressed with a request that creates or changes an object (PUT,
/// UploadPart, Create/Complete multipart), sorted and deduplicated.
pub fn keys_written(ex: &Exchange) -> Vec<String> {
    let mut keys: Vec<String> = ex
        .proxy
        .requests()
        .iter()
        .filter(|r| matches!(r.method.as_str(), "PUT" | "POST"))
        .filter_map(|r| r.key_in(BUCKET))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// `config` (the fixture's TOML) with `lines` added to its `[outbox]` table.
#[track_caller]
pub fn with_outbox_lines(config: &str, lines: &str) -> String {
    with_table_lines(config, "outbox", lines)
}

/// `config` (the fixture's TOML) with `lines` added to its `[table]` table.
#[track_caller]
pub fn with_table_lines(config: &str, table: &str, lines: &str) -> String {
    let header = format!("[{table}]\n");
    assert!(config.contains(&header), "no [{table}] table in:\n{config}");
    config.replacen(&header, &format!("{header}{lines}\n"), 1)
}

/// `config` with `key = ...` of the `[outbox]` table replaced by `key = value` (value
/// written verbatim, quotes included).
#[track_caller]
pub fn with_outbox_value(config: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key} = ");
    let mut found = false;
    let text: Vec<String> = config
        .lines()
        .map(|line| {
            if line.starts_with(&prefix) && !found {
                found = true;
                format!("{prefix}{value}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(found, "no `{key}` in:\n{config}");
    text.join("\n") + "\n"
}

/// The daemon's published `status.json`, if it is this daemon's (the file of a killed
/// predecessor stays until the new one writes its own).
pub fn status(ex: &Exchange, daemon: &Daemon) -> Option<serde_json::Value> {
    status_of_pid(ex, daemon.pid())
}

/// `status.json` if the process `pid` wrote it.
pub fn status_of_pid(ex: &Exchange, pid: u32) -> Option<serde_json::Value> {
    let text = fs::read(ex.state.join("status.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    (value.get("pid")?.as_u64()? == u64::from(pid)).then_some(value)
}

/// How many times the running daemon has walked the whole outbox (start-up scan, periodic
/// and overflow rescans), as it last published it; 0 before its first publication.
pub fn rescans(ex: &Exchange) -> u64 {
    status(ex, ex.daemon())
        .and_then(|s| s.get("rescans")?.as_u64())
        .unwrap_or(0)
}

/// Waits until the daemon has published `more` walks of the outbox beyond `since`. A file
/// present during a walk has by then been found; with `more >= 2` and a settle time
/// shorter than the rescan interval, whatever that walk started has been dispatched.
#[track_caller]
pub fn wait_for_rescans(ex: &Exchange, since: u64, more: u64) {
    ex.wait_for(
        &format!("{more} more walks of the outbox (status.json)"),
        || rescans(ex) >= since + more,
    );
}

/// Waits until the daemon is up and watching: its start-up scan is published (the watcher
/// is installed before that scan starts).
#[track_caller]
pub fn wait_until_watching(ex: &Exchange) {
    wait_for_rescans(ex, 0, 1);
}

/// `kill -9`: no shutdown, no flush beyond what the daemon already made durable.
#[track_caller]
pub fn kill_9(daemon: &Daemon) {
    send_signal(daemon, "KILL");
}

/// Sends signal `name` (`KILL`, `STOP`, `CONT`, ...) to the running daemon.
#[track_caller]
pub fn send_signal(daemon: &Daemon, name: &str) {
    assert!(
        daemon.try_exit().is_none(),
        "cannot send SIG{name}: the daemon already exited\n{}",
        daemon.stderr_tail()
    );
    let status = Command::new("kill")
        .args(["-s", name, &daemon.pid().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("run kill -s {name}: {e}"));
    assert!(status.success(), "kill -s {name} {} failed", daemon.pid());
}

/// A line of `/proc/PID/status` in KiB (`VmHWM` is the peak resident set size).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The stderr lines of the current daemon that contain every one of `needles`.
pub fn stderr_lines_with(ex: &Exchange, needles: &[&str]) -> Vec<String> {
    ex.daemon()
        .stderr()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Creates a FIFO (named pipe) at `path` with mkfifo(1): a file no reader may ever open
/// blindly (the open blocks until a writer comes).
#[track_caller]
pub fn mkfifo(path: &std::path::Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap_or_else(|e| panic!("run mkfifo: {e}"));
    assert!(status.success(), "mkfifo {} failed", path.display());
}

/// User + system CPU time a process has used so far, in seconds (from `/proc/PID/stat`,
/// assuming the usual 100 clock ticks a second).
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The user tests run the daemon as when root's power to read anything would hide what is
/// being tested (permissions).
pub const NOBODY: u32 = 65534;

/// Gives the test's folders to `uid` (so a daemon running as that user can use them) and
/// lets everyone through the test's root folder.
#[track_caller]
pub fn hand_folders_to(ex: &Exchange, uid: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&ex.root, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", ex.root.display()));
    for dir in [&ex.outbox, &ex.inbox, &ex.sent, &ex.state, &ex.log] {
        chown_tree(dir, uid);
    }
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        for entry in fs::read_dir(path).unwrap_or_else(|e| panic!("ls {}: {e}", path.display())) {
            chown_tree(&entry.expect("dir entry").path(), uid);
        }
    }
}

/// `s3-exchange run` started some other way than [`Daemon`]: as another user, or in a user
/// namespace with a small inotify budget. stderr is captured like [`Daemon`]'s; killed on
/// drop if still running.
pub struct DaemonAs {
    child: Mutex<Child>,
    exited: Mutex<Option<ExitStatus>>,
    stderr_path: PathBuf,
}

impl DaemonAs {
    /// The daemon of `ex`'s config as user `uid` (gid `uid`, no supplementary groups).
    pub fn user(ex: &Exchange, uid: u32) -> Self {
        let mut cmd = super::daemon::command(&ex.root, &ex.config_path, "run");
        cmd.uid(uid).gid(uid);
        Self::spawn(ex, cmd, &format!("uid-{uid}"))
    }

    /// The daemon of `ex`'s config in a new user namespace (`unshare -U -r`, still root
    /// inside) whose inotify budget is `watches` watches
    /// (`/proc/sys/user/max_inotify_watches` of that namespace): running out of watches
    /// without touching the machine's own limit, which other processes share.
    pub fn with_inotify_watches(ex: &Exchange, watches: u32) -> Self {
        Self::in_namespaces(
            ex,
            &["-U", "-r"],
            &format!("echo {watches} > /proc/sys/user/max_inotify_watches"),
            &format!("watches-{watches}"),
        )
    }

    /// The daemon of `ex`'s config in new user and mount namespaces where the sent folder
    /// is a tmpfs of `kib` KiB: a full sent folder (on another file system, as it often
    /// is), seen by the daemon only. [`DaemonAs::seen_by_daemon`] reads it.
    pub fn with_small_sent_folder(ex: &Exchange, kib: u32) -> Self {
        Self::in_namespaces(
            ex,
            &["-U", "-r", "-m"],
            &format!(
                "mount -t tmpfs -o size={kib}k tmpfs '{}'",
                ex.sent.display()
            ),
            &format!("sent-{kib}k"),
        )
    }

    /// `unshare <flags> sh -c '<setup> && exec <the daemon>'`, with the environment the
    /// fixture gives the daemon.
    fn in_namespaces(ex: &Exchange, flags: &[&str], setup: &str, tag: &str) -> Self {
        let inner = super::daemon::command(&ex.root, &ex.config_path, "run");
        let mut cmd = Command::new("unshare");
        cmd.args(flags)
            .args(["sh", "-c"])
            .arg(format!("{setup} && exec \"$0\" \"$@\""))
            .arg(inner.get_program())
            .args(inner.get_args());
        for (name, value) in inner.get_envs() {
            match value {
                Some(value) => cmd.env(name, value),
                None => cmd.env_remove(name),
            };
        }
        if let Some(dir) = inner.get_current_dir() {
            cmd.current_dir(dir);
        }
        Self::spawn(ex, cmd, tag)
    }

    /// `path` as the daemon sees it (through its mount namespace).
    pub fn seen_by_daemon(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }

    fn spawn(ex: &Exchange, mut cmd: Command, tag: &str) -> Self {
        let stderr_path = ex.root.join(format!("run-{tag}.stderr"));
        let stderr = fs::File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the daemon ({tag}): {e}"));
        Self {
            child: Mutex::new(child),
            exited: Mutex::new(None),
            stderr_path,
        }
    }

    /// SIGTERM, then waits for the exit.
    #[track_caller]
    pub fn stop(&self) -> ExitStatus {
        assert!(self.try_exit().is_none(), "the daemon already exited");
        let status = Command::new("kill")
            .args(["-s", "TERM", &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill -s TERM: {e}"));
        assert!(status.success(), "kill -s TERM {} failed", self.pid());
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop\n{}",
                self.diagnostics()
            );
            thread::sleep(POLL);
        }
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// The exit status if the daemon has exited, without waiting.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        let mut exited = self
            .exited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if exited.is_none() {
            *exited = self.child().try_wait().expect("wait for the daemon");
        }
        *exited
    }

    pub fn stderr(&self) -> String {
        fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The stderr lines that contain every one of `needles`.
    pub fn stderr_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.stderr()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- stderr of s3-exchange ({}) ---\n{}\n--- end of stderr ---",
            self.stderr_path.display(),
            tail(&self.stderr(), 60)
        )
    }

    /// Like [`Exchange::wait_for`], for this daemon.
    #[track_caller]
    pub fn wait_for(&self, what: &str, cond: impl FnMut() -> bool) {
        super::daemon::wait_while_running(
            || self.try_exit(),
            what,
            (TIMEOUT, POLL),
            cond,
            || self.diagnostics(),
        );
    }

    /// The daemon's count of outbox walks, from its `status.json`.
    pub fn rescans(&self, ex: &Exchange) -> u64 {
        status_of_pid(ex, self.pid())
            .and_then(|s| s.get("rescans")?.as_u64())
            .unwrap_or(0)
    }

    /// Waits for `more` walks of the outbox beyond `since`.
    #[track_caller]
    pub fn wait_for_rescans(&self, ex: &Exchange, since: u64, more: u64) {
        self.wait_for(&format!("{more} more walks of the outbox"), || {
            self.rescans(ex) >= since + more
        });
    }
}

impl Drop for DaemonAs {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let mut child = self.child();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
