//! One exchange between two parties per test: a server, a fresh bucket the owner created (with
//! the owner's bucket policy where the server has distinct users), the owner's clients, a
//! recording proxy, folders, a config file, and the real daemon running as the peer.

use std::fs;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::clients::{AwsCli, S3Client};
use crate::common::{Daemon, Finished, POLL, Proxy, Recorded, TIMEOUT, tail, wait_while_running};
use crate::servers::{Env, Server};

/// Where the daemon uploads, and where the owner delivers.
pub const SUBMISSIONS: &str = "Submissions/";
pub const DELIVERY: &str = "Delivery/";

/// The canned ACL the owner requires.
pub const OWNER_FULL_CONTROL: &str = "bucket-owner-full-control";

/// The daemon settings interop tests vary; everything else is fixed by [`Trade::config_text`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// `s3.acl`.
    pub acl: &'static str,
    /// `s3.checksums`.
    pub checksums: &'static str,
    /// `s3.expected_bucket_owner`, absent when `None`.
    pub expected_bucket_owner: Option<String>,
    /// `outbox.prefix`: [`SUBMISSIONS`], the prefix the owner's policy grants.
    pub submissions: &'static str,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            acl: OWNER_FULL_CONTROL,
            checksums: "when_required",
            expected_bucket_owner: None,
            submissions: SUBMISSIONS,
        }
    }
}

/// The bucket policy the owner sets (only on servers with distinct users).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Exactly the peer's three rights: ListBucket on the bucket, GetObject on `Delivery/*`,
    /// PutObject on `Submissions/*`. Nothing else (no AbortMultipartUpload, no HeadObject
    /// beyond what GetObject implies, no bucket-level reads).
    ThreeRights,
    /// The same, plus the common guard: deny PutObject on `Submissions/*` unless the request
    /// carries `x-amz-acl: bucket-owner-full-control`.
    RequireOwnerFullControl,
}

/// Makes bucket names unique across tests, runs and leftovers of earlier runs on a reused
/// server.
static BUCKETS: AtomicU32 = AtomicU32::new(0);

/// A test's whole world. Fields drop in declaration order: the daemon dies first, then the
/// clients, the proxy and the server; the folder goes last.
pub struct Trade {
    daemon: Option<Daemon>,
    runs: u32,
    last_stderr: Option<PathBuf>,
    /// boto3 as the owner.
    pub owner: S3Client,
    /// The AWS CLI as the owner: puts the deliveries.
    pub owner_cli: AwsCli,
    pub proxy: Proxy,
    pub server: Server,
    pub bucket: String,
    pub settings: Settings,
    env: Env,
    pub root: PathBuf,
    pub outbox: PathBuf,
    pub inbox: PathBuf,
    pub sent: PathBuf,
    pub scratch: PathBuf,
    config_path: PathBuf,
    /// Deleted on drop, unless the test failed: then kept for the post-mortem.
    dir: Option<TempDir>,
}

impl Trade {
    /// Folders, clients, a proxy in front of `server`, the bucket `s3x-<tag>-...` and (where
    /// the server has distinct users) `policy`, and the config file. The daemon is not
    /// started.
    pub fn new(env: &Env, server: Server, tag: &str, settings: Settings, policy: Policy) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("s3x-interop-{tag}-"))
            .tempdir()
            .expect("create the test's temporary folder");
        let root = dir.path().to_path_buf();
        let folder = |name: &str| {
            let path = root.join(name);
            fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            path
        };
        let (outbox, inbox, sent, scratch) = (
            folder("outbox"),
            folder("inbox"),
            folder("sent"),
            folder("scratch"),
        );
        let owner = S3Client::start(
            &env.python,
            &server.endpoint,
            &server.owner,
            "owner",
            &scratch,
        );
        let owner_cli = AwsCli::new(&env.aws_cli, &server.endpoint, &server.owner, &scratch);
        let proxy = Proxy::start(&server.endpoint);
        let bucket = unique_bucket(tag);
        owner.create_bucket(&bucket);
        if let Some(principal) = &server.peer_principal {
            owner.put_bucket_policy(&bucket, &bucket_policy(&bucket, principal, policy));
        }
        let trade = Self {
            daemon: None,
            runs: 0,
            last_stderr: None,
            owner,
            owner_cli,
            proxy,
            server,
            bucket,
            settings,
            env: env.clone(),
            config_path: root.join("s3-exchange.toml"),
            root,
            outbox,
            inbox,
            sent,
            scratch,
            dir: Some(dir),
        };
        trade.write_config();
        trade
    }

    /// (Re)writes the config file from the current settings; the daemon talks to the proxy.
    pub fn write_config(&self) {
        let s = &self.settings;
        let path = |name: &str| self.root.join(name).display().to_string();
        let expected_owner = s
            .expected_bucket_owner
            .as_ref()
            .map(|owner| format!("expected_bucket_owner = \"{owner}\"\n"))
            .unwrap_or_default();
        let text = format!(
            r#"[s3]
bucket = "{bucket}"
region = "us-east-1"
endpoint_url = "{endpoint}"
force_path_style = true
acl = "{acl}"
checksums = "{checksums}"
{expected_owner}
[outbox]
dir = "{outbox}"
prefix = "{submissions}"
settle = "300ms"
rescan_interval = "5s"
after_upload = "move"
sent_dir = "{sent}"

[inbox]
dir = "{inbox}"
prefix = "{DELIVERY}"
poll_interval = "500ms"

[state]
dir = "{state}"

[transfer]
concurrency = 4
multipart_threshold = "5MiB"
part_size = "5MiB"

[log]
level = "debug"
format = "text"
dir = "{log}"
"#,
            bucket = self.bucket,
            endpoint = self.proxy.endpoint(),
            acl = s.acl,
            checksums = s.checksums,
            submissions = s.submissions,
            outbox = self.outbox.display(),
            sent = self.sent.display(),
            inbox = self.inbox.display(),
            state = path("state"),
            log = path("log"),
        );
        fs::write(&self.config_path, text)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.config_path.display()));
    }

    /// A boto3 client acting as the peer (for control uploads beside the daemon's).
    pub fn peer_client(&self) -> S3Client {
        S3Client::start(
            &self.env.python,
            &self.server.endpoint,
            &self.server.peer,
            "peer",
            &self.scratch,
        )
    }

    /// The AWS CLI acting as the peer.
    pub fn peer_cli(&self) -> AwsCli {
        AwsCli::new(
            &self.env.aws_cli,
            &self.server.endpoint,
            &self.server.peer,
            &self.scratch,
        )
    }

    fn next_stderr_path(&mut self, what: &str) -> PathBuf {
        self.runs += 1;
        let path = self.root.join(format!("{what}-{}.stderr", self.runs));
        self.last_stderr = Some(path.clone());
        path
    }

    /// Starts `s3-exchange run` (as the peer: the harness gives it the daemon credentials).
    #[track_caller]
    pub fn start(&mut self) {
        if let Some(old) = &self.daemon {
            assert!(
                old.try_exit().is_some(),
                "start: a daemon is still running\n{}",
                old.stderr_tail()
            );
        }
        let stderr = self.next_stderr_path("run");
        self.daemon = Some(Daemon::spawn(&self.root, &self.config_path, "run", stderr));
    }

    /// SIGTERM, then the exit status.
    #[track_caller]
    pub fn stop(&self) -> ExitStatus {
        let daemon = self.daemon.as_ref().expect("no daemon was started");
        daemon.signal_term();
        daemon.wait_exit(TIMEOUT)
    }

    /// Runs `s3-exchange sync` to completion.
    #[track_caller]
    pub fn sync(&mut self) -> Finished {
        let stderr = self.next_stderr_path("sync");
        let daemon = Daemon::spawn(&self.root, &self.config_path, "sync", stderr);
        let status = daemon.wait_exit(TIMEOUT);
        Finished {
            status,
            stderr: daemon.stderr(),
        }
    }

    /// Everything the latest daemon or `sync` wrote to stderr.
    pub fn stderr(&self) -> String {
        self.last_stderr
            .as_ref()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The end of the latest stderr, labelled, plus the proxy's recording: what a failure
    /// message should show.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- {} server, bucket {}; stderr of the latest s3-exchange run ---\n{}\n\
             --- requests the daemon made ---\n{}\n--- end ---",
            self.server.name(),
            self.bucket,
            tail(&self.stderr(), 60),
            tail(&self.proxy.summary(), 60)
        )
    }

    /// Polls `cond` until it holds, for up to [`TIMEOUT`]. Fails at once if the daemon exits
    /// meanwhile; on timeout names `what` and shows [`Trade::diagnostics`].
    #[track_caller]
    pub fn wait_for(&self, what: &str, cond: impl FnMut() -> bool) {
        wait_while_running(
            || self.daemon.as_ref().and_then(Daemon::try_exit),
            what,
            (TIMEOUT, POLL),
            cond,
            || self.diagnostics(),
        );
    }

    /// The owner delivers `bytes` at `Delivery/<rel>` with the AWS CLI.
    pub fn deliver(&self, rel: &str, bytes: &[u8]) -> String {
        let body = self
            .scratch
            .join(format!("delivery-{}", rel.replace('/', "_")));
        fs::write(&body, bytes).unwrap_or_else(|e| panic!("write {}: {e}", body.display()));
        self.owner_cli
            .put_object(&self.bucket, &format!("{DELIVERY}{rel}"), &body, None)
    }

    /// Writes `bytes` at `rel` in the outbox (parents created).
    pub fn drop_in_outbox(&self, rel: &str, bytes: &[u8]) {
        crate::common::write_file(&self.outbox.join(rel), bytes);
    }

    /// The object key of the outbox file `rel`.
    pub fn submission_key(rel: &str) -> String {
        format!("{SUBMISSIONS}{rel}")
    }

    /// Whether `r` creates an object: a PutObject or a CreateMultipartUpload (not a part).
    pub fn creates_object(&self, r: &Recorded) -> bool {
        r.key_in(&self.bucket).is_some()
            && ((r.method == "PUT" && !r.has_query_param("partNumber"))
                || (r.method == "POST" && r.has_query_param("uploads")))
    }

    /// Whether `r` sends object data: a PutObject or an UploadPart.
    pub fn sends_data(&self, r: &Recorded) -> bool {
        r.method == "PUT" && r.key_in(&self.bucket).is_some()
    }

    /// The recorded requests for key `key` satisfying `pred`.
    pub fn requests_for(&self, key: &str, pred: impl Fn(&Recorded) -> bool) -> Vec<Recorded> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.key_in(&self.bucket).as_deref() == Some(key) && pred(r))
            .collect()
    }

    /// Whether `r` is a ListObjectsV2 of `Delivery/`: one inbox poll (page).
    fn is_delivery_list(&self, r: &Recorded) -> bool {
        r.method == "GET"
            && r.is_bucket_level(&self.bucket)
            && r.query_param("list-type").as_deref() == Some("2")
            && r.query_param("prefix").as_deref() == Some(DELIVERY)
    }

    /// How many inbox polls the proxy has seen.
    pub fn delivery_lists(&self) -> usize {
        self.proxy.count(|r| self.is_delivery_list(r))
    }

    /// How many GETs of delivery keys the proxy has seen.
    pub fn delivery_gets(&self) -> usize {
        self.proxy.count(|r| {
            r.method == "GET"
                && r.key_in(&self.bucket)
                    .is_some_and(|k| k.starts_with(DELIVERY))
        })
    }

    /// Waits until the daemon has started `polls` more inbox polls than `since`. With
    /// `polls >= 2` the first of them, and the downloads it started, have finished.
    #[track_caller]
    pub fn wait_for_polls(&self, since: usize, polls: usize) {
        self.wait_for(
            &format!("{polls} more ListObjectsV2 polls of {DELIVERY}"),
            || self.delivery_lists() >= since + polls,
        );
    }

    /// Requests the peer has no right to make: bucket-level calls other than ListObjectsV2
    /// (CreateBucket, HeadBucket, GetBucketLocation, ...), service-level calls, and HEAD/GET
    /// of its own submissions (once the owner owns them, it may not read them).
    #[track_caller]
    pub fn assert_no_forbidden_calls(&self) {
        let found: Vec<String> = self
            .proxy
            .requests()
            .iter()
            .filter_map(|r| {
                let reason = if r.path.is_empty() || r.path == "/" {
                    "service-level call"
                } else if r.is_bucket_level(&self.bucket) {
                    if r.method == "GET" && r.query_param("list-type").as_deref() == Some("2") {
                        return None;
                    }
                    "bucket-level call"
                } else if matches!(r.method.as_str(), "GET" | "HEAD")
                    && r.key_in(&self.bucket)
                        .is_some_and(|k| k.starts_with(SUBMISSIONS))
                {
                    "read back its own upload"
                } else {
                    return None;
                };
                Some(format!("{reason}: {}", r.summary()))
            })
            .collect();
        assert!(
            found.is_empty(),
            "the daemon made calls it has no right to:\n{}\n{}",
            found.join("\n"),
            self.diagnostics()
        );
    }

    /// The owner reads `Submissions/<rel>` and gets exactly `bytes`; where the server enforces
    /// ownership, the object belongs to the peer and its ACL grants the owner FULL_CONTROL.
    #[track_caller]
    pub fn assert_owner_reads(&self, rel: &str, bytes: &[u8]) {
        let key = Self::submission_key(rel);
        let got = self
            .owner
            .get_object(&self.bucket, &key)
            .unwrap_or_else(|e| {
                panic!("the owner cannot read {key}: {e:?}\n{}", self.diagnostics())
            });
        crate::common::assert_same_bytes(
            &format!("{key} as the owner reads it"),
            Some(&got),
            bytes,
            &self.diagnostics(),
        );
        if !self.server.enforces_ownership() {
            return;
        }
        let owner_id = self.owner.bucket_owner_id(&self.bucket);
        let acl = self
            .owner
            .get_object_acl(&self.bucket, &key)
            .unwrap_or_else(|e| panic!("the owner cannot read the ACL of {key}: {e:?}"));
        assert_eq!(
            Some(&acl.owner),
            self.server.peer_id.as_ref(),
            "{key} should belong to its uploader, the peer (else this proves nothing about \
             ownership): {acl:?}"
        );
        assert!(
            acl.grants_full_control_to(&owner_id),
            "{key}: the ACL does not grant the bucket owner {owner_id} FULL_CONTROL: {acl:?}\n{}",
            self.diagnostics()
        );
    }

    /// The keys under `Submissions/`, as the owner lists them.
    pub fn submitted_keys(&self) -> Vec<String> {
        self.owner
            .list_keys(&self.bucket, SUBMISSIONS, None)
            .unwrap_or_else(|e| panic!("owner: list {SUBMISSIONS}: {e:?}"))
    }
}

impl Drop for Trade {
    fn drop(&mut self) {
        if thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("test failed: keeping {}", dir.keep().display());
        }
    }
}

/// `s3x-<tag>-<pid>-<n>-<time>`: valid (lower-case, <= 63 characters) and never reused, even
/// on a server kept running across test runs.
fn unique_bucket(tag: &str) -> String {
    let n = BUCKETS.fetch_add(1, Ordering::Relaxed);
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() % 1_000_000_000);
    let mut name = format!("s3x-{tag}-{}-{n}-{time}", std::process::id());
    name.truncate(63);
    name.to_ascii_lowercase()
}

/// The owner's bucket policy for the peer (`principal`, e.g. `arn:aws:iam:::user/peer`).
fn bucket_policy(bucket: &str, principal: &str, policy: Policy) -> Value {
    let allow = |action: &str, resource: String| {
        json!({
            "Effect": "Allow",
            "Principal": { "AWS": [principal] },
            "Action": [action],
            "Resource": [resource],
        })
    };
    let mut statements = vec![
        allow("s3:ListBucket", format!("arn:aws:s3:::{bucket}")),
        allow("s3:GetObject", format!("arn:aws:s3:::{bucket}/{DELIVERY}*")),
        allow(
            "s3:PutObject",
            format!("arn:aws:s3:::{bucket}/{SUBMISSIONS}*"),
        ),
    ];
    if policy == Policy::RequireOwnerFullControl {
        statements.push(json!({
            "Effect": "Deny",
            "Principal": { "AWS": [principal] },
            "Action": ["s3:PutObject"],
            "Resource": [format!("arn:aws:s3:::{bucket}/{SUBMISSIONS}*")],
            "Condition": { "StringNotEquals": { "s3:x-amz-acl": OWNER_FULL_CONTROL } },
        }));
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
}
