//! The bucket owner's side: puts deliveries and reads submissions, talking directly to the
//! server (never through the proxy, so the proxy's recording shows only the daemon).

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
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
        self.runtime.block_on(async {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.unwrap_or_else(|e| panic!("owner: list {prefix}: {e:?}"));
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
            }
            keys.sort();
            keys
        })
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
}
