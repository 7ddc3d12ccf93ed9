//! The bucket owner's side: puts deliveries and reads submissions, talking directly to the
//! server (never through the proxy, so the proxy's recording shows only the daemon). Also
//! what hostile-key and integrity tests need: puts that may fail without panicking (a
//! server may refuse a hostile key), listings of keys that are not valid XML (control
//! characters: only `encoding-type=url` carries them), multipart uploads (ETag
//! `<md5>-<parts>`, not an MD5 of the object) and puts that store a CRC32 checksum.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, EncodingType};
use tokio::runtime::Runtime;

use super::server::{ACCESS_KEY, SECRET_KEY};

/// A blocking aws-sdk-s3 client bound to one bucket.
pub struct Owner {
    client: Client,
    bucket: String,
    /// Drives the SDK; current-thread because every call is a `block_on` from the test.
    runtime: Runtime,
}

impl Owner {
    /// A path-style client for `endpoint` (us-east-1, credentials test/test). Checksums only
    /// when required, so every S3-compatible server takes the uploads as plain bodies.
    pub fn new(endpoint: &str, bucket: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build the owner's runtime");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                ACCESS_KEY,
                SECRET_KEY,
                None,
                None,
                "test-owner",
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .build();
        Self {
            client: Client::from_conf(config),
            bucket: bucket.to_owned(),
            runtime,
        }
    }

    /// Creates bucket `name` (the daemon must never need to).
    pub fn create_bucket(&self, name: &str) {
        self.runtime
            .block_on(self.client.create_bucket().bucket(name).send())
            .unwrap_or_else(|e| panic!("owner: create bucket {name}: {e:?}"));
    }

    /// Puts `bytes` at `key` and returns the ETag the server gave it (quoted, verbatim).
    pub fn put(&self, key: &str, bytes: &[u8]) -> String {
        let output = self
            .runtime
            .block_on(
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .body(ByteStream::from(bytes.to_vec()))
                    .send(),
            )
            .unwrap_or_else(|e| panic!("owner: put {key}: {e:?}"));
        output.e_tag.unwrap_or_default()
    }

    /// The object's bytes, or `None` if there is no such key.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.runtime.block_on(async {
            let output = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(output) => output,
                Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => return None,
                Err(e) => panic!("owner: get {key}: {e:?}"),
            };
            let body = output
                .body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("owner: read body of {key}: {e:?}"));
            Some(body.into_bytes().to_vec())
        })
    }

    /// Every key under `prefix`, sorted, following continuation tokens.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        self.keys_under(prefix, None)
    }

    /// Whether the bucket exists (HeadBucket: a bucket-level call the daemon must never make).
    pub fn bucket_exists(&self) -> bool {
        match self
            .runtime
            .block_on(self.client.head_bucket().bucket(&self.bucket).send())
        {
            Ok(_) => true,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => false,
            Err(e) => panic!("owner: head bucket {}: {e:?}", self.bucket),
        }
    }

    /// Deletes `key` (succeeds whether or not it existed).
    pub fn delete(&self, key: &str) {
        self.runtime
            .block_on(
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("owner: delete {key}: {e:?}"));
    }

    /// Puts `bytes` at `key`; the server's refusal is an `Err` describing it.
    pub fn try_put(&self, key: &str, bytes: &[u8]) -> Result<String, String> {
        self.runtime
            .block_on(
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .body(ByteStream::from(bytes.to_vec()))
                    .send(),
            )
            .map(|out| out.e_tag.unwrap_or_default())
            .map_err(|e| match e.raw_response() {
                Some(raw) => format!(
                    "HTTP {} {}",
                    raw.status().as_u16(),
                    e.as_service_error()
                        .and_then(|s| s.meta().code())
                        .unwrap_or_default()
                ),
                None => format!("{e}"),
            })
    }

    /// Puts `bytes` at `key` with a CRC32 checksum the server stores and returns on GET.
    pub fn put_with_crc32(&self, key: &str, bytes: &[u8]) -> String {
        self.runtime
            .block_on(
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .body(ByteStream::from(bytes.to_vec()))
                    .send(),
            )
            .unwrap_or_else(|e| panic!("owner: put {key} with CRC32: {e:?}"))
            .e_tag
            .unwrap_or_default()
    }

    /// Uploads `parts` (each but the last at least 5 MiB) as one multipart object and
    /// returns its ETag.
    pub fn put_multipart(&self, key: &str, parts: &[&[u8]]) -> String {
        self.runtime.block_on(async {
            let created = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("owner: create multipart {key}: {e:?}"));
            let upload_id = created.upload_id.expect("an upload id");
            let mut done = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                let number = i32::try_from(i + 1).expect("few parts");
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(ByteStream::from(part.to_vec()))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("owner: upload part {number} of {key}: {e:?}"));
                done.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag)
                        .build(),
                );
            }
            let completed = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(done))
                        .build(),
                )
                .send()
                .await;
            match completed {
                Ok(out) => return out.e_tag.unwrap_or_default(),
                // moto 5.2.1 names the answer's root element `CompleteMultipartUploadResponse`,
                // which the SDK refuses to parse although the upload is complete (200): ask
                // the object itself for its ETag then.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 200) => {}
                Err(e) => panic!("owner: complete multipart {key}: {e:?}"),
            }
            self.client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("owner: head {key}: {e:?}"))
                .e_tag
                .unwrap_or_default()
        })
    }

    /// Every key under `prefix`, sorted, listed with `encoding-type=url` and decoded, so
    /// that keys with characters XML cannot carry (NUL, other controls) come back intact.
    pub fn list_keys(&self, prefix: &str) -> Vec<String> {
        self.keys_under(prefix, Some(EncodingType::Url))
    }

    /// Every key under `prefix`, sorted, following continuation tokens; with `encoding`,
    /// the keys of pages the server encoded are decoded.
    fn keys_under(&self, prefix: &str, encoding: Option<EncodingType>) -> Vec<String> {
        self.runtime.block_on(async {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_encoding_type(encoding)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.unwrap_or_else(|e| panic!("owner: list {prefix}: {e:?}"));
                let encoded = page.encoding_type() == Some(&EncodingType::Url);
                for key in page.contents().iter().filter_map(|o| o.key()) {
                    keys.push(if encoded {
                        url_decode(key)
                    } else {
                        key.to_owned()
                    });
                }
            }
            keys.sort();
            keys
        })
    }
}

/// Decodes an `encoding-type=url` listing's key (`+` is a space there).
fn url_decode(text: &str) -> String {
    String::from_utf8(super::proxy::unescape(text, true))
        .unwrap_or_else(|e| panic!("listed key {text:?} is not UTF-8: {e}"))
}
