//! What a client connection is doing: how many of its requests are still being answered
//! (response body included) and since when it has had none. [`Activity::idle`] tells the
//! server when a connection has had none for `header_read_timeout`, whatever its protocol:
//! an HTTP/1.1 connection idle between requests or too slow to send a head (hyper's own
//! head-read timer is off, as it costs a timer per request), and an HTTP/2 one that
//! answers pings with no stream open, which gets a GOAWAY. Either would otherwise hold one
//! of `max_connections`.

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
    in_flight: AtomicUsize,
    /// When the last request ended, in microseconds since `opened`: an atomic, not a lock,
    /// since every response writes it.
    last_end: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Counts a request in until the returned guard is dropped: with its response body once
    /// that is sent or abandoned, or with the request's future if that ends first.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// A request is being answered (its response body included).
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Completes once the connection has had no request in flight for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let last_end =
                self.opened + Duration::from_micros(self.last_end.load(Ordering::Acquire));
            let busy = self.busy();
            let deadline = if busy {
                Instant::now() + timeout
            } else {
                last_end + timeout
            };
            if !busy && deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
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

/// A response body that keeps its request counted in until it is dropped.
#[derive(Debug)]
pub struct Tracked {
    body: ProxyBody,
    _request: InFlight,
}

impl Tracked {
    pub fn new(body: ProxyBody, request: InFlight) -> Self {
        Self {
            body,
            _request: request,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
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
        idle.await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(130) && waited < Duration::from_secs(160),
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
