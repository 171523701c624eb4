//! Per-URL write locks. A write holds its guard from the precondition check until the backend
//! has answered, so two writers holding the same tag cannot both pass: the second one checks
//! only after the first one's write is done, and sees the new state.
//!
//! A write that cannot change the state (a `tag_puts` PUT of the very bytes whose tag it
//! holds, `proxy/write.rs`) may share the lock with others of its kind: in any order they leave the
//! same state, so none can undo another. A write that may change the state holds it alone.
//! The lock is fair: once a sole writer waits, later sharers queue behind it. A write that
//! changes two URLs (COPY, MOVE) holds both locks, taken in key order.
//!
//! Locks live in a map only while someone holds or waits for them, so idle URLs cost nothing.
//! Dropping a guard (or a waiter cancelled because its client went away) releases the lock and
//! removes the map entry when nobody else uses it; no path leaves a lock held.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::error::Error;
use crate::key::ResourceKey;

type LockMap = DashMap<ResourceKey, Arc<RwLock<()>>>;

#[derive(Debug, Default)]
pub struct WriteLocks {
    map: Arc<LockMap>,
}

/// Proof that this request may write to its URL: alone, or beside other writes that leave
/// the state as it is. Released on drop.
#[derive(Debug)]
pub struct WriteGuard {
    // Field order matters: the lock is released before the slot cleans up the map.
    _held: Held,
    _slot: Slot,
    /// A second URL the same write changes (a COPY or MOVE's destination).
    _also: Option<Box<WriteGuard>>,
}

/// The lock's guard, kept only to be dropped (hence never read).
#[derive(Debug)]
#[allow(dead_code)]
enum Held {
    Alone(OwnedRwLockWriteGuard<()>),
    Shared(OwnedRwLockReadGuard<()>),
}

/// One user of a map entry; the last one to leave removes the entry.
#[derive(Debug)]
struct Slot {
    key: ResourceKey,
    lock: Option<Arc<RwLock<()>>>,
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

    /// Waits up to `wait` for the lock of `key`, to hold it alone.
    pub async fn acquire(&self, key: &ResourceKey, wait: Duration) -> Result<WriteGuard, Error> {
        self.acquire_as(key, wait, false).await
    }

    /// Waits up to `wait` in all for the locks of every key of `keys` (one or more, any
    /// repeated taken once), to hold them all alone: a COPY or MOVE's two URLs, and a URL's
    /// key under routes a reload replaced while writes under them may be in flight. They
    /// are taken in key order, so that two writes that need the same two URLs (MOVE a to b,
    /// MOVE b to a) cannot each hold one and wait for the other.
    pub async fn acquire_all(
        &self,
        keys: &[&ResourceKey],
        wait: Duration,
    ) -> Result<WriteGuard, Error> {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let deadline = tokio::time::Instant::now() + wait;
        let (first, rest) = keys.split_first().expect("a key to lock");
        let mut guard = self.acquire(first, wait).await?;
        // Each taken guard holds the next: dropped, the chain lets go of them all.
        let mut last = &mut guard;
        for key in rest {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let next = self
                .acquire(key, left)
                .await
                .map_err(|_| Error::LockTimeout(wait))?;
            last = &mut **last._also.insert(Box::new(next));
        }
        Ok(guard)
    }

    /// Waits up to `wait` for the lock of `key`, to share it with other writes that leave
    /// the state as it is.
    pub async fn acquire_shared(
        &self,
        key: &ResourceKey,
        wait: Duration,
    ) -> Result<WriteGuard, Error> {
        self.acquire_as(key, wait, true).await
    }

    async fn acquire_as(
        &self,
        key: &ResourceKey,
        wait: Duration,
        shared: bool,
    ) -> Result<WriteGuard, Error> {
        let lock = self.map.entry(key.clone()).or_default().value().clone();
        let slot = Slot {
            key: key.clone(),
            lock: Some(lock.clone()),
            map: self.map.clone(),
        };
        // If this future is dropped (client gone) or times out, `slot` is dropped and cleans up.
        let held = async {
            match shared {
                true => Held::Shared(lock.read_owned().await),
                false => Held::Alone(lock.write_owned().await),
            }
        };
        match tokio::time::timeout(wait, held).await {
            Ok(held) => Ok(WriteGuard {
                _held: held,
                _slot: slot,
                _also: None,
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

    /// A write that needs two URLs (a MOVE's source and destination) takes them in one
    /// order whatever the order it names them in, so it holds neither while it waits for
    /// the first: two MOVEs in opposite directions cannot each hold one and wait for the
    /// other until `lock_timeout`.
    #[tokio::test(start_paused = true)]
    async fn a_write_needing_two_urls_holds_neither_while_it_waits_for_the_first() {
        let locks = Arc::new(WriteLocks::new());
        let a = locks.acquire(&key("/a"), WAIT).await.unwrap();
        let waiting = locks.clone();
        let both = tokio::spawn(async move {
            waiting
                .acquire_all(&[&key("/b"), &key("/a")], WAIT)
                .await
                .map(|_| ())
        });
        tokio::task::yield_now().await;
        let b = locks.acquire(&key("/b"), Duration::from_millis(1)).await;
        assert!(b.is_ok(), "/b is held by a write still waiting for /a");
        drop((b, a));
        both.await.unwrap().unwrap();
    }

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
    async fn two_writes_that_need_the_same_two_urls_take_turns() {
        // MOVE /a to /b beside MOVE /b to /a: taken in one order, neither waits forever.
        let locks = Arc::new(WriteLocks::new());
        let both = |from: &'static str, to: &'static str| {
            let locks = locks.clone();
            tokio::spawn(async move {
                let g = locks.acquire_all(&[&key(from), &key(to)], WAIT).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                drop(g);
                Ok::<_, Error>(())
            })
        };
        let (ab, ba) = (both("/a", "/b"), both("/b", "/a"));
        ab.await.unwrap().unwrap();
        ba.await.unwrap().unwrap();
        assert!(locks.is_empty());

        // While one write holds both, each of its URLs is busy for other writers.
        let g = locks
            .acquire_all(&[&key("/b"), &key("/a")], WAIT)
            .await
            .unwrap();
        for url in ["/a", "/b"] {
            let err = locks.acquire(&key(url), Duration::from_secs(1)).await;
            assert!(matches!(err, Err(Error::LockTimeout(_))), "{url} is held");
        }
        drop(g);
        assert!(locks.is_empty(), "both entries are removed");
        let same = locks.acquire_all(&[&key("/a"), &key("/a")], WAIT).await;
        assert!(same.is_ok(), "a MOVE onto itself takes its one lock once");
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

    #[tokio::test(start_paused = true)]
    async fn sharers_run_together_and_a_sole_writer_waits_for_them_all() {
        let locks = Arc::new(WriteLocks::new());
        let s1 = locks.acquire_shared(&key("/a"), WAIT).await.unwrap();
        let s2 = locks.acquire_shared(&key("/a"), WAIT).await.unwrap();
        let l2 = locks.clone();
        let sole = tokio::spawn(async move { l2.acquire(&key("/a"), WAIT).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert!(!sole.is_finished());
        drop(s1);
        tokio::task::yield_now().await;
        assert!(!sole.is_finished(), "one sharer is still in");
        drop(s2);
        sole.await.unwrap().unwrap();
        assert!(locks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sharer_waits_for_a_sole_writer_and_queues_behind_one_that_waits() {
        let locks = Arc::new(WriteLocks::new());
        let sole = locks.acquire(&key("/a"), WAIT).await.unwrap();
        let err = locks
            .acquire_shared(&key("/a"), Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LockTimeout(_)));
        drop(sole);

        // Sharers in, a sole writer waiting: a new sharer must not overtake it, or a steady
        // stream of unchanged writes would starve every change.
        let s1 = locks.acquire_shared(&key("/a"), WAIT).await.unwrap();
        let l2 = locks.clone();
        let sole = tokio::spawn(async move { l2.acquire(&key("/a"), WAIT).await.map(|_| ()) });
        tokio::task::yield_now().await;
        let late = locks
            .acquire_shared(&key("/a"), Duration::from_millis(10))
            .await;
        assert!(late.is_err(), "a sharer overtook a waiting sole writer");
        drop(s1);
        sole.await.unwrap().unwrap();
        assert!(locks.is_empty());
    }
}
