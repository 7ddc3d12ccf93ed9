//! The systemd notification protocol (`sd_notify(3)`), by hand: one datagram of
//! `KEY=value` lines to the Unix socket named in `$NOTIFY_SOCKET`.
//!
//! Twenty lines of std instead of a crate. Everything is a no-op when the variable is
//! absent (run by hand, in tests, under another supervisor), and a failure to send is
//! returned, never fatal: systemd's readiness is a courtesy, the exchange is the job.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where and how to notify systemd, read once from the environment at start.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. Absent or empty means every call is a no-op.
    pub fn from_env() -> Self {
        Self {
            socket: std::env::var("NOTIFY_SOCKET")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// A notifier for a given socket path (tests).
    pub fn to_socket(path: impl Into<String>) -> Self {
        Self {
            socket: Some(path.into()),
        }
    }

    /// Whether a service manager listens (`$NOTIFY_SOCKET` was set).
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` assignments). `Ok(false)` when there
    /// is no socket to send to.
    pub fn notify(&self, state: &str) -> io::Result<bool> {
        let Some(socket) = &self.socket else {
            return Ok(false);
        };
        // `@name` is an abstract socket (Linux): the name without the `@`, NUL-prefixed.
        let addr = match socket.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(socket)?,
        };
        let datagram = UnixDatagram::unbound()?;
        datagram.send_to_addr(state.as_bytes(), &addr)?;
        Ok(true)
    }

    /// Like [`notify`](Self::notify), but a failure is logged once at debug level:
    /// callers have nothing better to do with it.
    pub fn send(&self, state: &str) {
        if let Err(err) = self.notify(state) {
            tracing::debug!(error = %err, state, "sd_notify failed");
        }
    }

    /// `STATUS=` carries one line: newlines would start new assignments.
    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", text.replace('\n', " ")));
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// recommends, and only when `$WATCHDOG_PID` (if set) is this process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let n = Notifier::default();
        assert!(!n.enabled());
        assert!(!n.notify("READY=1").expect("no-op"));
    }

    #[test]
    fn a_datagram_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::to_socket(path.to_string_lossy());
        assert!(n.notify("READY=1\nSTATUS=up").expect("sent"));
        n.status("two\nlines");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STATUS=two lines");
    }

    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        let name = format!("s3-exchange-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        Notifier::to_socket(format!("@{name}"))
            .notify("WATCHDOG=1")
            .expect("sent");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let n = Notifier::to_socket("/nonexistent/notify.sock");
        assert!(n.notify("READY=1").is_err());
    }

    #[test]
    fn the_watchdog_pings_at_half_the_timeout_for_our_pid_only() {
        assert_eq!(
            watchdog_interval_from(Some("3000000"), None, 7),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            watchdog_interval_from(Some("3000000"), Some("7"), 7),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(watchdog_interval_from(Some("3000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
    }
}
