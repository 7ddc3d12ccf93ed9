//! The service-facing commands and signals of the real binary, without systemd:
//! `check`, `status`, `init`, SIGHUP reload, the sd_notify protocol (against a socket
//! the test binds, as systemd would) and the Prometheus endpoint (a real HTTP GET).
//! Each test gets its own server, proxy, bucket and folders from `common::Exchange`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Exchange, TIMEOUT, wait_until, write_file};

const BIN: &str = env!("CARGO_BIN_EXE_s3-exchange");

/// `s3-exchange --config <the exchange's config> ARGS` with a hermetic environment:
/// the test server's credentials (test/test), no profile files, no instance metadata,
/// HOME in the test's folder, none of the caller's systemd or AWS variables.
fn command(x: &Exchange, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(&x.config_path)
        .args(args)
        .current_dir(&x.root);
    hermetic(&mut cmd, &x.root);
    cmd
}

fn hermetic(cmd: &mut Command, home: &Path) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("AWS_")
            || name.starts_with("XDG_")
            || [
                "RUST_LOG",
                "JOURNAL_STREAM",
                "NOTIFY_SOCKET",
                "WATCHDOG_USEC",
                "WATCHDOG_PID",
                "S3_EXCHANGE_CONFIG",
            ]
            .contains(&name.as_str())
        {
            cmd.env_remove(&name);
        }
    }
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.join("no-such-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            home.join("no-such-aws-credentials"),
        )
        .env("HOME", home)
        .stdin(Stdio::null());
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run s3-exchange")
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        common::tail(&String::from_utf8_lossy(&out.stderr), 40)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A daemon started by this file's tests (with its own environment), killed on drop.
struct Running {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Running {
    fn spawn(mut cmd: Command, stderr: std::path::PathBuf) -> Self {
        let file = std::fs::File::create(&stderr).expect("stderr file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn daemon");
        Self { child, stderr }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{name}");
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// SIGTERM, then the exit code within [`TIMEOUT`].
    fn stop(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.stop_after_term()
    }

    /// The exit code, within [`TIMEOUT`], after a SIGTERM already sent.
    fn stop_after_term(&mut self) -> Option<i32> {
        let mut code = None;
        wait_until("the daemon to exit", TIMEOUT, || {
            match self.child.try_wait().expect("try_wait") {
                Some(status) => {
                    code = status.code();
                    true
                }
                None => false,
            }
        });
        code
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn check_passes_on_a_working_bucket_and_probes_with_the_acl() {
    let x = Exchange::new();
    let out = output(&mut command(&x, &["check", "--write"]));
    let text = stdout(&out);
    assert!(out.status.success(), "{}", show(&out));
    for line in [
        "ok    config",
        "ok    credentials",
        "ok    list",
        "ok    write",
    ] {
        assert!(text.contains(line), "{line}: {}", show(&out));
    }
    // s3s-fs has no STS: not knowing who we are there is a skip, not a failure.
    assert!(text.contains("skip  identity"), "{}", show(&out));
    assert!(text.contains("all checks passed"), "{text}");
    // The probe went out as the daemon's uploads do: under the outbox prefix, with the ACL.
    let probes: Vec<_> = x
        .proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/Submissions/.s3-exchange-check-"))
        .collect();
    assert_eq!(probes.len(), 1, "{}", x.proxy.summary());
    assert_eq!(
        probes[0].header("x-amz-acl"),
        Some("bucket-owner-full-control")
    );
    assert_eq!(x.owner.list("Submissions/").len(), 1);
    // Without --write nothing is uploaded.
    let out = output(&mut command(&x, &["check"]));
    assert!(out.status.success(), "{}", show(&out));
    assert!(!stdout(&out).contains("write"), "{}", show(&out));
    assert_eq!(x.owner.list("Submissions/").len(), 1);
}

#[test]
fn check_fails_with_the_cause_and_the_fix() {
    let x = Exchange::new();
    // Credentials the server does not accept.
    let out = output(command(&x, &["check"]).env("AWS_SECRET_ACCESS_KEY", "wrong"));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(text.contains("FAIL  list"), "{}", show(&out));
    assert!(text.contains("fix:"), "{}", show(&out));
    assert!(text.contains("some checks failed"), "{text}");
    // No credentials at all: the first failing step says how to provide them.
    let out = output(
        command(&x, &["check"])
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY"),
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(text.contains("FAIL  credentials"), "{}", show(&out));
    assert!(text.contains("AWS_ACCESS_KEY_ID"), "{}", show(&out));
    // A broken configuration is exit 78, before any network call.
    x.write_config("[s3]\nbucket = \"\"\n");
    let out = output(&mut command(&x, &["check"]));
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
}

#[test]
fn status_follows_a_running_daemon_and_tells_when_it_stopped() {
    let x = Exchange::new();
    // Before any run there is nothing to read: "not running", exit 3.
    let out = output(&mut command(&x, &["status"]));
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("status.json"));

    let mut daemon = Running::spawn(command(&x, &["run"]), x.root.join("status.stderr"));
    write_file(&x.outbox.join("report.csv"), b"a,b\n1,2\n");
    x.owner.put("Delivery/answer.txt", b"42\n");
    let json = |out: &Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    wait_until(
        "status --json shows one sent and one received",
        TIMEOUT,
        || {
            let out = output(&mut command(&x, &["status", "--json"]));
            let v = json(&out);
            out.status.success()
                && v["running"] == true
                && v["status"]["sent"] == 1
                && v["status"]["received"] == 1
                && v["status"]["phase"] == "running"
        },
    );
    let out = output(&mut command(&x, &["status", "--json"]));
    let v = json(&out);
    assert!(
        v["status"]["last_successful_poll_ms"].as_i64().is_some(),
        "{v}"
    );
    assert!(v["status"]["last_rescan_ms"].as_i64().is_some(), "{v}");
    let recent = v["status"]["recent"].as_array().expect("recent transfers");
    assert!(
        recent
            .iter()
            .any(|t| t["key"] == "Submissions/report.csv" && t["direction"] == "upload"),
        "{v}"
    );
    let out = output(&mut command(&x, &["status"]));
    let text = stdout(&out);
    assert!(out.status.success(), "{}", show(&out));
    assert!(text.contains("s3-exchange is running"), "{text}");
    assert!(text.contains("Delivery/answer.txt"), "{text}");

    assert_eq!(daemon.stop(), Some(0), "{}", daemon.stderr());
    let out = output(&mut command(&x, &["status", "--json"]));
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(json(&out)["status"]["phase"], "stopped");
    assert!(stdout(&output(&mut command(&x, &["status"]))).contains("not running"));
}

#[test]
fn init_writes_a_private_starter_configuration_and_the_folders() {
    let home = tempfile::tempdir().expect("tempdir");
    let run = || {
        let mut cmd = Command::new(BIN);
        hermetic(&mut cmd, home.path());
        output(cmd.args(["init", "--bucket", "their-bucket", "--region", "eu-west-1"]))
    };
    let out = run();
    assert!(out.status.success(), "{}", show(&out));
    let config = home.path().join(".config/s3-exchange/config.toml");
    assert!(stdout(&out).contains(&format!("wrote {}", config.display())));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config)
        .expect("config")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the configuration is private");
    let text = std::fs::read_to_string(&config).expect("read");
    assert!(text.contains("bucket = \"their-bucket\""), "{text}");
    assert!(text.contains("region = \"eu-west-1\""), "{text}");
    for dir in [
        "exchange/outbox",
        "exchange/inbox",
        "exchange/sent",
        ".local/state/s3-exchange",
    ] {
        assert!(home.path().join(dir).is_dir(), "{dir}");
    }
    // Run again: the (edited) configuration stays as it is.
    std::fs::write(&config, text.replace("their-bucket", "edited")).expect("edit");
    let out = run();
    assert!(out.status.success(), "{}", show(&out));
    assert!(stdout(&out).contains("kept the existing"), "{}", show(&out));
    let kept = std::fs::read_to_string(&config).expect("read");
    assert!(kept.contains("bucket = \"edited\""), "{kept}");
}

#[test]
fn sighup_applies_a_valid_configuration_and_refuses_an_invalid_one() {
    let mut x = Exchange::new();
    let mut daemon = Running::spawn(command(&x, &["run"]), x.root.join("reload.stderr"));
    let pid = daemon.child.id();
    write_file(&x.outbox.join("before.txt"), b"before");
    wait_until("before.txt uploaded", TIMEOUT, || {
        x.owner.get("Submissions/before.txt").is_some()
    });

    // An invalid file: said loudly, and the daemon carries on with the old one.
    x.write_config(&format!("{}\nnonsense = true\n", x.config_text()));
    daemon.signal("HUP");
    wait_until("the refusal in the log", TIMEOUT, || {
        daemon.stderr().contains("the new configuration is INVALID")
    });
    assert!(daemon.alive(), "{}", daemon.stderr());
    write_file(&x.outbox.join("during.txt"), b"during");
    wait_until("during.txt uploaded with the old prefix", TIMEOUT, || {
        x.owner.get("Submissions/during.txt").is_some()
    });

    // A valid, changed file: applied in the same process.
    x.settings.submissions_prefix = "Uploads/".into();
    x.write_config(&x.config_text());
    daemon.signal("HUP");
    wait_until("the reload in the log", TIMEOUT, || {
        daemon
            .stderr()
            .contains("configuration reloaded and applied")
    });
    assert!(daemon.alive());
    assert_eq!(daemon.child.id(), pid);
    write_file(&x.outbox.join("after.txt"), b"after");
    wait_until("after.txt uploaded with the new prefix", TIMEOUT, || {
        x.owner.get("Uploads/after.txt").is_some()
    });
    assert_eq!(x.owner.get("Submissions/after.txt"), None);
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.stderr());
}

#[test]
fn systemd_hears_ready_status_watchdog_reloading_and_stopping() {
    let x = Exchange::new();
    let socket_path = x.root.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut cmd = command(&x, &["run"]);
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000");
    let mut daemon = Running::spawn(cmd, x.root.join("notify.stderr"));
    let mut heard: Vec<String> = Vec::new();
    let listen_until = |what: &str, heard: &mut Vec<String>, pred: &dyn Fn(&str) -> bool| {
        wait_until(what, TIMEOUT, || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                if heard.last().is_some_and(|m| pred(m)) {
                    return true;
                }
            }
            false
        });
    };
    listen_until("READY=1", &mut heard, &|m| {
        m.lines().any(|l| l == "READY=1")
    });
    let ready = heard.last().cloned().unwrap_or_default();
    assert!(ready.contains("STATUS=running: sent 0"), "{ready}");
    // Nothing but STATUS= (and watchdog pings) before READY=1.
    assert!(
        heard[..heard.len() - 1]
            .iter()
            .all(|m| m.starts_with("STATUS=") || m == "WATCHDOG=1"),
        "{heard:?}"
    );
    listen_until("WATCHDOG=1", &mut heard, &|m| m == "WATCHDOG=1");
    // A transfer shows up in STATUS=.
    write_file(&x.outbox.join("a.txt"), b"a");
    listen_until("STATUS= with the upload", &mut heard, &|m| {
        m.starts_with("STATUS=running: sent 1")
    });
    // Reload: RELOADING=1, then READY=1 again.
    let text = x
        .config_text()
        .replace("poll_interval = \"500ms\"", "poll_interval = \"700ms\"");
    assert_ne!(text, x.config_text());
    x.write_config(&text);
    daemon.signal("HUP");
    listen_until("RELOADING=1", &mut heard, &|m| m.starts_with("RELOADING=1"));
    listen_until("READY=1 after the reload", &mut heard, &|m| {
        m.lines().any(|l| l == "READY=1")
    });
    daemon.signal("TERM");
    listen_until("STOPPING=1", &mut heard, &|m| m.starts_with("STOPPING=1"));
    assert_eq!(daemon.stop_after_term(), Some(0), "{}", daemon.stderr());
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    Some(reply)
}

#[test]
fn the_metrics_endpoint_counts_transfers() {
    let x = Exchange::new();
    let port = free_port();
    x.write_config(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        x.config_text()
    ));
    let _daemon = Running::spawn(command(&x, &["run"]), x.root.join("metrics.stderr"));
    write_file(&x.outbox.join("m.bin"), &[7u8; 1000]);
    wait_until("one upload of 1000 bytes in /metrics", TIMEOUT, || {
        http_get(port, "/metrics").is_some_and(|reply| {
            reply.starts_with("HTTP/1.1 200")
                && reply.contains("s3_exchange_objects_total{direction=\"upload\"} 1\n")
                && reply.contains("s3_exchange_bytes_total{direction=\"upload\"} 1000\n")
        })
    });
    let reply = http_get(port, "/metrics").expect("scrape");
    for series in [
        "# TYPE s3_exchange_queue_depth gauge",
        "s3_exchange_polls_total ",
        "s3_exchange_watcher_overflows_total 0",
        "s3_exchange_last_successful_poll_timestamp_seconds ",
    ] {
        assert!(reply.contains(series), "{series} in\n{reply}");
    }
    assert!(http_get(port, "/").is_some_and(|r| r.starts_with("HTTP/1.1 404")));
}

/// STS for real: moto answers GetCallerIdentity (account 123456789012), which s3s-fs
/// cannot. Runs when `tests/run.sh` started moto (`S3X_MOTO_ENDPOINT`), like the interop
/// suite; skipped with a message otherwise, failed if `S3X_REQUIRE_INTEROP=1`.
#[test]
fn check_shows_whose_credentials_these_are_through_sts() {
    let Some(endpoint) = std::env::var("S3X_MOTO_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
    else {
        assert_ne!(
            std::env::var("S3X_REQUIRE_INTEROP").as_deref(),
            Ok("1"),
            "S3X_REQUIRE_INTEROP=1 but S3X_MOTO_ENDPOINT is not set"
        );
        eprintln!(
            "skipped: check_shows_whose_credentials_these_are_through_sts: S3X_MOTO_ENDPOINT is not set (tests/run.sh starts moto)"
        );
        return;
    };
    let home = tempfile::tempdir().expect("tempdir");
    let bucket = format!(
        "s3x-check-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let owner = common::Owner::new(&endpoint, &bucket);
    owner.create_bucket(&bucket);
    let root = home.path().display().to_string();
    let config = home.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[s3]\nbucket = \"{bucket}\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nforce_path_style = true\nchecksums = \"when_required\"\n[outbox]\ndir = \"{root}/outbox\"\nsent_dir = \"{root}/sent\"\n[inbox]\ndir = \"{root}/inbox\"\n[state]\ndir = \"{root}/state\"\n[log]\ndir = \"{root}/log\"\n"
        ),
    )
    .expect("write config");
    let mut cmd = Command::new(BIN);
    hermetic(&mut cmd, home.path());
    let out = output(cmd.arg("--config").arg(&config).args(["check", "--write"]));
    let text = stdout(&out);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text.contains("ok    identity     account 123456789012, arn:aws:sts::123456789012:"),
        "{}",
        show(&out)
    );
    assert_eq!(owner.list("Submissions/").len(), 1, "the probe");
}

#[test]
fn the_log_folder_keeps_log_max_files_daily_files() {
    let x = Exchange::new();
    x.write_config(
        &x.config_text()
            .replace("format = \"text\"", "format = \"text\"\nmax_files = 2"),
    );
    // Five older days, oldest first (the appender orders them by creation time).
    for day in 1..=5 {
        write_file(
            &x.log.join(format!("s3-exchange.2026-01-0{day}.jsonl")),
            b"{}\n",
        );
    }
    write_file(&x.log.join("unrelated.txt"), b"kept");
    let out = output(&mut command(&x, &["sync"]));
    assert!(out.status.success(), "{}", show(&out));
    let mut files = common::files_under(&x.log);
    files.retain(|f| f.ends_with(".jsonl"));
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files.contains(&"s3-exchange.2026-01-05.jsonl".to_owned()),
        "{files:?}"
    );
    assert!(
        x.log.join("unrelated.txt").exists(),
        "only its own files are pruned"
    );
}
