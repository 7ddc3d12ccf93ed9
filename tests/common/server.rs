//! An in-process s3s-fs server: a real S3 protocol implementation (SigV4 checked) on a
//! loopback port of its own, so tests can run in parallel without sharing state.

use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::{S3Auth, SecretKey};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{S3Error, S3ErrorCode, S3Result};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// The long-lived credentials the server accepts; the daemon gets them through the
/// environment.
pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "test";

/// Short-lived credentials, as an assumed role or an SSO session hands out: the access key
/// is this prefix and the Unix time it expires at; the secret is [`short_lived_secret`] of
/// it. The server refuses such a key with `ExpiredToken` once that time has passed.
pub const SHORT_LIVED_PREFIX: &str = "EXPIRES";

/// The secret of the short-lived access key `access_key`.
pub fn short_lived_secret(access_key: &str) -> String {
    format!("secret-of-{access_key}")
}

/// The server's credential check: the long-lived pair, and short-lived keys until they
/// expire.
struct TestAuth;

#[async_trait::async_trait]
impl S3Auth for TestAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        if access_key == ACCESS_KEY {
            return Ok(SecretKey::from(SECRET_KEY));
        }
        let expires: u64 = access_key
            .strip_prefix(SHORT_LIVED_PREFIX)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| S3Error::new(S3ErrorCode::InvalidAccessKeyId))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now >= expires {
            return Err(S3Error::with_message(
                S3ErrorCode::ExpiredToken,
                "The provided token has expired.",
            ));
        }
        Ok(SecretKey::from(short_lived_secret(access_key)))
    }
}

/// s3s-fs 0.14.1 serving the folder `root` on `127.0.0.1:<ephemeral>`. Stops on drop.
pub struct S3Server {
    endpoint: String,
    /// Owns the accept loop and every connection task; dropping it stops the server.
    runtime: Option<Runtime>,
}

impl S3Server {
    /// Serves `root` (which must exist; buckets become folders in it).
    pub fn start(root: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3s-fs")
            .enable_all()
            .build()
            .expect("build the S3 server's runtime");
        let fs = s3s_fs::FileSystem::new(root).expect("open the s3s-fs data folder");
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(TestAuth);
        let service = builder.build();

        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the S3 server to 127.0.0.1:0");
        let addr = listener.local_addr().expect("S3 server's local address");
        runtime.spawn(serve(listener, service));
        Self {
            endpoint: format!("http://{addr}"),
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // `shutdown_background` rather than a plain drop: it never blocks, so it is also safe
        // when the fixture is dropped inside some other async context.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve(listener: TcpListener, service: S3Service) {
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                eprintln!("s3s-fs test server: accept failed: {e}");
                continue;
            }
        };
        let http = http.clone();
        let service = service.clone();
        tokio::spawn(async move {
            // A client hanging up mid-request is not the server's failure; ignore it.
            let _ = http.serve_connection(TokioIo::new(socket), service).await;
        });
    }
}
