//! The configuration file: TOML -> validated [`Config`].
//!
//! Two steps, as in ripgrep: serde reads the raw file (unknown keys rejected, every
//! value parsed by a type that explains what it accepts, so toml's error names the line
//! and the key), then [`Config::from_raw`] expands `~`, normalises prefixes and checks
//! the settings against each other. Every error names the file and the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::keys::{NameError, Prefix};

/// Exit code for a configuration error (sysexits.h `EX_CONFIG`).
pub const EXIT_CONFIG: i32 = 78;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot read the configuration file {path}: {source} (create it from config/s3-exchange.example.toml or pass --config PATH)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: setting `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from, for messages.
    pub source: PathBuf,
    pub s3: S3,
    pub outbox: Outbox,
    pub inbox: Inbox,
    /// Folder of the sled ledger.
    pub state_dir: PathBuf,
    pub transfer: Transfer,
    pub log: Log,
    pub metrics: Metrics,
}

#[derive(Debug, Clone, PartialEq)]
pub struct S3 {
    pub bucket: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub force_path_style: bool,
    pub profile: Option<String>,
    pub role_arn: Option<String>,
    pub external_id: Option<String>,
    pub expected_bucket_owner: Option<String>,
    pub acl: Acl,
    pub checksums: Checksums,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outbox {
    pub dir: PathBuf,
    pub prefix: Prefix,
    pub settle: Duration,
    pub rescan_interval: Duration,
    pub after_upload: AfterUpload,
    pub sent_dir: PathBuf,
    pub ignore: Vec<String>,
    /// Send the files that symlinks in the outbox point to (never links to folders).
    pub follow_symlinks: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Inbox {
    pub dir: PathBuf,
    pub prefix: Prefix,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    pub concurrency: usize,
    pub multipart_threshold: u64,
    pub part_size: u64,
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
    pub operation_timeout: Duration,
    pub max_attempts: u32,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub level: Level,
    pub format: LogFormat,
    pub dir: PathBuf,
    /// Daily files kept; the oldest is deleted when a new day starts.
    pub max_files: usize,
}

/// The optional Prometheus endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Where to serve `GET /metrics`; `None` (the default) serves nothing.
    pub listen: Option<std::net::SocketAddr>,
}

/// The canned ACL sent with every upload, or none at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acl {
    /// Send no `x-amz-acl` header (never an empty one).
    None,
    /// One of S3's canned ACLs, such as `bucket-owner-full-control`.
    Canned(String),
}

const CANNED_ACLS: &[&str] = &[
    "bucket-owner-full-control",
    "bucket-owner-read",
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
];

impl TryFrom<String> for Acl {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        if value == "none" {
            Ok(Self::None)
        } else if CANNED_ACLS.contains(&value.as_str()) {
            Ok(Self::Canned(value))
        } else {
            Err(format!(
                "unknown ACL {value:?}: use \"none\" or a canned ACL ({})",
                CANNED_ACLS.join(", ")
            ))
        }
    }
}

/// When the SDK adds flexible checksums (CRC32) to uploads. `when_required` sends plain
/// bodies with Content-MD5 only, which older S3-compatible servers (Ceph RGW 16) need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksums {
    WhenSupported,
    WhenRequired,
}

/// What happens to an outbox file once S3 confirmed its upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterUpload {
    /// Move it to `sent_dir`, keeping its relative path.
    Move,
    Delete,
    /// Leave it; the ledger remembers its size and mtime so it is not sent again.
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        })
    }
}

/// A duration written for humans: `"2s"`, `"500ms"`, `"5m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
struct HumanDuration(Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        humantime::parse_duration(&value).map(Self).map_err(|e| {
            format!("invalid duration {value:?} ({e}): write a number and a unit, such as \"500ms\", \"2s\", \"5m\" or \"1h\"")
        })
    }
}

/// A size written for humans: `"16MiB"`, `"5 MB"`, `"1048576"`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
struct ByteSize(u64);

impl TryFrom<String> for ByteSize {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        parse_size(&value).map(Self).ok_or_else(|| {
            format!("invalid size {value:?}: write a number and a unit, such as \"16MiB\", \"5MB\", \"1GiB\" or \"4096\" (bytes)")
        })
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    s3: RawS3,
    #[serde(default)]
    outbox: RawOutbox,
    #[serde(default)]
    inbox: RawInbox,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    transfer: RawTransfer,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    bucket: String,
    region: Option<String>,
    endpoint_url: Option<String>,
    #[serde(default)]
    force_path_style: bool,
    profile: Option<String>,
    role_arn: Option<String>,
    external_id: Option<String>,
    expected_bucket_owner: Option<String>,
    #[serde(default = "default_acl")]
    acl: RawAcl,
    #[serde(default = "default_checksums")]
    checksums: Checksums,
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct RawAcl(Acl);

impl TryFrom<String> for RawAcl {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        Acl::try_from(value).map(Self)
    }
}

fn default_acl() -> RawAcl {
    RawAcl(Acl::Canned("bucket-owner-full-control".into()))
}

fn default_checksums() -> Checksums {
    Checksums::WhenSupported
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOutbox {
    dir: String,
    prefix: String,
    settle: HumanDuration,
    rescan_interval: HumanDuration,
    after_upload: AfterUpload,
    sent_dir: String,
    ignore: Vec<String>,
    follow_symlinks: bool,
}

impl Default for RawOutbox {
    fn default() -> Self {
        Self {
            dir: "~/exchange/outbox".into(),
            prefix: "Submissions/".into(),
            settle: HumanDuration(Duration::from_secs(2)),
            rescan_interval: HumanDuration(Duration::from_secs(300)),
            after_upload: AfterUpload::Move,
            sent_dir: "~/exchange/sent".into(),
            ignore: [".*", "*.part", "*.partial", "*.tmp", "*~", "*.swp"]
                .map(String::from)
                .to_vec(),
            follow_symlinks: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInbox {
    dir: String,
    prefix: String,
    poll_interval: HumanDuration,
}

impl Default for RawInbox {
    fn default() -> Self {
        Self {
            dir: "~/exchange/inbox".into(),
            prefix: "Delivery/".into(),
            poll_interval: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawState {
    dir: String,
}

impl Default for RawState {
    fn default() -> Self {
        Self {
            dir: "~/.local/state/s3-exchange".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTransfer {
    concurrency: usize,
    multipart_threshold: ByteSize,
    part_size: ByteSize,
    connect_timeout: HumanDuration,
    attempt_timeout: HumanDuration,
    operation_timeout: HumanDuration,
    max_attempts: u32,
    shutdown_grace: HumanDuration,
}

impl Default for RawTransfer {
    fn default() -> Self {
        Self {
            concurrency: 128,
            multipart_threshold: ByteSize(16 << 20),
            part_size: ByteSize(16 << 20),
            connect_timeout: HumanDuration(Duration::from_secs(10)),
            attempt_timeout: HumanDuration(Duration::from_secs(300)),
            operation_timeout: HumanDuration(Duration::from_secs(900)),
            max_attempts: 5,
            shutdown_grace: HumanDuration(Duration::from_secs(20)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: Level,
    format: LogFormat,
    dir: String,
    max_files: usize,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: Level::Info,
            format: LogFormat::Text,
            dir: "~/.local/state/s3-exchange/log".into(),
            max_files: 14,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: Option<String>,
}

/// S3's smallest part (except the last) and largest part.
pub const MIN_PART_SIZE: u64 = 5 << 20;
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// S3's largest single PUT.
pub const MAX_SINGLE_PUT: u64 = 5 << 30;

impl Config {
    /// The default location: `$XDG_CONFIG_HOME/s3-exchange/config.toml`, else
    /// `~/.config/s3-exchange/config.toml`.
    pub fn default_path() -> PathBuf {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from(".config"));
        base.join("s3-exchange").join("config.toml")
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::from_raw(path, raw)
    }

    fn from_raw(path: &Path, raw: RawConfig) -> Result<Self, Error> {
        let invalid = |key: &'static str, message: String| Error::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let dir = |key: &'static str, value: &str| {
            expand_tilde(value, home.as_deref()).map_err(|m| invalid(key, m))
        };
        let prefix = |key: &'static str, value: &str| {
            Prefix::new(value).map_err(|e: NameError| invalid(key, format!("{value:?}: {e}")))
        };

        let s3 = raw.s3;
        if s3.bucket.is_empty() || s3.bucket.contains('/') {
            return Err(invalid(
                "s3.bucket",
                format!(
                    "{:?} is not a bucket name: write the bare name, such as \"example-exchange\"",
                    s3.bucket
                ),
            ));
        }
        if let Some(url) = &s3.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "s3.endpoint_url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if let Some(arn) = &s3.role_arn
            && !arn.starts_with("arn:")
        {
            return Err(invalid(
                "s3.role_arn",
                format!(
                    "{arn:?} is not an ARN such as \"arn:aws:iam::111122223333:role/exchange\""
                ),
            ));
        }
        if s3.external_id.is_some() && s3.role_arn.is_none() {
            return Err(invalid(
                "s3.external_id",
                "only means something with s3.role_arn: set role_arn or remove external_id".into(),
            ));
        }
        for (key, value) in [
            ("s3.region", &s3.region),
            ("s3.profile", &s3.profile),
            ("s3.expected_bucket_owner", &s3.expected_bucket_owner),
        ] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err(invalid(
                    key,
                    "must not be empty: remove the line instead".into(),
                ));
            }
        }

        let outbox = Outbox {
            dir: dir("outbox.dir", &raw.outbox.dir)?,
            prefix: prefix("outbox.prefix", &raw.outbox.prefix)?,
            settle: raw.outbox.settle.0,
            rescan_interval: raw.outbox.rescan_interval.0,
            after_upload: raw.outbox.after_upload,
            sent_dir: dir("outbox.sent_dir", &raw.outbox.sent_dir)?,
            ignore: raw.outbox.ignore,
            follow_symlinks: raw.outbox.follow_symlinks,
        };
        let inbox = Inbox {
            dir: dir("inbox.dir", &raw.inbox.dir)?,
            prefix: prefix("inbox.prefix", &raw.inbox.prefix)?,
            poll_interval: raw.inbox.poll_interval.0,
        };
        let state_dir = dir("state.dir", &raw.state.dir)?;
        let log = Log {
            level: raw.log.level,
            format: raw.log.format,
            dir: dir("log.dir", &raw.log.dir)?,
            max_files: raw.log.max_files,
        };
        if log.max_files == 0 {
            return Err(invalid(
                "log.max_files",
                "must be at least 1: it is how many daily log files are kept".into(),
            ));
        }
        let metrics = Metrics {
            listen: match raw.metrics.listen {
                None => None,
                Some(text) => Some(text.parse::<std::net::SocketAddr>().map_err(|_| {
                    invalid(
                        "metrics.listen",
                        format!(
                            "{text:?} is not an address and port such as \"127.0.0.1:9187\" (remove the line to serve no metrics)"
                        ),
                    )
                })?),
            },
        };

        if outbox.rescan_interval < Duration::from_secs(1) {
            return Err(invalid(
                "outbox.rescan_interval",
                "must be at least 1s: the rescan walks the whole outbox".into(),
            ));
        }
        if inbox.poll_interval < Duration::from_millis(100) {
            return Err(invalid(
                "inbox.poll_interval",
                "must be at least 100ms: each poll lists the whole prefix".into(),
            ));
        }
        let (a, b) = (outbox.prefix.as_str(), inbox.prefix.as_str());
        if a.starts_with(b) || b.starts_with(a) {
            return Err(invalid(
                "inbox.prefix",
                format!(
                    "{b:?} overlaps outbox.prefix {a:?}: the daemon would fetch its own uploads; use disjoint prefixes such as \"Submissions/\" and \"Delivery/\""
                ),
            ));
        }
        if outbox.dir == inbox.dir
            || outbox.dir.starts_with(&inbox.dir)
            || inbox.dir.starts_with(&outbox.dir)
        {
            return Err(invalid(
                "inbox.dir",
                "the inbox and the outbox must be separate folders, neither inside the other"
                    .into(),
            ));
        }
        if outbox.after_upload == AfterUpload::Move && outbox.sent_dir.starts_with(&outbox.dir) {
            return Err(invalid(
                "outbox.sent_dir",
                "must not be inside outbox.dir: sent files would be uploaded again".into(),
            ));
        }
        if state_dir.starts_with(&outbox.dir) || state_dir.starts_with(&inbox.dir) {
            return Err(invalid(
                "state.dir",
                "must not be inside the outbox or the inbox".into(),
            ));
        }
        for pattern in &outbox.ignore {
            if pattern.is_empty() || pattern.contains('/') {
                return Err(invalid(
                    "outbox.ignore",
                    format!(
                        "{pattern:?}: a pattern matches a file name, so it must be non-empty and contain no '/'"
                    ),
                ));
            }
        }

        let t = raw.transfer;
        if !(1..=256).contains(&t.concurrency) {
            return Err(invalid(
                "transfer.concurrency",
                format!("{} is out of range: use 1 to 256", t.concurrency),
            ));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&t.part_size.0) {
            return Err(invalid(
                "transfer.part_size",
                "must be between 5MiB and 5GiB, S3's limits for a part".into(),
            ));
        }
        if t.multipart_threshold.0 == 0 || t.multipart_threshold.0 > MAX_SINGLE_PUT {
            return Err(invalid(
                "transfer.multipart_threshold",
                "must be between 1 byte and 5GiB, S3's largest single PUT".into(),
            ));
        }
        if t.max_attempts == 0 {
            return Err(invalid(
                "transfer.max_attempts",
                "must be at least 1".into(),
            ));
        }
        for (key, value) in [
            ("transfer.connect_timeout", t.connect_timeout.0),
            ("transfer.attempt_timeout", t.attempt_timeout.0),
            ("transfer.operation_timeout", t.operation_timeout.0),
        ] {
            if value.is_zero() {
                return Err(invalid(
                    key,
                    "must be more than zero: no S3 call may hang forever".into(),
                ));
            }
        }
        let transfer = Transfer {
            concurrency: t.concurrency,
            multipart_threshold: t.multipart_threshold.0,
            part_size: t.part_size.0,
            connect_timeout: t.connect_timeout.0,
            attempt_timeout: t.attempt_timeout.0,
            operation_timeout: t.operation_timeout.0,
            max_attempts: t.max_attempts,
            shutdown_grace: t.shutdown_grace.0,
        };

        Ok(Config {
            source: path.to_owned(),
            s3: S3 {
                bucket: s3.bucket,
                region: s3.region,
                endpoint_url: s3.endpoint_url,
                force_path_style: s3.force_path_style,
                profile: s3.profile,
                role_arn: s3.role_arn,
                external_id: s3.external_id,
                expected_bucket_owner: s3.expected_bucket_owner,
                acl: s3.acl.0,
                checksums: s3.checksums,
            },
            outbox,
            inbox,
            state_dir,
            transfer,
            log,
            metrics,
        })
    }
}

/// Expands a leading `~` to `home` and insists on an absolute result, so that the
/// daemon's folders never depend on the directory it was started from.
fn expand_tilde(value: &str, home: Option<&Path>) -> Result<PathBuf, String> {
    let expanded = if value == "~" || value.starts_with("~/") {
        let home = home.ok_or_else(|| {
            format!("{value:?} starts with ~ but $HOME is not set: write an absolute path")
        })?;
        home.join(value.trim_start_matches('~').trim_start_matches('/'))
    } else {
        PathBuf::from(value)
    };
    if !expanded.is_absolute() {
        return Err(format!(
            "{value:?} is relative: write an absolute path or one starting with ~/"
        ));
    }
    Ok(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[s3]\nbucket = \"b\"\nregion = \"us-east-1\"\n";

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(Path::new("/etc/x.toml"), text)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.s3.acl, Acl::Canned("bucket-owner-full-control".into()));
        assert_eq!(c.s3.checksums, Checksums::WhenSupported);
        assert_eq!(c.outbox.prefix.as_str(), "Submissions/");
        assert_eq!(c.outbox.settle, Duration::from_secs(2));
        assert_eq!(c.outbox.after_upload, AfterUpload::Move);
        assert_eq!(c.inbox.prefix.as_str(), "Delivery/");
        assert_eq!(c.inbox.poll_interval, Duration::from_secs(30));
        assert_eq!(c.transfer.concurrency, 128);
        assert_eq!(c.transfer.part_size, 16 << 20);
        assert_eq!(c.log.max_files, 14);
        assert_eq!(c.metrics.listen, None);
        assert!(c.outbox.dir.is_absolute());
        assert!(c.outbox.dir.ends_with("exchange/outbox"));
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../config/s3-exchange.example.toml");
        parse(text).expect("the shipped example must parse");
    }

    #[test]
    fn prefixes_gain_a_trailing_slash_and_sizes_parse() {
        let c = parse(&format!(
            "{MINIMAL}[outbox]\nprefix = \"Up\"\n[transfer]\npart_size = \"64 MiB\"\nmultipart_threshold = \"100MB\"\n"
        ))
        .expect("valid");
        assert_eq!(c.outbox.prefix.as_str(), "Up/");
        assert_eq!(c.transfer.part_size, 64 << 20);
        assert_eq!(c.transfer.multipart_threshold, 100_000_000);
    }

    #[test]
    fn unknown_keys_name_the_line_and_the_key() {
        let err = parse(&format!("{MINIMAL}[outbox]\nsetle = \"2s\"\n"))
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("/etc/x.toml"), "{err}");
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("setle"), "{err}");
        assert!(err.contains("settle"), "lists what is allowed: {err}");
    }

    #[test]
    fn bad_values_say_what_is_allowed() {
        let cases = [
            ("[outbox]\nsettle = \"2 parsecs\"\n", "settle", "\"500ms\""),
            ("[transfer]\npart_size = \"lots\"\n", "part_size", "16MiB"),
            (
                "[outbox]\nafter_upload = \"copy\"\n",
                "after_upload",
                "move",
            ),
            ("[log]\nformat = \"xml\"\n", "format", "json"),
        ];
        for (snippet, key, hint) in cases {
            let err = parse(&format!("{MINIMAL}{snippet}"))
                .expect_err(snippet)
                .to_string();
            assert!(err.contains(key) && err.contains(hint), "{snippet}: {err}");
        }
        let err = parse("[s3]\nbucket = \"b\"\nacl = \"owner\"\n")
            .expect_err("bad acl")
            .to_string();
        assert!(
            err.contains("bucket-owner-full-control") && err.contains("none"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_settings_name_the_key() {
        let cases = [
            ("[inbox]\nprefix = \"Submissions/x\"\n", "inbox.prefix"),
            (
                "[outbox]\ndir = \"/x/out\"\nsent_dir = \"/x/out/sent\"\n",
                "outbox.sent_dir",
            ),
            ("[inbox]\ndir = \"relative/inbox\"\n", "inbox.dir"),
            ("[transfer]\npart_size = \"1MiB\"\n", "transfer.part_size"),
            ("[transfer]\nconcurrency = 0\n", "transfer.concurrency"),
        ];
        for (snippet, key) in cases {
            let err = parse(&format!("{MINIMAL}{snippet}")).expect_err(snippet);
            assert!(
                matches!(&err, Error::Invalid { key: k, .. } if *k == key),
                "{snippet}: {err}"
            );
        }
    }

    #[test]
    fn log_retention_and_the_metrics_address_are_validated() {
        let c = parse(&format!(
            "{MINIMAL}[log]\nmax_files = 3\n[metrics]\nlisten = \"127.0.0.1:9187\"\n"
        ))
        .expect("valid");
        assert_eq!(c.log.max_files, 3);
        assert_eq!(c.metrics.listen, Some(([127, 0, 0, 1], 9187).into()));
        for (snippet, key) in [
            ("[log]\nmax_files = 0\n", "log.max_files"),
            ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
            ("[metrics]\nlisten = \"127.0.0.1\"\n", "metrics.listen"),
        ] {
            let err = parse(&format!("{MINIMAL}{snippet}")).expect_err(snippet);
            assert!(
                matches!(&err, Error::Invalid { key: k, .. } if *k == key),
                "{snippet}: {err}"
            );
        }
    }

    #[test]
    fn missing_bucket_is_reported() {
        let err = parse("[s3]\nregion = \"x\"\n")
            .expect_err("no bucket")
            .to_string();
        assert!(err.contains("bucket"), "{err}");
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("2MB"), Some(2_000_000));
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("3 parsecs"), None);
    }
}
