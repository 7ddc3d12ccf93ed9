//! A recording HTTP/1.1 forwarding proxy, so tests can assert what the daemon put on the wire
//! (headers such as `x-amz-acl`, which calls it makes and which it never makes).
//!
//! Requests are forwarded unchanged, Host header included: SigV4 signs the Host, so the
//! upstream must see exactly what the client signed. Bodies are streamed, not buffered.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// One request as the proxy received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path exactly as sent (still percent-encoded), e.g. `/exchange/Delivery/a.bin`.
    pub path: String,
    /// The raw query string without `?`, empty when there is none.
    pub query: String,
    /// Every header in the order received, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The upstream's status code; `None` while in flight or if the upstream was unreachable.
    pub status: Option<u16>,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The query parameters, percent-decoded, in order. A bare `uploads` gives `("uploads", "")`.
    pub fn query_params(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(p), String::new()),
            })
            .collect()
    }

    /// The decoded value of query parameter `name`, if present.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_params()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Whether query parameter `name` is present (with or without a value).
    pub fn has_query_param(&self, name: &str) -> bool {
        self.query_params().iter().any(|(k, _)| k == name)
    }

    /// The path-style object key in `bucket` (decoded), or `None` for bucket-level requests.
    pub fn key_in(&self, bucket: &str) -> Option<String> {
        let rest = self.path.strip_prefix('/')?.strip_prefix(bucket)?;
        let key = rest.strip_prefix('/')?;
        (!key.is_empty()).then(|| percent_decode(key))
    }

    /// One line, `METHOD /path?query -> status`, for failure messages.
    pub fn summary(&self) -> String {
        let query = if self.query.is_empty() {
            String::new()
        } else {
            format!("?{}", self.query)
        };
        let status = self
            .status
            .map_or_else(|| "(no answer)".to_owned(), |s| s.to_string());
        format!("{} {}{query} -> {status}", self.method, self.path)
    }

    /// Whether this request addresses `bucket` itself rather than an object in it.
    pub fn is_bucket_level(&self, bucket: &str) -> bool {
        let bare = format!("/{bucket}");
        self.path == bare || self.path == format!("{bare}/")
    }
}

/// Decodes `%XX` escapes. `+` stays a `+`: SigV4 clients encode a space as `%20`, and in a
/// path `+` is literal. Invalid escapes are kept as they are: this is for reading
/// recordings, not for validating them.
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(hi, lo)| hi << 4 | lo),
            _ => None,
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// State shared by every connection task.
struct Shared {
    /// `http://host:port` of the upstream, no trailing slash.
    upstream: String,
    client: Client<HttpConnector, Incoming>,
    requests: Mutex<Vec<Recorded>>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        // A panicking test thread may poison the lock; the recordings are still valid.
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A forwarding proxy on `127.0.0.1:<ephemeral>` in front of any plain-HTTP upstream.
/// Stops on drop.
pub struct RecordingProxy {
    endpoint: String,
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
}

impl RecordingProxy {
    /// Starts a proxy forwarding to `upstream` (`http://host:port`; any path is ignored,
    /// requests keep their own).
    pub fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_end_matches('/').to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("recording-proxy")
            .enable_all()
            .build()
            .expect("build the proxy's runtime");
        let client = {
            // The legacy client is built inside the runtime because its pool spawns tasks.
            let _guard = runtime.enter();
            Client::builder(TokioExecutor::new())
                // Never touch the Host header: it is part of the SigV4 signature.
                .set_host(false)
                .build(HttpConnector::new())
        };
        let shared = Arc::new(Shared {
            upstream,
            client,
            requests: Mutex::new(Vec::new()),
        });
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the proxy to 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy's local address");
        runtime.spawn(serve(listener, Arc::clone(&shared)));
        Self {
            endpoint: format!("http://{addr}"),
            shared,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`: give this to the client instead of the upstream's address.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// A snapshot of every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log().clone()
    }

    /// Every request so far as one [`Recorded::summary`] line each, for failure messages.
    pub fn summary(&self) -> String {
        self.shared
            .log()
            .iter()
            .map(Recorded::summary)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many requests received so far satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&Recorded) -> bool) -> usize {
        self.shared.log().iter().filter(|r| pred(r)).count()
    }
}

impl Drop for RecordingProxy {
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
                eprintln!("recording proxy: accept failed: {e}");
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(req, Arc::clone(&shared)));
            // A client hanging up mid-request is the client's business; ignore it.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

/// Records `req`, forwards it upstream and relays the answer (or a 502 if there is none).
async fn forward(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let index = {
        let mut log = shared.log();
        log.push(Recorded {
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().unwrap_or_default().to_owned(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            status: None,
        });
        log.len() - 1
    };

    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = match format!("{}{path_and_query}", shared.upstream).parse() {
        Ok(uri) => uri,
        Err(e) => return Ok(bad_gateway(format!("cannot build upstream URI: {e}"))),
    };
    match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            shared.log()[index].status = Some(response.status().as_u16());
            Ok(response.map(BodyExt::boxed))
        }
        Err(e) => Ok(bad_gateway(format!("upstream request failed: {e:?}"))),
    }
}

fn bad_gateway(message: String) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(message))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
