//! The HTTP connection layer under axum: a bound on open connections, a deadline for a
//! request's headers and one for idle keep-alive connections.
//!
//! `axum::serve` has none of these, so a client sending a header byte every few seconds
//! (slowloris), or nothing at all, held a connection and a file descriptor for ever.
//! Here every connection's socket is wrapped in [`TimedIo`], which knows from the
//! service whether a request is in flight: while one is (a handler runs, a response or
//! an SSE stream is being sent) no deadline applies; between requests the idle deadline
//! does; once a byte of the next request arrives (or from the start, for the first one)
//! the header deadline does. A late request head gets `408` (problem+json) and the
//! connection is closed; an idle connection is closed quietly.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The connection settings of `[server]`.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    /// Zero: no keep-alive, every connection closes after its response.
    pub keep_alive_timeout: Duration,
    pub max_connections: usize,
    /// Told to a client refused for the connection bound.
    pub retry_after_seconds: u64,
}

impl ConnLimits {
    pub fn from_config(server: &crate::config::ServerConfig) -> ConnLimits {
        ConnLimits {
            header_read_timeout: Duration::from_millis(server.header_read_timeout_ms),
            keep_alive_timeout: Duration::from_secs(server.keep_alive_timeout_seconds),
            max_connections: server.max_connections.max(1),
            retry_after_seconds: server.retry_after_seconds.max(1),
        }
    }
}

/// Accepts connections until `shutdown`, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let (router, limits, shutdown) = (router.clone(), limits.clone(), shutdown.clone());
                tasks.spawn(async move {
                    connection(stream, router, &limits, shutdown).await;
                    drop(slot);
                });
            }
            Err(_) => {
                tracing::warn!(
                    "refusing a connection: server.max_connections ({}) are open",
                    limits.max_connections
                );
                let retry_after = limits.retry_after_seconds;
                tasks.spawn(refuse(stream, retry_after));
            }
        }
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// One HTTP/1.1 connection, to its end or to a graceful stop at shutdown.
async fn connection(
    stream: TcpStream,
    router: Router,
    limits: &ConnLimits,
    shutdown: CancellationToken,
) {
    let state = Arc::new(ConnState::default());
    let io = TimedIo::new(stream, state.clone(), limits);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_flight = InFlight::start(&state);
        let call = router.clone().oneshot(request);
        async move {
            let response = call.await?;
            Ok::<_, Infallible>(response.map(|inner| Tracked { inner, in_flight }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The deadlines are TimedIo's; hyper's own header timer would close without a 408.
    builder
        .keep_alive(!limits.keep_alive_timeout.is_zero())
        .header_read_timeout(None);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}

/// Over the connection bound: one 503 with Retry-After, then close.
async fn refuse(mut stream: TcpStream, retry_after: u64) {
    use tokio::io::AsyncWriteExt;
    let response = canned(
        "503 Service Unavailable",
        "too-many-connections",
        503,
        "the server has as many open connections as it allows (server.max_connections); retry after Retry-After seconds",
        Some(retry_after),
    );
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// A complete problem+json response written on the socket itself, for answers hyper
/// cannot give (the connection is refused, or closed before a request was read).
fn canned(
    status_line: &str,
    kind: &str,
    status: u16,
    detail: &str,
    retry_after: Option<u64>,
) -> Vec<u8> {
    let title = status_line.split_once(' ').map_or("", |(_, t)| t);
    let body = serde_json::json!({
        "type": format!("urn:vqclip:problem:{kind}"),
        "title": title,
        "status": status,
        "detail": detail,
    })
    .to_string();
    let retry = retry_after.map_or(String::new(), |s| format!("retry-after: {s}\r\n"));
    format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What the service tells the socket about its connection.
#[derive(Default)]
struct ConnState {
    /// Requests whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// Bumped each time the connection becomes idle (the last response was sent).
    idle_epoch: AtomicU64,
    /// The reader, woken when the connection becomes idle: it may have gone to sleep
    /// while a request was in flight (no deadline then), and an idle socket with no
    /// data would never wake it to start the idle deadline.
    reader: futures::task::AtomicWaker,
}

/// Held by a request from its head until its response body is dropped (sent or abandoned).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(state: &Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle_epoch.fetch_add(1, Ordering::SeqCst);
            self.0.reader.wake();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct Tracked {
    inner: Body,
    #[allow(dead_code)] // held for its Drop
    in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        hyper::body::Body::size_hint(&self.inner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    /// A request head is due (the connection is new, or a byte of it has arrived).
    Head,
    /// Between requests.
    Idle,
}

/// The socket of one connection, with the deadlines applied to its reads.
struct TimedIo {
    stream: TcpStream,
    state: Arc<ConnState>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// The idle epoch the counters below belong to; 0 until the first response.
    epoch: u64,
    /// Bytes read since the connection last became idle.
    read_in_epoch: u64,
    armed: Option<Deadline>,
    timer: Pin<Box<Sleep>>,
    /// A problem+json answer being written in place of hyper's bare error, and how
    /// much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl TimedIo {
    fn new(stream: TcpStream, state: Arc<ConnState>, limits: &ConnLimits) -> TimedIo {
        TimedIo {
            stream,
            state,
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.keep_alive_timeout,
            epoch: 0,
            read_in_epoch: 0,
            armed: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            replacement: None,
        }
    }

    /// The deadline that applies now, if any.
    fn due(&mut self) -> Option<Deadline> {
        if self.state.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let epoch = self.state.idle_epoch.load(Ordering::SeqCst);
        if epoch != self.epoch {
            self.epoch = epoch;
            self.read_in_epoch = 0;
            self.armed = None;
        }
        Some(if self.epoch == 0 || self.read_in_epoch > 0 {
            Deadline::Head
        } else {
            Deadline::Idle
        })
    }

    /// Best effort: the socket buffer takes a small response at once, and a client
    /// too slow to send its headers gets no more of our time than this.
    fn send_timeout_answer(&self) {
        let response = canned(
            "408 Request Timeout",
            "request-timeout",
            408,
            "the request headers did not arrive in time (server.header_read_timeout_ms); the connection is closed",
            None,
        );
        let _ = self.stream.try_write(&response);
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Registered before the state is read, so an InFlight dropped in between wakes us.
        self.state.reader.register(cx.waker());
        let due = self.due();
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                if due.is_some() {
                    self.read_in_epoch += n;
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let Some(due) = due else {
            self.armed = None;
            return Poll::Pending;
        };
        if self.armed != Some(due) {
            // The head deadline runs from the first byte (or the connection's start),
            // the idle one from the end of the last response.
            let timeout = match due {
                Deadline::Head => self.header_timeout,
                Deadline::Idle => self.idle_timeout,
            };
            self.timer.as_mut().reset(Instant::now() + timeout);
            self.armed = Some(due);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        match due {
            Deadline::Head => {
                self.send_timeout_answer();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the request headers did not arrive in time",
                )))
            }
            // End of stream: hyper closes an idle connection without a word.
            Deadline::Idle => Poll::Ready(Ok(())),
        }
    }
}

/// hyper answers a request it cannot parse (400, a duplicate Content-Length, 414 URI
/// too long, 431 headers too large) itself, with an empty body, before any route sees
/// it. Such an answer is recognised by what only hyper writes: a 4xx/5xx head with no
/// Content-Type while no request of ours is in flight. It is replaced by the same
/// status as problem+json.
fn problem_for_bare_error(head: &[u8]) -> Option<Vec<u8>> {
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let status_line = std::str::from_utf8(&head[..line_end]).ok()?;
    let rest = status_line.strip_prefix("HTTP/1.1 ")?;
    let code: u16 = rest.get(..3)?.parse().ok()?;
    if !(400..600).contains(&code) {
        return None;
    }
    let head_end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let headers = String::from_utf8_lossy(&head[..head_end]).to_ascii_lowercase();
    if headers.contains("\r\ncontent-type:") {
        return None;
    }
    let detail = match code {
        414 => "the request target is longer than this server reads (64 KiB); shorten the URL",
        431 => "the request headers are larger than this server reads; send fewer or shorter headers",
        _ => "the request is not valid HTTP/1.1 (e.g. a malformed request line or header, or conflicting Content-Length headers)",
    };
    let kind = match code {
        414 => "uri-too-long",
        431 => "headers-too-large",
        _ => "malformed-request",
    };
    Some(canned(rest.trim_end(), kind, code, detail, None))
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacement.is_none() && self.state.in_flight.load(Ordering::SeqCst) == 0 {
            self.replacement = problem_for_bare_error(buf).map(|bytes| (bytes, 0));
        }
        if let Some((bytes, mut written)) = self.replacement.take() {
            while written < bytes.len() {
                match Pin::new(&mut self.stream).poll_write(cx, &bytes[written..]) {
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.replacement = Some((bytes, written));
                        return Poll::Pending;
                    }
                }
            }
            // hyper's own bytes count as written: ours replaced them.
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    /// No vectored writes: hyper then hands each response head over in one buffer,
    /// which is what [`problem_for_bare_error`] reads.
    fn is_write_vectored(&self) -> bool {
        false
    }
}
