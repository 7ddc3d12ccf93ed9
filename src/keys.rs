//! Validated names: key prefixes, object keys, ETags, change tokens and the one safe
//! mapping between object keys and paths relative to a local folder.
//!
//! Everything here is pure: no IO, so hostile keys are tested without S3 or a disk.
//! The inbox trusts nothing the bucket returns: a key becomes a path only through
//! [`RelPath::from_key`], which rejects every segment that could leave the inbox.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// S3's limit on the length of a key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// Linux's `NAME_MAX`: the longest file name (one path segment), in bytes.
pub const MAX_SEGMENT_BYTES: usize = 255;

/// Why a string is not a usable prefix, key or path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the key does not start with the prefix {0:?}")]
    OutsidePrefix(String),
    #[error("nothing is left after the prefix")]
    Empty,
    #[error("it has an empty segment (a leading '/' or '//')")]
    EmptySegment,
    #[error("it has a '.' or '..' segment")]
    DotSegment,
    #[error("it contains a backslash")]
    Backslash,
    #[error("it contains a NUL or other control character")]
    ControlCharacter,
    #[error("a segment is longer than {MAX_SEGMENT_BYTES} bytes, the file system's limit")]
    SegmentTooLong,
    #[error("the key would be {0} bytes long; S3 allows at most {MAX_KEY_BYTES}")]
    KeyTooLong(usize),
    #[error("the file name is not valid UTF-8, so it cannot be an S3 key")]
    NotUtf8,
    #[error("the path is not a plain relative path")]
    NotRelative,
    #[error("a prefix must not start with '/'")]
    LeadingSlash,
}

/// A key prefix such as `Submissions/`: empty (the whole bucket) or ending in `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// Validates and normalises a prefix: a missing trailing `/` is added, so that
    /// `Delivery` can never match `DeliveryOld/...`.
    pub fn new(raw: &str) -> Result<Self, NameError> {
        if raw.is_empty() {
            return Ok(Self(String::new()));
        }
        if raw.starts_with('/') {
            return Err(NameError::LeadingSlash);
        }
        let trimmed = raw.trim_end_matches('/');
        for segment in trimmed.split('/') {
            check_segment(segment)?;
        }
        let prefix = format!("{trimmed}/");
        if prefix.len() > MAX_KEY_BYTES {
            return Err(NameError::KeyTooLong(prefix.len()));
        }
        Ok(Self(prefix))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A full object key as S3 stores it: non-empty UTF-8 of at most 1024 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Wraps a key the bucket returned. Nothing is assumed about its segments: whether
    /// it may become a local path is [`RelPath::from_key`]'s decision.
    pub fn from_listing(key: String) -> Self {
        Self(key)
    }

    /// The key for a file at `rel` (relative to the outbox): prefix + `/`-joined path.
    pub fn for_upload(prefix: &Prefix, rel: &Path) -> Result<Self, NameError> {
        let mut key = prefix.as_str().to_owned();
        let mut first = true;
        for component in rel.components() {
            let Component::Normal(name) = component else {
                return Err(NameError::NotRelative);
            };
            let name = name.to_str().ok_or(NameError::NotUtf8)?;
            check_segment(name)?;
            if !first {
                key.push('/');
            }
            key.push_str(name);
            first = false;
        }
        if first {
            return Err(NameError::Empty);
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(NameError::KeyTooLong(key.len()));
        }
        Ok(Self(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Keys ending in `/` are the "folders" consoles create; they carry no file.
    pub fn is_folder_marker(&self) -> bool {
        self.0.ends_with('/')
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An ETag exactly as S3 returned it (quotes included). It is a change token, not a
/// checksum: multipart and SSE-KMS ETags are not MD5s, so it is compared as opaque text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ETag(String);

impl ETag {
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex MD5 of the content when this ETag has the single-part shape (32 hex
    /// digits). Callers must still rule out SSE-KMS, whose ETags have the same shape.
    pub fn plain_md5(&self) -> Option<&str> {
        let inner = self.0.trim_matches('"');
        (inner.len() == 32 && inner.bytes().all(|b| b.is_ascii_hexdigit())).then_some(inner)
    }

    /// Whether this ETag has the multipart shape, `"<32 hex digits>-<parts>"`: an MD5 of
    /// the parts' MD5s, which says nothing a download could check its body against.
    pub fn is_multipart(&self) -> bool {
        let inner = self.0.trim_matches('"');
        inner.split_once('-').is_some_and(|(md5, parts)| {
            md5.len() == 32
                && md5.bytes().all(|b| b.is_ascii_hexdigit())
                && !parts.is_empty()
                && parts.bytes().all(|b| b.is_ascii_digit())
        })
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the ledger compares to decide whether a listed object is new: its ETag, or, for
/// servers whose listings carry none (s3s-fs), its size and modification time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChangeToken(String);

impl ChangeToken {
    pub fn from_etag(etag: &ETag) -> Self {
        Self(format!("etag:{}", etag.as_str()))
    }

    pub fn from_size_and_mtime(size: u64, last_modified_ms: i64) -> Self {
        Self(format!("size:{size};modified-ms:{last_modified_ms}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChangeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A path relative to a local folder, made only of plain, checked segments: it cannot
/// be absolute, climb with `..`, or hide a separator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelPath(Vec<String>);

impl RelPath {
    /// The one mapping from an object key to a local path: strip the prefix, then
    /// reject empty, `.`, `..`, backslash, control-character and overlong segments.
    pub fn from_key(prefix: &Prefix, key: &ObjectKey) -> Result<Self, NameError> {
        let rest = key
            .as_str()
            .strip_prefix(prefix.as_str())
            .ok_or_else(|| NameError::OutsidePrefix(prefix.as_str().to_owned()))?;
        if rest.is_empty() {
            return Err(NameError::Empty);
        }
        let segments = rest
            .split('/')
            .map(|s| check_segment(s).map(|()| s.to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(segments))
    }

    /// The segments, outermost first; never empty.
    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The last segment: the file's name.
    pub fn file_name(&self) -> &str {
        self.0.last().map_or("", String::as_str)
    }

    pub fn to_path(&self) -> PathBuf {
        self.0.iter().collect()
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

/// Decodes a key from a listing made with `encoding-type=url` (`%XX`, and `+` for a
/// space as S3 writes it). `None` if the bytes are not UTF-8.
pub fn url_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn check_segment(segment: &str) -> Result<(), NameError> {
    if segment.is_empty() {
        return Err(NameError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(NameError::DotSegment);
    }
    if segment.contains('\\') {
        return Err(NameError::Backslash);
    }
    if segment.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(NameError::SegmentTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> Prefix {
        Prefix::new("Delivery").expect("valid prefix")
    }

    fn map(key: &str) -> Result<String, NameError> {
        RelPath::from_key(&delivery(), &ObjectKey::from_listing(key.to_owned()))
            .map(|p| p.to_string())
    }

    #[test]
    fn prefixes_are_normalised_to_end_in_a_slash() {
        assert_eq!(delivery().as_str(), "Delivery/");
        assert_eq!(Prefix::new("a/b/").expect("valid").as_str(), "a/b/");
        assert_eq!(Prefix::new("").expect("valid").as_str(), "");
        assert_eq!(Prefix::new("/abs"), Err(NameError::LeadingSlash));
        assert_eq!(Prefix::new("a/../b"), Err(NameError::DotSegment));
    }

    #[test]
    fn ordinary_keys_map_to_relative_paths() {
        assert_eq!(map("Delivery/report.out").as_deref(), Ok("report.out"));
        assert_eq!(
            map("Delivery/results/2026/r é #?%+&=.csv").as_deref(),
            Ok("results/2026/r é #?%+&=.csv")
        );
        assert_eq!(map("Delivery/..hidden").as_deref(), Ok("..hidden"));
    }

    #[test]
    fn hostile_keys_are_rejected() {
        let cases = [
            ("Delivery/../etc/passwd", NameError::DotSegment),
            ("Delivery/a/../../x", NameError::DotSegment),
            ("Delivery/..", NameError::DotSegment),
            ("Delivery/./a", NameError::DotSegment),
            ("Delivery//etc/passwd", NameError::EmptySegment),
            ("Delivery/a//b", NameError::EmptySegment),
            ("Delivery/a\\..\\b", NameError::Backslash),
            ("Delivery/a\0b", NameError::ControlCharacter),
            ("Delivery/a\nb", NameError::ControlCharacter),
            ("Delivery/", NameError::Empty),
            ("Other/x", NameError::OutsidePrefix("Delivery/".into())),
            ("DeliveryX/x", NameError::OutsidePrefix("Delivery/".into())),
        ];
        for (key, want) in cases {
            assert_eq!(map(key), Err(want), "key {key:?}");
        }
        let long = format!("Delivery/{}", "a".repeat(256));
        assert_eq!(map(&long), Err(NameError::SegmentTooLong));
    }

    #[test]
    fn upload_keys_join_the_relative_path_with_slashes() {
        let p = Prefix::new("Submissions/").expect("valid");
        let key = ObjectKey::for_upload(&p, Path::new("sub/dir/r #1.csv")).expect("valid");
        assert_eq!(key.as_str(), "Submissions/sub/dir/r #1.csv");
        assert_eq!(
            ObjectKey::for_upload(&p, Path::new("../x")),
            Err(NameError::NotRelative)
        );
        let long = "x".repeat(200);
        let deep: PathBuf = std::iter::repeat_n(long.as_str(), 6).collect();
        assert!(matches!(
            ObjectKey::for_upload(&p, &deep),
            Err(NameError::KeyTooLong(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_names_cannot_be_keys() {
        use std::os::unix::ffi::OsStrExt;
        let p = Prefix::new("Submissions/").expect("valid");
        let name = std::ffi::OsStr::from_bytes(b"bad\xff.csv");
        assert_eq!(
            ObjectKey::for_upload(&p, Path::new(name)),
            Err(NameError::NotUtf8)
        );
    }

    #[test]
    fn listed_keys_are_url_decoded() {
        assert_eq!(
            url_decode("a%2Fb+c%01%C3%A9").as_deref(),
            Some("a/b c\u{1}é")
        );
        assert_eq!(url_decode("%ff"), None, "not UTF-8");
        assert_eq!(url_decode("100%"), None, "a bare percent");
    }

    #[test]
    fn only_single_part_etags_expose_an_md5() {
        let md5 = "\"9e107d9d372bb6826bd81d3542a419d6\"";
        assert_eq!(
            ETag::new(md5).plain_md5(),
            Some("9e107d9d372bb6826bd81d3542a419d6")
        );
        assert_eq!(
            ETag::new("\"9e107d9d372bb6826bd81d3542a419d6-3\"").plain_md5(),
            None
        );
    }

    #[test]
    fn only_md5_dash_parts_is_a_multipart_etag() {
        assert!(ETag::new("\"9e107d9d372bb6826bd81d3542a419d6-3\"").is_multipart());
        assert!(ETag::new("9e107d9d372bb6826bd81d3542a419d6-10000").is_multipart());
        for not in [
            "\"9e107d9d372bb6826bd81d3542a419d6\"",
            "\"9e107d9d372bb6826bd81d3542a419d6-\"",
            "\"9e107d9d372bb6826bd81d3542a419d6-x\"",
            "\"9e107d9d372bb6826bd81d3542a41-3\"",
            "\"zz107d9d372bb6826bd81d3542a419d6-3\"",
            "\"\"",
            "opaque-token",
        ] {
            assert!(!ETag::new(not).is_multipart(), "{not}");
        }
    }
}
