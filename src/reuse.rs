//! One allocation per connection for its requests' futures.
//!
//! hyper keeps a connection's request future in a slot it allocated once, and moves every
//! new one into it. The proxy's future is 4.7 KB, nearly all of it room for states it has
//! not reached yet, and the move copied all of it: ~470 instructions a request, and the
//! largest single share of its cache misses (BENCHMARKS.md, *Copies and cache misses*).
//! Here the future is built directly in a box that the connection keeps between requests,
//! and hyper keeps only that box. A box in use (HTTP/2 runs several requests at once) is
//! not shared: the next one gets a new one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

/// A box for a future of type `F`, empty between requests.
pub type Slot<F> = Pin<Box<Option<F>>>;

/// A connection's spare box for its requests' futures.
pub struct Spare<F> {
    slot: Arc<Mutex<Option<Slot<F>>>>,
}

impl<F> Default for Spare<F> {
    fn default() -> Self {
        Self {
            slot: Arc::default(),
        }
    }
}

impl<F: Future> Spare<F> {
    /// The spare box, or a new one if it is in use. The caller builds the future in it with
    /// `boxed.as_mut().set(Some(async { .. }))`, and hands it to [`Spare::reused`]. (A
    /// method that took the future, or a closure making it, would have it built on the
    /// stack and copied: the cost this module avoids.)
    pub fn take(&self) -> Slot<F> {
        let spare = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        spare.unwrap_or_else(|| Box::pin(None))
    }

    /// `boxed`, holding a request's future, as the future hyper keeps.
    pub fn reused(&self, boxed: Slot<F>) -> Reused<F> {
        debug_assert!(boxed.is_some(), "a future in the box");
        Reused {
            boxed: Some(boxed),
            home: self.slot.clone(),
        }
    }
}

/// A future in a box that goes back to its connection's [`Spare`] once the future is done
/// or dropped. The future itself is dropped as soon as it completes.
pub struct Reused<F: Future> {
    boxed: Option<Slot<F>>,
    home: Arc<Mutex<Option<Slot<F>>>>,
}

impl<F: Future> Future for Reused<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let boxed = self.boxed.as_mut().expect("polled after completion");
        let fut = boxed
            .as_mut()
            .as_pin_mut()
            .expect("polled after completion");
        let out = ready!(fut.poll(cx));
        boxed.as_mut().set(None);
        Poll::Ready(out)
    }
}

impl<F: Future> Drop for Reused<F> {
    fn drop(&mut self) {
        let Some(mut boxed) = self.boxed.take() else {
            return;
        };
        boxed.as_mut().set(None);
        let mut home = self.home.lock().unwrap_or_else(PoisonError::into_inner);
        if home.is_none() {
            *home = Some(boxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{pending, ready as done};

    fn put<F: Future>(spare: &Spare<F>, fut: F) -> Reused<F> {
        let mut boxed = spare.take();
        boxed.as_mut().set(Some(fut));
        spare.reused(boxed)
    }

    /// Where a future's box lies, to tell one allocation from another.
    fn address<F: Future>(r: &Reused<F>) -> *const Option<F> {
        &**r.boxed.as_ref().expect("boxed")
    }

    #[tokio::test]
    async fn one_request_after_another_uses_one_box() {
        let spare = Spare::default();
        let first = put(&spare, done(1));
        let at = address(&first);
        assert_eq!(first.await, 1);
        let second = put(&spare, done(2));
        assert_eq!(address(&second), at);
        assert_eq!(second.await, 2);
    }

    #[tokio::test]
    async fn requests_at_once_get_their_own_boxes() {
        let spare = Spare::default();
        let (a, b) = (put(&spare, done(1)), put(&spare, done(2)));
        assert_ne!(address(&a), address(&b));
        assert_eq!((a.await, b.await), (1, 2));
    }

    #[test]
    fn a_request_dropped_unfinished_drops_its_future_and_frees_the_box() {
        let spare: Spare<Pin<Box<dyn Future<Output = ()> + Send>>> = Spare::default();
        let held = Arc::new(());
        let h = held.clone();
        let first = put(
            &spare,
            Box::pin(async move {
                let _h = h;
                pending::<()>().await
            }),
        );
        let at = address(&first);
        drop(first);
        assert_eq!(Arc::strong_count(&held), 1, "the future was dropped");
        assert_eq!(address(&put(&spare, Box::pin(pending()))), at);
    }

    /// Ready at once, and holding its `Arc` until it is dropped: an async block would let go
    /// of what it holds as it finishes, and prove nothing here.
    struct Holding {
        _held: Arc<()>,
    }

    impl Future for Holding {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
    }

    #[tokio::test]
    async fn a_finished_future_is_dropped_before_its_wrapper() {
        let spare = Spare::default();
        let held = Arc::new(());
        let mut r = put(
            &spare,
            Holding {
                _held: held.clone(),
            },
        );
        (&mut r).await;
        assert_eq!(Arc::strong_count(&held), 1);
    }

    /// The box itself, not an address the allocator may hand out again: a finished request's
    /// box is the spare, and one in use is not.
    #[tokio::test]
    async fn a_finished_request_gives_its_box_back_to_the_spare() {
        let spare = Spare::default();
        let spared = |s: &Spare<_>| {
            let slot = s.slot.lock().unwrap();
            slot.as_ref().map(|b| &**b as *const Option<_>)
        };
        let first = put(&spare, done(1));
        let at = address(&first);
        assert_eq!(spared(&spare), None, "the box is in use");
        assert_eq!(first.await, 1);
        assert_eq!(spared(&spare), Some(at));
    }
}
