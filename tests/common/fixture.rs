//! One complete exchange per test: its own folders, server, proxy, bucket, config and daemon.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::thread;
use std::time::Instant;

use tempfile::TempDir;

use super::daemon::{self, Daemon, Finished};
use super::owner::Owner;
use super::proxy::{Proxy, Recorded};
use super::server::S3Server;
use super::{POLL, TIMEOUT, files_under};

/// The owner's bucket.
pub const BUCKET: &str = "exchange";

/// The daemon's own hidden folder for downloads in progress, inside the inbox (so that the
/// final rename never crosses file systems).
pub const INBOX_TEMP_DIR: &str = ".s3-exchange.tmp";

/// The config values tests vary; everything else (folders, endpoint, bucket) comes from the
/// fixture. Strings are written into the TOML verbatim between quotes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub acl: String,
    pub checksums: String,
    pub submissions_prefix: String,
    pub settle: String,
    pub rescan_interval: String,
    pub after_upload: String,
    pub delivery_prefix: String,
    pub poll_interval: String,
    pub concurrency: u32,
    pub multipart_threshold: String,
    pub part_size: String,
    pub log_level: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            acl: "bucket-owner-full-control".into(),
            checksums: "when_required".into(),
            submissions_prefix: "Submissions/".into(),
            settle: "300ms".into(),
            rescan_interval: "5s".into(),
            after_upload: "move".into(),
            delivery_prefix: "Delivery/".into(),
            poll_interval: "500ms".into(),
            concurrency: 4,
            multipart_threshold: "5MiB".into(),
            part_size: "5MiB".into(),
            log_level: "debug".into(),
        }
    }
}

/// A test's whole world. Fields drop in declaration order: the daemon dies first, then the
/// proxy and server stop, and the folder goes last.
pub struct Exchange {
    daemon: Option<Daemon>,
    /// Counts daemon/sync runs so each gets its own stderr file.
    runs: u32,
    /// The stderr file of the latest run (daemon or command), quoted by failure messages.
    last_stderr: Option<PathBuf>,
    pub owner: Owner,
    pub proxy: Proxy,
    pub server: S3Server,
    pub settings: Settings,
    pub root: PathBuf,
    pub outbox: PathBuf,
    pub inbox: PathBuf,
    pub sent: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub config_path: PathBuf,
    /// Deleted on drop, unless the test failed: then it is kept for the post-mortem.
    dir: Option<TempDir>,
}

/// The daemon's folders in a test's world.
pub struct DaemonFolders<'a> {
    pub outbox: &'a Path,
    pub sent: &'a Path,
    pub inbox: &'a Path,
    pub state: &'a Path,
    pub log: &'a Path,
}

/// The config file every test fixture writes: `settings` over a bucket reached through
/// `endpoint` (path-style, the test's proxy), with the daemon's folders in `folders`.
pub fn config_toml(bucket: &str, endpoint: &str, folders: &DaemonFolders, s: &Settings) -> String {
    let path = |p: &Path| p.display().to_string();
    format!(
        r#"[s3]
bucket = "{bucket}"
region = "us-east-1"
endpoint_url = "{endpoint}"
force_path_style = true
acl = "{acl}"
checksums = "{checksums}"

[outbox]
dir = "{outbox}"
prefix = "{submissions_prefix}"
settle = "{settle}"
rescan_interval = "{rescan_interval}"
after_upload = "{after_upload}"
sent_dir = "{sent}"

[inbox]
dir = "{inbox}"
prefix = "{delivery_prefix}"
poll_interval = "{poll_interval}"

[state]
dir = "{state}"

[transfer]
concurrency = {concurrency}
multipart_threshold = "{multipart_threshold}"
part_size = "{part_size}"

[log]
level = "{log_level}"
format = "text"
dir = "{log}"
"#,
        acl = s.acl,
        checksums = s.checksums,
        outbox = path(folders.outbox),
        submissions_prefix = s.submissions_prefix,
        settle = s.settle,
        rescan_interval = s.rescan_interval,
        after_upload = s.after_upload,
        sent = path(folders.sent),
        inbox = path(folders.inbox),
        delivery_prefix = s.delivery_prefix,
        poll_interval = s.poll_interval,
        state = path(folders.state),
        concurrency = s.concurrency,
        multipart_threshold = s.multipart_threshold,
        part_size = s.part_size,
        log_level = s.log_level,
        log = path(folders.log),
    )
}

/// Asserts `inbox` holds exactly the files `expected` (relative, `/`-separated, any order;
/// symlinks count as entries): no temporary or hidden file anywhere, and the daemon's own
/// temp folder, if it exists, is empty.
#[track_caller]
pub fn assert_inbox_holds(inbox: &Path, expected: &[&str], diagnostics: &str) {
    let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        files_under(inbox),
        expected,
        "inbox contents\n{}",
        diagnostics
    );
    let temp = inbox.join(INBOX_TEMP_DIR);
    if let Ok(entries) = fs::read_dir(&temp) {
        let left: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.is_empty(),
            "{} is not empty: {left:?}\n{}",
            temp.display(),
            diagnostics
        );
    }
}

impl Exchange {
    /// The default settings (ACL on, settle 300 ms, poll 500 ms, 5 MiB parts).
    pub fn new() -> Self {
        Self::with(Settings::default())
    }

    /// Folders, server, proxy, bucket and config file; the daemon is not started.
    pub fn with(settings: Settings) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3-exchange-test-")
            .tempdir()
            .expect("create the test's temporary folder");
        let root = dir.path().to_path_buf();
        let folder = |name: &str| {
            let path = root.join(name);
            fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            path
        };
        let (outbox, inbox, sent, state, log) = (
            folder("outbox"),
            folder("inbox"),
            folder("sent"),
            folder("state"),
            folder("log"),
        );
        let server = S3Server::start(&folder("s3"));
        let proxy = Proxy::start(&server.endpoint());
        let owner = Owner::new(&server.endpoint(), BUCKET);
        owner.create_bucket(BUCKET);
        let exchange = Self {
            daemon: None,
            runs: 0,
            last_stderr: None,
            owner,
            proxy,
            server,
            settings,
            config_path: root.join("s3-exchange.toml"),
            root,
            outbox,
            inbox,
            sent,
            state,
            log,
            dir: Some(dir),
        };
        exchange.write_config(&exchange.config_text());
        exchange
    }

    /// The config file for the current settings; the daemon talks to the proxy.
    pub fn config_text(&self) -> String {
        config_toml(
            BUCKET,
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

    /// Replaces the config file (for tests of invalid configs).
    pub fn write_config(&self, text: &str) {
        fs::write(&self.config_path, text)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.config_path.display()));
    }

    fn next_stderr_path(&mut self, what: &str) -> PathBuf {
        self.runs += 1;
        let path = self.root.join(format!("{what}-{}.stderr", self.runs));
        self.last_stderr = Some(path.clone());
        path
    }

    /// Starts `s3-exchange run`. Panics if a daemon is still running.
    pub fn start(&mut self) -> &Daemon {
        self.start_with(|_| {})
    }

    /// Starts `s3-exchange run` with the environment changed by `adjust` (for example
    /// other credentials). Panics if a daemon is still running.
    pub fn start_with(&mut self, adjust: impl FnOnce(&mut std::process::Command)) -> &Daemon {
        if let Some(old) = &self.daemon {
            assert!(
                old.try_exit().is_some(),
                "start: a daemon is still running\n{}",
                old.stderr_tail()
            );
        }
        let stderr = self.next_stderr_path("run");
        let mut cmd = daemon::command(&self.root, &self.config_path, "run");
        adjust(&mut cmd);
        self.daemon = Some(Daemon::spawn_command(cmd, stderr));
        self.daemon()
    }

    /// The current (or last) daemon.
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("no daemon was started")
    }

    /// SIGTERM and wait for the exit.
    #[track_caller]
    pub fn stop(&self) -> ExitStatus {
        let daemon = self.daemon();
        daemon.signal_term();
        daemon.wait_exit(TIMEOUT)
    }

    /// SIGTERM, and asserts the daemon exits 0 (transfers finished, ledger flushed).
    #[track_caller]
    pub fn stop_cleanly(&self) {
        let status = self.stop();
        assert_eq!(
            status.code(),
            Some(0),
            "exit status on SIGTERM\n{}",
            self.diagnostics()
        );
    }

    /// Runs `s3-exchange <subcommand>` (e.g. `sync`) to completion.
    pub fn run_command(&mut self, subcommand: &str) -> Finished {
        let stderr = self.next_stderr_path(subcommand);
        daemon::run_to_completion(&self.root, &self.config_path, subcommand, stderr, TIMEOUT)
    }

    /// What a failure message should show: the stderr tail of the latest daemon or command.
    pub fn diagnostics(&self) -> String {
        match &self.last_stderr {
            Some(path) => daemon::stderr_tail(path),
            None => "(the binary was not run)".into(),
        }
    }

    /// Polls `cond` every 20 ms for up to [`TIMEOUT`]. Fails at once if the daemon exits
    /// meanwhile, and on timeout names `what` and shows the daemon's stderr.
    #[track_caller]
    pub fn wait_for(&self, what: &str, cond: impl FnMut() -> bool) {
        daemon::wait_while_running(
            || self.daemon.as_ref().and_then(Daemon::try_exit),
            what,
            (TIMEOUT, POLL),
            cond,
            || self.diagnostics(),
        );
    }

    /// Object key for a file at `rel` in the outbox.
    pub fn submission_key(&self, rel: &str) -> String {
        format!("{}{rel}", self.settings.submissions_prefix)
    }

    /// Object key that lands at `rel` in the inbox.
    pub fn delivery_key(&self, rel: &str) -> String {
        format!("{}{rel}", self.settings.delivery_prefix)
    }

    /// Whether `r` is a ListObjectsV2 of the delivery prefix, i.e. one inbox poll (page).
    pub fn is_delivery_list(&self, r: &Recorded) -> bool {
        r.method == "GET"
            && r.is_bucket_level(BUCKET)
            && r.query_param("list-type").as_deref() == Some("2")
            && r.query_param("prefix").as_deref() == Some(self.settings.delivery_prefix.as_str())
    }

    /// Whether `r` is a GetObject of a delivery key.
    pub fn is_delivery_get(&self, r: &Recorded) -> bool {
        r.method == "GET"
            && r.key_in(BUCKET)
                .is_some_and(|k| k.starts_with(&self.settings.delivery_prefix))
    }

    /// How many inbox polls the proxy has seen.
    pub fn delivery_lists(&self) -> usize {
        self.proxy.count(|r| self.is_delivery_list(r))
    }

    /// How many delivery GETs the proxy has seen.
    pub fn delivery_gets(&self) -> usize {
        self.proxy.count(|r| self.is_delivery_get(r))
    }

    /// Waits until the daemon has started `polls` more inbox listings than `since`. With
    /// `polls >= 2`, the first of them has completed, and so has whatever it triggered that
    /// the daemon finishes before its next poll.
    #[track_caller]
    pub fn wait_for_polls(&self, since: usize, polls: usize) {
        self.wait_for(
            &format!("{polls} more ListObjectsV2 polls of the delivery prefix"),
            || self.delivery_lists() >= since + polls,
        );
    }

    /// Asserts the inbox holds exactly the files `expected` (relative, `/`-separated, any
    /// order): no temporary or hidden file anywhere, and the daemon's own temp folder, if it
    /// exists, is empty.
    #[track_caller]
    pub fn assert_inbox_holds(&self, expected: &[&str]) {
        assert_inbox_holds(&self.inbox, expected, &self.diagnostics());
    }

    /// Requests the daemon's user has no right to make in the real deployment, each with the
    /// reason: bucket-level APIs (CreateBucket, HeadBucket, GetBucketLocation, ...; only
    /// ListObjectsV2 may address the bucket itself), service-level calls (ListBuckets), and
    /// HEAD/GET of its own submissions (once the owner owns them, we may not read them).
    pub fn forbidden_calls(&self) -> Vec<String> {
        let mut found = Vec::new();
        for r in self.proxy.requests() {
            let reason = if r.path.is_empty() || r.path == "/" {
                "service-level call"
            } else if r.is_bucket_level(BUCKET) {
                let is_list_v2 =
                    r.method == "GET" && r.query_param("list-type").as_deref() == Some("2");
                if is_list_v2 {
                    continue;
                }
                "bucket-level call"
            } else if matches!(r.method.as_str(), "GET" | "HEAD")
                && r.key_in(BUCKET)
                    .is_some_and(|k| k.starts_with(&self.settings.submissions_prefix))
            {
                "read back its own upload"
            } else {
                continue;
            };
            found.push(format!("{reason}: {}", r.summary()));
        }
        found
    }

    /// Asserts the daemon made none of the [`Exchange::forbidden_calls`].
    #[track_caller]
    pub fn assert_no_forbidden_calls(&self) {
        let found = self.forbidden_calls();
        assert!(
            found.is_empty(),
            "the daemon made calls it has no right to:\n{}\n{}",
            found.join("\n"),
            self.diagnostics()
        );
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            // The daemon's stderr files, its log folder and the server's data tell the story.
            eprintln!("test failed: keeping {}", dir.keep().display());
        }
    }
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}
