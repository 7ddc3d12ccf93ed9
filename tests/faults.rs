//! Faults (issue 7): the real `s3-exchange` binary against a real S3 server (s3s-fs, in
//! process) through the harness's fault-injecting proxy, and against a damaged, locked or
//! too-new ledger. Nothing may be lost, duplicated or half-done, and the daemon must never
//! hang.
//!
//! `network_and_server_faults_lose_and_duplicate_nothing` prints the fault report (one line
//! per fault: injected, transfers completed, lost, duplicated, longest wait) that the README
//! quotes.

mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::outbox::{is_create_multipart_of, stderr_lines_with, with_table_lines};
use common::{
    BUCKET, Exchange, Fault, Injected, Recorded, SHORT_LIVED_PREFIX, Settings, files_under,
    random_bytes, read_file, short_lived_secret, write_file,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Whether `r` is any request about object `key`.
fn about(key: &str) -> impl Fn(&Recorded) -> bool + Send + Sync + 'static {
    let key = key.to_owned();
    move |r| r.key_in(BUCKET).as_deref() == Some(key.as_str())
}

/// Whether `r` sends data for `key`: a PutObject or an UploadPart.
fn sends(key: &str) -> impl Fn(&Recorded) -> bool + Send + Sync + 'static {
    let about = about(key);
    move |r| r.method == "PUT" && about(r)
}

/// Whether `r` is an UploadPart of `key`.
fn sends_part(key: &str) -> impl Fn(&Recorded) -> bool + Send + Sync + 'static {
    let sends = sends(key);
    move |r| sends(r) && r.has_query_param("partNumber")
}

/// Whether `r` is a GET of `key`.
fn gets(key: &str) -> impl Fn(&Recorded) -> bool + Send + Sync + 'static {
    let about = about(key);
    move |r| r.method == "GET" && about(r)
}

/// 404 NoSuchUpload: the server no longer knows the multipart upload.
fn no_such_upload() -> Fault {
    Fault::Error {
        status: 404,
        code: "NoSuchUpload",
        message: "The specified upload does not exist.",
    }
}

/// Makes a fresh [`Fault`] of one kind (one for each direction).
type MakeFault = fn() -> Fault;

/// One fault, injected into the traffic of one file each way.
struct Case {
    name: &'static str,
    up_rel: String,
    up_bytes: Vec<u8>,
    down_rel: String,
    down_bytes: Vec<u8>,
    injected: Vec<Injected>,
    /// When the file (each way) was seen complete, from the start of the run.
    up_done: Option<Duration>,
    down_done: Option<Duration>,
}

/// Every kind of fault the proxy injects, each on an upload and a download of its own, all
/// at once: 503 SlowDown and 500 replies, connections reset mid-request, responses cut
/// mid-body, requests never answered (the attempt timeout must end them), slow answers, and
/// faults on the parts of a multipart upload. Every file arrives once with its bytes, no
/// temporary file is left, the daemon stays up, and the report shows how long each waited.
#[test]
fn network_and_server_faults_lose_and_duplicate_nothing() {
    let mut ex = Exchange::with(Settings {
        poll_interval: "300ms".into(),
        ..Settings::default()
    });
    // An attempt that gets no answer is given up after 2 s (the default is minutes).
    ex.write_config(&with_table_lines(
        &ex.config_text(),
        "transfer",
        "attempt_timeout = \"2s\"",
    ));
    let faults: Vec<(&'static str, MakeFault, usize)> = vec![
        ("503 SlowDown", Fault::slow_down, 3),
        ("500 InternalError", Fault::internal_error, 3),
        ("reset mid-request", || Fault::ResetRequest, 2),
        ("cut mid-body", || Fault::CutResponse { after: 10 * KIB }, 2),
        ("never answered", || Fault::Hang, 1),
        (
            "0.5 s delay",
            || Fault::Delay(Duration::from_millis(500)),
            2,
        ),
    ];
    let mut cases = Vec::new();
    for (i, (name, fault, times)) in faults.iter().enumerate() {
        let tag = name.replace(' ', "-");
        let up_rel = format!("up-{tag}.bin");
        let down_rel = format!("down-{tag}.bin");
        let up_key = ex.submission_key(&up_rel);
        let down_key = ex.delivery_key(&down_rel);
        let down_bytes = random_bytes(200 * KIB + i, 300 + i as u64);
        ex.owner.put(&down_key, &down_bytes);
        // A PUT's reply has no body to cut: a cut mid-body is for GETs only.
        let mut injected = vec![ex.proxy.inject(gets(&down_key), fault(), *times)];
        if !matches!(fault(), Fault::CutResponse { .. }) {
            injected.push(ex.proxy.inject(sends(&up_key), fault(), *times));
        }
        cases.push(Case {
            name,
            up_bytes: random_bytes(100 * KIB + i, 400 + i as u64),
            up_rel,
            down_rel,
            down_bytes,
            injected,
            up_done: None,
            down_done: None,
        });
    }
    // Faults on the parts of a multipart upload (5 MiB parts).
    let parts_rel = "up-multipart.bin".to_owned();
    let parts_key = ex.submission_key(&parts_rel);
    let part_faults = vec![
        ex.proxy
            .inject(sends_part(&parts_key), Fault::slow_down(), 2),
        ex.proxy
            .inject(sends_part(&parts_key), Fault::ResetRequest, 1),
    ];
    cases.push(Case {
        name: "multipart: 503 and reset on parts",
        up_rel: parts_rel,
        up_bytes: random_bytes(12 * MIB + 5, 499),
        down_rel: String::new(),
        down_bytes: Vec::new(),
        injected: part_faults,
        up_done: None,
        down_done: None,
    });

    ex.start();
    let started = Instant::now();
    for case in &cases {
        write_file(&ex.outbox.join(&case.up_rel), &case.up_bytes);
    }
    ex.wait_for("every file to arrive, each way", || {
        let now = started.elapsed();
        for case in &mut cases {
            if case.up_done.is_none() && ex.sent.join(&case.up_rel).exists() {
                case.up_done = Some(now);
            }
            if case.down_done.is_none()
                && !case.down_rel.is_empty()
                && read_file(&ex.inbox.join(&case.down_rel)).as_deref()
                    == Some(case.down_bytes.as_slice())
            {
                case.down_done = Some(now);
            }
        }
        cases
            .iter()
            .all(|c| c.up_done.is_some() && (c.down_rel.is_empty() || c.down_done.is_some()))
    });
    assert!(
        ex.daemon().try_exit().is_none(),
        "the daemon died\n{}",
        ex.diagnostics()
    );

    // Nothing lost: every upload is in the bucket with its bytes, out of the outbox; every
    // delivery in the inbox with its bytes. Nothing duplicated: the inbox holds each
    // delivery once, and no delivery was fetched whole twice.
    let summary = ex.proxy.summary();
    let mut report = String::from(
        "fault report: fault | injected | transfers completed | lost | duplicated | longest wait\n",
    );
    let mut expected_inbox = Vec::new();
    for case in &cases {
        let up_key = ex.submission_key(&case.up_rel);
        let stored = ex.owner.get(&up_key);
        let up_lost = usize::from(
            stored.as_deref() != Some(case.up_bytes.as_slice())
                || ex.outbox.join(&case.up_rel).exists(),
        );
        let (mut completed, mut lost, mut duplicated) = (1 - up_lost, up_lost, 0);
        if !case.down_rel.is_empty() {
            expected_inbox.push(case.down_rel.as_str());
            let key = ex.delivery_key(&case.down_rel);
            // A whole answer: 200 and a body not cut or damaged on the way (a delayed one
            // is whole).
            let whole_gets = ex.proxy.count(|r| {
                gets(&key)(r)
                    && r.status == Some(200)
                    && !matches!(r.fault, Some("cut mid-body" | "corrupted body"))
            });
            completed += 1;
            duplicated += whole_gets.saturating_sub(1);
            lost += usize::from(whole_gets == 0);
        }
        let injected: usize = case.injected.iter().map(Injected::count).sum();
        let longest = case.up_done.max(case.down_done).unwrap_or_default();
        writeln!(
            report,
            "  {:<34} | {injected:>2} | {completed} | {lost} | {duplicated} | {:.1} s",
            case.name,
            longest.as_secs_f64()
        )
        .expect("write to a String");
        for (way, fault) in case.injected.iter().enumerate() {
            assert!(
                fault.count() >= 1,
                "{}: fault {way} was never injected\n{summary}",
                case.name
            );
        }
        assert_eq!(
            (lost, duplicated),
            (0, 0),
            "{}\n{report}\n{summary}",
            case.name
        );
    }
    eprintln!("{report}");
    expected_inbox.sort_unstable();
    ex.assert_inbox_holds(&expected_inbox);
    ex.stop_cleanly();
}

/// The endpoint goes away (connections refused) while files wait each way, and comes back:
/// the daemon keeps running, says so once (not once per file or attempt), retries quietly,
/// and catches up once it answers again.
#[test]
fn an_endpoint_that_is_down_for_a_while_is_reported_once_and_caught_up_with() {
    let mut ex = Exchange::with(Settings {
        poll_interval: "300ms".into(),
        ..Settings::default()
    });
    ex.start();
    ex.wait_for_polls(ex.delivery_lists(), 1);
    ex.proxy.go_down();
    let ups: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("up-{i}.txt"),
                random_bytes(1000 + i, 600 + i as u64),
            )
        })
        .collect();
    let downs: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("down-{i}.txt"),
                random_bytes(900 + i, 700 + i as u64),
            )
        })
        .collect();
    for (rel, bytes) in &downs {
        ex.owner.put(&ex.delivery_key(rel), bytes);
    }
    for (rel, bytes) in &ups {
        write_file(&ex.outbox.join(rel), bytes);
    }
    // A second attempt at the first upload while down, each a "transfer started" (an
    // attempt is the SDK's retries with their backoff, 4 to 12 s here: a third one could
    // take longer than the test's deadline).
    let first = ex.outbox.join(&ups[0].0).display().to_string();
    ex.wait_for(
        "two attempts at up-0.txt while the endpoint is down",
        || stderr_lines_with(&ex, &["transfer started", &first]).len() >= 2,
    );
    let down_lines = stderr_lines_with(&ex, &["cannot reach S3"]);
    assert_eq!(
        down_lines.len(),
        1,
        "the outage must be reported once: {down_lines:#?}"
    );
    assert!(files_under(&ex.sent).is_empty(), "sent while down?");

    ex.proxy.come_back();
    ex.wait_for("every file each way after the endpoint came back", || {
        ups.iter().all(|(rel, _)| ex.sent.join(rel).exists())
            && downs
                .iter()
                .all(|(rel, bytes)| read_file(&ex.inbox.join(rel)).as_ref() == Some(bytes))
    });
    for (rel, bytes) in &ups {
        assert_eq!(
            ex.owner.get(&ex.submission_key(rel)).as_ref(),
            Some(bytes),
            "{rel}"
        );
    }
    assert_eq!(stderr_lines_with(&ex, &["cannot reach S3"]).len(), 1);
    assert_eq!(
        stderr_lines_with(&ex, &["S3 answers again"]).len(),
        1,
        "the recovery must be reported once\n{}",
        ex.diagnostics()
    );
    let mut expected: Vec<&str> = downs.iter().map(|(rel, _)| rel.as_str()).collect();
    expected.sort_unstable();
    ex.assert_inbox_holds(&expected);
    ex.stop_cleanly();
}

/// kill -9 at moments chosen by a seeded generator (printed) during heavy two-way traffic:
/// 200 files each way, a few of them multipart, killed after a varying amount of progress,
/// eight times over; then a clean run. Every outbox file ends in the bucket with its bytes
/// and in sent/ once, every delivery in the inbox once with its bytes, no temporary file
/// remains anywhere, and the ledger opens every time.
#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    const FILES: usize = 200;
    const KILLS: usize = 8;
    let mut ex = Exchange::with(Settings {
        poll_interval: "200ms".into(),
        settle: "100ms".into(),
        concurrency: 8,
        log_level: "info".into(),
        ..Settings::default()
    });
    let size = |i: usize| {
        if i.is_multiple_of(67) {
            6 * MIB + i
        } else {
            2 * KIB + i
        }
    };
    let ups: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| {
            (
                format!("up/{i:03}.bin"),
                random_bytes(size(i), 1000 + i as u64),
            )
        })
        .collect();
    let downs: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| {
            (
                format!("down/{i:03}.bin"),
                random_bytes(size(i + 1), 2000 + i as u64),
            )
        })
        .collect();
    for (rel, bytes) in &downs {
        ex.owner.put(&ex.delivery_key(rel), bytes);
    }
    for (rel, bytes) in &ups {
        write_file(&ex.outbox.join(rel), bytes);
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("kill -9 schedule seed: {seed}");
    let mut state = seed | 1;
    let mut next = move |below: usize| {
        // xorshift64: a reproducible schedule from the printed seed.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % below as u64).unwrap_or(0)
    };
    // Files in place: the inbox's temp folder (downloads in flight) does not count.
    let progress = |ex: &Exchange| {
        let landed = files_under(&ex.inbox)
            .iter()
            .filter(|f| !f.starts_with(".s3-exchange.tmp/"))
            .count();
        files_under(&ex.sent).len() + landed
    };
    for kill in 0..KILLS {
        ex.start();
        let target = (progress(&ex) + 1 + next(40)).min(2 * FILES);
        ex.wait_for(&format!("kill {kill}: progress to {target}"), || {
            progress(&ex) >= target
        });
        common::outbox::kill_9(ex.daemon());
        ex.daemon().wait_exit(common::TIMEOUT);
    }
    ex.start();
    ex.wait_for("the clean run to finish both directions", || {
        files_under(&ex.sent).len() == FILES
            && downs
                .iter()
                .all(|(rel, bytes)| read_file(&ex.inbox.join(rel)).as_ref() == Some(bytes))
    });
    ex.stop_cleanly();

    let mut sent: Vec<&str> = ups.iter().map(|(rel, _)| rel.as_str()).collect();
    sent.sort_unstable();
    assert_eq!(files_under(&ex.sent), sent, "sent/ holds each file once");
    assert!(
        files_under(&ex.outbox).is_empty(),
        "files left in the outbox"
    );
    for (rel, bytes) in &ups {
        assert_eq!(
            ex.owner.get(&ex.submission_key(rel)).as_ref(),
            Some(bytes),
            "{rel} in the bucket"
        );
        assert_eq!(
            read_file(&ex.sent.join(rel)).as_ref(),
            Some(bytes),
            "sent/{rel}"
        );
    }
    let mut inbox: Vec<&str> = downs.iter().map(|(rel, _)| rel.as_str()).collect();
    inbox.sort_unstable();
    ex.assert_inbox_holds(&inbox);
}

/// Credentials that expire while the daemon runs, as an assumed role or an SSO session
/// hands them out: a `credential_process` in the daemon's AWS profile gives keys that live
/// 20 s, and the server refuses a key once it expired (`ExpiredToken`). The daemon keeps
/// trading for longer than three lifetimes without a restart: it fetches new credentials
/// before the old ones expire, and no request is ever refused.
#[test]
fn credentials_that_expire_are_refreshed_without_a_restart() {
    const LIFETIME_S: u64 = 20;
    let mut ex = Exchange::with(Settings {
        poll_interval: "500ms".into(),
        ..Settings::default()
    });
    ex.write_config(&with_table_lines(
        &ex.config_text(),
        "s3",
        "profile = \"short-lived\"",
    ));
    let fetches = ex.root.join("credential-fetches");
    let script = ex.root.join("credential-process.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
# Hands out credentials that expire {LIFETIME_S} s from now, like STS or SSO.
expires=$(( $(date +%s) + {LIFETIME_S} ))
key="{SHORT_LIVED_PREFIX}$expires"
echo "$key" >> '{fetches}'
printf '{{"Version": 1, "AccessKeyId": "%s", "SecretAccessKey": "%s", "Expiration": "%s"}}\n' \
  "$key" "{secret_prefix}$key" "$(date -u -d "@$expires" +%Y-%m-%dT%H:%M:%SZ)"
"#,
            fetches = fetches.display(),
            secret_prefix = short_lived_secret(""),
        ),
    )
    .expect("write the credential process");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the credential process");
    let aws_config = ex.root.join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile short-lived]\ncredential_process = {}\n",
            script.display()
        ),
    )
    .expect("write the AWS config file");
    ex.start_with(|cmd| {
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_CONFIG_FILE", &aws_config);
    });
    let pid = ex.daemon().pid();
    let fetched = || {
        std::fs::read_to_string(&fetches)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    // Trade all along: a file each way per credential set.
    let mut round = 0;
    let deadline = Instant::now() + Duration::from_secs(4 * LIFETIME_S);
    while fetched() < 4 {
        assert!(
            Instant::now() < deadline,
            "only {} credential fetches in {}s\n{}",
            fetched(),
            4 * LIFETIME_S,
            ex.diagnostics()
        );
        let up = format!("round-{round}.txt");
        let down = format!("delivery-{round}.txt");
        write_file(&ex.outbox.join(&up), up.as_bytes());
        ex.owner.put(&ex.delivery_key(&down), down.as_bytes());
        ex.wait_for(&format!("{up} sent and {down} received"), || {
            ex.sent.join(&up).exists() && ex.inbox.join(&down).exists()
        });
        round += 1;
    }
    assert_eq!(ex.daemon().pid(), pid, "the daemon was restarted");
    let refused: Vec<String> = ex
        .proxy
        .requests()
        .iter()
        .filter(|r| r.status.is_some_and(|s| s >= 400))
        .map(Recorded::summary)
        .collect();
    assert!(
        refused.is_empty(),
        "requests refused (expired credentials used?): {refused:#?}\n{}",
        ex.diagnostics()
    );
    let keys = std::fs::read_to_string(&fetches).unwrap_or_default();
    let used: std::collections::BTreeSet<String> = ex
        .proxy
        .requests()
        .iter()
        .filter_map(|r| {
            let auth = r.header("authorization")?;
            let key = auth.split("Credential=").nth(1)?.split('/').next()?;
            Some(key.to_owned())
        })
        .collect();
    assert!(
        used.len() >= 3,
        "the requests were signed with {} credential sets, expected one per lifetime: {used:?}\nfetched:\n{keys}",
        used.len()
    );
    ex.stop_cleanly();
}

// ---------------------------------------------------------------------------------------
// The ledger
// ---------------------------------------------------------------------------------------

/// A second daemon on the same state folder refuses to start (exit 75) with a line that
/// says why, and the first one carries on.
#[test]
fn a_second_instance_on_the_same_state_folder_refuses_to_start() {
    let mut ex = Exchange::new();
    ex.start();
    ex.wait_for_polls(ex.delivery_lists(), 1);
    let second = ex.run_command("run");
    assert_eq!(
        second.status.code(),
        Some(75),
        "the second instance: {}",
        second.stderr
    );
    assert!(
        second.stderr.contains("in use by another process")
            && second.stderr.contains(&ex.state.display().to_string()),
        "the second instance must say the ledger is in use, and where: {}",
        second.stderr
    );
    write_file(&ex.outbox.join("still.txt"), b"the first one still works\n");
    ex.wait_for("still.txt in sent/ (the first daemon)", || {
        ex.sent.join("still.txt").exists()
    });
    ex.stop_cleanly();
}

/// A ledger that cannot be read (its log overwritten with garbage) or that a newer version
/// wrote stops the daemon at start-up with exit 74 and a line naming the ledger and what to
/// do. It never starts over: not one object is fetched again.
#[test]
fn a_damaged_or_newer_ledger_stops_the_daemon_and_nothing_is_fetched_again() {
    let mut ex = Exchange::new();
    ex.owner
        .put(&ex.delivery_key("once.txt"), b"fetched once\n");
    let first = ex.run_command("sync");
    assert_eq!(first.status.code(), Some(0), "{}", first.stderr);
    assert!(ex.inbox.join("once.txt").exists());
    std::fs::remove_file(ex.inbox.join("once.txt")).expect("move the delivery away");
    let ledger = ex.state.join("ledger");

    // Newer schema: what a later version would write.
    {
        let db = sled::open(&ledger).expect("open the ledger as a newer version would");
        db.insert("schema", &99u32.to_be_bytes())
            .expect("write a newer schema");
        db.flush().expect("flush the ledger");
    }
    let newer = ex.run_command("run");
    assert_eq!(newer.status.code(), Some(74), "{}", newer.stderr);
    assert!(
        newer.stderr.contains("newer s3-exchange") && newer.stderr.contains("upgrade"),
        "{}",
        newer.stderr
    );

    // Damaged: the log overwritten with garbage of the same length.
    let log = ledger.join("db");
    let len = std::fs::metadata(&log).expect("the ledger's log").len();
    std::fs::write(&log, random_bytes(usize::try_from(len).unwrap_or(0), 5))
        .expect("damage the ledger");
    let damaged = ex.run_command("run");
    assert_eq!(damaged.status.code(), Some(74), "{}", damaged.stderr);
    assert!(
        damaged.stderr.contains(&ledger.display().to_string())
            && damaged.stderr.contains("downloaded again"),
        "the line must name the ledger and warn against deleting it: {}",
        damaged.stderr
    );
    assert_eq!(
        ex.delivery_gets(),
        1,
        "a delivery was fetched again\n{}",
        ex.proxy.summary()
    );
    assert!(!ex.inbox.join("once.txt").exists());
}

/// Fills the file system `dir` is on with one file, `dir/filler`, until it is full.
fn fill_up(dir: &std::path::Path) {
    use std::io::Write as _;
    let mut filler = std::fs::File::create(dir.join("filler")).expect("create the filler");
    let block = vec![0u8; 64 * KIB];
    while filler
        .write_all(&block)
        .and_then(|()| filler.sync_all())
        .is_ok()
    {}
    // Also the last few bytes a smaller write still finds.
    while filler.write_all(&[0u8; 512]).is_ok() {}
}

/// The state folder's disk fills up while files go each way, so the ledger cannot record
/// what was transferred (and sled refuses every write from then on). The daemon stops at
/// once with exit 74 and a line naming the ledger, the cause and the fix, rather than go on
/// transferring what it cannot remember. Nothing is lost or half-done: every delivery is in
/// the inbox at most once, every upload in sent/ or still in the outbox. Once space returns
/// a restart completes everything, with no duplicate anywhere, and the ledger opens.
#[test]
fn a_full_state_disk_stops_the_daemon_cleanly_and_a_restart_completes_everything() {
    let test = "a_full_state_disk_stops_the_daemon_cleanly_and_a_restart_completes_everything";
    const DELIVERIES: usize = 200;
    let mut ex = Exchange::with(Settings {
        poll_interval: "300ms".into(),
        ..Settings::default()
    });
    let state = ex.state.clone();
    let _tmpfs = match common::inbox_bed::Tmpfs::mount(&state, "8m") {
        Ok(t) => t,
        Err(why) => {
            common::inbox_bed::skip(test, &why);
            return;
        }
    };
    ex.start();
    ex.wait_for_polls(ex.delivery_lists(), 2);
    fill_up(&state);
    let name = |i: usize| format!("many/{i:03}.txt");
    let bytes = |i: usize| format!("delivery {i}\n").into_bytes();
    for i in 0..DELIVERIES {
        ex.owner.put(&ex.delivery_key(&name(i)), &bytes(i));
    }
    let ups: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("up-{i}.txt"), random_bytes(500 + i, 800 + i as u64)))
        .collect();
    for (rel, bytes) in &ups {
        write_file(&ex.outbox.join(rel), bytes);
    }
    let status = ex.daemon().wait_exit(common::TIMEOUT);
    let stderr = ex.daemon().stderr();
    assert_eq!(status.code(), Some(74), "{}", ex.diagnostics());
    let line = stderr
        .lines()
        .find(|l| l.contains("cannot write the ledger"))
        .unwrap_or_else(|| panic!("no line says the ledger cannot be written\n{stderr}"));
    assert!(
        line.contains(&state.display().to_string())
            && line.contains("No space left")
            && line.contains("free space"),
        "the line must name the ledger, the cause and the fix: {line}"
    );
    let expected: Vec<String> = (0..DELIVERIES).map(name).collect();
    let landed = files_under(&ex.inbox);
    let strays: Vec<&String> = landed.iter().filter(|f| !expected.contains(f)).collect();
    assert!(
        strays.is_empty(),
        "unexpected files in the inbox: {strays:?}"
    );
    for (rel, _) in &ups {
        assert!(
            ex.outbox.join(rel).exists() != ex.sent.join(rel).exists(),
            "{rel} must be in the outbox or in sent/, exactly one"
        );
    }

    std::fs::remove_file(state.join("filler")).expect("make room");
    ex.start();
    ex.wait_for("every delivery and upload after the restart", || {
        ups.iter().all(|(rel, _)| ex.sent.join(rel).exists())
            && (0..DELIVERIES).all(|i| ex.inbox.join(name(i)).exists())
    });
    ex.stop_cleanly();
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    ex.assert_inbox_holds(&expected);
    for i in 0..DELIVERIES {
        assert_eq!(
            read_file(&ex.inbox.join(name(i))),
            Some(bytes(i)),
            "{}",
            name(i)
        );
    }
    for (rel, bytes) in &ups {
        assert_eq!(
            ex.owner.get(&ex.submission_key(rel)).as_ref(),
            Some(bytes),
            "{rel}"
        );
    }
}

/// SIGTERM while a multipart upload and a download are in flight and slower than the
/// shutdown grace (the proxy holds the later parts and the GET before forwarding them): the
/// daemon gives up on both and exits 0 well before the held requests would end, nothing is
/// recorded or moved, each transfer ends in the log as `abandoned`, and the next start
/// resumes the upload from its recorded parts (the same UploadId, part 1 not sent again)
/// and fetches the delivery whole, with one GET.
#[test]
fn sigterm_mid_transfer_resumes_or_cleans_up_at_the_next_start() {
    let mut ex = Exchange::with(Settings {
        poll_interval: "300ms".into(),
        concurrency: 2,
        ..Settings::default()
    });
    ex.write_config(&with_table_lines(
        &ex.config_text(),
        "transfer",
        "shutdown_grace = \"1s\"",
    ));
    let up_key = ex.submission_key("big-up.bin");
    let up_bytes = random_bytes(4 * 5 * MIB + 77, 901);
    let down_key = ex.delivery_key("big-down.bin");
    let down_bytes = random_bytes(6 * MIB + 3, 902);
    ex.owner.put(&down_key, &down_bytes);
    // Parts 2.. and the GET wait 20 s at the proxy: far beyond the 1 s grace.
    let later_part = {
        let sends = sends_part(&up_key);
        move |r: &Recorded| sends(r) && r.query_param("partNumber").is_some_and(|n| n != "1")
    };
    let held = [
        ex.proxy.inject(
            later_part,
            Fault::Delay(Duration::from_secs(20)),
            usize::MAX,
        ),
        ex.proxy
            .inject(gets(&down_key), Fault::Delay(Duration::from_secs(20)), 1),
    ];
    write_file(&ex.outbox.join("big-up.bin"), &up_bytes);
    ex.start();
    ex.wait_for(
        "part 1 answered and the later part and the GET held",
        || {
            ex.proxy
                .count(|r| sends_part(&up_key)(r) && r.status == Some(200))
                >= 1
                && held.iter().all(|h| h.count() >= 1)
        },
    );
    let stopping = Instant::now();
    ex.stop_cleanly();
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the stop took {took:?}: the grace is 1 s, the held requests 20 s"
    );
    assert!(
        ex.outbox.join("big-up.bin").exists(),
        "the upload was not done"
    );
    ex.assert_inbox_holds(&[]);
    // Each transfer that started ends in the log, as abandoned, once.
    for key in [&up_key, &down_key] {
        let ended = stderr_lines_with(&ex, &[" transfer ", key.as_str(), "outcome="]);
        assert_eq!(ended.len(), 1, "the `transfer` events of {key}: {ended:#?}");
        assert!(
            ended[0].contains("outcome=\"abandoned\"") && ended[0].contains("grace of a shutdown"),
            "{key} was not logged as abandoned, with why: {}",
            ended[0]
        );
    }
    let before = ex.proxy.requests().len();

    ex.proxy.clear_faults();
    ex.start();
    ex.wait_for("both transfers after the restart", || {
        ex.sent.join("big-up.bin").exists()
            && read_file(&ex.inbox.join("big-down.bin")).as_ref() == Some(&down_bytes)
    });
    ex.stop_cleanly();
    assert_eq!(ex.owner.get(&up_key).as_ref(), Some(&up_bytes));
    ex.assert_inbox_holds(&["big-down.bin"]);
    let requests = ex.proxy.requests();
    let creates = requests
        .iter()
        .filter(|r| is_create_multipart_of(r, &up_key))
        .count();
    assert_eq!(
        creates,
        1,
        "the upload started over\n{}",
        ex.proxy.summary()
    );
    let part_one_again = requests[before..]
        .iter()
        .filter(|r| sends_part(&up_key)(r) && r.query_param("partNumber").as_deref() == Some("1"))
        .count();
    assert_eq!(
        part_one_again,
        0,
        "part 1 (recorded before the stop) was sent again\n{}",
        ex.proxy.summary()
    );
    let gets_after = requests[before..]
        .iter()
        .filter(|r| gets(&down_key)(r))
        .count();
    assert_eq!(
        gets_after,
        1,
        "GETs after the restart\n{}",
        ex.proxy.summary()
    );
}

/// The server no longer knows a multipart upload: the owner's lifecycle rule aborted it
/// while the daemon was stopped, or an earlier try completed it and its answer was lost.
/// Its next part is refused with `NoSuchUpload` (404): the file is not at fault, so it goes
/// again as a new upload instead of being quarantined until the next start. Only once per
/// file: a server that forgets the new upload too gets the file quarantined, with advice.
#[test]
fn a_multipart_upload_the_server_no_longer_knows_starts_over_and_is_not_quarantined() {
    let mut ex = Exchange::new();
    let key = ex.submission_key("big.bin");
    let bytes = random_bytes(2 * 5 * MIB + 11, 904);
    let gone = ex.proxy.inject(sends_part(&key), no_such_upload(), 1);
    write_file(&ex.outbox.join("big.bin"), &bytes);
    ex.start();
    ex.wait_for("big.bin sent after the refused part", || {
        ex.sent.join("big.bin").exists()
    });
    ex.stop_cleanly();
    assert_eq!(gone.count(), 1, "the refusal was not injected");
    assert_eq!(ex.owner.get(&key).as_ref(), Some(&bytes));
    let creates = ex.proxy.count(|r| is_create_multipart_of(r, &key));
    assert_eq!(
        creates,
        2,
        "a new upload after the refusal\n{}",
        ex.proxy.summary()
    );
    let quarantined = stderr_lines_with(&ex, &["quarantined", "big.bin"]);
    assert!(quarantined.is_empty(), "{quarantined:#?}");
    assert!(
        !stderr_lines_with(
            &ex,
            &["no longer knows this multipart upload", key.as_str()]
        )
        .is_empty(),
        "no line says why the upload started over"
    );

    // A server that forgets every upload of a file: it starts over once, then the file is
    // quarantined with advice instead of being sent again and again.
    let always = ex.submission_key("always.bin");
    ex.proxy
        .inject(sends_part(&always), no_such_upload(), usize::MAX);
    write_file(&ex.outbox.join("always.bin"), &bytes);
    ex.start();
    ex.wait_for("always.bin quarantined", || {
        !stderr_lines_with(&ex, &["quarantined", "always.bin", "multipart_threshold"]).is_empty()
    });
    ex.stop_cleanly();
    let creates = ex.proxy.count(|r| is_create_multipart_of(r, &always));
    assert_eq!(
        creates,
        2,
        "one start-over, then no more\n{}",
        ex.proxy.summary()
    );
    assert!(
        ex.outbox.join("always.bin").exists(),
        "the file left the outbox"
    );
}
