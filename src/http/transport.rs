//! The HTTP/1.1 connections of both listeners (the client API in the clear, federation
//! over TLS): Convo's own accept loop around hyper, so that
//! no client can hold the server's connections. It caps the connections open at once,
//! closes a connection that does not send its request headers in time, sits idle
//! between requests or stops reading its responses, fails a request body that does not
//! arrive in time (`408`), answers
//! a too-long request line or too-large header block with a Matrix error, and logs what
//! it cuts (at most a line per kind every 10 s). A request under way, such as a
//! long-polling `/sync`, is never cut however long it waits.
//!
//! Why not `axum::serve`: it has no header, body or idle timeouts and no connection cap,
//! and hyper answers a request line over 64 KiB (`414`) or a header block over its
//! buffer (`431`) with a bare status and no body, before axum sees the request.

use std::{
    convert::Infallible,
    error::Error as StdError,
    fmt, io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use axum::{Router, body::Body, extract::ConnectInfo};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::{Semaphore, watch},
    time::{Instant, Sleep},
};
use tower::ServiceExt;

use crate::{config::Limits, logging::Throttle};

/// The longest request line (method, path and query, version) Convo reads: past it,
/// `414 M_TOO_LARGE`. Below hyper's own limit (64 KiB), so that Convo answers first.
pub const MAX_REQUEST_LINE: usize = 32 * 1024;
/// The largest header block: past it, `431 M_TOO_LARGE` (hyper's buffer holds ~400 KiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most header lines: past it, `431 M_TOO_LARGE` (hyper is set to allow more).
pub const MAX_HEADERS: usize = 100;

/// Timeouts and the connection cap, from `[limits]`.
#[derive(Clone, Copy, Debug)]
pub struct TransportLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl From<&Limits> for TransportLimits {
    fn from(limits: &Limits) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(limits.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(limits.body_read_timeout_ms),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            max_connections: limits.max_connections as usize,
        }
    }
}

/// The connections of a running listener, for tests and monitoring.
#[derive(Clone, Default)]
pub struct Connections {
    open: Arc<AtomicUsize>,
}

impl Connections {
    /// How many client connections are open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Counts a connection as open while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

static CAP_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static ACCEPT_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static HEADER_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static BODY_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static REJECT_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static WRITE_LOG: Throttle = Throttle::new(Duration::from_secs(10));
static HANDSHAKE_LOG: Throttle = Throttle::new(Duration::from_secs(10));

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets
/// each connection finish the request under way (idle ones close at once) and returns
/// once every connection is closed.
pub fn serve(
    listener: TcpListener,
    router: Router,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Connections, impl Future<Output = io::Result<()>> + Send + 'static) {
    serve_with(listener, None, router, limits, shutdown)
}

/// Serves `router` over TLS (the federation listener), with the same limits as
/// [`serve`]. Each connection's TLS handshake runs in its own task and must end within
/// `header_read_timeout`: a slow handshake holds only its own connection slot.
pub fn serve_tls(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    router: Router,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Connections, impl Future<Output = io::Result<()>> + Send + 'static) {
    serve_with(listener, Some(tls), router, limits, shutdown)
}

fn serve_with(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Connections, impl Future<Output = io::Result<()>> + Send + 'static) {
    let connections = Connections::default();
    let open = connections.open.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let task = async move {
        let (closing_tx, closing_rx) = watch::channel(false);
        tokio::pin!(shutdown);
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    if let Some(count) = CAP_LOG.hit() {
                        tracing::warn!(
                            max_connections = limits.max_connections,
                            count,
                            "connection limit reached (limits.max_connections): new connections wait"
                        );
                    }
                    tokio::select! {
                        slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                        () = &mut shutdown => break,
                    }
                }
            };
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                        ) {
                            // Out of file descriptors, most likely: wait for some to close.
                            if let Some(count) = ACCEPT_LOG.hit() {
                                tracing::error!(error = %e, count, "cannot accept connections");
                            }
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                                () = &mut shutdown => break,
                            }
                        }
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let router = router.clone();
            let closing = closing_rx.clone();
            let counted = OpenConnection::new(&open);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, remote, router, limits, closing).await,
                    Some(tls) => match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, remote, router, limits, closing).await,
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            if let Some(count) = HANDSHAKE_LOG.hit() {
                                tracing::warn!(
                                    %remote,
                                    count,
                                    "closed a connection whose TLS handshake did not end in time \
                                     (limits.header_read_timeout_ms; count: since the last line)"
                                );
                            }
                        }
                    },
                }
                drop((counted, slot));
            });
        }
        drop(listener);
        let _ = closing_tx.send(true);
        // Every connection holds a slot until it is closed.
        let _ = slots.acquire_many(limits.max_connections as u32).await;
        Ok::<(), io::Error>(())
    };
    (connections, task)
}

/// Why a connection was closed by Convo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// The request headers did not arrive within `header_read_timeout`.
    Headers,
    /// No request came within `idle_timeout` after the last response.
    Idle,
    /// The request line or header block was too large (answered before closing).
    Rejected,
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    remote: SocketAddr,
    router: Router,
    limits: TransportLimits,
    mut closing: watch::Receiver<bool>,
) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let io = TokioIo::new(GuardedIo::new(stream, shared.clone(), limits));
    let service_state = shared.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let guard = RequestGuard::begin(&service_state);
        request.extensions_mut().insert(ConnectInfo(remote));
        let request = request.map(|body| Body::new(DeadlineBody::new(body, limits.body_read_timeout)));
        let router = router.clone();
        async move {
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response.map(|body| GuardedBody { body, _guard: guard }))
        }
    });
    let connection = http1::Builder::new()
        .keep_alive(true)
        // Convo's own head checks (below) come first; hyper's limits are a backstop.
        .max_headers(MAX_HEADERS + 28)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = async { closing.wait_for(|closing| *closing).await.is_ok() } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    let cut = shared.lock().unwrap_or_else(|e| e.into_inner()).cut;
    match cut {
        Some(Cut::Headers) => {
            if let Some(count) = HEADER_LOG.hit() {
                tracing::warn!(
                    %remote,
                    timeout_ms = limits.header_read_timeout.as_millis() as u64,
                    count,
                    "closed a connection that did not send its request headers in time \
                     (limits.header_read_timeout_ms; count: since the last line)"
                );
            }
        }
        Some(Cut::Idle) => tracing::debug!(%remote, "closed an idle connection"),
        Some(Cut::Rejected) => {
            if let Some(count) = REJECT_LOG.hit() {
                tracing::info!(
                    %remote,
                    count,
                    "answered a request whose request line or headers were too large, and closed its connection \
                     (count: since the last line)"
                );
            }
        }
        None => {
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        }
    }
}

/// What the connection's parts (the I/O wrapper, the service, the response body) share.
#[derive(Default)]
struct Shared {
    /// Requests handed to the router whose response is not fully written.
    in_flight: usize,
    /// Bumped each time the connection becomes idle: a new request head is expected.
    idle_generation: u64,
    /// When it last became idle; `None` before the first request.
    idle_since: Option<Instant>,
    /// The I/O wrapper's read waker, woken when the connection becomes idle so that the
    /// idle timer starts even if hyper does not read again at once.
    read_waker: Option<Waker>,
    cut: Option<Cut>,
}

/// Counts a request as under way from the moment hyper hands it over until its response
/// body is written (or dropped).
struct RequestGuard(Arc<Mutex<Shared>>);

impl RequestGuard {
    fn begin(shared: &Arc<Mutex<Shared>>) -> Self {
        shared.lock().unwrap_or_else(|e| e.into_inner()).in_flight += 1;
        RequestGuard(shared.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut shared = self.0.lock().unwrap_or_else(|e| e.into_inner());
        shared.in_flight -= 1;
        if shared.in_flight == 0 {
            shared.idle_generation += 1;
            shared.idle_since = Some(Instant::now());
            if let Some(waker) = shared.read_waker.take() {
                waker.wake();
            }
        }
    }
}

/// A response body that keeps its request counted as under way.
struct GuardedBody {
    body: Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The error of a request body that did not arrive within `body_read_timeout`.
#[derive(Debug)]
pub struct BodyTimeout(pub Duration);

impl fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body did not arrive within {} ms", self.0.as_millis())
    }
}

impl StdError for BodyTimeout {}

/// The `BodyTimeout` somewhere in the chain of `error`, if the body timed out.
pub fn body_timeout<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a BodyTimeout> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
            return Some(timeout);
        }
        current = e.source();
    }
    None
}

/// A request body that must arrive within a deadline counted from the request head.
struct DeadlineBody {
    body: Incoming,
    timeout: Duration,
    deadline: Instant,
    /// Made the first time the body has to be waited for (most never are).
    timer: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    fn new(body: Incoming, timeout: Duration) -> Self {
        Self { body, timeout, deadline: Instant::now() + timeout, timer: None }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = self.deadline;
                ready!(
                    self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline))).as_mut().poll(cx)
                );
                if let Some(count) = BODY_LOG.hit() {
                    tracing::warn!(
                        timeout_ms = self.timeout.as_millis() as u64,
                        count,
                        "a request body did not arrive in time: answered 408 and closed the connection \
                         (limits.body_read_timeout_ms; count: since the last line)"
                    );
                }
                Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// Why Convo reads each request head itself before hyper does, rather than rewriting
// hyper's automatic `414`/`431` (a bare status line, no body): hyper writes that answer
// into the same byte stream as the responses before it, with nothing to mark where it
// starts (a write may hold the tail of a previous response, or half of one), so
// rewriting it would mean parsing Convo's own output. Reading the head as it arrives,
// with limits below hyper's, lets Convo refuse first, withhold the head from hyper,
// and write its own Matrix error once hyper has flushed all it had (`flushed`). What
// this does not see: the head of a pipelined request that hyper read ahead while the
// previous one was being answered; such a head still meets hyper's own limits.

/// Where a request head stands, as read so far (before hyper parses it).
#[derive(Default)]
struct HeadScan {
    /// When its first byte arrived.
    started: Option<Instant>,
    bytes: usize,
    /// Lines ended so far (the request line is the first).
    lines: usize,
    /// The current line holds nothing but `\r` so far (a blank line ends the head).
    line_blank: bool,
    done: bool,
}

/// Why Convo refuses a request head.
#[derive(Clone, Copy, Debug)]
enum HeadTooLarge {
    RequestLine,
    Headers,
}

impl HeadScan {
    /// Reads `bytes`, the next part of a request head (and maybe what follows it).
    fn feed(&mut self, bytes: &[u8]) -> Result<(), HeadTooLarge> {
        if self.started.is_none() && !bytes.is_empty() {
            self.started = Some(Instant::now());
        }
        for &b in bytes {
            self.bytes += 1;
            match b {
                b'\n' if self.line_blank && self.lines > 0 => {
                    self.done = true;
                    return Ok(());
                }
                b'\n' => {
                    self.lines += 1;
                    self.line_blank = true;
                }
                b'\r' => {}
                _ => self.line_blank = false,
            }
            if self.lines == 0 && self.bytes > MAX_REQUEST_LINE {
                return Err(HeadTooLarge::RequestLine);
            }
            if self.bytes > MAX_HEADER_BYTES || self.lines > MAX_HEADERS + 1 {
                return Err(HeadTooLarge::Headers);
            }
        }
        Ok(())
    }
}

/// Sending a Matrix error in place of a request head that was refused.
enum Refusal {
    /// Waiting until hyper has written out everything it had (a previous response).
    Writing {
        reply: Vec<u8>,
        written: usize,
    },
    /// Reading what the client still sends, so that closing does not reset the
    /// connection before the client has read the reply.
    Draining {
        deadline: Instant,
        discarded: usize,
    },
    Done,
}

/// The TCP stream as hyper sees it: times the request heads and idle periods, and reads
/// each head as it arrives, to answer a too-large one itself.
struct GuardedIo<S> {
    stream: S,
    shared: Arc<Mutex<Shared>>,
    limits: TransportLimits,
    opened: Instant,
    timer: Pin<Box<Sleep>>,
    /// The head being read, for the idle generation `generation`.
    head: HeadScan,
    generation: u64,
    /// hyper has flushed everything it wrote (it calls `poll_flush` only once its own
    /// buffer is empty), so a reply of ours cannot interleave with its bytes.
    flushed: bool,
    flush_waker: Option<Waker>,
    refusal: Option<Refusal>,
    /// Cuts a client that stops reading: a write that cannot go out for
    /// `idle_timeout` (the client's receive window stays full) ends the connection.
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> GuardedIo<S> {
    fn new(stream: S, shared: Arc<Mutex<Shared>>, limits: TransportLimits) -> Self {
        let opened = Instant::now();
        Self {
            stream,
            shared,
            limits,
            opened,
            timer: Box::pin(tokio::time::sleep_until(opened + limits.header_read_timeout)),
            head: HeadScan::default(),
            generation: 0,
            flushed: true,
            flush_waker: None,
            refusal: None,
            write_timer: None,
        }
    }

    /// Watches a write that could not go out: the client has not read for
    /// `idle_timeout` when it fires. Any progress ends the watch.
    fn poll_write_stall<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.write_timer = None;
            return result;
        }
        let idle = self.limits.idle_timeout;
        let timer = self.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if timer.as_mut().poll(cx).is_ready() {
            if let Some(count) = WRITE_LOG.hit() {
                tracing::warn!(
                    timeout_ms = idle.as_millis() as u64,
                    count,
                    "closed a connection whose client stopped reading its responses \
                     (limits.idle_timeout_ms; count: since the last line)"
                );
            }
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")));
        }
        Poll::Pending
    }

    /// When the connection is cut if nothing more arrives, and why; `None` while a
    /// request is under way.
    fn deadline(&self, shared: &Shared) -> Option<(Instant, Cut)> {
        if shared.in_flight > 0 || self.head.done {
            return None;
        }
        match (self.head.started, shared.idle_since) {
            (Some(started), _) => Some((started + self.limits.header_read_timeout, Cut::Headers)),
            (None, None) => Some((self.opened + self.limits.header_read_timeout, Cut::Headers)),
            (None, Some(idle)) => Some((idle + self.limits.idle_timeout, Cut::Idle)),
        }
    }

    fn refuse(&mut self, too_large: HeadTooLarge) {
        let (status, message) = match too_large {
            HeadTooLarge::RequestLine => {
                ("414 URI Too Long", format!("The request line is longer than {MAX_REQUEST_LINE} bytes"))
            }
            HeadTooLarge::Headers => (
                "431 Request Header Fields Too Large",
                format!("The request headers are larger than {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines"),
            ),
        };
        let body = serde_json::json!({"errcode": "M_TOO_LARGE", "error": message}).to_string();
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             access-control-allow-origin: *\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).cut = Some(Cut::Rejected);
        self.refusal = Some(Refusal::Writing { reply: reply.into_bytes(), written: 0 });
    }

    /// Writes the refusal, drains the client for a moment, then reports end of stream
    /// to hyper (which closes the connection).
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.refusal.as_mut().expect("refusing") {
                Refusal::Writing { reply, written } => {
                    if !self.flushed {
                        self.flush_waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    while *written < reply.len() {
                        match ready!(Pin::new(&mut self.stream).poll_write(cx, &reply[*written..])) {
                            Ok(0) | Err(_) => {
                                self.refusal = Some(Refusal::Done);
                                return Poll::Ready(Ok(()));
                            }
                            Ok(n) => *written += n,
                        }
                    }
                    let _ = ready!(Pin::new(&mut self.stream).poll_shutdown(cx));
                    let deadline = Instant::now() + Duration::from_secs(2);
                    self.timer.as_mut().reset(deadline);
                    self.refusal = Some(Refusal::Draining { deadline, discarded: 0 });
                }
                Refusal::Draining { deadline, discarded } => {
                    let mut scratch = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() && *discarded < 1 << 20 => {
                            *discarded += buf.filled().len();
                        }
                        Poll::Ready(_) => self.refusal = Some(Refusal::Done),
                        Poll::Pending => {
                            if Instant::now() >= *deadline || self.timer.as_mut().poll(cx).is_ready() {
                                self.refusal = Some(Refusal::Done);
                            } else {
                                return Poll::Pending;
                            }
                        }
                    }
                }
                Refusal::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.refusal.is_some() {
            return this.poll_refusal(cx);
        }
        let shared = this.shared.clone();
        let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.idle_generation != this.generation {
            this.generation = shared.idle_generation;
            this.head = HeadScan::default();
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if shared.in_flight == 0
                    && !this.head.done
                    && let Err(too_large) = this.head.feed(&buf.filled()[before..])
                {
                    // hyper never sees this head.
                    buf.set_filled(before);
                    drop(shared);
                    this.refuse(too_large);
                    return this.poll_refusal(cx);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                shared.read_waker = Some(cx.waker().clone());
                if let Some((deadline, cut)) = this.deadline(&shared) {
                    if this.timer.deadline() != deadline {
                        this.timer.as_mut().reset(deadline);
                    }
                    if this.timer.as_mut().poll(cx).is_ready() {
                        shared.cut = Some(cut);
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, format!("{cut:?} timeout"))));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.flushed = false;
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.poll_write_stall(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.flushed = false;
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.poll_write_stall(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.stream).poll_flush(cx))?;
        self.flushed = true;
        if let Some(waker) = self.flush_waker.take() {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_scan_finds_the_end_and_the_limits() {
        let mut scan = HeadScan::default();
        scan.feed(b"GET / HTTP/1.1\r\nHost: x\r").unwrap();
        assert!(!scan.done);
        scan.feed(b"\n\r\nBODY").unwrap();
        assert!(scan.done);

        let mut scan = HeadScan::default();
        scan.feed(b"GET / HTTP/1.1\nHost: x\n\n").unwrap();
        assert!(scan.done);

        let mut scan = HeadScan::default();
        let long = vec![b'a'; MAX_REQUEST_LINE];
        scan.feed(b"GET /").unwrap();
        assert!(matches!(scan.feed(&long), Err(HeadTooLarge::RequestLine)));

        let mut scan = HeadScan::default();
        scan.feed(b"GET / HTTP/1.1\r\n").unwrap();
        let many: Vec<u8> = (0..MAX_HEADERS).flat_map(|i| format!("x-h{i}: 1\r\n").into_bytes()).collect();
        scan.feed(&many).unwrap();
        assert!(matches!(scan.feed(b"x-one-more: 1\r\n"), Err(HeadTooLarge::Headers)));

        let mut scan = HeadScan::default();
        scan.feed(b"GET / HTTP/1.1\r\n").unwrap();
        assert!(matches!(scan.feed(&vec![b'a'; MAX_HEADER_BYTES]), Err(HeadTooLarge::Headers)));
    }
}
