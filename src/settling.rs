//! Writes the backend has not answered whose clients stopped waiting: told 504 at
//! `upstream_timeout` (the write then settles for `settle_timeout` more), or gone. The
//! backend may still apply such a write, so its URL stays locked until it answers
//! (`proxy/write.rs`, `InFlight`). A stop waits for them too, within `shutdown_timeout`:
//! a process that exited first would take the lock with it, and the next one could let a
//! writer through that the late write then overwrites.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// The writes settling now, each by the resource it changes.
#[derive(Debug)]
pub struct Settling {
    next: AtomicU64,
    writes: watch::Sender<BTreeMap<u64, String>>,
}

/// One settling write: counted until dropped.
#[derive(Debug)]
pub struct SettlingWrite {
    of: Arc<Settling>,
    id: u64,
}

impl Default for Settling {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            writes: watch::Sender::new(BTreeMap::new()),
        }
    }
}

impl Settling {
    /// Counts a write to `resource` as settling until the returned handle is dropped.
    pub fn begin(self: &Arc<Self>, resource: &str) -> SettlingWrite {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.writes.send_modify(|w| {
            w.insert(id, resource.to_owned());
        });
        SettlingWrite {
            of: self.clone(),
            id,
        }
    }

    /// How many writes are settling now.
    pub fn count(&self) -> usize {
        self.writes.borrow().len()
    }

    /// The resources of the writes settling now, oldest first (one per write).
    pub fn resources(&self) -> Vec<String> {
        self.writes.borrow().values().cloned().collect()
    }

    /// Resolves once no write is settling.
    pub async fn all_answered(&self) {
        let mut seen = self.writes.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = seen.wait_for(BTreeMap::is_empty).await;
    }
}

impl Drop for SettlingWrite {
    fn drop(&mut self) {
        self.of.writes.send_modify(|w| {
            w.remove(&self.id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn counts_each_write_until_it_is_answered_and_wakes_the_waiter_after_the_last() {
        let s = Arc::new(Settling::default());
        // Nothing settling: no wait at all.
        tokio::time::timeout(Duration::from_millis(50), s.all_answered())
            .await
            .expect("nothing to wait for");
        let a = s.begin("http://b/doc");
        let b = s.begin("http://b/doc");
        let c = s.begin("http://b/other");
        assert_eq!(s.count(), 3);
        drop(b);
        assert_eq!(s.resources(), ["http://b/doc", "http://b/other"]);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.all_answered().await })
        };
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "one write still settles");
        drop(c);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken once the last write is answered")
            .unwrap();
        assert_eq!(s.count(), 0);
    }
}
