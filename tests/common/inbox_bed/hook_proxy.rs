//! A forwarding proxy through which a test steps into the conversation: it runs an action
//! just before a GET of a chosen key goes upstream (to overwrite or delete the object
//! between the daemon's listing and its download), or damages a response body (one byte
//! flipped, as a faulty network or disk would) to play an integrity failure.
//!
//! It sits behind the harness's [`super::super::RecordingProxy`]: daemon -> recording
//! proxy -> hook proxy -> server. The recording therefore still shows exactly what the
//! daemon sent and which status it got back (a 412 caused by a hook included). Requests are
//! forwarded unchanged, Host header included, so SigV4 signatures still verify.

use std::collections::HashMap;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

use super::super::Recorded;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Something a test wants done at a precise moment; it may block (it runs on a thread of
/// its own, and the request waits for it).
type Action = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Hooks {
    /// One-shot actions, by object key, run before the next GET of that key is forwarded.
    before_get: Vec<(String, Action)>,
    /// How many times each key's before-GET action has run (and completed).
    fired: HashMap<String, usize>,
    /// How many more successful GETs of each key get a damaged body.
    corrupt: HashMap<String, usize>,
    /// How many bodies of each key were damaged.
    corrupted: HashMap<String, usize>,
}

struct Shared {
    upstream: String,
    bucket: String,
    client: Client<HttpConnector, Incoming>,
    hooks: Mutex<Hooks>,
}

impl Shared {
    fn hooks(&self) -> MutexGuard<'_, Hooks> {
        self.hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A forwarding proxy on `127.0.0.1:<ephemeral>` with test hooks. Stops on drop.
pub struct HookProxy {
    endpoint: String,
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
}

impl HookProxy {
    /// Starts a proxy forwarding to `upstream` (`http://host:port`), watching object keys of
    /// `bucket` (path-style requests).
    pub fn start(upstream: &str, bucket: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hook-proxy")
            .enable_all()
            .build()
            .expect("build the hook proxy's runtime");
        let client = {
            let _guard = runtime.enter();
            Client::builder(TokioExecutor::new())
                .set_host(false)
                .build(HttpConnector::new())
        };
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            bucket: bucket.to_owned(),
            client,
            hooks: Mutex::new(Hooks::default()),
        });
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the hook proxy to 127.0.0.1:0");
        let addr = listener.local_addr().expect("hook proxy's local address");
        runtime.spawn(serve(listener, Arc::clone(&shared)));
        Self {
            endpoint: format!("http://{addr}"),
            shared,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Runs `action` once, just before the next GET of `key` is forwarded upstream; the GET
    /// waits until the action has returned. Several actions for one key run on successive
    /// GETs, in the order given.
    pub fn before_get(&self, key: &str, action: impl FnOnce() + Send + 'static) {
        self.shared
            .hooks()
            .before_get
            .push((key.to_owned(), Box::new(action)));
    }

    /// How many before-GET actions for `key` have run to completion.
    pub fn fired(&self, key: &str) -> usize {
        self.shared.hooks().fired.get(key).copied().unwrap_or(0)
    }

    /// Damages (flips one byte in the middle of) the bodies of the next `times` successful
    /// GETs of `key`; headers, length included, stay as the server sent them.
    pub fn corrupt_gets(&self, key: &str, times: usize) {
        *self
            .shared
            .hooks()
            .corrupt
            .entry(key.to_owned())
            .or_default() += times;
    }

    /// How many response bodies of `key` were damaged so far.
    pub fn corrupted(&self, key: &str) -> usize {
        self.shared.hooks().corrupted.get(key).copied().unwrap_or(0)
    }
}

impl Drop for HookProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                eprintln!("hook proxy: accept failed: {e}");
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(req, Arc::clone(&shared)));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// The decoded object key a path-style GET addresses in `bucket`, if it is one.
fn get_key(req: &Request<Incoming>, bucket: &str) -> Option<String> {
    if req.method() != Method::GET {
        return None;
    }
    Recorded {
        method: "GET".into(),
        path: req.uri().path().to_owned(),
        query: String::new(),
        headers: Vec::new(),
        status: None,
    }
    .key_in(bucket)
}

async fn forward(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let key = get_key(&req, &shared.bucket);
    if let Some(key) = &key {
        let action = {
            let mut hooks = shared.hooks();
            let at = hooks.before_get.iter().position(|(k, _)| k == key);
            at.map(|at| hooks.before_get.remove(at).1)
        };
        if let Some(action) = action {
            // A thread of its own: the action may block (the owner's client runs its own
            // runtime), which must not happen on this runtime's workers.
            let (done, ran) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let ok = std::panic::catch_unwind(AssertUnwindSafe(action)).is_ok();
                let _ = done.send(ok);
            });
            if !ran.await.unwrap_or(false) {
                return Ok(plain(
                    StatusCode::BAD_GATEWAY,
                    format!("hook proxy: the test's action before GET {key} panicked"),
                ));
            }
            *shared.hooks().fired.entry(key.clone()).or_default() += 1;
        }
    }

    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = match format!("{}{path_and_query}", shared.upstream).parse() {
        Ok(uri) => uri,
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_GATEWAY,
                format!("cannot build upstream URI: {e}"),
            ));
        }
    };
    let response = match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response,
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_GATEWAY,
                format!("upstream request failed: {e:?}"),
            ));
        }
    };

    let damage = key.filter(|key| {
        if response.status() != StatusCode::OK {
            return false;
        }
        let mut hooks = shared.hooks();
        match hooks.corrupt.get_mut(key) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    });
    let Some(key) = damage else {
        return Ok(response.map(BodyExt::boxed));
    };
    let (parts, body) = response.into_parts();
    let mut bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_GATEWAY,
                format!("upstream body failed: {e:?}"),
            ));
        }
    };
    if !bytes.is_empty() {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
    }
    *shared.hooks().corrupted.entry(key).or_default() += 1;
    let body = Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed();
    Ok(Response::from_parts(parts, body))
}

fn plain(status: StatusCode, message: String) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(message))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}
