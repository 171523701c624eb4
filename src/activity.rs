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
//! whole period.
//!
//! On HTTP/2 one connection sends many bodies, and a client can starve one stream of window
//! while it reads the others: that stream's body, and its share of `max_buffered_bytes`,
//! would be held for as long as the connection lives. So each body also counts whether it
//! took a chunk in the current period; a connection on which some bodies moved and another,
//! not waiting on its upstream, took nothing for the whole period is cut off too (nginx
//! resets such a stream at its `send_timeout`; hyper gives no handle on one stream).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
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
    /// The watch period [`Activity::idle`] is in; a body notes the last one it moved in.
    period: AtomicU64,
    /// Bodies still being sent that began, or took a chunk, in this period.
    moved: AtomicUsize,
}

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
            moved: AtomicUsize::new(0),
        }
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
            let queued = self.unsent();
            // A new period: no body has moved in it yet. (A body that moves just as it
            // begins may go uncounted: then it is taken for stuck only if it takes nothing
            // more for the whole period.)
            self.period.fetch_add(1, Ordering::AcqRel);
            self.moved.store(0, Ordering::Release);
            tokio::time::sleep_until(deadline).await;
            // A body begun in the meantime counts as progress, so the bodies still being
            // sent were there all along, and not one chunk of them was taken; and at least
            // one of them has a chunk ready that the client does not take (a body waiting
            // on a slow upstream is that body's own timer's business); and the client has
            // not taken any of what the socket holds either.
            let now_sending = self.sending.load(Ordering::Acquire);
            let stalled = sending
                && now_sending > self.awaiting.load(Ordering::Acquire)
                && self.progress.load(Ordering::Acquire) == progress
                && !went_down(queued, self.unsent());
            if busy && stalled {
                return Idle::Stalled;
            }
            // Bodies moved (some may be done with by now), and one still here, not waiting
            // on its upstream, did not: `moved` counts the bodies still here that did (one
            // both waiting and moved is subtracted twice: never a false cut).
            let moved = self.moved.load(Ordering::Acquire);
            let stuck = now_sending
                .saturating_sub(self.awaiting.load(Ordering::Acquire))
                .saturating_sub(moved);
            let progressed = self.progress.load(Ordering::Acquire) != progress;
            if busy && progressed && stuck > 0 {
                return Idle::StreamStalled;
            }
        }
    }
}

/// Whether a socket's queue went down between two readings (both known): its client took
/// some of it.
pub fn went_down(before: Option<u64>, now: Option<u64>) -> bool {
    matches!((before, now), (Some(before), Some(now)) if now < before)
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
}

/// Why [`Activity::idle`] completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// No request in flight for the timeout.
    NoRequest,
    /// Responses to send, and none of their chunks taken for the timeout.
    Stalled,
    /// HTTP/2: one response took no chunk for the timeout while others did.
    StreamStalled,
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
    body: ProxyBody,
    request: InFlight,
    /// Counted in `awaiting`: last asked, it had no chunk ready.
    pending: bool,
    /// The last watch period it was counted in `moved` for.
    period: u64,
}

impl Tracked {
    pub fn new(body: ProxyBody, request: InFlight) -> Self {
        let activity = &request.0;
        activity.sending.fetch_add(1, Ordering::AcqRel);
        activity.progress.fetch_add(1, Ordering::Relaxed);
        let period = activity.period.load(Ordering::Acquire);
        activity.moved.fetch_add(1, Ordering::AcqRel);
        Self {
            body,
            request,
            pending: false,
            period,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let activity = &self.request.0;
        if self.pending {
            activity.awaiting.fetch_sub(1, Ordering::AcqRel);
        }
        // Counted out of `moved` if counted in this period. Saturating: the period may
        // have turned, and `moved` been reset, in between.
        if self.period == activity.period.load(Ordering::Acquire) {
            let _ = activity
                .moved
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
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
        let activity = &self.request.0;
        activity.progress.fetch_add(1, Ordering::Relaxed);
        let period = activity.period.load(Ordering::Acquire);
        if self.period != period {
            activity.moved.fetch_add(1, Ordering::AcqRel);
            self.period = period;
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
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
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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

    #[tokio::test(start_paused = true)]
    async fn one_body_nobody_takes_while_another_is_read_is_a_stalled_stream() {
        let t = Duration::from_secs(30);
        let activity = Arc::new(Activity::default());
        let _starved = Tracked::new(ProxyBody::full(Bytes::from("x")), activity.begin());
        let mut read = Tracked::new(ProxyBody::full(Bytes::from("y")), activity.begin());
        let start = Instant::now();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(t).await }
        });
        // The other stream is read every 10 s (polling counts, as above).
        let reader = tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let _ = std::future::poll_fn(|cx| {
                    let _ = Pin::new(&mut read).poll_frame(cx);
                    Poll::Ready(())
                })
                .await;
            }
        });
        assert_eq!(idle.await.unwrap(), Idle::StreamStalled);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited <= Duration::from_secs(31),
            "one period: {waited:?}"
        );
        reader.abort();
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
