//! The real `s3-exchange` binary as a child process, with a hermetic environment and its
//! stderr captured to a file (so a failing wait can show what the daemon said).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::server::{ACCESS_KEY, SECRET_KEY};
use super::{POLL, tail};

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_s3-exchange");

/// How many stderr lines failure messages quote.
const TAIL_LINES: usize = 60;

/// `s3-exchange --config <config> <subcommand>` with an environment that cannot leak the
/// developer's own AWS setup into the test: static test credentials, no instance metadata,
/// `HOME` inside the test's folder (so no `~/.aws` profile files), no `RUST_LOG`, no
/// inherited `AWS_*`.
pub fn command(home: &Path, config: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .arg(subcommand)
        .current_dir(home);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("HOME", home)
        .stdin(Stdio::null());
    cmd
}

/// A running (or exited, not yet dropped) daemon. Killed with SIGKILL on drop if still alive.
pub struct Daemon {
    /// Behind a mutex so that status checks work through `&self` (waits borrow the fixture
    /// immutably while polling).
    child: Mutex<Child>,
    /// Set once the child has been reaped; after that its pid may be reused, so it must never
    /// be signalled again.
    exited: Mutex<Option<ExitStatus>>,
    stderr_path: PathBuf,
}

/// Polls `cond` every `every` until it holds, for up to `timeout`, while the daemon runs
/// (`exited` says when it stopped): the one wait every fixture builds on. Fails at once if
/// the daemon exits meanwhile (after one
/// last look: it may have finished the work and then exited); failures name `what` and show
/// `diagnostics()`.
#[track_caller]
pub fn wait_while_running(
    exited: impl Fn() -> Option<ExitStatus>,
    what: &str,
    (timeout, every): (Duration, Duration),
    mut cond: impl FnMut() -> bool,
    diagnostics: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if let Some(status) = exited() {
            if cond() {
                return;
            }
            panic!(
                "the daemon exited ({status}) while waiting for {what}\n{}",
                diagnostics()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            diagnostics()
        );
        thread::sleep(every);
    }
}

impl Daemon {
    /// Spawns `s3-exchange --config <config> <subcommand>`; stderr goes to `stderr_path`,
    /// stdout beside it with the extension `.stdout`.
    pub fn spawn(home: &Path, config: &Path, subcommand: &str, stderr_path: PathBuf) -> Self {
        Self::spawn_command(command(home, config, subcommand), stderr_path)
    }

    /// Spawns `cmd` (made by [`command`], then adjusted) like [`Daemon::spawn`].
    pub fn spawn_command(mut cmd: Command, stderr_path: PathBuf) -> Self {
        let stderr = File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let stdout_path = stderr_path.with_extension("stdout");
        let stdout = File::create(&stdout_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", stdout_path.display()));
        let child = cmd
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        Self {
            child: Mutex::new(child),
            exited: Mutex::new(None),
            stderr_path,
        }
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn exited_slot(&self) -> MutexGuard<'_, Option<ExitStatus>> {
        self.exited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// The exit status if the daemon has exited, without waiting.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        let mut exited = self.exited_slot();
        if exited.is_none() {
            let status = self
                .child()
                .try_wait()
                .unwrap_or_else(|e| panic!("wait for daemon: {e}"));
            *exited = status;
        }
        *exited
    }

    /// Sends SIGTERM (what systemd sends on stop).
    #[track_caller]
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Sends SIGINT (Ctrl-C).
    #[track_caller]
    pub fn signal_int(&self) {
        self.signal("INT");
    }

    /// Signals through `kill(1)` to stay free of libc. Refuses once the child is reaped.
    #[track_caller]
    fn signal(&self, name: &str) {
        assert!(
            self.try_exit().is_none(),
            "cannot send SIG{name}: the daemon already exited ({:?})\n{}",
            self.try_exit(),
            self.stderr_tail()
        );
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill -s {name}: {e}"));
        assert!(
            status.success(),
            "kill -s {name} {} failed: {status}",
            self.pid()
        );
    }

    /// Waits for the daemon to exit; panics with its stderr if it is still running after
    /// `timeout`.
    #[track_caller]
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon still running {timeout:?} after being asked to stop\n{}",
                self.stderr_tail()
            );
            thread::sleep(POLL);
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The end of stderr, labelled, for failure messages.
    pub fn stderr_tail(&self) -> String {
        stderr_tail(&self.stderr_path)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let mut child = self.child();
            // Best effort: a failing test must not leave a daemon behind, and a second panic
            // in drop would abort the whole test binary.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The contents of a captured stderr file (or why it cannot be read).
fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// The end of a captured stderr file, labelled, for failure messages.
pub fn stderr_tail(path: &Path) -> String {
    format!(
        "--- stderr of s3-exchange ({}), last {TAIL_LINES} lines ---\n{}\n--- end of stderr ---",
        path.display(),
        tail(&read_lossy(path), TAIL_LINES)
    )
}

/// The outcome of a command run to completion.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stderr: String,
}

/// Runs `s3-exchange --config <config> <subcommand>` to completion (killing it and panicking
/// after `timeout`), with stderr captured to `stderr_path`.
pub fn run_to_completion(
    home: &Path,
    config: &Path,
    subcommand: &str,
    stderr_path: PathBuf,
    timeout: Duration,
) -> Finished {
    let daemon = Daemon::spawn(home, config, subcommand, stderr_path);
    let status = daemon.wait_exit(timeout);
    Finished {
        status,
        stderr: daemon.stderr(),
    }
}
