//! What a client connection is doing: how many of its requests are still being answered
//! (response body included) and since when it has had none. [`Activity::idle`] tells the
//! server when a connection has had none for `header_read_timeout`, whatever its protocol:
//! an HTTP/1.1 connection idle between requests or too slow to send a head (hyper's own
//! head-read timer is off, as it costs a timer per request), and an HTTP/2 one that
//! answers pings with no stream open, which gets a GOAWAY. Either would otherwise hold one
//! of `max_connections`.
//!
//! It also tells when a response has been waiting on its client as long: the connection
//! has response bodies to send, has taken no chunk of any for `header_read_timeout`, and its
//! socket's send queue has not gone down either (a client that stopped reading, as nginx's
//! `send_timeout` guards against). Such a connection is cut off; else it would hold the
//! bytes of its bodies, and their share of `max_buffered_bytes`, for as long as it stays
//! open. The send queue is watched because a chunk is asked for only when the socket takes
//! more, and Linux says it does only once a third of its send buffer (megabytes, tuned up on
//! a fast path) has drained: a client reading slowly but steadily may take no chunk in a
//! whole period. And a client whose TCP stack acknowledged not one byte in the whole period
//! while some wait for it reads nothing, whatever else it does: requests it keeps sending
//! (each answer begun counts as progress) do not keep such a connection open.
//!
//! On HTTP/2 one connection sends many bodies, and a client can starve one stream of window
//! while it reads the others: that stream's body, and its share of `max_buffered_bytes`,
//! would be held for as long as the connection lives, though the connection as a whole
//! moves. So an HTTP/2 body ([`Tracked::stream`]) also notes the period it last took a chunk
//! in, and one that took none for a whole period, not waiting on its upstream, while the
//! socket had nothing left to send (so the client's reading held nothing up), is cut off
//! alone, as nginx resets a stream starved of window at its `send_timeout`: the watch drops
//! its bytes (their share of the budget with them), and its next poll fails, so hyper resets
//! the stream and the connection's other streams go on.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{BodyError, ProxyBody};

/// One connection's requests in flight and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// The client's socket, whose send queue shows a slow reader's progress.
    socket: Option<Socket>,
    in_flight: AtomicUsize,
    /// Response bodies handed to the connection and not yet done with.
    sending: AtomicUsize,
    /// Of those, the ones waiting on their upstream (last asked, they had no chunk ready):
    /// the client is not what holds them up.
    awaiting: AtomicUsize,
    /// Counts every response body begun and every chunk asked of one: unchanged over a
    /// period, nothing was sent in it.
    progress: AtomicU64,
    /// When the last request ended, in microseconds since `opened`: an atomic, not a lock,
    /// since every response writes it.
    last_end: AtomicU64,
    /// The watch period [`Activity::idle`] is in; an HTTP/2 body notes the last one it
    /// took a chunk in.
    period: AtomicU64,
    /// The HTTP/2 bodies being sent (dead ones pruned as the list grows and at each watch).
    streams: Mutex<Vec<Weak<Stream>>>,
    /// HTTP/2 requests begun, and those of them their client reset before their answer's
    /// head ([`Answering`]).
    requests: AtomicU64,
    resets: AtomicU64,
    /// Told once resets make the connection look like a rapid-reset attack.
    abused: tokio::sync::Notify,
}

/// Early resets an HTTP/2 connection may make before it is closed, if they are half of its
/// requests or more: requests its client reset within [`EARLY_RESET`] of sending them,
/// before their answer's head. A stream reset before hyper hands it over costs little, and
/// hyper and h2 limit those; one reset later has usually had its request sent upstream,
/// where the backend goes on working on it: one connection resetting each request it opens
/// at once kept a backend busy with thousands (CVE-2023-44487's pattern, past h2's guard).
/// Envoy closes such connections by the same rule (`premature_reset_total_stream_count`,
/// 500 there); a client that cancels now and then stays far below.
pub const MAX_RESETS: u64 = 100;
/// How soon after its request a reset counts as early (Envoy's
/// `premature_reset_min_stream_lifetime_seconds`): a client giving up on a slow answer is
/// not an attack.
pub const EARLY_RESET: Duration = Duration::from_secs(1);

/// An HTTP/2 response body, shared between the stream that sends it and the connection's
/// watch, which may cut it off.
#[derive(Debug)]
struct Stream {
    /// `None` once cut off.
    body: Mutex<Option<ProxyBody>>,
    /// The watch period it last took a chunk in (or began in).
    moved: AtomicU64,
    /// Last asked, it had no chunk ready: it waits on its upstream, not on its client.
    awaiting: AtomicBool,
}

/// The error an HTTP/2 body cut off by the watch ends with: hyper then resets its stream.
#[derive(Debug, thiserror::Error)]
#[error("the client took nothing of this response for the send timeout")]
pub struct StreamCut;

impl Default for Activity {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Activity {
    /// The activity of a connection over `socket` (none: its send queue is not watched).
    pub fn new(socket: Option<Socket>) -> Self {
        Self {
            opened: Instant::now(),
            socket,
            in_flight: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            awaiting: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            period: AtomicU64::new(0),
            streams: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            abused: tokio::sync::Notify::new(),
        }
    }

    /// Counts an HTTP/2 request in; dropped before [`Answering::answered`], it counts as
    /// reset by its client.
    pub fn answering(self: &Arc<Self>) -> Answering {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Answering(Some((self.clone(), Instant::now())))
    }

    /// Completes once the connection's client has reset [`MAX_RESETS`] requests early, half
    /// of its requests or more: the server then closes it with a GOAWAY.
    pub fn abused(&self) -> tokio::sync::futures::Notified<'_> {
        self.abused.notified()
    }

    /// Counts a request in until the returned guard is dropped: with its response body once
    /// that is sent or abandoned, or with the request's future if that ends first.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Bytes the client's socket holds that the client has not acknowledged (none known
    /// without a socket, or off Linux).
    pub fn unsent(&self) -> Option<u64> {
        self.socket.and_then(Socket::unsent)
    }

    /// How far the client has taken what was sent to it, now: to tell later whether it
    /// took more ([`Reading::took_since`]).
    pub fn reading(&self) -> Reading {
        Reading {
            queued: self.unsent(),
            acked: self.socket.and_then(Socket::acked),
        }
    }

    /// A request is being answered (its response body included).
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Completes once the connection has had no request in flight for `timeout`, or has
    /// had responses to send and sent nothing of them for as long.
    pub async fn idle(&self, timeout: Duration) -> Idle {
        loop {
            // `busy` first: `InFlight::drop` writes the end time before it counts the
            // request out, so once no request is seen in flight, the end time read after is
            // the last one's. Read the other way round, a request ending in between gave an
            // old end time and no request in flight: a connection closed as idle at once.
            let busy = self.busy();
            let last_end =
                self.opened + Duration::from_micros(self.last_end.load(Ordering::Acquire));
            let deadline = if busy {
                Instant::now() + timeout
            } else {
                last_end + timeout
            };
            if !busy && deadline <= Instant::now() {
                return Idle::NoRequest;
            }
            let sending = self.sending.load(Ordering::Acquire) > 0;
            let progress = self.progress.load(Ordering::Acquire);
            let before = self.reading();
            // A new period: a body moved in it once it notes this number or a later one. (A
            // chunk taken as the period turns may note the one before: that body is cut
            // only if it takes nothing more for the whole period either.)
            let period = self.period.fetch_add(1, Ordering::AcqRel) + 1;
            tokio::time::sleep_until(deadline).await;
            self.cut_stuck_streams(period, timeout);
            // A body begun in the meantime counts as progress, so the bodies still being
            // sent were there all along, and not one chunk of them was taken; and at least
            // one of them has a chunk ready that the client does not take (a body waiting
            // on a slow upstream is that body's own timer's business); and the client has
            // not taken any of what the socket holds either.
            // Or, whatever it asked and was answered meanwhile, the client's TCP stack took
            // not one byte of what waited for it all period: its receive buffer is full,
            // unread.
            // Either way, not while the client took some of what waited for it: with
            // much of a response still in hyper's hands, no chunk may move for a period
            // while the kernel refills the socket from hyper as fast as the client reads.
            let now_sending = self.sending.load(Ordering::Acquire);
            let now = self.reading();
            let took = now.took_since(before);
            let waiting = |q: Option<u64>| q.is_some_and(|n| n > 0);
            let took_nothing =
                waiting(before.queued) && waiting(now.queued) && now.acked.is_some() && !took;
            let stalled = sending
                && now_sending > self.awaiting.load(Ordering::Acquire)
                && (self.progress.load(Ordering::Acquire) == progress || took_nothing)
                && !took;
            if busy && stalled {
                return Idle::Stalled;
            }
        }
    }

    /// Cuts off the HTTP/2 bodies that took no chunk since `period` began and do not wait
    /// on their upstream: their bytes are dropped now, and each fails at its next poll.
    ///
    /// Only while the client's socket holds nothing unacknowledged: then the connection is
    /// not held up by its client's reading (the socket would hold what waits), so a body
    /// that did not move waits on its stream's window, which the client keeps shut. A slow
    /// but steady reader keeps the socket's queue full, and its streams are the
    /// connection-wide watch's business (`Idle::Stalled`, which follows the queue). Without
    /// a reading of the queue (off Linux) nothing is cut here.
    fn cut_stuck_streams(&self, period: u64, timeout: Duration) {
        if self.unsent() != Some(0) {
            return;
        }
        let mut cut = 0;
        let mut streams = lock(&self.streams);
        streams.retain(|weak| {
            let Some(stream) = weak.upgrade() else {
                return false;
            };
            if stream.moved.load(Ordering::Acquire) < period
                && !stream.awaiting.load(Ordering::Acquire)
            {
                cut += usize::from(lock(&stream.body).take().is_some());
            }
            true
        });
        drop(streams);
        if cut > 0 {
            tracing::info!(
                streams = cut,
                after = ?timeout,
                "HTTP/2 streams cut off: their client took nothing of them"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How far a client had taken what was sent to it ([`Activity::reading`]): the bytes it
/// acknowledged, and what its socket held unacknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    queued: Option<u64>,
    acked: Option<u64>,
}

impl Reading {
    /// Bytes the socket held that its client had not acknowledged (`None`: not known).
    pub fn queued(self) -> Option<u64> {
        self.queued
    }

    /// The client took some of what was sent to it between `before` and `self`: it
    /// acknowledged more bytes; where that count is not known (before Linux 4.2), its
    /// socket's queue went down. The queue alone can miss a steady reader: while hyper still
    /// holds much of a response, the kernel takes more of it each time the client has read
    /// a third of the socket's buffer, and the queue stands where it stood.
    pub fn took_since(self, before: Reading) -> bool {
        match (before.acked, self.acked) {
            (Some(before), Some(now)) => now > before,
            _ => matches!((before.queued, self.queued), (Some(b), Some(n)) if n < b),
        }
    }
}

/// A client connection's TCP socket, for its send queue. Valid while the connection's
/// task runs, which is where [`Activity::idle`] is polled.
#[derive(Clone, Copy, Debug)]
pub struct Socket(#[cfg_attr(not(target_os = "linux"), allow(dead_code))] i32);

impl Socket {
    #[cfg(unix)]
    pub fn of(stream: &impl std::os::fd::AsRawFd) -> Self {
        Self(stream.as_raw_fd())
    }

    /// Bytes written to the socket that its peer has not acknowledged yet (`SIOCOUTQ`).
    #[cfg(target_os = "linux")]
    fn unsent(self) -> Option<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which is valid
        // for that; a closed or reused fd makes it fail or read another socket's queue,
        // never touch memory.
        let rc = unsafe { libc::ioctl(self.0, libc::TIOCOUTQ, &mut n) };
        (rc == 0).then(|| u64::try_from(n).unwrap_or(0))
    }

    #[cfg(not(target_os = "linux"))]
    fn unsent(self) -> Option<u64> {
        None
    }

    /// Bytes of the connection its peer has acknowledged so far (`tcpi_bytes_acked`, Linux
    /// 4.2 and later; `None` before, or for a socket that is not TCP).
    #[cfg(target_os = "linux")]
    fn acked(self) -> Option<u64> {
        // SAFETY: `tcp_info` is plain integers, for which zero is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes through the pointer, which is valid
        // for that many; a closed or reused fd makes it fail or read another socket's.
        let rc = unsafe {
            libc::getsockopt(
                self.0,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
        (rc == 0 && len as usize >= end).then_some(info.tcpi_bytes_acked)
    }

    #[cfg(not(target_os = "linux"))]
    fn acked(self) -> Option<u64> {
        None
    }
}

/// Why [`Activity::idle`] completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// No request in flight for the timeout.
    NoRequest,
    /// Responses to send, and none of their chunks taken for the timeout.
    Stalled,
}

/// An HTTP/2 request whose answer's head is not ready yet, and when it came; see
/// [`Activity::answering`].
#[derive(Debug)]
pub struct Answering(Option<(Arc<Activity>, Instant)>);

impl Answering {
    /// The answer's head is ready: the request was not reset early. `local`: the proxy
    /// answered it without the backend ([`AnsweredLocally`]); it is not counted among the
    /// connection's requests, since it cost the backend nothing: else a client could keep its
    /// resets under half with free requests (a TRACE refused, a 404) between them.
    pub fn answered(mut self, local: bool) {
        if let Some((a, _)) = self.0.take() {
            if local {
                a.requests.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Marks an HTTP/2 response the proxy made without a word from the backend (see
/// [`Answering::answered`]).
#[derive(Clone, Copy, Debug)]
pub struct AnsweredLocally;

impl Drop for Answering {
    fn drop(&mut self) {
        let Some((a, began)) = self.0.take() else {
            return;
        };
        if began.elapsed() >= EARLY_RESET {
            return;
        }
        let resets = a.resets.fetch_add(1, Ordering::Relaxed) + 1;
        if resets >= MAX_RESETS && resets * 2 >= a.requests.load(Ordering::Relaxed) {
            // One permit is kept however often this is told.
            a.abused.notify_one();
        }
    }
}

/// A request being answered; see [`Activity::begin`].
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The end time first, so that a check that sees no request in flight sees it too.
        let since_open = u64::try_from(self.0.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.0.last_end.store(since_open, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted in until it is dropped, and counts the
/// chunks asked of it.
#[derive(Debug)]
pub struct Tracked {
    /// HTTP/1.1's body, watched with the connection (empty for HTTP/2's).
    body: ProxyBody,
    /// HTTP/2's body, watched on its own as well (see the module doc). Beside `body`, not
    /// an enum with it: HTTP/1.1's path stays one field access, inlined.
    shared: Option<Arc<Stream>>,
    request: InFlight,
    /// Counted in `awaiting`: last asked, it had no chunk ready.
    pending: bool,
}

impl Tracked {
    /// An HTTP/1.1 response body.
    pub fn new(body: ProxyBody, request: InFlight) -> Self {
        Self::with(body, None, request)
    }

    /// An HTTP/2 response body, which the connection's watch may cut off alone.
    pub fn stream(body: ProxyBody, request: InFlight) -> Self {
        let activity = &request.0;
        let stream = Arc::new(Stream {
            body: Mutex::new(Some(body)),
            moved: AtomicU64::new(activity.period.load(Ordering::Acquire)),
            awaiting: AtomicBool::new(false),
        });
        let mut streams = lock(&activity.streams);
        // Pruned where the list would grow: it stays within twice the live streams.
        if streams.len() == streams.capacity() {
            streams.retain(|w| w.strong_count() > 0);
        }
        streams.push(Arc::downgrade(&stream));
        drop(streams);
        Self::with(ProxyBody::empty(), Some(stream), request)
    }

    fn with(body: ProxyBody, shared: Option<Arc<Stream>>, request: InFlight) -> Self {
        let activity = &request.0;
        activity.sending.fetch_add(1, Ordering::AcqRel);
        activity.progress.fetch_add(1, Ordering::Relaxed);
        Self {
            body,
            shared,
            request,
            pending: false,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let activity = &self.request.0;
        if self.pending {
            activity.awaiting.fetch_sub(1, Ordering::AcqRel);
        }
        activity.sending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let activity = &this.request.0;
        activity.progress.fetch_add(1, Ordering::Relaxed);
        let polled = match &this.shared {
            None => Pin::new(&mut this.body).poll_frame(cx),
            Some(stream) => {
                let period = activity.period.load(Ordering::Acquire);
                stream.moved.fetch_max(period, Ordering::AcqRel);
                let mut body = lock(&stream.body);
                let polled = match body.as_mut() {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(Some(Err(StreamCut.into()))),
                };
                stream
                    .awaiting
                    .store(polled.is_pending(), Ordering::Release);
                polled
            }
        };
        // Atomics only when the body goes from waiting on its upstream to not, or back.
        if polled.is_pending() != self.pending {
            self.pending = polled.is_pending();
            let awaiting = &self.request.0.awaiting;
            match self.pending {
                true => awaiting.fetch_add(1, Ordering::AcqRel),
                false => awaiting.fetch_sub(1, Ordering::AcqRel),
            };
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.shared {
            None => self.body.is_end_stream(),
            // Cut off: not ended, so that it is polled and fails.
            Some(s) => lock(&s.body).as_ref().is_some_and(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.shared {
            None => self.body.size_hint(),
            Some(s) => lock(&s.body)
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_request_to_end_then_the_timeout() {
        let activity = Arc::new(Activity::default());
        let request = activity.begin();
        let t = Duration::from_secs(30);
        let start = Instant::now();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(t).await }
        });
        // Busy for 100 s: never idle meanwhile.
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!idle.is_finished());
        drop(request);
        assert_eq!(idle.await.unwrap(), Idle::NoRequest);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(130) && waited < Duration::from_secs(160),
            "{waited:?}"
        );
    }

    /// Polls `body` once.
    fn poll_once(body: &mut Tracked) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let waker = std::task::Waker::noop();
        Pin::new(body).poll_frame(&mut Context::from_waker(waker))
    }

    /// A loopback connection's server end and its client end; with `fill`, the server end
    /// has sent more than the client end takes unread, so its socket's queue is not empty.
    #[cfg(target_os = "linux")]
    fn socket_pair(fill: bool) -> (std::net::TcpStream, std::net::TcpStream) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        if fill {
            // More than the client's receive buffer takes: the rest waits, unacknowledged.
            client.set_nonblocking(true).unwrap();
            server.set_nonblocking(true).unwrap();
            let chunk = vec![0u8; 64 * 1024];
            while server.write(&chunk).is_ok() {}
        }
        (server, client)
    }

    /// One HTTP/2 stream starved while another is read: cut off alone after one period,
    /// the connection not; unless the socket still holds bytes for the client, which then
    /// is a slow reader, not a starving one.
    #[cfg(target_os = "linux")]
    #[tokio::test(start_paused = true)]
    async fn an_http2_body_nobody_takes_is_cut_off_alone_unless_the_socket_is_still_full() {
        for full in [false, true] {
            let (server, mut client) = socket_pair(full);
            let socket = Socket::of(&server);
            assert_eq!(socket.unsent() == Some(0), !full, "the queue as set up");
            let t = Duration::from_secs(30);
            let activity = Arc::new(Activity::new(Some(socket)));
            let mut starved = Tracked::stream(ProxyBody::full(Bytes::from("x")), activity.begin());
            let mut read = Tracked::stream(ProxyBody::full(Bytes::from("y")), activity.begin());
            let idle = tokio::spawn({
                let activity = activity.clone();
                async move { activity.idle(t).await }
            });
            // The other stream is read every 10 s: the connection moves, for 70 s. A slow
            // reader takes some of what the socket holds each time (its TCP stack
            // acknowledges it), and the socket is still not empty.
            for _ in 0..7 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                assert!(!matches!(poll_once(&mut read), Poll::Ready(Some(Err(_)))));
                if full {
                    use std::io::Read;
                    let _ = client.read(&mut [0u8; 16 * 1024]);
                    // The acknowledgement is the kernel's, in real time.
                    std::thread::sleep(Duration::from_millis(20));
                    assert_ne!(socket.unsent(), Some(0), "still a slow reader");
                }
            }
            assert!(!idle.is_finished(), "the connection is not cut off");
            match (full, poll_once(&mut starved)) {
                (false, Poll::Ready(Some(Err(e)))) => assert!(e.is::<StreamCut>(), "{e}"),
                (false, other) => panic!("the starved body was not cut off: {other:?}"),
                (true, Poll::Ready(Some(Ok(_)))) => {}
                (true, other) => panic!("a slow reader's body was cut off: {other:?}"),
            }
            idle.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_whose_body_nobody_takes_is_stalled_and_one_being_read_is_not() {
        let t = Duration::from_secs(30);
        let activity = Arc::new(Activity::default());
        let mut read = Tracked::new(ProxyBody::full(Bytes::from("x")), activity.begin());
        let reader = {
            // A client that takes a chunk every 20 s (the body answers Pending after its one
            // chunk; polling still counts).
            let activity = activity.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    let _ = std::future::poll_fn(|cx| {
                        let _ = Pin::new(&mut read).poll_frame(cx);
                        Poll::Ready(())
                    })
                    .await;
                }
                drop(read);
                activity
            })
        };
        let start = Instant::now();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(t).await }
        });
        let _ = reader.await.unwrap();
        assert!(!idle.is_finished(), "read slowly but read: never stalled");
        // Then a body nobody asks anything of.
        let _left = Tracked::new(ProxyBody::full(Bytes::from("y")), activity.begin());
        assert_eq!(idle.await.unwrap(), Idle::Stalled);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(230) && waited <= Duration::from_secs(260),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_had_a_request_is_idle_after_the_timeout() {
        let activity = Activity::default();
        let start = Instant::now();
        activity.idle(Duration::from_secs(30)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }
}
