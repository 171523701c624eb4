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

use std::future::Future;
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

/// One upstream connection's waiting request, shared by the requests sent on it and the
/// task that drives it.
#[derive(Debug)]
pub struct Watch {
    base: Instant,
    period: Duration,
    /// The waiting request's deadline in nanoseconds after `base` (at least 1), or [`IDLE`]
    /// or [`TIMED_OUT`]: an atomic, as every request writes it.
    deadline: AtomicU64,
}

impl Watch {
    /// A watch whose timer fires at least every `period` from `base` on: no later than the
    /// deadline of any request with a timeout of `period` or more sent after `base`.
    pub fn new(base: Instant, period: Duration) -> Arc<Self> {
        Arc::new(Self {
            base,
            period,
            deadline: AtomicU64::new(IDLE),
        })
    }

    /// Watches a request sent at `start` that must have its response head by
    /// `start + timeout`. False, and nothing watched, if the timeout is shorter than the
    /// connection's period: the timer might fire too late for it.
    pub fn begin(&self, start: Instant, timeout: Duration) -> bool {
        if timeout < self.period {
            return false;
        }
        let after = (start + timeout).saturating_duration_since(self.base);
        let nanos = u64::try_from(after.as_nanos()).unwrap_or(TIMED_OUT - 1);
        self.deadline.store(nanos.max(1), Ordering::Release);
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

    /// At `now`, either marks the waiting request timed out (`None`) or gives when the
    /// timer must fire next.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let next = now + self.period;
        loop {
            let nanos = self.deadline.load(Ordering::Acquire);
            if nanos == IDLE {
                return Some(next);
            }
            let deadline = self.base + Duration::from_nanos(nanos);
            if deadline > now {
                return Some(deadline.min(next));
            }
            // Against the request's own `end`: exactly one of the two wins. Lost, the head
            // came in time or another request began: look again.
            let ended = self.deadline.compare_exchange(
                nanos,
                TIMED_OUT,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if ended.is_ok() {
                return None;
            }
        }
    }
}

/// A connection's future (hyper's `Connection`), ended when a request waits past its
/// deadline. Completes with the connection's own output, or `None` if it was ended.
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
    async fn a_connection_that_ends_by_itself_ends_the_task() {
        let watch = Watch::new(Instant::now(), PERIOD);
        let conn = Box::pin(tokio::time::sleep(Duration::from_secs(1)));
        assert_eq!(Watched::new(conn, watch).await, Some(()));
    }
}
