//! The server-wide bound on body bytes held in memory (`server.max_buffered_bytes`).
//!
//! `max_tag_body` bounds one request; this bounds them all together. Without it, a burst of
//! GETs for large documents (or one client opening many HTTP/2 streams) holds up to
//! `max_tag_body` each until their tags are known, and a sidecar sized for its usual load
//! is killed for memory. A body that would take the total past the bound is not held: a GET
//! streams through untagged (as one over `max_tag_body` does), a write's body streams to
//! the backend instead of being read whole first. Nothing waits and nothing fails.
//!
//! The count is of bytes held until sent: a body's buffered chunks, plus (uncounted) the one
//! chunk in hand when the budget ran out, which goes out next. Lock-free: a share grows by
//! one compare-and-swap per chunk, and gives its bytes back when dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::Every;

/// How often the log may say that the bound was reached: once is news, every time is noise.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The bytes held now, and the most that may be.
#[derive(Debug)]
pub struct Budget {
    limit: AtomicUsize,
    held: AtomicUsize,
    /// For [`Budget::warn_due`].
    warnings: Every,
}

/// Bytes one body holds of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<Budget>,
    bytes: usize,
}

// === impl Budget ===

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: AtomicUsize::new(limit),
            held: AtomicUsize::new(0),
            warnings: Every::new(WARN_EVERY),
        })
    }

    /// Whether a body just found no room should be logged: true for the first such body,
    /// then at most once every [`WARN_EVERY`]; the metric counts every one.
    pub fn warn_due(&self) -> bool {
        self.warnings.due()
    }

    /// A reload's new bound. Shares already held stay; new ones see it at once.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held now (the `ifmatch_buffered_bytes` gauge).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// An empty share, to grow as a body arrives.
    pub fn share(self: &Arc<Self>) -> Share {
        Share {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// A share of `bytes` if they fit now, for a body whose size is known before it is read.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Option<Share> {
        let mut share = self.share();
        share.reserve(bytes).then_some(share)
    }
}

// === impl Share ===

impl Share {
    /// Grows the share to `total` bytes if the budget has room, else leaves it as it is.
    /// A compare-and-swap: the count never passes the bound, even for an instant.
    pub fn reserve(&mut self, total: usize) -> bool {
        let Some(more) = total.checked_sub(self.bytes).filter(|&n| n > 0) else {
            return true;
        };
        let b = &self.budget;
        let limit = b.limit.load(Ordering::Relaxed);
        let fits = |held: usize| held.checked_add(more).filter(|&n| n <= limit);
        if b.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, fits)
            .is_err()
        {
            return false;
        }
        self.bytes = total;
        true
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// What this share holds, moved into a new one (for bytes that change hands); this one
    /// is left empty.
    pub fn split_off(&mut self) -> Share {
        Share {
            budget: self.budget.clone(),
            bytes: std::mem::take(&mut self.bytes),
        }
    }

    /// Gives all of it back now.
    pub fn release(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
            self.bytes = 0;
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_grow_within_the_bound_and_give_their_bytes_back() {
        let budget = Budget::new(100);
        let mut a = budget.share();
        assert!(a.reserve(40));
        assert!(a.reserve(60), "growing to 60 takes 20 more");
        assert!(
            a.reserve(10),
            "a share never shrinks: 10 is already covered"
        );
        assert_eq!((a.bytes(), budget.held()), (60, 60));

        let b = budget.take(40).expect("40 more fit exactly");
        assert!(budget.take(1).is_none(), "the bound is reached");
        let mut c = budget.share();
        assert!(!c.reserve(1));
        assert_eq!(
            (c.bytes(), budget.held()),
            (0, 100),
            "a refusal takes nothing"
        );

        drop(a);
        assert_eq!(budget.held(), 40);
        assert!(c.reserve(60));
        drop((b, c));
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_is_worth_a_log_line_once_a_minute() {
        // The rule itself is `telemetry::Every`'s, tested there.
        let budget = Budget::new(1);
        assert!(budget.warn_due(), "the first time");
        assert!(!budget.warn_due());
        tokio::time::advance(WARN_EVERY).await;
        assert!(budget.warn_due(), "a minute on");
    }

    #[test]
    fn a_lower_bound_refuses_new_bytes_and_keeps_old_shares() {
        let budget = Budget::new(100);
        let held = budget.take(80).unwrap();
        budget.set_limit(50);
        assert!(budget.take(1).is_none());
        drop(held);
        assert!(budget.take(50).is_some());
        assert!(budget.take(51).is_none());
    }

    #[test]
    fn concurrent_shares_never_hold_more_than_the_bound() {
        let budget = Budget::new(1000);
        let peak = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (budget, peak) = (budget.clone(), peak.clone());
                s.spawn(move || {
                    for i in 0..10_000 {
                        let mut share = budget.share();
                        for n in [100, 200, 300 + i % 7] {
                            if !share.reserve(n) {
                                break;
                            }
                            peak.fetch_max(budget.held(), Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 1000);
        assert_eq!(budget.held(), 0);
    }
}
