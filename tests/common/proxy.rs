//! The one HTTP/1.1 proxy every test puts between the daemon and a real S3 server: it records
//! what the daemon put on the wire (headers such as `x-amz-acl`, which calls it makes and
//! which it never makes) and injects the faults a test asks for: an action at a precise
//! moment (overwrite an object just before its GET), delays, S3 error replies (503
//! SlowDown, AccessDenied, ...), connections reset mid-request or cut mid-response-body,
//! damaged bodies, requests that are never answered, a header withheld from the server,
//! and an endpoint that refuses connections altogether.
//!
//! Requests are forwarded unchanged, Host header included: SigV4 signs the Host, so the
//! upstream must see exactly what the client signed. Bodies are streamed, not buffered
//! (except a body the test asked to damage).

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

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
    /// The status the daemon got (the upstream's, or an injected error's); `None` while in
    /// flight, if the upstream was unreachable, or if the proxy never answered.
    pub status: Option<u16>,
    /// The fault the proxy injected into this request, if any ([`Fault::name`]).
    pub fault: Option<&'static str>,
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
        let fault = self
            .fault
            .map_or_else(String::new, |f| format!(" [injected: {f}]"));
        format!("{} {}{query} -> {status}{fault}", self.method, self.path)
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
    String::from_utf8_lossy(&unescape(s, false)).into_owned()
}

/// The bytes `%XX` escapes stand for; with `plus_is_space`, a `+` is a space (what S3
/// writes in an `encoding-type=url` listing). Invalid escapes are kept as they are.
pub fn unescape(s: &str, plus_is_space: bool) -> Vec<u8> {
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
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The error type of the bodies the proxy relays: the upstream's, or the cut it injects.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// Something a test wants done at a precise moment; it may block (it runs on a thread of
/// its own, and the request waits for it).
pub type Action = Box<dyn FnOnce() + Send + 'static>;

/// What the proxy does to a request a rule matches.
pub enum Fault {
    /// Runs the action, then forwards the request (the request waits for the action).
    Before(Action),
    /// Waits this long, then forwards the request.
    Delay(Duration),
    /// Answers with this S3 error document instead of forwarding: what a real server sends.
    Error {
        status: u16,
        code: &'static str,
        message: &'static str,
    },
    /// Reads the first chunk of the request body (if any), then drops the connection
    /// without an answer: a reset in the middle of the request.
    ResetRequest,
    /// Forwards, relays the status, headers and the first `after` bytes of a successful
    /// response's body, then drops the connection: a reset in the middle of the body.
    CutResponse { after: usize },
    /// Forwards and relays a successful response with one byte of its body flipped.
    Corrupt,
    /// Accepts the request and never answers.
    Hang,
    /// Forwards the request without this header (lower-case name): what a server that
    /// ignores it would answer, such as a whole object with a 200 for a GET whose `range`
    /// was dropped. Only for servers that do not check signatures (moto): the header may
    /// be signed.
    DropHeader(&'static str),
}

impl Fault {
    /// 503 SlowDown, as S3 throttles.
    pub fn slow_down() -> Self {
        Self::Error {
            status: 503,
            code: "SlowDown",
            message: "Please reduce your request rate.",
        }
    }

    /// 500 InternalError.
    pub fn internal_error() -> Self {
        Self::Error {
            status: 500,
            code: "InternalError",
            message: "We encountered an internal error. Please try again.",
        }
    }

    /// A short name for recordings and failure messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Before(_) => "action",
            Self::Delay(_) => "delay",
            Self::Error { code, .. } => code,
            Self::ResetRequest => "reset mid-request",
            Self::CutResponse { .. } => "cut mid-body",
            Self::Corrupt => "corrupted body",
            Self::Hang => "never answered",
            Self::DropHeader(_) => "header dropped",
        }
    }

    /// Whether the fault acts on the upstream's response (and so applies only once a
    /// successful one exists), rather than on the request.
    fn on_response(&self) -> bool {
        matches!(self, Self::CutResponse { .. } | Self::Corrupt)
    }
}

/// Counts how many times an injected fault was applied (and, for [`Fault::Before`], ran
/// to completion).
#[derive(Clone, Default)]
pub struct Injected(Arc<AtomicUsize>);

impl Injected {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Which requests a rule matches.
type Matcher = Box<dyn Fn(&Recorded) -> bool + Send + Sync>;

/// One injected fault: applied to the next `left` requests that match.
struct Rule {
    matches: Matcher,
    /// `None` once a one-shot [`Fault::Before`] action has been taken.
    fault: Option<Fault>,
    left: usize,
    applied: Injected,
}

/// What one request gets from a rule: the fault (an action is moved out, others copied).
struct Planned {
    fault: Fault,
    applied: Injected,
}

/// State shared by every connection task.
struct Shared {
    /// `http://host:port` of the upstream, no trailing slash.
    upstream: String,
    client: Client<HttpConnector, Incoming>,
    requests: Mutex<Vec<Recorded>>,
    rules: Mutex<Vec<Rule>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread may poison the lock; the data is still valid.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        lock(&self.requests)
    }

    /// Takes the fault of the first live rule of the given phase that matches `r`.
    fn plan(&self, r: &Recorded, on_response: bool) -> Option<Planned> {
        let mut rules = lock(&self.rules);
        let rule = rules.iter_mut().find(|rule| {
            rule.left > 0
                && rule
                    .fault
                    .as_ref()
                    .is_some_and(|f| f.on_response() == on_response)
                && (rule.matches)(r)
        })?;
        rule.left -= 1;
        let fault = match rule.fault.as_ref()? {
            Fault::Before(_) => rule.fault.take()?,
            Fault::Delay(d) => Fault::Delay(*d),
            Fault::Error {
                status,
                code,
                message,
            } => Fault::Error {
                status: *status,
                code,
                message,
            },
            Fault::ResetRequest => Fault::ResetRequest,
            Fault::CutResponse { after } => Fault::CutResponse { after: *after },
            Fault::Corrupt => Fault::Corrupt,
            Fault::Hang => Fault::Hang,
            Fault::DropHeader(name) => Fault::DropHeader(name),
        };
        Some(Planned {
            fault,
            applied: rule.applied.clone(),
        })
    }
}

/// A recording, fault-injecting proxy on `127.0.0.1:<ephemeral>` in front of any
/// plain-HTTP upstream. Stops on drop.
pub struct Proxy {
    endpoint: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Cancelled to stop listening and drop every open connection (the endpoint is down),
    /// with the accept loop, whose end means the port is closed.
    up: Mutex<(CancellationToken, Option<tokio::task::JoinHandle<()>>)>,
    runtime: Option<Runtime>,
}

impl Proxy {
    /// Starts a proxy forwarding to `upstream` (`http://host:port`; any path is ignored,
    /// requests keep their own).
    pub fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_end_matches('/').to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-proxy")
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
            rules: Mutex::new(Vec::new()),
        });
        let listener = runtime
            .block_on(listen("127.0.0.1:0".parse().expect("a socket address")))
            .expect("bind the proxy to 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy's local address");
        let up = CancellationToken::new();
        let accepting = runtime.spawn(serve(listener, Arc::clone(&shared), up.clone()));
        Self {
            endpoint: format!("http://{addr}"),
            addr,
            shared,
            up: Mutex::new((up, Some(accepting))),
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

    /// Applies `fault` to the next `times` requests that satisfy `matches` (a
    /// [`Fault::Before`] action runs once, whatever `times` says). Rules apply in the order
    /// given, one per request and phase.
    pub fn inject(
        &self,
        matches: impl Fn(&Recorded) -> bool + Send + Sync + 'static,
        fault: Fault,
        times: usize,
    ) -> Injected {
        let applied = Injected::default();
        let left = if matches!(fault, Fault::Before(_)) {
            times.min(1)
        } else {
            times
        };
        lock(&self.shared.rules).push(Rule {
            matches: Box::new(matches),
            fault: Some(fault),
            left,
            applied: applied.clone(),
        });
        applied
    }

    /// Runs `action` once, just before the next GET of object `key` in `bucket` is
    /// forwarded; the GET waits until the action has returned.
    pub fn before_get(
        &self,
        bucket: &str,
        key: &str,
        action: impl FnOnce() + Send + 'static,
    ) -> Injected {
        self.inject(get_of(bucket, key), Fault::Before(Box::new(action)), 1)
    }

    /// Damages (flips one byte in the middle of) the bodies of the next `times` successful
    /// GETs of `key`; headers, length included, stay as the server sent them.
    pub fn corrupt_gets(&self, bucket: &str, key: &str, times: usize) -> Injected {
        self.inject(get_of(bucket, key), Fault::Corrupt, times)
    }

    /// Withdraws every fault not yet applied.
    pub fn clear_faults(&self) {
        lock(&self.shared.rules).clear();
    }

    /// The endpoint goes down: connections are refused, and open ones are dropped. Returns
    /// once the port is closed.
    pub fn go_down(&self) {
        let mut up = lock(&self.up);
        up.0.cancel();
        if let (Some(accepting), Some(runtime)) = (up.1.take(), self.runtime.as_ref()) {
            let _ = runtime.block_on(accepting);
        }
    }

    /// The endpoint comes back on the same address.
    pub fn come_back(&self) {
        let mut up = lock(&self.up);
        if !up.0.is_cancelled() {
            return;
        }
        let runtime = self.runtime.as_ref().expect("the proxy's runtime");
        let listener = runtime
            .block_on(listen(self.addr))
            .unwrap_or_else(|e| panic!("listen again on {}: {e}", self.addr));
        let token = CancellationToken::new();
        let accepting = runtime.spawn(serve(listener, Arc::clone(&self.shared), token.clone()));
        *up = (token, Some(accepting));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A matcher for GETs of object `key` in `bucket` (path-style).
pub fn get_of(bucket: &str, key: &str) -> impl Fn(&Recorded) -> bool + Send + Sync + 'static {
    let (bucket, key) = (bucket.to_owned(), key.to_owned());
    move |r| r.method == "GET" && r.key_in(&bucket).as_deref() == Some(key.as_str())
}

/// A listening socket with SO_REUSEADDR, so that [`Proxy::come_back`] can take the same
/// port again while old connections linger in TIME_WAIT.
async fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, up: CancellationToken) {
    loop {
        let socket = tokio::select! {
            () = up.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    eprintln!("test proxy: accept failed: {e}");
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        let up = up.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(req, Arc::clone(&shared)));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service);
            // A client hanging up mid-request is the client's business; ignore it. Going
            // down drops the connection, whatever it was doing.
            tokio::select! {
                () = up.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

/// Records `req`, applies the faults that match it, forwards it upstream and relays the
/// answer (or a 502 if there is none). An `Err` drops the connection without an answer.
async fn forward(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, BoxError> {
    let recorded = Recorded {
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
        fault: None,
    };
    let planned = shared.plan(&recorded, false);
    let index = {
        let mut log = shared.log();
        log.push(Recorded {
            fault: planned.as_ref().map(|p| p.fault.name()),
            ..recorded.clone()
        });
        log.len() - 1
    };
    let set_status = |status: u16| shared.log()[index].status = Some(status);

    let mut req = req;
    if let Some(Planned { fault, applied }) = planned {
        match fault {
            Fault::Before(action) => {
                // A thread of its own: the action may block (the owner's client runs its
                // own runtime), which must not happen on this runtime's workers.
                let (done, ran) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    let ok = std::panic::catch_unwind(AssertUnwindSafe(action)).is_ok();
                    let _ = done.send(ok);
                });
                if !ran.await.unwrap_or(false) {
                    set_status(502);
                    return Ok(plain(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "test proxy: the test's action before {} panicked",
                            recorded.summary()
                        ),
                    ));
                }
                applied.0.fetch_add(1, Ordering::SeqCst);
            }
            Fault::Delay(delay) => {
                // Counted before the wait: a client that gives up meanwhile drops this.
                applied.0.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
            }
            Fault::Error {
                status,
                code,
                message,
            } => {
                applied.0.fetch_add(1, Ordering::SeqCst);
                set_status(status);
                return Ok(s3_error(status, code, message));
            }
            Fault::ResetRequest => {
                applied.0.fetch_add(1, Ordering::SeqCst);
                let _ = req.body_mut().frame().await;
                return Err("test proxy: reset mid-request".into());
            }
            Fault::Hang => {
                applied.0.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            Fault::DropHeader(name) => {
                applied.0.fetch_add(1, Ordering::SeqCst);
                req.headers_mut().remove(name);
            }
            // Planned only for responses (`Fault::on_response`): never here.
            Fault::CutResponse { .. } | Fault::Corrupt => {}
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
    let status = response.status();
    set_status(status.as_u16());
    let planned = status
        .is_success()
        .then(|| shared.plan(&recorded, true))
        .flatten();
    let Some(Planned { fault, applied }) = planned else {
        return Ok(response.map(|b| b.map_err(BoxError::from).boxed()));
    };
    shared.log()[index].fault = Some(fault.name());
    applied.0.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = response.into_parts();
    match fault {
        Fault::CutResponse { after } => Ok(Response::from_parts(
            parts,
            Cut {
                inner: body,
                left: after,
            }
            .boxed(),
        )),
        _ => {
            let mut bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes().to_vec(),
                Err(e) => {
                    return Ok(plain(
                        StatusCode::BAD_GATEWAY,
                        format!("upstream body failed: {e:?}"),
                    ));
                }
            };
            let middle = bytes.len() / 2;
            if let Some(byte) = bytes.get_mut(middle) {
                *byte ^= 0xff;
            }
            Ok(Response::from_parts(parts, full(Bytes::from(bytes))))
        }
    }
}

/// A body that relays `left` bytes of `inner`, then fails, which makes hyper drop the
/// connection in the middle of the body.
struct Cut {
    inner: Incoming,
    left: usize,
}

impl Body for Cut {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(Some(Err("test proxy: cut mid-body".into())));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    if data.len() > self.left {
                        data.truncate(self.left);
                    }
                    self.left -= data.len();
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn plain(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(message)));
    *response.status_mut() = status;
    response
}

/// The XML error document S3 sends.
fn s3_error(status: u16, code: &str, message: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>test-proxy</RequestId></Error>"
    );
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    response
}
