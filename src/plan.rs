//! Pure decisions, no IO: when an outbox file is complete, how a large file is split,
//! whether a listed object must be fetched, and where a delivery lands.
//!
//! The workers gather facts (stat results, ledger records, listings) and ask here; so
//! every rule the daemon promises has a unit test that needs neither S3 nor a disk.

use std::time::{Duration, Instant, SystemTime};

use crate::keys::{ChangeToken, ETag};

/// S3's most parts in one multipart upload.
pub const MAX_PARTS: u64 = 10_000;

/// What a `stat` says about a local file, as far as change detection is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// The inode: a file replaced by rename has a new one even with equal size and mtime.
    pub inode: u64,
}

/// One outbox file waiting to settle.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// The stamp last observed.
    pub stamp: FileStamp,
    /// When the stamp was last seen to change or the watcher last reported the file.
    pub quiet_since: Instant,
}

impl Candidate {
    pub fn new(stamp: FileStamp, now: Instant) -> Self {
        Self {
            stamp,
            quiet_since: now,
        }
    }

    /// A watcher event restarts the settle clock from the stamp seen with it: the file is
    /// being written, and what it looks like now is what must stay unchanged. (Keeping the
    /// first stamp instead would make the look at the due time see a "change" that the
    /// events already accounted for, and wait a second settle time.)
    pub fn touched(&mut self, stamp: FileStamp, now: Instant) {
        self.stamp = stamp;
        self.quiet_since = now;
    }

    /// Folds in a fresh stat; true when the file counts as complete: unchanged in size,
    /// mtime and identity for `settle` since its last event or change.
    pub fn observe(&mut self, stamp: FileStamp, now: Instant, settle: Duration) -> bool {
        if stamp != self.stamp {
            self.stamp = stamp;
            self.quiet_since = now;
            return false;
        }
        now.saturating_duration_since(self.quiet_since) >= settle
    }

    /// When the file would be settled if nothing changes.
    pub fn due(&self, settle: Duration) -> Instant {
        self.quiet_since + settle
    }
}

/// How far a wall-clock reading may stray from the monotonic clock between two looks
/// before it counts as a step: NTP slews at most 0.05%; a step (a manual `date`, NTP's
/// first sync, a resume from suspend) moves it at once.
const CLOCK_STEP: Duration = Duration::from_millis(50);

/// Whether a file's own change time can stand in for watching it settle.
///
/// A file found in the outbox (a finished folder moved in, files there at start-up) has
/// often been unchanged for longer than `settle` already, and waiting another settle time
/// proves nothing more. Its ctime says so: every write, truncate, rename and chmod moves
/// it to "now", and no one can set it back (unlike mtime, which `touch -d` or `cp -p`
/// sets to anything). It is a wall-clock time, though, so it is trusted only for changes
/// made since the daemon started and since the wall clock last stepped: a clock set
/// forward by an hour would otherwise make a file written a moment ago look an hour old.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    last: (Instant, SystemTime),
    trusted_from: SystemTime,
}

impl WallClock {
    pub fn new(mono: Instant, wall: SystemTime) -> Self {
        Self {
            last: (mono, wall),
            trusted_from: wall,
        }
    }

    /// Folds in a reading of both clocks: if the wall clock moved other than the
    /// monotonic one since the last reading, only changes from now on are trusted.
    pub fn sample(&mut self, mono: Instant, wall: SystemTime) {
        let (mono_then, wall_then) = self.last;
        let elapsed = mono.saturating_duration_since(mono_then);
        let drift = match wall.duration_since(wall_then) {
            Ok(moved) => moved.abs_diff(elapsed),
            Err(back) => back.duration() + elapsed,
        };
        if drift > CLOCK_STEP + elapsed / 2000 {
            self.trusted_from = wall;
        }
        self.last = (mono, wall);
    }

    /// How long before `wall` a file whose last change (ctime, or mtime if later) is
    /// `changed_at` has been unchanged, as far as the clock can vouch for it: zero for a
    /// change in the future, before the daemon started or before a clock step.
    pub fn quiet_since(&self, changed_at: SystemTime, wall: SystemTime) -> Duration {
        if changed_at < self.trusted_from {
            return Duration::ZERO;
        }
        wall.duration_since(changed_at).unwrap_or(Duration::ZERO)
    }
}

/// True when `name` matches one of the ignore patterns (`*` any run, `?` one character).
pub fn is_ignored(name: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| wildcard_match(p, name))
}

fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match backtrack {
                Some((bp, bn)) => {
                    pi = bp + 1;
                    ni = bn + 1;
                    backtrack = Some((bp, bn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// How a file of `size` bytes is uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadShape {
    Single,
    Multipart { part_size: u64, parts: u64 },
}

/// Single PUT up to `threshold`; above it, parts of `part_size`, raised (to a whole MiB)
/// as far as needed to stay within 10,000 parts.
pub fn upload_shape(size: u64, threshold: u64, part_size: u64) -> UploadShape {
    if size <= threshold {
        return UploadShape::Single;
    }
    let mut part_size = part_size.max(size.div_ceil(MAX_PARTS));
    part_size = part_size.div_ceil(1 << 20) * (1 << 20);
    UploadShape::Multipart {
        part_size,
        parts: size.div_ceil(part_size),
    }
}

/// How a listed object is downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadShape {
    /// One GET: checked against the MD5 where the ETag is one, and by the SDK against a
    /// checksum the object carries.
    Single,
    /// Ranged GETs of `range` bytes (the last one shorter), several at once.
    Ranged { range: u64 },
}

/// Ranged GETs only where they lose nothing: a large object (at least `threshold` bytes)
/// whose whole body nothing could check anyway, because its ETag has the multipart shape
/// (not an MD5 of the content) and the listing marks no full-object checksum (which the
/// SDK would verify on a single GET), and more than one range long: an object of one
/// range gains nothing from ranges, and some servers answer a range covering the whole
/// object with a plain 200. Everything else goes by one GET.
pub fn download_shape(
    size: u64,
    etag: Option<&ETag>,
    full_object_checksum: bool,
    threshold: u64,
    range: u64,
) -> DownloadShape {
    let uncheckable = etag.is_some_and(ETag::is_multipart) && !full_object_checksum;
    if size >= threshold && range > 0 && size > range && uncheckable {
        DownloadShape::Ranged { range }
    } else {
        DownloadShape::Single
    }
}

/// The byte ranges `(offset, len)` of an object of `size` bytes in ranges of `range`
/// bytes, in order: they cover it exactly, without overlap.
pub fn byte_ranges(size: u64, range: u64) -> impl Iterator<Item = (u64, u64)> {
    let range = range.max(1);
    (0..size.div_ceil(range)).map(move |i| {
        let offset = i * range;
        (offset, range.min(size - offset))
    })
}

/// What the ledger remembers of a key it delivered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delivered {
    pub token: ChangeToken,
    /// The path (relative to the inbox) the content was written to.
    pub path: String,
    /// The file as written, to tell whether the user changed it since.
    pub stamp: FileStamp,
}

/// Whether a listed object must be fetched: only when the ledger has no record of the
/// key or a different change token. The inbox's content never matters here, so files
/// the user moved or deleted are not fetched again.
pub fn needs_fetch(listed: &ChangeToken, recorded: Option<&ChangeToken>) -> bool {
    recorded.is_none_or(|r| r != listed)
}

/// Where a downloaded version goes, given what is at its path now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landing {
    /// Nothing there (or what is there is ours and untouched): take the path.
    Path,
    /// Something the user made or changed is there: keep it, land beside it.
    Beside,
}

/// What is at a delivery's destination path before the rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Nothing,
    /// A regular file with this stamp.
    File(FileStamp),
    /// A regular file whose content equals the new download (a crash after the
    /// rename but before the ledger record left it there).
    SameContent,
    /// A directory or anything else that is not a regular file.
    Other,
}

/// Replace only what we wrote and nobody changed; otherwise keep the user's copy.
pub fn landing(existing: Existing, record: Option<&Delivered>, rel_path: &str) -> Landing {
    match existing {
        Existing::Nothing | Existing::SameContent => Landing::Path,
        Existing::File(stamp) => match record {
            Some(r) if r.path == rel_path && r.stamp == stamp => Landing::Path,
            _ => Landing::Beside,
        },
        Existing::Other => Landing::Beside,
    }
}

/// The names a file that must not replace another tries in turn: `name` itself, then
/// [`beside_name`]s `0, 1, ...`. Ends (in theory) when the counter runs out.
pub fn names_to_try<'a>(name: &'a str, tag: &'a str) -> impl Iterator<Item = String> + 'a {
    std::iter::once(name.to_owned()).chain((0..u32::MAX).map(move |n| beside_name(name, tag, n)))
}

/// A clear name beside `name` for a version that must not replace it:
/// `report.out` -> `report.<tag>.out`, `README` -> `README.<tag>`; `n > 0` adds `-n`.
pub fn beside_name(name: &str, tag: &str, n: u32) -> String {
    let tag = if n == 0 {
        tag.to_owned()
    } else {
        format!("{tag}-{n}")
    };
    match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{}.{tag}{}", &name[..dot], &name[dot..]),
        _ => format!("{name}.{tag}"),
    }
}

/// Whether a download's MD5 contradicts its ETag, and how. Only a plain single-part ETag
/// of an object not encrypted with SSE-KMS is an MD5 of the content: multipart ETags
/// (`...-N`) and SSE-KMS ETags (same shape, other value) say nothing, and must never be
/// taken for damage.
pub fn md5_mismatch(etag: Option<&ETag>, kms: bool, md5: &[u8; 16]) -> Option<String> {
    let expected = etag.filter(|_| !kms)?.plain_md5()?;
    let got = hex(md5);
    (!expected.eq_ignore_ascii_case(&got))
        .then(|| format!("content MD5 {got} does not match the ETag {expected}"))
}

/// Lower-case hex of an MD5.
pub fn hex(bytes: &[u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `2026-11-28T10-15-00Z`: a name-safe UTC time for copies that must not overwrite.
pub fn time_tag(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace(':', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_etag_of_an_unencrypted_object_is_checked_as_an_md5() {
        let md5: [u8; 16] = *b"0123456789abcdef";
        let right = ETag::new(format!("\"{}\"", hex(&md5)));
        let wrong = ETag::new("\"ffffffffffffffffffffffffffffffff\"");
        let multipart = ETag::new("\"ffffffffffffffffffffffffffffffff-3\"");
        assert_eq!(md5_mismatch(Some(&right), false, &md5), None);
        assert!(
            md5_mismatch(Some(&wrong), false, &md5)
                .is_some_and(|m| m.contains("does not match the ETag"))
        );
        // SSE-KMS: the same shape, but not the MD5 (AWS): never damage.
        assert_eq!(md5_mismatch(Some(&wrong), true, &md5), None);
        assert_eq!(md5_mismatch(Some(&multipart), false, &md5), None);
        assert_eq!(md5_mismatch(None, false, &md5), None);
    }

    #[test]
    fn only_large_uncheckable_objects_go_by_ranges() {
        const MIB: u64 = 1 << 20;
        let multipart = ETag::new("\"9e107d9d372bb6826bd81d3542a419d6-3\"");
        let plain = ETag::new("\"9e107d9d372bb6826bd81d3542a419d6\"");
        let ranged = DownloadShape::Ranged { range: 16 * MIB };
        let shape = |size, etag, full| download_shape(size, etag, full, 16 * MIB, 16 * MIB);
        assert_eq!(shape(100 * MIB, Some(&multipart), false), ranged);
        assert_eq!(
            shape(16 * MIB + 1, Some(&multipart), false),
            ranged,
            "just over one range"
        );
        assert_eq!(
            shape(16 * MIB, Some(&multipart), false),
            DownloadShape::Single,
            "one range long: nothing to gain, and a whole-object range may come back as a 200"
        );
        assert_eq!(
            shape(16 * MIB - 1, Some(&multipart), false),
            DownloadShape::Single,
            "below the threshold"
        );
        assert_eq!(
            shape(100 * MIB, Some(&plain), false),
            DownloadShape::Single,
            "an MD5 ETag checks the whole body"
        );
        assert_eq!(
            shape(100 * MIB, Some(&multipart), true),
            DownloadShape::Single,
            "the SDK checks a full-object checksum"
        );
        assert_eq!(
            shape(100 * MIB, None, false),
            DownloadShape::Single,
            "no ETag: nothing to pin the ranges to"
        );
        assert_eq!(
            shape(100 * MIB, Some(&ETag::new("\"opaque\"")), false),
            DownloadShape::Single
        );
        assert_eq!(
            download_shape(0, Some(&multipart), false, 0, MIB),
            DownloadShape::Single
        );
    }

    #[test]
    fn byte_ranges_cover_the_object_exactly() {
        let ranges: Vec<_> = byte_ranges(12, 5).collect();
        assert_eq!(ranges, [(0, 5), (5, 5), (10, 2)]);
        assert_eq!(byte_ranges(10, 5).collect::<Vec<_>>(), [(0, 5), (5, 5)]);
        assert_eq!(byte_ranges(3, 5).collect::<Vec<_>>(), [(0, 3)]);
        assert_eq!(byte_ranges(0, 5).count(), 0);
        let big = 5u64 << 40;
        let (n, total) = byte_ranges(big, 16 << 20).fold((0, 0), |(n, t), (_, l)| (n + 1, t + l));
        assert_eq!((n, total), (big / (16 << 20), big));
    }

    fn stamp(size: u64, mtime_ns: i64) -> FileStamp {
        FileStamp {
            size,
            mtime_ns,
            inode: 7,
        }
    }

    #[test]
    fn a_file_settles_only_after_a_quiet_settle_time() {
        let t0 = Instant::now();
        let settle = Duration::from_secs(2);
        let mut c = Candidate::new(stamp(10, 1), t0);
        assert!(!c.observe(stamp(10, 1), t0 + Duration::from_secs(1), settle));
        assert!(c.observe(stamp(10, 1), t0 + Duration::from_secs(2), settle));
    }

    #[test]
    fn growth_or_a_new_mtime_restarts_the_clock() {
        let t0 = Instant::now();
        let settle = Duration::from_secs(2);
        let mut c = Candidate::new(stamp(10, 1), t0);
        assert!(!c.observe(stamp(20, 1), t0 + Duration::from_secs(3), settle));
        assert!(!c.observe(stamp(20, 1), t0 + Duration::from_secs(4), settle));
        assert!(!c.observe(stamp(20, 2), t0 + Duration::from_secs(5), settle));
        assert!(c.observe(stamp(20, 2), t0 + Duration::from_secs(7), settle));
        let mut replaced = stamp(20, 2);
        replaced.inode = 8;
        assert!(!c.observe(replaced, t0 + Duration::from_secs(9), settle));
    }

    #[test]
    fn an_event_restarts_the_clock() {
        let t0 = Instant::now();
        let settle = Duration::from_secs(2);
        let mut c = Candidate::new(stamp(10, 1), t0);
        c.touched(stamp(10, 1), t0 + Duration::from_secs(1));
        assert!(!c.observe(stamp(10, 1), t0 + Duration::from_secs(2), settle));
        assert!(c.observe(stamp(10, 1), t0 + Duration::from_secs(3), settle));
        assert_eq!(c.due(settle), t0 + Duration::from_secs(3));
    }

    #[test]
    fn a_file_written_more_often_than_the_settle_time_never_settles() {
        let t0 = Instant::now();
        let settle = Duration::from_secs(2);
        let mut c = Candidate::new(stamp(0, 0), t0);
        for i in 1..=10u64 {
            // A write every second, the daemon looking in between.
            let at = t0 + Duration::from_secs(i);
            let grown = stamp(i * 100, i as i64);
            c.touched(grown, at);
            assert!(!c.observe(grown, at, settle), "settled at write {i}");
            assert!(!c.observe(grown, at + Duration::from_millis(999), settle));
            assert_eq!(c.due(settle), at + settle, "due moves with every write");
        }
        let last = t0 + Duration::from_secs(10);
        assert!(c.observe(stamp(1000, 10), last + settle, settle));
    }

    #[test]
    fn a_file_written_then_closed_settles_one_settle_time_after_its_last_event() {
        // Create (empty), then the write and the close: each event brings the stamp seen
        // with it, so the look at the due time finds it unchanged and it goes then.
        let t0 = Instant::now();
        let settle = Duration::from_millis(200);
        let mut c = Candidate::new(stamp(0, 1), t0);
        let closed = t0 + Duration::from_millis(1);
        c.touched(stamp(1024, 2), closed);
        assert_eq!(c.due(settle), closed + settle);
        assert!(c.observe(stamp(1024, 2), closed + settle, settle));
    }

    #[test]
    fn a_change_seen_only_by_stat_restarts_the_clock_from_that_look() {
        // No event (a file on a network share, or the watcher lost it): the stat at the
        // due time sees the change and the file needs another quiet settle time.
        let t0 = Instant::now();
        let settle = Duration::from_secs(2);
        let mut c = Candidate::new(stamp(10, 1), t0);
        let look = t0 + settle;
        assert!(!c.observe(stamp(10, 2), look, settle), "mtime changed");
        assert_eq!(c.due(settle), look + settle);
        assert!(!c.observe(stamp(10, 2), look + Duration::from_secs(1), settle));
        assert!(c.observe(stamp(10, 2), look + settle, settle));
    }

    #[test]
    fn a_change_time_counts_only_since_the_start_and_never_from_the_future() {
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let clock = WallClock::new(mono, wall);
        let later = wall + Duration::from_secs(5);
        assert_eq!(
            clock.quiet_since(wall + Duration::from_secs(1), later),
            Duration::from_secs(4)
        );
        assert_eq!(
            clock.quiet_since(wall - Duration::from_secs(1), later),
            Duration::ZERO,
            "changed before the daemon watched the clock"
        );
        assert_eq!(
            clock.quiet_since(later + Duration::from_secs(1), later),
            Duration::ZERO,
            "a change time in the future"
        );
    }

    #[test]
    fn a_clock_step_either_way_voids_the_change_times_before_it() {
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let written = wall + Duration::from_secs(1);
        for step in [Duration::from_secs(3600), Duration::from_millis(200)] {
            let mut forward = WallClock::new(mono, wall);
            let (mono2, wall2) = (
                mono + Duration::from_secs(2),
                wall + Duration::from_secs(2) + step,
            );
            forward.sample(mono2, wall2);
            assert_eq!(
                forward.quiet_since(written, wall2),
                Duration::ZERO,
                "{step:?} forward"
            );
            assert_eq!(
                forward.quiet_since(wall2, wall2 + Duration::from_secs(3)),
                Duration::from_secs(3),
                "changes after the step count again"
            );
            let mut back = WallClock::new(mono, wall);
            let wall3 = wall + Duration::from_secs(2) - step;
            back.sample(mono2, wall3);
            assert_eq!(
                back.quiet_since(written - step, wall3 + Duration::from_secs(5)),
                Duration::ZERO,
                "{step:?} back"
            );
        }
    }

    #[test]
    fn a_slewing_clock_is_no_step() {
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let mut clock = WallClock::new(mono, wall);
        let written = wall + Duration::from_secs(1);
        // An hour later, 0.04% fast (NTP slews at most 0.05%).
        let hour = Duration::from_secs(3600);
        let now = wall + hour + hour / 2500;
        clock.sample(mono + hour, now);
        assert_eq!(
            clock.quiet_since(written, now),
            now.duration_since(written).unwrap()
        );
    }

    #[test]
    fn a_file_truncated_and_rewritten_does_not_settle_on_its_way_back() {
        // An editor saving in place: truncate to 0, then write the new content.
        let t0 = Instant::now();
        let settle = Duration::from_secs(2);
        let mut c = Candidate::new(stamp(500, 1), t0);
        assert!(!c.observe(stamp(0, 2), t0 + settle, settle), "truncated");
        assert!(
            !c.observe(stamp(480, 3), t0 + settle * 2, settle),
            "rewritten"
        );
        assert!(c.observe(stamp(480, 3), t0 + settle * 3, settle));
    }

    #[test]
    fn with_zero_settle_only_an_unchanged_look_counts() {
        let t0 = Instant::now();
        let mut c = Candidate::new(stamp(10, 1), t0);
        assert!(c.observe(stamp(10, 1), t0, Duration::ZERO));
        assert!(
            !c.observe(stamp(11, 1), t0, Duration::ZERO),
            "a change never counts"
        );
        assert!(c.observe(stamp(11, 1), t0, Duration::ZERO));
    }

    #[test]
    fn ignore_patterns_match_whole_names() {
        let p: Vec<String> = [".*", "*.part", "*.partial", "*.tmp", "*~", "*.swp"]
            .map(String::from)
            .to_vec();
        for name in [
            ".hidden",
            "a.part",
            "b.partial",
            "c.tmp",
            "d~",
            ".e.swp",
            "x.swp",
        ] {
            assert!(is_ignored(name, &p), "{name}");
        }
        for name in ["report.csv", "part", "a.parts", "tmp", "a.tmp.csv", "ü.csv"] {
            assert!(!is_ignored(name, &p), "{name}");
        }
        assert!(is_ignored("a?c", &["a?c".into()]));
        assert!(is_ignored("abc", &["a?c".into()]));
        assert!(is_ignored("abxyzc", &["a*c".into()]));
        assert!(!is_ignored("abxyzcd", &["a*c".into()]));
    }

    #[test]
    fn upload_shape_respects_s3_limits() {
        let mib = 1 << 20;
        assert_eq!(
            upload_shape(16 * mib, 16 * mib, 16 * mib),
            UploadShape::Single
        );
        assert_eq!(
            upload_shape(40 * mib, 16 * mib, 16 * mib),
            UploadShape::Multipart {
                part_size: 16 * mib,
                parts: 3
            }
        );
        let huge = 5u64 << 40; // 5 TiB, S3's largest object
        let UploadShape::Multipart { part_size, parts } = upload_shape(huge, 16 * mib, 16 * mib)
        else {
            panic!("multipart expected");
        };
        assert!(parts <= MAX_PARTS, "{parts}");
        assert!(part_size <= 5 << 30);
        assert_eq!(part_size % mib, 0);
    }

    fn delivered(token: &str) -> Delivered {
        Delivered {
            token: ChangeToken::from_etag(&crate::keys::ETag::new(token)),
            path: "r.out".into(),
            stamp: stamp(5, 9),
        }
    }

    #[test]
    fn the_ledger_not_the_inbox_decides_what_to_fetch() {
        let record = delivered("\"a\"");
        let same = ChangeToken::from_etag(&crate::keys::ETag::new("\"a\""));
        let changed = ChangeToken::from_etag(&crate::keys::ETag::new("\"b\""));
        assert!(needs_fetch(&same, None));
        assert!(!needs_fetch(&same, Some(&record.token)));
        assert!(needs_fetch(&changed, Some(&record.token)));
    }

    #[test]
    fn a_changed_local_copy_is_kept() {
        let record = delivered("\"a\"");
        assert_eq!(
            landing(Existing::Nothing, Some(&record), "r.out"),
            Landing::Path
        );
        assert_eq!(
            landing(Existing::File(stamp(5, 9)), Some(&record), "r.out"),
            Landing::Path
        );
        assert_eq!(
            landing(Existing::File(stamp(6, 10)), Some(&record), "r.out"),
            Landing::Beside
        );
        assert_eq!(
            landing(Existing::File(stamp(5, 9)), None, "r.out"),
            Landing::Beside,
            "a file we have no record of writing is the user's"
        );
        assert_eq!(landing(Existing::SameContent, None, "r.out"), Landing::Path);
        assert_eq!(
            landing(Existing::Other, Some(&record), "r.out"),
            Landing::Beside
        );
    }

    #[test]
    fn time_tags_are_name_safe() {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(time_tag(at), "2026-11-18T11-06-40Z");
    }

    #[test]
    fn beside_names_keep_the_extension() {
        assert_eq!(beside_name("report.out", "T", 0), "report.T.out");
        assert_eq!(beside_name("README", "T", 0), "README.T");
        assert_eq!(beside_name(".profile", "T", 2), ".profile.T-2");
        assert_eq!(beside_name("a.tar.gz", "T", 1), "a.tar.T-1.gz");
    }
}
