//! The outbox side of the real `s3-exchange` binary against a real S3 server (s3s-fs, in
//! process), seen through the recording proxy and checked from the bucket owner's side:
//! issue 4, "never send a half-written file, never lose one, at any scale".
//!
//! Where a test must show that something does NOT happen, it waits for the daemon's own
//! walks of the outbox (published in `status.json`) or for a later file to go, never for a
//! fixed time.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::outbox::{
    is_abort_multipart_of, is_complete_multipart_of, is_create_multipart_of, is_put_object,
    is_put_object_of, is_upload_part_of, keys_written, kill_9, part_number, proc_status_kib,
    rescans, send_signal, stderr_lines_with, upload_id, wait_for_rescans, wait_until_watching,
    with_outbox_lines, with_outbox_value, with_table_lines,
};
use common::{
    Exchange, Fault, HeldGauge, Recorded, Settings, assert_same_bytes, files_under, random_bytes,
    read_file, write_file, write_slowly,
};

const MIB: usize = 1024 * 1024;

/// The `settle` of the default settings, to judge whether a slow writer was slow enough.
const SETTLE: Duration = Duration::from_millis(300);

/// Settings where only the watcher (and the start-up scan) can find a new file: the
/// periodic rescan is an hour away.
fn watcher_only() -> Settings {
    Settings {
        rescan_interval: "1h".into(),
        ..Settings::default()
    }
}

/// Settings with a quick periodic rescan, for tests that count rescans.
fn quick_rescans() -> Settings {
    Settings {
        rescan_interval: "1s".into(),
        ..Settings::default()
    }
}

/// How many requests of the proxy satisfy `pred` for `key`.
fn count(ex: &Exchange, key: &str, pred: fn(&Recorded, &str) -> bool) -> usize {
    ex.proxy.count(|r| pred(r, key))
}

/// The object `key` as the owner reads it, compared with `expected`.
#[track_caller]
fn assert_object(ex: &Exchange, key: &str, expected: &[u8]) {
    assert_same_bytes(
        &format!("object {key}"),
        ex.owner.get(key).as_deref(),
        expected,
        &ex.diagnostics(),
    );
}

/// Whether `rel` has arrived in the sent folder and left the outbox.
fn moved_to_sent(ex: &Exchange, rel: &str) -> bool {
    !ex.outbox.join(rel).exists() && ex.sent.join(rel).exists()
}

fn append(path: &Path, bytes: &[u8]) {
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} to append: {e}", path.display()));
    file.write_all(bytes)
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    file.sync_all()
        .unwrap_or_else(|e| panic!("sync {}: {e}", path.display()));
}

/// Like [`Exchange::wait_for`] with a longer deadline, for the tests that move a lot of
/// data through a debug build on a busy machine: fails at once if the daemon dies.
#[track_caller]
fn wait_long(ex: &Exchange, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    common::wait_until(what, timeout, || {
        if let Some(status) = ex.daemon().try_exit() {
            panic!(
                "the daemon exited ({status}) while waiting for {what}\n{}",
                ex.diagnostics()
            );
        }
        cond()
    });
}

/// Polls `cond` every millisecond for up to `timeout`: for the tests that must act within a
/// few milliseconds of a request appearing at the proxy.
#[track_caller]
fn spin_until(ex: &Exchange, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            ex.diagnostics()
        );
        thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------
// Completeness
// ---------------------------------------------------------------------------------------

/// A file written in place (ends with Close(Write)), a file written elsewhere and renamed
/// in (only Modify(Name(To))), a file written slowly with its handle open, and a temp name
/// (`x.part`) that must wait until it is renamed to `x`: all found by the watcher alone and
/// each sent exactly once, whole.
#[test]
fn written_renamed_in_and_temp_named_files_go_only_once_complete() {
    let mut ex = Exchange::with(watcher_only());
    let staging = ex.root.join("staging");
    fs::create_dir_all(&staging).expect("create staging folder");
    ex.start();
    wait_until_watching(&ex);

    // A temp name and a hidden file, both complete: they must wait however long.
    let x_bytes = random_bytes(200_000, 51);
    write_file(&ex.outbox.join("x.part"), &x_bytes);
    write_file(&ex.outbox.join(".hidden"), b"editor state\n");
    // Written in place.
    let written = random_bytes(100_000, 52);
    write_file(&ex.outbox.join("written.txt"), &written);
    // Written elsewhere, then moved in (`mv` within one file system is a rename).
    let moved = random_bytes(300_000, 53);
    write_file(&staging.join("moved.bin"), &moved);
    fs::rename(staging.join("moved.bin"), ex.outbox.join("moved.bin")).expect("mv into outbox");
    // Written in 10 chunks 100 ms apart (settle is 300 ms), one handle open throughout.
    let slow = random_bytes(400_000, 54);
    let slow_write = write_slowly(
        ex.outbox.join("slow.dat"),
        slow.clone(),
        10,
        Duration::from_millis(100),
    )
    .join()
    .expect("slow writer thread");

    ex.wait_for("written.txt, moved.bin and slow.dat in sent/", || {
        ["written.txt", "moved.bin", "slow.dat"]
            .iter()
            .all(|rel| moved_to_sent(&ex, rel))
    });
    // x.part and .hidden were complete before written.txt was created: had they counted,
    // they would have settled first.
    assert_eq!(
        keys_written(&ex),
        [
            "Submissions/moved.bin",
            "Submissions/slow.dat",
            "Submissions/written.txt"
        ],
        "keys written while x.part and .hidden waited\n{}",
        ex.proxy.summary()
    );
    assert!(ex.outbox.join("x.part").exists() && ex.outbox.join(".hidden").exists());

    // The producer renames its temp file: now it goes.
    fs::rename(ex.outbox.join("x.part"), ex.outbox.join("x")).expect("rename x.part to x");
    ex.wait_for("x in sent/", || moved_to_sent(&ex, "x"));

    assert_object(&ex, "Submissions/written.txt", &written);
    assert_object(&ex, "Submissions/moved.bin", &moved);
    assert_object(&ex, "Submissions/x", &x_bytes);
    if slow_write.max_gap < SETTLE {
        assert_object(&ex, "Submissions/slow.dat", &slow);
    } else {
        eprintln!(
            "slow writer stalled {:?} (>= settle): slow.dat may rightly have gone early",
            slow_write.max_gap
        );
    }
    assert_eq!(
        ex.owner.list("Submissions/"),
        [
            "Submissions/moved.bin",
            "Submissions/slow.dat",
            "Submissions/written.txt",
            "Submissions/x"
        ]
    );
    // Each went once: no early (partial) upload of the slow file, no second PUT of any.
    for key in ex.owner.list("Submissions/") {
        if key.ends_with("slow.dat") && slow_write.max_gap >= SETTLE {
            continue;
        }
        assert_eq!(
            count(&ex, &key, is_put_object_of),
            1,
            "PutObject requests of {key}\n{}",
            ex.proxy.summary()
        );
    }
    assert_eq!(files_under(&ex.outbox), [".hidden"]);
    ex.assert_no_forbidden_calls();
}

/// A finished folder moved in: its files have been unchanged for longer than `settle`
/// already (their ctime says so, and a rename of the folder does not touch them), so they
/// go at once; a file written in place a moment ago waits its settle time as ever.
#[test]
fn files_unchanged_for_the_settle_time_before_they_were_found_go_at_once() {
    let settle = Duration::from_secs(2);
    let mut ex = Exchange::with(Settings {
        settle: "2s".into(),
        ..watcher_only()
    });
    let staging = ex.root.join("staging");
    fs::create_dir_all(&staging).expect("create staging folder");
    ex.start();
    wait_until_watching(&ex);

    // Written after the daemon started (changes from before it are not vouched for).
    let names = ["a.txt", "b.txt", "c.txt"];
    for name in names {
        write_file(&staging.join(name), name.as_bytes());
    }
    let changed = |name: &str| {
        let meta = fs::metadata(staging.join(name)).expect("stat a staged file");
        std::time::UNIX_EPOCH + Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32)
    };
    spin_until(
        &ex,
        "the staged files to be older than settle",
        common::TIMEOUT,
        || {
            names.iter().all(|name| {
                std::time::SystemTime::now()
                    .duration_since(changed(name))
                    .is_ok_and(|age| age > settle + Duration::from_millis(100))
            })
        },
    );
    write_file(&ex.outbox.join("fresh.txt"), b"just written\n");
    fs::rename(&staging, ex.outbox.join("batch")).expect("mv the folder into the outbox");

    ex.wait_for("the batch and fresh.txt in sent/", || {
        moved_to_sent(&ex, "fresh.txt")
            && names
                .iter()
                .all(|name| moved_to_sent(&ex, &format!("batch/{name}")))
    });
    for name in names {
        let found = stderr_lines_with(&ex, &["settled already", &format!("batch/{name}")]);
        assert_eq!(
            found.len(),
            1,
            "batch/{name} was unchanged for longer than settle when found: it must go at once\n{}",
            ex.daemon().stderr()
        );
    }
    let fresh = stderr_lines_with(&ex, &["settled already", "fresh.txt"]);
    assert!(
        fresh.is_empty(),
        "fresh.txt was written a moment before it was found: it must wait its settle time: {fresh:#?}"
    );
}

/// A large file appended to while its multipart upload runs: that upload is aborted, never
/// completed (so the owner never sees the old bytes under the key), and the file goes again
/// with its final bytes once it settles.
///
/// Deterministic: the append is done while the first part is held at the proxy, so the
/// upload cannot have completed, and the daemon compares the file's stamp only after
/// sending every part. (Watching for the first part from the test instead raced with the
/// 8 parts in flight: all could start before the test looked.)
#[test]
fn a_file_that_grows_during_its_multipart_upload_is_sent_again_with_its_final_bytes() {
    let mut ex = Exchange::new();
    let key = ex.submission_key("growing.bin");
    let first = random_bytes(40 * MIB, 61);
    let extra = random_bytes(MIB + 7, 62);
    let path = ex.outbox.join("growing.bin");
    write_file(&path, &first);
    let appended = {
        let (path, extra, key) = (path.clone(), extra.clone(), key.clone());
        ex.proxy.inject(
            move |r: &Recorded| is_upload_part_of(r, &key) && part_number(r) == Some(1),
            Fault::Before(Box::new(move || append(&path, &extra))),
            1,
        )
    };
    ex.start();

    spin_until(
        &ex,
        "the append during the first UploadPart of growing.bin",
        common::TIMEOUT,
        || appended.count() == 1,
    );
    let first_id = ex
        .proxy
        .requests()
        .iter()
        .find(|r| is_upload_part_of(r, &key))
        .and_then(upload_id)
        .expect("the first UploadPart names its upload");

    wait_long(
        &ex,
        "growing.bin in sent/",
        Duration::from_secs(120),
        || moved_to_sent(&ex, "growing.bin"),
    );
    let mut whole = first.clone();
    whole.extend_from_slice(&extra);
    assert_object(&ex, &key, &whole);
    assert_same_bytes(
        "sent/growing.bin",
        read_file(&ex.sent.join("growing.bin")).as_deref(),
        &whole,
        &ex.diagnostics(),
    );

    let requests = ex.proxy.requests();
    let summary = ex.proxy.summary();
    assert!(
        !requests
            .iter()
            .any(|r| is_complete_multipart_of(r, &key) && upload_id(r) == Some(first_id.clone())),
        "the upload of the old bytes was completed\n{summary}"
    );
    assert!(
        requests
            .iter()
            .any(|r| is_abort_multipart_of(r, &key) && upload_id(r) == Some(first_id.clone())),
        "the upload of the old bytes was not aborted\n{summary}"
    );
    assert_eq!(count(&ex, &key, is_complete_multipart_of), 1, "{summary}");
    assert_eq!(count(&ex, &key, is_create_multipart_of), 2, "{summary}");
    assert!(
        !stderr_lines_with(&ex, &["transfer", "growing.bin", "changed"]).is_empty(),
        "no `transfer` event with outcome changed for growing.bin\n{}",
        ex.diagnostics()
    );
}

/// The same for a single PUT: a file appended to while its PUT is on the wire is not
/// recorded as sent and goes again with its final bytes.
///
/// Whether the append beat the daemon's check is read from the proxy afterwards (the PUT
/// had no answer yet when the append was done); if the PUT was already answered, the run
/// only checks the final bytes and says so.
#[test]
fn a_file_that_grows_during_its_single_put_is_sent_again_with_its_final_bytes() {
    let mut ex = Exchange::new();
    let key = ex.submission_key("single.bin");
    // 5 MiB is the threshold: before and after the append, one PUT.
    let first = random_bytes(5 * MIB - 100, 63);
    let extra = b"one more line\n".to_vec();
    let path = ex.outbox.join("single.bin");
    write_file(&path, &first);
    ex.start();

    spin_until(&ex, "the PUT of single.bin", common::TIMEOUT, || {
        count(&ex, &key, is_put_object_of) >= 1
    });
    append(&path, &extra);
    let answered_before_append = ex
        .proxy
        .requests()
        .iter()
        .find(|r| is_put_object_of(r, &key))
        .is_some_and(|r| r.status.is_some());

    ex.wait_for("single.bin in sent/", || moved_to_sent(&ex, "single.bin"));
    let mut whole = first.clone();
    whole.extend_from_slice(&extra);
    assert_object(&ex, &key, &whole);
    assert_same_bytes(
        "sent/single.bin",
        read_file(&ex.sent.join("single.bin")).as_deref(),
        &whole,
        &ex.diagnostics(),
    );
    if answered_before_append {
        eprintln!("the PUT was answered before the append: only the final bytes are checked");
        return;
    }
    assert_eq!(
        count(&ex, &key, is_put_object_of),
        2,
        "the first PUT must not count, the second must\n{}",
        ex.proxy.summary()
    );
    assert!(
        !stderr_lines_with(&ex, &["transfer", "single.bin", "changed"]).is_empty(),
        "no `transfer` event with outcome changed for single.bin\n{}",
        ex.diagnostics()
    );
}

// ---------------------------------------------------------------------------------------
// Nothing missed
// ---------------------------------------------------------------------------------------

/// A whole tree built outside and renamed in (inotify reports only the top folder), and a
/// tree created inside and filled at once (files land before the new folders' watches
/// exist): every file goes, by the watcher's hint and the walk of new folders alone.
#[test]
fn folder_trees_moved_in_or_created_at_once_are_sent_entirely() {
    let mut ex = Exchange::with(watcher_only());
    let staging = ex.root.join("staging");
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, rel) in [
        "tree/top.txt",
        "tree/a/one.bin",
        "tree/a/two.bin",
        "tree/a/b/three.bin",
        "tree/a/b/c/four.bin",
        "tree/a/b/c/d/e/five.bin",
        "tree/other/six.bin",
    ]
    .iter()
    .enumerate()
    {
        let bytes = random_bytes(1000 + i * 777, 70 + i as u64);
        write_file(&staging.join(rel), &bytes);
        expected.push((rel.to_string(), bytes));
    }
    for i in 0..40 {
        let rel = format!("tree/many/f{i:02}.txt");
        let bytes = format!("file {i}\n").into_bytes();
        write_file(&staging.join(&rel), &bytes);
        expected.push((rel, bytes));
    }
    fs::create_dir_all(staging.join("tree/empty/folder")).expect("empty folder");
    write_file(&staging.join("tree/a/.hidden"), b"not sent");
    write_file(&staging.join("tree/a/b/w.part"), b"not sent");
    ex.start();
    wait_until_watching(&ex);

    fs::rename(staging.join("tree"), ex.outbox.join("tree")).expect("mv tree into outbox");
    // Created inside, deep, and filled immediately.
    for i in 0..20 {
        let rel = format!("fresh/x/y/z/f{i:02}.txt");
        let bytes = random_bytes(500 + i, 90 + i as u64);
        write_file(&ex.outbox.join(&rel), &bytes);
        expected.push((rel, bytes));
    }

    expected.sort();
    let rels: Vec<String> = expected.iter().map(|(rel, _)| rel.clone()).collect();
    ex.wait_for("every file of both trees in sent/", || {
        files_under(&ex.sent) == rels
    });
    let keys: Vec<String> = rels.iter().map(|rel| ex.submission_key(rel)).collect();
    assert_eq!(ex.owner.list("Submissions/"), keys);
    for (rel, bytes) in &expected {
        assert_object(&ex, &ex.submission_key(rel), bytes);
        assert_eq!(count(&ex, &ex.submission_key(rel), is_put_object_of), 1);
    }
    assert_eq!(
        files_under(&ex.outbox),
        ["tree/a/.hidden", "tree/a/b/w.part"]
    );
    assert_eq!(
        rescans(&ex),
        1,
        "only the start-up scan may have run: the watcher and the walks found everything"
    );
}

// ---------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------

/// 10,000 small files written into the outbox as fast as possible. The first 9,000 arrive
/// while the daemon is stopped (SIGSTOP), so the kernel's inotify queue
/// (`fs.inotify.max_queued_events`, 16384 by default; each file makes at least two events)
/// overflows for certain; the last 1,000 arrive while it runs and fill its own queues (4096
/// hints, 4096 pending files). Only the rescans the overflows trigger can find the files
/// (the periodic rescan is an hour away). Every file arrives exactly once with its bytes,
/// and the daemon's peak RSS stays bounded.
///
/// Bytes are checked in the server's storage (s3s-fs keeps each object as a plain file)
/// for all 10,000 and through the owner's GET for a sample: 10,000 GETs of the debug-built
/// SDK would take minutes.
#[test]
fn ten_thousand_files_dropped_at_once_are_all_sent_with_bounded_memory() {
    const FILES: usize = 10_000;
    const RSS_LIMIT_KIB: u64 = 256 * 1024;
    let mut ex = Exchange::with(Settings {
        rescan_interval: "1h".into(),
        concurrency: 8,
        log_level: "info".into(),
        ..Settings::default()
    });
    let content = |i: usize| {
        let mut bytes = format!("file {i:05}\n").into_bytes();
        bytes.extend(random_bytes(i % 200, i as u64));
        bytes
    };
    let name = |i: usize| format!("f{i:05}.dat");
    ex.start();
    wait_until_watching(&ex);
    let pid = ex.daemon().pid();

    const WHILE_STOPPED: usize = 9_000;
    let kernel_queue: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16_384);
    let started = Instant::now();
    send_signal(ex.daemon(), "STOP");
    for i in 0..WHILE_STOPPED {
        write_file(&ex.outbox.join(name(i)), &content(i));
    }
    send_signal(ex.daemon(), "CONT");
    for i in WHILE_STOPPED..FILES {
        write_file(&ex.outbox.join(name(i)), &content(i));
    }
    let written = started.elapsed();
    // A deadline, not a pause: a healthy daemon needs a fraction of it.
    wait_long(
        &ex,
        "10,000 PutObject answered with 200",
        Duration::from_secs(600),
        || {
            ex.proxy
                .count(|r| is_put_object(r) && r.status == Some(200))
                >= FILES
        },
    );
    ex.wait_for("the outbox to be empty", || {
        fs::read_dir(&ex.outbox).is_ok_and(|mut d| d.next().is_none())
    });
    let elapsed = started.elapsed();
    let peak_kib = proc_status_kib(pid, "VmHWM").expect("VmHWM of the running daemon");
    let cpu = common::outbox::proc_cpu_seconds(pid).unwrap_or(f64::NAN);
    let status = common::outbox::status(&ex, ex.daemon());
    let counter = |name: &str| {
        status
            .as_ref()
            .and_then(|s| s.get(name)?.as_u64())
            .unwrap_or(0)
    };
    let (walks, overflows) = (counter("rescans"), counter("watcher_overflows"));
    eprintln!(
        "10,000 files: written in {written:.1?}, all sent in {elapsed:.1?} (daemon CPU \
         {cpu:.1} s); daemon peak RSS (VmHWM) {:.1} MiB; outbox walks {walks}, watcher \
         overflows {overflows}",
        peak_kib as f64 / 1024.0,
    );
    if 2 * WHILE_STOPPED > kernel_queue {
        assert!(
            overflows >= 1,
            "{WHILE_STOPPED} files written while the daemon was stopped overflow an inotify \
             queue of {kernel_queue} events, but the daemon counted no overflow"
        );
        let lines = stderr_lines_with(&ex, &["lost events", "rescanning"]);
        assert!(
            !lines.is_empty(),
            "no log line says the watcher lost events"
        );
    } else {
        eprintln!(
            "fs.inotify.max_queued_events = {kernel_queue}: {WHILE_STOPPED} files may not \
             overflow it, so the kernel overflow is not asserted"
        );
    }
    assert!(
        walks > 1,
        "only the start-up walk ran: the burst did not overflow a queue, so this run did \
         not test the overflow rescans"
    );

    // Count: exactly one PUT per file and nothing else written.
    let requests = ex.proxy.requests();
    let mut put_keys: Vec<String> = requests
        .iter()
        .filter(|r| is_put_object(r))
        .filter_map(|r| r.key_in(common::BUCKET))
        .collect();
    put_keys.sort();
    let expected: Vec<String> = (0..FILES).map(|i| ex.submission_key(&name(i))).collect();
    assert!(
        put_keys == expected,
        "PutObject keys: {} requests, expected one for each of the {FILES} files",
        put_keys.len()
    );
    assert_eq!(keys_written(&ex).len(), FILES, "keys written in all");
    // Bytes: every object as the server stores it, a sample as the owner reads it.
    let stored = ex.root.join("s3").join(common::BUCKET).join("Submissions");
    for i in 0..FILES {
        let got = read_file(&stored.join(name(i)));
        assert!(
            got.as_deref() == Some(content(i).as_slice()),
            "stored object {}: {:?} bytes, expected {}",
            name(i),
            got.map(|g| g.len()),
            content(i).len()
        );
    }
    for i in (0..FILES).step_by(250) {
        assert_object(&ex, &ex.submission_key(&name(i)), &content(i));
    }
    assert_eq!(files_under(&ex.sent).len(), FILES, "files in sent/");
    assert!(
        peak_kib < RSS_LIMIT_KIB,
        "daemon peak RSS {peak_kib} KiB >= {RSS_LIMIT_KIB} KiB"
    );
}

// ---------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------

/// Names that need care in a key arrive under exactly the right key; a non-UTF-8 name and
/// names whose key would exceed 1024 bytes (counted in bytes, not characters) are
/// quarantined once with a log line naming the file and the reason, left in place, and not
/// retried by later rescans, while the other files go.
#[test]
fn awkward_names_keep_their_key_and_impossible_ones_are_quarantined_in_place() {
    let mut ex = Exchange::with(quick_rescans());
    let good = [
        "with space.txt",
        "Ünïcödé ✓ 日本語.txt",
        "a#b?c%d+e&f=g.txt",
        "100% sure; 'quoted' \"double\" (1) [2] {3} @!$*,~.txt",
        "dir with space/sub+dir/x=y&z.csv",
        "%2F not a slash %25.txt",
    ];
    // "é" is two bytes: 100 of them make a 200-byte, 100-character segment.
    let e100 = "é".repeat(100);
    let long_dir = |tag: char| {
        let mut segs: Vec<String> = (0..5).map(|_| e100.clone()).collect();
        segs[0] = format!("{tag}{}", &e100[2..]);
        segs.join("/")
    };
    // Exactly 1024 bytes: allowed. One byte more: not.
    let (dir_a, dir_b) = (long_dir('a'), long_dir('b'));
    let name_len = 1024 - ex.submission_key("").len() - dir_a.len() - 1;
    let at_limit = format!("{dir_a}/{}.txt", "l".repeat(name_len - 4));
    let over_limit = format!("{dir_b}/{}.txt", "l".repeat(name_len - 3));
    assert_eq!(ex.submission_key(&at_limit).len(), 1024);
    assert_eq!(ex.submission_key(&over_limit).len(), 1025);
    assert!(ex.submission_key(&over_limit).chars().count() < 1024);
    let not_utf8 = PathBuf::from(OsStr::from_bytes(b"caf\xe9 latin-1.txt"));

    let all: Vec<(String, Vec<u8>)> = good
        .iter()
        .enumerate()
        .map(|(i, rel)| (rel.to_string(), random_bytes(100 + i, 100 + i as u64)))
        .collect();
    for (rel, bytes) in &all {
        write_file(&ex.outbox.join(rel), bytes);
    }
    // s3s-fs cannot store a key this long (it names a metadata file after the key's
    // base64 and fails with 500), so only the attempt is checked: the daemon's limit is
    // 1024 bytes, counted in bytes.
    write_file(&ex.outbox.join(&at_limit), b"exactly at the limit\n");
    let at_limit_key = ex.submission_key(&at_limit);
    let over_bytes = b"one byte too long\n".to_vec();
    write_file(&ex.outbox.join(&over_limit), &over_bytes);
    let latin_bytes = b"cafe\n".to_vec();
    write_file(&ex.outbox.join(&not_utf8), &latin_bytes);
    ex.start();

    ex.wait_for(
        "every good name in sent/, and a PUT of the 1024-byte key",
        || {
            all.iter().all(|(rel, _)| moved_to_sent(&ex, rel))
                && count(&ex, &at_limit_key, is_put_object_of) >= 1
        },
    );
    let over_path = ex.outbox.join(&over_limit).display().to_string();
    let latin_path = ex.outbox.join(&not_utf8).display().to_string();
    ex.wait_for("both quarantine lines", || {
        !stderr_lines_with(&ex, &["quarantined", &over_path]).is_empty()
            && !stderr_lines_with(&ex, &["quarantined", &latin_path]).is_empty()
    });
    // Two more walks of the outbox: a quarantined file is not tried again.
    wait_for_rescans(&ex, rescans(&ex), 2);

    let mut keys: Vec<String> = all.iter().map(|(rel, _)| ex.submission_key(rel)).collect();
    keys.sort();
    // (s3s-fs wrote the data of the 1024-byte key before failing on its metadata file.)
    let listed: Vec<String> = ex
        .owner
        .list("Submissions/")
        .into_iter()
        .filter(|k| *k != at_limit_key)
        .collect();
    assert_eq!(listed, keys);
    let mut tried = keys.clone();
    tried.push(at_limit_key.clone());
    tried.sort();
    assert_eq!(keys_written(&ex), tried, "only the good names reached S3");
    for (rel, bytes) in &all {
        let key = ex.submission_key(rel);
        assert_object(&ex, &key, bytes);
        assert_eq!(count(&ex, &key, is_put_object_of), 1, "PUTs of {key}");
    }

    let over = stderr_lines_with(&ex, &["quarantined", &over_path]);
    assert_eq!(
        over.len(),
        1,
        "quarantine lines for the long name: {over:#?}"
    );
    assert!(
        over[0].contains("1025") && over[0].contains("1024"),
        "the line does not say the key is 1025 bytes of at most 1024: {}",
        over[0]
    );
    let latin = stderr_lines_with(&ex, &["quarantined", &latin_path]);
    assert_eq!(
        latin.len(),
        1,
        "quarantine lines for the non-UTF-8 name: {latin:#?}"
    );
    assert!(
        latin[0].contains("UTF-8"),
        "the line does not say the name is not UTF-8: {}",
        latin[0]
    );
    assert_eq!(read_file(&ex.outbox.join(&over_limit)), Some(over_bytes));
    assert_eq!(read_file(&ex.outbox.join(&not_utf8)), Some(latin_bytes));
    ex.assert_no_forbidden_calls();
}

// ---------------------------------------------------------------------------------------
// Symlinks
// ---------------------------------------------------------------------------------------

/// By default no symlink is followed: a link to /etc/passwd, a link to a canary file
/// outside, a link to a folder outside (even for files written into that folder after the
/// daemon started watching) and a link to a folder inside the outbox never put anything
/// under a key of theirs. Each skipped link is logged once, saying why; links and targets
/// stay as they were.
#[test]
fn symlinks_are_never_followed_by_default() {
    let mut ex = Exchange::with(quick_rescans());
    let outside = ex.root.join("outside");
    let canary = random_bytes(5000, 111);
    write_file(&outside.join("canary.txt"), &canary);
    symlink("/etc/passwd", ex.outbox.join("passwd")).expect("link to /etc/passwd");
    symlink(outside.join("canary.txt"), ex.outbox.join("canary-link")).expect("file link");
    symlink(&outside, ex.outbox.join("outside-dir")).expect("folder link");
    write_file(&ex.outbox.join("real/inside.txt"), b"inside\n");
    symlink(ex.outbox.join("real"), ex.outbox.join("alias")).expect("inner folder link");
    write_file(&ex.outbox.join("plain.txt"), b"plain\n");
    ex.start();

    ex.wait_for("plain.txt and real/inside.txt in sent/", || {
        moved_to_sent(&ex, "plain.txt") && moved_to_sent(&ex, "real/inside.txt")
    });
    // New files behind the folder links, while the daemon watches.
    write_file(
        &outside.join("written-later.txt"),
        b"secret, outside the outbox\n",
    );
    write_file(&ex.outbox.join("real/later.txt"), b"later, inside\n");
    ex.wait_for("real/later.txt in sent/", || {
        moved_to_sent(&ex, "real/later.txt")
    });
    wait_for_rescans(&ex, rescans(&ex), 2);

    assert_eq!(
        keys_written(&ex),
        [
            "Submissions/plain.txt",
            "Submissions/real/inside.txt",
            "Submissions/real/later.txt"
        ],
        "keys written\n{}\n{}",
        ex.proxy.summary(),
        ex.diagnostics()
    );
    for link in ["passwd", "canary-link"] {
        let path = ex.outbox.join(link).display().to_string();
        let lines = stderr_lines_with(&ex, &["skipped", &path]);
        assert_eq!(
            lines.len(),
            1,
            "one `skipped` line for {link}, after several rescans: {lines:#?}\n{}",
            ex.diagnostics()
        );
        assert!(
            lines[0].contains("symlink") && lines[0].contains("follow_symlinks"),
            "the line does not say it is a symlink and how to send it: {}",
            lines[0]
        );
    }
    for link in ["passwd", "canary-link", "outside-dir", "alias"] {
        let meta = fs::symlink_metadata(ex.outbox.join(link)).expect("link still there");
        assert!(meta.file_type().is_symlink(), "{link} is still a link");
    }
    assert_eq!(read_file(&outside.join("canary.txt")), Some(canary));
    assert!(outside.join("written-later.txt").exists());
}

/// With `follow_symlinks = true` a link to a file (outside the outbox) goes with the
/// target's bytes under the link's name, the target stays where it is; links to folders
/// are not followed: a loop (`loop -> outbox`, present at start or made while running)
/// neither hangs the daemon nor sends anything twice or under a looped key.
#[test]
fn followed_file_links_send_the_target_and_folder_loops_do_not_repeat() {
    let mut ex = Exchange::with(quick_rescans());
    ex.write_config(&with_outbox_lines(
        &ex.config_text(),
        "follow_symlinks = true",
    ));
    let outside = ex.root.join("outside");
    let target = random_bytes(70_000, 121);
    write_file(&outside.join("target.bin"), &target);
    symlink(outside.join("target.bin"), ex.outbox.join("link.bin")).expect("file link");
    symlink(&ex.outbox, ex.outbox.join("loop")).expect("loop link");
    write_file(&ex.outbox.join("sub/a.txt"), b"a\n");
    ex.start();

    ex.wait_for("link.bin and sub/a.txt in sent/", || {
        !ex.outbox.join("link.bin").exists() && moved_to_sent(&ex, "sub/a.txt")
    });
    // A second loop, made while the daemon watches, then more files.
    symlink(&ex.outbox, ex.outbox.join("sub/back")).expect("loop link made while running");
    write_file(&ex.outbox.join("after-loop.txt"), b"after\n");
    write_file(&ex.outbox.join("sub/b.txt"), b"b\n");
    ex.wait_for("after-loop.txt and sub/b.txt in sent/", || {
        moved_to_sent(&ex, "after-loop.txt") && moved_to_sent(&ex, "sub/b.txt")
    });
    wait_for_rescans(&ex, rescans(&ex), 2);

    assert_object(&ex, "Submissions/link.bin", &target);
    assert_eq!(
        keys_written(&ex),
        [
            "Submissions/after-loop.txt",
            "Submissions/link.bin",
            "Submissions/sub/a.txt",
            "Submissions/sub/b.txt"
        ],
        "keys written\n{}\n{}",
        ex.proxy.summary(),
        ex.diagnostics()
    );
    for key in keys_written(&ex) {
        assert_eq!(count(&ex, &key, is_put_object_of), 1, "PUTs of {key}");
    }
    assert_eq!(
        read_file(&outside.join("target.bin")).as_deref(),
        Some(target.as_slice()),
        "the link's target must stay where it is"
    );
    for link in ["loop", "sub/back"] {
        let path = ex.outbox.join(link).display().to_string();
        let lines = stderr_lines_with(&ex, &["skipped", &path]);
        assert_eq!(
            lines.len(),
            1,
            "one `skipped` line for {link}: {lines:#?}\n{}",
            ex.diagnostics()
        );
    }
    ex.stop_cleanly();
}

/// Running out of inotify watches. The daemon runs in a user namespace of its own whose
/// inotify budget is tiny (the machine's limit, shared with everything else, is left
/// alone). With 1 watch it cannot even watch the outbox's folders at start-up; with 2 (the
/// outbox and its one folder) it runs out when new folders arrive. Either way the log
/// names the sysctl that fixes it, and the periodic rescan still finds every file,
/// including files in folders that have no watch.
#[test]
fn running_out_of_inotify_watches_is_logged_with_the_fix_and_rescans_carry_on() {
    use common::outbox::DaemonAs;
    let ex = Exchange::with(quick_rescans());
    const FIX: &str = "sysctl fs.inotify.max_user_watches";
    write_file(&ex.outbox.join("pre/a.txt"), b"a\n");

    // Not enough watches for the outbox and pre/.
    let daemon = DaemonAs::with_inotify_watches(&ex, 1);
    daemon.wait_for("the out-of-watches line and pre/a.txt in sent/", || {
        !daemon.stderr_lines_with(&["inotify", FIX]).is_empty() && moved_to_sent(&ex, "pre/a.txt")
    });
    write_file(&ex.outbox.join("pre/b.txt"), b"b\n");
    daemon.wait_for("pre/b.txt in sent/ (found by a rescan)", || {
        moved_to_sent(&ex, "pre/b.txt")
    });
    assert_eq!(daemon.stop().code(), Some(0));

    // Enough for what is there at start, not for what comes.
    let daemon = DaemonAs::with_inotify_watches(&ex, 2);
    daemon.wait_for_rescans(&ex, 0, 1);
    assert!(
        daemon.stderr_lines_with(&["inotify", FIX]).is_empty(),
        "2 watches suffice at start-up"
    );
    write_file(&ex.outbox.join("new1/deep/c.txt"), b"c\n");
    write_file(&ex.outbox.join("new2/d.txt"), b"d\n");
    daemon.wait_for("the out-of-watches line", || {
        !daemon.stderr_lines_with(&["inotify", FIX]).is_empty()
    });
    daemon.wait_for("new1/deep/c.txt and new2/d.txt in sent/", || {
        moved_to_sent(&ex, "new1/deep/c.txt") && moved_to_sent(&ex, "new2/d.txt")
    });
    // new1/deep has no watch: only a walk of the outbox can find this one.
    write_file(&ex.outbox.join("new1/deep/e.txt"), b"e\n");
    daemon.wait_for("new1/deep/e.txt in sent/ (found by a rescan)", || {
        moved_to_sent(&ex, "new1/deep/e.txt")
    });
    for rel in [
        "pre/a.txt",
        "pre/b.txt",
        "new1/deep/c.txt",
        "new2/d.txt",
        "new1/deep/e.txt",
    ] {
        assert_eq!(
            count(&ex, &ex.submission_key(rel), is_put_object_of),
            1,
            "{rel}"
        );
    }
    assert_eq!(daemon.stop().code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// Large files
// ---------------------------------------------------------------------------------------

/// Above the threshold (5 MiB here) a file goes in 5 MiB parts, each carrying the
/// Content-MD5 of exactly its bytes; the ACL goes on CreateMultipartUpload.
#[test]
fn large_files_go_in_parts_each_with_its_content_md5() {
    use md5_reference::{Digest, Md5};
    let mut ex = Exchange::new();
    let big = random_bytes(12 * MIB + 4321, 131);
    write_file(&ex.outbox.join("big.bin"), &big);
    ex.start();
    ex.wait_for("big.bin in sent/", || moved_to_sent(&ex, "big.bin"));
    let key = ex.submission_key("big.bin");
    assert_object(&ex, &key, &big);

    let requests = ex.proxy.requests();
    let creates: Vec<_> = requests
        .iter()
        .filter(|r| is_create_multipart_of(r, &key))
        .collect();
    assert_eq!(creates.len(), 1, "{}", ex.proxy.summary());
    assert_eq!(
        creates[0].header("x-amz-acl"),
        Some("bucket-owner-full-control")
    );
    let mut parts: Vec<_> = requests
        .iter()
        .filter(|r| is_upload_part_of(r, &key))
        .collect();
    parts.sort_by_key(|r| part_number(r));
    assert_eq!(
        parts.iter().map(|r| part_number(r)).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(3)],
        "{}",
        ex.proxy.summary()
    );
    for (i, (part, bytes)) in parts.iter().zip(big.chunks(5 * MIB)).enumerate() {
        let expected = aws_smithy_types::base64::encode(Md5::digest(bytes));
        assert_eq!(
            part.header("content-md5"),
            Some(expected.as_str()),
            "Content-MD5 of part {}",
            i + 1
        );
        assert_eq!(part.status, Some(200));
    }
    assert!(
        !requests.iter().any(|r| is_put_object_of(r, &key)),
        "big.bin also went as a single PUT"
    );
}

/// Parts of several big files share 16 slots (upload::PARTS_IN_FLIGHT_TOTAL): three
/// files of 6 parts each at once want 18 UploadParts, and never more than 16 reach the
/// server at once; every file still arrives whole.
#[test]
fn parts_of_several_large_files_share_sixteen_slots() {
    let mut ex = Exchange::new();
    let cap = s3_exchange::upload::PARTS_IN_FLIGHT_TOTAL;
    let wanted = 3 * 6;
    assert!(cap < wanted, "the test needs more parts than the cap");
    let gauge = Arc::new(HeldGauge::default());
    let files: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| {
            (
                format!("big-{i}.bin"),
                random_bytes(6 * 5 * MIB - 11, 300 + i),
            )
        })
        .collect();
    for (name, _) in &files {
        let key = ex.submission_key(name);
        for part in 1..=6u32 {
            let (key, gauge) = (key.clone(), Arc::clone(&gauge));
            ex.proxy.inject(
                move |r: &Recorded| is_upload_part_of(r, &key) && part_number(r) == Some(part),
                Fault::Before(Box::new(move || gauge.hold(wanted, cap))),
                1,
            );
        }
    }
    for (name, bytes) in &files {
        write_file(&ex.outbox.join(name), bytes);
    }
    ex.start();
    ex.wait_for("the three files in sent/", || {
        files.iter().all(|(name, _)| moved_to_sent(&ex, name))
    });
    for (name, bytes) in &files {
        assert_object(&ex, &ex.submission_key(name), bytes);
    }
    assert_eq!(
        gauge.most_held(),
        cap,
        "UploadParts held at once across the three files ({cap} slots)\n{}",
        ex.proxy.summary()
    );
}

/// Parts stream from disk: a 96 MiB file in three 32 MiB parts, all three on the wire at
/// once, leaves the daemon's peak RSS far below what buffering the parts would need
/// (96 MiB on top of the daemon's own ~60-70 MiB in a debug build).
#[test]
fn large_file_parts_stream_from_disk_with_bounded_memory() {
    const LIMIT_KIB: u64 = 128 * 1024;
    let mut ex = Exchange::with(Settings {
        multipart_threshold: "32MiB".into(),
        part_size: "32MiB".into(),
        ..Settings::default()
    });
    let big = random_bytes(96 * MIB, 135);
    write_file(&ex.outbox.join("huge.bin"), &big);
    ex.start();
    wait_long(&ex, "huge.bin in sent/", Duration::from_secs(180), || {
        moved_to_sent(&ex, "huge.bin")
    });
    let peak_kib = proc_status_kib(ex.daemon().pid(), "VmHWM").expect("VmHWM");
    eprintln!(
        "96 MiB in 3 parts: daemon peak RSS (VmHWM) {:.1} MiB",
        peak_kib as f64 / 1024.0
    );
    let key = ex.submission_key("huge.bin");
    assert_eq!(
        count(&ex, &key, is_upload_part_of),
        3,
        "{}",
        ex.proxy.summary()
    );
    assert_object(&ex, &key, &big);
    assert!(
        peak_kib < LIMIT_KIB,
        "daemon peak RSS {peak_kib} KiB while sending 96 MiB: parts are buffered in memory?"
    );
}

/// `kill -9` in the middle of a multipart upload, then a restart: the upload resumes under
/// the same UploadId, sends only what was not recorded, and completes with identical bytes.
///
/// Which parts the daemon had recorded when it died is known from the proxy: it keeps at
/// most `PARTS_IN_FLIGHT` parts in flight and starts part `PARTS_IN_FLIGHT + k` only after
/// k parts were answered and recorded (the ledger is flushed per part), so when part
/// `PARTS_IN_FLIGHT + 2` has started at least 2 are durable.
#[test]
fn a_multipart_upload_killed_mid_way_resumes_without_resending_recorded_parts() {
    /// `upload::PARTS_IN_FLIGHT`.
    const PARTS_IN_FLIGHT: u32 = 8;
    const PARTS: u32 = 20;
    let mut ex = Exchange::new();
    let key = ex.submission_key("resume.bin");
    let bytes = random_bytes(PARTS as usize * 5 * MIB - 1000, 141);
    write_file(&ex.outbox.join("resume.bin"), &bytes);
    ex.start();

    spin_until(&ex, "UploadPart 10 of resume.bin", common::TIMEOUT, || {
        ex.proxy.count(|r| {
            is_upload_part_of(r, &key) && part_number(r).is_some_and(|n| n >= PARTS_IN_FLIGHT + 2)
        }) >= 1
    });
    kill_9(ex.daemon());
    ex.daemon().wait_exit(common::TIMEOUT);
    let before = ex.proxy.requests();
    let before_parts: Vec<&Recorded> = before
        .iter()
        .filter(|r| is_upload_part_of(r, &key))
        .collect();
    let started_max = before_parts
        .iter()
        .filter_map(|r| part_number(r))
        .max()
        .expect("parts were sent");
    assert!(
        !before.iter().any(|r| is_complete_multipart_of(r, &key)),
        "the upload completed before the kill: use a bigger file"
    );
    let upload = upload_id(before_parts[0]).expect("uploadId");
    let answered: Vec<u32> = before_parts
        .iter()
        .filter(|r| r.status == Some(200))
        .filter_map(|r| part_number(r))
        .collect();
    let recorded_at_least = started_max.saturating_sub(PARTS_IN_FLIGHT) as usize;
    assert!(recorded_at_least >= 2, "part {started_max} started");

    ex.start();
    wait_long(
        &ex,
        "resume.bin in sent/ after the restart",
        Duration::from_secs(120),
        || moved_to_sent(&ex, "resume.bin"),
    );
    assert_object(&ex, &key, &bytes);

    let all = ex.proxy.requests();
    let after = &all[before.len()..];
    let summary = ex.proxy.summary();
    assert_eq!(
        count(&ex, &key, is_create_multipart_of),
        1,
        "a second CreateMultipartUpload\n{summary}"
    );
    assert!(
        !after.iter().any(|r| is_abort_multipart_of(r, &key)),
        "the upload was aborted instead of resumed\n{summary}"
    );
    let completes: Vec<_> = after
        .iter()
        .filter(|r| is_complete_multipart_of(r, &key))
        .collect();
    assert_eq!(completes.len(), 1, "{summary}");
    assert_eq!(upload_id(completes[0]), Some(upload.clone()));
    let resent: Vec<u32> = after
        .iter()
        .filter(|r| is_upload_part_of(r, &key))
        .inspect(|r| assert_eq!(upload_id(r), Some(upload.clone()), "{summary}"))
        .filter_map(part_number)
        .collect();
    // Every part not answered before the kill must have been sent now ...
    for n in 1..=PARTS {
        if !answered.contains(&n) {
            assert!(resent.contains(&n), "part {n} was never sent\n{summary}");
        }
    }
    // ... and of the answered ones, the recorded ones (at least `recorded_at_least`) not.
    let answered_and_resent = answered.iter().filter(|n| resent.contains(n)).count();
    assert!(
        answered.len() - answered_and_resent >= recorded_at_least,
        "parts answered before the kill: {answered:?}; sent again after the restart: \
         {resent:?}; at least {recorded_at_least} were recorded and must not go again\n{summary}"
    );
    let mut unique = resent.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        resent.len(),
        "a part went twice after the restart"
    );
    assert!(
        !stderr_lines_with(&ex, &["resuming the multipart upload", "resume.bin"]).is_empty(),
        "no `resuming` line\n{}",
        ex.diagnostics()
    );
    eprintln!(
        "resume: parts started before the kill up to {started_max}, answered {answered:?}; \
         after the restart sent {resent:?}"
    );
}

/// The file changed while the daemon was down in the middle of its multipart upload: the
/// old upload cannot resume, so it is aborted and the file goes afresh with its new bytes.
#[test]
fn an_interrupted_upload_of_a_file_changed_meanwhile_is_aborted_and_started_afresh() {
    let mut ex = Exchange::new();
    let key = ex.submission_key("changed.bin");
    let path = ex.outbox.join("changed.bin");
    write_file(&path, &random_bytes(40 * MIB, 151));
    ex.start();
    spin_until(&ex, "UploadPart 5 of changed.bin", common::TIMEOUT, || {
        ex.proxy
            .count(|r| is_upload_part_of(r, &key) && part_number(r).is_some_and(|n| n >= 5))
            >= 1
    });
    kill_9(ex.daemon());
    ex.daemon().wait_exit(common::TIMEOUT);
    let before = ex.proxy.requests();
    let old = before
        .iter()
        .find(|r| is_upload_part_of(r, &key))
        .and_then(upload_id)
        .expect("uploadId");
    assert!(!before.iter().any(|r| is_complete_multipart_of(r, &key)));

    let new_bytes = random_bytes(11 * MIB + 3, 152);
    write_file(&path, &new_bytes);
    ex.start();
    wait_long(
        &ex,
        "changed.bin in sent/",
        Duration::from_secs(120),
        || moved_to_sent(&ex, "changed.bin"),
    );
    assert_object(&ex, &key, &new_bytes);
    let after = &ex.proxy.requests()[before.len()..];
    let summary = ex.proxy.summary();
    assert!(
        after
            .iter()
            .any(|r| is_abort_multipart_of(r, &key) && upload_id(r) == Some(old.clone())),
        "the old upload was not aborted\n{summary}"
    );
    assert!(
        after
            .iter()
            .filter(|r| is_upload_part_of(r, &key) || is_complete_multipart_of(r, &key))
            .all(|r| upload_id(r) != Some(old.clone())),
        "the old upload was continued with new bytes\n{summary}"
    );
    assert_eq!(
        after
            .iter()
            .filter(|r| is_create_multipart_of(r, &key))
            .count(),
        1,
        "{summary}"
    );
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// A file deleted right after it was dropped (before it settled), and a large file deleted
/// while its parts are on the wire: nothing of the first reaches S3, the second's upload
/// is aborted, neither is retried or logged again and again, and later files still go.
#[test]
fn files_vanishing_before_or_during_the_upload_leave_nothing_behind() {
    let mut ex = Exchange::with(Settings {
        settle: "1s".into(),
        rescan_interval: "1s".into(),
        ..Settings::default()
    });
    ex.start();
    wait_until_watching(&ex);

    // Before settle: written and deleted at once (settle is a whole second).
    write_file(&ex.outbox.join("brief.txt"), b"here and gone\n");
    fs::remove_file(ex.outbox.join("brief.txt")).expect("delete brief.txt");

    // During the upload: deleted while the first of its parts to arrive is held at the
    // proxy, so the upload cannot have completed first. Nine parts of 5 MiB, eight in
    // flight per file: the ninth starts only once a part is done, after the deletion, and
    // must not be sent (the daemon reads through a descriptor opened once, which a
    // deletion does not stop: it checks the name before each part).
    let key = ex.submission_key("doomed.bin");
    let doomed = ex.outbox.join("doomed.bin");
    let deleted = {
        let (key, doomed) = (key.clone(), doomed.clone());
        ex.proxy.inject(
            move |r: &Recorded| is_upload_part_of(r, &key),
            Fault::Before(Box::new(move || {
                fs::remove_file(&doomed).expect("delete doomed.bin");
            })),
            1,
        )
    };
    write_file(&doomed, &random_bytes(45 * MIB, 161));
    spin_until(
        &ex,
        "doomed.bin deleted during its first UploadPart",
        common::TIMEOUT,
        || deleted.count() == 1,
    );
    ex.wait_for("the `transfer` event of doomed.bin", || {
        !stderr_lines_with(&ex, &["transfer", "doomed.bin", "outcome="]).is_empty()
    });
    let event = stderr_lines_with(&ex, &["transfer", "doomed.bin", "outcome="]).remove(0);
    assert!(
        event.contains("outcome=\"vanished\""),
        "a file deleted during its upload must end as `vanished`: {event}"
    );
    let blamed = stderr_lines_with(&ex, &["cannot reach S3"]);
    assert!(
        blamed.is_empty(),
        "a local file vanishing was blamed on S3: {blamed:#?}"
    );
    ex.wait_for("the doomed upload to be aborted", || {
        count(&ex, &key, is_abort_multipart_of) >= 1
    });
    assert_eq!(
        count(&ex, &key, |r, key| is_upload_part_of(r, key)
            && part_number(r) == Some(9)),
        0,
        "the part that started after doomed.bin was deleted was sent anyway"
    );

    write_file(&ex.outbox.join("after.txt"), b"after\n");
    ex.wait_for("after.txt in sent/", || moved_to_sent(&ex, "after.txt"));
    let requests_then = ex.proxy.requests().len();
    let stderr_then = ex.daemon().stderr().lines().count();
    wait_for_rescans(&ex, rescans(&ex), 2);

    assert_eq!(
        keys_written(&ex),
        ["Submissions/after.txt", "Submissions/doomed.bin"],
        "{}",
        ex.proxy.summary()
    );
    assert_eq!(count(&ex, &key, is_complete_multipart_of), 0);
    assert_eq!(ex.owner.list("Submissions/"), ["Submissions/after.txt"]);
    let later: Vec<_> = ex.proxy.requests()[requests_then..]
        .iter()
        .filter(|r| r.key_in(common::BUCKET).is_some())
        .map(Recorded::summary)
        .collect();
    assert!(later.is_empty(), "object requests while idle: {later:#?}");
    let stderr = ex.daemon().stderr();
    let new_lines: Vec<&str> = stderr
        .lines()
        .skip(stderr_then)
        .filter(|l| l.contains("brief.txt") || l.contains("doomed.bin"))
        .collect();
    assert!(
        new_lines.is_empty(),
        "the vanished files are still being talked about: {new_lines:#?}"
    );
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("brief.txt") && (l.contains("ERROR") || l.contains("WARN")))
        .collect();
    assert!(
        complaints.is_empty(),
        "a file deleted before it settled is nothing to warn about: {complaints:#?}"
    );
}

/// A file another process holds a lease on (Samba and knfsd take them) is neither waited
/// for, which would hold a transfer slot, nor given up: the open fails at once and asks
/// the holder to let go, a line says why, and the file goes once the lease is gone. The
/// file is opened before any request: the failed attempt costs no CreateMultipartUpload.
#[test]
fn a_leased_file_goes_once_its_holder_lets_go_and_costs_no_request_before() {
    use std::os::fd::AsRawFd;
    // The holder is told to let go by SIGIO, whose default action ends the process.
    // Ignored for the whole test binary and inherited by the daemons it starts, which do
    // not use SIGIO.
    // SAFETY: ignoring a signal that nothing in the tests handles.
    unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
    let mut ex = Exchange::with(Settings::default());
    ex.start();
    wait_until_watching(&ex);
    let key = ex.submission_key("held.bin");
    let path = ex.outbox.join("held.bin");
    let bytes = random_bytes(12 * MIB, 171);
    // Leased beside the outbox, then renamed in (a rename does not break a lease): the
    // daemon cannot meet the file before the lease.
    let beside = ex.root.join("held.bin");
    write_file(&beside, &bytes);
    let holder = fs::File::open(&beside).expect("open held.bin");
    // SAFETY: fcntl on a descriptor `holder` keeps open.
    let taken = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    assert_eq!(taken, 0, "F_SETLEASE: {}", std::io::Error::last_os_error());
    fs::rename(&beside, &path).expect("rename held.bin into the outbox");

    ex.wait_for("a retry line for held.bin", || {
        !stderr_lines_with(&ex, &["will retry", "held.bin"]).is_empty()
    });
    let line = stderr_lines_with(&ex, &["will retry", "held.bin"]).remove(0);
    assert!(
        line.contains("holds a lease"),
        "the line does not say why: {line}"
    );
    assert_eq!(
        count(&ex, &key, is_create_multipart_of),
        0,
        "a request went out for a file that could not be opened: {}",
        ex.proxy.summary()
    );

    // SAFETY: as above.
    let released = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    assert_eq!(released, 0, "F_UNLCK: {}", std::io::Error::last_os_error());
    drop(holder);
    ex.wait_for("held.bin in sent/", || moved_to_sent(&ex, "held.bin"));
    assert_object(&ex, &key, &bytes);
    assert_eq!(count(&ex, &key, is_create_multipart_of), 1);
    assert_eq!(count(&ex, &key, is_abort_multipart_of), 0);
}

/// An unreadable file. Root reads everything, so here the daemon runs as `nobody` and the
/// file belongs to root with mode 0600: it is quarantined once, with a line that names it,
/// says why and what to do, is left in place and not retried by later rescans, while the
/// other files go. Once the user makes it readable (what the line tells them to do), it
/// goes.
#[test]
fn an_unreadable_file_is_quarantined_with_advice_and_goes_once_readable() {
    use common::outbox::{DaemonAs, NOBODY, hand_folders_to};
    use std::os::unix::fs::PermissionsExt;
    let ex = Exchange::with(quick_rescans());
    let locked = ex.outbox.join("locked.bin");
    let locked_bytes = random_bytes(3000, 191);
    write_file(&ex.outbox.join("open.txt"), b"readable\n");
    hand_folders_to(&ex, NOBODY);
    write_file(&locked, &locked_bytes);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    let daemon = DaemonAs::user(&ex, NOBODY);

    let path = locked.display().to_string();
    daemon.wait_for(
        "open.txt in sent/ and a quarantine line for locked.bin",
        || {
            moved_to_sent(&ex, "open.txt")
                && !daemon.stderr_lines_with(&["quarantined", &path]).is_empty()
        },
    );
    daemon.wait_for_rescans(&ex, daemon.rescans(&ex), 2);
    let lines = daemon.stderr_lines_with(&["quarantined", &path]);
    assert_eq!(
        lines.len(),
        1,
        "quarantine lines for locked.bin: {lines:#?}"
    );
    assert!(
        lines[0].contains("ermission denied") && lines[0].contains("readable"),
        "the line does not say why and what to do: {}",
        lines[0]
    );
    assert_eq!(read_file(&locked), Some(locked_bytes.clone()));
    let key = ex.submission_key("locked.bin");
    assert!(!keys_written(&ex).contains(&key), "{}", ex.proxy.summary());

    // The user does what the line says. Only the permissions change (not size, mtime or
    // inode): the daemon must still notice.
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o644)).expect("chmod 644");
    daemon.wait_for("locked.bin in sent/ once readable", || {
        moved_to_sent(&ex, "locked.bin")
    });
    assert_object(&ex, &key, &locked_bytes);
}

/// `sent/report.csv` already exists: the new `report.csv` lands beside it under a clear,
/// timestamped name; neither is lost.
#[test]
fn an_after_upload_collision_keeps_both_files() {
    let mut ex = Exchange::new();
    let old = b"id,total\n1,10\n".to_vec();
    let new = b"id,total\n1,10\n2,20\n".to_vec();
    write_file(&ex.sent.join("report.csv"), &old);
    write_file(&ex.outbox.join("report.csv"), &new);
    ex.start();
    ex.wait_for("report.csv to leave the outbox", || {
        files_under(&ex.outbox).is_empty()
    });
    assert_object(&ex, "Submissions/report.csv", &new);
    let sent = files_under(&ex.sent);
    assert_eq!(sent.len(), 2, "sent/: {sent:?}\n{}", ex.diagnostics());
    assert_eq!(read_file(&ex.sent.join("report.csv")), Some(old));
    let beside = sent
        .iter()
        .find(|name| *name != "report.csv")
        .expect("a second file");
    // report.<UTC time>.csv, e.g. report.2026-11-18T11-06-40Z.csv
    let tag = beside
        .strip_prefix("report.")
        .and_then(|rest| rest.strip_suffix(".csv"))
        .unwrap_or_else(|| panic!("{beside} is not report.<time>.csv"));
    assert!(
        tag.len() >= 20 && tag.starts_with("20") && tag.contains('T') && tag.contains('Z'),
        "{beside} does not carry a UTC time"
    );
    assert_eq!(read_file(&ex.sent.join(beside)), Some(new));
}

/// A daemon killed while it took a sent file away leaves the file under its hidden claim
/// name (`.NAME.s3-exchange-claim`, see `src/claim.rs`): the next start gives it its name
/// back and sends it. A claim name is never sent as it is, even with no ignore patterns,
/// and one that appears while the daemon runs is a live claim: left alone.
#[test]
fn a_sent_file_left_under_its_claim_name_gets_its_name_back_and_goes() {
    let mut ex = Exchange::new();
    ex.write_config(&with_outbox_lines(&ex.config_text(), "ignore = []"));
    let left = random_bytes(10_000, 905);
    write_file(&ex.outbox.join("sub/.report.csv.s3-exchange-claim"), &left);
    ex.start();
    ex.wait_for("sub/report.csv sent", || {
        ex.sent.join("sub/report.csv").exists()
    });
    assert_object(&ex, &ex.submission_key("sub/report.csv"), &left);
    assert!(
        stderr_lines_with(&ex, &["gave back the name", "report.csv"]).len() == 1,
        "no line says the name was given back\n{}",
        ex.diagnostics()
    );

    // While it runs: a claim name is not a file to send, nor a leftover.
    let live = ex.outbox.join(".live.csv.s3-exchange-claim");
    write_file(&live, b"a claim of a running daemon\n");
    write_file(&ex.outbox.join("after.csv"), b"dropped after the claim\n");
    ex.wait_for("after.csv sent", || ex.sent.join("after.csv").exists());
    ex.stop_cleanly();
    let claims = ex.proxy.count(|r| {
        is_put_object(r)
            && r.key_in(common::BUCKET)
                .is_some_and(|k| k.contains("s3-exchange-claim"))
    });
    assert_eq!(claims, 0, "a claim name was sent\n{}", ex.proxy.summary());
    assert_eq!(files_under(&ex.outbox), [".live.csv.s3-exchange-claim"]);
}

/// A claim left by a daemon killed after the upload was recorded and before the move: the
/// next start gives the file its name back, finds its upload on record with the same
/// stamp, and moves it to the sent folder without a second upload.
#[test]
fn a_leftover_claim_whose_upload_is_on_record_is_moved_without_a_second_upload() {
    let mut ex = Exchange::with(Settings {
        after_upload: "keep".into(),
        ..Settings::default()
    });
    let bytes = random_bytes(10_000, 906);
    write_file(&ex.outbox.join("report.csv"), &bytes);
    let key = ex.submission_key("report.csv");
    ex.start();
    ex.wait_for("the upload of report.csv on record", || {
        !stderr_lines_with(&ex, &[" transfer ", key.as_str(), "outcome=\"ok\""]).is_empty()
    });
    ex.stop_cleanly();
    // What the kill leaves: the sent file under its claim name (a rename keeps its stamp).
    fs::rename(
        ex.outbox.join("report.csv"),
        ex.outbox.join(".report.csv.s3-exchange-claim"),
    )
    .expect("claim");
    ex.write_config(&with_outbox_value(
        &ex.config_text(),
        "after_upload",
        "\"move\"",
    ));
    ex.start();
    ex.wait_for("report.csv in the sent folder", || {
        ex.sent.join("report.csv").exists()
    });
    ex.stop_cleanly();
    assert_eq!(read_file(&ex.sent.join("report.csv")), Some(bytes));
    assert!(
        files_under(&ex.outbox).is_empty(),
        "{:?}",
        files_under(&ex.outbox)
    );
    let puts = ex.proxy.count(|r| is_put_object_of(r, &key));
    assert_eq!(puts, 1, "report.csv was sent again\n{}", ex.proxy.summary());
}

/// The sent folder becomes unusable (a regular file where the folder was; root can't
/// create folders under a file either): the upload is recorded once, the file stays in
/// the outbox, the log says what happened and what to do, and the file is NOT uploaded
/// again while only the move is retried. Once the folder is back, the file moves there,
/// still without a second upload.
#[test]
fn an_unusable_sent_folder_keeps_the_file_and_never_uploads_it_twice() {
    let mut ex = Exchange::with(quick_rescans());
    // At start-up the daemon refuses a sent folder it cannot create, naming it.
    let blocker = ex.root.join("blocker");
    write_file(&blocker, b"a regular file\n");
    let impossible = blocker.join("sent");
    ex.write_config(&with_outbox_value(
        &ex.config_text(),
        "sent_dir",
        &format!("\"{}\"", impossible.display()),
    ));
    ex.start();
    let status = ex.daemon().wait_exit(common::TIMEOUT);
    let stderr = ex.daemon().stderr();
    assert_eq!(status.code(), Some(73), "exit status\n{stderr}");
    assert!(
        stderr.contains(&impossible.display().to_string()),
        "stderr does not name the sent folder:\n{stderr}"
    );

    // While running: the sent folder is replaced by a file.
    ex.write_config(&ex.config_text());
    ex.start();
    wait_until_watching(&ex);
    fs::remove_dir(&ex.sent).expect("remove sent/");
    write_file(&ex.sent, b"not a folder\n");
    let bytes = random_bytes(10_000, 171);
    write_file(&ex.outbox.join("sub/report.csv"), &bytes);
    let key = ex.submission_key("sub/report.csv");
    ex.wait_for("the PUT of sub/report.csv", || {
        ex.proxy
            .count(|r| is_put_object_of(r, &key) && r.status == Some(200))
            == 1
    });
    let sent_dir = ex.sent.display().to_string();
    ex.wait_for("two retries of the move", || {
        stderr_lines_with(&ex, &["will retry", "report.csv", "after_upload failed"]).len() >= 2
    });
    wait_for_rescans(&ex, rescans(&ex), 2);
    assert_eq!(
        count(&ex, &key, is_put_object_of),
        1,
        "uploaded again while the sent folder was unusable\n{}",
        ex.proxy.summary()
    );
    assert_eq!(
        read_file(&ex.outbox.join("sub/report.csv")),
        Some(bytes.clone())
    );
    let lines = stderr_lines_with(&ex, &["after_upload failed", "report.csv"]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&sent_dir) && l.contains("writable")),
        "no line naming the sent folder and what to check: {lines:#?}"
    );
    assert_object(&ex, &key, &bytes);

    // The user fixes it: the file moves on the next retry, without another upload.
    fs::remove_file(&ex.sent).expect("remove the blocking file");
    fs::create_dir(&ex.sent).expect("recreate sent/");
    ex.wait_for("sub/report.csv in sent/", || {
        moved_to_sent(&ex, "sub/report.csv")
    });
    assert_eq!(read_file(&ex.sent.join("sub/report.csv")), Some(bytes));
    assert_eq!(
        count(&ex, &key, is_put_object_of),
        1,
        "{}",
        ex.proxy.summary()
    );
}

/// The sent folder is full (a 64 KiB tmpfs the daemon alone sees, so the move to it is a
/// copy across file systems): the upload is recorded once, the file stays whole in the
/// outbox, the log says what to check, only the move is retried, and no partial copy is
/// left in the sent folder.
#[test]
fn a_full_sent_folder_keeps_the_file_and_leaves_no_partial_copy() {
    use common::outbox::DaemonAs;
    let ex = Exchange::with(quick_rescans());
    let bytes = random_bytes(200 * 1024, 201);
    write_file(&ex.outbox.join("big.csv"), &bytes);
    let daemon = DaemonAs::with_small_sent_folder(&ex, 64);
    let key = ex.submission_key("big.csv");
    daemon.wait_for("the PUT of big.csv", || {
        ex.proxy
            .count(|r| is_put_object_of(r, &key) && r.status == Some(200))
            == 1
    });
    daemon.wait_for("two retries of the move", || {
        daemon
            .stderr_lines_with(&["will retry", "big.csv", "after_upload failed"])
            .len()
            >= 2
    });
    daemon.wait_for_rescans(&ex, daemon.rescans(&ex), 2);

    assert_eq!(
        count(&ex, &key, is_put_object_of),
        1,
        "uploaded again while the sent folder was full\n{}",
        ex.proxy.summary()
    );
    assert_object(&ex, &key, &bytes);
    assert_eq!(read_file(&ex.outbox.join("big.csv")), Some(bytes));
    let lines = daemon.stderr_lines_with(&["after_upload failed", "big.csv"]);
    assert!(
        lines.iter().any(|l| l.contains("space")),
        "no line saying to check the sent folder's space: {lines:#?}"
    );
    let sent_dir = daemon.seen_by_daemon(&ex.sent);
    let left: Vec<String> = files_under(&sent_dir)
        .into_iter()
        .map(|name| {
            let len = fs::metadata(sent_dir.join(&name)).map_or(0, |m| m.len());
            format!("{name} ({len} of {} bytes)", 200 * 1024)
        })
        .collect();
    assert!(
        left.is_empty(),
        "partial copies left in the full sent folder: {left:?}"
    );
}

/// A file the server refuses every time with a 500 (s3s-fs cannot store a key whose
/// base64 exceeds a file name, a handy fault that needs no fault injector) is retried with
/// growing, jittered backoff (1 s, 2 s, 4 s, ...), stays in the outbox, and never holds up
/// the files dropped after it. SDK-level retries are off (`max_attempts = 1`) so that each
/// attempt of the daemon is one request.
#[test]
fn a_file_the_server_keeps_refusing_is_retried_with_growing_backoff_and_stalls_nothing() {
    let mut ex = Exchange::with(quick_rescans());
    ex.write_config(&with_table_lines(
        &ex.config_text(),
        "transfer",
        "max_attempts = 1",
    ));
    let refused = format!("{}.txt", "r".repeat(200));
    write_file(&ex.outbox.join(&refused), b"the server says 500\n");
    ex.start();
    let path = ex.outbox.join(&refused).display().to_string();
    ex.wait_for("its third retry to be scheduled", || {
        !stderr_lines_with(&ex, &["will retry", &path, "attempts=3"]).is_empty()
    });
    let good: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            (
                format!("after/{i}.dat"),
                random_bytes(500 + i, 210 + i as u64),
            )
        })
        .collect();
    for (rel, bytes) in &good {
        write_file(&ex.outbox.join(rel), bytes);
    }
    ex.wait_for("the files dropped after it in sent/", || {
        good.iter().all(|(rel, _)| moved_to_sent(&ex, rel))
    });
    for (rel, bytes) in &good {
        assert_object(&ex, &ex.submission_key(rel), bytes);
    }

    let delay = |attempt: u32| -> u64 {
        let line = stderr_lines_with(&ex, &["will retry", &path, &format!("attempts={attempt} ")])
            .pop()
            .unwrap_or_else(|| panic!("no retry line for attempt {attempt}"));
        line.split("retry_in_ms=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("no retry_in_ms in {line}"))
    };
    let (first, second, third) = (delay(1), delay(2), delay(3));
    assert!(
        (500..=1000).contains(&first) && first < second && second < third && third <= 4000,
        "backoff delays {first} ms, {second} ms, {third} ms: expected about 1 s, 2 s, 4 s"
    );
    // One PUT per attempt (SDK retries are off): as many as retries were scheduled, plus
    // the one that may be on the wire now.
    let key = ex.submission_key(&refused);
    let retries = stderr_lines_with(&ex, &["will retry", &path]).len();
    let puts = count(&ex, &key, is_put_object_of);
    assert!(
        (retries..=retries + 1).contains(&puts),
        "{puts} PUTs of the refused file for {retries} scheduled retries"
    );
    assert!(
        ex.outbox.join(&refused).exists(),
        "the refused file left the outbox"
    );
}

/// Permanent refusals, as AWS words them, injected by the proxy in front of the real
/// server for three files (no server here disables ACLs or checks bucket names per request):
/// AccessDenied on a PUT, AccessControlListNotSupported on the CreateMultipartUpload of a
/// large file (the ACL goes there) and InvalidBucketName. Each file is quarantined once with
/// the likely cause and the setting to check, stays in the outbox, is not tried again by
/// later walks, and stalls none of the files dropped with it. Once the cause is gone, a
/// change to the file sends it.
#[test]
fn permanently_refused_files_are_quarantined_with_the_likely_cause_and_the_others_go() {
    let mut ex = Exchange::with(quick_rescans());
    // (file, status, code, message, what the line must point the user to)
    let refusals: [(&str, u16, &'static str, &'static str, &str); 3] = [
        (
            "denied.txt",
            403,
            "AccessDenied",
            "Access Denied",
            "bucket policy",
        ),
        (
            "no-acls.bin",
            400,
            "AccessControlListNotSupported",
            "The bucket does not allow ACLs",
            "s3.acl",
        ),
        (
            "bad-bucket.txt",
            400,
            "InvalidBucketName",
            "The specified bucket is not valid.",
            "s3.bucket",
        ),
    ];
    let mut faults = Vec::new();
    for (rel, status, code, message, _) in refusals {
        let key = ex.submission_key(rel);
        let creates = move |r: &Recorded| {
            r.key_in(common::BUCKET).as_deref() == Some(key.as_str())
                && ((r.method == "PUT" && !r.has_query_param("partNumber"))
                    || (r.method == "POST" && r.has_query_param("uploads")))
        };
        let fault = Fault::Error {
            status,
            code,
            message,
        };
        faults.push(ex.proxy.inject(creates, fault, usize::MAX));
        let bytes = if rel.ends_with(".bin") {
            random_bytes(6 * MIB + 3, 230)
        } else {
            rel.as_bytes().to_vec()
        };
        write_file(&ex.outbox.join(rel), &bytes);
    }
    let good: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            (
                format!("good/{i}.dat"),
                random_bytes(700 + i, 240 + i as u64),
            )
        })
        .collect();
    for (rel, bytes) in &good {
        write_file(&ex.outbox.join(rel), bytes);
    }
    ex.start();

    let quarantined = |rel: &str| {
        let path = ex.outbox.join(rel).display().to_string();
        stderr_lines_with(&ex, &["quarantined", &path])
    };
    ex.wait_for("the three refused files quarantined", || {
        refusals
            .iter()
            .all(|(rel, ..)| !quarantined(rel).is_empty())
    });
    ex.wait_for("the good files in sent/", || {
        good.iter().all(|(rel, _)| moved_to_sent(&ex, rel))
    });
    for (rel, bytes) in &good {
        assert_object(&ex, &ex.submission_key(rel), bytes);
    }
    let walks = rescans(&ex);
    wait_for_rescans(&ex, walks, 2);
    for ((rel, _, code, _, advice), fault) in refusals.iter().zip(&faults) {
        let lines = quarantined(rel);
        assert_eq!(lines.len(), 1, "{rel}: {lines:#?}\n{}", ex.diagnostics());
        assert!(
            lines[0].contains(code) && lines[0].contains(advice),
            "{rel}: the line must say {code} and point to {advice}: {}",
            lines[0]
        );
        assert_eq!(
            fault.count(),
            1,
            "{rel} was tried again although the refusal is permanent\n{}",
            ex.proxy.summary()
        );
        assert!(ex.outbox.join(rel).exists(), "{rel} left the outbox");
    }
    assert_eq!(
        ex.owner.list("Submissions/").len(),
        good.len(),
        "{}",
        ex.proxy.summary()
    );

    // The owner fixes the policy; the user touches the file: it goes.
    ex.proxy.clear_faults();
    append(&ex.outbox.join("denied.txt"), b" now allowed\n");
    ex.wait_for("denied.txt in sent/", || moved_to_sent(&ex, "denied.txt"));
    assert_object(
        &ex,
        &ex.submission_key("denied.txt"),
        b"denied.txt now allowed\n",
    );
}

// ---------------------------------------------------------------------------------------
// Again and again
// ---------------------------------------------------------------------------------------

/// The same name dropped again with new content (even of the same size) goes again and
/// replaces the key; both versions end up in the sent folder.
#[test]
fn the_same_name_dropped_again_is_sent_again_and_replaces_the_key() {
    let mut ex = Exchange::new();
    let v1 = b"version 1 of the claim\n".to_vec();
    let v2 = b"version 2 of the claim\n".to_vec();
    assert_eq!(v1.len(), v2.len());
    write_file(&ex.outbox.join("claim.txt"), &v1);
    ex.start();
    ex.wait_for("claim.txt v1 in sent/", || moved_to_sent(&ex, "claim.txt"));
    assert_object(&ex, "Submissions/claim.txt", &v1);

    write_file(&ex.outbox.join("claim.txt"), &v2);
    ex.wait_for("claim.txt v2 to leave the outbox", || {
        files_under(&ex.outbox).is_empty() && files_under(&ex.sent).len() == 2
    });
    assert_object(&ex, "Submissions/claim.txt", &v2);
    assert_eq!(count(&ex, "Submissions/claim.txt", is_put_object_of), 2);
    assert_eq!(read_file(&ex.sent.join("claim.txt")), Some(v1));
    let beside = files_under(&ex.sent)
        .into_iter()
        .find(|n| n != "claim.txt")
        .expect("the second version beside the first");
    assert_eq!(read_file(&ex.sent.join(beside)), Some(v2));
}

/// With `after_upload = "keep"` a sent file stays and is not sent again by later rescans
/// (nor after a restart: the ledger remembers it); rewritten in place with new content of
/// the same size, it goes again and replaces the key.
#[test]
fn a_kept_file_goes_again_only_when_its_content_changes() {
    let mut ex = Exchange::with(Settings {
        after_upload: "keep".into(),
        rescan_interval: "1s".into(),
        ..Settings::default()
    });
    let key = ex.submission_key("kept.txt");
    let v1 = b"kept, version 1\n".to_vec();
    let v2 = b"kept, version 2\n".to_vec();
    write_file(&ex.outbox.join("kept.txt"), &v1);
    ex.start();
    ex.wait_for("the PUT of kept.txt", || {
        ex.proxy
            .count(|r| is_put_object_of(r, &key) && r.status == Some(200))
            == 1
    });
    wait_for_rescans(&ex, rescans(&ex), 2);
    assert_eq!(
        count(&ex, &key, is_put_object_of),
        1,
        "sent again unchanged"
    );
    ex.stop_cleanly();

    ex.start();
    wait_for_rescans(&ex, 0, 3);
    assert_eq!(
        count(&ex, &key, is_put_object_of),
        1,
        "sent again after a restart"
    );

    write_file(&ex.outbox.join("kept.txt"), &v2);
    ex.wait_for("the second PUT of kept.txt", || {
        ex.proxy
            .count(|r| is_put_object_of(r, &key) && r.status == Some(200))
            == 2
    });
    assert_object(&ex, &key, &v2);
    assert_eq!(read_file(&ex.outbox.join("kept.txt")), Some(v2));
}

/// One bad file never stalls the others: a FIFO (opening it would block forever), a file
/// that never stops growing, and a name that cannot be a key sit in the outbox while 30
/// good files, dropped after them, all go. The growing file goes once its writer stops.
#[test]
fn one_bad_file_never_stalls_the_others() {
    let mut ex = Exchange::with(quick_rescans());
    common::outbox::mkfifo(&ex.outbox.join("pipe"));
    write_file(
        &ex.outbox
            .join(PathBuf::from(OsStr::from_bytes(b"bad-\xff.txt"))),
        b"bad name\n",
    );
    let growing = ex.outbox.join("growing.log");
    write_file(&growing, b"");

    // Appends a line every 50 ms (settle is 300 ms) through one open handle, from before
    // the daemon starts, and records the longest gap it actually managed: a machine that
    // stalled it for the settle time entitled the daemon to take the file for complete.
    let stop = Arc::new(AtomicBool::new(false));
    let max_gap_ms = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, max_gap_ms) = (Arc::clone(&stop), Arc::clone(&max_gap_ms));
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&growing)
            .expect("open growing.log");
        thread::spawn(move || {
            let mut written = Vec::new();
            let mut last = Instant::now();
            for n in 0u32.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let line = format!("line {n}\n");
                file.write_all(line.as_bytes())
                    .expect("append to growing.log");
                written.extend_from_slice(line.as_bytes());
                let gap = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
                max_gap_ms.fetch_max(gap, Ordering::SeqCst);
                last = Instant::now();
                thread::sleep(Duration::from_millis(50));
            }
            written
        })
    };
    let stalled = || Duration::from_millis(max_gap_ms.load(Ordering::SeqCst)) >= SETTLE;
    ex.start();
    wait_until_watching(&ex);

    let good: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            (
                format!("good/{i:02}.dat"),
                random_bytes(1000 + i, 180 + i as u64),
            )
        })
        .collect();
    for (rel, bytes) in &good {
        write_file(&ex.outbox.join(rel), bytes);
    }
    ex.wait_for("all 30 good files in sent/", || {
        good.iter().all(|(rel, _)| moved_to_sent(&ex, rel))
    });
    assert!(
        ex.outbox.join("growing.log").exists() || stalled(),
        "growing.log went while it was still being written"
    );
    stop.store(true, Ordering::SeqCst);
    let growing_bytes = writer.join().expect("writer thread");
    ex.wait_for("growing.log in sent/", || moved_to_sent(&ex, "growing.log"));

    for (rel, bytes) in &good {
        assert_object(&ex, &ex.submission_key(rel), bytes);
    }
    if stalled() {
        eprintln!(
            "the writer of growing.log stalled for the settle time: its bytes are not checked"
        );
    } else {
        assert_object(&ex, "Submissions/growing.log", &growing_bytes);
        assert_eq!(
            count(&ex, "Submissions/growing.log", is_put_object_of),
            1,
            "growing.log went before its writer stopped\n{}",
            ex.proxy.summary()
        );
    }
    let pipe = ex.outbox.join("pipe").display().to_string();
    let lines = stderr_lines_with(&ex, &["skipped", &pipe]);
    assert_eq!(lines.len(), 1, "{lines:#?}\n{}", ex.diagnostics());
    assert!(lines[0].contains("not a regular file"), "{}", lines[0]);
    assert!(!keys_written(&ex).iter().any(|k| k.contains("pipe")));
    ex.stop_cleanly();
}
