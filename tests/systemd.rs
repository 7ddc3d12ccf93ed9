//! The systemd units, checked by systemd itself.
//!
//! `units_pass_systemd_analyze_verify` runs wherever `systemd-analyze` exists.
//! `the_service_runs_under_a_real_systemd` boots systemd 252 as PID 1 in namespaces
//! (`../shared/testbed/systemd-sandbox`, see its SYSTEMD.md), installs the binary (or
//! the .deb named by `S3X_DEB`) and the template unit there, and drives the service the
//! way an administrator would: start (which returns only after READY=1), upload,
//! download, status, reload (same MainPID; an invalid file is refused), watchdog
//! pings, stop within the timeout, and the journal. Then the same for the user unit,
//! installed by `packaging/install-user.sh` under a lingering user manager. It needs
//! root, so it is `#[ignore]`d in the plain `cargo test` and `tests/run.sh` runs it
//! explicitly with `--ignored`, printing why when it has to skip.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BUCKET, Owner, S3Server, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_s3-exchange");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const UNITS: [&str; 2] = ["s3-exchange.service", "s3-exchange@.service"];
/// The service's own stop timeout in the unit files.
const TIMEOUT_STOP: Duration = Duration::from_secs(45);
/// Generous: two busy cores; a passing run never waits this long.
const WAIT: Duration = Duration::from_secs(60);

fn unit_path(name: &str) -> PathBuf {
    Path::new(ROOT).join("systemd").join(name)
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `systemd-analyze [--user] verify` of a copy of `unit` whose ExecStart points at the
/// binary under test (verify insists that the command exists). Returns its output.
fn verify(unit: &str, contents: &str, dir: &Path) -> Output {
    let copy = dir.join(unit);
    std::fs::write(&copy, contents.replace("/usr/bin/s3-exchange", BIN)).expect("write copy");
    let runtime = dir.join("runtime");
    std::fs::create_dir_all(&runtime).expect("runtime dir");
    let mut cmd = Command::new("systemd-analyze");
    // The user unit is checked as the user manager would load it.
    if !unit.contains('@') {
        cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
    }
    cmd.arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze")
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP units_pass_systemd_analyze_verify: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for unit in UNITS {
        let contents = std::fs::read_to_string(unit_path(unit)).expect("read unit");
        let out = verify(unit, &contents, dir.path());
        // verify exits 0 on mere warnings (an unknown key): silence is the pass.
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{unit}: {}",
            text(&out)
        );
        // The check can fail: a typo in a key is reported.
        let broken = contents.replace("Type=notify", "Typ=notify");
        let out = verify(unit, &broken, dir.path());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Unknown key"),
            "{unit}: a broken copy must be reported: {}",
            text(&out)
        );
        // What the daemon relies on is in the unit.
        for line in [
            "Type=notify",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "TimeoutStopSec=45s",
            "WatchdogSec=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
            "SystemCallFilter=@system-service",
        ] {
            assert!(
                contents.lines().any(|l| l.starts_with(line)),
                "{unit} lacks {line}"
            );
        }
    }
}

/// A throw-away systemd, stopped (and its state removed) on drop.
struct Sandbox {
    script: PathBuf,
    name: String,
}

impl Sandbox {
    fn start(script: PathBuf, name: String) -> Self {
        let sandbox = Self { script, name };
        let out = sandbox
            .command(120, &["start", "--host-net"])
            .output()
            .expect("run systemd-sandbox");
        assert!(out.status.success(), "sandbox start: {}", text(&out));
        sandbox
    }

    fn command(&self, timeout: u32, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg(timeout.to_string())
            .arg(&self.script)
            .args(args)
            .env("SDBOX_NAME", &self.name)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` inside; returns the output whatever the status.
    fn run(&self, args: &[&str]) -> Output {
        let mut full = vec!["exec"];
        full.extend_from_slice(args);
        self.command(60, &full).output().expect("run sandbox exec")
    }

    /// Runs `args` inside and insists on success; returns stdout, trimmed.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `sh -c script` inside, as root.
    #[track_caller]
    fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-c", script])
    }

    /// Writes `contents` to `path` inside (as root).
    fn write(&self, path: &str, contents: &str) {
        let mut child = self
            .command(60, &["exec", "sh", "-c", &format!("cat > '{path}'")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sandbox exec");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(contents.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "write {path}: {}", text(&out));
    }

    fn cp(&self, src: &Path, dest: &str, mode: &str) {
        let src = src.to_string_lossy();
        let out = self
            .command(60, &["cp", &src, dest, mode])
            .output()
            .expect("sandbox cp");
        assert!(out.status.success(), "cp {src}: {}", text(&out));
    }

    fn prop(&self, unit: &str, name: &str) -> String {
        self.ok(&["systemctl", "show", "-P", name, unit])
    }

    fn journal(&self, unit: &str) -> String {
        self.ok(&["journalctl", "-u", unit, "-o", "cat", "--no-pager"])
    }

    fn user_prop(&self, user: &str, unit: &str, name: &str) -> String {
        self.user(user, &["systemctl", "--user", "show", "-P", name, unit])
    }

    #[track_caller]
    fn user(&self, user: &str, args: &[&str]) -> String {
        let mut full = vec!["user-exec", user];
        full.extend_from_slice(args);
        let out = self.command(60, &full).output().expect("sandbox user-exec");
        assert!(out.status.success(), "{user} {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.command(60, &["purge"]).output();
    }
}

/// Why the sandbox test cannot run here, if it cannot.
fn sandbox_script() -> Result<PathBuf, String> {
    let script = std::env::var_os("S3X_SYSTEMD_SANDBOX").map_or_else(
        || Path::new(ROOT).join("../shared/testbed/systemd-sandbox"),
        PathBuf::from,
    );
    if !script.exists() {
        return Err(format!(
            "{} not found (set S3X_SYSTEMD_SANDBOX)",
            script.display()
        ));
    }
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid != "0" {
        return Err("systemd-sandbox needs root".into());
    }
    for tool in ["unshare", "nsenter", "timeout"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(format!("{tool} is missing"));
        }
    }
    Ok(script)
}

fn config_for(endpoint: &str, settle: &str) -> String {
    format!(
        r#"[s3]
bucket = "{BUCKET}"
region = "us-east-1"
endpoint_url = "{endpoint}"
force_path_style = true
checksums = "when_required"

[outbox]
settle = "{settle}"
rescan_interval = "5s"

[inbox]
poll_interval = "500ms"

[log]
level = "debug"
"#
    )
}

/// Asserts, from inside the service's own mount namespace and as its user, that the
/// hardening holds: /etc and the home are read-only, the exchange folder is writable.
#[track_caller]
fn assert_confined(sb: &Sandbox, pid: &str, user: &str) {
    let uid = sb.ok(&["id", "-u", user]);
    let gid = sb.ok(&["id", "-g", user]);
    let home = format!("/home/{user}");
    let probe = format!(
        "! touch /etc/.s3x-probe 2>/dev/null && ! touch {home}/.s3x-probe 2>/dev/null && touch {home}/exchange/.s3x-probe && rm {home}/exchange/.s3x-probe"
    );
    sb.ok(&[
        "nsenter", "-t", pid, "-m", "-S", &uid, "-G", &gid, "sh", "-c", &probe,
    ]);
    // The control: outside the service's namespace the home is writable for its user.
    sb.ok(&[
        "runuser",
        "-u",
        user,
        "--",
        "sh",
        "-c",
        &format!("touch {home}/.s3x-probe && rm {home}/.s3x-probe"),
    ]);
}

/// Waits until `unit`'s journal contains `needle` at least `at_least` times.
#[track_caller]
fn wait_journal(sb: &Sandbox, unit: &str, needle: &str, at_least: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = sb.journal(unit);
        if last.matches(needle).count() >= at_least {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "{unit}: no {needle:?} (x{at_least}) in the journal:\n{}",
            common::tail(&last, 60)
        );
        std::thread::sleep(common::POLL * 10);
    }
}

#[test]
#[ignore = "needs root and ../shared/testbed/systemd-sandbox; tests/run.sh runs it"]
fn the_service_runs_under_a_real_systemd() {
    let script = match sandbox_script() {
        Ok(script) => script,
        Err(reason) => {
            eprintln!("SKIP the_service_runs_under_a_real_systemd: {reason}");
            return;
        }
    };
    let data = tempfile::tempdir().expect("tempdir");
    let server = S3Server::start(data.path());
    let owner = Owner::new(&server.endpoint(), BUCKET);
    owner.create_bucket(BUCKET);

    let sb = Sandbox::start(script, format!("s3x-test-{}", std::process::id()));
    let started = Instant::now();
    match std::env::var_os("S3X_DEB").filter(|d| !d.is_empty()) {
        Some(deb) => {
            sb.cp(Path::new(&deb), "/root/s3-exchange.deb", "644");
            sb.ok(&["dpkg", "-i", "/root/s3-exchange.deb"]);
            sb.ok(&["test", "-f", "/etc/s3-exchange/config.example.toml"]);
            // The manual pages, where man finds them, and they render (when man-db is
            // installed; the package does not depend on it).
            let page = "/usr/share/man/man1/s3-exchange.1.gz";
            sb.ok(&["test", "-f", page]);
            if sb.run(&["sh", "-c", "command -v man"]).status.success() {
                assert_eq!(sb.ok(&["man", "-w", "s3-exchange"]), page);
                let check = sb.ok(&["man", "-P", "cat", "s3-exchange-check"]);
                assert!(check.contains("probe"), "{check}");
            }
        }
        None => {
            sb.cp(Path::new(BIN), "/usr/bin/s3-exchange", "755");
            for unit in UNITS {
                let dest = if unit.contains('@') {
                    format!("/lib/systemd/system/{unit}")
                } else {
                    format!("/usr/lib/systemd/user/{unit}")
                };
                sb.cp(&unit_path(unit), &dest, "644");
            }
            sb.ok(&["systemctl", "daemon-reload"]);
        }
    }

    // `init` starts from the site template (the package's conffile) when there is one.
    if sb
        .run(&["test", "-f", "/etc/s3-exchange/config.example.toml"])
        .status
        .success()
    {
        assert!(
            std::env::var_os("S3X_DEB").is_some(),
            "only the package installs it"
        );
    } else {
        sb.sh("mkdir -p /etc/s3-exchange");
        sb.cp(
            &Path::new(ROOT).join("config/s3-exchange.example.toml"),
            "/etc/s3-exchange/config.example.toml",
            "644",
        );
    }
    sb.sh("sed -i 's/^bucket = .*/bucket = \"site-bucket\"/' /etc/s3-exchange/config.example.toml");
    sb.ok(&["useradd", "-m", "bob"]);
    sb.ok(&[
        "runuser",
        "-u",
        "bob",
        "--",
        "s3-exchange",
        "init",
        "--region",
        "eu-west-1",
    ]);
    let bobs = sb.ok(&["cat", "/home/bob/.config/s3-exchange/config.toml"]);
    assert!(bobs.contains("bucket = \"site-bucket\""), "{bobs}");
    assert!(bobs.contains("region = \"eu-west-1\""), "{bobs}");

    // ---- the system template, for user xfer ----
    let unit = "s3-exchange@xfer.service";
    sb.ok(&["useradd", "-m", "xfer"]);
    sb.sh("mkdir -p /home/xfer/.config/s3-exchange");
    let config = "/home/xfer/.config/s3-exchange/config.toml";
    sb.write(config, &config_for(&server.endpoint(), "300ms"));
    sb.sh("chown -R xfer: /home/xfer/.config");
    // `init` keeps the configuration and creates the folders the unit makes writable.
    let init = sb.ok(&["runuser", "-u", "xfer", "--", "s3-exchange", "init"]);
    assert!(init.contains("kept the existing"), "{init}");
    // The test's credentials, and a short watchdog so that its pings are observable.
    sb.sh("mkdir -p /etc/systemd/system/s3-exchange@.service.d");
    sb.write(
        "/etc/systemd/system/s3-exchange@.service.d/test.conf",
        "[Service]\nEnvironment=AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true\nWatchdogSec=4s\n",
    );
    sb.ok(&["systemctl", "daemon-reload"]);

    // `start` of a Type=notify unit returns once READY=1 arrived.
    sb.ok(&["systemctl", "start", unit]);
    assert_eq!(sb.prop(unit, "ActiveState"), "active");
    let status_text = sb.prop(unit, "StatusText");
    assert!(status_text.starts_with("running: sent 0"), "{status_text}");
    let main_pid = sb.prop(unit, "MainPID");
    assert_ne!(main_pid, "0");
    assert_confined(&sb, &main_pid, "xfer");

    // The watchdog is pinged: its timestamp moves.
    let first_ping = sb.prop(unit, "WatchdogTimestampMonotonic");
    wait_until("a second watchdog ping", WAIT, || {
        sb.prop(unit, "WatchdogTimestampMonotonic") != first_ping
    });

    // A file dropped into the outbox is uploaded with the configured ACL and moved.
    sb.sh(
        "runuser -u xfer -- sh -c 'echo hello from systemd > ~/exchange/outbox/hello.txt.part && mv ~/exchange/outbox/hello.txt.part ~/exchange/outbox/hello.txt'",
    );
    wait_until("Submissions/hello.txt in the bucket", WAIT, || {
        owner.get("Submissions/hello.txt").is_some()
    });
    assert_eq!(
        owner.get("Submissions/hello.txt").as_deref(),
        Some(&b"hello from systemd\n"[..])
    );
    wait_until("hello.txt moved to sent/", WAIT, || {
        sb.run(&["test", "-f", "/home/xfer/exchange/sent/hello.txt"])
            .status
            .success()
    });
    // And a delivery arrives in the inbox, owned by the user.
    owner.put("Delivery/answer.txt", b"the answer\n");
    wait_until("inbox/answer.txt", WAIT, || {
        sb.run(&["test", "-f", "/home/xfer/exchange/inbox/answer.txt"])
            .status
            .success()
    });
    assert_eq!(
        sb.ok(&["stat", "-c", "%U", "/home/xfer/exchange/inbox/answer.txt"]),
        "xfer"
    );

    // `status` works while the daemon holds the ledger.
    wait_until("status --json counts the transfers", WAIT, || {
        let out = sb.run(&[
            "runuser",
            "-u",
            "xfer",
            "--",
            "s3-exchange",
            "status",
            "--json",
        ]);
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        out.status.success()
            && json["running"] == true
            && json["status"]["sent"] == 1
            && json["status"]["received"] == 1
    });
    let status = sb.ok(&["runuser", "-u", "xfer", "--", "s3-exchange", "status"]);
    assert!(status.contains("s3-exchange is running"), "{status}");
    assert!(status.contains("Submissions/hello.txt"), "{status}");

    // Reload with an invalid file: refused loudly, the daemon carries on, same PID.
    sb.sh(&format!(
        "cp {config} {config}.good && echo 'nonsense = 1' >> {config}"
    ));
    sb.ok(&["systemctl", "reload", unit]);
    wait_journal(&sb, unit, "the new configuration is INVALID", 1);
    // The daemon's lines carry their syslog priority: the refusal is an error, start-up is not.
    let errors = sb.ok(&[
        "journalctl",
        "-u",
        unit,
        "-p",
        "err",
        "-o",
        "cat",
        "--no-pager",
    ]);
    assert!(
        errors.contains("the new configuration is INVALID"),
        "{errors}"
    );
    assert!(!errors.contains("s3-exchange started"), "{errors}");
    assert_eq!(sb.prop(unit, "ActiveState"), "active");
    assert_eq!(sb.prop(unit, "MainPID"), main_pid);

    // Reload with a valid, changed file: applied in the same process.
    sb.write(config, &config_for(&server.endpoint(), "400ms"));
    sb.ok(&["systemctl", "reload", unit]);
    wait_journal(&sb, unit, "configuration reloaded and applied", 1);
    assert_eq!(sb.prop(unit, "MainPID"), main_pid);
    wait_until("active again after the reload", WAIT, || {
        sb.prop(unit, "ActiveState") == "active"
    });
    // The new workers work.
    sb.sh("runuser -u xfer -- sh -c 'echo second > ~/exchange/outbox/second.txt'");
    wait_until("Submissions/second.txt after the reload", WAIT, || {
        owner.get("Submissions/second.txt").is_some()
    });

    let security = sb.ok(&["systemd-analyze", "security", "--no-pager", unit]);
    let score = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("systemd-analyze security {unit}: {score}");

    // Stop: SIGTERM, a clean exit well within the stop timeout.
    let stop = Instant::now();
    sb.ok(&["systemctl", "stop", unit]);
    let took = stop.elapsed();
    assert!(took < TIMEOUT_STOP, "stop took {took:?}");
    assert_eq!(sb.prop(unit, "Result"), "success");
    assert_eq!(
        sb.prop(unit, "NRestarts"),
        "0",
        "no watchdog or crash restarts"
    );
    let journal = sb.journal(unit);
    for needle in [
        "s3-exchange started",
        "credentials resolved",
        "transfer",
        "SIGHUP",
        "s3-exchange stopped",
    ] {
        assert!(journal.contains(needle), "{needle} missing:\n{journal}");
    }
    // Under the journal the daemon's lines carry no timestamps of their own.
    let line = journal
        .lines()
        .find(|l| l.contains("s3-exchange started"))
        .unwrap_or_default();
    assert!(
        line.starts_with(" INFO") || line.starts_with("INFO"),
        "{line}"
    );
    let status = sb.run(&["runuser", "-u", "xfer", "--", "s3-exchange", "status"]);
    assert_eq!(status.status.code(), Some(3), "{}", text(&status));

    // ---- the user unit, installed without root by packaging/install-user.sh ----
    let user = "alice";
    sb.ok(&["useradd", "-m", user]);
    // The script finds the unit beside it, as in the source tree.
    sb.cp(
        &Path::new(ROOT).join("packaging/install-user.sh"),
        "/usr/local/share/s3x/packaging/install-user.sh",
        "755",
    );
    sb.cp(
        &unit_path("s3-exchange.service"),
        "/usr/local/share/s3x/systemd/s3-exchange.service",
        "644",
    );
    sb.cp(Path::new(BIN), "/usr/local/share/s3x/s3-exchange", "755");
    let installed = sb.ok(&[
        "runuser",
        "-u",
        user,
        "--",
        "sh",
        "-c",
        "cd ~ && /usr/local/share/s3x/packaging/install-user.sh --binary /usr/local/share/s3x/s3-exchange --bucket exchange --region us-east-1",
    ]);
    assert!(installed.contains("systemctl --user"), "{installed}");
    // Point the starter configuration at the test server.
    sb.write(
        "/home/alice/.config/s3-exchange/config.toml",
        &config_for(&server.endpoint(), "300ms"),
    );
    sb.sh("mkdir -p /home/alice/.config/environment.d && printf 'AWS_ACCESS_KEY_ID=test\\nAWS_SECRET_ACCESS_KEY=test\\nAWS_EC2_METADATA_DISABLED=true\\n' > /home/alice/.config/environment.d/aws.conf && chown -R alice: /home/alice/.config");
    sb.ok(&["loginctl", "enable-linger", user]);
    wait_until("alice's user manager", WAIT, || {
        sb.command(
            60,
            &[
                "user-exec",
                user,
                "systemctl",
                "--user",
                "is-system-running",
            ],
        )
        .output()
        .map(|o| {
            let state = String::from_utf8_lossy(&o.stdout);
            state.contains("running") || state.contains("degraded")
        })
        .unwrap_or(false)
    });
    sb.user(
        user,
        &["systemctl", "--user", "enable", "--now", "s3-exchange"],
    );
    assert_eq!(
        sb.user_prop(user, "s3-exchange.service", "ActiveState"),
        "active"
    );
    sb.sh("runuser -u alice -- sh -c 'echo from alice > ~/exchange/outbox/alice.txt'");
    wait_until("Submissions/alice.txt from the user unit", WAIT, || {
        owner.get("Submissions/alice.txt").is_some()
    });
    let pid = sb.user_prop(user, "s3-exchange.service", "MainPID");
    assert_confined(&sb, &pid, user);
    let security = sb.user(
        user,
        &[
            "systemd-analyze",
            "--user",
            "security",
            "--no-pager",
            "s3-exchange.service",
        ],
    );
    eprintln!(
        "systemd-analyze --user security s3-exchange.service: {}",
        security
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_default()
    );
    sb.user(user, &["systemctl", "--user", "reload", "s3-exchange"]);
    assert_eq!(sb.user_prop(user, "s3-exchange.service", "MainPID"), pid);
    sb.user(user, &["systemctl", "--user", "stop", "s3-exchange"]);
    assert_eq!(
        sb.user_prop(user, "s3-exchange.service", "Result"),
        "success"
    );
    eprintln!(
        "the_service_runs_under_a_real_systemd: {:.1}s in the sandbox",
        started.elapsed().as_secs_f64()
    );
}
