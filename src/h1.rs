//! An HTTP/1.1 client of the proxy's own for body-less GET and HEAD requests to plain-http
//! upstreams without `upstream_max_connections`: the request head is written and the
//! response read on the request's own task, over kept-alive sockets. Every other request
//! goes through hyper's client ([`crate::pool`]).
//!
//! Why: hyper's client runs each connection on a task of its own, and hands requests,
//! responses and body chunks to it and back through channels. On the 2-core VM of
//! BENCHMARKS.md's *The fifteenth session*, a bare hyper proxy made 0.77x nginx's req/s at
//! 1 KiB and the same proxy with a client on the request's task 1.11x; the hops and the
//! second dispatcher cost 2 µs of user time a request, and the idle gaps they open cost the
//! kernel's wake-ups more.
//!
//! What it must read exactly as hyper does (RFC 9112 §6.3), since a body read one byte
//! short or long would answer the next request with the rest of this one (another
//! client's): interim 1xx answers skipped, no body after a HEAD or in a 204 or 304, chunked
//! when `Transfer-Encoding` ends in it (and the connection then not reused if a
//! `Content-Length` came too), else to the close; else the `Content-Length` (a list of one
//! value repeated, as hyper takes it), else to the close. A 101 is an error: nothing asked
//! for an upgrade. Parsing is httparse's, as hyper's is. A connection is reused only after
//! an HTTP/1.1 answer without `Connection: close`, read to its end with nothing after it;
//! an idle one is checked for a close or stray bytes before it is used.
//!
//! A request the connection closed on before any answer came is sent once more on another
//! connection if the first one was a reused one (it is a GET or a HEAD, and its head is at
//! hand: nothing is copied to keep it), as Go's client does.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::Upstream;
use crate::pool::{ReadLimits, SendError};
use crate::upstream::UpstreamBody;

/// The most a chunk-size line may carry in extensions, over a whole body: hyper's limit.
const CHUNK_EXTENSIONS_LIMIT: usize = 16 * 1024;

/// The most a trailer section may take.
const TRAILERS_LIMIT: usize = 16 * 1024;

/// What a read asks for at least, and at first: hyper's initial read buffer.
const READ_START: usize = 8 * 1024;

/// An upstream response's body: hyper's, or read by this client.
#[derive(Debug)]
pub enum UpBody {
    Hyper(Incoming),
    Raw(RawBody),
}

/// Why an upstream body failed.
#[derive(Debug)]
pub enum UpError {
    Hyper(hyper::Error),
    Raw(RawError),
}

impl fmt::Display for UpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hyper(e) => e.fmt(f),
            Self::Raw(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for UpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Hyper(e) => Some(e),
            Self::Raw(e) => Some(e),
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = UpError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpError>>> {
        match self.get_mut() {
            Self::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(UpError::Hyper))),
            Self::Raw(b) => b.poll(cx).map(|f| f.map(|r| r.map_err(UpError::Raw))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::Raw(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            Self::Raw(b) => b.size_hint(),
        }
    }
}

/// What went wrong on a connection of this client.
#[derive(Debug)]
pub enum RawError {
    /// The connection failed; `answered`: after some of the answer came.
    Io { error: io::Error, answered: bool },
    /// The connection closed; `answered`: after some of the answer came.
    Closed { answered: bool },
    /// The answer broke HTTP/1.1's rules.
    Malformed(&'static str),
    /// The response head was over `upstream_read_buffer` or `max_header_fields`.
    TooLarge,
}

impl RawError {
    /// The connection ended before any byte of an answer: the request may never have
    /// reached the backend's application.
    fn unanswered(&self) -> bool {
        matches!(
            self,
            Self::Io {
                answered: false,
                ..
            } | Self::Closed { answered: false }
        )
    }
}

impl fmt::Display for RawError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed { answered: true } => {
                f.write_str("connection closed before message completed")
            }
            Self::Closed { answered: false } => {
                f.write_str("connection closed before any answer came")
            }
            Self::Io { error, .. } => write!(f, "connection error: {error}"),
            Self::Malformed(what) => write!(f, "invalid response: {what}"),
            Self::TooLarge => f.write_str("the response head is too large"),
        }
    }
}

impl std::error::Error for RawError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Whether this client takes `req` for `upstream`: a GET or HEAD without a body, in
/// HTTP/1.1, to a plain-http upstream.
pub fn takes(upstream: &Upstream, req: &Request<UpstreamBody>) -> bool {
    (*req.method() == Method::GET || *req.method() == Method::HEAD)
        && upstream.scheme == http::uri::Scheme::HTTP
        && req.version() == Version::HTTP_11
        && req.body().is_end_stream()
}

/// A kept-alive socket and what was read from it past the last answer (nothing, once the
/// answer was read to its end and the connection kept).
#[derive(Debug)]
struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Its origin's key, to be handed back under.
    origin: Arc<str>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle connections of this client, per origin (`Upstream::key_prefix`).
pub struct RawPool {
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>, foldhash::fast::RandomState>>,
    idle_timeout: Duration,
    max_idle: usize,
    limits: ReadLimits,
    connect_timeout: Duration,
    me: Weak<Self>,
    reaper: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for RawPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawPool")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl RawPool {
    pub fn new(
        idle_timeout: Duration,
        max_idle: usize,
        limits: ReadLimits,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            idle: Mutex::new(HashMap::default()),
            idle_timeout,
            max_idle,
            limits,
            connect_timeout,
            me: me.clone(),
            reaper: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sends `req` (origin-form URI, `Host` set; see [`takes`]) to `upstream` and waits up
    /// to `timeout` for the response head; the body is read as the response is.
    pub async fn send(
        &self,
        upstream: &Upstream,
        req: Box<Request<UpstreamBody>>,
        timeout: Duration,
    ) -> Result<Response<UpBody>, SendError> {
        let deadline = Instant::now() + timeout;
        let head = encode(&req);
        let is_head = *req.method() == Method::HEAD;
        drop(req);
        let mut replayed = false;
        loop {
            // The timeout runs to the response head from the first attempt, a new
            // connection's set-up included (as hyper's client path has it).
            let (mut conn, reused) = match self.checkout(&upstream.key_prefix) {
                Some(conn) => (conn, true),
                None => match tokio::time::timeout_at(deadline, self.connect(upstream)).await {
                    Ok(conn) => (conn?, false),
                    Err(_) => return Err(SendError::Timeout),
                },
            };
            let exchange = exchange(&mut conn, &head, self.limits, is_head);
            match tokio::time::timeout_at(deadline, exchange).await {
                Err(_) => return Err(SendError::Timeout),
                Ok(Ok((parsed, framing))) => return Ok(self.response(conn, parsed, framing)),
                Ok(Err(e)) if e.unanswered() && reused && !replayed => {
                    tracing::debug!(origin = %upstream.origin, error = %e,
                        "sent again: an idle connection closed");
                    replayed = true;
                }
                Ok(Err(e)) => return Err(SendError::Raw(e)),
            }
        }
    }

    /// The most recently used idle connection to `origin` that is still open and has
    /// nothing unasked for to read.
    fn checkout(&self, origin: &str) -> Option<Conn> {
        loop {
            let idle = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.get_mut(origin)?.pop()?
            };
            if idle.since.elapsed() >= self.idle_timeout {
                continue;
            }
            let mut conn = idle.conn;
            match conn.io.try_read_buf(&mut conn.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(conn),
                // Closed, failed, or bytes no request asked for (which would answer the
                // next one): not to be used.
                _ => tracing::debug!(origin, "an idle upstream connection closed"),
            }
        }
    }

    async fn connect(&self, upstream: &Upstream) -> Result<Conn, SendError> {
        if !self.reaper.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let every = self.idle_timeout / 2;
            tokio::spawn(crate::pool::reap_with(
                self.me.clone(),
                every,
                Self::drop_expired,
            ));
        }
        let host = upstream.authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = upstream.authority.port_u16().unwrap_or(80);
        // The addresses in turn, each with its share of the connect timeout, as hyper-util's
        // connector shares it: a first address that drops the SYN leaves time for the next.
        let connect = async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            let share = self.connect_timeout / addrs.len().max(1) as u32;
            let mut last = None;
            for addr in addrs {
                match tokio::time::timeout(share, connect_to(addr)).await {
                    Ok(Ok(io)) => return Ok(io),
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(io::ErrorKind::TimedOut.into()),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the host has no address")
            }))
        };
        let io = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| SendError::Connect(io::Error::from(io::ErrorKind::TimedOut).into()))?
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            origin: Arc::from(upstream.key_prefix.as_str()),
        })
    }

    /// The response to hand on, its body reading the rest from `conn`.
    fn response(&self, conn: Conn, parsed: Parsed, framing: Framing) -> Response<UpBody> {
        let Parsed {
            status,
            version,
            headers,
            keep_alive,
            reason,
        } = parsed;
        let mut body = RawBody {
            conn: Some(conn),
            framing,
            keep_alive,
            pool: self.me.clone(),
            next_read: READ_START,
            read_buffer: self.limits.read_buffer,
            extensions: 0,
            trailer_fields: self.limits.max_header_fields,
        };
        if body.framing.ended() {
            body.finish();
        }
        let mut rsp = Response::new(UpBody::Raw(body));
        *rsp.status_mut() = status;
        *rsp.version_mut() = version;
        *rsp.headers_mut() = headers;
        if let Some(reason) = reason {
            rsp.extensions_mut().insert(reason);
        }
        rsp
    }

    /// Keeps `conn` for the next request to its origin, if there is room.
    fn keep(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = match idle.get_mut(&*conn.origin) {
            Some(list) => list,
            None => idle.entry(conn.origin.clone()).or_default(),
        };
        if list.len() < self.max_idle {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    fn drop_expired(&self) {
        let expired: Vec<Idle> = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut expired = Vec::new();
            for list in idle.values_mut() {
                let mut i = 0;
                while i < list.len() {
                    if list[i].since.elapsed() >= self.idle_timeout {
                        expired.push(list.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            idle.retain(|_, list| !list.is_empty());
            expired
        };
        // Closed outside the lock.
        drop(expired);
    }
}

async fn connect_to(addr: SocketAddr) -> io::Result<TcpStream> {
    let io = TcpStream::connect(addr).await?;
    io.set_nodelay(true)?;
    Ok(io)
}

/// The request head as hyper's client writes it: origin-form, HTTP/1.1, the fields as
/// they are (no body, so no framing field).
fn encode(req: &Request<UpstreamBody>) -> Vec<u8> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut len = req.method().as_str().len() + target.len() + 14;
    for (name, value) in req.headers() {
        len += name.as_str().len() + value.len() + 4;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A response head, read.
struct Parsed {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
    reason: Option<hyper::ext::ReasonPhrase>,
}

/// Writes `head` on `conn` and reads the response head after it, skipping interim answers;
/// with it, how its body is framed (`keep_alive` then says whether the connection may be
/// reused after it).
async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    limits: ReadLimits,
    is_head: bool,
) -> Result<(Parsed, Framing), RawError> {
    conn.io
        .write_all(head)
        .await
        .map_err(|error| RawError::Io {
            error,
            answered: false,
        })?;
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            if let Some(answer) = final_head(&mut conn.buf, limits, is_head)? {
                return Ok(answer);
            }
        }
        let want = head_read(&conn.buf, limits);
        conn.buf.reserve(want);
        let n = read(&mut conn.io, &mut conn.buf)
            .await
            .map_err(|error| RawError::Io { error, answered })?;
        if n == 0 {
            return Err(RawError::Closed { answered });
        }
    }
}

/// The final answer's head at the start of `buf`, interim 1xx answers before it skipped,
/// each taken out of `buf` as it is read; with it, how its body is framed (`keep_alive` then
/// says whether the connection may be reused after it). `None`: not all in yet.
fn final_head(
    buf: &mut BytesMut,
    limits: ReadLimits,
    is_head: bool,
) -> Result<Option<(Parsed, Framing)>, RawError> {
    while !buf.is_empty() {
        let Some(mut parsed) = parse_head(buf, limits)? else {
            if buf.len() >= limits.read_buffer {
                return Err(RawError::TooLarge);
            }
            return Ok(None);
        };
        match parsed.status.as_u16() {
            101 => {
                return Err(RawError::Malformed(
                    "101 Switching Protocols to a request that asked for no upgrade",
                ))
            }
            100..=199 => continue,
            _ => {
                let (framing, reusable) = framing(&parsed, is_head)?;
                parsed.keep_alive &= reusable;
                return Ok(Some((parsed, framing)));
            }
        }
    }
    Ok(None)
}

/// How much a read of a response head asks for: hyper's first read, and never more than
/// leaves the head within `upstream_read_buffer` (over it, the head is too large).
fn head_read(buf: &BytesMut, limits: ReadLimits) -> usize {
    READ_START.min(limits.read_buffer - buf.len()).max(1)
}

async fn read(io: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read(io, buf, cx)).await
}

/// One read into `buf`'s spare room. Through tokio's `poll_read`, which takes a short read
/// for the socket drained: the next read then waits for readiness instead of trying (and
/// an idle connection's check, `RawPool::checkout`, costs no system call).
fn poll_read(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Parses a response head at the start of `buf`, taking it out; `None`: not all in yet.
fn parse_head(buf: &mut BytesMut, limits: ReadLimits) -> Result<Option<Parsed>, RawError> {
    const STACK: usize = crate::config::DEFAULT_MAX_HEADER_FIELDS;
    let mut stack = [httparse::EMPTY_HEADER; STACK];
    let mut heap;
    let slots: &mut [httparse::Header<'_>] = if limits.max_header_fields <= STACK {
        &mut stack[..limits.max_header_fields]
    } else {
        heap = vec![httparse::EMPTY_HEADER; limits.max_header_fields];
        &mut heap
    };
    // Where each field's name and value lie in the head, to take them out of it as
    // `Bytes` without a copy once the parser's borrow of `buf` has ended.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); STACK];
    let mut heap_spans;
    let spans: &mut [(u32, u32, u32, u32)] = if slots.len() <= STACK {
        &mut spans[..slots.len()]
    } else {
        heap_spans = vec![(0, 0, 0, 0); slots.len()];
        &mut heap_spans
    };
    let mut rsp = httparse::Response::new(slots);
    let len = match rsp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RawError::TooLarge),
        Err(_) => return Err(RawError::Malformed("the response head is not HTTP/1.1")),
    };
    let base = buf.as_ptr() as usize;
    let status = StatusCode::from_u16(rsp.code.unwrap_or(0))
        .map_err(|_| RawError::Malformed("the status code is out of range"))?;
    // A reason phrase of the backend's own goes on, as hyper's client passes it. An empty
    // one need not lie in `buf`: httparse gives a static "" for a status line without one
    // (`HTTP/1.1 200` CRLF) and for one with obs-text, and the offset of that pointer would
    // overflow, or slice out of bounds below. Any empty range of the head is that reason.
    let reason = rsp
        .reason
        .filter(|r| Some(*r) != status.canonical_reason())
        .map(|r| match r.len() {
            0 => 0..0,
            len => {
                let at = r.as_ptr() as usize - base;
                at..at + len
            }
        });
    let version = if rsp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let count = rsp.headers.len();
    for (span, h) in spans.iter_mut().zip(rsp.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = (
            name as u32,
            (name + h.name.len()) as u32,
            value as u32,
            (value + h.value.len()) as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut close = false;
    for &(n0, n1, v0, v1) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[n0 as usize..n1 as usize])
            .map_err(|_| RawError::Malformed("a field name is invalid"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
            .map_err(|_| RawError::Malformed("a field value is invalid"))?;
        if name == CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
            }
        }
        headers.append(name, value);
    }
    // An HTTP/1.0 answer is not reused whatever it says (see `pool::spoils_connection`).
    let keep_alive = version == Version::HTTP_11 && !close;
    let reason = reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(head.slice(r)).ok());
    Ok(Some(Parsed {
        status,
        version,
        headers,
        keep_alive,
        reason,
    }))
}

/// How a body is delimited (RFC 9112 §6.3, as hyper reads it).
#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked(Chunked),
    Close,
}

impl Framing {
    fn ended(&self) -> bool {
        matches!(self, Self::Length(0) | Self::Chunked(Chunked::Done))
    }
}

/// The body's framing, and whether its connection may be reused after it.
fn framing(head: &Parsed, is_head: bool) -> Result<(Framing, bool), RawError> {
    let headers = &head.headers;
    if matches!(head.status.as_u16(), 204 | 304) {
        // No body, whatever it declares; one that declares one may send it, and the
        // connection is not reused after it (the rule hyper's client path keeps too).
        let spoiled = crate::pool::spoils_connection(head.status, headers);
        return Ok((Framing::Length(0), !spoiled));
    }
    if is_head {
        return Ok((Framing::Length(0), true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if head.version == Version::HTTP_10 {
            return Err(RawError::Malformed(
                "an HTTP/1.0 answer has a Transfer-Encoding",
            ));
        }
        if chunked_last(headers) {
            // Framed twice: the chunks rule, and the connection is not reused
            // (`pool::framed_twice`).
            return Ok((
                Framing::Chunked(Chunked::SizeStart),
                !headers.contains_key(CONTENT_LENGTH),
            ));
        }
        return Ok((Framing::Close, false));
    }
    match content_length(headers) {
        Some(Ok(len)) => Ok((Framing::Length(len), true)),
        Some(Err(())) => Err(RawError::Malformed("the Content-Length is invalid")),
        None => Ok((Framing::Close, false)),
    }
}

/// Whether the last transfer coding is chunked. A last value that is not all visible
/// ASCII names none, as hyper reads it (`is_chunked_`, through `to_str`): the body then
/// runs to the close.
fn chunked_last(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case("chunked"))
}

/// Every `Content-Length` value, a list of one number repeated taken as the number (as
/// hyper takes it); `Err`: values that differ or are not numbers.
fn content_length(headers: &HeaderMap) -> Option<Result<u64, ()>> {
    let mut found = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Some(Err(()));
            }
            // Any number of digits, leading zeros and all, as long as the number fits 64
            // bits (hyper's `from_digits`) and is not one of the two hyper's lengths keep for
            // themselves (`DecodedLength::checked_new`); a cap on the digits (19) refused
            // `000…05`.
            let n = part
                .iter()
                .try_fold(0u64, |n, d| {
                    n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                })
                .filter(|&n| n <= u64::MAX - 2);
            let Some(n) = n else {
                return Some(Err(()));
            };
            match found {
                Some(m) if m != n => return Some(Err(())),
                _ => found = Some(n),
            }
        }
    }
    found.map(Ok)
}

/// Where a chunked body's reader stands.
#[derive(Debug)]
enum Chunked {
    /// At a chunk-size line's start: a hex digit must come.
    SizeStart,
    /// In a chunk-size line; the size read so far.
    Size(u64),
    /// Blanks after the size.
    SizeBlanks(u64),
    /// A chunk extension, to the line's end.
    Extension(u64),
    /// The LF after a size line's CR.
    SizeLf(u64),
    /// In a chunk's data, so many bytes left.
    Data(u64),
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after it.
    DataLf,
    /// After the last chunk: trailer lines, collected, until an empty line.
    Trailers(Vec<u8>),
    Done,
}

/// A response body read from this client's connection: the connection goes back to its
/// pool when the body has been read to its end, or is closed if dropped before.
pub struct RawBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Weak<RawPool>,
    next_read: usize,
    read_buffer: usize,
    /// Bytes of chunk extensions read so far.
    extensions: usize,
    /// The most fields a trailer section may have: `max_header_fields`, as hyper's client
    /// bounds trailers by its `max_headers`.
    trailer_fields: usize,
}

impl fmt::Debug for RawBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawBody")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl RawBody {
    fn is_end_stream(&self) -> bool {
        self.framing.ended() && self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// The body has been read to its end: its connection is kept if it may be and nothing
    /// came after the body.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if reusable(self.keep_alive, &conn.buf) {
            if let Some(pool) = self.pool.upgrade() {
                pool.keep(conn);
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, RawError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self
                .framing
                .step(&mut conn.buf, &mut self.extensions, self.trailer_fields)
            {
                Ok(Step::Frame(frame)) => {
                    if self.framing.ended() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::Ended) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let want = match self.framing {
                Framing::Length(n) => (n as usize).clamp(1, self.next_read),
                _ => self.next_read,
            };
            conn.buf.reserve(want);
            let room = conn.buf.capacity() - conn.buf.len();
            let read = ready!(poll_read(&mut conn.io, &mut conn.buf, cx));
            match read {
                Ok(0) => {
                    self.conn = None;
                    return Poll::Ready(self.framing.closed().err().map(Err));
                }
                Ok(n) => {
                    // A read that filled the room asks for more next time, as hyper's
                    // adaptive buffer does, up to `upstream_read_buffer`.
                    if n >= room {
                        self.next_read = (self.next_read * 2).min(self.read_buffer);
                    }
                }
                Err(error) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(RawError::Io {
                        error,
                        answered: true,
                    })));
                }
            }
        }
    }
}

/// Whether a connection whose answer was read to its end goes back to the pool: if the
/// answer allows it and nothing came after it (which would answer the next request).
fn reusable(keep_alive: bool, leftover: &BytesMut) -> bool {
    keep_alive && leftover.is_empty()
}

/// A body dropped before its end keeps its connection if the rest of it is in hand already
/// (as hyper's client drains what it has read): a HEAD sent up as a GET, or a body only
/// judged by its tag, need not cost the connection. Anything past it, or a body still to
/// come, and the connection is closed.
impl Drop for RawBody {
    fn drop(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if !self.keep_alive {
            return;
        }
        loop {
            match self
                .framing
                .step(&mut conn.buf, &mut self.extensions, self.trailer_fields)
            {
                Ok(Step::Frame(_)) if !self.framing.ended() => {}
                Ok(Step::Frame(_) | Step::Ended) => return self.finish(),
                Ok(Step::More) | Err(_) => return,
            }
        }
    }
}

/// What a body's reader made of the bytes in hand.
enum Step {
    Frame(Frame<Bytes>),
    /// The body ended without a frame left to give.
    Ended,
    /// More bytes are needed.
    More,
}

impl Framing {
    /// The connection closed after the bytes read so far: a body delimited by the close
    /// ends there; any other is cut off.
    fn closed(&mut self) -> Result<(), RawError> {
        if matches!(self, Self::Close) {
            *self = Self::Length(0);
            Ok(())
        } else {
            Err(RawError::Closed { answered: true })
        }
    }

    /// Takes the next frame out of `buf`, as far as its bytes go.
    fn step(
        &mut self,
        buf: &mut BytesMut,
        extensions: &mut usize,
        trailer_fields: usize,
    ) -> Result<Step, RawError> {
        match self {
            Self::Length(0) => Ok(Step::Ended),
            Self::Length(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                Ok(Step::Frame(Frame::data(buf.split_to(n).freeze())))
            }
            Self::Close => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                Ok(Step::Frame(Frame::data(buf.split().freeze())))
            }
            Self::Chunked(state) => state.step(buf, extensions, trailer_fields),
        }
    }
}

impl Chunked {
    fn step(
        &mut self,
        buf: &mut BytesMut,
        extensions: &mut usize,
        trailer_fields: usize,
    ) -> Result<Step, RawError> {
        const BAD_SIZE: RawError = RawError::Malformed("a chunk-size line is invalid");
        loop {
            if let Self::Data(left) = self {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                let data = buf.split_to(n).freeze();
                if *left == 0 {
                    *self = Self::DataCr;
                }
                return Ok(Step::Frame(Frame::data(data)));
            }
            if let Self::Done = self {
                return Ok(Step::Ended);
            }
            let Some(&b) = buf.first() else {
                return Ok(Step::More);
            };
            buf.advance(1);
            *self = match std::mem::replace(self, Self::Done) {
                Self::SizeStart => match (b as char).to_digit(16) {
                    Some(digit) => Self::Size(u64::from(digit)),
                    None => return Err(BAD_SIZE),
                },
                Self::Size(n) => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).expect("a hex digit") as u64;
                        let n = n
                            .checked_mul(16)
                            .and_then(|n| n.checked_add(digit))
                            .ok_or(RawError::Malformed("a chunk size is too large"))?;
                        Self::Size(n)
                    }
                    b'\t' | b' ' => Self::SizeBlanks(n),
                    b';' => Self::Extension(n),
                    b'\r' => Self::SizeLf(n),
                    _ => return Err(BAD_SIZE),
                },
                Self::SizeBlanks(n) => match b {
                    b'\t' | b' ' => Self::SizeBlanks(n),
                    b';' => Self::Extension(n),
                    b'\r' => Self::SizeLf(n),
                    _ => return Err(BAD_SIZE),
                },
                Self::Extension(n) => match b {
                    b'\r' => Self::SizeLf(n),
                    b'\n' => return Err(BAD_SIZE),
                    _ => {
                        // Counted as hyper counts them: the bytes after the `;`, the line's
                        // CR not among them, and refused on reaching the limit. Counting
                        // the CR too refused a body of many chunks each with a short
                        // extension that hyper reads whole.
                        *extensions += 1;
                        if *extensions >= CHUNK_EXTENSIONS_LIMIT {
                            return Err(RawError::Malformed("the chunk extensions are too long"));
                        }
                        Self::Extension(n)
                    }
                },
                Self::SizeLf(n) => match (b, n) {
                    (b'\n', 0) => Self::Trailers(Vec::new()),
                    (b'\n', n) => Self::Data(n),
                    _ => return Err(BAD_SIZE),
                },
                Self::DataCr if b == b'\r' => Self::DataLf,
                Self::DataLf if b == b'\n' => Self::SizeStart,
                Self::DataCr | Self::DataLf => {
                    return Err(RawError::Malformed("a chunk does not end in CRLF"))
                }
                Self::Trailers(mut t) => {
                    // A CR only before an LF, as hyper's client reads trailers: the parser
                    // stops at the first empty line, and would not see a bare CR after one
                    // that ended in a bare LF.
                    if t.last() == Some(&b'\r') && b != b'\n' {
                        return Err(RawError::Malformed("a trailer line has a bare CR"));
                    }
                    t.push(b);
                    // Refused on reaching the limit, as hyper refuses it.
                    if t.len() >= TRAILERS_LIMIT {
                        return Err(RawError::Malformed("the trailers are too large"));
                    }
                    if t == b"\r\n" {
                        return Ok(Step::Ended);
                    }
                    if t.ends_with(b"\r\n\r\n") {
                        return Ok(Step::Frame(Frame::trailers(trailers(&t, trailer_fields)?)));
                    }
                    Self::Trailers(t)
                }
                Self::Data(_) | Self::Done => unreachable!("handled above"),
            };
        }
    }
}

/// A trailer section (its fields and the empty line after them) as fields, `max` of them
/// at most. hyper's client allows as many trailer fields as head fields (`max_headers`,
/// that is `max_header_fields`): a fixed 100 refused more where it was raised, and let
/// more through where it was lowered.
fn trailers(section: &[u8], max: usize) -> Result<HeaderMap, RawError> {
    // hyper's client counts the section's CRLF-ended lines, refuses more than `max`, and
    // gives the parser a slot for each: a bare LF that splits a line into two fields leaves
    // one without a slot, and the trailers are refused. With `max` slots, such a section
    // was read whole.
    let lines = section
        .windows(2)
        .filter(|w| w == b"\r\n")
        .count()
        .saturating_sub(1);
    if lines > max {
        return Err(RawError::Malformed("the trailers have too many fields"));
    }
    let mut slots = vec![httparse::EMPTY_HEADER; lines];
    let fields = match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        _ => return Err(RawError::Malformed("the trailers are invalid")),
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| RawError::Malformed("a trailer name is invalid"))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| RawError::Malformed("a trailer value is invalid"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// What [`read_response`] made of a response whose head was read.
#[doc(hidden)]
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// The reason phrase, when not the status's own (as hyper's client gives it).
    pub reason: Option<hyper::ext::ReasonPhrase>,
    /// The body's bytes, as far as it was read.
    pub body: Vec<u8>,
    pub trailers: Option<HeaderMap>,
    /// How the body ended: `Err` if it was cut off or broke the rules after the head.
    pub end: Result<(), RawError>,
    /// Whether the connection would go back to the pool for the next request.
    pub reused: bool,
    /// What the buffer held after the body's end.
    pub leftover: Vec<u8>,
}

/// Reads `bytes` and then the connection's close as this client reads the answer to a GET
/// (or a HEAD): the head as [`exchange`] reads it (in reads of the size it asks for, each
/// filled), the body as [`RawBody`] reads it. For the fuzz target that compares this
/// client with hyper's (`fuzz/fuzz_targets/h1_response.rs`); `Err`: the head failed.
#[doc(hidden)]
pub fn read_response(bytes: &[u8], is_head: bool, limits: ReadLimits) -> Result<Outcome, RawError> {
    let (mut buf, mut rest, mut answered) = (BytesMut::new(), bytes, false);
    let (parsed, mut framing) = loop {
        if !buf.is_empty() {
            answered = true;
            if let Some(answer) = final_head(&mut buf, limits, is_head)? {
                break answer;
            }
        }
        if rest.is_empty() {
            return Err(RawError::Closed { answered });
        }
        let (read, left) = rest.split_at(head_read(&buf, limits).min(rest.len()));
        buf.extend_from_slice(read);
        rest = left;
    };
    buf.extend_from_slice(rest);
    let (mut body, mut trailers, mut extensions, mut reused) = (Vec::new(), None, 0, false);
    let end = loop {
        if framing.ended() {
            // `RawPool::response` hands the connection back at once.
            reused = reusable(parsed.keep_alive, &buf);
            break Ok(());
        }
        match framing.step(&mut buf, &mut extensions, limits.max_header_fields) {
            Ok(Step::Frame(frame)) => match frame.into_data() {
                Ok(data) => body.extend_from_slice(&data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Ok(Step::Ended) => {
                reused = reusable(parsed.keep_alive, &buf);
                break Ok(());
            }
            // All the bytes are in hand: the next read finds the close.
            Ok(Step::More) => break framing.closed(),
            Err(e) => break Err(e),
        }
    };
    Ok(Outcome {
        status: parsed.status,
        version: parsed.version,
        headers: parsed.headers,
        reason: parsed.reason,
        body,
        trailers,
        end,
        reused,
        leftover: buf.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a chunked body decodes to: its data, its trailers, and what is left in the
    /// buffer after its end.
    type Decoded = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

    /// Decodes `wire` fed to the reader `split` bytes at a time.
    fn decode(wire: &[u8], split: usize) -> Result<Decoded, RawError> {
        decode_in(wire, &[split])
    }

    /// Decodes `wire` fed in pieces of the sizes `splits` gives, over and over.
    fn decode_in(wire: &[u8], splits: &[usize]) -> Result<Decoded, RawError> {
        let mut framing = Framing::Chunked(Chunked::SizeStart);
        let mut buf = BytesMut::new();
        let (mut fed, mut extensions, mut i) = (0, 0, 0);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match framing.step(
                &mut buf,
                &mut extensions,
                crate::config::DEFAULT_MAX_HEADER_FIELDS,
            )? {
                Step::Frame(frame) => match frame.into_data() {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Step::Ended => return Ok((data, trailers, buf.to_vec())),
                Step::More if fed == wire.len() => return Err(RawError::Closed { answered: true }),
                Step::More => {
                    let end = (fed + splits[i % splits.len()]).min(wire.len());
                    i += 1;
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
            if framing.ended() && trailers.is_some() {
                return Ok((data, trailers, buf.to_vec()));
            }
        }
    }

    #[test]
    fn a_chunked_body_reads_the_same_however_its_bytes_arrive() {
        let wire = b"5;name=value\r\nhello\r\nA \r\n, world!!!\r\n1e;a=\"b;c\"\r\n0123456789abcdef0123456789abcd\r\n0\r\n\r\nNEXT";
        for split in [1, 2, 3, 7, 64, wire.len()] {
            let (data, trailers, rest) = decode(wire, split).unwrap();
            assert_eq!(
                data, b"hello, world!!!0123456789abcdef0123456789abcd",
                "split {split}"
            );
            assert!(trailers.is_none());
            // What follows the body is left for the caller (which then closes the
            // connection rather than read it as the next answer).
            let fed_past: &[u8] = b"NEXT";
            assert!(fed_past.starts_with(&rest), "split {split}: {rest:?}");
        }
    }

    #[test]
    fn a_chunked_bodys_trailers_come_as_a_trailers_frame() {
        let wire = b"3\r\nabc\r\n0\r\nX-Checksum: 42\r\nX-Other: a b\r\n\r\n";
        for split in [1, 5, wire.len()] {
            let (data, trailers, _) = decode(wire, split).unwrap();
            assert_eq!(data, b"abc");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["x-checksum"], "42");
            assert_eq!(trailers["x-other"], "a b");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for wire in [
            &b"\r\nabc\r\n0\r\n\r\n"[..], // no size at all
            b"3\nabc\r\n0\r\n\r\n",       // a bare LF ends the size line
            b"3\r\nabcd\r\n0\r\n\r\n",    // data longer than its size
            b"3\r\nabc0\r\n\r\n",         // no CRLF after the data
            b"x\r\n",                     // not hex
            b"3;ext\nabc\r\n0\r\n\r\n",   // an extension ended by a bare LF
            b"11111111111111111\r\n",     // a size past 64 bits
        ] {
            assert!(
                matches!(decode(wire, 1), Err(RawError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        // A body cut off is not taken for a whole one.
        assert!(matches!(
            decode(b"5\r\nhel", 2),
            Err(RawError::Closed { answered: true })
        ));
    }

    /// hyper's count of chunk extensions: the bytes after each `;`, refused on reaching
    /// 16 KiB; neither the `;` nor the line's CR counts.
    #[test]
    fn chunk_extensions_are_counted_and_bounded_as_hyper_does() {
        let chunks = |count: usize, ext: &str| {
            let mut wire = Vec::new();
            for _ in 0..count {
                wire.extend_from_slice(format!("1;{ext}\r\na\r\n").as_bytes());
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            wire
        };
        let (data, _, _) = decode(&chunks(16383, "x"), 4096).unwrap();
        assert_eq!(data.len(), 16383);
        assert!(matches!(
            decode(&chunks(16384, "x"), 4096),
            Err(RawError::Malformed(_))
        ));
        let long = "x".repeat(16383);
        assert!(decode(&chunks(1, &long), 4096).is_ok());
        let longer = "x".repeat(16384);
        assert!(decode(&chunks(1, &longer), 4096).is_err());
    }

    #[test]
    fn a_trailer_section_has_as_many_fields_as_max_header_fields_allows() {
        let section = |n: usize| {
            let mut s: Vec<u8> = (0..n)
                .flat_map(|i| format!("x-t{i}: {i}\r\n").into_bytes())
                .collect();
            s.extend_from_slice(b"\r\n");
            s
        };
        assert_eq!(trailers(&section(150), 200).unwrap().len(), 150);
        assert_eq!(trailers(&section(10), 10).unwrap().len(), 10);
        assert!(trailers(&section(11), 10).is_err());
    }

    /// A bare LF inside a trailer line makes two fields of one CRLF-ended line: hyper's
    /// client has a parser slot per line, and refuses the trailers.
    #[test]
    fn a_trailer_line_split_by_a_bare_lf_is_refused_as_hyper_refuses_it() {
        assert!(trailers(b"A: 1\nB: 2\r\n\r\n", 100).is_err());
        assert!(trailers(b"A: 1\r\nB: 2\r\n\r\n", 100).is_ok());
    }

    /// hyper refuses a CR not followed by an LF anywhere in a trailer section, even after
    /// an empty line ended by a bare LF (where the parser stops reading).
    #[test]
    fn a_bare_cr_in_a_trailer_section_is_refused_as_hyper_refuses_it() {
        assert!(matches!(
            decode(b"0\r\nA: 1\n\r\nB\rx\r\n\r\n", 3),
            Err(RawError::Malformed(_))
        ));
        assert!(decode(b"0\r\nA: 1\r\nB: 2\r\n\r\n", 3).is_ok());
    }

    /// hyper refuses a trailer section once it holds 16 KiB, its last CRLF included.
    #[test]
    fn a_trailer_section_of_16_kib_is_refused_as_hyper_refuses_it() {
        let section = |len: usize| {
            let mut wire = b"0\r\nX-Pad: ".to_vec();
            let pad = len - b"X-Pad: ".len() - 4;
            wire.extend(std::iter::repeat_n(b'a', pad));
            wire.extend_from_slice(b"\r\n\r\n");
            wire
        };
        assert!(decode(&section(TRAILERS_LIMIT - 1), 4096).is_ok());
        assert!(matches!(
            decode(&section(TRAILERS_LIMIT), 4096),
            Err(RawError::Malformed(_))
        ));
    }

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_content_length_is_one_number_however_often_it_is_repeated() {
        let cl = |values: &[&'static str]| {
            let fields: Vec<_> = values.iter().map(|v| ("content-length", *v)).collect();
            content_length(&headers(&fields))
        };
        assert_eq!(cl(&["5"]), Some(Ok(5)));
        assert_eq!(cl(&["5, 5"]), Some(Ok(5)));
        assert_eq!(cl(&["5", "5"]), Some(Ok(5)));
        assert_eq!(cl(&[]), None);
        assert_eq!(cl(&["000000000000000000005"]), Some(Ok(5)));
        assert_eq!(cl(&["18446744073709551613"]), Some(Ok(u64::MAX - 2)));
        for bad in [
            &["5", "6"][..],
            &["5, 6"],
            &["+5"],
            &["-1"],
            &["12abc"],
            &[""],
            &["1 2"],
            &["18446744073709551614"],
            &["18446744073709551616"],
            &["99999999999999999999999"],
        ] {
            assert_eq!(cl(bad), Some(Err(())), "{bad:?}");
        }
    }

    #[test]
    fn only_a_last_chunked_coding_frames_by_chunks() {
        let te = |v: &'static str| chunked_last(&headers(&[("transfer-encoding", v)]));
        assert!(te("chunked"));
        assert!(te("gzip, Chunked"));
        assert!(!te("chunked, gzip"));
        assert!(!te("gzip"));
    }

    /// hyper reads a `Transfer-Encoding` value that is not all visible ASCII as no chunked
    /// coding (its `to_str` fails): the body then runs to the close, and the connection is
    /// not reused. Read as bytes, `gzir:<\x9ap, chunked` was chunked here: another body.
    #[test]
    fn a_transfer_encoding_with_obs_text_is_not_chunked_as_hyper_reads_it() {
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"gzir:<\x9ap, chunked").unwrap();
        h.append(TRANSFER_ENCODING, value);
        assert!(!chunked_last(&h));
    }

    #[test]
    fn a_head_names_its_fields_values_and_reason_as_sent() {
        let limits = ReadLimits {
            read_buffer: 16 * 1024,
            max_header_fields: 3,
        };
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 Fine\r\nA: 1\r\nB: two\r\n\r\nbody"[..]);
        let head = parse_head(&mut buf, limits).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["a"], "1");
        assert_eq!(head.headers["b"], "two");
        assert_eq!(head.reason.unwrap().as_bytes(), b"Fine");
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"body");

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nA: 1\r\n"[..]);
        assert!(parse_head(&mut partial, limits).unwrap().is_none());

        let mut many =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n"[..]);
        assert!(matches!(
            parse_head(&mut many, limits),
            Err(RawError::TooLarge)
        ));

        let mut closing =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n\r\n"[..]);
        assert!(
            !parse_head(&mut closing, limits)
                .unwrap()
                .unwrap()
                .keep_alive
        );
        let mut old = BytesMut::from(&b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"[..]);
        assert!(!parse_head(&mut old, limits).unwrap().unwrap().keep_alive);
    }

    /// httparse gives a static "" (not a slice of the head) as the reason of a status line
    /// without one, and of one with obs-text: an empty reason, as hyper's client has it.
    #[test]
    fn a_head_without_a_reason_or_with_obs_text_in_it_has_an_empty_one() {
        let limits = ReadLimits {
            read_buffer: 16 * 1024,
            max_header_fields: 3,
        };
        for head in [
            &b"HTTP/1.1 200\r\nA: 1\r\n\r\n"[..],
            b"HTTP/1.1 200\nA: 1\r\n\r\n",
            b"HTTP/1.1 200 \r\nA: 1\r\n\r\n",
            b"HTTP/1.1 200 \xc7a va\r\nA: 1\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(head);
            let parsed = parse_head(&mut buf, limits).unwrap().unwrap();
            assert_eq!(parsed.status, StatusCode::OK);
            assert_eq!(parsed.reason.unwrap().as_bytes(), b"", "{head:?}");
            assert_eq!(parsed.headers["a"], "1");
        }
    }

    /// `read_response`, what the fuzz target compares with hyper, gives what the client
    /// makes of an answer.
    #[test]
    fn read_response_reads_an_answer_as_the_client_does() {
        let limits = ReadLimits {
            read_buffer: 16 * 1024,
            max_header_fields: 100,
        };
        let read = |wire: &[u8], is_head| read_response(wire, is_head, limits).unwrap();
        let o = read(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            false,
        );
        assert_eq!(o.status, StatusCode::OK);
        assert_eq!(o.body, b"abc");
        assert!(o.end.is_ok() && o.reused && o.leftover.is_empty());

        let o = read(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcd", false);
        assert_eq!(
            (&o.body[..], &o.leftover[..], o.reused),
            (&b"abc"[..], &b"d"[..], false)
        );

        let o = read(b"HTTP/1.1 200 OK\r\n\r\nto the close", false);
        assert_eq!(o.body, b"to the close");
        assert!(o.end.is_ok() && !o.reused);

        let o = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", false);
        assert!(matches!(o.end, Err(RawError::Closed { answered: true })));

        let o = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert!(o.body.is_empty() && o.end.is_ok() && o.reused);

        assert!(matches!(
            read_response(b"HTTP/1.1 200 OK\r\n", false, limits),
            Err(RawError::Closed { answered: true })
        ));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// One chunk: its data, the spelling of its size (leading zeros, case of hex) and
        /// an extension, if any.
        #[derive(Debug, Clone)]
        struct Chunk {
            data: Vec<u8>,
            zeros: usize,
            upper: bool,
            blanks: usize,
            extension: Option<String>,
        }

        fn chunk() -> impl Strategy<Value = Chunk> {
            (
                proptest::collection::vec(any::<u8>(), 1..300),
                0..4usize,
                any::<bool>(),
                0..3usize,
                proptest::option::of("[a-z]{1,8}(=([a-z0-9]{0,8}|\"[a-z ;=]{0,8}\"))?"),
            )
                .prop_map(|(data, zeros, upper, blanks, extension)| Chunk {
                    data,
                    zeros,
                    upper,
                    blanks,
                    extension,
                })
        }

        fn size_line(len: usize, c: &Chunk) -> Vec<u8> {
            let hex = if c.upper {
                format!("{len:X}")
            } else {
                format!("{len:x}")
            };
            let mut line = "0".repeat(c.zeros) + &hex + &" ".repeat(c.blanks);
            if let Some(ext) = &c.extension {
                line.push(';');
                line.push_str(ext);
            }
            line.push_str("\r\n");
            line.into_bytes()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any body, chunked any way, with or without trailers, fed in any pieces:
            /// the same bytes, the same trailers, and nothing after its end taken.
            #[test]
            fn any_chunked_body_decodes_to_its_bytes_however_it_arrives(
                chunks in proptest::collection::vec(chunk(), 0..12),
                last in chunk(),
                trailers in proptest::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,16}"), 0..4),
                splits in proptest::collection::vec(1..64usize, 1..8),
                tail in proptest::collection::vec(any::<u8>(), 0..16),
            ) {
                let mut wire = Vec::new();
                let mut body = Vec::new();
                for c in &chunks {
                    wire.extend_from_slice(&size_line(c.data.len(), c));
                    wire.extend_from_slice(&c.data);
                    wire.extend_from_slice(b"\r\n");
                    body.extend_from_slice(&c.data);
                }
                wire.extend_from_slice(&size_line(0, &last));
                let mut expected = HeaderMap::new();
                for (name, value) in &trailers {
                    let value = value.trim_matches(' ');
                    wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                    expected.append(
                        HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        HeaderValue::from_str(value).unwrap(),
                    );
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&tail);
                let (data, got, rest) = decode_in(&wire, &splits).unwrap();
                prop_assert_eq!(data, body);
                prop_assert_eq!(got.unwrap_or_default(), expected);
                prop_assert!(tail.starts_with(&rest));
            }

            /// Random bytes, after a valid start or not, never panic the chunked reader:
            /// it gives frames, an end, a need for more, or an error.
            #[test]
            fn random_bytes_never_panic_the_chunked_reader(
                start in prop_oneof![Just(&b""[..]), Just(&b"5\r\nhello\r\n"[..]), Just(&b"0\r\n"[..])],
                noise in proptest::collection::vec(any::<u8>(), 0..512),
                splits in proptest::collection::vec(1..64usize, 1..8),
            ) {
                let mut wire = start.to_vec();
                wire.extend_from_slice(&noise);
                let _ = decode_in(&wire, &splits);
            }

            /// Random bytes, alone or after a valid status line, never panic the head's
            /// parser, nor the framing read from what it parsed.
            #[test]
            fn random_bytes_never_panic_the_head_parser(
                start in prop_oneof![
                    Just(&b""[..]),
                    Just(&b"HTTP/1.1 200"[..]),
                    Just(&b"HTTP/1.1 200 "[..]),
                    Just(&b"HTTP/1.1 200 OK\r\n"[..]),
                    Just(&b"HTTP/1.0 204 \r\nContent-Length: "[..]),
                    Just(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: "[..]),
                ],
                noise in proptest::collection::vec(any::<u8>(), 0..256),
                end in any::<bool>(),
                fields in 1..8usize,
                is_head in any::<bool>(),
            ) {
                let mut wire = start.to_vec();
                wire.extend_from_slice(&noise);
                if end {
                    wire.extend_from_slice(b"\r\n\r\n");
                }
                let limits = ReadLimits { read_buffer: 16 * 1024, max_header_fields: fields };
                let mut buf = BytesMut::from(&wire[..]);
                if let Ok(Some(parsed)) = parse_head(&mut buf, limits) {
                    let _ = framing(&parsed, is_head);
                }
            }
        }
    }
}
