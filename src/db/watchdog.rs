//! The client-side statement deadline: every connection dsreg makes runs over a [`Watched`]
//! socket that gives up on the server when something was sent and nothing at all came back
//! within the deadline (the `statement_timeout` plus a margin). The connection then fails,
//! the statement waiting on it answers "unavailable", and the pool discards it.
//!
//! This is what finds a middlebox that went silent while a statement was in flight: it keeps
//! acknowledging at the TCP level, so neither keepalives nor `tcp_user_timeout` fire, and
//! the server's own `statement_timeout` cannot reach the client. A server that is merely slow
//! answers within `statement_timeout` (it cancels the statement itself), so the deadline never
//! cuts a healthy connection. An idle connection has nothing outstanding and is not timed.
//!
//! The socket is made here too ([`connect`]): TCP (with `TCP_NODELAY`, keepalives and
//! `TCP_USER_TIMEOUT` as the configuration says) or a Unix socket, for each host of a
//! multi-host configuration in turn, then tokio-postgres's startup on top
//! (`Config::connect_raw`), then the `target_session_attrs` check, as tokio-postgres's own
//! `connect` does.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, Sleep};
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, SimpleQueryMessage};

/// How much longer than the `statement_timeout` the client waits for a first byte back.
pub const MARGIN: Duration = Duration::from_secs(5);

/// The client-side deadline for a `statement_timeout`: none without one.
pub fn deadline_for(statement_timeout: Option<Duration>) -> Option<Duration> {
    statement_timeout.map(|t| t.saturating_add(MARGIN))
}

enum Inner {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A socket to the server that fails once bytes were written and none were read for its
/// deadline.
pub struct Watched {
    inner: Inner,
    deadline: Option<Duration>,
    /// Since when a write is waiting for anything to be read back.
    waiting_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl Watched {
    fn new(inner: Inner, deadline: Option<Duration>) -> Self {
        Self {
            inner,
            deadline,
            waiting_since: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.waiting_since = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let (Some(deadline), Some(since)) = (this.deadline, this.waiting_since) else {
                    return Poll::Pending;
                };
                let at = since + deadline;
                if this.timer.deadline() != at {
                    this.timer.as_mut().reset(at);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no answer from the database within {deadline:?} (statement timeout plus {MARGIN:?}); the connection is given up"
                        ),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Unix(s) => Pin::new(s).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
            && this.waiting_since.is_none()
        {
            this.waiting_since = Some(Instant::now());
            // The driver may have polled the read side before this write, when nothing was
            // timed: poll it again so the deadline's timer is registered.
            cx.waker().wake_by_ref();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Tcp(s) => Pin::new(s).poll_flush(cx),
            Inner::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why a connect failed: the socket could not be made, or the startup failed.
#[derive(Debug)]
pub enum ConnectFailure {
    /// No host could be reached at the socket level.
    Socket(io::Error),
    /// The server (or the TLS handshake) refused.
    Startup(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for ConnectFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Startup(e)
    }
}

/// Connects as `config` says over [`Watched`] sockets with `deadline`: each host in turn
/// (and each address a name resolves to), the last failure reported.
///
/// # Errors
/// The last host's [`ConnectFailure`].
pub async fn connect<T>(
    config: &Config,
    mut tls: T,
    deadline: Option<Duration>,
) -> Result<(Client, Connection<Watched, T::Stream>), ConnectFailure>
where
    T: MakeTlsConnect<Watched>,
{
    let hosts = config.get_hosts();
    let hostaddrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(hostaddrs.len());
    let mut last = ConnectFailure::Socket(io::Error::new(
        io::ErrorKind::InvalidInput,
        "no host to connect to",
    ));
    for i in 0..count {
        let port = ports
            .get(i)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        let hostname = match hosts.get(i) {
            Some(Host::Tcp(name)) => Some(name.clone()),
            _ => None,
        };
        let sockets: Vec<Inner> = match (hostaddrs.get(i), hosts.get(i)) {
            (Some(ip), _) => match tcp(config, (*ip, port).into()).await {
                Ok(s) => vec![s],
                Err(e) => {
                    last = ConnectFailure::Socket(e);
                    continue;
                }
            },
            (None, Some(Host::Unix(dir))) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                match bounded(config, UnixStream::connect(path)).await {
                    Ok(s) => vec![Inner::Unix(s)],
                    Err(e) => {
                        last = ConnectFailure::Socket(e);
                        continue;
                    }
                }
            }
            (None, Some(Host::Tcp(name))) => {
                let addrs = match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(addrs) => addrs.collect::<Vec<_>>(),
                    Err(e) => {
                        last = ConnectFailure::Socket(e);
                        continue;
                    }
                };
                let mut made = Vec::new();
                for addr in addrs {
                    match tcp(config, addr).await {
                        Ok(s) => {
                            made.push(s);
                            break;
                        }
                        Err(e) => last = ConnectFailure::Socket(e),
                    }
                }
                made
            }
            (None, None) => continue,
        };
        for socket in sockets {
            let connector = match tls.make_tls_connect(hostname.as_deref().unwrap_or("")) {
                Ok(c) => c,
                Err(e) => {
                    last = ConnectFailure::Socket(io::Error::other(e.into()));
                    continue;
                }
            };
            match startup::<T>(config, Watched::new(socket, deadline), connector).await {
                Ok(connected) => return Ok(connected),
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

async fn bounded<T>(
    config: &Config,
    connect: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match config.get_connect_timeout() {
        Some(timeout) => tokio::time::timeout(*timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))?,
        None => connect.await,
    }
}

async fn tcp(config: &Config, addr: std::net::SocketAddr) -> io::Result<Inner> {
    let stream = bounded(config, TcpStream::connect(addr)).await?;
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(&stream);
    if let Some(timeout) = config.get_tcp_user_timeout() {
        sock.set_tcp_user_timeout(Some(*timeout))?;
    }
    if config.get_keepalives() {
        let mut keepalive = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
        if let Some(interval) = config.get_keepalives_interval() {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(retries) = config.get_keepalives_retries() {
            keepalive = keepalive.with_retries(retries);
        }
        sock.set_tcp_keepalive(&keepalive)?;
    }
    Ok(Inner::Tcp(stream))
}

/// The startup over `socket`, then the `target_session_attrs` check (driving the connection
/// while it runs, as nothing else does yet).
async fn startup<T>(
    config: &Config,
    socket: Watched,
    tls: T::TlsConnect,
) -> Result<(Client, Connection<Watched, T::Stream>), ConnectFailure>
where
    T: MakeTlsConnect<Watched>,
{
    let (client, mut connection) = config.connect_raw(socket, tls).await?;
    let wanted = config.get_target_session_attrs();
    if wanted == TargetSessionAttrs::Any {
        return Ok((client, connection));
    }
    let read_only = {
        let mut rows = pin!(client.simple_query_raw("SHOW transaction_read_only"));
        let mut rows = pin!(
            std::future::poll_fn(|cx| {
                if connection.poll_unpin(cx)?.is_ready() {
                    return Poll::Ready(Err(closed()));
                }
                rows.as_mut().poll(cx).map_err(ConnectFailure::from)
            })
            .await?
        );
        let mut read_only = None;
        loop {
            let next = std::future::poll_fn(|cx| {
                if connection.poll_unpin(cx)?.is_ready() {
                    return Poll::Ready(Some(Err(closed())));
                }
                rows.as_mut()
                    .poll_next(cx)
                    .map(|row| row.map(|r| r.map_err(ConnectFailure::from)))
            })
            .await;
            match next.transpose()? {
                Some(SimpleQueryMessage::Row(row)) => {
                    read_only = row.try_get(0)?.map(|v| v == "on");
                }
                Some(_) => {}
                None => break,
            }
        }
        read_only
    };
    let refused = match (wanted, read_only) {
        (TargetSessionAttrs::ReadWrite, Some(true)) => Some("database does not allow writes"),
        (TargetSessionAttrs::ReadOnly, Some(false)) => Some("database is not read only"),
        _ => None,
    };
    match refused {
        Some(why) => Err(ConnectFailure::Socket(io::Error::new(
            io::ErrorKind::PermissionDenied,
            why,
        ))),
        None => Ok((client, connection)),
    }
}

fn closed() -> ConnectFailure {
    ConnectFailure::Socket(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the connection closed during the session check",
    ))
}

impl From<ConnectFailure> for io::Error {
    fn from(e: ConnectFailure) -> Self {
        match e {
            ConnectFailure::Socket(e) => e,
            ConnectFailure::Startup(e) => io::Error::other(e),
        }
    }
}
