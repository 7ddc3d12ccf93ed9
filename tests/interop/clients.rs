//! Clients nobody in this project wrote, acting for the bucket owner (and for the peer in
//! control uploads): boto3 through `tests/interop/s3_client.py`, and the AWS CLI v2.
//!
//! Both talk to the server directly, never through the recording proxy, so the proxy's
//! recording shows only the daemon.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::POLL;
use crate::servers::Keys;

/// The longest any single client call may take (botocore's own timeouts are shorter).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A refusal (or failure) of one S3 call, as the client reported it.
#[derive(Debug, Clone)]
pub struct S3Error {
    /// The S3 error code, e.g. `AccessDenied`.
    pub code: String,
    pub status: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self
            .status
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        write!(f, "{} (HTTP {status}) {}", self.code, self.message)
    }
}

/// An object's ACL: its owner and its grants as `(grantee id or group URI, permission)`.
#[derive(Debug, Clone)]
pub struct Acl {
    pub owner: String,
    pub grants: Vec<(String, String)>,
}

impl Acl {
    /// Whether `grantee` holds `FULL_CONTROL`.
    pub fn grants_full_control_to(&self, grantee: &str) -> bool {
        self.grants
            .iter()
            .any(|(who, what)| who == grantee && what == "FULL_CONTROL")
    }
}

/// boto3 for one identity: a long-lived `s3_client.py` process answering JSON lines, so a
/// call costs milliseconds instead of a Python start-up. Killed on drop.
pub struct S3Client {
    /// Behind a mutex so calls work through `&self` (waits borrow fixtures immutably).
    process: Mutex<Process>,
    /// Request and response bodies travel as files in here.
    scratch: PathBuf,
    files: AtomicU64,
    /// Names the identity in failure messages.
    who: String,
}

struct Process {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl S3Client {
    /// Starts the client for `keys` on `endpoint`. `scratch` must exist.
    pub fn start(python: &Path, endpoint: &str, keys: &Keys, who: &str, scratch: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/s3_client.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args([endpoint, &keys.access_key, &keys.secret_key])
            .env("AWS_CONFIG_FILE", scratch.join("no-such-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                scratch.join("no-such-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{who}: start {} {}: {e}",
                    python.display(),
                    script.display()
                )
            });
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            process: Mutex::new(Process {
                child,
                stdin,
                stdout,
            }),
            scratch: scratch.to_owned(),
            files: AtomicU64::new(0),
            who: who.to_owned(),
        }
    }

    fn scratch_file(&self, what: &str) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        self.scratch.join(format!("{}-{what}-{n}", self.who))
    }

    /// Calls boto3's `op` with `args` (plus `extra` request fields, e.g. `body_file`).
    fn call(&self, op: &str, args: Value, extra: &[(&str, &Path)]) -> Result<Value, S3Error> {
        let mut request = json!({ "op": op, "args": args });
        for (name, path) in extra {
            request[*name] = json!(path);
        }
        let mut process = self
            .process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut line = request.to_string();
        line.push('\n');
        process
            .stdin
            .write_all(line.as_bytes())
            .and_then(|()| process.stdin.flush())
            .unwrap_or_else(|e| panic!("{}: send {op}: {e} (did s3_client.py die?)", self.who));
        let mut answer = String::new();
        let read = process
            .stdout
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("{}: read the answer to {op}: {e}", self.who));
        assert!(
            read > 0,
            "{}: s3_client.py exited before answering {op} ({:?}); its stderr is above",
            self.who,
            process.child.try_wait()
        );
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{}: bad answer to {op}: {e}: {answer}", self.who));
        if let Some(error) = answer.get("error") {
            return Err(S3Error {
                code: error["code"].as_str().unwrap_or_default().to_owned(),
                status: error["status"].as_u64(),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(answer["ok"].clone())
    }

    /// Like `call`, but a refusal is a test failure.
    #[track_caller]
    fn call_ok(&self, op: &str, args: Value) -> Value {
        let described = format!("{op} {args}");
        self.call(op, args, &[])
            .unwrap_or_else(|e| panic!("{}: {described}: {e}", self.who))
    }

    #[track_caller]
    pub fn create_bucket(&self, bucket: &str) {
        self.call_ok("create_bucket", json!({ "Bucket": bucket }));
    }

    #[track_caller]
    pub fn put_bucket_policy(&self, bucket: &str, policy: &Value) {
        self.call_ok(
            "put_bucket_policy",
            json!({ "Bucket": bucket, "Policy": policy.to_string() }),
        );
    }

    /// The canonical id of the bucket's owner, from its ACL.
    #[track_caller]
    pub fn bucket_owner_id(&self, bucket: &str) -> String {
        let acl = self.call_ok("get_bucket_acl", json!({ "Bucket": bucket }));
        acl["Owner"]["ID"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: bucket ACL without an owner: {acl}", self.who))
            .to_owned()
    }

    /// PutObject of `bytes`, with the canned ACL `acl` if given; returns the ETag.
    pub fn put_object(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        acl: Option<&str>,
    ) -> Result<String, S3Error> {
        let mut args = json!({ "Bucket": bucket, "Key": key });
        if let Some(acl) = acl {
            args["ACL"] = json!(acl);
        }
        self.put_with("put_object", args, bytes)
            .map(|out| out["ETag"].as_str().unwrap_or_default().to_owned())
    }

    /// Calls `op` (PutObject, UploadPart) with `args` and `bytes` as the body.
    fn put_with(&self, op: &str, args: Value, bytes: &[u8]) -> Result<Value, S3Error> {
        let body = self.scratch_file("put");
        fs::write(&body, bytes).unwrap_or_else(|e| panic!("write {}: {e}", body.display()));
        let result = self.call(op, args, &[("body_file", &body)]);
        let _ = fs::remove_file(&body);
        result
    }

    /// Puts `bytes` encrypted with SSE-KMS key `kms_key`, in parts of `part_size` bytes when
    /// it is given (a multipart upload), else as one PutObject. Returns the ETag and the
    /// encryption the server reports.
    pub fn put_object_kms(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        kms_key: &str,
        part_size: Option<usize>,
    ) -> Result<(String, String), S3Error> {
        let sse = json!({
            "Bucket": bucket,
            "Key": key,
            "ServerSideEncryption": "aws:kms",
            "SSEKMSKeyId": kms_key,
        });
        let out = match part_size {
            None => self.put_with("put_object", sse, bytes)?,
            Some(size) => {
                let created = self.call("create_multipart_upload", sse, &[])?;
                let upload_id = created["UploadId"].clone();
                let mut parts = Vec::new();
                for (i, chunk) in bytes.chunks(size).enumerate() {
                    let number = i + 1;
                    let args = json!({
                        "Bucket": bucket,
                        "Key": key,
                        "UploadId": upload_id,
                        "PartNumber": number,
                    });
                    let part = self.put_with("upload_part", args, chunk)?;
                    parts.push(json!({ "PartNumber": number, "ETag": part["ETag"] }));
                }
                let args = json!({
                    "Bucket": bucket,
                    "Key": key,
                    "UploadId": upload_id,
                    "MultipartUpload": { "Parts": parts },
                });
                let mut done = self.call("complete_multipart_upload", args, &[])?;
                // CompleteMultipartUpload may not repeat the encryption: ask the object.
                let head =
                    self.call("head_object", json!({ "Bucket": bucket, "Key": key }), &[])?;
                done["ServerSideEncryption"] = head["ServerSideEncryption"].clone();
                done
            }
        };
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        Ok((text(&out["ETag"]), text(&out["ServerSideEncryption"])))
    }

    /// The object's bytes.
    pub fn get_object(&self, bucket: &str, key: &str) -> Result<Vec<u8>, S3Error> {
        let saved = self.scratch_file("get");
        self.call(
            "get_object",
            json!({ "Bucket": bucket, "Key": key }),
            &[("save_body", &saved)],
        )?;
        let bytes = fs::read(&saved).unwrap_or_else(|e| panic!("read {}: {e}", saved.display()));
        let _ = fs::remove_file(&saved);
        Ok(bytes)
    }

    /// The object's ACL.
    pub fn get_object_acl(&self, bucket: &str, key: &str) -> Result<Acl, S3Error> {
        let out = self.call(
            "get_object_acl",
            json!({ "Bucket": bucket, "Key": key }),
            &[],
        )?;
        let grants = out["Grants"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|g| {
                let grantee = &g["Grantee"];
                let who = grantee["ID"].as_str().or(grantee["URI"].as_str());
                (
                    who.unwrap_or_default().to_owned(),
                    g["Permission"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        Ok(Acl {
            owner: out["Owner"]["ID"].as_str().unwrap_or_default().to_owned(),
            grants,
        })
    }

    /// ListObjectsV2 of `prefix` (one page: tests hold few keys), sorted; `expected_owner`
    /// is sent as `x-amz-expected-bucket-owner`.
    pub fn list_keys(
        &self,
        bucket: &str,
        prefix: &str,
        expected_owner: Option<&str>,
    ) -> Result<Vec<String>, S3Error> {
        let mut args = json!({ "Bucket": bucket, "Prefix": prefix });
        if let Some(owner) = expected_owner {
            args["ExpectedBucketOwner"] = json!(owner);
        }
        let out = self.call("list_objects_v2", args, &[])?;
        let mut keys: Vec<String> = out["Contents"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|o| o["Key"].as_str().map(str::to_owned))
            .collect();
        keys.sort();
        Ok(keys)
    }
}

impl Drop for S3Client {
    fn drop(&mut self) {
        let process = self
            .process
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Best effort, never a second panic: the process holds no state worth a clean exit.
        let _ = process.child.kill();
        let _ = process.child.wait();
    }
}

/// The AWS CLI v2 for one identity, with a hermetic configuration (region, path-style
/// addressing, no profiles, no pager).
///
/// Used only for calls that succeed: Debian's aws-cli 2.9.19 (and the pip v1 too) crashes
/// with `argument of type 'NoneType' is not iterable` instead of reporting an error whose
/// `<Message>` is empty, which is every error RGW 16 sends.
pub struct AwsCli {
    bin: PathBuf,
    endpoint: String,
    keys: Keys,
    home: PathBuf,
}

impl AwsCli {
    /// `scratch` must exist; the CLI's configuration and outputs go there.
    pub fn new(bin: &Path, endpoint: &str, keys: &Keys, scratch: &Path) -> Self {
        let home = scratch.join(format!("aws-cli-{}", keys.access_key));
        fs::create_dir_all(&home).unwrap_or_else(|e| panic!("create {}: {e}", home.display()));
        let config = "[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n";
        fs::write(home.join("config"), config)
            .unwrap_or_else(|e| panic!("write the AWS CLI config: {e}"));
        Self {
            bin: bin.to_owned(),
            endpoint: endpoint.to_owned(),
            keys: keys.clone(),
            home,
        }
    }

    /// `aws s3api put-object --bucket B --key K --body FILE [--acl ACL]`, the owner's (and the
    /// seed scenario's) reference command. Returns the ETag; panics with the CLI's stderr if
    /// it fails.
    #[track_caller]
    pub fn put_object(&self, bucket: &str, key: &str, body: &Path, acl: Option<&str>) -> String {
        let mut args = vec![
            "s3api".to_owned(),
            "put-object".to_owned(),
            "--bucket".to_owned(),
            bucket.to_owned(),
            "--key".to_owned(),
            key.to_owned(),
            "--body".to_owned(),
            body.display().to_string(),
        ];
        if let Some(acl) = acl {
            args.extend(["--acl".to_owned(), acl.to_owned()]);
        }
        let out = self.run(&args);
        let out: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("aws {}: output is not JSON ({e}): {out}", args.join(" ")));
        out["ETag"].as_str().unwrap_or_default().to_owned()
    }

    /// Runs the CLI to completion within [`CALL_TIMEOUT`]; returns its stdout.
    #[track_caller]
    fn run(&self, args: &[String]) -> String {
        let (stdout_path, stderr_path) = (self.home.join("stdout"), self.home.join("stderr"));
        let file = |p: &Path| {
            fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
        };
        let mut cmd = Command::new(&self.bin);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(&name);
            }
        }
        let mut child = cmd
            .arg("--endpoint-url")
            .arg(&self.endpoint)
            .args(["--output", "json", "--no-cli-pager"])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &self.keys.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.keys.secret_key)
            .env("AWS_CONFIG_FILE", self.home.join("config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.home.join("no-such-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("HOME", &self.home)
            .stdin(Stdio::null())
            .stdout(file(&stdout_path))
            .stderr(file(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()));
        let deadline = Instant::now() + CALL_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the AWS CLI") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "aws {} did not finish within {CALL_TIMEOUT:?}",
                    args.join(" ")
                );
            }
            thread::sleep(POLL);
        };
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        assert!(
            status.success(),
            "aws {} failed ({status}):\n{}",
            args.join(" "),
            read(&stderr_path)
        );
        read(&stdout_path)
    }
}
