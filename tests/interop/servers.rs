//! The S3 servers of the interop suite, and where the tests find them.
//!
//! The RADOS Gateway and moto are started once per test run by `tests/interop/radosgw.sh` and
//! `tests/interop/moto.sh` (through `tests/run.sh` or `tests/interop/run.sh`), which export
//! their endpoints and keys (`S3X_*`). s3s-fs runs in process, one per test, from the harness.

use std::io::Write;
use std::path::PathBuf;

use tempfile::TempDir;

use crate::common::S3Server;
use crate::common::expected_owner::{DAEMON_CREDENTIALS, ExpectedOwnerServer};

/// Set to `1` by the test scripts: then a missing server is a failure, not a skip.
const REQUIRE: &str = "S3X_REQUIRE_INTEROP";

/// An access key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub access_key: String,
    pub secret_key: String,
}

impl Keys {
    fn new(access_key: &str, secret_key: &str) -> Self {
        Self {
            access_key: access_key.to_owned(),
            secret_key: secret_key.to_owned(),
        }
    }

    /// What the harness's [`crate::common::Daemon`] runs the daemon with.
    pub fn daemon() -> Self {
        Self::new(DAEMON_CREDENTIALS.0, DAEMON_CREDENTIALS.1)
    }
}

/// What the start scripts exported.
#[derive(Debug, Clone)]
pub struct Env {
    rgw_endpoint: String,
    rgw_owner: Keys,
    rgw_peer: Keys,
    rgw_peer_arn: String,
    moto_endpoint: String,
    /// The AWS CLI v2 (Debian's `/usr/bin/aws`).
    pub aws_cli: PathBuf,
    /// A Python with boto3, for `tests/interop/s3_client.py`.
    pub python: PathBuf,
}

impl Env {
    /// The servers' environment, or `None` after printing a visible "skipped" line when it is
    /// absent (plain `cargo test`). With `S3X_REQUIRE_INTEROP=1` absence fails the test.
    pub fn get(test: &str) -> Option<Self> {
        let (mut asked, mut missing) = (0, Vec::new());
        let mut var = |name: &str| {
            asked += 1;
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| {
                    missing.push(name.to_owned());
                    String::new()
                })
        };
        let env = Self {
            rgw_endpoint: var("S3X_RGW_ENDPOINT"),
            rgw_owner: Keys::new(&var("S3X_RGW_OWNER_KEY"), &var("S3X_RGW_OWNER_SECRET")),
            rgw_peer: Keys::new(&var("S3X_RGW_PEER_KEY"), &var("S3X_RGW_PEER_SECRET")),
            rgw_peer_arn: var("S3X_RGW_PEER_ARN"),
            moto_endpoint: var("S3X_MOTO_ENDPOINT"),
            aws_cli: var("S3X_AWS_CLI").into(),
            python: var("S3X_PYTHON").into(),
        };
        if !missing.is_empty() {
            let unset = if missing.len() == asked {
                "the S3X_* variables are not set".to_owned()
            } else {
                format!("{} not set", missing.join(", "))
            };
            let why = format!(
                "{unset}: start the servers with tests/run.sh (or run the suite alone with tests/interop/run.sh)"
            );
            assert!(
                std::env::var(REQUIRE).as_deref() != Ok("1"),
                "{REQUIRE}=1 but the interop servers are missing: {why}"
            );
            // Straight to the stderr handle: libtest captures `eprintln!`, and a skip must be
            // visible in a plain `cargo test` run.
            let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
            return None;
        }
        assert_eq!(
            env.rgw_peer,
            Keys::daemon(),
            "the RADOS Gateway's peer user must have the keys the harness runs the daemon with \
             (tests/interop/radosgw.sh creates it so)"
        );
        Some(env)
    }
}

/// Which implementation a [`Server`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RadosGw,
    Moto,
    S3sFs,
}

/// One S3 server a test trades through, and the two identities on it.
pub struct Server {
    pub kind: Kind,
    pub endpoint: String,
    /// Owns the test buckets, puts deliveries, reads submissions.
    pub owner: Keys,
    /// The daemon's identity.
    pub peer: Keys,
    /// How a bucket policy names the peer, where the server has distinct users.
    pub peer_principal: Option<String>,
    /// The peer's canonical user id, as object ACLs show it (RGW: the user id).
    pub peer_id: Option<String>,
    /// Keeps an in-process server running (dropped after the fields above).
    _embedded: Embedded,
}

/// An in-process server and its data folder, kept alive with the [`Server`] (the server
/// stops before its folder is deleted: fields drop in order).
enum Embedded {
    None,
    S3sFs {
        _server: S3Server,
        _data: TempDir,
    },
    ExpectedOwner {
        _server: ExpectedOwnerServer,
        _data: TempDir,
    },
}

impl Server {
    /// The RADOS Gateway: two users, `owner` and `peer`, object ownership enforced.
    pub fn radosgw(env: &Env) -> Self {
        let peer_id = env.rgw_peer_arn.rsplit('/').next().map(str::to_owned);
        Self {
            kind: Kind::RadosGw,
            endpoint: env.rgw_endpoint.clone(),
            owner: env.rgw_owner.clone(),
            peer: env.rgw_peer.clone(),
            peer_principal: Some(env.rgw_peer_arn.clone()),
            peer_id,
            _embedded: Embedded::None,
        }
    }

    /// moto: one account (auth off), so owner and peer are the same identity.
    pub fn moto(env: &Env) -> Self {
        Self::single_identity(Kind::Moto, env.moto_endpoint.clone(), Embedded::None)
    }

    /// A fresh in-process s3s-fs: one identity.
    pub fn s3s_fs() -> Self {
        let data = data_dir();
        let server = S3Server::start(data.path());
        let endpoint = server.endpoint();
        let embedded = Embedded::S3sFs {
            _server: server,
            _data: data,
        };
        Self::single_identity(Kind::S3sFs, endpoint, embedded)
    }

    /// A fresh in-process s3s-fs whose buckets belong to account `owner_account` and which
    /// refuses requests expecting another owner, as AWS does.
    pub fn s3s_fs_owned_by(owner_account: &str) -> Self {
        let data = data_dir();
        let server = ExpectedOwnerServer::start(data.path(), owner_account);
        let endpoint = server.endpoint();
        let embedded = Embedded::ExpectedOwner {
            _server: server,
            _data: data,
        };
        Self::single_identity(Kind::S3sFs, endpoint, embedded)
    }

    fn single_identity(kind: Kind, endpoint: String, embedded: Embedded) -> Self {
        Self {
            kind,
            endpoint,
            owner: Keys::daemon(),
            peer: Keys::daemon(),
            peer_principal: None,
            peer_id: None,
            _embedded: embedded,
        }
    }

    /// A short name for bucket names and messages.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::RadosGw => "rgw",
            Kind::Moto => "moto",
            Kind::S3sFs => "s3s-fs",
        }
    }

    /// Whether an object belongs to its uploader and the bucket owner needs an ACL grant to
    /// read it (only RGW here; moto and s3s-fs let every request read everything).
    pub fn enforces_ownership(&self) -> bool {
        self.kind == Kind::RadosGw
    }

    /// Whether it takes the SDK's default uploads (`checksums = "when_supported"`): streamed
    /// `aws-chunked` bodies with a signed checksum trailer. RGW 16 answers
    /// `400 XAmzContentSHA256Mismatch`.
    pub fn accepts_aws_chunked(&self) -> bool {
        self.kind != Kind::RadosGw
    }
}

fn data_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("s3x-interop-s3s-")
        .tempdir()
        .expect("create the s3s-fs data folder")
}
