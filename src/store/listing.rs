//! A lean reader of ListObjectsV2 pages, beside the SDK's.
//!
//! Every poll lists every object under the inbox prefix, 100,000 of them a poll for a
//! busy exchange, and the SDK's XML deserializer (a general tokenizer that builds a dozen
//! optional strings and a parsed date per object) took about half of a poll's CPU.
//! [`ContentsReader`] takes the `<Contents>` elements out of a successful page before the
//! SDK sees it and reads the fields the daemon uses; the SDK still reads what is left
//! (truncation, continuation token, encoding type) and every error.
//!
//! On the pages S3 servers send it reads what the SDK reads, only cheaper; whatever it is
//! not sure of (a comment, CDATA or processing instruction, an attribute, a namespace
//! prefix, nesting deeper than `Owner`'s, an entity it does not know, a character XML
//! cannot carry, a number or date that does not parse) leaves the whole page to the SDK
//! as it came. It checks less than the SDK's parser does, though: a page malformed in a
//! way it does not look for (a bad boolean in `RestoreStatus`, a `<Contents>` outside
//! `ListBucketResult`) may be read where the SDK would refuse it. With trace logging the
//! SDK's log of the response body shows the page without its objects.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::primitives::{DateTime, DateTimeFormat, SdkBody};
use bytes::Bytes;
use http_body::{Body, Frame};
use memchr::memmem;

/// The fields of one `<Contents>` element the daemon uses, as the listing spells them
/// (the key still URL-encoded when the listing was asked with `encoding-type=url`).
#[derive(Debug, Clone, PartialEq)]
pub struct RawObject {
    pub key: String,
    pub etag: Option<String>,
    pub size: Option<i64>,
    pub last_modified: Option<DateTime>,
    pub checksum_type: Option<String>,
}

impl RawObject {
    /// The same fields from an object the SDK read; `None` without a key.
    pub fn from_sdk(o: aws_sdk_s3::types::Object) -> Option<Self> {
        Some(Self {
            key: o.key?,
            etag: o.e_tag,
            size: o.size,
            last_modified: o.last_modified,
            checksum_type: o.checksum_type.map(|t| t.as_str().to_owned()),
        })
    }
}

/// Interceptor for one ListObjectsV2 call: reads the objects of the page the call gets
/// back, which [`ContentsReader::take`] hands over once the call returns.
#[derive(Debug, Clone, Default)]
pub struct ContentsReader(Arc<Mutex<Option<Vec<RawObject>>>>);

impl ContentsReader {
    /// The objects this reader took out of the page; `None` when it left the page to
    /// the SDK (whose output then holds them all).
    pub fn take(&self) -> Option<Vec<RawObject>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl Intercept for ContentsReader {
    fn name(&self) -> &'static str {
        "ContentsReader"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // Each attempt starts afresh: what a failed attempt read is not this page.
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let response = context.response_mut();
        if response.status().as_u16() != 200 {
            return Ok(());
        }
        // A page of 1,000 keys is a few hundred KiB; a bogus length must not reserve more.
        let capacity = response
            .headers()
            .get("content-length")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(0)
            .min(4 << 20);
        let inner = std::mem::replace(response.body_mut(), SdkBody::taken());
        *response.body_mut() = SdkBody::from_body_1_x(SplitBody {
            inner,
            doc: Vec::with_capacity(capacity),
            slot: Arc::clone(&self.0),
            finished: false,
        });
        Ok(())
    }
}

/// The response body as the SDK reads it: the whole page gathered, its objects read and
/// stored in the slot, and the rest handed on as one frame.
struct SplitBody {
    inner: SdkBody,
    doc: Vec<u8>,
    slot: Arc<Mutex<Option<Vec<RawObject>>>>,
    finished: bool,
}

impl Body for SplitBody {
    type Data = Bytes;
    type Error = aws_smithy_types::body::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.doc.extend_from_slice(data);
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    this.finished = true;
                    let doc = std::mem::take(&mut this.doc);
                    let rest = match split(&doc) {
                        Some((objects, rest)) => {
                            *this.slot.lock().unwrap_or_else(PoisonError::into_inner) =
                                Some(objects);
                            rest
                        }
                        None => doc,
                    };
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
            }
        }
    }
}

const OPEN: &[u8] = b"<Contents>";
const CLOSE: &[u8] = b"</Contents>";

/// Splits a ListObjectsV2 page into its objects and the document without them; `None`
/// when the page is not a listing with objects this reader can read whole.
pub fn split(doc: &[u8]) -> Option<(Vec<RawObject>, Vec<u8>)> {
    // A `<Contents>` inside a comment, CDATA section or processing instruction is not an
    // element, and the SDK reads `<s3:Contents>` too: such pages, never seen from S3, are
    // the SDK's.
    let body = match doc.strip_prefix(b"<?xml") {
        Some(declared) => &declared[memmem::find(declared, b"?>")? + 2..],
        None => doc,
    };
    if memmem::find(body, b"<!").is_some()
        || memmem::find(body, b"<?").is_some()
        || memmem::find(body, b":Contents").is_some()
        || memmem::find(body, b"<ListBucketResult").is_none()
    {
        return None;
    }
    let opens = memmem::Finder::new(b"<Contents");
    let closes = memmem::Finder::new(CLOSE);
    let mut objects = Vec::new();
    let mut rest = Vec::with_capacity(1024);
    let mut at = 0;
    while let Some(found) = opens.find(&doc[at..]) {
        let start = at + found;
        // `<ContentsX>` or `<Contents attr="">`: not ours to guess.
        if !doc[start..].starts_with(OPEN) {
            return None;
        }
        let inner = start + OPEN.len();
        let end = inner + closes.find(&doc[inner..])?;
        objects.push(object(&doc[inner..end])?);
        rest.extend_from_slice(&doc[at..start]);
        at = end + CLOSE.len();
    }
    if objects.is_empty() {
        return None;
    }
    rest.extend_from_slice(&doc[at..]);
    Some((objects, rest))
}

/// Reads the children of one `<Contents>` element. Those the daemon does not use
/// (`StorageClass`, `Owner`, ...) are checked as the SDK would read them, not skipped
/// blindly: a malformed one sends the page to the SDK.
fn object(mut xml: &[u8]) -> Option<RawObject> {
    let mut key = None;
    let mut object = RawObject {
        key: String::new(),
        etag: None,
        size: None,
        last_modified: None,
        checksum_type: None,
    };
    loop {
        xml = trim_space(xml);
        if xml.is_empty() {
            break;
        }
        let child = element(xml, true)?;
        xml = child.rest;
        let plain = || std::str::from_utf8(child.text).ok();
        match child.name {
            b"Key" | b"ETag" | b"Size" | b"LastModified" | b"ChecksumType" if child.nested => {
                return None;
            }
            b"Key" => key = Some(text(child.text)?.into_owned()),
            b"ETag" => object.etag = Some(text(child.text)?.into_owned()),
            b"Size" => object.size = Some(plain()?.parse().ok()?),
            b"LastModified" => {
                object.last_modified =
                    Some(DateTime::from_str(plain()?, DateTimeFormat::DateTime).ok()?);
            }
            b"ChecksumType" => object.checksum_type = Some(text(child.text)?.into_owned()),
            _ => {
                text(child.text)?;
            }
        }
    }
    object.key = key?;
    Some(object)
}

/// One element at the start of `xml`.
struct Element<'a> {
    name: &'a [u8],
    /// Its character data; empty when it holds elements.
    text: &'a [u8],
    /// Whether it holds elements (each checked to be plain text).
    nested: bool,
    rest: &'a [u8],
}

/// Reads the element at the start of `xml`: a plain name (no attributes, prefix or
/// self-closing tag) and either text or, where `may_nest`, elements holding only text
/// (`Owner`'s `ID` and `DisplayName`). Anything else is `None`.
fn element(xml: &[u8], may_nest: bool) -> Option<Element<'_>> {
    let after_lt = xml.strip_prefix(b"<")?;
    let gt = memchr::memchr(b'>', after_lt)?;
    let name = &after_lt[..gt];
    let (first, more) = name.split_first()?;
    if !first.is_ascii_alphabetic() || !more.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let body = &after_lt[gt + 1..];
    let lt = memchr::memchr(b'<', body)?;
    let (mut content, mut after) = (&body[..lt], &body[lt..]);
    let nested = !after.starts_with(b"</");
    if nested {
        if !may_nest || !trim_space(content).is_empty() {
            return None;
        }
        while !after.starts_with(b"</") {
            let inner = element(after, false)?;
            text(inner.text)?;
            after = trim_space(inner.rest);
        }
        content = &[];
    }
    let rest = after
        .strip_prefix(b"</")?
        .strip_prefix(name)?
        .strip_prefix(b">")?;
    Some(Element {
        name,
        text: content,
        nested,
        rest,
    })
}

/// `xml` without the white space XML allows before it (not `trim_ascii_start`: a form
/// feed is no XML white space).
fn trim_space(xml: &[u8]) -> &[u8] {
    let n = xml
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &xml[n..]
}

/// XML character data to a string: the five predefined entities and character
/// references decoded. Refused, as the SDK's parser refuses them or might read them
/// otherwise: control characters raw or referenced (even tab and newline, which XML
/// allows but a conforming parser may rewrite), `]]>`, and U+FFFE and U+FFFF.
fn text(raw: &[u8]) -> Option<Cow<'_, str>> {
    if raw.iter().any(|&b| b < 0x20) {
        return None;
    }
    let raw = std::str::from_utf8(raw).ok()?;
    // `]` and U+FFFE/U+FFFF's first byte are rare in keys: the exact checks run seldom.
    if memchr::memchr2(b']', 0xEF, raw.as_bytes()).is_some()
        && (raw.contains("]]>") || raw.contains(['\u{FFFE}', '\u{FFFF}']))
    {
        return None;
    }
    // memchr, not `str::find`: every ETag holds two `&quot;`, every poll 100,000 ETags.
    let Some(first) = memchr::memchr(b'&', raw.as_bytes()) else {
        return Some(Cow::Borrowed(raw));
    };
    let mut out = String::with_capacity(raw.len());
    out.push_str(&raw[..first]);
    let mut rest = &raw[first..];
    while let Some(amp) = memchr::memchr(b'&', rest.as_bytes()) {
        out.push_str(&rest[..amp]);
        let entity = &rest[amp + 1..];
        let semi = memchr::memchr(b';', entity.as_bytes())?;
        let decoded = match &entity[..semi] {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            reference => {
                let code = match reference.strip_prefix("#x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => reference.strip_prefix('#')?.parse().ok()?,
                };
                char::from_u32(code).filter(|c| !c.is_control())?
            }
        };
        out.push(decoded);
        rest = &entity[semi + 1..];
    }
    out.push_str(rest);
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as the Ceph RADOS Gateway writes it: one line, an Owner in each object.
    const RGW: &str = concat!(
        r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#,
        "<Name>perf</Name><Prefix>Delivery/</Prefix><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>",
        "<Contents><Key>Delivery/a &amp; b&#x20;&lt;c&gt;</Key><LastModified>2026-12-07T02:08:47.123Z</LastModified>",
        "<ETag>&quot;9e107d9d372bb6826bd81d3542a419d6&quot;</ETag><Size>4096</Size><StorageClass>STANDARD</StorageClass>",
        "<Owner><ID>owner</ID><DisplayName>Owner</DisplayName></Owner><Type>Normal</Type></Contents>",
        "<Contents><Key>Delivery/ünï/€</Key><LastModified>2026-12-07T02:08:48.000Z</LastModified>",
        "<ETag>&quot;abc-2&quot;</ETag><Size>0</Size><ChecksumType>FULL_OBJECT</ChecksumType></Contents>",
        "<KeyCount>2</KeyCount><NextContinuationToken>next+/=</NextContinuationToken></ListBucketResult>",
    );

    /// A page as moto writes it: indented, no ETag on the folder marker.
    const MOTO: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name>
  <Prefix>Delivery/</Prefix>
  <KeyCount>2</KeyCount>
  <IsTruncated>false</IsTruncated>
  <Contents>
    <Key>Delivery/</Key>
    <LastModified>2026-12-07T02:08:47Z</LastModified>
    <Size>0</Size>
  </Contents>
  <Contents>
    <Key>Delivery/x.csv</Key>
    <LastModified>2026-12-07T02:08:47.5Z</LastModified>
    <ETag>"d41d8cd98f00b204e9800998ecf8427e"</ETag>
    <Size>123</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
</ListBucketResult>"#;

    fn date(s: &str) -> Option<DateTime> {
        Some(DateTime::from_str(s, DateTimeFormat::DateTime).unwrap())
    }

    #[test]
    fn reads_the_fields_the_daemon_uses_and_keeps_the_rest_for_the_sdk() {
        let (objects, rest) = split(RGW.as_bytes()).expect("a plain RGW page is read");
        assert_eq!(
            objects,
            [
                RawObject {
                    key: "Delivery/a & b <c>".into(),
                    etag: Some("\"9e107d9d372bb6826bd81d3542a419d6\"".into()),
                    size: Some(4096),
                    last_modified: date("2026-12-07T02:08:47.123Z"),
                    checksum_type: None,
                },
                RawObject {
                    key: "Delivery/ünï/€".into(),
                    etag: Some("\"abc-2\"".into()),
                    size: Some(0),
                    last_modified: date("2026-12-07T02:08:48.000Z"),
                    checksum_type: Some("FULL_OBJECT".into()),
                },
            ]
        );
        let rest = String::from_utf8(rest).unwrap();
        assert!(!rest.contains("Contents"), "{rest}");
        assert!(rest.contains("<IsTruncated>true</IsTruncated>"), "{rest}");
        assert!(
            rest.ends_with(
                "<NextContinuationToken>next+/=</NextContinuationToken></ListBucketResult>"
            ),
            "{rest}"
        );

        let (objects, rest) = split(MOTO.as_bytes()).expect("an indented page is read");
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].key, "Delivery/");
        assert_eq!(objects[0].etag, None);
        assert_eq!(objects[1].size, Some(123));
        assert_eq!(objects[1].last_modified, date("2026-12-07T02:08:47.5Z"));
        assert!(!String::from_utf8(rest).unwrap().contains("Contents"));
    }

    #[test]
    fn leaves_to_the_sdk_every_page_it_is_not_sure_of() {
        // Each case: why, and the text of the good page it replaces (to break it).
        let cases: &[(&str, &str, &str)] = &[
            ("a comment", "<Size>4096", "<!-- x --><Size>4096"),
            ("CDATA", "Delivery/a &amp;", "<![CDATA[Delivery/a &]]>"),
            ("a control character", "Delivery/a &amp;", "Delivery/\u{1}a"),
            (
                "a referenced control character",
                "Delivery/a &amp;",
                "Delivery/&#1;a",
            ),
            ("a raw carriage return", "Delivery/a &amp;", "Delivery/\ra"),
            ("an unknown entity", "Delivery/a &amp;", "Delivery/&nbsp;"),
            (
                "an unterminated entity",
                "Delivery/a &amp;",
                "Delivery/&amp",
            ),
            ("an attribute", "<Key>Delivery/a", "<Key x=\"1\">Delivery/a"),
            ("a self-closing element", "<Size>0</Size>", "<Size/>"),
            (
                "a namespace prefix",
                "<Size>4096</Size>",
                "<s:Size>4096</s:Size>",
            ),
            ("a size that is no number", "<Size>4096", "<Size>4 096"),
            (
                "a date that does not parse",
                "2026-12-07T02:08:47.123Z",
                "yesterday",
            ),
            ("no key", "<Key>Delivery/a &amp; b&#x20;&lt;c&gt;</Key>", ""),
            ("an unclosed element", "</Contents><KeyCount>", "<KeyCount>"),
            (
                "a mismatched end tag",
                "<Size>4096</Size>",
                "<Size>4096</Sise>",
            ),
            ("text between elements", "<Size>4096", "stray<Size>4096"),
            (
                "an attribute on Contents",
                "<Contents>",
                "<Contents a=\"b\">",
            ),
            (
                "a processing instruction",
                "<KeyCount>",
                "<?pi x?><KeyCount>",
            ),
            ("a prefixed Contents", "<Contents>", "<s3:Contents>"),
            ("]]> in text", "Delivery/a &amp;", "Delivery/a]]>"),
            ("U+FFFF in text", "Delivery/a &amp;", "Delivery/a\u{FFFF}"),
            (
                "a form feed between children",
                "<Size>4096",
                "\u{C}<Size>4096",
            ),
            (
                "a name starting with a digit",
                "<Type>Normal</Type>",
                "<1a>b</1a>",
            ),
            (
                "a bad entity in a skipped child",
                "<ID>owner</ID>",
                "<ID>&foo;</ID>",
            ),
            (
                "a skipped child badly nested",
                "<DisplayName>Owner</DisplayName>",
                "<DisplayName>Owner",
            ),
            (
                "nesting two levels deep",
                "<ID>owner</ID>",
                "<ID><X>y</X></ID>",
            ),
            (
                "elements in a wanted field",
                "<Size>4096</Size>",
                "<Size><X>1</X></Size>",
            ),
            (
                "text beside skipped elements",
                "<ID>owner</ID>",
                "x<ID>owner</ID>",
            ),
        ];
        for (why, from, to) in cases {
            assert!(RGW.contains(from), "{why}: the page has no {from}");
            let page = RGW.replacen(from, to, 1);
            assert_eq!(split(page.as_bytes()), None, "{why}: {page}");
        }
        let error = r#"<?xml version="1.0"?><Error><Code>AccessDenied</Code><Contents>x</Contents></Error>"#;
        assert_eq!(split(error.as_bytes()), None, "an error document");
        let empty = r#"<ListBucketResult><KeyCount>0</KeyCount></ListBucketResult>"#;
        assert_eq!(split(empty.as_bytes()), None, "a page without objects");
        assert!(text(b"tab\tin a key").is_none());
        assert_eq!(text(b"&#65;&#x42;&#x1F600;").as_deref(), Some("AB😀"));
    }

    /// Serves `page` to every request, as a bucket on 127.0.0.1 would.
    async fn serve(page: &'static str) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        request.extend_from_slice(&buf[..n]);
                        // A GET has no body: each blank line ends a request.
                        while let Some(end) = memmem::find(&request, b"\r\n\r\n") {
                            request.drain(..end + 4);
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n",
                                page.len()
                            );
                            let reply = [head.as_bytes(), page.as_bytes()].concat();
                            if conn.write_all(&reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_sdk_reads_the_same_page_alike() {
        use aws_sdk_s3::config::{Credentials, Region};
        for page in [RGW, MOTO] {
            let addr = serve(page).await;
            let config = aws_sdk_s3::Config::builder()
                .behavior_version_latest()
                .region(Region::new("us-east-1"))
                .endpoint_url(format!("http://{addr}"))
                .force_path_style(true)
                .credentials_provider(Credentials::new("key", "secret", None, None, "test"))
                .build();
            let client = aws_sdk_s3::Client::from_conf(config);
            let reader = ContentsReader::default();
            let read = client
                .list_objects_v2()
                .bucket("b")
                .customize()
                .interceptor(reader.clone())
                .send()
                .await
                .unwrap();
            let ours = reader.take().expect("the reader read the page");
            assert_eq!(read.contents, None, "the SDK was left no objects");
            let sdk = client.list_objects_v2().bucket("b").send().await.unwrap();
            let theirs: Vec<_> = (sdk.contents.clone().unwrap().into_iter())
                .filter_map(RawObject::from_sdk)
                .collect();
            assert_eq!(ours, theirs);
            assert_eq!(
                (
                    read.is_truncated,
                    read.next_continuation_token,
                    read.key_count,
                    read.name
                ),
                (
                    sdk.is_truncated,
                    sdk.next_continuation_token,
                    sdk.key_count,
                    sdk.name
                ),
                "the rest of the page reads as before"
            );
        }
    }
}
