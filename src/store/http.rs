//! The HTTP client under the S3 calls: the parts of the SDK's default client (hyper 1 over
//! rustls with aws-lc and the system's root certificates, `TCP_NODELAY`, a connect timeout
//! over DNS, TCP and TLS, a read timeout until the response head, a pool of keep-alive
//! connections that the SDK may poison, its error kinds), with one change: the TCP stream
//! acknowledges what it received at once (`TCP_QUICKACK`) instead of leaving that to
//! Linux's delayed ACK.
//!
//! Why: a server that sends a response's head and its body in two writes with Nagle's
//! algorithm on (Ceph RGW's beast frontend does) holds a small body back until the head is
//! acknowledged, and on a keep-alive connection Linux delays that acknowledgement by about
//! 40 ms, hoping to send it with the next request. Every small GET (and each listing page's
//! last segment) then waited 40 ms: a 4 KiB GET from the local RGW took 44 ms, and 1.4 ms
//! with the acknowledgement sent at once (measured with a raw socket, 30 GETs each way).
//! aws-smithy-http-client 1.5 builds its TCP stream inside and offers no hook on it, so
//! this module assembles the same parts around a stream of its own.
//!
//! Cost: one `setsockopt` each time hyper finds the socket empty and waits after some
//! traffic (a microsecond or so; about two per small response).
//!
//! Where it differs from the SDK's client: HTTP/1.1 only (S3 speaks it; the SDK's client
//! offers h2 by ALPN, which S3 does not take), rustls' own choice of cipher suites, no
//! User-Agent note of the HTTP stack. And where the environment names a proxy
//! ([`proxy_in_environment`]) the daemon keeps the SDK's client, which handles proxies;
//! the delayed ACK is then the proxy's business.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::connection::{CaptureSmithyConnection, ConnectionMetadata};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::ErrorKind;
use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{
    CaptureConnection, Connected, Connection, HttpConnector as TcpConnector, HttpInfo,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// The proxy variable set in the environment, if any: the SDK's own client reads these
/// (with `NO_PROXY`), this one does not.
pub fn proxy_in_environment() -> Option<&'static str> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .find(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// The SDK's HTTP client for this daemon: see the module doc. One connection pool per
/// pair of connect and read timeouts the SDK asks for (this daemon asks for one).
#[derive(Debug)]
pub struct QuickAckClient {
    tls: Arc<rustls::ClientConfig>,
    connectors: RwLock<HashMap<Timeouts, SharedHttpConnector>>,
}

/// A pool's connect and read timeouts.
type Timeouts = (Option<Duration>, Option<Duration>);

impl QuickAckClient {
    /// Loads the system's root certificates, those it can parse. A missing or broken store
    /// is a warning, not a failure: a plain-http endpoint (the local default) needs none,
    /// and an https one then fails its TLS handshake with the server's name.
    pub fn new() -> Result<Self, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "cannot read a system root certificate");
        }
        let (valid, _) = roots.add_parsable_certificates(native.certs);
        if valid == 0 {
            tracing::warn!(
                "no system root certificates (install ca-certificates): HTTPS endpoints will fail their TLS handshake"
            );
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls: Arc::new(tls),
            connectors: RwLock::default(),
        })
    }
}

impl HttpClient for QuickAckClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        // Asked for at every attempt: the pool must outlive them.
        let key = (settings.connect_timeout(), settings.read_timeout());
        if let Some(connector) = self
            .connectors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return connector.clone();
        }
        let mut connectors = self.connectors.write().unwrap_or_else(|e| e.into_inner());
        connectors
            .entry(key)
            .or_insert_with(|| SharedHttpConnector::new(Connector::new(&self.tls, key.0, key.1)))
            .clone()
    }
}

/// The SDK's connector: a hyper client (its pool of keep-alive connections) and the read
/// timeout of its requests.
struct Connector {
    client: Client<ConnectWithin, SdkBody>,
    read_timeout: Option<Duration>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("read_timeout", &self.read_timeout)
            .finish_non_exhaustive()
    }
}

impl Connector {
    fn new(
        tls: &Arc<rustls::ClientConfig>,
        connect_timeout: Option<Duration>,
        read_timeout: Option<Duration>,
    ) -> Self {
        let mut tcp = TcpConnector::new();
        tcp.set_nodelay(true);
        // The TLS layer above decides between http and https.
        tcp.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(rustls::ClientConfig::clone(tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(QuickAckTcp(tcp));
        let connect = ConnectWithin {
            https,
            limit: connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the pool never closes idle connections.
            .pool_timer(TokioTimer::new())
            .build(connect);
        Self {
            client,
            read_timeout,
        }
    }
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let mut request = match request.try_into_http1x() {
            Ok(request) => request,
            Err(err) => return HttpConnectorFuture::ready(Err(ConnectorError::user(err.into()))),
        };
        // Lets the SDK's retry logic close a connection it no longer trusts (after a
        // timeout, say) instead of handing it back to the pool.
        let captured = hyper_util::client::legacy::connect::capture_connection(&mut request);
        if let Some(smithy) = request.extensions().get::<CaptureSmithyConnection>() {
            smithy.set_connection_retriever(move || connection_metadata(&captured));
        }
        let response = self.client.request(request);
        let read_timeout = self.read_timeout;
        HttpConnectorFuture::new(async move {
            let response = match read_timeout {
                Some(limit) => match tokio::time::timeout(limit, response).await {
                    Ok(response) => response,
                    Err(_) => {
                        return Err(ConnectorError::timeout(
                            format!("no response within the read timeout of {limit:?}").into(),
                        ));
                    }
                },
                None => response.await,
            };
            match response {
                Ok(response) => HttpResponse::try_from(response.map(SdkBody::from_body_1_x))
                    .map_err(|err| ConnectorError::other(err.into(), None)),
                Err(err) => Err(connector_error(err.into())),
            }
        })
    }
}

fn connection_metadata(captured: &CaptureConnection) -> Option<ConnectionMetadata> {
    let connected = captured.connection_metadata();
    let connected = connected.as_ref()?;
    let mut extensions = hyper::http::Extensions::new();
    connected.get_extras(&mut extensions);
    let info = extensions.get::<HttpInfo>();
    let captured = captured.clone();
    let mut builder = ConnectionMetadata::builder()
        .proxied(false)
        .poison_fn(move || {
            if let Some(connected) = captured.connection_metadata().as_ref() {
                connected.poison();
            }
        });
    builder
        .set_local_addr(info.map(HttpInfo::local_addr))
        .set_remote_addr(info.map(HttpInfo::remote_addr));
    Some(builder.build())
}

/// Sorts a failed request the way the SDK's own client does, so that its retries (and
/// [`super::Failure`]) see the same kinds: a timeout, our request body failing (`user`),
/// the network (`io`: refused, reset, closed), or a message cut short (transient).
fn connector_error(err: BoxError) -> ConnectorError {
    if find_source::<ConnectTimedOut>(err.as_ref()).is_some() {
        return ConnectorError::timeout(err);
    }
    if let Some(hyper_error) = find_source::<hyper::Error>(err.as_ref()) {
        if hyper_error.is_timeout() {
            return ConnectorError::timeout(err);
        }
        if hyper_error.is_user() {
            return ConnectorError::user(err);
        }
        if hyper_error.is_closed()
            || hyper_error.is_canceled()
            || find_source::<std::io::Error>(hyper_error).is_some()
        {
            return ConnectorError::io(err);
        }
        if hyper_error.is_incomplete_message() {
            return ConnectorError::other(err, Some(ErrorKind::TransientError));
        }
        return ConnectorError::other(err, None);
    }
    let connect_failed = find_source::<hyper_util::client::legacy::Error>(err.as_ref())
        .is_some_and(hyper_util::client::legacy::Error::is_connect);
    if connect_failed || find_source::<std::io::Error>(err.as_ref()).is_some() {
        return ConnectorError::io(err);
    }
    ConnectorError::other(err, None)
}

fn find_source<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// The connect timeout: resolving, TCP and the TLS handshake together, as the SDK's client
/// times it (hyper's own covers only TCP, split between the addresses a name resolves to).
#[derive(Clone)]
struct ConnectWithin {
    https: HttpsConnector<QuickAckTcp>,
    limit: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
#[error("no connection within the connect timeout of {0:?}")]
struct ConnectTimedOut(Duration);

impl tower_service::Service<Uri> for ConnectWithin {
    type Response = MaybeHttpsStream<QuickAckStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.https.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.https.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match limit {
                Some(limit) => tokio::time::timeout(limit, connecting)
                    .await
                    .map_err(|_| Box::new(ConnectTimedOut(limit)) as BoxError)?,
                None => connecting.await,
            }
        })
    }
}

/// hyper's TCP connector, handing out [`QuickAckStream`]s.
#[derive(Clone)]
struct QuickAckTcp(TcpConnector);

impl tower_service::Service<Uri> for QuickAckTcp {
    type Response = QuickAckStream;
    type Error = <TcpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAckStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            connecting
                .await
                .map(|io| QuickAckStream { io, moved: true })
        })
    }
}

/// A TCP stream that acknowledges what it received whenever hyper waits for more, so that
/// a server holding its next segment until this one is acknowledged (Nagle) never waits
/// for Linux's delayed ACK. See the module doc.
struct QuickAckStream {
    io: TokioIo<TcpStream>,
    /// Whether data went either way since `TCP_QUICKACK` was last set: only then can an
    /// acknowledgement of data already read be held back (data not yet read wakes the
    /// reader, whose next wait sets the flag again). hyper polls an idle connection's read side several
    /// times per request (5 of the 7 `setsockopt`s per small GET were such repeats).
    moved: bool,
}

impl Read for QuickAckStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        // Only before waiting: a server holding data back for an acknowledgement shows
        // as a read that finds nothing, and that is when the ACK Linux delayed must go
        // out (setting the flag sends one that is pending). Reads that find data go without the system
        // call: over a 1 GiB download 7,690 -> 2,176 calls. Not permanent in Linux (the
        // socket drops back into delayed ACKs as soon as it sends again), so it is set
        // at each wait that follows traffic. A failure only costs the delay.
        if read.is_ready() {
            self.moved = true;
        } else if std::mem::take(&mut self.moved) {
            #[cfg(target_os = "linux")]
            let _ = rustix::net::sockopt::set_tcp_quickack(self.io.inner(), true);
        }
        read
    }
}

impl Write for QuickAckStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.moved |= written.is_ready();
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.moved |= written.is_ready();
        written
    }
}

impl Connection for QuickAckStream {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers each request on a connection with `200` and a 4 KiB body, written (as the
    /// Ceph RADOS Gateway does) in two sends: the head, then the body. (That the body then
    /// comes without Linux's 40 ms delayed ACK is a matter of time, so the benchmark's
    /// `single` scenario shows it, not a test: a socket's ACK mode cannot be read back
    /// reliably, as the delayed-ACK timer itself resets it.)
    /// Also returns the count of connections it accepted.
    async fn serve_in_two_writes() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        request.extend_from_slice(&buf[..n]);
                        while let Some(end) = memchr::memmem::find(&request, b"\r\n\r\n") {
                            request.drain(..end + 4);
                            let head = "HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n";
                            if conn.write_all(head.as_bytes()).await.is_err()
                                || conn.write_all(&[7u8; 4096]).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get(url: String) -> HttpRequest {
        let request = hyper::Request::get(url).body(SdkBody::empty()).unwrap();
        HttpRequest::try_from(request).unwrap()
    }

    fn connector(connect_timeout: Duration, read_timeout: Option<Duration>) -> Connector {
        let client = QuickAckClient::new().expect("TLS set-up");
        Connector::new(&client.tls, Some(connect_timeout), read_timeout)
    }

    /// A connector with a 5 s connect timeout.
    fn connector_reading(read_timeout: Option<Duration>) -> Connector {
        connector(Duration::from_secs(5), read_timeout)
    }

    /// Accepts connections and keeps them open without a word.
    async fn silent_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                open.push(conn);
            }
        });
        addr
    }

    /// Keep-alive: the second request goes over the first one's connection.
    #[tokio::test]
    async fn responses_come_through_the_pool() {
        let (addr, accepted) = serve_in_two_writes().await;
        let pool = connector_reading(None);
        for _ in 0..2 {
            let response = pool.call(get(format!("http://{addr}/b/k"))).await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(body, vec![7u8; 4096]);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection, kept alive"
        );
    }

    /// The SDK retries and [`super::super::Failure`] tells an outage by these kinds, as
    /// its own client sorts them.
    #[tokio::test]
    async fn failures_are_sorted_as_the_sdks_client_sorts_them() {
        // Refused: nothing listens on the port any more.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = listener.local_addr().unwrap();
        drop(listener);
        let err = connector_reading(None)
            .call(get(format!("http://{closed}/b/k")))
            .await
            .unwrap_err();
        assert!(err.is_io(), "refused: {err:?}");

        // Closed without an answer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hangs_up = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                drop(conn);
            }
        });
        let err = connector_reading(None)
            .call(get(format!("http://{hangs_up}/b/k")))
            .await
            .unwrap_err();
        assert!(
            err.is_io() || err.as_other() == Some(ErrorKind::TransientError),
            "closed without an answer must be retried: {err:?}"
        );

        // Accepted, never answered: the read timeout.
        let silent = silent_server().await;
        let err = connector_reading(Some(Duration::from_millis(200)))
            .call(get(format!("http://{silent}/b/k")))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "no answer: {err:?}");

        // TCP accepted, the TLS handshake never answered: the connect timeout covers it
        // (hyper's own would stop at TCP and leave it to the read timeout).
        let err = connector(Duration::from_millis(200), None)
            .call(get(format!("https://{silent}/b/k")))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "no TLS handshake: {err:?}");
    }

    /// A request body that fails (the file being uploaded vanished) is ours, not the
    /// network's: `user`, which [`super::super::Failure::LocalBody`] relies on.
    #[tokio::test]
    async fn a_failing_request_body_is_the_users_error() {
        use http_body::Frame;
        let silent = silent_server().await;
        let frames: Vec<Result<Frame<bytes::Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(bytes::Bytes::from_static(b"first bytes"))),
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the file vanished",
            )),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let request = hyper::Request::put(format!("http://{silent}/b/k"))
            .body(SdkBody::from_body_1_x(body))
            .unwrap();
        let err = connector_reading(None)
            .call(HttpRequest::try_from(request).unwrap())
            .await
            .unwrap_err();
        assert!(err.is_user(), "a failing body: {err:?}");
    }
}
