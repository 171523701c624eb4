//! The upstream timeout: how long a request may wait for its response head, kept by one
//! timer per upstream connection instead of one per request.
//!
//! Why: `tokio::time::timeout` around each exchange put a timer into tokio's wheel and took
//! it out again on every request, ~710 instructions of a 1 KiB GET's ~38k (callgrind). Here
//! a request only stores its deadline in its connection's [`Watch`], and the connection's
//! own task ([`Watched`]) keeps one timer that it sets again only when it fires, as
//! [`crate::activity`] does for idle client connections.
//!
//! Never late: the timer, set at `a`, fires by `a + period`. A request that begins at
//! `s >= a` with a timeout `t >= period` has its deadline at `s + t >= a + period`, and the
//! request waiting when the timer is set is covered by setting it for the earlier of the
//! two. A request whose timeout is shorter than its connection's period cannot be watched
//! ([`Watch::begin`] says so) and needs a timer of its own.
//!
//! The same timer bounds what is written after an answer (nginx's `proxy_send_timeout`):
//! a backend that answers a write early (a legacy handler's 409, decided from the head)
//! and then takes no more of its body, while it keeps the connection, would otherwise hold
//! the connection, and its place under `upstream_max_connections`, for good, since no
//! request waits on it any longer. [`WatchedIo`] marks when a write to the connection last
//! could not go on, and a connection with no request waiting whose writes have not moved
//! for a period is ended. Whole bodies and streamed ones alike; a pause that is the
//! client's is not counted, since the connection then has nothing to write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// No request is waiting for its response head.
const IDLE: u64 = 0;
/// The waiting request's deadline passed: its connection has been ended.
const TIMED_OUT: u64 = u64::MAX;
/// No request was waiting, and writes had not moved for a period: the connection has been
/// ended.
const STALLED: u64 = u64::MAX - 1;
/// A request is waiting with a timer of its own (an upload, or a timeout shorter than the
/// period): its own timer keeps it, and a stall is its to judge.
const BUSY: u64 = u64::MAX - 2;

/// One upstream connection's waiting request, shared by the requests sent on it and the
/// task that drives it.
#[derive(Debug)]
pub struct Watch {
    base: Instant,
    period: Duration,
    /// The waiting request's deadline in nanoseconds after `base` (at least 1), or [`IDLE`],
    /// [`BUSY`], [`TIMED_OUT`] or [`STALLED`]: an atomic, as every request writes it.
    deadline: AtomicU64,
    /// Since when a write has been waiting for the backend to take more, in nanoseconds
    /// after `base` (at least 1), or 0: none is.
    stalled: AtomicU64,
}

impl Watch {
    /// A watch whose timer fires at least every `period` from `base` on: no later than the
    /// deadline of any request with a timeout of `period` or more sent after `base`.
    pub fn new(base: Instant, period: Duration) -> Arc<Self> {
        Arc::new(Self {
            base,
            period,
            deadline: AtomicU64::new(IDLE),
            stalled: AtomicU64::new(0),
        })
    }

    /// A request waits on the connection with a timer of its own: it judges its stalls.
    pub fn busy(&self) {
        self.deadline.store(BUSY, Ordering::Release);
    }

    /// Whether the connection was ended because its writes did not move for a period while
    /// no request waited on it.
    pub fn stalled_out(&self) -> bool {
        self.deadline.load(Ordering::Acquire) == STALLED
    }

    /// A write to the connection went on (`pending` false) or had to wait for the backend.
    /// One load on the usual path: a write to a backend seldom waits.
    fn wrote(&self, pending: bool) {
        let since = self.stalled.load(Ordering::Relaxed);
        if pending && since == 0 {
            let after = Instant::now().saturating_duration_since(self.base);
            let nanos = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
            self.stalled.store(nanos.max(1), Ordering::Release);
        } else if !pending && since != 0 {
            self.stalled.store(0, Ordering::Release);
        }
    }

    /// Watches a request sent at `start` that must have its response head by
    /// `start + timeout`. False, and nothing watched, if the timeout is shorter than the
    /// connection's period: the timer might fire too late for it.
    pub fn begin(&self, start: Instant, timeout: Duration) -> bool {
        if timeout < self.period {
            return false;
        }
        let after = (start + timeout).saturating_duration_since(self.base);
        let nanos = u64::try_from(after.as_nanos()).unwrap_or(BUSY - 1);
        self.deadline
            .store(nanos.clamp(1, BUSY - 1), Ordering::Release);
        true
    }

    /// The request's response head is in (or it failed): true if that was in time, false if
    /// its deadline passed first and the connection has been ended.
    pub fn end(&self) -> bool {
        self.deadline.swap(IDLE, Ordering::AcqRel) != TIMED_OUT
    }

    /// Whether the waiting request's deadline passed and the connection was ended for it.
    /// (The pool learns it from [`end`](Self::end); this is for the tests.)
    #[cfg(test)]
    fn timed_out(&self) -> bool {
        self.deadline.load(Ordering::Acquire) == TIMED_OUT
    }

    /// At `now`, either ends the connection (`None`: the waiting request's deadline passed,
    /// marked [`TIMED_OUT`]; or, with none waiting, its writes stalled for a period, marked
    /// [`STALLED`]) or gives when the timer must fire next.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let next = now + self.period;
        loop {
            let nanos = self.deadline.load(Ordering::Acquire);
            let (limit, ended) = match nanos {
                IDLE => match self.stalled.load(Ordering::Acquire) {
                    0 => return Some(next),
                    since => {
                        let period = u64::try_from(self.period.as_nanos()).unwrap_or(u64::MAX);
                        (since.saturating_add(period), STALLED)
                    }
                },
                BUSY.. => return Some(next),
                deadline => (deadline, TIMED_OUT),
            };
            let limit = self.base + Duration::from_nanos(limit);
            if limit > now {
                return Some(limit.min(next));
            }
            // Against the request's own `end`, or a request's `begin`: exactly one wins.
            // Lost, the head came in time or another request began: look again.
            let ended =
                self.deadline
                    .compare_exchange(nanos, ended, Ordering::AcqRel, Ordering::Acquire);
            if ended.is_ok() {
                return None;
            }
        }
    }
}

/// A connection's byte stream, telling its [`Watch`] when writes have to wait for the
/// backend and when they go on again.
pub struct WatchedIo<T> {
    io: T,
    watch: Arc<Watch>,
}

impl<T> WatchedIo<T> {
    pub fn new(io: T, watch: Arc<Watch>) -> Self {
        Self { io, watch }
    }

    fn wrote<R>(&self, polled: Poll<R>) -> Poll<R> {
        self.watch.wrote(polled.is_pending());
        polled
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for WatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.wrote(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.wrote(polled)
    }
}

/// A connection's future (hyper's `Connection`), ended when a request waits past its
/// deadline, or when its writes stall with no request waiting. Completes with the connection's own output, or `None` if it was ended.
pub struct Watched<F> {
    conn: F,
    watch: Arc<Watch>,
    timer: Pin<Box<Sleep>>,
    /// The timer has been polled since it was last set: its wake-up is registered.
    registered: bool,
}

impl<F> Watched<F> {
    pub fn new(conn: F, watch: Arc<Watch>) -> Self {
        let first = watch.base + watch.period;
        Self {
            conn,
            watch,
            timer: Box::pin(tokio::time::sleep_until(first)),
            registered: false,
        }
    }
}

impl<F: Future + Unpin> Future for Watched<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(out) = Pin::new(&mut this.conn).poll(cx) {
            return Poll::Ready(Some(out));
        }
        loop {
            // Once its wake-up is registered, whether the timer fired is one load: the
            // connection's task is polled a few times a request, the timer rarely fires.
            if this.registered && !this.timer.is_elapsed() {
                return Poll::Pending;
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                this.registered = true;
                return Poll::Pending;
            }
            match this.watch.expire(Instant::now()) {
                None => return Poll::Ready(None),
                Some(at) => {
                    this.timer.as_mut().reset(at);
                    this.registered = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(10);

    /// A connection that never ends by itself, driven by a watch until it is ended.
    fn watched() -> (Arc<Watch>, tokio::task::JoinHandle<Option<()>>) {
        let watch = Watch::new(Instant::now(), PERIOD);
        let task = tokio::spawn(Watched::new(std::future::pending::<()>(), watch.clone()));
        (watch, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_ends_the_connection_at_the_deadline() {
        let (watch, task) = watched();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let start = Instant::now();
        assert!(watch.begin(start, PERIOD));
        assert_eq!(task.await.unwrap(), None, "the connection was ended");
        assert_eq!(start.elapsed(), PERIOD, "at the deadline, not later");
        assert!(watch.timed_out());
        assert!(!watch.end(), "the request learns it was too late");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_answered_in_time_keep_the_connection_however_long_it_lives() {
        let (watch, task) = watched();
        for _ in 0..10 {
            // Each waits most of its timeout, and idle gaps in between pass the period.
            assert!(watch.begin(Instant::now(), PERIOD));
            tokio::time::sleep(PERIOD - Duration::from_millis(1)).await;
            assert!(watch.end(), "in time");
            tokio::time::sleep(PERIOD * 2).await;
        }
        assert!(!task.is_finished());
        assert!(!watch.timed_out());
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_longer_timeout_is_kept_to_and_a_shorter_one_is_refused() {
        let (watch, task) = watched();
        assert!(
            !watch.begin(Instant::now(), PERIOD / 2),
            "shorter than the period"
        );
        let start = Instant::now();
        assert!(watch.begin(start, PERIOD * 3));
        assert_eq!(task.await.unwrap(), None);
        assert_eq!(start.elapsed(), PERIOD * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_stalled_for_a_period_with_no_request_waiting_end_the_connection() {
        let (watch, task) = watched();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stalled = Instant::now();
        watch.wrote(true);
        watch.wrote(true);
        assert_eq!(task.await.unwrap(), None, "the connection was ended");
        assert_eq!(stalled.elapsed(), PERIOD, "a period after the stall began");
        assert!(watch.stalled_out());
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_go_on_again_keep_the_connection() {
        let (watch, task) = watched();
        for _ in 0..5 {
            watch.wrote(true);
            tokio::time::sleep(PERIOD - Duration::from_millis(1)).await;
            watch.wrote(false);
        }
        tokio::time::sleep(PERIOD * 3).await;
        assert!(!task.is_finished());
        assert!(!watch.stalled_out());
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_while_a_request_waits_is_the_requests_to_judge() {
        let (watch, task) = watched();
        // Watched: its deadline, not the stall, ends the connection.
        let start = Instant::now();
        assert!(watch.begin(start, PERIOD * 3));
        watch.wrote(true);
        assert_eq!(task.await.unwrap(), None);
        assert_eq!(start.elapsed(), PERIOD * 3);
        assert!(watch.timed_out() && !watch.stalled_out());

        // With a timer of its own: kept while it waits, judged once it is answered.
        let (watch, task) = watched();
        watch.busy();
        let stalled = Instant::now();
        watch.wrote(true);
        tokio::time::sleep(PERIOD * 5).await;
        assert!(!task.is_finished(), "the request's own timer judges");
        assert!(watch.end());
        assert_eq!(task.await.unwrap(), None);
        assert!(stalled.elapsed() <= PERIOD * 6, "{:?}", stalled.elapsed());
        assert!(watch.stalled_out());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_by_itself_ends_the_task() {
        let watch = Watch::new(Instant::now(), PERIOD);
        let conn = Box::pin(tokio::time::sleep(Duration::from_secs(1)));
        assert_eq!(Watched::new(conn, watch).await, Some(()));
    }
}
