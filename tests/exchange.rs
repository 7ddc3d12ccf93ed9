//! End-to-end behaviour of the real `s3-exchange` binary against a real S3 server (s3s-fs,
//! in process), seen through a recording proxy and checked from the bucket owner's side.

mod common;

use std::fs;
use std::time::Duration;

use common::{
    Exchange, Settings, assert_same_bytes, files_under, random_bytes, read_file, write_file,
    write_slowly,
};

const MIB: usize = 1024 * 1024;

/// The `settle` of the default settings, to judge whether a slow writer was slow enough.
const SETTLE: Duration = Duration::from_millis(300);

/// Whether `r` is a PutObject (a PUT of a key that is not an UploadPart).
fn is_put_object(r: &common::Recorded) -> bool {
    r.method == "PUT"
        && r.key_in(common::BUCKET).is_some()
        && !r.has_query_param("partNumber")
        && !r.has_query_param("uploadId")
}

/// Whether `r` is a CreateMultipartUpload.
fn is_create_multipart(r: &common::Recorded) -> bool {
    r.method == "POST" && r.key_in(common::BUCKET).is_some() && r.has_query_param("uploads")
}

/// Whether `r` is an UploadPart of `key`.
fn is_upload_part_of(r: &common::Recorded, key: &str) -> bool {
    r.method == "PUT"
        && r.key_in(common::BUCKET).as_deref() == Some(key)
        && r.has_query_param("partNumber")
}

/// The length of the object a PUT sends: `x-amz-decoded-content-length` for aws-chunked
/// bodies, otherwise `content-length`.
fn body_length(r: &common::Recorded) -> Option<u64> {
    r.header("x-amz-decoded-content-length")
        .or_else(|| r.header("content-length"))
        .and_then(|v| v.parse().ok())
}

/// Whether `stderr` names line `line` of `path`: `line N` (as toml reports it) or `path:N`,
/// with no further digit after N.
fn names_line(stderr: &str, path: &str, line: usize) -> bool {
    [format!("line {line}"), format!("{path}:{line}")]
        .iter()
        .any(|needle| {
            stderr.match_indices(needle.as_str()).any(|(at, _)| {
                !stderr[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit())
            })
        })
}

#[test]
fn outbox_files_arrive_whole_with_the_acl_and_leave_the_outbox() {
    let mut ex = Exchange::new();
    let small = b"order 4711: 3 crates, deliver to dock B\n".to_vec();
    // Above the 5 MiB threshold and not a multiple of the part size: 3 parts, the last short.
    let big = random_bytes(12 * MIB + 4321, 1);
    let nested = random_bytes(70_000, 2);
    let slow = random_bytes(600_000, 3);

    // Present before start: found by the start-up scan.
    write_file(&ex.outbox.join("a.txt"), &small);
    write_file(&ex.outbox.join("big.bin"), &big);
    ex.start();
    ex.wait_for("a.txt to leave the outbox (the daemon is up)", || {
        !ex.outbox.join("a.txt").exists()
    });

    // Created while the daemon runs: a brand-new folder tree, and a file written in chunks
    // 100 ms apart (settle is 300 ms), which must arrive only in its final form.
    write_file(&ex.outbox.join("sub/dir/c.txt"), &nested);
    let writer = write_slowly(
        ex.outbox.join("slow.dat"),
        slow.clone(),
        15,
        Duration::from_millis(100),
    );
    let slow_write = writer.join().expect("the slow writer thread");

    let expected: Vec<(&str, &[u8])> = vec![
        ("a.txt", &small),
        ("big.bin", &big),
        ("slow.dat", &slow),
        ("sub/dir/c.txt", &nested),
    ];
    let rels: Vec<String> = expected.iter().map(|(rel, _)| rel.to_string()).collect();
    ex.wait_for("every file to move from the outbox to sent/", || {
        files_under(&ex.outbox).is_empty() && files_under(&ex.sent) == rels
    });

    let context = ex.diagnostics();
    for (rel, bytes) in &expected {
        let key = ex.submission_key(rel);
        let uploaded = ex.owner.get(&key);
        if *rel == "slow.dat" && slow_write.max_gap >= SETTLE {
            // The writer stalled longer than the settle time, so the daemon may rightly have
            // taken a prefix for the whole file. Only a prefix can be demanded then.
            eprintln!(
                "slow writer stalled {:?} (>= settle): checking only a prefix",
                slow_write.max_gap
            );
            let uploaded = uploaded.expect("slow.dat uploaded");
            assert!(
                slow.starts_with(&uploaded),
                "{key} is not a prefix of what was written\n{context}"
            );
        } else {
            assert_same_bytes(
                &format!("object {key}"),
                uploaded.as_deref(),
                bytes,
                &context,
            );
        }
        assert_same_bytes(
            &format!("sent/{rel}"),
            read_file(&ex.sent.join(rel)).as_deref(),
            bytes,
            &context,
        );
    }
    assert_eq!(
        ex.owner.list("Submissions/"),
        rels.iter()
            .map(|rel| ex.submission_key(rel))
            .collect::<Vec<_>>(),
        "keys under Submissions/\n{context}"
    );

    // The ACL is on every request that creates an object, and both kinds were exercised.
    let requests = ex.proxy.requests();
    if slow_write.max_gap < SETTLE {
        // Arriving whole in the end is not enough: an upload of the half-written file would
        // already have shown the owner a truncated file.
        let slow_key = ex.submission_key("slow.dat");
        let slow_puts: Vec<_> = requests
            .iter()
            .filter(|r| {
                is_put_object(r) && r.key_in(common::BUCKET).as_deref() == Some(slow_key.as_str())
            })
            .collect();
        assert!(!slow_puts.is_empty(), "no PutObject of {slow_key}");
        for r in slow_puts {
            assert_eq!(
                body_length(r),
                Some(slow.len() as u64),
                "slow.dat was uploaded before it was complete: {}\n{context}",
                r.summary()
            );
        }
    }
    let creating: Vec<_> = requests
        .iter()
        .filter(|r| is_put_object(r) || is_create_multipart(r))
        .collect();
    assert!(
        requests.iter().any(is_put_object),
        "no PutObject seen:\n{}",
        ex.proxy.summary()
    );
    assert!(
        requests.iter().any(is_create_multipart),
        "no CreateMultipartUpload seen:\n{}",
        ex.proxy.summary()
    );
    for r in &creating {
        assert_eq!(
            r.header("x-amz-acl"),
            Some("bucket-owner-full-control"),
            "x-amz-acl on {}",
            r.summary()
        );
    }
    // big.bin went up in parts (5 MiB threshold and part size): at least its 3 parts.
    let big_key = ex.submission_key("big.bin");
    let parts = requests
        .iter()
        .filter(|r| is_upload_part_of(r, &big_key))
        .count();
    assert!(
        parts >= 3,
        "big.bin: {parts} UploadPart requests, expected at least 3\n{context}"
    );

    ex.assert_no_forbidden_calls();
    ex.stop_cleanly();
}

#[test]
fn acl_none_sends_no_acl_header_at_all() {
    let mut ex = Exchange::with(Settings {
        acl: "none".into(),
        ..Settings::default()
    });
    let small = b"no ACL here\n".to_vec();
    let big = random_bytes(6 * MIB + 17, 11);
    write_file(&ex.outbox.join("plain.txt"), &small);
    write_file(&ex.outbox.join("multi.bin"), &big);
    ex.start();
    ex.wait_for("both files to leave the outbox", || {
        files_under(&ex.outbox).is_empty()
    });

    let context = ex.diagnostics();
    let key = ex.submission_key("plain.txt");
    assert_same_bytes(
        &format!("object {key}"),
        ex.owner.get(&key).as_deref(),
        &small,
        &context,
    );
    let key = ex.submission_key("multi.bin");
    assert_same_bytes(
        &format!("object {key}"),
        ex.owner.get(&key).as_deref(),
        &big,
        &context,
    );

    let requests = ex.proxy.requests();
    assert!(
        requests.iter().any(is_create_multipart),
        "multi.bin did not go multipart:\n{}",
        ex.proxy.summary()
    );
    for r in &requests {
        assert!(
            r.header("x-amz-acl").is_none(),
            "x-amz-acl {:?} sent although acl = \"none\": {}",
            r.header("x-amz-acl"),
            r.summary()
        );
    }
    ex.assert_no_forbidden_calls();
    ex.stop_cleanly();
}

#[test]
fn deliveries_arrive_once_across_restarts_and_changes_arrive_again() {
    let mut ex = Exchange::new();
    let report = b"result,value\nalpha,1\nbeta,2\n".to_vec();
    let blob = random_bytes(3 * MIB + 12_345, 21);
    let report_key = ex.delivery_key("results/report.out");
    ex.owner.put(&report_key, &report);
    ex.owner.put(&ex.delivery_key("a.bin"), &blob);

    ex.start();
    let report_path = ex.inbox.join("results/report.out");
    ex.wait_for("both deliveries in the inbox", || {
        report_path.exists() && ex.inbox.join("a.bin").exists()
    });
    let context = ex.diagnostics();
    assert_same_bytes(
        "inbox/results/report.out",
        read_file(&report_path).as_deref(),
        &report,
        &context,
    );
    assert_same_bytes(
        "inbox/a.bin",
        read_file(&ex.inbox.join("a.bin")).as_deref(),
        &blob,
        &context,
    );
    ex.assert_inbox_holds(&["a.bin", "results/report.out"]);
    ex.stop_cleanly();

    // Restart: the ledger, not a re-download, says both are done.
    let gets = ex.delivery_gets();
    let lists = ex.delivery_lists();
    ex.start();
    ex.wait_for_polls(lists, 2);
    assert_eq!(
        ex.delivery_gets(),
        gets,
        "deliveries fetched again after a restart\n{}",
        ex.diagnostics()
    );

    // The user takes the file away: that is not a reason to fetch it again.
    fs::rename(&report_path, ex.root.join("report-taken-by-user.out"))
        .expect("move the report out of the inbox");
    let lists = ex.delivery_lists();
    ex.wait_for_polls(lists, 2);
    assert_eq!(
        ex.delivery_gets(),
        gets,
        "a moved-away delivery was fetched again\n{}",
        ex.diagnostics()
    );
    assert!(
        !report_path.exists(),
        "a moved-away delivery reappeared\n{}",
        ex.diagnostics()
    );

    // A changed object (new ETag; a different size so s3s-fs's size+LastModified token
    // changes even within the same second) is fetched again.
    let report2 = b"result,value\nalpha,1\nbeta,2\ngamma,3 (corrected)\n".to_vec();
    ex.owner.put(&report_key, &report2);
    ex.wait_for("the changed report in the inbox", || report_path.exists());
    let context = ex.diagnostics();
    assert_same_bytes(
        "inbox/results/report.out (changed)",
        read_file(&report_path).as_deref(),
        &report2,
        &context,
    );
    assert!(
        ex.delivery_gets() > gets,
        "changed report arrived without a GET?\n{context}"
    );
    ex.assert_inbox_holds(&["a.bin", "results/report.out"]);

    ex.assert_no_forbidden_calls();
    ex.stop_cleanly();
}

#[test]
fn a_local_copy_the_user_changed_is_kept_beside_the_new_version() {
    let mut ex = Exchange::new();
    let v1 = b"keep me: version 1\n".to_vec();
    let users = b"the user's own notes, which must survive\n".to_vec();
    let v2 = b"keep me: version 2 from the owner, longer\n".to_vec();
    let key = ex.delivery_key("keep.txt");
    let keep = ex.inbox.join("keep.txt");

    ex.owner.put(&key, &v1);
    ex.start();
    ex.wait_for("keep.txt in the inbox", || keep.exists());
    assert_same_bytes(
        "inbox/keep.txt",
        read_file(&keep).as_deref(),
        &v1,
        &ex.diagnostics(),
    );

    // Let the daemon finish with that download (record it in the ledger) before the user
    // edits: what is tested here is "keep both", not a race with the download.
    ex.wait_for_polls(ex.delivery_lists(), 2);
    fs::write(&keep, &users).expect("the user edits inbox/keep.txt");
    ex.owner.put(&key, &v2);
    let beside = || {
        files_under(&ex.inbox).into_iter().find(|name| {
            name != "keep.txt"
                && !name.contains('/')
                && name.starts_with("keep")
                && name.ends_with(".txt")
        })
    };
    ex.wait_for("the new version of keep.txt beside the user's copy", || {
        beside().is_some()
    });
    let beside = beside().expect("found above");

    let context = ex.diagnostics();
    assert_same_bytes(
        "inbox/keep.txt (the user's copy)",
        read_file(&keep).as_deref(),
        &users,
        &context,
    );
    assert_same_bytes(
        &format!("inbox/{beside}"),
        read_file(&ex.inbox.join(&beside)).as_deref(),
        &v2,
        &context,
    );
    ex.assert_inbox_holds(&[&beside, "keep.txt"]);

    ex.assert_no_forbidden_calls();
    ex.stop_cleanly();
}

#[test]
fn sigterm_and_sigint_exit_zero() {
    let mut ex = Exchange::new();
    for (name, send) in [
        (
            "SIGTERM",
            common::Daemon::signal_term as fn(&common::Daemon),
        ),
        ("SIGINT", common::Daemon::signal_int),
    ] {
        let lists = ex.delivery_lists();
        ex.start();
        // A first poll means the daemon is up (signal handlers go in before any work).
        ex.wait_for_polls(lists, 1);
        send(ex.daemon());
        let status = ex.daemon().wait_exit(common::TIMEOUT);
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after {name}: {status}\n{}",
            ex.diagnostics()
        );
    }
}

#[test]
fn sync_does_one_full_pass_and_exits() {
    let mut ex = Exchange::new();
    let upload = b"id,amount\n1,10\n2,20\n".to_vec();
    let delivery = random_bytes(MIB + 99, 31);
    write_file(&ex.outbox.join("claims.csv"), &upload);
    ex.owner.put(&ex.delivery_key("results.zip"), &delivery);

    let finished = ex.run_command("sync");
    let context = ex.diagnostics();
    assert_eq!(
        finished.status.code(),
        Some(0),
        "sync exit status {}\n{context}",
        finished.status
    );

    // Everything is done by the time sync returns: no waiting here.
    let key = ex.submission_key("claims.csv");
    assert_same_bytes(
        &format!("object {key}"),
        ex.owner.get(&key).as_deref(),
        &upload,
        &context,
    );
    assert!(
        files_under(&ex.outbox).is_empty(),
        "outbox not emptied by sync: {:?}\n{context}",
        files_under(&ex.outbox)
    );
    assert_same_bytes(
        "sent/claims.csv",
        read_file(&ex.sent.join("claims.csv")).as_deref(),
        &upload,
        &context,
    );
    assert_same_bytes(
        "inbox/results.zip",
        read_file(&ex.inbox.join("results.zip")).as_deref(),
        &delivery,
        &context,
    );
    ex.assert_inbox_holds(&["results.zip"]);
    ex.assert_no_forbidden_calls();
}

#[test]
fn unknown_config_key_exits_78_naming_file_line_and_key() {
    let mut ex = Exchange::new();
    let text = ex
        .config_text()
        .replace("settle = \"300ms\"", "setle = \"2s\"");
    let line = text
        .lines()
        .position(|l| l.starts_with("setle"))
        .expect("the typo is in the config")
        + 1;
    ex.write_config(&text);

    ex.start();
    let status = ex.daemon().wait_exit(common::TIMEOUT);
    let stderr = ex.daemon().stderr();
    let path = ex.config_path.display().to_string();
    assert_eq!(
        status.code(),
        Some(78),
        "exit status for an unknown key: {status}\n{stderr}"
    );
    assert!(
        stderr.contains(&path),
        "stderr does not name the config file {path}:\n{stderr}"
    );
    assert!(
        names_line(&stderr, &path, line),
        "stderr does not name line {line}:\n{stderr}"
    );
    assert!(
        stderr.contains("setle"),
        "stderr does not name the key `setle`:\n{stderr}"
    );
    assert_eq!(
        ex.proxy.requests().len(),
        0,
        "S3 was contacted despite a bad config"
    );
}

#[test]
fn bad_duration_exits_78_naming_the_key() {
    let mut ex = Exchange::new();
    ex.settings.settle = "2 parsecs".into();
    ex.write_config(&ex.config_text());

    ex.start();
    let status = ex.daemon().wait_exit(common::TIMEOUT);
    let stderr = ex.daemon().stderr();
    let path = ex.config_path.display().to_string();
    assert_eq!(
        status.code(),
        Some(78),
        "exit status for a bad duration: {status}\n{stderr}"
    );
    assert!(
        stderr.contains("settle"),
        "stderr does not name the key `settle`:\n{stderr}"
    );
    assert!(
        stderr.contains(&path),
        "stderr does not name the config file {path}:\n{stderr}"
    );
    assert_eq!(
        ex.proxy.requests().len(),
        0,
        "S3 was contacted despite a bad config"
    );
}

/// The harness itself: a signed request goes through the proxy unchanged (SigV4 still
/// verifies, so Host and body arrived intact), and the recording shows it. If this fails,
/// the other tests' verdicts mean nothing.
#[test]
fn harness_proxy_forwards_signed_requests_and_records_them() {
    let ex = Exchange::new();
    let via_proxy = common::Owner::new(&ex.proxy.endpoint(), common::BUCKET);
    let bytes = random_bytes(MIB + 3, 41);
    let etag = via_proxy.put("Delivery/dir/x y+z.bin", &bytes);
    assert!(!etag.is_empty(), "no ETag from a PUT through the proxy");
    assert_same_bytes(
        "direct GET",
        ex.owner.get("Delivery/dir/x y+z.bin").as_deref(),
        &bytes,
        "",
    );
    assert_same_bytes(
        "GET via proxy",
        via_proxy.get("Delivery/dir/x y+z.bin").as_deref(),
        &bytes,
        "",
    );
    assert_eq!(via_proxy.list("Delivery/"), ["Delivery/dir/x y+z.bin"]);
    assert_eq!(via_proxy.get("Delivery/missing"), None);

    let requests = ex.proxy.requests();
    let put = requests
        .iter()
        .find(|r| r.method == "PUT")
        .expect("the PUT was recorded");
    assert_eq!(
        put.key_in(common::BUCKET).as_deref(),
        Some("Delivery/dir/x y+z.bin")
    );
    assert_eq!(
        put.header("host"),
        Some(ex.proxy.endpoint().trim_start_matches("http://"))
    );
    assert!(
        put.header("authorization")
            .is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256"))
    );
    assert_eq!(put.status, Some(200));
    assert!(
        ex.is_delivery_list(
            requests
                .iter()
                .find(|r| r.method == "GET" && r.is_bucket_level(common::BUCKET))
                .expect("the list was recorded")
        )
    );
    assert_eq!(
        ex.delivery_gets(),
        2,
        "one found, one missing:\n{}",
        ex.proxy.summary()
    );
    assert_eq!(requests.iter().filter(|r| r.status == Some(404)).count(), 1);

    // The forbidden-call check sees bucket-level calls and reads of submissions.
    assert_eq!(ex.forbidden_calls(), Vec::<String>::new());
    assert!(via_proxy.bucket_exists());
    assert_eq!(via_proxy.get("Submissions/ours"), None);
    let forbidden = ex.forbidden_calls();
    assert_eq!(forbidden.len(), 2, "{forbidden:#?}");
    assert!(forbidden[0].starts_with("bucket-level call: HEAD /exchange"));
    assert!(forbidden[1].starts_with("read back its own upload: GET /exchange/Submissions/ours"));
}
