//! The S3 side: credentials, the client, and the handful of calls the daemon makes.
//! The only module that knows the AWS SDK.
//!
//! The daemon's rights on the owner's bucket are List, Get (under the inbox prefix) and
//! Put (under the outbox prefix), so it never calls a bucket-level API and never reads
//! its own uploads back. Every upload carries the configured canned ACL and, when set,
//! the expected bucket owner. Every failure becomes an [`Error`] with a [`Class`]
//! decided by [`classify`] alone, and a hint naming the setting that likely fixes it.
//! Its submodules: [`listing`] reads listing pages more cheaply than the SDK does, and
//! [`http`] is the HTTP client under the calls (the SDK's parts, with quick ACKs).

mod http;
mod listing;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    ConfigBag, Intercept, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    RuntimeComponents, SharedCredentialsProvider,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
pub use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::primitives::Length;
use aws_sdk_s3::types::{
    ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart, EncodingType,
    ObjectCannedAcl,
};

use crate::config::{self, Acl, Checksums};
use crate::keys::{self, ChangeToken, ETag, ObjectKey, Prefix};

/// Whether trying again later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Network trouble, throttling, server errors, timeouts: retry with backoff.
    Transient,
    /// The request itself is refused (rights, ACL, names): retrying as is cannot help.
    Permanent,
    /// A conditional GET found a different version (412): list again.
    Changed,
    /// The object is gone (404).
    Gone,
}

/// A failed S3 call, with what is needed to log it usefully.
#[derive(Debug, thiserror::Error)]
#[error("{op} {key}: {message}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
pub struct Error {
    pub op: &'static str,
    pub key: String,
    pub class: Class,
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
    pub hint: Option<&'static str>,
    /// No answer at all (connection refused or reset, timeout): the endpoint, not the
    /// request, is the problem.
    pub unreachable: bool,
}

/// A reply that arrived (2xx) but could not be read: for a listing, keys XML cannot carry.
fn is_unparseable(err: &Error) -> bool {
    err.status.is_some_and(|s| (200..300).contains(&s))
}

/// Whether the endpoint answered the last call.
struct Health {
    endpoint: String,
    down: AtomicBool,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "no AWS region: set s3.region in the configuration, AWS_REGION, or a region in the profile"
    )]
    NoRegion,
    #[error("cannot set up TLS: {0}")]
    Tls(rustls::Error),
}

/// One object from a listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: ObjectKey,
    pub etag: Option<ETag>,
    pub size: u64,
    pub last_modified_ms: i64,
    /// The listing marks a full-object checksum (`ChecksumType: FULL_OBJECT`), which the
    /// SDK verifies on a whole-object GET.
    pub full_object_checksum: bool,
}

impl Listed {
    /// The ETag when the listing has one; otherwise size and LastModified (s3s-fs
    /// lists without ETags).
    pub fn token(&self) -> ChangeToken {
        match &self.etag {
            Some(etag) => ChangeToken::from_etag(etag),
            None => ChangeToken::from_size_and_mtime(self.size, self.last_modified_ms),
        }
    }
}

/// One page of a listing and where the next one starts.
pub struct ListPage {
    pub objects: Vec<Listed>,
    pub next: Option<String>,
}

/// An object being downloaded.
pub struct Download {
    pub body: ByteStream,
    pub etag: Option<ETag>,
    pub content_length: Option<u64>,
    /// SSE-KMS objects have MD5-shaped ETags that are not MD5s.
    pub kms: bool,
}

/// A part S3 accepted.
#[derive(Debug, Clone)]
pub struct Part {
    pub number: i32,
    pub etag: Option<String>,
}

/// The S3 client bound to the exchange bucket and its upload rules.
#[derive(Clone)]
pub struct Store {
    client: Client,
    health: Arc<Health>,
    /// Set once a plain listing could not be parsed: list with `encoding-type=url`.
    url_listings: Arc<AtomicBool>,
    bucket: String,
    acl: Option<ObjectCannedAcl>,
    expected_owner: Option<String>,
}

impl Store {
    /// Resolves credentials through aws-config's default chain (environment, profile,
    /// SSO, web identity, instance role), then `profile` and `role_arn` on top, and sets
    /// timeouts so that no call can hang forever.
    pub async fn connect(s3: &config::S3, transfer: &config::Transfer) -> Result<Self, SetupError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &s3.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(profile) = &s3.profile {
            loader = loader.profile_name(profile);
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(SetupError::NoRegion);
        }
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(transfer.connect_timeout)
            .read_timeout(transfer.attempt_timeout)
            .operation_attempt_timeout(transfer.attempt_timeout)
            .operation_timeout(transfer.operation_timeout)
            .build();
        let checksums = match s3.checksums {
            Checksums::WhenSupported => RequestChecksumCalculation::WhenSupported,
            Checksums::WhenRequired => RequestChecksumCalculation::WhenRequired,
        };
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(s3.force_path_style)
            .request_checksum_calculation(checksums)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(timeouts)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(transfer.max_attempts)
                    .with_max_backoff(Duration::from_secs(20)),
            );
        if let Some(variable) = http::proxy_in_environment() {
            tracing::info!(
                variable,
                "a proxy is set in the environment: S3 calls go through the SDK's HTTP client, which honours it (and NO_PROXY)"
            );
        } else {
            builder = builder.http_client(http::QuickAckClient::new().map_err(SetupError::Tls)?);
        }
        if let Some(url) = &s3.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        if let Some(arn) = &s3.role_arn {
            let mut role = aws_config::sts::AssumeRoleProvider::builder(arn)
                .session_name("s3-exchange")
                .configure(&sdk);
            if let Some(id) = &s3.external_id {
                role = role.external_id(id);
            }
            builder =
                builder.credentials_provider(SharedCredentialsProvider::new(role.build().await));
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            url_listings: Arc::new(AtomicBool::new(false)),
            health: Arc::new(Health {
                endpoint: s3
                    .endpoint_url
                    .clone()
                    .unwrap_or_else(|| "the S3 endpoint".into()),
                down: AtomicBool::new(false),
            }),
            bucket: s3.bucket.clone(),
            acl: match &s3.acl {
                Acl::None => None,
                Acl::Canned(name) => Some(ObjectCannedAcl::from(name.as_str())),
            },
            expected_owner: s3.expected_bucket_owner.clone(),
        })
    }

    /// True while the endpoint does not answer (connection refused, timeouts): the
    /// workers then send one probe at a time instead of every queued file.
    pub fn is_down(&self) -> bool {
        self.health.down.load(Ordering::Relaxed)
    }

    /// Turns an SDK result into ours and keeps [`Health`] current, so that an outage
    /// is logged once when it starts and once when it ends, not once per file.
    fn observe<T, E>(
        &self,
        result: Result<T, SdkError<E, HttpResponse>>,
        op: &'static str,
        key: impl ToString,
    ) -> Result<T, Error>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match result {
            Ok(out) => {
                if self.health.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.health.endpoint, "S3 answers again: catching up");
                }
                Ok(out)
            }
            Err(err) => {
                let err = sdk_error(op, key, err);
                if err.unreachable && !self.health.down.swap(true, Ordering::Relaxed) {
                    tracing::error!(endpoint = %self.health.endpoint, error = %err, "cannot reach S3: transfers wait and retry quietly until it answers");
                }
                Err(err)
            }
        }
    }

    /// Single PUT of `len` bytes of `path`, streamed from disk, with their MD5.
    pub async fn put_object(
        &self,
        key: &ObjectKey,
        path: &Path,
        len: u64,
        md5: &[u8; 16],
    ) -> Result<Option<ETag>, Error> {
        let body = file_body(path, 0, len)
            .await
            .map_err(|e| io_error("PutObject", key, e))?;
        self.put_body(key, body, len, md5).await
    }

    /// Uploads `bytes`, already read and hashed, as `key` with one PUT: how small files
    /// go, so that the bytes hashed are exactly the bytes sent and nothing is read twice.
    pub async fn put_object_bytes(
        &self,
        key: &ObjectKey,
        bytes: bytes::Bytes,
        md5: &[u8; 16],
    ) -> Result<Option<ETag>, Error> {
        let len = bytes.len() as u64;
        self.put_body(key, ByteStream::from(bytes), len, md5).await
    }

    async fn put_body(
        &self,
        key: &ObjectKey,
        body: ByteStream,
        len: u64,
        md5: &[u8; 16],
    ) -> Result<Option<ETag>, Error> {
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .set_acl(self.acl.clone())
            .set_expected_bucket_owner(self.expected_owner.clone())
            .content_length(to_i64(len))
            .content_md5(aws_smithy_types::base64::encode(md5))
            .body(body)
            .send()
            .await;
        let out = self.observe(out, "PutObject", key)?;
        Ok(out.e_tag.map(ETag::new))
    }

    /// Starts a multipart upload; the ACL goes here, not on the parts.
    pub async fn create_multipart(&self, key: &ObjectKey) -> Result<String, Error> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key.as_str())
            .set_acl(self.acl.clone())
            .set_expected_bucket_owner(self.expected_owner.clone())
            .send()
            .await;
        let out = self.observe(out, "CreateMultipartUpload", key)?;
        out.upload_id.ok_or_else(|| Error {
            op: "CreateMultipartUpload",
            key: key.to_string(),
            class: Class::Transient,
            code: None,
            status: None,
            message: "the server returned no UploadId".into(),
            hint: None,
            unreachable: false,
        })
    }

    /// Uploads bytes `offset..offset+len` of `path` as part `number`, with their MD5.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_part(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        number: i32,
        path: &Path,
        offset: u64,
        len: u64,
        md5: &[u8; 16],
    ) -> Result<Part, Error> {
        let body = file_body(path, offset, len)
            .await
            .map_err(|e| io_error("UploadPart", key, e))?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key.as_str())
            .upload_id(upload_id)
            .part_number(number)
            .set_expected_bucket_owner(self.expected_owner.clone())
            .content_length(to_i64(len))
            .content_md5(aws_smithy_types::base64::encode(md5))
            .body(body)
            .send()
            .await;
        let out = self.observe(out, "UploadPart", key)?;
        Ok(Part {
            number,
            etag: out.e_tag,
        })
    }

    pub async fn complete_multipart(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        parts: &[Part],
    ) -> Result<Option<ETag>, Error> {
        let parts = parts
            .iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number)
                    .set_e_tag(p.etag.clone())
                    .build()
            })
            .collect();
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key.as_str())
            .upload_id(upload_id)
            .set_expected_bucket_owner(self.expected_owner.clone())
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        let out = self.observe(out, "CompleteMultipartUpload", key)?;
        Ok(out.e_tag.map(ETag::new))
    }

    /// Frees the parts of an upload that will not complete.
    pub async fn abort_multipart(&self, key: &ObjectKey, upload_id: &str) -> Result<(), Error> {
        let out = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key.as_str())
            .upload_id(upload_id)
            .set_expected_bucket_owner(self.expected_owner.clone())
            .send()
            .await;
        self.observe(out, "AbortMultipartUpload", key).map(drop)
    }

    /// One page (up to 1,000 keys) of ListObjectsV2 under `prefix`.
    ///
    /// Keys may hold characters XML 1.0 cannot carry (control characters), which make
    /// the listing unparseable. Then the page is asked again with `encoding-type=url`
    /// (and every later listing too). Not from the start: some servers (s3s-fs) echo
    /// the encoding type without encoding, and decoding their raw keys would turn
    /// `a+b` into `a b`.
    pub async fn list_page(
        &self,
        prefix: &Prefix,
        start: Option<String>,
    ) -> Result<ListPage, Error> {
        let encoded = self.url_listings.load(Ordering::Relaxed);
        match self.list_page_as(prefix, start.clone(), encoded).await {
            Err(err) if !encoded && is_unparseable(&err) => {
                let page = self.list_page_as(prefix, start, true).await?;
                tracing::info!(
                    "the listing holds keys XML cannot carry: listing with encoding-type=url from now on"
                );
                self.url_listings.store(true, Ordering::Relaxed);
                Ok(page)
            }
            other => other,
        }
    }

    async fn list_page_as(
        &self,
        prefix: &Prefix,
        start: Option<String>,
        url_encoded: bool,
    ) -> Result<ListPage, Error> {
        let reader = listing::ContentsReader::default();
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix.as_str())
            .set_continuation_token(start)
            .set_encoding_type(url_encoded.then_some(EncodingType::Url))
            .set_expected_bucket_owner(self.expected_owner.clone())
            .customize()
            .interceptor(reader.clone())
            .send()
            .await;
        let mut out = self.observe(out, "ListObjectsV2", prefix.as_str())?;
        let decode = url_encoded && out.encoding_type == Some(EncodingType::Url);
        // The reader's objects, or the SDK's where it left the page to the SDK.
        let raw = reader.take().unwrap_or_default().into_iter();
        let sdk = out.contents.take().unwrap_or_default().into_iter();
        let objects = raw
            .chain(sdk.filter_map(listing::RawObject::from_sdk))
            .filter_map(|o| {
                let key = if decode {
                    keys::url_decode(&o.key)?
                } else {
                    o.key
                };
                Some(Listed {
                    key: ObjectKey::from_listing(key),
                    etag: o.etag.filter(|e| !e.is_empty()).map(ETag::new),
                    size: o.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    last_modified_ms: o
                        .last_modified
                        .and_then(|t| t.to_millis().ok())
                        .unwrap_or(0),
                    full_object_checksum: o.checksum_type.as_deref()
                        == Some(ChecksumType::FullObject.as_str()),
                })
            })
            .collect();
        let next = if out.is_truncated == Some(true) {
            out.next_continuation_token
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }

    /// GET pinned to the listed version with `If-Match` when there is an ETag.
    pub async fn get_object(
        &self,
        key: &ObjectKey,
        if_match: Option<&ETag>,
    ) -> Result<Download, Error> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .set_if_match(if_match.map(|e| e.as_str().to_owned()))
            // Where the object carries a checksum the SDK verifies the body against it.
            .checksum_mode(ChecksumMode::Enabled)
            .set_expected_bucket_owner(self.expected_owner.clone())
            .send()
            .await;
        let out = self.observe(out, "GetObject", key)?;
        Ok(Download {
            kms: out
                .server_side_encryption
                .as_ref()
                .is_some_and(|s| s.as_str().starts_with("aws:kms")),
            etag: out.e_tag.filter(|e| !e.is_empty()).map(ETag::new),
            content_length: out.content_length.and_then(|l| u64::try_from(l).ok()),
            body: out.body,
        })
    }

    /// GET of the `len` bytes from `offset` of an object of `size` bytes, pinned with
    /// `If-Match` to `etag`. The answer must be a 206 whose Content-Range and length name
    /// exactly those bytes, and its ETag, if it sends one, must be `etag`: a server that
    /// ignores `Range` and sends the whole object with a 200 is refused here, before a
    /// byte is read. The caller checks that the body holds `len` bytes.
    pub async fn get_range(
        &self,
        key: &ObjectKey,
        etag: &ETag,
        (offset, len): (u64, u64),
        size: u64,
    ) -> Result<ByteStream, Error> {
        let last = offset + len.saturating_sub(1);
        let status = StatusProbe::default();
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .if_match(etag.as_str())
            .range(format!("bytes={offset}-{last}"))
            .set_expected_bucket_owner(self.expected_owner.clone())
            .customize()
            .interceptor(status.clone())
            .send()
            .await;
        let out = self.observe(out, "GetObject", key)?;
        let refuse = |class: Class, message: String| Error {
            op: "GetObject",
            key: key.to_string(),
            class,
            code: None,
            status: Some(status.get()),
            message,
            hint: None,
            unreachable: false,
        };
        let status_code = status.get();
        if status_code != 206 {
            return Err(refuse(
                Class::Transient,
                format!(
                    "asked for bytes {offset}-{last}, got HTTP {status_code} without a range (the server ignored the Range header?)"
                ),
            ));
        }
        let range_ok = out
            .content_range
            .as_deref()
            .and_then(parse_content_range)
            .is_some_and(|(first, end, total)| {
                first == offset && end == last && total.is_none_or(|t| t == size)
            });
        if !range_ok {
            return Err(refuse(
                Class::Transient,
                format!(
                    "asked for bytes {offset}-{last}/{size}, got Content-Range {:?}",
                    out.content_range.as_deref().unwrap_or("(none)")
                ),
            ));
        }
        if out.content_length.and_then(|l| u64::try_from(l).ok()) != Some(len) {
            return Err(refuse(
                Class::Transient,
                format!(
                    "asked for {len} bytes, got Content-Length {:?}",
                    out.content_length
                ),
            ));
        }
        // Another ETag despite If-Match (a server that ignores it): another version, so
        // the whole download is dropped and the key listed again, as after a 412.
        let bare = |e: &str| e.trim_start_matches("W/").trim_matches('"').to_owned();
        if let Some(got) = out.e_tag.as_deref().filter(|e| !e.is_empty())
            && bare(got) != bare(etag.as_str())
        {
            return Err(refuse(
                Class::Changed,
                format!("the range came with ETag {got}, not the listed {etag}"),
            ));
        }
        Ok(out.body)
    }
}

/// Records the HTTP status of a call's (last) response, which the SDK's outputs do not
/// carry: a 200 and a 206 parse into the same GetObject output.
#[derive(Debug, Clone, Default)]
struct StatusProbe(Arc<AtomicU16>);

impl StatusProbe {
    fn get(&self) -> u16 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Intercept for StatusProbe {
    fn name(&self) -> &'static str {
        "StatusProbe"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0
            .store(context.response().status().as_u16(), Ordering::Relaxed);
        Ok(())
    }
}

/// `bytes <first>-<last>/<total>` (total `*` when unknown) -> `(first, last, total)`.
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((first.parse().ok()?, last.parse().ok()?, total))
}

async fn file_body(
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<ByteStream, aws_smithy_types::byte_stream::error::Error> {
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        // Never a buffer bigger than the body: a 256 KiB buffer per small file costs an
        // allocation the allocator must consolidate (a fifth of the CPU of 1,000 uploads).
        .buffer_size(usize::try_from(len.clamp(1, 256 << 10)).unwrap_or(256 << 10))
        .build()
        .await
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn io_error(op: &'static str, key: impl ToString, err: impl std::fmt::Display) -> Error {
    Error {
        op,
        key: key.to_string(),
        class: Class::Transient,
        code: None,
        status: None,
        message: format!("cannot read the local file: {err}"),
        hint: None,
        unreachable: false,
    }
}

/// Turns any SDK failure into an [`Error`], through [`classify`] and [`hint`].
fn sdk_error<E>(op: &'static str, key: impl ToString, err: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let kind = match &err {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => Failure::Response,
        SdkError::TimeoutError(_) => Failure::Timeout,
        // A body stream that failed is our file (vanished, unreadable), not the network.
        SdkError::DispatchFailure(f) if f.is_user() => Failure::LocalBody,
        SdkError::DispatchFailure(_) => Failure::Dispatch,
        _ => Failure::Construction,
    };
    // Some servers (Ceph RGW) send an empty <Message>: the code and status say enough,
    // where the SDK's full context would dump the whole response.
    let message = match (err.message(), code.as_deref(), status) {
        (Some(m), Some(c), _) if !m.is_empty() => format!("{c}: {m}"),
        (_, Some(c), Some(s)) => format!("{c} (HTTP {s})"),
        (_, Some(c), None) => c.to_owned(),
        _ => DisplayErrorContext(&err).to_string(),
    };
    let class = classify(kind, status, code.as_deref());
    Error {
        unreachable: matches!(kind, Failure::Timeout | Failure::Dispatch),
        op,
        key: key.to_string(),
        class,
        hint: hint(op, status, code.as_deref(), &message),
        code,
        status,
        message,
    }
}

/// Where an SDK call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server answered with an error (or an unparseable reply).
    Response,
    /// Connect, attempt or operation timeout.
    Timeout,
    /// The request never got a reply: connection refused or reset, DNS, credentials.
    Dispatch,
    /// The request could not be built.
    Construction,
    /// The request body (a local file) could not be read while it was being sent.
    LocalBody,
}

/// The one place that decides whether an S3 failure is worth retrying.
pub fn classify(failure: Failure, status: Option<u16>, code: Option<&str>) -> Class {
    match failure {
        Failure::Timeout | Failure::Dispatch | Failure::LocalBody => return Class::Transient,
        Failure::Construction => return Class::Permanent,
        Failure::Response => {}
    }
    match code {
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestTimeout"
            | "RequestTimeTooSkewed"
            | "InternalError"
            | "ServiceUnavailable"
            | "ExpiredToken"
            | "TokenRefreshRequired"
            | "BadDigest"
            | "IncompleteBody",
        ) => return Class::Transient,
        Some("PreconditionFailed") => return Class::Changed,
        Some("NoSuchKey") => return Class::Gone,
        _ => {}
    }
    match status {
        Some(412) => Class::Changed,
        Some(404) if code.is_none() => Class::Gone,
        Some(408 | 429) => Class::Transient,
        Some(s) if s >= 500 => Class::Transient,
        // A success the SDK could not parse: the outcome is unknown, so try again
        // rather than give up on the file.
        Some(200..=299) => Class::Transient,
        Some(_) => Class::Permanent,
        // An unparseable reply without a status: a cut connection, most likely.
        None => Class::Transient,
    }
}

/// The likely cause of a refusal, naming the setting that fixes it.
pub fn hint(
    op: &str,
    status: Option<u16>,
    code: Option<&str>,
    message: &str,
) -> Option<&'static str> {
    match code {
        Some("AccessDenied") if op == "UploadPart" => Some(
            "the bucket policy refuses parts (UploadPart carries no x-amz-acl, so a policy requiring s3:x-amz-acl denies every part): ask the owner to exempt UploadPart, or raise transfer.multipart_threshold so files go as single PUTs (up to 5GiB)",
        ),
        Some("AccessDenied") => Some(
            "the bucket policy does not allow this call for these credentials, or it requires an ACL or header: check s3.acl (the owner usually requires bucket-owner-full-control), s3.expected_bucket_owner and the prefixes",
        ),
        Some("AccessControlListNotSupported") => Some(
            "the bucket has ACLs disabled (Object Ownership: bucket owner enforced): set s3.acl = \"bucket-owner-full-control\", the only ACL such buckets accept, or \"none\"",
        ),
        Some("XAmzContentSHA256Mismatch" | "MissingContentLength") => Some(
            "this server rejects the SDK's checksummed aws-chunked uploads: set s3.checksums = \"when_required\"",
        ),
        Some("NoSuchBucket") => Some("check s3.bucket, s3.region and s3.endpoint_url"),
        Some("InvalidBucketName") => Some("check s3.bucket: it is not a valid bucket name"),
        Some("InvalidAccessKeyId" | "SignatureDoesNotMatch") => Some(
            "the credentials are not accepted: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, s3.profile or the SSO session (aws sso login)",
        ),
        Some("ExpiredToken") => Some(
            "the session expired: refresh it (aws sso login, or the role's source credentials)",
        ),
        Some(
            "PermanentRedirect"
            | "AuthorizationHeaderMalformed"
            | "IllegalLocationConstraintException",
        ) => Some("the bucket is in another region: set s3.region to the bucket's region"),
        Some("RequestTimeTooSkewed") => Some("this machine's clock is off: synchronise it (NTP)"),
        _ if status == Some(403) => Some(
            "access denied (a wrong s3.expected_bucket_owner gives this too): check the bucket policy, s3.acl and s3.expected_bucket_owner",
        ),
        _ if message.contains("credential") => Some(
            "no usable AWS credentials: set AWS_PROFILE or s3.profile, export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or log in (aws sso login)",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_trouble_and_throttling_are_transient() {
        assert_eq!(classify(Failure::Timeout, None, None), Class::Transient);
        assert_eq!(classify(Failure::Dispatch, None, None), Class::Transient);
        assert_eq!(classify(Failure::LocalBody, None, None), Class::Transient);
        assert_eq!(
            classify(Failure::Response, Some(503), Some("SlowDown")),
            Class::Transient
        );
        assert_eq!(
            classify(Failure::Response, Some(500), None),
            Class::Transient
        );
        assert_eq!(
            classify(Failure::Response, Some(429), None),
            Class::Transient
        );
        assert_eq!(
            classify(Failure::Response, Some(400), Some("RequestTimeout")),
            Class::Transient
        );
        assert_eq!(
            classify(Failure::Response, Some(400), Some("BadDigest")),
            Class::Transient
        );
        assert_eq!(classify(Failure::Response, None, None), Class::Transient);
        assert_eq!(
            classify(Failure::Response, Some(200), None),
            Class::Transient,
            "an unparseable 200 is an unknown outcome, not a refusal"
        );
    }

    #[test]
    fn refusals_are_permanent() {
        for code in [
            "AccessDenied",
            "AccessControlListNotSupported",
            "InvalidBucketName",
            "NoSuchBucket",
        ] {
            assert_eq!(
                classify(Failure::Response, Some(403), Some(code)),
                Class::Permanent,
                "{code}"
            );
        }
        assert_eq!(
            classify(
                Failure::Response,
                Some(400),
                Some("XAmzContentSHA256Mismatch")
            ),
            Class::Permanent
        );
        assert_eq!(
            classify(Failure::Construction, None, None),
            Class::Permanent
        );
    }

    #[test]
    fn version_changes_and_deletions_are_told_apart() {
        assert_eq!(
            classify(Failure::Response, Some(412), Some("PreconditionFailed")),
            Class::Changed
        );
        assert_eq!(classify(Failure::Response, Some(412), None), Class::Changed);
        assert_eq!(
            classify(Failure::Response, Some(404), Some("NoSuchKey")),
            Class::Gone
        );
    }

    #[test]
    fn content_ranges_are_read_exactly() {
        assert_eq!(parse_content_range("bytes 0-4/12"), Some((0, 4, Some(12))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        for bad in [
            "",
            "bytes",
            "bytes 0-4",
            "items 0-4/12",
            "bytes a-4/12",
            "bytes */12",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn hints_name_the_setting() {
        let h = |code| hint("PutObject", Some(400), Some(code), "").unwrap_or_default();
        assert!(h("XAmzContentSHA256Mismatch").contains("s3.checksums = \"when_required\""));
        assert!(h("AccessControlListNotSupported").contains("s3.acl"));
        assert!(h("AccessDenied").contains("s3.acl"));
        assert!(
            hint("UploadPart", Some(403), Some("AccessDenied"), "")
                .unwrap_or_default()
                .contains("multipart_threshold")
        );
        assert!(
            hint("GetObject", Some(403), None, "")
                .unwrap_or_default()
                .contains("expected_bucket_owner")
        );
    }
}
