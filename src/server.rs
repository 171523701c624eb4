//! The listener: accepts connections, serves HTTP/1.1 and HTTP/2 (prior knowledge, or h2
//! by ALPN) on each with hyper-util's `auto` builder (HTTP/1.1 only with `server.http2 =
//! false`), closes connections left idle, and drains in-flight requests on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use http::{Request, StatusCode, Version};
use hyper::body::Incoming;

use crate::activity::{Activity, AnsweredLocally, Idle, Reading, Socket, Tracked};
use crate::config::{Config, Server};
use crate::framing::{FramingError, Inspected, Verdicts};
use crate::metrics::Closed;
use crate::proxy::Proxy;
use crate::reuse::Spare;
use crate::upstream::Peer;

/// Serves `config` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish for up to `server.shutdown_timeout`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let proxy = Arc::new(Proxy::new(&config));
    serve(listener, proxy, &config.server, shutdown).await
}

/// Like [`run`], with a proxy built by the caller (tests inspect its state).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: &Server,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers a head over its buffer with a bare 431; the proxy's own limit sits below
    // it, so that heads between the two get a problem response that says what happened.
    let buffer = usize::try_from(limits.max_header_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(16 * 1024)
        .max(16 * 1024);
    builder
        .http1()
        .timer(TokioTimer::new())
        // Not hyper's head-read timer: it arms a new boxed timer for every request (1.4k
        // instructions, 3% of a small GET). The connection's idle timer does its job at no
        // cost per request: it ends a connection with no request in flight for
        // `header_read_timeout`, whether it sits idle or sends a head too slowly.
        .header_read_timeout(None::<Duration>)
        .max_buf_size(buffer)
        .keep_alive(true);
    // Set only when it differs from hyper's default: set at all, hyper allocates each
    // head's field slots on the heap.
    if limits.max_header_fields != crate::config::DEFAULT_MAX_HEADER_FIELDS {
        builder.http1().max_headers(limits.max_header_fields);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // What one connection can make the proxy hold is its streams times each stream's
        // buffers: with hyper's defaults (200 streams, 400 KiB queued for a slow reader
        // each, beside 256 KiB read upstream) one client could pin about 130 MiB. A
        // stream's queue gets what its upstream side reads at once, as an HTTP/1.1
        // response in flight holds: 64 MiB at the defaults.
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_send_buf_size(limits.upstream_read_buffer)
        // A request whose body waits unread (for its URL's lock) keeps what its client sent
        // of it in its stream's window. With hyper's defaults one stream's window was the
        // whole connection's, so that one waiting upload stalled every other on the
        // connection, the lock's holder included, until its `lock_timeout`. Room for every
        // stream's window at once (nginx's shape) lets none hold up another; what a
        // connection can make the proxy hold stays bounded by its streams.
        .initial_stream_window_size(limits.http2_stream_window)
        .initial_connection_window_size(connection_window(limits))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    proxy.metrics.connection_limit(limits.max_connections);
    let shutdown_timeout = limits.shutdown_timeout;
    let idle_timeout = limits.header_read_timeout;

    // `true` once the proxy stops: every connection then finishes what it has in flight
    // and closes (HTTP/1.1: after its current response; HTTP/2: GOAWAY).
    let (stop, stopping) = watch::channel(false);
    // Refusals come in floods when they come: the metric counts each, the log says so
    // once a minute.
    let refusals = crate::telemetry::Every::new(Duration::from_secs(60));
    let failures = crate::telemetry::Every::new(Duration::from_secs(60));
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            conn = accept(&listener, "accept failed", &failures) => conn,
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            proxy.metrics.connection_refused();
            if refusals.due() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "max_connections reached: connections are refused (503 on plain \
                     HTTP, closed at once on TLS; ifmatch_connections_refused_total counts \
                     them; this line comes at most once a minute)"
                );
            }
            // A TLS client would read the plain-text 503 as a broken handshake.
            tokio::spawn(refuse_connection(stream, proxy.tls().is_none()));
            continue;
        };
        let proxy = proxy.clone();
        let listening = proxy.listening();
        let trusted = listening.trusted_proxies;
        let builder = match listening.http2 {
            true => builder.clone(),
            // An HTTP/2 preface is then a malformed HTTP/1.1 head: the connection is closed.
            false => builder.clone().http1_only(),
        };
        #[cfg(unix)]
        let socket = Some(Socket::of(&stream));
        #[cfg(not(unix))]
        let socket = None;
        let ends = Ends {
            stopping: stopping.clone(),
            idle_timeout,
            socket,
            permit: Arc::new(permit),
        };
        tokio::spawn(async move {
            let counted = proxy.clone();
            let _open = counted.metrics.connection_opened();
            match listening.tls {
                None => {
                    let peer = Peer::new(addr, "http", &trusted);
                    serve_connection(stream, peer, proxy, builder, ends).await
                }
                Some(tls) => {
                    // In the connection's own task: a stalled handshake holds nothing else.
                    // It has the time a head has (a client that sends nothing is one that
                    // sends no head), and no more than `TLS_HANDSHAKE_TIMEOUT`.
                    // Once the proxy stops, a handshake has the grace an idle connection
                    // has, so that a stalled one does not hold the drain.
                    let accept = async move {
                        let mut stream = stream;
                        if answered_plain_http(&mut stream).await {
                            return None;
                        }
                        Some(TlsAcceptor::from(tls).accept(stream).await)
                    };
                    let within = ends.idle_timeout.min(TLS_HANDSHAKE_TIMEOUT);
                    let mut stopping = ends.stopping.clone();
                    let stop_grace = async move {
                        let _ = stopping.wait_for(|stop| *stop).await;
                        tokio::time::sleep(IDLE_CLOSE_GRACE).await;
                    };
                    let handshake = tokio::select! {
                        done = tokio::time::timeout(within, accept) => Some(done),
                        () = stop_grace => None,
                    };
                    match handshake {
                        Some(Ok(Some(Ok(tls)))) => {
                            let peer = Peer::new(addr, "https", &trusted);
                            serve_connection(tls, peer, proxy, builder, ends).await
                        }
                        Some(Ok(Some(Err(e)))) => {
                            tracing::debug!(error = %e, client = %addr, "TLS handshake failed")
                        }
                        Some(Ok(None)) => tracing::debug!(
                            client = %addr,
                            "plain HTTP on the TLS listener: answered 400"
                        ),
                        Some(Err(_)) => tracing::debug!(client = %addr, "TLS handshake timed out"),
                        None => tracing::debug!(client = %addr, "TLS handshake cut off: stopping"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    // Every connection's task and request futures hold its permit until they end: all of
    // them back means drained, and every write left to settle counted.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout_at(deadline, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            ?shutdown_timeout,
            "in-flight requests did not finish in time"
        );
        proxy.cut_off_in_flight();
        name_unanswered(&proxy);
        return Ok(());
    }
    settle_before_exit(&proxy, deadline).await;
    Ok(())
}

/// Waits, within the drain's deadline, for the writes whose clients stopped waiting
/// (`settling.rs`): exiting first would let go of their URLs' locks while the backend may
/// still apply them. What is still unanswered at the deadline is named.
async fn settle_before_exit(proxy: &Proxy, deadline: tokio::time::Instant) {
    let waiting = proxy.settling.count();
    if waiting == 0 {
        return;
    }
    tracing::info!(
        writes = waiting,
        "waiting for the backend to answer writes whose clients stopped waiting"
    );
    let answered = proxy.settling.all_answered();
    if tokio::time::timeout_at(deadline, answered).await.is_err() {
        name_unanswered(proxy);
    }
}

/// Names, as the drain ends, the writes whose clients stopped waiting that the backend has
/// not answered: however it ended (its deadline, before or during the wait for them, or
/// another signal), whether they were applied is unknown.
pub fn name_unanswered(proxy: &Proxy) {
    let resources = proxy.settling.resources();
    if !resources.is_empty() {
        tracing::warn!(
            writes = resources.len(),
            resources = ?resources,
            "the backend had not answered these writes when the drain ended: whether they \
             were applied is unknown, and a writer the next process lets through may be \
             overwritten by one of them"
        );
    }
}

/// Over `max_connections`: a 503 problem in plain HTTP/1.1 (`plain`), then close, rather
/// than leaving the client in the accept backlog with no answer. A TLS listener's client
/// gets the close alone: a handshake would cost what the limit is there to save, and bytes
/// outside TLS would only read as a broken handshake.
async fn refuse_connection(mut stream: TcpStream, plain: bool) {
    if !plain {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        return;
    }
    let rsp = raw_problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "retry-after: 1\r\n",
        "the proxy is serving its maximum number of connections; retry later",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(rsp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A client speaking plain HTTP to the TLS listener (`http://` where `https://` was meant)
/// gets a 400 saying so, as nginx answers, rather than a close it cannot explain: the
/// first `curl` an ops team makes should say what is wrong. Told by the first byte, which
/// a TLS client makes 0x16 (a handshake record) and an HTTP one a method's first letter.
/// True if the client was answered (the connection is then done).
async fn answered_plain_http(stream: &mut TcpStream) -> bool {
    let mut first = [0u8; 1];
    if !matches!(stream.peek(&mut first).await, Ok(1)) || !first[0].is_ascii_uppercase() {
        return false;
    }
    let rsp = raw_problem(
        StatusCode::BAD_REQUEST,
        "",
        "a plain HTTP request was sent to the TLS listener; use https://",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // What the client sent is read first: closed with it unread, the connection would be
        // reset, and the client could lose the answer.
        let mut head = [0u8; 4096];
        let _ = stream.read(&mut head).await;
        let _ = stream.write_all(rsp.as_bytes()).await;
        let _ = stream.shutdown().await;
        while matches!(stream.read(&mut head).await, Ok(1..)) {}
    })
    .await;
    true
}

/// A problem+json answer (RFC 9457) in plain HTTP/1.1 bytes, for a connection no HTTP
/// server runs on; it closes the connection. `extra`: header lines, each ending in CRLF.
fn raw_problem(status: StatusCode, extra: &str, detail: &str) -> String {
    let reason = status.canonical_reason().unwrap_or_default();
    let body = serde_json::json!({
        "type": "about:blank",
        "title": reason,
        "status": status.as_u16(),
        "detail": detail,
    })
    .to_string();
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/problem+json\r\n{extra}connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    )
}

/// An HTTP/2 connection's receive window: every stream's at once, within the protocol's
/// largest (2^31 - 1).
fn connection_window(limits: &Server) -> u32 {
    let all =
        u64::from(limits.http2_stream_window) * u64::from(limits.http2_max_concurrent_streams);
    u32::try_from(all.min((1 << 31) - 1)).unwrap_or(u32::MAX)
}

/// The most time a client has to finish its TLS handshake (less if `header_read_timeout` is).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The next connection on `listener`. An accept that fails (out of file descriptors, most
/// often) is tried again after a pause: the pending connection keeps the listener readable,
/// so trying again at once would spin a core just when the process is short of resources.
/// Such failures come 20 a second while they last: `warn` lets the log say `failed` at
/// most once a minute.
pub async fn accept(
    listener: &TcpListener,
    failed: &str,
    warn: &crate::telemetry::Every,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                if warn.due() {
                    tracing::warn!(error = %e, "{failed} (this line comes at most once a minute)");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How long an idle connection, once asked to close, may take to do so before it is cut off.
/// An HTTP/1.1 connection between requests closes at once and an HTTP/2 one after its
/// GOAWAY; one still sending a head (too slowly) does not close by itself.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long a connection sent away for rapid resets may take to close before it is cut
/// off, its requests in flight with it: time for its GOAWAY to reach the client.
const ABUSE_CLOSE_GRACE: Duration = Duration::from_millis(100);

/// The grace before a connection with no request in flight is cut off, and how far its
/// client had read as it began: [`IDLE_CLOSE_GRACE`] with nothing left to send, else
/// `send_timeout` (`header_read_timeout`, as for a stalled response). Polled once, so that
/// it wakes the connection's task when it expires.
fn arm_grace(
    cx: &mut Context<'_>,
    read: Reading,
    send_timeout: Duration,
) -> (Reading, Option<Pin<Box<tokio::time::Sleep>>>) {
    let period = if read.queued().is_some_and(|q| q > 0) {
        send_timeout
    } else {
        IDLE_CLOSE_GRACE
    };
    let mut sleep = Box::pin(tokio::time::sleep(period));
    let _ = sleep.as_mut().poll(cx);
    (read, Some(sleep))
}

/// What ends a connection besides its client: the proxy stopping, or no request for
/// `idle_timeout`.
struct Ends {
    stopping: watch::Receiver<bool>,
    idle_timeout: Duration,
    /// The client's TCP socket, under TLS or not: its send queue.
    socket: Option<Socket>,
    /// The connection's place in `max_connections`, which the drain waits to have back:
    /// held by its task and by each of its requests' futures, since hyper runs an HTTP/2
    /// request in a task of its own that can outlive the connection's (a write its client
    /// gave up on is counted as settling only once that future is dropped).
    permit: Arc<OwnedSemaphorePermit>,
}

/// The waker of the futures that end a connection: notes that one of them may be ready,
/// then wakes the connection's task.
struct EnderWaker {
    woken: AtomicBool,
    task: Waker,
}

impl Wake for EnderWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// Serves one client connection (plain or TLS) with HTTP/1.1 or HTTP/2, its bytes watched by
/// the framing inspector, until it closes, the proxy stops, or it has no request in flight
/// for `idle_timeout` (the head-read timeout): idle between requests, or too slow to send a
/// head (slowloris). It is then asked to close (HTTP/2: GOAWAY), and cut off if it has not
/// after [`IDLE_CLOSE_GRACE`], also while the proxy stops.
async fn serve_connection<IO>(
    io: IO,
    peer: Peer,
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    mut ends: Ends,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let addr = peer.addr;
    let verdicts = Verdicts::default();
    let activity = Arc::new(Activity::new(ends.socket));
    let io = Inspected::new(io, verdicts.clone());
    let counted = activity.clone();
    let counts = proxy.clone();
    let spare = Spare::default();
    let permit = ends.permit.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let (proxy, peer) = (proxy.clone(), peer.clone());
        let request = counted.begin();
        let version = req.version();
        // An HTTP/1 request runs in its connection's task, which holds the permit already.
        let permit = (version == Version::HTTP_2).then(|| permit.clone());
        let answering = (version == Version::HTTP_2).then(|| counted.answering());
        // Every HTTP/1 head hyper hands over was read through the inspector first, so its
        // verdict is queued; none means the inspector lost its place: fail closed.
        let verdict = match version {
            Version::HTTP_2 => Ok(()),
            _ => verdicts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
                .unwrap_or(Err(FramingError::Lost)),
        };
        // Built in the connection's spare box, which hyper then holds by pointer
        // (`reuse`).
        let mut boxed = spare.take();
        boxed.as_mut().set(Some(async move {
            // Declared first, so let go after what the request's future holds.
            let _permit = permit;
            let rsp = proxy.handle(req, peer, verdict).await;
            if let Some(a) = answering {
                a.answered(rsp.extensions().get::<AnsweredLocally>().is_some());
            }
            Ok::<_, Infallible>(rsp.map(|body| match version {
                Version::HTTP_2 => Tracked::stream(body, request),
                _ => Tracked::new(body, request),
            }))
        }));
        spare.reused(boxed)
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let stopping = ends.stopping.wait_for(|stop| *stop);
    tokio::pin!(stopping);
    let idle = activity.idle(ends.idle_timeout);
    tokio::pin!(idle);
    let abused = activity.abused();
    tokio::pin!(abused);
    // The connection wakes this task several times per request; the proxy stopping and
    // the idle timer hardly ever do. So they get their own waker, and are polled only
    // once it has fired, not on every wake-up (a `select!` would poll all three).
    let mut ender: Option<(Arc<EnderWaker>, Waker)> = None;
    // `asked`: the connection was asked to close (keep-alive off, HTTP/2 GOAWAY).
    let (mut stopped, mut idled, mut asked) = (false, false, false);
    let mut cut_off: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Armed once the client is sent away for rapid resets (see below).
    let mut abuse_cut: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // How far the client had read when the grace began (see below).
    let mut read_at_grace = Reading::default();
    let ended = std::future::poll_fn(|cx| {
        if abuse_cut.as_mut().is_some_and(|cut| cut.as_mut().poll(cx).is_ready()) {
            return Poll::Ready(Ok(()));
        }
        if let Some(grace) = &mut cut_off {
            if grace.as_mut().poll(cx).is_ready() {
                // The last response's body can be done with while hyper still flushes its
                // end to a slow reader: while the client takes some of it (acknowledges
                // more bytes), another grace. One that took nothing (it pings, reads
                // nothing) earns none; nor one whose socket held nothing as the grace
                // began: the bytes it acknowledged since are only the proxy's answers to
                // its own frames (PING acks), which a client reading nothing still takes
                // while its receive buffer has room.
                let now = activity.reading();
                let flushing = read_at_grace.queued().is_some_and(|q| q > 0);
                if !activity.busy() && flushing && now.took_since(read_at_grace) {
                    (read_at_grace, cut_off) = arm_grace(cx, now, ends.idle_timeout);
                    return conn.as_mut().poll(cx);
                }
                // A head that came whole in the meantime is a request like any other: it is
                // answered, and then the connection closes (keep-alive is off by now).
                if !activity.busy() {
                    tracing::debug!(client = %addr, "idle connection cut off");
                    return Poll::Ready(Ok(()));
                }
                // Watched again from here: else a client that finished its head in the
                // grace and then stopped reading would hold its connection for ever.
                cut_off = None;
                idled = false;
                idle.set(activity.idle(ends.idle_timeout));
                if let Some((state, _)) = &ender {
                    state.woken.store(true, Ordering::Release);
                }
            }
        }
        // Idleness is watched after a stop too: a head half-sent when the proxy stops is
        // not a request in flight, and must not hold the drain to its end.
        if !idled {
            let (state, waker) = match &ender {
                Some((state, waker)) if state.task.will_wake(cx.waker()) => (state, waker),
                _ => {
                    let state = Arc::new(EnderWaker {
                        woken: AtomicBool::new(true),
                        task: cx.waker().clone(),
                    });
                    let waker = Waker::from(state.clone());
                    let (state, waker) = ender.insert((state, waker));
                    (&*state, &*waker)
                }
            };
            if state.woken.swap(false, Ordering::AcqRel) {
                let mut ecx = Context::from_waker(waker);
                if !stopped && stopping.as_mut().poll(&mut ecx).is_ready() {
                    stopped = true;
                    if !std::mem::replace(&mut asked, true) {
                        conn.as_mut().graceful_shutdown();
                    }
                    // No request in flight (a head or an HTTP/2 preface half-sent): it gets
                    // the grace an idle connection gets (`arm_grace`: a second, or the send
                    // timeout while bytes are still queued), not the idle timer's wait.
                    if !activity.busy() && cut_off.is_none() {
                        idled = true;
                        (read_at_grace, cut_off) =
                            arm_grace(cx, activity.reading(), ends.idle_timeout);
                    }
                }
                if !asked && abused.as_mut().poll(&mut ecx).is_ready() {
                    asked = true;
                    tracing::warn!(
                        client = %addr,
                        resets = crate::activity::MAX_RESETS,
                        "HTTP/2 connection closed: its client reset that many requests in progress (rapid reset)"
                    );
                    counts.metrics.connection_closed(Closed::RapidReset);
                    conn.as_mut().graceful_shutdown();
                    // h2 names the last stream it takes (its second GOAWAY) only once the
                    // client acks the PING sent with the first, which allows every stream:
                    // a client that never acks would go on opening and resetting requests.
                    // So it is cut off soon after, as Envoy closes such connections.
                    let mut cut = Box::pin(tokio::time::sleep(ABUSE_CLOSE_GRACE));
                    let _ = cut.as_mut().poll(cx);
                    abuse_cut = Some(cut);
                }
                if let Poll::Ready(why) = idle.as_mut().poll(&mut ecx) {
                    if why == Idle::Stalled {
                        // The client takes nothing of what it asked for: no goodbye would
                        // be read either. Dropping the connection drops its bodies.
                        tracing::info!(client = %addr, "connection cut off: its client stopped reading its responses");
                        counts.metrics.connection_closed(Closed::Stalled);
                        return Poll::Ready(Ok(()));
                    }
                    idled = true;
                    if !std::mem::replace(&mut asked, true) {
                        tracing::debug!(client = %addr, "idle connection closed");
                        conn.as_mut().graceful_shutdown();
                    }
                    (read_at_grace, cut_off) =
                        arm_grace(cx, activity.reading(), ends.idle_timeout);
                }
            }
        }
        conn.as_mut().poll(cx)
    })
    .await;
    let Err(e) = ended else { return };
    match e.downcast_ref::<hyper::Error>().filter(|h| h.is_parse()) {
        // hyper answered a head it could not parse (400, 414 or 431) and closed: no request
        // reached the proxy, so this is the only trace of it besides the client's.
        Some(h) => {
            counts.metrics.malformed_head(h.is_parse_too_large());
            tracing::info!(error = %h, client = %addr, "malformed request head refused");
        }
        None => tracing::debug!(error = %e, client = %addr, "connection ended with an error"),
    }
}
