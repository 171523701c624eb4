//! Per-URL write locks. A write holds its guard from the precondition check until the backend
//! has answered, so two writers holding the same tag cannot both pass: the second one checks
//! only after the first one's write is done, and sees the new state.
//!
//! Locks live in a map only while someone holds or waits for them, so idle URLs cost nothing.
//! Dropping a guard (or a waiter cancelled because its client went away) releases the lock and
//! removes the map entry when nobody else uses it; no path leaves a lock held.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::Error;
use crate::key::ResourceKey;

type LockMap = DashMap<ResourceKey, Arc<Mutex<()>>>;

#[derive(Debug, Default)]
pub struct WriteLocks {
    map: Arc<LockMap>,
}

/// Proof that this request alone may write to its URL. Released on drop.
#[derive(Debug)]
pub struct WriteGuard {
    // Field order matters: the mutex is released before the slot cleans up the map.
    _held: OwnedMutexGuard<()>,
    _slot: Slot,
}

/// One user of a map entry; the last one to leave removes the entry.
#[derive(Debug)]
struct Slot {
    key: ResourceKey,
    lock: Option<Arc<Mutex<()>>>,
    map: Arc<LockMap>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.lock.take());
        // Clones are only made under the shard lock `remove_if` takes, so a count of one
        // (the map's own) means nobody holds or awaits this lock.
        self.map
            .remove_if(&self.key, |_, lock| Arc::strong_count(lock) == 1);
    }
}

// === impl WriteLocks ===

impl WriteLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits up to `wait` for the lock of `key`.
    pub async fn acquire(&self, key: &ResourceKey, wait: Duration) -> Result<WriteGuard, Error> {
        let lock = self.map.entry(key.clone()).or_default().value().clone();
        let slot = Slot {
            key: key.clone(),
            lock: Some(lock.clone()),
            map: self.map.clone(),
        };
        // If this future is dropped (client gone) or times out, `slot` is dropped and cleans up.
        match tokio::time::timeout(wait, lock.lock_owned()).await {
            Ok(held) => Ok(WriteGuard {
                _held: held,
                _slot: slot,
            }),
            Err(_) => Err(Error::LockTimeout(wait)),
        }
    }

    /// URLs that are locked or awaited now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::test_key as key;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn one_holder_per_url_and_others_wait_their_turn() {
        let locks = Arc::new(WriteLocks::new());
        let g = locks.acquire(&key("/a"), WAIT).await.unwrap();
        // Another URL is not blocked.
        let other = locks.acquire(&key("/b"), WAIT).await.unwrap();
        drop(other);
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.acquire(&key("/a"), WAIT).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap().unwrap();
        assert!(locks.is_empty(), "entries are removed when unused");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let locks = WriteLocks::new();
        let _g = locks.acquire(&key("/a"), WAIT).await.unwrap();
        let err = locks.acquire(&key("/a"), WAIT).await.unwrap_err();
        assert!(matches!(err, Error::LockTimeout(_)));
        assert_eq!(locks.len(), 1, "only the holder's entry is left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_nothing_behind() {
        let locks = Arc::new(WriteLocks::new());
        let g = locks.acquire(&key("/a"), WAIT).await.unwrap();
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.acquire(&key("/a"), WAIT).await.map(|_| ()) });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        drop(g);
        assert!(locks.is_empty());
        // And the lock is free at once.
        let _g = locks
            .acquire(&key("/a"), Duration::from_millis(1))
            .await
            .unwrap();
    }
}
