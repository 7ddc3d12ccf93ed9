//! The optional Prometheus endpoint (`[metrics] listen`): `GET /metrics` in the text
//! exposition format, from the same counters as `status`.
//!
//! A hand-written HTTP/1.0-style responder (one request per connection, then close)
//! rather than an HTTP server crate: a scraper sends one small GET every few seconds,
//! and this keeps the daemon's dependency tree and attack surface small. Requests are
//! bounded in size and time so a stuck client cannot hold a task forever.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::status::{Counters, STATS};

/// Largest request head read; anything longer is answered 431 and closed.
const MAX_REQUEST: usize = 8 << 10;
/// A client gets this long to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr`; a failure is reported at start, not at the first scrape.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Answers scrapes until `shutdown`. `started_ms` becomes `s3_exchange_start_time_seconds`.
pub async fn serve(listener: TcpListener, started_ms: i64, shutdown: CancellationToken) {
    loop {
        let socket = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            if let Err(err) = respond(socket, started_ms).await {
                tracing::debug!(error = %err, "metrics endpoint: request failed");
            }
        });
    }
}

async fn respond(mut socket: TcpStream, started_ms: i64) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() > MAX_REQUEST {
                return Ok(true);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))?;
    if !complete {
        return Ok(());
    }
    let (status, body) = if head.len() > MAX_REQUEST {
        ("431 Request Header Fields Too Large", String::new())
    } else {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let mut parts = line.split(|&b| b == b' ');
        match (parts.next(), parts.next()) {
            (Some(b"GET"), Some(b"/metrics")) => ("200 OK", render(&STATS.counters(), started_ms)),
            (Some(b"GET"), _) => ("404 Not Found", "try /metrics\n".to_owned()),
            _ => ("405 Method Not Allowed", String::new()),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

/// The exposition text for `counters`.
pub fn render(c: &Counters, started_ms: i64) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let seconds = |ms: Option<i64>| ms.map_or(0.0, |ms| ms as f64 / 1000.0);
    let dir = |d: &str| format!("{{direction=\"{d}\"}}");
    metric(
        "s3_exchange_objects_total",
        "counter",
        "Objects transferred and recorded in the ledger since the daemon started.",
        &[
            (dir("upload"), c.sent as f64),
            (dir("download"), c.received as f64),
        ],
    );
    metric(
        "s3_exchange_bytes_total",
        "counter",
        "Bytes of the objects counted in s3_exchange_objects_total.",
        &[
            (dir("upload"), c.sent_bytes as f64),
            (dir("download"), c.received_bytes as f64),
        ],
    );
    let failures: Vec<_> = c
        .failures
        .iter()
        .map(|f| {
            (
                format!(
                    "{{direction=\"{}\",outcome=\"{}\"}}",
                    f.direction, f.outcome
                ),
                f.count as f64,
            )
        })
        .collect();
    metric(
        "s3_exchange_transfer_failures_total",
        "counter",
        "Transfers that did not complete, by direction and outcome (failed, changed, vanished).",
        &failures,
    );
    metric(
        "s3_exchange_queue_depth",
        "gauge",
        "Outbox files waiting to settle or to be retried.",
        &[(String::new(), c.queued as f64)],
    );
    metric(
        "s3_exchange_uploads_in_flight",
        "gauge",
        "Uploads running now.",
        &[(String::new(), c.in_flight as f64)],
    );
    metric(
        "s3_exchange_quarantined",
        "gauge",
        "Outbox files refused permanently until they change.",
        &[(String::new(), c.quarantined as f64)],
    );
    metric(
        "s3_exchange_rejected_keys",
        "gauge",
        "Inbox keys that cannot become a file and are not fetched.",
        &[(String::new(), c.rejected as f64)],
    );
    metric(
        "s3_exchange_polls_total",
        "counter",
        "Polls of the inbox prefix.",
        &[(String::new(), c.polls as f64)],
    );
    metric(
        "s3_exchange_poll_failures_total",
        "counter",
        "Polls whose listing failed.",
        &[(String::new(), c.poll_failures as f64)],
    );
    metric(
        "s3_exchange_last_successful_poll_timestamp_seconds",
        "gauge",
        "Unix time of the last poll that listed the whole prefix (0: none yet).",
        &[(String::new(), seconds(c.last_successful_poll_ms))],
    );
    metric(
        "s3_exchange_last_rescan_timestamp_seconds",
        "gauge",
        "Unix time of the last full walk of the outbox (0: none yet).",
        &[(String::new(), seconds(c.last_rescan_ms))],
    );
    metric(
        "s3_exchange_watcher_overflows_total",
        "counter",
        "Times the file watcher lost events and a rescan was needed.",
        &[(String::new(), c.watcher_overflows as f64)],
    );
    metric(
        "s3_exchange_start_time_seconds",
        "gauge",
        "Unix time the daemon started.",
        &[(String::new(), seconds(Some(started_ms)))],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::FailureCount;

    #[test]
    fn the_exposition_names_every_series_once_with_its_type() {
        let c = Counters {
            sent: 3,
            sent_bytes: 300,
            received: 1,
            last_successful_poll_ms: Some(1_500),
            failures: vec![FailureCount {
                direction: "upload".into(),
                outcome: "failed".into(),
                count: 2,
            }],
            ..Counters::default()
        };
        let text = render(&c, 1_000);
        for line in [
            "s3_exchange_objects_total{direction=\"upload\"} 3",
            "s3_exchange_bytes_total{direction=\"upload\"} 300",
            "s3_exchange_objects_total{direction=\"download\"} 1",
            "s3_exchange_transfer_failures_total{direction=\"upload\",outcome=\"failed\"} 2",
            "s3_exchange_last_successful_poll_timestamp_seconds 1.5",
            "s3_exchange_start_time_seconds 1",
            "# TYPE s3_exchange_queue_depth gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[tokio::test]
    async fn a_real_get_is_answered_and_other_paths_are_not() {
        let listener = bind(([127, 0, 0, 1], 0).into()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, 0, shutdown.clone()));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("send");
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.expect("read");
            reply
        };
        let reply = get("/metrics").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            reply.contains("\r\n\r\n# HELP s3_exchange_objects_total"),
            "{reply}"
        );
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
        server.await.expect("server stops on shutdown");
    }
}
