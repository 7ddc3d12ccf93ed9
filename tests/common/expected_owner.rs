//! An in-process S3 server that, like AWS S3, answers `403 AccessDenied` to every request whose
//! `x-amz-expected-bucket-owner` header names an account other than the bucket owner's.
//!
//! None of the servers the interop suite runs checks that header (measured: Ceph RGW 16,
//! moto 5.2.1 and s3s-fs 0.14 all accept any value), so the daemon's
//! `s3.expected_bucket_owner` can only be shown to stop everything against this: s3s-fs (the
//! same server and credentials as [`super::S3Server`]) behind a gate applying AWS's documented
//! rule. Requests without the header, or with the right account, pass through unchanged.

use std::path::Path;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{Body, HttpError};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

use super::server::{ACCESS_KEY, SECRET_KEY};

/// The header AWS S3 checks against the bucket owner's account id.
pub const HEADER: &str = "x-amz-expected-bucket-owner";

/// The credentials the harness runs the daemon with ([`super::Daemon`] sets them), which this
/// server and [`super::S3Server`] accept. The interop suite's RADOS Gateway gives its `peer`
/// user the same keys, so that the daemon under test is the peer there too.
pub const DAEMON_CREDENTIALS: (&str, &str) = (ACCESS_KEY, SECRET_KEY);

/// s3s-fs serving `root` on `127.0.0.1:<ephemeral>`, owned by account `owner_account`.
/// Stops on drop.
pub struct ExpectedOwnerServer {
    endpoint: String,
    runtime: Option<Runtime>,
}

impl ExpectedOwnerServer {
    /// Serves `root` (which must exist) as the buckets of account `owner_account`.
    pub fn start(root: &Path, owner_account: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3s-fs-owner-check")
            .enable_all()
            .build()
            .expect("build the S3 server's runtime");
        let fs = s3s_fs::FileSystem::new(root).expect("open the s3s-fs data folder");
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the S3 server to 127.0.0.1:0");
        let addr = listener.local_addr().expect("S3 server's local address");
        runtime.spawn(serve(listener, service, Arc::from(owner_account)));
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

impl Drop for ExpectedOwnerServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve(listener: TcpListener, service: S3Service, owner: Arc<str>) {
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                eprintln!("expected-owner test server: accept failed: {e}");
                continue;
            }
        };
        let (service, owner) = (service.clone(), Arc::clone(&owner));
        tokio::spawn(async move {
            let gate = service_fn(move |req| gate(req, service.clone(), Arc::clone(&owner)));
            // A client hanging up mid-request is not the server's failure; ignore it.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), gate)
                .await;
        });
    }
}

/// AWS's rule: a present header that does not name the owner's account is refused before
/// anything else happens; everything else goes to s3s-fs.
async fn gate(
    req: Request<Incoming>,
    service: S3Service,
    owner: Arc<str>,
) -> Result<Response<Body>, HttpError> {
    match req.headers().get(HEADER) {
        Some(value) if value.as_bytes() != owner.as_bytes() => Ok(access_denied()),
        _ => hyper::service::Service::call(&service, req).await,
    }
}

/// The error document AWS S3 sends for a mismatched expected owner.
fn access_denied() -> Response<Body> {
    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
        <Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
    let mut response = Response::new(Body::from(xml.to_owned()));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    response
}
